//! Secret detection. Findings carry a kind and a byte range, never a value a report could
//! leak; `redact` replaces each range with a marker that pair building refuses, so no pair near
//! a secret reaches the dataset. What is found:
//! - gitleaks' default rules (v8.30.1, the 217 that apply to any file: `rules/gitleaks.json`,
//!   with its notice and the script that made it), as the crate keyspoor ships them translated
//!   for Rust's `regex`: each rule runs only where one of its keywords occurs (one Aho-Corasick
//!   pass for all), and keeps its secret group, entropy floor, allowlists and stopwords.
//!   keyspoor itself is not a dependency: it needs Rust 1.96. Beside them, two formats of
//!   ours: credentials in URLs and bearer tokens;
//! - what rules cannot see in one literal: string concatenations (`"AKIA" + "2IZY…"`), joined
//!   and scanned whole; base64 literals, decoded and scanned; credential-named variables and
//!   keys (`DB_PASS`, `password:`, `signingKey`) whatever the length of their value; default
//!   values of environment lookups for credential-named variables (`os.getenv("DB_PASSWORD",
//!   "…")`, `process.env.TOKEN || "…"`); "password is …" in comment lines;
//! - high-entropy literals that look like random tokens, with the context that makes them
//!   something else left out: hex strings (digests, test vectors), UUIDs, and literals on a
//!   line that names a hash, digest, checksum or test vector.

use std::ops::Range;
use std::sync::LazyLock;

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::Deserialize;

/// What stands in for a secret in redacted text. Pairs containing it are dropped.
pub const MARKER: &str = "<REDACTED>";

/// A detected secret: its kind and where it is, never what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub range: Range<usize>,
}

/// Formats of ours, beside gitleaks' rules. Group 1 is the secret.
const EXTRAS: &[(&str, &str)] = &[
    // `user:password@` in any scheme's URL.
    (
        "url_credentials",
        r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://([^\s/:@'`]+:[^\s/@'`]+)@",
    ),
    (
        "bearer_token",
        r"(?i)\b(?:bearer|basic)\s+([A-Za-z0-9\-._~+/]{16,}=*)",
    ),
];

/// `rules/gitleaks.json`, as `make_rules.py` writes it.
#[derive(Deserialize)]
struct RuleFile {
    global: AllowSpec,
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
struct RuleSpec {
    id: String,
    keywords: Vec<String>,
    pattern: String,
    secret_group: Option<usize>,
    min_entropy: f64,
    allow: Vec<AllowSpec>,
}

/// An allowlist: a finding it matches is no secret.
#[derive(Deserialize)]
struct AllowSpec {
    #[serde(default)]
    target: AllowTarget,
    #[serde(default)]
    regexes: Vec<String>,
    #[serde(default)]
    stopwords: Vec<String>,
    /// Both the regexes and the stopwords must match (gitleaks' `condition = "AND"`).
    #[serde(default)]
    all: bool,
}

/// What an allowlist's regexes are matched against.
#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum AllowTarget {
    #[default]
    Secret,
    Match,
    Line,
}

struct Allow {
    target: AllowTarget,
    regexes: Option<regex::bytes::RegexSet>,
    stopwords: Vec<String>,
    all: bool,
}

impl Allow {
    fn new(spec: &AllowSpec) -> Result<Self, regex::Error> {
        Ok(Self {
            target: spec.target,
            regexes: if spec.regexes.is_empty() {
                None
            } else {
                // gitleaks' patterns are Go's RE2, whose `\w` and `(?i)` are ASCII: so are
                // these (and they compile in a fraction of the time).
                Some(
                    regex::bytes::RegexSetBuilder::new(&spec.regexes)
                        .unicode(false)
                        .size_limit(64 << 20)
                        .build()?,
                )
            },
            stopwords: spec.stopwords.iter().map(|w| w.to_lowercase()).collect(),
            all: spec.all,
        })
    }

