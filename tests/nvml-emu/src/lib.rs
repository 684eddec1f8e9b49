//! NVML emulation (work in progress).
