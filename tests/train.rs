//! Training on a tiny random model (tests/fixtures/tiny_llama, quantised to Q8_0 at load so the
//! WGSL kernels run): the whole model's adapter gradient against the plain-tensor reference
//! path, an overfit run, resume after an interruption giving the uninterrupted loss curve,
//! gradient checkpointing giving the same run, f16 activations following the f32 run,
//! data-parallel replicas giving the one-device run, and a failing replica stopping cleanly.

use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;
use codelsi_engine::adapter::{Adapter, LoraConfig, Target};
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::io::{HostData, HostTensor, WeightSource};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::models::config::Config;
use codelsi_engine::models::llama::{Adapters, Llama, Packed};
use codelsi_engine::quant::QFormat;
use codelsi_engine::train::data::{self, PromptTemplate, Record, Row};
use codelsi_engine::train::{
    Activations, Decay, FaultCheck, Parallel, Replica, TrainConfig, TrainEvent, TrainJob,
    TrainSummary, evaluate, row_nll, train, train_parallel,
};
use codelsi_tests::{B, assert_close, device, random_values, randomized, tiny_q8, to_vec};

type AD = Autodiff<B>;

/// The training tests take turns: each one's kernels already spread over every core. (Dropout
/// no longer needs it: its masks come from the run's seed, not burn's per-process generator.)
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// In-memory weights with the scales of a trained model where it matters here: the tiny
/// fixture's random LM head (std 0.02) cannot produce confident logits after the final RMSNorm,
/// so no adapter could drive its loss near zero.
struct Weights(
    std::collections::HashMap<String, HostTensor>,
    std::path::PathBuf,
);

impl WeightSource for Weights {
    fn get(&self, name: &str) -> codelsi_engine::Result<Option<HostTensor>> {
        Ok(self.0.get(name).cloned())
    }
    fn path(&self) -> &std::path::Path {
        &self.1
    }
}

fn confident_tiny() -> Llama<AD> {
    confident_tiny_on::<B>(Some(QFormat::Q8_0), &device())
}

