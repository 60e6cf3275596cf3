//! The Train panel: presets in plain words with a measured estimate of time and memory,
//! advanced settings folded away, start / cancel / resume, the live loss and validation-loss
//! plot, and the two steps "general → specialised".

use std::path::{Path, PathBuf};
use std::time::Instant;

use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::train::run::{DEFAULT_VAL_FRAC, InstructRun};
use codelsi_engine::train::{TrainEvent, TrainJob, TrainSummary, checkpoint_dir, train};
use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

mod settings;

pub use settings::{Preset, RunSettings};

use super::jobs::{Job, Tx, drain};
use super::{Shared, mb, on_model};

/// A measured estimate for a dataset and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub key: (PathBuf, RunSettings),
    pub steps: usize,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub peak_bytes: Option<u64>,
}

impl Estimate {
    /// Every pass over the data at the measured speed.
    pub fn seconds(&self) -> f64 {
        (self.tokens * self.key.1.epochs) as f64 / self.tokens_per_second.max(1e-9)
    }
}

enum Msg {
    Status(String),
    Estimated(Estimate),
    Event(TrainEvent),
    Finished(TrainSummary, PathBuf),
    Failed(String),
}

/// Which of the two steps a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// An adapter on the base model alone.
    General,
    /// An adapter trained on top of a general one (kept frozen under it).
    Specialised,
}

/// What the running (or last) training run reported.
#[derive(Default)]
pub struct Live {
    pub step: usize,
    pub total: usize,
    pub losses: Vec<[f64; 2]>,
    pub val_losses: Vec<[f64; 2]>,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    pub peak_bytes: Option<u64>,
}

impl Live {
    fn apply(&mut self, e: TrainEvent) {
        let l = self;
        match e {
            TrainEvent::Started {
                total_steps,
                resumed_at,
                ..
            } => {
                l.total = total_steps;
                l.step = resumed_at;
            }
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                tokens_per_second,
                eta_seconds,
                peak_bytes,
                ..
            } => {
                l.step = step;
                l.total = total_steps;
                l.losses.push([step as f64, loss]);
                l.tokens_per_second = tokens_per_second;
                l.eta_seconds = eta_seconds;
                l.peak_bytes = peak_bytes;
            }
            TrainEvent::Eval { step, val_loss } => l.val_losses.push([step as f64, val_loss]),
            TrainEvent::Checkpoint { .. } => {}
        }
    }
}

pub struct TrainPanel {
    pub stage: Stage,
    /// With `Specialised`: index into `settings.adapters` of the general adapter.
    pub general: Option<usize>,
    /// Folder name under `adapters/` in the workspace.
    pub name: String,
    pub estimate: Option<Estimate>,
    pub status: Option<String>,
    pub error: Option<String>,
    /// The adapter the last finished run wrote.
    pub finished: Option<PathBuf>,
    pub live: Live,
    job: Option<Job<Msg>>,
    estimating: bool,
    /// `resumable(out)` for the output folder, looked at once a second rather than every frame.
    resume_check: Option<(PathBuf, std::time::Instant, (bool, bool))>,
}

impl Default for TrainPanel {
    fn default() -> Self {
        Self {
            stage: Stage::General,
            general: None,
            name: String::new(),
            estimate: None,
            status: None,
            error: None,
            finished: None,
            live: Live::default(),
            job: None,
            estimating: false,
            resume_check: None,
        }
    }
}

/// Everything a background run needs, taken from the UI state when it starts.
struct RunInputs {
    model: super::Model,
    data: PathBuf,
    frozen: Vec<PathBuf>,
    settings: RunSettings,
    out: PathBuf,
    resume: bool,
    gpu: String,
}

