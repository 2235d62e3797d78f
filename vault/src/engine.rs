//! The engine: the vault's decisions, independent of gRPC.
//!
//! Tokenize: normalise → fingerprint → (deterministic kinds: reuse the
//! existing token) → claim encryptions under the primary key → encrypt with
//! the token bound into the associated data → one write batch (tokens,
//! order, audit event) → durable commit → tokens.
//!
//! Reveal: load token rows → per token, the role's visibility for its kind
//! → decrypt what is allowed → mask where policy says → audit events
//! committed durably → only then the values. If the audit write fails,
//! nothing is revealed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use subtle::ConstantTimeEq;
use tracing::{instrument, warn};
use zeroize::Zeroizing;

use crate::audit::{Action, AuditEvent, Decision};
use crate::crypto::{self, Algorithm, SecretKey};
use crate::error::VaultError;
use crate::guard::{
    self, AuthThrottle, AuthThrottleConfig, Bucket, BulkConfig, BulkWindow, DayOrders,
};
use crate::keyring::{self, KeyVersion, Keyring};
use crate::kinds::{FieldKind, InvalidValue};
use crate::policy::{Limits, Permission, Policy, Purpose, Rate, RolePolicy, Visibility};
use crate::store::{
    AlertRecord, GrantFilter, GrantRecord, OrderRecord, PrincipalRecord, Reservation, RevealReads,
    Store, StoreError, TokenId, TokenRecord, WriteBatch, permuted::PermutedStore,
};
use crate::token::{TIME_ORDERED_V1, Token, TokenClass, TokenIds};

/// Most fields (or tokens) in one request.
pub const MAX_FIELDS_PER_REQUEST: usize = 1000;
/// Default cap on encryptions per AES-GCM key version: 2^30, well below the
/// 2^32 limit for random 96-bit nonces (NIST SP 800-38D §8.3).
pub const DEFAULT_ENCRYPTION_CAP: u64 = 1 << 30;
/// Encryptions reserved durably at a time.
const RESERVE_BLOCK: u64 = 1 << 16;

/// Meta key holding the wrapped fingerprint root key.
pub const META_FINGERPRINT_ROOT: &str = "fingerprint_root";
/// Meta key set last by `init`: the vault is complete.
pub const META_INITIALIZED: &str = "initialized";
/// Metadata key of how token bodies map to storage keys
/// ([`crate::token::TIME_ORDERED_V1`]; absent in vaults made before).
pub const META_TOKEN_IDS: &str = "token_ids";
/// Metadata key of the policy text every node of a shared store enforces.
pub const META_POLICY: &str = "policy";

/// Machine-readable denial reasons, as returned per field and audited.
pub mod reason {
    /// The role may not see this kind.
    pub const KIND_NOT_ALLOWED: &str = "kind_not_allowed";
    /// The role may not state this purpose.
    pub const PURPOSE_NOT_ALLOWED: &str = "purpose_not_allowed";
    /// The token is not held by the vault.
    pub const UNKNOWN_TOKEN: &str = "unknown_token";
    /// The token's prefix names another kind than the stored value's.
    pub const KIND_MISMATCH: &str = "kind_mismatch";
    /// The stored ciphertext did not authenticate.
    pub const INTEGRITY_CHECK_FAILED: &str = "integrity_check_failed";
    /// The role may not tokenize.
    pub const TOKENIZE_NOT_ALLOWED: &str = "tokenize_not_allowed";
    /// The caller's role is not in the policy.
    pub const UNKNOWN_ROLE: &str = "unknown_role";
    /// No API key was presented.
    pub const MISSING_API_KEY: &str = "missing_api_key";
    /// The API key is not known.
    pub const UNKNOWN_API_KEY: &str = "unknown_api_key";
    /// The API key was revoked.
    pub const REVOKED_API_KEY: &str = "revoked_api_key";
    /// The role needs a grant for this order and purpose, and has none.
    pub const NO_GRANT: &str = "no_grant";
    /// The grant for this order and purpose has expired.
    pub const GRANT_EXPIRED: &str = "grant_expired";
    /// The role may not grant or revoke.
    pub const GRANT_NOT_ALLOWED: &str = "grant_not_allowed";
}

/// Alert kinds.
pub mod alert {
    /// A rate or daily cap was hit.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// An address was throttled after repeated failed authentication.
    pub const AUTH_THROTTLED: &str = "auth_throttled";
    /// A principal revealed far more distinct orders than its baseline.
    pub const BULK_EXTRACTION: &str = "bulk_extraction";
}

/// Longest grant: 90 days.
pub const MAX_GRANT_TTL_SECS: u32 = 90 * 86_400;

/// Time source, injected so expiry and rotation are testable.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Unique name.
    pub name: String,
    /// Role in the policy.
    pub role: String,
}

/// API keys: `ovk_` + 52 base32 characters (256 random bits).
pub mod api_key {
    use secrecy::SecretString;

    use crate::crypto;

    /// A fresh API key and the hash the vault stores instead of it.
    pub fn generate() -> (SecretString, [u8; 32]) {
        let bytes = zeroize::Zeroizing::new(crypto::random_bytes::<32>());
        let key = format!(
            "ovk_{}",
            data_encoding::BASE32_NOPAD
                .encode(&bytes[..])
                .to_ascii_lowercase()
        );
        let hash = crypto::sha256(key.as_bytes());
        (SecretString::from(key), hash)
    }

    /// The stored hash of a presented key.
    pub fn hash(presented: &str) -> [u8; 32] {
        crypto::sha256(presented.as_bytes())
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's audit chain id.
    pub chain: String,
    /// Most encryptions per AES-GCM key version.
    pub encryption_cap: u64,
    /// Failed-authentication throttling per peer address.
    pub auth_throttle: AuthThrottleConfig,
    /// Bulk-extraction detection.
    pub bulk: BulkConfig,
    /// Rotate the data key by itself when an AES-GCM key nears its cap;
    /// when off, encryptions past the cap are refused.
    pub auto_rotate: bool,
    /// The policy file `ReloadPolicy` re-reads (`setup::open` sets it to the
    /// data directory's `policy.toml` when not given).
    pub policy_path: Option<std::path::PathBuf>,
    /// Encryptions a node reserves under a key at a time (the durable
    /// counter is written once per block).
    pub reservation_block: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chain: "node-1".into(),
            encryption_cap: DEFAULT_ENCRYPTION_CAP,
            auth_throttle: AuthThrottleConfig::default(),
            bulk: BulkConfig::default(),
            auto_rotate: true,
            policy_path: None,
            reservation_block: RESERVE_BLOCK,
        }
    }
}

