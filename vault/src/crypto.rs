//! Keys, the ciphertext envelope, keyed fingerprints and key wrapping.
//!
//! This is the only module that imports the AEAD, HKDF and HMAC crates; everything else in
//! the vault sees [`SecretKey`], [`AeadKey`], [`Fingerprinter`] and byte strings.
//!
//! # Keys
//!
//! Every key is a [`SecretKey`]: 256 bits in a [`secrecy::SecretBox`], built in place on the
//! heap, wiped on drop, never `Clone`, and with a `Debug` that prints `[redacted]`. Subkeys
//! come from [`derive_key`], HKDF-SHA256 ([RFC 5869]) with a fixed salt and an `info` string
//! that names the purpose, so one data key yields independent keys per field kind.
//!
//! # Envelope format (version 1)
//!
//! [`AeadKey::seal`] returns a self-describing envelope; every ciphertext carries its key
//! version and algorithm, so rotation never has to guess (DESIGN.md §5):
//!
//! | bytes              | content                                                     |
//! |--------------------|-------------------------------------------------------------|
//! | `0`                | format, `0x01`                                              |
//! | `1..5`             | key version, `u32` big-endian                               |
//! | `5`                | algorithm id: `1` AES-256-GCM, `2` XChaCha20-Poly1305       |
//! | `6..6+n`           | nonce: `n = 12` for AES-256-GCM, `n = 24` for XChaCha20     |
//! | `6+n..len-16`      | ciphertext, as long as the plaintext                        |
//! | `len-16..len`      | authentication tag                                          |
//!
//! The AEAD associated data is `context || envelope[0..6]`. Authenticating the header means
//! the key version or algorithm cannot be rewritten, and the caller's `context` (say, the
//! row and field a value belongs to) means a ciphertext copied to another row fails to open.
//! The header has a fixed length and comes last, so the concatenation is unambiguous.
//!
//! Nonces are random: 96 bits for AES-256-GCM, where the keyring caps encryptions per key far
//! below the 2^32 that NIST SP 800-38D §8.3 allows for random nonces, and 192 bits for
//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), where random nonces are safe without a cap.
//!
//! A failed [`AeadKey::open`] reports only [`CryptoError::Integrity`] (the tag did not verify)
//! or [`CryptoError::Malformed`] (the bytes are not an envelope this key can open), never why.
//!
//! # What is not wiped
//!
//! Keys, the AEAD key schedules (the `zeroize` feature of `aes-gcm` and `chacha20poly1305`)
//! and decrypted plaintexts ([`zeroize::Zeroizing`]) are wiped. The keyed SHA-256 states
//! inside HMAC and HKDF are wiped only when `sha2`'s `zeroize` feature is on, and a cipher's
//! state is built on the stack before it is boxed, which leaves a copy that is not wiped.
//!
//! [RFC 5869]: https://www.rfc-editor.org/rfc/rfc5869

use std::fmt;
use std::str::FromStr;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::rngs::SysRng;
use rand::{Rng, TryRng};
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// The salt of every [`derive_key`] call (RFC 5869 §3.1: a fixed, non-secret salt still
/// strengthens the extract step, and versioning it lets a future scheme change it).
const HKDF_SALT: &[u8] = b"ordervault/v1 hkdf salt";

/// The first byte of every envelope this module writes.
const FORMAT_V1: u8 = 0x01;
/// Format byte, key version, algorithm id.
const HEADER_LEN: usize = 6;
/// Both algorithms use a 128-bit tag.
const TAG_LEN: usize = 16;
/// The longest nonce of any [`Algorithm`] (XChaCha20-Poly1305).
const MAX_NONCE_LEN: usize = 24;
/// The key version written into envelopes made by [`wrap_key`].
const WRAP_KEY_VERSION: u32 = 0;

/// A 256-bit secret key: master key, data key, subkey.
///
/// Wiped on drop, deliberately not `Clone` (a copy is one more place to forget to wipe), and
/// `Debug` prints `SecretKey([redacted])`.
pub struct SecretKey(SecretBox<[u8; 32]>);

impl SecretKey {
    /// Makes a fresh key straight from the operating system's random source.
    ///
    /// Keys are rare and long-lived, so they skip the thread-local generator that
    /// [`random_bytes`] uses and pay for one system call each.
    ///
    /// # Panics
    ///
    /// If the operating system cannot supply random bytes. There is no safe way to make a key
    /// without them, and rand's thread-local generator panics in the same case.
    pub fn generate() -> SecretKey {
        SecretKey(SecretBox::init_with_mut(|bytes: &mut [u8; 32]| {
            SysRng.try_fill_bytes(bytes).expect(
                "the operating system's random source works (no key can be made without it)",
            );
        }))
    }

    /// Copies `bytes` into a new key built in place, then zeroizes `bytes`.
    pub fn from_bytes(bytes: &mut [u8; 32]) -> SecretKey {
        let key = SecretBox::init_with_mut(|inner: &mut [u8; 32]| inner.copy_from_slice(bytes));
        bytes.zeroize();
        SecretKey(key)
    }

