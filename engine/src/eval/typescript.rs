//! TypeScript to JavaScript with the `typescript` npm package (`ts.transpileModule`: no type
//! check), many programs per node process. A program with syntax errors is refused rather than
//! run: transpileModule recovers from them into a program other than the one written (a block
//! left open swallows the code after it), which would then be judged in its place. The package
//! lives in the cache, installed with npm on first use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The version the project installs (and its tests were measured with).
pub const VERSION: &str = "5.6.3";

const SCRIPT: &str = r#"
const ts = require(process.argv[1]);
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => { input += d; });
process.stdin.on('end', () => {
  const out = JSON.parse(input).map((src) => {
    const r = ts.transpileModule(src, {
      reportDiagnostics: true,
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2020 },
    });
    const errors = (r.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
    if (errors.length > 0) {
      return { error: errors.map((d) => ts.flattenDiagnosticMessageText(d.messageText, ' ')).join('; ') };
    }
    return { js: r.outputText };
  });
  process.stdout.write(JSON.stringify(out));
});
"#;

#[derive(serde::Deserialize)]
struct Out {
    js: Option<String>,
    error: Option<String>,
}

/// The `typescript` package and the node that runs it.
#[derive(Debug, Clone)]
pub struct TypeScript {
    pub node: PathBuf,
    /// The package folder (`…/node_modules/typescript`).
    pub package: PathBuf,
}

/// Where the project installs its node packages.
pub fn prefix() -> PathBuf {
    crate::fetch::cache_dir().join("node")
}

impl TypeScript {
    /// `CODELSI_TYPESCRIPT` (the package folder), else the cache's; installs it there with npm
    /// when missing (`status` is told).
    pub fn ensure(node: &Path, status: &mut dyn FnMut(&str)) -> Result<Self> {
        let package = match std::env::var_os("CODELSI_TYPESCRIPT") {
            Some(p) => PathBuf::from(p),
            None => prefix().join("node_modules").join("typescript"),
        };
        if !package.join("package.json").is_file() {
            if std::env::var_os("CODELSI_TYPESCRIPT").is_some() {
                return Err(Error::Tool {
                    tool: "typescript".into(),
                    what: format!(
                        "CODELSI_TYPESCRIPT={}: no typescript package there",
                        package.display()
                    ),
                });
            }
            status(&format!(
                "installing typescript@{VERSION} with npm into {}",
                prefix().display()
            ));
            let prefix = prefix();
            std::fs::create_dir_all(&prefix).map_err(|e| Error::io(&prefix, e))?;
            let out = Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&prefix)
                .arg(format!("typescript@{VERSION}"))
                .output()
                .map_err(|e| Error::Tool {
                    tool: "npm".into(),
                    what: format!("needed to install typescript (or set CODELSI_TYPESCRIPT): {e}"),
                })?;
            if !out.status.success() || !package.join("package.json").is_file() {
                return Err(Error::Tool {
                    tool: "npm".into(),
                    what: format!(
                        "install typescript@{VERSION} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(Self {
            node: node.to_path_buf(),
            package,
        })
    }

    /// Transpile each source; `Err(diagnostics)` for one with syntax errors.
    pub fn transpile(
        &self,
        sources: &[String],
    ) -> Result<Vec<std::result::Result<String, String>>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let input = serde_json::to_vec(sources)
            .map_err(|e| Error::Internal(format!("encoding programs as JSON: {e}")))?;
        // The transpiler is ours and trusted: it runs outside the sandbox.
        let mut child = Command::new(&self.node)
            .arg("-e")
            .arg(SCRIPT)
            .arg(&self.package)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(&self.node, e))?;
        let mut stdin = child.stdin.take();
        let writer = std::thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(&input);
            }
        });
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(&self.node, e))?;
        let _ = writer.join();
        if !out.status.success() {
            return Err(Error::Tool {
                tool: format!("the TypeScript transpiler ({})", self.package.display()),
                what: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let parsed: Vec<Out> = serde_json::from_slice(&out.stdout).map_err(|e| Error::Tool {
            tool: "the TypeScript transpiler".into(),
            what: format!("its output is not JSON: {e}"),
        })?;
        if parsed.len() != sources.len() {
            return Err(Error::Tool {
                tool: "the TypeScript transpiler".into(),
                what: format!(
                    "it returned {} programs for {}",
                    parsed.len(),
                    sources.len()
                ),
            });
        }
        Ok(parsed
            .into_iter()
            .map(|o| match (o.js, o.error) {
                (Some(js), _) => Ok(js),
                (None, e) => Err(e.unwrap_or_else(|| "no output".into())),
            })
            .collect())
    }
}
