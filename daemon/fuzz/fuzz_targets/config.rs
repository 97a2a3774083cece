//! The configuration file on arbitrary text: `Config::parse`, which
//! collects every error with its key path, with a fixed group database.
//!
//! Trust anchors name public key files that the parser reads. The target
//! writes three under /tmp/airgate-fuzz-config (a valid Ed25519 key, one
//! that is not a key, and a name that does not exist) and leaves out any
//! input that names another file, so the parser never reads what the
//! fuzzer chose (/dev/zero, a FIFO).
//!
//! What is accepted must hold every documented bound (absolute paths, the
//! socket mode, systemd fd names, limits, durations, printable ids, unique
//! key ids, an https mirror); what is refused has at least one error, each
//! with a message, and a key path unless the text is not TOML at all (then
//! exactly one, for the whole file). Parsing the same text again gives the
//! same answer.
#![no_main]

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use airgate::config::{Config, ConfigError, GroupLookup};
use libfuzzer_sys::fuzz_target;

const DIR: &str = "/tmp/airgate-fuzz-config";
const ANCHOR: &str = "/tmp/airgate-fuzz-config/anchor.pem";
const NOT_A_KEY: &str = "/tmp/airgate-fuzz-config/not-a-key.pem";
const MISSING: &str = "/tmp/airgate-fuzz-config/missing.pem";
/// The Ed25519 public key of the seed [9; 32].
const ANCHOR_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA/RckOFqgx1tk+3jNYC+h2ZH96/drE8WO1wLqyDXp9hg=\n-----END PUBLIC KEY-----\n";

struct Groups;

impl GroupLookup for Groups {
    fn gid_of(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "airgate-clients" => Some(3001),
            "airgate-admin" => Some(3002),
            "broken" => return Err("the group database is unavailable".to_owned()),
            _ => None,
        })
    }
}

fn key_files() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::fs::create_dir_all(DIR).expect("fuzz key directory");
        std::fs::write(ANCHOR, ANCHOR_PEM).expect("anchor key");
        std::fs::write(
            NOT_A_KEY,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .expect("not a key");
        let _ = std::fs::remove_file(MISSING);
    });
}

/// Whether every public key file the text names is one of ours.
fn reads_only_ours(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        // Not TOML: refused before any file is read.
        return true;
    };
    let Some(anchors) = table
        .get("trust")
        .and_then(|t| t.get("anchors"))
        .and_then(toml::Value::as_array)
    else {
        return true;
    };
    anchors.iter().all(|a| {
        a.get("public_key")
            .and_then(toml::Value::as_str)
            .is_none_or(|p| [ANCHOR, NOT_A_KEY, MISSING].contains(&p))
    })
}

fn absolute(p: &Path) {
    assert!(p.is_absolute(), "{} is accepted as a path", p.display());
}

fn fd_name(name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
        "{name:?} is accepted as a file descriptor name"
    );
}

fn printable_id(id: &str) {
    assert!(
        !id.is_empty() && id.len() <= 128 && !id.chars().any(char::is_control),
        "{id:?} is accepted as an id"
    );
}

fn at_least(d: Duration, ms: u64) {
    assert!(d >= Duration::from_millis(ms), "{d:?}");
}

