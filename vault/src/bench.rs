//! `ordervault bench`: measures this build of the vault on this machine.
//!
//! The bench starts its own vault as a child process (this executable with
//! `serve` on a scratch data directory and `127.0.0.1:0`), so the
//! server runs exactly as deployed — its own runtime, its own writer thread —
//! and its CPU time and peak memory can be read from `/proc/<pid>` apart from
//! the load generator's. Every call goes over real gRPC on loopback through
//! the generated `TokenServiceClient` with the `authorization: Bearer` entry
//! set by hand (the SDK, not a dependency of this crate, wraps the same
//! client).
//!
//! Each measured case runs `c` closed-loop workers: a worker sends a call,
//! waits for its reply and sends the next. A case first runs for the warm-up,
//! then for the measured window; only calls that complete inside the window
//! count, and each one's latency is kept (microseconds, one `Vec` per worker)
//! for exact percentiles at the end.
//!
//! | case | one call |
//! |---|---|
//! | `ping` | `Ping`: the gRPC stack and authentication alone, the baseline |
//! | `tokenize` | `Tokenize` of one phone number |
//! | `tokenize_order` | `TokenizeOrder` of an order with 8 sensitive fields |
//! | `tokenize_100` | `Tokenize` of 100 phone numbers |
//! | `reveal` | `Reveal` of one phone or address token, as the courier, for `delivery` |
//! | `reveal_100` | `Reveal` of 100 such tokens |
//! | `reveal_granted` | `Reveal` of one order's phone token, as support, for `customer_support`, under a grant for that order |
//!
//! A first `serve --dev` initialises the data directory and prints the demo
//! principals' API keys; the vault measured is a second `serve` on that
//! directory, after its `policy.toml` has lost its rate limits, daily caps
//! and grant requirements (`relax_policy`), so the numbers are
//! the vault's capacity, not how fast its abuse guards refuse a courier that
//! reveals thousands of fields a second. The one grant requirement kept is
//! support's, for `reveal_granted`: before that case runs, the shop
//! tokenizes [`GRANTED_ORDERS`] orders and grants each one to support, and
//! the bench checks that support is refused an order it was not granted, so
//! the case measures the grant check rather than a policy without one.
//!
//! Phone numbers, addresses, order numbers and e-mails come from one
//! counter and never repeat within a run, so deterministic kinds find no
//! existing token and every field is encrypted and stored (consignee names
//! cycle through 16,384 spellings, so a long `tokenize_order` run reuses
//! name tokens as repeat customers would). Reveals read a
//! pool of 10,000 tokens created before the first case (with `--preload`,
//! spread over the preloaded ones); each revealed token's audit event is
//! committed durably before the reply, as always.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ordervault_proto::v1;
use ordervault_proto::v1::admin_service_client::AdminServiceClient;
use ordervault_proto::v1::token_service_client::TokenServiceClient;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::cli::Failure;
use crate::engine::MAX_FIELDS_PER_REQUEST;

/// Linux reports process CPU time in clock ticks of `sysconf(_SC_CLK_TCK)`,
/// which is 100 on every mainstream Linux platform. Reading it would take a
/// libc dependency for one constant, so the bench assumes it and says so.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// Fields or tokens per call in the batched cases.
const BATCH: usize = 100;
/// Tokens created for the reveal cases before the first case runs.
const REVEAL_POOL: usize = 10_000;
/// Preload calls in flight: enough that the writer's group commit has
/// several batches to gather, few enough not to queue needlessly.
const PRELOAD_IN_FLIGHT: usize = 8;
/// How often the progress line is redrawn.
const TICK: Duration = Duration::from_millis(250);
/// How long to wait for the vault to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The purpose the courier states in the reveal cases.
const PURPOSE: &str = "delivery";
/// The role (and demo principal) of `reveal_granted`: the one whose grant
/// requirement the bench's policy keeps.
const GRANTED_ROLE: &str = "support";
/// The purpose support states, and its grants name.
const GRANTED_PURPOSE: &str = "customer_support";
/// Orders tokenized and granted to support before `reveal_granted` runs.
const GRANTED_ORDERS: usize = 1_000;
/// Orders tokenized and granted at once while setting up `reveal_granted`.
const GRANTS_IN_FLIGHT: usize = 16;
/// How long those grants last: longer than any run.
const GRANT_TTL_SECONDS: u32 = 86_400;

/// `bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Concurrency levels to measure, comma-separated: closed-loop workers,
    /// each with one call in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: Vec<u32>,
    /// Measured time per case and concurrency level ("10s", "500ms", "1m").
    #[arg(long, default_value = "10s", value_parser = parse_duration_flag)]
    pub duration: Duration,
    /// Unmeasured time before each measured window ("0s" for none).
    #[arg(long, default_value = "1s", value_parser = parse_warmup_flag)]
    pub warmup: Duration,
    /// Tokens to store before measuring, in Tokenize calls of 1000 fields
    /// with several in flight (half phone numbers, half addresses).
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// Storage backend of the measured vault: `sqlite` (a file in a scratch
    /// directory) or `postgres` (a scratch database on the server `--url`
    /// names, dropped afterwards).
    #[arg(long, default_value = "sqlite", value_parser = parse_store)]
    pub store: StoreBackend,
    /// With `--store postgres`: the PostgreSQL server, as
    /// `postgres://user[:password]@host[:port]/db` (any existing database;
    /// the bench creates its own beside it).
    #[arg(
        long,
        env = "ORDERVAULT_STORAGE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub url: Option<SecretString>,
    /// With `--store postgres`: vault nodes to start on the one database;
    /// connections are spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub nodes: u32,
    /// Cases to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ping,tokenize,tokenize_order,tokenize_100,reveal,reveal_100,reveal_granted"
    )]
    pub cases: Vec<Case>,
    /// HTTP/2 connections the workers share, round robin (a service using
    /// the SDK typically holds one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Times to run the whole list, one round after another on the same
    /// vault. With more than one, each row is the round with the median
    /// calls/s, and its ratio to ping the median of each round's own ratio:
    /// on a shared machine a ping measured minutes before a case can be a
    /// third off.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Instead of the token cases: fill the audit log with this many events
    /// (reveals of 10,000 orders) and measure what auditors do with it: the
    /// first page of a query by principal over a day, a full online
    /// verification, and a trace of 10,000 leaked records.
    #[arg(long, default_value_t = 0)]
    pub audit_events: u64,

    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A storage backend the bench can run the vault on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreBackend {
    /// The embedded SQLite store in the data directory.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

impl StoreBackend {
    fn as_str(self) -> &'static str {
        match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Postgres => "postgres",
        }
    }
}

/// What one call of a case does; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    /// Authenticated no-op: the baseline.
    Ping,
    /// Tokenize of one phone number.
    Tokenize,
    /// TokenizeOrder of an order with 8 sensitive fields.
    #[value(name = "tokenize_order")]
    TokenizeOrder,
    /// Tokenize of 100 phone numbers.
    #[value(name = "tokenize_100")]
    Tokenize100,
    /// Reveal of one token.
    Reveal,
    /// Reveal of 100 tokens.
    #[value(name = "reveal_100")]
    Reveal100,
    /// Reveal of one order's phone token under a grant for that order.
    #[value(name = "reveal_granted")]
    RevealGranted,
}

