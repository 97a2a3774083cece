//! Adversarial bundles: each is refused for the right reason.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::bundle::tests::sample;

const NOW: UnixTime = UnixTime(1_795_000_000);

fn ed_key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

fn p256_key(seed: u8) -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).expect("p256 key")
}

fn anchors() -> TrustAnchors {
    TrustAnchors::new([
        TrustAnchor::ed25519("authority-2026", ed_key(1).verifying_key().as_bytes())
            .expect("ed anchor"),
        TrustAnchor::p256(
            "authority-hsm",
            p256_key(3)
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes(),
        )
        .expect("p256 anchor"),
    ])
}

fn sign_ed(claims: &Value, kid: &str, seed: u8) -> String {
    let der = ed_key(seed).to_pkcs8_der().expect("pkcs8");
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(der.as_bytes())).expect("sign")
}

fn sign_es(claims: &Value, kid: &str, seed: u8) -> String {
    use p256::pkcs8::EncodePrivateKey as _;
    let der = p256_key(seed).to_pkcs8_der().expect("pkcs8");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(der.as_bytes())).expect("sign")
}

fn check(token: &str) -> Result<Verified, BundleError> {
    verify(token.as_bytes(), &anchors(), "site-7", NOW)
}

/// A token with an arbitrary header and signature bytes.
fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[test]
fn good_bundles_verify_with_both_algorithms() {
    let v = check(&sign_ed(&sample(), "authority-2026", 1)).expect("EdDSA bundle");
    assert_eq!(v.bundle.version, 7);
    assert_eq!(v.key_id, "authority-2026");
    assert_eq!(v.digest.len(), 64);
    check(&sign_es(&sample(), "authority-hsm", 3)).expect("ES256 bundle");
    // Surrounding whitespace (a file with a trailing newline) is fine.
    let token = format!("{}\n", sign_ed(&sample(), "authority-2026", 1));
    check(&token).expect("trailing newline");
}

fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut v = sample();
    f(&mut v);
    v
}

fn without(claim: &str) -> Value {
    with(|v| {
        v.as_object_mut().expect("object").remove(claim);
    })
}