fn accepted(c: &Config) {
    assert!(c.source.is_none());
    absolute(&c.state_dir);
    absolute(&c.models_dir);
    absolute(&c.unix.path);
    absolute(&c.policy.inbox);
    assert!(c.unix.mode <= 0o777, "{:o}", c.unix.mode);
    assert_eq!(c.unix.mode & 0o600, 0o600, "{:o}", c.unix.mode);
    assert_eq!(
        c.unix.mode & 0o002,
        0,
        "{:o}: every local user",
        c.unix.mode
    );
    fd_name(&c.unix.fd_name);
    if let Some(tls) = &c.tls {
        for p in [&tls.cert, &tls.key, &tls.client_ca] {
            absolute(p);
        }
        tls.crls.iter().for_each(|p| absolute(p));
        fd_name(&tls.fd_name);
        at_least(tls.handshake_timeout, 100);
    }
    at_least(c.state_probe_interval, 100);
    assert!(c.state_probe_interval <= Duration::from_secs(3600));
    assert!(c.shutdown_grace <= Duration::from_secs(3600));

    let l = &c.limits;
    assert!((1..=1024).contains(&l.max_headers));
    assert!((8192..=1 << 20).contains(&l.max_header_bytes));
    assert!((1..=1 << 34).contains(&l.max_body_bytes));
    // One body of the largest size fits the body budget, parsed.
    assert!(
        l.max_buffered_body_bytes >= l.max_body_bytes.saturating_mul(airgate::body::JSON_CHARGE),
        "{l:?}"
    );
    assert!(l.min_upload_bytes_per_sec >= 1);
    assert!(l.max_connections_unix >= 1 && l.max_connections_tls >= 1);
    assert!(l.http2_max_concurrent_streams >= 1);
    for d in [l.header_read_timeout, l.body_read_timeout, l.idle_timeout] {
        at_least(d, 100);
    }

    if let Some(audience) = &c.policy.audience {
        printable_id(audience);
    }
    at_least(c.policy.poll_interval, 100);
    assert!(c.policy.expiry_grace <= Duration::from_secs(90 * 86_400));
    if let Some(m) = &c.policy.mirror {
        assert_eq!(m.url.scheme_str(), Some("https"), "{}", m.url);
        assert!(m.url.host().is_some(), "{}", m.url);
        absolute(&m.ca);
        if let Some((cert, key)) = &m.client_cert {
            absolute(cert);
            absolute(key);
        }
        at_least(m.interval, 100);
        at_least(m.timeout, 100);
    }

    let mut ids: Vec<&str> = Vec::new();
    for a in &c.trust.anchors {
        printable_id(&a.key_id);
        assert!(
            !ids.contains(&a.key_id.as_str()),
            "duplicate {:?}",
            a.key_id
        );
        ids.push(&a.key_id);
        // Only the one real key file can be an anchor.
        assert_eq!(a.public_key, Path::new(ANCHOR));
    }

    if let Some(marker) = &c.audit.marker {
        absolute(marker);
    }
    if let Some(secret) = &c.audit.user_secret {
        absolute(secret);
    }
    assert!(c.audit.cache_bytes >= 1 << 20);
    assert!(c.audit.checkpoint_every >= 1);
    at_least(c.audit.checkpoint_interval, 1000);
    assert!(
        c.usage.warn_at.iter().all(|f| *f > 0.0 && *f < 1.0),
        "{:?}",
        c.usage
    );
    assert!((2..=1200).contains(&c.usage.retention_months));
    assert!((1..=64).contains(&c.llm.slots));
    assert!((64..=1 << 20).contains(&c.llm.context));
    assert!(c.llm.batch >= 16);
    assert!(c.onnx.workers >= 1);
    assert!(c.onnx.max_tensor_elements >= 1);
}

fuzz_target!(|data: &[u8]| {
    // The file is read as UTF-8 (read_to_string).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !reads_only_ours(text) {
        return;
    }
    key_files();
    let first = Config::parse(text, "fuzz.toml", &Groups);
    match &first {
        Ok(c) => accepted(c),
        Err(ConfigError::Invalid { origin, errors }) => {
            assert_eq!(origin, "fuzz.toml");
            assert!(!errors.is_empty(), "refused without a reason");
            assert!(errors.iter().all(|e| !e.message.is_empty()), "{errors:?}");
            if text.parse::<toml::Table>().is_err() {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert!(errors[0].path.is_empty(), "{errors:?}");
            } else {
                // A key path for each; only a top-level key named "" has an
                // empty one.
                assert!(
                    errors
                        .iter()
                        .all(|e| !e.path.is_empty() || e.message == "unknown key"),
                    "{errors:?}"
                );
            }
        }
        Err(other) => panic!("parse gave {other}"),
    }
    match (&first, &Config::parse(text, "fuzz.toml", &Groups)) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (
            Err(ConfigError::Invalid { errors: a, .. }),
            Err(ConfigError::Invalid { errors: b, .. }),
        ) => assert_eq!(a, b),
        (a, b) => panic!("the same text parsed as {a:?}, then {b:?}"),
    }
});
