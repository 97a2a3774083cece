//! Verifying a bundle JWS against local trust anchors.
//!
//! The order matters: size limits before any parsing; the protected header
//! is checked against an allow-list (no `jwk`, `jku`, `x5u`, `x5c`, `crit`
//! or anything else we do not understand) and the key id must name a trust
//! anchor whose pinned algorithm matches; only then is the signature checked
//! (by jsonwebtoken, with its own clock-based checks turned off); only a
//! verified payload is parsed; time is checked against the injected clock.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

use super::{Bundle, ContentError, WireBundle};
use crate::time::UnixTime;

/// A bundle larger than this is refused before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 1 << 20;
/// A protected header larger than this is refused before it is parsed.
pub const MAX_HEADER_BYTES: usize = 2048;
/// Tolerance for clock differences between the authority and the host.
pub const LEEWAY_SECONDS: i64 = 60;

/// The signature algorithms a trust anchor may be pinned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlgorithm {
    EdDsa,
    Es256,
}

impl SigningAlgorithm {
    pub fn jose(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Es256 => "ES256",
        }
    }

    pub(crate) fn library(self) -> Algorithm {
        match self {
            Self::EdDsa => Algorithm::EdDSA,
            Self::Es256 => Algorithm::ES256,
        }
    }
}

/// A public key the policy authority signs with, pinned to one algorithm.
#[derive(Clone)]
pub struct TrustAnchor {
    pub key_id: String,
    pub algorithm: SigningAlgorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchor")
            .field("key_id", &self.key_id)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("an Ed25519 public key is 32 bytes, not {0}")]
    Ed25519Length(usize),
    #[error("a P-256 public key is a 65-byte uncompressed SEC1 point starting with 0x04")]
    P256Encoding,
}

impl TrustAnchor {
    /// An Ed25519 key from its 32 raw public-key bytes.
    pub fn ed25519(key_id: &str, public_key: &[u8]) -> Result<Self, KeyError> {
        if public_key.len() != 32 {
            return Err(KeyError::Ed25519Length(public_key.len()));
        }
        Ok(Self {
            key_id: key_id.to_owned(),
            algorithm: SigningAlgorithm::EdDsa,
            key: DecodingKey::from_ed_der(public_key),
        })
    }

    /// A P-256 key (for ES256) from its uncompressed SEC1 point.
    pub fn p256(key_id: &str, sec1_point: &[u8]) -> Result<Self, KeyError> {
        if sec1_point.len() != 65 || sec1_point[0] != 0x04 {
            return Err(KeyError::P256Encoding);
        }
        Ok(Self {
            key_id: key_id.to_owned(),
            algorithm: SigningAlgorithm::Es256,
            key: DecodingKey::from_ec_der(sec1_point),
        })
    }
}

/// The trust anchors of this host, by key id.
#[derive(Clone, Debug, Default)]
pub struct TrustAnchors {
    by_id: BTreeMap<String, TrustAnchor>,
}

