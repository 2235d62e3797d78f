//! Test harness: start a vault, get clients per role, reach into its files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ordervault::engine::{Clock, Engine, EngineConfig, Principal, SystemClock};
use ordervault::setup::{self, DEMO_ROLES, Layout, Storage};
use ordervault::store::Store;
use ordervault::store::postgres;
use ordervault_sdk::{Client, Consignee, LineItem, Order};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

/// A clock the tests move by hand; starts at the real time.
#[derive(Debug)]
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Environment variable naming a PostgreSQL server for the tests.
pub const POSTGRES_ENV: &str = "ORDERVAULT_TEST_POSTGRES_URL";

/// The PostgreSQL server the tests may use, or `None` (after saying how to
/// enable them) when none is configured.
pub fn postgres_url() -> Option<SecretString> {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => Some(SecretString::from(url)),
        _ => {
            eprintln!(
                "skipped: PostgreSQL tests need {POSTGRES_ENV}=postgres://postgres@127.0.0.1:5432/postgres (any database; each test creates its own)"
            );
            None
        }
    }
}

/// A database of its own for one test, dropped when the test stops it.
pub struct ScratchDb {
    pub base: SecretString,
    pub url: SecretString,
}

impl ScratchDb {
    /// A fresh database on the configured server, or `None` when there is
    /// no server configured.
    pub async fn create() -> Option<ScratchDb> {
        let base = postgres_url()?;
        let url = postgres::create_scratch_database(&base).await.unwrap();
        Some(ScratchDb { base, url })
    }

    /// A side connection, as a test or an attacker would open one.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(self.url.expose_secret(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
    }

    pub async fn drop_db(self) {
        postgres::drop_scratch_database(&self.base, &self.url)
            .await
            .unwrap();
    }
}

/// Which store a test's vault runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running vault on loopback.
pub struct Vault {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub keys: HashMap<String, String>,
    pub engine: Arc<Engine>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<TestClock>,
    pub scratch: Option<Arc<ScratchDb>>,
    config: EngineConfig,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Vault {
    /// A fresh vault on `backend`; `None` when PostgreSQL is asked for and
    /// not configured (the test then skips).
    pub async fn start_on(backend: Backend) -> Option<Vault> {
        match backend {
            Backend::Sqlite => Some(Vault::start().await),
            Backend::Postgres => {
                let scratch = Arc::new(ScratchDb::create().await?);
                Some(Vault::start_pg(scratch, EngineConfig::default()).await)
            }
        }
    }

    /// A node on a PostgreSQL database, initialising it if it is empty. Nodes
    /// started on the same database share its keys, principals and policy;
    /// each needs its own `config.chain`.
    pub async fn start_pg(scratch: Arc<ScratchDb>, config: EngineConfig) -> Vault {
        Vault::start_pg_with_keys(scratch, config, None).await
    }

    /// Like `start_pg`; a later node reuses the first node's master key and
    /// API keys (`first`).
    pub async fn start_pg_with_keys(
        scratch: Arc<ScratchDb>,
        config: EngineConfig,
        first: Option<&Vault>,
    ) -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::Postgres(scratch.url.clone());
        let layout = Layout::with_storage(dir.path().join("data"), storage);
        let keys = match first {
            None => {
                let created = setup::init(&layout, &DEMO_ROLES, &config.chain, &SystemClock)
                    .await
                    .unwrap();
                created
                    .iter()
                    .map(|p| (p.name.clone(), p.api_key.expose_secret().to_owned()))
                    .collect()
            }
            Some(first) => {
                // A second node: the same master key and policy file.
                std::fs::create_dir_all(layout.dir.clone()).unwrap();
                for f in [setup::MASTER_KEY_FILE, setup::POLICY_FILE] {
                    std::fs::copy(first.data_dir().join(f), layout.dir.join(f)).unwrap();
                }
                first.keys.clone()
            }
        };
        let clock = Arc::new(TestClock(AtomicI64::new(SystemClock.now_ms())));
        let mut vault = Vault::serve_layout(dir, layout, keys, clock, config).await;
        vault.scratch = Some(scratch);
        vault
    }

    /// Initialises a fresh data dir with the demo principals and serves it.
    pub async fn start() -> Vault {
        Vault::start_with(EngineConfig::default()).await
    }

    pub async fn start_with(config: EngineConfig) -> Vault {
        Vault::start_custom(config, None).await
    }

