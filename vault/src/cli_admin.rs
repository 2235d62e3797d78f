//! The operator's subcommands: `keys`, `principals`, `policy`, `status` and
//! `completions`.
//!
//! Most talk to the running server over gRPC (`AdminService`) as an admin
//! principal (`--api-key` / `ORDERVAULT_API_KEY`, `--addr` /
//! `ORDERVAULT_ADDR`). Two work offline on files, because what they touch
//! must not travel over the network or needs no server: `keys rotate-master`
//! (the master key) and `policy check`. Output is a table by default and
//! JSON with `--json`; a failure is one line on stderr and a non-zero exit
//! ([`crate::cli`] has the codes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Subcommand, ValueEnum};
use ordervault_proto::v1;
use ordervault_proto::v1::admin_service_client::AdminServiceClient;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::audit::{Action, AuditEvent, Decision};
use crate::cli::{Cli, EXIT_CONFIG, EXIT_USAGE, Failure};
use crate::crypto::SecretKey;
use crate::engine::META_FINGERPRINT_ROOT;
use crate::keyring::{self, Keyring, MASTER_KEY_ENV, state};
use crate::kinds::FieldKind;
use crate::policy::{Policy, Visibility};
use crate::setup::{self, DirState, Layout, SetupError};
use crate::store::{Store, WriteBatch};

/// Where the running vault is, who is asking, and how to print.
#[derive(Debug, Args)]
pub struct Remote {
    /// The vault's gRPC address.
    #[arg(long, env = "ORDERVAULT_ADDR", default_value = "http://127.0.0.1:7470")]
    pub addr: String,
    /// An admin principal's API key. Prefer the environment variable: a
    /// flag is visible to other users in the process list.
    #[arg(long, env = "ORDERVAULT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List data-key versions: algorithm, state (primary, decrypt-only,
    /// retired), creation time, how many ciphertexts each still protects,
    /// and the encryptions counted against AES-256-GCM keys' cap.
    List(Remote),
    /// Make a new data-key version primary. Takes effect on every
    /// connection at once; older versions keep decrypting until rewrapped.
    Rotate(RotateArgs),
    /// Re-encrypt every ciphertext still under an older version with the
    /// primary, in batches, with progress. Safe to interrupt (Ctrl-C, a
    /// crash, a server restart): run it again and it continues where it
    /// stopped. Traffic keeps flowing meanwhile.
    Rewrap(RewrapArgs),
    /// Destroy a data-key version once no ciphertext uses it and it is not
    /// the primary. It stays listed as retired.
    Retire(RetireArgs),
    /// OFFLINE: re-wrap every data key and the fingerprint key under a new
    /// master key, in one transaction, then replace DATA_DIR/master.key.
    /// STOP THE SERVER FIRST: it works on the data directory, because the
    /// master key never travels over the network. On PostgreSQL, stop every
    /// node sharing the database and keep them stopped until it is done
    /// (it refuses while any is connected), then give each node the new key.
    /// Afterwards the old master key no longer opens the vault.
    RotateMaster(RotateMasterArgs),
}

/// The AEAD of a new data-key version.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AlgorithmArg {
    /// AES-256-GCM: fast with AES instructions; capped encryptions per key.
    Aes256gcm,
    /// XChaCha20-Poly1305: for CPUs without AES instructions; no cap.
    Xchacha20poly1305,
}

/// `keys rotate` options.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Server and credentials.
    #[command(flatten)]
    pub remote: Remote,
    /// AEAD algorithm of the new version.
    #[arg(long, value_enum, default_value = "aes256gcm")]
    pub algorithm: AlgorithmArg,
}

/// `keys rewrap` options.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// Server and credentials.
    #[command(flatten)]
    pub remote: Remote,
    /// Only ciphertexts under this version (default: every older version).
    #[arg(long, value_name = "V", value_parser = clap::value_parser!(u32).range(1..))]
    pub from: Option<u32>,
    /// Ciphertexts per batch (one request, one transaction).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
}

/// `keys retire` options.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// Server and credentials.
    #[command(flatten)]
    pub remote: Remote,
    /// The version to destroy.
    #[arg(value_name = "V")]
    pub version: u32,
}

