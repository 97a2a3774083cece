//! The compliance report and the evidence pack, from real stores: scripted
//! mixed traffic (allowed, refused for six reasons, two tenants, an
//! unidentified caller, two bundle versions) over two months on an
//! injected clock; the report's figures against those this test computes
//! from the audit records; the HTML self-contained; a pack that verifies,
//! fails naming the file someone changed, and merges with a second host's
//! pack counting each user once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use airgate_tests::{Daemon, Sandbox, airgate_bin, models_dir, policy, post_json, wait_model};
use serde_json::{Value, json};

use crate::llm::{GEMMA, client_bin};

const MINILM: &str = "paraphrase-minilm-l3";
const GEMMA_LICENCE: &str = "LicenseRef-Gemma-Terms-of-Use";

fn airgate(args: &[&str]) -> std::process::Output {
    Command::new(airgate_bin())
        .args(args)
        .output()
        .expect("run airgate")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Two tenants: `claims` (uid 0; both models; at most 3 users a month;
/// a deny literal) and `search` (uid 4321; MiniLM only). Gemma's terms
/// allow 2 distinct users a month. Valid from well before last month.
fn bundle(version: u64) -> String {
    let tenants = format!(
        "[[tenants]]\nid = \"claims\"\nidentities = {{ uids = [0] }}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\", \"{GEMMA}\"]\nuser_identity = {{ kind = \"openai_user\" }}\nuser_cap = {{ max_users_per_month = 3, scope = \"host\", over_cap = \"refuse_new_users\" }}\ncontent = {{ deny_literals = [\"forbidden-word\"] }}\n\n\
         [[tenants]]\nid = \"search\"\nidentities = {{ uids = [4321] }}\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"{MINILM}\"]\nuser_identity = {{ kind = \"openai_user\" }}\n"
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let p = policy(version, &tenants)
        .replace(
            "after_review = \"flag\"\n\n[[licences]]\nid = \"Apache-2.0\"",
            "after_review = \"flag\"\nmonthly_active_user_threshold = 2\n\n[[licences]]\nid = \"Apache-2.0\"",
        )
        .replacen(
            "\n\n[[licences]]",
            &format!(
                "\niat = {}\nnbf = {}\nexp = {}\n\n[[licences]]",
                now - 70 * 86_400,
                now - 70 * 86_400,
                now + 30 * 86_400
            ),
            1,
        );
    assert!(p.contains("monthly_active_user_threshold = 2"));
    p
}

fn config(sb: &Sandbox, secret: &Path) -> String {
    sb.config(
        "mode = \"0660\"\ngroup = 4321",
        "[llm]\nslots = 2\ncontext = 512\n",
    )
    .replace(
        "state_dir = ",
        &format!("models_dir = \"{}\"\nstate_dir = ", models_dir().display()),
    )
    .replace(
        "[audit]\n",
        &format!(
            "[audit]\ncheckpoint_every = 4\nuser_secret = \"{}\"\n",
            secret.display()
        ),
    )
}

/// The clock offset that puts the daemon at `day` 12:00 UTC of last month.
pub(crate) fn last_month(day: u8) -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let first = now.date().replace_day(1).expect("first of the month");
    let prev = first.previous_day().expect("a day before");
    let at = prev
        .replace_day(day)
        .expect("day")
        .with_hms(12, 0, 0)
        .expect("noon")
        .assume_utc();
    (
        format!("{:04}-{:02}", prev.year(), u8::from(prev.month())),
        (at.unix_timestamp() - now.unix_timestamp()).to_string(),
    )
}

fn start(sb: &Sandbox, secret: &Path, offset: Option<&str>) -> Daemon {
    let env = offset.map(|o| format!("clock-offset={o}"));
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|e| ("AIRGATE_FAILPOINTS", e.as_str()))
        .collect();
    let d = Daemon::start(sb, &config(sb, secret), &env);
    wait_model(&d, MINILM);
    wait_model(&d, GEMMA);
    d
}

fn stop(mut d: Daemon) {
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(std::time::Duration::from_secs(20));
}

/// "200", or the refusal's reason code.
fn outcome(r: &airgate_tests::Response) -> String {
    if r.status == 200 {
        return "200".to_owned();
    }
    r.json()["error"]["code"]
        .as_str()
        .map_or_else(|| r.status.to_string(), str::to_owned)
}

fn embed(d: &Daemon, user: Option<&str>, model: &str, text: &str) -> String {
    let mut body = json!({"model": model, "input": text});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    outcome(&post_json(&d.socket, "/v1/embeddings", &body.to_string()))
}

fn chat(d: &Daemon, user: &str) -> String {
    let body = json!({"model": GEMMA, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0, "user": user});
    outcome(&post_json(
        &d.socket,
        "/v1/chat/completions",
        &body.to_string(),
    ))
}

/// One POST as another user (uid, with group 4321 to reach the socket).
fn post_as(uid: u32, d: &Daemon, path: &str, body: &Value) -> u16 {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg("--regid=4321")
        .arg("--clear-groups")
        .arg(client_bin())
        .arg(&d.socket)
        .arg(path)
        .arg(body.to_string())
        .output()
        .expect("test client");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

fn search(d: &Daemon, user: &str, model: &str) -> u16 {
    post_as(
        4321,
        d,
        "/v1/embeddings",
        &json!({"model": model, "input": "query", "user": user}),
    )
}

/// Every record of a store, read directly (the daemon stopped).
fn export_state(state: &Path) -> Vec<Value> {
    ok(&airgate(&["audit", "export", "--state", s(state)]))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn month_of(time: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(time).expect("time");
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// What the records say about `month`, computed here from the export
/// lines of each host: an allowed request counts (with its user) unless its
/// completion says nothing was served; tokens from completions.
fn expected(hosts: &[Vec<Value>], month: &str) -> Value {
    let mut decisions = 0u64;
    let mut allowed = 0u64;
    let mut denials: BTreeMap<String, u64> = BTreeMap::new();
    let mut users: BTreeSet<(String, String)> = BTreeSet::new();
    let mut model_requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut model_denied: BTreeMap<String, u64> = BTreeMap::new();
    let mut model_users: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    let mut tenant_requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut tenant_denied: BTreeMap<String, u64> = BTreeMap::new();
    let mut tenant_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut licence_users: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    let (mut prompt, mut completion) = (0u64, 0u64);
    for records in hosts {
        let completions: BTreeMap<&str, &Value> = records
            .iter()
            .map(|r| &r["event"])
            .filter(|e| e["kind"] == "completion")
            .map(|e| (e["request_id"].as_str().expect("id"), e))
            .collect();
        for r in records {
            let e = &r["event"];
            if e["kind"] != "decision" || month_of(r["time"].as_i64().expect("time")) != month {
                continue;
            }
            decisions += 1;
            let tenant = e["tenant"].as_str().unwrap_or("(no tenant)").to_owned();
            let model = e["model"].as_str().expect("model").to_owned();
            if e["decision"] != "allow" {
                // Names no manifest has are one row (callers may probe names).
                let model = if [MINILM, GEMMA].contains(&model.as_str()) {
                    model
                } else {
                    "(models not in a manifest)".to_owned()
                };
                *denials
                    .entry(e["reason"].as_str().expect("reason").to_owned())
                    .or_default() += 1;
                *model_denied.entry(model).or_default() += 1;
                *tenant_denied.entry(tenant).or_default() += 1;
                continue;
            }
            allowed += 1;
            let c = completions.get(e["request_id"].as_str().expect("id"));
            let (p, g) = c.map_or((0, 0), |c| {
                (
                    c["prompt_tokens"].as_u64().expect("tokens"),
                    c["completion_tokens"].as_u64().expect("tokens"),
                )
            });
            let served = c.is_none_or(|c| c["served"].as_bool().unwrap_or(p + g > 0));
            if !served {
                continue;
            }
            prompt += p;
            completion += g;
            *model_requests.entry(model.clone()).or_default() += 1;
            *tenant_requests.entry(tenant.clone()).or_default() += 1;
            if let Some(u) = e["end_user"].as_str() {
                let key = (tenant.clone(), u.to_owned());
                users.insert(key.clone());
                model_users.entry(model).or_default().insert(key.clone());
                tenant_users.entry(tenant).or_default().insert(u.to_owned());
                for l in e["licences"].as_array().expect("licences") {
                    licence_users
                        .entry(l.as_str().expect("licence").to_owned())
                        .or_default()
                        .insert(key.clone());
                }
            }
        }
    }
    json!({
        "totals": {"decisions": decisions, "allowed": allowed, "denied": decisions - allowed,
                   "prompt_tokens": prompt, "completion_tokens": completion,
                   "distinct_users": users.len(), "requests": model_requests.values().sum::<u64>()},
        "denials": denials,
        "model_requests": model_requests,
        "model_denied": model_denied,
        "model_users": model_users.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
        "tenant_requests": tenant_requests,
        "tenant_denied": tenant_denied,
        "tenant_users": tenant_users.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
        "licence_users": licence_users.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
    })
}

/// The same figures, as the report states them.
fn stated(report: &Value) -> Value {
    let rows = |list: &str, key: &str, field: &str| -> BTreeMap<String, u64> {
        report[list]
            .as_array()
            .expect("rows")
            .iter()
            .filter(|r| r[field].as_u64().unwrap_or(0) > 0)
            .map(|r| {
                (
                    r[key].as_str().expect("id").to_owned(),
                    r[field].as_u64().expect("n"),
                )
            })
            .collect()
    };
    let t = &report["totals"];
    json!({
        "totals": {"decisions": t["decisions"], "allowed": t["allowed"], "denied": t["denied"],
                   "prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
                   "distinct_users": t["distinct_users"], "requests": t["requests"]},
        "denials": report["denials"],
        "model_requests": rows("models", "id", "requests"),
        "model_denied": rows("models", "id", "denied"),
        "model_users": rows("models", "id", "distinct_users"),
        "tenant_requests": rows("tenants", "id", "requests"),
        "tenant_denied": rows("tenants", "id", "denied"),
        "tenant_users": rows("tenants", "id", "distinct_users"),
        "licence_users": rows("licences", "id", "distinct_users"),
    })
}

fn report_json(args: &[&str]) -> Value {
    let mut all = vec!["report", "--format", "json", "-o", "-"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&airgate(&all))).expect("report json")
}

fn row<'a>(report: &'a Value, list: &str, id: &str) -> &'a Value {
    report[list]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

#[test]
fn the_report_and_evidence_pack_match_the_records_over_two_months_and_two_hosts() {
    let sb = Sandbox::new();
    let secret = sb.path().join("fleet-user.key");
    std::fs::write(&secret, [7u8; 32]).expect("secret");
    let state = sb.path().join("state");
    let (month_a, day5) = last_month(5);
    let (_, day20) = last_month(20);
    sb.publish(&sb.sign("v1", &bundle(1)));

    // Last month, day 5: allowed and refused traffic of both tenants.
    let d = start(&sb, &secret, Some(&day5));
    d.wait_bundle(1);
    for user in ["a", "b", "c", "a"] {
        assert_eq!(embed(&d, Some(user), MINILM, "a claim"), "200");
    }
    assert_eq!(embed(&d, Some("d"), MINILM, "a claim"), "tenant_user_cap");
    assert_eq!(
        embed(&d, Some("a"), MINILM, "a forbidden-word claim"),
        "content_rule"
    );
    assert_eq!(embed(&d, None, MINILM, "no user"), "user_required");
    assert_eq!(
        embed(&d, Some("a"), "no-such-model", "x"),
        "model_not_found",
        "model_not_in_manifest in the record"
    );
    assert_eq!(chat(&d, "a"), "200");
    assert_eq!(chat(&d, "b"), "200");
    assert_eq!(chat(&d, "c"), "licence_user_threshold");
    assert_eq!(search(&d, "a", MINILM), 200);
    assert_eq!(search(&d, "x", MINILM), 200);
    assert_ne!(search(&d, "x", GEMMA), 200, "model_not_allowed");
    assert_eq!(
        post_as(
            5555,
            &d,
            "/v1/embeddings",
            &json!({"model": MINILM, "input": "x", "user": "z"})
        ),
        403,
        "unknown_identity"
    );
    stop(d);

    // Day 20: counts restored after the restart; bundle 2 arrives.
    let d = start(&sb, &secret, Some(&day20));
    assert_eq!(embed(&d, Some("a"), MINILM, "again"), "200");
    assert_eq!(
        embed(&d, Some("e"), MINILM, "new"),
        "tenant_user_cap",
        "still capped"
    );
    assert_eq!(search(&d, "y", MINILM), 200);
    sb.publish(&sb.sign("v2", &bundle(2)));
    d.wait_bundle(2);
    assert_eq!(chat(&d, "a"), "200");
    stop(d);

    // This month.
    let d = start(&sb, &secret, None);
    let month_b = month_of(time::OffsetDateTime::now_utc().unix_timestamp());
    assert_eq!(embed(&d, Some("a"), MINILM, "new month"), "200");
    assert_eq!(embed(&d, Some("f"), MINILM, "new month"), "200");
    assert_eq!(
        embed(&d, Some("f"), MINILM, "forbidden-word"),
        "content_rule"
    );
    assert_eq!(search(&d, "x", MINILM), 200);
    assert_eq!(chat(&d, "f"), "200");

    // Live, through the admin socket: this month's figures equal the records'.
    // (Completions are recorded after the answer: wait for the last one.)
    let cfg = sb.config_path();
    let mut live = Value::Null;
    for _ in 0..50 {
        live = report_json(&["--month", &month_b, "--config", s(&cfg)]);
        if live["totals"]["cut_off"] == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        live["hosts"][0]["source"]
            .as_str()
            .expect("source")
            .contains("running daemon")
    );
    assert_eq!(live["chain_verified"], true, "{live}");
    let records_b = {
        let out = ok(&airgate(&["audit", "export", "--config", s(&cfg)]));
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("line"))
            .collect::<Vec<_>>()
    };
    assert_eq!(stated(&live), expected(&[records_b], &month_b), "{live:#}");
    assert_eq!(live["totals"]["distinct_users"], 3, "claims a, f; search x");
    assert!(
        live["notes"][0]
            .as_str()
            .expect("note")
            .contains("not over")
    );
    // A snapshot the daemon writes reads the same; its bundles come from the
    // configuration's state directory (a snapshot holds the audit store).
    let snap = ok(&airgate(&["audit", "snapshot", "--config", s(&cfg)]));
    let snap_dir = snap
        .lines()
        .find_map(|l| l.strip_prefix("verify: airgate audit verify --state "))
        .expect("snapshot path")
        .to_owned();
    let from_snapshot = report_json(&[
        "--month",
        &month_b,
        "--state",
        &snap_dir,
        "--config",
        s(&cfg),
    ]);
    assert_eq!(
        stated(&from_snapshot),
        stated(&live),
        "snapshot {from_snapshot:#}\nlive {live:#}"
    );
    let signatures = |r: &Value| -> Vec<(Value, Value)> {
        r["bundles"]
            .as_array()
            .expect("bundles")
            .iter()
            .map(|b| (b["version"].clone(), b["signature"].clone()))
            .collect()
    };
    assert_eq!(signatures(&from_snapshot), signatures(&live));
    assert!(
        from_snapshot["bundles"][0]["signature"]
            .as_str()
            .expect("signature")
            .starts_with("verified")
    );
    stop(d);
    // A clean stop seals a checkpoint over the last record: the month so
    // far is vouched for without waiting for a later run.
    let stopped = report_json(&[
        "--month",
        &month_b,
        "--state",
        s(&state),
        "--config",
        s(&cfg),
    ]);
    assert_eq!(
        stopped["hosts"][0]["month_covered"], true,
        "{}",
        stopped["hosts"][0]
    );
    assert_eq!(stated(&stopped), stated(&live));

    // Last month, from the stopped store.
    let records = export_state(&state);
    let report = report_json(&[
        "--month",
        &month_a,
        "--state",
        s(&state),
        "--config",
        s(&cfg),
    ]);
    let want = expected(std::slice::from_ref(&records), &month_a);
    assert_eq!(stated(&report), want, "{report:#}");
    // The scripted figures, to be sure the computation above is not vacuous.
    assert_eq!(
        report["totals"]["distinct_users"], 6,
        "claims a b c; search a x y"
    );
    assert_eq!(row(&report, "tenants", "claims")["distinct_users"], 3);
    assert_eq!(
        row(&report, "tenants", "claims")["cap"]["max_users_per_month"],
        3
    );
    assert_eq!(row(&report, "licences", GEMMA_LICENCE)["distinct_users"], 2);
    assert_eq!(row(&report, "licences", GEMMA_LICENCE)["threshold"], 2);
    assert!(
        row(&report, "licences", GEMMA_LICENCE)["attribution"]
            .as_str()
            .expect("attribution")
            .contains("Gemma Terms of Use")
    );
    for reason in [
        "tenant_user_cap",
        "content_rule",
        "user_required",
        "model_not_in_manifest",
        "licence_user_threshold",
        "model_not_allowed",
        "unknown_identity",
    ] {
        assert!(
            report["denials"][reason].as_u64().unwrap_or(0) >= 1,
            "{reason}: {}",
            report["denials"]
        );
    }
    let daily = row(&report, "tenants", "search")["daily_requests"]
        .as_array()
        .expect("daily")
        .clone();
    assert_eq!(daily[4], 2, "search on day 5: {daily:?}");
    assert_eq!(daily[19], 1, "search on day 20: {daily:?}");
    let versions: Vec<u64> = report["bundles"]
        .as_array()
        .expect("bundles")
        .iter()
        .map(|b| b["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions, [1, 2], "both bundles were in force last month");
    assert!(
        report["bundles"][0]["signature"]
            .as_str()
            .expect("sig")
            .starts_with("verified")
    );
    let gemma = row(&report, "models", GEMMA);
    assert_eq!(
        gemma["files"][0]["sha256"],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    assert!(gemma["completion_tokens"].as_u64().expect("tokens") > 0);
    let chain = &report["hosts"][0];
    assert_eq!(chain["verified"], true, "{chain}");
    assert_eq!(chain["month_covered"], true, "{chain}");
    assert!(chain["signed_checkpoints"].as_u64().expect("n") >= 3);

    // HTML: self-contained, charts inline, nothing may be loaded.
    let html_path = sb.path().join("report.html");
    ok(&airgate(&[
        "report",
        "--month",
        &month_a,
        "--state",
        s(&state),
        "--config",
        s(&cfg),
        "-o",
        s(&html_path),
    ]));
    let html = std::fs::read_to_string(&html_path).expect("html");
    assert_eq!(
        airgate::report::render::external_references(&html),
        Vec::<String>::new()
    );
    assert!(
        html.contains(
            "http-equiv=\"Content-Security-Policy\" content=\"default-src &#39;none&#39;"
        ),
        "CSP"
    );
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "a users chart per licence with users, and requests per tenant"
    );
    assert!(!html.contains("<script"));
    let md = String::from_utf8(
        airgate(&[
            "report",
            "--month",
            &month_a,
            "--state",
            s(&state),
            "--config",
            s(&cfg),
            "--format",
            "md",
            "-o",
            "-",
        ])
        .stdout,
    )
    .expect("md");
    assert!(md.contains("| claims | "), "{md}");

    // The evidence pack verifies; a changed file is named; so is a missing one.
    let pack = sb.path().join("pack-a");
    make_pack(&month_a, s(&state), s(&cfg), &pack);
    let verified = ok(&airgate(&["evidence", "verify", s(&pack)]));
    assert!(
        verified.contains("wholly between signed checkpoints"),
        "{verified}"
    );
    let pack_report: Value =
        serde_json::from_slice(&std::fs::read(pack.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(stated(&pack_report), want);
    let host_pub = state.join("host.pub");
    ok(&airgate(&[
        "evidence",
        "verify",
        s(&pack),
        "--host-key",
        s(&host_pub),
    ]));
    // What the monthly timer runs: last month's pack as a .tar named by
    // the month, written once; a second run leaves it, -o never overwrites.
    let packs = sb.path().join("packs");
    std::fs::create_dir(&packs).expect("packs dir");
    let by_timer = |packs: &Path| {
        airgate(&[
            "evidence",
            "--month",
            "last",
            "--into",
            s(packs),
            "--state",
            s(&state),
            "--config",
            s(&cfg),
        ])
    };
    ok(&by_timer(&packs));
    let tar = packs.join(format!("airgate-evidence-{month_a}.tar"));
    ok(&airgate(&["evidence", "verify", s(&tar)]));
    let written = std::fs::read(&tar).expect("pack");
    let again = ok(&by_timer(&packs));
    assert!(again.contains("written before"), "{again}");
    let out = airgate(&[
        "evidence",
        "--month",
        &month_a,
        "--state",
        s(&state),
        "--config",
        s(&cfg),
        "-o",
        s(&tar),
    ]);
    assert_eq!(out.status.code(), Some(73), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwritten"));
    assert_eq!(std::fs::read(&tar).expect("pack"), written);
    assert_eq!(
        std::fs::read_dir(&packs).expect("packs").count(),
        1,
        "no temporary left"
    );

    let tampered = sb.path().join("tampered");
    copy_dir(&pack, &tampered);
    let export = tampered.join("audit/export.jsonl");
    let text =
        std::fs::read_to_string(&export)
            .expect("export")
            .replacen("\"deny\"", "\"allow\"", 1);
    std::fs::write(&export, text).expect("tamper");
    let out = airgate(&["evidence", "verify", s(&tampered)]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit/export.jsonl: modified"), "{err}");
    assert!(
        !err.contains("report.json"),
        "only the changed file is named: {err}"
    );
    std::fs::remove_file(
        tampered
            .join("bundles")
            .read_dir()
            .expect("bundles")
            .next()
            .expect("a bundle")
            .expect("entry")
            .path(),
    )
    .expect("rm");
    let err = String::from_utf8_lossy(&airgate(&["evidence", "verify", s(&tampered)]).stderr)
        .into_owned();
    assert!(err.contains("missing"), "{err}");
    // A pack checked against another host's key fails.
    let other = Sandbox::new();
    ok(&airgate(&[
        "keygen",
        "--dir",
        s(other.path()),
        "--name",
        "other",
    ]));
    let out = airgate(&[
        "evidence",
        "verify",
        s(&pack),
        "--host-key",
        s(&other.path().join("other.pub")),
    ]);
    assert_eq!(out.status.code(), Some(65));

    // A second host of the fleet (same user secret): users a (also on the
    // first host) and g for claims, x for search, last month.
    let sb2 = fleet_host(&sb);
    let state2 = sb2.path().join("state");
    sb2.publish(&sb.sign("v2", &bundle(2)));
    let (_, day10) = last_month(10);
    let d2 = start(&sb2, &secret, Some(&day10));
    d2.wait_bundle(2);
    assert_eq!(embed(&d2, Some("a"), MINILM, "host two"), "200");
    assert_eq!(embed(&d2, Some("g"), MINILM, "host two"), "200");
    assert_eq!(search(&d2, "x", MINILM), 200);
    stop(d2);
    // A later run: a checkpoint after last month's end.
    let d2 = start(&sb2, &secret, None);
    assert_eq!(embed(&d2, Some("h"), MINILM, "this month"), "200");
    assert_eq!(embed(&d2, Some("h"), MINILM, "this month"), "200");
    stop(d2);
    let cfg2 = sb2.config_path();
    let pack2 = sb2.path().join("pack-b.tar");
    make_pack(&month_a, s(&state2), s(&cfg2), &pack2);
    ok(&airgate(&["evidence", "verify", s(&pack2)]));
    let merged = report_json(&["--month", &month_a, "--pack", s(&pack), "--pack", s(&pack2)]);
    let records2 = export_state(&state2);
    assert_eq!(
        stated(&merged),
        expected(&[records, records2], &month_a),
        "{merged:#}"
    );
    assert_eq!(merged["hosts"].as_array().expect("hosts").len(), 2);
    assert_eq!(
        row(&merged, "tenants", "claims")["distinct_users"],
        4,
        "a, b, c and g: a counted once across the hosts"
    );
    assert_eq!(merged["totals"]["distinct_users"], 7);
    let cap = &row(&merged, "tenants", "claims")["cap"];
    assert_eq!(
        cap["most_users_on_a_host"], 3,
        "the host-scoped cap binds per host: {cap}"
    );
    assert_eq!(cap["fraction"], 1.0);

    // scripts/extended renders these in headless Chromium.
    if let Some(dir) = std::env::var_os("AIRGATE_REPORT_ARTEFACTS") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).expect("artefacts dir");
        std::fs::copy(&html_path, dir.join("report.html")).expect("copy report");
        ok(&airgate(&[
            "report",
            "--month",
            &month_a,
            "--pack",
            s(&pack),
            "--pack",
            s(&pack2),
            "-o",
            s(&dir.join("fleet-report.html")),
        ]));
        let _ = std::fs::remove_dir_all(dir.join("evidence-pack"));
        copy_dir(&pack, &dir.join("evidence-pack"));
    }

    // A pack made with another user secret does not merge.
    let sb3 = fleet_host(&sb);
    let secret3 = sb3.path().join("own.key");
    std::fs::write(&secret3, [9u8; 32]).expect("secret");
    sb3.publish(&sb.sign("v2", &bundle(2)));
    let d3 = start(&sb3, &secret3, Some(&day10));
    d3.wait_bundle(2);
    assert_eq!(embed(&d3, Some("a"), MINILM, "host three"), "200");
    stop(d3);
    let pack3 = sb3.path().join("pack-c");
    make_pack(
        &month_a,
        s(&sb3.path().join("state")),
        s(&sb3.config_path()),
        &pack3,
    );
    let out = airgate(&[
        "report",
        "--month",
        &month_a,
        "--pack",
        s(&pack),
        "--pack",
        s(&pack3),
        "-o",
        "-",
    ]);
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different user-hashing secret"));
}

/// `airgate evidence` of `month` from a stopped store.
fn make_pack(month: &str, state: &str, config: &str, out: &Path) {
    ok(&airgate(&[
        "evidence",
        "--month",
        month,
        "--state",
        state,
        "--config",
        config,
        "-o",
        s(out),
    ]));
}

/// Another host of the fleet: its own sandbox, trusting the same authority.
fn fleet_host(authority: &Sandbox) -> Sandbox {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path().join("authority")).expect("authority");
    for f in ["e2e-authority.pub", "e2e-authority.key"] {
        std::fs::copy(
            authority.authority().join(f),
            sb.path().join("authority").join(f),
        )
        .expect("key");
    }
    sb
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}
