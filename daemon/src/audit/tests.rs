//! The store on a real sled database: checkpoints, verification at start
//! and in full, tampering found at the first bad record, a clean stop's
//! seal, retention.

use ring::signature::KeyPair as _;

use super::*;
use crate::heartbeat::Heartbeat;

fn pair(seed: u8) -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("key")
}

/// A store in `path` with a small cache: a new one gets a genesis record;
/// checkpoints every `every` records when given (host key: `pair(1)`).
fn open_test(
    path: &Path,
    every: Option<u64>,
    accept_broken: bool,
    heartbeat: &Heartbeat,
    worker: &str,
) -> Result<(Audit, Opened), AuditError> {
    Audit::open(
        path,
        OpenOptions {
            cache_bytes: 8 << 20,
            marker: None,
            journal_all: false,
            accept_broken,
        },
        |_| Event::Genesis {
            host_key_sha256: String::new(),
            machine_id: "m".to_owned(),
            state_dir: "s".to_owned(),
            previous_store: None,
        },
        every.map(|every| CheckpointSigner {
            key: pair(1),
            key_sha256: String::new(),
            every,
            interval: std::time::Duration::from_secs(3600),
        }),
        heartbeat.register(worker, std::time::Duration::from_secs(30)),
    )
}

/// An ordinary record. (Not a shutdown: a checkpoint right after one is a
/// clean stop's, and only the next start's first record may follow it.)
fn note(i: u64) -> Event {
    Event::ConfigReload {
        ok: true,
        message: format!("r{i}"),
    }
}

