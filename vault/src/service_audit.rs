//! `AuditService`: the access log for auditors — query, verify, prove,
//! trace a leak, checkpoints and alerts. Every RPC needs the `audit`
//! permission; a refusal is itself audited.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ordervault_proto::v1;
use ordervault_proto::v1::audit_service_server::AuditService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::auditor::Query;
use crate::engine::Engine;
use crate::service::{authenticate, status, timestamp};
use crate::store::AuditFilter;

/// Events per page of a query.
const DEFAULT_LIMIT: usize = 1000;

fn ms(ts: &Option<prost_types::Timestamp>) -> Option<i64> {
    ts.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn event_info(e: &crate::audit::StoredEvent) -> v1::AuditEventInfo {
    v1::AuditEventInfo {
        chain: e.chain.clone(),
        seq: e.seq,
        leaf: e.leaf.clone(),
        cursor: format!("{}:{}", e.chain, e.seq),
        chain_hash: e.chain_hash.to_vec(),
    }
}

/// `AuditService`.
#[derive(Debug, Clone)]
pub struct AuditApi {
    engine: Arc<Engine>,
}

impl AuditApi {
    /// Serves `engine`.
    pub fn new(engine: Arc<Engine>) -> AuditApi {
        AuditApi { engine }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::AuditEventInfo, Status>> + Send>>;

/// `chain` of a query over every node's chain.
const ALL_CHAINS: &str = "*";

fn query_of(m: &v1::AuditQuery, chain: String, after_seq: u64) -> Query {
    Query {
        indexed: AuditFilter {
            chain,
            after_seq,
            principal: nonempty(&m.principal),
            action: nonempty(&m.action),
            decision: nonempty(&m.decision),
            token: nonempty(&m.token),
            // Set from `token` by the PermutedStore of a vault with
            // time-ordered keys.
            token_key: None,
            since_ms: ms(&m.since),
            until_ms: ms(&m.until),
        },
        role: nonempty(&m.role),
        purpose: nonempty(&m.purpose),
        kind: nonempty(&m.kind),
        order_token: nonempty(&m.order_token),
    }
}

fn limit_of(m: &v1::AuditQuery) -> usize {
    if m.limit == 0 {
        DEFAULT_LIMIT
    } else {
        m.limit as usize
    }
}

impl AuditApi {
    /// A query with `chain = "*"`: every chain in turn (this node's first),
    /// up to `limit` events in all.
    async fn query_every_chain(
        &self,
        principal: &crate::engine::Principal,
        m: &v1::AuditQuery,
    ) -> Result<Response<EventStream>, Status> {
        if m.follow {
            return Err(Status::invalid_argument(
                "follow reads one chain: give its node id as chain (or none for this node's)",
            ));
        }
        if !m.after.is_empty() {
            return Err(Status::invalid_argument(
                "a cursor belongs to one chain: give that chain with after",
            ));
        }
        let mut left = limit_of(m);
        let mut items = Vec::new();
        for chain in self.engine.chains().await.map_err(status)? {
            if left == 0 {
                break;
            }
            let events = self
                .engine
                .query_audit(principal, &query_of(m, chain, 0), left)
                .await
                .map_err(status)?;
            left -= events.len().min(left);
            items.extend(events.iter().map(|e| Ok(event_info(e))));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    type QueryStream = EventStream;

    async fn query(&self, req: Request<v1::AuditQuery>) -> Result<Response<EventStream>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let m = req.into_inner();
        if m.chain == ALL_CHAINS {
            return self.query_every_chain(&principal, &m).await;
        }
        let chain = nonempty(&m.chain).unwrap_or_else(|| self.engine.chain().to_owned());
        let after_seq = match nonempty(&m.after) {
            None => 0,
            Some(cursor) => cursor
                .rsplit_once(':')
                .filter(|(c, _)| *c == chain)
                .and_then(|(_, seq)| seq.parse().ok())
                .ok_or_else(|| {
                    Status::invalid_argument("after is not a cursor of this chain (chain:seq)")
                })?,
        };
        let q = query_of(&m, chain, after_seq);
        let limit = limit_of(&m);
        let first = self
            .engine
            .query_audit(&principal, &q, limit)
            .await
            .map_err(status)?;
        if !m.follow {
            let items: Vec<Result<v1::AuditEventInfo, Status>> =
                first.iter().map(|e| Ok(event_info(e))).collect();
            return Ok(Response::new(Box::pin(tokio_stream::iter(items))));
        }
        // Follow: send what exists, then poll for new events until the
        // caller goes away.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let mut q = q;
            let mut batch = first;
            loop {
                for e in &batch {
                    q.indexed.after_seq = e.seq;
                    if tx.send(Ok(event_info(e))).await.is_err() {
                        return;
                    }
                }
                if batch.is_empty() {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if tx.is_closed() {
                        return;
                    }
                }
                batch = match engine.query_audit_unchecked(&q, DEFAULT_LIMIT).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn verify(
        &self,
        req: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let reports = self.engine.verify_log(&principal).await.map_err(status)?;
        let ok = reports.iter().all(|r| r.failure.is_none());
        Ok(Response::new(v1::VerifyResponse {
            ok,
            chains: reports
                .into_iter()
                .map(|r| v1::ChainVerification {
                    chain: r.chain,
                    events: r.events,
                    ok: r.failure.is_none(),
                    first_bad_seq: r.failure.as_ref().map(|f| f.seq).unwrap_or(0),
                    problem: r.failure.map(|f| f.problem).unwrap_or_default(),
                    checkpoints: r.checkpoints,
                })
                .collect(),
        }))
    }

    async fn trace_leak(
        &self,
        req: Request<v1::TraceLeakRequest>,
    ) -> Result<Response<v1::TraceLeakResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let records: Vec<BTreeMap<String, Zeroizing<String>>> = req
            .into_inner()
            .records
            .into_iter()
            .map(|r| {
                r.fields
                    .into_iter()
                    .map(|(k, v)| (k, Zeroizing::new(v)))
                    .collect()
            })
            .collect();
        if records.is_empty() {
            return Err(Status::invalid_argument("no leaked records given"));
        }
        let report = self
            .engine
            .trace_leak(&principal, records)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::TraceLeakResponse {
            records: report.records,
            records_not_held: report.not_held.len() as u64,
            records_never_revealed: report.never_revealed.len() as u64,
            not_held_indexes: report.not_held,
            never_revealed_indexes: report.never_revealed,
            principals: report
                .principals
                .into_iter()
                .map(|p| v1::PrincipalTrace {
                    principal: p.principal,
                    role: p.role,
                    records_plain: p.plain,
                    records_masked_only: p.masked_only,
                    first_reveal: Some(timestamp(p.first_ms)),
                    last_reveal: Some(timestamp(p.last_ms)),
                    records_revealed_total: p.revealed_total,
                    score: p.score,
                })
                .collect(),
        }))
    }

    async fn checkpoints(
        &self,
        req: Request<v1::CheckpointsRequest>,
    ) -> Result<Response<v1::CheckpointsResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let chain =
            nonempty(&req.get_ref().chain).unwrap_or_else(|| self.engine.chain().to_owned());
        let list = self
            .engine
            .list_checkpoints(&principal, &chain)
            .await
            .map_err(status)?;
        let verifier_key = self.engine.verifier_key().await.map_err(status)?;
        Ok(Response::new(v1::CheckpointsResponse {
            checkpoints: list.into_iter().map(|c| c.note).collect(),
            verifier_key,
        }))
    }

    async fn prove(
        &self,
        req: Request<v1::ProveRequest>,
    ) -> Result<Response<v1::ProveResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let m = req.into_inner();
        let chain = nonempty(&m.chain).unwrap_or_else(|| self.engine.chain().to_owned());
        if m.seq > 0 {
            let (proof, leaf, root, size) = self
                .engine
                .prove_inclusion(&principal, &chain, m.seq, m.tree_size)
                .await
                .map_err(status)?;
            Ok(Response::new(v1::ProveResponse {
                hashes: proof.iter().map(|h| h.to_vec()).collect(),
                leaf_hash: leaf.to_vec(),
                root_hash: root.to_vec(),
                tree_size: size,
            }))
        } else {
            let (proof, root, size) = self
                .engine
                .prove_consistency(&principal, &chain, m.old_size, m.tree_size)
                .await
                .map_err(status)?;
            Ok(Response::new(v1::ProveResponse {
                hashes: proof.iter().map(|h| h.to_vec()).collect(),
                leaf_hash: Vec::new(),
                root_hash: root.to_vec(),
                tree_size: size,
            }))
        }
    }

    async fn alerts(
        &self,
        req: Request<v1::AlertsRequest>,
    ) -> Result<Response<v1::AlertsResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        self.engine
            .require_audit(&principal, "read alerts")
            .await
            .map_err(status)?;
        let m = req.into_inner();
        let limit = if m.limit == 0 { 1000 } else { m.limit as usize };
        let alerts = self
            .engine
            .store()
            .alerts(ms(&m.since).unwrap_or(0), limit)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(v1::AlertsResponse {
            alerts: alerts
                .into_iter()
                .map(|a| v1::AlertInfo {
                    id: a.id,
                    at: Some(timestamp(a.at_ms)),
                    kind: a.kind,
                    principal: a.principal,
                    peer: a.peer,
                    detail: a.detail,
                })
                .collect(),
        }))
    }
}
