//! The store's rules, on a real state directory, with time moved by a test clock.

use std::sync::atomic::{AtomicI64, Ordering};

use airgate_policy::bundle::WireBundle;
use airgate_policy::bundle::sign::sign;
use serde_json::json;

use super::*;
use crate::metrics::Metrics;

const T: i64 = 1_795_000_000;
const GRACE: i64 = 3600;

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> UnixTime {
        UnixTime(self.0.load(Ordering::SeqCst))
    }
}

struct Site {
    dir: tempfile::TempDir,
    config: Config,
    key: crate::keys::PrivateKey,
    clock: Arc<TestClock>,
    metrics: Metrics,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (private, public) =
            crate::keys::generate(&dir.path().join("keys"), "authority").expect("keygen");
        let text = format!(
            "state_dir = \"{d}/state\"\n[listen.unix]\npath = \"{d}/s.sock\"\n[trust]\nanchors = [{{ key_id = \"authority\", public_key = \"{p}\" }}]\n[audit]\nmarker = \"{d}/marker/audit-store\"\n[policy]\naudience = \"site-7\"\nexpiry_grace = \"{GRACE}s\"\n",
            d = dir.path().display(),
            p = public.display()
        );
        let config = Config::parse(&text, "test", &crate::config::SystemGroups).expect("config");
        std::fs::create_dir_all(&config.policy.inbox).expect("inbox");
        Self {
            key: crate::keys::read_private_key(&private).expect("key"),
            dir,
            config,
            clock: Arc::new(TestClock(AtomicI64::new(T))),
            metrics: Metrics::new(),
        }
    }

    fn open(&self) -> Policy {
        self.open_as(&self.config)
    }

    /// The store opened under another configuration of this site.
    fn open_as(&self, config: &Config) -> Policy {
        Policy::open_with_clock(config, self.clock.clone()).expect("open")
    }

    fn set_time(&self, t: i64) {
        self.clock.0.store(t, Ordering::SeqCst);
    }

    /// A signed bundle of `version`; `tag` varies its content.
    fn bundle(&self, version: u64, exp: i64, tag: &str) -> String {
        self.bundle_from(version, T - 10, exp, tag)
    }

    /// A signed bundle of `version`, not valid before `nbf`.
    fn bundle_from(&self, version: u64, nbf: i64, exp: i64, tag: &str) -> String {
        let claims = json!({
            "schema": 1, "bundle_version": version, "iss": "authority", "aud": "site-7",
            "iat": T - 10, "nbf": nbf, "exp": exp,
            "licences": [{"id": "Apache-2.0", "name": tag, "commercial_use": true,
                          "review_by": "2030-01-01", "after_review": "flag"}],
            "models": [{"id": "m", "files": [{"role": "weights", "name": "m.onnx", "sha256": "ab".repeat(32)}],
                        "format": "onnx", "kinds": ["embedding"], "licence": "Apache-2.0"}],
            "tenants": [{"id": "t", "identities": {"uids": [1000]}, "purposes": ["p"], "default_purpose": "p",
                         "models": ["m"], "user_identity": {"kind": "openai_user"}}]
        });
        let wire: WireBundle = serde_json::from_value(claims).expect("wire");
        sign(&wire, "authority", self.key.algorithm, &self.key.pkcs8).expect("sign")
    }

    fn drop_in(&self, name: &str, token: &str) {
        std::fs::write(self.config.policy.inbox.join(name), token).expect("drop");
    }

    fn scan(&self, p: &Policy) -> bool {
        p.scan_inbox(&self.config, &self.metrics, &|| {})
    }

    fn record_of(&self, p: &Policy, name: &str) -> UpdateRecord {
        p.lock().seen[&self.config.policy.inbox.join(name)]
            .1
            .clone()
    }

    fn last(&self, p: &Policy) -> UpdateRecord {
        p.lock().last_update.clone().expect("a record")
    }

    /// The copy of the rollback floor beside the audit marker.
    fn floor_copy(&self) -> PathBuf {
        self.dir.path().join("marker").join(FLOOR_COPY)
    }

    fn read_floor_copy(&self) -> FloorCopy {
        serde_json::from_slice(&std::fs::read(self.floor_copy()).expect("copy")).expect("json")
    }
}

