//! Reconciles against a mock API server (see `fixtures`): the exact requests of a
//! pass, in order, for a fresh tunnel, a steady one, a spec change, a failure and the
//! deletion sweep.

use std::sync::Arc;

use http::Method;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use localup_protocol::token::Claims;
use serde_json::{Value, json};

use super::*;
use crate::allocator::PortBook;
use crate::crd::TcpTunnelStatus;
use crate::fixtures::*;
use crate::keys::PORTS_ANNOTATION;
use crate::relay_service::sync_patch;
use crate::token::RelayTrust;

const TUNNELS: &str = "/apis/localup.dev/v1alpha1/tcptunnels";
const SERVICE: &str = "/api/v1/namespaces/localup-system/services/localup-relay";
const JWT: &str = "/api/v1/namespaces/localup-system/secrets/localup-relay-jwt";
const TLS: &str = "/api/v1/namespaces/localup-system/secrets/localup-relay-tls";
const PODS: &str = "/api/v1/namespaces/dev/pods";
const TOKEN_SECRET: &str = "/api/v1/namespaces/dev/secrets/mydb-localup-token";
const STATUS: &str = "/apis/localup.dev/v1alpha1/namespaces/dev/tcptunnels/mydb/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/dev/events";

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

/// The reads of every pass, in order: each thing once.
fn reads(tunnels: &[TcpTunnel], service: &Service, pods: &[Pod]) -> Vec<Step> {
    vec![
        Step::get(
            TUNNELS,
            list("TcpTunnelList", "localup.dev/v1alpha1", tunnels),
        ),
        Step::get(SERVICE, to_json(service)),
        Step::get(JWT, to_json(&jwt_secret())),
        Step::get(TLS, to_json(&tls_secret())),
        Step::get(PODS, list("PodList", "v1", pods)).with_query("labelSelector=app%3Dpostgres"),
    ]
}

fn event(reason: &'static str) -> Step {
    Step::new(Method::POST, EVENTS, move |body| {
        assert_eq!(body["reason"], reason, "event {body}");
        (200, body.clone())
    })
}

fn status_of(call: &Call) -> TcpTunnelStatus {
    serde_json::from_value(call.body["status"].clone()).unwrap()
}

fn condition<'a>(
    status: &'a TcpTunnelStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// The relay Service after `patch` (a merge patch).
fn patched(service: &Service, patch: &Value) -> Service {
    let mut value = to_json(service);
    merge(&mut value, patch);
    serde_json::from_value(value).unwrap()
}

/// The status a pass writes for `tunnel` given the Service and pods, decided by the
/// pure planner: what a steady tunnel carries.
fn settled(ctx: &Context, tunnel: &TcpTunnel, service: &Service, pods: &[Pod]) -> TcpTunnel {
    let trust = RelayTrust {
        jwt_secret: JWT_SECRET.to_vec(),
        ca_pem: CA_PEM.into(),
    };
    let tunnels = [tunnel.clone()];
    let plan = plan::plan(
        Observed {
            tunnel,
            tunnels: &tunnels,
            relay_service: Some(service),
            relay_trust: Ok(&trust),
            namespace_labels: None,
            pods,
            token_written_by_this_process: false,
            now: Timestamp::now(),
        },
        &ctx.rules,
    );
    let status = plan.status.expect("a first pass writes the status");
    let digest = status.credentials_digest.clone().unwrap();
    ctx.tokens_written
        .lock()
        .unwrap()
        .insert(tunnel.uid().unwrap(), digest);
    tunnel.clone().with_status(status)
}

fn with_port(service: &Service, port: u16, holder: &str) -> Service {
    let book = PortBook::default().update(
        &[(port, holder.to_owned())].into(),
        1_700_000_000_000,
        Duration::from_secs(600),
    );
    let ports = [port].into();
    patched(service, &sync_patch(service, &ports, &book).unwrap())
}

const FINGERPRINT: &str = "remotePort=10000,port=5432,relay=10.0.0.7:4443";

