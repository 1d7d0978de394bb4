//! The atomics the ring's index logic uses: std's, or loom's under `--cfg loom` so that
//! `tests/loom.rs` can model-check the same code.

#![forbid(unsafe_code)]

#[cfg(loom)]
pub(crate) use loom::sync::atomic::AtomicU64;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::AtomicU64;

pub(crate) use std::sync::atomic::Ordering;
