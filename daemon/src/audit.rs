//! The audit store: sled in `STATE/audit`, one writer thread, group commit.
//!
//! Records are sealed and verified by `airgate_policy::audit`; this module
//! keeps them. Appends go to the writer through a bounded channel; the
//! writer takes whatever has queued while it was flushing, seals it as one
//! sled batch, flushes sled and then fsyncs sled's files itself (sled's
//! flush uses sync_file_range, which does not push the disk's write cache:
//! sled issues 1351, 1452), and only then answers the waiters. A request
//! is served only after its decision record is acknowledged (fail closed).
//! When writing fails the store is degraded: appends are refused with the
//! error until a batch succeeds again, which ends the degradation by itself.
//!
//! The chain's content is fixed in one place: every open writes its
//! `audit_opened` record first, and a clean stop's shutdown record, sealed
//! by a checkpoint, is the last the writer takes. So after a clean stop's
//! checkpoint a real store holds nothing, or the next start's first record;
//! verification (at start and in full) refuses anything else there.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use airgate_policy::audit::{
    ChainError, Content, Event, Joins, Verifier, ZERO, key, open, opens_a_start, seal,
};
use airgate_policy::time::Clock;

use crate::bundle::SystemClock;
use crate::heartbeat::Worker;
use crate::keys::{hex, unhex};

/// Appends waiting for the writer beyond this are refused at once.
const QUEUE: usize = 8192;
/// Most records sealed into one batch.
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("audit chain broken: {0}")]
    Broken(ChainError),
    #[error("audit store cannot write: {0}")]
    Unavailable(String),
    #[error("a {kind} record of {bytes} bytes was refused: records are at most {MAX_RECORD_BYTES}")]
    TooLarge { kind: String, bytes: usize },
}

struct Job {
    content: Vec<u8>,
    /// Seal a signed checkpoint right after this record, and answer only
    /// once it is durable (the last record before a clean stop).
    seal: bool,
    reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// What opening the store found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Opened {
    pub records: u64,
    pub head: String,
    pub created: bool,
    /// A marker said a store had been created before, but none was found.
    pub previous_store: Option<String>,
}

/// Stored records as (sequence, bytes exactly as sealed).
pub type RawRecords = Vec<(u64, Vec<u8>)>;

/// The handle requests append through; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Job>,
    state: Arc<Mutex<WriterState>>,
    /// A handle for readers (export, snapshot); the writer replaces it when
    /// it reopens the store.
    reader: Arc<Mutex<Option<sled::Db>>>,
    /// Records the log held when it was opened, before this start wrote any.
    opened_records: u64,
    /// The host's public key (raw Ed25519), when checkpoints are signed.
    host_key: Option<Arc<[u8]>>,
    /// A full verification and retention's pruning take turns: a walk must
    /// not see the records before it vanish from under it.
    maintenance: Arc<Mutex<()>>,
}

/// Keeps a tenant's records: its decisions, and the completions of those
/// decisions (which carry no tenant of their own), joined by the decision's
/// sequence (older completions by request id). Feed records in order.
#[derive(Default)]
pub struct TenantFilter {
    tenant: String,
    decisions: HashSet<u64>,
    requests: HashSet<String>,
}

impl TenantFilter {
    pub fn new(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            ..Self::default()
        }
    }

    pub fn keep(&mut self, seq: u64, event: &Event) -> bool {
        match (event, event.joins()) {
            (Event::Decision(d), _) if d.tenant.as_deref() == Some(self.tenant.as_str()) => {
                self.decisions.insert(seq);
                self.requests.insert(d.request_id.clone());
                true
            }
            (_, Some(Joins::Seq(s))) => self.decisions.contains(&s),
            (_, Some(Joins::RequestId(id))) => self.requests.contains(id),
            _ => false,
        }
    }
}

/// One record as a line of the JSON Lines export.
pub fn export_line(seq: u64, content: &Content) -> String {
    serde_json::json!({"seq": seq, "time": content.time, "event": content.event}).to_string()
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct WriterState {
    pub records: u64,
    pub head: String,
    pub batches: u64,
    pub degraded: Option<String>,
    pub failed_batches: u64,
}

pub fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, AuditError> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .flush_every_ms(None)
        .open()
        .map_err(|e| AuditError::Open {
            path: path.to_owned(),
            reason: match e.to_string() {
                m if m.contains("could not acquire lock") => {
                    "in use by another process (the running daemon?): stop it, or work on a copy of the state directory".to_owned()
                }
                m => m,
            },
        })
}

/// The on-disk format of the audit store (its records are sealed under
/// the `airgate-audit-v1` domain). Kept in the `meta` tree; a store without
/// the marker predates it and is format 1 too. A newer airgate opens older
/// formats; an older one refuses a newer store instead of misreading it.
pub const FORMAT: u32 = 1;

