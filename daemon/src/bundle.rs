//! The policy bundle in force: where it comes from, how it is kept, when it
//! stops counting.
//!
//! One verify-and-activate path takes bundle files from the inbox directory
//! (polled, and re-read on SIGHUP). Policy verifies signature, claims and
//! content; this module adds what needs state: rollback (a lower version, or
//! the same version with other content, is refused), the time floor (the
//! highest issued-at seen, so a clock set back cannot revive an expired
//! bundle), and the grace period after expiry, counted from `exp` so a
//! restart changes nothing. What was accepted is persisted atomically
//! (write, fsync, rename, fsync the directory) under `STATE/policy/`:
//!
//! - `archive/<sha256>.jwt`: every accepted bundle, by digest (reports of past
//!   months need the bundles that were in force);
//! - `state.json`: highest version and its digest, the active digest, the
//!   time floor.
//!
//! At start the active bundle is read back from the archive and verified
//! again: a tampered file is not trusted. Requests take one `Arc<Active>` at
//! their start, so a swap never changes the bundle under a request.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airgate_policy::bundle::verify::{
    BundleError, LEEWAY_SECONDS, MAX_TOKEN_BYTES, TrustAnchors, Verified, verify, verify_signed,
};
use airgate_policy::time::{Clock, UnixTime};
use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::keys::hex;

/// The on-disk format of `state.json`; a newer airgate reads older ones.
pub const STATE_FORMAT: u32 = 1;

/// How far the persisted time floor may lag the clock before it is advanced
/// (bounds writes while keeping a set-back clock from reviving old bundles).
const FLOOR_STEP_SECONDS: i64 = 3600;

/// The bundle in force.
#[derive(Debug)]
pub struct Active {
    pub verified: Verified,
    /// Where it came from: a file name, or "persisted" at start.
    pub source: String,
    pub activated_at: UnixTime,
}

impl Active {
    pub fn version(&self) -> u64 {
        self.verified.bundle.version
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    format: u32,
    highest_version: u64,
    highest_digest: Option<String>,
    active_digest: Option<String>,
    time_floor: i64,
}

/// The outcome of one bundle file, for status and the log.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateRecord {
    pub at_unix: i64,
    pub file: String,
    pub digest: String,
    pub version: Option<u64>,
    pub result: &'static str,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    None,
    Valid,
    Grace,
    Expired,
}

/// Why a bundle file is refused beyond what policy checks.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Bundle(Box<BundleError>),
    #[error("version {found} is lower than version {highest}, already accepted (rollback)")]
    LowerVersion { found: u64, highest: u64 },
    #[error("version {version} was already accepted with different content (digest {accepted})")]
    SameVersionDifferentContent { version: u64, accepted: String },
    #[error("no policy.audience is configured, so no bundle can be accepted")]
    NoAudience,
    #[error("no trust anchors are configured, so no bundle can be accepted")]
    NoTrustAnchors,
    #[error("cannot read the bundle file: {0}")]
    Read(std::io::Error),
    #[error("cannot persist the bundle: {0}")]
    Persist(std::io::Error),
    #[error("this bundle is already in force")]
    AlreadyInForce,
}

