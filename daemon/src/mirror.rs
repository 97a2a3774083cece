//! The second bundle source: an internal HTTPS mirror, polled.
//!
//! One GET per `interval` with `If-None-Match` (a 304 costs nothing), over
//! its own TLS settings: the mirror's CA, and a client certificate where the
//! mirror requires mTLS. The body (bounded by the bundle size limit) goes
//! through exactly the verify-and-activate path an inbox file does, so the
//! mirror is trusted for nothing: a bundle it serves still needs a trust
//! anchor's signature, the right audience and a version that moves forward.
//!
//! The ETag of a bundle is remembered only once that bundle is settled:
//! accepted, or refused for a reason that cannot change. A bundle refused
//! for now (not valid yet, refused by this host's reloadable trust anchors
//! or audience, an I/O error while persisting it) is fetched again at the
//! next poll, so it goes in when it can.

use std::sync::Arc;
use std::time::Duration;

use airgate_policy::bundle::verify::MAX_TOKEN_BYTES;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::MirrorConfig;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{0}")]
    Setup(String),
    #[error("connect {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("mirror answered {0}")]
    Status(StatusCode),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("bundle larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
}

/// What a poll brought.
pub enum Fetched {
    /// 304: the mirror still serves what we have.
    Unchanged,
    Bundle {
        body: Bytes,
        etag: Option<String>,
    },
}

/// A client for one mirror: TLS settings loaded once, the ETag of the last
/// settled bundle remembered.
pub struct Mirror {
    config: MirrorConfig,
    connector: TlsConnector,
    etag: Option<String>,
}

impl Mirror {
    /// Loads the mirror's CA and client certificate. Blocking (file I/O).
    pub fn new(config: MirrorConfig) -> Result<Self, MirrorError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            MirrorError::Setup(format!("policy.mirror.{what}: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(&config.ca).map_err(|e| setup("ca", &e))?;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| setup("ca", &e))?;
            roots.add(cert).map_err(|e| setup("ca", &e))?;
        }
        if roots.is_empty() {
            return Err(setup("ca", &"no certificates"));
        }
        let builder = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup("ca", &e))?
            .with_root_certificates(roots);
        let mut tls = match &config.client_cert {
            Some((cert, key)) => {
                let pem = std::fs::read(cert).map_err(|e| setup("cert", &e))?;
                let chain = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| setup("cert", &e))?;
                let key = std::fs::read(key).map_err(|e| setup("key", &e))?;
                let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| setup("key", &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| setup("cert", &e))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config,
            connector: TlsConnector::from(Arc::new(tls)),
            etag: None,
        })
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    pub fn url(&self) -> String {
        self.config.url.to_string()
    }

    /// One conditional GET (with the ETag of the last settled bundle),
    /// bounded by the configured timeout.
    pub async fn poll(&self) -> Result<Fetched, MirrorError> {
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, self.fetch())
            .await
            .map_err(|_| MirrorError::Timeout(timeout))?
    }

    /// The bundle fetched with `etag` was accepted, or refused for good: it
    /// is asked for again only once the mirror serves something else.
    pub fn settled(&mut self, etag: Option<String>) {
        self.etag = etag;
    }

    async fn fetch(&self) -> Result<Fetched, MirrorError> {
        let url = &self.config.url;
        let host = url.host().unwrap_or_default();
        let port = url.port_u16().unwrap_or(443);
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| MirrorError::Setup(format!("policy.mirror.url host: {e}")))?;
        let tcp = TcpStream::connect((name, port))
            .await
            .map_err(|e| MirrorError::Connect(format!("{name}:{port}: {e}")))?;
        let tls = self
            .connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| MirrorError::Tls(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| MirrorError::Http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let authority = url.authority().map_or(name, |a| a.as_str());
        let mut req = Request::get(path)
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("airgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/jwt, text/plain");
        if let Some(etag) = &self.etag {
            req = req.header(header::IF_NONE_MATCH, etag.as_str());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| MirrorError::Http(e.to_string()))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| MirrorError::Http(e.to_string()))?;
        let result = match response.status() {
            StatusCode::NOT_MODIFIED => Ok(Fetched::Unchanged),
            StatusCode::OK => {
                let etag = response
                    .headers()
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = Limited::new(response.into_body(), MAX_TOKEN_BYTES)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.downcast_ref::<http_body_util::LengthLimitError>()
                            .is_some()
                        {
                            MirrorError::TooLarge
                        } else {
                            MirrorError::Http(e.to_string())
                        }
                    })?
                    .to_bytes();
                Ok(Fetched::Bundle { body, etag })
            }
            other => Err(MirrorError::Status(other)),
        };
        driver.abort();
        result
    }
}
