//! A small ordered parallel map over scoped threads, with per-worker state, progress on the
//! calling thread and cancel: what the import and the evaluation harness share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::cancel::CancelToken;
use crate::error::{Error, Result};

/// `n` when it is set, else one per core.
pub fn threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Map `f` over `items` on `threads` workers, in order, each worker with its own state from
/// `init`; `progress(done)` runs on the calling thread. Stops early, with
/// `Error::Cancelled`, when `cancel` is set.
pub fn par_map<T: Sync, S, R: Send>(
    items: &[T],
    threads: usize,
    cancel: &CancelToken,
    init: &(dyn Fn() -> S + Sync),
    f: &(dyn Fn(&mut S, &T) -> R + Sync),
    progress: &mut dyn FnMut(usize, &R),
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, R)>();
        for _ in 0..threads.min(items.len()).max(1) {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || {
                let mut state = init();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items.len() || cancel.is_cancelled() {
                        break;
                    }
                    if tx.send((i, f(&mut state, &items[i]))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut done = 0;
        for (i, r) in rx {
            done += 1;
            progress(done, &r);
            out[i] = Some(r);
        }
    });
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(out.into_iter().flatten().collect())
}
