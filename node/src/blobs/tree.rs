//! The mesh blob tree (v1): a Merkle tree of BLAKE3 hashes over a file's 256 KiB pieces, so
//! that each piece is checked against the file's root as it arrives, from any peer, without
//! trusting the peer's idea of the pieces.
//!
//! The shape is Certificate Transparency's (RFC 9162, section 2.1) with BLAKE3 as the hash:
//!
//! - the file is cut into pieces of [`PIECE_LEN`] bytes, the last one shorter; an empty file is
//!   one empty piece;
//! - `leaf(i) = BLAKE3(0x00 ‖ piece_i)`, `node(l, r) = BLAKE3(0x01 ‖ l ‖ r)`;
//! - the tree hash of leaves `D[0..n]` is the leaf for `n = 1`, else `node(MTH(D[0..k]),
//!   MTH(D[k..n]))` with `k` the largest power of two below `n`;
//! - the **root** binds the length too: `BLAKE3(0x02 ‖ u64_le(len) ‖ MTH)`, so a peer cannot
//!   claim another length (and so another piece count) for the same root.
//!
//! A piece travels with its audit path (the sibling hashes from the leaf up), and
//! [`verify_piece`] recomputes the root from the two. docs/protocol.md has the golden vectors,
//! which an independent Python implementation reproduces (tests/e2e/fixtures).

use std::collections::HashMap;
use std::io::Read;

/// Bytes in a piece (the last piece of a file may be shorter).
pub const PIECE_LEN: usize = 256 * 1024;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

const LEAF: u8 = 0x00;
const NODE: u8 = 0x01;
const ROOT: u8 = 0x02;

/// The leaf hash of one piece.
pub fn leaf(piece: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF]);
    h.update(piece);
    *h.finalize().as_bytes()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[NODE]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

fn root_of(len: u64, mth: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[ROOT]);
    h.update(&len.to_le_bytes());
    h.update(mth);
    *h.finalize().as_bytes()
}

/// Pieces in a file of `len` bytes.
pub fn piece_count(len: u64) -> u64 {
    len.div_ceil(PIECE_LEN as u64).max(1)
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// A file's tree: its length, its leaves and every inner node, to give any piece's proof.
#[derive(Debug, Clone)]
pub struct Tree {
    len: u64,
    leaves: Vec<Hash>,
    /// The tree hash of each range of leaves `(start, end)` the tree is made of.
    nodes: HashMap<(usize, usize), Hash>,
    root: Hash,
}

impl Tree {
    /// The tree of a file of `len` bytes whose pieces hash to `leaves` (in order).
    pub fn from_leaves(len: u64, leaves: Vec<Hash>) -> Result<Tree, TreeError> {
        if leaves.len() as u64 != piece_count(len) {
            return Err(TreeError::PieceCount {
                len,
                leaves: leaves.len(),
            });
        }
        let mut nodes = HashMap::with_capacity(2 * leaves.len());
        let mth = fill(&leaves, 0, leaves.len(), &mut nodes);
        Ok(Tree {
            root: root_of(len, &mth),
            len,
            leaves,
            nodes,
        })
    }

    /// Reads a whole file and builds its tree.
    pub fn read(mut reader: impl Read) -> std::io::Result<Tree> {
        let mut leaves = Vec::new();
        let mut len = 0u64;
        let mut piece = vec![0u8; PIECE_LEN];
        loop {
            let got = read_full(&mut reader, &mut piece)?;
            if got == 0 && !leaves.is_empty() {
                break;
            }
            leaves.push(leaf(&piece[..got]));
            len += got as u64;
            if got < PIECE_LEN {
                break;
            }
        }
        Ok(Tree::from_leaves(len, leaves).expect("one leaf per piece read"))
    }

    pub fn root(&self) -> Hash {
        self.root
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> u64 {
        self.leaves.len() as u64
    }

    pub fn leaves(&self) -> &[Hash] {
        &self.leaves
    }

    /// The audit path of piece `index`, leaf to root (`None`: no such piece).
    pub fn proof(&self, index: u64) -> Option<Vec<Hash>> {
        let n = self.leaves.len();
        let mut m = usize::try_from(index).ok().filter(|m| *m < n)?;
        let mut path = Vec::new();
        let (mut start, mut end) = (0, n);
        while end - start > 1 {
            let k = split(end - start);
            if m < k {
                path.push(self.nodes[&(start + k, end)]);
                end = start + k;
            } else {
                path.push(self.nodes[&(start, start + k)]);
                start += k;
                m -= k;
            }
        }
        path.reverse();
        Some(path)
    }
}

fn fill(
    leaves: &[Hash],
    start: usize,
    end: usize,
    nodes: &mut HashMap<(usize, usize), Hash>,
) -> Hash {
    let hash = if end - start == 1 {
        leaves[start]
    } else {
        let k = split(end - start);
        let left = fill(leaves, start, start + k, nodes);
        let right = fill(leaves, start + k, end, nodes);
        node(&left, &right)
    };
    nodes.insert((start, end), hash);
    hash
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Why a tree or a piece does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("a file of {len} bytes has {} pieces, not {leaves}", piece_count(*len))]
    PieceCount { len: u64, leaves: usize },
    #[error("piece {index} is outside a file of {pieces} pieces")]
    NoSuchPiece { index: u64, pieces: u64 },
    #[error("piece {index} is {got} bytes; it must be {want}")]
    PieceLength { index: u64, got: usize, want: usize },
    #[error(
        "piece {index} does not hash to the root (a corrupt or forged piece, or a wrong proof)"
    )]
    Mismatch { index: u64 },
}

