//! LoRA instruction tuning: a frozen (quantised) base on `Autodiff<B>`, one trainable adapter
//! (optionally on top of frozen ones), burn's AdamW on the adapter's tensors, warmup then cosine
//! or linear decay, gradient clipping and accumulation, periodic evaluation, and checkpoints
//! that resume to the same loss curve.
//!
//! Each optimiser step takes `batch` packed rows; each row is its own forward and backward
//! (micro-batch of one row) and the gradients are summed, so memory is that of one row at any
//! batch size. The loss is the mean over the step's response tokens. With several devices
//! (`parallel.rs`), each replica takes a share of the step's rows and the gradients are summed
//! across replicas by an all-reduce.
//!
//! Everything a step does is a function of the step number (the row order of an epoch is a
//! seeded shuffle; dropout is seeded per step), so a checkpoint needs only the adapter, the
//! optimiser's moments and the step.
//!
//! Here: the job, its events and the loop. `config.rs` holds the settings, `data.rs` turns
//! records into rows, `loss.rs` a row's loss, `step.rs` an optimiser step, `parallel.rs` its
//! replicas on several devices, `checkpoint.rs`
//! saving and resuming, `objective.rs` what a task adds to the loss, `meta.rs` the record
//! written beside an adapter.

mod checkpoint;
mod config;
pub mod data;
mod loss;
pub mod meta;
pub mod objective;
mod parallel;
pub mod run;
mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::optim::AdamWConfig;
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, NewTokens};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::kernels::KernelBackend;
use crate::models::llama::Llama;
use checkpoint::{load_checkpoint, save_checkpoint};
pub use config::{Activations, Decay, TrainConfig};
use data::Row;
pub use loss::{evaluate, mean_loss, row_nll};
use meta::{AdapterMeta, RunInfo};
use objective::Objective;
pub use parallel::{FaultCheck, Nodes, Parallel, Replica, share, start_orchestrator};
use parallel::{Outcome, Work};
use step::{Share, apply_step};

/// What a training run reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        train_rows: usize,
        val_rows: usize,
        trainable_params: usize,
        resumed_at: usize,
        /// `f16` or `f32`.
        activations: &'static str,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_second: f64,
        eta_seconds: f64,
        peak_bytes: Option<u64>,
    },
    Eval {
        step: usize,
        val_loss: f64,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub cancelled: bool,
    /// `(step, training loss)` for every step, resumed runs included.
    pub losses: Vec<(usize, f64)>,
    /// `(step, validation loss)`.
    pub val_losses: Vec<(usize, f64)>,
    pub seconds: f64,
    pub tokens: usize,
    pub peak_bytes: Option<u64>,
}

/// The checkpoint's record of where training stands (`trainer_state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    /// Fingerprint of the training rows, so a resume with other data is refused.
    data_hash: String,
    losses: Vec<(usize, f64)>,
    val_losses: Vec<(usize, f64)>,
    tokens: usize,
    /// AdamW's step count per adapter tensor that has moments (filled when saved).
    #[serde(default)]
    adam_times: Vec<usize>,
}

fn data_hash(rows: &[Row]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for r in rows {
        for (t, l) in r.tokens.iter().zip(&r.labels) {
            h.update(t.to_le_bytes());
            h.update(l.map_or(u32::MAX, |l| l).to_le_bytes());
        }
        h.update([0xFF; 4]);
    }
    format!("{:x}", h.finalize())
}

