//! Tool calling on the device: what the request asks for (`tools`,
//! `tool_choice`, `parallel_tool_calls`), the grammar that forces a call when
//! one is required, and reading the calls back out of what the model wrote.
//!
//! Models are taught one syntax by their chat template (Qwen2.5 and Hermes
//! wrap a JSON object in `<tool_call>` tags, Llama 3.x writes bare JSON
//! with `parameters` or a `<|python_tag|>` line, Mistral writes
//! `[TOOL_CALLS]` and an array) but small models drift: Qwen2.5-Coder mostly
//! answers with the call in a fenced JSON block. The parser reads every one
//! of these forms, and accepts a call only when it names a tool the request
//! offered, so an answer that merely contains JSON stays an answer.

use futures::StreamExt;
use serde_json::{Map, Value, json};
use tandem_api::{ApiError, Delta, Event, EventStream, FinishReason, FunctionDelta, ToolCallDelta};

/// The tool-call syntax a chat template teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` (Qwen2.5, Hermes).
    Hermes,
    /// A bare JSON object (Llama 3.x, and templates that say nothing).
    Json,
}

impl Syntax {
    /// The syntax `template` (its Jinja source) teaches.
    pub fn of_template(template: &str) -> Syntax {
        if template.contains("<tool_call>") {
            Syntax::Hermes
        } else {
            Syntax::Json
        }
    }
}

/// One function the request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// The JSON schema of its arguments.
    pub parameters: Value,
}

/// What the request asks of tool calling.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// The tools offered (all of them, even when one is forced).
    pub tools: Vec<Tool>,
    /// `auto` (None), `required`, or one named function.
    pub forced: Forced,
    /// More than one call per answer.
    pub parallel: bool,
}

/// `tool_choice`, beyond `auto` and `none`.
#[derive(Debug, Clone, PartialEq)]
pub enum Forced {
    /// The model decides.
    Auto,
    /// The answer is one or more calls, of any tool.
    Required,
    /// The answer is a call of this tool.
    Named(String),
}

