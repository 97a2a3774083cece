//! `airgate report`: the month a compliance officer asks about. Which models,
//! under which licences, served whom; distinct users against each licence's
//! threshold and each tenant's cap; what was refused and why; which bundles
//! were in force and when; and whether the audit log that says all this is
//! whole, verified record by record against the host's signed checkpoints.
//!
//! Everything is computed from stored audit records, byte for byte as the
//! daemon sealed them (a running daemon hands them over its admin socket;
//! a stopped store, a snapshot or an evidence pack is read directly), and
//! from the bundles archived by digest. Several hosts' logs (evidence packs
//! of a fleet sharing the user-hashing secret) fold into one report with
//! each user counted once.
//!
//! Counting follows the usage store: a request counts (and counts its user)
//! when it was allowed and either served or cut off before its completion
//! was recorded; an allowed request that served nothing counts as
//! `not_served`. Tokens are charged to the month of the request.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use airgate_policy::audit::{Content, Event, Joins};
use airgate_policy::bundle::Bundle;
use airgate_policy::bundle::verify::{TrustAnchors, decode_unverified, verify_signed};
use airgate_policy::time::Date;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::Value;

use crate::audit::SegmentCheck;
use crate::keys::hex;

pub mod render;

/// Format of the report's JSON document.
pub const FORMAT: u32 = 1;
/// Distinct model names kept apart in a report; denials naming more models
/// than this (a caller probing names) are counted under one row.
const MAX_MODEL_ROWS: usize = 1000;
const OTHER_MODELS: &str = "(models not in a manifest)";
const NO_TENANT: &str = "(no tenant)";

/// A calendar month (UTC): `[start, end)` in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Month {
    pub index: u32,
    pub start: i64,
    pub end: i64,
}

impl Month {
    /// `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Self, String> {
        crate::usage::parse_month(s).map(Self::of_index)
    }

    /// `YYYY-MM`, or `this` / `last` (the month, UTC, of `now` or the one
    /// before it): what a monthly timer asks for.
    pub fn resolve(s: &str, now: i64) -> Result<Self, String> {
        let current = crate::usage::month_index(now);
        match s {
            "this" => Ok(Self::of_index(current)),
            "last" => Ok(Self::of_index(current.saturating_sub(1))),
            _ => Self::parse(s).map_err(|e| format!("{e}, or \"this\" or \"last\"")),
        }
    }

    pub fn of_index(index: u32) -> Self {
        let start = |m: u32| {
            Date {
                year: i32::try_from(m / 12).unwrap_or(0),
                month: u8::try_from(m % 12 + 1).unwrap_or(1),
                day: 1,
            }
            .start()
            .seconds()
        };
        Self {
            index,
            start: start(index),
            end: start(index + 1),
        }
    }

    pub fn name(&self) -> String {
        crate::usage::month_name(self.index)
    }

    pub fn days(&self) -> usize {
        usize::try_from((self.end - self.start) / 86_400).unwrap_or(31)
    }

    fn day(&self, time: i64) -> usize {
        usize::try_from((time - self.start).div_euclid(86_400))
            .unwrap_or(0)
            .min(self.days().saturating_sub(1))
    }

    pub fn contains(&self, time: i64) -> bool {
        (self.start..self.end).contains(&time)
    }
}

/// RFC 3339, UTC, seconds.
pub fn rfc3339(time: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(time)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| time.to_string())
}

/// One stored record as a line: `{"seq": N, "record": BASE64}`, the bytes
/// exactly as sealed, so whoever reads it can verify the chain.
pub fn raw_line(seq: u64, stored: &[u8]) -> String {
    serde_json::json!({"seq": seq, "record": STANDARD.encode(stored)}).to_string()
}

pub fn parse_raw_line(line: &str) -> Result<(u64, Vec<u8>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v["seq"].as_u64().ok_or("no \"seq\"")?;
    let record = v["record"]
        .as_str()
        .and_then(|r| STANDARD.decode(r).ok())
        .ok_or("no base64 \"record\"")?;
    Ok((seq, record))
}

/// Called with each stored record (sequence, bytes).
pub type EachRecord<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;

/// Called by [`Tally::scan`] with each record: the tally so far, the host's
/// index, the sequence, the stored bytes, the content (when the record's
/// own checks pass) and whether it is a checkpoint signed by the host key.
pub type Visit<'a> =
    dyn FnMut(&Tally, usize, u64, &[u8], Option<&Content>, bool) -> Result<(), String> + 'a;

/// Where one host's records come from.
#[derive(Clone, Debug)]
pub enum Records {
    /// The running daemon, through its admin socket (operators only).
    Live(PathBuf),
    /// A stopped daemon's audit store (`STATE/audit`), or a snapshot's.
    Store(PathBuf),
    /// A file of [`raw_line`]s (an evidence pack's `audit/records.jsonl`).
    Lines(PathBuf),
}

