//! Request ids: taken from the caller when it sends a usable one, generated
//! otherwise, returned in `X-Request-Id` and carried by every log line (and,
//! later, audit record) about the request.

use std::fmt;

use http::HeaderMap;

pub const HEADER: &str = "x-request-id";

/// A request id that is safe to echo in a header, a log line and a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(String);

/// Where the id came from, for the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Header,
    TraceParent,
    Generated,
}

impl RequestId {
    /// `X-Request-Id` if it is 1 to 128 characters of `A-Z a-z 0-9 - _ . :`;
    /// else the trace id of a valid W3C `traceparent`; else a fresh random id.
    pub fn from_headers(headers: &HeaderMap) -> (Self, Origin) {
        if let Some(id) = headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| acceptable(v))
        {
            return (Self(id.to_owned()), Origin::Header);
        }
        if let Some(trace) = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id)
        {
            return (Self(trace.to_owned()), Origin::TraceParent);
        }
        (Self::generate(), Origin::Generated)
    }

    /// 128 random bits as 32 lower-case hex digits (the shape of a W3C trace id).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        // The OS random source failing is not something a request can handle;
        // fall back to a time-and-counter id rather than refusing service.
        if getrandom::fill(&mut bytes).is_err() {
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes[..8].copy_from_slice(&(nanos as u64).to_be_bytes());
            bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        }
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The trace id of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`,
/// neither id all zeros.
fn trace_id(header: &str) -> Option<&str> {
    let mut parts = header.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (version == "00"
        && parts.next().is_none()
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && nonzero(trace)
        && nonzero(parent))
    .then_some(trace)
}

#[cfg(test)]
mod tests;