    /// Whether this allowlist lets the finding `secret` (in `full`, on `line`) go.
    fn allows(&self, secret: &str, full: &str, line: &str) -> bool {
        let target = match self.target {
            AllowTarget::Secret => secret,
            AllowTarget::Match => full,
            AllowTarget::Line => line,
        };
        let by_regex = self.regexes.as_ref().map(|r| r.is_match(target.as_bytes()));
        let by_word = (!self.stopwords.is_empty()).then(|| {
            let lower = secret.to_lowercase();
            self.stopwords.iter().any(|w| lower.contains(w.as_str()))
        });
        if self.all {
            by_regex.unwrap_or(true) && by_word.unwrap_or(true)
        } else {
            by_regex.unwrap_or(false) || by_word.unwrap_or(false)
        }
    }
}

struct Rule {
    id: String,
    pattern: regex::bytes::Regex,
    secret_group: Option<usize>,
    min_entropy: f64,
    allow: Vec<Allow>,
}

/// The compiled rules, and one automaton over every rule's keywords.
struct Rules {
    rules: Vec<Rule>,
    global: Allow,
    keywords: AhoCorasick,
    /// The rule each keyword of `keywords` belongs to.
    keyword_rule: Vec<usize>,
    /// Rules that failed to compile (a test holds this at none; a rule that fails in a user's
    /// hands is left out rather than stopping the import).
    #[cfg_attr(not(test), allow(dead_code))]
    failed: Vec<String>,
}

// The rules are data shipped in the binary: a bad file fails every test, never first in a
// user's hands.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static RULES: LazyLock<Rules> = LazyLock::new(|| {
    let file: RuleFile = serde_json::from_str(include_str!("rules/gitleaks.json"))
        .expect("rules/gitleaks.json is valid");
    let (mut rules, mut failed, mut words, mut keyword_rule) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for spec in &file.rules {
        let pattern = regex::bytes::RegexBuilder::new(&spec.pattern)
            .unicode(false)
            .size_limit(64 << 20)
            .build();
        let allow: Result<Vec<Allow>, _> = spec.allow.iter().map(Allow::new).collect();
        let (Ok(pattern), Ok(allow)) = (pattern, allow) else {
            failed.push(spec.id.clone());
            continue;
        };
        for w in &spec.keywords {
            words.push(w.to_lowercase());
            keyword_rule.push(rules.len());
        }
        rules.push(Rule {
            id: spec.id.clone(),
            pattern,
            secret_group: spec.secret_group,
            min_entropy: spec.min_entropy,
            allow,
        });
    }
    Rules {
        rules,
        global: Allow::new(&file.global).expect("the global allowlist compiles"),
        keywords: AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&words)
            .expect("keywords build an automaton"),
        keyword_rule,
        failed,
    }
});

#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static EXTRA_PATTERNS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    EXTRAS
        .iter()
        .map(|(kind, re)| (*kind, Regex::new(re).expect("valid pattern")))
        .collect()
});

/// A credential-looking name (its last word is checked in code) given a quoted value:
/// `DB_PASS = "…"`, `password: '…'`, `"client_secret": "…"`, `signingKey := "…"`.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"([A-Za-z_$][\w$.\-]*)["']?\s*(?:=|:|:=|=>)\s*(?:["'`]([^"'`\n]{4,200})["'`])"#)
        .expect("valid pattern")
});

/// The default of an environment lookup: Python's `getenv("X", "d")` and
/// `environ.get("X", "d")`, JavaScript's `process.env.X || "d"` (or `??`), Rust's
/// `env::var("X").unwrap_or("d")`. Group 1 is the variable, group 2 the default.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static ENV_DEFAULT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?:getenv|environ\.get|env\.get)\(\s*["']([A-Za-z0-9_]+)["']\s*,\s*["']([^"'\n]{4,200})["']|process\.env(?:\.([A-Za-z0-9_]+)|\[["']([A-Za-z0-9_]+)["']\])\s*(?:\|\||\?\?)\s*["'`]([^"'`\n]{4,200})["'`]|env::var\(\s*"([A-Za-z0-9_]+)"\s*\)\s*\.unwrap_or\(\s*"([^"\n]{4,200})""#,
    )
    .expect("valid pattern")
});

