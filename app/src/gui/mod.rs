//! The desktop app (eframe, wgpu renderer): one panel type per file, each with `fn ui`. Long
//! work runs on background threads ([`jobs`]); the UI thread only draws and polls.
//!
//! Built so far: the Model and Generate panels. Data, Train, Evaluate and Adapters are the
//! `codelsi import`, `train`, `eval` and `merge` commands until their panels land.

mod generate;
mod jobs;
mod model;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use codelsi_engine::device::{GpuInfo, Wgpu};
use codelsi_engine::model::LoadedModel;
use eframe::egui;

pub use generate::GeneratePanel;
pub use model::ModelPanel;

/// What persists between runs (eframe stores it with the window's size and place).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Models opened before, most recent first (`default` or a path).
    pub recent_models: Vec<String>,
    /// Adapter folders the user added.
    pub adapters: Vec<PathBuf>,
    pub tab: Tab,
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            recent_models: Vec::new(),
            adapters: Vec::new(),
            tab: Tab::Model,
            max_tokens: 128,
            temperature: 0.0,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tab {
    Model,
    Generate,
}

/// What the panels share: the loaded model and the settings.
#[derive(Default)]
pub struct Shared {
    pub model: Option<Arc<LoadedModel<Wgpu>>>,
    pub gpu: Option<GpuInfo>,
    pub settings: Settings,
}

pub struct App {
    pub shared: Shared,
    pub model: ModelPanel,
    pub generate: GeneratePanel,
}

impl App {
    pub fn new(settings: Settings) -> Self {
        Self {
            shared: Shared {
                settings,
                ..Default::default()
            },
            model: ModelPanel::default(),
            generate: GeneratePanel::default(),
        }
    }

    /// The whole window: tabs on top, the current panel below.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        // Jobs report even while their panel is hidden.
        self.model.poll(&mut self.shared);
        self.generate.poll();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("codelsi");
                ui.separator();
                let tab = &mut self.shared.settings.tab;
                ui.selectable_value(tab, Tab::Model, "Model");
                ui.selectable_value(tab, Tab::Generate, "Generate");
                ui.separator();
                match &self.shared.model {
                    Some(m) => ui.label(format!(
                        "{} on {}",
                        m.info.architecture,
                        gpu_name(&self.shared)
                    )),
                    None => ui.weak("no model loaded"),
                };
            });
        });
        egui::CentralPanel::default().show(ui, |ui| match self.shared.settings.tab {
            Tab::Model => self.model.ui(ui, &mut self.shared),
            Tab::Generate => self.generate.ui(ui, &mut self.shared),
        });
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
            let mut app = App::new(settings);
            match engine_device {
                Ok((_, gpu)) => app.shared.gpu = Some(gpu),
                Err(e) => app.model.show_error(e.to_string()),
            }
            if let Some(spec) = model {
                app.model.load(&cc.egui_ctx, spec);
                app.shared.settings.tab = Tab::Generate;
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
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

    use codelsi_engine::generate::{CancelToken, GenerateOptions, generate};
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    use super::*;

    /// Relative to `app/`, where cargo runs the tests, so the snapshots show the same path on
    /// every checkout.
    fn tiny_model() -> String {
        "../tests/fixtures/tiny_llama".to_string()
    }

    /// Step the UI until `done` holds (jobs run on their own threads meanwhile).
    fn step_until(h: &mut Harness<'_, App>, what: &str, done: impl Fn(&App) -> bool) {
        let start = Instant::now();
        while !done(h.state()) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}"
            );
            h.step();
            std::thread::sleep(Duration::from_millis(20));
        }
        h.run_steps(2);
    }

    #[test]
    fn load_generate_stop_and_errors() {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            // SAFETY: set before this test starts any thread that reads the environment.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
        }
        let mut h = Harness::builder()
            .with_size([1000.0, 640.0])
            .wgpu()
            .build_ui_state(
                |ui, app: &mut App| app.ui(ui),
                App::new(Settings::default()),
            );

        // A path that is not a model: a readable error in the panel, and nothing loaded.
        let ctx = h.ctx.clone();
        h.state_mut()
            .model
            .load(&ctx, "/nonexistent/model.gguf".into());
        step_until(&mut h, "the failed load", |a| !a.model.busy());
        assert!(h.state().shared.model.is_none());
        h.get_by_label_contains("Could not load the model");

        // Load the tiny model: its card shows, and it joins the recent models.
        h.state_mut().model.load(&ctx, tiny_model());
        step_until(&mut h, "the model", |a| !a.model.busy());
        assert!(
            h.state().shared.model.is_some(),
            "the tiny model did not load"
        );
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
        let want = {
            let m = h
                .state()
                .shared
                .model
                .clone()
                .unwrap_or_else(|| panic!("no model"));
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
        };
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
}
