//! The desktop app (eframe, wgpu renderer): one panel type per file, each with `fn ui`. Long
//! work runs on background threads ([`jobs`]); the UI thread only draws and polls.
//!
//! The tabs follow the work: Model → Data → Train → Generate → Evaluate → Adapters → Serve.

mod adapters;
mod data;
mod evaluate;
mod generate;
mod highlight;
mod jobs;
mod model;
mod serve;
mod train;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use burn::backend::Flex;
use codelsi_engine::device::{GpuInfo, Wgpu};
use codelsi_engine::model::LoadedModel;
use eframe::egui;

use crate::Engine;

pub use adapters::AdaptersPanel;
pub use data::DataPanel;
pub use evaluate::{EvalChoice, EvaluatePanel};
pub use generate::GeneratePanel;
pub use model::ModelPanel;
pub use serve::ServePanel;
pub use train::{Preset, RunSettings, TrainPanel};

/// What persists between runs (eframe stores it with the window's size and place).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Models opened before, most recent first (`default` or a path).
    pub recent_models: Vec<String>,
    /// Adapter folders the app trained or the user added.
    pub adapters: Vec<PathBuf>,
    /// Dataset folders imported or opened, most recent first.
    pub datasets: Vec<PathBuf>,
    /// Where new datasets and adapters go (default: the platform data folder + `codelsi`).
    pub workspace: Option<PathBuf>,
    pub tab: Tab,
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// The Train panel's data (a dataset folder or a JSONL file).
    pub train_data: Option<PathBuf>,
    pub train: RunSettings,
    pub eval: EvalChoice,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            recent_models: Vec::new(),
            adapters: Vec::new(),
            datasets: Vec::new(),
            workspace: None,
            tab: Tab::Model,
            max_tokens: 128,
            temperature: 0.0,
            train_data: None,
            train: Preset::Balanced.settings(),
            eval: EvalChoice::default(),
        }
    }
}

impl Settings {
    /// Put `spec` first in the recent models (at most 8 kept).
    pub fn remember_model(&mut self, spec: &str) {
        self.recent_models.retain(|m| m != spec);
        self.recent_models.insert(0, spec.to_string());
        self.recent_models.truncate(8);
    }

    /// Put `dir` first in the datasets (at most 16 kept).
    pub fn remember_dataset(&mut self, dir: &std::path::Path) {
        self.datasets.retain(|d| d != dir);
        self.datasets.insert(0, dir.to_path_buf());
        self.datasets.truncate(16);
    }

    pub fn add_adapter(&mut self, dir: &std::path::Path) {
        if !self.adapters.iter().any(|a| a == dir) {
            self.adapters.push(dir.to_path_buf());
        }
    }

    /// Add what the workspace holds (dataset folders under `datasets/`, adapter folders under
    /// `adapters/`) to the lists, so work done with the command line shows up in the app.
    pub fn discover(&mut self) {
        let ws = self.workspace();
        let subdirs = |name: &str, marker: &str| -> Vec<PathBuf> {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(ws.join(name))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join(marker).is_file())
                .collect();
            dirs.sort();
            dirs
        };
        for d in subdirs("datasets", codelsi_engine::dataset::DatasetDir::TRAIN) {
            if !self.datasets.contains(&d) {
                self.datasets.push(d);
            }
        }
        for a in subdirs("adapters", "adapter_config.json") {
            self.add_adapter(&a);
        }
    }

    pub fn workspace(&self) -> PathBuf {
        self.workspace
            .clone()
            .unwrap_or_else(codelsi_engine::fetch::data_dir)
    }
}

/// Adapter folders by name for menus (the folder's name).
pub fn adapter_names(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .map(|p| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tab {
    Model,
    Data,
    Train,
    Generate,
    Evaluate,
    Adapters,
    Serve,
}

impl Tab {
    pub const ALL: [Tab; 7] = [
        Tab::Model,
        Tab::Data,
        Tab::Train,
        Tab::Generate,
        Tab::Evaluate,
        Tab::Adapters,
        Tab::Serve,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tab::Model => "Model",
            Tab::Data => "Data",
            Tab::Train => "Train",
            Tab::Generate => "Generate",
            Tab::Evaluate => "Evaluate",
            Tab::Adapters => "Adapters",
            Tab::Serve => "Serve",
        }
    }
}

/// The loaded model, on the engine it was loaded for.
#[derive(Clone)]
pub enum Model {
    Gpu(Arc<LoadedModel<Wgpu>>),
    Cpu(Arc<LoadedModel<Flex>>),
}

/// `$body` with `$m` bound to the [`Model`]'s `&Arc<LoadedModel<B>>`: code generic over the
/// backend, compiled once for each engine.
macro_rules! on_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            $crate::gui::Model::Gpu($m) => $body,
            $crate::gui::Model::Cpu($m) => $body,
        }
    };
}
use on_model;

impl Model {
    pub fn info(&self) -> &codelsi_engine::model::ModelInfo {
        on_model!(self, m => &m.info)
    }

    pub fn tokenizer(&self) -> &codelsi_engine::io::tokenizer::Tokenizer {
        on_model!(self, m => &m.tokenizer)
    }
}

/// What the panels share: the engine, the loaded model and the settings.
#[derive(Default)]
pub struct Shared {
    /// Where models load and compute: `--device`, with `auto` resolved as for the commands (the
    /// CPU path where wgpu finds only a software adapter; the window still draws with it).
    pub engine: Engine,
    pub model: Option<Model>,
    /// The adapter or CPU the model computes on.
    pub gpu: Option<GpuInfo>,
    pub settings: Settings,
}