/// `keys rotate-master` options.
#[derive(Debug, Args)]
pub struct RotateMasterArgs {
    /// Where the stopped vault lives; the node id names the audit chain
    /// that records the rotation.
    #[command(flatten)]
    pub data: crate::cli::DataArgs,
    /// File holding the new master key: 64 hex characters, like master.key
    /// (e.g. `openssl rand -hex 32 > new.key`).
    #[arg(long, value_name = "F")]
    pub new_key_file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `principals` subcommands.
#[derive(Debug, Subcommand)]
pub enum PrincipalsCommand {
    /// Create a principal and print its API key, once.
    Create(CreatePrincipalArgs),
    /// List principals, revoked ones included.
    List(Remote),
    /// Revoke a principal: its API key is refused from the next request on.
    Revoke(RevokePrincipalArgs),
}

/// `principals create` options.
#[derive(Debug, Args)]
pub struct CreatePrincipalArgs {
    /// Server and credentials.
    #[command(flatten)]
    pub remote: Remote,
    /// Unique name: a-z, 0-9, '-', '_' and '.'.
    pub name: String,
    /// Its role in the policy.
    #[arg(long)]
    pub role: String,
}

/// `principals revoke` options.
#[derive(Debug, Args)]
pub struct RevokePrincipalArgs {
    /// Server and credentials.
    #[command(flatten)]
    pub remote: Remote,
    /// The principal to revoke.
    pub name: String,
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// OFFLINE: validate a policy file and show what each role may see
    /// (roles × kinds), its purposes, permissions, grants, rate and daily cap.
    Check(PolicyCheckArgs),
    /// Make the server re-read DATA_DIR/policy.toml. A bad file is rejected
    /// and the policy in force stays.
    Reload(Remote),
}

/// `policy check` options.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// The policy file.
    pub file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `completions` options.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// One line, whatever the server sent.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn rpc_failure(status: tonic::Status) -> Failure {
    let hint = match status.code() {
        Code::Unauthenticated => " (check --api-key / ORDERVAULT_API_KEY)",
        Code::PermissionDenied => " (use an admin principal's API key)",
        _ => "",
    };
    failure(format!(
        "{}: {}{hint}",
        code_name(status.code()),
        one_line(status.message())
    ))
}

/// An authenticated `AdminService` client.
struct Admin {
    grpc: AdminServiceClient<Channel>,
    api_key: SecretString,
}

impl Admin {
    async fn connect(remote: &Remote) -> Result<Admin, Failure> {
        let api_key = remote
            .api_key
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| Failure {
                code: EXIT_USAGE,
                message: "no API key: set ORDERVAULT_API_KEY (or pass --api-key) to an admin principal's key".into(),
            })?;
        let endpoint = Endpoint::from_shared(remote.addr.clone())
            .map_err(|e| Failure {
                code: EXIT_USAGE,
                message: format!(
                    "--addr {:?} is not a URL like http://127.0.0.1:7470: {e}",
                    remote.addr
                ),
            })?
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| {
            failure(format!(
                "cannot reach the vault at {}: {}; is the server running? (set --addr or ORDERVAULT_ADDR)",
                remote.addr,
                one_line(&error_chain(&e))
            ))
        })?;
        Ok(Admin {
            grpc: AdminServiceClient::new(channel),
            api_key: SecretString::from(api_key),
        })
    }

    fn request<T>(&self, message: T) -> Result<Request<T>, Failure> {
        let mut req = Request::new(message);
        let mut value: MetadataValue<_> = format!("Bearer {}", self.api_key.expose_secret().trim())
            .parse()
            .map_err(|_| Failure {
                code: EXIT_USAGE,
                message: "the API key holds characters an API key cannot have".into(),
            })?;
        value.set_sensitive(true);
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds >= 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(t.seconds as u64),
        )
        .to_string(),
        _ => String::new(),
    }
}

/// A plain-text table: a header row and left-aligned columns two spaces
/// apart, without trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn state_label(state: &str) -> &str {
    match state {
        state::DECRYPT_ONLY => "decrypt-only",
        other => other,
    }
}

fn encryptions_cell(k: &v1::KeyInfo) -> String {
    if k.state == state::RETIRED {
        // Only the durable reservation outlives the key: not a count.
        "-".to_owned()
    } else if k.encryption_cap > 0 {
        format!("{} of {}", k.encryptions, k.encryption_cap)
    } else {
        format!("{} (no cap)", k.encryptions)
    }
}

