//! Tandem's configuration file (`tandem.toml`), with environment overrides:
//! `TANDEM_<SECTION>__<KEY>=value`, e.g. `TANDEM_ROUTER__PRIVACY=strict`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use tandem_backends::UpstreamConfig;
use tandem_policy::{PolicyConfig, PrivacyConfig};
use tandem_router::access::KeyConfig;

fn d_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn d_body() -> usize {
    8 * 1024 * 1024
}
fn d_probe() -> u64 {
    10_000
}
fn d_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "d_host")]
    pub host: IpAddr,
    /// Default: 8080 for a device, 8081 for the cloud role.
    #[serde(default)]
    pub port: Option<u16>,
    /// Listen beyond loopback even without API keys.
    #[serde(default)]
    pub allow_remote: bool,
    #[serde(default = "d_body")]
    pub max_body_bytes: usize,
    /// Seconds to send request headers, and to idle between requests.
    #[serde(default = "d_header_timeout")]
    pub header_timeout_s: f64,
    /// Seconds for a whole request body to arrive.
    #[serde(default = "d_body_timeout")]
    pub body_timeout_s: f64,
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Seconds an answer (streamed or not) may run.
    #[serde(default = "d_stream_deadline")]
    pub stream_deadline_s: f64,
    /// Seconds open requests get to finish on SIGTERM/SIGINT.
    #[serde(default = "d_grace")]
    pub shutdown_grace_s: f64,
    /// Host names served besides loopback names and IP addresses when no
    /// keys are configured.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Web origins allowed to call the API from a browser.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    #[serde(default = "d_embedding_inputs")]
    pub max_embedding_inputs: usize,
    #[serde(default = "d_embedding_tokens")]
    pub max_embedding_tokens: usize,
}

fn d_embedding_inputs() -> usize {
    128
}
fn d_embedding_tokens() -> usize {
    16_384
}

fn d_header_timeout() -> f64 {
    30.0
}
fn d_body_timeout() -> f64 {
    60.0
}
fn d_max_connections() -> usize {
    512
}
fn d_stream_deadline() -> f64 {
    600.0
}
fn d_grace() -> f64 {
    10.0
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: d_host(),
            port: None,
            allow_remote: false,
            max_body_bytes: d_body(),
            header_timeout_s: d_header_timeout(),
            body_timeout_s: d_body_timeout(),
            max_connections: d_max_connections(),
            stream_deadline_s: d_stream_deadline(),
            shutdown_grace_s: d_grace(),
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            max_embedding_inputs: d_embedding_inputs(),
            max_embedding_tokens: d_embedding_tokens(),
        }
    }
}

impl ServerSection {
    /// The HTTP server's limits; a negative or non-finite number of seconds
    /// is an error, not a silent default.
    pub fn limits(&self) -> anyhow::Result<tandem_server::ServerConfig> {
        let secs = |name: &str, v: f64| {
            std::time::Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("[server] {name} = {v}: expected a positive number of seconds")
                })
        };
        anyhow::ensure!(
            self.max_connections > 0,
            "[server] max_connections must be at least 1"
        );
        Ok(tandem_server::ServerConfig {
            max_body_bytes: self.max_body_bytes,
            header_timeout: secs("header_timeout_s", self.header_timeout_s)?,
            body_timeout: secs("body_timeout_s", self.body_timeout_s)?,
            max_connections: self.max_connections,
            stream_deadline: secs("stream_deadline_s", self.stream_deadline_s)?,
            shutdown_grace: secs("shutdown_grace_s", self.shutdown_grace_s)?,
            allowed_hosts: self.allowed_hosts.clone(),
            cors_origins: self.cors_origins.clone(),
            max_embedding_inputs: self.max_embedding_inputs,
            max_embedding_tokens: self.max_embedding_tokens,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    /// `false`: a pure gateway with no local model.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Catalog names or GGUF paths; the first is the one the router uses.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub ctx: Option<u32>,
    #[serde(default)]
    pub parallel: Option<u32>,
    #[serde(default)]
    pub threads: Option<String>,
    #[serde(default)]
    pub gpu_layers: Option<u32>,
}

impl Default for LocalSection {
    fn default() -> Self {
        Self {
            enabled: true,
            models: Vec::new(),
            ctx: None,
            parallel: None,
            threads: None,
            gpu_layers: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Default: `$TANDEM_HOME/ledger.jsonl`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The key that chains the ledger (made on first use). Default:
    /// `$TANDEM_HOME/keys/ledger.key`; keep it apart from the ledger.
    #[serde(default)]
    pub key_path: Option<PathBuf>,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            key_path: None,
        }
    }
}

impl LedgerSection {
    /// The ledger file.
    pub fn path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| tandem_catalog::default_home().join("ledger.jsonl"))
    }

    /// The key file.
    pub fn key_path(&self) -> PathBuf {
        self.key_path.clone().unwrap_or_else(|| {
            tandem_catalog::default_home()
                .join("keys")
                .join("ledger.key")
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsSection {
    /// How often each upstream is probed.
    #[serde(default = "d_probe")]
    pub probe_interval_ms: u64,
    /// Treat the connection as metered (the OS rarely says so portably).
    #[serde(default)]
    pub metered: bool,
}

impl Default for SignalsSection {
    fn default() -> Self {
        Self {
            probe_interval_ms: d_probe(),
            metered: false,
        }
    }
}

fn d_embedder() -> String {
    "all-minilm-l6-v2".into()
}

/// The sentence embedder and the learned router that reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsSection {
    /// Load the embedder (for `/v1/embeddings`, the learned router and the
    /// semantic cache).
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default = "d_embedder")]
    pub model: String,
    /// The trained router (`tandem router train`); default
    /// `$TANDEM_HOME/router.json` when it exists.
    #[serde(default)]
    pub router: Option<PathBuf>,
}

