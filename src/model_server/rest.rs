//! The built-in model server over HTTP/JSON, on a port of its own as MLServer and Triton serve
//! REST beside gRPC: the Open Inference Protocol's REST API (health, metadata, ready, infer with
//! JSON or binary tensors) and KServe v1's `:predict`. It is the same gateway modelgate's data
//! port uses for REST callers (`proxy::rest`), in front of the model server's gRPC services, so
//! the two answer alike.

use std::convert::Infallible;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::ModelServer;
use crate::proxy::rest::RestGateway;

/// Serves `server` over REST on `listener` until `shutdown`.
pub async fn serve_rest(
    listener: TcpListener,
    server: ModelServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let routes = tonic::service::Routes::new(server.clone().into_service())
        .add_service(server.into_tfs_service());
    let gateway = RestGateway::with_handler(
        Arc::new(move |req| {
            let routes = routes.clone();
            Box::pin(async move {
                match routes.oneshot(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            })
        }),
        (64 * 1024 * 1024, crate::oip::DEFAULT_MAX_ELEMENTS),
    );
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The connections end with the server (a stopped server closes its keep-alive connections,
    // as a real one going away does).
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => return Ok(()),
            Some(_) = connections.join_next() => continue,
        };
        let _ = stream.set_nodelay(true);
        let (gateway, builder) = (gateway.clone(), builder.clone());
        connections.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let g = gateway.clone();
                async move { Ok::<_, Infallible>(g.handle(req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