/// "password is X", "token: X" in a comment or prose.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static IN_PROSE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:password|passwd|passphrase|pwd|secret|token|api[ _\-]?key)\s*(?:\s(?:is|was)\s|:)\s*([^\s'`]{6,})",
    )
    .expect("valid pattern")
});

/// String literals with no whitespace, candidates for the entropy and base64 tests.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static STRING_LITERAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#""([A-Za-z0-9+/=_\-]{20,})"|'([A-Za-z0-9+/=_\-]{20,})'|`([A-Za-z0-9+/=_\-]{20,})`"#,
    )
    .expect("literal pattern is valid")
});

/// One string literal without whitespace (a template literal without substitutions).
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static LITERAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?:"[^"\s]*"|'[^'\s]*'|`[^`\s$]*`)"#).expect("valid pattern"));

/// Two or more literals without whitespace joined by `+` (across lines). Pieces of a secret
/// hold none; and a "literal" that does may be the code between two real ones, paired wrong.
#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static CONCATENATION: LazyLock<Regex> = LazyLock::new(|| {
    let piece = r#"(?:"[^"\s]*"|'[^'\s]*'|`[^`\s$]*`)"#;
    Regex::new(&format!(r"{piece}(?:\s*\+\s*{piece})+")).expect("valid pattern")
});

#[allow(
    clippy::expect_used,
    reason = "constant data: a bad pattern fails every test"
)]
static HASH_CONTEXT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)hash|digest|sha\d|md5|checksum|fingerprint|test.?vector|expected|integrity")
        .expect("valid pattern")
});

/// The last words of names that hold credentials.
const CREDENTIAL_WORDS: [&str; 10] = [
    "password",
    "passwd",
    "pass",
    "pwd",
    "passphrase",
    "secret",
    "token",
    "credential",
    "credentials",
    "auth",
];

/// `key` alone names too much (`key: "name"`); these do not.
const KEY_QUALIFIERS: [&str; 8] = [
    "api",
    "secret",
    "signing",
    "private",
    "access",
    "encryption",
    "master",
    "auth",
];

