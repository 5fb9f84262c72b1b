//! Tool calling and structured outputs on the local model: for a set of
//! function-calling tasks (one tool to pick among four, arguments to fill,
//! in the style of BFCL's "simple" and "multiple" categories) and of JSON
//! schemas, the share of valid calls and schema-valid answers under each
//! `tool_choice` and with and without the grammar, task accuracy, and the
//! decode speed of constrained against unconstrained generation of the same
//! model in the same run.
//!
//! "Unconstrained" is what the same model does without Tandem's grammar:
//! the schema in the prompt, the answer read as it comes (what a llama.cpp
//! server gives a model whose calls it cannot parse).

use std::time::Instant;

use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use tandem_api::{Event, FinishReason, GenerateRequest, Input, Message, Sampling, ToolCall};
use tandem_engine::{EngineOptions, LocalEngine, Threads};

use crate::setup::load_engine;

/// `tandem bench tools`'s options.
#[derive(Args)]
pub struct ToolsArgs {
    /// The local model (one whose chat template renders tools).
    #[arg(long, short = 'm', default_value = "qwen2.5-coder-0.5b-instruct")]
    pub model: String,
    /// Inference threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

fn toolbox() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "convert_currency",
            "description": "Convert an amount of money from one currency to another",
            "parameters": {"type": "object", "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string", "description": "ISO 4217 code, e.g. USD"},
                "to": {"type": "string", "description": "ISO 4217 code, e.g. EUR"}},
                "required": ["amount", "from", "to"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "search_flights",
            "description": "Search flights between two cities on a date",
            "parameters": {"type": "object", "properties": {
                "origin": {"type": "string"}, "destination": {"type": "string"},
                "date": {"type": "string", "description": "YYYY-MM-DD"}},
                "required": ["origin", "destination", "date"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "set_reminder",
            "description": "Set a reminder with a text at a time",
            "parameters": {"type": "object", "properties": {
                "text": {"type": "string"}, "time": {"type": "string", "description": "HH:MM, 24-hour"}},
                "required": ["text", "time"], "additionalProperties": false}}}
    ])
}

/// (prompt, function, expected argument values).
fn call_tasks() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "What's the weather in Paris? Use celsius.",
            "get_weather",
            json!({"city": "Paris", "unit": "celsius"}),
        ),
        (
            "Is it hot in Phoenix right now? Tell me in fahrenheit.",
            "get_weather",
            json!({"city": "Phoenix", "unit": "fahrenheit"}),
        ),
        (
            "Weather for Tokyo please, metric units.",
            "get_weather",
            json!({"city": "Tokyo", "unit": "celsius"}),
        ),
        (
            "How cold is it in Oslo (°F)?",
            "get_weather",
            json!({"city": "Oslo", "unit": "fahrenheit"}),
        ),
        (
            "Convert 100 USD to EUR.",
            "convert_currency",
            json!({"amount": 100, "from": "USD", "to": "EUR"}),
        ),
        (
            "How many Japanese yen is 250 British pounds?",
            "convert_currency",
            json!({"amount": 250, "from": "GBP", "to": "JPY"}),
        ),
        (
            "I have 42.5 euros, what is that in Swiss francs?",
            "convert_currency",
            json!({"amount": 42.5, "from": "EUR", "to": "CHF"}),
        ),
        (
            "Change 1000 CAD into USD.",
            "convert_currency",
            json!({"amount": 1000, "from": "CAD", "to": "USD"}),
        ),
        (
            "Find flights from London to New York on 2026-03-14.",
            "search_flights",
            json!({"origin": "London", "destination": "New York", "date": "2026-03-14"}),
        ),
        (
            "Any flights Berlin → Rome on 2027-01-05?",
            "search_flights",
            json!({"origin": "Berlin", "destination": "Rome", "date": "2027-01-05"}),
        ),
        (
            "Search for a flight from Madrid to Lisbon for 2026-12-24.",
            "search_flights",
            json!({"origin": "Madrid", "destination": "Lisbon", "date": "2026-12-24"}),
        ),
        (
            "I need to fly Sydney to Auckland on 2026-07-01.",
            "search_flights",
            json!({"origin": "Sydney", "destination": "Auckland", "date": "2026-07-01"}),
        ),
        (
            "Remind me to call mom at 18:30.",
            "set_reminder",
            json!({"text": "call mom", "time": "18:30"}),
        ),
        (
            "Set a reminder for 07:00 to water the plants.",
            "set_reminder",
            json!({"text": "water the plants", "time": "07:00"}),
        ),
        (
            "At 12:15 remind me: lunch with Sam.",
            "set_reminder",
            json!({"text": "lunch with Sam", "time": "12:15"}),
        ),
        (
            "Please remind me to submit the report at 16:45.",
            "set_reminder",
            json!({"text": "submit the report", "time": "16:45"}),
        ),
    ]
}

