//! Content validation: every cross-check refuses, naming what is wrong.

use serde_json::{Value, json};

use super::*;

/// A realistic bundle: Gemma under its custom terms (with a prohibited-use
/// policy and a derivative naming rule), a fine-tune derived from it, and an
/// Apache-2.0 ONNX model; two tenants.
pub(crate) fn sample() -> Value {
    json!({
        "schema": 1,
        "bundle_version": 7,
        "iss": "policy-authority.corp.example",
        "aud": "site-7",
        "iat": 1_790_000_000i64,
        "nbf": 1_790_000_000i64,
        "exp": 1_800_000_000i64,
        "licences": [
            {
                "id": "LicenseRef-Gemma-Terms",
                "name": "Gemma Terms of Use",
                "commercial_use": true,
                "prohibited_uses": ["weapons-development", "surveillance"],
                "attribution": "Gemma is provided under and subject to the Gemma Terms of Use",
                "derivative_prefix": "gemma-",
                "review_by": "2027-06-30",
                "after_review": "flag"
            },
            {
                "id": "Apache-2.0",
                "name": "Apache License 2.0",
                "commercial_use": true,
                "review_by": "2028-01-01",
                "after_review": "flag"
            }
        ],
        "models": [
            {
                "id": "gemma-3-270m",
                "files": [{"role": "weights", "name": "gemma-3-270m-q4_k_m.gguf",
                           "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"}],
                "format": "gguf",
                "kinds": ["chat", "completion"],
                "licence": "LicenseRef-Gemma-Terms"
            },
            {
                "id": "gemma-claims-ft",
                "files": [{"role": "weights", "name": "gemma-claims-ft.gguf",
                           "sha256": "00".repeat(32)}],
                "format": "gguf",
                "kinds": ["chat"],
                "licence": "Apache-2.0",
                "derived_from": "gemma-3-270m"
            },
            {
                "id": "minilm-l3",
                "files": [{"role": "weights", "name": "paraphrase-MiniLM-L3-v2.onnx",
                           "sha256": "11".repeat(32)}],
                "format": "onnx",
                "kinds": ["embedding"],
                "licence": "Apache-2.0"
            }
        ],
        "tenants": [
            {
                "id": "claims",
                "identities": {"uris": ["spiffe://corp.example/tenant/claims"], "uids": [1001]},
                "purposes": ["claims-triage", "summarisation"],
                "default_purpose": "claims-triage",
                "models": ["gemma-3-270m", "gemma-claims-ft"],
                "limits": {"requests_per_minute": 600, "tokens_per_day": 2_000_000, "concurrent_requests": 8, "max_tokens_per_request": 1024},
                "user_identity": {"kind": "openai_user"},
                "user_cap": {"max_users_per_month": 50, "scope": "host", "over_cap": "refuse_new_users"},
                "content": {"deny_literals": ["Ignore previous instructions"], "deny_regex": ["(?i)\\bssn\\b"], "max_prompt_chars": 20000}
            },
            {
                "id": "search",
                "identities": {"gids": [2002]},
                "purposes": ["retrieval"],
                "default_purpose": "retrieval",
                "models": ["minilm-l3"],
                "user_identity": {"kind": "header", "name": "x-end-user"}
            }
        ]
    })
}

fn validate(v: Value) -> Result<Bundle, ContentError> {
    let wire: WireBundle = serde_json::from_value(v).expect("wire shape");
    wire.validate()
}

#[test]
fn the_sample_validates_with_licence_chains() {
    let b = validate(sample()).expect("valid");
    assert_eq!(b.version, 7);
    assert_eq!(
        b.models["gemma-claims-ft"].licence_chain,
        vec!["Apache-2.0", "LicenseRef-Gemma-Terms"]
    );
    assert_eq!(
        b.models["gemma-3-270m"].licence_chain,
        vec!["LicenseRef-Gemma-Terms"]
    );
    assert_eq!(
        b.licences["LicenseRef-Gemma-Terms"].review_by.to_string(),
        "2027-06-30"
    );
    assert_eq!(b.tenants.len(), 2);
    assert!(
        b.tenants[&TenantId::parse("claims").expect("id")]
            .content
            .deny_regex
            .is_match("my SSN is")
    );
}

fn edit(f: impl FnOnce(&mut Value)) -> Value {
    let mut v = sample();
    f(&mut v);
    v
}

