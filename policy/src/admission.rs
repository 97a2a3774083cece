//! Admission: turning an allow into a reservation against live counters.
//!
//! `decide` reads a [`UsageView`] and says what must be reserved; between
//! that read and serving, other requests race for the same slots. The
//! [`Admission`] trait closes the race: `reserve` re-checks every limit of a
//! [`Reservation`] and takes the slots in one atomic step (losing the race is
//! a denial with the same reason code `decide` would have given), and the
//! [`Ticket`] it returns is later committed with the actual token count or
//! released if nothing was served.
//!
//! When a user counts as seen: at `reserve` (so two concurrent first
//! requests of the 50th and 51st user cannot both pass a cap of 50), undone
//! when the last of the user's requests in flight ends with nothing served
//! and none of theirs was served before: releasing one request of a user
//! whose other request is in flight, or was served, leaves them counted. A
//! refused request never counts.
//!
//! [`MemoryAdmission`] is the reference implementation: exact, in memory,
//! behind one mutex. The daemon's persistent store implements the same
//! trait with the same semantics.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::bundle::Limits;
use crate::decision::{Reason, Reservation, UsageView, UserKey};
use crate::identity::TenantId;
use crate::time::UnixTime;

/// A reservation that was taken: hand it back to `commit` or `release`.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket holds a concurrency slot until committed or released"]
pub struct Ticket {
    pub reservation: Reservation,
    /// When it was taken: the day its tokens count against, the month of its users.
    pub at: UnixTime,
    /// The user was new to the tenant this month (the new-user obligation
    /// and warnings).
    pub new_tenant_user: bool,
    /// Licences under which the user was new this month.
    pub new_licence_users: Vec<String>,
}

/// Why a reservation could not be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub rule: String,
    /// Seconds until a retry can succeed, for transient reasons.
    pub retry_after: Option<u64>,
}

/// The atomic step between `decide` and serving. See the module docs.
pub trait Admission: UsageView + Send + Sync {
    /// Takes the reservation, or says why not. A truncating reservation may
    /// be granted fewer tokens than asked: the ticket's reservation says how many.
    fn reserve(&self, reservation: Reservation, now: UnixTime) -> Result<Ticket, Refusal>;
    /// Seconds until a request refused by `decide` for a transient reason
    /// could pass, from the same windows `reserve` uses.
    fn retry_after(
        &self,
        tenant: &TenantId,
        reason: Reason,
        limits: &Limits,
        now: UnixTime,
    ) -> Option<u64>;
    /// The request was served: count `tokens` (prompt + generated) instead of the estimate.
    fn commit(&self, ticket: Ticket, tokens: u64);
    /// Nothing was served: give back everything the ticket took.
    fn release(&self, ticket: Ticket);
}

const MINUTE: i64 = 60;

/// Month index (UTC) of an instant: year * 12 + month.
fn month(t: UnixTime) -> i64 {
    let d = t.date();
    i64::from(d.year) * 12 + i64::from(d.month)
}

fn day(t: UnixTime) -> i64 {
    t.seconds().div_euclid(86_400)
}

/// Seconds until the next UTC midnight, when the daily budget starts again.
fn until_tomorrow(now: UnixTime) -> u64 {
    u64::try_from((day(now) + 1) * 86_400 - now.seconds()).unwrap_or(1)
}

/// Seconds until a sliding window holding `recent` (oldest first) admits
/// one more request under `rpm`.
fn until_window_frees(recent: &VecDeque<i64>, rpm: u32, now: UnixTime) -> u64 {
    // The request that must age out is the rpm-th most recent.
    let index = recent.len().saturating_sub(rpm.max(1) as usize);
    let start = recent.get(index).copied().unwrap_or(now.seconds());
    u64::try_from((start + MINUTE - now.seconds()).max(1)).unwrap_or(1)
}

