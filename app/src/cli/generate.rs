//! `codelsi generate`: a prompt in, text streamed out; with `--samples`, candidates drawn as one
//! batch and ranked by a regression adapter's predicted cost.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::device::GpuInfo;
use codelsi_engine::generate::{
    BatchRequest, GenerateOptions, GenerateOutput, generate_batch, generate_with,
};
use codelsi_engine::io::tokenizer::Message;
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::model::OpenDevice;
use codelsi_engine::models::llama::Adapters;
use codelsi_engine::regress::{PredictSettings, Regressor};
use codelsi_engine::sampling::SamplingParams;

use super::{BaseArgs, Format, ctrl_c_token, load, load_adapters};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// A catalogue name (`codelsi models list`; `default` is qwen2.5-coder-0.5b-instruct, fetched
    /// on first use), a GGUF file, or an HF model directory.
    #[arg(long, default_value = "default")]
    model: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[command(flatten)]
    base: BaseArgs,
    /// A LoRA adapter directory (PEFT format, as `codelsi train` writes); repeat to stack.
    #[arg(long = "adapter")]
    adapters: Vec<PathBuf>,
    /// Draw this many candidates (as one batch; use a temperature above 0).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Rank the candidates by this metric of `--regressor`'s predictions, cheapest first.
    #[arg(long)]
    rank_by: Option<String>,
    /// The regression adapter that predicts the cost of each candidate (prompt + completion).
    #[arg(long)]
    regressor: Option<PathBuf>,
    /// Answers the regressor draws per candidate.
    #[arg(long, default_value_t = 64)]
    regressor_samples: usize,
    /// `json` prints one JSON object for scripts instead of streaming text.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub fn cmd_generate(args: GenerateArgs) -> Result<()> {
    crate::on_engine!(generate_on(args))
}

