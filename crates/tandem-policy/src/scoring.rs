//! Scoring how hard a request is for the local model: the interface the
//! router's difficulty rule reads, and what a scorer judges.

pub use crate::learned::text_features;

/// Scores how hard a request is for the local model, in [0, 1].
pub trait Scorer: Send + Sync {
    /// Difficulty in [0, 1] of what the user asked last (`text`, see
    /// [`routed_text`]) from its embedding.
    fn score(&self, embedding: &[f32], text: &str) -> f32;
    /// The local model whose reading of the prompt [`Scorer::score_read`]
    /// uses (worth a prefill to take), if any, and when it is worth it.
    fn reader(&self) -> Option<Reader<'_>> {
        None
    }
    /// [`Scorer::score`] with the local model's reading of the prompt
    /// (`tandem_engine::reading`), when one was taken.
    fn score_read(&self, embedding: &[f32], text: &str, _reading: Option<&[f32]>) -> f32 {
        self.score(embedding, text)
    }
    /// The difficulty threshold for the request's quality knob (`None`: the
    /// knob is absent); `None` leaves it to the policy's configured one.
    fn threshold(&self, _quality: Option<f32>) -> Option<f32> {
        None
    }
}

/// What a scorer that reads prompts needs read, and when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reader<'a> {
    /// The local model whose readings it scores.
    pub model: &'a str,
    /// The block whose output it reads; `None`: the last layer's.
    pub layer: Option<u32>,
    /// Numbers in a reading: one of another width means nothing to it.
    pub width: usize,
    /// How far a reading can move a difficulty (see [`Reader::span`]).
    pub reach: f32,
}

impl Reader<'_> {
    /// What reads, in words: the model, and the block unless it is the
    /// last layer.
    pub fn source(&self) -> String {
        match self.layer {
            Some(l) => format!("{} (block {l})", self.model),
            None => self.model.to_owned(),
        }
    }

    /// The difficulties a reading can move a request scored `unread`
    /// without one to (whether that span can change the decision is
    /// [`crate::difficulty_can_change`]'s to say).
    pub fn span(&self, unread: f32) -> (f32, f32) {
        (unread - self.reach, unread + self.reach)
    }
}

/// The text a router judges: what the user asked last.
pub fn routed_text(input: &tandem_api::Input) -> Option<&str> {
    match input {
        tandem_api::Input::Chat { messages, .. } => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .or(messages.last())
            .map(|m| m.content.as_str()),
        tandem_api::Input::Text { prompt, .. } => Some(prompt.as_str()),
    }
}