fn version(p: &Policy) -> Option<u64> {
    p.active().map(|a| a.version())
}

#[test]
fn accepted_bundles_are_archived_persisted_and_restored() {
    let site = Site::new();
    let p = site.open();
    assert_eq!(version(&p), None);
    assert!(p.in_force(Duration::ZERO).is_err());
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(1));
    let digest = p.active().expect("active").verified.digest.clone();
    assert!(
        site.config
            .state_dir
            .join(format!("policy/archive/{digest}.jwt"))
            .is_file()
    );
    // Seen once, not re-read.
    assert!(!site.scan(&p));
    drop(p);
    let p = site.open();
    assert_eq!(version(&p), Some(1));
    assert_eq!(p.active().expect("active").source, "persisted");
    // The same file again after a restart is no change.
    assert!(!site.scan(&p));
    assert_eq!(site.last(&p).result, "unchanged");
}

#[test]
fn rollback_is_refused_also_after_a_restart() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v2.jwt", &site.bundle(2, T + 1000, "a"));
    assert!(site.scan(&p));
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(!site.scan(&p));
    let r = site.last(&p);
    assert_eq!(r.result, "refused");
    assert!(r.message.contains("lower than version 2"), "{r:?}");
    assert_eq!(version(&p), Some(2));

    drop(p);
    let p = site.open();
    // A restart forgets which files were seen, not what was accepted.
    assert!(!site.scan(&p));
    assert_eq!(version(&p), Some(2));
    site.drop_in("v2-other.jwt", &site.bundle(2, T + 1000, "b"));
    assert!(!site.scan(&p));
    let r = site.record_of(&p, "v2-other.jwt");
    assert!(
        r.message
            .contains("already accepted with different content"),
        "{r:?}"
    );
    assert_eq!(version(&p), Some(2));
}

#[test]
fn the_highest_of_several_new_bundles_wins() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("a.jwt", &site.bundle(3, T + 1000, "a"));
    site.drop_in("b.jwt", &site.bundle(5, T + 1000, "a"));
    site.drop_in("c.jwt", &site.bundle(4, T + 1000, "a"));
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(5));
}

#[test]
fn a_tampered_persisted_bundle_is_not_trusted() {
    let site = Site::new();
    let p = site.open();
    let token = site.bundle(1, T + 1000, "a");
    site.drop_in("v1.jwt", &token);
    assert!(site.scan(&p));
    let digest = p.active().expect("active").verified.digest.clone();
    drop(p);
    let archived = site
        .config
        .state_dir
        .join(format!("policy/archive/{digest}.jwt"));
    let mut bytes = std::fs::read(&archived).expect("archived");
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    std::fs::write(&archived, bytes).expect("tamper");

    let p = site.open();
    assert_eq!(version(&p), None);
    let why = p.in_force(Duration::ZERO).expect_err("no bundle");
    assert!(why.contains("not trusted"), "{why}");
    let (reasons, _) = p.health(&site.config);
    assert!(
        reasons.iter().any(|r| r.contains("not trusted")),
        "{reasons:?}"
    );
    // Dropping the genuine bundle in again restores service and the archive.
    site.drop_in("again.jwt", &token);
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(1));
    assert_eq!(std::fs::read_to_string(&archived).expect("repaired"), token);
}

