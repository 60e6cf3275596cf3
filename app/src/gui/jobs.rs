//! Background work for the app: a thread per job, messages back over a channel, a repaint
//! request with each message (so progress shows at once), a cancel token, and a panic in the job
//! turned into a message instead of a dead thread.

use std::sync::mpsc::{Receiver, Sender, channel};

use codelsi_engine::cancel::CancelToken;
use eframe::egui;

/// What a job sends to the UI thread.
pub struct Tx<M> {
    tx: Sender<M>,
    ctx: egui::Context,
}

impl<M> Tx<M> {
    /// Send a message; false once the UI has dropped the job (the job should stop).
    pub fn send(&self, m: M) -> bool {
        let ok = self.tx.send(m).is_ok();
        self.ctx.request_repaint();
        ok
    }
}

/// A job running on its own thread. Dropping it cancels the job.
pub struct Job<M> {
    rx: Receiver<M>,
    pub cancel: CancelToken,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<M: Send + 'static> Job<M> {
    /// Run `work` on a new thread. A panic inside becomes `on_panic(message)`.
    pub fn spawn(
        ctx: &egui::Context,
        on_panic: fn(String) -> M,
        work: impl FnOnce(&Tx<M>, &CancelToken) + Send + 'static,
    ) -> Self {
        let (tx, rx) = channel();
        let cancel = CancelToken::new();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tx = Tx {
            tx,
            ctx: ctx.clone(),
        };
        let (c, d) = (cancel.clone(), done.clone());
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&tx, &c)));
            if let Err(panic) = result {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".into());
                tx.send(on_panic(format!("internal error: {msg}")));
            }
            d.store(true, std::sync::atomic::Ordering::Release);
            tx.ctx.request_repaint();
        });
        Self { rx, cancel, done }
    }

    /// The messages that arrived since the last call.
    pub fn poll(&self) -> Vec<M> {
        self.rx.try_iter().collect()
    }

    /// Whether the thread has ended (its last messages may still wait in [`poll`](Self::poll)).
    pub fn finished(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl<M> Drop for Job<M> {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Hand every message the job in `slot` has sent to `on_msg`, and empty the slot once the job
/// has ended (after its last messages). Returns whether it ended.
pub fn drain<M: Send + 'static>(slot: &mut Option<Job<M>>, mut on_msg: impl FnMut(M)) -> bool {
    let Some(job) = slot else { return false };
    let finished = job.finished();
    for m in job.poll() {
        on_msg(m);
    }
    if finished {
        *slot = None;
    }
    finished
}
