//! The Evaluate panel: run a benchmark suite for the base model and each chosen adapter, with
//! progress; the pass@1 table; drill into a problem to see the completion and why it failed.

use std::path::PathBuf;
use std::time::Instant;

use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::eval::{
    self, EvalEvent, GenerateSettings, Harness, Limits, SampleResult, Status, Summary,
};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::models::llama::Adapters;
use eframe::egui;

use super::jobs::{Job, Tx, drain};
use super::{Shared, highlight, on_model};

/// The suites shipped with the app: (name for people, `load_suite` spec).
const SUITES: [(&str, &str); 2] = [
    ("HumanEval-TS (161 problems)", "humaneval-ts"),
    ("MBPP-TS (968 problems)", "mbpp-ts"),
];

/// File in an adapter's folder with its latest scores, by suite (the Adapters panel shows it).
pub const SCORES_FILE: &str = "codelsi_scores.json";

/// One model (base, or base + adapter) scored on the suite.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub name: String,
    pub summary: Summary,
    pub results: Vec<SampleResult>,
    pub generate_seconds: f64,
    pub run_seconds: f64,
}

enum Msg {
    Progress(String, f32),
    Done(Box<RunResult>),
    Failed(String),
}

/// What to run (kept between runs of the app).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EvalChoice {
    /// Index into [`SUITES`].
    pub suite: usize,
    /// First N problems (0: all).
    pub limit: usize,
    pub max_tokens: usize,
}

impl Default for EvalChoice {
    fn default() -> Self {
        Self {
            suite: 0,
            limit: 20,
            max_tokens: 256,
        }
    }
}

pub struct EvaluatePanel {
    pub with_base: bool,
    /// Per adapter in `settings.adapters`: include it.
    pub chosen: Vec<bool>,
    pub runs: Vec<RunResult>,
    /// (run, task) drilled into.
    pub selected: Option<(usize, usize)>,
    pub only_failures: bool,
    job: Option<Job<Msg>>,
    progress: Option<(String, f32)>,
    pub error: Option<String>,
}

impl Default for EvaluatePanel {
    fn default() -> Self {
        Self {
            with_base: true,
            chosen: Vec::new(),
            runs: Vec::new(),
            selected: None,
            only_failures: false,
            job: None,
            progress: None,
            error: None,
        }
    }
}

impl EvaluatePanel {
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    pub fn poll(&mut self) {
        let (progress, runs, error) = (&mut self.progress, &mut self.runs, &mut self.error);
        let ended = drain(&mut self.job, |msg| match msg {
            Msg::Progress(what, f) => *progress = Some((what, f)),
            Msg::Done(r) => runs.push(*r),
            Msg::Failed(e) => *error = Some(e),
        });
        if ended {
            self.progress = None;
        }
    }

