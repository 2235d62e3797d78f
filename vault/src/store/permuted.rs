//! A [`Store`] in front of another that stores tokens under time-ordered
//! keys: every token id going in is mapped from its body to its storage key,
//! every id coming out back to its body (see [`TokenIds`]). Above this layer
//! everything speaks of token bodies; below it, rows are keyed so that those
//! written together sit together.
//!
//! Grant ids and everything else that is not a token id pass unchanged.
//! Audit events hold tokens as text, which is always the body; this layer
//! adds each one's storage key ([`WriteBatch::audit_token_keys`]), by which
//! the events of tokens created together are indexed side by side, and
//! finds events through it.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    AlertRecord, AuditFilter, Committed, GrantFilter, GrantRecord, PrincipalRecord, RevealReads,
    Store, StoreError, StoredCheckpoint, StoredKey, TokenId, TokenLookup, TokenRecord, WriteBatch,
};
use crate::audit::StoredEvent;
use crate::kinds::FieldKind;
use crate::token::{Token, TokenIds};

/// See the module documentation.
pub struct PermutedStore {
    inner: Arc<dyn Store>,
    ids: TokenIds,
}

impl PermutedStore {
    /// `inner`, with token ids mapped by `ids`.
    pub fn new(inner: Arc<dyn Store>, ids: TokenIds) -> PermutedStore {
        PermutedStore { inner, ids }
    }

    fn key(&self, body: &TokenId) -> TokenId {
        self.ids.storage_key(body)
    }

    fn keys(&self, bodies: Vec<TokenId>) -> Vec<TokenId> {
        bodies.iter().map(|b| self.key(b)).collect()
    }

    fn body(&self, key: &TokenId) -> TokenId {
        self.ids.body(key)
    }

    fn bodies(&self, keys: Vec<TokenId>) -> Vec<TokenId> {
        keys.iter().map(|k| self.body(k)).collect()
    }

    fn record_out(&self, mut r: TokenRecord) -> TokenRecord {
        r.id = self.body(&r.id);
        r
    }

    fn grant_out(&self, mut g: GrantRecord) -> GrantRecord {
        g.order_id = self.body(&g.order_id);
        g
    }

    /// The storage key of a token given as text; none for text that is not
    /// a token.
    fn text_key(&self, text: &str) -> Option<TokenId> {
        Token::parse(text).ok().map(|t| self.key(t.id()))
    }

    fn events_out(&self, mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
        for e in &mut events {
            e.token_key = e.token_key.map(|k| self.body(&k));
        }
        events
    }
}

