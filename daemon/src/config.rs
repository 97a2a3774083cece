//! The daemon's configuration: `/etc/airgate/airgate.toml`.
//!
//! Parsing walks the TOML tree by hand instead of through serde so that every
//! error is collected, each with its key path (`limits.max_body_bytes: ...`),
//! and unknown keys are refused: an operator fixing a config should see all of
//! its problems at once, not one per restart. This module only parses and
//! validates; it binds nothing and creates nothing.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::SocketAddr;

use toml::Value;

/// A validated configuration. Everything past [`Config::parse`] can rely on it.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, for reloads and for status.
    pub source: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub models_dir: PathBuf,
    /// How often the state directory is probed (free space, responsiveness).
    pub state_probe_interval: Duration,
    /// Free space below which the state probe warns: the audit log lives there.
    pub state_min_free_bytes: u64,
    pub shutdown_grace: Duration,
    pub unix: UnixListenerConfig,
    /// The mutual-TLS listener for the enclave network, if configured.
    pub tls: Option<TlsListenerConfig>,
    pub admin: AdminConfig,
    pub limits: Limits,
    pub log: LogConfig,
    pub trust: TrustConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub llm: LlmConfig,
    pub usage: UsageConfig,
    pub onnx: OnnxConfig,
}

/// `[onnx]`: how ONNX models are run (tract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxConfig {
    /// Inferences run at once per model (blocking threads).
    pub workers: u32,
    /// Requests waiting for a worker per model; more get 503.
    pub queue: u32,
    /// Largest input tensor accepted, in elements.
    pub max_tensor_elements: u64,
    /// Most tokens one text request (embeddings, a guard's prompt) may run:
    /// batch × padded sequence; more get 413.
    pub max_batch_tokens: u64,
    /// Most activation memory one run may be estimated to hold, bytes
    /// (tract's plan at its busiest step); more get 413.
    pub max_run_bytes: u64,
}

impl Default for OnnxConfig {
    fn default() -> Self {
        Self {
            workers: u32::try_from(
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            )
            .unwrap_or(1),
            queue: 16,
            max_tensor_elements: 16 << 20,
            max_batch_tokens: crate::onnx::DEFAULT_MAX_BATCH_TOKENS,
            max_run_bytes: crate::onnx::DEFAULT_MAX_RUN_BYTES,
        }
    }
}

/// `[usage]`: the admission counters derived from the audit log.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageConfig {
    /// Fractions of a user cap or licence threshold at which a warning is
    /// recorded (once per period each).
    pub warn_at: Vec<f64>,
    /// Months of per-period counts kept (the current one included).
    pub retention_months: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            warn_at: vec![0.8, 0.95],
            retention_months: 25,
        }
    }
}

/// `[llm]`: how GGUF language models are served (llama.cpp).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmConfig {
    /// Sequences decoded together per model (continuous batching).
    pub slots: u32,
    /// Context window of each slot, tokens (prompt plus completion).
    pub context: u32,
    /// Decoding threads per model; 0: one per CPU core.
    pub threads: u32,
    /// Most tokens decoded in one step (prompt chunks plus one per generating slot).
    pub batch: u32,
    /// Requests waiting for a slot, per model; more get 503.
    pub queue: u32,
    /// Memory all models together may take (weights plus KV cache), bytes.
    /// `None`: 80% of the host's memory.
    pub memory_budget: Option<u64>,
    /// Keep a finished sequence's KV cache in its slot, so the same
    /// tenant's next prompt sharing its start skips decoding that part.
    pub prompt_cache: bool,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            slots: 4,
            context: 2048,
            threads: 0,
            batch: 512,
            queue: 64,
            memory_budget: None,
            prompt_cache: true,
        }
    }
}

/// `[audit]`: the tamper-evident log in `STATE/audit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// Written when a store is created, outside the state directory, so a
    /// wiped store is noticed; the bundle rollback floor is kept beside it
    /// (`bundle::FLOOR_COPY`). `None` turns both off.
    pub marker: Option<PathBuf>,
    /// sled's page cache (its default is 1 GiB).
    pub cache_bytes: u64,
    /// A signed checkpoint after this many records ...
    pub checkpoint_every: u64,
    /// ... or this long, whichever comes first (only once records arrive).
    pub checkpoint_interval: Duration,
    /// A user-hashing secret shared by a fleet (32 bytes), so distinct-user
    /// counts from several hosts merge; else one is made per host.
    pub user_secret: Option<PathBuf>,
    /// Every record to the journal too (journald rate-limits: off by default).
    pub journal_all: bool,
    /// Serve even when a decision record cannot be made durable. Off by
    /// default; recorded in the log itself when on.
    pub fail_open: bool,
    /// Records older than this many days are pruned behind a checkpoint.
    pub retention_days: Option<u64>,
    /// How often the whole chain is walked in the background (and at
    /// start), history before the last checkpoint included; `None`: only
    /// on SIGUSR1.
    pub full_verify_interval: Option<Duration>,
}

