//! The mutual-TLS listener: client-certificate identities, refusals by
//! reason, revocation with resumption, reload of the TLS material, and the
//! `airgate pki` output the tests (and operators) use.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airgate_tests::tls::{Client, keepalive_get};
use airgate_tests::{Daemon, NotifySocket, Sandbox, airgate_bin, get};
use nix::sys::signal::Signal;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use time::OffsetDateTime;

pub(crate) const CLAIMS: &str = "spiffe://corp.example/tenant/claims";

pub(crate) fn pki(args: &[&str]) {
    let out = Command::new(airgate_bin())
        .arg("pki")
        .args(args)
        .output()
        .expect("airgate pki");
    assert!(
        out.status.success(),
        "airgate pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A site made with `airgate pki`: CA, server certificate, one tenant client.
pub(crate) struct Site {
    pub(crate) dir: PathBuf,
}

impl Site {
    pub(crate) fn new(sb: &Sandbox) -> Self {
        let dir = sb.path().join("pki");
        let ca = dir.join("ca");
        let ca_s = ca.to_str().expect("utf8");
        pki(&["init", "--dir", ca_s, "--name", "e2e CA"]);
        let server = dir.join("server");
        pki(&[
            "server",
            "--dir",
            ca_s,
            "--out",
            server.to_str().expect("utf8"),
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ]);
        let client = dir.join("claims");
        pki(&[
            "client",
            "--dir",
            ca_s,
            "--out",
            client.to_str().expect("utf8"),
            "--uri",
            CLAIMS,
        ]);
        // The tenant comes from a signed bundle, in the inbox before start.
        let tenant = format!(
            "[[tenants]]\nid = \"claims\"\nidentities = {{ uris = [\"{CLAIMS}\"] }}\npurposes = [\"claims-triage\"]\ndefault_purpose = \"claims-triage\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = {{ kind = \"openai_user\" }}\n"
        );
        sb.publish(&sb.sign("claims", &airgate_tests::policy(1, &tenant)));
        Self { dir }
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca/ca.pem")
    }

    pub(crate) fn client(&self, name: &str) -> Client {
        Client::with_files(
            &self.ca(),
            &self.dir.join(format!("{name}.pem")),
            &self.dir.join(format!("{name}.key")),
        )
    }

    /// A certificate signed by this site's CA with parameters pki would not use.
    fn custom_client(&self, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Client {
        let ca_key = KeyPair::from_pem(
            &std::fs::read_to_string(self.dir.join("ca/ca.key")).expect("ca key"),
        )
        .expect("key");
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.ca()).expect("ca"), ca_key)
                .expect("issuer");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(CLAIMS.try_into().expect("ia5"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let (pem, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&pem, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        self.client(name)
    }

    pub(crate) fn config(&self, sb: &Sandbox) -> String {
        sb.config(
            "",
            &format!(
                "[listen.tls]\naddress = \"127.0.0.1:0\"\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{d}/ca/ca.pem\"\ncrls = [\"{d}/ca/crl.pem\"]\nhandshake_timeout = \"1s\"\n",
                d = self.dir.display()
            ),
        )
    }
}

/// The TLS listener's bound address, from /admin/status on the Unix socket.
pub(crate) fn tls_addr(d: &Daemon) -> SocketAddr {
    let status = get(&d.socket, "/admin/status", &[]).json();
    let tls = status["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["kind"] == "tls")
        .expect("a tls listener");
    tls["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("socket addr")
}

fn handshake_count(d: &Daemon, result: &str) -> u64 {
    let metrics = get(&d.socket, "/metrics", &[]).text();
    let needle = format!("airgate_tls_handshakes_total{{listener=\"tls\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().expect("count"))
}

/// The count once it reaches `want` (or after 2 s): with TLS 1.3 the client
/// can see the refusal before the server's task has counted it.
fn handshake_count_reaching(d: &Daemon, result: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = handshake_count(d, result);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGHUP and wait until the daemon says the reload is done.
fn reload(d: &Daemon, notify: &NotifySocket) {
    d.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
}

fn start(sb: &Sandbox, site: &Site) -> (Daemon, NotifySocket) {
    let notify = NotifySocket::bind(sb.path());
    let path = notify.path.to_string_lossy().into_owned();
    let d = Daemon::spawn(
        sb,
        &site.config(sb),
        &[("NOTIFY_SOCKET", &path)],
        Command::new(airgate_bin()),
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    (d, notify)
}

#[tokio::test]
async fn a_client_from_the_ca_is_answered_and_named_by_its_uri_san() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, _notify) = start(&sb, &site);
    let addr = tls_addr(&d);
    let (r, hs) = site
        .client("claims")
        .get(addr, "/v1/whoami")
        .await
        .expect("mTLS request");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["identity"]["transport"], "tls");
    assert_eq!(j["identity"]["uri"], CLAIMS);
    assert_eq!(j["tenant"], "claims");
    assert_eq!(j["operator"], false);
    assert!(!hs.resumed);
    // The network never reaches operator routes.
    let (r, _) = site
        .client("claims")
        .get(addr, "/metrics")
        .await
        .expect("request");
    assert_eq!(r.status, 403);
    assert_eq!(handshake_count(&d, "ok"), 2);
    // The server certificate's expiry is visible to operators.
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert!(
        status["tls"]["server_certificate"]["not_after"]
            .as_i64()
            .expect("not_after")
            > 0
    );
    assert_eq!(status["tls"]["expired_crl"], "refuse");
    assert!(
        get(&d.socket, "/metrics", &[])
            .text()
            .contains("airgate_tls_server_certificate_not_after_seconds ")
    );
}

#[tokio::test]
async fn bad_client_certificates_fail_the_handshake_and_are_counted_by_reason() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, _notify) = start(&sb, &site);
    let addr = tls_addr(&d);

    let anonymous = Client::new(&site.ca(), None);
    // Another CA's client, made the same way.
    let other_ca = sb.path().join("other-ca");
    pki(&["init", "--dir", other_ca.to_str().expect("utf8")]);
    let stranger = sb.path().join("stranger");
    pki(&[
        "client",
        "--dir",
        other_ca.to_str().expect("utf8"),
        "--out",
        stranger.to_str().expect("utf8"),
        "--uri",
        CLAIMS,
    ]);
    let stranger = Client::with_files(
        &site.ca(),
        &stranger.with_extension("pem"),
        &stranger.with_extension("key"),
    );
    let expired = site.custom_client("expired", |p| {
        p.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
        p.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    // A server certificate from the same CA: valid, but not for client auth.
    let server_only = Client::with_files(
        &site.ca(),
        &site.dir.join("server.pem"),
        &site.dir.join("server.key"),
    );
    let two_uris = site.custom_client("two-uris", |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://corp.example/tenant/other"
                .try_into()
                .expect("ia5"),
        ));
    });

    for (name, client, reason) in [
        ("anonymous", &anonymous, "no_certificate"),
        ("other CA", &stranger, "unknown_ca"),
        ("expired", &expired, "expired"),
        ("server-only", &server_only, "bad_usage"),
        ("two URI SANs", &two_uris, "multiple_uri_sans"),
    ] {
        let result = client.get(addr, "/v1/whoami").await;
        assert!(result.is_err(), "{name} was let in: {result:?}");
        assert_eq!(
            handshake_count_reaching(&d, reason, 1),
            1,
            "{name} counted as {reason}"
        );
    }
    assert_eq!(handshake_count(&d, "ok"), 0);
}

#[tokio::test]
async fn a_revoked_client_cannot_come_back_even_by_resumption() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, notify) = start(&sb, &site);
    let addr = tls_addr(&d);
    let client = site.client("claims");
    client
        .get(addr, "/healthz")
        .await
        .expect("first connection");
    let (_, hs) = client
        .get(addr, "/healthz")
        .await
        .expect("second connection");
    assert!(hs.resumed, "the client resumes while nothing changed");

    pki(&[
        "revoke",
        "--dir",
        site.dir.join("ca").to_str().expect("utf8"),
        site.dir.join("claims.pem").to_str().expect("utf8"),
    ]);
    reload(&d, &notify);
    let result = client.get(addr, "/healthz").await;
    assert!(result.is_err(), "revoked client got in: {result:?}");
    assert_eq!(handshake_count_reaching(&d, "revoked", 1), 1);
    // Another client of the same CA is unaffected.
    pki(&[
        "client",
        "--dir",
        site.dir.join("ca").to_str().expect("utf8"),
        "--out",
        site.dir.join("fresh").to_str().expect("utf8"),
        "--uri",
        "spiffe://corp.example/tenant/fresh",
    ]);
    let (r, _) = site
        .client("fresh")
        .get(addr, "/v1/whoami")
        .await
        .expect("fresh client");
    assert_eq!(
        r.json()["identity"]["uri"],
        "spiffe://corp.example/tenant/fresh"
    );
}

#[tokio::test]
async fn a_client_certificate_expired_since_the_handshake_is_refused_and_its_connection_closed() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    // Valid for a day more by the real clock, which the handshake uses; the
    // daemon's own clock runs two days ahead (a failpoint), so by it the
    // certificate has expired on every connection it opens.
    let short = site.custom_client("short", |p| {
        p.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
    });
    let notify = NotifySocket::bind(sb.path());
    let path = notify.path.to_string_lossy().into_owned();
    let d = Daemon::spawn(
        &sb,
        &site.config(&sb),
        &[
            ("NOTIFY_SOCKET", &path),
            ("AIRGATE_FAILPOINTS", "clock-offset=172800"),
        ],
        Command::new(airgate_bin()),
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let addr = tls_addr(&d);

    let mut conn = short.connect(addr).await.expect("the handshake passes");
    let r = keepalive_get(&mut conn, "/v1/whoami")
        .await
        .expect("an answer");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "client_certificate_expired");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        keepalive_get(&mut conn, "/v1/whoami").await.is_err(),
        "the connection was left open"
    );
    // Resuming the session from before is no way around it.
    let (r, hs) = short.get(addr, "/healthz").await.expect("an answer");
    assert!(hs.resumed, "the client resumed its session");
    assert_eq!(r.status, 401, "{}", r.text());
    let metrics = get(&d.socket, "/metrics", &[]).text();
    assert!(
        metrics.contains("airgate_tls_client_certificate_expired_total{listener=\"tls\"} 2"),
        "{metrics}"
    );
    assert!(d.stderr().contains("client certificate has expired"));
    // A certificate valid by the daemon's clock too is served as before.
    let (r, _) = site
        .client("claims")
        .get(addr, "/v1/whoami")
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
}

