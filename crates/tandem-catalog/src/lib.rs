//! Tandem's model catalog: named models, where their files come from, the
//! sha256 each must have, and the one cache folder they live in.
//!
//! A pull writes each file under a temporary name, hashing as it goes, and
//! renames it only when the hash matches: a model under its final name is
//! always whole. Concurrent pulls of the same model (two processes, or tests
//! running in parallel) wait for each other through a lock file.
//!
//! Not here: loading or running models (that is `tandem-engine`).

#![warn(missing_docs)]

mod entry;
mod fetch;
pub mod python;

use std::path::{Path, PathBuf};

pub use entry::{Entry, FileSpec, Kind, Source, WheelPart};
pub use fetch::PullOptions;

/// The model `tandem serve` uses when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

const BUILTIN: &str = include_str!("../catalog.toml");

/// Why a model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// No such model in the catalog.
    #[error("unknown model `{0}`: `tandem models` lists the catalog")]
    Unknown(String),
    /// A catalog file does not parse.
    #[error("catalog {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    #[error(
        "sha256 mismatch for {file}: expected {expected}, got {actual}; the download was discarded"
    )]
    /// A download produced other bytes than pinned.
    HashMismatch {
        /// The file.
        file: String,
        /// The pinned sha256.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A download failed.
    #[error("{0}")]
    Fetch(String),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
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

/// A model ready to load: the name clients will use, its main file, and
/// the catalog's settings for it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The name clients use in `model`.
    pub id: String,
    /// The main file (a GGUF; for an embedding model, a file in its folder).
    pub path: PathBuf,
    /// The catalog's sampling pin.
    pub sampling: tandem_api::SamplingPreset,
    /// The catalog's default system message.
    pub system: Option<String>,
}

/// A catalog name (pulled if missing) or a path to a model file.
pub async fn resolve(model: &str) -> Result<Resolved, CatalogError> {
    let as_path = Path::new(model);
    if as_path.is_file() {
        let id = as_path
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| model.to_owned());
        return Ok(Resolved {
            id,
            path: as_path.to_path_buf(),
            sampling: Default::default(),
            system: None,
        });
    }
    let catalog = Catalog::load(None)?;
    let path = catalog.pull(model, &PullOptions::default()).await?;
    let entry = catalog.get(model)?;
    Ok(Resolved {
        id: model.to_owned(),
        path,
        sampling: entry.sampling.unwrap_or_default(),
        system: entry.system.clone(),
    })
}

/// Where `tandem router train` writes the learned router and `tandem serve`
/// looks for it.
pub fn router_path() -> PathBuf {
    default_home().join("router.json")
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
        let mut entries = entry::parse(BUILTIN, "built-in catalog")?;
        let user = home.join("catalog.toml");
        if user.is_file() {
            let text = std::fs::read_to_string(&user)
                .map_err(io_err(format!("reading {}", user.display())))?;
            for e in entry::parse(&text, &user.display().to_string())? {
                // A user entry with a built-in name replaces it.
                entries.retain(|b| b.name != e.name);
                entries.push(e);
            }
        }
        Ok(Catalog { home, entries })
    }

    /// The cache folder.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Every model, built-in and the user's.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The model named `name`.
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

    /// Whether every file of `entry` is present.
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
            entry::parse(&text, &path.display().to_string())?
        } else {
            Vec::new()
        };
        user.retain(|e| e.name != entry.name);
        user.push(entry.clone());
        let text = entry::render(&user)?;
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
