//! Tools and structured outputs on a real model whose template renders
//! tools (Qwen2.5-Coder 0.5B): forced calls and schemas always parse and
//! match; `auto` reads what the model meant; what cannot be enforced is a
//! 400, never an unconstrained answer.

use std::sync::OnceLock;

use serde_json::{Value, json};
use tandem_api::{
    Answer, Backend, Feature, FinishReason, GenerateRequest, Input, Message, Sampling,
};
use tandem_engine::{EngineConfig, LocalEngine};
use tandem_testkit::{QWEN_05B, SMOLLM2, model_path};

fn qwen() -> &'static LocalEngine {
    static E: OnceLock<LocalEngine> = OnceLock::new();
    E.get_or_init(|| {
        let mut cfg = EngineConfig::new(QWEN_05B, model_path(QWEN_05B));
        cfg.context = Some(2048);
        LocalEngine::load(cfg).expect("load")
    })
}

fn request(messages: Vec<Message>, extra: Value) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        model: QWEN_05B.into(),
        input: Input::Chat {
            messages,
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(160),
        stop: vec![],
        logprobs: None,
        stream: false,
        include_usage: false,
        extra: extra.as_object().cloned().unwrap_or_default(),
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Current local time in a timezone",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
    ])
}

async fn answer(req: GenerateRequest) -> Answer {
    Answer::collect(qwen().submit(req).expect("submit"))
        .await
        .expect("answer")
}

#[tokio::test]
async fn the_template_declares_tools_and_every_model_takes_grammars() {
    let caps = qwen().capabilities();
    for f in [
        Feature::Tools,
        Feature::JsonObject,
        Feature::JsonSchema,
        Feature::LogitBias,
    ] {
        assert!(caps.supports(f), "{f:?} in {caps:?}");
    }
    let smol = LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).unwrap();
    assert!(!smol.capabilities().supports(Feature::Tools));
    assert!(smol.capabilities().supports(Feature::JsonSchema));
}

#[tokio::test]
async fn a_named_tool_choice_always_yields_a_call_matching_its_schema() {
    for question in [
        "What's the weather like in Paris today?",
        "Tell me a joke about penguins.",
        "¿Qué hora es en Tokio? 東京の天気は？",
    ] {
        let a = answer(request(
            vec![Message::new("user", question)],
            json!({"tools": weather_tools(),
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ))
        .await;
        assert_eq!(
            a.finish.reason,
            FinishReason::ToolCalls,
            "{question}: {a:?}"
        );
        assert_eq!(a.tool_calls.len(), 1, "{a:?}");
        let call = &a.tool_calls[0];
        assert_eq!(call.function.name, "get_weather");
        assert!(call.id.starts_with("call_"));
        let args: Value = serde_json::from_str(&call.function.arguments).expect("arguments parse");
        let obj = args.as_object().expect("an object");
        assert!(obj["city"].is_string(), "{args}");
        assert!(
            ["celsius", "fahrenheit"].contains(&obj["unit"].as_str().unwrap()),
            "{args}"
        );
        assert_eq!(obj.len(), 2, "no properties beyond the schema: {args}");
    }
}

#[tokio::test]
async fn required_calls_some_tool_and_a_full_loop_answers_from_the_result() {
    let tools = weather_tools();
    let first = answer(request(
        vec![Message::new("user", "What time is it in Tokyo?")],
        json!({"tools": tools, "tool_choice": "required", "parallel_tool_calls": false}),
    ))
    .await;
    assert_eq!(first.finish.reason, FinishReason::ToolCalls, "{first:?}");
    assert_eq!(first.tool_calls.len(), 1);
    let call = &first.tool_calls[0];
    assert_eq!(call.function.name, "get_time", "{call:?}");

    // The call and its result go back through the template.
    let mut assistant = Message::new("assistant", "");
    assistant.extra.insert(
        "tool_calls".into(),
        serde_json::to_value(&first.tool_calls).unwrap(),
    );
    let mut result = Message::new("tool", "{\"time\": \"14:05\"}");
    result
        .extra
        .insert("tool_call_id".into(), Value::String(call.id.clone()));
    let req = request(
        vec![
            Message::new("user", "What time is it in Tokyo?"),
            assistant,
            result,
        ],
        json!({"tools": tools}),
    );
    let rendered = qwen().render_request(&req).unwrap();
    assert!(
        rendered.contains("<tool_response>\n{\"time\": \"14:05\"}"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\"arguments\": {"),
        "past arguments render as an object, not a string: {rendered}"
    );
    let second = answer(req).await;
    assert_eq!(second.finish.reason, FinishReason::Stop, "{second:?}");
    assert!(second.tool_calls.is_empty());
    assert!(
        second.text.contains("14:05") || second.text.contains("2:05"),
        "{second:?}"
    );
}

#[tokio::test]
async fn auto_reads_the_call_the_model_makes_and_leaves_words_alone() {
    let a = answer(request(
        vec![Message::new(
            "user",
            "What's the weather in Berlin in celsius?",
        )],
        json!({"tools": weather_tools()}),
    ))
    .await;
    assert_eq!(a.finish.reason, FinishReason::ToolCalls, "{a:?}");
    assert_eq!(a.tool_calls[0].function.name, "get_weather");
    let args: Value = serde_json::from_str(&a.tool_calls[0].function.arguments).unwrap();
    assert_eq!(args["city"], "Berlin", "{args}");

    let words = answer(request(
        vec![Message::new("user", "Say hello in French, one word.")],
        json!({"tools": weather_tools(), "tool_choice": "none"}),
    ))
    .await;
    assert!(words.tool_calls.is_empty());
    assert_eq!(words.finish.reason, FinishReason::Stop);
    assert!(!words.text.is_empty());
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "employed": {"type": "boolean"}
        },
        "required": ["name", "age", "languages", "employed"],
        "additionalProperties": false
    })
}

