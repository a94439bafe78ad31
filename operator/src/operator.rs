//! Wires the operator together: health endpoint, TcpTunnel cache, webhook (certificate,
//! registration, HTTPS server) on every replica, and the controller on the one replica
//! holding the Lease.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use localup_runtime::http::{self, Endpoints};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::controller::{self, Context};
use crate::crd::TcpTunnel;
use crate::keys::MANAGER;
use crate::metrics::Metrics;
use crate::plan::Rules;
use crate::sidecar::{self, Mode};
use crate::webhook::{self, Injector, Webhook};
use crate::webhook_tls;

/// A Lease not renewed for this long is taken over by another replica; a replica that
/// stops cleanly releases it at once.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;
/// The webhook registration is re-applied this often, in case a `helm upgrade` or a
/// person reset its caBundle.
const REGISTRATION_INTERVAL: Duration = Duration::from_secs(300);

/// Rolls that give pods the sidecar wait this long after the operator started, so the
/// kubelet has probed this replica ready and its webhook Service has the endpoint.
const WEBHOOK_SETTLE: Duration = Duration::from_secs(10);

/// What `/readyz` reports: ready once the webhook serves and the TcpTunnel cache is
/// filled, so the API server is never sent to a replica that would admit pods unchanged.
pub struct Readiness {
    pub webhook_serving: Arc<AtomicBool>,
    pub tunnels_synced: AtomicBool,
    /// The MutatingWebhookConfiguration points at this operator with its caBundle.
    pub webhook_registered: Arc<AtomicBool>,
    started: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            webhook_serving: Default::default(),
            tunnels_synced: Default::default(),
            webhook_registered: Default::default(),
            started: Instant::now(),
        }
    }
}

impl Readiness {
    /// Whether pods created now pass through this operator's webhook: it serves, is
    /// registered, and has been up long enough to be reachable through its Service.
    fn webhook_reachable(&self) -> bool {
        self.check().is_ok()
            && self.webhook_registered.load(Ordering::Relaxed)
            && self.started.elapsed() >= WEBHOOK_SETTLE
    }

    fn check(&self) -> Result<(), String> {
        if self.webhook_serving.load(Ordering::Relaxed)
            && self.tunnels_synced.load(Ordering::Relaxed)
        {
            Ok(())
        } else {
            Err("starting: webhook or TcpTunnel cache not ready".into())
        }
    }
}

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
    let router = http::router(Endpoints {
        readiness: {
            let readiness = readiness.clone();
            Arc::new(move || readiness.check())
        },
        metrics: Some({
            let metrics = metrics.clone();
            Arc::new(move || metrics.render())
        }),
        extra: Default::default(),
        token: None,
    });
    let health = tokio::spawn(http::serve(listener, router, shutdown.clone()));

    let Some(mode) = sidecar_mode(&client, &config, &shutdown).await else {
        return Ok(());
    };
    tracing::info!(?mode, "sidecar injection mode");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let tunnels = cache_tunnels(client.clone(), readiness.clone());
    let webhook = Arc::new(Webhook {
        tunnels,
        injector: Injector {
            settings: sidecar::Settings::from_config(&config, mode),
            excluded_namespaces: vec![config.namespace.clone(), "kube-system".into()],
            require_consent: config.require_pod_consent,
            drain_token: sidecar::new_drain_token,
        },
        metrics: metrics.clone(),
        recorder: recorder.clone(),
    });
    let webhook_task = tokio::spawn(run_webhook(
        client.clone(),
        config.clone(),
        webhook,
        readiness.clone(),
        shutdown.clone(),
    ));

    let reachable = readiness.clone();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config.clone(),
        Rules::from_config(&config, mode),
        metrics,
        recorder,
        Arc::new(move || reachable.webhook_reachable()),
    ));
    let led = lead(ctx, identity, shutdown.clone()).await;
    shutdown.cancel();
    let _ = webhook_task.await;
    let _ = health.await;
    led
}

/// `--sidecar-mode`, with `auto` decided once from the API server's `/version`.
async fn sidecar_mode(
    client: &Client,
    config: &Config,
    shutdown: &CancellationToken,
) -> Option<Mode> {
    if config.sidecar_mode != crate::config::SidecarModeFlag::Auto {
        return Some(Mode::resolve(config.sidecar_mode, None));
    }
    let info = retry("read the API server's version", shutdown, || {
        client.apiserver_version()
    })
    .await?;
    let version = sidecar::parse_version(&info.major, &info.minor);
    tracing::info!(major = %info.major, minor = %info.minor, "API server version");
    Some(Mode::resolve(config.sidecar_mode, version))
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
        let registered = readiness.webhook_registered.clone();
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
                registered.store(true, Ordering::Relaxed);
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
        readiness.webhook_serving.clone(),
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
            () = controller::run(ctx.clone()) => {}
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
