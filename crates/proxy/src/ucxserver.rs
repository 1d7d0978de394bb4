//! The UCX listener (`listener.ucx`, `--listen-ucx`): calls from peer pnp instances whose
//! upstream is `ucx://`, served through the same service as every other listener's
//! ([`crate::callserver`]): profile, admission, clocks, negotiation, retries and metrics apply
//! as to any call. On shutdown the listener stops taking calls (the peers get a go-away and
//! send new calls elsewhere) and its calls in flight run on until they end or the grace period
//! ends them; then the listener closes.

use pnp_ucx::{IncomingCall, UcxListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::callserver::{serve_call, CallService};

/// Take calls from `listener` until `stop`, then drain.
pub(crate) async fn serve(
    mut listener: UcxListener,
    service: CallService,
    stop: CancellationToken,
) {
    let calls = TaskTracker::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            incoming = listener.accept() => match incoming {
                Some(incoming) => {
                    calls.spawn(serve_one(service.clone(), incoming));
                }
                None => break,
            },
        }
    }
    listener.drain();
    calls.close();
    // The calls end on their own, or when the proxy's grace period ends them; the listener
    // (its UCX worker) lives until then.
    calls.wait().await;
    // The listener (and its UCX worker) goes only now.
    let _ = listener.local_addr();
}

async fn serve_one(service: CallService, incoming: IncomingCall) {
    let IncomingCall { call, reply, peer } = incoming;
    let served = serve_call(service, call, peer);
    tokio::select! {
        answer = served => reply.send(Ok(answer)).await,
        // The edge cancelled before the answer: dropping the call's future cancels upstream.
        () = reply.cancelled() => {}
    }
}