#[test]
fn adversarial_bundles_are_refused_for_the_right_reason() {
    let good = sign_ed(&sample(), "authority-2026", 1);
    let (h, p, s) = {
        let parts: Vec<&str> = good.split('.').collect();
        (
            parts[0].to_owned(),
            parts[1].to_owned(),
            parts[2].to_owned(),
        )
    };
    let flip = |text: &str| {
        let mut bytes = URL_SAFE_NO_PAD.decode(text).expect("b64");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        URL_SAFE_NO_PAD.encode(bytes)
    };
    let ed_public = ed_key(1).verifying_key().to_bytes();
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("authority-2026".to_owned());
        jsonwebtoken::encode(&header, &sample(), &EncodingKey::from_secret(&ed_public))
            .expect("hs256")
    };
    type Case = (&'static str, String, fn(&BundleError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "unknown key id",
            sign_ed(&sample(), "somebody-else", 1),
            |e| matches!(e, BundleError::UnknownKeyId(k) if k == "somebody-else"),
        ),
        (
            "valid signature by a key trusted for another algorithm",
            sign_es(&sample(), "authority-2026", 3),
            |e| {
                matches!(
                    e,
                    BundleError::AlgorithmMismatch {
                        pinned: "EdDSA",
                        ..
                    }
                )
            },
        ),
        (
            "right kid, wrong key",
            sign_ed(&sample(), "authority-2026", 2),
            |e| matches!(e, BundleError::BadSignature(_)),
        ),
        (
            "alg none",
            forge(
                &json!({"alg": "none", "kid": "authority-2026"}),
                &sample(),
                b"",
            ),
            |e| {
                matches!(
                    e,
                    BundleError::Malformed | BundleError::AlgorithmNotAllowed(_)
                )
            },
        ),
        (
            "alg none with a signature",
            forge(
                &json!({"alg": "none", "kid": "authority-2026"}),
                &sample(),
                b"x",
            ),
            |e| matches!(e, BundleError::AlgorithmNotAllowed(a) if a == "none"),
        ),
        (
            "HS256 signed with the public key bytes",
            hs256_with_public_key,
            |e| matches!(e, BundleError::AlgorithmNotAllowed(a) if a == "HS256"),
        ),
        (
            "embedded jwk",
            forge(
                &json!({"alg": "EdDSA", "kid": "authority-2026", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}}),
                &sample(),
                b"sig",
            ),
            |e| matches!(e, BundleError::ForbiddenHeader(f) if f == "jwk"),
        ),
        (
            "jku",
            forge(
                &json!({"alg": "EdDSA", "kid": "authority-2026", "jku": "https://evil/"}),
                &sample(),
                b"sig",
            ),
            |e| matches!(e, BundleError::ForbiddenHeader(f) if f == "jku"),
        ),
        (
            "unknown crit",
            forge(
                &json!({"alg": "EdDSA", "kid": "authority-2026", "crit": ["exp"]}),
                &sample(),
                b"sig",
            ),
            |e| matches!(e, BundleError::ForbiddenHeader(f) if f == "crit"),
        ),
        (
            "flipped payload byte",
            format!("{h}.{}.{s}", flip(&p)),
            |e| matches!(e, BundleError::BadSignature(_) | BundleError::BadClaims(_)),
        ),
        (
            "flipped signature byte",
            format!("{h}.{p}.{}", flip(&s)),
            |e| matches!(e, BundleError::BadSignature(_)),
        ),
        (
            "missing exp",
            sign_ed(&without("exp"), "authority-2026", 1),
            |e| matches!(e, BundleError::BadClaims(m) if m.contains("exp")),
        ),
        (
            "missing aud",
            sign_ed(&without("aud"), "authority-2026", 1),
            |e| matches!(e, BundleError::BadClaims(m) if m.contains("aud")),
        ),
        (
            "missing iss",
            sign_ed(&without("iss"), "authority-2026", 1),
            |e| matches!(e, BundleError::BadClaims(m) if m.contains("iss")),
        ),
        (
            "missing iat",
            sign_ed(&without("iat"), "authority-2026", 1),
            |e| matches!(e, BundleError::BadClaims(m) if m.contains("iat")),
        ),
        (
            "wrong audience",
            sign_ed(&with(|v| v["aud"] = json!("site-8")), "authority-2026", 1),
            |e| matches!(e, BundleError::WrongAudience { .. }),
        ),
        (
            "expired",
            sign_ed(
                &with(|v| v["exp"] = json!(1_794_000_000i64)),
                "authority-2026",
                1,
            ),
            |e| matches!(e, BundleError::Expired { .. }),
        ),
        (
            "not yet valid",
            sign_ed(
                &with(|v| {
                    v["iat"] = json!(1_796_000_000i64);
                    v["nbf"] = json!(1_796_000_000i64);
                }),
                "authority-2026",
                1,
            ),
            |e| matches!(e, BundleError::NotYetValid { .. }),
        ),
        (
            "purpose prohibited through derived-from",
            sign_ed(
                &with(|v| {
                    v["tenants"][0]["models"] = json!(["gemma-claims-ft"]);
                    v["tenants"][0]["purposes"] = json!(["claims-triage", "surveillance"]);
                }),
                "authority-2026",
                1,
            ),
            |e| {
                matches!(
                    e,
                    BundleError::Content(ContentError::ProhibitedPurpose { .. })
                )
            },
        ),
        (
            "malformed sha256",
            sign_ed(
                &with(|v| v["models"][0]["files"][0]["sha256"] = json!("1234")),
                "authority-2026",
                1,
            ),
            |e| matches!(e, BundleError::Content(ContentError::Invalid { .. })),
        ),
        (
            "tenant names a model not in the manifest",
            sign_ed(
                &with(|v| v["tenants"][1]["models"] = json!(["ghost"])),
                "authority-2026",
                1,
            ),
            |e| matches!(e, BundleError::Content(ContentError::UnknownModel { .. })),
        ),
        ("two parts", format!("{h}.{p}"), |e| {
            matches!(e, BundleError::Malformed)
        }),
        ("padding characters", format!("{h}=.{p}.{s}"), |e| {
            matches!(e, BundleError::Malformed)
        }),
    ];
    for (name, token, expected) in cases {
        match check(&token) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(expected(&e), "{name}: refused for the wrong reason: {e:?}"),
        }
    }
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert!(matches!(check(&huge), Err(BundleError::TooLarge { .. })));
    let big_header = format!("{}.e30.AA", "a".repeat(MAX_HEADER_BYTES + 4));
    assert!(matches!(check(&big_header), Err(BundleError::BadHeader(_))));
}

