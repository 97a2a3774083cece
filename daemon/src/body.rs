//! Request bodies, read whole under three bounds: the request's size limit, a
//! deadline that grows with the bytes received, and the daemon-wide budget of
//! bytes that all bodies together may hold.
//!
//! While a request is in flight its connection's header and idle clocks are
//! off, so without a deadline here a peer that declares a body and sends none
//! (or sends it a byte a minute) would hold its connection slot for as long as
//! it liked. And bodies read side by side, each under the per-request limit,
//! would add up without bound, parsed JSON taking many times its text; so
//! every byte is charged to one budget before it is kept, and a full budget is
//! refused at once, never waited on.
//!
//! This module knows bytes and time, not routes or HTTP: the api maps
//! [`BodyError`] to a status.

use std::ops::Deref;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What a JSON body is charged per byte while it lives: its text, plus up to
/// 16 bytes of serde_json `Value` per byte of it (`[0,0,...]` makes a 32-byte
/// `Value` of every two bytes).
pub const JSON_CHARGE: u64 = 17;

/// The budget is counted in KiB, so that one charge fits the semaphore's u32.
const UNIT: u64 = 1024;

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(
        "request body needs {needed} bytes buffered, more than all request bodies together may take ({budget})"
    )]
    OverBudget { needed: u64, budget: u64 },
    #[error("the request bodies being read already take the daemon's whole body budget")]
    Busy,
    #[error("request body not received in time: {received} bytes in {elapsed_ms} ms")]
    Timeout { received: u64, elapsed_ms: u64 },
    #[error("error reading the request body: {0}")]
    Read(String),
}

/// The bounds one body is read under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Largest body, in bytes.
    pub limit: u64,
    /// Time allowed on top of what the bytes received have earned.
    pub timeout: Duration,
    /// Each byte received earns `1 / min_bytes_per_sec` seconds more.
    pub min_bytes_per_sec: u64,
}

impl Rules {
    /// When the body must be complete, given how much of it has come: a
    /// peer that keeps up the minimum rate is never cut off, and one that
    /// stalls is cut off `timeout` after its last byte was due.
    pub fn deadline(&self, started: Instant, received: u64) -> Instant {
        let earned =
            Duration::from_millis(received.saturating_mul(1000) / self.min_bytes_per_sec.max(1));
        let allowed = self.timeout.saturating_add(earned);
        started
            .checked_add(allowed)
            .unwrap_or_else(|| started + Duration::from_secs(u64::from(u32::MAX)))
    }
}

/// The bytes all request bodies may hold at once. Clones share it.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    capacity: usize,
}

impl BodyBudget {
    pub fn new(bytes: u64) -> Self {
        let capacity = usize::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        to_u64(self.capacity).saturating_mul(UNIT)
    }

    /// Bytes charged to bodies now (for status).
    pub fn in_use(&self) -> u64 {
        to_u64(self.capacity.saturating_sub(self.units.available_permits())).saturating_mul(UNIT)
    }

    /// An empty charge, to grow as a body arrives.
    pub fn charge(&self) -> Charge {
        Charge {
            budget: self.clone(),
            bytes: 0,
            permit: None,
        }
    }
}

/// Bytes charged to the budget for one body: an owned reservation, given
/// back when it is dropped, however the request ends.
#[derive(Debug)]
pub struct Charge {
    budget: BodyBudget,
    bytes: u64,
    permit: Option<OwnedSemaphorePermit>,
}

impl Charge {
    /// Bytes charged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Charges `more` bytes on top, at once or not at all.
    pub fn add(&mut self, more: u64) -> Result<(), BodyError> {
        let bytes = self.bytes.saturating_add(more);
        let needed = bytes.div_ceil(UNIT);
        let held = to_u64(
            self.permit
                .as_ref()
                .map_or(0, OwnedSemaphorePermit::num_permits),
        );
        if needed > held {
            let over = || BodyError::OverBudget {
                needed: bytes,
                budget: self.budget.bytes(),
            };
            if needed > to_u64(self.budget.capacity) {
                return Err(over());
            }
            let extra = u32::try_from(needed - held).map_err(|_| over())?;
            let permit = Arc::clone(&self.budget.units)
                .try_acquire_many_owned(extra)
                .map_err(|_| BodyError::Busy)?;
            match &mut self.permit {
                Some(mine) => mine.merge(permit),
                None => self.permit = Some(permit),
            }
        }
        self.bytes = bytes;
        Ok(())
    }
}

/// A body, or what it was parsed into, with its charge: its bytes stay
/// counted for as long as the value lives.
#[derive(Debug)]
pub struct Buffered<T> {
    value: T,
    charge: Charge,
}

impl<T> Deref for Buffered<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Buffered<T> {
    /// What the value became, under the same charge.
    pub fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<Buffered<U>, E> {
        Ok(Buffered {
            value: f(self.value)?,
            charge: self.charge,
        })
    }

    /// Bytes charged for it.
    pub fn charged(&self) -> u64 {
        self.charge.bytes()
    }
}

impl Buffered<Bytes> {
    /// Charges for the document the first `json_bytes` of these bytes parse
    /// into, before they are parsed: [`JSON_CHARGE`] per JSON byte in all,
    /// and one per byte for the rest.
    pub fn charge_json(&mut self, json_bytes: usize) -> Result<(), BodyError> {
        let parsed = to_u64(json_bytes.min(self.value.len())).saturating_mul(JSON_CHARGE - 1);
        let total = to_u64(self.value.len()).saturating_add(parsed);
        self.charge.add(total.saturating_sub(self.charge.bytes()))
    }
}

/// Reads a whole body under `rules`, charging `budget` for its buffer before
/// the buffer grows. `declared` is its Content-Length, if any: one over the
/// limit is refused before a byte is read.
pub async fn read<B>(
    body: B,
    declared: Option<u64>,
    rules: Rules,
    budget: &BodyBudget,
) -> Result<Buffered<Bytes>, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let too_large = || BodyError::TooLarge { limit: rules.limit };
    if declared.is_some_and(|len| len > rules.limit) {
        return Err(too_large());
    }
    let limit = usize::try_from(rules.limit).unwrap_or(usize::MAX);
    let started = Instant::now();
    let mut charge = budget.charge();
    let mut buf: Vec<u8> = Vec::new();
    let mut body = pin!(body);
    loop {
        let received = to_u64(buf.len());
        let next = tokio::time::timeout_at(rules.deadline(started, received), body.frame()).await;
        let frame = match next {
            Err(_) => {
                return Err(BodyError::Timeout {
                    received,
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing a handler reads.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let needed = buf.len().saturating_add(data.len());
        if needed > limit {
            return Err(too_large());
        }
        if needed > buf.capacity() {
            // Grow as Vec would (doubling), never past the limit, and charge
            // the new capacity before it is allocated.
            let capacity = buf.capacity().saturating_mul(2).clamp(needed, limit);
            charge.add(to_u64(capacity).saturating_sub(charge.bytes()))?;
            buf.reserve_exact(capacity - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Buffered {
        value: Bytes::from(buf),
        charge,
    })
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
