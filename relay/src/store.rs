//! Which subject held which port, kept in SQLite or PostgreSQL when the relay is given
//! `--database-url`, so that a restarted relay keeps each port reserved for its subject
//! and hands it back when the subject reconnects. Without a database this lives only
//! in memory.
//!
//! The database is never on the data path: writes go through a queue to a task of
//! their own, each with a timeout, and a database that is slow or down is logged and
//! counted (`localup_database_up`, `localup_database_errors_total`) while tunnels keep
//! opening. What was queued while it was down is written when it is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::allocator::Reservation;
use crate::metrics::Metrics;

/// How long one database operation may take before it counts as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a failed write or load is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS port_reservations (
    port BIGINT PRIMARY KEY,
    subject TEXT NOT NULL,
    epoch BIGINT,
    last_seen BIGINT NOT NULL
)";

/// A handle for recording reservations; cheap to clone.
#[derive(Clone)]
pub struct Store {
    writes: Option<mpsc::UnboundedSender<(u16, Reservation)>>,
}

/// The database side, run by [`Database::run`] on a task of its own.
pub struct Database {
    pool: AnyPool,
    url: String,
    writes: mpsc::UnboundedReceiver<(u16, Reservation)>,
    metrics: Arc<Metrics>,
}

impl Store {
    /// A store that keeps nothing beyond the process.
    pub fn memory() -> Self {
        Self { writes: None }
    }

    /// A store writing to `url`. Only a URL that cannot work fails here; an
    /// unreachable database is retried in the background.
    pub fn open(url: &str, metrics: Arc<Metrics>) -> anyhow::Result<(Self, Database)> {
        sqlx::any::install_default_drivers();
        let url = create_sqlite_file_if_missing(url);
        let supported = ["sqlite:", "postgres:", "postgresql:"];
        anyhow::ensure!(
            supported.iter().any(|scheme| url.starts_with(scheme)),
            "cannot use --database-url {}: expected sqlite://PATH or postgres://USER@HOST/DB",
            redact(&url)
        );
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(OPERATION_TIMEOUT)
            .connect_lazy(&url)
            .with_context(|| {
                format!(
                    "cannot use --database-url {}: expected sqlite://PATH or postgres://USER@HOST/DB",
                    redact(&url)
                )
            })?;
        let (sender, writes) = mpsc::unbounded_channel();
        let database = Database {
            pool,
            url,
            writes,
            metrics,
        };
        Ok((
            Self {
                writes: Some(sender),
            },
            database,
        ))
    }

    /// Records that `port` is reserved as `reservation` says; returns at once.
    pub fn remember(&self, port: u16, reservation: Reservation) {
        if let Some(writes) = &self.writes {
            let _ = writes.send((port, reservation));
        }
    }
}

impl Database {
    /// Loads what was reserved before, within `wait`; `None` when the database did
    /// not answer in time (the relay starts without it and [`Database::run`] keeps
    /// trying).
    pub async fn load(&self, wait: Duration) -> Option<HashMap<u16, Reservation>> {
        match tokio::time::timeout(wait, self.try_load()).await {
            Ok(Ok(reservations)) => {
                self.metrics.database_up.set(1);
                Some(reservations)
            }
            Ok(Err(error)) => {
                self.failed("load the port reservations", &error);
                None
            }
            Err(_) => {
                self.failed(
                    "load the port reservations",
                    &anyhow::anyhow!("no answer within {wait:?}"),
                );
                None
            }
        }
    }

    async fn try_load(&self) -> anyhow::Result<HashMap<u16, Reservation>> {
        sqlx::query(SCHEMA)
            .execute(&self.pool)
            .await
            .context("cannot create the port_reservations table")?;
        self.migrate_legacy().await?;
        let rows: Vec<(i64, String, Option<i64>, i64)> =
            sqlx::query_as("SELECT port, subject, epoch, last_seen FROM port_reservations")
                .fetch_all(&self.pool)
                .await
                .context("cannot read port reservations")?;
        Ok(rows
            .into_iter()
            .filter_map(|(port, subject, epoch, last_seen)| {
                Some((
                    u16::try_from(port).ok()?,
                    Reservation {
                        subject,
                        epoch: epoch.and_then(|epoch| u64::try_from(epoch).ok()),
                        last_seen: u64::try_from(last_seen).unwrap_or(0),
                    },
                ))
            })
            .collect())
    }

