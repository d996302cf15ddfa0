//! The admin listener's HTTP/1 server: hyper driven directly, for the limits `axum::serve` does not offer.
//!
//! The admin port is reachable by whatever reaches the pod (probes, Prometheus, operators), so a client that
//! opens connections and never finishes a request must not exhaust tollgate: connections are capped (the
//! listener stops accepting while the cap is reached, so the kernel's backlog absorbs a burst), request
//! headers must arrive within a deadline, and a handler that overruns its time answers 503.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::tls::TlsServer;

/// How the admin listener's connections are spoken: plain HTTP, or HTTPS with a reloading certificate.
#[derive(Clone)]
pub enum Acceptor {
    /// HTTP/1.1 in clear text.
    Plain,
    /// HTTP/1.1 over TLS; the handshake runs on the connection's own task, within its timeout.
    Tls(TlsServer),
}

/// Bounds of the admin HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time a handler has to answer before the client gets 503.
    pub request_timeout: Duration,
    /// Time open connections get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open connections finish within
/// [`HttpLimits::shutdown_grace`].
pub async fn serve(
    listener: TcpListener,
    acceptor: Acceptor,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let timeout = limits.request_timeout;
    let router = router.layer(middleware::from_fn(move |request: Request, next: Next| {
        within(timeout, request, next)
    }));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather than spin on the error.
                    tracing::warn!(error = %e, "admin listener could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let http = http.clone();
        let acceptor = acceptor.clone();
        // The permit moves into the task: a connection, handshake included, holds its slot until it ends.
        tokio::spawn(async move {
            match acceptor {
                Acceptor::Plain => drive(&http, watcher, stream, service).await,
                Acceptor::Tls(tls) => match tls.accept(stream).await {
                    Ok(stream) => drive(&http, watcher, stream, service).await,
                    Err(e) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                },
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open at shutdown were closed");
    }
}

/// Serves one connection until it ends, or until shutdown once its request in flight is answered.
async fn drive<IO>(
    http: &hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    io: IO,
    service: TowerToHyperService<Router>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = watcher.watch(http.serve_connection(TokioIo::new(io), service));
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

async fn within(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let router = Router::new().route("/fast", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, Acceptor::Plain, router, limits, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Sends one request and reads the answer until the server closes the connection.
    async fn get_once(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_silent_client_holds_its_slot_only_until_the_header_deadline() {
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, _stop) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET /fast HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        // The one slot is taken: this request is served only once the silent client is dropped.
        let answer = get_once(addr, "/fast").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "served while the only slot was taken"
        );
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the silent connection was not closed");
    }

    #[tokio::test]
    async fn a_handler_past_its_time_answers_503() {
        let limits = HttpLimits {
            request_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        };
        let (addr, _stop) = start(limits).await;
        let answer = get_once(addr, "/slow").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        let answer = get_once(addr, "/fast").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
