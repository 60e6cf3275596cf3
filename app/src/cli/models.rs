//! `codelsi models`: the catalogue, fetching a model, and what a model is and takes.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use codelsi_engine::fetch::{DEFAULT_MODEL, FetchStep, cache_dir, catalogue, ensure_model};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::OpenDevice;

use super::{BaseArgs, load, print_fetch, resident_bytes};
use crate::on_engine;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List the catalogue's models (and others in the cache).
    List,
    /// Download a catalogue model into the cache (done on first use anyway), checked by SHA-256.
    Fetch {
        /// A name from `codelsi models list`.
        #[arg(default_value = "default")]
        name: String,
    },
    /// Load a model and print what it is and what it takes.
    Info {
        #[arg(long, default_value = "default")]
        model: String,
        #[command(flatten)]
        base: BaseArgs,
    },
}

pub fn cmd_models(command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List => {
            let dir = cache_dir().join("models");
            println!("cache: {}", dir.display());
            for m in catalogue()? {
                let path = dir.join(&m.file);
                let state = if path.exists() {
                    "cached"
                } else {
                    "not fetched yet"
                };
                let default = if m.name == DEFAULT_MODEL {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "{}{default}  {:.0} MB, {}, {}\n    {}\n    from: {}",
                    m.name,
                    m.bytes as f64 / 1e6,
                    m.licence,
                    state,
                    m.description,
                    m.origin
                );
            }
            let known: Vec<String> = catalogue()?.into_iter().map(|m| m.file).collect();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p: PathBuf = e.path();
                    let name = e.file_name().to_string_lossy().to_string();
                    if p.extension().is_some_and(|x| x == "gguf") && !known.contains(&name) {
                        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                        println!("other: {} ({:.1} MB)", p.display(), size as f64 / 1e6);
                    }
                }
            }
        }
        ModelsCommand::Fetch { name } => {
            let path = ensure_model(&name, &mut |s| {
                if !print_fetch(s) && s == FetchStep::AlreadyCached {
                    eprintln!("already in the cache");
                }
            })?;
            println!("{}", path.display());
        }
        ModelsCommand::Info { model, base } => on_engine!(model_info(&model, &base))?,
    }
    Ok(())
}

/// `codelsi models info`: what a model is and what it takes on `B`'s device.
fn model_info<B: OpenDevice>(model: &str, base: &BaseArgs) -> Result<()> {
    let (loaded, gpu) = load::<B>(model, base, false)?;
    let i = &loaded.info;
    println!("path:          {}", i.path.display());
    println!("format:        {}", i.format);
    println!("architecture:  {}", i.architecture);
    println!("parameters:    {:.1} M", i.parameters as f64 / 1e6);
    println!("tensor types:  {}", i.quantization);
    println!(
        "layers:        {} (hidden {}, vocab {})",
        i.layers, i.hidden_size, i.vocab_size
    );
    println!("context:       {} tokens", i.context_length);
    println!(
        "device memory: {:.1} MB of weights, and {:.1} MB of token embeddings on the host",
        i.device_bytes as f64 / 1e6,
        i.host_bytes as f64 / 1e6
    );
    if i.file_tensor_bytes > 0 {
        println!(
            "file tensors:  {:.1} MB; loaded, device + host: {:.1} %",
            i.file_tensor_bytes as f64 / 1e6,
            100.0 * (i.device_bytes + i.host_bytes) as f64 / i.file_tensor_bytes as f64
        );
    }
    if let Some(rss) = resident_bytes() {
        let file = std::fs::metadata(&i.path).map_or(0, |m| m.len());
        println!(
            "process RSS:   {:.1} MB after loading ({:.2} × the file's {:.1} MB)",
            rss as f64 / 1e6,
            rss as f64 / file.max(1) as f64,
            file as f64 / 1e6
        );
    }
    println!("runs on:       {gpu}");
    println!("kernels:       {}", <B as KernelBackend>::kernels_impl());
    if loaded.tokenizer.vocab_size() == 0 {
        bail!("the tokenizer is empty");
    }
    Ok(())
}
