//! Exactness under concurrency, and what commit and release give back:
//! table cases, random interleavings checked against a model after every
//! step, and threads racing behind a barrier.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

const NOW: UnixTime = UnixTime(1_795_000_000);

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("tenant id")
}

fn user(n: u32) -> UserKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    UserKey(k)
}

fn reservation(t: &str, u: Option<u32>) -> Reservation {
    Reservation {
        tenant: tenant(t),
        user: u.map(user),
        tokens: 100,
        prompt_tokens: 20,
        truncate: false,
        requests_per_minute: None,
        tokens_per_day: None,
        concurrent_requests: None,
        tenant_user_cap: None,
        tenant_user_limit: None,
        licence_user_thresholds: Vec::new(),
    }
}

#[test]
fn a_cap_of_50_admits_exactly_50_users_under_contention() {
    let admission = Arc::new(MemoryAdmission::new());
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let admission = Arc::clone(&admission);
            std::thread::spawn(move || {
                let mut admitted = Vec::new();
                for i in 0..50u32 {
                    let mut r = reservation("claims", Some(t * 1000 + i));
                    r.tenant_user_cap = Some(50);
                    r.licence_user_thresholds = vec![("LicenseRef-Gemma".to_owned(), 1000)];
                    match admission.reserve(r, NOW) {
                        Ok(ticket) => admitted.push(ticket),
                        Err(refusal) => assert_eq!(refusal.reason, Reason::TenantUserCap),
                    }
                }
                admitted.len()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(admitted, 50);
    assert_eq!(admission.tenant_users(&tenant("claims")), 50);
    assert_eq!(admission.licence_users("LicenseRef-Gemma"), 50);
    assert_eq!(admission.concurrent(&tenant("claims")), 50);
}

#[test]
fn concurrency_slots_are_exact_and_come_back() {
    let admission = Arc::new(MemoryAdmission::new());
    let mut r = reservation("claims", None);
    r.concurrent_requests = Some(4);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let admission = Arc::clone(&admission);
            let r = r.clone();
            std::thread::spawn(move || admission.reserve(r, NOW))
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 4);
    for refusal in refused {
        let refusal = refusal.expect_err("refused");
        assert_eq!(refusal.reason, Reason::ConcurrencyLimit);
        assert_eq!(refusal.retry_after, Some(1));
    }
    for ticket in ok {
        admission.commit(ticket.expect("ticket"), 10);
    }
    assert_eq!(admission.concurrent(&tenant("claims")), 0);
    assert!(admission.reserve(r, NOW).is_ok());
}

#[test]
fn the_licence_threshold_counts_across_tenants() {
    let admission = MemoryAdmission::new();
    let gemma = |t: &str, u: u32| {
        let mut r = reservation(t, Some(u));
        r.licence_user_thresholds = vec![("LicenseRef-Gemma".to_owned(), 2)];
        r
    };
    let a = admission.reserve(gemma("claims", 1), NOW).expect("first");
    let b = admission.reserve(gemma("search", 2), NOW).expect("second");
    let refused = admission
        .reserve(gemma("search", 3), NOW)
        .expect_err("third user under the licence");
    assert_eq!(refused.reason, Reason::LicenceUserThreshold);
    // A user already counted under the licence keeps working from another tenant.
    let c = admission
        .reserve(gemma("search", 1), NOW)
        .expect("known user");
    assert!(c.new_tenant_user);
    assert!(c.new_licence_users.is_empty());
    for t in [a, b, c] {
        admission.commit(t, 1);
    }
}

#[test]
fn release_forgets_a_user_who_was_never_served() {
    let admission = MemoryAdmission::new();
    let mut r = reservation("claims", Some(1));
    r.tenant_user_cap = Some(1);
    r.licence_user_thresholds = vec![("L".to_owned(), 1)];
    let ticket = admission.reserve(r.clone(), NOW).expect("reserve");
    assert_eq!(admission.tenant_users(&tenant("claims")), 1);
    admission.release(ticket);
    assert_eq!(admission.tenant_users(&tenant("claims")), 0);
    assert_eq!(admission.licence_users("L"), 0);
    assert_eq!(admission.requests_last_minute(&tenant("claims")), 0);
    assert_eq!(admission.tokens_today(&tenant("claims")), 0);
    // The slot is free for someone else.
    let mut other = r;
    other.user = Some(user(2));
    assert!(admission.reserve(other, NOW).is_ok());
}

#[test]
fn rates_and_budgets_refuse_with_retry_after_from_the_window() {
    let admission = MemoryAdmission::new();
    let mut r = reservation("claims", None);
    r.requests_per_minute = Some(2);
    let t1 = admission.reserve(r.clone(), NOW).expect("1");
    let t2 = admission.reserve(r.clone(), NOW.plus(20)).expect("2");
    let refused = admission.reserve(r.clone(), NOW.plus(30)).expect_err("3");
    assert_eq!(refused.reason, Reason::RateLimited);
    assert_eq!(refused.retry_after, Some(30));
    admission.commit(t1, 1);
    admission.commit(t2, 1);
    let t3 = admission.reserve(r, NOW.plus(60)).expect("window slid");
    admission.commit(t3, 1);

    let mut r = reservation("search", None);
    r.tokens_per_day = Some(250);
    let t = admission.reserve(r.clone(), NOW).expect("100 of 250");
    admission.commit(t, 40); // estimate 100, actual 40
    assert_eq!(admission.tokens_today(&tenant("search")), 40);
    let t = admission.reserve(r.clone(), NOW).expect("140");
    let u = admission.reserve(r.clone(), NOW).expect("240");
    let refused = admission.reserve(r, NOW).expect_err("340 > 250");
    assert_eq!(refused.reason, Reason::TokenBudgetExhausted);
    let midnight = (NOW.seconds().div_euclid(86_400) + 1) * 86_400;
    assert_eq!(
        refused.retry_after,
        u64::try_from(midnight - NOW.seconds()).ok()
    );
    admission.release(t);
    admission.release(u);
}

#[test]
fn users_are_counted_per_calendar_month() {
    let admission = MemoryAdmission::new();
    let mut r = reservation("claims", Some(1));
    r.tenant_user_cap = Some(1);
    // 2026-11-30T23:59:00Z, then a minute later it is December.
    let nov = UnixTime(1_796_083_140);
    assert_eq!(nov.date().month, 11);
    let t = admission.reserve(r.clone(), nov).expect("november");
    admission.commit(t, 1);
    let mut other = r;
    other.user = Some(user(2));
    assert_eq!(
        admission
            .reserve(other.clone(), nov)
            .expect_err("cap of 1")
            .reason,
        Reason::TenantUserCap
    );
    let dec = nov.plus(60);
    assert_eq!(dec.date().month, 12);
    admission.observe(dec);
    assert_eq!(admission.tenant_users(&tenant("claims")), 0);
    assert!(admission.reserve(other, dec).is_ok());
}

#[test]
fn a_truncating_budget_grants_what_is_left_and_refuses_when_the_prompt_does_not_fit() {
    let admission = MemoryAdmission::new();
    let mut r = reservation("claims", None);
    r.tokens_per_day = Some(250);
    r.truncate = true;
    let first = admission.reserve(r.clone(), NOW).expect("100 of 250");
    let second = admission.reserve(r.clone(), NOW).expect("200 of 250");
    // 50 are left: the prompt (20) fits, so 50 are granted instead of 100.
    let third = admission.reserve(r.clone(), NOW).expect("truncated");
    assert_eq!(third.reservation.tokens, 50);
    assert_eq!(admission.tokens_today(&tenant("claims")), 250);
    let refused = admission.reserve(r.clone(), NOW).expect_err("nothing left");
    assert_eq!(refused.reason, Reason::TokenBudgetExhausted);
    // The actual counts replace the grants.
    for t in [first, second, third] {
        admission.commit(t, 30);
    }
    assert_eq!(admission.tokens_today(&tenant("claims")), 90);
    r.truncate = false;
    let refused = admission.reserve(r, NOW);
    assert!(refused.is_ok(), "90 + 100 fits in 250");
}

#[test]
fn retry_after_for_a_decide_denial_comes_from_the_same_window() {
    let admission = MemoryAdmission::new();
    let mut r = reservation("claims", None);
    r.requests_per_minute = Some(3);
    for at in [0, 10, 25] {
        let t = admission
            .reserve(r.clone(), NOW.plus(at))
            .expect("in window");
        admission.commit(t, 1);
    }
    let limits = Limits {
        requests_per_minute: Some(3),
        ..Default::default()
    };
    // At +40 the window holds 0, 10, 25: the request at 0 ages out at 60.
    let claims = tenant("claims");
    assert_eq!(
        admission.retry_after(&claims, Reason::RateLimited, &limits, NOW.plus(40)),
        Some(20)
    );
    // With a limit of 2, the one at 10 must age out too.
    let two = Limits {
        requests_per_minute: Some(2),
        ..Default::default()
    };
    assert_eq!(
        admission.retry_after(&claims, Reason::RateLimited, &two, NOW.plus(40)),
        Some(30)
    );
    assert_eq!(
        admission.retry_after(&claims, Reason::ConcurrencyLimit, &limits, NOW),
        Some(1)
    );
    assert_eq!(
        admission.retry_after(&claims, Reason::TenantUserCap, &limits, NOW),
        None
    );
}

#[test]
fn restore_starts_from_the_counts_it_is_given() {
    let admission = MemoryAdmission::new();
    let claims = tenant("claims");
    admission.restore(
        Restored {
            tenant_users: (0..3).map(|u| (claims.clone(), user(u))).collect(),
            licence_users: vec![("L".to_owned(), user(0))],
            tokens_today: vec![(claims.clone(), 700)],
            recent: vec![
                (claims.clone(), NOW.seconds() - 90),
                (claims.clone(), NOW.seconds() - 5),
            ],
        },
        NOW,
    );
    assert_eq!(admission.tenant_users(&claims), 3);
    assert!(admission.tenant_user_seen(&claims, &user(2)));
    assert_eq!(admission.licence_users("L"), 1);
    assert_eq!(admission.tokens_today(&claims), 700);
    // Only the request of the last minute is in the window.
    assert_eq!(admission.requests_last_minute(&claims), 1);
    let mut r = reservation("claims", Some(9));
    r.tenant_user_cap = Some(3);
    assert_eq!(
        admission.reserve(r, NOW).expect_err("cap").reason,
        Reason::TenantUserCap
    );
}

// Random interleavings against a model.
//
// A few tenants send requests for a few end users; each request is reserved,
// then committed (served, with at most its grant used) or released (nothing
// served: an engine error or a cancelled client). After every step the
// counters must say exactly what the model derives from the requests
// admitted and how they ended, and never pass a limit; once every request
// has ended, nothing is in flight and the users and tokens are those of the
// committed requests.

/// One tenant's limits, as its bundle entry gives them on every request.
#[derive(Clone, Debug)]
struct Rules {
    requests_per_minute: Option<u32>,
    tokens_per_day: Option<u64>,
    truncate: bool,
    concurrent_requests: Option<u32>,
    tenant_user_cap: Option<u64>,
}

const TENANTS: [&str; 3] = ["claims", "search", "batch"];
/// The licence each tenant's model is under: claims and search share one,
/// so its user threshold binds across both.
const LICENCE_OF: [usize; 3] = [0, 0, 1];
const LICENCES: [&str; 2] = ["LicenseRef-Shared", "LicenseRef-Other"];
/// End users 0..USERS; the same key under two tenants is the same person.
const USERS: u32 = 6;

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        tenant: usize,
        user: Option<u32>,
        prompt: u64,
        generate: u64,
    },
    /// A request in flight was served and used `percent` of its grant.
    Commit { index: Index, percent: u64 },
    /// A request in flight ended with nothing served (a cancel is a release).
    Release { index: Index },
    /// Time passes: the rate window slides (all within one UTC day and month).
    Wait { seconds: i64 },
}

