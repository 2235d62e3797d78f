//! Test harness: start a vault, get clients per role, reach into its files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ordervault::engine::{Clock, Engine, EngineConfig, Principal, SystemClock};
use ordervault::setup::{self, DEMO_ROLES, Layout};
use ordervault::store::Store;
use ordervault::store::sqlite::SqliteStore;
use ordervault_sdk::{Client, Consignee, LineItem, Order};
use secrecy::ExposeSecret;
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

/// A running vault on loopback.
pub struct Vault {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub keys: HashMap<String, String>,
    pub engine: Arc<Engine>,
    pub store: Arc<SqliteStore>,
    pub clock: Arc<TestClock>,
    config: EngineConfig,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Vault {
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
            config,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the server and starts a new one on the same data directory,
    /// as a process restart would (in-memory state is gone).
    pub async fn restart(self) -> Vault {
        let (keys, clock, config) = (self.keys.clone(), self.clock.clone(), self.config.clone());
        let dir = self.stop().await;
        Vault::serve(dir, keys, clock, config).await
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
    /// directory so the caller can keep inspecting the files.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.unwrap();
        }
        self.store.close();
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