fn check_format(db: &sled::Db) -> Result<(), String> {
    let meta = db.open_tree("meta").map_err(|e| e.to_string())?;
    match meta.get("audit_format").map_err(|e| e.to_string())? {
        None => {
            meta.insert("audit_format", &FORMAT.to_be_bytes())
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        Some(v) => {
            let found = <[u8; 4]>::try_from(v.as_ref()).map_or(u32::MAX, u32::from_be_bytes);
            if found > FORMAT {
                return Err(format!(
                    "the audit store has format {found}; this airgate reads up to {FORMAT} (it was written by a newer airgate: do not downgrade)"
                ));
            }
            Ok(())
        }
    }
}

/// What verifying a store found.
#[derive(Clone, Debug)]
pub struct Verified {
    pub records: u64,
    pub head: [u8; 32],
    /// Signed checkpoints inside the chain whose signature was checked.
    pub checkpoints: u64,
}

/// Verifies a whole store: every link, the checkpoints kept elsewhere, and
/// the signature of every checkpoint record against the host key (raw
/// Ed25519 public key) when given.
pub fn verify_db(
    db: &sled::Db,
    external: Vec<(u64, [u8; 32])>,
    host_key: Option<&[u8]>,
    from: u64,
) -> Result<Verified, AuditError> {
    verify_walk(db, external, host_key, from, &|| false)
}

/// How many records a walk reads between asking whether to stop.
const STOP_EVERY: u64 = 4096;

/// [`verify_db`], stopping (as unavailable) once `stop` says so.
fn verify_walk(
    db: &sled::Db,
    external: Vec<(u64, [u8; 32])>,
    host_key: Option<&[u8]>,
    from: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Verified, AuditError> {
    let mut v = Verifier::new().with_checkpoints(external.clone());
    let first = db
        .first()
        .map_err(|e| AuditError::Unavailable(e.to_string()))?;
    let first_seq = first
        .as_ref()
        .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    let mut start = 0;
    if from > first_seq {
        // From a record on: it is taken as it links (its `prev` is trusted,
        // its own checksum and hash are checked like every later one's).
        let value = db
            .get(key(from))
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
            .ok_or_else(|| AuditError::Open {
                path: PathBuf::from("audit"),
                reason: format!("there is no record {from} to verify from"),
            })?;
        let sealed = open(from, &value).map_err(AuditError::Broken)?;
        let kept: Vec<(u64, [u8; 32])> = external.into_iter().filter(|c| c.0 >= from).collect();
        v = Verifier::resume(from, sealed.prev).with_checkpoints(kept);
        start = from;
    } else if let Some((k, value)) = first
        && let Ok(k) = <[u8; 8]>::try_from(k.as_ref())
        && u64::from_be_bytes(k) > 0
    {
        // A pruned store starts at a checkpoint record: its signature (by
        // the host key) vouches for the hash of the pruned record before it.
        let seq = u64::from_be_bytes(k);
        let sealed = open(seq, &value).map_err(AuditError::Broken)?;
        let key = host_key.ok_or_else(|| AuditError::Open {
            path: PathBuf::from("host.pub"),
            reason: format!(
                "the store was pruned before record {seq}; the host key is needed to verify it"
            ),
        })?;
        if checkpoint_valid(&sealed, key) != Some(true) {
            return Err(AuditError::Broken(ChainError::BadCheckpoint { seq }));
        }
        let kept: Vec<(u64, [u8; 32])> = external.into_iter().filter(|c| c.0 >= seq).collect();
        v = Verifier::resume(seq, sealed.prev).with_checkpoints(kept);
        start = seq;
    }
    let mut checkpoints = 0;
    let mut stops = CleanStops::default();
    for item in db.range(key(start)..) {
        let (k, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Broken(ChainError::Truncated { seq: v.next() }))?;
        if seq % STOP_EVERY == 0 && stop() {
            return Err(AuditError::Unavailable(format!(
                "the walk was stopped at record {seq}"
            )));
        }
        // Once pushed, the record links to the head before it, so its own
        // `prev` is the hash a checkpoint must name.
        v.push(seq, &value).map_err(AuditError::Broken)?;
        if let Some(key) = host_key
            && let Ok(sealed) = open(seq, &value)
        {
            let content = sealed.parse().ok();
            let signed = match content
                .as_ref()
                .and_then(|c| signed_checkpoint(&sealed, c, key))
            {
                Some(false) => return Err(AuditError::Broken(ChainError::BadCheckpoint { seq })),
                Some(true) => {
                    checkpoints += 1;
                    true
                }
                None => false,
            };
            stops
                .push(seq, content.as_ref(), signed)
                .map_err(AuditError::Broken)?;
        }
    }
    v.finish().map_err(AuditError::Broken)?;
    Ok(Verified {
        records: v.next(),
        head: v.head(),
        checkpoints,
    })
}

/// Finds the last checkpoint record (scanning back), checks its signature
/// and that it names the hash the chain holds at its sequence, and
/// verifies the chain from there; from genesis when there is none. A
/// damaged record met on the way back is passed over: the walk forward
/// from the checkpoint before it reports the first break in chain order
/// (a swapped pair at its first key, not at the second).
pub fn verify_from_last_checkpoint(db: &sled::Db, host_key: &[u8]) -> Result<Verified, AuditError> {
    let unavailable = |e: sled::Error| AuditError::Unavailable(e.to_string());
    for item in db.iter().rev() {
        let (k, v) = item.map_err(unavailable)?;
        let Ok(k) = <[u8; 8]>::try_from(k.as_ref()) else {
            break;
        };
        let seq = u64::from_be_bytes(k);
        let Ok(sealed) = open(seq, &v) else {
            continue;
        };
        match checkpoint_valid(&sealed, host_key) {
            None => continue,
            Some(false) => return Err(AuditError::Broken(ChainError::BadCheckpoint { seq })),
            Some(true) => {}
        }
        // A clean stop's checkpoint (right after its shutdown record) is
        // followed by nothing, or by the next start's first record.
        let clean_stop = seq
            .checked_sub(1)
            .is_some_and(|before| is_shutdown(db, before));
        let mut verifier = Verifier::resume(seq, sealed.prev);
        for item in db.range(key(seq)..) {
            let (k, v) = item.map_err(unavailable)?;
            let s = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    AuditError::Broken(ChainError::Truncated {
                        seq: verifier.next(),
                    })
                })?;
            verifier.push(s, &v).map_err(AuditError::Broken)?;
            if clean_stop && s == seq + 1 && !opens_a_start_at(s, &v) {
                return Err(AuditError::Broken(ChainError::AfterCleanStop { seq: s }));
            }
        }
        return Ok(Verified {
            records: verifier.next(),
            head: verifier.head(),
            checkpoints: 1,
        });
    }
    verify_db(db, Vec::new(), Some(host_key), 0)
}

