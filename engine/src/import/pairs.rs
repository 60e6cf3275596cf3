//! From extracted items to instruction pairs. Each pair's prompt carries repository
//! context: the file's path, the imports the item uses and the definitions of the project's
//! own types it names, trimmed to a token budget, so the model learns the project's APIs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::extract::{Item, ItemKind, Parsed};
use super::walk::Lang;
use crate::io::tokenizer::Message;

/// The kinds of pair the importer builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    /// Doc comment → the whole declaration.
    DocToImpl,
    /// Doc comment and signature → the body.
    SignatureToBody,
    /// Name, signature and file context → the body, for undocumented functions.
    ContextToBody,
    /// Class/impl/interface summary → one member's implementation.
    MemberImpl,
    /// A record imported from an existing instruction or problem file.
    Imported,
}

impl PairKind {
    pub fn name(self) -> &'static str {
        match self {
            PairKind::DocToImpl => "doc_to_impl",
            PairKind::SignatureToBody => "signature_to_body",
            PairKind::ContextToBody => "context_to_body",
            PairKind::MemberImpl => "member_impl",
            PairKind::Imported => "imported",
        }
    }
}

/// Where a pair came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    pub line: usize,
    pub end_line: usize,
    pub name: String,
}

/// One dataset record: Alpaca fields (what `codelsi train` reads) plus provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    // Empty (and absent from a chat line) when `messages` holds the record.
    #[serde(default)]
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    #[serde(default)]
    pub output: String,
    pub kind: PairKind,
    pub lang: String,
    pub source: Source,
    /// Tokens of prompt (instruction and input) and output in the chosen model's tokenizer.
    pub tokens: usize,
    /// Tokens of the output alone (not written).
    #[serde(skip)]
    pub output_tokens: usize,
    /// A multi-turn chat imported as it is (instruction, input and output then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
}

/// A parsed file, as pair building needs it.
pub struct FileItems<'a> {
    pub rel: &'a str,
    pub lang: Lang,
    pub text: &'a str,
    pub parsed: &'a Parsed,
}

/// The project's own types, by name: the text a prompt shows for each and its token count.
#[derive(Debug, Default)]
pub struct ProjectTypes {
    types: HashMap<String, (String, usize)>,
}

/// Longest type definition shown whole in a prompt; longer ones show their summary.
const MAX_TYPE_CHARS: usize = 1200;

impl ProjectTypes {
    /// Collect every type declared in `files`. A name declared twice keeps its first.
    pub fn collect(files: &[FileItems], count: &dyn Fn(&str) -> usize) -> Self {
        let mut types = HashMap::new();
        for f in files {
            for item in f.parsed.items.iter().filter(|i| !i.kind.is_callable()) {
                if types.contains_key(&item.name) {
                    continue;
                }
                let text = if item.kind == ItemKind::Class
                    && let Some(ci) = f.parsed.containers.iter().position(|c| c.name == item.name)
                {
                    summary(ci, f)
                } else {
                    let full = &f.text[item.span.clone()];
                    if full.len() <= MAX_TYPE_CHARS {
                        full.to_string()
                    } else {
                        let cut = floor_char(full, MAX_TYPE_CHARS);
                        let cut = full[..cut].rfind('\n').unwrap_or(cut);
                        format!("{}\n  …", &full[..cut])
                    }
                };
                let tokens = count(&text);
                types.insert(item.name.clone(), (text, tokens));
            }
        }
        Self { types }
    }
}

fn floor_char(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn comment_prefix(lang: Lang) -> &'static str {
    match lang {
        Lang::Python => "#",
        _ => "//",
    }
}

/// Remove the first line's indentation from the others (a method's body as the file
/// indents it, shown at column 0).
fn dedent(text: &str, col: usize) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
            let ws = line
                .bytes()
                .take(col)
                .take_while(|b| *b == b' ' || *b == b'\t')
                .count();
            out.push_str(&line[ws..]);
        } else {
            out.push_str(line);
        }
    }
    out
}

fn column(text: &str, at: usize) -> usize {
    at - text[..at].rfind('\n').map_or(0, |i| i + 1)
}

