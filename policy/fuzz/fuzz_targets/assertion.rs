//! Signed user assertions (the `airgate-user-assertion` header) on arbitrary
//! input, against a fixed tenant and key set. The first byte picks a mode:
//!
//! - raw: the rest is the header's text. It carries no signature by the
//!   tenant's key unless it was made with that key, so whatever is accepted
//!   must verify strictly with it and obey every rule when its header and
//!   claims are read back here (the same check as signed raw).
//! - signed: the target builds the claims from the rest (subject, audience,
//!   expiry) under one of a table of headers and signs them with the
//!   tenant's key itself, so the header and claims checks behind the
//!   signature are reached. The answer must be exactly what the rules say
//!   (size, header allow-list, key id, signature, audience, expiry with
//!   leeway, subject length); an accepted assertion stays accepted earlier
//!   and with surrounding whitespace, is refused for another tenant, and
//!   changing any one character of it gets it refused.
//! - signed raw: header and claims are bytes from the input, signed by the
//!   target: whatever is accepted obeys every rule when read back.
#![no_main]

use std::collections::BTreeMap;

use airgate_policy::assertion::{
    AssertionError, MAX_ASSERTION_BYTES, MAX_SUBJECT_BYTES, verify_user_assertion,
};
use airgate_policy::bundle::verify::LEEWAY_SECONDS;
use airgate_policy::time::UnixTime;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const NOW: UnixTime = UnixTime(1_795_000_000);
const TENANT: &str = "claims";
/// The tenant's front end signs with this key, listed as "front-end".
const SEED: [u8; 32] = [9; 32];
/// A key the tenant also lists ("other"), whose private half nobody here has.
const OTHER_SEED: [u8; 32] = [8; 32];

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn keys() -> BTreeMap<String, String> {
    let public = |seed: &[u8; 32]| b64(SigningKey::from_bytes(seed).verifying_key().as_bytes());
    BTreeMap::from([
        ("front-end".to_owned(), public(&SEED)),
        ("other".to_owned(), public(&OTHER_SEED)),
        // Not 32 bytes: a key id that resolves to no usable key.
        ("short".to_owned(), "AAAA".to_owned()),
    ])
}

/// `header.claims.signature`, signed with [`SEED`].
fn sign(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = SigningKey::from_bytes(&SEED).sign(input.as_bytes());
    format!("{input}.{}", b64(&signature.to_bytes()))
}

/// What the header table's entries must get, before the claims are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderVerdict {
    Good,
    BadHeader,
    UnknownKeyId,
    BadSignature,
}

fn header(choice: u8) -> (Value, HeaderVerdict) {
    use HeaderVerdict::*;
    match choice % 9 {
        0 => (json!({"alg": "EdDSA", "kid": "front-end"}), Good),
        1 => (
            json!({"alg": "EdDSA", "kid": "front-end", "typ": "JWT"}),
            Good,
        ),
        // Signed with the front end's key, named as the other's.
        2 => (json!({"alg": "EdDSA", "kid": "other"}), BadSignature),
        3 => (json!({"alg": "none", "kid": "front-end"}), BadHeader),
        4 => (json!({"alg": "HS256", "kid": "front-end"}), BadHeader),
        5 => (
            json!({"alg": "EdDSA", "kid": "front-end", "jwk": {}}),
            BadHeader,
        ),
        6 => (json!({"alg": "EdDSA"}), BadHeader),
        7 => (json!({"alg": "EdDSA", "kid": "short"}), UnknownKeyId),
        _ => (json!({"alg": "EdDSA", "kid": "nobody"}), UnknownKeyId),
    }
}

fn same_kind(a: &Result<String, AssertionError>, b: &Result<String, AssertionError>) -> bool {
    use AssertionError::*;
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => matches!(
            (x, y),
            (TooLarge, TooLarge)
                | (Malformed, Malformed)
                | (BadHeader(_), BadHeader(_))
                | (UnknownKeyId(_), UnknownKeyId(_))
                | (BadSignature, BadSignature)
                | (BadClaims(_), BadClaims(_))
                | (WrongAudience { .. }, WrongAudience { .. })
                | (Expired { .. }, Expired { .. })
        ),
        _ => false,
    }
}