/// `audit.full_verify_interval` unless set.
pub const DEFAULT_FULL_VERIFY_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Where the audit store's creation is remembered: systemd's second
/// StateDirectory=, outside `state_dir`.
pub const DEFAULT_MARKER: &str = "/var/lib/airgate-marker/audit-store";

/// Where signed bundles come from and how their life is weighed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The site or host group this host is; a bundle for another audience is refused.
    /// Without it no bundle can be accepted.
    pub audience: Option<String>,
    /// Bundle files dropped here (removable media, internal file sync) are picked up.
    pub inbox: PathBuf,
    pub poll_interval: Duration,
    /// How long an expired bundle keeps being enforced (with warnings) before
    /// the daemon fails closed. Counted from the bundle's `exp`.
    pub expiry_grace: Duration,
    /// An internal HTTPS mirror polled for the current bundle, if any.
    pub mirror: Option<MirrorConfig>,
}

/// `[policy.mirror]`: where the current bundle is published on the site
/// network, and the TLS settings of that connection alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    pub url: http::Uri,
    pub interval: Duration,
    pub timeout: Duration,
    /// CA certificates the mirror's server certificate must chain to.
    pub ca: PathBuf,
    /// A client certificate and key for mirrors that require mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixListenerConfig {
    pub path: PathBuf,
    /// File mode of the socket node (permission bits only).
    pub mode: u32,
    /// Group owning the socket node; `None` keeps the daemon's group.
    pub group: Option<u32>,
    /// The name systemd passes in LISTEN_FDNAMES for this socket (FileDescriptorName=).
    pub fd_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsListenerConfig {
    pub address: SocketAddr,
    /// Server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Server private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM), checked for the whole chain.
    pub crls: Vec<PathBuf>,
    pub expired_crl: ExpiredCrl,
    pub handshake_timeout: Duration,
    /// The name systemd passes in LISTEN_FDNAMES for this socket.
    pub fd_name: String,
}

/// What to do when a CRL's nextUpdate has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpiredCrl {
    /// Refuse clients whose revocation status rests on the stale CRL.
    Refuse,
    /// Keep using it, with a warning in the log and in /admin/status.
    Warn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Members of these groups (primary or supplementary) are operators, as is uid 0.
    pub groups: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// A body's bytes must arrive within this, plus the time each byte
    /// received buys at `min_upload_bytes_per_sec`: a request that declares
    /// a body and sends none cannot hold its connection past it.
    pub body_read_timeout: Duration,
    pub min_upload_bytes_per_sec: u64,
    /// Bytes that all request bodies together may hold at once, as received
    /// and (JSON) as parsed; bodies over it are refused, not queued.
    pub max_buffered_body_bytes: u64,
    pub idle_timeout: Duration,
    /// Connection slots per listener: a flood on one (the network) cannot
    /// take the slots of the other (local tenants and operators).
    pub max_connections_unix: usize,
    pub max_connections_tls: usize,
    /// Slots on the Unix socket beyond `max_connections_unix` that only
    /// operators may take, so a socket full of tenants still lets one in.
    pub operator_reserve: usize,
    pub http2_max_concurrent_streams: u32,
    pub http2_max_pending_accept_reset_streams: usize,
    pub http2_max_local_error_reset_streams: usize,
}

/// The body budget when none is configured: room for a few of the largest
/// JSON bodies, and never less than one.
fn default_buffered_body_bytes(max_body_bytes: u64) -> u64 {
    (256_u64 << 20).max(max_body_bytes.saturating_mul(crate::body::JSON_CHARGE))
}

