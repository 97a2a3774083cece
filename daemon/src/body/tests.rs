use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;

use super::*;

/// A body that yields its frames, then ends or (stalling) never does.
struct Script {
    frames: VecDeque<Bytes>,
    stall: bool,
}

impl Script {
    fn new(frames: &[&'static [u8]], stall: bool) -> Self {
        Self {
            frames: frames.iter().copied().map(Bytes::from_static).collect(),
            stall,
        }
    }
}

impl Body for Script {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.pop_front() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if self.stall => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

fn rules(limit: u64) -> Rules {
    Rules {
        limit,
        timeout: Duration::from_secs(1),
        min_bytes_per_sec: 1000,
    }
}

#[tokio::test]
async fn a_whole_body_is_read_and_charged_while_it_lives() {
    let budget = BodyBudget::new(1 << 20);
    let body = read(
        Script::new(&[b"hello ", b"world"], false),
        Some(11),
        rules(100),
        &budget,
    )
    .await
    .expect("read");
    assert_eq!(&body[..], b"hello world");
    assert!(budget.in_use() > 0);
    drop(body);
    assert_eq!(budget.in_use(), 0);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_reading() {
    let budget = BodyBudget::new(1 << 20);
    // A stalled body: refusing it must not wait for a byte.
    let e = read(Script::new(&[], true), Some(101), rules(100), &budget)
        .await
        .expect_err("too large");
    assert!(matches!(e, BodyError::TooLarge { limit: 100 }), "{e}");
}

#[tokio::test]
async fn a_body_growing_past_the_limit_is_cut_off() {
    let budget = BodyBudget::new(1 << 20);
    let e = read(
        Script::new(&[&[b'a'; 60], &[b'b'; 60]], false),
        None,
        rules(100),
        &budget,
    )
    .await
    .expect_err("too large");
    assert!(matches!(e, BodyError::TooLarge { .. }), "{e}");
    assert_eq!(budget.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_declared_body_that_never_comes_times_out() {
    let budget = BodyBudget::new(1 << 20);
    let started = Instant::now();
    let e = read(
        Script::new(&[b"0123456789"], true),
        Some(1000),
        rules(1000),
        &budget,
    )
    .await
    .expect_err("stalled");
    // One second, plus the 10 ms the ten bytes earned at 1000 bytes/s.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1010) && waited < Duration::from_millis(1100),
        "{waited:?}"
    );
    assert!(matches!(e, BodyError::Timeout { received: 10, .. }), "{e}");
    assert_eq!(budget.in_use(), 0, "the charge is given back");
}

#[tokio::test]
async fn each_byte_received_earns_time_at_the_minimum_rate() {
    let r = Rules {
        limit: 1 << 20,
        timeout: Duration::from_secs(5),
        min_bytes_per_sec: 1024,
    };
    let t = Instant::now();
    assert_eq!(r.deadline(t, 0) - t, Duration::from_secs(5));
    assert_eq!(r.deadline(t, 2048) - t, Duration::from_secs(7));
    assert_eq!(r.deadline(t, 512) - t, Duration::from_millis(5500));
}

#[test]
fn a_full_budget_is_refused_at_once_and_given_back_on_drop() {
    let budget = BodyBudget::new(4096);
    assert_eq!(budget.bytes(), 4096);
    let mut a = budget.charge();
    a.add(3000).expect("fits");
    let mut b = budget.charge();
    assert!(matches!(b.add(2000), Err(BodyError::Busy)));
    // More than the whole budget can never be served.
    assert!(matches!(
        budget.charge().add(5000),
        Err(BodyError::OverBudget {
            needed: 5000,
            budget: 4096
        })
    ));
    drop(a);
    b.add(2000).expect("fits once the first is gone");
    assert_eq!(budget.in_use(), 2048);
}

#[tokio::test]
async fn parsed_json_is_charged_before_it_is_parsed() {
    let budget = BodyBudget::new(64 * 1024);
    let text: &'static [u8] = &[b' '; 3000];
    let mut body = read(Script::new(&[text], false), None, rules(1 << 20), &budget)
        .await
        .expect("read");
    body.charge_json(3000).expect("3000 x 17 fits in 64 KiB");
    assert_eq!(body.charged(), 3000 * JSON_CHARGE);
    let mut other = read(Script::new(&[text], false), None, rules(1 << 20), &budget)
        .await
        .expect("the bytes alone fit");
    assert!(matches!(other.charge_json(3000), Err(BodyError::Busy)));
    // A binary tail after a short JSON header is charged as bytes.
    other.charge_json(100).expect("3000 + 100 x 16 fits");
    assert_eq!(other.charged(), 3000 + 100 * (JSON_CHARGE - 1));
}
