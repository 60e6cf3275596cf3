//! Regression adapters on the tiny model: training on code/number pairs teaches the number
//! tokens (the adapter overfits four programs whose values span four decades and predicts them
//! back by constrained sampling); the adapter's files round-trip; `merge` refuses one; and
//! `measure` runs MBTSP solutions on scaled inputs and times every layout of the kernels.

use burn::backend::Autodiff;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::eval::{Completion, Harness, Limits, load_suite};
use codelsi_engine::regress::measure::{
    self, LATENCY, MEMORY_FLOOR_KB, MeasureSettings, PEAK_MEMORY,
};
use codelsi_engine::regress::{
    self, Example, PredictSettings, Prediction, RegressionSpec, Regressor, number, stats,
};
use codelsi_engine::train::{Activations, Decay, TrainConfig, TrainEvent, TrainJob, train};
use codelsi_tests::{B, fixtures, tiny_q8};

type AD = Autodiff<B>;

/// The kernel sweep keeps both cores busy; the measure test times programs. Run apart, so the
/// test checks the measuring, not the scheduler.
static CPU_BOUND: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("codelsi-regress-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(steps: usize) -> TrainConfig {
    let mut c = TrainConfig {
        lr: 1e-2,
        epochs: 1000,
        max_steps: Some(steps),
        batch: 1,
        warmup_frac: 0.05,
        decay: Decay::Cosine,
        seed: 3,
        eval_every: 0,
        checkpoint_every: 0,
        activations: Activations::F32,
        ..TrainConfig::default()
    };
    c.lora.rank = 4;
    c.lora.alpha = 8.0;
    c.lora.dropout = 0.0;
    c
}

/// Four programs, two metrics each, the first spanning four decades.
fn examples() -> Vec<Example> {
    let programs = [
        ("for (let i = 0; i < 10; i++) sum += i;", 0.012, 4.5e4),
        ("const xs = make(1000); xs.sort();", 3.4, 5.2e4),
        ("while (queue.length) visit(queue.pop());", 27.0, 9.9e4),
        (
            "for (const a of all) for (const b of all) pair(a, b);",
            180.0,
            2.6e5,
        ),
    ];
    programs
        .iter()
        .enumerate()
        .map(|(i, (code, ms, kb))| Example {
            code: code.to_string(),
            metrics: [("latency_ms".into(), *ms), ("peak_kb".into(), *kb)].into(),
            group: Some(format!("p{i}")),
        })
        .collect()
}

