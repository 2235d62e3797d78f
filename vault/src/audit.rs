//! Audit events: one per decision, never containing a value.
//!
//! Each event is encoded canonically (JSON with a fixed field order, no
//! whitespace) together with its sequence number and chain id; that encoding
//! is the *leaf* of the log. Leaves are hashed with domain separation as in
//! RFC 9162 §2.1 (`SHA-256(0x00 || leaf)`), and each event's chain hash is
//! `SHA-256(0x01 || previous chain hash || leaf hash)`, so editing, deleting,
//! inserting or reordering any stored event changes every later chain hash.
//! The store keeps queryable copies of a few fields next to the leaf;
//! [`verify`] checks those against the leaf too.

use std::io::Write as _;

use serde::{Deserialize, Serialize};

use crate::crypto;

/// What kind of action an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Values were tokenized.
    Tokenize,
    /// A token was revealed (or the attempt was refused).
    Reveal,
    /// An API key was presented and refused.
    AuthFailed,
    /// An administrative action (init, principal created, key created).
    Admin,
    /// Access to an order was granted.
    Grant,
    /// A grant was revoked.
    Revoke,
    /// A reveal was refused by a rate or daily cap.
    QuotaExceeded,
}

impl Action {
    /// Name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Tokenize => "tokenize",
            Action::Reveal => "reveal",
            Action::AuthFailed => "auth_failed",
            Action::Admin => "admin",
            Action::Grant => "grant",
            Action::Revoke => "revoke",
            Action::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// The outcome of the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Done, or revealed in full.
    Allowed,
    /// Revealed as a mask only.
    Masked,
    /// Refused by policy or validation.
    Denied,
    /// Failed inside the vault (e.g. a ciphertext that did not authenticate).
    Error,
}

impl Decision {
    /// Name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Masked => "masked",
            Decision::Denied => "denied",
            Decision::Error => "error",
        }
    }
}

/// One decision, before it has a place in the log.
///
/// Holds identifiers only: principal and role names, kinds, tokens, reasons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When the decision was made (Unix milliseconds).
    pub ts_ms: i64,
    /// Who asked ("" when unauthenticated).
    pub principal: String,
    /// The caller's role ("" when unauthenticated).
    pub role: String,
    /// What was asked.
    pub action: Action,
    /// What was decided.
    pub decision: Decision,
    /// Stated purpose, for reveals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Field kind involved, for per-field events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Token involved, for per-field events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Order token involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_token: Option<String>,
    /// Machine-readable reason for denials and errors, or a detail for
    /// admin events (never a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Number of fields, for batch events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Key version used, where one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Peer address, for failed authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Request id shared by all events of one request.
    pub request_id: String,
    /// SHA-256 prefix of the policy in force.
    pub policy: String,
}

impl AuditEvent {
    /// An event with the common fields set and the optional ones empty.
    pub fn new(
        ts_ms: i64,
        principal: &str,
        role: &str,
        action: Action,
        decision: Decision,
        request_id: &str,
        policy: &str,
    ) -> AuditEvent {
        AuditEvent {
            ts_ms,
            principal: principal.to_owned(),
            role: role.to_owned(),
            action,
            decision,
            purpose: None,
            kind: None,
            token: None,
            order_token: None,
            reason: None,
            count: None,
            key_version: None,
            peer: None,
            request_id: request_id.to_owned(),
            policy: policy.to_owned(),
        }
    }
}

/// The canonical leaf: format version, chain, sequence number and event.
#[derive(Serialize, Deserialize)]
struct Leaf<'a> {
    v: u8,
    chain: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(flatten)]
    event: std::borrow::Cow<'a, AuditEvent>,
}

/// Encodes an event at `seq` of `chain` into its canonical leaf bytes.
pub fn encode_leaf(chain: &str, seq: u64, event: &AuditEvent) -> Vec<u8> {
    leaf_from(chain, seq, &encode_event(event))
}

