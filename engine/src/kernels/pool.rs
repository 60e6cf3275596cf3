//! The CPU products' workers: threads that stay awake between the products of a step.
//!
//! A decode step makes about 170 products of tens of microseconds each. Through rayon, each one
//! hands its tasks to pool threads that may have gone to sleep since the last, and waits for
//! them. Here the workers spin for a while after each job (as ggml's threads do within a graph),
//! so the step's next product starts at once; they park when the step is over. The calling
//! thread takes tasks too, and never waits for a worker that has not joined the job.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it parks: longer than the gaps between a
/// step's products (norms, attention, RoPE on the calling thread), far shorter than a human
/// notices a busy core.
const SPIN: Duration = Duration::from_micros(500);

type Job = dyn Fn(usize) + Sync;

/// What the caller and the workers share.
struct Shared {
    /// Odd while a job is open, even once its caller has closed it.
    epoch: AtomicUsize,
    /// The open job's closure; written by the caller before it opens the job, read by workers
    /// only between joining (`busy`) and seeing the epoch open, so never after it returns.
    job: UnsafeCell<*const Job>,
    /// The open job's task count, and the next task to take.
    tasks: AtomicUsize,
    next: Padded<AtomicUsize>,
    /// Workers inside a job; the caller waits for 0 after closing it.
    busy: AtomicUsize,
    /// A task of a worker panicked.
    panicked: AtomicBool,
    /// Per worker: it parked (or is about to), and its handle to unpark it.
    sleeping: Vec<AtomicBool>,
    threads: OnceLock<Vec<Thread>>,
    /// Held by the caller of the open job; a second caller (another thread, or a task that
    /// calls in again) runs its tasks on its own thread instead.
    submit: Mutex<()>,
}

/// A value on cache lines of its own: the task counter, which the threads in a job write, away
/// from the epoch, which idle workers read.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: `job` is written only under `submit` while no job is open and no worker is inside one
// (`busy` is 0), and read only by workers inside an open job (the protocol in `for_each` and
// `work`).
unsafe impl Sync for Shared {}

static POOL: OnceLock<&'static Shared> = OnceLock::new();

/// The job the pool holds before its first.
fn idle(_: usize) {}

/// The pool: one worker fewer than rayon's threads (which `device::set_cpu_threads` sized), as
/// the caller works too.
fn pool() -> &'static Shared {
    POOL.get_or_init(|| {
        let workers = rayon::current_num_threads().saturating_sub(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(&idle as &Job),
            tasks: AtomicUsize::new(0),
            next: Padded(AtomicUsize::new(0)),
            busy: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: OnceLock::new(),
            submit: Mutex::new(()),
        }));
        let threads = (0..workers)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("codelsi-cpu-{i}"))
                    .spawn(move || work(shared, i))
                    .map(|h| h.thread().clone())
            })
            .collect::<std::io::Result<Vec<_>>>();
        // Without its workers the pool still runs every job, on the caller alone.
        let _ = shared.threads.set(threads.unwrap_or_default());
        shared
    })
}

