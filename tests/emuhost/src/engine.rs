//! The engine process: stand-in GPUs, emulated sensors, continuous batching, ground truth.
//!
//! # Scheduling
//!
//! Like vLLM's V1 scheduler with chunked prefill: every step first gives each running request
//! whose prompt is done one decode token, then hands the remaining token budget
//! (`--max-batched-tokens`) to partially prefilled requests and then to waiting ones (FIFO, at
//! most `--max-seqs` running). A request's first token comes out of the step that finishes its
//! prefill; every later step emits one more token.
//!
//! A request enters the running batch (`scheduled_us` in its ground-truth line) at the start of
//! the first step that gives it work; until then it waits in the FIFO queue. With
//! `--kv-tokens` the KV cache holds that many tokens (prompt and output of every running
//! request): a step that would overflow it first preempts the latest-scheduled running requests,
//! which go back to the front of the queue and, rescheduled, prefill their prompt and the
//! tokens they had generated again (vLLM's recompute preemption); a waiting request is not
//! scheduled while it would not fit. Without it (default) the engine never preempts.
//!
//! # Output
//!
//! Like vLLM's engine core, every step ends with exactly one message to the API process (one
//! `write`, [`FromEngine::Step`]) carrying the step's tokens and finished requests, even when
//! the step emitted nothing (it only prefilled a chunk). Cancelled requests are not reported
//! back: the API process asked for it and has already forgotten them.
//!
//! With `--cuda-lib`, the engine `dlopen`s that library at start and per step calls its
//! `cuLaunchKernel` `--launches-per-step` times as the step starts and `cuStreamSynchronize`
//! once its compute ends, before the step message is sent.
//!
//! # Energy
//!
//! The model is tensor parallel over all `--gpus` GPUs: each step runs on every GPU at once.
//! [`PowerModel`] describes one GPU's shard, so during a step every GPU draws
//! `idle_w + dynamic_j / duration` and the step's dynamic energy over the whole group is
//! `n_gpus × dynamic_j`, split equally across GPUs. The engine sleeps for the step's duration,
//! measures how long it actually took and scales the energy to that (the sensors integrate the
//! power it set over the real time).
//!
//! # Ground truth
//!
//! Each request's line carries two references, summed over the steps it was in:
//!
//! * **caused** (`dynamic_j`, `idle_j`, `total_j`): the request is charged the marginal cost it
//!   caused in the step ([`PowerModel::split_step`]: the step's fixed base power shared equally
//!   among the requests in the step, plus the base power over the time its own tokens add —
//!   so a prefill chunk pays for the time it stretches the step — plus its tokens' energy),
//!   and the idle power drawn during the step in proportion to that
//!   ([`PowerModel::split_idle`]).
//! * **time sharing** (`timeshare_dynamic_j`, `timeshare_j`): the step's dynamic energy, and
//!   its total energy (dynamic plus the idle power drawn during the step), split equally among
//!   the requests in the step ([`PowerModel::split_timeshare`]).
//!
//! Idle time between steps belongs to no request; it is `idle_outside_requests_j` in the
//! summary line.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tracer_emugpu::{
    GpuSpec, PowerModel, ProcessEntry, SensorWriter, StepEntry, UtilSample, monotonic_us,
    spawn_ticker,
};

use crate::cuda::CudaLib;
use crate::gpu::GpuSession;
use crate::prompt::{BLOCK_TOKENS, block_hashes, prompt_tokens};
use crate::proto::{FromEngine, ToEngine, Usage};
use crate::signals;

/// Text of every generated token.
pub const TOKEN_TEXT: &str = "tok ";
/// Most entries kept in the prefix cache before it is flushed.
const MAX_CACHED_BLOCKS: usize = 1 << 20;
/// Period of utilisation samples.
const UTIL_PERIOD_US: u64 = 100_000;
/// GPU memory the engine claims on each GPU (weights + KV cache, like vLLM's 90 %).
const ENGINE_GPU_MEMORY: u64 = 72 * 1024 * 1024 * 1024;

