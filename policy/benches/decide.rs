//! `cargo bench -p airgate-policy --bench decide`: the cost of one policy
//! decision with 100 tenants and 50 models (content rules excluded), as
//! p50/p99 of single calls and as criterion's estimate; and the content-rule
//! scan in microseconds per KB of prompt.
//!
//! Usage comes from `MemoryAdmission`, the view the daemon reads, with a few
//! thousand users already counted.

use std::hint::black_box;
use std::time::Instant;

use airgate_policy::admission::{Admission, MemoryAdmission};
use airgate_policy::bundle::{Bundle, Kind, WireBundle};
use airgate_policy::decision::{Decision, RequestFacts, UserKey, decide};
use airgate_policy::identity::{Identity, UnixPeer};
use airgate_policy::time::UnixTime;
use criterion::{Criterion, criterion_group};
use serde_json::{Value, json};

const NOW: UnixTime = UnixTime(1_795_000_000);
const TENANTS: u32 = 100;
const MODELS: u32 = 50;

fn bundle(content: Value) -> Bundle {
    let licences: Vec<Value> = (0..10)
        .map(|l| {
            json!({"id": format!("LicenseRef-L{l}"), "name": "l", "commercial_use": true,
                   "monthly_active_user_threshold": 1_000_000,
                   "prohibited_uses": ["weapons-development", "surveillance"],
                   "attribution": "Provided under licence L", "review_by": "2030-01-01", "after_review": "flag"})
        })
        .collect();
    let models: Vec<Value> = (0..MODELS)
        .map(|m| {
            json!({"id": format!("model-{m}"), "format": "gguf", "kinds": ["chat", "completion"],
                   "licence": format!("LicenseRef-L{}", m % 10),
                   "files": [{"role": "weights", "name": format!("m{m}.gguf"), "sha256": "ab".repeat(32)}]})
        })
        .collect();
    let tenants: Vec<Value> = (0..TENANTS)
        .map(|t| {
            let allowed: Vec<String> = (0..10).map(|i| format!("model-{}", (t + i * 5) % MODELS)).collect();
            json!({"id": format!("tenant-{t}"), "identities": {"uids": [10_000 + t], "gids": [20_000 + t]},
                   "purposes": ["summarisation", "triage"], "default_purpose": "summarisation",
                   "models": allowed,
                   "limits": {"requests_per_minute": 100_000, "tokens_per_day": 1_000_000_000u64,
                              "concurrent_requests": 10_000, "max_tokens_per_request": 4096},
                   "user_identity": {"kind": "openai_user"},
                   "user_cap": {"max_users_per_month": 1_000_000, "scope": "host", "over_cap": "refuse_new_users"},
                   "content": content})
        })
        .collect();
    let wire: WireBundle = serde_json::from_value(json!({
        "schema": 1, "bundle_version": 1, "iss": "bench", "aud": "bench",
        "iat": 1_790_000_000i64, "nbf": 1_790_000_000i64, "exp": 1_800_000_000i64,
        "licences": licences, "models": models, "tenants": tenants,
    }))
    .expect("wire bundle");
    wire.validate().expect("valid bundle")
}

fn user(n: u32) -> UserKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    UserKey(k)
}

/// Usage with 5,000 users already counted across the tenants.
fn usage(bundle: &Bundle) -> MemoryAdmission {
    let admission = MemoryAdmission::new();
    admission.observe(NOW);
    for n in 0..5_000u32 {
        let t = n % TENANTS;
        let identity = Identity::Unix(UnixPeer::new(10_000 + t, 100, None, vec![]));
        let facts = RequestFacts {
            identity: &identity,
            model: &format!("model-{t}"),
            kind: Kind::Chat,
            purpose: None,
            end_user: Some(user(n)),
            prompt: "",
            prompt_tokens: 10,
            max_tokens: 10,
        };
        if let Decision::Allow(a) = decide(bundle, &admission, &facts, NOW) {
            let ticket = admission.reserve(a.reservation, NOW).expect("reserve");
            admission.commit(ticket, 20);
        }
    }
    admission
}

struct Request {
    identity: Identity,
    model: String,
    user: UserKey,
}

fn requests() -> Vec<Request> {
    (0..1024u32)
        .map(|i| {
            let t = (i * 37) % TENANTS;
            Request {
                identity: Identity::Unix(UnixPeer::new(10_000 + t, 100, None, vec![])),
                model: format!("model-{}", (t + (i % 10) * 5) % MODELS),
                user: user(i * 7),
            }
        })
        .collect()
}

/// A usage view with nothing behind it: what `decide` itself costs.
struct Fixed;

