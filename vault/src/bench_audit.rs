//! `ordervault bench --audit-events N`: what auditors do with a large log.
//!
//! Fills the log with N reveal events (couriers revealing the fields of
//! 10,000 orders, 100 per call), then measures over real gRPC:
//! * the first page (1,000 events) of a query by principal over one day —
//!   served by the `audit_by_principal (principal, ts_ms)` index;
//! * a full online `Verify` of the log (leaves, indexed columns, hash chain,
//!   Merkle tree against the signed checkpoints), in events per second —
//!   a sequential scan of the `(chain, seq)` primary key, in pages;
//! * a `TraceLeak` of 10,000 leaked records (name, phone, address) — the
//!   `tokens_deterministic` / `tokens_by_fingerprint` and `audit_by_token_key`
//!   indexes, then the principals' reveals over the period by
//!   `audit_by_principal`.

use std::time::{Duration, Instant};

use ordervault_proto::v1;
use ordervault_proto::v1::audit_service_client::AuditServiceClient;
use ordervault_proto::v1::token_service_client::TokenServiceClient;
use serde::Serialize;

use crate::bench::{Progress, Server, address, authorized, name, phone, sample_order};
use crate::cli::Failure;

/// Orders whose fields are revealed over and over to fill the log.
const ORDERS: u64 = 10_000;

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// What was measured.
#[derive(Debug, Serialize)]
pub struct AuditReport {
    /// Events in the log when measured.
    pub events: u64,
    /// Time to fill it, seconds.
    pub fill_seconds: f64,
    /// Query by principal over a day: time to the first event, ms (median of 5).
    pub query_first_event_ms: f64,
    /// Same query: time to the whole first page of 1,000 events, ms (median of 5).
    pub query_first_page_ms: f64,
    /// Online verification of the whole log, seconds.
    pub verify_seconds: f64,
    /// ... in events per second.
    pub verify_events_per_second: f64,
    /// Trace of 10,000 leaked records, seconds.
    pub trace_seconds: f64,
    /// The principal the trace ranked first.
    pub trace_top: String,
}

