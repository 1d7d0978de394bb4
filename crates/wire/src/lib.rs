//! Sans-IO codecs for gRPC and gRPC-Web.
//!
//! This crate turns bytes into protocol values and back: the 5-byte length-prefixed message
//! frames of gRPC ([`frame`]), the gRPC-Web trailer frame and its header block ([`trailers`]),
//! the incremental base64 of `application/grpc-web-text` ([`text`]), call status with its
//! percent-encoded message ([`status`]), `grpc-timeout` ([`timeout`]), `-bin` metadata values
//! ([`metadata`]) and content-type negotiation ([`content_type`]).
//!
//! It is **not** a transport: it does no I/O, reads no clock, spawns nothing and depends on
//! neither tokio nor hyper. Callers push bytes in and pull values out, so every codec can be
//! unit-tested, property-tested and fuzzed in microseconds. It never decompresses or parses
//! message payloads either; those stay opaque [`bytes::Bytes`].
//!
//! Specs cited in comments: gRPC `doc/PROTOCOL-HTTP2.md`, `doc/PROTOCOL-WEB.md` and
//! `doc/http-grpc-status-mapping.md`.
#![forbid(unsafe_code)]

pub mod content_type;
pub mod frame;
pub mod metadata;
pub mod status;
pub mod text;
pub mod timeout;
pub mod trailers;

#[doc(hidden)]
pub mod fuzzing;
