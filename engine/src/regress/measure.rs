//! `codelsi measure`: a regression dataset from running programs. Each benchmark problem's
//! solution (the canonical one, or model samples) runs in the evaluation sandbox on its tests'
//! inputs scaled by several factors — arrays and strings repeated, integers multiplied — and its
//! latency and peak memory are recorded. The code the model is shown is the solution plus the
//! workload (the scale and the calls), so everything the cost depends on is in the text.

use std::time::Duration;

use serde::Deserialize;

use super::Example;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::eval::{Completion, Harness, Limits, Problem, Status};
use crate::par::par_map;

/// The metrics `measure` records.
pub const LATENCY: &str = "latency_ms";
/// The program's own memory, in KB: how much the process's resident set grew from just before
/// the workload built its inputs to just after its first (cold) pass over them. Node's own
/// 40–60 MB, which varies with the machine and node's version more than with the program, is
/// not in it. Only the first pass counts: the repeats that time a fast program leave garbage
/// (thousands of cloned inputs) that would measure the repeat count, not the program.
///
/// It is the resident set *after* the pass, a lower bound of the peak within it (V8 keeps the
/// pages it collected for a while, so it is close for a short pass). The process's peak
/// (`process.resourceUsage().maxRSS`, getrusage) cannot be used: Linux carries into it the
/// resident set of the process that forked it (`exec` folds the old address space's peak
/// into the new one's), so it measured this engine's own memory — a dataset measured in one
/// big run read 19 MB more than a small one for every program. Linux counts resident memory
/// in pages and, per thread, in batches (steps of 128 KB were what node showed on the 2-core
/// VM), so small programs tie; a growth under one page is recorded as one page,
/// [`MEMORY_FLOOR_KB`] (a zero has no logarithm).
pub const PEAK_MEMORY: &str = "peak_kb";
/// The least [`PEAK_MEMORY`] recorded: one page.
pub const MEMORY_FLOOR_KB: f64 = 4.0;

/// How to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureSettings {
    /// Each input scaled by each of these.
    pub scales: Vec<u32>,
    /// Repeat a workload until its calls took this long in all, and, when the first (cold) run
    /// was shorter than this, at least three times after it. The latency is the median of the
    /// runs after the first (the first alone for slow programs), so one scheduler stall on a
    /// busy machine cannot set it, as it could a mean of two runs.
    pub min_ms: f64,
    pub limits: Limits,
}

impl Default for MeasureSettings {
    fn default() -> Self {
        Self {
            scales: vec![1, 10, 100, 1000],
            min_ms: 20.0,
            limits: Limits {
                cpu_secs: 5,
                wall: Duration::from_secs(10),
                memory_bytes: 4 << 30,
                output_bytes: 64 << 10,
                ..Limits::default()
            },
        }
    }
}

/// One program to measure at every scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub task_id: String,
    /// `canonical`, or `sample N`.
    pub source: String,
    pub entry_point: String,
    /// The solution: the problem's prompt and its body.
    pub solution: String,
    /// Each test call's argument list, as written in the tests.
    pub calls: Vec<String>,
}

/// The argument lists of the calls `let actual_N = entry(ARGS);` in an MBXP test.
pub fn test_calls(test: &str, entry_point: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in test.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("let actual_") else {
            continue;
        };
        let Some(eq) = rest.find(" = ") else { continue };
        let expr = rest[eq + 3..].trim_end_matches(';').trim();
        let Some(args) = expr
            .strip_prefix(entry_point)
            .and_then(|a| a.strip_prefix('('))
        else {
            continue;
        };
        // The call's own parenthesis must be the one that closes at the end.
        if closing_paren(args) == Some(args.len() - 1) {
            out.push(args[..args.len() - 1].to_string());
        }
    }
    out
}

