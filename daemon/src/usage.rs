//! The usage store: admission counters that hold across restarts.
//!
//! Live admission runs in memory ([`MemoryAdmission`]: exact under
//! concurrency, one mutex, microseconds). What it counts is derived, durably,
//! from the audit log, which stays the record of truth: a fold over the
//! records, kept in the sled tree `usage` beside them together with the
//! sequence it has reached. An allowed decision counts its end user for the
//! tenant and for every licence of the model's chain (derivatives count
//! under their ancestors' licences) and the request for its day; the
//! request's completion charges the tokens actually processed, or, when
//! nothing was served, takes back what the decision counted. After a crash
//! the fold catches up with the log and memory is restored from it before
//! READY; `airgate usage rebuild` recomputes it from the first record kept.
//!
//! When a user counts as seen: when a request of theirs is admitted, taken
//! back if nothing was served (not one prompt token processed). A refused
//! request never counts. A request cut off by a crash (its decision
//! recorded, its completion never) keeps its user counted and charges no
//! tokens: unknown use is counted against a licence, not forgiven.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use airgate_policy::admission::{Admission, MemoryAdmission, Refusal, Restored, Ticket};
use airgate_policy::audit::{Content, Event, Joins};
use airgate_policy::bundle::{Bundle, Limits};
use airgate_policy::decision::{Reason, Reservation, UsageView, UserKey};
use airgate_policy::identity::TenantId;
use airgate_policy::time::{Date, UnixTime};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::audit::{Audit, AuditError, read_all};
use crate::config::UsageConfig;
use crate::heartbeat::Worker;

/// The tree beside the audit records.
pub const TREE: &str = "usage";
/// On-disk format of the tree; a newer airgate reads older formats.
/// Format 2: pending requests are keyed by their decision's sequence (1:
/// by request id). Pending entries live only between two starts, so a
/// format-1 tree is format 2 once its pending entries are cleared at start.
pub const FORMAT: u32 = 2;
const K_FORMAT: &[u8] = b"!format";
/// The next audit sequence the fold will read.
const K_NEXT: &[u8] = b"!next";
/// Records folded per sled batch.
const CHUNK: usize = 10_000;
/// How far back the rate windows are restored from the log's tail.
const RECENT_SCAN: usize = 100_000;

// Key tags. Period keys are TAG || period (u32 BE) || scope || 0 [|| user].
const USER: u8 = b'U'; // month, tenant, user
const LICENCE_USER: u8 = b'L'; // month, licence, user
const TOKENS: u8 = b'T'; // day, tenant -> u64
const REQUESTS: u8 = b'Q'; // day, tenant -> u64 (admitted and served)
const DENIALS: u8 = b'D'; // day, tenant -> u64
const WARNED: u8 = b'W'; // month, scope\0id\0permille
const PENDING: u8 = b'S'; // decision seq (u64 BE) -> Pending (allowed, not completed)
// Completions from before they named their decision's sequence join by
// request id: request id -> decision seq; and, folded by those versions,
// request id -> Pending. Like PENDING, cleared at every start.
const PENDING_BY_ID: u8 = b'I';
const LEGACY_PENDING: u8 = b'P';

/// Month index of an instant: year * 12 + month - 1 (UTC).
pub fn month_index(time: i64) -> u32 {
    let d = UnixTime(time).date();
    u32::try_from(i64::from(d.year) * 12 + i64::from(d.month) - 1).unwrap_or(0)
}

fn day_index(time: i64) -> u32 {
    u32::try_from(time.div_euclid(86_400)).unwrap_or(0)
}

pub fn month_name(month: u32) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

/// Parses `YYYY-MM`.
pub fn parse_month(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a month (YYYY-MM)");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    let y: u32 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if y.to_string().len() != 4 || !(1..=12).contains(&m) {
        return Err(bad());
    }
    Ok(y * 12 + m - 1)
}

/// The day indices of a month: [first, next month's first).
fn days_of(month: u32) -> (u32, u32) {
    let start = |m: u32| {
        let date = Date {
            year: i32::try_from(m / 12).unwrap_or(0),
            month: u8::try_from(m % 12 + 1).unwrap_or(1),
            day: 1,
        };
        u32::try_from(date.days()).unwrap_or(0)
    };
    (start(month), start(month + 1))
}

/// TAG || period (u32 BE): every key of one tag and period starts so.
fn period_prefix(tag: u8, period: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + 64);
    k.push(tag);
    k.extend_from_slice(&period.to_be_bytes());
    k
}

fn period_key(tag: u8, period: u32, scope: &str) -> Vec<u8> {
    let mut k = period_prefix(tag, period);
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k
}

fn user_key(tag: u8, period: u32, scope: &str, user: &[u8; 32]) -> Vec<u8> {
    let mut k = period_key(tag, period, scope);
    k.extend_from_slice(user);
    k
}