impl TrainPanel {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Where the run with the current name writes.
    pub fn out_dir(&self, shared: &Shared) -> PathBuf {
        let name = if self.name.trim().is_empty() {
            let data = shared
                .settings
                .train_data
                .as_deref()
                .and_then(Path::file_stem)
                .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
            let stage = match self.stage {
                Stage::General => "general",
                Stage::Specialised => "specialised",
            };
            format!("{data}-{stage}")
        } else {
            self.name.trim().to_string()
        };
        shared.settings.workspace().join("adapters").join(name)
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        let (status, error) = (&mut self.status, &mut self.error);
        let (estimate, live, done) = (&mut self.estimate, &mut self.live, &mut self.finished);
        let ended = drain(&mut self.job, |msg| match msg {
            Msg::Status(s) => *status = Some(s),
            Msg::Estimated(e) => {
                *status = None;
                *estimate = Some(e);
            }
            Msg::Event(e) => live.apply(e),
            Msg::Finished(s, out) => {
                // The whole run's curve, steps before a resume included (the live events
                // only saw this session's steps).
                live.losses = s.losses.iter().map(|&(st, l)| [st as f64, l]).collect();
                live.val_losses = s.val_losses.iter().map(|&(st, l)| [st as f64, l]).collect();
                *status = Some(if s.cancelled {
                    format!(
                        "Stopped at step {}/{}. A checkpoint is saved: Resume continues from it.",
                        s.steps, s.total_steps
                    )
                } else {
                    format!(
                        "Done: {} steps in {:.0} s, loss {:.3} → {:.3}. The adapter is in {} and \
                         ready in the Generate tab.",
                        s.steps,
                        s.seconds,
                        s.losses.first().map_or(f64::NAN, |l| l.1),
                        s.losses.last().map_or(f64::NAN, |l| l.1),
                        out.display()
                    )
                });
                if !s.cancelled {
                    shared.settings.add_adapter(&out);
                    *done = Some(out);
                }
            }
            Msg::Failed(e) => {
                *status = None;
                *error = Some(e);
            }
        });
        if ended {
            self.estimating = false;
            // The run wrote a checkpoint or an adapter: look again.
            self.resume_check = None;
        }
    }

    fn inputs(&self, shared: &Shared, resume: bool) -> Result<RunInputs, String> {
        let model = shared
            .model
            .clone()
            .ok_or("Load a model first (Model tab).")?;
        let data = shared
            .settings
            .train_data
            .clone()
            .ok_or("Choose the training data first.")?;
        let frozen = match self.stage {
            Stage::General => Vec::new(),
            Stage::Specialised => {
                let g = self
                    .general
                    .and_then(|i| shared.settings.adapters.get(i))
                    .ok_or("Choose the general adapter the specialised one builds on.")?;
                vec![g.clone()]
            }
        };
        shared
            .settings
            .train
            .config()
            .map_err(|e| format!("Check the advanced settings: {e}"))?;
        Ok(RunInputs {
            model,
            data,
            frozen,
            settings: shared.settings.train.clone(),
            out: self.out_dir(shared),
            resume,
            gpu: shared.gpu.as_ref().map_or("?".into(), |g| g.to_string()),
        })
    }