#[test]
fn expiry_grace_counts_from_exp_across_restarts() {
    let site = Site::new();
    let p = site.open();
    let exp = T + 100;
    site.drop_in("v1.jwt", &site.bundle(1, exp, "a"));
    assert!(site.scan(&p));

    // Expired, inside the grace period: enforced, with a warning.
    site.set_time(exp + 10);
    p.tick(&site.config, &site.metrics);
    let grace = site.config.policy.expiry_grace;
    assert!(p.in_force(grace).is_ok());
    let (reasons, warnings) = p.health(&site.config);
    assert!(reasons.is_empty(), "{reasons:?}");
    assert!(
        warnings.iter().any(|w| w.contains("grace period")),
        "{warnings:?}"
    );
    drop(p);
    let p = site.open();
    assert!(
        p.in_force(grace).is_ok(),
        "a restart inside the grace period changes nothing"
    );
    // An expired bundle is refused from the inbox outright.
    site.drop_in("v2.jwt", &site.bundle(2, exp, "b"));
    assert!(!site.scan(&p));
    assert!(site.record_of(&p, "v2.jwt").message.contains("expired"));

    // Past the grace period: fail closed, also after a restart.
    site.set_time(exp + GRACE);
    p.tick(&site.config, &site.metrics);
    let why = p.in_force(grace).expect_err("fail closed");
    assert!(why.contains("grace period"), "{why}");
    drop(p);
    let p = site.open();
    assert!(p.in_force(grace).is_err());
}

#[test]
fn a_clock_behind_the_time_floor_is_flagged_and_the_floor_is_used() {
    let site = Site::new();
    let p = site.open();
    let exp = T + 100;
    site.drop_in("v1.jwt", &site.bundle(1, exp, "a"));
    assert!(site.scan(&p));
    // Time passes well beyond the grace period; the floor follows the clock.
    site.set_time(exp + GRACE + 2 * FLOOR_STEP_SECONDS);
    p.tick(&site.config, &site.metrics);
    drop(p);
    // Someone sets the clock back to when the bundle was fresh, and restarts.
    site.set_time(T);
    let p = site.open();
    p.tick(&site.config, &site.metrics);
    let (reasons, warnings) = p.health(&site.config);
    assert!(
        warnings.iter().any(|w| w.contains("behind the time floor")),
        "{warnings:?}"
    );
    assert!(p.now() > UnixTime(exp + GRACE));
    assert!(
        reasons.iter().any(|r| r.contains("grace period")),
        "{reasons:?}"
    );
}

#[test]
fn unreadable_state_is_recovered_from_the_archive() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    site.drop_in("v2.jwt", &site.bundle(2, T + 1000, "a"));
    assert!(site.scan(&p));
    drop(p);
    std::fs::write(site.config.state_dir.join("policy/state.json"), "{ torn").expect("corrupt");
    let p = site.open();
    assert_eq!(version(&p), Some(2));
    let status = p.status(&site.config);
    assert!(
        status["start_problem"]
            .as_str()
            .expect("noted")
            .contains("unreadable")
    );
    site.drop_in("v1-again.jwt", &site.bundle(1, T + 1000, "b"));
    site.scan(&p);
    let r = site.record_of(&p, "v1-again.jwt");
    assert!(r.message.contains("lower than version 2"), "{r:?}");
}

#[test]
fn junk_is_refused_once_and_the_bundle_in_force_stays() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    site.drop_in("junk.jwt", "not a bundle");
    std::fs::write(
        site.config.policy.inbox.join("huge.jwt"),
        vec![b'a'; MAX_TOKEN_BYTES + 1],
    )
    .expect("huge");
    site.drop_in(".partial.jwt", "ignored while being written");
    assert!(!site.scan(&p));
    assert_eq!(version(&p), Some(1));
    let seen = p.lock().seen.len();
    assert_eq!(
        seen, 3,
        "v1, junk and huge are remembered; dotfiles are skipped"
    );
    let refused = site
        .metrics
        .bundle_updates
        .get_or_create(&crate::metrics::ResultLabels { result: "refused" })
        .get();
    assert_eq!(refused, 2);
    // Not re-read (and not re-counted) on the next scan.
    site.scan(&p);
    assert_eq!(
        site.metrics
            .bundle_updates
            .get_or_create(&crate::metrics::ResultLabels { result: "refused" })
            .get(),
        2
    );
    let _ = site.dir.path();
}

