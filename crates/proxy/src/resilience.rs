//! The guarded upstream: circuit breaker and retries (gRFC A6) around an egress transport.
//!
//! Retries happen only before the call is committed: this runs until the transport hands back a
//! streaming reply, and a streaming reply is returned at once (its headers go to the client), so
//! nothing is ever retried after a response header or message reached the client. A retry needs
//! the profile's permission (idempotent method and a retryable status, or a failure that provably
//! never reached the upstream), attempts left, time left, a replay buffer that held the whole
//! request, and the per-upstream throttle's consent. Each retry carries
//! `grpc-previous-rpc-attempts` and the time left as `grpc-timeout`.
//!
//! The breaker counts what is the upstream's doing. Before response headers: a failure blamed
//! on the upstream (connect error, reset, lost connection) or an UNAVAILABLE answer is a
//! failure, any other answer a success. A streaming reply is counted when its stream ends:
//! UNAVAILABLE, INTERNAL or UNKNOWN (a reset, a lost connection, a stream cut without its
//! status) is a failure, any other final status a success. A call that ends for the client's
//! or pnp's own reasons (the client went away or sent bad input, a clock, shutdown) is not
//! counted; if it was the half-open probe, the breaker hears that the probe was abandoned and
//! lets the next call probe. A probe that streams settles at its first response message.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use futures_core::Stream;
use http::HeaderValue;
use pnp_call::{BoxMessageStream, BoxReplyStream, Call, CallHead, Code, Reply, ReplyItem, Status};
use pnp_config::Resilience;
use pnp_policy::backoff::Pushback;
use pnp_policy::breaker::{
    Admission as BreakerAdmission, Breaker, BreakerConfig, BreakerState, ProbeId,
};
use pnp_policy::retry::{AttemptOutcome, RetryDecision, RetryState};
use pnp_policy::throttle::{RetryThrottle, TokenBucket};
use pnp_telemetry::Metrics;
use pnp_transport::{Blame, TransportError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::abort::CallAbort;
use crate::budget::BufferBudget;
use crate::control::EventSink;
use crate::ingress::Transport;
use crate::profiles::CallPolicy;
use crate::replay::Replay;

/// One upstream with its breaker and retry throttle.
pub(crate) struct GuardedUpstream {
    breaker: Arc<GuardedBreaker>,
    throttle: Mutex<RetryThrottle>,
    rng: Mutex<ChaCha8Rng>,
    /// Holds the request bytes kept for retries.
    budget: BufferBudget,
    metrics: Metrics,
}

/// The breaker of one upstream, shared with the [`BreakerTicket`]s of its calls in flight.
struct GuardedBreaker {
    breaker: Mutex<Breaker>,
    name: String,
    metrics: Metrics,
    /// Where state changes are reported to the control plane.
    events: OnceLock<EventSink>,
}

impl std::fmt::Debug for GuardedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedUpstream")
            .field("name", &self.breaker.name)
            .finish()
    }
}