fn pending_key(decision_seq: u64) -> Vec<u8> {
    let mut k = vec![PENDING];
    k.extend_from_slice(&decision_seq.to_be_bytes());
    k
}

fn id_key(tag: u8, request_id: &str) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(request_id.as_bytes());
    k
}

fn as_u64(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

/// Splits `TAG || period || scope || 0 || rest` into (period, scope, rest).
fn split_key(k: &[u8]) -> Option<(u32, &str, &[u8])> {
    let period = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?);
    let rest = k.get(5..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let scope = std::str::from_utf8(&rest[..nul]).ok()?;
    Some((period, scope, &rest[nul + 1..]))
}

/// An allowed request whose completion has not been folded yet.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// The caller's request id (absent in entries of format 1's fold).
    #[serde(default)]
    request_id: String,
    tenant: String,
    user: Option<String>,
    month: u32,
    day: u32,
    new_tenant_user: bool,
    new_licence_users: Vec<String>,
    /// Every licence the user was counted under (absent in format 1).
    #[serde(default)]
    licences: Vec<String>,
}

/// Changes to the tree, read through, applied as one batch.
struct Overlay<'a> {
    tree: &'a sled::Tree,
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            changes: BTreeMap::new(),
        }
    }

    fn get(&self, k: &[u8]) -> sled::Result<Option<Vec<u8>>> {
        match self.changes.get(k) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(k)?.map(|v| v.to_vec())),
        }
    }

    fn insert(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.changes.insert(k, Some(v));
    }

    fn remove(&mut self, k: Vec<u8>) {
        self.changes.insert(k, None);
    }

    fn add(&mut self, k: Vec<u8>, delta: i64) -> sled::Result<()> {
        let was = self.get(&k)?.map_or(0, |v| as_u64(&v));
        let now = was.saturating_add_signed(delta);
        self.insert(k, now.to_be_bytes().to_vec());
        Ok(())
    }

    fn apply(self) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in self.changes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch)
    }
}

/// A user key's value: the sequence of the decision that first counted the
/// user (8 bytes), their requests in flight (4) and whether one was served
/// (1). A value of format 1 (the sequence alone) is a user who stays counted.
struct Standing {
    first: u64,
    in_flight: u32,
    served: bool,
}

