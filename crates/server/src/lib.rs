//! The Parallax appliance and the operations behind the `parallax` command.
//!
//! - [`api`]: the management operations as one trait, and their JSON types.
//! - [`service`]: those operations on a store this process holds, and the
//!   table of live NBD connections.
//! - [`client`]: the same operations sent to a running daemon.
//! - [`control`]: the daemon's HTTP/JSON control socket (`docs/API.md`).
//! - [`nbd`]: the NBD transmission phase and listeners, over
//!   `parallax-nbd`'s pure protocol codec.
//! - [`daemon`]: `parallax serve`: startup, signals, clean shutdown.
//! - [`scheduler`]: the daemon's snapshot schedules.
//! - [`store_file`]: finding, locking, creating and opening the store file.
//! - [`transfer`]: import from and export to image files.

pub mod api;
pub mod client;
pub mod control;
pub mod daemon;
pub mod nbd;
pub mod scheduler;
pub mod service;
pub mod store_file;
pub mod transfer;
pub mod uring;

/// The error and its causes on one line, leaving out causes whose text
/// the message already contains (engine errors repeat their source).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_drops_repeated_causes() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io).context("while reading: disk on fire");
        assert_eq!(one_line(&e), "while reading: disk on fire");
        let e = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(one_line(&e), "outer: inner second line");
    }
}