pub struct App {
    pub shared: Shared,
    pub model: ModelPanel,
    pub data: DataPanel,
    pub train: TrainPanel,
    pub generate: GeneratePanel,
    pub evaluate: EvaluatePanel,
    pub adapters: AdaptersPanel,
    pub serve: ServePanel,
}

impl App {
    pub fn new(settings: Settings) -> Self {
        Self {
            shared: Shared {
                settings,
                ..Default::default()
            },
            model: ModelPanel::default(),
            data: DataPanel::default(),
            train: TrainPanel::default(),
            generate: GeneratePanel::default(),
            evaluate: EvaluatePanel::default(),
            adapters: AdaptersPanel::default(),
            serve: ServePanel::default(),
        }
    }

    /// The whole window: tabs on top, the current panel below.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        // Jobs report even while their panel is hidden.
        self.model.poll(&mut self.shared);
        self.data.poll(&mut self.shared);
        self.train.poll(&mut self.shared);
        self.generate.poll();
        self.evaluate.poll();
        self.adapters.poll();
        self.serve.poll(&self.shared);
        let adapters_before = self.shared.settings.adapters.len();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("codelsi");
                ui.separator();
                let tab = &mut self.shared.settings.tab;
                for t in Tab::ALL {
                    ui.selectable_value(tab, t, t.name());
                }
                ui.separator();
                match &self.shared.model {
                    Some(m) => ui.label(format!(
                        "{} on {}",
                        m.info().architecture,
                        gpu_name(&self.shared)
                    )),
                    None => ui.weak("no model loaded"),
                };
            });
        });
        egui::CentralPanel::default().show(ui, |ui| match self.shared.settings.tab {
            Tab::Model => self.model.ui(ui, &mut self.shared),
            Tab::Data => self.data.ui(ui, &mut self.shared),
            Tab::Train => self.train.ui(ui, &mut self.shared),
            Tab::Generate => self.generate.ui(ui, &mut self.shared),
            Tab::Evaluate => self.evaluate.ui(ui, &mut self.shared),
            Tab::Adapters => self.adapters.ui(ui, &mut self.shared),
            Tab::Serve => self.serve.ui(ui, &mut self.shared),
        });
        // An adapter removed from the list moves the ones after it: drop choices by index.
        if self.shared.settings.adapters.len() < adapters_before {
            self.generate.adapter = None;
            self.train.general = None;
            self.evaluate.chosen.clear();
        }
    }
}

fn gpu_name(shared: &Shared) -> &str {
    shared.gpu.as_ref().map_or("?", |g| g.name.as_str())
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        App::ui(self, ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.shared.settings);
    }
}

/// Open the window. `model`: load this model at once (`default` fetches the default model).
pub fn run(model: Option<String>) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::engine() == Engine::Cuda {
        anyhow::bail!(
            "the desktop app runs on wgpu or the CPU; --device cuda is for the headless \
             commands (train, generate, eval, serve, predict)"
        );
    }
    let mut options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("codelsi")
            .with_inner_size([1100.0, 760.0]),
        ..Default::default()
    };
    // One wgpu device for the engine and the renderer: open the engine's first and hand it to
    // eframe. Without an adapter the window still opens, with the error in the Model panel.
    let engine_device = codelsi_engine::device::init_wgpu();
    if let (Ok(_), Some(setup)) = (&engine_device, codelsi_engine::device::shared_setup()) {
        options.wgpu_options.wgpu_setup =
            eframe::egui_wgpu::WgpuSetup::Existing(eframe::egui_wgpu::WgpuSetupExisting {
                instance: setup.instance,
                adapter: setup.adapter,
                device: setup.device,
                queue: setup.queue,
            });
    }
    eframe::run_native(
        "codelsi",
        options,
        Box::new(move |cc| {
            let settings: Settings = cc
                .storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default();
            let mut settings = settings;
            settings.discover();
            let mut app = App::new(settings);
            app.shared.engine = crate::engine();
            match (app.shared.engine, engine_device) {
                (Engine::Cpu, _) => app.shared.gpu = Some(codelsi_engine::device::cpu_info()),
                (Engine::Gpu, Ok((_, gpu))) => app.shared.gpu = Some(gpu),
                (Engine::Gpu, Err(e)) => app.model.show_error(e.to_string()),
                // Refused at the start of `run`.
                #[cfg(feature = "cuda")]
                (Engine::Cuda, _) => {}
            }
            if let Some(spec) = model {
                app.model.load(&cc.egui_ctx, spec, app.shared.engine);
                app.shared.settings.tab = Tab::Generate;
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// A striped two-column grid of facts: `rows` calls `row(name, value)` once per line.
fn facts(
    ui: &mut egui::Ui,
    id: impl egui::AsIdSalt,
    rows: impl FnOnce(&mut dyn FnMut(&str, String)),
) {
    egui::Grid::new(id)
        .num_columns(2)
        .striped(true)
        .show(ui, |ui| {
            rows(&mut |k: &str, v: String| {
                ui.label(k);
                ui.label(v);
                ui.end_row();
            })
        });
}

/// Megabytes, for people.
fn mb(bytes: usize) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// The panels driven through egui's test harness on the tiny model, with snapshot images
/// (`app/tests/snapshots/`, rendered with wgpu on whatever adapter runs the tests; refresh them
/// with `UPDATE_SNAPSHOTS=1`).
#[cfg(test)]
mod tests;