/// An event's fields in their canonical encoding, made before the event's
/// place in a chain is known: the SQLite store encodes a batch's events on
/// the caller's thread, so that its writer, the vault's one serial path,
/// only puts the chain and sequence number in front ([`leaf_from`]).
pub struct EncodedEvent(Vec<u8>);

impl std::fmt::Debug for EncodedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedEvent({} bytes)", self.0.len())
    }
}

/// Encodes an event's fields (see [`EncodedEvent`]).
pub fn encode_event(event: &AuditEvent) -> EncodedEvent {
    // Serialising a struct of strings and integers cannot fail.
    EncodedEvent(serde_json::to_vec(event).expect("audit event is plain data"))
}

/// The canonical leaf of an encoded event at `seq` of `chain`: the JSON
/// object `Leaf` serialises to, `{"v":1,"chain":…,"seq":…,` followed by
/// the event's own fields, which serde writes as further entries of the
/// same object when a struct is flattened into another. Writing the prefix
/// in front of the event's object gives the same bytes without serde's
/// flattening, which goes through a map serializer field by field.
pub fn leaf_from(chain: &str, seq: u64, event: &EncodedEvent) -> Vec<u8> {
    let fields = event.0.strip_prefix(b"{").unwrap_or(&event.0);
    let mut leaf = Vec::with_capacity(fields.len() + chain.len() + 40);
    leaf.extend_from_slice(br#"{"v":1,"chain":"#);
    // A string into a Vec cannot fail.
    serde_json::to_writer(&mut leaf, chain).expect("a chain name is a string");
    // Writing into a Vec cannot fail.
    write!(leaf, r#","seq":{seq}"#).expect("a Vec takes every byte");
    if fields != b"}" {
        leaf.push(b',');
    }
    leaf.extend_from_slice(fields);
    leaf
}

/// Decodes leaf bytes back into (chain, seq, event).
pub fn decode_leaf(bytes: &[u8]) -> Option<(String, u64, AuditEvent)> {
    let leaf: Leaf<'static> = serde_json::from_slice(bytes).ok()?;
    (leaf.v == 1).then(|| (leaf.chain.into_owned(), leaf.seq, leaf.event.into_owned()))
}

/// RFC 9162 §2.1.1 leaf hash: `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    crate::merkle::leaf_hash(leaf)
}

/// The chain hash after appending a leaf: `SHA-256(0x01 || prev || leaf_hash)`.
pub fn chain_hash(prev: &[u8; 32], leaf: &[u8]) -> [u8; 32] {
    chain_hash_of(prev, &leaf_hash(leaf))
}

/// [`chain_hash`] from an already computed leaf hash.
pub fn chain_hash_of(prev: &[u8; 32], leaf_hash: &[u8; 32]) -> [u8; 32] {
    let mut buf = [0u8; 65];
    buf[0] = 0x01;
    buf[1..33].copy_from_slice(prev);
    buf[33..].copy_from_slice(leaf_hash);
    crypto::sha256(&buf)
}

/// Fails an event stored with a type the vault never writes in one of its
/// columns ([`StoredEvent::misstored`]).
pub fn stored_as_written(e: &StoredEvent) -> Result<(), VerifyError> {
    match &e.misstored {
        None => Ok(()),
        Some(what) => Err(VerifyError {
            seq: e.seq,
            problem: format!("{what} (row edited)"),
        }),
    }
}

/// Whether a stored event's indexed columns equal its decoded leaf. The
/// order token counts too, emptied or not: leak traces count a principal's
/// records by it. (SQLite events from before the column had it copied from
/// their leaves when the column was made complete.)
pub fn columns_match(e: &StoredEvent, event: &AuditEvent) -> bool {
    event.principal == e.principal
        && event.action.as_str() == e.action
        && event.decision.as_str() == e.decision
        && event.token == e.token
        && event.ts_ms == e.ts_ms
        && e.order_token == event.order_token
}

/// The chain hash before the first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// An event as stored: its place, its leaf and the indexed copies.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// Sequence number, from 1, contiguous per chain.
    pub seq: u64,
    /// Chain (node) id.
    pub chain: String,
    /// Canonical leaf bytes.
    pub leaf: Vec<u8>,
    /// Chain hash after this event.
    pub chain_hash: [u8; 32],
    /// Indexed copy: principal.
    pub principal: String,
    /// Indexed copy: action.
    pub action: String,
    /// Indexed copy: decision.
    pub decision: String,
    /// Indexed copy: token.
    pub token: Option<String>,
    /// The token's id, by which events are found in vaults with
    /// time-ordered storage keys (the storage key in the store, the token
    /// body above [`crate::store::permuted::PermutedStore`]). Not part of
    /// the signed leaf: derived with the vault's secret mapping, so only the
    /// online verification checks it ([`token_key_matches`]). `None` where
    /// the event is found by its text instead: events written before the
    /// column existed, and every event of a vault that stores tokens under
    /// their bodies.
    pub token_key: Option<crate::store::TokenId>,
    /// Indexed copy: timestamp.
    pub ts_ms: i64,
    /// Indexed copy: order token, by which `revealed_records` counts a
    /// principal's records. `None` on events written before SQLite stores
    /// had the column: such events are counted by their token.
    pub order_token: Option<String>,
    /// The first column stored with a type the vault never writes there,
    /// as "`column` holds TYPE where the vault writes TYPE"; the other
    /// fields then hold a best reading of the row. A store whose schema
    /// does not enforce types (SQLite) keeps whatever a row is given: a
    /// principal stored as a blob of the same bytes, or a time as text,
    /// drops the event out of searches by principal or time while its
    /// content still matches the leaf. Verification reports it. (A `seq`
    /// of another type makes the row unreadable instead: verification
    /// finds that seq missing.)
    pub misstored: Option<String>,
}

