//! The Generate panel: a prompt, an adapter (or none), streaming output with stop, the base
//! model beside the adapter on the same prompt, copy to the clipboard; with a regression
//! adapter chosen, each output's predicted cost (median and 10–90 % range) beside it.

use std::path::PathBuf;

use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::generate::{GenerateOptions, generate_with};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::models::llama::Adapters;
use codelsi_engine::regress::{PredictSettings, RegressionSpec, Regressor};
use codelsi_engine::sampling::SamplingParams;
use eframe::egui;

use super::jobs::{Job, Tx, drain};
use super::{Shared, highlight, on_model};

enum Msg {
    /// Text streamed into column 0 (base) or 1 (adapter).
    Text(usize, String),
    Done(usize, String),
    /// The regression adapter's figures for a column's code.
    Predicted(usize, String),
    Failed(String),
}

pub struct GeneratePanel {
    pub prompt: String,
    /// Index into `settings.adapters`; `None` is the base model alone.
    pub adapter: Option<usize>,
    /// With an adapter: the base model's output beside it.
    pub side_by_side: bool,
    /// Column 0: the base model (or the only output), 1: with the adapter.
    pub outputs: [String; 2],
    pub stats: [String; 2],
    /// Index into `settings.adapters` of the regression adapter that predicts each output's
    /// cost; `None`: no prediction.
    pub regressor: Option<usize>,
    /// Answers drawn per prediction.
    pub regressor_samples: usize,
    pub predicted: [String; 2],
    /// Which of `settings.adapters` are regression adapters, read when the list changes (not
    /// every frame).
    kinds: Vec<(PathBuf, bool)>,
    job: Option<Job<Msg>>,
    error: Option<String>,
}

impl Default for GeneratePanel {
    fn default() -> Self {
        Self {
            prompt: "/** Whether `s` reads the same backwards. */\nfunction isPalindrome(s: string): boolean {\n".into(),
            adapter: None,
            side_by_side: true,
            outputs: Default::default(),
            stats: Default::default(),
            regressor: None,
            regressor_samples: 64,
            predicted: Default::default(),
            kinds: Vec::new(),
            job: None,
            error: None,
        }
    }
}

impl GeneratePanel {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    pub fn poll(&mut self) {
        let (outputs, stats, error) = (&mut self.outputs, &mut self.stats, &mut self.error);
        let predicted = &mut self.predicted;
        drain(&mut self.job, |msg| match msg {
            Msg::Text(col, t) => outputs[col].push_str(&t),
            Msg::Done(col, s) => stats[col] = s,
            Msg::Predicted(col, s) => predicted[col] = s,
            Msg::Failed(e) => *error = Some(e),
        });
    }

    /// Whether `settings.adapters[i]` is a regression adapter (refreshing the cache when the
    /// list changed).
    fn refresh_kinds(&mut self, dirs: &[PathBuf]) {
        if self.kinds.len() != dirs.len() || self.kinds.iter().zip(dirs).any(|(k, d)| k.0 != *d) {
            self.kinds = dirs
                .iter()
                .map(|d| (d.clone(), matches!(RegressionSpec::load(d), Ok(Some(_)))))
                .collect();
        }
    }

    fn is_regressor(&self, i: usize) -> bool {
        self.kinds.get(i).is_some_and(|k| k.1)
    }