#[test]
fn cross_checks_refuse_naming_the_problem() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "schema",
            edit(|v| v["schema"] = json!(2)),
            "schema 2 is not supported",
        ),
        (
            "duplicate licence",
            edit(|v| {
                let l = v["licences"][1].clone();
                v["licences"].as_array_mut().expect("array").push(l);
            }),
            "duplicate licence \"Apache-2.0\"",
        ),
        (
            "unknown licence",
            edit(|v| v["models"][2]["licence"] = json!("MIT")),
            "names licence \"MIT\"",
        ),
        (
            "bad user assertion key",
            edit(|v| {
                v["tenants"][0]["user_identity"] =
                    json!({"kind": "assertion", "keys": {"front-end": "c2hvcnQ"}})
            }),
            "user assertion key \"front-end\" is not base64url of a 32-byte Ed25519 public key",
        ),
        (
            "no user assertion keys",
            edit(|v| v["tenants"][0]["user_identity"] = json!({"kind": "assertion", "keys": {}})),
            "user assertion keys are empty",
        ),
        (
            "malformed sha256",
            edit(|v| v["models"][2]["files"][0]["sha256"] = json!("ABC")),
            "is not 64 lower-case hex digits",
        ),
        (
            "upper-case sha256",
            edit(|v| v["models"][2]["files"][0]["sha256"] = json!("AB".repeat(32))),
            "is not 64 lower-case hex digits",
        ),
        (
            "path in file name",
            edit(|v| v["models"][2]["files"][0]["name"] = json!("../etc/shadow")),
            "must be a plain file name",
        ),
        (
            "NUL in file name",
            edit(|v| v["models"][2]["files"][0]["name"] = json!("model.gguf\u{0}.txt")),
            "must be a plain file name",
        ),
        (
            "control character in file name",
            edit(|v| v["models"][2]["files"][0]["name"] = json!("model\u{1b}[2J.gguf")),
            "must be a plain file name",
        ),
        (
            "deny literal of nothing but invisible characters",
            edit(|v| v["tenants"][0]["content"] = json!({"deny_literals": ["\u{200b}\u{ad}"]})),
            "an empty deny_literal would deny everything",
        ),
        (
            "unknown parent",
            edit(|v| v["models"][1]["derived_from"] = json!("llama-9000")),
            "derived from \"llama-9000\", which is not in the manifest",
        ),
        (
            "cycle",
            edit(|v| v["models"][0]["derived_from"] = json!("gemma-claims-ft")),
            "derived-from chain loops",
        ),
        (
            "derivative name",
            edit(|v| {
                v["models"][1]["id"] = json!("claims-ft");
                v["tenants"][0]["models"] = json!(["gemma-3-270m"]);
            }),
            "requires derivative names to start with \"gemma-\"",
        ),
        (
            "tenant model not in manifest",
            edit(|v| v["tenants"][1]["models"] = json!(["bert-base"])),
            "may use model \"bert-base\", which is not in the manifest",
        ),
        (
            "default purpose",
            edit(|v| v["tenants"][1]["default_purpose"] = json!("chat")),
            "default purpose \"chat\" is not one of its purposes",
        ),
        (
            "prohibited purpose, direct",
            edit(|v| v["tenants"][0]["purposes"] = json!(["claims-triage", "surveillance"])),
            "declares purpose \"surveillance\", which licence \"LicenseRef-Gemma-Terms\" of model \"gemma-3-270m\" prohibits",
        ),
        (
            "prohibited purpose, through derived-from",
            edit(|v| {
                v["tenants"][0]["models"] = json!(["gemma-claims-ft"]);
                v["tenants"][0]["purposes"] = json!(["claims-triage", "weapons-development"]);
            }),
            "licence \"LicenseRef-Gemma-Terms\" of model \"gemma-claims-ft\" prohibits",
        ),
        (
            "shared identity",
            edit(|v| v["tenants"][1]["identities"]["uids"] = json!([1001])),
            "identity uid 1001 is claimed by tenants \"claims\" and \"search\"",
        ),
        (
            "bad regex",
            edit(|v| v["tenants"][0]["content"]["deny_regex"] = json!(["(unclosed"])),
            "deny_regex \"(unclosed\"",
        ),
        (
            "empty literal",
            edit(|v| v["tenants"][0]["content"]["deny_literals"] = json!([""])),
            "would deny everything",
        ),
        (
            "review date",
            edit(|v| v["licences"][0]["review_by"] = json!("2027-02-30")),
            "expected a date YYYY-MM-DD",
        ),
        (
            "bad tenant id",
            edit(|v| v["tenants"][0]["id"] = json!("claims team")),
            "invalid tenant name",
        ),
        (
            "no identities",
            edit(|v| v["tenants"][1]["identities"] = json!({})),
            "no identities",
        ),
        (
            "bad user header",
            edit(|v| {
                v["tenants"][1]["user_identity"] = json!({"kind": "header", "name": "X User"})
            }),
            "is not a valid header name",
        ),
        (
            "fleet share without a share",
            edit(|v| v["tenants"][0]["user_cap"]["scope"] = json!("fleet_share")),
            "needs host_share",
        ),
        (
            "fleet share out of range",
            edit(|v| {
                v["tenants"][0]["user_cap"]["scope"] = json!("fleet_share");
                v["tenants"][0]["user_cap"]["host_share"] = json!(1.5);
            }),
            "is not in (0, 1]",
        ),
        (
            "guard model missing",
            edit(|v| {
                v["tenants"][0]["content"]["guard"] =
                    json!({"model": "nope", "label": "unsafe", "threshold": 0.5})
            }),
            "guard: model \"nope\" is not in the manifest",
        ),
        (
            "guard not a classifier",
            edit(|v| {
                v["tenants"][0]["content"]["guard"] =
                    json!({"model": "gemma-3-270m", "label": "unsafe", "threshold": 0.5})
            }),
            "is not of kind \"classifier\"",
        ),
        (
            "host share on a host cap",
            edit(|v| v["tenants"][0]["user_cap"]["host_share"] = json!(0.5)),
            "only meaningful with scope",
        ),
    ];
    for (name, bundle, want) in cases {
        let err = validate(bundle)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
}