/// Every adversarial form reaches the inbox of a store with version 1 in
/// force; each is refused for its own reason and version 1 stays.
#[test]
fn adversarial_bundles_leave_the_last_good_one_in_force() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    let site = Site::new();
    let p = site.open();
    let good = site.bundle(1, T + 1000, "a");
    site.drop_in("good.jwt", &good);
    assert!(site.scan(&p));

    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&site.key.pkcs8)
        .expect("key pair");
    let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
        let (_, wire) =
            airgate_policy::bundle::verify::decode_unverified(good.as_bytes()).expect("decode");
        let mut v = serde_json::to_value(wire).expect("json");
        v["bundle_version"] = 2.into();
        edit(&mut v);
        v
    };
    let signed = |header: serde_json::Value, claims: serde_json::Value| {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        format!("{input}.{}", B64.encode(pair.sign(input.as_bytes())))
    };
    let ed = serde_json::json!({"alg": "EdDSA", "kid": "authority"});
    let plain = |c: serde_json::Value| signed(ed.clone(), c);
    let public = crate::keys::read_public_key(&site.dir.path().join("keys/authority.pub"))
        .expect("public")
        .raw;
    let hs256 = {
        let header = B64.encode(r#"{"alg":"HS256","kid":"authority"}"#);
        let body = B64.encode(claims(&|_| {}).to_string());
        let input = format!("{header}.{body}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
        format!(
            "{input}.{}",
            B64.encode(ring::hmac::sign(&key, input.as_bytes()))
        )
    };
    let flip = |token: &str, at: usize| {
        let mut b = token.as_bytes().to_vec();
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).expect("ascii")
    };
    let v2 = plain(claims(&|_| {}));
    let payload_at = v2.find('.').expect("dot") + 20;
    let signature_at = v2.rfind('.').expect("dot") + 5;
    let without = |claim: &'static str| {
        plain(claims(&move |v| {
            v.as_object_mut().expect("object").remove(claim);
        }))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key id",
            signed(
                serde_json::json!({"alg": "EdDSA", "kid": "stranger"}),
                claims(&|_| {}),
            ),
            "is not a trust anchor",
        ),
        (
            "key pinned to another algorithm",
            signed(
                serde_json::json!({"alg": "ES256", "kid": "authority"}),
                claims(&|_| {}),
            ),
            "is trusted for EdDSA",
        ),
        (
            "alg none",
            format!(
                "{}.{}.c2ln",
                B64.encode(r#"{"alg":"none","kid":"authority"}"#),
                B64.encode(claims(&|_| {}).to_string())
            ),
            "algorithm \"none\"",
        ),
        ("HS256 with the public key", hs256, "algorithm \"HS256\""),
        (
            "embedded jwk",
            signed(
                serde_json::json!({"alg": "EdDSA", "kid": "authority", "jwk": {"kty": "OKP"}}),
                claims(&|_| {}),
            ),
            "header field \"jwk\"",
        ),
        ("flipped payload byte", flip(&v2, payload_at), ""),
        (
            "flipped signature byte",
            flip(&v2, signature_at),
            "signature does not verify",
        ),
        ("missing exp", without("exp"), "missing field `exp`"),
        ("missing aud", without("aud"), "missing field `aud`"),
        ("missing iss", without("iss"), "missing field `iss`"),
        ("missing iat", without("iat"), "missing field `iat`"),
        (
            "wrong audience",
            plain(claims(&|v| v["aud"] = "site-8".into())),
            "is for audience \"site-8\"",
        ),
        (
            "expired",
            plain(claims(&|v| v["exp"] = (T - 5).into())),
            "expired at",
        ),
        (
            "not yet valid",
            plain(claims(&|v| v["nbf"] = (T + 500).into())),
            "is not valid before",
        ),
        ("oversized", "a".repeat(MAX_TOKEN_BYTES + 1), "the limit is"),
        (
            "prohibited purpose",
            plain(claims(&|v| {
                v["licences"][0]["prohibited_uses"] = serde_json::json!(["p"]);
            })),
            "prohibits",
        ),
        (
            "prohibited through derived-from",
            plain(claims(&|v| {
                v["licences"][0]["prohibited_uses"] = serde_json::json!(["p"]);
                v["licences"].as_array_mut().expect("licences").push(serde_json::json!({
                "id": "MIT", "name": "MIT", "commercial_use": true, "review_by": "2030-01-01", "after_review": "flag"}));
                v["models"][0]["licence"] = "MIT".into();
                v["models"].as_array_mut().expect("models").push(serde_json::json!({
                "id": "base", "files": [{"role": "weights", "name": "b.onnx", "sha256": "cd".repeat(32)}],
                "format": "onnx", "kinds": ["embedding"], "licence": "Apache-2.0"}));
                v["models"][0]["derived_from"] = "base".into();
            })),
            "prohibits",
        ),
        (
            "malformed sha256",
            plain(claims(&|v| {
                v["models"][0]["files"][0]["sha256"] = "XYZ".into()
            })),
            "is not 64 lower-case hex digits",
        ),
        (
            "tenant names a model not in the manifest",
            plain(claims(&|v| {
                v["tenants"][0]["models"] = serde_json::json!(["ghost"])
            })),
            "which is not in the manifest",
        ),
        (
            "lower version",
            site.bundle(0, T + 1000, "z"),
            "lower than version 1",
        ),
        (
            "same version, other content",
            site.bundle(1, T + 1000, "other"),
            "already accepted with different content",
        ),
    ];
    for (i, (name, token, why)) in cases.iter().enumerate() {
        let file = format!("case-{i:02}.jwt");
        site.drop_in(&file, token);
        assert!(
            !site.scan(&p),
            "{name}: must not change the bundle in force"
        );
        assert_eq!(version(&p), Some(1), "{name}");
        let r = site.record_of(&p, &file);
        assert_eq!(r.result, "refused", "{name}: {r:?}");
        assert!(
            r.message.contains(why),
            "{name}: {:?} lacks {why:?}",
            r.message
        );
    }
    // And the control: the same claims, properly signed, do go in.
    site.drop_in("v2.jwt", &v2);
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(2));
}

