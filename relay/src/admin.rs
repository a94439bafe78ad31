//! The admin endpoint: liveness and readiness for probes, Prometheus metrics, and a
//! read-only JSON list of the open tunnels with their clients. Readiness does not
//! depend on the database: tunnels open without it, so the relay stays in its Service.

use std::sync::Arc;

use axum::Json;
use axum::routing::get;
use localup_runtime::http::{self, Endpoints};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::tunnels::Tunnels;

/// What the admin endpoint reads.
pub struct AdminState {
    pub tunnels: Arc<Tunnels>,
    pub metrics: Arc<Metrics>,
    /// Required on /metrics and /api/tunnels when set.
    pub token: Option<String>,
    /// Cancelled when the relay starts shutting down: it is no longer ready.
    pub stopping: CancellationToken,
}

pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let AdminState {
        tunnels,
        metrics,
        token,
        stopping,
    } = state;
    let listed = Arc::clone(&tunnels);
    let extra = axum::Router::new().route(
        "/api/tunnels",
        get(move || {
            let tunnels = Arc::clone(&listed);
            async move {
                let snapshot = tunnels.snapshot();
                let views: Vec<_> = snapshot.iter().map(|tunnel| tunnel.view()).collect();
                Json(serde_json::to_value(views).expect("tunnel views serialize"))
            }
        }),
    );
    let router = http::router(Endpoints {
        readiness: Arc::new(move || {
            if stopping.is_cancelled() {
                Err("shutting down".into())
            } else {
                Ok(())
            }
        }),
        metrics: Some(Arc::new(move || metrics.render(tunnels.samples()))),
        extra,
        token,
    });
    http::serve(listener, router, shutdown).await;
}
