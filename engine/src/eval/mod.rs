//! Functional correctness: problems (prompt + tests), completions for them, each program
//! (prompt + completion) and the problem's tests transpiled from TypeScript and run under node
//! in the [`sandbox`] by the grader (`grader.js`), and pass@k with the unbiased estimator of
//! Chen et al. (2021).

pub mod fit;
pub mod sandbox;
pub mod typescript;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::generate::{BatchRequest, GenerateOptions, generate_batch};
use crate::io::tokenizer::{Message, Tokenizer};
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, Llama};
use crate::par::par_map;
use crate::sampling::SamplingParams;
pub use sandbox::{Limits, RunResult, Sandbox, Status};
pub use typescript::TypeScript;

/// One benchmark problem, in the MBXP/HumanEval JSONL form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub test: String,
    #[serde(default)]
    pub entry_point: String,
    #[serde(default)]
    pub canonical_solution: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    /// Where a completion ends; the language's defaults when absent.
    #[serde(default)]
    pub stop_tokens: Option<Vec<String>>,
}

impl Problem {
    /// The stop strings for a completion of this problem's prompt: the problem's own, or
    /// TypeScript's (a new top-level statement ends the function).
    pub fn stops(&self) -> Vec<String> {
        match &self.stop_tokens {
            Some(s) if !s.is_empty() => s.clone(),
            _ => [
                "\nfunction ",
                "\n/*",
                "\n//",
                "\nclass ",
                "\nconsole.log",
                "\nexport ",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// The suites that ship with codelsi (`engine/suites/`, with their licences).
pub const SUITES: [&str; 2] = ["humaneval-ts", "mbpp-ts"];

/// A built-in suite by name, or a problems file (JSONL) by path.
pub fn load_suite(spec: &str) -> Result<Vec<Problem>> {
    let (text, path) = match spec {
        "humaneval-ts" => (
            include_str!("../../suites/humaneval-ts.jsonl").to_string(),
            Path::new("humaneval-ts").to_path_buf(),
        ),
        "mbpp-ts" | "mbtsp" => (
            include_str!("../../suites/mbpp-ts.jsonl").to_string(),
            Path::new("mbpp-ts").to_path_buf(),
        ),
        _ => {
            let p = Path::new(spec);
            if !p.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "`{spec}` is neither a suite ({}) nor a problems file",
                    SUITES.join(", ")
                )));
            }
            (
                std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
                p.to_path_buf(),
            )
        }
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Problem = serde_json::from_str(line).map_err(|e| Error::Malformed {
            path: path.clone(),
            what: format!("line {}: not a problem (task_id, prompt, test): {e}", i + 1),
        })?;
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::Malformed {
            path,
            what: "no problems".into(),
        });
    }
    Ok(out)
}

/// A completion to score: its problem and its text (what follows the prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub task_id: String,
    pub completion: String,
}

/// Read completions from JSONL (`task_id`, `completion`; several lines per task for pass@k).
pub fn read_completions(path: &Path) -> Result<Vec<Completion>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| Error::Malformed {
            path: path.into(),
            what: format!(
                "line {}: not a completion (task_id, completion): {e}",
                i + 1
            ),
        })?);
    }
    Ok(out)
}

/// The user turn of chat mode: the problem's prompt as code to complete.
pub fn chat_request(problem: &Problem) -> String {
    let lang = problem.language.as_deref().unwrap_or("typescript");
    format!(
        "Complete the following {lang} function. Reply with the whole function in one code \
         block.\n\n```{lang}\n{}```",
        problem.prompt
    )
}

/// A chat reply turned into a completion of the prompt: the first code block (or the whole
/// reply), from after the prompt's last line (the signature) when the reply repeats it, else
/// from after the line that opens the reply's own declaration of the entry point (models often
/// rewrite the signature: an arrow function, other spacing), else the code as it is.
pub fn completion_from_chat(problem: &Problem, reply: &str) -> String {
    let code = match reply.find("```") {
        Some(open) => {
            let rest = &reply[open + 3..];
            // Skip the language tag line.
            let body = rest.find('\n').map_or(rest, |i| &rest[i + 1..]);
            body.find("```").map_or(body, |close| &body[..close])
        }
        None => reply,
    };
    let signature = problem
        .prompt
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .trim();
    if !signature.is_empty()
        && let Some(at) = code.find(signature)
    {
        let after = &code[at + signature.len()..];
        return after.strip_prefix('\n').unwrap_or(after).to_string();
    }
    if let Some(body) = after_declaration(code, &problem.entry_point) {
        return body.to_string();
    }
    code.to_string()
}

