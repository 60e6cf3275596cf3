//! The latency of every configuration of the quantised-matmul kernels on this adapter: the
//! data for a regression adapter that predicts a configuration's latency from its text, as
//! "Regression Language Models for Code" does for Triton kernels, and a tuning report of its
//! own (the fastest configuration of each problem beside the one the engine runs). Behind
//! `codelsi measure --suite kernels`.
//!
//! A case is one problem (format, rows of x, shape of W) and one [`QPlan`]. Each plan's result
//! is checked against the reference product before it is timed, so a layout that computes
//! something else never makes it into the data.

use std::time::Instant;

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::backend::Backend as _;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::QTensor;
use super::qmatmul::{MAX_WORKGROUP, QPlan, QShape, q_matmul_planned};
use super::reference;
use crate::cancel::CancelToken;
use crate::device::Wgpu;
use crate::error::{Error, Result};
use crate::quant::{QFormat, QMatrix};

/// What to time.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    pub formats: Vec<QFormat>,
    /// Shapes `[n, k]` of W.
    pub shapes: Vec<[usize; 2]>,
    /// Rows of x (1: decode; more: batched decode and prefill).
    pub rows: Vec<usize>,
    /// Each case repeats until it has run this long (after a first, untimed launch).
    pub min_secs: f64,
}

impl Default for SweepSettings {
    /// The default model's (SmolLM2-135M) projections — attention q/o, k/v, MLP gate/up,
    /// down — in its weights' format and in Q8_0, at decode and prefill row counts.
    fn default() -> Self {
        Self {
            formats: vec![QFormat::Q4_1, QFormat::Q8_0],
            shapes: vec![[576, 576], [192, 576], [1536, 576], [576, 1536]],
            rows: vec![1, 2, 4, 8, 16, 32, 64, 128],
            min_secs: 0.02,
        }
    }
}

/// Every layout the kernels take: the mat-vec kernel at each power-of-two split of 32 to 256
/// threads into lanes per row and rows per workgroup, the row-block kernel and the tiled one.
pub fn plans() -> Vec<QPlan> {
    let mut plans = Vec::new();
    for lanes in [1, 2, 4, 8, 16, 32, 64] {
        let mut rows = 1;
        while lanes * rows <= MAX_WORKGROUP {
            if lanes * rows >= 32 {
                plans.push(QPlan::Vector { lanes, rows });
            }
            rows *= 2;
        }
    }
    plans.push(QPlan::RowBlocks);
    plans.push(QPlan::Tiled);
    plans
}

/// One problem and one way to run it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelCase {
    pub format: QFormat,
    /// Rows of x.
    pub m: usize,
    /// Rows of W.
    pub n: usize,
    /// Columns of x and W.
    pub k: usize,
    pub plan: QPlan,
}

impl KernelCase {
    /// The configuration as the regression adapter reads it: the shader, its template
    /// constants, the launch and the problem. The shader's source is left out on purpose: it
    /// is the same text for every case of one shader, so it would cost prompt tokens and tell
    /// the model nothing the file name does not.
    pub fn text(&self) -> String {
        let (wg, grid) = self.plan.launch(self.m, self.n);
        let constants = match self.plan {
            QPlan::Vector { lanes, rows } => format!("LANES = {lanes}, ROWS = {rows}, "),
            QPlan::RowBlocks | QPlan::Tiled => String::new(),
        };
        format!(
            "{}: {constants}@workgroup_size({}, {}, {}), dispatch ({}, {}, {})\n\
             y[{m}, {n}] = x[{m}, {k}] (f32) · W[{n}, {k}]ᵀ ({:?})\n",
            self.plan.shader(),
            wg.x,
            wg.y,
            wg.z,
            grid[0],
            grid[1],
            grid[2],
            self.format,
            m = self.m,
            n = self.n,
            k = self.k,
        )
    }

    /// The problem, without the plan: the group of the held-out split, so the adapter is
    /// scored on problems it never saw.
    pub fn problem(&self) -> String {
        format!("{:?} m={} n={} k={}", self.format, self.m, self.n, self.k)
    }
}