impl GuardedUpstream {
    pub(crate) fn new(
        name: String,
        config: &Resilience,
        budget: BufferBudget,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let seed: u64 = rand::random();
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: config.breaker_failures,
                base_penalty: config.breaker_base_penalty,
                max_penalty: config.breaker_max_penalty,
                ..BreakerConfig::default()
            },
            seed,
        )
        .map_err(|e| format!("resilience.breaker: {e}"))?;
        let bucket = TokenBucket::new(config.retry_max_tokens, config.retry_token_ratio)
            .map_err(|e| format!("resilience.retry_throttle: {e}"))?;
        metrics.set_breaker_state(&name, 0);
        metrics.set_retry_tokens(bucket.tokens());
        Ok(Self {
            breaker: Arc::new(GuardedBreaker {
                breaker: Mutex::new(breaker),
                name,
                metrics: metrics.clone(),
                events: OnceLock::new(),
            }),
            throttle: Mutex::new(RetryThrottle::TokenBucket(bucket)),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed.rotate_left(17))),
            budget,
            metrics,
        })
    }

    /// Report breaker state changes to `sink` from now on.
    pub(crate) fn set_events(&self, sink: EventSink) {
        let _ = self.breaker.events.set(sink);
    }

    /// Send a call over `transport` (negotiation's pick), retrying as its policy allows, until
    /// a reply or a final failure. Retries stay on the same transport: they are for the
    /// upstream's blips, and moving a job is negotiation's business, for its next calls.
    ///
    /// The breaker hears how each attempt went: at once for a failure or a Trailers-Only reply;
    /// for a streaming reply when its stream ends (the reply's items carry the attempt's
    /// [`BreakerTicket`]), so a stream cut after its headers counts as a failure.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call(
        &self,
        transport: &Transport,
        head: CallHead,
        messages: BoxMessageStream,
        policy: &CallPolicy,
        deadline: Option<Instant>,
        job: Option<&str>,
        retries: &AtomicU64,
        abort: CallAbort,
    ) -> Result<Reply, TransportError> {
        if let (Some(_), Ok(mut throttle)) = (&policy.retry, self.throttle.lock()) {
            throttle.on_request(Instant::now());
        }
        // Without a retry policy the messages go to the one attempt as they are.
        let (replay, single) = match &policy.retry {
            Some(retry) => (
                Some(Replay::new(
                    messages,
                    retry.replay_buffer_limit(),
                    self.budget.clone(),
                )),
                None,
            ),
            None => (None, Some(messages)),
        };
        let result = self
            .attempts(
                transport,
                head,
                replay.as_ref(),
                single,
                policy,
                deadline,
                job,
                retries,
                abort,
            )
            .await;
        // No attempt follows: what was kept for one goes back to the budget now, not when the
        // request stream ends (which, for a streaming request, is the end of the call).
        if let Some(replay) = &replay {
            replay.release();
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        transport: &Transport,
        head: CallHead,
        replay: Option<&Replay>,
        mut single: Option<BoxMessageStream>,
        policy: &CallPolicy,
        deadline: Option<Instant>,
        job: Option<&str>,
        retries: &AtomicU64,
        abort: CallAbort,
    ) -> Result<Reply, TransportError> {
        let mut state = RetryState::new();
        loop {
            // Dropped unsettled (this future dropped, the client's side failed), the ticket
            // tells the breaker that a probe was abandoned.
            let ticket = self.admit()?;
            let mut attempt = head.clone();
            if state.attempts() > 0 {
                attempt.metadata.insert(
                    "grpc-previous-rpc-attempts",
                    HeaderValue::from(state.attempts()),
                );
            }
            if let Some(at) = deadline {
                attempt.timeout = Some(at.saturating_duration_since(Instant::now()));
            }
            let messages = match (replay, single.take()) {
                (Some(replay), _) => replay.reader(),
                (None, Some(messages)) => messages,
                (None, None) => {
                    return Err(TransportError {
                        status: Box::new(Status::new(
                            Code::Internal,
                            "pnp: request messages already consumed",
                        )),
                        blame: Blame::Proxy,
                        unprocessed: false,
                    })
                }
            };
            let result = transport
                .call(Call {
                    head: attempt,
                    messages,
                })
                .await;

            if abort.status().is_some() {
                // The client's side failed (bad input, gone): not the upstream's fault, and
                // nothing to retry.
                return result;
            }
            let now = Instant::now();
            let (code, unprocessed, pushback, upstream_failed) = match &result {
                Ok(Reply::Stream { .. }) => (Code::Ok, false, Pushback::Absent, false),
                Ok(Reply::TrailersOnly(status)) => (
                    status.code,
                    false,
                    Pushback::from_values(
                        status
                            .metadata
                            .get_all("grpc-retry-pushback-ms")
                            .iter()
                            .map(HeaderValue::as_bytes),
                    ),
                    // An upstream that answers at all is up; UNAVAILABLE is its way to say not.
                    status.code == Code::Unavailable,
                ),
                Err(e) => (
                    e.status.code,
                    e.unprocessed,
                    Pushback::Absent,
                    e.blame == Blame::Upstream,
                ),
            };
            let result = match result {
                // A streaming reply is settled when its stream ends.
                Ok(Reply::Stream { head, items }) => Ok(Reply::Stream {
                    head,
                    items: ticket.watch(items, abort.clone()),
                }),
                other => {
                    ticket.settle(now, upstream_failed);
                    other
                }
            };

            let Some(retry) = &policy.retry else {
                return result;
            };
            let outcome = AttemptOutcome {
                code,
                committed: false,
                idempotent: policy.idempotent,
                unprocessed,
                replay_overflowed: replay.is_some_and(Replay::overflowed),
                pushback,
                time_left: deadline.map(|at| at.saturating_duration_since(now)),
            };
            let decision = match (self.throttle.lock(), self.rng.lock()) {
                (Ok(mut throttle), Ok(mut rng)) => {
                    let decision =
                        retry.decide_throttled(&mut state, &outcome, &mut throttle, now, &mut *rng);
                    self.metrics.set_retry_tokens(throttle.tokens_left());
                    decision
                }
                _ => return result,
            };
            match decision {
                RetryDecision::GiveUp(reason) => {
                    if code != Code::Ok {
                        tracing::debug!(
                            attempts = state.attempts(),
                            reason = reason.as_str(),
                            "not retrying"
                        );
                    }
                    return result;
                }
                RetryDecision::Retry { after } => {
                    let reason = if unprocessed {
                        "unprocessed"
                    } else {
                        code_label(code)
                    };
                    self.metrics.retry(head.path.path(), job, reason);
                    retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(attempt = state.attempts() + 1, ?after, reason, "retrying");
                    tokio::time::sleep(after).await;
                }
            }
        }
    }

    /// Ask the breaker; an open circuit fails the call fast, before any I/O.
    fn admit(&self) -> Result<BreakerTicket, TransportError> {
        let cell = &self.breaker;
        let Ok(mut breaker) = cell.breaker.lock() else {
            return Ok(BreakerTicket::new(cell.clone(), None));
        };
        let admission = breaker.allow(Instant::now());
        cell.metrics
            .set_breaker_state(&cell.name, state_value(breaker.state()));
        match admission {
            BreakerAdmission::Allowed => Ok(BreakerTicket::new(cell.clone(), None)),
            BreakerAdmission::Probe => Ok(BreakerTicket::new(cell.clone(), breaker.probe())),
            BreakerAdmission::Rejected { retry_after } => Err(TransportError {
                status: Box::new(Status::new(
                    Code::Unavailable,
                    format!(
                        "pnp: circuit open for upstream {} after repeated failures; next probe in {} ms",
                        cell.name,
                        retry_after.as_millis()
                    ),
                )),
                blame: Blame::Proxy,
                unprocessed: true,
            }),
        }
    }
}

