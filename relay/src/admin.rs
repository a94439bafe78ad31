//! The admin HTTP endpoint: liveness and readiness for Kubernetes probes, Prometheus
//! metrics, and a read-only JSON list of the open tunnels.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/tunnels", get(tunnels))
        .with_state(shared);
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "admin endpoint failed");
    }
}

/// Ready while the relay can keep its promises, which includes reaching its database.
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.store.is_reachable().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn tunnels(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.tunnels.snapshot())
}
