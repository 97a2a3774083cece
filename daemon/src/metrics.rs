//! Prometheus metrics, served to operators at `GET /metrics`.
//!
//! Label values are bounded by construction (route templates, status codes,
//! listener and worker names, fixed reason strings), never taken from a
//! request, so a client cannot grow the series count.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::heartbeat::WorkerHealth;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub listener: String,
    pub how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the daemon exports. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub connections_accepted: Family<ListenerLabels, Counter>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub connections_closed: Family<ClosedLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
    pub watchdog_pings: Counter,
    pub worker_stuck: Family<WorkerLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub state_dir_free_bytes: Gauge,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Requests refused because their connection's client certificate had
    /// expired since the handshake.
    pub tls_client_certificate_expired: Family<ListenerLabels, Counter>,
    pub tls_server_cert_not_after: Gauge,
    pub tls_crls_expired: Gauge,
    pub bundle_version: Gauge,
    pub bundle_expires: Gauge,
    pub bundle_in_grace: Gauge,
    pub bundle_updates: Family<ResultLabels, Counter>,
    pub clock_behind_floor: Gauge,
    pub mirror_polls: Family<ResultLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    /// Denials answered without a record (crate::denials).
    pub denials_unrecorded: Counter,
    pub tokens: Family<TokenLabels, Counter>,
    pub generations: Family<GenerationLabels, Counter>,
    pub time_to_first_token: HistogramFamily<ModelLabels>,
    /// Time a guard model took to score a prompt (added before generation).
    pub guard_latency: HistogramFamily<ModelLabels>,
}

/// Model ids come from the bundle's manifest (a request naming another
/// model is denied before it is counted), so they are bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s: from a health check to a long generation.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("airgate");
        let m = Self {
            registry: Arc::new(Registry::default()),
            connections_accepted: Family::default(),
            connections_refused: Family::default(),
            connections_active: Family::default(),
            connections_closed: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            watchdog_pings: Counter::default(),
            worker_stuck: Family::default(),
            config_reloads: Family::default(),
            state_dir_free_bytes: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_client_certificate_expired: Family::default(),
            tls_server_cert_not_after: Gauge::default(),
            tls_crls_expired: Gauge::default(),
            bundle_version: Gauge::default(),
            bundle_expires: Gauge::default(),
            bundle_in_grace: Gauge::default(),
            bundle_updates: Family::default(),
            clock_behind_floor: Gauge::default(),
            mirror_polls: Family::default(),
            decisions: Family::default(),
            denials_unrecorded: Counter::default(),
            tokens: Family::default(),
            generations: Family::default(),
            time_to_first_token: Family::new_with_constructor(latency_histogram),
            guard_latency: Family::new_with_constructor(latency_histogram),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build of the running daemon", build);
        registry.register(
            "connections_accepted",
            "Connections accepted, by listener",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused before any request was read, by listener and reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now, by listener",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by listener and how (closed, error, header_timeout, idle, aborted)",
            m.connections_closed.clone(),
        );
        registry.register(
            "denials_unrecorded",
            "Denials of unknown callers or models answered without a decision record, past the per-principal allowance",
            m.denials_unrecorded.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "watchdog_pings",
            "WATCHDOG=1 notifications sent to systemd",
            m.watchdog_pings.clone(),
        );
        registry.register(
            "worker_stuck",
            "1 while a registered worker has stopped reporting progress",
            m.worker_stuck.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "state_dir_free_bytes",
            "Free bytes in the state directory's file system, as last probed",
            m.state_dir_free_bytes.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by listener and result (ok, or why they failed: no_certificate, \
             unknown_ca, expired, revoked, bad_usage, multiple_uri_sans, timeout, ...)",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_client_certificate_expired",
            "Requests refused (401 client_certificate_expired, the connection closed) because the \
             connection's client certificate had expired since its handshake, by listener",
            m.tls_client_certificate_expired.clone(),
        );
        registry.register(
            "tls_server_certificate_not_after_seconds",
            "When the server certificate in use expires (Unix time)",
            m.tls_server_cert_not_after.clone(),
        );
        registry.register(
            "tls_crls_expired",
            "CRLs in use whose nextUpdate has passed",
            m.tls_crls_expired.clone(),
        );
        registry.register(
            "bundle_version",
            "bundle_version of the policy bundle in force (0: none)",
            m.bundle_version.clone(),
        );
        registry.register(
            "bundle_expires_seconds",
            "When the bundle in force expires (Unix time; 0: none)",
            m.bundle_expires.clone(),
        );
        registry.register(
            "bundle_in_grace",
            "1 while the bundle in force has expired and is enforced only for the grace period",
            m.bundle_in_grace.clone(),
        );
        registry.register(
            "bundle_updates",
            "Bundle files examined, by result (accepted, refused, superseded, error)",
            m.bundle_updates.clone(),
        );
        registry.register(
            "clock_behind_floor",
            "1 while the system clock is behind the persisted time floor",
            m.clock_behind_floor.clone(),
        );
        registry.register(
            "bundle_mirror_polls",
            "Polls of the bundle mirror, by result (fetched, unchanged, error)",
            m.mirror_polls.clone(),
        );
        registry.register(
            "policy_decisions",
            "Policy decisions, by decision and reason code",
            m.decisions.clone(),
        );
        registry.register(
            "tokens",
            "Tokens processed by the models, by model and kind (prompt, completion)",
            m.tokens.clone(),
        );
        registry.register(
            "generations",
            "Generations that reached a model, by model and outcome (completed, cancelled, error)",
            m.generations.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first generated text, by model",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "guard_seconds",
            "Time a guard model took to score a prompt, by guard model",
            m.guard_latency.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    pub fn count_close(&self, listener: &str, how: &'static str) {
        self.connections_closed
            .get_or_create(&ClosedLabels {
                listener: listener.to_owned(),
                how,
            })
            .inc();
    }

    pub fn count_handshake(&self, listener: &str, result: &'static str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc();
    }

    pub fn set_tls(&self, info: &crate::tls::TlsInfo) {
        self.tls_server_cert_not_after
            .set(info.server_certificate.not_after);
        self.tls_crls_expired
            .set(i64::try_from(info.crls.iter().filter(|c| c.expired).count()).unwrap_or(i64::MAX));
    }

    pub fn set_workers(&self, health: &[WorkerHealth]) {
        for w in health {
            self.worker_stuck
                .get_or_create(&WorkerLabels {
                    worker: w.name.clone(),
                })
                .set(i64::from(w.stuck));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
