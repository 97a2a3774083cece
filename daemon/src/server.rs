//! The server: shared state, the accept loop, background workers, reload and
//! the drain on shutdown.
//!
//! `Daemon::run(listeners, shutdown)` takes its sockets and its shutdown
//! trigger from the caller, so tests and `serve` drive it the same way.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airgate_policy::identity::Identity;
use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use airgate_policy::audit::Event;

use crate::audit::{Audit, AuditError, OpenOptions};
use crate::bundle::{Offered, Policy};
use crate::config::{Config, ConfigError};
use crate::connection::{self, Conn, Refusal};
use crate::failpoint::Failpoints;
use crate::gate::UserHasher;
use crate::heartbeat::{Heartbeat, Worker};
use crate::listener::{ListenerInfo, Listeners, TcpSocket, UnixSocket};
use crate::logging::LogHandle;
use crate::metrics::{ListenerLabels, Metrics, ResultLabels};
use crate::systemd::{self, Notifier};
use crate::tls::{TlsError, TlsState};

/// State every task shares.
pub struct Shared {
    config: ArcSwap<Config>,
    pub policy: Policy,
    /// Admission counters, derived from the audit log (see `usage`).
    pub admission: Arc<crate::usage::Usage>,
    usage_opened: crate::usage::Opened,
    pub users: UserHasher,
    /// Recorded denials of unknown callers, per principal (crate::denials).
    pub denials: crate::denials::DenialLimiter,
    pub audit: Audit,
    audit_opened: crate::audit::Opened,
    /// The GGUF models loaded for the bundle in force.
    pub models: crate::llm::Models,
    /// Wakes the bundle poller (SIGHUP re-reads the inbox).
    rescan: tokio::sync::Notify,
    /// Starts a full walk of the audit chain now (SIGUSR1).
    verify_now: tokio::sync::Notify,
    /// The last full walk of the audit chain, for status and `/readyz`.
    full_verify: Mutex<Option<FullVerify>>,
    /// Request tasks that may outlive their connection (a decision made
    /// durable, a stream's feeder): their records land before the shutdown
    /// record, which the writer takes last.
    pub detached: TaskTracker,
    /// The last poll of the bundle mirror, for status.
    mirror_status: Mutex<Option<serde_json::Value>>,
    /// The TLS material in use; swapped whole on reload.
    tls: ArcSwapOption<TlsState>,
    pub metrics: Metrics,
    /// Bytes all request bodies may hold at once (`limits.max_buffered_body_bytes`).
    pub bodies: crate::body::BodyBudget,
    pub heartbeat: Heartbeat,
    notifier: Notifier,
    log: Option<LogHandle>,
    pub failpoints: Failpoints,
    started: Instant,
    started_unix: u64,
    watchdog: Option<Duration>,
    listeners: Mutex<Vec<ListenerInfo>>,
    last_reload: Mutex<Option<ReloadRecord>>,
    state_probe: Mutex<Option<StateProbe>>,
    /// Settings changed by a reload that only a restart applies.
    pending_restart: Mutex<Vec<&'static str>>,
    conn_ids: AtomicU64,
}

#[derive(Clone, Debug, Serialize)]
struct ReloadRecord {
    at_unix: u64,
    ok: bool,
    message: String,
}

/// What the last full walk of the audit chain found (`run_full_verify`).
#[derive(Clone, Debug, Serialize)]
struct FullVerify {
    at_unix: u64,
    duration_ms: u64,
    /// `ok`, `broken` (the chain does not verify) or `error` (it could not
    /// be read to the end, e.g. while the store is reopened).
    result: &'static str,
    /// `ok`: the records verified; else the log's length when the walk began.
    records: u64,
    first_bad_seq: Option<u64>,
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct StateProbe {
    at_unix: u64,
    free_bytes: Option<u64>,
    writable: bool,
    error: Option<String>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Operators are uid 0 and members (primary or supplementary) of an admin
    /// group, on the local socket only: the network never reaches operator routes.
    pub fn is_operator(&self, identity: &Identity) -> bool {
        match identity {
            Identity::Unix(peer) => {
                peer.uid == 0 || self.config().admin.groups.iter().any(|g| peer.in_group(*g))
            }
            Identity::Tls(_) => false,
        }
    }

    /// Why inference is not being served (empty when it is), and warnings
    /// that do not stop it (a bundle in its grace period, a clock behind).
    pub fn health(&self) -> (Vec<String>, Vec<String>) {
        let (mut reasons, mut warnings) = self.policy.health(&self.config());
        if let Some(e) = self.audit.state().degraded {
            reasons.push(format!("audit store cannot write: {e}"));
        }
        if let Some(previous) = &self.audit_opened.previous_store {
            warnings.push(format!(
                "the audit store was missing and has been recreated (marker: {previous})"
            ));
        }
        if let Some(v) = self
            .full_verify
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|v| v.result == "broken")
        {
            warnings.push(format!(
                "the audit chain does not verify (full verification at {}): {}",
                crate::report::rfc3339(i64::try_from(v.at_unix).unwrap_or(i64::MAX)),
                v.error.as_deref().unwrap_or("")
            ));
        }
        if let Some(a) = &self.usage_opened.ahead_of_log {
            warnings.push(format!(
                "the usage counters had counted audit records {} to {} that the log no longer has (truncated after its last checkpoint?); they were rebuilt from the log ({} count(s) changed)",
                a.log_records,
                a.fold_next - 1,
                a.differences.len()
            ));
        }
        let models = self.models.states();
        if self.models.ready_count() == 0 {
            reasons.push("no models loaded".to_owned());
        }
        for (id, state) in &models {
            match state {
                crate::llm::ModelState::Refused { reason } => {
                    warnings.push(format!("model {id} not loaded: {reason}"));
                }
                crate::llm::ModelState::Checking { .. } | crate::llm::ModelState::Loading => {
                    warnings.push(format!("model {id} is loading"));
                }
                crate::llm::ModelState::Ready { .. } => {}
            }
        }
        let probe = self
            .state_probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = probe.as_ref().and_then(|p| p.error.as_ref()) {
            reasons.push(format!("state directory: {e}"));
        }
        (reasons, warnings)
    }

