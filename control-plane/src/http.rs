//! The HTTP listener: `/metrics` and `/healthz` for now; the dashboard API
//! grows here.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::ServerMetrics;

/// The routes; anything else is answered in JSON (`{"error": "..."}`): 404
/// for a path the server does not have, 405 (with `Allow`, which axum adds)
/// for a method a path does not take.
pub fn router(metrics: Arc<ServerMetrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|uri: Uri| async move {
            json_error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{method} is not allowed on {} (see the Allow header)",
                    uri.path()
                ),
            )
        })
        .with_state(metrics)
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn metrics_text(State(metrics): State<Arc<ServerMetrics>>) -> Response {
    (
        [(header::CONTENT_TYPE, edgefleet_proto::METRICS_CONTENT_TYPE)],
        metrics.encode(),
    )
        .into_response()
}

/// Serves `router` over TLS (for an HTTP listener off loopback).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut incoming = std::pin::pin!(edgefleet_pki::tls_incoming(listener, config));
    loop {
        let connection = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            connection = incoming.next() => connection,
        };
        let connection = match connection {
            Some(Ok(connection)) => connection,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "HTTP connection failed");
                continue;
            }
            None => return Ok(()),
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(err) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
                .await
            {
                tracing::debug!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
}