#[test]
fn a_missing_state_file_is_rebuilt_from_the_archive() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    site.drop_in("v2.jwt", &site.bundle(2, T + 1000, "a"));
    assert!(site.scan(&p));
    drop(p);
    // Without the copy beside the marker too: the archive alone must do.
    std::fs::remove_file(site.config.state_dir.join("policy/state.json")).expect("rm state");
    std::fs::remove_file(site.floor_copy()).expect("rm copy");
    let p = site.open();
    assert_eq!(version(&p), Some(2));
    let status = p.status(&site.config);
    assert_eq!(status["highest_version"], 2);
    assert_eq!(status["time_floor"], T - 10);
    assert!(
        status["start_problem"]
            .as_str()
            .expect("noted")
            .contains("missing though the archive holds bundles"),
        "{status}"
    );
    let events = p.take_events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            airgate_policy::audit::Event::PolicyStateRecovered {
                highest_version: 2,
                ..
            }
        )),
        "{events:?}"
    );
    site.drop_in("v1-again.jwt", &site.bundle(1, T + 1000, "b"));
    assert!(!site.scan(&p));
    let r = site.record_of(&p, "v1-again.jwt");
    assert!(r.message.contains("lower than version 2"), "{r:?}");
    // The rebuilt state is written at the next tick, and the copy with it.
    p.tick(&site.config, &site.metrics);
    assert!(site.config.state_dir.join("policy/state.json").is_file());
    assert_eq!(site.read_floor_copy().highest_version, 2);
}

#[test]
fn a_first_start_is_not_a_recovery() {
    let site = Site::new();
    let p = site.open();
    assert!(p.take_events().is_empty());
    assert!(p.status(&site.config)["start_problem"].is_null());
    // The first tick sets the time floor, and keeps it beside the marker.
    p.tick(&site.config, &site.metrics);
    let copy = site.read_floor_copy();
    assert_eq!((copy.highest_version, copy.time_floor), (0, T));
}