impl UpdateError {
    fn result(&self) -> &'static str {
        match self {
            Self::Read(_) | Self::Persist(_) => "error",
            Self::AlreadyInForce => "unchanged",
            _ => "refused",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("policy state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// (device, inode, size, mtime): a file seen before with these is not read again.
type Stamp = (u64, u64, u64, i64, i64);

struct Inner {
    persisted: Persisted,
    /// Inbox files already examined, by path.
    seen: HashMap<PathBuf, (Stamp, UpdateRecord)>,
    last_update: Option<UpdateRecord>,
    /// Why the persisted bundle was not trusted at start, if it was not.
    start_problem: Option<String>,
    freshness: Freshness,
    clock_behind: bool,
    /// Audit events not yet handed to the audit store.
    events: Vec<airgate_policy::audit::Event>,
}

/// The policy store and the bundle in force. See the module docs.
pub struct Policy {
    dir: PathBuf,
    clock: Arc<dyn Clock + Send + Sync>,
    active: ArcSwapOption<Active>,
    inner: Mutex<Inner>,
}

/// Seconds since the epoch by the host's clock.
pub fn system_time_now() -> i64 {
    SystemClock.now().seconds()
}

/// The host's clock.
pub struct SystemClock;

/// Seconds added to the host's clock: zero except under the `clock-offset`
/// failpoint, which tests use to cross a month without waiting for one.
static CLOCK_OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

pub fn set_clock_offset(seconds: i64) {
    CLOCK_OFFSET.store(seconds, std::sync::atomic::Ordering::Relaxed);
}

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        UnixTime(real.saturating_add(CLOCK_OFFSET.load(std::sync::atomic::Ordering::Relaxed)))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Policy {
    /// Opens (creating if needed) `STATE/policy` and brings back the bundle
    /// that was in force, verifying it again. Blocking (file I/O).
    pub fn open(config: &Config) -> Result<Self, StoreError> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`Policy::open`] with a clock of the caller's (tests move time).
    pub fn open_with_clock(
        config: &Config,
        clock: Arc<dyn Clock + Send + Sync>,
    ) -> Result<Self, StoreError> {
        let dir = config.state_dir.join("policy");
        for d in [dir.clone(), dir.join("archive")] {
            if !d.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&d)
                    .map_err(io_err(&d))?;
            }
        }
        let anchors = config.trust.anchors();
        let audience = config.policy.audience.as_deref();
        let state_path = dir.join("state.json");
        let mut start_problem = None;
        let persisted = match std::fs::read(&state_path) {
            Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
                Ok(p) if p.format <= STATE_FORMAT => p,
                Ok(p) => {
                    // Written by a newer airgate: do not guess, and do not serve
                    // on a rollback floor we cannot read.
                    let msg = format!(
                        "{} has format {}, newer than this airgate understands ({STATE_FORMAT})",
                        state_path.display(),
                        p.format
                    );
                    tracing::error!("{msg}");
                    start_problem = Some(msg);
                    recover_from_archive(&dir, &anchors, audience)
                }
                Err(e) => {
                    let msg = format!(
                        "{} is unreadable ({e}); rollback state recovered from the archive",
                        state_path.display()
                    );
                    tracing::error!("{msg}");
                    start_problem = Some(msg);
                    recover_from_archive(&dir, &anchors, audience)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted {
                format: STATE_FORMAT,
                ..Persisted::default()
            },
            Err(e) => return Err(io_err(&state_path)(e)),
        };

        let policy = Self {
            dir,
            clock,
            active: ArcSwapOption::empty(),
            inner: Mutex::new(Inner {
                persisted,
                seen: HashMap::new(),
                last_update: None,
                start_problem,
                freshness: Freshness::None,
                clock_behind: false,
                events: Vec::new(),
            }),
        };
        let active_digest = policy.lock().persisted.active_digest.clone();
        if let Some(digest) = active_digest {
            match policy.read_archived(&digest, &anchors, audience) {
                Ok(verified) => {
                    tracing::info!(
                        version = verified.bundle.version,
                        digest = %verified.digest,
                        expires = verified.bundle.expires.seconds(),
                        "policy bundle restored from the state directory"
                    );
                    policy.active.store(Some(Arc::new(Active {
                        verified,
                        source: "persisted".to_owned(),
                        activated_at: policy.clock.now(),
                    })));
                }
                Err(e) => {
                    let msg = format!("persisted bundle {digest} is not trusted: {e}");
                    tracing::error!("{msg}; no bundle in force until a valid one arrives");
                    policy.lock().start_problem = Some(msg);
                }
            }
        }
        Ok(policy)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_archived(
        &self,
        digest: &str,
        anchors: &TrustAnchors,
        audience: Option<&str>,
    ) -> Result<Verified, String> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{digest:?} is not a digest"));
        }
        let path = self.dir.join("archive").join(format!("{digest}.jwt"));
        let token = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let audience = audience.ok_or_else(|| UpdateError::NoAudience.to_string())?;
        let verified = verify_signed(&token, anchors, audience).map_err(|e| e.to_string())?;
        if verified.digest != digest {
            return Err(format!(
                "{} has digest {}, not the one recorded",
                path.display(),
                verified.digest
            ));
        }
        Ok(verified)
    }

