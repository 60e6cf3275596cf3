//! Repository import: a source tree (or an existing instruction file) in, a clean,
//! deduplicated, secret-free instruction dataset out — `train.jsonl`, `val.jsonl` (Alpaca
//! records `codelsi train` reads, each tagged with its pair kind and source location) and
//! `report.json`. Nothing leaves the machine.
//!
//! The stages, each its own module: [`walk`] finds the files, [`secrets`] redacts what must
//! not be learnt, [`extract`] parses with tree-sitter, [`pairs`] builds prompts with
//! repository context, [`dedup`] removes exact and near duplicates; this module runs them
//! (parsing and pair building on every core), filters by token length, splits by file and
//! writes the output.

pub mod dedup;
pub mod extract;
pub mod pairs;
pub mod secrets;
pub mod walk;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::cancel::CancelToken;
use crate::dataset::{DatasetDir, Split};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::io::tokenizer::{Message, Tokenizer};
use crate::par::par_map;
pub use pairs::{Pair, PairKind, Source};
pub use walk::Lang;

/// Settings of an import. The defaults suit a code base and the default model.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub langs: Vec<Lang>,
    /// Share of files (of records, for an instruction file) held out for validation.
    pub val_frac: f64,
    pub seed: u64,
    /// Fewest output tokens a pair may have.
    pub min_tokens: usize,
    /// Most tokens of prompt and output together (leave room for the chat template).
    pub max_tokens: usize,
    /// Token budget of the repository context in a prompt.
    pub context_tokens: usize,
    pub max_file_bytes: u64,
    /// Worker threads; 0 for one per core.
    pub threads: usize,
    /// Replace an existing dataset in the output folder.
    pub force: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            langs: Lang::ALL.to_vec(),
            val_frac: 0.1,
            seed: 42,
            min_tokens: 8,
            max_tokens: 960,
            context_tokens: 256,
            max_file_bytes: 1 << 20,
            threads: 0,
            force: false,
        }
    }
}

/// Progress of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportEvent {
    /// Files met so far.
    Walking {
        seen: usize,
    },
    /// Files parsed of `total`, and their bytes so far.
    Parsing {
        done: usize,
        total: usize,
        bytes: u64,
    },
    /// Files whose pairs are built, of `total`.
    Pairing {
        done: usize,
        total: usize,
    },
    Writing,
}

/// A secret found, by kind and place; never its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecretFound {
    pub path: String,
    /// 1-based; 0 for a whole file.
    pub line: usize,
    pub kind: String,
    /// `file_dropped`, `redacted` (pairs touching it dropped) or `record_dropped`.
    pub action: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilesReport {
    pub seen: usize,
    pub parsed: usize,
    /// Parsed files that gave at least one kept pair.
    pub with_pairs: usize,
    pub train: usize,
    pub val: usize,
    /// Parsed though tree-sitter recovered from syntax errors.
    pub syntax_errors: usize,
    /// Bytes that were not UTF-8 were replaced; pairs touching them are dropped.
    pub not_utf8: usize,
    pub licence_headers: usize,
    pub skipped: BTreeMap<String, usize>,
    /// Skipped files and folders with their reason (other languages only counted).
    pub skipped_paths: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairsReport {
    pub extracted: usize,
    /// Pairs dropped, by reason: secret, not_utf8, empty, too_short, too_long, duplicate,
    /// near_duplicate.
    pub dropped: BTreeMap<String, usize>,
    pub train: usize,
    pub val: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub by_lang: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokensReport {
    pub train: usize,
    pub val: usize,
}

/// What an import did; written as `report.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    /// `repository` or `instruction_file`.
    pub source: String,
    pub bytes_parsed: u64,
    pub files: FilesReport,
    pub secrets: BTreeMap<String, usize>,
    pub secrets_found: Vec<SecretFound>,
    pub pairs: PairsReport,
    pub tokens: TokensReport,
    /// The options that matter for reproducing the output.
    pub options: Json,
}

impl ImportReport {
    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let f = &self.files;
        let list = |m: &BTreeMap<String, usize>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        if self.source == "repository" {
            s.push_str(&format!(
                "files: {} seen, {} parsed ({:.1} MB), {} gave pairs ({} train / {} val)\n",
                f.seen,
                f.parsed,
                self.bytes_parsed as f64 / 1e6,
                f.with_pairs,
                f.train,
                f.val
            ));
            s.push_str(&format!("skipped: {}\n", list(&f.skipped)));
        }
        s.push_str(&format!("secrets: {}\n", list(&self.secrets)));
        let p = &self.pairs;
        s.push_str(&format!(
            "pairs: {} extracted, {} train + {} val kept\n",
            p.extracted, p.train, p.val
        ));
        s.push_str(&format!("  by kind: {}\n", list(&p.by_kind)));
        s.push_str(&format!("  by language: {}\n", list(&p.by_lang)));
        s.push_str(&format!("  dropped: {}\n", list(&p.dropped)));
        s.push_str(&format!(
            "tokens: {} train, {} val",
            self.tokens.train, self.tokens.val
        ));
        s
    }
}