    fn status_line(&self) -> String {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let listening = listeners
            .iter()
            .map(|l| format!("{}:{}", l.kind, l.address))
            .collect::<Vec<_>>()
            .join(", ");
        let (reasons, warnings) = self.health();
        let bundle = self.policy.active().map_or_else(
            || "no bundle".to_owned(),
            |a| format!("bundle v{}", a.version()),
        );
        let mut line = if reasons.is_empty() {
            format!("serving on {listening}; {bundle}")
        } else {
            format!(
                "listening on {listening}; {bundle}; not serving inference: {}",
                reasons.join("; ")
            )
        };
        if !warnings.is_empty() {
            line.push_str("; WARNING: ");
            line.push_str(&warnings.join("; "));
        }
        line
    }

    /// The document behind `GET /admin/status` and `airgate status`.
    pub fn status(&self) -> serde_json::Value {
        let config = self.config();
        let (reasons, warnings) = self.health();
        let active: i64 = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|l| {
                self.metrics
                    .connections_active
                    .get_or_create(&ListenerLabels {
                        listener: l.name.clone(),
                    })
                    .get()
            })
            .sum();
        let active_failpoints = self
            .failpoints
            .any()
            .then(|| format!("{:?}", self.failpoints));
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_at_unix": self.started_unix,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "config_file": config.source.as_ref().map(|p| p.display().to_string()),
            "ready": reasons.is_empty(),
            "not_ready_reasons": reasons,
            "warnings": warnings,
            "models": self.models.states(),
            "engines": self.models.engines(),
            "listeners": *self.listeners.lock().unwrap_or_else(PoisonError::into_inner),
            "connections": {
                "active": active,
                "max": config.limits.max_connections_unix
                    + config.limits.operator_reserve
                    + config.tls.as_ref().map_or(0, |_| config.limits.max_connections_tls),
                "max_unix": config.limits.max_connections_unix,
                "operator_reserve": config.limits.operator_reserve,
                "max_tls": config.tls.as_ref().map(|_| config.limits.max_connections_tls),
            },
            "request_bodies": {
                "budget_bytes": self.bodies.bytes(),
                "in_use_bytes": self.bodies.in_use(),
            },
            "bundle": self.policy.status(&config),
            "audit": {
                "opened": self.audit_opened,
                "writer": self.audit.state(),
                "full_verify": *self.full_verify.lock().unwrap_or_else(PoisonError::into_inner),
            },
            "bundle_mirror": *self.mirror_status.lock().unwrap_or_else(PoisonError::into_inner),
            "usage": {"opened": self.usage_opened},
            "workers": self.heartbeat.check(),
            "watchdog": {
                "enabled": self.watchdog.is_some(),
                "period_ms": self.watchdog.map(|d| d.as_millis() as u64),
                "healthy": self.heartbeat.healthy(),
            },
            "tls": self.tls.load().as_ref().map(|t| &t.info),
            "state_dir": {
                "path": config.state_dir.display().to_string(),
                "last_probe": *self.state_probe.lock().unwrap_or_else(PoisonError::into_inner),
            },
            "last_reload": *self.last_reload.lock().unwrap_or_else(PoisonError::into_inner),
            "pending_restart": *self.pending_restart.lock().unwrap_or_else(PoisonError::into_inner),
            "failpoints": active_failpoints,
        })
    }
}

/// A configuration and the TLS material it names, both fully validated.
pub struct Prepared {
    pub config: Config,
    pub tls: Option<TlsState>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listen.tls: {0}")]
    Tls(#[from] TlsError),
}

/// Reads the configuration file and loads what it names. Blocking (file I/O).
pub fn prepare(path: &Path) -> Result<Prepared, PrepareError> {
    Ok(Prepared::with_tls(Config::load(path)?)?)
}

impl Prepared {
    /// Loads the TLS material a validated configuration names. Blocking (file I/O).
    pub fn with_tls(config: Config) -> Result<Self, TlsError> {
        let tls = config
            .tls
            .as_ref()
            .map(|t| crate::tls::load(t, SystemTime::now()))
            .transpose()?;
        Ok(Self { config, tls })
    }
}

/// The running daemon's handle: clone it to reload from a signal handler.
#[derive(Clone)]
pub struct Daemon {
    shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates the state directory (0700) if it is missing and checks it is a
/// writable directory. systemd's StateDirectory= normally creates it.
pub fn prepare_state_dir(path: &Path) -> Result<(), StateDirError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| StateDirError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
    }
    if !path.is_dir() {
        return Err(err(std::io::Error::other("not a directory")));
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).map_err(|e| err(e.into()))?;
    Ok(())
}