/// The `keys list` table.
pub fn keys_table(keys: &[v1::KeyInfo]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.version.to_string(),
                k.algorithm.clone(),
                state_label(&k.state).to_owned(),
                rfc3339(k.created_at.as_ref()),
                k.ciphertexts.to_string(),
                encryptions_cell(k),
            ]
        })
        .collect();
    table(
        &[
            "VERSION",
            "ALGORITHM",
            "STATE",
            "CREATED",
            "CIPHERTEXTS",
            "ENCRYPTIONS",
        ],
        &rows,
    )
}

fn key_json(k: &v1::KeyInfo) -> Value {
    json!({
        "version": k.version,
        "algorithm": k.algorithm,
        "state": k.state,
        "created_at": rfc3339(k.created_at.as_ref()),
        "ciphertexts": k.ciphertexts,
        "encryptions": k.encryptions,
        "encryption_cap": (k.encryption_cap > 0).then_some(k.encryption_cap),
    })
}

fn principal_json(p: &v1::PrincipalInfo) -> Value {
    json!({
        "name": p.name,
        "role": p.role,
        "created_at": rfc3339(p.created_at.as_ref()),
        "revoked_at": p.revoked_at.as_ref().map(|t| rfc3339(Some(t))),
    })
}

fn print_json(v: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| failure(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Runs a `keys` subcommand.
pub async fn keys(cmd: KeysCommand) -> Result<(), Failure> {
    match cmd {
        KeysCommand::List(remote) => {
            let mut admin = Admin::connect(&remote).await?;
            let req = admin.request(v1::ListKeysRequest {})?;
            let keys = admin
                .grpc
                .list_keys(req)
                .await
                .map_err(rpc_failure)?
                .into_inner()
                .keys;
            if remote.json {
                print_json(&Value::Array(keys.iter().map(key_json).collect()))
            } else {
                print!("{}", keys_table(&keys));
                Ok(())
            }
        }
        KeysCommand::Rotate(args) => {
            let mut admin = Admin::connect(&args.remote).await?;
            let algorithm = match args.algorithm {
                AlgorithmArg::Aes256gcm => "aes256gcm",
                AlgorithmArg::Xchacha20poly1305 => "xchacha20poly1305",
            };
            let req = admin.request(v1::RotateKeyRequest {
                algorithm: algorithm.into(),
            })?;
            let key = admin
                .grpc
                .rotate_key(req)
                .await
                .map_err(rpc_failure)?
                .into_inner()
                .key
                .ok_or_else(|| failure("the server sent no key"))?;
            if args.remote.json {
                return print_json(&key_json(&key));
            }
            println!(
                "key version {} ({}) is now primary; older versions keep decrypting.",
                key.version, key.algorithm
            );
            println!("Re-encrypt what they protect with: ordervault keys rewrap");
            Ok(())
        }
        KeysCommand::Rewrap(args) => rewrap(args).await,
        KeysCommand::Retire(args) => {
            let mut admin = Admin::connect(&args.remote).await?;
            let req = admin.request(v1::RetireKeyRequest {
                version: args.version,
            })?;
            let key = admin
                .grpc
                .retire_key(req)
                .await
                .map_err(rpc_failure)?
                .into_inner()
                .key
                .ok_or_else(|| failure("the server sent no key"))?;
            if args.remote.json {
                return print_json(&key_json(&key));
            }
            println!(
                "key version {} is retired: its key is destroyed and it no longer decrypts anything.",
                key.version
            );
            Ok(())
        }
        KeysCommand::RotateMaster(args) => rotate_master(args).await,
    }
}

async fn rewrap(args: RewrapArgs) -> Result<(), Failure> {
    let mut admin = Admin::connect(&args.remote).await?;
    let req = admin.request(v1::ListKeysRequest {})?;
    let keys = admin
        .grpc
        .list_keys(req)
        .await
        .map_err(rpc_failure)?
        .into_inner()
        .keys;
    let total: u64 = keys
        .iter()
        .filter(|k| match args.from {
            Some(v) => k.version == v,
            None => k.state != state::PRIMARY,
        })
        .map(|k| k.ciphertexts)
        .sum();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "rewrap [{bar:30}] {pos}/{len} ciphertexts  {per_sec}  ETA {eta}",
        )
        .map_err(|e| failure(e.to_string()))?
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut done = 0u64;
    let mut stalled = 0u32;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let primary = loop {
        let req = admin.request(v1::RewrapRequest {
            from_version: args.from.unwrap_or(0),
            batch: args.batch,
        })?;
        let reply = tokio::select! {
            r = admin.grpc.rewrap(req) => r,
            _ = &mut interrupted => {
                bar.abandon();
                return Err(failure(format!(
                    "interrupted after {done} ciphertexts; nothing is lost or half-written. Run `ordervault keys rewrap` again to continue"
                )));
            }
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                bar.abandon();
                let f = rpc_failure(status);
                if done == 0 {
                    return Err(f);
                }
                return Err(failure(format!(
                    "{} (after {done} ciphertexts; run it again to continue)",
                    f.message
                )));
            }
        };
        done += reply.rewrapped;
        if done + reply.remaining > bar.length().unwrap_or(0) {
            bar.set_length(done + reply.remaining);
        }
        bar.set_position(done);
        if reply.remaining == 0 {
            break reply.primary_version;
        }
        if reply.rewrapped == 0 {
            // Rows under old versions that this batch could not take (a
            // request that encrypted under the previous primary just
            // committed, or another rewrap moved them): try again shortly.
            stalled += 1;
            if stalled > 100 {
                bar.abandon();
                return Err(failure(format!(
                    "{} ciphertexts remain under older versions but none could be rewrapped; is another rewrap running?",
                    reply.remaining
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            stalled = 0;
        }
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    if args.remote.json {
        return print_json(&json!({
            "rewrapped": done,
            "remaining": 0,
            "primary_version": primary,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "per_second": rate.round(),
        }));
    }
    println!(
        "rewrapped {done} ciphertexts in {secs:.1} s ({rate:.0}/s); all are now under key version {primary}."
    );
    let retirable: Vec<String> = keys
        .iter()
        .filter(|k| k.state == state::DECRYPT_ONLY && args.from.is_none_or(|v| v == k.version))
        .map(|k| k.version.to_string())
        .collect();
    if !retirable.is_empty() {
        println!(
            "Destroy the old versions with: {}",
            retirable
                .iter()
                .map(|v| format!("ordervault keys retire {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

fn config_failure(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        message: message.into(),
    }
}

/// Name of the new master key file while a rotation is under way. It holds
/// the new key before the database is rewrapped, so a crash at any point
/// leaves one file that opens the vault.
const NEXT_MASTER_KEY: &str = "master.key.next";

fn read_key_file(path: &Path) -> Result<SecretKey, Failure> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        config_failure(format!(
            "cannot read the new master key {}: {e}",
            path.display()
        ))
    })?);
    SecretKey::from_hex(&text).map_err(|_| {
        config_failure(format!(
            "{} does not hold a master key: it must be 64 hex characters (e.g. `openssl rand -hex 32`)",
            path.display()
        ))
    })
}

/// Writes `contents` to `path` (0600) and makes it durable.
fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Whether `master` unwraps every stored key of the vault.
fn opens(master: &SecretKey, keys: &[crate::store::StoredKey], root: &[u8]) -> bool {
    Keyring::load(master, keys, root, &Default::default()).is_ok()
}

async fn rotate_master(args: RotateMasterArgs) -> Result<(), Failure> {
    let layout = args.data.layout()?;
    // A running server caches the master key (as its KEK) and would go on
    // wrapping new data keys under the old one. Asked before this command
    // opens connections of its own; on PostgreSQL the guard also keeps
    // nodes from starting until the rotation is done.
    let guard = match &layout.storage {
        setup::Storage::Postgres(url) => {
            let guard = crate::store::postgres::OfflineGuard::acquire(url)
                .await
                .map_err(|e| config_failure(e.to_string()))?
                .ok_or_else(|| {
                    config_failure(
                        "a node is running or starting on the vault's database (or another `keys rotate-master` runs): stop every node sharing it first",
                    )
                })?;
            let nodes = guard
                .nodes_connected()
                .await
                .map_err(|e| config_failure(e.to_string()))?;
            if !nodes.is_empty() {
                return Err(config_failure(format!(
                    "the vault's database has {} connection(s) from running ordervault nodes ({}): stop every node sharing it first (a connection left behind by a lost node can be ended with pg_terminate_backend(pid))",
                    nodes.len(),
                    nodes.join(", ")
                )));
            }
            Some(guard)
        }
        setup::Storage::Sqlite => None,
    };
    if setup::dir_state(&layout).await? != DirState::Initialised {
        return Err(SetupError::NotInitialised {
            dir: layout.dir.display().to_string(),
        }
        .into());
    }
    let new = read_key_file(&args.new_key_file)?;
    let from_env = std::env::var_os(MASTER_KEY_ENV).is_some();
    if let setup::Storage::Sqlite = layout.storage
        && crate::store::sqlite::in_use(&layout.db()).map_err(|e| config_failure(e.to_string()))?
    {
        return Err(config_failure(format!(
            "the vault in {} is in use: stop its server (and any other ordervault process using it) first",
            layout.dir.display()
        )));
    }
    let store = layout.storage.open_existing(&layout).await?;
    let result =
        rotate_master_in(&layout, store.as_ref(), &new, from_env, &args.data.node_id).await;
    store.close().await;
    drop(guard);
    let (versions, completed_earlier) = result?;
    if args.json {
        return print_json(&json!({
            "rotated": true,
            "key_versions": versions,
            "completed_interrupted_rotation": completed_earlier,
            "every_node_needs_the_new_key": matches!(layout.storage, setup::Storage::Postgres(_)),
            "master_key": if from_env { Value::Null } else { json!(layout.master_key()) },
        }));
    }
    if completed_earlier {
        println!("completed an interrupted master-key rotation first.");
    }
    println!(
        "master key rotated: {versions} data-key version(s) and the fingerprint key are now wrapped under the new key."
    );
    if from_env {
        println!(
            "The old key came from {MASTER_KEY_ENV}: set it to the new key before starting the server."
        );
    } else {
        println!(
            "{} now holds the new key. The old key no longer opens this vault: destroy every copy of it.",
            layout.master_key().display()
        );
    }
    if let setup::Storage::Postgres(_) = layout.storage {
        println!(
            "Every node sharing the database needs the new key: put it in each node's data directory (or {MASTER_KEY_ENV}) before starting it; a node with the old key refuses to start."
        );
    }
    Ok(())
}

/// The rotation proper; returns the number of data-key versions rewrapped
/// and whether an interrupted rotation had to be completed first.
async fn rotate_master_in(
    layout: &Layout,
    store: &dyn Store,
    new: &SecretKey,
    from_env: bool,
    chain: &str,
) -> Result<(usize, bool), Failure> {
    let keys = store
        .key_versions()
        .await
        .map_err(|e| config_failure(e.to_string()))?;
    let root = store
        .meta(META_FINGERPRINT_ROOT)
        .await
        .map_err(|e| config_failure(e.to_string()))?
        .ok_or_else(|| config_failure("the vault has no fingerprint key; it is not initialised"))?;
    let next_path = layout.dir.join(NEXT_MASTER_KEY);
    let mut completed_earlier = false;
    let mut old = keyring::load_master_key(&layout.master_key()).map_err(SetupError::from)?;
    if !from_env && next_path.exists() {
        // A previous rotation stopped part-way. If the database was already
        // rewrapped, the pending key is the one that opens it: finish the
        // rename. Otherwise the pending key was never used: drop it.
        let pending = read_key_file(&next_path)?;
        if !opens(&old, &keys, &root) && opens(&pending, &keys, &root) {
            std::fs::rename(&next_path, layout.master_key())
                .and_then(|()| sync_dir(&layout.dir))
                .map_err(|e| {
                    config_failure(format!("cannot complete the interrupted rotation: {e}"))
                })?;
            old = pending;
            completed_earlier = true;
        } else {
            std::fs::remove_file(&next_path).map_err(|e| {
                config_failure(format!("cannot remove {}: {e}", next_path.display()))
            })?;
        }
    }
    if !opens(&old, &keys, &root) {
        return Err(config_failure(format!(
            "{}",
            keyring::KeyringError::WrongMasterKey
        )));
    }
    if bool::from(old.expose().ct_eq(new.expose())) {
        if completed_earlier {
            let live = keys.iter().filter(|k| k.wrapped.is_some()).count();
            return Ok((live, true));
        }
        return Err(Failure {
            code: EXIT_USAGE,
            message: "the new key is the current master key; generate a new one (e.g. `openssl rand -hex 32`)".into(),
        });
    }
    let (old_kek, new_kek) = (keyring::kek(&old), keyring::kek(new));
    let rewrapped = keys
        .iter()
        .map(|k| keyring::rewrap_data_key(&old_kek, &new_kek, k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_failure(e.to_string()))?;
    let new_root = keyring::rewrap_fingerprint_root(&old_kek, &new_kek, &root)
        .map_err(|e| config_failure(e.to_string()))?;
    let mut meta = vec![(META_FINGERPRINT_ROOT.to_owned(), new_root.clone())];
    // Every other key the master key wraps.
    for (name, context) in [(
        crate::auditor::META_SIGNING_SEED,
        crate::auditor::SIGNING_SEED_CONTEXT,
    )] {
        let stored = store
            .meta(name)
            .await
            .map_err(|e| config_failure(e.to_string()))?;
        if let Some(wrapped) = stored {
            let rewrapped = keyring::rewrap_secret(&old_kek, &new_kek, context, &wrapped)
                .map_err(|_| config_failure(format!("the stored {name} does not unwrap under the current master key: it was altered; nothing was changed")))?;
            meta.push((name.to_owned(), rewrapped));
        }
    }
    if !opens(new, &rewrapped, &new_root) {
        return Err(failure(
            "the rewrapped keys do not open under the new key; nothing was changed",
        ));
    }
    if !from_env {
        let mut text = new.to_hex();
        text.push('\n');
        write_durably(&next_path, text.as_bytes())
            .and_then(|()| sync_dir(&layout.dir))
            .map_err(|e| config_failure(format!("cannot write {}: {e}", next_path.display())))?;
    }
    let policy_hash = Policy::load(&layout.policy())
        .map(|p| p.hash_hex()[..16].to_owned())
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut ev = AuditEvent::new(
        now,
        "",
        "operator",
        Action::Admin,
        Decision::Allowed,
        &hex::encode(crate::crypto::random_bytes::<8>()),
        &policy_hash,
    );
    let versions = rewrapped.iter().filter(|k| k.wrapped.is_some()).count();
    ev.reason = Some(format!("master_key_rotated key_versions={versions}"));
    store
        .commit(WriteBatch {
            keys: rewrapped,
            meta,
            audit_chain: chain.to_owned(),
            audit: vec![ev],
            ..Default::default()
        })
        .await
        .map_err(|e| failure(format!("nothing was changed: {e}")))?;
    if !from_env {
        std::fs::rename(&next_path, layout.master_key())
            .and_then(|()| sync_dir(&layout.dir))
            .map_err(|e| {
                failure(format!(
                    "the vault is rewrapped under the new key, but {} could not be replaced ({e}); copy {} over it",
                    layout.master_key().display(),
                    next_path.display()
                ))
            })?;
    }
    Ok((versions, completed_earlier))
}

/// Runs a `principals` subcommand.
pub async fn principals(cmd: PrincipalsCommand) -> Result<(), Failure> {
    match cmd {
        PrincipalsCommand::Create(args) => {
            let mut admin = Admin::connect(&args.remote).await?;
            let req = admin.request(v1::CreatePrincipalRequest {
                name: args.name,
                role: args.role,
            })?;
            let reply = admin
                .grpc
                .create_principal(req)
                .await
                .map_err(rpc_failure)?
                .into_inner();
            let p = reply
                .principal
                .ok_or_else(|| failure("the server sent no principal"))?;
            let key = SecretString::from(reply.api_key);
            if args.remote.json {
                let mut v = principal_json(&p);
                v["api_key"] = json!(key.expose_secret());
                return print_json(&v);
            }
            println!("created principal {} (role {})", p.name, p.role);
            println!("API key (shown only now; the vault stores only its hash):");
            println!("  {}", key.expose_secret());
            Ok(())
        }
        PrincipalsCommand::List(remote) => {
            let mut admin = Admin::connect(&remote).await?;
            let req = admin.request(v1::ListPrincipalsRequest {})?;
            let list = admin
                .grpc
                .list_principals(req)
                .await
                .map_err(rpc_failure)?
                .into_inner()
                .principals;
            if remote.json {
                return print_json(&Value::Array(list.iter().map(principal_json).collect()));
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.role.clone(),
                        rfc3339(p.created_at.as_ref()),
                        p.revoked_at
                            .as_ref()
                            .map_or_else(|| "-".to_owned(), |t| rfc3339(Some(t))),
                    ]
                })
                .collect();
            print!("{}", table(&["NAME", "ROLE", "CREATED", "REVOKED"], &rows));
            Ok(())
        }
        PrincipalsCommand::Revoke(args) => {
            let mut admin = Admin::connect(&args.remote).await?;
            let req = admin.request(v1::RevokePrincipalRequest { name: args.name })?;
            let p = admin
                .grpc
                .revoke_principal(req)
                .await
                .map_err(rpc_failure)?
                .into_inner()
                .principal
                .ok_or_else(|| failure("the server sent no principal"))?;
            if args.remote.json {
                return print_json(&principal_json(&p));
            }
            println!(
                "revoked principal {} (role {}); its API key is refused from the next request on.",
                p.name, p.role
            );
            Ok(())
        }
    }
}

/// Runs a `policy` subcommand.
pub async fn policy(cmd: PolicyCommand) -> Result<(), Failure> {
    match cmd {
        PolicyCommand::Check(args) => {
            let policy = Policy::load(&args.file).map_err(|e| failure(one_line(&e.to_string())))?;
            if args.json {
                print_json(&policy_json(&policy, &args.file))
            } else {
                print!("{}", policy_report(&policy, &args.file));
                Ok(())
            }
        }
        PolicyCommand::Reload(remote) => {
            let mut admin = Admin::connect(&remote).await?;
            let req = admin.request(v1::ReloadPolicyRequest {})?;
            let reply = admin
                .grpc
                .reload_policy(req)
                .await
                .map_err(rpc_failure)?
                .into_inner();
            if remote.json {
                return print_json(&json!({
                    "policy_hash": reply.policy_hash,
                    "roles": reply.roles,
                }));
            }
            println!(
                "policy reloaded (sha256 {}); roles: {}",
                reply.policy_hash,
                reply.roles.join(", ")
            );
            Ok(())
        }
    }
}

fn visibility_cell(v: Visibility) -> &'static str {
    v.as_str()
}

fn list_or_dash(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// The human-readable report of `policy check`.
pub fn policy_report(policy: &Policy, file: &Path) -> String {
    let mut out = format!(
        "{}: valid (sha256 {})\n\nWhat each role sees:\n",
        file.display(),
        policy.hash_hex()
    );
    let mut headers = vec!["ROLE"];
    headers.extend(FieldKind::ALL.iter().map(|k| k.as_str()));
    let rows: Vec<Vec<String>> = policy
        .roles()
        .map(|r| {
            std::iter::once(r.name().to_owned())
                .chain(
                    FieldKind::ALL
                        .iter()
                        .map(|k| visibility_cell(r.visibility(*k)).to_owned()),
                )
                .collect()
        })
        .collect();
    out.push_str(&table(&headers, &rows));
    out.push_str("\nWhat each role may do:\n");
    let rows: Vec<Vec<String>> = policy
        .roles()
        .map(|r| {
            let limits = r.limits();
            vec![
                r.name().to_owned(),
                list_or_dash(r.purposes().map(|p| p.as_str().to_owned()).collect()),
                list_or_dash(r.permissions().map(|p| p.as_str().to_owned()).collect()),
                if r.requires_grant() { "yes" } else { "no" }.to_owned(),
                limits.rate.map_or_else(|| "-".into(), |r| r.to_string()),
                limits
                    .daily_distinct_orders
                    .map_or_else(|| "-".into(), |n| n.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ROLE",
            "PURPOSES",
            "PERMISSIONS",
            "REQUIRES_GRANT",
            "RATE",
            "DAILY_CAP",
        ],
        &rows,
    ));
    let deterministic: Vec<String> = FieldKind::ALL
        .iter()
        .filter(|k| policy.is_deterministic(**k))
        .map(|k| k.as_str().to_owned())
        .collect();
    out.push_str(&format!(
        "\nDeterministic kinds: {}\n",
        list_or_dash(deterministic)
    ));
    out
}

fn policy_json(policy: &Policy, file: &Path) -> Value {
    let roles: Vec<Value> = policy
        .roles()
        .map(|r| {
            let reveal: serde_json::Map<String, Value> = FieldKind::ALL
                .iter()
                .map(|k| (k.as_str().to_owned(), json!(r.visibility(*k).as_str())))
                .collect();
            let limits = r.limits();
            json!({
                "role": r.name(),
                "reveal": reveal,
                "purposes": r.purposes().map(|p| p.as_str()).collect::<Vec<_>>(),
                "permissions": r.permissions().map(|p| p.as_str()).collect::<Vec<_>>(),
                "requires_grant": r.requires_grant(),
                "rate": limits.rate.map(|r| r.to_string()),
                "daily_distinct_orders": limits.daily_distinct_orders,
            })
        })
        .collect();
    json!({
        "file": file.display().to_string(),
        "valid": true,
        "policy_hash": policy.hash_hex(),
        "roles": roles,
        "deterministic": FieldKind::ALL
            .iter()
            .filter(|k| policy.is_deterministic(**k))
            .map(|k| k.as_str())
            .collect::<Vec<_>>(),
    })
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// Runs `status`.
pub async fn status(remote: Remote) -> Result<(), Failure> {
    let mut admin = Admin::connect(&remote).await?;
    let req = admin.request(v1::StatusRequest {})?;
    let s = admin
        .grpc
        .status(req)
        .await
        .map_err(rpc_failure)?
        .into_inner();
    if remote.json {
        return print_json(&json!({
            "version": s.version,
            "storage_backend": s.storage_backend,
            "storage_bytes": s.storage_bytes,
            "keys": s.keys.iter().map(key_json).collect::<Vec<_>>(),
            "tokens": s.tokens,
            "chain": s.chain,
            "audit_size": s.audit_size,
            "audit_head": s.audit_head,
            "uptime_seconds": s.uptime_seconds,
            "policy_hash": s.policy_hash,
        }));
    }
    let primary = s
        .keys
        .iter()
        .find(|k| k.state == state::PRIMARY)
        .map_or_else(
            || "none".to_owned(),
            |k| format!("version {}, {}", k.version, k.algorithm),
        );
    let rows = vec![
        vec!["version".to_owned(), s.version.clone()],
        vec![
            "storage".to_owned(),
            format!(
                "{}, {} (database and log)",
                s.storage_backend,
                human_bytes(s.storage_bytes)
            ),
        ],
        vec!["tokens".to_owned(), s.tokens.to_string()],
        vec![
            "key versions".to_owned(),
            format!("{} (primary: {primary})", s.keys.len()),
        ],
        vec![
            "audit chain".to_owned(),
            format!(
                "{}: {} events, head {}",
                s.chain, s.audit_size, s.audit_head
            ),
        ],
        vec!["uptime".to_owned(), human_duration(s.uptime_seconds)],
        vec!["policy".to_owned(), format!("sha256 {}", s.policy_hash)],
    ];
    let text = table(&["VAULT", ""], &rows);
    // The two-column table reads better without its header line.
    print!("{}", text.split_once('\n').map_or("", |(_, rest)| rest));
    println!();
    print!("{}", keys_table(&s.keys));
    Ok(())
}

/// Runs `completions`.
pub fn completions(args: CompletionsArgs) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "ordervault", &mut std::io::stdout());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_trailing_blanks() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["xyz".into(), "1".into(), String::new()],
                vec!["q".into(), "22".into(), "end".into()],
            ],
        );
        assert_eq!(t, "A    LONG HEADER  C\nxyz  1\nq    22           end\n");
    }

    #[test]
    fn key_states_read_as_operators_say_them() {
        let key = |state: &str, cap| v1::KeyInfo {
            version: 3,
            algorithm: "aes256gcm".into(),
            state: state.into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 0,
            }),
            ciphertexts: 12,
            encryptions: 40,
            encryption_cap: cap,
        };
        let t = keys_table(&[
            key("primary", 0),
            key("decrypt_only", 1 << 30),
            key("retired", 1 << 30),
        ]);
        assert_eq!(
            t,
            "VERSION  ALGORITHM  STATE         CREATED               CIPHERTEXTS  ENCRYPTIONS\n\
             3        aes256gcm  primary       2026-11-18T11:06:40Z  12           40 (no cap)\n\
             3        aes256gcm  decrypt-only  2026-11-18T11:06:40Z  12           40 of 1073741824\n\
             3        aes256gcm  retired       2026-11-18T11:06:40Z  12           -\n"
        );
    }

    #[test]
    fn durations_and_sizes_are_short() {
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3_725), "1h 2m 5s");
        assert_eq!(human_duration(90_061), "1d 1h 1m");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn server_messages_become_one_line() {
        let f = rpc_failure(tonic::Status::failed_precondition(
            "3 ciphertexts\nstill use",
        ));
        assert_eq!(f.code, 1);
        assert_eq!(f.message, "FAILED_PRECONDITION: 3 ciphertexts still use");
    }
}
