//! Tests that run the real `ordervault` binary: durability across SIGKILL,
//! logs at TRACE level, the data-directory checks, and offline verification.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ordervault_sdk::{Client, FieldKind};

use crate::support::{Vault, sample_order};

const BIN: &str = env!("CARGO_BIN_EXE_ordervault");

/// A running `ordervault serve` process.
struct Served {
    child: Child,
    url: String,
    /// Lines printed on stdout before "listening" (keys on a --dev first start).
    banner: Vec<String>,
}

impl Served {
    /// The child is owned by the returned `Served`, which waits for it in
    /// `kill9`, `terminate` or `Drop`.
    #[allow(clippy::zombie_processes)]
    /// Starts `ordervault serve` on 127.0.0.1:0 and waits for its
    /// "listening on" line (no sleeping). stderr goes to `log`.
    fn start(data_dir: &Path, dev: bool, log: &Path, env: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"]);
        if dev {
            cmd.arg("--dev");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env_remove("ORDERVAULT_MASTER_KEY");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut banner = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!(
                    "ordervault exited ({status}) before listening: {banner:?}\n{}",
                    std::fs::read_to_string(log).unwrap()
                );
            }
            if let Some(addr) = line.trim().strip_prefix("ordervault: listening on ") {
                let url = format!("http://{addr}");
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                        sink.clear();
                    }
                });
                return Served { child, url, banner };
            }
            banner.push(line.trim_end().to_owned());
        }
    }

    /// The API key printed for `role` on a --dev first start.
    fn key(&self, role: &str) -> String {
        self.banner
            .iter()
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(role)).then(|| parts.next().unwrap().to_owned())
            })
            .unwrap_or_else(|| panic!("no key for {role} in {:?}", self.banner))
    }

    async fn client(&self, key: &str) -> Client {
        Client::connect(self.url.clone())
            .await
            .unwrap()
            .api_key(key)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed test must not leave a server running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn temp() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    (dir, data, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_tokenize_survives_sigkill() {
    let (_dir, data, log) = temp();
    let first = Served::start(&data, true, &log, &[]);
    let (shop_key, courier_key) = (first.key("shop"), first.key("courier"));
    let shop = first.client(&shop_key).await;
    let tokens = shop
        .tokenize([(FieldKind::Phone, "+86 186 0000 4321")])
        .await
        .unwrap();
    let order = shop.tokenize_order(&sample_order(7)).await.unwrap();
    shop.grant(
        "courier",
        &order.order_token,
        "delivery",
        std::time::Duration::from_secs(3600),
    )
    .await
    .unwrap();
    // Killed right after the replies: no shutdown, no flush.
    first.kill9();

    let second = Served::start(&data, false, &log, &[]);
    assert!(
        second.banner.is_empty(),
        "a second start prints no keys: {:?}",
        second.banner
    );
    let courier = second.client(&courier_key).await;
    let revealed = courier
        .reveal([&order.consignee.phone, &order.consignee.address])
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(revealed[0].plain(), Some("+8613910075678"));
    assert_eq!(revealed[1].plain(), Some("浙江省杭州市西湖区文三路107号"));
    let shop = second.client(&shop_key).await;
    let bare = shop
        .reveal(&tokens)
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(bare[0].masked(), Some("186****4321"));
    second.terminate();

    // The log written across the crash still verifies.
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("events verified"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_value_key_or_api_key() {
    let (_dir, data, log) = temp();
    let first = Served::start(&data, true, &log, &[]);
    let keys: Vec<(String, String)> =
        ["shop", "courier", "supplier", "support", "auditor", "admin"]
            .iter()
            .map(|r| (r.to_string(), first.key(r)))
            .collect();
    first.terminate();
    let master_hex = std::fs::read_to_string(data.join("master.key"))
        .unwrap()
        .trim()
        .to_owned();

    // Everything from here on is logged at TRACE, including the libraries.
    let trace_log = data.parent().unwrap().join("trace.log");
    let served = Served::start(&data, false, &trace_log, &[("ORDERVAULT_LOG", "trace")]);
    let key = |r: &str| keys.iter().find(|(role, _)| role == r).unwrap().1.clone();
    let order = served
        .client(&key("shop"))
        .await
        .tokenize_order(&sample_order(42))
        .await
        .unwrap();
    let shop = served.client(&key("shop")).await;
    let hour = std::time::Duration::from_secs(3600);
    shop.grant("courier", &order.order_token, "delivery", hour)
        .await
        .unwrap();
    shop.grant("support", &order.order_token, "customer_support", hour)
        .await
        .unwrap();
    for (role, purpose) in [
        ("courier", "delivery"),
        ("supplier", "fulfilment"),
        ("support", "customer_support"),
    ] {
        served
            .client(&key(role))
            .await
            .reveal(order.all_tokens())
            .purpose(purpose)
            .await
            .unwrap();
    }
    let wrong_key = "ovk_thisisnotarealkeybutlookslikeonexxxxxxxxxxxxxxxxxxxxxxx";
    let err = served
        .client(wrong_key)
        .await
        .tokenize([(FieldKind::Name, "王秘密")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated));
    let err = served
        .client(&key("shop"))
        .await
        .tokenize([(FieldKind::Phone, "秘密电话 13700001111")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    served.terminate();

    let logged = std::fs::read_to_string(&trace_log).unwrap();
    assert!(
        logged.lines().count() > 50,
        "TRACE logging was on: {} lines",
        logged.lines().count()
    );
    assert!(logged.contains("TRACE"), "library TRACE lines are included");
    let mut secrets: Vec<String> = vec![
        master_hex.clone(),
        master_hex.to_uppercase(),
        wrong_key.into(),
        "王秘密".into(),
        "13700001111".into(),
        "张小明".into(),
        "+8613910425678".into(),
        "13910425678".into(),
        "139 1042 5678".into(),
        "文三路142号".into(),
        "11010519491231002X".into(),
        "zxm42@example.com".into(),
        "SO20261122000042".into(),
        "cust-000042".into(),
        "无线蓝牙耳机".into(),
        "Silicone case".into(),
        "199.00".into(),
        "2026-11-18T11:06:40Z".into(),
    ];
    secrets.extend(keys.iter().map(|(_, k)| k.clone()));
    // Also the API keys' secret part alone, in case a prefix was stripped.
    secrets.extend(
        keys.iter()
            .map(|(_, k)| k.trim_start_matches("ovk_").to_owned()),
    );
    for s in &secrets {
        assert!(
            !logged.contains(s.as_str()),
            "the TRACE log contains a secret ({} chars)",
            s.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_and_its_wal_hold_no_plaintext() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let mut values = Vec::new();
    for n in 0..20 {
        let o = sample_order(500 + n);
        shop.tokenize_order(&o).await.unwrap();
        let c = &o.consignee;
        values.extend([
            o.order_number.clone(),
            o.customer_id.clone().unwrap(),
            c.phone.clone(),
            c.phone.replace([' ', '+'], ""),
            format!("+86{}", c.phone.replace(' ', "").trim_start_matches("+86")),
            c.address.clone(),
            c.email.clone().unwrap(),
        ]);
    }
    values.extend(
        [
            "张小明",
            "11010519491231002X",
            "无线蓝牙耳机 Pro",
            "Silicone case, midnight blue",
            "199.00",
            "29.90",
        ]
        .map(String::from),
    );
    let wal = vault.data_dir().join("vault.db-wal");
    assert!(wal.exists(), "WAL mode is on");
    for file in [vault.db_path(), wal] {
        let bytes = std::fs::read(&file).unwrap();
        assert!(bytes.len() > 4096);
        for v in &values {
            let found = bytes.windows(v.len()).any(|w| w == v.as_bytes());
            assert!(!found, "{} contains a plaintext value", file.display());
        }
    }
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_verify_names_an_edited_event() {
    let vault = Vault::start().await;
    let order = vault
        .client("shop")
        .await
        .tokenize_order(&sample_order(3))
        .await
        .unwrap();
    vault
        .client("shop")
        .await
        .grant(
            "courier",
            &order.order_token,
            "delivery",
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    vault
        .client("courier")
        .await
        .reveal(order.all_tokens())
        .purpose("delivery")
        .await
        .unwrap();
    let data = vault.data_dir();
    let sql = vault.sql();
    let _dir = vault.stop().await;

    let verify = || {
        Command::new(BIN)
            .args(["audit", "verify", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // An insider rewrites who revealed the phone: courier → supplier.
    let seq: i64 = sql
        .query_row(
            "SELECT seq FROM audit_events WHERE token = ?1 AND principal = 'courier'",
            [order.consignee.phone.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    sql.execute(
        "UPDATE audit_events SET leaf = CAST(replace(CAST(leaf AS TEXT), '\"principal\":\"courier\"', '\"principal\":\"supplier\"') AS BLOB), principal = 'supplier' WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    let bad = verify();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!("fails verification at seq {seq}:")),
        "{stderr}"
    );
    assert!(stderr.contains("chain hash mismatch"), "{stderr}");

    // Deleting an event is named too.
    sql.execute("DELETE FROM audit_events WHERE seq = ?1", [seq - 1])
        .unwrap();
    let bad = verify();
    assert!(String::from_utf8_lossy(&bad.stderr).contains(&format!("at seq {}:", seq - 1)));
}

#[test]
fn serve_refuses_uninitialised_and_half_initialised_dirs() {
    let (_dir, data, _log) = temp();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not an initialised vault: run `ordervault init"),
        "{stderr}"
    );

    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("master.key"), "00").unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--dev")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("half-finished initialisation (found master.key)"),
        "{stderr}"
    );

    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "usage errors exit 64");
}

#[test]
fn init_creates_an_owner_only_vault_once() {
    let (_dir, data, _log) = temp();
    let out = Command::new(BIN)
        .arg("init")
        .arg("--data-dir")
        .arg(&data)
        .env_remove("ORDERVAULT_MASTER_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("admin     ovk_"), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("master.key")), 0o600);
    assert_eq!(mode(&data.join("vault.db")), 0o600);
    assert_eq!(mode(&data), 0o700);
    let again = Command::new(BIN)
        .arg("init")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds an initialised vault"));
}

/// `ordervault bench` in a short mode, so it cannot rot. Its figures are
/// not asserted (they belong in docs/benchmarks.md), only that it runs
/// every case against a real vault, in two rounds, and reports each.
#[test]
fn bench_runs_in_short_mode() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--concurrency",
            "1,4",
            "--preload",
            "3000",
            "--rounds",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Seven cases at two concurrency levels, in each of two rounds, and the
    // median of each pair.
    let rows = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
    assert_eq!(report["rounds"], 2);
    assert_eq!(rows(&report["results"]), 14, "{report}");
    let rounds = report["each_round"]
        .as_array()
        .expect("every round is kept");
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| rows(r) == 14), "{report}");
    // Each row counts the tokens stored when its case began: the preload
    // and more, never fewer later on, and more after the cases that
    // tokenize (round 1's reveal at concurrency 1 comes after all three).
    let stored = |round: &serde_json::Value, i: usize| {
        round[i]["stored_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("row {i} has no stored_tokens: {round}"))
    };
    let mut counts = Vec::new();
    for round in rounds {
        for i in 0..14 {
            counts.push(stored(round, i));
        }
    }
    assert!(counts[0] >= 3000, "fewer than the preload: {counts:?}");
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "the count went down: {counts:?}"
    );
    let reveal_row = rounds[0]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["case"] == "reveal" && r["concurrency"] == 1)
        .unwrap();
    assert!(
        counts[reveal_row] > counts[0],
        "tokenizing stored nothing: {counts:?}"
    );
    assert!(
        stderr.contains("round 2/2: reveal_granted at concurrency 4"),
        "the progress line names the round: {stderr}"
    );
    assert!(
        stderr.contains("granting them to support for reveal_granted"),
        "the grant set-up is announced: {stderr}"
    );
    let text = report.to_string();
    for case in [
        "ping",
        "tokenize",
        "tokenize_order",
        "tokenize_100",
        "reveal",
        "reveal_100",
        "reveal_granted",
    ] {
        assert!(
            text.contains(&format!("\"{case}\"")),
            "{case} missing from {text}"
        );
    }
}

/// The scratch database's URL with a password added: trust authentication
/// ignores it, so the test can check it is never printed or logged.
fn with_password(url: &str, password: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => panic!("the test server must be reached over TCP"),
    };
    format!(
        "postgres://{}:{password}@{host}:{}/{}",
        config.get_user().unwrap_or("postgres"),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_nodes_on_postgres_share_data_refuse_a_duplicate_id_and_survive_sigkill() {
    use secrecy::ExposeSecret;
    let Some(db) = crate::support::ScratchDb::create().await else {
        return;
    };
    // The server's real password when it needs one; otherwise (trust
    // authentication ignores it) a made-up one. Either must never show.
    let given: tokio_postgres::Config = db.url.expose_secret().parse().unwrap();
    let (url, password) = match given.get_password() {
        Some(p) => (
            db.url.expose_secret().to_owned(),
            String::from_utf8(p.to_vec()).unwrap(),
        ),
        None => {
            let made_up = "pw-never-shown-4921".to_owned();
            (with_password(db.url.expose_secret(), &made_up), made_up)
        }
    };
    let (dir, data1, log) = temp();
    let data2 = dir.path().join("data2");
    let env1 = [
        ("ORDERVAULT_STORAGE_URL", url.as_str()),
        ("ORDERVAULT_NODE_ID", "node-1"),
    ];
    let first = Served::start(&data1, true, &log, &env1);
    assert!(
        !data1.join("vault.db").exists(),
        "on PostgreSQL the data directory holds no database"
    );
    let (shop_key, courier_key) = (first.key("shop"), first.key("courier"));
    let shop = first.client(&shop_key).await;
    let order = shop.tokenize_order(&sample_order(9)).await.unwrap();
    shop.grant(
        "courier",
        &order.order_token,
        "delivery",
        std::time::Duration::from_secs(3600),
    )
    .await
    .unwrap();
    // Killed right after the replies: what was acknowledged is in PostgreSQL.
    first.kill9();

    // A second node: a copy of the data directory, its own node id.
    std::fs::create_dir_all(&data2).unwrap();
    for f in ["master.key", "policy.toml"] {
        std::fs::copy(data1.join(f), data2.join(f)).unwrap();
    }
    let env2 = [
        ("ORDERVAULT_STORAGE_URL", url.as_str()),
        ("ORDERVAULT_NODE_ID", "node-2"),
    ];
    let second = Served::start(&data2, false, &log, &env2);
    let courier = second.client(&courier_key).await;
    let revealed = courier
        .reveal([&order.consignee.phone])
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(revealed[0].plain(), Some("+8613910095678"));

    // A third process claiming node-2 while it runs is refused.
    let dup = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data1)
        .envs(env2)
        .env_remove("ORDERVAULT_MASTER_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert_eq!(dup.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("node id \"node-2\" is in use"), "{stderr}");
    second.terminate();

    // Offline verification covers both nodes' chains.
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data2)
        .env("ORDERVAULT_STORAGE_URL", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audit chain node-1:"), "{stdout}");
    assert!(stdout.contains("audit chain node-2:"), "{stdout}");

    let logged = std::fs::read_to_string(&log).unwrap();
    for text in [&logged, &stderr.to_string(), &stdout.to_string()] {
        assert!(!text.contains(&password), "the database password leaked");
    }
    db.drop_db().await;
}

#[test]
fn bench_runs_on_two_postgres_nodes_in_short_mode() {
    use secrecy::ExposeSecret;
    let Some(url) = crate::support::postgres_url() else {
        return;
    };
    let out = Command::new(BIN)
        .args([
            "bench",
            "--store",
            "postgres",
            "--nodes",
            "2",
            "--connections",
            "2",
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--concurrency",
            "4",
            "--cases",
            "ping,tokenize,reveal_100,reveal_granted",
            "--json",
        ])
        .env("ORDERVAULT_STORAGE_URL", url.expose_secret())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["store"], "postgres");
    assert_eq!(report["nodes"], 2);
    let results = report["results"].as_array().unwrap();
    // reveal_granted runs only once both nodes enforce support's grants,
    // published through the shared database.
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r["calls"].as_u64().unwrap() > 0));
}
