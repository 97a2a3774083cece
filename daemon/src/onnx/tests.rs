//! The pool's bound and the activation estimate, without a model: the pool
//! runs test closures, the estimate runs on literal plans.

use std::sync::mpsc;
use std::time::Duration;

use super::*;

/// A run that has started and whose waiter went away keeps its permit and
/// its seat until the work returns: a second request is refused meanwhile,
/// and the pool is whole again once the work ends.
#[tokio::test]
async fn a_dropped_waiter_leaves_its_run_holding_the_pool() {
    let pool = Pool::new(1, 0);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let mut first = Box::pin(pool.run(move || {
        started_tx.send(()).ok();
        release_rx.recv().ok();
        Ok(1)
    }));
    let started =
        tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(10)));
    tokio::select! {
        biased;
        _ = &mut first => panic!("the work cannot finish before it is released"),
        started = started => started.expect("join").expect("the work started"),
    }
    // The waiter goes away (a client disconnect, the guard's timeout).
    drop(first);
    assert_eq!(pool.load_now(), 1, "the running work still holds its seat");
    assert_eq!(pool.running.available_permits(), 0, "and its permit");
    match pool.run(|| Ok(2)).await {
        Err(RunError::Overloaded(1)) => {}
        other => panic!("a second request while the first runs: {other:?}"),
    }
    release_tx.send(()).expect("the work is still running");
    // The permit comes back when the work ends; the seat went just before it.
    let permit = tokio::time::timeout(Duration::from_secs(10), pool.running.acquire())
        .await
        .expect("the work ends")
        .expect("the semaphore is open");
    drop(permit);
    assert_eq!(pool.load_now(), 0);
    assert_eq!(pool.run(|| Ok(3)).await.expect("room again"), 3);
}

/// Waiting requests count against the capacity too, and one that goes away
/// while it waits gives its place back at once.
#[tokio::test]
async fn a_waiter_counts_until_it_goes_away() {
    let pool = Pool::new(1, 1);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let running = pool.run(move || {
        started_tx.send(()).ok();
        release_rx.recv().ok();
        Ok(1)
    });
    let waiting = pool.run(|| Ok(2));
    let mut running = Box::pin(running);
    let mut waiting = Box::pin(waiting);
    let started =
        tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(10)));
    // In order: the running one takes the permit, the waiting one its seat.
    tokio::select! {
        biased;
        _ = &mut running => panic!("the work cannot finish before it is released"),
        _ = &mut waiting => panic!("no permit is free"),
        started = started => started.expect("join").expect("the work started"),
    }
    // One running and one waiting: the pool (1 + 1) is full.
    assert_eq!(pool.load_now(), 2);
    assert!(matches!(
        pool.run(|| Ok(3)).await,
        Err(RunError::Overloaded(2))
    ));
    // The waiter leaves before it got a permit: its place is free again.
    drop(waiting);
    assert_eq!(pool.load_now(), 1);
    release_tx.send(()).expect("the work is still running");
    assert_eq!(running.await.expect("served"), 1);
    assert_eq!(pool.load_now(), 0);
}

#[test]
fn the_peak_is_the_most_alive_at_once() {
    // Step 1 reads step 0 and frees it after running; step 2 reads step 1.
    let frees = vec![vec![], vec![0], vec![1]];
    assert_eq!(peak(&[10, 20, 5], &frees), Some(30));
    // Nothing freed: everything adds up.
    assert_eq!(peak(&[10, 20, 5], &[vec![], vec![], vec![]]), Some(35));
    assert_eq!(peak(&[u64::MAX, 1], &[vec![], vec![]]), None);
    assert_eq!(peak(&[], &[]), Some(0));
}

#[test]
fn step_bytes_follow_the_input_symbols_and_overflow_is_refused() {
    let scope = SymbolScope::default();
    let (batch, seq) = (scope.sym("batch"), scope.sym("seq"));
    // A [batch, seq, seq] FP32 value (attention scores, say).
    let bytes = TDim::from(&batch) * TDim::from(&seq) * TDim::from(&seq) * 4i64;
    let values = SymbolValues::default().with(&batch, 2).with(&seq, 8);
    assert_eq!(eval_bytes(&bytes, &values), Some(2 * 8 * 8 * 4));
    let values = SymbolValues::default()
        .with(&batch, 1 << 40)
        .with(&seq, 1 << 40);
    assert_eq!(eval_bytes(&bytes, &values), None, "overflows: refused");
    // A size only the run can know (say a NonZero count) is not guessed.
    let values = SymbolValues::default().with(&batch, 2);
    assert_eq!(eval_bytes(&bytes, &values), Some(0));
    assert_eq!(eval_bytes(&TDim::from(64i64), &values), Some(64));
}

#[test]
fn a_footprint_is_measured_from_the_input_shapes() {
    let scope = SymbolScope::default();
    let (batch, seq) = (scope.sym("batch"), scope.sym("seq"));
    let footprint = Footprint {
        // An input [batch, seq] of INT64, then [batch, seq, seq] FP32, then
        // the [batch] output.
        bytes: vec![
            TDim::from(&batch) * TDim::from(&seq) * 8i64,
            TDim::from(&batch) * TDim::from(&seq) * TDim::from(&seq) * 4i64,
            TDim::from(&batch) * 4i64,
        ],
        frees: vec![vec![], vec![0], vec![1]],
        inputs: vec![vec![Some(batch), Some(seq)]],
    };
    assert_eq!(
        footprint.peak_bytes(&[&[2, 16]]),
        Some(2 * 16 * 8 + 2 * 16 * 16 * 4)
    );
    assert_eq!(footprint.peak_bytes(&[&[usize::MAX, 16]]), None);
}

#[test]
fn too_large_names_the_numbers() {
    let tokens = TooLarge::Tokens {
        batch: 2048,
        seq: 128,
        tokens: 262_144,
        limit: 32_768,
    };
    let text = tokens.to_string();
    assert!(
        text.contains("2048 texts padded to 128 tokens are 262144 tokens"),
        "{text}"
    );
    assert!(
        text.contains("the limit is 32768 per request (onnx.max_batch_tokens)"),
        "{text}"
    );
    let bytes = TooLarge::Activations {
        bytes: Some(3 << 30),
        limit: 1 << 30,
    };
    assert_eq!(
        bytes.to_string(),
        "this run would hold about 3072 MiB of activations; the limit is 1024 MiB per request (onnx.max_run_bytes): send fewer or smaller inputs"
    );
    let overflow = TooLarge::Activations {
        bytes: None,
        limit: 1 << 30,
    };
    assert!(overflow.to_string().contains("more than 2^64 bytes"));
}
