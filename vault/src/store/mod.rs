//! Persistence behind one trait, [`Store`]. The store is untrusted: it sees
//! only ciphertexts, keyed fingerprints, wrapped keys, API-key hashes and
//! audit events, never a value or a key.
//!
//! Writes go through [`Store::commit`], which the SQLite backend implements
//! with a group-commit writer: concurrent requests' batches share one
//! transaction and one fsync, and each caller is answered only once its
//! batch is durable.

use async_trait::async_trait;

use crate::audit::{AuditEvent, StoredEvent};
use crate::kinds::FieldKind;
use crate::token::TOKEN_ID_BYTES;

pub mod permuted;
pub mod postgres;
pub mod sqlite;

/// A token's id: its body above [`permuted::PermutedStore`], its storage key
/// below it.
pub type TokenId = [u8; TOKEN_ID_BYTES];

/// A stored token: everything needed to decrypt and decide, no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Storage key.
    pub id: TokenId,
    /// Field kind of the value.
    pub kind: FieldKind,
    /// Data-key version the ciphertext is under.
    pub key_version: u32,
    /// AEAD envelope (see [`crate::crypto`]).
    pub ciphertext: Vec<u8>,
    /// Keyed fingerprint of the normalised value.
    pub fingerprint: [u8; 32],
    /// Whether the token is the deterministic token of its fingerprint.
    pub deterministic: bool,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
}

/// A data-key version as stored: wrapped under the master key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    /// Version number, from 1.
    pub version: u32,
    /// AEAD algorithm id ([`crate::crypto::Algorithm::id`]).
    pub algorithm: u8,
    /// The data key wrapped by the master key; `None` once retired.
    pub wrapped: Option<Vec<u8>>,
    /// `primary`, `decrypt_only` or `retired`.
    pub state: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Encryptions durably reserved under this key (the counter never passes
    /// this, and this never passes the cap).
    pub reserved: u64,
}

/// An authenticated caller as stored: the API key only as its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalRecord {
    /// Unique name.
    pub name: String,
    /// Role in the policy.
    pub role: String,
    /// SHA-256 of the API key.
    pub key_hash: [u8; 32],
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// When revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// An order created by TokenizeOrder, with the tokens of its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRecord {
    /// The order token's storage key.
    pub id: TokenId,
    /// Who tokenized it.
    pub created_by: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Field tokens of the order, as indexes into the batch's `tokens`.
    pub fields: Vec<usize>,
}

/// "Principal P may reveal order O for purpose X until time T."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// Random id.
    pub id: [u8; 16],
    /// Who may reveal.
    pub principal: String,
    /// The order token's storage key.
    pub order_id: TokenId,
    /// For which purpose.
    pub purpose: String,
    /// Until when, Unix milliseconds.
    pub expires_ms: i64,
    /// Who granted it.
    pub granted_by: String,
    /// When, Unix milliseconds.
    pub created_ms: i64,
    /// When revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// Which grants to list.
#[derive(Clone, Debug, Default)]
pub struct GrantFilter {
    /// Only this principal's.
    pub principal: Option<String>,
    /// Only these orders' (empty: any order).
    pub orders: Vec<TokenId>,
}

/// What a reveal reads from the store, in request order
/// ([`Store::reveal_reads`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevealReads {
    /// Each token asked for; `None` where it is not held.
    pub rows: Vec<Option<TokenRecord>>,
    /// For each token, the orders it belongs to (none for an unknown id).
    pub orders: Vec<Vec<TokenId>>,
    /// The grants to the principal asked about on any of those orders,
    /// newest first; none when no principal was asked about.
    pub grants: Vec<GrantRecord>,
}

/// The grant check's filter for a reveal of tokens belonging to `orders`:
/// `principal`'s grants on any of them, each order once. `None` when there
/// is nothing to look up.
pub(crate) fn grant_filter(
    principal: Option<String>,
    orders: &[Vec<TokenId>],
) -> Option<GrantFilter> {
    let principal = principal?;
    let all: std::collections::BTreeSet<TokenId> = orders.iter().flatten().copied().collect();
    (!all.is_empty()).then(|| GrantFilter {
        principal: Some(principal),
        orders: all.into_iter().collect(),
    })
}

/// A stored alert. Never contains a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    /// Sequence id (assigned by the store; 0 when new).
    pub id: u64,
    /// When raised, Unix milliseconds.
    pub at_ms: i64,
    /// `quota_exceeded`, `auth_throttled`, `bulk_extraction`.
    pub kind: String,
    /// The principal concerned, if any.
    pub principal: String,
    /// The peer address concerned, if any.
    pub peer: String,
    /// Human-readable detail: counts and limits only.
    pub detail: String,
}