/// The index of the `)` closing an already open parenthesis, skipping brackets and strings.
fn closing_paren(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                if depth == 0 {
                    return (c == ')').then_some(i);
                }
                depth -= 1;
            }
            _ => {}
        }
    }
    None
}

/// The workloads of `problems`: their canonical solutions, and `completions` (model samples,
/// `task_id` + `completion`) when given. Problems whose tests have no call of the form MBXP
/// writes are left out; their ids are returned.
pub fn workloads(
    problems: &[Problem],
    completions: Option<&[Completion]>,
) -> (Vec<Workload>, Vec<String>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for p in problems {
        let calls = test_calls(&p.test, &p.entry_point);
        if calls.is_empty() {
            skipped.push(p.task_id.clone());
            continue;
        }
        let mut add = |source: String, body: &str| {
            out.push(Workload {
                task_id: p.task_id.clone(),
                source,
                entry_point: p.entry_point.clone(),
                solution: format!("{}{}", p.prompt, body),
                calls: calls.clone(),
            })
        };
        match completions {
            None => {
                if let Some(body) = &p.canonical_solution {
                    add("canonical".into(), body);
                }
            }
            Some(cs) => {
                for (i, c) in cs.iter().filter(|c| c.task_id == p.task_id).enumerate() {
                    add(format!("sample {i}"), &c.completion);
                }
            }
        }
    }
    (out, skipped)
}

impl Workload {
    /// The code the model is shown: the solution, the scale, and the calls.
    pub fn text(&self, scale: u32) -> String {
        let mut s = format!(
            "{}\n\n// Workload: the inputs below, arrays and strings repeated and integers \
             multiplied by SCALE.\nconst SCALE = {scale};\n",
            self.solution.trim_end()
        );
        for c in &self.calls {
            s.push_str(&format!("{}({c});\n", self.entry_point));
        }
        s
    }

    /// The program that runs: the solution, then the timed workload and its report.
    fn program(&self, scale: u32, min_ms: f64) -> String {
        let args: Vec<String> = self
            .calls
            .iter()
            .map(|c| format!("([{c}] as any[]).map(__scale)"))
            .collect();
        let args = args.join(", ");
        format!(
            "{solution}\n;\n\
             const __k = {scale};\n\
             function __scale(v: any): any {{\n\
               if (Array.isArray(v)) {{ const out: any[] = []; for (let r = 0; r < __k; r++) for (const x of v) out.push(__scale(x)); return out; }}\n\
               if (typeof v === 'string') return v.repeat(__k);\n\
               if (typeof v === 'number' && Number.isInteger(v)) return v * __k;\n\
               return v;\n\
             }}\n\
             const __rss0 = process.memoryUsage.rss();\n\
             const __inputs: any[][] = [{args}];\n\
             let __total = 0, __first = 0, __reps = 0, __own = 0; const __times: number[] = [];\n\
             while (__reps < 10000 && (__reps === 0 || __total < {min_ms} || (__reps < 4 && __first < {min_ms}))) {{\n\
               const __in = __reps === 0 ? __inputs : structuredClone(__inputs);\n\
               const __t = process.hrtime.bigint();\n\
               for (const a of __in) ({entry} as any)(...a);\n\
               const __ms = Number(process.hrtime.bigint() - __t) / 1e6;\n\
               if (__reps === 0) {{ __first = __ms; __own = (process.memoryUsage.rss() - __rss0) / 1024; }} else __times.push(__ms);\n\
               __total += __ms; __reps++;\n\
             }}\n\
             __times.sort((a, b) => a - b);\n\
             const __ms = __times.length > 0 ? __times[Math.floor(__times.length / 2)] : __first;\n\
             console.log({MARKER:?} + JSON.stringify({{ ms: __ms, reps: __reps, own_kb: Math.max({MEMORY_FLOOR_KB:?}, __own) }}));\n",
            solution = self.solution,
            entry = self.entry_point,
        )
    }
}

const MARKER: &str = "__codelsi_measured__";

