//! The generation loop end to end on the tiny model (whose greedy tokens transformers gave):
//! streaming, max tokens, stop strings, cancellation.

use codelsi_engine::generate::{CancelToken, GenerateOptions, StopReason, generate};
use codelsi_engine::model::load_model;
use codelsi_engine::sampling::SamplingParams;
use codelsi_tests::{B, device, fixtures};

#[derive(serde::Deserialize)]
struct TinyGolden {
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
}

#[test]
fn streaming_stop_strings_and_cancel() {
    let dir = fixtures().join("tiny_llama");
    let loaded = load_model::<B>(&dir, None, &device(), &mut |_| {}).unwrap();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let g: TinyGolden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
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
