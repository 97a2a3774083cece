//! Slots and bodies that a hostile peer could otherwise hold forever:
//! per-listener connection budgets with an operator reserve, the body read
//! deadline, and the HTTP/2 idle close that PINGs do not hold off.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use airgate_tests::{Daemon, Sandbox, get, parse_response, read_until_close};

use crate::api::{get_as, open_to_everyone};
use crate::tls::{Site, tls_addr};

/// The value of one series in the metrics text (0 when absent).
fn series(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_flood_of_idle_tcp_connections_leaves_the_unix_socket_served() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    // The pre-listener key, so that the same test shows the old shared budget
    // failing. A long handshake timeout: the flood keeps its slots throughout.
    let config = sb.config(
        "",
        &format!(
            "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{d}/ca/ca.pem\"\ncrls = [\"{d}/ca/crl.pem\"]\nhandshake_timeout = \"60s\"\n\n[limits]\nmax_connections = 4\n",
            d = site.dir.display()
        ),
    );
    let d = Daemon::start(&sb, &config, &[]);
    let addr = tls_addr(&d);

    // Four TCP connections that never say a word: each holds a TLS slot.
    let flood: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(&d.socket, "/metrics", &[]);
        assert_eq!(m.status, 200, "the Unix socket is locked out: {}", m.text());
        if series(
            &m.text(),
            "airgate_connections_accepted_total{listener=\"tls\"}",
        ) >= 4
        {
            break;
        }
        assert!(Instant::now() < deadline, "the flood was not accepted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Local tenants and operators are still served.
    assert_eq!(get(&d.socket, "/healthz", &[]).status, 200);
    assert_eq!(get(&d.socket, "/v1/whoami", &[]).status, 200);

    // A fifth TCP connection is closed at once, not held for a handshake.
    let mut fifth = TcpStream::connect(addr).expect("connect");
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match fifth.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the fifth connection was not refused: {other:?}"),
    }
    let m = get(&d.socket, "/metrics", &[]).text();
    assert!(
        series(
            &m,
            "airgate_connections_refused_total{listener=\"tls\",reason=\"connection_limit\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "airgate_connections_refused_total{listener=\"unix\",reason=\"connection_limit\"}"
        ),
        0,
        "{m}"
    );

    // Once the flood leaves, its slots are free for real clients again.
    drop(flood);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let client = site.client("claims");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rt.block_on(client.get(addr, "/v1/whoami")) {
            Ok((r, _)) if r.status == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "no TLS slot came free: {:?}",
                other.map(|(r, _)| r.status)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_operator_gets_in_when_tenants_fill_the_unix_socket() {
    let sb = Sandbox::new();
    open_to_everyone(&sb);
    let d = Daemon::start(
        &sb,
        &sb.config(
            "mode = \"0660\"\ngroup = 4243",
            "[limits]\nmax_connections_unix = 2\noperator_reserve = 1\n",
        ),
        &[],
    );
    // wait_healthy's probes must be gone before we count slots.
    std::thread::sleep(Duration::from_millis(100));
    // Two idle connections take the open slots (root takes open slots first).
    let held = [
        UnixStream::connect(&d.socket).expect("a"),
        UnixStream::connect(&d.socket).expect("b"),
    ];
    std::thread::sleep(Duration::from_millis(100));

    // A tenant, not an operator, is turned away.
    let (status, body) = get_as(5001, 4243, &[], &d.socket, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connection_limit"), "{body}");

    // An operator (the tests run as root) takes the reserved slot.
    let r = get(&d.socket, "/admin/status", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["connections"]["operator_reserve"], 1);
    std::thread::sleep(Duration::from_millis(200));

    // With the reserve held too, even an operator is refused.
    let reserve = UnixStream::connect(&d.socket).expect("c");
    std::thread::sleep(Duration::from_millis(100));
    let r = get(&d.socket, "/healthz", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "connection_limit");
    drop((held, reserve));
}

#[test]
fn a_declared_body_that_never_comes_is_cut_off_after_the_body_read_timeout() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config(
            "",
            "[limits]\nbody_read_timeout = \"1s\"\nmin_upload_bytes_per_sec = 1000\n",
        ),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Declare 1000 bytes, send 10, then nothing.
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":\"",
    )
    .expect("write");
    let start = Instant::now();
    let raw = read_until_close(&mut s).expect("the daemon answers and closes");
    let waited = start.elapsed();
    let r = parse_response(&raw).expect("response");
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "body_timeout");
    assert_eq!(r.header("connection"), Some("close"));
    // One second, plus the 10 ms the ten bytes earned.
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let m = get(&d.socket, "/metrics", &[]).text();
    assert_eq!(
        series(
            &m,
            "airgate_http_requests_total{route=\"/v1/chat/completions\",status=\"408\"}"
        ),
        1,
        "{m}"
    );
}

#[test]
fn a_body_that_keeps_up_the_minimum_rate_is_not_cut_off() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config(
            "",
            "[limits]\nbody_read_timeout = \"1s\"\nmin_upload_bytes_per_sec = 1000\n",
        ),
        &[],
    );
    // 5000 bytes at about 2500 bytes/s: twice body_read_timeout in all, but
    // every byte earns its own millisecond.
    let pad = "a".repeat(5000 - r#"{"model":"m","messages":[],"pad":""}"#.len());
    let body = format!(r#"{{"model":"m","messages":[],"pad":"{pad}"}}"#);
    assert_eq!(body.len(), 5000);
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n",
    )
    .expect("write head");
    let start = Instant::now();
    for chunk in body.as_bytes().chunks(125) {
        s.write_all(chunk).expect("the daemon is still reading");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = parse_response(&read_until_close(&mut s).expect("read")).expect("response");
    assert!(start.elapsed() >= Duration::from_millis(1500));
    // No bundle: the request is refused by policy, but its body was read.
    assert_ne!(r.status, 408, "{}", r.text());
    assert_ne!(r.json()["error"]["code"], "body_timeout");
}

/// One HTTP/2 frame, written by hand.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;

/// A hostile HTTP/2 client: one request, then a PING every 200 ms, and no
/// answer to the server's own PINGs (so a graceful shutdown, which waits for
/// one, never completes on its own).
#[test]
fn an_idle_http2_connection_is_closed_even_while_the_peer_pings() {
    let sb = Sandbox::new();
    let d = Daemon::start(
        &sb,
        &sb.config(
            "",
            "[limits]\nidle_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n",
        ),
        &[],
    );
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // GET /healthz: :method GET, :scheme http (static table), then :path and
    // :authority as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    out.extend(frame(HEADERS, END_STREAM | 0x4, 1, &block));
    s.write_all(&out).expect("preface and request");

    let start = Instant::now();
    let mut inbox: Vec<u8> = Vec::new();
    let mut answered_at: Option<Instant> = None;
    let mut pongs_while_idle = 0;
    let mut goaway = false;
    let mut last_ping = Instant::now();
    let closed_at = loop {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the idle connection was never closed ({pongs_while_idle} PINGs answered while idle)"
        );
        if last_ping.elapsed() >= Duration::from_millis(200) {
            last_ping = Instant::now();
            if s.write_all(&frame(PING, 0, 0, &[7; 8])).is_err() {
                break Instant::now();
            }
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break Instant::now(),
            Ok(n) => inbox.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break Instant::now(),
        }
        while inbox.len() >= 9 {
            let len =
                usize::from(inbox[0]) << 16 | usize::from(inbox[1]) << 8 | usize::from(inbox[2]);
            if inbox.len() < 9 + len {
                break;
            }
            let (kind, flags) = (inbox[3], inbox[4]);
            let stream = u32::from_be_bytes([inbox[5], inbox[6], inbox[7], inbox[8]]) & 0x7fff_ffff;
            inbox.drain(..9 + len);
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    s.write_all(&frame(SETTINGS, ACK, 0, &[]))
                        .expect("settings ack");
                }
                HEADERS | DATA if stream == 1 && flags & END_STREAM != 0 => {
                    answered_at = Some(Instant::now());
                }
                PING if flags & ACK != 0 && answered_at.is_some() => pongs_while_idle += 1,
                GOAWAY => goaway = true,
                _ => {}
            }
        }
    };
    let answered_at = answered_at.expect("the request was answered");
    let idle_for = closed_at - answered_at;
    assert!(
        pongs_while_idle >= 3,
        "the daemon answered only {pongs_while_idle} PINGs while idle"
    );
    assert!(
        goaway,
        "the daemon asked the peer to go away before cutting it"
    );
    // idle_timeout, then up to header_read_timeout for the peer to close.
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(6),
        "{idle_for:?}"
    );
    let m = get(&d.socket, "/metrics", &[]).text();
    assert!(
        series(
            &m,
            "airgate_connections_closed_total{listener=\"unix\",how=\"idle\"}"
        ) >= 1,
        "{m}"
    );
}