impl Standing {
    fn read(v: &[u8]) -> Self {
        match (v.get(..8), v.get(8..12), v.get(12)) {
            (Some(first), Some(n), Some(served)) => Self {
                first: as_u64(first),
                in_flight: <[u8; 4]>::try_from(n).map_or(0, u32::from_be_bytes),
                served: *served != 0,
            },
            _ => Self {
                first: as_u64(v),
                in_flight: 0,
                served: true,
            },
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = self.first.to_be_bytes().to_vec();
        v.extend_from_slice(&self.in_flight.to_be_bytes());
        v.push(u8::from(self.served));
        v
    }
}

/// An allowed decision counts its user under `k`; true if the user is new.
fn start_request(o: &mut Overlay<'_>, k: Vec<u8>, seq: u64) -> sled::Result<bool> {
    let (standing, new) = match o.get(&k)? {
        Some(v) => {
            let mut s = Standing::read(&v);
            s.in_flight = s.in_flight.saturating_add(1);
            (s, false)
        }
        None => (
            Standing {
                first: seq,
                in_flight: 1,
                served: false,
            },
            true,
        ),
    };
    o.insert(k, standing.bytes());
    Ok(new)
}

/// A pending request ended: its user has one request fewer in flight under
/// the tenant and each licence, and leaves a count only when nothing of
/// theirs is in flight and nothing was served (so a decoy request that
/// serves nothing cannot take back a user another request served).
fn end_requests(o: &mut Overlay<'_>, p: &Pending, served: bool) -> sled::Result<()> {
    let Some(user) = p.user.as_deref().and_then(crate::keys::unhex32) else {
        return Ok(());
    };
    // Entries folded by format 1 name only the licences the user was new under.
    let licences = if p.licences.is_empty() {
        &p.new_licence_users
    } else {
        &p.licences
    };
    let keys = std::iter::once(user_key(USER, p.month, &p.tenant, &user)).chain(
        licences
            .iter()
            .map(|l| user_key(LICENCE_USER, p.month, l, &user)),
    );
    for k in keys {
        let Some(v) = o.get(&k)? else {
            continue;
        };
        let mut s = Standing::read(&v);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.served |= served;
        if s.in_flight == 0 && !s.served {
            o.remove(k);
        } else {
            o.insert(k, s.bytes());
        }
    }
    Ok(())
}

/// Folds one record into the counts. See the module docs.
fn fold(o: &mut Overlay<'_>, seq: u64, content: &Content) -> sled::Result<()> {
    let month = month_index(content.time);
    let day = day_index(content.time);
    match &content.event {
        Event::Decision(d) => {
            let Some(tenant) = d.tenant.as_deref() else {
                return Ok(());
            };
            if d.decision != "allow" {
                return o.add(period_key(DENIALS, day, tenant), 1);
            }
            o.add(period_key(REQUESTS, day, tenant), 1)?;
            let mut pending = Pending {
                request_id: d.request_id.clone(),
                tenant: tenant.to_owned(),
                user: d.end_user.clone(),
                month,
                day,
                new_tenant_user: false,
                new_licence_users: Vec::new(),
                licences: Vec::new(),
            };
            if let Some(user) = d.end_user.as_deref().and_then(crate::keys::unhex32) {
                pending.new_tenant_user =
                    start_request(o, user_key(USER, month, tenant, &user), seq)?;
                for licence in &d.licences {
                    if start_request(o, user_key(LICENCE_USER, month, licence, &user), seq)? {
                        pending.new_licence_users.push(licence.clone());
                    }
                }
                pending.licences.clone_from(&d.licences);
            }
            o.insert(
                pending_key(seq),
                serde_json::to_vec(&pending).unwrap_or_default(),
            );
            o.insert(
                id_key(PENDING_BY_ID, &d.request_id),
                seq.to_be_bytes().to_vec(),
            );
        }
        Event::Completion {
            prompt_tokens,
            completion_tokens,
            served,
            ..
        } => {
            // The decision is found by its sequence: a caller's id, which
            // two requests may share, never decides whose counts change.
            let k = match content.event.joins() {
                Some(Joins::Seq(s)) => pending_key(s),
                Some(Joins::RequestId(id)) => match o.get(&id_key(PENDING_BY_ID, id))? {
                    Some(s) => pending_key(as_u64(&s)),
                    None => id_key(LEGACY_PENDING, id),
                },
                Some(Joins::Nothing) | None => return Ok(()),
            };
            let Some(p) = o
                .get(&k)?
                .and_then(|v| serde_json::from_slice::<Pending>(&v).ok())
            else {
                return Ok(());
            };
            o.remove(k.clone());
            let by_id = id_key(PENDING_BY_ID, &p.request_id);
            if o.get(&by_id)?.as_deref() == k.get(1..) {
                o.remove(by_id);
            }
            let used = prompt_tokens.saturating_add(*completion_tokens);
            if served.unwrap_or(used > 0) {
                end_requests(o, &p, true)?;
                return o.add(
                    period_key(TOKENS, p.day, &p.tenant),
                    i64::try_from(used).unwrap_or(i64::MAX),
                );
            }
            // Nothing was served: the decision's counts are taken back.
            o.add(period_key(REQUESTS, p.day, &p.tenant), -1)?;
            end_requests(o, &p, false)?;
        }
        Event::UsageWarning {
            scope,
            id,
            period,
            fraction,
            ..
        } => {
            if let Ok(m) = parse_month(period) {
                o.insert(warned_key(m, scope, id, *fraction), Vec::new());
            }
        }
        _ => {}
    }
    Ok(())
}

fn permille(fraction: f64) -> u32 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "fractions are validated in (0, 1)"
    )]
    let p = (fraction * 1000.0).round() as u32;
    p
}

fn warned_key(month: u32, scope: &str, id: &str, fraction: f64) -> Vec<u8> {
    let mut k = period_key(WARNED, month, scope);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(&permille(fraction).to_be_bytes());
    k
}

/// What a catch-up did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CatchUp {
    pub folded: u64,
    pub damaged: u64,
    /// The next sequence to fold.
    pub next: u64,
}

/// Folds the records from the tree's `next` up to `through` (exclusive).
pub fn catch_up(db: &sled::Db, tree: &sled::Tree, through: u64) -> Result<CatchUp, String> {
    let e = |e: sled::Error| e.to_string();
    let mut next = tree.get(K_NEXT).map_err(e)?.map_or(0, |v| as_u64(&v));
    let mut done = CatchUp::default();
    while next < through {
        let mut o = Overlay::new(tree);
        let mut after = next;
        for item in read_all(db, next).take(CHUNK) {
            let (seq, content) = item?;
            if seq >= through {
                break;
            }
            match content {
                Ok(c) => fold(&mut o, seq, &c).map_err(e)?,
                Err(why) => {
                    // A damaged record cannot be counted; verification
                    // reports it as a break in the chain.
                    tracing::warn!(seq, error = %why, "usage: a damaged audit record was not counted");
                    done.damaged += 1;
                }
            }
            done.folded += 1;
            after = seq + 1;
        }
        if after == next {
            break; // nothing more to read (the records end before `through`)
        }
        o.insert(K_NEXT.to_vec(), after.to_be_bytes().to_vec());
        o.apply().map_err(e)?;
        next = after;
    }
    done.next = next;
    Ok(done)
}

