//! `airgate pki`: a small certificate authority for air-gapped sites.
//!
//! It makes what the mTLS listener needs and nothing more: a CA, server
//! certificates for the host's names and addresses, client certificates
//! whose URI SAN names a tenant, and a CRL revoking issued certificates.
//! Keys are ECDSA P-256, written 0600 and never overwritten; certificates
//! get serials of 128 random bits and lifetimes that follow common practice
//! (CA 10 years, server 397 days, client 90 days, CRL 30 days).
//!
//! The CA directory holds `ca.pem`, `ca.key`, `revoked.txt` (one revoked
//! serial per line, with its revocation time) and `crl.pem`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Usage(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new file with `mode`; never replaces an existing one.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io_err(path)(e)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Replaces a file atomically (write a temporary beside it, rename).
fn replace(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Usage(format!("no randomness: {e}")))?;
    // Positive and without a leading zero octet: 127 bits of randomness.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A little slack for hosts whose clocks are slightly behind the CA's.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
}

struct Ca {
    dir: PathBuf,
}

impl Ca {
    fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    fn revoked_path(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }
    fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn open(dir: &Path) -> Result<(Self, KeyPair, String), PkiError> {
        let ca = Self {
            dir: dir.to_owned(),
        };
        let key_pem = read(&ca.key_path())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: ca.key_path(),
            reason: e.to_string(),
        })?;
        let cert_pem = read(&ca.cert_path())?;
        Ok((ca, key, cert_pem))
    }
}

/// `airgate pki init`: a new CA, an empty CRL.
pub fn init(dir: &Path, name: &str, days: i64) -> Result<Vec<PathBuf>, PkiError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca = Ca {
        dir: dir.to_owned(),
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write_new(&ca.key_path(), &key.serialize_pem(), 0o600)?;
    write_new(&ca.cert_path(), &cert.pem(), 0o644)?;
    write_new(&ca.revoked_path(), "", 0o644)?;
    write_crl(&ca, &key, &cert.pem(), 30)?;
    Ok(vec![ca.cert_path(), ca.key_path(), ca.crl_path()])
}

/// Writes `PREFIX.pem` and `PREFIX.key` for a leaf signed by the CA.
fn issue(
    dir: &Path,
    out: &Path,
    mut params: CertificateParams,
    days: i64,
) -> Result<Vec<PathBuf>, PkiError> {
    let (_, ca_key, ca_pem) = Ca::open(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = out.with_extension("pem");
    let key_path = out.with_extension("key");
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

/// `airgate pki server`: a server certificate for the host's names and addresses.
pub fn server(
    dir: &Path,
    out: &Path,
    dns: &[String],
    ips: &[IpAddr],
    days: i64,
) -> Result<Vec<PathBuf>, PkiError> {
    if dns.is_empty() && ips.is_empty() {
        return Err(PkiError::Usage(
            "a server certificate needs at least one --dns name or --ip address".to_owned(),
        ));
    }
    let mut params = CertificateParams::new(dns.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name = DistinguishedName::new();
    let cn = dns.first().cloned().unwrap_or_else(|| ips[0].to_string());
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(dir, out, params, days)
}

/// `airgate pki client`: a client certificate whose URI SAN is the tenant identity.
pub fn client(dir: &Path, out: &Path, uri: &str, days: i64) -> Result<Vec<PathBuf>, PkiError> {
    let valid_uri = uri
        .split_once("://")
        .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
    if !valid_uri {
        return Err(PkiError::Usage(format!(
            "--uri must be a URI such as spiffe://corp.example/tenant/claims, not {uri:?}"
        )));
    }
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, uri);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, out, params, days)
}

/// `airgate pki revoke`: adds the certificate's serial to the CRL.
pub fn revoke(dir: &Path, cert: &Path, crl_days: i64) -> Result<String, PkiError> {
    let (ca, key, ca_pem) = Ca::open(dir)?;
    let pem = read(cert)?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .map_err(|e| PkiError::Invalid {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Invalid {
        path: cert.to_owned(),
        reason: e.to_string(),
    })?;
    let serial: String = parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let revoked = read(&ca.revoked_path())?;
    if !revoked
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&serial))
    {
        let mut updated = revoked;
        let _ = writeln!(
            updated,
            "{serial} {}",
            OffsetDateTime::now_utc().unix_timestamp()
        );
        replace(&ca.revoked_path(), &updated, 0o644)?;
    }
    write_crl(&ca, &key, &ca_pem, crl_days)?;
    Ok(serial)
}

/// `airgate pki crl`: re-issues the CRL (to move its nextUpdate forward).
pub fn crl(dir: &Path, days: i64) -> Result<PathBuf, PkiError> {
    let (ca, key, ca_pem) = Ca::open(dir)?;
    write_crl(&ca, &key, &ca_pem, days)?;
    Ok(ca.crl_path())
}

fn write_crl(ca: &Ca, key: &KeyPair, ca_pem: &str, days: i64) -> Result<(), PkiError> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, key)?;
    let revoked_text = read(&ca.revoked_path())?;
    let mut revoked_certs = Vec::new();
    for (i, line) in revoked_text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let (Some(serial), Some(at)) = (fields.next(), fields.next()) else {
            continue;
        };
        let bad = || PkiError::Invalid {
            path: ca.revoked_path(),
            reason: format!("line {}: expected \"SERIAL-HEX UNIX-TIME\"", i + 1),
        };
        let serial = crate::keys::unhex(serial).ok_or_else(bad)?;
        let at: i64 = at.parse().map_err(|_| bad())?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: OffsetDateTime::from_unix_timestamp(at).map_err(|_| bad())?,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(days),
        // Monotonic across re-issues without keeping a counter file.
        crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(0)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    replace(&ca.crl_path(), &crl.pem()?, 0o644)
}
