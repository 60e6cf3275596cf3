//! A training run's settings: the optimiser's, the schedule's, LoRA's, and how activations are
//! kept.

use serde::{Deserialize, Serialize};

use crate::adapter::LoraConfig;
use crate::error::{Error, Result};

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

impl Decay {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "constant" => Ok(Self::Constant),
            _ => Err(Error::Setting(format!(
                "unknown schedule `{s}` (cosine, linear, constant)"
            ))),
        }
    }
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimiser steps (before the epochs are done).
    pub max_steps: Option<usize>,
    /// Packed rows per optimiser step.
    pub batch: usize,
    /// Linear warmup, as a fraction of the steps.
    pub warmup_frac: f64,
    pub decay: Decay,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    pub seed: u64,
    /// Evaluate on the validation rows every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only on cancel and at the end).
    pub checkpoint_every: usize,
    /// Gradient checkpointing per decoder layer: keep only each layer's input during the
    /// forward and recompute the layer during the backward. Same gradients, a third more
    /// compute, activation memory of one layer instead of all of them.
    #[serde(default)]
    pub grad_checkpoint: bool,
    /// The activations' type during training.
    #[serde(default)]
    pub activations: Activations,
}

/// The type activations are kept in while training. Adapter weights, their gradients, the
/// optimiser, norms' statistics and the loss are f32 whatever this says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f16 where the device supports it (wgpu: `shader-f16`), f32 otherwise.
    #[default]
    Auto,
    F32,
    F16,
}

impl Activations {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => Err(Error::Setting(format!(
                "activations `{s}` is not one of auto, f16, f32"
            ))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            lr: 2e-4,
            epochs: 3,
            max_steps: None,
            batch: 4,
            warmup_frac: 0.03,
            decay: Decay::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            checkpoint_every: 50,
            grad_checkpoint: false,
            activations: Activations::Auto,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Setting(format!(
                "learning rate must be positive, not {}",
                self.lr
            )));
        }
        if self.epochs == 0 || self.batch == 0 || self.max_steps == Some(0) {
            return Err(Error::Setting(
                "epochs, batch and max-steps must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_frac) {
            return Err(Error::Setting(format!(
                "warmup must be a fraction in [0, 1), not {}",
                self.warmup_frac
            )));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_frac * total as f64).ceil() as usize;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = (total - warmup).max(1) as f64;
        let t = ((step - warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            Decay::Linear => self.lr * (1.0 - t),
            Decay::Constant => self.lr,
        }
    }
}