#[tokio::test]
async fn json_schema_answers_parse_and_validate() {
    for prompt in [
        "Marie Curie was a physicist who spoke Polish and French. Describe her as JSON.",
        "Write a haiku about the sea.",
    ] {
        let a = answer(request(
            vec![Message::new("user", prompt)],
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "person", "strict": true, "schema": schema()}}}),
        ))
        .await;
        assert_eq!(a.finish.reason, FinishReason::Stop, "{a:?}");
        let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {}", a.text));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{v}");
        assert!(o["name"].is_string());
        let age = o["age"].as_i64().expect("integer age");
        assert!((0..=150).contains(&age));
        assert!(o["languages"].as_array().unwrap().len() <= 5);
        assert!(o["employed"].is_boolean());
    }
    let a = answer(request(
        vec![Message::new("user", "List three colours.")],
        json!({"response_format": {"type": "json_object"}}),
    ))
    .await;
    let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {}", a.text));
    assert!(v.is_object(), "{v}");
}

/// A grammar bounds no digits, and SmolLM2 (the default device model),
/// greedy, writes `"ratio": 2880…0001` (58 digits), a count of 43 digits
/// and `1.0E+38475` (infinity) for these prompts unguarded. Guarded, every
/// number it writes is a finite double with at most 15 digits a part.
#[tokio::test]
async fn a_small_model_writes_only_numbers_a_double_holds() {
    let smol = LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).unwrap();
    let stats = json!({"type": "object",
        "properties": {"mean": {"type": "number"}, "ratio": {"type": "number"}, "count": {"type": "integer"}},
        "required": ["mean", "ratio", "count"], "additionalProperties": false});
    let mut seen = Vec::new();
    for prompt in [
        "What is pi to many places? Give it as the price of a pie.",
        "What is the square root of 2?",
        "How many stars are in the galaxy?",
    ] {
        let mut req = request(
            vec![Message::new("user", prompt)],
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "stats", "strict": true, "schema": stats}}}),
        );
        req.model = SMOLLM2.into();
        req.max_tokens = Some(200);
        let a = Answer::collect(smol.submit(req).unwrap()).await.unwrap();
        assert_eq!(a.finish.reason, FinishReason::Stop, "{a:?}");
        let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {}", a.text));
        assert!(v["count"].is_i64() || v["count"].is_u64(), "{v}");
        assert_eq!(
            tandem_testkit::oversized_numbers(&a.text),
            Vec::<String>::new(),
            "{}",
            a.text
        );
        seen.extend(tandem_testkit::json_numbers(&a.text));
    }
    assert!(seen.len() >= 9, "{seen:?}");
    // A schema that names a longer number is not guarded: the constant is
    // written whole. One beyond 2^53, which the grammar could only write as
    // another number, is refused.
    let id = |n: Value| {
        let mut req = request(
            vec![Message::new("user", "Give the id.")],
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "id", "strict": true,
                "schema": {"type": "object", "properties": {"id": {"const": n}},
                           "required": ["id"], "additionalProperties": false}}}}),
        );
        req.model = SMOLLM2.into();
        req
    };
    let a = Answer::collect(smol.submit(id(json!(1234567890123456u64))).unwrap())
        .await
        .unwrap();
    assert_eq!(
        tandem_testkit::json_numbers(&a.text),
        ["1234567890123456"],
        "{a:?}"
    );
    let why = smol
        .refusal(&id(json!(12345678901234567890u64)))
        .expect("refused");
    assert!(
        why.contains("12345678901234567890") && why.contains("2^53"),
        "{why}"
    );
    let err = smol
        .submit(id(json!(-9007199254740993i64)))
        .err()
        .expect("refused");
    assert_eq!(
        (err.status, err.param.as_deref()),
        (400, Some("response_format"))
    );
}