/// What the daemon keeps in its state directory, opened before it serves.
pub struct State {
    pub policy: Policy,
    pub users: UserHasher,
    pub audit: Audit,
    pub audit_opened: crate::audit::Opened,
    pub usage: Arc<crate::usage::Usage>,
    pub usage_opened: crate::usage::Opened,
    pub heartbeat: Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Dir(#[from] StateDirError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl State {
    /// Opens the policy store (restoring and re-verifying the bundle in
    /// force), the user-hashing secret, the host key and the audit store
    /// (verifying its whole chain). Blocking (file I/O).
    pub fn open(config: &Config, accept_broken_audit: bool) -> Result<Self, StateError> {
        let io = |path: PathBuf| move |source| StateDirError::Io { path, source };
        let policy = Policy::open(config).map_err(|e| StateDirError::Io {
            path: config.state_dir.join("policy"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let users = match &config.audit.user_secret {
            // The fleet's secret: read, never created here.
            Some(path) => UserHasher::load(path).map_err(io(path.clone()))?,
            None => {
                let secret = config.state_dir.join("user-hmac.key");
                UserHasher::load_or_create(&secret).map_err(io(secret))?
            }
        };
        let host_pub = config.state_dir.join("host.pub");
        if !host_pub.exists() {
            crate::keys::generate(&config.state_dir, "host").map_err(|e| StateDirError::Io {
                path: host_pub.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let host_key = crate::keys::read_public_key(&host_pub).map_err(|e| StateDirError::Io {
            path: host_pub.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let host_private = crate::keys::read_private_key(&config.state_dir.join("host.key"))
            .map_err(|e| StateDirError::Io {
                path: config.state_dir.join("host.key"),
                source: std::io::Error::other(e.to_string()),
            })?;
        let signer =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&host_private.pkcs8)
                .map_err(|e| StateDirError::Io {
                    path: config.state_dir.join("host.key"),
                    source: std::io::Error::other(format!("not an Ed25519 key: {e}")),
                })?;
        let machine_id = std::fs::read_to_string("/etc/machine-id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let heartbeat = Heartbeat::new();
        let state_dir = config.state_dir.display().to_string();
        let (audit, audit_opened) = Audit::open(
            &config.state_dir.join("audit"),
            OpenOptions {
                cache_bytes: config.audit.cache_bytes,
                marker: config.audit.marker.as_deref(),
                journal_all: config.audit.journal_all,
                accept_broken: accept_broken_audit,
            },
            |previous_store| Event::Genesis {
                host_key_sha256: host_key.fingerprint(),
                machine_id,
                state_dir,
                previous_store,
            },
            Some(crate::audit::CheckpointSigner {
                key: signer,
                key_sha256: host_key.fingerprint(),
                every: config.audit.checkpoint_every,
                interval: config.audit.checkpoint_interval,
            }),
            heartbeat.register("audit-writer", Duration::from_secs(30)),
        )?;
        // The counters are brought in step with the log before serving.
        let (usage, usage_opened) = crate::usage::Usage::open(
            audit.clone(),
            &config.usage,
            policy.now(),
            heartbeat.register("usage-fold", Duration::from_secs(120)),
        )?;
        Ok(Self {
            policy,
            users,
            audit,
            audit_opened,
            usage,
            usage_opened,
            heartbeat,
        })
    }
}

impl Daemon {
    pub fn new(
        prepared: Prepared,
        state: State,
        log: Option<LogHandle>,
        failpoints: Failpoints,
    ) -> Self {
        let Prepared { config, tls } = prepared;
        let State {
            policy,
            users,
            audit,
            audit_opened,
            usage,
            usage_opened,
            heartbeat,
        } = state;
        let metrics = Metrics::new();
        if let Some(tls) = &tls {
            metrics.set_tls(&tls.info);
        }
        let bodies = crate::body::BodyBudget::new(config.limits.max_buffered_body_bytes);
        Self {
            shared: Arc::new(Shared {
                config: ArcSwap::from_pointee(config),
                policy,
                admission: usage,
                usage_opened,
                users,
                denials: crate::denials::DenialLimiter::new(),
                rescan: tokio::sync::Notify::new(),
                verify_now: tokio::sync::Notify::new(),
                full_verify: Mutex::new(None),
                detached: TaskTracker::new(),
                mirror_status: Mutex::new(None),
                tls: ArcSwapOption::from(tls.map(Arc::new)),
                metrics,
                bodies,
                heartbeat,
                audit,
                audit_opened,
                models: crate::llm::Models::new(),
                notifier: Notifier::default(),
                log,
                failpoints,
                started: Instant::now(),
                started_unix: unix_now(),
                watchdog: systemd::watchdog_period(),
                listeners: Mutex::new(Vec::new()),
                last_reload: Mutex::new(None),
                state_probe: Mutex::new(None),
                pending_restart: Mutex::new(Vec::new()),
                conn_ids: AtomicU64::new(0),
            }),
        }
    }

    /// Applies a re-read configuration, or keeps the running one if it is
    /// invalid. Connections stay up either way; settings that need new
    /// sockets or stores are reported as pending a restart.
    pub fn reload(&self, next: Result<Prepared, PrepareError>) {
        let shared = &self.shared;
        shared.notifier.reloading();
        // Recorded after the reload's own record, in this order.
        let mut events = Vec::new();
        let record = match next {
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; keeping the running configuration");
                shared
                    .metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                ReloadRecord {
                    at_unix: unix_now(),
                    ok: false,
                    message: e.to_string(),
                }
            }
            Ok(Prepared { config: next, tls }) => {
                let current = shared.config();
                let mut pending = Vec::new();
                if next.unix != current.unix {
                    pending.push("listen.unix");
                }
                let endpoint = |c: &Config| c.tls.as_ref().map(|t| (t.address, t.fd_name.clone()));
                if endpoint(&next) != endpoint(&current) {
                    pending.push("listen.tls.address");
                }
                // New TLS material applies to new handshakes; established
                // connections keep theirs. Without a TLS listener running
                // there is nothing to apply it to until a restart.
                if let Some(tls) = tls
                    && shared.tls.load().is_some()
                {
                    shared.metrics.set_tls(&tls.info);
                    tracing::info!(
                        serial = %tls.info.server_certificate.serial,
                        not_after = tls.info.server_certificate.not_after,
                        crls = tls.info.crls.len(),
                        "TLS material reloaded"
                    );
                    shared.tls.store(Some(Arc::new(tls)));
                }
                if next.policy.mirror != current.policy.mirror {
                    pending.push("policy.mirror");
                }
                if next.state_dir != current.state_dir {
                    pending.push("state_dir");
                }
                if next.models_dir != current.models_dir {
                    pending.push("models_dir");
                }
                // Budgets are sized once, when the listeners start.
                let l = (&next.limits, &current.limits);
                if l.0.max_connections_unix != l.1.max_connections_unix {
                    pending.push("limits.max_connections_unix");
                }
                if l.0.max_connections_tls != l.1.max_connections_tls {
                    pending.push("limits.max_connections_tls");
                }
                if l.0.operator_reserve != l.1.operator_reserve {
                    pending.push("limits.operator_reserve");
                }
                if l.0.max_buffered_body_bytes != l.1.max_buffered_body_bytes {
                    pending.push("limits.max_buffered_body_bytes");
                }
                if next.state_probe_interval != current.state_probe_interval {
                    pending.push("state_probe_interval");
                }
                if let Some(log) = &shared.log
                    && let Err(e) = log.set_level(&next.log.level)
                {
                    tracing::warn!(error = %e, "cannot apply log.level");
                }
                if next.log.target != current.log.target {
                    pending.push("log.target");
                }
                // Read per request, so it applies at once: every change is
                // a record, off to on and back.
                if next.audit.fail_open != current.audit.fail_open {
                    events.push(fail_open_changed(next.audit.fail_open));
                }
                for key in &pending {
                    tracing::warn!(key, "changed setting takes effect after a restart");
                }
                *shared
                    .pending_restart
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = pending;
                shared.config.store(Arc::new(next));
                // The bundle in force must still verify under the trust
                // anchors and audience now configured, or it stops counting.
                shared.policy.reverify(&shared.config(), &shared.metrics);
                events.extend(shared.policy.take_events());
                shared
                    .metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                tracing::info!("configuration reloaded");
                ReloadRecord {
                    at_unix: unix_now(),
                    ok: true,
                    message: "reloaded".to_owned(),
                }
            }
        };
        shared.audit.record(Event::ConfigReload {
            ok: record.ok,
            message: record.message.clone(),
        });
        for event in events {
            shared.audit.record(event);
        }
        *shared
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(record);
        shared.notifier.reloaded(&shared.status_line());
        // SIGHUP also re-reads the bundle inbox, under the new configuration.
        shared.rescan.notify_one();
    }

    /// Walks the whole audit chain now, in the background (SIGUSR1); the
    /// result shows in status, and a break in `/readyz` and the journal.
    pub fn verify_audit(&self) {
        self.shared.verify_now.notify_one();
    }

    /// Serves until `shutdown` completes, then drains: no new connections,
    /// in-flight requests get `shutdown_grace` to finish, the rest are cut.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        let Listeners { unix, tls } = listeners;
        {
            let mut infos = shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            infos.push(unix.info.clone());
            infos.extend(tls.as_ref().map(|t| t.info.clone()));
        }

        let drain = CancellationToken::new();
        let abort = CancellationToken::new();
        let background = CancellationToken::new();
        let pings = CancellationToken::new();
        let connections = TaskTracker::new();
        // One budget per listener: a flood of TCP connections (each holding
        // its slot through the TLS handshake) cannot lock out local tenants,
        // and a socket full of tenants still has room for an operator.
        let limits = shared.config().limits.clone();
        let unix_slots = Slots::new(limits.max_connections_unix, limits.operator_reserve);
        let tls_slots = Slots::new(limits.max_connections_tls, 0);

        let probe_budget = (shared.config().state_probe_interval * 3).max(Duration::from_secs(1));
        let probe = tokio::spawn(run_state_probe(
            Arc::clone(&shared),
            shared.heartbeat.register("state-probe", probe_budget),
            background.clone(),
        ));
        // A bundle already waiting in the inbox is in force before READY=1.
        {
            let s = Arc::clone(&shared);
            let _ = tokio::task::spawn_blocking(move || {
                let config = s.config();
                s.policy.scan_inbox(&config, &s.metrics, &|| {});
                s.policy.tick(&config, &s.metrics);
                s.policy.publish_metrics(&s.metrics);
            })
            .await;
        }
        let policy_budget = (shared.config().policy.poll_interval * 4).max(Duration::from_secs(30));
        let poller = tokio::spawn(run_bundle_poller(
            Arc::clone(&shared),
            shared.heartbeat.register("bundle-inbox", policy_budget),
            background.clone(),
        ));
        let retention = tokio::spawn(run_retention(Arc::clone(&shared), background.clone()));
        let denial_summary =
            tokio::spawn(run_denial_summary(Arc::clone(&shared), background.clone()));
        let mirror = shared
            .config()
            .policy
            .mirror
            .clone()
            .map(|m| tokio::spawn(run_mirror(Arc::clone(&shared), m, background.clone())));
        let accept_tls = tls.map(|tls| {
            tokio::spawn(accept_tls(
                Arc::clone(&shared),
                tls,
                tls_slots,
                connections.clone(),
                drain.clone(),
                abort.clone(),
            ))
        });
        let accept = tokio::spawn(accept_unix(
            Arc::clone(&shared),
            unix,
            unix_slots,
            connections.clone(),
            drain.clone(),
            abort.clone(),
        ));

        let u = &shared.usage_opened;
        tracing::info!(
            folded = u.caught_up.folded,
            through_seq = u.caught_up.next,
            unfinished = u.unfinished,
            tenant_users = u.tenant_users,
            "usage counters in step with the audit log"
        );
        if u.unfinished > 0 {
            tracing::warn!(
                unfinished = u.unfinished,
                "requests were cut off by the last stop without a completion record: their users stay counted, their tokens are not charged"
            );
        }
        // (The store's `audit_opened` record was written first, when it opened.)
        shared.audit.record(Event::Startup {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            fail_open: shared.config().audit.fail_open,
        });
        if shared.config().audit.fail_open {
            tracing::warn!(
                AIRGATE_EVENT = "audit_fail_open",
                "audit.fail_open is on: requests are served even when their decision record cannot be made durable"
            );
        }
        let status = shared.status_line();
        tracing::info!(status = %status, "ready");
        shared.notifier.ready(&status);
        let full_verify = tokio::spawn(run_full_verify(Arc::clone(&shared), background.clone()));
        // Pings start after READY=1: systemd ignores them before it anyway.
        let watchdog = shared.watchdog.map(|period| {
            tracing::info!(
                period_ms = period.as_millis() as u64,
                "systemd watchdog enabled"
            );
            tokio::spawn(systemd::run_watchdog(
                period,
                shared.heartbeat.clone(),
                shared.notifier.clone(),
                shared.metrics.clone(),
                pings.clone(),
            ))
        });

        shutdown.await;

        let grace = shared.config().shutdown_grace;
        let open = connections.len();
        tracing::info!(
            connections = open,
            grace_ms = grace.as_millis() as u64,
            "draining"
        );
        shared
            .notifier
            .stopping(&format!("draining {open} connection(s)"));
        drain.cancel();
        if let Err(e) = accept.await {
            tracing::error!(error = %e, "accept loop failed");
        }
        if let Some(Err(e)) = match accept_tls {
            Some(task) => Some(task.await),
            None => None,
        } {
            tracing::error!(error = %e, "TLS accept loop failed");
        }
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "grace period over; closing the remaining connections"
            );
            abort.cancel();
            connections.wait().await;
        }
        // What writes records ends before the shutdown record: nothing may
        // follow the clean stop's checkpoint (the writer refuses what comes
        // after it). Requests' own tasks (their connections are gone) first.
        shared.detached.close();
        if tokio::time::timeout(DETACHED_GRACE, shared.detached.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = shared.detached.len(),
                "request tasks still running at the shutdown record: their completion records are lost"
            );
        }
        background.cancel();
        let _ = probe.await;
        let _ = poller.await;
        let _ = retention.await;
        let _ = denial_summary.await;
        let _ = full_verify.await;
        if let Some(m) = mirror {
            let _ = m.await;
        }
        record_unrecorded_denials(&shared);
        if let Err(e) = shared
            .audit
            .append_sealed(Event::Shutdown {
                reason: "signal".to_owned(),
            })
            .await
        {
            tracing::error!(error = %e, "cannot record the shutdown");
        }
        pings.cancel();
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        tracing::info!("stopped");
    }
}

/// The record of a reload switching `audit.fail_open`, logged as loudly
/// as the mode is at start.
fn fail_open_changed(fail_open: bool) -> Event {
    if fail_open {
        tracing::warn!(
            AIRGATE_EVENT = "audit_fail_open_changed",
            fail_open,
            "audit.fail_open switched on by a reload: requests are served even when their decision record cannot be made durable"
        );
    } else {
        tracing::warn!(
            AIRGATE_EVENT = "audit_fail_open_changed",
            fail_open,
            "audit.fail_open switched off by a reload: no request is served before its decision record is durable"
        );
    }
    Event::FailOpenChanged { fail_open }
}

/// Accepts until drain, then closes the listening socket (and removes the
/// node it created) at once, so new clients are refused while the open
/// connections drain. With socket activation systemd keeps its own copy of
/// the socket, and new clients queue for the next start instead.
async fn accept_unix(
    shared: Arc<Shared>,
    socket: UnixSocket,
    slots: Slots,
    tracker: TaskTracker,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let name = socket.info.name.clone();
    let labels = ListenerLabels {
        listener: name.clone(),
    };
    while let Some((stream, _)) = next_accepted(|| socket.listener.accept(), &drain).await {
        count_accepted(&shared, &labels);
        // The kernel's credentials come with the connection, before any byte
        // is read: who it is decides which slots it may take.
        let identity = match crate::listener::peer_identity(&stream) {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; refusing connection");
                connection::refuse(stream, &shared, &name, Refusal::PeerCredentials);
                continue;
            }
        };
        let Some(permit) = slots.take(&labels, shared.is_operator(&identity)) else {
            connection::refuse(stream, &shared, &name, Refusal::ConnectionLimit);
            continue;
        };
        let conn = Conn {
            id: shared.conn_ids.fetch_add(1, Ordering::Relaxed) + 1,
            listener: name.clone(),
            identity,
            close: CancellationToken::new(),
        };
        tracker.spawn(connection::serve(
            Arc::clone(&shared),
            stream,
            conn,
            permit,
            drain.clone(),
            abort.clone(),
        ));
    }
    socket.remove_node();
}

/// The next accepted connection, or None once draining. Accept errors
/// (EMFILE and friends) back off instead of spinning.
async fn next_accepted<T, F>(accept: impl Fn() -> F, drain: &CancellationToken) -> Option<T>
where
    F: Future<Output = std::io::Result<T>>,
{
    loop {
        tokio::select! {
            () = drain.cancelled() => return None,
            accepted = accept() => match accepted {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

fn count_accepted(shared: &Shared, labels: &ListenerLabels) {
    shared
        .metrics
        .connections_accepted
        .get_or_create(labels)
        .inc();
}

/// One listener's connection budget: `open` slots for every peer, and
/// `reserved` more that only operators may take (so that a socket full of
/// tenants, or of one tenant's idle connections, still lets an operator in
/// to see why). A slot is an owned permit: dropping it frees the slot.
struct Slots {
    open: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
}

impl Slots {
    fn new(open: usize, reserved: usize) -> Self {
        Self {
            open: Arc::new(Semaphore::new(open)),
            reserved: Arc::new(Semaphore::new(reserved)),
        }
    }

    /// A slot for a peer, or None (logged) when its share is taken and the
    /// caller must turn it away. Operators take an open slot while there is
    /// one, so the reserve stays for when there is not.
    fn take(&self, labels: &ListenerLabels, operator: bool) -> Option<OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.open).try_acquire_owned().ok().or_else(|| {
            if operator {
                Arc::clone(&self.reserved).try_acquire_owned().ok()
            } else {
                None
            }
        });
        if slot.is_none() {
            tracing::warn!(listener = %labels.listener, operator, "connection limit reached; refusing connection");
        }
        slot
    }
}

/// Accepts TCP connections until drain; each is handed to a task that does
/// the TLS handshake (bounded by handshake_timeout) and then serves HTTP.
async fn accept_tls(
    shared: Arc<Shared>,
    socket: TcpSocket,
    slots: Slots,
    tracker: TaskTracker,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let name = socket.info.name.clone();
    let labels = ListenerLabels {
        listener: name.clone(),
    };
    while let Some((stream, remote)) = next_accepted(|| socket.listener.accept(), &drain).await {
        count_accepted(&shared, &labels);
        // The slot is taken before the handshake, which it bounds; the
        // network never reaches operator slots (see `Shared::is_operator`).
        let Some(permit) = slots.take(&labels, false) else {
            connection::count_refusal(&shared, &name, Refusal::ConnectionLimit);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = shared.tls.load_full() else {
            continue;
        };
        let timeout = shared
            .config()
            .tls
            .as_ref()
            .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
        let shared = Arc::clone(&shared);
        let (name, drain, abort) = (name.clone(), drain.clone(), abort.clone());
        tracker.spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server_config));
            let handshake = tokio::select! {
                () = abort.cancelled() => return,
                // Driven so the session cache can bound resumption chains.
                result = tokio::time::timeout(
                    timeout,
                    crate::tls::handshake(acceptor.accept(stream)),
                ) => result,
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    let reason = crate::tls::failure_reason(&e);
                    shared.metrics.count_handshake(&name, reason);
                    tracing::info!(%remote, reason, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.metrics.count_handshake(&name, "timeout");
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|cert| crate::tls::peer_identity(cert, remote));
            let identity = match peer {
                Some(Ok(peer)) => Identity::Tls(peer),
                Some(Err(e)) => {
                    shared.metrics.count_handshake(&name, "bad_certificate");
                    tracing::warn!(%remote, error = %e, "verified client certificate cannot be read");
                    return;
                }
                None => {
                    shared.metrics.count_handshake(&name, "no_certificate");
                    return;
                }
            };
            shared.metrics.count_handshake(&name, "ok");
            let conn = Conn {
                id: shared.conn_ids.fetch_add(1, Ordering::Relaxed) + 1,
                listener: name,
                identity,
                close: CancellationToken::new(),
            };
            connection::serve(shared, stream, conn, permit, drain, abort).await;
        });
    }
}

/// Checks the state directory's free space and writability on a blocking
/// thread. A hung file system hangs this worker, and the watchdog notices.
/// Prunes audit records past `audit.retention_days`, at start and hourly.
async fn run_retention(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        if let Some(days) = shared.config().audit.retention_days {
            let cutoff = crate::bundle::system_time_now()
                - i64::try_from(days.saturating_mul(86_400)).unwrap_or(i64::MAX);
            let audit = shared.audit.clone();
            let pruned = tokio::task::spawn_blocking(move || audit.prune_before(cutoff)).await;
            match pruned {
                Ok(Ok(Some((first_kept, removed)))) => {
                    tracing::info!(
                        AIRGATE_EVENT = "audit_pruned",
                        first_kept,
                        removed,
                        "audit records past retention pruned"
                    );
                    shared.audit.record(Event::AuditPruned {
                        first_kept,
                        removed,
                        retention_days: days,
                    });
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "audit retention failed"),
                Err(e) => tracing::warn!(error = %e, "audit retention task failed"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// How long the shutdown waits for request tasks that outlived their
/// connection (once connections are cut, they end in moments).
const DETACHED_GRACE: Duration = Duration::from_secs(5);

/// Walks the whole audit chain at start and every `audit.full_verify_interval`,
/// and at once on SIGUSR1 ([`Daemon::verify_audit`]): the history before
/// the last checkpoint, which a start does not re-read, is checked too. A
/// break is a journal alert (`AIRGATE_EVENT=audit_verify_failed`), a
/// `/readyz` warning until a walk passes again, and an `audit_verified`
/// record. The walk runs on a blocking thread over a reader handle (the
/// writer goes on meanwhile) and streams the records.
async fn run_full_verify(shared: Arc<Shared>, stop: CancellationToken) {
    // The interval is read again at least this often (a reload may change it).
    const RECHECK: Duration = Duration::from_secs(3600);
    let mut last: Option<Instant> = None;
    loop {
        let due = shared
            .config()
            .audit
            .full_verify_interval
            .map(|every| last.map_or(Duration::ZERO, |t| every.saturating_sub(t.elapsed())));
        if due != Some(Duration::ZERO) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.verify_now.notified() => {}
                () = tokio::time::sleep(due.unwrap_or(RECHECK).min(RECHECK)) => continue,
            }
        }
        let started = Instant::now();
        last = Some(started);
        let audit = shared.audit.clone();
        let covering = audit.state().records;
        let walk = tokio::task::spawn_blocking(move || audit.verify_all());
        let walked = tokio::select! {
            () = stop.cancelled() => return,
            walked = walk => walked,
        };
        let mut v = FullVerify {
            at_unix: unix_now(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            result: "ok",
            records: covering,
            first_bad_seq: None,
            error: None,
        };
        match walked {
            Ok(Ok(verified)) => {
                v.records = verified.records;
                tracing::info!(
                    records = verified.records,
                    checkpoints = verified.checkpoints,
                    duration_ms = v.duration_ms,
                    "audit chain verified in full"
                );
            }
            Ok(Err(AuditError::Broken(e))) => {
                tracing::error!(
                    AIRGATE_EVENT = "audit_verify_failed",
                    AIRGATE_SEQ = e.seq(),
                    records = covering,
                    error = %e,
                    "AUDIT CHAIN BROKEN: a full verification found record {} bad; inspect with `airgate audit verify` on a snapshot",
                    e.seq()
                );
                shared.audit.record(Event::AuditVerified {
                    through_seq: covering,
                    ok: false,
                    first_bad_seq: Some(e.seq()),
                    error: Some(e.to_string()),
                });
                v.result = "broken";
                v.first_bad_seq = Some(e.seq());
                v.error = Some(e.to_string());
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the audit chain could not be verified in full");
                v.result = "error";
                v.error = Some(e.to_string());
            }
            Err(e) => {
                tracing::warn!(error = %e, "the audit verification task failed");
                v.result = "error";
                v.error = Some(e.to_string());
            }
        }
        // STATUS= carries the warning: it follows a break found or mended.
        let changed = {
            let mut held = shared
                .full_verify
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let broken = |r: Option<&FullVerify>| r.is_some_and(|r| r.result == "broken");
            let changed = broken(held.as_ref()) != broken(Some(&v));
            *held = Some(v);
            changed
        };
        if changed {
            shared.notifier.status(&shared.status_line());
        }
    }
}

/// Writes what went unrecorded (crate::denials) since the last summary.
fn record_unrecorded_denials(shared: &Shared) {
    if let Some(s) = shared.denials.take_summary() {
        tracing::warn!(
            AIRGATE_EVENT = "denials_unrecorded",
            denials = s.denials,
            principals = s.principals,
            "denials of unknown callers or models answered without a record each"
        );
        shared.audit.record(Event::DenialsUnrecorded {
            denials: s.denials,
            principals: s.principals,
        });
    }
}

async fn run_denial_summary(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(crate::denials::SUMMARY_EVERY) => {}
        }
        record_unrecorded_denials(&shared);
    }
}

/// Polls the bundle mirror, feeding what it serves into the same
/// verify-and-activate path as the inbox.
async fn run_mirror(
    shared: Arc<Shared>,
    config: crate::config::MirrorConfig,
    stop: CancellationToken,
) {
    let mut mirror = match crate::mirror::Mirror::new(config) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "bundle mirror disabled");
            *shared
                .mirror_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(json!({"at_unix": unix_now(), "result": "error", "message": e.to_string()}));
            return;
        }
    };
    let url = mirror.url();
    let mut last_error: Option<String> = None;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            r = mirror.poll() => r,
        };
        let (result, message) = match outcome {
            Ok(crate::mirror::Fetched::Unchanged) => ("unchanged", "304 not modified".to_owned()),
            Ok(crate::mirror::Fetched::Bundle { body, etag }) => {
                let s = Arc::clone(&shared);
                let source = format!("mirror {url}");
                let offered = tokio::task::spawn_blocking(move || {
                    let config = s.config();
                    s.policy.offer(&source, &body, &config, &s.metrics)
                })
                .await
                .unwrap_or(Offered::Retry);
                // Only a settled bundle's ETag is sent again: one refused for
                // now (not valid yet, this host's configuration, a failed
                // write) is fetched again.
                if offered.settles() {
                    mirror.settled(etag);
                }
                for event in shared.policy.take_events() {
                    shared.audit.record(event);
                }
                if offered == Offered::Accepted {
                    shared.notifier.status(&shared.status_line());
                }
                let message = match offered {
                    Offered::Accepted => "a new bundle is in force",
                    Offered::Settled => "no change (see bundle.last_update)",
                    Offered::Retry => {
                        "refused for now, fetched again at the next poll (see bundle.last_update)"
                    }
                };
                ("fetched", message.to_owned())
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(url = %url, error = %message, "bundle mirror poll failed");
                }
                last_error = Some(message.clone());
                ("error", message)
            }
        };
        if result != "error" {
            last_error = None;
        }
        shared
            .metrics
            .mirror_polls
            .get_or_create(&ResultLabels { result })
            .inc();
        *shared
            .mirror_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(json!({
            "url": url, "at_unix": unix_now(), "result": result, "message": message,
        }));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(mirror.interval()) => {}
        }
    }
}

