//! Data-parallel training: one replica per device, each on its share of a step's rows, the
//! adapter's gradients summed by burn-collective's all-reduce before every optimiser step.
//!
//! Replica 0 is the caller's thread and runs the loop in `mod.rs` (events, evaluation,
//! checkpoints); replicas 1.. are threads that take their share of each step from it over a
//! channel, and keep their own copy of the adapter and the optimiser. Every replica
//! all-reduces one vector a step: its gradients, its part of the loss, and two flags, failed
//! and cancelled. A replica whose share failed (an error or a panic) sends zeros with the flag
//! raised, so every all-reduce completes and every replica sees the failure in the same step:
//! the run stops with an error instead of waiting on a replica that will never call. With the
//! same summed gradients, each replica's AdamW makes the same adapter.
//!
//! A row's dropout seed is its index in the step, not in the share, so the run is the
//! one-device run with the same global batch, up to the order the gradients are summed in.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender};

use burn::tensor::{DType, ElementConversion, Tensor, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use super::data::Row;
use super::step::{Share, apply_step, train_step};
use super::{Optim, TrainJob, adamw};
use crate::adapter::Adapter;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::kernels::KernelBackend;
use crate::models::llama::Llama;

/// A replica beyond the job's own model: the same model loaded on another device (or the same
/// one, for logical replicas), with the frozen adapters there.
pub struct Replica<'a, B: KernelBackend> {
    pub model: &'a Llama<burn::backend::Autodiff<B>>,
    pub frozen: &'a [&'a Adapter<burn::backend::Autodiff<B>>],
    /// The device, in words (`cuda:1`), for errors.
    pub name: String,
}

/// A check run on each replica before its share of each step, `(replica, step)`: an error or a
/// panic in it is that replica failing. Tests inject failures with it.
pub type FaultCheck = dyn Fn(usize, usize) -> Result<()> + Sync;

/// How a run is spread over devices: by default, not at all.
pub struct Parallel<'a, B: KernelBackend> {
    /// Replicas 1.. (replica 0 is the job's model and frozen adapters).
    pub replicas: Vec<Replica<'a, B>>,
    /// The device of replica 0, in words.
    pub first: String,
    pub fault: Option<&'a FaultCheck>,
}

impl<B: KernelBackend> Default for Parallel<'_, B> {
    fn default() -> Self {
        Self {
            replicas: Vec::new(),
            first: "device 0".into(),
            fault: None,
        }
    }
}

impl<B: KernelBackend> Parallel<'_, B> {
    /// Replicas in all, replica 0 included.
    pub fn count(&self) -> usize {
        1 + self.replicas.len()
    }

    pub(super) fn name(&self, replica: usize) -> &str {
        match replica {
            0 => &self.first,
            k => &self.replicas[k - 1].name,
        }
    }
}

/// burn-collective keeps one local server per backend type in a process: data-parallel runs of
/// one process take turns.
pub(super) static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The rows of a step's `n` that replica `k` of `replicas` trains on: contiguous, the first
/// replicas taking one fewer when `n` does not divide.
pub fn share(n: usize, k: usize, replicas: usize) -> Range<usize> {
    k * n / replicas..(k + 1) * n / replicas
}

/// What a replica hands the all-reduce for one step.
pub(super) type ShareResult<B> = Result<Option<(f64, Vec<Tensor<B, 2>>)>>;

/// A share's passes, a fault check first; a panic becomes an error.
pub(super) fn run_share<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    adapter: &Adapter<B>,
    share: &Share<'_>,
    dtype: DType,
    cancel: &CancelToken,
    fault: (usize, Option<&FaultCheck>),
) -> ShareResult<B> {
    let (replica, check) = fault;
    catch_unwind(AssertUnwindSafe(|| {
        if let Some(check) = check {
            check(replica, share.step)?;
        }
        train_step(job, adapter, share, dtype, cancel)
    }))
    .unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        Err(Error::Internal(format!("panicked: {msg}")))
    })
}

/// What the replicas agreed a step came to.
pub(super) enum Outcome<B: KernelBackend> {
    /// The step's loss and its gradients summed over every replica.
    Done(f64, Vec<Tensor<B, 2>>),
    Cancelled,
    Failed,
}

/// Register replica `peer` of `replicas` with burn-collective (every replica calls it; it
/// returns when all have).
pub(super) fn register<B: KernelBackend>(
    peer: usize,
    replicas: usize,
    device: &B::Device,
) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(replicas);
    burn_collective::register::<B>(PeerId::from(peer), device.clone(), config)
        .map_err(|e| Error::Internal(format!("registering replica {peer}: {e:?}")))
}

/// Leave the collective (each replica, once, at its end).
pub(super) fn finish<B: KernelBackend>(peer: usize) {
    // Nothing to do about an error here: the run is over.
    let _ = burn_collective::finish_collective::<B>(PeerId::from(peer));
}

