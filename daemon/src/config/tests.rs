use super::*;

struct FakeGroups;

impl GroupLookup for FakeGroups {
    fn gid_of(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(match name {
            "airgate-clients" => Some(3001),
            "airgate-admin" => Some(3002),
            _ => None,
        })
    }
}

fn parse(text: &str) -> Result<Config, Vec<String>> {
    match Config::parse(text, "test.toml", &FakeGroups) {
        Ok(c) => Ok(c),
        Err(ConfigError::Invalid { errors, .. }) => {
            Err(errors.iter().map(ToString::to_string).collect())
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

const MINIMAL: &str = r#"
state_dir = "/var/lib/airgate"
[listen.unix]
path = "/run/airgate/airgate.sock"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/airgate"));
    assert_eq!(c.models_dir, PathBuf::from("/var/lib/airgate/models"));
    assert_eq!(c.unix.mode, 0o660);
    assert_eq!(c.unix.group, None);
    assert_eq!(c.unix.fd_name, "unix");
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.log.target, LogTarget::Auto);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.policy.audience, None);
    assert_eq!(c.policy.inbox, PathBuf::from("/var/lib/airgate/inbox"));
    assert_eq!(c.policy.expiry_grace, Duration::from_secs(72 * 3600));
}

#[test]
fn full_config() {
    let c = parse(
        r#"
state_dir = "/var/lib/airgate"
models_dir = "/srv/models"
shutdown_grace = "5s"
state_probe_interval = "250ms"
state_min_free_bytes = 0
[listen.unix]
path = "/run/airgate/airgate.sock"
mode = "0640"
group = "airgate-clients"
fd_name = "local"
[admin]
groups = ["airgate-admin", 4000]
[limits]
header_read_timeout = "2s"
max_headers = 10
max_header_bytes = 8192
max_body_bytes = 1024
idle_timeout = "1m"
max_connections = 3
http2_max_concurrent_streams = 8
[log]
target = "stderr"
level = "airgate=debug,hyper=warn"
[policy]
audience = "site-7"
inbox = "/etc/airgate/inbox"
poll_interval = "2s"
expiry_grace = "24h"
"#,
    )
    .expect("valid");
    assert_eq!(c.unix.mode, 0o640);
    assert_eq!(c.unix.group, Some(3001));
    assert_eq!(c.unix.fd_name, "local");
    assert_eq!(c.admin.groups, vec![3002, 4000]);
    // The key from before per-listener budgets sets both.
    assert_eq!(c.limits.max_connections_unix, 3);
    assert_eq!(c.limits.max_connections_tls, 3);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.state_probe_interval, Duration::from_millis(250));
    assert_eq!(c.log.level, "airgate=debug,hyper=warn");
    assert_eq!(c.policy.audience.as_deref(), Some("site-7"));
    assert_eq!(c.policy.inbox, PathBuf::from("/etc/airgate/inbox"));
    assert_eq!(c.policy.poll_interval, Duration::from_secs(2));
    assert_eq!(c.policy.expiry_grace, Duration::from_secs(24 * 3600));
}

#[test]
fn every_error_is_reported_with_its_path() {
    let errors = parse(
        r#"
state_dir = "relative/dir"
colour = "blue"
[listen.unix]
mode = "0666"
group = "no-such-group"
[limits]
max_headers = 0
idle_timeout = "forever"
max_body_bytes = "big"
bogus = 1
[log]
target = "syslog"
[policy]
audience = ""
inbox = "inbox"
expiry_grace = "1y"
[[tenants]]
name = "static tables are gone"
"#,
    )
    .expect_err("invalid");
    let want = [
        "state_dir: expected an absolute path",
        "colour: unknown key",
        "listen.unix.path: required key is missing",
        "listen.unix.mode: \"0666\" lets every local user connect",
        "listen.unix.group: no such group \"no-such-group\"",
        "limits.max_headers: 0 is out of range 1..=1024",
        "limits.idle_timeout: expected a duration",
        "limits.max_body_bytes: expected an integer, found string",
        "limits.bogus: unknown key",
        "log.target: expected \"auto\", \"journald\" or \"stderr\", found \"syslog\"",
        "policy.audience: expected 1 to 128 printable characters",
        "policy.inbox: expected an absolute path",
        "policy.expiry_grace: expected a duration",
        "tenants: unknown key",
    ];
    for w in want {
        assert!(
            errors.iter().any(|e| e.starts_with(w)),
            "missing {w:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), want.len(), "{errors:#?}");
}

#[test]
fn missing_sections_are_named() {
    let errors = parse("").expect_err("invalid");
    assert_eq!(
        errors,
        vec![
            "state_dir: required key is missing",
            "listen: required table is missing"
        ]
    );
}

#[test]
fn syntax_error_is_one_error_with_position() {
    let errors = parse("state_dir = \n[").expect_err("invalid");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("not valid TOML") && errors[0].contains("line"),
        "{errors:?}"
    );
}

#[test]
fn wrong_types_for_tables() {
    let errors = parse("state_dir = \"/x\"\nlisten = 3\nlimits = []\n").expect_err("invalid");
    assert!(
        errors.contains(&"listen: expected a table, found integer".to_owned()),
        "{errors:?}"
    );
    assert!(
        errors.contains(&"limits: expected a table, found array".to_owned()),
        "{errors:?}"
    );
}

#[test]
fn trust_anchors_are_read_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = crate::keys::generate(dir.path(), "k1").expect("keygen");
    let text = format!(
        r#"{MINIMAL}
[trust]
anchors = [{{ key_id = "k1", public_key = "{p}" }}, {{ key_id = "k1", public_key = "{p}" }}, {{ key_id = "k2", public_key = "/nonexistent/key.pub" }}, {{ key_id = "k3", public_key = "{k}" }}]
"#,
        p = public.display(),
        k = private.display(),
    );
    let errors = parse(&text).expect_err("invalid");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("trust.anchors[1].key_id: duplicate key id")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e
                .starts_with("trust.anchors[2].public_key: /nonexistent/key.pub: No such file")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("trust.anchors[3].public_key:")
                && e.contains("not a PEM PUBLIC KEY")),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 3, "{errors:?}");

    let c = parse(&format!(
        "{MINIMAL}\n[trust]\nanchors = [{{ key_id = \"k1\", public_key = \"{}\" }}]\n",
        public.display()
    ))
    .expect("valid");
    assert!(!c.trust.anchors().is_empty());
}

