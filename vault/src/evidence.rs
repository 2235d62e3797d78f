//! Evidence an auditor can take away: the exported log and its offline
//! verification.
//!
//! An export is JSON lines, one object per line:
//!
//! ```text
//! {"type":"event","chain":"node-1","seq":1,"leaf":"{\"v\":1,...}","chain_hash":"9f2c..."}
//! {"type":"checkpoint","chain":"node-1","size":1000,"note":"ordervault/node-1\n1000\n..."}
//! ```
//!
//! `leaf` is the canonical event encoding exactly as hashed into the log;
//! `note` a C2SP signed checkpoint. Verification needs only the file and the
//! log's public key ([`crate::checkpoint::NoteVerifier`]): it recomputes the
//! hash chain and the RFC 9162 Merkle tree, checks every checkpoint's
//! signature and root (so consecutive checkpoints are consistent with each
//! other and with the events), and names the first event that was edited,
//! deleted, inserted or reordered. A checkpoint the auditor kept from
//! earlier ("trusted") catches a log that was rolled back or truncated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::audit::{self, VerifyError};
use crate::checkpoint::{self, Checkpoint, NoteVerifier};
use crate::merkle::{self, CompactTree};

/// One line of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    /// An audit event.
    Event {
        /// Chain (node id).
        chain: String,
        /// Sequence number.
        seq: u64,
        /// Canonical leaf (JSON text).
        leaf: String,
        /// Hex chain hash after this event, as the vault stored it.
        chain_hash: String,
    },
    /// A signed checkpoint.
    Checkpoint {
        /// Chain (node id).
        chain: String,
        /// Tree size.
        size: u64,
        /// The signed note.
        note: String,
    },
}

/// What a successful verification covered, per chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSummary {
    /// Chain id.
    pub chain: String,
    /// Events verified.
    pub events: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Merkle root of the whole chain.
    pub root: merkle::Hash,
}

/// Why evidence failed, naming the chain and the first bad sequence number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chain {chain}: {error}")]
pub struct EvidenceError {
    /// The chain.
    pub chain: String,
    /// First bad seq and what is wrong.
    pub error: VerifyError,
}

/// The origin (note key name) of a chain's checkpoints.
pub fn origin(chain: &str) -> String {
    format!("ordervault/{chain}")
}

/// One chain's events and checkpoints, in file (or storage) order.
#[derive(Debug, Default)]
pub struct ChainEvidence {
    /// (seq, leaf, stored chain hash) in the order given.
    pub events: Vec<(u64, Vec<u8>, Option<[u8; 32]>)>,
    /// Signed notes.
    pub checkpoints: Vec<String>,
}

/// Groups export lines by chain. Fails on a line that is not valid JSON.
pub fn parse_export(text: &str) -> Result<BTreeMap<String, ChainEvidence>, String> {
    let mut chains: BTreeMap<String, ChainEvidence> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(line)
            .map_err(|e| format!("line {}: not an export line ({e})", n + 1))?;
        match parsed {
            ExportLine::Event {
                chain,
                seq,
                leaf,
                chain_hash,
            } => {
                let hash = hex::decode(&chain_hash)
                    .ok()
                    .and_then(|h| <[u8; 32]>::try_from(h).ok());
                chains
                    .entry(chain)
                    .or_default()
                    .events
                    .push((seq, leaf.into_bytes(), hash));
            }
            ExportLine::Checkpoint { chain, note, .. } => {
                chains.entry(chain).or_default().checkpoints.push(note);
            }
        }
    }
    Ok(chains)
}

/// Verifies one chain incrementally, event by event, in O(log n) memory:
/// feed [`ChainVerifier::push`] the events in order, then call
/// [`ChainVerifier::finish`].
#[derive(Debug)]
pub struct ChainVerifier {
    chain: String,
    checkpoints: Vec<Checkpoint>,
    tree: CompactTree,
    prev: [u8; 32],
    next_cp: usize,
    last_good: u64,
}

impl ChainVerifier {
    /// Checks the checkpoint signatures and prepares to read events.
    /// `trusted` are checkpoints the auditor already holds (verified notes);
    /// the log must contain and match each of them.
    pub fn new(
        chain: &str,
        notes: &[String],
        verifier: &NoteVerifier,
        trusted: &[Checkpoint],
    ) -> Result<ChainVerifier, VerifyError> {
        let fail = |problem: String| VerifyError { seq: 0, problem };
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        for note in notes {
            // Signatures first: a checkpoint that does not verify is not evidence.
            let cp = checkpoint::open_checkpoint(note, verifier).map_err(|e| {
                fail(format!(
                    "a checkpoint does not verify against the public key: {e}"
                ))
            })?;
            if cp.origin != origin(chain) {
                return Err(fail(format!(
                    "a checkpoint belongs to another log ({})",
                    cp.origin
                )));
            }
            checkpoints.push(cp);
        }
        checkpoints.extend(
            trusted
                .iter()
                .filter(|c| c.origin == origin(chain))
                .cloned(),
        );
        checkpoints.sort_by_key(|c| c.size);
        // Two checkpoints of one size must agree: the log never forks.
        for pair in checkpoints.windows(2) {
            if pair[0].size == pair[1].size && pair[0].root != pair[1].root {
                return Err(VerifyError {
                    seq: pair[0].size,
                    problem: "two checkpoints of the same size disagree (the log forked)".into(),
                });
            }
        }
        Ok(ChainVerifier {
            chain: chain.to_owned(),
            checkpoints,
            tree: CompactTree::new(),
            prev: audit::GENESIS,
            next_cp: 0,
            last_good: 0,
        })
    }