/// Per-principal quota state, shared by all of its connections.
#[derive(Default)]
struct Quotas {
    buckets: HashMap<String, Bucket>,
    days: HashMap<String, DayOrders>,
    bulk: HashMap<String, BulkWindow>,
    /// Last alert time per (principal, alert kind), to raise one per window.
    alerted: HashMap<(String, &'static str), i64>,
}

/// A grant id as shown to callers: `gr_` + 26 base32 characters.
pub fn grant_id_string(id: &[u8; 16]) -> String {
    format!(
        "gr_{}",
        data_encoding::BASE32_NOPAD.encode(id).to_ascii_lowercase()
    )
}

/// Parses a grant id.
pub fn parse_grant_id(s: &str) -> Option<[u8; 16]> {
    let body = s.strip_prefix("gr_")?;
    let bytes = data_encoding::BASE32_NOPAD
        .decode(body.to_ascii_uppercase().as_bytes())
        .ok()?;
    let id: [u8; 16] = bytes.try_into().ok()?;
    (grant_id_string(&id) == s).then_some(id)
}

/// A value to tokenize, taken out of the request at the edge.
pub struct FieldInput {
    /// Its kind.
    pub kind: FieldKind,
    /// The raw value, wiped on drop.
    pub value: Zeroizing<String>,
    /// How error messages name it ("field #3", "consignee.phone").
    pub label: String,
}

impl std::fmt::Debug for FieldInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldInput")
            .field("kind", &self.kind)
            .field("label", &self.label)
            .field(
                "value",
                &format_args!("[redacted; {} bytes]", self.value.len()),
            )
            .finish()
    }
}

/// What one revealed token disclosed.
pub enum Disclosure {
    /// The value in full.
    Plain(Zeroizing<String>),
    /// The kind's mask.
    Masked(String),
    /// Nothing, with a machine-readable reason.
    Denied(&'static str),
}

impl std::fmt::Debug for Disclosure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disclosure::Plain(_) => f.write_str("Plain([redacted])"),
            Disclosure::Masked(_) => f.write_str("Masked([redacted])"),
            Disclosure::Denied(r) => write!(f, "Denied({r})"),
        }
    }
}

/// One token's reveal outcome.
#[derive(Debug)]
pub struct Revealed {
    /// The token as asked.
    pub token: Token,
    /// Its kind.
    pub kind: FieldKind,
    /// What was disclosed.
    pub disclosure: Disclosure,
}

/// A line item to tokenize.
#[derive(Debug)]
pub struct ItemInput {
    /// Catalogue code; passes through.
    pub sku: String,
    /// Title; tokenized as order details.
    pub title: FieldInput,
    /// Quantity; passes through.
    pub quantity: u32,
    /// Unit price; tokenized as order details.
    pub unit_price: FieldInput,
    /// Currency code; passes through.
    pub currency: String,
}

/// An order to tokenize.
#[derive(Debug)]
pub struct OrderInput {
    /// Order number.
    pub order_number: FieldInput,
    /// Customer id, if given.
    pub customer_id: Option<FieldInput>,
    /// Consignee name.
    pub name: FieldInput,
    /// Consignee phone.
    pub phone: FieldInput,
    /// Consignee address.
    pub address: FieldInput,
    /// Consignee ID number, if given.
    pub id_number: Option<FieldInput>,
    /// Consignee email, if given.
    pub email: Option<FieldInput>,
    /// Line items.
    pub items: Vec<ItemInput>,
    /// Time of purchase (RFC 3339), if given.
    pub placed_at: Option<FieldInput>,
}

/// A tokenized line item.
#[derive(Debug, Clone)]
pub struct TokenizedItem {
    /// Catalogue code.
    pub sku: String,
    /// Title token.
    pub title: Token,
    /// Quantity.
    pub quantity: u32,
    /// Unit price token.
    pub unit_price: Token,
    /// Currency code.
    pub currency: String,
}

/// A tokenized order.
#[derive(Debug, Clone)]
pub struct TokenizedOrder {
    /// The order's handle.
    pub order_token: Token,
    /// Order number token.
    pub order_number: Token,
    /// Customer id token.
    pub customer_id: Option<Token>,
    /// Consignee name token.
    pub name: Token,
    /// Consignee phone token.
    pub phone: Token,
    /// Consignee address token.
    pub address: Token,
    /// Consignee ID number token.
    pub id_number: Option<Token>,
    /// Consignee email token.
    pub email: Option<Token>,
    /// Line items.
    pub items: Vec<TokenizedItem>,
    /// Time of purchase token.
    pub placed_at: Option<Token>,
}

#[derive(Clone)]
pub(crate) struct PrincipalEntry {
    pub(crate) principal: Principal,
    pub(crate) key_hash: [u8; 32],
    pub(crate) revoked: bool,
}

/// The vault engine. Shared by all requests behind an `Arc`.
///
/// Fields are crate-visible so that the admin and audit operations can live
/// in their own modules (`admin`, `auditor`) as further `impl Engine` blocks.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    /// How token bodies map to storage keys; `store` applies it.
    token_ids: TokenIds,
    pub(crate) keyring: RwLock<Arc<Keyring>>,
    /// The key-encryption key (derived from the master key): wraps new data
    /// keys on rotation. Wiped on drop.
    pub(crate) kek: SecretKey,
    pub(crate) policy: RwLock<Arc<Policy>>,
    pub(crate) principals: RwLock<Arc<HashMap<[u8; 32], PrincipalEntry>>>,
    pub(crate) reserve_lock: tokio::sync::Mutex<()>,
    /// Held (shared) by every tokenize and reveal, (exclusively) by key
    /// retirement: a request that read a row under a version finishes before
    /// that version can leave the keyring. See `admin`.
    pub(crate) key_gate: tokio::sync::RwLock<()>,
    /// Serialises key rotations and retirements.
    pub(crate) key_admin: tokio::sync::Mutex<()>,
    /// Serialises a policy reload with the shared-state refresh, so the
    /// refresh cannot put back the policy a reload just replaced.
    pub(crate) policy_gate: tokio::sync::Mutex<()>,
    /// Nodes running on the store, as last counted (rates are shared out).
    pub(crate) live_nodes: std::sync::atomic::AtomicU64,
    quotas: tokio::sync::Mutex<Quotas>,
    throttle: Mutex<AuthThrottle>,
    alert_counts: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    pub(crate) started_ms: i64,
    /// This node's Merkle tree and checkpoint signer, loaded on first use.
    pub(crate) log: tokio::sync::Mutex<Option<crate::auditor::LogState>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn request_id() -> String {
    hex::encode(crypto::random_bytes::<8>())
}

