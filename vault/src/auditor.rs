//! The auditor's side of the engine: signed checkpoints over the RFC 9162
//! Merkle tree of this node's chain, queries, online verification, proofs
//! and leak tracing.
//!
//! Checkpoints: the signing key is an Ed25519 seed created at init (or on
//! first use by an older vault) and stored wrapped by the master key. The
//! node keeps its chain's tree in memory ([`CompactTree`], O(log n)); on
//! load it rebuilds it from the stored events and checks every stored
//! checkpoint against it. If one does not match, the log was altered, and
//! the node refuses to sign again rather than sign a checkpoint that
//! contradicts an earlier one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tracing::{error, warn};
use zeroize::Zeroizing;

use crate::audit::{self, AuditEvent, Decision, Verifier};
use crate::checkpoint::{Checkpoint, LogSigner, NoteVerifier};
use crate::crypto::{self, SecretKey};
use crate::engine::{Engine, Principal, read};
use crate::error::VaultError;
use crate::evidence;
use crate::kinds::FieldKind;
use crate::merkle::{self, CompactTree};
use crate::policy::Permission;
use crate::store::{AuditFilter, StoredCheckpoint, TokenLookup, WriteBatch};
use crate::token::{Token, TokenClass};

/// Meta key of the wrapped checkpoint-signing seed.
pub const META_SIGNING_SEED: &str = "audit_signing_seed";
pub(crate) const SIGNING_SEED_CONTEXT: &[u8] = b"ordervault/v1/audit-signing-seed";

/// Sign a checkpoint after this many new events...
pub const CHECKPOINT_EVERY_EVENTS: u64 = 1000;
/// ...or after this long with at least one new event.
pub const CHECKPOINT_EVERY_MS: i64 = 60_000;

/// This node's log: signer, tree and last checkpoint.
pub struct LogState {
    signer: LogSigner,
    tree: CompactTree,
    last: Option<Checkpoint>,
    /// Set when the stored log contradicts a checkpoint: never sign again.
    refused: Option<String>,
}

/// An auditor's filter over the log.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Indexed filters (chain, after, principal, action, decision, token, time).
    pub indexed: AuditFilter,
    /// Role.
    pub role: Option<String>,
    /// Purpose.
    pub purpose: Option<String>,
    /// Field kind.
    pub kind: Option<String>,
    /// Order token.
    pub order_token: Option<String>,
}

impl Query {
    fn matches(&self, e: &AuditEvent) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        // The token is matched by an indexed key as well as the text: an
        // answer must also hold the token in its signed leaf.
        eq(&self.indexed.token, e.token.as_deref())
            && eq(&self.role, Some(e.role.as_str()))
            && eq(&self.purpose, e.purpose.as_deref())
            && eq(&self.kind, e.kind.as_deref())
            && eq(&self.order_token, e.order_token.as_deref())
    }
}

/// One chain's online verification.
#[derive(Clone, Debug)]
pub struct ChainReport {
    /// Chain id.
    pub chain: String,
    /// Events checked.
    pub events: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The first failure, if any.
    pub failure: Option<audit::VerifyError>,
}

/// One principal's part in a leak.
#[derive(Clone, Debug, Default)]
pub struct PrincipalTrace {
    /// Principal.
    pub principal: String,
    /// Role.
    pub role: String,
    /// Leaked records it revealed at least one field of in plain.
    pub plain: u64,
    /// Leaked records it saw only masked.
    pub masked_only: u64,
    /// First reveal of a leaked record.
    pub first_ms: i64,
    /// Last reveal of a leaked record.
    pub last_ms: i64,
    /// Distinct records (orders, or tokens outside orders) it revealed in
    /// plain or masked between its first and last leaked-record reveal.
    pub revealed_total: u64,
    /// How well it explains the leak, 0..1: coverage of the leaked records
    /// in plain, weighted by how much of what it revealed was leaked.
    pub score: f64,
}