/// Reads the bundle inbox every `policy.poll_interval` (and at once when
/// woken by a reload), and re-weighs expiry and the clock; STATUS= follows
/// every change.
async fn run_bundle_poller(shared: Arc<Shared>, worker: Worker, stop: CancellationToken) {
    // Shared with the scan, which reports progress file by file.
    let worker = Arc::new(worker);
    let mut retry_models = false;
    loop {
        let config = shared.config();
        let s = Arc::clone(&shared);
        let c = Arc::clone(&config);
        let w = Arc::clone(&worker);
        let changed = tokio::task::spawn_blocking(move || {
            let activated = s.policy.scan_inbox(&c, &s.metrics, &|| w.progress());
            let ticked = s.policy.tick(&c, &s.metrics);
            activated || ticked
        });
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            r = changed => r.unwrap_or(false),
        };
        worker.progress();
        for event in shared.policy.take_events() {
            shared.audit.record(event);
        }
        // Models follow the bundle in force; a reload (SIGHUP) retries refused ones.
        if let Some(active) = shared.policy.active() {
            shared.models.reconcile(
                &active.verified.bundle,
                &config.llm,
                &config.onnx,
                &config.models_dir,
                &shared.heartbeat,
                std::mem::take(&mut retry_models),
            );
        }
        if changed {
            shared.notifier.status(&shared.status_line());
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = shared.rescan.notified() => retry_models = true,
            () = tokio::time::sleep(config.policy.poll_interval) => {}
        }
    }
}