    /// Start generating from the prompt with the current choices.
    pub fn start(&mut self, ctx: &egui::Context, shared: &Shared) {
        let Some(model) = shared.model.clone() else {
            self.error = Some("Load a model first (Model tab).".into());
            return;
        };
        let adapter_dir: Option<PathBuf> = self
            .adapter
            .and_then(|i| shared.settings.adapters.get(i).cloned());
        // (column, with the adapter?) in the order they run.
        let runs: Vec<(usize, bool)> = match (&adapter_dir, self.side_by_side) {
            (None, _) => vec![(0, false)],
            (Some(_), true) => vec![(0, false), (1, true)],
            (Some(_), false) => vec![(1, true)],
        };
        self.outputs = Default::default();
        self.stats = Default::default();
        self.predicted = Default::default();
        self.error = None;
        let regressor: Option<PathBuf> = self
            .regressor
            .and_then(|i| shared.settings.adapters.get(i).cloned());
        let predict = PredictSettings {
            samples: self.regressor_samples.max(1),
            ..PredictSettings::default()
        };
        let options = GenerateOptions {
            max_tokens: shared.settings.max_tokens.max(1),
            sampling: SamplingParams {
                temperature: shared.settings.temperature,
                ..SamplingParams::default()
            },
            ..Default::default()
        };
        let request = Request {
            prompt: self.prompt.clone(),
            adapter_dir,
            regressor,
            predict,
            options,
            runs,
        };
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            let result = on_model!(&model, m => run(m, &request, tx, cancel));
            if let Err(e) = result {
                tx.send(Msg::Failed(e.to_string()));
            }
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Generate");
        self.refresh_kinds(&shared.settings.adapters);
        let names = super::adapter_names(&shared.settings.adapters);
        ui.horizontal(|ui| {
            ui.label("Adapter:");
            let offered: Vec<bool> = (0..names.len()).map(|i| !self.is_regressor(i)).collect();
            pick_adapter(
                ui,
                "adapter",
                &mut self.adapter,
                "none (base model)",
                &names,
                &offered,
            );
            if ui.button("Add adapter folder…").clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                shared.settings.add_adapter(&dir);
                self.adapter = shared.settings.adapters.iter().position(|d| *d == dir);
            }
            ui.add_enabled(
                self.adapter.is_some(),
                egui::Checkbox::new(&mut self.side_by_side, "Base model beside it"),
            );
        });
        ui.horizontal(|ui| {
            ui.label("Max new tokens:");
            ui.add(egui::DragValue::new(&mut shared.settings.max_tokens).range(1..=4096));
            ui.label("Temperature:");
            ui.add(
                egui::DragValue::new(&mut shared.settings.temperature)
                    .range(0.0..=2.0)
                    .speed(0.05),
            )
            .on_hover_text("0 always picks the most likely token");
        });
        if (0..names.len()).any(|i| self.is_regressor(i)) {
            ui.horizontal(|ui| {
                ui.label("Predict cost with:");
                let offered: Vec<bool> = (0..names.len()).map(|i| self.is_regressor(i)).collect();
                pick_adapter(
                    ui,
                    "regressor",
                    &mut self.regressor,
                    "no prediction",
                    &names,
                    &offered,
                )
                .on_hover_text(
                    "A regression adapter (codelsi train --task regression) predicts each \
                         output's cost from its code",
                );
                if self.regressor.is_some() {
                    ui.label("Samples:");
                    ui.add(egui::DragValue::new(&mut self.regressor_samples).range(1..=256))
                        .on_hover_text(
                            "Answers drawn per prediction: the median is shown, with the range \
                             of the middle 80 %",
                        );
                }
            });
        }
        let mut layouter = |ui: &egui::Ui, buf: &dyn egui::TextBuffer, wrap: f32| {
            let mut job = highlight::layout(
                buf.as_str(),
                ui.visuals(),
                egui::TextStyle::Monospace.resolve(ui.style()),
            );
            job.wrap.max_width = wrap;
            ui.fonts_mut(|f| f.layout_job(job))
        };
        ui.add(
            egui::TextEdit::multiline(&mut self.prompt)
                .code_editor()
                .layouter(&mut layouter)
                .desired_rows(6)
                .desired_width(f32::INFINITY)
                .hint_text("Start of the code to complete"),
        );
        ui.horizontal(|ui| {
            let can = !self.busy() && shared.model.is_some();
            if ui
                .add_enabled(can, egui::Button::new("Generate code"))
                .clicked()
            {
                self.start(ui.ctx(), shared);
            }
            if ui
                .add_enabled(self.busy(), egui::Button::new("Stop"))
                .clicked()
                && let Some(job) = &self.job
            {
                job.cancel.cancel();
            }
            if self.busy() {
                ui.spinner();
            }
            if shared.model.is_none() {
                ui.weak("Load a model in the Model tab first.");
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        ui.separator();
        let cols: Vec<usize> = if self.adapter.is_some() && self.side_by_side {
            vec![0, 1]
        } else if self.adapter.is_some() {
            vec![1]
        } else {
            vec![0]
        };
        let titles = ["Base model", "With the adapter"];
        ui.columns(cols.len(), |uis| {
            for (ui, &c) in uis.iter_mut().zip(&cols) {
                ui.horizontal(|ui| {
                    ui.strong(titles[c]);
                    if ui.small_button("Copy").clicked() {
                        ui.ctx()
                            .copy_text(format!("{}{}", self.prompt, self.outputs[c]));
                    }
                });
                ui.weak(&self.stats[c]);
                if !self.predicted[c].is_empty() {
                    ui.label(&self.predicted[c]);
                }
                // Code keeps its lines (a wrapping label drops their leading spaces).
                egui::ScrollArea::both().id_salt(c).show(ui, |ui| {
                    let code = format!("{}{}", self.prompt, self.outputs[c]);
                    let font = egui::TextStyle::Monospace.resolve(ui.style());
                    ui.add(
                        egui::Label::new(highlight::layout(&code, ui.visuals(), font))
                            .wrap_mode(egui::TextWrapMode::Extend),
                    );
                });
            }
        });
    }
}

/// A combo box choosing one of `names` (those `offered`) or none.
fn pick_adapter(
    ui: &mut egui::Ui,
    id: &str,
    choice: &mut Option<usize>,
    none: &str,
    names: &[String],
    offered: &[bool],
) -> egui::Response {
    let current = choice
        .and_then(|i| names.get(i))
        .map_or(none, |s| s.as_str());
    egui::ComboBox::from_id_salt(id)
        .selected_text(current)
        .show_ui(ui, |ui| {
            ui.selectable_value(choice, None, none);
            for (i, n) in names.iter().enumerate() {
                if offered.get(i).copied().unwrap_or(false) {
                    ui.selectable_value(choice, Some(i), n);
                }
            }
        })
        .response
}

/// What one click of "Generate code" asks for, taken from the panel when it starts.
struct Request {
    prompt: String,
    adapter_dir: Option<PathBuf>,
    regressor: Option<PathBuf>,
    predict: PredictSettings,
    options: GenerateOptions,
    /// (column, with the adapter?) in the order they run.
    runs: Vec<(usize, bool)>,
}

/// Generate `r`'s columns on `model`, streaming into the panel.
fn run<B: KernelBackend>(
    model: &LoadedModel<B>,
    r: &Request,
    tx: &Tx<Msg>,
    cancel: &CancelToken,
) -> codelsi_engine::Result<()> {
    let Request {
        prompt,
        adapter_dir,
        regressor,
        predict,
        options,
        runs,
    } = r;
    let ids = model.tokenizer.encode(prompt, true)?;
    let adapter = match adapter_dir {
        Some(dir) => Some(Adapter::<B>::load_peft(
            dir,
            &model.model.config,
            model.model.device(),
        )?),
        None => None,
    };
    let regressor = match regressor {
        Some(dir) => Some(Regressor::<B>::load(dir, &model.model)?),
        None => None,
    };
    for &(col, with) in runs {
        // Stopped before this column began (Stop can land while the prompt is
        // tokenised or the adapter loads): say so, as a stopped generation does.
        if cancel.is_cancelled() {
            tx.send(Msg::Done(col, "0 tokens, stop: Cancelled".into()));
            continue;
        }
        let list: Vec<&Adapter<B>> = if with {
            adapter.iter().collect()
        } else {
            Vec::new()
        };
        let out = generate_with(
            &model.model,
            Adapters {
                list: &list,
                train: None,
            },
            &model.tokenizer,
            &ids,
            options,
            cancel,
            &mut |t| {
                tx.send(Msg::Text(col, t.to_string()));
            },
        )?;
        tx.send(Msg::Done(
            col,
            format!(
                "{} tokens, {:.1} tok/s, stop: {:?}",
                out.token_ids.len(),
                out.decode_tokens_per_second(),
                out.stop_reason
            ),
        ));
        if let Some(r) = &regressor
            && !cancel.is_cancelled()
        {
            tx.send(Msg::Predicted(col, "predicting the cost…".into()));
            let code = format!("{prompt}{}", out.text);
            let p = r.predict(
                &model.model,
                &model.tokenizer,
                &[code],
                *predict,
                cancel,
                &mut |_| {},
            )?;
            if let Some(p) = p.and_then(|mut p| p.pop()) {
                let text = crate::cli::predict::describe(&p, " · ");
                tx.send(Msg::Predicted(col, format!("Predicted: {text}")));
            }
        }
    }
    Ok(())
}