/// Opens the tree, checking its format (a store written by a newer airgate is refused).
pub fn open_tree(db: &sled::Db) -> Result<sled::Tree, String> {
    let tree = db.open_tree(TREE).map_err(|e| e.to_string())?;
    match tree.get(K_FORMAT).map_err(|e| e.to_string())? {
        None => {
            tree.insert(K_FORMAT, &FORMAT.to_be_bytes())
                .map_err(|e| e.to_string())?;
        }
        Some(v) => {
            let found = <[u8; 4]>::try_from(v.as_ref()).map_or(u32::MAX, u32::from_be_bytes);
            if found > FORMAT {
                return Err(format!(
                    "the usage store has format {found}; this airgate reads up to {FORMAT} (was a newer airgate run here?)"
                ));
            }
            if found < FORMAT {
                tree.insert(K_FORMAT, &FORMAT.to_be_bytes())
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(tree)
}

/// Deletes every count of the tree (the format stays) so the fold starts over.
fn clear(tree: &sled::Tree) -> Result<(), String> {
    let mut batch = sled::Batch::default();
    for item in tree.iter().keys() {
        let k = item.map_err(|e| e.to_string())?;
        if k.as_ref() != K_FORMAT {
            batch.remove(k);
        }
    }
    tree.apply_batch(batch).map_err(|e| e.to_string())
}

/// Users per scope in a month, from the tree.
fn users_in(tree: &sled::Tree, tag: u8, month: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let prefix = period_prefix(tag, month);
    for (k, _) in tree.scan_prefix(&prefix).flatten() {
        if let Some((_, scope, _)) = split_key(&k) {
            *out.entry(scope.to_owned()).or_insert(0) += 1;
        }
    }
    out
}

/// Sums of a per-day counter per tenant over a month.
fn per_day_in(tree: &sled::Tree, tag: u8, month: u32) -> BTreeMap<String, u64> {
    let (first, end) = days_of(month);
    let mut out = BTreeMap::new();
    let (lo, hi) = (period_prefix(tag, first), period_prefix(tag, end));
    for (k, v) in tree.range(lo..hi).flatten() {
        if let Some((_, scope, _)) = split_key(&k) {
            *out.entry(scope.to_owned()).or_insert(0) += as_u64(&v);
        }
    }
    out
}

/// Every count of a month, as compared by `rebuild`.
fn month_counts(tree: &sled::Tree, month: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (tag, name) in [(USER, "users"), (LICENCE_USER, "licence users")] {
        for (scope, n) in users_in(tree, tag, month) {
            out.insert(format!("{} {name} of {scope}", month_name(month)), n);
        }
    }
    for (tag, name) in [
        (TOKENS, "tokens"),
        (REQUESTS, "requests"),
        (DENIALS, "denials"),
    ] {
        for (scope, n) in per_day_in(tree, tag, month) {
            out.insert(format!("{} {name} of {scope}", month_name(month)), n);
        }
    }
    out
}

fn months_held(tree: &sled::Tree) -> Vec<u32> {
    let mut months = std::collections::BTreeSet::new();
    for tag in [USER, LICENCE_USER] {
        for (k, _) in tree.scan_prefix([tag]).flatten() {
            if let Some((m, _, _)) = split_key(&k) {
                months.insert(m);
            }
        }
    }
    for tag in [TOKENS, REQUESTS, DENIALS] {
        for (k, _) in tree.scan_prefix([tag]).flatten() {
            if let Some((d, _, _)) = split_key(&k) {
                months.insert(month_index(i64::from(d) * 86_400));
            }
        }
    }
    months.into_iter().collect()
}

/// Admission with counts that survive restarts. See the module docs.
pub struct Usage {
    mem: MemoryAdmission,
    audit: Audit,
    warn_at: Vec<f64>,
    retention_months: u32,
    /// The `warned_key`s of the warnings given (as the tree keeps them).
    warned: Mutex<HashSet<Vec<u8>>>,
    /// One fold at a time (the background catch-up, a report, a rebuild).
    folding: Mutex<()>,
}

/// What opening the usage store found, for the log and status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Opened {
    pub caught_up: CatchUp,
    /// Requests whose completion never came (cut off by a crash or kill).
    pub unfinished: u64,
    pub tenant_users: u64,
    pub pruned_months: u64,
    /// The counters were created from an older store's log.
    pub migrated: bool,
    /// The fold had counted records the log no longer has; it was rebuilt.
    pub ahead_of_log: Option<AheadOfLog>,
}

/// The fold had reached past the end of the log it was opened on: records
/// it counted are gone (a log truncated after its last checkpoint, which
/// the start's verification cannot tell from a log that ends there).
#[derive(Clone, Debug, Serialize)]
pub struct AheadOfLog {
    /// The next sequence the fold would have read.
    pub fold_next: u64,
    /// Records the log held when it was opened.
    pub log_records: u64,
    /// Counts that changed when the fold was rebuilt from the log, in words.
    pub differences: Vec<String>,
}

/// What recomputing the tree from the log found.
struct Rebuilt {
    /// The first record the log keeps.
    from_seq: u64,
    done: CatchUp,
    /// Counts that differ from what the tree held, in words.
    differences: Vec<String>,
}

/// Recomputes the tree from the first record the log keeps through
/// `through` (exclusive), and says which counts changed.
fn rebuild_tree(db: &sled::Db, tree: &sled::Tree, through: u64) -> Result<Rebuilt, String> {
    let months = months_held(tree);
    let before: BTreeMap<String, u64> =
        months.iter().flat_map(|m| month_counts(tree, *m)).collect();
    let first = db
        .first()
        .map_err(|e| e.to_string())?
        .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    clear(tree)?;
    let done = catch_up(db, tree, through)?;
    let mut months = months;
    months.extend(months_held(tree));
    months.sort_unstable();
    months.dedup();
    let after: BTreeMap<String, u64> = months.iter().flat_map(|m| month_counts(tree, *m)).collect();
    let mut differences = Vec::new();
    for key in before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (b, a) = (
            before.get(key).copied().unwrap_or(0),
            after.get(key).copied().unwrap_or(0),
        );
        if a != b {
            differences.push(format!("{key}: {b} -> {a}"));
        }
    }
    Ok(Rebuilt {
        from_seq: first,
        done,
        differences,
    })
}

impl Usage {
    /// Catches the fold up with the log, restores the live counters from it
    /// as of `now`, and starts the background fold. Blocking; before READY.
    pub fn open(
        audit: Audit,
        config: &UsageConfig,
        now: UnixTime,
        worker: Worker,
    ) -> Result<(Arc<Self>, Opened), AuditError> {
        let unavailable = |e: String| AuditError::Unavailable(format!("usage store: {e}"));
        let db = audit.reader()?;
        // A store written before the usage counters existed (format 0):
        // they are derived from its log now, and that is recorded.
        let log_records = audit.opened_records();
        let migrating = !db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == TREE.as_bytes())
            && log_records > 1;
        let tree = open_tree(&db).map_err(unavailable)?;
        // The fold reads records by sequence: one that has reached past the
        // end of the log counted records that are gone, and would skip as
        // many new ones. It is rebuilt from the log there is, and that is said.
        let fold_next = tree
            .get(K_NEXT)
            .map_err(|e| unavailable(e.to_string()))?
            .map_or(0, |v| as_u64(&v));
        let mut ahead_of_log = None;
        let caught_up = if fold_next > log_records {
            let rebuilt = rebuild_tree(&db, &tree, audit.state().records).map_err(unavailable)?;
            tracing::warn!(
                AIRGATE_EVENT = "usage_ahead_of_log",
                fold_next,
                log_records,
                differences = rebuilt.differences.len(),
                "USAGE COUNTERS AHEAD OF THE AUDIT LOG: records {log_records} to {} were counted and are gone (the log was truncated?); the counters were rebuilt from the log",
                fold_next - 1
            );
            let mut differences = vec![format!(
                "the usage counters had counted audit records through {}, the log ends at {log_records} records: rebuilt from the log",
                fold_next - 1
            )];
            differences.extend(rebuilt.differences.iter().cloned());
            audit.record(Event::UsageRebuilt {
                from_seq: rebuilt.from_seq,
                through_seq: rebuilt.done.next,
                differences,
            });
            ahead_of_log = Some(AheadOfLog {
                fold_next,
                log_records,
                differences: rebuilt.differences,
            });
            rebuilt.done
        } else {
            catch_up(&db, &tree, audit.state().records).map_err(unavailable)?
        };
        if migrating {
            tracing::warn!(
                AIRGATE_EVENT = "usage_migrated",
                records = caught_up.folded,
                "usage counters created from the existing audit log (a store from before format {FORMAT})"
            );
            audit.record(Event::UsageRebuilt {
                from_seq: 0,
                through_seq: caught_up.next,
                differences: vec![format!(
                    "usage store created at format {FORMAT} from the audit log (the store had none: written by an earlier airgate)"
                )],
            });
        }
        // Nothing is in flight before the daemon serves: every pending
        // request left was cut off. Its user stays counted, as if served,
        // and holds nothing in flight any more.
        let mut unfinished = 0;
        let mut o = Overlay::new(&tree);
        for tag in [PENDING, PENDING_BY_ID, LEGACY_PENDING] {
            for (k, v) in tree.scan_prefix([tag]).flatten() {
                if tag != PENDING_BY_ID {
                    unfinished += 1;
                    if let Ok(p) = serde_json::from_slice::<Pending>(&v) {
                        end_requests(&mut o, &p, true).map_err(|e| unavailable(e.to_string()))?;
                    }
                }
                o.remove(k.to_vec());
            }
        }
        o.apply().map_err(|e| unavailable(e.to_string()))?;
        let pruned_months = prune(&tree, month_index(now.seconds()), config.retention_months)
            .map_err(unavailable)?;
        let usage = Arc::new(Self {
            mem: MemoryAdmission::new(),
            audit,
            warn_at: config.warn_at.clone(),
            retention_months: config.retention_months,
            warned: Mutex::new(HashSet::new()),
            folding: Mutex::new(()),
        });
        let restored = usage.restore(&db, &tree, now);
        let opened = Opened {
            caught_up,
            unfinished,
            tenant_users: restored,
            pruned_months,
            migrated: migrating,
            ahead_of_log,
        };
        // Weak: the thread ends with the last handle (tests reopen stores).
        let background = Arc::downgrade(&usage);
        std::thread::Builder::new()
            .name("usage-fold".to_owned())
            .spawn(move || fold_loop(&background, &worker))
            .map_err(|e| unavailable(e.to_string()))?;
        Ok((usage, opened))
    }

    /// Live counters from the tree (and the log's last minute, for rates).
    fn restore(&self, db: &sled::Db, tree: &sled::Tree, now: UnixTime) -> u64 {
        let month = month_index(now.seconds());
        let today = day_index(now.seconds());
        let mut state = Restored::default();
        let prefix = period_prefix(USER, month);
        for (k, _) in tree.scan_prefix(&prefix).flatten() {
            if let Some((_, tenant, user)) = split_key(&k)
                && let (Ok(t), Ok(u)) = (TenantId::parse(tenant), <[u8; 32]>::try_from(user))
            {
                state.tenant_users.push((t, UserKey(u)));
            }
        }
        let prefix = period_prefix(LICENCE_USER, month);
        for (k, _) in tree.scan_prefix(&prefix).flatten() {
            if let Some((_, licence, user)) = split_key(&k)
                && let Ok(u) = <[u8; 32]>::try_from(user)
            {
                state.licence_users.push((licence.to_owned(), UserKey(u)));
            }
        }
        let prefix = period_prefix(TOKENS, today);
        for (k, v) in tree.scan_prefix(&prefix).flatten() {
            if let Some((_, tenant, _)) = split_key(&k)
                && let Ok(t) = TenantId::parse(tenant)
            {
                state.tokens_today.push((t, as_u64(&v)));
            }
        }
        // The rate windows: allowed requests of the last minute, newest first.
        for (k, v) in db.iter().rev().take(RECENT_SCAN).flatten() {
            let Some(content) = <[u8; 8]>::try_from(k.as_ref())
                .ok()
                .and_then(|k| airgate_policy::audit::open(u64::from_be_bytes(k), &v).ok())
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            if content.time <= now.seconds() - 60 {
                break;
            }
            if let Event::Decision(d) = &content.event
                && d.decision == "allow"
                && let Some(t) = d.tenant.as_deref().and_then(|t| TenantId::parse(t).ok())
            {
                state.recent.push((t, content.time));
            }
        }
        let users = state.tenant_users.len() as u64;
        self.mem.restore(state, now);
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        let prefix = period_prefix(WARNED, month);
        for (k, _) in tree.scan_prefix(&prefix).flatten() {
            warned.insert(k.to_vec());
        }
        users
    }

    fn tree(&self) -> Result<sled::Tree, String> {
        let db = self.audit.reader().map_err(|e| e.to_string())?;
        db.open_tree(TREE).map_err(|e| e.to_string())
    }

    /// Folds the records made durable since the last catch-up.
    pub fn catch_up(&self) -> Result<CatchUp, String> {
        let _one = self.folding.lock().unwrap_or_else(PoisonError::into_inner);
        let db = self.audit.reader().map_err(|e| e.to_string())?;
        let tree = db.open_tree(TREE).map_err(|e| e.to_string())?;
        catch_up(&db, &tree, self.audit.state().records)
    }

    /// Recomputes the tree from the first record the log keeps and says
    /// what differed. The live counters are compared, not replaced: they
    /// hold reservations the log does not have yet.
    pub fn rebuild(&self, now: UnixTime) -> Result<Value, String> {
        let _one = self.folding.lock().unwrap_or_else(PoisonError::into_inner);
        let db = self.audit.reader().map_err(|e| e.to_string())?;
        let tree = db.open_tree(TREE).map_err(|e| e.to_string())?;
        let through = self.audit.state().records;
        catch_up(&db, &tree, through)?;
        let Rebuilt {
            from_seq: first,
            done,
            differences,
        } = rebuild_tree(&db, &tree, through)?;
        // The live counters of this month against the rebuilt ones.
        let month = month_index(now.seconds());
        let mut live = Vec::new();
        for (tenant, n) in users_in(&tree, USER, month) {
            let held = TenantId::parse(&tenant).map_or(0, |t| self.mem.tenant_users(&t));
            if held != n {
                live.push(format!("{tenant}: live {held}, log {n}"));
            }
        }
        self.audit.record(Event::UsageRebuilt {
            from_seq: first,
            through_seq: done.next,
            differences: differences.clone(),
        });
        tracing::warn!(
            AIRGATE_EVENT = "usage_rebuilt",
            from_seq = first,
            through_seq = done.next,
            differences = differences.len(),
            "usage counters rebuilt from the audit log"
        );
        Ok(json!({
            "from_seq": first,
            "through_seq": done.next,
            "records": done.folded,
            "damaged": done.damaged,
            "differences": differences,
            "live_differences": live,
        }))
    }

    /// Counts of a month (the current one by default) against the bundle's limits.
    pub fn report(
        &self,
        month: Option<u32>,
        bundle: Option<&Bundle>,
        now: UnixTime,
    ) -> Result<Value, String> {
        let caught = self.catch_up()?;
        let tree = self.tree()?;
        let current = month_index(now.seconds());
        let month = month.unwrap_or(current);
        let users = users_in(&tree, USER, month);
        let licence_users = users_in(&tree, LICENCE_USER, month);
        let requests = per_day_in(&tree, REQUESTS, month);
        let denials = per_day_in(&tree, DENIALS, month);
        let tokens = per_day_in(&tree, TOKENS, month);
        let mut names: std::collections::BTreeSet<String> = users
            .keys()
            .chain(requests.keys())
            .chain(denials.keys())
            .cloned()
            .collect();
        if let Some(b) = bundle {
            names.extend(b.tenants.keys().map(|t| t.as_str().to_owned()));
        }
        let tenants: Vec<Value> = names
            .iter()
            .map(|name| {
                let tenant = bundle.and_then(|b| {
                    TenantId::parse(name).ok().and_then(|id| b.tenants.get(&id))
                });
                let id = TenantId::parse(name).ok();
                let live = (month == current).then(|| {
                    id.as_ref().map(|t| {
                        json!({
                            "users": self.mem.tenant_users(t),
                            "tokens_today": self.mem.tokens_today(t),
                            "requests_last_minute": self.mem.requests_last_minute(t),
                            "concurrent": self.mem.concurrent(t),
                        })
                    })
                });
                json!({
                    "tenant": name,
                    "users": users.get(name).copied().unwrap_or(0),
                    "requests": requests.get(name).copied().unwrap_or(0),
                    "denials": denials.get(name).copied().unwrap_or(0),
                    "tokens": tokens.get(name).copied().unwrap_or(0),
                    "user_cap": tenant.and_then(|t| t.user_cap.as_ref()).map(|c| json!({
                        "host_cap": c.host_cap(),
                        "max_users_per_month": c.max_users_per_month,
                        "scope": c.scope,
                        "host_share": c.host_share,
                        "over_cap": c.over_cap,
                    })),
                    "limits": tenant.map(|t| serde_json::to_value(&t.limits).unwrap_or(Value::Null)),
                    "live": live.flatten(),
                })
            })
            .collect();
        let mut licence_names: std::collections::BTreeSet<String> =
            licence_users.keys().cloned().collect();
        if let Some(b) = bundle {
            licence_names.extend(b.licences.keys().cloned());
        }
        let licences: Vec<Value> = licence_names
            .iter()
            .map(|l| {
                json!({
                    "licence": l,
                    "users": licence_users.get(l).copied().unwrap_or(0),
                    "threshold": bundle
                        .and_then(|b| b.licences.get(l))
                        .and_then(|l| l.monthly_active_user_threshold),
                })
            })
            .collect();
        let mut warnings = Vec::new();
        let prefix = period_prefix(WARNED, month);
        for (k, _) in tree.scan_prefix(&prefix).flatten() {
            let parts: Vec<&[u8]> = k[5..].splitn(3, |b| *b == 0).collect();
            if let [scope, id, p] = parts[..] {
                warnings.push(json!({
                    "scope": String::from_utf8_lossy(scope),
                    "id": String::from_utf8_lossy(id),
                    "fraction": f64::from(<[u8; 4]>::try_from(p).map_or(0, u32::from_be_bytes)) / 1000.0,
                }));
            }
        }
        Ok(json!({
            "month": month_name(month),
            "folded_through_seq": caught.next,
            "bundle_version": bundle.map(|b| b.version),
            "tenants": tenants,
            "licences": licences,
            "warnings": warnings,
        }))
    }

    /// After a new user was counted: warn at each configured fraction of a
    /// cap or threshold the count has reached, once per period.
    fn warn_if_reached(&self, ticket: &Ticket) {
        let r = &ticket.reservation;
        let month = month_index(ticket.at.seconds());
        if ticket.new_tenant_user
            && let Some(limit) = r.tenant_user_limit
        {
            let users = self.mem.tenant_users(&r.tenant);
            self.warn(month, "tenant", r.tenant.as_str(), users, limit);
        }
        for (licence, threshold) in &r.licence_user_thresholds {
            if ticket.new_licence_users.contains(licence) {
                let users = self.mem.licence_users(licence);
                self.warn(month, "licence", licence, users, *threshold);
            }
        }
    }

    fn warn(&self, month: u32, scope: &str, id: &str, users: u64, limit: u64) {
        for &fraction in &self.warn_at {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a fraction of a count, rounded up; counts stay below 2^53"
            )]
            let at = ((limit as f64 * fraction).ceil() as u64).max(1);
            if users < at {
                continue;
            }
            if !self
                .warned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(warned_key(month, scope, id, fraction))
            {
                continue;
            }
            let period = month_name(month);
            tracing::warn!(
                AIRGATE_EVENT = "usage_warning",
                scope,
                id,
                period = %period,
                users,
                limit,
                fraction,
                "{scope} {id}: {users} distinct users this month, {:.0}% of its limit of {limit}",
                fraction * 100.0
            );
            self.audit.record(Event::UsageWarning {
                scope: scope.to_owned(),
                id: id.to_owned(),
                period,
                users,
                limit,
                fraction,
            });
        }
    }

    /// Sets the instant views answer for (before `decide`).
    pub fn observe(&self, now: UnixTime) {
        self.mem.observe(now);
    }
}

