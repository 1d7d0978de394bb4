//! Pure resilience decisions for pnp: the "decide" half of the policy stack.
//!
//! Each module answers one question a tower layer in the data plane asks about a call or an
//! upstream: how long to wait for request headers ([`header_timeout`]), for the first response
//! message ([`first_message`]), for the whole call ([`deadline`]) and between messages
//! ([`idle`]); whether and when to retry ([`retry`], [`backoff`], [`throttle`]); whether an
//! upstream may be called at all ([`breaker`]); whether to admit, degrade or shed a new call
//! ([`shed`], fed by [`latency`]); when to send an HTTP/2 keepalive PING ([`keepalive`]); and
//! which of a peer's transports carries a job's next call ([`negotiate`]).
//!
//! This crate is **not** the layers themselves. It is sans-IO in the sense of `quinn-proto`:
//! it reads no clock (time comes in as [`std::time::Instant`] and [`std::time::Duration`]
//! values), sleeps on nothing, spawns nothing, depends on no async runtime, and draws random
//! numbers only from an RNG the caller passes in or seeds. The same inputs give the same
//! decisions, so every rule is unit-tested, property-tested and simulated with seeded RNGs in
//! microseconds. The layers that own the clocks, the sockets and the locks live in `pnp-proxy`.
//!
//! Settings are validated once, when a policy is built (`*::new` returns a [`PolicyError`]
//! naming the setting); after that, decisions cannot fail and never panic, whatever the
//! network sends (zero, huge or out-of-order times included).
//!
//! Specs cited: gRFC A6 (client retries, retry throttling, pushback), gRFC A8 (client-side
//! keepalive), gRPC `doc/PROTOCOL-HTTP2.md` (`grpc-timeout`).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod breaker;
pub mod deadline;
mod duration_math;
mod error;
pub mod first_message;
pub mod header_timeout;
pub mod idle;
pub mod keepalive;
pub mod latency;
pub mod negotiate;
pub mod retry;
pub mod shed;
pub mod throttle;

pub use error::PolicyError;
pub use pnp_wire::status::Code;
