//! The fold over real sealed records in a real sled store, and the live
//! store opened on an audit log the way the daemon opens it.

use airgate_policy::audit::{DecisionRecord, ZERO, key, seal};

use super::*;
use crate::heartbeat::Heartbeat;

/// 2026-11-30T23:59:00Z: a minute before December.
const NOV_END: i64 = 1_796_083_140;

struct Log {
    db: sled::Db,
    next: u64,
    prev: [u8; 32],
    _dir: tempfile::TempDir,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("audit"))
            .open()
            .expect("sled");
        Self {
            db,
            next: 0,
            prev: ZERO,
            _dir: dir,
        }
    }

    fn push(&mut self, time: i64, event: Event) {
        let content = Content { time, event }.encode();
        let (stored, h) = seal(self.next, &self.prev, &content);
        self.db.insert(key(self.next), stored).expect("insert");
        self.next += 1;
        self.prev = h;
    }

    fn tree(&self) -> sled::Tree {
        open_tree(&self.db).expect("tree")
    }
}

fn user(n: u8) -> String {
    hex32(&[n; 32])
}

fn hex32(b: &[u8; 32]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn decision(id: &str, tenant: &str, user: Option<u8>, licences: &[&str], allow: bool) -> Event {
    Event::Decision(Box::new(DecisionRecord {
        request_id: id.to_owned(),
        identity: Value::Null,
        tenant: Some(tenant.to_owned()),
        end_user: user.map(self::user),
        route: "/v1/chat/completions".to_owned(),
        model: "m".to_owned(),
        model_files: Vec::new(),
        licences: licences.iter().map(|l| (*l).to_owned()).collect(),
        bundle_version: Some(1),
        bundle_digest: None,
        purpose: None,
        decision: if allow { "allow" } else { "deny" }.to_owned(),
        reason: if allow { "allowed" } else { "tenant_user_cap" }.to_owned(),
        rule: String::new(),
        guard_score: None,
    }))
}

fn completion(id: &str, prompt: u64, generated: u64) -> Event {
    Event::Completion {
        request_id: id.to_owned(),
        decision_seq: None,
        outcome: "completed".to_owned(),
        detail: String::new(),
        prompt_tokens: prompt,
        completion_tokens: generated,
        duration_ms: 1,
        served: None,
    }
}

#[test]
fn served_users_count_under_every_licence_and_released_ones_are_taken_back() {
    let mut log = Log::new();
    let t = NOV_END - 3600;
    // A derivative model's chain: its own licence and its parent's.
    let chain = ["Apache-2.0", "LicenseRef-Gemma"];
    log.push(t, decision("r1", "claims", Some(1), &chain, true));
    log.push(t, decision("r2", "claims", Some(2), &chain, true));
    log.push(t, decision("r3", "claims", Some(1), &chain, true));
    log.push(
        t,
        decision("r4", "search", Some(1), &["LicenseRef-Gemma"], true),
    );
    log.push(t, decision("r5", "claims", Some(9), &chain, false));
    log.push(t, completion("r1", 10, 5));
    log.push(t, completion("r2", 0, 0)); // nothing served: user 2 is taken back
    log.push(t, completion("r3", 7, 3));
    log.push(t, completion("r4", 1, 1));
    let tree = log.tree();
    let done = catch_up(&log.db, &tree, log.next).expect("fold");
    assert_eq!((done.folded, done.next), (9, 9));
    let nov = month_index(t);
    assert_eq!(month_name(nov), "2026-11");
    let users = users_in(&tree, USER, nov);
    assert_eq!(users.get("claims"), Some(&1));
    assert_eq!(users.get("search"), Some(&1));
    let licences = users_in(&tree, LICENCE_USER, nov);
    // The same id in two tenants is two users (ids are keyed per tenant by
    // the daemon; here the test reuses one hash on purpose: it counts once).
    assert_eq!(licences.get("LicenseRef-Gemma"), Some(&1));
    assert_eq!(licences.get("Apache-2.0"), Some(&1));
    assert_eq!(per_day_in(&tree, TOKENS, nov).get("claims"), Some(&25));
    assert_eq!(per_day_in(&tree, REQUESTS, nov).get("claims"), Some(&2));
    assert_eq!(per_day_in(&tree, DENIALS, nov).get("claims"), Some(&1));
    assert_eq!(
        tree.scan_prefix([PENDING]).count(),
        0,
        "every request completed"
    );
}

/// A completion naming its decision's sequence, as this version writes them.
fn completion_of(seq: u64, id: &str, prompt: u64, generated: u64) -> Event {
    let mut event = completion(id, prompt, generated);
    if let Event::Completion { decision_seq, .. } = &mut event {
        *decision_seq = Some(Some(seq));
    }
    event
}

#[test]
fn a_shared_request_id_cannot_make_a_served_user_vanish() {
    // Two requests with one caller-chosen id (X-Request-Id, or a trace id
    // shared by parallel calls): user 1's is served, a decoy of user 2
    // with the same id is not. Joined by the decision's sequence, user 1
    // stays counted and only the decoy's user is taken back.
    let mut log = Log::new();
    let t = NOV_END - 3600;
    log.push(t, decision("same", "claims", Some(1), &["L"], true)); // seq 0
    log.push(t, decision("same", "claims", Some(2), &["L"], true)); // seq 1
    log.push(t, completion_of(1, "same", 0, 0)); // the decoy: nothing served
    log.push(t, completion_of(0, "same", 10, 5));
    // A completion whose decision was never durable (fail-open) joins nothing.
    log.push(
        t,
        Event::Completion {
            request_id: "same".to_owned(),
            decision_seq: Some(None),
            outcome: "completed".to_owned(),
            detail: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            duration_ms: 1,
            served: Some(false),
        },
    );
    let tree = log.tree();
    catch_up(&log.db, &tree, log.next).expect("fold");
    let nov = month_index(t);
    assert_eq!(users_in(&tree, USER, nov).get("claims"), Some(&1));
    assert!(
        tree.get(user_key(USER, nov, "claims", &[1; 32]))
            .expect("get")
            .is_some()
    );
    assert_eq!(users_in(&tree, LICENCE_USER, nov).get("L"), Some(&1));
    assert_eq!(per_day_in(&tree, TOKENS, nov).get("claims"), Some(&15));
    assert_eq!(per_day_in(&tree, REQUESTS, nov).get("claims"), Some(&1));
    assert_eq!(tree.scan_prefix([PENDING]).count(), 0);
    assert_eq!(tree.scan_prefix([PENDING_BY_ID]).count(), 0);
}

#[test]
fn a_users_request_that_serves_nothing_cannot_take_back_their_served_one() {
    // Two requests of one user in flight: the first (which counted them as
    // new) serves nothing, the second is served. The user stays counted,
    // under the tenant and the licence; one that serves nothing alone goes.
    let mut log = Log::new();
    let t = NOV_END - 3600;
    log.push(t, decision("a", "claims", Some(1), &["L"], true)); // seq 0
    log.push(t, decision("b", "claims", Some(1), &["L"], true)); // seq 1
    log.push(t, completion_of(0, "a", 0, 0));
    log.push(t, completion_of(1, "b", 4, 2));
    log.push(t, decision("c", "claims", Some(2), &["L"], true)); // seq 4
    log.push(t, completion_of(4, "c", 0, 0));
    let tree = log.tree();
    catch_up(&log.db, &tree, log.next).expect("fold");
    let nov = month_index(t);
    assert_eq!(users_in(&tree, USER, nov).get("claims"), Some(&1));
    assert_eq!(users_in(&tree, LICENCE_USER, nov).get("L"), Some(&1));
    assert!(
        tree.get(user_key(USER, nov, "claims", &[1; 32]))
            .expect("get")
            .is_some()
    );
    assert!(
        tree.get(user_key(USER, nov, "claims", &[2; 32]))
            .expect("get")
            .is_none()
    );
}

#[test]
fn a_fold_cut_off_part_way_resumes_and_equals_a_rebuild() {
    let mut log = Log::new();
    for i in 0..300u32 {
        let id = format!("r{i}");
        let u = u8::try_from(i % 97).expect("small");
        log.push(
            NOV_END - 7200 + i64::from(i),
            decision(&id, "claims", Some(u), &["L"], true),
        );
        if i % 3 != 0 {
            log.push(
                NOV_END - 7200 + i64::from(i),
                completion(&id, u64::from(i), 1),
            );
        }
    }
    let tree = log.tree();
    // The daemon was killed after folding 250 records; the log went on.
    catch_up(&log.db, &tree, 250).expect("first part");
    assert_eq!(
        tree.get(K_NEXT).expect("get").map(|v| as_u64(&v)),
        Some(250)
    );
    let done = catch_up(&log.db, &tree, log.next).expect("the rest");
    assert_eq!(done.next, log.next);
    // Folding again changes nothing: the watermark makes it idempotent.
    assert_eq!(catch_up(&log.db, &tree, log.next).expect("again").folded, 0);
    let nov = month_index(NOV_END);
    let resumed = month_counts(&tree, nov);
    clear(&tree).expect("clear");
    catch_up(&log.db, &tree, log.next).expect("rebuild");
    assert_eq!(month_counts(&tree, nov), resumed);
    assert_eq!(users_in(&tree, USER, nov).get("claims"), Some(&97));
}

#[test]
fn months_are_counted_apart_and_old_ones_pruned() {
    let mut log = Log::new();
    log.push(NOV_END, decision("a", "claims", Some(1), &["L"], true));
    log.push(NOV_END, completion("a", 1, 1));
    log.push(NOV_END + 60, decision("b", "claims", Some(1), &["L"], true));
    log.push(NOV_END + 60, completion("b", 1, 1));
    log.push(NOV_END + 60, decision("c", "claims", Some(2), &["L"], true));
    log.push(NOV_END + 60, completion("c", 1, 1));
    let tree = log.tree();
    catch_up(&log.db, &tree, log.next).expect("fold");
    let (nov, dec) = (month_index(NOV_END), month_index(NOV_END + 60));
    assert_eq!(month_name(dec), "2026-12");
    assert_eq!(users_in(&tree, USER, nov).get("claims"), Some(&1));
    assert_eq!(users_in(&tree, USER, dec).get("claims"), Some(&2));
    assert_eq!(prune(&tree, dec, 1).expect("prune"), 1);
    assert!(users_in(&tree, USER, nov).is_empty());
    assert!(per_day_in(&tree, TOKENS, nov).is_empty());
    assert_eq!(users_in(&tree, USER, dec).get("claims"), Some(&2));
}

#[test]
fn a_store_of_a_newer_format_is_refused_and_months_parse_strictly() {
    let log = Log::new();
    let tree = log.tree();
    tree.insert(K_FORMAT, &(FORMAT + 1).to_be_bytes())
        .expect("insert");
    let err = open_tree(&log.db).expect_err("newer format");
    assert!(err.contains(&format!("format {}", FORMAT + 1)), "{err}");
    // A format-1 tree (pending requests keyed by request id) is taken up.
    tree.insert(K_FORMAT, &1u32.to_be_bytes()).expect("insert");
    let tree = open_tree(&log.db).expect("older format");
    assert_eq!(
        tree.get(K_FORMAT).expect("get").as_deref(),
        Some(&FORMAT.to_be_bytes()[..])
    );
    assert_eq!(
        parse_month("2026-11").map(month_name),
        Ok("2026-11".to_owned())
    );
    for bad in ["2026-13", "2026-0", "26-11", "2026/11", "x"] {
        assert!(parse_month(bad).is_err(), "{bad}");
    }
}

fn open_audit(path: &std::path::Path, heartbeat: &Heartbeat) -> Audit {
    Audit::open(
        path,
        crate::audit::OpenOptions {
            cache_bytes: 8 << 20,
            marker: None,
            journal_all: false,
            accept_broken: false,
        },
        |_| Event::Genesis {
            host_key_sha256: String::new(),
            machine_id: "m".to_owned(),
            state_dir: "s".to_owned(),
            previous_store: None,
        },
        None,
        heartbeat.register("audit-writer", Duration::from_secs(30)),
    )
    .expect("audit")
    .0
}

fn reservation(tenant: &str, u: u8) -> Reservation {
    Reservation {
        tenant: TenantId::parse(tenant).expect("tenant"),
        user: Some(UserKey([u; 32])),
        tokens: 10,
        prompt_tokens: 2,
        truncate: false,
        requests_per_minute: None,
        tokens_per_day: None,
        concurrent_requests: None,
        tenant_user_cap: Some(4),
        tenant_user_limit: Some(4),
        licence_user_thresholds: Vec::new(),
    }
}

fn warnings(audit: &Audit) -> Vec<String> {
    let (lines, _) = audit.page(0, 10_000).expect("page");
    lines
        .into_iter()
        .filter(|l| l.contains("usage_warning"))
        .collect()
}

#[test]
fn reopened_counts_match_the_log_and_warnings_come_once_per_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let config = UsageConfig {
        warn_at: vec![0.5],
        retention_months: 25,
    };
    let now = || UnixTime(crate::bundle::system_time_now());
    {
        let audit = open_audit(&path, &heartbeat);
        let (usage, opened) = Usage::open(
            audit.clone(),
            &config,
            now(),
            heartbeat.register("f", Duration::from_secs(60)),
        )
        .expect("usage");
        assert_eq!(opened.tenant_users, 0);
        // Users 1 and 2 are served; 3 is released; 4's request is cut off.
        for (u, served) in [(1u8, Some(5)), (2, Some(3)), (3, None), (4, Some(0))] {
            let ticket = usage
                .reserve(reservation("claims", u), now())
                .expect("reserve");
            rt.block_on(audit.append(decision(&format!("r{u}"), "claims", Some(u), &["L"], true)))
                .expect("append");
            match served {
                Some(0) => std::mem::forget(ticket),
                Some(tokens) => {
                    usage.commit(ticket, tokens);
                    rt.block_on(audit.append(completion(&format!("r{u}"), tokens, 0)))
                        .expect("append");
                }
                None => {
                    usage.release(ticket);
                    rt.block_on(audit.append(completion(&format!("r{u}"), 0, 0)))
                        .expect("append");
                }
            }
        }
        // The cap is 4 and the warning fraction 0.5: given at the second user, once.
        assert_eq!(
            usage.tenant_users(&TenantId::parse("claims").expect("id")),
            3
        );
        // Let the warning record reach the log.
        rt.block_on(audit.append(Event::Shutdown {
            reason: "test".to_owned(),
        }))
        .expect("append");
        assert_eq!(warnings(&audit).len(), 1, "{:?}", warnings(&audit));
        let report = usage.report(None, None, now()).expect("report");
        assert_eq!(report["tenants"][0]["users"], 3);
        assert_eq!(report["tenants"][0]["tokens"], 8);
        assert_eq!(report["warnings"][0]["fraction"], 0.5);
    }
    // Everything is dropped, as after a kill: the store is reopened.
    std::thread::sleep(Duration::from_millis(1500));
    let audit = open_audit(&path, &heartbeat);
    let (usage, opened) = Usage::open(
        audit.clone(),
        &config,
        now(),
        heartbeat.register("f2", Duration::from_secs(60)),
    )
    .expect("reopen");
    assert_eq!(opened.tenant_users, 3, "users 1, 2 and the cut-off 4");
    assert_eq!(opened.unfinished, 1);
    assert!(opened.ahead_of_log.is_none(), "{:?}", opened.ahead_of_log);
    let claims = TenantId::parse("claims").expect("id");
    assert_eq!(usage.tenant_users(&claims), 3);
    assert_eq!(usage.tokens_today(&claims), 8);
    assert!(usage.tenant_user_seen(&claims, &UserKey([4; 32])));
    assert!(!usage.tenant_user_seen(&claims, &UserKey([3; 32])));
    // The cut-off request holds nothing in flight any more: its user is
    // counted as served, not stuck "in flight" for the month.
    let tree = usage.tree().expect("tree");
    let k = user_key(USER, month_index(now().seconds()), "claims", &[4; 32]);
    let s = Standing::read(&tree.get(k).expect("get").expect("user 4"));
    assert_eq!((s.in_flight, s.served), (0, true));
    // The fourth user fills the cap; no second warning for the same fraction.
    let t = usage
        .reserve(reservation("claims", 5), now())
        .expect("fourth");
    usage.commit(t, 1);
    assert_eq!(
        usage
            .reserve(reservation("claims", 6), now())
            .expect_err("cap")
            .reason,
        Reason::TenantUserCap
    );
    rt.block_on(audit.append(Event::Shutdown {
        reason: "test".to_owned(),
    }))
    .expect("append");
    assert_eq!(warnings(&audit).len(), 1);
    // A rebuild from the log finds what the store held.
    let rebuilt = usage.rebuild(now()).expect("rebuild");
    assert_eq!(rebuilt["differences"], json!([]), "{rebuilt}");
}

