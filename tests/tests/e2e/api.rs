//! The HTTP surface on the Unix socket: identity, operators, limits, request ids.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use airgate_tests::{Daemon, Sandbox, get, post_json, raw_request};

/// The test client (a raw HTTP/1.1 client that can be run as another user).
fn client_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_airgate-test-client"))
}

/// Runs the test client as `uid`/`gid` with supplementary `groups`, via setpriv.
pub(crate) fn get_as(
    uid: u32,
    gid: u32,
    groups: &[u32],
    socket: &std::path::Path,
    path: &str,
) -> (u16, String) {
    let groups = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(if groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={groups}")
        })
        .arg(client_bin())
        .arg(socket)
        .arg(path)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').expect("status line");
    (status.parse().expect("status"), body.to_owned())
}

/// The sandbox must be reachable by the unprivileged users the tests become.
pub(crate) fn open_to_everyone(sandbox: &Sandbox) {
    std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
}

#[test]
fn whoami_reports_the_kernel_credentials_of_the_caller() {
    let sb = Sandbox::new();
    open_to_everyone(&sb);
    let config = sb.config("mode = \"0660\"\ngroup = 4243", "");
    sb.publish(&sb.sign(
        "claims",
        &airgate_tests::policy(
            1,
            "[[tenants]]\nid = \"claims\"\nidentities = { gids = [4242] }\npurposes = [\"p\"]\ndefault_purpose = \"p\"\nmodels = []\nuser_identity = { kind = \"openai_user\" }\n",
        ),
    ));
    let d = Daemon::start(&sb, &config, &[]);

    // As root: uid 0, gid 0, our own supplementary groups.
    let me = get(&d.socket, "/v1/whoami", &[]);
    assert_eq!(me.status, 200);
    let j = me.json();
    assert_eq!(j["identity"]["transport"], "unix");
    assert_eq!(j["identity"]["uid"], nix::unistd::getuid().as_raw());
    assert_eq!(j["identity"]["gid"], nix::unistd::getgid().as_raw());
    assert_eq!(j["identity"]["pid"], std::process::id());
    let mut groups: Vec<u32> = nix::unistd::getgroups()
        .expect("getgroups")
        .iter()
        .map(|g| g.as_raw())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(j["identity"]["groups"], serde_json::json!(groups));
    assert_eq!(j["operator"], true);

    // As another user with chosen supplementary groups (one of which maps to a tenant).
    let (status, body) = get_as(5001, 4243, &[4242, 7000], &d.socket, "/v1/whoami");
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["identity"]["uid"], 5001);
    assert_eq!(j["identity"]["gid"], 4243);
    assert_eq!(j["identity"]["groups"], serde_json::json!([4242, 7000]));
    assert_eq!(j["operator"], false);
    assert_eq!(j["tenant"], "claims");
    assert_eq!(j["bundle_version"], 1);

    // A caller no tenant of the bundle claims.
    let (status, body) = get_as(5002, 4243, &[], &d.socket, "/v1/whoami");
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["tenant"], serde_json::Value::Null);
    assert!(j["tenant_error"].is_string(), "{j}");
}

#[test]
fn socket_node_has_the_configured_mode_and_group() {
    let sb = Sandbox::new();
    let config = sb.config("mode = \"0640\"\ngroup = 4243", "");
    let d = Daemon::start(&sb, &config, &[]);
    let meta = std::fs::metadata(&d.socket).expect("socket node");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), 4243);
}

