//! The audit log as a Merkle tree, as in Certificate Transparency ([RFC 9162] §2.1).
//!
//! Every audit event's leaf (see `audit::encode_leaf`) is hashed with [`leaf_hash`]; the
//! log's tree head is the Merkle Tree Hash ([`root`]) over those leaf hashes in sequence
//! order. A signed tree head (a checkpoint, see `checkpoint`) commits the log to every event
//! below its size, and two proofs let an auditor check the log offline, holding only hashes:
//!
//! * an **inclusion proof** ([`inclusion_proof`], [`verify_inclusion`]) shows that one event
//!   is in the tree with a given root, at a given index;
//! * a **consistency proof** ([`consistency_proof`], [`verify_consistency`]) shows that the
//!   tree of an older checkpoint is a prefix of the tree of a newer one: the log only grew,
//!   nothing was edited, dropped or reordered.
//!
//! [`CompactTree`] computes the root incrementally, one leaf hash at a time in O(log n)
//! memory, so a verifier can recompute the tree head of a million-event log in one pass.
//!
//! Everything here works on leaf *hashes* ([`Hash`]), not leaves, and is pure: no I/O, no
//! secrets. Proof generation hashes every leaf below the tree size (O(n) per proof); a store
//! of interior nodes would make it O(log n) when logs get large enough to need it.
//!
//! Leaf and interior hashes carry different one-byte prefixes (`0x00`, `0x01`, §2.1.1), so a
//! node can never be passed off as a leaf or the other way round.
//!
//! [RFC 9162]: https://www.rfc-editor.org/rfc/rfc9162

use crate::crypto::{sha256, sha256_of_parts};

/// A SHA-256 hash: a leaf hash, an interior node or a tree head.
pub type Hash = [u8; 32];

/// Domain-separation prefix of leaf hashes (RFC 9162 §2.1.1).
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of interior node hashes (RFC 9162 §2.1.1).
const NODE_PREFIX: u8 = 0x01;

/// The hash of one leaf, `SHA-256(0x00 || leaf)` (RFC 9162 §2.1.1).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    sha256_of_parts(&[&[LEAF_PREFIX], leaf])
}

/// The hash of an interior node, `SHA-256(0x01 || left || right)` (RFC 9162 §2.1.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = NODE_PREFIX;
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    sha256(&buf)
}

/// The Merkle Tree Hash of the empty tree, `SHA-256("")` (RFC 9162 §2.1.1).
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The Merkle Tree Hash over already-hashed leaves (RFC 9162 §2.1.1).
///
/// The tree splits at the largest power of two smaller than the number of leaves, so the
/// left subtree is always perfect and a tree of `n` leaves keeps its shape as it grows:
/// that is what makes consistency proofs possible. No leaves give [`empty_root`]; one leaf's
/// tree hash is its leaf hash.
pub fn root(leaf_hashes: &[Hash]) -> Hash {
    match leaf_hashes {
        [] => empty_root(),
        [only] => *only,
        _ => {
            let (left, right) = leaf_hashes.split_at(split_point(leaf_hashes.len()));
            node_hash(&root(left), &root(right))
        }
    }
}

/// The inclusion proof `PATH(m, D[n])` (RFC 9162 §2.1.3.1) of the leaf at `index` (0-based)
/// in the tree of all of `leaf_hashes`: the sibling hashes from the leaf up to the root,
/// nearest first.
///
/// # Errors
///
/// [`ProofError::IndexOutOfRange`] if `index` is not below `leaf_hashes.len()`.
pub fn inclusion_proof(leaf_hashes: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    let mut m = usize::try_from(index)
        .ok()
        .filter(|&m| m < leaf_hashes.len())
        .ok_or(ProofError::IndexOutOfRange)?;
    // Walk PATH's recursion from the root down. At each level PATH appends the hash of the
    // subtree that does *not* hold leaf m after the path inside the one that does, so the
    // walk meets the proof's hashes last to first.
    let mut tree = leaf_hashes;
    let mut path = Vec::new();
    while tree.len() > 1 {
        let k = split_point(tree.len());
        let (left, right) = tree.split_at(k);
        if m < k {
            path.push(root(right));
            tree = left;
        } else {
            path.push(root(left));
            tree = right;
            m -= k;
        }
    }
    path.reverse();
    Ok(path)
}