/// [`confident_tiny`] on any backend, quantised at load or not.
fn confident_tiny_on<Bk: KernelBackend>(
    quantize: Option<QFormat>,
    dev: &Bk::Device,
) -> Llama<Autodiff<Bk>> {
    let c = Config::tiny();
    let mut map = std::collections::HashMap::new();
    let mut seed = 500;
    let mut put = |name: String, shape: Vec<usize>, scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        let data = HostData::F32(random_values(n, seed).iter().map(|v| v * scale).collect());
        map.insert(name.clone(), HostTensor { name, shape, data });
    };
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    put("model.embed_tokens.weight".into(), vec![v, h], 1.0);
    put("lm_head.weight".into(), vec![v, h], 1.0);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, o, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            put(
                format!("{p}.{name}.weight"),
                vec![o, inp],
                (3.0 / inp as f32).sqrt(),
            );
        }
    }
    for n in (0..c.num_hidden_layers)
        .flat_map(|l| {
            [
                format!("model.layers.{l}.input_layernorm.weight"),
                format!("model.layers.{l}.post_attention_layernorm.weight"),
            ]
        })
        .chain(["model.norm.weight".to_string()])
    {
        map.insert(
            n.clone(),
            HostTensor {
                name: n,
                shape: vec![h],
                data: HostData::F32(vec![1.0; h]),
            },
        );
    }
    let src = Weights(map, "in-memory tiny model".into());
    Llama::load(c, &src, quantize, dev, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

fn records() -> Vec<Record> {
    let pairs = [
        (
            "add two numbers",
            "const add = (a: number, b: number) => a + b;",
        ),
        ("negate a boolean", "const not = (x: boolean) => !x;"),
        ("double it", "const double = (x: number) => 2 * x;"),
        ("say hi", "console.log('hi');"),
    ];
    pairs
        .iter()
        .map(|(i, o)| Record::Alpaca {
            instruction: i.to_string(),
            input: None,
            output: o.to_string(),
        })
        .collect()
}

fn rows(loaded: &LoadedModel<AD>, max_len: usize, pack: bool) -> Vec<Row> {
    let examples: Vec<_> = records()
        .iter()
        .filter_map(|r| {
            data::tokenize(r, &loaded.tokenizer, PromptTemplate::Alpaca, max_len)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    assert_eq!(examples.len(), 4);
    data::pack(&examples, max_len, pack)
}

/// Mean response-token loss and the adapter's gradients, in `named_tensors` order.
fn loss_and_grads(model: &Llama<AD>, adapter: &Adapter<B>, row: &Row) -> (f32, Vec<Vec<f32>>) {
    let tracked = adapter.map(|t| Tensor::<AD, 2>::from_inner(t.clone()).require_grad());
    let list = [&tracked];
    let adapters = Adapters {
        list: &list,
        train: None,
    };
    let (nll, targets) = row_nll(model, adapters, row).unwrap_or_else(|e| panic!("{e}"));
    let loss = nll / targets as f64;
    let value = to_vec(loss.clone().inner())[0];
    let grads = loss.backward();
    let g = tracked
        .named_tensors()
        .iter()
        .map(|(n, t)| to_vec(t.grad(&grads).unwrap_or_else(|| panic!("{n}: no gradient"))))
        .collect();
    (value, g)
}

#[test]
fn model_gradient_matches_reference_path() {
    let dev = device();
    let loaded = tiny_q8::<AD>();
    let dense = loaded.model.to_dense();
    let row = &rows(&loaded, 256, true)[0];
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    // Non-zero B, so every A gets a gradient too.
    let adapter = randomized(
        &Adapter::<B>::init(config, &loaded.model.config, 1, &dev)
            .unwrap_or_else(|e| panic!("{e}")),
        0.1,
        0,
    );
    let (loss_k, grads_k) = loss_and_grads(&loaded.model, &adapter, row);
    let (loss_r, grads_r) = loss_and_grads(&dense, &adapter, row);
    assert_close("loss", &[loss_k], &[loss_r], 1e-4, 1e-4);
    let names = adapter.named_tensors();
    for (i, (name, _)) in names.iter().enumerate() {
        assert!(
            grads_r[i].iter().any(|g| *g != 0.0),
            "{name}: zero gradient"
        );
        assert_close(name, &grads_k[i], &grads_r[i], 1e-4, 1e-3);
    }
}

fn config(steps: usize, lr: f64, dropout: f32) -> TrainConfig {
    TrainConfig {
        lora: LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout,
            targets: Target::ALL.to_vec(),
            rslora: false,
        },
        lr,
        epochs: 1000,
        max_steps: Some(steps),
        batch: 2,
        warmup_frac: 0.1,
        decay: Decay::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 7,
        eval_every: 0,
        checkpoint_every: 0,
        grad_checkpoint: false,
        activations: Activations::F32,
    }
}

/// A job on the tiny model without frozen adapters, validated on the first row.
fn job<'a, Bk: KernelBackend>(
    model: &'a Llama<Autodiff<Bk>>,
    rows: &'a [Row],
    config: &'a TrainConfig,
    out: &'a std::path::Path,
    resume: bool,
) -> TrainJob<'a, Bk> {
    TrainJob {
        model,
        frozen: &[],
        train: rows,
        val: &rows[..1],
        config,
        out,
        base_model: "tiny_llama",
        run: Default::default(),
        resume,
        objective: None,
        init: None,
    }
}