/// Whether `sealed` is a checkpoint record (`None` when it is not) that
/// vouches for the chain correctly: it names the record before it and the
/// hash it links to (its own `prev`: that record may have been pruned), and
/// the host key (raw Ed25519) signed exactly that.
pub fn checkpoint_valid(
    sealed: &airgate_policy::audit::Sealed<'_>,
    host_key: &[u8],
) -> Option<bool> {
    signed_checkpoint(sealed, &sealed.parse().ok()?, host_key)
}

/// [`checkpoint_valid`] on the record's content, already parsed.
fn signed_checkpoint(
    sealed: &airgate_policy::audit::Sealed<'_>,
    content: &Content,
    host_key: &[u8],
) -> Option<bool> {
    let Event::Checkpoint {
        seq: at,
        head,
        signature,
        ..
    } = &content.event
    else {
        return None;
    };
    let signed = unhex(signature).is_some_and(|sig| {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, host_key)
            .verify(
                &airgate_policy::audit::checkpoint_message(*at, &sealed.prev),
                &sig,
            )
            .is_ok()
    });
    Some(signed && at.checked_add(1) == Some(sealed.seq) && *head == hex(&sealed.prev))
}

/// Whether record `seq` is there, intact, and a shutdown record.
fn is_shutdown(db: &sled::Db, seq: u64) -> bool {
    db.get(key(seq)).ok().flatten().is_some_and(|v| {
        open(seq, &v)
            .ok()
            .and_then(|sealed| sealed.parse().ok())
            .is_some_and(|c| matches!(c.event, Event::Shutdown { .. }))
    })
}

/// Whether the stored record `seq` is a start's first ([`opens_a_start`]).
fn opens_a_start_at(seq: u64, stored: &[u8]) -> bool {
    open(seq, stored)
        .ok()
        .and_then(|sealed| sealed.parse().ok())
        .is_some_and(|c| opens_a_start(seq, &c))
}

/// Follows a walk for the one place where the chain says what must come
/// next: a clean stop seals a signed checkpoint right after its shutdown
/// record and the writer takes nothing more, so a real store has after
/// that checkpoint nothing, or the next start's first record.
#[derive(Default)]
struct CleanStops {
    /// The last record was a shutdown record.
    shutdown: bool,
    /// The last record was a clean stop's checkpoint.
    sealed: bool,
}

impl CleanStops {
    /// Record `seq`, verified, with its content (when it parses) and
    /// whether it is a checkpoint the host key signed.
    fn push(
        &mut self,
        seq: u64,
        content: Option<&Content>,
        signed: bool,
    ) -> Result<(), ChainError> {
        if std::mem::take(&mut self.sealed) && !content.is_some_and(|c| opens_a_start(seq, c)) {
            return Err(ChainError::AfterCleanStop { seq });
        }
        self.sealed = signed && self.shutdown;
        self.shutdown = content.is_some_and(|c| matches!(c.event, Event::Shutdown { .. }));
        Ok(())
    }
}

/// Verifies a run of stored records as they stream by: checksums, hashes,
/// links, and the host's signature on every checkpoint. A run may start at
/// genesis, at a checkpoint record (whose signature vouches for the hash it
/// links to), or elsewhere (its first link is then taken as given, and
/// [`SegmentCheck::anchored`] says so). After the first break the run is
/// no longer checked; the error stays.
pub struct SegmentCheck {
    key: Vec<u8>,
    verifier: Option<Verifier>,
    pub first: Option<u64>,
    pub anchored: bool,
    pub checkpoints: u64,
    pub error: Option<ChainError>,
}

