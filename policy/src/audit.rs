//! Audit records: what they say, how they are sealed into the chain, and how
//! a chain is verified. The store (sled, the writer, fsync) is the daemon's;
//! the encoding and the checks live here so `airgate audit verify` and the
//! daemon run the same code, on bytes.
//!
//! A stored record is `crc32 (4) || seq (8, BE) || prev (32) || hash (32) ||
//! content`, under the big-endian `seq` as key. `hash` is SHA-256 over a
//! domain tag, `seq`, `prev` and the content bytes exactly as stored, so
//! verification never re-serialises anything. The CRC tells storage damage
//! from tampering: a record whose CRC holds but whose hash does not was
//! rewritten, not rotted.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::Identity;

const DOMAIN: &[u8] = b"airgate-audit-v1\0";
/// Bytes a stored record adds to its content.
pub const HEADER: usize = 4 + 8 + 32 + 32;

/// The hash the genesis record links to.
pub const ZERO: [u8; 32] = [0; 32];

/// One decision of `decide` and admission, as the auditor reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    pub request_id: String,
    pub identity: serde_json::Value,
    pub tenant: Option<String>,
    /// HMAC-SHA256 of the end user (hex), never the user in clear.
    pub end_user: Option<String>,
    pub route: String,
    pub model: String,
    /// sha256 of each of the model's files, from the manifest.
    pub model_files: Vec<String>,
    pub licences: Vec<String>,
    pub bundle_version: Option<u64>,
    pub bundle_digest: Option<String>,
    pub purpose: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// A reason code from the README's table, or `allowed`.
    pub reason: String,
    pub rule: String,
    pub guard_score: Option<f32>,
}

impl DecisionRecord {
    pub fn identity_value(identity: &Identity) -> serde_json::Value {
        serde_json::to_value(identity).unwrap_or(serde_json::Value::Null)
    }
}

/// What happened. Field names are part of the export format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The first record: binds the chain to the host that created it.
    Genesis {
        host_key_sha256: String,
        machine_id: String,
        state_dir: String,
        /// Set when a marker said a store had been created here before.
        previous_store: Option<String>,
    },
    Startup {
        version: String,
        pid: u32,
        /// Whether requests may be served without a durable record.
        #[serde(default)]
        fail_open: bool,
    },
    Shutdown {
        reason: String,
    },
    Decision(Box<DecisionRecord>),
    /// The host vouches for the chain up to `seq`: Ed25519 over
    /// [`checkpoint_message`], by the host key whose SHA-256 is given.
    Checkpoint {
        seq: u64,
        head: String,
        signature: String,
        key_sha256: String,
    },
    Completion {
        /// The caller's correlation id; never used to find the decision.
        request_id: String,
        /// The audit sequence of the decision this completes: the join key.
        /// `None`: a record from before the field, which readers join by
        /// request id as those versions did; `Some(None)` (stored as null):
        /// its decision was never made durable (`audit.fail_open`) and it
        /// joins nothing.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "present"
        )]
        decision_seq: Option<Option<u64>>,
        /// `completed`, `cancelled` or `error`.
        outcome: String,
        detail: String,
        prompt_tokens: u64,
        completion_tokens: u64,
        duration_ms: u64,
        /// Whether anything was served; absent in records before it was
        /// added, where zero tokens meant nothing was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        served: Option<bool>,
    },
    BundleAccepted {
        version: u64,
        digest: String,
        source: String,
    },
    BundleRefused {
        version: Option<u64>,
        digest: String,
        source: String,
        reason: String,
    },
    ConfigReload {
        ok: bool,
        message: String,
    },
    /// A reload switched `audit.fail_open` (on: requests are served even
    /// when their decision record cannot be made durable). Written on every
    /// change, either way; the mode at start is in [`Event::Startup`].
    FailOpenChanged {
        fail_open: bool,
    },
    /// The bundle in force no longer verifies under the configuration a
    /// reload brought (a trust anchor removed, another audience) and was
    /// taken out of force: requests fail closed until a bundle verifies.
    /// Its archive copy and the rollback floor are kept.
    BundleWithdrawn {
        version: u64,
        digest: String,
        reason: String,
    },
    ClockBehindFloor {
        clock: i64,
        floor: i64,
    },
    /// The rollback state (highest version, time floor) was rebuilt at
    /// start, from the bundle archive or the copy kept beside the audit
    /// marker, because the state directory's was missing, unreadable or lower.
    PolicyStateRecovered {
        reason: String,
        highest_version: u64,
        time_floor: i64,
    },
    AuditOpened {
        records: u64,
        head: String,
    },
    AuditDegraded {
        error: String,
    },
    AuditRecovered {
        failed_batches: u64,
    },
    /// The daemon was started on a chain that does not verify, by an
    /// operator's explicit override.
    AuditOverride {
        first_bad_seq: u64,
        error: String,
    },
    /// A full walk of the chain in the background (`audit.full_verify_interval`,
    /// or SIGUSR1), which also reads the history before the last checkpoint
    /// that a start does not re-read. Recorded when it fails: the walk
    /// covered the records below `through_seq` (the log's length when it
    /// began) and broke at `first_bad_seq`, for `error`.
    AuditVerified {
        through_seq: u64,
        ok: bool,
        first_bad_seq: Option<u64>,
        error: Option<String>,
    },
    /// A distinct-user count reached `fraction` of its limit; once per
    /// scope, limit and fraction in a calendar month (`period`, YYYY-MM).
    UsageWarning {
        /// `tenant` (its user cap) or `licence` (its user threshold).
        scope: String,
        id: String,
        period: String,
        users: u64,
        limit: u64,
        fraction: f64,
    },
    /// The usage counters were recomputed from the audit log.
    UsageRebuilt {
        from_seq: u64,
        through_seq: u64,
        /// Counts that differed from what the store held, in words.
        differences: Vec<String>,
    },
    /// Denials of unknown callers or models answered without a record of
    /// their own (past each principal's allowance), since the last such
    /// summary: how many, from how many principals.
    DenialsUnrecorded {
        denials: u64,
        principals: u64,
    },
    /// Records before `first_kept` (a checkpoint) were deleted by retention.
    AuditPruned {
        first_kept: u64,
        removed: u64,
        retention_days: u64,
    },
}

