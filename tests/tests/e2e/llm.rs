//! The Gemma GGUF model served through the OpenAI API, end to end: real
//! llama.cpp decoding, streaming, limits, slots shared between tenants,
//! and models refused for a bad digest or the memory budget.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use airgate_tests::{Daemon, Sandbox, get, models_dir, policy, post_json, wait_model};
use serde_json::{Value, json};

pub(crate) const GEMMA: &str = "gemma-3-270m";

pub(crate) fn client_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_airgate-test-client"))
}

pub(crate) fn tenant(id: &str, identities: &str, models: &str) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\nidentities = {identities}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [{models}]\nuser_identity = {{ kind = \"openai_user\" }}\n"
    )
}

pub(crate) fn llm_config(sb: &Sandbox, llm: &str) -> String {
    // Group 4321 may connect: the second tenant's client runs as uid/gid 4321.
    sb.config("mode = \"0660\"\ngroup = 4321", &format!("[llm]\n{llm}\n"))
        .replace(
            "state_dir = ",
            &format!("models_dir = \"{}\"\nstate_dir = ", models_dir().display()),
        )
}

pub(crate) fn chat(d: &Daemon, body: &Value) -> airgate_tests::Response {
    post_json(&d.socket, "/v1/chat/completions", &body.to_string())
}

pub(crate) fn ask(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": GEMMA,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0, "seed": 42, "max_tokens": max_tokens, "user": "alice",
    })
}

/// SSE `data:` payloads of a raw streamed response.
fn events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// A streamed request through the test client (optionally as another uid):
/// (arrival ms, payload) per event.
pub(crate) fn stream_as(
    uid: Option<u32>,
    socket: &std::path::Path,
    body: &Value,
) -> std::process::Child {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(client_bin());
            c
        }
        None => Command::new(client_bin()),
    };
    cmd.arg(socket)
        .arg("/v1/chat/completions")
        .arg(body.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("test client")
}

pub(crate) fn timed_events(child: std::process::Child) -> (u16, Vec<(u128, String)>) {
    let out = child.wait_with_output().expect("client output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let status = lines.next().unwrap_or("0").parse().unwrap_or(0);
    let events = lines
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(t, rest)| Some((t.parse().ok()?, rest.strip_prefix("data: ")?.to_owned())))
        .collect();
    (status, events)
}

