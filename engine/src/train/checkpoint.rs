//! Checkpoints: the adapter, AdamW's moments and the trainer's state, written so that
//! `--resume` continues on the same loss curve.

use burn::optim::AdaptiveMomentumState;
use burn::tensor::{Tensor, TensorData};

use crate::adapter::{Adapter, safetensors_bytes};
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::io::safetensors::SafetensorsWeights;
use crate::kernels::KernelBackend;
use std::path::Path;

use super::{Optim, TrainerState};

pub(super) fn save_checkpoint<B: KernelBackend>(
    dir: &Path,
    adapter: &Adapter<B>,
    optim: &Optim<B>,
    state: &TrainerState,
    base_model: &str,
) -> Result<()> {
    let names = adapter.named_tensors();
    let mut moments: Vec<(String, Tensor<B, 2>)> = Vec::new();
    let mut times = Vec::new();
    for ((name, _), s) in names.iter().zip(&optim.states) {
        if let Some(s) = s {
            moments.push((format!("{name}.m1"), s.momentum.moment_1.clone()));
            moments.push((format!("{name}.m2"), s.momentum.moment_2.clone()));
            times.push(s.momentum.time);
        }
    }
    let refs: Vec<(String, &Tensor<B, 2>)> = moments.iter().map(|(n, t)| (n.clone(), t)).collect();
    let optim_bytes = safetensors_bytes(&refs)?;
    let st = TrainerState {
        adam_times: times,
        ..state.clone()
    };
    let state_bytes = serde_json::to_vec_pretty(&st).map_err(|e| Error::Json {
        path: dir.join("trainer_state.json"),
        source: e,
    })?;
    adapter.save_peft(
        dir,
        base_model,
        &[
            ("optimizer.safetensors", optim_bytes),
            ("trainer_state.json", state_bytes),
        ],
    )
}

#[allow(
    clippy::type_complexity,
    reason = "the checkpoint's three parts, taken apart by its one caller"
)]
pub(super) fn load_checkpoint<B: KernelBackend>(
    dir: &Path,
    model: &crate::models::config::Config,
    device: &B::Device,
) -> Result<(
    Adapter<B>,
    Vec<Option<burn::optim::AdamWState<B, 2>>>,
    TrainerState,
)> {
    let state_path = dir.join("trainer_state.json");
    if !state_path.exists() {
        return Err(Error::Checkpoint {
            path: state_path,
            what: "nothing to resume: it does not exist".into(),
        });
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: state_path.clone(),
        source,
    })?;
    let adapter = Adapter::<B>::load_peft(dir, model, device)?;
    let optim_path = dir.join("optimizer.safetensors");
    let st = SafetensorsWeights::open_file(&optim_path)?;
    let mut states = Vec::new();
    let mut t = state.adam_times.clone().into_iter();
    for (name, tensor) in adapter.named_tensors() {
        let shape: [usize; 2] = tensor.dims();
        let get = |suffix: &str| -> Result<Option<Tensor<B, 2>>> {
            Ok(st
                .get(&format!("{name}.{suffix}"))?
                .map(|h| Tensor::from_data(TensorData::new(h.into_f32(), shape), device)))
        };
        let s = match (get("m1")?, get("m2")?) {
            (Some(m1), Some(m2)) => Some(burn::optim::AdamWState {
                momentum: AdaptiveMomentumState {
                    time: t.next().ok_or_else(|| Error::Malformed {
                        path: state_path.clone(),
                        what: "fewer optimiser step counts than moments".into(),
                    })?,
                    moment_1: m1,
                    moment_2: m2,
                    max_moment_2: None,
                },
            }),
            _ => None,
        };
        states.push(s);
    }
    Ok((adapter, states, state))
}
