//! The audit log end to end: one durable decision record per request that
//! reaches policy, a chain that verifies, the tools on a real store, and a
//! wiped store noticed; a stopped store tampered with: a swap before the
//! last checkpoint found by the full verification (at its first key), a
//! record forged after a clean stop refused at start, a truncated tail
//! noticed by the usage counters.

use std::process::Command;
use std::time::Duration;

use airgate_tests::{Daemon, Sandbox, airgate_bin, get, policy, post_json};
use nix::sys::signal::Signal;
use serde_json::Value;

fn airgate(args: &[&str]) -> std::process::Output {
    Command::new(airgate_bin())
        .args(args)
        .output()
        .expect("run airgate")
}

fn export(sb: &Sandbox, extra: &[&str]) -> Vec<Value> {
    let state = sb.path().join("state");
    let mut args = vec!["audit", "export", "--state", state.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let out = airgate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn every_request_reaching_policy_leaves_one_durable_decision_record() {
    let sb = Sandbox::new();
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("v1", &policy(1, tenant)));
    let config = sb
        .config("", "")
        .replace("[audit]\n", "[audit]\ncheckpoint_every = 4\n");
    let mut d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);

    let chat = |model: &str, user: &str| {
        post_json(
            &d.socket,
            "/v1/chat/completions",
            &format!(
                r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "user": "{user}"}}"#
            ),
        )
    };
    let mut ids = Vec::new();
    for i in 0..6 {
        let model = if i % 2 == 0 {
            "gemma-3-270m"
        } else {
            "paraphrase-minilm-l3"
        };
        let r = chat(model, &format!("user-{i}"));
        ids.push(r.header("x-request-id").expect("request id").to_owned());
    }
    // Not reaching policy: malformed, so no decision record.
    let r = post_json(&d.socket, "/v1/chat/completions", "{\"model\": \"x\"}");
    assert_eq!(r.status, 400);
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert!(
        status["audit"]["writer"]["records"]
            .as_u64()
            .expect("records")
            >= 7,
        "{status}"
    );

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());

    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(report.contains("audit chain OK"), "{report}");
    assert!(!report.contains(" 0 signed checkpoints"), "{report}");

    let records = export(&sb, &[]);
    // Checkpoints carried off the host (here: from the export) verify; a
    // forged one does not.
    let kept: String = records
        .iter()
        .filter(|r| r["event"]["kind"] == "checkpoint")
        .map(|r| {
            format!(
                "{} {}\n",
                r["event"]["seq"],
                r["event"]["head"].as_str().expect("head")
            )
        })
        .collect();
    assert!(!kept.is_empty());
    let file = sb.path().join("checkpoints.txt");
    std::fs::write(&file, &kept).expect("checkpoints");
    let f = file.to_str().expect("utf8");
    let s = state.to_str().expect("utf8");
    assert!(
        airgate(&["audit", "verify", "--state", s, "--checkpoints", f])
            .status
            .success()
    );
    std::fs::write(&file, format!("3 {}\n", "00".repeat(32))).expect("forged");
    let out = airgate(&["audit", "verify", "--state", s, "--checkpoints", f]);
    assert_eq!(out.status.code(), Some(76));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("record 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, format!("99999 {}\n", "00".repeat(32))).expect("beyond");
    let out = airgate(&["audit", "verify", "--state", s, "--checkpoints", f]);
    assert_eq!(
        out.status.code(),
        Some(76),
        "a chain cut before a kept checkpoint"
    );
    assert_eq!(records[0]["event"]["kind"], "genesis");
    let decisions: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"]["kind"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 6, "one per request that reached policy");
    for (d, id) in decisions.iter().zip(&ids) {
        assert_eq!(&d["event"]["request_id"], id);
        assert_eq!(d["event"]["bundle_version"], 1);
        assert_eq!(d["event"]["tenant"], "ops");
    }
    assert_eq!(decisions[0]["event"]["decision"], "allow");
    assert_eq!(
        decisions[0]["event"]["model_files"][0],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    assert_eq!(
        decisions[0]["event"]["licences"][0],
        "LicenseRef-Gemma-Terms-of-Use"
    );
    assert_eq!(decisions[1]["event"]["reason"], "model_not_allowed");
    let completions = records
        .iter()
        .filter(|r| r["event"]["kind"] == "completion")
        .count();
    assert_eq!(completions, 3, "one per allowed request");
    for kind in ["startup", "audit_opened", "bundle_accepted", "shutdown"] {
        assert!(
            records.iter().any(|r| r["event"]["kind"] == kind),
            "no {kind} record"
        );
    }

    // End users are stored keyed-hashed; hash-user gives what to search for.
    let out = airgate(&[
        "audit",
        "hash-user",
        "ops",
        "user-0",
        "--state",
        state.to_str().expect("utf8"),
    ]);
    let hashed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(decisions[0]["event"]["end_user"], hashed.as_str());
    assert!(
        !String::from_utf8_lossy(
            &airgate(&["audit", "export", "--state", state.to_str().expect("utf8")]).stdout
        )
        .contains("user-0")
    );
    let only_ops = export(&sb, &["--tenant", "ops"]);
    assert_eq!(only_ops.len(), 9, "6 decisions and 3 completions");
    // --since: by time, RFC 3339 or Unix seconds; a bad value is a usage error.
    let last_time = records.last().expect("records")["time"]
        .as_i64()
        .expect("time");
    assert_eq!(
        export(&sb, &["--since", "1970-01-01T00:00:00Z"]).len(),
        records.len()
    );
    let recent = export(&sb, &["--since", &last_time.to_string()]);
    assert!(!recent.is_empty() && recent.iter().all(|r| r["time"].as_i64() >= Some(last_time)));
    assert!(export(&sb, &["--since", &(last_time + 3600).to_string()]).is_empty());
    let out = airgate(&["audit", "export", "--state", s, "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));
    // verify --from: the tail from a record on.
    let out = airgate(&["audit", "verify", "--state", s, "--from", "3"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audit chain OK (from record 3)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A wiped store is noticed: the marker outside the state directory remembers it.
    std::fs::remove_dir_all(state.join("audit")).expect("wipe");
    let d = Daemon::start(&sb, &config, &[]);
    let ready = get(&d.socket, "/readyz", &[]).json();
    assert!(
        ready["warnings"]
            .to_string()
            .contains("audit store was missing"),
        "{ready}"
    );
    assert!(d.stderr().contains("AUDIT STORE MISSING"));
    drop(d);
    let records = export(&sb, &[]);
    assert!(
        records[0]["event"]["previous_store"].is_string(),
        "{}",
        records[0]
    );
}

#[test]
fn a_store_in_use_is_refused_with_a_clear_message() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(73));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
}

/// The largest file under `dir`, in bytes.
fn largest_file(dir: &std::path::Path) -> u64 {
    let mut max = 0;
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let meta = entry.metadata().expect("meta");
        max = max.max(if meta.is_dir() {
            largest_file(&entry.path())
        } else {
            meta.len()
        });
    }
    max
}

#[test]
fn when_the_disk_refuses_writes_nothing_is_served_and_service_resumes() {
    let sb = Sandbox::new();
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("v1", &policy(1, tenant)));
    let config = sb.config("", "");
    let mut d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    let chat = |i: usize| {
        post_json(
            &d.socket,
            "/v1/chat/completions",
            &format!(
                r#"{{"model": "gemma-3-270m", "messages": [{{"role": "user", "content": "{}"}}], "user": "u{i}"}}"#,
                "x".repeat(2000)
            ),
        )
    };
    assert_eq!(chat(0).json()["error"]["code"], "model_not_loaded");

    // No file may grow past its current size: the next writes fail (EFBIG).
    let limit = largest_file(&sb.path().join("state/audit"));
    let set_limit = |value: &str| {
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", d.pid()))
            .arg(format!("--fsize={value}"))
            .output()
            .expect("prlimit");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set_limit(&format!("{limit}:unlimited"));
    let mut refused = 0;
    let mut served_while_limited = Vec::new();
    for i in 1..400 {
        let r = chat(i);
        let code = r.json()["error"]["code"].clone();
        if code == "audit_unavailable" {
            refused += 1;
            assert_eq!(r.status, 503);
            assert!(
                r.text().contains("could not be made durable"),
                "{}",
                r.text()
            );
            break;
        }
        served_while_limited.push(r.header("x-request-id").expect("id").to_owned());
    }
    assert_eq!(refused, 1, "writes past the limit must fail closed");
    let ready = get(&d.socket, "/readyz", &[]).json();
    assert!(
        ready["reasons"]
            .to_string()
            .contains("audit store cannot write"),
        "{ready}"
    );
    // (The log file is under the same limit, so the journal line is not checked here.)

    // The disk takes writes again: service resumes by itself.
    set_limit("unlimited");
    let r = chat(1000);
    assert_eq!(
        r.json()["error"]["code"],
        "model_not_loaded",
        "{}",
        r.text()
    );
    let resumed = r.header("x-request-id").expect("id").to_owned();
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert_eq!(
        status["audit"]["writer"]["degraded"],
        Value::Null,
        "{status}"
    );
    assert!(
        status["audit"]["writer"]["failed_batches"].as_u64() >= Some(1),
        "{status}"
    );
    let reasons = get(&d.socket, "/readyz", &[]).json()["reasons"].to_string();
    assert!(!reasons.contains("audit"), "{reasons}");

    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every request that was answered has its decision record.
    let records = export(&sb, &[]);
    for id in served_while_limited.iter().chain([&resumed]) {
        assert!(
            records
                .iter()
                .any(|r| r["event"]["kind"] == "decision" && &r["event"]["request_id"] == id),
            "no record for {id}"
        );
    }
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_record() {
    let kills: u32 = std::env::var("AIRGATE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let sb = Sandbox::new();
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("v1", &policy(1, tenant)));
    let config = sb.config("", "");
    let mut answered: Vec<String> = Vec::new();
    let mut seed = u64::from(std::process::id());
    for round in 0..kills {
        let mut d = Daemon::start(&sb, &config, &[]);
        d.wait_bundle(1);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let socket = d.socket.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let model = if i % 3 == 0 { "paraphrase-minilm-l3" } else { "gemma-3-270m" };
                        let body = format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "user": "u{c}-{i}"}}"#);
                        let request = format!(
                            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        // A request cut by the kill has no answer and proves nothing.
                        let Ok(r) = airgate_tests::raw_request(&socket, request.as_bytes()) else {
                            continue;
                        };
                        let code = r.json()["error"]["code"].clone();
                        if code == "model_not_loaded" || code == "model_not_allowed" {
                            ids.push(r.header("x-request-id").expect("id").to_owned());
                        }
                    }
                    ids
                })
            })
            .collect();
        // A pseudo-random moment: 50 to 300 ms into the load.
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(50 + (seed >> 33) % 250));
        d.signal(Signal::SIGKILL);
        let _ = d.wait_exit(Duration::from_secs(10));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            answered.extend(c.join().expect("client"));
        }
        assert!(round < kills);
    }
    assert!(answered.len() > kills as usize, "the load produced answers");
    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = export(&sb, &[]);
    let recorded: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r["event"]["kind"] == "decision")
        .filter_map(|r| r["event"]["request_id"].as_str())
        .collect();
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !recorded.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no record: {missing:?}",
        missing.len()
    );
    // And the daemon comes back after all of it.
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    eprintln!(
        "crash loop: {kills} kills, {} answered requests, all recorded",
        answered.len()
    );
}

