//! The PostgreSQL store: many stateless vault nodes over one database.
//!
//! * **Group commit.** One writer task per node owns one connection. Every
//!   batch waiting when it becomes free goes into one transaction, with
//!   tokens, order fields, reveal days and audit events inserted by one
//!   `UNNEST` statement each for the whole group; each caller is answered
//!   once the transaction has committed. If the group fails, it is rolled
//!   back and each batch is retried alone, so one bad batch cannot fail
//!   the others.
//! * **One chain per node.** The writer holds a session advisory lock per
//!   audit chain it writes, so a second node started with the same node id
//!   is refused, and the writer's cached chain head is always the stored
//!   one.
//! * **Shared counters.** Encryption reservations are added to the stored
//!   total under a row lock, and daily caps count every node's reveals
//!   under a per-(principal, day) counter row, so limits hold across nodes.
//! * **Connection loss.** A failed statement answers `Unavailable`; the
//!   writer reconnects on its next batch and the read pool replaces closed
//!   connections, so a node recovers by itself when the database is back.
//!
//! Migrations run under an advisory lock, so nodes starting together apply
//! each one once.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};

use super::{
    AlertRecord, AuditFilter, Committed, GrantFilter, GrantRecord, PrincipalRecord, Store,
    StoreError, StoredCheckpoint, StoredKey, TokenId, TokenLookup, TokenRecord, WriteBatch,
};
use crate::audit::{self, StoredEvent};
use crate::kinds::FieldKind;