/// Checks an inclusion proof as RFC 9162 §2.1.3.2 does: that the leaf with `leaf_hash` is
/// at `index` in the tree of `tree_size` leaves whose root is `root`.
///
/// `tree_size` and `root` must come from a trusted tree head (a verified checkpoint); the
/// proof and the index may come from anyone.
///
/// # Errors
///
/// * [`ProofError::IndexOutOfRange`] if `index` is not below `tree_size`.
/// * [`ProofError::WrongProofLength`] if the proof does not hold exactly as many hashes as
///   a leaf at `index` in a tree of `tree_size` has ancestors.
/// * [`ProofError::RootMismatch`] if the proof does not lead to `root`.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    // Step 1.
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange);
    }
    // Not a step of the RFC, whose algorithm rejects a proof of the wrong length anyway (by
    // running out of levels or ending above the root); checking first names the problem.
    if proof.len() != inclusion_proof_len(index, tree_size) {
        return Err(ProofError::WrongProofLength);
    }
    // Steps 2 to 5, with the RFC's `fn` (the node on the path, as an index within its level)
    // and `sn` (the last node of its level).
    let mut fnode = index;
    let mut snode = tree_size - 1;
    let mut r = *leaf_hash;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::WrongProofLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            // A last node that is a left child has no sibling on this level: it moves up
            // unchanged until it becomes a right child (or the root of its subtree).
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongProofLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The consistency proof `PROOF(m, D[n])` (RFC 9162 §2.1.4.1) between the tree of the first
/// `old_size` leaves and the tree of all of `leaf_hashes`. Empty when the sizes are equal.
///
/// # Errors
///
/// [`ProofError::SizeOutOfRange`] if `old_size` is 0 (an empty tree is a prefix of every
/// tree and needs no proof) or larger than `leaf_hashes.len()`.
pub fn consistency_proof(leaf_hashes: &[Hash], old_size: u64) -> Result<Vec<Hash>, ProofError> {
    let mut m = usize::try_from(old_size)
        .ok()
        .filter(|&m| 0 < m && m <= leaf_hashes.len())
        .ok_or(ProofError::SizeOutOfRange)?;
    // Walk SUBPROOF's recursion from the root down, last hash first, as in
    // `inclusion_proof`. `whole_old_tree` is SUBPROOF's flag `b`: whether the subtree's
    // first m leaves are the whole old tree, whose hash the verifier already has.
    let mut tree = leaf_hashes;
    let mut whole_old_tree = true;
    let mut proof = Vec::new();
    while m < tree.len() {
        let k = split_point(tree.len());
        let (left, right) = tree.split_at(k);
        if m <= k {
            proof.push(root(right));
            tree = left;
        } else {
            proof.push(root(left));
            tree = right;
            m -= k;
            whole_old_tree = false;
        }
    }
    // SUBPROOF(m, D[m], b): nothing when the verifier knows this subtree's hash (b = true),
    // else the subtree's hash.
    if !whole_old_tree {
        proof.push(root(tree));
    }
    proof.reverse();
    Ok(proof)
}

