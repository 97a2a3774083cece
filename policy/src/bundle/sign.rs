//! Producing bundles, for the policy authority: the JWS signing input, a
//! signature made elsewhere (an offline machine, a hardware token) attached
//! to it, or both in one step with a key in memory.
//!
//! No I/O here either: the CLI reads and writes the files.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::EncodingKey;

use super::WireBundle;
use super::verify::SigningAlgorithm;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("claims do not serialise: {0}")]
    Claims(String),
    #[error("signing input is not header.payload in base64url")]
    BadSigningInput,
    #[error("an {alg} signature is 64 bytes, not {len}")]
    SignatureLength { alg: &'static str, len: usize },
    #[error("ECDSA signature is neither 64 raw bytes nor DER")]
    BadEcdsaSignature,
    #[error("signing failed (is the key {alg} in PKCS#8?): {reason}")]
    Key { alg: &'static str, reason: String },
}

/// `base64url(header) . base64url(claims)`: the exact bytes to be signed.
pub fn signing_input(
    claims: &WireBundle,
    key_id: &str,
    alg: SigningAlgorithm,
) -> Result<String, SignError> {
    let header = serde_json::json!({ "alg": alg.jose(), "kid": key_id, "typ": "JWT" });
    let header = serde_json::to_vec(&header).map_err(|e| SignError::Claims(e.to_string()))?;
    let claims = serde_json::to_vec(claims).map_err(|e| SignError::Claims(e.to_string()))?;
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    ))
}

/// The algorithm a signing input's header names.
pub fn input_algorithm(signing_input: &str) -> Result<SigningAlgorithm, SignError> {
    let (header, payload) = signing_input
        .trim()
        .split_once('.')
        .ok_or(SignError::BadSigningInput)?;
    if payload.is_empty() || payload.contains('.') {
        return Err(SignError::BadSigningInput);
    }
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or(SignError::BadSigningInput)?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("EdDSA") => Ok(SigningAlgorithm::EdDsa),
        Some("ES256") => Ok(SigningAlgorithm::Es256),
        _ => Err(SignError::BadSigningInput),
    }
}

/// Joins a signing input and a raw signature into a compact JWS. An ES256
/// signature may be given as DER (what `openssl pkeyutl` writes); it is
/// converted to the fixed-width `r || s` JWS wants.
pub fn attach(signing_input: &str, signature: &[u8]) -> Result<String, SignError> {
    let alg = input_algorithm(signing_input)?;
    let raw = match alg {
        SigningAlgorithm::EdDsa if signature.len() == 64 => signature.to_vec(),
        SigningAlgorithm::EdDsa => {
            return Err(SignError::SignatureLength {
                alg: "EdDSA",
                len: signature.len(),
            });
        }
        SigningAlgorithm::Es256 if signature.len() == 64 => signature.to_vec(),
        SigningAlgorithm::Es256 => ecdsa_der_to_raw(signature)?,
    };
    Ok(format!(
        "{}.{}",
        signing_input.trim(),
        URL_SAFE_NO_PAD.encode(raw)
    ))
}

/// Signs claims with a PKCS#8 private key (DER) in one step.
pub fn sign(
    claims: &WireBundle,
    key_id: &str,
    alg: SigningAlgorithm,
    pkcs8_der: &[u8],
) -> Result<String, SignError> {
    let input = signing_input(claims, key_id, alg)?;
    let key = match alg {
        SigningAlgorithm::EdDsa => EncodingKey::from_ed_der(pkcs8_der),
        SigningAlgorithm::Es256 => EncodingKey::from_ec_der(pkcs8_der),
    };
    let signature =
        jsonwebtoken::crypto::sign(input.as_bytes(), &key, alg.library()).map_err(|e| {
            SignError::Key {
                alg: alg.jose(),
                reason: e.to_string(),
            }
        })?;
    Ok(format!("{input}.{signature}"))
}

/// `SEQUENCE { INTEGER r, INTEGER s }` -> 32-byte big-endian r and s.
fn ecdsa_der_to_raw(der: &[u8]) -> Result<Vec<u8>, SignError> {
    let bad = || SignError::BadEcdsaSignature;
    let (&tag, rest) = der.split_first().ok_or_else(bad)?;
    let (&len, mut rest) = rest.split_first().ok_or_else(bad)?;
    if tag != 0x30 || usize::from(len) != rest.len() || len >= 0x80 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        let (&tag, r) = rest.split_first().ok_or_else(bad)?;
        let (&len, r) = r.split_first().ok_or_else(bad)?;
        let len = usize::from(len);
        if tag != 0x02 || len == 0 || len > r.len() {
            return Err(bad());
        }
        let (int, r) = r.split_at(len);
        let int = match int {
            [0, tail @ ..] => tail,
            _ => int,
        };
        if int.len() > 32 {
            return Err(bad());
        }
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        rest = r;
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(out)
}
