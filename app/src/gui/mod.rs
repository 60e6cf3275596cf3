//! The desktop app (eframe, wgpu renderer): one panel type per file, each with `fn ui`. Long
//! work runs on background threads ([`jobs`]); the UI thread only draws and polls.
//!
//! The tabs follow the work: Model → Data → Train → Generate → Evaluate → Adapters.

mod adapters;
mod data;
mod evaluate;
mod generate;
mod highlight;
mod jobs;
mod model;
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
}

impl Tab {
    pub const ALL: [Tab; 6] = [
        Tab::Model,
        Tab::Data,
        Tab::Train,
        Tab::Generate,
        Tab::Evaluate,
        Tab::Adapters,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tab::Model => "Model",
            Tab::Data => "Data",
            Tab::Train => "Train",
            Tab::Generate => "Generate",
            Tab::Evaluate => "Evaluate",
            Tab::Adapters => "Adapters",
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
mod tests {
    use std::time::{Duration, Instant};

    use codelsi_engine::cancel::CancelToken;
    use codelsi_engine::generate::{GenerateOptions, generate};
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::*;

    /// Relative to `app/`, where cargo runs the tests, so the snapshots show the same path on
    /// every checkout.
    fn tiny_model() -> String {
        "../tests/fixtures/tiny_llama".to_string()
    }

    /// Step the UI until `done` holds (jobs run on their own threads meanwhile). The limit only
    /// turns a hang into a failure; it times nothing. Training on lavapipe beside the other
    /// tests on 2 cores once took over 120 s for the resumed run in CI, so it is generous.
    fn step_until(h: &mut Harness<'_, App>, what: &str, done: impl Fn(&App) -> bool) {
        let start = Instant::now();
        while !done(h.state()) {
            assert!(
                start.elapsed() < Duration::from_secs(900),
                "timed out waiting for {what}"
            );
            h.step();
            std::thread::sleep(Duration::from_millis(20));
        }
        h.run_steps(2);
    }

    /// The app with `settings`, loading models onto `engine`. The window draws with wgpu
    /// either way.
    fn harness(settings: Settings, engine: Engine) -> Harness<'static, App> {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            // SAFETY: set before the harness starts any thread that reads the environment.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
        }
        // The CPU's name in the images says how many threads it has.
        codelsi_engine::device::set_cpu_threads(Some(2));
        let mut app = App::new(settings);
        app.shared.engine = engine;
        Harness::builder()
            .with_size([1000.0, 640.0])
            .wgpu()
            .build_ui_state(|ui, app: &mut App| app.ui(ui), app)
    }

    /// The model the app has loaded.
    fn the_model(h: &Harness<'_, App>) -> Model {
        h.state()
            .shared
            .model
            .clone()
            .unwrap_or_else(|| panic!("no model"))
    }

    /// The model the app has loaded on the CPU path.
    fn cpu_model(h: &Harness<'_, App>) -> Arc<LoadedModel<Flex>> {
        match the_model(h) {
            Model::Cpu(m) => m,
            Model::Gpu(_) => panic!("the model is on the GPU"),
        }
    }

    /// Load the tiny model into the app, onto its engine.
    fn load_tiny(h: &mut Harness<'_, App>) {
        let ctx = h.ctx.clone();
        let engine = h.state().shared.engine;
        h.state_mut().model.load(&ctx, tiny_model(), engine);
        step_until(h, "the model", |a| !a.model.busy());
        assert!(
            h.state().shared.model.is_some(),
            "the tiny model did not load"
        );
    }

