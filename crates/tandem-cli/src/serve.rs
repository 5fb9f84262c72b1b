//! `tandem serve`: load the model(s) and serve the OpenAI-compatible API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tandem_api::Backend;
use tandem_catalog::DEFAULT_MODEL;
use tandem_server::{AppState, ServerConfig};

use crate::EngineArgs;
use crate::models::load_engine;

#[derive(Args)]
pub struct ServeArgs {
    /// Model to serve: a catalog name or a GGUF path. Repeat to serve several.
    #[arg(long = "model", short = 'm', default_value = DEFAULT_MODEL)]
    pub models: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "TANDEM_HOST")]
    pub host: IpAddr,
    #[arg(long, short = 'p', default_value_t = 8080, env = "TANDEM_PORT")]
    pub port: u16,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    let mut names = Vec::new();
    for m in &args.models {
        let engine = load_engine(m, &args.engine)
            .await
            .with_context(|| format!("loading model `{m}`"))?;
        names.push(engine.model_id().to_owned());
        backends.push(Arc::new(engine));
    }
    let state = AppState::new(
        backends,
        ServerConfig {
            max_body_bytes: args.max_body_bytes,
        },
    );
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    print_banner(&addr, &names);
    tandem_server::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

fn print_banner(addr: &SocketAddr, models: &[String]) {
    let base = format!("http://{addr}/v1");
    let model = models.first().map(String::as_str).unwrap_or(DEFAULT_MODEL);
    println!("Tandem is serving {} at {base}", models.join(", "));
    println!();
    println!("Call it with curl:");
    println!(
        "  curl {base}/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'"
    );
    println!();
    println!("or point any OpenAI client at it:");
    println!("  OPENAI_BASE_URL={base} OPENAI_API_KEY=unused python your_app.py");
    println!();
    println!("Press Ctrl-C to stop.");
}
