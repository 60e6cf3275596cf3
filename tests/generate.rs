//! The generation loop end to end on the tiny model (whose greedy tokens transformers gave):
//! streaming, max tokens, stop strings, cancellation, and batches of prompts.

use codelsi_engine::cancel::CancelToken;
use codelsi_engine::generate::{
    BatchRequest, GenerateOptions, StopReason, generate, generate_batch, generate_with,
};
use codelsi_engine::model::{LoadedModel, load_model};
use codelsi_engine::models::llama::Adapters;
use codelsi_engine::sampling::SamplingParams;
use codelsi_tests::{B, assert_close, device, fixtures};

#[derive(serde::Deserialize)]
struct TinyGolden {
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
}

/// The tiny model and the greedy run transformers gave for it.
fn tiny() -> (LoadedModel<B>, TinyGolden) {
    let dir = fixtures().join("tiny_llama");
    let loaded = load_model::<B>(&dir, None, &device(), &mut |_| {})
        .unwrap_or_else(|e| panic!("loading the tiny model: {e}"));
    let golden = std::fs::read_to_string(dir.join("golden.json"))
        .unwrap_or_else(|e| panic!("reading golden.json: {e}"));
    let g = serde_json::from_str(&golden).unwrap_or_else(|e| panic!("golden.json: {e}"));
    (loaded, g)
}

