//! The dispatcher with scripted backends: failover, handoff, the cascade's
//! fallback, redaction and restoration, refusals — no model file, no
//! network.

use std::sync::Arc;

use futures::StreamExt;
use tandem_api::{ApiError, Backend, Event, GenerateRequest, Input, Locality, Message, Sampling};
use tandem_policy::{PolicyConfig, PrivacyMode, Rule};
use tandem_router::{Dispatcher, Mode, RequestContext};
use tandem_testkit::scripted::{Scripted, Step, pieces};

fn chat(text: &str) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        model: "tandem/auto".into(),
        input: Input::Chat {
            messages: vec![Message::new("user", text)],
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(64),
        stop: vec![],
        logprobs: None,
        stream: true,
        include_usage: false,
        extra: Default::default(),
    }
}

fn cloud_first() -> PolicyConfig {
    let mut p = PolicyConfig::default();
    p.rules.retain(|r| *r != Rule::PreferLocal);
    p.rules.push(Rule::PreferCloud);
    p
}

fn dispatcher(
    local: &Arc<Scripted>,
    cloud: &Arc<Scripted>,
    policy: PolicyConfig,
) -> Arc<Dispatcher> {
    Dispatcher::builder()
        .local_arc(local.clone() as Arc<dyn Backend>)
        .cloud_arc(cloud.clone() as Arc<dyn Backend>)
        .policy(policy)
        .build()
        .expect("dispatcher")
}

/// The answer's text, and the error it ended with, if any.
async fn run(
    d: &Arc<Dispatcher>,
    req: GenerateRequest,
    ctx: RequestContext,
) -> (String, Option<ApiError>, tandem_router::RouteInfo) {
    let out = d.dispatch(req, ctx).await.expect("dispatched");
    let mut stream = out.stream;
    let mut text = String::new();
    while let Some(e) = stream.next().await {
        match e {
            Ok(Event::Delta(d)) => text.push_str(&d.text),
            Ok(Event::Finish(_)) => return (text, None, out.route),
            Err(e) => return (text, Some(e), out.route),
        }
    }
    (text, None, out.route)
}

fn err(status: u16) -> ApiError {
    ApiError::new(
        status,
        tandem_api::ErrorKind::ServerError,
        "scripted failure",
    )
}

#[tokio::test]
async fn failover_before_the_first_token() {
    let local = Scripted::local("small", vec![Step::Refuse(ApiError::unavailable("busy"))]);
    let cloud = Scripted::cloud(
        "cloud",
        "big",
        vec![Step::Answer(pieces("From the cloud.", 4))],
    );
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let (text, e, route) = run(&d, chat("hi"), RequestContext::default()).await;
    assert!(e.is_none());
    assert_eq!(text, "From the cloud.");
    assert_eq!(route.backend, "cloud:cloud");
    assert_eq!(route.model, "big");
    assert!(
        route
            .failover
            .as_deref()
            .unwrap_or("")
            .starts_with("local -> cloud"),
        "{route:?}"
    );
    assert!(
        d.render_metrics()
            .contains("tandem_failovers_total{from=\"local\",to=\"cloud\"")
    );
}

#[tokio::test]
async fn a_broken_stream_is_handed_over_and_continued() {
    let local = Scripted::local(
        "small",
        vec![Step::Answer(pieces("ld, says the device.", 5))],
    );
    let cloud = Scripted::cloud(
        "cloud",
        "big",
        vec![Step::BreakAfter(pieces("Hello wor", 3), err(502))],
    );
    let d = dispatcher(&local, &cloud, cloud_first());
    let (text, e, route) = run(&d, chat("greet me"), RequestContext::default()).await;
    assert!(e.is_none(), "{e:?}");
    assert_eq!(text, "Hello world, says the device.");
    assert_eq!(route.backend, "cloud:cloud");
    // The device continued the same answer from the text already sent.
    let got = local.received();
    let Input::Chat { continue_from, .. } = &got[0].input else {
        panic!("chat")
    };
    assert_eq!(continue_from.as_deref(), Some("Hello wor"));
    assert!(
        d.render_metrics()
            .contains("tandem_handoffs_total{from=\"cloud\",to=\"local\"")
    );
}

