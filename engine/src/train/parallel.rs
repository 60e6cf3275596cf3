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
//!
//! Several machines ([`Nodes`]): every node runs the same command on the same data with the
//! same number of replicas; node n's replica k is replica `n·local + k` of the run, and the
//! all-reduce goes on across nodes through burn-collective's global mode (an orchestrator that
//! node 0 starts, tensors exchanged peer to peer over WebSocket). Every node keeps the same
//! adapter and writes its own checkpoints.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender};

use burn::tensor::{DType, ElementConversion, Tensor, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use super::data::Row;
use super::step::{Share, ShareResult, apply_step, train_step};
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

/// This process as one node of a run over several machines.
#[derive(Debug, Clone, PartialEq)]
pub struct Nodes {
    /// This node's rank, `0..count`.
    pub rank: usize,
    pub count: usize,
    /// The orchestrator's address, `ws://host:port` (node 0 starts it: [`start_orchestrator`]).
    pub orchestrator: String,
    /// Where this node serves its tensors to the others, `ws://host:port`, and that port.
    pub address: String,
    pub data_port: u16,
}

/// How a run is spread over devices: by default, not at all.
pub struct Parallel<'a, B: KernelBackend> {
    /// Replicas 1.. of this process (replica 0 is the job's model and frozen adapters).
    pub replicas: Vec<Replica<'a, B>>,
    /// The device of replica 0, in words.
    pub first: String,
    pub fault: Option<&'a FaultCheck>,
    /// Other processes (machines) in the run; `None`: this process alone.
    pub nodes: Option<Nodes>,
}

impl<B: KernelBackend> Default for Parallel<'_, B> {
    fn default() -> Self {
        Self {
            replicas: Vec::new(),
            first: "device 0".into(),
            fault: None,
            nodes: None,
        }
    }
}

impl<B: KernelBackend> Parallel<'_, B> {
    /// Replicas in this process, replica 0 included.
    pub fn count(&self) -> usize {
        1 + self.replicas.len()
    }

    pub(super) fn layout(&self) -> Layout {
        Layout {
            local: self.count(),
            rank: self.nodes.as_ref().map_or(0, |n| n.rank),
            nodes: self.nodes.as_ref().map_or(1, |n| n.count),
        }
    }

    /// Replica `global` of the run, in words.
    pub(super) fn name(&self, global: usize) -> String {
        let layout = self.layout();
        match global.checked_sub(layout.global(0)) {
            Some(0) => self.first.clone(),
            Some(k) if k < layout.local => self.replicas[k - 1].name.clone(),
            _ => format!(
                "on node {}, whose output says why",
                global / layout.local.max(1)
            ),
        }
    }
}

/// Where the replicas of a run are: `local` in each of `nodes` processes, this one `rank`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub local: usize,
    pub rank: usize,
    pub nodes: usize,
}

impl Layout {
    /// The run's index of this process's replica `k`.
    pub fn global(&self, k: usize) -> usize {
        self.rank * self.local + k
    }

    /// Replicas in the run.
    pub fn total(&self) -> usize {
        self.local * self.nodes
    }
}

/// Start burn-collective's orchestrator of a run over several machines on `port`, on a thread
/// of its own for the life of the process (node 0 does, before it trains).
pub fn start_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("the orchestrator's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("collective-orchestrator".into())
        .spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)))
        .map_err(|e| Error::Internal(format!("the orchestrator's thread: {e}")))?;
    Ok(())
}

/// burn-collective keeps one local server per backend type in a process: data-parallel runs of
/// one process take turns.
pub(super) static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The rows of a step's `n` that replica `k` of `replicas` trains on: contiguous, the first
/// replicas taking one fewer when `n` does not divide.
pub fn share(n: usize, k: usize, replicas: usize) -> Range<usize> {
    k * n / replicas..(k + 1) * n / replicas
}

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
        let msg = crate::device::panic_message(panic.as_ref());
        Err(Error::Internal(format!("panicked: {msg}")))
    })
}

