//! codelsi benchmarks (not tests: timings never decide pass/fail).
//!
//! `cargo run --release -p codelsi-benches -- [kernels|model|train|predict|all] [--model M] [--batches 1,8,32] [--seq N]
//! [--steps N] [--grad-checkpoint] [--activations auto|f16|f32] [--samples 16,64]`, and
//! `... -- import [--src DIR]... [--threads N] [--max-file-kb K]`
//!
//! `--device cpu` runs model, train and predict on the CPU path (burn-flex) instead of wgpu;
//! `--device cuda[:N]` on burn-cuda (a build with `--features cuda`). train and vs-cpu take
//! `--base-dtype bf16|f16|quantized` (default: bf16 on CUDA, the file's blocks elsewhere) and
//! `--quantize q8_0` (quantises an f32/bf16 model at load), as the CLI does.
//!
//! - train `--replicas N`: data-parallel over N devices (cuda:0.., or N logical replicas on the
//!   CPU), each on its share of a step's `--batch` rows (default: N).
//! - vs-cpu: the last position's logits of a 64-token prompt on the chosen device against the
//!   CPU path's on the same file (the CPU path is the one the golden tests hold to the
//!   reference): the largest difference relative to the largest logit, and whether the top
//!   tokens agree. Exits with an error past `--tol` (default 1e-2; a 16-bit base, held so on
//!   both sides, computes in 16 bits on CUDA: give it more).
//!
//! - kernels: device copy bandwidth (the roofline for a memory-bound mat-vec), then GB/s of the
//!   quantised mat-vec kernel per format and GFLOP/s of the tiled and row-block kernels.
//! - model: prefill and decode tokens/s of a model (default: the default model), then batched
//!   prefill and decode at the batch sizes of `--batches` (default 1,8,32).
//! - train: LoRA training tokens/s and peak device memory at seq 512, r = 16, alpha = 32, all
//!   seven projections (the setting of the CodeLSI paper), one 512-token row per step.
//! - predict: a regression adapter's prediction of one ~200-token program (`regress::predict`:
//!   the prompt once, then N answers of two numbers as one batch), seconds per prediction at
//!   each `--samples` (default 16,64). The adapter is untrained: the cost does not depend on
//!   its values.
//! - import: repository import throughput (MB/s of source parsed, pairs/s) on real TypeScript
//!   code from the npm registry (rxjs 7.8.1's `src/`, typescript 5.6.3's `lib/`), fetched with
//!   `npm pack` into the cache on first use; `--src` names other folders. No GPU needed.
//!
//! - cpu-kernels: the CPU path's quantised products (`cpu_quant.rs`): memory read bandwidth (the
//!   roofline of decode), then GB/s of weights and GMAC/s per format at 4096×4096 for 1, 16 and
//!   128 rows of x, then the projections of Qwen2.5-Coder-0.5B at one row (a decode step's
//!   products).
//! - cpu-vs-llama: the CPU path beside llama.cpp in one run, same GGUF, same prompt tokens, same
//!   threads (`--threads`, default: what the CPU path uses): prefill of `--prompt` tokens
//!   (default 512) and greedy decode of `--decode` tokens (default 128), as tokens/s and the ratio
//!   ours / llama.cpp, one model after another (`--models a,b`, default the three catalogue
//!   models). llama.cpp runs through `benches/llama_cpp_baseline.py` with `--python` (default
//!   `python3`; a venv with `llama-cpp-python`).
//!
//! Every timed region ends with a device sync.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend as _;
use burn::tensor::{Distribution, Tensor};
use codelsi_engine::device::{Wgpu, init_wgpu};
use codelsi_engine::kernels::qmatmul::{QShape, q_matmul_wgpu};
use codelsi_engine::kernels::{KernelBackend, QTensor};
use codelsi_engine::model::{BaseDtype, load_model, resolve_model};
use codelsi_engine::quant::{QFormat, QMatrix};

type B = Wgpu;

fn time<F: FnMut()>(device: &burn::backend::wgpu::WgpuDevice, reps: usize, mut f: F) -> f64 {
    f(); // warm-up: shader compile
    let _ = B::sync(device);
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let _ = B::sync(device);
    t.elapsed().as_secs_f64() / reps as f64
}

