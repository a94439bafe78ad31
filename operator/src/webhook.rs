//! The mutating admission webhook: gives each new pod that a provisioned TcpTunnel
//! selects the `localup-client` sidecar. It decides from the operator's TcpTunnel cache
//! alone (no API reads on the admission path), and every failure admits the pod
//! unchanged: a broken operator must never block pod creation. Pods it leaves without a
//! sidecar that should have one are rolled later by the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::crd::TcpTunnel;
use crate::guard;
use crate::keys::{SIDECAR_ANNOTATION, TUNNEL_ANNOTATION, TUNNEL_LABEL, name_fragment};
use crate::metrics::Metrics;
use crate::sidecar::{self, Mode, Target};
use crate::webhook_tls::{ServingCertificate, WEBHOOK_PATH};
use crate::workloads;

/// How sidecars are injected: the same for every pod.
#[derive(Debug, Clone)]
pub struct Injector {
    pub settings: sidecar::Settings,
    /// Namespaces whose pods are never touched: the operator's own and kube-system.
    pub excluded_namespaces: Vec<String>,
    /// Inject only pods annotated `localup.dev/inject: "true"`.
    pub require_consent: bool,
    /// A new secret for each pod's drain endpoint ([`sidecar::new_drain_token`]).
    pub drain_token: fn() -> String,
}

#[derive(Debug)]
pub enum Decision {
    Inject {
        tunnel: String,
        patch: json_patch::Patch,
    },
    Skip(&'static str),
    /// A Job's pod without native sidecars: a plain sidecar container would keep it
    /// from ever completing, so it is admitted unchanged and the tunnel's Events say so.
    LeaveJobAlone {
        tunnel: ObjectReference,
    },
}

/// `/` in a JSON pointer segment is written `~1`.
fn pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Operations adding `entries` to the map at `path` (which may not exist yet).
fn add_to_map(path: &str, exists: bool, entries: &[(&str, String)]) -> Vec<Value> {
    if !exists {
        let map: serde_json::Map<String, Value> = entries
            .iter()
            .map(|(key, value)| ((*key).to_owned(), Value::from(value.clone())))
            .collect();
        return vec![json!({"op": "add", "path": path, "value": map})];
    }
    entries
        .iter()
        .map(|(key, value)| json!({"op": "add", "path": format!("{path}/{}", pointer(key)), "value": value}))
        .collect()
}

/// What to do with `pod`, created in `namespace`, given the known tunnels. When several
/// tunnels select the pod, the oldest one wins; it is injected only once it can serve
/// (Provisioned: port, token Secret and relay Service in place).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    tunnels: &[Arc<TcpTunnel>],
    injector: &Injector,
) -> Decision {
    if injector
        .excluded_namespaces
        .iter()
        .any(|excluded| excluded == namespace)
    {
        return Decision::Skip("namespace excluded");
    }
    if sidecar::find(pod).is_some() {
        return Decision::Skip("already has a localup-client container");
    }
    let Some(tunnel) = guard::winner(namespace, pod, tunnels.iter().map(AsRef::as_ref)) else {
        return Decision::Skip("no TcpTunnel selects it");
    };
    if injector.require_consent && !workloads::has_consent(pod) {
        return Decision::Skip("no localup.dev/inject: \"true\" annotation");
    }
    let status = tunnel.status.clone().unwrap_or_default();
    let (Some(remote_port), Some(secret), Some(relay)) = (
        tunnel.assigned_port(),
        status.token_secret.as_deref(),
        status.relay_address.as_deref(),
    ) else {
        return Decision::Skip("its TcpTunnel is not provisioned yet");
    };
    if !tunnel.is_provisioned() {
        return Decision::Skip("its TcpTunnel is not provisioned yet");
    }
    let settings = &injector.settings;
    if settings.mode == Mode::Container && workloads::is_job_pod(pod) {
        return Decision::LeaveJobAlone {
            tunnel: tunnel.object_ref(&()),
        };
    }
    let target = Target {
        secret_name: secret,
        local_port: tunnel.spec.port,
        remote_port,
        relay_address: relay,
    };
    let Some(health_port) = sidecar::health_port(pod, settings.health_port, tunnel.spec.port)
    else {
        return Decision::Skip("no free port for the sidecar's health endpoint");
    };
    let drain_token = (injector.drain_token)();
    let container = sidecar::container(settings, target, health_port, &drain_token);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut operations = vec![match settings.mode {
        Mode::Native => match spec.init_containers.as_deref() {
            Some([_, ..]) => {
                json!({"op": "add", "path": "/spec/initContainers/0", "value": container})
            }
            _ => json!({"op": "add", "path": "/spec/initContainers", "value": [container]}),
        },
        Mode::Container => json!({"op": "add", "path": "/spec/containers/-", "value": container}),
    }];
    let pre_stop = sidecar::pre_stop_drain(health_port, &drain_token);
    for (index, app) in spec.containers.iter().enumerate() {
        let path = format!("/spec/containers/{index}/lifecycle");
        match &app.lifecycle {
            None => {
                operations.push(json!({"op": "add", "path": path, "value": {"preStop": pre_stop}}))
            }
            Some(lifecycle) if lifecycle.pre_stop.is_none() => {
                operations.push(
                    json!({"op": "add", "path": format!("{path}/preStop"), "value": pre_stop}),
                );
            }
            // The app's own hook stays: it decides how its container stops.
            Some(_) => {}
        }
    }
    let volume = sidecar::volume(secret);
    operations.push(match spec.volumes {
        Some(_) => json!({"op": "add", "path": "/spec/volumes/-", "value": volume}),
        None => json!({"op": "add", "path": "/spec/volumes", "value": [volume]}),
    });
    let name = tunnel.name_any();
    operations.extend(add_to_map(
        "/metadata/annotations",
        pod.metadata.annotations.is_some(),
        &[
            (TUNNEL_ANNOTATION, name.clone()),
            (SIDECAR_ANNOTATION, target.fingerprint()),
        ],
    ));
    operations.extend(add_to_map(
        "/metadata/labels",
        pod.metadata.labels.is_some(),
        &[(TUNNEL_LABEL, name_fragment(&name))],
    ));
    let patch = serde_json::from_value(operations.into()).expect("well-formed JSON patch");
    Decision::Inject {
        tunnel: name,
        patch,
    }
}

