//! Tampering of every kind is found, at the first bad record.

use super::*;

fn content(i: u64) -> Vec<u8> {
    let event = if i == 0 {
        Event::Genesis {
            host_key_sha256: "ab".repeat(32),
            machine_id: "m".to_owned(),
            state_dir: "/var/lib/airgate".to_owned(),
            previous_store: None,
        }
    } else {
        Event::Completion {
            request_id: format!("r{i}"),
            decision_seq: None,
            outcome: "completed".to_owned(),
            detail: String::new(),
            prompt_tokens: i,
            completion_tokens: 2 * i,
            duration_ms: 5,
            served: None,
        }
    };
    Content {
        time: 1_795_000_000 + i as i64,
        event,
    }
    .encode()
}

/// Stored records under their keys.
type Records = Vec<(u64, Vec<u8>)>;

/// A chain of `n` records as (key, stored bytes), and the hash of each.
fn chain(n: u64) -> (Records, Vec<[u8; 32]>) {
    let mut prev = ZERO;
    let mut records = Vec::new();
    let mut hashes = Vec::new();
    for seq in 0..n {
        let (stored, h) = seal(seq, &prev, &content(seq));
        records.push((seq, stored));
        hashes.push(h);
        prev = h;
    }
    (records, hashes)
}

fn verify(
    records: &[(u64, Vec<u8>)],
    checkpoints: Vec<(u64, [u8; 32])>,
) -> Result<u64, ChainError> {
    let mut v = Verifier::new().with_checkpoints(checkpoints);
    for (k, r) in records {
        v.push(*k, r)?;
    }
    v.finish()?;
    Ok(v.next())
}

#[test]
fn an_intact_chain_verifies_and_records_parse_back() {
    let (records, hashes) = chain(10);
    assert_eq!(verify(&records, vec![(4, hashes[4])]), Ok(10));
    let sealed = open(3, &records[3].1).expect("open");
    assert!(matches!(
        sealed.parse().expect("json").event,
        Event::Completion {
            prompt_tokens: 3,
            ..
        }
    ));
}

#[test]
fn tampering_is_found_at_the_first_bad_record() {
    let (records, hashes) = chain(10);

    // A flipped byte in the content: the CRC catches storage damage ...
    let mut r = records.clone();
    let last = r[5].1.len() - 3;
    r[5].1[last] ^= 1;
    assert_eq!(verify(&r, vec![]), Err(ChainError::Checksum { seq: 5 }));
    // ... and with the CRC recomputed (a deliberate rewrite) the hash does.
    let crc = crc32fast::hash(&r[5].1[4..]).to_be_bytes();
    r[5].1[..4].copy_from_slice(&crc);
    assert_eq!(verify(&r, vec![]), Err(ChainError::Hash { seq: 5 }));

    // A deleted record.
    let mut r = records.clone();
    r.remove(6);
    assert_eq!(
        verify(&r, vec![]),
        Err(ChainError::Gap { seq: 6, found: 7 })
    );

    // Two records swapped (values exchanged under their keys).
    let mut r = records.clone();
    let (a, b) = (r[3].1.clone(), r[4].1.clone());
    r[3].1 = b;
    r[4].1 = a;
    let e = verify(&r, vec![]).expect_err("swapped");
    assert_eq!(e, ChainError::Misplaced { seq: 4, key: 3 });
    // Reported at the first bad key (what an override records), and named so.
    assert_eq!(e.seq(), 3);
    assert!(e.to_string().starts_with("record 3: holds record 4"), "{e}");
    // Farther apart: still the first key, not the sequence the record carries.
    let mut r = records.clone();
    let (a, b) = (r[2].1.clone(), r[6].1.clone());
    r[2].1 = b;
    r[6].1 = a;
    let e = verify(&r, vec![]).expect_err("swapped");
    assert_eq!(e, ChainError::Misplaced { seq: 6, key: 2 });
    assert_eq!(e.seq(), 2);

    // A record re-sealed with a consistent hash but a new content breaks the link after it.
    let mut r = records.clone();
    let (forged, _) = seal(7, &hashes[6], &content(70));
    r[7].1 = forged;
    assert_eq!(verify(&r, vec![]), Err(ChainError::Link { seq: 8 }));

    // A truncated tail verifies on its own, but not past an exported checkpoint.
    let r = records[..6].to_vec();
    assert_eq!(verify(&r, vec![]), Ok(6));
    assert_eq!(
        verify(&r, vec![(8, hashes[8])]),
        Err(ChainError::ShortOfCheckpoint {
            seq: 6,
            checkpoint: 8
        })
    );

    // A whole chain rebuilt from scratch with other content: the checkpoint differs.
    let mut prev = ZERO;
    let mut rebuilt = Vec::new();
    for seq in 0..10 {
        let c = if seq == 2 { content(99) } else { content(seq) };
        let (stored, h) = seal(seq, &prev, &c);
        rebuilt.push((seq, stored));
        prev = h;
    }
    assert_eq!(
        verify(&rebuilt, vec![(4, hashes[4])]),
        Err(ChainError::CheckpointMismatch { seq: 4 })
    );

    // Record 0 must be a genesis record.
    let (stored, _) = seal(0, &ZERO, &content(1));
    assert_eq!(verify(&[(0, stored)], vec![]), Err(ChainError::NoGenesis));
    assert_eq!(
        open(0, b"short").err(),
        Some(ChainError::Truncated { seq: 0 })
    );
}

#[test]
fn reload_events_export_under_stable_kinds() {
    let on = serde_json::to_value(Event::FailOpenChanged { fail_open: true }).expect("json");
    assert_eq!(
        on,
        serde_json::json!({"kind": "fail_open_changed", "fail_open": true})
    );
    let withdrawn = Event::BundleWithdrawn {
        version: 3,
        digest: "ab".repeat(32),
        reason: "unknown key id \"k1\"".to_owned(),
    };
    let v = serde_json::to_value(&withdrawn).expect("json");
    assert_eq!(v["kind"], "bundle_withdrawn");
    assert_eq!(v["version"], 3);
    let back: Event = serde_json::from_value(v).expect("parses back");
    assert_eq!(back, withdrawn);
}

#[test]
fn a_start_opens_with_its_audit_opened_record_and_nothing_else() {
    let at = |time, event| Content { time, event };
    let opened = |records| Event::AuditOpened {
        records,
        head: "00".repeat(32),
    };
    assert!(opens_a_start(7, &at(1, opened(7))));
    // One that counts other records than those before it is not this start's.
    assert!(!opens_a_start(7, &at(1, opened(6))));
    assert!(!opens_a_start(7, &at(1, opened(8))));
    for other in [
        Event::Startup {
            version: "0.1.0".to_owned(),
            pid: 1,
            fail_open: false,
        },
        Event::Shutdown {
            reason: "signal".to_owned(),
        },
        Event::AuditOverride {
            first_bad_seq: 3,
            error: String::new(),
        },
    ] {
        assert!(!opens_a_start(7, &at(1, other.clone())), "{other:?}");
    }
    let e = ChainError::AfterCleanStop { seq: 7 };
    assert_eq!(e.seq(), 7);
    assert!(e.to_string().starts_with("record 7:"), "{e}");
}
