//! The operator's actions: data-key rotation, rewrap and retirement,
//! automatic rotation at the AES-GCM usage cap, principals, policy reload
//! and status. Each needs the `admin` permission (a refusal is audited) and
//! each change is an audit event naming who did what to which version.
//!
//! # Key lifecycle
//!
//! ```text
//! rotate   new version N+1 (primary), N → decrypt_only     one write batch
//! rewrap   rows under old versions → re-encrypted under the primary,
//!          a batch at a time, each row by a conditional UPDATE
//!          (`WHERE id = ? AND key_version = <old>`)       resumable
//! retire   old version with no rows left → wrapped key erased, "retired"
//! ```
//!
//! Why these are safe with traffic running:
//!
//! * A rotation commits first and then swaps the keyring, so a request
//!   still holding the previous keyring encrypts under a version that keeps
//!   decrypting (rewrap picks those rows up later).
//! * A rewrapped row is replaced in one UPDATE: a reader sees the old
//!   ciphertext or the new one, and both decrypt with the keyring it holds.
//!   A row a concurrent rewrap already moved is left alone, so two rewraps
//!   (or a rewrap resumed after a crash) never fight.
//! * Retirement takes the key gate exclusively: every tokenize and reveal
//!   holds it shared for its whole run, so no request that read a row under
//!   the version (or is encrypting under it) is still running when the
//!   version leaves the keyring; the store refuses the retirement in the
//!   same transaction if any row still uses the version.

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::{info, instrument};

use crate::audit::{Action, Decision};
use crate::crypto::Algorithm;
use crate::engine::{self, Engine, META_FINGERPRINT_ROOT, Principal, read, request_id};
use crate::error::VaultError;
use crate::keyring::{self, Keyring, state};
use crate::policy::Policy;
use crate::store::{PrincipalRecord, Rewrapped, StoreError, StoredKey, WriteBatch};

/// Default ciphertexts per rewrap batch.
pub const DEFAULT_REWRAP_BATCH: u32 = 1000;
/// Most ciphertexts per rewrap batch.
pub const MAX_REWRAP_BATCH: u32 = 10_000;
/// Encryptions per cap within which an AES-GCM key counts as "near its
/// cap" and is rotated automatically: 1/100 (1%).
const NEAR_CAP_DIVISOR: u64 = 100;

/// A data-key version as operators see it. Holds no key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStatus {
    /// Version number.
    pub version: u32,
    /// AEAD algorithm.
    pub algorithm: Algorithm,
    /// `primary`, `decrypt_only` or `retired`.
    pub state: String,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Ciphertexts still under this version.
    pub ciphertexts: u64,
    /// Encryptions counted under this version (an over-count after a
    /// restart: the whole durable reservation is assumed used).
    pub encryptions: u64,
    /// Encryption cap (AES-256-GCM only).
    pub encryption_cap: Option<u64>,
}

/// What one rewrap batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewrapProgress {
    /// Ciphertexts re-encrypted by this batch.
    pub rewrapped: u64,
    /// Ciphertexts still under older versions (or under the requested one).
    pub remaining: u64,
    /// The primary version they were re-encrypted under.
    pub primary: u32,
}

/// The vault's state for `ordervault status`.
#[derive(Clone, Debug)]
pub struct VaultStatus {
    /// Build version.
    pub version: &'static str,
    /// Storage backend name.
    pub storage_backend: &'static str,
    /// Bytes on disk (database and log).
    pub storage_bytes: u64,
    /// Key versions.
    pub keys: Vec<KeyStatus>,
    /// Tokens stored.
    pub tokens: u64,
    /// This node's audit chain.
    pub chain: String,
    /// Events in it (the head's sequence number).
    pub audit_size: u64,
    /// The chain hash at the head, hex.
    pub audit_head: String,
    /// Milliseconds since the engine started.
    pub uptime_ms: u64,
    /// SHA-256 of the policy in force, hex.
    pub policy_hash: String,
}

/// The outcome of a policy reload.
#[derive(Clone, Debug)]
pub struct PolicyReloaded {
    /// SHA-256 of the new policy, hex.
    pub policy_hash: String,
    /// Its roles.
    pub roles: Vec<String>,
}