/// Usage to start from, as the persistent store derived it from the audit
/// log: the current month's users, today's tokens, the last minute's requests.
#[derive(Debug, Default)]
pub struct Restored {
    pub tenant_users: Vec<(TenantId, UserKey)>,
    pub licence_users: Vec<(String, UserKey)>,
    pub tokens_today: Vec<(TenantId, u64)>,
    /// Start times (Unix seconds) of recently admitted requests.
    pub recent: Vec<(TenantId, i64)>,
}

/// One user's standing in a month's count: their requests in flight, and
/// whether one was served. They leave the count only when nothing of
/// theirs is in flight and nothing was served.
#[derive(Clone, Copy, Debug, Default)]
struct Standing {
    in_flight: u32,
    served: bool,
}

type Users = HashMap<UserKey, Standing>;

#[derive(Default)]
struct TenantCounters {
    /// Start times of the requests of the last minute (sliding window).
    recent: VecDeque<i64>,
    /// (day, tokens): the current day's tokens, estimates included.
    tokens: (i64, u64),
    concurrent: u32,
    /// (month, users).
    users: (i64, Users),
}

#[derive(Default)]
struct Counters {
    tenants: HashMap<TenantId, TenantCounters>,
    /// licence -> (month, users).
    licences: HashMap<String, (i64, Users)>,
    /// The clock as of the last reserve: views answer for "now".
    now: UnixTime,
}

impl Counters {
    fn tenant(&mut self, id: &TenantId) -> &mut TenantCounters {
        // Look up before inserting: the hot path must not allocate a key.
        if !self.tenants.contains_key(id) {
            self.tenants.insert(id.clone(), TenantCounters::default());
        }
        self.tenants
            .get_mut(id)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Drops what has fallen out of its window as of `now`.
    fn roll(&mut self, id: &TenantId, now: UnixTime) {
        let t = self.tenant(id);
        while t
            .recent
            .front()
            .is_some_and(|s| *s <= now.seconds() - MINUTE)
        {
            t.recent.pop_front();
        }
        if t.tokens.0 != day(now) {
            t.tokens = (day(now), 0);
        }
        if t.users.0 != month(now) {
            t.users = (month(now), Users::new());
        }
    }

    fn licence(&mut self, id: &str, now: UnixTime) -> &mut Users {
        if !self.licences.contains_key(id) {
            self.licences.insert(id.to_owned(), Default::default());
        }
        let entry = self
            .licences
            .get_mut(id)
            .unwrap_or_else(|| unreachable!("inserted above"));
        if entry.0 != month(now) {
            *entry = (month(now), Users::new());
        }
        &mut entry.1
    }

    /// A ticket's request ended: its user holds one request fewer in flight
    /// under the tenant and each licence it was counted under, and stays
    /// counted if it was served (now or before). A user with nothing in
    /// flight and nothing served gives the slot back.
    fn end_user(&mut self, ticket: &Ticket, served: bool) {
        let r = &ticket.reservation;
        let Some(user) = r.user else {
            return;
        };
        let period = month(ticket.at);
        let end = |users: &mut Users| {
            if let Some(s) = users.get_mut(&user) {
                s.in_flight = s.in_flight.saturating_sub(1);
                s.served |= served;
                if s.in_flight == 0 && !s.served {
                    users.remove(&user);
                }
            }
        };
        let t = self.tenant(&r.tenant);
        if t.users.0 == period {
            end(&mut t.users.1);
        }
        for (licence, _) in &r.licence_user_thresholds {
            if let Some((m, users)) = self.licences.get_mut(licence)
                && *m == period
            {
                end(users);
            }
        }
    }
}

/// Exact admission in memory: one mutex, so every reserve sees every other.
#[derive(Default)]
pub struct MemoryAdmission {
    inner: Mutex<Counters>,
}

impl MemoryAdmission {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces every counter with `state`, as of `now`. Nothing may be in flight.
    pub fn restore(&self, state: Restored, now: UnixTime) {
        let mut c = self.lock();
        *c = Counters::default();
        c.now = now;
        // Users from the log were served.
        let served = Standing {
            in_flight: 0,
            served: true,
        };
        for (tenant, user) in state.tenant_users {
            c.roll(&tenant, now);
            c.tenant(&tenant).users.1.insert(user, served);
        }
        for (licence, user) in state.licence_users {
            c.licence(&licence, now).insert(user, served);
        }
        for (tenant, tokens) in state.tokens_today {
            c.roll(&tenant, now);
            let t = c.tenant(&tenant);
            t.tokens.1 = t.tokens.1.saturating_add(tokens);
        }
        let mut recent = state.recent;
        recent.sort_by_key(|(_, at)| *at);
        for (tenant, at) in recent {
            c.roll(&tenant, now);
            if at > now.seconds() - MINUTE {
                c.tenant(&tenant).recent.push_back(at);
            }
        }
    }

