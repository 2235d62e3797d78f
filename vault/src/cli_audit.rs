//! `ordervault audit ...`: the auditor's commands. All but `verify` talk to
//! a running vault's `AuditService` with an auditor's (or admin's) API key;
//! `verify` works offline, on an export file or a data directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use ordervault_proto::v1;
use ordervault_proto::v1::audit_service_client::AuditServiceClient;
use tonic::transport::Channel;

use crate::checkpoint::{self, NoteVerifier};
use crate::cli::{DataArgs, Failure};
use crate::evidence::{self, ExportLine};

/// Where the vault is and who is asking.
#[derive(Args, Clone)]
pub struct Conn {
    /// Vault address.
    #[arg(long, env = "ORDERVAULT_ADDR", default_value = "http://127.0.0.1:7470")]
    pub addr: String,
    /// API key of an auditor or admin principal.
    #[arg(long, env = "ORDERVAULT_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

// Hand-written: the API key never reaches Debug output.
impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .field("api_key", &"[redacted]")
            .finish()
    }
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Events matching the filters, oldest first (table, or JSON lines with --json).
    Query(QueryArgs),
    /// Write every event and checkpoint of this node's chain as JSON lines.
    Export {
        /// Connection.
        #[command(flatten)]
        conn: Conn,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify offline: an export file against the log's public key (--file,
    /// --pubkey), or the database of a data directory (--data-dir).
    Verify(VerifyArgs),
    /// Inclusion proof of event SEQ against the latest checkpoint, checked here.
    Prove {
        /// Connection.
        #[command(flatten)]
        conn: Conn,
        /// Sequence number of the event.
        seq: u64,
        /// Tree size to prove against (default: the latest checkpoint).
        #[arg(long, default_value_t = 0)]
        size: u64,
    },
    /// Trace leaked records (CSV with a header of field kinds, or JSON lines)
    /// to the principals who revealed them.
    Trace {
        /// Connection.
        #[command(flatten)]
        conn: Conn,
        /// The leaked records.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the log's public key (C2SP note verifier key).
    Pubkey {
        /// Connection.
        #[command(flatten)]
        conn: Conn,
    },
    /// Alerts raised by the vault (quota, throttling, bulk extraction).
    Alerts {
        /// Connection.
        #[command(flatten)]
        conn: Conn,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `audit query` filters.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Only this principal.
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this role.
    #[arg(long)]
    pub role: Option<String>,
    /// tokenize, reveal, grant, revoke, admin, auth_failed, quota_exceeded.
    #[arg(long)]
    pub action: Option<String>,
    /// allowed, masked, denied, error.
    #[arg(long)]
    pub decision: Option<String>,
    /// Only this purpose.
    #[arg(long)]
    pub purpose: Option<String>,
    /// Only this field kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events about this token.
    #[arg(long)]
    pub token: Option<String>,
    /// Only events about this order token.
    #[arg(long)]
    pub order_token: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<humantime::Timestamp>,
    /// Only events before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<humantime::Timestamp>,
    /// Most events to print.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Keep printing new events as they are logged (one chain: `--chain`,
    /// default the answering node's).
    #[arg(long)]
    pub follow: bool,
    /// Node id of the chain to read; default every node's chain (with
    /// `--follow`, the answering node's).
    #[arg(long)]
    pub chain: Option<String>,
    /// JSON lines (the canonical leaves) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `audit verify` inputs.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An export written by `audit export`.
    #[arg(long, requires = "pubkey", conflicts_with = "data_dir")]
    pub file: Option<PathBuf>,
    /// The log's public key (`audit pubkey`); repeat for several chains.
    #[arg(long)]
    pub pubkey: Vec<String>,
    /// Checkpoints you kept from earlier (signed notes, one file each): the
    /// log must still contain them (catches rollbacks and truncation).
    #[arg(long)]
    pub checkpoint: Vec<PathBuf>,
    /// Verify a data directory's database instead of a file.
    #[arg(long, env = "ORDERVAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node id of the chain to check in the data directory (default:
    /// every chain in the database).
    #[arg(long)]
    pub node_id: Option<String>,
    /// The database, when not SQLite in the data directory (see `serve`).
    #[arg(
        long,
        env = "ORDERVAULT_STORAGE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub storage_url: Option<secrecy::SecretString>,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn rpc(e: tonic::Status) -> Failure {
    fail(format!("{:?}: {}", e.code(), e.message()))
}

async fn client(conn: &Conn) -> Result<AuditServiceClient<Channel>, Failure> {
    let channel = tonic::transport::Endpoint::from_shared(conn.addr.clone())
        .map_err(|e| fail(format!("bad --addr: {e}")))?
        .connect()
        .await
        .map_err(|e| {
            fail(format!(
                "cannot reach the vault at {}: {e}; is it running?",
                conn.addr
            ))
        })?;
    Ok(AuditServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// A request carrying `conn`'s API key as a sensitive bearer header.
pub(crate) fn request<T>(conn: &Conn, message: T) -> Result<tonic::Request<T>, Failure> {
    let mut req = tonic::Request::new(message);
    let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", conn.api_key)
            .parse()
            .map_err(|_| fail("the API key is not valid ASCII"))?;
    value.set_sensitive(true);
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

fn to_ts(t: Option<humantime::Timestamp>) -> Option<prost_types::Timestamp> {
    t.map(|t| {
        let d = std::time::SystemTime::from(t)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    })
}

fn time_text(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Runs an `audit` subcommand.
pub async fn run(cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Query(q) => query(q).await,
        AuditCommand::Export { conn, out } => export(&conn, &out).await,
        AuditCommand::Verify(args) => verify(args).await,
        AuditCommand::Prove { conn, seq, size } => prove(&conn, seq, size).await,
        AuditCommand::Trace { conn, file, json } => trace(&conn, &file, json).await,
        AuditCommand::Pubkey { conn } => {
            let reply = client(&conn)
                .await?
                .checkpoints(request(
                    &conn,
                    v1::CheckpointsRequest {
                        chain: String::new(),
                    },
                )?)
                .await
                .map_err(rpc)?
                .into_inner();
            println!("{}", reply.verifier_key);
            Ok(())
        }
        AuditCommand::Alerts { conn, json } => {
            let reply = client(&conn)
                .await?
                .alerts(request(
                    &conn,
                    v1::AlertsRequest {
                        since: None,
                        limit: 0,
                    },
                )?)
                .await
                .map_err(rpc)?
                .into_inner();
            if !json {
                println!(
                    "{:<6} {:<20} {:<16} {:<16} {:<15} detail",
                    "id", "at", "kind", "principal", "peer"
                );
            }
            for a in reply.alerts {
                let at =
                    a.at.map(|t| time_text(t.seconds * 1000))
                        .unwrap_or_default();
                if json {
                    let v = serde_json::json!({"id": a.id, "at": at, "kind": a.kind, "principal": a.principal, "peer": a.peer, "detail": a.detail});
                    println!("{v}");
                } else {
                    println!(
                        "{:<6} {:<20} {:<16} {:<16} {:<15} {}",
                        a.id, at, a.kind, a.principal, a.peer, a.detail
                    );
                }
            }
            Ok(())
        }
    }
}

async fn query(q: QueryArgs) -> Result<(), Failure> {
    let mut grpc = client(&q.conn).await?;
    let message = v1::AuditQuery {
        since: to_ts(q.since),
        until: to_ts(q.until),
        principal: q.principal.unwrap_or_default(),
        role: q.role.unwrap_or_default(),
        action: q.action.unwrap_or_default(),
        decision: q.decision.unwrap_or_default(),
        purpose: q.purpose.unwrap_or_default(),
        kind: q.kind.unwrap_or_default(),
        token: q.token.unwrap_or_default(),
        order_token: q.order_token.unwrap_or_default(),
        chain: q
            .chain
            .unwrap_or_else(|| if q.follow { String::new() } else { "*".into() }),
        after: String::new(),
        limit: q.limit,
        follow: q.follow,
    };
    let mut stream = grpc
        .query(request(&q.conn, message)?)
        .await
        .map_err(rpc)?
        .into_inner();
    if !q.json {
        println!(
            "{:<10} {:>6} {:<20} {:<12} {:<9} {:<14} {:<8} {:<16} {:<13} {:<30} reason",
            "chain",
            "seq",
            "time",
            "principal",
            "role",
            "action",
            "decision",
            "purpose",
            "kind",
            "token"
        );
    }
    let mut out = std::io::stdout();
    while let Some(e) = stream.message().await.map_err(rpc)? {
        if q.json {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(&e.leaf));
        } else if let Some((chain, seq, ev)) = crate::audit::decode_leaf(&e.leaf) {
            let _ = writeln!(
                out,
                "{:<10} {:>6} {:<20} {:<12} {:<9} {:<14} {:<8} {:<16} {:<13} {:<30} {}",
                chain,
                seq,
                time_text(ev.ts_ms),
                ev.principal,
                ev.role,
                ev.action.as_str(),
                ev.decision.as_str(),
                ev.purpose.unwrap_or_default(),
                ev.kind.unwrap_or_default(),
                ev.token.unwrap_or_default(),
                ev.reason.unwrap_or_default()
            );
        }
        let _ = out.flush();
    }
    Ok(())
}

async fn export(conn: &Conn, out: &PathBuf) -> Result<(), Failure> {
    let mut grpc = client(conn).await?;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out)
            .map_err(|e| fail(format!("cannot create {}: {e}", out.display())))?,
    );
    let mut after = String::new();
    let mut events = 0u64;
    loop {
        let message = v1::AuditQuery {
            after: after.clone(),
            limit: 10_000,
            ..Default::default()
        };
        let mut stream = grpc
            .query(request(conn, message)?)
            .await
            .map_err(rpc)?
            .into_inner();
        let mut got = 0;
        while let Some(e) = stream.message().await.map_err(rpc)? {
            let line = ExportLine::Event {
                chain: e.chain.clone(),
                seq: e.seq,
                leaf: String::from_utf8(e.leaf).map_err(|_| fail("an event is not UTF-8 JSON"))?,
                chain_hash: hex::encode(&e.chain_hash),
            };
            writeln!(file, "{}", serde_json::to_string(&line).unwrap_or_default())
                .map_err(|e| fail(e.to_string()))?;
            after = e.cursor;
            got += 1;
        }
        events += got;
        if got == 0 {
            break;
        }
    }
    let cps = grpc
        .checkpoints(request(
            conn,
            v1::CheckpointsRequest {
                chain: String::new(),
            },
        )?)
        .await
        .map_err(rpc)?
        .into_inner();
    let mut count = 0;
    for note in cps.checkpoints {
        let (chain, size) = note
            .lines()
            .next()
            .and_then(|o| o.strip_prefix("ordervault/"))
            .map(|c| {
                (
                    c.to_owned(),
                    note.lines()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                )
            })
            .unwrap_or_default();
        let line = ExportLine::Checkpoint { chain, size, note };
        writeln!(file, "{}", serde_json::to_string(&line).unwrap_or_default())
            .map_err(|e| fail(e.to_string()))?;
        count += 1;
    }
    file.flush().map_err(|e| fail(e.to_string()))?;
    println!(
        "exported {events} events and {count} checkpoints to {}",
        out.display()
    );
    println!("public key: {}", cps.verifier_key);
    Ok(())
}

async fn verify(args: VerifyArgs) -> Result<(), Failure> {
    let Some(file) = args.file else {
        let data_dir = args.data_dir.ok_or_else(|| {
            fail("give --file and --pubkey (an export), or --data-dir (a database)")
        })?;
        return crate::cli::verify_data_dir(
            DataArgs {
                data_dir,
                node_id: String::new(),
                storage_url: args.storage_url,
            },
            args.node_id,
        )
        .await;
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
    let verifiers = args
        .pubkey
        .iter()
        .map(|k| {
            NoteVerifier::parse(k)
                .map_err(|e| fail(format!("--pubkey is not a note verifier key: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut trusted = Vec::new();
    for path in &args.checkpoint {
        let note = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        let cp = verifiers
            .iter()
            .find_map(|v| checkpoint::open_checkpoint(&note, v).ok())
            .ok_or_else(|| {
                fail(format!(
                    "{} is not a checkpoint signed by the given key",
                    path.display()
                ))
            })?;
        trusted.push(cp);
    }
    match evidence::verify_export(&text, &verifiers, &trusted) {
        Ok(chains) => {
            for c in chains {
                println!(
                    "chain {}: {} events, {} checkpoints verified; root {}",
                    c.chain,
                    c.events,
                    c.checkpoints,
                    hex::encode(c.root)
                );
            }
            Ok(())
        }
        Err(e) => Err(fail(format!("FAILED: {e}"))),
    }
}

async fn prove(conn: &Conn, seq: u64, size: u64) -> Result<(), Failure> {
    let mut grpc = client(conn).await?;
    let reply = grpc
        .prove(request(
            conn,
            v1::ProveRequest {
                chain: String::new(),
                seq,
                tree_size: size,
                old_size: 0,
            },
        )?)
        .await
        .map_err(rpc)?
        .into_inner();
    let hash =
        |b: &[u8]| <[u8; 32]>::try_from(b).map_err(|_| fail("the reply holds a malformed hash"));
    let proof = reply
        .hashes
        .iter()
        .map(|h| hash(h))
        .collect::<Result<Vec<_>, _>>()?;
    let (leaf, root) = (hash(&reply.leaf_hash)?, hash(&reply.root_hash)?);
    crate::merkle::verify_inclusion(&leaf, seq - 1, reply.tree_size, &proof, &root)
        .map_err(|e| fail(format!("the proof does NOT verify: {e}")))?;
    println!(
        "event {seq} is included in the tree of size {} with root {}",
        reply.tree_size,
        hex::encode(root)
    );
    println!("leaf hash {}", hex::encode(leaf));
    for (i, h) in proof.iter().enumerate() {
        println!("  proof[{i}] {}", hex::encode(h));
    }
    Ok(())
}

/// Parses leaked records: JSON lines of objects, or CSV with a header row.
pub fn parse_leak(text: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let first = text.trim_start().chars().next();
    if first == Some('{') {
        return text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str::<BTreeMap<String, serde_json::Value>>(l)
                    .map(|m| {
                        m.into_iter()
                            .map(|(k, v)| {
                                (
                                    k,
                                    v.as_str()
                                        .map(str::to_owned)
                                        .unwrap_or_else(|| v.to_string()),
                                )
                            })
                            .collect()
                    })
                    .map_err(|e| format!("line {}: not a JSON object ({e})", i + 1))
            })
            .collect();
    }
    let mut rows = csv_rows(text);
    if rows.is_empty() {
        return Err("the file is empty".into());
    }
    let header: Vec<String> = rows
        .remove(0)
        .into_iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    rows.into_iter()
        .filter(|r| r.iter().any(|c| !c.trim().is_empty()))
        .enumerate()
        .map(|(i, r)| {
            if r.len() != header.len() {
                return Err(format!(
                    "row {}: {} columns, the header has {}",
                    i + 2,
                    r.len(),
                    header.len()
                ));
            }
            Ok(header.iter().cloned().zip(r).collect())
        })
        .collect()
}

/// Minimal RFC 4180 CSV: quoted fields with "" escapes, commas, CRLF or LF.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

async fn trace(conn: &Conn, file: &PathBuf, json: bool) -> Result<(), Failure> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(file)
            .map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?,
    );
    let records = parse_leak(&text).map_err(|e| fail(format!("{}: {e}", file.display())))?;
    let n = records.len();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("tracing {n} leaked records"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let message = v1::TraceLeakRequest {
        records: records
            .into_iter()
            .map(|fields| v1::LeakedRecord {
                fields: fields.into_iter().collect(),
            })
            .collect(),
    };
    let reply = client(conn)
        .await?
        .trace_leak(request(conn, message)?)
        .await
        .map_err(rpc);
    spinner.finish_and_clear();
    let r = reply?.into_inner();
    if json {
        let principals: Vec<serde_json::Value> = r
            .principals
            .iter()
            .map(|p| {
                serde_json::json!({
                    "principal": p.principal, "role": p.role,
                    "records_plain": p.records_plain, "records_masked_only": p.records_masked_only,
                    "records_revealed_total": p.records_revealed_total, "score": p.score,
                    "first_reveal": p.first_reveal.as_ref().map(|t| time_text(t.seconds * 1000)),
                    "last_reveal": p.last_reveal.as_ref().map(|t| time_text(t.seconds * 1000)),
                })
            })
            .collect();
        let v = serde_json::json!({
            "records": r.records, "records_not_held": r.records_not_held,
            "records_never_revealed": r.records_never_revealed,
            "not_held_indexes": r.not_held_indexes, "never_revealed_indexes": r.never_revealed_indexes,
            "principals": principals,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} leaked records: {} not held by this vault, {} held but never revealed",
        r.records, r.records_not_held, r.records_never_revealed
    );
    println!();
    println!(
        "{:>4} {:<16} {:<9} {:>8} {:>9} {:>14} {:<20} {:<20} {:>6}",
        "rank",
        "principal",
        "role",
        "plain",
        "masked",
        "revealed total",
        "first reveal",
        "last reveal",
        "score"
    );
    for (i, p) in r.principals.iter().enumerate() {
        println!(
            "{:>4} {:<16} {:<9} {:>8} {:>9} {:>14} {:<20} {:<20} {:>6.3}",
            i + 1,
            p.principal,
            p.role,
            p.records_plain,
            p.records_masked_only,
            p.records_revealed_total,
            p.first_reveal
                .as_ref()
                .map(|t| time_text(t.seconds * 1000))
                .unwrap_or_default(),
            p.last_reveal
                .as_ref()
                .map(|t| time_text(t.seconds * 1000))
                .unwrap_or_default(),
            p.score
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_connection_never_shows_the_api_key() {
        let conn = Conn {
            addr: "http://127.0.0.1:7470".into(),
            api_key: "ovk_secretsecretsecret".into(),
        };
        let printed = format!("{conn:?}");
        assert!(!printed.contains("secretsecret"), "{printed}");
        assert!(printed.contains("127.0.0.1:7470"));
    }

    #[test]
    fn leak_files_parse_as_csv_or_json_lines() {
        let csv = "name,phone,address\n张小明,+86 138 1234 5678,\"浙江省杭州市, 西湖区\"\r\n\"O\"\"Neil\",13900000000,x\n";
        let rows = parse_leak(csv).expect("csv");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["address"], "浙江省杭州市, 西湖区");
        assert_eq!(rows[1]["name"], "O\"Neil");
        let jsonl = "{\"name\":\"张小明\",\"phone\":\"13812345678\"}\n\n{\"phone\":13900000000}\n";
        let rows = parse_leak(jsonl).expect("jsonl");
        assert_eq!(rows[1]["phone"], "13900000000");
        assert!(
            parse_leak("name,phone\nonly-one\n")
                .expect_err("ragged")
                .contains("row 2")
        );
    }
}