impl Case {
    fn as_str(self) -> &'static str {
        match self {
            Case::Ping => "ping",
            Case::Tokenize => "tokenize",
            Case::TokenizeOrder => "tokenize_order",
            Case::Tokenize100 => "tokenize_100",
            Case::Reveal => "reveal",
            Case::Reveal100 => "reveal_100",
            Case::RevealGranted => "reveal_granted",
        }
    }

    /// Values tokenized or revealed per call.
    fn fields_per_call(self) -> u64 {
        match self {
            Case::Ping => 0,
            Case::Tokenize | Case::Reveal | Case::RevealGranted => 1,
            Case::TokenizeOrder => ORDER_FIELDS,
            Case::Tokenize100 | Case::Reveal100 => BATCH as u64,
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// `--duration`: a humantime duration ("10s", "1m30s"), or bare seconds.
fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    let d = parse_warmup_flag(s)?;
    if d.is_zero() {
        return Err("the measured time must be longer than zero".into());
    }
    Ok(d)
}

/// `--warmup`: like `--duration`, but zero is allowed.
fn parse_warmup_flag(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 10s, 500ms or 1m"))
}

fn parse_store(s: &str) -> Result<StoreBackend, String> {
    match s {
        "sqlite" => Ok(StoreBackend::Sqlite),
        "postgres" | "postgresql" => Ok(StoreBackend::Postgres),
        other => Err(format!(
            "unknown store {other:?}; use `sqlite` or `postgres`"
        )),
    }
}

/// Runs the bench: starts a vault, preloads, measures every case at every
/// concurrency level, prints the table (or JSON), and stops the vault.
pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    let database = match (args.store, &args.url) {
        (StoreBackend::Sqlite, _) if args.nodes > 1 => {
            return Err(Failure {
                code: crate::cli::EXIT_USAGE,
                message: "--nodes needs --store postgres: nodes share one database".into(),
            });
        }
        (StoreBackend::Sqlite, _) => None,
        (StoreBackend::Postgres, None) => {
            return Err(Failure {
                code: crate::cli::EXIT_USAGE,
                message: "--store postgres needs --url postgres://user@host:port/db (or ORDERVAULT_STORAGE_URL)".into(),
            });
        }
        (StoreBackend::Postgres, Some(url)) => {
            let scratch = crate::store::postgres::create_scratch_database(url)
                .await
                .map_err(|e| fail(format!("cannot create a scratch database: {e}")))?;
            Some((url.clone(), scratch))
        }
    };
    let progress = Progress::new();
    progress.note("starting a development vault");
    // Dropped in reverse order: the server is stopped before its directory
    // is removed, on every path out of this function.
    let scratch = ScratchDir::create()?;
    let started = {
        let dir = scratch.path().to_owned();
        let storage = database.as_ref().map(|(_, s)| s.clone());
        let nodes = args.nodes;
        tokio::task::spawn_blocking(move || Server::start(&dir, storage.as_ref(), nodes))
            .await
            .map_err(|e| fail(format!("the start-up task failed: {e}")))
            .and_then(|r| r)
    };
    let server = match started {
        Ok(server) => server,
        Err(e) => {
            drop_database(database).await;
            return Err(e);
        }
    };
    if database.is_some()
        && let Err(e) = server.publish_policy().await
    {
        drop(server);
        drop_database(database).await;
        return Err(e);
    }
    // Either the token cases or, with --audit-events, the audit cases.
    enum Outcome {
        Cases(Report),
        Audit(crate::bench_audit::AuditReport),
    }
    let work = async {
        if args.audit_events > 0 {
            crate::bench_audit::run(&server, args.audit_events, &progress)
                .await
                .map(Outcome::Audit)
        } else {
            bench(&args, &server, &progress).await.map(Outcome::Cases)
        }
    };
    let outcome = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(Failure {
            code: 130,
            message: "interrupted; the bench's vault was stopped and its data removed".into(),
        }),
    };
    progress.clear();
    drop(server);
    drop(scratch);
    drop_database(database).await;
    let report = match outcome? {
        Outcome::Cases(report) => report,
        Outcome::Audit(audit) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&audit).unwrap_or_default()
                );
            } else {
                print!("{}", crate::bench_audit::render(&audit));
            }
            return Ok(());
        }
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| fail(format!("cannot encode the report as JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}

async fn bench(args: &BenchArgs, server: &Server, progress: &Progress) -> Result<Report, Failure> {
    let mut clients = Vec::with_capacity(args.connections as usize);
    for i in 0..args.connections.max(server.urls.len() as u32) {
        clients.push(server.connect(i as usize).await?);
    }
    let mut ctx = Arc::new(Ctx {
        shop: server.shop.clone(),
        courier: server.courier.clone(),
        support: server.support.clone(),
        next_value: AtomicU64::new(0),
        pool: Vec::new(),
        granted: Vec::new(),
    });
    let (preload, preloaded) = if args.preload > 0 {
        let (report, sample) = preload(args.preload, &clients, &ctx, progress).await?;
        (Some(report), sample)
    } else {
        (None, Vec::new())
    };
    let needs_pool = args
        .cases
        .iter()
        .any(|c| matches!(c, Case::Reveal | Case::Reveal100));
    if needs_pool {
        let mut pool = preloaded;
        if pool.len() < REVEAL_POOL {
            let missing = REVEAL_POOL - pool.len();
            progress.note(&format!("creating {missing} tokens for the reveal cases"));
            pool.extend(reveal_pool(&clients[0], &ctx, missing).await?);
        }
        Arc::get_mut(&mut ctx)
            .ok_or_else(|| fail("internal error: preload tasks still hold the bench's state"))?
            .pool = pool;
    }
    if args.cases.contains(&Case::RevealGranted) {
        progress.note(&format!(
            "tokenizing {GRANTED_ORDERS} orders and granting them to {GRANTED_ROLE} for reveal_granted"
        ));
        let nodes = server.urls.len().min(clients.len());
        let granted = granted_pool(&clients[..nodes], &ctx, GRANTED_ORDERS).await?;
        Arc::get_mut(&mut ctx)
            .ok_or_else(|| fail("internal error: preload tasks still hold the bench's state"))?
            .granted = granted;
    }

    let mut admin = server.admin_client().await?;
    let rounds = args.rounds as usize;
    let per_round = args.cases.len() * args.concurrency.len();
    let total = per_round * rounds;
    let mut each_round = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut results = Vec::with_capacity(per_round);
        for &case in &args.cases {
            for &c in &args.concurrency {
                let n = (round - 1) * per_round + results.len() + 1;
                let of_round = if rounds > 1 {
                    format!("round {round}/{rounds}: ")
                } else {
                    String::new()
                };
                let step = format!(
                    "[{n}/{total}] {of_round}{} at concurrency {c}",
                    case.as_str()
                );
                let load = Load {
                    clients: &clients,
                    ctx: &ctx,
                    server_pids: &server.pids,
                };
                let stored = server.stored_tokens(&mut admin).await?;
                let mut m = measure(case, c, args, &load, &step, progress).await?;
                m.stored_tokens = Some(stored);
                results.push(m);
            }
        }
        compare_with_ping(&mut results);
        each_round.push(results);
    }
    let results = median_of_rounds(&each_round);
    if rounds == 1 {
        each_round.clear();
    }
    Ok(Report {
        version: env!("CARGO_PKG_VERSION"),
        store: args.store.as_str(),
        nodes: server.pids.len(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        connections: args.connections,
        client: "generated tonic client (ordervault-proto)",
        clock_ticks_per_second: CLOCK_TICKS_PER_SECOND,
        preload,
        rounds: args.rounds,
        results,
        each_round,
    })
}

// ---------------------------------------------------------------------------
// The vault under test.

/// A directory under the system temp dir, removed with everything in it
/// when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<ScratchDir, Failure> {
        let name = format!(
            "ordervault-bench-{}",
            hex::encode(crate::crypto::random_bytes::<8>())
        );
        let path = std::env::temp_dir().join(name);
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            // The vault's master key will live here.
            builder.mode(0o700);
        }
        builder.create(&path).map_err(|e| {
            fail(format!(
                "cannot create a scratch directory {}: {e}; set TMPDIR to a writable directory",
                path.display()
            ))
        })?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The child process, killed and reaped when dropped.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGKILL: its data directory is thrown away, so there is nothing
        // to flush.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Drops the bench's scratch PostgreSQL database, if it made one.
async fn drop_database(database: Option<(SecretString, SecretString)>) {
    if let Some((url, scratch)) = database
        && let Err(e) = crate::store::postgres::drop_scratch_database(&url, &scratch).await
    {
        eprintln!("ordervault bench: could not drop its scratch database: {e}");
    }
}

/// The running vault nodes (`ordervault serve`) and the keys printed when
/// the first initialised the vault.
pub(crate) struct Server {
    // Held only to kill the vaults when the bench ends.
    _processes: Vec<ServerProcess>,
    /// The first node's pid and address.
    pub(crate) pid: u32,
    pub(crate) url: String,
    /// Every node's.
    pub(crate) pids: Vec<u32>,
    pub(crate) urls: Vec<String>,
    pub(crate) shop: MetadataValue<Ascii>,
    pub(crate) courier: MetadataValue<Ascii>,
    pub(crate) auditor: MetadataValue<Ascii>,
    support: MetadataValue<Ascii>,
    admin: MetadataValue<Ascii>,
}

impl Server {
    /// Starts the vault to be measured in `dir` (blocking): a first
    /// `serve --dev` initialises the data directory and prints the API keys,
    /// then, with the policy's limits lifted (see [`relax_policy`]), a
    /// second `serve` on the same directory is the one measured.
    fn start(dir: &Path, storage: Option<&SecretString>, nodes: u32) -> Result<Server, Failure> {
        let (first, _, banner) = spawn_vault(dir, true, storage, "node-1")?;
        let bearer = |principal: &str| -> Result<MetadataValue<Ascii>, Failure> {
            let key = banner_key(&banner, principal).ok_or_else(|| {
                fail(format!(
                    "the vault printed no API key for `{principal}`; is {} a fresh directory?",
                    dir.display()
                ))
            })?;
            let header = Zeroizing::new(format!("Bearer {}", key.as_str()));
            let mut value: MetadataValue<Ascii> = header
                .parse()
                .map_err(|_| fail(format!("the API key of `{principal}` is not ASCII")))?;
            value.set_sensitive(true);
            Ok(value)
        };
        let shop = bearer("shop")?;
        let courier = bearer("courier")?;
        let auditor = bearer("auditor")?;
        let support = bearer(GRANTED_ROLE)?;
        let admin = bearer("admin")?;
        // Every acknowledged write of the initialisation is durable, so a
        // SIGKILL loses nothing.
        drop(first);
        let policy = dir.join("data").join(crate::setup::POLICY_FILE);
        let text = std::fs::read_to_string(&policy)
            .map_err(|e| fail(format!("cannot read {}: {e}", policy.display())))?;
        std::fs::write(&policy, relax_policy(&text))
            .map_err(|e| fail(format!("cannot write {}: {e}", policy.display())))?;
        // Nodes of a shared database share the data directory too: it holds
        // only the master key and the policy file.
        let (mut processes, mut pids, mut urls) = (Vec::new(), Vec::new(), Vec::new());
        for n in 1..=nodes {
            let (process, addr, _) = spawn_vault(dir, false, storage, &format!("node-{n}"))?;
            pids.push(process.0.id());
            urls.push(format!("http://{addr}"));
            processes.push(process);
        }
        Ok(Server {
            _processes: processes,
            pid: pids[0],
            url: urls[0].clone(),
            pids,
            urls,
            shop,
            courier,
            auditor,
            support,
            admin,
        })
    }

    /// A client of the first node's admin service, for
    /// [`Server::stored_tokens`].
    async fn admin_client(&self) -> Result<AdminServiceClient<Channel>, Failure> {
        Ok(AdminServiceClient::new(self.channel().await?))
    }

    /// The tokens in the store when asked, as the first node counts them
    /// (`AdminService::Status`; the nodes of a shared database count the
    /// same rows). Every case's row carries it: the cases that tokenize
    /// grow the store, and later cases and rounds run on a larger one.
    async fn stored_tokens(&self, admin: &mut AdminServiceClient<Channel>) -> Result<u64, Failure> {
        admin
            .status(authorized(v1::StatusRequest {}, &self.admin))
            .await
            .map(|r| r.into_inner().tokens)
            .map_err(|e| fail(format!("cannot count the stored tokens: {}", e.message())))
    }

    /// On a shared database the policy in force is the stored one: makes
    /// every node publish and apply the relaxed policy file.
    async fn publish_policy(&self) -> Result<(), Failure> {
        for url in &self.urls {
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| fail(format!("bad vault address {url}: {e}")))?
                .connect()
                .await
                .map_err(|e| fail(format!("cannot connect to the vault at {url}: {e}")))?;
            AdminServiceClient::new(channel)
                .reload_policy(authorized(v1::ReloadPolicyRequest {}, &self.admin))
                .await
                .map_err(|e| fail(format!("cannot publish the bench policy: {}", e.message())))?;
        }
        Ok(())
    }

    pub(crate) async fn channel(&self) -> Result<Channel, Failure> {
        Endpoint::from_shared(self.url.clone())
            .map_err(|e| fail(format!("bad vault address {}: {e}", self.url)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| fail(format!("cannot connect to the vault at {}: {e}", self.url)))
    }

    /// A connection to node `i % nodes`.
    async fn connect(&self, i: usize) -> Result<TokenServiceClient<Channel>, Failure> {
        let url = &self.urls[i % self.urls.len()];
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| fail(format!("bad vault address {url}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| fail(format!("cannot connect to the vault at {url}: {e}")))?;
        Ok(TokenServiceClient::new(channel))
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("pid", &self.pid)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Starts this executable as `ordervault serve` on `dir/data` and a free
/// loopback port, and waits (blocking, no sleeping) for its "listening on"
/// line. Returns the process, its address and the lines printed before.
fn spawn_vault(
    dir: &Path,
    dev: bool,
    storage: Option<&SecretString>,
    node_id: &str,
) -> Result<(ServerProcess, String, Vec<Zeroizing<String>>), Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| fail(format!("cannot find this executable to start a vault: {e}")))?;
    let log = dir.join("server.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
    let mut command = Command::new(exe);
    command.arg("serve").args(["--node-id", node_id]);
    if dev {
        command.arg("--dev");
    }
    // In the environment, not the arguments: the URL may hold a password.
    match storage {
        Some(url) => command.env(crate::setup::STORAGE_URL_ENV, url.expose_secret()),
        None => command.env_remove(crate::setup::STORAGE_URL_ENV),
    };
    let child = command
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen", "127.0.0.1:0"])
        // The scratch vault makes its own master key and keeps the default cap.
        .env_remove("ORDERVAULT_MASTER_KEY")
        .env_remove("ORDERVAULT_ENCRYPTION_CAP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|e| fail(format!("cannot start the vault: {e}")))?;
    let mut process = ServerProcess(child);
    let stdout = process
        .0
        .stdout
        .take()
        .ok_or_else(|| fail("the vault's stdout was not captured"))?;
    let mut reader = BufReader::new(stdout);
    let mut banner = Vec::new();
    let addr = loop {
        let mut line = Zeroizing::new(String::new());
        let n = reader
            .read_line(&mut line)
            .map_err(|e| fail(format!("cannot read the vault's output: {e}")))?;
        if n == 0 {
            let status = process
                .0
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(fail(format!(
                "the vault exited ({status}) before listening; its log:\n{}",
                log_text.trim_end()
            )));
        }
        if let Some(addr) = listening_addr(&line) {
            break addr.to_owned();
        }
        banner.push(line);
    };
    // Keep draining stdout so the vault never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    Ok((process, addr, banner))
}

/// The policy text without its abuse limits: per-role and per-principal
/// `rate`, `daily_distinct_orders` and `requires_grant` lines are dropped,
/// so the bench measures what the vault can do rather than how fast the
/// guards refuse (a courier may otherwise reveal 600 fields a minute, and
/// only under a grant). Everything else, visibility included, is kept, and
/// so is [`GRANTED_ROLE`]'s grant requirement, which `reveal_granted`
/// measures.
fn relax_policy(text: &str) -> String {
    const LIMITS: [&str; 3] = ["rate", "daily_distinct_orders", "requires_grant"];
    let granted_section = format!("roles.{GRANTED_ROLE}");
    let mut section = String::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            section = name.trim().to_owned();
        }
        let limit = line.split_once('=').is_some_and(|(key, _)| {
            let key = key.trim();
            LIMITS.contains(&key) && !(key == "requires_grant" && section == granted_section)
        });
        if !limit {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The address in the vault's "ordervault: listening on ADDR" line.
fn listening_addr(line: &str) -> Option<&str> {
    line.trim().strip_prefix("ordervault: listening on ")
}

/// The API key printed for `principal` in the `serve --dev` banner, whose
/// key lines read `  <name> <key>`.
fn banner_key(banner: &[Zeroizing<String>], principal: &str) -> Option<Zeroizing<String>> {
    banner.iter().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some(principal) {
            return None;
        }
        words
            .next()
            .filter(|k| k.starts_with("ovk_"))
            .map(|k| Zeroizing::new(k.to_owned()))
    })
}

// ---------------------------------------------------------------------------
// What the server process costs, from /proc.

/// User plus system CPU time of a process, in clock ticks, from the text of
/// `/proc/<pid>/stat` (proc(5): fields 14 `utime` and 15 `stime`).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2, the command name, is in parentheses and may hold spaces or
    // parentheses itself: count fields from after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state), so utime is its 12th field.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set size in KiB (`VmHWM`) from the text of
/// `/proc/<pid>/status`.
fn parse_peak_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib)
}

fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let ticks = parse_cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    Some(ticks as f64 / CLOCK_TICKS_PER_SECOND)
}

/// CPU time of every local `postgres` process (the database server of a
/// `--store postgres` run on this machine); `None` when none runs here.
fn database_cpu_seconds() -> Option<f64> {
    let mut ticks = 0u64;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains("(postgres)")
            && let Some(t) = parse_cpu_ticks(&stat)
        {
            ticks += t;
            found = true;
        }
    }
    found.then(|| ticks as f64 / CLOCK_TICKS_PER_SECOND)
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_peak_rss_kib(&status)? as f64 / 1024.0)
}