fn tenant_rules() -> impl Strategy<Value = Rules> {
    (
        proptest::option::of(1..6u32),
        proptest::option::of(200..2_000u64),
        any::<bool>(),
        proptest::option::of(1..4u32),
        proptest::option::of(0..4u64),
    )
        .prop_map(
            |(
                requests_per_minute,
                tokens_per_day,
                truncate,
                concurrent_requests,
                tenant_user_cap,
            )| {
                Rules {
                    requests_per_minute,
                    tokens_per_day,
                    truncate,
                    concurrent_requests,
                    tenant_user_cap,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TENANTS.len(), proptest::option::of(0..USERS), 1..60u64, 1..300u64).prop_map(
            |(tenant, user, prompt, generate)| Op::Reserve {
                tenant,
                user,
                prompt,
                generate,
            }
        ),
        2 => (any::<Index>(), 0..=100u64).prop_map(|(index, percent)| Op::Commit { index, percent }),
        2 => any::<Index>().prop_map(|index| Op::Release { index }),
        1 => (0..40i64).prop_map(|seconds| Op::Wait { seconds }),
    ]
}

/// What one admitted request accounts for.
#[derive(Clone, Debug)]
struct Held {
    tenant: usize,
    user: Option<u32>,
    at: i64,
    /// Granted while in flight; used, once committed.
    tokens: u64,
}

/// The reference: the counters as the admitted requests, and how they
/// ended, account for them.
struct Model {
    rules: [Rules; 3],
    thresholds: [Option<u64>; 2],
    now: UnixTime,
    live: Vec<(Held, Ticket)>,
    served: Vec<Held>,
}

impl Model {
    fn held(&self) -> impl Iterator<Item = &Held> {
        self.live.iter().map(|(h, _)| h).chain(&self.served)
    }

    fn users(&self, t: usize) -> BTreeSet<u32> {
        self.held()
            .filter(|h| h.tenant == t)
            .filter_map(|h| h.user)
            .collect()
    }

    /// Users counted under a licence: only requests that carry its threshold count.
    fn licence_users(&self, licence: usize) -> BTreeSet<u32> {
        if self.thresholds[licence].is_none() {
            return BTreeSet::new();
        }
        self.held()
            .filter(|h| LICENCE_OF[h.tenant] == licence)
            .filter_map(|h| h.user)
            .collect()
    }

    fn tokens(&self, t: usize) -> u64 {
        self.held()
            .filter(|h| h.tenant == t)
            .map(|h| h.tokens)
            .sum()
    }

    fn recent(&self, t: usize) -> u32 {
        let since = self.now.seconds() - 60;
        let n = self
            .held()
            .filter(|h| h.tenant == t && h.at > since)
            .count();
        u32::try_from(n).expect("few requests")
    }

    fn concurrent(&self, t: usize) -> u32 {
        let n = self.live.iter().filter(|(h, _)| h.tenant == t).count();
        u32::try_from(n).expect("few requests")
    }

    fn reservation(&self, t: usize, who: Option<u32>, prompt: u64, generate: u64) -> Reservation {
        let rules = &self.rules[t];
        let licence = LICENCE_OF[t];
        Reservation {
            tenant: tenant(TENANTS[t]),
            user: who.map(user),
            tokens: prompt + generate,
            prompt_tokens: prompt,
            truncate: rules.truncate,
            requests_per_minute: rules.requests_per_minute,
            tokens_per_day: rules.tokens_per_day,
            concurrent_requests: rules.concurrent_requests,
            tenant_user_cap: rules.tenant_user_cap,
            tenant_user_limit: rules.tenant_user_cap,
            licence_user_thresholds: self.thresholds[licence]
                .map(|threshold| (LICENCES[licence].to_owned(), threshold))
                .into_iter()
                .collect(),
        }
    }

    /// What `reserve` must answer, by the rules in the order it applies
    /// them: the tokens granted, whether the user is new to the tenant and
    /// the licences they are new under; or the reason for the refusal.
    fn expect(
        &self,
        r: &Reservation,
        t: usize,
        who: Option<u32>,
    ) -> Result<(u64, bool, Vec<String>), Reason> {
        let rules = &self.rules[t];
        if let Some(rpm) = rules.requests_per_minute
            && self.recent(t) >= rpm
        {
            return Err(Reason::RateLimited);
        }
        let mut granted = r.tokens;
        if let Some(budget) = rules.tokens_per_day {
            let used = self.tokens(t);
            if used + r.tokens > budget {
                let left = budget.saturating_sub(used);
                if rules.truncate && left > r.prompt_tokens {
                    granted = left;
                } else {
                    return Err(Reason::TokenBudgetExhausted);
                }
            }
        }
        if let Some(max) = rules.concurrent_requests
            && self.concurrent(t) >= max
        {
            return Err(Reason::ConcurrencyLimit);
        }
        let Some(u) = who else {
            return Ok((granted, false, Vec::new()));
        };
        let users = self.users(t);
        let new_user = !users.contains(&u);
        if new_user
            && rules
                .tenant_user_cap
                .is_some_and(|cap| users.len() as u64 >= cap)
        {
            return Err(Reason::TenantUserCap);
        }
        let mut new_licences = Vec::new();
        for (name, threshold) in &r.licence_user_thresholds {
            let seen = self.licence_users(LICENCE_OF[t]);
            if !seen.contains(&u) {
                if seen.len() as u64 >= *threshold {
                    return Err(Reason::LicenceUserThreshold);
                }
                new_licences.push(name.clone());
            }
        }
        Ok((granted, new_user, new_licences))
    }
}

/// Every counter against the model, and every limit.
fn check(admission: &MemoryAdmission, m: &Model, step: usize) -> Result<(), TestCaseError> {
    for (t, name) in TENANTS.iter().enumerate() {
        let id = tenant(name);
        let rules = &m.rules[t];
        let concurrent = admission.concurrent(&id);
        let users = admission.tenant_users(&id);
        let tokens = admission.tokens_today(&id);
        let recent = admission.requests_last_minute(&id);
        if let Some(max) = rules.concurrent_requests {
            prop_assert!(
                concurrent <= max,
                "step {step}: {concurrent} in flight for {name}, limit {max}"
            );
        }
        if let Some(cap) = rules.tenant_user_cap {
            prop_assert!(
                users <= cap,
                "step {step}: {users} users for {name}, cap {cap}"
            );
        }
        if let Some(budget) = rules.tokens_per_day {
            prop_assert!(
                tokens <= budget,
                "step {step}: {tokens} tokens for {name}, budget {budget}"
            );
        }
        if let Some(rpm) = rules.requests_per_minute {
            prop_assert!(
                recent <= rpm,
                "step {step}: {recent} requests this minute for {name}, limit {rpm}"
            );
        }
        prop_assert_eq!(
            concurrent,
            m.concurrent(t),
            "step {}: {} in flight",
            step,
            name
        );
        let expected = m.users(t);
        prop_assert_eq!(
            users,
            expected.len() as u64,
            "step {}: users of {} (the model: {:?})",
            step,
            name,
            expected
        );
        for u in 0..USERS {
            prop_assert_eq!(
                admission.tenant_user_seen(&id, &user(u)),
                expected.contains(&u),
                "step {}: user {} of {}",
                step,
                u,
                name
            );
        }
        prop_assert_eq!(tokens, m.tokens(t), "step {}: tokens of {}", step, name);
        prop_assert_eq!(
            recent,
            m.recent(t),
            "step {}: requests this minute of {}",
            step,
            name
        );
    }
    for (l, name) in LICENCES.iter().enumerate() {
        let expected = m.licence_users(l);
        let count = admission.licence_users(name);
        if let Some(threshold) = m.thresholds[l] {
            prop_assert!(
                count <= threshold,
                "step {step}: {count} users under {name}, threshold {threshold}"
            );
        }
        prop_assert_eq!(
            count,
            expected.len() as u64,
            "step {}: users under {} (the model: {:?})",
            step,
            name,
            expected
        );
        for u in 0..USERS {
            prop_assert_eq!(
                admission.licence_user_seen(name, &user(u)),
                expected.contains(&u),
                "step {}: user {} under {}",
                step,
                u,
                name
            );
        }
    }
    Ok(())
}

fn run(rules: [Rules; 3], thresholds: [Option<u64>; 2], ops: &[Op]) -> Result<(), TestCaseError> {
    let admission = MemoryAdmission::new();
    admission.observe(NOW);
    let mut m = Model {
        rules,
        thresholds,
        now: NOW,
        live: Vec::new(),
        served: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Reserve {
                tenant: t,
                user: who,
                prompt,
                generate,
            } => {
                let r = m.reservation(*t, *who, *prompt, *generate);
                let expected = m.expect(&r, *t, *who);
                match (admission.reserve(r, m.now), expected) {
                    (Ok(ticket), Ok((granted, new_user, new_licences))) => {
                        prop_assert_eq!(
                            ticket.reservation.tokens,
                            granted,
                            "step {}: tokens granted",
                            step
                        );
                        prop_assert_eq!(
                            ticket.new_tenant_user,
                            new_user,
                            "step {}: new to the tenant",
                            step
                        );
                        prop_assert_eq!(
                            &ticket.new_licence_users,
                            &new_licences,
                            "step {}: new under",
                            step
                        );
                        prop_assert_eq!(ticket.at, m.now);
                        let held = Held {
                            tenant: *t,
                            user: *who,
                            at: m.now.seconds(),
                            tokens: granted,
                        };
                        m.live.push((held, ticket));
                    }
                    (Err(refusal), Err(reason)) => {
                        prop_assert_eq!(refusal.reason, reason, "step {}: {}", step, refusal.rule);
                        prop_assert_eq!(
                            refusal.retry_after.is_some(),
                            reason.is_transient(),
                            "step {}: retry-after",
                            step
                        );
                    }
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: reserve gave {got:?}; the model says {want:?}"
                        )));
                    }
                }
            }
            Op::Commit { index, percent } => {
                if m.live.is_empty() {
                    continue;
                }
                let (mut held, ticket) = m.live.remove(index.index(m.live.len()));
                held.tokens = held.tokens * percent / 100;
                admission.commit(ticket, held.tokens);
                m.served.push(held);
            }
            Op::Release { index } => {
                if m.live.is_empty() {
                    continue;
                }
                let (_, ticket) = m.live.remove(index.index(m.live.len()));
                admission.release(ticket);
            }
            Op::Wait { seconds } => {
                m.now = m.now.plus(*seconds);
                admission.observe(m.now);
            }
        }
        check(&admission, &m, step)?;
    }
    // Every request ends, one in two served with its whole grant.
    for (i, (held, ticket)) in std::mem::take(&mut m.live).into_iter().enumerate() {
        if i % 2 == 0 {
            admission.commit(ticket, held.tokens);
            m.served.push(held);
        } else {
            admission.release(ticket);
        }
    }
    check(&admission, &m, ops.len())?;
    for (t, name) in TENANTS.iter().enumerate() {
        let id = tenant(name);
        let served: Vec<&Held> = m.served.iter().filter(|h| h.tenant == t).collect();
        let users: BTreeSet<u32> = served.iter().filter_map(|h| h.user).collect();
        prop_assert_eq!(
            admission.concurrent(&id),
            0,
            "{} has requests in flight",
            name
        );
        prop_assert_eq!(
            admission.tenant_users(&id),
            users.len() as u64,
            "{}: the served users",
            name
        );
        prop_assert_eq!(
            admission.tokens_today(&id),
            served.iter().map(|h| h.tokens).sum::<u64>(),
            "{}: the served tokens",
            name
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Reserve, commit and release in any order, from three tenants (two
    /// under one licence) and six users, under random caps, rates, budgets
    /// (refusing or truncating) and concurrency limits.
    #[test]
    fn interleavings_never_pass_a_limit_and_count_what_was_served(
        rules in [tenant_rules(), tenant_rules(), tenant_rules()],
        thresholds in [proptest::option::of(0..5u64), proptest::option::of(0..5u64)],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(rules, thresholds, &ops)?;
    }
}

// Threads racing behind a barrier.

const RACERS: usize = 16;

/// One reservation from each of RACERS threads, all let go at once.
fn race(
    admission: &MemoryAdmission,
    make: impl Fn(usize) -> Reservation + Sync,
) -> Vec<Result<Ticket, Refusal>> {
    let barrier = Barrier::new(RACERS);
    std::thread::scope(|s| {
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (barrier, make) = (&barrier, &make);
                s.spawn(move || {
                    let r = make(i);
                    barrier.wait();
                    admission.reserve(r, NOW)
                })
            })
            .collect();
        racers
            .into_iter()
            .map(|h| h.join().expect("racer"))
            .collect()
    })
}