/// The constraints vLLM's and llama.cpp's servers take beside
/// `response_format` are applied too, never silently dropped: a client
/// that moves from either keeps its answers' shape.
#[tokio::test]
async fn vllm_and_llama_cpp_constraint_fields_are_applied() {
    let ask = |extra: Value| {
        request(
            vec![Message::new(
                "user",
                "Marie Curie was a physicist who spoke Polish and French. Describe her.",
            )],
            extra,
        )
    };
    let valid = jsonschema::validator_for(&schema()).unwrap();
    for extra in [
        json!({"guided_json": schema()}),
        json!({"guided_json": schema().to_string()}),
        json!({"json_schema": schema()}),
        json!({"structured_outputs": {"json": schema()}}),
    ] {
        let a = answer(ask(extra.clone())).await;
        let v: Value =
            serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {a:?} for {extra}"));
        assert!(valid.is_valid(&v), "{v} for {extra}");
    }
    let code = regex::Regex::new("^[A-Z]{2}-[0-9]{4}$").unwrap();
    for extra in [
        json!({"guided_regex": "[A-Z]{2}-[0-9]{4}"}),
        json!({"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}}),
    ] {
        let a = answer(ask(extra.clone())).await;
        assert!(code.is_match(&a.text), "{:?} for {extra}", a.text);
    }
    let options = ["physicist", "chemist (and physicist)", "poet"];
    for extra in [
        json!({"guided_choice": options}),
        json!({"structured_outputs": {"choice": options}}),
    ] {
        let a = answer(ask(extra.clone())).await;
        assert!(
            options.contains(&a.text.as_str()),
            "{:?} for {extra}",
            a.text
        );
    }
    // GBNF as llama.cpp's server takes it (a rule over several lines, a
    // comment, classes, a bounded repetition, a rule named with capitals)
    // and as vLLM's xgrammar takes it; Lark as vLLM's llguidance takes it.
    let list = "# three short items\nroot ::= Item{3}\nItem ::=\n  \"- \" [A-Za-z]\n  [a-z ]{0,20} \"\\n\"";
    let items = regex::Regex::new("^(- [A-Za-z][a-z ]{0,20}\n){3}$").unwrap();
    let a = answer(ask(json!({"grammar": list}))).await;
    assert!(items.is_match(&a.text), "{:?}", a.text);
    for (extra, shape) in [
        (
            json!({"grammar": "root ::= \"yes\" | \"no\""}),
            "^(yes|no)$",
        ),
        (
            json!({"guided_grammar": "root ::= (\"ye\" | \"n\") \"s\"?"}),
            "^(ye|n)s?$",
        ),
        (
            json!({"guided_grammar": "start: \"yes\" | \"no\""}),
            "^(yes|no)$",
        ),
        (
            json!({"structured_outputs": {"grammar": "root ::= [yn] [eo] \"s\"?"}}),
            "^[yn][eo]s?$",
        ),
    ] {
        let a = answer(ask(extra.clone())).await;
        let shape = regex::Regex::new(shape).unwrap();
        assert!(shape.is_match(&a.text), "{:?} for {extra}", a.text);
    }
    // A grammar that cannot be read is a 400 that says where, so that
    // `tandem/auto` sends it where it can be read (a token reference names
    // one model's vocabulary: a llama.cpp server of that model may apply it).
    let bad = ask(json!({"grammar": "root ::= <[1000]> \"x\""}));
    let why = qwen().refusal(&bad).expect("refused");
    assert!(
        why.contains("token references") && why.contains("line 1, column 10"),
        "{why}"
    );
    let err = qwen().submit(bad).err().expect("refused");
    assert_eq!((err.status, err.param.as_deref()), (400, Some("grammar")));
    for (extra, field) in [
        (json!({"guided_regex": "[a-z"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"guided_grammar": "root ::= missing"}),
            "guided_grammar",
        ),
        (
            json!({"guided_grammar": "start: missing"}),
            "guided_grammar",
        ),
        (json!({"guided_json": "not json"}), "guided_json"),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
        (
            json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
            "guided_regex",
        ),
    ] {
        let err = qwen().submit(ask(extra.clone())).err().expect("refused");
        assert_eq!(
            (err.status, err.param.as_deref()),
            (400, Some(field)),
            "{extra}: {}",
            err.message
        );
    }
}

/// A continued answer (another side's, handed over mid-stream) is read by
/// the grammar first: the model finishes that value instead of writing a
/// second one after it, in a chat and after a bare prompt. A start that
/// does not keep to the schema is a 400.
#[tokio::test]
async fn a_continued_answer_is_finished_within_its_schema() {
    const ASK: &str =
        "Marie Curie was a physicist who spoke Polish and French. Describe her as JSON.";
    let with_start = |start: &str, chat: bool| {
        let mut req = request(
            vec![Message::new("user", ASK)],
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "person", "strict": true, "schema": schema()}}}),
        );
        if !chat {
            req.input = Input::text(format!("{ASK}\nJSON: "));
        }
        req.input.continue_with(start);
        req
    };
    let starts = [
        "{\"name\": \"Marie Cu",
        "{\n  \"name\": \"Marie Curie\",\n  \"age\": 6",
        "{\"name\": \"Marie Curie\", \"age\": 66, \"languages\": [\"Polish\"",
        // Deeper than the device lets its own model indent.
        "{\n                        \"name\": \"Marie Curie\",\n                        \"age\": 66",
    ];
    let asked = starts
        .iter()
        .map(|s| (*s, true))
        .chain([(starts[0], false), (starts[2], false)]);
    for (start, chat) in asked {
        let a = answer(with_start(start, chat)).await;
        assert_eq!(a.finish.reason, FinishReason::Stop, "{a:?}");
        let whole = format!("{start}{}", a.text);
        let v: Value =
            serde_json::from_str(&whole).unwrap_or_else(|e| panic!("chat {chat}: {e}: {whole}"));
        let valid = jsonschema::validator_for(&schema()).unwrap();
        assert!(valid.is_valid(&v), "{v}");
        assert!(v["name"].as_str().unwrap().starts_with("Marie Cu"), "{v}");
    }
    let err = qwen()
        .submit(with_start("[1, 2", false))
        .err()
        .expect("refused");
    assert_eq!(
        (err.status, err.param.as_deref()),
        (400, Some("response_format")),
        "{}",
        err.message
    );
    assert!(err.message.contains("continue"), "{}", err.message);
}

