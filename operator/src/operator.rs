//! Wires the operator together: health endpoint, TcpTunnel cache, webhook (certificate,
//! registration, HTTPS server) on every replica, and the controller on the one replica
//! holding the Lease.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::controller::{self, Context};
use crate::crd::TcpTunnel;
use crate::health::{self, Readiness};
use crate::metrics::Metrics;
use crate::resources::{MANAGED_BY_LABEL, MANAGER};
use crate::webhook::{self, Webhook};
use crate::webhook_tls;

/// A Lease not renewed for this long is taken over by another replica; a replica that
/// stops cleanly releases it at once.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;
/// The webhook registration is re-applied this often, in case a `helm upgrade` or a
/// person reset its caBundle.
const REGISTRATION_INTERVAL: Duration = Duration::from_secs(300);

pub async fn run(
    config: Config,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());

    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", config.metrics_addr))?;
    tracing::info!(addr = %config.metrics_addr, "health and metrics endpoint listening");
    let health = tokio::spawn(health::serve(
        listener,
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let tunnels = cache_tunnels(client.clone(), readiness.clone());
    let webhook = Arc::new(Webhook {
        tunnels,
        client_image: config.client_image.clone(),
        excluded_namespaces: vec![config.namespace.clone(), "kube-system".into()],
        metrics: metrics.clone(),
    });
    let webhook_task = tokio::spawn(run_webhook(
        client.clone(),
        config.clone(),
        webhook,
        readiness.clone(),
        shutdown.clone(),
    ));

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        config,
        metrics,
        allocation: Default::default(),
        failures: Default::default(),
    });
    let led = lead(ctx, identity, shutdown.clone()).await;
    shutdown.cancel();
    let _ = webhook_task.await;
    let _ = health.await;
    led
}

/// The webhook's view of all TcpTunnels, kept current by a watch on every replica.
fn cache_tunnels(client: Client, readiness: Arc<Readiness>) -> reflector::Store<TcpTunnel> {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<TcpTunnel>::all(client), Default::default()),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(error) = event {
            tracing::warn!(%error, "TcpTunnel watch failed; retrying");
        }
    }));
    let ready = reader.clone();
    tokio::spawn(async move {
        if ready.wait_until_ready().await.is_ok() {
            readiness.tunnels_synced.store(true, Ordering::Relaxed);
        }
    });
    reader
}

async fn run_webhook(
    client: Client,
    config: Config,
    webhook: Arc<Webhook>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let target = webhook_tls::target(&config);
    let names = webhook_tls::certificate_names(&target);
    let Some(certificate) = retry("prepare the webhook certificate", &shutdown, || {
        webhook_tls::ensure_serving_certificate(client.clone(), &config, &names)
    })
    .await
    else {
        return;
    };
    let registration = {
        let (client, config, shutdown, ca) = (
            client.clone(),
            config.clone(),
            shutdown.clone(),
            certificate.cert_pem.clone(),
        );
        async move {
            loop {
                if retry("register the webhook", &shutdown, || {
                    webhook_tls::register(client.clone(), &config, &target, &ca)
                })
                .await
                .is_none()
                {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REGISTRATION_INTERVAL) => {}
                }
            }
        }
    };
    tokio::spawn(registration);
    if let Err(error) = webhook::serve(
        config.webhook_addr,
        &certificate,
        webhook,
        readiness,
        shutdown,
    )
    .await
    {
        tracing::error!(%error, addr = %config.webhook_addr, "the webhook cannot serve; pods are admitted without sidecars");
    }
}

/// Runs the controller whenever this replica holds the Lease, until shutdown; then
/// releases the Lease so a successor takes over without waiting for it to expire.
async fn lead(
    ctx: Arc<Context>,
    identity: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = &ctx.config;
    let Some(manager) = retry("join the leader election", &shutdown, || {
        LeaseManagerBuilder::new(ctx.client.clone(), &config.leader_lease)
            .with_namespace(&config.namespace)
            .with_identity(&identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .build()
    })
    .await
    else {
        return Ok(());
    };
    let (mut leader, election) = manager.watch().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            elected = wait_for(&mut leader, true) => elected?,
        }
        tracing::info!(%identity, "elected leader: reconciling TcpTunnels");
        ctx.metrics.leader.set(1);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            lost = wait_for(&mut leader, false) => {
                lost?;
                tracing::warn!(%identity, "lost the Lease: no longer reconciling");
            }
            () = run_controller(ctx.clone()) => {}
        }
        ctx.metrics.leader.set(0);
        if shutdown.is_cancelled() {
            break;
        }
    }
    drop(leader);
    let manager = election.await.context("leader election task failed")??;
    manager
        .release()
        .await
        .context("cannot release the Lease")?;
    tracing::info!("released the Lease");
    Ok(())
}

async fn wait_for(leader: &mut watch::Receiver<bool>, state: bool) -> anyhow::Result<()> {
    leader
        .wait_for(|is_leader| *is_leader == state)
        .await
        .map(drop)
        .context("the leader election stopped")
}

async fn run_controller(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let config = &ctx.config;
    let controller = Controller::new(Api::<TcpTunnel>::all(client.clone()), Default::default());
    let tunnels = controller.store();
    let relay_service =
        watcher::Config::default().fields(&format!("metadata.name={}", config.relay_service));
    let token_secrets = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    controller
        .owns(Api::<Secret>::all(client.clone()), token_secrets)
        // The relay Service getting (or changing) its load-balancer address changes every
        // tunnel's endpoint.
        .watches(
            Api::<Service>::namespaced(client, &config.relay_namespace),
            relay_service,
            move |_| {
                tunnels
                    .state()
                    .iter()
                    .map(|tunnel| ObjectRef::from_obj(tunnel.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|_| async {})
        .await;
}

/// Retries `attempt` with backoff (1 s doubling to 30 s) until it succeeds or shutdown;
/// the API server may be unreachable for a while, and that must not crash the operator.
async fn retry<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut attempt: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => tracing::warn!(%error, retry_in = ?delay, "cannot {what}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localup-operator".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}
