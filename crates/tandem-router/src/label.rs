//! Labels for the learned router from the pair it actually routes between.
//!
//! A label says whether the device's model answered a prompt well enough
//! (`weak_correct`) and whether the cloud's did (`strong_correct`), the
//! format `tandem router train` reads. Where the prompt carries a checkable
//! reference (a number, a multiple-choice letter) both answers are checked
//! against it; otherwise the cloud model judges whether the device's answer
//! is as good as its own, as RouteLLM augments its data with an LLM judge.
//!
//! Every call goes through the [`Dispatcher`], so the privacy policy holds
//! as it does for traffic: a prompt the policy keeps on the device is never
//! sent (the judge's prompt, which quotes the device's answer, included),
//! redaction applies, and the egress ledger records what left.

use std::sync::Arc;

use tandem_api::{Answer, ApiError, GenerateRequest, Input, Message, Sampling};
use tandem_policy::PrivacyMode;

use crate::{Dispatcher, RequestContext};

/// A checkable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The answer's last integer must be this one (as GSM8K is scored:
    /// an answer that shows its working ends with the result).
    Number(i64),
    /// The answer must open with this letter (multiple choice).
    Letter(char),
}

impl Reference {
    /// The reference a prompt file gives: a JSON integer, a string holding
    /// one, or a single letter. Anything else is not checkable (`None`):
    /// such prompts are judged.
    pub fn parse(v: &serde_json::Value) -> Option<Reference> {
        match v {
            serde_json::Value::Number(n) => n.as_i64().map(Reference::Number),
            serde_json::Value::String(s) => {
                let s = s.trim();
                if let Ok(n) = s.replace(',', "").parse::<i64>() {
                    return Some(Reference::Number(n));
                }
                let mut chars = s.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) if c.is_ascii_alphabetic() => {
                        Some(Reference::Letter(c.to_ascii_uppercase()))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Whether an answer's text matches.
    pub fn passes(&self, text: &str) -> bool {
        match self {
            Reference::Number(n) => last_number(text) == Some(*n),
            Reference::Letter(c) => text
                .trim_start_matches(|ch: char| !ch.is_ascii_alphabetic())
                .chars()
                .next()
                .is_some_and(|ch| ch.eq_ignore_ascii_case(c)),
        }
    }
}

/// The last integer in the text (thousands commas allowed; a trailing
/// full stop or decimal part is not a digit of it).
pub fn last_number(text: &str) -> Option<i64> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied();
    let digit_at = |i: usize| at(i).is_some_and(|c| c.is_ascii_digit());
    let end = (0..chars.len()).rev().find(|&i| digit_at(i))?;
    let mut start = end;
    while start > 0
        && (digit_at(start - 1)
            || (at(start - 1) == Some(',') && start >= 2 && digit_at(start - 2)))
    {
        start -= 1;
    }
    let before = |n: usize| start.checked_sub(n).and_then(at);
    // A decimal such as 2.5 is not an integer answer.
    if before(1) == Some('.') && before(2).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits: String = chars
        .get(start..=end)?
        .iter()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let v: i64 = digits.parse().ok()?;
    // A minus right after a digit is a subtraction or a range, not a sign.
    let signed = before(1) == Some('-') && !before(2).is_some_and(|c| c.is_ascii_digit());
    Some(if signed { -v } else { v })
}

/// One prompt to label.
#[derive(Debug, Clone)]
pub struct Item {
    /// The prompt, sent as the only user message.
    pub prompt: String,
    /// Its checkable answer, if it has one.
    pub reference: Option<Reference>,
}

/// One user message, answered greedily (so labels are reproducible).
pub fn greedy_request(model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        model: model.to_owned(),
        input: Input::Chat {
            messages: vec![Message::new("user", prompt)],
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(max_tokens),
        stop: Vec::new(),
        logprobs: None,
        stream: false,
        include_usage: false,
        extra: Default::default(),
    }
}

/// How a label was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Both answers checked against the reference.
    Checked,
    /// The cloud model judged the device's answer against its own.
    Judged,
}

/// A labelled prompt.
#[derive(Debug, Clone)]
pub struct Label {
    /// The device's answer was right (or, judged, as good as the cloud's).
    pub weak_correct: bool,
    /// The cloud's answer was right (judged: taken as the reference).
    pub strong_correct: bool,
    /// How it was decided.
    pub method: Method,
    /// The device's answer.
    pub device_answer: String,
    /// The cloud's answer (with the device's personal data restored when
    /// the policy redacted it).
    pub cloud_answer: String,
    /// Tokens the cloud read and wrote for this label, judge included.
    pub cloud_tokens: (u64, u64),
    /// With [`Labeler::audit_judge`], on a checked prompt: the judge's
    /// verdict too (is the device's answer as good as the cloud's?), to set
    /// against the check. `None` when not asked or not readable.
    pub judge_too: Option<bool>,
}

/// What labelling one prompt came to.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Labelled.
    Labeled(Label),
    /// The privacy policy keeps it on the device: nothing was sent.
    KeptLocal(String),
    /// The judge's verdict could not be read; no label.
    Unjudged(String),
}

