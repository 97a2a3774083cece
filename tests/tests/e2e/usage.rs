//! Licence thresholds and tenant limits against the real daemon and the
//! real Gemma model: exact distinct-user caps under a burst, counts that
//! survive SIGKILL and a restart (rebuilt from the audit log), a month
//! rollover on an injected clock, the licence threshold across tenants and
//! a derivative model, 429s with Retry-After, and token budgets charged
//! with the tokens actually processed.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use airgate_tests::{Daemon, Sandbox, airgate_bin, policy, post_json, wait_model};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::llm::{GEMMA, ask, chat, llm_config, stream_as, tenant, timed_events};

const GEMMA_LICENCE: &str = "LicenseRef-Gemma-Terms-of-Use";

fn airgate(args: &[&str]) -> std::process::Output {
    Command::new(airgate_bin())
        .args(args)
        .output()
        .expect("run airgate")
}

/// `airgate usage --json` through the admin socket.
fn usage(sb: &Sandbox, month: Option<&str>) -> Value {
    let config = sb.config_path();
    let mut args = vec![
        "usage",
        "--json",
        "--config",
        config.to_str().expect("utf8"),
    ];
    if let Some(m) = month {
        args.extend(["--month", m]);
    }
    let out = airgate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("usage json")
}

fn of<'a>(doc: &'a Value, list: &str, key: &str, id: &str) -> &'a Value {
    doc[list]
        .as_array()
        .and_then(|a| a.iter().find(|t| t[key] == id))
        .unwrap_or_else(|| panic!("no {id} in {doc}"))
}

/// Distinct users the log says were served to `tenant`: allowed decisions
/// whose completion processed at least one token (or never came).
fn served_users(records: &[Value], tenant: &str) -> std::collections::BTreeSet<String> {
    let released: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| &r["event"])
        .filter(|e| {
            e["kind"] == "completion" && e["prompt_tokens"] == 0 && e["completion_tokens"] == 0
        })
        .filter_map(|e| e["request_id"].as_str())
        .collect();
    records
        .iter()
        .map(|r| &r["event"])
        .filter(|e| e["kind"] == "decision" && e["decision"] == "allow" && e["tenant"] == tenant)
        .filter(|e| !released.contains(e["request_id"].as_str().unwrap_or("")))
        .filter_map(|e| e["end_user"].as_str().map(str::to_owned))
        .collect()
}

/// A bundle valid for 90 days from now, so a clock moved to next month still finds it in force.
fn long_lived(policy: &str) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    policy.replacen(
        "\n\n[[licences]]",
        &format!(
            "\niat = {now}\nnbf = {}\nexp = {}\n\n[[licences]]",
            now - 60,
            now + 90 * 86_400
        ),
        1,
    )
}

/// A model in the manifest whose file is not on this host: requests for it
/// are admitted, then nothing is served (503) and the reservation released.
const ABSENT: &str = "\n[[models]]\nid = \"gemma-absent\"\nformat = \"gguf\"\nkinds = [\"chat\"]\nlicence = \"LicenseRef-Gemma-Terms-of-Use\"\nfiles = [{ role = \"weights\", name = \"absent.gguf\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }]\n";

fn chat_as(d: &Daemon, user: &str, model: &str, max_tokens: u32) -> airgate_tests::Response {
    let mut body = ask("Say hi.", max_tokens);
    body["user"] = json!(user);
    body["model"] = json!(model);
    chat(d, &body)
}

