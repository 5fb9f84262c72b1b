//! The official `openai` Python package (from PyPI) against a real server.

use serde_json::Value;
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_engine::{EngineConfig, LocalEngine};
use tandem_router::Dispatcher;
use tandem_testkit::{QWEN_05B, SMOLLM2, TestServer, model_path, python_with, shared_engine};

#[tokio::test]
async fn openai_python_client_chats_streams_and_completes() {
    let python = python_with(&["openai==3.57.0"]);
    let engine = LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).unwrap();
    let s = TestServer::start(Dispatcher::builder().local(engine).build().unwrap()).await;
    let v = run_client(&python, "openai_client.py", &s, SMOLLM2).await;
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{v}");
    assert_eq!(
        v["streamed"], v["text"],
        "stream reassembles to the same answer"
    );
    assert_eq!(v["finish"], "stop");
    assert_eq!(v["stream_finish"], "stop");
    assert_eq!(v["stream_usage"], v["usage"]);
    assert!(!v["completion"].as_str().unwrap().is_empty());
    assert!(
        v["models"].as_array().unwrap().iter().any(|m| m == SMOLLM2),
        "{v}"
    );
    assert_eq!(v["error"]["status"], 404);
}

/// One Qwen server for the tool and structured-output clients.
async fn qwen_server() -> TestServer {
    let mut cfg = EngineConfig::new(QWEN_05B, model_path(QWEN_05B));
    cfg.context = Some(2048);
    let engine = LocalEngine::load(cfg).unwrap();
    TestServer::start(Dispatcher::builder().local(engine).build().unwrap()).await
}

async fn run_client(python: &std::path::Path, script: &str, s: &TestServer, model: &str) -> Value {
    let script = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(s.url("/v1"))
        .arg(model)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client output")
}

/// The `openai` SDK's tool loop, streamed tool-call deltas, forced
/// choices, `parse` with a Pydantic model, JSON mode, vLLM's
/// `guided_choice` and `guided_json` and llama.cpp's GBNF `grammar` (as
/// `extra_body`), on the device.
#[tokio::test]
async fn openai_python_client_calls_tools_and_parses_structured_output() {
    let python = python_with(&["openai==3.57.0"]);
    let s = qwen_server().await;
    let v = run_client(&python, "tools_client.py", &s, QWEN_05B).await;
    check_tools_client(&v);
}

/// The same client through a device Tandem (SmolLM2, no tools in its
/// template) whose cloud is a cloud-role Tandem serving Qwen: tools, their
/// streamed deltas, schemas and refusals cross the wire both ways.
#[tokio::test]
async fn openai_python_client_calls_tools_through_a_cloud_role_tandem() {
    let python = python_with(&["openai==3.57.0"]);
    let (device, _cloud) = through_cloud_role().await;
    let v = run_client(&python, "tools_client.py", &device, QWEN_05B).await;
    check_tools_client(&v);
}

/// A device Tandem (SmolLM2, no tools in its template) whose cloud is a
/// cloud-role Tandem serving Qwen: requests naming Qwen cross the wire.
/// Returns the device, then the cloud (keep it alive).
async fn through_cloud_role() -> (TestServer, TestServer) {
    let cloud = qwen_server().await;
    let device = Dispatcher::builder()
        .local(shared_engine(SMOLLM2, 1024, 2))
        .cloud(
            CloudBackend::new(UpstreamConfig {
                // A Tandem applies these beside `response_format`.
                constraint_fields: ["guided_json", "guided_choice", "grammar"]
                    .map(String::from)
                    .to_vec(),
                ..UpstreamConfig::new("cloud", &cloud.url("/v1"), &[QWEN_05B])
            })
            .expect("upstream"),
        )
        .build()
        .expect("dispatcher");
    (TestServer::start(device).await, cloud)
}