#[derive(Deserialize)]
struct Report {
    ms: f64,
    own_kb: f64,
}

/// Why a run gave no example.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub task_id: String,
    pub source: String,
    pub scale: u32,
    pub why: String,
}

/// Progress of measuring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureEvent {
    Transpiled {
        programs: usize,
    },
    Ran {
        done: usize,
        total: usize,
        kept: usize,
    },
}

/// Run every workload at every scale, on every core; returns the examples (`code`, metrics
/// [`LATENCY`] and [`PEAK_MEMORY`], `group` = the task) and the runs that gave none (errors,
/// time or memory limits). `None` when cancelled.
pub fn measure(
    workloads: &[Workload],
    settings: &MeasureSettings,
    harness: &Harness,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(MeasureEvent),
) -> Result<Option<(Vec<Example>, Vec<Dropped>)>> {
    if settings.scales.is_empty() || settings.scales.contains(&0) {
        return Err(Error::Setting(
            "scales must be one or more whole numbers from 1".into(),
        ));
    }
    let runs: Vec<(&Workload, u32)> = workloads
        .iter()
        .flat_map(|w| settings.scales.iter().map(move |&s| (w, s)))
        .collect();
    let sources: Vec<String> = runs
        .iter()
        .map(|(w, s)| w.program(*s, settings.min_ms))
        .collect();
    let compiled = harness.ts.transpile(&sources)?;
    progress(MeasureEvent::Transpiled {
        programs: compiled.len(),
    });
    let work: Vec<usize> = (0..runs.len()).collect();
    let run = |_: &mut (), &i: &usize| -> std::result::Result<Example, Dropped> {
        let (w, scale) = runs[i];
        let drop = |why: String| Dropped {
            task_id: w.task_id.clone(),
            source: w.source.clone(),
            scale,
            why,
        };
        let js = compiled[i]
            .as_ref()
            .map_err(|d| drop(format!("TypeScript: {d}")))?;
        let r = harness
            .sandbox
            .run_js(js, &settings.limits, Some(MARKER))
            .map_err(|e| drop(format!("sandbox: {e}")))?;
        if r.status != Status::Passed {
            return Err(drop(format!("{:?}: {}", r.status, r.output_tail)));
        }
        let line = r
            .marker_line
            .ok_or_else(|| drop("the workload did not report".into()))?;
        let rep: Report =
            serde_json::from_str(&line).map_err(|e| drop(format!("report `{line}`: {e}")))?;
        Ok(Example {
            code: w.text(scale),
            metrics: [
                (LATENCY.to_string(), rep.ms),
                (PEAK_MEMORY.to_string(), rep.own_kb),
            ]
            .into(),
            group: Some(w.task_id.clone()),
        })
    };
    let total = work.len();
    let mut kept = 0;
    let results = match par_map(
        &work,
        crate::par::threads(harness.jobs),
        cancel,
        &|| (),
        &run,
        &mut |done, r| {
            kept += usize::from(r.is_ok());
            progress(MeasureEvent::Ran { done, total, kept })
        },
    ) {
        Ok(r) => r,
        Err(Error::Cancelled) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (mut examples, mut dropped) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(e) => examples.push(e),
            Err(d) => dropped.push(d),
        }
    }
    Ok(Some((examples, dropped)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_calls_of_mbxp_tests() {
        let test = "\nimport * as assert from 'assert'\n\nlet actual_1 = min_cost([[1, 2, 3], [4, 8, 2]],2,2);\n\
                    let expected_1 = 8;\nlet actual_2 = min_cost(\"a)\", 3);\nlet actual_3 = min_cost(1)(2);\n\
                    let actual_4 = other(1);\n";
        assert_eq!(
            test_calls(test, "min_cost"),
            vec!["[[1, 2, 3], [4, 8, 2]],2,2".to_string(), "\"a)\", 3".into()]
        );
    }
}