/// A signed checkpoint of an audit chain, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Chain (node id).
    pub chain: String,
    /// Tree size it covers.
    pub size: u64,
    /// Merkle root at that size.
    pub root: [u8; 32],
    /// When signed, Unix milliseconds.
    pub ts_ms: i64,
    /// The C2SP signed note.
    pub note: String,
}

/// Filters of an audit query on indexed columns; others are applied to the
/// decoded leaves by the caller.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Chain to read.
    pub chain: String,
    /// Only events with seq > this.
    pub after_seq: u64,
    /// Only this principal's.
    pub principal: Option<String>,
    /// Only this action's.
    pub action: Option<String>,
    /// Only this decision's.
    pub decision: Option<String>,
    /// Only events about this token.
    pub token: Option<String>,
    /// The storage key of `token`, set by
    /// [`permuted::PermutedStore`]: events carrying it are found through it
    /// (see [`WriteBatch::audit_token_keys`]); events without one, by the
    /// text. Without it, events stored with a key are not found; ignored
    /// without `token`.
    pub token_key: Option<TokenId>,
    /// Only events at or after this time.
    pub since_ms: Option<i64>,
    /// Only events before this time.
    pub until_ms: Option<i64>,
}

/// Everything one request writes, applied atomically.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Metadata entries to set.
    pub meta: Vec<(String, Vec<u8>)>,
    /// Key versions to insert or replace.
    pub keys: Vec<StoredKey>,
    /// Encryptions to reserve under key versions, added to the stored
    /// total; see [`Committed::reserved`].
    pub reserve: Vec<Reservation>,
    /// Principals to insert.
    pub principals: Vec<PrincipalRecord>,
    /// New tokens. A deterministic token whose (kind, fingerprint) already
    /// exists is not inserted; the existing id is returned in its place. A
    /// record with an empty ciphertext only refers to an existing row.
    pub tokens: Vec<TokenRecord>,
    /// Orders to insert.
    pub orders: Vec<OrderRecord>,
    /// Grants to insert.
    pub grants: Vec<GrantRecord>,
    /// Grants to revoke: (id, when).
    pub grant_revocations: Vec<([u8; 16], i64)>,
    /// Principals to revoke: (name, when).
    pub principal_revocations: Vec<(String, i64)>,
    /// Distinct orders revealed: (principal, UTC day number, order or token id).
    pub reveal_days: Vec<(String, i64, TokenId)>,
    /// Daily caps the batch must respect: (principal, UTC day, cap). After
    /// `reveal_days` are added, the principal's distinct orders that day
    /// must not exceed the cap, counted over everything stored (every
    /// node's reveals), or the batch fails with
    /// [`StoreError::DailyCapReached`].
    pub daily_caps: Vec<(String, i64, u64)>,
    /// Alerts to store.
    pub alerts: Vec<AlertRecord>,
    /// Signed checkpoints to store.
    pub checkpoints: Vec<StoredCheckpoint>,
    /// Key versions to move from one state to another: (version, from,
    /// to). Fails the batch unless the version is in state `from`.
    pub key_states: Vec<(u32, String, String)>,
    /// Ciphertexts re-encrypted under another key version. Each applies only
    /// if the row is still under `from_version`; see [`Committed::rewrapped`].
    pub rewraps: Vec<Rewrapped>,
    /// Key versions to destroy: the wrapped key is erased and the state set
    /// to `retired`. Fails the batch unless the version is `decrypt_only`
    /// and no ciphertext uses it.
    pub retire: Vec<u32>,
    /// The audit chain (node id) the events are appended to.
    pub audit_chain: String,
    /// Audit events to append, in order.
    pub audit: Vec<AuditEvent>,
    /// The storage key of each audit event's token, index-aligned with
    /// `audit`; empty, or shorter, for none. Set by
    /// [`permuted::PermutedStore`] only: with time-ordered keys, an index on
    /// the key puts the events of tokens created together (an order's
    /// fields) side by side, where an index on the token text scatters
    /// every event to a random page. Events stored without a key are found
    /// by their text.
    pub audit_token_keys: Vec<Option<TokenId>>,
}

/// A token to find audit events about: its text, and its storage key where
/// the vault stores one ([`WriteBatch::audit_token_keys`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenLookup {
    /// The token as text.
    pub text: String,
    /// Its storage key, set by [`permuted::PermutedStore`].
    pub key: Option<TokenId>,
}

impl WriteBatch {
    /// The storage key of audit event `i`'s token, if the batch holds one.
    pub fn audit_token_key(&self, i: usize) -> Option<TokenId> {
        self.audit_token_keys.get(i).copied().flatten()
    }
}

impl TokenLookup {
    /// A lookup by text alone.
    pub fn text(text: impl Into<String>) -> TokenLookup {
        TokenLookup {
            text: text.into(),
            key: None,
        }
    }
}

