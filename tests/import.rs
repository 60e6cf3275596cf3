//! Repository import on a fixture repository written for these tests
//! (`fixtures/import_repo`): every pair kind, every language, a planted secret of each kind,
//! vendored and build folders, minified and generated files. The files git cannot hold well
//! (a binary, bytes that are not UTF-8, a symlink loop, a gitignored file, an oversize file)
//! are added to a copy at run time. The output is compared byte for byte with
//! `fixtures/import_expected` (rewrite it with `CODELSI_BLESS=1` and read the diff).

use std::path::{Path, PathBuf};

use codelsi_engine::cancel::CancelToken;
use codelsi_engine::import::{
    ImportEvent, ImportOptions, ImportReport, Pair, PairKind, import_records, import_repo,
};
use codelsi_engine::io::tokenizer::Tokenizer;
use codelsi_engine::train::data;
use codelsi_tests::fixtures;

/// The secrets planted in the fixture; none may appear in any output file.
const PLANTED: [&str; 8] = [
    "Tr0ub4dor-and-3",
    "AKIAZ7QWERTYUIOPASDF",
    "ghp_Zq8WmN3vB5xC7kL9pR2tY4uI6oP1aS3dF5gH",
    "q8Zr3Lw0Pk2Vn7Xb5Ty1Hd4GmQ9sJ6eA",
    "pay-4f9c2e7b1a",
    "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu",
    "sk-live-0000000000000000",
    "hunter2-in-the-ignored-file",
];