/// Pydantic's tagged union (`Union[Cat, Dog] = Field(discriminator=...)`,
/// its schema exactly as pydantic 2.14 writes it): a `oneOf` over `$ref`s
/// whose branches a required constant tells apart.
fn pets() -> Value {
    json!({"$defs": {
        "Cat": {"properties": {"pet_type": {"const": "cat", "title": "Pet Type", "type": "string"},
                               "meows": {"title": "Meows", "type": "integer"}},
                "required": ["pet_type", "meows"], "title": "Cat", "type": "object"},
        "Dog": {"properties": {"pet_type": {"const": "dog", "title": "Pet Type", "type": "string"},
                               "barks": {"title": "Barks", "type": "number"}},
                "required": ["pet_type", "barks"], "title": "Dog", "type": "object"}},
     "properties": {"pet": {"discriminator": {"mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"},
                                              "propertyName": "pet_type"},
                            "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "title": "Pet"},
                    "n": {"title": "N", "type": "integer"}},
     "required": ["pet", "n"], "title": "Model", "type": "object"})
}

#[tokio::test]
async fn a_tagged_union_is_enforced_and_an_ambiguous_one_refused() {
    let validator = jsonschema::validator_for(&pets()).expect("a valid schema");
    let mut kinds = Vec::new();
    for prompt in [
        "My cat meows about 12 times a day. Describe my pet as JSON, with n = 1.",
        "My dog barks 2.5 times an hour. Describe my pet as JSON, with n = 2.",
    ] {
        let a = answer(request(
            vec![Message::new("user", prompt)],
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "Model", "schema": pets()}}}),
        ))
        .await;
        assert_eq!(a.finish.reason, FinishReason::Stop, "{a:?}");
        let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {}", a.text));
        assert!(validator.is_valid(&v), "{v}");
        kinds.push(v["pet"]["pet_type"].clone());
    }
    assert!(kinds.iter().all(|k| k == "cat" || k == "dog"), "{kinds:?}");

    // Branches that one value can match both of are not a tagged union:
    // the keyword is refused by name, written inline or by reference.
    for (defs, branches) in [
        (
            json!({}),
            json!([{"type": "integer"}, {"type": "number", "minimum": 0}]),
        ),
        (
            json!({"A": {"type": "object", "properties": {"k": {"const": "a"}}}}),
            json!([{"$ref": "#/$defs/A"}, {"type": "object"}]),
        ),
    ] {
        let req = request(
            vec![Message::new("user", "x")],
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"$defs": defs, "type": "object", "properties": {"x": {"oneOf": branches}}}}}}),
        );
        let why = qwen().refusal(&req).expect("refused");
        assert!(why.contains("oneOf"), "{why}");
    }
}

