//! The systemd side of the life cycle: readiness and status notifications,
//! the watchdog ping, and sockets passed by socket activation.
//!
//! Everything here is a no-op when the daemon is not started by systemd
//! (no NOTIFY_SOCKET, no LISTEN_FDS), so the same binary runs by hand.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::heartbeat::Heartbeat;
use crate::metrics::Metrics;

/// Sends sd_notify messages; cheap to clone, silent without NOTIFY_SOCKET.
#[derive(Clone, Default)]
pub struct Notifier {
    warned: std::sync::Arc<AtomicBool>,
}

impl Notifier {
    fn send(&self, states: &[NotifyState<'_>]) {
        // unset_env = false: the environment is shared with other threads, and
        // child processes are not spawned by the daemon.
        if let Err(e) = sd_notify::notify(false, states)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "cannot send to NOTIFY_SOCKET");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        // MONOTONIC_USEC is what systemd 253+ (Type=notify-reload) expects
        // with RELOADING=1; 252 ignores it.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Ends a reload; systemd 252 expects READY=1 after RELOADING=1.
    pub fn reloaded(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Asks for more start-up time, e.g. while large models are hashed.
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }
}

/// The watchdog period systemd asked for (WATCHDOG_USEC), if it is meant for
/// this process: as sd_watchdog_enabled(3), WATCHDOG_PID must name this
/// process when it is set, and may be absent.
pub fn watchdog_period() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(pid) if pid.parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Descriptors passed by socket activation, by FileDescriptorName.
#[derive(Debug, Default)]
pub struct ActivatedFds {
    by_name: BTreeMap<String, Vec<RawFd>>,
}

impl ActivatedFds {
    /// Reads LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES. Call once, before any
    /// thread is started: it unsets those variables so they are not
    /// inherited or read twice.
    pub fn take() -> std::io::Result<Self> {
        let mut by_name: BTreeMap<String, Vec<RawFd>> = BTreeMap::new();
        for (fd, name) in sd_notify::listen_fds_with_names(true)? {
            by_name.entry(name).or_default().push(fd);
        }
        Ok(Self { by_name })
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Claims the descriptor named `name`, or, when systemd gave no names
    /// ("unknown") and exactly one descriptor, that one.
    pub fn claim(&mut self, name: &str) -> Option<RawFd> {
        if let Some(fds) = self.by_name.get_mut(name) {
            let fd = fds.pop();
            if fds.is_empty() {
                self.by_name.remove(name);
            }
            return fd;
        }
        let unnamed = self.by_name.get("unknown").map_or(0, Vec::len);
        if unnamed == 1 && self.by_name.len() == 1 {
            return self.by_name.remove("unknown").and_then(|mut v| v.pop());
        }
        None
    }

    /// What nobody claimed: logged and closed by the caller.
    pub fn into_unclaimed(self) -> Vec<(String, RawFd)> {
        self.by_name
            .into_iter()
            .flat_map(|(name, fds)| fds.into_iter().map(move |fd| (name.clone(), fd)))
            .collect()
    }
}

/// Pings the watchdog at a third of its period while every registered worker
/// is healthy, and stops pinging (logging which worker) while any is stuck.
pub async fn run_watchdog(
    period: Duration,
    heartbeat: Heartbeat,
    notifier: Notifier,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_stuck = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let health = heartbeat.check();
        let stuck: Vec<&str> = health
            .iter()
            .filter(|w| w.stuck)
            .map(|w| w.name.as_str())
            .collect();
        metrics.set_workers(&health);
        if stuck.is_empty() {
            if was_stuck {
                tracing::info!("all workers report progress again; watchdog pings resume");
            }
            was_stuck = false;
            notifier.watchdog();
            metrics.watchdog_pings.inc();
        } else if !was_stuck {
            was_stuck = true;
            tracing::error!(
                workers = %stuck.join(","),
                "worker stopped reporting progress; withholding watchdog pings"
            );
        }
    }
}

#[cfg(test)]
mod tests;
