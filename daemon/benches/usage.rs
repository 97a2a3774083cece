//! `cargo bench -p airgate --bench usage`: what a request pays for policy
//! and admission on a usage store holding 100,000 distinct users across 20
//! tenants: `decide` plus `reserve` plus `commit`, p50/p99 of single calls,
//! for users already counted this month and for new ones; and what a
//! restart pays to bring the store in step with an audit log of those
//! 200,000 records (verify the chain, fold it, restore the counters).
//!
//! The store is the daemon's: an audit log in sled, written as the daemon
//! writes it, opened with `Audit::open` and `Usage::open`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use airgate::audit::{Audit, OpenOptions};
use airgate::config::UsageConfig;
use airgate::heartbeat::Heartbeat;
use airgate::usage::Usage;
use airgate_policy::admission::Admission as _;
use airgate_policy::audit::{Content, DecisionRecord, Event, ZERO, key, seal};
use airgate_policy::bundle::{Bundle, Kind, WireBundle};
use airgate_policy::decision::{Decision, RequestFacts, UserKey, decide};
use airgate_policy::identity::{Identity, UnixPeer};
use airgate_policy::time::UnixTime;
use serde_json::json;

const TENANTS: u32 = 20;
const USERS: u32 = 100_000;

fn bundle() -> Bundle {
    let tenants: Vec<_> = (0..TENANTS)
        .map(|t| {
            json!({"id": format!("tenant-{t}"), "identities": {"uids": [10_000 + t]},
                   "purposes": ["p"], "default_purpose": "p", "models": ["gemma", "gemma-ft"],
                   "limits": {"requests_per_minute": 1_000_000, "tokens_per_day": 1_000_000_000_000u64,
                              "concurrent_requests": 100_000, "max_tokens_per_request": 4096},
                   "user_identity": {"kind": "openai_user"},
                   "user_cap": {"max_users_per_month": 1_000_000, "scope": "host", "over_cap": "refuse_new_users"}})
        })
        .collect();
    let wire: WireBundle = serde_json::from_value(json!({
        "schema": 1, "bundle_version": 1, "iss": "bench", "aud": "bench",
        "iat": 1_790_000_000i64, "nbf": 1_790_000_000i64, "exp": 1_900_000_000i64,
        "licences": [
            {"id": "LicenseRef-Gemma", "name": "g", "commercial_use": true,
             "monthly_active_user_threshold": 10_000_000u64, "review_by": "2030-01-01", "after_review": "flag"},
            {"id": "Apache-2.0", "name": "a", "commercial_use": true, "review_by": "2030-01-01", "after_review": "flag"}],
        "models": [
            {"id": "gemma", "format": "gguf", "kinds": ["chat"], "licence": "LicenseRef-Gemma",
             "files": [{"role": "weights", "name": "g.gguf", "sha256": "ab".repeat(32)}]},
            {"id": "gemma-ft", "format": "gguf", "kinds": ["chat"], "licence": "Apache-2.0", "derived_from": "gemma",
             "files": [{"role": "weights", "name": "f.gguf", "sha256": "cd".repeat(32)}]}],
        "tenants": tenants,
    }))
    .expect("wire bundle");
    wire.validate().expect("valid bundle")
}

fn user(n: u32) -> UserKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    k[4] = 0xa5;
    UserKey(k)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// An audit log as the daemon leaves it: genesis, then a decision and a
/// completion per user, sealed into one hash chain.
fn write_log(dir: &std::path::Path, now: i64) {
    let db = sled::Config::new().path(dir).open().expect("sled");
    let mut prev = ZERO;
    let mut batch = sled::Batch::default();
    let mut seq = 0u64;
    let mut push = |batch: &mut sled::Batch, event: Event| {
        let content = Content { time: now, event }.encode();
        let (stored, h) = seal(seq, &prev, &content);
        batch.insert(&key(seq), stored);
        seq += 1;
        prev = h;
    };
    push(
        &mut batch,
        Event::Genesis {
            host_key_sha256: String::new(),
            machine_id: "bench".to_owned(),
            state_dir: "bench".to_owned(),
            previous_store: None,
        },
    );
    for n in 0..USERS {
        let t = n % TENANTS;
        let id = format!("req-{n}");
        push(
            &mut batch,
            Event::Decision(Box::new(DecisionRecord {
                request_id: id.clone(),
                identity: serde_json::Value::Null,
                tenant: Some(format!("tenant-{t}")),
                end_user: Some(hex(&user(n).0)),
                route: "/v1/chat/completions".to_owned(),
                model: "gemma-ft".to_owned(),
                model_files: vec!["cd".repeat(32)],
                licences: vec!["Apache-2.0".to_owned(), "LicenseRef-Gemma".to_owned()],
                bundle_version: Some(1),
                bundle_digest: None,
                purpose: Some("p".to_owned()),
                decision: "allow".to_owned(),
                reason: "allowed".to_owned(),
                rule: String::new(),
                guard_score: None,
            })),
        );
        push(
            &mut batch,
            Event::Completion {
                request_id: id,
                // The genesis is record 0; each user's decision is 1 + 2n.
                decision_seq: Some(Some(1 + 2 * n as u64)),
                outcome: "completed".to_owned(),
                detail: String::new(),
                prompt_tokens: 20,
                completion_tokens: 30,
                duration_ms: 100,
                served: None,
            },
        );
    }
    db.apply_batch(batch).expect("batch");
    db.flush().expect("flush");
}

