//! The desktop app driven headless through egui_kittest on the tiny model: a bad path, load,
//! generate and Stop on wgpu; then, on the CPU path, the whole loop (import, exclude, estimate,
//! train, cancel, resume, evaluate, the adapter's card, export, a specialised stage, delete) and
//! the regression predictor on the Generate panel. Snapshot images are compared with
//! `app/tests/snapshots/` (refreshed with `UPDATE_SNAPSHOTS=1`).

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

    // Serve: switched on, it answers an OpenAI request with the loaded model and counts it;
    // switched off, it stops.
    h.get_by_label("Serve").click();
    h.run_steps(2);
    h.snapshot("serve_panel");
    h.state_mut().serve.port = 0;
    h.get_by_label("Start serving").click();
    step_until(&mut h, "the server", |a| a.serve.address().is_some());
    let address = h.state().serve.address().unwrap();
    let addr = address
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let body =
        r#"{"model": "tiny_llama", "prompt": "fn main() {", "max_tokens": 4, "temperature": 0}"#;
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"text_completion\""), "{reply}");
    h.run_steps(2);
    h.get_by_label_contains("1 requests");
    h.get_by_label("Stop serving").click();
    step_until(&mut h, "the server's stop", |a| !a.serve.serving());
    assert!(
        h.state().serve.error.is_none(),
        "{:?}",
        h.state().serve.error
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening"
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
            crate::cli::predict::short(p.median),
            crate::cli::predict::short(p.low),
            crate::cli::predict::short(p.high)
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