impl Default for Limits {
    fn default() -> Self {
        let max_body_bytes = 4 * 1024 * 1024;
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            max_body_bytes,
            body_read_timeout: Duration::from_secs(30),
            min_upload_bytes_per_sec: 64 * 1024,
            max_buffered_body_bytes: default_buffered_body_bytes(max_body_bytes),
            idle_timeout: Duration::from_secs(60),
            max_connections_unix: 1024,
            max_connections_tls: 1024,
            operator_reserve: 8,
            http2_max_concurrent_streams: 64,
            http2_max_pending_accept_reset_streams: 32,
            http2_max_local_error_reset_streams: 256,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// journald when stderr is connected to the journal (JOURNAL_STREAM), stderr otherwise.
    Auto,
    Journald,
    Stderr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub target: LogTarget,
    /// A tracing filter directive, e.g. `info` or `airgate=debug,hyper=warn`.
    pub level: String,
}

/// Trust anchors for signed policy bundles: key id -> public key file
/// (PEM SPKI, Ed25519 or P-256), read and checked at load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustConfig {
    pub anchors: Vec<TrustAnchor>,
}

impl TrustConfig {
    pub fn anchors(&self) -> airgate_policy::bundle::verify::TrustAnchors {
        airgate_policy::bundle::verify::TrustAnchors::new(
            self.anchors.iter().map(|a| a.key.anchor(&a.key_id)),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustAnchor {
    pub key_id: String,
    pub public_key: PathBuf,
    pub key: crate::keys::PublicKey,
}

/// One problem in a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted key path, e.g. `listen.unix.mode` or `tenants[1].uids[0]`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} error(s) in {}:\n{}", .errors.len(), .origin, list(.errors))]
    Invalid {
        origin: String,
        errors: Vec<FieldError>,
    },
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string(), &SystemGroups)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Validates configuration text. `origin` names it in error messages;
    /// `groups` resolves group names (the host's group database in production).
    pub fn parse(text: &str, origin: &str, groups: &dyn GroupLookup) -> Result<Self, ConfigError> {
        let invalid = |errors| ConfigError::Invalid {
            origin: origin.to_owned(),
            errors,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            invalid(vec![FieldError {
                path: String::new(),
                message: format!("not valid TOML: {}", e.to_string().trim_end()),
            }])
        })?;
        let mut errors = Vec::new();
        let config = parse_root(&table, &mut errors, groups);
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(invalid(errors)),
        }
    }
}

/// Resolves group names to gids; a trait so tests do not depend on /etc/group.
pub trait GroupLookup {
    fn gid_of(&self, name: &str) -> Result<Option<u32>, String>;
}

/// The host's group database (NSS).
pub struct SystemGroups;

impl GroupLookup for SystemGroups {
    fn gid_of(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.to_string())
    }
}