    /// The seq the next event must have.
    pub fn next_seq(&self) -> u64 {
        self.tree.size() + 1
    }

    /// Checks the next event (as found: its seq, leaf and stored hash).
    pub fn push(
        &mut self,
        seq: u64,
        leaf: &[u8],
        stored_hash: Option<&[u8; 32]>,
    ) -> Result<(), VerifyError> {
        let fail = |seq: u64, problem: String| VerifyError { seq, problem };
        let expected = self.tree.size() + 1;
        if seq > expected {
            return Err(fail(
                expected,
                format!("event missing (deleted): the next event present is seq {seq}"),
            ));
        }
        if seq < expected {
            return Err(fail(
                expected,
                format!("event seq {seq} appears again or out of order (inserted or reordered)"),
            ));
        }
        let (leaf_chain, leaf_seq, _) = audit::decode_leaf(leaf).ok_or_else(|| {
            fail(
                expected,
                "the event is not a valid event encoding (edited)".into(),
            )
        })?;
        self.push_decoded(seq, leaf, &leaf_chain, leaf_seq, stored_hash)
    }

    /// [`push`](Self::push) for a leaf the caller has already decoded
    /// (into its chain and seq), so a verifier decodes each event once.
    pub fn push_decoded(
        &mut self,
        seq: u64,
        leaf: &[u8],
        leaf_chain: &str,
        leaf_seq: u64,
        stored_hash: Option<&[u8; 32]>,
    ) -> Result<(), VerifyError> {
        let fail = |seq: u64, problem: String| VerifyError { seq, problem };
        let expected = self.tree.size() + 1;
        if seq != expected {
            return Err(fail(
                expected,
                format!("event missing or out of order: found seq {seq}"),
            ));
        }
        if leaf_seq != expected || leaf_chain != self.chain {
            return Err(fail(
                expected,
                format!("the event was moved: its content says seq {leaf_seq} of {leaf_chain}"),
            ));
        }
        let leaf_hash = merkle::leaf_hash(leaf);
        let hash = audit::chain_hash_of(&self.prev, &leaf_hash);
        if stored_hash.is_some_and(|stored| *stored != hash) {
            return Err(fail(
                expected,
                "the event does not match its chain hash (edited)".into(),
            ));
        }
        self.prev = hash;
        self.tree.push(leaf_hash);
        while self.next_cp < self.checkpoints.len()
            && self.checkpoints[self.next_cp].size == self.tree.size()
        {
            if self.checkpoints[self.next_cp].root != self.tree.root() {
                return Err(fail(
                    self.last_good + 1,
                    format!(
                        "events {}..={} do not match the checkpoint signed at size {} (edited after signing)",
                        self.last_good + 1,
                        self.tree.size(),
                        self.tree.size()
                    ),
                ));
            }
            self.last_good = self.tree.size();
            self.next_cp += 1;
        }
        Ok(())
    }

    /// Ends the chain: every checkpoint must have been reached.
    pub fn finish(self) -> Result<ChainSummary, VerifyError> {
        if let Some(cp) = self.checkpoints.get(self.next_cp) {
            return Err(VerifyError {
                seq: self.tree.size() + 1,
                problem: format!(
                    "the log has {} events but a checkpoint covers {}: it was truncated or rolled back",
                    self.tree.size(),
                    cp.size
                ),
            });
        }
        Ok(ChainSummary {
            chain: self.chain,
            events: self.tree.size(),
            checkpoints: self.checkpoints.len() as u64,
            root: self.tree.root(),
        })
    }
}

/// Verifies one chain held in memory.
pub fn verify_chain(
    chain: &str,
    evidence: &ChainEvidence,
    verifier: &NoteVerifier,
    trusted: &[Checkpoint],
) -> Result<ChainSummary, VerifyError> {
    let mut v = ChainVerifier::new(chain, &evidence.checkpoints, verifier, trusted)?;
    for (seq, leaf, stored) in &evidence.events {
        v.push(*seq, leaf, stored.as_ref())?;
    }
    v.finish()
}