/// Runs the device and the cloud model on prompts and labels them.
pub struct Labeler {
    dispatcher: Arc<Dispatcher>,
    device: String,
    cloud: String,
    /// Longest answer asked of either model.
    pub max_tokens: u32,
    /// The privacy mode every call runs under (default: the gateway's).
    pub privacy: Option<PrivacyMode>,
    /// Ask the judge about checked prompts too, so that how far its
    /// verdicts agree with the checks can be measured.
    pub audit_judge: bool,
}

impl Labeler {
    /// Labels with `device` (a local model) against `cloud` (an upstream's
    /// model), both by the names the dispatcher serves them under.
    pub fn new(dispatcher: Arc<Dispatcher>, device: &str, cloud: &str) -> Labeler {
        Labeler {
            dispatcher,
            device: device.to_owned(),
            cloud: cloud.to_owned(),
            max_tokens: 256,
            privacy: None,
            audit_judge: false,
        }
    }

    /// The request for one side.
    pub fn request(&self, model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
        greedy_request(model, prompt, max_tokens)
    }

    fn context(&self) -> RequestContext {
        RequestContext {
            privacy: self.privacy,
            // A cached answer would label the cache, not the model.
            cache_skip: true,
            ..RequestContext::default()
        }
    }

    /// Asks one side; `None` when the privacy policy keeps the prompt on the
    /// device.
    async fn ask(
        &self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
        cloud: bool,
    ) -> Result<Result<Answer, String>, ApiError> {
        let req = self.request(model, prompt, max_tokens);
        let out = match self.dispatcher.dispatch(req, self.context()).await {
            Ok(out) => out,
            Err(e) if kept_local(&e) => return Ok(Err(e.message)),
            Err(e) => return Err(e),
        };
        // A label must come from the side it names: an answer the gateway
        // failed over to the other side would label the wrong model.
        if out.route.backend.starts_with("cloud") != cloud {
            return Err(ApiError::bad_gateway(format!(
                "`{model}` was answered by {} ({}), not by the {} model",
                out.route.backend,
                out.route.failover.as_deref().unwrap_or("failover"),
                if cloud { "cloud" } else { "device" }
            )));
        }
        Ok(Ok(Answer::collect(out.stream).await?))
    }

    /// Labels one prompt: the cloud first, so a prompt the policy keeps on
    /// the device costs no device time either.
    pub async fn label(&self, item: &Item) -> Result<Outcome, ApiError> {
        let strong = match self
            .ask(&self.cloud, &item.prompt, self.max_tokens, true)
            .await?
        {
            Ok(a) => a,
            Err(why) => return Ok(Outcome::KeptLocal(why)),
        };
        let weak = match self
            .ask(&self.device, &item.prompt, self.max_tokens, false)
            .await?
        {
            Ok(a) => a,
            Err(why) => return Err(ApiError::internal(why)),
        };
        let mut tokens = usage(&strong);
        let mut add = |(i, o): (u64, u64)| tokens = (tokens.0 + i, tokens.1 + o);
        let (weak_correct, strong_correct, method, judge_too) = match item.reference {
            Some(r) => {
                let judge_too = if self.audit_judge {
                    match self.judge(&item.prompt, &strong, &weak).await? {
                        Judgement::Verdict(v, t) => {
                            add(t);
                            Some(v)
                        }
                        Judgement::Unreadable(_, t) => {
                            add(t);
                            None
                        }
                        Judgement::KeptLocal(_) => None,
                    }
                } else {
                    None
                };
                (
                    r.passes(&weak.text),
                    r.passes(&strong.text),
                    Method::Checked,
                    judge_too,
                )
            }
            None => match self.judge(&item.prompt, &strong, &weak).await? {
                Judgement::Verdict(v, t) => {
                    add(t);
                    (v, true, Method::Judged, None)
                }
                Judgement::Unreadable(text, _) => {
                    return Ok(Outcome::Unjudged(format!(
                        "the judge answered {:?}",
                        text.chars().take(40).collect::<String>()
                    )));
                }
                Judgement::KeptLocal(why) => return Ok(Outcome::KeptLocal(why)),
            },
        };
        Ok(Outcome::Labeled(Label {
            weak_correct,
            strong_correct,
            method,
            device_answer: weak.text,
            cloud_answer: strong.text,
            cloud_tokens: tokens,
            judge_too,
        }))
    }
}