fn generate_on<B: OpenDevice>(args: GenerateArgs) -> Result<()> {
    let json = args.format == Format::Json;
    let (loaded, gpu) = load::<B>(&args.model, &args.base, json)?;
    let LoadedModel {
        model, tokenizer, ..
    } = &loaded;
    let adapters = load_adapters(&args.adapters, model)?;
    let adapter_refs: Vec<&Adapter<B>> = adapters.iter().collect();
    let prompt_text = if args.chat {
        tokenizer.apply_chat_template(&[Message::user(&args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = tokenizer.encode(&prompt_text, true)?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.rank_by.is_some() != args.regressor.is_some() {
        bail!("--rank-by and --regressor go together: a metric, and the adapter that predicts it");
    }
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop_strings: args.stop.clone(),
        top_logprobs: if json { 5 } else { 0 },
    };
    let cancel = CancelToken::new();
    if args.samples > 1 || args.rank_by.is_some() {
        return generate_candidates(
            &args,
            &loaded,
            &adapter_refs,
            &prompt_text,
            &prompt_ids,
            options,
        );
    }
    let mut stdout = std::io::stdout();
    let out = generate_with(
        model,
        Adapters {
            list: &adapter_refs,
            train: None,
        },
        tokenizer,
        &prompt_ids,
        &options,
        &cancel,
        &mut |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_output(&out, &gpu, tokenizer, &args.adapters))?
        );
    } else {
        println!();
        eprintln!("{}", figures(&out, &gpu, &args.adapters));
    }
    Ok(())
}

/// `generate --samples n [--rank-by M --regressor DIR]`: n candidates as one batch, each drawn
/// with its own seed, ranked by predicted cost when asked.
fn generate_candidates<B: KernelBackend>(
    args: &GenerateArgs,
    loaded: &LoadedModel<B>,
    adapters: &[&Adapter<B>],
    prompt_text: &str,
    prompt_ids: &[u32],
    options: GenerateOptions,
) -> Result<()> {
    let json = args.format == Format::Json;
    if args.samples > 1 && options.sampling.temperature == 0.0 && !json {
        eprintln!("note: at temperature 0 every candidate is the same; pass --temperature 0.8");
    }
    // The ranking's regressor and metric, checked before any candidate is generated.
    let ranking = match (&args.rank_by, &args.regressor) {
        (Some(metric), Some(dir)) => {
            let r = Regressor::<B>::load(dir, &loaded.model)?;
            let Some(m) = r.spec.metrics.iter().position(|x| x == metric) else {
                bail!(
                    "{} predicts {}, not `{metric}`",
                    dir.display(),
                    r.spec.metrics.join(", ")
                );
            };
            Some((r, m))
        }
        _ => None,
    };
    let requests: Vec<BatchRequest> = (0..args.samples)
        .map(|i| {
            let mut o = options.clone();
            o.sampling.seed = options.sampling.seed + i as u64;
            BatchRequest {
                prompt_ids: prompt_ids.to_vec(),
                options: o,
            }
        })
        .collect();
    let cancel = ctrl_c_token();
    let outs = generate_batch(
        &loaded.model,
        Adapters {
            list: adapters,
            train: None,
        },
        &loaded.tokenizer,
        &requests,
        &cancel,
        &mut |_, _| {},
    )?;
    let mut order: Vec<usize> = (0..outs.len()).collect();
    let mut predicted: Vec<Option<Vec<codelsi_engine::regress::Prediction>>> =
        vec![None; outs.len()];
    if let Some((regressor, m)) = &ranking {
        let m = *m;
        let codes: Vec<String> = outs
            .iter()
            .map(|o| format!("{prompt_text}{}", o.text))
            .collect();
        let preds = regressor
            .predict(
                &loaded.model,
                &loaded.tokenizer,
                &codes,
                PredictSettings {
                    samples: args.regressor_samples,
                    ..PredictSettings::default()
                },
                &cancel,
                &mut |_| {},
            )?
            .context("cancelled")?;
        order.sort_by(|&a, &b| preds[a][m].median.total_cmp(&preds[b][m].median));
        predicted = preds.into_iter().map(Some).collect();
    }
    if json {
        let list: Vec<serde_json::Value> = order
            .iter()
            .map(|&i| {
                serde_json::json!({
                    "candidate": i,
                    "text": outs[i].text,
                    "stop_reason": outs[i].stop_reason,
                    "predictions": predicted[i],
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for (rank, &i) in order.iter().enumerate() {
        let figures = predicted[i]
            .as_ref()
            .map(|p| format!(" — predicted {}", super::predict::describe(p, ", ")))
            .unwrap_or_default();
        println!(
            "=== #{} (candidate {i}){figures}\n{}",
            rank + 1,
            outs[i].text
        );
    }
    Ok(())
}

fn figures(out: &GenerateOutput, gpu: &GpuInfo, lora: &[PathBuf]) -> String {
    let lora = if lora.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = lora.iter().map(|p| p.display().to_string()).collect();
        format!(", LoRA {}", names.join(" + "))
    };
    format!(
        "[prompt {} tokens, generated {} tokens, prefill {:.1} tok/s, decode {:.1} tok/s, stop: {:?}, backend {}, device {}{lora}]",
        out.prompt_token_ids.len(),
        out.token_ids.len(),
        out.prefill_tokens_per_second(),
        out.decode_tokens_per_second(),
        out.stop_reason,
        gpu.engine(),
        gpu.name,
    )
}

fn json_output(
    out: &GenerateOutput,
    gpu: &GpuInfo,
    tok: &codelsi_engine::io::tokenizer::Tokenizer,
    lora: &[PathBuf],
) -> serde_json::Value {
    let top: Vec<Vec<serde_json::Value>> = out
        .top_logprobs
        .iter()
        .map(|step| {
            step.iter()
                .map(|&(id, lp)| serde_json::json!({"id": id, "logprob": lp, "token": tok.id_to_token(id)}))
                .collect()
        })
        .collect();
    serde_json::json!({
        "text": out.text,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.token_ids,
        "top_logprobs": top,
        "stop_reason": out.stop_reason,
        "prompt_tokens": out.prompt_token_ids.len(),
        "generated_tokens": out.token_ids.len(),
        "prefill_tokens_per_second": out.prefill_tokens_per_second(),
        "decode_tokens_per_second": out.decode_tokens_per_second(),
        "backend": gpu.engine(),
        "adapter": gpu,
        "lora_adapters": lora,
    })
}
