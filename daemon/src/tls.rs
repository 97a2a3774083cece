//! Mutual TLS for the enclave network.
//!
//! Owns the one rustls CryptoProvider (ring), loading and validating the
//! server certificate, key, client CA bundle and CRLs into a `ServerConfig`,
//! the client-certificate policy on top of WebPKI verification (one URI SAN
//! at most, the client-auth EKU required), turning a verified certificate
//! into an [`Identity`](airgate_policy::identity::Identity), and naming why a
//! handshake failed. Loading is all-or-nothing: a new set replaces the old
//! only once every part of it has been checked.
//!
//! Every load builds a fresh `ServerConfig` and with it a fresh session
//! cache, so after a reload (e.g. of a CRL) no client can resume a session
//! that was established under the old material.
//!
//! Resumption is bounded in time too: a session can be resumed for
//! [`SESSION_LIFETIME`] (one hour) counted from the full handshake that
//! verified the client's certificate, however many resumptions came in
//! between (each resumed TLS 1.3 connection is handed new tickets, which
//! inherit the start of their chain; see [`SessionCache`]). After that the
//! client makes a full handshake, its certificate checked again against the
//! CA bundle, the CRLs and the clock. A certificate that expires while a
//! connection (or a resumed session) lives on is refused per request by the
//! HTTP layer ([`client_certificate_expired`]).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airgate_policy::identity::TlsPeer;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use serde::Serialize;

use crate::config::{ExpiredCrl, TlsListenerConfig};

/// The process's one CryptoProvider. Installed on first use; every TLS
/// configuration is built from it.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return Arc::clone(p);
    }
    // Losing a race to install is fine: someone installed the same provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .map(Arc::clone)
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("the private key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the server certificate is not valid now (valid {from} to {until})")]
    CertNotValidNow {
        path: PathBuf,
        from: String,
        until: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Build(String),
}

/// A summary of a certificate for /admin/status.
#[derive(Clone, Debug, Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub serial: String,
    pub sha256: String,
    pub not_before: i64,
    pub not_after: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CrlSummary {
    pub path: String,
    pub issuer: String,
    pub revoked: usize,
    pub next_update: Option<i64>,
    /// nextUpdate has passed.
    pub expired: bool,
}

/// What /admin/status shows of the TLS material in use.
#[derive(Clone, Debug, Serialize)]
pub struct TlsInfo {
    pub server_certificate: CertSummary,
    pub client_cas: Vec<String>,
    pub crls: Vec<CrlSummary>,
    pub expired_crl: ExpiredCrl,
    pub loaded_at: i64,
}