fn run<Bk: KernelBackend>(
    model: &Llama<Autodiff<Bk>>,
    rows: &[Row],
    config: &TrainConfig,
    out: &std::path::Path,
    resume: bool,
    stop_at: Option<usize>,
) -> TrainSummary {
    let cancel = CancelToken::new();
    train(job(model, rows, config, out, resume), &cancel, &mut |e| {
        if let (TrainEvent::Step { step, .. }, Some(k)) = (&e, stop_at)
            && *step == k
        {
            cancel.cancel();
        }
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("codelsi-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The CPU path (burn-flex) trains as the GPU path does: the same f32 model, rows and settings
/// (dropout too: both draw `cpu::dropout_mask`'s bits) give the same loss curve, and it falls.
#[test]
fn cpu_path_trains_like_the_gpu_path() {
    let _serial = serial();
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, false);
    let cfg = config(12, 1e-2, 0.1);
    let (gpu_out, cpu_out) = (temp("gpu-path"), temp("cpu-path"));
    let gpu_model = confident_tiny_on::<B>(None, &device());
    let gpu = run(&gpu_model, &rows, &cfg, &gpu_out, false, None);
    let cpu_model = confident_tiny_on::<Flex>(None, &Default::default());
    let cpu = run(&cpu_model, &rows, &cfg, &cpu_out, false, None);
    let curve = |s: &TrainSummary| s.losses.iter().map(|l| l.1 as f32).collect::<Vec<_>>();
    let (g, c) = (curve(&gpu), curve(&cpu));
    eprintln!("gpu path {g:?}\ncpu path {c:?}");
    assert_eq!(g.len(), 12);
    assert_close("cpu vs gpu loss curve", &c, &g, 1e-3, 1e-3);
    assert!(c[11] < c[0] / 2.0, "loss {} → {}", c[0], c[11]);
    // The adapters it wrote agree too, as whole tensors: Adam moves a parameter whose gradient
    // is near zero by about the learning rate whatever its sign, so single elements can differ
    // by ~lr (measured: 0.003 of 0.09) while the tensors agree to well under 1 %.
    let dev = device();
    let a_gpu = Adapter::<B>::load_peft(&gpu_out, &gpu_model.config, &dev).unwrap();
    let a_cpu = Adapter::<B>::load_peft(&cpu_out, &cpu_model.config, &dev).unwrap();
    let pairs = a_gpu.named_tensors().into_iter().zip(a_cpu.named_tensors());
    for ((name, t_gpu), (_, t_cpu)) in pairs {
        let (g, c) = (to_vec(t_gpu.clone()), to_vec(t_cpu.clone()));
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        let diff = norm(&mut g.iter().zip(&c).map(|(a, b)| a - b));
        let size = norm(&mut g.iter().copied());
        assert!(
            diff <= 0.02 * size,
            "{name}: |cpu - gpu| {diff} vs |gpu| {size}"
        );
    }
    std::fs::remove_dir_all(&gpu_out).unwrap();
    std::fs::remove_dir_all(&cpu_out).unwrap();
}

#[test]
fn overfits_a_handful_of_examples() {
    let _serial = serial();
    let loaded = tiny_q8::<AD>();
    let model = confident_tiny();
    // One example per row: four rows, two per step.
    let rows = rows(&loaded, 256, false);
    let out = temp("overfit");
    let s = run(&model, &rows, &config(60, 1e-2, 0.0), &out, false, None);
    eprintln!(
        "overfit losses: {:?}",
        s.losses.iter().step_by(10).collect::<Vec<_>>()
    );
    let first = s.losses[0].1;
    let last = s.losses.last().map_or(f64::NAN, |l| l.1);
    assert!(last < 0.05 && last < first / 20.0, "loss {first} → {last}");
    // The output is an adapter that loads and reproduces the final validation loss.
    let dev = device();
    let adapter = Adapter::<AD>::load_peft(&out, &model.config, &dev).unwrap();
    let list = [&adapter];
    let v = codelsi_engine::train::mean_loss(
        &model,
        Adapters {
            list: &list,
            train: None,
        },
        &rows[..1],
        &CancelToken::new(),
    )
    .unwrap()
    .unwrap();
    let want = s.val_losses.last().map_or(f64::NAN, |l| l.1);
    assert!((v - want).abs() < 1e-4, "reloaded adapter: {v} vs {want}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, false);
    // Dropout on, so the per-step RNG has to line up too.
    let _serial = serial();
    let c = config(6, 5e-3, 0.1);
    let a = temp("straight");
    let straight = run(&loaded.model, &rows, &c, &a, false, None);
    let b = temp("interrupted");
    let stopped = run(&loaded.model, &rows, &c, &b, false, Some(3));
    assert!(stopped.cancelled);
    assert_eq!(stopped.steps, 3);
    // Starting over in the same directory without --resume would lose the run: refused.
    let cancel = CancelToken::new();
    let refused = train(
        job(&loaded.model, &rows, &c, &b, false),
        &cancel,
        &mut |_| {},
    );
    assert!(refused.is_err());
    let resumed = run(&loaded.model, &rows, &c, &b, true, None);
    assert_eq!(resumed.steps, 6);
    let l1: Vec<f32> = straight.losses.iter().map(|l| l.1 as f32).collect();
    let l2: Vec<f32> = resumed.losses.iter().map(|l| l.1 as f32).collect();
    assert_eq!(l1.len(), 6);
    assert_close("loss curve", &l2, &l1, 1e-6, 1e-5);
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

/// `init`: a run starts from an earlier adapter's weights. Its held-out loss before the first
/// step is the earlier adapter's, not a fresh one's; an adapter of another shape is refused.
#[test]
fn init_starts_from_an_earlier_adapter() {
    let _serial = serial();
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, false);
    let model = confident_tiny_on::<Flex>(None, &Default::default());
    let first = temp("init-first");
    run(&model, &rows, &config(8, 1e-2, 0.0), &first, false, None);
    let trained = Adapter::<Flex>::load_peft(&first, &model.config, &Default::default()).unwrap();
    let cancel = CancelToken::new();
    let want = evaluate(&model, &[], &trained, None, &rows[..1], &cancel)
        .unwrap()
        .unwrap();
    let next = |c: &TrainConfig, init: Option<&std::path::Path>, out: &std::path::Path| {
        train(
            TrainJob {
                model: &model,
                frozen: &[],
                train: &rows,
                val: &rows[..1],
                config: c,
                out,
                base_model: "tiny_llama",
                run: Default::default(),
                resume: false,
                objective: None,
                init,
            },
            &cancel,
            &mut |_| {},
        )
    };
    let c = TrainConfig {
        eval_every: 1,
        ..config(1, 1e-2, 0.0)
    };
    let (cont, fresh) = (temp("init-cont"), temp("init-fresh"));
    let started = next(&c, Some(&first), &cont).unwrap_or_else(|e| panic!("{e}"));
    let from_scratch = next(&c, None, &fresh).unwrap_or_else(|e| panic!("{e}"));
    let (got, base) = (started.val_losses[0], from_scratch.val_losses[0]);
    eprintln!("held-out loss: trained {want}, started from it {got:?}, fresh {base:?}");
    assert_eq!((got.0, base.0), (0, 0));
    assert_close(
        "loss before the first step",
        &[got.1 as f32],
        &[want as f32],
        1e-5,
        1e-4,
    );
    assert!(want < base.1 - 0.1, "trained {want} vs fresh {}", base.1);

    let mut other = config(1, 1e-2, 0.0);
    other.lora.rank = 4;
    let refused = next(&other, Some(&first), &temp("init-refused"));
    let Err(err) = refused else {
        panic!("a rank-4 run from a rank-8 adapter was not refused");
    };
    let err = err.to_string();
    assert!(err.contains("rank 8"), "{err}");
    for d in [first, cont, fresh] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// Gradient checkpointing per layer recomputes each layer in the backward: with dropout on,
/// the run (losses and the trained adapter) is the one without checkpointing.
#[test]
fn gradient_checkpointing_gives_the_same_run() {
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, true);
    let _serial = serial();
    let plain = config(3, 5e-3, 0.1);
    let checkpointed = TrainConfig {
        grad_checkpoint: true,
        ..plain.clone()
    };
    let (a, b) = (temp("no-ckpt"), temp("ckpt"));
    let s1 = run(&loaded.model, &rows, &plain, &a, false, None);
    let s2 = run(&loaded.model, &rows, &checkpointed, &b, false, None);
    let l1: Vec<f32> = s1.losses.iter().map(|l| l.1 as f32).collect();
    let l2: Vec<f32> = s2.losses.iter().map(|l| l.1 as f32).collect();
    assert_eq!(l1.len(), 3);
    assert_close("loss curve", &l2, &l1, 1e-6, 1e-5);
    let dev = device();
    let c = &loaded.model.config;
    let t1 = Adapter::<B>::load_peft(&a, c, &dev).unwrap_or_else(|e| panic!("{e}"));
    let t2 = Adapter::<B>::load_peft(&b, c, &dev).unwrap_or_else(|e| panic!("{e}"));
    for ((name, x), (_, y)) in t1.named_tensors().iter().zip(t2.named_tensors()) {
        assert_close(name, &to_vec(y.clone()), &to_vec((*x).clone()), 1e-6, 1e-4);
    }
    // Training moved the adapter (B starts at zero), so the comparison above means something.
    let (_, b0) = &t1.named_tensors()[1];
    assert!(to_vec((*b0).clone()).iter().any(|v| v.abs() > 1e-4));
    std::fs::remove_dir_all(&a).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(&b).unwrap_or_else(|e| panic!("{e}"));
}

/// f16 activations (lavapipe offers shader-f16) follow the f32 run: the same loss curve within
/// f16 rounding, and the trained adapters point the same way.
#[test]
fn f16_activations_track_f32() {
    let dev = device();
    assert!(
        <AD as KernelBackend>::supports_f16(&dev),
        "this test expects an adapter with shader-f16 (lavapipe has it)"
    );
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, true);
    let _serial = serial();
    let f32_run = config(3, 5e-3, 0.0);
    let f16_run = TrainConfig {
        activations: Activations::F16,
        ..f32_run.clone()
    };
    let (a, b) = (temp("f32"), temp("f16"));
    let s1 = run(&loaded.model, &rows, &f32_run, &a, false, None);
    let s2 = run(&loaded.model, &rows, &f16_run, &b, false, None);
    let l1: Vec<f32> = s1.losses.iter().map(|l| l.1 as f32).collect();
    let l2: Vec<f32> = s2.losses.iter().map(|l| l.1 as f32).collect();
    assert_close("f16 loss curve", &l2, &l1, 1e-3, 5e-3);
    let c = &loaded.model.config;
    let t1 = Adapter::<B>::load_peft(&a, c, &dev).unwrap_or_else(|e| panic!("{e}"));
    let t2 = Adapter::<B>::load_peft(&b, c, &dev).unwrap_or_else(|e| panic!("{e}"));
    // The B matrices moved from zero in the same direction: cosine similarity near 1.
    let (mut dot, mut n1, mut n2) = (0f64, 0f64, 0f64);
    for ((name, x), (_, y)) in t1.named_tensors().iter().zip(t2.named_tensors()) {
        if !name.contains("lora_B") {
            continue;
        }
        for (p, q) in to_vec((*x).clone()).iter().zip(to_vec(y.clone())) {
            dot += (*p as f64) * q as f64;
            n1 += (*p as f64).powi(2);
            n2 += (q as f64).powi(2);
        }
    }
    let cos = dot / (n1.sqrt() * n2.sqrt());
    assert!(n1 > 0.0 && cos > 0.99, "cosine of the trained B: {cos}");
    std::fs::remove_dir_all(&a).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(&b).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn data_masks_responses_and_packs_examples_apart() {
    let gguf = codelsi_engine::io::gguf::GgufFile::open(codelsi_tests::default_model())
        .unwrap_or_else(|e| panic!("{e}"));
    let tok = codelsi_engine::io::tokenizer::Tokenizer::from_gguf(&gguf)
        .unwrap_or_else(|e| panic!("{e}"));
    let chat = Record::Chat {
        messages: vec![
            codelsi_engine::io::tokenizer::Message::user("Reverse a string."),
            codelsi_engine::io::tokenizer::Message {
                role: "assistant".into(),
                content: "const r = (s: string) => [...s].reverse().join('');".into(),
            },
        ],
    };
    for template in [PromptTemplate::Chat, PromptTemplate::Alpaca] {
        let ex = data::tokenize(&chat, &tok, template, 1024)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no example"));
        // The trained tokens decode to the response (and the end-of-turn marker), nothing else.
        let trained: Vec<u32> = ex
            .tokens
            .iter()
            .zip(&ex.loss_mask)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect();
        let text = tok
            .decode(&trained, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.starts_with("const r = (s: string)"),
            "{template:?}: trained on {text:?}"
        );
        assert!(text.len() < 80, "{template:?}: trained on {text:?}");
        let prompt = tok
            .decode(
                &ex.tokens[..ex.loss_mask.iter().position(|m| *m).unwrap_or(0)],
                false,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            prompt.contains("Reverse a string."),
            "{template:?}: {prompt:?}"
        );
        // Truncation keeps the prompt's start and drops what does not fit.
        let short = data::tokenize(&chat, &tok, template, ex.tokens.len() - 3)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no example"));
        assert_eq!(short.tokens[..], ex.tokens[..ex.tokens.len() - 3]);
        // A prompt that fills max-len leaves nothing to train: dropped.
        assert!(
            data::tokenize(&chat, &tok, template, 5)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
    }
    let a = data::Example {
        tokens: vec![1, 2, 3],
        loss_mask: vec![false, true, true],
    };
    let b = data::Example {
        tokens: vec![4, 5],
        loss_mask: vec![false, true],
    };
    let rows = data::pack(&[a.clone(), b.clone(), a.clone()], 5, true);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].tokens, vec![1, 2, 3, 4, 5]);
    assert_eq!(rows[0].positions, vec![0, 1, 2, 0, 1]);
    assert_eq!(rows[0].segments, vec![0, 0, 0, 1, 1]);
    // Labels never cross from one example into the next.
    assert_eq!(rows[0].labels, vec![Some(2), Some(3), None, Some(5), None]);
    assert_eq!(rows[1].tokens, vec![1, 2, 3]);
    assert_eq!(data::pack(&[a, b], 5, false).len(), 2);
}

/// A group's common prefix is packed once; the rests see it and continue its positions; the
/// prefix stops before the token ahead of the first trained one; groups sharing too little,
/// and rests that would overflow the row, fall back to plain units.
#[test]
fn shared_prefix_packing_lays_out_rows() {
    let ex = |tail: &[u32], prompt: usize| {
        let tokens: Vec<u32> = (100..100 + prompt as u32 - tail.len() as u32)
            .chain(tail.iter().copied())
            .chain([7, 8])
            .collect();
        let loss_mask = (0..tokens.len()).map(|i| i >= prompt).collect();
        data::Example { tokens, loss_mask }
    };
    // Prompts of 20 tokens differing in their last; the answer is 2 tokens.
    let (a, b) = (ex(&[1], 20), ex(&[2], 20));
    let rows = data::pack_shared(&[vec![a.clone(), b.clone()]], 64);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.tokens.len(), 19 + 3 + 3);
    assert_eq!(r.parents, vec![None, Some(0), Some(0)]);
    assert_eq!(r.segments[18..20], [0, 1]);
    assert_eq!(r.positions[19..], [19, 20, 21, 19, 20, 21]);
    assert_eq!(r.labels[..19], [None; 19]);
    assert_eq!(
        r.labels[19..],
        [Some(7), Some(8), None, Some(7), Some(8), None]
    );
    // Identical prompts: the prefix still ends before the token ahead of the answer.
    let rows = data::pack_shared(&[vec![a.clone(), a.clone()]], 64);
    assert_eq!(rows[0].tokens.len(), 19 + 3 + 3);
    // Too little in common: packed as `pack` does.
    let short = data::pack_shared(&[vec![ex(&[1], 10), ex(&[2], 10)]], 64);
    assert_eq!(short[0].parents, vec![None, None]);
    assert_eq!(short[0].tokens.len(), 24);
    // A row of 24 holds the prefix and one rest: the second rest repeats the prefix.
    let split = data::pack_shared(&[vec![a, b]], 24);
    assert_eq!(split.len(), 2);
    assert!(
        split
            .iter()
            .all(|r| r.tokens.len() == 22 && r.parents == [None, Some(0)])
    );
}

/// Shared-prefix rows give the loss of the same examples packed one per row, to rounding:
/// attention, positions and labels are unchanged, only computed once for the prefix.
#[test]
fn shared_prefix_rows_give_the_loss_of_separate_rows() {
    let _guard = serial();
    let model = confident_tiny();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 13 % 240 + 3) as u32).collect();
    let group: Vec<data::Example> = (0..3u32)
        .map(|k| {
            let mut tokens = prompt.clone();
            tokens.extend([200 + k, 201, 50 + k, 60 + 2 * k, 70]);
            let loss_mask = (0..tokens.len()).map(|i| i >= 42).collect();
            data::Example { tokens, loss_mask }
        })
        .collect();
    let adapters = Adapters {
        list: &[],
        train: None,
    };
    let total = |rows: &[Row]| -> (f32, usize) {
        rows.iter().fold((0.0, 0), |(l, n), r| {
            let (nll, t) = row_nll(&model, adapters, r).unwrap_or_else(|e| panic!("{e}"));
            (l + to_vec(nll.inner())[0], n + t)
        })
    };
    let apart = data::pack(&group, 128, false);
    let shared = data::pack_shared(std::slice::from_ref(&group), 128);
    assert_eq!((apart.len(), shared.len()), (3, 1));
    assert_eq!(shared[0].tokens.len(), 40 + 3 * 5);
    let (a, na) = total(&apart);
    let (s, ns) = total(&shared);
    assert_eq!(na, ns);
    assert!((a - s).abs() < 1e-4 * a.abs(), "apart {a}, shared {s}");
    // The mask matters: the same row with the rests unable to see the prefix scores otherwise.
    let mut blind = shared[0].clone();
    blind.parents = vec![];
    let (b, _) = total(&[blind]);
    assert!(
        (a - b).abs() > 1e-2,
        "the prefix changed nothing ({a} vs {b})"
    );
}

