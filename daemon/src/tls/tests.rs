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