/// Schema migrations, applied in order; `ordervault_schema` records how
/// many have run.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE key_versions (
    version    INTEGER PRIMARY KEY,
    algorithm  SMALLINT NOT NULL,
    wrapped    BYTEA,
    state      TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    reserved   BIGINT NOT NULL
);
CREATE TABLE principals (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    key_hash   BYTEA NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE TABLE tokens (
    id            BYTEA PRIMARY KEY,
    kind          SMALLINT NOT NULL,
    key_version   INTEGER NOT NULL,
    ciphertext    BYTEA NOT NULL,
    fingerprint   BYTEA NOT NULL,
    deterministic BOOLEAN NOT NULL,
    created_ms    BIGINT NOT NULL
);
-- One entry per token: deterministic ones in their unique index, the others here.
CREATE INDEX tokens_by_fingerprint ON tokens (kind, fingerprint) WHERE NOT deterministic;
CREATE UNIQUE INDEX tokens_deterministic ON tokens (kind, fingerprint) WHERE deterministic;
CREATE INDEX tokens_by_key_version ON tokens (key_version);
CREATE TABLE orders (
    id         BYTEA PRIMARY KEY,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE order_fields (
    order_id BYTEA NOT NULL,
    token_id BYTEA NOT NULL,
    PRIMARY KEY (order_id, token_id)
);
CREATE INDEX order_fields_by_token ON order_fields (token_id);
CREATE TABLE audit_events (
    chain       TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    ts_ms       BIGINT NOT NULL,
    principal   TEXT NOT NULL,
    action      TEXT NOT NULL,
    decision    TEXT NOT NULL,
    token       TEXT,
    leaf        BYTEA NOT NULL,
    chain_hash  BYTEA NOT NULL,
    order_token TEXT,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX audit_by_principal ON audit_events (principal, ts_ms);
CREATE INDEX audit_by_token ON audit_events (token) WHERE token IS NOT NULL;
CREATE TABLE grants (
    id         BYTEA PRIMARY KEY,
    principal  TEXT NOT NULL,
    order_id   BYTEA NOT NULL,
    purpose    TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    granted_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
CREATE INDEX grants_by_principal ON grants (principal, order_id);
CREATE INDEX grants_by_order ON grants (order_id);
CREATE TABLE reveal_days (
    principal TEXT NOT NULL,
    day       BIGINT NOT NULL,
    order_id  BYTEA NOT NULL,
    PRIMARY KEY (principal, day, order_id)
);
-- Distinct orders per (principal, day), kept with reveal_days: its row lock
-- serialises nodes checking the same daily cap.
CREATE TABLE reveal_day_counts (
    principal TEXT NOT NULL,
    day       BIGINT NOT NULL,
    n         BIGINT NOT NULL,
    PRIMARY KEY (principal, day)
);
CREATE TABLE alerts (
    id        BIGSERIAL PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    principal TEXT NOT NULL,
    peer      TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (at_ms);
CREATE TABLE checkpoints (
    chain TEXT NOT NULL,
    size  BIGINT NOT NULL,
    root  BYTEA NOT NULL,
    ts_ms BIGINT NOT NULL,
    note  TEXT NOT NULL,
    PRIMARY KEY (chain, size)
);
",
    // No schema change: new vaults store tokens under time-ordered keys
    // (meta `token_ids`), which a build from before would misread as token
    // bodies. The version bump makes such a build refuse the database.
    "-- token_ids layout",
    // Events found by their token's storage key where the vault has one;
    // see the SQLite store's migration 7.
    r"
ALTER TABLE audit_events ADD COLUMN token_key BYTEA;
DROP INDEX audit_by_token;
CREATE INDEX audit_by_token ON audit_events (token) WHERE token IS NOT NULL AND token_key IS NULL;
CREATE INDEX audit_by_token_key ON audit_events (token_key) WHERE token_key IS NOT NULL;
",
];

/// Advisory lock key serialising migrations ("ordervault" in ASCII). `keys
/// rotate-master` holds it while it rotates ([`OfflineGuard`]).
pub const MIGRATION_LOCK: i64 = 0x6f72_6465_7276_6175;
/// Advisory lock every node holds, shared, from before it reads its keys
/// until it stops, on a connection of its own ("ordervnd"). `keys
/// rotate-master` takes it exclusively ([`OfflineGuard`]): it cannot while
/// a node runs, and a node starting meanwhile waits for it.
pub const NODE_LOCK: i64 = 0x6f72_6465_7276_6e64;
/// Most batches gathered into one transaction.
const MAX_GROUP: usize = 1024;
/// Read connections per node.
const READ_POOL: usize = 16;
/// Attempts, 250 ms apart, to take an audit chain's lock.
const CHAIN_LOCK_TRIES: usize = 12;
/// How long to wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Job {
    batch: WriteBatch,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    shown: String,
    pool: Pool,
    writer: std::sync::Mutex<Option<mpsc::UnboundedSender<Job>>>,
    writer_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The connection holding [`NODE_LOCK`] (shared) while this store is
    /// open as a node's (`connect`); none for inspection
    /// (`connect_existing`).
    presence: std::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

/// A database URL as it may be shown: host, port and database, never the
/// user's password.
pub fn redacted(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}:{port}/{}",
                hosts.join(","),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "an unparsable postgres URL".into(),
    }
}

/// What an offline tool that must not run beside a node (`keys
/// rotate-master`) holds while it works: [`MIGRATION_LOCK`] and
/// [`NODE_LOCK`], exclusively, on a connection named otherwise than the
/// nodes'. It cannot have them while a node runs; a node starting meanwhile
/// waits, and then reads what the tool wrote. Released when dropped (its
/// connection closes).
pub struct OfflineGuard {
    client: Client,
}

impl OfflineGuard {
    /// Takes the locks, or `None` when one is held: a node runs or is
    /// starting, or another offline tool runs.
    pub async fn acquire(url: &SecretString) -> Result<Option<OfflineGuard>, StoreError> {
        let mut config = parse_config(url)?;
        config.application_name("ordervault-admin");
        let shown = redacted(url.expose_secret());
        let client = connect(&config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
        // Both or neither: a lock taken alone is let go with the
        // connection when this returns `None`.
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1) AND pg_try_advisory_lock($2)",
                &[&MIGRATION_LOCK, &NODE_LOCK],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        Ok(locked.then_some(OfflineGuard { client }))
    }

    /// The connections of running ordervault nodes (by their application
    /// name), as "pid N from ADDRESS".
    pub async fn nodes_connected(&self) -> Result<Vec<String>, StoreError> {
        // The server ends a closed connection's backend a moment after its
        // client goes: a node stopped just now may still be listed briefly.
        let mut left = 10;
        loop {
            let found: Vec<String> = self
                .client
                .query(
                    "SELECT 'pid ' || pid || ' from ' || coalesce(host(client_addr), 'a local socket')
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()
                     ORDER BY pid",
                    &[&APPLICATION_NAME],
                )
                .await
                .map_err(pg_error)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            left -= 1;
            if found.is_empty() || left == 0 {
                return Ok(found);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// The application name of every connection a node opens.
const APPLICATION_NAME: &str = "ordervault";

fn parse_config(url: &SecretString) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url.expose_secret()).map_err(|_| {
        StoreError::Unavailable(
            "the storage URL is not a valid PostgreSQL URL (postgres://user[:password]@host[:port]/database)".into(),
        )
    })?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name(APPLICATION_NAME);
    Ok(config)
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // Connection trouble: the causes say what (refused, reset, TLS,
        // authentication); none of them holds the URL's password.
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        return StoreError::Unavailable(format!("database unreachable: {text}"));
    };
    let code = db.code();
    if *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::FOREIGN_KEY_VIOLATION
        || *code == SqlState::CHECK_VIOLATION
        || *code == SqlState::NOT_NULL_VIOLATION
    {
        StoreError::Conflict(format!(
            "conflicts with existing data ({})",
            db.constraint().unwrap_or(db.message())
        ))
    } else if code.code().starts_with("22") {
        // Data exceptions: the request's own values.
        StoreError::Invalid(format!(
            "the request holds a value the database cannot take: {}",
            db.message()
        ))
    } else if code.code().starts_with("40") {
        StoreError::Unavailable(format!("database contention ({}); retry", db.message()))
    } else {
        StoreError::Unavailable(format!("database error: {}", db.message()))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(format!("database unreachable: {other}")),
    }
}

/// Opens the connection that holds [`NODE_LOCK`] for a node, waiting
/// while `keys rotate-master` holds it.
async fn announce(config: &tokio_postgres::Config, shown: &str) -> Result<Client, StoreError> {
    let client = connect(config)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
    let held: bool = client
        .query_one("SELECT pg_try_advisory_lock_shared($1)", &[&NODE_LOCK])
        .await
        .map_err(pg_error)?
        .get(0);
    if !held {
        tracing::info!("waiting for `keys rotate-master` to finish on the database");
        client
            .execute("SELECT pg_advisory_lock_shared($1)", &[&NODE_LOCK])
            .await
            .map_err(pg_error)?;
    }
    Ok(client)
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let result = async {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS ordervault_schema (version INTEGER NOT NULL); INSERT INTO ordervault_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM ordervault_schema)")
            .await
            .map_err(pg_error)?;
        let version: i32 = client
            .query_one("SELECT version FROM ordervault_schema", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "database schema version {version} is newer than this build supports ({}); upgrade ordervault",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.batch_execute(sql).await.map_err(pg_error)?;
            tx.execute(
                "UPDATE ordervault_schema SET version = $1",
                &[&(i as i32 + 1)],
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
        }
        Ok(())
    }
    .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

impl PostgresStore {
    /// Connects to the database at `url`, applies migrations and starts
    /// the writer. The URL's password is never shown or logged.
    pub async fn connect(url: &SecretString) -> Result<PostgresStore, StoreError> {
        PostgresStore::open(url, true)
            .await?
            .ok_or_else(|| StoreError::Unavailable("the schema was not created".into()))
    }

    /// Connects without changing the schema (for inspection: `audit
    /// verify`, start-up checks): `None` when the database holds no vault
    /// schema yet; an error when its schema is newer than this build's.
    pub async fn connect_existing(url: &SecretString) -> Result<Option<PostgresStore>, StoreError> {
        PostgresStore::open(url, false).await
    }

    async fn open(
        url: &SecretString,
        migrate_schema: bool,
    ) -> Result<Option<PostgresStore>, StoreError> {
        let config = parse_config(url)?;
        let shown = redacted(url.expose_secret());
        let mut presence = None;
        if migrate_schema {
            presence = Some(announce(&config, &shown).await?);
        }
        let mut client = connect(&config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {e}")))?;
        if migrate_schema {
            migrate(&mut client).await?;
        } else {
            let exists: bool = client
                .query_one("SELECT to_regclass('ordervault_schema') IS NOT NULL", &[])
                .await
                .map_err(pg_error)?
                .get(0);
            let version: Option<i32> = if exists {
                client
                    .query_opt("SELECT version FROM ordervault_schema", &[])
                    .await
                    .map_err(pg_error)?
                    .map(|r| r.get(0))
            } else {
                None
            };
            match version {
                None | Some(0) => return Ok(None),
                // Older is fine to read (a node of this build migrates it
                // when it starts); newer is not this build's to interpret.
                Some(v) if v as usize > MIGRATIONS.len() => {
                    return Err(StoreError::Unavailable(format!(
                        "the database's schema is version {v}, newer than this build's ({}); use the ordervault version the nodes run",
                        MIGRATIONS.len()
                    )));
                }
                Some(_) => {}
            }
        }
        drop(client);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(READ_POOL)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the pool: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(Writer::new(config).run(rx));
        Ok(Some(PostgresStore {
            shown,
            pool,
            writer: std::sync::Mutex::new(Some(tx)),
            writer_task: tokio::sync::Mutex::new(Some(task)),
            presence: std::sync::Mutex::new(presence),
        }))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let st = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&st, params).await.map_err(pg_error)
    }

    async fn count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let rows = self.rows(sql, params).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }
}

/// Creates a new, empty database next to the one `url` names, and returns
/// its URL: for tests and benchmarks that need a database of their own.
pub async fn create_scratch_database(url: &SecretString) -> Result<SecretString, StoreError> {
    let config = parse_config(url)?;
    let client = connect(&config).await?;
    let name = format!(
        "ordervault_scratch_{}",
        hex::encode(crate::crypto::random_bytes::<6>())
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(pg_error)?;
    let mut scratch = config;
    scratch.dbname(&name);
    Ok(SecretString::from(config_url(&scratch, url)?))
}

/// Drops a database made by [`create_scratch_database`].
pub async fn drop_scratch_database(
    url: &SecretString,
    scratch: &SecretString,
) -> Result<(), StoreError> {
    let name = tokio_postgres::Config::from_str(scratch.expose_secret())
        .ok()
        .and_then(|c| c.get_dbname().map(str::to_owned))
        // Only names this module makes (they are spliced into the DROP).
        .filter(|n| {
            n.strip_prefix("ordervault_scratch_")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .ok_or_else(|| StoreError::Conflict("not a scratch database".into()))?;
    let client = connect(&parse_config(url)?).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(pg_error)
}

/// `url` with its database replaced by `config`'s.
fn config_url(config: &tokio_postgres::Config, url: &SecretString) -> Result<String, StoreError> {
    let db = config.get_dbname().unwrap_or("postgres");
    let text = url.expose_secret();
    // postgres://user:pw@host:port/dbname?params  or  key=value form.
    if let Some(rest) = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    {
        let (head, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let authority = head.split_once('/').map_or(head, |(a, _)| a);
        let mut out = format!("postgres://{authority}/{db}");
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Ok(out)
    } else {
        Ok(format!("{text} dbname={db}"))
    }
}

fn token_id(bytes: Vec<u8>) -> Result<TokenId, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("a stored token id has the wrong length".into()))
}

fn hash32(bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("a stored hash has the wrong length".into()))
}

const TOKEN_COLUMNS: &str =
    "id, kind, key_version, ciphertext, fingerprint, deterministic, created_ms";

fn token_row(r: &Row) -> Result<TokenRecord, StoreError> {
    let code: i16 = r.get(1);
    let kind = u8::try_from(code)
        .ok()
        .and_then(FieldKind::from_code)
        .ok_or_else(|| StoreError::Corrupt("a stored token has an unknown field kind".into()))?;
    Ok(TokenRecord {
        id: token_id(r.get(0))?,
        kind,
        key_version: r.get::<_, i32>(2) as u32,
        ciphertext: r.get(3),
        fingerprint: hash32(r.get(4))?,
        deterministic: r.get(5),
        created_ms: r.get(6),
    })
}

const EVENT_SELECT: &str = "SELECT seq, chain, leaf, chain_hash, principal, action, decision, token, ts_ms, token_key, order_token FROM audit_events";

fn event_row(r: &Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        seq: r.get::<_, i64>(0) as u64,
        chain: r.get(1),
        leaf: r.get(2),
        chain_hash: hash32(r.get(3))?,
        principal: r.get(4),
        action: r.get(5),
        decision: r.get(6),
        token: r.get(7),
        // A key of the wrong length (an edited row) cannot name a token:
        // verification reports it.
        token_key: r
            .get::<_, Option<Vec<u8>>>(9)
            .map(|k| k.try_into().unwrap_or([0; crate::token::TOKEN_ID_BYTES])),
        ts_ms: r.get(8),
        order_token: r.get(10),
        // The schema's column types hold every row to its type.
        misstored: None,
    })
}

const GRANT_SELECT: &str = "SELECT id, principal, order_id, purpose, expires_ms, granted_by, created_ms, revoked_ms FROM grants";

fn grant_row(r: &Row) -> Result<GrantRecord, StoreError> {
    let id: Vec<u8> = r.get(0);
    Ok(GrantRecord {
        id: id
            .try_into()
            .map_err(|_| StoreError::Corrupt("a stored grant id has the wrong length".into()))?,
        principal: r.get(1),
        order_id: token_id(r.get(2))?,
        purpose: r.get(3),
        expires_ms: r.get(4),
        granted_by: r.get(5),
        created_ms: r.get(6),
        revoked_ms: r.get(7),
    })
}

// Lookups by (kind, fingerprint): one index probe per key whatever the
// statistics say (see `orders_of_tokens`).
const DETERMINISTIC_LOOKUP: &str = "SELECT k.kind, k.fingerprint, t.id
     FROM UNNEST($1::int2[], $2::bytea[]) AS k(kind, fingerprint),
     LATERAL (SELECT id FROM tokens
              WHERE kind = k.kind AND fingerprint = k.fingerprint AND deterministic OFFSET 0) AS t";
const FINGERPRINT_LOOKUP: &str = "SELECT k.kind, k.fingerprint, t.id
     FROM UNNEST($1::int2[], $2::bytea[]) AS k(kind, fingerprint),
     LATERAL (SELECT id FROM tokens
              WHERE kind = k.kind AND fingerprint = k.fingerprint AND deterministic
              UNION ALL
              SELECT id FROM tokens
              WHERE kind = k.kind AND fingerprint = k.fingerprint AND NOT deterministic) AS t
     ORDER BY t.id";

fn kind_codes(keys: &[(FieldKind, [u8; 32])]) -> (Vec<i16>, Vec<&[u8]>) {
    keys.iter()
        .map(|(k, fp)| (i16::from(k.code()), &fp[..]))
        .unzip()
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn claim_chain(&self, chain: &str) -> Result<(), StoreError> {
        // An empty batch for the chain: the writer takes the chain's lock.
        self.commit(WriteBatch {
            audit_chain: chain.to_owned(),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    async fn close(&self) {
        // The writer commits what it holds, then stops.
        drop(self.writer.lock().map(|mut w| w.take()));
        let task = self.writer_task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.pool.close();
        drop(self.presence.lock().map(|mut p| p.take()));
    }

    async fn live_nodes(&self) -> Result<u64, StoreError> {
        // Each running node's writer holds the session lock of its chain
        // (bigint advisory locks show as objsubid 1); the migration lock is
        // held only while a node starts, the node lock by every node.
        let n = self
            .count(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND ((classid::int8 << 32) | objid::int8) NOT IN ($1::int8, $2::int8)",
                &[&MIGRATION_LOCK, &NODE_LOCK],
            )
            .await?;
        Ok(n.max(1))
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self
            .rows("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn key_versions(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.rows(
            "SELECT version, algorithm, wrapped, state, created_ms, reserved FROM key_versions ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StoredKey {
                version: r.get::<_, i32>(0) as u32,
                algorithm: u8::try_from(r.get::<_, i16>(1)).map_err(|_| {
                    StoreError::Corrupt("a stored key has an unknown algorithm".into())
                })?,
                wrapped: r.get(2),
                state: r.get(3),
                created_ms: r.get(4),
                reserved: r.get::<_, i64>(5) as u64,
            })
        })
        .collect()
    }

    async fn principals(&self) -> Result<Vec<PrincipalRecord>, StoreError> {
        self.rows(
            "SELECT name, role, key_hash, created_ms, revoked_ms FROM principals ORDER BY name",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(PrincipalRecord {
                name: r.get(0),
                role: r.get(1),
                key_hash: hash32(r.get(2))?,
                created_ms: r.get(3),
                revoked_ms: r.get(4),
            })
        })
        .collect()
    }

    async fn tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Option<TokenRecord>>, StoreError> {
        let keys: Vec<&[u8]> = ids.iter().map(|i| &i[..]).collect();
        let rows = self
            .rows(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ANY($1)"),
                &[&keys],
            )
            .await?;
        let mut found = HashMap::with_capacity(rows.len());
        for r in &rows {
            let t = token_row(r)?;
            found.insert(t.id, t);
        }
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn deterministic_tokens(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Option<TokenId>>, StoreError> {
        let (kinds, fps) = kind_codes(&keys);
        let rows = self.rows(DETERMINISTIC_LOOKUP, &[&kinds, &fps]).await?;
        let mut found = HashMap::new();
        for r in &rows {
            found.insert(
                (r.get::<_, i16>(0), r.get::<_, Vec<u8>>(1)),
                token_id(r.get(2))?,
            );
        }
        Ok(keys
            .iter()
            .map(|(k, fp)| found.get(&(i16::from(k.code()), fp.to_vec())).copied())
            .collect())
    }

    async fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        let sender = self
            .writer
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .ok_or_else(|| StoreError::Unavailable("the store is shutting down".into()))?;
        sender
            .send(Job { batch, reply })
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer stopped before committing".into()))?
    }

    async fn audit_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.rows(
            &format!("{EVENT_SELECT} WHERE chain = $1 AND seq >= $2 ORDER BY seq LIMIT $3"),
            &[&chain, &(from_seq as i64), &(limit as i64)],
        )
        .await?
        .iter()
        .map(event_row)
        .collect()
    }

    async fn token_count(&self) -> Result<u64, StoreError> {
        self.count("SELECT count(*) FROM tokens", &[]).await
    }

    async fn orders_of_tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Vec<TokenId>>, StoreError> {
        let keys: Vec<&[u8]> = ids.iter().map(|i| &i[..]).collect();
        let rows = self
            .rows(
                // One index probe per token, whatever the statistics say: a
                // few tokens (a customer's name) are in many orders, and a
                // fast-growing table has stale statistics, either of which
                // makes a join look like a job for a full scan. (OFFSET 0
                // keeps the planner from flattening the lateral subquery.)
                "SELECT k.id, f.order_id FROM UNNEST($1::bytea[]) AS k(id),
                 LATERAL (SELECT order_id FROM order_fields WHERE token_id = k.id OFFSET 0) AS f",
                &[&keys],
            )
            .await?;
        let mut found: HashMap<TokenId, Vec<TokenId>> = HashMap::new();
        for r in &rows {
            found
                .entry(token_id(r.get(0))?)
                .or_default()
                .push(token_id(r.get(1))?);
        }
        for orders in found.values_mut() {
            orders.sort_unstable();
        }
        Ok(ids
            .iter()
            .map(|id| found.get(id).cloned().unwrap_or_default())
            .collect())
    }

    async fn order_exists(&self, id: TokenId) -> Result<bool, StoreError> {
        let rows = self
            .rows("SELECT 1 FROM orders WHERE id = $1", &[&&id[..]])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn grants(&self, filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        let rows = if filter.orders.is_empty() {
            // Separate statements, so the one by principal uses its index.
            match &filter.principal {
                Some(p) => {
                    self.rows(
                        &format!("{GRANT_SELECT} WHERE principal = $1 ORDER BY created_ms DESC"),
                        &[p],
                    )
                    .await?
                }
                None => {
                    self.rows(&format!("{GRANT_SELECT} ORDER BY created_ms DESC"), &[])
                        .await?
                }
            }
        } else {
            let orders: Vec<&[u8]> = filter.orders.iter().map(|o| &o[..]).collect();
            self.rows(
                &format!(
                    "{GRANT_SELECT} WHERE order_id = ANY($1) AND ($2::text IS NULL OR principal = $2)
                     ORDER BY created_ms DESC"
                ),
                &[&orders, &filter.principal],
            )
            .await?
        };
        rows.iter().map(grant_row).collect()
    }

    async fn grant(&self, id: [u8; 16]) -> Result<Option<GrantRecord>, StoreError> {
        let rows = self
            .rows(&format!("{GRANT_SELECT} WHERE id = $1"), &[&&id[..]])
            .await?;
        rows.first().map(grant_row).transpose()
    }

    async fn revealed_on_day(&self, principal: &str, day: i64) -> Result<Vec<TokenId>, StoreError> {
        self.rows(
            "SELECT order_id FROM reveal_days WHERE principal = $1 AND day = $2",
            &[&principal, &day],
        )
        .await?
        .iter()
        .map(|r| token_id(r.get(0)))
        .collect()
    }

    async fn alerts(&self, since_ms: i64, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        Ok(self
            .rows(
                "SELECT id, at_ms, kind, principal, peer, detail FROM alerts WHERE at_ms >= $1 ORDER BY id LIMIT $2",
                &[&since_ms, &(limit as i64)],
            )
            .await?
            .iter()
            .map(|r| AlertRecord {
                id: r.get::<_, i64>(0) as u64,
                at_ms: r.get(1),
                kind: r.get(2),
                principal: r.get(3),
                peer: r.get(4),
                detail: r.get(5),
            })
            .collect())
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        // A loose index scan over the primary key: one probe per chain, not
        // a pass over every event.
        Ok(self
            .rows(
                "WITH RECURSIVE c(chain) AS (
                     (SELECT chain FROM audit_events ORDER BY chain LIMIT 1)
                     UNION ALL
                     SELECT (SELECT e.chain FROM audit_events e WHERE e.chain > c.chain ORDER BY e.chain LIMIT 1)
                     FROM c WHERE c.chain IS NOT NULL
                 ) SELECT chain FROM c WHERE chain IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn audit_size(&self, chain: &str) -> Result<u64, StoreError> {
        self.count(
            "SELECT coalesce(max(seq), 0) FROM audit_events WHERE chain = $1",
            &[&chain],
        )
        .await
    }

    async fn audit_query(
        &self,
        f: AuditFilter,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // Only the filters given, as in SQLite: each combination is its own
        // prepared statement, so PostgreSQL plans it with the indexes that
        // fit. One statement with `($3 IS NULL OR principal = $3)` for every
        // filter let a cached generic plan walk the whole chain by seq.
        use tokio_postgres::types::ToSql;
        let after = f.after_seq as i64;
        let limit = limit as i64;
        let key = f.token_key.map(|k| k.to_vec());
        let mut sql = format!("{EVENT_SELECT} WHERE chain = $1 AND seq > $2");
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&f.chain, &after];
        let filters: [(&str, Option<&(dyn ToSql + Sync)>); 5] = [
            ("principal =", f.principal.as_ref().map(|v| v as _)),
            ("action =", f.action.as_ref().map(|v| v as _)),
            ("decision =", f.decision.as_ref().map(|v| v as _)),
            ("ts_ms >=", f.since_ms.as_ref().map(|v| v as _)),
            ("ts_ms <", f.until_ms.as_ref().map(|v| v as _)),
        ];
        for (clause, value) in filters {
            if let Some(v) = value {
                params.push(v);
                sql.push_str(&format!(" AND {clause} ${}", params.len()));
            }
        }
        if let Some(t) = &f.token {
            // By key where the event has one, else by text.
            params.push(t);
            let text = params.len();
            match &key {
                Some(k) => {
                    params.push(k);
                    sql.push_str(&format!(
                        " AND (token_key = ${} OR (token_key IS NULL AND token = ${text}))",
                        params.len()
                    ));
                }
                None => sql.push_str(&format!(" AND token_key IS NULL AND token = ${text}")),
            }
        }
        params.push(&limit);
        sql.push_str(&format!(" ORDER BY seq LIMIT ${}", params.len()));
        self.rows(&sql, &params)
            .await?
            .iter()
            .map(event_row)
            .collect()
    }

    async fn audit_by_tokens(
        &self,
        tokens: Vec<TokenLookup>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let keys: Vec<Vec<u8>> = tokens
            .iter()
            .filter_map(|t| t.key.map(|k| k.to_vec()))
            .collect();
        let texts: Vec<&str> = tokens.iter().map(|t| t.text.as_str()).collect();
        self.rows(
            // One index probe per token (see `orders_of_tokens`).
            &format!(
                "SELECT e.* FROM (SELECT DISTINCT key FROM UNNEST($1::bytea[]) AS u(key)) AS k,
                   LATERAL ({EVENT_SELECT} WHERE token_key = k.key OFFSET 0) AS e
                 UNION ALL
                 SELECT e.* FROM (SELECT DISTINCT t FROM UNNEST($2::text[]) AS u(t)) AS k,
                   LATERAL ({EVENT_SELECT} WHERE token = k.t AND token_key IS NULL OFFSET 0) AS e
                 ORDER BY chain, seq"
            ),
            &[&keys, &texts],
        )
        .await?
        .iter()
        .map(event_row)
        .collect()
    }

    async fn revealed_records(
        &self,
        principal: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError> {
        self.count(
            "SELECT count(DISTINCT coalesce(order_token, token)) FROM audit_events
             WHERE principal = $1 AND ts_ms >= $2 AND ts_ms <= $3
               AND action = 'reveal' AND decision IN ('allowed', 'masked')",
            &[&principal, &from_ms, &to_ms],
        )
        .await
    }

    async fn checkpoints(&self, chain: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.rows(
            "SELECT chain, size, root, ts_ms, note FROM checkpoints WHERE chain = $1 ORDER BY size",
            &[&chain],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StoredCheckpoint {
                chain: r.get(0),
                size: r.get::<_, i64>(1) as u64,
                root: hash32(r.get(2))?,
                ts_ms: r.get(3),
                note: r.get(4),
            })
        })
        .collect()
    }

    async fn tokens_by_fingerprint(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Vec<TokenId>>, StoreError> {
        let (kinds, fps) = kind_codes(&keys);
        let rows = self.rows(FINGERPRINT_LOOKUP, &[&kinds, &fps]).await?;
        let mut found: HashMap<(i16, Vec<u8>), Vec<TokenId>> = HashMap::new();
        for r in &rows {
            found
                .entry((r.get(0), r.get(1)))
                .or_default()
                .push(token_id(r.get(2))?);
        }
        Ok(keys
            .iter()
            .map(|(k, fp)| {
                found
                    .get(&(i16::from(k.code()), fp.to_vec()))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect())
    }

    async fn ciphertexts_per_version(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        Ok(self
            .rows(
                "SELECT key_version, count(*) FROM tokens GROUP BY key_version ORDER BY key_version",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn rewrap_candidates(
        &self,
        primary: u32,
        only: Option<u32>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let only = only.map(|v| v as i32);
        self.rows(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens
                 WHERE CASE WHEN $2::int4 IS NULL THEN key_version <> $1 ELSE key_version = $2 END
                 LIMIT $3"
            ),
            &[&(primary as i32), &only, &(limit as i64)],
        )
        .await?
        .iter()
        .map(token_row)
        .collect()
    }

    async fn rewrap_remaining(&self, primary: u32, only: Option<u32>) -> Result<u64, StoreError> {
        let only = only.map(|v| v as i32);
        self.count(
            "SELECT count(*) FROM tokens
             WHERE CASE WHEN $2::int4 IS NULL THEN key_version <> $1 ELSE key_version = $2 END",
            &[&(primary as i32), &only],
        )
        .await
    }

    async fn storage_bytes(&self) -> Result<u64, StoreError> {
        self.count("SELECT pg_database_size(current_database())", &[])
            .await
    }

    async fn chain_head(&self, chain: &str) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let rows = self
            .rows(
                "SELECT seq, chain_hash FROM audit_events WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                &[&chain],
            )
            .await?;
        rows.first()
            .map(|r| Ok((r.get::<_, i64>(0) as u64, hash32(r.get(1))?)))
            .transpose()
    }
}

/// Per-chain position: the next sequence number and the chain hash so far.
#[derive(Clone, Copy)]
struct Head {
    next_seq: u64,
    hash: [u8; 32],
}

/// The advisory lock key of an audit chain.
fn chain_lock(chain: &str) -> i64 {
    let digest = Sha256::digest(format!("ordervault.chain:{chain}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(b)
}

/// Why a group failed: a refusal of one batch (retry the batches alone) or
/// the database (fail them all).
enum GroupError {
    Refused(StoreError),
    Down(StoreError),
}

impl From<tokio_postgres::Error> for GroupError {
    fn from(e: tokio_postgres::Error) -> Self {
        // An error the server reported on a live connection belongs to one
        // batch (or to contention): retry the batches alone. Anything else
        // is the connection: fail them all and reconnect.
        let live = !e.is_closed() && e.as_db_error().is_some();
        if live {
            GroupError::Refused(pg_error(e))
        } else {
            GroupError::Down(pg_error(e))
        }
    }
}

impl From<GroupError> for StoreError {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Refused(e) | GroupError::Down(e) => e,
        }
    }
}

fn refused(why: String) -> GroupError {
    GroupError::Refused(StoreError::Conflict(why))
}

struct Writer {
    config: tokio_postgres::Config,
    client: Option<Client>,
    heads: HashMap<String, Head>,
}

impl Writer {
    fn new(config: tokio_postgres::Config) -> Writer {
        Writer {
            config,
            client: None,
            heads: HashMap::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        // Returns when every sender is gone and the queue is drained, so a
        // shutdown commits everything accepted.
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(jobs).await;
        }
    }

    async fn commit_group(&mut self, jobs: Vec<Job>) {
        let batches: Vec<&WriteBatch> = jobs.iter().map(|j| &j.batch).collect();
        let outcome = self.try_group(&batches).await;
        let results: Vec<Result<Committed, StoreError>> = match outcome {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(GroupError::Refused(e)) if jobs.len() == 1 => vec![Err(e)],
            Err(GroupError::Refused(_)) => {
                // Isolate the failing batch: each alone.
                let mut out = Vec::with_capacity(jobs.len());
                for b in &batches {
                    out.push(
                        self.try_group(std::slice::from_ref(b))
                            .await
                            .map(|mut r| r.remove(0))
                            .map_err(StoreError::from),
                    );
                }
                out
            }
            Err(GroupError::Down(e)) => {
                let msg = e.to_string();
                jobs.iter()
                    .map(|_| Err(StoreError::Unavailable(msg.clone())))
                    .collect()
            }
        };
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }

    /// Applies `batches` in one transaction; all or none are durable.
    async fn try_group(&mut self, batches: &[&WriteBatch]) -> Result<Vec<Committed>, GroupError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            // A new session holds none of the chain locks: forget the heads.
            self.heads.clear();
            self.client = None;
            self.client = Some(connect(&self.config).await.map_err(GroupError::Down)?);
        }
        let saved = self.heads.clone();
        let outcome = self.apply_group(batches).await;
        if outcome.is_err() {
            // Nothing of the group is durable: forget the heads it advanced.
            // (The dropped transaction has rolled itself back.)
            self.heads = saved;
            if matches!(outcome, Err(GroupError::Down(_))) {
                self.client = None;
                self.heads.clear();
            }
        }
        outcome
    }

    async fn head(&mut self, chain: &str) -> Result<Head, GroupError> {
        if let Some(h) = self.heads.get(chain) {
            return Ok(*h);
        }
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| GroupError::Down(StoreError::Unavailable("not connected".into())))?;
        // A session of this node that just lost its connection may hold the
        // lock until the server notices: give it a few seconds.
        let mut locked = false;
        for _ in 0..CHAIN_LOCK_TRIES {
            locked = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&chain_lock(chain)])
                .await?
                .get(0);
            if locked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !locked {
            return Err(refused(format!(
                "audit chain {chain:?} is being written by another node: every node needs its own node id"
            )));
        }
        let last = client
            .query_opt(
                "SELECT seq, chain_hash FROM audit_events WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                &[&chain],
            )
            .await?;
        let head = match last {
            Some(r) => Head {
                next_seq: r.get::<_, i64>(0) as u64 + 1,
                hash: hash32(r.get(1)).map_err(GroupError::Down)?,
            },
            None => Head {
                next_seq: 1,
                hash: audit::GENESIS,
            },
        };
        self.heads.insert(chain.to_owned(), head);
        Ok(head)
    }

    async fn apply_group(&mut self, batches: &[&WriteBatch]) -> Result<Vec<Committed>, GroupError> {
        // Chain locks and heads first (outside the transaction: session
        // locks outlive it either way).
        for b in batches {
            if b.audit_chain.is_empty() {
                continue;
            }
            match self.head(&b.audit_chain).await {
                Ok(_) => {}
                // Only a claim (an empty batch) is told of the conflict; a
                // write of this node cannot be done until it is resolved.
                Err(GroupError::Refused(StoreError::Conflict(m))) if !b.audit.is_empty() => {
                    return Err(GroupError::Down(StoreError::Unavailable(m)));
                }
                Err(e) => return Err(e),
            }
        }
        let Some(client) = self.client.as_mut() else {
            return Err(GroupError::Down(StoreError::Unavailable(
                "not connected".into(),
            )));
        };
        let tx = client.transaction().await?;
        let mut out: Vec<Committed> = batches.iter().map(|_| Committed::default()).collect();

        // Rare writes, batch by batch in order.
        for (b, out) in batches.iter().zip(out.iter_mut()) {
            for (k, v) in &b.meta {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[k, v],
                )
                .await?;
            }
            for k in &b.keys {
                tx.execute(
                    "INSERT INTO key_versions (version, algorithm, wrapped, state, created_ms, reserved)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (version) DO UPDATE SET algorithm = excluded.algorithm,
                       wrapped = excluded.wrapped, state = excluded.state,
                       created_ms = excluded.created_ms, reserved = excluded.reserved",
                    &[
                        &(k.version as i32),
                        &i16::from(k.algorithm),
                        &k.wrapped,
                        &k.state,
                        &k.created_ms,
                        &(k.reserved as i64),
                    ],
                )
                .await?;
            }
            for r in &b.reserve {
                let row = tx
                    .query_opt(
                        "SELECT reserved FROM key_versions WHERE version = $1 FOR UPDATE",
                        &[&(r.version as i32)],
                    )
                    .await?
                    .ok_or_else(|| refused(format!("key version {} is not stored", r.version)))?;
                let old = row.get::<_, i64>(0) as u64;
                let new = old.max(old.saturating_add(r.count).min(r.cap));
                tx.execute(
                    "UPDATE key_versions SET reserved = $2 WHERE version = $1",
                    &[&(r.version as i32), &(new as i64)],
                )
                .await?;
                out.reserved.push((old, new));
            }
            for p in &b.principals {
                tx.execute(
                    "INSERT INTO principals (name, role, key_hash, created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5)",
                    &[&p.name, &p.role, &&p.key_hash[..], &p.created_ms, &p.revoked_ms],
                )
                .await?;
            }
            for g in &b.grants {
                tx.execute(
                    "INSERT INTO grants (id, principal, order_id, purpose, expires_ms, granted_by, created_ms, revoked_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &&g.id[..],
                        &g.principal,
                        &&g.order_id[..],
                        &g.purpose,
                        &g.expires_ms,
                        &g.granted_by,
                        &g.created_ms,
                        &g.revoked_ms,
                    ],
                )
                .await?;
            }
            for (id, at) in &b.grant_revocations {
                tx.execute(
                    "UPDATE grants SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL",
                    &[&&id[..], at],
                )
                .await?;
            }
            for (name, at) in &b.principal_revocations {
                tx.execute(
                    "UPDATE principals SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                    &[name, at],
                )
                .await?;
            }
            for c in &b.checkpoints {
                tx.execute(
                    "INSERT INTO checkpoints (chain, size, root, ts_ms, note) VALUES ($1, $2, $3, $4, $5)",
                    &[&c.chain, &(c.size as i64), &&c.root[..], &c.ts_ms, &c.note],
                )
                .await?;
            }
            for a in &b.alerts {
                tx.execute(
                    "INSERT INTO alerts (at_ms, kind, principal, peer, detail) VALUES ($1, $2, $3, $4, $5)",
                    &[&a.at_ms, &a.kind, &a.principal, &a.peer, &a.detail],
                )
                .await?;
            }
            for (version, from, to) in &b.key_states {
                let changed = tx
                    .execute(
                        "UPDATE key_versions SET state = $3 WHERE version = $1 AND state = $2",
                        &[&(*version as i32), from, to],
                    )
                    .await?;
                if changed != 1 {
                    return Err(refused(format!("key version {version} is not {from}")));
                }
            }
            for r in &b.rewraps {
                out.rewrapped += tx
                    .execute(
                        "UPDATE tokens SET key_version = $3, ciphertext = $4 WHERE id = $1 AND key_version = $2",
                        &[
                            &&r.id[..],
                            &(r.from_version as i32),
                            &(r.to_version as i32),
                            &r.ciphertext,
                        ],
                    )
                    .await?;
            }
            for version in &b.retire {
                // Waits for groups still storing ciphertexts under it (they
                // hold the row FOR SHARE); the NOT EXISTS below, a new
                // statement, then sees what they committed.
                tx.query_opt(
                    "SELECT 1 FROM key_versions WHERE version = $1 FOR UPDATE",
                    &[&(*version as i32)],
                )
                .await?;
                let changed = tx
                    .execute(
                        "UPDATE key_versions SET wrapped = NULL, state = 'retired'
                         WHERE version = $1 AND state = 'decrypt_only'
                           AND NOT EXISTS (SELECT 1 FROM tokens WHERE key_version = $1)",
                        &[&(*version as i32)],
                    )
                    .await?;
                if changed != 1 {
                    return Err(refused(format!(
                        "key version {version} is not decrypt-only or still protects ciphertexts"
                    )));
                }
            }
        }

        // Tokens of the whole group: one insert. Of a deterministic value
        // given twice, only the first is inserted (the later ones then find
        // it, as in SQLite, which applies batches in order): otherwise the
        // sort below would pick the one with the smaller storage key.
        let mut first_of: HashSet<(u8, &[u8])> = HashSet::new();
        let mut new: Vec<&TokenRecord> = batches
            .iter()
            .flat_map(|b| b.tokens.iter())
            .filter(|t| !t.ciphertext.is_empty())
            .filter(|t| !t.deterministic || first_of.insert((t.kind.code(), &t.fingerprint[..])))
            .collect();
        // In key order, so two nodes inserting the same values never wait
        // on each other's in opposite orders (a deadlock).
        new.sort_by(|a, b| {
            (a.kind.code(), a.fingerprint, a.id).cmp(&(b.kind.code(), b.fingerprint, b.id))
        });
        let mut inserted: HashSet<TokenId> = HashSet::new();
        if !new.is_empty() {
            // The key versions stay usable until this commits: retiring one
            // (another node's `keys retire`) waits for this transaction.
            let mut versions: Vec<i32> = new.iter().map(|t| t.key_version as i32).collect();
            versions.sort_unstable();
            versions.dedup();
            let retired = tx
                .query(
                    "SELECT version, state, wrapped IS NULL FROM key_versions
                     WHERE version = ANY($1) ORDER BY version FOR SHARE",
                    &[&versions],
                )
                .await?
                .iter()
                .any(|r| r.get::<_, String>(1) == "retired" || r.get::<_, bool>(2));
            if retired {
                return Err(GroupError::Refused(StoreError::Unavailable(
                    "the data key version was retired meanwhile; retry".into(),
                )));
            }
            let ids: Vec<&[u8]> = new.iter().map(|t| &t.id[..]).collect();
            let kinds: Vec<i16> = new.iter().map(|t| i16::from(t.kind.code())).collect();
            let versions: Vec<i32> = new.iter().map(|t| t.key_version as i32).collect();
            let cts: Vec<&[u8]> = new.iter().map(|t| &t.ciphertext[..]).collect();
            let fps: Vec<&[u8]> = new.iter().map(|t| &t.fingerprint[..]).collect();
            let dets: Vec<bool> = new.iter().map(|t| t.deterministic).collect();
            let created: Vec<i64> = new.iter().map(|t| t.created_ms).collect();
            for r in tx
                .query(
                    "INSERT INTO tokens (id, kind, key_version, ciphertext, fingerprint, deterministic, created_ms)
                     SELECT * FROM UNNEST($1::bytea[], $2::int2[], $3::int4[], $4::bytea[], $5::bytea[], $6::bool[], $7::int8[])
                     ON CONFLICT DO NOTHING RETURNING id",
                    &[&ids, &kinds, &versions, &cts, &fps, &dets, &created],
                )
                .await?
            {
                inserted.insert(token_id(r.get(0)).map_err(GroupError::Down)?);
            }
        }
        // Deterministic tokens stored first by someone else, and rows the
        // callers found already stored.
        let mut lookups: Vec<(i16, &[u8])> = Vec::new();
        let mut refs: Vec<&[u8]> = Vec::new();
        for t in batches.iter().flat_map(|b| b.tokens.iter()) {
            if t.ciphertext.is_empty() {
                refs.push(&t.id[..]);
            } else if !inserted.contains(&t.id) {
                if !t.deterministic {
                    return Err(refused("token id collision".into()));
                }
                lookups.push((i16::from(t.kind.code()), &t.fingerprint[..]));
            }
        }
        let mut existing: HashMap<(i16, Vec<u8>), TokenId> = HashMap::new();
        if !lookups.is_empty() {
            let (kinds, fps): (Vec<i16>, Vec<&[u8]>) = lookups.iter().copied().unzip();
            for r in tx.query(DETERMINISTIC_LOOKUP, &[&kinds, &fps]).await? {
                existing.insert(
                    (r.get(0), r.get(1)),
                    token_id(r.get(2)).map_err(GroupError::Down)?,
                );
            }
        }
        let mut referenced: HashSet<TokenId> = HashSet::new();
        if !refs.is_empty() {
            for r in tx
                .query("SELECT id FROM tokens WHERE id = ANY($1)", &[&refs])
                .await?
            {
                referenced.insert(token_id(r.get(0)).map_err(GroupError::Down)?);
            }
        }
        for (b, out) in batches.iter().zip(out.iter_mut()) {
            for t in &b.tokens {
                let id = if t.ciphertext.is_empty() {
                    referenced
                        .contains(&t.id)
                        .then_some(t.id)
                        .ok_or_else(|| refused("a referenced token is not stored".into()))?
                } else if inserted.contains(&t.id) {
                    t.id
                } else {
                    *existing
                        .get(&(i16::from(t.kind.code()), t.fingerprint.to_vec()))
                        .ok_or_else(|| refused("a deterministic token vanished".into()))?
                };
                out.token_ids.push(id);
            }
        }

        // Orders and their fields.
        let mut order_ids: Vec<&[u8]> = Vec::new();
        let mut order_by: Vec<&str> = Vec::new();
        let mut order_ms: Vec<i64> = Vec::new();
        let mut field_orders: Vec<&[u8]> = Vec::new();
        let mut field_tokens: Vec<&[u8]> = Vec::new();
        for (b, out) in batches.iter().zip(out.iter()) {
            for o in &b.orders {
                order_ids.push(&o.id[..]);
                order_by.push(&o.created_by);
                order_ms.push(o.created_ms);
                for &i in &o.fields {
                    let token = out
                        .token_ids
                        .get(i)
                        .ok_or_else(|| refused("an order field is not in its batch".into()))?;
                    field_orders.push(&o.id[..]);
                    field_tokens.push(&token[..]);
                }
            }
        }
        if !order_ids.is_empty() {
            tx.execute(
                "INSERT INTO orders (id, created_by, created_ms)
                 SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::int8[])",
                &[&order_ids, &order_by, &order_ms],
            )
            .await?;
        }
        if !field_orders.is_empty() {
            tx.execute(
                "INSERT INTO order_fields (order_id, token_id)
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[]) ON CONFLICT DO NOTHING",
                &[&field_orders, &field_tokens],
            )
            .await?;
        }

        // Reveal days, counted per (principal, day) for the caps.
        let mut days: Vec<&(String, i64, TokenId)> =
            batches.iter().flat_map(|b| b.reveal_days.iter()).collect();
        days.sort(); // key order: see the tokens above
        let day_p: Vec<&str> = days.iter().map(|(p, _, _)| p.as_str()).collect();
        let day_d: Vec<i64> = days.iter().map(|(_, d, _)| *d).collect();
        let day_o: Vec<&[u8]> = days.iter().map(|(_, _, o)| &o[..]).collect();
        let mut added: HashMap<(String, i64), i64> = HashMap::new();
        if !day_p.is_empty() {
            for r in tx
                .query(
                    "INSERT INTO reveal_days (principal, day, order_id)
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::bytea[])
                     ON CONFLICT DO NOTHING RETURNING principal, day",
                    &[&day_p, &day_d, &day_o],
                )
                .await?
            {
                *added.entry((r.get(0), r.get(1))).or_default() += 1;
            }
        }
        // Counter rows in a fixed order, so two nodes never wait on each
        // other's rows in opposite orders.
        let mut counts: Vec<((String, i64), i64)> = added.into_iter().collect();
        counts.sort();
        let mut totals: HashMap<(String, i64), (i64, i64)> = HashMap::new();
        for ((p, d), n) in counts {
            let total: i64 = tx
                .query_one(
                    "INSERT INTO reveal_day_counts (principal, day, n) VALUES ($1, $2, $3)
                     ON CONFLICT (principal, day) DO UPDATE SET n = reveal_day_counts.n + excluded.n
                     RETURNING n",
                    &[&p, &d, &n],
                )
                .await?
                .get(0);
            totals.insert((p, d), (total, n));
        }
        for b in batches {
            for (p, d, cap) in &b.daily_caps {
                let key = (p.clone(), *d);
                if !totals.contains_key(&key) {
                    // Nothing added: what is stored must still be within it.
                    let stored = tx
                        .query_opt(
                            "SELECT n FROM reveal_day_counts WHERE principal = $1 AND day = $2",
                            &[p, d],
                        )
                        .await?
                        .map_or(0, |r| r.get::<_, i64>(0));
                    totals.insert(key.clone(), (stored, 0));
                }
                if let Some(&(total, added)) = totals.get(&key)
                    && total as u64 > *cap
                {
                    return Err(GroupError::Refused(StoreError::DailyCapReached {
                        principal: p.clone(),
                        cap: *cap,
                        revealed: (total - added) as u64,
                    }));
                }
            }
        }

        // Audit events of the whole group: one insert.
        let mut e_chain: Vec<&str> = Vec::new();
        let mut e_seq: Vec<i64> = Vec::new();
        let mut e_ts: Vec<i64> = Vec::new();
        let mut e_principal: Vec<&str> = Vec::new();
        let mut e_action: Vec<&str> = Vec::new();
        let mut e_decision: Vec<&str> = Vec::new();
        let mut e_token: Vec<Option<&str>> = Vec::new();
        let mut e_leaf: Vec<Vec<u8>> = Vec::new();
        let mut e_hash: Vec<Vec<u8>> = Vec::new();
        let mut e_order: Vec<Option<&str>> = Vec::new();
        let mut e_key: Vec<Option<Vec<u8>>> = Vec::new();
        for (b, out) in batches.iter().zip(out.iter_mut()) {
            let chain = b.audit_chain.as_str();
            for (i, event) in b.audit.iter().enumerate() {
                let mut head = *self
                    .heads
                    .get(chain)
                    .ok_or_else(|| refused("audit events need the batch's audit chain".into()))?;
                let seq = head.next_seq;
                let leaf = audit::encode_leaf(chain, seq, event);
                head.hash = audit::chain_hash(&head.hash, &leaf);
                head.next_seq += 1;
                self.heads.insert(chain.to_owned(), head);
                e_chain.push(chain);
                e_seq.push(seq as i64);
                e_ts.push(event.ts_ms);
                e_principal.push(&event.principal);
                e_action.push(event.action.as_str());
                e_decision.push(event.decision.as_str());
                e_token.push(event.token.as_deref());
                e_leaf.push(leaf);
                e_hash.push(head.hash.to_vec());
                e_order.push(event.order_token.as_deref());
                e_key.push(b.audit_token_key(i).map(|k| k.to_vec()));
                out.audit_seqs.push(seq);
            }
        }
        if !e_chain.is_empty() {
            tx.execute(
                "INSERT INTO audit_events (chain, seq, ts_ms, principal, action, decision, token, leaf, chain_hash, order_token, token_key)
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bytea[], $9::bytea[], $10::text[], $11::bytea[])",
                &[
                    &e_chain,
                    &e_seq,
                    &e_ts,
                    &e_principal,
                    &e_action,
                    &e_decision,
                    &e_token,
                    &e_leaf,
                    &e_hash,
                    &e_order,
                    &e_key,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }
}
