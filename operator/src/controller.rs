//! The reconciler: for each TcpTunnel, assign a relay port, write the sidecar's token
//! Secret, put the port on the relay's LoadBalancer Service, roll the Deployments it
//! selects, and report all of it as status, conditions and events. Deleting a tunnel
//! (finalizer) takes its port off the Service, deletes its Secret and rolls the sidecar
//! out again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use localup_protocol::token::Claims;

use crate::allocator::{self, Decision};
use crate::config::Config;
use crate::crd::{API_VERSION, KIND, TcpTunnel, TcpTunnelStatus};
use crate::metrics::Metrics;
use crate::resources::{self, SidecarCredentials};
use crate::status::{self, Outcome};

pub const FINALIZER: &str = "localup.dev/cleanup";
const FIELD_MANAGER: &str = "localup-operator";
/// How often a tunnel that cannot be served yet is looked at again (a conflicting port
/// may have been freed, a missing relay installed).
const RETRY_NOT_READY: Duration = Duration::from_secs(10);
const RECHECK_READY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Serialises port decisions and relay Service updates within this replica; leader
    /// election keeps other replicas out.
    pub allocation: tokio::sync::Mutex<()>,
    /// Consecutive failures per tunnel, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

pub async fn reconcile(tunnel: Arc<TcpTunnel>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = tunnel.namespace().unwrap_or_default();
    let api: Api<TcpTunnel> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = tunnel.key();
    let action = match finalizer(&api, FINALIZER, tunnel, |event| async {
        match event {
            finalizer::Event::Apply(tunnel) => apply(&tunnel, &ctx).await,
            finalizer::Event::Cleanup(tunnel) => cleanup(&tunnel, &ctx).await,
        }
    })
    .await
    {
        Ok(action) => action,
        // A stale queued event for a tunnel that is already gone: nothing left to do.
        Err(
            finalizer::Error::AddFinalizer(kube::Error::Api(status))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(status)),
        ) if status.code == 404 => Action::await_change(),
        Err(error) => return Err(Error::Finalizer(Box::new(error))),
    };
    ctx.failures.lock().unwrap().remove(&key);
    Ok(action)
}