/// Whether `name` (`DB_PASS`, `signingKey`, `client-secret`, `config.apiKey`) names a
/// credential: its last word is one, or is `key` after a qualifier.
fn credential_name(name: &str) -> bool {
    let name = name.rsplit('.').next().unwrap_or(name);
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c == '_' || c == '-' || c == '$' {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            prev_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && prev_lower && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        word.push(c.to_ascii_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    match words.as_slice() {
        [.., last] if CREDENTIAL_WORDS.contains(&last.as_str()) => true,
        [.., q, last] if last == "key" || last == "keys" => KEY_QUALIFIERS.contains(&q.as_str()),
        [one] => matches!(
            one.as_str(),
            "apikey" | "secretkey" | "privatekey" | "accesskey"
        ),
        _ => false,
    }
}

/// Whether a credential's value is a real value rather than a label, a keyword, a reference
/// or a placeholder: not the credential word itself, not lower-case words (`paren.lparen`,
/// "enter your password"), not an environment variable's name.
fn credential_value(v: &str) -> bool {
    let t = v.trim();
    if t.len() < 4 || is_placeholder(t) {
        return false;
    }
    let lower_words = t
        .chars()
        .all(|c| c.is_ascii_lowercase() || matches!(c, ' ' | '.' | '_' | '-'));
    let env_name = t
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    let prose = t.split_whitespace().count() >= 4;
    // A scheme alone (`"Basic " + encoded`), a format string (`'%s:%s'`, `'{0}:{1}'`), an
    // object id (`'1.3.6.1.5.5.7.3.1'`) holds no secret of its own.
    let scheme = matches!(
        t.to_ascii_lowercase().as_str(),
        "basic" | "bearer" | "digest" | "token" | "negotiate"
    );
    let format = t.contains("%s") || t.contains("%d") || t.contains("{0") || t.contains("{}");
    let no_letters = !t.bytes().any(|b| b.is_ascii_alphabetic());
    let path = t.starts_with('/') || t.starts_with("./") || t.starts_with("http");
    !(lower_words
        || env_name
        || prose
        || path
        || scheme
        || format
        || no_letters
        || CREDENTIAL_WORDS.contains(&t.to_ascii_lowercase().as_str()))
}

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

/// Whether a literal looks like a random token rather than a word, path, identifier, digest
/// or UUID: letters and digits mixed, several capitals, and high entropy.
fn looks_random(s: &str) -> bool {
    // Identifiers and message keys (`Type_0_is_not_valid_1055`) join words with separators;
    // a random token of this length rarely holds three.
    let separators = s.bytes().filter(|b| matches!(b, b'_' | b'-')).count();
    if separators >= 3 || s.len() > 100 {
        return false;
    }
    // Hex (hash digests, test vectors, colours, ids) is left to the rules and the
    // credential names: alone it is far more often a digest than a key.
    if s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return false;
    }
    // An alphabet or a sequence (`ABCDEFGH…0123456789+/`): five characters in a row.
    if s.as_bytes()
        .windows(5)
        .any(|w| w.windows(2).all(|p| p[1] == p[0] + 1))
    {
        return false;
    }
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let upper = s.bytes().filter(u8::is_ascii_uppercase).count();
    let lower = s.bytes().filter(u8::is_ascii_lowercase).count();
    // Mixed case as well as digits: a camelCase name with a number in it scores high too,
    // but rarely has as many capitals as a base64 token.
    digits >= 2 && upper >= 3 && lower >= 3 && entropy(s) > 4.0
}

/// `range` widened to the boundaries of the characters it touches.
fn chars(text: &str, range: Range<usize>) -> Range<usize> {
    let mut start = range.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = range.end.min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// The line (or lines) holding `range` in `text`.
fn line_of<'a>(text: &'a str, range: &Range<usize>) -> &'a str {
    let start = text[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let end = text[range.end..]
        .find('\n')
        .map_or(text.len(), |i| range.end + i);
    &text[start..end]
}

/// What gitleaks' rules and ours find in `text`, with their ranges.
fn providers(text: &str, out: &mut Vec<Finding>) {
    let r = &*RULES;
    let mut hit = vec![false; r.rules.len()];
    for m in r.keywords.find_overlapping_iter(text) {
        hit[r.keyword_rule[m.pattern().as_usize()]] = true;
    }
    for (rule, _) in r.rules.iter().zip(&hit).filter(|(_, h)| **h) {
        for caps in rule.pattern.captures_iter(text.as_bytes()) {
            let Some(full) = caps.get(0) else { continue };
            let secret = match rule.secret_group {
                Some(g) => caps.get(g),
                None => caps
                    .iter()
                    .skip(1)
                    .flatten()
                    .find(|c| !c.is_empty())
                    .or(Some(full)),
            };
            let Some(secret) = secret.filter(|m| !m.is_empty()) else {
                continue;
            };
            // Byte patterns may stop inside a character: widen to whole ones.
            let (secret, full) = (chars(text, secret.range()), chars(text, full.range()));
            let value = &text[secret.clone()];
            if rule.min_entropy > 0.0 && entropy(value) <= rule.min_entropy {
                continue;
            }
            let line = line_of(text, &full);
            let allowed = std::iter::once(&r.global)
                .chain(&rule.allow)
                .any(|a| a.allows(value, &text[full.clone()], line));
            if !allowed {
                out.push(Finding {
                    kind: rule.id.as_str(),
                    range: secret,
                });
            }
        }
    }
    for (kind, re) in EXTRA_PATTERNS.iter() {
        for caps in re.captures_iter(text) {
            let Some(m) = caps.get(1) else { continue };
            // `Bearer someLongIdentifier` in prose is no token: a token has digits.
            if *kind == "bearer_token" && !m.as_str().bytes().any(|b| b.is_ascii_digit()) {
                continue;
            }
            out.push(Finding {
                kind,
                range: m.range(),
            });
        }
    }
}

/// Everything a single stretch of text holds on its own: provider formats, credential
/// assignments, environment defaults, credentials in prose, random-looking literals.
fn scan_plain(text: &str, out: &mut Vec<Finding>) {
    providers(text, out);
    for caps in ASSIGNMENT.captures_iter(text) {
        if let (Some(name), Some(value)) = (caps.get(1), caps.get(2))
            && credential_name(name.as_str())
            && credential_value(value.as_str())
        {
            out.push(Finding {
                kind: "credential_assignment",
                range: value.range(),
            });
        }
    }
    for caps in ENV_DEFAULT.captures_iter(text) {
        let name = caps.get(1).or(caps.get(3)).or(caps.get(4)).or(caps.get(6));
        let value = caps.get(2).or(caps.get(5)).or(caps.get(7));
        if let (Some(name), Some(value)) = (name, value)
            && credential_name(name.as_str())
            && !is_placeholder(value.as_str())
        {
            out.push(Finding {
                kind: "environment_default",
                range: value.range(),
            });
        }
    }
    for caps in IN_PROSE.captures_iter(text) {
        if let Some(v) = caps.get(1)
            && in_comment(text, v.start())
        {
            let s = v.as_str().trim_end_matches(['.', ',', ';', ')', '"']);
            // Letters and digits: `token is LessThanToken` names a thing, `is ZqELAoiVowq4`
            // gives one.
            let has_digit = s.bytes().any(|b| b.is_ascii_digit());
            let has_alpha = s.bytes().any(|b| b.is_ascii_alphabetic());
            if has_alpha && has_digit && !is_placeholder(s) {
                out.push(Finding {
                    kind: "credential_in_text",
                    range: v.start()..v.start() + s.len(),
                });
            }
        }
    }
    for caps in STRING_LITERAL.captures_iter(text) {
        let Some(m) = caps.get(1).or_else(|| caps.get(2)).or_else(|| caps.get(3)) else {
            continue;
        };
        let line_start = text[..m.start()].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[m.end()..]
            .find('\n')
            .map_or(text.len(), |i| m.end() + i);
        if looks_random(m.as_str()) && !HASH_CONTEXT.is_match(&text[line_start..line_end]) {
            out.push(Finding {
                kind: "high_entropy_string",
                range: m.range(),
            });
        }
    }
}

/// Whether the line holding byte `at` is a comment line (`//`, `#`, `*`, `/*`, `--`, `<!--`).
fn in_comment(text: &str, at: usize) -> bool {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..at].trim_start();
    ["//", "#", "*", "/*", "--", "<!--"]
        .iter()
        .any(|c| line.starts_with(c))
}