impl ToolRequest {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls` from a
    /// request's extra fields. `None`: no tools, or `tool_choice: "none"`
    /// (the model then answers in words and its template never sees them).
    pub fn from_extra(extra: &Map<String, Value>) -> Result<Option<ToolRequest>, ApiError> {
        let Some(list) = extra.get("tools").and_then(Value::as_array) else {
            return Ok(None);
        };
        if list.is_empty() {
            return Ok(None);
        }
        let mut tools = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let f = t.get("function").ok_or_else(|| {
                ApiError::invalid_param(
                    &format!("tools[{i}]"),
                    "each tool needs a `function` with a `name`",
                )
            })?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        &format!("tools[{i}].function.name"),
                        "each function needs a non-empty `name`",
                    )
                })?;
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        &format!("tools[{i}].function.parameters"),
                        "`parameters` must be a JSON schema object",
                    ));
                }
            };
            tools.push(Tool {
                name: name.to_owned(),
                parameters,
            });
        }
        let forced = match extra.get("tool_choice") {
            None | Some(Value::Null) => Forced::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Forced::Auto,
                "none" => return Ok(None),
                "required" => Forced::Required,
                other => {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!(
                            "unknown tool_choice `{other}`: use none, auto, required or a named function"
                        ),
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "tool_choice",
                            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!("tool_choice names `{name}`, which is not among the tools"),
                    ));
                }
                Forced::Named(name.to_owned())
            }
        };
        let parallel = extra
            .get("parallel_tool_calls")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Ok(Some(ToolRequest {
            tools,
            forced,
            parallel,
        }))
    }

    /// The grammar (llguidance's Lark dialect) an answer must follow when a
    /// call is forced; `None` under `auto`.
    pub fn grammar(&self, syntax: Syntax) -> Option<String> {
        let candidates: Vec<&Tool> = match &self.forced {
            Forced::Auto => return None,
            Forced::Required => self.tools.iter().collect(),
            Forced::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
        };
        let schemas: Vec<Value> = candidates
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        "arguments": t.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut call = match schemas.len() {
            1 => schemas.into_iter().next().unwrap_or_default(),
            _ => json!({ "anyOf": schemas }),
        };
        crate::structured::prepare(&mut call);
        if let Value::Object(m) = &mut call {
            m.insert("x-guidance".into(), crate::structured::json_options());
        }
        let call = call.to_string();
        let many = self.parallel && !matches!(self.forced, Forced::Named(_));
        Some(match syntax {
            Syntax::Hermes => format!(
                "start: call{rep}\ncall: \"<tool_call>\\n\" %json {call} \"\\n</tool_call>\"{sep}\n",
                rep = if many { "+" } else { "" },
                sep = if many { " \"\\n\"?" } else { "" },
            ),
            Syntax::Json => format!("start: %json {call}\n"),
        })
    }

    fn knows(&self, name: &str) -> bool {
        self.tools.iter().any(|t| t.name == name)
    }
}

/// A call read out of the model's text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments, as the JSON text OpenAI's `arguments` carries.
    pub arguments: String,
}

/// An answer split into words and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Text outside the calls, as written (the separators around the calls
    /// included).
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<ParsedCall>,
}

/// Marks that open a call in some model family's syntax.
const OPENERS: [&str; 4] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```"];

/// Reads the calls `text` makes of `req`'s tools, in any syntax the
/// families use. Text that holds no call comes back whole as content.
pub fn parse(text: &str, req: &ToolRequest) -> Parsed {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    loop {
        let Some((at, opener)) = next_opener(rest) else {
            content.push_str(rest);
            break;
        };
        let (before, from) = rest.split_at(at);
        let body = &from[opener.len()..];
        let (found, consumed) = match opener {
            "```" => fenced(body, req),
            _ => after_marker(body, opener, req),
        };
        if found.is_empty() {
            // Not a call after all: keep the opener as text and go on.
            content.push_str(before);
            content.push_str(opener);
            rest = body;
            continue;
        }
        content.push_str(before);
        calls.extend(found);
        rest = &body[consumed..];
    }
    if calls.is_empty() {
        // The whole answer may be the call itself (Llama 3.x, drifted
        // Qwen): one object or an array of them.
        let trimmed = text.trim();
        if let Ok(v) = serde_json::from_str::<Value>(trimmed)
            && let Some(mut found) = calls_in(&v, req)
        {
            if !req.parallel {
                found.truncate(1);
            }
            return Parsed {
                content: String::new(),
                calls: found,
            };
        }
        return Parsed {
            content: text.to_owned(),
            calls,
        };
    }
    if !req.parallel {
        calls.truncate(1);
    }
    Parsed { content, calls }
}

fn next_opener(text: &str) -> Option<(usize, &'static str)> {
    OPENERS
        .iter()
        .filter_map(|o| text.find(o).map(|i| (i, *o)))
        .min_by_key(|&(i, _)| i)
}

/// Calls right after `<tool_call>`, `[TOOL_CALLS]` or `<|python_tag|>`:
/// JSON values, up to the closing tag when there is one.
fn after_marker(body: &str, opener: &str, req: &ToolRequest) -> (Vec<ParsedCall>, usize) {
    let lead = body.len() - body.trim_start().len();
    let Some((value, len)) = json_prefix(&body[lead..]) else {
        return (Vec::new(), 0);
    };
    let Some(found) = calls_in(&value, req) else {
        return (Vec::new(), 0);
    };
    let mut end = lead + len;
    if opener == "<tool_call>" {
        let after = &body[end..];
        let gap = after.len() - after.trim_start().len();
        if after[gap..].starts_with("</tool_call>") {
            end += gap + "</tool_call>".len();
        }
    }
    (found, end)
}

/// Calls in a fenced block: ```` ```json\n{...}\n``` ````.
fn fenced(body: &str, req: &ToolRequest) -> (Vec<ParsedCall>, usize) {
    let Some(nl) = body.find('\n') else {
        return (Vec::new(), 0);
    };
    let lang = body[..nl].trim();
    if !(lang.is_empty() || lang.eq_ignore_ascii_case("json")) {
        return (Vec::new(), 0);
    }
    let inner = &body[nl + 1..];
    let (block, end) = match inner.find("```") {
        Some(close) => (&inner[..close], nl + 1 + close + 3),
        None => (inner, body.len()),
    };
    match serde_json::from_str::<Value>(block.trim())
        .ok()
        .and_then(|v| calls_in(&v, req))
    {
        Some(found) => (found, end),
        None => (Vec::new(), 0),
    }
}

/// The JSON value at the start of `s` and its length in bytes.
fn json_prefix(s: &str) -> Option<(Value, usize)> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let v = it.next()?.ok()?;
    Some((v, it.byte_offset()))
}

