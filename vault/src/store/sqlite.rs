//! The embedded SQLite store: WAL, one writer thread doing group commit,
//! a sync thread that makes every commit durable before it is answered, and
//! a small pool of read connections.
//!
//! Why a single writer thread: SQLite allows one writer at a time anyway, and
//! a durable commit costs one fsync whatever its size. Gathering every batch
//! that is waiting when the writer becomes free into one transaction turns
//! N fsyncs into one, without a timer: under light load a batch is committed
//! alone and at once. If one batch of a group fails (a duplicate principal
//! name, a constraint), the group is rolled back and each batch is retried
//! alone, so it does not fail the others. The fsync itself runs on the sync
//! thread ([`Syncer`]) while the writer applies the next group; nothing is
//! acknowledged before the disk has it, as with `synchronous=FULL`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    AlertRecord, AuditFilter, Committed, GrantFilter, GrantRecord, PrincipalRecord, RevealReads,
    Store, StoreError, StoredCheckpoint, StoredKey, TokenId, TokenLookup, TokenRecord, WriteBatch,
    grant_filter,
};
use crate::audit::{self, StoredEvent};
use crate::kinds::FieldKind;
use crate::token::TOKEN_ID_BYTES;

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE key_versions (
    version    INTEGER PRIMARY KEY,
    algorithm  INTEGER NOT NULL,
    wrapped    BLOB,
    state      TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    reserved   INTEGER NOT NULL
);
CREATE TABLE principals (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    key_hash   BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE tokens (
    id            BLOB PRIMARY KEY,
    kind          INTEGER NOT NULL,
    key_version   INTEGER NOT NULL,
    ciphertext    BLOB NOT NULL,
    fingerprint   BLOB NOT NULL,
    deterministic INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL
) WITHOUT ROWID;
-- Leak tracing finds every token holding a value through its fingerprint.
CREATE INDEX tokens_by_fingerprint ON tokens (kind, fingerprint);
-- At most one deterministic token per normalised value.
CREATE UNIQUE INDEX tokens_deterministic ON tokens (kind, fingerprint) WHERE deterministic = 1;
-- Rewrap and retire count ciphertexts per key version.
CREATE INDEX tokens_by_key_version ON tokens (key_version);
CREATE TABLE orders (
    id         BLOB PRIMARY KEY,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE order_fields (
    order_id BLOB NOT NULL,
    token_id BLOB NOT NULL,
    PRIMARY KEY (order_id, token_id)
) WITHOUT ROWID;
CREATE INDEX order_fields_by_token ON order_fields (token_id);
CREATE TABLE audit_events (
    chain      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    ts_ms      INTEGER NOT NULL,
    principal  TEXT NOT NULL,
    action     TEXT NOT NULL,
    decision   TEXT NOT NULL,
    token      TEXT,
    leaf       BLOB NOT NULL,
    chain_hash BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX audit_by_principal ON audit_events (principal, ts_ms);
CREATE INDEX audit_by_token ON audit_events (token) WHERE token IS NOT NULL;
",
    r"
CREATE TABLE grants (
    id         BLOB PRIMARY KEY,
    principal  TEXT NOT NULL,
    order_id   BLOB NOT NULL,
    purpose    TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    granted_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX grants_by_principal ON grants (principal, order_id);
CREATE INDEX grants_by_order ON grants (order_id);
-- Distinct orders each principal revealed per UTC day: daily caps survive restarts.
CREATE TABLE reveal_days (
    principal TEXT NOT NULL,
    day       INTEGER NOT NULL,
    order_id  BLOB NOT NULL,
    PRIMARY KEY (principal, day, order_id)
) WITHOUT ROWID;
CREATE TABLE alerts (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    principal TEXT NOT NULL,
    peer      TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX alerts_by_time ON alerts (at_ms);
",
    r"
CREATE TABLE checkpoints (
    chain TEXT NOT NULL,
    size  INTEGER NOT NULL,
    root  BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    note  TEXT NOT NULL,
    PRIMARY KEY (chain, size)
);
",
    // A principal's distinct records over a period, counted in SQL for leak
    // tracing instead of decoding every leaf.
    r"
ALTER TABLE audit_events ADD COLUMN order_token TEXT;
",
    // One index entry per token by fingerprint instead of two: deterministic
    // tokens are found through their unique index, the others through this
    // one. Every index entry is a write to a random page.
    r"
DROP INDEX tokens_by_fingerprint;
CREATE INDEX tokens_by_fingerprint ON tokens (kind, fingerprint) WHERE deterministic = 0;
",
    // No schema change: new vaults store tokens under time-ordered keys
    // (meta `token_ids`), which a build from before would misread as token
    // bodies. The version bump makes such a build refuse the database.
    "-- token_ids layout",
    // Events are found by their token's storage key where the vault has
    // one (`WriteBatch::audit_token_keys`): time-ordered keys put the
    // events of tokens created together on the same index pages. The text
    // index keeps only events without a key.
    r"
ALTER TABLE audit_events ADD COLUMN token_key BLOB;
DROP INDEX audit_by_token;
CREATE INDEX audit_by_token ON audit_events (token) WHERE token IS NOT NULL AND token_key IS NULL;
CREATE INDEX audit_by_token_key ON audit_events (token_key) WHERE token_key IS NOT NULL;
",
    // Events by their token's storage key, built in sorted batches rather
    // than one index entry per event: a token revealed again has its entry
    // written next to its earlier ones, so an index kept in step with every
    // commit dirtied one page (one 4 KiB WAL frame) per revealed field. The
    // writer adds the events past `upto` of each chain in one sorted pass
    // ([`Writer::index_tail`]); readers look past `upto` by scanning.
    r"
CREATE TABLE audit_token_index (
    token_key BLOB NOT NULL,
    chain     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (token_key, chain, seq)
) WITHOUT ROWID;
CREATE TABLE audit_token_upto (
    chain TEXT PRIMARY KEY,
    upto  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO audit_token_index (token_key, chain, seq)
    SELECT token_key, chain, seq FROM audit_events NOT INDEXED
    WHERE token_key IS NOT NULL AND typeof(seq) = 'integer'
    ORDER BY token_key, chain, seq;
INSERT INTO audit_token_upto (chain, upto)
    SELECT chain, max(seq) FROM audit_events WHERE typeof(seq) = 'integer' GROUP BY chain;
DROP INDEX audit_by_token_key;
",
    // Verify holds every event's `order_token` column to its signed leaf,
    // so an emptied column is named like an edited one. Events stored
    // before the column existed had none: it is copied from their leaves
    // (JSON, the event's fields beside `v`, `chain` and `seq`:
    // `{"v":1,...,"order_token":"..."}`). Only rows whose leaf names an
    // order token are parsed. A column emptied by hand before this ran is
    // refilled the same way: it was accepted until now, and is restored to
    // what the signed leaf says.
    r#"
UPDATE audit_events
   SET order_token = json_extract(CAST(leaf AS TEXT), '$.order_token')
 WHERE order_token IS NULL
   AND instr(CAST(leaf AS TEXT), '"order_token"') > 0
   AND json_valid(CAST(leaf AS TEXT))
   AND json_type(CAST(leaf AS TEXT), '$.order_token') = 'text';
"#,
];

/// Audit events (of all chains) past their chains' `audit_token_upto` marks
/// at which the writer indexes them by token key ([`Writer::index_tail`]).
/// Readers scan about this many events for a token's latest ones, plus
/// what comes while a batch goes in (more while indexing fails: it is
/// retried every [`TOKEN_INDEX_RETRY`]).
const TOKEN_INDEX_BATCH: u64 = 50_000;
/// Most events of a chain one batch takes past its mark.
const TOKEN_INDEX_PASS: i64 = 4 * TOKEN_INDEX_BATCH as i64;
/// Index entries the writer inserts in one transaction, between two groups.
const TOKEN_INDEX_CHUNK: usize = 2048;
/// How often an idle writer looks whether a batch's read has finished.
const TAIL_READ_POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// The writer indexes the tail once no job has come for this long.
const TOKEN_INDEX_IDLE: std::time::Duration = std::time::Duration::from_millis(250);
/// Pause before indexing again after a failed attempt.
const TOKEN_INDEX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Most batches gathered into one transaction.
const MAX_GROUP: usize = 1024;
/// Read connections, at most: more reads wait for one. Every connection
/// has its own page cache, so without a bound a burst of concurrent reads
/// (64 clients revealing at once) opened as many connections and caches.
const MAX_READERS: usize = 8;
/// Reveals of at most this many tokens read on the calling thread
/// ([`SqliteStore::read_inline_before_commit`]); larger ones, whose probes
/// can take milliseconds, on the blocking pool.
const INLINE_READ_TOKENS: usize = 100;

struct Job {
    /// Boxed: the channel allocates its slots 31 at a time, and with the
    /// batch inline (about 550 bytes) each block was a zeroed 17 KiB
    /// allocation, 1.3 % of the vault's CPU under unary calls.
    batch: Box<WriteBatch>,
    /// The batch's audit events, encoded by the caller: the writer only
    /// puts each one's chain and sequence number in front.
    events: Vec<audit::EncodedEvent>,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

impl Job {
    /// A job for `batch`, its audit events encoded here, on the caller's
    /// thread, one for one.
    fn new(batch: WriteBatch, reply: oneshot::Sender<Result<Committed, StoreError>>) -> Job {
        Job {
            events: batch.audit.iter().map(audit::encode_event).collect(),
            batch: Box::new(batch),
            reply,
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// One permit per read connection.
    read_permits: Arc<tokio::sync::Semaphore>,
    /// What is committed and what of it is on disk.
    durability: Arc<Durability>,
    checkpointer: Mutex<
        Option<(
            Arc<std::sync::atomic::AtomicBool>,
            std::thread::JoinHandle<()>,
        )>,
    >,
}

/// WAL frames past which the checkpointer copies the WAL into the database.
const CHECKPOINT_FRAMES: i64 = 1000;
/// WAL size past which the writer, between two groups, runs one RESTART
/// checkpoint; see [`Writer::bound_wal`]. Also the size the WAL file is cut
/// back to when it starts again (`journal_size_limit`).
///
/// Each forced restart holds every group while it copies what the
/// checkpoint thread has not and syncs the database (4-39 ms measured under
/// unary tokenize), so the bound sets how often writes stall: at 64 MiB
/// two to three times a second under unary tokenize, more under batches.
/// At 256 MiB, 100-field tokenize gained about a quarter, unary calls about
/// a tenth, and unary tokenize's p999 at c64 fell from about 30 to 18 ms
/// (docs/benchmarks.md); the cost is the disk the WAL keeps and, after a
/// crash, reading up to that much WAL at the next open.
const WAL_LIMIT_BYTES: u64 = 256 << 20;
/// Longest wait of a RESTART checkpoint for readers of older snapshots.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// A RESTART checkpoint refused sooner than this was refused without
/// waiting (SQLite's busy handler first sleeps 1 ms): see
/// [`Writer::bound_wal`].
const BUSY_AT_ONCE: std::time::Duration = std::time::Duration::from_micros(900);
/// RESTART checkpoints refused at once, in a row, tried again after the
/// next group; past it, after a pause.
const REFUSED_AT_ONCE_MAX: u32 = 256;
/// Pause before trying again after a RESTART checkpoint failed, doubled
/// after each further failure up to [`RESTART_RETRY_MAX`].
const RESTART_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest pause between RESTART attempts.
const RESTART_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// At most one warning per this interval about a WAL past its bound.
const WAL_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The WAL file of the database at `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Copies the WAL back into the database file whenever it has grown, with
/// PASSIVE checkpoints that never block the writer or readers; the WAL is
/// then reused from its start by the writer's next transaction (under
/// writes that never pause, once the writer has forced it:
/// [`Writer::bound_wal`]).
fn checkpoint_loop(
    conn: &Connection,
    wal: &Path,
    wal_limit: u64,
    stop: &std::sync::atomic::AtomicBool,
    durability: &Durability,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Acquire) {
        // After a failed sync the WAL's frames may not match the disk:
        // copying them into the database could spread the damage.
        if durability.broken.get().is_some() {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        // Past the bound the writer restarts it: holding the checkpoint
        // lock now would only make it wait.
        if FileFacts::of_path(wal).map(|f| f.len).unwrap_or(0) > wal_limit {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        durability.checkpointing.store(true, Ordering::Release);
        let (frames, copied) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .unwrap_or((0, 0));
        durability.checkpointing.store(false, Ordering::Release);
        if frames < CHECKPOINT_FRAMES || copied >= frames {
            // Small, or all copied and waiting for the writer to start the
            // WAL again: look again soon. Behind: go straight on.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::ToSqlConversionFailure(inner) = &e
        && let Some(StoreError::DailyCapReached {
            principal,
            cap,
            revealed,
        }) = inner.downcast_ref::<StoreError>()
    {
        return StoreError::DailyCapReached {
            principal: principal.clone(),
            cap: *cap,
            revealed: *revealed,
        };
    }
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            StoreError::Conflict(format!("conflicts with existing data: {e}"))
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    plan_once(conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsynced at every commit, so an acknowledged write
    // survives power loss, not just a process crash. (The store's writer
    // connection commits with NORMAL and syncs on its own thread before
    // answering: see [`Syncer`]. Its read and checkpoint connections, and
    // connections outside the store, keep FULL.)
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(64);
    // 32 MiB of page cache for the writer (negative = KiB): index pages of
    // a large vault stay in memory instead of being re-read from the OS.
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Turns on SQLite's query planner stability guarantee, so that a cached
/// statement keeps its plan whatever values are bound to it.
///
/// Without it, SQLite (since 3.47) marks a statement with a term such as
/// `order_id = ?1` that one of the plans it weighed did not use, so as to
/// plan again if a 0 or 1 is bound there later; and `sqlite3_clear_bindings`,
/// which rusqlite calls on every statement it puts back in its cache,
/// expires any statement so marked. The grant check of every reveal under a
/// grant, and the checkpoint signer's read of new events, were then parsed
/// and planned again on every call (15 % of the vault's CPU under reveals
/// that need a grant). The vault's statements bind keys, names and
/// sequence numbers, never the small flags such plans turn on, and the
/// vault never runs `ANALYZE`, so there are no statistics a bound value
/// could be weighed against.
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn)?;
    // SQLite checkpoints the WAL into the database when the last
    // connection to it closes. After a failed sync the WAL's frames may not
    // be what is on disk, so no store connection does: the writer
    // checkpoints on a clean close instead ([`Writer::run`]). (The next
    // open, after a restart, recovers the WAL as SQLite does after a
    // crash: frames are replayed only up to the first bad checksum.)
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > 0 && (version as usize) < MIGRATIONS.len() {
        // Some rewrite every audit event (the token index): on a large log
        // the vault is quiet for minutes here.
        tracing::info!(
            from = version,
            to = MIGRATIONS.len(),
            "upgrading the database schema; on a large audit log this can take minutes"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies
    /// migrations and starts the writer.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with_sync(path, Box::new(|wal| wal.sync_data()))
    }

    /// [`SqliteStore::open`], with `sync` making the WAL durable (tests
    /// put a failing or a gated one in its place).
    fn open_with_sync(path: &Path, sync: SyncWal) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, sync, TokenIndexing::default(), WAL_LIMIT_BYTES)
    }

    /// [`SqliteStore::open`] with the WAL bounded at `wal_limit` bytes
    /// instead of [`WAL_LIMIT_BYTES`]: for tests of the bound that should
    /// not write gigabytes to reach it.
    #[doc(hidden)]
    pub fn open_bounding_wal_at(path: &Path, wal_limit: u64) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(
            path,
            Box::new(|wal| wal.sync_data()),
            TokenIndexing::default(),
            wal_limit,
        )
    }

    /// [`SqliteStore::open`], indexing audit events by token key once
    /// `batch` of them are waiting instead of [`TOKEN_INDEX_BATCH`] (with 1,
    /// after every commit), never because the writer is idle, and again at
    /// once after a failure: for tests of both ways a token's events are
    /// found.
    #[doc(hidden)]
    pub fn open_indexing_every(path: &Path, batch: u64) -> Result<SqliteStore, StoreError> {
        let indexing = TokenIndexing {
            batch: batch.max(1),
            idle: None,
            retry: std::time::Duration::ZERO,
            wait_for_reads: true,
            ..TokenIndexing::default()
        };
        SqliteStore::open_with(
            path,
            Box::new(|wal| wal.sync_data()),
            indexing,
            WAL_LIMIT_BYTES,
        )
    }

    fn open_with(
        path: &Path,
        sync: SyncWal,
        indexing: TokenIndexing,
        wal_limit: u64,
    ) -> Result<SqliteStore, StoreError> {
        #[cfg(unix)]
        if !path.exists() {
            // Create the file owner-only before SQLite does; its -wal and
            // -shm files inherit these permissions.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))
                })?;
        }
        let mut conn = open_conn(path).map_err(unavailable)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(unavailable)?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "database schema version {version} is newer than this build supports ({}); upgrade ordervault",
                MIGRATIONS.len()
            )));
        }
        migrate(&mut conn).map_err(unavailable)?;
        // Checkpoints run on their own thread (below), not inside the
        // writer's commits: the writer is the vault's serial bottleneck.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(unavailable)?;
        // The writer's commits write their WAL frames without waiting for
        // the disk; the syncer thread makes them durable before any job is
        // answered (see [`Syncer`]).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(unavailable)?;
        // A WAL started again is cut back to its bound, not to zero: see
        // [`Writer::bound_wal`].
        conn.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(wal_limit).unwrap_or(i64::MAX),
        )
        .map_err(unavailable)?;
        let wal = wal_path(path);
        let durability = Arc::new(Durability {
            begun: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            synced: tokio::sync::watch::Sender::new(0),
            broken: OnceLock::new(),
            checkpointing: std::sync::atomic::AtomicBool::new(false),
        });
        // A rendezvous: the writer hands a group over when the syncer is
        // free, so while the disk syncs one group the writer applies the
        // next, and the jobs arriving meanwhile gather into the one after.
        let (acks, acks_rx) = mpsc::sync_channel(0);
        let syncer = Syncer {
            wal: wal.clone(),
            file: None,
            sync,
            durability: durability.clone(),
        };
        let syncer = std::thread::Builder::new()
            .name("ordervault-sync".into())
            .spawn(move || syncer.run(acks_rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start sync thread: {e}")))?;
        let (tx, rx) = mpsc::channel();
        let unindexed = unindexed_events(&conn).map_err(unavailable)?;
        let mut writer = Writer::new(conn, path, acks, syncer, durability.clone(), wal_limit);
        writer.index = TokenIndexing {
            waiting: unindexed,
            ..indexing
        };
        let handle = std::thread::Builder::new()
            .name("ordervault-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpointer = {
            let stop = stop.clone();
            let durability = durability.clone();
            let conn = open_conn(path).map_err(unavailable)?;
            conn.pragma_update(None, "cache_size", -1_024)
                .map_err(unavailable)?;
            std::thread::Builder::new()
                .name("ordervault-checkpoint".into())
                .spawn(move || checkpoint_loop(&conn, &wal, wal_limit, &stop, &durability))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start checkpoint thread: {e}"))
                })?
        };
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_permits: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            durability,
            checkpointer: Mutex::new(Some((stop, checkpointer))),
        })
    }

    /// Stops the checkpoint thread, stops accepting writes, lets the writer
    /// commit what it holds and waits for it; the writer then copies the WAL
    /// into the database unless a sync has failed.
    pub fn close(&self) {
        // The checkpoint thread stops first: the writer's last checkpoint
        // cannot run while another holds the checkpoint lock.
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
        if let Some((stop, h)) = checkpointer {
            stop.store(true, std::sync::atomic::Ordering::Release);
            let _ = h.join();
        }
        drop(self.writer.lock().map(|mut w| w.take()));
        let handle = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Waits until the first `target` transactions are on disk.
    async fn synced_to(&self, target: u64) -> Result<(), StoreError> {
        let d = &self.durability;
        let mut synced = d.synced.subscribe();
        loop {
            // Seen first, then `broken`: a failure signalled after this
            // look wakes `changed` below; one signalled before it is set.
            let done = *synced.borrow_and_update() >= target;
            if let Some(why) = d.broken.get() {
                return Err(not_durable(why));
            }
            if done {
                return Ok(());
            }
            if synced.changed().await.is_err() {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
        }
    }

    /// Runs `f` on a pooled read connection on the blocking pool and
    /// answers once what it may have seen is on disk. Readers see a group as
    /// soon as the writer has committed it, before the sync thread has made
    /// it durable ([`Syncer`]); a read whose answer leaves the vault as it
    /// is (an audit query, a signed checkpoint, a listing) must not show
    /// what a power loss could still take back. Every transaction `f` can
    /// have seen began its COMMIT before `f` returned, so it is counted in
    /// `begun` as loaded after `f`; the wait is for those.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let durability = self.durability.clone();
        let (result, target) = self
            .read_before_commit(move |c| {
                let result = f(c);
                let target = durability.begun.load(std::sync::atomic::Ordering::SeqCst);
                result.map(|r| (r, target))
            })
            .await?;
        self.synced_to(target).await?;
        Ok(result)
    }

    /// Runs `f` on a pooled read connection without waiting for the disk:
    /// only for the reads of tokenize and reveal, whose answers wait for a
    /// commit (the request's audit event) that is synced after everything
    /// they read.
    async fn read_before_commit<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let path = self.path.clone();
        let permit = self
            .read_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            on_pooled(&pool, &path, f)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }

    /// [`SqliteStore::read_before_commit`] for the few index probes of a
    /// reveal of up to [`INLINE_READ_TOKENS`] tokens: run on the calling
    /// thread when a read connection is free at once.
    ///
    /// A trip to the blocking pool wakes one of its threads and puts it back
    /// to sleep, two context switches that cost more than the probes: under
    /// unary reveals the pool's parking and waking took about a tenth of the
    /// vault's CPU. The probes of a small reveal take microseconds when
    /// their pages are in the OS page cache, and a read from the disk would
    /// hold the async worker no longer than the hand-off it replaces costs
    /// on a busy machine. A reader of a WAL database waits for neither the
    /// writer nor a checkpoint; what can still hold the worker is rare: the
    /// first use of a read connection opens it here, and SQLite retries
    /// (with short sleeps) a read that starts while another process
    /// recovers the WAL. When every read connection is taken, the read
    /// waits for one on the blocking pool as before.
    async fn read_inline_before_commit<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        match self.read_permits.try_acquire() {
            Ok(permit) => {
                let result = on_pooled(&self.readers, &self.path, f);
                drop(permit);
                result
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => self.read_before_commit(f).await,
            Err(tokio::sync::TryAcquireError::Closed) => {
                Err(StoreError::Unavailable("the store is closed".into()))
            }
        }
    }
}

/// Runs `f` on a read connection from `pool`, opening one if the pool has
/// none, and puts the connection back. The caller holds a read permit.
fn on_pooled<T>(
    pool: &Mutex<Vec<Connection>>,
    path: &Path,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let pooled = pool.lock().ok().and_then(|mut p| p.pop());
    let conn = match pooled {
        Some(c) => c,
        None => {
            let c = open_conn(path).map_err(unavailable)?;
            c.pragma_update(None, "query_only", true)
                .map_err(unavailable)?;
            // Readers share the OS page cache; a small private cache each
            // keeps the vault's memory bounded.
            c.pragma_update(None, "cache_size", -8_192)
                .map_err(unavailable)?;
            c
        }
    };
    let result = f(&conn).map_err(unavailable);
    // A connection still in a transaction (its ROLLBACK failed too) would
    // hold a snapshot, and every checkpoint behind it: closed, not pooled.
    if conn.is_autocommit()
        && let Ok(mut p) = pool.lock()
    {
        p.push(conn);
    }
    result
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Runs a statement without parameters or rows (`BEGIN`, `COMMIT`,
/// `ROLLBACK`) from the connection's statement cache: `execute_batch`
/// parses it again at every call (about half a microsecond of every unary
/// reveal's read in a profile, for its two statements, and as much of
/// every group the writer commits).
fn run_cached(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Ends the read transaction a `BEGIN` opened: COMMIT after `read`
/// succeeded, ROLLBACK otherwise (and after a failed COMMIT), so that a
/// pooled connection never goes back to the pool holding a snapshot, which
/// would keep every later checkpoint from copying past it.
fn end_read<T>(c: &Connection, read: rusqlite::Result<T>) -> rusqlite::Result<T> {
    let read = read.and_then(|r| run_cached(c, "COMMIT").map(|()| r));
    if read.is_err() && !c.is_autocommit() {
        let _ = run_cached(c, "ROLLBACK");
    }
    read
}

/// A reveal's probes, inside the read transaction
/// [`SqliteStore::reveal_reads`] opens: each token's row and its orders,
/// then the grants that could cover them.
fn reveal_probes(
    c: &Connection,
    ids: &[TokenId],
    grants_of: Option<String>,
) -> rusqlite::Result<RevealReads> {
    let mut tokens = c.prepare_cached(TOKEN_BY_ID)?;
    let mut orders = c.prepare_cached(ORDERS_OF_TOKEN)?;
    let mut rows = Vec::with_capacity(ids.len());
    let mut of = Vec::with_capacity(ids.len());
    for id in ids {
        let row = tokens
            .query_row([&id[..]], |r| token_row(*id, r))
            .optional()?;
        of.push(match row {
            Some(_) => orders
                .query_map([&id[..]], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<TokenId>>>()?,
            None => Vec::new(),
        });
        rows.push(row);
    }
    drop((tokens, orders));
    let grants = match grant_filter(grants_of, &of) {
        Some(filter) => grants_matching(c, filter)?,
        None => Vec::new(),
    };
    Ok(RevealReads {
        rows,
        orders: of,
        grants,
    })
}

/// A token row by id, as [`token_row`] reads it.
const TOKEN_BY_ID: &str = "SELECT kind, key_version, ciphertext, fingerprint, deterministic, created_ms FROM tokens WHERE id = ?1";
/// The orders a token belongs to.
const ORDERS_OF_TOKEN: &str = "SELECT order_id FROM order_fields WHERE token_id = ?1";

fn token_row(id: TokenId, row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let code: u8 = row.get(0)?;
    let kind = FieldKind::from_code(code).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            "unknown field kind code".into(),
        )
    })?;
    Ok(TokenRecord {
        id,
        kind,
        key_version: row.get(1)?,
        ciphertext: row.get(2)?,
        fingerprint: row.get(3)?,
        deterministic: row.get(4)?,
        created_ms: row.get(5)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn close(&self) {
        SqliteStore::close(self);
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn key_versions(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT version, algorithm, wrapped, state, created_ms, reserved FROM key_versions ORDER BY version",
            )?;
            st.query_map([], |r| {
                Ok(StoredKey {
                    version: r.get(0)?,
                    algorithm: r.get(1)?,
                    wrapped: r.get(2)?,
                    state: r.get(3)?,
                    created_ms: r.get(4)?,
                    reserved: r.get::<_, i64>(5)? as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn principals(&self) -> Result<Vec<PrincipalRecord>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT name, role, key_hash, created_ms, revoked_ms FROM principals ORDER BY name",
            )?;
            st.query_map([], |r| {
                Ok(PrincipalRecord {
                    name: r.get(0)?,
                    role: r.get(1)?,
                    key_hash: r.get(2)?,
                    created_ms: r.get(3)?,
                    revoked_ms: r.get(4)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Option<TokenRecord>>, StoreError> {
        self.read_before_commit(move |c| {
            let mut st = c.prepare_cached(TOKEN_BY_ID)?;
            ids.iter()
                .map(|id| st.query_row([&id[..]], |r| token_row(*id, r)).optional())
                .collect()
        })
        .await
    }

    async fn deterministic_tokens(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Option<TokenId>>, StoreError> {
        self.read_before_commit(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id FROM tokens WHERE kind = ?1 AND fingerprint = ?2 AND deterministic = 1",
            )?;
            keys.iter()
                .map(|(kind, fp)| {
                    st.query_row(params![kind.code(), &fp[..]], |r| r.get(0))
                        .optional()
                })
                .collect()
        })
        .await
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
            .send(Job::new(batch, reply))
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
        let chain = chain.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "{EVENT_SELECT} WHERE chain = ?1 AND seq >= ?2 AND {SEQ_IS_INTEGER} ORDER BY seq LIMIT ?3"
            ))?;
            st.query_map(params![chain, from_seq as i64, limit as i64], event_row)?
                .collect()
        })
        .await
    }

    async fn token_count(&self) -> Result<u64, StoreError> {
        self.read(|c| c.query_row("SELECT count(*) FROM tokens", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }

    async fn orders_of_tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Vec<TokenId>>, StoreError> {
        self.read_before_commit(move |c| {
            let mut st = c.prepare_cached(ORDERS_OF_TOKEN)?;
            ids.iter()
                .map(|id| st.query_map([&id[..]], |r| r.get(0))?.collect())
                .collect()
        })
        .await
    }

    async fn reveal_reads(
        &self,
        ids: Vec<TokenId>,
        grants_of: Option<String>,
    ) -> Result<RevealReads, StoreError> {
        let inline = ids.len() <= INLINE_READ_TOKENS;
        // One read transaction for all of it, and for a small reveal no
        // trip to the blocking pool. The transaction gives every probe one
        // snapshot, and takes the database's read lock and a WAL read mark
        // once: each statement outside one took and released both.
        let read = move |c: &Connection| {
            run_cached(c, "BEGIN")?;
            let read = reveal_probes(c, &ids, grants_of);
            end_read(c, read)
        };
        if inline {
            self.read_inline_before_commit(read).await
        } else {
            self.read_before_commit(read).await
        }
    }

    async fn order_exists(&self, id: TokenId) -> Result<bool, StoreError> {
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM orders WHERE id = ?1")?
                .query_row([&id[..]], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
        .await
    }

    async fn grants(&self, filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        self.read(move |c| grants_matching(c, filter)).await
    }

    async fn grants_for_reveal(&self, filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        self.read_before_commit(move |c| grants_matching(c, filter))
            .await
    }

    async fn grant(&self, id: [u8; 16]) -> Result<Option<GrantRecord>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(&format!("{GRANT_SELECT} WHERE id = ?1"))?
                .query_row([&id[..]], grant_row)
                .optional()
        })
        .await
    }

    async fn revealed_on_day(&self, principal: &str, day: i64) -> Result<Vec<TokenId>, StoreError> {
        let principal = principal.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT order_id FROM reveal_days WHERE principal = ?1 AND day = ?2")?
                .query_map(params![principal, day], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn alerts(&self, since_ms: i64, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, at_ms, kind, principal, peer, detail FROM alerts WHERE at_ms >= ?1 ORDER BY id LIMIT ?2",
            )?
            .query_map(params![since_ms, limit as i64], |r| {
                Ok(AlertRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    at_ms: r.get(1)?,
                    kind: r.get(2)?,
                    principal: r.get(3)?,
                    peer: r.get(4)?,
                    detail: r.get(5)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT DISTINCT chain FROM audit_events ORDER BY chain")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn audit_size(&self, chain: &str) -> Result<u64, StoreError> {
        let chain = chain.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT seq FROM audit_events WHERE chain = ?1 AND {SEQ_IS_INTEGER} ORDER BY seq DESC LIMIT 1"
            ))?
            .query_row([chain], |r| r.get::<_, i64>(0))
            .optional()
            .map(Option::unwrap_or_default)
        })
        .await
        .map(|n| n as u64)
    }

    async fn audit_query(
        &self,
        f: AuditFilter,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |c| {
            // With a token, its events are found first and the other
            // filters only test them: `+` keeps SQLite from walking the
            // chain or a principal's events instead.
            let by = if f.token.is_some() { "+" } else { "" };
            let mut sql = format!(
                "{EVENT_SELECT} WHERE {by}chain = ?1 AND {by}seq > ?2 AND {SEQ_IS_INTEGER}"
            );
            let mut args: Vec<rusqlite::types::Value> =
                vec![f.chain.clone().into(), (f.after_seq as i64).into()];
            let mut add = |column: &str, op: &str, v: rusqlite::types::Value| {
                args.push(v);
                sql.push_str(&format!(" AND {by}{column} {op} ?{}", args.len()));
            };
            if let Some(p) = f.principal {
                add("principal", "=", p.into());
            }
            if let Some(a) = f.action {
                add("action", "=", a.into());
            }
            if let Some(d) = f.decision {
                add("decision", "=", d.into());
            }
            if let Some(s) = f.since_ms {
                add("ts_ms", ">=", s.into());
            }
            if let Some(u) = f.until_ms {
                add("ts_ms", "<", u.into());
            }
            if let Some(t) = f.token {
                // By key where the event has one, else by text.
                args.push(t.into());
                let text = args.len();
                match f.token_key {
                    Some(k) => {
                        args.push(k.to_vec().into());
                        let key = args.len();
                        sql.push_str(&format!(
                            " AND rowid IN (
                                SELECT e.rowid FROM audit_token_index i
                                  CROSS JOIN audit_events e ON e.chain = i.chain AND e.seq = i.seq AND e.token_key = i.token_key
                                  WHERE i.token_key = ?{key} AND i.chain = ?1 AND i.seq > ?2
                                UNION ALL
                                SELECT e.rowid FROM audit_token_upto u
                                  CROSS JOIN audit_events e ON e.chain = u.chain AND e.seq > max(u.upto, ?2)
                                  WHERE u.chain = ?1 AND e.token_key = ?{key}
                                UNION ALL
                                SELECT rowid FROM audit_events WHERE token = ?{text} AND token_key IS NULL)"
                        ));
                    }
                    None => sql.push_str(&format!(" AND token_key IS NULL AND token = ?{text}")),
                }
            }
            sql.push_str(&format!(" ORDER BY seq LIMIT {limit}"));
            let mut st = c.prepare_cached(&sql)?;
            st.query_map(rusqlite::params_from_iter(args), event_row)?
                .collect()
        })
        .await
    }

    async fn audit_leaves(
        &self,
        chain: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        // Two columns, where `audit_query` reads and converts eleven: the
        // checkpoint signer reads every event once, and under 100-token
        // reveals decoding whole rows for it took a fifth of the async
        // workers' CPU.
        let chain = chain.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT seq, leaf FROM audit_events WHERE chain = ?1 AND seq > ?2 AND {SEQ_IS_INTEGER} ORDER BY seq LIMIT ?3"
            ))?;
            st.query_map(
                params![chain, after_seq as i64, limit as i64],
                |r| {
                    // The leaf as `event_row` reads it, whatever its type.
                    let mut row = TypedRow { r, misstored: None };
                    Ok((r.get::<_, i64>(0)? as u64, row.blob(1, "leaf")?))
                },
            )?
            .collect()
        })
        .await
    }

    async fn audit_by_tokens(
        &self,
        tokens: Vec<TokenLookup>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |c| {
            let mut out = Vec::new();
            let keys: std::collections::BTreeSet<TokenId> =
                tokens.iter().filter_map(|t| t.key).collect();
            // One snapshot for the index and the scan past its marks.
            let tx = c.unchecked_transaction()?;
            let mut st = tx.prepare_cached(&format!(
                "{EVENT_SELECT} WHERE rowid IN ({INDEXED_EVENTS}) AND {SEQ_IS_INTEGER}"
            ))?;
            for k in &keys {
                for e in st.query_map([&k[..]], event_row)? {
                    out.push(e?);
                }
            }
            drop(st);
            // Past the marks: one scan of the keys for every lookup, then
            // the rows that match.
            if !keys.is_empty() {
                let matching: Vec<i64> = tx
                    .prepare_cached(UNINDEXED_EVENTS)?
                    .query_map([], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, rusqlite::types::Value>(1)?))
                    })?
                    .filter_map(|row| match row {
                        Ok((rowid, rusqlite::types::Value::Blob(k))) => {
                            let k: TokenId = k.try_into().ok()?;
                            keys.contains(&k).then_some(Ok(rowid))
                        }
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<rusqlite::Result<_>>()?;
                let mut st = tx.prepare_cached(&format!(
                    "{EVENT_SELECT} WHERE rowid = ?1 AND {SEQ_IS_INTEGER}"
                ))?;
                for rowid in matching {
                    for e in st.query_map([rowid], event_row)? {
                        out.push(e?);
                    }
                }
            }
            let texts: std::collections::BTreeSet<&str> =
                tokens.iter().map(|t| t.text.as_str()).collect();
            let mut st = tx.prepare_cached(&format!(
                "{EVENT_SELECT} WHERE token = ?1 AND token_key IS NULL AND {SEQ_IS_INTEGER}"
            ))?;
            for t in texts {
                for e in st.query_map([t], event_row)? {
                    out.push(e?);
                }
            }
            drop(st);
            tx.commit()?;
            out.sort_by(|a, b| (&a.chain, a.seq).cmp(&(&b.chain, b.seq)));
            // An event both indexed and past its chain's mark (a mark moved
            // back) is one event.
            out.dedup_by(|a, b| a.chain == b.chain && a.seq == b.seq);
            Ok(out)
        })
        .await
    }

    async fn audit_unfindable(
        &self,
        chain: &str,
        events: Vec<(u64, TokenId)>,
    ) -> Result<Option<u64>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |c| {
            // The chain's mark and index entries as one snapshot holds
            // them; entries at or below a mark never change, so events
            // read in another snapshot are checked all the same.
            let tx = c.unchecked_transaction()?;
            let mark = tx
                .prepare_cached("SELECT upto FROM audit_token_upto WHERE chain = ?1")?
                .query_row([&chain], |r| r.get::<_, rusqlite::types::Value>(0))
                .optional()?;
            // Searches scan the events past an integer mark (a real one
            // compares as its number); past no mark, or one of another
            // type, they scan nothing, and every event must be indexed.
            let upto = match mark {
                Some(rusqlite::types::Value::Integer(n)) => n,
                Some(rusqlite::types::Value::Real(r)) if r.is_finite() => r.floor() as i64,
                _ => i64::MAX,
            };
            // Through the primary key, as the searches find them.
            let mut entry = tx.prepare_cached(
                "SELECT 1 FROM audit_token_index WHERE token_key = ?1 AND chain = ?2 AND seq = ?3",
            )?;
            for (seq, key) in events {
                if (seq as i64) > upto {
                    break;
                }
                if !entry.exists(params![&key[..], chain, seq as i64])? {
                    return Ok(Some(seq));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn revealed_records(
        &self,
        principal: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError> {
        let principal = principal.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT count(DISTINCT coalesce(order_token, token)) FROM audit_events
                 WHERE principal = ?1 AND ts_ms >= ?2 AND ts_ms <= ?3
                   AND action = 'reveal' AND decision IN ('allowed', 'masked')",
            )?
            .query_row(params![principal, from_ms, to_ms], |r| r.get::<_, i64>(0))
        })
        .await
        .map(|n| n as u64)
    }

    async fn checkpoints(&self, chain: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT chain, size, root, ts_ms, note FROM checkpoints WHERE chain = ?1 ORDER BY size")?
                .query_map([chain], |r| {
                    let root: Vec<u8> = r.get(2)?;
                    Ok(StoredCheckpoint {
                        chain: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        root: root.try_into().unwrap_or([0; 32]),
                        ts_ms: r.get(3)?,
                        note: r.get(4)?,
                    })
                })?
                .collect()
        })
        .await
    }

    async fn tokens_by_fingerprint(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Vec<TokenId>>, StoreError> {
        self.read(move |c| {
            // Each half reads one of the two partial indexes.
            let mut st = c.prepare_cached(
                "SELECT id FROM tokens WHERE kind = ?1 AND fingerprint = ?2 AND deterministic = 1
                 UNION ALL
                 SELECT id FROM tokens WHERE kind = ?1 AND fingerprint = ?2 AND deterministic = 0",
            )?;
            keys.iter()
                .map(|(kind, fp)| {
                    st.query_map(params![kind.code(), &fp[..]], |r| r.get(0))?
                        .collect()
                })
                .collect()
        })
        .await
    }

    // Key lifecycle (admin).

    async fn ciphertexts_per_version(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT key_version, count(*) FROM tokens GROUP BY key_version ORDER BY key_version",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect()
        })
        .await
    }

    async fn rewrap_candidates(
        &self,
        primary: u32,
        only: Option<u32>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(move |c| {
            let mut out = Vec::with_capacity(limit.min(10_000));
            for (op, version) in rewrap_ranges(primary, only) {
                if out.len() >= limit {
                    break;
                }
                let mut st = c.prepare_cached(&format!(
                    "SELECT kind, key_version, ciphertext, fingerprint, deterministic, created_ms, id
                     FROM tokens WHERE key_version {op} ?1 LIMIT ?2"
                ))?;
                let rows = st.query_map(params![version, (limit - out.len()) as i64], |r| {
                    token_row(r.get(6)?, r)
                })?;
                for row in rows {
                    out.push(row?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn rewrap_remaining(&self, primary: u32, only: Option<u32>) -> Result<u64, StoreError> {
        self.read(move |c| {
            let mut n = 0;
            for (op, version) in rewrap_ranges(primary, only) {
                n += c
                    .prepare_cached(&format!(
                        "SELECT count(*) FROM tokens WHERE key_version {op} ?1"
                    ))?
                    .query_row([version], |r| r.get::<_, i64>(0))? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn storage_bytes(&self) -> Result<u64, StoreError> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let size = |p: &Path| FileFacts::of_path(p).map(|f| f.len).unwrap_or(0);
        Ok(size(&self.path) + size(Path::new(&wal)))
    }

    async fn chain_head(&self, chain: &str) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let chain = chain.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                &format!("SELECT seq, chain_hash FROM audit_events WHERE chain = ?1 AND {SEQ_IS_INTEGER} ORDER BY seq DESC LIMIT 1"),
            )?
            .query_row([chain], |r| {
                let hash: Vec<u8> = r.get(1)?;
                Ok((r.get::<_, i64>(0)? as u64, hash.try_into().unwrap_or([0; 32])))
            })
            .optional()
        })
        .await
    }
}

/// Whether another process has the database at `path` open (a running
/// server holds its connections for as long as it runs): offline tools
/// that must not run beside a server check this first.
pub fn in_use(path: &Path) -> Result<bool, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(unavailable)?;
    // A probe, not a user of the database: closing it copies nothing (see
    // `open_conn`).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_millis(250))
        .map_err(unavailable)?;
    // In exclusive locking mode a WAL database needs the file's exclusive
    // lock, which any other open connection, even an idle one, prevents.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(unavailable)?;
    match conn.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;") {
        Ok(()) => Ok(false),
        Err(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            Ok(true)
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// The key-version ranges a rewrap reads: one version, or every version but
/// the primary. As separate ranges rather than `!=` or `OR`, each an index
/// range scan: an `OR` over a WITHOUT ROWID table makes SQLite dedupe every
/// matching row in a temporary b-tree, which made counting the remaining
/// rows cost more than rewrapping a batch.
fn rewrap_ranges(primary: u32, only: Option<u32>) -> Vec<(&'static str, u32)> {
    match only {
        Some(v) => vec![("=", v)],
        None => vec![("<", primary), (">", primary)],
    }
}

/// A write the batch must not make: fails the batch (and so every other
/// write in it) with a constraint error the store reports as a conflict.
fn refused(why: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
        Some(why),
    )
}

/// The rowids of the events indexed under token key `?1`, where the event
/// still holds that key.
const INDEXED_EVENTS: &str = "SELECT e.rowid FROM audit_token_index i
    CROSS JOIN audit_events e ON e.chain = i.chain AND e.seq = i.seq AND e.token_key = i.token_key
    WHERE i.token_key = ?1";

/// The rowids and keys of the events with a token key past their chain's mark, which
/// the writer has not indexed yet: about [`TOKEN_INDEX_BATCH`] (see there).
const UNINDEXED_EVENTS: &str = "SELECT e.rowid, e.token_key FROM audit_token_upto u
    CROSS JOIN audit_events e ON e.chain = u.chain AND e.seq > u.upto
    WHERE e.token_key IS NOT NULL";

const EVENT_SELECT: &str = "SELECT seq, chain, leaf, chain_hash, principal, action, decision, token, ts_ms, token_key, order_token FROM audit_events";

/// Every read of events by seq carries this. SQLite keeps a blob or text
/// given to `seq` (not a rowid alias), sorts it after every number and
/// finds it `> n` whatever n: a reader paging on from the last seq it saw
/// would start over for ever. Such a row is not read at all, so
/// verification finds its seq missing.
const SEQ_IS_INTEGER: &str = "typeof(seq) = 'integer'";

/// Reads an event row column by column, taking each value in the type the
/// vault writes there and noting the first column that holds another
/// ([`StoredEvent::misstored`]): SQLite keeps whatever type an edited row is
/// given, and such a row is a finding for verification, not a read error.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let mut row = TypedRow { r, misstored: None };
    let hash = row.blob(3, "chain_hash")?;
    let token_key = row.opt_blob(9, "token_key")?;
    Ok(StoredEvent {
        // An integer: rows with any other seq are not read (SEQ_IS_INTEGER).
        seq: r.get::<_, i64>(0)? as u64,
        chain: row.text(1, "chain")?,
        leaf: row.blob(2, "leaf")?,
        chain_hash: hash.try_into().unwrap_or([0; 32]),
        principal: row.text(4, "principal")?,
        action: row.text(5, "action")?,
        decision: row.text(6, "decision")?,
        token: row.opt_text(7, "token")?,
        // A key of the wrong length cannot name a token: verification
        // reports it.
        token_key: token_key.map(|k| k.try_into().unwrap_or([0; TOKEN_ID_BYTES])),
        ts_ms: row.integer(8, "ts_ms")?,
        order_token: row.opt_text(10, "order_token")?,
        misstored: row.misstored,
    })
}

/// A row read in the types the vault writes; see [`event_row`].
struct TypedRow<'a, 'r> {
    r: &'a rusqlite::Row<'r>,
    misstored: Option<String>,
}

impl<'a> TypedRow<'a, '_> {
    fn value(&self, i: usize) -> rusqlite::Result<rusqlite::types::ValueRef<'a>> {
        let r = self.r;
        r.get_ref(i)
    }

    /// Notes `column` as holding `found` where the vault writes `wanted`.
    fn wrong(&mut self, column: &str, found: rusqlite::types::ValueRef<'_>, wanted: &str) {
        use rusqlite::types::ValueRef;
        let found = match found {
            ValueRef::Null => "null",
            ValueRef::Integer(_) => "an integer",
            ValueRef::Real(_) => "a real",
            ValueRef::Text(_) => "text",
            ValueRef::Blob(_) => "a blob",
        };
        self.misstored.get_or_insert_with(|| {
            format!("{column} holds {found} where the vault writes {wanted}")
        });
    }

    fn integer(&mut self, i: usize, column: &str) -> rusqlite::Result<i64> {
        let v = self.value(i)?;
        if let rusqlite::types::ValueRef::Integer(n) = v {
            return Ok(n);
        }
        self.wrong(column, v, "an integer");
        Ok(0)
    }

    fn opt_text(&mut self, i: usize, column: &str) -> rusqlite::Result<Option<String>> {
        use rusqlite::types::ValueRef;
        let v = self.value(i)?;
        Ok(match v {
            ValueRef::Null => None,
            ValueRef::Text(t) => {
                Some(match std::str::from_utf8(t) {
                    Ok(text) => text.to_owned(),
                    Err(_) => {
                        self.misstored.get_or_insert_with(|| {
                        format!("{column} holds text that is not UTF-8, which the vault never writes")
                    });
                        String::from_utf8_lossy(t).into_owned()
                    }
                })
            }
            other => {
                let shown = lossy(other);
                self.wrong(column, other, "text");
                Some(shown)
            }
        })
    }

    fn text(&mut self, i: usize, column: &str) -> rusqlite::Result<String> {
        let v = self.value(i)?;
        if v == rusqlite::types::ValueRef::Null {
            self.wrong(column, v, "text");
            return Ok(String::new());
        }
        Ok(self.opt_text(i, column)?.unwrap_or_default())
    }

    fn opt_blob(&mut self, i: usize, column: &str) -> rusqlite::Result<Option<Vec<u8>>> {
        use rusqlite::types::ValueRef;
        let v = self.value(i)?;
        Ok(match v {
            ValueRef::Null => None,
            ValueRef::Blob(b) => Some(b.to_vec()),
            other => {
                let shown = match other {
                    ValueRef::Text(t) => t.to_vec(),
                    _ => lossy(other).into_bytes(),
                };
                self.wrong(column, other, "a blob");
                Some(shown)
            }
        })
    }

    fn blob(&mut self, i: usize, column: &str) -> rusqlite::Result<Vec<u8>> {
        let v = self.value(i)?;
        if v == rusqlite::types::ValueRef::Null {
            self.wrong(column, v, "a blob");
            return Ok(Vec::new());
        }
        Ok(self.opt_blob(i, column)?.unwrap_or_default())
    }
}

/// A value as text, for a column that holds another type than the vault
/// writes: what the row says, for whoever reads the finding.
fn lossy(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => String::new(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Text(b) | ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// Grants matching `filter`, newest first.
fn grants_matching(c: &Connection, filter: GrantFilter) -> rusqlite::Result<Vec<GrantRecord>> {
    let mut out = Vec::new();
    let principal = filter.principal;
    if filter.orders.is_empty() {
        // Separate statements, so the one by principal uses its index.
        let rows = match principal {
            Some(p) => c
                .prepare_cached(&format!(
                    "{GRANT_SELECT} WHERE principal = ?1 ORDER BY created_ms DESC"
                ))?
                .query_map([p], grant_row)?
                .collect::<Result<Vec<_>, _>>()?,
            None => c
                .prepare_cached(&format!("{GRANT_SELECT} ORDER BY created_ms DESC"))?
                .query_map([], grant_row)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        out.extend(rows);
    } else {
        let mut st = c.prepare_cached(GRANTS_BY_ORDER)?;
        for o in &filter.orders {
            for g in st.query_map([&o[..]], grant_row)? {
                let g = g?;
                if principal.as_ref().is_none_or(|p| *p == g.principal) {
                    out.push(g);
                }
            }
        }
        // Newest first over every order, not per order.
        out.sort_by_key(|g| std::cmp::Reverse(g.created_ms));
    }
    Ok(out)
}

/// The columns [`grant_row`] reads, as a literal for `concat!`.
macro_rules! grant_select {
    () => {
        "SELECT id, principal, order_id, purpose, expires_ms, granted_by, created_ms, revoked_ms FROM grants"
    };
}

const GRANT_SELECT: &str = grant_select!();

/// The grants of one order, newest first: the read of a reveal's grant check.
const GRANTS_BY_ORDER: &str = concat!(
    grant_select!(),
    " WHERE order_id = ?1 ORDER BY created_ms DESC"
);

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    Ok(GrantRecord {
        id: r.get(0)?,
        principal: r.get(1)?,
        order_id: r.get(2)?,
        purpose: r.get(3)?,
        expires_ms: r.get(4)?,
        granted_by: r.get(5)?,
        created_ms: r.get(6)?,
        revoked_ms: r.get(7)?,
    })
}

/// Per-chain position: the next sequence number and the chain hash so far.
#[derive(Clone, Copy)]
struct Head {
    next_seq: u64,
    hash: [u8; 32],
}

/// How the syncer makes the WAL durable: `fdatasync`.
type SyncWal = Box<dyn FnMut(&std::fs::File) -> std::io::Result<()> + Send>;

/// Committed jobs waiting for their WAL frames to reach the disk.
type Acks = Vec<(oneshot::Sender<Result<Committed, StoreError>>, Committed)>;

/// Why writes stopped, for every job after a failed sync.
fn not_durable(why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the database's log could not be written to disk ({why}); no write is accepted until the vault is restarted"
    ))
}

/// What the writer has committed and what of it the syncer has made
/// durable, counted in COMMIT statements.
struct Durability {
    /// COMMITs started: incremented just before each COMMIT runs.
    begun: AtomicU64,
    /// COMMITs finished, whether they succeeded or not: incremented just
    /// after. Every one counted has written all it will write.
    committed: AtomicU64,
    /// The highest `committed` count known to be on disk.
    synced: tokio::sync::watch::Sender<u64>,
    /// Why writes stopped: set once, by the syncer, when a sync failed.
    broken: OnceLock<String>,
    /// The checkpoint thread is in a PASSIVE checkpoint, holding SQLite's
    /// checkpoint lock: a RESTART the writer tries meanwhile is refused at
    /// once ([`Writer::bound_wal`]).
    checkpointing: std::sync::atomic::AtomicBool,
}

/// Makes committed groups durable, off the writer thread.
///
/// With `synchronous=FULL`, SQLite calls `fdatasync` on the WAL inside
/// every COMMIT, and the writer, the vault's one serial path, waited for
/// the disk before it could start the next group. The writer's connection
/// now commits with `synchronous=NORMAL`: SQLite writes the group's WAL
/// frames and returns. The writer hands the group's answers to this thread,
/// which runs `fdatasync` on the WAL (one call for every group that
/// committed since the last) and only then answers: no job is acknowledged
/// before its frames are on disk, as with FULL, while the writer already
/// applies the next group. One sync covers every frame written before it,
/// so an acknowledged group is never behind one that is not.
///
/// The WAL's contents reach the database file only through checkpoints,
/// which under NORMAL still sync the WAL before copying from it and the
/// database before the WAL is started again, so frames an acknowledgment
/// counted on are never lost to a WAL reset or truncation.
///
/// A sync that fails leaves the WAL's state on disk unknown (and a later
/// sync may succeed without the lost pages): every waiting job is answered
/// with an error and the store accepts no further write until restarted.
/// Readers see a group once it is committed, before it is synced; the
/// reads whose answers leave the vault unchanged wait until what they may
/// see is on disk ([`SqliteStore::read`]), and the others belong to a
/// request that answers only after a commit of its own.
struct Syncer {
    wal: PathBuf,
    /// The WAL, opened at the first sync, with its file identity.
    file: Option<(std::fs::File, (u64, u64))>,
    sync: SyncWal,
    durability: Arc<Durability>,
}

/// What the writer, the sync thread and the checkpoint thread look up about
/// the WAL at every group: its identity (device, inode) and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileFacts {
    id: (u64, u64),
    len: u64,
}

impl FileFacts {
    /// The file at `path` (symbolic links followed).
    fn of_path(path: &Path) -> std::io::Result<FileFacts> {
        #[cfg(target_os = "linux")]
        if let Some(facts) = FileFacts::statx(rustix::fs::CWD, path, rustix::fs::AtFlags::empty()) {
            return facts;
        }
        std::fs::metadata(path).map(|m| FileFacts::from_metadata(&m))
    }

    /// An open file.
    fn of_file(file: &std::fs::File) -> std::io::Result<FileFacts> {
        #[cfg(target_os = "linux")]
        if let Some(facts) = FileFacts::statx(file, Path::new(""), rustix::fs::AtFlags::EMPTY_PATH)
        {
            return facts;
        }
        file.metadata().map(|m| FileFacts::from_metadata(&m))
    }

    /// Asks `statx` for the inode and size alone, never the timestamps: on
    /// Linux a `stat` that reads a file's times makes the next write give it
    /// a fine-grained time, and the next `fdatasync` then writes the inode
    /// as well as the data (on ext4 without a journal, a sync's median went
    /// from about 190 to 260–330 µs with a `stat` before each one). `None`
    /// where the kernel has no `statx`.
    #[cfg(target_os = "linux")]
    fn statx<Fd: std::os::fd::AsFd>(
        dir: Fd,
        path: &Path,
        flags: rustix::fs::AtFlags,
    ) -> Option<std::io::Result<FileFacts>> {
        use rustix::fs::StatxFlags;
        match rustix::fs::statx(dir, path, flags, StatxFlags::INO | StatxFlags::SIZE) {
            Ok(s) => Some(Ok(FileFacts {
                id: (
                    (u64::from(s.stx_dev_major) << 32) | u64::from(s.stx_dev_minor),
                    s.stx_ino,
                ),
                len: s.stx_size,
            })),
            Err(rustix::io::Errno::NOSYS) => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileFacts {
        #[cfg(unix)]
        let id = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let id = (0, 0);
        FileFacts { id, len: m.len() }
    }
}

impl Syncer {
    fn run(mut self, rx: mpsc::Receiver<Acks>) {
        while let Ok(mut acks) = rx.recv() {
            while let Ok(more) = rx.try_recv() {
                acks.extend(more);
            }
            // Every transaction counted here has written its frames: the
            // writer counts after COMMIT and hands over after counting.
            let covered = self
                .durability
                .committed
                .load(std::sync::atomic::Ordering::SeqCst);
            let outcome = match self.durability.broken.get() {
                Some(why) => Err(why.clone()),
                None => self.sync_wal(),
            };
            match outcome {
                Ok(()) => {
                    self.durability.synced.send_if_modified(|synced| {
                        let newer = covered > *synced;
                        *synced = (*synced).max(covered);
                        newer
                    });
                    for (reply, committed) in acks {
                        let _ = reply.send(Ok(committed));
                    }
                }
                Err(why) => {
                    let first = self.durability.broken.set(why.clone()).is_ok();
                    // Wake the reads waiting for the disk: they fail now.
                    self.durability.synced.send_modify(|_| {});
                    if first {
                        tracing::error!(
                            error = %why,
                            "the database's log could not be written to disk; writes are refused until the vault is restarted"
                        );
                    }
                    for (reply, _) in acks {
                        let _ = reply.send(Err(not_durable(&why)));
                    }
                }
            }
        }
    }

    /// Syncs the WAL that is at its path now. SQLite removes the WAL only
    /// when the last connection closes, and the writer's stays open, so
    /// the file is the one the writer wrote; a changed identity is checked
    /// all the same (one `statx` call against a sync's hundreds of µs; see
    /// [`FileFacts::statx`] for why it asks for no timestamps).
    fn sync_wal(&mut self) -> Result<(), String> {
        let id = FileFacts::of_path(&self.wal)
            .map(|f| f.id)
            .map_err(|e| format!("cannot find the WAL: {e}"))?;
        if self.file.as_ref().is_none_or(|(_, known)| *known != id) {
            // Read and write: some systems refuse to flush a read-only handle.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.wal)
                .map_err(|e| format!("cannot open the WAL: {e}"))?;
            // A new file's directory entry must be durable too.
            #[cfg(unix)]
            if let Some(dir) = self.wal.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("cannot sync the WAL's directory: {e}"))?;
            }
            // The identity of the file opened: if another replaced it since
            // the look-up above, the next sync opens that one.
            let opened =
                FileFacts::of_file(&file).map_err(|e| format!("cannot look up the WAL: {e}"))?;
            self.file = Some((file, opened.id));
        }
        let (file, _) = self.file.as_ref().ok_or("the WAL is not open")?;
        (self.sync)(file).map_err(|e| format!("fdatasync failed: {e}"))
    }
}

/// The connection a batch's read uses: the database must be there (no
/// file is created), and each page is read once (no large cache).
fn tail_conn(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    plan_once(&conn)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.pragma_update(None, "cache_size", -2_048)?;
    Ok(conn)
}

/// The token index entries of every event past its chain's mark (at most
/// `pass` events of a chain), sorted, the marks they take the chains to,
/// and how many events are left past those. One read transaction: the
/// marks, the chains' heads and the entries are of one snapshot.
fn read_tail(
    conn: &mut Connection,
    pass: i64,
    after_snapshot: Option<&(dyn Fn() + Send + Sync)>,
) -> rusqlite::Result<(PendingIndex, u64)> {
    use rusqlite::types::Value;
    let started = std::time::Instant::now();
    let tx = conn.transaction()?;
    let marks: Vec<(Value, Value)> = tx
        .prepare("SELECT chain, upto FROM audit_token_upto")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut head = tx.prepare(&format!(
        "SELECT seq FROM audit_events WHERE chain = ?1 AND {SEQ_IS_INTEGER} ORDER BY seq DESC LIMIT 1"
    ))?;
    let mut keyed = tx.prepare(&format!(
        "SELECT token_key, seq FROM audit_events
         WHERE chain = ?1 AND seq > ?2 AND seq <= ?3 AND token_key IS NOT NULL AND {SEQ_IS_INTEGER}"
    ))?;
    let mut entries = Vec::new();
    let mut moved = Vec::new();
    let mut events = 0;
    let mut left = 0;
    for (chain, upto) in marks {
        // An edited mark row of another type (which Verify names when it
        // hides events) stops no other chain's indexing; a real mark is
        // read as searches compare it, and written back an integer.
        let Value::Text(chain) = chain else { continue };
        let upto = match upto {
            Value::Integer(n) => n,
            Value::Real(r) if r.is_finite() => r.floor() as i64,
            _ => continue,
        };
        let head: i64 = head
            .query_row([&chain], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        // A long tail (a rebuilt index) goes in over several batches, so
        // memory stays bounded.
        let last = head.min(upto.saturating_add(pass));
        if last <= upto {
            continue;
        }
        events += (last - upto) as u64;
        left += (head - last) as u64;
        for row in keyed.query_map(params![chain, upto, last], |r| {
            Ok((r.get::<_, Value>(0)?, r.get::<_, i64>(1)?))
        })? {
            // A key of another type is found by no search: Verify names it
            // as misstored.
            if let (Value::Blob(key), seq) = row? {
                entries.push((key, chain.clone(), seq));
            }
        }
        moved.push((chain, last));
    }
    drop((head, keyed));
    if let Some(hook) = after_snapshot {
        hook();
    }
    tx.commit()?;
    entries.sort_unstable();
    Ok((
        PendingIndex {
            entries: entries.into_iter(),
            marks: moved,
            events,
            started,
        },
        left,
    ))
}

/// Audit events past the token index's marks ([`Writer::index_tail`]).
fn unindexed_events(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT count(*) FROM audit_token_upto u CROSS JOIN audit_events e ON e.chain = u.chain AND e.seq > u.upto",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// When the writer next indexes audit events by token key.
struct TokenIndexing {
    /// Events waiting past which the writer indexes them.
    batch: u64,
    /// Idle time after which it indexes whatever waits; `None`: never.
    idle: Option<std::time::Duration>,
    /// Pause before trying again after a failed attempt.
    retry: std::time::Duration,
    /// Most events of a chain one batch takes past its mark.
    pass: i64,
    /// Events committed past the marks (all chains), as far as the writer
    /// counted.
    waiting: u64,
    /// After a failed attempt: not before this instant.
    retry_at: Option<std::time::Instant>,
    /// A batch being inserted.
    pending: Option<PendingIndex>,
    /// A batch being read, on a thread of its own.
    reading: Option<TailRead>,
    /// Wait for each read to finish (tests: indexing at known points).
    wait_for_reads: bool,
    /// Called by a batch's read once it holds its snapshot (tests: commits
    /// during a read).
    after_snapshot: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// The read of a batch ([`read_tail`]) on its own thread and connection,
/// so the writer goes on committing groups meanwhile (on the writer, reads
/// of 50,000–140,000 events took 30–160 ms, and every group waited).
struct TailRead {
    done: mpsc::Receiver<rusqlite::Result<(PendingIndex, u64)>>,
    thread: std::thread::JoinHandle<()>,
    /// `waiting` when the read began: what is counted after it is past the
    /// read's snapshot, or was (a little is counted twice, and only brings
    /// the next batch forward).
    waiting_then: u64,
}

/// A batch of token index entries, sorted, that [`Writer::index_tail`]
/// inserts a chunk at a time.
struct PendingIndex {
    /// (token key, chain, seq) still to insert.
    entries: std::vec::IntoIter<(Vec<u8>, String, i64)>,
    /// Each chain's mark once all are in.
    marks: Vec<(String, i64)>,
    /// Events the batch covers.
    events: u64,
    started: std::time::Instant,
}

impl TokenIndexing {
    /// Waits for a batch's read to end and drops it.
    fn stop_reading(&mut self) {
        if let Some(read) = self.reading.take() {
            drop(read.done);
            let _ = read.thread.join();
        }
    }
}

impl Default for TokenIndexing {
    fn default() -> TokenIndexing {
        TokenIndexing {
            batch: TOKEN_INDEX_BATCH,
            idle: Some(TOKEN_INDEX_IDLE),
            retry: TOKEN_INDEX_RETRY,
            pass: TOKEN_INDEX_PASS,
            waiting: 0,
            retry_at: None,
            pending: None,
            reading: None,
            wait_for_reads: false,
            after_snapshot: None,
        }
    }
}

struct Writer {
    index: TokenIndexing,
    conn: Connection,
    db: PathBuf,
    wal: PathBuf,
    /// Committed jobs, to the syncer.
    acks: mpsc::SyncSender<Acks>,
    syncer: std::thread::JoinHandle<()>,
    durability: Arc<Durability>,
    /// After a failed RESTART checkpoint: not before this instant.
    retry_restart_at: Option<std::time::Instant>,
    /// RESTART checkpoints failed in a row.
    restart_failures: u32,
    /// When the WAL bound was last reported as missed.
    warned_at: Option<std::time::Instant>,
    heads: std::collections::HashMap<String, Head>,
    /// See [`WAL_LIMIT_BYTES`].
    wal_limit: u64,
    /// RESTART checkpoints refused at once since the last that was not.
    refused_at_once: u32,
}

impl Writer {
    fn new(
        conn: Connection,
        db: &Path,
        acks: mpsc::SyncSender<Acks>,
        syncer: std::thread::JoinHandle<()>,
        durability: Arc<Durability>,
        wal_limit: u64,
    ) -> Writer {
        Writer {
            index: TokenIndexing::default(),
            conn,
            db: db.to_owned(),
            wal: wal_path(db),
            acks,
            syncer,
            durability,
            retry_restart_at: None,
            restart_failures: 0,
            warned_at: None,
            heads: Default::default(),
            wal_limit,
            refused_at_once: 0,
        }
    }

    /// Keeps the WAL under its bound ([`WAL_LIMIT_BYTES`]). The WAL starts
    /// again from its beginning only when a transaction begins after
    /// everything in it was copied to the database; under writes that never pause a new
    /// group is always appended first, and the WAL grew without bound (to
    /// 700 MiB for 250 MiB of rows, and tens of GB while loading millions of
    /// tokens). Past the limit the writer itself, holding no transaction,
    /// runs a RESTART checkpoint: groups wait for the time it takes to copy
    /// what the checkpoint thread has not copied yet and for readers to
    /// leave the WAL, then the next group writes the WAL from its start.
    ///
    /// RESTART, not TRUNCATE: the file keeps its size (the bound,
    /// the writer's `journal_size_limit`), so commits overwrite blocks it
    /// already has instead of growing it, and the sync thread's `fdatasync`
    /// then has no file size to journal. Truncating a 64 MiB file to zero
    /// at every bound also made the forced checkpoint itself take 55-80 ms.
    ///
    /// The checkpoint waits at most [`RESTART_WAIT`] for readers on an
    /// older snapshot (another process holding a read transaction, say),
    /// not the connection's 5 s busy timeout, and failed attempts are
    /// retried with a doubling pause (from [`RESTART_RETRY`] up to
    /// [`RESTART_RETRY_MAX`]): a lingering reader lets the WAL grow as
    /// before rather than stall every group. An attempt refused at once for
    /// the checkpoint lock is tried again after the next group instead (up
    /// to [`REFUSED_AT_ONCE_MAX`] times in a row).
    fn bound_wal(&mut self) {
        // After a failed sync nothing more is copied from the WAL.
        if self.durability.broken.get().is_some() {
            return;
        }
        // A batch's read holds a snapshot: the restart would wait for it,
        // and every group behind the restart. Once it is done, then.
        if self.index.reading.is_some() {
            return;
        }
        let now = std::time::Instant::now();
        if self.retry_restart_at.is_some_and(|at| now < at) {
            return;
        }
        let size = FileFacts::of_path(&self.wal).map(|f| f.len).unwrap_or(0);
        if size <= self.wal_limit {
            return;
        }
        let _ = self.conn.busy_timeout(RESTART_WAIT);
        let started = std::time::Instant::now();
        let outcome = self
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
        let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
        if matches!(outcome, Ok(0)) {
            self.retry_restart_at = None;
            self.restart_failures = 0;
            self.refused_at_once = 0;
            return;
        }
        // Refused for the checkpoint lock: SQLite waits for readers through
        // the busy handler but gives up on that lock at once, so it was
        // refused before the handler's first sleep, or while the checkpoint
        // thread was copying. That copy ends soon: tried again after the
        // next group, not after a pause (the pauses let the WAL grow 40 MiB
        // and more past its bound under sustained writes). Another process
        // can hold the lock too, for as long as it likes: after
        // [`REFUSED_AT_ONCE_MAX`] such refusals in a row, the pause and the
        // warning below.
        let ours = self
            .durability
            .checkpointing
            .load(std::sync::atomic::Ordering::Acquire);
        if matches!(outcome, Ok(1))
            && (ours || started.elapsed() < BUSY_AT_ONCE)
            && self.refused_at_once < REFUSED_AT_ONCE_MAX
        {
            self.refused_at_once += 1;
            return;
        }
        self.refused_at_once = 0;
        let now = std::time::Instant::now();
        let pause = RESTART_RETRY
            .saturating_mul(1 << self.restart_failures.min(16))
            .min(RESTART_RETRY_MAX);
        self.restart_failures = self.restart_failures.saturating_add(1);
        self.retry_restart_at = Some(now + pause);
        if self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= WAL_WARN_EVERY)
        {
            self.warned_at = Some(now);
            tracing::warn!(
                wal_bytes = size,
                bound_mib = self.wal_limit >> 20,
                "the WAL is past its bound and could not be started again: a reader (or another process) still uses an older snapshot; retrying"
            );
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        // Blocks until a job arrives; returns when every sender is gone and
        // the queue is drained, so a shutdown commits everything accepted.
        loop {
            let idle = self.index.idle.filter(|_| self.index.waiting > 0);
            let first = if self.index.pending.is_some() {
                // A batch half inserted: its next chunk unless a job waits.
                match rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::TryRecvError::Empty) => {
                        self.index_tail();
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => None,
                }
            } else {
                // A batch being read: look for it soon.
                let idle = match self.index.reading {
                    Some(_) => Some(TAIL_READ_POLL),
                    None => idle,
                };
                match idle {
                    None => rx.recv().ok(),
                    Some(idle) => match rx.recv_timeout(idle) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.index_tail();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    },
                }
            };
            let Some(first) = first else { break };
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(jobs);
            if self.index.pending.is_some()
                || self.index.reading.is_some()
                || self.index.waiting >= self.index.batch
            {
                self.index_tail();
            }
            self.bound_wal();
        }
        // A read still running would hold a snapshot of the WAL open
        // through the checkpoint below.
        self.index.stop_reading();
        // Every group is committed: let the syncer answer the last ones.
        let Writer {
            conn,
            acks,
            syncer,
            durability,
            ..
        } = self;
        drop(acks);
        let synced = syncer.join().is_ok();
        // A clean close leaves everything in the database file and the WAL
        // empty (SQLite's own close would also delete the -wal and -shm
        // files; they stay, empty and reused); after a failed sync, or a
        // sync thread that died, nothing more is copied from the WAL (see
        // `open_conn`). A reader holding an old snapshot (another process)
        // makes the checkpoint give up after a short wait: the WAL then
        // stays, and the next open recovers from it.
        if synced && durability.broken.get().is_none() {
            let _ = conn.busy_timeout(RESTART_WAIT);
            let copied = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
                .is_ok_and(|busy| busy == 0);
            if !copied {
                tracing::warn!(
                    "the WAL could not be copied into the database on close: another connection still reads it; the next open recovers from it"
                );
            }
        }
    }

    fn head(&mut self, chain: &str) -> rusqlite::Result<Head> {
        if let Some(h) = self.heads.get(chain) {
            return Ok(*h);
        }
        let last: Option<(i64, Vec<u8>)> = self
            .conn
            .query_row(
                &format!("SELECT seq, chain_hash FROM audit_events WHERE chain = ?1 AND {SEQ_IS_INTEGER} ORDER BY seq DESC LIMIT 1"),
                [chain],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let head = match last {
            Some((seq, hash)) => Head {
                next_seq: seq as u64 + 1,
                hash: hash.try_into().unwrap_or([0; 32]),
            },
            None => Head {
                next_seq: 1,
                hash: audit::GENESIS,
            },
        };
        self.heads.insert(chain.to_owned(), head);
        Ok(head)
    }

    /// Commits a group of jobs in one transaction and one fsync. The fast
    /// path applies them all without savepoints (a savepoint makes SQLite
    /// copy every touched page to a sub-journal); if any job fails, the
    /// group is rolled back and each job is retried in its own
    /// transaction, so one bad batch cannot fail the others.
    ///
    /// Committed jobs are answered by the syncer once the WAL is on disk;
    /// failed ones at once. After a failed sync nothing more is applied.
    fn commit_group(&mut self, jobs: Vec<Job>) {
        if let Some(why) = self.durability.broken.get() {
            for job in jobs {
                let _ = job.reply.send(Err(not_durable(why)));
            }
            return;
        }
        let commits = self
            .durability
            .committed
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut acks = Vec::with_capacity(jobs.len());
        let grouped = if jobs.len() > 1 {
            // On failure, fall through: isolate the failing job.
            self.try_group(&jobs).ok()
        } else {
            None
        };
        if let Some(results) = grouped {
            acks.extend(jobs.into_iter().map(|j| j.reply).zip(results));
        } else {
            for job in jobs {
                match self.try_group(std::slice::from_ref(&job)) {
                    Ok(mut r) => acks.push((job.reply, r.remove(0))),
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
        }
        // Any COMMIT run, even a failed one (readers wait on its count),
        // goes to the syncer, with whatever answers it has.
        let ran = self
            .durability
            .committed
            .load(std::sync::atomic::Ordering::SeqCst)
            != commits;
        if ran && self.acks.send(acks).is_err() {
            // The syncer is gone (it does not panic): the answers are
            // dropped, so the jobs hear that the writer stopped, never a
            // false acknowledgment, and nothing more is written.
            let _ = self.durability.broken.set("the sync thread stopped".into());
            self.durability.synced.send_modify(|_| {});
        }
    }

    /// Adds the audit events past each chain's `audit_token_upto` mark to
    /// `audit_token_index`, a chunk at a time, and then moves the marks to
    /// where the chains' heads were.
    ///
    /// The first call starts a thread that reads the entries of every event
    /// waiting and sorts them by key ([`read_tail`]), on a connection of its
    /// own while the writer goes on committing groups; once it is done, each
    /// call inserts the next [`TOKEN_INDEX_CHUNK`] of them in a transaction
    /// of its own, between two groups, and the last one moves the marks.
    /// Each index page is so written once for all the batch's entries on
    /// it, however many reveals of the same token the batch holds, and no
    /// group waits behind a whole batch: only behind one chunk and its
    /// hand-over to the sync thread. Until the
    /// marks move, the entries already in are also past them: readers find
    /// such an event twice and count it once.
    ///
    /// What it adds is derived from committed events: a failure leaves them
    /// to the readers' scan past the marks, and is tried again later.
    fn index_tail(&mut self) {
        if self.durability.broken.get().is_some() {
            // Nothing more is written: drop the batch, or the writer would
            // come back for its next chunk at once, for ever.
            self.index.pending = None;
            self.index.stop_reading();
            self.index.waiting = 0;
            return;
        }
        let now = std::time::Instant::now();
        if self.index.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let commits = self
            .durability
            .committed
            .load(std::sync::atomic::Ordering::SeqCst);
        let outcome = (|| -> Result<(), Box<dyn std::error::Error>> {
            let mut pending = match self.index.pending.take() {
                Some(p) => p,
                None => match self.read_done()? {
                    Some(p) => p,
                    // Still reading: nothing written, no COMMIT to report.
                    None => return Ok(()),
                },
            };
            let chunk: Vec<_> = pending.entries.by_ref().take(TOKEN_INDEX_CHUNK).collect();
            let last = pending.entries.len() == 0;
            if chunk.is_empty() && pending.marks.is_empty() {
                // No chain had anything past its mark: nothing to write.
                return Ok(());
            }
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let mut insert = self.conn.prepare_cached(
                "INSERT OR IGNORE INTO audit_token_index (token_key, chain, seq) VALUES (?1, ?2, ?3)",
            )?;
            for (key, chain, seq) in &chunk {
                insert.execute(params![&key[..], chain, seq])?;
            }
            drop(insert);
            if last {
                let mut mark = self
                    .conn
                    .prepare_cached("UPDATE audit_token_upto SET upto = ?2 WHERE chain = ?1")?;
                for (chain, upto) in &pending.marks {
                    mark.execute(params![chain, upto])?;
                }
            }
            self.durability
                .begun
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let commit = self.conn.execute_batch("COMMIT");
            self.durability
                .committed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            commit?;
            if last {
                tracing::debug!(
                    events = pending.events,
                    took = ?pending.started.elapsed(),
                    "indexed audit events by token"
                );
            } else {
                self.index.pending = Some(pending);
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => self.index.retry_at = None,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                // Read again from the marks after the pause.
                self.index.pending = None;
                self.index.waiting = self.index.waiting.max(self.index.batch);
                self.index.retry_at = Some(now + self.index.retry);
                tracing::warn!(error = %e, "could not index audit events by token; readers scan them meanwhile, and it is tried again");
            }
        }
        // As for a group: readers wait on the count of every COMMIT run.
        let ran = self
            .durability
            .committed
            .load(std::sync::atomic::Ordering::SeqCst)
            != commits;
        if ran && self.acks.send(Vec::new()).is_err() {
            let _ = self.durability.broken.set("the sync thread stopped".into());
            self.durability.synced.send_modify(|_| {});
        }
    }

    /// The batch read by the thread [`Writer::index_tail`] started, once it
    /// is done; starts that thread if none runs. `None` while it reads.
    fn read_done(&mut self) -> Result<Option<PendingIndex>, Box<dyn std::error::Error>> {
        let read = match self.index.reading.take() {
            Some(read) => read,
            None => self.start_read()?,
        };
        let result = if self.index.wait_for_reads {
            read.done.recv().ok()
        } else {
            match read.done.try_recv() {
                Ok(result) => Some(result),
                Err(mpsc::TryRecvError::Empty) => {
                    self.index.reading = Some(read);
                    return Ok(None);
                }
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let _ = read.thread.join();
        let (pending, left) = result.ok_or("the thread reading the batch stopped")??;
        // What is left waits for the next batch, with what was committed
        // since the read began.
        self.index.waiting = self.index.waiting.saturating_sub(read.waiting_then) + left;
        Ok(Some(pending))
    }

    fn start_read(&self) -> std::io::Result<TailRead> {
        let (tx, done) = mpsc::sync_channel(1);
        let db = self.db.clone();
        let pass = self.index.pass;
        let hook = self.index.after_snapshot.clone();
        let thread = std::thread::Builder::new()
            .name("ordervault-index".into())
            .spawn(move || {
                let result =
                    tail_conn(&db).and_then(|mut conn| read_tail(&mut conn, pass, hook.as_deref()));
                let _ = tx.send(result);
            })?;
        Ok(TailRead {
            done,
            thread,
            waiting_then: self.index.waiting,
        })
    }

    /// Applies `jobs` in one transaction; all or none are durable.
    fn try_group(&mut self, jobs: &[Job]) -> Result<Vec<Committed>, StoreError> {
        let saved = self.heads.clone();
        let saved_waiting = self.index.waiting;
        let outcome = (|| -> Result<Vec<Committed>, StoreError> {
            run_cached(&self.conn, "BEGIN IMMEDIATE").map_err(unavailable)?;
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                match self.apply(&job.batch, &job.events) {
                    Ok(c) => results.push(c),
                    Err(e) => {
                        let _ = run_cached(&self.conn, "ROLLBACK");
                        return Err(unavailable(e));
                    }
                }
            }
            self.durability
                .begun
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let commit = run_cached(&self.conn, "COMMIT");
            self.durability
                .committed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = commit {
                let _ = run_cached(&self.conn, "ROLLBACK");
                return Err(unavailable(e));
            }
            Ok(results)
        })();
        if outcome.is_err() {
            // Nothing of the group is durable: forget the heads it advanced.
            self.heads = saved;
            self.index.waiting = saved_waiting;
        }
        outcome
    }

    fn apply(
        &mut self,
        b: &WriteBatch,
        events: &[audit::EncodedEvent],
    ) -> rusqlite::Result<Committed> {
        if events.len() != b.audit.len() {
            // Not a caller's mistake: `Job::new` encodes every event.
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!(
                    "{} audit events came with {} encodings",
                    b.audit.len(),
                    events.len()
                )
                .into(),
            ));
        }
        let mut out = Committed::default();
        for (k, v) in &b.meta {
            self.conn
                .prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")?
                .execute(params![k, v])?;
        }
        for k in &b.keys {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO key_versions (version, algorithm, wrapped, state, created_ms, reserved)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![k.version, k.algorithm, k.wrapped, k.state, k.created_ms, k.reserved as i64])?;
        }
        for r in &b.reserve {
            let old: i64 = self
                .conn
                .prepare_cached("SELECT reserved FROM key_versions WHERE version = ?1")?
                .query_row([r.version], |row| row.get(0))
                .optional()?
                .ok_or_else(|| refused(format!("key version {} is not stored", r.version)))?;
            let old = old as u64;
            let new = old.max(old.saturating_add(r.count).min(r.cap));
            self.conn
                .prepare_cached("UPDATE key_versions SET reserved = ?2 WHERE version = ?1")?
                .execute(params![r.version, new as i64])?;
            out.reserved.push((old, new));
        }
        for p in &b.principals {
            self.conn
                .prepare_cached(
                    "INSERT INTO principals (name, role, key_hash, created_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![p.name, p.role, &p.key_hash[..], p.created_ms, p.revoked_ms])?;
        }
        for t in &b.tokens {
            if t.ciphertext.is_empty() {
                // A deterministic token the caller found already stored.
                let existing: Option<TokenId> = self
                    .conn
                    .prepare_cached("SELECT id FROM tokens WHERE id = ?1")?
                    .query_row([&t.id[..]], |r| r.get(0))
                    .optional()?;
                out.token_ids
                    .push(existing.ok_or(rusqlite::Error::QueryReturnedNoRows)?);
                continue;
            }
            let inserted = self
                .conn
                .prepare_cached(
                    "INSERT INTO tokens (id, kind, key_version, ciphertext, fingerprint, deterministic, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    &t.id[..],
                    t.kind.code(),
                    t.key_version,
                    t.ciphertext,
                    &t.fingerprint[..],
                    t.deterministic,
                    t.created_ms
                ])?;
            if inserted == 1 {
                out.token_ids.push(t.id);
            } else if t.deterministic {
                // Another request (or an earlier field of this one) stored
                // the same value first: its token is the token.
                let existing: Option<TokenId> = self
                    .conn
                    .prepare_cached("SELECT id FROM tokens WHERE kind = ?1 AND fingerprint = ?2 AND deterministic = 1")?
                    .query_row(params![t.kind.code(), &t.fingerprint[..]], |r| r.get(0))
                    .optional()?;
                // None: the id itself was taken, by another value.
                out.token_ids
                    .push(existing.ok_or_else(|| refused("token id collision".into()))?);
            } else {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
                    Some("token id collision".into()),
                ));
            }
        }
        for o in &b.orders {
            self.conn
                .prepare_cached(
                    "INSERT INTO orders (id, created_by, created_ms) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![&o.id[..], o.created_by, o.created_ms])?;
            for &i in &o.fields {
                let token = out
                    .token_ids
                    .get(i)
                    .copied()
                    .ok_or(rusqlite::Error::InvalidQuery)?;
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO order_fields (order_id, token_id) VALUES (?1, ?2)",
                    )?
                    .execute(params![&o.id[..], &token[..]])?;
            }
        }
        for g in &b.grants {
            self.conn
                .prepare_cached(
                    "INSERT INTO grants (id, principal, order_id, purpose, expires_ms, granted_by, created_ms, revoked_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    &g.id[..],
                    g.principal,
                    &g.order_id[..],
                    g.purpose,
                    g.expires_ms,
                    g.granted_by,
                    g.created_ms,
                    g.revoked_ms
                ])?;
        }
        for (id, at) in &b.grant_revocations {
            self.conn
                .prepare_cached(
                    "UPDATE grants SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                )?
                .execute(params![&id[..], at])?;
        }
        for (name, at) in &b.principal_revocations {
            self.conn
                .prepare_cached(
                    "UPDATE principals SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                )?
                .execute(params![name, at])?;
        }
        let mut added: std::collections::HashMap<(&str, i64), u64> = Default::default();
        for (principal, day, order) in &b.reveal_days {
            let n = self
                .conn
                .prepare_cached("INSERT OR IGNORE INTO reveal_days (principal, day, order_id) VALUES (?1, ?2, ?3)")?
                .execute(params![principal, day, &order[..]])?;
            *added.entry((principal.as_str(), *day)).or_default() += n as u64;
        }
        for (principal, day, cap) in &b.daily_caps {
            let revealed: i64 = self
                .conn
                .prepare_cached(
                    "SELECT count(*) FROM reveal_days WHERE principal = ?1 AND day = ?2",
                )?
                .query_row(params![principal, day], |r| r.get(0))?;
            if revealed as u64 > *cap {
                let before =
                    revealed as u64 - added.get(&(principal.as_str(), *day)).copied().unwrap_or(0);
                return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
                    StoreError::DailyCapReached {
                        principal: principal.clone(),
                        cap: *cap,
                        revealed: before,
                    },
                )));
            }
        }
        for c in &b.checkpoints {
            self.conn
                .prepare_cached("INSERT INTO checkpoints (chain, size, root, ts_ms, note) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![c.chain, c.size as i64, &c.root[..], c.ts_ms, c.note])?;
        }
        for a in &b.alerts {
            self.conn
                .prepare_cached("INSERT INTO alerts (at_ms, kind, principal, peer, detail) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![a.at_ms, a.kind, a.principal, a.peer, a.detail])?;
        }
        // Key lifecycle (admin).
        for (version, from, to) in &b.key_states {
            let changed = self
                .conn
                .prepare_cached(
                    "UPDATE key_versions SET state = ?3 WHERE version = ?1 AND state = ?2",
                )?
                .execute(params![version, from, to])?;
            if changed != 1 {
                return Err(refused(format!("key version {version} is not {from}")));
            }
        }
        for r in &b.rewraps {
            out.rewrapped += self
                .conn
                .prepare_cached(
                    "UPDATE tokens SET key_version = ?3, ciphertext = ?4 WHERE id = ?1 AND key_version = ?2",
                )?
                .execute(params![&r.id[..], r.from_version, r.to_version, r.ciphertext])?
                as u64;
        }
        for version in &b.retire {
            let changed = self
                .conn
                .prepare_cached(
                    "UPDATE key_versions SET wrapped = NULL, state = 'retired'
                     WHERE version = ?1 AND state = 'decrypt_only'
                       AND NOT EXISTS (SELECT 1 FROM tokens WHERE key_version = ?1)",
                )?
                .execute([version])?;
            if changed != 1 {
                return Err(refused(format!(
                    "key version {version} is not decrypt-only or still protects ciphertexts"
                )));
            }
        }
        let chain = b.audit_chain.as_str();
        for (i, (event, encoded)) in b.audit.iter().zip(events).enumerate() {
            let mut head = self.head(chain)?;
            let seq = head.next_seq;
            let leaf = audit::leaf_from(chain, seq, encoded);
            head.hash = audit::chain_hash(&head.hash, &leaf);
            self.conn
                .prepare_cached(
                    "INSERT INTO audit_events (chain, seq, ts_ms, principal, action, decision, token, leaf, chain_hash, order_token, token_key)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    chain,
                    seq as i64,
                    event.ts_ms,
                    event.principal,
                    event.action.as_str(),
                    event.decision.as_str(),
                    event.token,
                    leaf,
                    &head.hash[..],
                    event.order_token,
                    b.audit_token_key(i).map(|k| k.to_vec())
                ])?;
            if seq == 1 {
                // Every chain has a mark: readers scan past it.
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO audit_token_upto (chain, upto) VALUES (?1, 0)",
                    )?
                    .execute([chain])?;
            }
            head.next_seq += 1;
            self.heads.insert(chain.to_owned(), head);
            self.index.waiting += 1;
            out.audit_seqs.push(seq);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_batch(key: &str) -> WriteBatch {
        WriteBatch {
            meta: vec![(key.to_owned(), b"v".to_vec())],
            ..Default::default()
        }
    }

    /// Reads `key` through a connection of its own, as another process
    /// would.
    fn stored(db: &Path, key: &str) -> bool {
        let c = Connection::open(db).expect("open a side connection");
        c.query_row("SELECT 1 FROM meta WHERE key = ?1", [key], |_| Ok(()))
            .optional()
            .expect("read meta")
            .is_some()
    }

    /// The grant check and the token reads, run again and again with other
    /// values, keep the plan they were prepared with, on the store's
    /// connections and on the index thread's; see [`plan_once`]. A
    /// connection without it plans the grant check again each time.
    #[test]
    fn cached_statements_are_not_prepared_again_for_new_values() {
        /// How often `sql`, run from rusqlite's cache with four values,
        /// was prepared again.
        fn reprepared(c: &Connection, sql: &str) -> i32 {
            for value in 0u8..4 {
                let mut st = c.prepare_cached(sql).expect("prepare");
                let rows = st
                    .query_map([&[value; 16][..]], |_| Ok(()))
                    .expect("query")
                    .count();
                assert_eq!(rows, 0);
            }
            let st = c.prepare_cached(sql).expect("prepare");
            st.get_status(rusqlite::StatementStatus::RePrepare)
        }
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let mut conn = open_conn(&db).expect("open");
        migrate(&mut conn).expect("migrate");
        let side = tail_conn(&db).expect("open the index thread's connection");
        let statements = [
            GRANTS_BY_ORDER.to_owned(),
            ORDERS_OF_TOKEN.to_owned(),
            TOKEN_BY_ID.to_owned(),
        ];
        for c in [&conn, &side] {
            for sql in &statements {
                assert_eq!(
                    reprepared(c, sql),
                    0,
                    "prepared again for new values: {sql}"
                );
            }
        }
        let plain = Connection::open(&db).expect("a connection of SQLite's defaults");
        assert!(
            reprepared(&plain, GRANTS_BY_ORDER) > 0,
            "SQLite no longer plans this statement again: the guarantee may be unneeded"
        );
    }

    /// A read transaction ends whatever its probes do: after a failed
    /// probe it is rolled back, so the pooled connection keeps no snapshot,
    /// which would keep a checkpoint from copying the WAL past it.
    #[test]
    fn a_read_transaction_ends_when_its_probes_fail() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let mut writer = open_conn(&db).expect("open");
        migrate(&mut writer).expect("migrate");
        writer
            .busy_timeout(std::time::Duration::ZERO)
            .expect("no busy wait");
        let reader = open_conn(&db).expect("open");
        for fail in [true, false] {
            writer
                .execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('k', x'00')",
                    [],
                )
                .expect("write");
            run_cached(&reader, "BEGIN").expect("begin");
            let count = |c: &Connection| {
                c.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0))
            };
            let read = count(&reader).and_then(|n| {
                if fail {
                    reader.query_row("SELECT no_such_column FROM meta", [], |r| {
                        r.get::<_, i64>(0)
                    })
                } else {
                    Ok(n)
                }
            });
            assert_eq!(end_read(&reader, read).is_err(), fail);
            assert!(reader.is_autocommit(), "the read transaction is still open");
            // A write after the read, then a checkpoint that must wait for
            // every reader: it copies everything only if no snapshot is held.
            writer
                .execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('k', x'01')",
                    [],
                )
                .expect("write");
            let busy: i64 = writer
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .expect("checkpoint");
            assert_eq!(busy, 0, "a snapshot was left open (failing read: {fail})");
        }
    }

    /// A small reveal's reads run on the calling thread: they answer while
    /// the blocking pool's only thread is taken, where a reveal of more
    /// than [`INLINE_READ_TOKENS`] tokens waits for it. Neither opens a
    /// connection past [`MAX_READERS`]: with every read permit held, a
    /// small reveal waits too.
    #[test]
    fn small_reveal_reads_skip_the_blocking_pool_but_not_the_reader_bound() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let store = SqliteStore::open(&db).expect("open");
            let id: TokenId = [7; 16];
            store
                .commit(WriteBatch {
                    tokens: vec![TokenRecord {
                        id,
                        kind: FieldKind::Phone,
                        key_version: 1,
                        ciphertext: b"sealed".to_vec(),
                        fingerprint: [9; 32],
                        deterministic: false,
                        created_ms: 1,
                    }],
                    ..Default::default()
                })
                .await
                .expect("commit");
            let found = |reads: &RevealReads| {
                reads
                    .rows
                    .iter()
                    .map(|r| r.as_ref().map(|r| (r.id, r.ciphertext.clone())))
                    .collect::<Vec<_>>()
            };
            let unblock = std::time::Duration::from_millis(300);

            // The pool's one thread, taken until released.
            let (release, held) = mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || held.recv());
            // Answered at the first poll: nothing was handed to another
            // thread to wait for.
            let mut small = std::pin::pin!(store.reveal_reads(vec![id, [8; 16]], None));
            let polled = small
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            let std::task::Poll::Ready(small) = polled else {
                panic!("a small reveal reads on the calling thread, at once");
            };
            let small = small.expect("read");
            assert_eq!(
                found(&small),
                vec![Some((id, b"sealed".to_vec())), None],
                "the row is read and an unknown token is absent"
            );
            let large = store.reveal_reads(vec![id; INLINE_READ_TOKENS + 1], None);
            tokio::pin!(large);
            assert!(
                tokio::time::timeout(unblock, &mut large).await.is_err(),
                "a large reveal reads on the blocking pool, taken"
            );
            release.send(()).expect("release the pool");
            let large = large.await.expect("read once the pool is free");
            assert_eq!(found(&large).len(), INLINE_READ_TOKENS + 1);
            assert!(
                found(&large)
                    .iter()
                    .all(|r| r.as_ref().is_some_and(|(i, _)| *i == id))
            );
            blocker.await.expect("blocker").expect("released");

            // Every read connection taken: a small reveal waits for one.
            let permits = store
                .read_permits
                .clone()
                .acquire_many_owned(MAX_READERS as u32)
                .await
                .expect("every permit");
            let waiting = store.reveal_reads(vec![id], None);
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(unblock, &mut waiting).await.is_err(),
                "no read runs past the bound on read connections"
            );
            drop(permits);
            let read = waiting.await.expect("read once a connection is free");
            assert_eq!(found(&read), vec![Some((id, b"sealed".to_vec()))]);
            store.close();
        });
    }

    /// The checkpoint signer's leaves are the events' leaves as a query
    /// reads them, edited rows included: a leaf stored as text or emptied
    /// reads as the query reads it (and so makes the signer refuse, its
    /// root no longer matching), and a row whose sequence number is no
    /// integer is left out, as the query leaves it out, so the signer
    /// finds the gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn audit_leaves_read_edited_rows_as_a_query_does() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let store = SqliteStore::open(&db).expect("open");
        store
            .commit(keyed_events("a", &[None, None, None, None, None]))
            .await
            .expect("commit");
        let side = Connection::open(&db).expect("side connection");
        side.execute(
            "UPDATE audit_events SET leaf = CAST(leaf AS TEXT) WHERE chain = 'a' AND seq = 2",
            [],
        )
        .expect("leaf as text");
        side.execute(
            "UPDATE audit_events SET leaf = NULL WHERE chain = 'a' AND seq = 3",
            [],
        )
        .expect_err("leaf is NOT NULL");
        side.execute(
            "UPDATE audit_events SET leaf = x'' WHERE chain = 'a' AND seq = 3",
            [],
        )
        .expect("leaf emptied");
        side.execute(
            "UPDATE audit_events SET seq = CAST(seq AS BLOB) WHERE chain = 'a' AND seq = 4",
            [],
        )
        .expect("seq as a blob");
        drop(side);
        let queried: Vec<(u64, Vec<u8>)> = store
            .audit_query(
                AuditFilter {
                    chain: "a".into(),
                    ..Default::default()
                },
                100,
            )
            .await
            .expect("query")
            .into_iter()
            .map(|e| (e.seq, e.leaf))
            .collect();
        let leaves = store.audit_leaves("a", 0, 100).await.expect("leaves");
        assert_eq!(leaves, queried);
        assert_eq!(
            leaves.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 5],
            "the row whose seq is no integer is left out"
        );
        let original = audit::encode_leaf("a", 2, &courier_reveal(None));
        assert_eq!(
            leaves[1].1, original,
            "a leaf stored as text reads as its bytes"
        );
        assert!(leaves[2].1.is_empty(), "an emptied leaf reads empty");
        assert_eq!(
            store.audit_leaves("a", 3, 1).await.expect("page"),
            queried[3..]
        );
        store.close();
    }

    /// The WAL's look-ups give its size and tell a file put in its place
    /// from the one still open, as `std::fs::metadata` would.
    #[test]
    fn file_facts_give_the_size_and_tell_a_replaced_file() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let path = dir.path().join("vault.db-wal");
        std::fs::write(&path, vec![7u8; 12_345]).expect("write");
        let open = std::fs::File::open(&path).expect("open");
        let by_path = FileFacts::of_path(&path).expect("look up the path");
        let by_file = FileFacts::of_file(&open).expect("look up the file");
        assert_eq!(by_path, by_file);
        assert_eq!(by_path.len, 12_345);
        assert_eq!(by_path.len, std::fs::metadata(&path).expect("stat").len());

        let other = dir.path().join("other");
        std::fs::write(&other, b"new").expect("write");
        std::fs::rename(&other, &path).expect("replace");
        let replaced = FileFacts::of_path(&path).expect("look up the path");
        assert_ne!(replaced.id, by_file.id, "a new file at the path");
        assert_eq!(replaced.len, 3);
        assert_eq!(FileFacts::of_file(&open).expect("look up").id, by_file.id);
        assert!(FileFacts::of_path(&dir.path().join("gone")).is_err());
    }

    /// The writer's commit does not wait for the disk, but its answer does:
    /// while the WAL's sync is held, the group is committed (another
    /// connection reads it, from inside the sync) and the caller still has
    /// no answer; a read whose answer leaves the vault as it is waits for the
    /// sync too, while the reads of tokenize and reveal do not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_is_answered_only_after_the_wal_is_synced() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let (entered_tx, entered_rx) = mpsc::channel::<bool>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = syncs.clone();
        let side = db.clone();
        let wal = wal_path(&db);
        let store = Arc::new(
            SqliteStore::open_with_sync(
                &db,
                Box::new(move |file| {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // The file synced is the WAL, and the group is in it.
                    let id = |m: std::fs::Metadata| {
                        use std::os::unix::fs::MetadataExt;
                        (m.dev(), m.ino())
                    };
                    let same = std::fs::metadata(&wal).map(id).ok() == file.metadata().map(id).ok();
                    let _ = entered_tx.send(same && stored(&side, "first"));
                    let _ = release_rx.recv();
                    file.sync_data()
                }),
            )
            .expect("open the store"),
        );
        let committing = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(meta_batch("first")).await })
        };
        let entered =
            tokio::task::spawn_blocking(move || entered_rx.recv().expect("the sync is entered"))
                .await
                .expect("waiting task");
        assert!(
            entered,
            "the WAL is synced, and the group is in it before its sync"
        );
        let listing = {
            let store = store.clone();
            tokio::spawn(async move { store.meta("first").await })
        };
        assert_eq!(
            store.tokens(vec![[7; 16]]).await.expect("a reveal's read"),
            vec![None],
            "a reveal's read does not wait for the disk"
        );
        let grant_check = GrantFilter {
            principal: Some("courier".into()),
            orders: vec![[8; 16]],
        };
        assert_eq!(
            store
                .grants_for_reveal(grant_check)
                .await
                .expect("a reveal's grant check"),
            Vec::new(),
            "nor does its grant check"
        );
        // Time for an answer sent too early to arrive.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !committing.is_finished(),
            "no answer while the WAL's sync is held"
        );
        assert!(
            !listing.is_finished(),
            "no read of what is not yet on disk while the sync is held"
        );
        release_tx.send(()).expect("release the sync");
        committing
            .await
            .expect("commit task")
            .expect("the commit is acknowledged after its sync");
        assert_eq!(
            listing.await.expect("read task").expect("the read"),
            Some(b"v".to_vec()),
            "the read answers once the group is on disk"
        );
        assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Later commits are synced the same way (the gate is open now).
        drop(release_tx);
        store
            .commit(meta_batch("second"))
            .await
            .expect("a later commit");
        assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 2);
        store.close();
    }

    /// A read that may see a group committed while an earlier group's sync
    /// was under way does not answer with it before that group's own sync:
    /// here the read runs first and misses the group, so it answers as soon
    /// as the earlier sync is done, without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_never_answers_with_a_group_not_yet_synced() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let store = Arc::new(
            SqliteStore::open_with_sync(
                &db,
                Box::new(move |file| {
                    let _ = entered_tx.send(());
                    let _ = release_rx.recv();
                    file.sync_data()
                }),
            )
            .expect("open the store"),
        );
        let entered = Arc::new(Mutex::new(entered_rx));
        let wait_entered = || {
            let entered = entered.clone();
            tokio::task::spawn_blocking(move || {
                entered
                    .lock()
                    .expect("lock")
                    .recv()
                    .expect("a sync is entered")
            })
        };
        // The first group's sync is held.
        let first = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(meta_batch("first")).await })
        };
        wait_entered().await.expect("waiting task");
        // A read of "second" runs now (and finds nothing), then waits for
        // the disk; meanwhile "second" is committed behind the held sync.
        let reading = {
            let store = store.clone();
            tokio::spawn(async move { store.meta("second").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let second = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(meta_batch("second")).await })
        };
        for _ in 0..500 {
            if stored(&db, "second") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(stored(&db, "second"), "the second group is committed");
        // Only the first sync is let through; the second is held.
        release_tx.send(()).expect("release the first sync");
        wait_entered().await.expect("waiting task");
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("the read answers once what it saw is on disk")
            .expect("read task")
            .expect("the read");
        assert_eq!(
            read, None,
            "a group whose sync is still held is not in any answer"
        );
        assert!(
            !second.is_finished(),
            "the second commit is not answered yet"
        );
        release_tx.send(()).expect("release the second sync");
        first.await.expect("task").expect("first commit");
        second.await.expect("task").expect("second commit");
        assert_eq!(
            store.meta("second").await.expect("read"),
            Some(b"v".to_vec()),
            "once synced it is read"
        );
        drop(release_tx);
        store.close();
    }

    /// A failed sync answers with an error, never an acknowledgment, and the
    /// store takes no further write: a later sync could succeed without the
    /// pages the failed one lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_acknowledges_nothing_and_stops_writes() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = syncs.clone();
        let store = SqliteStore::open_with_sync(
            &db,
            Box::new(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(std::io::Error::other("injected I/O error"))
            }),
        )
        .expect("open the store");
        let first = store
            .commit(meta_batch("first-unsynced"))
            .await
            .expect_err("a failed sync is no acknowledgment");
        let StoreError::Unavailable(why) = &first else {
            panic!("{first:?}");
        };
        assert!(why.contains("could not be written to disk"), "{why}");
        assert!(why.contains("injected I/O error"), "{why}");
        assert!(why.contains("restarted"), "{why}");
        let second = store
            .commit(meta_batch("second"))
            .await
            .expect_err("writes stop after a failed sync");
        assert!(matches!(second, StoreError::Unavailable(_)), "{second:?}");
        assert_eq!(
            syncs.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "nothing more is written or synced after the failure"
        );
        let read = store
            .meta("first-unsynced")
            .await
            .expect_err("what may not be on disk is not read back");
        assert!(matches!(read, StoreError::Unavailable(_)), "{read:?}");
        drop(store);
        // Closing did not checkpoint the WAL (which would also have removed
        // it): its frames are still there for SQLite's recovery to check.
        let frames = std::fs::metadata(wal_path(&db))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(frames > 0, "the WAL was checkpointed on close");
        assert!(!stored(&db, "second"), "the refused batch was not applied");
    }

    /// A clean close leaves every acknowledged write in the database file
    /// and the WAL empty, though no store connection checkpoints on close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_close_checkpoints_everything() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let store = SqliteStore::open(&db).expect("open the store");
        store
            .commit(meta_batch("closed-cleanly"))
            .await
            .expect("commit");
        assert!(store.meta("closed-cleanly").await.expect("read").is_some());
        drop(store);
        let wal = std::fs::metadata(wal_path(&db))
            .map(|m| m.len())
            .unwrap_or(0);
        assert_eq!(wal, 0, "the WAL was not checkpointed on close");
        let file = std::fs::read(&db).expect("read the database file");
        let marker = b"closed-cleanly";
        assert!(file.windows(marker.len()).any(|w| w == marker));
    }

    /// A courier's allowed reveal of `token`.
    fn courier_reveal(token: Option<String>) -> audit::AuditEvent {
        let mut e = audit::AuditEvent::new(
            1_700_000_000_000,
            "courier-1",
            "courier",
            audit::Action::Reveal,
            audit::Decision::Allowed,
            "req-1",
            "policy-1",
        );
        e.token = token;
        e
    }

    /// Reveals of `keys` (one event each, `None` for an event without a
    /// token key) appended to `chain`.
    fn keyed_events(chain: &str, keys: &[Option<TokenId>]) -> WriteBatch {
        let audit = keys
            .iter()
            .map(|k| courier_reveal(k.map(|k| format!("ph_{}", k[0]))))
            .collect();
        WriteBatch {
            audit_chain: chain.to_owned(),
            audit,
            audit_token_keys: keys.to_vec(),
            ..Default::default()
        }
    }

    /// (chain "a", seq) for each of `seqs`.
    fn a(seqs: &[u64]) -> Vec<(String, u64)> {
        seqs.iter().map(|s| ("a".to_owned(), *s)).collect()
    }

    /// (chain, seq) of every event a search by `key` finds, both ways.
    async fn found(store: &SqliteStore, key: TokenId) -> Vec<(String, u64)> {
        let lookup = crate::store::TokenLookup {
            text: format!("ph_{}", key[0]),
            key: Some(key),
        };
        let by_tokens: Vec<(String, u64)> = store
            .audit_by_tokens(vec![lookup])
            .await
            .expect("audit_by_tokens")
            .into_iter()
            .map(|e| (e.chain, e.seq))
            .collect();
        let mut by_query = Vec::new();
        for chain in ["a", "b"] {
            let filter = AuditFilter {
                chain: chain.into(),
                token: Some(format!("ph_{}", key[0])),
                token_key: Some(key),
                ..Default::default()
            };
            for e in store
                .audit_query(filter, 100_000)
                .await
                .expect("audit_query")
            {
                by_query.push((e.chain, e.seq));
            }
        }
        assert_eq!(by_tokens, by_query, "audit_by_tokens and audit_query agree");
        by_tokens
    }

    /// Each chain's mark, and each entry as (first byte of its key, chain, seq).
    type IndexState = (Vec<(String, i64)>, Vec<(u8, String, i64)>);

    /// What Verify asks of the store: the first keyed event of `chain`
    /// that a search by its token would not find.
    async fn unfindable(store: &SqliteStore, chain: &str) -> Option<u64> {
        let keyed = store
            .audit_events(chain, 1, 100_000)
            .await
            .expect("audit_events")
            .into_iter()
            .filter_map(|e| e.token_key.map(|k| (e.seq, k)))
            .collect();
        store
            .audit_unfindable(chain, keyed)
            .await
            .expect("audit_unfindable")
    }

    /// Marks and entries of the token index, read by another connection.
    fn index_of(db: &Path) -> IndexState {
        let c = Connection::open(db).expect("open a side connection");
        let marks = c
            .prepare("SELECT chain, upto FROM audit_token_upto ORDER BY chain")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .expect("read the marks");
        let entries = c
            .prepare("SELECT token_key, chain, seq FROM audit_token_index ORDER BY chain, seq")
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?[0], r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .expect("read the index");
        (marks, entries)
    }

    /// A store that reads each batch beside the writer, as served, once 4
    /// events wait; `after_snapshot` as in [`TokenIndexing`].
    fn open_reading_beside(
        db: &Path,
        after_snapshot: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> SqliteStore {
        let indexing = TokenIndexing {
            batch: 4,
            idle: None,
            retry: std::time::Duration::ZERO,
            after_snapshot,
            ..TokenIndexing::default()
        };
        assert!(!indexing.wait_for_reads);
        SqliteStore::open_with(
            db,
            Box::new(|wal| wal.sync_data()),
            indexing,
            WAL_LIMIT_BYTES,
        )
        .expect("open")
    }

    /// Waits until chain a's mark is one `done` accepts with every event up
    /// to it indexed, committing between looks (each commit lets the writer
    /// take a finished read); the mark and the indexed seqs.
    async fn caught_up(
        store: &SqliteStore,
        db: &Path,
        done: impl Fn(i64) -> bool,
    ) -> (i64, Vec<i64>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (marks, entries) = index_of(db);
            if let [(chain, mark)] = &marks[..]
                && chain == "a"
                && done(*mark)
                && entries.len() as i64 == *mark
            {
                return (*mark, entries.iter().map(|(_, _, seq)| *seq).collect());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the index did not catch up: marks {marks:?}, {} entries",
                entries.len()
            );
            store.commit(meta_batch("poke")).await.expect("commit");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// As served: each batch is read on a thread of its own while the writer
    /// goes on committing. Searches find every event once all along, and
    /// the index catches up to within a batch of the head.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_read_beside_the_writer_hide_nothing_and_catch_up() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let (k1, k2) = ([1u8; 16], [2u8; 16]);
        let store = open_reading_beside(&db, None);
        let mut of_k1 = Vec::new();
        for i in 0..50u64 {
            store
                .commit(keyed_events("a", &[Some(k1), Some(k2)]))
                .await
                .expect("commit");
            of_k1.push(2 * i + 1);
            assert_eq!(found(&store, k1).await, a(&of_k1), "after commit {i}");
        }
        let (mark, seqs) = caught_up(&store, &db, |mark| mark >= 100 - 3).await;
        assert_eq!(seqs, (1..=mark).collect::<Vec<_>>(), "each event once");
        assert_eq!(found(&store, k1).await, a(&of_k1));
        assert_eq!(unfindable(&store, "a").await, None);
        store.close();
    }

    /// Events committed while a batch is read (held here after it took its
    /// snapshot) are not in it: the mark stops at the snapshot's head, so
    /// they stay past it, found by the scan, and go into the next batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_committed_during_a_read_stay_past_the_mark() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let (k1, k2) = ([1u8; 16], [2u8; 16]);
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        let store = open_reading_beside(
            &db,
            Some(Arc::new(move || {
                let _ = entered_tx.lock().expect("lock").send(());
                // Held until released; reads after the release go on.
                let _ = release_rx.lock().expect("lock").recv();
            })),
        );
        store
            .commit(keyed_events("a", &[Some(k1), Some(k2), Some(k1), Some(k2)]))
            .await
            .expect("commit");
        entered_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the batch is being read");
        // The writer commits while the read holds its snapshot.
        store
            .commit(keyed_events("a", &[Some(k1), Some(k1)]))
            .await
            .expect("commit during the read");
        assert_eq!(found(&store, k1).await, a(&[1, 3, 5, 6]));
        drop(release_tx);
        assert_eq!(
            caught_up(&store, &db, |mark| mark == 4).await.1,
            vec![1, 2, 3, 4],
            "the snapshot's events"
        );
        store.commit(meta_batch("poke")).await.expect("commit");
        let (marks, _) = index_of(&db);
        assert_eq!(marks, vec![("a".to_owned(), 4)], "not the head's 6");
        assert_eq!(
            found(&store, k1).await,
            a(&[1, 3, 5, 6]),
            "5 and 6 past the mark"
        );
        assert_eq!(unfindable(&store, "a").await, None);
        store
            .commit(keyed_events("a", &[Some(k2), Some(k1)]))
            .await
            .expect("commit");
        assert_eq!(
            caught_up(&store, &db, |mark| mark == 8).await.1,
            (1..=8).collect::<Vec<_>>(),
            "the next batch"
        );
        assert_eq!(found(&store, k1).await, a(&[1, 3, 5, 6, 8]));
        store.close();
    }

    /// Audit events are indexed by token key in batches: a search finds a
    /// token's events the same whether they are indexed or still past the
    /// mark, the writer indexes them once a batch is waiting (and counts
    /// what waits across a restart), and an edit of the index that would
    /// hide an event from a search is named by `audit_unfindable`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn audit_events_are_found_by_token_key_before_and_after_indexing() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let (k1, k2) = ([1u8; 16], [2u8; 16]);
        let store = SqliteStore::open_indexing_every(&db, 4).expect("open");
        store
            .commit(keyed_events("a", &[Some(k1), Some(k2), Some(k1)]))
            .await
            .expect("commit");
        // Three waiting, fewer than the batch: nothing indexed yet.
        store.commit(meta_batch("after")).await.expect("commit");
        assert_eq!(index_of(&db), (vec![("a".into(), 0)], vec![]));
        assert_eq!(found(&store, k1).await, a(&[1, 3]), "past the mark");
        store
            .commit(keyed_events("a", &[Some(k1), None]))
            .await
            .expect("commit");
        // The writer indexes after the group that filled the batch, before
        // the next one.
        store.commit(meta_batch("after")).await.expect("commit");
        let (marks, entries) = index_of(&db);
        assert_eq!(marks, vec![("a".into(), 5)]);
        assert_eq!(
            entries,
            vec![
                (1, "a".into(), 1),
                (2, "a".into(), 2),
                (1, "a".into(), 3),
                (1, "a".into(), 4)
            ],
            "every keyed event indexed, none for the event without a key"
        );
        assert_eq!(found(&store, k1).await, a(&[1, 3, 4]), "indexed");
        store
            .commit(keyed_events("b", &[Some(k2), Some(k1)]))
            .await
            .expect("commit");
        let mut both = a(&[1, 3, 4]);
        both.push(("b".into(), 2));
        assert_eq!(found(&store, k1).await, both, "indexed and past the mark");
        assert_eq!(unfindable(&store, "a").await, None);
        assert_eq!(unfindable(&store, "b").await, None);
        store.close();
        drop(store);

        // Two events of chain b wait; the reopened writer counts them.
        let store = SqliteStore::open_indexing_every(&db, 3).expect("reopen");
        assert_eq!(found(&store, k1).await, both, "after a restart");
        store
            .commit(keyed_events("b", &[Some(k1)]))
            .await
            .expect("commit");
        store.commit(meta_batch("after")).await.expect("commit");
        let (marks, _) = index_of(&db);
        assert_eq!(marks, vec![("a".into(), 5), ("b".into(), 3)]);
        both.push(("b".into(), 3));
        assert_eq!(found(&store, k1).await, both);

        // Edits that hide events from a search are named.
        let side = Connection::open(&db).expect("open a side connection");
        side.execute(
            "DELETE FROM audit_token_index WHERE chain = 'a' AND seq = 3",
            [],
        )
        .expect("delete an entry");
        assert_eq!(
            found(&store, k1).await[..2],
            a(&[1, 4])[..],
            "the index is what is searched"
        );
        assert_eq!(unfindable(&store, "a").await, Some(3));
        store
            .commit(keyed_events("b", &[Some(k1)]))
            .await
            .expect("commit");
        side.execute("DELETE FROM audit_token_upto WHERE chain = 'b'", [])
            .expect("delete a mark");
        assert_eq!(
            unfindable(&store, "b").await,
            Some(4),
            "an event not indexed yet, with no mark to scan past"
        );
        side.execute("INSERT INTO audit_token_upto VALUES ('b', 1)", [])
            .expect("move a mark back");
        assert_eq!(
            unfindable(&store, "b").await,
            None,
            "events past the mark are scanned"
        );
        both.push(("b".into(), 4));
        assert_eq!(
            found(&store, k1).await[2..],
            both[3..],
            "an event both indexed and past the mark is found once"
        );
        side.execute(
            "INSERT INTO audit_token_index VALUES (?1, 'a', 3)",
            [&k1[..]],
        )
        .expect("put the entry back");
        assert_eq!(unfindable(&store, "a").await, None);
        // A mark moved ahead of what is indexed, or given another type.
        store
            .commit(keyed_events("a", &[Some(k2)]))
            .await
            .expect("commit");
        assert_eq!(unfindable(&store, "a").await, None, "past the mark");
        for mark in ["9", "'zzz'", "x'00'"] {
            side.execute(
                &format!("UPDATE audit_token_upto SET upto = {mark} WHERE chain = 'a'"),
                [],
            )
            .expect("move a mark");
            assert_eq!(unfindable(&store, "a").await, Some(6), "mark {mark}");
        }
        side.execute(
            "UPDATE audit_token_upto SET upto = 5.5 WHERE chain = 'a'",
            [],
        )
        .expect("move a mark");
        assert_eq!(
            unfindable(&store, "a").await,
            None,
            "a real mark is a number"
        );
        // Neither a real mark nor a stray mark row of another type stops the
        // writer: the next batch takes the mark on, as an integer.
        side.execute("INSERT INTO audit_token_upto VALUES (x'61', 0)", [])
            .expect("a stray mark");
        store
            .commit(keyed_events("a", &[Some(k2), Some(k2), Some(k2)]))
            .await
            .expect("commit");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            store.commit(meta_batch("after")).await.expect("commit");
            let upto: rusqlite::types::Value = side
                .query_row(
                    "SELECT upto FROM audit_token_upto WHERE chain = 'a'",
                    [],
                    |r| r.get(0),
                )
                .expect("the mark");
            if upto == rusqlite::types::Value::Integer(9) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the mark stays {upto:?}"
            );
        }
        assert_eq!(unfindable(&store, "a").await, None);
        // Searches resume past a seq, past the mark as below it.
        let after = |chain: &str, after_seq: u64| AuditFilter {
            chain: chain.into(),
            after_seq,
            token: Some("ph_1".into()),
            token_key: Some(k1),
            ..Default::default()
        };
        let seqs = |v: Vec<StoredEvent>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(store.audit_query(after("a", 3), 10).await.expect("query")),
            vec![4]
        );
        assert_eq!(
            seqs(store.audit_query(after("b", 3), 10).await.expect("query")),
            vec![4]
        );
        store.close();
    }

    /// Indexing that fails (here a trigger refuses it) fails no commit and
    /// hides no event; it is tried again and then moves the mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_indexing_hides_nothing_and_is_tried_again() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let k1 = [1u8; 16];
        let store = SqliteStore::open_indexing_every(&db, 2).expect("open");
        let side = Connection::open(&db).expect("open a side connection");
        side.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_token_index
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .expect("a trigger");
        store
            .commit(keyed_events("a", &[Some(k1), Some(k1)]))
            .await
            .expect("the commit does not depend on the index");
        store.commit(meta_batch("after")).await.expect("commit");
        assert_eq!(index_of(&db), (vec![("a".into(), 0)], vec![]));
        assert_eq!(found(&store, k1).await, a(&[1, 2]));
        assert_eq!(unfindable(&store, "a").await, None);
        side.execute_batch("DROP TRIGGER refuse").expect("drop it");
        store
            .commit(keyed_events("a", &[Some(k1)]))
            .await
            .expect("commit");
        store.commit(meta_batch("after")).await.expect("commit");
        let (marks, entries) = index_of(&db);
        assert_eq!(marks, vec![("a".into(), 3)]);
        assert_eq!(entries.len(), 3);
        assert_eq!(found(&store, k1).await, a(&[1, 2, 3]));
        store.close();
    }

    /// A new database with the first `before` migrations run, as a build
    /// from before the others left it.
    fn schema_before(db: &Path, before: usize) -> Connection {
        let c = Connection::open(db).expect("create");
        for sql in &MIGRATIONS[..before] {
            c.execute_batch(sql).expect("an earlier migration");
        }
        c.pragma_update(None, "user_version", before as i64)
            .expect("set the version");
        c
    }

    /// A database from before the token index: the migration indexes every
    /// event that has a token key and sets each chain's mark at its head.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_migration_indexes_the_events_already_stored() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        // The token index, and the order tokens copied after it.
        let before = MIGRATIONS.len() - 2;
        {
            let c = schema_before(&db, before);
            for (chain, seq, key) in [
                ("a", 1, Some([1u8; 16])),
                ("a", 2, None),
                ("a", 3, Some([2u8; 16])),
                ("b", 1, Some([1u8; 16])),
            ] {
                c.execute(
                    "INSERT INTO audit_events (chain, seq, ts_ms, principal, action, decision, token, leaf, chain_hash, token_key)
                     VALUES (?1, ?2, 0, 'courier-1', 'reveal', 'allowed', ?3, x'00', x'00', ?4)",
                    params![chain, seq, key.map(|k| format!("ph_{}", k[0])), key.map(|k| k.to_vec())],
                )
                .expect("an event");
            }
        }
        let store = SqliteStore::open(&db).expect("open and migrate");
        let (marks, entries) = index_of(&db);
        assert_eq!(marks, vec![("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(
            entries,
            vec![(1, "a".into(), 1), (2, "a".into(), 3), (1, "b".into(), 1)]
        );
        assert_eq!(
            found(&store, [1u8; 16]).await,
            vec![("a".to_owned(), 1), ("b".to_owned(), 1)]
        );
        store.close();
    }

    /// A database whose events predate the `order_token` column: the
    /// migration copies each event's order token from its signed leaf, and
    /// leaves the other events and any column already set as they were.
    #[test]
    fn the_migration_copies_order_tokens_from_the_leaves() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let before = MIGRATIONS.len() - 1;
        let event = |order: Option<&str>| {
            let mut e = courier_reveal(Some("ph_1".into()));
            e.order_token = order.map(str::to_owned);
            e
        };
        {
            let c = schema_before(&db, before);
            for (seq, order, column) in [
                (1, Some("od_1"), None),
                (2, None, None),
                (3, Some("od_3"), Some("od_3")),
            ] {
                c.execute(
                    "INSERT INTO audit_events (chain, seq, ts_ms, principal, action, decision, token, leaf, chain_hash, order_token)
                     VALUES ('a', ?1, 0, 'courier-1', 'reveal', 'allowed', 'ph_1', ?2, x'00', ?3)",
                    params![seq as i64, audit::encode_leaf("a", seq, &event(order)), column],
                )
                .expect("an event");
            }
            // A leaf that names an order token but is not JSON, as the
            // vault never writes one: left alone, not a failed migration.
            c.execute(
                "INSERT INTO audit_events (chain, seq, ts_ms, principal, action, decision, token, leaf, chain_hash)
                 VALUES ('a', 4, 0, 'courier-1', 'reveal', 'allowed', 'ph_1', CAST('{\"order_token\"' AS BLOB), x'00')",
                [],
            )
            .expect("an event");
        }
        let store = SqliteStore::open(&db).expect("open and migrate");
        store.close();
        drop(store);
        let c = Connection::open(&db).expect("open");
        let columns: Vec<(i64, Option<String>)> = c
            .prepare("SELECT seq, order_token FROM audit_events ORDER BY seq")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            columns,
            vec![
                (1, Some("od_1".to_owned())),
                (2, None),
                (3, Some("od_3".to_owned())),
                (4, None)
            ]
        );
    }

    /// A batch larger than a chunk goes in over several transactions, with
    /// the marks moved by the last: until then an event both inserted and
    /// still past its mark is found once. (A trigger makes the third chunk
    /// fail, which holds the batch half inserted.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_goes_in_chunk_by_chunk_and_each_event_is_found_once() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let events = 3 * TOKEN_INDEX_CHUNK + 5;
        let store = SqliteStore::open_indexing_every(&db, events as u64).expect("open");
        // Sorted by key, seven keys in turn: the third chunk holds key 6.
        let keys: Vec<Option<TokenId>> = (0..events).map(|i| Some([(i % 7) as u8; 16])).collect();
        let side = Connection::open(&db).expect("open a side connection");
        side.execute_batch(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_token_index
             WHEN NEW.token_key = x'{}'
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
            "06".repeat(16)
        ))
        .expect("a trigger");
        store
            .commit(keyed_events("a", &keys))
            .await
            .expect("commit");
        // The chunks go in between this and later groups; the third fails.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let entries = loop {
            let (marks, entries) = index_of(&db);
            assert_eq!(
                marks,
                vec![("a".to_owned(), 0)],
                "the marks wait for the last chunk"
            );
            if entries.len() == 2 * TOKEN_INDEX_CHUNK {
                break entries;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "two chunks never went in"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let k3 = [3u8; 16];
        assert!(entries.iter().any(|(k, _, _)| *k == 3), "key 3 among them");
        let expected: Vec<(String, u64)> = (0..events)
            .filter(|i| i % 7 == 3)
            .map(|i| ("a".to_owned(), i as u64 + 1))
            .collect();
        assert_eq!(
            found(&store, k3).await,
            expected,
            "indexed and past the mark: once"
        );
        assert_eq!(unfindable(&store, "a").await, None);
        side.execute_batch("DROP TRIGGER refuse").expect("drop it");
        store.commit(meta_batch("again")).await.expect("commit");
        store.commit(meta_batch("after")).await.expect("commit");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (marks, entries) = index_of(&db);
            if marks == vec![("a".to_owned(), events as i64)] {
                assert_eq!(entries.len(), events, "every entry in");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the marks never moved"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(found(&store, k3).await, expected);
        store.close();
    }

    /// A tail longer than a batch may take (a rebuilt index) goes in over
    /// several batches, each moving the marks as far as it went.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_tail_goes_in_over_several_batches() {
        let dir = tempfile::tempdir().expect("scratch directory");
        let db = dir.path().join("vault.db");
        let indexing = TokenIndexing {
            batch: 2,
            idle: None,
            retry: std::time::Duration::ZERO,
            pass: 3,
            ..TokenIndexing::default()
        };
        let store = SqliteStore::open_with(
            &db,
            Box::new(|wal| wal.sync_data()),
            indexing,
            WAL_LIMIT_BYTES,
        )
        .expect("open");
        let k1 = [1u8; 16];
        store
            .commit(keyed_events("a", &[Some(k1); 7]))
            .await
            .expect("commit");
        // Each group lets the writer take the next batch.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let marks = loop {
            store.commit(meta_batch("next")).await.expect("commit");
            let (marks, _) = index_of(&db);
            if marks[0].1 >= 6 {
                break marks;
            }
            assert!(std::time::Instant::now() < deadline, "stuck at {marks:?}");
        };
        assert_eq!(
            marks,
            vec![("a".to_owned(), 6)],
            "three at a time, one left"
        );
        assert_eq!(index_of(&db).1.len(), 6);
        let all: Vec<(String, u64)> = (1..=7).map(|s| ("a".to_owned(), s)).collect();
        assert_eq!(found(&store, k1).await, all);
        assert_eq!(unfindable(&store, "a").await, None);
        store.close();
    }
}
