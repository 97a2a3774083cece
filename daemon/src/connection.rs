//! One accepted connection: HTTP/1.1 or HTTP/2 (detected from the preface),
//! served by hyper with the configured limits, watched for slow headers and
//! idleness, drained gracefully on shutdown.
//!
//! hyper's own HTTP/1 header timeout also counts the wait *between*
//! keep-alive requests, which would make idle_timeout meaningless, and the
//! HTTP/1-vs-2 detection has no timeout at all; so both clocks are kept here,
//! fed by the bytes the connection reads and the requests it dispatches.
//!
//! An HTTP/2 peer's control frames (PING, WINDOW_UPDATE, SETTINGS) are bytes
//! read too, and hyper's keep-alive only closes peers that stop answering, so
//! an HTTP/2 connection's idleness counts from its last request, whatever
//! frames arrive; and one told to close that does not (it need not answer the
//! shutdown PING) is cut. While a request is in flight these clocks are off:
//! its body's own deadline (see `body`) bounds it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use airgate_policy::identity::Identity;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::metrics::{ListenerLabels, RefusedLabels};
use crate::server::Shared;

/// What a handler knows about the connection its request came on.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub listener: String,
    pub identity: Identity,
    /// Cancelled by a handler that wants the connection ended (a client
    /// certificate that has expired since the handshake): it is shut down
    /// gracefully, after the responses in flight.
    pub close: CancellationToken,
}

/// Activity counters shared by the IO wrapper, the service and the watcher.
struct Activity {
    epoch: Instant,
    /// Millisecond timestamps (since `epoch`) plus one; zero means "not set".
    last_read: AtomicU64,
    /// When the last request ended (or the connection began).
    settled: AtomicU64,
    head_started: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        let a = Self {
            epoch: Instant::now(),
            last_read: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        };
        // A new connection owes its first request head within the header timeout.
        a.head_started.store(a.now(), Ordering::Release);
        a.last_read.store(a.now(), Ordering::Release);
        a.settled.store(a.now(), Ordering::Release);
        a
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn on_read(&self) {
        let now = self.now();
        self.last_read.store(now, Ordering::Release);
        // Bytes while nothing is in flight start (or continue) a request head.
        // HTTP/2 connections only owe their first request this way: after it,
        // control frames (PING, WINDOW_UPDATE) arrive while idle and are no head.
        let first = self.requests.load(Ordering::Acquire) == 0;
        if self.in_flight.load(Ordering::Acquire) == 0
            && (first || !self.http2.load(Ordering::Acquire))
        {
            let _ = self
                .head_started
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn verdict(&self, limits: &Limits) -> Option<Close> {
        let now = self.now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::Acquire);
        if head != 0 && now.saturating_sub(head) > millis(limits.header_read_timeout) {
            return Some(Close::HeaderTimeout);
        }
        // Bytes on an idle HTTP/1 connection start a head (bounded above);
        // on HTTP/2 they may be PINGs forever, so only requests count.
        let last = if self.http2.load(Ordering::Acquire) {
            self.settled.load(Ordering::Acquire)
        } else {
            self.last_read.load(Ordering::Acquire)
        };
        if now.saturating_sub(last) > millis(limits.idle_timeout) {
            return Some(Close::Idle);
        }
        None
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    HeaderTimeout,
    Idle,
}

/// Counts a request as in flight until dropped (with its response body).
pub struct InFlight {
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        let now = self.activity.now();
        self.activity.last_read.store(now, Ordering::Release);
        self.activity.settled.store(now, Ordering::Release);
    }
}

/// The stream, with reads reported to the connection's activity clock.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .max_headers(limits.max_headers)
        // The head must fit the read buffer, or hyper answers 431.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .header_read_timeout(None)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        // PINGs from us find peers that vanished mid-request (a stream in
        // flight keeps the idle clock off); idle peers are closed by ours.
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// Why a connection is turned away before any request is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    ConnectionLimit,
    PeerCredentials,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::PeerCredentials => "peer_credentials",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "too many connections",
            Self::PeerCredentials => "the caller's credentials could not be read from the socket",
        }
    }
}