/// Validated TLS material, ready to accept connections with.
pub struct TlsState {
    pub server_config: Arc<ServerConfig>,
    pub info: TlsInfo,
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, what: &'static str, reason: impl ToString) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        what,
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, what, e))?;
    if certs.is_empty() {
        return Err(invalid(path, what, "no PEM certificate in the file"));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| invalid(path, what, e))?;
    }
    Ok(certs)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn summarise(der: &CertificateDer<'_>) -> Result<CertSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        serial: hex(cert.raw_serial()),
        sha256: sha256(der),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Reads and checks everything the TLS listener needs. Nothing is kept unless
/// all of it is usable.
pub fn load(cfg: &TlsListenerConfig, now: SystemTime) -> Result<TlsState, TlsError> {
    let provider = provider();
    let now_s = unix_seconds(now);

    let chain = certificates(&cfg.cert, "server certificate")?;
    let key_pem = read(&cfg.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(&cfg.key, "server private key", e))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(&cfg.key, "server private key", e))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
    if certified.keys_match().is_err() {
        return Err(TlsError::KeyMismatch {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
        });
    }
    let server_certificate =
        summarise(&chain[0]).map_err(|e| invalid(&cfg.cert, "server certificate", e))?;
    if now_s < server_certificate.not_before || now_s > server_certificate.not_after {
        let show = |t: i64| {
            x509_parser::time::ASN1Time::from_timestamp(t)
                .map_or_else(|_| t.to_string(), |t| t.to_string())
        };
        return Err(TlsError::CertNotValidNow {
            path: cfg.cert.clone(),
            from: show(server_certificate.not_before),
            until: show(server_certificate.not_after),
        });
    }

    let cas = certificates(&cfg.client_ca, "client CA bundle")?;
    let mut roots = RootCertStore::empty();
    let mut client_cas = Vec::new();
    for ca in cas {
        client_cas.push(summarise(&ca).map(|s| s.subject).unwrap_or_default());
        roots
            .add(ca)
            .map_err(|e| invalid(&cfg.client_ca, "client CA bundle", e))?;
    }

    let mut crls = Vec::new();
    let mut crl_info = Vec::new();
    for path in &cfg.crls {
        let pem = read(path)?;
        let found = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(path, "CRL", e))?;
        if found.is_empty() {
            return Err(invalid(path, "CRL", "no PEM X509 CRL in the file"));
        }
        for crl in found {
            let (_, parsed) =
                x509_parser::parse_x509_crl(&crl).map_err(|e| invalid(path, "CRL", e))?;
            let next_update = parsed.next_update().map(|t| t.timestamp());
            let expired = next_update.is_some_and(|t| t < now_s);
            if expired {
                match cfg.expired_crl {
                    ExpiredCrl::Refuse => tracing::error!(
                        crl = %path.display(),
                        "CRL is past its nextUpdate: clients it covers are refused (expired_crl = \"refuse\")"
                    ),
                    ExpiredCrl::Warn => tracing::warn!(
                        crl = %path.display(),
                        "CRL is past its nextUpdate: still used (expired_crl = \"warn\")"
                    ),
                }
            }
            crl_info.push(CrlSummary {
                path: path.display().to_string(),
                issuer: parsed.issuer().to_string(),
                revoked: parsed.iter_revoked_certificates().count(),
                next_update,
                expired,
            });
            crls.push(crl);
        }
    }

    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .with_crls(crls);
    if cfg.expired_crl == ExpiredCrl::Refuse {
        builder = builder.enforce_revocation_expiration();
    }
    let inner = builder
        .build()
        .map_err(|e| TlsError::Build(e.to_string()))?;
    let verifier = Arc::new(ClientPolicy { inner });

    let mut server_config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Build(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    server_config.ignore_client_order = true;
    // Stateful resumption only (no ticketer: rustls's default), from a
    // bounded cache whose sessions end SESSION_LIFETIME after the full
    // handshake of their chain.
    server_config.session_storage = Arc::new(SessionCache::new(
        SESSION_CACHE_SIZE,
        SESSION_LIFETIME,
        crate::clock::system_time_now,
    ));

    Ok(TlsState {
        server_config: Arc::new(server_config),
        info: TlsInfo {
            server_certificate,
            client_cas,
            crls: crl_info,
            expired_crl: cfg.expired_crl,
            loaded_at: now_s,
        },
    })
}

/// How long a TLS session may be resumed, counted from the full handshake
/// that began its chain (see the module docs).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(3600);

/// Sessions kept for resumption at once; past it the oldest are forgotten.
pub const SESSION_CACHE_SIZE: usize = 1024;

/// Whether a client certificate whose notAfter is `not_after` has expired
/// at `now` (both seconds since the Unix epoch). notAfter is the last second
/// it is valid (RFC 5280), as the handshake's WebPKI check has it.
pub fn client_certificate_expired(not_after: i64, now: i64) -> bool {
    now > not_after
}

/// The session chain of the handshake being driven on this thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Chain {
    /// When the full handshake that began it was made; `None` while the
    /// handshake resumes nothing (it is a chain's first).
    origin: Option<i64>,
}

thread_local! {
    /// Set only while [`handshake`] polls a handshake on this thread: rustls
    /// calls the session store synchronously from inside that poll, so the
    /// store learns which chain the connection belongs to.
    static HANDSHAKE: Cell<Option<Chain>> = const { Cell::new(None) };
}

/// Runs `f` (one poll of a handshake) with `chain` as this thread's
/// handshake context, and keeps what the session store learnt of it.
fn in_handshake<R>(chain: &mut Chain, f: impl FnOnce() -> R) -> R {
    let outer = HANDSHAKE.with(|h| h.replace(Some(*chain)));
    let result = f();
    *chain = HANDSHAKE.with(|h| h.replace(outer)).unwrap_or_default();
    result
}

/// Drives a server handshake (e.g. `TlsAcceptor::accept`) so that the
/// [`SessionCache`] can tell a resumed connection's chain from a new one.
pub async fn handshake<F>(mut accept: F) -> F::Output
where
    F: Future + Unpin,
{
    let mut chain = Chain::default();
    std::future::poll_fn(move |cx| in_handshake(&mut chain, || Pin::new(&mut accept).poll(cx)))
        .await
}

/// Server-side session storage (TLS 1.2 session ids, TLS 1.3 stateful
/// tickets) with a bounded size that forgets a session `lifetime` after the
/// full handshake its chain began with. Each value is kept behind that
/// start (8 bytes, big-endian Unix seconds): a session stored while a
/// resumed handshake is driven (the new tickets of a resumed TLS 1.3
/// connection) gets the start of the chain it resumed, not the time it was
/// stored, so resuming again and again does not extend it.
#[derive(Debug)]
pub struct SessionCache {
    inner: Arc<ServerSessionMemoryCache>,
    lifetime: i64,
    clock: fn() -> i64,
}

