//! Finding the source files of a repository: the `ignore` crate's walk (.gitignore,
//! .ignore, symlink loops), then our own filters, each with a reason the report counts:
//! vendored and build-output folders, secret files, other languages, oversize, binary,
//! minified and generated files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cancel::CancelToken;
use crate::error::{Error, Result};

use super::secrets;

/// A language the importer parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lang {
    TypeScript,
    Tsx,
    JavaScript,
    Python,
    Rust,
    Go,
    Java,
}

impl Lang {
    pub const ALL: [Lang; 7] = [
        Lang::TypeScript,
        Lang::Tsx,
        Lang::JavaScript,
        Lang::Python,
        Lang::Rust,
        Lang::Go,
        Lang::Java,
    ];

    /// Short name, as `--lang` takes it and the dataset records it.
    pub fn name(self) -> &'static str {
        match self {
            Lang::TypeScript => "ts",
            Lang::Tsx => "tsx",
            Lang::JavaScript => "js",
            Lang::Python => "py",
            Lang::Rust => "rs",
            Lang::Go => "go",
            Lang::Java => "java",
        }
    }

    /// The name a prompt uses.
    pub fn display(self) -> &'static str {
        match self {
            Lang::TypeScript => "TypeScript",
            Lang::Tsx => "TypeScript (TSX)",
            Lang::JavaScript => "JavaScript",
            Lang::Python => "Python",
            Lang::Rust => "Rust",
            Lang::Go => "Go",
            Lang::Java => "Java",
        }
    }

    /// The languages a `--lang` item names (`ts` covers TSX too).
    pub fn parse_list(list: &str) -> Result<Vec<Lang>> {
        let mut out = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let langs: &[Lang] = match item.to_ascii_lowercase().as_str() {
                "ts" | "typescript" => &[Lang::TypeScript, Lang::Tsx],
                "tsx" => &[Lang::Tsx],
                "js" | "javascript" | "jsx" => &[Lang::JavaScript],
                "py" | "python" => &[Lang::Python],
                "rs" | "rust" => &[Lang::Rust],
                "go" => &[Lang::Go],
                "java" => &[Lang::Java],
                _ => {
                    return Err(Error::Setting(format!(
                        "unknown language `{item}` (ts, tsx, js, py, rs, go, java)"
                    )));
                }
            };
            out.extend_from_slice(langs);
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(Error::Setting("--lang names no language".into()));
        }
        Ok(out)
    }

    pub fn from_path(path: &Path) -> Option<Lang> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "ts" | "mts" | "cts" => Lang::TypeScript,
            "tsx" => Lang::Tsx,
            "js" | "mjs" | "cjs" | "jsx" => Lang::JavaScript,
            "py" => Lang::Python,
            "rs" => Lang::Rust,
            "go" => Lang::Go,
            "java" => Lang::Java,
            _ => return None,
        })
    }
}

/// Why a file was not parsed. The report counts these by `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    Vendored,
    BuildOutput,
    SecretFile,
    OtherLanguage,
    TooLarge,
    Binary,
    Minified,
    Generated,
    SymlinkLoop,
    /// A symlink to somewhere outside the repository, or to nothing.
    OutsideRepo,
    Unreadable,
}

impl Skip {
    pub fn name(self) -> &'static str {
        match self {
            Skip::Vendored => "vendored",
            Skip::BuildOutput => "build_output",
            Skip::SecretFile => "secret_file",
            Skip::OtherLanguage => "other_language",
            Skip::TooLarge => "too_large",
            Skip::Binary => "binary",
            Skip::Minified => "minified",
            Skip::Generated => "generated",
            Skip::SymlinkLoop => "symlink_loop",
            Skip::OutsideRepo => "outside_repo",
            Skip::Unreadable => "unreadable",
        }
    }
}

const VENDORED_DIRS: [&str; 6] = [
    "node_modules",
    "bower_components",
    "vendor",
    "vendors",
    "third_party",
    "third-party",
];
const BUILD_DIRS: [&str; 11] = [
    "dist",
    "build",
    "out",
    "target",
    "coverage",
    ".next",
    ".nuxt",
    "__pycache__",
    ".venv",
    "venv",
    ".git",
];

