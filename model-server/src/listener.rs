//! Accepting HTTP connections: a bound on open connections, a deadline for a request's headers
//! and an idle timeout between requests, and a shutdown that waits for running requests only up
//! to a deadline.
//!
//! `axum::serve` keeps a connection open for as long as the client likes and waits for every
//! connection on shutdown, so a few hundred slowloris sockets could exhaust descriptors and hold
//! the process past its termination grace period. Here each connection has a supervisor that
//! knows whether a request is running (a guard lives from the moment hyper hands the request to
//! the router until its response body is finished or dropped) and closes the socket when:
//! - the first request's headers are not complete `header_read_timeout` after the accept, or a
//!   later request's headers `header_read_timeout` after its first byte;
//! - no request has run for `idle_timeout` (between requests on a kept-alive connection).
//!
//! A request body that arrives too slowly is the handlers' business (they read it with a
//! deadline and answer 408), because only they can still answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

/// How long connections may take and how many may be open.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections; the next accept waits for one to close.
    pub max_connections: usize,
    /// From accept (or a later request's first byte) to complete request headers.
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request running is closed after this long.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            // Longer than the pools of common clients (90 s for reqwest and Go), so a client
            // rarely sends on a connection we are closing.
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What a shutdown left undone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still busy when the deadline passed, closed with their requests unfinished.
    pub cut: usize,
}

/// Milliseconds since the server started, for lock-free timestamps.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// What the supervisor of one connection needs to know about it.
struct Activity {
    clock: Clock,
    /// Requests handed to the router whose responses are not finished.
    running: AtomicUsize,
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: AtomicU64,
    /// The first byte read while idle: a request's headers are arriving. `u64::MAX`: none.
    first_byte: AtomicU64,
    /// Whether any request has been handed to the router yet.
    served: AtomicBool,
    /// Wakes the supervisor when a request starts or ends: its deadline moved.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new(clock: Clock) -> Self {
        Activity {
            clock,
            running: AtomicUsize::new(0),
            idle_since: AtomicU64::new(clock.now_ms()),
            first_byte: AtomicU64::new(u64::MAX),
            served: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn bytes_read(&self) {
        if self.running.load(Ordering::SeqCst) == 0 {
            let _ = self.first_byte.compare_exchange(
                u64::MAX,
                self.clock.now_ms(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.first_byte.store(u64::MAX, Ordering::SeqCst);
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    /// When the connection must be closed if nothing changes, or None while a request runs.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.running.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let first_byte = self.first_byte.load(Ordering::SeqCst);
        let idle_since = self.idle_since.load(Ordering::SeqCst);
        let headers_due = |from: u64| self.clock.at(from) + limits.header_read_timeout;
        Some(if first_byte != u64::MAX {
            headers_due(first_byte)
        } else if !self.served.load(Ordering::SeqCst) {
            // A new connection must send its first request promptly.
            headers_due(idle_since)
        } else {
            self.clock.at(idle_since) + limits.idle_timeout
        })
    }
}

/// Held from the moment a request reaches the router until its response body ends or is
/// dropped: while any is held, the connection is busy and never closed for idleness.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.idle_since.store(activity.clock.now_ms(), Ordering::SeqCst);
        activity.running.fetch_sub(1, Ordering::SeqCst);
        activity.changed.notify_one();
    }
}

/// A response body that releases its request's guard when finished (or dropped).
struct GuardedBody {
    inner: Body,
    guard: Option<RequestGuard>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The accepted socket, noting when bytes arrive while no request runs.
struct TrackedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serve `app` until `stop` resolves. Then the listener closes (new connections are refused,
/// so clients go to another replica), idle connections close at once, busy ones after their
/// current response, and whatever still runs `shutdown_timeout` later is cut.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    open: prometheus::IntGauge,
    stop: impl Future<Output = ()> + Send,
    shutdown_timeout: Duration,
) -> ShutdownReport {
    let clock = Clock(Instant::now());
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let warned = Arc::new(Mutex::new(None::<Instant>));
    tokio::pin!(stop);
    loop {
        // A slot first: at the limit, new connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = &mut stop => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if slots.available_permits() == 0 {
            warn_at_limit(&warned, limits.max_connections);
        }
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connection tasks so the set does not grow with history.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new(clock));
        let io = TokioIo::new(TrackedStream { inner: stream, activity: activity.clone() });
        let open = open.clone();
        let (app, limits, closing) = (app.clone(), limits.clone(), closing.clone());
        connections.spawn(async move {
            let _permit = permit;
            open.inc();
            supervise(io, app, activity, &limits, closing).await;
            open.dec();
            tracing::trace!(%peer, "connection closed");
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let deadline = tokio::time::sleep(shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = connections.join_next() => if next.is_none() { return ShutdownReport::default() },
            () = &mut deadline => break,
        }
    }
    let cut = connections.len();
    tracing::warn!(
        connections = cut,
        seconds = shutdown_timeout.as_secs_f64(),
        "shutdown timeout: closing connections with requests still running"
    );
    connections.shutdown().await;
    ShutdownReport { cut }
}

fn warn_at_limit(warned: &Mutex<Option<Instant>>, max: usize) {
    let mut last = warned.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
        tracing::warn!(max_connections = max, "connection limit reached; new connections wait");
        *last = Some(Instant::now());
    }
}

/// Drive one connection, closing it when a deadline of `limits` passes or shutdown comes.
async fn supervise(
    io: TokioIo<TrackedStream>,
    app: Router,
    activity: Arc<Activity>,
    limits: &ConnectionLimits,
    mut closing: watch::Receiver<bool>,
) {
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = tracked.request_started();
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(Body::new)).await.unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(
                resp.map(|inner| Body::new(GuardedBody { inner, guard: Some(guard) })),
            )
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Header and idle deadlines are ours (hyper's header timer would also cut idle keep-alive).
    builder.timer(TokioTimer::new()).header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = *closing.borrow();
    if shutting_down {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // While a request runs there is no deadline; a request starting or ending wakes us.
        let wake = activity.deadline(limits).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = activity.changed.notified() => {}
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = closing.changed(), if !shutting_down => {
                if changed.is_err() || *closing.borrow() {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if let Some(due) = activity.deadline(limits)
                    && Instant::now() >= due
                {
                    tracing::debug!("closing a connection past its header or idle deadline");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection_state() {
        let activity = Arc::new(Activity::new(Clock(Instant::now())));
        let l = limits();
        let t0 = Instant::now();
        // New: the first request's headers are due header_read_timeout after the accept.
        assert_eq!(activity.deadline(&l), Some(t0 + l.header_read_timeout));
        tokio::time::advance(Duration::from_secs(3)).await;
        let guard = activity.request_started();
        assert_eq!(activity.deadline(&l), None, "a running request is never cut");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(guard);
        let idle = Instant::now();
        assert_eq!(activity.deadline(&l), Some(idle + l.idle_timeout), "between requests: the idle timeout");
        tokio::time::advance(Duration::from_secs(5)).await;
        activity.bytes_read();
        assert_eq!(
            activity.deadline(&l),
            Some(Instant::now() + l.header_read_timeout),
            "a started request's headers are due from its first byte"
        );
    }
}