impl Default for EmbeddingsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            model: d_embedder(),
            router: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub embeddings: EmbeddingsSection,
    #[serde(default)]
    pub cache: tandem_router::cache::CacheConfig,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub local: LocalSection,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub router: PolicyConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub signals: SignalsSection,
    #[serde(default)]
    pub speculative: tandem_router::SpeculativeConfig,
    #[serde(default)]
    pub telemetry: tandem_telemetry::TelemetryConfig,
    #[serde(default)]
    pub shared: tandem_router::shared::SharedConfig,
}

/// The file to read: `--config`, else `$TANDEM_CONFIG`, else
/// `$TANDEM_HOME/tandem.toml` if it exists.
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("TANDEM_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = tandem_catalog::default_home().join("tandem.toml");
    default.is_file().then_some(default)
}

pub fn load(explicit: Option<&Path>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let path = locate(explicit);
    let mut fig = Figment::new();
    if let Some(p) = &path {
        if !p.is_file() {
            anyhow::bail!("configuration file {} does not exist", p.display());
        }
        fig = fig.merge(Toml::file(p));
    }
    // Only nested keys: TANDEM_HOME, TANDEM_LOG and friends are not config.
    fig = fig.merge(
        Env::prefixed("TANDEM_")
            .filter(|k| k.as_str().contains("__"))
            .split("__"),
    );
    let config: Config = fig.extract().with_context(|| match &path {
        Some(p) => format!("reading configuration {}", p.display()),
        None => "reading configuration from the environment".into(),
    })?;
    Ok((config, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn a_full_file_parses_and_env_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(
            &path,
            r#"
[server]
port = 9000

[local]
models = ["smollm2-135m-instruct"]
ctx = 2048

[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4o-mini"]
price_input_per_mtok = 0.15
price_output_per_mtok = 0.6

[[upstreams]]
name = "ollama"
base_url = "http://127.0.0.1:11434/v1"
models = ["llama3.2"]
choices = "separate"
lacks = ["logit_bias", "best_of"]

[[upstreams]]
name = "vllm"
base_url = "http://10.0.0.5:8000/v1"
models = ["qwen"]
continuation = "prefill"
constraint_fields = ["guided_json", "guided_regex", "guided_choice", "structured_outputs"]

[router]
privacy = "strict"
daily_budget_usd = 2.5
rules = ["privacy", "capability", "network", "budget", "prefer_local"]

[privacy]
custom_patterns = [{ name = "employee_id", regex = "EMP-\\d{6}" }]
allow_list = ["Lodash", "Axios"]

[[keys]]
name = "app"
hash = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
privacy = "redact"
"#,
        )
        .unwrap();
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            jail.set_env("TANDEM_ROUTER__DAILY_BUDGET_USD", "7.5");
            jail.set_env("TANDEM_HOME", "/tmp/ignored");
            loaded = Some(load(Some(&path)).unwrap().0);
            Ok(())
        });
        let c = loaded.unwrap();
        assert_eq!(c.server.port, Some(9000));
        assert_eq!(c.upstreams[0].models, vec!["gpt-4o-mini"]);
        assert_eq!(
            c.upstreams[1].lacks,
            vec![tandem_api::Feature::LogitBias, tandem_api::Feature::BestOf]
        );
        assert_eq!(c.upstreams[2].constraint_fields.len(), 4);
        assert_eq!(c.router.privacy, tandem_policy::PrivacyMode::Strict);
        assert_eq!(c.router.daily_budget_usd, Some(7.5));
        assert_eq!(c.router.rules.len(), 5);
        assert_eq!(c.keys[0].name, "app");
        assert_eq!(c.privacy.custom_patterns[0].name, "employee_id");
        assert_eq!(c.privacy.allow_list, vec!["Lodash", "Axios"]);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "[router]\nprivacyy = \"strict\"\n").unwrap();
        let e = format!("{:#}", load(Some(&path)).unwrap_err());
        assert!(e.contains("privacyy"), "{e}");
    }
}
