//! The Data panel: a repository (or an instruction file) into a training dataset with live
//! progress and cancel; the import's report; browse and search the pairs and exclude some.

use std::path::{Path, PathBuf};

use codelsi_engine::dataset::{DatasetDir, Excluded, Split};
use codelsi_engine::import::{
    ImportEvent, ImportOptions, ImportReport, import_records, import_repo,
};
use codelsi_engine::io::tokenizer::Tokenizer;
use eframe::egui;
use serde_json::Value;

use super::Shared;
use super::jobs::{Job, drain};

enum Msg {
    Progress(String, f32),
    Done(Box<Dataset>),
    Failed(String),
}

/// One training pair as the panel shows it; `record` is the line as written.
#[derive(Debug, Clone)]
pub struct PairView {
    pub split: Split,
    pub record: Value,
    pub title: String,
    pub prompt: String,
    pub output: String,
    pub excluded: bool,
}

impl PairView {
    fn new(split: Split, record: Value, excluded: bool) -> Self {
        let s = |k: &str| record.get(k).and_then(Value::as_str).unwrap_or_default();
        let (prompt, output) = match record.get("messages").and_then(Value::as_array) {
            Some(msgs) => {
                let by = |role: &str| {
                    msgs.iter()
                        .filter(|m| m.get("role").and_then(Value::as_str) == Some(role))
                        .filter_map(|m| m.get("content").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n\n")
                };
                (by("user"), by("assistant"))
            }
            None => {
                let input = s("input");
                let prompt = if input.trim().is_empty() {
                    s("instruction").to_string()
                } else {
                    format!("{}\n\n{input}", s("instruction"))
                };
                (prompt, s("output").to_string())
            }
        };
        let src = record.get("source");
        let place = match (
            src.and_then(|v| v.get("path")).and_then(Value::as_str),
            src.and_then(|v| v.get("line")).and_then(Value::as_u64),
        ) {
            (Some(p), Some(l)) => format!("{p}:{l}"),
            _ => String::new(),
        };
        let kind = s("kind");
        let first = prompt.lines().next().unwrap_or_default();
        let title = [kind, &place, first]
            .iter()
            .filter(|t| !t.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("  ");
        Self {
            split,
            title,
            prompt,
            output,
            record,
            excluded,
        }
    }

    fn matches(&self, needle: &str) -> bool {
        needle.is_empty()
            || self.title.to_lowercase().contains(needle)
            || self.prompt.to_lowercase().contains(needle)
            || self.output.to_lowercase().contains(needle)
    }
}

/// A dataset folder as `codelsi import` writes it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub report: Option<ImportReport>,
    pub pairs: Vec<PairView>,
    /// Exclusions changed since the last save.
    pub dirty: bool,
}

impl Dataset {
    /// Read the dataset in `dir`: its pairs, earlier exclusions and report.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let folder = DatasetDir::open(dir).map_err(|e| e.to_string())?;
        let mut pairs = Vec::new();
        for split in [Split::Train, Split::Val] {
            for v in folder.records(split).map_err(|e| e.to_string())? {
                pairs.push(PairView::new(split, v, false));
            }
        }
        for e in folder.excluded().map_err(|e| e.to_string())? {
            pairs.push(PairView::new(e.split, e.record, true));
        }
        let report = std::fs::read(folder.report())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self {
            dir: dir.to_path_buf(),
            report,
            pairs,
            dirty: false,
        })
    }

    /// Write the kept pairs back to their split files and the excluded ones to
    /// `excluded.jsonl` (with their split, so they can be restored).
    pub fn save(&mut self) -> Result<(), String> {
        let (mut train, mut val, mut excluded) = (vec![], vec![], vec![]);
        for p in &self.pairs {
            match (p.excluded, p.split) {
                (false, Split::Train) => train.push(p.record.clone()),
                (false, Split::Val) => val.push(p.record.clone()),
                (true, split) => excluded.push(Excluded {
                    split,
                    record: p.record.clone(),
                }),
            }
        }
        DatasetDir::new(&self.dir)
            .save(&train, &val, &excluded)
            .map_err(|e| format!("could not save: {e}"))?;
        self.dirty = false;
        Ok(())
    }

    pub fn excluded(&self) -> usize {
        self.pairs.iter().filter(|p| p.excluded).count()
    }
}

#[derive(Default)]
pub struct DataPanel {
    /// Where the next import writes (a folder under the workspace by default).
    pub out: String,
    /// Replace a dataset already in `out`.
    pub replace: bool,
    pub dataset: Option<Dataset>,
    pub search: String,
    pub selected: Option<usize>,
    job: Option<Job<Msg>>,
    progress: Option<(String, f32)>,
    pub error: Option<String>,
}

