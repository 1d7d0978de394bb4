//! The call model of pnp.
//!
//! A call is a [`CallHead`], a stream of request [`Message`]s and a [`Reply`]: response metadata, a
//! stream of response messages and exactly one final [`Status`]. Ingress adapters build calls from
//! whatever protocol arrived; egress transports carry them to the next hop. This crate knows
//! nothing of sockets, tokio or hyper, and reads no clock: deadlines travel as durations and the
//! driver that owns a clock turns them into instants.
//!
//! [`ReplyGuard`] is the one place that enforces the failure rule of `DESIGN.md`: every reply ends
//! with exactly one status, and a reply stream that ends without one is an error, never OK.
#![forbid(unsafe_code)]

mod guard;
mod model;

pub use guard::{GuardEvent, ReplyGuard};
pub use model::{
    BoxMessageStream, BoxReplyStream, Call, CallHead, Message, Part, Reply, ReplyItem,
    ResponseHead, FRAGMENT_THRESHOLD,
};
pub use pnp_wire::status::{Code, Status};