/// A field that may be absent (`None`), null (`Some(None)`) or set: serde
/// maps null and absent alike for a plain `Option`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// How a completion names its decision (see `Event::Completion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joins<'a> {
    /// The decision record at this sequence.
    Seq(u64),
    /// A record from before completions named their decision's sequence:
    /// the pending decision with this request id.
    RequestId(&'a str),
    /// Its decision was never durable: nothing to join.
    Nothing,
}

impl Event {
    /// For a completion, the decision it completes.
    pub fn joins(&self) -> Option<Joins<'_>> {
        match self {
            Self::Completion {
                decision_seq: Some(Some(seq)),
                ..
            } => Some(Joins::Seq(*seq)),
            Self::Completion {
                decision_seq: Some(None),
                ..
            } => Some(Joins::Nothing),
            Self::Completion {
                decision_seq: None,
                request_id,
                ..
            } => Some(Joins::RequestId(request_id)),
            _ => None,
        }
    }
}

/// The JSON content of a record: its time and event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    pub time: i64,
    pub event: Event,
}

impl Content {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising our own types to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a checkpoint signs: a domain tag, the sequence number and its hash.
pub fn checkpoint_message(seq: u64, head: &[u8; 32]) -> Vec<u8> {
    let mut m = b"airgate-checkpoint-v1\0".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m
}

pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn hash(seq: u64, prev: &[u8; 32], content: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(content);
    h.finalize().into()
}

/// Seals `content` as record `seq` after `prev`: the stored bytes and the new head hash.
pub fn seal(seq: u64, prev: &[u8; 32], content: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let h = hash(seq, prev, content);
    let mut out = Vec::with_capacity(HEADER + content.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(prev);
    out.extend_from_slice(&h);
    out.extend_from_slice(content);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    (out, h)
}

/// A stored record, its own checks passed.
#[derive(Debug)]
pub struct Sealed<'a> {
    pub seq: u64,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
    pub content: &'a [u8],
}

impl Sealed<'_> {
    pub fn parse(&self) -> Result<Content, serde_json::Error> {
        serde_json::from_slice(self.content)
    }
}

/// Why the chain does not verify, at which record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("record {seq}: checksum mismatch (storage damage)")]
    Checksum { seq: u64 },
    #[error("record {seq}: too short to be a record")]
    Truncated { seq: u64 },
    /// The record under `key` says it is record `seq` (moved, or one of a
    /// swapped pair): `key` is the first bad sequence.
    #[error("record {key}: holds record {seq} (moved or swapped)")]
    Misplaced { seq: u64, key: u64 },
    #[error("record {seq}: missing (the next record found is {found})")]
    Gap { seq: u64, found: u64 },
    #[error("record {seq}: its hash does not match its content (rewritten)")]
    Hash { seq: u64 },
    #[error("record {seq}: does not link to record {}'s hash", seq.saturating_sub(1))]
    Link { seq: u64 },
    #[error("record {seq}: the chain ends before the checkpoint at {checkpoint}")]
    ShortOfCheckpoint { seq: u64, checkpoint: u64 },
    #[error("record {seq}: head hash differs from the checkpoint's")]
    CheckpointMismatch { seq: u64 },
    #[error("record 0 is not a genesis record")]
    NoGenesis,
    #[error("record {seq}: checkpoint does not match the chain or its signature does not verify")]
    BadCheckpoint { seq: u64 },
    /// A clean stop seals a checkpoint right after its shutdown record, and
    /// the next record a real store gets is the next start's first (see
    /// [`opens_a_start`]): anything else there was put in afterwards.
    #[error(
        "record {seq}: follows a clean stop's checkpoint but is not the next start's first record (inserted)"
    )]
    AfterCleanStop { seq: u64 },
}