/// Retries `f` while the store is still held by the writer thread of a
/// dropped handle (it lets go once its channel closes).
fn settle<T>(mut f: impl FnMut() -> Result<T, AuditError>) -> Result<T, AuditError> {
    for _ in 0..100 {
        match f() {
            Err(AuditError::Open { reason, .. }) if reason.contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
    f()
}

/// The stopped store, opened raw (as an intruder or a disk would see it).
fn raw(store: &Path) -> sled::Db {
    settle(|| open_db(store, 8 << 20)).expect("reopen")
}

fn swap(db: &sled::Db, a: u64, b: u64) {
    let va = db.get(key(a)).expect("get").expect("record");
    let vb = db.get(key(b)).expect("get").expect("record");
    db.insert(key(a), vb).expect("insert");
    db.insert(key(b), va).expect("insert");
    db.flush().expect("flush");
}

/// A flipped byte in record `seq`'s content (its checksum no longer holds).
fn damage(db: &sled::Db, seq: u64) {
    let mut bytes = db.get(key(seq)).expect("get").expect("record").to_vec();
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    db.insert(key(seq), bytes).expect("insert");
    db.flush().expect("flush");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

#[test]
fn a_store_written_by_a_newer_airgate_is_refused_and_an_unmarked_one_is_format_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    {
        // A store from before the marker: records only.
        let db = open_db(&store, 8 << 20).expect("db");
        let (stored, _) = seal(0, &ZERO, b"{}");
        db.insert(key(0), stored).expect("insert");
        db.flush().expect("flush");
    }
    let db = open_db(&store, 8 << 20).expect("db");
    check_format(&db).expect("an unmarked store opens");
    let meta = db.open_tree("meta").expect("meta");
    assert_eq!(
        meta.get("audit_format").expect("get").as_deref(),
        Some(&FORMAT.to_be_bytes()[..])
    );
    meta.insert("audit_format", &(FORMAT + 1).to_be_bytes())
        .expect("insert");
    let err = check_format(&db).expect_err("newer");
    assert!(err.contains("written by a newer airgate"), "{err}");
}

#[test]
fn a_sealed_append_is_followed_by_a_durable_checkpoint_before_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let (audit, _) =
        open_test(&store, Some(1000), false, &heartbeat, "audit-writer").expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let before = audit.state().records;
    rt.block_on(audit.append(note(0))).expect("append");
    assert_eq!(audit.state().records, before + 1, "no checkpoint yet");
    let seq = rt
        .block_on(audit.append_sealed(Event::Shutdown {
            reason: "stop".to_owned(),
        }))
        .expect("append");
    // Answered only once the checkpoint over it is in.
    assert_eq!(audit.state().records, seq + 2);
    let db = audit.reader().expect("reader");
    let stored = db
        .get(key(seq + 1))
        .expect("get")
        .expect("checkpoint record");
    let sealed = open(seq + 1, &stored).expect("opens");
    let good = pair(1).public_key().as_ref().to_vec();
    assert_eq!(checkpoint_valid(&sealed, &good), Some(true));
    // Nothing follows a clean stop's checkpoint: later records are refused.
    assert!(matches!(
        rt.block_on(audit.append(note(1))),
        Err(AuditError::Unavailable(_))
    ));
    audit.record(note(2));
    assert!(rt.block_on(audit.append(note(3))).is_err());
    assert_eq!(audit.state().records, seq + 2);
    assert_eq!(
        db.last().expect("last").map(|(k, _)| k.to_vec()),
        Some(key(seq + 1).to_vec())
    );
}

#[test]
fn checkpoints_are_signed_by_the_host_key_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let (audit, opened) =
        open_test(&store, Some(3), false, &heartbeat, "audit-writer").expect("open");
    assert!(opened.created);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for i in 0..10 {
        rt.block_on(audit.append(note(i))).expect("append");
    }
    assert!(audit.state().records > 12, "checkpoints were added");
    drop(audit);
    // The writer thread lets go of the store once its channel closes.
    let db = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            open_db(&store, 8 << 20).ok()
        })
        .expect("reopen");
    let good = pair(1).public_key().as_ref().to_vec();
    let v = verify_db(&db, Vec::new(), Some(&good), 0).expect("verifies");
    assert!(v.checkpoints >= 3, "{v:?}");
    let other = pair(2).public_key().as_ref().to_vec();
    assert!(matches!(
        verify_db(&db, Vec::new(), Some(&other), 0),
        Err(AuditError::Broken(ChainError::BadCheckpoint { .. }))
    ));
    // From a record on: the same tail, counted to the same end.
    let tail = verify_db(&db, Vec::new(), Some(&good), 5).expect("from 5");
    assert_eq!((tail.records, tail.head), (v.records, v.head));
    assert!(matches!(
        verify_db(&db, Vec::new(), Some(&good), v.records + 5),
        Err(AuditError::Open { .. })
    ));
    // A run read on its own (an evidence pack's): from a checkpoint it
    // is anchored by the signature, from elsewhere it is not; another
    // host's key or a rewritten record is caught.
    let records: Vec<(u64, Vec<u8>)> = db
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(k, v)| {
            Some((
                u64::from_be_bytes(<[u8; 8]>::try_from(k.as_ref()).ok()?),
                v.to_vec(),
            ))
        })
        .collect();
    let first_checkpoint = records
        .iter()
        .find(|(seq, v)| open(*seq, v).is_ok_and(|s| checkpoint_valid(&s, &good) == Some(true)))
        .map(|(seq, _)| *seq)
        .expect("a checkpoint");
    let run = |from: u64, key: &[u8]| {
        let mut check = SegmentCheck::new(key);
        for (seq, v) in records.iter().filter(|(s, _)| *s >= from) {
            let _ = check.push(*seq, v);
        }
        check
    };
    let anchored = run(first_checkpoint, &good);
    assert!(
        anchored.error.is_none() && anchored.anchored,
        "{:?}",
        anchored.error
    );
    assert_eq!(anchored.reached().map(|r| r.0), Some(v.records));
    assert_eq!(anchored.checkpoints, v.checkpoints);
    let loose = run(first_checkpoint + 1, &good);
    assert!(loose.error.is_none() && !loose.anchored);
    assert!(matches!(
        run(0, &other).error,
        Some(ChainError::BadCheckpoint { .. })
    ));
    let mut check = SegmentCheck::new(&good);
    for (seq, v) in &records {
        let mut v = v.clone();
        if *seq == 4 {
            let last = v.len() - 1;
            v[last] ^= 1;
        }
        let _ = check.push(*seq, &v);
    }
    assert!(
        matches!(check.error, Some(ChainError::Checksum { seq: 4 })),
        "{:?}",
        check.error
    );

    // At start only the tail after the last good checkpoint is walked.
    let from = verify_from_last_checkpoint(&db, &good).expect("from checkpoint");
    assert_eq!(from.records, v.records);
    assert!(matches!(
        verify_from_last_checkpoint(&db, &other),
        Err(AuditError::Broken(ChainError::BadCheckpoint { .. }))
    ));
    // A record rewritten after the last checkpoint is found there.
    let last = v.records - 1;
    let mut bytes = db.get(key(last)).expect("get").expect("record").to_vec();
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    db.insert(key(last), bytes).expect("tamper");
    assert!(matches!(
        verify_from_last_checkpoint(&db, &good),
        Err(AuditError::Broken(ChainError::Checksum { seq })) if seq == last
    ));
    assert!(matches!(
        verify_db(&db, Vec::new(), Some(&good), 5),
        Err(AuditError::Broken(ChainError::Checksum { seq })) if seq == last
    ));
    drop(db);
    // And the daemon's open refuses the store (serve exits 76 on this).
    let reopened = open_test(&store, Some(3), false, &heartbeat, "audit-writer-2");
    assert!(matches!(reopened, Err(AuditError::Broken(_))));
    // Unless the operator overrides, which is recorded.
    let (audit, opened) =
        open_test(&store, None, true, &heartbeat, "audit-writer-3").expect("override");
    assert!(!opened.created, "the broken store is kept, not replaced");
    rt.block_on(audit.append(Event::Shutdown {
        reason: "after override".to_owned(),
    }))
    .expect("append");
    // The export goes on past the damaged record and names it.
    let (lines, _) = audit.page(0, 1000).expect("page");
    assert!(lines.iter().any(|l| l.contains("audit_override")));
    let damaged = damaged_line(
        last,
        &format!("record {last}: checksum mismatch (storage damage)"),
    );
    assert!(lines.contains(&damaged), "{lines:?}");
}

