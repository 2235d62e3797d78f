//! The `ordervault` binary: server and admin CLI.

use clap::Parser;
use ordervault::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

/// jemalloc, not the system allocator: glibc gives each thread that
/// allocates under contention an arena of its own (up to eight per core) and
/// keeps what is freed in each, so a vault serving batched reveals on its
/// async threads, up to 16 blocking-pool threads running store reads, the
/// writer and the sync thread peaked at 441 MiB, though (counted by
/// jemalloc in the same run) only 8-13 MiB of it was in use. jemalloc, giving
/// freed pages back after about a second from one arena per CPU
/// (`.cargo/config.toml`), peaked at 141-150 MiB in A/B runs, at the same
/// throughput. SQLite allocates its page caches from the system
/// allocator all the same.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Threads of the runtime's blocking pool, at most.
const MAX_BLOCKING_THREADS: usize = 16;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { cli::EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let filter = EnvFilter::try_from_env("ORDERVAULT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The blocking pool runs SQLite store reads (but the few probes of
        // a small reveal, run where the request is), at most eight at a
        // time (one per read connection), and the odd name lookup. Tokio's
        // default of up to 512 threads grew it to over 40 under 64
        // concurrent reveals, each thread with its own thread cache (and,
        // under glibc's allocator, its own arena) keeping freed memory.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ordervault: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(f) = runtime.block_on(cli::run(cli)) {
        eprintln!("ordervault: {}", f.message);
        std::process::exit(f.code);
    }
}