/// Runs `task(i)` for every `i < tasks`, on the calling thread and the pool's workers, and
/// returns when all are done. A panic in a task panics here, after every worker has left.
pub fn for_each(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    // A job whose task panicked poisons the lock; the pool itself is sound after it.
    let lock = match pool.submit.try_lock() {
        Ok(lock) => Some(lock),
        Err(TryLockError::Poisoned(lock)) => Some(lock.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    let no_workers = pool.threads.get().is_none_or(Vec::is_empty);
    if tasks <= 1 || no_workers || lock.is_none() {
        (0..tasks).for_each(task);
        return;
    }
    // SAFETY: the lifetime is erased only while the job is open: every worker that read the
    // pointer has left (`busy` back to 0) before this function returns or unwinds.
    let job: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &Job>(task) };
    // SAFETY: no job is open and no worker is inside one (see `Shared`'s Sync).
    unsafe { *pool.job.get() = job };
    pool.tasks.store(tasks, SeqCst);
    pool.next.store(0, SeqCst);
    pool.panicked.store(false, SeqCst);
    let open = pool.epoch.load(SeqCst) + 1;
    pool.epoch.store(open, SeqCst);
    if let Some(threads) = pool.threads.get() {
        for (sleeping, thread) in pool.sleeping.iter().zip(threads) {
            if sleeping.swap(false, SeqCst) {
                thread.unpark();
            }
        }
    }
    let mine = catch_unwind(AssertUnwindSafe(|| take_tasks(pool, task)));
    // Close the job, then wait for the workers inside it.
    pool.epoch.store(open + 1, SeqCst);
    while pool.busy.load(SeqCst) != 0 {
        // A worker still inside may have lost its core to another thread: give it the chance.
        std::thread::yield_now();
    }
    if let Err(panic) = mine {
        std::panic::resume_unwind(panic);
    }
    assert!(
        !pool.panicked.load(SeqCst),
        "a task on a CPU worker panicked"
    );
}

/// [`for_each`] over `out` cut into chunks of `chunk` (the last may be shorter): `task(i, c)`
/// gets chunk `i`.
pub fn for_each_chunk<T: Send>(
    out: &mut [T],
    chunk: usize,
    task: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    assert!(chunk > 0, "chunks of no elements");
    let (len, base) = (out.len(), SendPtr(out.as_mut_ptr()));
    for_each(len.div_ceil(chunk), &|i| {
        let at = i * chunk;
        let n = chunk.min(len - at);
        // SAFETY: `for_each` runs each `i` once, so the chunks handed out are disjoint, inside
        // `out`, and `out` stays borrowed until every task is done.
        let c = unsafe { std::slice::from_raw_parts_mut(base.at(at), n) };
        task(i, c);
    });
}

/// A pointer the tasks share (each derives its own disjoint chunk from it).
struct SendPtr<T>(*mut T);

// SAFETY: only used by `for_each_chunk`, whose tasks touch disjoint elements.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer to element `i` (a method, so that closures capture the wrapper whole).
    fn at(&self, i: usize) -> *mut T {
        // SAFETY: callers stay inside the slice the pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// Takes the open job's tasks until none is left, a run of consecutive tasks at a time: about
/// eight runs a thread, so that the threads still even out, while a product of thousands of
/// tasks (the 0.5B's head: 9,496) does not pass the counter's cache line between the cores
/// for each, and each thread reads its weight rows in long runs.
fn take_tasks(pool: &Shared, task: &(dyn Fn(usize) + Sync + '_)) {
    let tasks = pool.tasks.load(SeqCst);
    let run = (tasks / (8 * (pool.sleeping.len() + 1))).max(1);
    loop {
        let first = pool.next.fetch_add(run, SeqCst);
        if first >= tasks {
            return;
        }
        (first..tasks.min(first + run)).for_each(task);
    }
}

/// A worker: joins each job it sees open, spins for the next for [`SPIN`], then parks.
fn work(pool: &'static Shared, me: usize) {
    let mut seen = 0;
    let mut idle_since = Instant::now();
    loop {
        let epoch = pool.epoch.load(SeqCst);
        if epoch % 2 == 1 && epoch != seen {
            // Join first, then check that the job is still open: a caller that saw `busy` at 0
            // had closed the job before, so this worker then sees it closed and touches nothing.
            pool.busy.fetch_add(1, SeqCst);
            if pool.epoch.load(SeqCst) == epoch {
                // SAFETY: the job is open and this worker is counted in `busy`, so its closure
                // lives until this worker leaves.
                let job = unsafe { &**pool.job.get() };
                if catch_unwind(AssertUnwindSafe(|| take_tasks(pool, job))).is_err() {
                    // Stop the others taking more; the caller panics once all have left.
                    pool.next.store(usize::MAX / 2, SeqCst);
                    pool.panicked.store(true, SeqCst);
                }
            }
            pool.busy.fetch_sub(1, SeqCst);
            seen = epoch;
            idle_since = Instant::now();
        } else if idle_since.elapsed() < SPIN {
            // Yield rather than spin in place: where the cores are all taken (rayon's threads
            // running burn's ops between products, another process), a waiting worker gives
            // way instead of holding a core; a job still finds it within a microsecond.
            std::thread::yield_now();
        } else {
            // Say so before parking, and look once more: a caller that opens a job after this
            // store unparks this worker; one that opened before it is seen here.
            pool.sleeping[me].store(true, SeqCst);
            let epoch = pool.epoch.load(SeqCst);
            if epoch % 2 == 1 && epoch != seen {
                pool.sleeping[me].store(false, SeqCst);
            } else {
                std::thread::park();
            }
            idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        for tasks in [0, 1, 2, 7, 64, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each(tasks, &|i| {
                    counts[i].fetch_add(1, SeqCst);
                });
            }
            assert!(counts.iter().all(|c| c.load(SeqCst) == 50), "tasks {tasks}");
        }
    }

    #[test]
    fn jobs_after_the_workers_parked_and_from_other_threads_and_tasks() {
        std::thread::sleep(SPIN * 4);
        let sum = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..20 {
                        // A task that calls in again runs its inner job on its own thread.
                        for_each(8, &|i| for_each(4, &|j| _ = sum.fetch_add(i * j, SeqCst)));
                    }
                });
            }
        });
        // Σi Σj i·j = 28 · 6 per job.
        assert_eq!(sum.load(SeqCst), 3 * 20 * 28 * 6);
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let mut out = vec![0usize; 1003];
        for_each_chunk(&mut out, 16, &|i, c| {
            for (j, v) in c.iter_mut().enumerate() {
                *v += 16 * i + j + 1;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i + 1));
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_goes_on() {
        let r = catch_unwind(|| for_each(16, &|i| assert!(i != 11, "task 11")));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        for_each(16, &|_| _ = n.fetch_add(1, SeqCst));
        assert_eq!(n.load(SeqCst), 16);
    }
}
