//! Signed checkpoints of the audit log: [C2SP tlog-checkpoint] bodies in [C2SP signed notes],
//! signed with Ed25519.
//!
//! A checkpoint commits a log to its first `size` events: it is the Merkle tree head
//! (RFC 9162 §2.1.1, see `merkle`) at that size, signed by the log's key. An auditor who
//! holds the log's verifier key checks a checkpoint with [`open_checkpoint`], then checks
//! events against it with inclusion proofs and later checkpoints with consistency proofs —
//! all offline.
//!
//! # Format
//!
//! The checkpoint of eight events of the RFC 6962 test tree, signed with a test key (the
//! note the tests pin):
//!
//! ```text
//! ordervault/node-1
//! 8
//! XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=
//! time 1735689600000
//!
//! — ordervault/node-1 RXD858wKf3yYxKRp4V943np4b3KSZWh+3rkHiTfAHXEI6S+I8btLcSWtuTUUaA3+OD+yPPg95/f52d+x1gzj9clLmQ8=
//! ```
//!
//! The note text is the tlog-checkpoint body: the origin (the log's key name), the tree
//! size in decimal without leading zeros, the root hash in standard base64 (RFC 4648 §4),
//! then extension lines. ordervault writes exactly one extension line, `time <Unix ms>`, the
//! time the log signed the checkpoint as a decimal `i64` (canonical: no `+`, no leading
//! zeros), and accepts no other. tlog-checkpoint discourages extension lines because log
//! monitors cannot audit them; this one says only *when*, never *what*, and lets an auditor
//! see how stale a checkpoint is.
//!
//! A blank line follows the text, then one line per signature: an em dash (U+2014), a
//! space, the key name, a space, and base64 of the 4-byte key ID followed by the 64-byte
//! Ed25519 signature (RFC 8032) over the text, up to and including the newline that ends
//! the time line (signed-note, "Format"). The key ID is the first four bytes of
//! `SHA-256(key name || 0x0A || 0x01 || public key)`, and the verifier key an auditor is
//! given is `<name>+<key ID hex>+<base64(0x01 || public key)>`, both as
//! golang.org/x/mod/sumdb/note computes them, so Go's note package verifies these notes too.
//!
//! # Key names
//!
//! signed-note forbids empty key names, Unicode spaces and `+`. A log's key name here is also
//! its checkpoints' origin, and ordervault further keeps it to printable ASCII, so a name
//! reads the same in every terminal and has no look-alikes. Signature lines from other keys
//! (say, witnesses cosigning a checkpoint) are held only to the signed-note rule, and ignored.
//!
//! [C2SP tlog-checkpoint]: https://c2sp.org/tlog-checkpoint
//! [C2SP signed notes]: https://c2sp.org/signed-note

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::crypto::{self, SecretKey};
use crate::merkle::Hash;

/// The signature type byte of Ed25519 in key IDs and verifier keys (signed-note, "Signature
/// types").
const ED25519_TYPE: u8 = 0x01;

/// What starts every signature line: an em dash (U+2014) and a space (signed-note, "Format").
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// The extension line carrying the signing time starts with this.
const TIME_PREFIX: &str = "time ";

/// The most signature lines a note may carry; past this it is refused before any
/// signature is checked. signed-note asks verifiers to accept at least 16; Go's note
/// package stops at 100, as this does.
const MAX_SIGNATURES: usize = 100;

/// A key ID: the first four bytes of `SHA-256(name || 0x0A || type || public key)`
/// (signed-note, "Signatures").
type KeyId = [u8; 4];

/// A tree head of one log: what a signed checkpoint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, which is also its signing key's name (e.g. `ordervault/node-1`).
    pub origin: String,
    /// Number of events in the log (the tree size).
    pub size: u64,
    /// The Merkle tree head over the first `size` events (RFC 9162 §2.1.1).
    pub root: Hash,
    /// When the log signed the checkpoint, Unix milliseconds (the `time` extension line).
    pub timestamp_ms: i64,
}

impl Checkpoint {
    /// The note text: origin, size, root, time, each ending in a newline (tlog-checkpoint,
    /// "Note text"). The origin must already be a valid key name.
    fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n{TIME_PREFIX}{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root),
            self.timestamp_ms
        )
    }

    /// Parses note text written by [`Checkpoint::body`], and nothing looser.
    fn parse_body(text: &str) -> Result<Checkpoint, CheckpointError> {
        let lines: Vec<&str> = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::Malformed(
                "checkpoint text does not end in a newline",
            ))?
            .split('\n')
            .collect();
        if lines.iter().any(|line| line.is_empty()) {
            return Err(CheckpointError::Malformed("checkpoint has an empty line"));
        }
        let [origin, size, root, extensions @ ..] = lines.as_slice() else {
            return Err(CheckpointError::Malformed(
                "checkpoint has fewer than three lines",
            ));
        };
        let size = parse_canonical::<u64>(size).ok_or(CheckpointError::Malformed(
            "tree size is not a decimal number without leading zeros",
        ))?;
        let root = BASE64
            .decode(root)
            .ok()
            .and_then(|bytes| Hash::try_from(bytes).ok())
            .ok_or(CheckpointError::Malformed(
                "root hash is not 32 bytes in standard base64",
            ))?;
        let [time] = extensions else {
            return Err(CheckpointError::Malformed(
                "checkpoint needs exactly one extension line, the time",
            ));
        };
        let timestamp_ms = time
            .strip_prefix(TIME_PREFIX)
            .ok_or(CheckpointError::Malformed(
                "extension line is not a time line",
            ))
            .and_then(|ms| {
                parse_canonical::<i64>(ms).ok_or(CheckpointError::Malformed(
                    "time is not a decimal number of milliseconds",
                ))
            })?;
        Ok(Checkpoint {
            origin: (*origin).to_owned(),
            size,
            root,
            timestamp_ms,
        })
    }
}

