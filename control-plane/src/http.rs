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