/// The summary of container `ci`: its doc, header, fields and members' signatures (the
/// member a pair asks for included, as a signature like the rest).
fn summary(ci: usize, f: &FileItems) -> String {
    let c = &f.parsed.containers[ci];
    let indent = "    ";
    let mut s = String::new();
    if let Some(doc) = &c.doc {
        for l in doc.lines() {
            s.push_str(comment_prefix(f.lang));
            s.push(' ');
            s.push_str(l);
            s.push('\n');
        }
    }
    s.push_str(&c.header);
    // Python and Go list members after the header; the rest inside braces.
    let braces = !matches!(f.lang, Lang::Python | Lang::Go);
    let js = matches!(f.lang, Lang::TypeScript | Lang::Tsx | Lang::JavaScript);
    s.push_str(if braces { " {\n" } else { "\n" });
    for field in &c.fields {
        s.push_str(indent);
        s.push_str(field);
        if js && !field.ends_with(';') && !field.ends_with(',') {
            s.push(';');
        }
        s.push('\n');
    }
    for m in f.parsed.items.iter().filter(|m| m.container == Some(ci)) {
        if let Some(sig) = signature(m, f.text) {
            if f.lang != Lang::Go {
                s.push_str(indent);
            }
            s.push_str(&sig);
            s.push_str(match f.lang {
                Lang::Python => " ...",
                Lang::Go => "",
                _ => ";",
            });
            s.push('\n');
        }
    }
    if braces {
        s.push('}');
    }
    s.trim_end().to_string()
}