/// Whether an event's `token_key`, read through the vault's own
/// [`crate::store::Store`] (so holding the token body), is one the vault
/// wrote: absent, or, in a vault that `keyed` its events (time-ordered
/// storage keys), the key of the token in the event's `token` column. An
/// absent key is always consistent, since such events are found by their
/// text; any other key would hide the event from searches by token (leak
/// traces), so verification rejects it.
pub fn token_key_matches(e: &StoredEvent, keyed: bool) -> bool {
    match e.token_key {
        None => true,
        Some(key) => {
            keyed
                && e.token
                    .as_deref()
                    .is_some_and(|t| crate::token::Token::spells(t, &key))
        }
    }
}

/// Why a log failed verification: the first bad event and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log fails verification at seq {seq}: {problem}")]
pub struct VerifyError {
    /// First sequence number that does not verify.
    pub seq: u64,
    /// What is wrong there.
    pub problem: String,
}

/// Incremental verifier for one chain, fed events in sequence order.
#[derive(Debug)]
pub struct Verifier {
    expected_seq: u64,
    prev: [u8; 32],
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            expected_seq: 1,
            prev: GENESIS,
        }
    }
}

impl Verifier {
    /// Checks the next stored event.
    pub fn check(&mut self, e: &StoredEvent) -> Result<(), VerifyError> {
        let fail = |problem: &str| VerifyError {
            seq: e.seq,
            problem: problem.to_owned(),
        };
        if e.seq != self.expected_seq {
            return Err(VerifyError {
                seq: self.expected_seq,
                problem: format!("event missing (next stored event is seq {})", e.seq),
            });
        }
        stored_as_written(e)?;
        let (chain, seq, event) =
            decode_leaf(&e.leaf).ok_or_else(|| fail("leaf is not a valid event encoding"))?;
        if seq != e.seq || chain != e.chain {
            return Err(fail(
                "leaf names a different position (event moved or reordered)",
            ));
        }
        if !columns_match(e, &event) {
            return Err(fail(
                "indexed columns differ from the signed leaf (row edited)",
            ));
        }
        let expected = chain_hash(&self.prev, &e.leaf);
        if expected != e.chain_hash {
            return Err(fail(
                "chain hash mismatch (event edited, inserted or a predecessor changed)",
            ));
        }
        self.prev = expected;
        self.expected_seq += 1;
        Ok(())
    }

