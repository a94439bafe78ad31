//! Test fixtures: builders for tunnels, pods and the relay's objects, and a mock API
//! server that answers a scenario of expected requests in order, checking each and
//! recording every call so a test can count them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, LoadBalancerIngress, LoadBalancerStatus, Pod, PodSpec, PodStatus,
    Secret, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, OwnerReference, Time,
};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::Recorder;
use kube::{Client, Resource};
use serde_json::{Value, json};

use crate::config::Config;
use crate::controller::Context;
use crate::crd::{PROVISIONED, READY, TcpTunnel, TcpTunnelSpec, TcpTunnelStatus};
use crate::keys::{SIDECAR_ANNOTATION, TUNNEL_ANNOTATION, TUNNEL_LABEL, name_fragment};
use crate::plan::Rules;
use crate::sidecar::{self, Mode};

pub const RELAY_IP: &str = "10.0.0.7";
pub const RELAY_LB: &str = "203.0.113.7";
pub const JWT_SECRET: &[u8] = b"relay-signing-secret";
pub const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nrelay\n-----END CERTIFICATE-----\n";

fn created(second: i64) -> Option<Time> {
    Some(Time(Timestamp::from_second(second).unwrap()))
}

impl TcpTunnel {
    /// `dev/mydb`, selecting `app: postgres`, exposing 5432; nothing decided yet.
    pub fn test() -> Self {
        let mut tunnel = TcpTunnel::new(
            "mydb",
            TcpTunnelSpec {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "postgres".into())])),
                    ..Default::default()
                },
                port: 5432,
                remote_port: None,
                proxy_protocol: None,
                allowed_source_ranges: None,
                limits: None,
            },
        );
        let meta = tunnel.meta_mut();
        meta.namespace = Some("dev".into());
        meta.uid = Some("uid-mydb".into());
        meta.generation = Some(1);
        meta.resource_version = Some("1".into());
        meta.creation_timestamp = created(1_700_000_000);
        tunnel
    }

    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self.metadata.uid = Some(format!("uid-{name}"));
        self
    }

    pub fn requesting(mut self, port: i32) -> Self {
        self.spec.remote_port = Some(port);
        self
    }

    /// As the webhook sees a tunnel that can serve on `port`.
    pub fn provisioned(mut self, port: u16) -> Self {
        let name = self.metadata.name.clone().unwrap_or_default();
        let condition = |type_: &str, reason: &str| Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: self.metadata.generation,
            last_transition_time: Time(Timestamp::from_second(1_700_000_100).unwrap()),
        };
        self.status = Some(TcpTunnelStatus {
            remote_port: Some(i32::from(port)),
            port_epoch: Some(1_700_000_000_000),
            endpoint: Some(format!("{RELAY_LB}:{port}")),
            relay_address: Some(format!("{RELAY_IP}:4443")),
            token_secret: Some(crate::token::token_secret_name(&name)),
            token_expires_at: created(1_900_000_000),
            credentials_digest: Some("digest".into()),
            clients: Some("1/1".into()),
            observed_generation: self.metadata.generation,
            conditions: vec![
                condition(PROVISIONED, "Provisioned"),
                condition(READY, "Serving"),
            ],
        });
        self
    }

    pub fn with_status(mut self, status: TcpTunnelStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_finalizer(mut self, finalizer: &str) -> Self {
        self.metadata
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(finalizer.into());
        self
    }

    pub fn deleted(mut self) -> Self {
        self.metadata.deletion_timestamp = created(1_800_000_000);
        self
    }
}

pub trait PodBuilder {
    fn test(name: &str) -> Self;
    fn labelled(self, key: &str, value: &str) -> Self;
    fn annotated(self, key: &str, value: &str) -> Self;
    fn with_container(self, name: &str) -> Self;
    fn owned_by(self, kind: &str, name: &str) -> Self;
    fn injected(self, tunnel: &str, fingerprint: &str) -> Self;
    fn ready(self) -> Self;
    fn phase(self, phase: &str) -> Self;
}

impl PodBuilder for Pod {
    /// A pod of namespace `dev` labelled `app: postgres`, without containers.
    fn test(name: &str) -> Self {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("dev".into());
        pod.metadata.labels = Some(BTreeMap::from([("app".into(), "postgres".into())]));
        pod.spec = Some(PodSpec::default());
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        pod
    }

    fn labelled(mut self, key: &str, value: &str) -> Self {
        self.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }

    fn annotated(mut self, key: &str, value: &str) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }

    fn with_container(mut self, name: &str) -> Self {
        self.spec
            .get_or_insert_with(Default::default)
            .containers
            .push(Container {
                name: name.into(),
                ..Default::default()
            });
        self
    }

    fn owned_by(mut self, kind: &str, name: &str) -> Self {
        let api_version = if kind == "Job" { "batch/v1" } else { "apps/v1" };
        self.metadata.owner_references = Some(vec![OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller: Some(true),
            ..Default::default()
        }]);
        self
    }

    /// As the webhook leaves a pod it gave `tunnel`'s sidecar built for `fingerprint`.
    fn injected(self, tunnel: &str, fingerprint: &str) -> Self {
        self.with_container(sidecar::NAME)
            .annotated(TUNNEL_ANNOTATION, tunnel)
            .annotated(SIDECAR_ANNOTATION, fingerprint)
            .labelled(TUNNEL_LABEL, &name_fragment(tunnel))
    }

    /// The sidecar reports ready.
    fn ready(mut self) -> Self {
        let status = self.status.get_or_insert_with(Default::default);
        status
            .container_statuses
            .get_or_insert_with(Vec::new)
            .push(ContainerStatus {
                name: sidecar::NAME.into(),
                ready: true,
                ..Default::default()
            });
        self
    }

    fn phase(mut self, phase: &str) -> Self {
        self.status.get_or_insert_with(Default::default).phase = Some(phase.into());
        self
    }
}