/// Every case of `settings`, problem by problem.
pub fn cases(settings: &SweepSettings) -> Result<Vec<KernelCase>> {
    for &[n, k] in &settings.shapes {
        if n == 0 || k == 0 || k % 32 != 0 {
            return Err(Error::InvalidArgument(format!(
                "W of {n}×{k}: both sides must be positive and k a multiple of 32 (the block size)"
            )));
        }
    }
    if let Some(0) = settings.rows.iter().copied().min() {
        return Err(Error::InvalidArgument("rows of x must be positive".into()));
    }
    let plans = plans();
    let mut cases = Vec::new();
    for &format in &settings.formats {
        for &[n, k] in &settings.shapes {
            for &m in &settings.rows {
                cases.extend(plans.iter().map(|&plan| KernelCase {
                    format,
                    m,
                    n,
                    k,
                    plan,
                }));
            }
        }
    }
    Ok(cases)
}

/// A case and its time per launch.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub case: KernelCase,
    pub ms: f64,
}

/// Time `cases` on `device` (burn-wgpu), in order; `on_timed(done, total)` after each.
/// Neighbouring cases of one problem share its x and W (random, seeded by the problem).
/// `Ok(None)`: cancelled. An error: a plan's result differed from the reference product.
pub fn sweep(
    device: &WgpuDevice,
    cases: &[KernelCase],
    min_secs: f64,
    cancel: &CancelToken,
    on_timed: &mut dyn FnMut(usize, usize),
) -> Result<Option<Vec<Timed>>> {
    let mut timed = Vec::with_capacity(cases.len());
    let mut problem: Option<Problem> = None;
    for (i, case) in cases.iter().enumerate() {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        if !case.plan.is_valid() {
            return Err(Error::InvalidArgument(format!(
                "invalid kernel layout {:?}",
                case.plan
            )));
        }
        let p = match problem.take() {
            Some(p) if p.matches(case) => p,
            _ => Problem::new(case, device)?,
        };
        let (xt, wt, expected) = (&p.x, &p.w, &p.expected);

        // The first launch compiles the shader and is checked; it is not timed.
        let got = host(q_matmul_planned(xt.clone(), wt, None, case.plan))?;
        check(case, &got, expected)?;
        let run = |reps: usize| -> f64 {
            let start = Instant::now();
            for _ in 0..reps {
                let _ = q_matmul_planned(xt.clone(), wt, None, case.plan);
            }
            let _ = Wgpu::sync(device);
            start.elapsed().as_secs_f64()
        };
        let once = run(1);
        let reps = ((min_secs / once.max(1e-7)).ceil() as usize).clamp(1, 10_000);
        let ms = if reps == 1 {
            once * 1e3
        } else {
            run(reps) * 1e3 / reps as f64
        };
        timed.push(Timed { case: *case, ms });
        on_timed(i + 1, cases.len());
        problem = Some(p);
    }
    Ok(Some(timed))
}

/// One problem's tensors on the device (random, seeded by the problem) and its reference result.
struct Problem {
    format: QFormat,
    m: usize,
    n: usize,
    k: usize,
    x: Tensor<Wgpu, 2>,
    w: QTensor<Wgpu>,
    expected: Vec<f32>,
}

impl Problem {
    fn new(case: &KernelCase, device: &WgpuDevice) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64((case.m * 31 + case.n) as u64 * 131 + case.k as u64);
        let mut values =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let q = QMatrix::quantize(case.format, case.n, case.k, &values(case.n * case.k));
        let w = QTensor::from_qmatrix(&q, device);
        let x = Tensor::<Wgpu, 2>::from_data(
            TensorData::new(values(case.m * case.k), [case.m, case.k]),
            device,
        );
        let expected = host(reference::q_matmul(x.clone(), &w))?;
        Ok(Self {
            format: case.format,
            m: case.m,
            n: case.n,
            k: case.k,
            x,
            w,
            expected,
        })
    }

    fn matches(&self, case: &KernelCase) -> bool {
        (self.format, self.m, self.n, self.k) == (case.format, case.m, case.n, case.k)
    }
}

fn host(t: Tensor<Wgpu, 2>) -> Result<Vec<f32>> {
    t.into_data()
        .into_vec::<f32>()
        .map_err(|e| Error::KernelCheck(format!("reading a result back: {e:?}")))
}