    /// Parses a key written as 64 hexadecimal characters (either case); whitespace around
    /// it, such as the newline at the end of a key file, is ignored.
    ///
    /// # Errors
    ///
    /// [`CryptoError::KeyEncoding`] if the trimmed text is not exactly 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<SecretKey, CryptoError> {
        let mut decoded = Ok(());
        // Decode straight into the box so the key never sits in a temporary array.
        let key = SecretBox::init_with_mut(|bytes: &mut [u8; 32]| {
            decoded = hex::decode_to_slice(hex.trim(), bytes);
        });
        match decoded {
            Ok(()) => Ok(SecretKey(key)),
            // `key` drops here and wipes whatever was partly decoded.
            Err(_) => Err(CryptoError::KeyEncoding),
        }
    }

    /// Writes the key as 64 lowercase hexadecimal characters, in a string wiped on drop.
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        // The capacity is exact, so the string never reallocates and leaves no unwiped copy.
        let mut hex = Zeroizing::new(String::with_capacity(64));
        for byte in self.expose() {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        hex
    }

    /// The raw key bytes: only for wrapping and for tests. Everything else uses the key
    /// through [`AeadKey`], [`Fingerprinter`] or [`derive_key`].
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

/// Derives a 32-byte subkey from `root` with HKDF-SHA256 (RFC 5869), salt
/// `b"ordervault/v1 hkdf salt"` and the given `info`.
///
/// The same root and info always give the same key; different infos give independent keys.
/// `info` should name the purpose and the field kind, e.g. `b"ordervault/v1 aead phone"`.
pub fn derive_key(root: &SecretKey, info: &[u8]) -> SecretKey {
    SecretKey(SecretBox::init_with_mut(|okm: &mut [u8; 32]| {
        hkdf_sha256(HKDF_SALT, root.expose(), info, okm)
            .expect("32 bytes is within HKDF-SHA256's limit of 255 * 32 (RFC 5869 §2.3)");
    }))
}

/// HKDF-Extract then HKDF-Expand (RFC 5869 §2.2, §2.3) with SHA-256, filling `okm`.
///
/// [`derive_key`] and the RFC 5869 test vectors both go through here.
fn hkdf_sha256(
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    okm: &mut [u8],
) -> Result<(), hkdf::InvalidLength> {
    Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, okm)
}

/// An AEAD algorithm an [`AeadKey`] can use; chosen per key version and recorded in every
/// envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// AES-256-GCM (NIST SP 800-38D, RFC 5116 §5.2) with a random 96-bit nonce: the default,
    /// fast wherever the CPU has AES instructions.
    Aes256Gcm,
    /// XChaCha20-Poly1305 (RFC 8439 with the 192-bit nonce of draft-irtf-cfrg-xchacha): for
    /// CPUs without AES instructions.
    XChaCha20Poly1305,
}

impl Algorithm {
    /// The id stored in byte 5 of an envelope: 1 for AES-256-GCM, 2 for XChaCha20-Poly1305.
    pub fn id(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => 1,
            Algorithm::XChaCha20Poly1305 => 2,
        }
    }

    /// The algorithm with the given envelope id, or `None` for an id no version of the vault
    /// has written.
    pub fn from_id(id: u8) -> Option<Algorithm> {
        match id {
            1 => Some(Algorithm::Aes256Gcm),
            2 => Some(Algorithm::XChaCha20Poly1305),
            _ => None,
        }
    }

    /// The name used in configuration and on the command line: `aes256gcm` or
    /// `xchacha20poly1305`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "aes256gcm",
            Algorithm::XChaCha20Poly1305 => "xchacha20poly1305",
        }
    }

    /// The nonce length in bytes.
    fn nonce_len(self) -> usize {
        match self {
            Algorithm::Aes256Gcm => 12,
            Algorithm::XChaCha20Poly1305 => MAX_NONCE_LEN,
        }
    }
}

impl FromStr for Algorithm {
    type Err = CryptoError;