impl GuardedBreaker {
    fn report(&self, now: Instant, failed: bool) {
        let Ok(mut breaker) = self.breaker.lock() else {
            return;
        };
        let transition = if failed {
            breaker.on_failure(now)
        } else {
            breaker.on_success(now)
        };
        if let Some(transition) = transition {
            tracing::warn!(upstream = %self.name, ?transition, "circuit breaker");
            if let Some(sink) = self.events.get() {
                sink.emit(pnp_link::Event::BreakerChanged {
                    upstream: self.name.clone(),
                    state: state_name(breaker.state()).to_owned(),
                });
            }
        }
        self.metrics
            .set_breaker_state(&self.name, state_value(breaker.state()));
    }

    fn abandon(&self, probe: ProbeId, now: Instant) {
        let Ok(mut breaker) = self.breaker.lock() else {
            return;
        };
        if breaker.on_probe_abandoned(probe, now) {
            self.metrics.breaker_probe_abandoned(&self.name);
            tracing::info!(
                upstream = %self.name,
                "circuit breaker probe abandoned before an outcome; the next call probes"
            );
            self.metrics
                .set_breaker_state(&self.name, state_value(breaker.state()));
        }
    }
}

/// One attempt's account with the breaker: settled once with how the attempt went.
///
/// Settled explicitly for a failure or a Trailers-Only reply; a streaming reply carries it in
/// its items ([`BreakerTicket::watch`]) and it is settled by the stream's final status. A
/// ticket dropped unsettled (the caller went away, the client's side failed, or pnp ended the
/// call itself: a clock, shutdown) says nothing about the upstream and is not counted, except
/// that a half-open probe is reported as abandoned, so the next call probes instead of the
/// breaker waiting for an outcome that will never come.
pub(crate) struct BreakerTicket {
    breaker: Arc<GuardedBreaker>,
    /// This attempt is the half-open probe, still unsettled.
    probe: Option<ProbeId>,
    settled: bool,
}

