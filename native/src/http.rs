//! The HTTP/1.1 connection loop of `bitnet serve` and `bitnet serve-www`, with the limits a server must
//! set against broken or hostile clients: a bounded number of connections (more wait in the kernel's
//! accept queue instead of exhausting file descriptors or threads), and a deadline for each request's
//! headers (which also closes idle keep-alive connections), so that a half-sent request cannot hold a
//! connection forever. Request bodies get their own deadline in the servers' middleware.
//!
//! Half-closed connections are kept open (hyper's `half_close`): a client may shut down its write side
//! once its request is sent (`curl` and `nc -N` can) and still read the answer. Hyper then no longer
//! notices a client that went away while its request runs, so every request carries a [`Peer`] through
//! which a long-running handler can watch the connection itself.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[derive(Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and, when idle, to start its next request.
    pub header_timeout: Duration,
    /// Longest a connection may last, responses included (a client reading slowly holds it no longer).
    pub connection_timeout: Option<Duration>,
}

/// Serves `app` on `listener` until `stop` resolves. Then it accepts nothing more (the listener closes, so new
/// clients are refused at once) and returns the connections still open: awaiting
/// [`GracefulShutdown::shutdown`] lets each finish the response it is writing, closes idle ones, and returns
/// once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: impl std::future::Future<Output = ()>,
) -> GracefulShutdown {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let accept = async {
            let permit = permits.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        let (permit, accepted) = tokio::select! {
            () = &mut stop => return open,
            accepted = accept => accepted,
        };
        let Ok(permit) = permit else { return open };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of file descriptors, say: wait for connections to close rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok((stream, peer)) = Peer::split(stream) else { continue };
        let app = app.clone();
        let service = TowerToHyperService::new(tower::service_fn(move |mut req: Request<_>| {
            req.extensions_mut().insert(peer.clone());
            app.clone().oneshot(req)
        }));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).half_close(true);
        let connection = open.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // The connection's errors are the client's (a reset, a timeout): all there is to do is close it.
            match limits.connection_timeout {
                Some(limit) => drop(tokio::time::timeout(limit, connection).await),
                None => drop(connection.await),
            }
            drop(permit);
        });
    }
}

/// A second handle on a request's connection (a duplicate of its socket), to watch for the client
/// closing it while hyper, which owns the connection, is busy waiting for the handler.
#[derive(Clone)]
pub struct Peer(Arc<TcpStream>);

impl Peer {
    /// The connection for hyper, and the watcher's handle on the same socket.
    fn split(stream: TcpStream) -> std::io::Result<(TcpStream, Peer)> {
        let stream = stream.into_std()?;
        let watcher = TcpStream::from_std(stream.try_clone()?)?;
        Ok((TcpStream::from_std(stream)?, Peer(Arc::new(watcher))))
    }

    /// Returns once the client has closed its side (or the connection failed); never while the client may
    /// still send (bytes waiting: a pipelined next request). A closed side means either a half-close (the
    /// client still reads) or a client gone for good; only a write can tell them apart.
    pub async fn read_closed(&self) {
        let mut byte = [0u8; 1];
        match self.0.peek(&mut byte).await {
            Ok(0) | Err(_) => {}
            Ok(_) => std::future::pending().await,
        }
    }
}