#[tokio::test]
async fn what_cannot_be_enforced_is_refused_by_name() {
    let err = qwen()
        .submit(request(
            vec![Message::new("user", "x")],
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}}}),
        ))
        .err()
        .expect("refused");
    assert_eq!(err.status, 400);
    assert_eq!(err.param.as_deref(), Some("response_format"));
    assert!(err.message.contains("dependentSchemas"), "{}", err.message);

    let err = qwen()
        .submit(request(
            vec![Message::new("user", "x")],
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "launch"}}}),
        ))
        .err()
        .expect("refused");
    assert_eq!(err.status, 400);
    assert_eq!(err.param.as_deref(), Some("tool_choice"));

    // The router asks before it places a request: the same verdict without
    // generating, for a schema and for a forced call's parameters alike.
    let set = json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true});
    let schema_req = request(
        vec![Message::new("user", "x")],
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
               "schema": {"type": "object", "properties": {"tags": set}}}}}),
    );
    let why = qwen().refusal(&schema_req).expect("refused");
    assert!(why.contains("uniqueItems"), "{why}");
    let tools = json!([{"type": "function", "function": {"name": "tag",
        "parameters": {"type": "object", "properties": {"tags": set}}}}]);
    let forced = request(
        vec![Message::new("user", "x")],
        json!({"tools": tools, "tool_choice": "required"}),
    );
    assert!(
        qwen()
            .refusal(&forced)
            .is_some_and(|w| w.contains("uniqueItems"))
    );
    // Not forced, the call is read from free text: nothing to enforce.
    let auto = request(vec![Message::new("user", "x")], json!({"tools": tools}));
    assert_eq!(qwen().refusal(&auto), None);
    assert_eq!(
        qwen().refusal(&request(vec![Message::new("user", "x")], json!({}))),
        None
    );
}

