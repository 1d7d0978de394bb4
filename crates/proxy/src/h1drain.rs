//! How an HTTP/1.1 connection drains without losing a request.
//!
//! HTTP/1.1 has one way to tell a keep-alive client that the connection is about to close:
//! `Connection: close` in a response head. A streaming reply whose head left before the drain
//! began cannot carry it, so closing the connection as soon as that reply ends races the
//! client's next request (it sees a clean end, reuses the connection at once, and finds it
//! closed: a lost call, not safe to retry for a POST). Instead, while the grace period lasts,
//! a draining connection stays open until it has been idle for [`DRAIN_IDLE`]: a request that
//! arrives meanwhile is served with `Connection: close` (hyper then closes after it), and the
//! client's next one goes elsewhere. A connection on which nothing has been sent yet (HTTP/1.1
//! or HTTP/2 alike, before the protocol is known) is idle in the same way. The same holds after the grace period: a call it cut short
//! ended with UNAVAILABLE, and a request sent right after that status gets a status too
//! (UNAVAILABLE, retry elsewhere) rather than a closed connection. So a drain lasts at most the
//! grace period plus [`DRAIN_IDLE`].
//!
//! This file holds what the connection loop needs to know for that: whether a request is in
//! progress ([`Activity`], from the head read to the response body dropped) and the response
//! wrapper that holds the connection busy ([`Tracked`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

/// How long a draining HTTP/1.1 connection waits, idle, for one more request before it closes.
/// Long enough for a client that reuses the connection right after a reply (pools do, in
/// microseconds to milliseconds), short against the grace period (30 s by default).
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Requests in progress on one HTTP/1.1 connection, with a wake-up on each change.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    in_progress: AtomicUsize,
    changed: Notify,
}

impl Activity {
    /// A request's head was read; it is in progress until the returned guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> Busy {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// No request in progress.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_progress.load(Ordering::Acquire) == 0
    }

    /// Resolves after a request started or ended (at once if one did since the last call).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// A request in progress (see [`Activity::start`]).
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request [`Busy`] until hyper has written it and drops it.
#[derive(Debug)]
pub(crate) struct Tracked<B> {
    body: B,
    _busy: Busy,
}

/// The response as the connection writes it: tracked, and with `Connection: close` when the
/// drain began before its head was ready.
pub(crate) fn track<B>(
    mut response: Response<B>,
    busy: Busy,
    draining: bool,
) -> Response<Tracked<B>> {
    if draining {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response.map(|body| Tracked { body, _busy: busy })
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_request_is_busy_until_its_response_body_is_dropped() {
        let activity = Arc::new(Activity::default());
        assert!(activity.is_idle());
        let busy = activity.start();
        activity.changed().await;
        assert!(!activity.is_idle());
        let response = track(
            Response::new(Full::new(bytes::Bytes::from_static(b"x"))),
            busy,
            false,
        );
        assert!(
            !activity.is_idle(),
            "busy while the response is being written"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"x");
        assert!(activity.is_idle(), "idle once the body is dropped");
        activity.changed().await;
    }

    #[test]
    fn responses_made_while_draining_close_the_connection() {
        let activity = Arc::new(Activity::default());
        let kept = track(Response::new(()), activity.start(), false);
        assert!(kept.headers().get(CONNECTION).is_none());
        let closing = track(Response::new(()), activity.start(), true);
        assert_eq!(closing.headers()[CONNECTION], "close");
    }
}