fn check_out(out: &Path, force: bool) -> Result<()> {
    if out.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: --out must be a folder, not a file",
            out.display()
        )));
    }
    if !force
        && let Some(f) = DatasetDir::IMPORT_FILES
            .iter()
            .map(|f| out.join(f))
            .find(|p| p.exists())
    {
        return Err(Error::InvalidArgument(format!(
            "{} exists; pass --force to replace the dataset in {}",
            f.display(),
            out.display()
        )));
    }
    Ok(())
}

/// A parsed file with its redacted text.
struct ParsedFile {
    rel: String,
    lang: Lang,
    text: String,
    parsed: extract::Parsed,
    not_utf8: bool,
    secrets: Vec<(usize, &'static str)>,
}

fn parse_file(file: &walk::SourceFile, parsers: &mut extract::Parsers) -> Option<ParsedFile> {
    let (text, not_utf8) = match std::str::from_utf8(&file.bytes) {
        Ok(t) => (t.to_string(), false),
        Err(_) => (String::from_utf8_lossy(&file.bytes).into_owned(), true),
    };
    let findings = secrets::scan(&text);
    let secrets = findings
        .iter()
        .map(|f| (text[..f.range.start].matches('\n').count() + 1, f.kind))
        .collect();
    let text = secrets::redact(&text, &findings);
    let parsed = parsers.parse(file.lang, &text)?;
    Some(ParsedFile {
        rel: file.rel.clone(),
        lang: file.lang,
        text,
        parsed,
        not_utf8,
        secrets,
    })
}

/// Tokens of `text` in the chosen tokenizer (an estimate if it cannot encode the text).
fn count_tokens(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer
        .encode(text, false)
        .map_or(text.len() / 3, |t| t.len())
}

/// Import the repository at `root` into a dataset in `out`.
pub fn import_repo(
    root: &Path,
    out: &Path,
    tokenizer: &Tokenizer,
    opts: &ImportOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(ImportEvent),
) -> Result<ImportReport> {
    check_out(out, opts.force)?;
    let walk_opts = walk::WalkOptions {
        langs: opts.langs.clone(),
        max_file_bytes: opts.max_file_bytes,
    };
    let walked = walk::walk(root, &walk_opts, cancel, &mut |seen| {
        progress(ImportEvent::Walking { seen })
    })?;
    let mut report = ImportReport {
        source: "repository".into(),
        options: options_json(opts),
        ..ImportReport::default()
    };
    report.files.seen = walked.seen;
    for (path, reason) in &walked.skipped {
        *report
            .files
            .skipped
            .entry(reason.name().to_string())
            .or_default() += 1;
        if *reason != walk::Skip::OtherLanguage {
            report
                .files
                .skipped_paths
                .push((path.clone(), reason.name().to_string()));
        }
    }
    for (path, kind) in &walked.secret_files {
        report.secrets_found.push(SecretFound {
            path: path.clone(),
            line: 0,
            kind: kind.to_string(),
            action: "file_dropped".into(),
        });
    }

    let n_threads = crate::par::threads(opts.threads);
    let total = walked.files.len();
    let mut bytes = 0u64;
    let parsed: Vec<Option<ParsedFile>> = {
        let parse = |p: &mut extract::Parsers, f: &walk::SourceFile| parse_file(f, p);
        let sizes: Vec<u64> = walked.files.iter().map(|f| f.bytes.len() as u64).collect();
        let mut done_bytes = 0u64;
        let mut done_i = 0;
        par_map(
            &walked.files,
            n_threads,
            cancel,
            &extract::Parsers::default,
            &parse,
            &mut |done, _| {
                // Bytes are approximate while in flight (files finish out of order).
                done_bytes += sizes.get(done_i).copied().unwrap_or(0);
                done_i += 1;
                progress(ImportEvent::Parsing {
                    done,
                    total,
                    bytes: done_bytes,
                });
            },
        )?
    };
    let mut files: Vec<ParsedFile> = Vec::new();
    for (src, p) in walked.files.iter().zip(parsed) {
        match p {
            Some(p) => {
                bytes += src.bytes.len() as u64;
                files.push(p);
            }
            None => {
                *report.files.skipped.entry("unparsable".into()).or_default() += 1;
                report
                    .files
                    .skipped_paths
                    .push((src.rel.clone(), "unparsable".into()));
            }
        }
    }
    drop(walked);
    report.bytes_parsed = bytes;
    report.files.parsed = files.len();
    for f in &files {
        report.files.syntax_errors += usize::from(f.parsed.has_errors);
        report.files.not_utf8 += usize::from(f.not_utf8);
        report.files.licence_headers += usize::from(f.parsed.licence.is_some());
        for (line, kind) in &f.secrets {
            report.secrets_found.push(SecretFound {
                path: f.rel.clone(),
                line: *line,
                kind: kind.to_string(),
                action: "redacted".into(),
            });
        }
    }

    // Pairs, with the project's types known from every file.
    let count = |s: &str| count_tokens(tokenizer, s);
    let items: Vec<pairs::FileItems> = files
        .iter()
        .map(|f| pairs::FileItems {
            rel: &f.rel,
            lang: f.lang,
            text: &f.text,
            parsed: &f.parsed,
        })
        .collect();
    let types = pairs::ProjectTypes::collect(&items, &count);
    // Each worker counts with its own tokenizer clone (a shared one contends on its caches).
    let build = |tok: &mut Tokenizer, f: &pairs::FileItems| {
        let count = |s: &str| count_tokens(tok, s);
        let mut ps = pairs::build(f, &types, opts.context_tokens, &count);
        for p in &mut ps {
            p.output_tokens = count(&p.output);
            p.tokens = count(&prompt_text(p)) + p.output_tokens;
        }
        ps
    };
    let total = items.len();
    let built = par_map(
        &items,
        n_threads,
        cancel,
        &|| tokenizer.clone(),
        &build,
        &mut |done, _| progress(ImportEvent::Pairing { done, total }),
    )?;
    let mut all: Vec<Pair> = built.into_iter().flatten().collect();
    report.pairs.extracted = all.len();
    all.retain(|p| keep(p, &mut report.pairs.dropped, opts));
    progress(ImportEvent::Writing);
    finish(all, out, opts, report, |p| p.source.path.clone())
}

/// Prompt text as tokens are counted: instruction, blank line, input.
fn prompt_text(p: &Pair) -> String {
    if p.input.is_empty() {
        p.instruction.clone()
    } else {
        format!("{}\n\n{}", p.instruction, p.input)
    }
}

/// The per-pair filters: secrets, replaced bytes, emptiness, length. Counts what it drops.
fn keep(p: &Pair, dropped: &mut BTreeMap<String, usize>, opts: &ImportOptions) -> bool {
    let text = pair_texts(p);
    let empty = match &p.messages {
        Some(_) => false,
        None => p.output.trim().is_empty() || p.output.trim() == "{}",
    };
    let reason = if text.contains(secrets::MARKER) {
        Some("secret")
    } else if text.contains('\u{FFFD}') {
        Some("not_utf8")
    } else if empty {
        Some("empty")
    } else if p.tokens > opts.max_tokens {
        Some("too_long")
    } else if p.output_tokens < opts.min_tokens {
        Some("too_short")
    } else {
        None
    };
    match reason {
        Some(r) => {
            *dropped.entry(r.into()).or_default() += 1;
            false
        }
        None => true,
    }
}

/// Dedup, split by `unit` (file path, or record), count and write.
fn finish(
    mut all: Vec<Pair>,
    out: &Path,
    opts: &ImportOptions,
    mut report: ImportReport,
    unit: impl Fn(&Pair) -> String,
) -> Result<ImportReport> {
    // A stable order: by file, line, kind. Of duplicates the first in this order is kept.
    all.sort_by(|a, b| {
        (&a.source.path, a.source.line, a.kind, &a.source.name).cmp(&(
            &b.source.path,
            b.source.line,
            b.kind,
            &b.source.name,
        ))
    });
    // Code pairs are judged on what is learnt, the output, within one pair kind: the same
    // body copied into two files (their prompts differ only in path) is one example.
    // Imported records are judged whole (two questions may share an answer).
    let whole: Vec<Option<String>> = all
        .iter()
        .map(|p| (p.kind == PairKind::Imported).then(|| pair_texts(p)))
        .collect();
    let keyed: Vec<(PairKind, &str)> = all
        .iter()
        .zip(&whole)
        .map(|(p, c)| (p.kind, c.as_deref().unwrap_or(&p.output)))
        .collect();
    let verdicts = dedup::dedup(&keyed);
    let mut kept = Vec::with_capacity(all.len());
    for (p, v) in all.into_iter().zip(verdicts) {
        match v {
            dedup::Verdict::Keep => kept.push(p),
            dedup::Verdict::Exact => {
                *report.pairs.dropped.entry("duplicate".into()).or_default() += 1
            }
            dedup::Verdict::Near => {
                *report
                    .pairs
                    .dropped
                    .entry("near_duplicate".into())
                    .or_default() += 1
            }
        }
    }

    // Split by unit: every pair of a file lands on the same side.
    let mut units: Vec<String> = kept.iter().map(&unit).collect();
    units.sort();
    units.dedup();
    let mut shuffled = units.clone();
    shuffled.shuffle(&mut StdRng::seed_from_u64(opts.seed));
    let n_val = if opts.val_frac > 0.0 && units.len() >= 2 {
        ((units.len() as f64 * opts.val_frac).round() as usize).clamp(1, units.len() - 1)
    } else {
        0
    };
    let val_units: HashSet<&String> = shuffled[..n_val].iter().collect();
    let (val, train): (Vec<Pair>, Vec<Pair>) =
        kept.into_iter().partition(|p| val_units.contains(&unit(p)));

    if report.source == "repository" {
        report.files.with_pairs = units.len();
        report.files.val = n_val;
        report.files.train = units.len() - n_val;
    }
    report.pairs.train = train.len();
    report.pairs.val = val.len();
    for p in train.iter().chain(&val) {
        *report
            .pairs
            .by_kind
            .entry(p.kind.name().into())
            .or_default() += 1;
        *report.pairs.by_lang.entry(p.lang.clone()).or_default() += 1;
    }
    report.tokens.train = train.iter().map(|p| p.tokens).sum();
    report.tokens.val = val.iter().map(|p| p.tokens).sum();
    report.secrets_found.sort();
    for s in &report.secrets_found {
        *report.secrets.entry(s.kind.clone()).or_default() += 1;
    }

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let dataset = DatasetDir::new(out);
    write_atomic(&dataset.split(Split::Train), &jsonl(&train)?)?;
    write_atomic(&dataset.split(Split::Val), &jsonl(&val)?)?;
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Json {
        path: out.join("report.json"),
        source: e,
    })?;
    write_atomic(&dataset.report(), &json)?;
    Ok(report)
}