#[test]
fn stacked_adapters_match_reference_path() {
    let dev = device();
    let loaded = tiny_q8::<B>();
    let dense = loaded.model.to_dense();
    let random_adapter = |targets: &str, seed: u64| {
        let config = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Target::parse_list(targets).unwrap_or_else(|e| panic!("{e}")),
            rslora: false,
        };
        let fresh = Adapter::<B>::init(config, &loaded.model.config, 1, &dev)
            .unwrap_or_else(|e| panic!("{e}"));
        randomized(&fresh, 0.2, seed)
    };
    // A "general" adapter on every projection under a "specialised" one on attention only.
    let general = random_adapter("all", 900);
    let special = random_adapter("attn", 2000);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 250) as u32).collect();
    let positions: Vec<usize> = (0..40).collect();
    let segments = vec![0u32; 40];
    let packed = Packed {
        tokens: &tokens,
        positions: &positions,
        segments: &segments,
        parents: &[],
    };
    let logits = |m: &Llama<B>, list: &[&Adapter<B>]| {
        to_vec(
            m.forward_packed(packed, Adapters { list, train: None })
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let stacked = logits(&loaded.model, &[&special, &general]);
    let reference = logits(&dense, &[&special, &general]);
    assert_close(
        "stacked adapters, kernels vs reference",
        &stacked,
        &reference,
        1e-4,
        1e-4,
    );
    let alone = logits(&loaded.model, &[&special]);
    let worst = stacked
        .iter()
        .zip(&alone)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst > 1e-2, "the frozen adapter changed nothing ({worst})");
}