/// (prompt, schema) pairs.
fn schema_tasks() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe Marie Curie: her name, birth year and the languages she spoke.",
            json!({
            "type": "object", "properties": {"name": {"type": "string"}, "birth_year": {"type": "integer"},
            "languages": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "birth_year", "languages"], "additionalProperties": false}),
        ),
        (
            "Extract the order: 3 blue T-shirts size M at 12.50 each, ship to Lyon.",
            json!({
            "type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}, "unit_price": {"type": "number"},
            "city": {"type": "string"}},
            "required": ["item", "quantity", "size", "unit_price", "city"], "additionalProperties": false}),
        ),
        (
            "Classify the sentiment of: 'The battery died after two hours, very disappointed.'",
            json!({
            "type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
            "required": ["sentiment", "confidence"], "additionalProperties": false}),
        ),
        (
            "List three planets of the solar system with their order from the sun.",
            json!({
            "type": "object", "properties": {"planets": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
                "type": "object", "properties": {"name": {"type": "string"}, "position": {"type": "integer"}},
                "required": ["name", "position"], "additionalProperties": false}}},
            "required": ["planets"], "additionalProperties": false}),
        ),
        (
            "Parse this date and time: 'the fourth of July 2026 at half past three in the afternoon'.",
            json!({
            "type": "object", "properties": {"year": {"type": "integer"}, "month": {"type": "integer", "minimum": 1, "maximum": 12},
            "day": {"type": "integer", "minimum": 1, "maximum": 31}, "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
            "required": ["year", "month", "day", "hour", "minute"], "additionalProperties": false}),
        ),
        (
            "Write a short recipe for pancakes.",
            json!({
            "type": "object", "properties": {"title": {"type": "string"},
            "ingredients": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
            "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
            "required": ["title", "ingredients", "steps"], "additionalProperties": false}),
        ),
        (
            "Is 97 a prime number? Answer with a boolean and a one-sentence reason.",
            json!({
            "type": "object", "properties": {"is_prime": {"type": "boolean"}, "reason": {"type": "string"}},
            "required": ["is_prime", "reason"], "additionalProperties": false}),
        ),
        (
            "Give the contact card of a fictional dentist in Madrid.",
            json!({
            "type": "object", "properties": {"name": {"type": "string"}, "profession": {"type": "string"},
            "city": {"type": "string"}, "years_of_experience": {"type": "integer", "minimum": 0}},
            "required": ["name", "profession", "city", "years_of_experience"], "additionalProperties": false}),
        ),
    ]
}

/// One generation: its text, calls, finish and decode speed.
struct Run {
    text: String,
    calls: Vec<ToolCall>,
    finish: Option<FinishReason>,
    completion_tokens: u32,
    /// From the first streamed piece to the end (decode only).
    decode_s: f64,
    /// From submission to the end (prefill and decode).
    total_s: f64,
}

async fn generate(
    engine: &LocalEngine,
    messages: Vec<Message>,
    extra: Value,
    max_tokens: u32,
) -> anyhow::Result<Run> {
    let req = GenerateRequest {
        choices: 1,
        model: engine.model_id().to_owned(),
        input: Input::Chat {
            messages,
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(max_tokens),
        stop: vec![],
        logprobs: None,
        stream: true,
        include_usage: true,
        extra: extra.as_object().cloned().unwrap_or_default(),
    };
    let t0 = Instant::now();
    let mut stream = engine.submit(req)?;
    let mut first: Option<Instant> = None;
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut finish = None;
    let mut completion_tokens = 0;
    let mut end = Instant::now();
    while let Some(ev) = stream.next().await {
        match ev? {
            Event::Delta(d) => {
                first.get_or_insert_with(Instant::now);
                text.push_str(&d.text);
                for piece in &d.tool_calls {
                    ToolCall::assemble(&mut calls, piece);
                }
            }
            Event::Finish(f) => {
                end = Instant::now();
                finish = Some(f.reason);
                completion_tokens = f.usage.completion_tokens;
            }
        }
    }
    let decode_s = first.map_or(0.0, |t| (end - t).as_secs_f64());
    let total_s = (end - t0).as_secs_f64();
    Ok(Run {
        total_s,
        text,
        calls,
        finish,
        completion_tokens,
        decode_s,
    })
}

fn same(expected: &Value, got: Option<&Value>) -> bool {
    match (expected, got) {
        (Value::String(e), Some(Value::String(g))) => e.trim().eq_ignore_ascii_case(g.trim()),
        (Value::Number(e), Some(Value::Number(g))) => e.as_f64() == g.as_f64(),
        (e, Some(g)) => e == g,
        (_, None) => false,
    }
}

#[derive(Default)]
struct Tally {
    n: usize,
    valid: usize,
    right_tool: usize,
    right_args: usize,
    tokens: u64,
    decode_s: f64,
}

impl Tally {
    fn share(&self, k: usize) -> f64 {
        k as f64 / self.n.max(1) as f64
    }

    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.decode_s.max(1e-9)
    }
}

fn validator(schema: &Value) -> anyhow::Result<jsonschema::Validator> {
    jsonschema::validator_for(schema).map_err(|e| anyhow::anyhow!("bad schema: {e}"))
}