fn code(r: &airgate_tests::Response) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[test]
fn a_cap_of_50_admits_exactly_50_of_1000_new_users_and_the_count_survives_kill_restart_and_rollover()
 {
    let sb = Sandbox::new();
    let tenants = tenant(
        "claims",
        "{ uids = [0] }",
        "\"gemma-3-270m\", \"gemma-absent\"",
    ) + "user_cap = { max_users_per_month = 50, scope = \"host\", over_cap = \"refuse_new_users\" }\n"
        + ABSENT;
    sb.publish(&sb.sign("v1", &long_lived(&policy(1, &tenants))));
    let config = llm_config(&sb, "slots = 4\ncontext = 512\nqueue = 64")
        + "\n[usage]\nwarn_at = [0.5, 0.9]\n";
    let mut d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    wait_model(&d, GEMMA);

    // Admitted, then nothing served: the user does not count (once the
    // completion, written without waiting, is in the log).
    let r = chat_as(&d, "ghost", "gemma-absent", 1);
    assert_eq!(r.status, 503, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let users = of(&usage(&sb, None), "tenants", "tenant", "claims")["users"].clone();
        if users == 0 || Instant::now() > deadline {
            assert_eq!(users, 0);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // 1,000 distinct users' first requests at once.
    let barrier = Arc::new(Barrier::new(1000));
    let socket = d.socket.clone();
    let burst: Vec<_> = (0..1000)
        .map(|i| {
            let (barrier, socket) = (Arc::clone(&barrier), socket.clone());
            std::thread::spawn(move || {
                let mut body = ask("Say hi.", 1);
                body["user"] = json!(format!("user-{i}"));
                barrier.wait();
                let r = post_json(&socket, "/v1/chat/completions", &body.to_string());
                (i, r.status, r.json()["error"]["code"].clone())
            })
        })
        .collect();
    let results: Vec<_> = burst
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    // Killed at once: the usage fold may lag the log; the restart catches up.
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let admitted: Vec<usize> = results.iter().filter(|r| r.1 == 200).map(|r| r.0).collect();
    assert_eq!(admitted.len(), 50, "exactly the cap");
    for (i, status, code) in &results {
        assert!(
            *status == 200 || (*status == 403 && code == "tenant_user_cap"),
            "user-{i}: {status} {code}"
        );
    }

    let mut d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    let records = sb.export();
    let decisions = records
        .iter()
        .filter(|r| r["event"]["kind"] == "decision" && r["event"]["model"] == GEMMA)
        .count();
    assert_eq!(decisions, 1000, "one decision record per request");
    let from_log = served_users(&records, "claims");
    assert_eq!(from_log.len(), 50);
    let doc = usage(&sb, None);
    assert_eq!(
        of(&doc, "tenants", "tenant", "claims")["users"],
        50,
        "{doc}"
    );
    assert_eq!(
        of(&doc, "tenants", "tenant", "claims")["user_cap"]["host_cap"],
        50
    );
    assert_eq!(of(&doc, "licences", "licence", GEMMA_LICENCE)["users"], 50);
    // Warned at 25 and 45 users, once each, and not again after the restart.
    let warned = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["event"]["kind"] == "usage_warning" && r["event"]["scope"] == "tenant")
            .count()
    };
    assert_eq!(warned(&records), 2, "{:?}", doc["warnings"]);
    assert_eq!(doc["warnings"].as_array().map(Vec::len), Some(2));

    wait_model(&d, GEMMA);
    // Counted users keep working; a new one is refused.
    let known = format!("user-{}", admitted[0]);
    assert_eq!(chat_as(&d, &known, GEMMA, 1).status, 200);
    let r = chat_as(&d, "user-new", GEMMA, 1);
    assert_eq!((r.status, code(&r)), (403, "tenant_user_cap".to_owned()));

    // A rebuild from the log agrees with what the store held.
    let out = airgate(&[
        "usage",
        "rebuild",
        "--config",
        sb.config_path().to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rebuilt["differences"], json!([]), "{rebuilt}");
    assert_eq!(warned(&sb.export()), 2);

    // A clean stop, then the clock moved into next month: new counts.
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(20));
    let this_month = doc["month"].as_str().expect("month").to_owned();
    let now = time::OffsetDateTime::now_utc();
    let next = time::Date::from_calendar_date(
        now.year() + i32::from(now.month() == time::Month::December),
        now.month().next(),
        1,
    )
    .expect("date");
    let offset =
        (next.midnight().assume_utc().unix_timestamp() + 120 - now.unix_timestamp()).to_string();
    let d = Daemon::start(
        &sb,
        &config,
        &[("AIRGATE_FAILPOINTS", &format!("clock-offset={offset}"))],
    );
    d.wait_bundle(1);
    wait_model(&d, GEMMA);
    let doc = usage(&sb, None);
    assert_ne!(doc["month"], this_month.as_str());
    assert_eq!(of(&doc, "tenants", "tenant", "claims")["users"], 0, "{doc}");
    assert_eq!(
        chat_as(&d, "user-new", GEMMA, 1).status,
        200,
        "a new month, a free slot"
    );
    assert_eq!(
        of(&usage(&sb, None), "tenants", "tenant", "claims")["users"],
        1
    );
    let last = usage(&sb, Some(&this_month));
    assert_eq!(
        of(&last, "tenants", "tenant", "claims")["users"],
        50,
        "{last}"
    );
}

