//! A fresh PostgreSQL schema for one measurement, in the database of
//! `EDGEFLEET_TEST_POSTGRES_URL` (the local `test` database if unset).

use anyhow::Context;
use sqlx::{AssertSqlSafe, Connection, Executor};

fn base_url() -> String {
    std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema made for one measurement; [`FreshSchema::drop_schema`] removes
/// it and everything in it.
pub struct FreshSchema {
    name: String,
    /// The database's URL with this schema as its search path: a store
    /// opened on it creates its tables there.
    pub url: String,
}

impl FreshSchema {
    /// Creates `PREFIX_<random hex>`.
    pub async fn create(prefix: &str) -> anyhow::Result<FreshSchema> {
        let name = format!("{prefix}_{:08x}", std::process::id() ^ rand_u32());
        execute(&format!("CREATE SCHEMA {name}")).await?;
        let base = base_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        Ok(FreshSchema { name, url })
    }

    pub async fn drop_schema(self) -> anyhow::Result<()> {
        execute(&format!("DROP SCHEMA {} CASCADE", self.name)).await
    }
}

async fn execute(sql: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&base_url())
        .await
        .context("PostgreSQL (EDGEFLEET_TEST_POSTGRES_URL)")?;
    conn.execute(AssertSqlSafe(sql.to_string())).await?;
    conn.close().await?;
    Ok(())
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
