//! The keyring: the master key, the data-key versions it unwraps, and the
//! per-kind subkeys derived from them.
//!
//! ```text
//! master key (file, 0600, or ORDERVAULT_MASTER_KEY)
//!   └─ KEK = HKDF(master, "ordervault/v1/kek")
//!        ├─ wraps DEK v1, v2, ...        (random 256-bit, one per key version)
//!        │    └─ HKDF(DEK, "ordervault/v1/enc/<kind>") → AEAD key per kind
//!        └─ wraps the fingerprint root   (random 256-bit, for the vault's life)
//!             ├─ HKDF(root, "ordervault/v1/fp/<kind>") → HMAC key per kind
//!             └─ HKDF(root, "ordervault/v1/token-ids") → AES-256 permutation
//!                  between token bodies and storage keys
//! ```
//!
//! The fingerprint root cannot be replaced without re-keying every stored
//! row: deterministic tokens are found through its fingerprints and every
//! token's row through its permutation. Master-key rotation only rewraps it.
//!
//! All subkeys and cipher states are derived once when the keyring is
//! loaded, never per request. A [`Keyring`] is immutable; rotation builds a
//! new one and swaps it in atomically. Usage counters live in shared
//! [`KeyUsage`] cells so they survive the swap.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::crypto::{self, AeadKey, Algorithm, CryptoError, Fingerprinter, SecretKey};
use crate::kinds::FieldKind;
use crate::store::{StoredKey, TokenId};

/// Environment variable that may carry the master key (64 hex chars).
pub const MASTER_KEY_ENV: &str = "ORDERVAULT_MASTER_KEY";

/// Key states as stored.
pub mod state {
    /// New encryptions use this version.
    pub const PRIMARY: &str = "primary";
    /// Still decrypts; no new encryptions.
    pub const DECRYPT_ONLY: &str = "decrypt_only";
    /// Destroyed: the wrapped key is gone; kept listed for the record.
    pub const RETIRED: &str = "retired";
}

/// Keyring failures. None of them contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The master key file could not be read or has the wrong format.
    #[error("cannot load the master key from {path}: {reason}")]
    MasterKey {
        /// Where it was looked for.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The master key does not unwrap the stored keys: it is not this
    /// vault's master key (or the stored keys were altered).
    #[error(
        "the master key does not open this vault (wrong key file, or the stored keys were altered)"
    )]
    WrongMasterKey,
    /// The stored key table is inconsistent.
    #[error("stored keys are inconsistent: {0}")]
    Inconsistent(String),
}

/// Reads the master key from `ORDERVAULT_MASTER_KEY` or else from `path`.
pub fn load_master_key(path: &Path) -> Result<SecretKey, KeyringError> {
    if let Ok(hex) = std::env::var(MASTER_KEY_ENV) {
        return SecretKey::from_hex(&hex).map_err(|_| KeyringError::MasterKey {
            path: MASTER_KEY_ENV.into(),
            reason: "not 64 hex characters".into(),
        });
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        KeyringError::MasterKey {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    })?);
    SecretKey::from_hex(&text).map_err(|_| KeyringError::MasterKey {
        path: path.display().to_string(),
        reason: "not 64 hex characters".into(),
    })
}

/// The key-encryption key derived from the master key.
pub fn kek(master: &SecretKey) -> SecretKey {
    crypto::derive_key(master, b"ordervault/v1/kek")
}

fn dek_context(version: u32, algorithm: Algorithm) -> Vec<u8> {
    format!("ordervault/v1/dek/{version}/{}", algorithm.as_str()).into_bytes()
}

const FINGERPRINT_ROOT_CONTEXT: &[u8] = b"ordervault/v1/fingerprint-root";

