//! A per-call signal that the proxy itself has ended the call, with the status to report.

use std::sync::{Arc, Mutex};

use pnp_call::{Code, Status};
use tokio_util::sync::CancellationToken;

/// Set once by whoever ends the call first (for example the request decoder on bad input);
/// the reply driver waits on it and reports the stored status.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallAbort {
    token: CancellationToken,
    status: Arc<Mutex<Option<Status>>>,
}

impl CallAbort {
    /// End the call with `status`, unless it was ended already.
    pub(crate) fn abort(&self, status: Status) {
        if let Ok(mut slot) = self.status.lock() {
            if slot.is_none() {
                *slot = Some(status);
            }
        }
        self.token.cancel();
    }

    /// The token that fires on abort.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The status the call was ended with.
    pub(crate) fn status(&self) -> Option<Status> {
        self.status.lock().ok().and_then(|slot| slot.clone())
    }

    /// The status to report once the token fired.
    pub(crate) fn status_or_cancelled(&self) -> Status {
        self.status()
            .unwrap_or_else(|| Status::new(Code::Cancelled, "pnp: call aborted"))
    }
}
