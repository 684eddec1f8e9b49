//! Heap bytes the HTTP tracker keeps per open connection that has served one request: the
//! per-connection part of the daemon's RSS at 10k connections (`BENCHMARKS.md`, issue 17).
//! `cargo bench -p tracer --bench conn_memory` (a counting allocator: exact, not timed).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use tracer::wire::{ConnKey, Direction, Lifecycle, Role, Tracker, TrackerConfig};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator, counting what is live.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: per the caller.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: per the caller.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: per the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const REQUEST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\
user-agent: loadgen\r\ncontent-type: application/json\r\ncontent-length: 87\r\n\r\n\
{\"model\":\"m\",\"stream\":false,\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
content-length: 183\r\ndate: Sat, 05 Dec 2026 20:00:00 GMT\r\n\r\n\
{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{\"index\":0,\
\"message\":{\"role\":\"assistant\",\"content\":\"a b c d\"}}],\"usage\":{\"prompt_tokens\":9,\
\"completion_tokens\":4}}";

fn main() {
    let n = 10_000_u32;
    for redact in [false, true] {
        let mut t = Tracker::new(TrackerConfig {
            redaction_key: redact.then_some([1, 2]),
            ..TrackerConfig::default()
        });
        let mut out: Vec<Lifecycle> = Vec::new();
        let before = LIVE.load(Ordering::Relaxed);
        for i in 0..n {
            let conn = ConnKey {
                tgid: 10,
                fd: i as i32 + 3,
                conn_id: u64::from(i),
            };
            let ts = u64::from(i) * 1000;
            t.on_open(conn, ts, Role::Server);
            t.on_data(
                conn,
                ts + 1,
                Direction::Inbound,
                REQUEST.len() as u64,
                REQUEST,
            );
            t.on_data(
                conn,
                ts + 2,
                Direction::Outbound,
                RESPONSE.len() as u64,
                RESPONSE,
            );
            t.drain_into(&mut out);
            out.clear();
        }
        let live = LIVE.load(Ordering::Relaxed) - before;
        assert_eq!(t.open_connections(), n as usize);
        assert_eq!(t.stats().completed, u64::from(n));
        println!(
            "tracker, {n} open connections each served once (redaction {}): {:.0} bytes of heap \
             per connection",
            if redact { "on" } else { "off" },
            live as f64 / f64::from(n)
        );
    }
}