impl BreakerTicket {
    fn new(breaker: Arc<GuardedBreaker>, probe: Option<ProbeId>) -> Self {
        Self {
            breaker,
            probe,
            settled: false,
        }
    }

    /// The attempt ended with `code` after its response headers: UNAVAILABLE, INTERNAL and
    /// UNKNOWN (how a reset, a lost connection or a stream cut without its status reach the
    /// client) count as the upstream's failure; any other status is the upstream answering.
    pub(crate) fn report(mut self, code: Code) {
        let failed = matches!(code, Code::Unavailable | Code::Internal | Code::Unknown);
        self.settle_mut(Instant::now(), failed);
    }

    fn settle(mut self, now: Instant, failed: bool) {
        self.settle_mut(now, failed);
    }

    fn settle_mut(&mut self, now: Instant, failed: bool) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.probe = None;
        self.breaker.report(now, failed);
    }

    /// A probe's stream delivered its first message: the upstream is serving again, so the
    /// probe settles now (closing the breaker) rather than holding it half-open for the whole
    /// stream. The stream's end is still reported, as an ordinary call.
    fn first_message(&mut self) {
        if self.probe.take().is_some() {
            self.breaker.report(Instant::now(), false);
        }
    }

    /// `items` that settle this ticket with their final status, unless the client's side
    /// failed first (`abort`): then the status is pnp resetting the upstream, not the
    /// upstream failing.
    fn watch(self, items: BoxReplyStream, abort: CallAbort) -> BoxReplyStream {
        Box::pin(Watched {
            ticket: Some(self),
            items,
            abort,
        })
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(probe) = self.probe.take() {
            self.breaker.abandon(probe, Instant::now());
        }
    }
}

/// A streaming reply's items, reporting its final status to the breaker.
struct Watched {
    // Declared first so it is dropped (reporting an abandoned probe) before the upstream
    // stream is reset.
    ticket: Option<BreakerTicket>,
    items: BoxReplyStream,
    abort: CallAbort,
}

impl Stream for Watched {
    type Item = ReplyItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        let this = self.get_mut();
        let item = ready!(this.items.as_mut().poll_next(cx));
        let code = match &item {
            Some(ReplyItem::Message(_) | ReplyItem::Head { .. }) => {
                if let Some(ticket) = this.ticket.as_mut() {
                    ticket.first_message();
                }
                return Poll::Ready(item);
            }
            Some(ReplyItem::Fragment { .. }) => return Poll::Ready(item),
            Some(ReplyItem::Status(status)) => status.code,
            // A stream that ends without a status reaches the client as INTERNAL.
            None => Code::Internal,
        };
        let ticket = this.ticket.take();
        // Once the client's side failed, the stream's end is pnp resetting the upstream, not
        // the upstream failing: the ticket goes unsettled (a probe is reported abandoned).
        if let (Some(ticket), false) = (ticket, this.abort.token().is_cancelled()) {
            ticket.report(code);
        }
        Poll::Ready(item)
    }
}

fn state_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed { .. } => "closed",
        BreakerState::HalfOpen { .. } => "half_open",
        BreakerState::Open { .. } => "open",
    }
}

fn state_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed { .. } => 0,
        BreakerState::HalfOpen { .. } => 1,
        BreakerState::Open { .. } => 2,
    }
}

