//! LoRA adapters in the PEFT format: an adapter made by PyPI `peft` (tests/scripts/
//! make_peft_fixture.py) gives PEFT's greedy tokens and logits on the default model; adapters
//! codelsi writes have PEFT's layout and read back exactly; bad adapters fail with clear errors.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use codelsi_engine::adapter::{Adapter, LoraConfig, Target};
use codelsi_engine::model::load_model;
use codelsi_engine::models::config::Config;
use codelsi_engine::models::llama::{Adapters, Llama};
use codelsi_engine::sampling::argmax;
use codelsi_tests::{B, assert_close, default_model, device, fixtures, random_values, to_vec};
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

/// Greedy decode with the KV cache; checks tokens and top-5 logits against `want` each step.
fn check_greedy(
    what: &str,
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    prompt: &[u32],
    want: &Greedy,
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
            2e-3,
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

#[test]
fn peft_adapter_gives_peft_outputs() {
    let dev = device();
    let golden: PeftGolden = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft_lora_golden.json")).unwrap(),
    )
    .unwrap();
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
        train: false,
    };
    check_greedy(
        "with the PEFT adapter",
        model,
        with,
        &golden.prompt_ids,
        &golden.adapted,
    );
    // Switching adapters needs no reload: the same base, no adapter, gives the base outputs.
    check_greedy(
        "base",
        model,
        Adapters::none(),
        &golden.prompt_ids,
        &golden.base,
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
    let mut seed = 10;
    let adapter = fresh.map(|t| {
        seed += 1;
        let [r, c] = t.dims();
        Tensor::<B, 2>::from_data(TensorData::new(random_values(r * c, seed), [r, c]), &dev)
    });
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