#[test]
fn the_floor_is_copied_beside_the_marker_and_survives_a_wiped_state_directory() {
    let site = Site::new();
    let p = site.open();
    let v2 = site.bundle(2, T + 1000, "a");
    site.drop_in("v2.jwt", &v2);
    assert!(site.scan(&p));
    let digest = p.active().expect("active").verified.digest.clone();
    let copy = site.read_floor_copy();
    assert_eq!(copy.highest_version, 2);
    assert_eq!(copy.highest_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(copy.time_floor, T - 10);
    // The floor advances with the clock, and the copy with it.
    let later = T + 10 * FLOOR_STEP_SECONDS;
    site.set_time(later);
    p.tick(&site.config, &site.metrics);
    assert_eq!(site.read_floor_copy().time_floor, later);
    drop(p);

    // The whole state directory goes (the inbox with it), the clock is set back.
    std::fs::remove_dir_all(&site.config.state_dir).expect("wipe");
    std::fs::create_dir_all(&site.config.policy.inbox).expect("inbox");
    site.set_time(T);
    let p = site.open();
    assert_eq!(version(&p), None);
    let status = p.status(&site.config);
    assert_eq!(status["highest_version"], 2);
    assert_eq!(status["time_floor"], later);
    assert!(p.now() >= UnixTime(later));
    assert!(
        p.take_events()
            .iter()
            .any(|e| matches!(e, airgate_policy::audit::Event::PolicyStateRecovered { .. }))
    );
    // Still a rollback, and the clock is still behind the floor.
    site.drop_in("v1.jwt", &site.bundle(1, later + 1000, "a"));
    assert!(!site.scan(&p));
    let r = site.record_of(&p, "v1.jwt");
    assert!(r.message.contains("lower than version 2"), "{r:?}");
    p.tick(&site.config, &site.metrics);
    let (_, warnings) = p.health(&site.config);
    assert!(
        warnings.iter().any(|w| w.contains("behind the time floor")),
        "{warnings:?}"
    );
    // A newer bundle goes in as usual.
    site.set_time(later);
    site.drop_in("v3.jwt", &site.bundle(3, later + 1000, "a"));
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(3));
    assert_eq!(site.read_floor_copy().highest_version, 3);
}

#[test]
fn a_state_file_set_back_is_raised_to_the_copy_and_its_bundle_not_restored() {
    let site = Site::new();
    let p = site.open();
    let state = site.config.state_dir.join("policy/state.json");
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    let old_state = std::fs::read(&state).expect("state v1");
    site.drop_in("v2.jwt", &site.bundle(2, T + 1000, "a"));
    assert!(site.scan(&p));
    let v2 = p.active().expect("active").verified.digest.clone();
    drop(p);

    // Someone puts the state of version 1 back: the highest accepted, still
    // archived, is what comes back in force.
    std::fs::write(&state, &old_state).expect("set back");
    let p = site.open();
    assert_eq!(version(&p), Some(2));
    let status = p.status(&site.config);
    assert_eq!(status["highest_version"], 2);
    assert!(
        status["start_problem"]
            .as_str()
            .is_some_and(|m| m.contains("the higher is the rollback floor")),
        "{status}"
    );
    p.tick(&site.config, &site.metrics);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("json");
    assert_eq!(written["active_digest"], v2.as_str());
    drop(p);

    // Set back again, and version 2 gone from the archive: version 1 is not
    // put back in force.
    std::fs::write(&state, &old_state).expect("set back");
    std::fs::remove_file(
        site.config
            .state_dir
            .join(format!("policy/archive/{v2}.jwt")),
    )
    .expect("rm v2");
    let p = site.open();
    assert_eq!(version(&p), None, "version 1 would be a rollback");
    let why = p.in_force(Duration::ZERO).expect_err("nothing in force");
    assert!(why.contains("below version 2"), "{why}");
    // Version 2 itself, still in the inbox, restores service; version 1 stays out.
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(2));
    let r = site.record_of(&p, "v1.jwt");
    assert!(r.message.contains("lower than version 2"), "{r:?}");
}