/// Tells a refused client why, without waiting on it (it may not read), then closes.
pub fn refuse(stream: UnixStream, shared: &Shared, listener: &str, why: Refusal) {
    let body = serde_json::json!({
        "error": {"message": why.message(), "type": "server_error", "code": why.code()}
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
    count_refusal(shared, listener, why);
}

/// Counts a connection turned away (on TLS, before the handshake, silently).
pub fn count_refusal(shared: &Shared, listener: &str, why: Refusal) {
    shared
        .metrics
        .connections_refused
        .get_or_create(&RefusedLabels {
            listener: listener.to_owned(),
            reason: why.code(),
        })
        .inc();
}

/// Serves one connection until the client leaves, it times out, or shutdown
/// (graceful on `drain`, immediate on `abort`).
pub async fn serve<S>(
    shared: Arc<Shared>,
    stream: S,
    conn: Conn,
    permit: OwnedSemaphorePermit,
    drain: CancellationToken,
    abort: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let labels = ListenerLabels {
        listener: conn.listener.clone(),
    };
    shared
        .metrics
        .connections_active
        .get_or_create(&labels)
        .inc();
    let activity = Arc::new(Activity::new());
    let limits = shared.config().limits.clone();
    let conn = Arc::new(conn);
    let span = tracing::debug_span!("conn", id = conn.id, listener = %conn.listener);

    let service = {
        let activity = Arc::clone(&activity);
        let shared = Arc::clone(&shared);
        let conn = Arc::clone(&conn);
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            activity.head_started.store(0, Ordering::Release);
            activity.requests.fetch_add(1, Ordering::AcqRel);
            if req.version() == http::Version::HTTP_2 {
                activity.http2.store(true, Ordering::Release);
            }
            let in_flight = InFlight {
                activity: Arc::clone(&activity),
            };
            let shared = Arc::clone(&shared);
            let conn = Arc::clone(&conn);
            async move {
                Ok::<_, std::convert::Infallible>(
                    crate::api::handle(shared, conn, in_flight, req).await,
                )
            }
        })
    };
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let builder = builder(&limits);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);

    let check = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(25), Duration::from_secs(1));
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    // When an idle connection was asked to close (GOAWAY, for HTTP/2).
    let mut idle_close: Option<Instant> = None;
    let outcome = loop {
        tokio::select! {
            result = connection.as_mut() => {
                break match result {
                    Ok(()) => "closed",
                    // Closed for idleness, or a peer that stopped answering
                    // our keep-alive PINGs: idle, not a protocol error.
                    Err(e) if idle_close.is_some()
                        || e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) =>
                    {
                        tracing::debug!(parent: &span, error = %e, "idle connection ended");
                        "idle"
                    }
                    Err(e) => {
                        tracing::debug!(parent: &span, error = %e, "connection error");
                        "error"
                    }
                };
            }
            () = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = conn.close.cancelled(), if !draining => {
                tracing::info!(parent: &span, "closing the connection, as its handler asked");
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = abort.cancelled() => break "aborted",
            _ = tick.tick() => match activity.verdict(&limits) {
                Some(Close::HeaderTimeout) => {
                    tracing::info!(parent: &span, "request head not received in time; closing");
                    break "header_timeout";
                }
                Some(Close::Idle) if !draining => {
                    draining = true;
                    idle_close = Some(Instant::now());
                    connection.as_mut().graceful_shutdown();
                }
                // Still idle (no request since), and not closed: an HTTP/2
                // peer that never answers the shutdown PING is not waited on.
                Some(Close::Idle)
                    if idle_close.is_some_and(|at| at.elapsed() > limits.header_read_timeout) =>
                {
                    tracing::info!(parent: &span, "idle connection did not close when asked; cutting it");
                    break "idle";
                }
                _ => {}
            },
        }
    };
    shared
        .metrics
        .connections_active
        .get_or_create(&labels)
        .dec();
    shared.metrics.count_close(&conn.listener, outcome);
}
