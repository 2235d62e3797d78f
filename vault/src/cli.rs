//! The `ordervault` command line: `serve`, `init` and `audit verify`; the
//! operator's `keys`, `principals`, `policy`, `status` and `completions` live
//! in [`crate::cli_admin`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::audit::Verifier;
use crate::engine::{DEFAULT_ENCRYPTION_CAP, EngineConfig, SystemClock};
use crate::setup::{self, CreatedPrincipal, DirState, Layout, SetupError};

/// Exit code for a usage error (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a configuration or data-directory problem (EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;

/// ordervault — a privacy vault for e-commerce order data.
#[derive(Debug, Parser)]
#[command(name = "ordervault", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the vault's gRPC server.
    Serve(ServeArgs),
    /// Initialise a data directory: master key, policy, first data key and an admin principal.
    Init(DataArgs),
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(crate::cli_audit::AuditCommand),
    /// Grants: who may reveal which order, for what, until when.
    #[command(subcommand)]
    Grants(crate::cli_grants::GrantsCommand),
    /// Measure throughput and latency against a vault it starts itself.
    Bench(crate::bench::BenchArgs),
    /// Data keys: list, rotate, rewrap, retire; rotate the master key (offline).
    #[command(subcommand)]
    Keys(crate::cli_admin::KeysCommand),
    /// API principals: create (prints the key once), list, revoke.
    #[command(subcommand)]
    Principals(crate::cli_admin::PrincipalsCommand),
    /// The role policy: check a file offline, or make the server reload its own.
    #[command(subcommand)]
    Policy(crate::cli_admin::PolicyCommand),
    /// The running vault: version, storage, key versions, tokens, audit head, uptime, policy.
    Status(crate::cli_admin::Remote),
    /// Print shell completions (bash, zsh, fish, ...) to stdout.
    Completions(crate::cli_admin::CompletionsArgs),
}

/// Where the vault's data lives.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Data directory (master key, policy, database).
    #[arg(long, env = "ORDERVAULT_DATA_DIR", default_value = "./ordervault-data")]
    pub data_dir: PathBuf,
    /// This node's id, naming its audit chain; unique among the nodes
    /// sharing a database.
    #[arg(long, env = "ORDERVAULT_NODE_ID", default_value = "node-1")]
    pub node_id: String,
    /// The database: `postgres://user[:password]@host[:port]/db` for a
    /// PostgreSQL store shared by several nodes. Default: the `[storage]`
    /// table of the data directory's ordervault.toml, else SQLite in the
    /// data directory.
    #[arg(
        long,
        env = "ORDERVAULT_STORAGE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub storage_url: Option<secrecy::SecretString>,
}

impl DataArgs {
    /// Where this node's vault lives.
    pub fn layout(&self) -> Result<Layout, SetupError> {
        let storage = setup::Storage::resolve(&self.data_dir, self.storage_url.as_ref())?;
        Ok(Layout::with_storage(&self.data_dir, storage))
    }
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data location.
    #[command(flatten)]
    pub data: DataArgs,
    /// Address to listen on.
    #[arg(long, env = "ORDERVAULT_LISTEN", default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,
    /// Development mode: initialise the data directory on first start, with a
    /// principal for every demo role, and print their API keys once.
    #[arg(long)]
    pub dev: bool,
    /// Most encryptions per AES-256-GCM data-key version (at most 2^32).
    #[arg(long, env = "ORDERVAULT_ENCRYPTION_CAP", default_value_t = DEFAULT_ENCRYPTION_CAP,
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32)))]
    pub encryption_cap: u64,
    /// Rotate an AES-256-GCM data key by itself when it nears its cap
    /// (`--auto-rotate false`: refuse encryptions past the cap instead).
    #[arg(long, env = "ORDERVAULT_AUTO_ROTATE", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub auto_rotate: bool,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,
}

/// A failure of a command, with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// One-line reason, with the next step.
    pub message: String,
}

