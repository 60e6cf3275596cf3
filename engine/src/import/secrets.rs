//! Secret detection. Findings carry a kind and a byte range, never a value a report could
//! leak; `redact` replaces each range with a marker that pair building refuses, so no pair near
//! a secret reaches the dataset. What is found:
//! - provider formats (`PROVIDERS`): the token shapes of some fifty services, grouped by the
//!   families gitleaks' default rules use (cloud keys, source hosts, chat and mail services,
//!   payment, AI and ML hubs, package registries, observability, private keys, JWTs, webhook
//!   URLs, bearer tokens). The table is ours, written from the providers' documented prefixes:
//!   no maintained rule-set crate builds with this project's toolchain (keyspoor, which carries
//!   gitleaks' rules, needs Rust 1.96 and is at 0.1), and gitleaks' own file cannot be vendored
//!   from here. Each rule has a test string in `tests/fixtures/secrets_repo`;
//! - what rules cannot see in one literal: string concatenations (`"AKIA" + "2IZY…"`), joined
//!   and scanned whole; base64 literals, decoded and scanned; credential-named variables and
//!   keys (`DB_PASS`, `password:`, `signingKey`) whatever the length of their value; default
//!   values of environment lookups for credential-named variables (`os.getenv("DB_PASSWORD",
//!   "…")`, `process.env.TOKEN || "…"`); "password is …" in comments and prose;
//! - high-entropy literals that look like random tokens, with the context that makes them
//!   something else left out: hex strings (digests, test vectors), UUIDs, and literals on a
//!   line that names a hash, digest, checksum or test vector.

use std::ops::Range;
use std::sync::LazyLock;

use regex::{Regex, RegexSet};

/// What stands in for a secret in redacted text. Pairs containing it are dropped.
pub const MARKER: &str = "<REDACTED>";

/// A detected secret: its kind and where it is, never what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub range: Range<usize>,
}