    /// Score the chosen models on the suite, one after the other.
    pub fn start(&mut self, ctx: &egui::Context, shared: &Shared) {
        self.error = None;
        let Some(model) = shared.model.clone() else {
            self.error = Some("Load a model first (Model tab).".into());
            return;
        };
        let mut who: Vec<(String, Option<PathBuf>)> = Vec::new();
        if self.with_base {
            who.push(("base model".into(), None));
        }
        let names = super::adapter_names(&shared.settings.adapters);
        for (i, dir) in shared.settings.adapters.iter().enumerate() {
            if self.chosen.get(i).copied().unwrap_or(false) {
                who.push((names[i].clone(), Some(dir.clone())));
            }
        }
        if who.is_empty() {
            self.error = Some("Choose the base model or an adapter to evaluate.".into());
            return;
        }
        let choice = &shared.settings.eval;
        let (suite_label, suite) = SUITES[choice.suite.min(SUITES.len() - 1)];
        let request = Request {
            who,
            suite,
            limit: choice.limit,
            settings: GenerateSettings {
                max_tokens: choice.max_tokens.max(1),
                ..GenerateSettings::default()
            },
        };
        self.runs.clear();
        self.selected = None;
        self.progress = Some(("Preparing the sandbox…".into(), 0.0));
        self.job = Some(Job::spawn(ctx, Msg::Failed, move |tx, cancel| {
            let result = on_model!(&model, m => run(m, &request, tx, cancel));
            match result {
                Ok(()) => {}
                Err(codelsi_engine::Error::Cancelled) => {
                    tx.send(Msg::Failed("Evaluation cancelled.".into()));
                }
                Err(e) => {
                    tx.send(Msg::Failed(format!("{suite_label}: {e}")));
                }
            }
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Evaluate");
        ui.label(
            "Let the model write the functions of a benchmark and run their tests in a \
             sandbox (no network, limited time and memory). pass@1 is the share it gets right.",
        );
        ui.add_space(4.0);
        let idle = !self.busy();
        self.chosen.resize(shared.settings.adapters.len(), false);
        ui.add_enabled_ui(idle, |ui| {
            let choice = &mut shared.settings.eval;
            choice.suite = choice.suite.min(SUITES.len() - 1);
            ui.horizontal(|ui| {
                ui.label("Benchmark:");
                egui::ComboBox::from_id_salt("suite")
                    .selected_text(SUITES[choice.suite].0)
                    .show_ui(ui, |ui| {
                        for (i, (label, _)) in SUITES.iter().enumerate() {
                            ui.selectable_value(&mut choice.suite, i, *label);
                        }
                    });
                ui.label("First");
                ui.add(egui::DragValue::new(&mut choice.limit).range(0..=1000))
                    .on_hover_text("0: every problem");
                ui.label("problems; at most");
                ui.add(egui::DragValue::new(&mut choice.max_tokens).range(1..=2048));
                ui.label("tokens each");
            });
            ui.horizontal_wrapped(|ui| {
                ui.label("Models:");
                ui.checkbox(&mut self.with_base, "base model");
                let names = super::adapter_names(&shared.settings.adapters);
                for (on, n) in self.chosen.iter_mut().zip(&names) {
                    ui.checkbox(on, format!("+ {n}"));
                }
            });
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(idle && shared.model.is_some(), egui::Button::new("Run"))
                .clicked()
            {
                self.start(ui.ctx(), shared);
            }
            if ui.add_enabled(!idle, egui::Button::new("Cancel")).clicked()
                && let Some(job) = &self.job
            {
                job.cancel.cancel();
            }
            if let Some((what, f)) = &self.progress {
                ui.add(egui::ProgressBar::new(*f).text(what.as_str()).animate(true));
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if self.runs.is_empty() {
            return;
        }
        ui.separator();
        egui::Grid::new("scores")
            .num_columns(5)
            .striped(true)
            .show(ui, |ui| {
                for h in ["Model", "Passed", "pass@1", "Writing code", "Running tests"] {
                    ui.strong(h);
                }
                ui.end_row();
                for r in &self.runs {
                    ui.label(&r.name);
                    ui.label(format!("{}/{}", r.summary.passed, r.summary.total));
                    ui.label(format!("{:.1} %", 100.0 * r.summary.pass_at_1));
                    ui.label(format!("{:.0} s", r.generate_seconds));
                    ui.label(format!("{:.0} s", r.run_seconds));
                    ui.end_row();
                }
            });
        ui.separator();
        ui.checkbox(&mut self.only_failures, "Only problems that failed");
        self.drill(ui);
    }

    /// Problems on the left (one column per run), the chosen completion and its failure right.
    fn drill(&mut self, ui: &mut egui::Ui) {
        let runs = &self.runs;
        let selected = &mut self.selected;
        let only_failures = self.only_failures;
        ui.columns(2, |cols| {
            egui::ScrollArea::vertical()
                .id_salt("problems")
                .show(&mut cols[0], |ui| {
                    egui::Grid::new("problems").striped(true).show(ui, |ui| {
                        ui.strong("Problem");
                        for r in runs {
                            ui.strong(&r.name);
                        }
                        ui.end_row();
                        let Some(first) = runs.first() else { return };
                        for (t, res) in first.results.iter().enumerate() {
                            let statuses: Vec<Status> = runs
                                .iter()
                                .map(|r| r.results.get(t).map_or(Status::Crashed, |s| s.status))
                                .collect();
                            if only_failures && statuses.iter().all(|s| *s == Status::Passed) {
                                continue;
                            }
                            ui.label(&res.task_id);
                            for (k, s) in statuses.iter().enumerate() {
                                let text = if *s == Status::Passed {
                                    egui::RichText::new("passed")
                                        .color(egui::Color32::from_rgb(60, 160, 60))
                                } else {
                                    egui::RichText::new(format!("{s:?}").to_lowercase())
                                        .color(ui.visuals().error_fg_color)
                                };
                                if ui
                                    .selectable_label(*selected == Some((k, t)), text)
                                    .clicked()
                                {
                                    *selected = Some((k, t));
                                }
                            }
                            ui.end_row();
                        }
                    });
                });
            let ui = &mut cols[1];
            match selected.and_then(|(k, t)| runs.get(k).and_then(|r| r.results.get(t))) {
                Some(s) => {
                    // Code and stack traces keep their lines: scroll sideways instead of wrapping.
                    egui::ScrollArea::both().id_salt("sample").show(ui, |ui| {
                        ui.strong(format!("{}: {:?}", s.task_id, s.status));
                        ui.label("Completion (what the model wrote after the prompt):");
                        let font = egui::TextStyle::Monospace.resolve(ui.style());
                        let code = if s.completion.is_empty() {
                            "(nothing)".to_string()
                        } else {
                            s.completion.clone()
                        };
                        ui.add(
                            egui::Label::new(highlight::layout(&code, ui.visuals(), font))
                                .wrap_mode(egui::TextWrapMode::Extend),
                        );
                        if s.status != Status::Passed {
                            ui.label("Why it failed:");
                            ui.add(
                                egui::Label::new(
                                    egui::RichText::new(&s.stderr_tail)
                                        .monospace()
                                        .color(ui.visuals().error_fg_color),
                                )
                                .wrap_mode(egui::TextWrapMode::Extend),
                            );
                        }
                    });
                }
                None => {
                    ui.weak("Click a result to see the code and why it failed.");
                }
            }
        });
    }
}

/// Keep the adapter's latest score on `suite` in its folder, for the Adapters panel.
fn record_score(
    dir: &std::path::Path,
    suite: &str,
    s: &Summary,
    problems: usize,
) -> std::io::Result<()> {
    let path = dir.join(SCORES_FILE);
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    all.insert(
        suite.into(),
        serde_json::json!({
            "pass_at_1": s.pass_at_1,
            "passed": s.passed,
            "total": s.total,
            "problems": problems,
        }),
    );
    std::fs::write(path, serde_json::to_vec_pretty(&all)?)
}

/// What one click of "Run" asks for, taken from the panel when it starts.
struct Request {
    /// (name for people, adapter folder; `None` is the base model), in the order they run.
    who: Vec<(String, Option<PathBuf>)>,
    suite: &'static str,
    /// Only the first this many problems (0: all).
    limit: usize,
    settings: GenerateSettings,
}

/// Score each of `r.who` on the suite, one after the other, reporting to the panel.
fn run<B: KernelBackend>(
    model: &LoadedModel<B>,
    r: &Request,
    tx: &Tx<Msg>,
    cancel: &CancelToken,
) -> codelsi_engine::Result<()> {
    let Request {
        who,
        suite,
        limit,
        settings,
    } = r;
    let mut problems = eval::load_suite(suite)?;
    if *limit > 0 {
        problems.truncate(*limit);
    }
    // The app never runs programs unsandboxed: where no sandbox can be set up, the
    // error says how to get one (or to use the CLI's --unsafe-no-sandbox).
    let harness = Harness::new(Limits::default(), 0, false, &mut |s| {
        tx.send(Msg::Progress(s.to_string(), 0.0));
    })?;
    let runs = who.len() as f32;
    for (k, (name, dir)) in who.iter().enumerate() {
        let adapter = match dir {
            Some(d) => Some(Adapter::<B>::load_peft(
                d,
                &model.model.config,
                model.model.device(),
            )?),
            None => None,
        };
        let list: Vec<&Adapter<B>> = adapter.iter().collect();
        let total = problems.len();
        let mut done = 0;
        // The first completions end after the first batch's prefill: say what runs.
        tx.send(Msg::Progress(
            format!("{name}: writing code 0/{total}"),
            k as f32 / runs,
        ));
        let start = Instant::now();
        let completions = eval::generate_completions(
            &model.model,
            Adapters {
                list: &list,
                train: None,
            },
            &model.tokenizer,
            &problems,
            settings,
            cancel,
            &mut || {
                done += 1;
                tx.send(Msg::Progress(
                    format!("{name}: writing code {done}/{total}"),
                    (k as f32 + 0.8 * done as f32 / total as f32) / runs,
                ));
            },
        )?;
        let generate_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let results = eval::score(&problems, &completions, &harness, cancel, &mut |e| {
            if let EvalEvent::Ran {
                done,
                total,
                passed,
            } = e
            {
                tx.send(Msg::Progress(
                    format!("{name}: running tests {done}/{total}, {passed} passed"),
                    (k as f32 + 0.8 + 0.2 * done as f32 / total as f32) / runs,
                ));
            }
        })?;
        let summary = eval::summarize(&results);
        if let Some(d) = dir {
            // A read-only adapter folder only loses the note on the Adapters panel; the
            // evaluation's result stands, so this is said and not raised.
            if let Err(e) = record_score(d, suite, &summary, total) {
                eprintln!(
                    "warning: could not record the score in {}: {e}",
                    d.join(SCORES_FILE).display()
                );
            }
        }
        tx.send(Msg::Done(Box::new(RunResult {
            name: name.clone(),
            summary,
            results,
            generate_seconds,
            run_seconds: start.elapsed().as_secs_f64(),
        })));
    }
    Ok(())
}