/// The length piece `index` of a file of `len` bytes must have.
pub fn piece_len(len: u64, index: u64) -> usize {
    let start = index * PIECE_LEN as u64;
    (len.saturating_sub(start)).min(PIECE_LEN as u64) as usize
}

/// Checks piece `index` of the file of `len` bytes whose root is `root`, with its audit path.
pub fn verify_piece(
    root: &Hash,
    len: u64,
    index: u64,
    piece: &[u8],
    proof: &[Hash],
) -> Result<(), TreeError> {
    let pieces = piece_count(len);
    if index >= pieces {
        return Err(TreeError::NoSuchPiece { index, pieces });
    }
    let want = piece_len(len, index);
    if piece.len() != want {
        return Err(TreeError::PieceLength {
            index,
            got: piece.len(),
            want,
        });
    }
    if !leaf_in_root(root, len, index, &leaf(piece), proof) {
        return Err(TreeError::Mismatch { index });
    }
    Ok(())
}

/// Whether `leaf_hash`, as piece `index` of a file of `len` bytes, leads to `root` through
/// `proof`: RFC 9162, 2.1.3.2, walking up from the leaf, the sibling on the left or the right.
fn leaf_in_root(root: &Hash, len: u64, index: u64, leaf_hash: &Hash, proof: &[Hash]) -> bool {
    let (mut f, mut s) = (index, piece_count(len) - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && root_of(len, &r) == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn pieces(data: &[u8]) -> Vec<&[u8]> {
        if data.is_empty() {
            return vec![data];
        }
        data.chunks(PIECE_LEN).collect()
    }

    #[test]
    fn every_piece_of_trees_of_1_to_40_pieces_verifies_and_no_other_does() {
        for n in 1..=40u64 {
            // Leaves only: small pieces would do, but the lengths must be those of real files.
            let len = (n - 1) * PIECE_LEN as u64 + 7;
            let leaves: Vec<Hash> = (0..n).map(|i| leaf(&[i as u8; 3])).collect();
            let tree = Tree::from_leaves(len, leaves).unwrap();
            for i in 0..n {
                let proof = tree.proof(i).unwrap();
                assert!(
                    proof.len() as u32 <= 64 - (n - 1).leading_zeros(),
                    "n {n}: depth"
                );
                // A leaf check without the bytes: recompute from the leaf directly.
                let ok = leaf_in_root(&tree.root(), len, i, &tree.leaves()[i as usize], &proof);
                assert!(ok, "n {n}, piece {i}");
                if n > 1 {
                    let other = (i + 1) % n;
                    let wrong =
                        leaf_in_root(&tree.root(), len, other, &tree.leaves()[i as usize], &proof);
                    assert!(!wrong, "n {n}: piece {i}'s proof passed as piece {other}'s");
                }
            }
            assert!(tree.proof(n).is_none());
        }
    }

    #[test]
    fn a_real_file_verifies_piece_by_piece_and_a_flipped_byte_is_caught() {
        let data = bytes(3 * PIECE_LEN + 1000);
        let tree = Tree::read(&data[..]).unwrap();
        assert_eq!((tree.len(), tree.pieces()), (data.len() as u64, 4));
        for (i, piece) in pieces(&data).into_iter().enumerate() {
            let proof = tree.proof(i as u64).unwrap();
            verify_piece(&tree.root(), tree.len(), i as u64, piece, &proof).unwrap();
            let mut bad = piece.to_vec();
            let middle = bad.len() / 2;
            bad[middle] ^= 1;
            assert_eq!(
                verify_piece(&tree.root(), tree.len(), i as u64, &bad, &proof),
                Err(TreeError::Mismatch { index: i as u64 })
            );
        }
        let last = pieces(&data)[3];
        let proof = tree.proof(3).unwrap();
        let short = verify_piece(&tree.root(), tree.len(), 3, &last[..10], &proof);
        assert!(matches!(
            short,
            Err(TreeError::PieceLength { want: 1000, .. })
        ));
        // Another length for the same pieces is another root.
        let other = verify_piece(&tree.root(), tree.len() + 1, 3, last, &proof);
        assert!(other.is_err());
        assert!(matches!(
            verify_piece(&tree.root(), tree.len(), 4, last, &proof),
            Err(TreeError::NoSuchPiece { pieces: 4, .. })
        ));
    }

    #[test]
    fn the_empty_file_is_one_empty_piece() {
        let tree = Tree::read(&[][..]).unwrap();
        assert_eq!((tree.len(), tree.pieces()), (0, 1));
        verify_piece(&tree.root(), 0, 0, &[], &tree.proof(0).unwrap()).unwrap();
        let exact = Tree::read(&bytes(PIECE_LEN)[..]).unwrap();
        assert_eq!(
            exact.pieces(),
            1,
            "a file of exactly one piece has no empty second piece"
        );
        assert!(Tree::from_leaves(PIECE_LEN as u64 + 1, vec![leaf(b"")]).is_err());
    }

    /// The golden vectors of docs/protocol.md ("Blob tree"), which the Python implementation in
    /// tests/e2e/fixtures/blob_tree.py reproduces.
    #[test]
    fn golden_vectors() {
        let hex = |t: &Tree| hex::encode(t.root());
        let cases = [
            (
                0usize,
                "2ad8271432fb83a7d13be28019fb6f837eed45a0cc51b593dba892a1faf8a47d",
            ),
            (
                3,
                "653632fb1305d4f70c73e990b53d0579a8b50b96666712d6c88274a86176fbaa",
            ),
            (
                PIECE_LEN,
                "5f08ccb4ffcc80aa0085ac807461f1d2682bf69bc8ae6fbbcea772aa33284865",
            ),
            (
                PIECE_LEN + 1,
                "82ddae9f59a58c74a6c39c09e8f7b4e458d6809e1b5dd6916c98ffd48389b9cb",
            ),
            (
                5 * PIECE_LEN + 12345,
                "72fef65a6c3c278cfa91bf6a14c6b3810e15f59a061e1af94fcb42a40166281c",
            ),
        ];
        for (len, want) in cases {
            let tree = Tree::read(&bytes(len)[..]).unwrap();
            assert_eq!(hex(&tree), want, "{len} bytes");
        }
    }
}