#[tokio::test]
async fn a_fresh_tunnel_gets_a_port_a_token_and_a_status() {
    let (ctx, server) = Context::test();
    let tunnel = TcpTunnel::test();
    let service = relay_service();
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &[]);
    steps.extend([
        Step::write(Method::PATCH, SERVICE, Some(to_json(&service))),
        Step::write(Method::PATCH, TOKEN_SECRET, None).with_query("fieldManager=localup-operator"),
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel)))
            .with_query("fieldManager=localup-operator"),
        event("NoPods"),
    ]);
    let (task, calls) = server.run(steps);
    let action = reconcile(Arc::new(tunnel), ctx.clone())
        .await
        .expect("reconciled");
    finished(task).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 9, "{calls:#?}");

    // No Secret is read but the relay's two: the token Secret is only applied.
    let secrets: Vec<_> = calls
        .iter()
        .filter(|call| call.path.contains("/secrets/"))
        .map(|call| format!("{call}"))
        .collect();
    assert_eq!(
        secrets,
        [
            format!("GET {JWT}"),
            format!("GET {TLS}"),
            format!("PATCH {TOKEN_SECRET}")
        ]
    );

    // The relay Service: a tunnel port, recorded in the port book; the relay's own
    // ports kept; guarded by the resourceVersion read.
    let service_patch = &calls[5].body;
    assert_eq!(service_patch["metadata"]["resourceVersion"], "5");
    let ports = service_patch["spec"]["ports"].as_array().unwrap();
    let names: Vec<_> = ports
        .iter()
        .map(|port| port["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quic", "control-tcp", "tunnel-10000"]);
    let book: PortBook = serde_json::from_str(
        service_patch["metadata"]["annotations"][PORTS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(book.held[&10000], "dev/mydb");

    // The token Secret: token and CA, a pooled token for the port and its epoch.
    let secret = &calls[6].body;
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "mydb");
    let data = secret["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt", "token"]);
    let token: k8s_openapi::ByteString = serde_json::from_value(data["token"].clone()).unwrap();
    let claims = Claims::verify(std::str::from_utf8(&token.0).unwrap(), JWT_SECRET).unwrap();
    assert!(claims.pool);
    assert!(claims.allows_port(10000) && !claims.allows_port(10001));

    // The status: provisioned (the webhook may inject), not ready (no pod yet).
    let status = status_of(&calls[7]);
    assert_eq!(status.remote_port, Some(10000));
    assert_eq!(
        status.port_epoch.map(|epoch| epoch as u64),
        claims.port_epoch
    );
    assert_eq!(status.relay_address.as_deref(), Some("10.0.0.7:4443"));
    assert_eq!(status.endpoint.as_deref(), Some("203.0.113.7:10000"));
    assert_eq!(status.token_secret.as_deref(), Some("mydb-localup-token"));
    assert_eq!(
        status
            .token_expires_at
            .as_ref()
            .map(|time| time.0.as_second() as u64),
        claims.exp
    );
    assert_eq!(status.clients.as_deref(), Some("0/0"));
    assert_eq!(condition(&status, "Provisioned").status, "True");
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoPods")
    );
    assert_eq!(action, Action::requeue(plan::RECHECK_PROVISIONED));
}

/// Nothing changed: the pass reads each thing once (five requests, where the earlier
/// reconciler made seven) and writes nothing.
#[tokio::test]
async fn a_steady_tunnel_costs_five_reads_and_no_write() {
    let (ctx, server) = Context::test();
    let service = with_port(&relay_service(), 10000, "dev/mydb");
    let pods = [Pod::test("web-1")
        .owned_by("ReplicaSet", "web-7d9")
        .injected("mydb", FINGERPRINT)
        .ready()];
    let tunnel = settled(&ctx, &TcpTunnel::test(), &service, &pods);
    let status = tunnel.status.clone().unwrap();
    assert_eq!(status.clients.as_deref(), Some("1/1"));
    assert_eq!(condition(&status, "Ready").reason, "Serving");

    let (task, calls) = server.run(reads(std::slice::from_ref(&tunnel), &service, &pods));
    let action = reconcile(Arc::new(tunnel), ctx).await.expect("reconciled");
    finished(task).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 5);
    assert!(
        calls.iter().all(|call| call.method == Method::GET),
        "{calls:#?}"
    );
    // Back before the token's renewal (15 days for 30-day tokens), and within the hour.
    assert_eq!(action, Action::requeue(plan::RECHECK_READY));
}

