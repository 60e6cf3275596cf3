//! The evaluation harness: hostile programs are contained and scored as failures while the
//! harness goes on, escapes seen in an attack on the earlier sandbox stay shut (each side
//! effect checked from outside), forged passes fail, and MBTSP's canonical solutions score as
//! they should. A naive `ts.transpileModule` + node run counts 772 of 967 as passing, but 396
//! of those are broken solutions whose syntax error swallows the tests (transpileModule
//! recovers into a program that asserts nothing and exits 0); 372 pass when syntax errors fail
//! the program, and the grader proves the tests ran.

use std::path::{Path, PathBuf};
use std::time::Duration;

use codelsi_engine::cancel::CancelToken;
use codelsi_engine::eval::sandbox::Isolation;
use codelsi_engine::eval::{self, Completion, Harness, Limits, Problem, SampleResult, Status};

fn harness(limits: Limits, jobs: usize) -> Harness {
    let h = Harness::new(limits, jobs, false, &mut |s| eprintln!("{s}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(h.sandbox.isolation, Isolation::Namespaces { .. }),
        "{}",
        h.sandbox.isolation
    );
    h
}

/// `f()` must be 1; the form of MBXP's tests.
fn problem(id: &str) -> Problem {
    Problem {
        task_id: id.into(),
        prompt: "const f = function (): number {\n".into(),
        test: "\nimport * as assert from 'assert'\n\nlet actual_1 = f();\nlet expected_1 = 1;\nassert.deepEqual(actual_1, expected_1, \"Exception --- test case 0 failed to pass\");\n".into(),
        entry_point: "f".into(),
        canonical_solution: None,
        language: Some("typescript".into()),
        stop_tokens: None,
    }
}

/// The right body of `f`, for cases whose only way to fail is an escape.
const GOOD: &str = "  return 1;\n}\n";

fn limits() -> Limits {
    Limits {
        cpu_secs: 2,
        wall: Duration::from_secs(6),
        memory_bytes: 2 << 30,
        output_bytes: 64 << 10,
        disk_bytes: 32 << 20,
    }
}

/// Score each `(id, completion)` against [`problem`]; the result of each by id.
fn score(h: &Harness, cases: &[(&str, String)]) -> Vec<SampleResult> {
    let problems: Vec<Problem> = cases.iter().map(|(id, _)| problem(id)).collect();
    let completions: Vec<Completion> = cases
        .iter()
        .map(|(id, c)| Completion {
            task_id: id.to_string(),
            completion: c.clone(),
        })
        .collect();
    let results = eval::score(&problems, &completions, h, &CancelToken::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    for r in &results {
        let last = r.stderr_tail.lines().last().unwrap_or_default();
        let last: String = last.chars().take(100).collect();
        eprintln!("{:<18} {:?} {last}", r.task_id, r.status);
    }
    assert_eq!(results.len(), cases.len());
    results
}

fn status_of(results: &[SampleResult], id: &str) -> (Status, String) {
    let r = results
        .iter()
        .find(|r| r.task_id == id)
        .unwrap_or_else(|| panic!("no result for {id}"));
    (r.status, r.stderr_tail.clone())
}

/// A fresh folder of the host's, outside any sandbox.
fn host_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("codelsi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Processes a run may have left: jails (bubblewrap) and node processes orphaned to pid 1.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        let name = exe
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`: the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .unwrap_or_default();
        if name == "bwrap" || (name == "node" && ppid == "1") {
            out.push(format!("{pid} {name} (parent {ppid})"));
        }
    }
    out
}

fn nice_of(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 19 of stat; the 17th after the comm's ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(16).map(String::from))
        .unwrap_or_default()
}

fn js(s: &Path) -> String {
    format!("{:?}", s.display().to_string())
}

#[test]
fn hostile_programs_are_contained_and_fail() {
    let _turn = codelsi_tests::sandbox_turn();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let escape = std::env::temp_dir().join(format!("codelsi-escape-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&escape);
    let cases: Vec<(&str, String)> = vec![
        ("passes", GOOD.into()),
        ("wrong", "  return 2;\n}".into()),
        // Leaves a block open: the rest of the program lands inside it. transpileModule
        // recovers from such syntax errors; the harness refuses them.
        ("swallows_tests", "  if (true) {\n    return 1;\n".into()),
        // Right, but with a stray brace: runs fine after recovery, and is still not
        // TypeScript, so it fails.
        ("syntax_error", "  return 1;\n}\n}\n".into()),
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
                "  require('fs').writeFileSync({}, 'escaped');\n  return 1;\n}}",
                js(&escape)
            ),
        ),
        (
            // Connects at load and gives the handshake time (the kernel completes it even
            // while JavaScript spins): the listener outside must see nothing.
            "network",
            format!(
                "{GOOD}require('net').connect({port}, '127.0.0.1').on('error', () => {{}});\nconst until = Date.now() + 1000; while (Date.now() < until) {{}}\n"
            ),
        ),
        (
            // Would pass, but keeps writing before its test.
            "output_flood",
            "  const big = 'x'.repeat(100000);\n  for (let i = 0; i < 100; i++) console.log(big);\n  return 1;\n}"
                .into(),
        ),
    ];
    let h = harness(limits(), 2);
    let results = score(&h, &cases);
    let status = |id: &str| status_of(&results, id);
    assert_eq!(status("passes").0, Status::Passed, "{:?}", status("passes"));
    assert_eq!(status("wrong").0, Status::Failed);
    for id in ["swallows_tests", "syntax_error"] {
        assert_eq!(status(id).0, Status::Failed, "{id}: {:?}", status(id));
        assert!(status(id).1.starts_with("TypeScript:"), "{:?}", status(id));
    }
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
    assert!(
        listener.accept().is_err(),
        "a program reached the host's network"
    );
    let s = eval::summarize(&results);
    assert_eq!((s.passed, s.total, s.tasks), (2, cases.len(), cases.len()));
}

/// Each escape an attack found in the earlier sandbox (node's permission model, codelsi as
/// root, a network namespace), tried again, with the right answer beside it so that only the
/// escape can tell: the side effect is checked from outside.
#[test]
fn escapes_seen_stay_shut() {
    use std::os::unix::net::UnixListener;

    let _turn = codelsi_tests::sandbox_turn();
    let dir = host_dir("escapes");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    let sock = dir.join("host.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let evil_sock = dir.join("evil.sock");
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = bystander.id();
    let nice_before = nice_of(pid);
    let d = js(&dir);
    let cases: Vec<(&str, String)> = vec![
        (
            "report_dir",
            format!(
                "{GOOD}try {{ process.report.directory = {d}; process.report.filename = 'victim.txt';\nprocess.report.writeReport(new Error('x\\n$(touch PROOF)')); }} catch (_) {{}}\n"
            ),
        ),
        (
            "report_abs",
            format!(
                "{GOOD}try {{ process.report.filename = {};\nprocess.report.writeReport(new Error('x')); }} catch (_) {{}}\n",
                js(&victim)
            ),
        ),
        (
            "report_signal",
            format!(
                "{GOOD}try {{ process.report.directory = {d}; process.report.filename = 'victim.txt';\nprocess.report.reportOnSignal = true; process.report.signal = 'SIGUSR2';\nprocess.kill(process.pid, 'SIGUSR2'); }} catch (_) {{}}\nsetTimeout(() => {{}}, 300);\n"
            ),
        ),
        (
            "unix_connect",
            format!(
                "{GOOD}try {{ require('net').connect({{ path: {} }}, function () {{ this.write('EXFIL\\n'); }}).on('error', () => {{}}); }} catch (_) {{}}\nconst until = Date.now() + 500; while (Date.now() < until) {{}}\n",
                js(&sock)
            ),
        ),
        (
            "unix_listen",
            format!(
                "{GOOD}try {{ require('net').createServer().on('error', () => {{}}).listen({}); }} catch (_) {{}}\n",
                js(&evil_sock)
            ),
        ),
        (
            "kill_host",
            format!("{GOOD}try {{ process.kill({pid}, 'SIGKILL'); }} catch (_) {{}}\n"),
        ),
        (
            "renice_host",
            format!("{GOOD}try {{ require('os').setPriority({pid}, 19); }} catch (_) {{}}\n"),
        ),
        (
            // Sees a host process: fails its test.
            "list_host",
            format!(
                "  let seen = false; try {{ process.kill({pid}, 0); seen = true; }} catch (_) {{}}\n  return seen ? 2 : 1;\n}}\n"
            ),
        ),
        (
            // Kills its parent, shrugs off every error, and tries to outlive its run.
            "kill_harness",
            "  return 1;\n}\nprocess.on('uncaughtException', () => {});\ntry { process.kill(process.ppid, 'SIGKILL'); } catch (_) {}\nsetInterval(() => {}, 1000);\nwhile (true) {}\n".into(),
        ),
        (
            "host_path",
            format!(
                "  let seen = false; try {{ require('fs').realpathSync({d}); seen = true; }} catch (_) {{}}\n  return seen ? 2 : 1;\n}}\n"
            ),
        ),
        (
            "root_user",
            "  let uid = -1; try { uid = require('os').userInfo().uid; } catch (_) {}\n  return uid === 0 || process.getuid() === 0 ? 2 : 1;\n}\n".into(),
        ),
        (
            "renice_self",
            "  let raised = false; try { require('os').setPriority(0, -20); raised = true; } catch (_) {}\n  return raised ? 2 : 1;\n}\n".into(),
        ),
        (
            // More than the disk limit, 1 MB at a time, in many files.
            "fill_disk",
            "  const fs = require('fs'); let n = 0;\n  try { for (; n < 200; n++) fs.writeFileSync('f' + n, Buffer.alloc(1 << 20, 1)); } catch (_) {}\n  return n >= 200 ? 2 : 1;\n}\n".into(),
        ),
    ];
    let h = harness(limits(), 2);
    let results = score(&h, &cases);
    let status = |id: &str| status_of(&results, id);
    // codelsi is alive (this test goes on) and has every result.
    assert_eq!(
        status("kill_harness").0,
        Status::Timeout,
        "{:?}",
        status("kill_harness")
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "processes outlived their runs"
    );
    // Nothing on the host was touched.
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["host.sock", "victim.txt"],
        "files appeared on the host"
    );
    assert!(
        listener.accept().is_err(),
        "a program reached a host socket"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a program killed a host process"
    );
    assert_eq!(
        nice_of(pid),
        nice_before,
        "a program reniced a host process"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    // And the programs that did their job with the escape beside it pass: the escapes failed
    // quietly, not by crashing the run.
    for id in [
        "report_dir",
        "report_abs",
        "unix_connect",
        "unix_listen",
        "kill_host",
        "renice_host",
        "list_host",
        "host_path",
        "root_user",
        "renice_self",
        "fill_disk",
    ] {
        assert_eq!(status(id).0, Status::Passed, "{id}: {:?}", status(id));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Wrong functions that an earlier grader scored "passed", and other ways to forge a pass: all
/// fail.
#[test]
fn forged_passes_fail() {
    let _turn = codelsi_tests::sandbox_turn();
    let cases: Vec<(&str, String)> = vec![
        ("marker_exit", "  console.log(\"__codelsi_tests_done__\"); process.exit(0);\n}".into()),
        ("assert_patched", "  require(\"assert\").deepEqual = () => {}; return -1;\n}".into()),
        (
            "assert_all_patched",
            "  const a = require('assert'); for (const k of Object.keys(a)) { try { a[k] = () => {}; } catch (_) {} }\n  try { require('assert').strict.deepEqual = () => {}; } catch (_) {}\n  console.log('__codelsi_tests_done__');\n  return -1;\n}".into(),
        ),
        (
            "uncaught_handler",
            "  return -1;\n}\nprocess.on(\"uncaughtException\", () => { console.log(\"__codelsi_tests_done__\"); process.exit(0); });".into(),
        ),
        (
            "exit_handler",
            "  return -1;\n}\nprocess.on(\"exit\", () => { console.log(\"__codelsi_tests_done__\"); process.exitCode = 0; });".into(),
        ),
        (
            "require_replaced",
            "  return -1;\n}\nrequire = (() => new Proxy({}, { get: () => () => {} })) as any;\n".into(),
        ),
        (
            "loader_patched",
            "  return -1;\n}\nconst M = require('module'); const load = M._load; M._load = function (n: string, ...r: any[]) { return n.includes('assert') ? new Proxy(function () {}, { get: () => () => {} }) : load.call(this, n, ...r); };\n".into(),
        ),
        (
            "intrinsics_patched",
            "  return -1;\n}\nObject.defineProperty = ((o: any, k: any) => { o[k] = () => {}; return o; }) as any;\nObject.prototype.hasOwnProperty = () => true;\nFunction.prototype.call = function () {} as any;\n".into(),
        ),
        (
            "exit_neutered",
            "  return -1;\n}\n(process as any).reallyExit = () => {}; process.exit = (() => {}) as any;\n".into(),
        ),
        (
            // The proof comes on stdin: it is read before the completion loads.
            "reads_stdin",
            "  return -1;\n}\ntry { console.log(require('fs').readFileSync(0, 'utf8')); } catch (_) {}\n".into(),
        ),
        (
            // The expected value from the tests' source, through the caller or the folder.
            "reads_tests",
            "  try { const c = (f as any).caller; const m = /expected_1 = (\\d+)/.exec(String(c)); if (m) return Number(m[1]); } catch (_) {}\n  const fs = require('fs');\n  for (const n of fs.readdirSync('.')) { const m = /expected_1 = (\\d+)/.exec(fs.readFileSync(n, 'utf8')); if (m) return Number(m[1]); }\n  return -1;\n}".into(),
        ),
        (
            // Guesses the proof's form: a line of 32 hex digits.
            "fake_proof",
            "  console.log('0123456789abcdef0123456789abcdef'); return -1;\n}\nprocess.on('exit', () => { process.exitCode = 0; });".into(),
        ),
    ];
    let h = harness(limits(), 2);
    let results = score(&h, &cases);
    for (id, _) in &cases {
        let (status, tail) = status_of(&results, id);
        assert_ne!(status, Status::Passed, "{id} forged a pass: {tail}");
    }
}

#[test]
fn canonical_mbtsp_solutions_pass_as_expected() {
    let _turn = codelsi_tests::sandbox_turn();
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
    let s = eval::summarize(&results);
    assert!(
        (370..=374).contains(&s.passed),
        "{} of 967 canonical solutions passed ({:?})",
        s.passed,
        s.statuses
    );
    // Four canonical solutions run their tests despite a syntax error (376 passed when
    // transpileModule's recovery was trusted): they fail, as any program with one does.
    for id in ["MBTSP/161", "MBTSP/672", "MBTSP/744", "MBTSP/816"] {
        let r = results.iter().find(|r| r.task_id == id).unwrap();
        assert_eq!(r.status, Status::Failed, "{id}");
        assert!(
            r.stderr_tail.starts_with("TypeScript:"),
            "{id}: {}",
            r.stderr_tail
        );
    }
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
            Adapters { list, train: None },
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