/// A callable's signature on one line: the text before its body, whitespace collapsed.
fn signature(item: &Item, text: &str) -> Option<String> {
    item.body.as_ref()?;
    let sig = text[item.span.start..item.sig_end].trim_end();
    let sig = sig.strip_suffix("=>").map_or(sig, |s| s.trim_end());
    Some(sig.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Build every pair of one file. `budget` caps the repository context in tokens.
pub fn build(
    f: &FileItems,
    types: &ProjectTypes,
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> Vec<Pair> {
    let mut out = Vec::new();
    let lang_name = f.lang.display();
    let counted = Counted::new(f, count);
    for (idx, item) in f.parsed.items.iter().enumerate() {
        let full = dedent(&f.text[item.span.clone()], column(f.text, item.span.start));
        let source = Source {
            path: f.rel.to_string(),
            line: item.line,
            end_line: item.end_line,
            name: item.name.clone(),
        };
        let pair = |kind, instruction: String, input: String, output: String| Pair {
            instruction,
            input,
            output,
            kind,
            lang: f.lang.name().to_string(),
            source: source.clone(),
            tokens: 0,
            output_tokens: 0,
            messages: None,
        };
        let container = item.container.map(|c| &f.parsed.containers[c]);
        let owner = match container {
            Some(c) if !c.name.is_empty() => format!(" of `{}`", c.name),
            _ => String::new(),
        };
        let (context, context_tokens) = repo_context(f, &counted, item, types, budget, "");
        let word = item.kind.word();
        if let Some(doc) = item.doc.as_ref().filter(|d| d.len() >= 12) {
            out.push(pair(
                PairKind::DocToImpl,
                format!(
                    "Write the {lang_name} {word} `{}`{owner} that this comment describes:\n\n{doc}",
                    item.name
                ),
                context.clone(),
                full.clone(),
            ));
            if let (Some(body), Some(sig), Some(raw)) =
                (&item.body, signature_text(item, f.text), &item.doc_raw)
            {
                let output = body_text(f.text, body, item);
                let col = column(f.text, item.span.start);
                let mut input = context.clone();
                if !input.is_empty() {
                    input.push_str("\n\n");
                }
                if f.lang == Lang::Python {
                    // The docstring opens the body in Python, at the body's indentation.
                    let ind = output.len() - output.trim_start_matches(' ').len();
                    input.push_str(&sig);
                    input.push('\n');
                    input.push_str(&reindent(&dedent(raw, col), ind.max(4)));
                } else {
                    input.push_str(&dedent(raw, col));
                    input.push('\n');
                    input.push_str(&sig);
                }
                out.push(pair(
                    PairKind::SignatureToBody,
                    format!("Complete the body of this {lang_name} {word}."),
                    input,
                    output,
                ));
            }
        } else if item.kind.is_callable()
            && item.container.is_none()
            && let (Some(body), Some(sig)) = (&item.body, signature_text(item, f.text))
        {
            let mut input = file_context(f, &counted, idx, (context, context_tokens), budget);
            if !input.is_empty() {
                input.push_str("\n\n");
            }
            input.push_str(&sig);
            out.push(pair(
                PairKind::ContextToBody,
                format!(
                    "Write the body of the {lang_name} {word} `{}` in `{}`.",
                    item.name, f.rel
                ),
                input,
                body_text(f.text, body, item),
            ));
        }
        if item.kind.is_callable()
            && let Some(c) = container
        {
            let mut input = summary(item.container.unwrap_or_default(), f);
            let (context, _) = repo_context(f, &counted, item, types, budget, &c.name);
            if !context.is_empty() {
                input = format!("{context}\n\n{input}");
            }
            out.push(pair(
                PairKind::MemberImpl,
                format!(
                    "Implement the {word} `{}`{owner} in {lang_name}.",
                    item.name
                ),
                input,
                full.clone(),
            ));
        }
    }
    out
}

/// The signature as written (multi-line kept), at column 0.
fn signature_text(item: &Item, text: &str) -> Option<String> {
    item.body.as_ref()?;
    let sig = text[item.span.start..item.sig_end].trim_end();
    Some(dedent(sig, column(text, item.span.start)))
}

fn body_text(text: &str, body: &std::ops::Range<usize>, item: &Item) -> String {
    let col = column(text, item.span.start);
    let raw = &text[body.clone()];
    let out = if column(text, body.start) == 0 {
        // A Python body starts at its line's start: its first line is indented too.
        dedent(&format!("\n{raw}"), col)[1..].to_string()
    } else {
        dedent(raw, col)
    };
    out.trim_end().to_string()
}

fn reindent(raw: &str, col: usize) -> String {
    let pad = " ".repeat(col);
    raw.lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                format!("{pad}{}", l.trim_start())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Token counts of a file's pieces that many prompts reuse, counted once per file.
struct Counted {
    /// `// File: path`.
    header: (String, usize),
    imports: Vec<usize>,
    /// One-line signature of each item (callables) and its tokens.
    sigs: Vec<Option<(String, usize)>>,
}

impl Counted {
    fn new(f: &FileItems, count: &dyn Fn(&str) -> usize) -> Self {
        let header = format!("{} File: {}", comment_prefix(f.lang), f.rel);
        let n = count(&header);
        Self {
            header: (header, n),
            imports: f.parsed.imports.iter().map(|i| count(i)).collect(),
            sigs: f
                .parsed
                .items
                .iter()
                .map(|it| {
                    signature(it, f.text).map(|s| {
                        let n = count(&s);
                        (s, n)
                    })
                })
                .collect(),
        }
    }
}

/// `// File: path`, the imports the item uses, and the project types it names (but `skip`
/// and itself), while they fit in `budget` tokens; and the tokens used.
fn repo_context(
    f: &FileItems,
    counted: &Counted,
    item: &Item,
    types: &ProjectTypes,
    budget: usize,
    skip: &str,
) -> (String, usize) {
    let c = comment_prefix(f.lang);
    let (mut out, mut used) = counted.header.clone();
    let uses = |text: &str| {
        item.idents
            .iter()
            .any(|id| id.len() > 1 && contains_word(text, id))
    };
    for (imp, &t) in f.parsed.imports.iter().zip(&counted.imports) {
        if !uses(imp) {
            continue;
        }
        if used + t > budget {
            break;
        }
        out.push('\n');
        out.push_str(imp);
        used += t;
    }
    let mut header = false;
    for id in &item.idents {
        if id == &item.name || id == skip {
            continue;
        }
        let Some((text, t)) = types.types.get(id) else {
            continue;
        };
        if used + t > budget {
            continue;
        }
        if !header {
            out.push_str(&format!("\n\n{c} Project types used:"));
            header = true;
        }
        out.push('\n');
        out.push_str(text);
        used += t;
    }
    (out, used)
}

/// The repository context plus the signatures of the file's other top-level callables,
/// nearest first, while they fit.
fn file_context(
    f: &FileItems,
    counted: &Counted,
    idx: usize,
    (mut context, mut used): (String, usize),
    budget: usize,
) -> String {
    let mut others: Vec<usize> = (0..f.parsed.items.len())
        .filter(|&i| {
            let it = &f.parsed.items[i];
            i != idx && it.kind.is_callable() && it.container.is_none()
        })
        .collect();
    others.sort_by_key(|i| i.abs_diff(idx));
    let mut sigs = Vec::new();
    for i in others.into_iter().take(8) {
        let Some((sig, t)) = &counted.sigs[i] else {
            continue;
        };
        if used + t > budget {
            break;
        }
        used += t;
        sigs.push(sig.as_str());
    }
    if !sigs.is_empty() {
        let c = comment_prefix(f.lang);
        context.push_str(&format!("\n\n{c} Also in this file:"));
        for s in sigs {
            context.push('\n');
            context.push_str(s);
        }
    }
    context
}

fn contains_word(text: &str, word: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}
