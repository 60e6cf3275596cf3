//! Secret detection: known key formats, credential assignments, credentials in URLs and
//! high-entropy string literals. Findings carry a kind and a byte range, never a value a
//! report could leak; `redact` replaces each range with a marker that pair building
//! refuses, so no pair near a secret reaches the dataset.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

/// What stands in for a secret in redacted text. Pairs containing it are dropped.
pub const MARKER: &str = "<REDACTED>";

/// A detected secret: its kind and where it is, never what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub range: Range<usize>,
}

/// Known formats, most specific first: the first pattern to claim a range names its kind.
/// Group 1, when a pattern has one, is the secret itself (the rest is context).
// The patterns are constants: a bad one panics in every test, never first in a user's hands.
#[allow(clippy::expect_used)]
static PATTERNS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let table: [(&str, &str); 10] = [
        (
            "private_key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        ),
        ("aws_access_key", r"\b((?:AKIA|ASIA)[0-9A-Z]{16})\b"),
        (
            "github_token",
            r"\b((?:gh[pousr]_[A-Za-z0-9]{36,255})|(?:github_pat_[A-Za-z0-9_]{60,255}))\b",
        ),
        ("slack_token", r"\b(xox[abposr]-[A-Za-z0-9-]{10,})"),
        ("stripe_key", r"\b([rs]k_(?:live|test)_[A-Za-z0-9]{16,})\b"),
        ("google_api_key", r"\b(AIza[0-9A-Za-z_\-]{35})"),
        ("openai_api_key", r"\b(sk-(?:proj-)?[A-Za-z0-9_\-]{32,})"),
        (
            "jwt",
            r"\b(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
        ),
        // `user:password@` in any scheme's URL.
        (
            "url_credentials",
            r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://([^\s/:@'`]+:[^\s/@'`]+)@",
        ),
        // A credential-looking name assigned a literal.
        (
            "credential_assignment",
            r#"(?i)(?:api[_\-]?key|apikey|secret(?:[_\-]?key)?|client[_\-]?secret|access[_\-]?token|auth[_\-]?token|private[_\-]?key|password|passwd|pwd)["']?\s*(?:=|:|:=)\s*["'`]([^"'`\s]{8,})["'`]"#,
        ),
    ];
    table
        .into_iter()
        .map(|(kind, re)| (kind, Regex::new(re).expect("secret patterns are valid")))
        .collect()
});

/// String literals with no whitespace, candidates for the entropy test.
#[allow(clippy::expect_used)]
static STRING_LITERAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#""([A-Za-z0-9+/=_\-]{20,})"|'([A-Za-z0-9+/=_\-]{20,})'|`([A-Za-z0-9+/=_\-]{20,})`"#,
    )
    .expect("literal pattern is valid")
});

/// Shannon entropy in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0usize; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether a literal looks like a random token rather than a word, path or identifier:
/// letters and digits mixed, and high entropy for its alphabet (hex tops out at 4 bits).
fn looks_random(s: &str) -> bool {
    // Identifiers and message keys (`Type_0_is_not_valid_1055`) join words with separators;
    // a random token of this length rarely holds three.
    let separators = s.bytes().filter(|b| matches!(b, b'_' | b'-')).count();
    if separators >= 3 || s.len() > 100 {
        return false;
    }
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let letters = s.bytes().filter(u8::is_ascii_alphabetic).count();
    if digits < 2 || letters < 2 {
        return false;
    }
    let upper = s.bytes().filter(u8::is_ascii_uppercase).count();
    let lower = s.bytes().filter(u8::is_ascii_lowercase).count();
    let hex = s.bytes().all(|b| b.is_ascii_hexdigit());
    if hex {
        s.len() >= 32 && entropy(s) > 3.0
    } else {
        // Mixed case as well as digits: a camelCase name with a number in it scores high too,
        // but rarely has as many capitals as a base64 token.
        upper >= 3 && lower >= 3 && entropy(s) > 4.0
    }
}