fn replace_file(from: &Path, to: &Path) {
    std::fs::rename(from, to).expect("rename into place");
}

#[tokio::test]
async fn sighup_serves_a_new_certificate_to_new_connections_and_keeps_old_ones() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, notify) = start(&sb, &site);
    let addr = tls_addr(&d);
    let client = site.client("claims");
    let mut old_conn = client.connect(addr).await.expect("connect");
    let old_cert = airgate_tests::tls::Handshake::of(&old_conn).server_cert_sha256;
    assert_eq!(
        keepalive_get(&mut old_conn, "/healthz")
            .await
            .expect("request")
            .status,
        200
    );

    let next = site.dir.join("server-next");
    pki(&[
        "server",
        "--dir",
        site.dir.join("ca").to_str().expect("utf8"),
        "--out",
        next.to_str().expect("utf8"),
        "--dns",
        "localhost",
    ]);
    replace_file(&next.with_extension("pem"), &site.dir.join("server.pem"));
    replace_file(&next.with_extension("key"), &site.dir.join("server.key"));
    reload(&d, &notify);

    let fresh = site.client("claims");
    let (_, hs) = fresh.get(addr, "/healthz").await.expect("new connection");
    assert_ne!(
        hs.server_cert_sha256, old_cert,
        "new connections get the new certificate"
    );
    let r = keepalive_get(&mut old_conn, "/v1/whoami")
        .await
        .expect("old connection still works");
    assert_eq!(r.status, 200);
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert_eq!(
        status["tls"]["server_certificate"]["sha256"],
        hs.server_cert_sha256
    );
}

