//! Signed user assertions: how a tenant's front end names its end user when
//! the tenant's rule says the user must be vouched for, not just claimed.
//!
//! An assertion is a compact JWS, EdDSA only, signed by one of the keys the
//! tenant's bundle entry carries (by key id), with claims `sub` (the end
//! user), `aud` (the tenant id) and `exp`. The same header allow-list as
//! bundles applies: no embedded or remote keys, no `crit`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::bundle::verify::LEEWAY_SECONDS;
use crate::time::UnixTime;

/// An assertion larger than this is refused before it is parsed.
pub const MAX_ASSERTION_BYTES: usize = 4096;
/// Longest `sub` accepted.
pub const MAX_SUBJECT_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("user assertion is larger than {MAX_ASSERTION_BYTES} bytes")]
    TooLarge,
    #[error("user assertion is not a compact JWS")]
    Malformed,
    #[error("user assertion header: {0}")]
    BadHeader(String),
    #[error("user assertion key id {0:?} is not one of the tenant's")]
    UnknownKeyId(String),
    #[error("user assertion signature does not verify")]
    BadSignature,
    #[error("user assertion claims: {0}")]
    BadClaims(String),
    #[error("user assertion is for {found:?}, not this tenant")]
    WrongAudience { found: String },
    #[error("user assertion expired at {exp}")]
    Expired { exp: i64 },
}

/// The 32 raw bytes of a key as the bundle writes it (base64url, no padding).
pub fn decode_key(key: &str) -> Option<[u8; 32]> {
    URL_SAFE_NO_PAD.decode(key).ok()?.try_into().ok()
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: i64,
}

/// Verifies `token` for `tenant` at `now`; returns the end user it names.
pub fn verify_user_assertion(
    token: &str,
    keys: &BTreeMap<String, String>,
    tenant: &str,
    now: UnixTime,
) -> Result<String, AssertionError> {
    if token.len() > MAX_ASSERTION_BYTES {
        return Err(AssertionError::TooLarge);
    }
    let token = token.trim();
    let header_b64 = token.split('.').next().ok_or(AssertionError::Malformed)?;
    if token.split('.').count() != 3 {
        return Err(AssertionError::Malformed);
    }
    let header: serde_json::Map<String, serde_json::Value> = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| AssertionError::BadHeader("not base64url JSON".to_owned()))?;
    if let Some(field) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(AssertionError::BadHeader(format!(
            "field {field:?} is refused"
        )));
    }
    if header.get("alg").and_then(|a| a.as_str()) != Some("EdDSA") {
        return Err(AssertionError::BadHeader("alg must be EdDSA".to_owned()));
    }
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .ok_or_else(|| AssertionError::BadHeader("no kid".to_owned()))?;
    let key = keys
        .get(kid)
        .and_then(|k| decode_key(k))
        .ok_or_else(|| AssertionError::UnknownKeyId(kid.to_owned()))?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &DecodingKey::from_ed_der(&key),
        &validation,
    )
    .map_err(|_| AssertionError::BadSignature)?;
    let claims: Claims = serde_json::from_value(data.claims)
        .map_err(|e| AssertionError::BadClaims(e.to_string()))?;
    if claims.aud != tenant {
        return Err(AssertionError::WrongAudience { found: claims.aud });
    }
    if now.seconds() >= claims.exp.saturating_add(LEEWAY_SECONDS) {
        return Err(AssertionError::Expired { exp: claims.exp });
    }
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_BYTES {
        return Err(AssertionError::BadClaims(format!(
            "sub must be 1 to {MAX_SUBJECT_BYTES} bytes"
        )));
    }
    Ok(claims.sub)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;
    use serde_json::json;

    use super::*;

    const NOW: UnixTime = UnixTime(1_795_000_000);

    fn keys() -> BTreeMap<String, String> {
        let public = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        BTreeMap::from([(
            "front-end".to_owned(),
            URL_SAFE_NO_PAD.encode(public.as_bytes()),
        )])
    }

    fn token(header: serde_json::Value, claims: serde_json::Value, seed: u8) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn good_claims() -> serde_json::Value {
        json!({"sub": "alice@corp", "aud": "claims", "exp": NOW.seconds() + 300})
    }

    fn check(t: &str) -> Result<String, AssertionError> {
        verify_user_assertion(t, &keys(), "claims", NOW)
    }

    #[test]
    fn assertions_name_the_user_only_when_everything_holds() {
        let header = json!({"alg": "EdDSA", "kid": "front-end"});
        assert_eq!(
            check(&token(header.clone(), good_claims(), 9)).as_deref(),
            Ok("alice@corp")
        );
        type Expect = fn(&AssertionError) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            (token(header.clone(), good_claims(), 8), |e| {
                *e == AssertionError::BadSignature
            }),
            (
                token(json!({"alg": "EdDSA", "kid": "other"}), good_claims(), 9),
                |e| matches!(e, AssertionError::UnknownKeyId(_)),
            ),
            (
                token(json!({"alg": "none", "kid": "front-end"}), good_claims(), 9),
                |e| matches!(e, AssertionError::BadHeader(_)),
            ),
            (
                token(
                    json!({"alg": "EdDSA", "kid": "front-end", "jwk": {}}),
                    good_claims(),
                    9,
                ),
                |e| matches!(e, AssertionError::BadHeader(_)),
            ),
            (
                token(
                    header.clone(),
                    json!({"sub": "a", "aud": "search", "exp": NOW.seconds() + 300}),
                    9,
                ),
                |e| matches!(e, AssertionError::WrongAudience { .. }),
            ),
            (
                token(
                    header.clone(),
                    json!({"sub": "a", "aud": "claims", "exp": NOW.seconds() - 61}),
                    9,
                ),
                |e| matches!(e, AssertionError::Expired { .. }),
            ),
            (
                token(
                    header.clone(),
                    json!({"sub": "", "aud": "claims", "exp": NOW.seconds() + 300}),
                    9,
                ),
                |e| matches!(e, AssertionError::BadClaims(_)),
            ),
            (
                token(
                    header,
                    json!({"aud": "claims", "exp": NOW.seconds() + 300}),
                    9,
                ),
                |e| matches!(e, AssertionError::BadClaims(_)),
            ),
            ("a.b".to_owned(), |e| *e == AssertionError::Malformed),
            ("x".repeat(MAX_ASSERTION_BYTES + 1), |e| {
                *e == AssertionError::TooLarge
            }),
        ];
        for (i, (t, ok)) in cases.iter().enumerate() {
            let e = check(t).expect_err("refused");
            assert!(ok(&e), "case {i}: {e:?}");
        }
        assert!(decode_key("too-short").is_none());
    }
}
