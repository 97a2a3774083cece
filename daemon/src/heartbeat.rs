//! Progress reporting for the watchdog.
//!
//! Every long-lived worker (the state probe now; the audit writer and each
//! engine later) registers here and reports progress. The systemd watchdog
//! is pinged only while every registered worker is healthy, so a worker stuck
//! in a syscall or an infinite loop gets the service restarted. A worker that
//! is waiting for work says so with [`Worker::idle`] and is never "stuck"; a
//! long but legitimate step (hashing a model, a long prefill) keeps calling
//! [`Worker::progress`] or declares a longer budget with [`Worker::expect`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Clone)]
pub struct Heartbeat {
    inner: Arc<Registry>,
}

/// A monotonic clock, injected so tests can move time by hand.
pub trait Monotonic: Send + Sync {
    /// Time elapsed since some fixed point.
    fn elapsed(&self) -> Duration;
}

struct SystemMonotonic(Instant);

impl Monotonic for SystemMonotonic {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

struct Registry {
    clock: Box<dyn Monotonic>,
    workers: Mutex<Vec<Arc<WorkerState>>>,
}

struct WorkerState {
    name: String,
    /// Milliseconds since the registry's epoch of the last progress report.
    last_ms: AtomicU64,
    /// How long the worker may go without progress before it counts as stuck.
    budget_ms: AtomicU64,
    idle: AtomicBool,
    /// Set when the handle was dropped during a panic: the worker is gone.
    dead: AtomicBool,
}

/// A registered worker's handle. Dropping it deregisters the worker, unless it
/// is dropped by a panic, in which case the worker stays registered as dead
/// and the watchdog stops.
pub struct Worker {
    registry: Arc<Registry>,
    state: Arc<WorkerState>,
}

/// What the watchdog and /admin/status see of one worker.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WorkerHealth {
    pub name: String,
    pub since_progress_ms: u64,
    pub budget_ms: u64,
    pub idle: bool,
    pub stuck: bool,
    pub dead: bool,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemMonotonic(Instant::now())))
    }

    pub fn with_clock(clock: Box<dyn Monotonic>) -> Self {
        Self {
            inner: Arc::new(Registry {
                clock,
                workers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Registers a worker that must report progress at least every `budget`.
    pub fn register(&self, name: &str, budget: Duration) -> Worker {
        let state = Arc::new(WorkerState {
            name: name.to_owned(),
            last_ms: AtomicU64::new(self.inner.now_ms()),
            budget_ms: AtomicU64::new(millis(budget)),
            idle: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        });
        self.inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&state));
        Worker {
            registry: Arc::clone(&self.inner),
            state,
        }
    }

    /// The health of every registered worker, in registration order.
    pub fn check(&self) -> Vec<WorkerHealth> {
        let now = self.inner.now_ms();
        let workers = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        workers
            .iter()
            .map(|w| {
                let since = now.saturating_sub(w.last_ms.load(Ordering::Acquire));
                let budget = w.budget_ms.load(Ordering::Relaxed);
                let idle = w.idle.load(Ordering::Acquire);
                let dead = w.dead.load(Ordering::Acquire);
                WorkerHealth {
                    name: w.name.clone(),
                    since_progress_ms: since,
                    budget_ms: budget,
                    idle,
                    stuck: dead || (!idle && since > budget),
                    dead,
                }
            })
            .collect()
    }

    /// True when no registered worker is stuck or dead.
    pub fn healthy(&self) -> bool {
        self.check().iter().all(|w| !w.stuck)
    }
}

impl Registry {
    fn now_ms(&self) -> u64 {
        millis(self.clock.elapsed())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Worker {
    /// The worker did something useful; it is not stuck.
    pub fn progress(&self) {
        self.state.idle.store(false, Ordering::Release);
        self.state
            .last_ms
            .store(self.registry.now_ms(), Ordering::Release);
    }

    /// The worker is waiting for work; it cannot be stuck until it reports progress again.
    pub fn idle(&self) {
        self.state.idle.store(true, Ordering::Release);
    }

    /// Counts progress now and allows `budget` until the next report, for a
    /// step known to take long (hashing a large model, a long prefill).
    pub fn expect(&self, budget: Duration) {
        self.state
            .budget_ms
            .store(millis(budget), Ordering::Relaxed);
        self.progress();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.state.dead.store(true, Ordering::Release);
            return;
        }
        self.registry
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|w| !Arc::ptr_eq(w, &self.state));
    }
}

#[cfg(test)]
mod tests;