impl Records {
    /// Calls `f` with every stored record from `from` on, in order.
    pub fn each(&self, from: u64, f: &mut EachRecord<'_>) -> Result<(), String> {
        match self {
            Self::Live(socket) => {
                let mut next = from;
                loop {
                    let (lines, after) = crate::remote_page(socket, next, true)?;
                    if lines.is_empty() || after <= next {
                        return Ok(());
                    }
                    for line in lines {
                        let (seq, stored) = parse_raw_line(&line)
                            .map_err(|e| format!("the daemon sent a bad record line: {e}"))?;
                        f(seq, &stored)?;
                    }
                    next = after;
                }
            }
            Self::Store(dir) => {
                let db = crate::audit::open_db(dir, 64 << 20).map_err(|e| e.to_string())?;
                for item in db.range(airgate_policy::audit::key(from)..) {
                    let (k, v) = item.map_err(|e| format!("{}: {e}", dir.display()))?;
                    let seq = <[u8; 8]>::try_from(k.as_ref())
                        .map(u64::from_be_bytes)
                        .map_err(|_| {
                            format!("{}: a key that is not a sequence number", dir.display())
                        })?;
                    f(seq, &v)?;
                }
                Ok(())
            }
            Self::Lines(path) => {
                use std::io::BufRead as _;
                let file =
                    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                    let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
                    if line.is_empty() {
                        continue;
                    }
                    let (seq, stored) = parse_raw_line(&line)
                        .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
                    if seq >= from {
                        f(seq, &stored)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// One host's input to a report.
pub struct Host {
    /// Where the records come from, in words.
    pub label: String,
    pub records: Records,
    /// The host's raw Ed25519 public key: checkpoints must verify under it.
    pub host_key: Vec<u8>,
    /// The bundle in force when the month began (version, digest, accepted
    /// at), where the records read may not say (an evidence pack's run
    /// starts at a checkpoint); a bundle accepted in the records wins.
    pub bundle_at_start: Option<(u64, String, i64)>,
}

/// The bundles a report may need, by digest: archived tokens, verified
/// against trust anchors when there are any.
#[derive(Default)]
pub struct Bundles {
    dirs: Vec<PathBuf>,
    anchors: Option<TrustAnchors>,
    loaded: BTreeMap<String, Option<LoadedBundle>>,
}

#[derive(Clone)]
pub struct LoadedBundle {
    pub bundle: Bundle,
    pub token: String,
    /// How its signature was checked, in words.
    pub signature: String,
}

impl Bundles {
    /// Archives (directories of `DIGEST.jwt`) searched in order.
    pub fn new(dirs: Vec<PathBuf>, anchors: Option<TrustAnchors>) -> Self {
        Self {
            dirs,
            anchors,
            loaded: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, digest: &str) -> Option<&LoadedBundle> {
        if !self.loaded.contains_key(digest) {
            let found = self.load(digest);
            self.loaded.insert(digest.to_owned(), found);
        }
        self.loaded.get(digest).and_then(Option::as_ref)
    }

    fn load(&self, digest: &str) -> Option<LoadedBundle> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        for dir in &self.dirs {
            let Ok(token) = std::fs::read(dir.join(format!("{digest}.jwt"))) else {
                continue;
            };
            use sha2::Digest as _;
            if hex(&sha2::Sha256::digest(token.trim_ascii())) != digest {
                continue; // damaged copy: try the next archive
            }
            let token_text = String::from_utf8_lossy(token.trim_ascii()).into_owned();
            let Ok((kid, wire)) = decode_unverified(&token) else {
                continue;
            };
            let audience = wire.aud.clone();
            let (bundle, signature) = match &self.anchors {
                Some(anchors) => match verify_signed(&token, anchors, &audience) {
                    Ok(v) => (v.bundle, format!("verified (key {kid})")),
                    Err(e) => match wire.validate() {
                        Ok(b) => (b, format!("DOES NOT VERIFY: {e}")),
                        Err(_) => continue,
                    },
                },
                None => match wire.validate() {
                    Ok(b) => (b, "not checked (no trust anchors)".to_owned()),
                    Err(_) => continue,
                },
            };
            return Some(LoadedBundle {
                bundle,
                token: token_text,
                signature,
            });
        }
        None
    }

    /// Every digest looked up so far that was found.
    pub fn found(&self) -> impl Iterator<Item = (&String, &LoadedBundle)> {
        self.loaded
            .iter()
            .filter_map(|(d, b)| b.as_ref().map(|b| (d, b)))
    }
}

/// A signed checkpoint record, as the report cites it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CheckpointRef {
    /// The checkpoint record's own sequence number.
    pub seq: u64,
    /// It vouches for every record up to this one.
    pub vouches_through: u64,
    pub time: String,
}

/// What verifying one host's records found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostChain {
    pub source: String,
    pub host_key_sha256: String,
    pub verified: bool,
    pub error: Option<String>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// `genesis`, `signed checkpoint` or `unanchored` (a run that starts
    /// elsewhere: its first link is taken as given).
    pub starts_at: String,
    pub signed_checkpoints: u64,
    pub month_records: u64,
    pub month_first_seq: Option<u64>,
    pub month_last_seq: Option<u64>,
    /// The last signed checkpoint at or before the month's start.
    pub checkpoint_before: Option<CheckpointRef>,
    /// The first signed checkpoint after the last record dated before the
    /// month's end: it vouches for every record of the month (a clean stop
    /// seals one, so it may be dated inside the month).
    pub checkpoint_after: Option<CheckpointRef>,
    pub last_checkpoint: Option<CheckpointRef>,
    /// The month lies between two signed points (genesis or a checkpoint
    /// at or before its start, and `checkpoint_after`) with every record
    /// between them verified.
    pub month_covered: bool,
    /// Records after the last checkpoint (not yet vouched for by one).
    pub unvouched_records: u64,
}

/// An allowed request waiting for its completion.
struct Pending {
    host: usize,
    model: String,
    tenant: String,
    user: Option<String>,
    licences: Vec<String>,
    day: usize,
}

#[derive(Default)]
struct ModelTally {
    requests: u64,
    not_served: u64,
    denied: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    users: BTreeSet<(String, String)>,
    tenants: BTreeMap<String, ModelTenantTally>,
    denials: BTreeMap<String, u64>,
    files: Vec<String>,
    licences: Vec<String>,
}

#[derive(Default)]
struct ModelTenantTally {
    requests: u64,
    users: BTreeSet<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Default)]
struct TenantTally {
    requests: u64,
    not_served: u64,
    denied: u64,
    users: BTreeSet<String>,
    /// Distinct users on each host (a host-scoped cap binds per host).
    host_users: BTreeMap<usize, BTreeSet<String>>,
    daily: Vec<u64>,
    denials: BTreeMap<String, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Default)]
struct HostState {
    pending: usize,
    /// The bundle accepted last before the month (version, digest, time).
    at_start: Option<(u64, String, i64)>,
    /// The bundle the last decision before the month was made under: where
    /// retention removed the acceptance, it still says what was in force.
    seen_before: Option<(u64, String)>,
    accepted: Vec<(i64, u64, String)>,
}

/// Counts records of one month, across hosts.
pub struct Tally {
    month: Month,
    /// Allowed requests waiting for their completion, by (host, decision seq).
    pending: HashMap<(usize, u64), Pending>,
    /// For completions from before they named their decision's sequence:
    /// (host, request id) -> decision seq.
    pending_by_id: HashMap<(usize, String), u64>,
    models: BTreeMap<String, ModelTally>,
    tenants: BTreeMap<String, TenantTally>,
    licence_users: BTreeMap<String, BTreeMap<(String, String), usize>>,
    denials: BTreeMap<String, u64>,
    decisions: u64,
    allowed: u64,
    cut_off: u64,
    bundle_decisions: BTreeMap<String, (u64, u64)>,
    warnings: Vec<Value>,
    hosts: Vec<HostState>,
    chains: Vec<HostChain>,
}

impl Tally {
    pub fn new(month: Month) -> Self {
        Self {
            month,
            pending: HashMap::new(),
            pending_by_id: HashMap::new(),
            models: BTreeMap::new(),
            tenants: BTreeMap::new(),
            licence_users: BTreeMap::new(),
            denials: BTreeMap::new(),
            decisions: 0,
            allowed: 0,
            cut_off: 0,
            bundle_decisions: BTreeMap::new(),
            warnings: Vec::new(),
            hosts: Vec::new(),
            chains: Vec::new(),
        }
    }

