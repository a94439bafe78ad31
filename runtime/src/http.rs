//! The HTTP endpoint every localup process can serve: `/healthz` (alive),
//! `/readyz` (ready to take traffic, as the process decides), `/metrics` (Prometheus
//! text), and routes of the process's own. `/metrics` and the process's routes may
//! require a bearer token; the probes never do, so the kubelet needs none.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the process is ready, and why not when it is not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// The Prometheus text for `/metrics`.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint serves.
pub struct Endpoints {
    pub readiness: Readiness,
    pub metrics: Option<MetricsText>,
    /// Routes of the process's own (e.g. the relay's `/api/tunnels`).
    pub extra: Router,
    /// Required as `Authorization: Bearer TOKEN` on everything but the probes.
    pub token: Option<String>,
}

pub fn router(endpoints: Endpoints) -> Router {
    let mut protected = endpoints.extra;
    if let Some(metrics) = endpoints.metrics {
        protected = protected.route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics(),
                    )
                }
            }),
        );
    }
    if let Some(token) = endpoints.token {
        protected = protected.layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
    }
    let readiness = endpoints.readiness;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = Arc::clone(&readiness);
                async move {
                    match readiness() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .merge(protected)
}

async fn require_token(
    State(token): State<Arc<String>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if authorized(&headers, &token) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this endpoint needs `Authorization: Bearer <admin token>`\n",
        )
            .into_response()
    }
}

/// Compares in constant time, so the token cannot be guessed byte by byte.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    presented.len() == token.len()
        && presented
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "the health and metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        assert!(authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secreT".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Bearer secret2".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
        headers.insert(header::AUTHORIZATION, "Basic secret".parse().unwrap());
        assert!(!authorized(&headers, "secret"));
    }
}
