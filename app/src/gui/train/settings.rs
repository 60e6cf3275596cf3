//! What a training run from the app uses: presets in plain words, and the settings they stand
//! for (the advanced section edits them), turned into the engine's `TrainConfig`.

use codelsi_engine::adapter::{LoraConfig, Target};
use codelsi_engine::train::{Activations, Decay, TrainConfig};

/// How much training, in words a non-specialist can choose by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Preset {
    Quick,
    Balanced,
    Thorough,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Quick, Preset::Balanced, Preset::Thorough];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Quick => "Quick",
            Preset::Balanced => "Balanced",
            Preset::Thorough => "Thorough",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Preset::Quick => {
                "One pass over the data with a small adapter on the attention layers only. \
                 Shows within minutes whether the data helps; learns the least."
            }
            Preset::Balanced => {
                "Two passes with the adapter size of the CodeLSI paper (rank 16) on every layer. \
                 A good default."
            }
            Preset::Thorough => {
                "Three passes at a gentler learning rate, checking the validation loss as it \
                 goes. Takes the longest; best when the data set is small."
            }
        }
    }

    /// The settings this preset stands for.
    pub fn settings(self) -> RunSettings {
        let base = RunSettings::default();
        match self {
            Preset::Quick => RunSettings {
                rank: 8,
                alpha: 16.0,
                targets: "attn".into(),
                epochs: 1,
                max_len: 512,
                lr: 3e-4,
                ..base
            },
            Preset::Balanced => base,
            Preset::Thorough => RunSettings {
                epochs: 3,
                lr: 1e-4,
                eval_every: 50,
                ..base
            },
        }
    }
}

/// What one training run uses; a preset fills it, the advanced section edits it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSettings {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// all, attn, mlp, or names among q,k,v,o,gate,up,down.
    pub targets: String,
    pub lr: f64,
    pub epochs: usize,
    /// Tokens per packed row.
    pub max_len: usize,
    /// Rows per optimiser step.
    pub batch: usize,
    /// Validation loss every N steps (0: at the end only).
    pub eval_every: usize,
    /// Recompute activations in the backward: same result, less memory, about a third slower.
    pub grad_checkpoint: bool,
    pub seed: u64,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: "all".into(),
            lr: 2e-4,
            epochs: 2,
            max_len: 1024,
            batch: 4,
            eval_every: 0,
            grad_checkpoint: false,
            seed: 42,
        }
    }
}

impl RunSettings {
    pub fn config(&self) -> codelsi_engine::Result<TrainConfig> {
        let c = TrainConfig {
            lora: LoraConfig {
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                targets: Target::parse_list(&self.targets)?,
                rslora: false,
            },
            lr: self.lr,
            epochs: self.epochs,
            max_steps: None,
            batch: self.batch,
            warmup_frac: 0.03,
            decay: Decay::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: self.seed,
            eval_every: self.eval_every,
            checkpoint_every: 50,
            grad_checkpoint: self.grad_checkpoint,
            activations: Activations::Auto,
        };
        c.validate()?;
        Ok(c)
    }
}
