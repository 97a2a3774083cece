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
//! The rollback floor (highest version and its digest, time floor) is also
//! kept beside the audit marker, outside the state directory
//! (`policy-floor.json`), so that losing `state.json`, or the whole state
//! directory, does not reopen rollback: at start the higher of the two
//! counts, and a missing or unreadable `state.json` is rebuilt from the
//! archive when the archive holds bundles.
//!
//! At start the active bundle is read back from the archive and verified
//! again: a tampered file is not trusted, nor one below the floor, nor one
//! the trust anchors now configured did not sign. A reload weighs the bundle
//! in force the same way ([`Policy::reverify`]): one that no longer verifies
//! is withdrawn and the daemon fails closed, naming why. Requests
//! take one `Arc<Active>` at their start, so a swap never changes the bundle
//! under a request.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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

/// The copy of the rollback floor, beside the audit marker.
pub const FLOOR_COPY: &str = "policy-floor.json";

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

/// The rollback floor as kept beside the audit marker. Read leniently (each
/// value can only raise the floor), written whole.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct FloorCopy {
    format: u32,
    highest_version: u64,
    highest_digest: Option<String>,
    time_floor: i64,
}

impl FloorCopy {
    fn of(p: &Persisted) -> Self {
        Self {
            format: STATE_FORMAT,
            highest_version: p.highest_version,
            highest_digest: p.highest_digest.clone(),
            time_floor: p.time_floor,
        }
    }

    /// Whether this copy holds what `p` does (the format aside).
    fn holds(&self, p: &Persisted) -> bool {
        self.highest_version == p.highest_version
            && self.highest_digest == p.highest_digest
            && self.time_floor == p.time_floor
    }
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

    /// Whether the same bytes would be refused again whatever happens on
    /// this host: a bad signature, malformed claims or content, a rollback,
    /// expiry (time, and the floor, only move forward), or already in force.
    /// Not: a bundle not valid yet, one this host's configuration (trust
    /// anchors, audience; reloadable) refuses, an I/O error.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Bundle(e) => !matches!(
                **e,
                BundleError::NotYetValid { .. }
                    | BundleError::UnknownKeyId(_)
                    | BundleError::AlgorithmMismatch { .. }
                    | BundleError::WrongAudience { .. }
            ),
            Self::LowerVersion { .. }
            | Self::SameVersionDifferentContent { .. }
            | Self::AlreadyInForce => true,
            Self::NoAudience | Self::NoTrustAnchors | Self::Read(_) | Self::Persist(_) => false,
        }
    }
}

/// What became of a bundle offered by the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// It is in force now.
    Accepted,
    /// Already in force, or refused for a reason the same bytes cannot
    /// outgrow ([`UpdateError::is_permanent`]): not worth fetching again.
    Settled,
    /// Refused for now (not valid yet, this host's configuration, an I/O
    /// error): to be fetched and offered again.
    Retry,
}