#[test]
fn a_running_daemon_exports_tails_and_snapshots_through_the_admin_socket() {
    use std::io::BufRead as _;
    let sb = Sandbox::new();
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("v1", &policy(1, tenant)));
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    d.wait_bundle(1);
    let config = sb.config_path();
    let config = config.to_str().expect("utf8");
    let chat = || {
        post_json(
            &d.socket,
            "/v1/chat/completions",
            r#"{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "user": "alice"}"#,
        )
        .header("x-request-id")
        .expect("id")
        .to_owned()
    };

    // tail follows new records as they become durable.
    let mut tail = Command::new(airgate_bin())
        .args(["audit", "tail", "--config", config])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tail");
    let first = chat();
    let mut lines = std::io::BufReader::new(tail.stdout.take().expect("stdout")).lines();
    let seen = lines
        .by_ref()
        .take(50)
        .map(|l| l.expect("line"))
        .any(|l| l.contains(&first));
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(seen, "tail did not show request {first}");

    // export goes through the daemon, which holds the store.
    let second = chat();
    let out = airgate(&["audit", "export", "--config", config, "--tenant", "ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&first) && text.contains(&second), "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains("\"decision\"") || l.contains("\"completion\""))
    );

    // snapshot: a consistent copy that the offline tools read.
    let out = airgate(&["audit", "snapshot", "--config", config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let path = report
        .lines()
        .find_map(|l| l.strip_prefix("verify: airgate audit verify --state "))
        .expect("path")
        .to_owned();
    let out = airgate(&["audit", "verify", "--state", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = airgate(&["audit", "export", "--state", &path]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&second));
}

#[test]
fn a_fleet_secret_makes_user_hashes_equal_across_hosts() {
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("fleet-user-hmac.key");
    std::fs::write(&secret, [42u8; 32]).expect("secret");
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    let mut hashes = Vec::new();
    for _host in 0..2 {
        let sb = Sandbox::new();
        sb.publish(&sb.sign("v1", &policy(1, tenant)));
        let config = sb.config("", "").replace(
            "[audit]\n",
            &format!("[audit]\nuser_secret = \"{}\"\n", secret.display()),
        );
        let mut d = Daemon::start(&sb, &config, &[]);
        d.wait_bundle(1);
        post_json(
            &d.socket,
            "/v1/chat/completions",
            r#"{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "user": "alice"}"#,
        );
        d.signal(Signal::SIGTERM);
        assert!(d.wait_exit(Duration::from_secs(10)).success());
        let decision = export(&sb, &[])
            .into_iter()
            .find(|r| r["event"]["kind"] == "decision")
            .expect("decision");
        let out = airgate(&[
            "audit",
            "hash-user",
            "ops",
            "alice",
            "--config",
            sb.config_path().to_str().expect("utf8"),
        ]);
        let searched = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(decision["event"]["end_user"], searched.as_str());
        hashes.push(searched);
        assert!(
            !sb.path().join("state/user-hmac.key").exists(),
            "no per-host secret made"
        );
    }
    assert_eq!(
        hashes[0], hashes[1],
        "the same user hashes the same on every host of the fleet"
    );
}

#[test]
fn fail_open_serves_without_a_durable_record_and_says_so() {
    let sb = Sandbox::new();
    let tenant = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("v1", &policy(1, tenant)));
    let config = sb
        .config("", "")
        .replace("[audit]\n", "[audit]\nfail_open = true\n");
    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    assert!(d.stderr().contains("audit.fail_open is on"));
    let limit = largest_file(&sb.path().join("state/audit"));
    let out = Command::new("prlimit")
        .arg(format!("--pid={}", d.pid()))
        .arg(format!("--fsize={limit}:unlimited"))
        .output()
        .expect("prlimit");
    assert!(out.status.success());
    for i in 0..200 {
        let r = post_json(
            &d.socket,
            "/v1/chat/completions",
            &format!(
                r#"{{"model": "gemma-3-270m", "messages": [{{"role": "user", "content": "{}"}}], "user": "u{i}"}}"#,
                "x".repeat(2000)
            ),
        );
        assert_eq!(
            r.json()["error"]["code"],
            "model_not_loaded",
            "served although not durable"
        );
    }
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert!(
        status["audit"]["writer"]["failed_batches"].as_u64() >= Some(1),
        "{status}"
    );
}

/// Every stored record of the stopped store in `sb`, as (seq, bytes as sealed).
fn stored_records(sb: &Sandbox) -> Vec<(u64, Vec<u8>)> {
    let db = airgate::audit::open_db(&sb.path().join("state/audit"), 8 << 20).expect("store");
    db.iter()
        .map(|item| {
            let (k, v) = item.expect("read");
            let seq = u64::from_be_bytes(<[u8; 8]>::try_from(k.as_ref()).expect("key"));
            (seq, v.to_vec())
        })
        .collect()
}

/// Writes (`Some`) or deletes (`None`) stored records of the stopped store,
/// as an intruder with the files but not the host key could.
fn tamper(sb: &Sandbox, changes: &[(u64, Option<Vec<u8>>)]) {
    let db = airgate::audit::open_db(&sb.path().join("state/audit"), 8 << 20).expect("store");
    for (seq, bytes) in changes {
        let k = airgate_policy::audit::key(*seq);
        let written = match bytes {
            Some(b) => db.insert(k, b.clone()).map(drop),
            None => db.remove(k).map(drop),
        };
        written.expect("write");
    }
    db.flush().expect("flush");
}

/// The event of a stored record.
fn event_of(seq: u64, stored: &[u8]) -> airgate_policy::audit::Event {
    airgate_policy::audit::open(seq, stored)
        .expect("intact")
        .parse()
        .expect("json")
        .event
}

/// `audit.full_verify` of /admin/status once a full verification has run.
fn wait_full_verify(d: &Daemon) -> Value {
    let start = std::time::Instant::now();
    loop {
        let status = get(&d.socket, "/admin/status", &[]).json();
        let v = &status["audit"]["full_verify"];
        if !v.is_null() {
            return v.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no full verification: {status}\nstderr:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const OPS: &str = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";

/// A request that reaches policy and is denied (the model is not the
/// tenant's): one decision record, counted as a denial.
fn denied(d: &Daemon, user: &str) {
    let r = post_json(
        &d.socket,
        "/v1/chat/completions",
        &format!(
            r#"{{"model": "paraphrase-minilm-l3", "messages": [{{"role": "user", "content": "hi"}}], "user": "{user}"}}"#
        ),
    );
    assert_eq!(
        r.json()["error"]["code"],
        "model_not_allowed",
        "{}",
        r.text()
    );
}

#[test]
fn a_full_verification_finds_a_swap_before_the_last_checkpoint_at_its_first_key() {
    let sb = Sandbox::new();
    sb.publish(&sb.sign("v1", &policy(1, OPS)));
    let daily = sb.config("", "");
    let off = daily.replace("[audit]\n", "[audit]\nfull_verify_interval = \"off\"\n");
    let mut d = Daemon::start(&sb, &off, &[]);
    d.wait_bundle(1);
    for user in ["a", "b", "c"] {
        denied(&d, user);
    }
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());

    // Two decisions swapped, well before the clean stop's checkpoint.
    let records = stored_records(&sb);
    let decisions: Vec<&(u64, Vec<u8>)> = records
        .iter()
        .filter(|(seq, v)| matches!(event_of(*seq, v), airgate_policy::audit::Event::Decision(_)))
        .collect();
    assert_eq!(decisions.len(), 3);
    let (first, third) = (decisions[0], decisions[2]);
    tamper(
        &sb,
        &[
            (first.0, Some(third.1.clone())),
            (third.0, Some(first.1.clone())),
        ],
    );
    // Named at the first bad key, the sequence the override would record.
    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(76));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&format!("record {}: holds record {}", first.0, third.0)),
        "{stderr}"
    );

    // A start reads from the last checkpoint on, and serves; with the
    // background walk off nothing has looked at the history yet ...
    let d = Daemon::start(&sb, &off, &[]);
    d.wait_bundle(1);
    std::thread::sleep(Duration::from_millis(500));
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert!(status["audit"]["full_verify"].is_null(), "{status}");
    // ... until SIGUSR1 asks for a full walk, which finds the swap.
    d.signal(Signal::SIGUSR1);
    let found = wait_full_verify(&d);
    assert_eq!(found["result"], "broken", "{found}");
    assert_eq!(found["first_bad_seq"], first.0, "{found}");
    let ready = get(&d.socket, "/readyz", &[]).json();
    assert!(
        !ready["reasons"].to_string().contains("audit chain"),
        "a warning, not a stop: {ready}"
    );
    assert!(
        ready["warnings"]
            .to_string()
            .contains("the audit chain does not verify"),
        "{ready}"
    );
    assert!(d.stderr().contains("audit_verify_failed"), "{}", d.stderr());
    // (Recorded without waiting: it is durable a moment later.)
    let start = std::time::Instant::now();
    let recorded = loop {
        let recorded: Vec<Value> = sb
            .export()
            .into_iter()
            .filter(|r| r["event"]["kind"] == "audit_verified")
            .collect();
        if !recorded.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break recorded;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["event"]["ok"], false);
    assert_eq!(recorded[0]["event"]["first_bad_seq"], first.0);
    drop(d);

    // By default the walk runs at start (and daily) without being asked.
    let d = Daemon::start(&sb, &daily, &[]);
    let found = wait_full_verify(&d);
    assert_eq!(found["result"], "broken", "{found}");
    assert_eq!(found["first_bad_seq"], first.0, "{found}");
}