    /// Audit events (bundles accepted or refused, the clock behind the
    /// floor) since the last call.
    pub fn take_events(&self) -> Vec<airgate_policy::audit::Event> {
        std::mem::take(&mut self.lock().events)
    }

    /// The bundle requests are decided against, as of now.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.load_full()
    }

    /// The time policy decisions use: the clock, or the time floor when the
    /// clock runs behind it.
    pub fn now(&self) -> UnixTime {
        let floor = UnixTime(self.lock().persisted.time_floor);
        self.clock.now().max(floor)
    }

    /// The bundle a request may be decided against, or why there is none.
    pub fn in_force(&self, grace: Duration) -> Result<Arc<Active>, String> {
        let Some(active) = self.active() else {
            return Err(self.no_bundle_reason());
        };
        match freshness(&active, self.now(), grace) {
            Freshness::Expired => Err(format!(
                "policy bundle version {} expired at {} and its grace period ({}s) is over",
                active.version(),
                active.verified.bundle.expires.seconds(),
                grace.as_secs()
            )),
            _ => Ok(active),
        }
    }

    fn no_bundle_reason(&self) -> String {
        match &self.lock().start_problem {
            Some(p) => format!("no policy bundle in force: {p}"),
            None => "no policy bundle in force".to_owned(),
        }
    }

    /// Reasons inference is not served, and warnings that do not stop it.
    pub fn health(&self, config: &Config) -> (Vec<String>, Vec<String>) {
        let mut reasons = Vec::new();
        let mut warnings = Vec::new();
        if let Err(e) = self.in_force(config.policy.expiry_grace) {
            reasons.push(e);
        }
        if config.policy.audience.is_none() {
            reasons.push("policy.audience is not configured".to_owned());
        }
        if config.trust.anchors.is_empty() {
            reasons.push("no trust anchors are configured ([[trust.anchors]])".to_owned());
        }
        let inner = self.lock();
        if inner.freshness == Freshness::Grace
            && let Some(a) = self.active()
        {
            warnings.push(format!(
                "policy bundle version {} expired at {}; enforced for its grace period until {}",
                a.version(),
                a.verified.bundle.expires.seconds(),
                grace_end(&a, config.policy.expiry_grace).seconds()
            ));
        }
        if inner.clock_behind {
            warnings.push(format!(
                "system clock is behind the time floor {}; decisions use the floor",
                inner.persisted.time_floor
            ));
        }
        if let Some(u) = &inner.last_update
            && !matches!(u.result, "accepted" | "unchanged")
        {
            warnings.push(format!(
                "last bundle file {} was {}: {}",
                u.file, u.result, u.message
            ));
        }
        (reasons, warnings)
    }

    /// Re-weighs expiry and the clock; returns what changed, for the log,
    /// metrics and STATUS=. Called by the poll loop.
    pub fn tick(&self, config: &Config, metrics: &crate::metrics::Metrics) -> bool {
        let system = self.clock.now();
        let active = self.active();
        let mut inner = self.lock();
        let floor = inner.persisted.time_floor;
        let behind = system.seconds() < floor - LEEWAY_SECONDS;
        let mut changed = false;
        if behind != inner.clock_behind {
            inner.clock_behind = behind;
            changed = true;
            if behind {
                inner
                    .events
                    .push(airgate_policy::audit::Event::ClockBehindFloor {
                        clock: system.seconds(),
                        floor,
                    });
            }
            if behind {
                tracing::warn!(
                    clock = system.seconds(),
                    time_floor = floor,
                    "system clock is behind the time floor; time-based decisions use the floor"
                );
            } else {
                tracing::info!("system clock has caught up with the time floor");
            }
        }
        metrics.clock_behind_floor.set(i64::from(behind));
        let now = system.max(UnixTime(floor));
        let fresh = active.as_ref().map_or(Freshness::None, |a| {
            freshness(a, now, config.policy.expiry_grace)
        });
        if fresh != inner.freshness {
            changed = true;
            inner.freshness = fresh;
            if let Some(a) = &active {
                let (version, exp) = (a.version(), a.verified.bundle.expires.seconds());
                match fresh {
                    Freshness::Grace => tracing::warn!(
                        version,
                        expires = exp,
                        grace_until = grace_end(a, config.policy.expiry_grace).seconds(),
                        "policy bundle has expired; enforcing it for the grace period"
                    ),
                    Freshness::Expired => tracing::error!(
                        version,
                        expires = exp,
                        "policy bundle expired and the grace period is over: failing closed"
                    ),
                    Freshness::Valid | Freshness::None => {}
                }
            }
        }
        metrics
            .bundle_in_grace
            .set(i64::from(fresh == Freshness::Grace));
        // Keep the floor near the clock so a restart with the clock set back
        // cannot reopen a grace period that had run out.
        if system.seconds() > floor + FLOOR_STEP_SECONDS {
            inner.persisted.time_floor = system.seconds();
            let persisted = inner.persisted.clone();
            drop(inner);
            if let Err(e) = self.write_state(&persisted) {
                tracing::warn!(error = %e, "cannot persist the time floor");
            }
        }
        changed
    }

    /// Reads the inbox and activates the highest-versioned new bundle that
    /// passes every check. Blocking (file I/O); returns whether the bundle
    /// in force changed.
    pub fn scan_inbox(&self, config: &Config, metrics: &crate::metrics::Metrics) -> bool {
        let inbox = &config.policy.inbox;
        let entries = match std::fs::read_dir(inbox) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(inbox = %inbox.display(), error = %e, "cannot read the bundle inbox");
                return false;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && !n.ends_with(".tmp"))
            })
            .collect();
        paths.sort();

        let mut candidates: Vec<(PathBuf, Stamp, Verified)> = Vec::new();
        let mut present = Vec::new();
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let stamp = (
                meta.dev(),
                meta.ino(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
            );
            present.push(path.clone());
            if self
                .lock()
                .seen
                .get(&path)
                .is_some_and(|(s, _)| *s == stamp)
            {
                continue;
            }
            match self.examine(&path, &meta, config) {
                Ok(verified) => candidates.push((path, stamp, verified)),
                Err((digest, version, e)) => {
                    let record = self.record(&path, digest, version, e.result(), e.to_string());
                    metrics
                        .bundle_updates
                        .get_or_create(&crate::metrics::ResultLabels { result: e.result() })
                        .inc();
                    if matches!(e, UpdateError::AlreadyInForce) {
                        tracing::debug!(file = %path.display(), "bundle already in force");
                    } else {
                        tracing::warn!(
                            AIRGATE_EVENT = "bundle_refused",
                            file = %path.display(),
                            digest = %record.digest,
                            error = %e,
                            "bundle refused; the bundle in force is unchanged"
                        );
                    }
                    // An I/O failure (a full disk) is retried at the next scan.
                    if !matches!(e, UpdateError::Read(_) | UpdateError::Persist(_)) {
                        self.lock().seen.insert(path, (stamp, record));
                    }
                }
            }
        }
        self.lock().seen.retain(|p, _| present.contains(p));

        // Only the newest can win; the others would be rollbacks after it.
        candidates.sort_by_key(|(_, _, v)| v.bundle.version);
        let Some((path, stamp, verified)) = candidates.pop() else {
            return false;
        };
        for (p, s, v) in candidates {
            let record = self.record(
                &p,
                v.digest.clone(),
                Some(v.bundle.version),
                "superseded",
                format!(
                    "version {} is superseded by version {} in the same scan",
                    v.bundle.version, verified.bundle.version
                ),
            );
            metrics
                .bundle_updates
                .get_or_create(&crate::metrics::ResultLabels {
                    result: "superseded",
                })
                .inc();
            self.lock().seen.insert(p, (s, record));
        }
        match self.activate(verified, &path) {
            Ok(active) => {
                let record = self.record(
                    &path,
                    active.verified.digest.clone(),
                    Some(active.version()),
                    "accepted",
                    format!("version {} is in force", active.version()),
                );
                self.lock().seen.insert(path, (stamp, record));
                metrics
                    .bundle_updates
                    .get_or_create(&crate::metrics::ResultLabels { result: "accepted" })
                    .inc();
                self.publish_metrics(metrics);
                true
            }
            Err((digest, e)) => {
                let version = None;
                self.record(&path, digest, version, e.result(), e.to_string());
                tracing::error!(file = %path.display(), error = %e, "bundle not activated");
                metrics
                    .bundle_updates
                    .get_or_create(&crate::metrics::ResultLabels { result: e.result() })
                    .inc();
                false
            }
        }
    }

    /// A bundle from another source (the mirror): the same checks and
    /// activation as an inbox file. Returns whether the bundle in force changed.
    pub fn offer(
        &self,
        source: &str,
        token: &[u8],
        config: &Config,
        metrics: &crate::metrics::Metrics,
    ) -> bool {
        let label = Path::new(source);
        let count = |result| {
            metrics
                .bundle_updates
                .get_or_create(&crate::metrics::ResultLabels { result })
                .inc();
        };
        let verified = match self.examine_bytes(token, config) {
            Ok(v) => v,
            Err((digest, version, e)) => {
                self.record(label, digest, version, e.result(), e.to_string());
                count(e.result());
                if !matches!(e, UpdateError::AlreadyInForce) {
                    tracing::warn!(source, error = %e, "bundle refused; the bundle in force is unchanged");
                }
                return false;
            }
        };
        match self.activate(verified, label) {
            Ok(active) => {
                self.record(
                    label,
                    active.verified.digest.clone(),
                    Some(active.version()),
                    "accepted",
                    format!("version {} is in force", active.version()),
                );
                count("accepted");
                self.publish_metrics(metrics);
                true
            }
            Err((digest, e)) => {
                self.record(label, digest, None, e.result(), e.to_string());
                tracing::error!(source, error = %e, "bundle not activated");
                count(e.result());
                false
            }
        }
    }

    pub fn publish_metrics(&self, metrics: &crate::metrics::Metrics) {
        let active = self.active();
        metrics.bundle_version.set(
            active
                .as_ref()
                .map_or(0, |a| i64::try_from(a.version()).unwrap_or(i64::MAX)),
        );
        metrics.bundle_expires.set(
            active
                .as_ref()
                .map_or(0, |a| a.verified.bundle.expires.seconds()),
        );
    }

    fn record(
        &self,
        path: &Path,
        digest: String,
        version: Option<u64>,
        result: &'static str,
        message: String,
    ) -> UpdateRecord {
        let record = UpdateRecord {
            at_unix: self.clock.now().seconds(),
            file: path.display().to_string(),
            digest,
            version,
            result,
            message,
        };
        use airgate_policy::audit::Event;
        let event = match result {
            "accepted" => Some(Event::BundleAccepted {
                version: version.unwrap_or_default(),
                digest: record.digest.clone(),
                source: record.file.clone(),
            }),
            "unchanged" => None,
            _ => Some(Event::BundleRefused {
                version,
                digest: record.digest.clone(),
                source: record.file.clone(),
                reason: record.message.clone(),
            }),
        };
        let mut inner = self.lock();
        inner.events.extend(event);
        inner.last_update = Some(record.clone());
        record
    }

    /// Verifies one file: policy's checks, then rollback against the store.
    fn examine(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
        config: &Config,
    ) -> Result<Verified, (String, Option<u64>, UpdateError)> {
        let unknown = |e| (String::new(), None, e);
        if meta.len() > MAX_TOKEN_BYTES as u64 {
            return Err(unknown(UpdateError::Bundle(Box::new(
                BundleError::TooLarge {
                    size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                    limit: MAX_TOKEN_BYTES,
                },
            ))));
        }
        let token = std::fs::read(path).map_err(|e| unknown(UpdateError::Read(e)))?;
        self.examine_bytes(&token, config)
    }

    /// Policy's checks on a token from any source, then rollback against the store.
    fn examine_bytes(
        &self,
        token: &[u8],
        config: &Config,
    ) -> Result<Verified, (String, Option<u64>, UpdateError)> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err((
                String::new(),
                None,
                UpdateError::Bundle(Box::new(BundleError::TooLarge {
                    size: token.len(),
                    limit: MAX_TOKEN_BYTES,
                })),
            ));
        }
        let digest = hex(&Sha256::digest(token.trim_ascii()));
        let fail = |version, e| (digest.clone(), version, e);
        let Some(audience) = config.policy.audience.as_deref() else {
            return Err(fail(None, UpdateError::NoAudience));
        };
        let anchors = config.trust.anchors();
        if anchors.is_empty() {
            return Err(fail(None, UpdateError::NoTrustAnchors));
        }
        let verified = verify(token, &anchors, audience, self.now())
            .map_err(|e| fail(None, UpdateError::Bundle(Box::new(e))))?;
        let version = verified.bundle.version;
        let inner = self.lock();
        let p = &inner.persisted;
        if version < p.highest_version {
            return Err(fail(
                Some(version),
                UpdateError::LowerVersion {
                    found: version,
                    highest: p.highest_version,
                },
            ));
        }
        if version == p.highest_version
            && let Some(accepted) = &p.highest_digest
            && *accepted != verified.digest
        {
            return Err(fail(
                Some(version),
                UpdateError::SameVersionDifferentContent {
                    version,
                    accepted: accepted.clone(),
                },
            ));
        }
        if self
            .active()
            .is_some_and(|a| a.verified.digest == verified.digest)
        {
            // The bundle in force, seen again (e.g. after a restart).
            return Err(fail(Some(version), UpdateError::AlreadyInForce));
        }
        Ok(verified)
    }

    /// Persists (archive, then state) and publishes. The bundle in force
    /// changes only once both writes are durable.
    fn activate(
        &self,
        verified: Verified,
        path: &Path,
    ) -> Result<Arc<Active>, (String, UpdateError)> {
        let digest = verified.digest.clone();
        let fail = |e| (digest.clone(), UpdateError::Persist(e));
        let archived = self.dir.join("archive").join(format!("{digest}.jwt"));
        // Rewritten unless identical: a damaged archive copy is repaired by
        // dropping the bundle in again.
        if std::fs::read(&archived).ok().as_deref() != Some(verified.token.as_bytes()) {
            write_atomic(&archived, verified.token.as_bytes()).map_err(fail)?;
        }
        let mut next = self.lock().persisted.clone();
        next.format = STATE_FORMAT;
        next.highest_version = verified.bundle.version;
        next.highest_digest = Some(digest.clone());
        next.active_digest = Some(digest.clone());
        next.time_floor = next.time_floor.max(verified.bundle.issued_at.seconds());
        self.write_state(&next).map_err(fail)?;
        let previous = self.active().map(|a| a.version());
        let active = Arc::new(Active {
            verified,
            source: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            activated_at: self.clock.now(),
        });
        {
            let mut inner = self.lock();
            inner.persisted = next;
            inner.start_problem = None;
            self.active.store(Some(Arc::clone(&active)));
        }
        tracing::info!(
            AIRGATE_EVENT = "bundle_accepted",
            version = active.version(),
            previous_version = previous,
            digest = %active.verified.digest,
            key_id = %active.verified.key_id,
            issuer = %active.verified.bundle.issuer,
            expires = active.verified.bundle.expires.seconds(),
            tenants = active.verified.bundle.tenants.len(),
            models = active.verified.bundle.models.len(),
            file = %path.display(),
            "policy bundle activated"
        );
        Ok(active)
    }

    fn write_state(&self, state: &Persisted) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join("state.json"), &bytes)
    }

    /// The document under `bundle` in `/admin/status`.
    pub fn status(&self, config: &Config) -> serde_json::Value {
        let active = self.active();
        let inner = self.lock();
        let grace = config.policy.expiry_grace;
        serde_json::json!({
            "in_force": active.as_ref().map(|a| serde_json::json!({
                "version": a.version(),
                "digest": a.verified.digest,
                "key_id": a.verified.key_id,
                "issuer": a.verified.bundle.issuer,
                "audience": a.verified.bundle.audience,
                "issued_at": a.verified.bundle.issued_at,
                "expires": a.verified.bundle.expires,
                "grace_until": grace_end(a, grace),
                "source": a.source,
                "activated_at": a.activated_at,
                "tenants": a.verified.bundle.tenants.keys().map(ToString::to_string).collect::<Vec<_>>(),
                "models": a.verified.bundle.models.keys().collect::<Vec<_>>(),
            })),
            "freshness": inner.freshness,
            "highest_version": inner.persisted.highest_version,
            "time_floor": inner.persisted.time_floor,
            "clock_behind_floor": inner.clock_behind,
            "start_problem": inner.start_problem,
            "last_update": inner.last_update,
            "inbox": config.policy.inbox.display().to_string(),
            "audience": config.policy.audience,
            "trust_anchors": config.trust.anchors.iter().map(|a| serde_json::json!({
                "key_id": a.key_id,
                "algorithm": a.key.algorithm.jose(),
                "sha256": a.key.fingerprint(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn grace_end(active: &Active, grace: Duration) -> UnixTime {
    active
        .verified
        .bundle
        .expires
        .plus(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX))
}

fn freshness(active: &Active, now: UnixTime, grace: Duration) -> Freshness {
    if now < active.verified.bundle.expires {
        Freshness::Valid
    } else if now < grace_end(active, grace) {
        Freshness::Grace
    } else {
        Freshness::Expired
    }
}

/// The rollback state, rebuilt from the archive when `state.json` cannot be
/// read: the highest verifiable version there is the floor, and in force.
fn recover_from_archive(dir: &Path, anchors: &TrustAnchors, audience: Option<&str>) -> Persisted {
    let mut best: Option<Verified> = None;
    let mut floor = 0;
    if let (Ok(entries), Some(audience)) = (std::fs::read_dir(dir.join("archive")), audience) {
        for entry in entries.filter_map(Result::ok) {
            let Ok(token) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(v) = verify_signed(&token, anchors, audience) else {
                continue;
            };
            floor = floor.max(v.bundle.issued_at.seconds());
            if best
                .as_ref()
                .is_none_or(|b| v.bundle.version > b.bundle.version)
            {
                best = Some(v);
            }
        }
    }
    Persisted {
        format: STATE_FORMAT,
        highest_version: best.as_ref().map_or(0, |b| b.bundle.version),
        highest_digest: best.as_ref().map(|b| b.digest.clone()),
        active_digest: best.as_ref().map(|b| b.digest.clone()),
        time_floor: floor,
    }
}

/// Write to a temporary file, fsync it, rename it over `path`, fsync the
/// directory: after a crash, `path` holds the old content or the new, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
