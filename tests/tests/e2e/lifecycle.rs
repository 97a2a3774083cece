//! The process life cycle: configuration errors, systemd notify and watchdog,
//! socket activation, graceful drain on SIGTERM, reload on SIGHUP.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use airgate_tests::{Daemon, NotifySocket, Sandbox, airgate_bin, get, parse_response};
use nix::sys::signal::Signal;

#[test]
fn bad_config_exits_64_and_names_every_bad_key() {
    let sb = Sandbox::new();
    let bad = "state_dir = \"relative\"\nfrobnicate = 1\n[listen.unix]\npath = \"/tmp/x.sock\"\nmode = \"0777\"\n[limits]\nmax_headers = 0\nidle_timeout = \"soon\"\n[[tenants]]\nname = \"static tables are gone\"\nuids = [1]\n";
    let path = sb.write_config(bad);
    for args in [vec!["serve", "--config"], vec!["check-config"]] {
        let out = Command::new(airgate_bin())
            .args(&args)
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for key in [
            "state_dir:",
            "frobnicate: unknown key",
            "listen.unix.mode:",
            "limits.max_headers:",
            "limits.idle_timeout:",
            "tenants: unknown key",
        ] {
            assert!(err.contains(key), "{args:?}: {key:?} missing from:\n{err}");
        }
        assert!(err.contains("6 error(s)"), "{err}");
    }
    let good = sb.write_config(&sb.config("", ""));
    let out = Command::new(airgate_bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(airgate_bin())
        .args(["serve", "--no-such-flag"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let missing = sb.path().join("absent.toml");
    let out = Command::new(airgate_bin())
        .arg("check-config")
        .arg(&missing)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn notify_messages_arrive_in_order_with_watchdog_pings() {
    let sb = Sandbox::new();
    let notify = NotifySocket::bind(sb.path());
    let notify_path = notify.path.to_string_lossy().into_owned();
    let mut d = Daemon::spawn(
        &sb,
        &sb.config("", ""),
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", "300000")],
        Command::new(airgate_bin()),
    );
    let first = notify
        .recv(Duration::from_secs(20))
        .expect("first notify message");
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "READY=1", "READY comes first: {first:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=listening on unix:") && l.contains("no policy bundle")),
        "{first:?}"
    );
    // The socket is usable once READY=1 was sent.
    assert_eq!(get(&d.socket, "/healthz", &[]).status, 200);

    let seen = notify.collect(Duration::from_millis(1000));
    let pings = seen.iter().filter(|(_, m)| m == "WATCHDOG=1").count();
    assert!(pings >= 5, "expected a ping every ~100 ms, got {seen:?}");

    d.signal(Signal::SIGTERM);
    let rest = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let stopping = rest.last().expect("stopping");
    assert!(stopping.contains("STATUS=draining"), "{stopping:?}");
    assert!(d.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn watchdog_pings_stop_when_a_worker_stops_progressing() {
    let sb = Sandbox::new();
    let notify = NotifySocket::bind(sb.path());
    let notify_path = notify.path.to_string_lossy().into_owned();
    // The state probe (every 200 ms, budget 1 s) hangs after 1.5 s, as on a dead disk.
    let mut d = Daemon::spawn(
        &sb,
        &sb.config("", ""),
        &[
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", "300000"),
            ("AIRGATE_FAILPOINTS", "state-probe-hang-after=1500ms"),
        ],
        Command::new(airgate_bin()),
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let seen = notify.collect(Duration::from_millis(5000));
    let pings: Vec<Duration> = seen
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 5, "pings while healthy: {seen:?}");
    let last = *pings.last().expect("a ping");
    assert!(
        last < Duration::from_millis(3500),
        "pings must stop once the probe is stuck; last at {last:?}"
    );
    // The daemon still answers and says which worker is stuck.
    let status = get(&d.socket, "/admin/status", &[]).json();
    let probe = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["name"] == "state-probe")
        .expect("state-probe worker");
    assert_eq!(probe["stuck"], true);
    assert_eq!(status["watchdog"]["healthy"], false);
    assert!(d.stderr().contains("withholding watchdog pings"));
    let m = get(&d.socket, "/metrics", &[]).text();
    assert!(
        m.contains("airgate_worker_stuck{worker=\"state-probe\"} 1"),
        "{m}"
    );
    // A stuck worker does not keep the process from stopping.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn socket_passed_by_systemd_is_used() {
    let sb = Sandbox::new();
    let socket = sb.socket();
    // The config names a path nobody binds: the passed socket must be used instead.
    let config = sb.config("fd_name = \"local\"", "").replace(
        &format!("path = \"{}\"", socket.display()),
        &format!("path = \"{}\"", sb.path().join("unused.sock").display()),
    );
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("--listen")
        .arg(&socket)
        .arg("--fdname=local")
        .arg(airgate_bin());
    let mut d = Daemon::spawn(&sb, &config, &[], cmd);
    // systemd-socket-activate starts airgate on the first connection.
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_healthy();
    let status = get(&socket, "/admin/status", &[]).json();
    assert_eq!(status["listeners"][0]["activated"], true, "{status}");
    assert_eq!(status["listeners"][0]["name"], "local");
    assert_eq!(
        status["listeners"][0]["address"],
        socket.display().to_string()
    );
    assert!(!sb.path().join("unused.sock").exists());
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(15)).success());
}