/// A source file that passed every filter, read into memory.
#[derive(Debug)]
pub struct SourceFile {
    /// Relative to the walked root, with `/` separators.
    pub rel: String,
    pub lang: Lang,
    pub bytes: Vec<u8>,
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Walked {
    pub files: Vec<SourceFile>,
    /// Every regular file met, parsed or not (files inside skipped folders are not met).
    pub seen: usize,
    /// (relative path, reason), in walk order.
    pub skipped: Vec<(String, Skip)>,
    /// Secret files dropped whole: (relative path, kind).
    pub secret_files: Vec<(String, &'static str)>,
}

#[derive(Debug, Clone)]
pub struct WalkOptions {
    pub langs: Vec<Lang>,
    pub max_file_bytes: u64,
}

fn rel_path(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Walk `root`. `progress(files_seen)` is called as files are met.
pub fn walk(
    root: &Path,
    opts: &WalkOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize),
) -> Result<Walked> {
    if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    // Folders the filter prunes, with their reason, shared with the walker's filter closure.
    let pruned: Arc<Mutex<Vec<(PathBuf, Skip, bool)>>> = Arc::default();
    let pruned_in = pruned.clone();
    let canonical_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let walker = ignore::WalkBuilder::new(root)
        // Hidden files are walked so `.env` files are seen and counted; `.git` is pruned below.
        .hidden(false)
        .follow_links(true)
        // .gitignore applies in a folder that is not (or not yet) a git repository too.
        .require_git(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(move |entry| {
            if entry.depth() == 0 {
                return true;
            }
            // Links are followed (loops are reported), but only within the repository.
            let outside = entry.path_is_symlink()
                && !std::fs::canonicalize(entry.path())
                    .is_ok_and(|p| p.starts_with(&canonical_root));
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            if !is_dir && !outside {
                return true;
            }
            let name = entry.file_name().to_string_lossy();
            let reason = if outside {
                Skip::OutsideRepo
            } else if VENDORED_DIRS.contains(&name.as_ref()) {
                Skip::Vendored
            } else if BUILD_DIRS.contains(&name.as_ref()) {
                Skip::BuildOutput
            } else {
                return true;
            };
            if name != ".git" {
                let mut p = pruned_in.lock().unwrap_or_else(|p| p.into_inner());
                p.push((entry.path().to_path_buf(), reason, is_dir));
            }
            false
        })
        .build();

    let mut out = Walked::default();
    for entry in walker {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let loop_path = loop_of(&e);
                let (rel, reason) = match loop_path {
                    Some(p) => (rel_path(root, &p), Skip::SymlinkLoop),
                    None => (e.to_string(), Skip::Unreadable),
                };
                out.skipped.push((rel, reason));
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        out.seen += 1;
        progress(out.seen);
        let path = entry.path();
        let rel = rel_path(root, path);
        let name = entry.file_name().to_string_lossy();
        if let Some(kind) = secrets::secret_file_kind(&name) {
            out.skipped.push((rel.clone(), Skip::SecretFile));
            out.secret_files.push((rel, kind));
            continue;
        }
        let Some(lang) = Lang::from_path(path).filter(|l| opts.langs.contains(l)) else {
            out.skipped.push((rel, Skip::OtherLanguage));
            continue;
        };
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if size > opts.max_file_bytes {
            out.skipped.push((rel, Skip::TooLarge));
            continue;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(_) => {
                out.skipped.push((rel, Skip::Unreadable));
                continue;
            }
        };
        if let Some(reason) = content_skip(&name, &bytes) {
            out.skipped.push((rel, reason));
            continue;
        }
        out.files.push(SourceFile { rel, lang, bytes });
    }
    // Pruned folders count once each, as the folder (their files are never met).
    let pruned = std::mem::take(&mut *pruned.lock().unwrap_or_else(|p| p.into_inner()));
    for (p, reason, is_dir) in pruned {
        let slash = if is_dir { "/" } else { "" };
        out.skipped
            .push((format!("{}{slash}", rel_path(root, &p)), reason));
    }
    out.skipped.sort();
    Ok(out)
}

/// The path of a symlink loop, if that is what the walk error is.
fn loop_of(e: &ignore::Error) -> Option<PathBuf> {
    match e {
        ignore::Error::Loop { child, .. } => Some(child.clone()),
        ignore::Error::WithPath { err, .. }
        | ignore::Error::WithDepth { err, .. }
        | ignore::Error::WithLineNumber { err, .. } => loop_of(err),
        ignore::Error::Partial(errs) => errs.iter().find_map(loop_of),
        _ => None,
    }
}

/// Skips decided by a file's name and bytes.
pub fn content_skip(name: &str, bytes: &[u8]) -> Option<Skip> {
    let head = &bytes[..bytes.len().min(8192)];
    if head.contains(&0) {
        return Some(Skip::Binary);
    }
    let lower = name.to_ascii_lowercase();
    if lower.contains(".min.") || lower.ends_with("-min.js") || lower.ends_with(".bundle.js") {
        return Some(Skip::Minified);
    }
    // Minified: long lines on average and at least one very long line.
    let (lines, longest) = bytes
        .split(|&b| b == b'\n')
        .fold((0usize, 0usize), |(n, m), l| (n + 1, m.max(l.len())));
    let lines = lines.max(1);
    if longest > 1000 && bytes.len() / lines > 200 {
        return Some(Skip::Minified);
    }
    // Generated: a marker in the first lines (Go's "Code generated ... DO NOT EDIT.",
    // protoc, `@generated` as Meta's tools write it).
    let first: Vec<u8> = head
        .split(|&b| b == b'\n')
        .take(5)
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect();
    let first = String::from_utf8_lossy(&first).to_ascii_lowercase();
    if first.contains("@generated")
        || first.contains("do not edit")
        || first.contains("auto-generated")
        || first.contains("autogenerated")
        || first.contains("code generated by")
    {
        return Some(Skip::Generated);
    }
    None
}