/// Provider formats, most specific first: the first pattern to claim a range names its kind.
/// Group 1, when a pattern has one, is the secret itself (the rest is context).
const PROVIDERS: &[(&str, &str)] = &[
    (
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    ),
    ("age_secret_key", r"\bAGE-SECRET-KEY-1[0-9A-Z]{58}\b"),
    // Cloud.
    (
        "aws_access_key",
        r"\b((?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[0-9A-Z]{16})\b",
    ),
    (
        "azure_storage_key",
        r"AccountKey=([A-Za-z0-9+/]{86,88}={0,2})",
    ),
    ("google_api_key", r"\b(AIza[0-9A-Za-z_\-]{35})"),
    ("google_oauth_token", r"\b(ya29\.[0-9A-Za-z_\-]{30,})"),
    ("alibaba_access_key", r"\b(LTAI[A-Za-z0-9]{20})\b"),
    ("digitalocean_token", r"\b(do[opr]_v1_[a-f0-9]{64})\b"),
    ("hashicorp_vault_token", r"\b(hv[sb]\.[A-Za-z0-9_\-]{24,})"),
    (
        "terraform_cloud_token",
        r"\b([A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_\-=]{60,70})",
    ),
    ("pulumi_token", r"\b(pul-[a-f0-9]{40})\b"),
    ("flyio_token", r"\b(fo1_[A-Za-z0-9_\-]{43})"),
    ("supabase_token", r"\b(sbp_[a-f0-9]{40})\b"),
    ("databricks_token", r"\b(dapi[a-f0-9]{32}(?:-\d)?)\b"),
    // Source hosts and registries.
    (
        "github_token",
        r"\b((?:gh[pousr]_[A-Za-z0-9]{36,255})|(?:github_pat_[A-Za-z0-9_]{60,255}))\b",
    ),
    (
        "gitlab_token",
        r"\b(gl(?:pat|dt|ptt|rt|cbt|oas|ft|imt|agent)-[A-Za-z0-9_\-]{20,})",
    ),
    ("npm_token", r"\b(npm_[A-Za-z0-9]{36})\b"),
    ("pypi_token", r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,})"),
    ("docker_token", r"\b(dckr_pat_[A-Za-z0-9_\-]{27,})"),
    ("atlassian_token", r"\b(ATATT3[A-Za-z0-9_\-=]{150,})"),
    ("linear_api_key", r"\b(lin_api_[A-Za-z0-9]{40})\b"),
    ("postman_api_key", r"\b(PMAK-[a-f0-9]{24}-[a-f0-9]{34})\b"),
    (
        "doppler_token",
        r"\b(dp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,44})",
    ),
    // Chat, mail and messaging.
    ("slack_token", r"\b(xox[abposre]-[A-Za-z0-9-]{10,})"),
    ("slack_app_token", r"\b(xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+)"),
    (
        "slack_webhook",
        r"(https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_\-]{20,})",
    ),
    (
        "discord_webhook",
        r"(https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_\-]{20,})",
    ),
    ("telegram_bot_token", r"\b(\d{8,10}:AA[A-Za-z0-9_\-]{33})\b"),
    (
        "sendgrid_api_key",
        r"\b(SG\.[A-Za-z0-9_\-]{16,32}\.[A-Za-z0-9_\-]{16,64})",
    ),
    (
        "sendinblue_api_key",
        r"\b(xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16})\b",
    ),
    ("mailgun_api_key", r"\b(key-[a-f0-9]{32})\b"),
    ("mailchimp_api_key", r"\b([a-f0-9]{32}-us\d{1,2})\b"),
    ("twilio_key", r"\b((?:SK|AC)[0-9a-fA-F]{32})\b"),
    // Payment and commerce.
    ("stripe_key", r"\b([rsp]k_(?:live|test)_[A-Za-z0-9]{16,})\b"),
    ("square_token", r"\b(sq0(?:atp|csp)-[A-Za-z0-9_\-]{22,})"),
    ("shopify_token", r"\b(shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32})\b"),
    (
        "plaid_token",
        r"\b(access-(?:sandbox|development|production)-[0-9a-f\-]{36})\b",
    ),
    // AI and ML.
    (
        "anthropic_api_key",
        r"\b(sk-ant-[a-z]{3,5}\d{2}-[A-Za-z0-9_\-]{80,})",
    ),
    (
        "openai_api_key",
        r"\b(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{32,})",
    ),
    (
        "huggingface_token",
        r"\b((?:hf_|api_org_)[A-Za-z0-9]{30,40})\b",
    ),
    ("replicate_token", r"\b(r8_[A-Za-z0-9]{37})\b"),
    ("groq_api_key", r"\b(gsk_[A-Za-z0-9]{48,56})\b"),
    ("perplexity_api_key", r"\b(pplx-[A-Za-z0-9]{48})\b"),
    // Observability and productivity.
    ("grafana_token", r"\b((?:glc|glsa)_[A-Za-z0-9_+/=]{32,})"),
    ("newrelic_key", r"\b(NR(?:AK|II|JS)-[A-Za-z0-9]{19,32})\b"),
    ("sentry_token", r"\b(sntry[su]_[A-Za-z0-9_+/=]{40,})"),
    ("notion_token", r"\b((?:secret_|ntn_)[A-Za-z0-9]{43,46})\b"),
    ("airtable_token", r"\b(pat[A-Za-z0-9]{14}\.[a-f0-9]{64})\b"),
    ("dropbox_token", r"\b(sl\.[A-Za-z0-9_\-]{130,})"),
    ("facebook_token", r"\b(EAA[A-Za-z0-9]{100,})"),
    // Formats that carry credentials whatever the service.
    (
        "jwt",
        r"\b(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
    ),
    // `user:password@` in any scheme's URL.
    (
        "url_credentials",
        r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://([^\s/:@'`]+:[^\s/@'`]+)@",
    ),
    (
        "bearer_token",
        r"(?i)\b(?:bearer|basic|token)\s+([A-Za-z0-9\-._~+/]{16,}=*)",
    ),
];

// The patterns are constants: a bad one panics in every test, never first in a user's hands.
#[allow(clippy::expect_used)]
static PROVIDER_SET: LazyLock<(RegexSet, Vec<Regex>)> = LazyLock::new(|| {
    let set = RegexSet::new(PROVIDERS.iter().map(|(_, re)| re)).expect("valid patterns");
    let each = PROVIDERS
        .iter()
        .map(|(_, re)| Regex::new(re).expect("valid pattern"))
        .collect();
    (set, each)
});

