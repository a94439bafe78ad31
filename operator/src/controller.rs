//! The reconciler. Each pass reads what a tunnel depends on, once each (every
//! TcpTunnel, the relay Service, the relay's two Secrets, the tunnel's pods), lets
//! [`plan`](crate::plan::plan) decide, and applies the plan: the relay Service's ports,
//! the token Secret, the status (all of it decided and written under one lock, so port
//! decisions never collide), then Events and the rolls of workloads whose pods need (or
//! must lose) the sidecar.
//!
//! There is no finalizer: a deleted tunnel's token Secret goes with it (owner
//! reference), and [`repair::sweep`] takes its port off the relay Service (quarantining it) and
//! rolls the pods still carrying its sidecar. The sweep runs when a tunnel is deleted,
//! when one gives up its port or pods, and every few minutes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self as runtime_controller, Action};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use localup_protocol::token::unix_now;
use tokio::sync::Notify;
use tracing::instrument;

use crate::config::Config;
use crate::crd::{API_VERSION, KIND, TcpTunnel, TcpTunnelStatus};
use crate::guard;
use crate::keys::{LEGACY_FINALIZER, MANAGER, TUNNEL_LABEL, name_fragment};
use crate::metrics::Metrics;
use crate::plan::{self, Note, Observed, Plan, Rules};
use crate::repair;
use crate::status::{Outcome, Stage};
use crate::token::RelayTrust;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", describe(*stage))]
    Api {
        stage: Stage,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the TcpTunnel's status: {0}")]
    Status(#[source] kube::Error),
}

fn describe(stage: Stage) -> &'static str {
    match stage {
        Stage::Read => "cannot read",
        Stage::RelayService => "cannot update the relay Service",
        Stage::TokenSecret => "cannot write the token Secret",
        Stage::Rollout => "cannot roll a workload",
        Stage::Finalizer => "cannot remove the legacy finalizer",
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn at(stage: Stage) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { stage, source }
}

/// The message the API server gave, without kube's wrapping.
fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub rules: Rules,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Serialises port decisions and relay Service updates within this replica; leader
    /// election keeps other replicas out.
    pub allocation: tokio::sync::Mutex<()>,
    /// Consecutive failures per tunnel, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The credentials digest of the token Secret this process wrote, per tunnel UID.
    pub tokens_written: Mutex<HashMap<String, String>>,
    /// When a pod's "must be recreated" Event was last published, per tunnel and pod.
    pub pod_notes: Mutex<HashMap<String, Instant>>,
    /// Whether this replica's webhook serves: repairs only roll pods when it does, or
    /// the new pods would miss the sidecar again.
    pub webhook_ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Wakes the sweep.
    pub sweep: Arc<Notify>,
    /// When this process started (Unix seconds), for the pace of repairs.
    pub started: u64,
}

impl Context {
    pub fn new(
        client: Client,
        config: Config,
        rules: Rules,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        webhook_ready: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Context {
            client,
            config,
            rules,
            metrics,
            recorder,
            allocation: Default::default(),
            failures: Default::default(),
            tokens_written: Default::default(),
            pod_notes: Default::default(),
            webhook_ready,
            sweep: Default::default(),
            started: unix_now(),
        }
    }
}