fn jsonl(pairs: &[Pair]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    for p in pairs {
        let line = match &p.messages {
            Some(m) => serde_json::to_vec(&ChatLine {
                messages: m,
                kind: p.kind,
                lang: &p.lang,
                source: &p.source,
                tokens: p.tokens,
            }),
            None => serde_json::to_vec(p),
        }
        .map_err(|e| Error::Internal(format!("serialising a pair: {e}")))?;
        buf.extend_from_slice(&line);
        buf.push(b'\n');
    }
    Ok(buf)
}

/// A multi-turn chat record as written: `messages` and the same provenance as a pair.
#[derive(Serialize)]
struct ChatLine<'a> {
    messages: &'a [Message],
    kind: PairKind,
    lang: &'a str,
    source: &'a Source,
    tokens: usize,
}

fn options_json(opts: &ImportOptions) -> Json {
    serde_json::json!({
        "langs": opts.langs.iter().map(|l| l.name()).collect::<Vec<_>>(),
        "val_frac": opts.val_frac,
        "seed": opts.seed,
        "min_tokens": opts.min_tokens,
        "max_tokens": opts.max_tokens,
        "context_tokens": opts.context_tokens,
        "max_file_bytes": opts.max_file_bytes,
    })
}

/// Import an existing instruction file into the same format: Alpaca JSON (an array) or
/// JSONL, chat JSONL (`messages`), or problem files (`task_id`, `prompt`,
/// `canonical_solution`, as MBXP and HumanEval ship them). Records split by record.
pub fn import_records(
    file: &Path,
    out: &Path,
    tokenizer: &Tokenizer,
    opts: &ImportOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(ImportEvent),
) -> Result<ImportReport> {
    check_out(out, opts.force)?;
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let values = read_values(file, &text)?;
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut report = ImportReport {
        source: "instruction_file".into(),
        bytes_parsed: text.len() as u64,
        options: options_json(opts),
        ..ImportReport::default()
    };
    let total = values.len();
    let mut all = Vec::with_capacity(total);
    for (i, (line, v)) in values.into_iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        progress(ImportEvent::Pairing { done: i + 1, total });
        let pair = record_pair(&v, &name, line).map_err(|what| Error::Malformed {
            path: file.into(),
            what: format!("record at line {line}: {what}"),
        })?;
        all.push(pair);
    }
    report.pairs.extracted = all.len();
    // Records carry no redaction marker: any secret drops the record.
    let mut clean = Vec::with_capacity(all.len());
    for mut p in all {
        let text = pair_texts(&p);
        let found = secrets::scan(&text);
        if let Some(f) = found.first() {
            report.secrets_found.push(SecretFound {
                path: name.clone(),
                line: p.source.line,
                kind: f.kind.to_string(),
                action: "record_dropped".into(),
            });
            *report.pairs.dropped.entry("secret".into()).or_default() += 1;
            continue;
        }
        p.tokens = count_tokens(tokenizer, &text);
        // What is learnt: the output, or a chat's assistant turns.
        let output = match &p.messages {
            Some(m) => m
                .iter()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            None => p.output.clone(),
        };
        p.output_tokens = count_tokens(tokenizer, &output);
        clean.push(p);
    }
    clean.retain(|p| keep(p, &mut report.pairs.dropped, opts));
    progress(ImportEvent::Writing);
    finish(clean, out, opts, report, |p| {
        format!("{}#{}", p.source.name, p.source.line)
    })
}