/// A credential-looking name (its last word is checked in code) given a quoted value:
/// `DB_PASS = "…"`, `password: '…'`, `"client_secret": "…"`, `signingKey := "…"`.
#[allow(clippy::expect_used)]
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"([A-Za-z_$][\w$.\-]*)["']?\s*(?:=|:|:=|=>)\s*(?:["'`]([^"'`\n]{4,200})["'`])"#)
        .expect("valid pattern")
});

/// The default of an environment lookup: Python's `getenv("X", "d")` and
/// `environ.get("X", "d")`, JavaScript's `process.env.X || "d"` (or `??`), Rust's
/// `env::var("X").unwrap_or("d")`. Group 1 is the variable, group 2 the default.
#[allow(clippy::expect_used)]
static ENV_DEFAULT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?:getenv|environ\.get|env\.get)\(\s*["']([A-Za-z0-9_]+)["']\s*,\s*["']([^"'\n]{4,200})["']|process\.env(?:\.([A-Za-z0-9_]+)|\[["']([A-Za-z0-9_]+)["']\])\s*(?:\|\||\?\?)\s*["'`]([^"'`\n]{4,200})["'`]|env::var\(\s*"([A-Za-z0-9_]+)"\s*\)\s*\.unwrap_or\(\s*"([^"\n]{4,200})""#,
    )
    .expect("valid pattern")
});

/// "password is X", "token: X" in a comment or prose.
#[allow(clippy::expect_used)]
static IN_PROSE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(?:password|passwd|passphrase|pwd|secret|token|api[ _\-]?key)\s*(?:\s(?:is|was)\s|:)\s*([^\s'`]{6,})",
    )
    .expect("valid pattern")
});

/// String literals with no whitespace, candidates for the entropy and base64 tests.
#[allow(clippy::expect_used)]
static STRING_LITERAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#""([A-Za-z0-9+/=_\-]{20,})"|'([A-Za-z0-9+/=_\-]{20,})'|`([A-Za-z0-9+/=_\-]{20,})`"#,
    )
    .expect("literal pattern is valid")
});

/// One string literal without whitespace (a template literal without substitutions).
#[allow(clippy::expect_used)]
static LITERAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?:"[^"\s]*"|'[^'\s]*'|`[^`\s$]*`)"#).expect("valid pattern"));

/// Two or more literals without whitespace joined by `+` (across lines). Pieces of a secret
/// hold none; and a "literal" that does may be the code between two real ones, paired wrong.
#[allow(clippy::expect_used)]
static CONCATENATION: LazyLock<Regex> = LazyLock::new(|| {
    let piece = r#"(?:"[^"\s]*"|'[^'\s]*'|`[^`\s$]*`)"#;
    Regex::new(&format!(r"{piece}(?:\s*\+\s*{piece})+")).expect("valid pattern")
});

#[allow(clippy::expect_used)]
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

/// The provider formats in `text`, with their ranges.
fn providers(text: &str, out: &mut Vec<Finding>) {
    let (set, each) = &*PROVIDER_SET;
    for i in set.matches(text).iter() {
        for caps in each[i].captures_iter(text) {
            if let Some(m) = caps.get(1).or_else(|| caps.get(0)) {
                // `Bearer someLongIdentifier` in prose is no token: a token has digits.
                if PROVIDERS[i].0 == "bearer_token"
                    && !m.as_str().bytes().any(|b| b.is_ascii_digit())
                {
                    continue;
                }
                out.push(Finding {
                    kind: PROVIDERS[i].0,
                    range: m.range(),
                });
            }
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
    fn what_one_literal_does_not_show() {
        // Pieces joined, whatever the quotes and line breaks.
        assert_eq!(
            kinds("k = 'AKIA' + \"2IZYYLEQ\" +\n  `VIQR7QGG`;"),
            ["aws_access_key"]
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
        let text = "a = 'AKIAIOSFODNN7EXAMPLE'; b = 1";
        let red = redact(text, &scan(text));
        assert_eq!(red, "a = '<REDACTED>'; b = 1");
    }
}