#[test]
fn an_unwritable_copy_is_a_warning_not_a_refusal() {
    let site = Site::new();
    // A file where the marker's directory should be.
    std::fs::write(site.dir.path().join("marker"), "not a directory").expect("block");
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    assert_eq!(version(&p), Some(1));
    let (reasons, warnings) = p.health(&site.config);
    assert!(reasons.is_empty(), "{reasons:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("cannot keep the rollback floor copy")),
        "{warnings:?}"
    );
    // Once it can be written, the next tick writes it and the warning goes.
    std::fs::remove_file(site.dir.path().join("marker")).expect("unblock");
    p.tick(&site.config, &site.metrics);
    assert_eq!(site.read_floor_copy().highest_version, 1);
    let (_, warnings) = p.health(&site.config);
    assert!(
        !warnings.iter().any(|w| w.contains("rollback floor")),
        "{warnings:?}"
    );
}

#[test]
fn an_offer_is_settled_only_when_its_refusal_cannot_change() {
    use airgate_policy::audit::Event;
    let site = Site::new();
    let p = site.open();
    let offer = |token: &str| p.offer("mirror m", token.as_bytes(), &site.config, &site.metrics);
    let refused = || {
        site.metrics
            .bundle_updates
            .get_or_create(&crate::metrics::ResultLabels { result: "refused" })
            .get()
    };
    let v1 = site.bundle(1, T + 1000, "a");
    assert_eq!(offer(&v1), Offered::Accepted);
    assert_eq!(offer(&v1), Offered::Settled, "already in force");
    p.take_events();

    // Not valid yet: refused for now, recorded once however often it is offered.
    let later = T + 500;
    let v2 = site.bundle_from(2, later, T + 2000, "a");
    assert_eq!(offer(&v2), Offered::Retry);
    assert_eq!(offer(&v2), Offered::Retry);
    let events = p.take_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Event::BundleRefused { version: None, reason, .. } if reason.contains("not valid before"))
    );
    assert_eq!(refused(), 1);
    assert!(site.last(&p).message.contains("not valid before"));
    // Once valid, the same bytes go in.
    site.set_time(later);
    assert_eq!(offer(&v2), Offered::Accepted);
    assert_eq!(version(&p), Some(2));

    // For good: junk, a rollback, the same version with other content, expired.
    for (token, why) in [
        ("not a bundle".to_owned(), "compact JWS"),
        (site.bundle(1, T + 3000, "b"), "lower than version 2"),
        (
            site.bundle_from(2, later, T + 2000, "b"),
            "different content",
        ),
        (site.bundle(3, later - 1, "a"), "expired"),
    ] {
        assert_eq!(offer(&token), Offered::Settled, "{why}");
        assert!(
            site.last(&p).message.contains(why),
            "{why}: {:?}",
            site.last(&p)
        );
    }

    // A bundle that cannot be persisted now (the archive is not a directory).
    let archive = site.config.state_dir.join("policy/archive");
    let aside = site.config.state_dir.join("policy/archive-aside");
    std::fs::rename(&archive, &aside).expect("move archive");
    std::fs::write(&archive, "blocked").expect("block");
    let v3 = site.bundle(3, T + 3000, "a");
    assert_eq!(offer(&v3), Offered::Retry);
    assert_eq!(site.last(&p).result, "error");
    assert_eq!(version(&p), Some(2));
    std::fs::remove_file(&archive).expect("unblock");
    std::fs::rename(&aside, &archive).expect("restore archive");
    assert_eq!(offer(&v3), Offered::Accepted);
    assert_eq!(version(&p), Some(3));
}