    /// Number of events verified so far.
    pub fn verified(&self) -> u64 {
        self.expected_seq - 1
    }

    /// Chain hash after the last verified event.
    pub fn head(&self) -> [u8; 32] {
        self.prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stored(chain: &str, events: &[AuditEvent]) -> Vec<StoredEvent> {
        let mut prev = GENESIS;
        events
            .iter()
            .enumerate()
            .map(|(i, ev)| {
                let seq = i as u64 + 1;
                let leaf = encode_leaf(chain, seq, ev);
                prev = chain_hash(&prev, &leaf);
                StoredEvent {
                    seq,
                    chain: chain.into(),
                    leaf,
                    chain_hash: prev,
                    principal: ev.principal.clone(),
                    action: ev.action.as_str().into(),
                    decision: ev.decision.as_str().into(),
                    token: ev.token.clone(),
                    token_key: None,
                    ts_ms: ev.ts_ms,
                    order_token: ev.order_token.clone(),
                    misstored: None,
                }
            })
            .collect()
    }

    fn events(n: usize) -> Vec<AuditEvent> {
        (0..n)
            .map(|i| {
                let mut e = AuditEvent::new(
                    i as i64,
                    "courier-a",
                    "courier",
                    Action::Reveal,
                    Decision::Allowed,
                    "r1",
                    "p",
                );
                e.token = Some(format!("ph_{i}"));
                e
            })
            .collect()
    }

    fn verify_all(log: &[StoredEvent]) -> Result<u64, VerifyError> {
        let mut v = Verifier::default();
        for e in log {
            v.check(e)?;
        }
        Ok(v.verified())
    }

    #[test]
    fn leaf_round_trips_and_is_canonical() {
        let e = &events(1)[0];
        let leaf = encode_leaf("node-1", 7, e);
        assert_eq!(decode_leaf(&leaf), Some(("node-1".into(), 7, e.clone())));
        assert_eq!(leaf, encode_leaf("node-1", 7, e));
        let text = String::from_utf8(leaf).expect("utf8");
        assert!(
            text.starts_with(
                r#"{"v":1,"chain":"node-1","seq":7,"ts_ms":0,"principal":"courier-a""#
            ),
            "{text}"
        );
    }

    /// A known answer: the whole leaf of an event with every optional field
    /// set, and its leaf hash (computed apart, as `SHA-256(0x00 || leaf)`
    /// of that text), as every stored log has them.
    #[test]
    fn leaf_and_leaf_hash_known_answer() {
        let mut e = events(1).remove(0);
        e.purpose = Some("delivery".into());
        e.kind = Some("phone".into());
        e.order_token = Some("or_\"x\\y".into());
        e.reason = Some("no_grant".into());
        e.count = Some(3);
        e.key_version = Some(2);
        e.peer = Some("127.0.0.1".into());
        let leaf = encode_leaf("node-1", 7, &e);
        assert_eq!(
            String::from_utf8(leaf.clone()).expect("utf8"),
            concat!(
                r#"{"v":1,"chain":"node-1","seq":7,"ts_ms":0,"principal":"courier-a","role":"courier","#,
                r#""action":"reveal","decision":"allowed","purpose":"delivery","kind":"phone","token":"ph_0","#,
                r#""order_token":"or_\"x\\y","reason":"no_grant","count":3,"key_version":2,"#,
                r#""peer":"127.0.0.1","request_id":"r1","policy":"p"}"#
            )
        );
        assert_eq!(
            hex::encode(leaf_hash(&leaf)),
            "d09b1f3227a4e42487f2939d8e9c6deb69a714842d86f7d405b52984ae7169bd"
        );
    }

    fn any_text() -> impl Strategy<Value = String> {
        // Quotes, backslashes, control characters and non-ASCII text all
        // take escapes or multi-byte encodings in JSON.
        prop_oneof![
            Just(String::new()),
            "[a-z0-9_-]{1,12}",
            any::<String>(),
            r#"[\\"\x00-\x1f\x7f é张\u{2028}]{0,6}"#,
        ]
    }

    /// Every action: the match fails to compile when one is added.
    fn every_action() -> Vec<Action> {
        let all = vec![
            Action::Tokenize,
            Action::Reveal,
            Action::AuthFailed,
            Action::Admin,
            Action::Grant,
            Action::Revoke,
            Action::QuotaExceeded,
        ];
        for a in &all {
            match a {
                Action::Tokenize
                | Action::Reveal
                | Action::AuthFailed
                | Action::Admin
                | Action::Grant
                | Action::Revoke
                | Action::QuotaExceeded => {}
            }
        }
        all
    }

    prop_compose! {
        fn any_event()(
            ts_ms in any::<i64>(),
            principal in any_text(),
            role in any_text(),
            action in prop::sample::select(every_action()),
            decision in prop::sample::select(vec![
                Decision::Allowed,
                Decision::Masked,
                Decision::Denied,
                Decision::Error,
            ]),
            purpose in proptest::option::of(any_text()),
            kind in proptest::option::of(any_text()),
            token in proptest::option::of(any_text()),
            order_token in proptest::option::of(any_text()),
            reason in proptest::option::of(any_text()),
            count in proptest::option::of(any::<u32>()),
            key_version in proptest::option::of(any::<u32>()),
            peer in proptest::option::of(any_text()),
            request_id in any_text(),
            policy in any_text(),
        ) -> AuditEvent {
            AuditEvent {
                ts_ms, principal, role, action, decision, purpose, kind, token,
                order_token, reason, count, key_version, peer, request_id, policy,
            }
        }
    }

    proptest! {
        /// The leaf put together from a pre-encoded event is, byte for
        /// byte, what serde makes of the event flattened into a leaf (the
        /// encoding of every event stored before), and decodes back.
        #[test]
        fn leaf_from_an_encoded_event_is_the_flattened_leaf(
            chain in any_text(),
            seq in any::<u64>(),
            event in any_event(),
        ) {
            let flattened = serde_json::to_vec(&Leaf {
                v: 1,
                chain: chain.as_str().into(),
                seq,
                event: std::borrow::Cow::Borrowed(&event),
            })
            .expect("serialise");
            let leaf = leaf_from(&chain, seq, &encode_event(&event));
            prop_assert_eq!(&leaf, &flattened);
            prop_assert_eq!(decode_leaf(&leaf), Some((chain, seq, event)));
        }
    }

    #[test]
    fn intact_log_verifies() {
        assert_eq!(verify_all(&stored("n", &events(10))), Ok(10));
    }

    #[test]
    fn tampering_is_detected_at_the_first_bad_event() {
        let log = stored("n", &events(10));

        let mut edited = log.clone();
        let mut ev = decode_leaf(&edited[4].leaf).expect("leaf").2;
        ev.principal = "someone-else".into();
        edited[4].leaf = encode_leaf("n", 5, &ev);
        assert_eq!(verify_all(&edited).map_err(|e| e.seq), Err(5));

        let mut column = log.clone();
        column[6].principal = "someone-else".into();
        assert_eq!(verify_all(&column).map_err(|e| e.seq), Err(7));

        let mut deleted = log.clone();
        deleted.remove(3);
        assert_eq!(verify_all(&deleted).map_err(|e| e.seq), Err(4));

        let mut swapped = log.clone();
        swapped.swap(2, 3);
        assert_eq!(verify_all(&swapped).map_err(|e| e.seq), Err(3));
    }
}