/// A grammar is compiled once: the router's check and the answer that
/// follows share it, and so do later requests with the same schema; a
/// refusal is kept too. Its own engine, so that no other test's grammars
/// move the count.
#[tokio::test]
async fn a_grammar_is_compiled_once_and_kept() {
    let smol = LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).unwrap();
    let compiled = || smol.stats().grammars_compiled;
    let with_schema = |schema: Value| {
        let mut req = request(
            vec![Message::new(
                "user",
                "How old is the Eiffel tower? Answer in JSON.",
            )],
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "age", "strict": true, "schema": schema}}}),
        );
        req.model = SMOLLM2.into();
        req.max_tokens = Some(24);
        req
    };
    let age = json!({"type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["age"], "additionalProperties": false});
    assert_eq!(compiled(), 0);
    assert_eq!(smol.refusal(&with_schema(age.clone())), None);
    assert_eq!(compiled(), 1);
    // The kept parser is never advanced itself: every answer starts fresh.
    for _ in 0..2 {
        let a = Answer::collect(smol.submit(with_schema(age.clone())).unwrap())
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {a:?}"));
        assert!(
            v["age"].as_i64().is_some_and(|n| (0..=150).contains(&n)),
            "{v}"
        );
    }
    assert_eq!(compiled(), 1);

    let set = json!({"type": "object", "properties": {"tags": {"type": "array",
        "items": {"type": "string"}, "uniqueItems": true}}});
    let why = smol.refusal(&with_schema(set.clone())).expect("refused");
    assert_eq!(smol.refusal(&with_schema(set.clone())), Some(why.clone()));
    let err = smol.submit(with_schema(set)).err().expect("refused");
    assert_eq!((err.status, err.message), (400, why));
    assert_eq!(compiled(), 2);

    // Only the most recently used are kept.
    for i in 0..16 {
        let other = json!({"type": "object", "properties": {format!("k{i}"): {"type": "integer"}}});
        assert_eq!(smol.refusal(&with_schema(other)), None);
    }
    assert_eq!(compiled(), 18);
    assert_eq!(smol.refusal(&with_schema(age)), None);
    assert_eq!(compiled(), 19);
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let base = answer(request(
        vec![Message::new("user", "What is the capital of France?")],
        json!({}),
    ))
    .await;
    assert!(base.text.contains("Paris"), "{base:?}");
    let paris = qwen().count_tokens(" Paris");
    assert_eq!(paris, 1, "\" Paris\" is one token");
    let ids: Vec<i32> = ["Paris", " Paris"]
        .iter()
        .map(|w| qwen().token_ids(w))
        .filter(|ids| ids.len() == 1)
        .map(|ids| ids[0])
        .collect();
    let bias: serde_json::Map<String, Value> =
        ids.iter().map(|t| (t.to_string(), json!(-100))).collect();
    let banned = answer(request(
        vec![Message::new("user", "What is the capital of France?")],
        json!({"logit_bias": bias}),
    ))
    .await;
    assert!(!banned.text.contains("Paris"), "{banned:?}");
    let err = qwen()
        .submit(request(
            vec![Message::new("user", "x")],
            json!({"logit_bias": {"99999999": 5}}),
        ))
        .err()
        .expect("refused");
    assert_eq!(err.param.as_deref(), Some("logit_bias"));
}

/// Sampled answers (temperature 1.5, seeded, a `logit_bias` on some) keep
/// to their grammar too: the token drawn first is checked, and one the
/// grammar refuses is drawn again from what its mask leaves. A hot
/// temperature makes refused first draws common.
#[tokio::test]
async fn sampled_answers_keep_to_their_grammar() {
    let valid = jsonschema::validator_for(&schema()).unwrap();
    let items = regex::Regex::new("^(- [A-Za-z][a-z ]{0,20}\n){3}$").unwrap();
    let list = "root ::= Item{3}\nItem ::= \"- \" [A-Za-z] [a-z ]{0,20} \"\\n\"";
    for seed in 0..4u32 {
        let mut extra = json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "strict": true, "schema": schema()}}});
        if seed % 2 == 1 {
            // `{` is refused: the grammar must still find its way.
            extra["logit_bias"] = json!({"90": -100});
        }
        let mut req = request(
            vec![Message::new(
                "user",
                "Marie Curie was a physicist who spoke Polish and French. Describe her as JSON.",
            )],
            extra,
        );
        req.sampling = Sampling {
            temperature: Some(1.5),
            seed: Some(seed),
            ..Sampling::default()
        };
        req.max_tokens = Some(200);
        let a = answer(req.clone()).await;
        if a.finish.reason == FinishReason::Stop {
            let v: Value = serde_json::from_str(&a.text)
                .unwrap_or_else(|e| panic!("{e}: {:?} (seed {seed})", a.text));
            assert!(valid.is_valid(&v), "{v} (seed {seed})");
        } else {
            assert!(a.text.starts_with('{'), "{:?} (seed {seed})", a.text);
        }
        req.extra = json!({"grammar": list})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let a = answer(req).await;
        assert!(items.is_match(&a.text), "{:?} (seed {seed})", a.text);
    }
}
