//! LoRA adapters in the PEFT format: an adapter made by PyPI `peft` (tests/scripts/
//! make_peft_fixture.py) gives PEFT's greedy tokens and logits on the default model; adapters
//! codelsi writes have PEFT's layout and read back exactly; bad adapters fail with clear errors;
//! `codelsi merge` folds adapters into HF (f16) and GGUF models that give the adapted outputs.

use std::path::Path;

use codelsi_engine::adapter::{Adapter, HostAdapter, LoraConfig, Target};
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::io::gguf::GgufFile;
use codelsi_engine::io::safetensors::SafetensorsWeights;
use codelsi_engine::io::{WeightSource, gguf_qk_rows};
use codelsi_engine::merge::{MergeFormat, MergeReport, merge};
use codelsi_engine::model::load_model;
use codelsi_engine::models::config::Config;
use codelsi_engine::models::llama::{Adapters, Llama};
use codelsi_engine::quant::{GgmlType, QFormat, dequantize_into, quantize_blocks};
use codelsi_engine::sampling::argmax;
use codelsi_tests::{B, assert_close, default_model, device, fixtures, randomized, to_vec};
use serde::Deserialize;

#[derive(Deserialize)]
struct Greedy {
    tokens: Vec<u32>,
    top_ids: Vec<Vec<u32>>,
    top_values: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct PeftGolden {
    prompt_ids: Vec<u32>,
    adapted: Greedy,
    base: Greedy,
}

/// Greedy decode with the KV cache; checks tokens and top-5 logits (within `abs`) against
/// `want` each step.
fn check_greedy(
    what: &str,
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    prompt: &[u32],
    want: &Greedy,
    abs: f32,
) {
    let mut cache = model.new_cache(1, prompt.len() + want.tokens.len());
    let mut logits = to_vec(
        model
            .forward_with(prompt, &mut cache, false, adapters)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    for step in 0..want.tokens.len() {
        let got: Vec<f32> = want.top_ids[step]
            .iter()
            .map(|&i| logits[i as usize])
            .collect();
        assert_close(
            &format!("{what} step {step} top-5 logits"),
            &got,
            &want.top_values[step],
            abs,
            1e-4,
        );
        let next = argmax(&logits) as u32;
        assert_eq!(
            next, want.tokens[step],
            "{what}: greedy token at step {step}"
        );
        logits = to_vec(
            model
                .forward_with(&[next], &mut cache, false, adapters)
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
}

fn peft_golden() -> PeftGolden {
    let path = fixtures().join("peft_lora_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn peft_adapter_gives_peft_outputs() {
    let dev = device();
    let golden = peft_golden();
    let loaded = load_model::<B>(&default_model(), None, &dev, &mut |_| {}).unwrap();
    let model = &loaded.model;
    let adapter =
        Adapter::<B>::load_peft(&fixtures().join("peft_lora"), &model.config, &dev).unwrap();
    assert_eq!(adapter.config.rank, 2);
    assert_eq!(adapter.config.targets, Target::ALL.to_vec());
    assert_eq!(
        adapter.named_tensors().len(),
        2 * 7 * model.config.num_hidden_layers
    );
    // The fixture's adapter changes the greedy path (so this test can tell it was applied).
    assert_ne!(golden.adapted.tokens, golden.base.tokens);
    let list = [&adapter];
    let with = Adapters {
        list: &list,
        train: None,
    };
    check_greedy(
        "with the PEFT adapter",
        model,
        with,
        &golden.prompt_ids,
        &golden.adapted,
        2e-3,
    );
    // Switching adapters needs no reload: the same base, no adapter, gives the base outputs.
    check_greedy(
        "base",
        model,
        Adapters::none(),
        &golden.prompt_ids,
        &golden.base,
        2e-3,
    );
}

fn tiny_config() -> Config {
    Config::tiny()
}

#[test]
fn saved_adapter_has_peft_layout_and_reads_back() {
    let dev = device();
    let c = tiny_config();
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: Target::parse_list("q,v,down").unwrap(),
        rslora: false,
    };
    let fresh = Adapter::<B>::init(config.clone(), &c, 3, &dev).unwrap();
    // PEFT's initialisation: B zeros, A within the Kaiming-uniform bound 1/sqrt(in).
    for (name, t) in fresh.named_tensors() {
        let v = to_vec(t.clone());
        if name.contains("lora_B") {
            assert!(v.iter().all(|x| *x == 0.0), "{name} is not zero");
        } else {
            let bound = 1.0 / (t.dims()[1] as f32).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name} out of bound");
            assert!(
                v.iter().any(|x| x.abs() > bound / 2.0),
                "{name} is not spread"
            );
        }
    }
    let adapter = randomized(&fresh, 1.0, 10);
    let dir = std::env::temp_dir().join(format!("codelsi-adapter-{}", std::process::id()));
    adapter
        .save_peft(&dir, "tiny", &[("codelsi.json", b"{}".to_vec())])
        .unwrap();
    let back = Adapter::<B>::load_peft(&dir, &c, &dev).unwrap();
    assert_eq!(back.config, config);
    let (a, b) = (adapter.named_tensors(), back.named_tensors());
    assert_eq!(a.len(), 2 * 3 * c.num_hidden_layers);
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(to_vec((*ta).clone()), to_vec((*tb).clone()), "{na}");
    }
    // The layout PEFT reads: the keys and config fields of the adapter PEFT itself wrote.
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft_lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "target_modules",
        "bias",
        "fan_in_fan_out",
        "use_dora",
        "use_rslora",
    ] {
        assert!(ours.get(key).is_some(), "adapter_config.json lacks {key}");
        assert!(theirs.get(key).is_some(), "PEFT's fixture lacks {key}");
    }
    let peft_keys = safetensor_keys(&fixtures().join("peft_lora/adapter_model.safetensors"));
    let our_keys = safetensor_keys(&dir.join("adapter_model.safetensors"));
    for k in &our_keys {
        // Same naming scheme as PEFT's file (which has every layer and projection).
        let layer0 = k.replace(".layers.1.", ".layers.0.");
        assert!(peft_keys.contains(&layer0), "{k} is not a PEFT key");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn safetensor_keys(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{e}"));
    st.names().into_iter().map(String::from).collect()
}

#[test]
fn bad_adapters_fail_clearly() {
    let dev = device();
    let c = tiny_config();
    let dir = std::env::temp_dir().join(format!("codelsi-bad-adapter-{}", std::process::id()));
    let good = Adapter::<B>::init(LoraConfig::default(), &c, 1, &dev).unwrap();
    good.save_peft(&dir, "tiny", &[]).unwrap();
    let cfg_path = dir.join("adapter_config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();

    // An adapter for another model shape.
    let mut other = c.clone();
    other.hidden_size = 96;
    let e = Adapter::<B>::load_peft(&dir, &other, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected shape"), "{e}");

    // Maths codelsi would silently get wrong is refused by name.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = Adapter::<B>::load_peft(&dir, &c, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA"), "{e}");
    std::fs::write(&cfg_path, cfg.replace("\"r\": 16", "\"r\": 0")).unwrap();
    let e = Adapter::<B>::load_peft(&dir, &c, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank"), "{e}");
    std::fs::write(&cfg_path, "{not json").unwrap();
    let e = Adapter::<B>::load_peft(&dir, &c, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid JSON"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Adapter::<B>::load_peft(&dir, &c, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("codelsi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}

fn merge_into(
    base: &Path,
    adapters: &[std::path::PathBuf],
    out: &Path,
    format: MergeFormat,
) -> codelsi_engine::Result<MergeReport> {
    merge(
        base,
        adapters,
        out,
        format,
        &CancelToken::new(),
        &mut |_, _| {},
    )
}

/// `codelsi merge` of the PEFT fixture into the default model, to HF safetensors (f16): each
/// merged weight is the base's (in HF row order, though the GGUF stores q/k permuted) plus
/// `s·B·A` to f16 rounding, and the merged model loaded as an HF model gives PEFT's greedy
/// tokens with no adapter.
#[test]
fn merged_hf_model_gives_peft_outputs() {
    let dev = device();
    let golden = peft_golden();
    let dir = scratch("merge-hf");
    let out = dir.join("merged");
    let peft = fixtures().join("peft_lora");
    let report = merge_into(
        &default_model(),
        std::slice::from_ref(&peft),
        &out,
        MergeFormat::HfF16,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let gguf = GgufFile::open(default_model()).unwrap_or_else(|e| panic!("{e}"));
    let config = Config::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.merged_tensors, 7 * config.num_hidden_layers);
    assert!(report.delta_loss < 0.01, "f16 keeps the change: {report:?}");

    let host = HostAdapter::load_peft(&peft, &config).unwrap_or_else(|e| panic!("{e}"));
    let base = config.gguf_weights(&gguf);
    let merged = SafetensorsWeights::open(&out).unwrap_or_else(|e| panic!("{e}"));
    for (t, layer) in [(Target::Q, 3), (Target::K, 7), (Target::Down, 29)] {
        let name = format!("model.layers.{layer}.{}.{}.weight", t.parent(), t.name());
        let delta = host.delta(layer, t).unwrap_or_else(|| panic!("no delta"));
        let want: Vec<f32> = base
            .require(&name)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_f32()
            .iter()
            .zip(&delta)
            .map(|(w, d)| w + d)
            .collect();
        let got = merged
            .require(&name)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_f32();
        assert_close(&name, &got, &want, 1e-7, 1e-3);
    }

    let loaded = load_model::<B>(&out, None, &dev, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.tokenizer.eos_token_ids, vec![2]);
    check_greedy(
        "merged HF f16",
        &loaded.model,
        Adapters::none(),
        &golden.prompt_ids,
        &golden.adapted,
        0.05,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF merge keeps the base's metadata, tensor order and types; untouched tensors are
/// byte-identical and each merged weight is the base's re-quantisation of `W + s·B·A` (q/k in
/// llama.cpp's row order). With F16 merged weights the model gives PEFT's greedy tokens.
#[test]
fn merged_gguf_keeps_the_base_quantisation() {
    let dev = device();
    let golden = peft_golden();
    let dir = scratch("merge-gguf");
    let peft = fixtures().join("peft_lora");
    let base_path = default_model();
    let out = dir.join("merged.gguf");
    let report = merge_into(
        &base_path,
        std::slice::from_ref(&peft),
        &out,
        MergeFormat::Gguf { merged_type: None },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.retyped.is_empty(), "{report:?}");
    assert!(report.delta_loss.is_finite());

    let base = GgufFile::open(&base_path).unwrap_or_else(|e| panic!("{e}"));
    let merged = GgufFile::open(&out).unwrap_or_else(|e| panic!("{e}"));
    for (k, v) in &base.metadata {
        assert_eq!(merged.get(k), Some(v), "metadata {k}");
    }
    assert!(merged.get("codelsi.merged_adapters").is_some());
    assert_eq!(base.tensors.len(), merged.tensors.len());
    let config = Config::from_gguf(&base).unwrap_or_else(|e| panic!("{e}"));
    let host = HostAdapter::load_peft(&peft, &config).unwrap_or_else(|e| panic!("{e}"));
    let projections = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    for (b, m) in base.tensors.iter().zip(&merged.tensors) {
        assert_eq!((&b.name, &b.dims, b.ty), (&m.name, &m.dims, m.ty));
        let is_projection = projections
            .iter()
            .any(|p| b.name.ends_with(&format!(".{p}.weight")));
        if !is_projection {
            assert!(
                base.tensor_bytes(b) == merged.tensor_bytes(m),
                "{} changed",
                b.name
            );
        }
    }
    // blk.5.attn_q: GGUF row `from[r]` holds HF row `r`.
    let info = base
        .tensor("blk.5.attn_q.weight")
        .unwrap_or_else(|| panic!("no attn_q"));
    let mut w = Vec::new();
    dequantize_into(info.ty, base.tensor_bytes(info), &mut w);
    let (inp, rows) = Target::Q.dims(&config);
    let delta = host
        .delta(5, Target::Q)
        .unwrap_or_else(|| panic!("no delta"));
    let from = gguf_qk_rows(rows, config.num_attention_heads).unwrap_or_else(|| panic!("heads"));
    for (hf_row, &g) in from.iter().enumerate() {
        for c in 0..inp {
            w[g * inp + c] += delta[hf_row * inp + c];
        }
    }
    let m = merged
        .tensor("blk.5.attn_q.weight")
        .unwrap_or_else(|| panic!("no attn_q"));
    let want = quantize_blocks(QFormat::Q4_1, &w);
    let got = merged.tensor_bytes(m);
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(
        got.len() == want.len() && differ == 0,
        "re-quantised blk.5.attn_q: {differ} of {} bytes differ",
        want.len()
    );

    let out16 = dir.join("merged-f16.gguf");
    merge_into(
        &base_path,
        std::slice::from_ref(&peft),
        &out16,
        MergeFormat::Gguf {
            merged_type: Some(GgmlType::F16),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let loaded = load_model::<B>(&out16, None, &dev, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    check_greedy(
        "merged GGUF, f16 merged weights",
        &loaded.model,
        Adapters::none(),
        &golden.prompt_ids,
        &golden.adapted,
        0.05,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Merging an HF base (the tiny Qwen2, with q/k/v biases) gives the logits of the base with
/// the adapter applied; bad requests fail with clear errors and leave nothing behind.
#[test]
fn merge_hf_base_and_bad_requests() {
    let dev = device();
    let dir = scratch("merge-bad");
    let base = fixtures().join("tiny_qwen2");
    let loaded = load_model::<B>(&base, None, &dev, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let fresh =
        Adapter::<B>::init(config, &loaded.model.config, 1, &dev).unwrap_or_else(|e| panic!("{e}"));
    let adapter = randomized(&fresh, 0.2, 40);
    let adapter_dir = dir.join("adapter");
    adapter
        .save_peft(&adapter_dir, "tiny_qwen2", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let adapters = vec![adapter_dir.clone()];

    let out = dir.join("merged");
    merge_into(&base, &adapters, &out, MergeFormat::HfF16).unwrap_or_else(|e| panic!("{e}"));
    let merged = load_model::<B>(&out, None, &dev, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let tokens: Vec<u32> = (0..12).map(|i| (i * 13 % 250) as u32).collect();
    let logits = |m: &Llama<B>, a: Adapters<'_, B>| {
        let mut cache = m.new_cache(1, tokens.len());
        to_vec(
            m.forward_with(&tokens, &mut cache, true, a)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let list = [&adapter];
    let want = logits(
        &loaded.model,
        Adapters {
            list: &list,
            train: None,
        },
    );
    let base_logits = logits(&loaded.model, Adapters::none());
    assert!(
        want.iter()
            .zip(&base_logits)
            .any(|(a, b)| (a - b).abs() > 0.05),
        "the adapter changes the logits"
    );
    assert_close(
        "merged tiny_qwen2 logits",
        &logits(&merged.model, Adapters::none()),
        &want,
        5e-3,
        5e-3,
    );

    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "adapter" && n != "merged")
            .collect()
    };
    let err = |r: codelsi_engine::Result<MergeReport>| match r {
        Ok(_) => panic!("merge should have failed"),
        Err(e) => e.to_string(),
    };
    // An existing output is never overwritten.
    let e = err(merge_into(&base, &adapters, &out, MergeFormat::HfF16));
    assert!(e.contains("already exists"), "{e}");
    assert!(out.join("model.safetensors").exists());
    // GGUF keeps the base's quantisation, so it needs a GGUF base.
    let gguf_format = MergeFormat::Gguf { merged_type: None };
    let e = err(merge_into(
        &base,
        &adapters,
        &dir.join("m.gguf"),
        gguf_format,
    ));
    assert!(e.contains("GGUF base"), "{e}");
    // An adapter for another model.
    let other = vec![fixtures().join("peft_lora")];
    let e = err(merge_into(
        &base,
        &other,
        &dir.join("x"),
        MergeFormat::HfF16,
    ));
    assert!(e.contains("expected shape"), "{e}");
    // Cancelled: nothing is left.
    let cancel = CancelToken::new();
    cancel.cancel();
    let r = merge(
        &base,
        &adapters,
        &dir.join("y"),
        MergeFormat::HfF16,
        &cancel,
        &mut |_, _| {},
    );
    assert!(matches!(r, Err(codelsi_engine::Error::Cancelled)), "{r:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF merge into the default model (Qwen2.5-Coder-0.5B Q4_K_M) keeps every merged weight's
/// type and re-quantises it with codelsi's quantiser for that type, byte for byte: Q5_0 and
/// Q8_0 (q, v) and the K-quants Q4_K and Q6_K (down).
#[test]
fn merged_qwen_gguf_requantises_every_type() {
    use codelsi_engine::fetch::{DEFAULT_MODEL, ensure_model};
    let dev = device();
    let base_path = ensure_model(DEFAULT_MODEL, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let base = GgufFile::open(&base_path).unwrap_or_else(|e| panic!("{e}"));
    let c = Config::from_gguf(&base).unwrap_or_else(|e| panic!("{e}"));
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::parse_list("q,v,down").unwrap_or_else(|e| panic!("{e}")),
        rslora: false,
    };
    let fresh = Adapter::<B>::init(lora, &c, 3, &dev).unwrap_or_else(|e| panic!("{e}"));
    let adapter = randomized(&fresh, 0.05, 20);
    let dir = scratch("merge-qwen");
    let peft = dir.join("adapter");
    adapter
        .save_peft(&peft, "qwen", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = dir.join("merged.gguf");
    let report = merge_into(
        &base_path,
        std::slice::from_ref(&peft),
        &out,
        MergeFormat::Gguf { merged_type: None },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.retyped.is_empty(), "{report:?}");
    assert_eq!(report.merged_tensors, 3 * c.num_hidden_layers);
    let merged = GgufFile::open(&out).unwrap_or_else(|e| panic!("{e}"));
    let host = HostAdapter::load_peft(&peft, &c).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    for layer in 0..c.num_hidden_layers {
        for (t, g) in [
            (Target::Q, "attn_q"),
            (Target::V, "attn_v"),
            (Target::Down, "ffn_down"),
        ] {
            let name = format!("blk.{layer}.{g}.weight");
            let b = base.tensor(&name).unwrap_or_else(|| panic!("no {name}"));
            if seen.contains(&b.ty) {
                continue;
            }
            seen.push(b.ty);
            // Qwen2 GGUFs keep HF's q/k row order.
            let mut w = Vec::new();
            dequantize_into(b.ty, base.tensor_bytes(b), &mut w);
            let delta = host.delta(layer, t).unwrap_or_else(|| panic!("no delta"));
            w.iter_mut().zip(&delta).for_each(|(w, d)| *w += d);
            let format = b.ty.gpu_format().unwrap_or_else(|| panic!("{:?}", b.ty));
            let want = quantize_blocks(format, &w);
            let m = merged.tensor(&name).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(m.ty, b.ty, "{name} keeps its type");
            assert!(
                merged.tensor_bytes(m) == want.as_slice(),
                "{name}: not the {} re-quantisation of W + s·B·A",
                b.ty.name()
            );
        }
    }
    seen.sort_by_key(|t| t.id());
    assert_eq!(
        seen,
        [GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