fn check_tools_client(v: &Value) {
    assert_eq!(v["auto"]["finish"], "tool_calls", "{v}");
    let call = &v["auto"]["calls"][0];
    assert_eq!(call["name"], "get_weather", "{v}");
    assert_eq!(call["type"], "function");
    assert_eq!(call["arguments"]["city"], "Berlin", "{v}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert!(
        v["auto"]["content"].is_null(),
        "no words beside the call: {v}"
    );

    assert_eq!(v["stream"]["finish"], "tool_calls", "{v}");
    assert_eq!(v["stream"]["calls"][0]["name"], "get_weather");
    assert_eq!(v["stream"]["calls"][0]["arguments"], call["arguments"]);
    assert_eq!(v["stream"]["content"], "");

    assert_eq!(v["named"]["finish"], "tool_calls", "{v}");
    assert_eq!(v["named"]["name"], "get_weather");
    assert!(v["named"]["arguments"]["city"].is_string(), "{v}");
    assert!(
        ["celsius", "fahrenheit"].contains(&v["named"]["arguments"]["unit"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(v["required"]["finish"], "tool_calls", "{v}");
    assert_eq!(
        v["required"]["names"],
        serde_json::json!(["get_time"]),
        "{v}"
    );

    assert_eq!(v["loop"]["finish"], "stop", "{v}");
    assert!(
        v["loop"]["content"].as_str().unwrap().contains("14:05"),
        "the answer uses the tool's result: {v}"
    );

    let p = &v["parse"];
    assert!(p["name"].as_str().unwrap().contains("Curie"), "{v}");
    assert!(p["age"].is_i64(), "{v}");
    assert!(p["languages"].is_array(), "{v}");
    assert!(v["json_object"].is_object(), "{v}");
    assert!(
        ["yes", "no"].contains(&v["guided_choice"].as_str().unwrap_or("")),
        "{v}"
    );
    let g = v["guided_json"].as_object().expect("an object");
    assert!(
        g.len() == 2 && g["city"].is_string() && g["country"].is_string(),
        "{v}"
    );
    // The grammar's shape: 4, 2 and 2 digits between dashes.
    let date: Vec<&str> = v["grammar"]
        .as_str()
        .unwrap_or_default()
        .split('-')
        .collect();
    assert!(
        date.iter().map(|p| p.len()).eq([4, 2, 2])
            && date.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())),
        "{v}"
    );
    assert_eq!(v["unsupported"]["status"], 400, "{v}");
    assert_eq!(v["unsupported"]["param"], "response_format", "{v}");
}

/// LangChain's `bind_tools` and `with_structured_output` in its three
/// methods, on the device and through a device Tandem to a cloud-role one.
#[tokio::test]
async fn langchain_binds_tools_and_structures_output() {
    let python = python_with(&["openai==3.57.0", "langchain-openai==1.7.4"]);
    let (device, cloud) = through_cloud_role().await;
    // On the model's own server, then through a device Tandem to it.
    for s in [&cloud, &device] {
        let v = run_client(&python, "langchain_client.py", s, QWEN_05B).await;
        check_langchain(&v);
    }
}

fn check_langchain(v: &Value) {
    assert_eq!(v["bind_tools"][0]["name"], "GetWeather", "{v}");
    assert_eq!(v["bind_tools"][0]["args"]["city"], "Madrid", "{v}");
    for method in ["function_calling", "json_schema", "json_mode"] {
        let p = &v[method];
        assert!(p.get("error").is_none(), "{method}: {v}");
        assert!(
            p["name"].as_str().unwrap().contains("Curie"),
            "{method}: {v}"
        );
        assert!(p["age"].is_i64(), "{method}: {v}");
        assert!(p["languages"].is_array(), "{method}: {v}");
    }
}

/// `litellm` (its SDK, as an app calls a provider) with tools, streamed
/// tool-call deltas, the call → result → answer loop and a Pydantic
/// response format, on the device and through a device Tandem to a
/// cloud-role one.
#[tokio::test]
async fn litellm_calls_tools_and_structures_output() {
    let python = python_with(&["openai==3.57.0", "litellm==1.80.0"]);
    let (device, cloud) = through_cloud_role().await;
    for s in [&cloud, &device] {
        let v = run_client(&python, "litellm_client.py", s, QWEN_05B).await;
        check_litellm(&v);
    }
}

fn check_litellm(v: &Value) {
    assert_eq!(v["whole"]["finish"], "tool_calls", "{v}");
    let call = &v["whole"]["calls"][0];
    assert_eq!(call["name"], "get_weather", "{v}");
    // Lisbon, or its own name: the model's choice.
    assert!(
        call["arguments"]["city"]
            .as_str()
            .is_some_and(|c| c.starts_with("Lisb")),
        "{v}"
    );
    assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
    assert_eq!(v["stream"]["finish"], "tool_calls", "{v}");
    assert_eq!(v["stream"]["calls"][0]["name"], "get_weather", "{v}");
    assert_eq!(
        v["stream"]["calls"][0]["arguments"], call["arguments"],
        "{v}"
    );
    assert_eq!(v["loop"]["finish"], "stop", "{v}");
    assert!(
        v["loop"]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("23"),
        "the answer uses the tool's result: {v}"
    );
    let p = &v["structured"];
    assert!(p.get("error").is_none(), "{v}");
    assert!(
        p["name"].as_str().unwrap_or_default().contains("Curie"),
        "{v}"
    );
    assert!(p["age"].is_i64(), "{v}");
    assert!(p["languages"].is_array(), "{v}");
}
