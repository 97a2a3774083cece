//! `cargo bench -p airgate --bench llm -- MODEL.gguf [TARGET ...]`
//!
//! The in-process baseline: llama-cpp-2 with one sequence and no server,
//! greedy, 128 tokens, the same threads as the daemon; the speed limit of
//! the stack. Then, for each TARGET, the same generation through an
//! OpenAI-compatible server, streamed: decode tokens/s, time to first
//! token, and with 1, 2, 4 and 8 concurrent clients the aggregate tokens/s
//! and p50/p99 time to first token. Targets:
//!   `unix:PATH`                     airgate's Unix socket
//!   `tls:PORT:CA:CERT:KEY`          airgate's mTLS listener on localhost
//!   `tcp:PORT`                      plain HTTP on 127.0.0.1 (llama-server)
//! scripts/bench-llm runs it all, llama-server included.

use std::io::{Read, Write};
use std::num::NonZeroU32;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

const PROMPT: &str = "Write a short story about a lighthouse keeper.";
const N_PREDICT: usize = 128;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(model_path) = args.first() else {
        eprintln!("usage: cargo bench -p airgate --bench llm -- MODEL.gguf [SOCKET]");
        std::process::exit(2);
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    baseline(model_path, threads);
    if args.len() > 1 {
        end_to_end(&args[1..]);
    }
}

/// A byte stream to a server under test.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

fn connect(target: &str) -> Box<dyn Conn> {
    let parts: Vec<&str> = target.split(':').collect();
    match parts.as_slice() {
        ["unix", path] => Box::new(UnixStream::connect(path).expect("connect unix")),
        ["tcp", port] => Box::new(
            std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("port")))
                .expect("connect tcp"),
        ),
        ["tls", port, ca, cert, key] => {
            use rustls::pki_types::pem::PemObject as _;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("ca") {
                roots.add(c.expect("ca cert")).expect("add ca");
            }
            let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
                .expect("cert")
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client auth");
            let tcp =
                std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("port")))
                    .expect("connect tls");
            let conn = rustls::ClientConnection::new(
                std::sync::Arc::new(config),
                ServerName::try_from("localhost").expect("name"),
            )
            .expect("tls");
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        _ => panic!("unknown target {target}: unix:PATH, tcp:PORT or tls:PORT:CA:CERT:KEY"),
    }
}

fn baseline(path: &str, threads: usize) {
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let backend = LlamaBackend::init().expect("backend");
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())
        .expect("load model");
    // The test GGUF carries no template: llama.cpp's built-in `gemma`, as the daemon does.
    let template = model
        .chat_template(None)
        .or_else(|_| LlamaChatTemplate::new("gemma").map_err(|_| ()))
        .expect("chat template");
    let prompt = model
        .apply_chat_template(
            &template,
            &[LlamaChatMessage::new("user".into(), PROMPT.into()).expect("message")],
            true,
        )
        .expect("template");
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    let threads = i32::try_from(threads).unwrap_or(1);
    let mut ctx = model
        .new_context(
            &backend,
            LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(2048))
                .with_n_batch(512)
                .with_n_threads(threads)
                .with_n_threads_batch(threads),
        )
        .expect("context");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let _ = ctx.clear_kv_cache_seq(None, None, None);
        let mut batch = LlamaBatch::new(512, 1);
        let start = Instant::now();
        for (i, t) in tokens.iter().enumerate() {
            batch
                .add(
                    *t,
                    i32::try_from(i).expect("pos"),
                    &[0],
                    i + 1 == tokens.len(),
                )
                .expect("add");
        }
        ctx.decode(&mut batch).expect("prefill");
        let mut sampler = LlamaSampler::greedy();
        let mut pos = i32::try_from(tokens.len()).expect("pos");
        let mut idx = batch.n_tokens() - 1;
        let mut first = None;
        let mut n = 0;
        while n < N_PREDICT {
            let t = sampler.sample(&ctx, idx);
            first.get_or_insert_with(|| start.elapsed());
            n += 1;
            batch.clear();
            batch.add(t, pos, &[0], true).expect("add");
            pos += 1;
            idx = 0;
            ctx.decode(&mut batch).expect("decode");
        }
        let total = start.elapsed();
        let first = first.unwrap_or_default();
        let decode = (total - first).as_secs_f64();
        runs.push(((N_PREDICT - 1) as f64 / decode, first));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (tps, ttft) = runs[runs.len() / 2];
    println!(
        "baseline (llama-cpp-2 in process, 1 sequence, {threads} threads): prompt {} tokens, decode {tps:.1} tok/s, first token {:.1} ms",
        tokens.len(),
        ttft.as_secs_f64() * 1000.0
    );
}

