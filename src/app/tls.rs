//! TLS and mTLS for the gRPC and admin listeners (CONTRACT §2): a `rustls::ServerConfig` built from PEM files
//! and rebuilt when those files change.
//!
//! cert-manager (or any rotation) replaces the files in place, so the files are polled: every
//! [`RELOAD_EVERY`] their bytes are read and compared with the last bytes seen. New bytes that make a good
//! config replace the live one (an `ArcSwap`), so new connections get the new certificate while open
//! connections keep theirs; new bytes that do not (a half-rotated pair, a typo) keep the last good config and
//! log one warning until the bytes change again.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::util::sync::lock;

/// How often the certificate files are re-read: cert-manager renews well before expiry, so seconds are plenty.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// How long a client has to finish its TLS handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once per listener; further connections wait in the kernel's backlog, so a flood
/// of silent clients costs bounded memory.
const MAX_HANDSHAKES: usize = 256;

/// Accepted gRPC connections waiting for tonic to pick them up.
const INCOMING_QUEUE: usize = 64;

/// `grpc_tls:` / `admin_tls:` — the PEM files of a listener (relative paths start at the config's folder).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`tls.crt` of a kubernetes.io/tls Secret).
    pub cert_path: PathBuf,
    /// The private key of the leaf (`tls.key`).
    pub key_path: PathBuf,
    /// CA certificates that client certificates must chain to; set means every client needs one (mTLS).
    pub client_ca_path: Option<PathBuf>,
}

impl TlsFiles {
    /// The same files with relative paths joined to `base`.
    pub fn resolved(&self, base: &Path) -> TlsFiles {
        TlsFiles {
            cert_path: base.join(&self.cert_path),
            key_path: base.join(&self.key_path),
            client_ca_path: self.client_ca_path.as_ref().map(|p| base.join(p)),
        }
    }
}

/// The application protocol a listener offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    H2,
    /// The admin server: HTTP/1.1 only.
    Http11,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Why a listener's TLS files cannot make a server config; [`TlsError::key`] names the config key to blame.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key} {path} cannot be read: {source}")]
    Read {
        /// The config key (`cert_path`, `key_path`, `client_ca_path`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A certificate file holds no certificate, or a broken one.
    #[error("{key} {path} holds no valid PEM certificate{detail}")]
    Certificate {
        /// The config key (`cert_path` or `client_ca_path`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the parser said, if anything (starts with ": ").
        detail: String,
    },
    /// The key file holds no private key rustls can use.
    #[error("key_path {path} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {detail}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What the parser or rustls said.
        detail: String,
    },
    /// The key is not the certificate's.
    #[error("key_path {key_path} does not match the certificate in cert_path {cert_path}")]
    Mismatch {
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        cert_path: PathBuf,
    },
    /// rustls refused the certificate chain or the client CA.
    #[error("{key} {path} was refused by rustls: {source}")]
    Refused {
        /// The config key (`cert_path` or `client_ca_path`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The client CA cannot make a client certificate verifier.
    #[error("client_ca_path {path} cannot verify client certificates: {detail}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        detail: String,
    },
}

impl TlsError {
    /// The config key under `grpc_tls`/`admin_tls` whose file is at fault.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Read { key, .. }
            | TlsError::Certificate { key, .. }
            | TlsError::Refused { key, .. } => key,
            TlsError::Key { .. } | TlsError::Mismatch { .. } => "key_path",
            TlsError::ClientCa { .. } => "client_ca_path",
        }
    }
}

/// The bytes of a listener's files, as last read.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Contents, TlsError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Contents {
            cert: read("cert_path", &files.cert_path)?,
            key: read("key_path", &files.key_path)?,
            client_ca: match &files.client_ca_path {
                Some(path) => Some(read("client_ca_path", path)?),
                None => None,
            },
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    // Named explicitly: other crates in the build may enable a second provider, and rustls then refuses to
    // guess a process-wide default.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            key,
            path: path.to_path_buf(),
            detail: format!(": {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            key,
            path: path.to_path_buf(),
            detail: String::new(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles, contents: &Contents, alpn: Alpn) -> Result<ServerConfig, TlsError> {
    let chain = certificates("cert_path", &files.cert_path, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| TlsError::Key {
        path: files.key_path.clone(),
        detail: e.to_string(),
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Refused {
            key: "cert_path",
            path: files.cert_path.clone(),
            source,
        })?;
    let builder = match (&files.client_ca_path, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client_ca_path", path, pem)? {
                roots.add(cert).map_err(|source| TlsError::Refused {
                    key: "client_ca_path",
                    path: path.clone(),
                    source,
                })?;
            }
            // `build()` requires a certificate of every client: mTLS, as `client_ca_path` promises.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::Mismatch {
                    key_path: files.key_path.clone(),
                    cert_path: files.cert_path.clone(),
                }
            }
            rustls::Error::General(detail) => TlsError::Key {
                path: files.key_path.clone(),
                detail,
            },
            source => TlsError::Refused {
                key: "cert_path",
                path: files.cert_path.clone(),
                source,
            },
        })?;
    config.alpn_protocols = alpn.protocols();
    Ok(config)
}

