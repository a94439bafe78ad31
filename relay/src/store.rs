//! Which subject holds which port, kept in SQLite or PostgreSQL when the relay is
//! given `--database-url`, so that a restarted relay hands reconnecting clients the
//! ports they had. Without a database this lives only in the allocator's memory.

use std::collections::HashMap;

use anyhow::Context;
use localup_protocol::token::unix_now;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

pub enum PortStore {
    Memory,
    Database(AnyPool),
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS port_assignments (
    subject TEXT PRIMARY KEY,
    port BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
)";

impl PortStore {
    pub async fn open(database_url: Option<&str>) -> anyhow::Result<Self> {
        let Some(url) = database_url else {
            return Ok(PortStore::Memory);
        };
        sqlx::any::install_default_drivers();
        let url = create_sqlite_file_if_missing(url);
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .with_context(|| {
                format!(
                    "cannot open --database-url {}: expected sqlite://PATH or postgres://USER@HOST/DB",
                    redact(&url)
                )
            })?;
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .context("cannot create the port_assignments table")?;
        Ok(PortStore::Database(pool))
    }

    pub async fn load(&self) -> anyhow::Result<HashMap<String, u16>> {
        let PortStore::Database(pool) = self else {
            return Ok(HashMap::new());
        };
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT subject, port FROM port_assignments")
            .fetch_all(pool)
            .await
            .context("cannot read port assignments")?;
        Ok(rows
            .into_iter()
            .filter_map(|(subject, port)| Some((subject, u16::try_from(port).ok()?)))
            .collect())
    }

    /// Records that `subject` now holds `port`, taking it away from anyone else.
    pub async fn remember(&self, subject: &str, port: u16) -> anyhow::Result<()> {
        let PortStore::Database(pool) = self else {
            return Ok(());
        };
        let mut transaction = pool.begin().await?;
        sqlx::query("DELETE FROM port_assignments WHERE port = $1 AND subject <> $2")
            .bind(i64::from(port))
            .bind(subject)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO port_assignments (subject, port, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (subject) DO UPDATE SET port = excluded.port, updated_at = excluded.updated_at",
        )
        .bind(subject)
        .bind(i64::from(port))
        .bind(unix_now() as i64)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// For readiness: a relay whose database is gone cannot keep its promises.
    pub async fn is_reachable(&self) -> bool {
        match self {
            PortStore::Memory => true,
            PortStore::Database(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
        }
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

/// Database URLs may carry passwords; keep them out of error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_remembers_and_reassigns_ports() {
        let dir = std::env::temp_dir().join(format!("localup-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/relay.db", dir.display());

        let store = PortStore::open(Some(&url)).await.unwrap();
        store.remember("db", 15432).await.unwrap();
        store.remember("cache", 16379).await.unwrap();
        store.remember("db", 15433).await.unwrap();
        // A port taken over by another subject leaves its old holder.
        store.remember("web", 16379).await.unwrap();
        drop(store);

        let reopened = PortStore::open(Some(&url)).await.unwrap();
        let assignments = reopened.load().await.unwrap();
        assert_eq!(
            assignments,
            HashMap::from([("db".to_owned(), 15433), ("web".to_owned(), 16379)])
        );
        assert!(reopened.is_reachable().await);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://user:secret@db:5432/relay"),
            "postgres://***@db:5432/relay"
        );
        assert_eq!(redact("sqlite://relay.db"), "sqlite://relay.db");
    }
}
