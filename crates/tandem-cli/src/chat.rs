//! `tandem chat` (interactive) and `tandem run` (one prompt), answers
//! streamed to the terminal as they are generated.

use std::io::{BufRead, Write};

use anyhow::bail;
use clap::Args;
use futures::StreamExt;
use tandem_api::{Event, FinishReason, GenerateRequest, Input, Message, Sampling};
use tandem_catalog::DEFAULT_MODEL;
use tandem_engine::LocalEngine;

use crate::EngineArgs;
use crate::models::load_engine;

#[derive(Args)]
pub struct ChatArgs {
    /// Catalog name or GGUF path.
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    pub model: String,
    /// System prompt for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: GenArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args)]
pub struct RunArgs {
    /// Catalog name or GGUF path.
    pub model: String,
    /// The prompt; read from stdin when absent.
    pub prompt: Option<String>,
    #[arg(long)]
    pub system: Option<String>,
    /// Plain text completion instead of chat (for base models).
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: GenArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Clone, Copy)]
pub struct GenArgs {
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// 0 is greedy; default: the model's recommended setting.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u32>,
}

fn request(model: &str, input: Input, g: GenArgs) -> anyhow::Result<GenerateRequest> {
    if g.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        bail!("--temperature must be between 0 and 2");
    }
    Ok(GenerateRequest {
        choices: 1,
        model: model.to_owned(),
        input,
        sampling: Sampling {
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed,
            ..Sampling::default()
        },
        max_tokens: g.max_tokens,
        stop: Vec::new(),
        logprobs: None,
        stream: true,
        include_usage: true,
        extra: Default::default(),
    })
}

/// Streams one answer to stdout; Ctrl-C stops the answer, not the program.
async fn stream_answer(engine: &LocalEngine, req: GenerateRequest) -> anyhow::Result<String> {
    let mut events = engine.submit(req)?;
    let mut answer = String::new();
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(Event::Delta(d))) => {
                    print!("{}", d.text);
                    out.flush()?;
                    answer.push_str(&d.text);
                }
                Some(Ok(Event::Finish(f))) => {
                    if f.reason == FinishReason::Length {
                        print!(" [length limit]");
                    }
                    break;
                }
                Some(Err(e)) => bail!("{}", e.message),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => {
                print!(" [stopped]");
                break;
            }
        }
    }
    println!();
    Ok(answer)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let prompt = match args.prompt {
        Some(p) => p,
        None => std::io::read_to_string(std::io::stdin())?,
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let engine = load_engine(&args.model, &args.engine).await?;
    let input = if args.raw {
        Input::text(prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(s) = args.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", prompt));
        Input::Chat {
            messages,
            continue_from: None,
        }
    };
    let req = request(engine.model_id(), input, args.sampling)?;
    stream_answer(&engine, req).await?;
    Ok(())
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let engine = load_engine(&args.model, &args.engine).await?;
    let mut history = Vec::new();
    if let Some(s) = &args.system {
        history.push(Message::new("system", s.clone()));
    }
    eprintln!(
        "Chatting with {} on this device. /reset clears the conversation, /exit or Ctrl-D quits; Ctrl-C stops an answer.",
        engine.model_id()
    );
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.retain(|m: &Message| m.role == "system");
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let req = request(
            engine.model_id(),
            Input::Chat {
                messages: history.clone(),
                continue_from: None,
            },
            args.sampling,
        )?;
        match stream_answer(&engine, req).await {
            Ok(answer) => history.push(Message::new("assistant", answer)),
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
}
