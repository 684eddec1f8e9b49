//! Fields kept in memory only, never in an output (a prompt's block hashes, a message's hash),
//! are still part of the state a checkpoint must carry: serialised only while
//! [`checkpointing`] runs.

use std::cell::Cell;

thread_local! {
    static CHECKPOINTING: Cell<bool> = const { Cell::new(false) };
}

/// `skip_serializing_if` for memory-only fields: skipped unless a checkpoint is being written.
pub(crate) fn memory_only<T>(_: &T) -> bool {
    !CHECKPOINTING.with(Cell::get)
}

/// Runs `f` (a checkpoint's serialisation) with memory-only fields included.
pub(crate) fn checkpointing<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CHECKPOINTING.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(CHECKPOINTING.with(|c| c.replace(true)));
    f()
}
