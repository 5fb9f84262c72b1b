//! Appending to the line files the router keeps on disk (the semantic
//! cache, the memory of outcomes, the sample of prompts): one line, with
//! its newline, in one write, so a crash tears at most the last line, which
//! each reader drops.

use std::io::Write;
use std::path::Path;

/// Appends `line` and a newline to `path`, creating it and its folder.
pub(crate) fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line);
    bytes.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&bytes)
}

/// Appends `value` as one JSON line.
pub(crate) fn append<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    append_line(path, &serde_json::to_vec(value)?)
}