/// Retries with exponential backoff (1 s doubling to 5 min), so an API server that is
/// away for a while is neither hammered nor waited for too long once it is back.
pub fn error_policy(tunnel: Arc<TcpTunnel>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut failures = ctx.failures.lock().unwrap();
        let count = failures.entry(tunnel.key()).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let delay = Duration::from_secs(1u64 << failures.min(9).saturating_sub(1))
        .min(Duration::from_secs(300));
    tracing::warn!(tunnel = %tunnel.key(), %error, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconciled("error");
    Action::requeue(delay)
}

/// What provisioning achieved: the outcome and what the status must record.
struct Provisioned {
    outcome: Outcome,
    port: Option<u16>,
    token_secret: Option<String>,
    /// When the token must be replaced (Unix seconds).
    renew_at: Option<u64>,
}

impl Provisioned {
    fn failed(outcome: Outcome, port: Option<u16>) -> Self {
        Self {
            outcome,
            port,
            token_secret: None,
            renew_at: None,
        }
    }
}

async fn apply(tunnel: &TcpTunnel, ctx: &Context) -> Result<Action> {
    let provisioned = provision(tunnel, ctx).await?;
    publish_status(tunnel, ctx, &provisioned).await?;
    match (&provisioned.token_secret, provisioned.port) {
        // Only now that the status names the port and the token Secret can the webhook
        // give the rolled pods their sidecar.
        (Some(_), port) => roll_deployments(tunnel, ctx, port).await?,
        // No port any more (a conflicting or invalid spec): pods lose the sidecar.
        (None, None) => roll_deployments(tunnel, ctx, None).await?,
        // The port is held but the relay is not reachable yet: pods stay as they are.
        (None, Some(_)) => {}
    }
    // A port this tunnel gave up leaves the relay Service only now that its status no
    // longer records it.
    if tunnel.assigned_port().is_some() && provisioned.port.is_none() {
        sync_relay_service(ctx).await?;
    }
    ctx.metrics.reconciled(provisioned.outcome.reason());
    Ok(match (&provisioned.outcome, provisioned.renew_at) {
        (Outcome::Assigned { .. }, Some(renew_at)) => {
            let until_renewal = Duration::from_secs(renew_at.saturating_sub(unix_now()).max(1));
            Action::requeue(until_renewal.min(RECHECK_READY))
        }
        _ => Action::requeue(RETRY_NOT_READY),
    })
}

async fn provision(tunnel: &TcpTunnel, ctx: &Context) -> Result<Provisioned> {
    if let Err(problem) = resources::tunnel_selector(tunnel) {
        return Ok(Provisioned::failed(
            Outcome::InvalidSelector { problem },
            None,
        ));
    }
    let port = match assign_port(tunnel, ctx).await? {
        Decision::Assigned(port) => port,
        Decision::OutOfRange { requested, range } => {
            return Ok(Provisioned::failed(
                Outcome::PortOutOfRange { requested, range },
                None,
            ));
        }
        Decision::Conflict { requested, holder } => {
            return Ok(Provisioned::failed(
                Outcome::PortConflict { requested, holder },
                None,
            ));
        }
        Decision::Exhausted { range } => {
            return Ok(Provisioned::failed(Outcome::PortsExhausted { range }, None));
        }
    };
    let config = &ctx.config;
    let relay_not_found = || Outcome::RelayNotFound {
        service: format!("{}/{}", config.relay_namespace, config.relay_service),
    };
    let Some(service) = sync_relay_service(ctx).await? else {
        return Ok(Provisioned::failed(relay_not_found(), Some(port)));
    };
    let Some(relay_address) = resources::relay_address(&service, config.relay_control_port) else {
        return Ok(Provisioned::failed(relay_not_found(), Some(port)));
    };
    let trust = match relay_trust(ctx).await? {
        Ok(trust) => trust,
        Err(problem) => {
            return Ok(Provisioned::failed(
                Outcome::RelaySecretMissing { problem },
                Some(port),
            ));
        }
    };
    let (token_secret, renew_at) = write_token(tunnel, ctx, &trust, relay_address, port).await?;
    let outcome = match resources::endpoint(&service, config.public_address.as_deref(), port) {
        Some(endpoint) => Outcome::Assigned { port, endpoint },
        None => Outcome::AwaitingAddress {
            port,
            service: format!("{}/{}", config.relay_namespace, config.relay_service),
        },
    };
    Ok(Provisioned {
        outcome,
        port: Some(port),
        token_secret: Some(token_secret),
        renew_at: Some(renew_at),
    })
}

/// Decides the tunnel's port from every tunnel's status as the API server has it now,
/// and records a new assignment before anyone else may decide.
async fn assign_port(tunnel: &TcpTunnel, ctx: &Context) -> Result<Decision> {
    let _decisions = ctx.allocation.lock().await;
    let all: Api<TcpTunnel> = Api::all(ctx.client.clone());
    let tunnels = all.list(&ListParams::default()).await?.items;
    let holdings = allocator::holdings(&tunnels);
    let fresh = tunnels
        .iter()
        .find(|candidate| candidate.uid() == tunnel.uid())
        .unwrap_or(tunnel);
    let current = fresh.assigned_port();
    let requested = tunnel
        .spec
        .remote_port
        .map(|port| u16::try_from(port).unwrap_or(0));
    let decision = allocator::decide(
        &tunnel.key(),
        requested,
        current,
        ctx.config.port_range,
        &holdings,
    );
    if let Decision::Assigned(port) = decision
        && current != Some(port)
    {
        let mut status = fresh.status.clone().unwrap_or_default();
        status.remote_port = Some(i32::from(port));
        apply_status(tunnel, ctx, &status).await?;
        tracing::info!(tunnel = %tunnel.key(), port, "port assigned");
        ctx.metrics.assigned_ports.set(holdings.len() as i64 + 1);
    }
    Ok(decision)
}

/// Makes the relay Service's tunnel ports exactly the ports held by live tunnels, and
/// returns the Service (`None` when it does not exist). A concurrent change to the
/// Service makes the replace fail on its resourceVersion, and the reconcile is retried.
async fn sync_relay_service(ctx: &Context) -> Result<Option<Service>> {
    let _decisions = ctx.allocation.lock().await;
    let config = &ctx.config;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &config.relay_namespace);
    let Some(mut service) = services.get_opt(&config.relay_service).await? else {
        return Ok(None);
    };
    let all: Api<TcpTunnel> = Api::all(ctx.client.clone());
    let live: Vec<TcpTunnel> = all
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|tunnel| tunnel.metadata.deletion_timestamp.is_none())
        .collect();
    let ports: BTreeSet<u16> = allocator::holdings(&live).into_keys().collect();
    ctx.metrics.assigned_ports.set(ports.len() as i64);
    let spec = service.spec.get_or_insert_with(Default::default);
    let existing = spec.ports.clone().unwrap_or_default();
    let desired = resources::relay_service_ports(&existing, &ports);
    if desired == existing {
        return Ok(Some(service));
    }
    spec.ports = Some(desired);
    service.metadata.managed_fields = None;
    let service = services
        .replace(&config.relay_service, &PostParams::default(), &service)
        .await?;
    tracing::info!(service = %config.relay_service, ?ports, "relay Service ports updated");
    Ok(Some(service))
}