/// A new remotePort: the Service moves the tunnel (the old port quarantined), a token
/// for the new port is written and the status follows. The Deployment of the pod that
/// carries the old sidecar is rolled by the next pass, once the webhook's cache has the
/// new status: rolled in the same pass, its new pods could be admitted too early.
#[tokio::test]
async fn a_spec_change_moves_the_port_and_then_rolls_the_pods() {
    let (ctx, server) = Context::test();
    let service = with_port(&relay_service(), 10000, "dev/mydb");
    let pods = [Pod::test("web-1")
        .owned_by("ReplicaSet", "web-7d9")
        .injected("mydb", FINGERPRINT)
        .ready()];
    let mut tunnel = settled(&ctx, &TcpTunnel::test(), &service, &pods).requesting(10003);
    tunnel.metadata.generation = Some(2);
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &pods);
    steps.extend([
        Step::write(Method::PATCH, SERVICE, Some(to_json(&service))),
        Step::write(Method::PATCH, TOKEN_SECRET, None),
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel))),
        event("PodsNotServing"),
    ]);
    let (task, calls) = server.run(steps);
    reconcile(Arc::new(tunnel.clone()), ctx.clone())
        .await
        .expect("reconciled");
    finished(task).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 9, "no roll yet: {calls:#?}");

    let service_patch = &calls[5].body;
    let names: Vec<_> = service_patch["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| port["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quic", "control-tcp", "tunnel-10003"]);
    let book: PortBook = serde_json::from_str(
        service_patch["metadata"]["annotations"][PORTS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(book.released[&10000].by, "dev/mydb", "the old port rests");
    let status = status_of(&calls[7]);
    assert_eq!(status.remote_port, Some(10003));
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(status.clients.as_deref(), Some("0/1"));
    assert_eq!(condition(&status, "Ready").reason, "PodsNotServing");

    // The next pass, with what the first one wrote (on a fresh mock API server).
    let (ctx, server) = Context::test();
    ctx.tokens_written.lock().unwrap().insert(
        tunnel.uid().unwrap(),
        status.credentials_digest.clone().unwrap(),
    );
    let tunnel = tunnel.with_status(status);
    let service = patched(&service, service_patch);
    let replica_set = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-7d9", "namespace": "dev", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-web", "controller": true}
        ]},
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dev", "generation": 4},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 4, "replicas": 1, "updatedReplicas": 1},
    });
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &pods);
    steps.extend([
        Step::get(
            "/apis/apps/v1/namespaces/dev/replicasets/web-7d9",
            replica_set,
        ),
        Step::get(
            "/apis/apps/v1/namespaces/dev/deployments/web",
            deployment.clone(),
        ),
        Step::write(
            Method::PATCH,
            "/apis/apps/v1/namespaces/dev/deployments/web",
            Some(deployment),
        ),
        event("RolledOut"),
    ]);
    let (task, calls) = server.run(steps);
    reconcile(Arc::new(tunnel), ctx).await.expect("reconciled");
    finished(task).await;
    let calls = calls.lock().unwrap().clone();
    let roll = &calls[7].body;
    let template = &roll["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(template["tunnels.localup.dev/mydb"], "10003");
    assert!(template["localup.dev/restartedAt"].is_string());
    assert!(
        roll["metadata"]["annotations"]["localup.dev/rolled"]
            .as_str()
            .unwrap()
            .starts_with("mydb:remotePort=10003,")
    );
}

/// The API server refuses the relay Service (as one without MixedProtocolLBService
/// refuses UDP and TCP ports on one LoadBalancer): Ready=False with the API's message,
/// a Warning Event, and the error goes to the retry policy.
#[tokio::test]
async fn a_refused_write_shows_on_the_tunnel() {
    let (ctx, server) = Context::test();
    let tunnel = TcpTunnel::test();
    let service = relay_service();
    let refusal = "Service \"localup-relay\" is invalid: spec.ports: Invalid value: \
                   []core.ServicePort{...}: may not contain more than 1 protocol when type is 'LoadBalancer'";
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &[]);
    steps.extend([
        Step::new(Method::PATCH, SERVICE, move |_| {
            status(422, "Invalid", refusal)
        }),
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel))),
        Step::new(Method::POST, EVENTS, |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "RelayServiceRejected");
            assert!(
                body["note"]
                    .as_str()
                    .unwrap()
                    .contains("more than 1 protocol")
            );
            (200, body.clone())
        }),
    ]);
    let (task, calls) = server.run(steps);
    let result = reconcile(Arc::new(tunnel.clone()), ctx.clone()).await;
    finished(task).await;
    let error = result.expect_err("the failure reaches the error policy");
    assert!(matches!(
        error,
        Error::Api {
            stage: Stage::RelayService,
            ..
        }
    ));
    let calls = calls.lock().unwrap().clone();
    let status = status_of(&calls[6]);
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RelayServiceRejected")
    );
    assert!(
        ready
            .message
            .contains("may not contain more than 1 protocol")
    );
    assert_eq!(condition(&status, "Provisioned").status, "False");
    assert_eq!(status.remote_port, None, "the port was never recorded");
    // Backoff: 1 s after the first failure.
    assert_eq!(
        error_policy(Arc::new(tunnel), &error, ctx),
        Action::requeue(Duration::from_secs(1))
    );
}