/// The inference model turned into a training one (`Llama::autodiff`, what the app trains on,
/// sharing the loaded weights) gives the loss and adapter gradients of the model loaded for
/// training.
#[test]
fn autodiff_view_trains_like_a_training_load() {
    let _guard = serial();
    let loaded = tiny_q8::<AD>();
    let plain = tiny_q8::<B>();
    let view = plain.model.autodiff();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let adapter = randomized(
        &Adapter::<B>::init(lora, &loaded.model.config, 3, &device())
            .unwrap_or_else(|e| panic!("{e}")),
        0.1,
        5,
    );
    let row = &rows(&loaded, 256, true)[0];
    let (want_loss, want_grads) = loss_and_grads(&loaded.model, &adapter, row);
    let (loss, grads) = loss_and_grads(&view, &adapter, row);
    assert_close("loss", &[loss], &[want_loss], 1e-6, 1e-6);
    for (g, w) in grads.iter().zip(&want_grads) {
        assert_close("gradient", g, w, 1e-6, 1e-6);
    }
}

/// [`run`] with the step's rows shared among `replicas` logical devices of the CPU path (burn's
/// all-reduce between threads, as between GPUs), each on `model`.
fn run_replicated(
    model: &Llama<Autodiff<Flex>>,
    replicas: usize,
    rows: &[Row],
    config: &TrainConfig,
    out: &std::path::Path,
    resume: bool,
    fault: Option<&FaultCheck>,
) -> codelsi_engine::Result<TrainSummary> {
    let par = Parallel {
        replicas: (1..replicas)
            .map(|k| Replica {
                model,
                frozen: &[],
                name: format!("cpu replica {k}"),
            })
            .collect(),
        first: "cpu replica 0".into(),
        fault,
        nodes: None,
    };
    train_parallel(
        job(model, rows, config, out, resume),
        &par,
        &CancelToken::new(),
        &mut |_| {},
    )
}