    pub fn month(&self) -> Month {
        self.month
    }

    /// Reads and verifies one host's records, counting the month's. `each`
    /// also sees every record (with its parsed content and whether it is
    /// a signed checkpoint), e.g. to write an evidence pack.
    pub fn scan(&mut self, host: &Host, each: &mut Visit<'_>) -> Result<&HostChain, String> {
        use sha2::Digest as _;
        let index = self.hosts.len();
        self.hosts.push(HostState {
            at_start: host.bundle_at_start.clone(),
            ..HostState::default()
        });
        let mut check = SegmentCheck::new(&host.host_key);
        let mut chain = HostChain {
            source: host.label.clone(),
            host_key_sha256: hex(&sha2::Sha256::digest(&host.host_key)),
            verified: false,
            error: None,
            records: 0,
            first_seq: None,
            last_seq: None,
            starts_at: String::new(),
            signed_checkpoints: 0,
            month_records: 0,
            month_first_seq: None,
            month_last_seq: None,
            checkpoint_before: None,
            checkpoint_after: None,
            last_checkpoint: None,
            month_covered: false,
            unvouched_records: 0,
        };
        let result = host.records.each(0, &mut |seq, stored| {
            chain.records += 1;
            chain.first_seq.get_or_insert(seq);
            chain.last_seq = Some(seq);
            let (content, signed) = match check.push(seq, stored) {
                Ok((sealed, signed)) => (sealed.parse().ok(), signed),
                Err(_) => (None, false),
            };
            chain.unvouched_records += 1;
            if let Some(c) = &content {
                if signed {
                    let at = CheckpointRef {
                        seq,
                        vouches_through: seq.saturating_sub(1),
                        time: rfc3339(c.time),
                    };
                    chain.unvouched_records = 0;
                    if c.time <= self.month.start {
                        chain.checkpoint_before = Some(at.clone());
                    }
                    if chain.checkpoint_after.is_none() {
                        chain.checkpoint_after = Some(at.clone());
                    }
                    chain.last_checkpoint = Some(at);
                } else if c.time < self.month.end {
                    // A record of the month (or before it) not yet vouched for.
                    chain.checkpoint_after = None;
                }
                if self.month.contains(c.time) {
                    chain.month_records += 1;
                    chain.month_first_seq.get_or_insert(seq);
                    chain.month_last_seq = Some(seq);
                }
                self.add(index, seq, c);
            }
            each(self, index, seq, stored, content.as_ref(), signed)
        });
        result?;
        chain.signed_checkpoints = check.checkpoints;
        chain.error = check.error.as_ref().map(ToString::to_string);
        chain.verified = chain.error.is_none() && chain.records > 0;
        chain.starts_at = match (check.first, check.anchored) {
            (Some(0), _) => "genesis",
            (Some(_), true) => "signed checkpoint",
            _ => "unanchored",
        }
        .to_owned();
        let anchored_start = chain.first_seq == Some(0) || chain.checkpoint_before.is_some();
        chain.month_covered =
            chain.verified && check.anchored && anchored_start && chain.checkpoint_after.is_some();
        if chain.records == 0 {
            chain.error = Some("no audit records".to_owned());
        }
        self.chains.push(chain);
        Ok(&self.chains[index])
    }