fn kernels(device: &burn::backend::wgpu::WgpuDevice) {
    let n_copy = 16 << 20; // 64 MiB of f32
    let x = Tensor::<B, 1>::random([n_copy], Distribution::Uniform(-1.0, 1.0), device);
    let s = time(device, 10, || {
        let _ = x.clone() * 1.0001;
    });
    let copy_gbs = 2.0 * 4.0 * n_copy as f64 / s / 1e9;
    println!("device copy (read+write 64 MiB): {copy_gbs:.2} GB/s  <- roofline for the mat-vec");
    let small = Tensor::<B, 2>::random([1, 576], Distribution::Uniform(-1.0, 1.0), device);
    let s = time(device, 200, || {
        let _ = small.clone() * 1.0001;
    });
    println!(
        "one small elementwise op (576 f32): {:.1} us per launch",
        s * 1e6
    );

    let (n, k) = (4096, 4096);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    for format in QFormat::EVERY {
        let q = QMatrix::quantize(format, n, k, &w);
        let qt = QTensor::<B>::from_qmatrix(&q, device);
        let bytes = q.gpu_bytes() as f64;
        let xv = Tensor::<B, 2>::random([1, k], Distribution::Uniform(-1.0, 1.0), device);
        let s = time(device, 20, || {
            let _ = <B as KernelBackend>::q_matmul(xv.clone(), &qt);
        });
        println!(
            "qmatvec {format:?} {n}x{k}: {:.3} ms, {:.2} GB/s of weights ({:.0}% of copy)",
            s * 1e3,
            bytes / s / 1e9,
            100.0 * bytes / s / 1e9 / copy_gbs
        );
        // Both kernel choices for more than one row (the adapter's own is starred): the tiled
        // kernel (GPUs) and the row-block kernel (CPU adapters).
        let ours = QShape::for_adapter();
        for m in [8, 128] {
            let xm = Tensor::<B, 2>::random([m, k], Distribution::Uniform(-1.0, 1.0), device);
            let mut line = format!("qmatmul {format:?} m={m}:");
            for (name, shape) in [("tiled", QShape::GPU), ("row-block", QShape::CPU)] {
                let s = time(device, 3, || {
                    let _ = q_matmul_wgpu(xm.clone(), &qt, shape);
                });
                let star = if shape == ours { "*" } else { "" };
                line += &format!(
                    " {name}{star} {:.1} ms, {:.2} GFLOP/s;",
                    s * 1e3,
                    2.0 * (m * n * k) as f64 / s / 1e9
                );
            }
            if m == 128 {
                let dense =
                    Tensor::<B, 2>::random([k, n], Distribution::Uniform(-1.0, 1.0), device);
                let s_dense = time(device, 3, || {
                    let _ = xm.clone().matmul(dense.clone());
                });
                line += &format!(
                    " burn f32 matmul {:.2} GFLOP/s",
                    2.0 * (m * n * k) as f64 / s_dense / 1e9
                );
            }
            println!("{line}");
        }
    }
}

fn model<B: KernelBackend>(device: &B::Device, spec: &str, batches: &[usize]) -> Result<()> {
    let path = resolve_model(spec, &mut |_| {})?;
    let loaded = load_model::<B>(&path, None, device, &mut |_| {})?;
    let m = &loaded.model;
    let prompt: Vec<u32> = loaded.tokenizer.encode(
        &"export function parse(input: string): Token[] { const out = []; ".repeat(8),
        false,
    )?;
    let prompt = &prompt[..prompt.len().min(128)];
    // Warm-up: compile every shader once.
    let mut cache = m.new_cache(1, prompt.len() + 64);
    let _ = m.forward(prompt, &mut cache, false)?.into_data();
    let _ = m.forward(&[1], &mut cache, false)?.into_data();

    let mut cache = m.new_cache(1, prompt.len() + 64);
    let t = Instant::now();
    let _ = m.forward(prompt, &mut cache, false)?.into_data();
    let prefill = t.elapsed().as_secs_f64();
    let steps = 32;
    let t = Instant::now();
    for i in 0..steps {
        let _ = m
            .forward(&[(i * 37 % 1000) as u32 + 100], &mut cache, false)?
            .into_data();
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "model {}: prefill {} tokens {:.1} tok/s; decode {:.2} tok/s ({:.0} ms/token, logits read back each step); weights {:.1} MB on the device",
        path.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        prompt.len(),
        prompt.len() as f64 / prefill,
        steps as f64 / decode,
        decode / steps as f64 * 1e3,
        m.device_bytes() as f64 / 1e6
    );

    // Batched decode (eval suites, n samples): one step advances every row. A short prompt
    // keeps the batch's prefill quick; a step's cost hardly depends on the cache length here.
    let adapters = codelsi_engine::models::llama::Adapters::none();
    let prompt = &prompt[..prompt.len().min(32)];
    for &batch in batches {
        let tokens: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
        let pads = vec![0; batch];
        let mut cache = m.new_cache(batch, prompt.len() + 64);
        let t = Instant::now();
        let _ = m
            .forward_batch(&tokens, &pads, &mut cache, adapters)?
            .into_data();
        let prefill = t.elapsed().as_secs_f64();
        let steps = 8;
        let next: Vec<u32> = (0..batch as u32).map(|i| 100 + i).collect();
        let t = Instant::now();
        for _ in 0..steps {
            let _ = m
                .forward_batch(&next, &pads, &mut cache, adapters)?
                .into_data();
        }
        let decode = t.elapsed().as_secs_f64();
        println!(
            "  batch {batch:>3}: prefill {:.1} tok/s; decode {:.2} tok/s ({:.0} ms/step)",
            (batch * prompt.len()) as f64 / prefill,
            (batch * steps) as f64 / decode,
            decode / steps as f64 * 1e3
        );
    }
    Ok(())
}