/// A block of encryptions to reserve under a key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The key version.
    pub version: u32,
    /// How many encryptions to add to its stored total.
    pub count: u64,
    /// The total never passes this: the block is cut short at the cap.
    pub cap: u64,
}

/// One ciphertext re-encrypted under another key version (rewrap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrapped {
    /// The token's storage key.
    pub id: TokenId,
    /// The version the row must still be under for the update to apply.
    pub from_version: u32,
    /// The version of `ciphertext`.
    pub to_version: u32,
    /// The new AEAD envelope.
    pub ciphertext: Vec<u8>,
}

/// What a committed batch resolved to.
#[derive(Debug, Default)]
pub struct Committed {
    /// Final id of each batch token (an existing one for deduplicated
    /// deterministic tokens).
    pub token_ids: Vec<TokenId>,
    /// Sequence numbers given to the batch's audit events.
    pub audit_seqs: Vec<u64>,
    /// How many of the batch's rewraps applied (the others' rows had
    /// already moved to another version, or are gone).
    pub rewrapped: u64,
    /// For each reservation of the batch, the stored total before and
    /// after it: the encryptions `old..new` are the caller's alone.
    pub reserved: Vec<(u64, u64)>,
}

/// Storage failures, by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or written right now; nothing of the
    /// batch was applied. Retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data is not what the vault wrote.
    #[error("{0}")]
    Corrupt(String),
    /// The write conflicts with existing data (e.g. a duplicate name).
    #[error("{0}")]
    Conflict(String),
    /// The request holds a value the database cannot store or compare
    /// (e.g. a NUL character in text); nothing was applied.
    #[error("{0}")]
    Invalid(String),
    /// A batch's daily cap would be exceeded; nothing was applied.
    #[error(
        "daily cap of {cap} distinct orders reached for {principal:?} ({revealed} revealed that day)"
    )]
    DailyCapReached {
        /// Whose cap.
        principal: String,
        /// The cap.
        cap: u64,
        /// Distinct orders already stored for that day.
        revealed: u64,
    },
}