#[test]
fn retention_prunes_behind_a_checkpoint_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let heartbeat = Heartbeat::new();
    let (audit, _) = open_test(
        &dir.path().join("audit"),
        Some(4),
        false,
        &heartbeat,
        "audit-writer",
    )
    .expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for i in 0..10 {
        rt.block_on(audit.append(note(i))).expect("append");
    }
    assert_eq!(audit.prune_before(0).expect("nothing that old"), None);
    let (first_kept, removed) = audit
        .prune_before(now() + 10)
        .expect("prune")
        .expect("something pruned");
    assert!(
        first_kept > 0 && removed == first_kept,
        "{first_kept} {removed}"
    );
    let db = audit.reader().expect("reader");
    let good = pair(1).public_key().as_ref().to_vec();
    let whole = verify_db(&db, Vec::new(), Some(&good), 0).expect("verifies after pruning");
    assert_eq!(whole.records, audit.state().records);
    assert!(
        verify_db(&db, Vec::new(), None, 0).is_err(),
        "a pruned store needs the host key"
    );
    verify_from_last_checkpoint(&db, &good).expect("start-up check");
    // Appending goes on after pruning; so does a full verification.
    rt.block_on(audit.append(note(10)))
        .expect("append after prune");
    verify_db(&db, Vec::new(), Some(&good), 0).expect("verifies");
    let all = audit.verify_all().expect("the whole chain");
    assert_eq!(all.records, audit.state().records);
}

#[test]
fn a_swapped_pair_is_reported_at_its_first_key_and_the_override_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = runtime();
    {
        // No checkpoints: the start walks from genesis.
        let (audit, _) = open_test(&store, None, false, &heartbeat, "w1").expect("open");
        for i in 0..6 {
            rt.block_on(audit.append(note(i))).expect("append");
        }
    }
    let db = raw(&store);
    swap(&db, 3, 5);
    drop(db);
    let refused = settle(|| open_test(&store, None, false, &heartbeat, "w2"));
    let Err(AuditError::Broken(e)) = refused else {
        panic!("a swapped pair must be refused");
    };
    assert_eq!(e, ChainError::Misplaced { seq: 5, key: 3 });
    assert_eq!(e.seq(), 3, "{e}");
    let (audit, _) = settle(|| open_test(&store, None, true, &heartbeat, "w3")).expect("override");
    rt.block_on(audit.append(note(9))).expect("append");
    let (lines, _) = audit.page(0, 100).expect("page");
    let overrides: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"]["kind"] == "audit_override")
        .collect();
    assert_eq!(overrides.len(), 1, "{lines:?}");
    assert_eq!(overrides[0]["event"]["first_bad_seq"], 3, "{lines:?}");
    drop(audit);

    // With checkpoints a start scans back for the last one: two damaged
    // records after it are reported at the first, not at the one met first.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    {
        let (audit, _) = open_test(&store, Some(1000), false, &heartbeat, "w4").expect("open");
        for i in 0..6 {
            rt.block_on(audit.append(note(i))).expect("append");
        }
    }
    let db = raw(&store);
    damage(&db, 3);
    damage(&db, 5);
    let good = pair(1).public_key().as_ref().to_vec();
    assert!(matches!(
        verify_from_last_checkpoint(&db, &good),
        Err(AuditError::Broken(ChainError::Checksum { seq: 3 }))
    ));
    drop(db);
    assert!(matches!(
        settle(|| open_test(&store, Some(1000), false, &heartbeat, "w5")),
        Err(AuditError::Broken(ChainError::Checksum { seq: 3 }))
    ));
}

