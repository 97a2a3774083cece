//! The OpenAI request shapes airgate accepts for generation, parsed and
//! checked before policy: a bad parameter is the client's to fix and never
//! reaches the decision (or the model).

use serde_json::Value;

use airgate_policy::bundle::Kind;

use crate::llm::Sampling;

/// Most stop sequences a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Longest model name a request may give: no manifest id is longer.
pub const MAX_MODEL_BYTES: usize = 256;
/// Most messages a chat request may carry. Each one costs the template and
/// the tokenizer a pass; a conversation longer than this does not fit any
/// context airgate serves anyway.
pub const MAX_MESSAGES: usize = 4096;
/// Most content parts one message may carry.
const MAX_CONTENT_PARTS: usize = 256;

/// A parameter the request got wrong, named as OpenAI's `param`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub message: String,
    pub param: &'static str,
}

fn bad(param: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        message: message.into(),
        param,
    }
}

/// What to generate, and how.
#[derive(Debug)]
pub struct Generate {
    pub kind: Kind,
    /// (role, content) for chat; the prompt template comes from the model.
    pub messages: Vec<(String, String)>,
    /// The raw prompt for completions.
    pub prompt: String,
    pub stream: bool,
    pub include_usage: bool,
    pub sampling: Sampling,
    pub stop: Vec<String>,
}

fn number(body: &Value, key: &'static str, min: f64, max: f64) -> Result<Option<f64>, ParamError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| (min..=max).contains(x))
            .map(Some)
            .ok_or_else(|| bad(key, format!("{key} must be a number from {min} to {max}"))),
    }
}

fn flag(body: &Value, key: &'static str) -> Result<bool, ParamError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(key, format!("{key} must be true or false"))),
    }
}

/// A message's content as the model's template receives it: a string, or
/// text parts concatenated as they are (nothing inserted between them, so
/// "forb" + "idden" is "forbidden" to policy exactly as to the model).
fn content_text(v: &Value, param: &'static str) -> Result<String, ParamError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            if parts.len() > MAX_CONTENT_PARTS {
                return Err(bad(
                    param,
                    format!(
                        "a message has {} content parts; at most {MAX_CONTENT_PARTS} are accepted",
                        parts.len()
                    ),
                ));
            }
            let mut out = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text") | None, Some(Value::String(t))) => out.push_str(t),
                    (Some(other), _) => {
                        return Err(bad(
                            param,
                            format!(
                                "content parts of type {:?} are not supported; only text",
                                crate::bounded::clip(other, 64)
                            ),
                        ));
                    }
                    _ => {
                        return Err(bad(
                            param,
                            "a content part must be {\"type\": \"text\", \"text\": ...}",
                        ));
                    }
                }
            }
            Ok(out)
        }
        _ => Err(bad(
            param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// An OpenAI request parsed once. What policy decides on (the model, the
/// bound on generated tokens, the end user and [`Request::policy_text`]) and
/// what the engine is given come from this one value, so they cannot disagree.
#[derive(Debug)]
pub struct Request {
    pub model: String,
    /// The request's bound on generated tokens, if it names one.
    pub max_tokens: Option<u32>,
    /// The OpenAI `user` field, if sent.
    pub user: Option<String>,
    pub work: Work,
}

/// What the request asks the engine to do.
#[derive(Debug)]
pub enum Work {
    Generate(Generate),
    Embed(Embeddings),
}

impl Request {
    /// The text content rules and the guard check: every message's content
    /// exactly as the chat template receives it (system, developer and
    /// assistant turns included), one message per line; the completion
    /// prompt as the model gets it; or the embedding inputs, one per line.
    pub fn policy_text(&self) -> String {
        match &self.work {
            Work::Generate(g) if g.kind == Kind::Chat => {
                let mut out =
                    String::with_capacity(g.messages.iter().map(|(_, c)| c.len() + 1).sum());
                for (i, (_, content)) in g.messages.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    out.push_str(content);
                }
                out
            }
            Work::Generate(g) => g.prompt.clone(),
            Work::Embed(e) => e.texts.join("\n"),
        }
    }
}

/// Why a request body was refused: malformed as a whole (a required field
/// missing or of the wrong type), or a parameter out of its range.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Param(#[from] ParamError),
}