impl From<SetupError> for Failure {
    fn from(e: SetupError) -> Self {
        Failure {
            code: EXIT_CONFIG,
            message: e.to_string(),
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Init(args) => {
            let layout = args.layout()?;
            let created = setup::init(&layout, &["admin"], &args.node_id, &SystemClock).await?;
            println!("ordervault: initialised {}", args.data_dir.display());
            print_keys(&created);
            println!(
                "Start it with: ordervault serve --data-dir {}",
                args.data_dir.display()
            );
            if let setup::Storage::Postgres(url) = &layout.storage {
                println!(
                    "with the same database ({}); further nodes need a copy of {} and their own --node-id",
                    crate::store::postgres::redacted(url.expose_secret()),
                    args.data_dir.display()
                );
            }
            Ok(())
        }
        Command::Audit(cmd) => crate::cli_audit::run(cmd).await,
        Command::Grants(cmd) => crate::cli_grants::run(cmd).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Keys(cmd) => crate::cli_admin::keys(cmd).await,
        Command::Principals(cmd) => crate::cli_admin::principals(cmd).await,
        Command::Policy(cmd) => crate::cli_admin::policy(cmd).await,
        Command::Status(remote) => crate::cli_admin::status(remote).await,
        Command::Completions(args) => crate::cli_admin::completions(args),
    }
}

fn print_keys(created: &[CreatedPrincipal]) {
    println!("API keys (shown only now; the vault stores only their hashes):");
    for p in created {
        println!("  {:<9} {}", p.name, p.api_key.expose_secret());
    }
}

fn print_dev_example(created: &[CreatedPrincipal], listen: SocketAddr) {
    let key = |role: &str| {
        created
            .iter()
            .find(|p| p.role == role)
            .map(|p| p.api_key.expose_secret().to_owned())
            .unwrap_or_default()
    };
    println!();
    println!("Try it (paste into another shell):");
    println!("  export ORDERVAULT_ADDR=http://{listen}");
    for role in ["shop", "courier", "supplier", "support", "auditor"] {
        println!("  export OV_{}_KEY={}", role.to_uppercase(), key(role));
    }
    println!("  cargo run --release -p ordervault-sdk --example checkout_flow");
    println!();
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let layout = args.data.layout()?;
    if args.dev && setup::dir_state(&layout).await? == DirState::Empty {
        let created = setup::init(
            &layout,
            &setup::DEMO_ROLES,
            &args.data.node_id,
            &SystemClock,
        )
        .await?;
        println!(
            "ordervault: initialised a DEVELOPMENT vault in {} (master key in {})",
            layout.dir.display(),
            layout.master_key().display()
        );
        print_keys(&created);
        print_dev_example(&created, args.listen);
    }
    let config = EngineConfig {
        chain: args.data.node_id.clone(),
        encryption_cap: args.encryption_cap,
        auto_rotate: args.auto_rotate,
        ..EngineConfig::default()
    };
    let (engine, store) = setup::open(&layout, Arc::new(SystemClock), config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure {
            code: EXIT_CONFIG,
            message: format!("cannot listen on {}: {e}", args.listen),
        })?;
    let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    // Handlers are in place before anyone is told the vault is up, so a
    // SIGTERM sent right after the "listening on" line drains gracefully.
    let stop = shutdown_signal()?;
    tracing::info!(%addr, data_dir = %layout.dir.display(), "ordervault listening");
    println!("ordervault: listening on {addr}");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(engine.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    stop.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(args.drain_seconds), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(fail(format!("server error: {e}"))),
        Ok(Err(e)) => return Err(fail(format!("server task failed: {e}"))),
        Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
    drop(engine);
    // Commits whatever the writer still holds before exiting.
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now (not at the first poll);
/// the returned future ends at the first of those signals.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| fail(format!("cannot install a signal handler: {e}")))
    };
    let mut int = install(SignalKind::interrupt())?;
    let mut term = install(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(windows)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    let mut ctrl_c = tokio::signal::windows::ctrl_c()
        .map_err(|e| fail(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(async move {
        ctrl_c.recv().await;
    })
}

#[cfg(not(any(unix, windows)))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Failure> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Verifies the audit chains stored in a data directory's database (every
/// chain, or only `only`), offline: every event's encoding, its indexed
/// copies and the hash chain. Token keys are derived with the vault's
/// secret mapping, so only the online Verify can check them; here, a vault
/// that writes none must hold none.
pub async fn verify_data_dir(args: DataArgs, only: Option<String>) -> Result<(), Failure> {
    let layout = args.layout()?;
    if setup::dir_state(&layout).await? != DirState::Initialised {
        return Err(SetupError::NotInitialised {
            dir: layout.dir.display().to_string(),
        }
        .into());
    }
    let store = layout.storage.open_existing(&layout).await?;
    let chains = match only {
        Some(chain) => vec![chain],
        None => store
            .audit_chains()
            .await
            .map_err(|e| fail(e.to_string()))?,
    };
    let result = async {
        let keyed = store
            .meta(crate::engine::META_TOKEN_IDS)
            .await
            .map_err(|e| fail(e.to_string()))?
            .is_some_and(|v| v == crate::token::TIME_ORDERED_V1);
        for chain in chains {
            let mut verifier = Verifier::default();
            let mut from = 1;
            loop {
                let page = store
                    .audit_events(&chain, from, 10_000)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let Some(last) = page.last() else { break };
                from = last.seq + 1;
                for e in &page {
                    verifier
                        .check(e)
                        .map_err(|e| fail(format!("audit chain {chain}: {e}")))?;
                    if !keyed && e.token_key.is_some() {
                        return Err(fail(format!(
                            "audit chain {chain}: audit log fails verification at seq {}: a token key on an event of a vault that writes none (row edited)",
                            e.seq
                        )));
                    }
                }
            }
            println!(
                "audit chain {}: {} events verified, head {}",
                chain,
                verifier.verified(),
                hex::encode(verifier.head())
            );
            if keyed {
                println!(
                    "audit chain {chain}: token keys (the index searches by token use) are checked by the online Verify only"
                );
            }
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}
