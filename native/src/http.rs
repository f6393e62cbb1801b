//! The HTTP/1.1 connection loop of `bitnet serve` and `bitnet serve-www`, with the limits a server must
//! set against broken or hostile clients: a bounded number of connections (more wait in the kernel's
//! accept queue instead of exhausting file descriptors or threads), and a deadline for each request's
//! headers (which also closes idle keep-alive connections), so that a half-sent request cannot hold a
//! connection forever. Request bodies get their own deadline in the servers' middleware.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and, when idle, to start its next request.
    pub header_timeout: Duration,
    /// Longest a connection may last, responses included (a client reading slowly holds it no longer).
    pub connection_timeout: Option<Duration>,
}

/// Serves `app` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, say: wait for connections to close rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            // The connection's errors are the client's (a reset, a timeout): all there is to do is close it.
            match limits.connection_timeout {
                Some(limit) => drop(tokio::time::timeout(limit, connection).await),
                None => drop(connection.await),
            }
            drop(permit);
        });
    }
}