/// Parses an algorithm name as given to `RotateKey` (empty: the default).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, VaultError> {
    if name.is_empty() {
        return Ok(Algorithm::Aes256Gcm);
    }
    name.parse().map_err(|_| {
        VaultError::InvalidArgument(format!(
            "unknown algorithm {name:?}; use aes256gcm or xchacha20poly1305"
        ))
    })
}

/// The actor recorded for what the vault does by itself.
fn the_vault() -> Principal {
    Principal {
        name: String::new(),
        role: "system".into(),
    }
}

/// A store refusal of a conditional key write, as the operator's problem.
fn precondition(e: StoreError, what: &str) -> VaultError {
    match e {
        StoreError::Conflict(_) => VaultError::FailedPrecondition(what.to_owned()),
        other => other.into(),
    }
}

impl Engine {
    /// The encryption cap of keys of `algorithm`.
    pub(crate) fn encryption_cap(&self, algorithm: Algorithm) -> Option<u64> {
        match algorithm {
            Algorithm::Aes256Gcm => Some(self.config.encryption_cap),
            // 192-bit random nonces: no practical per-key limit.
            Algorithm::XChaCha20Poly1305 => None,
        }
    }

    /// Claims `n` encryptions under the primary key of `keyring` and
    /// returns the keyring to encrypt with. With automatic rotation on, a
    /// primary within 1% of its cap (or that the claim would take past it)
    /// is rotated first, and the claim is made under the new primary; with
    /// it off, a claim past the cap is refused. Never exceeds the cap.
    pub(crate) async fn claim_primary(
        &self,
        mut keyring: Arc<Keyring>,
        n: u64,
    ) -> Result<Arc<Keyring>, VaultError> {
        // Two rotations at most: a concurrent request may have used up the
        // key this one rotated to only if the cap is tiny.
        for _ in 0..3 {
            let key = keyring.primary();
            if let (true, Some(cap)) = (
                self.config.auto_rotate,
                self.encryption_cap(key.algorithm()),
            ) {
                let threshold = cap - cap / NEAR_CAP_DIVISOR;
                if n > threshold {
                    return Err(VaultError::FailedPrecondition(format!(
                        "this request needs {n} encryptions, more than a data key may do near its cap of {cap}; split it"
                    )));
                }
                if key.usage().used().saturating_add(n) > threshold {
                    self.auto_rotate(key.version()).await?;
                    keyring = read(&self.keyring);
                    continue;
                }
            }
            match self.claim_encryptions(key, n).await {
                Ok(()) => return Ok(keyring),
                Err(VaultError::FailedPrecondition(_)) if self.config.auto_rotate => {
                    self.auto_rotate(key.version()).await?;
                    keyring = read(&self.keyring);
                }
                Err(e) => return Err(e),
            }
        }
        Err(VaultError::Unavailable(
            "the data key is being rotated; retry the request".into(),
        ))
    }

    /// Rotates the primary key by itself, unless someone already replaced
    /// `version` as the primary.
    async fn auto_rotate(&self, version: u32) -> Result<(), VaultError> {
        let _admin = self.key_admin.lock().await;
        let current = read(&self.keyring);
        if current.primary().version() != version {
            return Ok(());
        }
        // Another node may have rotated already (this keyring is refreshed
        // every few seconds): rotate only what is still the stored primary.
        let stored = self.store.key_versions().await?;
        if !stored
            .iter()
            .any(|k| k.version == version && k.state == state::PRIMARY)
        {
            drop(current);
            return self.reload_keyring().await;
        }
        let algorithm = current.primary().algorithm();
        drop(current);
        let new = self
            .rotate_locked(&the_vault(), algorithm, "auto_cap")
            .await?;
        info!(
            previous = version,
            version = new,
            "data key near its encryption cap: rotated"
        );
        Ok(())
    }