/// What follows the line that opens the body of `name`'s declaration in `code` (`function
/// name`, `const name =`, ..., up to the first line after it ending in `{`).
fn after_declaration<'a>(code: &'a str, name: &str) -> Option<&'a str> {
    if name.is_empty() {
        return None;
    }
    let declares = |line: &str| {
        let line = line.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let line = line.strip_prefix("async ").unwrap_or(line);
        ["function ", "const ", "let ", "var "].iter().any(|kw| {
            line.strip_prefix(kw)
                .map(|rest| rest.trim_start())
                .and_then(|rest| rest.strip_prefix(name))
                .is_some_and(|rest| {
                    !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
                })
        })
    };
    let mut offset = 0;
    let mut declared = false;
    for line in code.split_inclusive('\n') {
        offset += line.len();
        declared = declared || declares(line);
        if declared && line.trim_end().ends_with('{') {
            return Some(&code[offset..]);
        }
    }
    None
}

/// How completions are generated for a suite.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSettings {
    /// Samples per problem.
    pub samples: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    /// Sample `s` of every problem is drawn with seed `seed + s`.
    pub seed: u64,
    /// Requests generated together in one batch.
    pub batch: usize,
    /// Ask through the chat template for the whole function and take the body from the
    /// reply's code block, instead of completing the prompt as text.
    pub chat: bool,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            samples: 1,
            temperature: 0.0,
            top_p: 0.95,
            max_tokens: 384,
            seed: 42,
            batch: 16,
            chat: false,
        }
    }
}

/// Completions from the model, `samples` per problem in problem order, with each problem's
/// stop strings. The requests run `batch` at a time, grouped by prompt length so little padding
/// is computed. `on_done` is called once per completion, as it finishes.
pub fn generate_completions<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    settings: &GenerateSettings,
    cancel: &CancelToken,
    on_done: &mut dyn FnMut(),
) -> Result<Vec<Completion>> {
    let samples = settings.samples;
    if samples == 0 {
        return Err(Error::Setting("samples must be at least 1".into()));
    }
    let context = model.config.max_position_embeddings;
    // One request per (problem, sample), with its slot in `texts`, filled as requests finish.
    let mut pending = Vec::with_capacity(problems.len() * samples);
    let mut texts = vec![String::new(); problems.len() * samples];
    for (pi, p) in problems.iter().enumerate() {
        let text = if settings.chat {
            tokenizer.apply_chat_template(&[Message::user(chat_request(p))], true)?
        } else {
            p.prompt.clone()
        };
        let ids = tokenizer.encode(&text, true)?;
        // A prompt that fills the context gets an empty completion (and fails its tests).
        let room = context.saturating_sub(ids.len());
        for s in 0..samples {
            if room == 0 {
                on_done();
                continue;
            }
            pending.push((
                pi * samples + s,
                BatchRequest {
                    prompt_ids: ids.clone(),
                    options: GenerateOptions {
                        max_tokens: settings.max_tokens.min(room),
                        sampling: SamplingParams {
                            temperature: settings.temperature,
                            top_p: settings.top_p,
                            seed: settings.seed.wrapping_add(s as u64),
                            ..SamplingParams::default()
                        },
                        // A chat reply ends at its end-of-turn token; a completion at a stop string.
                        stop_strings: if settings.chat { Vec::new() } else { p.stops() },
                        top_logprobs: 0,
                    },
                },
            ));
        }
    }
    pending.sort_by_key(|(_, r)| r.prompt_ids.len());
    let (slots, requests): (Vec<usize>, Vec<BatchRequest>) = pending.into_iter().unzip();
    let lens: Vec<usize> = requests.iter().map(|r| r.prompt_ids.len()).collect();
    for group in batches(&lens, settings.batch.max(1)) {
        tracing::debug!(
            rows = group.len(),
            shortest = lens[group.start],
            longest = lens[group.end - 1],
            "generation batch"
        );
        let (chunk, chunk_slots) = (&requests[group.clone()], &slots[group]);
        let outs = generate_batch(model, adapters, tokenizer, chunk, cancel, &mut |_, _| {
            on_done()
        })?;
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        for (&slot, g) in chunk_slots.iter().zip(outs) {
            texts[slot] = if settings.chat {
                completion_from_chat(&problems[slot / samples], &g.text)
            } else {
                g.text
            };
        }
    }
    Ok(problems
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.task_id.clone(), samples))
        .zip(texts)
        .map(|(task_id, completion)| Completion {
            task_id,
            completion,
        })
        .collect())
}