    /// The bundle in force at the month's start on `host`, as far as read.
    pub fn bundle_at_start(&self, host: usize) -> Option<(u64, String, i64)> {
        let h = self.hosts.get(host)?;
        h.at_start
            .clone()
            .or_else(|| h.seen_before.clone().map(|(v, d)| (v, d, self.month.start)))
    }

    /// Allowed requests of `host` whose completion has not been read yet.
    pub fn pending_of(&self, host: usize) -> usize {
        self.hosts.get(host).map_or(0, |h| h.pending)
    }

    fn add(&mut self, host: usize, seq: u64, content: &Content) {
        let month = self.month;
        let before = content.time < month.start;
        let within = month.contains(content.time);
        match &content.event {
            Event::Decision(d) if before => {
                if let (Some(v), Some(digest)) = (d.bundle_version, &d.bundle_digest) {
                    self.hosts[host].seen_before = Some((v, digest.clone()));
                }
            }
            Event::Decision(d) if within => {
                self.decisions += 1;
                if let Some(digest) = &d.bundle_digest {
                    let e = self
                        .bundle_decisions
                        .entry(digest.clone())
                        .or_insert((d.bundle_version.unwrap_or(0), 0));
                    e.1 += 1;
                }
                let tenant = d.tenant.clone().unwrap_or_else(|| NO_TENANT.to_owned());
                let model_key =
                    if self.models.contains_key(&d.model) || self.models.len() < MAX_MODEL_ROWS {
                        d.model.clone()
                    } else {
                        OTHER_MODELS.to_owned()
                    };
                let model = self.models.entry(model_key).or_default();
                if model.files.is_empty() && !d.model_files.is_empty() {
                    model.files.clone_from(&d.model_files);
                    model.licences.clone_from(&d.licences);
                }
                if d.decision != "allow" {
                    model.denied += 1;
                    *model.denials.entry(d.reason.clone()).or_default() += 1;
                    let t = self.tenants.entry(tenant).or_default();
                    t.denied += 1;
                    *t.denials.entry(d.reason.clone()).or_default() += 1;
                    *self.denials.entry(d.reason.clone()).or_default() += 1;
                    return;
                }
                self.allowed += 1;
                self.hosts[host].pending += 1;
                self.pending_by_id.insert((host, d.request_id.clone()), seq);
                self.pending.insert(
                    (host, seq),
                    Pending {
                        host,
                        model: d.model.clone(),
                        tenant,
                        user: d.end_user.clone(),
                        licences: d.licences.clone(),
                        day: month.day(content.time),
                    },
                );
            }
            Event::Completion {
                request_id,
                prompt_tokens,
                completion_tokens,
                served,
                ..
            } if !before => {
                // Joined by the decision's sequence, never by the caller's id
                // (which two requests may share); older records by their id.
                let decision = match content.event.joins() {
                    Some(Joins::Seq(s)) => Some(s),
                    Some(Joins::RequestId(id)) => {
                        self.pending_by_id.get(&(host, id.to_owned())).copied()
                    }
                    _ => None,
                };
                let Some(p) = decision.and_then(|s| self.pending.remove(&(host, s))) else {
                    return;
                };
                if let Some(s) = decision
                    && self.pending_by_id.get(&(host, request_id.clone())) == Some(&s)
                {
                    self.pending_by_id.remove(&(host, request_id.clone()));
                }
                self.hosts[host].pending -= 1;
                let used = prompt_tokens.saturating_add(*completion_tokens);
                if served.unwrap_or(used > 0) {
                    self.count(&p, *prompt_tokens, *completion_tokens);
                } else {
                    self.models.entry(p.model.clone()).or_default().not_served += 1;
                    self.tenants.entry(p.tenant).or_default().not_served += 1;
                }
            }
            Event::BundleAccepted {
                version, digest, ..
            } if before => {
                self.hosts[host].at_start = Some((*version, digest.clone(), content.time));
            }
            Event::BundleAccepted {
                version, digest, ..
            } if within => {
                self.hosts[host]
                    .accepted
                    .push((content.time, *version, digest.clone()));
            }
            Event::UsageWarning { period, .. } if *period == month.name() => {
                if let Ok(mut v) = serde_json::to_value(&content.event) {
                    v["time"] = Value::from(rfc3339(content.time));
                    v["host"] = Value::from(host);
                    self.warnings.push(v);
                }
            }
            _ => {}
        }
    }

