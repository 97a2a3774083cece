//! `cargo bench -p airgate --bench audit`: durable audit records per second
//! and time to a durable acknowledgement, with 1, 8 and 64 concurrent
//! writers (fail-closed: each append waits for its record to be on disk),
//! beside the raw fsync rate of the same disk measured in the same run.
//!
//! The store lives in AIRGATE_BENCH_DIR (default: a directory under the
//! target dir, i.e. the disk the state directory would normally be on).

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airgate::audit::{Audit, OpenOptions};
use airgate::heartbeat::Heartbeat;
use airgate_policy::audit::{DecisionRecord, Event};

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("AIRGATE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("bench dir");
    tempfile::tempdir_in(base).expect("tempdir")
}

/// 4 KiB written and fsynced, repeatedly, for `for_how_long`: fsyncs per second.
fn raw_fsync_rate(for_how_long: Duration) -> (f64, f64) {
    let dir = bench_dir();
    let mut f = std::fs::File::create(dir.path().join("fsync")).expect("file");
    let block = [7u8; 4096];
    let start = Instant::now();
    let mut n = 0u32;
    let mut times = Vec::new();
    while start.elapsed() < for_how_long {
        let t = Instant::now();
        f.write_all(&block).expect("write");
        f.sync_all().expect("fsync");
        times.push(t.elapsed());
        n += 1;
    }
    times.sort();
    (
        f64::from(n) / start.elapsed().as_secs_f64(),
        times[times.len() / 2].as_secs_f64() * 1e3,
    )
}

fn record(i: u64) -> Event {
    Event::Decision(Box::new(DecisionRecord {
        request_id: format!("{i:032x}"),
        identity: serde_json::json!({"transport": "unix", "uid": 1001, "gid": 1001, "pid": 4242, "groups": [1001]}),
        tenant: Some("claims".to_owned()),
        end_user: Some("ab".repeat(32)),
        route: "/v1/chat/completions".to_owned(),
        model: "gemma-3-270m".to_owned(),
        model_files: vec![
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".to_owned(),
        ],
        licences: vec!["LicenseRef-Gemma-Terms-of-Use".to_owned()],
        bundle_version: Some(7),
        bundle_digest: Some("cd".repeat(32)),
        purpose: Some("claims-triage".to_owned()),
        decision: "allow".to_owned(),
        reason: "allowed".to_owned(),
        rule: String::new(),
        guard_score: None,
    }))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (fsyncs, fsync_ms) = raw_fsync_rate(Duration::from_secs(3));
    println!("raw fsync (4 KiB write + fsync): {fsyncs:.0}/s, median {fsync_ms:.2} ms");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for writers in [1usize, 8, 64] {
        let dir = bench_dir();
        let heartbeat = Heartbeat::new();
        let (audit, _) = Audit::open(
            &dir.path().join("audit"),
            OpenOptions {
                cache_bytes: 64 << 20,
                marker: None,
                journal_all: false,
                accept_broken: false,
            },
            |_| Event::Genesis {
                host_key_sha256: "00".repeat(32),
                machine_id: "bench".to_owned(),
                state_dir: "bench".to_owned(),
                previous_store: None,
            },
            None,
            heartbeat.register("audit-writer", Duration::from_secs(60)),
        )
        .expect("open");
        let audit = Arc::new(audit);
        let per_writer = (3000 / writers).max(40) as u64;
        let (elapsed, mut latencies) = runtime.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let audit = Arc::clone(&audit);
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        for i in 0..per_writer {
                            let t = Instant::now();
                            audit
                                .append(record(w as u64 * 1_000_000 + i))
                                .await
                                .expect("append");
                            lat.push(t.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("writer"));
            }
            (start.elapsed(), all)
        });
        latencies.sort();
        let total = latencies.len();
        let at = |q: f64| latencies[((total as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
        let rate = total as f64 / elapsed.as_secs_f64();
        println!(
            "audit, {writers:>2} writer(s): {rate:.0} durable records/s ({:.1}x raw fsync rate); ack p50 {:.2} ms, p99 {:.2} ms ({:.2}x one fsync at p50); {} batches",
            rate / fsyncs,
            at(0.5),
            at(0.99),
            at(0.5) / fsync_ms,
            audit.state().batches,
        );
    }
}