    /// Sets the instant views answer for (the daemon calls this before `decide`).
    pub fn observe(&self, now: UnixTime) {
        let mut c = self.lock();
        if now > c.now {
            c.now = now;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A panic while holding the lock leaves counters that are still
        // consistent (every update is a single assignment), so keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Counters {
    /// Reads without rolling windows forward: views take `&self`.
    fn view(&self, id: &TenantId) -> Option<&TenantCounters> {
        self.tenants.get(id)
    }

    fn licence_view(&self, id: &str) -> Option<&Users> {
        self.licences
            .get(id)
            .filter(|(m, _)| *m == month(self.now))
            .map(|(_, users)| users)
    }
}

impl UsageView for MemoryAdmission {
    fn requests_last_minute(&self, tenant: &TenantId) -> u32 {
        let c = self.lock();
        let since = c.now.seconds() - MINUTE;
        c.view(tenant).map_or(0, |t| {
            let stale = t.recent.partition_point(|s| *s <= since);
            u32::try_from(t.recent.len() - stale).unwrap_or(u32::MAX)
        })
    }
    fn tokens_today(&self, tenant: &TenantId) -> u64 {
        let c = self.lock();
        c.view(tenant)
            .filter(|t| t.tokens.0 == day(c.now))
            .map_or(0, |t| t.tokens.1)
    }
    fn concurrent(&self, tenant: &TenantId) -> u32 {
        self.lock().view(tenant).map_or(0, |t| t.concurrent)
    }
    fn tenant_users(&self, tenant: &TenantId) -> u64 {
        let c = self.lock();
        c.view(tenant)
            .filter(|t| t.users.0 == month(c.now))
            .map_or(0, |t| t.users.1.len() as u64)
    }
    fn tenant_user_seen(&self, tenant: &TenantId, user: &UserKey) -> bool {
        let c = self.lock();
        c.view(tenant)
            .is_some_and(|t| t.users.0 == month(c.now) && t.users.1.contains_key(user))
    }
    fn licence_users(&self, licence: &str) -> u64 {
        self.lock()
            .licence_view(licence)
            .map_or(0, |u| u.len() as u64)
    }
    fn licence_user_seen(&self, licence: &str, user: &UserKey) -> bool {
        self.lock()
            .licence_view(licence)
            .is_some_and(|u| u.contains_key(user))
    }
}

impl Admission for MemoryAdmission {
    fn reserve(&self, mut r: Reservation, now: UnixTime) -> Result<Ticket, Refusal> {
        let mut c = self.lock();
        if now > c.now {
            c.now = now;
        }
        c.roll(&r.tenant, now);
        let refuse = |reason, rule: String, retry_after| {
            Err(Refusal {
                reason,
                rule,
                retry_after,
            })
        };
        {
            let t = c.tenant(&r.tenant);
            if let Some(rpm) = r.requests_per_minute
                && t.recent.len() >= rpm as usize
            {
                return refuse(
                    Reason::RateLimited,
                    format!("limits.requests_per_minute = {rpm}"),
                    Some(until_window_frees(&t.recent, rpm, now)),
                );
            }
            if let Some(budget) = r.tokens_per_day
                && t.tokens.1.saturating_add(r.tokens) > budget
            {
                let left = budget.saturating_sub(t.tokens.1);
                if r.truncate && left > r.prompt_tokens {
                    r.tokens = left;
                } else {
                    return refuse(
                        Reason::TokenBudgetExhausted,
                        format!("limits.tokens_per_day = {budget}"),
                        Some(until_tomorrow(now)),
                    );
                }
            }
            if let Some(max) = r.concurrent_requests
                && t.concurrent >= max
            {
                return refuse(
                    Reason::ConcurrencyLimit,
                    format!("limits.concurrent_requests = {max}"),
                    Some(1),
                );
            }
        }
        let mut new_tenant_user = false;
        let mut new_licence_users = Vec::new();
        if let Some(user) = r.user {
            let t = c.tenant(&r.tenant);
            if !t.users.1.contains_key(&user) {
                if let Some(cap) = r.tenant_user_cap
                    && t.users.1.len() as u64 >= cap
                {
                    return refuse(
                        Reason::TenantUserCap,
                        format!("user_cap.max_users_per_month = {cap}"),
                        None,
                    );
                }
                new_tenant_user = true;
            }
            for (licence, threshold) in &r.licence_user_thresholds {
                let users = c.licence(licence, now);
                if !users.contains_key(&user) {
                    if users.len() as u64 >= *threshold {
                        return refuse(
                            Reason::LicenceUserThreshold,
                            format!(
                                "licence {licence}: monthly_active_user_threshold = {threshold}"
                            ),
                            None,
                        );
                    }
                    new_licence_users.push(licence.clone());
                }
            }
            // Only now, with every check passed, take the user slots: one
            // more request of theirs in flight under each licence and the tenant.
            for (licence, _) in &r.licence_user_thresholds {
                c.licence(licence, now).entry(user).or_default().in_flight += 1;
            }
            c.tenant(&r.tenant)
                .users
                .1
                .entry(user)
                .or_default()
                .in_flight += 1;
        }
        let t = c.tenant(&r.tenant);
        t.recent.push_back(now.seconds());
        t.tokens.1 = t.tokens.1.saturating_add(r.tokens);
        t.concurrent += 1;
        Ok(Ticket {
            reservation: r,
            at: now,
            new_tenant_user,
            new_licence_users,
        })
    }

    fn retry_after(
        &self,
        tenant: &TenantId,
        reason: Reason,
        limits: &Limits,
        now: UnixTime,
    ) -> Option<u64> {
        match reason {
            Reason::RateLimited => {
                let mut c = self.lock();
                c.roll(tenant, now);
                let rpm = limits.requests_per_minute?;
                Some(until_window_frees(&c.tenant(tenant).recent, rpm, now))
            }
            Reason::TokenBudgetExhausted => Some(until_tomorrow(now)),
            // A slot frees when any running request ends: try again soon.
            Reason::ConcurrencyLimit => Some(1),
            _ => None,
        }
    }

    fn commit(&self, ticket: Ticket, tokens: u64) {
        let mut c = self.lock();
        let t = c.tenant(&ticket.reservation.tenant);
        t.concurrent = t.concurrent.saturating_sub(1);
        if t.tokens.0 == day(ticket.at) {
            t.tokens.1 = t
                .tokens
                .1
                .saturating_sub(ticket.reservation.tokens)
                .saturating_add(tokens);
        }
        c.end_user(&ticket, true);
    }

    fn release(&self, ticket: Ticket) {
        let mut c = self.lock();
        let r = &ticket.reservation;
        let t = c.tenant(&r.tenant);
        t.concurrent = t.concurrent.saturating_sub(1);
        if t.tokens.0 == day(ticket.at) {
            t.tokens.1 = t.tokens.1.saturating_sub(r.tokens);
        }
        if let Some(pos) = t.recent.iter().rposition(|s| *s == ticket.at.seconds()) {
            t.recent.remove(pos);
        }
        c.end_user(&ticket, false);
    }
}

#[cfg(test)]
mod tests;
