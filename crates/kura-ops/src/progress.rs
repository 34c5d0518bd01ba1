//! Progress reporting hooks; the binary draws bars, tests and `--quiet` use [`NoProgress`].

/// Receives progress of a long operation. Called from worker threads.
pub trait Progress: Sync {
    /// More work was found: files and bytes to process (called as the walk goes on).
    fn add_total(&self, _files: u64, _bytes: u64) {}
    /// Some work was done.
    fn advance(&self, _files: u64, _bytes: u64) {}
    /// A non-fatal problem (unreadable file); the operation goes on.
    fn warn(&self, _msg: &str) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}
