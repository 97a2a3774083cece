use std::path::Path;
use std::time::Duration;

use super::*;
use crate::pki;

/// A CA, a server certificate and a client certificate made by `airgate pki`.
fn material(dir: &Path) -> TlsListenerConfig {
    pki::init(&dir.join("ca"), "test CA", 30).expect("ca");
    pki::server(
        &dir.join("ca"),
        &dir.join("server"),
        &["localhost".to_owned()],
        &["127.0.0.1".parse().expect("ip")],
        30,
    )
    .expect("server");
    TlsListenerConfig {
        address: "127.0.0.1:0".parse().expect("addr"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: dir.join("ca/ca.pem"),
        crls: vec![dir.join("ca/crl.pem")],
        expired_crl: ExpiredCrl::Refuse,
        handshake_timeout: Duration::from_secs(1),
        fd_name: "tls".to_owned(),
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn loads_what_pki_makes() {
    let dir = tempdir();
    let cfg = material(dir.path());
    let state = load(&cfg, SystemTime::now()).expect("loads");
    assert!(state.info.server_certificate.subject.contains("localhost"));
    assert_eq!(state.info.client_cas, vec!["CN=test CA".to_owned()]);
    assert_eq!(state.info.crls.len(), 1);
    assert!(!state.info.crls[0].expired);
    assert_eq!(
        state.server_config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[test]
fn refuses_a_key_that_is_not_the_certificates() {
    let dir = tempdir();
    let mut cfg = material(dir.path());
    pki::server(
        &dir.path().join("ca"),
        &dir.path().join("other"),
        &["other".to_owned()],
        &[],
        30,
    )
    .expect("other");
    cfg.key = dir.path().join("other.key");
    assert!(matches!(
        load(&cfg, SystemTime::now()),
        Err(TlsError::KeyMismatch { .. })
    ));
}

#[test]
fn refuses_garbage_and_missing_files() {
    let dir = tempdir();
    let cfg = material(dir.path());
    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    for (field, err) in [
        ("cert", "server certificate"),
        ("key", "server private key"),
        ("client_ca", "client CA bundle"),
        ("crl", "CRL"),
    ] {
        let mut bad = cfg.clone();
        match field {
            "cert" => bad.cert = junk.clone(),
            "key" => bad.key = junk.clone(),
            "client_ca" => bad.client_ca = junk.clone(),
            _ => bad.crls = vec![junk.clone()],
        }
        let e = load(&bad, SystemTime::now())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(err), "{field}: {e}");
    }
    let mut missing = cfg;
    missing.cert = dir.path().join("absent.pem");
    assert!(matches!(
        load(&missing, SystemTime::now()),
        Err(TlsError::Read { .. })
    ));
}

#[test]
fn refuses_a_server_certificate_outside_its_validity() {
    let dir = tempdir();
    let cfg = material(dir.path());
    let later = SystemTime::now() + Duration::from_secs(60 * 86_400);
    assert!(matches!(
        load(&cfg, later),
        Err(TlsError::CertNotValidNow { .. })
    ));
}

#[test]
fn an_expired_crl_is_reported() {
    let dir = tempdir();
    let mut cfg = material(dir.path());
    cfg.expired_crl = ExpiredCrl::Warn;
    // The CA and server certificate are valid 30 days, the CRL 30 days too:
    // 29 days on, the certificate is fine and the CRL... still fine; shorten it.
    pki::crl(&dir.path().join("ca"), 1).expect("crl");
    let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
    let state = load(&cfg, later).expect("warn mode loads");
    assert!(state.info.crls[0].expired);
    assert_eq!(state.info.expired_crl, ExpiredCrl::Warn);
}

#[test]
fn client_certificate_rules() {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
    let make = |uris: &[&str], eku: Option<ExtendedKeyUsagePurpose>| {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        p.extended_key_usages = eku.into_iter().collect();
        let key = KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().clone()
    };
    let one = make(&["spiffe://x/a"], Some(ExtendedKeyUsagePurpose::ClientAuth));
    assert!(check_client_cert(&one).is_ok());
    let two = make(
        &["spiffe://x/a", "spiffe://x/b"],
        Some(ExtendedKeyUsagePurpose::ClientAuth),
    );
    assert!(matches!(
        check_client_cert(&two),
        Err(ClientCertPolicyError::MultipleUriSans(2))
    ));
    let no_eku = make(&["spiffe://x/a"], None);
    assert!(matches!(
        check_client_cert(&no_eku),
        Err(ClientCertPolicyError::NoClientAuthUsage)
    ));
    let server_only = make(&["spiffe://x/a"], Some(ExtendedKeyUsagePurpose::ServerAuth));
    assert!(matches!(
        check_client_cert(&server_only),
        Err(ClientCertPolicyError::NoClientAuthUsage)
    ));

    let peer = peer_identity(&one, "10.0.0.1:5000".parse().expect("addr")).expect("identity");
    assert_eq!(peer.uri.as_deref(), Some("spiffe://x/a"));
    assert_eq!(peer.sha256.len(), 64);
}

#[test]
fn handshake_failures_are_named() {
    let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    let cases = [
        (
            wrap(rustls::Error::NoCertificatesPresented),
            "no_certificate",
        ),
        (
            wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            "unknown_ca",
        ),
        (
            wrap(rustls::Error::InvalidCertificate(CertificateError::Expired)),
            "expired",
        ),
        (
            wrap(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            "revoked",
        ),
        (
            wrap(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            )),
            "bad_usage",
        ),
        (
            wrap(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(ClientCertPolicyError::MultipleUriSans(2))),
            ))),
            "multiple_uri_sans",
        ),
        (
            io::Error::from(io::ErrorKind::UnexpectedEof),
            "client_closed",
        ),
    ];
    for (e, want) in cases {
        assert_eq!(failure_reason(&e), want, "{e}");
    }
}

#[test]
fn a_client_certificate_expires_after_its_not_after_second() {
    let not_after = 1_795_000_000;
    for (now, expired) in [
        (not_after - 86_400, false),
        (not_after - 1, false),
        // notAfter is the last second the certificate is valid.
        (not_after, false),
        (not_after + 1, true),
        (not_after + 86_400 * 365, true),
    ] {
        assert_eq!(
            client_certificate_expired(not_after, now),
            expired,
            "at {now} (not_after {not_after})"
        );
    }
}

#[test]
fn load_bounds_session_resumption() {
    let dir = tempdir();
    let state = load(&material(dir.path()), SystemTime::now()).expect("loads");
    let storage = format!("{:?}", state.server_config.session_storage);
    assert!(storage.contains("SessionCache"), "{storage}");
    assert!(storage.contains("lifetime: 3600"), "{storage}");
    assert!(!state.server_config.ticketer.enabled(), "stateful only");
}

/// The session cache's clock, moved by the test below (the only user).
static SESSION_NOW: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn session_now() -> i64 {
    SESSION_NOW.load(std::sync::atomic::Ordering::SeqCst)
}

fn set_session_now(t: i64) {
    SESSION_NOW.store(t, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn resumed_sessions_end_a_lifetime_after_the_full_handshake_of_their_chain() {
    let t = 1_795_000_000;
    set_session_now(t);
    let cache = SessionCache::new(16, Duration::from_secs(3600), session_now);
    let key = |k: &str| k.as_bytes().to_vec();

    // A full handshake stores its session (a TLS 1.2 session id, or the
    // tickets of a TLS 1.3 one): resumable for the lifetime, not after.
    let mut first = Chain::default();
    assert!(in_handshake(&mut first, || cache.put(key("a"), b"session a".to_vec())));
    assert_eq!(first.origin, None, "a full handshake resumes nothing");
    set_session_now(t + 3599);
    assert_eq!(cache.get(b"a"), Some(b"session a".to_vec()));
    set_session_now(t + 3600);
    assert_eq!(cache.get(b"a"), None, "past its lifetime");
    set_session_now(t + 1);
    assert_eq!(cache.get(b"a"), None, "and forgotten");

    // A chain: each resumed TLS 1.3 connection takes its ticket and is
    // handed new ones, stored while its handshake is driven. They keep the
    // chain's start, so resuming every half hour does not keep it alive.
    set_session_now(t);
    in_handshake(&mut Chain::default(), || {
        cache.put(key("t0"), b"s0".to_vec())
    });
    let mut resumed = Chain::default();
    set_session_now(t + 1800);
    in_handshake(&mut resumed, || {
        assert_eq!(cache.take(b"t0"), Some(b"s0".to_vec()));
        cache.put(key("t1"), b"s1".to_vec());
    });
    assert_eq!(resumed.origin, Some(t), "joined the chain begun at {t}");
    assert_eq!(cache.take(b"t0"), None, "a TLS 1.3 ticket is used once");
    set_session_now(t + 3599);
    let mut again = Chain::default();
    in_handshake(&mut again, || {
        assert_eq!(cache.take(b"t1"), Some(b"s1".to_vec()));
        cache.put(key("t2"), b"s2".to_vec());
    });
    set_session_now(t + 3600);
    assert_eq!(
        cache.take(b"t2"),
        None,
        "the chain ends an hour after it began"
    );

    // Outside a handshake nothing is joined, and a clock set back before a
    // session's start ends it too.
    set_session_now(t);
    cache.put(key("b"), b"session b".to_vec());
    assert_eq!(HANDSHAKE.with(Cell::get), None);
    set_session_now(t - 10);
    assert_eq!(cache.get(b"b"), None);
    // Bytes too short to carry a start are no session.
    assert_eq!(cache.fresh(b"short"), None);
}