impl airgate_policy::decision::UsageView for Fixed {
    fn requests_last_minute(&self, _: &airgate_policy::identity::TenantId) -> u32 {
        1
    }
    fn tokens_today(&self, _: &airgate_policy::identity::TenantId) -> u64 {
        1
    }
    fn concurrent(&self, _: &airgate_policy::identity::TenantId) -> u32 {
        0
    }
    fn tenant_users(&self, _: &airgate_policy::identity::TenantId) -> u64 {
        50
    }
    fn tenant_user_seen(&self, _: &airgate_policy::identity::TenantId, _: &UserKey) -> bool {
        false
    }
    fn licence_users(&self, _: &str) -> u64 {
        500
    }
    fn licence_user_seen(&self, _: &str, _: &UserKey) -> bool {
        false
    }
}

fn run(
    bundle: &Bundle,
    usage: &dyn airgate_policy::decision::UsageView,
    r: &Request,
    prompt: &str,
) -> Decision {
    let facts = RequestFacts {
        identity: &r.identity,
        model: &r.model,
        kind: Kind::Chat,
        purpose: None,
        end_user: Some(r.user),
        prompt,
        prompt_tokens: 100,
        max_tokens: 256,
    };
    decide(bundle, usage, &facts, NOW)
}

fn percentiles(label: &str, mut samples: Vec<u64>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "{label}: p50 {:.2} us, p99 {:.2} us, max {:.2} us over {} calls",
        at(0.50) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(1.0) as f64 / 1000.0,
        samples.len()
    );
}

/// Single-call latency: what a request pays, including the tail.
fn report_percentiles() {
    let b = bundle(json!({}));
    let u = usage(&b);
    let reqs = requests();
    for r in reqs.iter().take(2000) {
        black_box(run(&b, &u, r, "Summarise the claim."));
    }
    let mut samples = Vec::with_capacity(200_000);
    for i in 0..200_000usize {
        let r = &reqs[i % reqs.len()];
        let t = Instant::now();
        let d = run(&b, &u, r, "Summarise the claim.");
        samples.push(t.elapsed().as_nanos() as u64);
        assert!(matches!(d, Decision::Allow(_)), "{d:?}");
    }
    percentiles(
        "decide, 100 tenants x 50 models, no content rules, usage from MemoryAdmission",
        samples,
    );
    let mut samples = Vec::with_capacity(200_000);
    for i in 0..200_000usize {
        let r = &reqs[i % reqs.len()];
        let t = Instant::now();
        black_box(run(&b, &Fixed, r, "Summarise the claim."));
        samples.push(t.elapsed().as_nanos() as u64);
    }
    percentiles("decide alone (fixed usage view)", samples);

    // Content rules: 10 literals and 5 regexes per tenant, prompts of 1-64 KB.
    let literals: Vec<String> = (0..10)
        .map(|i| format!("forbidden phrase number {i}"))
        .collect();
    let b = bundle(json!({
        "deny_literals": literals,
        "deny_regex": ["(?i)\\bssn\\b", "\\b\\d{3}-\\d{2}-\\d{4}\\b", "(?i)api[_-]?key\\s*[:=]",
                       "(?i)password\\s*[:=]", "\\b4[0-9]{12}(?:[0-9]{3})?\\b"],
        "max_prompt_chars": 1_000_000,
    }));
    let u = usage(&b);
    let sentence = "The claimant reports water damage to the kitchen ceiling after a storm. ";
    for kb in [1usize, 16, 64] {
        let prompt: String =
            sentence.repeat(kb * 1024 / sentence.len() + 1)[..kb * 1024].to_owned();
        let mut base = Vec::new();
        let mut with = Vec::new();
        let plain = bundle(json!({}));
        for i in 0..2_000usize {
            let r = &reqs[i % reqs.len()];
            let t = Instant::now();
            black_box(run(&plain, &u, r, &prompt));
            base.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let d = run(&b, &u, r, &prompt);
            with.push(t.elapsed().as_nanos() as u64);
            assert!(matches!(d, Decision::Allow(_)), "{d:?}");
        }
        base.sort_unstable();
        with.sort_unstable();
        let median = |v: &[u64]| v[v.len() / 2] as f64 / 1000.0;
        let scan = median(&with) - median(&base);
        println!(
            "content rules (10 literals, 5 regexes), {kb} KB prompt: {scan:.1} us for the scan = {:.2} us/KB",
            scan / kb as f64
        );
    }
}

fn bench(c: &mut Criterion) {
    let b = bundle(json!({}));
    let u = usage(&b);
    let reqs = requests();
    let mut i = 0usize;
    c.bench_function("decide (100 tenants, 50 models)", |bench| {
        bench.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(run(&b, &u, &reqs[i], "Summarise the claim."))
        })
    });
}

criterion_group!(benches, bench);

fn main() {
    report_percentiles();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
