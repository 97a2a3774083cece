//! Exactness under concurrency, and what commit and release give back.

use std::sync::Arc;

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
