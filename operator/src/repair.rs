//! Rolling the workloads whose pods need (or must lose) the sidecar, and the sweep.
//!
//! The decisions are pure ([`crate::workloads`], [`crate::plan::sweep_rolls`]); this
//! module reads what they need (a ReplicaSet's Deployment, the workload's last roll)
//! and writes the rolls and the Events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use localup_protocol::token::unix_now;
use tracing::instrument;

use crate::controller::{Context, Result, at, publish};
use crate::crd::TcpTunnel;
use crate::keys::{ROLLED_ANNOTATION, TUNNEL_LABEL};
use crate::plan::{self, Note, Roll};
use crate::relay_service;
use crate::status::Stage;
use crate::workloads::{self, Owner, RollDecision, RollPace, RollRecord, Workload, WorkloadKind};

/// How often the sweep runs without being woken.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(300);
/// Repairs wait this long for the webhook of this replica to serve.
const WAIT_FOR_WEBHOOK: Duration = Duration::from_secs(5);
const ROLLOUT_RECHECK: Duration = Duration::from_secs(10);

/// Rolls the owners of the pods in `rolls` (each workload once), or publishes an Event
/// for pods that cannot be rolled. Returns how soon the tunnel should be looked at
/// again for rolls that had to wait.
pub async fn roll_workloads(
    tunnel: &TcpTunnel,
    ctx: &Context,
    rolls: &[Roll<'_>],
) -> Result<Option<Duration>> {
    if rolls.is_empty() {
        return Ok(None);
    }
    if rolls.iter().any(|roll| roll.port.is_some()) && !(ctx.webhook_ready)() {
        tracing::info!("pods need the sidecar; waiting for this replica's webhook to serve");
        return Ok(Some(WAIT_FOR_WEBHOOK));
    }
    let mut workloads: BTreeMap<Workload, &Roll<'_>> = BTreeMap::new();
    for roll in rolls {
        match resolve(ctx, workloads::owner(roll.pod)).await? {
            Ok(workload) => {
                workloads.entry(workload).or_insert(roll);
            }
            Err(why) => note_pod(ctx, Some(tunnel), roll, &why).await,
        }
    }
    let mut wait: Option<Duration> = None;
    for (workload, roll) in workloads {
        let name = tunnel.name_any();
        if let Some(retry) = roll_workload(ctx, &workload, &name, roll).await? {
            wait = Some(wait.map_or(retry, |wait| wait.min(retry)));
            continue;
        }
        let note = match roll.port {
            Some(port) => format!("rolled {workload} so its pods get the sidecar for port {port}"),
            None => format!("rolled {workload} so its pods drop the sidecar"),
        };
        tracing::info!("{note}");
        let reference = tunnel.object_ref(&());
        let note = Note {
            warning: false,
            reason: "RolledOut".into(),
            message: note,
        };
        publish(ctx, &reference, note, None).await;
    }
    Ok(wait)
}

/// The workload to roll for a pod's owner, or why there is none.
async fn resolve(ctx: &Context, owner: Owner) -> Result<Result<Workload, String>> {
    Ok(match owner {
        Owner::Workload(workload) => Ok(workload),
        Owner::ReplicaSet { namespace, name } => {
            let replica_set = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &namespace)
                .get_opt(&name)
                .await
                .map_err(at(Stage::Rollout))?;
            let deployment = replica_set.as_ref().and_then(|replica_set| {
                replica_set
                    .owner_references()
                    .iter()
                    .find(|owner| owner.controller == Some(true) && owner.kind == "Deployment")
                    .map(|owner| owner.name.clone())
            });
            match deployment {
                Some(name) => Ok(Workload {
                    kind: WorkloadKind::Deployment,
                    namespace,
                    name,
                }),
                None => Err(format!(
                    "its ReplicaSet {name} belongs to no Deployment: delete the pod to replace it"
                )),
            }
        }
        Owner::Job(job) => Err(format!(
            "it belongs to Job {job}, whose pods the operator never replaces: pods the Job \
             creates from now on are handled"
        )),
        Owner::Bare(_) => {
            Err("it has no controller that could replace it: delete and recreate it".to_owned())
        }
        Owner::Other { kind, name } => Err(format!(
            "its controller {kind} {name} is not one the operator rolls: delete the pod so \
             it is recreated"
        )),
    })
}

fn api_resource(kind: WorkloadKind) -> ApiResource {
    match kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
    }
}