/// The plan's result against the reference, to within float reordering.
fn check(case: &KernelCase, got: &[f32], expected: &[f32]) -> Result<()> {
    let scale = expected.iter().fold(1.0f32, |a, v| a.max(v.abs()));
    let worst = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let finite = got.iter().all(|v| v.is_finite());
    if got.len() != expected.len() || !finite || worst > 1e-3 * scale {
        return Err(Error::KernelCheck(format!(
            "{:?} on {}: off by {worst} of {scale}",
            case.plan,
            case.problem()
        )));
    }
    Ok(())
}

/// The fastest plan of one problem, beside the one the engine runs there.
#[derive(Debug, Clone)]
pub struct Best {
    pub problem: String,
    pub m: usize,
    pub ours: QPlan,
    /// None when the sweep did not time the engine's plan for this problem.
    pub ours_ms: Option<f64>,
    pub best: QPlan,
    pub best_ms: f64,
}

/// [`Best`] of each problem in `timed`, in the order the problems first appear; `shape` is the
/// engine's choice ([`QShape::for_adapter`]).
pub fn best_per_problem(timed: &[Timed], shape: QShape) -> Vec<Best> {
    let mut out: Vec<Best> = Vec::new();
    for t in timed {
        let problem = t.case.problem();
        let ours = shape.plan(t.case.m);
        let i = match out.iter().position(|b| b.problem == problem) {
            Some(i) => i,
            None => {
                out.push(Best {
                    problem,
                    m: t.case.m,
                    ours,
                    ours_ms: None,
                    best: t.case.plan,
                    best_ms: t.ms,
                });
                out.len() - 1
            }
        };
        let b = &mut out[i];
        if t.case.plan == ours {
            b.ours_ms = Some(t.ms);
        }
        if t.ms < b.best_ms {
            b.best = t.case.plan;
            b.best_ms = t.ms;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_valid_and_distinct() {
        let plans = plans();
        assert_eq!(plans.len(), 29);
        assert!(plans.iter().all(|p| p.is_valid()));
        for (i, p) in plans.iter().enumerate() {
            assert!(!plans[i + 1..].contains(p));
        }
        assert!(plans.contains(&QShape::GPU.plan(1)));
        assert!(plans.contains(&QShape::CPU.plan(1)));
        assert!(!QPlan::Vector { lanes: 3, rows: 8 }.is_valid());
        assert!(!QPlan::Vector { lanes: 64, rows: 8 }.is_valid());
    }

    #[test]
    fn case_text_names_the_layout_and_problem() {
        let case = KernelCase {
            format: QFormat::Q4_1,
            m: 2,
            n: 1536,
            k: 576,
            plan: QPlan::Vector { lanes: 16, rows: 8 },
        };
        assert_eq!(
            case.text(),
            "qmatvec.wgsl: LANES = 16, ROWS = 8, @workgroup_size(128, 1, 1), dispatch (192, 2, 1)\n\
             y[2, 1536] = x[2, 576] (f32) · W[1536, 576]ᵀ (Q4_1)\n"
        );
        assert_eq!(case.problem(), "Q4_1 m=2 n=1536 k=576");
        let bad = SweepSettings {
            shapes: vec![[64, 40]],
            ..SweepSettings::default()
        };
        assert!(cases(&bad).is_err());
    }

    #[test]
    fn best_is_the_fastest_and_ours_is_found() {
        let case = |plan, m| KernelCase {
            format: QFormat::Q8_0,
            m,
            n: 64,
            k: 64,
            plan,
        };
        let timed = [
            Timed {
                case: case(QPlan::Tiled, 8),
                ms: 3.0,
            },
            Timed {
                case: case(QPlan::RowBlocks, 8),
                ms: 1.0,
            },
            Timed {
                case: case(QPlan::Tiled, 1),
                ms: 2.0,
            },
        ];
        let best = best_per_problem(&timed, QShape::GPU);
        assert_eq!(best.len(), 2);
        assert_eq!(best[0].best, QPlan::RowBlocks);
        assert_eq!(best[0].ours, QPlan::Tiled);
        assert_eq!(best[0].ours_ms, Some(3.0));
        assert_eq!(best[1].ours_ms, None);
    }
}