/// Prompt lengths in ascending order cut into batches of at most `batch` rows whose longest
/// prompt is at most 1.5 times their shortest, plus 32 tokens: a row is padded to the longest
/// prompt of its batch, which costs compute and memory (MBPP-TS's longest prompt, 3,758
/// tokens, would pad six prompts of a few hundred to its length).
fn batches(lens: &[usize], batch: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        if i > start && (i - start == batch || len > lens[start] * 3 / 2 + 32) {
            out.push(start..i);
            start = i;
        }
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// `node -e` this to grade a program: it reads a [`GradeJob`] on stdin and prints the job's
/// proof only when every test ran to its end (its threat model is in the file).
const GRADER: &str = include_str!("grader.js");

/// What the grader is given, on stdin (read whole before the completion loads).
#[derive(Serialize)]
struct GradeJob<'a> {
    /// A secret of this run: seen in stdout only when the tests passed.
    proof: String,
    solution: &'a str,
    tests: &'a str,
    /// The names the tests take from the solution.
    names: &'a [String],
}

/// The names the tests take from the program: what the prompt declares at the top level, and
/// the entry point, less what the tests declare themselves.
pub fn shared_names(problem: &Problem) -> Vec<String> {
    // The patterns are constants: a bad one panics in every test, never first in a user's hands.
    #[allow(
        clippy::expect_used,
        reason = "constant data: a bad pattern fails every test"
    )]
    static DECLARED: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?m)^(?:export\s+)?(?:async\s+)?(?:function\*?|const|let|var|class)\s+([A-Za-z_$][\w$]*)",
        )
        .expect("a valid pattern")
    });
    #[allow(
        clippy::expect_used,
        reason = "constant data: a bad pattern fails every test"
    )]
    static TEST_DECLARED: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?:\b(?:function\*?|const|let|var|class)|\bimport\s+\*\s+as|\bimport)\s+([A-Za-z_$][\w$]*)",
        )
        .expect("a valid pattern")
    });
    // The grader's own parameters, and what strict mode forbids as one.
    const TAKEN: [&str; 6] = [
        "require",
        "exports",
        "module",
        "eval",
        "arguments",
        "assert",
    ];
    let own: std::collections::BTreeSet<&str> = TEST_DECLARED
        .captures_iter(&problem.test)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect();
    let mut names: Vec<String> = Vec::new();
    let declared = DECLARED
        .captures_iter(&problem.prompt)
        .filter_map(|c| c.get(1).map(|m| m.as_str()));
    for name in declared.chain([problem.entry_point.as_str()]) {
        if !name.is_empty()
            && !own.contains(name)
            && !TAKEN.contains(&name)
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_string());
        }
    }
    names
}

/// The program a completion is judged by: prompt and completion, then the names the tests
/// take, handed over as the module's exports.
pub fn solution_source(problem: &Problem, completion: &str, names: &[String]) -> String {
    let mut s = format!(
        "{}{}\n;module.exports = (() => {{ const __codelsi_names: any = {{}};",
        problem.prompt, completion
    );
    for n in names {
        s.push_str(&format!(
            " try {{ __codelsi_names.{n} = {n}; }} catch (_) {{}}"
        ));
    }
    s.push_str(" return __codelsi_names; })();\n");
    s
}

/// One scored sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResult {
    pub task_id: String,
    /// Index of this sample among its task's samples.
    pub sample: usize,
    pub completion: String,
    pub status: Status,
    /// The end of what the program (or the compiler) wrote, for failures.
    pub stderr_tail: String,
    pub seconds: f64,
}

/// Progress of scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalEvent {
    Transpiled {
        programs: usize,
    },
    Ran {
        done: usize,
        total: usize,
        passed: usize,
    },
}

/// What runs the programs: the transpiler, the sandbox, its limits, and how many at once.
#[derive(Debug)]
pub struct Harness {
    pub ts: TypeScript,
    pub sandbox: Sandbox,
    pub limits: Limits,
    /// Programs run at once; 0 for one per core.
    pub jobs: usize,
}

impl Harness {
    /// Find node and its sandbox, and the typescript package (installed on first use). Where
    /// no sandbox can be set up this fails, unless `allow_unsafe` (the user's explicit word
    /// that programs may run without one).
    pub fn new(
        limits: Limits,
        jobs: usize,
        allow_unsafe: bool,
        status: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let sandbox = Sandbox::detect(allow_unsafe, status)?;
        let ts = TypeScript::ensure(&sandbox.node, status)?;
        Ok(Self {
            ts,
            sandbox,
            limits,
            jobs,
        })
    }
}