impl SegmentCheck {
    pub fn new(host_key: &[u8]) -> Self {
        Self {
            key: host_key.to_vec(),
            verifier: None,
            first: None,
            anchored: false,
            checkpoints: 0,
            error: None,
        }
    }

    /// Checks record `seq`; on success returns the record's own view and
    /// whether it is a checkpoint signed by the host key.
    pub fn push<'a>(
        &mut self,
        seq: u64,
        stored: &'a [u8],
    ) -> Result<(airgate_policy::audit::Sealed<'a>, bool), ChainError> {
        let result = self.check(seq, stored);
        if let Err(e) = &result
            && self.error.is_none()
        {
            self.error = Some(e.clone());
        }
        result
    }

    fn check<'a>(
        &mut self,
        seq: u64,
        stored: &'a [u8],
    ) -> Result<(airgate_policy::audit::Sealed<'a>, bool), ChainError> {
        let sealed = open(seq, stored)?;
        let signed = checkpoint_valid(&sealed, &self.key);
        if signed == Some(false) {
            return Err(ChainError::BadCheckpoint { seq });
        }
        if self.error.is_some() {
            return Ok((sealed, signed == Some(true)));
        }
        let verifier = self.verifier.get_or_insert_with(|| {
            self.first = Some(seq);
            self.anchored = seq == 0 || signed == Some(true);
            if seq == 0 {
                Verifier::new()
            } else {
                Verifier::resume(seq, sealed.prev)
            }
        });
        verifier.push(seq, stored)?;
        if signed == Some(true) {
            self.checkpoints += 1;
        }
        Ok((sealed, signed == Some(true)))
    }

    /// The next sequence expected and the head reached.
    pub fn reached(&self) -> Option<(u64, [u8; 32])> {
        self.verifier.as_ref().map(|v| (v.next(), v.head()))
    }
}

/// Signs checkpoints with the host key, every `every` records or `interval`.
pub struct CheckpointSigner {
    pub key: ring::signature::Ed25519KeyPair,
    pub key_sha256: String,
    pub every: u64,
    pub interval: std::time::Duration,
}

/// fsync every file sled keeps, and the directories holding them.
fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn now() -> i64 {
    SystemClock.now().seconds()
}

/// The largest stored record, header included. Far under sled's blob
/// threshold (a quarter of its 512 KiB segment) for one record; a leaf node
/// of many records can still cross it, which is why [`Syncer`] also syncs
/// the blob files sled writes (sled itself never does).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// What makes a flushed sled batch durable: one fdatasync of sled's log
/// file, and an fsync of every blob file that appeared since the last
/// batch (sled writes a node too large for a segment into `blobs/` with no
/// sync at all) and of the directory holding them.
#[derive(Default)]
struct Syncer {
    log: Option<std::fs::File>,
    blobs: HashSet<std::ffi::OsString>,
}

impl Syncer {
    fn sync(&mut self, dir: &Path) -> std::io::Result<()> {
        let Some(log) = &self.log else {
            // New files (a reopened store): the whole tree, once.
            fsync_tree(dir)?;
            let f = std::fs::File::open(dir.join("db"))?;
            f.sync_data()?;
            self.log = Some(f);
            self.blobs = blob_names(dir)?;
            return Ok(());
        };
        log.sync_data()?;
        let now = blob_names(dir)?;
        let mut new = false;
        for name in now.difference(&self.blobs) {
            std::fs::File::open(dir.join("blobs").join(name))?.sync_data()?;
            new = true;
        }
        if new {
            std::fs::File::open(dir.join("blobs"))?.sync_all()?;
        }
        self.blobs = now;
        Ok(())
    }
}