/// Options of the engine, shared with `serve` (which passes them on).
#[derive(Debug, Clone, clap::Args)]
pub struct EngineOpts {
    /// Number of emulated GPUs (tensor-parallel degree).
    #[arg(long, default_value_t = 1)]
    pub gpus: u32,
    /// Path of the emulated sensor state file (what `nvml-emu` reads).
    #[arg(long)]
    pub state: PathBuf,
    /// Directory holding the stand-in device nodes (`nvidiactl`, `nvidia-uvm`, `nvidia<i>`).
    #[arg(long)]
    pub device_root: PathBuf,
    /// Ground-truth output (JSON lines, appended).
    #[arg(long)]
    pub truth: PathBuf,
    /// Fixed duration of a step, in milliseconds (the power model's step overhead).
    #[arg(long, default_value_t = 10.0)]
    pub step_ms: f64,
    /// Token budget of a step (decode tokens + prefill chunk tokens).
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: u32,
    /// Most requests running at once.
    #[arg(long, default_value_t = 256)]
    pub max_seqs: usize,
    /// Stand-in CUDA driver library to `dlopen` (calls `cuLaunchKernel` and
    /// `cuStreamSynchronize` every step).
    #[arg(long)]
    pub cuda_lib: Option<PathBuf>,
    /// `cuLaunchKernel` calls per step (with `--cuda-lib`).
    #[arg(long, default_value_t = 48)]
    pub launches_per_step: u32,
    /// Every step as a JSON line here (start, end, decode and prefill tokens, dynamic energy
    /// of one GPU): the per-step truth behind the per-request one.
    #[arg(long)]
    pub step_log: Option<PathBuf>,
    /// KV-cache capacity in tokens (0: unlimited, never preempts). See the module docs.
    #[arg(long, default_value_t = 0)]
    pub kv_tokens: u64,
}

impl EngineOpts {
    /// The same options as command-line arguments.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut push = |k: &str, val: OsString| {
            v.push(k.into());
            v.push(val);
        };
        push("--gpus", self.gpus.to_string().into());
        push("--state", self.state.clone().into());
        push("--device-root", self.device_root.clone().into());
        push("--truth", self.truth.clone().into());
        push("--step-ms", self.step_ms.to_string().into());
        push(
            "--max-batched-tokens",
            self.max_batched_tokens.to_string().into(),
        );
        push("--max-seqs", self.max_seqs.to_string().into());
        push("--kv-tokens", self.kv_tokens.to_string().into());
        if let Some(lib) = &self.cuda_lib {
            push("--cuda-lib", lib.clone().into());
        }
        push(
            "--launches-per-step",
            self.launches_per_step.to_string().into(),
        );
        if let Some(p) = &self.step_log {
            push("--step-log", p.clone().into());
        }
        v
    }

    /// The power model of one GPU with these options.
    pub fn power_model(&self, spec: &GpuSpec) -> PowerModel {
        PowerModel {
            idle_w: spec.idle_w,
            max_w: spec.max_w,
            step_overhead_s: self.step_ms / 1000.0,
            ..PowerModel::default()
        }
    }
}

#[derive(Debug, Default)]
struct Inbox {
    submits: VecDeque<ToEngine>,
    cancels: Vec<u64>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    cv: Condvar,
}

#[derive(Debug)]
struct Req {
    rid: u64,
    request_id: Option<String>,
    prompt_tokens: u32,
    hashes: Vec<u64>,
    max_tokens: u32,
    arrive_us: u64,
    /// When it entered the running batch.
    scheduled_us: Option<u64>,
    cached: u32,
    uncached: u32,
    prefilled: u32,
    generated: u32,
    /// Tokens it had generated when last preempted (prefilled again with the prompt).
    recompute: u32,
    preemptions: u32,
    /// When it was preempted and when it ran again, µs.
    paused_us: Vec<(u64, Option<u64>)>,
    first_token_us: Option<u64>,
    dynamic_j: f64,
    idle_j: f64,
    timeshare_dynamic_j: f64,
    timeshare_j: f64,
    /// This step's work.
    entry: StepEntry,
}

impl Req {
    fn prefill_done(&self) -> bool {
        self.prefilled >= self.uncached
    }

    /// Tokens it holds in the KV cache: its cached prefix, what it prefilled, what it
    /// generated since (the recomputed tokens are among the prefilled ones).
    fn kv_tokens(&self) -> u64 {
        u64::from(self.cached + self.prefilled + self.generated - self.recompute)
    }
}