impl std::fmt::Debug for PermutedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermutedStore")
            .field("backend", &self.inner.backend())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for PermutedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn claim_chain(&self, chain: &str) -> Result<(), StoreError> {
        self.inner.claim_chain(chain).await
    }

    async fn live_nodes(&self) -> Result<u64, StoreError> {
        self.inner.live_nodes().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(key).await
    }

    async fn key_versions(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.inner.key_versions().await
    }

    async fn principals(&self) -> Result<Vec<PrincipalRecord>, StoreError> {
        self.inner.principals().await
    }

    async fn tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Option<TokenRecord>>, StoreError> {
        let found = self.inner.tokens(self.keys(ids)).await?;
        Ok(found
            .into_iter()
            .map(|r| r.map(|r| self.record_out(r)))
            .collect())
    }

    async fn deterministic_tokens(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Option<TokenId>>, StoreError> {
        let found = self.inner.deterministic_tokens(keys).await?;
        Ok(found
            .into_iter()
            .map(|id| id.map(|k| self.body(&k)))
            .collect())
    }

    async fn commit(&self, mut batch: WriteBatch) -> Result<Committed, StoreError> {
        for t in &mut batch.tokens {
            t.id = self.key(&t.id);
        }
        for o in &mut batch.orders {
            o.id = self.key(&o.id);
        }
        for g in &mut batch.grants {
            g.order_id = self.key(&g.order_id);
        }
        for (_, _, id) in &mut batch.reveal_days {
            *id = self.key(id);
        }
        for r in &mut batch.rewraps {
            r.id = self.key(&r.id);
        }
        batch.audit_token_keys = batch
            .audit
            .iter()
            .map(|e| e.token.as_deref().and_then(|t| self.text_key(t)))
            .collect();
        let mut committed = self.inner.commit(batch).await?;
        committed.token_ids = self.bodies(std::mem::take(&mut committed.token_ids));
        Ok(committed)
    }

    async fn audit_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.events_out(self.inner.audit_events(chain, from_seq, limit).await?))
    }

    async fn token_count(&self) -> Result<u64, StoreError> {
        self.inner.token_count().await
    }

    async fn orders_of_tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Vec<TokenId>>, StoreError> {
        let orders = self.inner.orders_of_tokens(self.keys(ids)).await?;
        Ok(orders.into_iter().map(|o| self.bodies(o)).collect())
    }

    async fn reveal_reads(
        &self,
        ids: Vec<TokenId>,
        grants_of: Option<String>,
    ) -> Result<RevealReads, StoreError> {
        let reads = self.inner.reveal_reads(self.keys(ids), grants_of).await?;
        Ok(RevealReads {
            rows: reads
                .rows
                .into_iter()
                .map(|r| r.map(|r| self.record_out(r)))
                .collect(),
            orders: reads.orders.into_iter().map(|o| self.bodies(o)).collect(),
            grants: reads
                .grants
                .into_iter()
                .map(|g| self.grant_out(g))
                .collect(),
        })
    }

    async fn order_exists(&self, id: TokenId) -> Result<bool, StoreError> {
        self.inner.order_exists(self.key(&id)).await
    }

    async fn grants(&self, mut filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        filter.orders = self.keys(filter.orders);
        let grants = self.inner.grants(filter).await?;
        Ok(grants.into_iter().map(|g| self.grant_out(g)).collect())
    }

    async fn grants_for_reveal(
        &self,
        mut filter: GrantFilter,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        filter.orders = self.keys(filter.orders);
        let grants = self.inner.grants_for_reveal(filter).await?;
        Ok(grants.into_iter().map(|g| self.grant_out(g)).collect())
    }

    async fn grant(&self, id: [u8; 16]) -> Result<Option<GrantRecord>, StoreError> {
        Ok(self.inner.grant(id).await?.map(|g| self.grant_out(g)))
    }

    async fn revealed_on_day(&self, principal: &str, day: i64) -> Result<Vec<TokenId>, StoreError> {
        Ok(self.bodies(self.inner.revealed_on_day(principal, day).await?))
    }

    async fn alerts(&self, since_ms: i64, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        self.inner.alerts(since_ms, limit).await
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.inner.audit_chains().await
    }

    async fn audit_size(&self, chain: &str) -> Result<u64, StoreError> {
        self.inner.audit_size(chain).await
    }

    async fn audit_leaves(
        &self,
        chain: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.audit_leaves(chain, after_seq, limit).await
    }

    async fn audit_query(
        &self,
        mut filter: AuditFilter,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        filter.token_key = filter.token.as_deref().and_then(|t| self.text_key(t));
        Ok(self.events_out(self.inner.audit_query(filter, limit).await?))
    }

    async fn audit_unfindable(
        &self,
        chain: &str,
        events: Vec<(u64, TokenId)>,
    ) -> Result<Option<u64>, StoreError> {
        // Events read through this store carry their keys as it hands them
        // out; the inner store indexed them as stored.
        let events = events.into_iter().map(|(s, k)| (s, self.key(&k))).collect();
        self.inner.audit_unfindable(chain, events).await
    }

    async fn audit_by_tokens(
        &self,
        mut tokens: Vec<TokenLookup>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        for t in &mut tokens {
            t.key = self.text_key(&t.text);
        }
        Ok(self.events_out(self.inner.audit_by_tokens(tokens).await?))
    }

    async fn revealed_records(
        &self,
        principal: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError> {
        self.inner.revealed_records(principal, from_ms, to_ms).await
    }

    async fn checkpoints(&self, chain: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.inner.checkpoints(chain).await
    }

    async fn tokens_by_fingerprint(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Vec<TokenId>>, StoreError> {
        let found = self.inner.tokens_by_fingerprint(keys).await?;
        Ok(found.into_iter().map(|ids| self.bodies(ids)).collect())
    }

    async fn ciphertexts_per_version(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.inner.ciphertexts_per_version().await
    }

    async fn rewrap_candidates(
        &self,
        primary: u32,
        only: Option<u32>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let found = self.inner.rewrap_candidates(primary, only, limit).await?;
        Ok(found.into_iter().map(|r| self.record_out(r)).collect())
    }

    async fn rewrap_remaining(&self, primary: u32, only: Option<u32>) -> Result<u64, StoreError> {
        self.inner.rewrap_remaining(primary, only).await
    }

    async fn storage_bytes(&self) -> Result<u64, StoreError> {
        self.inner.storage_bytes().await
    }

    async fn chain_head(&self, chain: &str) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        self.inner.chain_head(chain).await
    }
}
