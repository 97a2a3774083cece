//! `cargo bench -p airgate --bench onnx`: paraphrase-MiniLM-L3-v2 through
//! airgate's KServe v2 endpoint on the Unix socket, beside tract called
//! in-process on the same inputs in the same run: requests per second and
//! p50/p99 latency at sequence 16 and 128, batch 1 and 8.
//!
//! AIRGATE_MODELS_DIR: where scripts/fetch-models put the model (default
//! ~/.cache/airgate/models). AIRGATE_SOCKET: a running airgate serving it
//! as `paraphrase-minilm-l3` to this uid (scripts/bench-onnx starts one);
//! without it only the in-process numbers are printed.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use airgate::onnx::OnnxModel;
use tract_onnx::prelude::*;

const MODEL: &str = "paraphrase-minilm-l3";

fn models_dir() -> PathBuf {
    std::env::var_os("AIRGATE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/airgate/models")
        })
}

/// Token ids and an all-ones mask, deterministic.
fn inputs(batch: usize, seq: usize) -> (Vec<i64>, Vec<i64>) {
    let ids = (0..batch * seq)
        .map(|i| {
            if i % seq == 0 {
                101
            } else {
                1000 + (i as i64 * 37) % 20000
            }
        })
        .collect();
    (ids, vec![1; batch * seq])
}

fn tensors(batch: usize, seq: usize) -> Vec<Tensor> {
    let (ids, mask) = inputs(batch, seq);
    vec![
        tract_ndarray::Array2::from_shape_vec((batch, seq), ids)
            .expect("shape")
            .into_tensor(),
        tract_ndarray::Array2::from_shape_vec((batch, seq), mask)
            .expect("shape")
            .into_tensor(),
    ]
}

fn body(batch: usize, seq: usize, output: &str) -> String {
    let (ids, mask) = inputs(batch, seq);
    serde_json::json!({
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [batch, seq], "data": ids},
            {"name": "attention_mask", "datatype": "INT64", "shape": [batch, seq], "data": mask},
        ],
        "outputs": [{"name": output}],
    })
    .to_string()
}

/// One request on a kept-alive connection; returns the status.
fn post(stream: &mut UnixStream, body: &str, buf: &mut Vec<u8>) -> u16 {
    post_to(stream, &format!("/v2/models/{MODEL}/infer"), body, buf)
}

fn post_to(stream: &mut UnixStream, path: &str, body: &str, buf: &mut Vec<u8>) -> u16 {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: airgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write");
    buf.clear();
    let mut chunk = [0u8; 65536];
    loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if buf.len() >= end + 4 + length {
            return head[9..12].parse().expect("status");
        }
    }
}

fn stats(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    (
        at(0.5),
        at(0.99),
        samples.len() as f64 / total.as_secs_f64(),
    )
}

/// Texts of about a dozen words, distinct.
fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Claim {i}: water damage in the kitchen after the dishwasher hose split overnight."
            )
        })
        .collect()
}