/// Checks a consistency proof as RFC 9162 §2.1.4.2 does: that the tree of `old_size` leaves
/// with root `old_root` is a prefix of the tree of `new_size` leaves with root `new_root`.
///
/// Equal sizes need an empty proof and equal roots.
///
/// # Errors
///
/// * [`ProofError::SizeOutOfRange`] if `old_size` is 0 or larger than `new_size`. Handle an
///   empty old tree before calling: it is consistent with every tree. A new size below the
///   old one means the log shrank, which no proof can excuse.
/// * [`ProofError::WrongProofLength`] if the proof does not hold exactly the number of
///   hashes these sizes require.
/// * [`ProofError::RootMismatch`] if the proof does not lead to both roots.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::SizeOutOfRange);
    }
    if proof.len() != consistency_proof_len(old_size, new_size) {
        return Err(ProofError::WrongProofLength);
    }
    if old_size == new_size {
        // PROOF(n, D[n]) is empty (§2.1.4.1): the trees are the same tree.
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let mut path = proof.iter();
    // Step 1 (an empty proof fails) is covered by the length check. Step 2: when the old
    // tree is perfect, it is a subtree of the new one and its hash starts the path.
    let seed = if old_size.is_power_of_two() {
        old_root
    } else {
        path.next().ok_or(ProofError::WrongProofLength)?
    };
    // Steps 3 and 4: `fn` and `sn` as in inclusion proofs, for the last old leaf; climb to
    // the first level where the old tree's last node is a left child or the root.
    let mut fnode = old_size - 1;
    let mut snode = new_size - 1;
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    // Steps 5 and 6: `fr` rebuilds the old root, `sr` the new one.
    let mut fr = *seed;
    let mut sr = *seed;
    for c in path {
        if snode == 0 {
            return Err(ProofError::WrongProofLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    // Step 7.
    if snode != 0 {
        return Err(ProofError::WrongProofLength);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// A Merkle tree that grows one leaf hash at a time and keeps only O(log n) hashes: the
/// roots of the perfect subtrees that make up the tree (a "compact range" over `[0, n)`).
///
/// Its [`root`](CompactTree::root) equals [`root`] over all the leaf hashes pushed so far,
/// because RFC 9162 §2.1.1 splits every tree into a perfect left subtree of the largest
/// power of two below its size and the rest. A verifier streams a log's events through one
/// of these and compares the root with a checkpoint's.
#[derive(Clone, Debug, Default)]
pub struct CompactTree {
    /// Number of leaves pushed.
    size: u64,
    /// Roots of the perfect subtrees, leftmost (largest) first: one per set bit of `size`,
    /// the subtree of `2^i` leaves for bit `i`.
    peaks: Vec<Hash>,
}

impl CompactTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the next leaf hash. Amortised, one node hash per push.
    pub fn push(&mut self, leaf_hash: Hash) {
        // Binary addition of one leaf: each trailing set bit of the size is a perfect subtree
        // of the same size as the one being carried, and the two merge into one twice as big.
        let mut carry = leaf_hash;
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self
                .peaks
                .pop()
                .expect("there is one peak per set bit of the size");
            carry = node_hash(&left, &carry);
            size >>= 1;
        }
        self.peaks.push(carry);
        self.size += 1;
    }

    /// Number of leaf hashes pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The Merkle Tree Hash of the leaves pushed so far ([`empty_root`] before the first).
    pub fn root(&self) -> Hash {
        // The smallest subtrees are the rightmost ones; by §2.1.1 each peak is the left
        // child of the node that joins it to everything on its right.
        let mut peaks = self.peaks.iter().rev();
        match peaks.next() {
            None => empty_root(),
            Some(last) => peaks.fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}

/// Why a Merkle proof could not be made or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The leaf index is not below the tree size. Asking for a proof: ask for a leaf the tree
    /// holds. Checking one: the proof is not about the tree of the trusted tree head; reject.
    #[error("leaf index is not below the tree size")]
    IndexOutOfRange,
    /// The old tree size of a consistency proof is 0 or larger than the new size. A size of 0
    /// needs no proof (the empty tree is a prefix of every tree); a new size below the old one
    /// means the log shrank, which is itself evidence that it was rewritten.
    #[error("old tree size is 0 or larger than the new tree size")]
    SizeOutOfRange,
    /// The proof does not hold the number of hashes its sizes (and index) require: it was
    /// truncated, padded, or made for other sizes. Reject it.
    #[error("proof has the wrong number of hashes for its tree sizes")]
    WrongProofLength,
    /// The proof does not lead to the expected root (or roots): the leaf is not at that index
    /// in that tree, the old tree is not a prefix of the new one, or a hash was altered. With
    /// roots from signed checkpoints this is evidence that the log was tampered with; keep
    /// the proof and the checkpoints, and report them.
    #[error("proof does not lead to the expected root hash")]
    RootMismatch,
}

/// The largest power of two smaller than `n`, where RFC 9162 §2.1.1 splits a tree of `n ≥ 2`
/// leaves.
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2, "only trees of two or more leaves are split");
    1 << (n - 1).ilog2()
}

/// [`split_point`] over tree sizes as `u64`, for verifiers, which never see the leaves.
fn split_point_u64(n: u64) -> u64 {
    debug_assert!(n >= 2, "only trees of two or more leaves are split");
    1 << (n - 1).ilog2()
}

/// Number of hashes in `PATH(m, D[n])` (RFC 9162 §2.1.3.1), for `m < n`.
fn inclusion_proof_len(mut m: u64, mut n: u64) -> usize {
    let mut len = 0;
    while n > 1 {
        let k = split_point_u64(n);
        if m < k {
            n = k;
        } else {
            m -= k;
            n -= k;
        }
        len += 1;
    }
    len
}

/// Number of hashes in `PROOF(m, D[n])` (RFC 9162 §2.1.4.1), for `0 < m ≤ n`.
fn consistency_proof_len(mut m: u64, mut n: u64) -> usize {
    let mut len = 0;
    let mut whole_old_tree = true;
    while m < n {
        let k = split_point_u64(n);
        if m <= k {
            n = k;
        } else {
            m -= k;
            n -= k;
            whole_old_tree = false;
        }
        len += 1;
    }
    if !whole_old_tree {
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text).expect("test vectors are valid hex")
    }

    fn hash(text: &str) -> Hash {
        unhex(text)
            .try_into()
            .expect("test vector hashes are 32 bytes")
    }

    fn hashes(texts: &[&str]) -> Vec<Hash> {
        texts.iter().map(|t| hash(t)).collect()
    }

    // --- Known answers ---
    //
    // The RFC 6962 test tree of the certificate-transparency project, as carried by
    // github.com/transparency-dev/merkle, proof/verify_test.go: leaves, the roots of the
    // trees of their first 1..=8 leaves, and inclusion and consistency proofs.

    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];

    /// `ROOTS[i]` is the root of the tree of the first `i + 1` leaves.
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    const EMPTY_ROOT: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// (0-based leaf index, tree size, proof). The source numbers leaves from 1.
    const INCLUSION_PROOFS: [(u64, u64, &[&str]); 5] = [
        (0, 1, &[]),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    /// (old size, new size, proof).
    const CONSISTENCY_PROOFS: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn vector_leaf_hashes() -> Vec<Hash> {
        LEAVES.iter().map(|l| leaf_hash(&unhex(l))).collect()
    }

    fn size(n: usize) -> u64 {
        u64::try_from(n).expect("test sizes fit in u64")
    }

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(empty_root(), hash(EMPTY_ROOT));
        assert_eq!(root(&[]), hash(EMPTY_ROOT));
        assert_eq!(CompactTree::new().root(), hash(EMPTY_ROOT));
        assert_eq!(CompactTree::new().size(), 0);
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        // RFC 9162 §2.1.1: the first known root is the leaf hash of the empty leaf.
        assert_eq!(leaf_hash(b""), hash(ROOTS[0]));
        assert_eq!(leaf_hash(b"x"), sha256(b"\x00x"));
        let (a, b) = ([0x11; 32], [0x22; 32]);
        let mut preimage = vec![0x01];
        preimage.extend_from_slice(&a);
        preimage.extend_from_slice(&b);
        assert_eq!(node_hash(&a, &b), sha256(&preimage));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
    }

    #[test]
    fn roots_of_the_reference_tree() {
        let leaves = vector_leaf_hashes();
        let mut compact = CompactTree::new();
        for (i, expected) in ROOTS.iter().enumerate() {
            compact.push(leaves[i]);
            assert_eq!(root(&leaves[..=i]), hash(expected), "size {}", i + 1);
            assert_eq!(compact.root(), hash(expected), "size {}", i + 1);
            assert_eq!(compact.size(), size(i + 1));
        }
    }

    #[test]
    fn inclusion_proofs_of_the_reference_tree() {
        let leaves = vector_leaf_hashes();
        for (index, tree_size, expected) in INCLUSION_PROOFS {
            let tree = &leaves[..usize::try_from(tree_size).expect("small")];
            let proof = inclusion_proof(tree, index).expect("index in range");
            assert_eq!(proof, hashes(expected), "leaf {index} of {tree_size}");
            let leaf = &leaves[usize::try_from(index).expect("small")];
            let root = hash(ROOTS[tree.len() - 1]);
            assert_eq!(
                verify_inclusion(leaf, index, tree_size, &proof, &root),
                Ok(())
            );
        }
    }

    #[test]
    fn consistency_proofs_of_the_reference_tree() {
        let leaves = vector_leaf_hashes();
        for (old_size, new_size, expected) in CONSISTENCY_PROOFS {
            let tree = &leaves[..usize::try_from(new_size).expect("small")];
            let proof = consistency_proof(tree, old_size).expect("sizes in range");
            assert_eq!(proof, hashes(expected), "{old_size} -> {new_size}");
            let old_root = hash(ROOTS[usize::try_from(old_size).expect("small") - 1]);
            let new_root = hash(ROOTS[tree.len() - 1]);
            assert_eq!(
                verify_consistency(old_size, new_size, &old_root, &new_root, &proof),
                Ok(())
            );
        }
    }

    // --- An independent reference, straight from RFC 9162 §2.1 ---

    /// MTH, PATH and PROOF/SUBPROOF written as the RFC defines them: recursively, over the
    /// raw entries `D[lo:hi]`, with their own hashing (sha2 directly) and their own way of
    /// finding `k`. Nothing is shared with the module under test. Subtree hashes are cached
    /// by range: unoptimised SHA-256 is slow, and the cache changes no result.
    mod reference {
        use std::cell::RefCell;
        use std::collections::HashMap;

        use sha2::{Digest, Sha256};

        pub type Digest32 = [u8; 32];

        fn sha(parts: &[&[u8]]) -> Digest32 {
            let mut hasher = Sha256::new();
            for part in parts {
                hasher.update(part);
            }
            hasher.finalize().into()
        }

        /// "k is the largest power of two smaller than n (i.e., k < n <= 2k)".
        fn k_for(n: usize) -> usize {
            let mut k = 1;
            while 2 * k < n {
                k *= 2;
            }
            k
        }

        /// The list of entries `D`; every tree is a prefix `D[0:n]`.
        pub struct Log<'a> {
            d: &'a [Vec<u8>],
            cache: RefCell<HashMap<(usize, usize), Digest32>>,
        }

        impl<'a> Log<'a> {
            pub fn new(d: &'a [Vec<u8>]) -> Self {
                Log {
                    d,
                    cache: RefCell::new(HashMap::new()),
                }
            }

            /// MTH(D[lo:hi]).
            pub fn mth(&self, lo: usize, hi: usize) -> Digest32 {
                if let Some(hash) = self.cache.borrow().get(&(lo, hi)) {
                    return *hash;
                }
                let hash = match hi - lo {
                    0 => sha(&[]),
                    1 => sha(&[&[0x00], &self.d[lo]]),
                    n => {
                        let k = k_for(n);
                        sha(&[&[0x01], &self.mth(lo, lo + k), &self.mth(lo + k, hi)])
                    }
                };
                self.cache.borrow_mut().insert((lo, hi), hash);
                hash
            }

            /// PATH(m, D[n]).
            pub fn path(&self, m: usize, n: usize) -> Vec<Digest32> {
                self.path_in(m, 0, n)
            }

            /// PATH(m, D[lo:hi]), m counted from lo.
            fn path_in(&self, m: usize, lo: usize, hi: usize) -> Vec<Digest32> {
                let n = hi - lo;
                assert!(m < n);
                if n == 1 {
                    return Vec::new();
                }
                let k = k_for(n);
                if m < k {
                    let mut p = self.path_in(m, lo, lo + k);
                    p.push(self.mth(lo + k, hi));
                    p
                } else {
                    let mut p = self.path_in(m - k, lo + k, hi);
                    p.push(self.mth(lo, lo + k));
                    p
                }
            }

            /// PROOF(m, D[n]) = SUBPROOF(m, D[n], true).
            pub fn proof(&self, m: usize, n: usize) -> Vec<Digest32> {
                self.subproof(m, 0, n, true)
            }

            /// SUBPROOF(m, D[lo:hi], b), m counted from lo.
            fn subproof(&self, m: usize, lo: usize, hi: usize, b: bool) -> Vec<Digest32> {
                let n = hi - lo;
                if m == n {
                    return if b {
                        Vec::new()
                    } else {
                        vec![self.mth(lo, hi)]
                    };
                }
                let k = k_for(n);
                if m <= k {
                    let mut p = self.subproof(m, lo, lo + k, b);
                    p.push(self.mth(lo + k, hi));
                    p
                } else {
                    let mut p = self.subproof(m - k, lo + k, hi, false);
                    p.push(self.mth(lo, lo + k));
                    p
                }
            }
        }
    }

    /// `n` distinct entries of varying length, derived from `seed`.
    fn entries(seed: u64, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut entry = seed.to_be_bytes().to_vec();
                entry.extend_from_slice(&size(i).to_be_bytes());
                entry.resize(16 + i % 7, 0xa5);
                entry
            })
            .collect()
    }

    fn leaf_hashes(entries: &[Vec<u8>]) -> Vec<Hash> {
        entries.iter().map(|e| leaf_hash(e)).collect()
    }

    /// Checks the module against the reference for the tree of the first `n` entries:
    /// roots, every inclusion proof and every consistency proof.
    fn check_against_reference(log: &reference::Log<'_>, leaves: &[Hash], n: usize) {
        let tree_size = size(n);
        let leaves = &leaves[..n];
        let expected_root = log.mth(0, n);
        assert_eq!(root(leaves), expected_root, "root of {n}");
        let mut compact = CompactTree::new();
        leaves.iter().for_each(|&leaf| compact.push(leaf));
        assert_eq!(compact.root(), expected_root, "compact root of {n}");
        for m in 0..n {
            let proof = inclusion_proof(leaves, size(m)).expect("index in range");
            assert_eq!(proof, log.path(m, n), "PATH({m}, D[{n}])");
            assert_eq!(
                verify_inclusion(&leaves[m], size(m), tree_size, &proof, &expected_root),
                Ok(()),
                "leaf {m} of {n}"
            );
        }
        for m in 1..=n {
            let proof = consistency_proof(leaves, size(m)).expect("size in range");
            assert_eq!(proof, log.proof(m, n), "PROOF({m}, D[{n}])");
            assert_eq!(
                verify_consistency(size(m), tree_size, &log.mth(0, m), &expected_root, &proof),
                Ok(()),
                "{m} -> {n}"
            );
        }
    }

    #[test]
    fn reference_reproduces_the_published_vectors() {
        // The reference is only a reference if it agrees with the published tree too.
        let entries: Vec<Vec<u8>> = LEAVES.iter().map(|l| unhex(l)).collect();
        let log = reference::Log::new(&entries);
        assert_eq!(log.mth(0, 0), hash(EMPTY_ROOT));
        for (i, expected) in ROOTS.iter().enumerate() {
            assert_eq!(log.mth(0, i + 1), hash(expected));
        }
        for (index, tree_size, expected) in INCLUSION_PROOFS {
            let index = usize::try_from(index).expect("small");
            let tree_size = usize::try_from(tree_size).expect("small");
            assert_eq!(log.path(index, tree_size), hashes(expected));
        }
        for (old_size, new_size, expected) in CONSISTENCY_PROOFS {
            let old_size = usize::try_from(old_size).expect("small");
            let new_size = usize::try_from(new_size).expect("small");
            assert_eq!(log.proof(old_size, new_size), hashes(expected));
        }
    }

    #[test]
    fn matches_reference_for_every_size_up_to_64() {
        let entries = entries(1, 64);
        let (log, leaves) = (reference::Log::new(&entries), leaf_hashes(&entries));
        for n in 1..=64 {
            check_against_reference(&log, &leaves, n);
        }
    }

    /// The same for every size up to 300: about 18 million node hashes in the module alone,
    /// some seconds optimised and minutes without.
    #[test]
    #[ignore = "slow unoptimised: run with `cargo test --release -- --ignored`"]
    fn matches_reference_for_every_size_up_to_300() {
        let entries = entries(1, 300);
        let (log, leaves) = (reference::Log::new(&entries), leaf_hashes(&entries));
        for n in 1..=300 {
            check_against_reference(&log, &leaves, n);
        }
    }

    #[test]
    fn compact_tree_matches_root_and_reference_at_every_size() {
        let entries = entries(2, 1100);
        let (log, leaves) = (reference::Log::new(&entries), leaf_hashes(&entries));
        let mut compact = CompactTree::new();
        for (i, &leaf) in leaves.iter().enumerate() {
            compact.push(leaf);
            assert_eq!(compact.size(), size(i + 1));
            let expected = log.mth(0, i + 1);
            assert_eq!(compact.root(), expected, "size {}", i + 1);
            if i < 300 {
                assert_eq!(root(&leaves[..=i]), expected, "size {}", i + 1);
            }
        }
    }

    // --- Negative cases ---

    /// The error `verify_inclusion` must give for a proof of `proof_len` hashes that is
    /// checked against the wrong index or size (and that size's own root).
    fn expected_inclusion_error(index: u64, tree_size: u64, proof_len: usize) -> ProofError {
        if index >= tree_size {
            ProofError::IndexOutOfRange
        } else if inclusion_proof_len(index, tree_size) != proof_len {
            ProofError::WrongProofLength
        } else {
            ProofError::RootMismatch
        }
    }

    /// The same for `verify_consistency`.
    fn expected_consistency_error(old_size: u64, new_size: u64, proof_len: usize) -> ProofError {
        if old_size == 0 || old_size > new_size {
            ProofError::SizeOutOfRange
        } else if consistency_proof_len(old_size, new_size) != proof_len {
            ProofError::WrongProofLength
        } else {
            ProofError::RootMismatch
        }
    }

    fn flip(hash: &Hash, bit: usize) -> Hash {
        let mut flipped = *hash;
        flipped[bit / 8 % 32] ^= 1 << (bit % 8);
        flipped
    }

    /// Sizes 1 to 40: every shape up to depth 6, including 32 and 33.
    const NEGATIVE_SIZES: usize = 40;

    #[test]
    fn inclusion_proof_rejects_every_alteration() {
        let leaves = leaf_hashes(&entries(3, 2 * NEGATIVE_SIZES));
        let roots: Vec<Hash> = (0..=leaves.len()).map(|n| root(&leaves[..n])).collect();
        let other = leaf_hash(b"not in the log");
        for n in 1..=NEGATIVE_SIZES {
            let tree_size = size(n);
            let tree_root = roots[n];
            for m in 0..n {
                let index = size(m);
                let leaf = &leaves[m];
                let proof = inclusion_proof(&leaves[..n], index).expect("in range");
                let verify = |leaf: &Hash, index, tree_size, proof: &[Hash], root: &Hash| {
                    verify_inclusion(leaf, index, tree_size, proof, root)
                };
                assert_eq!(verify(leaf, index, tree_size, &proof, &tree_root), Ok(()));

                // Any altered hash of the proof, any altered leaf or root.
                for i in 0..proof.len() {
                    for bit in [0, 100, 255] {
                        let mut altered = proof.clone();
                        altered[i] = flip(&altered[i], bit);
                        assert_eq!(
                            verify(leaf, index, tree_size, &altered, &tree_root),
                            Err(ProofError::RootMismatch),
                            "leaf {m} of {n}, proof[{i}] bit {bit}"
                        );
                    }
                }
                for (leaf, root) in [
                    (&other, tree_root),
                    (&flip(leaf, 7), tree_root),
                    (leaf, flip(&tree_root, 200)),
                    (leaf, empty_root()),
                ] {
                    assert_eq!(
                        verify(leaf, index, tree_size, &proof, &root),
                        Err(ProofError::RootMismatch),
                        "leaf {m} of {n}"
                    );
                }

                // Truncated at either end, extended at either end.
                if !proof.is_empty() {
                    for cut in [&proof[1..], &proof[..proof.len() - 1]] {
                        assert_eq!(
                            verify(leaf, index, tree_size, cut, &tree_root),
                            Err(ProofError::WrongProofLength)
                        );
                    }
                }
                for extra in [tree_root, [0; 32], *leaf] {
                    let mut longer = proof.clone();
                    longer.push(extra);
                    assert_eq!(
                        verify(leaf, index, tree_size, &longer, &tree_root),
                        Err(ProofError::WrongProofLength)
                    );
                    longer.rotate_right(1);
                    assert_eq!(
                        verify(leaf, index, tree_size, &longer, &tree_root),
                        Err(ProofError::WrongProofLength)
                    );
                }

                // Another leaf's index, with this tree's root.
                for wrong in [index.wrapping_sub(1), index + 1, index ^ 1, index ^ 2] {
                    if wrong == index {
                        continue;
                    }
                    assert_eq!(
                        verify(leaf, wrong, tree_size, &proof, &tree_root),
                        Err(expected_inclusion_error(wrong, tree_size, proof.len())),
                        "leaf {m} of {n} checked as leaf {wrong}"
                    );
                }

                // Another tree size, with the root of a tree of that size.
                for wrong in [n - 1, n + 1, 2 * n, n / 2] {
                    if wrong == n {
                        continue;
                    }
                    assert_eq!(
                        verify(leaf, index, size(wrong), &proof, &roots[wrong]),
                        Err(expected_inclusion_error(index, size(wrong), proof.len())),
                        "leaf {m} of {n} checked in a tree of {wrong}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_stated_size_is_bound_wherever_it_changes_the_path() {
        // RFC 9162 §2.1.3.2 with the *true* root and a false size fails whenever the false
        // size changes the proof's length or the left/right turns along the path. Where
        // neither changes (leaf 0 of 3 and of 4 take the same turns) the check still proves
        // something true: that leaf is at that index under that root.
        let leaves = leaf_hashes(&entries(4, 4));
        let root3 = root(&leaves[..3]);
        let proof = inclusion_proof(&leaves[..3], 0).expect("in range");
        assert_eq!(verify_inclusion(&leaves[0], 0, 3, &proof, &root3), Ok(()));
        assert_eq!(verify_inclusion(&leaves[0], 0, 4, &proof, &root3), Ok(()));
        for wrong_size in [1, 2, 5, 6, 8] {
            assert_eq!(
                verify_inclusion(&leaves[0], 0, wrong_size, &proof, &root3),
                Err(ProofError::WrongProofLength),
                "size {wrong_size}"
            );
        }
        let proof = inclusion_proof(&leaves[..3], 2).expect("in range");
        assert_eq!(verify_inclusion(&leaves[2], 2, 3, &proof, &root3), Ok(()));
        assert_eq!(
            verify_inclusion(&leaves[2], 2, 4, &proof, &root3),
            Err(ProofError::WrongProofLength)
        );
    }

    #[test]
    fn inclusion_proof_index_out_of_range() {
        let leaves = vector_leaf_hashes();
        assert_eq!(inclusion_proof(&[], 0), Err(ProofError::IndexOutOfRange));
        assert_eq!(
            inclusion_proof(&leaves, 8),
            Err(ProofError::IndexOutOfRange)
        );
        assert_eq!(
            inclusion_proof(&leaves, u64::MAX),
            Err(ProofError::IndexOutOfRange)
        );
        let root8 = hash(ROOTS[7]);
        for (index, tree_size) in [(0, 0), (1, 0), (8, 8), (9, 8), (u64::MAX, u64::MAX)] {
            assert_eq!(
                verify_inclusion(&leaves[0], index, tree_size, &[], &root8),
                Err(ProofError::IndexOutOfRange)
            );
        }
    }

    #[test]
    fn single_leaf_tree_proves_with_an_empty_proof() {
        let leaf = leaf_hash(b"data");
        assert_eq!(inclusion_proof(&[leaf], 0), Ok(vec![]));
        assert_eq!(verify_inclusion(&leaf, 0, 1, &[], &leaf), Ok(()));
        assert_eq!(
            verify_inclusion(&leaf, 0, 1, &[], &empty_root()),
            Err(ProofError::RootMismatch)
        );
        assert_eq!(
            verify_inclusion(&leaf, 0, 1, &[leaf], &leaf),
            Err(ProofError::WrongProofLength)
        );
    }

    #[test]
    fn consistency_proof_rejects_every_alteration() {
        let leaves = leaf_hashes(&entries(5, 2 * NEGATIVE_SIZES));
        let roots: Vec<Hash> = (0..=leaves.len()).map(|n| root(&leaves[..n])).collect();
        for n in 2..=NEGATIVE_SIZES {
            let new_size = size(n);
            for m in 1..n {
                let old_size = size(m);
                let proof = consistency_proof(&leaves[..n], old_size).expect("in range");
                let (old_root, new_root) = (roots[m], roots[n]);
                let verify =
                    |old_size, new_size, old_root: &Hash, new_root: &Hash, proof: &[Hash]| {
                        verify_consistency(old_size, new_size, old_root, new_root, proof)
                    };
                assert_eq!(
                    verify(old_size, new_size, &old_root, &new_root, &proof),
                    Ok(())
                );

                for i in 0..proof.len() {
                    for bit in [0, 129, 255] {
                        let mut altered = proof.clone();
                        altered[i] = flip(&altered[i], bit);
                        assert_eq!(
                            verify(old_size, new_size, &old_root, &new_root, &altered),
                            Err(ProofError::RootMismatch),
                            "{m} -> {n}, proof[{i}] bit {bit}"
                        );
                    }
                }
                for (a, b) in [
                    (new_root, old_root),
                    (flip(&old_root, 9), new_root),
                    (old_root, flip(&new_root, 9)),
                    (empty_root(), new_root),
                    (old_root, old_root),
                ] {
                    assert_eq!(
                        verify(old_size, new_size, &a, &b, &proof),
                        Err(ProofError::RootMismatch),
                        "{m} -> {n}"
                    );
                }

                assert_eq!(
                    verify(old_size, new_size, &old_root, &new_root, &[]),
                    Err(ProofError::WrongProofLength)
                );
                for cut in [&proof[1..], &proof[..proof.len() - 1]] {
                    assert_eq!(
                        verify(old_size, new_size, &old_root, &new_root, cut),
                        Err(ProofError::WrongProofLength)
                    );
                }
                for extra in [old_root, new_root, proof[0]] {
                    let mut longer = proof.clone();
                    longer.push(extra);
                    assert_eq!(
                        verify(old_size, new_size, &old_root, &new_root, &longer),
                        Err(ProofError::WrongProofLength)
                    );
                    longer.rotate_right(1);
                    assert_eq!(
                        verify(old_size, new_size, &old_root, &new_root, &longer),
                        Err(ProofError::WrongProofLength)
                    );
                }

                // Other sizes, each with the true roots of trees of those sizes.
                for (a, b) in [
                    (m - 1, n),
                    (m + 1, n),
                    (m ^ 2, n),
                    (m, n - 1),
                    (m, n + 1),
                    (m, 2 * n),
                    (m, n / 2),
                ] {
                    if (a, b) == (m, n) || a >= roots.len() {
                        continue;
                    }
                    assert_eq!(
                        verify(size(a), size(b), &roots[a], &roots[b], &proof),
                        Err(expected_consistency_error(size(a), size(b), proof.len())),
                        "{m} -> {n} checked as {a} -> {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn consistency_sizes_out_of_range() {
        let leaves = vector_leaf_hashes();
        let (r1, r8) = (hash(ROOTS[0]), hash(ROOTS[7]));
        for (leaves, old_size) in [
            (&leaves[..], 0),
            (&leaves[..], 9),
            (&[][..], 0),
            (&leaves[..], u64::MAX),
        ] {
            assert_eq!(
                consistency_proof(leaves, old_size),
                Err(ProofError::SizeOutOfRange)
            );
        }
        for (old_size, new_size) in [(0, 0), (0, 1), (0, 8), (2, 1), (8, 1), (9, 8)] {
            assert_eq!(
                verify_consistency(old_size, new_size, &r1, &r8, &[]),
                Err(ProofError::SizeOutOfRange),
                "{old_size} -> {new_size}"
            );
        }
    }

    #[test]
    fn equal_sizes_need_an_empty_proof_and_equal_roots() {
        let leaves = vector_leaf_hashes();
        for n in 1..=leaves.len() {
            assert_eq!(consistency_proof(&leaves[..n], size(n)), Ok(vec![]));
        }
        let r8 = hash(ROOTS[7]);
        assert_eq!(verify_consistency(8, 8, &r8, &r8, &[]), Ok(()));
        assert_eq!(
            verify_consistency(8, 8, &r8, &hash(ROOTS[6]), &[]),
            Err(ProofError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(8, 8, &r8, &r8, &[r8]),
            Err(ProofError::WrongProofLength)
        );
    }

    #[test]
    fn proof_lengths_stay_within_the_tree_depth() {
        // A path has at most one hash per level; a consistency proof at most one more.
        for n in 1u64..=600 {
            let depth = if n == 1 {
                0
            } else {
                (n - 1).ilog2() as usize + 1
            };
            for m in 0..n {
                assert!(inclusion_proof_len(m, n) <= depth, "{m} of {n}");
            }
            assert_eq!(inclusion_proof_len(0, n), depth, "leaf 0 of {n}");
            for m in 1..=n {
                assert!(consistency_proof_len(m, n) <= depth + 1, "{m} -> {n}");
            }
        }
    }

    // --- Properties ---

    proptest! {
        // Few cases: each hashes a tree of up to 2000 leaves several times, unoptimised.
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn random_trees_match_the_reference(
            seed in any::<u64>(),
            (n, m, old) in (1usize..=2000).prop_flat_map(|n| (Just(n), 0..n, 1..=n)),
            bit in 0usize..256,
        ) {
            let entries = entries(seed, n);
            let log = reference::Log::new(&entries);
            let leaves = leaf_hashes(&entries);
            let expected_root = log.mth(0, n);
            prop_assert_eq!(root(&leaves), expected_root);
            let mut compact = CompactTree::new();
            leaves.iter().for_each(|&leaf| compact.push(leaf));
            prop_assert_eq!(compact.root(), expected_root);
            prop_assert_eq!(compact.size(), size(n));

            let path = inclusion_proof(&leaves, size(m)).expect("in range");
            prop_assert_eq!(&path, &log.path(m, n));
            prop_assert_eq!(
                verify_inclusion(&leaves[m], size(m), size(n), &path, &expected_root),
                Ok(())
            );
            if !path.is_empty() {
                let mut altered = path.clone();
                let i = bit % altered.len();
                altered[i] = flip(&altered[i], bit);
                prop_assert_eq!(
                    verify_inclusion(&leaves[m], size(m), size(n), &altered, &expected_root),
                    Err(ProofError::RootMismatch)
                );
            }

            let proof = consistency_proof(&leaves, size(old)).expect("in range");
            prop_assert_eq!(&proof, &log.proof(old, n));
            let old_root = log.mth(0, old);
            prop_assert_eq!(
                verify_consistency(size(old), size(n), &old_root, &expected_root, &proof),
                Ok(())
            );
            if !proof.is_empty() {
                let mut altered = proof.clone();
                let i = bit % altered.len();
                altered[i] = flip(&altered[i], bit);
                prop_assert_eq!(
                    verify_consistency(size(old), size(n), &old_root, &expected_root, &altered),
                    Err(ProofError::RootMismatch)
                );
            }
        }
    }
}
