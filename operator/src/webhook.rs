//! The mutating admission webhook: gives each new pod that a Ready TcpTunnel selects the
//! `localup-client` sidecar. It decides from the operator's TcpTunnel cache alone (no API
//! calls on the admission path), and every failure admits the pod unchanged: a broken
//! operator must never block pod creation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::Store;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::crd::TcpTunnel;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::resources::{self, INJECTED_ANNOTATION, SIDECAR_NAME, WEBHOOK_PATH};
use crate::webhook_tls::ServingCertificate;

pub struct Webhook {
    pub tunnels: Store<TcpTunnel>,
    pub client_image: String,
    /// Namespaces whose pods are never touched: the operator's own and kube-system.
    pub excluded_namespaces: Vec<String>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub enum Decision {
    Inject {
        tunnel: String,
        patch: json_patch::Patch,
    },
    Skip(&'static str),
}

/// What to do with `pod`, created in `namespace`, given the known tunnels. When several
/// tunnels select the pod, the oldest one wins: a pod runs one sidecar.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    tunnels: &[Arc<TcpTunnel>],
    client_image: &str,
    excluded_namespaces: &[String],
) -> Decision {
    if excluded_namespaces
        .iter()
        .any(|excluded| excluded == namespace)
    {
        return Decision::Skip("namespace excluded");
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|container| container.name == SIDECAR_NAME);
    if has_sidecar {
        return Decision::Skip("already has a localup-client container");
    }
    let selecting = tunnels
        .iter()
        .filter(|tunnel| tunnel.namespace().as_deref() == Some(namespace))
        .filter(|tunnel| tunnel.metadata.deletion_timestamp.is_none())
        .filter(|tunnel| {
            resources::tunnel_selector(tunnel)
                .is_ok_and(|selector| resources::selects(&selector, pod.metadata.labels.as_ref()))
        })
        .filter_map(|tunnel| Some((tunnel, tunnel.assigned_port()?)))
        .min_by_key(|(tunnel, _)| {
            (
                tunnel.metadata.creation_timestamp.clone(),
                tunnel.name_any(),
            )
        });
    let Some((tunnel, remote_port)) = selecting else {
        return Decision::Skip("no TcpTunnel with an assigned port selects it");
    };
    // The operator writes the token Secret before it rolls pods onto the sidecar; the
    // name is derived rather than read from the status so this cache may lag behind.
    let secret = resources::token_secret_name(&tunnel.name_any());
    let container =
        resources::sidecar_container(client_image, &secret, tunnel.spec.port, remote_port);
    let volume = resources::sidecar_volume(&secret);
    let mut operations =
        vec![json!({"op": "add", "path": "/spec/containers/-", "value": container})];
    operations.push(match spec.volumes {
        Some(_) => json!({"op": "add", "path": "/spec/volumes/-", "value": volume}),
        None => json!({"op": "add", "path": "/spec/volumes", "value": [volume]}),
    });
    // `/` in a JSON pointer segment is written `~1`.
    operations.push(match pod.metadata.annotations {
        Some(_) => json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", INJECTED_ANNOTATION.replace('/', "~1")),
            "value": tunnel.name_any(),
        }),
        None => json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": {INJECTED_ANNOTATION: tunnel.name_any()},
        }),
    });
    let patch = serde_json::from_value(operations.into()).expect("well-formed JSON patch");
    Decision::Inject {
        tunnel: tunnel.name_any(),
        patch,
    }
}

