//! The Parallax appliance and the operations behind the `parallax` command.
//!
//! - [`api`]: the management operations as one trait, and their JSON types.
//! - [`service`]: those operations on a store this process holds, and the
//!   table of live NBD connections.
//! - [`client`]: the same operations sent to a running daemon.
//! - [`control`]: the daemon's HTTP/JSON control socket (`docs/API.md`).
//! - [`nbd`]: the NBD transmission phase and listeners, over
//!   `parallax-nbd`'s pure protocol codec.
//! - [`metrics`]: the daemon's Prometheus metrics.
//! - [`daemon`]: `parallax serve`: startup, signals, clean shutdown.
//! - [`scheduler`]: the daemon's snapshot schedules.
//! - [`store_file`]: finding, locking, creating and opening the store file.
//! - [`tls`]: NBD over TLS: credentials and policy.
//! - [`transfer`]: import from and export to image files.
//! - [`replication`]: `diff`, and `send`/`receive` of snapshots between stores.

pub mod api;
pub mod client;
pub mod cluster;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod nbd;
pub mod replication;
pub mod scheduler;
pub mod service;
pub mod store_file;
pub mod stream_body;
pub mod tls;
pub mod transfer;
pub mod uring;
pub mod vhost_user;

/// The error and its causes on one line.
pub fn one_line(error: &anyhow::Error) -> String {
    // Every error of the workspace prints its cause once (in its message or
    // as its source, never both), so the chain joined is the whole story.
    format!("{error:#}").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_the_chain_once() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io).context("while reading");
        assert_eq!(one_line(&e), "while reading: disk on fire");
        let engine = parallax_engine::Error::Io {
            context: "reading block 7".into(),
            error: std::io::Error::other("disk on fire"),
        };
        let e = anyhow::Error::new(engine).context("cannot export x");
        assert_eq!(
            one_line(&e),
            "cannot export x: I/O error while reading block 7: disk on fire"
        );
        let e = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(one_line(&e), "outer: inner second line");
    }
}