// ---------------------------------------------------------------------------
// The load.

/// Tokenized fields in [`sample_order`].
const ORDER_FIELDS: u64 = 8;

/// What the workers share.
struct Ctx {
    shop: MetadataValue<Ascii>,
    courier: MetadataValue<Ascii>,
    support: MetadataValue<Ascii>,
    /// Source of distinct values; see [`phone`].
    next_value: AtomicU64,
    /// Courier-visible tokens for the reveal cases.
    pool: Vec<String>,
    /// Phone tokens of orders granted to support, for `reveal_granted`.
    granted: Vec<String>,
}

impl Ctx {
    /// Reserves `n` distinct value numbers.
    fn values(&self, n: u64) -> u64 {
        self.next_value.fetch_add(n, Ordering::Relaxed)
    }
}

/// The `n`th phone number: a Chinese mobile number, distinct for every `n`
/// below 10^10.
pub(crate) fn phone(n: u64) -> String {
    format!("+86 1{:010}", n % 10_000_000_000)
}

/// The `n`th address.
pub(crate) fn address(n: u64) -> String {
    format!("浙江省杭州市西湖区文三路{n}号")
}

/// Common given-name characters; with the surnames below, 16·32·32 names.
const GIVEN: [char; 32] = [
    '伟', '芳', '娜', '敏', '静', '丽', '强', '磊', '军', '洋', '勇', '艳', '杰', '娟', '涛', '明',
    '超', '秀', '霞', '平', '刚', '桂', '英', '华', '玉', '萍', '红', '鹏', '辉', '玲', '建', '文',
];
const SURNAMES: [char; 16] = [
    '王', '李', '张', '刘', '陈', '杨', '黄', '赵', '吴', '周', '徐', '孙', '马', '朱', '胡', '郭',
];

