//! Tandem's shared vocabulary: OpenAI's wire types, the error every layer
//! returns, the internal request and event types, and the [`Backend`] trait
//! that the local engine and the cloud upstreams both implement.
//!
//! This crate does no I/O; it is what the other crates agree on.

pub mod backend;
pub mod error;
pub mod generate;
pub mod openai;
pub mod spec;

pub use backend::{Answer, Backend, EventStream, Load, Locality, ModelInfo};
pub use error::{ApiError, ErrorKind};
pub use generate::{
    Delta, Event, Finish, FinishReason, GenerateRequest, Input, LogprobRequest, Message, Sampling,
    SamplingPreset, TokenLogprob, TopLogprob, Usage,
};