/// One streamed chat completion: (time to first token, tokens, total time).
fn stream_once(target: &str) -> (Duration, u64, Duration) {
    let body = format!(
        r#"{{"model":"gemma-3-270m","messages":[{{"role":"user","content":"{PROMPT}"}}],"max_tokens":{N_PREDICT},"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true}},"user":"bench"}}"#
    );
    let start = Instant::now();
    let mut s = connect(target);
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut first = None;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the body is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => panic!("read: {e}"),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if first.is_none() && buf.windows(9).any(|w| w == b"\"content\"") {
            let text = String::from_utf8_lossy(&buf);
            // The role-only first chunk carries no text: wait for real content.
            if text.matches("\"content\":\"").any(|_| true)
                && text
                    .split("\"content\":\"")
                    .skip(1)
                    .any(|rest| !rest.starts_with('"'))
            {
                first = Some(start.elapsed());
            }
        }
    }
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&buf);
    let tokens = text
        .split("\"completion_tokens\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (first.unwrap_or(total), tokens, total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One measurement: `clients` concurrent streams against `target`.
struct Sample {
    aggregate: f64,
    decode: f64,
    ttfts: Vec<Duration>,
}

fn measure(target: &str, clients: usize) -> Sample {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let s = target.to_owned();
            std::thread::spawn(move || stream_once(&s))
        })
        .collect();
    let mut ttfts = Vec::new();
    let mut tokens = 0;
    let mut rates = Vec::new();
    for h in handles {
        let (ttft, n, total) = h.join().expect("client");
        ttfts.push(ttft);
        tokens += n;
        if n > 1 {
            rates.push((n - 1) as f64 / (total - ttft).as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    Sample {
        aggregate: tokens as f64 / start.elapsed().as_secs_f64(),
        decode: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
        ttfts,
    }
}

/// Every target at every concurrency, interleaved (round by round, target
/// by target), so drift on a shared machine hits all of them alike; the
/// median round is reported.
fn end_to_end(targets: &[String]) {
    const ROUNDS: usize = 3;
    for t in targets {
        let _ = stream_once(t); // warm up
    }
    for clients in [1usize, 2, 4, 8] {
        let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..ROUNDS {
            for (i, t) in targets.iter().enumerate() {
                samples[i].push(measure(t, clients));
            }
        }
        for (t, mut s) in targets.iter().zip(samples) {
            let label = t.split(':').next().unwrap_or(t);
            s.sort_by(|a, b| a.aggregate.total_cmp(&b.aggregate));
            let mid = &s[s.len() / 2];
            let mut ttfts: Vec<Duration> = s.iter().flat_map(|x| x.ttfts.iter().copied()).collect();
            ttfts.sort();
            println!(
                "{label}, {clients} client(s): aggregate {:.1} tok/s (median of {ROUNDS}; min {:.1}, max {:.1}), per-stream decode {:.1} tok/s, first token p50 {:.0} ms p99 {:.0} ms",
                mid.aggregate,
                s[0].aggregate,
                s[s.len() - 1].aggregate,
                mid.decode,
                percentile(&ttfts, 0.5).as_secs_f64() * 1000.0,
                percentile(&ttfts, 0.99).as_secs_f64() * 1000.0,
            );
        }
    }
}