fn parse_root(
    table: &toml::Table,
    errors: &mut Vec<FieldError>,
    groups: &dyn GroupLookup,
) -> Option<Config> {
    let mut root = Section::new("", table);
    let defaults = Limits::default();
    let state_dir = root.required(errors, "state_dir", absolute_path);
    let models_dir = root.optional(errors, "models_dir", absolute_path);
    let state_probe_interval = root
        .optional(
            errors,
            "state_probe_interval",
            duration_between(Duration::from_millis(100), Duration::from_secs(3600)),
        )
        .unwrap_or(Duration::from_secs(10));
    let state_min_free_bytes = root
        .optional(errors, "state_min_free_bytes", integer_between(0, u64::MAX))
        .unwrap_or(1 << 30);
    let shutdown_grace = root
        .optional(
            errors,
            "shutdown_grace",
            duration_between(Duration::from_millis(0), Duration::from_secs(3600)),
        )
        .unwrap_or(Duration::from_secs(30));

    let listeners = root.section(errors, "listen", true).and_then(|mut listen| {
        let unix = listen.section(errors, "unix", true).and_then(|mut unix| {
            let path = unix.required(errors, "path", absolute_path);
            let mode = unix.optional(errors, "mode", file_mode).unwrap_or(0o660);
            let group = unix.optional(errors, "group", |v| group_ref(v, groups));
            let fd_name = unix
                .optional(errors, "fd_name", fd_name)
                .unwrap_or_else(|| "unix".to_owned());
            unix.finish(errors);
            Some(UnixListenerConfig {
                path: path?,
                mode,
                group,
                fd_name,
            })
        });
        let tls = listen.section(errors, "tls", false).map(|mut tls| {
            let parsed = parse_tls(&mut tls, errors);
            tls.finish(errors);
            parsed
        });
        listen.finish(errors);
        unix.map(|u| (u, tls.flatten()))
    });

    let admin = match root.section(errors, "admin", false) {
        Some(mut admin) => {
            let groups = admin
                .optional(errors, "groups", |v| array_of(v, |v| group_ref(v, groups)))
                .unwrap_or_default();
            admin.finish(errors);
            AdminConfig { groups }
        }
        None => AdminConfig { groups: Vec::new() },
    };

    let limits = match root.section(errors, "limits", false) {
        Some(mut s) => {
            // The key from before budgets were per listener: both budgets,
            // unless a listener's own key is set.
            let both = s
                .optional(errors, "max_connections", integer_between(1, 1 << 20))
                .map(to_usize);
            let connections = |s: &mut Section<'_>, errors: &mut Vec<FieldError>, key, default| {
                s.optional(errors, key, integer_between(1, 1 << 20))
                    .map(to_usize)
                    .or(both)
                    .unwrap_or(default)
            };
            let max_body_bytes = s
                .optional(errors, "max_body_bytes", integer_between(1, 1 << 34))
                .unwrap_or(defaults.max_body_bytes);
            let max_buffered_body_bytes = match s.optional(
                errors,
                "max_buffered_body_bytes",
                integer_between(1 << 20, 1 << 40),
            ) {
                Some(budget) => {
                    // One body of the largest size must fit, parsed, or it
                    // could never be served.
                    let least = max_body_bytes.saturating_mul(crate::body::JSON_CHARGE);
                    if budget < least {
                        errors.push(FieldError {
                            path: s.key_path("max_buffered_body_bytes"),
                            message: format!(
                                "{budget} is less than one largest JSON body takes parsed ({} x limits.max_body_bytes = {least})",
                                crate::body::JSON_CHARGE
                            ),
                        });
                    }
                    budget
                }
                None => default_buffered_body_bytes(max_body_bytes),
            };
            let l = Limits {
                header_read_timeout: s
                    .optional(
                        errors,
                        "header_read_timeout",
                        duration_between(Duration::from_millis(100), Duration::from_secs(600)),
                    )
                    .unwrap_or(defaults.header_read_timeout),
                max_headers: s
                    .optional(errors, "max_headers", integer_between(1, 1024))
                    .map_or(defaults.max_headers, to_usize),
                max_header_bytes: s
                    .optional(errors, "max_header_bytes", integer_between(8192, 1 << 20))
                    .map_or(defaults.max_header_bytes, to_usize),
                max_body_bytes,
                body_read_timeout: s
                    .optional(
                        errors,
                        "body_read_timeout",
                        duration_between(Duration::from_millis(100), Duration::from_secs(3600)),
                    )
                    .unwrap_or(defaults.body_read_timeout),
                min_upload_bytes_per_sec: s
                    .optional(
                        errors,
                        "min_upload_bytes_per_sec",
                        integer_between(1, 1 << 30),
                    )
                    .unwrap_or(defaults.min_upload_bytes_per_sec),
                max_buffered_body_bytes,
                idle_timeout: s
                    .optional(
                        errors,
                        "idle_timeout",
                        duration_between(Duration::from_millis(100), Duration::from_secs(86400)),
                    )
                    .unwrap_or(defaults.idle_timeout),
                max_connections_unix: connections(
                    &mut s,
                    errors,
                    "max_connections_unix",
                    defaults.max_connections_unix,
                ),
                max_connections_tls: connections(
                    &mut s,
                    errors,
                    "max_connections_tls",
                    defaults.max_connections_tls,
                ),
                operator_reserve: s
                    .optional(errors, "operator_reserve", integer_between(0, 1024))
                    .map_or(defaults.operator_reserve, to_usize),
                http2_max_concurrent_streams: s
                    .optional(
                        errors,
                        "http2_max_concurrent_streams",
                        integer_between(1, 10_000),
                    )
                    .map_or(defaults.http2_max_concurrent_streams, |v| {
                        u32::try_from(v).unwrap_or(u32::MAX)
                    }),
                http2_max_pending_accept_reset_streams: s
                    .optional(
                        errors,
                        "http2_max_pending_accept_reset_streams",
                        integer_between(1, 10_000),
                    )
                    .map_or(defaults.http2_max_pending_accept_reset_streams, to_usize),
                http2_max_local_error_reset_streams: s
                    .optional(
                        errors,
                        "http2_max_local_error_reset_streams",
                        integer_between(1, 100_000),
                    )
                    .map_or(defaults.http2_max_local_error_reset_streams, to_usize),
            };
            s.finish(errors);
            l
        }
        None => defaults,
    };

    let log = match root.section(errors, "log", false) {
        Some(mut s) => {
            let target = s
                .optional(errors, "target", log_target)
                .unwrap_or(LogTarget::Auto);
            let level = s
                .optional(errors, "level", log_level)
                .unwrap_or_else(|| "info".to_owned());
            s.finish(errors);
            LogConfig { target, level }
        }
        None => LogConfig {
            target: LogTarget::Auto,
            level: "info".to_owned(),
        },
    };

    let trust = match root.section(errors, "trust", false) {
        Some(mut s) => {
            let anchors = s
                .optional_with_path(errors, "anchors", |v, path, errors| {
                    tables_of(v, path, errors, parse_anchor)
                })
                .unwrap_or_default();
            let mut seen = BTreeSet::new();
            for (i, anchor) in anchors.iter().enumerate() {
                if !seen.insert(anchor.key_id.clone()) {
                    errors.push(FieldError {
                        path: format!("trust.anchors[{i}].key_id"),
                        message: format!("duplicate key id {:?}", anchor.key_id),
                    });
                }
            }
            s.finish(errors);
            TrustConfig { anchors }
        }
        None => TrustConfig::default(),
    };

    let policy = {
        let section = root.section(errors, "policy", false);
        let mut policy = PolicyConfig {
            audience: None,
            inbox: PathBuf::new(),
            poll_interval: Duration::from_secs(5),
            expiry_grace: Duration::from_secs(72 * 3600),
            mirror: None,
        };
        let mut inbox = None;
        if let Some(mut s) = section {
            policy.audience = s.optional(errors, "audience", |v| {
                let a = string(v)?;
                if a.is_empty() || a.len() > 128 || a.chars().any(char::is_control) {
                    return Err("expected 1 to 128 printable characters".to_owned());
                }
                Ok(a.to_owned())
            });
            inbox = s.optional(errors, "inbox", absolute_path);
            policy.mirror = s.section(errors, "mirror", false).and_then(|mut m| {
                let parsed = parse_mirror(&mut m, errors);
                m.finish(errors);
                parsed
            });
            if let Some(d) = s.optional(
                errors,
                "poll_interval",
                duration_between(Duration::from_millis(100), Duration::from_secs(86400)),
            ) {
                policy.poll_interval = d;
            }
            if let Some(d) = s.optional(
                errors,
                "expiry_grace",
                duration_between(Duration::ZERO, Duration::from_secs(90 * 86400)),
            ) {
                policy.expiry_grace = d;
            }
            s.finish(errors);
        }
        (policy, inbox)
    };

    let audit = match root.section(errors, "audit", false) {
        Some(mut s) => {
            let marker = s.optional(errors, "marker", |v| match v {
                Value::Boolean(false) => Ok(None),
                other => absolute_path(other).map(Some),
            });
            let cache_bytes = s
                .optional(errors, "cache_bytes", integer_between(1 << 20, 1 << 36))
                .unwrap_or(64 << 20);
            let checkpoint_every = s
                .optional(errors, "checkpoint_every", integer_between(1, 1 << 32))
                .unwrap_or(1000);
            let checkpoint_interval = s
                .optional(
                    errors,
                    "checkpoint_interval",
                    duration_between(Duration::from_secs(1), Duration::from_secs(86400)),
                )
                .unwrap_or(Duration::from_secs(300));
            let user_secret = s.optional(errors, "user_secret", absolute_path);
            let journal_all = s.optional(errors, "journal_all", boolean).unwrap_or(false);
            let fail_open = s.optional(errors, "fail_open", boolean).unwrap_or(false);
            let retention_days =
                s.optional(errors, "retention_days", integer_between(1, 100 * 365));
            let full_verify_interval = s
                .optional(errors, "full_verify_interval", |v| match v {
                    Value::Boolean(false) => Ok(None),
                    Value::String(off) if off == "off" => Ok(None),
                    other => duration_between(
                        Duration::from_secs(60),
                        Duration::from_secs(30 * 86400),
                    )(other)
                    .map(Some)
                    .map_err(|e| format!("{e} (or \"off\")")),
                })
                .unwrap_or(Some(DEFAULT_FULL_VERIFY_INTERVAL));
            s.finish(errors);
            AuditConfig {
                marker: marker.unwrap_or_else(|| Some(PathBuf::from(DEFAULT_MARKER))),
                cache_bytes,
                checkpoint_every,
                checkpoint_interval,
                user_secret,
                journal_all,
                fail_open,
                retention_days,
                full_verify_interval,
            }
        }
        None => AuditConfig {
            marker: Some(PathBuf::from(DEFAULT_MARKER)),
            cache_bytes: 64 << 20,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(300),
            user_secret: None,
            journal_all: false,
            fail_open: false,
            retention_days: None,
            full_verify_interval: Some(DEFAULT_FULL_VERIFY_INTERVAL),
        },
    };
    let llm = match root.section(errors, "llm", false) {
        Some(mut s) => {
            let d = LlmConfig::default();
            let n = |s: &mut Section<'_>, errors: &mut Vec<FieldError>, key, min, max, default| {
                s.optional(errors, key, integer_between(min, max))
                    .map_or(default, |v| u32::try_from(v).unwrap_or(u32::MAX))
            };
            let l = LlmConfig {
                slots: n(&mut s, errors, "slots", 1, 64, d.slots),
                context: n(&mut s, errors, "context", 64, 1 << 20, d.context),
                threads: n(&mut s, errors, "threads", 0, 1024, d.threads),
                batch: n(&mut s, errors, "batch", 16, 1 << 16, d.batch),
                queue: n(&mut s, errors, "queue", 0, 1 << 16, d.queue),
                memory_budget: s.optional(
                    errors,
                    "memory_budget",
                    integer_between(1 << 20, u64::MAX),
                ),
                prompt_cache: s
                    .optional(errors, "prompt_cache", boolean)
                    .unwrap_or(d.prompt_cache),
            };
            s.finish(errors);
            l
        }
        None => LlmConfig::default(),
    };
    let usage = match root.section(errors, "usage", false) {
        Some(mut s) => {
            let d = UsageConfig::default();
            let warn_at = s
                .optional(errors, "warn_at", |v| {
                    array_of(v, |f| match f {
                        Value::Float(x) if *x > 0.0 && *x < 1.0 => Ok(*x),
                        other => Err(format!(
                            "expected a fraction between 0 and 1 (exclusive), found {other}"
                        )),
                    })
                })
                .unwrap_or(d.warn_at);
            let retention_months = s
                .optional(errors, "retention_months", integer_between(2, 1200))
                .map_or(d.retention_months, |v| u32::try_from(v).unwrap_or(u32::MAX));
            s.finish(errors);
            UsageConfig {
                warn_at,
                retention_months,
            }
        }
        None => UsageConfig::default(),
    };
    let onnx = match root.section(errors, "onnx", false) {
        Some(mut s) => {
            let d = OnnxConfig::default();
            let o = OnnxConfig {
                workers: s
                    .optional(errors, "workers", integer_between(1, 1024))
                    .map_or(d.workers, |v| u32::try_from(v).unwrap_or(u32::MAX)),
                queue: s
                    .optional(errors, "queue", integer_between(0, 1 << 16))
                    .map_or(d.queue, |v| u32::try_from(v).unwrap_or(u32::MAX)),
                max_tensor_elements: s
                    .optional(errors, "max_tensor_elements", integer_between(1, 1 << 40))
                    .unwrap_or(d.max_tensor_elements),
                max_batch_tokens: s
                    .optional(errors, "max_batch_tokens", integer_between(1, 1 << 32))
                    .unwrap_or(d.max_batch_tokens),
                max_run_bytes: s
                    .optional(errors, "max_run_bytes", integer_between(1 << 20, 1 << 44))
                    .unwrap_or(d.max_run_bytes),
            };
            s.finish(errors);
            o
        }
        None => OnnxConfig::default(),
    };
    root.finish(errors);
    let state_dir = state_dir?;
    let models_dir = models_dir.unwrap_or_else(|| state_dir.join("models"));
    let (unix, tls) = listeners?;
    let (mut policy, inbox) = policy;
    policy.inbox = inbox.unwrap_or_else(|| state_dir.join("inbox"));
    Some(Config {
        source: None,
        state_dir,
        models_dir,
        state_probe_interval,
        state_min_free_bytes,
        shutdown_grace,
        unix,
        tls,
        admin,
        limits,
        log,
        trust,
        policy,
        audit,
        llm,
        usage,
        onnx,
    })
}