fn pair_texts(p: &Pair) -> String {
    match &p.messages {
        Some(m) => m
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        None => format!("{}\n\n{}", prompt_text(p), p.output),
    }
}

/// Records with their 1-based line: a JSON array, or one JSON object per line.
fn read_values(file: &Path, text: &str) -> Result<Vec<(usize, Json)>> {
    let malformed = |what: String| Error::Malformed {
        path: file.into(),
        what,
    };
    if text.trim_start().starts_with('[') {
        let v: Vec<Json> = serde_json::from_str(text)
            .map_err(|e| malformed(format!("not a JSON array of records: {e}")))?;
        return Ok(v.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Json = serde_json::from_str(line)
            .map_err(|e| malformed(format!("line {}: not JSON: {e}", i + 1)))?;
        out.push((i + 1, v));
    }
    if out.is_empty() {
        return Err(malformed("no records".into()));
    }
    Ok(out)
}

/// The language a problem's task id names (`MBTSP/3`, `HumanEval_ts/7`, `MBJSP/1`).
fn task_lang(task_id: &str) -> &'static str {
    let t = task_id.to_ascii_lowercase();
    if t.starts_with("mbtsp") || t.contains("_ts") || t.contains("typescript") {
        "ts"
    } else if t.starts_with("mbjsp") || t.contains("_js") || t.contains("javascript") {
        "js"
    } else if t.starts_with("mbpp") || t.contains("python") {
        "py"
    } else if t.contains("java") {
        "java"
    } else if t.contains("go") {
        "go"
    } else if t.contains("rust") || t.contains("_rs") {
        "rs"
    } else {
        ""
    }
}

