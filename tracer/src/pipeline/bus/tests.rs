use super::*;
use crate::pipeline::Input;

/// Counts what it sees; fails from the `fail_at`-th fact on.
struct Probe {
    interest: Interest,
    seen: Arc<AtomicU64>,
    fail_at: Option<u64>,
}

impl Subscriber for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn interest(&self) -> Interest {
        self.interest
    }

    fn on_fact(&mut self, _fact: &Fact<'_>) -> Result<(), SubscriberError> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fail_at.is_some_and(|f| n >= f) {
            return Err(std::io::Error::other("disk full").into());
        }
        Ok(())
    }
}

fn inputs_only() -> Interest {
    Interest {
        inputs: true,
        ..Interest::default()
    }
}

#[test]
fn facts_go_only_to_who_wants_them_and_failures_are_dropped_and_counted() {
    let mut bus = Bus::new();
    let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    bus.subscribe(Box::new(Probe {
        interest: inputs_only(),
        seen: Arc::clone(&a),
        fail_at: Some(3),
    }));
    bus.subscribe(Box::new(Probe {
        interest: inputs_only(),
        seen: Arc::clone(&b),
        fail_at: None,
    }));
    assert!(!bus.interest().records, "nobody wants records");
    for _ in 0..5 {
        bus.publish(&Fact::Input(&Input::Finish));
        bus.publish(&Fact::Probe(&[1, 2, 3]));
    }
    assert_eq!(
        a.load(Ordering::Relaxed),
        3,
        "the failing one stops at its failure"
    );
    assert_eq!(b.load(Ordering::Relaxed), 10, "the other sees every fact");
    let health = bus.health();
    assert_eq!(health.len(), 2);
    let failed = health
        .iter()
        .find(|h| h.failed)
        .expect("failed one reported");
    assert_eq!(failed.delivered, 2);
}

#[test]
fn a_full_lossy_queue_counts_drops_and_resumes_when_read() {
    let mut bus = Bus::new();
    let mut q = bus.subscribe_lossy("live", inputs_only(), 2);
    for _ in 0..5 {
        bus.publish(&Fact::Input(&Input::Finish));
    }
    assert_eq!((q.stats.delivered(), q.stats.dropped()), (2, 3));
    assert!(q.rx.try_recv().is_ok());
    bus.publish(&Fact::Input(&Input::Finish));
    assert_eq!((q.stats.delivered(), q.stats.dropped()), (3, 3));
    drop(q);
    bus.publish(&Fact::Input(&Input::Finish));
    let h = bus.health();
    assert_eq!(h[0].dropped, 4, "a consumer that went away counts as drops");
}
