//! The NBD (Network Block Device) protocol, without I/O.
//!
//! - [`proto`]: wire constants, the request header decoder and the reply
//!   encoders of the transmission phase.
//! - [`handshake`]: the server side of fixed newstyle negotiation as a
//!   sans-IO state machine: bytes in, bytes out, an outcome.
//! - [`client`]: decoders of what a server sends, for a client doing its
//!   own I/O (`parallax-device`'s NBD pool backend).
//!
//! Reference: the protocol document `doc/proto.md` of the
//! NetworkBlockDevice/nbd project. What we implement is a subset: fixed
//! newstyle only, no TLS, structured replies, the `base:allocation`
//! metadata context, no extended headers.
//!
//! Invariants for the whole crate: no `unsafe`, no I/O, and no panic on
//! any input: every decoder reads untrusted bytes through bounds-checked
//! accessors and reports malformed input as an error or a protocol-level
//! error reply. Encoders only append to the caller's buffer.

#![forbid(unsafe_code)]

pub mod client;
pub mod handshake;
pub mod proto;

// Everything is also available at the crate root.
pub use handshake::*;
pub use proto::*;