#[test]
fn a_record_forged_after_a_clean_stop_stops_the_next_start_but_a_crash_after_one_does_not() {
    let sb = Sandbox::new();
    let config = sb.config("", "");
    let mut d = Daemon::start(&sb, &config, &[]);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    // A start after the clean stop that is killed: its first record follows
    // the clean stop's checkpoint, as every start's does; the next opens.
    let mut d = Daemon::start(&sb, &config, &[]);
    d.signal(Signal::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    let mut d = Daemon::start(&sb, &config, &[]);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());

    // A record forged after the last clean stop's checkpoint, sealed to link
    // to it: its checksum, hash and link all hold. Even a start-up record
    // is not what a start writes first.
    let records = stored_records(&sb);
    let (at, checkpoint) = records.last().expect("records");
    let at = *at;
    assert!(matches!(
        event_of(at, checkpoint),
        airgate_policy::audit::Event::Checkpoint { .. }
    ));
    let (before, shutdown) = &records[records.len() - 2];
    assert!(matches!(
        event_of(*before, shutdown),
        airgate_policy::audit::Event::Shutdown { .. }
    ));
    let head = airgate_policy::audit::open(at, checkpoint)
        .expect("intact")
        .hash;
    let forged = airgate_policy::audit::Content {
        time: time::OffsetDateTime::now_utc().unix_timestamp(),
        event: airgate_policy::audit::Event::Startup {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: 1,
            fail_open: false,
        },
    }
    .encode();
    let (stored, _) = airgate_policy::audit::seal(at + 1, &head, &forged);
    tamper(&sb, &[(at + 1, Some(stored))]);

    let mut d = Daemon::spawn(&sb, &config, &[], Command::new(airgate_bin()));
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(76), "{}", d.stderr());
    assert!(
        d.stderr().contains(&format!(
            "record {}: follows a clean stop's checkpoint",
            at + 1
        )),
        "{}",
        d.stderr()
    );
    let state = sb.path().join("state");
    let out = airgate(&["audit", "verify", "--state", state.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(76));

    // Taken out again, the store opens, and the whole chain verifies (the
    // crashed start's first record after a clean stop included).
    tamper(&sb, &[(at + 1, None)]);
    let d = Daemon::start(&sb, &config, &[]);
    let walked = wait_full_verify(&d);
    assert_eq!(walked["result"], "ok", "{walked}");
}