pub(crate) fn read<T: ?Sized>(lock: &RwLock<Arc<T>>) -> Arc<T> {
    match lock.read() {
        Ok(g) => g.clone(),
        // A panic while holding the lock cannot leave the Arc half-written.
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn invalid(label: &str, kind: FieldKind, e: InvalidValue) -> VaultError {
    VaultError::InvalidArgument(format!("{label} ({kind}) {e}"))
}

impl Engine {
    /// Loads the keyring, policy and principals from an initialised store.
    pub async fn load(
        store: Arc<dyn Store>,
        master: &SecretKey,
        policy: Policy,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Result<Engine, VaultError> {
        let root = store.meta(META_FINGERPRINT_ROOT).await?.ok_or_else(|| {
            VaultError::FailedPrecondition(
                "the vault has no fingerprint key; run `ordervault init`".into(),
            )
        })?;
        let keys = store.key_versions().await?;
        let keyring = Keyring::load(master, &keys, &root, &BTreeMap::new())
            .map_err(|e| VaultError::FailedPrecondition(e.to_string()))?;
        let kek = keyring::kek(master);
        let token_ids = match store.meta(META_TOKEN_IDS).await? {
            None => TokenIds::Random,
            Some(v) if v == TIME_ORDERED_V1 => TokenIds::TimeOrdered(Arc::new(
                keyring::token_permutation(&kek, &root)
                    .map_err(|e| VaultError::FailedPrecondition(e.to_string()))?,
            )),
            Some(_) => {
                return Err(VaultError::FailedPrecondition(
                    "the vault stores tokens in a layout this version of ordervault does not know; run the version that created it or a newer one".into(),
                ));
            }
        };
        let store: Arc<dyn Store> = match &token_ids {
            TokenIds::Random => store,
            TokenIds::TimeOrdered(_) => Arc::new(PermutedStore::new(store, token_ids.clone())),
        };
        let started_ms = clock.now_ms();
        let engine = Engine {
            store,
            token_ids,
            keyring: RwLock::new(Arc::new(keyring)),
            kek,
            policy: RwLock::new(Arc::new(policy)),
            principals: RwLock::new(Arc::new(HashMap::new())),
            reserve_lock: tokio::sync::Mutex::new(()),
            key_gate: tokio::sync::RwLock::new(()),
            key_admin: tokio::sync::Mutex::new(()),
            policy_gate: tokio::sync::Mutex::new(()),
            live_nodes: std::sync::atomic::AtomicU64::new(1),
            quotas: tokio::sync::Mutex::new(Quotas::default()),
            throttle: Mutex::new(AuthThrottle::default()),
            alert_counts: Mutex::new(BTreeMap::new()),
            clock,
            config,
            started_ms,
            log: tokio::sync::Mutex::new(None),
        };
        engine.reload_principals().await?;
        Ok(engine)
    }

    /// The key `token`'s row is stored under (for tools that read the
    /// database directly).
    pub fn storage_key(&self, token: &Token) -> TokenId {
        self.token_ids.storage_key(token.id())
    }

    /// Whether this vault stores its audit events' token keys (vaults with
    /// time-ordered storage keys do; see [`crate::store::WriteBatch::audit_token_keys`]).
    pub fn keys_audit_events(&self) -> bool {
        matches!(self.token_ids, TokenIds::TimeOrdered(_))
    }

    /// Re-reads principals from the store (after one is added or revoked).
    pub async fn reload_principals(&self) -> Result<(), VaultError> {
        let records: Vec<PrincipalRecord> = self.store.principals().await?;
        let map = records
            .into_iter()
            .map(|r| {
                (
                    r.key_hash,
                    PrincipalEntry {
                        principal: Principal {
                            name: r.name,
                            role: r.role,
                        },
                        key_hash: r.key_hash,
                        revoked: r.revoked_ms.is_some(),
                    },
                )
            })
            .collect();
        if let Ok(mut g) = self.principals.write() {
            *g = Arc::new(map);
        }
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        read(&self.policy)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// This node's audit chain id.
    pub fn chain(&self) -> &str {
        &self.config.chain
    }

    pub(crate) fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    pub(crate) fn event(
        &self,
        p: &Principal,
        action: Action,
        decision: Decision,
        rid: &str,
        policy: &Policy,
    ) -> AuditEvent {
        let mut hash = policy.hash_hex();
        hash.truncate(16);
        AuditEvent::new(self.now(), &p.name, &p.role, action, decision, rid, &hash)
    }

    pub(crate) async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<(), VaultError> {
        self.store
            .commit(WriteBatch {
                audit_chain: self.config.chain.clone(),
                audit: events,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| {
                VaultError::Unavailable(format!(
                    "the audit log cannot be written ({e}); nothing was revealed"
                ))
            })
    }

    /// Resolves an API key to a principal. Failures are audited (without
    /// waiting), say nothing about which keys exist, and count against the
    /// peer address: too many and the address is refused for a while, even
    /// with a right key.
    pub fn authenticate(
        &self,
        presented: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Principal, VaultError> {
        let now = self.now();
        if let Some(ip) = peer {
            let blocked = self.throttle.lock().ok().and_then(|t| t.blocked(ip, now));
            if let Some(wait) = blocked {
                return Err(VaultError::RateLimited {
                    message: format!(
                        "too many failed authentications from this address; retry in {} s",
                        wait.div_ceil(1000)
                    ),
                    retry_after_ms: wait,
                });
            }
        }
        let outcome = match presented {
            None => Err(reason::MISSING_API_KEY),
            Some(key) => {
                let hash = api_key::hash(key);
                let principals = read(&self.principals);
                match principals.get(&hash) {
                    // The map lookup is by hash; the constant-time compare
                    // keeps the final check independent of where bytes differ.
                    Some(e) if bool::from(e.key_hash.ct_eq(&hash)) => {
                        if e.revoked {
                            Err(reason::REVOKED_API_KEY)
                        } else {
                            Ok(e.principal.clone())
                        }
                    }
                    _ => Err(reason::UNKNOWN_API_KEY),
                }
            }
        };
        let why = match outcome {
            Ok(principal) => return Ok(principal),
            Err(why) => why,
        };
        let peer_text = peer.map(|p| p.to_string());
        warn!(
            reason = why,
            peer = peer_text.as_deref().unwrap_or("unknown"),
            "authentication failed"
        );
        let policy = self.policy();
        let anonymous = Principal {
            name: String::new(),
            role: String::new(),
        };
        let mut ev = self.event(
            &anonymous,
            Action::AuthFailed,
            Decision::Denied,
            &request_id(),
            &policy,
        );
        ev.reason = Some(why.to_owned());
        ev.peer = peer_text.clone();
        let mut batch = WriteBatch {
            audit_chain: self.config.chain.clone(),
            audit: vec![ev],
            ..Default::default()
        };
        let started_block = peer.is_some_and(|ip| {
            self.throttle
                .lock()
                .map(|mut t| t.failure(self.config.auth_throttle, ip, now))
                .unwrap_or(false)
        });
        if started_block {
            let cfg = self.config.auth_throttle;
            batch.alerts.push(self.alert(
                alert::AUTH_THROTTLED,
                "",
                peer_text.as_deref().unwrap_or(""),
                format!(
                    "{} failed authentications within {} s; address refused for {} s",
                    cfg.max_failures,
                    cfg.window_ms / 1000,
                    cfg.backoff_ms / 1000
                ),
            ));
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.commit(batch).await {
                warn!(error = %e, "could not audit a failed authentication");
            }
        });
        Err(VaultError::Unauthenticated(
            "missing, unknown or revoked API key; send `authorization: Bearer <key>`".into(),
        ))
    }

    /// Builds an alert: logged at WARN and counted now, stored with the
    /// batch it is added to.
    fn alert(
        &self,
        kind: &'static str,
        principal: &str,
        peer: &str,
        detail: String,
    ) -> AlertRecord {
        warn!(alert = kind, principal, peer, detail = %detail, "alert raised");
        if let Ok(mut counts) = self.alert_counts.lock() {
            *counts.entry(kind).or_default() += 1;
        }
        AlertRecord {
            id: 0,
            at_ms: self.now(),
            kind: kind.to_owned(),
            principal: principal.to_owned(),
            peer: peer.to_owned(),
            detail,
        }
    }

    /// Alerts raised since start, by kind.
    pub fn alert_counts(&self) -> BTreeMap<&'static str, u64> {
        self.alert_counts
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    pub(crate) fn role<'p>(
        &self,
        policy: &'p Policy,
        p: &Principal,
    ) -> Result<&'p RolePolicy, VaultError> {
        policy.role(&p.role).ok_or_else(|| {
            VaultError::PermissionDenied(format!(
                "role {:?} is not defined in the policy in force",
                p.role
            ))
        })
    }

    /// Claims `n` encryptions under `key`, durably reserving another block
    /// when this node's blocks run out. Refuses past the cap, which holds
    /// across every node sharing the store.
    pub(crate) async fn claim_encryptions(
        &self,
        key: &KeyVersion,
        n: u64,
    ) -> Result<(), VaultError> {
        let usage = key.usage();
        let cap = match key.algorithm() {
            Algorithm::Aes256Gcm => self.config.encryption_cap,
            // 192-bit random nonces: no practical per-key limit.
            Algorithm::XChaCha20Poly1305 => u64::MAX / 2,
        };
        let capped = || {
            VaultError::FailedPrecondition(format!(
                "data key version {} has reached its cap of {cap} encryptions; rotate the data key (`ordervault keys rotate`)",
                key.version()
            ))
        };
        if n > cap {
            return Err(capped());
        }
        loop {
            if usage.take(n) {
                return Ok(());
            }
            let _guard = self.reserve_lock.lock().await;
            if usage.take(n) {
                return Ok(());
            }
            let batch = WriteBatch {
                reserve: vec![Reservation {
                    version: key.version(),
                    count: self.config.reservation_block.max(n),
                    cap,
                }],
                ..Default::default()
            };
            let committed = self.store.commit(batch).await?;
            let Some(&(old, new)) = committed.reserved.first() else {
                return Err(VaultError::Internal(
                    "the store did not report the reservation".into(),
                ));
            };
            usage.grant(old, new);
            if new == old {
                // Nothing left to grant: the cap is reached (whatever this
                // node still holds is smaller than `n`).
                return Err(capped());
            }
        }
    }

    /// Tokenizes a batch of fields, all or nothing.
    ///
    /// The spans of the calls every request makes (tokenize, tokenize an
    /// order, reveal) are at debug level: under the default `info` filter
    /// they cost nothing, where recording their fields took about 3 % of
    /// the vault's CPU under unary reveals. Whatever these calls log names
    /// the principal itself.
    #[instrument(level = "debug", skip_all, fields(principal = %principal.name, fields = fields.len()))]
    pub async fn tokenize(
        &self,
        principal: &Principal,
        fields: Vec<FieldInput>,
    ) -> Result<Vec<Token>, VaultError> {
        let (tokens, _) = self.tokenize_inner(principal, fields, false).await?;
        Ok(tokens)
    }

    /// Tokenizes an order: one token per sensitive field plus an order token.
    #[instrument(level = "debug", skip_all, fields(principal = %principal.name, items = order.items.len()))]
    pub async fn tokenize_order(
        &self,
        principal: &Principal,
        order: OrderInput,
    ) -> Result<TokenizedOrder, VaultError> {
        let mut fields = vec![order.order_number, order.name, order.phone, order.address];
        let optional = [
            order.customer_id,
            order.id_number,
            order.email,
            order.placed_at,
        ];
        let present: Vec<bool> = optional.iter().map(Option::is_some).collect();
        fields.extend(optional.into_iter().flatten());
        let mut passthrough = Vec::with_capacity(order.items.len());
        for item in order.items {
            passthrough.push((item.sku, item.quantity, item.currency));
            fields.push(item.title);
            fields.push(item.unit_price);
        }
        let (tokens, order_token) = self.tokenize_inner(principal, fields, true).await?;
        let order_token =
            order_token.ok_or_else(|| VaultError::Internal("order token missing".into()))?;
        let mut it = tokens.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| VaultError::Internal("token count mismatch".into()))
        };
        let (order_number, name, phone, address) = (next()?, next()?, next()?, next()?);
        let mut opt = |present: bool| -> Result<Option<Token>, VaultError> {
            if present { next().map(Some) } else { Ok(None) }
        };
        let customer_id = opt(present[0])?;
        let id_number = opt(present[1])?;
        let email = opt(present[2])?;
        let placed_at = opt(present[3])?;
        let mut items = Vec::with_capacity(passthrough.len());
        for (sku, quantity, currency) in passthrough {
            items.push(TokenizedItem {
                sku,
                title: next()?,
                quantity,
                unit_price: next()?,
                currency,
            });
        }
        Ok(TokenizedOrder {
            order_token,
            order_number,
            customer_id,
            name,
            phone,
            address,
            id_number,
            email,
            items,
            placed_at,
        })
    }

    async fn tokenize_inner(
        &self,
        principal: &Principal,
        fields: Vec<FieldInput>,
        as_order: bool,
    ) -> Result<(Vec<Token>, Option<Token>), VaultError> {
        let _keys = self.key_gate.read().await;
        let policy = self.policy();
        let rid = request_id();
        let role = self.role(&policy, principal)?;
        if !role.has(Permission::Tokenize) {
            let mut ev = self.event(principal, Action::Tokenize, Decision::Denied, &rid, &policy);
            ev.reason = Some(reason::TOKENIZE_NOT_ALLOWED.into());
            ev.count = Some(fields.len() as u32);
            self.append_audit(vec![ev]).await?;
            return Err(VaultError::PermissionDenied(format!(
                "role {:?} may not tokenize; use a principal whose role has the `tokenize` permission",
                role.name()
            )));
        }
        if fields.is_empty() {
            return Err(VaultError::InvalidArgument("no fields to tokenize".into()));
        }
        if fields.len() > MAX_FIELDS_PER_REQUEST {
            return Err(VaultError::InvalidArgument(format!(
                "{} fields in one request; the limit is {MAX_FIELDS_PER_REQUEST}, split the batch",
                fields.len()
            )));
        }
        // Validate everything before any work, so a bad field leaves
        // nothing behind (all or nothing).
        let mut normalised = Vec::with_capacity(fields.len());
        for f in &fields {
            let n = f
                .kind
                .normalise(&f.value)
                .map_err(|e| invalid(&f.label, f.kind, e))?;
            normalised.push(n);
        }
        let keyring = read(&self.keyring);
        let fingerprints: Vec<[u8; 32]> = fields
            .iter()
            .zip(&normalised)
            .map(|(f, n)| keyring.fingerprint(f.kind, n))
            .collect();
        // Deterministic kinds reuse the token already held for the value.
        // The writer finds it when it commits (an insert that meets the
        // value's unique index returns the stored token instead), so every
        // field is encrypted and no read goes before the commit: one trip
        // through the store instead of two. The claim counts those
        // encryptions too, held values included: it bounds how many times
        // the key has encrypted (its nonces), not how many ciphertexts are
        // kept, so a key whose values are tokenized again and again reaches
        // its cap, and rotates, sooner. Only when the data key cannot take
        // that many encryptions are the stored tokens looked up first, so
        // that values already held still tokenize at the key's cap.
        let mut reuse: Vec<Option<TokenId>> = vec![None; fields.len()];
        let keyring = match self
            .claim_primary(keyring.clone(), fields.len() as u64)
            .await
        {
            Ok(keyring) => keyring,
            Err(VaultError::FailedPrecondition(why)) => {
                let det_idx: Vec<usize> = (0..fields.len())
                    .filter(|&i| policy.is_deterministic(fields[i].kind))
                    .collect();
                if det_idx.is_empty() {
                    return Err(VaultError::FailedPrecondition(why));
                }
                let existing = self
                    .store
                    .deterministic_tokens(
                        det_idx
                            .iter()
                            .map(|&i| (fields[i].kind, fingerprints[i]))
                            .collect(),
                    )
                    .await?;
                for (&i, found) in det_idx.iter().zip(existing) {
                    reuse[i] = found;
                }
                let to_encrypt = reuse.iter().filter(|r| r.is_none()).count() as u64;
                if to_encrypt > 0 {
                    self.claim_primary(keyring, to_encrypt).await?
                } else {
                    keyring
                }
            }
            Err(e) => return Err(e),
        };
        let key = keyring.primary();
        let now = self.now();
        let mut records = Vec::with_capacity(fields.len());
        for (i, f) in fields.iter().enumerate() {
            let (id, ciphertext) = match reuse[i] {
                // An empty ciphertext tells the writer to link the existing
                // row, never to store a new one.
                Some(id) => (id, Vec::new()),
                None => {
                    let id = self.token_ids.mint(now);
                    let ctx = keyring::field_context(&id, f.kind);
                    (
                        id,
                        key.cipher(f.kind)
                            .seal(key.version(), &ctx, normalised[i].as_bytes()),
                    )
                }
            };
            records.push(TokenRecord {
                id,
                kind: f.kind,
                key_version: key.version(),
                ciphertext,
                fingerprint: fingerprints[i],
                deterministic: policy.is_deterministic(f.kind),
                created_ms: now,
            });
        }
        let order_token =
            as_order.then(|| Token::from_parts(TokenClass::Order, self.token_ids.mint(now)));
        let mut ev = self.event(
            principal,
            Action::Tokenize,
            Decision::Allowed,
            &rid,
            &policy,
        );
        ev.count = Some(records.len() as u32);
        ev.key_version = Some(key.version());
        ev.order_token = order_token.map(|t| t.to_string());
        let orders = order_token
            .map(|t| OrderRecord {
                id: *t.id(),
                created_by: principal.name.clone(),
                created_ms: now,
                fields: (0..records.len()).collect(),
            })
            .into_iter()
            .collect();
        let kinds: Vec<FieldKind> = records.iter().map(|r| r.kind).collect();
        let committed = self
            .store
            .commit(WriteBatch {
                tokens: records,
                orders,
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await?;
        let tokens = committed
            .token_ids
            .iter()
            .zip(kinds)
            .map(|(id, kind)| Token::from_parts(TokenClass::Field(kind), *id))
            .collect();
        Ok((tokens, order_token))
    }

    /// Reveals tokens for a purpose. See the module doc for the order of
    /// steps; the audit events are durable before anything is returned.
    #[instrument(level = "debug", skip_all, fields(principal = %principal.name, tokens = tokens.len()))]
    pub async fn reveal(
        &self,
        principal: &Principal,
        tokens: Vec<Token>,
        purpose: &str,
    ) -> Result<Vec<Revealed>, VaultError> {
        let _keys = self.key_gate.read().await;
        let policy = self.policy();
        let rid = request_id();
        let role = self.role(&policy, principal)?;
        if purpose.is_empty() {
            return Err(VaultError::InvalidArgument(
                "purpose is required: state why the values are needed (e.g. \"delivery\")".into(),
            ));
        }
        let Some(purpose) = Purpose::parse(purpose) else {
            return Err(VaultError::InvalidArgument(
                "purpose is not a valid purpose name (lowercase letters, digits and _)".into(),
            ));
        };
        if tokens.is_empty() {
            return Err(VaultError::InvalidArgument("no tokens to reveal".into()));
        }
        if tokens.len() > MAX_FIELDS_PER_REQUEST {
            return Err(VaultError::InvalidArgument(format!(
                "{} tokens in one request; the limit is {MAX_FIELDS_PER_REQUEST}, split the batch",
                tokens.len()
            )));
        }
        let per_token = |t: &Token, decision: Decision, why: Option<&str>| {
            let mut ev = self.event(principal, Action::Reveal, decision, &rid, &policy);
            ev.purpose = Some(purpose.as_str().to_owned());
            ev.kind = t.kind().map(|k| k.as_str().to_owned());
            ev.token = Some(t.to_string());
            ev.reason = why.map(str::to_owned);
            ev
        };
        if !role.allows_purpose(&purpose) {
            let events = tokens
                .iter()
                .map(|t| per_token(t, Decision::Denied, Some(reason::PURPOSE_NOT_ALLOWED)))
                .collect();
            self.append_audit(events).await?;
            let known = if policy.knows_purpose(&purpose) {
                ""
            } else {
                " (no such purpose in the policy)"
            };
            return Err(VaultError::PermissionDenied(format!(
                "role {:?} may not reveal for purpose {:?}{known}; its purposes are: {}",
                role.name(),
                purpose.as_str(),
                role.purposes()
                    .map(Purpose::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some(i) = tokens.iter().position(|t| t.kind().is_none()) {
            return Err(VaultError::InvalidArgument(format!(
                "token #{i} is an order token; order tokens carry no value, reveal the order's field tokens"
            )));
        }
        // A role that reveals under grants has its grants on the tokens'
        // orders read in the same trip to the store.
        let RevealReads {
            rows,
            orders,
            grants,
        } = self
            .store
            .reveal_reads(
                tokens.iter().map(|t| *t.id()).collect(),
                role.requires_grant().then(|| principal.name.clone()),
            )
            .await?;
        // Unknown tokens and kind mismatches fail the request as a whole
        // (they are caller mistakes or probing), audited.
        for (i, (t, row)) in tokens.iter().zip(&rows).enumerate() {
            let problem = match row {
                None => Some((
                    reason::UNKNOWN_TOKEN,
                    VaultError::NotFound(format!("token #{i} is not held by this vault")),
                )),
                Some(r) if Some(r.kind) != t.kind() => Some((
                    reason::KIND_MISMATCH,
                    VaultError::InvalidArgument(format!(
                        "token #{i} does not match the kind its prefix names"
                    )),
                )),
                Some(_) => None,
            };
            if let Some((why, err)) = problem {
                self.append_audit(vec![per_token(t, Decision::Denied, Some(why))])
                    .await?;
                return Err(err);
            }
        }
        let rows: Vec<TokenRecord> = rows.into_iter().flatten().collect();
        let grant_denials = self.grant_check(role, &purpose, &orders, &grants);
        // What each token would disclose, before quotas.
        let visibility: Vec<Visibility> = rows
            .iter()
            .zip(&grant_denials)
            .map(|(r, g)| {
                if g.is_some() {
                    Visibility::Deny
                } else {
                    role.visibility(r.kind)
                }
            })
            .collect();
        // The records a reveal counts against daily caps: the order a token
        // belongs to, or the token itself outside any order.
        let records: Vec<TokenId> = rows
            .iter()
            .zip(&orders)
            .zip(&visibility)
            .filter(|(_, v)| **v != Visibility::Deny)
            .map(|((r, o), _)| o.first().copied().unwrap_or(r.id))
            .collect();
        let limits = policy.limits(&principal.name, role);
        let mut batch = WriteBatch {
            audit_chain: self.config.chain.clone(),
            ..Default::default()
        };
        if !records.is_empty() {
            let checked = self.check_quotas(principal, &limits, &records).await;
            match checked {
                Ok((days, alerts)) => {
                    // Other nodes reveal too: the store checks the cap
                    // against every node's reveals when it commits.
                    if let (true, Some(cap), Some((_, day, _))) = (
                        self.store.shared(),
                        limits.daily_distinct_orders,
                        days.first(),
                    ) {
                        batch.daily_caps.push((principal.name.clone(), *day, cap));
                    }
                    batch.reveal_days = days;
                    batch.alerts = alerts;
                }
                Err(exceeded) => {
                    let mut ev = self.event(
                        principal,
                        Action::QuotaExceeded,
                        Decision::Denied,
                        &rid,
                        &policy,
                    );
                    ev.purpose = Some(purpose.as_str().to_owned());
                    ev.reason = Some(exceeded.what.clone());
                    ev.count = Some(tokens.len() as u32);
                    batch.audit.push(ev);
                    batch.alerts.extend(exceeded.alert);
                    self.store.commit(batch).await.map_err(|e| {
                        VaultError::Unavailable(format!("the audit log cannot be written ({e})"))
                    })?;
                    return Err(exceeded.error);
                }
            }
        }
        let keyring = read(&self.keyring);
        let mut out = Vec::with_capacity(tokens.len());
        let mut corrupt = Vec::new();
        for (((t, row), vis), (grant_denial, order_ids)) in tokens
            .iter()
            .zip(&rows)
            .zip(&visibility)
            .zip(grant_denials.iter().zip(&orders))
        {
            let disclosure = match vis {
                Visibility::Deny => {
                    Disclosure::Denied(grant_denial.unwrap_or(reason::KIND_NOT_ALLOWED))
                }
                Visibility::Plain | Visibility::Masked => match open(&keyring, row) {
                    Some(value) if *vis == Visibility::Plain => Disclosure::Plain(value),
                    Some(value) => Disclosure::Masked(row.kind.mask(&value)),
                    None => {
                        corrupt.push(per_token(
                            t,
                            Decision::Error,
                            Some(reason::INTEGRITY_CHECK_FAILED),
                        ));
                        continue;
                    }
                },
            };
            let (decision, why) = match &disclosure {
                Disclosure::Plain(_) => (Decision::Allowed, None),
                Disclosure::Masked(_) => (Decision::Masked, None),
                Disclosure::Denied(r) => (Decision::Denied, Some(*r)),
            };
            let mut ev = per_token(t, decision, why);
            ev.key_version = Some(row.key_version);
            ev.order_token = order_ids
                .first()
                .map(|o| Token::from_parts(TokenClass::Order, *o).to_string());
            batch.audit.push(ev);
            out.push(Revealed {
                token: *t,
                kind: row.kind,
                disclosure,
            });
        }
        if !corrupt.is_empty() {
            // Nothing is revealed: only the integrity failures are recorded.
            let n = corrupt.len();
            warn!(
                principal = %principal.name,
                count = n,
                "stored ciphertexts failed their integrity check"
            );
            self.append_audit(corrupt).await?;
            return Err(VaultError::DataLoss(format!(
                "{n} stored value(s) failed their integrity check; nothing was revealed. The stored data was altered or corrupted: an operator must investigate"
            )));
        }
        match self.store.commit(batch).await {
            Ok(_) => Ok(out),
            Err(e @ StoreError::DailyCapReached { .. }) => {
                drop(out);
                Err(self
                    .cap_reached_elsewhere(principal, &purpose, tokens.len(), &rid, e)
                    .await)
            }
            Err(e) => Err(VaultError::Unavailable(format!(
                "the audit log cannot be written ({e}); nothing was revealed"
            ))),
        }
    }

    /// Another node's reveals filled a shared daily cap that this node's
    /// view had room in: forgets that view, audits the refusal and says
    /// when to retry.
    async fn cap_reached_elsewhere(
        &self,
        principal: &Principal,
        purpose: &Purpose,
        asked: usize,
        rid: &str,
        e: StoreError,
    ) -> VaultError {
        self.quotas.lock().await.days.remove(&principal.name);
        let policy = self.policy();
        let mut ev = self.event(
            principal,
            Action::QuotaExceeded,
            Decision::Denied,
            rid,
            &policy,
        );
        ev.purpose = Some(purpose.as_str().to_owned());
        if let StoreError::DailyCapReached { cap, .. } = &e {
            ev.reason = Some(format!("daily_distinct_orders {cap}"));
        }
        ev.count = Some(asked as u32);
        if let Err(audit) = self.append_audit(vec![ev]).await {
            return audit;
        }
        let now = self.now();
        let until_midnight = (guard::day_of(now) + 1) * guard::DAY_MS - now;
        VaultError::RateLimited {
            message: format!("{e}; retry after 00:00 UTC"),
            retry_after_ms: until_midnight.max(0) as u64,
        }
    }

    pub(crate) fn require(
        &self,
        policy: &Policy,
        principal: &Principal,
        any_of: &[Permission],
        what: &str,
    ) -> Result<(), VaultError> {
        let role = self.role(policy, principal)?;
        if any_of.iter().any(|p| role.has(*p)) {
            return Ok(());
        }
        Err(VaultError::PermissionDenied(format!(
            "role {:?} may not {what}; it needs the {} permission",
            role.name(),
            any_of
                .iter()
                .map(|p| format!("`{}`", p.as_str()))
                .collect::<Vec<_>>()
                .join(" or ")
        )))
    }

    /// Audits an admin action by `actor` (allowed or denied) durably.
    pub(crate) async fn audit_admin(
        &self,
        actor: &Principal,
        decision: Decision,
        detail: String,
    ) -> Result<(), VaultError> {
        let policy = self.policy();
        let mut ev = self.event(actor, Action::Admin, decision, &request_id(), &policy);
        ev.reason = Some(detail);
        self.append_audit(vec![ev]).await
    }

    /// Checks the `admin` permission; a refusal is audited.
    pub async fn require_admin(&self, actor: &Principal, what: &str) -> Result<(), VaultError> {
        let policy = self.policy();
        match self.require(&policy, actor, &[Permission::Admin], what) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.audit_admin(
                    actor,
                    Decision::Denied,
                    format!("{what}: admin_not_allowed"),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// Creates a principal and its API key (returned once). Needs `admin`.
    pub async fn create_principal(
        &self,
        actor: &Principal,
        name: &str,
        role: &str,
    ) -> Result<(PrincipalRecord, secrecy::SecretString), VaultError> {
        self.require_admin(actor, "create principals").await?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
            });
        if !valid {
            return Err(VaultError::InvalidArgument(
                "principal name must be 1-64 characters of a-z, 0-9, '-', '_' and '.'".into(),
            ));
        }
        let policy = self.policy();
        if policy.role(role).is_none() {
            return Err(VaultError::InvalidArgument(format!(
                "role {role:?} is not defined in the policy; roles: {}",
                policy
                    .roles()
                    .map(RolePolicy::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (key, hash) = api_key::generate();
        let record = PrincipalRecord {
            name: name.to_owned(),
            role: role.to_owned(),
            key_hash: hash,
            created_ms: self.now(),
            revoked_ms: None,
        };
        let mut ev = self.event(
            actor,
            Action::Admin,
            Decision::Allowed,
            &request_id(),
            &policy,
        );
        ev.reason = Some(format!("principal_created name={name} role={role}"));
        self.store
            .commit(WriteBatch {
                principals: vec![record.clone()],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await
            .map_err(|e| match VaultError::from(e) {
                VaultError::AlreadyExists(_) => {
                    VaultError::AlreadyExists(format!("principal {name:?} already exists"))
                }
                other => other,
            })?;
        self.reload_principals().await?;
        Ok((record, key))
    }

    /// Revokes a principal; its key is refused from the next request on.
    pub async fn revoke_principal(
        &self,
        actor: &Principal,
        name: &str,
    ) -> Result<PrincipalRecord, VaultError> {
        self.require_admin(actor, "revoke principals").await?;
        let mut record = self
            .store
            .principals()
            .await?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| VaultError::NotFound(format!("principal {name:?} does not exist")))?;
        if record.revoked_ms.is_some() {
            return Err(VaultError::FailedPrecondition(format!(
                "principal {name:?} is already revoked"
            )));
        }
        let now = self.now();
        let policy = self.policy();
        let mut ev = self.event(
            actor,
            Action::Admin,
            Decision::Allowed,
            &request_id(),
            &policy,
        );
        ev.reason = Some(format!("principal_revoked name={name}"));
        self.store
            .commit(WriteBatch {
                principal_revocations: vec![(name.to_owned(), now)],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await?;
        self.reload_principals().await?;
        record.revoked_ms = Some(now);
        Ok(record)
    }

    /// Lets `grantee` reveal the fields of `order` for `purpose` for
    /// `ttl_secs`. Needs the `grant` permission; audited.
    #[instrument(skip_all, fields(principal = %principal.name))]
    pub async fn grant(
        &self,
        principal: &Principal,
        grantee: &str,
        order: &str,
        purpose: &str,
        ttl_secs: u32,
    ) -> Result<GrantRecord, VaultError> {
        let policy = self.policy();
        let rid = request_id();
        if let Err(e) = self.require(
            &policy,
            principal,
            &[Permission::Grant],
            "grant access to orders",
        ) {
            let mut ev = self.event(principal, Action::Grant, Decision::Denied, &rid, &policy);
            ev.reason = Some(reason::GRANT_NOT_ALLOWED.into());
            self.append_audit(vec![ev]).await?;
            return Err(e);
        }
        let order = Token::parse(order)
            .ok()
            .filter(|t| t.class() == TokenClass::Order)
            .ok_or_else(|| {
                VaultError::InvalidArgument("order_token is not an order token (ot_...)".into())
            })?;
        let purpose = Purpose::parse(purpose)
            .filter(|p| policy.knows_purpose(p))
            .ok_or_else(|| {
                VaultError::InvalidArgument(
                    "purpose is missing or not defined in the policy".into(),
                )
            })?;
        if ttl_secs == 0 || ttl_secs > MAX_GRANT_TTL_SECS {
            return Err(VaultError::InvalidArgument(format!(
                "ttl_seconds must be between 1 and {MAX_GRANT_TTL_SECS} (90 days)"
            )));
        }
        let target = read(&self.principals)
            .values()
            .find(|e| e.principal.name == grantee && !e.revoked)
            .map(|e| e.principal.clone())
            .ok_or_else(|| {
                VaultError::NotFound(format!(
                    "principal {grantee:?} does not exist or is revoked"
                ))
            })?;
        let target_role = self.role(&policy, &target)?;
        if !target_role.allows_purpose(&purpose) {
            return Err(VaultError::FailedPrecondition(format!(
                "principal {grantee:?} (role {:?}) cannot reveal for purpose {:?}; grant one of its purposes",
                target_role.name(),
                purpose.as_str()
            )));
        }
        if !self.store.order_exists(*order.id()).await? {
            return Err(VaultError::NotFound(
                "order_token is not held by this vault".into(),
            ));
        }
        let now = self.now();
        let record = GrantRecord {
            id: crypto::random_bytes::<16>(),
            principal: target.name.clone(),
            order_id: *order.id(),
            purpose: purpose.as_str().to_owned(),
            expires_ms: now + i64::from(ttl_secs) * 1000,
            granted_by: principal.name.clone(),
            created_ms: now,
            revoked_ms: None,
        };
        let mut ev = self.event(principal, Action::Grant, Decision::Allowed, &rid, &policy);
        ev.order_token = Some(order.to_string());
        ev.purpose = Some(purpose.as_str().to_owned());
        ev.reason = Some(format!(
            "grant={} grantee={} ttl_seconds={ttl_secs}",
            grant_id_string(&record.id),
            target.name
        ));
        self.store
            .commit(WriteBatch {
                grants: vec![record.clone()],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await?;
        Ok(record)
    }

    /// Revokes a grant; effective on the next request. Needs `grant`; audited.
    #[instrument(skip_all, fields(principal = %principal.name))]
    pub async fn revoke_grant(
        &self,
        principal: &Principal,
        grant_id: &str,
    ) -> Result<GrantRecord, VaultError> {
        let policy = self.policy();
        let rid = request_id();
        if let Err(e) = self.require(&policy, principal, &[Permission::Grant], "revoke grants") {
            let mut ev = self.event(principal, Action::Revoke, Decision::Denied, &rid, &policy);
            ev.reason = Some(reason::GRANT_NOT_ALLOWED.into());
            self.append_audit(vec![ev]).await?;
            return Err(e);
        }
        let id = parse_grant_id(grant_id).ok_or_else(|| {
            VaultError::InvalidArgument("grant_id is not a grant id (gr_...)".into())
        })?;
        let mut grant = self
            .store
            .grant(id)
            .await?
            .ok_or_else(|| VaultError::NotFound("no such grant".into()))?;
        let now = self.now();
        let mut ev = self.event(principal, Action::Revoke, Decision::Allowed, &rid, &policy);
        ev.order_token = Some(Token::from_parts(TokenClass::Order, grant.order_id).to_string());
        ev.purpose = Some(grant.purpose.clone());
        ev.reason = Some(format!("grant={grant_id} grantee={}", grant.principal));
        self.store
            .commit(WriteBatch {
                grant_revocations: vec![(id, now)],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await?;
        grant.revoked_ms.get_or_insert(now);
        Ok(grant)
    }

    /// Grants of an order and/or a principal.
    pub async fn list_grants(
        &self,
        principal: &Principal,
        order: Option<&str>,
        grantee: Option<&str>,
        include_inactive: bool,
    ) -> Result<Vec<GrantRecord>, VaultError> {
        let policy = self.policy();
        self.require(
            &policy,
            principal,
            &[Permission::Grant, Permission::Audit, Permission::Admin],
            "list grants",
        )?;
        let orders = match order {
            Some(o) => vec![
                *Token::parse(o)
                    .ok()
                    .filter(|t| t.class() == TokenClass::Order)
                    .ok_or_else(|| {
                        VaultError::InvalidArgument(
                            "order_token is not an order token (ot_...)".into(),
                        )
                    })?
                    .id(),
            ],
            None => Vec::new(),
        };
        if orders.is_empty() && grantee.is_none() {
            return Err(VaultError::InvalidArgument(
                "give an order_token, a principal, or both".into(),
            ));
        }
        let now = self.now();
        let grants = self
            .store
            .grants(GrantFilter {
                principal: grantee.map(str::to_owned),
                orders,
            })
            .await?;
        Ok(grants
            .into_iter()
            .filter(|g| include_inactive || (g.revoked_ms.is_none() && g.expires_ms > now))
            .collect())
    }

    /// For each token, why its grants do not let the principal reveal it
    /// for `purpose` (`None`: a live grant does, or the role needs none).
    /// `grants` are the principal's grants on the tokens' `orders`, as
    /// [`Store::reveal_reads`] found them.
    fn grant_check(
        &self,
        role: &RolePolicy,
        purpose: &Purpose,
        orders: &[Vec<TokenId>],
        grants: &[GrantRecord],
    ) -> Vec<Option<&'static str>> {
        if !role.requires_grant() {
            return vec![None; orders.len()];
        }
        let now = self.now();
        orders
            .iter()
            .map(|token_orders| {
                let relevant = grants.iter().filter(|g| {
                    g.purpose == purpose.as_str() && token_orders.contains(&g.order_id)
                });
                let mut expired = false;
                for g in relevant {
                    if g.revoked_ms.is_some() {
                        continue;
                    }
                    if g.expires_ms > now {
                        return None;
                    }
                    expired = true;
                }
                Some(if expired {
                    reason::GRANT_EXPIRED
                } else {
                    reason::NO_GRANT
                })
            })
            .collect()
    }

    /// Applies rate and daily caps and the bulk detector to one reveal of
    /// `records`. On success returns the reveal-day rows and alerts to store
    /// with the reveal's audit events.
    async fn check_quotas(
        &self,
        principal: &Principal,
        limits: &Limits,
        records: &[TokenId],
    ) -> Result<(Vec<(String, i64, TokenId)>, Vec<AlertRecord>), QuotaExceeded> {
        let now = self.now();
        let name = &principal.name;
        let mut q = self.quotas.lock().await;
        let alert_once = |q: &mut Quotas, kind: &'static str, window_ms: i64, detail: String| {
            let key = (name.clone(), kind);
            let due = q
                .alerted
                .get(&key)
                .is_none_or(|last| now - *last >= window_ms);
            due.then(|| {
                q.alerted.insert(key, now);
                self.alert(kind, name, "", detail)
            })
        };
        let mut days = Vec::new();
        if let Some(cap) = limits.daily_distinct_orders {
            let today = guard::day_of(now);
            let stale = q.days.get(name).is_none_or(|d| d.day != today);
            if stale {
                // First reveal today (or since a restart): what was already
                // revealed today is in the store.
                let seen =
                    self.store
                        .revealed_on_day(name, today)
                        .await
                        .map_err(|e| QuotaExceeded {
                            error: e.into(),
                            what: "storage".into(),
                            alert: None,
                        })?;
                q.days.insert(
                    name.clone(),
                    DayOrders {
                        day: today,
                        orders: seen.into_iter().collect(),
                    },
                );
            }
            let Some(day) = q.days.get_mut(name) else {
                return Err(QuotaExceeded {
                    error: VaultError::Internal("quota state missing".into()),
                    what: "internal".into(),
                    alert: None,
                });
            };
            let fresh: BTreeSet<TokenId> = records
                .iter()
                .filter(|r| !day.orders.contains(*r))
                .copied()
                .collect();
            let total = day.orders.len() as u64 + fresh.len() as u64;
            if total > cap {
                let already = day.orders.len();
                let until_midnight = (today + 1) * guard::DAY_MS - now;
                let what = format!("daily_distinct_orders {cap}");
                let alert = alert_once(
                    &mut q,
                    alert::QUOTA_EXCEEDED,
                    guard::DAY_MS,
                    format!(
                        "daily cap of {cap} distinct orders reached ({already} revealed today, {} more asked)",
                        fresh.len()
                    ),
                );
                return Err(QuotaExceeded {
                    error: VaultError::RateLimited {
                        message: format!(
                            "daily cap of {cap} distinct orders reached for principal {name:?} ({already} revealed today); retry after 00:00 UTC"
                        ),
                        retry_after_ms: until_midnight.max(0) as u64,
                    },
                    what,
                    alert,
                });
            }
            days = fresh
                .into_iter()
                .map(|r| (name.clone(), today, r))
                .collect();
        }
        // The rate is checked after the daily cap, so requests the cap
        // refuses do not drain the bucket.
        if let Some(rate) = limits.rate {
            // Each of N nodes sharing a store allows its share of the rate,
            // so together they never allow more than the policy says.
            let nodes = self
                .live_nodes
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1);
            let share = Rate {
                count: (rate.count / nodes.min(u64::from(u32::MAX)) as u32).max(1),
                window_ms: rate.window_ms,
            };
            let bucket = q
                .buckets
                .entry(name.clone())
                .or_insert_with(|| Bucket::full(share, now));
            if let Err(wait) = bucket.take(share, records.len() as u32, now) {
                let each = if nodes > 1 {
                    format!(" ({share} on each of {nodes} nodes)")
                } else {
                    String::new()
                };
                let what = format!("rate {rate}");
                let alert = alert_once(
                    &mut q,
                    alert::QUOTA_EXCEEDED,
                    rate.window_ms as i64,
                    format!("reveal {what} exceeded"),
                );
                return Err(QuotaExceeded {
                    error: VaultError::RateLimited {
                        message: format!(
                            "reveal rate of {rate}{each} exceeded for principal {name:?}; retry in {} s",
                            wait.div_ceil(1000).max(1)
                        ),
                        retry_after_ms: wait,
                    },
                    what,
                    alert,
                });
            }
        }
        if let Some(day) = q.days.get_mut(name) {
            day.orders.extend(days.iter().map(|(_, _, r)| *r));
        }
        let mut alerts = Vec::new();
        let bulk = self.config.bulk;
        let window = q.bulk.entry(name.clone()).or_default();
        if let Some((count, baseline)) = window.record(bulk, now, records) {
            alerts.push(self.alert(
                alert::BULK_EXTRACTION,
                name,
                "",
                format!(
                    "{count} distinct orders revealed in the current {} s window, against a baseline of {baseline:.1} per window",
                    bulk.window_ms / 1000
                ),
            ));
        }
        Ok((days, alerts))
    }
}

/// A quota refusal: the error for the caller, what was hit (for the audit
/// event) and the alert to store, if one is due.
struct QuotaExceeded {
    error: VaultError,
    what: String,
    alert: Option<AlertRecord>,
}

/// Decrypts a stored token; `None` on any failure (which is never detailed).
pub(crate) fn open(keyring: &Keyring, row: &TokenRecord) -> Option<Zeroizing<String>> {
    let (version, _) = crypto::envelope_header(&row.ciphertext).ok()?;
    if version != row.key_version {
        return None;
    }
    let key = keyring.version(version)?;
    let ctx = keyring::field_context(&row.id, row.kind);
    let bytes = key.cipher(row.kind).open(&ctx, &row.ciphertext).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    Some(Zeroizing::new(text.to_owned()))
}