/// The `n`th consignee name; repeats only every 16,384 orders.
pub(crate) fn name(n: u64) -> String {
    let i = n as usize;
    [
        SURNAMES[i % 16],
        GIVEN[(i / 16) % 32],
        GIVEN[(i / 512) % 32],
    ]
    .iter()
    .collect()
}

/// The `n`th order: 8 tokenized fields (order number, name, phone, address,
/// email, time of purchase, one item's title and unit price) plus the
/// item's pass-through SKU, quantity and currency.
pub(crate) fn sample_order(n: u64) -> v1::Order {
    v1::Order {
        order_number: format!("BN{n:012}"),
        customer_id: String::new(),
        consignee: Some(v1::Consignee {
            name: name(n),
            phone: phone(n),
            address: address(n),
            id_number: String::new(),
            email: format!("c{n}@example.com"),
        }),
        items: vec![v1::LineItem {
            sku: "SKU-EAR-PRO".into(),
            title: "无线蓝牙耳机 Pro".into(),
            quantity: 1,
            unit_price: "199.00".into(),
            currency: "CNY".into(),
        }],
        placed_at: Some(prost_types::Timestamp {
            seconds: 1_795_000_000 + (n % 86_400) as i64,
            nanos: 0,
        }),
    }
}

/// `count` fields from value number `first` on, alternating phone numbers
/// and addresses when `mixed`, else phone numbers only.
fn fields(first: u64, count: usize, mixed: bool) -> Vec<v1::Field> {
    (first..first + count as u64)
        .map(|n| {
            if mixed && n % 2 == 1 {
                v1::Field {
                    kind: v1::FieldKind::Address as i32,
                    value: address(n),
                }
            } else {
                v1::Field {
                    kind: v1::FieldKind::Phone as i32,
                    value: phone(n),
                }
            }
        })
        .collect()
}

pub(crate) fn authorized<T>(message: T, key: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", key.clone());
    request
}

/// Why a call did not do what the case expects.
fn refused(what: &str, status: &tonic::Status) -> String {
    format!(
        "{what}: the vault answered {:?}: {}",
        status.code(),
        status.message()
    )
}

async fn tokenize(
    client: &mut TokenServiceClient<Channel>,
    ctx: &Ctx,
    fields: Vec<v1::Field>,
) -> Result<Vec<String>, String> {
    let sent = fields.len();
    let reply = client
        .tokenize(authorized(v1::TokenizeRequest { fields }, &ctx.shop))
        .await
        .map_err(|s| refused("tokenize", &s))?
        .into_inner();
    if reply.tokens.len() != sent {
        return Err(format!(
            "tokenize: {sent} fields sent, {} tokens back",
            reply.tokens.len()
        ));
    }
    Ok(reply.tokens)
}