/// Rolls one workload unless its last roll for the same target is recent or still in
/// progress; returns when to look again in that case.
async fn roll_workload(
    ctx: &Context,
    workload: &Workload,
    tunnel_name: &str,
    roll: &Roll<'_>,
) -> Result<Option<Duration>> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &workload.namespace,
        &api_resource(workload.kind),
    );
    let Some(object) = api
        .get_opt(&workload.name)
        .await
        .map_err(at(Stage::Rollout))?
    else {
        return Ok(None);
    };
    let last = object
        .annotations()
        .get(ROLLED_ANNOTATION)
        .and_then(|value| RollRecord::parse(value));
    let json = serde_json::to_value(&object).expect("an object serializes");
    let now = unix_now();
    let pace = RollPace {
        now,
        interval: ctx.config.repair_interval,
        started: ctx.started,
    };
    match workloads::roll_decision(
        last.as_ref(),
        &roll.target,
        pace,
        workloads::rollout_in_progress(workload.kind, &json),
    ) {
        RollDecision::Roll => {
            let record = RollRecord {
                target: roll.target.clone(),
                at: now,
            };
            let patch = workloads::roll_patch(tunnel_name, roll.port, &record);
            api.patch(
                &workload.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(at(Stage::Rollout))?;
            ctx.metrics.rolls.inc();
            Ok(None)
        }
        RollDecision::Wait { until } => {
            tracing::debug!(%workload, "rolled for this recently; not again before {until}");
            Ok(Some(Duration::from_secs(until.saturating_sub(now).max(1))))
        }
        RollDecision::InProgress => Ok(Some(ROLLOUT_RECHECK)),
    }
}

/// An Event saying a pod must be recreated by hand, at most once per repair interval
/// per pod: on the tunnel (naming the pod) or, when the tunnel is gone, on the pod.
async fn note_pod(ctx: &Context, tunnel: Option<&TcpTunnel>, roll: &Roll<'_>, why: &str) {
    let pod = roll.pod;
    let key = format!(
        "{}/{}/{}",
        tunnel.and_then(|tunnel| tunnel.uid()).unwrap_or_default(),
        pod.namespace().unwrap_or_default(),
        pod.name_any()
    );
    {
        let mut notes = ctx.pod_notes.lock().unwrap();
        let now = Instant::now();
        notes.retain(|_, at| now.duration_since(*at) < ctx.config.repair_interval);
        if notes.contains_key(&key) {
            return;
        }
        notes.insert(key, now);
    }
    let what = match roll.port {
        Some(port) => format!("pod {} lacks the sidecar for port {port}", pod.name_any()),
        None => format!(
            "pod {} carries the sidecar of a tunnel that no longer serves it",
            pod.name_any()
        ),
    };
    let note = Note {
        warning: true,
        reason: if workloads::is_job_pod(pod) {
            "JobPodLeftAlone".into()
        } else {
            "PodNeedsRecreate".into()
        },
        message: format!("{what}: {why}"),
    };
    match tunnel {
        Some(tunnel) => {
            publish(
                ctx,
                &tunnel.object_ref(&()),
                note,
                Some(pod.object_ref(&())),
            )
            .await
        }
        None => publish(ctx, &pod.object_ref(&()), note, None).await,
    }
}

/// Cluster-wide clean-up: the relay Service carries exactly the ports live tunnels hold
/// (released ones enter the port book's quarantine), and pods carrying the sidecar of a
/// tunnel that is gone, refused, or no longer selects them are rolled.
#[instrument(skip_all)]
pub async fn sweep(ctx: &Context) -> Result<()> {
    let config = &ctx.config;
    let decisions = ctx.allocation.lock().await;
    let tunnels = Api::<TcpTunnel>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(at(Stage::Read))?
        .items;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &config.relay_namespace);
    if let Some(service) = services
        .get_opt(&config.relay_service)
        .await
        .map_err(at(Stage::Read))?
    {
        let holdings = crate::allocator::holdings(&tunnels);
        let now_ms = localup_protocol::token::unix_now_millis();
        let book =
            relay_service::port_book(&service).update(&holdings, now_ms, config.port_quarantine);
        ctx.metrics.assigned_ports.set(holdings.len() as i64);
        let ports = holdings.keys().copied().collect();
        if let Some(patch) = relay_service::sync_patch(&service, &ports, &book) {
            services
                .patch(
                    &config.relay_service,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(at(Stage::RelayService))?;
            tracing::info!(?ports, "relay Service ports updated by the sweep");
        }
    }
    drop(decisions);

    let pods = Api::<Pod>::all(ctx.client.clone())
        .list(&ListParams::default().labels(TUNNEL_LABEL))
        .await
        .map_err(at(Stage::Read))?
        .items;
    let rolls = plan::sweep_rolls(&tunnels, &pods);
    let mut workloads: BTreeMap<Workload, &Roll<'_>> = BTreeMap::new();
    for roll in &rolls {
        match resolve(ctx, workloads::owner(roll.pod)).await? {
            Ok(workload) => {
                workloads.entry(workload).or_insert(roll);
            }
            Err(why) => note_pod(ctx, None, roll, &why).await,
        }
    }
    for (workload, roll) in workloads {
        let tunnel_name = plan::tunnel_name_of(roll.pod);
        if roll_workload(ctx, &workload, &tunnel_name, roll)
            .await?
            .is_none()
        {
            tracing::info!(%workload, tunnel = %tunnel_name, "rolled so its pods drop the sidecar");
        }
    }
    Ok(())
}