    /// Start a run (or continue the stopped one in the same folder).
    pub fn start(&mut self, ctx: &egui::Context, shared: &Shared, resume: bool) {
        self.error = None;
        self.finished = None;
        let inputs = match self.inputs(shared, resume) {
            Ok(i) => i,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        if !resume && checkpoint_dir(&inputs.out).exists() {
            // A fresh start replaces the stopped run's checkpoint.
            if let Err(e) = std::fs::remove_dir_all(checkpoint_dir(&inputs.out)) {
                self.error = Some(format!("Could not clear the old checkpoint: {e}"));
                return;
            }
        }
        self.live = Live::default();
        self.status = Some("Preparing the data…".into());
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            if let Err(e) = run(&inputs, tx, cancel, false) {
                tx.send(Msg::Failed(e.to_string()));
            }
        }));
    }

    /// Measure: two steps on the longest row give the speed and the memory at its peak.
    pub fn estimate(&mut self, ctx: &egui::Context, shared: &Shared) {
        self.error = None;
        let mut inputs = match self.inputs(shared, false) {
            Ok(i) => i,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        self.estimating = true;
        self.status = Some("Measuring two training steps…".into());
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            // The two steps write their checkpoint and adapter to a scratch folder.
            let dir = std::env::temp_dir().join(format!("codelsi-estimate-{}", std::process::id()));
            inputs.out = dir.clone();
            let result = run(&inputs, tx, cancel, true);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(e) = result {
                tx.send(Msg::Failed(e.to_string()));
            }
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Train");
        ui.label(
            "Teach the model your code with a LoRA adapter: a small set of extra weights \
             trained on your data while the model itself stays as it is.",
        );
        ui.add_space(4.0);
        let idle = !self.busy();
        ui.add_enabled_ui(idle, |ui| self.choices(ui, shared));
        ui.add_space(4.0);
        self.estimate_line(ui, shared);
        let out = self.out_dir(shared);
        let (can_resume, has_adapter) = match &self.resume_check {
            Some((dir, at, r)) if *dir == out && at.elapsed().as_secs_f64() < 1.0 => *r,
            _ => {
                let r = resumable(&out);
                self.resume_check = Some((out.clone(), std::time::Instant::now(), r));
                r
            }
        };
        ui.horizontal(|ui| {
            let ready = idle && shared.model.is_some() && shared.settings.train_data.is_some();
            let start = if can_resume {
                "Start over"
            } else {
                "Start training"
            };
            if ui.add_enabled(ready, egui::Button::new(start)).clicked() {
                self.start(ui.ctx(), shared, false);
            }
            if can_resume
                && ui
                    .add_enabled(ready, egui::Button::new("Resume"))
                    .on_hover_text("Continue the stopped run from its checkpoint")
                    .clicked()
            {
                self.start(ui.ctx(), shared, true);
            }
            if ui
                .add_enabled(self.busy(), egui::Button::new("Cancel"))
                .on_hover_text("Stops after the current step and saves a checkpoint")
                .clicked()
                && let Some(job) = &self.job
            {
                job.cancel.cancel();
            }
            if self.busy() {
                ui.spinner();
            }
        });
        ui.weak(format!("Adapter folder: {}", out.display()));
        if has_adapter && !self.busy() {
            ui.weak(
                "An adapter is already in this folder: a new run replaces it when it finishes. \
                 Change the name to keep both.",
            );
        }
        if let Some(s) = &self.status {
            ui.label(s);
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if self.stage == Stage::General
            && let Some(done) = self.finished.clone()
            && ui
                .button("Next: train a specialised adapter on top of this one")
                .clicked()
        {
            self.stage = Stage::Specialised;
            self.general = shared.settings.adapters.iter().position(|a| *a == done);
            self.name.clear();
            self.finished = None;
            self.status = Some(
                "Now choose the specialised data (for example your repository's dataset).".into(),
            );
        }
        self.progress(ui);
    }

    fn choices(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.horizontal(|ui| {
            ui.label("Step:");
            ui.radio_value(&mut self.stage, Stage::General, "1. General")
                .on_hover_text("An adapter on the base model, e.g. from a public instruction set");
            ui.radio_value(&mut self.stage, Stage::Specialised, "2. Specialised")
                .on_hover_text(
                    "An adapter trained on top of a general one, e.g. on your repository",
                );
            if self.stage == Stage::Specialised {
                ui.label("on top of:");
                let names = super::adapter_names(&shared.settings.adapters);
                let current = self
                    .general
                    .and_then(|i| names.get(i))
                    .map_or("choose…", |s| s.as_str());
                egui::ComboBox::from_id_salt("general")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for (i, n) in names.iter().enumerate() {
                            ui.selectable_value(&mut self.general, Some(i), n);
                        }
                    });
            }
        });
        ui.horizontal(|ui| {
            ui.label("Data:");
            let current = shared
                .settings
                .train_data
                .as_ref()
                .map_or("choose…".into(), |d| d.display().to_string());
            let mut pick = None;
            egui::ComboBox::from_id_salt("train-data")
                .selected_text(current)
                .width(360.0)
                .show_ui(ui, |ui| {
                    for d in &shared.settings.datasets {
                        if ui
                            .selectable_label(false, d.display().to_string())
                            .clicked()
                        {
                            pick = Some(d.clone());
                        }
                    }
                });
            if ui.button("File…").clicked()
                && let Some(f) = rfd::FileDialog::new()
                    .add_filter("Instructions", &["jsonl"])
                    .pick_file()
            {
                pick = Some(f);
            }
            if let Some(p) = pick {
                shared.settings.train_data = Some(p);
                self.estimate = None;
            }
            ui.label("Name:");
            ui.add(
                egui::TextEdit::singleline(&mut self.name)
                    .hint_text("named after the data")
                    .desired_width(160.0),
            );
        });
        ui.horizontal(|ui| {
            ui.label("How much:");
            for p in Preset::ALL {
                let on = p.settings() == shared.settings.train;
                if ui
                    .selectable_label(on, p.name())
                    .on_hover_text(p.explain())
                    .clicked()
                {
                    shared.settings.train = p.settings();
                }
            }
        });
        match Preset::ALL
            .into_iter()
            .find(|p| p.settings() == shared.settings.train)
        {
            Some(p) => ui.weak(p.explain()),
            None => ui.weak("Custom settings (see Advanced)."),
        };
        egui::CollapsingHeader::new("Advanced").show(ui, |ui| {
            let t = &mut shared.settings.train;
            egui::Grid::new("advanced").num_columns(4).show(ui, |ui| {
                ui.label("Rank");
                ui.add(egui::DragValue::new(&mut t.rank).range(1..=256));
                ui.label("Alpha");
                ui.add(egui::DragValue::new(&mut t.alpha).range(1.0..=512.0));
                ui.end_row();
                ui.label("Learning rate");
                ui.add(
                    egui::DragValue::new(&mut t.lr)
                        .range(1e-6..=1e-2)
                        .speed(1e-5)
                        .custom_formatter(|v, _| format!("{v:.1e}")),
                );
                ui.label("Passes over the data");
                ui.add(egui::DragValue::new(&mut t.epochs).range(1..=20));
                ui.end_row();
                ui.label("Tokens per row");
                ui.add(egui::DragValue::new(&mut t.max_len).range(8..=32768));
                ui.label("Rows per step");
                ui.add(egui::DragValue::new(&mut t.batch).range(1..=256));
                ui.end_row();
                ui.label("Layers");
                ui.text_edit_singleline(&mut t.targets)
                    .on_hover_text("all, attn, mlp, or names among q,k,v,o,gate,up,down");
                ui.label("Dropout");
                ui.add(egui::DragValue::new(&mut t.dropout).range(0.0..=0.9).speed(0.01));
                ui.end_row();
                ui.label("Validation every");
                ui.add(egui::DragValue::new(&mut t.eval_every).suffix(" steps"))
                    .on_hover_text("0: once, at the end");
                ui.checkbox(&mut t.grad_checkpoint, "Save memory")
                    .on_hover_text("Recompute activations in the backward pass: less memory, about a third slower");
                ui.end_row();
            });
        });
    }

    fn estimate_line(&mut self, ui: &mut egui::Ui, shared: &Shared) {
        ui.horizontal(|ui| {
            let key = shared
                .settings
                .train_data
                .clone()
                .map(|d| (d, shared.settings.train.clone()));
            let current = self
                .estimate
                .as_ref()
                .filter(|e| Some(&e.key) == key.as_ref());
            let memory = match shared.model {
                Some(super::Model::Cpu(_)) => "memory",
                _ => "GPU memory",
            };
            match current {
                Some(e) => {
                    ui.label(format!(
                        "Estimate: about {} for {} steps ({} tokens per pass at {:.0} tok/s, \
                         measured here){}",
                        duration(e.seconds()),
                        e.steps,
                        e.tokens,
                        e.tokens_per_second,
                        e.peak_bytes
                            .map(|b| format!("; {memory} at the peak: {}", mb(b as usize)))
                            .unwrap_or_default()
                    ));
                }
                None => {
                    ui.weak("Time and memory: not measured yet.");
                }
            }
            let ready = !self.busy() && shared.model.is_some() && key.is_some();
            if ui
                .add_enabled(ready, egui::Button::new("Estimate"))
                .on_hover_text(
                    "Runs two training steps on the longest example to measure speed and memory",
                )
                .clicked()
            {
                self.estimate(ui.ctx(), shared);
            }
        });
    }

    fn progress(&self, ui: &mut egui::Ui) {
        let l = &self.live;
        if l.total == 0 || self.estimating {
            return;
        }
        ui.separator();
        // Speed and time left exist once this run has finished a step.
        let pace = if l.losses.is_empty() {
            "first step running…".to_string()
        } else {
            format!(
                "{:.0} tok/s   {} left",
                l.tokens_per_second,
                duration(l.eta_seconds)
            )
        };
        ui.add(
            egui::ProgressBar::new(l.step as f32 / l.total as f32).text(format!(
                "step {}/{}   {pace}{}",
                l.step,
                l.total,
                l.peak_bytes
                    .map(|b| format!("   peak {}", mb(b as usize)))
                    .unwrap_or_default()
            )),
        );
        let last = |v: &[[f64; 2]]| v.last().map_or("–".into(), |p| format!("{:.4}", p[1]));
        ui.label(format!(
            "Loss {}   Validation loss {}",
            last(&l.losses),
            last(&l.val_losses)
        ));
        Plot::new("loss")
            .legend(Legend::default())
            .x_axis_label("step")
            .height(ui.available_height().max(120.0))
            .show(ui, |p| {
                p.line(Line::new(
                    "training loss",
                    PlotPoints::from(l.losses.clone()),
                ));
                p.points(
                    Points::new("validation loss", PlotPoints::from(l.val_losses.clone()))
                        .radius(4.0),
                );
                // Same name: the legend shows points and line as one entry.
                p.line(Line::new(
                    "validation loss",
                    PlotPoints::from(l.val_losses.clone()),
                ));
            });
    }
}