fn parse_tls(s: &mut Section<'_>, errors: &mut Vec<FieldError>) -> Option<TlsListenerConfig> {
    let address = s.required(errors, "address", |v| {
        string(v)?.parse::<SocketAddr>().map_err(|_| {
            format!("expected an address such as \"0.0.0.0:8443\" or \"[::]:8443\", found {v}")
        })
    });
    let cert = s.required(errors, "cert", absolute_path);
    let key = s.required(errors, "key", absolute_path);
    let client_ca = s.required(errors, "client_ca", absolute_path);
    let crls = s
        .optional(errors, "crls", |v| array_of(v, absolute_path))
        .unwrap_or_default();
    let expired_crl = s
        .optional(errors, "expired_crl", |v| match string(v)? {
            "refuse" => Ok(ExpiredCrl::Refuse),
            "warn" => Ok(ExpiredCrl::Warn),
            other => Err(format!("expected \"refuse\" or \"warn\", found {other:?}")),
        })
        .unwrap_or(ExpiredCrl::Refuse);
    let handshake_timeout = s
        .optional(
            errors,
            "handshake_timeout",
            duration_between(Duration::from_millis(100), Duration::from_secs(300)),
        )
        .unwrap_or(Duration::from_secs(10));
    let fd_name = s
        .optional(errors, "fd_name", fd_name)
        .unwrap_or_else(|| "tls".to_owned());
    Some(TlsListenerConfig {
        address: address?,
        cert: cert?,
        key: key?,
        client_ca: client_ca?,
        crls,
        expired_crl,
        handshake_timeout,
        fd_name,
    })
}