/// Verifies every chain of an export. `verifiers` are the logs' public keys
/// (one per chain; picked by name).
pub fn verify_export(
    text: &str,
    verifiers: &[NoteVerifier],
    trusted: &[Checkpoint],
) -> Result<Vec<ChainSummary>, EvidenceError> {
    let chains = parse_export(text).map_err(|problem| EvidenceError {
        chain: "-".into(),
        error: VerifyError { seq: 0, problem },
    })?;
    let mut out = Vec::new();
    for (chain, evidence) in &chains {
        let verifier = verifiers
            .iter()
            .find(|v| v.name() == origin(chain))
            .ok_or_else(|| EvidenceError {
                chain: chain.clone(),
                error: VerifyError {
                    seq: 0,
                    problem: format!("no public key given for {}", origin(chain)),
                },
            })?;
        out.push(
            verify_chain(chain, evidence, verifier, trusted).map_err(|error| EvidenceError {
                chain: chain.clone(),
                error,
            })?,
        );
    }
    for t in trusted {
        if !chains.keys().any(|c| origin(c) == t.origin) {
            return Err(EvidenceError {
                chain: t.origin.clone(),
                error: VerifyError {
                    seq: 1,
                    problem: "a checkpoint you hold names a chain that is missing from the export"
                        .into(),
                },
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, AuditEvent, Decision};
    use crate::checkpoint::LogSigner;
    use crate::crypto::SecretKey;

    fn build(n: u64, checkpoint_every: u64) -> (String, NoteVerifier) {
        let signer = LogSigner::from_seed(&origin("n1"), &SecretKey::generate()).expect("name");
        let mut lines = Vec::new();
        let mut prev = audit::GENESIS;
        let mut tree = CompactTree::new();
        for seq in 1..=n {
            let ev = AuditEvent::new(
                seq as i64,
                "courier-b",
                "courier",
                Action::Reveal,
                Decision::Allowed,
                "r",
                "p",
            );
            let leaf = audit::encode_leaf("n1", seq, &ev);
            prev = audit::chain_hash(&prev, &leaf);
            tree.push(merkle::leaf_hash(&leaf));
            lines.push(
                serde_json::to_string(&ExportLine::Event {
                    chain: "n1".into(),
                    seq,
                    leaf: String::from_utf8(leaf).expect("json"),
                    chain_hash: hex::encode(prev),
                })
                .expect("json"),
            );
            if seq % checkpoint_every == 0 {
                let cp = Checkpoint {
                    origin: origin("n1"),
                    size: seq,
                    root: tree.root(),
                    timestamp_ms: 0,
                };
                lines.push(
                    serde_json::to_string(&ExportLine::Checkpoint {
                        chain: "n1".into(),
                        size: seq,
                        note: signer.sign(&cp).expect("sign"),
                    })
                    .expect("json"),
                );
            }
        }
        (lines.join("\n"), signer.verifier())
    }

    fn first_bad(text: &str, v: &NoteVerifier) -> Option<u64> {
        verify_export(text, std::slice::from_ref(v), &[])
            .err()
            .map(|e| e.error.seq)
    }

    #[test]
    fn an_untouched_export_verifies() {
        let (text, v) = build(25, 10);
        let summary = verify_export(&text, &[v], &[]).expect("verifies");
        assert_eq!(summary[0].events, 25);
        assert_eq!(summary[0].checkpoints, 2);
    }

    #[test]
    fn recomputed_edits_are_bounded_by_the_next_checkpoint() {
        // An editor who also recomputes every chain hash is still caught by
        // the signed Merkle root.
        let (text, v) = build(25, 10);
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut prev = audit::GENESIS;
        let mut out = Vec::new();
        for line in lines.drain(..) {
            match serde_json::from_str::<ExportLine>(&line).expect("line") {
                ExportLine::Event {
                    chain,
                    seq,
                    mut leaf,
                    ..
                } => {
                    if seq == 13 {
                        leaf = leaf.replace("courier-b", "courier-a");
                    }
                    prev = audit::chain_hash(&prev, leaf.as_bytes());
                    out.push(
                        serde_json::to_string(&ExportLine::Event {
                            chain,
                            seq,
                            leaf,
                            chain_hash: hex::encode(prev),
                        })
                        .expect("json"),
                    );
                }
                cp => out.push(serde_json::to_string(&cp).expect("json")),
            }
        }
        let err = verify_export(&out.join("\n"), &[v], &[]).expect_err("caught");
        assert_eq!(err.error.seq, 11, "{err}");
        assert!(err.to_string().contains("events 11..=20"), "{err}");
    }

    #[test]
    fn a_trusted_checkpoint_catches_a_rollback() {
        let (long, v) = build(30, 10);
        let (short, _) = (long.lines().take(22).collect::<Vec<_>>().join("\n"), ());
        let held = {
            let chains = parse_export(&long).expect("parse");
            let note = chains["n1"].checkpoints.last().expect("cp").clone();
            checkpoint::open_checkpoint(&note, &v).expect("verifies")
        };
        assert_eq!(held.size, 30);
        // The shortened export is internally consistent...
        assert!(verify_export(&short, std::slice::from_ref(&v), &[]).is_ok());
        // ...but not with the checkpoint the auditor kept.
        let err = verify_export(&short, &[v], &[held]).expect_err("rolled back");
        assert_eq!(err.error.seq, 21);
        assert!(
            err.to_string().contains("truncated or rolled back"),
            "{err}"
        );
    }

    #[test]
    fn a_foreign_signature_is_refused() {
        let (text, _) = build(10, 5);
        let other = LogSigner::from_seed(&origin("n1"), &SecretKey::generate()).expect("name");
        assert_eq!(first_bad(&text, &other.verifier()), Some(0));
    }
}