#[test]
fn the_licence_threshold_counts_across_tenants_and_the_derivative_model() {
    let sb = Sandbox::new();
    // Gemma's terms cap distinct users at 3; a fine-tune of Gemma under its
    // own Apache-2.0 licence still counts under Gemma's.
    let derived = "\n[[models]]\nid = \"gemma-claims-ft\"\nformat = \"gguf\"\nkinds = [\"chat\"]\nlicence = \"Apache-2.0\"\nderived_from = \"gemma-3-270m\"\nfiles = [{ role = \"weights\", name = \"gemma-3-270m-q4_k_m.gguf\", sha256 = \"a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818\" }]\n";
    let tenants = tenant("claims", "{ uids = [0] }", "\"gemma-claims-ft\"")
        + &tenant("search", "{ uids = [4321] }", "\"gemma-3-270m\"")
        + derived;
    let p = policy(1, &tenants).replace(
        "review_by = \"2030-01-01\"\nafter_review = \"flag\"\n\n[[licences]]\nid = \"Apache-2.0\"",
        "review_by = \"2030-01-01\"\nafter_review = \"flag\"\nmonthly_active_user_threshold = 3\n\n[[licences]]\nid = \"Apache-2.0\"",
    );
    assert!(p.contains("monthly_active_user_threshold = 3"));
    sb.publish(&sb.sign("v1", &p));
    let d = Daemon::start(&sb, &llm_config(&sb, "slots = 2\ncontext = 512"), &[]);
    d.wait_bundle(1);
    wait_model(&d, GEMMA);
    wait_model(&d, "gemma-claims-ft");

    let search = |user: &str| {
        let mut body = ask("Say hi.", 1);
        body["user"] = json!(user);
        timed_events(stream_as(Some(4321), &d.socket, &body)).0
    };
    assert_eq!(chat_as(&d, "a", "gemma-claims-ft", 1).status, 200);
    assert_eq!(chat_as(&d, "b", "gemma-claims-ft", 1).status, 200);
    assert_eq!(search("c"), 200, "the third user under Gemma's terms");
    assert_eq!(search("d"), 403, "a fourth, from the other tenant");
    let r = chat_as(&d, "e", "gemma-claims-ft", 1);
    assert_eq!(
        (r.status, code(&r)),
        (403, "licence_user_threshold".to_owned()),
        "a fourth, through the derivative"
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(GEMMA_LICENCE)
            || r.text().contains(GEMMA_LICENCE),
        "{}",
        r.text()
    );
    // Counted users keep working.
    assert_eq!(chat_as(&d, "a", "gemma-claims-ft", 1).status, 200);
    assert_eq!(search("c"), 200);
    let doc = usage(&sb, None);
    assert_eq!(
        of(&doc, "licences", "licence", GEMMA_LICENCE)["users"],
        3,
        "{doc}"
    );
    assert_eq!(
        of(&doc, "licences", "licence", GEMMA_LICENCE)["threshold"],
        3
    );
    assert_eq!(of(&doc, "licences", "licence", "Apache-2.0")["users"], 2);
    assert_eq!(of(&doc, "tenants", "tenant", "claims")["users"], 2);
    assert_eq!(of(&doc, "tenants", "tenant", "search")["users"], 1);
    assert_eq!(of(&doc, "tenants", "tenant", "search")["denials"], 1);
}

fn retry_after(r: &airgate_tests::Response) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {}", r.text()))
}

fn tokens_today(sb: &Sandbox) -> u64 {
    of(&usage(sb, None), "tenants", "tenant", "claims")["live"]["tokens_today"]
        .as_u64()
        .expect("live tokens")
}

fn total(r: &airgate_tests::Response) -> u64 {
    r.json()["usage"]["total_tokens"].as_u64().expect("usage")
}

