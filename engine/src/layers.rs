//! The engine's layering, checked: each top-level module may name (`crate::…`) only the modules
//! listed for it here. Lower layers know nothing of those above them: loaders know no model,
//! kernels nothing above the kernels, training no task (a task hands the trainer an
//! `Objective`), and the tasks (import, evaluation, regression, merging) build on the rest. A
//! new `use` that crosses a layer fails this test, naming the file and the module it reached.

/// Each module and the modules it may use. The order is the layering, lowest first.
const ALLOWED: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("cancel", &[]),
    ("files", &["error"]),
    ("quant", &["error"]),
    ("par", &["error", "cancel"]),
    ("sampling", &["error"]),
    ("device", &["error"]),
    ("dataset", &["error", "files"]),
    ("fetch", &["error", "files"]),
    ("io", &["error", "quant"]),
    ("kernels", &["error", "cancel", "quant", "device"]),
    // A model and its adapters are one layer: a layer's forward applies adapters, and an
    // adapter is shaped by the model's config.
    (
        "models",
        &["error", "quant", "io", "kernels", "device", "adapter"],
    ),
    (
        "adapter",
        &["error", "files", "quant", "io", "kernels", "models"],
    ),
    (
        "model",
        &[
            "error", "quant", "io", "kernels", "device", "fetch", "models",
        ],
    ),
    (
        "generate",
        &[
            "error", "cancel", "sampling", "io", "kernels", "device", "models", "adapter",
        ],
    ),
    (
        "train",
        &[
            "error", "cancel", "files", "dataset", "quant", "io", "kernels", "device", "models",
            "adapter",
        ],
    ),
    // The tasks.
    (
        "merge",
        &[
            "error", "cancel", "files", "quant", "io", "kernels", "models", "adapter",
        ],
    ),
    (
        "import",
        &["error", "cancel", "files", "par", "dataset", "io"],
    ),
    (
        "eval",
        &[
            "error", "cancel", "par", "fetch", "sampling", "io", "kernels", "models", "adapter",
            "generate", "train",
        ],
    ),
    (
        "regress",
        &[
            "error", "cancel", "files", "par", "sampling", "io", "kernels", "models", "adapter",
            "generate", "train", "eval",
        ],
    ),
];

/// The top-level modules `text` names as `crate::NAME`, outside comments.
fn named_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            match name.as_str() {
                "" => {}
                // The crate root re-exports the error module's two names.
                "Error" | "Result" => out.push("error".into()),
                _ => out.push(name),
            }
        }
    }
    out
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut crossings = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "layers" {
            continue;
        }
        seen.insert(top.clone());
        let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| *m == top) else {
            crossings.push(format!(
                "{}: module `{top}` has no place in the layering (add it to ALLOWED)",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for used in named_modules(&text) {
            if used != top && !allowed.contains(&used.as_str()) {
                crossings.push(format!("{}: uses `crate::{used}`", rel.display()));
            }
        }
    }
    crossings.sort();
    crossings.dedup();
    assert!(
        crossings.is_empty(),
        "layer crossings:\n{}",
        crossings.join("\n")
    );
    assert!(
        seen.len() >= 15,
        "found only {seen:?}: is the source walk broken?"
    );
}

#[test]
fn comments_do_not_count_and_code_does() {
    let text = "use crate::io::gguf;\n/// see [`crate::models::Linear`]\nlet x = crate::quant::f(); // crate::train\nfn f() -> crate::Result<()>\n";
    assert_eq!(named_modules(text), vec!["io", "quant", "error"]);
}
