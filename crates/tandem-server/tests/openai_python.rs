//! The official `openai` Python package (from PyPI) against a real server.

use serde_json::Value;
use tandem_engine::{EngineConfig, LocalEngine};
use tandem_router::Dispatcher;
use tandem_testkit::{SMOLLM2, TestServer, model_path, python_with};

#[tokio::test]
async fn openai_python_client_chats_streams_and_completes() {
    let python = python_with(&["openai==3.57.0"]);
    let engine = LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).unwrap();
    let s = TestServer::start(Dispatcher::builder().local(engine).build().unwrap()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .arg(s.url("/v1"))
        .arg(SMOLLM2)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("client output");
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
