//! Tandem's shared vocabulary: OpenAI's wire types, the error every layer
//! returns, the internal request and event types, and the [`Backend`] trait
//! that the local engine, the cloud upstreams and test doubles implement.
//!
//! This crate does no I/O and holds no policy; it is what the other crates
//! agree on.

#![warn(missing_docs)]

mod backend;
mod embeddings;
mod error;
mod generate;
pub mod openai;
pub mod speculative;
pub mod text;

pub use backend::{
    Answer, AnswerSoFar, Backend, BreakerState, CHOICE_NOT_ANSWERED, Capabilities, DraftVerifier,
    EventStream, Exchange, Feature, Health, KvSession, Load, Locality, ModelInfo, Outbound,
    Prepared, Price, Rows, SessionModel, Started,
};
pub use embeddings::{EmbeddingInput, EmbeddingJob, EmbeddingRequest, MAX_EMBEDDING_INPUTS};
pub use error::{ApiError, ErrorBody, ErrorKind, ErrorObject};
pub use generate::{
    Delta, Event, Finish, FinishReason, FunctionCall, FunctionDelta, GUIDED_FIELDS,
    GenerateRequest, Input, LogprobRequest, MAX_TOOL_CALLS, Message, PromptTokensDetails, Sampling,
    SamplingPreset, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage,
};
