//! `POST /v1/embeddings`: OpenAI's request shape and its checks.

use serde::Deserialize;

use crate::error::ApiError;

/// OpenAI's limit on inputs per request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// The request body, as OpenAI defines it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// The embedding model.
    pub model: String,
    /// One text or several.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Must equal the model's dimension when given.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Accepted for compatibility; Tandem does not track end users.
    #[serde(default, rename = "user")]
    pub _user: Option<String>,
}

/// `input`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several, embedded in order.
    Many(Vec<String>),
}

/// A checked embedding request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingJob {
    /// The texts, at least one, none empty.
    pub texts: Vec<String>,
    /// Vectors as base64 rather than JSON numbers.
    pub base64: bool,
}

impl EmbeddingRequest {
    /// Checks every field against a model of dimension `dim`.
    pub fn into_job(self, dim: usize) -> Result<EmbeddingJob, ApiError> {
        let texts = match self.input {
            EmbeddingInput::One(t) => vec![t],
            EmbeddingInput::Many(v) => v,
        };
        let invalid = |m: String| ApiError::invalid_request(m).with_param("input");
        if texts.is_empty() {
            return Err(invalid("`input` must not be empty".into()));
        }
        if texts.len() > MAX_EMBEDDING_INPUTS {
            return Err(invalid(format!(
                "`input` has {} items; at most {MAX_EMBEDDING_INPUTS} are allowed",
                texts.len()
            )));
        }
        if let Some(i) = texts.iter().position(|t| t.is_empty()) {
            return Err(invalid(format!("`input[{i}]` is an empty string")));
        }
        if let Some(n) = self.dimensions
            && n as usize != dim
        {
            return Err(ApiError::invalid_request(format!(
                "this model only gives {dim} dimensions"
            ))
            .with_param("dimensions"));
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(o) => {
                return Err(ApiError::invalid_request(format!(
                    "`encoding_format` must be float or base64, not `{o}`"
                ))
                .with_param("encoding_format"));
            }
        };
        Ok(EmbeddingJob { texts, base64 })
    }
}