/// Persistence for the vault. Implemented by SQLite (embedded default) and
/// PostgreSQL (shared by many nodes).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name, as `status` shows it.
    fn backend(&self) -> &'static str;
    /// Whether other vault nodes may write the same store: keys, policy and
    /// principals must then be re-read periodically.
    fn shared(&self) -> bool {
        false
    }
    /// Claims `chain` for this process: the audit chain of a node id is
    /// written by one node only. Fails with [`StoreError::Conflict`] when
    /// another live node holds it.
    async fn claim_chain(&self, chain: &str) -> Result<(), StoreError> {
        let _ = chain;
        Ok(())
    }
    /// Vault nodes currently running on this store (at least 1): rate
    /// limits are shared out among them.
    async fn live_nodes(&self) -> Result<u64, StoreError> {
        Ok(1)
    }
    /// Stops accepting writes and commits what is queued; returns once it
    /// is committed.
    async fn close(&self) {}
    /// A metadata value.
    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// All key versions.
    async fn key_versions(&self) -> Result<Vec<StoredKey>, StoreError>;
    /// All principals, revoked ones included.
    async fn principals(&self) -> Result<Vec<PrincipalRecord>, StoreError>;
    /// Tokens by id, in request order; `None` for unknown ids.
    async fn tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Option<TokenRecord>>, StoreError>;
    /// Deterministic token ids by (kind, fingerprint), in request order.
    async fn deterministic_tokens(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Option<TokenId>>, StoreError>;
    /// Applies a batch atomically and durably.
    async fn commit(&self, batch: WriteBatch) -> Result<Committed, StoreError>;
    /// Up to `limit` audit events of `chain` with seq ≥ `from_seq`, in order.
    async fn audit_events(
        &self,
        chain: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Number of stored tokens.
    async fn token_count(&self) -> Result<u64, StoreError>;
    /// For each token, the orders it belongs to.
    async fn orders_of_tokens(&self, ids: Vec<TokenId>) -> Result<Vec<Vec<TokenId>>, StoreError>;
    /// What a reveal reads ([`RevealReads`]): each token
    /// ([`Store::tokens`]), for each one held the orders it belongs to
    /// ([`Store::orders_of_tokens`]), and, when `grants_of` names a
    /// principal, that principal's grants on any of those orders
    /// ([`Store::grants_for_reveal`]). A backend that can answer all of it
    /// in one trip overrides this.
    async fn reveal_reads(
        &self,
        ids: Vec<TokenId>,
        grants_of: Option<String>,
    ) -> Result<RevealReads, StoreError> {
        let rows = self.tokens(ids.clone()).await?;
        let held: Vec<TokenId> = rows.iter().flatten().map(|r| r.id).collect();
        let asked = held.len();
        let found = self.orders_of_tokens(held).await?;
        if found.len() != asked {
            return Err(StoreError::Unavailable(format!(
                "the store answered {} order lists for {asked} tokens",
                found.len()
            )));
        }
        let mut found = found.into_iter();
        let orders: Vec<Vec<TokenId>> = rows
            .iter()
            .map(|r| match r {
                Some(_) => found.next().unwrap_or_default(),
                None => Vec::new(),
            })
            .collect();
        let grants = match grant_filter(grants_of, &orders) {
            Some(filter) => self.grants_for_reveal(filter).await?,
            None => Vec::new(),
        };
        Ok(RevealReads {
            rows,
            orders,
            grants,
        })
    }
    /// Whether an order token is held.
    async fn order_exists(&self, id: TokenId) -> Result<bool, StoreError>;
    /// Grants matching a filter, newest first.
    async fn grants(&self, filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError>;
    /// [`Store::grants`], for a reveal's grant check. The reveal commits
    /// its audit events before it answers, and that commit is synced after
    /// this read, so a store whose reads otherwise wait for the disk
    /// (SQLite) answers at once.
    async fn grants_for_reveal(&self, filter: GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        self.grants(filter).await
    }
    /// One grant by id.
    async fn grant(&self, id: [u8; 16]) -> Result<Option<GrantRecord>, StoreError>;
    /// Orders (or bare tokens) a principal revealed on a UTC day.
    async fn revealed_on_day(&self, principal: &str, day: i64) -> Result<Vec<TokenId>, StoreError>;
    /// Alerts raised at or after `since_ms`, oldest first.
    async fn alerts(&self, since_ms: i64, limit: usize) -> Result<Vec<AlertRecord>, StoreError>;

    // Audit log (auditors).

    /// Ids of every audit chain.
    async fn audit_chains(&self) -> Result<Vec<String>, StoreError>;
    /// Highest sequence number of a chain (0 when empty).
    async fn audit_size(&self, chain: &str) -> Result<u64, StoreError>;
    /// Up to `limit` events matching `filter`, in sequence order.
    async fn audit_query(
        &self,
        filter: AuditFilter,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// The sequence numbers and leaves of up to `limit` events of `chain`
    /// after `after_seq`, in order, the leaves as [`Store::audit_query`]
    /// gives them: what the checkpoint signer adds to its tree, which needs
    /// nothing else of an event. A backend that can read only those
    /// columns overrides this.
    async fn audit_leaves(
        &self,
        chain: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let filter = AuditFilter {
            chain: chain.to_owned(),
            after_seq,
            ..Default::default()
        };
        Ok(self
            .audit_query(filter, limit)
            .await?
            .into_iter()
            .map(|e| (e.seq, e.leaf))
            .collect())
    }
    /// All events about any of `tokens` (all chains), in (chain, seq) order:
    /// those stored with a token key equal to a lookup's key, and those
    /// stored without one whose token text equals a lookup's text.
    async fn audit_by_tokens(
        &self,
        tokens: Vec<TokenLookup>,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// The first of `events` of `chain` (seq and token key, in seq order)
    /// that [`Store::audit_by_tokens`] and a query by token would not find:
    /// for a store that indexes events by token key apart from the events
    /// themselves, where that index was edited. `None` where each is found
    /// (the default, for stores whose database keeps that index itself).
    async fn audit_unfindable(
        &self,
        _chain: &str,
        _events: Vec<(u64, TokenId)>,
    ) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Distinct records (order tokens, or tokens outside orders) a principal
    /// revealed in plain or masked in `[from_ms, to_ms]`, across all chains.
    async fn revealed_records(
        &self,
        principal: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Checkpoints of a chain, oldest first.
    async fn checkpoints(&self, chain: &str) -> Result<Vec<StoredCheckpoint>, StoreError>;
    /// All token ids holding a value of `kind` with this fingerprint.
    async fn tokens_by_fingerprint(
        &self,
        keys: Vec<(FieldKind, [u8; 32])>,
    ) -> Result<Vec<Vec<TokenId>>, StoreError>;

    // Key lifecycle (admin).

    /// Number of ciphertexts under each key version that has any.
    async fn ciphertexts_per_version(&self) -> Result<Vec<(u32, u64)>, StoreError>;
    /// Up to `limit` tokens to rewrap: those under `only` when given, else
    /// under any version but `primary`.
    async fn rewrap_candidates(
        &self,
        primary: u32,
        only: Option<u32>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError>;
    /// How many tokens [`Store::rewrap_candidates`] could still return.
    async fn rewrap_remaining(&self, primary: u32, only: Option<u32>) -> Result<u64, StoreError>;
    /// Bytes the store occupies on disk (database and log).
    async fn storage_bytes(&self) -> Result<u64, StoreError>;
    /// The last event of a chain: (seq, chain hash); `None` when empty.
    async fn chain_head(&self, chain: &str) -> Result<Option<(u64, [u8; 32])>, StoreError>;
}
