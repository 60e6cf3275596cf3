//! Syntax highlighting for the code the app shows: a small lexer for the C family of
//! languages the product targets first (TypeScript, JavaScript, Rust, Go, Java) that colours
//! comments, strings, numbers, keywords and type names.
//!
//! Departs from STYLE's "a well-kept crate beats hand-written code": egui_extras highlights
//! TypeScript only through syntect, whose default syntax set has no TypeScript and which adds
//! a regex engine and several MB of grammars to the binary for what a 100-line lexer does.

use eframe::egui::text::{LayoutJob, TextFormat};
use eframe::egui::{Color32, FontId, Visuals};

/// What a piece of code is, for its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Comment,
    Str,
    Number,
    Keyword,
    Type,
}

const KEYWORDS: &[&str] = &[
    "as",
    "async",
    "await",
    "break",
    "case",
    "catch",
    "class",
    "const",
    "continue",
    "default",
    "do",
    "else",
    "enum",
    "export",
    "extends",
    "false",
    "fn",
    "for",
    "from",
    "func",
    "function",
    "if",
    "impl",
    "implements",
    "import",
    "in",
    "interface",
    "let",
    "match",
    "mut",
    "new",
    "null",
    "of",
    "package",
    "private",
    "pub",
    "public",
    "readonly",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "switch",
    "this",
    "throw",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "undefined",
    "use",
    "var",
    "void",
    "where",
    "while",
    "yield",
];

const TYPES: &[&str] = &[
    "any", "bool", "boolean", "never", "number", "string", "unknown", "i32", "i64", "u8", "u32",
    "u64", "usize", "f32", "f64", "int", "str", "String", "Vec", "Array", "Promise", "Record",
    "Map", "Set",
];

/// Split `code` into consecutive spans, each with its kind. The spans cover the text exactly.
pub fn spans(code: &str) -> Vec<(Kind, &str)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut plain = 0;
    while i < bytes.len() {
        let start = i;
        let kind = match bytes[i] {
            // A Markdown fence in generated text, not a template string.
            b'`' if code[i..].starts_with("```") => {
                i += 3;
                Kind::Plain
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = code[i..].find('\n').map_or(bytes.len(), |n| i + n);
                Kind::Comment
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = code[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |n| i + 2 + n + 2);
                Kind::Comment
            }
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q && !(q != b'`' && bytes[i] == b'\n') {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                Kind::Str
            }
            b'0'..=b'9' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                Kind::Number
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
                {
                    i += 1;
                }
                let word = &code[start..i];
                if KEYWORDS.contains(&word) {
                    Kind::Keyword
                } else if TYPES.contains(&word)
                    || word.starts_with(|c: char| c.is_ascii_uppercase())
                {
                    Kind::Type
                } else {
                    Kind::Plain
                }
            }
            _ => {
                // Any other character, multi-byte ones whole.
                i += code[i..].chars().next().map_or(1, char::len_utf8);
                Kind::Plain
            }
        };
        if kind != Kind::Plain {
            if plain < start {
                out.push((Kind::Plain, &code[plain..start]));
            }
            out.push((kind, &code[start..i]));
            plain = i;
        }
    }
    if plain < bytes.len() {
        out.push((Kind::Plain, &code[plain..]));
    }
    out
}

fn color(kind: Kind, dark: bool) -> Option<Color32> {
    let (d, l) = match kind {
        Kind::Plain => return None,
        Kind::Comment => ((110, 150, 110), (70, 120, 70)),
        Kind::Str => ((214, 157, 133), (163, 21, 21)),
        Kind::Number => ((181, 206, 168), (9, 134, 88)),
        Kind::Keyword => ((86, 156, 214), (0, 0, 220)),
        Kind::Type => ((78, 201, 176), (38, 127, 153)),
    };
    let (r, g, b) = if dark { d } else { l };
    Some(Color32::from_rgb(r, g, b))
}

/// `code` as a layout in `font`, coloured for the current light or dark theme.
pub fn layout(code: &str, visuals: &Visuals, font: FontId) -> LayoutJob {
    let mut job = LayoutJob::default();
    append(&mut job, code, visuals, font);
    job
}

/// Append `code`, highlighted, to `job`.
pub fn append(job: &mut LayoutJob, code: &str, visuals: &Visuals, font: FontId) {
    for (kind, text) in spans(code) {
        let color = color(kind, visuals.dark_mode).unwrap_or(visuals.text_color());
        job.append(text, 0.0, TextFormat::simple(font.clone(), color));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_text_and_find_each_kind() {
        let code = "/** Doc. */\nexport function f(s: string): number {\n  // add\n  return s.length + 42 * `x${1}`.length; // é\n}\n";
        let sp = spans(code);
        assert_eq!(sp.iter().map(|(_, t)| *t).collect::<String>(), code);
        let of = |k: Kind| -> Vec<&str> {
            sp.iter()
                .filter(|(x, _)| *x == k)
                .map(|(_, t)| *t)
                .collect()
        };
        assert_eq!(of(Kind::Comment), ["/** Doc. */", "// add", "// é"]);
        assert_eq!(of(Kind::Keyword), ["export", "function", "return"]);
        assert_eq!(of(Kind::Type), ["string", "number"]);
        assert_eq!(of(Kind::Number), ["42"]);
        assert_eq!(of(Kind::Str), ["`x${1}`"]);
        // A Markdown fence after the code leaves the prose after it plain.
        let fenced = "}\n```\n\nThis uses `split`.";
        let strs: Vec<&str> = spans(fenced)
            .into_iter()
            .filter(|(k, _)| *k == Kind::Str)
            .map(|(_, t)| t)
            .collect();
        assert_eq!(strs, ["`split`"]);
        // An unterminated string or comment runs to the end, without panicking.
        for bad in ["\"abc", "/* open", "'a\\", "x = 'a\nb'"] {
            assert_eq!(spans(bad).iter().map(|(_, t)| *t).collect::<String>(), bad);
        }
    }
}