/// A deleted tunnel (no finalizer): the sweep takes its port off the Service into
/// quarantine and rolls the Deployment whose pods still carry its sidecar.
#[tokio::test]
async fn the_sweep_cleans_up_after_a_deleted_tunnel() {
    let (ctx, server) = Context::test();
    let service = with_port(&relay_service(), 10000, "dev/mydb");
    let pods = [Pod::test("web-1")
        .owned_by("ReplicaSet", "web-7d9")
        .injected("mydb", FINGERPRINT)
        .ready()];
    let replica_set = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-7d9", "namespace": "dev", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-web", "controller": true}
        ]},
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dev", "generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1},
    });
    let steps = vec![
        Step::get(
            TUNNELS,
            list::<TcpTunnel>("TcpTunnelList", "localup.dev/v1alpha1", &[]),
        ),
        Step::get(SERVICE, to_json(&service)),
        Step::write(Method::PATCH, SERVICE, Some(to_json(&service))),
        Step::get("/api/v1/pods", list("PodList", "v1", &pods))
            .with_query("labelSelector=localup.dev%2Ftunnel"),
        Step::get(
            "/apis/apps/v1/namespaces/dev/replicasets/web-7d9",
            replica_set,
        ),
        Step::get(
            "/apis/apps/v1/namespaces/dev/deployments/web",
            deployment.clone(),
        ),
        Step::write(
            Method::PATCH,
            "/apis/apps/v1/namespaces/dev/deployments/web",
            Some(deployment),
        ),
    ];
    let (task, calls) = server.run(steps);
    repair::sweep(&ctx).await.expect("swept");
    finished(task).await;
    let calls = calls.lock().unwrap().clone();
    let service_patch = &calls[2].body;
    let names: Vec<_> = service_patch["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| port["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quic", "control-tcp"]);
    let book: PortBook = serde_json::from_str(
        service_patch["metadata"]["annotations"][PORTS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(book.held.is_empty());
    assert_eq!(book.released[&10000].by, "dev/mydb");
    let template = &calls[6].body["spec"]["template"]["metadata"]["annotations"];
    assert!(
        template["tunnels.localup.dev/mydb"].is_null(),
        "the annotation is removed"
    );
    assert!(template["localup.dev/restartedAt"].is_string());
}

/// A Deployment this process rolled for the same reason just now is not rolled again, however
/// often the pass runs while the webhook stays broken.
#[tokio::test]
async fn a_repair_roll_is_not_repeated_within_the_interval() {
    let (ctx, server) = Context::test();
    let service = with_port(&relay_service(), 10000, "dev/mydb");
    let serving = [Pod::test("web-0")
        .owned_by("ReplicaSet", "web-7d9")
        .injected("mydb", FINGERPRINT)
        .ready()];
    let tunnel = settled(&ctx, &TcpTunnel::test(), &service, &serving);
    let missed = [Pod::test("web-1").owned_by("ReplicaSet", "web-7d9")];
    // Rolled a moment ago, by this operator process.
    let recently = localup_protocol::token::unix_now().max(ctx.started);
    let record = format!("mydb:{FINGERPRINT} {recently}");
    let replica_set = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-7d9", "namespace": "dev", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-web", "controller": true}
        ]},
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dev", "generation": 2,
                     "annotations": {"localup.dev/rolled": record}},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1},
    });
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &missed);
    steps.extend([
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel))),
        event("PodsNotServing"),
        Step::get(
            "/apis/apps/v1/namespaces/dev/replicasets/web-7d9",
            replica_set,
        ),
        Step::get("/apis/apps/v1/namespaces/dev/deployments/web", deployment),
    ]);
    let (task, calls) = server.run(steps);
    let action = reconcile(Arc::new(tunnel), ctx).await.expect("reconciled");
    finished(task).await;
    assert!(
        calls
            .lock()
            .unwrap()
            .iter()
            .all(|call| !call.path.ends_with("/deployments/web") || call.method == Method::GET),
        "no PATCH of the Deployment"
    );
    // Looked at again when the roll may be repeated (in 180 s), or sooner.
    assert_eq!(action, Action::requeue(plan::RECHECK_PROVISIONED));
}

