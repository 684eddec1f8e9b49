//! An emulated inference server shaped like vLLM, and a load generator, for tracer's proving
//! ground.
//!
//! * `emuhost serve` is the API process: an OpenAI-compatible HTTP/1.1 server
//!   ([`api`]). It never touches a GPU: it forwards requests as JSON lines ([`proto`]) over a
//!   Unix stream socket to a child engine process, and one writer loop ([`writer`]) writes each
//!   step's chunks back one request at a time, at a CPU cost per request, like a Python server.
//! * `emuhost engine` is the engine process ([`engine`]): it opens the (stand-in) NVIDIA
//!   device nodes and issues the driver's ioctls the way CUDA does ([`gpu`]), owns the
//!   emulated sensors ([`tracer_emugpu::SensorWriter`]), runs continuous batching with
//!   chunked prefill and prefix caching, sends one message per step, optionally calls a
//!   stand-in CUDA library every step ([`cuda`]), and writes the ground-truth energy of every
//!   request.
//! * `emuload` ([`load`]) is a closed-loop load generator speaking HTTP through the minimal
//!   client in [`client`].

pub mod api;
pub mod client;
pub mod cuda;
pub mod engine;
pub mod gpu;
pub mod http;
pub mod load;
pub mod prompt;
pub mod proto;
pub mod signals;
pub mod writer;
