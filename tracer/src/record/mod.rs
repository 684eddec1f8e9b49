//! Recordings and replay: every input of the pipeline written to a file ([`format`]), and the
//! bill recomputed from it ([`replay`]).

pub mod format;
pub mod replay;