/// Claims built from the input, so the rules can be applied to them here.
fn signed(keys: &BTreeMap<String, String>, data: &[u8]) {
    let [h, a, e0, e1, p0, p1, c, rest @ ..] = data else {
        return;
    };
    let (header, verdict) = header(*h);
    let audience = ["claims", "search", "", "claims ", "Claims"][usize::from(*a) % 5];
    // Around NOW, either side of the leeway.
    let exp = NOW.seconds() + i64::from(i16::from_le_bytes([*e0, *e1])) / 64;
    let subject = String::from_utf8_lossy(rest).into_owned();
    let claims = json!({"sub": subject, "aud": audience, "exp": exp});
    let token = sign(header.to_string().as_bytes(), claims.to_string().as_bytes());

    let expected = if token.len() > MAX_ASSERTION_BYTES {
        Err(AssertionError::TooLarge)
    } else {
        match verdict {
            HeaderVerdict::BadHeader => Err(AssertionError::BadHeader(String::new())),
            HeaderVerdict::UnknownKeyId => Err(AssertionError::UnknownKeyId(String::new())),
            HeaderVerdict::BadSignature => Err(AssertionError::BadSignature),
            HeaderVerdict::Good if audience != TENANT => Err(AssertionError::WrongAudience {
                found: audience.to_owned(),
            }),
            HeaderVerdict::Good if NOW.seconds() >= exp + LEEWAY_SECONDS => {
                Err(AssertionError::Expired { exp })
            }
            HeaderVerdict::Good if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES => {
                Err(AssertionError::BadClaims(String::new()))
            }
            HeaderVerdict::Good => Ok(subject.clone()),
        }
    };
    let got = verify_user_assertion(&token, keys, TENANT, NOW);
    assert!(
        same_kind(&got, &expected),
        "{token}: got {got:?}, the rules say {expected:?}"
    );
    if let Err(AssertionError::WrongAudience { found }) = &got {
        assert_eq!(found, audience);
    }
    if let Err(AssertionError::Expired { exp: at }) = &got {
        assert_eq!(*at, exp);
    }
    if got.is_err() {
        return;
    }
    // Expiry is the only time check: earlier is as good; another tenant never.
    assert!(verify_user_assertion(&token, keys, TENANT, NOW.plus(-3600)).is_ok());
    assert!(matches!(
        verify_user_assertion(&token, keys, "search", NOW),
        Err(AssertionError::WrongAudience { .. })
    ));
    obeys_rules(&token, &subject);
    // Surrounding whitespace is trimmed; any other change is refused.
    if token.len() + 2 <= MAX_ASSERTION_BYTES {
        assert!(verify_user_assertion(&format!(" {token}\t"), keys, TENANT, NOW).is_ok());
    }
    let at = usize::from(u16::from_le_bytes([*p0, *p1])) % token.len();
    let mut changed = token.as_bytes().to_vec();
    let mut replacement = b' ' + *c % 95;
    if replacement == changed[at] {
        replacement = if replacement == b'~' {
            b' '
        } else {
            replacement + 1
        };
    }
    changed[at] = replacement;
    let changed = String::from_utf8(changed).expect("ASCII");
    let again = verify_user_assertion(&changed, keys, TENANT, NOW);
    assert!(
        again.is_err(),
        "{changed:?} (byte {at} of an accepted assertion changed) was accepted as {again:?}"
    );
}

/// Header and claims as given, signed: what is accepted obeys every rule.
fn signed_raw(keys: &BTreeMap<String, String>, data: &[u8]) {
    let [n, rest @ ..] = data else {
        return;
    };
    let (header, claims) = rest.split_at(usize::from(*n).min(rest.len()));
    let token = sign(header, claims);
    if let Ok(subject) = verify_user_assertion(&token, keys, TENANT, NOW) {
        obeys_rules(&token, &subject);
    }
}

/// An accepted token, read back without the verifier: its size, its header
/// (only alg, kid and typ; EdDSA; the key id of the only key whose private
/// half signs here), its claims (the tenant's audience, not expired, the
/// subject returned and of an accepted length), and its signature by that
/// key under ed25519-dalek's strict rules (no small-order or non-canonical
/// points).
fn obeys_rules(token: &str, subject: &str) {
    assert!(token.len() <= MAX_ASSERTION_BYTES, "{token:?}");
    let token = token.trim();
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        panic!("{token:?}: an accepted assertion has three parts");
    };
    let json = |part: &str| -> Value {
        URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| panic!("{token:?}: an accepted part is base64url JSON"))
    };
    let header = json(header);
    let header = header.as_object().expect("an accepted header is an object");
    assert!(
        header
            .keys()
            .all(|k| matches!(k.as_str(), "alg" | "kid" | "typ")),
        "{header:?}"
    );
    assert_eq!(header.get("alg").and_then(Value::as_str), Some("EdDSA"));
    assert_eq!(header.get("kid").and_then(Value::as_str), Some("front-end"));
    let claims = json(claims);
    assert_eq!(claims.get("aud").and_then(Value::as_str), Some(TENANT));
    assert_eq!(claims.get("sub").and_then(Value::as_str), Some(subject));
    assert!(!subject.is_empty() && subject.len() <= MAX_SUBJECT_BYTES);
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .expect("an accepted exp is an integer");
    assert!(NOW.seconds() < exp.saturating_add(LEEWAY_SECONDS));
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
        .expect("an accepted signature decodes");
    let (input, _) = token.rsplit_once('.').expect("three parts");
    SigningKey::from_bytes(&SEED)
        .verifying_key()
        .verify_strict(input.as_bytes(), &signature)
        .expect("an accepted signature verifies strictly");
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else {
                return;
            };
            match verify_user_assertion(token, &keys, TENANT, NOW) {
                Ok(subject) => obeys_rules(token, &subject),
                Err(e) if token.len() > MAX_ASSERTION_BYTES => {
                    assert_eq!(e, AssertionError::TooLarge);
                }
                Err(_) => {}
            }
        }
        1 => signed(&keys, rest),
        _ => signed_raw(&keys, rest),
    }
});