    /// Earlier versions kept one port per subject in `port_assignments`; their rows
    /// become reservations.
    async fn migrate_legacy(&self) -> anyhow::Result<()> {
        let legacy: Result<Vec<(String, i64, i64)>, _> =
            sqlx::query_as("SELECT subject, port, updated_at FROM port_assignments")
                .fetch_all(&self.pool)
                .await;
        let Ok(rows) = legacy else {
            return Ok(());
        };
        for (subject, port, updated_at) in rows {
            let reservation = Reservation {
                subject,
                epoch: None,
                last_seen: u64::try_from(updated_at).unwrap_or(0),
            };
            if let Ok(port) = u16::try_from(port) {
                self.write(port, &reservation).await?;
            }
        }
        sqlx::query("DROP TABLE port_assignments")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn write(&self, port: u16, reservation: &Reservation) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO port_reservations (port, subject, epoch, last_seen) VALUES ($1, $2, $3, $4)
             ON CONFLICT (port) DO UPDATE SET subject = excluded.subject, epoch = excluded.epoch,
             last_seen = excluded.last_seen",
        )
        .bind(i64::from(port))
        .bind(&reservation.subject)
        .bind(reservation.epoch.map(|epoch| epoch as i64))
        .bind(reservation.last_seen as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes queued reservations until shutdown, retrying while the database is away
    /// (only the latest reservation of each port is kept meanwhile). `restore` is
    /// called with the stored reservations once they can be read, if they could not
    /// be at start.
    pub async fn run(
        mut self,
        mut loaded: bool,
        restore: impl Fn(HashMap<u16, Reservation>),
        shutdown: CancellationToken,
    ) {
        let mut pending: HashMap<u16, Reservation> = HashMap::new();
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.reset();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                write = self.writes.recv() => match write {
                    Some((port, reservation)) => { pending.insert(port, reservation); }
                    None => break,
                },
                _ = retry.tick() => {}
            }
            if !loaded && let Some(reservations) = self.load(OPERATION_TIMEOUT).await {
                tracing::info!(
                    count = reservations.len(),
                    "database reachable again: port reservations restored"
                );
                restore(reservations);
                loaded = true;
            }
            if loaded {
                self.flush(&mut pending).await;
            }
        }
        // What is still queued gets one last chance.
        while let Ok((port, reservation)) = self.writes.try_recv() {
            pending.insert(port, reservation);
        }
        if loaded {
            self.flush(&mut pending).await;
        }
    }

    async fn flush(&self, pending: &mut HashMap<u16, Reservation>) {
        while let Some((&port, reservation)) = pending.iter().next() {
            match tokio::time::timeout(OPERATION_TIMEOUT, self.write(port, reservation)).await {
                Ok(Ok(())) => {
                    pending.remove(&port);
                    self.metrics.database_up.set(1);
                }
                Ok(Err(error)) => return self.failed("save a port reservation", &error),
                Err(_) => {
                    return self.failed(
                        "save a port reservation",
                        &anyhow::anyhow!("no answer within {OPERATION_TIMEOUT:?}"),
                    );
                }
            }
        }
    }

    fn failed(&self, what: &str, error: &anyhow::Error) {
        self.metrics.database_up.set(0);
        self.metrics.database_errors.inc();
        tracing::warn!(
            database = %redact(&self.url),
            error = %redact(&format!("{error:#}")),
            "cannot {what}; tunnels keep working, retrying every {RETRY_EVERY:?}"
        );
    }
}