/// The log's signing key and its name.
///
/// The Ed25519 private key is the 32-byte seed of RFC 8032 §5.1.5, kept by the caller in a
/// [`SecretKey`] (stored wrapped by the master key). The copy held here is wiped on drop
/// (`ed25519-dalek`'s default `zeroize` feature); `Debug` prints only the name and the key
/// ID.
pub struct LogSigner {
    name: String,
    key_id: KeyId,
    key: SigningKey,
}

impl LogSigner {
    /// The signer named `name` (the note key name, which is also the origin of the
    /// checkpoints it signs, e.g. `ordervault/node-1`) with the Ed25519 key from `seed`.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::InvalidKeyName`] unless `name` is non-empty printable ASCII
    /// without spaces or `+`.
    pub fn from_seed(name: &str, seed: &SecretKey) -> Result<LogSigner, CheckpointError> {
        if !is_log_key_name(name) {
            return Err(CheckpointError::InvalidKeyName);
        }
        let key = SigningKey::from_bytes(seed.expose());
        Ok(LogSigner {
            name: name.to_owned(),
            key_id: key_id(name, key.verifying_key().as_bytes()),
            key,
        })
    }

    /// The key name, which is the origin of this log's checkpoints.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The note verifier key an auditor needs to check this log's checkpoints:
    /// `<name>+<key ID as 8 hex digits>+<base64(0x01 || public key)>` (signed-note).
    pub fn verifier_key(&self) -> String {
        self.verifier().to_string()
    }

    /// The verifier of this log's checkpoints.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// Signs `checkpoint` and returns the whole signed note: the checkpoint text, a blank
    /// line and one signature line.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::OriginMismatch`] if the checkpoint's origin is not this signer's
    /// name: a log signs only its own checkpoints.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<String, CheckpointError> {
        if checkpoint.origin != self.name {
            return Err(CheckpointError::OriginMismatch);
        }
        Ok(self.sign_note(checkpoint.body()))
    }

    /// Signs note `text` (ending in a newline, without control characters) and appends the
    /// separating blank line and the signature line (signed-note, "Format").
    fn sign_note(&self, text: String) -> String {
        let signature = self.key.sign(text.as_bytes());
        let mut blob = Vec::with_capacity(4 + Signature::BYTE_SIZE);
        blob.extend_from_slice(&self.key_id);
        blob.extend_from_slice(&signature.to_bytes());
        let mut note = text;
        note.push('\n');
        note.push_str(SIGNATURE_PREFIX);
        note.push_str(&self.name);
        note.push(' ');
        note.push_str(&BASE64.encode(blob));
        note.push('\n');
        note
    }
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("name", &self.name)
            .field("key_id", &hex::encode(self.key_id))
            .finish_non_exhaustive()
    }
}

/// The public key of one log, as an auditor holds it: checks that log's signed notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_id: KeyId,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a note verifier key, `<name>+<key ID as 8 hex digits>+<base64(0x01 || Ed25519
    /// public key)>`, as [`LogSigner::verifier_key`] writes it. Surrounding whitespace (a
    /// key file's final newline) is not trimmed here.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Malformed`] if the text is not of that form, the name is not a log
    /// key name, the key is not Ed25519 or not a valid (or a weak, small-order) point, or the
    /// key ID does not match the name and key.
    pub fn parse(verifier_key: &str) -> Result<NoteVerifier, CheckpointError> {
        // The name holds no `+` and the hex ID none either, so the first two `+` split the
        // parts; base64 may contain `+`.
        let (name, rest) = verifier_key
            .split_once('+')
            .ok_or(CheckpointError::Malformed("verifier key has no '+'"))?;
        let (id_hex, key_base64) = rest.split_once('+').ok_or(CheckpointError::Malformed(
            "verifier key has fewer than three parts",
        ))?;
        if !is_log_key_name(name) {
            return Err(CheckpointError::Malformed(
                "verifier key name is not printable ASCII without spaces or '+'",
            ));
        }
        let mut key_id = KeyId::default();
        hex::decode_to_slice(id_hex, &mut key_id).map_err(|_| {
            CheckpointError::Malformed("verifier key ID is not 8 hexadecimal digits")
        })?;
        let encoded = BASE64
            .decode(key_base64)
            .map_err(|_| CheckpointError::Malformed("verifier key is not base64"))?;
        let Some((&ED25519_TYPE, public)) = encoded.split_first() else {
            return Err(CheckpointError::Malformed(
                "verifier key is not an Ed25519 key",
            ));
        };
        let public: &[u8; 32] = public.try_into().map_err(|_| {
            CheckpointError::Malformed("verifier key is not a 32-byte Ed25519 public key")
        })?;
        let key = VerifyingKey::from_bytes(public)
            .ok()
            .filter(|key| !key.is_weak())
            .ok_or(CheckpointError::Malformed(
                "verifier key is not a valid Ed25519 public key",
            ))?;
        if key_id != self::key_id(name, public) {
            return Err(CheckpointError::Malformed(
                "verifier key ID does not match its name and key",
            ));
        }
        Ok(NoteVerifier {
            name: name.to_owned(),
            key_id,
            key,
        })
    }

    /// The key name: the origin this verifier accepts checkpoints for.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Writes the verifier key that [`NoteVerifier::parse`] reads.
impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut encoded = Vec::with_capacity(33);
        encoded.push(ED25519_TYPE);
        encoded.extend_from_slice(self.key.as_bytes());
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.key_id),
            BASE64.encode(encoded)
        )
    }
}

/// Parses and verifies a signed checkpoint note against `verifier` and returns the
/// checkpoint.
///
/// The note must be well-formed (signed-note, "Format"), carry at least one signature from
/// the verifier's key (name and key ID) and no failing one from it, and its origin must be
/// the key's name. Signatures from other keys, such as witness cosignatures, are ignored, as
/// signed-note requires. The text is parsed only after its signature has verified.
///
/// A note read as bytes must be UTF-8 (signed-note, "Format") to become a `&str`; treat a
/// failed conversion as malformed.
///
/// # Errors
///
/// * [`CheckpointError::Malformed`] if the note or the checkpoint in it is not well-formed.
/// * [`CheckpointError::UnknownKey`] if no signature line is from the verifier's key.
/// * [`CheckpointError::BadSignature`] if a signature line from the verifier's key fails.
/// * [`CheckpointError::WrongOrigin`] if the signed checkpoint names another log.
pub fn open_checkpoint(note: &str, verifier: &NoteVerifier) -> Result<Checkpoint, CheckpointError> {
    let text = open_note(note, verifier)?;
    let checkpoint = Checkpoint::parse_body(text)?;
    if checkpoint.origin != verifier.name {
        return Err(CheckpointError::WrongOrigin);
    }
    Ok(checkpoint)
}

/// Splits a signed note into text and signature lines, checks every signature from
/// `verifier`'s key, and returns the text (with its final newline) if at least one did.
fn open_note<'n>(note: &'n str, verifier: &NoteVerifier) -> Result<&'n str, CheckpointError> {
    // signed-note, "Format": UTF-8 (a `&str` already is) without ASCII control characters
    // other than newline.
    if note.bytes().any(|b| b < 0x20 && b != b'\n') {
        return Err(CheckpointError::Malformed(
            "note contains a control character",
        ));
    }
    // "the text is separated from the signatures by the last empty line in the note".
    let split = note.rfind("\n\n").ok_or(CheckpointError::Malformed(
        "no blank line between the text and the signatures",
    ))?;
    let (text, signatures) = (&note[..=split], &note[split + 2..]);
    if signatures.is_empty() {
        return Err(CheckpointError::Malformed("note has no signature lines"));
    }
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or(CheckpointError::Malformed(
            "signature lines do not end in a newline",
        ))?;

    // Read every line before checking any signature, so a malformed note is refused as
    // malformed whatever its signatures say, and an oversized one costs no verification.
    let lines: Vec<&str> = signatures.split('\n').collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(CheckpointError::Malformed("note has too many signatures"));
    }
    let mut ours = Vec::new();
    for line in lines {
        let (name, signature) = line
            .strip_prefix(SIGNATURE_PREFIX)
            .and_then(|line| line.split_once(' '))
            .ok_or(CheckpointError::Malformed(
                "signature line is not an em dash, a space, a key name, a space and a signature",
            ))?;
        if !is_note_key_name(name) {
            return Err(CheckpointError::Malformed(
                "signature line has an invalid key name",
            ));
        }
        let blob = BASE64
            .decode(signature)
            .map_err(|_| CheckpointError::Malformed("signature is not standard base64"))?;
        let Some((id, signature)) = blob.split_first_chunk::<4>() else {
            return Err(CheckpointError::Malformed(
                "signature is shorter than a key ID",
            ));
        };
        if signature.is_empty() {
            return Err(CheckpointError::Malformed("signature is empty"));
        }
        // "Verifiers MUST ignore signatures from unknown keys, even if they share a name or
        // ID (but not both) with a known key."
        if name == verifier.name && *id == verifier.key_id {
            ours.push(signature.to_vec());
        }
    }
    if ours.is_empty() {
        return Err(CheckpointError::UnknownKey);
    }
    // "If a signature from a known key fails to verify, clients SHOULD reject the whole
    // note": every one from this key must verify, and one of the wrong length fails.
    // `verify_strict` also refuses small-order points and non-canonical scalars, which no
    // honest signer produces.
    for signature in ours {
        let signature =
            Signature::from_slice(&signature).map_err(|_| CheckpointError::BadSignature)?;
        verifier
            .key
            .verify_strict(text.as_bytes(), &signature)
            .map_err(|_| CheckpointError::BadSignature)?;
    }
    Ok(text)
}