/// Folds new records every second; prunes old periods hourly.
fn fold_loop(usage: &std::sync::Weak<Usage>, worker: &Worker) {
    let mut last_prune = std::time::Instant::now();
    loop {
        worker.idle();
        std::thread::sleep(Duration::from_secs(1));
        let Some(usage) = usage.upgrade() else {
            return;
        };
        worker.progress();
        if let Err(e) = usage.catch_up() {
            tracing::warn!(error = %e, "usage: cannot fold the audit log (retrying)");
        }
        if last_prune.elapsed() >= Duration::from_secs(3600) {
            last_prune = std::time::Instant::now();
            let now = crate::bundle::system_time_now();
            if let Err(e) = usage
                .tree()
                .and_then(|t| prune(&t, month_index(now), usage.retention_months).map(drop))
            {
                tracing::warn!(error = %e, "usage: cannot prune old periods");
            }
        }
    }
}

/// Removes per-period counts older than `keep` months before `current`.
fn prune(tree: &sled::Tree, current: u32, keep: u32) -> Result<u64, String> {
    let oldest = current.saturating_sub(keep.saturating_sub(1));
    let first_day = days_of(oldest).0;
    let mut batch = sled::Batch::default();
    let mut months = HashSet::new();
    for tag in [USER, LICENCE_USER, WARNED] {
        let (lo, hi) = (period_prefix(tag, 0), period_prefix(tag, oldest));
        for k in tree.range(lo..hi).keys().flatten() {
            if let Some((m, _, _)) = split_key(&k) {
                months.insert(m);
            }
            batch.remove(k);
        }
    }
    for tag in [TOKENS, REQUESTS, DENIALS] {
        let (lo, hi) = (period_prefix(tag, 0), period_prefix(tag, first_day));
        for k in tree.range(lo..hi).keys().flatten() {
            batch.remove(k);
        }
    }
    tree.apply_batch(batch).map_err(|e| e.to_string())?;
    Ok(months.len() as u64)
}

