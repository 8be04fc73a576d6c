//! The accept loop: each connection, after its TLS handshake if the server speaks HTTPS,
//! served as HTTP/1.1 with a deadline on every request head, so that clients trickling
//! bytes (or sending none) hold a connection for `server.header_read_timeout_ms` at most
//! and cannot crowd the others out.
//!
//! Owns: connections, from accept to close, and the graceful stop. Must not touch: what
//! a request means (the router answers it).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::tls::{ClientCertified, Tls};

/// How connections are served.
#[derive(Clone)]
pub struct Listening {
    pub tls: Option<Arc<Tls>>,
    /// A connection's request head (and its TLS handshake) must arrive within this.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and
/// waits for the requests in flight (idle connections are closed at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    listening: Listening,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: accepting again at once would spin.
                tracing::warn!(%error, "cannot accept a connection; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Responses are written whole; Nagle would only hold the last segment back.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let (router, listening, watcher) = (router.clone(), listening.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Some(tls) = &listening.tls else {
                return connection(stream, router, None, &listening, watcher).await;
            };
            let handshake = tls.acceptor().accept(stream);
            match tokio::time::timeout(listening.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let certified = stream.get_ref().1.peer_certificates().is_some();
                    let certified = Some(ClientCertified(certified));
                    connection(stream, router, certified, &listening, watcher).await;
                }
                Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
    // Closed now, so that new connections are refused rather than left in the backlog
    // while the ones in flight finish.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    certified: Option<ClientCertified>,
    listening: &Listening,
    watcher: Watcher,
) {
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        if let Some(certified) = certified {
            request.extensions_mut().insert(certified);
        }
        router.clone().oneshot(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) = watcher.watch(connection).await {
        // Clients hang up, time out and send garbage; none of it is the server's fault.
        tracing::debug!(%error, "connection ended with an error");
    }
}