fn percentiles(label: &str, mut samples: Vec<u64>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "{label}: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us over {} calls",
        at(0.50) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(0.999) as f64 / 1000.0,
        samples.len()
    );
}

fn main() {
    let base = std::env::var_os("AIRGATE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let path = dir.path().join("audit");
    let now = UnixTime(airgate::bundle::system_time_now());
    let t = Instant::now();
    write_log(&path, now.seconds());
    println!(
        "wrote an audit log of {} records for {USERS} users across {TENANTS} tenants in {:.1} s",
        1 + 2 * u64::from(USERS),
        t.elapsed().as_secs_f64()
    );

    let heartbeat = Heartbeat::new();
    let t = Instant::now();
    let (audit, _) = Audit::open(
        &path,
        OpenOptions {
            cache_bytes: 64 << 20,
            marker: None,
            journal_all: false,
            accept_broken: false,
        },
        |_| unreachable!("the store exists"),
        None,
        heartbeat.register("audit-writer", Duration::from_secs(600)),
    )
    .expect("audit");
    let verified = t.elapsed();
    let t = Instant::now();
    let (usage, opened) = Usage::open(
        audit,
        &UsageConfig::default(),
        now,
        heartbeat.register("usage-fold", Duration::from_secs(600)),
    )
    .expect("usage");
    println!(
        "restart: chain verified in {:.2} s; {} records folded and {} users restored in {:.2} s",
        verified.as_secs_f64(),
        opened.caught_up.folded,
        opened.tenant_users,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(opened.tenant_users, u64::from(USERS));

    let b = bundle();
    let identities: Vec<Identity> = (0..TENANTS)
        .map(|t| Identity::Unix(UnixPeer::new(10_000 + t, 100, None, vec![])))
        .collect();
    let one = |n: u32| {
        let t = n % TENANTS;
        let facts = RequestFacts {
            identity: &identities[t as usize],
            model: "gemma-ft",
            kind: Kind::Chat,
            purpose: None,
            end_user: Some(user(n)),
            prompt: "Summarise the claim.",
            prompt_tokens: 20,
            max_tokens: 256,
        };
        let start = Instant::now();
        usage.observe(now);
        let Decision::Allow(allow) = decide(&b, usage.as_ref(), &facts, now) else {
            panic!("denied");
        };
        let ticket = usage.reserve(allow.reservation, now).expect("reserve");
        usage.commit(ticket, 50);
        black_box(start.elapsed().as_nanos() as u64)
    };
    for n in 0..10_000 {
        one(n);
    }
    let known: Vec<u64> = (0..200_000u32).map(|i| one((i * 7919) % USERS)).collect();
    percentiles(
        "decide + reserve + commit, user already counted (100k users, 20 tenants)",
        known,
    );
    let new: Vec<u64> = (0..100_000u32).map(|i| one(USERS + i)).collect();
    percentiles(
        "decide + reserve + commit, user new this month (counted under tenant and 2 licences)",
        new,
    );
    // The tree kept up: the log-derived count agrees with the live one.
    std::thread::sleep(Duration::from_secs(3));
    let report = usage.report(None, Some(&b), now).expect("report");
    let users: u64 = report["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| t["live"]["users"].as_u64().unwrap_or(0))
        .sum();
    println!("live distinct users after the run: {users}");

    // The month's compliance report over the same log, read from the
    // stopped store as `airgate report --state` does.
    drop(usage);
    let store = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            airgate::audit::open_db(&path, 8 << 20).ok()
        })
        .expect("the writer let go of the store");
    let records = store.len();
    drop(store);
    let month = airgate::report::Month::of_index(airgate::usage::month_index(now.seconds()));
    let mut inputs = airgate::report::Inputs {
        hosts: vec![airgate::report::Host {
            label: "bench".to_owned(),
            records: airgate::report::Records::Store(path),
            host_key: vec![0; 32],
            bundle_at_start: None,
        }],
        bundles: airgate::report::Bundles::default(),
        state: None,
        config: None,
    };
    let t = Instant::now();
    let report = airgate::report::build(month, &mut inputs, now.seconds()).expect("report");
    let took = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let html = report.render(airgate::report::Format::Html);
    println!(
        "report: {records} records verified and counted in {took:.2} s ({:.0} records/s), {} distinct users; HTML {} KiB in {:.3} s",
        records as f64 / took,
        report.totals.distinct_users,
        html.len() / 1024,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(report.totals.distinct_users, u64::from(USERS));
}