/// `sqlite://relay.db` should just work, as it does for most tools; SQLite's own
/// default is to refuse a missing file.
fn create_sqlite_file_if_missing(url: &str) -> String {
    if url.starts_with("sqlite:") && !url.contains('?') && !url.contains(":memory:") {
        format!("{url}?mode=rwc")
    } else {
        url.to_owned()
    }
}

/// Database URLs may carry passwords, in the user info or as a `password` parameter;
/// keep them out of every message that may be logged.
pub fn redact(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        redacted.push_str(head);
        let authority_end = tail.find(['/', '?', ' ', '\'', '"']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                redacted.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    redacted.push_str(rest);
    redact_parameter(&redacted, "password=")
}

fn redact_parameter(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find(key) {
        let value_start = at + key.len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value_end = rest[value_start..]
            .find(['&', ' ', '\'', '"'])
            .map_or(rest.len(), |end| value_start + end);
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "localup-store-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn reservation(subject: &str, last_seen: u64) -> Reservation {
        Reservation {
            subject: subject.into(),
            epoch: Some(last_seen * 1000),
            last_seen,
        }
    }

    #[tokio::test]
    async fn sqlite_keeps_reservations_and_migrates_the_old_table() {
        let dir = scratch();
        let url = format!("sqlite://{}/relay.db", dir.display());
        {
            // A database written by an earlier version.
            sqlx::any::install_default_drivers();
            let pool = AnyPoolOptions::new()
                .connect(&create_sqlite_file_if_missing(&url))
                .await
                .unwrap();
            sqlx::query("CREATE TABLE port_assignments (subject TEXT PRIMARY KEY, port BIGINT NOT NULL, updated_at BIGINT NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO port_assignments VALUES ('old', 15000, 77)")
                .execute(&pool)
                .await
                .unwrap();
        }
        let metrics = Arc::new(Metrics::default());
        let (store, database) = Store::open(&url, Arc::clone(&metrics)).unwrap();
        let loaded = database.load(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            loaded,
            HashMap::from([(
                15000,
                Reservation {
                    subject: "old".into(),
                    epoch: None,
                    last_seen: 77
                }
            )])
        );
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(database.run(true, |_| {}, shutdown.clone()));
        store.remember(15432, reservation("db", 100));
        store.remember(16379, reservation("cache", 100));
        store.remember(15432, reservation("db", 200));
        shutdown.cancel();
        writer.await.unwrap();

        let (_, reopened) = Store::open(&url, metrics).unwrap();
        let loaded = reopened.load(Duration::from_secs(5)).await.unwrap();
        assert_eq!(loaded.len(), 3);
        assert_eq!(loaded[&15432], reservation("db", 200));
        assert_eq!(loaded[&16379], reservation("cache", 100));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_database_is_reported_not_waited_for() {
        let metrics = Arc::new(Metrics::default());
        // Nothing listens on port 1.
        let (_, database) = Store::open(
            "postgres://relay:hunter2@127.0.0.1:1/relay",
            Arc::clone(&metrics),
        )
        .unwrap();
        let started = tokio::time::Instant::now();
        assert!(database.load(Duration::from_millis(500)).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(metrics.database_up.get(), 0);
        assert_eq!(metrics.database_errors.get(), 1);
    }

    #[test]
    fn a_bad_url_fails_at_once_without_its_password() {
        let error = Store::open("mysql://user:hunter2@db/x", Arc::new(Metrics::default()))
            .err()
            .unwrap();
        let message = format!("{error:#}");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("expected sqlite://PATH"), "{message}");
    }

    #[test]
    fn redacts_passwords_wherever_they_are() {
        assert_eq!(
            redact("postgres://user:secret@db:5432/relay"),
            "postgres://***@db:5432/relay"
        );
        assert_eq!(
            redact("postgres://db/relay?user=u&password=secret&sslmode=require"),
            "postgres://db/relay?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact("error connecting to postgres://u:p@h/d: refused"),
            "error connecting to postgres://***@h/d: refused"
        );
        assert_eq!(redact("sqlite://relay.db"), "sqlite://relay.db");
    }
}
