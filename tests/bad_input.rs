//! Bad input gives a typed error naming the file and the problem: never a panic, and never an
//! allocation proportional to what a lying header claims.

use std::path::{Path, PathBuf};

use codelsi_engine::Error;
use codelsi_engine::io::gguf::{GgufFile, GgufWriter, Value};
use codelsi_engine::io::safetensors::SafetensorsWeights;
use codelsi_engine::io::tokenizer::Tokenizer;
use codelsi_engine::io::{GgufWeights, WeightSource};
use codelsi_engine::models::config::Config;
use codelsi_engine::quant::{GgmlType, QFormat, quantize_blocks};
use codelsi_tests::{fixtures, random_values};

/// A small valid GGUF: llama metadata and two tensors.
fn valid_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.embedding_length", Value::U32(64))
        .meta("llama.feed_forward_length", Value::U32(96))
        .meta("llama.block_count", Value::U32(1))
        .meta("llama.attention.head_count", Value::U32(4))
        .meta("llama.attention.head_count_kv", Value::U32(2))
        .meta("llama.context_length", Value::U32(128))
        .meta("llama.vocab_size", Value::U32(8))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array((0..8).map(|i| Value::String(format!("t{i}"))).collect()),
        );
    let emb: Vec<u8> = random_values(8 * 64, 1)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    w.tensor("token_embd.weight", &[8, 64], 0, emb);
    w.tensor(
        "blk.0.attn_q.weight",
        &[64, 64],
        8,
        quantize_blocks(QFormat::Q8_0, &random_values(64 * 64, 2)),
    );
    w.to_bytes()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, Error> {
    GgufFile::from_bytes("test.gguf", bytes)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("codelsi-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

fn err_text(e: Error) -> String {
    e.to_string()
}

#[test]
fn valid_gguf_round_trips() {
    let g = parse(valid_gguf()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.tensors.len(), 2);
    let q = g
        .tensor("blk.0.attn_q.weight")
        .unwrap_or_else(|| panic!("tensor missing"));
    assert_eq!((q.ty, q.shape()), (GgmlType::Q8_0, vec![64, 64]));
    let c = Config::from_gguf(&g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            c.hidden_size,
            c.head_dim,
            c.num_key_value_heads,
            c.vocab_size
        ),
        (64, 16, 2, 8)
    );
    assert!(c.tie_word_embeddings);
    // The q/k un-permute of llama GGUFs is a pure row permutation: applying it to rows numbered
    // by their GGUF index gives HF's order (head 0: 0, 2, 4, .., 14, 1, 3, .., 15).
    let w = GgufWeights {
        file: &g,
        n_heads: 4,
        n_kv_heads: 2,
        unpermute_qk: true,
    };
    let t = w
        .require("model.layers.0.self_attn.q_proj.weight")
        .unwrap_or_else(|e| panic!("{e}"));
    let direct = w.file.tensor_bytes(q);
    let row = |bytes: &[u8], r: usize| bytes[r * 68..(r + 1) * 68].to_vec();
    let codelsi_engine::io::HostData::Blocks { bytes, .. } = &t.data else {
        panic!("Q8_0 stays quantised")
    };
    assert_eq!(row(bytes, 1), row(direct, 2));
    assert_eq!(row(bytes, 8), row(direct, 1));
}

#[test]
fn corrupt_gguf_headers_are_typed_errors() {
    let good = valid_gguf();

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(matches!(parse(bad_magic), Err(Error::BadMagic { .. })));

    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        parse(v1),
        Err(Error::UnsupportedGgufVersion { version: 1, .. })
    ));

    // Cut anywhere in the header: truncated or malformed, never a panic.
    for cut in [3, 10, 20, 30, 60, 200, 400] {
        let e = parse(good[..cut].to_vec())
            .map(|_| ())
            .expect_err("truncated header must fail");
        assert!(
            matches!(
                e,
                Error::Truncated { .. } | Error::Malformed { .. } | Error::Metadata { .. }
            ),
            "cut {cut}: {e}"
        );
    }

    // Tensor data past the end of the file.
    let short = good[..good.len() - 100].to_vec();
    let e = err_text(parse(short).map(|_| ()).expect_err("data past end"));
    assert!(e.contains("past the end"), "{e}");

    // A tensor count that cannot fit: rejected before allocating for it.
    let mut lying = good.clone();
    lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse(lying), Err(Error::Malformed { .. })));

    // A string length of 2^63.
    let mut long_key = good.clone();
    long_key[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(matches!(parse(long_key), Err(Error::Truncated { .. })));
}

fn gguf_with_tensor(shape: &[usize], ty: u32, data: Vec<u8>) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()));
    w.tensor("x", shape, ty, data);
    w.to_bytes()
}