    #[test]
    fn load_generate_stop_and_errors() {
        let mut h = harness(Settings::default(), Engine::Gpu);

        // A path that is not a model: a readable error in the panel, and nothing loaded.
        let ctx = h.ctx.clone();
        h.state_mut()
            .model
            .load(&ctx, "/nonexistent/model.gguf".into(), Engine::Gpu);
        step_until(&mut h, "the failed load", |a| !a.model.busy());
        assert!(h.state().shared.model.is_none());
        h.get_by_label_contains("Could not load the model");

        // Load the tiny model: its card shows, and it joins the recent models.
        load_tiny(&mut h);
        h.get_by_label("Parameters");
        assert_eq!(h.state().shared.settings.recent_models, vec![tiny_model()]);
        h.snapshot("model_panel");

        // Generate from the Generate tab: what streams in is what the engine generates.
        h.get_by_label("Generate").click();
        h.run_steps(2);
        {
            let app = h.state_mut();
            app.generate.prompt = "fn main() {".into();
            app.shared.settings.max_tokens = 8;
        }
        h.get_by_label("Generate code").click();
        h.step();
        assert!(h.state().generate.busy(), "the click started nothing");
        step_until(&mut h, "generation", |a| !a.generate.busy());
        let want = on_model!(&the_model(&h), m => {
            let ids = m
                .tokenizer
                .encode("fn main() {", true)
                .unwrap_or_else(|e| panic!("{e}"));
            let opts = GenerateOptions {
                max_tokens: 8,
                ..Default::default()
            };
            generate(
                &m.model,
                &m.tokenizer,
                &ids,
                &opts,
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("{e}"))
        });
        assert_eq!(h.state().generate.outputs[0], want.text);
        assert!(h.state().generate.stats[0].starts_with("8 tokens"));
        // The speed differs from run to run; the snapshot shows a fixed one.
        h.state_mut().generate.stats[0] = "8 tokens, 10.0 tok/s, stop: MaxTokens".into();
        h.run_steps(2);
        h.snapshot("generate_panel");

        // Stop a long generation: it ends early, says so, and the panel is usable again.
        h.state_mut().shared.settings.max_tokens = 4000;
        h.get_by_label("Generate code").click();
        h.step();
        h.get_by_label("Stop").click();
        step_until(&mut h, "the stop", |a| !a.generate.busy());
        assert!(
            h.state().generate.stats[0].contains("Cancelled"),
            "{}",
            h.state().generate.stats[0]
        );
    }