#[test]
fn a_refusal_by_this_hosts_configuration_is_not_settled() {
    let site = Site::new();
    let p = site.open();
    let mut other = site.config.clone();
    other.policy.audience = Some("site-8".to_owned());
    let token = site.bundle(1, T + 1000, "a");
    let offered = p.offer("mirror m", token.as_bytes(), &other, &site.metrics);
    assert_eq!(offered, Offered::Retry);
    // After a reload that fixes the audience, the same bytes go in.
    let offered = p.offer("mirror m", token.as_bytes(), &site.config, &site.metrics);
    assert_eq!(offered, Offered::Accepted);
}

/// `site`'s configuration trusting only a second authority's key.
fn other_anchor(site: &Site) -> Config {
    let (_, public) =
        crate::keys::generate(&site.dir.path().join("keys"), "second").expect("keygen");
    let mut other = site.config.clone();
    other.trust.anchors = vec![crate::config::TrustAnchor {
        key_id: "second".to_owned(),
        key: crate::keys::read_public_key(&public).expect("public key"),
        public_key: public,
    }];
    other
}

#[test]
fn a_reload_that_removes_the_signing_anchor_withdraws_the_bundle_and_fails_closed() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    let digest = p.active().expect("active").verified.digest.clone();
    let _ = p.take_events();
    // The same anchors: nothing changes.
    assert!(!p.reverify(&site.config, &site.metrics));
    assert_eq!(version(&p), Some(1));
    assert!(p.take_events().is_empty());

    let other = other_anchor(&site);
    assert!(p.reverify(&other, &site.metrics));
    assert_eq!(version(&p), None);
    let why = p.in_force(Duration::ZERO).expect_err("fails closed");
    assert!(why.contains("withdrawn at a reload"), "{why}");
    assert!(why.contains("\"authority\""), "names the key: {why}");
    let (reasons, _) = p.health(&other);
    assert!(
        reasons.iter().any(|r| r.contains("withdrawn")),
        "{reasons:?}"
    );
    let events = p.take_events();
    assert!(
        matches!(&events[..], [airgate_policy::audit::Event::BundleWithdrawn { version: 1, digest: d, .. }] if *d == digest),
        "{events:?}"
    );
    assert_eq!(
        p.status(&other)["withdrawn"]
            .as_str()
            .map(|w| w.contains(&digest)),
        Some(true)
    );
    // The archive and the rollback floor are kept.
    let archived = site
        .config
        .state_dir
        .join(format!("policy/archive/{digest}.jwt"));
    assert!(archived.is_file());
    assert_eq!(p.lock().persisted.highest_version, 1);
    // Reweighed again under the same configuration: still out, no new record.
    assert!(!p.reverify(&other, &site.metrics));
    assert!(p.take_events().is_empty());
    // The anchor put back: the bundle is back in force at the next reload.
    assert!(p.reverify(&site.config, &site.metrics));
    assert_eq!(version(&p), Some(1));
    assert_eq!(p.active().expect("active").source, "reload");
    assert!(p.in_force(Duration::ZERO).is_ok());
    assert!(matches!(
        &p.take_events()[..],
        [airgate_policy::audit::Event::BundleAccepted { version: 1, source, .. }] if source == "reload"
    ));

    // A restart under the configuration without the anchor does not trust
    // it either (the persisted bundle is verified again at start).
    assert!(p.reverify(&other, &site.metrics));
    drop(p);
    let p = site.open_as(&other);
    assert_eq!(version(&p), None);
    let why = p.in_force(Duration::ZERO).expect_err("fails closed");
    assert!(why.contains("not trusted"), "{why}");
}

#[test]
fn a_reload_to_another_audience_withdraws_the_bundle() {
    let site = Site::new();
    let p = site.open();
    site.drop_in("v1.jwt", &site.bundle(1, T + 1000, "a"));
    assert!(site.scan(&p));
    let mut other = site.config.clone();
    other.policy.audience = Some("site-8".to_owned());
    assert!(p.reverify(&other, &site.metrics));
    let why = p.in_force(Duration::ZERO).expect_err("fails closed");
    assert!(why.contains("site-8"), "{why}");
}