/// Transpile and run every completion against its problem's tests. Completions for tasks not
/// in `problems` are an error (a mismatched file, not a failure). A program or tests with
/// syntax errors fail: `transpileModule` would recover from them into a program other than
/// the one written (a block left open swallows what follows it).
pub fn score(
    problems: &[Problem],
    completions: &[Completion],
    harness: &Harness,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(EvalEvent),
) -> Result<Vec<SampleResult>> {
    let (ts, sandbox, limits) = (&harness.ts, &harness.sandbox, &harness.limits);
    // Each problem once: its index among the tests, and the names its tests take.
    let mut by_id: BTreeMap<&str, (usize, &Problem, Vec<String>)> = BTreeMap::new();
    for p in problems {
        let next = by_id.len();
        by_id
            .entry(p.task_id.as_str())
            .or_insert_with(|| (next, p, shared_names(p)));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut jobs = Vec::with_capacity(completions.len());
    let mut sources = Vec::with_capacity(completions.len() + by_id.len());
    for c in completions {
        let (_, p, names) = by_id.get(c.task_id.as_str()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "completion for `{}`, which is not a problem of this suite",
                c.task_id
            ))
        })?;
        let n = counts.entry(p.task_id.as_str()).or_default();
        jobs.push((*p, c, *n));
        *n += 1;
        sources.push(solution_source(p, &c.completion, names));
    }
    let mut tests_of: Vec<&str> = vec![""; by_id.len()];
    for (i, p, _) in by_id.values() {
        tests_of[*i] = &p.test;
    }
    sources.extend(tests_of.iter().map(|t| t.to_string()));
    let mut compiled = ts.transpile(&sources)?;
    let tests = compiled.split_off(completions.len());
    progress(EvalEvent::Transpiled {
        programs: compiled.len(),
    });
    let work: Vec<(usize, std::result::Result<String, String>)> =
        compiled.into_iter().enumerate().collect();
    let run = |_: &mut (), (i, js): &(usize, std::result::Result<String, String>)| {
        let (p, c, sample) = &jobs[*i];
        let (index, _, names) = &by_id[p.task_id.as_str()];
        let (status, tail, seconds) = match (js, &tests[*index]) {
            (Err(diag), _) => (Status::Failed, format!("TypeScript: {diag}"), 0.0),
            (_, Err(diag)) => (
                Status::Failed,
                format!("the problem's tests: TypeScript: {diag}"),
                0.0,
            ),
            (Ok(js), Ok(tests)) => grade(sandbox, limits, js, tests, names),
        };
        SampleResult {
            task_id: p.task_id.clone(),
            sample: *sample,
            completion: c.completion.clone(),
            status,
            stderr_tail: tail,
            seconds,
        }
    };
    let total = work.len();
    let mut passed = 0;
    par_map(
        &work,
        crate::par::threads(harness.jobs),
        cancel,
        &|| (),
        &run,
        &mut |done, r: &SampleResult| {
            passed += usize::from(r.status == Status::Passed);
            progress(EvalEvent::Ran {
                done,
                total,
                passed,
            })
        },
    )
}

/// One program against its tests in the sandbox: passed only if the grader printed this run's
/// proof (every test ran to its end) and node exited cleanly.
fn grade(
    sandbox: &Sandbox,
    limits: &Limits,
    solution: &str,
    tests: &str,
    names: &[String],
) -> (Status, String, f64) {
    let job = GradeJob {
        proof: format!("{:032x}", rand::random::<u128>()),
        solution,
        tests,
        names,
    };
    let stdin = match serde_json::to_vec(&job) {
        Ok(b) => b,
        Err(e) => return (Status::Crashed, format!("encoding the program: {e}"), 0.0),
    };
    match sandbox.run_script(GRADER, &stdin, limits, Some(&job.proof)) {
        Ok(r) if r.status == Status::Passed && !r.marker_seen => (
            Status::Failed,
            format!(
                "exited before its tests had run to their end\n{}",
                r.output_tail
            ),
            r.seconds,
        ),
        // The proof means nothing once the run is over, and is noise in a report.
        Ok(r) => (r.status, r.output_tail.replace(&job.proof, ""), r.seconds),
        Err(e) => (Status::Crashed, format!("sandbox: {e}"), 0.0),
    }
}

/// The unbiased pass@k estimate for a task with `n` samples of which `c` passed:
/// 1 − C(n−c, k) / C(n, k), computed as a product to stay exact for large n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || n == 0 {
        return 0.0;
    }
    if n - c < k {
        return 1.0;
    }
    let mut fail = 1.0;
    for i in (n - c + 1)..=n {
        fail *= 1.0 - k as f64 / i as f64;
    }
    1.0 - fail
}