/// The calls a JSON value holds: one call object or an array of them;
/// `None` when any part is not a call of an offered tool.
fn calls_in(v: &Value, req: &ToolRequest) -> Option<Vec<ParsedCall>> {
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(|i| call_in(i, req)).collect(),
        Value::Object(_) => call_in(v, req).map(|c| vec![c]),
        _ => None,
    }
}

fn call_in(v: &Value, req: &ToolRequest) -> Option<ParsedCall> {
    // OpenAI's own shape, which models echo from their context.
    let v = v.get("function").filter(|f| f.is_object()).unwrap_or(v);
    let name = v.get("name")?.as_str()?;
    if !req.knows(name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(_)) => s.clone(),
            _ => return None,
        },
        Some(o @ Value::Object(_)) => o.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall {
        name: name.to_owned(),
        arguments,
    })
}

/// How many bytes at the end of `text` could be the start of an opener, or
/// of a JSON call at the very start of the answer: text held back while
/// streaming, until it is known to be words.
pub fn held_back(text: &str, at_start: bool) -> usize {
    if at_start {
        let t = text.trim_start();
        if t.is_empty() || t.starts_with('{') || t.starts_with('[') {
            return text.len();
        }
    }
    OPENERS
        .iter()
        .map(|o| {
            (1..o.len())
                .rev()
                .find(|&k| text.ends_with(&o[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

/// Where in `text` a call may begin (an opener): from there on the stream
/// holds everything back until the answer ends.
pub fn call_start(text: &str) -> Option<usize> {
    next_opener(text).map(|(i, _)| i)
}

/// The engine's events with the calls read out: words stream as they
/// come, except text that may open a call, which is held until the answer
/// ends and then sent as `tool_calls` deltas (the id, type and name first,
/// then the arguments, as OpenAI streams them) with `finish_reason:
/// "tool_calls"` — or as words, if it was not a call after all.
pub fn calls_from(mut events: EventStream, req: ToolRequest) -> EventStream {
    Box::pin(async_stream::stream! {
        let mut said_something = false;
        let mut pending = String::new();
        let mut pending_tokens = Vec::new();
        let mut capturing = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Delta(d)) => {
                    pending.push_str(&d.text);
                    pending_tokens.extend(d.tokens);
                    if capturing {
                        continue;
                    }
                    let at_start = !said_something;
                    let cut = match call_start(&pending) {
                        Some(i) => {
                            capturing = true;
                            i
                        }
                        None => pending.len() - held_back(&pending, at_start),
                    };
                    if at_start && pending.trim_start().starts_with(['{', '[']) {
                        capturing = true;
                        continue;
                    }
                    if cut > 0 && pending.is_char_boundary(cut) {
                        let rest = pending.split_off(cut);
                        let text = std::mem::replace(&mut pending, rest);
                        said_something |= !text.trim().is_empty();
                        yield Ok(Event::Delta(Delta {
                            text,
                            tokens: std::mem::take(&mut pending_tokens),
                            ..Delta::default()
                        }));
                    }
                }
                Ok(Event::Finish(mut f)) => {
                    let parsed = if pending.is_empty() { Parsed::default() } else { parse(&pending, &req) };
                    if parsed.calls.is_empty() {
                        if !pending.is_empty() {
                            yield Ok(Event::Delta(Delta {
                                text: std::mem::take(&mut pending),
                                tokens: std::mem::take(&mut pending_tokens),
                                ..Delta::default()
                            }));
                        }
                    } else {
                        // The separators around the calls are not words.
                        let words = if said_something {
                            parsed.content.trim_end()
                        } else {
                            parsed.content.trim()
                        };
                        if !words.is_empty() {
                            yield Ok(Event::Delta(Delta::text(words)));
                        }
                        // The call's tokens travel with its first piece: a
                        // cascade judges the call by their log-probabilities.
                        let mut tokens = std::mem::take(&mut pending_tokens);
                        for (i, call) in parsed.calls.into_iter().enumerate() {
                            let index = u32::try_from(i).unwrap_or(u32::MAX);
                            yield Ok(Event::Delta(Delta {
                                tokens: std::mem::take(&mut tokens),
                                tool_calls: vec![ToolCallDelta {
                                    index,
                                    id: Some(call_id()),
                                    kind: Some("function".into()),
                                    function: Some(FunctionDelta {
                                        name: Some(call.name),
                                        arguments: Some(String::new()),
                                    }),
                                }],
                                ..Delta::default()
                            }));
                            yield Ok(Event::Delta(Delta {
                                tool_calls: vec![ToolCallDelta {
                                    index,
                                    function: Some(FunctionDelta {
                                        name: None,
                                        arguments: Some(call.arguments),
                                    }),
                                    ..ToolCallDelta::default()
                                }],
                                ..Delta::default()
                            }));
                        }
                        f.reason = FinishReason::ToolCalls;
                    }
                    yield Ok(Event::Finish(f));
                    return;
                }
                Err(e) => {
                    yield Err(e);
                    return;
                }
            }
        }
    })
}

/// A call id in OpenAI's shape (`call_` and 24 letters and digits).
fn call_id() -> String {
    let mut id = String::from("call_");
    id.extend((0..24).map(|_| fastrand::alphanumeric()));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolRequest {
        let extra = json!({
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "get_time"}}
            ]
        });
        ToolRequest::from_extra(extra.as_object().unwrap())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn reads_hermes_tags() {
        let p = parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            &weather(),
        );
        assert_eq!(p.content.trim(), "Let me check.");
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].name, "get_weather");
        assert_eq!(p.calls[0].arguments, r#"{"city":"Paris"}"#);
    }

    #[test]
    fn reads_parallel_tags_and_an_unclosed_last_one() {
        let p = parse(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}",
            &weather(),
        );
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.content.trim(), "");
        assert_eq!(p.calls[1].name, "get_time");
    }

    #[test]
    fn reads_fenced_json_bare_json_llama_and_mistral_forms() {
        let req = weather();
        for text in [
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n```",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}",
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}",
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}}",
        ] {
            let p = parse(text, &req);
            assert_eq!(p.calls.len(), 1, "{text}");
            let args: Value = serde_json::from_str(&p.calls[0].arguments).unwrap();
            assert_eq!(args, json!({"city": "Rome"}), "{text}");
        }
    }

    #[test]
    fn json_answers_and_unknown_functions_stay_words() {
        let req = weather();
        for text in [
            "{\"city\": \"Rome\"}",
            "```json\n{\"name\": \"delete_all\", \"arguments\": {}}\n```",
            "```python\nprint('hi')\n```",
            "Use <tool_call> tags.",
            "",
        ] {
            let p = parse(text, &req);
            assert!(p.calls.is_empty(), "{text}");
            assert_eq!(p.content, text);
        }
    }

    #[test]
    fn one_call_when_parallel_calls_are_off() {
        let mut req = weather();
        req.parallel = false;
        let p = parse(
            "[{\"name\": \"get_time\"}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}]",
            &req,
        );
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.calls[0].name, "get_time");
        let p = parse(
            "<tool_call>{\"name\": \"get_time\"}</tool_call><tool_call>{\"name\": \"get_time\"}</tool_call>",
            &req,
        );
        assert_eq!(p.calls.len(), 1);
    }

    #[test]
    fn tool_choice_is_read_and_checked() {
        let mk = |choice: Value| {
            let extra = json!({
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": choice,
            });
            ToolRequest::from_extra(extra.as_object().unwrap())
        };
        assert_eq!(mk(json!("none")).unwrap(), None);
        assert_eq!(
            mk(json!("required")).unwrap().unwrap().forced,
            Forced::Required
        );
        assert_eq!(
            mk(json!({"type": "function", "function": {"name": "f"}}))
                .unwrap()
                .unwrap()
                .forced,
            Forced::Named("f".into())
        );
        assert_eq!(
            mk(json!({"type": "function", "function": {"name": "g"}}))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(mk(json!("sometimes")).unwrap_err().status, 400);
    }

    #[test]
    fn streaming_holds_back_what_may_open_a_call() {
        assert_eq!(held_back("Sure, <tool_", false), 6);
        assert_eq!(held_back("Sure.", false), 0);
        assert_eq!(held_back("  {\"na", true), 6);
        assert_eq!(held_back("Hello `", false), 1);
        assert_eq!(call_start("ok <tool_call>{"), Some(3));
    }

    #[test]
    fn forced_grammars_name_the_tools() {
        let mut req = weather();
        req.forced = Forced::Named("get_weather".into());
        let g = req.grammar(Syntax::Hermes).unwrap();
        assert!(
            g.contains("<tool_call>") && g.contains("get_weather") && !g.contains("get_time"),
            "{g}"
        );
        req.forced = Forced::Required;
        let g = req.grammar(Syntax::Json).unwrap();
        assert!(g.contains("anyOf"), "{g}");
        req.forced = Forced::Auto;
        assert_eq!(req.grammar(Syntax::Hermes), None);
    }
}
