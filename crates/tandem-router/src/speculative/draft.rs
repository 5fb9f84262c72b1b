//! The device role of speculative decoding: drafting, one verification
//! call per round, streaming the settled tokens, the draft length that
//! adapts to the measured acceptance rate, drafting speed and round time
//! ([`DraftLength`]), and finishing alone when the cloud stops answering (a
//! handoff, counted and recorded like any other).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_api::speculative::{SpecOpen, SpecSampling, VerifyRequest};
use tandem_api::text::TextAssembler;
use tandem_api::{
    ApiError, DraftVerifier, Event, EventStream, Exchange, Finish, FinishReason, GenerateRequest,
    KvSession, Price, SessionModel, Usage,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::SpeculativeConfig;
use super::arithmetic::{DRAFT_CANDIDATES, DraftLength, argmax, distribution, sample};
use crate::egress::{Egress, EgressRecord, Requester};
use crate::metrics::MoveLabels;

/// What one speculative answer needs.
pub(crate) struct SpecJob {
    /// Where the session's egress is accounted.
    pub egress: Arc<Egress>,
    pub config: SpeculativeConfig,
    /// The device's model.
    pub drafter: Arc<dyn SessionModel>,
    /// The cloud-role Tandem.
    pub verifier: Arc<dyn DraftVerifier>,
    /// Its configured name.
    pub upstream: String,
    pub price: Price,
    /// The model it verifies with.
    pub target_model: String,
    /// The request as it may leave the device (redacted).
    pub req: GenerateRequest,
    pub redacted: BTreeMap<String, u32>,
    pub who: Requester,
    /// What the budget holds for the session until it settles.
    pub reservation: Option<crate::access::Reservation>,
}

#[derive(Default)]
struct Tally {
    draft_s: f64,
    round_s: f64,
    target_s: f64,
    rounds: u64,
    /// Rounds whose draft was ready when the round before ended.
    ahead_used: u64,
    drafted: u64,
    accepted: u64,
    /// Tokens the target produced (accepted drafts and its own).
    from_target: u32,
    /// Each round's span, drafted and accepted tokens, for the trace (the
    /// first ones, bounded).
    log: Vec<(Instant, Instant, u32, u32)>,
}

/// Rounds of one answer kept for its trace.
const ROUNDS_TRACED: usize = 256;

/// Opens both sessions and starts drafting. Errors here come before any
/// generation: a request the engine refuses, a vocabulary mismatch, an
/// unreachable cloud (which the dispatcher may fail over).
pub(crate) async fn start(job: SpecJob) -> Result<EventStream, ApiError> {
    let SpecJob {
        egress,
        config: cfg,
        drafter: engine,
        verifier: cloud,
        upstream,
        price,
        target_model,
        req,
        redacted,
        who,
        reservation,
    } = job;
    let mut local_req = req.clone();
    local_req.model = engine.model_id().to_owned();
    let prepared = engine.prepare(&local_req)?;
    let mut exchange = Exchange::new(&upstream, &target_model);
    let draft = engine.open_session().await?;
    let opened = cloud
        .open(
            &SpecOpen {
                model: target_model,
                vocab_hash: engine.vocab_hash().to_owned(),
                sampling: SpecSampling::from_sampling(&req.sampling),
            },
            &mut exchange,
        )
        .await?;
    // Draft with what the target applies (its model's defaults filled in);
    // an older target that does not say gets the device's own.
    let mut drafting = opened.sampling.map_or_else(
        || engine.effective_sampling(&req.sampling),
        |s| s.to_sampling(),
    );
    drafting.seed = req.sampling.seed;
    drafting.ignore_eos = req.sampling.ignore_eos;
    let prompt_len = prepared.tokens.len() as u32;
    let room = opened
        .context_length
        .min(draft.context_length())
        .saturating_sub(prompt_len + 1);
    if room == 0 {
        cloud.close(&opened.session).await;
        return Err(ApiError::context_length_exceeded(format!(
            "the prompt is {prompt_len} tokens; the target model's session holds {}",
            opened.context_length
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let run = Run {
        max_new: prepared.max_new.min(room),
        committed: prepared.tokens,
        prompt_len,
        generated: 0,
        text: TextAssembler::new(req.stop.clone()),
        sampling: drafting,
        rng: req.sampling.seed.map_or_else(fastrand::Rng::new, |s| {
            fastrand::Rng::with_seed(u64::from(s))
        }),
        engine,
        draft,
        tx,
        piece: Vec::with_capacity(32),
        finished: None,
    };
    tokio::spawn(async move {
        let mut run = run;
        let mut exchange = exchange;
        let mut tally = Tally::default();
        let metrics = egress.metrics.clone();
        let outcome = run
            .drive(
                &metrics,
                &cloud,
                &opened.session,
                &cfg,
                &mut exchange,
                &mut tally,
            )
            .await;
        who.trace.speculated(
            crate::activity::SpeculativeTally {
                rounds: tally.rounds,
                drafted: tally.drafted,
                accepted: tally.accepted,
                traced: Vec::new(),
            },
            &tally.log,
        );
        let mut leg = EgressRecord::new(egress, price, Arc::new(exchange), redacted, who);
        leg.reservation = reservation;
        let m = &metrics;
        m.count_spec("rounds", tally.rounds);
        m.count_spec("drafted", tally.drafted);
        m.count_spec("accepted", tally.accepted);
        m.count_spec("tokens", u64::from(run.generated));
        m.count_spec("drafted_ahead_used", tally.ahead_used);
        for (kind, s) in [
            ("draft", tally.draft_s),
            ("round", tally.round_s),
            ("target", tally.target_s),
        ] {
            m.spec_seconds
                .get_or_create(&crate::metrics::KindLabels { kind: kind.into() })
                .inc_by(s);
        }
        let usage = Usage::new(run.prompt_len, tally.from_target);
        let summary = format!(
            "{} rounds, {} of {} drafted tokens accepted",
            tally.rounds, tally.accepted, tally.drafted
        );
        tracing::info!(
            rounds = tally.rounds,
            drafted = tally.drafted,
            accepted = tally.accepted,
            tokens = run.generated,
            "speculative answer: {outcome}"
        );
        let close = !matches!(outcome, Outcome::Alone { .. });
        match outcome {
            Outcome::Done => {
                leg.settle(&format!("ok (speculative: {summary})"), Some(usage));
            }
            Outcome::Alone { cause } => {
                leg.settle(
                    &format!("handoff to local: {cause} (speculative: {summary})"),
                    Some(usage),
                );
            }
            Outcome::Gone => {
                leg.settle(
                    &format!("client went away (speculative: {summary})"),
                    Some(usage),
                );
            }
            Outcome::Failed(e) => {
                leg.settle(&format!("error: {}", e.message), Some(usage));
            }
        }
        if let Some(f) = run.finished.take() {
            let _ = run.tx.send(Ok(Event::Finish(f)));
        }
        if close {
            cloud.close(&opened.session).await;
        }
    });
    Ok(Box::pin(UnboundedReceiverStream::new(rx)))
}

enum Outcome {
    Done,
    /// The cloud left mid-answer and the device finished it.
    Alone {
        cause: String,
    },
    Gone,
    Failed(ApiError),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::Alone { cause } => write!(f, "finished on the device after: {cause}"),
            Outcome::Gone => f.write_str("client went away"),
            Outcome::Failed(e) => write!(f, "failed: {}", e.message),
        }
    }
}

struct Run {
    engine: Arc<dyn SessionModel>,
    draft: Box<dyn KvSession>,
    /// Prompt and answer so far.
    committed: Vec<i32>,
    prompt_len: u32,
    generated: u32,
    max_new: u32,
    text: TextAssembler,
    sampling: tandem_api::Sampling,
    rng: fastrand::Rng,
    tx: UnboundedSender<Result<Event, ApiError>>,
    piece: Vec<u8>,
    /// The answer's end, sent once the exchange is accounted: whoever
    /// reads the finish sees its cost settled.
    finished: Option<Finish>,
}

/// Whether the answer is complete after a token.
enum Step {
    More,
    Finished,
}

impl Run {
    async fn drive(
        &mut self,
        metrics: &crate::metrics::Metrics,
        cloud: &Arc<dyn DraftVerifier>,
        session: &str,
        cfg: &SpeculativeConfig,
        exchange: &mut Exchange,
        tally: &mut Tally,
    ) -> Outcome {
        let greedy = self.sampling.is_greedy();
        let timeout = Duration::from_millis(cfg.verify_timeout_ms);
        let max = cfg.max_draft.clamp(1, super::MAX_DRAFT);
        let mut length = DraftLength::new(cfg.min_draft.clamp(1, max), max);
        // Tokens of `committed` in the draft's and the target's KV caches.
        let mut in_draft = 0u32;
        let mut in_target = 0u32;
        if self.max_new == 0 {
            self.finish(FinishReason::Length, true);
            return Outcome::Done;
        }
        let mut alone: Option<String> = None;
        let mut ready: Vec<i32> = Vec::new();
        loop {
            if self.tx.is_closed() {
                return Outcome::Gone;
            }
            let left = (self.max_new - self.generated) as usize;
            if let Some(cause) = &alone {
                // The device on its own: one token per step.
                let tok = match self.draft_token(&mut in_draft, None).await {
                    Ok(t) => t,
                    Err(e) => return self.fail(e),
                };
                self.committed.push(tok);
                if let Step::Finished = self.emit(tok) {
                    return Outcome::Alone {
                        cause: cause.clone(),
                    };
                }
                continue;
            }
            let k = length.next().min(left - 1);
            let t_draft = Instant::now();
            // Tokens drafted ahead during the last round open this draft.
            let base = self.committed.len();
            let mut draft = std::mem::take(&mut ready);
            draft.truncate(k);
            let from_ahead = draft.len();
            in_draft = in_draft.min((base + draft.len()) as u32);
            self.committed.extend_from_slice(&draft);
            let mut probs = Vec::new();
            while draft.len() < k
                && !draft
                    .last()
                    .is_some_and(|&t| self.engine.is_eog(t) && !self.sampling.ignore_eos)
            {
                let mut q = Vec::new();
                let tok = match self.draft_token(&mut in_draft, Some(&mut q)).await {
                    Ok(t) => t,
                    Err(e) => return self.fail(e),
                };
                draft.push(tok);
                self.committed.push(tok);
                if !greedy {
                    probs.push(q);
                }
            }
            self.committed.truncate(base);
            let draft_s = t_draft.elapsed().as_secs_f64();
            let round = Instant::now();
            let body = VerifyRequest {
                pos: in_target,
                tokens: self.committed[in_target as usize..].to_vec(),
                draft: draft.clone(),
                draft_probs: probs,
            };
            let pass_tokens = body.tokens.len() + draft.len();
            let sent = body.tokens.len();
            let call = {
                let (cloud, session) = (cloud.clone(), session.to_owned());
                tokio::spawn(async move {
                    let mut ex = Exchange::default();
                    let r = cloud.verify(&session, &body, timeout, &mut ex).await;
                    (r, ex)
                })
            };
            // While the target checks, the device (otherwise idle) drafts
            // on as if everything were accepted; if the target's next token
            // is the one the device drafted, the rest opens the next round.
            // At most one round's worth: drafting that is thrown away costs
            // the device energy.
            let mut ahead = Vec::new();
            if greedy {
                self.committed.extend_from_slice(&draft);
                while !call.is_finished()
                    && ahead.len() <= k
                    && !self
                        .committed
                        .last()
                        .is_some_and(|&t| self.engine.is_eog(t) && !self.sampling.ignore_eos)
                {
                    let tok = match self.draft_token(&mut in_draft, None).await {
                        Ok(t) => t,
                        Err(e) => return self.fail(e),
                    };
                    ahead.push(tok);
                    self.committed.push(tok);
                }
                self.committed.truncate(base);
            }
            let verdict = match call.await {
                Ok((r, ex)) => {
                    exchange.absorb(ex);
                    r
                }
                Err(e) => Err(ApiError::internal(format!("verification task: {e}"))),
            };
            let verdict = verdict.and_then(|v| {
                let want = in_target as usize + sent + v.accepted as usize;
                if v.accepted as usize > draft.len()
                    || v.pos as usize != want
                    || v.next < 0
                    || v.next >= self.engine.n_vocab()
                {
                    Err(ApiError::bad_gateway(
                        "the verifier's answer does not fit the round it was sent",
                    ))
                } else {
                    Ok(v)
                }
            });
            let new: Vec<i32> = match verdict {
                Ok(v) => {
                    let accepted = v.accepted as usize;
                    let round_s = round.elapsed().as_secs_f64();
                    // Drafting time is per token drafted while waiting.
                    let drafted_now = draft.len() - from_ahead;
                    let per = if drafted_now > 0 {
                        draft_s / drafted_now as f64
                    } else {
                        length.draft_per_token().unwrap_or(0.0)
                    };
                    length.observe(
                        draft.len(),
                        accepted,
                        per * draft.len() as f64,
                        round_s,
                        if sent > 2 { 0 } else { pass_tokens },
                        v.compute_ms / 1000.0,
                    );
                    tally.draft_s += draft_s;
                    tally.round_s += round_s;
                    tally.target_s += v.compute_ms / 1000.0;
                    tally.rounds += 1;
                    tally.drafted += draft.len() as u64;
                    tally.accepted += accepted as u64;
                    if tally.log.len() < ROUNDS_TRACED {
                        tally.log.push((
                            round,
                            Instant::now(),
                            draft.len() as u32,
                            accepted as u32,
                        ));
                    }
                    tally.from_target += accepted as u32 + 1;
                    in_target = v.pos;
                    if accepted == draft.len() && ahead.first() == Some(&v.next) {
                        tally.ahead_used += 1;
                        ready = ahead.split_off(1);
                    } else {
                        // Drafted cells past the accepted prefix are stale.
                        in_draft = in_draft.min((base + accepted) as u32);
                    }
                    draft.truncate(accepted);
                    draft.push(v.next);
                    draft
                }
                Err(e) => {
                    // The cloud is gone: the draft is the device's own
                    // continuation, so it stands, and the device goes on.
                    tracing::info!(
                        from = "cloud",
                        to = "local",
                        "speculative handoff: {}",
                        e.message
                    );
                    metrics
                        .handoffs
                        .get_or_create(&MoveLabels {
                            from: "cloud".into(),
                            to: "local".into(),
                            cause: crate::metrics::cause_label(&e),
                        })
                        .inc();
                    alone = Some(e.message);
                    in_draft = in_draft.min((base + draft.len()) as u32);
                    draft
                }
            };
            for tok in new {
                self.committed.push(tok);
                if let Step::Finished = self.emit(tok) {
                    return match alone {
                        Some(cause) => Outcome::Alone { cause },
                        None => Outcome::Done,
                    };
                }
            }
        }
    }

    /// Reads what the draft cache lacks and picks the draft model's next
    /// token; with sampling, `q` receives the distribution it was drawn from.
    async fn draft_token(
        &mut self,
        in_draft: &mut u32,
        q: Option<&mut Vec<(i32, f32)>>,
    ) -> Result<i32, ApiError> {
        // The last token's logits are needed even when its cell is cached
        // (a draft cut shorter than what was drafted ahead): read it again.
        *in_draft = (*in_draft).min(self.committed.len().saturating_sub(1) as u32);
        let feed = self.committed[*in_draft as usize..].to_vec();
        let n = feed.len() as u32;
        let rows = self.draft.eval(*in_draft, feed, 1).await?;
        *in_draft += n;
        let logits = rows
            .first()
            .ok_or_else(|| ApiError::internal("the draft session returned no logits"))?;
        if self.sampling.is_greedy() {
            return Ok(argmax(logits));
        }
        // While verifying, the draft draws from a short list it can send;
        // alone, it samples exactly as the local engine would.
        let cap = q.is_some().then_some(DRAFT_CANDIDATES);
        let d = distribution(logits, &self.sampling, cap);
        let tok = sample(&d, &mut self.rng);
        if let Some(q) = q {
            *q = d;
        }
        Ok(tok)
    }

    fn emit(&mut self, tok: i32) -> Step {
        if !self.sampling.ignore_eos && self.engine.is_eog(tok) {
            self.finish(FinishReason::Stop, true);
            return Step::Finished;
        }
        self.generated += 1;
        self.engine.token_bytes(tok, &mut self.piece);
        let step = self.text.push(&self.piece, None);
        self.send(step.delta);
        if step.stopped {
            self.finish(FinishReason::Stop, false);
            return Step::Finished;
        }
        if self.generated >= self.max_new {
            self.finish(FinishReason::Length, true);
            return Step::Finished;
        }
        Step::More
    }

    fn send(&self, delta: tandem_api::Delta) {
        if !delta.text.is_empty() {
            let _ = self.tx.send(Ok(Event::Delta(delta)));
        }
    }

    fn finish(&mut self, reason: FinishReason, flush: bool) {
        if flush {
            let rest = self.text.finish();
            self.send(rest.delta);
        }
        self.finished = Some(Finish {
            reason,
            usage: Usage::new(self.prompt_len, self.generated),
        });
    }

    fn fail(&mut self, e: ApiError) -> Outcome {
        let _ = self.tx.send(Err(e.clone()));
        Outcome::Failed(e)
    }
}