/// What the operator needs from the relay's Secrets to mint tokens sidecars can use.
struct RelayTrust {
    jwt_secret: Vec<u8>,
    ca_pem: String,
}

/// The relay's signing secret and certificate, or what is missing, said so a user can
/// fix it.
async fn relay_trust(ctx: &Context) -> Result<Result<RelayTrust, String>> {
    let config = &ctx.config;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &config.relay_namespace);
    let read = async |name: &str, key: &str| -> Result<Result<Vec<u8>, String>> {
        let Some(secret) = secrets.get_opt(name).await? else {
            return Ok(Err(format!(
                "the relay's Secret {}/{name} does not exist (is the localup-relay chart installed?)",
                config.relay_namespace
            )));
        };
        Ok(secret
            .data
            .and_then(|mut data| data.remove(key))
            .map(|value| value.0)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| {
                format!(
                    "the relay's Secret {}/{name} has no key {key}",
                    config.relay_namespace
                )
            }))
    };
    let jwt_secret = match read(&config.relay_jwt_secret, &config.relay_jwt_secret_key).await? {
        Ok(secret) => secret,
        Err(problem) => return Ok(Err(problem)),
    };
    let ca_pem = match read(&config.relay_tls_secret, "tls.crt").await? {
        Ok(pem) => String::from_utf8_lossy(&pem).into_owned(),
        Err(problem) => return Ok(Err(problem)),
    };
    Ok(Ok(RelayTrust { jwt_secret, ca_pem }))
}

/// Writes the token Secret unless it already holds a fitting token and the same relay
/// details; returns its name and when its token must be renewed.
async fn write_token(
    tunnel: &TcpTunnel,
    ctx: &Context,
    trust: &RelayTrust,
    relay_address: String,
    port: u16,
) -> Result<(String, u64)> {
    let namespace = tunnel.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = resources::token_secret_name(&tunnel.name_any());
    let existing = secrets.get_opt(&name).await?;
    let existing_credentials = existing.as_ref().and_then(SidecarCredentials::from_secret);
    let lifetime = ctx.config.token_lifetime;
    let token = resources::reusable_token(
        existing_credentials
            .as_ref()
            .map(|credentials| credentials.token.as_str()),
        &trust.jwt_secret,
        &tunnel.key(),
        port,
        lifetime,
        unix_now(),
    )
    .unwrap_or_else(|| resources::mint_token(&trust.jwt_secret, &tunnel.key(), port, lifetime));
    let expires = Claims::verify(&token, &trust.jwt_secret)
        .ok()
        .and_then(|claims| claims.exp)
        .unwrap_or_else(unix_now);
    let credentials = SidecarCredentials {
        token,
        relay: relay_address,
        ca_pem: trust.ca_pem.clone(),
        remote_port: port,
    };
    let owned = existing.as_ref().is_some_and(|secret| {
        secret
            .owner_references()
            .iter()
            .any(|owner| Some(&owner.uid) == tunnel.uid().as_ref())
    });
    if existing_credentials.as_ref() != Some(&credentials) || !owned {
        let mut secret = serde_json::to_value(resources::token_secret(tunnel, &credentials))
            .expect("a Secret serializes");
        secret["apiVersion"] = "v1".into();
        secret["kind"] = "Secret".into();
        secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(secret),
            )
            .await?;
        tracing::info!(tunnel = %tunnel.key(), secret = %name, port, "token Secret written");
    }
    Ok((name, resources::renewal_time(expires, lifetime)))
}

