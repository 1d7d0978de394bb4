//! Shared-memory rings between pnp's control plane and data plane (issue #14).
//!
//! The two planes run as two processes that meet only through two rings: commands flow down
//! (each with a sequence number that the data plane acknowledges), events and stats flow up.
//! A ring is a single-producer single-consumer queue of variable-length records in a file that
//! both processes map: under `/dev/shm` on a host, on an `emptyDir` with `medium: Memory`
//! shared by two containers of a pod in Kubernetes.
//!
//! ```no_run
//! use std::time::Duration;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Control plane: the writer of the command ring.
//! let mut commands = pnp_ring::Writer::create_or_open("/dev/shm/pnp-commands", 1 << 20)?;
//! let seq = commands.push_timeout(b"apply-profile ...", Duration::from_secs(1))?;
//! // Data plane: its reader (usually `reader.recv().await` in a task).
//! let mut reader = pnp_ring::Reader::create_or_open("/dev/shm/pnp-commands", 1 << 20)?;
//! let record = reader.recv_timeout(Duration::from_millis(10))?.expect("a record");
//! assert_eq!((record.seq, &record.payload[..]), (seq, &b"apply-profile ..."[..]));
//! # Ok(()) }
//! ```
//!
//! # What it guarantees
//! - **Whole records, in order, none lost or repeated** while both ends follow the protocol:
//!   a record is published by a `Release` store of the write position after its bytes are
//!   written, and read after an `Acquire` load of it. Each record carries a CRC-32 checked on
//!   receipt, as a second line of defence.
//! - **Never overwrites unread data.** A full ring refuses the record
//!   ([`PushError::Full`]); the caller decides: drop a stats sample, wait for a command
//!   ([`Writer::push_timeout`], [`Writer::push`]).
//! - **A killed writer leaves the reader consistent.** Its half-written record was never
//!   published, so the reader never sees it. A restarted writer re-attaches to the same file
//!   (magic, version and capacity checked), continues at the published position with the next
//!   sequence number and a new epoch, which its records carry ([`Record::epoch`]).
//! - **A killed reader loses nothing that it had not taken.** A restarted reader resumes at
//!   the stored read position; see [`Reader`] for at-most-once vs at-least-once.
//! - **One writer and one reader at a time**, enforced by a lock on each end that the kernel
//!   drops when the holder dies ([`OpenError::Busy`]).
//!
//! Waiting is by polling with back-off (a spin, a few yields, then sleeps from 50 µs up to
//! 1 ms): no futex, no eventfd, nothing that needs both processes to cooperate on a wake-up.
//! The crate's README has the measured throughput and latency.
//!
//! # Why its own ring and not iceoryx2
//! The issue allowed either. iceoryx2 is a well-kept zero-copy IPC framework, but it brings
//! its own model of services and nodes, its own config and shared-memory naming, typed
//! zero-copy payloads and a larger dependency tree, while we need one byte queue per
//! direction, in a file whose path we choose (an `emptyDir`), with crash semantics we can
//! state in a paragraph and test by killing a process: "published means whole; a restarted
//! end continues where the file says". This ring is about a thousand lines over `memmap2`
//! (the index logic, `spsc.rs`, under 300), its `unsafe` is confined to one module (`raw`,
//! with its invariants listed there), and its index logic is model-checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test -p pnp-ring --test loom --release`).
//!
//! It is **not** a general IPC layer: no multiple producers or consumers, no zero-copy
//! borrowing of shared memory (records are copied in and out), no encoding of the payload
//! (that is the protocol's business), Unix only.

#![deny(unsafe_code)]
// Under loom only the index logic and the model are built; the file-backed ends are not.
#![cfg_attr(loom, allow(dead_code))]

mod backoff;
mod error;
mod layout;
mod raw;
mod region;
mod spsc;
mod sync;

#[cfg(not(loom))]
mod open;
#[cfg(not(loom))]
mod reader;
#[cfg(not(loom))]
mod writer;

#[cfg(loom)]
#[doc(hidden)]
pub mod model;

pub use error::{Corruption, OpenError, PushError, RecvError, Role};
pub use layout::{MAX_CAPACITY, MIN_CAPACITY, RECORD_HEADER_LEN};
#[cfg(not(loom))]
pub use reader::{Reader, Record};
pub use spsc::RecordRef;
#[cfg(not(loom))]
pub use writer::Writer;