/// One call of `case`. `cursor` walks the reveal pool.
async fn call(
    case: Case,
    client: &mut TokenServiceClient<Channel>,
    ctx: &Ctx,
    cursor: &mut usize,
) -> Result<(), String> {
    match case {
        Case::Ping => {
            client
                .ping(authorized(v1::PingRequest {}, &ctx.shop))
                .await
                .map_err(|s| refused("ping", &s))?;
        }
        Case::Tokenize => {
            tokenize(client, ctx, fields(ctx.values(1), 1, false)).await?;
        }
        Case::Tokenize100 => {
            tokenize(client, ctx, fields(ctx.values(BATCH as u64), BATCH, false)).await?;
        }
        Case::TokenizeOrder => {
            tokenize_sample_order(client, ctx).await?;
        }
        Case::RevealGranted => {
            let token = ctx.granted[*cursor % ctx.granted.len()].clone();
            *cursor = (*cursor + 1) % ctx.granted.len();
            let reply = reveal_as_support(client, ctx, token).await?;
            if reply.disclosure != v1::Disclosure::Masked as i32 {
                return Err(format!(
                    "reveal_granted: the phone token of a granted order came back {:?}, not masked{}",
                    v1::Disclosure::try_from(reply.disclosure).unwrap_or_default(),
                    denial(&reply)
                ));
            }
        }
        Case::Reveal | Case::Reveal100 => {
            let n = case.fields_per_call() as usize;
            let pool = &ctx.pool;
            let tokens: Vec<String> = (0..n)
                .map(|i| pool[(*cursor + i) % pool.len()].clone())
                .collect();
            *cursor = (*cursor + n) % pool.len();
            let fields = reveal_as(client, case.as_str(), &ctx.courier, PURPOSE, tokens).await?;
            let plain = fields
                .iter()
                .filter(|f| f.disclosure == v1::Disclosure::Plain as i32)
                .count();
            if plain != n {
                return Err(format!(
                    "{}: {n} tokens sent, {plain} revealed in plain (the courier should see phone numbers and addresses)",
                    case.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// A reveal of `tokens` for `purpose` by the principal whose key is `key`;
/// a refusal is reported as the `case`'s.
async fn reveal_as(
    client: &mut TokenServiceClient<Channel>,
    case: &str,
    key: &MetadataValue<Ascii>,
    purpose: &str,
    tokens: Vec<String>,
) -> Result<Vec<v1::RevealedField>, String> {
    Ok(client
        .reveal(authorized(
            v1::RevealRequest {
                tokens,
                purpose: purpose.into(),
            },
            key,
        ))
        .await
        .map_err(|s| refused(case, &s))?
        .into_inner()
        .fields)
}

/// Support's reveal of one token for [`GRANTED_PURPOSE`].
async fn reveal_as_support(
    client: &mut TokenServiceClient<Channel>,
    ctx: &Ctx,
    token: String,
) -> Result<v1::RevealedField, String> {
    reveal_as(
        client,
        Case::RevealGranted.as_str(),
        &ctx.support,
        GRANTED_PURPOSE,
        vec![token],
    )
    .await?
    .into_iter()
    .next()
    .ok_or_else(|| "reveal_granted: one token sent, no field back".to_owned())
}

/// `" (denied: REASON)"` for a denied field, else nothing.
fn denial(field: &v1::RevealedField) -> String {
    if field.denial_reason.is_empty() {
        String::new()
    } else {
        format!(" (denied: {})", field.denial_reason)
    }
}

/// The shop tokenizes the next [`sample_order`]: its order token and its
/// phone token (the `tokenize_order` case, and `reveal_granted`'s orders).
async fn tokenize_sample_order(
    client: &mut TokenServiceClient<Channel>,
    ctx: &Ctx,
) -> Result<(String, String), String> {
    let reply = client
        .tokenize_order(authorized(
            v1::TokenizeOrderRequest {
                order: Some(sample_order(ctx.values(1))),
            },
            &ctx.shop,
        ))
        .await
        .map_err(|s| refused("tokenize_order", &s))?
        .into_inner();
    let order = reply
        .order
        .filter(|o| !o.order_token.is_empty())
        .ok_or("tokenize_order: the reply holds no order token")?;
    let phone = order
        .consignee
        .map(|c| c.phone)
        .filter(|p| !p.is_empty())
        .ok_or("tokenize_order: the reply holds no phone token")?;
    Ok((order.order_token, phone))
}

/// Phone tokens of `count` orders the shop tokenized and granted to
/// [`GRANTED_ROLE`] for [`GRANTED_PURPOSE`], through the first of
/// `clients`, [`GRANTS_IN_FLIGHT`] orders at a time. Fails unless support
/// is refused the phone token of an order it was not granted, through each
/// of `clients` (one per node): without the grant requirement in force,
/// `reveal_granted` would not measure it.
async fn granted_pool(
    clients: &[TokenServiceClient<Channel>],
    ctx: &Arc<Ctx>,
    count: usize,
) -> Result<Vec<String>, Failure> {
    let client = clients
        .first()
        .cloned()
        .ok_or_else(|| fail("internal error: no connection to the vault"))?;
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..GRANTS_IN_FLIGHT.min(count) {
        let (mut client, ctx, claimed) = (client.clone(), ctx.clone(), claimed.clone());
        tasks.spawn(async move {
            let mut phones = Vec::new();
            while claimed.fetch_add(1, Ordering::Relaxed) < count {
                let (order_token, phone) = tokenize_sample_order(&mut client, &ctx).await?;
                client
                    .grant(authorized(
                        v1::GrantRequest {
                            principal: GRANTED_ROLE.into(),
                            order_token,
                            purpose: GRANTED_PURPOSE.into(),
                            ttl_seconds: GRANT_TTL_SECONDS,
                        },
                        &ctx.shop,
                    ))
                    .await
                    .map_err(|s| refused("grant", &s))?;
                phones.push(phone);
            }
            Ok::<_, String>(phones)
        });
    }
    let mut pool = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(mut phones)) => pool.append(&mut phones),
            Ok(Err(e)) => return Err(fail(e)),
            Err(e) => return Err(fail(format!("a grant task failed: {e}"))),
        }
    }
    for node in clients {
        let mut node = node.clone();
        let (_, ungranted) = tokenize_sample_order(&mut node, ctx).await.map_err(fail)?;
        let field = reveal_as_support(&mut node, ctx, ungranted)
            .await
            .map_err(fail)?;
        if field.disclosure != v1::Disclosure::Denied as i32
            || field.denial_reason != crate::engine::reason::NO_GRANT
        {
            return Err(fail(format!(
                "{GRANTED_ROLE} was not refused an order it was not granted (disclosure {:?}{}): the bench's policy does not require its grants, so reveal_granted would not measure the grant check",
                v1::Disclosure::try_from(field.disclosure).unwrap_or_default(),
                denial(&field)
            )));
        }
    }
    Ok(pool)
}

/// Phone and address tokens for the reveal cases.
async fn reveal_pool(
    client: &TokenServiceClient<Channel>,
    ctx: &Ctx,
    count: usize,
) -> Result<Vec<String>, Failure> {
    let mut client = client.clone();
    let mut pool = Vec::with_capacity(count);
    while pool.len() < count {
        let n = (count - pool.len()).min(MAX_FIELDS_PER_REQUEST);
        let batch = fields(ctx.values(n as u64), n, true);
        pool.extend(tokenize(&mut client, ctx, batch).await.map_err(fail)?);
    }
    Ok(pool)
}

/// How the preload went.
#[derive(Debug, Clone, serde::Serialize)]
struct PreloadReport {
    tokens: u64,
    calls: u64,
    fields_per_call: usize,
    in_flight: usize,
    seconds: f64,
    tokens_per_s: f64,
}

/// Stores `total` tokens in calls of [`MAX_FIELDS_PER_REQUEST`] fields,
/// [`PRELOAD_IN_FLIGHT`] at a time. Also returns up to [`REVEAL_POOL`] of
/// the tokens, evenly spread over the preload, so the reveal cases read
/// rows from all over the store rather than only the newest.
async fn preload(
    total: u64,
    clients: &[TokenServiceClient<Channel>],
    ctx: &Arc<Ctx>,
    progress: &Progress,
) -> Result<(PreloadReport, Vec<String>), Failure> {
    let per_call = MAX_FIELDS_PER_REQUEST as u64;
    let stride = (total / REVEAL_POOL as u64).max(1);
    let claimed = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..PRELOAD_IN_FLIGHT {
        let mut client = clients[i % clients.len()].clone();
        let (ctx, claimed, stored, calls) =
            (ctx.clone(), claimed.clone(), stored.clone(), calls.clone());
        tasks.spawn(async move {
            let mut sample = Vec::new();
            loop {
                let from = claimed.fetch_add(per_call, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, String>(sample);
                }
                let n = per_call.min(total - from);
                let batch = fields(ctx.values(n), n as usize, true);
                let tokens = tokenize(&mut client, &ctx, batch).await?;
                sample.extend(
                    (from..)
                        .zip(tokens)
                        .filter(|(i, _)| i % stride == 0)
                        .map(|(_, t)| t),
                );
                stored.fetch_add(n, Ordering::Relaxed);
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    progress.note(&format!("preloading {total} tokens"));
    let mut sample = Vec::new();
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(mut tokens))) => sample.append(&mut tokens),
                Some(Ok(Err(e))) => return Err(fail(format!("preload failed: {e}"))),
                Some(Err(e)) => return Err(fail(format!("a preload task failed: {e}"))),
            },
            () = tokio::time::sleep(TICK) => {
                let done = stored.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                progress.update(&format!(
                    "preload: {done} / {total} tokens, {:.0} tokens/s",
                    done as f64 / secs
                ));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = PreloadReport {
        tokens: total,
        calls: calls.load(Ordering::Relaxed),
        fields_per_call: MAX_FIELDS_PER_REQUEST,
        in_flight: PRELOAD_IN_FLIGHT,
        seconds,
        tokens_per_s: total as f64 / seconds,
    };
    progress.done(&format!(
        "preload: {total} tokens in {seconds:.1} s ({:.0} tokens/s)",
        report.tokens_per_s
    ));
    sample.truncate(REVEAL_POOL);
    Ok((report, sample))
}

/// One case at one concurrency level.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Measurement {
    case: &'static str,
    concurrency: u32,
    /// Calls completed inside the measured window.
    calls: u64,
    seconds: f64,
    calls_per_s: f64,
    /// `None` for ping, which carries no fields.
    fields_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    server_cpu_s_per_1k_calls: Option<f64>,
    /// The load generator's own CPU time: on a small machine it competes
    /// with the server for the same cores.
    client_cpu_s_per_1k_calls: Option<f64>,
    /// The local database server's CPU time (every `postgres` process),
    /// when one runs on this machine.
    db_cpu_s_per_1k_calls: Option<f64>,
    /// The server's peak resident set so far (`VmHWM`; the largest node's).
    server_peak_rss_mib: Option<f64>,
    /// calls/s over ping's calls/s at the same concurrency.
    vs_ping: Option<f64>,
    /// Tokens in the store when the case began, as the vault counts them.
    stored_tokens: Option<u64>,
}

/// When the measured window of a case opens and closes.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

async fn worker(
    case: Case,
    mut client: TokenServiceClient<Channel>,
    ctx: Arc<Ctx>,
    window: Window,
    mut cursor: usize,
    counted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u32>, String> {
    let expected = window.end.saturating_duration_since(window.start).as_secs() as usize;
    let mut latencies = Vec::with_capacity(expected.saturating_mul(1024).min(1 << 20));
    loop {
        let sent = Instant::now();
        if sent >= window.end || stop.load(Ordering::Relaxed) {
            return Ok(latencies);
        }
        if let Err(e) = call(case, &mut client, &ctx, &mut cursor).await {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        let done = Instant::now();
        if done >= window.start && done <= window.end {
            let micros = done.duration_since(sent).as_micros();
            latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
            counted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a case runs against.
struct Load<'a> {
    clients: &'a [TokenServiceClient<Channel>],
    ctx: &'a Arc<Ctx>,
    server_pids: &'a [u32],
}

async fn measure(
    case: Case,
    concurrency: u32,
    args: &BenchArgs,
    load: &Load<'_>,
    step: &str,
    progress: &Progress,
) -> Result<Measurement, Failure> {
    let counted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + args.warmup;
    let window = Window {
        start,
        end: start + args.duration,
    };
    let Load {
        clients,
        ctx,
        server_pids,
    } = *load;
    // Every node's CPU, and the database server's when it runs here.
    let server_cpu = || -> Option<f64> {
        server_pids
            .iter()
            .map(|p| cpu_seconds(Some(*p)))
            .sum::<Option<f64>>()
    };
    progress.note(step);
    let mut workers = JoinSet::new();
    for w in 0..concurrency as usize {
        // Workers start at different places in the reveal pool.
        let cursor = if ctx.pool.is_empty() {
            0
        } else {
            w * 7919 % ctx.pool.len()
        };
        workers.spawn(worker(
            case,
            clients[w % clients.len()].clone(),
            ctx.clone(),
            window,
            cursor,
            counted.clone(),
            stop.clone(),
        ));
    }
    let mut before = None;
    loop {
        let now = Instant::now();
        if before.is_none() && now >= window.start {
            before = Some((server_cpu(), cpu_seconds(None), database_cpu_seconds()));
        }
        if now >= window.end || stop.load(Ordering::Relaxed) {
            break;
        }
        let next = if before.is_none() {
            window.start.min(now + TICK)
        } else {
            window.end.min(now + TICK)
        };
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        if now < window.start {
            progress.update(&format!(
                "{step}: warm-up {:.1} s",
                args.warmup.as_secs_f64() - window.start.duration_since(now).as_secs_f64()
            ));
        } else {
            let secs = now
                .min(window.end)
                .duration_since(window.start)
                .as_secs_f64();
            let n = counted.load(Ordering::Relaxed);
            progress.update(&format!(
                "{step}: {secs:.1} / {:.1} s, {n} calls, {:.0} calls/s",
                args.duration.as_secs_f64(),
                n as f64 / secs.max(1e-3)
            ));
        }
    }
    let after = (server_cpu(), cpu_seconds(None), database_cpu_seconds());
    let mut latencies = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(mut l)) => latencies.append(&mut l),
            Ok(Err(e)) => {
                return Err(fail(format!(
                    "{step}: {e}; the bench stops rather than measure failures"
                )));
            }
            Err(e) => return Err(fail(format!("{step}: a worker failed: {e}"))),
        }
    }
    latencies.sort_unstable();
    let seconds = args.duration.as_secs_f64();
    let calls = latencies.len() as u64;
    let per_1k = |before: Option<f64>, after: Option<f64>| {
        let spent = after? - before?;
        (calls > 0).then(|| spent * 1000.0 / calls as f64)
    };
    let (server_before, client_before, db_before) = before.unwrap_or((None, None, None));
    let ms = |q: f64| percentile(&latencies, q).map(|us| f64::from(us) / 1000.0);
    let fields = case.fields_per_call();
    Ok(Measurement {
        case: case.as_str(),
        concurrency,
        calls,
        seconds,
        calls_per_s: calls as f64 / seconds,
        fields_per_s: (fields > 0).then(|| (calls * fields) as f64 / seconds),
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        server_cpu_s_per_1k_calls: per_1k(server_before, after.0),
        client_cpu_s_per_1k_calls: per_1k(client_before, after.1),
        db_cpu_s_per_1k_calls: per_1k(db_before, after.2).filter(|s| *s > 0.0),
        server_peak_rss_mib: server_pids
            .iter()
            .filter_map(|p| peak_rss_mib(*p))
            .reduce(f64::max),
        vs_ping: None,
        stored_tokens: None,
    })
}

/// Nearest-rank percentile (`q` in 0..=1) of ascending `sorted` samples.
fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// One row per case and concurrency level from several rounds of the same
/// list: the round with the median calls/s (the lower middle one of an
/// even count), with the median of every round's ratio to its own ping
/// instead of that round's, and the highest peak RSS of any round.
fn median_of_rounds(rounds: &[Vec<Measurement>]) -> Vec<Measurement> {
    let middle = |n: usize| n.saturating_sub(1) / 2;
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let mut same: Vec<&Measurement> = rounds.iter().filter_map(|r| r.get(i)).collect();
            same.sort_by(|a, b| a.calls_per_s.total_cmp(&b.calls_per_s));
            let mut m = same[middle(same.len())].clone();
            let mut ratios: Vec<f64> = same.iter().filter_map(|m| m.vs_ping).collect();
            ratios.sort_by(f64::total_cmp);
            m.vs_ping = ratios.get(middle(ratios.len())).copied();
            m.server_peak_rss_mib = same
                .iter()
                .filter_map(|m| m.server_peak_rss_mib)
                .reduce(f64::max);
            m
        })
        .collect()
}

/// Fills each measurement's ratio to ping at the same concurrency.
fn compare_with_ping(results: &mut [Measurement]) {
    let baseline: Vec<(u32, f64)> = results
        .iter()
        .filter(|m| m.case == Case::Ping.as_str())
        .map(|m| (m.concurrency, m.calls_per_s))
        .collect();
    for m in results {
        m.vs_ping = baseline
            .iter()
            .find(|(c, _)| *c == m.concurrency)
            .filter(|(_, base)| *base > 0.0)
            .map(|(_, base)| m.calls_per_s / base);
    }
}

// ---------------------------------------------------------------------------
// Output.

/// Everything `--json` prints.
#[derive(Debug, serde::Serialize)]
struct Report {
    version: &'static str,
    store: &'static str,
    nodes: usize,
    cpus: usize,
    duration_s: f64,
    warmup_s: f64,
    connections: u32,
    client: &'static str,
    /// Assumed, not read: see [`CLOCK_TICKS_PER_SECOND`].
    clock_ticks_per_second: f64,
    preload: Option<PreloadReport>,
    /// Rounds of the whole list ([`BenchArgs::rounds`]).
    rounds: u32,
    /// One per case and concurrency level: with several rounds, the median
    /// ([`median_of_rounds`]).
    results: Vec<Measurement>,
    /// With several rounds, every round's own measurements.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    each_round: Vec<Vec<Measurement>>,
}

fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let plural = if report.connections == 1 { "" } else { "s" };
    let _ = writeln!(
        out,
        "ordervault {} bench: {} store, {} node{}, {} CPUs shared by the vault, {} the load generator, {} HTTP/2 connection{plural}",
        report.version,
        report.store,
        report.nodes,
        if report.nodes == 1 { "" } else { "s" },
        report.cpus,
        if report.store == "postgres" {
            "the database and"
        } else {
            "and"
        },
        report.connections
    );
    let _ = writeln!(
        out,
        "{} s measured per case after {} s warm-up; server CPU from /proc/<pid>/stat at {} clock ticks/s (assumed)",
        report.duration_s, report.warmup_s, report.clock_ticks_per_second
    );
    if let Some(p) = &report.preload {
        let _ = writeln!(
            out,
            "preload: {} tokens in {:.1} s = {:.0} tokens/s ({} calls of {} fields, {} in flight)",
            p.tokens, p.seconds, p.tokens_per_s, p.calls, p.fields_per_call, p.in_flight
        );
    }
    if report.rounds > 1 {
        let _ = writeln!(
            out,
            "median of {} rounds: each row is the round with the median calls/s; vs ping is the median of each round's own ratio, peak RSS the highest of any round",
            report.rounds
        );
    }
    out.push('\n');
    out.push_str(&render_table(&report.results));
    out
}

fn render_table(results: &[Measurement]) -> String {
    const HEADER: [&str; 12] = [
        "case",
        "conc",
        "calls/s",
        "fields/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "srv CPU s/1k calls",
        "db CPU s/1k calls",
        "srv peak RSS MiB",
        "vs ping",
        "tokens stored",
    ];
    let num = |v: Option<f64>, decimals: usize| match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_owned(),
    };
    let rows: Vec<[String; 12]> = results
        .iter()
        .map(|m| {
            [
                m.case.to_owned(),
                m.concurrency.to_string(),
                num(Some(m.calls_per_s), 0),
                num(m.fields_per_s, 0),
                num(m.p50_ms, 2),
                num(m.p99_ms, 2),
                num(m.p999_ms, 2),
                num(m.server_cpu_s_per_1k_calls, 3),
                num(m.db_cpu_s_per_1k_calls, 3),
                num(m.server_peak_rss_mib, 1),
                num(m.vs_ping, 3),
                m.stored_tokens
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// The progress line on stderr: redrawn in place on a terminal; otherwise
/// one line per phase, so logs stay readable.
pub(crate) struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A phase begins.
    pub(crate) fn note(&self, text: &str) {
        if self.tty {
            self.update(text);
        } else {
            eprintln!("ordervault bench: {text}");
        }
    }

    /// Redraws the line (terminal only).
    pub(crate) fn update(&self, text: &str) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{text}");
            let _ = err.flush();
        }
    }

    /// A phase ended with a result worth keeping on screen.
    pub(crate) fn done(&self, text: &str) {
        self.clear();
        eprintln!("ordervault bench: {text}");
    }

    fn clear(&self) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::kinds::FieldKind;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).expect("no flags parse to the defaults");
        assert_eq!(a.concurrency, [1, 16, 64]);
        assert_eq!(a.duration, Duration::from_secs(10));
        assert_eq!(a.warmup, Duration::from_secs(1));
        assert_eq!(a.preload, 0);
        assert_eq!(a.store, StoreBackend::Sqlite);
        assert_eq!(
            a.cases,
            [
                Case::Ping,
                Case::Tokenize,
                Case::TokenizeOrder,
                Case::Tokenize100,
                Case::Reveal,
                Case::Reveal100,
                Case::RevealGranted
            ]
        );
        assert_eq!(a.connections, 1);
        assert_eq!(a.rounds, 1);
        assert!(!a.json);
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--concurrency",
            "2,8",
            "--duration",
            "3s",
            "--warmup",
            "0s",
            "--preload",
            "200000",
            "--cases",
            "ping,reveal_100",
            "--rounds",
            "3",
            "--json",
        ])
        .expect("every flag is valid");
        assert_eq!(a.concurrency, [2, 8]);
        assert_eq!(a.duration, Duration::from_secs(3));
        assert_eq!(a.warmup, Duration::ZERO);
        assert_eq!(a.preload, 200_000);
        assert_eq!(a.cases, [Case::Ping, Case::Reveal100]);
        assert_eq!(a.rounds, 3);
        assert!(a.json);
    }

    #[test]
    fn duration_flag() {
        assert_eq!(parse_duration_flag("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration_flag("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration_flag("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration_flag("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration_flag(" 2s "), Ok(Duration::from_secs(2)));
        assert_eq!(
            parse_duration_flag("0s"),
            Err("the measured time must be longer than zero".to_owned())
        );
        assert!(
            parse_duration_flag("ten seconds")
                .expect_err("words are not a duration")
                .ends_with("write a duration such as 10s, 500ms or 1m")
        );
        assert!(parse_duration_flag("-1s").is_err());
        assert_eq!(parse_warmup_flag("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn sqlite_and_postgres_are_the_stores() {
        assert_eq!(parse_store("sqlite"), Ok(StoreBackend::Sqlite));
        assert_eq!(parse_store("postgres"), Ok(StoreBackend::Postgres));
        assert_eq!(parse_store("postgresql"), Ok(StoreBackend::Postgres));
        assert_eq!(
            parse_store("mysql"),
            Err("unknown store \"mysql\"; use `sqlite` or `postgres`".to_owned())
        );
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["--concurrency", "0"][..],
            &["--concurrency", "1,x"],
            &["--duration", "0"],
            &["--cases", "tokenise"],
            &["--connections", "0"],
        ] {
            let e = parse(args).expect_err("a bad flag is refused");
            assert!(e.use_stderr(), "{args:?}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.50), Some(500));
        assert_eq!(percentile(&samples, 0.99), Some(990));
        assert_eq!(percentile(&samples, 0.999), Some(999));
        assert_eq!(percentile(&samples, 1.0), Some(1000));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.999), Some(7));
        assert_eq!(percentile(&[1, 2], 0.5), Some(1));
        assert_eq!(percentile(&[1, 2, 3], 0.5), Some(2));
        assert_eq!(percentile(&[], 0.5), None);
        // Few samples: p99.9 is the maximum.
        let few: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&few, 0.999), Some(100));
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        // proc(5): pid (comm) state ppid pgrp session tty_nr tpgid flags
        // minflt cminflt majflt cmajflt utime stime ...
        let stat = "4242 (ordervault) S 1 4242 4242 0 -1 4194560 1200 0 3 0 731 269 0 0 20 0 9 0 123 456789 1234 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1000));
        // A command name with spaces and parentheses.
        let odd = "7 (a b) (c)) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0";
        assert_eq!(parse_cpu_ticks(odd), Some(11));
        assert_eq!(parse_cpu_ticks("7 (x) R 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("7 (x) R 1 7 7 0 -1 0 0 0 0 0 u 6"), None);
    }

    #[test]
    fn cpu_ticks_of_this_process() {
        let own = std::fs::read_to_string("/proc/self/stat");
        if let Ok(own) = own {
            assert!(parse_cpu_ticks(&own).is_some(), "{own}");
            assert!(cpu_seconds(None).is_some());
        }
    }

    #[test]
    fn peak_rss_from_proc_status() {
        let status =
            "Name:\tordervault\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_peak_rss_kib(status), Some(51_200));
        assert_eq!(parse_peak_rss_kib("Name:\tx\nVmRSS:\t 1 kB\n"), None);
        assert_eq!(parse_peak_rss_kib("VmHWM:\t 12 MB\n"), None);
    }

    #[test]
    fn server_banner() {
        assert_eq!(
            listening_addr("ordervault: listening on 127.0.0.1:40123\n"),
            Some("127.0.0.1:40123")
        );
        assert_eq!(listening_addr("ordervault: initialised x"), None);
        let banner: Vec<Zeroizing<String>> = [
            "ordervault: initialised a DEVELOPMENT vault in /tmp/x (master key in /tmp/x/master.key)",
            "API keys (shown only now; the vault stores only their hashes):",
            "  shop      ovk_aaaa",
            "  courier   ovk_bbbb",
            "",
            "Try it (paste into another shell):",
            "  export OV_SHOP_KEY=ovk_aaaa",
        ]
        .iter()
        .map(|l| Zeroizing::new(format!("{l}\n")))
        .collect();
        assert_eq!(
            banner_key(&banner, "shop").as_deref().map(String::as_str),
            Some("ovk_aaaa")
        );
        assert_eq!(
            banner_key(&banner, "courier")
                .as_deref()
                .map(String::as_str),
            Some("ovk_bbbb")
        );
        assert_eq!(banner_key(&banner, "auditor"), None);
    }

    #[test]
    fn relaxed_policy_keeps_visibility_and_drops_limits() {
        let policy = "\
# Per role:
#   rate                   reveals per window
[roles.courier]
permissions = []
purposes = [\"delivery\"]
requires_grant = true
rate = \"600/min\"
daily_distinct_orders = 2000
reveal = { name = \"masked\", phone = \"plain\" }
[principals.courier-night]
 daily_distinct_orders=300
[roles.support]
requires_grant = true
rate = \"300/min\"
[ roles.supplier ]
requires_grant = true
";
        // Support keeps its grant requirement, for `reveal_granted`; no
        // other section does.
        let expected = "\
# Per role:
#   rate                   reveals per window
[roles.courier]
permissions = []
purposes = [\"delivery\"]
reveal = { name = \"masked\", phone = \"plain\" }
[principals.courier-night]
[roles.support]
requires_grant = true
[ roles.supplier ]
";
        assert_eq!(relax_policy(policy), expected);
        // A policy without limits is unchanged.
        assert_eq!(relax_policy(expected), expected);
    }

    #[test]
    fn generated_values_are_valid_and_distinct() {
        let mut phones = std::collections::HashSet::new();
        for n in [0, 1, 2, 99, 12_345, 9_999_999_999, 10_000_000_001] {
            let p = FieldKind::Phone
                .normalise(&phone(n))
                .expect("a valid phone");
            phones.insert(p.to_string());
            FieldKind::Address
                .normalise(&address(n))
                .expect("a valid address");
            FieldKind::Name.normalise(&name(n)).expect("a valid name");
            let o = sample_order(n);
            FieldKind::OrderNumber
                .normalise(&o.order_number)
                .expect("a valid order number");
            FieldKind::Email
                .normalise(&o.consignee.expect("a consignee").email)
                .expect("a valid email");
        }
        // 10^10 + 1 wraps onto 1: the only repeat.
        assert_eq!(phones.len(), 6);
        let names: std::collections::HashSet<String> = (0..16_384).map(name).collect();
        assert_eq!(names.len(), 16_384);
    }

    #[test]
    fn sample_order_has_eight_tokenized_fields() {
        let o = sample_order(3);
        let c = o.consignee.as_ref().expect("a consignee");
        let optional = [&o.customer_id, &c.id_number, &c.email]
            .iter()
            .filter(|v| !v.is_empty())
            .count();
        // order number, name, phone, address + optional + placed_at + 2 per item.
        let n = 4 + optional + usize::from(o.placed_at.is_some()) + 2 * o.items.len();
        assert_eq!(n as u64, ORDER_FIELDS);
        assert_eq!(Case::TokenizeOrder.fields_per_call(), 8);
    }

    #[test]
    fn mixed_fields_alternate_kinds() {
        let f = fields(10, 4, true);
        let kinds: Vec<i32> = f.iter().map(|f| f.kind).collect();
        let (ph, ad) = (v1::FieldKind::Phone as i32, v1::FieldKind::Address as i32);
        assert_eq!(kinds, [ph, ad, ph, ad]);
        assert!(fields(10, 3, false).iter().all(|f| f.kind == ph));
    }

    fn m(case: Case, concurrency: u32, calls_per_s: f64) -> Measurement {
        Measurement {
            case: case.as_str(),
            concurrency,
            calls: (calls_per_s * 5.0) as u64,
            seconds: 5.0,
            calls_per_s,
            fields_per_s: (case.fields_per_call() > 0)
                .then(|| calls_per_s * case.fields_per_call() as f64),
            p50_ms: Some(0.25),
            p99_ms: Some(1.5),
            p999_ms: Some(12.345),
            server_cpu_s_per_1k_calls: Some(0.1234),
            client_cpu_s_per_1k_calls: Some(0.05),
            db_cpu_s_per_1k_calls: None,
            server_peak_rss_mib: Some(40.25),
            vs_ping: None,
            stored_tokens: None,
        }
    }

    #[test]
    fn ratios_are_against_ping_at_the_same_concurrency() {
        let mut r = vec![
            m(Case::Ping, 1, 1000.0),
            m(Case::Ping, 16, 4000.0),
            m(Case::Tokenize, 1, 250.0),
            m(Case::Tokenize, 16, 2000.0),
            m(Case::Tokenize, 64, 2000.0),
        ];
        compare_with_ping(&mut r);
        let ratios: Vec<Option<f64>> = r.iter().map(|m| m.vs_ping).collect();
        assert_eq!(ratios, [Some(1.0), Some(1.0), Some(0.25), Some(0.5), None]);
    }

    #[test]
    fn rounds_give_the_median_round_and_the_median_ratio() {
        let round = |ping: f64, tokenize: f64, rss: f64| {
            let mut r = vec![m(Case::Ping, 16, ping), m(Case::Tokenize, 16, tokenize)];
            r[1].server_peak_rss_mib = Some(rss);
            r[1].p99_ms = Some(tokenize / 100.0);
            compare_with_ping(&mut r);
            r
        };
        // Tokenize's own ratios: 0.5, 0.5, 0.45; its median round is the
        // third (900 calls/s), whose ratio alone would be 0.45.
        let rounds = [
            round(1000.0, 500.0, 60.0),
            round(4000.0, 2000.0, 90.0),
            round(2000.0, 900.0, 70.0),
        ];
        let r = median_of_rounds(&rounds);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].case, r[0].calls_per_s), ("ping", 2000.0));
        assert_eq!(r[0].vs_ping, Some(1.0));
        assert_eq!((r[1].case, r[1].calls_per_s), ("tokenize", 900.0));
        assert_eq!(
            r[1].p99_ms,
            Some(9.0),
            "every figure of a row comes from one round"
        );
        assert_eq!(r[1].vs_ping, Some(0.5));
        assert_eq!(r[1].server_peak_rss_mib, Some(90.0));
        // An even count takes the lower middle round.
        let two = median_of_rounds(&rounds[..2]);
        assert_eq!(two[1].calls_per_s, 500.0);
        assert_eq!(two[1].vs_ping, Some(0.5));
        // One round is itself.
        assert_eq!(median_of_rounds(&rounds[..1]), rounds[0]);
        assert!(median_of_rounds(&[]).is_empty());
    }

    #[test]
    fn table_layout() {
        let mut r = vec![m(Case::Ping, 1, 1000.0), m(Case::Tokenize100, 64, 123.4)];
        r[1].p50_ms = None;
        r[0].stored_tokens = Some(3000);
        compare_with_ping(&mut r);
        let expected = "\
case          conc  calls/s  fields/s  p50 ms  p99 ms  p999 ms  srv CPU s/1k calls  db CPU s/1k calls  srv peak RSS MiB  vs ping  tokens stored
ping             1     1000         -    0.25    1.50    12.35               0.123                  -              40.2    1.000           3000
tokenize_100    64      123     12340       -    1.50    12.35               0.123                  -              40.2        -              -
";
        assert_eq!(render_table(&r), expected);
    }
}
