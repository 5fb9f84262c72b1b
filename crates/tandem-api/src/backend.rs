//! The seam between the server and whatever produces tokens: the local
//! engine, an OpenAI-compatible upstream, or a combination of both.

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use serde::Serialize;

use crate::error::ApiError;
use crate::generate::{Event, Finish, GenerateRequest, TokenLogprob};

/// Events of one answer. Dropping the stream cancels the generation.
pub type EventStream = BoxStream<'static, Result<Event, ApiError>>;

/// Where a backend runs; the router treats the two very differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    Device,
    Cloud,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name clients use in `model`.
    pub id: String,
    /// Tokens one request may hold (prompt and answer together), if known.
    pub context_length: Option<u32>,
    pub owned_by: String,
}

/// How busy a backend is. Local engines have a fixed capacity; cloud
/// upstreams report `capacity: None` (they scale out of sight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Load {
    pub active: usize,
    pub queued: usize,
    pub capacity: Option<usize>,
}

pub trait Backend: Send + Sync + 'static {
    /// A short stable name for logs, headers and metrics.
    fn name(&self) -> &str;

    fn locality(&self) -> Locality;

    fn models(&self) -> Vec<ModelInfo>;

    fn load(&self) -> Load {
        Load::default()
    }

    /// Starts generating. Errors found before the first token (unknown
    /// model, prompt too long, upstream refused) come back here; errors
    /// after it arrive inside the stream.
    fn generate(&self, req: GenerateRequest) -> BoxFuture<'static, Result<EventStream, ApiError>>;
}

/// A whole answer gathered from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
    pub finish: Finish,
}

impl Answer {
    pub async fn collect(mut stream: EventStream) -> Result<Answer, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(event) = stream.next().await {
            match event? {
                Event::Delta(d) => {
                    text.push_str(&d.text);
                    tokens.extend(d.tokens);
                }
                Event::Finish(finish) => {
                    return Ok(Answer {
                        text,
                        tokens,
                        finish,
                    });
                }
            }
        }
        Err(ApiError::bad_gateway(
            "the backend ended the answer without finishing it",
        ))
    }
}
