//! Regression adapters: one language model predicting numbers (latency, peak memory) straight
//! from code text, decoded digit by digit, after "Regression Language Models for Code"
//! (Akhauri et al., 2025) and its regress-lm library.
//!
//! A regression adapter is a LoRA adapter plus [`number::NUM_TOKENS`] new tokens (their
//! embedding and output rows, [`crate::adapter::NewTokens`]). The prompt names the code and the
//! metrics; the answer is one number per metric ([`number`]). Training (`train::train`) sees
//! the new tokens and scores only them: the loss at each answer position is over the number
//! tokens its grammar allows, which is the distribution constrained decoding samples from.
//!
//! One file per part: `data.rs` (examples read and split by group, rows prepared), `spec.rs`
//! (what an adapter predicts, prompts and answers as rows), `loss.rs` (the training objective),
//! `predict.rs` ([`Regressor`]: N answers drawn, each metric's median and spread), `report.rs`
//! (held-out scores beside the baselines), [`stats`] (rank correlations, the baselines),
//! [`number`] (the digit encoding), [`measure`] (datasets built by running programs).

mod data;
mod loss;
pub mod measure;
pub mod number;
mod predict;
mod report;
mod spec;
pub mod stats;

pub use data::{
    Example, RegressionData, metric_names, read_examples, split_by_group, write_examples,
};
pub use loss::{NumberObjective, embed_with_new, init_number_rows, number_nll};
pub use predict::{PredictSettings, Prediction, Regressor, mean_index, softmax_weights};
pub use report::{HeldOutPrediction, HeldOutReport, MetricReport, held_out_report};
pub use spec::RegressionSpec;