/// Starts a POST whose body arrives slowly; returns the stream and how much is left.
fn slow_post(socket: &std::path::Path, body_len: usize) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .expect("head");
    s
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let body = b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"padding\": \"..........\"}";
    let mut s = slow_post(&d.socket, body.len());
    s.write_all(&body[..5]).expect("first bytes");
    std::thread::sleep(Duration::from_millis(200));
    d.signal(Signal::SIGTERM);
    let sent_term = Instant::now();
    // New connections are refused once draining starts.
    let start = Instant::now();
    while UnixStream::connect(&d.socket).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "still accepting while draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The in-flight request keeps trickling for ~1.5 s and still gets its answer.
    for chunk in body[5..].chunks(5) {
        std::thread::sleep(Duration::from_millis(150));
        s.write_all(chunk)
            .expect("the draining daemon keeps reading the body");
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let r = parse_response(&raw).expect("parse");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "policy_unavailable");
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(
        sent_term.elapsed() >= Duration::from_millis(1000),
        "exited before the request finished"
    );
    assert!(!d.socket.exists(), "socket node removed on exit");
}

#[test]
fn sigterm_cuts_requests_that_outlive_the_grace_period() {
    let sb = Sandbox::new();
    let config = sb
        .config("", "")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"500ms\"");
    let mut d = Daemon::start(&sb, &config, &[]);
    let mut s = slow_post(&d.socket, 100);
    s.write_all(b"{").expect("first byte");
    std::thread::sleep(Duration::from_millis(100));
    d.signal(Signal::SIGTERM);
    let sent = Instant::now();
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(d.stderr().contains("grace period over"));
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a cut request gets no response");
}