impl ChainError {
    /// The first bad sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            // The first bad key: where the misplaced record was found.
            Self::Misplaced { key, .. } => *key,
            Self::Checksum { seq }
            | Self::Truncated { seq }
            | Self::Gap { seq, .. }
            | Self::Hash { seq }
            | Self::Link { seq }
            | Self::ShortOfCheckpoint { seq, .. }
            | Self::CheckpointMismatch { seq }
            | Self::BadCheckpoint { seq }
            | Self::AfterCleanStop { seq } => *seq,
            Self::NoGenesis => 0,
        }
    }
}

/// Whether `content`, stored as record `seq`, is what every start writes
/// first: its `audit_opened` record, which counts the records before it.
pub fn opens_a_start(seq: u64, content: &Content) -> bool {
    matches!(content.event, Event::AuditOpened { records, .. } if records == seq)
}

/// Checks one stored record on its own (checksum, key, hash).
pub fn open(key_seq: u64, stored: &[u8]) -> Result<Sealed<'_>, ChainError> {
    if stored.len() < HEADER {
        return Err(ChainError::Truncated { seq: key_seq });
    }
    let crc = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
    if crc32fast::hash(&stored[4..]) != crc {
        return Err(ChainError::Checksum { seq: key_seq });
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&stored[4..12]);
    let seq = u64::from_be_bytes(seq);
    if seq != key_seq {
        return Err(ChainError::Misplaced { seq, key: key_seq });
    }
    let mut prev = [0u8; 32];
    prev.copy_from_slice(&stored[12..44]);
    let mut h = [0u8; 32];
    h.copy_from_slice(&stored[44..76]);
    let content = &stored[HEADER..];
    if hash(seq, &prev, content) != h {
        return Err(ChainError::Hash { seq });
    }
    Ok(Sealed {
        seq,
        prev,
        hash: h,
        content,
    })
}

/// Walks a chain in key order, record by record.
#[derive(Clone, Debug)]
pub struct Verifier {
    next: u64,
    head: [u8; 32],
    checkpoints: Vec<(u64, [u8; 32])>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// From the genesis record.
    pub fn new() -> Self {
        Self {
            next: 0,
            head: ZERO,
            checkpoints: Vec::new(),
        }
    }

    /// From a trusted point (a checkpoint): `seq` is the next record expected
    /// and `head` the hash it must link to.
    pub fn resume(seq: u64, head: [u8; 32]) -> Self {
        Self {
            next: seq,
            head,
            checkpoints: Vec::new(),
        }
    }

    pub fn push(&mut self, key_seq: u64, stored: &[u8]) -> Result<(), ChainError> {
        if key_seq != self.next {
            return Err(ChainError::Gap {
                seq: self.next,
                found: key_seq,
            });
        }
        let sealed = open(key_seq, stored)?;
        if sealed.prev != self.head {
            return Err(ChainError::Link { seq: key_seq });
        }
        if key_seq == 0 && !matches!(sealed.parse().map(|c| c.event), Ok(Event::Genesis { .. })) {
            return Err(ChainError::NoGenesis);
        }
        if let Ok(i) = self.checkpoints.binary_search_by_key(&key_seq, |c| c.0)
            && self.checkpoints[i].1 != sealed.hash
        {
            return Err(ChainError::CheckpointMismatch { seq: key_seq });
        }
        self.head = sealed.hash;
        self.next += 1;
        Ok(())
    }

    /// Records verified so far (the next sequence number).
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// Checkpoints kept elsewhere (sequence, hash of that record): the walk
    /// must pass each with the same hash, and must reach the last.
    pub fn with_checkpoints(mut self, mut checkpoints: Vec<(u64, [u8; 32])>) -> Self {
        checkpoints.sort_unstable();
        self.checkpoints = checkpoints;
        self
    }

    /// Ends the walk: a chain cut before a known checkpoint is truncated.
    pub fn finish(&self) -> Result<(), ChainError> {
        match self.checkpoints.last() {
            Some((seq, _)) if *seq >= self.next => Err(ChainError::ShortOfCheckpoint {
                seq: self.next,
                checkpoint: *seq,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