/// Everything the scheduler owns.
struct Engine {
    opts: EngineOpts,
    model: PowerModel,
    writer: Arc<SensorWriter>,
    n_gpus: usize,
    out: UnixStream,
    truth: File,
    step_log: Option<std::io::BufWriter<File>>,
    cuda: Option<CudaLib>,
    steps: u64,
    cuda_failures: u64,
    cache: HashSet<u64>,
    waiting: VecDeque<Req>,
    running: Vec<Req>,
    last_end_us: u64,
    idle_outside_j: f64,
    attributed_j: f64,
    finished: u64,
    util_window_start: u64,
    util_busy_us: u64,
    pid: u32,
}

/// Run the engine on the socket `sock` (connected to the API process) until it is told to
/// stop, the API process goes away, or SIGTERM/SIGINT arrives.
pub fn run(opts: &EngineOpts, sock: UnixStream) -> Result<()> {
    signals::install_engine();
    let specs = GpuSpec::h100s(opts.gpus.max(1));
    // The driver library first, like a CUDA application.
    let cuda = opts.cuda_lib.as_deref().map(CudaLib::open).transpose()?;
    // Driver first, like CUDA's initialisation.
    let gpus = GpuSession::open(&opts.device_root, &specs)?;
    let start_us = monotonic_us();
    let writer = Arc::new(
        SensorWriter::create_at(&opts.state, &specs, start_us)
            .with_context(|| format!("create sensor state {}", opts.state.display()))?,
    );
    let ticker = spawn_ticker(Arc::clone(&writer), Duration::from_millis(1))?;
    let pid = std::process::id();
    for g in 0..specs.len() {
        writer.set_processes(
            g,
            &[ProcessEntry {
                pid,
                used_gpu_memory: ENGINE_GPU_MEMORY,
            }],
        )?;
    }
    let truth = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.truth)
        .with_context(|| format!("open truth file {}", opts.truth.display()))?;

    let step_log = match &opts.step_log {
        Some(p) => Some(std::io::BufWriter::new(
            File::create(p).with_context(|| format!("create step log {}", p.display()))?,
        )),
        None => None,
    };
    let shared = Arc::new(Shared::default());
    let reader_sock = sock.try_clone()?;
    let reader_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("engine-inbox".to_owned())
        .spawn(move || read_inbox(reader_sock, &reader_shared))?;

    let mut engine = Engine {
        model: opts.power_model(&specs[0]),
        opts: opts.clone(),
        writer: Arc::clone(&writer),
        n_gpus: specs.len(),
        out: sock,
        truth,
        step_log,
        cuda,
        steps: 0,
        cuda_failures: 0,
        cache: HashSet::new(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        last_end_us: start_us,
        idle_outside_j: 0.0,
        attributed_j: 0.0,
        finished: 0,
        util_window_start: start_us,
        util_busy_us: 0,
        pid,
    };
    engine.send(&FromEngine::Ready { pid });
    let result = engine.schedule(&shared);

    // Abort what is left, then close the books.
    let now = monotonic_us();
    let left: Vec<Req> = engine
        .waiting
        .drain(..)
        .chain(engine.running.drain(..))
        .collect();
    for r in left {
        engine.finish(&r, now, true);
    }
    ticker.stop();
    if engine.cuda_failures > 0 {
        eprintln!(
            "emuhost engine: {} CUDA calls did not return 0",
            engine.cuda_failures
        );
    }
    let end_us = monotonic_us();
    engine.idle_outside_j += engine.idle_w_all() * (end_us - engine.last_end_us) as f64 / 1e6;
    let mut per_gpu = Vec::new();
    for g in 0..engine.n_gpus {
        per_gpu.push(writer.true_energy_at(g, end_us)?);
        writer.set_processes(g, &[])?;
    }
    let summary = json!({
        "summary": true,
        "n_gpus": engine.n_gpus,
        "requests": engine.finished,
        "start_us": start_us,
        "end_us": end_us,
        "energy_j_per_gpu": per_gpu,
        "energy_j": per_gpu.iter().sum::<f64>(),
        "attributed_j": engine.attributed_j,
        "idle_outside_requests_j": engine.idle_outside_j,
    });
    writeln!(engine.truth, "{summary}")?;
    engine.truth.flush()?;
    if let Some(log) = &mut engine.step_log {
        log.flush()?;
    }
    gpus.close();
    result
}