impl Offered {
    /// Whether the source may stop serving these bytes to us (a mirror
    /// remembers their ETag).
    pub fn settles(self) -> bool {
        self != Self::Retry
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
    /// Why the bundle that was in force was taken out of it by a reload
    /// (it no longer verified under the configuration then loaded).
    withdrawn: Option<String>,
    freshness: Freshness,
    clock_behind: bool,
    /// Audit events not yet handed to the audit store.
    events: Vec<airgate_policy::audit::Event>,
    /// The state was rebuilt or raised at start: `state.json` and the copy
    /// are written at the next tick (not by `open`, which operator commands
    /// use too).
    unsaved: bool,
    /// The copy beside the audit marker is missing, behind the state, or
    /// could not be written: written again at the next tick.
    copy_behind: bool,
    /// Why the copy beside the audit marker could not be read or written.
    copy_problem: Option<String>,
    /// The last offered bundle refused for now (digest, result): offered
    /// again at every poll, it is recorded (audit, metrics, log) only once.
    retrying: Option<(String, &'static str)>,
}

/// The policy store and the bundle in force. See the module docs.
pub struct Policy {
    dir: PathBuf,
    /// Beside the audit marker; `None` when the marker is turned off.
    floor_copy: Option<PathBuf>,
    clock: Arc<dyn Clock + Send + Sync>,
    active: ArcSwapOption<Active>,
    inner: Mutex<Inner>,
    /// Held from reading the state to writing it (activation by the inbox
    /// or the mirror, the floor's tick), so an older state is never written
    /// over a newer one. Taken before `inner`.
    persist: Mutex<()>,
}

pub use crate::clock::{SystemClock, set_clock_offset, system_time_now};

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
        let mut recovered = Vec::new();
        let mut persisted = read_state(&dir, &anchors, audience, &mut recovered)?;
        let floor_copy = config
            .audit
            .marker
            .as_deref()
            .map(|m| m.with_file_name(FLOOR_COPY));
        let (copy_behind, copy_problem) = match &floor_copy {
            Some(path) => raise_to_copy(path, &mut persisted, &mut recovered),
            None => (false, None),
        };
        let recovered = (!recovered.is_empty()).then(|| recovered.join("; "));
        let mut events = Vec::new();
        if let Some(reason) = &recovered {
            tracing::error!(
                AIRGATE_EVENT = "policy_state_recovered",
                highest_version = persisted.highest_version,
                time_floor = persisted.time_floor,
                "{reason}"
            );
            events.push(airgate_policy::audit::Event::PolicyStateRecovered {
                reason: reason.clone(),
                highest_version: persisted.highest_version,
                time_floor: persisted.time_floor,
            });
        }

        let policy = Self {
            dir,
            floor_copy,
            clock,
            active: ArcSwapOption::empty(),
            persist: Mutex::new(()),
            inner: Mutex::new(Inner {
                unsaved: recovered.is_some(),
                copy_behind,
                persisted,
                seen: HashMap::new(),
                last_update: None,
                start_problem: recovered,
                withdrawn: None,
                freshness: Freshness::None,
                clock_behind: false,
                events,
                copy_problem,
                retrying: None,
            }),
        };
        let (active_digest, highest_digest) = {
            let inner = policy.lock();
            (
                inner.persisted.active_digest.clone(),
                inner.persisted.highest_digest.clone(),
            )
        };
        if let Some(digest) = active_digest {
            // The bundle in force, unless it is below the floor; then the
            // highest accepted, if it is archived (a state file set back).
            let restored = policy
                .restore(&digest, &anchors, audience)
                .map(|v| (digest.clone(), v))
                .or_else(|e| match &highest_digest {
                    Some(h) if *h != digest => policy
                        .restore(h, &anchors, audience)
                        .map(|v| {
                            tracing::warn!(
                                "persisted bundle {digest} is not restored ({e}); the highest accepted, {h}, is"
                            );
                            (h.clone(), v)
                        })
                        .map_err(|_| e),
                    _ => Err(e),
                });
            match restored {
                Ok((restored_digest, verified)) => {
                    tracing::info!(
                        version = verified.bundle.version,
                        digest = %verified.digest,
                        expires = verified.bundle.expires.seconds(),
                        "policy bundle restored from the state directory"
                    );
                    if restored_digest != digest {
                        let mut inner = policy.lock();
                        inner.persisted.active_digest = Some(restored_digest);
                        inner.unsaved = true;
                    }
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

    /// An archived bundle to put back in force at start: verified again, and
    /// not below the highest version accepted.
    fn restore(
        &self,
        digest: &str,
        anchors: &TrustAnchors,
        audience: Option<&str>,
    ) -> Result<Verified, String> {
        let verified = self.read_archived(digest, anchors, audience)?;
        let highest = self.lock().persisted.highest_version;
        if verified.bundle.version < highest {
            return Err(format!(
                "its version {} is below version {highest}, the highest accepted (rollback)",
                verified.bundle.version
            ));
        }
        Ok(verified)
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
        let inner = self.lock();
        match inner.withdrawn.as_ref().or(inner.start_problem.as_ref()) {
            Some(p) => format!("no policy bundle in force: {p}"),
            None => "no policy bundle in force".to_owned(),
        }
    }

    /// Weighs the bundle in force again under `config`, as a reload brings
    /// it: its signature against the trust anchors now configured, its
    /// audience against this host's. One that no longer verifies is taken
    /// out of force (requests fail closed, naming why; its archive copy,
    /// the persisted state and the rollback floor are kept, so a restart
    /// weighs it the same way). A bundle so taken out that verifies again
    /// at a later reload (the anchor put back) is put back in force.
    /// Returns whether the bundle in force changed. Blocking (reads the
    /// archive to put a bundle back).
    pub fn reverify(&self, config: &Config, metrics: &crate::metrics::Metrics) -> bool {
        let _persist = self.persist.lock().unwrap_or_else(PoisonError::into_inner);
        let anchors = config.trust.anchors();
        let audience = config.policy.audience.as_deref();
        let changed = match self.active() {
            Some(active) => self.withdraw_unless_verified(&active, &anchors, audience),
            None => self.put_back_if_verified(&anchors, audience),
        };
        if changed {
            self.publish_metrics(metrics);
        }
        changed
    }

    fn withdraw_unless_verified(
        &self,
        active: &Active,
        anchors: &TrustAnchors,
        audience: Option<&str>,
    ) -> bool {
        let checked = match audience {
            None => Err(UpdateError::NoAudience.to_string()),
            Some(audience) => verify_signed(active.verified.token.as_bytes(), anchors, audience)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        let Err(why) = checked else {
            return false;
        };
        let (version, digest) = (active.version(), active.verified.digest.clone());
        tracing::error!(
            AIRGATE_EVENT = "bundle_withdrawn",
            version,
            digest = %digest,
            key_id = %active.verified.key_id,
            error = %why,
            "the bundle in force does not verify under the reloaded configuration: failing closed"
        );
        let mut inner = self.lock();
        inner.withdrawn = Some(format!(
            "bundle version {version} ({digest}) was withdrawn at a reload: it no longer verifies ({why})"
        ));
        inner
            .events
            .push(airgate_policy::audit::Event::BundleWithdrawn {
                version,
                digest,
                reason: why,
            });
        self.active.store(None);
        true
    }

    fn put_back_if_verified(&self, anchors: &TrustAnchors, audience: Option<&str>) -> bool {
        let digest = {
            let inner = self.lock();
            match (&inner.withdrawn, &inner.persisted.active_digest) {
                (Some(_), Some(d)) => d.clone(),
                _ => return false,
            }
        };
        let Ok(verified) = self.restore(&digest, anchors, audience) else {
            return false;
        };
        let version = verified.bundle.version;
        tracing::info!(
            AIRGATE_EVENT = "bundle_accepted",
            version,
            digest = %digest,
            key_id = %verified.key_id,
            "the withdrawn bundle verifies under the reloaded configuration: back in force"
        );
        let mut inner = self.lock();
        inner.withdrawn = None;
        inner
            .events
            .push(airgate_policy::audit::Event::BundleAccepted {
                version,
                digest,
                source: "reload".to_owned(),
            });
        self.active.store(Some(Arc::new(Active {
            verified,
            source: "reload".to_owned(),
            activated_at: self.clock.now(),
        })));
        true
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
        if let Some(p) = &inner.copy_problem {
            warnings.push(p.clone());
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
        let _persist = self.persist.lock().unwrap_or_else(PoisonError::into_inner);
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
        let advance = system.seconds() > floor + FLOOR_STEP_SECONDS;
        if advance {
            inner.persisted.time_floor = system.seconds();
        }
        if advance || inner.unsaved {
            let persisted = inner.persisted.clone();
            drop(inner);
            match self.write_state(&persisted) {
                Ok(()) => self.lock().unsaved = false,
                Err(e) => tracing::warn!(error = %e, "cannot persist the policy state"),
            }
        } else if inner.copy_behind {
            let persisted = inner.persisted.clone();
            drop(inner);
            self.write_floor_copy(&persisted);
        }
        changed
    }

    /// Reads the inbox and activates the highest-versioned new bundle that
    /// passes every check. Blocking (file I/O); returns whether the bundle
    /// in force changed. `progress` is called after each file examined: a
    /// full inbox is many bounded steps (each bundle's patterns compile
    /// within policy's budget), not one long one for the watchdog.
    pub fn scan_inbox(
        &self,
        config: &Config,
        metrics: &crate::metrics::Metrics,
        progress: &dyn Fn(),
    ) -> bool {
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
            let examined = self.examine(&path, &meta, config);
            progress();
            match examined {
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
    /// activation as an inbox file. Says whether it is in force now, and
    /// whether it is worth offering again (see [`Offered`]).
    pub fn offer(
        &self,
        source: &str,
        token: &[u8],
        config: &Config,
        metrics: &crate::metrics::Metrics,
    ) -> Offered {
        let label = Path::new(source);
        let verified = match self.examine_bytes(token, config) {
            Ok(v) => v,
            Err((digest, version, e)) => {
                return self.offer_refused(label, digest, version, &e, metrics);
            }
        };
        match self.activate(verified, label) {
            Ok(active) => {
                self.lock().retrying = None;
                self.record(
                    label,
                    active.verified.digest.clone(),
                    Some(active.version()),
                    "accepted",
                    format!("version {} is in force", active.version()),
                );
                metrics
                    .bundle_updates
                    .get_or_create(&crate::metrics::ResultLabels { result: "accepted" })
                    .inc();
                self.publish_metrics(metrics);
                Offered::Accepted
            }
            Err((digest, e)) => self.offer_refused(label, digest, None, &e, metrics),
        }
    }

    fn offer_refused(
        &self,
        label: &Path,
        digest: String,
        version: Option<u64>,
        e: &UpdateError,
        metrics: &crate::metrics::Metrics,
    ) -> Offered {
        let permanent = e.is_permanent();
        let key = (digest.clone(), e.result());
        let repeated = {
            let mut inner = self.lock();
            let repeated = inner.retrying.as_ref() == Some(&key);
            inner.retrying = (!permanent).then_some(key);
            repeated
        };
        if repeated {
            // Status shows the latest word; the audit, metrics and log had it.
            self.lock().last_update = Some(UpdateRecord {
                at_unix: self.clock.now().seconds(),
                file: label.display().to_string(),
                digest,
                version,
                result: e.result(),
                message: e.to_string(),
            });
        } else {
            self.record(label, digest, version, e.result(), e.to_string());
            metrics
                .bundle_updates
                .get_or_create(&crate::metrics::ResultLabels { result: e.result() })
                .inc();
            match e {
                UpdateError::AlreadyInForce => {}
                UpdateError::Persist(_) => {
                    tracing::error!(source = %label.display(), error = %e, "bundle not activated; offered again at the next poll");
                }
                _ if permanent => {
                    tracing::warn!(source = %label.display(), error = %e, "bundle refused; the bundle in force is unchanged");
                }
                _ => {
                    tracing::warn!(source = %label.display(), error = %e, "bundle refused for now; offered again at the next poll");
                }
            }
        }
        if permanent {
            Offered::Settled
        } else {
            Offered::Retry
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
        let _persist = self.persist.lock().unwrap_or_else(PoisonError::into_inner);
        let digest = verified.digest.clone();
        let mut next = self.lock().persisted.clone();
        // Checked again here: the inbox and the mirror examine concurrently,
        // and the other may have activated a higher version since.
        if verified.bundle.version < next.highest_version {
            return Err((
                digest,
                UpdateError::LowerVersion {
                    found: verified.bundle.version,
                    highest: next.highest_version,
                },
            ));
        }
        let fail = |e| (digest.clone(), UpdateError::Persist(e));
        let archived = self.dir.join("archive").join(format!("{digest}.jwt"));
        // Rewritten unless identical: a damaged archive copy is repaired by
        // dropping the bundle in again.
        if std::fs::read(&archived).ok().as_deref() != Some(verified.token.as_bytes()) {
            write_atomic(&archived, verified.token.as_bytes()).map_err(fail)?;
        }
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
            inner.unsaved = false;
            inner.start_problem = None;
            inner.withdrawn = None;
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

    /// `state.json`, then the copy beside the audit marker: in that order, so
    /// a crash between them leaves the copy behind (rewritten at the next
    /// start), never ahead of a state it would make look like a rollback.
    fn write_state(&self, state: &Persisted) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join("state.json"), &bytes)?;
        self.write_floor_copy(state);
        Ok(())
    }

    /// Best effort: a copy that cannot be written is a warning (status,
    /// `/readyz`, the log), not a refusal; the state directory's is durable.
    fn write_floor_copy(&self, state: &Persisted) {
        let Some(path) = &self.floor_copy else {
            return;
        };
        let written = serde_json::to_vec_pretty(&FloorCopy::of(state))
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(parent) = path.parent()
                    && !parent.is_dir()
                {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                write_atomic(path, &bytes)
            });
        let problem = written.err().map(|e| {
            format!(
                "cannot keep the rollback floor copy {}: {e}",
                path.display()
            )
        });
        let mut inner = self.lock();
        // Retried every tick: said once, not every time.
        if let Some(p) = &problem
            && inner.copy_problem.as_ref() != Some(p)
        {
            tracing::warn!("{p}");
        }
        inner.copy_behind = problem.is_some();
        inner.copy_problem = problem;
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
            "floor_copy": self.floor_copy.as_ref().map(|p| p.display().to_string()),
            "floor_copy_problem": inner.copy_problem,
            "start_problem": inner.start_problem,
            "withdrawn": inner.withdrawn,
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

/// `state.json`, or the state rebuilt from the archive when it is unreadable,
/// of a newer format, or missing while the archive holds bundles (each
/// rebuild's reason added to `recovered`).
fn read_state(
    dir: &Path,
    anchors: &TrustAnchors,
    audience: Option<&str>,
    recovered: &mut Vec<String>,
) -> Result<Persisted, StoreError> {
    let state_path = dir.join("state.json");
    let why = match std::fs::read(&state_path) {
        Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(p) if p.format <= STATE_FORMAT => return Ok(p),
            // Written by a newer airgate: do not guess, and do not serve on
            // a rollback floor we cannot read.
            Ok(p) => format!(
                "{} has format {}, newer than this airgate understands ({STATE_FORMAT})",
                state_path.display(),
                p.format
            ),
            Err(e) => format!("{} is unreadable ({e})", state_path.display()),
        },
        // A first start has no archive either; a deleted state file with
        // bundles archived is not a first start.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !archive_has_bundles(dir) => {
            return Ok(Persisted {
                format: STATE_FORMAT,
                ..Persisted::default()
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
            "{} is missing though the archive holds bundles",
            state_path.display()
        ),
        Err(e) => return Err(io_err(&state_path)(e)),
    };
    recovered.push(format!("{why}; rollback state recovered from the archive"));
    Ok(recover_from_archive(dir, anchors, audience))
}

/// Raises `persisted` to the copy beside the audit marker where the copy is
/// higher (each raise's reason added to `recovered`). Returns whether the
/// copy is behind (to be written) and why it could not be read.
fn raise_to_copy(
    path: &Path,
    persisted: &mut Persisted,
    recovered: &mut Vec<String>,
) -> (bool, Option<String>) {
    let copy = match read_floor_copy(path) {
        Ok(copy) => copy.unwrap_or_default(),
        Err(e) => {
            let msg = format!("cannot read the rollback floor copy: {e}");
            tracing::warn!("{msg}");
            return (true, Some(msg));
        }
    };
    if copy.highest_version > persisted.highest_version {
        recovered.push(format!(
            "the state directory's highest version is {}, the copy in {} says {}: the higher is the rollback floor",
            persisted.highest_version,
            path.display(),
            copy.highest_version
        ));
        persisted.highest_version = copy.highest_version;
        persisted.highest_digest = copy.highest_digest.clone();
    }
    if copy.time_floor > persisted.time_floor {
        recovered.push(format!(
            "the state directory's time floor is {}, the copy in {} says {}: the higher is kept",
            persisted.time_floor,
            path.display(),
            copy.time_floor
        ));
        persisted.time_floor = copy.time_floor;
    }
    (!copy.holds(persisted), None)
}

/// Whether the archive holds any bundle (a state directory that has
/// accepted one before).
fn archive_has_bundles(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("archive")).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".jwt") && !n.starts_with('.'))
        })
    })
}

/// The copy beside the audit marker; `None` when there is none yet.
fn read_floor_copy(path: &Path) -> Result<Option<FloorCopy>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
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
