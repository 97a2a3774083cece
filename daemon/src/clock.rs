//! The host's clock: the one place the daemon reads the time of day
//! (policy gets it through the `Clock` trait, never on its own). Imports
//! nothing of the crate, so every module may use it.

use std::time::{SystemTime, UNIX_EPOCH};

use airgate_policy::time::{Clock, UnixTime};

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
