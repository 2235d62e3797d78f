//! The operator's side: key rotation, rewrap and retirement under live
//! traffic, rewrap resumed after a crash, master-key rotation, the AES-GCM
//! usage cap, and the `ordervault` subcommands run as a real binary against
//! a real server, with their output pinned.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ordervault::audit::{Action, Decision};
use ordervault::engine::EngineConfig;
use ordervault_proto::v1;
use ordervault_proto::v1::admin_service_client::AdminServiceClient;
use ordervault_sdk::{Client, FieldKind, Token};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::support::Vault;

const BIN: &str = env!("CARGO_BIN_EXE_ordervault");

/// A policy without rate or daily caps, so the tests can reveal thousands
/// of tokens; otherwise shaped like the default one. The shop sees order
/// details and customer ids in full.
const POLICY: &str = r#"
[purposes]
order_management = "The shop operating its own orders"
delivery = "Delivering an order to its consignee"
fulfilment = "Picking and packing an order's items"
customer_support = "Answering a customer's support ticket"
audit = "Reviewing the vault's access log"

[kinds]
deterministic = ["name", "phone", "id_number", "email", "customer_id"]

[roles.shop]
permissions = ["tokenize", "grant"]
purposes = ["order_management"]
reveal = { name = "masked", phone = "masked", address = "masked", id_number = "masked", email = "masked", order_number = "plain", order_details = "plain", customer_id = "plain" }

[roles.courier]
purposes = ["delivery"]
requires_grant = true
rate = "600/min"
daily_distinct_orders = 2000
reveal = { name = "masked", phone = "plain", address = "plain", order_number = "plain" }

[roles.supplier]
purposes = ["fulfilment"]
reveal = { order_number = "plain", order_details = "plain" }

[roles.support]
purposes = ["customer_support"]
requires_grant = true
reveal = { name = "masked", phone = "masked", order_details = "plain" }

[roles.auditor]
permissions = ["audit"]
purposes = ["audit"]
reveal = {}

[roles.admin]
permissions = ["admin", "audit"]
purposes = []
reveal = {}
"#;

/// The values the tests tokenize: order details (fresh tokens) and customer
/// ids (deterministic), both of which the shop sees in full.
fn value(i: usize) -> (FieldKind, String) {
    if i.is_multiple_of(3) {
        (FieldKind::CustomerId, format!("cust-{i:07}"))
    } else {
        (
            FieldKind::OrderDetails,
            format!("item {i}: 无线蓝牙耳机 ×{}", i % 7 + 1),
        )
    }
}

/// Tokenizes values `range` in requests of 1000; returns (token, value).
async fn tokenize_range(shop: &Client, range: std::ops::Range<usize>) -> Vec<(Token, String)> {
    let mut out = Vec::with_capacity(range.len());
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(1000) {
        let fields: Vec<(FieldKind, String)> = chunk.iter().map(|&i| value(i)).collect();
        let tokens = shop.tokenize(fields.clone()).await.unwrap();
        out.extend(tokens.into_iter().zip(fields.into_iter().map(|(_, v)| v)));
    }
    out
}

/// Reveals every token as the shop and checks it gives back its value.
async fn assert_all_reveal(shop: &Client, issued: &[(Token, String)]) {
    for chunk in issued.chunks(1000) {
        let revealed = shop
            .reveal(chunk.iter().map(|(t, _)| t))
            .purpose("order_management")
            .await
            .unwrap();
        for ((token, value), r) in chunk.iter().zip(&revealed) {
            assert_eq!(r.plain(), Some(value.as_str()), "{token}");
        }
    }
}

async fn admin_rpc(vault: &Vault) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(vault.url()).await.unwrap()
}