/// Runs the benchmark and prints its table.
pub async fn run(args: ToolsArgs) -> anyhow::Result<()> {
    let opts = EngineOptions {
        threads: Some(Threads::Fixed(args.threads)),
        context: Some(4096),
        parallel: Some(1),
        gpu_layers: None,
    };
    let engine = load_engine(&args.model, &opts).await?;
    let tools = toolbox();
    let params: Vec<(String, jsonschema::Validator)> = tools
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let f = t.get("function")?;
            Some((
                f["name"].as_str()?.to_owned(),
                validator(&f["parameters"]).ok()?,
            ))
        })
        .collect();
    let tasks = call_tasks();
    let mut misses = Vec::new();
    println!(
        "tool calling: {} tasks, {} tools offered, model {}",
        tasks.len(),
        params.len(),
        args.model
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>10}",
        "choice", "valid call", "right tool", "right args", "tok/s e2e"
    );
    for choice in ["auto", "required", "named"] {
        let mut t = Tally::default();
        for (prompt, name, expected) in &tasks {
            let tool_choice = match choice {
                "named" => json!({"type": "function", "function": {"name": name}}),
                c => json!(c),
            };
            let r = generate(
                &engine,
                vec![Message::new("user", *prompt)],
                json!({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": false}),
                200,
            )
            .await?;
            t.n += 1;
            // Calls arrive whole at the end: time them from submission.
            t.tokens += u64::from(r.completion_tokens);
            t.decode_s += r.total_s;
            let Some(call) = r.calls.first() else {
                misses.push(format!("{choice}: {prompt:?} -> no call: {:?}", r.text));
                continue;
            };
            let args: Option<Value> = serde_json::from_str(&call.function.arguments).ok();
            let valid = args.as_ref().is_some_and(|a| {
                params
                    .iter()
                    .any(|(n, v)| n == &call.function.name && v.is_valid(a))
            }) && r.finish == Some(FinishReason::ToolCalls);
            t.valid += usize::from(valid);
            let mut right = false;
            if call.function.name == *name {
                t.right_tool += 1;
                right = expected.as_object().is_some_and(|e| {
                    e.iter()
                        .all(|(k, v)| same(v, args.as_ref().and_then(|a| a.get(k))))
                });
                t.right_args += usize::from(right);
            }
            if !(valid && right) {
                misses.push(format!(
                    "{choice}: {prompt:?} -> {}({}){}",
                    call.function.name,
                    call.function.arguments,
                    if valid { "" } else { " [not valid]" }
                ));
            }
        }
        println!(
            "{:<10} {:>12.3} {:>12.3} {:>12.3} {:>10.1}",
            choice,
            t.share(t.valid),
            t.share(t.right_tool),
            t.share(t.right_args),
            t.tok_s()
        );
    }

    let schemas = schema_tasks();
    println!("\nstructured output: {} schemas", schemas.len());
    println!("{:<28} {:>14} {:>10}", "mode", "schema-valid", "tok/s");
    let mut speeds = [0.0f64; 2];
    for (i, mode) in ["json_schema (grammar)", "schema in prompt, free"]
        .iter()
        .enumerate()
    {
        let mut t = Tally::default();
        for (prompt, schema) in &schemas {
            let v = validator(schema)?;
            let r = if i == 0 {
                generate(
                    &engine,
                    vec![Message::new("user", *prompt)],
                    json!({"response_format": {"type": "json_schema",
                        "json_schema": {"name": "answer", "strict": true, "schema": schema}}}),
                    400,
                )
                .await?
            } else {
                let system = format!(
                    "Answer only with a JSON object that validates against this JSON schema, nothing else:\n{schema}"
                );
                generate(
                    &engine,
                    vec![
                        Message::new("system", system),
                        Message::new("user", *prompt),
                    ],
                    json!({}),
                    400,
                )
                .await?
            };
            t.n += 1;
            t.tokens += u64::from(r.completion_tokens.saturating_sub(1));
            t.decode_s += r.decode_s;
            let body = r.text.trim();
            // A free answer often wraps its JSON in a fence; read it kindly.
            let body = body
                .strip_prefix("```json")
                .or_else(|| body.strip_prefix("```"))
                .map_or(body, |b| b.trim_end().trim_end_matches("```"));
            let ok = serde_json::from_str::<Value>(body.trim()).is_ok_and(|a| v.is_valid(&a));
            t.valid += usize::from(ok);
            if !ok {
                misses.push(format!("{mode}: {prompt:?} -> {:?} {:?}", r.finish, r.text));
            }
        }
        speeds[i] = t.tok_s();
        println!(
            "{:<28} {:>14.3} {:>10.1}",
            mode,
            t.share(t.valid),
            t.tok_s()
        );
    }
    println!(
        "\nconstrained ÷ unconstrained decode speed: {:.2} (goal >= 0.9)",
        speeds[0] / speeds[1].max(1e-9)
    );
    println!("\nwhat the model got wrong:");
    for m in misses {
        println!("  {m}");
    }
    Ok(())
}
