//! Host dequantisation of every quantised GGUF type we read against gguf-py's (ggml's reference in numpy),
//! on random blocks with varying scales (fixture made by tests/scripts/make_golden.py).

use codelsi_engine::quant::{GgmlType, dequantize_into};
use codelsi_tests::{assert_close, fixtures};

#[derive(serde::Deserialize)]
struct Case {
    #[serde(rename = "type")]
    name: String,
    type_id: u32,
    bytes_hex: String,
    values: Vec<f32>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[test]
fn dequantize_matches_gguf_py() {
    let text =
        std::fs::read_to_string(fixtures().join("kquants.json")).unwrap_or_else(|e| panic!("{e}"));
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cases.len(), 12);
    for c in cases {
        let ty = GgmlType::from_id(c.type_id).unwrap_or_else(|| panic!("{} unsupported", c.name));
        let mut got = Vec::new();
        dequantize_into(ty, &unhex(&c.bytes_hex), &mut got);
        // Same f16 scales and integer codes; numpy computes in f32 like us (one rounding apart).
        assert_close(&c.name, &got, &c.values, 1e-6, 1e-6);
    }
}