/// Runs the audit benchmark against a started vault.
pub(crate) async fn run(
    server: &Server,
    events: u64,
    progress: &Progress,
) -> Result<AuditReport, Failure> {
    let channel = server.channel().await?;
    let tokens = TokenServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut audit = AuditServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let started = Instant::now();

    // 10,000 orders, 16 calls in flight.
    progress.note("tokenizing 10000 orders");
    let mut field_tokens: Vec<String> = Vec::with_capacity(ORDERS as usize * 8);
    let mut n = 0;
    while n < ORDERS {
        let mut calls = Vec::new();
        for i in n..(n + 16).min(ORDERS) {
            let mut client = tokens.clone();
            let key = server.shop.clone();
            calls.push(tokio::spawn(async move {
                let req = authorized(
                    v1::TokenizeOrderRequest {
                        order: Some(sample_order(1_000_000 + i)),
                    },
                    &key,
                );
                client.tokenize_order(req).await
            }));
        }
        for c in calls {
            let reply = c
                .await
                .map_err(|e| fail(format!("tokenize task: {e}")))?
                .map_err(|e| fail(format!("tokenize: {e}")))?
                .into_inner();
            if let Some(o) = reply.order {
                let c = o.consignee.unwrap_or_default();
                field_tokens.extend([o.order_number, c.name, c.phone, c.address]);
            }
        }
        n += 16;
    }

    // Fill the log: reveals of 100 tokens, 16 calls in flight.
    let calls_needed = events.div_ceil(100);
    let mut done = 0u64;
    let mut offset = 0usize;
    while done < calls_needed {
        let mut calls = Vec::new();
        for _ in 0..16.min(calls_needed - done) {
            let batch: Vec<String> = (0..100)
                .map(|k| field_tokens[(offset + k) % field_tokens.len()].clone())
                .collect();
            offset = (offset + 100) % field_tokens.len();
            let mut client = tokens.clone();
            let key = server.courier.clone();
            calls.push(tokio::spawn(async move {
                let req = authorized(
                    v1::RevealRequest {
                        tokens: batch,
                        purpose: "delivery".into(),
                    },
                    &key,
                );
                client.reveal(req).await
            }));
        }
        for c in calls {
            c.await
                .map_err(|e| fail(format!("reveal task: {e}")))?
                .map_err(|e| fail(format!("reveal: {e}")))?;
            done += 1;
        }
        if done % 500 < 16 {
            progress.update(&format!(
                "filling the audit log: {} of {events} events",
                done * 100
            ));
        }
    }
    let fill_seconds = started.elapsed().as_secs_f64();
    progress.done(&format!("audit log filled in {fill_seconds:.1} s"));

    // Query by principal over the last day: first page.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let mut firsts = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let req = authorized(
            v1::AuditQuery {
                principal: "courier".into(),
                since: Some(prost_types::Timestamp {
                    seconds: now - 86_400,
                    nanos: 0,
                }),
                until: Some(prost_types::Timestamp {
                    seconds: now + 60,
                    nanos: 0,
                }),
                limit: 1000,
                ..Default::default()
            },
            &server.auditor,
        );
        let mut stream = audit
            .query(req)
            .await
            .map_err(|e| fail(format!("query: {e}")))?
            .into_inner();
        let mut got = 0;
        while let Some(_e) = stream
            .message()
            .await
            .map_err(|e| fail(format!("query: {e}")))?
        {
            if got == 0 {
                firsts.push(t.elapsed());
            }
            got += 1;
        }
        pages.push(t.elapsed());
        if got != 1000 {
            return Err(fail(format!("the first page held {got} events, not 1000")));
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };

    // Full online verification.
    progress.note("verifying the whole log online");
    let t = Instant::now();
    let verified = audit
        .verify(authorized(v1::VerifyRequest {}, &server.auditor))
        .await
        .map_err(|e| fail(format!("verify: {e}")))?
        .into_inner();
    let verify_seconds = t.elapsed().as_secs_f64();
    if !verified.ok {
        return Err(fail(format!(
            "the log did not verify: {:?}",
            verified.chains
        )));
    }
    let logged: u64 = verified.chains.iter().map(|c| c.events).sum();

    // A trace of 10,000 leaked records.
    progress.note("tracing 10000 leaked records");
    let records = (0..ORDERS)
        .map(|i| {
            let n = 1_000_000 + i;
            v1::LeakedRecord {
                fields: [
                    ("name".to_owned(), name(n)),
                    ("phone".to_owned(), phone(n)),
                    ("address".to_owned(), address(n)),
                ]
                .into_iter()
                .collect(),
            }
        })
        .collect();
    let t = Instant::now();
    let trace = audit
        .trace_leak(authorized(
            v1::TraceLeakRequest { records },
            &server.auditor,
        ))
        .await
        .map_err(|e| fail(format!("trace: {e}")))?
        .into_inner();
    let trace_seconds = t.elapsed().as_secs_f64();
    Ok(AuditReport {
        events: logged,
        fill_seconds,
        query_first_event_ms: median(&mut firsts),
        query_first_page_ms: median(&mut pages),
        verify_seconds,
        verify_events_per_second: logged as f64 / verify_seconds,
        trace_seconds,
        trace_top: trace
            .principals
            .first()
            .map(|p| p.principal.clone())
            .unwrap_or_default(),
    })
}

/// The report as text.
pub fn render(r: &AuditReport) -> String {
    format!(
        "audit log: {} events (filled in {:.1} s)\n\
         query by principal over a day, first page of 1000: first event {:.1} ms, whole page {:.1} ms (median of 5)\n\
         online verify of the whole log: {:.1} s = {:.0} events/s\n\
         trace of 10000 leaked records: {:.2} s (ranked first: {})\n",
        r.events,
        r.fill_seconds,
        r.query_first_event_ms,
        r.query_first_page_ms,
        r.verify_seconds,
        r.verify_events_per_second,
        r.trace_seconds,
        r.trace_top
    )
}
