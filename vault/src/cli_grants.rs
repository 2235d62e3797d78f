//! `ordervault grants list`: who may reveal which order, for what, until when.

use clap::{Args, Subcommand};
use ordervault_proto::v1;
use ordervault_proto::v1::token_service_client::TokenServiceClient;

use crate::cli::Failure;
use crate::cli_audit::{Conn, request};

/// `grants` subcommands.
#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// List the grants of an order, of a principal, or both (needs a role
    /// with the `grant`, `audit` or `admin` permission).
    List(ListArgs),
}

/// `grants list` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Grants of this order (ot_...).
    #[arg(long, required_unless_present = "principal")]
    pub order_token: Option<String>,
    /// Grants of this principal.
    #[arg(long)]
    pub principal: Option<String>,
    /// Include expired and revoked grants.
    #[arg(long)]
    pub all: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn time_text(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| u64::try_from(t.seconds).ok())
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// Runs a `grants` subcommand.
pub async fn run(cmd: GrantsCommand) -> Result<(), Failure> {
    let GrantsCommand::List(args) = cmd;
    let channel = tonic::transport::Endpoint::from_shared(args.conn.addr.clone())
        .map_err(|e| fail(format!("bad --addr: {e}")))?
        .connect()
        .await
        .map_err(|e| {
            fail(format!(
                "cannot reach the vault at {}: {e}; is it running?",
                args.conn.addr
            ))
        })?;
    let req = request(
        &args.conn,
        v1::ListGrantsRequest {
            order_token: args.order_token.clone().unwrap_or_default(),
            principal: args.principal.clone().unwrap_or_default(),
            include_inactive: args.all,
        },
    )?;
    let grants = TokenServiceClient::new(channel)
        .list_grants(req)
        .await
        .map_err(|e| fail(format!("{:?}: {}", e.code(), e.message())))?
        .into_inner()
        .grants;
    if !args.json {
        println!(
            "{:<30} {:<14} {:<30} {:<17} {:<20} {:<20} {:<10}",
            "grant", "principal", "order", "purpose", "expires", "revoked", "granted by"
        );
    }
    for g in grants {
        if args.json {
            let v = serde_json::json!({
                "grant": g.grant_id, "principal": g.principal, "order_token": g.order_token,
                "purpose": g.purpose, "expires_at": time_text(&g.expires_at),
                "revoked_at": g.revoked_at.as_ref().map(|_| time_text(&g.revoked_at)),
                "granted_by": g.granted_by, "created_at": time_text(&g.created_at),
            });
            println!("{v}");
        } else {
            println!(
                "{:<30} {:<14} {:<30} {:<17} {:<20} {:<20} {:<10}",
                g.grant_id,
                g.principal,
                g.order_token,
                g.purpose,
                time_text(&g.expires_at),
                time_text(&g.revoked_at),
                g.granted_by
            );
        }
    }
    Ok(())
}
