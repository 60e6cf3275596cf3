//! `codelsi serve`: the model and its adapters behind an OpenAI-compatible HTTP API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use codelsi_engine::model::OpenDevice;

use super::{BaseArgs, ctrl_c_token, load};
use crate::serve::{Settings, serve};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A catalogue name (`default` is qwen2.5-coder-0.5b-instruct), a GGUF file, or an HF
    /// model directory.
    #[arg(long, default_value = "default")]
    model: String,
    /// Adapter directories: a PEFT adapter (its id is the folder's name) or a folder of them.
    /// `./adapters` is read too when it exists.
    #[arg(long = "adapters", num_args = 1..)]
    adapters: Vec<PathBuf>,
    /// The address to listen on: localhost by default, so nothing off this machine can reach
    /// the server unless asked.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Every request must send `Authorization: Bearer KEY` (also from CODELSI_API_KEY).
    #[arg(long, env = "CODELSI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait for the model; past them, 429 with Retry-After.
    #[arg(long, default_value_t = 32)]
    max_queue: usize,
    /// Sequences generated together, one forward pass a step; requests join and leave the
    /// batch between steps, each on its own adapters.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Adapters kept loaded at once (least recently used out).
    #[arg(long, default_value_t = 8)]
    max_adapters: usize,
    #[command(flatten)]
    base: BaseArgs,
}

pub fn cmd_serve(args: ServeArgs) -> Result<()> {
    crate::on_engine!(serve_on(args))
}

fn serve_on<B: OpenDevice>(args: ServeArgs) -> Result<()> {
    let mut dirs = args.adapters.clone();
    let local = PathBuf::from("adapters");
    if local.is_dir() && !dirs.contains(&local) {
        dirs.push(local);
    }
    let catalogue = adapter_catalogue(&dirs)?;
    let (loaded, gpu) = load::<B>(&args.model, &args.base, false)?;
    let base_id = loaded.info.id();
    eprintln!("{} on {}", base_id, gpu.name);
    for (id, dir) in &catalogue {
        eprintln!("adapter `{id}`: {}", dir.display());
    }
    let settings = Settings {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_queue: args.max_queue,
        max_batch: args.max_batch,
        max_adapters: args.max_adapters.max(1),
        catalogue,
        base_id,
        metrics: Default::default(),
        stop: ctrl_c_token(),
    };
    serve(std::sync::Arc::new(loaded), settings, |addr| {
        println!("listening on http://{addr}/v1 (OpenAI API; Ctrl-C stops)");
    })
}

/// Adapter id → directory: each directory given is an adapter (it has
/// `adapter_config.json`) or holds adapters one level down.
pub fn adapter_catalogue(dirs: &[PathBuf]) -> Result<BTreeMap<String, PathBuf>> {
    let is_adapter = |d: &Path| d.join("adapter_config.json").is_file();
    let mut found = BTreeMap::new();
    for dir in dirs {
        let mut add = |d: PathBuf| -> Result<()> {
            let id = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if id.contains('+') || id.is_empty() {
                bail!(
                    "{}: an adapter's folder name is its id, and may not contain `+`",
                    d.display()
                );
            }
            if let Some(other) = found.insert(id.clone(), d.clone()) {
                bail!(
                    "two adapters are named `{id}`: {} and {}",
                    other.display(),
                    d.display()
                );
            }
            Ok(())
        };
        if is_adapter(dir) {
            add(dir.clone())?;
            continue;
        }
        let entries =
            std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_adapter(p))
            .collect();
        subdirs.sort();
        if subdirs.is_empty() {
            bail!(
                "{} is not a PEFT adapter (no adapter_config.json) and holds none",
                dir.display()
            );
        }
        for d in subdirs {
            add(d)?;
        }
    }
    Ok(found)
}