#[test]
fn a_log_truncated_after_its_last_checkpoint_is_noticed_by_the_usage_counters() {
    let sb = Sandbox::new();
    sb.publish(&sb.sign("v1", &policy(1, OPS)));
    let config = sb.config("", "");
    let mut d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    for user in ["a", "b", "c"] {
        denied(&d, user);
    }
    let usage = get(&d.socket, "/admin/usage", &[]).json();
    let ops = |u: &Value| {
        u["tenants"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["tenant"] == "ops"))
            .map(|t| t["denials"].clone())
            .unwrap_or_else(|| panic!("no ops in {u}"))
    };
    assert_eq!(ops(&usage), 3, "{usage}");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());

    // The log loses its tail from the last denial on (its checkpoint with
    // it): the rest verifies, and the start cannot tell. The counters,
    // in their own tree, had counted that far.
    let records = stored_records(&sb);
    let last_denial = records
        .iter()
        .rev()
        .find(|(seq, v)| matches!(event_of(*seq, v), airgate_policy::audit::Event::Decision(_)))
        .map(|(seq, _)| *seq)
        .expect("a decision");
    let cut: Vec<(u64, Option<Vec<u8>>)> = records
        .iter()
        .filter(|(seq, _)| *seq >= last_denial)
        .map(|(seq, _)| (*seq, None))
        .collect();
    tamper(&sb, &cut);

    let d = Daemon::start(&sb, &config, &[]);
    d.wait_bundle(1);
    let ready = get(&d.socket, "/readyz", &[]).json();
    assert!(
        ready["warnings"].to_string().contains(&format!(
            "the usage counters had counted audit records {last_denial} to"
        )),
        "{ready}"
    );
    assert!(d.stderr().contains("usage_ahead_of_log"), "{}", d.stderr());
    // The counts are the log's now, and the rebuild is on the record.
    let usage = get(&d.socket, "/admin/usage", &[]).json();
    assert_eq!(ops(&usage), 2, "{usage}");
    let rebuilt: Vec<Value> = sb
        .export()
        .into_iter()
        .filter(|r| r["event"]["kind"] == "usage_rebuilt")
        .collect();
    assert_eq!(rebuilt.len(), 1, "{rebuilt:?}");
    let differences = rebuilt[0]["event"]["differences"].to_string();
    assert!(
        differences.contains("the log ends at") && differences.contains("denials of ops: 3 -> 2"),
        "{differences}"
    );
}
