//! Accepting data-port connections: TLS, the HTTP/2 settings that bound what one client may ask
//! for, the deadline for a connection's first bytes, and draining at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::balance::{Handed, Placed, Seat};

use super::Proxy;

/// HTTP/2 server settings of the data port.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Streams per connection; a client that opens more gets REFUSED_STREAM for the extra ones.
    pub max_concurrent_streams: u32,
    /// The `--max-header-bytes` limit: blocks up to twice its size are answered with
    /// RESOURCE_EXHAUSTED by the proxy (the same soft/hard split gRPC's C core uses); larger
    /// ones h2 decodes and refuses itself (HTTP 431, then RST_STREAM PROTOCOL_ERROR), and a
    /// block over four times what it advertises (eight times the limit) ends the connection.
    pub max_header_bytes: usize,
    /// PING interval.
    pub keepalive_interval: Duration,
    /// Time a new connection has to complete the TLS handshake (when TLS is on), and then again
    /// to send the HTTP/2 connection preface. A client that connects and stays silent would
    /// otherwise hold a socket forever: HTTP/2 keepalive PINGs only start after the handshake.
    pub handshake_timeout: Duration,
    /// How long shutdown waits for open requests.
    pub shutdown_grace: Duration,
    /// TLS (`--tls-cert`…): connections are served over TLS with ALPN `h2`, and must present a
    /// client certificate when the configuration asks for one. None: HTTP/2 cleartext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, the bytes every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;

/// HTTP/1.1 and HTTP/2 on one port: an HTTP/2 client's preface picks HTTP/2 (cleartext with
/// prior knowledge, as gRPC clients do; over TLS, ALPN `h2`), anything else is HTTP/1.1 (REST).
type Builder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

/// Serves the data port on `listener` until `shutdown` resolves, then drains open connections for
/// up to the grace period. What this thread accepts is served on the thread `seat` places it on
/// (the one with the fewest connections, [`super::balance`]); connections other threads placed
/// here arrive in `seat`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    mut seat: Seat,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192) * 2);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_interval.min(Duration::from_secs(20)))
        // Fixed, generous windows: BDP probing (adaptive windows) sends PINGs and timestamps
        // every frame, which costs more than it gains for small inference messages.
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let acceptor = settings.tls.clone().map(|tls| {
        // Both protocols are offered: gRPC clients pick h2, REST clients may pick HTTP/1.1.
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(tls))
    });
    let here = Here {
        proxy: proxy.clone(),
        rest: super::rest::RestGateway::new(proxy),
        builder,
        acceptor,
        handshake_timeout: settings.handshake_timeout,
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, placed) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(h) = seat.handed() => match TcpStream::from_std(h.stream) {
                Ok(stream) => (stream, h.peer, h.placed),
                Err(e) => {
                    tracing::warn!(peer = %h.peer, error = %e, "cannot take over a data connection from another thread");
                    continue;
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let placed = seat.place();
                    if placed.thread() == seat.thread() {
                        (stream, peer, placed)
                    } else {
                        match hand_over(&seat, stream, peer, placed) {
                            Some(back) => back,
                            None => continue,
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed on the data port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        here.serve(stream, peer, placed, graceful.watcher());
    }
    // Connections handed over but not yet taken are closed with the seat's inbox; those handed
    // over from now on are served by the thread that accepted them.
    seat.close();
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period ended with requests still open");
        }
    }
}

/// Hands `stream` to the thread it was `placed` on. Gives it back, counted here, when that
/// thread is shutting down; None when the socket cannot leave this thread's reactor (it is
/// then closed).
fn hand_over(
    seat: &Seat,
    stream: TcpStream,
    peer: SocketAddr,
    placed: Placed,
) -> Option<(TcpStream, SocketAddr, Placed)> {
    // TCP_NODELAY is set where the connection is served, on either thread.
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand a data connection to another thread");
            return None;
        }
    };
    let back = seat.hand(Handed {
        stream,
        peer,
        placed,
    });
    let back = back.err()?;
    let Handed { stream, peer, .. } = *back;
    match TcpStream::from_std(stream) {
        Ok(stream) => Some((stream, peer, seat.here())),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot serve a data connection given back");
            None
        }
    }
}

/// What a data thread needs to serve the connections placed on it.
struct Here {
    proxy: Arc<Proxy>,
    rest: Arc<super::rest::RestGateway>,
    builder: Builder,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
}

impl Here {
    /// Serves `stream` in a task of its own: TLS first when on (the handshake runs in the
    /// connection's task, so a slow or silent client never holds up the accept loop), then HTTP.
    /// `placed` counts the connection on this thread until it ends.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, placed: Placed, watcher: Watcher) {
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            proxy: self.proxy.clone(),
            rest: self.rest.clone(),
            builder: self.builder.clone(),
            watcher,
            peer,
            handshake_timeout: self.handshake_timeout,
        };
        match &self.acceptor {
            None => {
                tokio::spawn(async move {
                    conn.serve(stream).await;
                    drop(placed);
                });
            }
            Some(acceptor) => {
                let accept = acceptor.accept(stream);
                let timeout = self.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, accept).await {
                        Ok(Ok(stream)) => conn.serve(stream).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %crate::tls::describe_io_error(&e), "TLS handshake failed on the data port");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out on the data port");
                        }
                    }
                    drop(placed);
                });
            }
        }
    }
}

/// One accepted connection, before it is served.
struct Connection {
    proxy: Arc<Proxy>,
    rest: Arc<super::rest::RestGateway>,
    builder: Builder,
    watcher: Watcher,
    peer: SocketAddr,
    handshake_timeout: Duration,
}

impl Connection {
    /// Serves HTTP/2 on `io` until the client leaves, an HTTP/2 connection error ends it, or
    /// the client has not sent the preface within the handshake timeout.
    async fn serve<S>(self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            proxy,
            rest,
            builder,
            watcher,
            peer,
            handshake_timeout,
        } = self;
        let svc = hyper::service::service_fn(move |req| {
            // The call's future is boxed here, once: hyper spawns a task per stream holding what
            // this returns, and tokio moves a task's future into its cell, then overwrites it
            // with the output — several copies of a future kilobytes large per call (memmove was
            // 16% of modelgate's CPU under h2load) where a box pointer costs one.
            let call: futures_util::future::BoxFuture<'static, http::Response<tonic::body::Body>> =
                if super::rest::is_rest(&req) {
                    Box::pin(rest.clone().handle(req))
                } else {
                    proxy.clone().call(req)
                };
            futures_util::FutureExt::map(call, Ok::<_, Infallible>)
        });
        let read = Arc::new(AtomicUsize::new(0));
        let io = CountReads {
            inner: io,
            read: read.clone(),
        };
        let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned());
        tokio::pin!(conn);
        let result = tokio::select! {
            r = &mut conn => r,
            _ = tokio::time::sleep(handshake_timeout) => {
                if read.load(Ordering::Relaxed) < PREFACE_LEN {
                    // Dropping the connection closes the socket.
                    tracing::debug!(%peer, "client sent no HTTP/2 preface in time; closing");
                    return;
                }
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "data connection ended with an error");
        }
    }
}

/// A stream that counts the bytes read from it, so the preface deadline can tell a silent
/// client from a busy one without reaching into hyper.
struct CountReads<S> {
    inner: S,
    read: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        // Only the first bytes matter; stop touching the counter once past the preface.
        if n > 0 && self.read.load(Ordering::Relaxed) < PREFACE_LEN {
            self.read.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