impl UsageView for Usage {
    fn requests_last_minute(&self, tenant: &TenantId) -> u32 {
        self.mem.requests_last_minute(tenant)
    }
    fn tokens_today(&self, tenant: &TenantId) -> u64 {
        self.mem.tokens_today(tenant)
    }
    fn concurrent(&self, tenant: &TenantId) -> u32 {
        self.mem.concurrent(tenant)
    }
    fn tenant_users(&self, tenant: &TenantId) -> u64 {
        self.mem.tenant_users(tenant)
    }
    fn tenant_user_seen(&self, tenant: &TenantId, user: &UserKey) -> bool {
        self.mem.tenant_user_seen(tenant, user)
    }
    fn licence_users(&self, licence: &str) -> u64 {
        self.mem.licence_users(licence)
    }
    fn licence_user_seen(&self, licence: &str, user: &UserKey) -> bool {
        self.mem.licence_user_seen(licence, user)
    }
}

impl Admission for Usage {
    fn reserve(&self, reservation: Reservation, now: UnixTime) -> Result<Ticket, Refusal> {
        let ticket = self.mem.reserve(reservation, now)?;
        if ticket.new_tenant_user || !ticket.new_licence_users.is_empty() {
            self.warn_if_reached(&ticket);
        }
        Ok(ticket)
    }
    fn retry_after(
        &self,
        tenant: &TenantId,
        reason: Reason,
        limits: &Limits,
        now: UnixTime,
    ) -> Option<u64> {
        self.mem.retry_after(tenant, reason, limits, now)
    }
    fn commit(&self, ticket: Ticket, tokens: u64) {
        self.mem.commit(ticket, tokens);
    }
    fn release(&self, ticket: Ticket) {
        self.mem.release(ticket);
    }
}

#[cfg(test)]
mod tests;
