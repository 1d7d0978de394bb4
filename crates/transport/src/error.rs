//! Transport failures, with blame and retry safety.

use std::error::Error as StdError;

use pnp_call::{Code, Status};

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong or went away.
    Client,
    /// The upstream refused, reset, crashed or spoke nonsense.
    Upstream,
    /// pnp itself (configuration, a limit it enforces).
    Proxy,
}

/// A call that could not get a reply (or whose reply broke), as the client will see it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{status_code}: {message}", status_code = status.code.name(), message = status.message)]
pub struct TransportError {
    /// The status to report (boxed: a status carries a header map).
    pub status: Box<Status>,
    /// Who caused it.
    pub blame: Blame,
    /// True when the request provably never reached the upstream application (connect refused,
    /// `REFUSED_STREAM`, GOAWAY above our stream): retrying is safe even for non-idempotent calls.
    pub unprocessed: bool,
}

impl TransportError {
    /// A failure with the given code and message, blamed on the upstream.
    pub fn upstream(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: Box::new(Status::new(code, message)),
            blame: Blame::Upstream,
            unprocessed: false,
        }
    }

    /// Classify an error from hyper / h2 / the connector into the status the client sees.
    ///
    /// PROTOCOL-HTTP2.md "Errors": RST_STREAM codes map to gRPC codes; a connection that could
    /// not be made or that died is UNAVAILABLE.
    pub fn from_http(err: &(dyn StdError + 'static), context: &str) -> Self {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        let mut connect = false;
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                if let Some(reason) = h2.reason() {
                    let code = Code::from_h2_reason(u32::from(reason));
                    let refused = reason == h2::Reason::REFUSED_STREAM;
                    let remote = h2.is_remote();
                    let unprocessed = refused || (h2.is_go_away() && remote && !h2.is_reset());
                    let text = if h2.is_go_away() {
                        format!("{context}: upstream closed the connection (GOAWAY {reason:?})")
                    } else {
                        format!("{context}: upstream reset the stream ({reason:?})")
                    };
                    return Self {
                        status: Box::new(Status::new(code, text)),
                        blame: Blame::Upstream,
                        unprocessed,
                    };
                }
                if h2.is_io() {
                    return Self::upstream(
                        Code::Unavailable,
                        format!("{context}: upstream connection lost ({h2})"),
                    );
                }
            }
            if let Some(client) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                connect |= client.is_connect();
            }
            if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
                // Canceled: the connection closed before the request was sent.
                connect |= hyper.is_canceled();
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                let text = format!("{context}: upstream connection failed ({io})");
                return Self {
                    status: Box::new(Status::new(Code::Unavailable, text)),
                    blame: Blame::Upstream,
                    unprocessed: connect,
                };
            }
            source = e.source();
        }
        Self {
            status: Box::new(Status::new(
                Code::Unavailable,
                format!("{context}: {}", chain(err)),
            )),
            blame: Blame::Upstream,
            unprocessed: connect,
        }
    }
}

/// An error and its sources as one line.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}
