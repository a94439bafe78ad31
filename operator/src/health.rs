//! Liveness, readiness and Prometheus metrics over plain HTTP, for the kubelet's probes
//! and for scraping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports: ready once the webhook serves and the TcpTunnel cache is
/// filled, so the API server is never sent to a replica that would admit pods unchanged.
#[derive(Default)]
pub struct Readiness {
    pub webhook_serving: AtomicBool,
    pub tunnels_synced: AtomicBool,
}

impl Readiness {
    fn is_ready(&self) -> bool {
        self.webhook_serving.load(Ordering::Relaxed) && self.tunnels_synced.load(Ordering::Relaxed)
    }
}

struct Shared {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
}

pub async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Arc::new(Shared { readiness, metrics }));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: webhook or TcpTunnel cache not ready\n",
        )
    }
}

async fn render_metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}