fn read_inbox(sock: UnixStream, shared: &Shared) {
    let reader = BufReader::new(sock);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let msg: ToEngine = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("emuhost engine: bad message {line:?}: {e}");
                continue;
            }
        };
        let mut inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        match msg {
            ToEngine::Submit { .. } => inbox.submits.push_back(msg),
            ToEngine::Cancel { rid } => inbox.cancels.push(rid),
            ToEngine::Shutdown => inbox.stop = true,
        }
        shared.cv.notify_one();
        if inbox.stop {
            return;
        }
    }
    let mut inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
    inbox.stop = true;
    shared.cv.notify_one();
}

impl Engine {
    fn idle_w_all(&self) -> f64 {
        self.model.idle_w * self.n_gpus as f64
    }

    /// Send one message to the API process in one write. A dead peer is noticed by the inbox
    /// reader (EOF), so write errors are only reported.
    fn send(&mut self, msg: &FromEngine) {
        let Ok(mut buf) = serde_json::to_string(msg) else {
            return;
        };
        buf.push('\n');
        if let Err(e) = self.out.write_all(buf.as_bytes()) {
            eprintln!("emuhost engine: write to API process: {e}");
        }
    }

    fn schedule(&mut self, shared: &Shared) -> Result<()> {
        loop {
            let (submits, cancels, stop) = {
                let mut inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                if self.running.is_empty()
                    && self.waiting.is_empty()
                    && inbox.submits.is_empty()
                    && inbox.cancels.is_empty()
                    && !inbox.stop
                {
                    inbox = shared
                        .cv
                        .wait_timeout(inbox, Duration::from_millis(50))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                (
                    std::mem::take(&mut inbox.submits),
                    std::mem::take(&mut inbox.cancels),
                    inbox.stop,
                )
            };
            if stop || signals::stop_requested() {
                return Ok(());
            }
            for msg in submits {
                if let ToEngine::Submit {
                    rid,
                    request_id,
                    prompt,
                    max_tokens,
                    arrive_us,
                } = msg
                {
                    let pt = prompt_tokens(&prompt);
                    self.waiting.push_back(Req {
                        rid,
                        request_id,
                        prompt_tokens: pt,
                        hashes: block_hashes(&prompt),
                        max_tokens: max_tokens.max(1),
                        arrive_us,
                        scheduled_us: None,
                        cached: 0,
                        uncached: pt,
                        prefilled: 0,
                        generated: 0,
                        recompute: 0,
                        preemptions: 0,
                        paused_us: Vec::new(),
                        first_token_us: None,
                        dynamic_j: 0.0,
                        idle_j: 0.0,
                        timeshare_dynamic_j: 0.0,
                        timeshare_j: 0.0,
                        entry: StepEntry::default(),
                    });
                }
            }
            if !cancels.is_empty() {
                self.cancel(&cancels);
            }
            self.step()?;
            self.maybe_push_util(monotonic_us());
        }
    }

    fn cancel(&mut self, rids: &[u64]) {
        let now = monotonic_us();
        let (mut gone, keep): (Vec<Req>, Vec<Req>) =
            self.waiting.drain(..).partition(|r| rids.contains(&r.rid));
        self.waiting = keep.into();
        let (cancelled, keep): (Vec<Req>, Vec<Req>) =
            self.running.drain(..).partition(|r| rids.contains(&r.rid));
        self.running = keep;
        gone.extend(cancelled);
        for r in gone {
            self.finish(&r, now, true);
        }
    }

    /// Longest cached prefix, in tokens, capped so that at least one token is computed.
    fn cached_tokens(&self, r: &Req) -> u32 {
        let blocks = r
            .hashes
            .iter()
            .take_while(|h| self.cache.contains(h))
            .count();
        let max_blocks = (r.prompt_tokens.saturating_sub(1) as usize) / BLOCK_TOKENS;
        (blocks.min(max_blocks) * BLOCK_TOKENS) as u32
    }

    /// Plan and run one step; sends its message. Does nothing if there is no work.
    /// Preempts the latest-scheduled running requests until the step's tokens fit the KV
    /// cache (`--kv-tokens`); they go back to the front of the queue.
    fn preempt_to_fit(&mut self) {
        let cap = self.opts.kv_tokens;
        if cap == 0 {
            return;
        }
        while self.running.len() > 1 {
            let need: u64 = self
                .running
                .iter()
                .map(|r| r.kv_tokens() + u64::from(r.prefill_done()))
                .sum();
            if need <= cap {
                break;
            }
            let Some(mut r) = self.running.pop() else {
                break;
            };
            r.preemptions += 1;
            r.paused_us.push((monotonic_us(), None));
            r.recompute = r.generated;
            r.prefilled = 0;
            r.cached = 0;
            r.uncached = r.prompt_tokens + r.recompute;
            self.waiting.push_front(r);
        }
    }

    /// Whether the waiting request `r` fits the KV cache beside the running ones.
    fn fits(&self, r: &Req) -> bool {
        let cap = self.opts.kv_tokens;
        let used: u64 = self.running.iter().map(Req::kv_tokens).sum();
        cap == 0 || used + u64::from(r.prompt_tokens + r.recompute) <= cap
    }

    fn step(&mut self) -> Result<()> {
        self.preempt_to_fit();
        let mut budget = self.opts.max_batched_tokens.max(1);
        for r in &mut self.running {
            r.entry = StepEntry::default();
            if r.prefill_done() {
                r.entry.decode_tokens = 1;
                budget = budget.saturating_sub(1);
            }
        }
        for r in &mut self.running {
            if !r.prefill_done() && budget > 0 {
                let chunk = (r.uncached - r.prefilled).min(budget);
                r.entry.prefill_tokens = chunk;
                budget -= chunk;
            }
        }
        while budget > 0 && self.running.len() < self.opts.max_seqs.max(1) {
            if !self.waiting.front().is_some_and(|r| self.fits(r)) && !self.running.is_empty() {
                break;
            }
            let Some(mut r) = self.waiting.pop_front() else {
                break;
            };
            let now = monotonic_us();
            r.scheduled_us.get_or_insert(now);
            if let Some(p) = r.paused_us.last_mut() {
                p.1.get_or_insert(now);
            }
            r.cached = self.cached_tokens(&r);
            r.uncached = r.prompt_tokens + r.recompute - r.cached;
            let chunk = r.uncached.min(budget);
            r.entry = StepEntry {
                decode_tokens: 0,
                prefill_tokens: chunk,
            };
            budget -= chunk;
            self.running.push(r);
        }
        let members: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let e = self.running[i].entry;
                e.decode_tokens > 0 || e.prefill_tokens > 0
            })
            .collect();
        if members.is_empty() {
            return Ok(());
        }
        let entries: Vec<StepEntry> = members.iter().map(|&i| self.running[i].entry).collect();
        let cost = self.model.step_of(&entries);
        let watts = cost.power_w(self.model.idle_w);

