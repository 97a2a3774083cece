//! The audit log end to end: one durable decision record per request that
//! reaches policy, a chain that verifies, the tools on a real store, and a
//! wiped store noticed.

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
    let config = sb.config("", "");
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
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit chain OK"));

    let records = export(&sb, &[]);
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