fn content_of(events: &[(u128, String)]) -> String {
    events
        .iter()
        .filter_map(|(_, e)| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn gemma_answers_through_the_openai_api() {
    let sb = Sandbox::new();
    let tenants = tenant("ops", "{ uids = [0] }", "\"gemma-3-270m\"")
        + &tenant("other", "{ uids = [4321] }", "\"paraphrase-minilm-l3\"");
    sb.publish(&sb.sign("v1", &policy(1, &tenants)));
    let d = Daemon::start(&sb, &llm_config(&sb, "slots = 2\ncontext = 512"), &[]);
    d.wait_bundle(1);
    let ready = wait_model(&d, GEMMA);
    assert_eq!(ready["ready"], true, "{ready}");

    // Greedy with a seed: the same answer twice, in OpenAI's shape.
    let r = chat(&d, &ask("Name three colours.", 12));
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["id"], r.header("x-request-id").expect("request id"));
    assert!(
        r.header("airgate-attribution")
            .expect("attribution")
            .contains("Gemma")
    );
    assert!(
        a["airgate"]["attribution"][0]
            .as_str()
            .expect("notice")
            .contains("Gemma")
    );
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(!text.is_empty(), "{a}");
    let usage = &a["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().expect("prompt"),
        usage["completion_tokens"].as_u64().expect("completion"),
    );
    assert!(prompt > 5 && completion > 0 && completion <= 12, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    let again = chat(&d, &ask("Name three colours.", 12)).json();
    assert_eq!(again["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(
        again["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    // The same tenant's repeated prompt reuses the slot's KV cache (all but
    // the last prompt token), as OpenAI reports it.
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt - 1),
        "{again}"
    );

    // max_tokens: finish_reason length, exactly that many tokens.
    let short = chat(&d, &ask("Write a long story about the sea.", 3)).json();
    assert_eq!(short["choices"][0]["finish_reason"], "length", "{short}");
    assert_eq!(short["usage"]["completion_tokens"], 3);

    // Streaming: the chunks concatenate to the same text, usage included.
    let mut body = ask("Name three colours.", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = chat(&d, &body);
    assert_eq!(s.status, 200);
    assert!(
        s.header("content-type")
            .expect("type")
            .starts_with("text/event-stream")
    );
    let ev = events(&s.text());
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );

    // A stop sequence cuts the text before it.
    let word = text
        .split_whitespace()
        .nth(1)
        .filter(|w| w.len() > 1)
        .unwrap_or(&text[text.len() / 2..]);
    let cut = text.find(word).expect("the word is in the text");
    let mut body = ask("Name three colours.", 12);
    body["stop"] = json!([word]);
    let stopped = chat(&d, &body).json();
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["choices"][0]["message"]["content"], &text[..cut]);

    // json_object: a grammar keeps the output to JSON.
    let mut body = ask("Describe a cat as JSON.", 16);
    body["response_format"] = json!({"type": "json_object"});
    let j = chat(&d, &body).json();
    let out = j["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(out.trim_start().starts_with('{'), "{j}");

    // Text completions.
    let c = post_json(
        &d.socket,
        "/v1/completions",
        &json!({"model": GEMMA, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "user": "alice"}).to_string(),
    );
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["object"], "text_completion");
    assert!(
        c.json()["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );

    // Errors, in OpenAI's shape.
    let long = "word ".repeat(2000);
    let e = chat(&d, &ask(&long, 4));
    assert_eq!(e.status, 400, "{}", e.text());
    assert_eq!(e.json()["error"]["code"], "context_length_exceeded");
    assert!(
        e.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("512")
    );
    let mut unknown = ask("hi", 4);
    unknown["model"] = json!("no-such-model");
    let e = chat(&d, &unknown);
    assert_eq!(e.status, 404);
    assert_eq!(e.json()["error"]["code"], "model_not_found");
    let mut bad = ask("hi", 4);
    bad["n"] = json!(3);
    let e = chat(&d, &bad);
    assert_eq!(e.status, 400);
    assert_eq!(e.json()["error"]["param"], "n");

    // /v1/models: this tenant's models, with their state on this host.
    let models = get(&d.socket, "/v1/models", &[]).json();
    assert_eq!(models["data"][0]["id"], GEMMA);
    assert_eq!(models["data"][0]["status"]["state"], "ready");

    // Metrics: tokens by model and kind, generations by outcome, time to first token.
    let metrics = get(&d.socket, "/metrics", &[]).text();
    for needle in [
        "airgate_tokens_total{model=\"gemma-3-270m\",kind=\"completion\"}",
        "airgate_generations_total{model=\"gemma-3-270m\",outcome=\"completed\"}",
        "airgate_time_to_first_token_seconds_count{model=\"gemma-3-270m\"}",
    ] {
        let line = metrics.lines().find(|l| l.starts_with(needle));
        assert!(
            line.is_some_and(|l| !l.ends_with(" 0")),
            "{needle} missing or zero in:\n{metrics}"
        );
    }

    // Every generation left a completion record with the real counts.
    let records = get(&d.socket, "/admin/audit/records?limit=10000", &[]).text();
    let completions: Vec<Value> = records
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"]["kind"] == "completion" && r["event"]["outcome"] == "completed")
        .collect();
    assert!(completions.len() >= 6, "{records}");
    assert!(
        completions
            .iter()
            .any(|c| c["event"]["completion_tokens"] == 3)
    );
}

#[test]
fn the_other_tenant_is_refused_the_model() {
    let sb = Sandbox::new();
    sb.publish(&sb.sign(
        "v1",
        &policy(
            1,
            &tenant("other", "{ uids = [0] }", "\"paraphrase-minilm-l3\""),
        ),
    ));
    let d = Daemon::start(&sb, &llm_config(&sb, "slots = 1\ncontext = 256"), &[]);
    d.wait_bundle(1);
    let r = chat(&d, &ask("hi", 4));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "model_not_allowed");

    // Models follow the manifest, not a restart: gemma is loaded (it is in
    // the manifest), then a bundle without it unloads it.
    wait_model(&d, GEMMA);
    let start = Instant::now();
    let gemma_block = policy(2, "")
        .split("[[models]]")
        .find(|b| b.contains("format = \"gguf\""))
        .expect("gemma's manifest entry")
        .to_owned();
    let v2 = policy(
        2,
        &tenant("other", "{ uids = [0] }", "\"paraphrase-minilm-l3\""),
    )
    .replace(&format!("[[models]]{gemma_block}"), "");
    assert!(!v2.contains("gguf"));
    sb.publish(&sb.sign("v2", &v2));
    d.wait_bundle(2);
    loop {
        let r = get(&d.socket, "/readyz", &[]).json();
        if r["models"].get(GEMMA).is_none() {
            // The ONNX model stays: only what left the manifest is unloaded.
            assert_eq!(r["models"]["paraphrase-minilm-l3"]["state"], "ready", "{r}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.stderr().contains("model unloaded"));
}

#[test]
fn slots_are_shared_streams_interleave_and_a_disconnect_frees_the_slot() {
    let sb = Sandbox::new();
    std::fs::set_permissions(sb.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tenants = tenant("flood", "{ uids = [0] }", "\"gemma-3-270m\"")
        + &tenant("quiet", "{ uids = [4321] }", "\"gemma-3-270m\"");
    sb.publish(&sb.sign("v1", &policy(1, &tenants)));
    let d = Daemon::start(&sb, &llm_config(&sb, "slots = 2\ncontext = 256"), &[]);
    d.wait_bundle(1);
    wait_model(&d, GEMMA);
    let streaming = |n: u32| {
        let mut b = ask("Count from one to one hundred in words.", n);
        b["stream"] = json!(true);
        b
    };

    // Two concurrent streams both progress: each gets tokens before the other ends.
    let a = stream_as(None, &d.socket, &streaming(24));
    let b = stream_as(None, &d.socket, &streaming(24));
    let (sa, ea) = timed_events(a);
    let (sb_, eb) = timed_events(b);
    assert_eq!((sa, sb_), (200, 200));
    let first = |e: &[(u128, String)]| e.first().expect("events").0;
    let last = |e: &[(u128, String)]| e.last().expect("events").0;
    assert!(
        first(&eb) < last(&ea) && first(&ea) < last(&eb),
        "not interleaved"
    );
    // (Not necessarily the same text: batched decoding changes the float
    // sums, so greedy answers of concurrent streams may differ.)
    assert!(!content_of(&ea).is_empty() && !content_of(&eb).is_empty());

    // One tenant floods (4 long streams on 2 slots: 2 generate, 2 wait); the
    // other's request gets the first slot that frees, ahead of the flood's
    // waiting ones. ignore_eos: the flood cannot end early and free slots.
    // Each flood stream has its own length, so whichever two generate, their
    // slots free at different steps (two freed in one step would go to the
    // quiet tenant and a flood stream together, and their first events
    // could arrive in either order).
    let status = |d: &Daemon| get(&d.socket, "/admin/status", &[]).json();
    let flood: Vec<_> = [48, 96, 16, 24]
        .into_iter()
        .map(|n| {
            let mut long = streaming(n);
            long["ignore_eos"] = json!(true);
            let c = stream_as(None, &d.socket, &long);
            std::thread::sleep(Duration::from_millis(50));
            c
        })
        .collect();
    let start = Instant::now();
    while status(&d)["engines"][GEMMA]["load"] != 4 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", status(&d));
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut q = streaming(4);
    q["stream_options"] = json!({"include_usage": true});
    let quiet = stream_as(Some(4321), &d.socket, &q);
    let (qs, qe) = timed_events(quiet);
    assert_eq!(qs, 200, "{qe:?}");
    // The same prompt sat in the slot the flood left, but another tenant's
    // cache is never reused (a prefix hit would be a timing side channel).
    let quiet_usage = qe
        .iter()
        .filter_map(|(_, e)| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(
        quiet_usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{quiet_usage}"
    );
    let flood: Vec<(u16, Vec<(u128, String)>)> = flood.into_iter().map(timed_events).collect();
    let mut starts: Vec<u128> = flood.iter().map(|(_, e)| first(e)).collect();
    starts.sort_unstable();
    assert!(
        starts[2..].iter().all(|t| first(&qe) < *t),
        "the quiet tenant waited behind the flood: quiet {} vs flood {starts:?}",
        first(&qe)
    );

    // A client that goes away mid-stream frees its slot at once.
    let mut c = stream_as(None, &d.socket, &streaming(200));
    let start = Instant::now();
    while status(&d)["engines"][GEMMA]["load"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", status(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    c.kill().expect("kill client");
    let _ = c.wait();
    // The bound allows for a loaded 2-core CI host (a decode step can take a
    // second there); that the slot was freed by the disconnect, not by the
    // stream's end, is the record's "cancelled" outcome below.
    let gone = Instant::now();
    while status(&d)["engines"][GEMMA]["load"] != 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "slot still held after the client left: {}",
            status(&d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let records = get(&d.socket, "/admin/audit/records?limit=10000", &[]).text();
    assert!(records.contains("\"outcome\":\"cancelled\""), "{records}");
}

#[test]
fn a_wrong_digest_or_an_oversized_model_is_refused_and_reported() {
    // The file named by the manifest, with other content.
    let sb = Sandbox::new();
    let dir = sb.path().join("models");
    std::fs::create_dir_all(&dir).expect("models dir");
    std::fs::write(dir.join("gemma-3-270m-q4_k_m.gguf"), b"GGUF not really").expect("fake");
    sb.publish(&sb.sign(
        "v1",
        &policy(1, &tenant("ops", "{ uids = [0] }", "\"gemma-3-270m\"")),
    ));
    let config = sb.config("", "").replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", dir.display()),
    );
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    let refused = |d: &Daemon| {
        let start = Instant::now();
        loop {
            let r = get(&d.socket, "/readyz", &[]).json();
            if r["models"][GEMMA]["state"] == "refused" {
                return r;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let r = refused(&d);
    assert!(
        r["models"][GEMMA]["reason"]
            .as_str()
            .expect("reason")
            .contains("sha256"),
        "{r}"
    );
    assert!(r["warnings"].to_string().contains("sha256"), "{r}");
    let e = chat(&d, &ask("hi", 4));
    assert_eq!(e.status, 503);
    assert_eq!(e.json()["error"]["code"], "model_not_loaded");
    assert!(e.text().contains("sha256"), "{}", e.text());
    let listed = get(&d.socket, "/v1/models", &[]).json();
    assert_eq!(listed["data"][0]["status"]["state"], "refused");
    drop(d);

    // The real file, over a memory budget that cannot hold it.
    let sb = Sandbox::new();
    sb.publish(&sb.sign(
        "v1",
        &policy(1, &tenant("ops", "{ uids = [0] }", "\"gemma-3-270m\"")),
    ));
    let d = Daemon::start(&sb, &llm_config(&sb, "memory_budget = 104857600"), &[]);
    d.wait_bundle(1);
    let r = refused(&d);
    assert!(
        r["models"][GEMMA]["reason"]
            .as_str()
            .expect("reason")
            .contains("memory budget"),
        "{r}"
    );
}

#[test]
fn the_official_openai_python_client_works_over_mtls() {
    let python = airgate_tests::python();

    let sb = Sandbox::new();
    let site = crate::tls::Site::new(&sb);
    let config = site.config(&sb).replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", models_dir().display()),
    ) + "\n[llm]\nslots = 2\ncontext = 512\n";
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    wait_model(&d, GEMMA);
    let addr = crate::tls::tls_addr(&d);
    let dir = sb.path().join("pki");
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/openai_client.py"
        ))
        .arg(format!("https://localhost:{}/v1", addr.port()))
        .arg(dir.join("ca/ca.pem"))
        .arg(dir.join("claims.pem"))
        .arg(dir.join("claims.key"))
        .arg(GEMMA)
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let seen: Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("the client's JSON line");
    let text = seen["text"].as_str().expect("text");
    assert!(!text.is_empty(), "{seen}");
    assert_eq!(seen["streamed"], text, "{seen}");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(seen["stream_usage"][k], seen["usage"][k], "{seen}");
    }
    assert_eq!(seen["models"], json!([GEMMA]));
    assert_eq!(seen["missing_status"], 404);
    assert!(
        seen["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0 && n <= 12)
    );
}