#[test]
fn durations() {
    let ok = [
        ("0ms", 0),
        ("500ms", 500),
        ("10s", 10_000),
        ("2m", 120_000),
        ("1h", 3_600_000),
    ];
    for (text, ms) in ok {
        assert_eq!(
            parse_duration(text),
            Ok(Duration::from_millis(ms)),
            "{text}"
        );
    }
    for bad in [
        "",
        "10",
        "s",
        "1.5s",
        "-1s",
        "10 s",
        "3d",
        "99999999999999999999h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn file_modes() {
    let cases = [
        ("0660", Ok(0o660)),
        ("0o600", Ok(0o600)),
        ("0640", Ok(0o640)),
    ];
    for (text, want) in cases {
        assert_eq!(file_mode(&Value::String(text.into())), want);
    }
    for bad in ["0666", "0460", "999", "01777", "rw-rw----"] {
        assert!(file_mode(&Value::String(bad.into())).is_err(), "{bad}");
    }
    assert!(file_mode(&Value::Integer(660)).is_err());
}

#[test]
fn tls_listener() {
    let c = parse(&format!(
        r#"{MINIMAL}
[listen.tls]
address = "127.0.0.1:8443"
cert = "/etc/airgate/tls/server.pem"
key = "/etc/airgate/tls/server.key"
client_ca = "/etc/airgate/tls/ca.pem"
crls = ["/etc/airgate/tls/crl.pem"]
"#
    ))
    .expect("valid");
    let tls = c.tls.expect("tls");
    assert_eq!(tls.address, "127.0.0.1:8443".parse().expect("addr"));
    assert_eq!(tls.expired_crl, ExpiredCrl::Refuse, "refuse is the default");
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
    assert_eq!(tls.fd_name, "tls");
}

#[test]
fn tls_listener_errors() {
    let errors = parse(&format!(
        r#"{MINIMAL}
[listen.tls]
address = "localhost"
cert = "server.pem"
expired_crl = "ignore"
map_common_name = true
"#
    ))
    .expect_err("invalid");
    for want in [
        "listen.tls.address: expected an address",
        "listen.tls.cert: expected an absolute path",
        "listen.tls.key: required key is missing",
        "listen.tls.client_ca: required key is missing",
        "listen.tls.expired_crl: expected \"refuse\" or \"warn\"",
        "listen.tls.map_common_name: unknown key",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), 6, "{errors:#?}");
}

#[test]
fn bundle_mirror() {
    let c = parse(&format!(
        "{MINIMAL}\n[policy]\naudience = \"site-7\"\n[policy.mirror]\nurl = \"https://mirror.corp.example:8443/airgate/site-7.jwt\"\nca = \"/etc/airgate/mirror-ca.pem\"\ncert = \"/etc/airgate/tls/mirror-client.pem\"\nkey = \"/etc/airgate/tls/mirror-client.key\"\n"
    ))
    .expect("valid");
    let m = c.policy.mirror.expect("mirror");
    assert_eq!(m.url.port_u16(), Some(8443));
    assert_eq!(m.interval, Duration::from_secs(300));
    assert!(m.client_cert.is_some());

    let errors = parse(&format!(
        "{MINIMAL}\n[policy.mirror]\nurl = \"http://mirror/b.jwt\"\ncert = \"/c.pem\"\nsurprise = 1\n"
    ))
    .expect_err("invalid");
    for want in [
        "policy.mirror.url: expected an https:// URL",
        "policy.mirror.ca: required key is missing",
        "policy.mirror: cert and key go together",
        "policy.mirror.surprise: unknown key",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{want:?} in {errors:#?}"
        );
    }
}