impl TrustAnchors {
    pub fn new(anchors: impl IntoIterator<Item = TrustAnchor>) -> Self {
        Self {
            by_id: anchors.into_iter().map(|a| (a.key_id.clone(), a)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Why a bundle is refused. Every variant is a fact an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a compact JWS (three base64url parts separated by dots)")]
    Malformed,
    #[error("protected header: {0}")]
    BadHeader(String),
    #[error("algorithm {0:?} is not accepted (EdDSA or ES256 only)")]
    AlgorithmNotAllowed(String),
    #[error("header field {0:?} is refused (embedded or remote keys, critical extensions)")]
    ForbiddenHeader(String),
    #[error("key id {0:?} is not a trust anchor of this host")]
    UnknownKeyId(String),
    #[error("key {key_id:?} is trusted for {pinned}, but the bundle is signed with {used}")]
    AlgorithmMismatch {
        key_id: String,
        pinned: &'static str,
        used: String,
    },
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    #[error("claims: {0}")]
    BadClaims(String),
    #[error("bundle is for audience {found:?}, this host is {expected:?}")]
    WrongAudience { found: String, expected: String },
    #[error(
        "bundle issued at {iat} is not valid before {nbf}, or expires ({exp}) before it is valid"
    )]
    InconsistentTimes { iat: i64, nbf: i64, exp: i64 },
    #[error("bundle is not valid before {nbf} (now {now})")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("bundle expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error(transparent)]
    Content(#[from] ContentError),
}

/// A bundle whose signature, claims and content all checked out.
#[derive(Clone, Debug)]
pub struct Verified {
    pub bundle: Bundle,
    /// SHA-256 of the compact JWS as received: the bundle's identity in audits and archives.
    pub digest: String,
    pub key_id: String,
    /// The compact JWS, whitespace trimmed: what is persisted and archived.
    pub token: String,
}

const ALLOWED_HEADER_FIELDS: [&str; 3] = ["alg", "kid", "typ"];

/// Verifies `token` for this host (`audience`) at time `now`: signature,
/// claims, content, and that it is valid now.
pub fn verify(
    token: &[u8],
    anchors: &TrustAnchors,
    audience: &str,
    now: UnixTime,
) -> Result<Verified, BundleError> {
    let verified = verify_signed(token, anchors, audience)?;
    verified.check_time(now)?;
    Ok(verified)
}

impl Verified {
    /// Whether the bundle is valid at `now` (not before `nbf`, before `exp`).
    pub fn check_time(&self, now: UnixTime) -> Result<(), BundleError> {
        let (nbf, exp) = (
            self.bundle.not_before.seconds(),
            self.bundle.expires.seconds(),
        );
        if now.seconds() < nbf.saturating_sub(LEEWAY_SECONDS) {
            return Err(BundleError::NotYetValid {
                nbf,
                now: now.seconds(),
            });
        }
        if now.seconds() >= exp {
            return Err(BundleError::Expired {
                exp,
                now: now.seconds(),
            });
        }
        Ok(())
    }
}

/// Everything [`verify`] checks except the clock: for a bundle persisted
/// earlier, whose expiry the caller weighs against a grace period.
pub fn verify_signed(
    token: &[u8],
    anchors: &TrustAnchors,
    audience: &str,
) -> Result<Verified, BundleError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(BundleError::TooLarge {
            size: token.len(),
            limit: MAX_TOKEN_BYTES,
        });
    }
    let token = token.trim_ascii();
    let parts: Vec<&[u8]> = token.split(|b| *b == b'.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return Err(BundleError::Malformed);
    };
    let b64 = |p: &[u8]| {
        !p.is_empty()
            && p.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if !b64(header) || !b64(payload) || !b64(signature) {
        return Err(BundleError::Malformed);
    }
    if header.len() > MAX_HEADER_BYTES {
        return Err(BundleError::BadHeader(format!(
            "larger than {MAX_HEADER_BYTES} bytes"
        )));
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| BundleError::BadHeader(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header_json).map_err(|e| BundleError::BadHeader(e.to_string()))?;
    if let Some(field) = header
        .keys()
        .find(|k| !ALLOWED_HEADER_FIELDS.contains(&k.as_str()))
    {
        return Err(BundleError::ForbiddenHeader(field.clone()));
    }
    let alg = header
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or_else(|| BundleError::BadHeader("no alg".to_owned()))?;
    let used = match alg {
        "EdDSA" => SigningAlgorithm::EdDsa,
        "ES256" => SigningAlgorithm::Es256,
        other => return Err(BundleError::AlgorithmNotAllowed(other.to_owned())),
    };
    if let Some(typ) = header.get("typ")
        && typ.as_str() != Some("JWT")
    {
        return Err(BundleError::BadHeader(format!("typ {typ} is not \"JWT\"")));
    }
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .ok_or_else(|| BundleError::BadHeader("no kid".to_owned()))?;
    let anchor = anchors
        .by_id
        .get(kid)
        .ok_or_else(|| BundleError::UnknownKeyId(kid.to_owned()))?;
    if anchor.algorithm != used {
        return Err(BundleError::AlgorithmMismatch {
            key_id: kid.to_owned(),
            pinned: anchor.algorithm.jose(),
            used: alg.to_owned(),
        });
    }

    // Signature only: time, audience and required claims are checked below,
    // by us, against the injected clock.
    let mut validation = Validation::new(anchor.algorithm.library());
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    let verified = jsonwebtoken::decode::<serde_json::Value>(token, &anchor.key, &validation)
        .map_err(|e| BundleError::BadSignature(e.to_string()))?;
    let _ = verified;

    // Parse the payload once, strictly, from the bytes that were signed.
    let claims_json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| BundleError::BadClaims(e.to_string()))?;
    let wire: WireBundle =
        serde_json::from_slice(&claims_json).map_err(|e| BundleError::BadClaims(e.to_string()))?;
    if wire.aud != audience {
        return Err(BundleError::WrongAudience {
            found: wire.aud,
            expected: audience.to_owned(),
        });
    }
    if wire.nbf < wire.iat.saturating_sub(LEEWAY_SECONDS) || wire.exp <= wire.nbf {
        return Err(BundleError::InconsistentTimes {
            iat: wire.iat,
            nbf: wire.nbf,
            exp: wire.exp,
        });
    }
    let bundle = wire.validate()?;
    Ok(Verified {
        bundle,
        digest: hex(&Sha256::digest(token)),
        key_id: kid.to_owned(),
        // Checked above to be base64url parts and dots, so ASCII.
        token: String::from_utf8_lossy(token).into_owned(),
    })
}

/// The key id and claims of a token, parsed strictly but NOT verified: for
/// `airgate bundle inspect` and `diff` on a machine without the trust anchors.
pub fn decode_unverified(token: &[u8]) -> Result<(String, WireBundle), BundleError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(BundleError::TooLarge {
            size: token.len(),
            limit: MAX_TOKEN_BYTES,
        });
    }
    let token = token.trim_ascii();
    let parts: Vec<&[u8]> = token.split(|b| *b == b'.').collect();
    let [header, payload, _] = parts.as_slice() else {
        return Err(BundleError::Malformed);
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| BundleError::BadHeader("not base64url JSON".to_owned()))?;
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_owned();
    let claims = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| BundleError::BadClaims(e.to_string()))?;
    let wire =
        serde_json::from_slice(&claims).map_err(|e| BundleError::BadClaims(e.to_string()))?;
    Ok((kid, wire))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
