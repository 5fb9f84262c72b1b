//! Chat templates: the Jinja template a GGUF carries in
//! `tokenizer.chat_template`, rendered the way Hugging Face's `transformers`
//! renders it (trimmed blocks, Python string methods available).

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde_json::Value as JsonValue;
use tandem_api::{ApiError, Message};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Some templates print today's date in the system prompt (Llama 3 does);
/// `format` is a C strftime pattern, of which they use the date fields.
fn strftime_now(format: String) -> String {
    let now = time::OffsetDateTime::now_utc();
    let month = now.month();
    let name = month.to_string();
    format
        .replace("%Y", &now.year().to_string())
        .replace("%m", &format!("{:02}", u8::from(month)))
        .replace("%d", &format!("{:02}", now.day()))
        .replace("%B", &name)
        .replace("%b", name.get(..3).unwrap_or(&name))
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse is reported here,
    /// at model load, rather than on the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| format!("chat template does not compile: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            source: source.to_owned(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders tool definitions (it reads `tools`).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the conversation, ending with the assistant's turn opened.
    /// `tools` is the request's tool list as the client sent it; templates
    /// print it in their own format.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[JsonValue]>,
    ) -> Result<String, ApiError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ApiError::internal(format!("chat template missing: {e}")))?;
        let messages: Vec<Message> = messages.iter().map(for_template).collect();
        template
            .render(context! {
                messages => Value::from_serialize(&messages),
                tools => tools.map(Value::from_serialize),
                add_generation_prompt => true,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| {
                // Templates reject conversations they cannot express (for
                // example roles that do not alternate): that is the client's
                // input, so it is a 400 with the template's own words.
                let detail = match e.kind() {
                    ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid").to_owned(),
                    _ => e.to_string(),
                };
                ApiError::invalid_param(
                    "messages",
                    format!("the model's chat template rejected the messages: {detail}"),
                )
            })
    }
}

/// A message as chat templates expect it. OpenAI sends a call's
/// `arguments` as a JSON string; templates (written for `transformers`)
/// print them with `tojson`, so they get the object the string holds —
/// otherwise the model would read its own past calls as quoted strings.
fn for_template(m: &Message) -> Message {
    let mut m = m.clone();
    if let Some(JsonValue::Array(calls)) = m.extra.get_mut("tool_calls") {
        for call in calls {
            let args = call
                .get_mut("function")
                .and_then(|f| f.get_mut("arguments"));
            if let Some(args) = args
                && let Some(text) = args.as_str()
                && let Ok(parsed @ JsonValue::Object(_)) = serde_json::from_str(text)
            {
                *args = parsed;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_exceptions_become_client_errors() {
        let src = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let e = t
            .render(&[Message::new("assistant", "x")], None)
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("Conversation must start with user"),
            "{}",
            e.message
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip() }}", "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  x  ")], None).unwrap(),
            "x"
        );
    }

    #[test]
    fn strftime_now_fills_the_date() {
        let s = strftime_now("%d %B %Y".into());
        assert!(
            s.ends_with(&time::OffsetDateTime::now_utc().year().to_string()),
            "{s}"
        );
        assert!(!s.contains('%'));
    }
}
