//! The Adapters panel: every adapter the app knows, with what it was trained from and how it
//! scored; export as a PEFT folder or as a model with the adapter merged in; delete.

use std::path::{Path, PathBuf};

use codelsi_engine::merge::{MergeFormat, merge};
use codelsi_engine::train::meta::AdapterMeta;
use eframe::egui;
use serde_json::Value;

use super::Shared;
use super::evaluate::SCORES_FILE;
use super::jobs::{Job, drain};

/// The PEFT files of an adapter folder (what other tools load).
const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

enum Msg {
    Progress(String, f32),
    Done(String),
    Failed(String),
}

/// What an adapter folder says about itself.
#[derive(Debug, Clone, Default)]
pub struct AdapterInfo {
    /// What it does: generation, or predicting which metrics.
    pub kind: String,
    /// A regression adapter (its number tokens cannot be merged into a model).
    pub regression: bool,
    pub base_model: String,
    pub lora: String,
    pub data: String,
    pub steps: String,
    pub final_loss: String,
    pub scores: String,
    /// The folder is not a readable adapter.
    pub problem: Option<String>,
}

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

impl AdapterInfo {
    pub fn read(dir: &Path) -> Self {
        let Some(cfg) = read_json(&dir.join("adapter_config.json")) else {
            return Self {
                problem: Some("no readable adapter_config.json here".into()),
                ..Self::default()
            };
        };
        let meta = AdapterMeta::read(dir).ok().flatten().unwrap_or_default();
        let s = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => "–".into(),
            v => v.to_string(),
        };
        let targets = cfg
            .get("target_modules")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let scores = read_json(&dir.join(SCORES_FILE))
            .and_then(|v| v.as_object().cloned())
            .map(|m| {
                m.iter()
                    .map(|(suite, v)| {
                        format!(
                            "{suite} {:.1} % ({} problems)",
                            100.0 * v["pass_at_1"].as_f64().unwrap_or(f64::NAN),
                            s(&v["problems"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "not evaluated".into());
        let metrics: Vec<String> = codelsi_engine::regress::RegressionSpec::load(dir)
            .ok()
            .flatten()
            .map(|spec| spec.metrics)
            .unwrap_or_default();
        Self {
            kind: if metrics.is_empty() {
                "generation (LoRA)".into()
            } else {
                format!("regression: predicts {}", metrics.join(", "))
            },
            regression: !metrics.is_empty(),
            base_model: s(&cfg["base_model_name_or_path"]),
            lora: format!(
                "rank {}, alpha {}, {targets} layer kinds",
                s(&cfg["r"]),
                s(&cfg["lora_alpha"])
            ),
            data: meta
                .extra
                .data
                .as_ref()
                .map_or("–".into(), |d| d.display().to_string()),
            steps: if meta.steps > 0 {
                meta.steps.to_string()
            } else {
                "–".into()
            },
            final_loss: match (meta.final_loss, meta.val_loss) {
                (Some(l), Some(v)) => format!("{l:.4} (validation {v:.4})"),
                (Some(l), None) => format!("{l:.4}"),
                _ => "–".into(),
            },
            scores,
            problem: None,
        }
    }
}

#[derive(Default)]
pub struct AdaptersPanel {
    /// Index into `settings.adapters` waiting for the delete confirmation.
    pub confirm_delete: Option<usize>,
    pub message: Option<String>,
    pub error: Option<String>,
    job: Option<Job<Msg>>,
    progress: Option<(String, f32)>,
    /// What each listed folder says, read when the list changes and at most every
    /// [`REREAD`] otherwise (a run or an evaluation may write to a folder meanwhile).
    infos: Vec<(std::path::PathBuf, AdapterInfo)>,
    read_at: Option<std::time::Instant>,
}

const REREAD: std::time::Duration = std::time::Duration::from_secs(2);

impl AdaptersPanel {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    fn refresh(&mut self, dirs: &[std::path::PathBuf]) {
        let changed =
            self.infos.len() != dirs.len() || self.infos.iter().zip(dirs).any(|(i, d)| i.0 != *d);
        if changed || self.read_at.is_none_or(|t| t.elapsed() > REREAD) {
            self.infos = dirs
                .iter()
                .map(|d| (d.clone(), AdapterInfo::read(d)))
                .collect();
            self.read_at = Some(std::time::Instant::now());
        }
    }

    pub fn poll(&mut self) {
        let (progress, message, error) = (&mut self.progress, &mut self.message, &mut self.error);
        let ended = drain(&mut self.job, |msg| match msg {
            Msg::Progress(what, f) => *progress = Some((what, f)),
            Msg::Done(m) => *message = Some(m),
            Msg::Failed(e) => *error = Some(e),
        });
        if ended {
            self.progress = None;
        }
    }

    /// Copy the PEFT files to `to` (a new or empty folder).
    pub fn export_peft(&mut self, adapter: &Path, to: &Path) {
        self.error = None;
        let result = (|| {
            std::fs::create_dir_all(to)?;
            for f in PEFT_FILES {
                let dest = to.join(f);
                if dest.exists() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} exists; choose an empty folder", dest.display()),
                    ));
                }
                std::fs::copy(adapter.join(f), dest)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.message = Some(format!("PEFT adapter written to {}", to.display())),
            Err(e) => self.error = Some(format!("Export failed: {e}")),
        }
    }

    /// Merge the adapter into the loaded model and write it to `out` (a `.gguf` file, or a
    /// folder for HF safetensors).
    pub fn export_merged(
        &mut self,
        ctx: &egui::Context,
        shared: &Shared,
        adapter: PathBuf,
        out: PathBuf,
    ) {
        self.error = None;
        let Some(model) = &shared.model else {
            self.error = Some("Load the adapter's base model first (Model tab).".into());
            return;
        };
        let base = model.info().path.clone();
        self.progress = Some(("Merging…".into(), 0.0));
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            let format = MergeFormat::for_output(&out);
            let result = merge(
                &base,
                &[adapter],
                &out,
                format,
                cancel,
                &mut |done, total| {
                    tx.send(Msg::Progress(
                        format!("Merging: tensor {done}/{total}"),
                        done as f32 / total.max(1) as f32,
                    ));
                },
            );
            tx.send(match result {
                Ok(r) => Msg::Done(format!(
                    "Merged model written to {} ({}, {:.0} MB; the format kept {:.2} % of the \
                     adapter's change exactly)",
                    r.out.display(),
                    r.format,
                    r.bytes as f64 / 1e6,
                    100.0 * (1.0 - r.delta_loss)
                )),
                Err(e) => Msg::Failed(format!("Merge failed: {e}")),
            });
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Adapters");
        ui.label(
            "What you have trained: use one in Generate, share it, or fold it into a model file.",
        );
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            if ui.button("Add adapter folder…").clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                shared.settings.add_adapter(&dir);
            }
            if let Some((what, f)) = &self.progress {
                ui.add(
                    egui::ProgressBar::new(*f)
                        .text(what.as_str())
                        .desired_width(320.0),
                );
                if ui.button("Cancel").clicked()
                    && let Some(job) = &self.job
                {
                    job.cancel.cancel();
                }
            }
        });
        if let Some(m) = &self.message {
            ui.label(m);
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        ui.separator();
        if shared.settings.adapters.is_empty() {
            ui.weak("No adapters yet: train one in the Train tab, or add a PEFT folder.");
            return;
        }
        let names = super::adapter_names(&shared.settings.adapters);
        self.refresh(&shared.settings.adapters);
        let mut remove = None;
        egui::ScrollArea::vertical().show(ui, |ui| {
            for (i, dir) in shared.settings.adapters.clone().iter().enumerate() {
                let info = self.infos[i].1.clone();
                ui.group(|ui| {
                    ui.set_width(ui.available_width());
                    ui.horizontal(|ui| {
                        ui.strong(&names[i]);
                        ui.weak(dir.display().to_string());
                    });
                    if let Some(p) = &info.problem {
                        ui.colored_label(ui.visuals().error_fg_color, p);
                    } else {
                        super::facts(ui, ("adapter", i), |row| {
                            for (k, v) in [
                                ("Kind", &info.kind),
                                ("Base model", &info.base_model),
                                ("LoRA", &info.lora),
                                ("Trained on", &info.data),
                                ("Steps", &info.steps),
                                ("Final loss", &info.final_loss),
                                ("Scores", &info.scores),
                            ] {
                                row(k, v.clone());
                            }
                        });
                    }
                    ui.horizontal(|ui| {
                        let ok = info.problem.is_none() && !self.busy();
                        if ui.add_enabled(ok, egui::Button::new("Export PEFT…")).clicked()
                            && let Some(to) = rfd::FileDialog::new().pick_folder()
                        {
                            self.export_peft(dir, &to);
                        }
                        if ui
                            .add_enabled(
                                ok && !info.regression,
                                egui::Button::new("Export merged model…"),
                            )
                            .on_hover_text("The loaded model with this adapter folded in: name the file .gguf for GGUF, anything else for an HF folder")
                            .clicked()
                            && let Some(out) = rfd::FileDialog::new()
                                .set_file_name(format!("{}-merged.gguf", names[i]))
                                .save_file()
                        {
                            self.export_merged(ui.ctx(), shared, dir.clone(), out);
                        }
                        if ui.button("Remove from list").clicked() {
                            remove = Some((i, false));
                        }
                        if self.confirm_delete == Some(i) {
                            ui.colored_label(
                                ui.visuals().warn_fg_color,
                                "Delete the folder and everything in it?",
                            );
                            if ui.button("Yes, delete").clicked() {
                                remove = Some((i, true));
                            }
                            if ui.button("Keep it").clicked() {
                                self.confirm_delete = None;
                            }
                        } else if ui.button("Delete…").clicked() {
                            self.confirm_delete = Some(i);
                        }
                    });
                });
            }
        });
        if let Some((i, delete)) = remove {
            self.confirm_delete = None;
            let dir = shared.settings.adapters[i].clone();
            if delete && let Err(e) = std::fs::remove_dir_all(&dir) {
                self.error = Some(format!("Could not delete {}: {e}", dir.display()));
                return;
            }
            shared.settings.adapters.remove(i);
            self.message = Some(format!(
                "{} {}",
                if delete {
                    "Deleted"
                } else {
                    "Removed from the list:"
                },
                dir.display()
            ));
        }
    }
}