#[test]
fn learns_and_predicts_numbers() {
    let loaded = tiny_q8::<AD>();
    let model = &loaded.model;
    let spec = RegressionSpec::new(
        vec!["latency_ms".into(), "peak_kb".into()],
        200,
        model.config.vocab_size,
    );
    let data = examples();
    let (rows, missing) = spec
        .rows(&data, &loaded.tokenizer)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(missing, 0);
    // Every label is a number token, in the grammar's order.
    let vocab = model.config.vocab_size as u32;
    let labels: Vec<usize> = rows
        .iter()
        .flat_map(|r| r.labels.iter().flatten())
        .map(|&l| (l - vocab) as usize)
        .collect();
    assert_eq!(labels.len(), data.len() * 2 * number::TOKENS_PER_NUMBER);
    for (i, &l) in labels.iter().enumerate() {
        assert_eq!(number::Class::of(l), number::class_at(i));
    }

    let out = temp("train");
    let objective =
        regress::NumberObjective::new(model, &loaded.tokenizer).unwrap_or_else(|e| panic!("{e}"));
    let mut losses = vec![];
    let summary = train(
        TrainJob {
            model,
            frozen: &[],
            train: &rows,
            val: &rows[..1],
            config: &config(80),
            out: &out,
            base_model: "tiny_llama",
            run: codelsi_engine::train::meta::RunInfo {
                regression: Some(serde_json::to_value(&spec).unwrap_or_else(|e| panic!("{e}"))),
                ..Default::default()
            },
            resume: false,
            objective: Some(&objective),
            init: None,
        },
        &CancelToken::new(),
        &mut |e| {
            if let TrainEvent::Step { loss, .. } = e {
                losses.push(loss);
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!(
        "regression losses: {:?}",
        losses.iter().step_by(10).collect::<Vec<_>>()
    );
    assert!(!summary.cancelled);
    assert!(last < first / 5.0, "number-token loss {first} → {last}");

    // The adapter on disk: LoRA pairs and number-token rows, and its spec.
    let plain = tiny_q8::<B>();
    let regressor = Regressor::<B>::load(&out, &plain.model).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(regressor.spec, spec);
    let new = regressor
        .adapter
        .new_tokens
        .as_ref()
        .unwrap_or_else(|| panic!("no number tokens"));
    assert_eq!(
        new.head.dims(),
        [number::NUM_TOKENS, plain.model.config.hidden_size]
    );

    let codes: Vec<String> = data.iter().map(|e| e.code.clone()).collect();
    let settings = PredictSettings {
        samples: 16,
        temperature: 1.0,
        seed: 1,
        share_prefix: true,
    };
    let preds = regressor
        .predict(
            &plain.model,
            &plain.tokenizer,
            &codes,
            settings,
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("cancelled"));
    let medians: Vec<f64> = preds.iter().map(|p| p[0].median).collect();
    let truth: Vec<f64> = data.iter().map(|e| e.metrics["latency_ms"]).collect();
    eprintln!("latency medians {medians:?} (truth {truth:?})");
    for p in &preds {
        assert_eq!(p.len(), 2);
        for m in p {
            assert_eq!(m.samples.len(), 16);
            assert!(m.low <= m.median && m.median <= m.high);
            let mean_log = m
                .samples
                .iter()
                .map(|&v| stats::log10_floor(v))
                .sum::<f64>()
                / 16.0;
            assert!((m.geomean.log10() - mean_log).abs() < 1e-9, "{m:?}");
        }
    }
    // Programs at two sizes: the second of each pair starts from the first's prompt cache,
    // and draws what it draws when its prompt runs whole.
    let sized: Vec<String> = codes[..3]
        .iter()
        .flat_map(|c| {
            [
                format!("{c}\nconst SCALE = 1;"),
                format!("{c}\nconst SCALE = 1000;"),
            ]
        })
        .collect();
    let draw = |share_prefix| {
        regressor
            .predict(
                &plain.model,
                &plain.tokenizer,
                &sized,
                PredictSettings {
                    share_prefix,
                    ..settings
                },
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("cancelled"))
    };
    let (shared, whole) = (draw(true), draw(false));
    let samples = |p: &[Vec<Prediction>]| -> Vec<f64> {
        p.iter()
            .flatten()
            .flat_map(|m| m.samples.iter().copied())
            .collect()
    };
    let (a, b) = (samples(&shared), samples(&whole));
    assert_eq!(a.len(), 6 * 2 * 16);
    // Rounding can move a draw that falls on a boundary; the rest are the same values.
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(differ <= 2, "{differ} of {} samples differ", a.len());

    let geomeans: Vec<f64> = preds.iter().map(|p| p[0].geomean).collect();
    assert!(stats::spearman(&geomeans, &truth) > 0.99, "{geomeans:?}");
    let expected: Vec<f64> = preds.iter().map(|p| p[0].expected).collect();
    assert!(stats::spearman(&expected, &truth) > 0.99, "{expected:?}");

    // The expected exponent takes most of the sampling noise out of the geometric mean: drawn
    // hot (so that the exponent varies), four samples at a time, under several seeds.
    let (mut gm, mut ex) = (vec![], vec![]);
    for seed in 0..12 {
        let p = regressor
            .predict(
                &plain.model,
                &plain.tokenizer,
                &codes[..1],
                PredictSettings {
                    samples: 4,
                    temperature: 4.0,
                    seed,
                    share_prefix: true,
                },
                &CancelToken::new(),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("cancelled"));
        gm.push(p[0][0].geomean.log10());
        ex.push(p[0][0].expected.log10());
    }
    let var = |x: &[f64]| {
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64
    };
    eprintln!("spread over seeds: geomean {gm:?}, expected {ex:?}");
    assert!(var(&gm) > 0.05, "the hot draws did not vary: {gm:?}");
    assert!(var(&ex) < var(&gm) / 4.0, "geomean {gm:?}, expected {ex:?}");
    assert!(stats::spearman(&medians, &truth) > 0.99, "{medians:?}");
    assert!(stats::mae_log10(&medians, &truth) < 0.3, "{medians:?}");

    // A regression adapter has no place in a merged model.
    let merged = temp("merged");
    let err = codelsi_engine::merge::merge(
        &fixtures().join("tiny_llama"),
        std::slice::from_ref(&out),
        &merged,
        codelsi_engine::merge::MergeFormat::HfF16,
        &CancelToken::new(),
        &mut |_, _| {},
    );
    assert!(err.is_err_and(|e| e.to_string().contains("regression adapter")));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn mean_index_is_the_softmax_mean() {
    let expected_index =
        |logits: &[f32], t: f32| regress::mean_index(&regress::softmax_weights(logits, t));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(close(expected_index(&[0.0, 0.0], 1.0), 0.5));
    // Weights 1 : 3.
    assert!(close(expected_index(&[0.0, 3f32.ln()], 1.0), 0.75));
    // Hotter flattens towards the middle; colder picks the likeliest.
    let hot = expected_index(&[0.0, 0.0, 5.0], 100.0);
    assert!((hot - 1.0).abs() < 0.05, "{hot}");
    let cold = expected_index(&[0.0, 0.0, 5.0], 0.01);
    assert!(close(cold, 2.0), "{cold}");
}

#[test]
fn data_files_and_held_out_split() {
    let dir = temp("data");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let csv = dir.join("bench.csv");
    std::fs::write(
        &csv,
        "code,group,latency_ms,peak_kb\n\"a(1)\",g1,1.5,100\n\"b(2), with a comma\",g2,,200\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ex = regress::read_examples(&csv).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[1].code, "b(2), with a comma");
    assert!(!ex[1].metrics.contains_key("latency_ms"));
    assert_eq!(ex[1].metrics["peak_kb"], 200.0);
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "code,latency_ms\nx,fast\n").unwrap_or_else(|e| panic!("{e}"));
    let e = regress::read_examples(&bad)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`fast` is not a number"), "{e}");
    let jsonl = dir.join("m.jsonl");
    std::fs::write(
        &jsonl,
        "{\"code\": \"x\", \"latency_ms\": 3, \"task_id\": \"T/1\"}\n{\"code\": 5}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let e = regress::read_examples(&jsonl)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("code"), "{e}");

    // 40 examples in 10 groups: whole groups go to one side.
    let many: Vec<Example> = (0..40)
        .map(|i| Example {
            code: format!("f({i})"),
            metrics: [("m".into(), i as f64)].into(),
            group: Some(format!("g{}", i % 10)),
        })
        .collect();
    let (train, val) = regress::split_by_group(many, 0.2, 9);
    assert_eq!((train.len(), val.len()), (32, 8));
    for v in &val {
        assert!(train.iter().all(|t| t.group != v.group));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn measures_solutions_on_scaled_inputs() {
    let _apart = CPU_BOUND.lock().unwrap_or_else(|e| e.into_inner());
    let _turn = codelsi_tests::sandbox_turn();
    let problems = load_suite("mbpp-ts").unwrap_or_else(|e| panic!("{e}"));
    // MBTSP/514: the sum of a list, one pass over it.
    let picked: Vec<_> = problems
        .into_iter()
        .filter(|p| p.task_id == "MBTSP/514")
        .collect();
    assert_eq!(picked.len(), 1);
    let (workloads, skipped) = measure::workloads(&picked, None);
    assert!(skipped.is_empty());
    assert_eq!(workloads.len(), 1);
    // Model samples come as completions of the prompt, one workload each.
    let body = picked[0].canonical_solution.clone().unwrap_or_default();
    let samples = [Completion {
        task_id: "MBTSP/514".into(),
        completion: body,
    }];
    let (from_samples, _) = measure::workloads(&picked, Some(&samples));
    assert_eq!(from_samples.len(), 1);
    assert_eq!(from_samples[0].source, "sample 0");
    assert_eq!(from_samples[0].solution, workloads[0].solution);
    let mut broken = workloads[0].clone();
    broken.source = "broken".into();
    broken.solution = format!("{}\n  throw new Error('no');\n}}\n", picked[0].prompt);
    let all = [workloads[0].clone(), broken];
    let settings = MeasureSettings {
        scales: vec![1, 10000],
        min_ms: 5.0,
        limits: Limits::default(),
    };
    let harness = Harness::new(settings.limits, 0, false, &mut |s| eprintln!("{s}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (examples, dropped) =
        measure::measure(&all, &settings, &harness, &CancelToken::new(), &mut |_| {})
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("cancelled"));
    assert_eq!(examples.len(), 2, "dropped: {dropped:?}");
    assert_eq!(dropped.len(), 2);
    assert!(
        dropped
            .iter()
            .all(|d| d.source == "broken" && d.why.contains("no"))
    );
    for e in &examples {
        assert!(e.code.contains("const SCALE = ") && e.code.contains("sum_elements("));
        assert!(
            e.metrics[LATENCY] > 0.0 && e.metrics[PEAK_MEMORY] >= MEMORY_FLOOR_KB,
            "{e:?}"
        );
        assert_eq!(e.group.as_deref(), Some("MBTSP/514"));
    }
    // Ten thousand times the input: a linear scan takes longer by far (not a speed target:
    // the ratio is thousands, timer noise is not).
    let (small, big) = (examples[0].metrics[LATENCY], examples[1].metrics[LATENCY]);
    assert!(
        big > 10.0 * small,
        "scale 1: {small} ms, scale 10000: {big} ms"
    );
    // And it holds more memory of its own: node's footprint, the same in both, is left out.
    let (small, big) = (
        examples[0].metrics[PEAK_MEMORY],
        examples[1].metrics[PEAK_MEMORY],
    );
    assert!(
        big > 1000.0 && big > 10.0 * small,
        "scale 1: {small} KB, scale 10000: {big} KB"
    );
}

/// `measure --suite kernels`: every layout of the quantised matmul runs, is checked against the
/// reference product, and is timed; cases group by problem and the engine's own layout is
/// among them; a cancelled sweep returns nothing.
#[test]
fn sweeps_kernel_layouts() {
    let _apart = CPU_BOUND.lock().unwrap_or_else(|e| e.into_inner());
    use codelsi_engine::kernels::qmatmul::QShape;
    use codelsi_engine::kernels::sweep::{self, SweepSettings};
    use codelsi_engine::quant::QFormat;

    let device = codelsi_tests::device();
    let settings = SweepSettings {
        formats: vec![QFormat::Q4_1],
        shapes: vec![[96, 64]],
        rows: vec![1, 9],
        min_secs: 0.0,
    };
    let cases = sweep::cases(&settings).unwrap();
    assert_eq!(cases.len(), 2 * sweep::plans().len());
    let mut seen = 0;
    let timed = sweep::sweep(
        &device,
        &cases,
        0.0,
        &CancelToken::new(),
        &mut |done, total| {
            assert_eq!(total, cases.len());
            seen = done;
        },
    )
    .unwrap()
    .expect("not cancelled");
    assert_eq!(seen, cases.len());
    assert!(timed.iter().all(|t| t.ms > 0.0 && t.ms.is_finite()));
    let best = sweep::best_per_problem(&timed, QShape::for_adapter());
    assert_eq!(best.len(), 2);
    for b in &best {
        let ours = b.ours_ms.expect("the engine's layout is timed");
        assert!(b.best_ms <= ours);
    }
    assert_eq!(best[1].problem, "Q4_1 m=9 n=96 k=64");

    let cancel = CancelToken::new();
    cancel.cancel();
    let none = sweep::sweep(&device, &cases, 0.0, &cancel, &mut |_, _| {}).unwrap();
    assert!(none.is_none());
}