fn completion(prompt: &str, extra: serde_json::Value) -> GenerateRequest {
    let mut req = chat("unused");
    req.input = Input::text(prompt);
    req.extra = extra.as_object().cloned().unwrap_or_default();
    req
}

/// A bare prompt's answer is handed over with the text already sent kept
/// apart from the prompt (so the device's grammar reads it as answer); to
/// the cloud, whose completions endpoint would read it as more prompt and
/// start a second value, an answer held to a form is not handed over.
#[tokio::test]
async fn a_bare_prompts_answer_is_handed_over_unless_its_form_would_restart() {
    let local = Scripted::local("small", vec![Step::Answer(pieces("ld.", 2))]);
    let cloud = Scripted::cloud(
        "cloud",
        "big",
        vec![Step::BreakAfter(pieces("Hello wor", 3), err(502))],
    );
    let d = dispatcher(&local, &cloud, cloud_first());
    let (text, e, _) = run(
        &d,
        completion("Say hello.", serde_json::json!({})),
        RequestContext::default(),
    )
    .await;
    assert!(e.is_none(), "{e:?}");
    assert_eq!(text, "Hello world.");
    assert_eq!(
        local.received()[0].input,
        Input::Text {
            prompt: "Say hello.".into(),
            continue_from: Some("Hello wor".into())
        }
    );

    let json = serde_json::json!({"response_format": {"type": "json_object"}});
    for (extra, handed) in [(serde_json::json!({}), true), (json, false)] {
        let local = Scripted::local(
            "small",
            vec![Step::BreakAfter(pieces("{\"a\": ", 2), err(500))],
        )
        .with_features(&[tandem_api::Feature::JsonObject]);
        let cloud = Scripted::cloud("cloud", "big", vec![Step::Answer(pieces("1}", 1))]);
        let d = dispatcher(&local, &cloud, PolicyConfig::default());
        let (text, e, route) = run(
            &d,
            completion("JSON:", extra.clone()),
            RequestContext::default(),
        )
        .await;
        assert_eq!(route.backend, "local", "{extra}");
        assert_eq!(e.is_none(), handed, "{extra}: {e:?}");
        assert_eq!(cloud.received().len(), usize::from(handed), "{extra}");
        if handed {
            assert_eq!(text, "{\"a\": 1}");
            assert_eq!(cloud.received()[0].input.written(), Some("{\"a\": "));
        }
    }
}

#[tokio::test]
async fn the_cascade_keeps_a_sure_answer_and_escalates_an_unsure_one() {
    let local = Scripted::local(
        "small",
        vec![
            Step::Confident(pieces("Sure.", 2), -0.1),
            Step::Confident(pieces("Maybe?", 2), -3.0),
            Step::Confident(pieces("Guess.", 2), -3.0),
        ],
    );
    let cloud = Scripted::cloud(
        "cloud",
        "big",
        vec![
            Step::Answer(pieces("Certainly.", 4)),
            Step::Refuse(err(503)),
        ],
    );
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let ctx = RequestContext {
        mode: Some(Mode::Cascade),
        ..RequestContext::default()
    };
    let (text, _, route) = run(&d, chat("q1"), ctx.clone()).await;
    assert_eq!((text.as_str(), route.backend.as_str()), ("Sure.", "local"));
    assert!(route.cascade.unwrap_or_default().starts_with("kept"));
    let (text, _, route) = run(&d, chat("q2"), ctx.clone()).await;
    assert_eq!(
        (text.as_str(), route.backend.as_str()),
        ("Certainly.", "cloud:cloud")
    );
    assert!(route.cascade.unwrap_or_default().starts_with("escalated"));
    // Unsure again, and the cloud fails: the local answer stands.
    let (text, e, route) = run(&d, chat("q3"), ctx).await;
    assert!(e.is_none());
    assert_eq!((text.as_str(), route.backend.as_str()), ("Guess.", "local"));
    assert!(
        route
            .cascade
            .unwrap_or_default()
            .contains("the local answer stands")
    );
}