/// What the replicas agreed a step came to.
pub(super) enum Outcome<B: KernelBackend> {
    /// The step's loss and its gradients summed over every replica.
    Done(f64, Vec<Tensor<B, 2>>),
    Cancelled,
    /// The run's indices of the replicas that failed.
    Failed(Vec<usize>),
}

/// Register this process's replica `peer` with burn-collective (every replica calls it; it
/// returns when all have, on every node).
pub(super) fn register<B: KernelBackend>(
    peer: usize,
    layout: Layout,
    nodes: Option<&Nodes>,
    device: &B::Device,
) -> Result<()> {
    let mut config = CollectiveConfig::default().with_num_devices(layout.local);
    if let Some(n) = nodes {
        let address = |a: &str| {
            a.parse()
                .map_err(|e| Error::Setting(format!("node address `{a}`: {e}")))
        };
        config = config
            .with_num_nodes(n.count as u32)
            .with_global_address(address(&n.orchestrator)?)
            .with_node_address(address(&n.address)?)
            .with_data_service_port(n.data_port);
    }
    burn_collective::register::<B>(PeerId::from(peer), device.clone(), config)
        .map_err(|e| Error::Internal(format!("registering replica {peer}: {e:?}")))
}

/// Leave the collective (each replica, once, at its end).
pub(super) fn finish<B: KernelBackend>(peer: usize) {
    // Nothing to do about an error here: the run is over.
    let _ = burn_collective::finish_collective::<B>(PeerId::from(peer));
}

/// Sum `own` (this process's replica `peer`) with every other replica's share: one all-reduce
/// of the gradients flattened, the loss, a cancelled flag and a failed flag per replica of the
/// run. `shapes` are the adapter's tensors'.
pub(super) fn all_reduce_step<B: KernelBackend>(
    peer: usize,
    layout: Layout,
    own: &ShareResult<B>,
    shapes: &[[usize; 2]],
    device: &B::Device,
) -> Result<Outcome<B>> {
    let len: usize = shapes.iter().map(|[r, c]| r * c).sum();
    // [loss, cancelled, failed of replica 0, 1, ...]
    let mut tail = vec![0.0f32; 2 + layout.total()];
    let grads = match own {
        Ok(Some((loss, grads))) => {
            tail[0] = *loss as f32;
            let flat: Vec<Tensor<B, 1>> = grads.iter().map(|g| g.clone().flatten(0, 1)).collect();
            Tensor::cat(flat, 0)
        }
        Ok(None) => {
            tail[1] = 1.0;
            Tensor::zeros([len], device)
        }
        Err(_) => {
            tail[2 + layout.global(peer)] = 1.0;
            Tensor::zeros([len], device)
        }
    };
    let n_tail = tail.len();
    let tail = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(tail, [n_tail]), device);
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
        .slice(len..len + n_tail)
        .into_data()
        .to_vec()
        .map_err(|e| Error::Internal(format!("reading the all-reduce: {e:?}")))?;
    let failed: Vec<usize> = (0..layout.total()).filter(|&g| tail[2 + g] > 0.0).collect();
    if !failed.is_empty() {
        return Ok(Outcome::Failed(failed));
    }
    if tail[1] > 0.0 {
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
    layout: Layout,
    nodes: Option<&Nodes>,
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
    if let Err(e) = register::<B>(peer, layout, nodes, &device) {
        let _ = failures.send((layout.global(peer), e.to_string()));
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
            let _ = failures.send((layout.global(peer), e.to_string()));
        }
        match all_reduce_step(peer, layout, &own, &shapes, &device) {
            Ok(Outcome::Done(_, grads)) => {
                let max_norm = job.config.max_grad_norm;
                if apply_step(&mut adapter, &mut optim, grads, w.lr, max_norm).is_err() {
                    // Replica 0 has the same gradients and reports the divergence.
                    break;
                }
            }
            Ok(Outcome::Cancelled | Outcome::Failed(_)) => break,
            Err(e) => {
                let _ = failures.send((layout.global(peer), e.to_string()));
                break;
            }
        }
    }
    finish::<B>(peer);
}