/// Creates a new random data key for `version`, wrapped under `kek`.
pub fn new_data_key(
    kek: &SecretKey,
    version: u32,
    algorithm: Algorithm,
    state: &str,
    now_ms: i64,
) -> StoredKey {
    let dek = SecretKey::generate();
    StoredKey {
        version,
        algorithm: algorithm.id(),
        wrapped: Some(crypto::wrap_key(
            kek,
            &dek_context(version, algorithm),
            &dek,
        )),
        state: state.to_owned(),
        created_ms: now_ms,
        reserved: 0,
    }
}

/// Creates a new random fingerprint root key, wrapped under `kek`.
pub fn new_fingerprint_root(kek: &SecretKey) -> Vec<u8> {
    crypto::wrap_key(kek, FINGERPRINT_ROOT_CONTEXT, &SecretKey::generate())
}

/// Re-wraps a stored data key from `old_kek` to `new_kek` (master-key
/// rotation). A retired version (no key left) stays as it is.
pub fn rewrap_data_key(
    old_kek: &SecretKey,
    new_kek: &SecretKey,
    stored: &StoredKey,
) -> Result<StoredKey, KeyringError> {
    let Some(wrapped) = &stored.wrapped else {
        return Ok(stored.clone());
    };
    let algorithm = Algorithm::from_id(stored.algorithm).ok_or_else(|| {
        KeyringError::Inconsistent(format!(
            "key version {} has an unknown algorithm",
            stored.version
        ))
    })?;
    let context = dek_context(stored.version, algorithm);
    let dek =
        crypto::unwrap_key(old_kek, &context, wrapped).map_err(|_| KeyringError::WrongMasterKey)?;
    Ok(StoredKey {
        wrapped: Some(crypto::wrap_key(new_kek, &context, &dek)),
        ..stored.clone()
    })
}

/// Re-wraps the fingerprint root key from `old_kek` to `new_kek`
/// (master-key rotation). The root itself does not change, so tokens keep
/// their fingerprints and deterministic tokens stay deterministic.
pub fn rewrap_fingerprint_root(
    old_kek: &SecretKey,
    new_kek: &SecretKey,
    wrapped: &[u8],
) -> Result<Vec<u8>, KeyringError> {
    rewrap_secret(old_kek, new_kek, FINGERPRINT_ROOT_CONTEXT, wrapped)
}

/// Re-wraps any key wrapped under a KEK with `context` (master-key
/// rotation): the key itself does not change.
pub fn rewrap_secret(
    old_kek: &SecretKey,
    new_kek: &SecretKey,
    context: &[u8],
    wrapped: &[u8],
) -> Result<Vec<u8>, KeyringError> {
    let key =
        crypto::unwrap_key(old_kek, context, wrapped).map_err(|_| KeyringError::WrongMasterKey)?;
    Ok(crypto::wrap_key(new_kek, context, &key))
}

/// The associated-data context of a field ciphertext: binds it to its token
/// and kind, so a ciphertext copied onto another row fails to decrypt. (The
/// key version is in the envelope header, which is authenticated too.)
pub fn field_context(id: &TokenId, kind: FieldKind) -> [u8; 36] {
    let mut ctx = [0u8; 36];
    ctx[..19].copy_from_slice(b"ordervault/v1/field");
    ctx[19..35].copy_from_slice(id);
    ctx[35] = kind.code();
    ctx
}