#[test]
fn streaming_stop_strings_and_cancel() {
    let (loaded, g) = tiny();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let eos = tok.eos_token_ids.clone();
    let expected: Vec<u32> = g
        .tokens
        .iter()
        .copied()
        .take_while(|t| !eos.contains(t))
        .collect();
    assert!(
        expected.len() >= 8,
        "the fixture's greedy run should not end at once"
    );

    // Generate, collecting what was streamed.
    let run = |opts: &GenerateOptions| {
        let mut streamed = String::new();
        let out = generate(
            model,
            tok,
            &g.prompt_ids,
            opts,
            &CancelToken::new(),
            &mut |p| streamed.push_str(p),
        )
        .unwrap();
        (out, streamed)
    };

    // Greedy, streamed: the same tokens as transformers; the pieces add up to the text.
    let opts = GenerateOptions {
        max_tokens: expected.len(),
        ..Default::default()
    };
    let (out, streamed) = run(&opts);
    assert_eq!(out.token_ids, expected);
    assert_eq!(out.stop_reason, StopReason::MaxTokens);
    assert_eq!(streamed, out.text);
    assert_eq!(out.text, tok.decode(&expected, true).unwrap());

    // A stop string in the middle: the text ends just before it, and nothing past it streamed.
    let full = out.text.clone();
    let cut = full
        .char_indices()
        .nth(full.chars().count() / 2)
        .map(|(i, _)| i)
        .unwrap();
    let stop: String = full[cut..].chars().take(2).collect();
    let at = full.find(&stop).unwrap();
    let opts = GenerateOptions {
        max_tokens: expected.len(),
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    let (out, streamed) = run(&opts);
    assert_eq!(
        out.stop_reason,
        StopReason::StopString,
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(out.text, full[..at]);
    assert_eq!(streamed, out.text);

    // Cancelled from the stream callback after the first piece: stops at the next step.
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let out = generate(
        model,
        tok,
        &g.prompt_ids,
        &GenerateOptions {
            max_tokens: 16,
            ..Default::default()
        },
        &cancel,
        &mut |_| c.cancel(),
    )
    .unwrap();
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert!(out.token_ids.len() < expected.len());

    // Seeded sampling repeats itself.
    let sampled = |seed| {
        let sampling = SamplingParams {
            temperature: 1.2,
            top_k: 20,
            top_p: 0.95,
            seed,
            ..Default::default()
        };
        let opts = GenerateOptions {
            max_tokens: 8,
            sampling,
            top_logprobs: 3,
            ..Default::default()
        };
        generate(
            model,
            tok,
            &g.prompt_ids,
            &opts,
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap()
    };
    let (a, b) = (sampled(7), sampled(7));
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(
        a.top_logprobs.len(),
        a.token_ids.len() + usize::from(a.stop_reason == StopReason::Eos)
    );
    assert!(
        a.top_logprobs
            .iter()
            .all(|s| s.len() == 3 && s[0].1 >= s[1].1)
    );
}

/// A batch of prompts of different lengths (left-padded), greedy and sampled, with stop
/// strings and different lengths to generate, gives each request what it gets alone.
#[test]
fn batch_matches_one_at_a_time() {
    let (loaded, g) = tiny();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let long = g.prompt_ids.clone();
    let short = long[..long.len() / 2].to_vec();
    let other: Vec<u32> = long.iter().rev().copied().collect();
    let greedy = |max_tokens| GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    let sampled = |seed| GenerateOptions {
        max_tokens: 10,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Default::default()
        },
        ..Default::default()
    };
    // The greedy text of `short`, for a stop string that ends its row early.
    let alone = |ids: &[u32], o: &GenerateOptions| {
        generate_with(
            model,
            Adapters::none(),
            tok,
            ids,
            o,
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap()
    };
    let short_text = alone(&short, &greedy(12)).text;
    let stop: String = short_text.chars().skip(4).take(2).collect();
    let requests = vec![
        BatchRequest {
            prompt_ids: long.clone(),
            options: greedy(12),
        },
        BatchRequest {
            prompt_ids: short.clone(),
            options: GenerateOptions {
                stop_strings: vec![stop],
                ..greedy(12)
            },
        },
        BatchRequest {
            prompt_ids: other,
            options: greedy(3),
        },
        BatchRequest {
            prompt_ids: short.clone(),
            options: sampled(1),
        },
        BatchRequest {
            prompt_ids: short,
            options: sampled(2),
        },
    ];
    let mut finished = Vec::new();
    let outs = generate_batch(
        model,
        Adapters::none(),
        tok,
        &requests,
        &CancelToken::new(),
        &mut |i, _| finished.push(i),
    )
    .unwrap();
    assert_eq!(outs.len(), requests.len());
    finished.sort_unstable();
    assert_eq!(finished, (0..requests.len()).collect::<Vec<_>>());
    for (i, (r, out)) in requests.iter().zip(&outs).enumerate() {
        let want = alone(&r.prompt_ids, &r.options);
        assert_eq!(out.token_ids, want.token_ids, "request {i}");
        assert_eq!(out.text, want.text, "request {i}");
        assert_eq!(out.stop_reason, want.stop_reason, "request {i}");
    }
    assert_eq!(outs[1].stop_reason, StopReason::StopString);
    assert_eq!(outs[2].token_ids.len(), 3);
    assert_ne!(
        outs[3].token_ids, outs[4].token_ids,
        "two seeds gave one sample"
    );

    // The padded row's logits are the unpadded ones.
    let mut cache = model.new_cache(2, long.len());
    let pad = long.len() - requests[1].prompt_ids.len();
    let mut tokens = long.clone();
    tokens.extend(std::iter::repeat_n(0, pad));
    tokens.extend_from_slice(&requests[1].prompt_ids);
    let batch = model
        .forward_batch(&tokens, &[0, pad], &mut cache, Adapters::none())
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    let vocab = model.config.vocab_size;
    for (row, ids) in [&long, &requests[1].prompt_ids].into_iter().enumerate() {
        let mut c = model.new_cache(1, ids.len());
        let want = model
            .forward(ids, &mut c, false)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        assert_close(
            &format!("row {row}"),
            &batch[row * vocab..(row + 1) * vocab],
            &want,
            1e-4,
            1e-4,
        );
    }

    // Cancelled before the first step: every row says so.
    let cancel = CancelToken::new();
    cancel.cancel();
    let outs = generate_batch(
        model,
        Adapters::none(),
        tok,
        &requests,
        &cancel,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(outs.iter().all(|o| o.stop_reason == StopReason::Cancelled));
}

/// An adapter for the tiny model whose B is not zero (a fresh one changes nothing).
fn busy_adapter<Bk: codelsi_engine::kernels::KernelBackend>(
    config: &codelsi_engine::models::config::Config,
    seed: u64,
    dev: &Bk::Device,
) -> codelsi_engine::adapter::Adapter<Bk> {
    use codelsi_engine::adapter::{Adapter, LoraConfig, Target};
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::parse_list("q,v,gate,down").unwrap_or_else(|e| panic!("targets: {e}")),
        rslora: false,
    };
    Adapter::<Bk>::init(lora, config, seed, dev)
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|t| {
            let [r, c] = t.dims();
            let v: Vec<f32> = (0..r * c)
                .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [r, c]), dev)
        })
}

/// Continuous batching: sequences join a running batch at different steps (one with a longer
/// prompt than the batch has positions, so every row moves), each on its own adapters (none,
/// one, the other, both stacked), greedy and sampled; one is taken out midway and one ends
/// early, so the batch drops positions. Each gets what it gets alone, streamed text included.
#[test]
fn running_batch_rows_join_and_leave_on_their_own_adapters() {
    running_batch_on::<B>(&device(), None, false);
}

