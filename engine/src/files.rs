//! Writing outputs so that a reader never sees half of one: through a temporary file beside
//! it and a rename.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A temporary name beside `path` (`.NAME.tmp-PID`, `fallback` when `path` has no file name)
/// for writing an output before renaming it into place; creates the parent directory.
pub fn temp_beside(path: &Path, fallback: &str) -> Result<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = path.file_name().map_or_else(
        || fallback.to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(parent.join(format!(".{name}.tmp-{}", std::process::id())))
}

/// Move `tmp` to `dir`, replacing an older `dir` (kept aside until the new one is in place).
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let old: PathBuf = {
        let mut s = dir.as_os_str().to_owned();
        s.push(format!(".old-{}", std::process::id()));
        s.into()
    };
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        if had_old {
            // Best effort: put the old one back; the error that matters is the one returned.
            let _ = std::fs::rename(&old, dir);
        }
        return Err(Error::io(dir, e));
    }
    if had_old {
        // The new one is in place; an old copy left behind is only disk space.
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}