/// A tunnel created by an earlier version carries its finalizer: it is removed, so
/// deleting the tunnel (or its namespace) never waits for the operator.
#[tokio::test]
async fn the_legacy_finalizer_is_removed() {
    let (ctx, server) = Context::test();
    let tunnel = TcpTunnel::test()
        .with_finalizer(crate::keys::LEGACY_FINALIZER)
        .deleted();
    let service = relay_service();
    let steps = vec![
        Step::get(
            TUNNELS,
            list(
                "TcpTunnelList",
                "localup.dev/v1alpha1",
                std::slice::from_ref(&tunnel),
            ),
        ),
        Step::get(SERVICE, to_json(&service)),
        Step::get(JWT, to_json(&jwt_secret())),
        Step::get(TLS, to_json(&tls_secret())),
        Step::new(
            Method::PATCH,
            "/apis/localup.dev/v1alpha1/namespaces/dev/tcptunnels/mydb",
            {
                let tunnel = to_json(&tunnel);
                move |body| {
                    assert_eq!(
                        body[1],
                        json!({"op": "remove", "path": "/metadata/finalizers/0"})
                    );
                    (200, tunnel)
                }
            },
        ),
    ];
    let (task, _calls) = server.run(steps);
    let action = reconcile(Arc::new(tunnel), ctx).await.expect("reconciled");
    finished(task).await;
    assert_eq!(action, Action::await_change());
}

/// A roll the API server refuses, after the pass wrote the status: Ready=False with
/// reason RolloutFailed on top of what the pass wrote, the port record and Provisioned
/// untouched.
#[tokio::test]
async fn a_refused_roll_keeps_what_the_pass_wrote() {
    let (ctx, server) = Context::test();
    let service = with_port(&relay_service(), 10000, "dev/mydb");
    let serving = [Pod::test("web-0")
        .owned_by("StatefulSet", "db")
        .injected("mydb", FINGERPRINT)
        .ready()];
    let tunnel = settled(&ctx, &TcpTunnel::test(), &service, &serving);
    let missed = [Pod::test("db-1").owned_by("StatefulSet", "db")];
    let mut steps = reads(std::slice::from_ref(&tunnel), &service, &missed);
    steps.extend([
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel))),
        event("PodsNotServing"),
        Step::new(
            Method::GET,
            "/apis/apps/v1/namespaces/dev/statefulsets/db",
            |_| {
                status(
                    403,
                    "Forbidden",
                    "statefulsets.apps \"db\" is forbidden: User cannot get resource",
                )
            },
        ),
        Step::write(Method::PATCH, STATUS, Some(to_json(&tunnel))),
        event("RolloutFailed"),
    ]);
    let (task, calls) = server.run(steps);
    let result = reconcile(Arc::new(tunnel), ctx).await;
    finished(task).await;
    assert!(matches!(
        result,
        Err(Error::Api {
            stage: Stage::Rollout,
            ..
        })
    ));
    let calls = calls.lock().unwrap().clone();
    let written = status_of(&calls[5]);
    let reported = status_of(&calls[8]);
    assert_eq!(
        reported.clients.as_deref(),
        Some("0/1"),
        "what the pass wrote"
    );
    assert_eq!(reported.remote_port, Some(10000));
    assert_eq!(reported.credentials_digest, written.credentials_digest);
    assert_eq!(condition(&reported, "Provisioned").status, "True");
    let ready = condition(&reported, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RolloutFailed")
    );
    assert!(ready.message.contains("forbidden"));
}
