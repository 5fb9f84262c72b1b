//! A backend that follows a script instead of running a model: for testing
//! the router and the server without a model file. Each call to
//! [`Backend::start`] takes the next step of the script (the last step
//! repeats), and every request it received is kept for inspection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tandem_api::{
    ApiError, Backend, Capabilities, Delta, Event, Exchange, Feature, FinishReason,
    GenerateRequest, Health, Input, Load, Locality, ModelInfo, Price, Started, TokenLogprob, Usage,
};

/// What one answer does.
#[derive(Debug, Clone)]
pub enum Step {
    /// Streams these pieces, then finishes with `stop`.
    Answer(Vec<String>),
    /// Streams these pieces, each with this log-probability.
    Confident(Vec<String>, f32),
    /// Streams these pieces, each with its own log-probability.
    Scored(Vec<(String, f32)>),
    /// Repeats the last user message (or the prompt) after `prefix`, in
    /// pieces of a few characters: what a model echoing its input would do.
    Echo(String),
    /// Refuses before the first token.
    Refuse(ApiError),
    /// Streams these pieces, then breaks off with the error.
    BreakAfter(Vec<String>, ApiError),
}

/// A scripted backend on one side.
#[derive(Debug)]
pub struct Scripted {
    name: String,
    locality: Locality,
    model: String,
    features: Vec<Feature>,
    price: Price,
    script: Mutex<VecDeque<Step>>,
    received: Mutex<Vec<GenerateRequest>>,
    /// Delay before each piece, so that concurrent tests interleave.
    pace: Duration,
    /// Pieces streamed so far, over all answers.
    sent: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scripted {
    /// A local backend serving `model`, supporting chat and continuation.
    pub fn local(model: &str, script: Vec<Step>) -> Arc<Scripted> {
        Self::new("local", Locality::Local, model, script)
    }

    /// A cloud backend named `name` serving `model`, supporting the API's
    /// features and continuation, priced 1 / 2 USD per million tokens.
    pub fn cloud(name: &str, model: &str, script: Vec<Step>) -> Arc<Scripted> {
        let mut s = Self::new(name, Locality::Cloud, model, script);
        let s_mut = Arc::get_mut(&mut s).expect("fresh");
        s_mut.features.extend([
            Feature::Tools,
            Feature::JsonObject,
            Feature::JsonSchema,
            Feature::OtherResponseFormat,
            Feature::LogitBias,
            Feature::BestOf,
            Feature::Suffix,
            Feature::Images,
            Feature::Audio,
            Feature::Files,
            Feature::OtherContent,
        ]);
        s_mut.price = Price {
            input_per_mtok: 1.0,
            output_per_mtok: 2.0,
        };
        s
    }

    /// The same backend, supporting `features` too; call it before sharing
    /// the backend.
    pub fn with_features(mut self: Arc<Self>, features: &[Feature]) -> Arc<Scripted> {
        Arc::get_mut(&mut self)
            .expect("a backend not shared yet")
            .features
            .extend_from_slice(features);
        self
    }

    fn new(name: &str, locality: Locality, model: &str, script: Vec<Step>) -> Arc<Scripted> {
        Arc::new(Scripted {
            name: name.to_owned(),
            locality,
            model: model.to_owned(),
            features: vec![Feature::Chat, Feature::Continuation],
            price: Price::default(),
            script: Mutex::new(script.into()),
            received: Mutex::new(Vec::new()),
            pace: Duration::from_millis(1),
            sent: Arc::default(),
        })
    }

    /// Pieces it has streamed, over all answers: a stream dropped early
    /// stops counting.
    pub fn pieces_sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request it was asked to answer, in order.
    pub fn received(&self) -> Vec<GenerateRequest> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn next_step(&self) -> Step {
        let mut s = self.script.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() > 1 {
            s.pop_front().unwrap_or_else(|| Step::Answer(vec![]))
        } else {
            s.front().cloned().unwrap_or_else(|| Step::Answer(vec![]))
        }
    }
}

/// Pieces of `text`, a few characters each (on character boundaries).
pub fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

fn last_user(req: &GenerateRequest) -> String {
    match &req.input {
        Input::Chat { messages, .. } => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Input::Text { prompt, .. } => prompt.clone(),
    }
}

impl Backend for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn locality(&self) -> Locality {
        self.locality
    }

    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: self.model.clone(),
            context_length: Some(4096),
            owned_by: self.name.clone(),
        }]
    }

    fn model_for(&self, _requested: &str) -> String {
        self.model.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of(self.features.iter().copied())
    }

    fn load(&self) -> Load {
        Load {
            active: 0,
            queued: 0,
            capacity: (self.locality == Locality::Local).then_some(4),
        }
    }

    fn health(&self) -> Health {
        Health::default()
    }

    fn price(&self) -> Price {
        self.price
    }

    fn start(&self, req: GenerateRequest) -> BoxFuture<'static, Started> {
        let step = self.next_step();
        let exchange = (self.locality == Locality::Cloud).then(|| {
            let x = Exchange::new(&self.name, &self.model);
            x.attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Arc::new(x)
        });
        let echo = last_user(&req);
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req);
        let pace = self.pace;
        let sent = self.sent.clone();
        Box::pin(async move {
            type Pieces = Vec<(String, Option<f32>)>;
            let with = |p: Vec<String>, lp: Option<f32>| -> Pieces {
                p.into_iter().map(|t| (t, lp)).collect()
            };
            let (texts, end): (Pieces, Option<ApiError>) = match step {
                Step::Refuse(e) => {
                    return Started {
                        result: Err(e),
                        exchange,
                        more: Vec::new(),
                    };
                }
                Step::Answer(p) => (with(p, None), None),
                Step::Confident(p, lp) => (with(p, Some(lp)), None),
                Step::Scored(p) => (p.into_iter().map(|(t, lp)| (t, Some(lp))).collect(), None),
                Step::Echo(prefix) => (with(pieces(&format!("{prefix}{echo}"), 3), None), None),
                Step::BreakAfter(p, e) => (with(p, None), Some(e)),
            };
            let n = texts.len() as u32;
            let stream = async_stream::stream! {
                for (text, logprob) in texts {
                    tokio::time::sleep(pace).await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let tokens = logprob
                        .map(|lp| vec![TokenLogprob { token: text.clone(), logprob: lp, bytes: None, top_logprobs: vec![] }])
                        .unwrap_or_default();
                    yield Ok(Event::Delta(Delta { text, tokens, ..Delta::default() }));
                }
                match end {
                    Some(e) => yield Err(e),
                    None => yield Ok(Event::Finish(tandem_api::Finish {
                        reason: FinishReason::Stop,
                        usage: Usage::new(10, n),
                    })),
                }
            };
            Started {
                result: Ok(Box::pin(stream)),
                exchange,
                more: Vec::new(),
            }
        })
    }
}