#[test]
fn absurd_dims_and_unknown_types_are_rejected() {
    let e = parse(gguf_with_tensor(&[1 << 40, 1 << 40], 0, vec![0; 64]))
        .map(|_| ())
        .expect_err("absurd dims");
    assert!(matches!(e, Error::BadTensor { .. }), "{e}");
    // IQ2_XXS (ggml type 16) is still not read: the tensor and the type are named.
    let e = parse(gguf_with_tensor(&[4, 256], 16, vec![0; 264]))
        .map(|_| ())
        .expect_err("IQ2_XXS");
    assert!(
        matches!(&e, Error::UnsupportedDtype { tensor, dtype, .. } if dtype == "IQ2_XXS" && tensor == "x"),
        "{e}"
    );
    assert!(
        e.to_string().contains("Q5_0"),
        "the message lists what is read: {e}"
    );
    let e = parse(gguf_with_tensor(&[4, 33], 8, vec![0; 200]))
        .map(|_| ())
        .expect_err("ragged blocks");
    assert!(err_text(e).contains("not a multiple"));
    let e = parse(gguf_with_tensor(&[0, 32], 0, vec![]))
        .map(|_| ())
        .expect_err("zero dim");
    assert!(matches!(e, Error::BadTensor { .. }));
}

#[test]
fn unknown_architecture_is_named() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("mamba".into()));
    let g = parse(w.to_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let e = Config::from_gguf(&g).map(|_| ()).expect_err("mamba");
    assert!(
        matches!(&e, Error::UnsupportedArchitecture { arch, .. } if arch == "mamba"),
        "{e}"
    );

    let dir = tmpdir("arch");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 8,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let e = Config::from_hf_json(&dir.join("config.json"))
        .map(|_| ())
        .expect_err("neox");
    assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e}");
}

#[test]
fn malformed_json_files_name_the_file() {
    let dir = tmpdir("json");
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, r#"{"hidden_size": "wide"}"#).unwrap_or_else(|e| panic!("{e}"));
    let e = Config::from_hf_json(&cfg)
        .map(|_| ())
        .expect_err("bad config");
    assert!(
        matches!(&e, Error::Json { path, .. } if path == &cfg),
        "{e}"
    );

    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap_or_else(|e| panic!("{e}"));
    let e = Tokenizer::from_hf_dir(&dir)
        .map(|_| ())
        .expect_err("bad tokenizer");
    assert!(
        matches!(&e, Error::Tokenizer { path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );
}

#[test]
fn wrong_safetensors_dtype_is_a_typed_error() {
    let dir = tmpdir("st");
    let data: Vec<u8> = (0..16i64).flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![4, 4], &data)
        .unwrap_or_else(|e| panic!("{e}"));
    safetensors::serialize_to_file(
        [("model.embed_tokens.weight", view)],
        None,
        &dir.join("model.safetensors"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let w = SafetensorsWeights::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let e = w
        .require("model.embed_tokens.weight")
        .map(|_| ())
        .expect_err("i64");
    assert!(
        matches!(&e, Error::UnsupportedDtype { dtype, .. } if dtype == "I64"),
        "{e}"
    );

    // A safetensors header that lies about its length.
    std::fs::write(dir.join("model.safetensors"), [0xFFu8; 64]).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        SafetensorsWeights::open(&dir),
        Err(Error::Malformed { .. })
    ));

    // A missing directory: an I/O error naming the path.
    let missing = Path::new("/nonexistent/model");
    assert!(SafetensorsWeights::open(missing).is_err());
}

#[test]
fn tiny_fixture_config_parses() {
    let c = Config::from_hf_json(&fixtures().join("tiny_qwen2/config.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.qkv_bias && c.tie_word_embeddings);
}

/// A bounded fuzz of the header parsers: random byte flips, truncations and insertions of a
/// valid GGUF and safetensors header must give `Ok` or `Err`, never a panic. The cargo-fuzz
/// targets in `fuzz/` run the same entry points unbounded.
#[test]
fn fuzz_header_parsers_bounded() {
    let good = valid_gguf();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % b.len() as u64) as usize;
            match next() % 3 {
                0 => b[at] = next() as u8,
                1 => b.truncate(at.max(1)),
                _ => b.insert(at, next() as u8),
            }
        }
        let result = std::panic::catch_unwind(|| {
            if let Ok(g) = GgufFile::from_bytes("fuzz.gguf", b.clone()) {
                let _ = Config::from_gguf(&g);
                for t in &g.tensors {
                    let _ = g.tensor_bytes(t).len();
                }
            }
            let _ = safetensors::SafeTensors::deserialize(&b);
        });
        assert!(result.is_ok(), "iteration {i}: a parser panicked");
    }
}