        let t0 = monotonic_us();
        for g in 0..self.n_gpus {
            self.writer.set_power(g, t0, watts)?;
        }
        if let Some(cuda) = &self.cuda {
            self.cuda_failures += u64::from(cuda.launch_kernels(self.opts.launches_per_step));
        }
        let deadline = t0 + (cost.duration_s * 1e6).round() as u64;
        loop {
            let now = monotonic_us();
            if now >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(deadline - now));
        }
        if let Some(cuda) = &self.cuda
            && cuda.synchronize() != 0
        {
            self.cuda_failures += 1;
        }
        let t1 = monotonic_us();
        for g in 0..self.n_gpus {
            self.writer.set_power(g, t1, self.model.idle_w)?;
        }
        self.idle_outside_j += self.idle_w_all() * (t0 - self.last_end_us) as f64 / 1e6;
        self.last_end_us = t1;
        self.util_busy_us += t1 - t0;

        // Ground truth of the step as it really ran (t1 - t0 ≥ the model's duration).
        let actual_s = (t1 - t0) as f64 / 1e6;
        let scale = if cost.duration_s > 0.0 {
            actual_s / cost.duration_s
        } else {
            1.0
        };
        let n = self.n_gpus as f64;
        let dyn_shares: Vec<f64> = self
            .model
            .split_step(&entries)
            .iter()
            .map(|s| s * scale * n)
            .collect();
        let step_idle_j = self.idle_w_all() * actual_s;
        let idle_shares = PowerModel::split_idle(step_idle_j, &dyn_shares);
        let step_dynamic_j: f64 = dyn_shares.iter().sum();
        let ts_dynamic = PowerModel::split_timeshare(step_dynamic_j, members.len());
        let ts_total = PowerModel::split_timeshare(step_dynamic_j + step_idle_j, members.len());

        self.steps += 1;
        if let Some(log) = &mut self.step_log {
            let line = json!({
                "step": self.steps,
                "t0_us": t0,
                "t1_us": t1,
                "decode": entries.iter().map(|e| e.decode_tokens).sum::<u32>(),
                "prefill": entries.iter().map(|e| e.prefill_tokens).sum::<u32>(),
                "members": members.len(),
                "dynamic_j_per_gpu": step_dynamic_j / n,
            });
            if let Err(e) = writeln!(log, "{line}") {
                eprintln!("emuhost engine: step log: {e}");
            }
        }
        let mut tokens = Vec::new();
        let mut finished = Vec::new();
        let mut done = Vec::new();
        for (k, &i) in members.iter().enumerate() {
            let r = &mut self.running[i];
            r.dynamic_j += dyn_shares[k];
            r.idle_j += idle_shares[k];
            r.timeshare_dynamic_j += ts_dynamic[k];
            r.timeshare_j += ts_total[k];
            let emits = if r.entry.prefill_tokens > 0 {
                r.prefilled += r.entry.prefill_tokens;
                r.prefill_done()
            } else {
                r.entry.decode_tokens > 0
            };
            if r.entry.prefill_tokens > 0 && r.prefill_done() {
                if self.cache.len() + r.hashes.len() > MAX_CACHED_BLOCKS {
                    self.cache.clear();
                }
                self.cache.extend(r.hashes.iter().copied());
            }
            if emits {
                r.generated += 1;
                r.first_token_us.get_or_insert(t1);
                tokens.push((r.rid, TOKEN_TEXT.to_owned()));
                if r.generated >= r.max_tokens {
                    finished.push((r.rid, usage_of(r)));
                    done.push(i);
                }
            }
        }
        self.send(&FromEngine::Step {
            step: self.steps,
            tokens,
            done: finished,
        });
        for &i in done.iter().rev() {
            let r = self.running.remove(i);
            self.finish(&r, t1, false);
        }
        Ok(())
    }

    /// Append `r`'s ground-truth line.
    fn finish(&mut self, r: &Req, end_us: u64, aborted: bool) {
        let total = r.dynamic_j + r.idle_j;
        self.attributed_j += total;
        self.finished += 1;
        let per_gpu = vec![total / self.n_gpus as f64; self.n_gpus];
        let line = json!({
            "request_id": r.request_id,
            "id": format!("cmpl-{}", r.rid),
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached,
            "completion_tokens": r.generated,
            "arrive_us": r.arrive_us,
            "scheduled_us": r.scheduled_us,
            "first_token_us": r.first_token_us,
            "end_us": end_us,
            "dynamic_j": r.dynamic_j,
            "idle_j": r.idle_j,
            "total_j": total,
            "timeshare_dynamic_j": r.timeshare_dynamic_j,
            "timeshare_j": r.timeshare_j,
            "per_gpu_j": per_gpu,
            "aborted": aborted,
            "preemptions": r.preemptions,
            "paused_us": r.paused_us,
        });
        if let Err(e) = writeln!(self.truth, "{line}") {
            eprintln!("emuhost engine: write truth: {e}");
        }
    }

    fn maybe_push_util(&mut self, now: u64) {
        let window = now.saturating_sub(self.util_window_start);
        if window < UTIL_PERIOD_US {
            return;
        }
        let busy = (self.util_busy_us * 100 / window).min(100) as u32;
        for g in 0..self.n_gpus {
            let sample = UtilSample {
                pid: self.pid,
                timestamp_us: now,
                sm_util: busy,
                mem_util: busy / 2,
            };
            if let Err(e) = self.writer.push_utilisation(g, sample) {
                eprintln!("emuhost engine: utilisation: {e}");
            }
        }
        self.util_window_start = now;
        self.util_busy_us = 0;
    }
}

fn usage_of(r: &Req) -> Usage {
    Usage {
        prompt_tokens: r.prompt_tokens,
        cached_tokens: r.cached,
        completion_tokens: r.generated,
    }
}
