use super::*;

/// A clock the test moves by hand.
#[derive(Clone, Default)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Monotonic for ManualClock {
    fn elapsed(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

fn heartbeat() -> (Heartbeat, ManualClock) {
    let clock = ManualClock::default();
    (Heartbeat::with_clock(Box::new(clock.clone())), clock)
}

#[test]
fn healthy_until_a_worker_overruns_its_budget() {
    let (hb, clock) = heartbeat();
    assert!(hb.healthy(), "no workers is healthy");
    let w = hb.register("probe", Duration::from_millis(30));
    clock.advance(30);
    assert!(hb.healthy(), "exactly at the budget is still healthy");
    clock.advance(1);
    assert!(!hb.healthy(), "overran its budget");
    let health = hb.check();
    assert_eq!(health[0].name, "probe");
    assert_eq!(health[0].since_progress_ms, 31);
    w.progress();
    assert!(hb.healthy(), "progress clears it");
}

#[test]
fn one_stuck_worker_is_enough() {
    let (hb, clock) = heartbeat();
    let fast = hb.register("fast", Duration::from_millis(10));
    let _slow = hb.register("slow", Duration::from_millis(1000));
    clock.advance(500);
    assert!(!hb.healthy());
    fast.progress();
    assert!(hb.healthy());
}

#[test]
fn idle_workers_are_never_stuck() {
    let (hb, clock) = heartbeat();
    let w = hb.register("writer", Duration::from_millis(10));
    w.idle();
    clock.advance(10_000);
    assert!(hb.healthy());
    w.progress();
    clock.advance(11);
    assert!(!hb.healthy(), "progress ends idleness");
}

#[test]
fn expect_extends_the_budget() {
    let (hb, clock) = heartbeat();
    let w = hb.register("hasher", Duration::from_millis(10));
    w.expect(Duration::from_secs(60));
    clock.advance(59_000);
    assert!(hb.healthy());
    clock.advance(2_000);
    assert!(!hb.healthy());
}

#[test]
fn dropping_deregisters_but_a_panic_leaves_it_dead() {
    let (hb, _clock) = heartbeat();
    drop(hb.register("done", Duration::from_millis(1)));
    assert!(hb.check().is_empty());

    let w = hb.register("crashes", Duration::from_secs(60));
    let result = std::thread::spawn(move || {
        let _w = w;
        panic!("worker bug");
    })
    .join();
    assert!(result.is_err());
    let health = hb.check();
    assert_eq!(health.len(), 1);
    assert!(health[0].dead && health[0].stuck);
    assert!(!hb.healthy());
}
