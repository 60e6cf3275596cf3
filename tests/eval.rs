//! The evaluation harness: hostile programs are contained and scored as failures while the
//! harness goes on, and MBTSP's canonical solutions score as they should. A naive
//! `ts.transpileModule` + node run counts 772 of 967 as passing, but 396 of those are broken
//! solutions whose syntax error swallows the tests (transpileModule recovers into a program
//! that asserts nothing and exits 0); with the end-of-tests marker 376 pass.

use std::time::Duration;

use codelsi_engine::eval::sandbox::NetIsolation;
use codelsi_engine::eval::{self, Completion, Harness, Limits, Problem, Status, summarize};
use codelsi_engine::generate::CancelToken;

fn harness(limits: Limits, jobs: usize) -> Harness {
    Harness::new(limits, jobs, &mut |s| eprintln!("{s}")).unwrap_or_else(|e| panic!("{e}"))
}

fn problem(id: &str) -> Problem {
    Problem {
        task_id: id.into(),
        prompt: "const f = function (): number {\n".into(),
        test: "\nimport * as assert from 'assert'\nassert.deepEqual(f(), 1);\n".into(),
        entry_point: "f".into(),
        canonical_solution: None,
        language: Some("typescript".into()),
        stop_tokens: None,
    }
}

#[test]
fn hostile_programs_are_contained_and_fail() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let escape = std::env::temp_dir().join(format!("codelsi-escape-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&escape);
    let cases: Vec<(&str, String)> = vec![
        ("passes", "  return 1;\n}".into()),
        ("wrong", "  return 2;\n}".into()),
        // Leaves a block open: the tests land inside it, after the return, and never run.
        // transpileModule recovers from the syntax error, so node exits 0 having asserted
        // nothing; the end-of-tests marker is what catches it.
        ("swallows_tests", "  if (true) {\n    return 1;\n".into()),
        ("infinite_loop", "  while (true) {}\n}".into()),
        (
            "fork_bomb",
            "  const cp = require('child_process');\n  for (;;) { cp.spawn(process.execPath, ['-e', 'for(;;){}']); }\n}".into(),
        ),
        (
            "alloc_10gb",
            "  const b = Buffer.alloc(10 * 1024 ** 3, 1);\n  return b.length > 0 ? 1 : 0;\n}".into(),
        ),
        (
            "write_outside",
            format!(
                "  require('fs').writeFileSync({:?}, 'escaped');\n  return 1;\n}}",
                escape.display().to_string()
            ),
        ),
        (
            // Connects, then returns 1 only from the callback: a connection would pass.
            "network",
            format!(
                "  const net = require('net');\n  const s = net.connect({port}, '127.0.0.1');\n  s.on('connect', () => process.exit(0));\n  s.on('error', () => process.exit(3));\n  setTimeout(() => process.exit(4), 3000);\n  return 1;\n}}"
            ),
        ),
        (
            // Would pass, but keeps writing after its test (a loop that never yields is
            // the infinite loop's case: node buffers it and the CPU limit ends it).
            "output_flood",
            "  const big = 'x'.repeat(100000);\n  setInterval(() => console.log(big), 1);\n  return 1;\n}"
                .into(),
        ),
    ];
    let problems: Vec<Problem> = cases.iter().map(|(id, _)| problem(id)).collect();
    // The network case's test must not pass on its own: its `return 1` runs before any
    // callback, so it exits through the callbacks (0 only on a connection).
    let completions: Vec<Completion> = cases
        .iter()
        .map(|(id, c)| Completion {
            task_id: id.to_string(),
            completion: c.clone(),
        })
        .collect();
    let h = harness(
        Limits {
            cpu_secs: 2,
            wall: Duration::from_secs(6),
            memory_bytes: 2 << 30,
            output_bytes: 64 << 10,
        },
        2,
    );
    let results = eval::score(
        &problems,
        &completions,
        &h,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let status = |id: &str| {
        let r = results.iter().find(|r| r.task_id == id).unwrap();
        (r.status, r.stderr_tail.clone())
    };
    for r in &results {
        let last = r.stderr_tail.lines().last().unwrap_or_default();
        let last: String = last.chars().take(100).collect();
        eprintln!("{:<14} {:?} {last}", r.task_id, r.status);
    }
    assert_eq!(status("passes").0, Status::Passed, "{:?}", status("passes"));
    assert_eq!(status("wrong").0, Status::Failed);
    assert_eq!(
        status("swallows_tests").0,
        Status::Failed,
        "{:?}",
        status("swallows_tests")
    );
    assert_eq!(status("infinite_loop").0, Status::Timeout);
    assert_ne!(
        status("fork_bomb").0,
        Status::Passed,
        "{:?}",
        status("fork_bomb")
    );
    assert!(
        status("fork_bomb").1.contains("ERR_ACCESS_DENIED"),
        "{:?}",
        status("fork_bomb")
    );
    assert_ne!(
        status("alloc_10gb").0,
        Status::Passed,
        "{:?}",
        status("alloc_10gb")
    );
    assert_ne!(status("write_outside").0, Status::Passed);
    assert!(!escape.exists(), "a program wrote outside its folder");
    assert_eq!(status("output_flood").0, Status::OutputLimit);
    if h.sandbox.net == NetIsolation::None {
        eprintln!("no network namespace on this machine: the network case is not checked");
    } else {
        assert_ne!(
            status("network").0,
            Status::Passed,
            "{:?}",
            status("network")
        );
        assert!(
            listener.accept().is_err(),
            "a program reached the host's network"
        );
    }
    // The harness is still whole: a summary of everything.
    let s = summarize(&results);
    assert_eq!((s.passed, s.total, s.tasks), (1, cases.len(), cases.len()));
    // And nothing is left running: no node process of ours still spins.
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn canonical_mbtsp_solutions_pass_as_expected() {
    let h = harness(Limits::default(), 0);
    let problems = eval::load_suite("mbpp-ts").unwrap_or_else(|e| panic!("{e}"));
    let completions: Vec<Completion> = problems
        .iter()
        .filter_map(|p| {
            p.canonical_solution.as_ref().map(|c| Completion {
                task_id: p.task_id.clone(),
                completion: c.clone(),
            })
        })
        .collect();
    assert_eq!(completions.len(), 967);
    let results = eval::score(
        &problems,
        &completions,
        &h,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let s = summarize(&results);
    assert!(
        (370..=385).contains(&s.passed),
        "{} of 967 canonical solutions passed ({:?})",
        s.passed,
        s.statuses
    );
    assert!((s.pass_at_1 - s.passed as f64 / 967.0).abs() < 1e-9);

    // A completion for a task outside the suite is an error, not a failure.
    let stray = [Completion {
        task_id: "MBTSP/99999".into(),
        completion: String::new(),
    }];
    assert!(eval::score(&problems, &stray, &h, &CancelToken::new(), &mut |_| {}).is_err());
}

/// Domain fit on the tiny model over the import fixture's records: loss and perplexity agree,
/// generations are compared, and an adapter that changes the model changes the loss.
#[test]
fn domain_fit_measures_base_and_adapter() {
    use codelsi_engine::adapter::{Adapter, LoraConfig, Target};
    use codelsi_engine::eval::fit::domain_fit;
    use codelsi_engine::model::load_model;
    use codelsi_engine::models::llama::Adapters;
    use codelsi_engine::train::data::{PromptTemplate, read_jsonl};
    use codelsi_tests::{B, device, fixtures, randomized};

    let dev = device();
    let loaded = load_model::<B>(&fixtures().join("tiny_llama"), None, &dev, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let records =
        read_jsonl(&fixtures().join("import_expected/val.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::parse_list("all").unwrap(),
        rslora: false,
    };
    let fresh = Adapter::<B>::init(config, &loaded.model.config, 1, &dev).unwrap();
    let adapter = randomized(&fresh, 0.05, 9);
    let run = |list: &[&Adapter<B>]| {
        domain_fit(
            &loaded.model,
            Adapters { list, train: false },
            &loaded.tokenizer,
            &records,
            PromptTemplate::Chat,
            512,
            2,
            6,
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("not cancelled")
    };
    let base = run(&[]);
    let adapted = run(&[&adapter]);
    assert!(base.records > 0 && base.generated == 2);
    assert!(base.loss.is_finite() && base.loss > 0.0);
    assert!((base.perplexity - base.loss.exp()).abs() < 1e-9);
    assert!((0.0..=1.0).contains(&base.edit_similarity));
    assert!(
        (base.loss - adapted.loss).abs() > 1e-4,
        "{base:?} {adapted:?}"
    );
}

/// `benches/make_mbtsp_instructions.py` writes the training data's user turns with its own copy
/// of `chat_request`: the training data must ask exactly what `codelsi eval --chat` asks.
#[test]
fn training_script_asks_what_eval_asks() {
    let dir = std::env::temp_dir().join(format!("codelsi-chat-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let mut p = problem("MBTSP/601");
    p.prompt =
        "/**\n * Add two numbers.\n */\nconst add = function (a: number, b: number) : number {\n"
            .into();
    p.canonical_solution = Some("\treturn a + b;\n}\n".into());
    let src = dir.join("mbtsp.jsonl");
    std::fs::write(
        &src,
        serde_json::to_string(&p).unwrap_or_else(|e| panic!("{e}")) + "\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/make_mbtsp_instructions.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&src)
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("python3 (the test command installs it): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line =
        std::fs::read_to_string(dir.join("mbtsp-train.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let record: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        record["messages"][0]["content"].as_str(),
        Some(eval::chat_request(&p).as_str())
    );
    std::fs::remove_dir_all(&dir).ok();
}
