//! Cancelling long work: one flag shared between the thread that asks and the work that checks it
//! at its step boundaries (generation steps, training rows, files imported, programs run).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared flag that stops long work at the next step. Clone it into another thread to cancel.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
