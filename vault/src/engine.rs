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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;
use tracing::{instrument, warn};
use zeroize::Zeroizing;

use crate::audit::{Action, AuditEvent, Decision};
use crate::crypto::{self, Algorithm, SecretKey};
use crate::error::VaultError;
use crate::keyring::{self, KeyVersion, Keyring};
use crate::kinds::{FieldKind, InvalidValue};
use crate::policy::{Permission, Policy, Purpose, RolePolicy, Visibility};
use crate::store::{OrderRecord, PrincipalRecord, Store, TokenId, TokenRecord, WriteBatch};
use crate::token::{Token, TokenClass};

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
}

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chain: "node-1".into(),
            encryption_cap: DEFAULT_ENCRYPTION_CAP,
        }
    }
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
struct PrincipalEntry {
    principal: Principal,
    key_hash: [u8; 32],
    revoked: bool,
}

/// The vault engine. Shared by all requests behind an `Arc`.
pub struct Engine {
    store: Arc<dyn Store>,
    keyring: RwLock<Arc<Keyring>>,
    policy: RwLock<Arc<Policy>>,
    principals: RwLock<Arc<HashMap<[u8; 32], PrincipalEntry>>>,
    reserve_lock: tokio::sync::Mutex<()>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn request_id() -> String {
    hex::encode(crypto::random_bytes::<8>())
}

fn read<T: ?Sized>(lock: &RwLock<Arc<T>>) -> Arc<T> {
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
        let engine = Engine {
            store,
            keyring: RwLock::new(Arc::new(keyring)),
            policy: RwLock::new(Arc::new(policy)),
            principals: RwLock::new(Arc::new(HashMap::new())),
            reserve_lock: tokio::sync::Mutex::new(()),
            clock,
            config,
        };
        engine.reload_principals().await?;
        Ok(engine)
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

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn event(
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

    async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<(), VaultError> {
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
    /// waiting) and say nothing about which keys exist.
    pub fn authenticate(
        &self,
        presented: Option<&str>,
        peer: Option<String>,
    ) -> Result<Principal, VaultError> {
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
        outcome.map_err(|why| {
            warn!(
                reason = why,
                peer = peer.as_deref().unwrap_or("unknown"),
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
            ev.peer = peer;
            let store = self.store.clone();
            let chain = self.config.chain.clone();
            tokio::spawn(async move {
                let batch = WriteBatch {
                    audit_chain: chain,
                    audit: vec![ev],
                    ..Default::default()
                };
                if let Err(e) = store.commit(batch).await {
                    warn!(error = %e, "could not audit a failed authentication");
                }
            });
            VaultError::Unauthenticated(
                "missing, unknown or revoked API key; send `authorization: Bearer <key>`".into(),
            )
        })
    }

    fn role<'p>(&self, policy: &'p Policy, p: &Principal) -> Result<&'p RolePolicy, VaultError> {
        policy.role(&p.role).ok_or_else(|| {
            VaultError::PermissionDenied(format!(
                "role {:?} is not defined in the policy in force",
                p.role
            ))
        })
    }

    /// Claims `n` encryptions under `key`, durably reserving more when the
    /// reservation runs out. Refuses past the cap.
    async fn claim_encryptions(&self, key: &KeyVersion, n: u64) -> Result<(), VaultError> {
        let usage = key.usage();
        let used = usage.claim(n);
        let cap = match key.algorithm() {
            Algorithm::Aes256Gcm => self.config.encryption_cap,
            // 192-bit random nonces: no practical per-key limit.
            Algorithm::XChaCha20Poly1305 => u64::MAX / 2,
        };
        if used > cap {
            usage.unclaim(n);
            return Err(VaultError::FailedPrecondition(format!(
                "data key version {} has reached its cap of {cap} encryptions; rotate the data key (`ordervault keys rotate`)",
                key.version()
            )));
        }
        if used > usage.reserved() {
            let _guard = self.reserve_lock.lock().await;
            if used > usage.reserved() {
                let upto = used.saturating_add(RESERVE_BLOCK).min(cap);
                let batch = WriteBatch {
                    reserve: vec![(key.version(), upto)],
                    ..Default::default()
                };
                if let Err(e) = self.store.commit(batch).await {
                    usage.unclaim(n);
                    return Err(e.into());
                }
                usage.set_reserved(upto);
            }
        }
        Ok(())
    }

    /// Tokenizes a batch of fields, all or nothing.
    #[instrument(skip_all, fields(principal = %principal.name, fields = fields.len()))]
    pub async fn tokenize(
        &self,
        principal: &Principal,
        fields: Vec<FieldInput>,
    ) -> Result<Vec<Token>, VaultError> {
        let (tokens, _) = self.tokenize_inner(principal, fields, false).await?;
        Ok(tokens)
    }

    /// Tokenizes an order: one token per sensitive field plus an order token.
    #[instrument(skip_all, fields(principal = %principal.name, items = order.items.len()))]
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
        let det_idx: Vec<usize> = (0..fields.len())
            .filter(|&i| policy.is_deterministic(fields[i].kind))
            .collect();
        let existing = if det_idx.is_empty() {
            Vec::new()
        } else {
            self.store
                .deterministic_tokens(
                    det_idx
                        .iter()
                        .map(|&i| (fields[i].kind, fingerprints[i]))
                        .collect(),
                )
                .await?
        };
        let mut reuse: Vec<Option<TokenId>> = vec![None; fields.len()];
        for (&i, found) in det_idx.iter().zip(existing) {
            reuse[i] = found;
        }
        let key = keyring.primary();
        let to_encrypt = reuse.iter().filter(|r| r.is_none()).count() as u64;
        if to_encrypt > 0 {
            self.claim_encryptions(key, to_encrypt).await?;
        }
        let now = self.now();
        let mut records = Vec::with_capacity(fields.len());
        for (i, f) in fields.iter().enumerate() {
            let (id, ciphertext) = match reuse[i] {
                // An empty ciphertext tells the writer to link the existing
                // row, never to store a new one.
                Some(id) => (id, Vec::new()),
                None => {
                    let id = *Token::generate(TokenClass::Field(f.kind)).id();
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
        let order_token = as_order.then(|| Token::generate(TokenClass::Order));
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
    #[instrument(skip_all, fields(principal = %principal.name, tokens = tokens.len()))]
    pub async fn reveal(
        &self,
        principal: &Principal,
        tokens: Vec<Token>,
        purpose: &str,
    ) -> Result<Vec<Revealed>, VaultError> {
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
        let rows = self
            .store
            .tokens(tokens.iter().map(|t| *t.id()).collect())
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
        let keyring = read(&self.keyring);
        let mut out = Vec::with_capacity(tokens.len());
        let mut events = Vec::with_capacity(tokens.len());
        let mut corrupt = Vec::new();
        for (t, row) in tokens.iter().zip(rows) {
            let Some(row) = row else { continue };
            let vis = role.visibility(row.kind);
            let disclosure = match vis {
                Visibility::Deny => Disclosure::Denied(reason::KIND_NOT_ALLOWED),
                Visibility::Plain | Visibility::Masked => match open(&keyring, &row) {
                    Some(value) if vis == Visibility::Plain => Disclosure::Plain(value),
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
            events.push(ev);
            out.push(Revealed {
                token: *t,
                kind: row.kind,
                disclosure,
            });
        }
        if !corrupt.is_empty() {
            // Nothing is revealed: only the integrity failures are recorded.
            let n = corrupt.len();
            warn!(count = n, "stored ciphertexts failed their integrity check");
            self.append_audit(corrupt).await?;
            return Err(VaultError::DataLoss(format!(
                "{n} stored value(s) failed their integrity check; nothing was revealed. The stored data was altered or corrupted: an operator must investigate"
            )));
        }
        self.append_audit(events).await?;
        Ok(out)
    }
}

/// Decrypts a stored token; `None` on any failure (which is never detailed).
fn open(keyring: &Keyring, row: &TokenRecord) -> Option<Zeroizing<String>> {
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
