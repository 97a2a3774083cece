//! Fault injection for tests of the daemon's own failure handling.
//!
//! `AIRGATE_FAILPOINTS` holds comma-separated `name=value` entries. It exists
//! so end-to-end tests can make a real worker hang (a stuck disk is not
//! something a test can order from the kernel) and watch the watchdog react.
//! Every active failpoint is logged at WARN on start, so one can never be
//! active in production unnoticed.

use std::time::Duration;

use crate::config::parse_duration;

pub const ENV: &str = "AIRGATE_FAILPOINTS";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failpoints {
    /// The state probe's blocking call never returns once the daemon has run this long.
    pub state_probe_hang_after: Option<Duration>,
    /// Seconds added to the daemon's clock (decisions, audit record times).
    pub clock_offset: Option<i64>,
    /// Every guard scoring first waits this long (a stalled guard).
    pub guard_delay: Option<Duration>,
}

impl Failpoints {
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(ENV) {
            Ok(spec) => Self::parse(&spec),
            Err(_) => Ok(Self::default()),
        }
    }

    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut fp = Self::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
            match name {
                "state-probe-hang-after" => {
                    fp.state_probe_hang_after = Some(parse_duration(value)?);
                }
                "guard-delay" => fp.guard_delay = Some(parse_duration(value)?),
                "clock-offset" => {
                    fp.clock_offset = Some(value.parse().map_err(|_| {
                        format!("{ENV}: clock-offset wants signed seconds, found {value:?}")
                    })?);
                }
                other => return Err(format!("{ENV}: unknown failpoint {other:?}")),
            }
        }
        Ok(fp)
    }

    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}
