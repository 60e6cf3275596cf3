//! `codelsi merge`: fold adapters into the base and write a model other tools load.

use std::path::PathBuf;

use anyhow::{Result, bail};
use codelsi_engine::merge::{MergeFormat, merge};
use codelsi_engine::model::resolve_model;
use codelsi_engine::quant::{GgmlType, QFormat};

use super::Format;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model the adapters were trained on: a GGUF file, an HF directory, or `default`.
    #[arg(long, default_value = "default")]
    model: String,
    /// A LoRA adapter directory (PEFT format); repeat to merge several (their changes add up).
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Where to write: a `.gguf` file or an HF directory. Never overwritten.
    #[arg(long)]
    out: PathBuf,
    /// `hf`: safetensors, every tensor f16 (exact up to f16 rounding). `gguf`: the base's
    /// metadata and quantisation, merged weights re-quantised (smaller, loses part of the
    /// change; the report says how much). Default: from the `--out` extension.
    #[arg(long = "to")]
    to: Option<String>,
    /// GGUF only: the type of the merged weights (q8_0, f16, f32, q4_1, q4_0) instead of the
    /// base's; other tensors keep theirs.
    #[arg(long)]
    gguf_type: Option<String>,
    /// `json` prints the report as one JSON object.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub fn cmd_merge(args: MergeArgs) -> Result<()> {
    let json = args.format == Format::Json;
    let mut format = match &args.to {
        Some(s) => MergeFormat::parse(s)?,
        None => MergeFormat::for_output(&args.out),
    };
    if let Some(t) = &args.gguf_type {
        let ty = match t.to_ascii_lowercase().as_str() {
            "f16" => GgmlType::F16,
            "bf16" => GgmlType::Bf16,
            "f32" => GgmlType::F32,
            q => match QFormat::parse(q) {
                Some(f) => f.ggml(),
                None => bail!("--gguf-type `{t}` is not one of {}, f32", QFormat::names()),
            },
        };
        match &mut format {
            MergeFormat::Gguf { merged_type } => *merged_type = Some(ty),
            MergeFormat::HfF16 => bail!("--gguf-type applies to a GGUF output (--to gguf)"),
        }
    }
    let base = resolve_model(&args.model, &mut |_| {})?;
    let cancel = super::ctrl_c_token();
    let bar = super::progress_bar(json, "{bar:30} {pos}/{len} tensors  [{elapsed_precise}]");
    if !json {
        eprintln!(
            "merging {} adapter(s) into {} → {} ({})",
            args.adapters.len(),
            base.display(),
            args.out.display(),
            format.name()
        );
    }
    let report = merge(
        &base,
        &args.adapters,
        &args.out,
        format,
        &cancel,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "wrote {} ({} tensors, {} merged, {:.1} MiB)",
        report.out.display(),
        report.tensors,
        report.merged_tensors,
        report.bytes as f64 / (1 << 20) as f64
    );
    println!(
        "adapter change lost to the output format: {:.1}% (‖written − (W+ΔW)‖ / ‖ΔW‖)",
        100.0 * report.delta_loss
    );
    for r in &report.retyped {
        println!("retyped: {r}");
    }
    if report.delta_loss > 0.25 && matches!(format, MergeFormat::Gguf { .. }) {
        println!(
            "note: re-quantising lost much of the adapters' change; --gguf-type q8_0 (or f16), \
             or --to hf, keeps more of it"
        );
    }
    Ok(())
}
