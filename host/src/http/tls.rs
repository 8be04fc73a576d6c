//! HTTPS for the listeners: the certificate chain and key from PEM files, read at start
//! and again whenever they change on disk (a renewed certificate needs no restart), and
//! the optional client-certificate check that `/admin/` relies on.
//!
//! Owns: reading the PEM files and the rustls configuration made of them. Must not touch:
//! connections (the listener hands each one to the acceptor of the moment) or what a
//! verified client may do (auth).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use notify::RecursiveMode;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::watch::{Watch, WatchError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path} (server.tls): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} (server.tls.{key}) holds no PEM certificate: {reason}")]
    Certificates {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("{path} (server.tls.key) holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("server.tls: the certificate {cert} and key {key} do not make a TLS server: {reason}")]
    Server {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Watch(#[from] WatchError),
}

/// The listeners' TLS: the acceptor of the moment, replaced whole on a reload.
pub struct Tls {
    config: TlsConfig,
    acceptor: ArcSwap<TlsAcceptor>,
}

/// Put on every request of a TLS connection: whether its client presented a certificate
/// that one of `server.tls.client_ca` signed (rustls verified it in the handshake).
#[derive(Clone, Copy, Debug)]
pub struct ClientCertified(pub bool);

impl Tls {
    pub fn load(config: &TlsConfig) -> Result<Arc<Tls>, TlsError> {
        Ok(Arc::new(Tls {
            acceptor: ArcSwap::from_pointee(acceptor(config)?),
            config: config.clone(),
        }))
    }

    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Whether `/admin/` asks for a client certificate.
    pub fn checks_clients(&self) -> bool {
        self.config.client_ca.is_some()
    }

    /// Reads the files again; what does not load leaves the current certificate serving.
    fn reload(&self) {
        match acceptor(&self.config) {
            Ok(acceptor) => {
                self.acceptor.store(Arc::new(acceptor));
                tracing::info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "TLS files changed but do not load; the previous certificate keeps serving");
            }
        }
    }

    /// Reloads whenever one of the files changes, until the task is aborted. Only those
    /// files count: a directory such as /etc/ssl holds many others.
    pub fn follow(self: Arc<Tls>) -> Result<tokio::task::JoinHandle<()>, TlsError> {
        let files: Vec<PathBuf> = [Some(&self.config.cert), Some(&self.config.key)]
            .into_iter()
            .chain([self.config.client_ca.as_ref()])
            .flatten()
            .cloned()
            .collect();
        let dirs: std::collections::BTreeSet<PathBuf> = files.iter().map(|f| parent(f)).collect();
        let watched: Vec<(&Path, RecursiveMode)> = dirs
            .iter()
            .map(|d| (d.as_path(), RecursiveMode::NonRecursive))
            .collect();
        let names: Vec<std::ffi::OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(ToOwned::to_owned))
            .collect();
        let watch = Watch::new(&watched, move |path| {
            path.file_name()
                .is_some_and(|n| names.iter().any(|f| f == n))
        })?;
        Ok(tokio::spawn(async move {
            loop {
                watch.changed().await;
                let tls = self.clone();
                // Reading files and parsing keys is blocking work.
                if let Err(error) = tokio::task::spawn_blocking(move || tls.reload()).await {
                    tracing::error!(%error, "reloading the TLS files crashed; the previous certificate keeps serving");
                }
            }
        }))
    }
}

fn parent(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let refused = |reason: String| TlsError::Certificates {
        path: path.to_path_buf(),
        key,
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(e.to_string()))?;
    if chain.is_empty() {
        return Err(refused("no BEGIN CERTIFICATE block".to_string()));
    }
    Ok(chain)
}

fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(&config.cert, "cert")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&config.key)?).map_err(|e| TlsError::Key {
        path: config.key.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = |reason: String| TlsError::Server {
        cert: config.cert.clone(),
        key: config.key.clone(),
        reason,
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| server(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca, "client_ca")? {
                roots.add(certificate).map_err(|e| TlsError::Certificates {
                    path: ca.clone(),
                    key: "client_ca",
                    reason: e.to_string(),
                })?;
            }
            // Any client may connect; `/admin/` then asks whether its certificate verified.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Certificates {
                    path: ca.clone(),
                    key: "client_ca",
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| server(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}