fn parse_mirror(s: &mut Section<'_>, errors: &mut Vec<FieldError>) -> Option<MirrorConfig> {
    let url = s.required(errors, "url", |v| {
        let text = string(v)?;
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("not a URL ({e}): {text:?}"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(format!(
                "expected an https:// URL with a host, found {text:?}"
            ));
        }
        Ok(uri)
    });
    let interval = s
        .optional(
            errors,
            "interval",
            duration_between(Duration::from_millis(100), Duration::from_secs(7 * 86400)),
        )
        .unwrap_or(Duration::from_secs(300));
    let timeout = s
        .optional(
            errors,
            "timeout",
            duration_between(Duration::from_millis(100), Duration::from_secs(600)),
        )
        .unwrap_or(Duration::from_secs(30));
    let ca = s.required(errors, "ca", absolute_path);
    let cert = s.optional(errors, "cert", absolute_path);
    let key = s.optional(errors, "key", absolute_path);
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            errors.push(FieldError {
                path: s.path.clone(),
                message: "cert and key go together".to_owned(),
            });
            None
        }
    };
    Some(MirrorConfig {
        url: url?,
        interval,
        timeout,
        ca: ca?,
        client_cert,
    })
}

fn parse_anchor(s: &mut Section<'_>, errors: &mut Vec<FieldError>) -> Option<TrustAnchor> {
    let key_id = s.required(errors, "key_id", |v| {
        let id = string(v)?;
        if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
            return Err("expected 1 to 128 printable characters".to_owned());
        }
        Ok(id.to_owned())
    });
    let public_key = s.required(errors, "public_key", |v| {
        let path = absolute_path(v)?;
        let key = crate::keys::read_public_key(&path).map_err(|e| e.to_string())?;
        Ok((path, key))
    });
    let (public_key, key) = public_key?;
    Some(TrustAnchor {
        key_id: key_id?,
        public_key,
        key,
    })
}