impl SessionCache {
    pub fn new(size: usize, lifetime: Duration, clock: fn() -> i64) -> Self {
        Self {
            inner: ServerSessionMemoryCache::new(size),
            lifetime: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            clock,
        }
    }

    /// The session in `stored`, if its chain is young enough; the handshake
    /// being driven (if any) joins that chain.
    fn fresh(&self, stored: &[u8]) -> Option<Vec<u8>> {
        let (stamp, value) = stored.split_at_checked(8)?;
        let origin = i64::from_be_bytes(stamp.try_into().ok()?);
        // A clock set back before the chain began ends it too.
        let age = (self.clock)().checked_sub(origin)?;
        if !(0..self.lifetime).contains(&age) {
            return None;
        }
        HANDSHAKE.with(|h| {
            if let Some(mut chain) = h.get() {
                chain.origin = Some(origin);
                h.set(Some(chain));
            }
        });
        Some(value.to_vec())
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let origin = HANDSHAKE
            .with(Cell::get)
            .and_then(|chain| chain.origin)
            .unwrap_or_else(self.clock);
        let mut stamped = Vec::with_capacity(8 + value.len());
        stamped.extend_from_slice(&origin.to_be_bytes());
        stamped.extend_from_slice(&value);
        self.inner.put(key, stamped)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stored = self.inner.get(key)?;
        let fresh = self.fresh(&stored);
        if fresh.is_none() {
            self.inner.take(key);
        }
        fresh
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(&self.inner.take(key)?)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Why a client certificate that chains correctly is still refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertPolicyError {
    #[error("the client certificate carries {0} URI SANs; one identity per certificate is allowed")]
    MultipleUriSans(usize),
    #[error("the client certificate lacks the client-auth extended key usage")]
    NoClientAuthUsage,
    #[error("the client certificate cannot be parsed: {0}")]
    Unparseable(String),
}

impl ClientCertPolicyError {
    fn reason(&self) -> &'static str {
        match self {
            Self::MultipleUriSans(_) => "multiple_uri_sans",
            Self::NoClientAuthUsage => "bad_usage",
            Self::Unparseable(_) => "bad_certificate",
        }
    }
}

fn check_client_cert(der: &CertificateDer<'_>) -> Result<(), ClientCertPolicyError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ClientCertPolicyError::Unparseable(e.to_string()))?;
    // WebPKI accepts a certificate with no EKU extension for any purpose;
    // airgate wants client certificates issued as such.
    let client_auth = cert
        .extended_key_usage()
        .map_err(|e| ClientCertPolicyError::Unparseable(e.to_string()))?
        .is_some_and(|eku| eku.value.client_auth);
    if !client_auth {
        return Err(ClientCertPolicyError::NoClientAuthUsage);
    }
    let uris = cert
        .subject_alternative_name()
        .map_err(|e| ClientCertPolicyError::Unparseable(e.to_string()))?
        .map_or(0, |san| {
            san.value
                .general_names
                .iter()
                .filter(|n| matches!(n, x509_parser::extensions::GeneralName::URI(_)))
                .count()
        });
    if uris > 1 {
        return Err(ClientCertPolicyError::MultipleUriSans(uris));
    }
    Ok(())
}

/// WebPKI verification (chain, validity, client-auth usage, revocation of
/// the whole chain), then airgate's own rules for identities.
#[derive(Debug)]
struct ClientPolicy {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ClientPolicy {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_client_cert(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity a verified client certificate establishes.
pub fn peer_identity(der: &CertificateDer<'_>, remote: SocketAddr) -> Result<TlsPeer, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut uri = None;
    let mut dns_names = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uri = Some((*u).to_owned()),
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(TlsPeer {
        uri,
        dns_names,
        common_name,
        serial: hex(cert.raw_serial()),
        sha256: sha256(der),
        not_after: cert.validity().not_after.timestamp(),
        remote_addr: remote.to_string(),
    })
}

/// A stable label for why a handshake failed, for metrics and logs.
pub fn failure_reason(error: &io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => "client_closed",
            _ => "io_error",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownRevocationStatus => "revocation_unknown",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "bad_usage"
            }
            CertificateError::Other(OtherError(inner)) => inner
                .downcast_ref::<ClientCertPolicyError>()
                .map_or("bad_certificate", ClientCertPolicyError::reason),
            _ => "bad_certificate",
        },
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => "incompatible",
        rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::InvalidMessage(_)
        | rustls::Error::PeerMisbehaved(_) => "protocol_error",
        rustls::Error::AlertReceived(_) => "client_alert",
        _ => "other",
    }
}

#[cfg(test)]
mod tests;