#[test]
fn operators_only_for_metrics_and_status() {
    let sb = Sandbox::new();
    open_to_everyone(&sb);
    let config = sb.config(
        "mode = \"0660\"\ngroup = 4243",
        "[admin]\ngroups = [4250]\n",
    );
    let d = Daemon::start(&sb, &config, &[]);

    for path in ["/metrics", "/admin/status"] {
        let (status, body) = get_as(5002, 4243, &[], &d.socket, path);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("not_operator"), "{body}");
        // A supplementary admin group makes an operator.
        let (status, _) = get_as(5002, 4243, &[4250], &d.socket, path);
        assert_eq!(status, 200, "{path} as admin-group member");
    }

    let m = get(&d.socket, "/metrics", &[]);
    assert_eq!(m.status, 200);
    let text = m.text();
    assert!(
        text.contains("airgate_http_requests_total{route=\"/metrics\",status=\"403\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("airgate_connections_accepted_total{listener=\"unix\"}"),
        "{text}"
    );
    assert!(text.contains("airgate_build_info{version="), "{text}");

    let s = get(&d.socket, "/admin/status", &[]).json();
    assert_eq!(s["pid"], d.pid());
    assert_eq!(s["ready"], false);
    assert_eq!(s["listeners"][0]["kind"], "unix");
    assert_eq!(s["listeners"][0]["activated"], false);
    assert!(
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["name"] == "state-probe"),
        "{s}"
    );

    // `airgate status` prints the same document for an operator and fails for others.
    let out = Command::new(airgate_tests::airgate_bin())
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("airgate status");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("(pid {})", d.pid())), "{text}");
    assert!(
        text.contains("ready:       no: no policy bundle in force"),
        "{text}"
    );
    let out = Command::new("setpriv")
        .args(["--reuid=5002", "--regid=4243", "--clear-groups"])
        .arg(airgate_tests::airgate_bin())
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("airgate status as non-operator");
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
}

#[test]
fn unknown_paths_and_methods_get_json_errors() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let r = get(&d.socket, "/nope", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = post_json(&d.socket, "/healthz", "{}");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    let r = get(&d.socket, "/readyz", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["ready"], false);
    assert!(
        r.json()["reasons"][0]
            .as_str()
            .expect("reason")
            .contains("no policy bundle")
    );
}

#[test]
fn inference_fails_closed_without_a_bundle_but_bad_bodies_are_named() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let r = post_json(
        &d.socket,
        "/v1/chat/completions",
        "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "policy_unavailable");
    let r = post_json(&d.socket, "/v1/chat/completions", "{not json");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
}

#[test]
fn oversized_declared_body_is_refused_before_it_is_sent() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nmax_body_bytes = 1048576\n"),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Declare 100 MB and send none of it: the answer must come anyway.
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
    )
    .expect("write head");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = airgate_tests::parse_response(&raw).expect("response");
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert_eq!(r.header("connection"), Some("close"));
}

#[test]
fn oversized_chunked_body_is_cut_off_without_reading_it_all() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nmax_body_bytes = 1048576\n"),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = s.try_clone().expect("clone");
    let response = std::thread::spawn(move || {
        let mut raw = Vec::new();
        let _ = reader.read_to_end(&mut raw);
        raw
    });
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .expect("write head");
    // Offer 256 MB in 64 KiB chunks; the daemon must stop reading near 1 MB.
    let chunk = vec![b' '; 64 * 1024];
    let mut sent: usize = 0;
    while sent < 256 << 20 {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        if s.write_all(&framed).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let r = airgate_tests::parse_response(&response.join().expect("reader")).expect("response");
    assert_eq!(r.status, 413);
    assert!(
        sent < 16 << 20,
        "client managed to send {sent} bytes before the daemon closed"
    );
}

#[test]
fn too_many_or_too_large_headers_get_431() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nmax_headers = 16\nmax_header_bytes = 8192\n"),
        &[],
    );
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let r = raw_request(&d.socket, many.as_bytes()).expect("request");
    assert_eq!(r.status, 431);

    let large = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = raw_request(&d.socket, large.as_bytes()).expect("request");
    assert_eq!(r.status, 431);

    // Under the limits the same request is fine.
    assert_eq!(get(&d.socket, "/healthz", &[("X-Small", "1")]).status, 200);
}