/// Per-task outcome in a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub samples: usize,
    pub passed: usize,
    /// The first sample's status (the greedy one when sampling is greedy).
    pub status: Status,
}

/// What `codelsi eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples that passed, of all samples.
    pub passed: usize,
    pub total: usize,
    /// Tasks with at least one sample.
    pub tasks: usize,
    pub pass_at_1: f64,
    /// pass@k for each k ≤ the fewest samples of any task, among 1, 10, 100.
    pub pass_at_k: BTreeMap<usize, f64>,
    pub statuses: BTreeMap<Status, usize>,
    pub per_task: Vec<TaskSummary>,
}

/// Summarise scored samples.
pub fn summarize(results: &[SampleResult]) -> Summary {
    let mut per: BTreeMap<&str, Vec<&SampleResult>> = BTreeMap::new();
    for r in results {
        per.entry(r.task_id.as_str()).or_default().push(r);
    }
    let min_n = per.values().map(Vec::len).min().unwrap_or(0);
    let mut at_k = BTreeMap::new();
    for k in [1usize, 10, 100] {
        if k <= min_n {
            let mean = per
                .values()
                .map(|v| {
                    let c = v.iter().filter(|r| r.status == Status::Passed).count();
                    pass_at_k(v.len(), c, k)
                })
                .sum::<f64>()
                / per.len().max(1) as f64;
            at_k.insert(k, mean);
        }
    }
    let mut statuses = BTreeMap::new();
    for r in results {
        *statuses.entry(r.status).or_default() += 1;
    }
    let per_task = per
        .iter()
        .map(|(id, v)| {
            let first = v
                .iter()
                .min_by_key(|r| r.sample)
                .map_or(Status::Failed, |r| r.status);
            TaskSummary {
                task_id: id.to_string(),
                samples: v.len(),
                passed: v.iter().filter(|r| r.status == Status::Passed).count(),
                status: first,
            }
        })
        .collect();
    Summary {
        passed: results
            .iter()
            .filter(|r| r.status == Status::Passed)
            .count(),
        total: results.len(),
        tasks: per.len(),
        pass_at_1: at_k.get(&1).copied().unwrap_or(0.0),
        pass_at_k: at_k,
        statuses,
        per_task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches keep their size while prompts are alike, and split where a long one would pad
    /// the rest.
    #[test]
    fn batches_split_where_padding_would_grow() {
        assert!(batches(&[], 4).is_empty());
        assert_eq!(batches(&[10, 11, 12, 13, 14], 2), vec![0..2, 2..4, 4..5]);
        // 100 → 182 is within 1.5 × 100 + 32; 183 is not; 3,758 pads nothing else.
        assert_eq!(
            batches(&[100, 150, 182, 183, 300, 3758], 16),
            vec![0..3, 3..5, 5..6]
        );
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 0, 1), 0.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 3, 2), 1.0);
    }

    #[test]
    fn chat_replies_become_completions() {
        let p = Problem {
            task_id: "t".into(),
            prompt: "/** doc */\nconst f = function (x: number) : number  {\n".into(),
            test: String::new(),
            entry_point: "f".into(),
            canonical_solution: None,
            language: Some("typescript".into()),
            stop_tokens: None,
        };
        let reply = "Sure:\n```typescript\nconst f = function (x: number) : number  {\n  return x;\n}\n```\nDone.";
        assert_eq!(completion_from_chat(&p, reply), "  return x;\n}\n");
        assert_eq!(completion_from_chat(&p, "  return x;\n}"), "  return x;\n}");
        // A rewritten signature: the body after the reply's own declaration of `f`.
        let arrow = "```ts\nconst f = (x: number): number => {\n  return x;\n};\n```";
        assert_eq!(completion_from_chat(&p, arrow), "  return x;\n};\n");
        let split = "```\nexport function f(\n  x: number,\n): number {\n  return x;\n}\n```";
        assert_eq!(completion_from_chat(&p, split), "  return x;\n}\n");
        // Another function of a longer name is not the entry point's declaration.
        let other = "```\nconst f2 = (x: number) => {\n  return x;\n};\n```";
        assert_eq!(completion_from_chat(&p, other), other[4..other.len() - 3]);
        assert!(chat_request(&p).contains("```typescript\n/** doc */"));
    }

    #[test]
    fn suites_load() {
        assert_eq!(load_suite("humaneval-ts").map(|s| s.len()).ok(), Some(161));
        assert_eq!(load_suite("mbpp-ts").map(|s| s.len()).ok(), Some(968));
        assert!(load_suite("no-such-suite").is_err());
    }
}
