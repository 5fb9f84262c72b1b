//! Python virtual environments for the tools Tandem is measured against or
//! tested with (LiteLLM, Presidio, the `openai` SDK...): made once under a
//! folder, with the packages installed from the package index, and reused.
//! Concurrent callers wait for each other through a lock file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::CatalogError;

/// The Python of a virtual environment in `dir` that has `packages`
/// installed (pip requirement strings), making or completing it first.
pub fn venv(dir: &Path, packages: &[&str]) -> Result<PathBuf, CatalogError> {
    let fail = |what: String| CatalogError::Fetch(what);
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    let lock = std::fs::File::create(dir.join(".lock"))
        .map_err(|e| fail(format!("locking {}: {e}", dir.display())))?;
    lock.lock()
        .map_err(|e| fail(format!("locking {}: {e}", dir.display())))?;
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    let mut names: Vec<&str> = packages.to_vec();
    names.sort_unstable();
    let stamp = venv.join(format!(
        "installed-{}",
        names.join("+").replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '.',
            "_"
        )
    ));
    if stamp.is_file() {
        return Ok(python);
    }
    let run = |cmd: &mut Command| -> Result<(), CatalogError> {
        let out = cmd
            .output()
            .map_err(|e| fail(format!("cannot run {cmd:?}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fail(format!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    if !python.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if !packages.is_empty() {
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages))?;
    }
    std::fs::write(&stamp, b"").map_err(|e| fail(format!("writing {}: {e}", stamp.display())))?;
    Ok(python)
}