fn record_pair(v: &Json, file: &str, line: usize) -> std::result::Result<Pair, String> {
    let s = |key: &str| v.get(key).and_then(Json::as_str).map(str::to_string);
    let source = |name: String| Source {
        path: file.to_string(),
        line,
        end_line: line,
        name,
    };
    if let Some(m) = v.get("messages") {
        let messages: Vec<Message> =
            serde_json::from_value(m.clone()).map_err(|e| format!("bad `messages`: {e}"))?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("no assistant message to learn from".into());
        }
        // One user turn and one answer read as a plain pair; longer chats stay chats.
        let plain = messages.len() == 2 && messages[0].role == "user";
        return Ok(Pair {
            instruction: if plain {
                messages[0].content.clone()
            } else {
                String::new()
            },
            input: String::new(),
            output: if plain {
                messages[1].content.clone()
            } else {
                String::new()
            },
            kind: PairKind::Imported,
            lang: String::new(),
            source: source(format!("record {line}")),
            tokens: 0,
            output_tokens: 0,
            messages: (!plain).then_some(messages),
        });
    }
    if let (Some(instruction), Some(output)) = (s("instruction"), s("output")) {
        return Ok(Pair {
            instruction,
            input: s("input").unwrap_or_default(),
            output,
            kind: PairKind::Imported,
            lang: String::new(),
            source: source(format!("record {line}")),
            tokens: 0,
            output_tokens: 0,
            messages: None,
        });
    }
    if let (Some(prompt), Some(solution)) = (s("prompt"), s("canonical_solution")) {
        let task = s("task_id").unwrap_or_else(|| format!("record {line}"));
        let lang = task_lang(&task);
        let language = match lang {
            "ts" => "TypeScript",
            "js" => "JavaScript",
            "py" => "Python",
            "java" => "Java",
            "go" => "Go",
            "rs" => "Rust",
            _ => "the same language",
        };
        return Ok(Pair {
            instruction: format!("Complete this {language} function."),
            input: prompt,
            output: solution,
            kind: PairKind::Imported,
            lang: lang.to_string(),
            source: source(task),
            tokens: 0,
            output_tokens: 0,
            messages: None,
        });
    }
    Err("not an Alpaca (instruction, output), chat (messages) or problem (prompt, canonical_solution) record".into())
}