/// What the judge said about one pair of answers.
enum Judgement {
    /// Yes or no, and the tokens it cost.
    Verdict(bool, (u64, u64)),
    /// Neither: its text, and the tokens it cost.
    Unreadable(String, (u64, u64)),
    /// The judge's prompt (which quotes the device's answer) may not leave.
    KeptLocal(String),
}

impl Labeler {
    /// Asks the cloud model whether the device's answer is as good as its own.
    async fn judge(
        &self,
        prompt: &str,
        strong: &Answer,
        weak: &Answer,
    ) -> Result<Judgement, ApiError> {
        let asked = judge_prompt(prompt, &strong.text, &weak.text);
        let a = match self.ask(&self.cloud, &asked, 4, true).await? {
            Ok(a) => a,
            Err(why) => return Ok(Judgement::KeptLocal(why)),
        };
        Ok(match verdict(&a.text) {
            Some(v) => Judgement::Verdict(v, usage(&a)),
            None => Judgement::Unreadable(a.text.clone(), usage(&a)),
        })
    }
}

fn usage(a: &Answer) -> (u64, u64) {
    let u = &a.finish.usage;
    (u64::from(u.prompt_tokens), u64::from(u.completion_tokens))
}

/// Whether a refusal means the policy keeps the prompt on the device.
fn kept_local(e: &ApiError) -> bool {
    matches!(
        e.code.as_deref(),
        Some("privacy_policy" | "privacy_unavailable")
    )
}

/// What the judge is asked: is the candidate (the device's answer) as good
/// as the reference (the cloud's own)?
pub fn judge_prompt(question: &str, reference: &str, candidate: &str) -> String {
    format!(
        "You are grading an answer to a question against a reference answer.\n\n\
         Question:\n{question}\n\n\
         Reference answer:\n{}\n\n\
         Candidate answer:\n{}\n\n\
         Is the candidate answer as correct and as useful as the reference answer? \
         Reply with only yes or no.",
        reference.trim(),
        candidate.trim()
    )
}

/// The judge's verdict: its first word, yes or no.
pub fn verdict(text: &str) -> Option<bool> {
    let word: String = text
        .trim_start_matches(|c: char| !c.is_alphanumeric())
        .chars()
        .take_while(|c| c.is_alphabetic())
        .flat_map(char::to_lowercase)
        .collect();
    match word.as_str() {
        "yes" | "y" => Some(true),
        "no" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked() {
        let n = Reference::Number;
        assert!(n(1234).passes("The answer is 1,234."));
        assert!(n(-5).passes("-5"));
        assert!(n(5).passes("2 + 3 = 5"));
        assert!(!n(12).passes("x = 13"));
        assert!(!n(12).passes("no number"));
        assert!(!n(5).passes("2.5"));
        assert!(Reference::Letter('B').passes("B) Mars"));
        assert!(Reference::Letter('B').passes(" (b)"));
        assert!(!Reference::Letter('B').passes("A"));
        assert_eq!(last_number("-"), None);
        assert_eq!(last_number("a-b 7, then 8-9"), Some(9));
        assert_eq!(last_number("it is -9"), Some(-9));
        assert_eq!(last_number("1,200,000 people"), Some(1_200_000));
        assert_eq!(last_number(",5"), Some(5));
        assert_eq!(last_number("99999999999999999999999"), None);
    }

    #[test]
    fn references_parse_from_json() {
        use serde_json::json;
        assert_eq!(Reference::parse(&json!(42)), Some(Reference::Number(42)));
        assert_eq!(
            Reference::parse(&json!("1,200")),
            Some(Reference::Number(1200))
        );
        assert_eq!(Reference::parse(&json!("c")), Some(Reference::Letter('C')));
        assert_eq!(Reference::parse(&json!("Paris")), None);
        assert_eq!(Reference::parse(&json!(1.5)), None);
        assert_eq!(Reference::parse(&json!("é")), None);
    }

    #[test]
    fn verdicts_are_read_from_the_first_word() {
        assert_eq!(verdict("Yes."), Some(true));
        assert_eq!(verdict(" **No**, because"), Some(false));
        assert_eq!(verdict("Yesterday"), None);
        assert_eq!(verdict(""), None);
        assert_eq!(verdict("Maybe"), None);
    }
}