#[test]
fn times_are_checked_against_the_injected_clock_only() {
    let token = sign_ed(&sample(), "authority-2026", 1);
    // Valid at NOW; the same token at other instants:
    assert!(
        verify(
            token.as_bytes(),
            &anchors(),
            "site-7",
            UnixTime(1_790_000_000 - 61)
        )
        .is_err()
    );
    assert!(
        verify(
            token.as_bytes(),
            &anchors(),
            "site-7",
            UnixTime(1_790_000_000 - 59)
        )
        .is_ok(),
        "leeway"
    );
    assert!(
        verify(
            token.as_bytes(),
            &anchors(),
            "site-7",
            UnixTime(1_800_000_000 - 1)
        )
        .is_ok()
    );
    assert!(matches!(
        verify(
            token.as_bytes(),
            &anchors(),
            "site-7",
            UnixTime(1_800_000_000)
        ),
        Err(BundleError::Expired { .. })
    ));
}

#[test]
fn key_encodings_are_checked() {
    assert_eq!(
        TrustAnchor::ed25519("k", &[0; 31]).err(),
        Some(KeyError::Ed25519Length(31))
    );
    assert_eq!(
        TrustAnchor::p256("k", &[0; 65]).err(),
        Some(KeyError::P256Encoding)
    );
}

#[test]
fn signed_by_the_authority_tools_and_attached_signatures_verify() {
    use crate::bundle::sign::{SignError, attach, sign, signing_input};
    use ed25519_dalek::Signer as _;

    let wire: WireBundle = serde_json::from_value(sample()).expect("wire");
    let der = ed_key(1).to_pkcs8_der().expect("pkcs8");
    let token = sign(
        &wire,
        "authority-2026",
        SigningAlgorithm::EdDsa,
        der.as_bytes(),
    )
    .expect("sign");
    check(&token).expect("one-step EdDSA");

    // Two-step: the input leaves for an offline signer; the signature comes back.
    let input = signing_input(&wire, "authority-2026", SigningAlgorithm::EdDsa).expect("input");
    let sig = ed_key(1).sign(input.as_bytes()).to_bytes();
    check(&attach(&input, &sig).expect("attach")).expect("attached EdDSA");
    assert!(matches!(
        attach(&input, &sig[..63]),
        Err(SignError::SignatureLength { len: 63, .. })
    ));
    let mut flipped = sig;
    flipped[10] ^= 1;
    assert!(matches!(
        check(&attach(&input, &flipped).expect("attach")),
        Err(BundleError::BadSignature(_))
    ));

    // ES256 from a tool that writes DER (openssl pkeyutl) is converted to r || s.
    let input = signing_input(&wire, "authority-hsm", SigningAlgorithm::Es256).expect("input");
    let sig: p256::ecdsa::Signature = p256_key(3).sign(input.as_bytes());
    check(&attach(&input, sig.to_der().as_bytes()).expect("DER")).expect("attached ES256 DER");
    check(&attach(&input, &sig.to_bytes()).expect("raw")).expect("attached ES256 raw");
    assert_eq!(
        attach(&input, &[0x30, 0x03, 0x02, 0x01]),
        Err(SignError::BadEcdsaSignature)
    );

    // A verified bundle can be inspected without the trust anchors, too.
    let (kid, claims) = decode_unverified(token.as_bytes()).expect("decode");
    assert_eq!((kid.as_str(), claims.bundle_version), ("authority-2026", 7));
}

#[test]
fn a_persisted_bundle_is_weighed_against_time_separately() {
    let token = sign_ed(&sample(), "authority-2026", 1);
    let v = verify_signed(token.as_bytes(), &anchors(), "site-7").expect("signed");
    assert!(v.check_time(NOW).is_ok());
    assert!(matches!(
        v.check_time(UnixTime(1_800_000_000)),
        Err(BundleError::Expired { .. })
    ));
    assert_eq!(v.token, token);
}
