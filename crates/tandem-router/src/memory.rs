//! The cascade's outcomes, remembered for the router
//! ([`tandem_policy::memory`] decides what they mean): kept in memory, appended to a
//! file as they happen, and reloaded on start. Nothing personal is written:
//! a prompt's vector and whether it was escalated, under a digest of its
//! partition, and only for prompts in which the detector found no personal
//! data.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use tandem_policy::memory::{Estimate, MemoryConfig, Outcome, Outcomes};

/// Outcomes shared by every request of one gateway.
pub struct OutcomeMemory {
    config: MemoryConfig,
    outcomes: Mutex<Outcomes>,
    path: Option<PathBuf>,
}

impl OutcomeMemory {
    /// Opens the memory, reading the outcomes `path` holds (the newest
    /// `max_entries`; lines that do not parse, such as one cut short by a
    /// crash, are skipped).
    pub fn open(config: MemoryConfig, path: Option<PathBuf>) -> std::io::Result<OutcomeMemory> {
        let mut outcomes = Outcomes::new(config.max_entries);
        if let Some(p) = &path {
            match std::fs::File::open(p) {
                Ok(f) => {
                    for line in std::io::BufReader::new(f).lines() {
                        if let Ok(o) = serde_json::from_str::<Outcome>(&line?) {
                            outcomes.push(o);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let memory = OutcomeMemory {
            config,
            outcomes: Mutex::new(outcomes),
            path,
        };
        memory.compact()?;
        Ok(memory)
    }

    /// Its settings.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Outcomes kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// None kept.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the neighbours of a prompt with the router's vector `v` say.
    pub fn estimate(&self, partition: &str, v: &[f32]) -> Option<Estimate> {
        self.lock().estimate(&digest(partition), v, &self.config)
    }

    /// Remembers a cascaded prompt's outcome.
    pub fn record(&self, partition: &str, v: &[f32], escalated: bool) {
        let o = Outcome::new(&digest(partition), v, escalated);
        if let Some(p) = &self.path
            && let Err(e) = crate::jsonl::append(p, &o)
        {
            tracing::warn!("router memory {}: {e}", p.display());
        }
        self.lock().push(o);
    }

    /// Rewrites the file with only what is kept, when it has grown past
    /// twice that.
    fn compact(&self) -> std::io::Result<()> {
        let Some(p) = &self.path else {
            return Ok(());
        };
        let lines = match std::fs::File::open(p) {
            Ok(f) => std::io::BufReader::new(f).lines().count(),
            Err(_) => return Ok(()),
        };
        if lines <= 2 * self.config.max_entries {
            return Ok(());
        }
        let tmp = p.with_extension("partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for o in self.lock().iter() {
            serde_json::to_writer(&mut f, o)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, p)
    }
}

/// The partition as stored: a digest, so key names are not written out.
fn digest(partition: &str) -> String {
    tandem_ledger::sha256_hex(partition.as_bytes())[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outcomes.jsonl");
        let v = [0.6f32, 0.8];
        let m = OutcomeMemory::open(MemoryConfig::default(), Some(path.clone())).unwrap();
        m.record("key:a|strict", &v, true);
        m.record("key:a|strict", &v, true);
        m.record("key:b|strict", &v, false);
        drop(m);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"partition\":\"x").unwrap();
        drop(f);
        let m = OutcomeMemory::open(MemoryConfig::default(), Some(path.clone())).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.estimate("key:a|strict", &v).unwrap().escalated, 1.0);
        assert_eq!(m.estimate("key:b|strict", &v).unwrap().escalated, 0.0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("key:a"), "{text}");
    }

    #[test]
    fn the_file_is_compacted_to_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outcomes.jsonl");
        let cfg = MemoryConfig {
            max_entries: 2,
            ..MemoryConfig::default()
        };
        let m = OutcomeMemory::open(cfg.clone(), Some(path.clone())).unwrap();
        for i in 0..7 {
            m.record("p", &[1.0, 0.0], i % 2 == 0);
        }
        drop(m);
        let m = OutcomeMemory::open(cfg, Some(path.clone())).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