/// A table being read: remembers which keys were consumed so the rest can be
/// reported as unknown.
struct Section<'t> {
    path: String,
    table: &'t toml::Table,
    seen: BTreeSet<&'t str>,
}

impl<'t> Section<'t> {
    fn new(path: &str, table: &'t toml::Table) -> Self {
        Self {
            path: path.to_owned(),
            table,
            seen: BTreeSet::new(),
        }
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn take(&mut self, key: &str) -> Option<&'t Value> {
        let (k, v) = self.table.get_key_value(key)?;
        self.seen.insert(k.as_str());
        Some(v)
    }

    fn optional_with_path<T>(
        &mut self,
        errors: &mut Vec<FieldError>,
        key: &str,
        parse: impl FnOnce(&'t Value, &str, &mut Vec<FieldError>) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.take(key)?;
        let path = self.key_path(key);
        match parse(value, &path, errors) {
            Ok(v) => Some(v),
            Err(message) => {
                errors.push(FieldError { path, message });
                None
            }
        }
    }

    fn optional<T>(
        &mut self,
        errors: &mut Vec<FieldError>,
        key: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        self.optional_with_path(errors, key, |v, _, _| parse(v))
    }

    fn required<T>(
        &mut self,
        errors: &mut Vec<FieldError>,
        key: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        if !self.table.contains_key(key) {
            errors.push(FieldError {
                path: self.key_path(key),
                message: "required key is missing".to_owned(),
            });
            return None;
        }
        self.optional(errors, key, parse)
    }

    fn section(
        &mut self,
        errors: &mut Vec<FieldError>,
        key: &str,
        required: bool,
    ) -> Option<Section<'t>> {
        let path = self.key_path(key);
        match self.take(key) {
            Some(Value::Table(t)) => Some(Section::new(&path, t)),
            Some(other) => {
                errors.push(FieldError {
                    path,
                    message: format!("expected a table, found {}", other.type_str()),
                });
                None
            }
            None if required => {
                errors.push(FieldError {
                    path,
                    message: "required table is missing".to_owned(),
                });
                None
            }
            None => None,
        }
    }