#[test]
fn a_store_from_before_the_usage_counters_is_migrated_and_the_migration_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    {
        // What an airgate before format 1 left: records, no usage tree.
        let audit = open_audit(&path, &heartbeat);
        for u in 1..=3u8 {
            let id = format!("old-{u}");
            rt.block_on(audit.append(decision(&id, "claims", Some(u), &["L"], true)))
                .expect("append");
            rt.block_on(audit.append(completion(&id, 4, 2)))
                .expect("append");
        }
        let db = audit.reader().expect("db");
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n.as_ref() == TREE.as_bytes())
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let audit = open_audit(&path, &heartbeat);
    let config = UsageConfig::default();
    let now = UnixTime(crate::bundle::system_time_now());
    let (usage, opened) = Usage::open(
        audit.clone(),
        &config,
        now,
        heartbeat.register("m", Duration::from_secs(60)),
    )
    .expect("open");
    assert!(opened.migrated);
    assert_eq!(
        usage.tenant_users(&TenantId::parse("claims").expect("id")),
        3
    );
    assert_eq!(
        usage.tokens_today(&TenantId::parse("claims").expect("id")),
        18
    );
    rt.block_on(audit.append(Event::Shutdown {
        reason: "t".to_owned(),
    }))
    .expect("append");
    let (lines, _) = audit.page(0, 100).expect("page");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("usage_rebuilt") && l.contains("written by an earlier airgate")),
        "{lines:?}"
    );
}