    /// A request that counts: served, or cut off before its completion.
    fn count(&mut self, p: &Pending, prompt: u64, completion: u64) {
        let days = self.month.days();
        let model = self.models.entry(p.model.clone()).or_default();
        model.requests += 1;
        model.prompt_tokens += prompt;
        model.completion_tokens += completion;
        let mt = model.tenants.entry(p.tenant.clone()).or_default();
        mt.requests += 1;
        mt.prompt_tokens += prompt;
        mt.completion_tokens += completion;
        let t = self.tenants.entry(p.tenant.clone()).or_default();
        t.requests += 1;
        t.prompt_tokens += prompt;
        t.completion_tokens += completion;
        t.daily.resize(days, 0);
        t.daily[p.day.min(days - 1)] += 1;
        if let Some(user) = &p.user {
            model.users.insert((p.tenant.clone(), user.clone()));
            mt.users.insert(user.clone());
            t.users.insert(user.clone());
            t.host_users.entry(p.host).or_default().insert(user.clone());
            for l in &p.licences {
                let first = self
                    .licence_users
                    .entry(l.clone())
                    .or_default()
                    .entry((p.tenant.clone(), user.clone()))
                    .or_insert(p.day);
                *first = (*first).min(p.day);
            }
        }
    }

    /// Closes the scan: requests still without a completion count as cut
    /// off (their users count, no tokens), and the report is put together.
    pub fn finish(mut self, bundles: &mut Bundles, generated_at: i64) -> Report {
        let pending: Vec<Pending> = std::mem::take(&mut self.pending).into_values().collect();
        for p in &pending {
            self.cut_off += 1;
            self.count(p, 0, 0);
        }
        let month = self.month;
        let mut notes = Vec::new();
        if generated_at < month.end && generated_at > 0 {
            notes.push(format!(
                "the month is not over: these are its figures up to {}",
                rfc3339(generated_at)
            ));
        }

        // Bundles in force: per host, the one at the month's start, then each accepted in it.
        let mut in_force: BTreeMap<String, (u64, Vec<Interval>)> = BTreeMap::new();
        for (h, state) in self.hosts.iter().enumerate() {
            let host = self
                .chains
                .get(h)
                .map_or(String::new(), |c| c.source.clone());
            let mut changes: Vec<(i64, u64, String)> = Vec::new();
            match (&state.at_start, &state.seen_before) {
                (Some((v, d, _)), _) => changes.push((month.start, *v, d.clone())),
                (None, Some((v, d))) => changes.push((month.start, *v, d.clone())),
                (None, None) => {}
            }
            changes.extend(state.accepted.iter().cloned());
            for (i, (from, version, digest)) in changes.iter().enumerate() {
                let until = changes.get(i + 1).map_or(month.end, |c| c.0);
                in_force
                    .entry(digest.clone())
                    .or_insert((*version, Vec::new()))
                    .1
                    .push(Interval {
                        host: host.clone(),
                        from: rfc3339(*from),
                        until: rfc3339(until),
                    });
            }
        }
        for (digest, (version, _)) in &self.bundle_decisions {
            in_force
                .entry(digest.clone())
                .or_insert((*version, Vec::new()));
        }
        let mut bundle_rows = Vec::new();
        let mut latest: Option<(u64, Bundle)> = None;
        let mut all: Vec<Bundle> = Vec::new();
        for (digest, (version, intervals)) in &in_force {
            let decisions = self.bundle_decisions.get(digest).map_or(0, |d| d.1);
            match bundles.get(digest) {
                Some(b) => {
                    if latest.as_ref().is_none_or(|(v, _)| *v < b.bundle.version) {
                        latest = Some((b.bundle.version, b.bundle.clone()));
                    }
                    all.push(b.bundle.clone());
                    bundle_rows.push(BundleRow {
                        version: b.bundle.version,
                        digest: digest.clone(),
                        issuer: Some(b.bundle.issuer.clone()),
                        issued_at: Some(rfc3339(b.bundle.issued_at.seconds())),
                        expires: Some(rfc3339(b.bundle.expires.seconds())),
                        signature: b.signature.clone(),
                        in_force: intervals.clone(),
                        decisions,
                    });
                }
                None => {
                    notes.push(format!(
                        "bundle {version} ({digest}) is not in the archive: its licences and limits are not shown"
                    ));
                    bundle_rows.push(BundleRow {
                        version: *version,
                        digest: digest.clone(),
                        issuer: None,
                        issued_at: None,
                        expires: None,
                        signature: "not found in the archive".to_owned(),
                        in_force: intervals.clone(),
                        decisions,
                    });
                }
            }
        }
        bundle_rows.sort_by(|a, b| a.version.cmp(&b.version).then(a.digest.cmp(&b.digest)));
        // Later bundles describe a model or licence best; earlier ones fill gaps.
        all.sort_by_key(|b| std::cmp::Reverse(b.version));
        let latest = latest.map(|(_, b)| b);

        // Models: those that saw requests, and those of the manifests in force.
        let manifest_models: BTreeSet<String> =
            all.iter().flat_map(|b| b.models.keys().cloned()).collect();
        let mut other = ModelTally::default();
        let mut model_rows = Vec::new();
        let names: BTreeSet<String> = self
            .models
            .keys()
            .cloned()
            .chain(manifest_models.iter().cloned())
            .collect();
        for name in names {
            let tally = self.models.remove(&name).unwrap_or_default();
            let described = all.iter().find_map(|b| b.models.get(&name).map(|m| (b, m)));
            if described.is_none() && tally.requests == 0 && tally.not_served == 0 {
                // Only refused, and in no manifest: a name a caller asked for.
                other.denied += tally.denied;
                for (r, n) in tally.denials {
                    *other.denials.entry(r).or_default() += n;
                }
                continue;
            }
            model_rows.push(model_row(&name, tally, described));
        }
        if other.denied > 0 {
            model_rows.push(model_row(OTHER_MODELS, other, None));
        }

        // Licences: thresholds from the latest bundle that defines each.
        let mut licence_ids: BTreeSet<String> = all
            .iter()
            .flat_map(|b| b.licences.keys().cloned())
            .collect();
        licence_ids.extend(self.licence_users.keys().cloned());
        let days = month.days();
        let mut licence_rows = Vec::new();
        for id in licence_ids {
            let users = self.licence_users.get(&id);
            let mut daily = vec![0u64; days];
            for first in users.into_iter().flat_map(BTreeMap::values) {
                daily[(*first).min(days - 1)] += 1;
            }
            let mut running = 0;
            for d in &mut daily {
                running += *d;
                *d = running;
            }
            let distinct = users.map_or(0, |u| u.len() as u64);
            let licence = all.iter().find_map(|b| b.licences.get(&id));
            let threshold = licence.and_then(|l| l.monthly_active_user_threshold);
            let review = licence.map(|l| l.review_by);
            let review_passed = review.filter(|r| r.start().seconds() < month.end).map(|r| {
                if r.start().seconds() < month.start {
                    format!("passed before the month (review by {r})")
                } else {
                    format!("passed on {r}")
                }
            });
            let models: Vec<String> = model_rows
                .iter()
                .filter(|m| m.licences.contains(&id))
                .map(|m| m.id.clone())
                .collect();
            licence_rows.push(LicenceRow {
                name: licence.map_or_else(|| id.clone(), |l| l.name.clone()),
                id,
                threshold,
                distinct_users: distinct,
                fraction: threshold
                    .filter(|t| *t > 0)
                    .map(|t| distinct as f64 / t as f64),
                over_threshold: threshold.is_some_and(|t| distinct > t),
                commercial_use: licence.map(|l| l.commercial_use),
                review_by: review.map(|r| r.to_string()),
                review_passed,
                after_review: licence.map(|l| format!("{:?}", l.after_review).to_lowercase()),
                attribution: licence.and_then(|l| l.attribution.clone()),
                derivative_prefix: licence.and_then(|l| l.derivative_prefix.clone()),
                prohibited_uses: licence
                    .map(|l| l.prohibited_uses.iter().cloned().collect())
                    .unwrap_or_default(),
                models,
                daily_users: daily,
            });
        }

        // Tenants: caps from the latest bundle in force.
        let mut tenant_ids: BTreeSet<String> = self.tenants.keys().cloned().collect();
        if let Some(b) = &latest {
            tenant_ids.extend(b.tenants.keys().map(|t| t.as_str().to_owned()));
        }
        let mut tenant_rows = Vec::new();
        for id in tenant_ids {
            let t = self.tenants.remove(&id).unwrap_or_default();
            let cap = all.iter().find_map(|b| {
                b.tenants
                    .iter()
                    .find(|(tid, _)| tid.as_str() == id)
                    .and_then(|(_, t)| t.user_cap.as_ref())
            });
            let mut daily = t.daily;
            daily.resize(days, 0);
            let distinct = t.users.len() as u64;
            let most_on_a_host = t
                .host_users
                .values()
                .map(|u| u.len() as u64)
                .max()
                .unwrap_or(0);
            tenant_rows.push(TenantRow {
                id,
                requests: t.requests,
                not_served: t.not_served,
                denied: t.denied,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                distinct_users: distinct,
                cap: cap.map(|c| {
                    // A host-scoped cap (or a fleet share) binds each host:
                    // the host nearest its cap is what the fraction shows.
                    let (users, of) = match c.scope {
                        airgate_policy::bundle::CapScope::Host => {
                            (most_on_a_host, c.max_users_per_month)
                        }
                        _ if self.chains.len() > 1 => (distinct, c.max_users_per_month),
                        _ => (most_on_a_host, c.host_cap()),
                    };
                    CapRow {
                        max_users_per_month: c.max_users_per_month,
                        scope: format!("{:?}", c.scope).to_lowercase(),
                        host_cap: c.host_cap(),
                        most_users_on_a_host: most_on_a_host,
                        fraction: if of > 0 {
                            users as f64 / of as f64
                        } else {
                            0.0
                        },
                    }
                }),
                daily_requests: daily,
                denials: t.denials,
            });
        }

        let all_users: BTreeSet<&(String, String)> =
            model_rows.iter().flat_map(|m| m.users.iter()).collect();
        let totals = Totals {
            decisions: self.decisions,
            allowed: self.allowed,
            denied: self.decisions - self.allowed,
            requests: model_rows.iter().map(|m| m.requests).sum(),
            not_served: model_rows.iter().map(|m| m.not_served).sum(),
            cut_off: self.cut_off,
            prompt_tokens: model_rows.iter().map(|m| m.prompt_tokens).sum(),
            completion_tokens: model_rows.iter().map(|m| m.completion_tokens).sum(),
            distinct_users: all_users.len() as u64,
        };
        for c in &self.chains {
            if !c.verified {
                notes.push(format!(
                    "the audit chain of {} does NOT verify: {}",
                    c.source,
                    c.error.as_deref().unwrap_or("?")
                ));
            } else if !c.month_covered {
                notes.push(format!(
                    "{}: the month is not wholly between signed checkpoints ({} records after the last one)",
                    c.source, c.unvouched_records
                ));
            }
        }
        let chain_verified = !self.chains.is_empty() && self.chains.iter().all(|c| c.verified);
        Report {
            format: FORMAT,
            month: month.name(),
            period: Period {
                from: rfc3339(month.start),
                until: rfc3339(month.end),
            },
            generated_at: rfc3339(generated_at),
            generator: format!("airgate {}", env!("CARGO_PKG_VERSION")),
            chain_verified,
            hosts: self.chains,
            totals,
            denials: self.denials,
            bundles: bundle_rows,
            models: model_rows,
            licences: licence_rows,
            tenants: tenant_rows,
            warnings: self.warnings,
            notes,
        }
    }
}

fn model_row(
    name: &str,
    tally: ModelTally,
    described: Option<(&Bundle, &airgate_policy::bundle::Model)>,
) -> ModelRow {
    let (format, files, licence, derived_from, licences) = match described {
        Some((b, m)) => {
            let mut chain = Vec::new();
            let mut parent = m.derived_from.clone();
            while let Some(p) = parent {
                if chain.contains(&p) {
                    break;
                }
                parent = b.models.get(&p).and_then(|pm| pm.derived_from.clone());
                chain.push(p);
            }
            (
                Some(format!("{:?}", m.format).to_lowercase()),
                m.files
                    .iter()
                    .map(|f| FileRow {
                        role: f.role.clone(),
                        name: f.name.clone(),
                        sha256: hex(&f.sha256),
                    })
                    .collect(),
                Some(m.licence.clone()),
                chain,
                m.licence_chain.clone(),
            )
        }
        None => (
            None,
            tally
                .files
                .iter()
                .map(|d| FileRow {
                    role: String::new(),
                    name: String::new(),
                    sha256: d.clone(),
                })
                .collect(),
            tally.licences.first().cloned(),
            Vec::new(),
            tally.licences.clone(),
        ),
    };
    ModelRow {
        id: name.to_owned(),
        format,
        files,
        licence,
        derived_from,
        licences,
        requests: tally.requests,
        not_served: tally.not_served,
        denied: tally.denied,
        prompt_tokens: tally.prompt_tokens,
        completion_tokens: tally.completion_tokens,
        distinct_users: tally.users.len() as u64,
        tenants: tally
            .tenants
            .into_iter()
            .map(|(tenant, t)| ModelTenantRow {
                tenant,
                requests: t.requests,
                distinct_users: t.users.len() as u64,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
            })
            .collect(),
        denials: tally.denials,
        users: tally.users,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub format: u32,
    pub month: String,
    pub period: Period,
    pub generated_at: String,
    pub generator: String,
    /// Every host's chain verified.
    pub chain_verified: bool,
    pub hosts: Vec<HostChain>,
    pub totals: Totals,
    /// Refusals by reason code.
    pub denials: BTreeMap<String, u64>,
    pub bundles: Vec<BundleRow>,
    pub models: Vec<ModelRow>,
    pub licences: Vec<LicenceRow>,
    pub tenants: Vec<TenantRow>,
    /// `usage_warning` records of the month.
    pub warnings: Vec<Value>,
    /// What the reader must know: breaks, gaps, missing bundles.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Period {
    pub from: String,
    pub until: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// Decision records of the month.
    pub decisions: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Allowed requests that were served or cut off (they count).
    pub requests: u64,
    /// Allowed requests that served nothing (they do not count).
    pub not_served: u64,
    /// Allowed requests with no completion record (counted, no tokens).
    pub cut_off: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Distinct (tenant, end user) pairs across every model and host.
    pub distinct_users: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Interval {
    pub host: String,
    pub from: String,
    pub until: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BundleRow {
    pub version: u64,
    pub digest: String,
    pub issuer: Option<String>,
    pub issued_at: Option<String>,
    pub expires: Option<String>,
    pub signature: String,
    pub in_force: Vec<Interval>,
    /// Decisions of the month made under it.
    pub decisions: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileRow {
    pub role: String,
    pub name: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    pub id: String,
    pub format: Option<String>,
    pub files: Vec<FileRow>,
    pub licence: Option<String>,
    /// The models it derives from, nearest first.
    pub derived_from: Vec<String>,
    /// Every licence it is used under (its own and its ancestors').
    pub licences: Vec<String>,
    pub requests: u64,
    pub not_served: u64,
    pub denied: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub distinct_users: u64,
    pub tenants: Vec<ModelTenantRow>,
    pub denials: BTreeMap<String, u64>,
    #[serde(skip)]
    users: BTreeSet<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelTenantRow {
    pub tenant: String,
    pub requests: u64,
    pub distinct_users: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LicenceRow {
    pub id: String,
    pub name: String,
    pub threshold: Option<u64>,
    pub distinct_users: u64,
    pub fraction: Option<f64>,
    pub over_threshold: bool,
    pub commercial_use: Option<bool>,
    pub review_by: Option<String>,
    pub review_passed: Option<String>,
    pub after_review: Option<String>,
    pub attribution: Option<String>,
    pub derivative_prefix: Option<String>,
    pub prohibited_uses: Vec<String>,
    pub models: Vec<String>,
    /// Distinct users so far, at the end of each day of the month.
    pub daily_users: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CapRow {
    pub max_users_per_month: u64,
    pub scope: String,
    /// The cap each host enforces (a fleet share of the whole).
    pub host_cap: u64,
    /// Distinct users of the tenant on the host that had the most.
    pub most_users_on_a_host: u64,
    /// How near the cap binds: for a host-scoped cap (or a one-host
    /// report) the busiest host's users over what it may admit; across
    /// the hosts of a fleet-scoped cap, all users over the fleet's cap.
    pub fraction: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TenantRow {
    pub id: String,
    pub requests: u64,
    pub not_served: u64,
    pub denied: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub distinct_users: u64,
    pub cap: Option<CapRow>,
    /// Requests (counted) on each day of the month.
    pub daily_requests: Vec<u64>,
    pub denials: BTreeMap<String, u64>,
}

/// The output format of `airgate report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Html,
    Json,
    Md,
}

impl Report {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => {
                let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
                s.push('\n');
                s
            }
            Format::Md => render::markdown(self),
            Format::Html => render::html(self),
        }
    }
}

/// What `airgate report` reads.
pub struct Inputs {
    pub hosts: Vec<Host>,
    pub bundles: Bundles,
    /// The state directory read (host key, user secret), for a local host.
    pub state: Option<PathBuf>,
    /// Its configuration, when it could be read (trust anchors, user secret).
    pub config: Option<crate::config::Config>,
}

/// The inputs for one host: the running daemon when its socket answers
/// (and `state` is not given), else the state directory (a stopped
/// daemon's or a snapshot). Bundles come from the state's archive and the
/// configuration's; trust anchors from the configuration.
pub fn local_inputs(config: &Path, state: Option<&Path>) -> Result<Inputs, String> {
    let loaded = crate::config::Config::load(config);
    let anchors = loaded.as_ref().ok().map(|c| c.trust.anchors());
    let configured_state = loaded.as_ref().ok().map(|c| c.state_dir.clone());
    let live = match (&state, &loaded) {
        (None, Ok(c)) if std::os::unix::net::UnixStream::connect(&c.unix.path).is_ok() => {
            Some(c.unix.path.clone())
        }
        _ => None,
    };
    let dir = match (state, configured_state.as_ref()) {
        (Some(s), _) => s.to_owned(),
        (None, Some(s)) => s.clone(),
        (None, None) => {
            return Err(format!(
                "{}\n(or pass --state DIR)",
                loaded.err().map(|e| e.to_string()).unwrap_or_default()
            ));
        }
    };
    let host_pub = dir.join("host.pub");
    let key = crate::keys::read_public_key(&host_pub).map_err(|e| {
        format!("{e}: the host key is needed to verify the audit chain's checkpoints")
    })?;
    let (records, label) = match live {
        Some(socket) => (
            Records::Live(socket.clone()),
            format!("running daemon ({})", socket.display()),
        ),
        None => (
            Records::Store(dir.join("audit")),
            format!("audit store {}", dir.join("audit").display()),
        ),
    };
    let mut archives = vec![dir.join("policy").join("archive")];
    if let Some(s) = configured_state
        && s != dir
    {
        archives.push(s.join("policy").join("archive"));
    }
    Ok(Inputs {
        hosts: vec![Host {
            label,
            records,
            host_key: key.raw,
            bundle_at_start: None,
        }],
        bundles: Bundles::new(archives, anchors),
        state: Some(dir),
        config: loaded.ok(),
    })
}

/// Builds the report of `month` from `inputs`.
pub fn build(month: Month, inputs: &mut Inputs, now: i64) -> Result<Report, String> {
    let mut tally = Tally::new(month);
    for host in &inputs.hosts {
        tally.scan(host, &mut |_, _, _, _, _, _| Ok(()))?;
    }
    Ok(tally.finish(&mut inputs.bundles, now))
}

/// Writes `text` to `out` (atomically), or standard output for `-`.
pub fn write_out(out: &Path, text: &str) -> Result<(), String> {
    if out == Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    crate::bundle::write_atomic(out, text.as_bytes()).map_err(|e| format!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_have_their_days_and_bounds() {
        let m = Month::parse("2024-02").expect("month");
        assert_eq!(m.days(), 29);
        assert_eq!(rfc3339(m.start), "2024-02-01T00:00:00Z");
        assert_eq!(rfc3339(m.end), "2024-03-01T00:00:00Z");
        let dec = Month::parse("2026-12").expect("month");
        assert_eq!(rfc3339(dec.end), "2027-01-01T00:00:00Z");
        assert_eq!(dec.day(dec.end - 1), 30);
        assert!(Month::parse("2026-13").is_err());
        assert!(Month::parse("26-01").is_err());
        // The first second of a month: "last" is the one that just ended.
        let jan = Month::parse("2027-01").expect("month").start;
        assert_eq!(Month::resolve("last", jan), Ok(dec));
        assert_eq!(Month::resolve("this", jan - 1), Ok(dec));
        assert_eq!(Month::resolve("2024-02", jan), Ok(m));
        assert!(Month::resolve("previous", jan).is_err());
    }

    #[test]
    fn raw_lines_round_trip_and_bad_ones_say_why() {
        let line = raw_line(7, b"\x00\x01bytes");
        assert_eq!(parse_raw_line(&line), Ok((7, b"\x00\x01bytes".to_vec())));
        assert!(
            parse_raw_line("{\"seq\":1}")
                .expect_err("no record")
                .contains("record")
        );
        assert!(
            parse_raw_line("nope")
                .expect_err("not JSON")
                .contains("JSON")
        );
    }
}
