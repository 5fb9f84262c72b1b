//! Parsing and checking requests.
use super::*;
use crate::{ApiError, GenerateRequest, Input};

fn chat(json: &str) -> Result<GenerateRequest, ApiError> {
    serde_json::from_str::<ChatCompletionRequest>(json)
        .unwrap()
        .into_generate()
}

#[test]
fn minimal_chat_request() {
    let g = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
    assert_eq!(g.model, "m");
    assert!(!g.stream);
    assert_eq!(g.max_tokens, None);
}

#[test]
fn content_parts_are_joined() {
    let g = chat(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
    )
    .unwrap();
    let Input::Chat { messages, .. } = g.input else {
        panic!()
    };
    assert_eq!(messages[0].content, "ab");
}

#[test]
fn images_audio_and_files_are_kept_in_order_for_upstreams() {
    let g = chat(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what is "},{"type":"image_url","image_url":{"url":"https://e.com/a.png","detail":"low"}},{"type":"text","text":"this?"},{"type":"input_audio","input_audio":{"data":"UklG","format":"wav"}},{"type":"file","file":{"file_id":"f1"}}]}]}"#,
    )
    .unwrap();
    let needs = crate::Feature::needed_by(&g);
    for f in [
        crate::Feature::Images,
        crate::Feature::Audio,
        crate::Feature::Files,
    ] {
        assert!(needs.contains(&f), "{f:?} not in {needs:?}");
    }
    let Input::Chat { messages, .. } = &g.input else {
        panic!()
    };
    // A local model reads the text; an upstream gets the parts as sent.
    assert_eq!(messages[0].content, "what is this?");
    let back = serde_json::to_value(g.to_chat_request("up")).unwrap();
    let parts = &back["messages"][0]["content"];
    assert_eq!(
        parts[0],
        serde_json::json!({"type": "text", "text": "what is "})
    );
    assert_eq!(
        parts[1],
        serde_json::json!({"type": "image_url", "image_url": {"url": "https://e.com/a.png", "detail": "low"}})
    );
    assert_eq!(parts[3]["input_audio"]["format"], "wav");
    assert_eq!(parts[4]["file"]["file_id"], "f1");
    // An image alone is content enough.
    assert!(
        chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://e.com/a.png"}}]}]}"#)
            .is_ok()
    );
    // Text parts alone stay plain text.
    let g = chat(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}"#,
    )
    .unwrap();
    assert_eq!(crate::Feature::needed_by(&g), vec![crate::Feature::Chat]);
}

#[test]
fn malformed_parts_name_their_place() {
    let e = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#)
        .unwrap_err();
    assert_eq!(e.status, 400);
    assert_eq!(e.param.as_deref(), Some("messages[0].content[0].text"));
    let e = chat(r#"{"model":"m","messages":[{"role":"user","content":[]}]}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0]"));
}

#[test]
fn bad_values_name_their_param() {
    let cases = [
        (r#"{"model":"m","messages":[]}"#, "messages"),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
            "temperature",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#,
            "max_tokens",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
            "top_p",
        ),
        (
            r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
            "messages[0]",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":""}]}"#,
            "messages[0]",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#,
            "top_logprobs",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#,
            "n",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":129}"#,
            "n",
        ),
    ];
    for (json, param) in cases {
        let e = chat(json).unwrap_err();
        assert_eq!(e.status, 400, "{json}");
        assert_eq!(e.param.as_deref(), Some(param), "{json}");
    }
}

#[test]
fn unknown_fields_are_kept_for_upstreams() {
    let g =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"user":"u1"}"#).unwrap();
    assert_eq!(g.extra["user"], "u1");
    let back = serde_json::to_value(g.to_chat_request("up")).unwrap();
    assert_eq!(back["user"], "u1");
    assert_eq!(back["model"], "up");
}

#[test]
fn continue_final_message_becomes_a_continuation() {
    let g = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"The ans"}],"continue_final_message":true,"add_generation_prompt":false}"#,
    )
    .unwrap();
    let Input::Chat {
        messages,
        continue_from,
    } = g.input
    else {
        panic!()
    };
    assert_eq!(messages.len(), 1);
    assert_eq!(continue_from.as_deref(), Some("The ans"));
    assert!(g.extra.is_empty());
    // And back out to an upstream, the same convention.
}

#[test]
fn completion_defaults_to_16_tokens() {
    let c: CompletionRequest = serde_json::from_str(r#"{"model":"m","prompt":"x"}"#).unwrap();
    assert_eq!(c.into_generate().unwrap().max_tokens, Some(16));
}
