//! What can go wrong: opening a ring, pushing a record, receiving one.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Which end of a ring a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The single producer.
    Writer,
    /// The single consumer.
    Reader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        })
    }
}

/// The shared state broke a rule that a well-behaved writer and reader keep. It means a bug, a
/// third process writing into the file, or a file that is not what its header says.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Corruption {
    /// The positions cannot describe a ring: the reader is ahead of the writer, more than a
    /// capacity behind it, or the writer is past 2^63 bytes.
    #[error("ring positions are impossible: read {read}, write {write}, capacity {capacity}")]
    Positions {
        /// The read position.
        read: u64,
        /// The write position.
        write: u64,
        /// The data area's size.
        capacity: u64,
    },
    /// A record claims more bytes than the writer published after it.
    #[error("record at position {pos} claims {len} bytes but only {available} are published")]
    RecordLength {
        /// Where the record starts.
        pos: u64,
        /// Header and payload bytes the record claims.
        len: u64,
        /// Bytes published from `pos` on.
        available: u64,
    },
    /// A record's checksum does not match its bytes. The reader has stepped over it.
    #[error("record {seq} at position {pos} fails its checksum; it was skipped")]
    Checksum {
        /// Where the record started.
        pos: u64,
        /// The sequence number its header claims.
        seq: u64,
    },
    /// A writer that died between writing a record and publishing it left a half-committed
    /// sequence number that does not match the record it wrote.
    #[error("the uncommitted record at position {pos} does not match the sequence position")]
    UncommittedRecord {
        /// The write position, where the uncommitted record starts.
        pos: u64,
    },
}

/// Opening or attaching to a ring failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The file could not be created, opened, sized, locked or mapped.
    #[error("ring file {path}: {source}")]
    Io {
        /// The ring file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// Another live process (or another handle in this one) holds this end of the ring.
    #[error("ring file {path}: another {role} is attached")]
    Busy {
        /// The ring file.
        path: PathBuf,
        /// The end that is taken.
        role: Role,
    },
    /// The file is not a pnp ring (wrong magic, header length or size) or not of this version.
    #[error("ring file {path} is not a pnp ring of version {version}: {reason}")]
    NotARing {
        /// The ring file.
        path: PathBuf,
        /// The layout version this build speaks.
        version: u64,
        /// What did not match.
        reason: String,
    },
    /// The ring exists with another capacity than the one asked for.
    #[error("ring file {path} has capacity {found}, not the {wanted} asked for")]
    CapacityMismatch {
        /// The ring file.
        path: PathBuf,
        /// The capacity in the file.
        found: u64,
        /// The capacity asked for.
        wanted: u64,
    },
    /// The capacity asked for is not a power of two between
    /// [`MIN_CAPACITY`](crate::MIN_CAPACITY) and [`MAX_CAPACITY`](crate::MAX_CAPACITY).
    #[error("ring capacity {0} is not a power of two between 64 B and 1 GiB")]
    BadCapacity(usize),
    /// The shared state is inconsistent; attaching would make it worse.
    #[error("ring file {path}: {corruption}")]
    Corrupt {
        /// The ring file.
        path: PathBuf,
        /// What is wrong.
        corruption: Corruption,
    },
}

/// [`Writer::try_push`](crate::Writer::try_push) and its waiting forms did not publish the
/// record. Nothing was written that the reader can see.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PushError {
    /// The reader has not freed enough room yet. Nothing unread is ever overwritten: drop the
    /// record (stats), or wait and retry (commands).
    #[error("ring is full: {needed} bytes needed, {free} free")]
    Full {
        /// Bytes the record takes (header and payload).
        needed: usize,
        /// Bytes free now.
        free: usize,
    },
    /// The record can never fit: its payload is larger than
    /// [`Writer::max_payload`](crate::Writer::max_payload).
    #[error("record payload of {len} bytes exceeds the ring's largest, {max}")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The largest payload this ring takes.
        max: usize,
    },
    /// The reader's position is impossible; the ring needs to be recreated.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
}

/// Receiving failed. The record (if any) is lost; the ring is still usable unless the error is
/// [`Corruption::Positions`] or [`Corruption::RecordLength`], after which only
/// [`Reader::skip_to_end`](crate::Reader::skip_to_end) moves on.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RecvError {
    /// The shared state broke the ring's rules.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
}