/// Sum `own` with every other replica's share: one all-reduce of the gradients flattened, the
/// loss, and the failed and cancelled flags. `shapes` are the adapter's tensors'.
pub(super) fn all_reduce_step<B: KernelBackend>(
    peer: usize,
    own: &ShareResult<B>,
    shapes: &[[usize; 2]],
    device: &B::Device,
) -> Result<Outcome<B>> {
    let len: usize = shapes.iter().map(|[r, c]| r * c).sum();
    let (grads, tail) = match own {
        Ok(Some((loss, grads))) => {
            let flat: Vec<Tensor<B, 1>> = grads.iter().map(|g| g.clone().flatten(0, 1)).collect();
            (Tensor::cat(flat, 0), [*loss as f32, 0.0, 0.0])
        }
        Ok(None) => (Tensor::zeros([len], device), [0.0, 0.0, 1.0]),
        Err(_) => (Tensor::zeros([len], device), [0.0, 1.0, 0.0]),
    };
    let tail = Tensor::<B, 1>::from_floats(tail, device);
    let all = Tensor::cat(vec![grads, tail], 0);
    let summed = burn_collective::all_reduce::<B>(
        PeerId::from(peer),
        all.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| Error::Internal(format!("all-reduce of replica {peer}: {e:?}")))?;
    let summed = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed));
    let tail: Vec<f32> = summed
        .clone()
        .slice(len..len + 3)
        .into_data()
        .to_vec()
        .map_err(|e| Error::Internal(format!("reading the all-reduce: {e:?}")))?;
    if tail[1] > 0.0 {
        return Ok(Outcome::Failed);
    }
    if tail[2] > 0.0 {
        return Ok(Outcome::Cancelled);
    }
    let mut at = 0;
    let grads = shapes
        .iter()
        .map(|&[r, c]| {
            let g = summed.clone().slice(at..at + r * c).reshape([r, c]);
            at += r * c;
            g
        })
        .collect();
    Ok(Outcome::Done(tail[0].elem::<f64>(), grads))
}

/// A share of one step, from replica 0 to another.
pub(super) struct Work {
    pub step: usize,
    /// Indices into the job's training rows.
    pub rows: Vec<usize>,
    pub first: usize,
    pub targets: usize,
    pub lr: f64,
    pub dtype: DType,
}

/// A replica's thread: the adapter and optimiser of replica 0 copied to its device, then one
/// share a step until replica 0 stops sending, a step fails or is cancelled. Its errors go to
/// `failures` before it enters the all-reduce, so replica 0 has them when the flag arrives.
#[allow(
    clippy::too_many_arguments,
    reason = "a thread's whole state, handed over once at its start"
)]
pub(super) fn replica_loop<B: KernelBackend>(
    peer: usize,
    replicas: usize,
    job: TrainJob<'_, B>,
    adapter: Adapter<B>,
    optim: Vec<Option<burn::optim::AdamWState<B, 2>>>,
    work: Receiver<Work>,
    failures: Sender<(usize, String)>,
    cancel: &CancelToken,
    fault: Option<&FaultCheck>,
) {
    let device = job.model.device().clone();
    let mut adapter = adapter.map(|t| t.clone().to_device(&device));
    let mut optim = Optim::<B> {
        adamw: adamw(job.config),
        states: optim
            .into_iter()
            .map(|s| {
                s.map(|s| burn::optim::AdamWState {
                    momentum: s.momentum.to_device(&device),
                })
            })
            .collect(),
    };
    let shapes: Vec<[usize; 2]> = adapter
        .named_tensors()
        .iter()
        .map(|(_, t)| t.dims())
        .collect();
    if let Err(e) = register::<B>(peer, replicas, &device) {
        let _ = failures.send((peer, e.to_string()));
        return;
    }
    while let Ok(w) = work.recv() {
        let rows: Vec<&Row> = w.rows.iter().map(|&i| &job.train[i]).collect();
        let share = Share {
            step: w.step,
            rows: &rows,
            first: w.first,
            targets: w.targets,
        };
        let own = run_share(&job, &adapter, &share, w.dtype, cancel, (peer, fault));
        if let Err(e) = &own {
            let _ = failures.send((peer, e.to_string()));
        }
        match all_reduce_step(peer, &own, &shapes, &device) {
            Ok(Outcome::Done(_, grads)) => {
                let max_norm = job.config.max_grad_norm;
                if apply_step(&mut adapter, &mut optim, grads, w.lr, max_norm).is_err() {
                    // Replica 0 has the same gradients and reports the divergence.
                    break;
                }
            }
            Ok(Outcome::Cancelled | Outcome::Failed) => break,
            Err(e) => {
                let _ = failures.send((peer, e.to_string()));
                break;
            }
        }
    }
    finish::<B>(peer);
}