/// Reads `files` and builds the server config once: what config validation and `tollgate check` run.
pub fn server_config(files: &TlsFiles, alpn: Alpn) -> Result<ServerConfig, TlsError> {
    build(files, &Contents::read(files)?, alpn)
}

struct Inner {
    /// `grpc_tls` or `admin_tls`, for logs.
    name: &'static str,
    files: TlsFiles,
    alpn: Alpn,
    live: ArcSwap<ServerConfig>,
    /// The bytes last read, good or bad: a bad rotation is reported once, not on every poll.
    seen: Mutex<Option<Contents>>,
    /// Counts handshakes that failed or timed out, once serve has registered the counter.
    failures: OnceLock<prometheus::IntCounter>,
}

/// A listener's TLS side: the live server config, reloaded from its files by [`TlsServer::watch`].
#[derive(Clone)]
pub struct TlsServer {
    inner: Arc<Inner>,
}

impl TlsServer {
    /// Loads `files` (already resolved) for the listener named `name` (`grpc_tls` or `admin_tls`).
    pub fn load(name: &'static str, files: &TlsFiles, alpn: Alpn) -> Result<TlsServer, TlsError> {
        let contents = Contents::read(files)?;
        let config = build(files, &contents, alpn)?;
        Ok(TlsServer {
            inner: Arc::new(Inner {
                name,
                files: files.clone(),
                alpn,
                live: ArcSwap::from_pointee(config),
                seen: Mutex::new(Some(contents)),
                failures: OnceLock::new(),
            }),
        })
    }

    /// Counts this listener's failed handshakes in `counter` (clients without a valid certificate, plain
    /// text to a TLS port, timeouts): a spike means a client lost its certificate or a scan is running.
    pub fn count_failures_in(&self, counter: prometheus::IntCounter) {
        let _ = self.inner.failures.set(counter);
    }

    /// The listener's name in the config (`grpc_tls` or `admin_tls`).
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Re-reads the files and swaps in a new config when their bytes changed and make a good one; returns
    /// whether it swapped.
    pub fn reload(&self) -> bool {
        let inner = &self.inner;
        let contents = match Contents::read(&inner.files) {
            Ok(contents) => contents,
            Err(error) => {
                // A file missing mid-rotation: report once, keep serving with the last good config.
                let mut seen = lock(&inner.seen);
                if seen.take().is_some() {
                    tracing::warn!(listener = inner.name, %error, "TLS files unreadable; keeping the last good certificate");
                }
                return false;
            }
        };
        let mut seen = lock(&inner.seen);
        if seen.as_ref() == Some(&contents) {
            return false;
        }
        let result = build(&inner.files, &contents, inner.alpn);
        *seen = Some(contents);
        drop(seen);
        match result {
            Ok(config) => {
                inner.live.store(Arc::new(config));
                tracing::info!(listener = inner.name, cert = %inner.files.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                tracing::warn!(listener = inner.name, %error, "new TLS files refused; keeping the last good certificate");
                false
            }
        }
    }

    /// Polls the files every `every` until `shutdown` completes.
    pub async fn watch(self, every: Duration, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // File reads block: keep them off the async workers.
                    let this = self.clone();
                    if let Err(error) = tokio::task::spawn_blocking(move || this.reload()).await {
                        tracing::warn!(listener = self.inner.name, %error, "TLS reload task failed");
                    }
                }
                () = &mut shutdown => return,
            }
        }
    }

    /// Runs the TLS handshake on `io` with the live config, within [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<IO>(&self, io: IO) -> io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.inner.live.load_full());
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        };
        if result.is_err()
            && let Some(failures) = self.inner.failures.get()
        {
            failures.inc();
        }
        result
    }
}

/// A gRPC connection after its TLS handshake, as tonic's incoming stream yields it.
pub struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsIo {
    // The TCP peer, as plain connections report it, so `Request::remote_addr` works the same over TLS.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The incoming stream for tonic over TLS: accepts on `listener` (TCP_NODELAY set), runs each handshake on
/// its own task so a slow client never holds up the accept loop, and yields the finished ones. Stops
/// accepting when `shutdown` completes or tonic drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: TlsServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ReceiverStream<io::Result<TlsIo>> {
    let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = &mut shutdown => return,
                () = tx.closed() => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, most likely: back off rather than spin on the error.
                        tracing::warn!(listener = tls.name(), error = %e, "gRPC listener could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
                () = tx.closed() => return,
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tls.accept(stream).await {
                    Ok(stream) => {
                        // Fails only when tonic is gone (shutting down): the connection is dropped with it.
                        let _ = tx.send(Ok(TlsIo(stream))).await;
                    }
                    Err(error) => {
                        tracing::debug!(listener = tls.name(), %peer, %error, "TLS handshake failed")
                    }
                }
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}
