//! One client port for gRPC and HTTP/1.1, as etcd multiplexes them.
//!
//! Every accepted connection is classified by its first bytes: a client that
//! speaks HTTP/2 (every gRPC client, with prior knowledge) opens with the
//! connection preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4); no
//! HTTP/1.x request can, since no method is `PRI`. HTTP/2 connections go,
//! through [`AuthorityRepair`], to tonic exactly as before; everything else to
//! the HTTP router (the JSON gateway, `/version`, and whatever routes the
//! caller merged in), served by axum over hyper's HTTP/1.1.
//!
//! The bytes are only peeked, never consumed, so each server reads the
//! connection from its first byte. Most connections are decided by their
//! first segment (`GET`, `POST` and the preface differ within two bytes); a
//! client that sends a prefix of the preface and pauses is peeked again every
//! [`PREFACE_POLL_INTERVAL`] until [`PREFACE_WAIT_TIMEOUT`], then dropped.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::authority_repair::AuthorityRepair;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a new connection may take to show which protocol it speaks.
pub const PREFACE_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connection that sent only part of the preface is peeked again.
const PREFACE_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// Classified connections waiting for their server to take them; beyond this
/// the accept loop waits, and the kernel's backlog holds new connections.
pub const CLASSIFIED_CONNECTIONS_QUEUE_MAX: usize = 128;
/// Pause after a failed accept (out of file descriptors, say) before the
/// next, so the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The client port's gRPC services, each call counted by the metrics layer.
pub type GrpcRouter = tonic::transport::server::Router<
    tower_layer::Stack<crate::metrics::grpc::GrpcMetricsLayer, tower_layer::Identity>,
>;

/// Serves gRPC (`grpc`) and HTTP/1.1 (`http`) on `listener` until the gRPC
/// server fails; dropping the future stops accepting on both.
pub async fn serve_client_port(
    listener: TcpListener,
    grpc: GrpcRouter,
    http: axum::Router,
) -> Result<(), tonic::transport::Error> {
    let local_address = listener.local_addr().ok();
    let (grpc_sender, grpc_connections) = mpsc::channel(CLASSIFIED_CONNECTIONS_QUEUE_MAX);
    let (http_sender, http_connections) = mpsc::channel(CLASSIFIED_CONNECTIONS_QUEUE_MAX);
    let grpc_incoming = tokio_stream::wrappers::ReceiverStream::new(grpc_connections);
    let http_listener = ClassifiedListener {
        connections: http_connections,
        local_address,
    };
    let accepting = accept_loop(listener, grpc_sender, http_sender);
    // Wraps every HTTP route, merged ones included, as etcd's handler does.
    let http = http.layer(axum::middleware::from_fn(super::cors::allow_any_origin));
    let http_serving = async move {
        if let Err(error) = axum::serve(http_listener, http).await {
            tracing::error!(%error, "serving HTTP on the client port stopped");
        }
    };
    tokio::select! {
        result = grpc.serve_with_incoming(grpc_incoming) => result,
        () = accepting => Ok(()),
        () = http_serving => Ok(()),
    }
}

type GrpcConnection = Result<AuthorityRepair<TcpStream>, io::Error>;

async fn accept_loop(
    listener: TcpListener,
    grpc: mpsc::Sender<GrpcConnection>,
    http: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a client connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Nagle's algorithm would hold a response's second HTTP/2 frame
        // until the client's delayed ACK (40 ms): measured reads took 44 ms.
        let _ = stream.set_nodelay(true);
        let grpc = grpc.clone();
        let http = http.clone();
        // Classifying waits for the client's first bytes: never in the loop.
        tokio::spawn(async move {
            match speaks_http2(&stream).await {
                Ok(true) => {
                    let _ = grpc.send(Ok(AuthorityRepair::new(stream))).await;
                }
                Ok(false) => {
                    let _ = http.send((stream, peer)).await;
                }
                Err(error) => {
                    tracing::debug!(%error, %peer, "client connection dropped before its first request");
                }
            }
        });
    }
}

/// Whether the connection opens with the HTTP/2 preface, judged from as few
/// bytes as tell. A connection closed before sending anything goes to the
/// HTTP side, which closes it too.
async fn speaks_http2(stream: &TcpStream) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + PREFACE_WAIT_TIMEOUT;
    let mut first_bytes = [0u8; HTTP2_PREFACE.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first_bytes))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request within {PREFACE_WAIT_TIMEOUT:?}"),
                )
            })??;
        if peeked == 0 || first_bytes[..peeked] != HTTP2_PREFACE[..peeked] {
            return Ok(false);
        }
        if peeked == HTTP2_PREFACE.len() {
            return Ok(true);
        }
        // Only part of the preface has arrived; peek returns at once while
        // bytes are waiting, so pause before looking again.
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "an incomplete HTTP/2 preface",
            ));
        }
        tokio::time::sleep(PREFACE_POLL_INTERVAL).await;
    }
}

/// The HTTP/1.1 connections the accept loop classified, as a listener for
/// `axum::serve`.
struct ClassifiedListener {
    connections: mpsc::Receiver<(TcpStream, SocketAddr)>,
    local_address: Option<SocketAddr>,
}

impl axum::serve::Listener for ClassifiedListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop is gone, so is the port: serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.local_address
            .ok_or_else(|| io::Error::other("the client port has no local address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn classify(first_writes: &[&[u8]]) -> io::Result<bool> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let writes: Vec<Vec<u8>> = first_writes.iter().map(|bytes| bytes.to_vec()).collect();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.expect("connect");
            for bytes in writes {
                stream.write_all(&bytes).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let (stream, _) = listener.accept().await.expect("accept");
        let verdict = speaks_http2(&stream).await;
        client.await.expect("client");
        verdict
    }

    #[tokio::test]
    async fn the_preface_means_http2_even_split_over_segments() {
        assert!(classify(&[HTTP2_PREFACE]).await.expect("classified"));
        assert!(classify(&[&HTTP2_PREFACE[..5], &HTTP2_PREFACE[5..]])
            .await
            .expect("classified"));
    }

    #[tokio::test]
    async fn http1_requests_are_not_http2() {
        assert!(!classify(&[b"GET /version HTTP/1.1\r\n\r\n"])
            .await
            .expect("classified"));
        assert!(!classify(&[b"P", b"OST /v3/kv/range HTTP/1.1\r\n"])
            .await
            .expect("classified"));
    }
}