/// Kinds that say only that something looks like a secret, not whose.
const GENERIC: [&str; 6] = [
    "generic-api-key",
    "credential_assignment",
    "environment_default",
    "credential_in_text",
    "high_entropy_string",
    "bearer_token",
];

/// Every secret in `text`, in order, with no two ranges overlapping (overlapping findings are
/// merged, the first found naming the whole).
pub fn scan(text: &str) -> Vec<Finding> {
    let mut found: Vec<Finding> = Vec::new();
    scan_plain(text, &mut found);
    // Pieces joined: a secret split across literals is one once they are.
    for m in CONCATENATION.find_iter(text) {
        let joined: String = LITERAL
            .find_iter(m.as_str())
            .map(|l| &l.as_str()[1..l.len() - 1])
            .collect();
        let mut inner = Vec::new();
        providers(&joined, &mut inner);
        let random = looks_random(&joined);
        if let Some(f) = inner.first() {
            found.push(Finding {
                kind: f.kind,
                range: m.range(),
            });
        } else if random {
            found.push(Finding {
                kind: "high_entropy_string",
                range: m.range(),
            });
        }
    }
    // A secret inside a base64 literal (a service account's JSON, a `.env` encoded).
    for caps in STRING_LITERAL.captures_iter(text) {
        let Some(m) = caps.get(1).or_else(|| caps.get(2)).or_else(|| caps.get(3)) else {
            continue;
        };
        if m.len() < 40 {
            continue;
        }
        if let Some(decoded) = base64_text(m.as_str()) {
            let mut inner = Vec::new();
            scan_plain(&decoded, &mut inner);
            if !inner.is_empty() {
                found.push(Finding {
                    kind: "base64_encoded_secret",
                    range: m.range(),
                });
            }
        }
    }
    found.sort_by_key(|f| (f.range.start, std::cmp::Reverse(f.range.end)));
    let mut merged: Vec<Finding> = Vec::with_capacity(found.len());
    for f in found {
        match merged.last_mut() {
            Some(last) if f.range.start < last.range.end => {
                last.range.end = last.range.end.max(f.range.end);
                // A provider's name says more than a generic rule's.
                if GENERIC.contains(&last.kind) && !GENERIC.contains(&f.kind) {
                    last.kind = f.kind;
                }
            }
            _ => merged.push(f),
        }
    }
    merged
}