/// Parses a `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`
/// body: embeddings' own checks first (they name the parameter), the
/// fields every request shares, then generation's own.
pub fn parse_request(kind: Kind, body: &Value) -> Result<Request, RequestError> {
    if !body.is_object() {
        return Err(bad("body", "the request body must be a JSON object").into());
    }
    let embed = match kind {
        Kind::Embedding => Some(parse_embeddings(body)?),
        _ => None,
    };
    let malformed = |m: String| Err(RequestError::Malformed(m));
    let model = match body.get("model") {
        Some(Value::String(m)) if m.len() > MAX_MODEL_BYTES => {
            return Err(bad(
                "model",
                format!(
                    "\"model\" is {} bytes; a model id is at most {MAX_MODEL_BYTES}",
                    m.len()
                ),
            )
            .into());
        }
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return malformed("\"model\" (a non-empty string) is required".to_owned()),
    };
    let max_tokens = match body
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("max_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Some(n),
            _ => return malformed("max_tokens must be a positive integer".to_owned()),
        },
    };
    let user = match body.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => return malformed("\"user\" must be a string".to_owned()),
    };
    let work = match embed {
        Some(e) => Work::Embed(e),
        None => Work::Generate(parse(kind, body)?),
    };
    Ok(Request {
        model,
        max_tokens,
        user,
        work,
    })
}