/// The same on the CPU path (burn-flex), its weights quantised so that its integer products
/// run: there a row gets bit for bit its log-probabilities alone, whatever its padding and the
/// rows beside it (its attention's sums depended on its padding, and the products' kernels on
/// the number of rows; 8-bit activations turn a last bit into a quantisation step).
#[test]
fn running_batch_on_the_cpu_path() {
    running_batch_on::<burn::backend::Flex>(
        &Default::default(),
        Some(codelsi_engine::quant::QFormat::Q8_0),
        true,
    );
}

fn running_batch_on<Bk: codelsi_engine::kernels::KernelBackend>(
    dev: &Bk::Device,
    quantize: Option<codelsi_engine::quant::QFormat>,
    exact: bool,
) {
    use codelsi_engine::generate::{GenerateOutput, RowEvent, RunningBatch};
    use std::collections::HashMap;
    use std::sync::Arc;

    let (_, g) = tiny();
    let loaded = load_model::<Bk>(&fixtures().join("tiny_llama"), quantize, dev, &mut |_| {})
        .unwrap_or_else(|e| panic!("loading the tiny model: {e}"));
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let one = Arc::new(busy_adapter::<Bk>(&model.config, 1, dev));
    let two = Arc::new(busy_adapter::<Bk>(&model.config, 2, dev));
    let long = g.prompt_ids.clone();
    let short = long[..long.len() / 2].to_vec();
    let longer: Vec<u32> = long.iter().chain(&long[..5]).copied().collect();
    let greedy = |max_tokens| GenerateOptions {
        max_tokens,
        top_logprobs: 2,
        ..Default::default()
    };
    let sampled = GenerateOptions {
        max_tokens: 7,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    // (prompt, adapters, options, steps of the batch before it joins)
    let rows = [
        (long.clone(), vec![], greedy(12), 0),
        (short.clone(), vec![one.clone()], greedy(10), 2),
        (longer, vec![one.clone(), two.clone()], greedy(4), 2),
        (short.clone(), vec![two.clone()], sampled, 3),
        (long, vec![one.clone()], greedy(20), 3),
    ];
    let taken_out = 4u64;

    let mut batch = RunningBatch::new(model);
    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut outs: HashMap<u64, GenerateOutput> = HashMap::new();
    let mut on_event = |id: u64, e: RowEvent<'_>| match e {
        RowEvent::Text(t) => texts.entry(id).or_default().push_str(t),
        RowEvent::Done(out) => {
            assert!(outs.insert(id, out).is_none(), "row {id} ended twice");
        }
    };
    let mut steps = 0;
    let mut shared = 0;
    loop {
        for (id, (prompt, adapters, options, at)) in rows.iter().enumerate() {
            if *at == steps {
                batch
                    .admit(
                        id as u64,
                        prompt,
                        options,
                        adapters.clone(),
                        tok,
                        &mut on_event,
                    )
                    .unwrap_or_else(|e| panic!("admitting row {id}: {e}"));
            }
        }
        if steps == 5 {
            let out = batch
                .remove(taken_out)
                .unwrap_or_else(|| panic!("row 4 left early"));
            assert_eq!(out.stop_reason, StopReason::Cancelled);
            assert_eq!(out.token_ids.len(), 3);
        }
        if batch.is_empty() && steps > 3 {
            break;
        }
        shared = shared.max(batch.len());
        batch
            .step(tok, &mut on_event)
            .unwrap_or_else(|e| panic!("step {steps}: {e}"));
        steps += 1;
    }
    assert_eq!(shared, 5, "the rows never shared a step");
    for (id, (prompt, adapters, options, _)) in rows.iter().enumerate() {
        let id = id as u64;
        if id == taken_out {
            continue;
        }
        let list: Vec<&codelsi_engine::adapter::Adapter<Bk>> =
            adapters.iter().map(|a| a.as_ref()).collect();
        let want = generate_with(
            model,
            Adapters {
                list: &list,
                train: None,
            },
            tok,
            prompt,
            options,
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = &outs[&id];
        assert_eq!(got.token_ids, want.token_ids, "row {id}");
        assert_eq!(got.text, want.text, "row {id}");
        assert_eq!(got.stop_reason, want.stop_reason, "row {id}");
        assert_eq!(
            texts.get(&id).map_or("", String::as_str),
            want.text,
            "row {id}"
        );
        if exact {
            assert_eq!(got.top_logprobs, want.top_logprobs, "row {id}");
        }
    }
    // The adapters matter here: row 1 on the base model generates something else.
    let base = generate_with(
        model,
        Adapters::none(),
        tok,
        &short,
        &greedy(10),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(base.token_ids, outs[&1].token_ids);
}