#[test]
fn slow_headers_are_cut_off() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nheader_read_timeout = \"1s\"\n"),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let mut closed_at = None;
    // Trickle one header byte every 100 ms for up to 6 s.
    for b in "X-Slow: ".bytes().chain(std::iter::repeat(b'a')).take(60) {
        if s.write_all(&[b]).is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {
                closed_at = Some(start.elapsed());
                break;
            }
            Ok(_) => panic!("got a response to an unfinished request"),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let closed_at = closed_at.expect("connection was never cut");
    assert!(
        closed_at >= Duration::from_millis(900),
        "cut too early: {closed_at:?}"
    );
    assert!(
        closed_at < Duration::from_secs(3),
        "cut too late: {closed_at:?}"
    );
    let m = get(&d.socket, "/metrics", &[]).text();
    assert!(
        m.contains("airgate_connections_closed_total{listener=\"unix\",how=\"header_timeout\"} 1"),
        "{m}"
    );
}

#[test]
fn idle_keepalive_connections_are_closed() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nidle_timeout = \"500ms\"\n"),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let start = Instant::now();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("read until the daemon closes");
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn connections_over_the_limit_are_refused_and_counted() {
    let sb = Sandbox::new();
    // The tests run as root, an operator: no reserve, or it would let us in.
    let d = Daemon::start(
        &sb,
        &sb.config("", "[limits]\nmax_connections = 2\noperator_reserve = 0\n"),
        &[],
    );
    // wait_healthy's probes must be gone before we count slots.
    std::thread::sleep(Duration::from_millis(100));
    let a = UnixStream::connect(&d.socket).expect("a");
    let b = UnixStream::connect(&d.socket).expect("b");
    std::thread::sleep(Duration::from_millis(100));
    let r = get(&d.socket, "/healthz", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "connection_limit");
    drop((a, b));
    std::thread::sleep(Duration::from_millis(200));
    let m = get(&d.socket, "/metrics", &[]);
    assert_eq!(m.status, 200, "a slot is free again");
    // At least ours; a health probe still closing on a loaded machine may add one.
    let refused: u64 = m
        .text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "airgate_connections_refused_total{listener=\"unix\",reason=\"connection_limit\"} ",
            )
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{}", m.text());
}

#[test]
fn request_ids_are_echoed_or_generated_and_logged() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let r = get(
        &d.socket,
        "/v1/whoami",
        &[("X-Request-Id", "client-chosen-42")],
    );
    assert_eq!(r.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(r.json()["request_id"], "client-chosen-42");

    let r = get(
        &d.socket,
        "/v1/whoami",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    );
    assert_eq!(
        r.header("x-request-id"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );

    let a = get(&d.socket, "/healthz", &[]);
    let b = get(&d.socket, "/healthz", &[]);
    let (a, b) = (
        a.header("x-request-id").expect("id"),
        b.header("x-request-id").expect("id"),
    );
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);

    // Every log line about a request carries its id.
    let r = get(&d.socket, "/missing", &[("X-Request-Id", "trace-me-7")]);
    assert_eq!(r.status, 404);
    std::thread::sleep(Duration::from_millis(100));
    let log = d.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("/missing")).collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(
        lines.iter().all(|l| l.contains("request_id=trace-me-7")),
        "{lines:#?}"
    );
}

#[test]
fn http2_with_prior_knowledge() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(&d.socket)
            .await
            .expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        for _ in 0..3 {
            let req = http::Request::get("http://localhost/v1/whoami")
                .body(Empty::<bytes::Bytes>::new())
                .expect("request");
            let resp = send.send_request(req).await.expect("response");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(j["identity"]["uid"], 0);
        }
    });
}

#[test]
fn http2_settings_carry_the_configured_limits() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config(
            "",
            "[limits]\nhttp2_max_concurrent_streams = 7\nmax_header_bytes = 9000\n",
        ),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // Client preface and an empty SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("preface");
    let mut head = [0u8; 9];
    s.read_exact(&mut head).expect("server frame header");
    assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("settings payload");
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        settings.contains(&(0x3, 7)),
        "MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert!(
        settings.contains(&(0x6, 9000)),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}