    /// Re-reads what other nodes of a shared store may have changed: key
    /// versions (a rotation through another node), principals (a
    /// revocation) and the stored policy. The server calls it every
    /// [`crate::server::SHARED_STATE_REFRESH`].
    pub async fn refresh_shared_state(&self) -> Result<(), VaultError> {
        let stored = self.store.key_versions().await?;
        let current = read(&self.keyring);
        let primary = stored
            .iter()
            .find(|k| k.state == state::PRIMARY)
            .map(|k| k.version);
        let changed = primary != Some(current.primary().version())
            || stored
                .iter()
                .any(|k| (k.state == state::RETIRED) == current.version(k.version).is_some());
        drop(current);
        if changed {
            let _admin = self.key_admin.lock().await;
            self.reload_keyring().await?;
            info!("key versions changed on another node: keyring reloaded");
        }
        self.reload_principals().await?;
        let nodes = self.store.live_nodes().await?;
        self.live_nodes
            .store(nodes, std::sync::atomic::Ordering::Relaxed);
        let _gate = self.policy_gate.lock().await;
        if let Some(text) = self.store.meta(crate::engine::META_POLICY).await? {
            let text = String::from_utf8_lossy(&text);
            let policy = Policy::parse(&text)
                .map_err(|e| VaultError::Internal(format!("the stored policy is invalid: {e}")))?;
            if policy.hash_hex() != self.policy().hash_hex() {
                info!(policy = %&policy.hash_hex()[..16], "policy changed on another node: now in force");
                match self.policy.write() {
                    Ok(mut g) => *g = Arc::new(policy),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the keyring from the store and swaps it in; usage counters
    /// carry over.
    async fn reload_keyring(&self) -> Result<(), VaultError> {
        let stored = self.store.key_versions().await?;
        let root = self
            .store
            .meta(META_FINGERPRINT_ROOT)
            .await?
            .ok_or_else(|| VaultError::Internal("the fingerprint key is missing".into()))?;
        let usages = read(&self.keyring).usages();
        let keyring = Keyring::load_with_kek(&self.kek, &stored, &root, &usages)
            .map_err(|e| VaultError::Internal(format!("cannot rebuild the keyring: {e}")))?;
        match self.keyring.write() {
            Ok(mut g) => *g = Arc::new(keyring),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keyring),
        }
        Ok(())
    }

    /// Makes a new primary version; the caller holds `key_admin`. Returns
    /// the new version.
    async fn rotate_locked(
        &self,
        actor: &Principal,
        algorithm: Algorithm,
        trigger: &str,
    ) -> Result<u32, VaultError> {
        let stored = self.store.key_versions().await?;
        // A new data key is wrapped under this node's master key: not if
        // the vault's keys were rotated to another one meanwhile (`keys
        // rotate-master` while this node ran), or no node holding the new
        // master key could open it.
        let root = self
            .store
            .meta(META_FINGERPRINT_ROOT)
            .await?
            .ok_or_else(|| VaultError::Internal("the fingerprint key is missing".into()))?;
        if Keyring::load_with_kek(&self.kek, &stored, &root, &Default::default()).is_err() {
            return Err(VaultError::FailedPrecondition(
                "this node's master key no longer opens the vault's keys (the master key was rotated while it ran): restart it with the new master key; nothing was changed".into(),
            ));
        }
        let old = stored
            .iter()
            .find(|k| k.state == state::PRIMARY)
            .map(|k| k.version)
            .ok_or_else(|| VaultError::Internal("no primary key version is stored".into()))?;
        let version = stored.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        let key = keyring::new_data_key(&self.kek, version, algorithm, state::PRIMARY, self.now());
        let policy = self.policy();
        let mut ev = self.event(
            actor,
            Action::Admin,
            Decision::Allowed,
            &request_id(),
            &policy,
        );
        ev.reason = Some(format!(
            "key_rotated version={version} algorithm={algorithm} previous={old} trigger={trigger}"
        ));
        ev.key_version = Some(version);
        self.store
            .commit(WriteBatch {
                keys: vec![key],
                key_states: vec![(old, state::PRIMARY.into(), state::DECRYPT_ONLY.into())],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await
            .map_err(|e| {
                precondition(
                    e,
                    "the primary key changed while rotating (another rotation?); list the keys and retry",
                )
            })?;
        self.reload_keyring().await?;
        Ok(version)
    }

    /// Every key version with its usage, for listing.
    async fn key_statuses(&self) -> Result<Vec<KeyStatus>, VaultError> {
        let stored: Vec<StoredKey> = self.store.key_versions().await?;
        let counts = self.store.ciphertexts_per_version().await?;
        let keyring = read(&self.keyring);
        let mut out = Vec::with_capacity(stored.len());
        for k in stored.iter().rev() {
            let algorithm = Algorithm::from_id(k.algorithm).ok_or_else(|| {
                VaultError::Internal(format!(
                    "key version {} has an unknown algorithm",
                    k.version
                ))
            })?;
            let encryptions = keyring
                .version(k.version)
                .map_or(k.reserved, |v| v.usage().used());
            out.push(KeyStatus {
                version: k.version,
                algorithm,
                state: k.state.clone(),
                created_ms: k.created_ms,
                ciphertexts: counts
                    .iter()
                    .find(|(v, _)| *v == k.version)
                    .map_or(0, |(_, n)| *n),
                encryptions,
                encryption_cap: self.encryption_cap(algorithm),
            });
        }
        Ok(out)
    }

    async fn key_status(&self, version: u32) -> Result<KeyStatus, VaultError> {
        self.key_statuses()
            .await?
            .into_iter()
            .find(|k| k.version == version)
            .ok_or_else(|| VaultError::Internal(format!("key version {version} vanished")))
    }

    /// Lists the data-key versions, newest first. Needs `admin`.
    pub async fn list_keys(&self, actor: &Principal) -> Result<Vec<KeyStatus>, VaultError> {
        self.require_admin(actor, "list data keys").await?;
        self.key_statuses().await
    }

    /// Makes a new primary data-key version (`algorithm` empty: AES-256-GCM).
    /// The old primary keeps decrypting. Effective for every request from
    /// the next one on. Needs `admin`; audited.
    #[instrument(skip_all, fields(actor = %actor.name))]
    pub async fn rotate_key(
        &self,
        actor: &Principal,
        algorithm: &str,
    ) -> Result<KeyStatus, VaultError> {
        self.require_admin(actor, "rotate data keys").await?;
        let algorithm = parse_algorithm(algorithm)?;
        let version = {
            let _admin = self.key_admin.lock().await;
            self.rotate_locked(actor, algorithm, "manual").await?
        };
        info!(version, %algorithm, "data key rotated");
        self.key_status(version).await
    }

    /// Re-encrypts one batch of ciphertexts still under older versions (or
    /// under `from`, when not 0) with the primary. Call until `remaining`
    /// is 0; an interrupted run resumes by itself. Needs `admin`; each batch
    /// is one audit event.
    #[instrument(skip_all, fields(actor = %actor.name, from, batch))]
    pub async fn rewrap(
        &self,
        actor: &Principal,
        from: u32,
        batch: u32,
    ) -> Result<RewrapProgress, VaultError> {
        self.require_admin(actor, "rewrap ciphertexts").await?;
        let limit = match batch {
            0 => DEFAULT_REWRAP_BATCH,
            1..=MAX_REWRAP_BATCH => batch,
            _ => {
                return Err(VaultError::InvalidArgument(format!(
                    "batch must be between 1 and {MAX_REWRAP_BATCH} (0 for {DEFAULT_REWRAP_BATCH})"
                )));
            }
        };
        // The keyring first, the rows second: every version a row read
        // below is under is in this keyring (see the module doc).
        let keyring = read(&self.keyring);
        let primary = keyring.primary().version();
        let only = match from {
            0 => None,
            v => {
                let stored = self.store.key_versions().await?;
                match stored.iter().find(|k| k.version == v) {
                    None => {
                        return Err(VaultError::NotFound(format!(
                            "key version {v} does not exist"
                        )));
                    }
                    Some(_) if v == primary => {
                        return Err(VaultError::FailedPrecondition(format!(
                            "key version {v} is the primary; there is nothing to rewrap from it"
                        )));
                    }
                    Some(_) => Some(v),
                }
            }
        };
        let rows = self
            .store
            .rewrap_candidates(primary, only, limit as usize)
            .await?;
        if rows.is_empty() {
            return Ok(RewrapProgress {
                rewrapped: 0,
                remaining: self.store.rewrap_remaining(primary, only).await?,
                primary,
            });
        }
        let mut values = Vec::with_capacity(rows.len());
        for row in &rows {
            match engine::open(&keyring, row) {
                Some(v) => values.push(v),
                None => {
                    let policy = self.policy();
                    let mut ev = self.event(
                        actor,
                        Action::Admin,
                        Decision::Error,
                        &request_id(),
                        &policy,
                    );
                    ev.reason = Some(format!(
                        "keys_rewrap_failed reason=integrity_check_failed version={}",
                        row.key_version
                    ));
                    ev.kind = Some(row.kind.as_str().to_owned());
                    self.append_audit(vec![ev]).await?;
                    return Err(VaultError::DataLoss(format!(
                        "a stored ciphertext under key version {} failed its integrity check; nothing of this batch was rewrapped. The stored data was altered or corrupted: an operator must investigate",
                        row.key_version
                    )));
                }
            }
        }
        let keyring = self.claim_primary(keyring, rows.len() as u64).await?;
        let key = keyring.primary();
        let to = key.version();
        let from_versions: BTreeSet<u32> = rows.iter().map(|r| r.key_version).collect();
        let rewraps: Vec<Rewrapped> = rows
            .iter()
            .zip(&values)
            .map(|(row, value)| Rewrapped {
                id: row.id,
                from_version: row.key_version,
                to_version: to,
                ciphertext: key.cipher(row.kind).seal(
                    to,
                    &keyring::field_context(&row.id, row.kind),
                    value.as_bytes(),
                ),
            })
            .collect();
        drop(values);
        let policy = self.policy();
        let mut ev = self.event(
            actor,
            Action::Admin,
            Decision::Allowed,
            &request_id(),
            &policy,
        );
        ev.reason = Some(format!(
            "keys_rewrapped from={} to={to}",
            from_versions
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
        ev.count = Some(rewraps.len() as u32);
        ev.key_version = Some(to);
        let committed = self
            .store
            .commit(WriteBatch {
                rewraps,
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await?;
        let primary = read(&self.keyring).primary().version();
        Ok(RewrapProgress {
            rewrapped: committed.rewrapped,
            remaining: self.store.rewrap_remaining(primary, only).await?,
            primary: to,
        })
    }

    /// Destroys a data-key version that no ciphertext uses and that is not
    /// the primary: its wrapped key is erased, it stays listed as retired,
    /// and the keyring no longer holds it. Needs `admin`; audited.
    #[instrument(skip_all, fields(actor = %actor.name, version))]
    pub async fn retire_key(
        &self,
        actor: &Principal,
        version: u32,
    ) -> Result<KeyStatus, VaultError> {
        self.require_admin(actor, "retire data keys").await?;
        // Exclusive: no tokenize or reveal is running from here on.
        let _gate = self.key_gate.write().await;
        let _admin = self.key_admin.lock().await;
        let stored = self.store.key_versions().await?;
        let key = stored
            .iter()
            .find(|k| k.version == version)
            .ok_or_else(|| VaultError::NotFound(format!("key version {version} does not exist")))?;
        let refusal = match key.state.as_str() {
            state::RETIRED => Some(format!("key version {version} is already retired")),
            state::PRIMARY => Some(format!(
                "key version {version} is the primary; rotate first (`ordervault keys rotate`), rewrap, then retire it"
            )),
            _ => {
                let n = self.ciphertexts_under(version).await?;
                (n > 0).then(|| {
                    format!(
                        "{n} ciphertexts still use key version {version}; run `ordervault keys rewrap --from {version}` first"
                    )
                })
            }
        };
        if let Some(why) = refusal {
            self.audit_admin(
                actor,
                Decision::Denied,
                format!("key_retire_refused version={version}"),
            )
            .await?;
            return Err(VaultError::FailedPrecondition(why));
        }
        let policy = self.policy();
        let mut ev = self.event(
            actor,
            Action::Admin,
            Decision::Allowed,
            &request_id(),
            &policy,
        );
        ev.reason = Some(format!("key_retired version={version}"));
        ev.key_version = Some(version);
        let committed = self
            .store
            .commit(WriteBatch {
                retire: vec![version],
                audit_chain: self.config.chain.clone(),
                audit: vec![ev],
                ..Default::default()
            })
            .await;
        if let Err(e) = committed {
            let n = self.ciphertexts_under(version).await?;
            return Err(precondition(
                e,
                &format!(
                    "{n} ciphertexts still use key version {version}; run `ordervault keys rewrap --from {version}` first"
                ),
            ));
        }
        self.reload_keyring().await?;
        info!(version, "data key retired");
        self.key_status(version).await
    }

    async fn ciphertexts_under(&self, version: u32) -> Result<u64, VaultError> {
        Ok(self
            .store
            .ciphertexts_per_version()
            .await?
            .into_iter()
            .find(|(v, _)| *v == version)
            .map_or(0, |(_, n)| n))
    }

    /// All principals, revoked ones included. Needs `admin`.
    pub async fn list_principals(
        &self,
        actor: &Principal,
    ) -> Result<Vec<PrincipalRecord>, VaultError> {
        self.require_admin(actor, "list principals").await?;
        Ok(self.store.principals().await?)
    }

    /// Re-reads the policy file. A file that does not parse or validate is
    /// rejected and the policy in force stays. Needs `admin`; audited.
    #[instrument(skip_all, fields(actor = %actor.name))]
    pub async fn reload_policy(&self, actor: &Principal) -> Result<PolicyReloaded, VaultError> {
        self.require_admin(actor, "reload the policy").await?;
        let path = self.config.policy_path.clone().ok_or_else(|| {
            VaultError::FailedPrecondition(
                "this vault was started without a policy file to reload".into(),
            )
        })?;
        let _gate = self.policy_gate.lock().await;
        let old = self.policy().hash_hex();
        // Read once: what is published is exactly what was checked.
        let read = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()));
        let (text, policy) = match read.and_then(|t| match Policy::parse(&t) {
            Ok(p) => Ok((t, p)),
            Err(e) => Err(e.to_string()),
        }) {
            Ok(parsed) => parsed,
            Err(why) => {
                self.audit_admin(actor, Decision::Denied, "policy_reload_rejected".to_owned())
                    .await?;
                return Err(VaultError::FailedPrecondition(format!(
                    "{why}; the policy in force is unchanged"
                )));
            }
        };
        let reloaded = PolicyReloaded {
            policy_hash: policy.hash_hex(),
            roles: policy.roles().map(|r| r.name().to_owned()).collect(),
        };
        if self.store.shared() {
            // Published to every node sharing the store.
            self.store
                .commit(WriteBatch {
                    meta: vec![(crate::engine::META_POLICY.into(), text.into_bytes())],
                    ..Default::default()
                })
                .await?;
        }
        match self.policy.write() {
            Ok(mut g) => *g = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
        // Recorded under the new policy's hash; the reason names the old one.
        self.audit_admin(
            actor,
            Decision::Allowed,
            format!("policy_reloaded previous={}", &old[..16]),
        )
        .await?;
        info!(policy = %&reloaded.policy_hash[..16], "policy reloaded");
        Ok(reloaded)
    }

    /// The vault's state: keys, tokens, audit head, uptime. Needs `admin`.
    pub async fn status(&self, actor: &Principal) -> Result<VaultStatus, VaultError> {
        self.require_admin(actor, "read the vault status").await?;
        let head = self.store.chain_head(&self.config.chain).await?;
        Ok(VaultStatus {
            version: env!("CARGO_PKG_VERSION"),
            storage_backend: self.store.backend(),
            storage_bytes: self.store.storage_bytes().await?,
            keys: self.key_statuses().await?,
            tokens: self.store.token_count().await?,
            chain: self.config.chain.clone(),
            audit_size: head.map_or(0, |(seq, _)| seq),
            audit_head: head.map(|(_, h)| hex::encode(h)).unwrap_or_default(),
            uptime_ms: (self.now() - self.started_ms).max(0) as u64,
            policy_hash: self.policy().hash_hex(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_parse_by_their_names_and_default_to_aes_gcm() {
        assert_eq!(parse_algorithm("").ok(), Some(Algorithm::Aes256Gcm));
        assert_eq!(
            parse_algorithm("aes256gcm").ok(),
            Some(Algorithm::Aes256Gcm)
        );
        assert_eq!(
            parse_algorithm("xchacha20poly1305").ok(),
            Some(Algorithm::XChaCha20Poly1305)
        );
        for bad in ["AES256GCM", "des", "chacha20poly1305", " aes256gcm"] {
            assert!(
                matches!(parse_algorithm(bad), Err(VaultError::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
