//! The semantic cache in the request path: which requests may be looked up
//! and kept, answering from a hit, and keeping an answer once it ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tandem_api::{Event, EventStream, Finish, GenerateRequest, Locality};
use tandem_policy::{Decision, Effect, Features, Reason};

use super::{CacheOutcome, Dispatched, Dispatcher, RequestContext, RouteInfo};
use crate::cache::{CacheKey, Cached};
use crate::metrics::RouteLabels;

impl Dispatcher {
    /// The cache key of a request, or why it is not looked up.
    pub(super) fn cache_key(
        &self,
        req: &GenerateRequest,
        ctx: &RequestContext,
        features: &Features,
        checked: &super::plan::Checked,
    ) -> (Option<CacheKey>, Option<CacheOutcome>) {
        match self.cache() {
            Some(c) if c.config().enabled && self.embedder().is_some() => {
                // The cache never keeps personal data on disk, whatever the
                // privacy mode, nor what could not be checked.
                let private = checked.maybe_private();
                let key = (!ctx.cache_skip && !private)
                    .then(|| {
                        let mode = features.privacy.unwrap_or(self.policy.privacy);
                        let name = ctx.caller.as_ref().map(|c| c.config.name.as_str());
                        CacheKey::new(req, name, mode.as_str())
                    })
                    .flatten();
                if key.is_none() {
                    self.count_cache("skip");
                    return (None, Some(CacheOutcome::Skip));
                }
                (key, None)
            }
            _ => (None, None),
        }
    }

    /// What requests are remembered under (the cache's answers, the
    /// router's outcomes): the key's holder and the privacy mode, so one
    /// key's traffic never informs another's.
    pub(super) fn partition(&self, ctx: &RequestContext, features: &Features) -> String {
        let mode = features.privacy.unwrap_or(self.policy.privacy);
        let name = ctx.caller.as_ref().map_or("", |c| c.config.name.as_str());
        format!("{name}|{}", mode.as_str())
    }

    /// Answers from the cache: one piece of text, then the finish.
    pub(super) fn serve_cached(&self, hit: Cached, t0: Instant) -> Dispatched {
        let detail = format!(
            "a prompt this close (similarity {:.3}) was answered before by {}",
            hit.similarity, hit.backend
        );
        let route = RouteInfo {
            backend: "cache".into(),
            model: hit.model.clone(),
            decision: Decision {
                side: Locality::Local,
                fallback: None,
                redact: false,
                reasons: vec![Reason {
                    rule: "cache",
                    effect: Effect::Decided,
                    side: Locality::Local,
                    detail,
                }],
                decided_by: "cache",
            },
            redacted: BTreeMap::new(),
            failover: None,
            replica: None,
            decision_us: t0.elapsed().as_micros() as u64,
            difficulty: None,
            reading: None,
            cache: Some(CacheOutcome::Hit {
                similarity: hit.similarity,
            }),
            memory: None,
            cascade: None,
            speculative: None,
        };
        self.metrics()
            .requests
            .get_or_create(&RouteLabels {
                backend: "cache".into(),
                reason: "cache".into(),
            })
            .inc();
        let events = vec![
            Ok(Event::Delta(tandem_api::Delta {
                text: hit.text,
                extra: hit.extra,
                response: hit.response,
                ..tandem_api::Delta::default()
            })),
            Ok(Event::Finish(Finish {
                reason: hit.finish,
                usage: hit.usage,
            })),
        ];
        Dispatched {
            stream: Box::pin(futures::stream::iter(events)),
            route,
            more: Vec::new(),
        }
    }

    /// Passes the answer through and keeps it in the cache once it ends.
    pub(super) fn keep_answer(
        self: &Arc<Self>,
        stream: EventStream,
        store: Option<(CacheKey, Vec<f32>)>,
        backend: String,
        model: String,
    ) -> EventStream {
        let (Some((key, embedding)), Some(cache)) = (store, self.cache().cloned()) else {
            return stream;
        };
        let shared = self.shared.clone();
        Box::pin(async_stream::stream! {
            let mut stream = stream;
            let mut text = String::new();
            // What the client is shown beside the text, gathered as a whole
            // answer joins it: text fields piece by piece, others whole.
            let mut extra = serde_json::Map::new();
            let mut response = serde_json::Map::new();
            // The cache keeps text answers; a tool call is an action, not
            // an answer to replay.
            let mut called = false;
            while let Some(event) = stream.next().await {
                match &event {
                    Ok(Event::Delta(d)) => {
                        text.push_str(&d.text);
                        called |= !d.tool_calls.is_empty();
                        for (field, value) in &d.extra {
                            match (extra.get_mut(field), value) {
                                (Some(serde_json::Value::String(had)), serde_json::Value::String(more)) => {
                                    had.push_str(more);
                                }
                                _ => {
                                    extra.insert(field.clone(), value.clone());
                                }
                            }
                        }
                        response.extend(d.response.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                    Ok(Event::Finish(_)) if called => {}
                    Ok(Event::Finish(f)) => {
                        let line = cache.insert(&key, embedding.clone(), Cached {
                            text: std::mem::take(&mut text),
                            finish: f.reason,
                            usage: f.usage,
                            backend: backend.clone(),
                            model: model.clone(),
                            extra: std::mem::take(&mut extra),
                            response: std::mem::take(&mut response),
                            similarity: 1.0,
                        });
                        if let (Some(line), Some(shared)) = (line, shared.clone()) {
                            tokio::spawn(async move {
                                let origin = shared.origin.clone();
                                let _ = shared
                                    .call("cache put", shared.store().cache_put(&origin, &line))
                                    .await;
                            });
                        }
                    }
                    Err(_) => {}
                }
                yield event;
            }
        })
    }
}