/// Data parallel: two and three replicas, each on its share of a step's four rows (three take
/// 1, 1 and 2), train the adapter one device trains with the same global batch, dropout on.
#[test]
fn data_parallel_trains_like_one_device() {
    let _serial = serial();
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, false);
    assert_eq!(rows.len(), 4);
    let model = confident_tiny_on::<Flex>(None, &Default::default());
    let cfg = TrainConfig {
        batch: 4,
        ..config(4, 1e-2, 0.1)
    };
    let one_out = temp("dp-one");
    let one = run(&model, &rows, &cfg, &one_out, false, None);
    let dev = Default::default();
    let want = Adapter::<Flex>::load_peft(&one_out, &model.config, &dev).unwrap();
    // Training moved the adapter (B starts at zero), so the comparisons mean something.
    let (_, b0) = &want.named_tensors()[1];
    assert!(to_vec((*b0).clone()).iter().any(|v| v.abs() > 1e-4));
    for replicas in [2, 3] {
        let out = temp(&format!("dp-{replicas}"));
        let got = run_replicated(&model, replicas, &rows, &cfg, &out, false, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let curve = |s: &TrainSummary| s.losses.iter().map(|l| l.1 as f32).collect::<Vec<_>>();
        eprintln!(
            "{replicas} replicas {:?}\none device {:?}",
            curve(&got),
            curve(&one)
        );
        assert_eq!(got.losses.len(), 4);
        assert_close("loss curve", &curve(&got), &curve(&one), 1e-6, 1e-5);
        let adapter = Adapter::<Flex>::load_peft(&out, &model.config, &dev).unwrap();
        for ((name, x), (_, y)) in want.named_tensors().iter().zip(adapter.named_tensors()) {
            assert_close(name, &to_vec(y.clone()), &to_vec((*x).clone()), 1e-5, 1e-4);
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::remove_dir_all(&one_out).unwrap();
}

/// A replica that fails mid-run stops every replica at the same step, with an error naming it
/// and a checkpoint of the last whole step that `--resume` continues on the uninterrupted
/// run's curve; a replica that panics stops the run too, and neither hangs.
#[test]
fn a_failing_replica_stops_the_run_cleanly() {
    let _serial = serial();
    let loaded = tiny_q8::<AD>();
    let rows = rows(&loaded, 256, false);
    let model = confident_tiny_on::<Flex>(None, &Default::default());
    let cfg = TrainConfig {
        batch: 4,
        ..config(4, 1e-2, 0.1)
    };
    let straight_out = temp("dp-straight");
    let straight = run_replicated(&model, 2, &rows, &cfg, &straight_out, false, None)
        .unwrap_or_else(|e| panic!("{e}"));

    let out = temp("dp-fails");
    let fail_at_2: &FaultCheck = &|replica, step| {
        if replica == 1 && step == 2 {
            return Err(codelsi_engine::Error::Internal(
                "out of memory (injected)".into(),
            ));
        }
        Ok(())
    };
    let err = match run_replicated(&model, 2, &rows, &cfg, &out, false, Some(fail_at_2)) {
        Err(e) => e,
        Ok(_) => panic!("a run with a failing replica finished"),
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    let codelsi_engine::Error::ReplicaFailed {
        step,
        replica,
        checkpoint,
        ..
    } = &err
    else {
        panic!("not a replica failure: {msg}");
    };
    assert_eq!((*step, *replica), (2, 1), "{msg}");
    assert!(checkpoint.is_some() && msg.contains("injected") && msg.contains("--resume"));
    let resumed =
        run_replicated(&model, 2, &rows, &cfg, &out, true, None).unwrap_or_else(|e| panic!("{e}"));
    let curve = |s: &TrainSummary| s.losses.iter().map(|l| l.1 as f32).collect::<Vec<_>>();
    assert_eq!(resumed.steps, 4);
    assert_close(
        "resumed curve",
        &curve(&resumed),
        &curve(&straight),
        1e-6,
        1e-5,
    );

    let panics_at_1: &FaultCheck = &|replica, step| {
        assert!(!(replica == 0 && step == 1), "a kernel panicked (injected)");
        Ok(())
    };
    let out2 = temp("dp-panics");
    match run_replicated(&model, 3, &rows, &cfg, &out2, false, Some(panics_at_1)) {
        Err(codelsi_engine::Error::ReplicaFailed {
            step: 1,
            replica: 0,
            what,
            ..
        }) => assert!(what.contains("injected"), "{what}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a run with a panicking replica finished"),
    }
    for d in [straight_out, out, out2] {
        let _ = std::fs::remove_dir_all(&d);
    }
}