/// Lower-case code names as label values.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use futures_util::StreamExt;
    use pnp_call::{Message, ResponseHead};

    use super::*;

    /// What the fake upstream answers, call by call.
    enum Answer {
        /// Headers, these items, then (if `hang`) nothing more, ever.
        Stream { items: Vec<ReplyItem>, hang: bool },
    }

    fn stream(items: Vec<ReplyItem>) -> Answer {
        Answer::Stream { items, hang: false }
    }

    fn status(code: Code) -> ReplyItem {
        ReplyItem::Status(Status::new(code, "scripted"))
    }

    /// A guarded upstream with the transport its calls go over.
    struct TestUpstream {
        guarded: GuardedUpstream,
        transport: Transport,
    }

    impl std::ops::Deref for TestUpstream {
        type Target = GuardedUpstream;

        fn deref(&self) -> &GuardedUpstream {
            &self.guarded
        }
    }

    fn upstream(answers: Vec<Answer>, failures: u32) -> (TestUpstream, Metrics) {
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let transport = tower::service_fn(move |_call: Call| {
            let answer = answers.lock().expect("lock").pop_front();
            async move {
                match answer {
                    Some(Answer::Stream { items, hang }) => {
                        let items = futures_util::stream::iter(items);
                        let items: BoxReplyStream = if hang {
                            Box::pin(items.chain(futures_util::stream::pending()))
                        } else {
                            Box::pin(items)
                        };
                        Ok(Reply::Stream {
                            head: ResponseHead::default(),
                            items,
                        })
                    }
                    None => Err(TransportError::upstream(Code::Unavailable, "no answer")),
                }
            }
        });
        let config = Resilience {
            breaker_failures: failures,
            breaker_base_penalty: Duration::from_millis(1),
            breaker_max_penalty: Duration::from_millis(1),
            ..Resilience::default()
        };
        let metrics = Metrics::new();
        let budget = BufferBudget::new(1 << 20, &metrics);
        let guarded =
            GuardedUpstream::new("up".into(), &config, budget, metrics.clone()).expect("valid");
        let transport: Transport = Arc::new(pnp_transport::ServiceTransport::new(
            pnp_transport::Kind::H2,
            tower::util::BoxCloneSyncService::new(transport),
        ));
        (TestUpstream { guarded, transport }, metrics)
    }

    fn policy() -> CallPolicy {
        CallPolicy {
            name: "test".into(),
            first_message: None,
            first_message_explicit: false,
            idle: None,
            idle_explicit: false,
            max_duration: None,
            retry: None,
            idempotent: false,
            degradable: false,
            max_message_size: None,
        }
    }

    async fn call(upstream: &TestUpstream) -> Result<Reply, TransportError> {
        call_with(upstream, CallAbort::default()).await
    }

    async fn call_with(upstream: &TestUpstream, abort: CallAbort) -> Result<Reply, TransportError> {
        let head = CallHead {
            path: "/a.B/C".parse().expect("path"),
            subtype: None,
            metadata: http::HeaderMap::new(),
            timeout: None,
            max_message_size: 4 << 20,
        };
        let messages: BoxMessageStream = Box::pin(futures_util::stream::empty());
        upstream
            .guarded
            .call(
                &upstream.transport,
                head,
                messages,
                &policy(),
                None,
                None,
                &AtomicU64::new(0),
                abort,
            )
            .await
    }

    /// The items of a streaming reply, read to the end.
    async fn drain(reply: Result<Reply, TransportError>) -> Vec<ReplyItem> {
        match reply {
            Ok(Reply::Stream { items, .. }) => items.collect().await,
            Ok(Reply::TrailersOnly(status)) => panic!("trailers-only {status:?}"),
            Err(e) => panic!("failed: {e}"),
        }
    }

    fn state(upstream: &GuardedUpstream) -> BreakerState {
        upstream.breaker.breaker.lock().expect("lock").state()
    }

    async fn until_the_penalty_is_served(upstream: &GuardedUpstream) {
        while let BreakerState::Open { until } = state(upstream) {
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            if Instant::now() >= until {
                break;
            }
        }
    }

    #[tokio::test]
    async fn streams_that_fail_after_their_headers_open_the_breaker() {
        let (upstream, _) = upstream(
            vec![
                stream(vec![status(Code::Internal)]),
                stream(vec![
                    ReplyItem::Message(Message::new("a")),
                    status(Code::Unavailable),
                ]),
            ],
            2,
        );
        drain(call(&upstream).await).await;
        assert_eq!(state(&upstream), BreakerState::Closed { failures: 1 });
        drain(call(&upstream).await).await;
        assert!(matches!(state(&upstream), BreakerState::Open { .. }));
    }

    #[tokio::test]
    async fn failures_count_only_in_a_row_and_other_statuses_are_successes() {
        let (upstream, _) = upstream(
            vec![
                stream(vec![status(Code::Internal)]),
                stream(vec![status(Code::NotFound)]),
                stream(vec![status(Code::Internal)]),
                stream(vec![
                    ReplyItem::Message(Message::new("a")),
                    status(Code::Ok),
                ]),
            ],
            2,
        );
        for _ in 0..4 {
            drain(call(&upstream).await).await;
        }
        assert_eq!(state(&upstream), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test]
    async fn a_stream_dropped_before_its_status_is_not_counted() {
        let (upstream, _) = upstream(
            vec![Answer::Stream {
                items: vec![],
                hang: true,
            }],
            1,
        );
        let reply = call(&upstream).await.expect("a reply");
        drop(reply);
        assert_eq!(state(&upstream), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test]
    async fn the_end_of_a_stream_whose_client_side_failed_is_not_counted() {
        let (upstream, _) = upstream(vec![stream(vec![status(Code::Internal)])], 1);
        let abort = CallAbort::default();
        let reply = call_with(&upstream, abort.clone()).await;
        // Bad input from the client: pnp resets the upstream stream, which then ends INTERNAL.
        abort.abort(Status::new(Code::Internal, "pnp: malformed request frame"));
        drain(reply).await;
        assert_eq!(state(&upstream), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test]
    async fn an_abandoned_probe_lets_the_next_call_probe() {
        let (upstream, metrics) = upstream(
            vec![
                stream(vec![status(Code::Unavailable)]),
                Answer::Stream {
                    items: vec![],
                    hang: true,
                },
                stream(vec![status(Code::Ok)]),
            ],
            1,
        );
        drain(call(&upstream).await).await;
        until_the_penalty_is_served(&upstream).await;
        let probe = call(&upstream).await.expect("the probe is let through");
        assert!(matches!(state(&upstream), BreakerState::HalfOpen { .. }));
        assert!(
            call(&upstream).await.is_err(),
            "one probe at a time: the second call fails fast"
        );
        // The probe's caller goes away before its status.
        drop(probe);
        let items = drain(call(&upstream).await).await;
        assert!(matches!(items.as_slice(), [ReplyItem::Status(s)] if s.code == Code::Ok));
        assert_eq!(state(&upstream), BreakerState::Closed { failures: 0 });
        assert!(
            metrics
                .encode()
                .contains(r#"pnp_breaker_probes_abandoned_total{upstream="up"} 1"#),
            "{}",
            metrics.encode()
        );
    }

    #[tokio::test]
    async fn a_streaming_probe_settles_at_its_first_message() {
        let (upstream, _) = upstream(
            vec![
                stream(vec![status(Code::Unavailable)]),
                Answer::Stream {
                    items: vec![ReplyItem::Message(Message::new("token"))],
                    hang: true,
                },
            ],
            1,
        );
        drain(call(&upstream).await).await;
        until_the_penalty_is_served(&upstream).await;
        let Ok(Reply::Stream { mut items, .. }) = call(&upstream).await else {
            panic!("the probe streams");
        };
        assert!(matches!(state(&upstream), BreakerState::HalfOpen { .. }));
        assert!(matches!(items.next().await, Some(ReplyItem::Message(_))));
        assert_eq!(
            state(&upstream),
            BreakerState::Closed { failures: 0 },
            "closed while the probe still streams"
        );
    }
}