/// The key ID of an Ed25519 key: `SHA-256(name || 0x0A || 0x01 || public key)[..4]`
/// (signed-note, "Ed25519 signatures").
fn key_id(name: &str, public_key: &[u8; 32]) -> KeyId {
    let mut preimage = Vec::with_capacity(name.len() + 2 + public_key.len());
    preimage.extend_from_slice(name.as_bytes());
    preimage.push(b'\n');
    preimage.push(ED25519_TYPE);
    preimage.extend_from_slice(public_key);
    let digest = crypto::sha256(&preimage);
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A key name by signed-note's rule: non-empty, no Unicode spaces, no `+`.
fn is_note_key_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

/// A log's key name (and checkpoint origin) by ordervault's stricter rule: non-empty
/// printable ASCII without spaces or `+`. Every such name is also a signed-note key name.
fn is_log_key_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b'+')
}

/// Parses a decimal number written the one way `Display` writes it: no sign for positive
/// numbers, no leading zeros, no whitespace. So each checkpoint has exactly one text.
fn parse_canonical<T: std::str::FromStr + ToString>(text: &str) -> Option<T> {
    let value = text.parse::<T>().ok()?;
    (value.to_string() == text).then_some(value)
}

/// Why a signer could not be built, a checkpoint could not be signed, or a signed
/// checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A log's key name is empty or has a character other than printable ASCII, or a space
    /// or `+`. A configuration mistake: name the log like `ordervault/node-1`.
    #[error("log key name must be printable ASCII without spaces or '+'")]
    InvalidKeyName,
    /// [`LogSigner::sign`] was given a checkpoint whose origin is not the signer's name. A
    /// caller mistake: a log signs only its own checkpoints.
    #[error("checkpoint origin is not the signer's key name")]
    OriginMismatch,
    /// The note, the checkpoint in it, or a verifier key is not well-formed; the text says
    /// what is wrong. Corrupt or hostile input: do not retry, keep it as evidence.
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    /// No signature line is from the verifier's key (same name and key ID). The note was
    /// signed by another key — another log's, a rotated one, or a forger's. Check that the
    /// verifier key is the log's current one; otherwise reject the note.
    #[error("checkpoint has no signature from the expected key")]
    UnknownKey,
    /// A signature line from the verifier's key does not verify: the note was altered after
    /// signing, or forged. Reject it and report it as tampering.
    #[error("checkpoint signature does not verify")]
    BadSignature,
    /// The signature verifies, but the checkpoint's origin is not the key's name: the log's
    /// key signed a checkpoint for another log, which ordervault never does. Reject it and
    /// report it.
    #[error("checkpoint origin is not the verifier's key name")]
    WrongOrigin,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle;
    use proptest::prelude::*;

    /// The Ed25519 seed 0x00, 0x01, ..., 0x1f.
    fn counting_seed() -> SecretKey {
        let mut bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
        SecretKey::from_bytes(&mut bytes)
    }

    fn seed(byte: u8) -> SecretKey {
        SecretKey::from_bytes(&mut [byte; 32])
    }

    const ORIGIN: &str = "ordervault/node-1";

    fn signer() -> LogSigner {
        LogSigner::from_seed(ORIGIN, &counting_seed()).expect("valid name")
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: ORIGIN.to_owned(),
            size: 8,
            // The root of the RFC 6962 test tree of eight leaves (see `merkle`'s tests).
            root: hex::decode("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
                .expect("hex")
                .try_into()
                .expect("32 bytes"),
            timestamp_ms: 1_735_689_600_000,
        }
    }

    fn malformed(reason: &'static str) -> Result<Checkpoint, CheckpointError> {
        Err(CheckpointError::Malformed(reason))
    }

    // --- The Go note package's published vectors ---
    //
    // From golang.org/x/mod, sumdb/note/note_test.go (TestNewSigner, TestSign, TestOpen):
    // the private key is "PRIVATE+KEY+PeterNeumann+c74f20a3+" followed by base64(0x01 ||
    // Ed25519 seed).

    const PETER_SKEY_BLOB: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    fn peter() -> LogSigner {
        let blob = BASE64.decode(PETER_SKEY_BLOB).expect("base64");
        assert_eq!(blob[0], ED25519_TYPE);
        let mut seed: [u8; 32] = blob[1..].try_into().expect("32-byte seed");
        LogSigner::from_seed("PeterNeumann", &SecretKey::from_bytes(&mut seed)).expect("name")
    }

    fn verifier(key: &str) -> NoteVerifier {
        NoteVerifier::parse(key).expect("valid verifier key")
    }

    #[test]
    fn go_vector_verifier_key_and_key_id() {
        let peter = peter();
        assert_eq!(peter.verifier_key(), PETER_VKEY);
        assert_eq!(
            format!("{peter:?}"),
            r#"LogSigner { name: "PeterNeumann", key_id: "c74f20a3", .. }"#
        );
        assert_eq!(verifier(PETER_VKEY), peter.verifier());
        assert_eq!(verifier(PETER_VKEY).to_string(), PETER_VKEY);
        assert_eq!(verifier(ENOCH_VKEY).name(), "EnochRoot");
    }

    #[test]
    fn go_vector_signed_note() {
        let note = peter().sign_note(GO_TEXT.to_owned());
        assert_eq!(note, format!("{GO_TEXT}\n{PETER_SIG}"));
    }

    #[test]
    fn go_vector_open() {
        let (peter, enoch) = (verifier(PETER_VKEY), verifier(ENOCH_VKEY));
        let both = format!("{GO_TEXT}\n{PETER_SIG}{ENOCH_SIG}");
        assert_eq!(open_note(&both, &peter), Ok(GO_TEXT));
        assert_eq!(open_note(&both, &enoch), Ok(GO_TEXT));
        let duplicated = format!("{GO_TEXT}\n{PETER_SIG}{PETER_SIG}{ENOCH_SIG}{ENOCH_SIG}");
        assert_eq!(open_note(&duplicated, &peter), Ok(GO_TEXT));

        // A signature with four characters spliced in, from the known key.
        let spliced = format!("{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
        assert_eq!(
            open_note(&format!("{GO_TEXT}\n{spliced}"), &peter),
            Err(CheckpointError::BadSignature)
        );
        // The same from an unknown key is ignored.
        let spliced_enoch = format!("{}ABCD{}", &ENOCH_SIG[..60], &ENOCH_SIG[60..]);
        assert_eq!(
            open_note(&format!("{GO_TEXT}\n{PETER_SIG}{spliced_enoch}"), &peter),
            Ok(GO_TEXT)
        );

        // Only unknown keys: another name, or the right name with another key ID.
        assert_eq!(
            open_note(&format!("{GO_TEXT}\n{ENOCH_SIG}"), &peter),
            Err(CheckpointError::UnknownKey)
        );
        let misnamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego");
        assert_eq!(
            open_note(&format!("{GO_TEXT}\n{misnamed}"), &peter),
            Err(CheckpointError::UnknownKey)
        );
        let wrong_id = PETER_SIG.replace("x08g", "xxxx");
        assert_eq!(
            open_note(&format!("{GO_TEXT}\n{wrong_id}"), &peter),
            Err(CheckpointError::UnknownKey)
        );

        let too_many = format!("{GO_TEXT}\n{}", PETER_SIG.repeat(101));
        assert_eq!(
            open_note(&too_many, &peter),
            Err(CheckpointError::Malformed("note has too many signatures"))
        );
        // At the limit: 99 unknown signatures (not checked, so this stays fast) and one known.
        let hundred = format!("{GO_TEXT}\n{}{PETER_SIG}", ENOCH_SIG.repeat(99));
        assert_eq!(open_note(&hundred, &peter), Ok(GO_TEXT));
        // signed-note: verifiers "MUST accept at least up to 16 signatures".
        let sixteen = format!("{GO_TEXT}\n{}", PETER_SIG.repeat(16));
        assert_eq!(open_note(&sixteen, &peter), Ok(GO_TEXT));
    }

    #[test]
    fn go_vector_malformed_notes() {
        let peter = verifier(PETER_VKEY);
        let no_newline = &PETER_SIG[..PETER_SIG.len() - 1];
        let cases = [
            (
                GO_TEXT.to_owned(),
                "no blank line between the text and the signatures",
            ),
            (format!("{GO_TEXT}\n"), "note has no signature lines"),
            (
                format!("{GO_TEXT}\n{no_newline}"),
                "signature lines do not end in a newline",
            ),
            (
                format!("\x01{GO_TEXT}\n{PETER_SIG}"),
                "note contains a control character",
            ),
            (
                format!(
                    "{GO_TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
                ),
                "signature is not standard base64",
            ),
            (
                format!("{GO_TEXT}\n{PETER_SIG}Unexpected line.\n"),
                "signature line is not an em dash, a space, a key name, a space and a signature",
            ),
        ];
        for (note, reason) in cases {
            assert_eq!(
                open_note(&note, &peter),
                Err(CheckpointError::Malformed(reason)),
                "{note:?}"
            );
        }
    }

    #[test]
    fn go_vector_mangled_verifier_keys_are_refused() {
        // Every proper substring and every single-byte increment, as Go's TestNewVerifier.
        let bytes = PETER_VKEY.as_bytes();
        for i in 0..=bytes.len() {
            for j in i + 1..=bytes.len() {
                if (i, j) != (0, bytes.len()) {
                    let key = &PETER_VKEY[i..j];
                    assert!(NoteVerifier::parse(key).is_err(), "{key}");
                }
            }
        }
        for i in 0..bytes.len() {
            let mut mangled = bytes.to_vec();
            mangled[i] += 1;
            let key = String::from_utf8(mangled).expect("still ASCII");
            assert!(
                matches!(
                    NoteVerifier::parse(&key),
                    Err(CheckpointError::Malformed(_))
                ),
                "{key}"
            );
        }
        // A key of the wrong length and a key of an unknown type, each with a key ID that
        // matches its (wrong) bytes.
        assert_eq!(
            NoteVerifier::parse(
                "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
            ),
            // Go's decoder allows the non-zero trailing bits of "EY=="; the standard one here
            // does not, so this fails a step earlier than in Go.
            Err(CheckpointError::Malformed("verifier key is not base64"))
        );
        assert_eq!(
            NoteVerifier::parse(
                "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
            ),
            Err(CheckpointError::Malformed(
                "verifier key is not an Ed25519 key"
            ))
        );
    }

    // --- ordervault checkpoints ---

    #[test]
    fn sign_and_open_round_trip() {
        let signer = signer();
        let verifier = NoteVerifier::parse(&signer.verifier_key()).expect("parses");
        assert_eq!(verifier.name(), ORIGIN);
        for cp in [
            checkpoint(),
            Checkpoint {
                size: 0,
                root: merkle::empty_root(),
                timestamp_ms: 0,
                ..checkpoint()
            },
            Checkpoint {
                size: u64::MAX,
                root: [0xff; 32],
                timestamp_ms: i64::MIN,
                ..checkpoint()
            },
        ] {
            let note = signer.sign(&cp).expect("own origin");
            assert_eq!(open_checkpoint(&note, &verifier), Ok(cp));
        }
    }

    #[test]
    fn verifier_key_layout() {
        let signer = signer();
        let key = signer.verifier_key();
        let parts: Vec<&str> = key.splitn(3, '+').collect();
        assert_eq!(parts[0], ORIGIN);
        let encoded = BASE64.decode(parts[2]).expect("base64");
        assert_eq!(encoded.len(), 33);
        assert_eq!(encoded[0], 0x01);
        // The key ID, computed here without the module's helper.
        let mut preimage = format!("{ORIGIN}\n").into_bytes();
        preimage.extend_from_slice(&encoded);
        let digest = crypto::sha256(&preimage);
        assert_eq!(parts[1], hex::encode(&digest[..4]));
        let parsed = NoteVerifier::parse(&key).expect("parses");
        assert_eq!(parsed.to_string(), key);
        assert_eq!(parsed, signer.verifier());
        // Go accepts the key ID in either case; so does this.
        let upper = format!("{}+{}+{}", parts[0], parts[1].to_uppercase(), parts[2]);
        assert_eq!(NoteVerifier::parse(&upper), Ok(parsed));
    }

    /// The signed note of [`checkpoint`] under the counting seed, pinned. Computed
    /// independently with Python's `cryptography` (Ed25519, RFC 8032) and `hashlib` from the
    /// signed-note and tlog-checkpoint texts; the same script reproduces the Go vectors above.
    const PINNED_VERIFIER_KEY: &str =
        "ordervault/node-1+4570fce7+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4";
    const PINNED_NOTE: &str = "ordervault/node-1\n\
        8\n\
        XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\
        time 1735689600000\n\
        \n\
        \u{2014} ordervault/node-1 RXD858wKf3yYxKRp4V943np4b3KSZWh+3rkHiTfAHXEI6S+I8btLcSWtuTUUaA3+OD+yPPg95/f52d+x1gzj9clLmQ8=\n";

    #[test]
    fn note_layout_is_pinned() {
        let signer = signer();
        assert_eq!(signer.verifier_key(), PINNED_VERIFIER_KEY);
        let note = signer.sign(&checkpoint()).expect("own origin");
        assert_eq!(note, PINNED_NOTE);
        let verifier = NoteVerifier::parse(PINNED_VERIFIER_KEY).expect("parses");
        assert_eq!(open_checkpoint(PINNED_NOTE, &verifier), Ok(checkpoint()));
    }

    #[test]
    fn debug_shows_name_and_key_id_only() {
        let signer = signer();
        let debug = format!("{signer:?}");
        let key_id = &signer.verifier_key()[ORIGIN.len() + 1..ORIGIN.len() + 9];
        assert_eq!(
            debug,
            format!(r#"LogSigner {{ name: "ordervault/node-1", key_id: "{key_id}", .. }}"#)
        );
        assert!(!debug.contains("000102"));
    }

    #[test]
    fn names_outside_printable_ascii_are_refused() {
        for name in [
            "",
            "ordervault/nöde-1",
            "ordervault/node-1\n",
            "ordervault\nnode-1",
            "ordervault node-1",
            "ordervault/node-1\t",
            "ordervault+node-1",
            "\u{2014}",
            "ordervault/node\u{7f}",
        ] {
            assert_eq!(
                LogSigner::from_seed(name, &counting_seed()).map(|_| ()),
                Err(CheckpointError::InvalidKeyName),
                "{name:?}"
            );
        }
        assert!(LogSigner::from_seed("a", &counting_seed()).is_ok());
        assert!(
            LogSigner::from_seed(
                "example.com/log~!\"#$%&'()*,-./:;<=>?@[\\]^_`{|}",
                &counting_seed()
            )
            .is_ok()
        );
    }

    #[test]
    fn signing_another_logs_checkpoint_is_refused() {
        let cp = Checkpoint {
            origin: "ordervault/node-2".to_owned(),
            ..checkpoint()
        };
        assert_eq!(signer().sign(&cp), Err(CheckpointError::OriginMismatch));
        let cp = Checkpoint {
            origin: format!("{ORIGIN}\n8"),
            ..checkpoint()
        };
        assert_eq!(signer().sign(&cp), Err(CheckpointError::OriginMismatch));
    }

    /// Replaces the first occurrence of `from` in the note's text part.
    fn tamper(note: &str, from: &str, to: &str) -> String {
        let (text, signatures) = note.split_once("\n\n").expect("blank line");
        assert!(text.contains(from), "{from:?} not in {text:?}");
        format!("{}\n\n{signatures}", text.replacen(from, to, 1))
    }

    #[test]
    fn tampered_checkpoints_are_refused() {
        let signer = signer();
        let verifier = signer.verifier();
        let note = signer.sign(&checkpoint()).expect("own origin");
        let root = BASE64.encode(checkpoint().root);
        let mut other_root = checkpoint().root;
        other_root[31] ^= 1;
        for tampered in [
            tamper(&note, "\n8\n", "\n9\n"),
            tamper(&note, "\n8\n", "\n80\n"),
            tamper(&note, &root, &BASE64.encode(other_root)),
            tamper(&note, "time 1735689600000", "time 1735689600001"),
            tamper(&note, "ordervault/node-1\n", "ordervault/node-2\n"),
        ] {
            assert_eq!(
                open_checkpoint(&tampered, &verifier),
                Err(CheckpointError::BadSignature),
                "{tampered}"
            );
        }
    }

    #[test]
    fn a_signature_from_another_key_is_refused() {
        let verifier = signer().verifier();
        let impostor = LogSigner::from_seed(ORIGIN, &seed(7)).expect("name");
        let forged = impostor.sign(&checkpoint()).expect("own origin");
        assert_eq!(
            open_checkpoint(&forged, &verifier),
            Err(CheckpointError::UnknownKey)
        );
        // The impostor's signature relabelled with the real key ID: the key is known, so the
        // signature is checked, and fails.
        let (text, line) = forged.split_once("\n\n").expect("blank line");
        let encoded = line.trim_end().rsplit_once(' ').expect("signature").1;
        let mut blob = BASE64.decode(encoded).expect("base64");
        blob[..4].copy_from_slice(&verifier.key_id);
        let relabelled = format!("{text}\n\n\u{2014} {ORIGIN} {}\n", BASE64.encode(&blob));
        assert_eq!(
            open_checkpoint(&relabelled, &verifier),
            Err(CheckpointError::BadSignature)
        );
        // A verifier for another name does not accept this log's checkpoints.
        let other = LogSigner::from_seed("ordervault/node-2", &counting_seed()).expect("name");
        let note = signer().sign(&checkpoint()).expect("own origin");
        assert_eq!(
            open_checkpoint(&note, &other.verifier()),
            Err(CheckpointError::UnknownKey)
        );
    }

    #[test]
    fn truncated_or_missing_signatures_are_refused() {
        let signer = signer();
        let verifier = signer.verifier();
        let note = signer.sign(&checkpoint()).expect("own origin");
        let (text, line) = note.split_once("\n\n").expect("blank line");
        let encoded = line.trim_end().rsplit_once(' ').expect("signature").1;
        let with_signature = |encoded: &str| format!("{text}\n\n\u{2014} {ORIGIN} {encoded}\n");
        let blob = BASE64.decode(encoded).expect("base64");

        // Shorter by whole bytes: still base64, still our key ID, not a signature.
        for len in [67, 36, 5] {
            assert_eq!(
                open_checkpoint(&with_signature(&BASE64.encode(&blob[..len])), &verifier),
                Err(CheckpointError::BadSignature),
                "{len} bytes"
            );
        }
        // A longer blob is not a signature either.
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(
            open_checkpoint(&with_signature(&BASE64.encode(&longer)), &verifier),
            Err(CheckpointError::BadSignature)
        );
        // Cut mid-character: not base64 any more.
        assert_eq!(
            open_checkpoint(&with_signature(&encoded[..encoded.len() - 1]), &verifier),
            malformed("signature is not standard base64")
        );
        assert_eq!(
            open_checkpoint(&with_signature(&BASE64.encode(&blob[..4])), &verifier),
            malformed("signature is empty")
        );
        assert_eq!(
            open_checkpoint(&with_signature(&BASE64.encode(&blob[..3])), &verifier),
            malformed("signature is shorter than a key ID")
        );
        assert_eq!(
            open_checkpoint(&with_signature(""), &verifier),
            malformed("signature is shorter than a key ID")
        );
        // No signature line at all.
        assert_eq!(
            open_checkpoint(&format!("{text}\n\n"), &verifier),
            malformed("note has no signature lines")
        );
    }

    #[test]
    fn a_missing_blank_line_is_refused() {
        let signer = signer();
        let note = signer.sign(&checkpoint()).expect("own origin");
        let joined = note.replacen("\n\n", "\n", 1);
        assert_eq!(
            open_checkpoint(&joined, &signer.verifier()),
            malformed("no blank line between the text and the signatures")
        );
        let crlf = note.replace('\n', "\r\n");
        assert_eq!(
            open_checkpoint(&crlf, &signer.verifier()),
            malformed("note contains a control character")
        );
    }

    #[test]
    fn cosignatures_from_other_keys_are_ignored() {
        let signer = signer();
        let note = signer.sign(&checkpoint()).expect("own origin");
        let witness = LogSigner::from_seed("witness.example/w1", &seed(9)).expect("name");
        let text = note.split_once("\n\n").expect("blank line").0;
        let cosigned = witness.sign_note(format!("{text}\n"));
        let cosignature = cosigned.split_once("\n\n").expect("blank line").1;
        for both in [
            format!("{note}{cosignature}"),
            format!(
                "{text}\n\n{cosignature}{}",
                note.split_once("\n\n").expect("blank").1
            ),
        ] {
            assert_eq!(open_checkpoint(&both, &signer.verifier()), Ok(checkpoint()));
        }
        // A witness with a Unicode name: allowed by signed-note, so ignored, not refused.
        let unicode = cosignature.replace("witness.example/w1", "témoin.example");
        assert_eq!(
            open_checkpoint(&format!("{note}{unicode}"), &signer.verifier()),
            Ok(checkpoint())
        );
        // Only the witness: the log's own signature is required.
        assert_eq!(
            open_checkpoint(&cosigned, &signer.verifier()),
            Err(CheckpointError::UnknownKey)
        );
        // A failing signature from the log's key spoils the note even next to a good one.
        let line = note.split_once("\n\n").expect("blank line").1;
        let middle = line.len() / 2 + 20;
        let flipped = if &line[middle..=middle] == "A" {
            "B"
        } else {
            "A"
        };
        let mut bad_line = line.to_owned();
        bad_line.replace_range(middle..=middle, flipped);
        for both in [
            format!("{note}{bad_line}"),
            format!("{text}\n\n{bad_line}{line}"),
        ] {
            assert_eq!(
                open_checkpoint(&both, &signer.verifier()),
                Err(CheckpointError::BadSignature)
            );
        }
    }

    #[test]
    fn a_valid_signature_over_another_origin_is_refused() {
        // The log's key signing a checkpoint that names another log: ordervault never does
        // (`sign` refuses), so only a key used elsewhere could produce one.
        let signer = signer();
        let other = Checkpoint {
            origin: "ordervault/node-2".to_owned(),
            ..checkpoint()
        };
        let note = signer.sign_note(other.body());
        assert_eq!(
            open_checkpoint(&note, &signer.verifier()),
            Err(CheckpointError::WrongOrigin)
        );
    }

    #[test]
    fn signed_but_malformed_bodies_are_refused() {
        let signer = signer();
        let root = BASE64.encode(checkpoint().root);
        let cases: [(String, &'static str); 16] = [
            (
                format!("{ORIGIN}\n8\n{root}\n"),
                "checkpoint needs exactly one extension line, the time",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime 1\ntime 2\n"),
                "checkpoint needs exactly one extension line, the time",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\nextension\n"),
                "extension line is not a time line",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime\n"),
                "extension line is not a time line",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime 01\n"),
                "time is not a decimal number of milliseconds",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime +1\n"),
                "time is not a decimal number of milliseconds",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime -0\n"),
                "time is not a decimal number of milliseconds",
            ),
            (
                format!("{ORIGIN}\n8\n{root}\ntime 1.5\n"),
                "time is not a decimal number of milliseconds",
            ),
            (
                format!("{ORIGIN}\n08\n{root}\ntime 1\n"),
                "tree size is not a decimal number without leading zeros",
            ),
            (
                format!("{ORIGIN}\n+8\n{root}\ntime 1\n"),
                "tree size is not a decimal number without leading zeros",
            ),
            (
                format!("{ORIGIN}\n-1\n{root}\ntime 1\n"),
                "tree size is not a decimal number without leading zeros",
            ),
            (
                format!("{ORIGIN}\n18446744073709551616\n{root}\ntime 1\n"),
                "tree size is not a decimal number without leading zeros",
            ),
            (
                format!("{ORIGIN}\n8\n{}\ntime 1\n", &root[..40]),
                "root hash is not 32 bytes in standard base64",
            ),
            (
                format!("{ORIGIN}\n8\n{}\ntime 1\n", BASE64.encode([0u8; 33])),
                "root hash is not 32 bytes in standard base64",
            ),
            (
                format!("{ORIGIN}\n8\n{}\ntime 1\n", root.trim_end_matches('=')),
                "root hash is not 32 bytes in standard base64",
            ),
            (
                format!("{ORIGIN}\n8\n"),
                "checkpoint has fewer than three lines",
            ),
        ];
        for (body, reason) in cases {
            let note = signer.sign_note(body.clone());
            assert_eq!(
                open_checkpoint(&note, &signer.verifier()),
                malformed(reason),
                "{body:?}"
            );
        }
        // An empty line inside the text: the note splits at the last blank line, so the
        // text keeps the earlier one.
        let note = signer.sign_note(format!("{ORIGIN}\n\n8\n{root}\ntime 1\n"));
        assert_eq!(
            open_checkpoint(&note, &signer.verifier()),
            malformed("checkpoint has an empty line")
        );
    }

    proptest! {
        // Ed25519 is slow unoptimised; a few dozen cases cover the text format.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn round_trips(
            size in any::<u64>(),
            root in any::<[u8; 32]>(),
            timestamp_ms in any::<i64>(),
        ) {
            let signer = signer();
            let cp = Checkpoint { origin: ORIGIN.to_owned(), size, root, timestamp_ms };
            let note = signer.sign(&cp).expect("own origin");
            prop_assert_eq!(open_checkpoint(&note, &signer.verifier()), Ok(cp));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn any_flipped_bit_is_refused(
            size in any::<u64>(),
            timestamp_ms in any::<i64>(),
            bit in any::<prop::sample::Index>(),
        ) {
            let signer = signer();
            let cp = Checkpoint { size, timestamp_ms, ..checkpoint() };
            let mut note = signer.sign(&cp).expect("own origin").into_bytes();
            let bit = bit.index(note.len() * 8);
            note[bit / 8] ^= 1 << (bit % 8);
            // A flip that breaks UTF-8 cannot even be a `&str`.
            if let Ok(note) = String::from_utf8(note) {
                prop_assert!(open_checkpoint(&note, &signer.verifier()).is_err(), "{:?}", note);
            }
        }
    }
}
