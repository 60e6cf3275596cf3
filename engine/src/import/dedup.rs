//! Duplicate removal: exact (after collapsing whitespace) and near (MinHash signatures over
//! word 5-gram shingles with LSH banding, confirmed by the signatures' agreement).

use std::collections::HashMap;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// MinHash signature length: 16 bands of 8 rows. A pair at Jaccard similarity 0.8 shares a
/// band with probability 1 - (1 - 0.8^8)^16 ≈ 0.94; at 0.5 with about 0.06.
const HASHES: usize = 128;
const BANDS: usize = 16;
const ROWS: usize = HASHES / BANDS;
const SHINGLE: usize = 5;

/// Near duplicates: estimated Jaccard similarity at or above this.
pub const NEAR_THRESHOLD: f64 = 0.8;

fn hash64<T: Hash + ?Sized>(t: &T, seed: u64) -> u64 {
    // SipHash with fixed keys: the same on every run, unlike `RandomState`.
    #[allow(
        deprecated,
        reason = "SipHasher is deprecated as a HashMap hasher; here its fixed keys are the point"
    )]
    let mut h = std::hash::SipHasher::new_with_keys(seed, 0x9e37_79b9_7f4a_7c15);
    t.hash(&mut h);
    h.finish()
}

fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let word = c.is_alphanumeric() || c == '_';
        match (word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(&text[s..i]);
                start = None;
            }
            _ => {}
        }
        if !word && !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// Text with runs of whitespace collapsed, for exact comparison.
pub fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn signature(text: &str) -> Option<[u64; HASHES]> {
    let w = words(text);
    if w.len() < SHINGLE {
        return None;
    }
    let shingles: Vec<u64> = w.windows(SHINGLE).map(|s| hash64(&s, 0)).collect();
    let mut sig = [u64::MAX; HASHES];
    for (i, slot) in sig.iter_mut().enumerate() {
        // h_i(x) = mix(x, i): one cheap 64-bit mix per hash function.
        let k = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for &s in &shingles {
            let mut x = s ^ k;
            x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            x ^= x >> 33;
            *slot = (*slot).min(x);
        }
    }
    Some(sig)
}

/// What [`dedup`] decided for each text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Exact,
    Near,
}

/// Decide, in order, which texts to keep: a text equal (after whitespace) to an earlier kept
/// one is `Exact`; one whose estimated Jaccard similarity to an earlier kept one reaches
/// [`NEAR_THRESHOLD`] is `Near`. Texts are compared only within the same `group`.
pub fn dedup<G: Hash + Eq + Clone>(items: &[(G, &str)]) -> Vec<Verdict> {
    let mut exact: HashSet<(G, u64)> = HashSet::new();
    let mut buckets: HashMap<(G, usize, u64), Vec<usize>> = HashMap::new();
    let mut kept_sigs: Vec<Option<[u64; HASHES]>> = Vec::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for (i, (group, text)) in items.iter().enumerate() {
        let norm = normalise(text);
        if !exact.insert((group.clone(), hash64(&norm, 1))) {
            out.push(Verdict::Exact);
            kept_sigs.push(None);
            continue;
        }
        let sig = signature(&norm);
        let mut verdict = Verdict::Keep;
        if let Some(sig) = &sig {
            let mut candidates: Vec<usize> = Vec::new();
            for b in 0..BANDS {
                let key = (group.clone(), b, hash64(&sig[b * ROWS..(b + 1) * ROWS], 2));
                if let Some(v) = buckets.get(&key) {
                    candidates.extend(v);
                }
            }
            candidates.sort_unstable();
            candidates.dedup();
            for c in candidates {
                if let Some(other) = &kept_sigs[c] {
                    let same = sig.iter().zip(other).filter(|(a, b)| a == b).count();
                    if same as f64 / HASHES as f64 >= NEAR_THRESHOLD {
                        verdict = Verdict::Near;
                        break;
                    }
                }
            }
            if verdict == Verdict::Keep {
                for b in 0..BANDS {
                    let key = (group.clone(), b, hash64(&sig[b * ROWS..(b + 1) * ROWS], 2));
                    buckets.entry(key).or_default().push(i);
                }
            }
        }
        kept_sigs.push(if verdict == Verdict::Keep { sig } else { None });
        out.push(verdict);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_near_and_distinct() {
        let body: Vec<String> = (0..30).map(|i| format!("x += {i};")).collect();
        let a = format!("function f(x: number) {{ {} return x; }}", body.join(" "));
        let a_ws = a.replace("; ", ";\n    ");
        let a_near = a.replace("x += 15;", "x += 99;");
        let other =
            "export class Queue<T> { private items: T[] = []; push(x: T) { this.items.push(x); } }";
        let (a, a_ws, a_near) = (a.as_str(), a_ws.as_str(), a_near.as_str());
        let items = [(0, a), (0, a_ws), (0, a_near), (0, other), (1, a)];
        let v = dedup(&items);
        assert_eq!(
            v,
            [
                Verdict::Keep,
                Verdict::Exact,
                Verdict::Near,
                Verdict::Keep,
                Verdict::Keep
            ]
        );
    }
}