/// Whether the run in `out` stopped before its end (its checkpoint is newer than the finished
/// adapter, or there is none), and whether a finished adapter is there.
fn resumable(out: &Path) -> (bool, bool) {
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let state = modified(checkpoint_dir(out).join("trainer_state.json"));
    let adapter = modified(out.join("adapter_model.safetensors"));
    let stopped = match (state, adapter) {
        (Some(s), Some(a)) => s > a,
        (Some(_), None) => true,
        (None, _) => false,
    };
    (stopped, adapter.is_some())
}

/// "3 min", "1 h 20 min", for people.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s.div_ceil(60)),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A training run on the panel's inputs. With `estimate`, only two steps on the longest row
/// are run and measured.
fn run(
    inputs: &RunInputs,
    tx: &Tx<Msg>,
    cancel: &codelsi_engine::cancel::CancelToken,
    estimate: bool,
) -> codelsi_engine::Result<()> {
    on_model!(&inputs.model, m => run_on(m, inputs, tx, cancel, estimate))
}

/// [`run`] on the loaded model's backend.
fn run_on<B: KernelBackend>(
    loaded: &LoadedModel<B>,
    inputs: &RunInputs,
    tx: &Tx<Msg>,
    cancel: &codelsi_engine::cancel::CancelToken,
    estimate: bool,
) -> codelsi_engine::Result<()> {
    let s = &inputs.settings;
    let mut config = s.config()?;
    let assembled = InstructRun {
        data: inputs.data.clone(),
        val: None,
        val_frac: DEFAULT_VAL_FRAC,
        template: None,
        max_len: s.max_len,
        pack: true,
        base_adapters: inputs.frozen.clone(),
        init_adapter: None,
        seed: s.seed,
        device: inputs.gpu.clone(),
        app: true,
    }
    .assemble::<B>(
        &loaded.model.config,
        loaded.model.device(),
        &loaded.tokenizer,
    )?;
    let prepared = &assembled.data;
    // Shares the loaded model's weights on the device: nothing is uploaded again.
    let model = loaded.model.autodiff();
    let frozen_refs = assembled.frozen_refs();
    let tokens: usize = prepared.train.iter().map(|r| r.tokens.len()).sum();
    let (train_rows, val_rows) = match estimate {
        true => {
            let longest = prepared.train.iter().max_by_key(|r| r.tokens.len());
            config.batch = 1;
            config.max_steps = Some(2);
            (
                longest.into_iter().cycle().take(2).cloned().collect(),
                Vec::new(),
            )
        }
        false => (prepared.train.clone(), prepared.val.clone()),
    };
    if !estimate {
        tx.send(Msg::Status(format!(
            "{} training rows, {} validation rows; training on {}",
            prepared.train.len(),
            prepared.val.len(),
            inputs.gpu
        )));
    }
    let model_name = loaded.info.file_name();
    // The estimate times the second step alone (the first compiles the kernels).
    let mut step_times = Vec::new();
    let summary = train(
        TrainJob {
            model: &model,
            frozen: &frozen_refs,
            train: &train_rows,
            val: &val_rows,
            config: &config,
            out: &inputs.out,
            base_model: &model_name,
            run: assembled.run.clone(),
            resume: inputs.resume,
            objective: None,
            init: None,
        },
        cancel,
        &mut |e| {
            if estimate {
                if let TrainEvent::Step { peak_bytes, .. } = e {
                    step_times.push((Instant::now(), peak_bytes));
                }
            } else {
                tx.send(Msg::Event(e));
            }
        },
    )?;
    if estimate {
        let [(t1, _), (t2, peak)] = step_times[..] else {
            return Err(codelsi_engine::Error::Cancelled);
        };
        let row = train_rows[0].tokens.len() as f64;
        let secs = (t2 - t1).as_secs_f64();
        tx.send(Msg::Estimated(Estimate {
            key: (inputs.data.clone(), s.clone()),
            steps: prepared.train.len().div_ceil(s.batch) * s.epochs,
            tokens,
            tokens_per_second: row / secs.max(1e-9),
            peak_bytes: peak,
        }));
        return Ok(());
    }
    tx.send(Msg::Finished(summary, inputs.out.clone()));
    Ok(())
}