/// Rolls the Deployments whose pods the tunnel selects (so their new pods pass the
/// webhook and get the sidecar), or, with `port` None, those it rolled before (so
/// their pods lose it).
async fn roll_deployments(tunnel: &TcpTunnel, ctx: &Context, port: Option<u16>) -> Result<()> {
    let namespace = tunnel.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = resources::tunnel_selector(tunnel).ok();
    let annotation = resources::rollout_annotation(&tunnel.name_any());
    for deployment in deployments.list(&ListParams::default()).await? {
        let template = deployment
            .spec
            .as_ref()
            .and_then(|spec| spec.template.metadata.as_ref());
        let selected = selector.as_ref().is_some_and(|selector| {
            resources::selects(selector, template.and_then(|meta| meta.labels.as_ref()))
        });
        let current = template
            .and_then(|meta| meta.annotations.as_ref())
            .and_then(|annotations| annotations.get(&annotation))
            .cloned();
        let wanted = port.filter(|_| selected);
        if current == wanted.map(|port| port.to_string()) {
            continue;
        }
        let name = deployment.name_any();
        deployments
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(resources::rollout_patch(&tunnel.name_any(), wanted)),
            )
            .await?;
        let note = match wanted {
            Some(port) => {
                format!("rolled Deployment {name} so its pods get the sidecar for port {port}")
            }
            None => format!("rolled Deployment {name} so its pods drop the sidecar"),
        };
        tracing::info!(tunnel = %tunnel.key(), deployment = %name, "{note}");
        publish_event(ctx, tunnel, EventType::Normal, "RolledOut", note).await;
    }
    Ok(())
}

async fn publish_status(
    tunnel: &TcpTunnel,
    ctx: &Context,
    provisioned: &Provisioned,
) -> Result<()> {
    let generation = tunnel.metadata.generation;
    let previous_condition = tunnel.ready_condition();
    let condition = status::ready_condition(
        &provisioned.outcome,
        generation,
        previous_condition,
        Timestamp::now(),
    );
    let endpoint = match &provisioned.outcome {
        Outcome::Assigned { endpoint, .. } => Some(endpoint.clone()),
        _ => None,
    };
    let status = TcpTunnelStatus {
        remote_port: provisioned.port.map(i32::from),
        endpoint,
        token_secret: provisioned.token_secret.clone(),
        observed_generation: generation,
        conditions: vec![condition.clone()],
    };
    if tunnel.status.as_ref() == Some(&status) {
        return Ok(());
    }
    apply_status(tunnel, ctx, &status).await?;
    let changed = previous_condition.is_none_or(|previous| {
        (&previous.reason, &previous.message) != (&condition.reason, &condition.message)
    });
    if changed {
        let kind = if provisioned.outcome.is_ready() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        tracing::info!(tunnel = %tunnel.key(), reason = %condition.reason, "{}", condition.message);
        publish_event(ctx, tunnel, kind, &condition.reason, condition.message).await;
    }
    Ok(())
}

/// Server-side apply of the whole status: fields this manager no longer sets (a port
/// given up, an endpoint not yet known) disappear.
async fn apply_status(tunnel: &TcpTunnel, ctx: &Context, status: &TcpTunnelStatus) -> Result<()> {
    let api: Api<TcpTunnel> =
        Api::namespaced(ctx.client.clone(), &tunnel.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": API_VERSION, "kind": KIND, "status": status});
    api.patch_status(
        &tunnel.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn cleanup(tunnel: &TcpTunnel, ctx: &Context) -> Result<Action> {
    if sync_relay_service(ctx).await?.is_none() {
        tracing::warn!(tunnel = %tunnel.key(), "relay Service not found; no port to remove from it");
    }
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &tunnel.namespace().unwrap_or_default());
    match secrets
        .delete(
            &resources::token_secret_name(&tunnel.name_any()),
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    roll_deployments(tunnel, ctx, None).await?;
    let note = match tunnel.assigned_port() {
        Some(port) => format!("port {port} released and token Secret deleted"),
        None => "token Secret deleted".to_owned(),
    };
    tracing::info!(tunnel = %tunnel.key(), "{note}");
    publish_event(ctx, tunnel, EventType::Normal, "Released", note).await;
    Ok(Action::await_change())
}

/// Events are for humans: failing to record one never fails a reconcile.
async fn publish_event(
    ctx: &Context,
    tunnel: &TcpTunnel,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &tunnel.object_ref(&())).await {
        tracing::warn!(tunnel = %tunnel.key(), %error, "cannot record an event");
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