/// How many encryptions a key version has done and may do.
///
/// Encryptions are reserved durably in blocks added to the stored total
/// (`reserved = min(reserved + n, cap)`), so nodes sharing a database each
/// get disjoint blocks and together never pass the cap. A node spends from
/// the blocks it was granted; what it has not spent when it stops is lost,
/// so the count can only over-state, never under-state, the encryptions
/// done.
#[derive(Debug, Default)]
pub struct KeyUsage {
    state: std::sync::Mutex<UsageState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct UsageState {
    /// The stored total of reservations, as last seen.
    seen: u64,
    /// Of this node's granted blocks, what is not spent yet.
    left: u64,
}

impl KeyUsage {
    /// Usage starting from what is durably reserved: after a restart the
    /// vault assumes every reserved encryption was used.
    pub fn resume(reserved: u64) -> KeyUsage {
        KeyUsage {
            state: std::sync::Mutex::new(UsageState {
                seen: reserved,
                left: 0,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut UsageState) -> T) -> T {
        match self.state.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Spends `n` encryptions of this node's granted blocks; false (and
    /// nothing spent) when they do not hold `n` more.
    pub fn take(&self, n: u64) -> bool {
        self.with(|s| {
            if s.left >= n {
                s.left -= n;
                true
            } else {
                false
            }
        })
    }

    /// Records a block granted by the store: the stored total went from
    /// `old` to `new`.
    pub fn grant(&self, old: u64, new: u64) {
        self.with(|s| {
            s.seen = s.seen.max(new);
            s.left += new.saturating_sub(old);
        });
    }

    /// Encryptions counted against the key: everything reserved (by every
    /// node, as last seen) less what this node has not spent.
    pub fn used(&self) -> u64 {
        self.with(|s| s.seen.saturating_sub(s.left))
    }

    /// Encryptions durably reserved, as last seen.
    pub fn reserved(&self) -> u64 {
        self.with(|s| s.seen)
    }
}

/// One usable data-key version.
pub struct KeyVersion {
    version: u32,
    algorithm: Algorithm,
    ciphers: Vec<AeadKey>,
    usage: Arc<KeyUsage>,
}

impl std::fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVersion")
            .field("version", &self.version)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl KeyVersion {
    /// The version number.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The AEAD algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The AEAD key for `kind`.
    pub fn cipher(&self, kind: FieldKind) -> &AeadKey {
        &self.ciphers[usize::from(kind.code() - 1)]
    }

    /// Its usage counter.
    pub fn usage(&self) -> &Arc<KeyUsage> {
        &self.usage
    }
}

/// The permutation between token bodies and storage keys
/// ([`crate::token::TokenIds`]), derived from the fingerprint root: like
/// fingerprints, it must stay the same for the life of the vault (data-key
/// rotation does not touch it; master-key rotation rewraps the root).
pub fn token_permutation(
    kek: &SecretKey,
    fingerprint_root: &[u8],
) -> Result<crypto::BlockPermutation, KeyringError> {
    let root = crypto::unwrap_key(kek, FINGERPRINT_ROOT_CONTEXT, fingerprint_root)
        .map_err(|_: CryptoError| KeyringError::WrongMasterKey)?;
    Ok(crypto::BlockPermutation::new(&crypto::derive_key(
        &root,
        b"ordervault/v1/token-ids",
    )))
}

/// The loaded keys. Immutable; replaced as a whole on rotation.
pub struct Keyring {
    versions: BTreeMap<u32, KeyVersion>,
    primary: u32,
    fingerprinters: Vec<Fingerprinter>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .field("primary", &self.primary)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Unwraps the stored keys with the master key and derives all subkeys.
    ///
    /// `usages` carries counters over from a previous keyring; versions not
    /// in it resume from their stored reservation.
    pub fn load(
        master: &SecretKey,
        stored: &[StoredKey],
        fingerprint_root: &[u8],
        usages: &BTreeMap<u32, Arc<KeyUsage>>,
    ) -> Result<Keyring, KeyringError> {
        Keyring::load_with_kek(&kek(master), stored, fingerprint_root, usages)
    }

    /// Like [`Keyring::load`], from the key-encryption key the master key
    /// derives: a running vault keeps only the KEK, and rebuilds its keyring
    /// from it on rotation.
    pub fn load_with_kek(
        kek: &SecretKey,
        stored: &[StoredKey],
        fingerprint_root: &[u8],
        usages: &BTreeMap<u32, Arc<KeyUsage>>,
    ) -> Result<Keyring, KeyringError> {
        let root = crypto::unwrap_key(kek, FINGERPRINT_ROOT_CONTEXT, fingerprint_root)
            .map_err(|_: CryptoError| KeyringError::WrongMasterKey)?;
        let fingerprinters = FieldKind::ALL
            .iter()
            .map(|k| {
                Fingerprinter::new(&crypto::derive_key(
                    &root,
                    format!("ordervault/v1/fp/{}", k.as_str()).as_bytes(),
                ))
            })
            .collect();
        let mut versions = BTreeMap::new();
        let mut primary = None;
        for s in stored {
            let Some(wrapped) = &s.wrapped else { continue };
            let algorithm = Algorithm::from_id(s.algorithm).ok_or_else(|| {
                KeyringError::Inconsistent(format!(
                    "key version {} has an unknown algorithm",
                    s.version
                ))
            })?;
            let dek = crypto::unwrap_key(kek, &dek_context(s.version, algorithm), wrapped)
                .map_err(|_| KeyringError::WrongMasterKey)?;
            let ciphers = FieldKind::ALL
                .iter()
                .map(|k| {
                    let sub = crypto::derive_key(
                        &dek,
                        format!("ordervault/v1/enc/{}", k.as_str()).as_bytes(),
                    );
                    AeadKey::new(algorithm, &sub)
                })
                .collect();
            if s.state == state::PRIMARY {
                if primary.is_some() {
                    return Err(KeyringError::Inconsistent(
                        "more than one primary key version".into(),
                    ));
                }
                primary = Some(s.version);
            }
            let usage = usages
                .get(&s.version)
                .cloned()
                .unwrap_or_else(|| Arc::new(KeyUsage::resume(s.reserved)));
            versions.insert(
                s.version,
                KeyVersion {
                    version: s.version,
                    algorithm,
                    ciphers,
                    usage,
                },
            );
        }
        let primary =
            primary.ok_or_else(|| KeyringError::Inconsistent("no primary key version".into()))?;
        Ok(Keyring {
            versions,
            primary,
            fingerprinters,
        })
    }

    /// The version new encryptions use.
    pub fn primary(&self) -> &KeyVersion {
        // `load` refuses a keyring without a primary among its versions.
        &self.versions[&self.primary]
    }

    /// A version that can decrypt, if it is still held.
    pub fn version(&self, v: u32) -> Option<&KeyVersion> {
        self.versions.get(&v)
    }

    /// Usage cells of all versions, to carry over into the next keyring.
    pub fn usages(&self) -> BTreeMap<u32, Arc<KeyUsage>> {
        self.versions
            .iter()
            .map(|(v, k)| (*v, k.usage.clone()))
            .collect()
    }

    /// Keyed fingerprint of a normalised value of `kind`.
    pub fn fingerprint(&self, kind: FieldKind, normalised: &str) -> [u8; 32] {
        self.fingerprinters[usize::from(kind.code() - 1)].fingerprint(normalised.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SecretKey, Vec<StoredKey>, Vec<u8>) {
        let master = SecretKey::generate();
        let k = kek(&master);
        let keys = vec![
            new_data_key(&k, 1, Algorithm::Aes256Gcm, state::DECRYPT_ONLY, 0),
            new_data_key(&k, 2, Algorithm::XChaCha20Poly1305, state::PRIMARY, 0),
        ];
        let root = new_fingerprint_root(&k);
        (master, keys, root)
    }

    #[test]
    fn loads_and_encrypts_under_the_primary() {
        let (master, keys, root) = setup();
        let ring = Keyring::load(&master, &keys, &root, &BTreeMap::new()).expect("load");
        assert_eq!(ring.primary().version(), 2);
        let id = [7u8; 16];
        let ctx = field_context(&id, FieldKind::Phone);
        let ct = ring
            .primary()
            .cipher(FieldKind::Phone)
            .seal(2, &ctx, b"+8613812345678");
        let v1 = ring.version(1).expect("v1");
        assert!(v1.cipher(FieldKind::Phone).open(&ctx, &ct).is_err());
        let pt = ring
            .primary()
            .cipher(FieldKind::Phone)
            .open(&ctx, &ct)
            .expect("open");
        assert_eq!(&pt[..], b"+8613812345678");
        // Another kind's subkey or another row's context does not open it.
        assert!(
            ring.primary()
                .cipher(FieldKind::Name)
                .open(&ctx, &ct)
                .is_err()
        );
        assert!(
            ring.primary()
                .cipher(FieldKind::Phone)
                .open(&field_context(&[8u8; 16], FieldKind::Phone), &ct)
                .is_err()
        );
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let (_, keys, root) = setup();
        let err = Keyring::load(&SecretKey::generate(), &keys, &root, &BTreeMap::new())
            .expect_err("wrong key");
        assert!(matches!(err, KeyringError::WrongMasterKey));
    }

    #[test]
    fn fingerprints_are_keyed_and_per_kind() {
        let (master, keys, root) = setup();
        let ring = Keyring::load(&master, &keys, &root, &BTreeMap::new()).expect("load");
        let again = Keyring::load(&master, &keys, &root, &BTreeMap::new()).expect("load");
        let a = ring.fingerprint(FieldKind::Phone, "+8613812345678");
        assert_eq!(a, again.fingerprint(FieldKind::Phone, "+8613812345678"));
        assert_ne!(a, ring.fingerprint(FieldKind::Name, "+8613812345678"));
        assert_ne!(a, crypto::sha256(b"+8613812345678"));
    }

    #[test]
    fn rewrapped_keys_open_under_the_new_master_key_only() {
        let (old, keys, root) = setup();
        let new = SecretKey::generate();
        let (old_kek, new_kek) = (kek(&old), kek(&new));
        let mut retired = new_data_key(&old_kek, 3, Algorithm::Aes256Gcm, state::RETIRED, 0);
        retired.wrapped = None;
        let mut all = keys.clone();
        all.push(retired.clone());
        let rewrapped: Vec<StoredKey> = all
            .iter()
            .map(|k| rewrap_data_key(&old_kek, &new_kek, k).expect("rewrap"))
            .collect();
        let new_root = rewrap_fingerprint_root(&old_kek, &new_kek, &root).expect("rewrap root");
        assert_eq!(
            rewrapped[2], retired,
            "a retired version has nothing to rewrap"
        );
        let before = Keyring::load(&old, &keys, &root, &BTreeMap::new()).expect("old");
        let after = Keyring::load(&new, &rewrapped, &new_root, &BTreeMap::new()).expect("new");
        // Same data keys and fingerprint key: old ciphertexts open, tokens
        // keep their fingerprints.
        let ctx = field_context(&[1; 16], FieldKind::Email);
        let ct = before
            .primary()
            .cipher(FieldKind::Email)
            .seal(2, &ctx, b"a@b.cn");
        assert!(
            after
                .primary()
                .cipher(FieldKind::Email)
                .open(&ctx, &ct)
                .is_ok()
        );
        assert_eq!(
            before.fingerprint(FieldKind::Email, "a@b.cn"),
            after.fingerprint(FieldKind::Email, "a@b.cn")
        );
        assert!(matches!(
            Keyring::load(&old, &rewrapped, &new_root, &BTreeMap::new()),
            Err(KeyringError::WrongMasterKey)
        ));
        // A key not wrapped under the old KEK is refused, not rewrapped.
        assert!(matches!(
            rewrap_data_key(&new_kek, &old_kek, &keys[0]),
            Err(KeyringError::WrongMasterKey)
        ));
    }

    #[test]
    fn usage_resumes_at_the_reservation_and_spends_only_granted_blocks() {
        let u = KeyUsage::resume(1000);
        assert_eq!(u.used(), 1000);
        assert!(!u.take(1), "nothing granted to this node yet");
        // Another node took 1000..1500; this one is granted 1500..1600.
        u.grant(1500, 1600);
        assert_eq!(u.reserved(), 1600);
        assert_eq!(u.used(), 1500);
        assert!(u.take(60));
        assert_eq!(u.used(), 1560);
        assert!(
            !u.take(41),
            "a claim larger than what is left spends nothing"
        );
        assert!(u.take(40));
        assert_eq!(u.used(), 1600);
    }
}