#[test]
fn a_fold_past_the_end_of_a_truncated_log_is_rebuilt_from_the_log_and_said() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit");
    let heartbeat = Heartbeat::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let config = UsageConfig::default();
    let now = || UnixTime(crate::bundle::system_time_now());
    let last = {
        let audit = open_audit(&path, &heartbeat);
        let (usage, _) = Usage::open(
            audit.clone(),
            &config,
            now(),
            heartbeat.register("f1", Duration::from_secs(60)),
        )
        .expect("usage");
        let mut last = 0;
        for u in 1..=4u8 {
            let id = format!("r{u}");
            last = rt
                .block_on(audit.append(decision(&id, "claims", Some(u), &["L"], false)))
                .expect("append");
        }
        assert_eq!(usage.catch_up().expect("fold").next, last + 1);
        last
    };
    // The log loses its last record; the fold, in its own tree, does not.
    let db = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            crate::audit::open_db(&path, 8 << 20).ok()
        })
        .expect("reopen");
    db.remove(key(last)).expect("truncate");
    db.flush().expect("flush");
    drop(db);
    std::thread::sleep(Duration::from_millis(100));
    let audit = open_audit(&path, &heartbeat);
    let (usage, opened) = Usage::open(
        audit.clone(),
        &config,
        now(),
        heartbeat.register("f2", Duration::from_secs(60)),
    )
    .expect("reopen");
    let ahead = opened.ahead_of_log.expect("the fold was ahead of the log");
    assert_eq!((ahead.fold_next, ahead.log_records), (last + 1, last));
    assert!(
        ahead
            .differences
            .iter()
            .any(|d| d.ends_with("denials of claims: 4 -> 3")),
        "{:?}",
        ahead.differences
    );
    // The counts are the log's, and the fold goes on from its end.
    let tree = usage.tree().expect("tree");
    let month = month_index(now().seconds());
    assert_eq!(per_day_in(&tree, DENIALS, month).get("claims"), Some(&3));
    let next = rt
        .block_on(audit.append(decision("r5", "claims", Some(5), &["L"], false)))
        .expect("append");
    assert_eq!(usage.catch_up().expect("fold").next, next + 1);
    assert_eq!(per_day_in(&tree, DENIALS, month).get("claims"), Some(&4));
    let (lines, _) = audit.page(0, 100).expect("page");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("usage_rebuilt") && l.contains("the log ends at")),
        "{lines:?}"
    );
}
