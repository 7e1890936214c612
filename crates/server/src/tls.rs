//! NBD over TLS: the server's credentials and the policy of
//! `serve --tls-cert --tls-key [--tls-ca] [--tls off|optional|require]`.
//!
//! - rustls with the *ring* provider only (no aws-lc), TLS 1.2 and 1.3
//!   (rustls' safe defaults; `doc/proto.md` asks for 1.2 at least).
//! - With a CA, every client must present a certificate that chains to it
//!   (`WebPkiClientVerifier`); without one, any client may connect and the
//!   TLS session only encrypts.
//! - The handshake (`parallax_nbd::handshake`) enforces the mode: with
//!   `require`, nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is
//!   answered before TLS runs.
//! - External PSK (QEMU's `tls-creds-psk`, libnbd's `tls-psk-file`) is not
//!   offered: rustls does not implement it.
//!
//! Certificates are read at startup and again on SIGHUP
//! ([`NbdTls::reload`]): new connections get the new ones, connections
//! already in TLS keep their session; a reload that fails keeps the old
//! credentials. The mode cannot change without a restart.

use anyhow::{bail, Context, Result};
pub use parallax_nbd::handshake::TlsMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Where the credentials come from (the `serve` flags).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that clients' certificates must chain to.
    pub ca: Option<PathBuf>,
}

/// The daemon's TLS policy and, unless it is off, what runs the sessions.
pub struct NbdTls {
    pub mode: TlsMode,
    /// Present exactly when `mode` is not `Off`; replaced by a reload.
    acceptor: parking_lot::RwLock<Option<TlsAcceptor>>,
    /// Clients must present a certificate.
    pub verifies_clients: bool,
    /// Where the credentials were read from, for [`NbdTls::reload`].
    files: TlsFiles,
}

impl NbdTls {
    /// No TLS.
    pub fn off() -> NbdTls {
        NbdTls {
            mode: TlsMode::Off,
            acceptor: parking_lot::RwLock::new(None),
            verifies_clients: false,
            files: TlsFiles::default(),
        }
    }

    /// What runs a TLS session now (`None` with TLS off).
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.acceptor.read().clone()
    }

    /// Reads the certificate, key and CA files again; on success, new TLS
    /// sessions use them. On failure nothing changes.
    pub fn reload(&self) -> Result<()> {
        if self.mode == TlsMode::Off {
            bail!("TLS is off");
        }
        let acceptor = acceptor(&self.files)?;
        *self.acceptor.write() = Some(acceptor);
        Ok(())
    }

    /// The policy for `mode` (`None`: `require` when a certificate is
    /// given, else `off`) with the credentials in `files`.
    pub fn load(mode: Option<TlsMode>, files: &TlsFiles) -> Result<NbdTls> {
        let mode = mode.unwrap_or(if files.cert.is_some() {
            TlsMode::Require
        } else {
            TlsMode::Off
        });
        if mode == TlsMode::Off {
            if files.cert.is_some() || files.key.is_some() || files.ca.is_some() {
                bail!("--tls off with TLS files given: drop the files or the --tls off");
            }
            return Ok(NbdTls::off());
        }
        Ok(NbdTls {
            mode,
            acceptor: parking_lot::RwLock::new(Some(acceptor(files)?)),
            verifies_clients: files.ca.is_some(),
            files: files.clone(),
        })
    }

    /// `off`, `optional` or `require`, as the flag spells it.
    pub fn mode_name(&self) -> &'static str {
        mode_name(self.mode)
    }
}

/// A TLS server for the credentials in `files`.
fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        bail!("TLS needs both --tls-cert and --tls-key");
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("bad CA certificate in {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .with_context(|| format!("cannot verify clients with {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let config = builder
        .with_single_cert(read_certs(cert)?, key_der)
        .with_context(|| {
            format!(
                "certificate {} and key {} do not make a server identity",
                cert.display(),
                key.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// `off`, `optional` or `require`.
pub fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Off => "off",
        TlsMode::Optional => "optional",
        TlsMode::Require => "require",
    }
}

/// The `--tls` flag's value.
pub fn parse_mode(s: &str) -> Result<TlsMode, String> {
    match s {
        "off" => Ok(TlsMode::Off),
        "optional" => Ok(TlsMode::Optional),
        "require" => Ok(TlsMode::Require),
        _ => Err(format!("'{s}': expected off, optional or require")),
    }
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_need_the_files_they_use() {
        let none = TlsFiles::default();
        assert_eq!(NbdTls::load(None, &none).unwrap().mode, TlsMode::Off);
        let e = NbdTls::load(Some(TlsMode::Require), &none).err().unwrap();
        assert!(
            format!("{e:#}").contains("--tls-cert and --tls-key"),
            "{e:#}"
        );
        let half = TlsFiles {
            cert: Some("/nonexistent/cert.pem".into()),
            ..TlsFiles::default()
        };
        assert!(NbdTls::load(None, &half).is_err());
        let e = NbdTls::load(Some(TlsMode::Off), &half).err().unwrap();
        assert!(format!("{e:#}").contains("--tls off"), "{e:#}");
        let missing = TlsFiles {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
            ca: None,
        };
        let e = NbdTls::load(None, &missing).err().unwrap();
        assert!(format!("{e:#}").contains("/nonexistent/"), "{e:#}");
        assert_eq!(parse_mode("require"), Ok(TlsMode::Require));
        assert!(parse_mode("on").is_err());
    }
}
