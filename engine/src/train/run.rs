//! An instruction-tuning run assembled from what a user chose: the rows prepared from the data,
//! the adapters it trains on top of, and what is recorded beside the adapter. The one path the
//! CLI's `codelsi train` and the app's Train panel share.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::Tensor;

use super::data::{self, DataSpec, Prepared, PromptTemplate};
use super::meta::RunInfo;
use crate::adapter::Adapter;
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::config::Config;

/// Without validation data, this share of the training records is held out.
pub const DEFAULT_VAL_FRAC: f64 = 0.05;

/// An instruction-tuning run as a user describes it.
#[derive(Debug, Clone)]
pub struct InstructRun {
    /// A JSONL file, or a dataset folder `codelsi import` wrote.
    pub data: PathBuf,
    /// Validation data; without it, `val_frac` of the training records (or the dataset
    /// folder's `val.jsonl`).
    pub val: Option<PathBuf>,
    pub val_frac: f64,
    /// `None`: the tokenizer's own chat template.
    pub template: Option<PromptTemplate>,
    pub max_len: usize,
    /// Pack short examples together (else one example per row).
    pub pack: bool,
    /// Adapters trained before this one, applied frozen under it ("general → specialised").
    pub base_adapters: Vec<PathBuf>,
    /// Start from this adapter's weights (recorded; the trainer loads it).
    pub init_adapter: Option<PathBuf>,
    pub seed: u64,
    /// The device, in words, for the record.
    pub device: String,
    /// Started from the desktop app.
    pub app: bool,
}

/// A run ready for a [`TrainJob`](super::TrainJob): it borrows the rows, the frozen adapters
/// ([`frozen_refs`](Self::frozen_refs)) and a copy of `run`.
#[derive(Debug)]
pub struct Assembled<B: KernelBackend> {
    pub data: Prepared,
    pub template: PromptTemplate,
    pub frozen: Vec<Adapter<Autodiff<B>>>,
    pub run: RunInfo,
}

impl<B: KernelBackend> Assembled<B> {
    pub fn frozen_refs(&self) -> Vec<&Adapter<Autodiff<B>>> {
        self.frozen.iter().collect()
    }
}

/// The adapters in `dirs` for a model of `config`'s shape on `device`, as untracked leaves on
/// `Autodiff<B>`: a run's frozen base adapters (each data-parallel replica loads its own).
pub fn load_frozen<B: KernelBackend>(
    dirs: &[PathBuf],
    config: &Config,
    device: &B::Device,
) -> Result<Vec<Adapter<Autodiff<B>>>> {
    dirs.iter()
        .map(|dir| {
            // The error names the adapter's files.
            let adapter = Adapter::<B>::load_peft(dir, config, device)?;
            Ok(adapter.map(|t| Tensor::<Autodiff<B>, 2>::from_inner(t.clone())))
        })
        .collect()
}

impl InstructRun {
    /// Prepare the rows and load the base adapters for a model of `config`'s shape on `device`
    /// (the frozen adapters are untracked leaves on `Autodiff<B>`).
    pub fn assemble<B: KernelBackend>(
        &self,
        config: &Config,
        device: &B::Device,
        tokenizer: &Tokenizer,
    ) -> Result<Assembled<B>> {
        let template = self
            .template
            .unwrap_or_else(|| PromptTemplate::for_tokenizer(tokenizer));
        let data = data::prepare(
            &DataSpec {
                data: &self.data,
                val: self.val.as_deref(),
                val_frac: self.val_frac,
                seed: self.seed,
                template,
                max_len: self.max_len,
                pack: self.pack,
            },
            tokenizer,
        )?;
        let frozen = load_frozen::<B>(&self.base_adapters, config, device)?;
        let run = RunInfo {
            data: Some(self.data.clone()),
            val: self.val.clone(),
            template: Some(format!("{template:?}")),
            max_len: Some(self.max_len),
            base_adapters: self.base_adapters.clone(),
            init_adapter: self.init_adapter.clone(),
            device: Some(self.device.clone()),
            app: self.app,
            ..RunInfo::default()
        };
        Ok(Assembled {
            data,
            template,
            frozen,
            run,
        })
    }
}