    /// Like `start_with`, with `policy` written over the default policy file.
    pub async fn start_custom(config: EngineConfig, policy: Option<&str>) -> Vault {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("data"));
        let created = setup::init(&layout, &DEMO_ROLES, &config.chain, &SystemClock)
            .await
            .unwrap();
        if let Some(text) = policy {
            std::fs::write(layout.policy(), text).unwrap();
        }
        let keys = created
            .iter()
            .map(|p| (p.name.clone(), p.api_key.expose_secret().to_owned()))
            .collect();
        let clock = Arc::new(TestClock(AtomicI64::new(SystemClock.now_ms())));
        Vault::serve(dir, keys, clock, config).await
    }

    async fn serve(
        dir: tempfile::TempDir,
        keys: HashMap<String, String>,
        clock: Arc<TestClock>,
        config: EngineConfig,
    ) -> Vault {
        let layout = Layout::new(dir.path().join("data"));
        Vault::serve_layout(dir, layout, keys, clock, config).await
    }

    async fn serve_layout(
        dir: tempfile::TempDir,
        layout: Layout,
        keys: HashMap<String, String>,
        clock: Arc<TestClock>,
        config: EngineConfig,
    ) -> Vault {
        let (engine, store) = setup::open(&layout, clock.clone(), config.clone())
            .await
            .unwrap();
        // Bind first, then spawn: no sleeping while the server starts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let engine = engine.clone();
            async move {
                ordervault::server::serve(engine, listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Vault {
            dir,
            addr,
            keys,
            engine,
            store,
            clock,
            scratch: None,
            config,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the server and starts a new one on the same data directory,
    /// as a process restart would (in-memory state is gone).
    pub async fn restart(mut self) -> Vault {
        let (keys, clock, config) = (self.keys.clone(), self.clock.clone(), self.config.clone());
        let scratch = self.scratch.take();
        let layout = self.layout();
        let dir = self.stop().await;
        let mut vault = Vault::serve_layout(dir, layout, keys, clock, config).await;
        vault.scratch = scratch;
        vault
    }

    /// Where this vault lives.
    pub fn layout(&self) -> Layout {
        match &self.scratch {
            Some(s) => Layout::with_storage(self.data_dir(), Storage::Postgres(s.url.clone())),
            None => Layout::new(self.data_dir()),
        }
    }

    /// Makes every audit write fail, as a full disk or a broken database
    /// would; `mend_audit` undoes it.
    pub async fn break_audit(&self) {
        match &self.scratch {
            None => self
                .sql()
                .execute_batch(
                    "CREATE TRIGGER no_audit BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit log unavailable'); END;",
                )
                .unwrap(),
            Some(db) => db
                .sql()
                .await
                .batch_execute(
                    "CREATE FUNCTION no_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit log unavailable'; END $$ LANGUAGE plpgsql;
                     CREATE TRIGGER no_audit BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION no_audit();",
                )
                .await
                .unwrap(),
        }
    }

    /// Undoes `break_audit`.
    pub async fn mend_audit(&self) {
        match &self.scratch {
            None => self.sql().execute_batch("DROP TRIGGER no_audit").unwrap(),
            Some(db) => db
                .sql()
                .await
                .batch_execute("DROP TRIGGER no_audit ON audit_events; DROP FUNCTION no_audit();")
                .await
                .unwrap(),
        }
    }

    /// Creates a principal through the engine, as the admin would; returns its key.
    pub async fn add_principal(&mut self, name: &str, role: &str) -> String {
        let admin = Principal {
            name: "admin".into(),
            role: "admin".into(),
        };
        let (_, key) = self
            .engine
            .create_principal(&admin, name, role)
            .await
            .unwrap();
        let key = key.expose_secret().to_owned();
        self.keys.insert(name.to_owned(), key.clone());
        key
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn key(&self, role: &str) -> String {
        self.keys[role].clone()
    }

    /// An SDK client authenticated as the demo principal of `role`.
    pub async fn client(&self, role: &str) -> Client {
        Client::connect(self.url())
            .await
            .unwrap()
            .api_key(self.key(role))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("vault.db")
    }

    /// A side connection to the database, as an attacker or a test would open it.
    pub fn sql(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.db_path()).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c
    }

    pub async fn token_count(&self) -> u64 {
        self.store.token_count().await.unwrap()
    }

    /// All audit events of the node's chain, decoded.
    pub async fn audit(&self) -> Vec<ordervault::audit::AuditEvent> {
        let rows = self
            .store
            .audit_events(self.engine.chain(), 1, 1_000_000)
            .await
            .unwrap();
        rows.iter()
            .map(|r| ordervault::audit::decode_leaf(&r.leaf).unwrap().2)
            .collect()
    }

    /// Verifies the whole chain; Ok(count) or the first bad seq.
    pub async fn verify(&self) -> Result<u64, ordervault::audit::VerifyError> {
        let rows = self
            .store
            .audit_events(self.engine.chain(), 1, 1_000_000)
            .await
            .unwrap();
        let mut v = ordervault::audit::Verifier::default();
        for r in &rows {
            v.check(r)?;
        }
        Ok(v.verified())
    }

    /// Stops the server and closes the store; returns the temporary
    /// directory so the caller can keep inspecting the files. The last node
    /// of a scratch PostgreSQL database drops it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.unwrap();
        }
        self.store.close().await;
        if let Some(db) = self.scratch.take().and_then(Arc::into_inner) {
            db.drop_db().await;
        }
        self.dir
    }

    /// Stored alerts, oldest first.
    pub async fn alerts(&self) -> Vec<ordervault::store::AlertRecord> {
        self.store.alerts(0, 100_000).await.unwrap()
    }
}

/// The order every story uses; values are distinctive so scans can find them.
pub fn sample_order(n: u32) -> Order {
    Order {
        order_number: format!("SO2026112200{n:04}"),
        customer_id: Some(format!("cust-{n:06}")),
        consignee: Consignee {
            name: "张小明".into(),
            phone: format!("+86 139 {:04} {:04}", 1000 + n % 9000, 5678),
            address: format!("浙江省杭州市西湖区文三路{}号", 100 + n),
            id_number: Some("11010519491231002X".into()),
            email: Some(format!("zxm{n}@example.com")),
        },
        items: vec![
            LineItem {
                sku: "SKU-EAR-PRO".into(),
                title: "无线蓝牙耳机 Pro".into(),
                quantity: 1,
                unit_price: "199.00".into(),
                currency: "CNY".into(),
            },
            LineItem {
                sku: "SKU-CASE".into(),
                title: "Silicone case, midnight blue".into(),
                quantity: 2,
                unit_price: "29.90".into(),
                currency: "CNY".into(),
            },
        ],
        placed_at: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000)),
    }
}