#[allow(
    clippy::too_many_arguments,
    reason = "the bench's settings, each a flag of its own"
)]
fn train_bench<B: KernelBackend>(
    device: &B::Device,
    spec: &str,
    seq: usize,
    steps: usize,
    grad_checkpoint: bool,
    activations: codelsi_engine::train::Activations,
    quantize: Option<QFormat>,
    replicas: &[B::Device],
) -> Result<()> {
    use burn::backend::Autodiff;
    use codelsi_engine::cancel::CancelToken;
    use codelsi_engine::train::data::Row;
    use codelsi_engine::train::{
        Parallel, Replica, TrainConfig, TrainEvent, TrainJob, train_parallel,
    };

    let path = resolve_model(spec, &mut |_| {})?;
    let loaded = load_model::<Autodiff<B>>(&path, quantize, device, &mut |_| {})?;
    // Replicas 1..: the model again on each further device (shared on the same device).
    let others = replicas
        .iter()
        .skip(1)
        .filter(|d| *d != device)
        .map(|d| load_model::<Autodiff<B>>(&path, quantize, d, &mut |_| {}))
        .collect::<codelsi_engine::Result<Vec<_>>>()?;
    let mut others_iter = others.iter();
    let par = Parallel {
        replicas: replicas
            .iter()
            .skip(1)
            .enumerate()
            .map(|(k, d)| Replica {
                model: if d == device {
                    &loaded.model
                } else {
                    others_iter.next().map_or(&loaded.model, |m| &m.model)
                },
                frozen: &[],
                name: format!("replica {}", k + 1),
            })
            .collect(),
        first: "replica 0".into(),
        fault: None,
        nodes: None,
    };
    let count = par.count();
    let text = "export function parse(input: string): Token[] {\n  const out: Token[] = [];\n  for (const c of input) { out.push({ kind: kindOf(c), text: c }); }\n  return out;\n}\n";
    let mut tokens = loaded.tokenizer.encode(&text.repeat(64), false)?;
    tokens.truncate(seq);
    let n = tokens.len();
    let row = Row {
        positions: (0..n).collect(),
        segments: vec![0; n],
        parents: vec![],
        labels: (0..n).map(|i| tokens.get(i + 1).copied()).collect(),
        tokens,
    };
    // One row per replica a step.
    let rows = vec![row; 4 * count];
    let config = TrainConfig {
        max_steps: Some(steps.max(2)),
        batch: count,
        checkpoint_every: 0,
        grad_checkpoint,
        activations,
        ..TrainConfig::default()
    };
    let out = std::env::temp_dir().join(format!("codelsi-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut times = vec![];
    let mut t = Instant::now();
    let mut peak = None;
    let mut trainable = 0;
    let mut act = "";
    let summary = train_parallel(
        TrainJob {
            model: &loaded.model,
            frozen: &[],
            train: &rows,
            val: &[],
            config: &config,
            out: &out,
            base_model: "bench",
            run: Default::default(),
            resume: false,
            objective: None,
            init: None,
        },
        &par,
        &CancelToken::new(),
        &mut |e| match e {
            TrainEvent::Started {
                trainable_params,
                activations,
                ..
            } => {
                trainable = trainable_params;
                act = activations;
            }
            TrainEvent::Step { peak_bytes, .. } => {
                times.push(t.elapsed().as_secs_f64());
                t = Instant::now();
                peak = peak_bytes;
            }
            _ => {}
        },
    )?;
    let _ = std::fs::remove_dir_all(&out);
    // The first step compiles every shader; time the rest.
    let timed = &times[1..];
    let per_step = timed.iter().sum::<f64>() / timed.len() as f64;
    println!(
        "train {} (weights: {}){}{}, {act} activations: seq {n}, r=16 alpha=32 all 7 projections, {} trainable: {:.1} tok/s ({:.2} s/step over {} steps after warm-up), peak device memory {}; loss {:.3} → {:.3}",
        path.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        loaded.info.quantization,
        if grad_checkpoint {
            " (gradient checkpointing)"
        } else {
            ""
        },
        if count > 1 {
            format!(", {count} replicas (one row each a step; peak memory is replica 0's)")
        } else {
            String::new()
        },
        trainable,
        (n * count) as f64 / per_step,
        per_step,
        timed.len(),
        peak.map_or("n/a".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
        summary.losses.first().map_or(f64::NAN, |l| l.1),
        summary.losses.last().map_or(f64::NAN, |l| l.1),
    );
    Ok(())
}

/// An npm package's folder, unpacked into the cache on first use.
fn npm_package(spec: &str, sub: &str) -> Result<std::path::PathBuf> {
    let root = codelsi_engine::fetch::cache_dir()
        .join("bench-src")
        .join(spec.replace('@', "-"));
    let dir = root.join("package").join(sub);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    let out = std::process::Command::new("npm")
        .args(["pack", spec, "--silent"])
        .current_dir(&root)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "npm pack {spec} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tgz = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let st = std::process::Command::new("tar")
        .args(["xzf", &tgz])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(st.success(), "tar xzf {tgz} failed");
    Ok(dir)
}

fn import_bench(args: &[String], model: &str) -> Result<()> {
    use codelsi_engine::cancel::CancelToken;
    use codelsi_engine::import::{ImportOptions, import_repo};
    let value = |flag: &str| flag_value(args, flag);
    let mut sources: Vec<std::path::PathBuf> = args
        .windows(2)
        .filter(|w| w[0] == "--src")
        .map(|w| w[1].clone().into())
        .collect();
    if sources.is_empty() {
        sources.push(npm_package("rxjs@7.8.1", "src")?);
        sources.push(npm_package("typescript@5.6.3", "lib")?);
    }
    let threads: usize = value("--threads").and_then(|s| s.parse().ok()).unwrap_or(0);
    let max_kb: u64 = value("--max-file-kb")
        .and_then(|s| s.parse().ok())
        .unwrap_or(16 * 1024);
    let path = resolve_model(model, &mut |_| {})?;
    let tokenizer = codelsi_engine::io::tokenizer::Tokenizer::from_model(&path)?;
    let opts = ImportOptions {
        threads,
        max_file_bytes: max_kb * 1024,
        force: true,
        ..ImportOptions::default()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "import: {cores} cores, threads {}",
        if threads == 0 { cores } else { threads }
    );
    for src in sources {
        let out = std::env::temp_dir().join(format!("codelsi-import-bench-{}", std::process::id()));
        let mut secs = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let t = Instant::now();
            let r = import_repo(
                &src,
                &out,
                &tokenizer,
                &opts,
                &CancelToken::new(),
                &mut |_| {},
            )?;
            secs.push(t.elapsed().as_secs_f64());
            last = Some(r);
        }
        let _ = std::fs::remove_dir_all(&out);
        let Some(r) = last else { continue };
        secs.sort_by(f64::total_cmp);
        let s = secs[1];
        let pairs = r.pairs.train + r.pairs.val;
        println!(
            "{}: {} files parsed ({:.2} MB), {} pairs extracted, {} kept; median of 3: {:.2} s, \
             {:.2} MB/s, {:.0} pairs/s (extracted {:.0}/s)",
            src.display(),
            r.files.parsed,
            r.bytes_parsed as f64 / 1e6,
            r.pairs.extracted,
            pairs,
            s,
            r.bytes_parsed as f64 / 1e6 / s,
            pairs as f64 / s,
            r.pairs.extracted as f64 / s,
        );
        println!(
            "  by kind {:?}; dropped {:?}; skipped {:?}; secrets {:?}",
            r.pairs.by_kind, r.pairs.dropped, r.files.skipped, r.secrets
        );
    }
    Ok(())
}

fn predict_bench<B: KernelBackend>(
    device: &B::Device,
    spec: &str,
    samples: &[usize],
) -> Result<()> {
    use codelsi_engine::adapter::{Adapter, LoraConfig, NewTokens};
    use codelsi_engine::regress::{self, PredictSettings, RegressionSpec, Regressor};
    let path = resolve_model(spec, &mut |_| {})?;
    let loaded = load_model::<B>(&path, None, device, &mut |_| {})?;
    let m = &loaded.model;
    let mut adapter = Adapter::<B>::init(LoraConfig::default(), &m.config, 1, device)?;
    let (embed, head) = regress::init_number_rows(m, &loaded.tokenizer)?;
    adapter.new_tokens = Some(NewTokens::from_host(
        embed,
        head,
        m.config.hidden_size,
        device,
    )?);
    let regressor = Regressor {
        spec: RegressionSpec::new(
            vec!["latency_ms".into(), "peak_kb".into()],
            500,
            m.config.vocab_size,
        ),
        adapter,
    };
    let code = "const sum_elements = function (test_tup: Array<number>) : number  {\n  var result = 0;\n  for (var i = 0; i < test_tup.length; i++) {\n    result += test_tup[i];\n  }\n  return result;\n}\n\n// Workload: the inputs below, arrays and strings repeated and integers multiplied by SCALE.\nconst SCALE = 100;\nsum_elements([7, 8, 9, 1, 10, 7]);\nsum_elements([1, 2, 3, 4, 5, 6]);\nsum_elements([11, 12, 13, 45, 14]);\n".to_string();
    let prompt_len = regressor
        .spec
        .prompt_tokens(&loaded.tokenizer, &code)?
        .len();
    let cancel = codelsi_engine::cancel::CancelToken::new();
    let run = |n: usize| -> Result<f64> {
        let t = Instant::now();
        regressor.predict(
            m,
            &loaded.tokenizer,
            std::slice::from_ref(&code),
            PredictSettings {
                samples: n,
                ..PredictSettings::default()
            },
            &cancel,
            &mut |_| {},
        )?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(2)?; // compile the shaders
    for &n in samples {
        let secs = run(n)?;
        println!(
            "predict: prompt {prompt_len} tokens, {n} samples × 12 number tokens: {secs:.2} s per prediction ({:.1} number tokens/s)",
            (n * 12) as f64 / secs
        );
    }
    Ok(())
}

/// Seconds per call of `f`, the best of `reps` after a warm-up.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The CPU path's quantised products, format by format, and a decode step's products.
fn cpu_kernels() {
    use codelsi_engine::kernels::cpu_quant::{
        Isa, QActs, QWeights, q_matmul, q_matmul_on, q_matmul_tiled,
    };
    use rayon::prelude::*;
    println!(
        "device: {}, {}",
        codelsi_engine::device::cpu_info(),
        codelsi_engine::kernels::cpu_quant::Isa::detect().name()
    );
    let big = vec![1u64; 64 << 20]; // 512 MiB
    let s = best_of(5, || {
        let sum: u64 = big.par_chunks(1 << 16).map(|c| c.iter().sum::<u64>()).sum();
        std::hint::black_box(sum);
    });
    println!(
        "memory read (512 MiB, every thread): {:.1} GB/s  <- roofline of a decode step",
        (big.len() * 8) as f64 / s / 1e9
    );
    drop(big);
    let values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect()
    };
    let run = |format: QFormat, n: usize, k: usize, rows: &[usize]| -> Vec<(usize, f64, f64)> {
        let q = QMatrix::quantize(format, n, k, &values(n * k));
        let w = QWeights::from(&q);
        let x = values(rows.iter().max().copied().unwrap_or(1) * k);
        rows.iter()
            .map(|&m| {
                let s = best_of(10, || {
                    std::hint::black_box(q_matmul(&x[..m * k], m, &w));
                });
                (m, s, q.gpu_bytes() as f64)
            })
            .collect()
    };
    for format in QFormat::EVERY {
        let line: Vec<String> = run(format, 4096, 4096, &[1, 16, 128])
            .into_iter()
            .map(|(m, s, bytes)| {
                format!(
                    "m {m}: {:.2} ms, {:.1} GB/s, {:.0} GMAC/s",
                    s * 1e3,
                    bytes / s / 1e9,
                    (m * 4096 * 4096) as f64 / s / 1e9
                )
            })
            .collect();
        println!("{format:?} 4096×4096: {}", line.join("; "));
        if format.is_half() {
            continue;
        }
        // Decode's fused products (x per block, as `q_matmul` takes one row) and prefill's
        // tiles (x per unit) on each instruction set this processor has, x quantised once.
        let (n, k) = (4096, 4096);
        let q = QMatrix::quantize(format, n, k, &values(n * k));
        let w = QWeights::from(&q);
        let decode = QActs::quantize_blocks(&values(k), 1, k, format.block_len());
        let prefill = QActs::quantize(&values(128 * k), 128, k);
        let isas: Vec<String> = Isa::available()
            .into_iter()
            .filter(|&isa| isa != Isa::Portable)
            .map(|isa| {
                let one = best_of(10, || {
                    std::hint::black_box(q_matmul_on(isa, &decode, &w));
                });
                let tiles = best_of(5, || {
                    std::hint::black_box(q_matmul_tiled(isa, &prefill, &w));
                });
                format!(
                    "{isa:?}: m 1 {:.1} GB/s, m 128 through tiles {:.0} GMAC/s",
                    q.gpu_bytes() as f64 / one / 1e9,
                    (128 * n * k) as f64 / tiles / 1e9
                )
            })
            .collect();
        println!("  {}", isas.join("; "));
    }
    // Qwen2.5-Coder-0.5B-Instruct Q4_K_M: 24 layers; per layer q and o 896², k and v 128×896,
    // gate and up 4864×896, down 896×4864; the tied head 151,936×896 (Q8_0). Most tensors are
    // Q5_0; the file's K-quant tensors are shown as Q5_0's shapes in Q4_K and Q6_K.
    // SmolLM2-135M-Instruct Q4_1: 30 layers; q and o 576², k and v 192×576, gate and up
    // 1536×576, down 576×1536; the tied head 49,152×576 (Q8_0 here).
    // (format, n, k, products of that shape in a step)
    type Shape = (QFormat, usize, usize, usize);
    let models: [(&str, &[Shape]); 2] = [
        (
            "Qwen2.5-Coder-0.5B",
            &[
                (QFormat::Q5_0, 896, 896, 48),
                (QFormat::Q5_0, 128, 896, 48),
                (QFormat::Q5_0, 4864, 896, 36),
                (QFormat::Q4K, 4864, 1024, 12),
                (QFormat::Q6K, 896, 4864, 12),
                (QFormat::Q5_0, 896, 4864, 12),
                (QFormat::Q8_0, 151936, 896, 1),
            ],
        ),
        (
            "SmolLM2-135M",
            &[
                (QFormat::Q4_1, 576, 576, 60),
                (QFormat::Q4_1, 192, 576, 60),
                (QFormat::Q4_1, 1536, 576, 60),
                (QFormat::Q4_1, 576, 1536, 30),
                (QFormat::Q8_0, 49152, 576, 1),
            ],
        ),
    ];
    for (model, shapes) in models {
        let (mut total, mut total_tiled) = (0.0, 0.0);
        for &(format, n, k, count) in shapes {
            let q = QMatrix::quantize(format, n, k, &values(n * k));
            let (w, x) = (QWeights::from(&q), values(k));
            let bytes = q.gpu_bytes() as f64;
            let s = best_of(10, || {
                std::hint::black_box(q_matmul(&x, 1, &w));
            });
            total += s * count as f64;
            // The same product through tiles, the path before the fused kernels, for comparison
            // (the same weight: the head alone takes seconds to quantise).
            let (acts, isa) = (QActs::quantize(&x, 1, k), Isa::detect());
            let tiled = best_of(10, || {
                std::hint::black_box(q_matmul_tiled(isa, &acts, &w));
            });
            total_tiled += tiled * count as f64;
            println!(
                "{model} decode shape {format:?} {n}×{k} (×{count}): {:.3} ms, {:.1} GB/s \
                 (through tiles: {:.3} ms, {:.1} GB/s)",
                s * 1e3,
                bytes / s / 1e9,
                tiled * 1e3,
                bytes / tiled / 1e9
            );
        }
        println!(
            "{model}: a decode step's products, about: {:.1} ms (through tiles: {:.1} ms)",
            total * 1e3,
            total_tiled * 1e3
        );
    }
}

/// Prefill and greedy-decode tokens/s of the CPU path and of llama.cpp on the same file, prompt
/// and threads, model by model: `--rounds` alternated rounds of each (the VMs this runs on swing
/// by tens of percent between runs), their medians and the ratios of the medians.
fn cpu_vs_llama(args: &[String]) -> Result<()> {
    use burn::backend::Flex;
    let models = flag_value(args, "--models")
        .unwrap_or("smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct");
    let python = flag_value(args, "--python").unwrap_or("python3");
    let prompt_len: usize = flag_value(args, "--prompt").unwrap_or("512").parse()?;
    let steps: usize = flag_value(args, "--decode").unwrap_or("128").parse()?;
    let rounds: usize = flag_value(args, "--rounds").unwrap_or("3").parse()?;
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    let threads = rayon::current_num_threads();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("llama_cpp_baseline.py");
    println!("device: {}", codelsi_engine::device::cpu_info());
    println!(
        "| model | codelsi prefill | llama.cpp prefill | ratio | codelsi decode | llama.cpp decode | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in models.split(',') {
        let path = resolve_model(name, &mut |_| {})?;
        let loaded = load_model::<Flex>(&path, None, &Default::default(), &mut |_| {})?;
        let m = &loaded.model;
        // Code, repeated to the length asked for: the same ids go to llama.cpp.
        let text = "export function parse(input: string): Token[] { const out = []; for (const c of input) { out.push(c); } return out; }\n";
        let mut prompt = loaded.tokenizer.encode(&text.repeat(prompt_len), false)?;
        prompt.truncate(prompt_len);
        let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
        // Warm-up, then per round the timed prefill and greedy decode of each.
        let mut cache = m.new_cache(1, 32);
        let _ = m.forward(&prompt[..16], &mut cache, false)?.into_data();
        let ours = || -> Result<(f64, f64)> {
            let mut cache = m.new_cache(1, prompt.len() + steps + 1);
            let t = Instant::now();
            let mut logits = m
                .forward(&prompt, &mut cache, false)?
                .into_data()
                .to_vec::<f32>()?;
            let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..steps {
                let next = argmax(&logits);
                logits = m
                    .forward(&[next], &mut cache, false)?
                    .into_data()
                    .to_vec::<f32>()?;
            }
            Ok((prefill, steps as f64 / t.elapsed().as_secs_f64()))
        };
        let anchor = || -> Result<(f64, f64)> {
            let out = std::process::Command::new(python)
                .arg(&script)
                .args([
                    "--gguf",
                    &path.to_string_lossy(),
                    "--threads",
                    &threads.to_string(),
                ])
                .args(["--tokens", &ids.join(","), "--decode", &steps.to_string()])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let anchor: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let number = |key: &str| anchor[key].as_f64().unwrap_or(f64::NAN);
            Ok((number("prefill_tok_s"), number("decode_tok_s")))
        };
        let (mut mine, mut theirs) = (vec![], vec![]);
        for _ in 0..rounds {
            mine.push(ours()?);
            theirs.push(anchor()?);
        }
        let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = v.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (prefill, decode) = (median(&mine, |r| r.0), median(&mine, |r| r.1));
        let (lp, ld) = (median(&theirs, |r| r.0), median(&theirs, |r| r.1));
        println!(
            "| {name} | {prefill:.1} tok/s | {lp:.1} tok/s | {:.2}× | {decode:.1} tok/s | {ld:.1} tok/s | {:.2}× |",
            prefill / lp,
            decode / ld
        );
    }
    println!(
        "(medians of {rounds} alternated rounds; prompt {prompt_len} tokens, decode {steps} greedy tokens, {threads} threads both; llama.cpp through llama-cpp-python)"
    );
    Ok(())
}

/// The index of the largest logit.
fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0 as u32
}

/// The comma-separated numbers after `flag` (`--batches 1,8,32`), or `default`'s.
fn list_arg(args: &[String], flag: &str, default: &str) -> Result<Vec<usize>> {
    Ok(flag_value(args, flag)
        .unwrap_or(default)
        .split(',')
        .map(|b| b.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// The argument after `flag` (`--model M`), if any.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn main() -> Result<()> {
    codelsi_engine::device::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = flag_value(&args, "--threads").map(str::parse).transpose()?;
    codelsi_engine::device::set_cpu_threads(threads);
    let what = args.first().map(String::as_str).unwrap_or("all");
    let spec = flag_value(&args, "--model").unwrap_or("default");
    if what == "import" {
        return import_bench(&args, spec);
    }
    if what == "cpu-vs-llama" {
        return cpu_vs_llama(&args);
    }
    if what == "cpu-kernels" {
        cpu_kernels();
        return Ok(());
    }
    let device_flag = flag_value(&args, "--device").unwrap_or("gpu");
    if what == "kernels" && device_flag != "gpu" {
        anyhow::bail!("the kernels bench times the WGSL kernels: run it without --device");
    }
    if device_flag == "cpu" {
        println!("device: {}", codelsi_engine::device::cpu_info());
        let replicas = vec![Default::default(); number_arg(&args, "--replicas", 1)];
        return backend_benches::<burn::backend::Flex>(
            &Default::default(),
            &replicas,
            &args,
            what,
            spec,
        );
    }
    if let Some(index) = device_flag.strip_prefix("cuda") {
        return cuda_benches(index.trim_start_matches(':'), &args, what, spec);
    }
    let (device, gpu) = init_wgpu()?;
    println!("adapter: {gpu}");
    if matches!(what, "kernels" | "all") {
        kernels(&device);
    }
    backend_benches::<B>(&device, std::slice::from_ref(&device), &args, what, spec)
}

/// `--device cuda[:N]`: the benches on burn-cuda, from device N (replicas on N, N+1, ...).
#[cfg(feature = "cuda")]
fn cuda_benches(index: &str, args: &[String], what: &str, spec: &str) -> Result<()> {
    use codelsi_engine::model::OpenDevice;
    let first: usize = if index.is_empty() { 0 } else { index.parse()? };
    let replicas = (first..first + number_arg(args, "--replicas", 1))
        .map(|i| burn::backend::Cuda::open_index(i).map(|(d, _)| d))
        .collect::<codelsi_engine::Result<Vec<_>>>()?;
    let (device, info) = burn::backend::Cuda::open_index(first)?;
    println!("device: {info}");
    backend_benches::<burn::backend::Cuda>(&device, &replicas, args, what, spec)
}

#[cfg(not(feature = "cuda"))]
fn cuda_benches(_: &str, _: &[String], _: &str, _: &str) -> Result<()> {
    anyhow::bail!(
        "--device cuda: build the benches with CUDA: cargo build --release -p codelsi-benches --features cuda"
    )
}

/// The number after `flag`, or `default`.
fn number_arg(args: &[String], flag: &str, default: usize) -> usize {
    flag_value(args, flag)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The last position's logits of a 64-token prompt on `device` against the CPU path's.
fn vs_cpu<B: KernelBackend>(
    device: &B::Device,
    spec: &str,
    base: Option<QFormat>,
    tol: f32,
) -> Result<()> {
    fn last_logits<Bk: KernelBackend>(
        device: &Bk::Device,
        path: &std::path::Path,
        base: Option<QFormat>,
    ) -> Result<(Vec<f32>, usize)> {
        let loaded = load_model::<Bk>(path, base, device, &mut |_| {})?;
        let prompt: Vec<u32> = loaded.tokenizer.encode(
            &"export function parse(input: string): Token[] { const out = []; ".repeat(8),
            false,
        )?;
        let prompt = &prompt[..prompt.len().min(64)];
        let mut cache = loaded.model.new_cache(1, prompt.len());
        let logits = loaded.model.forward(prompt, &mut cache, false)?;
        let v: Vec<f32> = logits
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let vocab = loaded.model.config.vocab_size;
        Ok((v[v.len() - vocab..].to_vec(), prompt.len()))
    }
    let path = resolve_model(spec, &mut |_| {})?;
    let (got, n) = last_logits::<B>(device, &path, base)?;
    // The CPU path holds the same base: its weights rounded the same way.
    let (want, _) = last_logits::<burn::backend::Flex>(&Default::default(), &path, base)?;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
            .0
    };
    println!(
        "vs-cpu {} (base {base:?}): {n}-token prompt, last logits: max |diff| {diff:.3e}, {:.3e} of max |logit| {scale:.2}; top token {} (device) vs {} (CPU path)",
        path.display(),
        diff / scale,
        argmax(&got),
        argmax(&want)
    );
    if diff / scale > tol {
        anyhow::bail!("the device's logits differ from the CPU path's by more than {tol:e}");
    }
    Ok(())
}

/// The benches that run on any backend: model, train, predict.
fn backend_benches<B: KernelBackend>(
    device: &B::Device,
    replicas: &[B::Device],
    args: &[String],
    what: &str,
    spec: &str,
) -> Result<()> {
    // `--base-dtype` and `--quantize` as the CLI takes them.
    let quantize = flag_value(args, "--quantize")
        .map(|s| QFormat::parse(s).ok_or_else(|| anyhow::anyhow!("--quantize {s}?")))
        .transpose()?;
    let base = flag_value(args, "--base-dtype")
        .map(|s| BaseDtype::parse(s).ok_or_else(|| anyhow::anyhow!("--base-dtype {s}?")))
        .transpose()?;
    let base = BaseDtype::format::<B>(base, quantize, device)?;
    if what == "vs-cpu" {
        let tol = flag_value(args, "--tol").map_or(Ok(1e-2), str::parse)?;
        return vs_cpu::<B>(device, spec, base, tol);
    }
    if matches!(what, "model" | "all") {
        model::<B>(device, spec, &list_arg(args, "--batches", "1,8,32")?)?;
    }
    if matches!(what, "train" | "all") {
        let number = |flag: &str, default: usize| {
            flag_value(args, flag)
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
        };
        let ckpt = args.iter().any(|a| a == "--grad-checkpoint");
        let act = flag_value(args, "--activations")
            .map_or(Ok(codelsi_engine::train::Activations::Auto), |s| {
                codelsi_engine::train::Activations::parse(s)
            })?;
        let (seq, steps) = (number("--seq", 512), number("--steps", 3));
        train_bench::<B>(device, spec, seq, steps, ckpt, act, base, replicas)?;
    }
    if matches!(what, "predict" | "all") {
        predict_bench::<B>(device, spec, &list_arg(args, "--samples", "16,64")?)?;
    }
    Ok(())
}