    /// A regression adapter among the adapters: the Generate panel offers it as a cost
    /// predictor (not as an adapter to generate with), and shows its figures under the output,
    /// the same the engine predicts for that code.
    #[test]
    fn generate_shows_predicted_cost() {
        use codelsi_engine::regress::{self, Example, PredictSettings, RegressionSpec, Regressor};
        use codelsi_engine::train::{TrainConfig, TrainJob, train};

        let mut h = harness(Settings::default(), Engine::Cpu);
        load_tiny(&mut h);
        let m = cpu_model(&h);
        // A few steps of a tiny regression adapter (what it predicts does not matter here).
        let dir = temp_workspace("regressor").join("cost");
        let spec = RegressionSpec::new(vec!["latency_ms".into()], 160, m.model.config.vocab_size);
        let data: Vec<Example> = [("a()", 1.5), ("b(); b();", 300.0)]
            .iter()
            .map(|(c, v)| Example {
                code: c.to_string(),
                metrics: [("latency_ms".to_string(), *v)].into(),
                group: None,
            })
            .collect();
        let (rows, _) = spec
            .rows(&data, &m.tokenizer)
            .unwrap_or_else(|e| panic!("{e}"));
        let trainable = m.model.autodiff();
        let mut config = TrainConfig {
            max_steps: Some(3),
            eval_every: 0,
            checkpoint_every: 0,
            ..TrainConfig::default()
        };
        config.lora.rank = 2;
        train(
            TrainJob {
                model: &trainable,
                frozen: &[],
                train: &rows,
                val: &[],
                config: &config,
                out: &dir,
                base_model: "tiny_llama",
                run: codelsi_engine::train::meta::RunInfo {
                    regression: Some(serde_json::to_value(&spec).unwrap_or_else(|e| panic!("{e}"))),
                    ..Default::default()
                },
                resume: false,
                objective: Some(
                    &regress::NumberObjective::new(&m.model, &m.tokenizer)
                        .unwrap_or_else(|e| panic!("{e}")),
                ),
                init: None,
            },
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        h.state_mut().shared.settings.add_adapter(&dir);

        h.get_by_label("Generate").click();
        h.run_steps(2);
        h.get_by_label("Predict cost with:");
        {
            let app = h.state_mut();
            app.generate.prompt = "fn main() {".into();
            app.shared.settings.max_tokens = 6;
            app.generate.regressor = Some(0);
            app.generate.regressor_samples = 5;
        }
        h.run_steps(2);
        h.get_by_label("Generate code").click();
        h.step();
        step_until(&mut h, "generation and prediction", |a| !a.generate.busy());
        let shown = h.state().generate.predicted[0].clone();
        let code = format!("fn main() {{{}", h.state().generate.outputs[0]);
        let regressor = Regressor::<Flex>::load(&dir, &m.model).unwrap_or_else(|e| panic!("{e}"));
        let want = regressor
            .predict(
                &m.model,
                &m.tokenizer,
                &[code],
                PredictSettings {
                    samples: 5,
                    ..PredictSettings::default()
                },
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("cancelled"));
        let p = &want[0][0];
        assert_eq!(
            shown,
            format!(
                "Predicted: latency_ms {} ({}–{})",
                crate::regress::short(p.median),
                crate::regress::short(p.low),
                crate::regress::short(p.high)
            )
        );
        h.get_by_label(&shown);
        // The speed differs from run to run; the snapshot shows a fixed one.
        h.state_mut().generate.stats[0] = "6 tokens, 10.0 tok/s, stop: MaxTokens".into();
        h.run_steps(2);
        h.snapshot_options("generate_predicted", &drifting());
    }

    /// For images of a trained adapter: a run resumed at another step ends a few 1e-5 away
    /// (`resume_continues_the_same_loss_curve` allows as much), which can change a digit of
    /// the final loss or move a plotted point by a pixel. A few hundred pixels stay well below
    /// what any change of layout or wording moves.
    fn drifting() -> egui_kittest::SnapshotOptions {
        egui_kittest::SnapshotOptions::new().failed_pixel_count_threshold(300)
    }

    /// A folder of its own under the target dir (relative to `app/`, so the snapshots show the
    /// same paths on every checkout), emptied first.
    fn temp_workspace(name: &str) -> PathBuf {
        let dir = PathBuf::from(format!("../target/gui-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    fn lines(path: &std::path::Path) -> usize {
        std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
    }

    /// The rest of the loop on the tiny model: import a repository, exclude a pair, train
    /// (estimate, start, cancel, resume), evaluate base and adapter, then the adapter's card and
    /// its deletion.
    #[test]
    fn import_train_evaluate_and_adapters() {
        let workspace = temp_workspace("loop");
        let mut h = harness(
            Settings {
                workspace: Some(workspace.clone()),
                ..Settings::default()
            },
            Engine::Cpu,
        );
        let ctx = h.ctx.clone();

        // Import without a model: a readable request for one.
        h.get_by_label("Data").click();
        h.run_steps(2);
        {
            let app = h.state_mut();
            app.data
                .import(&ctx, &app.shared, "../tests/fixtures/import_repo".into());
        }
        h.run_steps(2);
        h.get_by_label_contains("Load a model first");

        // Import the fixture repository: progress to the end, then its report and pairs.
        load_tiny(&mut h);
        {
            let app = h.state_mut();
            app.data.error = None;
            app.data
                .import(&ctx, &app.shared, "../tests/fixtures/import_repo".into());
        }
        assert!(h.state().data.busy());
        step_until(&mut h, "the import", |a| !a.data.busy());
        let dir = workspace.join("datasets").join("import_repo");
        let pairs = {
            let app = h.state();
            assert_eq!(app.data.error, None);
            let ds = app
                .data
                .dataset
                .as_ref()
                .unwrap_or_else(|| panic!("no dataset"));
            assert_eq!(ds.dir, dir);
            assert_eq!(app.shared.settings.datasets, vec![dir.clone()]);
            ds.pairs.len()
        };
        assert!(pairs > 10, "{pairs} pairs");
        assert_eq!(
            pairs,
            lines(&dir.join("train.jsonl")) + lines(&dir.join("val.jsonl"))
        );
        h.get_by_label("Secrets left out, by kind");

        // Search, exclude the pair shown first, save: it moves to excluded.jsonl.
        h.state_mut().data.search = "greet".into();
        h.run_steps(2);
        // The first checkbox is "Replace a dataset already there"; the pairs' follow.
        h.get_all_by_role(egui::accesskit::Role::CheckBox)
            .nth(1)
            .unwrap_or_else(|| panic!("no pair matched the search"))
            .click();
        h.run_steps(2);
        assert_eq!(
            h.state().data.dataset.as_ref().map(|d| d.excluded()),
            Some(1)
        );
        h.get_by_label("Save exclusions").click();
        h.run_steps(2);
        assert_eq!(lines(&dir.join("excluded.jsonl")), 1);
        assert_eq!(
            lines(&dir.join("train.jsonl")) + lines(&dir.join("val.jsonl")),
            pairs - 1
        );
        let reopened = data::Dataset::open(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((reopened.pairs.len(), reopened.excluded()), (pairs, 1));
        h.state_mut().data.selected = Some(0);
        h.run_steps(2);
        h.snapshot("data_panel");

        // Train: the dataset goes to the Train tab; measure, start, cancel, resume.
        h.get_by_label("Train on it").click();
        h.run_steps(2);
        assert_eq!(h.state().shared.settings.tab, Tab::Train);
        assert_eq!(h.state().shared.settings.train_data, Some(dir.clone()));
        h.state_mut().shared.settings.train = RunSettings {
            max_len: 256,
            epochs: 6,
            batch: 2,
            lr: 1e-3,
            eval_every: 10,
            ..Preset::Quick.settings()
        };
        h.get_by_label("Estimate").click();
        h.step();
        step_until(&mut h, "the estimate", |a| !a.train.busy());
        let est = h
            .state()
            .train
            .estimate
            .clone()
            .unwrap_or_else(|| panic!("no estimate: {:?}", h.state().train.error));
        assert!(est.tokens_per_second > 0.0 && est.tokens > 0 && est.steps > 0);
        h.get_by_label_contains("Estimate: about");

        h.get_by_label("Start training").click();
        h.step();
        assert!(h.state().train.busy(), "the click started nothing");
        step_until(&mut h, "the first step", |a| a.train.live.step >= 1);
        h.get_by_label("Cancel").click();
        step_until(&mut h, "the cancel", |a| !a.train.busy());
        let stopped_at = h.state().train.live.step;
        let total = h.state().train.live.total;
        assert!(
            stopped_at < total,
            "cancel came after the end ({stopped_at}/{total})"
        );
        assert!(
            h.state()
                .train
                .status
                .as_deref()
                .is_some_and(|s| s.starts_with("Stopped")),
            "{:?}",
            h.state().train.status
        );
        let out = workspace.join("adapters").join("import_repo-general");
        assert!(h.state().shared.settings.adapters.is_empty());
        h.get_by_label("Resume").click();
        h.step();
        step_until(&mut h, "the resumed run", |a| !a.train.busy());
        {
            let t = &h.state().train;
            assert_eq!(t.error, None);
            assert_eq!(t.live.step, total);
            assert_eq!(t.finished.as_ref(), Some(&out));
            // The plot has every step of the run, those before the resume included, and
            // validation points.
            assert_eq!(t.live.losses.first().map(|p| p[0] as usize), Some(1));
            assert_eq!(t.live.losses.len(), total);
            assert!(!t.live.val_losses.is_empty());
            let first = t.live.losses.first().map_or(0.0, |p| p[1]);
            let last = t.live.losses.last().map_or(f64::MAX, |p| p[1]);
            assert!(last < first, "loss went {first} → {last}");
        }
        assert_eq!(h.state().shared.settings.adapters, vec![out.clone()]);
        assert!(out.join("adapter_model.safetensors").is_file());
        // Varying figures pinned for the image.
        {
            let t = &mut h.state_mut().train;
            t.live.tokens_per_second = 1000.0;
            t.live.eta_seconds = 0.0;
            t.live.peak_bytes = Some(50_000_000);
            t.status = Some("Done (pinned for the snapshot).".into());
            // Where the cancel lands varies, and the resumed run's losses with it by more than
            // a pixel's worth in places (seen in CI). The curve's values are asserted above;
            // the image, which checks the layout, shows a fixed curve on the same steps.
            for p in &mut t.live.losses {
                p[1] = 4.4 + 3.0 / (1.0 + p[0] / 8.0) + 0.1 * (p[0] * 1.7).sin();
            }
            for p in &mut t.live.val_losses {
                p[1] = 4.5 + 3.0 / (1.0 + p[0] / 8.0);
            }
            if let Some(e) = &mut t.estimate {
                e.tokens_per_second = 1000.0;
                e.peak_bytes = Some(50_000_000);
            }
        }
        h.run_steps(2);
        h.snapshot_options("train_panel", &drifting());

        // Evaluate the base model and the adapter on two problems: a row each, and a drill-in.
        h.get_by_label("Evaluate").click();
        h.run_steps(2);
        {
            let app = h.state_mut();
            app.shared.settings.eval.limit = 2;
            app.shared.settings.eval.max_tokens = 16;
            app.evaluate.chosen = vec![true];
        }
        h.get_by_label("Run").click();
        h.step();
        step_until(&mut h, "the evaluation", |a| !a.evaluate.busy());
        {
            let e = &h.state().evaluate;
            assert_eq!(e.error, None);
            let names: Vec<&str> = e.runs.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, ["base model", "import_repo-general"]);
            assert!(e.runs.iter().all(|r| r.summary.total == 2));
        }
        {
            let e = &mut h.state_mut().evaluate;
            e.selected = Some((0, 0));
            for r in &mut e.runs {
                r.generate_seconds = 1.0;
                r.run_seconds = 1.0;
                // The sandbox's folder has the process id in its name.
                for s in &mut r.results {
                    s.stderr_tail = s
                        .stderr_tail
                        .replace(&std::process::id().to_string(), "PID");
                }
            }
        }
        h.run_steps(2);
        h.get_by_label("Completion (what the model wrote after the prompt):");
        h.snapshot("evaluate_panel");

        // The adapter's card: base model, data, steps, loss and the score just measured.
        h.get_by_label("Adapters").click();
        h.run_steps(2);
        h.get_by_label_contains("humaneval-ts");
        let info = adapters::AdapterInfo::read(&out);
        assert_eq!(info.problem, None);
        assert_eq!(info.steps, total.to_string());
        assert!(info.scores.contains("(2 problems)"), "{}", info.scores);
        h.snapshot_options("adapters_panel", &drifting());

        // Export: the PEFT files, and the tiny model with the adapter merged in (an HF folder).
        let peft = workspace.join("export-peft");
        h.state_mut().adapters.export_peft(&out, &peft);
        assert_eq!(h.state().adapters.error, None);
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(peft.join(f).is_file(), "{f} not exported");
        }
        let merged = workspace.join("export-merged");
        {
            let app = h.state_mut();
            app.adapters
                .export_merged(&ctx, &app.shared, out.clone(), merged.clone());
        }
        step_until(&mut h, "the merge", |a| !a.adapters.busy());
        assert_eq!(h.state().adapters.error, None);
        assert!(merged.join("model.safetensors").is_file());
        h.get_by_label_contains("Merged model written to");

        // Step 2: a specialised adapter on top of the general one, which stays frozen under it.
        h.get_by_label("Train").click();
        h.run_steps(2);
        h.get_by_label("Next: train a specialised adapter on top of this one")
            .click();
        h.run_steps(2);
        assert_eq!(h.state().train.stage, train::Stage::Specialised);
        assert_eq!(h.state().train.general, Some(0));
        h.state_mut().shared.settings.train.epochs = 1;
        h.get_by_label("Start training").click();
        h.step();
        step_until(&mut h, "the specialised run", |a| !a.train.busy());
        let special = workspace.join("adapters").join("import_repo-specialised");
        assert_eq!(h.state().train.finished.as_ref(), Some(&special));
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(special.join("codelsi_adapter.json")).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            meta["extra"]["base_adapters"],
            serde_json::json!([out.clone()])
        );

        // Delete asks first; then the folder and the entry are gone.
        h.get_by_label("Adapters").click();
        h.run_steps(2);
        h.get_all_by_label("Delete…")
            .next()
            .unwrap_or_else(|| panic!("no Delete button"))
            .click();
        h.run_steps(2);
        assert!(out.exists());
        h.get_by_label("Yes, delete").click();
        h.run_steps(2);
        assert!(!out.exists());
        assert_eq!(h.state().shared.settings.adapters, vec![special]);
        let _ = std::fs::remove_dir_all(&workspace);
    }
}