/// The webhook's state.
pub struct Webhook {
    pub tunnels: Store<TcpTunnel>,
    pub injector: Injector,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

pub async fn serve(
    addr: SocketAddr,
    certificate: &ServingCertificate,
    webhook: Arc<Webhook>,
    serving: Arc<AtomicBool>,
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
                serving.store(true, Ordering::Relaxed);
                tracing::info!(%addr, "webhook serving");
            }
            shutdown.cancelled().await;
            serving.store(false, Ordering::Relaxed);
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
    let response = match decide(pod, namespace, &tunnels, &webhook.injector) {
        Decision::Skip(why) => {
            tracing::debug!(namespace, pod = pod_name, why, "pod admitted unchanged");
            webhook.metrics.admitted("skipped");
            allowed
        }
        Decision::LeaveJobAlone { tunnel } => {
            tracing::info!(
                namespace,
                pod = pod_name,
                "Job pod admitted without the sidecar"
            );
            webhook.metrics.admitted("skipped");
            let recorder = webhook.recorder.clone();
            let note = format!(
                "pod {pod_name} of a Job was left without the sidecar: the API server has no \
                 native sidecars (Kubernetes 1.29+, or the operator's --sidecar-mode \
                 container), and a sidecar container would keep the Job from completing"
            );
            tokio::spawn(async move {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "JobPodLeftAlone".into(),
                    note: Some(note),
                    action: "Inject".into(),
                    secondary: None,
                };
                if let Err(error) = recorder.publish(&event, &tunnel).await {
                    tracing::warn!(%error, "cannot record an event");
                }
            });
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

    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, ExecAction, Lifecycle, LifecycleHandler,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use k8s_openapi::jiff::Timestamp;
    use localup_runtime::logging::LogFormat;

    use super::*;
    use crate::fixtures::PodBuilder;
    use crate::keys::CONSENT_ANNOTATION;

    const IMAGE: &str = "ghcr.io/localup-dev/localup-client:0.1.0";

    fn injector(mode: Mode) -> Injector {
        Injector {
            settings: sidecar::Settings {
                image: IMAGE.into(),
                pull_policy: "IfNotPresent".into(),
                uid: 65532,
                health_port: 9808,
                resources: Default::default(),
                log_format: LogFormat::Text,
                mode,
            },
            excluded_namespaces: vec!["localup-system".into()],
            require_consent: false,
            drain_token: || "drain".into(),
        }
    }

    fn tunnels(list: Vec<TcpTunnel>) -> Vec<Arc<TcpTunnel>> {
        list.into_iter().map(Arc::new).collect()
    }

    fn apply(decision: Decision, pod: &Pod) -> Pod {
        let Decision::Inject { patch, .. } = decision else {
            panic!("expected an injection, got {decision:?}");
        };
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn app_pod() -> Pod {
        Pod::test("web-1").with_container("postgres")
    }

    #[test]
    fn container_mode_appends_the_sidecar_and_marks_the_pod() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let original = app_pod();
        let patched = apply(
            decide(&original, "dev", &tunnels, &injector(Mode::Container)),
            &original,
        );
        let spec = patched.spec.as_ref().unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["postgres", "localup-client"]);
        assert!(spec.init_containers.is_none());
        let sidecar = &spec.containers[1];
        assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
        assert_eq!(sidecar.restart_policy, None);
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("mydb-localup-token")
        );
        let annotations = patched.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[TUNNEL_ANNOTATION], "mydb");
        assert_eq!(
            annotations[SIDECAR_ANNOTATION],
            "remotePort=16432,port=5432,relay=10.0.0.7:4443"
        );
        assert_eq!(
            patched.metadata.labels.as_ref().unwrap()[TUNNEL_LABEL],
            "mydb"
        );
        assert_eq!(patched.metadata.labels.as_ref().unwrap()["app"], "postgres");
    }

    #[test]
    fn native_mode_puts_the_sidecar_first_among_the_init_containers() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let mut original = app_pod();
        original.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "migrate".into(),
            ..Default::default()
        }]);
        let patched = apply(
            decide(&original, "dev", &tunnels, &injector(Mode::Native)),
            &original,
        );
        let spec = patched.spec.unwrap();
        let init: Vec<_> = spec
            .init_containers
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, ["localup-client", "migrate"]);
        assert_eq!(
            spec.init_containers.as_ref().unwrap()[0]
                .restart_policy
                .as_deref(),
            Some("Always")
        );
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["postgres"], "the app's containers are untouched");

        // Without init containers, the list is created.
        let original = app_pod();
        let patched = apply(
            decide(&original, "dev", &tunnels, &injector(Mode::Native)),
            &original,
        );
        assert_eq!(patched.spec.unwrap().init_containers.unwrap().len(), 1);
    }

    #[test]
    fn job_pods_get_a_native_sidecar_or_are_left_alone_with_an_event() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let job_pod = app_pod().owned_by("Job", "nightly");
        match decide(&job_pod, "dev", &tunnels, &injector(Mode::Container)) {
            Decision::LeaveJobAlone { tunnel } => {
                assert_eq!(tunnel.name.as_deref(), Some("mydb"));
                assert_eq!(tunnel.kind.as_deref(), Some("TcpTunnel"));
            }
            other => panic!("{other:?}"),
        }
        let patched = apply(
            decide(&job_pod, "dev", &tunnels, &injector(Mode::Native)),
            &job_pod,
        );
        assert!(sidecar::find(&patched).is_some());
    }

    #[test]
    fn nothing_is_injected_until_the_tunnel_can_serve() {
        let mut waiting = TcpTunnel::test().provisioned(16432);
        // Port recorded, but the token Secret is not written yet.
        let status = waiting.status.as_mut().unwrap();
        status.token_secret = None;
        let original = app_pod();
        assert!(matches!(
            decide(
                &original,
                "dev",
                &tunnels(vec![waiting]),
                &injector(Mode::Native)
            ),
            Decision::Skip(_)
        ));
        // Provisioned=False (refused, or not yet done).
        let mut refused = TcpTunnel::test().provisioned(16432);
        refused.status.as_mut().unwrap().conditions[0].status = "False".into();
        assert!(matches!(
            decide(
                &original,
                "dev",
                &tunnels(vec![refused]),
                &injector(Mode::Native)
            ),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(
                &original,
                "dev",
                &tunnels(vec![TcpTunnel::test()]),
                &injector(Mode::Native)
            ),
            Decision::Skip(_)
        ));
    }

    /// The kubelet runs a container's preStop hook before it signals the container: each
    /// app container without a hook of its own asks the sidecar to drain first.
    #[test]
    fn app_containers_drain_the_sidecar_before_they_stop() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let own_hook = LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["nginx".into(), "-s".into(), "quit".into()]),
            }),
            ..Default::default()
        };
        let mut original = app_pod().with_container("metrics").with_container("proxy");
        let containers = &mut original.spec.as_mut().unwrap().containers;
        containers[1].lifecycle = Some(Lifecycle {
            post_start: Some(own_hook.clone()),
            ..Default::default()
        });
        containers[2].lifecycle = Some(Lifecycle {
            pre_stop: Some(own_hook.clone()),
            ..Default::default()
        });
        for mode in [Mode::Native, Mode::Container] {
            let patched = apply(
                decide(&original, "dev", &tunnels, &injector(mode)),
                &original,
            );
            let spec = patched.spec.as_ref().unwrap();
            let sidecar = sidecar::find(&patched).unwrap();
            let env = |name: &str| {
                let vars = sidecar.env.as_ref().unwrap();
                vars.iter()
                    .find(|var| var.name == name)
                    .and_then(|var| var.value.clone())
            };
            assert_eq!(env("LOCALUP_DRAIN_TOKEN").as_deref(), Some("drain"));
            assert_eq!(env("LOCALUP_HEALTH_ADDR").as_deref(), Some("0.0.0.0:9808"));
            let pre_stop = |index: usize| {
                spec.containers[index]
                    .lifecycle
                    .as_ref()
                    .unwrap()
                    .pre_stop
                    .clone()
            };
            let drain = pre_stop(0).unwrap().http_get.unwrap();
            assert_eq!(drain.path.as_deref(), Some("/drain"));
            assert_eq!(drain.port, IntOrString::Int(9808));
            let header = &drain.http_headers.unwrap()[0];
            assert_eq!(
                (header.name.as_str(), header.value.as_str()),
                ("Authorization", "Bearer drain")
            );
            assert!(
                pre_stop(1).unwrap().http_get.is_some(),
                "added beside a postStart hook"
            );
            assert_eq!(
                spec.containers[1].lifecycle.as_ref().unwrap().post_start,
                Some(own_hook.clone())
            );
            assert_eq!(
                pre_stop(2),
                Some(own_hook.clone()),
                "the app's own preStop hook stays"
            );
        }
    }

    #[test]
    fn every_pod_gets_a_drain_token_of_its_own() {
        let tokens: std::collections::HashSet<String> =
            (0..100).map(|_| sidecar::new_drain_token()).collect();
        assert_eq!(tokens.len(), 100);
        assert!(
            tokens
                .iter()
                .all(|token| token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()))
        );
    }

    #[test]
    fn consent_is_required_when_the_operator_says_so() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let consenting = Injector {
            require_consent: true,
            ..injector(Mode::Native)
        };
        let plain = app_pod();
        assert!(matches!(
            decide(&plain, "dev", &tunnels, &consenting),
            Decision::Skip(_)
        ));
        let agreeing = app_pod().annotated(CONSENT_ANNOTATION, "true");
        let patched = apply(decide(&agreeing, "dev", &tunnels, &consenting), &agreeing);
        let annotations = patched.metadata.annotations.unwrap();
        assert_eq!(
            annotations[CONSENT_ANNOTATION], "true",
            "existing annotations kept"
        );
        assert_eq!(annotations[TUNNEL_ANNOTATION], "mydb");
    }

    #[test]
    fn the_health_port_avoids_the_pods_ports() {
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432)]);
        let mut original = app_pod();
        original.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
            container_port: 9808,
            ..Default::default()
        }]);
        let patched = apply(
            decide(&original, "dev", &tunnels, &injector(Mode::Container)),
            &original,
        );
        let sidecar = sidecar::find(&patched).unwrap();
        let env: BTreeMap<_, _> = sidecar
            .env
            .iter()
            .flatten()
            .map(|var| (var.name.clone(), var.value.clone().unwrap()))
            .collect();
        assert_eq!(env["LOCALUP_HEALTH_ADDR"], "0.0.0.0:9809");
    }

    #[test]
    fn the_oldest_selecting_tunnel_wins() {
        let at = |second| Some(Time(Timestamp::from_second(second).unwrap()));
        let mut newer = TcpTunnel::test().named("newer").provisioned(16001);
        newer.metadata.creation_timestamp = at(20);
        let mut older = TcpTunnel::test().named("older").provisioned(16002);
        older.metadata.creation_timestamp = at(10);
        let original = app_pod();
        match decide(
            &original,
            "dev",
            &tunnels(vec![newer, older]),
            &injector(Mode::Native),
        ) {
            Decision::Inject { tunnel, .. } => assert_eq!(tunnel, "older"),
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    #[test]
    fn pods_the_tunnels_must_not_touch_are_skipped() {
        let mut deleting = TcpTunnel::test().named("deleting").provisioned(16434);
        deleting.metadata.namespace = Some("gone".into());
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        let mut system = TcpTunnel::test().named("system").provisioned(16433);
        system.metadata.namespace = Some("localup-system".into());
        let tunnels = tunnels(vec![TcpTunnel::test().provisioned(16432), system, deleting]);
        let cases = [
            (app_pod(), "other", "another namespace"),
            (
                Pod::test("web")
                    .labelled("app", "web")
                    .with_container("nginx"),
                "dev",
                "no matching labels",
            ),
            (
                app_pod().with_container("localup-client"),
                "dev",
                "already injected",
            ),
            (app_pod(), "localup-system", "excluded namespace"),
            (app_pod(), "gone", "tunnel being deleted"),
        ];
        for (pod, namespace, case) in cases {
            let decision = decide(&pod, namespace, &tunnels, &injector(Mode::Native));
            assert!(
                matches!(decision, Decision::Skip(_)),
                "{case}: {decision:?}"
            );
        }
    }
}