/// The admitted tickets; every refusal must be for `reason`.
fn admitted(results: Vec<Result<Ticket, Refusal>>, reason: Reason) -> Vec<Ticket> {
    results
        .into_iter()
        .filter_map(|r| match r {
            Ok(ticket) => Some(ticket),
            Err(refusal) => {
                assert_eq!(refusal.reason, reason, "{}", refusal.rule);
                None
            }
        })
        .collect()
}

fn few(i: usize) -> u32 {
    u32::try_from(i).expect("few users")
}

#[test]
fn racing_requests_take_exactly_the_user_cap_and_the_free_slots() {
    const CAP: u64 = 5;
    const SLOTS: u32 = 8;
    let capped = |i: usize| {
        let mut r = reservation("claims", Some(few(i)));
        r.tenant_user_cap = Some(CAP);
        r.concurrent_requests = Some(SLOTS);
        r
    };
    let claims = tenant("claims");
    for _ in 0..20 {
        let admission = MemoryAdmission::new();
        // 16 new users for 5 user slots (and 8 concurrency slots).
        let first = admitted(race(&admission, capped), Reason::TenantUserCap);
        assert_eq!(first.len() as u64, CAP);
        assert_eq!(admission.tenant_users(&claims), CAP);
        // The admitted users again, 16 requests for the 3 slots left: a
        // known user takes no user slot.
        let known: Vec<UserKey> = first
            .iter()
            .map(|t| t.reservation.user.expect("a user"))
            .collect();
        let second = admitted(
            race(&admission, |i| {
                let mut r = capped(0);
                r.user = Some(known[i % known.len()]);
                r
            }),
            Reason::ConcurrencyLimit,
        );
        assert_eq!(second.len(), SLOTS as usize - first.len());
        assert_eq!(admission.concurrent(&claims), SLOTS);
        // All end at once: the first served, the second released.
        let a = &admission;
        std::thread::scope(|s| {
            for t in first {
                s.spawn(move || a.commit(t, 10));
            }
            for t in second {
                s.spawn(move || a.release(t));
            }
        });
        assert_eq!(admission.concurrent(&claims), 0);
        assert_eq!(admission.tenant_users(&claims), CAP, "served users stay");
        assert_eq!(admission.tokens_today(&claims), 10 * CAP);
        // The month is full: no new user gets in, however many race.
        let late = admitted(race(&admission, |i| capped(100 + i)), Reason::TenantUserCap);
        assert!(late.is_empty());

        // Fewer slots than the cap: the slots bind.
        let admission = MemoryAdmission::new();
        let narrow = admitted(
            race(&admission, |i| {
                let mut r = capped(i);
                r.tenant_user_cap = Some(10);
                r.concurrent_requests = Some(4);
                r
            }),
            Reason::ConcurrencyLimit,
        );
        assert_eq!(narrow.len(), 4);
        for t in narrow {
            admission.release(t);
        }
        assert_eq!(admission.tenant_users(&claims), 0);
        assert_eq!(admission.concurrent(&claims), 0);
    }
}

#[test]
fn racing_tenants_take_exactly_a_licence_threshold_between_them() {
    for _ in 0..20 {
        let admission = MemoryAdmission::new();
        let tickets = admitted(
            race(&admission, |i| {
                let mut r = reservation(["claims", "search"][i % 2], Some(few(i)));
                r.licence_user_thresholds = vec![("LicenseRef-Gemma".to_owned(), 6)];
                r
            }),
            Reason::LicenceUserThreshold,
        );
        assert_eq!(tickets.len(), 6);
        assert_eq!(admission.licence_users("LicenseRef-Gemma"), 6);
        assert_eq!(
            admission.tenant_users(&tenant("claims")) + admission.tenant_users(&tenant("search")),
            6
        );
        for t in tickets {
            admission.commit(t, 1);
        }
        assert_eq!(admission.licence_users("LicenseRef-Gemma"), 6);
    }
}