/// The relay Service as the relay chart creates it, with a load-balancer address.
pub fn relay_service() -> Service {
    let port = |name: &str, protocol: &str| ServicePort {
        name: Some(name.into()),
        port: 4443,
        protocol: Some(protocol.into()),
        node_port: Some(30443),
        ..Default::default()
    };
    let mut service = Service {
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            cluster_ip: Some(RELAY_IP.into()),
            ports: Some(vec![port("quic", "UDP"), port("control-tcp", "TCP")]),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(RELAY_LB.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    service.metadata.name = Some("localup-relay".into());
    service.metadata.namespace = Some("localup-system".into());
    service.metadata.resource_version = Some("5".into());
    service
}

pub fn relay_secret(name: &str, key: &str, value: &[u8]) -> Secret {
    let mut secret = Secret {
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.to_vec()),
        )])),
        ..Default::default()
    };
    secret.metadata.name = Some(name.into());
    secret.metadata.namespace = Some("localup-system".into());
    secret
}

pub fn jwt_secret() -> Secret {
    relay_secret("localup-relay-jwt", "jwt-secret", JWT_SECRET)
}

pub fn tls_secret() -> Secret {
    relay_secret("localup-relay-tls", "tls.crt", CA_PEM.as_bytes())
}

/// A list response as the API server sends it.
pub fn list<T: serde::Serialize>(kind: &str, api_version: &str, items: &[T]) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": "100"},
        "items": items,
    })
}

pub fn not_found(what: &str) -> (u16, Value) {
    status(404, "NotFound", &format!("{what} not found"))
}

pub fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

type Respond = Box<dyn FnOnce(&Value) -> (u16, Value) + Send>;

/// One request the scenario expects, and how it is answered.
pub struct Step {
    pub method: Method,
    pub path: String,
    /// A piece the query string must contain.
    pub query: Option<String>,
    pub respond: Respond,
}

impl Step {
    pub fn new(
        method: Method,
        path: impl Into<String>,
        respond: impl FnOnce(&Value) -> (u16, Value) + Send + 'static,
    ) -> Self {
        Step {
            method,
            path: path.into(),
            query: None,
            respond: Box::new(respond),
        }
    }

    pub fn get(path: impl Into<String>, body: Value) -> Self {
        Step::new(Method::GET, path, move |_| (200, body))
    }

    pub fn missing(path: impl Into<String>) -> Self {
        Step::new(Method::GET, path, |_| not_found("object"))
    }

    /// A write answered with what was sent (merged into `object` when given, as the API
    /// server returns the whole object).
    pub fn write(method: Method, path: impl Into<String>, object: Option<Value>) -> Self {
        Step::new(method, path, move |body| {
            let mut answer = object.unwrap_or(Value::Null);
            merge(&mut answer, body);
            (200, answer)
        })
    }

    pub fn with_query(mut self, query: &str) -> Self {
        self.query = Some(query.into());
        self
    }
}

/// RFC 7386 merge of `patch` into `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// A request the mock API server received.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

pub type Calls = Arc<Mutex<Vec<Call>>>;

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub struct ApiServerVerifier {
    handle: ApiServerHandle,
    calls: Calls,
}

impl ApiServerVerifier {
    /// Answers `steps` in order, asserting each request's method, path and query. The
    /// task ends after the last step: a request beyond the scenario then fails in the
    /// client, and a missing one times out in [`finished`].
    pub fn run(mut self, steps: Vec<Step>) -> (tokio::task::JoinHandle<()>, Calls) {
        let calls = self.calls.clone();
        let task = tokio::spawn(async move {
            for (index, step) in steps.into_iter().enumerate() {
                let (request, send) = self.handle.next_request().await.unwrap_or_else(|| {
                    panic!(
                        "step {index} ({} {}) never requested",
                        step.method, step.path
                    )
                });
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("request bodies are JSON")
                };
                self.calls.lock().unwrap().push(Call {
                    method: method.clone(),
                    path: path.clone(),
                    query: query.clone(),
                    body: body.clone(),
                });
                assert_eq!(
                    (&method, path.as_str()),
                    (&step.method, step.path.as_str()),
                    "step {index}: unexpected request (query {query})"
                );
                if let Some(expected) = &step.query {
                    assert!(
                        query.contains(expected.as_str()),
                        "step {index} {path}: query {query:?} lacks {expected:?}"
                    );
                }
                let (code, answer) = (step.respond)(&body);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (task, calls)
    }
}

/// Waits for the scenario to complete: every expected request made.
pub async fn finished(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(std::time::Duration::from_secs(2), task)
        .await
        .expect("timeout on the mock API server: a request of the scenario was not made")
        .expect("scenario completed without errors");
}

impl Context {
    /// A context on a mock API server, with the default flags, native sidecars and a
    /// serving webhook.
    pub fn test() -> (Arc<Self>, ApiServerVerifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let config = <Config as clap::Parser>::try_parse_from(["localup-operator"]).unwrap();
        let recorder = Recorder::new(client.clone(), crate::keys::MANAGER.into());
        let rules = Rules::from_config(&config, Mode::Native);
        let ctx = Context::new(
            client,
            config,
            rules,
            Arc::default(),
            recorder,
            Arc::new(|| true),
        );
        (
            Arc::new(ctx),
            ApiServerVerifier {
                handle,
                calls: Arc::default(),
            },
        )
    }
}