/// Where a run writes: the final adapter in `out`, checkpoints in `out/checkpoint`.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// A training run's inputs.
pub struct TrainJob<'a, B: KernelBackend> {
    pub model: &'a Llama<Autodiff<B>>,
    /// Adapters trained before this one, applied frozen under it ("general → specialised").
    pub frozen: &'a [&'a Adapter<Autodiff<B>>],
    pub train: &'a [Row],
    pub val: &'a [Row],
    pub config: &'a TrainConfig,
    pub out: &'a Path,
    /// Name of the base model, written into the adapter's config.
    pub base_model: &'a str,
    /// What the caller knows of the run (its data, the device), recorded beside the adapter
    /// in `codelsi_adapter.json`.
    pub run: RunInfo,
    pub resume: bool,
    /// The objective of an adapter that adds tokens of its own (a task hands it over: the
    /// regression task's number tokens). `None`: next-token prediction over the base vocabulary.
    pub objective: Option<&'a dyn Objective<Autodiff<B>>>,
    /// Start from this adapter's weights instead of fresh ones: training an adapter further on
    /// new data. Its rank, alpha and targets must be `config.lora`'s; the added tokens' trained
    /// rows replace the objective's starting rows. The optimiser starts afresh.
    pub init: Option<&'a Path>,
}

struct Optim<B: Backend> {
    adamw: burn::optim::AdamW,
    /// Per tensor of the adapter, in `named_tensors` order.
    states: Vec<Option<burn::optim::AdamWState<B, 2>>>,
}

/// AdamW as a run configures it.
fn adamw(c: &TrainConfig) -> burn::optim::AdamW {
    AdamWConfig::new()
        .with_weight_decay(c.weight_decay)
        .with_epsilon(1e-8)
        .build()
}

/// Train. Events go to `on_event` (the CLI shows a progress bar, the app a plot); `cancel`
/// stops after the current row, writing a checkpoint first.
pub fn train<B: KernelBackend>(
    job: TrainJob<'_, B>,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary> {
    train_parallel(job, &Parallel::default(), cancel, on_event)
}