fn authed<T>(key: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn start() -> Vault {
    Vault::start_custom(EngineConfig::default(), Some(POLICY)).await
}

/// Runs the real binary with `args`, against `url` as `key` (when given),
/// off the async runtime.
async fn cli(url: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("ORDERVAULT_ADDR", url)
        .env_remove("ORDERVAULT_API_KEY")
        .env_remove("ORDERVAULT_MASTER_KEY")
        .env("ORDERVAULT_LOG", "warn");
    if let Some(k) = key {
        cmd.env("ORDERVAULT_API_KEY", k);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

/// Asserts a failed command: exit code and a one-line reason on stderr.
#[track_caller]
fn assert_fails(o: &Output, code: i32, reason: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.contains(reason), "{err:?} should contain {reason:?}");
}

/// Replaces RFC 3339 timestamps (`2026-11-22T09:20:40Z`) with `[time]`.
fn mask_times(text: &str) -> String {
    let bytes = text.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:ddZ";
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let fits = bytes.len() - i >= shape.len()
            && shape.iter().zip(&bytes[i..]).all(|(s, b)| match s {
                b'd' => b.is_ascii_digit(),
                s => s == b,
            });
        if fits {
            out.push_str("[time]");
            i += shape.len();
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Tokenize under v1, rotate, tokenize under v2, rewrap (through the CLI)
/// while a background task keeps tokenizing and revealing, retire v1: no
/// call fails, and every token ever issued still reveals its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_retire_under_traffic_loses_nothing() {
    let vault = start().await;
    let shop = vault.client("shop").await;
    let admin_key = vault.key("admin");
    let mut rpc = admin_rpc(&vault).await;

    let mut issued = tokenize_range(&shop, 0..3000).await;
    let v2 = rpc
        .rotate_key(authed(
            &admin_key,
            v1::RotateKeyRequest {
                algorithm: "xchacha20poly1305".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!((v2.version, v2.state.as_str()), (2, "primary"));
    issued.extend(tokenize_range(&shop, 3000..4000).await);
    let sql_v1 = |vault: &Vault| -> i64 {
        vault
            .sql()
            .query_row(
                "SELECT count(*) FROM tokens WHERE key_version = 1",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(sql_v1(&vault), 3000);

    // Background traffic: tokenize fresh values and reveal old and new ones.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let during = Arc::new(Mutex::new(Vec::<(Token, String)>::new()));
    let traffic = {
        let (shop, stop, failures, calls, during) = (
            shop.clone(),
            stop.clone(),
            failures.clone(),
            calls.clone(),
            during.clone(),
        );
        let sample: Vec<(Token, String)> = issued.iter().step_by(7).cloned().collect();
        tokio::spawn(async move {
            let mut n = 100_000;
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                let fields: Vec<(FieldKind, String)> = (n..n + 10).map(value).collect();
                n += 10;
                match shop.tokenize(fields.clone()).await {
                    Ok(tokens) => during
                        .lock()
                        .await
                        .extend(tokens.into_iter().zip(fields.into_iter().map(|(_, v)| v))),
                    Err(e) => {
                        eprintln!("tokenize failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let batch: Vec<(Token, String)> =
                    sample.iter().cycle().skip(k).take(20).cloned().collect();
                k = (k + 20) % sample.len();
                match shop
                    .reveal(batch.iter().map(|(t, _)| t))
                    .purpose("order_management")
                    .await
                {
                    Ok(revealed) => {
                        for ((_, v), r) in batch.iter().zip(&revealed) {
                            if r.plain() != Some(v.as_str()) {
                                failures.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("reveal failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                calls.fetch_add(2, Ordering::SeqCst);
            }
        })
    };

    // The CLI loops batch by batch until nothing is left under v1.
    let out = cli(
        &vault.url(),
        Some(&admin_key),
        &["keys", "rewrap", "--batch", "250"],
    )
    .await;
    assert_ok(&out);
    assert!(
        stdout(&out).contains("ciphertexts in") && stdout(&out).contains("under key version 2"),
        "{}",
        stdout(&out)
    );
    assert_eq!(sql_v1(&vault), 0);
    let retired = rpc
        .retire_key(authed(&admin_key, v1::RetireKeyRequest { version: 1 }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(retired.state, "retired");
    // Traffic goes on for a moment after the retirement.
    let after = calls.load(Ordering::SeqCst);
    while calls.load(Ordering::SeqCst) < after + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "failed calls during the rewrap"
    );
    assert!(calls.load(Ordering::SeqCst) > 20);

    // v1 is destroyed, listed as retired, and out of the keyring.
    let wrapped: Option<Vec<u8>> = vault
        .sql()
        .query_row(
            "SELECT wrapped FROM key_versions WHERE version = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(wrapped, None);
    let keys = rpc
        .list_keys(authed(&admin_key, v1::ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner()
        .keys;
    let states: Vec<(u32, &str, u64)> = keys
        .iter()
        .map(|k| (k.version, k.state.as_str(), k.ciphertexts))
        .collect();
    let total = issued.len() as u64;
    assert_eq!(states[1], (1, "retired", 0));
    assert_eq!((states[0].0, states[0].1), (2, "primary"));
    assert!(states[0].2 >= total, "{states:?}");

    // Every token ever issued reveals its original value.
    issued.extend(during.lock().await.drain(..));
    assert_all_reveal(&shop, &issued).await;

    // One audit event per rewrap batch, plus the rotation and retirement.
    let events = vault.audit().await;
    let admin_events: Vec<&str> = events
        .iter()
        .filter(|e| e.action == Action::Admin && e.principal == "admin")
        .filter_map(|e| e.reason.as_deref())
        .collect();
    assert!(
        admin_events
            .iter()
            .any(|r| r.starts_with("key_rotated version=2 algorithm=xchacha20poly1305 previous=1"))
    );
    let batches: Vec<_> = events
        .iter()
        .filter(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("keys_rewrapped from=1 to=2"))
        })
        .collect();
    assert_eq!(batches.len(), 3000 / 250, "{admin_events:?}");
    assert!(
        batches
            .iter()
            .all(|e| e.count == Some(250) && e.key_version == Some(2))
    );
    assert!(admin_events.contains(&"key_retired version=1"));
    vault.verify().await.unwrap();
}

/// A running `ordervault serve` process.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    #[allow(clippy::zombie_processes)] // waited for in kill9, terminate and Drop
    fn start(data: &Path, log: &Path) -> Served {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env_remove("ORDERVAULT_MASTER_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!(
                    "ordervault exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(log).unwrap()
                );
            }
            if let Some(addr) = line.trim().strip_prefix("ordervault: listening on ") {
                let url = format!("http://{addr}");
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                        sink.clear();
                    }
                });
                return Served { child, url };
            }
        }
    }

    async fn client(&self, key: &str) -> Client {
        Client::connect(self.url.clone())
            .await
            .unwrap()
            .api_key(key)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ordervault init` with the test policy; returns the admin API key.
fn init(data: &Path) -> String {
    let out = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(data)
        .env_remove("ORDERVAULT_MASTER_KEY")
        .output()
        .unwrap();
    assert_ok(&out);
    std::fs::write(data.join("policy.toml"), POLICY).unwrap();
    stdout(&out)
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin").map(|k| k.trim().to_owned()))
        .unwrap()
}

/// `ordervault principals create NAME --role ROLE`; returns the API key.
async fn create_principal(url: &str, admin: &str, name: &str, role: &str) -> String {
    let out = cli(
        url,
        Some(admin),
        &["principals", "create", name, "--role", role],
    )
    .await;
    assert_ok(&out);
    stdout(&out)
        .lines()
        .find_map(|l| l.trim().strip_prefix("ovk_").map(|k| format!("ovk_{k}")))
        .unwrap()
}

fn versions_in(db: &Path) -> HashMap<u32, u64> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c
        .prepare("SELECT key_version, ciphertext FROM tokens")
        .unwrap();
    let mut out = HashMap::new();
    for row in st
        .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .unwrap()
    {
        let (version, ct) = row.unwrap();
        // Each row is whole: the envelope names the version the row says.
        let (in_envelope, _) = ordervault::crypto::envelope_header(&ct).unwrap();
        assert_eq!(in_envelope, version);
        *out.entry(version).or_default() += 1;
    }
    out
}

fn count_under(db: &Path, version: u32) -> u64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(
        "SELECT count(*) FROM tokens WHERE key_version = ?1",
        [version],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

/// Spawns `ordervault keys rewrap` without waiting for it.
fn spawn_rewrap(url: &str, key: &str, batch: &str) -> Child {
    Command::new(BIN)
        .args(["keys", "rewrap", "--batch", batch])
        .env("ORDERVAULT_ADDR", url)
        .env("ORDERVAULT_API_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until fewer than `below` rows are left under v1 (rewrap made
/// progress), polling the database as a side reader.
fn wait_for_progress(db: &Path, below: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = count_under(db, 1);
        if left < below {
            return left;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rewrap made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The rewrap is interrupted twice — the server SIGKILLed in the middle of
/// it, then the CLI SIGKILLed — and each time started again: it completes,
/// every row is whole at every stop, and every token reveals its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_killed_part_way_resumes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let db = data.join("vault.db");
    let admin = init(&data);
    let server = Served::start(&data, &log);
    let shop_key = create_principal(&server.url, &admin, "shop", "shop").await;
    let shop = server.client(&shop_key).await;
    const N: usize = 20_000;
    let issued = tokenize_range(&shop, 0..N).await;
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "rotate"]).await);
    let under_v1 = count_under(&db, 1);
    assert_eq!(under_v1, N as u64);

    // 1. The server dies in the middle of the rewrap.
    let rewrap = spawn_rewrap(&server.url, &admin, "200");
    let left = tokio::task::spawn_blocking({
        let db = db.clone();
        move || wait_for_progress(&db, under_v1 - 600)
    })
    .await
    .unwrap();
    server.kill9();
    let out = tokio::task::spawn_blocking(move || rewrap.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("run it again to continue"),
        "{}",
        stderr(&out)
    );
    let after_crash = versions_in(&db);
    assert_eq!(after_crash.values().sum::<u64>(), N as u64);
    let v1_left = after_crash.get(&1).copied().unwrap_or(0);
    assert!(v1_left > 0 && v1_left <= left, "{after_crash:?}");

    // 2. Restarted, the rewrap goes on; this time the CLI is killed.
    let server = Served::start(&data, &log);
    let mut rewrap = spawn_rewrap(&server.url, &admin, "200");
    tokio::task::spawn_blocking({
        let db = db.clone();
        move || wait_for_progress(&db, v1_left.saturating_sub(400).max(1))
    })
    .await
    .unwrap();
    rewrap.kill().unwrap();
    rewrap.wait().unwrap();
    let after_cli_kill = versions_in(&db);
    assert_eq!(after_cli_kill.values().sum::<u64>(), N as u64);
    let v1_left = after_cli_kill.get(&1).copied().unwrap_or(0);

    // 2b. Ctrl-C stops it cleanly, saying how to go on.
    let rewrap = spawn_rewrap(&server.url, &admin, "200");
    let pid = rewrap.id().to_string();
    tokio::task::spawn_blocking({
        let db = db.clone();
        move || wait_for_progress(&db, v1_left.saturating_sub(400).max(1))
    })
    .await
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::task::spawn_blocking(move || rewrap.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_fails(&out, 1, "interrupted after ");
    assert!(stderr(&out).contains("nothing is lost or half-written"));
    assert_eq!(versions_in(&db).values().sum::<u64>(), N as u64);

    // 3. Started once more, it completes; v1 can then be retired.
    let out = cli(
        &server.url,
        Some(&admin),
        &["keys", "rewrap", "--batch", "500"],
    )
    .await;
    assert_ok(&out);
    assert_eq!(versions_in(&db), HashMap::from([(2, N as u64)]));
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "retire", "1"]).await);
    let shop = server.client(&shop_key).await;
    assert_all_reveal(&shop, &issued).await;
    server.terminate();
    let verify = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_ok(&verify);
}

/// A fresh master key in `dir/new.key`: its path and its hex.
fn new_master_key_file(dir: &Path) -> (std::path::PathBuf, String) {
    let path = dir.join("new.key");
    let key = ordervault::crypto::SecretKey::generate()
        .to_hex()
        .to_string();
    std::fs::write(&path, format!("{key}\n")).unwrap();
    (path, key)
}

/// `ordervault keys rotate-master --new-key-file KEY` on `data`, the
/// master key and storage taken from the data directory alone.
fn rotate_master(data: &Path, key_file: &Path) -> Output {
    Command::new(BIN)
        .args(["keys", "rotate-master", "--new-key-file"])
        .arg(key_file)
        .arg("--data-dir")
        .arg(data)
        .env_remove("ORDERVAULT_MASTER_KEY")
        .env_remove("ORDERVAULT_STORAGE_URL")
        .output()
        .unwrap()
}

/// A rotation's output names `versions` rewrapped data-key versions and
/// neither key, and master.key now holds `new_key`. Returns the output.
fn assert_rotated(
    out: &Output,
    data: &Path,
    versions: usize,
    new_key: &str,
    old_key: &str,
) -> String {
    assert_ok(out);
    let said = stdout(out);
    assert!(
        said.contains(&format!(
            "master key rotated: {versions} data-key version(s)"
        )),
        "{said}"
    );
    assert!(!said.contains(new_key) && !said.contains(old_key.trim()));
    assert_eq!(
        std::fs::read_to_string(data.join("master.key"))
            .unwrap()
            .trim(),
        new_key
    );
    said
}

/// The old master key no longer starts a node on `data`.
fn assert_old_master_key_refused(data: &Path, old_key: &str) {
    let old = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("ORDERVAULT_MASTER_KEY", old_key.trim())
        .output()
        .unwrap();
    assert_eq!(old.status.code(), Some(78), "{}", stderr(&old));
    assert!(
        stderr(&old).contains("the master key does not open this vault"),
        "{}",
        stderr(&old)
    );
}

/// `ordervault audit verify` on `data` passes.
fn assert_verifies_offline(data: &Path) {
    let verify = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert_ok(&verify);
}

/// `keys rotate-master` re-wraps everything under a new master key: the old
/// key no longer starts the server (with a clear error), the new one does
/// and every value reveals; deterministic tokens stay deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let admin = init(&data);
    let server = Served::start(&data, &log);
    let shop_key = create_principal(&server.url, &admin, "shop", "shop").await;
    let shop = server.client(&shop_key).await;
    let issued = tokenize_range(&shop, 0..300).await;
    // Three data-key versions, one of them retired, two in use.
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "rotate"]).await);
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "rewrap"]).await);
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "retire", "1"]).await);
    let issued_v2 = tokenize_range(&shop, 300..400).await;
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "rotate"]).await);
    let issued_v3 = tokenize_range(&shop, 400..450).await;
    // The audit log's signing key is wrapped by the master key too.
    let pubkey = cli(&server.url, Some(&admin), &["audit", "pubkey"]).await;
    assert_ok(&pubkey);
    let (new_key_file, new_key) = new_master_key_file(dir.path());
    // Not while the server runs.
    let busy = rotate_master(&data, &new_key_file);
    assert_fails(&busy, 78, "is in use: stop its server");
    server.terminate();

    let old_key = std::fs::read_to_string(data.join("master.key")).unwrap();

    // Bad key files change nothing.
    let junk = dir.path().join("junk.key");
    std::fs::write(&junk, "not a key\n").unwrap();
    let out = rotate_master(&data, &junk);
    assert_fails(&out, 78, "must be 64 hex characters");
    let same = rotate_master(&data, &data.join("master.key"));
    assert_fails(&same, 64, "the new key is the current master key");
    assert_eq!(
        std::fs::read_to_string(data.join("master.key")).unwrap(),
        old_key
    );

    let out = rotate_master(&data, &new_key_file);
    assert_rotated(&out, &data, 2, &new_key, &old_key);
    assert!(!data.join("master.key.next").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The old key no longer opens the vault.
    assert_old_master_key_refused(&data, &old_key);

    // The new one does, and everything reveals.
    let server = Served::start(&data, &log);
    let shop = server.client(&shop_key).await;
    assert_all_reveal(&shop, &issued).await;
    assert_all_reveal(&shop, &issued_v2).await;
    assert_all_reveal(&shop, &issued_v3).await;
    let after = cli(&server.url, Some(&admin), &["audit", "pubkey"]).await;
    assert_ok(&after);
    assert_eq!(stdout(&after), stdout(&pubkey), "same audit signing key");
    // Same fingerprint key: a customer id seen before gets its old token.
    let again = shop
        .tokenize([(FieldKind::CustomerId, "cust-0000003")])
        .await
        .unwrap();
    assert_eq!(again[0], issued[3].0);
    server.terminate();
    assert_verifies_offline(&data);
}

/// On PostgreSQL too: `keys rotate-master` refuses while a node is
/// connected, then re-wraps everything under the new key; a node with the
/// old key refuses to start, one with the new key reveals every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_offline_on_postgres() {
    let Some(scratch) = crate::support::ScratchDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    std::fs::create_dir_all(&data).unwrap();
    {
        use secrecy::ExposeSecret;
        std::fs::write(
            data.join("ordervault.toml"),
            format!(
                "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\n",
                scratch.url.expose_secret()
            ),
        )
        .unwrap();
    }
    let admin = init(&data);
    let server = Served::start(&data, &log);
    let shop_key = create_principal(&server.url, &admin, "shop", "shop").await;
    let shop = server.client(&shop_key).await;
    let issued = tokenize_range(&shop, 0..200).await;
    assert_ok(&cli(&server.url, Some(&admin), &["keys", "rotate"]).await);
    let issued_v2 = tokenize_range(&shop, 200..250).await;
    let pubkey = cli(&server.url, Some(&admin), &["audit", "pubkey"]).await;
    assert_ok(&pubkey);
    let (new_key_file, new_key) = new_master_key_file(dir.path());
    let rotate = || rotate_master(&data, &new_key_file);
    let old_key = std::fs::read_to_string(data.join("master.key")).unwrap();
    let busy = rotate();
    assert_fails(&busy, 78, "a node is running or starting");
    assert_eq!(
        std::fs::read_to_string(data.join("master.key")).unwrap(),
        old_key,
        "refused: nothing changed"
    );
    assert!(!data.join("master.key.next").exists());
    server.terminate();

    // Nor while a node is starting (here, holding the lock of a migration).
    let starting = scratch.sql().await;
    starting
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&ordervault::store::postgres::MIGRATION_LOCK],
        )
        .await
        .unwrap();
    let busy = rotate();
    assert_fails(&busy, 78, "a node is running or starting");
    starting
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&ordervault::store::postgres::MIGRATION_LOCK],
        )
        .await
        .unwrap();

    let said = assert_rotated(&rotate(), &data, 2, &new_key, &old_key);
    assert!(said.contains("Every node sharing the database"), "{said}");

    // A node still holding the old key refuses to start.
    assert_old_master_key_refused(&data, &old_key);

    // A node does not start while a rotation holds the node lock (here, a
    // side connection holds it)...
    starting
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&ordervault::store::postgres::NODE_LOCK],
        )
        .await
        .unwrap();
    let (started, up) = std::sync::mpsc::channel();
    {
        let (data, log) = (data.clone(), log.clone());
        std::thread::spawn(move || started.send(Served::start(&data, &log)));
    }
    assert!(
        up.recv_timeout(Duration::from_secs(2)).is_err(),
        "a node started while the node lock was held"
    );
    // ...and starts once it is let go: with the new key every value
    // reveals, under the same signing key.
    starting
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&ordervault::store::postgres::NODE_LOCK],
        )
        .await
        .unwrap();
    let server = up.recv_timeout(Duration::from_secs(60)).unwrap();
    let shop = server.client(&shop_key).await;
    assert_all_reveal(&shop, &issued).await;
    assert_all_reveal(&shop, &issued_v2).await;
    let after = cli(&server.url, Some(&admin), &["audit", "pubkey"]).await;
    assert_ok(&after);
    assert_eq!(stdout(&after), stdout(&pubkey), "same audit signing key");
    server.terminate();
    // The rotation is in the log, which still verifies.
    assert_verifies_offline(&data);
    scratch.drop_db().await;
}

/// A node still running with the old master key after the vault's keys
/// were rotated to a new one (its lock connection lost, say) refuses to
/// make a data key only it could open, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_superseded_master_key_makes_no_data_key() {
    use ordervault::keyring;
    let vault = start().await;
    let master =
        keyring::load_master_key(&vault.data_dir().join(ordervault::setup::MASTER_KEY_FILE))
            .unwrap();
    let sql = vault.sql();
    let root: Vec<u8> = sql
        .query_row(
            "SELECT value FROM meta WHERE key = 'fingerprint_root'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let other = ordervault::crypto::SecretKey::generate();
    let rewrapped =
        keyring::rewrap_fingerprint_root(&keyring::kek(&master), &keyring::kek(&other), &root)
            .unwrap();
    sql.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'fingerprint_root'",
        [&rewrapped],
    )
    .unwrap();
    let versions = |sql: &rusqlite::Connection| -> i64 {
        sql.query_row("SELECT count(*) FROM key_versions", [], |r| r.get(0))
            .unwrap()
    };
    let before = versions(&sql);
    let err = admin_rpc(&vault)
        .await
        .rotate_key(authed(&vault.key("admin"), v1::RotateKeyRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("master key was rotated"),
        "{}",
        err.message()
    );
    assert_eq!(versions(&sql), before, "no data key was stored");
    vault.stop().await;
}

/// With a cap of 50 encryptions per AES-GCM key, the vault rotates by
/// itself before any key passes it; every value still reveals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_keys_rotate_by_themselves_before_their_cap() {
    let config = EngineConfig {
        encryption_cap: 50,
        ..EngineConfig::default()
    };
    let vault = Vault::start_custom(config, Some(POLICY)).await;
    let shop = vault.client("shop").await;
    let mut issued = Vec::new();
    for i in 0..30 {
        // Order details only: each value is a fresh encryption.
        let fields: Vec<(FieldKind, String)> = (0..7)
            .map(|j| (FieldKind::OrderDetails, format!("cap test {i}-{j}")))
            .collect();
        let tokens = shop.tokenize(fields.clone()).await.unwrap();
        issued.extend(tokens.into_iter().zip(fields.into_iter().map(|(_, v)| v)));
    }
    let mut rpc = admin_rpc(&vault).await;
    let keys = rpc
        .list_keys(authed(&vault.key("admin"), v1::ListKeysRequest {}))
        .await
        .unwrap()
        .into_inner()
        .keys;
    // 210 encryptions, at most 49 per key (7 per request, cap 50).
    assert!(keys.len() >= 5, "{keys:?}");
    for k in &keys {
        assert!(k.encryptions <= 50, "{k:?}");
        assert_eq!(k.encryption_cap, 50);
        assert!(k.ciphertexts <= 50);
    }
    let reserved: Vec<i64> = {
        let c = vault.sql();
        let mut st = c.prepare("SELECT reserved FROM key_versions").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(reserved.iter().all(|r| *r <= 50), "{reserved:?}");
    assert_all_reveal(&shop, &issued).await;
    let autos = vault
        .audit()
        .await
        .into_iter()
        .filter(|e| {
            e.role == "system"
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("trigger=auto_cap"))
        })
        .count();
    assert_eq!(autos, keys.len() - 1);
}

/// With automatic rotation off, encryptions past the cap are refused with
/// FAILED_PRECONDITION until an operator rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_cap_refuses_without_auto_rotation() {
    let config = EngineConfig {
        encryption_cap: 50,
        auto_rotate: false,
        ..EngineConfig::default()
    };
    let vault = Vault::start_custom(config, Some(POLICY)).await;
    let shop = vault.client("shop").await;
    let batch = |i: usize, n: usize| -> Vec<(FieldKind, String)> {
        (0..n)
            .map(|j| (FieldKind::OrderDetails, format!("refuse {i}-{j}")))
            .collect()
    };
    // A phone number (deterministic) first: one of the 50.
    let phone = vec![(FieldKind::Phone, "+44 20 7946 0018".to_owned())];
    let held = shop.tokenize(phone.clone()).await.unwrap();
    for i in 0..5 {
        shop.tokenize(batch(i, if i == 4 { 8 } else { 10 }))
            .await
            .unwrap();
    }
    // One encryption left: a request holding the phone and a new value
    // would take two, but the phone needs none, so the new value gets the
    // last one.
    assert_eq!(vault.token_count().await, 49);
    let last = (FieldKind::OrderDetails, "the fiftieth value".to_owned());
    let mixed = shop.tokenize(vec![phone[0].clone(), last]).await.unwrap();
    assert_eq!(mixed[0], held[0]);
    assert_eq!(vault.token_count().await, 50);
    let err = shop.tokenize(batch(5, 10)).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("cap of 50"), "{err}");
    assert_eq!(vault.token_count().await, 50);
    // A value already held needs no encryption: it still tokenizes, to its
    // token, at the cap; a new one does not.
    assert_eq!(shop.tokenize(phone.clone()).await.unwrap(), held);
    let new_phone = vec![(FieldKind::Phone, "+44 20 7946 0019".to_owned())];
    let err = shop.tokenize(new_phone.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    // Held and new together: refused whole, nothing stored.
    let err = shop
        .tokenize(vec![phone[0].clone(), new_phone[0].clone()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("cap of 50"), "{err}");
    assert_eq!(vault.token_count().await, 50);
    let mut rpc = admin_rpc(&vault).await;
    rpc.rotate_key(authed(&vault.key("admin"), v1::RotateKeyRequest::default()))
        .await
        .unwrap();
    shop.tokenize(batch(5, 10)).await.unwrap();
}

/// The status code of an RPC's outcome; a refusal must say why.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty());
            s.code()
        }
    }
}

/// Bad input to the admin RPCs gets a precise status, leaves nothing
/// half-written, and refusals by role are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_answer_bad_input_precisely() {
    let vault = start().await;
    let shop = vault.client("shop").await;
    tokenize_range(&shop, 0..10).await;
    let admin = vault.key("admin");
    let mut rpc = admin_rpc(&vault).await;
    let bad_algorithm = rpc
        .rotate_key(authed(
            &admin,
            v1::RotateKeyRequest {
                algorithm: "des".into(),
            },
        ))
        .await;
    assert_eq!(code(bad_algorithm), Code::InvalidArgument);
    let unknown = rpc
        .retire_key(authed(&admin, v1::RetireKeyRequest { version: 9 }))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    let primary = rpc
        .retire_key(authed(&admin, v1::RetireKeyRequest { version: 1 }))
        .await
        .unwrap_err();
    assert_eq!(primary.code(), Code::FailedPrecondition);
    assert!(
        primary.message().contains("is the primary"),
        "{}",
        primary.message()
    );
    let from_unknown = rpc
        .rewrap(authed(
            &admin,
            v1::RewrapRequest {
                from_version: 7,
                batch: 0,
            },
        ))
        .await;
    assert_eq!(code(from_unknown), Code::NotFound);
    let huge_batch = rpc
        .rewrap(authed(
            &admin,
            v1::RewrapRequest {
                from_version: 0,
                batch: 20_000,
            },
        ))
        .await;
    assert_eq!(code(huge_batch), Code::InvalidArgument);
    rpc.rotate_key(authed(&admin, v1::RotateKeyRequest::default()))
        .await
        .unwrap();
    let in_use = rpc
        .retire_key(authed(&admin, v1::RetireKeyRequest { version: 1 }))
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert!(
        in_use
            .message()
            .starts_with("10 ciphertexts still use key version 1"),
        "{}",
        in_use.message()
    );
    let from_primary = rpc
        .rewrap(authed(
            &admin,
            v1::RewrapRequest {
                from_version: 2,
                batch: 0,
            },
        ))
        .await;
    assert_eq!(code(from_primary), Code::FailedPrecondition);
    // Nothing half-written: v1 still holds its key and its ten ciphertexts.
    let (wrapped, state): (Option<Vec<u8>>, String) = vault
        .sql()
        .query_row(
            "SELECT wrapped, state FROM key_versions WHERE version = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(wrapped.is_some());
    assert_eq!(state, "decrypt_only");

    // Every other role is refused every admin RPC, and each refusal audited.
    let before = vault.audit().await.len();
    for role in ["shop", "courier", "supplier", "support", "auditor"] {
        let key = vault.key(role);
        let denied = [
            code(rpc.status(authed(&key, v1::StatusRequest {})).await),
            code(rpc.list_keys(authed(&key, v1::ListKeysRequest {})).await),
            code(
                rpc.rotate_key(authed(&key, v1::RotateKeyRequest::default()))
                    .await,
            ),
            code(rpc.rewrap(authed(&key, v1::RewrapRequest::default())).await),
            code(
                rpc.retire_key(authed(&key, v1::RetireKeyRequest { version: 1 }))
                    .await,
            ),
            code(
                rpc.list_principals(authed(&key, v1::ListPrincipalsRequest {}))
                    .await,
            ),
            code(
                rpc.create_principal(authed(
                    &key,
                    v1::CreatePrincipalRequest {
                        name: "x".into(),
                        role: "admin".into(),
                    },
                ))
                .await,
            ),
            code(
                rpc.revoke_principal(authed(
                    &key,
                    v1::RevokePrincipalRequest {
                        name: "admin".into(),
                    },
                ))
                .await,
            ),
            code(
                rpc.reload_policy(authed(&key, v1::ReloadPolicyRequest {}))
                    .await,
            ),
        ];
        assert_eq!(denied, [Code::PermissionDenied; 9], "{role}");
    }
    let events = vault.audit().await;
    let denials: Vec<_> = events[before..]
        .iter()
        .filter(|e| e.action == Action::Admin && e.decision == Decision::Denied)
        .collect();
    assert_eq!(denials.len(), 5 * 9);
    assert!(denials.iter().all(|e| {
        e.reason
            .as_deref()
            .unwrap()
            .ends_with(": admin_not_allowed")
    }));
    let no_key = rpc.list_keys(Request::new(v1::ListKeysRequest {})).await;
    assert_eq!(code(no_key), Code::Unauthenticated);
    // Still only two versions: no refused call created or changed one.
    assert_eq!(vault.store.key_versions().await.unwrap().len(), 2);
}

/// `keys list` as people read it, pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keys_list_output_is_pinned() {
    let vault = start().await;
    let shop = vault.client("shop").await;
    tokenize_range(&shop, 0..6).await;
    let admin = vault.key("admin");
    let url = vault.url();
    let out = cli(
        &url,
        Some(&admin),
        &["keys", "rotate", "--algorithm", "xchacha20poly1305"],
    )
    .await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "key version 2 (xchacha20poly1305) is now primary; older versions keep decrypting.\n\
         Re-encrypt what they protect with: ordervault keys rewrap\n"
    );
    tokenize_range(&shop, 6..10).await;
    let out = cli(&url, Some(&admin), &["keys", "list"]).await;
    assert_ok(&out);
    assert_eq!(
        mask_times(&stdout(&out)),
        "\
VERSION  ALGORITHM          STATE         CREATED               CIPHERTEXTS  ENCRYPTIONS
2        xchacha20poly1305  primary       [time]  4            4 (no cap)
1        aes256gcm          decrypt-only  [time]  6            6 of 1073741824
"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&url, Some(&admin), &["keys", "list", "--json"]).await,
    ))
    .unwrap();
    assert_eq!(json[1]["version"], 1);
    assert_eq!(json[1]["state"], "decrypt_only");
    assert_eq!(json[1]["ciphertexts"], 6);
    assert_eq!(json[0]["encryption_cap"], serde_json::Value::Null);

    // Rewrap, retire, and the listing says so.
    let out = cli(&url, Some(&admin), &["keys", "rewrap"]).await;
    assert_ok(&out);
    assert!(
        stdout(&out).starts_with("rewrapped 6 ciphertexts in "),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).ends_with(
        "all are now under key version 2.\nDestroy the old versions with: ordervault keys retire 1\n"
    ));
    assert_ok(&cli(&url, Some(&admin), &["keys", "retire", "1"]).await);
    let out = cli(&url, Some(&admin), &["keys", "list"]).await;
    assert_eq!(
        mask_times(&stdout(&out)),
        "\
VERSION  ALGORITHM          STATE    CREATED               CIPHERTEXTS  ENCRYPTIONS
2        xchacha20poly1305  primary  [time]  10           10 (no cap)
1        aes256gcm          retired  [time]  0            -
"
    );
}

/// `policy check` as people read it, pinned; a bad file exits 1 with the
/// policy error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_policy_check_output_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let path = file.to_str().unwrap();
    let out = cli("http://127.0.0.1:9", None, &["policy", "check", path]).await;
    assert_ok(&out);
    let text = stdout(&out).replace(path, "policy.toml");
    let hash = hex::encode(ordervault::crypto::sha256(POLICY.as_bytes()));
    assert_eq!(
        text.replace(&hash, "[hash]"),
        "\
policy.toml: valid (sha256 [hash])

What each role sees:
ROLE      name    phone   address  id_number  email   order_number  order_details  customer_id
admin     deny    deny    deny     deny       deny    deny          deny           deny
auditor   deny    deny    deny     deny       deny    deny          deny           deny
courier   masked  plain   plain    deny       deny    plain         deny           deny
shop      masked  masked  masked   masked     masked  plain         plain          plain
supplier  deny    deny    deny     deny       deny    plain         plain          deny
support   masked  masked  deny     deny       deny    deny          plain          deny

What each role may do:
ROLE      PURPOSES          PERMISSIONS      REQUIRES_GRANT  RATE     DAILY_CAP
admin     -                 audit, admin     no              -        -
auditor   audit             audit            no              -        -
courier   delivery          -                yes             600/min  2000
shop      order_management  tokenize, grant  no              -        -
supplier  fulfilment        -                no              -        -
support   customer_support  -                yes             -        -

Deterministic kinds: name, phone, id_number, email, customer_id
"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &cli(
            "http://127.0.0.1:9",
            None,
            &["policy", "check", path, "--json"],
        )
        .await,
    ))
    .unwrap();
    assert_eq!(json["roles"][2]["reveal"]["phone"], "plain");
    assert_eq!(json["roles"][2]["daily_distinct_orders"], 2000);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        POLICY.replace("purposes = [\"delivery\"]", "purposes = [\"joyriding\"]"),
    )
    .unwrap();
    let out = cli(
        "http://127.0.0.1:9",
        None,
        &["policy", "check", bad.to_str().unwrap()],
    )
    .await;
    assert_fails(
        &out,
        1,
        "policy is not valid: roles.courier.purposes: \"joyriding\" is not listed under [purposes]",
    );
    let out = cli(
        "http://127.0.0.1:9",
        None,
        &["policy", "check", "/nonexistent/policy.toml"],
    )
    .await;
    assert_fails(&out, 1, "cannot read policy file /nonexistent/policy.toml");
}

/// Each subcommand against a real server, and a bad call of each: wrong
/// role, unknown version, retire refused, bad policy, revoked key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_subcommands_against_a_running_vault() {
    let vault = start().await;
    let url = vault.url();
    let admin = vault.key("admin");
    let shop_key = vault.key("shop");
    let shop = vault.client("shop").await;
    tokenize_range(&shop, 0..5).await;

    // Wrong role, for every subcommand that talks to the server.
    for (args, what) in [
        (&["keys", "list"][..], "list data keys"),
        (&["keys", "rotate"][..], "rotate data keys"),
        (&["keys", "rewrap"][..], "list data keys"),
        (&["keys", "retire", "1"][..], "retire data keys"),
        (
            &["principals", "create", "x", "--role", "admin"][..],
            "create principals",
        ),
        (&["principals", "list"][..], "list principals"),
        (&["principals", "revoke", "admin"][..], "revoke principals"),
        (&["policy", "reload"][..], "reload the policy"),
        (&["status"][..], "read the vault status"),
    ] {
        let out = cli(&url, Some(&vault.key("supplier")), args).await;
        assert_fails(
            &out,
            1,
            &format!("PERMISSION_DENIED: role \"supplier\" may not {what}"),
        );
    }
    // Missing key, unknown key, unreachable server.
    let out = cli(&url, Some(&shop_key), &["keys", "list"]).await;
    assert_fails(
        &out,
        1,
        "PERMISSION_DENIED: role \"shop\" may not list data keys",
    );
    let out = cli(&url, None, &["status"]).await;
    assert_fails(&out, 64, "no API key: set ORDERVAULT_API_KEY");
    let out = cli(&url, Some("ovk_not_a_key"), &["status"]).await;
    assert_fails(&out, 1, "UNAUTHENTICATED");
    let out = cli("http://127.0.0.1:9", Some(&admin), &["status"]).await;
    assert_fails(&out, 1, "cannot reach the vault at http://127.0.0.1:9");

    // keys: rotate with a bad algorithm is a usage error; unknown version;
    // retire refused while in use.
    let out = cli(
        &url,
        Some(&admin),
        &["keys", "rotate", "--algorithm", "des"],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = cli(&url, Some(&admin), &["keys", "retire", "42"]).await;
    assert_fails(&out, 1, "NOT_FOUND: key version 42 does not exist");
    let out = cli(&url, Some(&admin), &["keys", "rewrap", "--from", "42"]).await;
    assert_fails(&out, 1, "NOT_FOUND: key version 42 does not exist");
    assert_ok(&cli(&url, Some(&admin), &["keys", "rotate"]).await);
    let out = cli(&url, Some(&admin), &["keys", "retire", "1"]).await;
    assert_fails(
        &out,
        1,
        "FAILED_PRECONDITION: 5 ciphertexts still use key version 1; run `ordervault keys rewrap --from 1` first",
    );
    let out = cli(&url, Some(&admin), &["keys", "retire", "2"]).await;
    assert_fails(&out, 1, "FAILED_PRECONDITION: key version 2 is the primary");
    let out = cli(
        &url,
        Some(&admin),
        &["keys", "rewrap", "--from", "1", "--json"],
    )
    .await;
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (json["rewrapped"].as_u64(), json["primary_version"].as_u64()),
        (Some(5), Some(2))
    );

    // principals: create (key printed once), list, revoke; the revoked key
    // is refused on its next request.
    let out = cli(
        &url,
        Some(&admin),
        &["principals", "create", "courier-7", "--role", "courier"],
    )
    .await;
    assert_ok(&out);
    let text = stdout(&out);
    let key = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ovk_"))
        .map(|k| format!("ovk_{k}"))
        .unwrap();
    assert!(text.starts_with(
        "created principal courier-7 (role courier)\nAPI key (shown only now; the vault stores only its hash):\n  ovk_"
    ));
    let courier = Client::connect(url.clone())
        .await
        .unwrap()
        .api_key(key.clone());
    courier.ping().await.unwrap();
    let out = cli(
        &url,
        Some(&admin),
        &["principals", "create", "courier-7", "--role", "courier"],
    )
    .await;
    assert_fails(
        &out,
        1,
        "ALREADY_EXISTS: principal \"courier-7\" already exists",
    );
    let out = cli(
        &url,
        Some(&admin),
        &["principals", "create", "x", "--role", "pirate"],
    )
    .await;
    assert_fails(
        &out,
        1,
        "INVALID_ARGUMENT: role \"pirate\" is not defined in the policy",
    );
    let out = cli(&url, Some(&admin), &["principals", "list"]).await;
    assert_ok(&out);
    assert_eq!(
        mask_times(&stdout(&out)),
        "\
NAME       ROLE      CREATED               REVOKED
admin      admin     [time]  -
auditor    auditor   [time]  -
courier    courier   [time]  -
courier-7  courier   [time]  -
shop       shop      [time]  -
supplier   supplier  [time]  -
support    support   [time]  -
"
    );
    let out = cli(&url, Some(&admin), &["principals", "revoke", "courier-7"]).await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "revoked principal courier-7 (role courier); its API key is refused from the next request on.\n"
    );
    assert_eq!(
        courier.ping().await.unwrap_err().code(),
        Some(Code::Unauthenticated)
    );
    let out = cli(&url, Some(&admin), &["principals", "revoke", "nobody"]).await;
    assert_fails(&out, 1, "NOT_FOUND: principal \"nobody\" does not exist");
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&url, Some(&admin), &["principals", "list", "--json"]).await,
    ))
    .unwrap();
    assert!(json[3]["revoked_at"].is_string());

    // policy reload: a bad file is refused and the old policy stays.
    let policy_file = vault.data_dir().join("policy.toml");
    let before = vault.engine.policy().hash_hex();
    std::fs::write(&policy_file, "[roles.shop]\nreveal = 7\n").unwrap();
    let out = cli(&url, Some(&admin), &["policy", "reload"]).await;
    assert_fails(&out, 1, "FAILED_PRECONDITION: policy is not valid");
    assert!(stderr(&out).contains("the policy in force is unchanged"));
    assert_eq!(vault.engine.policy().hash_hex(), before);
    let edited = POLICY.replace(
        "purposes = [\"fulfilment\"]",
        "purposes = [\"fulfilment\", \"delivery\"]",
    );
    std::fs::write(&policy_file, &edited).unwrap();
    let out = cli(&url, Some(&admin), &["policy", "reload"]).await;
    assert_ok(&out);
    let hash = hex::encode(ordervault::crypto::sha256(edited.as_bytes()));
    assert_eq!(
        stdout(&out),
        format!(
            "policy reloaded (sha256 {hash}); roles: admin, auditor, courier, shop, supplier, support\n"
        )
    );
    assert_eq!(vault.engine.policy().hash_hex(), hash);
    let reasons: Vec<String> = vault
        .audit()
        .await
        .into_iter()
        .filter(|e| e.action == Action::Admin)
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.contains(&"policy_reload_rejected".to_owned()));
    assert!(reasons.contains(&format!("policy_reloaded previous={}", &before[..16])));
    assert!(reasons.contains(&"principal_revoked name=courier-7".to_owned()));

    // status.
    let out = cli(&url, Some(&admin), &["status"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    let head = vault.store.chain_head("node-1").await.unwrap().unwrap();
    for expected in [
        format!("version       {}", env!("CARGO_PKG_VERSION")),
        "storage       sqlite, ".to_owned(),
        "tokens        5".to_owned(),
        "key versions  2 (primary: version 2, aes256gcm)".to_owned(),
        format!(
            "audit chain   node-1: {} events, head {}",
            head.0,
            hex::encode(head.1)
        ),
        format!("policy        sha256 {hash}"),
        "VERSION  ALGORITHM  STATE".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} in\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&url, Some(&admin), &["status", "--json"]).await,
    ))
    .unwrap();
    assert_eq!(json["storage_backend"], "sqlite");
    assert!(json["storage_bytes"].as_u64().unwrap() > 0);
    assert_eq!(json["tokens"], 5);
    assert_eq!(json["keys"].as_array().unwrap().len(), 2);

    // No output or audit event carries key material.
    let master = std::fs::read_to_string(vault.data_dir().join("master.key")).unwrap();
    for event in vault.audit().await {
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains(master.trim()) && !line.contains(&admin) && !line.contains(&key));
    }
}

/// `--help` of every subcommand explains it; completions are generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_help_and_completions() {
    let url = "http://127.0.0.1:9";
    let help = |args: &'static [&'static str]| async move {
        let mut full = args.to_vec();
        full.push("--help");
        let out = cli(url, Some("ovk_secret_in_the_environment"), &full).await;
        assert_ok(&out);
        let text = stdout(&out);
        assert!(!text.contains("ovk_secret_in_the_environment"), "{text}");
        text
    };
    let top = help(&[]).await;
    for sub in ["keys", "principals", "policy", "status", "completions"] {
        assert!(top.contains(sub), "{top}");
    }
    assert!(help(&["keys"]).await.contains("rotate-master"));
    assert!(help(&["keys", "list"]).await.contains("ORDERVAULT_API_KEY"));
    assert!(
        help(&["keys", "rotate"])
            .await
            .contains("xchacha20poly1305")
    );
    assert!(
        help(&["keys", "rewrap"])
            .await
            .contains("continues where it")
    );
    assert!(
        help(&["keys", "retire"])
            .await
            .contains("no ciphertext uses it")
    );
    let rotate_master = help(&["keys", "rotate-master"]).await;
    for needle in [
        "STOP THE SERVER FIRST",
        "every",
        "--storage-url",
        "--node-id",
    ] {
        assert!(rotate_master.contains(needle), "{needle}: {rotate_master}");
    }
    assert!(help(&["principals", "create"]).await.contains("--role"));
    assert!(help(&["principals", "list"]).await.contains("--json"));
    assert!(
        help(&["principals", "revoke"])
            .await
            .contains("next request")
    );
    assert!(help(&["policy", "check"]).await.contains("OFFLINE"));
    assert!(help(&["policy", "reload"]).await.contains("policy.toml"));
    assert!(help(&["status"]).await.contains("ORDERVAULT_ADDR"));
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(url, None, &["completions", shell]).await;
        assert_ok(&out);
        assert!(stdout(&out).contains("rotate-master"), "{shell}");
    }
    let out = cli(url, None, &["completions", "tcsh"]).await;
    assert_eq!(out.status.code(), Some(64));
}

/// Rewrap throughput: 50,000 ciphertexts through the real CLI, default
/// batch size. Run by hand: `cargo test --release -p ordervault --test e2e
/// rewrap_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn rewrap_rate_50k() {
    let vault = start().await;
    let shop = vault.client("shop").await;
    let issued = tokenize_range(&shop, 0..50_000).await;
    let admin = vault.key("admin");
    assert_ok(&cli(&vault.url(), Some(&admin), &["keys", "rotate"]).await);
    for batch in ["1000", "5000"] {
        let started = std::time::Instant::now();
        let out = cli(
            &vault.url(),
            Some(&admin),
            &["keys", "rewrap", "--batch", batch],
        )
        .await;
        assert_ok(&out);
        let secs = started.elapsed().as_secs_f64();
        println!(
            "batch {batch}: {} ciphertexts/s ({})",
            (50_000.0 / secs).round(),
            stdout(&out).lines().next().unwrap()
        );
        assert_ok(&cli(&vault.url(), Some(&admin), &["keys", "rotate"]).await);
    }
    assert_all_reveal(&shop, &issued).await;
}
