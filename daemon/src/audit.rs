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

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use airgate_policy::audit::{ChainError, Content, Event, Verifier, ZERO, key, open, seal};
use airgate_policy::time::Clock;

use crate::bundle::SystemClock;
use crate::heartbeat::Worker;
use crate::keys::hex;

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
}

struct Job {
    content: Vec<u8>,
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

/// The handle requests append through; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Job>,
    state: Arc<Mutex<WriterState>>,
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

/// Verifies a whole store; returns (records, head).
pub fn verify_db(
    db: &sled::Db,
    checkpoints: Vec<(u64, [u8; 32])>,
) -> Result<(u64, [u8; 32]), AuditError> {
    let mut v = Verifier::new().with_checkpoints(checkpoints);
    for item in db.iter() {
        let (k, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Broken(ChainError::Truncated { seq: v.next() }))?;
        v.push(seq, &value).map_err(AuditError::Broken)?;
    }
    v.finish().map_err(AuditError::Broken)?;
    Ok((v.next(), v.head()))
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

impl Audit {
    /// Opens (or creates, with its genesis record) the store and verifies
    /// the whole chain; starts the writer thread. Blocking.
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        marker: Option<&Path>,
        genesis: impl FnOnce(Option<String>) -> Event,
        worker: Worker,
    ) -> Result<(Self, Opened), AuditError> {
        let db = open_db(dir, cache_bytes)?;
        let io = |e: &dyn std::fmt::Display| AuditError::Open {
            path: dir.to_owned(),
            reason: e.to_string(),
        };
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
        let (records, head) = verify_db(&db, Vec::new())?;
        let state = Arc::new(Mutex::new(WriterState {
            records,
            head: hex(&head),
            ..WriterState::default()
        }));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer_state = Arc::clone(&state);
        let dir = dir.to_owned();
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || {
                write_loop(
                    db,
                    cache_bytes,
                    &dir,
                    rx,
                    records,
                    head,
                    &writer_state,
                    &worker,
                )
            })
            .map_err(|e| io(&e))?;
        Ok((
            Self { tx, state },
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
        let content = Content { time: now(), event }.encode();
        let (reply, wait) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Job { content, reply }) {
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
        let content = Content { time: now(), event }.encode();
        let (reply, _) = tokio::sync::oneshot::channel();
        if self.tx.try_send(Job { content, reply }).is_err() {
            tracing::error!("audit queue full or writer stopped: a record was lost");
        }
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
    mut next: u64,
    mut head: [u8; 32],
    state: &Mutex<WriterState>,
    worker: &Worker,
) {
    // sled keeps a failed I/O as a global error for the life of a handle, so
    // after a failure the handle is dropped and the store reopened at the
    // next batch: service resumes by itself once the disk takes writes.
    let mut db = Some(db);
    let mut log: Option<std::fs::File> = None;
    loop {
        worker.idle();
        let Ok(first) = rx.recv() else {
            return;
        };
        worker.progress();
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
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
            .and_then(|()| {
                let synced = match &log {
                    Some(f) => f.sync_data(),
                    None => fsync_tree(dir).and_then(|()| {
                        let f = std::fs::File::open(dir.join("db"))?;
                        f.sync_data()?;
                        log = Some(f);
                        Ok(())
                    }),
                };
                synced.map_err(|e| e.to_string())
            });
        worker.progress();
        match result {
            Ok(()) => {
                for (i, job) in jobs.into_iter().enumerate() {
                    let _ = job.reply.send(Ok(next + i as u64));
                }
                next = seq;
                head = prev;
                let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                s.records = next;
                s.head = hex(&head);
                s.batches += 1;
                if let Some(was) = s.degraded.take() {
                    tracing::warn!(previous_error = %was, "audit store writes again; service resumes");
                }
            }
            Err(e) => {
                db = None;
                log = None;
                fail_batch(state, jobs, &e);
            }
        }
    }
}

fn fail_batch(state: &Mutex<WriterState>, jobs: Vec<Job>, error: &str) {
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    if s.degraded.is_none() {
        tracing::error!(error, "AUDIT STORE CANNOT WRITE: failing closed");
    }
    s.degraded = Some(error.to_owned());
    s.failed_batches += 1;
    drop(s);
    for job in jobs {
        let _ = job.reply.send(Err(error.to_owned()));
    }
}

/// Iterates a stopped store's records as (seq, content) for export.
pub fn read_all(
    db: &sled::Db,
    from: u64,
) -> impl Iterator<Item = Result<(u64, Content), String>> + '_ {
    db.range(key(from)..).map(|item| {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| "bad key".to_owned())?;
        let sealed = open(seq, &v).map_err(|e| e.to_string())?;
        let content = sealed.parse().map_err(|e| format!("record {seq}: {e}"))?;
        Ok((seq, content))
    })
}