#[tokio::test]
async fn an_escalation_goes_on_to_another_replica_before_keeping_the_local_answer() {
    let local = Scripted::local("small", vec![Step::Confident(pieces("Guess.", 2), -3.0)]);
    // Two replicas of one model: the first refuses, the second answers.
    let a = Scripted::cloud("a", "big", vec![Step::Refuse(err(503))]);
    let b = Scripted::cloud("b", "big", vec![Step::Answer(pieces("Certainly.", 4))]);
    let d = Dispatcher::builder()
        .local_arc(local.clone() as Arc<dyn Backend>)
        .cloud_arc(a.clone() as Arc<dyn Backend>)
        .cloud_arc(b.clone() as Arc<dyn Backend>)
        .build()
        .expect("dispatcher");
    let ctx = RequestContext {
        mode: Some(Mode::Cascade),
        ..RequestContext::default()
    };
    let (text, e, route) = run(&d, chat("q"), ctx).await;
    assert!(e.is_none());
    assert_eq!(
        (text.as_str(), route.backend.as_str()),
        ("Certainly.", "cloud:b")
    );
    assert!(route.cascade.unwrap_or_default().starts_with("escalated"));
    let moved = route.failover.unwrap_or_default();
    assert!(moved.starts_with("cloud:a -> cloud:b"), "{moved}");
    assert_eq!((a.received().len(), b.received().len()), (1, 1));
}

#[tokio::test]
async fn the_cascade_escalates_early_and_stops_the_device() {
    // 200 unsure pieces: judged after the first 8, the rest never made.
    let unsure: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    // Sure at first, unsure later: the early look passes, the whole fails.
    let mut fades: Vec<(String, f32)> = (0..8).map(|i| (format!("a{i} "), -0.05)).collect();
    fades.extend((0..24).map(|i| (format!("b{i} "), -4.0)));
    let local = Scripted::local(
        "small",
        vec![
            Step::Confident(unsure, -3.0),
            Step::Scored(fades),
            Step::Confident(pieces("Yes.", 2), -3.0),
        ],
    );
    let cloud = Scripted::cloud("cloud", "big", vec![Step::Answer(pieces("Certainly.", 4))]);
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let ctx = RequestContext {
        mode: Some(Mode::Cascade),
        ..RequestContext::default()
    };
    let (text, e, route) = run(&d, chat("q1"), ctx.clone()).await;
    assert!(e.is_none(), "{e:?}");
    assert_eq!(
        (text.as_str(), route.backend.as_str()),
        ("Certainly.", "cloud:cloud")
    );
    let outcome = route.cascade.unwrap_or_default();
    assert!(outcome.starts_with("escalated early"), "{outcome}");
    assert!(outcome.contains("after 8 tokens"), "{outcome}");
    // The local stream was dropped at the early look (one piece may be in
    // flight), not read to its end.
    assert!(local.pieces_sent() <= 9, "{}", local.pieces_sent());

    let before = local.pieces_sent();
    let (text, _, route) = run(&d, chat("q2"), ctx.clone()).await;
    assert_eq!(text, "Certainly.");
    let outcome = route.cascade.unwrap_or_default();
    assert!(outcome.starts_with("escalated: confidence"), "{outcome}");
    assert_eq!(local.pieces_sent() - before, 32);

    // Shorter than the early look: only the whole answer is judged.
    let (_, _, route) = run(&d, chat("q3"), ctx.clone()).await;
    assert!(
        route
            .cascade
            .unwrap_or_default()
            .starts_with("escalated: confidence")
    );
    let m = d.render_metrics();
    assert!(m.contains("outcome=\"escalated_early\"} 1"), "{m}");
    assert!(m.contains("outcome=\"escalated\"} 2"), "{m}");

    // Off: the whole answer is read.
    let local = Scripted::local(
        "small",
        vec![Step::Confident(
            (0..50).map(|i| format!("w{i} ")).collect(),
            -3.0,
        )],
    );
    let policy = PolicyConfig {
        cascade_early_tokens: 0,
        ..PolicyConfig::default()
    };
    let d = dispatcher(&local, &cloud, policy);
    let (_, _, route) = run(&d, chat("q4"), ctx).await;
    assert!(
        route
            .cascade
            .unwrap_or_default()
            .starts_with("escalated: confidence")
    );
    assert_eq!(local.pieces_sent(), 50);
}