/// [`train`] with the step's rows shared among `parallel`'s replicas, one per device: the same
/// run as on one device with the same `batch`, within float rounding. A replica that fails
/// stops the run with [`Error::ReplicaFailed`], after a checkpoint of the last whole step.
pub fn train_parallel<B: KernelBackend>(
    job: TrainJob<'_, B>,
    par: &Parallel<'_, B>,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary> {
    let c = job.config;
    c.validate()?;
    if job.train.is_empty() {
        return Err(Error::InvalidArgument("no training rows".into()));
    }
    for r in &par.replicas {
        if r.model.config != job.model.config || r.frozen.len() != job.frozen.len() {
            return Err(Error::Setting(format!(
                "replica on {} holds another model or other base adapters than {}",
                r.name, par.first
            )));
        }
    }
    let layout = par.layout();
    let _turn = (layout.total() > 1).then(|| {
        parallel::ONE_RUN_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let device = job.model.device().clone();
    let steps_per_epoch = job.train.len().div_ceil(c.batch);
    let total = (steps_per_epoch * c.epochs).min(c.max_steps.unwrap_or(usize::MAX));
    let hash = data_hash(job.train);
    let ckpt = checkpoint_dir(job.out);

    let mut adapter: Adapter<B>;
    let mut optim = Optim::<B> {
        adamw: adamw(c),
        states: vec![],
    };
    let mut state = TrainerState {
        step: 0,
        config: c.clone(),
        data_hash: hash.clone(),
        losses: vec![],
        val_losses: vec![],
        tokens: 0,
        adam_times: vec![],
    };
    if job.resume {
        let (a, s, st) = load_checkpoint::<B>(&ckpt, &job.model.config, &device)?;
        if st.data_hash != hash {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint was trained on other data (or another max length, template \
                 or packing); resume with the same data and settings"
                    .into(),
            });
        }
        if st.config.lora != c.lora || st.config.seed != c.seed || st.config.batch != c.batch {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint used other LoRA, seed or batch settings".into(),
            });
        }
        if a.new_tokens.is_some() != job.objective.is_some() {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint is of another kind of adapter (regression or not)".into(),
            });
        }
        adapter = a;
        optim.states = s;
        state = st;
        state.config = c.clone();
    } else {
        if ckpt.join("trainer_state.json").exists() {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "holds a checkpoint of an earlier run; pass --resume to continue it, or \
                 choose another --out"
                    .into(),
            });
        }
        adapter = match job.init {
            Some(dir) => start_from(dir, &job, &device)?,
            None => {
                let mut a = Adapter::<B>::init(c.lora.clone(), &job.model.config, c.seed, &device)?;
                if let Some(objective) = job.objective {
                    let (embed, head) = objective.new_token_rows();
                    a.new_tokens = Some(NewTokens::from_host(
                        embed.to_vec(),
                        head.to_vec(),
                        job.model.config.hidden_size,
                        &device,
                    )?);
                }
                a
            }
        };
        optim.states = vec![None; adapter.named_tensors().len()];
    }
    std::fs::create_dir_all(job.out).map_err(|e| Error::io(job.out, e))?;

    let supports_f16 = <Autodiff<B> as KernelBackend>::supports_f16(&device);
    let dtype = match c.activations {
        Activations::F32 => DType::F32,
        Activations::Auto if supports_f16 => DType::F16,
        Activations::Auto => DType::F32,
        Activations::F16 if supports_f16 => DType::F16,
        Activations::F16 => {
            return Err(Error::Setting(
                "f16 activations need a GPU adapter with shader-f16; this one has none \
                 (use f32 or auto)"
                    .into(),
            ));
        }
    };
    on_event(TrainEvent::Started {
        total_steps: total,
        train_rows: job.train.len(),
        val_rows: job.val.len(),
        trainable_params: adapter.num_params(),
        resumed_at: state.step,
        activations: if dtype == DType::F16 { "f16" } else { "f32" },
    });

    // The held-out loss before training (the adapter starts equal to the base: B = 0).
    if state.step == 0 && c.eval_every > 0 {
        eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
    }
    let start = Instant::now();
    let tokens_at_start = state.tokens;
    let resumed_at = state.step;
    let mut peak = B::memory_reserved(&device);
    let total_replicas = layout.total();
    let shapes: Vec<[usize; 2]> = adapter
        .named_tensors()
        .iter()
        .map(|(_, t)| t.dims())
        .collect();
    let cancelled = std::thread::scope(|s| -> Result<bool> {
        // Replicas 1..: a thread each, with a copy of the adapter and the optimiser.
        let (fail_tx, failures) = std::sync::mpsc::channel();
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        if total_replicas > 1 {
            burn_collective::reset_collective::<B>();
            for (i, replica) in par.replicas.iter().enumerate() {
                let (tx, rx) = std::sync::mpsc::channel::<Work>();
                let view = TrainJob {
                    model: replica.model,
                    frozen: replica.frozen,
                    run: RunInfo::default(),
                    ..job
                };
                let (a, o, f) = (adapter.clone(), optim.states.clone(), fail_tx.clone());
                let nodes = par.nodes.as_ref();
                threads.push(s.spawn(move || {
                    parallel::replica_loop(
                        i + 1,
                        layout,
                        nodes,
                        view,
                        a,
                        o,
                        rx,
                        f,
                        cancel,
                        par.fault,
                    )
                }));
                senders.push(tx);
            }
            parallel::register::<B>(0, layout, par.nodes.as_ref(), &device)?;
        }
        let mut cancelled = false;
        let result = (|| -> Result<()> {
            while state.step < total {
                let step = state.step;
                let epoch = step / steps_per_epoch;
                let mut order: Vec<usize> = (0..job.train.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(
                    c.seed ^ ((epoch as u64 + 1) * 0x9E37),
                ));
                let within = step % steps_per_epoch;
                let picked = &order[within * c.batch..((within + 1) * c.batch).min(order.len())];
                let rows: Vec<&Row> = picked.iter().map(|&i| &job.train[i]).collect();
                let targets = rows.iter().map(|r| r.targets()).sum::<usize>().max(1);
                let lr = c.lr_at(step, total);
                let n = rows.len();
                // A replica's thread ends only with a run that stops; one gone now cannot
                // take part in the all-reduce, so no share is handed out.
                if let Some(k) = threads.iter().position(|t| t.is_finished()) {
                    return Err(Error::ReplicaFailed {
                        step,
                        replica: layout.global(k + 1),
                        device: par.name(layout.global(k + 1)),
                        what: "its thread ended".into(),
                        checkpoint: None,
                    });
                }
                for (k, tx) in senders.iter().enumerate() {
                    let part = share(n, layout.global(k + 1), total_replicas);
                    let work = Work {
                        step,
                        rows: picked[part.clone()].to_vec(),
                        first: part.start,
                        targets,
                        lr,
                        dtype,
                    };
                    // A closed channel shows as a failure in the all-reduce below.
                    let _ = tx.send(work);
                }
                let part = share(n, layout.global(0), total_replicas);
                let own_share = Share {
                    step,
                    rows: &rows[part.clone()],
                    first: part.start,
                    targets,
                };
                let own =
                    parallel::run_share(&job, &adapter, &own_share, dtype, cancel, (0, par.fault));
                let own_failed = own.as_ref().err().map(|e| e.to_string());
                let outcome = if total_replicas == 1 {
                    match own {
                        Err(e) => return Err(e),
                        Ok(None) => Outcome::Cancelled,
                        Ok(Some((loss, grads))) => Outcome::Done(loss, grads),
                    }
                } else {
                    parallel::all_reduce_step(0, layout, &own, &shapes, &device)?
                };
                let (loss, grads) = match outcome {
                    Outcome::Done(loss, grads) => (loss, grads),
                    Outcome::Cancelled => {
                        cancelled = true;
                        break;
                    }
                    Outcome::Failed(failed) => {
                        let mut errors: Vec<(usize, String)> = failures.try_iter().collect();
                        if let Some(e) = &own_failed {
                            errors.push((layout.global(0), e.clone()));
                        }
                        errors.sort_by_key(|e| e.0);
                        // A replica of another node fails without a message here.
                        let first = failed.first().copied().unwrap_or_default();
                        let (replica, what) = errors
                            .into_iter()
                            .next()
                            .unwrap_or((first, "a replica of another node failed".into()));
                        // Replica 0's adapter and optimiser are those of the last whole step
                        // unless it is the one that failed.
                        let checkpoint = own_failed.is_none().then(|| ckpt.clone());
                        if own_failed.is_none() {
                            save_checkpoint(&ckpt, &adapter, &optim, &state, job.base_model)?;
                            on_event(TrainEvent::Checkpoint {
                                step,
                                path: ckpt.clone(),
                            });
                        }
                        return Err(Error::ReplicaFailed {
                            step,
                            replica,
                            device: par.name(replica),
                            what,
                            checkpoint,
                        });
                    }
                };
                peak = max_opt(peak, B::memory_reserved(&device));
                let grad_norm = apply_step(&mut adapter, &mut optim, grads, lr, c.max_grad_norm)?;
                let tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
                state.tokens += tokens;
                state.step += 1;
                state.losses.push((step + 1, loss));
                let elapsed = start.elapsed().as_secs_f64();
                let steps_here = (state.step - resumed_at).max(1);
                let rate = (state.tokens - tokens_at_start) as f64 / elapsed.max(1e-9);
                let eta = (total - state.step) as f64 * elapsed / steps_here as f64;
                on_event(TrainEvent::Step {
                    step: state.step,
                    total_steps: total,
                    epoch,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_second: rate,
                    eta_seconds: eta,
                    peak_bytes: peak,
                });
                let last = state.step == total;
                if c.eval_every > 0 && state.step.is_multiple_of(c.eval_every) && !last {
                    eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
                }
                if c.checkpoint_every > 0 && state.step.is_multiple_of(c.checkpoint_every) && !last
                {
                    save_checkpoint(&ckpt, &adapter, &optim, &state, job.base_model)?;
                    on_event(TrainEvent::Checkpoint {
                        step: state.step,
                        path: ckpt.clone(),
                    });
                }
                // With replicas, the next step's all-reduce carries the cancel to every one
                // (another node must not wait for this one at an all-reduce it never enters).
                if cancel.is_cancelled() && total_replicas == 1 {
                    cancelled = true;
                    break;
                }
            }
            Ok(())
        })();
        // Replicas wait for work: without senders they end.
        drop(senders);
        let mut lost = None;
        for (k, t) in threads.into_iter().enumerate() {
            if t.join().is_err() {
                lost.get_or_insert(k + 1);
            }
        }
        if total_replicas > 1 {
            parallel::finish::<B>(0);
        }
        result?;
        match lost {
            Some(k) => Err(Error::ReplicaFailed {
                step: state.step,
                replica: layout.global(k),
                device: par.name(layout.global(k)),
                what: "its thread panicked".into(),
                checkpoint: None,
            }),
            None => Ok(cancelled),
        }
    })?;

    if !cancelled {
        eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
    }
    save_checkpoint(&ckpt, &adapter, &optim, &state, job.base_model)?;
    on_event(TrainEvent::Checkpoint {
        step: state.step,
        path: ckpt.clone(),
    });
    let summary = TrainSummary {
        steps: state.step,
        total_steps: total,
        cancelled,
        losses: state.losses.clone(),
        val_losses: state.val_losses.clone(),
        seconds: start.elapsed().as_secs_f64(),
        tokens: state.tokens,
        peak_bytes: peak,
    };
    if !cancelled {
        let meta = AdapterMeta {
            codelsi: env!("CARGO_PKG_VERSION").into(),
            base_model: job.base_model.into(),
            train: Some(c.clone()),
            steps: state.step,
            final_loss: state.losses.last().map(|l| l.1),
            val_loss: state.val_losses.last().map(|l| l.1),
            losses: state.losses.clone(),
            val_losses: state.val_losses.clone(),
            extra: job.run.clone(),
        };
        let meta = meta.to_json(job.out)?;
        adapter.write_peft_files(job.out, job.base_model, &[(AdapterMeta::FILE, meta)])?;
    }
    Ok(summary)
}