#[test]
fn sigint_also_drains_and_exits_0() {
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb, &sb.config("", ""), &[]);
    d.signal(Signal::SIGINT);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn sighup_reloads_valid_config_and_keeps_the_old_on_errors() {
    let sb = Sandbox::new();
    let notify = NotifySocket::bind(sb.path());
    let notify_path = notify.path.to_string_lossy().into_owned();
    // Polling is slow here: SIGHUP is what re-reads the inbox.
    let config = sb
        .config("", "")
        .replace("poll_interval = \"100ms\"", "poll_interval = \"1h\"");
    let d = Daemon::spawn(
        &sb,
        &config,
        &[("NOTIFY_SOCKET", &notify_path)],
        Command::new(airgate_bin()),
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    assert_eq!(
        get(&d.socket, "/v1/whoami", &[]).json()["tenant"],
        serde_json::Value::Null
    );

    // An open keep-alive connection survives the reload.
    let mut keep = UnixStream::connect(&d.socket).expect("connect");
    keep.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let ask = b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n";
    keep.write_all(ask).expect("write");
    read_one_response(&mut keep);

    let ops = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"ops\"]\ndefault_purpose = \"ops\"\nmodels = []\nuser_identity = { kind = \"openai_user\" }\n";
    sb.publish(&sb.sign("ops", &airgate_tests::policy(1, ops)));
    sb.write_config(&config.replace(
        "level = \"airgate=debug,info\"",
        "level = \"airgate=trace,info\"",
    ));
    d.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
    d.wait_bundle(1);
    assert_eq!(get(&d.socket, "/v1/whoami", &[]).json()["tenant"], "ops");
    keep.write_all(ask).expect("write after reload");
    let r = read_one_response(&mut keep);
    assert_eq!(r["tenant"], "ops");

    sb.write_config("this is [not valid");
    d.signal(Signal::SIGHUP);
    notify.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        get(&d.socket, "/v1/whoami", &[]).json()["tenant"],
        "ops",
        "old config kept"
    );
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert_eq!(status["last_reload"]["ok"], false);
    assert!(
        status["last_reload"]["message"]
            .as_str()
            .expect("message")
            .contains("not valid TOML")
    );
    let m = get(&d.socket, "/metrics", &[]).text();
    assert!(
        m.contains("airgate_config_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("airgate_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
}

/// Reads one Content-Length-delimited response from a keep-alive connection.
fn read_one_response(s: &mut UnixStream) -> serde_json::Value {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed");
        raw.extend_from_slice(&buf[..n]);
        if let Some(r) = airgate_tests::complete_response(&raw) {
            return r.json();
        }
    }
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    // A second daemon on the same path must refuse, not unlink the live socket.
    let other = Sandbox::new();
    let config = other.config("", "").replace(
        &other.socket().display().to_string(),
        &d.socket.display().to_string(),
    );
    let path = other.write_config(&config);
    let out = Command::new(airgate_bin())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
    assert_eq!(get(&d.socket, "/healthz", &[]).status, 200);

    // A stale node from a killed daemon is replaced.
    let stale = Sandbox::new();
    let listener = std::os::unix::net::UnixListener::bind(stale.socket()).expect("bind");
    drop(listener);
    assert!(stale.socket().exists());
    let d2 = Daemon::start(&stale, &stale.config("", ""), &[]);
    assert_eq!(get(&d2.socket, "/healthz", &[]).status, 200);
}

#[test]
fn model_inspect_rejects_files_that_are_no_model() {
    let sb = Sandbox::new();
    let junk = sb.path().join("junk.bin");
    std::fs::write(&junk, b"definitely not a model").expect("write");
    let out = Command::new(airgate_bin())
        .args(["model", "inspect"])
        .arg(&junk)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tract could not load it as ONNX"));

    let fake_gguf = sb.path().join("truncated.gguf");
    std::fs::write(&fake_gguf, b"GGUF\x03\x00\x00\x00").expect("write");
    let out = Command::new(airgate_bin())
        .args(["model", "inspect"])
        .arg(&fake_gguf)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("llama.cpp could not load it"));
}

#[test]
fn switching_audit_fail_open_by_sighup_is_recorded_each_way() {
    let sb = Sandbox::new();
    let notify = NotifySocket::bind(sb.path());
    let notify_path = notify.path.to_string_lossy().into_owned();
    let closed = sb.config("", "");
    let open = closed.replace("[audit]\n", "[audit]\nfail_open = true\n");
    assert_ne!(open, closed);
    let d = Daemon::spawn(
        &sb,
        &closed,
        &[("NOTIFY_SOCKET", &notify_path)],
        Command::new(airgate_bin()),
    );
    notify.wait_for("READY=1", Duration::from_secs(20));

    // Off -> on -> off, each by a reload.
    for text in [&open, &closed] {
        sb.write_config(text);
        d.signal(Signal::SIGHUP);
        notify.wait_for("RELOADING=1", Duration::from_secs(10));
        notify.wait_for("READY=1", Duration::from_secs(10));
    }
    let start = Instant::now();
    let changes = loop {
        let records = sb.export();
        let changes: Vec<serde_json::Value> = records
            .iter()
            .filter(|r| r["event"]["kind"] == "fail_open_changed")
            .map(|r| r["event"]["fail_open"].clone())
            .collect();
        if changes.len() >= 2 || start.elapsed() > Duration::from_secs(10) {
            // Both reloads are recorded too, each with its change.
            let reloads = records
                .iter()
                .filter(|r| r["event"]["kind"] == "config_reload")
                .count();
            assert_eq!(reloads, 2, "{records:?}");
            break changes;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        changes,
        [serde_json::json!(true), serde_json::json!(false)],
        "stderr:\n{}",
        d.stderr()
    );
    let log = d.stderr();
    assert!(
        log.contains("audit.fail_open switched on by a reload")
            && log.contains("audit.fail_open switched off by a reload"),
        "{log}"
    );
    // The startup record still says how it started.
    let records = sb.export();
    let startup = records
        .iter()
        .find(|r| r["event"]["kind"] == "startup")
        .expect("startup record");
    assert_eq!(startup["event"]["fail_open"], false);
}