/// A leak trace report.
#[derive(Clone, Debug, Default)]
pub struct TraceReport {
    /// Records submitted.
    pub records: u64,
    /// Indexes of records none of whose values the vault holds.
    pub not_held: Vec<u64>,
    /// Indexes of held records nobody revealed.
    pub never_revealed: Vec<u64>,
    /// Principals, best explanation first.
    pub principals: Vec<PrincipalTrace>,
}

impl Engine {
    /// Checks the `audit` permission; a refusal is audited.
    pub async fn require_audit(&self, actor: &Principal, what: &str) -> Result<(), VaultError> {
        let policy = self.policy();
        match self.require(&policy, actor, &[Permission::Audit], what) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.audit_admin(
                    actor,
                    Decision::Denied,
                    format!("{what}: audit_not_allowed"),
                )
                .await?;
                Err(e)
            }
        }
    }

    async fn signing_seed(&self) -> Result<SecretKey, VaultError> {
        if let Some(wrapped) = self.store.meta(META_SIGNING_SEED).await? {
            return crypto::unwrap_key(&self.kek, SIGNING_SEED_CONTEXT, &wrapped).map_err(|_| {
                VaultError::DataLoss("the audit signing key does not unwrap: it was altered".into())
            });
        }
        // Vaults initialised before checkpoints existed get their key now.
        let seed = SecretKey::generate();
        let wrapped = crypto::wrap_key(&self.kek, SIGNING_SEED_CONTEXT, &seed);
        self.store
            .commit(WriteBatch {
                meta: vec![(META_SIGNING_SEED.into(), wrapped)],
                ..Default::default()
            })
            .await?;
        Ok(seed)
    }

    async fn load_log(&self) -> Result<LogState, VaultError> {
        let chain = self.config.chain.clone();
        let signer = LogSigner::from_seed(&evidence::origin(&chain), &self.signing_seed().await?)
            .map_err(|e| {
            VaultError::FailedPrecondition(format!("node id {chain:?} cannot name a log: {e}"))
        })?;
        let stored = self.store.checkpoints(&chain).await?;
        let verifier = signer.verifier();
        let mut tree = CompactTree::new();
        let mut refused = None;
        let mut next = 0;
        let mut from = 0;
        loop {
            let page = self.store.audit_leaves(&chain, from, 50_000).await?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            from = last;
            for (_, leaf) in &page {
                tree.push(merkle::leaf_hash(leaf));
                while next < stored.len() && stored[next].size == tree.size() {
                    if stored[next].root != tree.root() {
                        refused = Some(format!(
                            "stored events do not match the checkpoint at size {}",
                            tree.size()
                        ));
                    }
                    next += 1;
                }
            }
        }
        if next < stored.len() {
            refused = Some(format!(
                "a checkpoint covers {} events but only {} are stored (truncated or rolled back)",
                stored[next].size,
                tree.size()
            ));
        }
        if let Some(why) = &refused {
            error!(problem = %why, "audit log contradicts its own checkpoints; checkpoint signing is disabled");
        }
        let last = stored
            .last()
            .and_then(|c| crate::checkpoint::open_checkpoint(&c.note, &verifier).ok());
        Ok(LogState {
            signer,
            tree,
            last,
            refused,
        })
    }

    /// This node's checkpoint verifier key (C2SP note verifier format).
    pub async fn verifier_key(&self) -> Result<String, VaultError> {
        let mut log = self.log.lock().await;
        if log.is_none() {
            *log = Some(self.load_log().await?);
        }
        Ok(log
            .as_ref()
            .map(|l| l.signer.verifier_key())
            .unwrap_or_default())
    }

    /// Signs a checkpoint of everything logged so far, if there is anything
    /// new. Returns the new checkpoint.
    pub async fn checkpoint_now(&self) -> Result<Option<StoredCheckpoint>, VaultError> {
        let mut guard = self.log.lock().await;
        if guard.is_none() {
            *guard = Some(self.load_log().await?);
        }
        let Some(log) = guard.as_mut() else {
            return Ok(None);
        };
        if let Some(why) = &log.refused {
            return Err(VaultError::DataLoss(format!(
                "checkpoint signing is disabled: {why}"
            )));
        }
        let chain = self.config.chain.clone();
        loop {
            let page = self
                .store
                .audit_leaves(&chain, log.tree.size(), 50_000)
                .await?;
            if page.is_empty() {
                break;
            }
            for (seq, leaf) in &page {
                if *seq != log.tree.size() + 1 {
                    log.refused = Some(format!("event seq {} is missing", log.tree.size() + 1));
                    return Err(VaultError::DataLoss(
                        "the audit log has a gap; checkpoint signing is disabled".into(),
                    ));
                }
                log.tree.push(merkle::leaf_hash(leaf));
            }
        }
        let size = log.tree.size();
        if size == 0 || log.last.as_ref().is_some_and(|l| l.size >= size) {
            return Ok(None);
        }
        let cp = Checkpoint {
            origin: evidence::origin(&chain),
            size,
            root: log.tree.root(),
            timestamp_ms: self.now(),
        };
        let note = log
            .signer
            .sign(&cp)
            .map_err(|e| VaultError::Internal(format!("cannot sign a checkpoint: {e}")))?;
        let stored = StoredCheckpoint {
            chain: chain.clone(),
            size,
            root: cp.root,
            ts_ms: cp.timestamp_ms,
            note,
        };
        self.store
            .commit(WriteBatch {
                checkpoints: vec![stored.clone()],
                ..Default::default()
            })
            .await?;
        log.last = Some(cp);
        Ok(Some(stored))
    }

    /// Whether a checkpoint is due (enough new events or time).
    pub async fn checkpoint_due(&self) -> bool {
        let size = self.store.audit_size(&self.config.chain).await.unwrap_or(0);
        let log = self.log.lock().await;
        match log.as_ref().and_then(|l| l.last.as_ref()) {
            None => size > 0,
            Some(last) => {
                size > last.size
                    && (size - last.size >= CHECKPOINT_EVERY_EVENTS
                        || self.now() - last.timestamp_ms >= CHECKPOINT_EVERY_MS)
            }
        }
    }

    /// Events matching `q`, up to `limit`, in sequence order. Needs `audit`.
    pub async fn query_audit(
        &self,
        actor: &Principal,
        q: &Query,
        limit: usize,
    ) -> Result<Vec<audit::StoredEvent>, VaultError> {
        self.require_audit(actor, "query the audit log").await?;
        self.query_audit_unchecked(q, limit).await
    }

    pub(crate) async fn query_audit_unchecked(
        &self,
        q: &Query,
        limit: usize,
    ) -> Result<Vec<audit::StoredEvent>, VaultError> {
        let mut out = Vec::new();
        let mut filter = q.indexed.clone();
        loop {
            let page = self
                .store
                .audit_query(filter.clone(), limit.max(1000))
                .await?;
            let Some(last) = page.last() else { break };
            filter.after_seq = last.seq;
            for e in page {
                let keep = audit::decode_leaf(&e.leaf).is_some_and(|(_, _, ev)| q.matches(&ev));
                if keep {
                    out.push(e);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Audit chains held in the store (this node's first).
    pub async fn chains(&self) -> Result<Vec<String>, VaultError> {
        let mut chains = self.store.audit_chains().await?;
        chains.sort_by_key(|c| (c != &self.config.chain, c.clone()));
        Ok(chains)
    }

    /// Signed checkpoints of a chain. Needs `audit`.
    pub async fn list_checkpoints(
        &self,
        actor: &Principal,
        chain: &str,
    ) -> Result<Vec<StoredCheckpoint>, VaultError> {
        self.require_audit(actor, "read checkpoints").await?;
        Ok(self.store.checkpoints(chain).await?)
    }

    /// Verifies every chain online: leaves, indexed columns, hash chain,
    /// Merkle roots against the signed checkpoints. Needs `audit`.
    pub async fn verify_log(&self, actor: &Principal) -> Result<Vec<ChainReport>, VaultError> {
        self.require_audit(actor, "verify the audit log").await?;
        let verifier = NoteVerifier::parse(&self.verifier_key().await?)
            .map_err(|e| VaultError::Internal(format!("own verifier key: {e}")))?;
        let mut reports = Vec::new();
        let keyed = self.keys_audit_events();
        for chain in self.chains().await? {
            let checkpoints = self.store.checkpoints(&chain).await?;
            let notes: Vec<String> = checkpoints.iter().map(|c| c.note.clone()).collect();
            // Other nodes' chains are checked against their own stored
            // hashes and leaves; signatures only for this node's key.
            let own = chain == self.config.chain;
            let mut merkle = if own {
                Some(evidence::ChainVerifier::new(&chain, &notes, &verifier, &[]))
            } else {
                None
            };
            let mut columns = Verifier::default();
            let mut failure = match &merkle {
                Some(Err(e)) => Some(e.clone()),
                _ => None,
            };
            let mut events = 0u64;
            // Pages of events, so memory stays flat however long the log;
            // the next page is read while this one is checked.
            const PAGE: usize = 20_000;
            let store = self.store.clone();
            // With each page, the first of its events that a search by its
            // token would not find (an edited token index hides it from
            // leak traces), looked up while the page before is checked.
            let fetch = |from: u64| {
                let (store, chain) = (store.clone(), chain.clone());
                tokio::spawn(async move {
                    let page = store.audit_events(&chain, from, PAGE).await?;
                    let keyed = page
                        .iter()
                        .filter_map(|e| e.token_key.map(|k| (e.seq, k)))
                        .collect();
                    let unfindable = store.audit_unfindable(&chain, keyed).await?;
                    Ok::<_, crate::store::StoreError>((page, unfindable))
                })
            };
            let mut pending = Some(fetch(1));
            while failure.is_none() {
                let Some(task) = pending.take() else { break };
                let (page, unfindable) = task
                    .await
                    .map_err(|e| VaultError::Internal(format!("audit read task: {e}")))??;
                let Some(last) = page.last() else { break };
                if page.len() == PAGE {
                    pending = Some(fetch(last.seq + 1));
                }
                for e in &page {
                    events += 1;
                    let checked = match merkle.as_mut() {
                        // This node's chain: decode once, check the indexed
                        // columns, then hashes and Merkle tree.
                        // A row in its place but stored with another type
                        // than the vault writes (a gap is named first).
                        Some(Ok(m)) if e.seq == m.next_seq() && e.misstored.is_some() => {
                            audit::stored_as_written(e)
                        }
                        Some(Ok(m)) => match audit::decode_leaf(&e.leaf) {
                            Some((c, s, ev)) if audit::columns_match(e, &ev) => {
                                m.push_decoded(e.seq, &e.leaf, &c, s, Some(&e.chain_hash))
                            }
                            Some(_) => Err(audit::VerifyError {
                                seq: e.seq,
                                problem: "indexed columns differ from the signed leaf (row edited)"
                                    .into(),
                            }),
                            None => Err(audit::VerifyError {
                                seq: e.seq,
                                problem: "leaf is not a valid event encoding".into(),
                            }),
                        },
                        _ => columns.check(e),
                    };
                    // The token key is the vault's own secret mapping, so
                    // only this online verification can check it.
                    let checked = checked.and_then(|()| {
                        if audit::token_key_matches(e, keyed) {
                            Ok(())
                        } else {
                            Err(audit::VerifyError {
                                seq: e.seq,
                                problem: "the token key is not the one this vault wrote for the event's token (row edited)".into(),
                            })
                        }
                    });
                    // Sound, and found by its token.
                    let checked = checked.and_then(|()| {
                        if unfindable == Some(e.seq) {
                            Err(audit::VerifyError {
                                seq: e.seq,
                                problem: "a search by the event's token does not find it: the token index was edited, so leak traces would miss it".into(),
                            })
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(f) = checked {
                        failure = Some(f);
                        break;
                    }
                }
            }
            if failure.is_none()
                && let Some(Ok(m)) = merkle
            {
                failure = m.finish().err();
            }
            if let Some(f) = &failure {
                warn!(chain = %chain, seq = f.seq, "audit chain fails verification");
            }
            reports.push(ChainReport {
                chain,
                events,
                checkpoints: checkpoints.len() as u64,
                failure,
            });
        }
        Ok(reports)
    }

    /// RFC 9162 inclusion proof of event `seq` in the tree of `tree_size`
    /// (0: the latest checkpoint's size). Returns (proof, leaf hash, root, size).
    pub async fn prove_inclusion(
        &self,
        actor: &Principal,
        chain: &str,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Vec<merkle::Hash>, merkle::Hash, merkle::Hash, u64), VaultError> {
        self.require_audit(actor, "request proofs").await?;
        let size = self.proof_size(chain, tree_size).await?;
        if seq == 0 || seq > size {
            return Err(VaultError::InvalidArgument(format!(
                "seq must be between 1 and the tree size {size}"
            )));
        }
        let leaves = self.leaf_hashes(chain, size).await?;
        let proof = merkle::inclusion_proof(&leaves, seq - 1)
            .map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
        Ok((
            proof,
            leaves[(seq - 1) as usize],
            merkle::root(&leaves),
            size,
        ))
    }

    /// RFC 9162 consistency proof between two tree sizes.
    pub async fn prove_consistency(
        &self,
        actor: &Principal,
        chain: &str,
        old_size: u64,
        tree_size: u64,
    ) -> Result<(Vec<merkle::Hash>, merkle::Hash, u64), VaultError> {
        self.require_audit(actor, "request proofs").await?;
        let size = self.proof_size(chain, tree_size).await?;
        if old_size == 0 || old_size > size {
            return Err(VaultError::InvalidArgument(format!(
                "old_size must be between 1 and the tree size {size}"
            )));
        }
        let leaves = self.leaf_hashes(chain, size).await?;
        let proof = merkle::consistency_proof(&leaves, old_size)
            .map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
        Ok((proof, merkle::root(&leaves), size))
    }

    async fn proof_size(&self, chain: &str, tree_size: u64) -> Result<u64, VaultError> {
        let stored = self.store.audit_size(chain).await?;
        if stored == 0 {
            return Err(VaultError::NotFound(format!("no audit chain {chain:?}")));
        }
        let size = if tree_size == 0 {
            self.store
                .checkpoints(chain)
                .await?
                .last()
                .map(|c| c.size)
                .unwrap_or(stored)
        } else {
            tree_size
        };
        if size > stored {
            return Err(VaultError::InvalidArgument(format!(
                "tree_size {size} is beyond the log's {stored} events"
            )));
        }
        Ok(size)
    }

    async fn leaf_hashes(&self, chain: &str, size: u64) -> Result<Vec<merkle::Hash>, VaultError> {
        let events = self.store.audit_events(chain, 1, size as usize).await?;
        Ok(events.iter().map(|e| merkle::leaf_hash(&e.leaf)).collect())
    }

    /// Traces leaked records (column name = field kind → value as leaked)
    /// to the principals who revealed them. Needs `audit`; audited.
    pub async fn trace_leak(
        &self,
        actor: &Principal,
        records: Vec<BTreeMap<String, Zeroizing<String>>>,
    ) -> Result<TraceReport, VaultError> {
        self.require_audit(actor, "trace a leak").await?;
        // Normalise and fingerprint every value, as at tokenize time.
        let keyring = read(&self.keyring);
        let mut keys: Vec<(FieldKind, [u8; 32])> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            for (column, value) in record {
                let kind: FieldKind = column.parse().map_err(|_| {
                    VaultError::InvalidArgument(format!(
                        "record #{i}: column {column:?} is not a field kind (name, phone, address, id_number, email, order_number, order_details, customer_id)"
                    ))
                })?;
                if value.trim().is_empty() {
                    continue;
                }
                // A value the vault would have refused cannot be held by it.
                let Ok(normalised) = kind.normalise(value) else {
                    continue;
                };
                keys.push((kind, keyring.fingerprint(kind, &normalised)));
                owners.push(i);
            }
        }
        let found = self.store.tokens_by_fingerprint(keys.clone()).await?;
        let mut record_tokens: Vec<BTreeSet<String>> = vec![BTreeSet::new(); records.len()];
        let mut token_record: HashMap<String, Vec<usize>> = HashMap::new();
        for ((ids, (kind, _)), owner) in found.iter().zip(&keys).zip(&owners) {
            for id in ids {
                let t = Token::from_parts(TokenClass::Field(*kind), *id).to_string();
                record_tokens[*owner].insert(t.clone());
                token_record.entry(t).or_default().push(*owner);
            }
        }
        let mut report = TraceReport {
            records: records.len() as u64,
            ..Default::default()
        };
        for (i, toks) in record_tokens.iter().enumerate() {
            if toks.is_empty() {
                report.not_held.push(i as u64);
            }
        }
        // Who revealed which leaked record, and how.
        let all_tokens: Vec<TokenLookup> = token_record.keys().map(TokenLookup::text).collect();
        let events = self.store.audit_by_tokens(all_tokens).await?;
        #[derive(Default)]
        struct Acc {
            role: String,
            plain: BTreeSet<usize>,
            masked: BTreeSet<usize>,
            first: i64,
            last: i64,
        }
        let mut by_principal: BTreeMap<String, Acc> = BTreeMap::new();
        let mut revealed_records = BTreeSet::new();
        // The indexed columns carry what a trace needs, so events are not
        // decoded (a leak can touch millions); roles come from the
        // principal table.
        let roles: HashMap<String, String> = self
            .store
            .principals()
            .await?
            .into_iter()
            .map(|p| (p.name, p.role))
            .collect();
        for e in &events {
            let allowed = e.decision == Decision::Allowed.as_str();
            if e.action != audit::Action::Reveal.as_str()
                || !(allowed || e.decision == Decision::Masked.as_str())
            {
                continue;
            }
            let Some(recs) = e.token.as_ref().and_then(|t| token_record.get(t)) else {
                continue;
            };
            let acc = by_principal
                .entry(e.principal.clone())
                .or_insert_with(|| Acc {
                    role: roles.get(&e.principal).cloned().unwrap_or_default(),
                    first: i64::MAX,
                    last: i64::MIN,
                    ..Default::default()
                });
            for r in recs {
                revealed_records.insert(*r);
                if allowed {
                    acc.plain.insert(*r);
                } else {
                    acc.masked.insert(*r);
                }
            }
            acc.first = acc.first.min(e.ts_ms);
            acc.last = acc.last.max(e.ts_ms);
        }
        let held = records.len() - report.not_held.len();
        for (i, toks) in record_tokens.iter().enumerate() {
            if !toks.is_empty() && !revealed_records.contains(&i) {
                report.never_revealed.push(i as u64);
            }
        }
        for (principal, acc) in by_principal {
            let total = self
                .records_revealed(&principal, acc.first, acc.last)
                .await?;
            let plain = acc.plain.len() as u64;
            let masked_only = acc.masked.difference(&acc.plain).count() as u64;
            let coverage = if held == 0 {
                0.0
            } else {
                plain as f64 / held as f64
            };
            let precision = if total == 0 {
                0.0
            } else {
                (plain as f64 / total as f64).min(1.0)
            };
            report.principals.push(PrincipalTrace {
                principal,
                role: acc.role,
                plain,
                masked_only,
                first_ms: acc.first,
                last_ms: acc.last,
                revealed_total: total,
                // Coverage dominates; among principals who could have leaked
                // as much, the one that revealed little else ranks first.
                score: coverage * (0.5 + 0.5 * precision),
            });
        }
        report.principals.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.plain.cmp(&a.plain))
                .then(a.principal.cmp(&b.principal))
        });
        self.audit_admin(
            actor,
            Decision::Allowed,
            format!(
                "trace_leak records={} not_held={} never_revealed={}",
                report.records,
                report.not_held.len(),
                report.never_revealed.len()
            ),
        )
        .await?;
        Ok(report)
    }

    /// Distinct records (orders, or tokens outside orders) a principal
    /// revealed in plain or masked in `[from, to]`, across all chains.
    async fn records_revealed(
        &self,
        principal: &str,
        from: i64,
        to: i64,
    ) -> Result<u64, VaultError> {
        Ok(self.store.revealed_records(principal, from, to).await?)
    }
}