async fn run_state_probe(shared: Arc<Shared>, worker: Worker, stop: CancellationToken) {
    let mut low_space_warned = false;
    loop {
        let config = shared.config();
        let dir = config.state_dir.clone();
        let hang_after = shared.failpoints.state_probe_hang_after;
        let started = shared.started;
        let blocking = tokio::task::spawn_blocking(move || {
            if hang_after.is_some_and(|after| started.elapsed() >= after) {
                tracing::warn!("failpoint state-probe-hang-after: the state probe now hangs");
                loop {
                    std::thread::park();
                }
            }
            probe_state_dir(&dir)
        });
        // A hung probe must not hold up shutdown: stop waiting for it.
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = blocking => result,
        };
        worker.progress();
        let probe = match result {
            Ok(p) => p,
            Err(e) => StateProbe {
                at_unix: unix_now(),
                free_bytes: None,
                writable: false,
                error: Some(format!("probe failed: {e}")),
            },
        };
        if let Some(free) = probe.free_bytes {
            shared
                .metrics
                .state_dir_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            let low = free < config.state_min_free_bytes;
            if low && !low_space_warned {
                tracing::warn!(
                    free_bytes = free,
                    min_free_bytes = config.state_min_free_bytes,
                    "state directory is low on space"
                );
            }
            low_space_warned = low;
        }
        if let Some(e) = &probe.error {
            tracing::error!(error = %e, "state directory probe failed");
        }
        *shared
            .state_probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(probe);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.state_probe_interval) => {}
        }
    }
}

fn probe_state_dir(dir: &Path) -> StateProbe {
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()));
    let writable = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK);
    let error = match (&free, &writable) {
        (Err(e), _) => Some(format!("{}: {e}", dir.display())),
        (_, Err(e)) => Some(format!("{} is not writable: {e}", dir.display())),
        _ => None,
    };
    StateProbe {
        at_unix: unix_now(),
        free_bytes: free.ok(),
        writable: writable.is_ok(),
        error,
    }
}