pub async fn serve(
    addr: SocketAddr,
    certificate: &ServingCertificate,
    webhook: Arc<Webhook>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tls = RustlsConfig::from_pem(
        certificate.cert_pem.clone().into_bytes(),
        certificate.key_pem.clone().into_bytes(),
    )
    .await?;
    let router = Router::new()
        .route(WEBHOOK_PATH, post(mutate))
        .with_state(webhook);
    let handle = Handle::new();
    tokio::spawn({
        let handle = handle.clone();
        async move {
            if handle.listening().await.is_some() {
                readiness.webhook_serving.store(true, Ordering::Relaxed);
                tracing::info!(%addr, "webhook serving");
            }
            shutdown.cancelled().await;
            readiness.webhook_serving.store(false, Ordering::Relaxed);
            handle.graceful_shutdown(Some(Duration::from_secs(5)));
        }
    });
    axum_server::bind_rustls(addr, tls)
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

async fn mutate(
    State(webhook): State<Arc<Webhook>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, "malformed admission review");
            webhook.metrics.admitted("failed");
            return Json(AdmissionResponse::invalid(error.to_string()).into_review());
        }
    };
    let allowed = AdmissionResponse::from(&request);
    let Some(pod) = &request.object else {
        return Json(allowed.into_review());
    };
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let pod_name = pod
        .metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or_default();
    let tunnels = webhook.tunnels.state();
    let decision = decide(
        pod,
        namespace,
        &tunnels,
        &webhook.client_image,
        &webhook.excluded_namespaces,
    );
    let response = match decision {
        Decision::Skip(why) => {
            tracing::debug!(namespace, pod = pod_name, why, "pod admitted unchanged");
            webhook.metrics.admitted("skipped");
            allowed
        }
        Decision::Inject { tunnel, patch } => match allowed.clone().with_patch(patch) {
            Ok(response) => {
                tracing::info!(namespace, pod = pod_name, %tunnel, "injected the localup-client sidecar");
                webhook.metrics.admitted("injected");
                response
            }
            Err(error) => {
                tracing::warn!(namespace, pod = pod_name, %error, "cannot encode the sidecar patch; pod admitted unchanged");
                webhook.metrics.admitted("failed");
                allowed
            }
        },
    };
    Json(response.into_review())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::{TcpTunnelSpec, TcpTunnelStatus};

    const IMAGE: &str = "ghcr.io/localup-dev/localup-client:0.1.0";

    fn tunnel(name: &str, namespace: &str, created: i64, port: Option<i32>) -> Arc<TcpTunnel> {
        let mut tunnel = TcpTunnel::new(
            name,
            TcpTunnelSpec {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "db".into())])),
                    ..Default::default()
                },
                port: 5432,
                remote_port: None,
            },
        );
        tunnel.metadata.namespace = Some(namespace.into());
        tunnel.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        tunnel.status = port.map(|port| TcpTunnelStatus {
            remote_port: Some(port),
            token_secret: Some(format!("{name}-localup-token")),
            ..Default::default()
        });
        Arc::new(tunnel)
    }

    fn pod(labels: &[(&str, &str)], containers: &[&str]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.labels = Some(
            labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        );
        pod.spec = Some(PodSpec {
            containers: containers
                .iter()
                .map(|name| Container {
                    name: name.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        pod
    }

    fn apply(decision: Decision, pod: &Pod) -> Pod {
        let Decision::Inject { patch, .. } = decision else {
            panic!("expected an injection, got {decision:?}");
        };
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_selected_pod_gets_the_sidecar_volume_and_annotation() {
        let tunnels = [tunnel("mydb", "dev", 1, Some(16432))];
        let original = pod(&[("app", "db")], &["postgres"]);
        let patched = apply(decide(&original, "dev", &tunnels, IMAGE, &[]), &original);
        let spec = patched.spec.unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["postgres", "localup-client"]);
        let sidecar = &spec.containers[1];
        assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
        assert_eq!(
            sidecar.args.as_deref().unwrap(),
            [
                "--port",
                "5432",
                "--protocol",
                "tcp",
                "--remote-port",
                "16432"
            ]
        );
        let volume = &spec.volumes.unwrap()[0];
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("mydb-localup-token")
        );
        assert_eq!(
            patched.metadata.annotations.unwrap()[INJECTED_ANNOTATION],
            "mydb"
        );
    }

    #[test]
    fn existing_volumes_and_annotations_are_kept() {
        let tunnels = [tunnel("mydb", "dev", 1, Some(16432))];
        let mut original = pod(&[("app", "db")], &["postgres"]);
        original.metadata.annotations = Some(BTreeMap::from([("team".into(), "data".into())]));
        original.spec.as_mut().unwrap().volumes = Some(vec![Default::default()]);
        let patched = apply(decide(&original, "dev", &tunnels, IMAGE, &[]), &original);
        assert_eq!(patched.spec.unwrap().volumes.unwrap().len(), 2);
        let annotations = patched.metadata.annotations.unwrap();
        assert_eq!(
            (
                annotations["team"].as_str(),
                annotations[INJECTED_ANNOTATION].as_str()
            ),
            ("data", "mydb")
        );
    }

    #[test]
    fn the_oldest_selecting_tunnel_wins() {
        let tunnels = [
            tunnel("newer", "dev", 20, Some(16001)),
            tunnel("older", "dev", 10, Some(16002)),
        ];
        let original = pod(&[("app", "db")], &["postgres"]);
        match decide(&original, "dev", &tunnels, IMAGE, &[]) {
            Decision::Inject { tunnel, .. } => assert_eq!(tunnel, "older"),
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    #[test]
    fn pods_the_tunnels_must_not_touch_are_skipped() {
        let tunnels = [
            tunnel("mydb", "dev", 1, Some(16432)),
            tunnel("waiting", "qa", 1, None),
            tunnel("system", "localup-system", 1, Some(16433)),
        ];
        let excluded = ["localup-system".to_owned()];
        let cases = [
            (
                pod(&[("app", "db")], &["postgres"]),
                "other",
                "another namespace",
            ),
            (
                pod(&[("app", "web")], &["nginx"]),
                "dev",
                "no matching labels",
            ),
            (
                pod(&[("app", "db")], &["postgres", "localup-client"]),
                "dev",
                "already injected",
            ),
            (
                pod(&[("app", "db")], &["postgres"]),
                "qa",
                "tunnel without a port yet",
            ),
            (
                pod(&[("app", "db")], &["postgres"]),
                "localup-system",
                "excluded namespace",
            ),
        ];
        for (pod, namespace, case) in cases {
            let decision = decide(&pod, namespace, &tunnels, IMAGE, &excluded);
            assert!(
                matches!(decision, Decision::Skip(_)),
                "{case}: {decision:?}"
            );
        }
    }
}
