//! Plain data types of a call.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http::HeaderMap;

use crate::Status;

/// One gRPC message: the payload as it travelled, with its compressed flag. Payloads are never
/// re-encoded unless a protocol demands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Whether the payload is compressed with the call's `grpc-encoding`.
    pub compressed: bool,
    /// The serialized (possibly compressed) message.
    pub data: Bytes,
}

impl Message {
    /// An uncompressed message.
    pub fn new(data: impl Into<Bytes>) -> Self {
        Self {
            compressed: false,
            data: data.into(),
        }
    }
}

/// Messages longer than this travel through pnp as a [`Part::Head`] and [`Part::Fragment`]s, so
/// memory is bounded by flow-control windows, never by message size; shorter ones stay whole.
pub const FRAGMENT_THRESHOLD: usize = 64 * 1024;

/// One piece of a message stream: a whole message, or a large message as a head and fragments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// A whole message.
    Message(Message),
    /// The start of a large message: its compressed flag and length (within the call's limit).
    Head {
        /// Whether the payload is compressed.
        compressed: bool,
        /// The payload's length in bytes.
        len: u32,
    },
    /// The next bytes of the message begun by the last head; never empty. The fragments of a
    /// message add up to its length exactly; `last` marks the one that completes it.
    Fragment {
        /// The bytes.
        data: Bytes,
        /// This fragment completes the message.
        last: bool,
    },
}

impl Part {
    /// Payload bytes this part carries.
    pub fn payload_len(&self) -> usize {
        match self {
            Part::Message(message) => message.data.len(),
            Part::Head { .. } => 0,
            Part::Fragment { data, .. } => data.len(),
        }
    }

    /// Whether this part begins a message (a whole one or a head).
    pub fn starts_message(&self) -> bool {
        !matches!(self, Part::Fragment { .. })
    }
}

/// What identifies a call and travels ahead of its messages.
#[derive(Clone, Debug)]
pub struct CallHead {
    /// `/package.Service/Method`, without query.
    pub path: http::uri::PathAndQuery,
    /// Message subtype after `application/grpc+`, e.g. `proto`; `None` for plain `application/grpc`.
    pub subtype: Option<String>,
    /// Custom metadata as the client sent it (reserved and hop-by-hop headers removed).
    pub metadata: HeaderMap,
    /// Time left for the call when it reached this hop, from `grpc-timeout`.
    pub timeout: Option<Duration>,
    /// Largest message accepted in either direction (the call's profile, or the global limit).
    pub max_message_size: usize,
}

impl CallHead {
    /// The `package.Service` part of the path, if the path has the gRPC shape.
    pub fn service(&self) -> Option<&str> {
        let path = self.path.path().strip_prefix('/')?;
        path.split_once('/').map(|(service, _)| service)
    }

    /// The method name part of the path, if the path has the gRPC shape.
    pub fn method(&self) -> Option<&str> {
        let path = self.path.path().strip_prefix('/')?;
        path.split_once('/').map(|(_, method)| method)
    }
}

/// A boxed stream of request messages, whole or in parts. An `Err` ends the call: the ingress saw
/// bad input or the client went away, and the status says which.
pub type BoxMessageStream = Pin<Box<dyn Stream<Item = Result<Part, Status>> + Send>>;

/// A call on its way to an egress transport.
pub struct Call {
    /// The head.
    pub head: CallHead,
    /// The request messages.
    pub messages: BoxMessageStream,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("head", &self.head).finish()
    }
}

impl From<Part> for ReplyItem {
    fn from(part: Part) -> Self {
        match part {
            Part::Message(message) => ReplyItem::Message(message),
            Part::Head { compressed, len } => ReplyItem::Head { compressed, len },
            Part::Fragment { data, last } => ReplyItem::Fragment { data, last },
        }
    }
}

/// One item of a reply stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyItem {
    /// A response message.
    Message(Message),
    /// The start of a large response message (see [`Part::Head`]).
    Head {
        /// Whether the payload is compressed.
        compressed: bool,
        /// The payload's length in bytes.
        len: u32,
    },
    /// The next bytes of a large response message (see [`Part::Fragment`]).
    Fragment {
        /// The bytes; never empty.
        data: Bytes,
        /// This fragment completes the message.
        last: bool,
    },
    /// The final status; nothing follows it.
    Status(Status),
}

/// A boxed stream of reply items. It should end right after one [`ReplyItem::Status`];
/// [`ReplyGuard`](crate::ReplyGuard) turns any other ending into an error status.
pub type BoxReplyStream = Pin<Box<dyn Stream<Item = ReplyItem> + Send>>;

/// Response metadata that precedes the messages.
#[derive(Clone, Debug, Default)]
pub struct ResponseHead {
    /// Custom response metadata.
    pub metadata: HeaderMap,
    /// Message subtype the upstream answered with, if any.
    pub subtype: Option<String>,
}

/// What an egress transport returns for a call.
pub enum Reply {
    /// Headers, then messages, then one status.
    Stream {
        /// Response metadata.
        head: ResponseHead,
        /// Messages ending with a status.
        items: BoxReplyStream,
    },
    /// A status with no messages (gRPC "Trailers-Only"). Carries the response metadata that
    /// came with it inside `Status::metadata`.
    TrailersOnly(Status),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Stream { head, .. } => {
                f.debug_struct("Reply::Stream").field("head", head).finish()
            }
            Reply::TrailersOnly(status) => {
                f.debug_tuple("Reply::TrailersOnly").field(status).finish()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_method_split_the_path() {
        let head = CallHead {
            path: "/grpc.testing.TestService/UnaryCall"
                .parse()
                .expect("valid path"),
            subtype: None,
            metadata: HeaderMap::new(),
            timeout: None,
            max_message_size: 4 << 20,
        };
        assert_eq!(head.service(), Some("grpc.testing.TestService"));
        assert_eq!(head.method(), Some("UnaryCall"));
    }

    #[test]
    fn odd_paths_have_no_service() {
        let head = CallHead {
            path: "/health".parse().expect("valid path"),
            subtype: None,
            metadata: HeaderMap::new(),
            timeout: None,
            max_message_size: 4 << 20,
        };
        assert_eq!(head.service(), None);
        assert_eq!(head.method(), None);
    }
}