impl DataPanel {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        let (progress, error) = (&mut self.progress, &mut self.error);
        let (dataset, selected) = (&mut self.dataset, &mut self.selected);
        let ended = drain(&mut self.job, |msg| match msg {
            Msg::Progress(what, f) => *progress = Some((what, f)),
            Msg::Done(d) => {
                shared.settings.remember_dataset(&d.dir);
                *dataset = Some(*d);
                *selected = None;
            }
            Msg::Failed(e) => *error = Some(e),
        });
        if ended {
            self.progress = None;
        }
    }

    /// Import `source` (a repository folder, or an instruction file) into the output folder.
    pub fn import(&mut self, ctx: &egui::Context, shared: &Shared, source: PathBuf) {
        let Some(model) = &shared.model else {
            self.error =
                Some("Load a model first (Model tab): its tokenizer measures the pairs.".into());
            return;
        };
        let tokenizer: Tokenizer = model.tokenizer().clone();
        let out = if self.out.trim().is_empty() {
            let name = source
                .file_stem()
                .map_or("dataset".into(), |n| n.to_string_lossy().into_owned());
            shared.settings.workspace().join("datasets").join(name)
        } else {
            PathBuf::from(self.out.trim())
        };
        self.out = out.display().to_string();
        let opts = ImportOptions {
            force: self.replace,
            ..ImportOptions::default()
        };
        self.error = None;
        self.progress = Some((format!("Reading {}…", source.display()), 0.0));
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            let mut progress = |e: ImportEvent| {
                let (what, f) = match e {
                    ImportEvent::Walking { seen } => (format!("Listing files: {seen}"), 0.0),
                    ImportEvent::Parsing { done, total, .. } => (
                        format!("Parsing files: {done}/{total}"),
                        0.7 * done as f32 / total.max(1) as f32,
                    ),
                    ImportEvent::Pairing { done, total } => (
                        format!("Building pairs: {done}/{total}"),
                        0.7 + 0.25 * done as f32 / total.max(1) as f32,
                    ),
                    ImportEvent::Writing => ("Writing the dataset…".into(), 0.97),
                };
                tx.send(Msg::Progress(what, f));
            };
            let result = if source.is_dir() {
                import_repo(&source, &out, &tokenizer, &opts, cancel, &mut progress)
            } else {
                import_records(&source, &out, &tokenizer, &opts, cancel, &mut progress)
            };
            tx.send(match result {
                Ok(_) => match Dataset::open(&out) {
                    Ok(d) => Msg::Done(Box::new(d)),
                    Err(e) => Msg::Failed(e),
                },
                Err(codelsi_engine::Error::Cancelled) => {
                    Msg::Failed("Import cancelled; nothing was written.".into())
                }
                Err(e) => Msg::Failed(e.to_string()),
            });
        }));
    }

    /// Open a dataset folder written earlier.
    pub fn open(&mut self, shared: &mut Shared, dir: &Path) {
        match Dataset::open(dir) {
            Ok(d) => {
                shared.settings.remember_dataset(dir);
                self.dataset = Some(d);
                self.selected = None;
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Data");
        ui.label(
            "Turn a repository into training pairs (functions from their comments, bodies \
             from signatures, and more). Secrets are found and left out; nothing leaves this \
             machine.",
        );
        ui.add_space(6.0);
        let idle = !self.busy();
        ui.horizontal(|ui| {
            if ui
                .add_enabled(idle, egui::Button::new("Import a repository folder…"))
                .clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                self.import(ui.ctx(), shared, dir);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Import an instruction file…"))
                .on_hover_text(
                    "Alpaca JSON/JSONL, chat JSONL, or problems with prompt and canonical_solution",
                )
                .clicked()
                && let Some(f) = rfd::FileDialog::new()
                    .add_filter("Instructions", &["jsonl", "json"])
                    .pick_file()
            {
                self.import(ui.ctx(), shared, f);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Open a dataset…"))
                .clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                self.open(shared, &dir);
            }
        });
        ui.horizontal(|ui| {
            ui.label("Save to:");
            ui.add(
                egui::TextEdit::singleline(&mut self.out)
                    .hint_text("a folder under datasets/ in the workspace, named after the source")
                    .desired_width(420.0),
            );
            ui.checkbox(&mut self.replace, "Replace a dataset already there");
        });
        if let Some((what, f)) = &self.progress {
            ui.horizontal(|ui| {
                ui.add(
                    egui::ProgressBar::new(*f)
                        .text(what.as_str())
                        .animate(true)
                        .desired_width(420.0),
                );
                if ui.button("Cancel").clicked()
                    && let Some(job) = &self.job
                {
                    job.cancel.cancel();
                }
            });
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if self.dataset.is_none() && !shared.settings.datasets.is_empty() {
            ui.add_space(6.0);
            ui.label("Recent datasets:");
            let mut pick = None;
            for d in &shared.settings.datasets {
                if ui.link(d.display().to_string()).clicked() {
                    pick = Some(d.clone());
                }
            }
            if let Some(d) = pick {
                self.open(shared, &d);
            }
        }
        ui.separator();
        let Some(ds) = &mut self.dataset else {
            ui.weak("No dataset open.");
            return;
        };
        ui.horizontal(|ui| {
            ui.strong(ds.dir.display().to_string());
            if ui.small_button("Train on it").clicked() {
                shared.settings.train_data = Some(ds.dir.clone());
                shared.settings.tab = super::Tab::Train;
            }
        });
        if let Some(r) = &ds.report {
            egui::CollapsingHeader::new("Report")
                .default_open(true)
                .show(ui, |ui| report_grid(ui, r));
        }
        browse(
            ui,
            ds,
            &mut self.search,
            &mut self.selected,
            &mut self.error,
        );
    }
}

fn counts(m: &std::collections::BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        "none".into()
    } else {
        m.iter()
            .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn report_grid(ui: &mut egui::Ui, r: &ImportReport) {
    super::facts(ui, "import-report", |row| {
        let f = &r.files;
        if r.source == "repository" {
            row(
                "Files",
                format!(
                    "{} seen, {} parsed ({:.0} kB), {} gave pairs",
                    f.seen,
                    f.parsed,
                    r.bytes_parsed as f64 / 1e3,
                    f.with_pairs
                ),
            );
            row("Skipped, by reason", counts(&f.skipped));
        }
        row("Secrets left out, by kind", counts(&r.secrets));
        row(
            "Pairs kept",
            format!(
                "{} for training, {} for validation (of {} extracted)",
                r.pairs.train, r.pairs.val, r.pairs.extracted
            ),
        );
        row("Pairs by kind", counts(&r.pairs.by_kind));
        row("Pairs by language", counts(&r.pairs.by_lang));
        row("Pairs dropped, by reason", counts(&r.pairs.dropped));
        row(
            "Tokens",
            format!("{} training, {} validation", r.tokens.train, r.tokens.val),
        );
    });
}

/// Search the pairs, tick the ones to leave out, and look at one.
fn browse(
    ui: &mut egui::Ui,
    ds: &mut Dataset,
    search: &mut String,
    selected: &mut Option<usize>,
    error: &mut Option<String>,
) {
    ui.horizontal(|ui| {
        ui.label("Search:");
        ui.add(egui::TextEdit::singleline(search).desired_width(240.0));
        ui.label(format!(
            "{} pairs, {} excluded",
            ds.pairs.len(),
            ds.excluded()
        ));
        if ui
            .add_enabled(ds.dirty, egui::Button::new("Save exclusions"))
            .on_hover_text("Excluded pairs move to excluded.jsonl, so they can be restored")
            .clicked()
            && let Err(e) = ds.save()
        {
            *error = Some(e);
        }
    });
    let needle = search.to_lowercase();
    let shown: Vec<usize> = (0..ds.pairs.len())
        .filter(|&i| ds.pairs[i].matches(&needle))
        .collect();
    ui.columns(2, |cols| {
        let row_h = cols[0].spacing().interact_size.y;
        egui::ScrollArea::vertical().id_salt("pairs").show_rows(
            &mut cols[0],
            row_h,
            shown.len(),
            |ui, range| {
                for &i in &shown[range] {
                    let p = &mut ds.pairs[i];
                    ui.horizontal(|ui| {
                        let mut keep = !p.excluded;
                        if ui
                            .checkbox(&mut keep, "")
                            .on_hover_text("Untick to leave this pair out of training")
                            .changed()
                        {
                            p.excluded = !keep;
                            ds.dirty = true;
                        }
                        let label = format!("[{}] {}", p.split.name(), p.title);
                        if ui
                            .add(egui::Button::selectable(*selected == Some(i), label).truncate())
                            .clicked()
                        {
                            *selected = Some(i);
                        }
                    });
                }
            },
        );
        let ui = &mut cols[1];
        match selected.and_then(|i| ds.pairs.get(i)) {
            Some(p) => {
                // Code keeps its lines (a wrapping label drops their leading spaces).
                egui::ScrollArea::both().id_salt("pair").show(ui, |ui| {
                    let font = egui::TextStyle::Monospace.resolve(ui.style());
                    ui.strong("Prompt");
                    ui.add(
                        egui::Label::new(egui::RichText::new(&p.prompt).monospace())
                            .wrap_mode(egui::TextWrapMode::Extend),
                    );
                    ui.strong("Output");
                    ui.add(
                        egui::Label::new(super::highlight::layout(&p.output, ui.visuals(), font))
                            .wrap_mode(egui::TextWrapMode::Extend),
                    );
                });
            }
            None => {
                ui.weak("Select a pair to see it.");
            }
        }
    });
}