fn blob_names(dir: &Path) -> std::io::Result<HashSet<std::ffi::OsString>> {
    match std::fs::read_dir(dir.join("blobs")) {
        Ok(entries) => entries.map(|e| e.map(|e| e.file_name())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(e),
    }
}

/// Seals nothing: encodes a record's content, refusing one over
/// [`MAX_RECORD_BYTES`] (every caller-supplied field is bounded before it
/// gets here, so this is a last line, not a filter).
fn encode(event: Event) -> Result<Vec<u8>, AuditError> {
    let kind = event_kind(&event);
    let content = Content { time: now(), event }.encode();
    let bytes = content.len() + airgate_policy::audit::HEADER;
    if bytes > MAX_RECORD_BYTES {
        return Err(AuditError::TooLarge { kind, bytes });
    }
    Ok(content)
}

/// The `kind` tag of an event, as the export names it.
fn event_kind(event: &Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// How a store is opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions<'a> {
    /// sled's page cache, bytes.
    pub cache_bytes: u64,
    /// File recording that a store was created (outside the state directory).
    pub marker: Option<&'a Path>,
    /// Every record to the journal, not only checkpoints.
    pub journal_all: bool,
    /// Start on a chain that does not verify (`--accept-broken-audit`).
    pub accept_broken: bool,
}

impl Audit {
    /// Opens (or creates, with its genesis record) the store and verifies
    /// the chain from its last signed checkpoint; writes this start's first
    /// record (`audit_opened`) and starts the writer thread. Blocking.
    pub fn open(
        dir: &Path,
        options: OpenOptions<'_>,
        genesis: impl FnOnce(Option<String>) -> Event,
        checkpoints: Option<CheckpointSigner>,
        worker: Worker,
    ) -> Result<(Self, Opened), AuditError> {
        let OpenOptions {
            cache_bytes,
            marker,
            journal_all,
            accept_broken,
        } = options;
        let db = open_db(dir, cache_bytes)?;
        let io = |e: &dyn std::fmt::Display| AuditError::Open {
            path: dir.to_owned(),
            reason: e.to_string(),
        };
        check_format(&db).map_err(|e| io(&e))?;
        let mut previous_store = None;
        let created = db.is_empty();
        if created {
            if let Some(m) = marker
                && let Ok(text) = std::fs::read_to_string(m)
            {
                let text = text.trim().to_owned();
                tracing::error!(
                    marker = %m.display(),
                    previous = %text,
                    "AUDIT STORE MISSING: the marker says a store was created before; starting a new chain that records this"
                );
                previous_store = Some(text);
            }
            let content = Content {
                time: now(),
                event: genesis(previous_store.clone()),
            }
            .encode();
            let (stored, h) = seal(0, &ZERO, &content);
            db.insert(key(0), stored).map_err(|e| io(&e))?;
            db.flush().map_err(|e| io(&e))?;
            fsync_tree(dir).map_err(|e| io(&e))?;
            if let Some(m) = marker {
                let line = format!(
                    "store {} created {} genesis {}\n",
                    dir.display(),
                    now(),
                    hex(&h)
                );
                let written = m
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| crate::bundle::write_atomic(m, line.as_bytes()));
                if let Err(e) = written {
                    tracing::warn!(marker = %m.display(), error = %e, "cannot write the audit store marker");
                }
            }
        }
        let host_public = checkpoints.as_ref().map(|c| {
            use ring::signature::KeyPair as _;
            c.key.public_key().as_ref().to_vec()
        });
        // From the last checkpoint whose signature holds (earlier records
        // were verified at earlier starts and are vouched for by it); from
        // genesis when there is none. `airgate audit verify` walks it all.
        let verified = match host_public.as_deref() {
            Some(key) => verify_from_last_checkpoint(&db, key),
            None => verify_db(&db, Vec::new(), None, 0),
        };
        let mut broken = None;
        let (records, head) = match verified {
            Ok(v) => (v.records, v.head),
            Err(AuditError::Broken(e)) if accept_broken => {
                // Append after what is there: the break stays for every
                // later verification to find; the override is recorded.
                tracing::error!(
                    AIRGATE_EVENT = "audit_override",
                    first_bad_seq = e.seq(),
                    error = %e,
                    "STARTING ON A BROKEN AUDIT CHAIN (--accept-broken-audit)"
                );
                let last = db
                    .last()
                    .map_err(|e| io(&e))?
                    .and_then(|(k, v)| {
                        let seq = u64::from_be_bytes(<[u8; 8]>::try_from(k.as_ref()).ok()?);
                        // The last record may be the damaged one: link to the
                        // hash it claims; the break is reported either way.
                        let hash = match open(seq, &v) {
                            Ok(sealed) => sealed.hash,
                            Err(_) => <[u8; 32]>::try_from(v.get(44..76)?).ok()?,
                        };
                        Some((seq + 1, hash))
                    })
                    .ok_or_else(|| AuditError::Broken(e.clone()))?;
                broken = Some(e);
                last
            }
            Err(e) => return Err(e),
        };
        // Every start's first record, durable before anything else can be
        // written: what a real store holds after a clean stop's checkpoint
        // (which the next start's verification checks).
        let content = Content {
            time: now(),
            event: Event::AuditOpened {
                records,
                head: hex(&head),
            },
        }
        .encode();
        let (stored, opened_head) = seal(records, &head, &content);
        db.insert(key(records), stored).map_err(|e| io(&e))?;
        db.flush().map_err(|e| io(&e))?;
        fsync_tree(dir).map_err(|e| io(&e))?;
        if journal_all {
            tracing::info!(
                AIRGATE_EVENT = "audit_record",
                AIRGATE_SEQ = records,
                AIRGATE_RECORD = %String::from_utf8_lossy(&content),
                "audit record"
            );
        }
        let next = (records + 1, opened_head);
        let state = Arc::new(Mutex::new(WriterState {
            records: next.0,
            head: hex(&next.1),
            ..WriterState::default()
        }));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer_state = Arc::clone(&state);
        let reader = Arc::new(Mutex::new(Some(db.clone())));
        let writer_reader = Arc::clone(&reader);
        let dir = dir.to_owned();
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || {
                write_loop(
                    db,
                    cache_bytes,
                    &dir,
                    rx,
                    next,
                    (checkpoints, journal_all),
                    &writer_state,
                    &writer_reader,
                    &worker,
                );
            })
            .map_err(|e| io(&e))?;
        let audit = Self {
            tx,
            state,
            reader,
            opened_records: records,
            host_key: host_public.map(Arc::from),
            maintenance: Arc::new(Mutex::new(())),
        };
        if let Some(e) = broken {
            audit.record(Event::AuditOverride {
                first_bad_seq: e.seq(),
                error: e.to_string(),
            });
        }
        Ok((
            audit,
            Opened {
                records,
                head: hex(&head),
                created,
                previous_store,
            },
        ))
    }

    /// Appends one record and waits until it is durable; returns its sequence.
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        self.append_job(event, false).await
    }

    /// [`Audit::append`], then a signed checkpoint over the log through this
    /// record, durable before it returns: a clean stop leaves every record
    /// vouched for (packs and reports of the period need no later run).
    /// It is the last record: the writer takes none after it (they are
    /// refused), so that the next record the store gets is the next start's.
    pub async fn append_sealed(&self, event: Event) -> Result<u64, AuditError> {
        self.append_job(event, true).await
    }

    async fn append_job(&self, event: Event, seal: bool) -> Result<u64, AuditError> {
        let content = encode(event)?;
        let (reply, wait) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Job {
            content,
            reply,
            seal,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(AuditError::Unavailable(format!(
                    "{QUEUE} records are waiting for the disk"
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(AuditError::Unavailable("the writer has stopped".to_owned()));
            }
        }
        match wait.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(AuditError::Unavailable(e)),
            Err(_) => Err(AuditError::Unavailable("the writer has stopped".to_owned())),
        }
    }

    /// Appends without waiting (events that gate nothing, e.g. a bundle refused).
    pub fn record(&self, event: Event) {
        let content = match encode(event) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "audit record refused");
                // What was refused is itself recorded, small.
                match encode(Event::AuditDegraded {
                    error: e.to_string(),
                }) {
                    Ok(c) => c,
                    Err(_) => return,
                }
            }
        };
        let (reply, _) = tokio::sync::oneshot::channel();
        if self
            .tx
            .try_send(Job {
                content,
                reply,
                seal: false,
            })
            .is_err()
        {
            tracing::error!("audit queue full or writer stopped: a record was lost");
        }
    }

    /// Records the log held when it was opened, before this start wrote any.
    pub fn opened_records(&self) -> u64 {
        self.opened_records
    }

    /// Walks the whole chain as `airgate audit verify` does (every link, and
    /// every checkpoint's signature when checkpoints are signed), over a
    /// reader handle: the writer goes on meanwhile. Streams the records
    /// (memory stays bounded); retention skips a run while it goes on. A
    /// writer that dropped its handles to reopen the store (after a failed
    /// write) stops the walk, whose handle would keep the store locked.
    /// Blocking.
    pub fn verify_all(&self) -> Result<Verified, AuditError> {
        let _turn = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let db = self.reader()?;
        let reopening = || {
            self.reader
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none()
        };
        verify_walk(&db, Vec::new(), self.host_key.as_deref(), 0, &reopening)
    }

    pub(crate) fn reader(&self) -> Result<sled::Db, AuditError> {
        self.reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| AuditError::Unavailable("the store is being reopened".to_owned()))
    }

    /// Up to `limit` records from `from`, as export lines; and the next sequence.
    pub fn page(&self, from: u64, limit: usize) -> Result<(Vec<String>, u64), AuditError> {
        let db = self.reader()?;
        let mut lines = Vec::new();
        let mut next = from;
        for item in read_all(&db, from).take(limit) {
            let (seq, content) = item.map_err(AuditError::Unavailable)?;
            lines.push(match content {
                Ok(c) => export_line(seq, &c),
                Err(e) => damaged_line(seq, &e),
            });
            next = seq + 1;
        }
        Ok((lines, next))
    }

    /// Up to `limit` stored records from `from`, byte for byte (so a reader
    /// can verify them); and the next sequence.
    pub fn raw_page(&self, from: u64, limit: usize) -> Result<(RawRecords, u64), AuditError> {
        let db = self.reader()?;
        let mut out = Vec::new();
        let mut next = from;
        for item in db.range(key(from)..).take(limit) {
            let (k, v) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    AuditError::Unavailable("a key that is not a sequence number".to_owned())
                })?;
            out.push((seq, v.to_vec()));
            next = seq + 1;
        }
        Ok((out, next))
    }

    /// Deletes the records before the last checkpoint sealed no later than
    /// `cutoff` (Unix time), so verification continues from that
    /// checkpoint. Returns (first kept sequence, records removed).
    /// Nothing is pruned while a full verification walks the chain (the
    /// next run does it).
    pub fn prune_before(&self, cutoff: i64) -> Result<Option<(u64, u64)>, AuditError> {
        let _turn = match self.maintenance.try_lock() {
            Ok(turn) => turn,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::info!("audit retention waits for the full verification in progress");
                return Ok(None);
            }
        };
        let db = self.reader()?;
        let unavailable = |e: sled::Error| AuditError::Unavailable(e.to_string());
        let mut anchor = None;
        for item in db.iter() {
            let (k, v) = item.map_err(unavailable)?;
            let Ok(k) = <[u8; 8]>::try_from(k.as_ref()) else {
                break;
            };
            let seq = u64::from_be_bytes(k);
            let Ok(sealed) = open(seq, &v) else { break };
            let Ok(content) = sealed.parse() else { break };
            if content.time > cutoff {
                break;
            }
            if matches!(content.event, Event::Checkpoint { .. }) {
                anchor = Some(seq);
            }
        }
        let Some(anchor) = anchor else {
            return Ok(None);
        };
        let first = db
            .first()
            .map_err(unavailable)?
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        if first >= anchor {
            return Ok(None);
        }
        let mut batch = sled::Batch::default();
        for seq in first..anchor {
            batch.remove(&key(seq));
        }
        db.apply_batch(batch).map_err(unavailable)?;
        db.flush().map_err(unavailable)?;
        Ok(Some((anchor, anchor - first)))
    }

    /// A consistent copy of every record written so far, as a stopped store
    /// under `dest/audit` that `airgate audit verify --state dest` reads.
    /// Records are append-only, so those below the head never change.
    pub fn snapshot(&self, dest: &Path, host_pub: &Path) -> Result<u64, AuditError> {
        let io = |e: &dyn std::fmt::Display| AuditError::Open {
            path: dest.to_owned(),
            reason: e.to_string(),
        };
        let records = self.state().records;
        let db = self.reader()?;
        std::fs::create_dir_all(dest).map_err(|e| io(&e))?;
        let copy = open_db(&dest.join("audit"), 8 << 20)?;
        for item in db.range(key(0)..key(records)) {
            let (k, v) = item.map_err(|e| io(&e))?;
            copy.insert(k, v).map_err(|e| io(&e))?;
        }
        copy.flush().map_err(|e| io(&e))?;
        drop(copy);
        fsync_tree(&dest.join("audit")).map_err(|e| io(&e))?;
        std::fs::copy(host_pub, dest.join("host.pub")).map_err(|e| io(&e))?;
        Ok(records)
    }

    pub fn state(&self) -> WriterState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the writer thread's whole state, handed over once"
)]
fn write_loop(
    db: sled::Db,
    cache_bytes: u64,
    dir: &Path,
    rx: Receiver<Job>,
    (mut next, mut head): (u64, [u8; 32]),
    (signer, journal_all): (Option<CheckpointSigner>, bool),
    state: &Mutex<WriterState>,
    reader: &Mutex<Option<sled::Db>>,
    worker: &Worker,
) {
    let mut since_checkpoint = 0u64;
    let mut last_checkpoint = std::time::Instant::now();
    // sled keeps a failed I/O as a global error for the life of a handle, so
    // after a failure the handle is dropped and the store reopened at the
    // next batch: service resumes by itself once the disk takes writes.
    let mut db = Some(db);
    let mut syncer = Syncer::default();
    // Set once a sealed record (a clean stop's shutdown) is written: nothing
    // may follow its checkpoint (see `Audit::append_sealed`).
    let mut closed = false;
    loop {
        worker.idle();
        let Ok(first) = rx.recv() else {
            return;
        };
        worker.progress();
        if closed {
            refuse_after_close(first, &rx);
            continue;
        }
        // A sealed record ends its batch, so that its checkpoint follows it.
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH && !jobs.last().is_some_and(|j| j.seal) {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if db.is_none() {
            match open_db(dir, cache_bytes) {
                Ok(reopened) => {
                    // What reached the disk before the failure decides the head.
                    if let Ok(Some((k, v))) = reopened.last()
                        && let Ok(k) = <[u8; 8]>::try_from(k.as_ref())
                        && let Ok(sealed) = open(u64::from_be_bytes(k), &v)
                    {
                        next = sealed.seq + 1;
                        head = sealed.hash;
                    }
                    *reader.lock().unwrap_or_else(PoisonError::into_inner) = Some(reopened.clone());
                    db = Some(reopened);
                }
                Err(e) => {
                    fail_batch(state, jobs, &e.to_string());
                    continue;
                }
            }
        }
        let Some(handle) = db.as_ref() else {
            continue;
        };
        let mut batch = sled::Batch::default();
        let (mut seq, mut prev) = (next, head);
        for job in &jobs {
            let (stored, h) = seal(seq, &prev, &job.content);
            batch.insert(&key(seq), stored);
            seq += 1;
            prev = h;
        }
        // sled's flush leaves the data in the disk's cache (sync_file_range);
        // one fdatasync of its log file makes the batch durable. New files
        // (a reopened store) get the whole tree synced once.
        let result = handle
            .apply_batch(batch)
            .and_then(|()| handle.flush().map(drop))
            .map_err(|e| e.to_string())
            .and_then(|()| syncer.sync(dir).map_err(|e| e.to_string()));
        worker.progress();
        let written = jobs.len() as u64;
        match result {
            Ok(()) => {
                if journal_all {
                    for (i, job) in jobs.iter().enumerate() {
                        tracing::info!(
                            AIRGATE_EVENT = "audit_record",
                            AIRGATE_SEQ = next + i as u64,
                            AIRGATE_RECORD = %String::from_utf8_lossy(&job.content),
                            "audit record"
                        );
                    }
                }
                // The state first, then the waiters: whoever is answered
                // after this batch sees the store healthy again.
                let first = next;
                next = seq;
                head = prev;
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                s.records = next;
                s.head = hex(&head);
                s.batches += 1;
                if let Some(was) = s.degraded.take() {
                    tracing::warn!(previous_error = %was, "audit store writes again; service resumes");
                }
                drop(s);
                let mut sealing = Vec::new();
                closed = jobs.iter().any(|j| j.seal);
                for (i, job) in jobs.into_iter().enumerate() {
                    if job.seal {
                        sealing.push((first + i as u64, job.reply));
                    } else {
                        let _ = job.reply.send(Ok(first + i as u64));
                    }
                }
                since_checkpoint += written;
                if let Some(signer) = &signer
                    && (since_checkpoint >= signer.every
                        || last_checkpoint.elapsed() >= signer.interval
                        || !sealing.is_empty())
                    && let Some(handle) = db.as_ref()
                {
                    match write_checkpoint(handle, dir, &mut syncer, signer, next, head) {
                        Ok(h) => {
                            next += 1;
                            head = h;
                            since_checkpoint = 0;
                            last_checkpoint = std::time::Instant::now();
                            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                            s.records = next;
                            s.head = hex(&head);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot write an audit checkpoint"),
                    }
                }
                // The record itself is durable either way; the checkpoint is
                // a best effort (a failed one is logged above).
                for (seq, reply) in sealing {
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(e) => {
                // Every handle must go for the file lock to be released.
                *reader.lock().unwrap_or_else(PoisonError::into_inner) = None;
                db = None;
                syncer = Syncer::default();
                fail_batch(state, jobs, &e);
            }
        }
    }
}

/// Seals a signed checkpoint for record `next - 1` as record `next`.
fn write_checkpoint(
    db: &sled::Db,
    dir: &Path,
    syncer: &mut Syncer,
    signer: &CheckpointSigner,
    next: u64,
    head: [u8; 32],
) -> Result<[u8; 32], String> {
    let at = next - 1;
    let signature = signer
        .key
        .sign(&airgate_policy::audit::checkpoint_message(at, &head));
    let content = Content {
        time: now(),
        event: Event::Checkpoint {
            seq: at,
            head: hex(&head),
            signature: hex(signature.as_ref()),
            key_sha256: signer.key_sha256.clone(),
        },
    }
    .encode();
    let (stored, h) = seal(next, &head, &content);
    db.insert(key(next), stored).map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    syncer.sync(dir).map_err(|e| e.to_string())?;
    // The journal keeps a copy off the store: what `audit verify
    // --checkpoints` compares against after truncation or rewriting.
    tracing::info!(
        AIRGATE_EVENT = "checkpoint",
        AIRGATE_SEQ = at,
        AIRGATE_HEAD = %hex(&head),
        AIRGATE_SIGNATURE = %hex(signature.as_ref()),
        "audit checkpoint {at} {}",
        hex(&head)
    );
    Ok(h)
}

/// Answers `first` and whatever else is queued with a refusal: the log was
/// closed by a clean stop.
fn refuse_after_close(first: Job, rx: &Receiver<Job>) {
    let mut refused = 0u64;
    for job in std::iter::once(first).chain(rx.try_iter()) {
        let _ = job.reply.send(Err(
            "the audit log is closed (the daemon is stopping)".to_owned()
        ));
        refused += 1;
    }
    tracing::warn!(
        refused,
        "audit records after the clean stop's checkpoint were refused"
    );
}

fn fail_batch(state: &Mutex<WriterState>, jobs: Vec<Job>, error: &str) {
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    if s.degraded.is_none() {
        tracing::error!(
            AIRGATE_EVENT = "audit_degraded",
            error,
            "AUDIT STORE CANNOT WRITE: failing closed"
        );
    }
    s.degraded = Some(error.to_owned());
    s.failed_batches += 1;
    drop(s);
    for job in jobs {
        let _ = job.reply.send(Err(error.to_owned()));
    }
}

/// Iterates a stopped store's records as (seq, content) for export.
/// Every record from `from` on. The outer error is the store failing to
/// read; the inner one a record that is damaged (its sequence is known, so
/// an export can say which and go on; verification reports it as a break).
pub fn read_all(
    db: &sled::Db,
    from: u64,
) -> impl Iterator<Item = Result<(u64, Result<Content, String>), String>> + '_ {
    db.range(key(from)..).map(|item| {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| "a key that is not a sequence number".to_owned())?;
        let content = open(seq, &v)
            .map_err(|e| e.to_string())
            .and_then(|sealed| sealed.parse().map_err(|e| format!("record {seq}: {e}")));
        Ok((seq, content))
    })
}

/// The export line standing for a damaged record.
pub fn damaged_line(seq: u64, error: &str) -> String {
    serde_json::json!({"seq": seq, "damaged": error}).to_string()
}

#[cfg(test)]
mod tests;
