//! The sample of routed prompts kept for labelling
//! ([`tandem_policy::sample`] decides which): appended to a file that
//! `tandem router label --prompts` reads as it is, one
//! `{"id", "prompt", "source": "traffic"}` line each. Each text is kept
//! once (its id is a digest of it), and a line cut short by a crash is
//! dropped when the file is opened again.

use std::collections::HashSet;
use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tandem_policy::sample::SampleConfig;

/// The sample of one gateway.
pub struct TrafficSample {
    config: SampleConfig,
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    ids: HashSet<String>,
    rng: fastrand::Rng,
}

/// One kept prompt, as `tandem router label` reads it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    id: String,
    prompt: String,
    source: String,
}

impl TrafficSample {
    /// Opens the sample at `path`, continuing what it holds.
    pub fn open(config: SampleConfig, path: PathBuf) -> std::io::Result<TrafficSample> {
        Self::open_seeded(config, path, fastrand::Rng::new())
    }

    /// [`TrafficSample::open`] with its draws from `rng` (for tests).
    pub fn open_seeded(
        config: SampleConfig,
        path: PathBuf,
        rng: fastrand::Rng,
    ) -> std::io::Result<TrafficSample> {
        let ids = match std::fs::File::open(&path) {
            Ok(f) => read_ids(f, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        Ok(TrafficSample {
            config,
            path,
            state: Mutex::new(State { ids, rng }),
        })
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prompts kept.
    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    /// None kept.
    pub fn is_empty(&self) -> bool {
        self.lock().ids.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a routed prompt (`private`: it may hold personal data);
    /// whether it was kept.
    pub fn offer(&self, text: &str, private: bool) -> bool {
        if text.trim().is_empty() {
            return false;
        }
        let mut s = self.lock();
        let draw = s.rng.f32();
        if !self.config.keeps(private, s.ids.len(), draw) {
            return false;
        }
        let id = format!(
            "traffic-{}",
            &tandem_ledger::sha256_hex(text.as_bytes())[..16]
        );
        if s.ids.contains(&id) {
            return false;
        }
        let line = Line {
            id: id.clone(),
            prompt: text.to_owned(),
            source: "traffic".into(),
        };
        match crate::jsonl::append(&self.path, &line) {
            Ok(()) => {
                s.ids.insert(id);
                true
            }
            Err(e) => {
                tracing::warn!("router sample {}: {e}", self.path.display());
                false
            }
        }
    }
}

/// The ids a sample file holds; a last line without its newline (a write
/// cut short) is cut off, so the next line starts on a line of its own.
fn read_ids(f: std::fs::File, path: &Path) -> std::io::Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let mut whole = 0u64;
    let mut reader = std::io::BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        whole += n as u64;
        if let Ok(l) = serde_json::from_slice::<Line>(&buf) {
            ids.insert(l.id);
        }
    }
    let mut f = reader.into_inner();
    if f.seek(std::io::SeekFrom::End(0))? > whole {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(whole)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn keeps_each_clean_prompt_once_up_to_the_cap_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router").join("traffic.prompts.jsonl");
        let all = SampleConfig {
            enabled: true,
            rate: 1.0,
            max_prompts: 4,
            path: None,
        };
        let s = TrafficSample::open(all.clone(), path.clone()).unwrap();
        assert!(s.offer("What is 17 + 25?", false));
        assert!(!s.offer("What is 17 + 25?", false), "once");
        assert!(!s.offer("Mail jane@example.com the total", true));
        assert!(!s.offer("  \n", false));
        assert!(s.offer("Ünïcödé, 日本語 and \"quotes\"\nover two lines", false));
        assert_eq!(s.len(), 2);
        drop(s);
        let kept = lines(&path);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0]["prompt"], "What is 17 + 25?");
        assert_eq!(kept[0]["source"], "traffic");
        assert!(kept[0]["id"].as_str().unwrap().starts_with("traffic-"));
        assert_eq!(
            kept[1]["prompt"],
            "Ünïcödé, 日本語 and \"quotes\"\nover two lines"
        );

        // A crash mid-line: the torn line goes, the rest stays and counts.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"id\":\"traffic-00\",\"pro").unwrap();
        drop(f);
        let s = TrafficSample::open(all, path.clone()).unwrap();
        assert_eq!(s.len(), 2);
        assert!(!s.offer("What is 17 + 25?", false), "still once");
        assert!(s.offer("Name three rivers.", false));
        assert!(s.offer("Name four rivers.", false));
        assert!(!s.offer("Name five rivers.", false), "the cap");
        drop(s);
        let kept = lines(&path);
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[2]["prompt"], "Name three rivers.");
    }

    #[test]
    fn keeps_about_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SampleConfig {
            enabled: true,
            rate: 0.1,
            ..SampleConfig::default()
        };
        let s = TrafficSample::open_seeded(
            cfg,
            dir.path().join("t.jsonl"),
            fastrand::Rng::with_seed(7),
        )
        .unwrap();
        let kept = (0..2000)
            .filter(|i| s.offer(&format!("question number {i}"), false))
            .count();
        // 200 expected; 5 standard deviations either side.
        assert!((133..=267).contains(&kept), "{kept}");
    }
}