/// 2,000 patterns of 10 bytes, each far under any limit for one pattern
/// (`\w{0,20}N` is some 400 KB of program): one bundle's worth took 8 s and
/// 2.2 GB to compile when nothing bounded their total.
fn heavy_patterns(n: usize) -> Vec<String> {
    vec![r"\w{0,20}N".to_owned(); n]
}

#[test]
fn one_tenants_deny_regex_patterns_share_the_bundles_budget() {
    let started = std::time::Instant::now();
    let err = validate(edit(|v| {
        v["tenants"][0]["content"]["deny_regex"] = json!(heavy_patterns(2000));
    }))
    .expect_err("over the budget");
    let elapsed = started.elapsed();
    assert_eq!(
        err,
        ContentError::RegexBudget {
            patterns: 2000,
            tenants: 1,
            limit: REGEX_BUDGET_BYTES
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("2000 deny_regex patterns") && message.contains("4194304 bytes"),
        "{message}"
    );
    // The compile stops at the budget instead of finishing 2,000 programs.
    assert!(
        elapsed < std::time::Duration::from_secs(2),
        "refused after {elapsed:?}"
    );
}

#[test]
fn many_tenants_deny_regex_patterns_share_the_bundles_budget() {
    // One heavy pattern per tenant: each tenant's set is small, the bundle's is not.
    let tenants = |n: usize| {
        (0..n)
            .map(|i| {
                json!({
                    "id": format!("t{i}"),
                    "identities": {"uids": [10_000 + i]},
                    "purposes": ["retrieval"],
                    "default_purpose": "retrieval",
                    "models": ["minilm-l3"],
                    "user_identity": {"kind": "header", "name": "x-end-user"},
                    "content": {"deny_regex": heavy_patterns(1)}
                })
            })
            .collect::<Vec<_>>()
    };
    let started = std::time::Instant::now();
    let err = validate(edit(|v| v["tenants"] = json!(tenants(2000)))).expect_err("over");
    assert_eq!(
        err,
        ContentError::RegexBudget {
            patterns: 2000,
            tenants: 2000,
            limit: REGEX_BUDGET_BYTES
        }
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // The same patterns on a few tenants fit.
    let b = validate(edit(|v| v["tenants"] = json!(tenants(3)))).expect("within the budget");
    assert!(
        b.tenants[&TenantId::parse("t2").expect("id")]
            .content
            .deny_regex
            .is_match("abcN")
    );
}

#[test]
fn a_realistic_deny_regex_set_is_accepted() {
    let patterns = json!([
        "(?i)\\bssn\\b",
        "\\b\\d{3}-\\d{2}-\\d{4}\\b",
        "(?i)api[_-]?key\\s*[:=]",
        "(?i)password\\s*[:=]",
        "\\b4[0-9]{12}(?:[0-9]{3})?\\b",
        "(?i)\\b\\w+@\\w+\\.\\w{2,}\\b"
    ]);
    let b = validate(edit(|v| {
        v["tenants"][0]["content"]["deny_regex"] = patterns.clone();
        v["tenants"][1]["content"] = json!({"deny_regex": patterns});
    }))
    .expect("valid");
    for t in b.tenants.values() {
        let set = &t.content.deny_regex;
        assert_eq!(set.len(), 6);
        assert!(set.is_match("my api_key = 12"));
        assert!(set.is_match("write to jane@example.org"));
        assert!(!set.is_match("Summarise claim 4411."));
    }
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    for path in [
        &["extra"][..],
        &["licences", "0", "extra"],
        &["models", "0", "extra"],
        &["models", "0", "files", "0", "extra"],
        &["tenants", "0", "extra"],
        &["tenants", "0", "limits", "extra"],
        &["tenants", "0", "content", "extra"],
    ] {
        let mut v = sample();
        let mut at = &mut v;
        for key in &path[..path.len() - 1] {
            at = match key.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*key],
            };
        }
        at[path[path.len() - 1]] = json!(1);
        let err = serde_json::from_value::<WireBundle>(v).expect_err("refused");
        assert!(err.to_string().contains("unknown field"), "{path:?}: {err}");
    }
}