/// `s` decoded from base64 (standard or URL alphabet, padding optional) when that gives
/// printable text.
fn base64_text(s: &str) -> Option<String> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    let printable = text
        .chars()
        .all(|c| !c.is_control() || c == '\n' || c == '\r' || c == '\t');
    printable.then_some(text)
}

/// Values that name where a secret comes from instead of being one.
fn is_placeholder(v: &str) -> bool {
    let l = v.to_ascii_lowercase();
    l.starts_with("process.env")
        || l.starts_with("${")
        || l.starts_with("{{")
        || l.starts_with('<')
        || l.contains("xxxx")
        || l.contains("****")
        || l.contains("example")
        || l.contains("placeholder")
        || l.contains("changeme")
        || l.contains("your")
        || l.contains("dummy")
        || l.contains("redacted")
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

/// Files that hold secrets by their nature (`.env`, key files) or often do (configuration and
/// deployment files: `.envrc`, YAML, `docker-compose*`, Terraform variables and state,
/// `.properties`, `.ini`, `.cfg`, `.conf`); dropped whole, and counted in the report under
/// their kind, never passed over in silence.
pub fn secret_file_kind(file_name: &str) -> Option<&'static str> {
    let l = file_name.to_ascii_lowercase();
    let ext = l.rsplit_once('.').map_or("", |(_, e)| e);
    if l == ".env" || l.starts_with(".env.") || l.ends_with(".env") || l == ".envrc" {
        Some("env_file")
    } else if matches!(ext, "pem" | "key" | "p12" | "pfx" | "jks" | "keystore")
        || matches!(
            l.as_str(),
            "id_rsa"
                | "id_dsa"
                | "id_ecdsa"
                | "id_ed25519"
                | ".npmrc"
                | ".netrc"
                | ".pgpass"
                | ".pypirc"
                | ".git-credentials"
                | ".htpasswd"
                | ".s3cfg"
                | ".dockercfg"
                | "credentials"
                | "credentials.json"
        )
    {
        Some("key_file")
    } else if l.starts_with("docker-compose")
        || l.starts_with("compose.")
        || matches!(
            ext,
            "yaml" | "yml" | "tfvars" | "tfstate" | "properties" | "ini" | "cfg" | "conf"
        )
    {
        Some("config_file")
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
            kinds(r#"const k = "AKIAZ7QWERTYUIOPASDF";"#),
            ["aws-access-token"]
        );
        // gitleaks' own allowlist: AWS's documentation key.
        assert!(kinds(r#"const k = "AKIAIOSFODNN7EXAMPLE";"#).is_empty());
        assert_eq!(
            kinds("token: 'ghp_0123456789abcdefghijABCDEFGHIJ012345'"),
            ["github-pat"]
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
    fn every_gitleaks_rule_compiles() {
        assert_eq!(RULES.failed, Vec::<String>::new());
        assert_eq!(RULES.rules.len(), 217);
    }

    #[test]
    fn what_one_literal_does_not_show() {
        // Pieces joined, whatever the quotes and line breaks.
        assert_eq!(
            kinds("k = 'AKIA' + \"2IZYYLEQ\" +\n  `VIQR7QGG`;"),
            ["aws-access-token"]
        );
        assert_eq!(
            kinds(r#"greeting = "Hello, " + "world""#),
            Vec::<&str>::new()
        );
        // Credential names, any length; labels and keywords are not values.
        assert_eq!(
            kinds(r#"const DB_PASS = "hunter2n45jTS""#),
            ["credential_assignment"]
        );
        assert_eq!(
            kinds(r#"{ password: "p@sskj" }"#),
            ["credential_assignment"]
        );
        assert_eq!(kinds(r#"{ password: "Password" }"#), Vec::<&str>::new());
        assert_eq!(kinds(r#"const bypass = "x9-route""#), Vec::<&str>::new());
        assert_eq!(
            kinds(r#"const passwordLabel = "Pass 2""#),
            Vec::<&str>::new()
        );
        assert_eq!(kinds(r#"{ key: "name2" }"#), Vec::<&str>::new());
        assert_eq!(kinds(r#"auth = "Basic " + encoded"#), Vec::<&str>::new());
        assert_eq!(kinds(r#"user_pass = '%s:%s' % (u, p)"#), Vec::<&str>::new());
        assert_eq!(
            kinds(r#"SERVER_AUTH = '1.3.6.1.5.5.7.3.1'"#),
            Vec::<&str>::new()
        );
        // Environment defaults, for credential names only.
        assert_eq!(
            kinds(r#"os.getenv("REPORT_DB_PASSWORD", "FallbacknRBBtGaprB")"#),
            ["environment_default"]
        );
        assert_eq!(
            kinds(r#"os.getenv("HOST", "localhost1")"#),
            Vec::<&str>::new()
        );
        // In comments, not in code.
        assert_eq!(
            kinds("# admin password is ZqELAoiVowq4"),
            ["credential_in_text"]
        );
        assert_eq!(kinds("if token is None2: pass"), Vec::<&str>::new());
        // Digests and ids are not tokens.
        assert!(
            kinds(r#"h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855""#)
                .is_empty()
        );
        assert!(kinds(r#"id = "123e4567-e89b-12d3-a456-426614174000""#).is_empty());
    }

    #[test]
    fn secret_bearing_files_are_named() {
        for (name, kind) in [
            (".env", Some("env_file")),
            (".env.production", Some("env_file")),
            (".envrc", Some("env_file")),
            ("id_ed25519", Some("key_file")),
            ("server.PEM", Some("key_file")),
            (".pypirc", Some("key_file")),
            ("docker-compose.override.yml", Some("config_file")),
            ("values.yaml", Some("config_file")),
            ("prod.tfvars", Some("config_file")),
            ("terraform.tfstate", Some("config_file")),
            ("application.properties", Some("config_file")),
            ("setup.cfg", Some("config_file")),
            ("php.ini", Some("config_file")),
            ("nginx.conf", Some("config_file")),
            ("main.ts", None),
            ("environment.ts", None),
            ("package.json", None),
        ] {
            assert_eq!(secret_file_kind(name), kind, "{name}");
        }
    }

    #[test]
    fn redaction_removes_the_value() {
        let text = "a = 'AKIAZ7QWERTYUIOPASDF'; b = 1";
        let red = redact(text, &scan(text));
        assert_eq!(red, "a = '<REDACTED>'; b = 1");
    }
}