#[test]
fn a_record_forged_after_a_clean_stop_is_refused_but_a_crashed_start_after_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = runtime();
    let good = pair(1).public_key().as_ref().to_vec();
    let stop = |worker: &str| {
        let (audit, _) =
            settle(|| open_test(&store, Some(4), false, &heartbeat, worker)).expect("open");
        for i in 0..6 {
            rt.block_on(audit.append(note(i))).expect("append");
        }
        rt.block_on(audit.append_sealed(Event::Shutdown {
            reason: "signal".to_owned(),
        }))
        .expect("clean stop")
    };
    let shutdown = stop("w1");
    {
        // The next start crashes: nothing sealed after its records.
        let (audit, opened) =
            settle(|| open_test(&store, Some(1000), false, &heartbeat, "w2")).expect("reopen");
        assert_eq!(
            opened.records,
            shutdown + 2,
            "shutdown, then its checkpoint"
        );
        rt.block_on(audit.append(note(7))).expect("append");
    }
    // Its first record follows the clean stop's checkpoint: that opens, at
    // start and in full (periodic checkpoints, every 4, are followed by
    // ordinary records).
    let db = raw(&store);
    verify_from_last_checkpoint(&db, &good).expect("after a crash");
    verify_db(&db, Vec::new(), Some(&good), 0).expect("in full");
    drop(db);
    let shutdown = stop("w3");

    // A record forged after the last clean stop's checkpoint, sealed to link:
    // every other check passes. Even a start-up record is not what a start
    // writes first.
    let db = raw(&store);
    let (k, v) = db.last().expect("last").expect("a record");
    let at = u64::from_be_bytes(<[u8; 8]>::try_from(k.as_ref()).expect("key"));
    assert_eq!(at, shutdown + 1);
    let checkpoint = open(at, &v).expect("opens");
    assert_eq!(checkpoint_valid(&checkpoint, &good), Some(true));
    let forged = Content {
        time: now(),
        event: Event::Startup {
            version: "0.1.0".to_owned(),
            pid: 1,
            fail_open: false,
        },
    }
    .encode();
    let (stored, _) = seal(at + 1, &checkpoint.hash, &forged);
    db.insert(key(at + 1), stored).expect("insert");
    db.flush().expect("flush");
    let inserted = ChainError::AfterCleanStop { seq: at + 1 };
    assert!(matches!(
        verify_from_last_checkpoint(&db, &good),
        Err(AuditError::Broken(e)) if e == inserted
    ));
    assert!(matches!(
        verify_db(&db, Vec::new(), Some(&good), 0),
        Err(AuditError::Broken(e)) if e == inserted
    ));
    drop(db);
    let refused = settle(|| open_test(&store, Some(1000), false, &heartbeat, "w4"));
    assert!(
        matches!(&refused, Err(AuditError::Broken(e)) if *e == inserted),
        "{:?}",
        refused.as_ref().err()
    );
    // Taken out again, the store opens.
    let db = raw(&store);
    db.remove(key(at + 1)).expect("remove");
    db.flush().expect("flush");
    drop(db);
    settle(|| open_test(&store, Some(1000), false, &heartbeat, "w5")).expect("opens");
}

#[test]
fn a_full_verification_reads_the_history_a_start_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = runtime();
    {
        let (audit, _) = open_test(&store, Some(1000), false, &heartbeat, "w1").expect("open");
        for i in 0..6 {
            rt.block_on(audit.append(note(i))).expect("append");
        }
        rt.block_on(audit.append_sealed(Event::Shutdown {
            reason: "signal".to_owned(),
        }))
        .expect("clean stop");
    }
    // Two records swapped before the clean stop's checkpoint.
    let db = raw(&store);
    swap(&db, 3, 4);
    drop(db);
    // The start reads from that checkpoint on, and opens ...
    let (audit, _) =
        settle(|| open_test(&store, Some(1000), false, &heartbeat, "w2")).expect("opens");
    rt.block_on(audit.append(note(7))).expect("append");
    // ... the full walk, beside the running writer, finds the swap.
    let found = audit.verify_all();
    assert!(
        matches!(&found, Err(AuditError::Broken(e)) if e.seq() == 3),
        "{:?}",
        found.as_ref().err()
    );
    rt.block_on(audit.append(note(8)))
        .expect("the writer goes on");
}

#[test]
fn a_record_over_the_bound_is_refused_and_new_blob_files_are_synced() {
    let big = Event::AuditDegraded {
        error: "x".repeat(MAX_RECORD_BYTES),
    };
    assert!(matches!(
        encode(big),
        Err(AuditError::TooLarge { ref kind, bytes }) if kind == "audit_degraded" && bytes > MAX_RECORD_BYTES
    ));
    let fits = Event::AuditDegraded {
        error: "x".repeat(MAX_RECORD_BYTES - 200),
    };
    assert!(encode(fits).is_ok());

    // sled writes a node over a quarter of its segment to blobs/ and
    // never syncs it: the syncer finds each new one after its batch.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("audit");
    let db = open_db(&store, 8 << 20).expect("db");
    let mut syncer = Syncer::default();
    syncer.sync(&store).expect("first sync");
    let before = syncer.blobs.len();
    db.insert(b"big", vec![7u8; 300 << 10]).expect("insert");
    db.flush().expect("flush");
    syncer.sync(&store).expect("sync");
    assert!(
        syncer.blobs.len() > before,
        "sled wrote a blob file and the syncer saw it: {:?}",
        syncer.blobs
    );
}