/// Embeddings per second at batch 1 and 32, in-process and through
/// /v1/embeddings; then the guard's scoring time (in-process, and as the
/// daemon's airgate_guard_seconds reports it).
fn embeddings_and_guard(socket: Option<&PathBuf>) {
    let dir = models_dir();
    let mut model = OnnxModel::load(
        MODEL,
        &dir.join("paraphrase-MiniLM-L3-v2.onnx"),
        1,
        0,
        0,
        1 << 24,
    )
    .expect("MiniLM");
    model
        .set_tokenizer(&dir.join("minilm-tokenizer.json"))
        .expect("tokenizer");
    println!();
    println!("| embeddings | tract + tokenizer in-process | airgate /v1/embeddings, Unix socket |");
    println!("|---|---|---|");
    for batch in [1usize, 32] {
        let input = texts(batch);
        let n = if batch == 1 { 200 } else { 20 };
        let mut conn = socket.map(|s| UnixStream::connect(s).expect("connect"));
        let body = serde_json::json!({"model": MODEL, "input": input, "user": "bench"}).to_string();
        let mut buf = Vec::new();
        let (mut local, mut remote) = (Duration::ZERO, Duration::ZERO);
        for i in 0..n + 3 {
            let t = Instant::now();
            std::hint::black_box(model.embed_blocking(&input).expect("embed"));
            if i >= 3 {
                local += t.elapsed();
            }
            if let Some(c) = conn.as_mut() {
                let t = Instant::now();
                let status = post_to(c, "/v1/embeddings", &body, &mut buf);
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&buf));
                if i >= 3 {
                    remote += t.elapsed();
                }
            }
        }
        let rate = |d: Duration| (n * batch) as f64 / d.as_secs_f64();
        println!(
            "| batch {batch} | {:.0} embeddings/s | {} |",
            rate(local),
            if conn.is_some() {
                format!("{:.0} embeddings/s", rate(remote))
            } else {
                "-".to_owned()
            }
        );
    }
    let Some(guard_path) = std::env::var_os("AIRGATE_GUARD").map(PathBuf::from) else {
        return;
    };
    let mut guard = OnnxModel::load("guard", &guard_path, 1, 0, 0, 1 << 24).expect("guard");
    guard
        .set_tokenizer(&dir.join("minilm-tokenizer.json"))
        .expect("tokenizer");
    let prompt = "Summarise the claim for the adjuster and list the documents still missing.";
    let mut samples: Vec<Duration> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(guard.classify_blocking(prompt).expect("score"));
            t.elapsed()
        })
        .collect();
    samples.sort_unstable();
    println!(
        "\nguard (bag-of-words classifier + tokenizer), in-process: p50 {:.3} ms, p99 {:.3} ms per prompt",
        samples[500].as_secs_f64() * 1000.0,
        samples[990].as_secs_f64() * 1000.0
    );
}

fn main() {
    let path = models_dir().join("paraphrase-MiniLM-L3-v2.onnx");
    let model = OnnxModel::load(MODEL, &path, 1, 0, 0, 1 << 24)
        .expect("load the model (scripts/fetch-models)");
    let socket = std::env::var_os("AIRGATE_SOCKET").map(PathBuf::from);
    // The sentence embedding: the [batch, 384] output.
    let output = model
        .outputs
        .iter()
        .find(|o| o.wire_shape() == [-1, 384])
        .map(|o| o.name.clone())
        .expect("a [batch, 384] output");
    let rounds = |batch: usize, seq: usize| if batch * seq >= 1024 { 40 } else { 200 };
    println!(
        "| sequence | batch | tract in-process p50 / p99 (req/s) | airgate Unix socket p50 / p99 (req/s) | p50 overhead |"
    );
    println!("|---|---|---|---|---|");
    for (seq, batch) in [(16, 1), (16, 8), (128, 1), (128, 8)] {
        let n = rounds(batch, seq);
        // Interleaved, request by request, so drift hits both alike.
        let mut local = Vec::with_capacity(n);
        let mut remote = Vec::with_capacity(n);
        let mut conn = socket
            .as_ref()
            .map(|s| UnixStream::connect(s).expect("connect to AIRGATE_SOCKET"));
        let text = body(batch, seq, &output);
        let mut buf = Vec::new();
        for i in 0..n + 5 {
            let t = Instant::now();
            let out = model.run_blocking(tensors(batch, seq)).expect("run");
            let elapsed = t.elapsed();
            std::hint::black_box(out);
            if i >= 5 {
                local.push(elapsed);
            }
            if let Some(c) = conn.as_mut() {
                let t = Instant::now();
                let status = post(c, &text, &mut buf);
                let elapsed = t.elapsed();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&buf));
                if i >= 5 {
                    remote.push(elapsed);
                }
            }
        }
        let (lp50, lp99, lrps) = stats(local);
        let remote_cell = if remote.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            let (rp50, rp99, rrps) = stats(remote);
            (
                format!("{rp50:.2} / {rp99:.2} ms ({rrps:.0})"),
                format!("{:+.1}%", (rp50 / lp50 - 1.0) * 100.0),
            )
        };
        println!(
            "| {seq} | {batch} | {lp50:.2} / {lp99:.2} ms ({lrps:.0}) | {} | {} |",
            remote_cell.0, remote_cell.1
        );
    }
    embeddings_and_guard(socket.as_ref());
}