    /// Parses a name written by [`Algorithm::as_str`]; [`CryptoError::UnknownAlgorithm`]
    /// otherwise.
    fn from_str(name: &str) -> Result<Algorithm, CryptoError> {
        match name {
            "aes256gcm" => Ok(Algorithm::Aes256Gcm),
            "xchacha20poly1305" => Ok(Algorithm::XChaCha20Poly1305),
            _ => Err(CryptoError::UnknownAlgorithm),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cipher state of an [`AeadKey`], boxed so moving the key does not copy round keys.
enum Cipher {
    Aes256Gcm(Box<Aes256Gcm>),
    XChaCha20Poly1305(Box<XChaCha20Poly1305>),
}

/// An AEAD key ready to use: the cipher state (AES key schedule, GHASH key) is built once
/// here and reused for every field it seals or opens. `Debug` shows only the algorithm.
pub struct AeadKey {
    algorithm: Algorithm,
    cipher: Cipher,
}

impl AeadKey {
    /// Builds the cipher state for `algorithm` from `key`.
    pub fn new(algorithm: Algorithm, key: &SecretKey) -> AeadKey {
        let key_bytes = key.expose().into();
        let cipher = match algorithm {
            Algorithm::Aes256Gcm => Cipher::Aes256Gcm(Box::new(Aes256Gcm::new(key_bytes))),
            Algorithm::XChaCha20Poly1305 => {
                Cipher::XChaCha20Poly1305(Box::new(XChaCha20Poly1305::new(key_bytes)))
            }
        };
        AeadKey { algorithm, cipher }
    }

    /// The algorithm this key seals with and the only one it opens.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Encrypts `plaintext` into a self-describing envelope (see the module documentation)
    /// that records `key_version` and binds `context`, which [`AeadKey::open`] must be given
    /// again.
    ///
    /// The nonce comes from a CSPRNG: `rand::rng()`, a ChaCha-based generator seeded from
    /// the operating system. One system call per nonce would cost more than the encryption.
    ///
    /// # Panics
    ///
    /// If `plaintext` is longer than 64 GiB, the most AES-GCM can encrypt under one nonce.
    pub fn seal(&self, key_version: u32, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; MAX_NONCE_LEN];
        let nonce = &mut nonce[..self.algorithm.nonce_len()];
        rand::rng().fill_bytes(nonce);
        self.seal_with_nonce(key_version, context, plaintext, nonce)
    }

    /// [`AeadKey::seal`] with the nonce given: the known-answer tests pin its output.
    fn seal_with_nonce(
        &self,
        key_version: u32,
        context: &[u8],
        plaintext: &[u8],
        nonce: &[u8],
    ) -> Vec<u8> {
        let body_start = HEADER_LEN + nonce.len();
        // Exact capacity: the plaintext copied in below is encrypted in place, and the vector
        // never reallocates, so no plaintext is left behind in a freed buffer.
        let mut envelope = Vec::with_capacity(body_start + plaintext.len() + TAG_LEN);
        envelope.push(FORMAT_V1);
        envelope.extend_from_slice(&key_version.to_be_bytes());
        envelope.push(self.algorithm.id());
        envelope.extend_from_slice(nonce);
        envelope.extend_from_slice(plaintext);

        let aad = associated_data(context, &envelope[..HEADER_LEN]);
        match &self.cipher {
            Cipher::Aes256Gcm(cipher) => seal_in_place(&**cipher, &aad, &mut envelope, body_start),
            Cipher::XChaCha20Poly1305(cipher) => {
                seal_in_place(&**cipher, &aad, &mut envelope, body_start)
            }
        }
        envelope
    }

    /// Decrypts an envelope made by [`AeadKey::seal`] with this key and the same `context`.
    ///
    /// # Errors
    ///
    /// Deliberately without detail:
    /// * [`CryptoError::Malformed`] if `envelope` is too short, has an unknown format byte, or
    ///   names an algorithm other than this key's;
    /// * [`CryptoError::Integrity`] if the tag does not verify: wrong key, wrong context, or
    ///   any altered byte, header included.
    pub fn open(&self, context: &[u8], envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parts = EnvelopeParts::parse(envelope)?;
        if parts.algorithm != self.algorithm {
            return Err(CryptoError::Malformed);
        }
        let aad = associated_data(context, parts.header);
        let mut plaintext = Zeroizing::new(parts.ciphertext.to_vec());
        match &self.cipher {
            Cipher::Aes256Gcm(cipher) => {
                open_in_place(&**cipher, parts.nonce, &aad, &mut plaintext, parts.tag)?;
            }
            Cipher::XChaCha20Poly1305(cipher) => {
                open_in_place(&**cipher, parts.nonce, &aad, &mut plaintext, parts.tag)?;
            }
        }
        Ok(plaintext)
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Reads the header of an envelope without decrypting it: `(key version, algorithm)`, so the
/// caller can pick the key that opens it.
///
/// The header is not authenticated until [`AeadKey::open`] succeeds; use it to choose a key,
/// never to decide anything else.
///
/// # Errors
///
/// [`CryptoError::Malformed`] if the envelope is shorter than a header, nonce and tag, has an
/// unknown format byte, or an unknown algorithm id (corrupted input, not a caller mistake, so
/// not [`CryptoError::UnknownAlgorithm`]).
pub fn envelope_header(envelope: &[u8]) -> Result<(u32, Algorithm), CryptoError> {
    let parts = EnvelopeParts::parse(envelope)?;
    Ok((parts.key_version, parts.algorithm))
}

/// An envelope split into its fields; only lengths, the format byte and the algorithm id are
/// checked.
struct EnvelopeParts<'a> {
    header: &'a [u8; HEADER_LEN],
    key_version: u32,
    algorithm: Algorithm,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> EnvelopeParts<'a> {
    fn parse(envelope: &'a [u8]) -> Result<EnvelopeParts<'a>, CryptoError> {
        let (header, rest) = envelope
            .split_first_chunk::<HEADER_LEN>()
            .ok_or(CryptoError::Malformed)?;
        let [format, v0, v1, v2, v3, algorithm_id] = *header;
        if format != FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let algorithm = Algorithm::from_id(algorithm_id).ok_or(CryptoError::Malformed)?;
        let (nonce, body) = rest
            .split_at_checked(algorithm.nonce_len())
            .ok_or(CryptoError::Malformed)?;
        let (ciphertext, tag) = body
            .split_last_chunk::<TAG_LEN>()
            .ok_or(CryptoError::Malformed)?;
        Ok(EnvelopeParts {
            header,
            key_version: u32::from_be_bytes([v0, v1, v2, v3]),
            algorithm,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// `context || header`: the associated data of one envelope.
fn associated_data(context: &[u8], header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(context.len() + header.len());
    aad.extend_from_slice(context);
    aad.extend_from_slice(header);
    aad
}

/// Encrypts `envelope[body_start..]` in place and appends the tag. The nonce is the
/// `HEADER_LEN..body_start` slice of `envelope`.
fn seal_in_place<A: AeadInOut>(cipher: &A, aad: &[u8], envelope: &mut Vec<u8>, body_start: usize) {
    let (prefix, body) = envelope.split_at_mut(body_start);
    let nonce = Nonce::<A>::try_from(&prefix[HEADER_LEN..])
        .expect("the nonce slice has the algorithm's nonce length (seal passes nonce_len bytes)");
    let tag = cipher
        .encrypt_inout_detached(&nonce, aad, body.into())
        .expect("the plaintext is below the AEAD length limits (64 GiB for AES-GCM)");
    envelope.extend_from_slice(&tag);
}

/// Verifies `tag` over `buffer` and decrypts it in place; on failure `buffer` is untouched
/// ciphertext.
fn open_in_place<A: AeadInOut>(
    cipher: &A,
    nonce: &[u8],
    aad: &[u8],
    buffer: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), CryptoError> {
    let nonce = Nonce::<A>::try_from(nonce).map_err(|_| CryptoError::Malformed)?;
    let tag = Tag::<A>::try_from(&tag[..]).map_err(|_| CryptoError::Malformed)?;
    cipher
        .decrypt_inout_detached(&nonce, aad, buffer.into(), &tag)
        .map_err(|_| CryptoError::Integrity)
}

/// Keyed fingerprints for de-duplication and lookup without decrypting: HMAC-SHA256
/// (RFC 2104) of a value the caller has already normalised.
///
/// The keyed inner and outer hash states are computed once, here, and cloned per message.
/// `Debug` prints no key material. Compare fingerprints that gate access with `subtle`.
pub struct Fingerprinter {
    mac: Hmac<Sha256>,
}

impl Fingerprinter {
    /// Precomputes the keyed HMAC state for `key` (the fingerprint root key or a subkey of it).
    pub fn new(key: &SecretKey) -> Fingerprinter {
        Fingerprinter {
            mac: hmac_sha256_keyed(key.expose()),
        }
    }

    /// HMAC-SHA256 of `message` under this fingerprinter's key.
    pub fn fingerprint(&self, message: &[u8]) -> [u8; 32] {
        hmac_sha256_finish(&self.mac, message)
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter([redacted])")
    }
}

/// A keyed permutation of 128-bit blocks: AES-256 applied to one block.
///
/// Tokens are this permutation of their storage keys. Storage keys begin with
/// the time of creation, so rows written together land next to each other in
/// a B-tree; the permutation makes the token itself indistinguishable from
/// random to anyone without the key, so it tells nothing of when it was made.
pub struct BlockPermutation(aes::Aes256);

impl BlockPermutation {
    /// The permutation keyed by `key`.
    pub fn new(key: &SecretKey) -> BlockPermutation {
        use aes::cipher::KeyInit;
        BlockPermutation(aes::Aes256::new(key.expose().into()))
    }

    /// The image of `block`.
    pub fn forward(&self, block: &[u8; 16]) -> [u8; 16] {
        use aes::cipher::BlockCipherEncrypt;
        let mut b = aes::Block::from(*block);
        self.0.encrypt_block(&mut b);
        b.into()
    }

    /// The block whose image is `block`.
    pub fn backward(&self, block: &[u8; 16]) -> [u8; 16] {
        use aes::cipher::BlockCipherDecrypt;
        let mut b = aes::Block::from(*block);
        self.0.decrypt_block(&mut b);
        b.into()
    }
}

impl fmt::Debug for BlockPermutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlockPermutation([redacted])")
    }
}

/// HMAC-SHA256 keyed with `key` of any length (RFC 2104 §2: longer keys are hashed first,
/// shorter ones padded). [`Fingerprinter`] and the RFC 4231 test vectors both go through
/// here.
fn hmac_sha256_keyed(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .expect("HMAC accepts keys of any length (RFC 2104 §2)")
}

/// Finishes a copy of the keyed state `mac` over `message`.
fn hmac_sha256_finish(mac: &Hmac<Sha256>, message: &[u8]) -> [u8; 32] {
    let mut mac = mac.clone();
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Wraps `key` under the key-encryption key `kek`: its 32 bytes sealed with AES-256-GCM in
/// the envelope format, with key version 0 in the header. `context` binds what the key is for
/// (e.g. `b"dek v3"`), so a wrapped key cannot be passed off as another.
pub fn wrap_key(kek: &SecretKey, context: &[u8], key: &SecretKey) -> Vec<u8> {
    AeadKey::new(Algorithm::Aes256Gcm, kek).seal(WRAP_KEY_VERSION, context, key.expose())
}

/// Unwraps a key made by [`wrap_key`] with the same `kek` and `context`.
///
/// # Errors
///
/// [`CryptoError::Integrity`] for a wrong `kek`, a wrong `context` or altered bytes;
/// [`CryptoError::Malformed`] if `wrapped` is not an AES-256-GCM envelope of a 32-byte key.
pub fn unwrap_key(
    kek: &SecretKey,
    context: &[u8],
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    let plaintext = AeadKey::new(Algorithm::Aes256Gcm, kek).open(context, wrapped)?;
    let bytes: &[u8; 32] = plaintext
        .as_slice()
        .try_into()
        .map_err(|_| CryptoError::Malformed)?;
    Ok(SecretKey(SecretBox::init_with_mut(|key: &mut [u8; 32]| {
        key.copy_from_slice(bytes);
    })))
}

/// SHA-256 (FIPS 180-4) of `data`. Unkeyed: for integrity of public data, never to hide a
/// value (use [`Fingerprinter`] for that).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SHA-256 of `parts` one after another, without copying them together.
pub fn sha256_of_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Random bytes from the thread-local CSPRNG (`rand::rng()`: ChaCha12 seeded from the
/// operating system and reseeded every 64 KiB), for tokens, nonces and request ids.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// What went wrong in this module. Messages carry no detail by design: none of them may help
/// an attacker tell a wrong key from a tampered byte.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The ciphertext did not authenticate: wrong key, wrong context, or altered bytes. The
    /// stored value is corrupt or tampered with; do not retry, report it (and audit it).
    #[error("ciphertext failed authentication")]
    Integrity,
    /// The bytes are not an envelope this key can open: too short, an unknown format byte, or
    /// another algorithm than the key's. Treat as corrupt input, or look up the right key with
    /// [`envelope_header`].
    #[error("ciphertext envelope is malformed")]
    Malformed,
    /// An algorithm name is neither `aes256gcm` nor `xchacha20poly1305`. A caller or
    /// configuration mistake: fix the name.
    #[error("unknown AEAD algorithm")]
    UnknownAlgorithm,
    /// A key given as text is not 64 hexadecimal characters. Check the key file or variable;
    /// `ordervault init` makes a new key.
    #[error("key is not 64 hex characters")]
    KeyEncoding,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The key of the known-answer vectors: bytes 0x00, 0x01, ..., 0x1f.
    fn counting_key() -> SecretKey {
        let mut bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
        SecretKey::from_bytes(&mut bytes)
    }

    fn key_from(byte: u8) -> SecretKey {
        SecretKey::from_bytes(&mut [byte; 32])
    }

    fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text).expect("test vectors are valid hex")
    }

    const ALGORITHMS: [Algorithm; 2] = [Algorithm::Aes256Gcm, Algorithm::XChaCha20Poly1305];

    // --- Keys ---

    #[test]
    fn from_bytes_copies_then_zeroizes_the_source() {
        let mut bytes = [0x5a; 32];
        let key = SecretKey::from_bytes(&mut bytes);
        assert_eq!(bytes, [0; 32]);
        assert_eq!(key.expose(), &[0x5a; 32]);
    }

    #[test]
    fn hex_round_trip_is_lowercase_and_trims_whitespace() {
        let key = counting_key();
        let hex = key.to_hex();
        assert_eq!(
            hex.as_str(),
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        );
        let padded = format!("  {}\n", hex.to_uppercase());
        let parsed = SecretKey::from_hex(&padded).expect("64 hex digits with whitespace parse");
        assert_eq!(parsed.expose(), key.expose());
    }

    #[test]
    fn from_hex_rejects_anything_but_64_hex_characters() {
        let good = "00".repeat(32);
        for bad in [
            String::new(),
            "00".repeat(31),
            format!("{good}0"),
            format!("{good}00"),
            format!("0g{}", "00".repeat(31)),
            format!("00 {}", "00".repeat(31)),
        ] {
            assert_eq!(
                SecretKey::from_hex(&bad).map(|_| ()),
                Err(CryptoError::KeyEncoding),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().expose(),
            SecretKey::generate().expose()
        );
    }

    #[test]
    fn debug_output_contains_no_key_material() {
        let key = SecretKey::generate();
        let hex = key.to_hex();
        let bytes_debug = format!("{:?}", key.expose());
        let outputs = [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{:?}", AeadKey::new(Algorithm::Aes256Gcm, &key)),
            format!("{:#?}", AeadKey::new(Algorithm::XChaCha20Poly1305, &key)),
            format!("{:?}", Fingerprinter::new(&key)),
            format!("{:#?}", Fingerprinter::new(&key)),
        ];
        for output in &outputs {
            assert!(!output.contains(hex.as_str()), "{output}");
            assert!(!output.contains(&hex.to_uppercase()), "{output}");
            assert!(!output.contains(&bytes_debug), "{output}");
        }
        assert_eq!(outputs[0], "SecretKey([redacted])");
        assert_eq!(outputs[2], "AeadKey { algorithm: Aes256Gcm, .. }");
        assert_eq!(outputs[4], "Fingerprinter([redacted])");
    }

    // --- HKDF (RFC 5869) ---

    #[test]
    fn hkdf_matches_rfc5869_test_case_1() {
        let ikm = [0x0b; 22];
        let salt = unhex("000102030405060708090a0b0c");
        let info = unhex("f0f1f2f3f4f5f6f7f8f9");
        let mut okm = [0u8; 42];
        hkdf_sha256(&salt, &ikm, &info, &mut okm).expect("42 bytes is a valid HKDF length");
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn hkdf_matches_rfc5869_test_case_3_empty_salt_and_info() {
        let mut okm = [0u8; 42];
        hkdf_sha256(&[], &[0x0b; 22], &[], &mut okm).expect("42 bytes is a valid HKDF length");
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn hkdf_rejects_output_longer_than_255_blocks() {
        let mut okm = vec![0u8; 255 * 32 + 1];
        assert!(hkdf_sha256(HKDF_SALT, &[0; 32], b"", &mut okm).is_err());
    }

    #[test]
    fn derive_key_is_pinned_deterministic_and_separated_by_info_and_root() {
        let root = counting_key();
        let phone = derive_key(&root, b"ordervault/v1 aead phone");
        // Pinned, and checked against Python `cryptography`'s HKDF: a change of salt or
        // construction would orphan every stored ciphertext, so it must break this test.
        assert_eq!(
            phone.to_hex().as_str(),
            "e07271e8ea41d942e34f1642368f9d2815ba3f457e608dd6059b88fd8e4c3ba7"
        );
        assert_eq!(
            derive_key(&root, b"ordervault/v1 aead phone").expose(),
            phone.expose()
        );
        assert_ne!(
            derive_key(&root, b"ordervault/v1 aead email").expose(),
            phone.expose()
        );
        assert_ne!(
            derive_key(&key_from(1), b"ordervault/v1 aead phone").expose(),
            phone.expose()
        );
        // The salt is part of the construction: plain HKDF without it gives another key.
        let mut unsalted = [0u8; 32];
        hkdf_sha256(
            &[],
            root.expose(),
            b"ordervault/v1 aead phone",
            &mut unsalted,
        )
        .expect("32 bytes is a valid HKDF length");
        assert_ne!(&unsalted, phone.expose());
    }

    // --- HMAC (RFC 4231) and fingerprints ---

    fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
        hex::encode(hmac_sha256_finish(&hmac_sha256_keyed(key), message))
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_1() {
        assert_eq!(
            hmac_sha256(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_2() {
        assert_eq!(
            hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_matches_rfc4231_test_case_6_key_longer_than_a_block() {
        assert_eq!(
            hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn fingerprinter_is_hmac_sha256_reusable_and_keyed() {
        let key = counting_key();
        let fingerprinter = Fingerprinter::new(&key);
        let first = fingerprinter.fingerprint(b"+8613812345678");
        // The precomputed state is not consumed: a second call gives the same answer.
        assert_eq!(fingerprinter.fingerprint(b"+8613812345678"), first);
        assert_eq!(
            hex::encode(first),
            hmac_sha256(key.expose(), b"+8613812345678")
        );
        assert_ne!(fingerprinter.fingerprint(b"+8613812345679"), first);
        assert_ne!(
            Fingerprinter::new(&key_from(1)).fingerprint(b"+8613812345678"),
            first
        );
    }

    #[test]
    fn sha256_matches_fips_180_abc() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn block_permutation_is_aes_256_and_inverts() {
        // FIPS-197 Appendix C.3 (AES-256).
        let mut key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let p = BlockPermutation::new(&SecretKey::from_bytes(&mut key));
        let plain: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let cipher = p.forward(&plain);
        assert_eq!(hex::encode(cipher), "8ea2b7ca516745bfeafc49904b496089");
        assert_eq!(p.backward(&cipher), plain);
        assert_eq!(format!("{p:?}"), "BlockPermutation([redacted])");
    }

    #[test]
    fn random_bytes_fill_the_whole_array_and_differ() {
        let a = random_bytes::<32>();
        let b = random_bytes::<32>();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
        assert_eq!(random_bytes::<0>(), [0u8; 0]);
    }

    // --- Algorithm names and ids ---

    #[test]
    fn algorithm_ids_and_names_round_trip() {
        assert_eq!(Algorithm::Aes256Gcm.id(), 1);
        assert_eq!(Algorithm::XChaCha20Poly1305.id(), 2);
        for algorithm in ALGORITHMS {
            assert_eq!(Algorithm::from_id(algorithm.id()), Some(algorithm));
            assert_eq!(algorithm.as_str().parse(), Ok(algorithm));
            assert_eq!(algorithm.to_string(), algorithm.as_str());
        }
        assert_eq!(Algorithm::from_id(0), None);
        assert_eq!(Algorithm::from_id(3), None);
        assert_eq!(Algorithm::Aes256Gcm.as_str(), "aes256gcm");
        assert_eq!(Algorithm::XChaCha20Poly1305.as_str(), "xchacha20poly1305");
        for bad in [
            "",
            "AES256GCM",
            "aes-256-gcm",
            "chacha20poly1305",
            "aes256gcm ",
        ] {
            assert_eq!(
                bad.parse::<Algorithm>(),
                Err(CryptoError::UnknownAlgorithm),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn error_messages_carry_no_detail() {
        assert_eq!(
            CryptoError::Integrity.to_string(),
            "ciphertext failed authentication"
        );
        assert_eq!(
            CryptoError::Malformed.to_string(),
            "ciphertext envelope is malformed"
        );
        assert_eq!(
            CryptoError::UnknownAlgorithm.to_string(),
            "unknown AEAD algorithm"
        );
        assert_eq!(
            CryptoError::KeyEncoding.to_string(),
            "key is not 64 hex characters"
        );
    }

    // --- Envelope: known-answer vectors ---

    /// Key 0x00..0x1f, nonce 0x40, 0x41, ..., version 7, context "ctx", plaintext
    /// "13812345678".
    fn known_answer(algorithm: Algorithm) -> (AeadKey, Vec<u8>) {
        let nonce: Vec<u8> = (0x40..).take(algorithm.nonce_len()).collect();
        let key = AeadKey::new(algorithm, &counting_key());
        let envelope = key.seal_with_nonce(7, b"ctx", b"13812345678", &nonce);
        (key, envelope)
    }

    // Pinned once and checked against an independent implementation (Python `cryptography`,
    // with HChaCha20 written out for XChaCha20). A change of format, AAD or nonce handling
    // breaks these, as it would break every stored ciphertext.
    const KAT_AES256GCM: &str = concat!(
        "01",                               // format
        "00000007",                         // key version 7
        "01",                               // AES-256-GCM
        "404142434445464748494a4b",         // nonce
        "d38a9612140fb336fbf32f",           // ciphertext of "13812345678"
        "001b6fba4913497517c4cd7069bacf20", // tag
    );
    const KAT_XCHACHA20POLY1305: &str = concat!(
        "01",                                               // format
        "00000007",                                         // key version 7
        "02",                                               // XChaCha20-Poly1305
        "404142434445464748494a4b4c4d4e4f5051525354555657", // nonce
        "e50a3d41e2d34d23b9c3bf",                           // ciphertext of "13812345678"
        "ca8da7102745bf8d06e493bd704ac069",                 // tag
    );

    #[test]
    fn known_answer_aes256gcm() {
        let (key, envelope) = known_answer(Algorithm::Aes256Gcm);
        assert_eq!(hex::encode(&envelope), KAT_AES256GCM);
        let opened = key
            .open(b"ctx", &unhex(KAT_AES256GCM))
            .expect("the pinned vector opens");
        assert_eq!(opened.as_slice(), b"13812345678");
        assert_eq!(envelope_header(&envelope), Ok((7, Algorithm::Aes256Gcm)));
        assert_eq!(envelope.len(), 6 + 12 + 11 + 16);
    }

    #[test]
    fn known_answer_xchacha20poly1305() {
        let (key, envelope) = known_answer(Algorithm::XChaCha20Poly1305);
        assert_eq!(hex::encode(&envelope), KAT_XCHACHA20POLY1305);
        let opened = key
            .open(b"ctx", &unhex(KAT_XCHACHA20POLY1305))
            .expect("the pinned vector opens");
        assert_eq!(opened.as_slice(), b"13812345678");
        assert_eq!(
            envelope_header(&envelope),
            Ok((7, Algorithm::XChaCha20Poly1305))
        );
        assert_eq!(envelope.len(), 6 + 24 + 11 + 16);
    }

    // --- Envelope: negative vectors, each for both algorithms ---

    /// Opens the known-answer envelope of each algorithm after `alter`, with `context`.
    fn open_altered(context: &[u8], alter: impl Fn(&mut Vec<u8>)) -> Vec<Result<(), CryptoError>> {
        ALGORITHMS
            .into_iter()
            .map(|algorithm| {
                let (key, mut envelope) = known_answer(algorithm);
                alter(&mut envelope);
                key.open(context, &envelope).map(|_| ())
            })
            .collect()
    }

    #[test]
    fn unaltered_known_answer_opens() {
        assert_eq!(open_altered(b"ctx", |_| {}), [Ok(()), Ok(())]);
    }

    #[test]
    fn bad_tag_fails_integrity() {
        let result = open_altered(b"ctx", |e| *e.last_mut().expect("not empty") ^= 0x01);
        assert_eq!(
            result,
            [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
        );
    }

    #[test]
    fn flipped_ciphertext_byte_fails_integrity() {
        let result = open_altered(b"ctx", |e| {
            let first_ciphertext_byte = e.len() - TAG_LEN - 11;
            e[first_ciphertext_byte] ^= 0x80;
        });
        assert_eq!(
            result,
            [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
        );
    }

    #[test]
    fn truncated_by_one_byte_fails_integrity() {
        let result = open_altered(b"ctx", |e| {
            e.pop();
        });
        assert_eq!(
            result,
            [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
        );
    }

    #[test]
    fn truncated_to_five_bytes_is_malformed() {
        let result = open_altered(b"ctx", |e| e.truncate(5));
        assert_eq!(
            result,
            [Err(CryptoError::Malformed), Err(CryptoError::Malformed)]
        );
    }

    #[test]
    fn shorter_than_header_nonce_and_tag_is_malformed() {
        // The plaintext is 11 bytes: cutting 12 leaves less than a tag after the nonce.
        let result = open_altered(b"ctx", |e| e.truncate(e.len() - 12));
        assert_eq!(
            result,
            [Err(CryptoError::Malformed), Err(CryptoError::Malformed)]
        );
        assert_eq!(
            open_altered(b"ctx", Vec::clear),
            [Err(CryptoError::Malformed), Err(CryptoError::Malformed)]
        );
    }

    #[test]
    fn unknown_format_byte_is_malformed() {
        for format in [0x00, 0x02, 0xff] {
            let result = open_altered(b"ctx", |e| e[0] = format);
            assert_eq!(
                result,
                [Err(CryptoError::Malformed), Err(CryptoError::Malformed)]
            );
        }
    }

    #[test]
    fn changed_algorithm_byte_is_malformed() {
        for id in [0, 1, 2, 3, 0xff] {
            let result = open_altered(b"ctx", |e| {
                if e[5] != id {
                    e[5] = id;
                } else {
                    // Keep the test about a *changed* byte: swap to the other algorithm.
                    e[5] = 3 - id;
                }
            });
            assert_eq!(
                result,
                [Err(CryptoError::Malformed), Err(CryptoError::Malformed)],
                "{id}"
            );
        }
    }

    #[test]
    fn envelope_of_one_algorithm_does_not_open_with_the_other() {
        let (_, aes_envelope) = known_answer(Algorithm::Aes256Gcm);
        let chacha = AeadKey::new(Algorithm::XChaCha20Poly1305, &counting_key());
        assert_eq!(
            chacha.open(b"ctx", &aes_envelope).map(|_| ()),
            Err(CryptoError::Malformed)
        );
    }

    #[test]
    fn changed_key_version_fails_integrity_because_the_header_is_authenticated() {
        let result = open_altered(b"ctx", |e| e[4] = 8);
        assert_eq!(
            result,
            [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
        );
        let result = open_altered(b"ctx", |e| e[1] = 0x80);
        assert_eq!(
            result,
            [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
        );
    }

    #[test]
    fn wrong_context_fails_integrity() {
        for context in [&b""[..], b"ct", b"ctX", b"ctx\0", b"other row"] {
            let result = open_altered(context, |_| {});
            assert_eq!(
                result,
                [Err(CryptoError::Integrity), Err(CryptoError::Integrity)]
            );
        }
    }

    #[test]
    fn wrong_key_fails_integrity() {
        for algorithm in ALGORITHMS {
            let (_, envelope) = known_answer(algorithm);
            let other = AeadKey::new(algorithm, &key_from(0xee));
            assert_eq!(
                other.open(b"ctx", &envelope).map(|_| ()),
                Err(CryptoError::Integrity)
            );
        }
    }

    #[test]
    fn envelope_header_reads_without_a_key_and_rejects_garbage() {
        let key = AeadKey::new(Algorithm::XChaCha20Poly1305, &counting_key());
        let envelope = key.seal(0xdead_beef, b"", b"");
        assert_eq!(
            envelope_header(&envelope),
            Ok((0xdead_beef, Algorithm::XChaCha20Poly1305))
        );
        assert_eq!(&envelope[1..5], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(envelope_header(&envelope[..5]), Err(CryptoError::Malformed));
        assert_eq!(
            envelope_header(&envelope[..envelope.len() - 1]),
            Err(CryptoError::Malformed)
        );
        let mut unknown_format = envelope.clone();
        unknown_format[0] = 2;
        assert_eq!(
            envelope_header(&unknown_format),
            Err(CryptoError::Malformed)
        );
        let mut unknown_algorithm = envelope;
        unknown_algorithm[5] = 9;
        assert_eq!(
            envelope_header(&unknown_algorithm),
            Err(CryptoError::Malformed)
        );
    }

    #[test]
    fn empty_plaintext_round_trips() {
        for algorithm in ALGORITHMS {
            let key = AeadKey::new(algorithm, &counting_key());
            let envelope = key.seal(1, b"ctx", b"");
            assert_eq!(envelope.len(), HEADER_LEN + algorithm.nonce_len() + TAG_LEN);
            assert_eq!(key.open(b"ctx", &envelope).expect("opens").as_slice(), b"");
        }
    }

    #[test]
    fn two_seals_of_the_same_plaintext_differ() {
        for algorithm in ALGORITHMS {
            let key = AeadKey::new(algorithm, &counting_key());
            let a = key.seal(7, b"ctx", b"13812345678");
            let b = key.seal(7, b"ctx", b"13812345678");
            assert_ne!(a, b);
            let nonce = HEADER_LEN..HEADER_LEN + algorithm.nonce_len();
            assert_ne!(a[nonce.clone()], b[nonce]);
        }
    }

    // --- Key wrapping ---

    #[test]
    fn wrap_unwrap_round_trip() {
        let kek = counting_key();
        let dek = SecretKey::generate();
        let wrapped = wrap_key(&kek, b"dek v3", &dek);
        assert_eq!(envelope_header(&wrapped), Ok((0, Algorithm::Aes256Gcm)));
        assert_eq!(wrapped.len(), HEADER_LEN + 12 + 32 + TAG_LEN);
        let unwrapped = unwrap_key(&kek, b"dek v3", &wrapped).expect("unwraps");
        assert_eq!(unwrapped.expose(), dek.expose());
    }

    #[test]
    fn unwrap_with_wrong_kek_or_context_fails_integrity() {
        let kek = counting_key();
        let wrapped = wrap_key(&kek, b"dek v3", &key_from(9));
        assert_eq!(
            unwrap_key(&key_from(1), b"dek v3", &wrapped).map(|_| ()),
            Err(CryptoError::Integrity)
        );
        assert_eq!(
            unwrap_key(&kek, b"dek v4", &wrapped).map(|_| ()),
            Err(CryptoError::Integrity)
        );
        let mut tampered = wrapped;
        tampered[HEADER_LEN + 12] ^= 1;
        assert_eq!(
            unwrap_key(&kek, b"dek v3", &tampered).map(|_| ()),
            Err(CryptoError::Integrity)
        );
    }

    #[test]
    fn unwrap_rejects_an_envelope_that_is_not_a_32_byte_key() {
        let kek = counting_key();
        let short = AeadKey::new(Algorithm::Aes256Gcm, &kek).seal(0, b"dek v3", &[7; 31]);
        assert_eq!(
            unwrap_key(&kek, b"dek v3", &short).map(|_| ()),
            Err(CryptoError::Malformed)
        );
        let chacha = AeadKey::new(Algorithm::XChaCha20Poly1305, &kek).seal(0, b"dek v3", &[7; 32]);
        assert_eq!(
            unwrap_key(&kek, b"dek v3", &chacha).map(|_| ()),
            Err(CryptoError::Malformed)
        );
    }

    // --- Properties ---

    fn algorithm() -> impl Strategy<Value = Algorithm> {
        prop::sample::select(ALGORITHMS.to_vec())
    }

    proptest! {
        #[test]
        fn seal_open_round_trips(
            algorithm in algorithm(),
            key in any::<[u8; 32]>(),
            key_version in any::<u32>(),
            context in prop::collection::vec(any::<u8>(), 0..64),
            plaintext in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            let key = AeadKey::new(algorithm, &SecretKey::from_bytes(&mut { key }));
            let envelope = key.seal(key_version, &context, &plaintext);
            let expected_len = HEADER_LEN + algorithm.nonce_len() + plaintext.len() + TAG_LEN;
            prop_assert_eq!(envelope.len(), expected_len);
            prop_assert_eq!(envelope_header(&envelope), Ok((key_version, algorithm)));
            let opened = key.open(&context, &envelope).expect("a fresh envelope opens");
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        }

        #[test]
        fn any_flipped_bit_fails(
            algorithm in algorithm(),
            key in any::<[u8; 32]>(),
            key_version in any::<u32>(),
            context in prop::collection::vec(any::<u8>(), 0..64),
            plaintext in prop::collection::vec(any::<u8>(), 0..256),
            bit in any::<prop::sample::Index>(),
        ) {
            let key = AeadKey::new(algorithm, &SecretKey::from_bytes(&mut { key }));
            let mut envelope = key.seal(key_version, &context, &plaintext);
            let bit = bit.index(envelope.len() * 8);
            envelope[bit / 8] ^= 1 << (bit % 8);
            // The format and algorithm bytes are checked before the tag; every other byte is
            // covered by it. (Ids 1 and 2 differ in two bits, so one flip cannot swap them.)
            let expected = if bit / 8 == 0 || bit / 8 == 5 {
                CryptoError::Malformed
            } else {
                CryptoError::Integrity
            };
            prop_assert_eq!(key.open(&context, &envelope).map(|_| ()), Err(expected));
        }
    }
}