/// Parses a chat or completion request body's own fields.
fn parse(kind: Kind, body: &Value) -> Result<Generate, ParamError> {
    if !body.is_object() {
        return Err(bad("body", "the request body must be a JSON object"));
    }
    match body.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(bad(
                "n",
                "only n = 1 is supported: send one request per choice",
            ));
        }
    }
    for unsupported in ["logprobs", "echo"] {
        if flag(body, unsupported).unwrap_or(true) {
            return Err(bad(unsupported, format!("{unsupported} is not supported")));
        }
    }
    if body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return Err(bad("tools", "tool calling is not supported"));
    }
    if body
        .get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        return Err(bad("best_of", "only best_of = 1 is supported"));
    }
    let stream = flag(body, "stream")?;
    let ignore_eos = flag(body, "ignore_eos")?;
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("stream_options", "include_usage must be true or false")),
        },
        Some(_) => return Err(bad("stream_options", "stream_options must be an object")),
    };
    let temperature = number(body, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = number(body, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    // A positive top_p that is 0 as the engine's f32 is 0 too.
    #[allow(clippy::cast_possible_truncation, reason = "in 0..=1")]
    let engine_top_p = top_p as f32;
    if top_p <= 0.0 || engine_top_p <= 0.0 {
        return Err(bad("top_p", "top_p must be greater than 0"));
    }
    let top_k = match body.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|k| i32::try_from(k).ok())
            .ok_or_else(|| bad("top_k", "top_k must be a non-negative integer"))?,
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).map_err(|e| bad("seed", e.to_string()))?;
            u32::from_le_bytes(b)
        }
        // Any integer; llama.cpp's samplers take 32 bits.
        Some(v) => v
            .as_i64()
            .map(|s| s as u32)
            .or_else(|| v.as_u64().map(|s| s as u32))
            .ok_or_else(|| bad("seed", "seed must be an integer"))?,
    };
    let presence_penalty = number(body, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = number(body, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop", "stop must be a string or a list of strings"))?,
        Some(_) => return Err(bad("stop", "stop must be a string or a list of strings")),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(bad(
            "stop",
            format!("stop takes at most {MAX_STOP} non-empty strings"),
        ));
    }
    let json_object = match body.get("response_format") {
        None | Some(Value::Null) => false,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => false,
            Some("json_object") => true,
            Some("json_schema") => {
                return Err(bad(
                    "response_format",
                    "json_schema is not supported by this build; use {\"type\": \"json_object\"}",
                ));
            }
            _ => {
                return Err(bad(
                    "response_format",
                    "response_format.type must be \"text\" or \"json_object\"",
                ));
            }
        },
    };
    let (messages, prompt) = match kind {
        Kind::Chat => {
            let list = body
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| bad("messages", "messages (a non-empty array) is required"))?;
            if list.len() > MAX_MESSAGES {
                return Err(bad(
                    "messages",
                    format!(
                        "{} messages given; at most {MAX_MESSAGES} are accepted",
                        list.len()
                    ),
                ));
            }
            let mut messages = Vec::with_capacity(list.len());
            for m in list {
                let role = match m.get("role").and_then(Value::as_str) {
                    Some(r @ ("system" | "user" | "assistant")) => r.to_owned(),
                    Some("developer") => "system".to_owned(),
                    Some(other) => {
                        return Err(bad(
                            "messages",
                            format!(
                                "role {:?} is not supported (system, developer, user, assistant)",
                                crate::bounded::clip(other, 64)
                            ),
                        ));
                    }
                    None => return Err(bad("messages", "every message needs a role")),
                };
                let content = content_text(m.get("content").unwrap_or(&Value::Null), "messages")?;
                if content.contains('\0') {
                    return Err(bad("messages", "content must not contain NUL characters"));
                }
                messages.push((role, content));
            }
            (messages, String::new())
        }
        _ => {
            let prompt = match body.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                    items[0].as_str().unwrap_or_default().to_owned()
                }
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "prompt",
                        "prompt must be a string (or a list of one string); token arrays and batches are not supported",
                    ));
                }
                _ => return Err(bad("prompt", "prompt (a string) is required")),
            };
            (Vec::new(), prompt)
        }
    };
    #[allow(clippy::cast_possible_truncation, reason = "ranges checked above")]
    let sampling = Sampling {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        json_object,
        ignore_eos,
    };
    Ok(Generate {
        kind,
        messages,
        prompt,
        stream,
        include_usage,
        sampling,
        stop,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parameters_are_checked_and_named() {
        let ok = parse(
            Kind::Chat,
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0, "seed": 7, "stop": ["\n", "END"], "stream": true,
                    "stream_options": {"include_usage": true}}),
        )
        .expect("valid");
        assert_eq!(ok.messages, vec![("user".to_owned(), "hi".to_owned())]);
        assert_eq!(ok.stop, vec!["\n", "END"]);
        assert!(ok.stream && ok.include_usage);
        assert_eq!(ok.sampling.seed, 7);
        assert!(ok.sampling.temperature.abs() < f32::EPSILON);

        let cases = [
            (json!({"n": 2}), "n"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"stop": [1]}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (json!({"logprobs": true}), "logprobs"),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages",
            ),
            (json!({"messages": []}), "messages"),
            (json!({"seed": "x"}), "seed"),
            (json!({"stream": "yes"}), "stream"),
        ];
        for (patch, param) in cases {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (k, v) in patch.as_object().expect("object") {
                body[k] = v.clone();
            }
            let e = parse(Kind::Chat, &body).expect_err(param);
            assert_eq!(e.param, param, "{body}: {e}");
        }
        let e =
            parse(Kind::Completion, &json!({"model": "m", "prompt": [1, 2]})).expect_err("tokens");
        assert_eq!(e.param, "prompt");
        let c = parse(Kind::Completion, &json!({"model": "m", "prompt": ["once"]}))
            .expect("one string");
        assert_eq!(c.prompt, "once");
    }

    /// What policy checks is what the model is given: content parts are
    /// joined alike for both, and every role's content is included.
    #[test]
    fn policy_sees_the_text_the_engine_gets() {
        let r = parse_request(
            Kind::Chat,
            &json!({"model": "m", "messages": [
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": [
                    {"type": "text", "text": "forb"}, {"type": "text", "text": "idden"}]},
                {"role": "developer", "content": "x"}]}),
        )
        .expect("valid");
        let Work::Generate(g) = &r.work else {
            panic!("a chat request generates");
        };
        assert_eq!(g.messages[1].1, "forbidden");
        assert_eq!(r.policy_text(), "be terse\nforbidden\nx");
        for (_, content) in &g.messages {
            assert!(r.policy_text().contains(content.as_str()));
        }
        let e = parse_request(
            Kind::Embedding,
            &json!({"model": "e", "input": ["forb", "idden"]}),
        )
        .expect("valid");
        assert_eq!(e.policy_text(), "forb\nidden");
    }

    #[test]
    fn counts_and_sizes_are_bounded() {
        let many: Vec<_> = (0..=MAX_MESSAGES)
            .map(|_| json!({"role": "user", "content": "hi"}))
            .collect();
        let param = |e: RequestError| match e {
            RequestError::Param(p) => p,
            RequestError::Malformed(m) => panic!("{m}"),
        };
        let e = param(
            parse_request(Kind::Chat, &json!({"model": "m", "messages": many}))
                .expect_err("too many messages"),
        );
        assert_eq!(e.param, "messages");
        let e = param(
            parse_request(
                Kind::Chat,
                &json!({"model": "m".repeat(MAX_MODEL_BYTES + 1),
                        "messages": [{"role": "user", "content": "hi"}]}),
            )
            .expect_err("model too long"),
        );
        assert_eq!(e.param, "model");
        let parts: Vec<_> = (0..=MAX_CONTENT_PARTS)
            .map(|_| json!({"type": "text", "text": "a"}))
            .collect();
        let e = param(
            parse_request(
                Kind::Chat,
                &json!({"model": "m", "messages": [{"role": "user", "content": parts}]}),
            )
            .expect_err("too many parts"),
        );
        assert_eq!(e.param, "messages");
        let e = parse_request(
            Kind::Chat,
            &json!({"model": "m", "messages": [{"role": "x".repeat(1 << 20), "content": "hi"}]}),
        )
        .expect_err("bad role");
        assert!(
            e.to_string().len() < 512,
            "the error quotes a bounded prefix"
        );
    }
}