#[instrument(skip_all, fields(tunnel = %tunnel.key()))]
pub async fn reconcile(tunnel: Arc<TcpTunnel>, ctx: Arc<Context>) -> Result<Action> {
    let mut latest = None;
    match pass(&tunnel, &ctx, &mut latest).await {
        Ok(action) => {
            ctx.failures.lock().unwrap().remove(&tunnel.key());
            Ok(action)
        }
        Err(error) => {
            report_failure(latest.as_ref().unwrap_or(&tunnel), &ctx, &error).await;
            Err(error)
        }
    }
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

/// Every failure shows on the tunnel: Ready=False with the stage's reason and the API
/// server's message, and a Warning Event. A conflict (someone changed the relay Service
/// between our read and our write) is not a failure: the retry settles it. `tunnel` is
/// the latest state known, including a status the failed pass already wrote, so only
/// the Ready condition changes.
async fn report_failure(tunnel: &TcpTunnel, ctx: &Context, error: &Error) {
    let Error::Api { stage, source } = error else {
        return;
    };
    if api_code(source) == Some(409) {
        return;
    }
    let outcome = Outcome::ApiFailed {
        stage: *stage,
        message: api_message(source),
    };
    let status = plan::failed_status(tunnel, &outcome, Timestamp::now());
    let unchanged = tunnel.status.as_ref() == Some(&status);
    if !unchanged && let Err(error) = apply_status(tunnel, ctx, &status).await {
        tracing::warn!(%error, "cannot report the failure in the status");
    }
    let note = Note {
        warning: true,
        reason: outcome.reason().into(),
        message: outcome.message(),
    };
    publish(ctx, &tunnel.object_ref(&()), note, None).await;
}

/// One pass: read, plan, apply. `latest` follows the tunnel as read and as written.
async fn pass(
    trigger: &TcpTunnel,
    ctx: &Context,
    latest: &mut Option<TcpTunnel>,
) -> Result<Action> {
    let config = &ctx.config;
    let namespace = trigger.namespace().unwrap_or_default();
    let decisions = ctx.allocation.lock().await;

    let tunnels = Api::<TcpTunnel>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(at(Stage::Read))?
        .items;
    let Some(tunnel) = tunnels.iter().find(|tunnel| {
        tunnel.uid() == trigger.uid() && tunnel.metadata.namespace == trigger.metadata.namespace
    }) else {
        // Deleted since the event that queued this pass.
        ctx.sweep.notify_one();
        return Ok(Action::await_change());
    };
    *latest = Some(tunnel.clone());
    let service = Api::<Service>::namespaced(ctx.client.clone(), &config.relay_namespace)
        .get_opt(&config.relay_service)
        .await
        .map_err(at(Stage::Read))?;
    let trust = relay_trust(ctx).await?;
    let namespace_labels = match ctx.rules.namespaces.needs_labels() {
        true => Api::<Namespace>::all(ctx.client.clone())
            .get_opt(&namespace)
            .await
            .map_err(at(Stage::Read))?
            .map(|namespace| namespace.labels().clone()),
        false => None,
    };
    let pods = match guard::tunnel_selector(tunnel) {
        Ok(selector) if !tunnel.is_deleting() => {
            Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
                .list(&ListParams::default().labels(&selector.to_string()))
                .await
                .map_err(at(Stage::Read))?
                .items
        }
        _ => Vec::new(),
    };
    let token_written_by_this_process = {
        let written = ctx.tokens_written.lock().unwrap();
        let digest = tunnel
            .status
            .as_ref()
            .and_then(|status| status.credentials_digest.as_ref());
        tunnel
            .uid()
            .and_then(|uid| written.get(&uid))
            .is_some_and(|written| Some(written) == digest)
    };
    let plan = plan::plan(
        Observed {
            tunnel,
            tunnels: &tunnels,
            relay_service: service.as_ref(),
            relay_trust: trust.as_ref().map_err(String::as_str),
            namespace_labels: namespace_labels.as_ref(),
            pods: &pods,
            token_written_by_this_process,
            now: Timestamp::now(),
        },
        &ctx.rules,
    );
    apply(tunnel, ctx, plan, decisions, latest).await
}

/// The relay's signing secret and certificate, or what is missing, said so a user can
/// fix it.
async fn relay_trust(ctx: &Context) -> Result<Result<RelayTrust, String>> {
    let config = &ctx.config;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &config.relay_namespace);
    let read = async |name: &str, key: &str| -> Result<Result<Vec<u8>, String>> {
        let Some(secret) = secrets.get_opt(name).await.map_err(at(Stage::Read))? else {
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
    let jwt_secret = read(&config.relay_jwt_secret, &config.relay_jwt_secret_key).await?;
    let ca_pem = read(&config.relay_tls_secret, "tls.crt").await?;
    Ok(jwt_secret.and_then(|jwt_secret| {
        ca_pem.map(|pem| RelayTrust {
            jwt_secret,
            ca_pem: String::from_utf8_lossy(&pem).into_owned(),
        })
    }))
}

async fn apply(
    tunnel: &TcpTunnel,
    ctx: &Context,
    plan: Plan<'_>,
    decisions: tokio::sync::MutexGuard<'_, ()>,
    latest: &mut Option<TcpTunnel>,
) -> Result<Action> {
    let config = &ctx.config;
    let namespace = tunnel.namespace().unwrap_or_default();
    if plan.remove_legacy_finalizer {
        remove_legacy_finalizer(tunnel, ctx).await?;
    }
    if plan.deleting {
        drop(decisions);
        ctx.sweep.notify_one();
        return Ok(Action::await_change());
    }
    if let Some(patch) = &plan.relay_service_patch {
        Api::<Service>::namespaced(ctx.client.clone(), &config.relay_namespace)
            .patch(
                &config.relay_service,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .map_err(at(Stage::RelayService))?;
        tracing::info!(service = %config.relay_service, "relay Service ports updated");
    }
    if let Some((secret, digest)) = &plan.token_secret {
        let name = secret.name_any();
        let mut object = serde_json::to_value(secret).expect("a Secret serializes");
        object["apiVersion"] = "v1".into();
        object["kind"] = "Secret".into();
        Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(at(Stage::TokenSecret))?;
        if let Some(uid) = tunnel.uid() {
            ctx.tokens_written
                .lock()
                .unwrap()
                .insert(uid, digest.clone());
        }
        ctx.metrics.tokens_written.inc();
        tracing::info!(secret = %name, "token Secret written");
    }
    if let Some(status) = &plan.status {
        apply_status(tunnel, ctx, status)
            .await
            .map_err(Error::Status)?;
        if let Some(latest) = latest {
            latest.status = Some(status.clone());
        }
    }
    drop(decisions);

    let outcome = plan.outcome.as_ref();
    if let Some(note) = plan.note.clone() {
        tracing::info!(reason = %note.reason, "{}", note.message);
        publish(ctx, &tunnel.object_ref(&()), note, None).await;
    }
    let mut requeue = plan.requeue;
    if let Some(wait) = repair::roll_workloads(tunnel, ctx, &plan.rolls).await? {
        requeue = requeue.min(wait);
    }
    if plan.wake_sweep {
        ctx.sweep.notify_one();
    }
    if let Some(outcome) = outcome {
        ctx.metrics.reconciled(outcome.reason());
    }
    Ok(Action::requeue(requeue))
}

async fn remove_legacy_finalizer(tunnel: &TcpTunnel, ctx: &Context) -> Result<()> {
    let Some(index) = tunnel
        .finalizers()
        .iter()
        .position(|finalizer| finalizer == LEGACY_FINALIZER)
    else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": path, "value": LEGACY_FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .expect("a well-formed JSON patch");
    let api: Api<TcpTunnel> =
        Api::namespaced(ctx.client.clone(), &tunnel.namespace().unwrap_or_default());
    match api
        .patch(
            &tunnel.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!("removed the finalizer of an earlier operator version");
            Ok(())
        }
        Err(error) if api_code(&error) == Some(404) => Ok(()),
        Err(error) => Err(at(Stage::Finalizer)(error)),
    }
}

/// Server-side apply of the whole status: fields this manager no longer sets (a port
/// given up, an endpoint not yet known) disappear.
async fn apply_status(
    tunnel: &TcpTunnel,
    ctx: &Context,
    status: &TcpTunnelStatus,
) -> Result<(), kube::Error> {
    let api: Api<TcpTunnel> =
        Api::namespaced(ctx.client.clone(), &tunnel.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": API_VERSION, "kind": KIND, "status": status});
    match api
        .patch_status(
            &tunnel.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
    {
        Err(error) if api_code(&error) == Some(404) => Ok(()),
        other => other.map(drop),
    }
}

/// Events are for humans: failing to record one never fails a reconcile.
pub(crate) async fn publish(
    ctx: &Context,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    note: Note,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let mut message = note.message;
    if message.len() > 1000 {
        let mut cut = 1000;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let event = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason,
        note: Some(message),
        action: "Reconcile".into(),
        secondary: related,
    };
    if let Err(error) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(%error, "cannot record an event");
    }
}

/// The tunnels whose selector matches a pod (by its labels) or whose sidecar it carries.
fn tunnels_for_pod(
    store: &Store<TcpTunnel>,
    pod: &PartialObjectMeta<Pod>,
) -> Vec<ObjectRef<TcpTunnel>> {
    let namespace = pod.metadata.namespace.as_deref();
    let carried = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(TUNNEL_LABEL));
    store
        .state()
        .iter()
        .filter(|tunnel| tunnel.metadata.namespace.as_deref() == namespace)
        .filter(|tunnel| {
            carried == Some(&name_fragment(&tunnel.name_any()))
                || guard::tunnel_selector(tunnel)
                    .is_ok_and(|selector| guard::selects(&selector, pod.metadata.labels.as_ref()))
        })
        .map(|tunnel| ObjectRef::from_obj(tunnel.as_ref()))
        .collect()
}

/// Every tunnel: for changes that concern them all.
fn everyone<K>(store: Store<TcpTunnel>) -> impl Fn(K) -> Vec<ObjectRef<TcpTunnel>> {
    move |_| {
        store
            .state()
            .iter()
            .map(|tunnel| ObjectRef::from_obj(tunnel.as_ref()))
            .collect()
    }
}

/// Runs the controller and the sweep until the future is dropped (leadership lost).
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let config = &ctx.config;
    let (reader, writer) = reflector::store();
    let deletions = ctx.sweep.clone();
    let tunnel_events = reflector::reflector(
        writer,
        watcher(Api::<TcpTunnel>::all(client.clone()), Default::default()),
    )
    .default_backoff()
    .inspect(move |event| {
        if let Ok(watcher::Event::Delete(_)) = event {
            deletions.notify_one();
        }
    })
    .touched_objects();
    let pods = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .touched_objects();
    let pod_store = reader.clone();
    let named = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let controller = Controller::for_stream(tunnel_events, reader.clone())
        .with_config(runtime_controller::Config::default().debounce(Duration::from_millis(500)))
        .watches_stream(pods, move |pod| tunnels_for_pod(&pod_store, &pod))
        // The relay Service getting (or changing) its load-balancer address changes every
        // tunnel's endpoint; a rotated relay secret or certificate changes every token.
        .watches(
            Api::<Service>::namespaced(client.clone(), &config.relay_namespace),
            named(&config.relay_service),
            everyone(reader.clone()),
        )
        .watches(
            Api::<Secret>::namespaced(client.clone(), &config.relay_namespace),
            named(&config.relay_jwt_secret),
            everyone(reader.clone()),
        )
        .watches(
            Api::<Secret>::namespaced(client.clone(), &config.relay_namespace),
            named(&config.relay_tls_secret),
            everyone(reader.clone()),
        )
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let sweeper = async {
        loop {
            if let Err(error) = repair::sweep(&ctx).await {
                tracing::warn!(%error, "sweep failed; retrying");
            }
            tokio::select! {
                _ = ctx.sweep.notified() => {
                    // Let a burst of deletions settle into one sweep.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                _ = tokio::time::sleep(repair::SWEEP_INTERVAL) => {}
            }
        }
    };
    tokio::join!(controller, sweeper);
}

#[cfg(test)]
mod tests;