    fn finish(self, errors: &mut Vec<FieldError>) {
        for key in self.table.keys() {
            if !self.seen.contains(key.as_str()) {
                errors.push(FieldError {
                    path: self.key_path(key),
                    message: "unknown key".to_owned(),
                });
            }
        }
    }
}

fn tables_of<T>(
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
    parse: impl Fn(&mut Section<'_>, &mut Vec<FieldError>) -> Option<T>,
) -> Result<Vec<T>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "expected an array of tables, found {}",
            value.type_str()
        ));
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Value::Table(t) = item else {
            errors.push(FieldError {
                path: item_path,
                message: format!("expected a table, found {}", item.type_str()),
            });
            continue;
        };
        let mut section = Section::new(&item_path, t);
        let parsed = parse(&mut section, errors);
        section.finish(errors);
        out.extend(parsed);
    }
    Ok(out)
}

fn array_of<T>(
    value: &Value,
    parse: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array, found {}", value.type_str()));
    };
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match parse(item) {
            Ok(v) => out.push(v),
            Err(e) => problems.push(format!("[{i}] {e}")),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

fn boolean(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", value.type_str()))
}

fn string(value: &Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected a string, found {}", value.type_str()))
}

fn absolute_path(value: &Value) -> Result<PathBuf, String> {
    let s = string(value)?;
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("expected an absolute path, found {s:?}"));
    }
    Ok(path)
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn integer_between(min: u64, max: u64) -> impl Fn(&Value) -> Result<u64, String> {
    move |value| {
        let Value::Integer(i) = value else {
            return Err(format!("expected an integer, found {}", value.type_str()));
        };
        match u64::try_from(*i) {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(format!("{i} is out of range {min}..={max}")),
        }
    }
}

fn id_number(value: &Value) -> Result<u32, String> {
    integer_between(0, u64::from(u32::MAX - 1))(value).map(|v| u32::try_from(v).unwrap_or(0))
}

/// Durations are strings with a unit: "500ms", "10s", "5m", "1h".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err =
        || format!("expected a duration such as \"500ms\", \"10s\", \"5m\" or \"1h\", found {s:?}");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(err)?;
    Ok(Duration::from_millis(ms))
}

fn duration_between(min: Duration, max: Duration) -> impl Fn(&Value) -> Result<Duration, String> {
    move |value| {
        let d = parse_duration(string(value)?)?;
        if d < min || d > max {
            return Err(format!(
                "{} is out of range {}..={}",
                string(value)?,
                show_duration(min),
                show_duration(max)
            ));
        }
        Ok(d)
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn file_mode(value: &Value) -> Result<u32, String> {
    let s = string(value)
        .map_err(|_| "expected an octal mode as a string, e.g. \"0660\"".to_owned())?;
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("expected an octal mode such as \"0660\", found {s:?}"))?;
    if mode > 0o777 {
        return Err(format!("{s:?} has bits beyond 0777"));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "{s:?} must let the owner read and write (0600 at least)"
        ));
    }
    if mode & 0o002 != 0 {
        return Err(format!(
            "{s:?} lets every local user connect; grant access with a group instead"
        ));
    }
    Ok(mode)
}

fn group_ref(value: &Value, groups: &dyn GroupLookup) -> Result<u32, String> {
    match value {
        Value::Integer(_) => id_number(value),
        Value::String(name) => match groups.gid_of(name) {
            Ok(Some(gid)) => Ok(gid),
            Ok(None) => Err(format!("no such group {name:?}")),
            Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
        },
        other => Err(format!(
            "expected a group name or gid, found {}",
            other.type_str()
        )),
    }
}

fn fd_name(value: &Value) -> Result<String, String> {
    let s = string(value)?;
    // systemd's rule for FileDescriptorName=: at most 255 printable ASCII characters, no colon.
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(format!("{s:?} is not a valid systemd file descriptor name"));
    }
    Ok(s.to_owned())
}

fn log_target(value: &Value) -> Result<LogTarget, String> {
    match string(value)? {
        "auto" => Ok(LogTarget::Auto),
        "journald" => Ok(LogTarget::Journald),
        "stderr" => Ok(LogTarget::Stderr),
        other => Err(format!(
            "expected \"auto\", \"journald\" or \"stderr\", found {other:?}"
        )),
    }
}

fn log_level(value: &Value) -> Result<String, String> {
    let s = string(value)?;
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map_err(|e| format!("not a valid log filter {s:?}: {e}"))?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests;
