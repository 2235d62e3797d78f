//! Scale-out on PostgreSQL: several vault nodes over one real database
//! (a scratch database per test on the server named by
//! `ORDERVAULT_TEST_POSTGRES_URL`; skipped with one line without it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ordervault::engine::{EngineConfig, Principal};
use ordervault::setup::{self, Layout, SetupError, Storage};
use ordervault_sdk::FieldKind;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

use crate::support::{ScratchDb, Vault, sample_order};

fn node(chain: &str) -> EngineConfig {
    EngineConfig {
        chain: chain.into(),
        ..EngineConfig::default()
    }
}

fn admin() -> Principal {
    Principal {
        name: "admin".into(),
        role: "admin".into(),
    }
}

fn auditor() -> Principal {
    Principal {
        name: "auditor".into(),
        role: "auditor".into(),
    }
}

/// Two nodes on one fresh database; `None` when Postgres is not configured.
async fn two_nodes(one: EngineConfig, two: EngineConfig) -> Option<(Vault, Vault)> {
    let db = Arc::new(ScratchDb::create().await?);
    let a = Vault::start_pg(db.clone(), one).await;
    let b = Vault::start_pg_with_keys(db, two, Some(&a)).await;
    Some((a, b))
}

/// Polls `check` until it holds, for at most 10 s (shared state is re-read
/// every 2 s); panics with `what` otherwise. Twice a second: a failed
/// authentication each time must stay below the per-address throttle.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..20 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("not within 10 s: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_tokenize_concurrently_and_reveal_each_others_tokens() {
    let Some((a, b)) = two_nodes(node("node-a"), node("node-b")).await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let (on, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (shop, url) = (on.client("shop").await, other.url());
        let key = on.key("shop");
        tasks.push(tokio::spawn(async move {
            let tokens = shop
                .tokenize([
                    (FieldKind::OrderNumber, format!("SO-{i}")),
                    (FieldKind::OrderDetails, format!("item {i}")),
                    (FieldKind::Phone, "+86 138 1234 5678".to_owned()),
                ])
                .await
                .unwrap();
            // Revealed through the other node.
            let other = ordervault_sdk::Client::connect(url)
                .await
                .unwrap()
                .api_key(key);
            let shown = other
                .reveal(&tokens)
                .purpose("order_management")
                .await
                .unwrap();
            assert_eq!(shown[0].plain(), Some(format!("SO-{i}").as_str()));
            assert_eq!(shown[1].plain(), Some(format!("item {i}").as_str()));
            assert_eq!(shown[2].masked(), Some("138****5678"));
            tokens
        }));
    }
    let mut phones = std::collections::BTreeSet::new();
    for t in tasks {
        phones.insert(t.await.unwrap()[2].as_str().to_owned());
    }
    assert_eq!(
        phones.len(),
        1,
        "both nodes give the one deterministic token of a phone number"
    );
    assert_eq!(a.token_count().await, 40 * 2 + 1);

    // An order tokenized on one node is granted and revealed on the other.
    let order = a
        .client("shop")
        .await
        .tokenize_order(&sample_order(7))
        .await
        .unwrap();
    b.client("shop")
        .await
        .grant(
            "courier",
            &order.order_token,
            "delivery",
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let courier = a
        .client("courier")
        .await
        .reveal([&order.consignee.phone])
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(courier[0].plain(), Some("+8613910075678"));

    // Each node wrote its own chain; both verify, from either node.
    let chains = a.engine.chains().await.unwrap();
    assert_eq!(chains, ["node-a", "node-b"]);
    for vault in [&a, &b] {
        let reports = vault.engine.verify_log(&auditor()).await.unwrap();
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert!(r.failure.is_none(), "{}: {:?}", r.chain, r.failure);
            assert!(r.events > 40, "{}: {} events", r.chain, r.events);
        }
    }
    // An auditor's query through one node lists both nodes' events.
    let url = b.url();
    let key = b.key("auditor");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ordervault"))
            .args(["audit", "query", "--json", "--action", "tokenize", "--addr"])
            .arg(url)
            .env("ORDERVAULT_API_KEY", key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut per_chain = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (chain, _, _) = ordervault::audit::decode_leaf(line.as_bytes()).unwrap();
        *per_chain.entry(chain).or_insert(0) += 1;
    }
    assert_eq!(
        per_chain.into_iter().collect::<Vec<_>>(),
        [("node-a".to_owned(), 21), ("node-b".to_owned(), 20)],
        "20 tokenize calls through each node, and the order through a"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_a_node_id_in_use_is_refused() {
    let Some(db) = ScratchDb::create().await.map(Arc::new) else {
        return;
    };
    let a = Vault::start_pg(db.clone(), node("node-a")).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::with_storage(dir.path(), Storage::Postgres(db.url.clone()));
    for f in [setup::MASTER_KEY_FILE, setup::POLICY_FILE] {
        std::fs::copy(a.data_dir().join(f), dir.path().join(f)).unwrap();
    }
    let clock = Arc::new(ordervault::engine::SystemClock);
    let refused = setup::open(&layout, clock.clone(), node("node-a")).await;
    match refused {
        Err(e @ SetupError::NodeIdInUse { .. }) => {
            assert!(e.to_string().contains("give every node its own --node-id"));
        }
        Err(e) => panic!("expected NodeIdInUse, got {e}"),
        Ok(_) => panic!("a second node-a started"),
    }
    // Another id is fine; and once node-a stops, its id is free again.
    let (_, other) = setup::open(&layout, clock.clone(), node("node-b"))
        .await
        .unwrap();
    other.close().await;
    let keep = a.scratch.clone();
    a.stop().await;
    let (_, again) = setup::open(&layout, clock, node("node-a")).await.unwrap();
    again.close().await;
    drop(keep);
    Arc::into_inner(db).unwrap().drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_a_revocation_on_one_node_apply_on_the_other() {
    let Some((a, mut b)) = two_nodes(node("node-a"), node("node-b")).await else {
        return;
    };
    let key = b.add_principal("courier-9", "courier").await;
    let on_a = ordervault_sdk::Client::connect(a.url())
        .await
        .unwrap()
        .api_key(key);
    eventually("a principal created on b authenticates on a", || async {
        on_a.ping().await.is_ok()
    })
    .await;

    a.engine.rotate_key(&admin(), "").await.unwrap();
    let shop_b = b.client("shop").await;
    eventually("b encrypts under the version a rotated to", || async {
        shop_b
            .tokenize([(FieldKind::OrderDetails, "after rotation")])
            .await
            .unwrap();
        let per_version = b.store.ciphertexts_per_version().await.unwrap();
        per_version.iter().any(|(v, n)| *v == 2 && *n > 0)
    })
    .await;

    a.engine
        .revoke_principal(&admin(), "courier-9")
        .await
        .unwrap();
    eventually("a principal revoked on a is refused by b", || async {
        let on_b = ordervault_sdk::Client::connect(b.url())
            .await
            .unwrap()
            .api_key(b.key("courier-9"));
        on_b.ping().await.err().and_then(|e| e.code()) == Some(Code::Unauthenticated)
    })
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cap_holds_across_nodes() {
    let Some((a, b)) = two_nodes(node("node-a"), node("node-b")).await else {
        return;
    };
    // The policy is published through node a, and b enforces it too.
    let policy = format!(
        "{}\n[principals.shop]\ndaily_distinct_orders = 30\n",
        ordervault::policy::DEFAULT_POLICY
    );
    std::fs::write(a.data_dir().join(setup::POLICY_FILE), policy).unwrap();
    a.engine.reload_policy(&admin()).await.unwrap();
    b.engine.refresh_shared_state().await.unwrap();
    assert_eq!(a.engine.policy().hash_hex(), b.engine.policy().hash_hex());

    let shop = a.client("shop").await;
    let mut phones = Vec::new();
    for n in 0..60 {
        let t = shop
            .tokenize([(FieldKind::Phone, format!("+86 139 {:04} 5678", 1000 + n))])
            .await
            .unwrap();
        phones.push(t[0].clone());
    }
    let (on_a, on_b) = (a.client("shop").await, b.client("shop").await);
    let mut tasks = Vec::new();
    for (i, phone) in phones.into_iter().enumerate() {
        let client = if i % 2 == 0 {
            on_a.clone()
        } else {
            on_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            client.reveal([&phone]).purpose("order_management").await
        }));
    }
    let (mut shown, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(f) => {
                assert_eq!(f[0].masked().map(|m| &m[..3]), Some("139"));
                shown += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(e.to_string().contains("daily cap of 30"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(shown, 30, "exactly the cap, counted over both nodes");
    assert_eq!(refused, 30);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encryption_cap_of_a_key_holds_across_nodes() {
    // Blocks of 20 under a cap of 50: a gets 0..20, b 20..40, and the
    // last block is cut to 40..50.
    let capped = |chain: &str| EngineConfig {
        encryption_cap: 50,
        auto_rotate: false,
        reservation_block: 20,
        ..node(chain)
    };
    let Some((a, b)) = two_nodes(capped("node-a"), capped("node-b")).await else {
        return;
    };
    let (on_a, on_b) = (a.client("shop").await, b.client("shop").await);
    let mut done = [0, 0];
    for i in 0..120 {
        let client = if i % 2 == 0 { &on_a } else { &on_b };
        match client
            .tokenize([(FieldKind::OrderDetails, format!("item {i}"))])
            .await
        {
            Ok(_) => done[i % 2] += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
                assert!(e.to_string().contains("cap of 50 encryptions"), "{e}");
            }
        }
    }
    assert_eq!(
        done[0] + done[1],
        50,
        "50 encryptions under the key, over both nodes"
    );
    assert!(
        done[0] >= 20 && done[1] >= 20,
        "both nodes got blocks: {done:?}"
    );
    assert_eq!(a.token_count().await, 50);
    b.stop().await;
    a.stop().await;
}

/// A TCP proxy in front of the database that the test can cut: while it is
/// down every connection through it is closed and new ones are refused, as
/// when the database server restarts.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (flag, cuts) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_gives_unavailable_and_the_node_recovers_by_itself() {
    let Some(db) = ScratchDb::create().await else {
        return;
    };
    let config: tokio_postgres::Config = db.url.expose_secret().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => panic!("the test server must be reached over TCP"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start(format!("{host}:{port}")).await;
    let proxied = Arc::new(ScratchDb {
        base: db.base.clone(),
        url: SecretString::from(format!(
            "postgres://{}{}@127.0.0.1:{}/{}",
            config.get_user().unwrap_or("postgres"),
            config
                .get_password()
                .map(|p| format!(":{}", String::from_utf8_lossy(p)))
                .unwrap_or_default(),
            proxy.port,
            config.get_dbname().unwrap_or("postgres"),
        )),
    });
    let vault = Vault::start_pg(proxied.clone(), node("node-a")).await;
    let shop = vault.client("shop").await;
    let before = shop
        .tokenize([(FieldKind::OrderDetails, "kept across the outage")])
        .await
        .unwrap();

    // Under load, the database goes away.
    let load = {
        let shop = shop.clone();
        tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::new();
            for i in 0..200 {
                let r = shop
                    .tokenize([(FieldKind::OrderDetails, format!("during {i}"))])
                    .await;
                *codes
                    .entry(r.err().and_then(|e| e.code()).map(|c| format!("{c:?}")))
                    .or_insert(0) += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            codes
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.down();
    for _ in 0..5 {
        let err = shop
            .reveal(&before)
            .purpose("order_management")
            .await
            .expect_err("no database, no reveal");
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert!(!err.to_string().contains("kept across"), "{err}");
        let err = shop
            .tokenize([(FieldKind::OrderDetails, "while down")])
            .await
            .expect_err("no database, no token");
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.up();
    let codes = load.await.unwrap();
    for code in codes.keys() {
        assert!(
            code.is_none() || code.as_deref() == Some("Unavailable"),
            "only successes and UNAVAILABLE under the outage: {codes:?}"
        );
    }

    // Back: the node reconnects by itself and answers right.
    eventually("the node serves again", || async {
        shop.reveal(&before)
            .purpose("order_management")
            .await
            .is_ok()
    })
    .await;
    let shown = shop
        .reveal(&before)
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(shown[0].plain(), Some("kept across the outage"));
    let after = shop
        .tokenize([(FieldKind::OrderDetails, "after the outage")])
        .await
        .unwrap();
    let shown = shop
        .reveal(&after)
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(shown[0].plain(), Some("after the outage"));
    let reports = vault.engine.verify_log(&auditor()).await.unwrap();
    for r in &reports {
        assert!(r.failure.is_none(), "{}: {:?}", r.chain, r.failure);
    }
    vault.stop().await;
    drop(proxied);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_apply_each_migration_once() {
    let Some(db) = ScratchDb::create().await else {
        return;
    };
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        starts.push(tokio::spawn(async move {
            ordervault::store::postgres::PostgresStore::connect(&url).await
        }));
    }
    for s in starts {
        let store = s.await.unwrap().expect("every node starts");
        ordervault::store::Store::close(&store).await;
    }
    let rows = db
        .sql()
        .await
        .query("SELECT version FROM ordervault_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].get::<_, i32>(0) >= 1);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_database_cannot_take_is_the_callers_mistake() {
    let Some(vault) = Vault::start_on(crate::support::Backend::Postgres).await else {
        return;
    };
    // PostgreSQL text cannot hold NUL: a query for such a principal is a bad
    // argument, not an unavailable database.
    let q = ordervault::auditor::Query {
        indexed: ordervault::store::AuditFilter {
            chain: "node-1".into(),
            principal: Some("courier\0-7".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = vault
        .engine
        .query_audit(&auditor(), &q, 10)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, ordervault::error::VaultError::InvalidArgument(_)),
        "{err:?}"
    );
    // The node is unharmed.
    let shop = vault.client("shop").await;
    shop.tokenize([(FieldKind::OrderDetails, "after a bad query")])
        .await
        .unwrap();
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_reserve_disjoint_blocks_up_to_the_cap() {
    use ordervault::store::postgres::PostgresStore;
    use ordervault::store::{Reservation, Store, StoredKey, WriteBatch};
    let Some(db) = ScratchDb::create().await else {
        return;
    };
    let one: Arc<dyn Store> = Arc::new(PostgresStore::connect(&db.url).await.unwrap());
    let two: Arc<dyn Store> = Arc::new(PostgresStore::connect(&db.url).await.unwrap());
    one.commit(WriteBatch {
        keys: vec![StoredKey {
            version: 1,
            algorithm: 1,
            wrapped: Some(vec![7; 60]),
            state: "primary".into(),
            created_ms: 0,
            reserved: 0,
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    // 2 × 16 concurrent reservations of 7 under a cap of 100, through two
    // writers on two connections.
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .commit(WriteBatch {
                    reserve: vec![Reservation {
                        version: 1,
                        count: 7,
                        cap: 100,
                    }],
                    ..Default::default()
                })
                .await
                .unwrap()
                .reserved[0]
        }));
    }
    let mut blocks = Vec::new();
    for t in tasks {
        let (old, new) = t.await.unwrap();
        if new > old {
            blocks.push((old, new));
        }
    }
    blocks.sort_unstable();
    let mut at = 0;
    for (old, new) in &blocks {
        assert_eq!(*old, at, "blocks are disjoint and leave no gap: {blocks:?}");
        at = *new;
    }
    assert_eq!(at, 100, "exactly the cap is handed out: {blocks:?}");
    one.close().await;
    two.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_is_shared_out_among_the_nodes() {
    let Some((a, b)) = two_nodes(node("node-a"), node("node-b")).await else {
        return;
    };
    let policy = format!(
        "{}\n[principals.shop]\nrate = \"10/min\"\n",
        ordervault::policy::DEFAULT_POLICY
    );
    std::fs::write(a.data_dir().join(setup::POLICY_FILE), policy).unwrap();
    a.engine.reload_policy(&admin()).await.unwrap();
    // Each node counts the running nodes when it refreshes (every 2 s).
    a.engine.refresh_shared_state().await.unwrap();
    b.engine.refresh_shared_state().await.unwrap();

    let phone = a
        .client("shop")
        .await
        .tokenize([(FieldKind::Phone, "+86 139 0000 1234")])
        .await
        .unwrap();
    let (on_a, on_b) = (a.client("shop").await, b.client("shop").await);
    let (mut shown, mut refused) = (0, 0);
    for i in 0..20 {
        let client = if i % 2 == 0 { &on_a } else { &on_b };
        match client.reveal(&phone).purpose("order_management").await {
            Ok(_) => shown += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(
                    e.to_string()
                        .contains("reveal rate of 10/min (5/min on each of 2 nodes)"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(shown, 10, "the policy's 10 per minute, over both nodes");
    assert_eq!(refused, 10);
    b.stop().await;
    a.stop().await;
}
