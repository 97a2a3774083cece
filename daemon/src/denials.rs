//! Denials that cost a durable record each, rate-limited before they do.
//!
//! Every request that reaches policy leaves a decision record, and a
//! record is an fsync. A caller the bundle does not know (no tenant, an
//! ambiguous identity) or one naming a model that is not in the manifest
//! is refused before any tenant limit applies, so nothing else bounds how
//! fast it can make the daemon write. Here each transport principal (a
//! Unix uid — not a pid, which a caller can renew at will — or a client
//! certificate) gets a small bucket of recorded denials, and all of them
//! together one more; past those a denial is answered the same way but
//! not recorded. What was not recorded is counted (a metric) and summed up
//! in one `denials_unrecorded` record a minute while it goes on.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use airgate_policy::decision::Reason;
use airgate_policy::identity::Identity;

/// Recorded denials a principal may have in a burst, and per second after.
const BURST: f64 = 20.0;
const PER_SECOND: f64 = 2.0;
/// All principals together.
const GLOBAL_BURST: f64 = 200.0;
const GLOBAL_PER_SECOND: f64 = 50.0;
/// Principals tracked at once; past it the fullest buckets are forgotten
/// (a forgotten principal starts from a full bucket, bounded by the global one).
const MAX_TRACKED: usize = 4096;
/// Distinct principals a summary names the count of, at most.
const MAX_SUMMARY_PRINCIPALS: usize = 4096;
/// How often a summary of what was not recorded is written.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Whether a denial for `reason` is one no tenant limit bounds.
pub fn before_limits(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::UnknownIdentity | Reason::AmbiguousIdentity | Reason::ModelNotInManifest
    )
}

/// The principal a bucket belongs to.
pub fn principal(identity: &Identity) -> String {
    match identity {
        Identity::Unix(p) => format!("uid:{}", p.uid),
        Identity::Tls(p) => format!("cert:{}", p.sha256),
    }
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, burst: f64, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Inner {
    buckets: HashMap<String, Bucket>,
    global: Bucket,
    unrecorded: u64,
    principals: HashSet<String>,
}

/// See the module docs.
pub struct DenialLimiter {
    inner: Mutex<Inner>,
}

/// What was not recorded since the last summary.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub denials: u64,
    pub principals: u64,
}

impl DenialLimiter {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                buckets: HashMap::new(),
                global: Bucket::full(GLOBAL_BURST, now),
                unrecorded: 0,
                principals: HashSet::new(),
            }),
        }
    }

    /// Whether this denial gets its record; if not, it is counted. A
    /// caller the bundle knows (a tenant naming a model not in the
    /// manifest) has its own allowance only: it cannot use up the shared
    /// one, which would hide unknown callers' first denials.
    pub fn record(&self, principal: &str, known: bool, now: Instant) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.buckets.len() >= MAX_TRACKED && !inner.buckets.contains_key(principal) {
            // Forget the principals that have been quiet longest.
            let mut ages: Vec<Instant> = inner.buckets.values().map(|b| b.at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            inner.buckets.retain(|_, b| b.at > cutoff);
        }
        let own = inner
            .buckets
            .entry(principal.to_owned())
            .or_insert_with(|| Bucket::full(BURST, now))
            .take(BURST, PER_SECOND, now);
        let recorded = own && (known || inner.global.take(GLOBAL_BURST, GLOBAL_PER_SECOND, now));
        if !recorded {
            inner.unrecorded += 1;
            if inner.principals.len() < MAX_SUMMARY_PRINCIPALS {
                inner.principals.insert(principal.to_owned());
            }
        }
        recorded
    }

    /// What went unrecorded since the last call, if anything did.
    pub fn take_summary(&self) -> Option<Summary> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.unrecorded == 0 {
            return None;
        }
        let summary = Summary {
            denials: inner.unrecorded,
            principals: inner.principals.len() as u64,
        };
        inner.unrecorded = 0;
        inner.principals.clear();
        Some(summary)
    }
}

impl Default for DenialLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_recorded_up_to_its_burst_and_summed_up() {
        let limiter = DenialLimiter::new();
        let t0 = Instant::now();
        let recorded = (0..1000)
            .filter(|_| limiter.record("uid:1000", false, t0))
            .count();
        assert_eq!(recorded, BURST as usize);
        // Another principal has its own bucket.
        assert!(limiter.record("uid:1001", false, t0));
        assert_eq!(
            limiter.take_summary(),
            Some(Summary {
                denials: 1000 - BURST as u64,
                principals: 1
            })
        );
        assert_eq!(limiter.take_summary(), None);
        // The bucket refills with time.
        assert!(limiter.record("uid:1000", false, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn many_principals_share_one_global_bound_and_memory_stays_bounded() {
        let limiter = DenialLimiter::new();
        let t0 = Instant::now();
        let recorded = (0..20_000)
            .filter(|i| limiter.record(&format!("cert:{i}"), false, t0))
            .count();
        assert_eq!(recorded, GLOBAL_BURST as usize);
        // A known tenant's own allowance is not taken from the drained shared one.
        assert!(limiter.record("uid:77", true, t0));
        let inner = limiter.inner.lock().expect("lock");
        assert!(inner.buckets.len() <= MAX_TRACKED);
        assert!(inner.principals.len() <= MAX_SUMMARY_PRINCIPALS);
    }
}
