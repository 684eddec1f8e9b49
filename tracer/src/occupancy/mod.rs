//! Who occupies which GPU: the devices on this host, the services (processes that serve one
//! endpoint) found from the targets, and the binding of processes to GPUs from what the probes
//! and NVML report.

pub mod binding;
pub mod devices;
pub mod service;
pub mod workload;
