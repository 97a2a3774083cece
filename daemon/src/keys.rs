//! Bundle signing keys on disk: PEM files in the formats `openssl` reads
//! and writes (SPKI public keys, PKCS#8 private keys), so an authority can
//! use its own tools for the offline half.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use airgate_policy::bundle::verify::{SigningAlgorithm, TrustAnchor};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::KeyPair as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use x509_parser::prelude::FromDer as _;

const OID_ED25519: &str = "1.3.101.112";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

fn format_err(path: &Path, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Format {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// A public key: its algorithm and the raw bytes policy verifies with
/// (32 bytes for Ed25519, the uncompressed SEC1 point for P-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub algorithm: SigningAlgorithm,
    pub raw: Vec<u8>,
}

impl PublicKey {
    pub fn anchor(&self, key_id: &str) -> TrustAnchor {
        let anchor = match self.algorithm {
            SigningAlgorithm::EdDsa => TrustAnchor::ed25519(key_id, &self.raw),
            SigningAlgorithm::Es256 => TrustAnchor::p256(key_id, &self.raw),
        };
        // Lengths were checked when the key was parsed.
        anchor.unwrap_or_else(|e| unreachable!("checked public key: {e}"))
    }

    /// SHA-256 of the raw key, for status and logs.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        hex(&sha2::Sha256::digest(&self.raw))
    }
}

/// Reads a `-----BEGIN PUBLIC KEY-----` file (Ed25519 or P-256).
pub fn read_public_key(path: &Path) -> Result<PublicKey, KeyFileError> {
    let pem = std::fs::read(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let der = SubjectPublicKeyInfoDer::from_pem_slice(&pem)
        .map_err(|e| format_err(path, format!("not a PEM PUBLIC KEY: {e}")))?;
    parse_spki(der.as_ref()).map_err(|reason| format_err(path, reason))
}

fn parse_spki(der: &[u8]) -> Result<PublicKey, String> {
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
        .map_err(|e| format!("not a SubjectPublicKeyInfo: {e}"))?;
    let raw = spki.subject_public_key.data.to_vec();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        OID_ED25519 if raw.len() == 32 => Ok(PublicKey {
            algorithm: SigningAlgorithm::EdDsa,
            raw,
        }),
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            if curve.as_deref() != Some(OID_P256) {
                return Err("EC keys must be on P-256 (ES256)".to_owned());
            }
            if raw.len() != 65 || raw[0] != 4 {
                return Err("P-256 key is not an uncompressed point".to_owned());
            }
            Ok(PublicKey {
                algorithm: SigningAlgorithm::Es256,
                raw,
            })
        }
        other => Err(format!(
            "key algorithm {other} is not accepted (Ed25519 or P-256 only)"
        )),
    }
}

/// A private key for `bundle sign`: its PKCS#8 DER and algorithm.
pub struct PrivateKey {
    pub algorithm: SigningAlgorithm,
    pub pkcs8: Vec<u8>,
}

/// Reads a `-----BEGIN PRIVATE KEY-----` (PKCS#8) file, Ed25519 or P-256.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let pem = std::fs::read(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
        .map_err(|e| format_err(path, format!("not a PEM PKCS#8 PRIVATE KEY: {e}")))?;
    let der = der.secret_pkcs8_der().to_vec();
    // The algorithm identifier sits near the start of the PKCS#8 structure.
    let head = &der[..der.len().min(32)];
    let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
    let algorithm = if has(&[0x06, 0x03, 0x2b, 0x65, 0x70]) {
        SigningAlgorithm::EdDsa
    } else if has(&[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]) {
        SigningAlgorithm::Es256
    } else {
        return Err(format_err(path, "not an Ed25519 or P-256 private key"));
    };
    Ok(PrivateKey {
        algorithm,
        pkcs8: der,
    })
}

/// `airgate keygen`: a new Ed25519 pair as `DIR/NAME.key` (PKCS#8, 0600,
/// never overwritten) and `DIR/NAME.pub` (SPKI).
pub fn generate(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| format_err(dir, "the system random source failed"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| format_err(dir, "generated key does not parse"))?;
    // ring writes PKCS#8 v2 (seed and public key); OpenSSL 3.0 reads only
    // v1 (RFC 8410), so the seed is re-wrapped in the v1 form both accept.
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let v2 = pkcs8.as_ref();
    if v2.len() < 48 || v2[..16] != V2_PREFIX {
        return Err(format_err(
            dir,
            "unexpected PKCS#8 layout from the key generator",
        ));
    }
    let mut v1 = V1_PREFIX.to_vec();
    v1.extend_from_slice(&v2[16..48]);
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());

    let key_path = dir.join(format!("{name}.key"));
    let pub_path = dir.join(format!("{name}.pub"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    file.write_all(pem("PRIVATE KEY", &v1).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&key_path))?;
    std::fs::write(&pub_path, pem("PUBLIC KEY", &spki)).map_err(io(&pub_path))?;
    Ok((key_path, pub_path))
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (either case); `None` if it is empty, of odd
/// length or not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// [`unhex`] of exactly 32 bytes (a SHA-256, an HMAC).
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_bad_hex_is_none() {
        assert_eq!(unhex("0aFF"), Some(vec![10, 255]));
        assert_eq!(unhex(&hex(&[1, 2, 254])), Some(vec![1, 2, 254]));
        for bad in ["", "abc", "zz", "é1"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
        assert_eq!(unhex32(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(unhex32(&"ab".repeat(31)), None);
    }

    #[test]
    fn generated_keys_read_back_and_sign_verifiably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, public) = generate(dir.path(), "authority").expect("generate");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let private = read_private_key(&key).expect("private");
        assert_eq!(private.algorithm, SigningAlgorithm::EdDsa);
        let public = read_public_key(&public).expect("public");
        assert_eq!(public.raw.len(), 32);
        assert_eq!(public.fingerprint().len(), 64);
        // Never overwrite a private key.
        assert!(generate(dir.path(), "authority").is_err());
        // A private key is not a public key, and junk is neither.
        assert!(read_public_key(&key).is_err());
        std::fs::write(dir.path().join("junk.pub"), "junk").expect("write");
        assert!(read_public_key(&dir.path().join("junk.pub")).is_err());
    }
}