#[tokio::test]
async fn an_early_escalation_whose_cloud_fails_is_answered_by_the_device() {
    let unsure: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let local = Scripted::local("small", vec![Step::Confident(unsure, -3.0)]);
    let cloud = Scripted::cloud("cloud", "big", vec![Step::Refuse(err(503))]);
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let ctx = RequestContext {
        mode: Some(Mode::Cascade),
        ..RequestContext::default()
    };
    let (text, e, route) = run(&d, chat("q"), ctx).await;
    assert!(e.is_none(), "{e:?}");
    let want: String = (0..20).map(|i| format!("w{i} ")).collect();
    assert_eq!(text, want);
    assert_eq!(route.backend, "local");
    let outcome = route.cascade.unwrap_or_default();
    assert!(
        outcome.contains("the local model answers in full"),
        "{outcome}"
    );
    assert_eq!(local.received().len(), 2);
}

#[tokio::test]
async fn redacted_values_leave_as_placeholders_and_come_back_restored() {
    let local = Scripted::local("small", vec![Step::Answer(vec!["unused".into()])]);
    let cloud = Scripted::cloud("cloud", "big", vec![Step::Echo("You wrote: ".into())]);
    let d = dispatcher(&local, &cloud, cloud_first());
    let ctx = RequestContext {
        privacy: Some(PrivacyMode::Redact),
        ..RequestContext::default()
    };
    let prompt = "Mail jane.doe@example.com or call +44 20 7946 0958.";
    let (text, e, route) = run(&d, chat(prompt), ctx).await;
    assert!(e.is_none());
    // The client sees the originals (restored across 3-character pieces)...
    assert_eq!(text, format!("You wrote: {prompt}"));
    assert_eq!(route.redacted.get("email"), Some(&1));
    // ...the cloud saw only placeholders.
    let sent = &cloud.received()[0];
    let Input::Chat { messages, .. } = &sent.input else {
        panic!("chat")
    };
    assert!(
        !messages[0].content.contains("jane.doe"),
        "{}",
        messages[0].content
    );
    assert!(messages[0].content.contains("[EMAIL_1]"));
    assert!(!messages[0].content.contains("7946"));
}

#[tokio::test]
async fn strict_privacy_with_no_local_side_is_a_clear_refusal() {
    let local = Scripted::local("small", vec![Step::Answer(vec!["ok".into()])]);
    let cloud = Scripted::cloud("cloud", "big", vec![Step::Answer(vec!["ok".into()])]);
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let mut req = chat("My SSN is 123-45-6789.");
    req.model = "big".into();
    let ctx = RequestContext {
        privacy: Some(PrivacyMode::Strict),
        ..RequestContext::default()
    };
    let e = match d.dispatch(req, ctx).await {
        Ok(_) => panic!("should be refused"),
        Err(e) => e,
    };
    assert_eq!(e.status, 403);
    assert_eq!(e.code.as_deref(), Some("privacy_policy"));
    assert!(cloud.received().is_empty(), "nothing may leave");
}

#[tokio::test]
async fn a_request_the_local_model_cannot_serve_goes_where_it_can() {
    let local = Scripted::local("small", vec![Step::Answer(vec!["local".into()])]);
    let cloud = Scripted::cloud("cloud", "big", vec![Step::Answer(vec!["cloud".into()])]);
    let d = dispatcher(&local, &cloud, PolicyConfig::default());
    let mut req = chat("what's the weather?");
    req.extra.insert(
        "tools".into(),
        serde_json::json!([{"type": "function", "function": {"name": "weather"}}]),
    );
    let (text, _, route) = run(&d, req, RequestContext::default()).await;
    assert_eq!(text, "cloud");
    assert_eq!(route.decision.side, Locality::Cloud);
    assert!(
        route
            .decision
            .reasons
            .iter()
            .any(|r| r.rule == "capability" && r.detail.contains("tool calling")),
        "{:?}",
        route.decision.reasons
    );
    assert!(local.received().is_empty());
}