fn tokenizer() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixtures().join("tiny_llama")).unwrap_or_else(|e| panic!("{e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let e = e.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(e.file_name());
        if e.file_type().unwrap_or_else(|e| panic!("{e}")).is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("codelsi-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The fixture repository plus the files made at run time.
fn fixture_repo(name: &str) -> PathBuf {
    let repo = temp(name).join("repo");
    copy_dir(&fixtures().join("import_repo"), &repo);
    let src = repo.join("src");
    // A binary with a source extension.
    std::fs::write(src.join("blob.js"), b"\x7fELF\x00\x00\x01function x() {}")
        .unwrap_or_else(|e| panic!("{e}"));
    // Latin-1 bytes in one function's comment: that function's pairs go, the other's stay.
    let mut legacy = b"/** Returns the caf\xe9's name, as the old system spelt it. */\n\
export function cafeName(): string {\n  return \"Cafe du Commerce\";\n}\n\n"
        .to_vec();
    legacy.extend_from_slice(
        b"/** Doubles a number; kept from the legacy module. */\n\
export function double(n: number): number {\n  return n * 2;\n}\n",
    );
    std::fs::write(src.join("legacy.ts"), legacy).unwrap_or_else(|e| panic!("{e}"));
    // Ignored by the fixture's .gitignore: never seen.
    std::fs::write(
        repo.join("notes_ignored.ts"),
        "export const pw = \"hunter2-in-the-ignored-file\";\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Over the size limit the test sets (64 KiB).
    std::fs::write(
        src.join("huge.ts"),
        "/** Big. */\nexport const big = 1;\n".repeat(4000),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("..", src.join("loop")).unwrap_or_else(|e| panic!("{e}"));
        // A link out of the repository is not followed.
        std::os::unix::fs::symlink(std::env::temp_dir(), repo.join("tmp_link"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    repo
}

fn options() -> ImportOptions {
    ImportOptions {
        val_frac: 0.25,
        seed: 7,
        min_tokens: 8,
        max_tokens: 4096,
        context_tokens: 600,
        max_file_bytes: 64 * 1024,
        threads: 2,
        ..ImportOptions::default()
    }
}

fn read_pairs(path: &Path) -> Vec<Pair> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

fn run(repo: &Path, out: &Path) -> ImportReport {
    let mut events = Vec::new();
    let report = import_repo(
        repo,
        out,
        &tokenizer(),
        &options(),
        &CancelToken::new(),
        &mut |e| events.push(e),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Progress: every stage reports, and parsing ends at the number of files parsed.
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ImportEvent::Walking { .. }))
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ImportEvent::Pairing { .. }))
    );
    assert_eq!(events.last(), Some(&ImportEvent::Writing));
    let last_parse = events.iter().rev().find_map(|e| match e {
        ImportEvent::Parsing { done, total, .. } => Some((*done, *total)),
        _ => None,
    });
    assert_eq!(last_parse, Some((report.files.parsed, report.files.parsed)));
    report
}

#[test]
fn fixture_repository_gives_the_expected_dataset() {
    let repo = fixture_repo("expected");
    let out = repo.parent().unwrap().join("data");
    let report = run(&repo, &out);

    // Byte for byte against the reviewed expectation.
    let expected = fixtures().join("import_expected");
    for f in ["train.jsonl", "val.jsonl", "report.json"] {
        let got = std::fs::read_to_string(out.join(f)).unwrap();
        if std::env::var_os("CODELSI_BLESS").is_some() {
            std::fs::create_dir_all(&expected).unwrap();
            std::fs::write(expected.join(f), &got).unwrap();
        }
        let want = std::fs::read_to_string(expected.join(f)).unwrap_or_default();
        assert!(
            got == want,
            "{f} differs from fixtures/import_expected/{f}; if the change is intended, rerun \
             with CODELSI_BLESS=1 and review the diff"
        );
    }

    // And the properties the expectation must have, so a wrong blessing cannot pass.
    let train = read_pairs(&out.join("train.jsonl"));
    let val = read_pairs(&out.join("val.jsonl"));
    let all: Vec<&Pair> = train.iter().chain(&val).collect();
    for kind in [
        PairKind::DocToImpl,
        PairKind::SignatureToBody,
        PairKind::ContextToBody,
        PairKind::MemberImpl,
    ] {
        assert!(all.iter().any(|p| p.kind == kind), "no {kind:?} pair");
    }
    for lang in ["ts", "tsx", "js", "py", "rs", "go", "java"] {
        assert!(all.iter().any(|p| p.lang == lang), "no {lang} pair");
    }
    // Arrow functions bound to names, methods with their class, Python docstrings.
    let named = |n: &str| all.iter().any(|p| p.source.name == n);
    for n in [
        "squares",
        "isEven",
        "perimeter",
        "total",
        "Greet",
        "pop",
        "max",
        "Counter",
    ] {
        assert!(named(n), "no pair for `{n}`");
    }
    // Repository context: the project type a function uses, defined in another file.
    let total = all
        .iter()
        .find(|p| p.source.name == "totalArea")
        .expect("a totalArea pair");
    assert!(
        total.input.contains("export interface Shape"),
        "{}",
        total.input
    );

    // Secrets: every kind found, none in the output, pairs near them dropped.
    for kind in [
        "private-key",
        "aws-access-token",
        "github-pat",
        "high_entropy_string",
        "url_credentials",
        // `const apiKey = "…"`: gitleaks' generic rule names it before ours does.
        "generic-api-key",
        "env_file",
    ] {
        assert!(
            report.secrets.contains_key(kind),
            "no {kind} in {:?}",
            report.secrets
        );
    }
    for f in ["train.jsonl", "val.jsonl", "report.json"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        for s in PLANTED {
            assert!(!text.contains(s), "secret {s} leaked into {f}");
        }
        assert!(!text.contains("Copyright"), "licence header in {f}");
        assert!(!text.contains("<REDACTED>"), "redaction marker in {f}");
    }
    assert!(
        named("serverPort"),
        "a function with no secret in config.ts is kept"
    );
    assert!(!named("awsKeyId") && !named("webhookKey"));

    // Files skipped for each reason, and the ignored file never seen.
    for reason in [
        "vendored",
        "build_output",
        "minified",
        "generated",
        "binary",
        "symlink_loop",
        "too_large",
        "secret_file",
        "outside_repo",
    ] {
        assert!(
            report.files.skipped.contains_key(reason),
            "nothing skipped as {reason}: {:?}",
            report.files.skipped
        );
    }
    assert!(
        !report
            .files
            .skipped_paths
            .iter()
            .any(|(p, _)| p.contains("notes_ignored"))
    );
    assert_eq!(report.files.not_utf8, 1);
    assert!(named("double") && !named("cafeName"));
    assert_eq!(report.files.licence_headers, 1);
    assert!(report.pairs.dropped.contains_key("duplicate"));
    assert!(report.pairs.dropped.contains_key("near_duplicate"));

    // Split by file: no file on both sides.
    for v in &val {
        assert!(!train.iter().any(|t| t.source.path == v.source.path));
    }
    assert!(!val.is_empty());

    // `codelsi train` reads the output directly.
    let records = data::read_jsonl(&out.join("train.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(records.len(), train.len());
}

#[test]
fn refuses_to_overwrite_and_cancel_writes_nothing() {
    let repo = fixture_repo("refuse");
    let out = repo.parent().unwrap().join("data");
    run(&repo, &out);
    let before = std::fs::read(out.join("train.jsonl")).unwrap();
    let err = import_repo(
        &repo,
        &out,
        &tokenizer(),
        &options(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect_err("an existing dataset is refused");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("train.jsonl")).unwrap(), before);

    let cancelled_out = repo.parent().unwrap().join("cancelled");
    let cancel = CancelToken::new();
    cancel.cancel();
    let err = import_repo(
        &repo,
        &cancelled_out,
        &tokenizer(),
        &options(),
        &cancel,
        &mut |_| {},
    )
    .expect_err("cancelled");
    assert!(matches!(err, codelsi_engine::Error::Cancelled), "{err}");
    assert!(!cancelled_out.exists());

    let missing = import_repo(
        &repo.join("no-such-dir"),
        &cancelled_out,
        &tokenizer(),
        &options(),
        &CancelToken::new(),
        &mut |_| {},
    );
    assert!(missing.is_err());
}

#[test]
fn lang_filter_keeps_only_the_named_languages() {
    let repo = fixture_repo("lang");
    let out = repo.parent().unwrap().join("data");
    let opts = ImportOptions {
        langs: codelsi_engine::import::Lang::parse_list("py,go").unwrap(),
        ..options()
    };
    let report = import_repo(
        &repo,
        &out,
        &tokenizer(),
        &opts,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        report.pairs.by_lang.keys().collect::<Vec<_>>(),
        ["go", "py"],
        "{:?}",
        report.pairs.by_lang
    );
    assert!(codelsi_engine::import::Lang::parse_list("cobol").is_err());
}

fn import_file(name: &str, content: &str) -> (ImportReport, Vec<Pair>, Vec<Pair>) {
    let dir = temp(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap_or_else(|e| panic!("{e}"));
    let out = dir.join("data");
    let opts = ImportOptions {
        val_frac: 0.5,
        ..options()
    };
    let report = import_records(
        &file,
        &out,
        &tokenizer(),
        &opts,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (
        report,
        read_pairs(&out.join("train.jsonl")),
        read_pairs(&out.join("val.jsonl")),
    )
}

#[test]
fn instruction_files_import_in_every_form() {
    // Alpaca JSON array, with a duplicate and a record carrying a secret.
    let alpaca = serde_json::json!([
        {"instruction": "Reverse a string in TypeScript.", "input": "", "output": "const rev = (s: string) => [...s].reverse().join(\"\");"},
        {"instruction": "Reverse a string in TypeScript.", "input": "", "output": "const rev = (s: string) => [...s].reverse().join(\"\");"},
        {"instruction": "Store the key.", "output": "const key = \"AKIAZ7QWERTYUIOPASDF\";"},
        {"instruction": "Sum an array.", "output": "const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);"},
    ]);
    let (report, train, val) = import_file("alpaca.json", &alpaca.to_string());
    assert_eq!(report.pairs.extracted, 4);
    assert_eq!(report.pairs.dropped.get("duplicate"), Some(&1));
    assert_eq!(report.pairs.dropped.get("secret"), Some(&1));
    assert_eq!(report.secrets.get("aws-access-token"), Some(&1));
    assert_eq!(train.len() + val.len(), 2);

    // Chat JSONL: a plain exchange becomes a pair, a longer chat stays a chat.
    let chat = [
        serde_json::json!({"messages": [{"role": "user", "content": "Write hello world in TypeScript."}, {"role": "assistant", "content": "console.log(\"hello world\");"}]}),
        serde_json::json!({"messages": [{"role": "system", "content": "You write TypeScript."}, {"role": "user", "content": "Add two numbers."}, {"role": "assistant", "content": "const add = (a: number, b: number) => a + b;"}]}),
    ]
    .map(|v| v.to_string())
    .join("\n");
    let (_, train, val) = import_file("chat.jsonl", &chat);
    let all: Vec<Pair> = train.into_iter().chain(val).collect();
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .any(|p| p.messages.is_none() && p.output.contains("hello world"))
    );
    assert!(
        all.iter()
            .any(|p| p.messages.as_ref().is_some_and(|m| m.len() == 3))
    );

    // MBXP problems: the MBPP-TS suite the engine ships (an unchanged copy of MBTSP's release).
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/suites/mbpp-ts.jsonl"),
    )
    .unwrap();
    let first: Vec<&str> = text.lines().take(20).collect();
    let (report, train, val) = import_file("mbtsp.jsonl", &first.join("\n"));
    assert_eq!(report.pairs.extracted, 20);
    let all: Vec<Pair> = train.into_iter().chain(val).collect();
    assert!(
        all.iter()
            .all(|p| p.lang == "ts" && p.source.name.starts_with("MBTSP/"))
    );
    assert!(all.len() >= 18, "{:?}", report.pairs.dropped);

    // A record of none of the forms names its line.
    let dir = temp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"q\": 1}\n",
    )
    .unwrap();
    let err = import_records(
        &dir.join("bad.jsonl"),
        &dir.join("data"),
        &tokenizer(),
        &options(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect_err("bad record");
    assert!(err.to_string().contains("line 2"), "{err}");
}

/// A corpus of planted secrets (`fixtures/secrets_repo`, each alone in its function: provider
/// formats, pieces joined by `+`, a base64-encoded client secret, credential names with short
/// and spaced values, environment defaults, passwords and tokens in comments): none reaches
/// `train.jsonl`, `val.jsonl` or `report.json`, and the functions beside them, and those with
/// hashes, test vectors, ids and labels, are kept with no finding of their own.
#[test]
fn planted_secrets_never_leak() {
    let repo = temp("secrets").join("repo");
    copy_dir(&fixtures().join("secrets_repo"), &repo);
    let out = repo.parent().unwrap().join("data");
    let report = run(&repo, &out);
    let planted = std::fs::read_to_string(fixtures().join("secrets_planted.txt")).unwrap();
    let planted: Vec<&str> = planted.lines().filter(|l| !l.is_empty()).collect();
    assert!(planted.len() >= 25);
    for f in ["train.jsonl", "val.jsonl", "report.json"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        for s in &planted {
            assert!(!text.contains(s), "secret {s} leaked into {f}");
        }
    }
    let train = read_pairs(&out.join("train.jsonl"));
    let val = read_pairs(&out.join("val.jsonl"));
    let kept: Vec<&str> = train
        .iter()
        .chain(&val)
        .map(|p| p.source.name.as_str())
        .collect();
    for n in [
        "addNumbers",
        "mean",
        "emptySha256",
        "cacheDigest",
        "fixtureRequestId",
        "highlightRules",
        "loginLabels",
        "passwordSource",
        "bundleIntegrity",
        "wordListName",
    ] {
        assert!(kept.contains(&n), "{n} was dropped: {kept:?}");
    }
    // Every planted function is dropped, and the findings sit in planted files only.
    for n in [
        "uploaderKeyId",
        "releaseBotToken",
        "oauthClient",
        "kioskLogin",
        "wikiLogin",
    ] {
        assert!(!kept.contains(&n), "{n} was kept");
    }
    assert!(
        report
            .secrets_found
            .iter()
            .all(|s| !s.path.ends_with("benign.ts")),
        "{:?}",
        report.secrets_found
    );
    let found: usize = report.secrets.values().sum();
    assert!(found >= planted.len() - 4, "{:?}", report.secrets);
    for kind in [
        "aws-access-token",
        "github-pat",
        "slack-webhook-url",
        "sendgrid-api-token",
        "npm-access-token",
        "base64_encoded_secret",
        "credential_assignment",
        "bearer_token",
        "huggingface-access-token",
        "environment_default",
        "credential_in_text",
        "twilio-api-key",
    ] {
        assert!(
            report.secrets.contains_key(kind),
            "no {kind}: {:?}",
            report.secrets
        );
    }
}