#[test]
fn onnx_run_bounds() {
    let c = parse(MINIMAL).expect("valid");
    assert_eq!(
        c.onnx.max_batch_tokens,
        crate::onnx::DEFAULT_MAX_BATCH_TOKENS
    );
    assert_eq!(c.onnx.max_run_bytes, crate::onnx::DEFAULT_MAX_RUN_BYTES);
    let c = parse(&format!(
        "{MINIMAL}[onnx]\nmax_batch_tokens = 4096\nmax_run_bytes = 268435456\n"
    ))
    .expect("valid");
    assert_eq!(c.onnx.max_batch_tokens, 4096);
    assert_eq!(c.onnx.max_run_bytes, 256 << 20);
    let errors = parse(&format!(
        "{MINIMAL}[onnx]\nmax_batch_tokens = 0\nmax_run_bytes = 1024\n"
    ))
    .expect_err("out of range");
    for w in [
        "onnx.max_batch_tokens: 0 is out of range",
        "onnx.max_run_bytes: 1024 is out of range",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(w)),
            "missing {w:?} in {errors:#?}"
        );
    }
}

#[test]
fn connection_and_body_budgets() {
    let d = Limits::default();
    assert_eq!(d.max_connections_unix, 1024);
    assert_eq!(d.max_connections_tls, 1024);
    assert_eq!(d.operator_reserve, 8);
    assert_eq!(d.body_read_timeout, Duration::from_secs(30));
    assert_eq!(d.min_upload_bytes_per_sec, 65536);
    assert_eq!(d.max_buffered_body_bytes, 256 << 20);

    let c = parse(&format!(
        "{MINIMAL}\n[limits]\nmax_connections = 50\nmax_connections_tls = 10\noperator_reserve = 0\nbody_read_timeout = \"5s\"\nmin_upload_bytes_per_sec = 1000\nmax_buffered_body_bytes = 104857600\n"
    ))
    .expect("valid");
    assert_eq!(
        c.limits.max_connections_unix, 50,
        "max_connections fills in"
    );
    assert_eq!(
        c.limits.max_connections_tls, 10,
        "the listener's own key wins"
    );
    assert_eq!(c.limits.operator_reserve, 0);
    assert_eq!(c.limits.body_read_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.min_upload_bytes_per_sec, 1000);
    assert_eq!(c.limits.max_buffered_body_bytes, 100 << 20);

    // A large body limit raises the default budget to hold one such body parsed.
    let c = parse(&format!("{MINIMAL}\n[limits]\nmax_body_bytes = 67108864\n")).expect("valid");
    assert_eq!(
        c.limits.max_buffered_body_bytes,
        (64 << 20) * crate::body::JSON_CHARGE
    );

    let errors = parse(&format!(
        "{MINIMAL}\n[limits]\nmax_connections_unix = 0\noperator_reserve = 5000\nbody_read_timeout = \"1ms\"\nmin_upload_bytes_per_sec = 0\nmax_body_bytes = 8388608\nmax_buffered_body_bytes = 16777216\n"
    ))
    .expect_err("invalid");
    for want in [
        "limits.max_connections_unix: 0 is out of range 1..=1048576",
        "limits.operator_reserve: 5000 is out of range 0..=1024",
        "limits.body_read_timeout: 1ms is out of range 100ms..=3600s",
        "limits.min_upload_bytes_per_sec: 0 is out of range",
        "limits.max_buffered_body_bytes: 16777216 is less than one largest JSON body takes parsed",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), 5, "{errors:#?}");
}

#[test]
fn full_verification_runs_daily_unless_set_or_turned_off() {
    let with = |v: &str| parse(&format!("{MINIMAL}[audit]\nfull_verify_interval = {v}\n"));
    let interval = |v: &str| with(v).expect("valid").audit.full_verify_interval;
    assert_eq!(
        parse(MINIMAL).expect("valid").audit.full_verify_interval,
        Some(Duration::from_secs(24 * 3600))
    );
    assert_eq!(interval("\"6h\""), Some(Duration::from_secs(6 * 3600)));
    assert_eq!(interval("\"off\""), None);
    assert_eq!(interval("false"), None);
    for bad in ["\"10s\"", "\"721h\"", "\"never\"", "true", "3"] {
        let errors = with(bad).expect_err(bad);
        assert!(
            errors.len() == 1 && errors[0].starts_with("audit.full_verify_interval: "),
            "{bad}: {errors:?}"
        );
    }
}