/// Most texts one `/v1/embeddings` request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// A `/v1/embeddings` request's texts and how the vectors are sent back.
#[derive(Debug, PartialEq, Eq)]
pub struct Embeddings {
    pub texts: Vec<String>,
    /// `encoding_format: "base64"`: little-endian f32s, base64.
    pub base64: bool,
}

fn parse_embeddings(body: &Value) -> Result<Embeddings, ParamError> {
    let texts = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.len() > MAX_EMBEDDING_INPUTS {
                return Err(bad(
                    "input",
                    format!(
                        "at most {MAX_EMBEDDING_INPUTS} inputs per request, {} given",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(bad(
                        "input",
                        format!(
                            "input[{i}] is not a string (token arrays are not accepted: send text)"
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        _ => {
            return Err(bad(
                "input",
                "\"input\" must be a string or a non-empty array of strings",
            ));
        }
    };
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(bad("input", format!("input[{i}] is empty")));
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return Err(bad(
                "encoding_format",
                format!(
                    "encoding_format must be \"float\" or \"base64\", found {}",
                    crate::bounded::clip(&other.to_string(), 64)
                ),
            ));
        }
    };
    if let Some(d) = body.get("dimensions").filter(|d| !d.is_null()) {
        return Err(bad(
            "dimensions",
            format!(
                "dimensions = {}: this server returns the model's own dimension only",
                crate::bounded::clip(&d.to_string(), 64)
            ),
        ));
    }
    Ok(Embeddings { texts, base64 })
}