/// The validation loss now (when there is validation data), recorded and reported.
fn eval_and_report<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    adapter: &Adapter<B>,
    state: &mut TrainerState,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<()> {
    if job.val.is_empty() {
        return Ok(());
    }
    if let Some(v) = evaluate(
        job.model,
        job.frozen,
        adapter,
        job.objective,
        job.val,
        cancel,
    )? {
        state.val_losses.push((state.step, v));
        on_event(TrainEvent::Eval {
            step: state.step,
            val_loss: v,
        });
    }
    Ok(())
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The adapter in `dir` as the starting point of `job`, refused when its shape is not the
/// one `job` trains (another rank, alpha or targets, or number tokens where none are wanted).
fn start_from<B: KernelBackend>(
    dir: &Path,
    job: &TrainJob<'_, B>,
    device: &B::Device,
) -> Result<Adapter<B>> {
    let want = &job.config.lora;
    let mut a = Adapter::<B>::load_peft(dir, &job.model.config, device)?;
    let same_targets = {
        let (mut x, mut y) = (a.config.targets.clone(), want.targets.clone());
        x.sort();
        y.sort();
        x == y
    };
    if a.config.rank != want.rank
        || a.config.alpha != want.alpha
        || a.config.rslora != want.rslora
        || !same_targets
    {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            what: format!(
                "the adapter to start from has rank {}, alpha {} on {} projection(s); this run \
                 trains rank {}, alpha {} on {} (pass the same --rank, --alpha and --targets)",
                a.config.rank,
                a.config.alpha,
                a.config.targets.len(),
                want.rank,
                want.alpha,
                want.targets.len()
            ),
        });
    }
    match (&a.new_tokens, job.objective) {
        (None, None) => {}
        (Some(have), Some(objective)) => {
            let rows = objective.new_token_rows().0.len() / job.model.config.hidden_size;
            let have = have.embed.dims()[0];
            if have != rows {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    what: format!("the adapter adds {have} tokens, this run {rows}"),
                });
            }
        }
        _ => {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                what: "the adapter to start from is of another kind (regression or not)".into(),
            });
        }
    }
    a.config.dropout = want.dropout;
    Ok(a)
}