fn seconds_to_midnight() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    86_400 - i64::try_from(now % 86_400).expect("small")
}

#[test]
fn rates_budgets_and_concurrency_answer_429_with_retry_after_and_charge_actual_tokens() {
    let sb = Sandbox::new();
    let claims = |limits: &str| {
        tenant("claims", "{ uids = [0] }", "\"gemma-3-270m\"")
            + &format!("limits = {{ {limits} }}\n")
    };
    sb.publish(&sb.sign("v1", &policy(1, &claims("requests_per_minute = 3"))));
    let d = Daemon::start(&sb, &llm_config(&sb, "slots = 2\ncontext = 512"), &[]);
    d.wait_bundle(1);
    wait_model(&d, GEMMA);

    // A sliding minute: the fourth request waits for the first to age out.
    let first = Instant::now();
    let mut charged = 0;
    for _ in 0..3 {
        let r = chat_as(&d, "alice", GEMMA, 2);
        assert_eq!(r.status, 200, "{}", r.text());
        charged += total(&r);
    }
    let r = chat_as(&d, "alice", GEMMA, 2);
    assert_eq!((r.status, code(&r)), (429, "rate_limited".to_owned()));
    let expected = 60 - first.elapsed().as_secs();
    let got = retry_after(&r);
    assert!(
        got.abs_diff(expected) <= 2,
        "Retry-After {got}, expected about {expected}"
    );

    // The budget is charged with the tokens processed, not the estimates.
    sb.publish(&sb.sign(
        "v2",
        &policy(
            2,
            &claims("tokens_per_day = 100000, concurrent_requests = 1"),
        ),
    ));
    d.wait_bundle(2);
    let r = chat_as(&d, "alice", GEMMA, 4);
    assert_eq!(r.status, 200);
    charged += total(&r);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokens_today(&sb) != charged && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tokens_today(&sb),
        charged,
        "live count = sum of the responses' usage"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let folded = || of(&usage(&sb, None), "tenants", "tenant", "claims")["tokens"].as_u64();
    while folded() != Some(charged) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(folded(), Some(charged), "the log-derived count agrees");

    // A concurrency cap answers at once while a stream holds the slot.
    let mut long = ask("Write a long story about a lighthouse.", 200);
    long["stream"] = json!(true);
    let holder = stream_as(None, &d.socket, &long);
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let r = chat_as(&d, "alice", GEMMA, 2);
    assert_eq!(
        (r.status, code(&r)),
        (429, "concurrency_limit".to_owned()),
        "{}",
        r.text()
    );
    assert!(asked.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(retry_after(&r), 1);
    let (status, _) = timed_events(holder);
    assert_eq!(status, 200);

    // Refused before generation when max_tokens would overrun the budget.
    let used = tokens_today(&sb);
    let budget = used + 60;
    sb.publish(&sb.sign(
        "v3",
        &policy(3, &claims(&format!("tokens_per_day = {budget}"))),
    ));
    d.wait_bundle(3);
    let r = chat_as(&d, "alice", GEMMA, 500);
    assert_eq!(
        (r.status, code(&r)),
        (429, "token_budget_exhausted".to_owned())
    );
    assert!(
        i64::try_from(retry_after(&r))
            .expect("small")
            .abs_diff(seconds_to_midnight())
            <= 2,
        "until midnight UTC"
    );
    assert_eq!(tokens_today(&sb), used, "a refusal charges nothing");
    let r = chat_as(&d, "alice", GEMMA, 4);
    assert_eq!(r.status, 200, "{}", r.text());

    // Truncating: served with what is left, never past the budget.
    let used = tokens_today(&sb);
    let budget = used + 40;
    sb.publish(&sb.sign(
        "v4",
        &policy(
            4,
            &claims(&format!(
                "tokens_per_day = {budget}, over_budget = \"truncate\""
            )),
        ),
    ));
    d.wait_bundle(4);
    let r = chat_as(&d, "alice", GEMMA, 500);
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
    assert!(total(&r) <= 40, "{}", a["usage"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokens_today(&sb) == used && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tokens_today(&sb) <= budget);
    assert_eq!(tokens_today(&sb), used + total(&r));
}
