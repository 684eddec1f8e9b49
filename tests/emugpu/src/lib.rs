//! Emulated GPUs (work in progress).