/// Every secret in `text`, in order, with no two ranges overlapping.
pub fn scan(text: &str) -> Vec<Finding> {
    let mut found: Vec<Finding> = Vec::new();
    let overlaps = |found: &[Finding], r: &Range<usize>| {
        found
            .iter()
            .any(|f| f.range.start < r.end && r.start < f.range.end)
    };
    for (kind, re) in PATTERNS.iter() {
        for caps in re.captures_iter(text) {
            let Some(m) = caps.get(1).or_else(|| caps.get(0)) else {
                continue;
            };
            let range = m.range();
            if *kind == "credential_assignment" && is_placeholder(m.as_str()) {
                continue;
            }
            if !overlaps(&found, &range) {
                found.push(Finding { kind, range });
            }
        }
    }
    for caps in STRING_LITERAL.captures_iter(text) {
        let Some(m) = caps.get(1).or_else(|| caps.get(2)).or_else(|| caps.get(3)) else {
            continue;
        };
        let range = m.range();
        if looks_random(m.as_str()) && !overlaps(&found, &range) {
            found.push(Finding {
                kind: "high_entropy_string",
                range,
            });
        }
    }
    found.sort_by_key(|f| f.range.start);
    found
}

/// Values that name where a secret comes from instead of being one.
fn is_placeholder(v: &str) -> bool {
    let l = v.to_ascii_lowercase();
    l.starts_with("process.env")
        || l.starts_with("${")
        || l.starts_with('<')
        || l.contains("xxxx")
        || l.contains("example")
        || l.contains("placeholder")
        || l.contains("changeme")
        || l.contains("your")
}

/// `text` with every finding replaced by [`MARKER`].
pub fn redact(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.range.start]);
        out.push_str(MARKER);
        at = f.range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Files that hold secrets by their nature (`.env`, key files); dropped whole.
pub fn secret_file_kind(file_name: &str) -> Option<&'static str> {
    let l = file_name.to_ascii_lowercase();
    if l == ".env" || l.starts_with(".env.") || l.ends_with(".env") {
        Some("env_file")
    } else if l.ends_with(".pem")
        || l.ends_with(".key")
        || l.ends_with(".p12")
        || l.ends_with(".pfx")
        || matches!(l.as_str(), "id_rsa" | "id_dsa" | "id_ecdsa" | "id_ed25519")
        || l == ".npmrc"
        || l == ".netrc"
        || l == ".pgpass"
        || l == "credentials.json"
    {
        Some("key_file")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<&'static str> {
        scan(text).iter().map(|f| f.kind).collect()
    }

    #[test]
    fn known_formats() {
        assert_eq!(
            kinds(r#"const k = "AKIAIOSFODNN7EXAMPLE";"#),
            ["aws_access_key"]
        );
        assert_eq!(
            kinds("token: 'ghp_0123456789abcdefghijABCDEFGHIJ012345'"),
            ["github_token"]
        );
        assert_eq!(
            kinds("db = 'postgres://admin:hunter22@db.local/app'"),
            ["url_credentials"]
        );
        assert_eq!(
            kinds(r#"password = "correct-horse-9""#),
            ["credential_assignment"]
        );
        assert_eq!(
            kinds(r#"password = process.env.DB_PASSWORD"#),
            Vec::<&str>::new()
        );
        assert_eq!(kinds(r#"const apiKey = "${API_KEY}""#), Vec::<&str>::new());
    }

    #[test]
    fn entropy_separates_tokens_from_words() {
        assert_eq!(
            kinds(r#"x = "q8Zr3Lw0Pk2Vn7Xb5Ty1Hd4G""#),
            ["high_entropy_string"]
        );
        assert!(kinds(r#"x = "someLongCamelCaseIdentifier""#).is_empty());
        assert!(kinds(r#"x = "node_modules/typescript/lib""#).is_empty());
        assert!(kinds(r#"x = "0000000000000000000000000000000000""#).is_empty());
        assert!(kinds(r#"d = "Type_0_is_not_a_valid_ES5_Promise_type_1055""#).is_empty());
    }

    #[test]
    fn redaction_removes_the_value() {
        let text = "a = 'AKIAIOSFODNN7EXAMPLE'; b = 1";
        let red = redact(text, &scan(text));
        assert_eq!(red, "a = '<REDACTED>'; b = 1");
    }
}
