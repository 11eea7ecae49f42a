//! Model files as content-addressed blobs, carried over the mesh (`/mesh/blob/1`).
//!
//! - [`tree`]: the blob tree (BLAKE3 over 256 KiB pieces), its root and each piece's proof.
//! - This module: hashing a file once for both its sha256 (the card's) and its tree
//!   ([`hash_file`]), and the [`Blob`]s a node serves, by root ([`BlobStore`]).
//! - `crate::serve::blob`: serving pieces to peers, under the model's access policy.

pub mod fetch;
pub mod job;
pub mod locate;
pub mod pull;
pub mod rate;
pub mod schedule;
pub mod tree;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use tree::{Hash, Tree, PIECE_LEN};

/// One file this node can serve: where it is, its sha256 and its tree.
#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    /// sha256 of the whole file, lower-case hex (the card's `sha256`).
    pub sha256: String,
    pub tree: Arc<Tree>,
}

impl Blob {
    /// The tree's root, lower-case hex (the card's `blob_root`).
    pub fn root_hex(&self) -> String {
        hex::encode(self.tree.root())
    }
}

/// Reads `path` once: its sha256 and its blob tree.
pub fn hash_file(path: &Path) -> std::io::Result<Blob> {
    let file = std::fs::File::open(path)?;
    let mut sha = Sha256::new();
    let tee = Tee {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        sha: &mut sha,
    };
    let tree = Tree::read(tee)?;
    Ok(Blob {
        path: path.to_path_buf(),
        sha256: hex::encode(sha.finalize()),
        tree: Arc::new(tree),
    })
}

/// The sha256 and blob tree of `data`, the contents of `path`, already in memory.
pub fn hash_bytes(path: &Path, data: &[u8]) -> Blob {
    let tree = Tree::read(data).expect("reading from memory does not fail");
    Blob {
        path: path.to_path_buf(),
        sha256: hex::encode(Sha256::digest(data)),
        tree: Arc::new(tree),
    }
}

/// A reader that feeds what it reads to a sha256 as well.
struct Tee<'a, R> {
    inner: R,
    sha: &'a mut Sha256,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// The blobs a node serves, by root, each with the model whose access policy it follows.
#[derive(Debug, Default, Clone)]
pub struct BlobStore {
    by_root: HashMap<Hash, (Blob, String)>,
}

impl BlobStore {
    /// Serves `blob` as a file of model `model`.
    pub fn add(&mut self, model: &str, blob: Blob) {
        self.by_root
            .insert(blob.tree.root(), (blob, model.to_string()));
    }

    /// The blob with root `root`, and the model it belongs to.
    pub fn get(&self, root: &[u8]) -> Option<(&Blob, &str)> {
        let root: Hash = root.try_into().ok()?;
        self.by_root.get(&root).map(|(b, m)| (b, m.as_str()))
    }

    pub fn len(&self) -> usize {
        self.by_root.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_root.is_empty()
    }

    /// Every blob, with its model.
    pub fn iter(&self) -> impl Iterator<Item = (&Blob, &str)> {
        self.by_root.values().map(|(b, m)| (b, m.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_read_gives_the_sha256_and_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.gguf");
        let data: Vec<u8> = (0..(2 * PIECE_LEN + 5)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let blob = hash_file(&path).unwrap();
        assert_eq!(blob.sha256, crate::models::sha256_file(&path).unwrap());
        assert_eq!(blob.tree.root(), Tree::read(&data[..]).unwrap().root());
        assert_eq!(blob.tree.len(), data.len() as u64);
        let mut store = BlobStore::default();
        store.add("m", blob.clone());
        let (found, model) = store.get(&blob.tree.root()).unwrap();
        assert_eq!((found.sha256.as_str(), model), (blob.sha256.as_str(), "m"));
        assert!(store.get(&[0u8; 32]).is_none());
        assert!(store.get(&[0u8; 5]).is_none(), "a root of another size");
    }
}