#[tokio::test]
async fn sighup_with_a_corrupt_key_keeps_the_old_material_serving() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, notify) = start(&sb, &site);
    let addr = tls_addr(&d);
    let (_, before) = site
        .client("claims")
        .get(addr, "/healthz")
        .await
        .expect("before");

    std::fs::write(
        site.dir.join("server.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("corrupt");
    reload(&d, &notify);

    let (r, after) = site
        .client("claims")
        .get(addr, "/v1/whoami")
        .await
        .expect("still served");
    assert_eq!(r.status, 200);
    assert_eq!(after.server_cert_sha256, before.server_cert_sha256);
    let status = get(&d.socket, "/admin/status", &[]).json();
    assert_eq!(status["last_reload"]["ok"], false);
    let message = status["last_reload"]["message"].as_str().expect("message");
    assert!(message.contains("server private key"), "{message}");
    assert!(d.stderr().contains("reload refused"));
}

#[test]
fn a_client_that_never_completes_the_handshake_is_cut_off() {
    use std::io::Read;
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let (d, _notify) = start(&sb, &site);
    let mut tcp = std::net::TcpStream::connect(tls_addr(&d)).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tcp.read(&mut buf).unwrap_or(0);
    let waited = start.elapsed();
    assert_eq!(n, 0, "expected EOF");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(handshake_count(&d, "timeout"), 1);
}

#[test]
fn pki_writes_private_keys_0600_and_never_overwrites() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    for key in ["ca/ca.key", "server.key", "claims.key"] {
        let mode = std::fs::metadata(site.dir.join(key))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let out = Command::new(airgate_bin())
        .args(["pki", "init", "--dir"])
        .arg(site.dir.join("ca"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    let out = Command::new(airgate_bin())
        .args(["pki", "client", "--dir"])
        .arg(site.dir.join("ca"))
        .args(["--out", "/tmp/x", "--uri", "not-a-uri"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn tls_listener_with_unusable_material_is_a_configuration_error() {
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    std::fs::write(site.dir.join("server.key"), "garbage").expect("corrupt");
    let path = sb.write_config(&site.config(&sb));
    let out = Command::new(airgate_bin())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.tls"));
}

/// A bundle mirror for the tests: HTTPS that requires a client certificate
/// from the site CA, serving whatever `body` holds with its ETag.
struct MirrorServer {
    addr: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<MirrorState>>,
}

#[derive(Default)]
struct MirrorState {
    body: String,
    etag: String,
    requests: u32,
    not_modified: u32,
}

impl MirrorServer {
    async fn start(site: &Site) -> Self {
        use rustls::server::WebPkiClientVerifier;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in airgate_tests::tls::pem_certs(&site.ca()) {
            roots.add(c).expect("root");
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                airgate_tests::tls::pem_certs(&site.dir.join("server.pem")),
                airgate_tests::tls::pem_key(&site.dir.join("server.key")),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = std::sync::Arc::new(std::sync::Mutex::new(MirrorState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    // A client without an acceptable certificate fails here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let mut s = state.lock().expect("state");
                                s.requests += 1;
                                let matches = req
                                    .headers()
                                    .get("if-none-match")
                                    .is_some_and(|v| v.as_bytes() == s.etag.as_bytes());
                                let response = if matches {
                                    s.not_modified += 1;
                                    hyper::Response::builder()
                                        .status(304)
                                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                                } else {
                                    hyper::Response::builder()
                                        .header("etag", s.etag.as_str())
                                        .body(http_body_util::Full::new(bytes::Bytes::from(
                                            s.body.clone(),
                                        )))
                                };
                                Ok::<_, std::convert::Infallible>(response.expect("response"))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    fn serve(&self, bundle: &Path, etag: &str) {
        let mut s = self.state.lock().expect("state");
        s.body = std::fs::read_to_string(bundle).expect("bundle");
        s.etag = format!("\"{etag}\"");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_from_an_https_mirror_over_mtls_with_etags() {
    let sb = Sandbox::new();
    let site = Site::new(&sb); // bundle v1 is in the inbox
    let mirror = MirrorServer::start(&site).await;
    let ops = "[[tenants]]\nid = \"ops\"\nidentities = { uids = [0] }\npurposes = [\"ops\"]\ndefault_purpose = \"ops\"\nmodels = [\"gemma-3-270m\"]\nuser_identity = { kind = \"openai_user\" }\n";
    mirror.serve(&sb.sign("v2", &airgate_tests::policy(2, ops)), "v2");
    let d = site.dir.display();
    let config = site.config(&sb).replace(
        "poll_interval = \"100ms\"",
        &format!(
            "poll_interval = \"100ms\"\n[policy.mirror]\nurl = \"https://localhost:{port}/site/bundle.jwt\"\ninterval = \"200ms\"\nca = \"{d}/ca/ca.pem\"\ncert = \"{d}/claims.pem\"\nkey = \"{d}/claims.key\"\n",
            port = mirror.addr.port()
        ),
    );
    // The daemon helpers block: keep them off the runtime's async threads.
    let d = tokio::task::block_in_place(|| Daemon::start(&sb, &config, &[]));
    let wait = |v: u64| {
        let d = &d;
        move || d.wait_bundle(v)
    };
    tokio::task::block_in_place(wait(2));
    assert_eq!(get(&d.socket, "/v1/whoami", &[]).json()["tenant"], "ops");
    // Polls go on with If-None-Match and cost a 304.
    let start = Instant::now();
    while mirror.state.lock().expect("state").not_modified < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no 304s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new bundle on the mirror is picked up; a rollback served by the mirror is not.
    mirror.serve(&sb.sign("v3", &airgate_tests::policy(3, ops)), "v3");
    tokio::task::block_in_place(wait(3));
    mirror.serve(&sb.sign("v1-old", &airgate_tests::policy(1, ops)), "old");
    let start = Instant::now();
    loop {
        let status = get(&d.socket, "/admin/status", &[]).json();
        if status["bundle"]["last_update"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("lower than version 3"))
        {
            assert_eq!(status["bundle"]["in_force"]["version"], 3);
            assert_eq!(status["bundle_mirror"]["result"], "fetched");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A bundle not valid yet is refused for now and fetched again though its
    // ETag never changes: it goes in once valid (60 s of leeway before nbf,
    // so this one is valid 6 s from now).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let later = format!("nbf = {}\n{}", now + 66, airgate_tests::policy(4, ops));
    mirror.serve(&sb.sign("v4-later", &later), "v4");
    let start = Instant::now();
    loop {
        let status = get(&d.socket, "/admin/status", &[]).json();
        let refused = status["bundle"]["last_update"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not valid before"));
        let for_now = status["bundle_mirror"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused for now"));
        if refused && for_now {
            assert_eq!(status["bundle"]["in_force"]["version"], 3);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(wait(4));
    let metrics = get(&d.socket, "/metrics", &[]).text();
    assert!(
        metrics.contains("airgate_bundle_mirror_polls_total{result=\"unchanged\"}"),
        "{metrics}"
    );
}
