//! Node identity: the ed25519 key that names a node (its PeerId) and signs what it says.
//!
//! The key file holds the 32-byte ed25519 secret, hex-encoded on one line. It is created on
//! first use with mode 0600, and refused if anyone but its owner can read it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use libp2p::identity::{self, Keypair, PeerId};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "key file {path} has mode {mode:03o}: others can read it. Its secret may have leaked; \
         if you trust it, run `chmod 600 {path}`, else delete it to create a new identity"
    )]
    Insecure { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} belongs to user {owner}, not to this user ({me}): whoever owns it \
         knows its secret. Use a home of your own"
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// A node's key pair, usable by libp2p (Noise) and by ed25519-dalek (signatures).
#[derive(Clone)]
pub struct NodeIdentity {
    signing: SigningKey,
    keypair: Keypair,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads the key at `path`, or creates one there if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<NodeIdentity, IdentityError> {
        match fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(IdentityError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Loads an existing key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let read_err = |source| IdentityError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Insecure {
                path: path.to_path_buf(),
                mode,
            });
        }
        let (owner, me) = (
            std::os::unix::fs::MetadataExt::uid(&meta),
            crate::home::effective_uid(),
        );
        if owner != me {
            return Err(IdentityError::NotOwned {
                path: path.to_path_buf(),
                owner,
                me,
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        let corrupt = |reason: String| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = hex::decode(text.trim()).map_err(|e| corrupt(format!("not hex: {e}")))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| corrupt(format!("expected 32 bytes, found {}", b.len())))?;
        Ok(Self::from_secret(secret))
    }

    /// Creates a new key at `path` (mode 0600), failing if the file already exists.
    pub fn create(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let create_err = |source| IdentityError::Create {
            path: path.to_path_buf(),
            source,
        };
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        // The umask cannot widen 0600, but an inherited ACL default could: pin it.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(create_err)?;
        writeln!(file, "{}", hex::encode(secret)).map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        tracing::info!(path = %path.display(), "created a new node key");
        Ok(Self::from_secret(secret))
    }

    /// A key from its 32-byte secret (tests and tools that manage keys themselves).
    pub fn from_secret(secret: [u8; 32]) -> NodeIdentity {
        let signing = SigningKey::from_bytes(&secret);
        let keypair =
            Keypair::ed25519_from_bytes(secret).expect("32 bytes is a valid ed25519 secret");
        NodeIdentity { signing, keypair }
    }

    /// A fresh in-memory key.
    pub fn generate() -> NodeIdentity {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        Self::from_secret(secret)
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs `message` with the node key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// The ed25519 key inside an ed25519 PeerId, if it is one (mesh node ids always are).
pub fn verifying_key_of(peer: &PeerId) -> Option<VerifyingKey> {
    let public = identity::PublicKey::try_decode_protobuf(peer_public_key_bytes(peer)?).ok()?;
    let ed = public.try_into_ed25519().ok()?;
    VerifyingKey::from_bytes(&ed.to_bytes()).ok()
}

/// An ed25519 PeerId is an identity multihash (code 0x00) over the protobuf public key.
fn peer_public_key_bytes(peer: &PeerId) -> Option<&[u8]> {
    let mh = peer.as_ref();
    (mh.code() == 0x00).then(|| mh.digest())
}

/// Checks an ed25519 signature by the node named `peer`.
pub fn verify_by_peer(peer: &PeerId, message: &[u8], signature: &[u8]) -> bool {
    let (Some(key), Ok(sig)) = (
        verifying_key_of(peer),
        ed25519_dalek::Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_key_is_private_and_reloads_to_the_same_peer_id() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node.key");
        let a = NodeIdentity::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = NodeIdentity::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert!(a.peer_id().to_string().starts_with("12D3KooW"));
    }

    #[test]
    fn readable_key_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node.key");
        NodeIdentity::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeIdentity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Insecure { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn a_key_another_user_owns_is_refused() {
        if crate::home::effective_uid() != 0 {
            // Only root can give a file away; without it there is no such file to make.
            eprintln!("skipped: needs root to chown");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node.key");
        NodeIdentity::create(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = NodeIdentity::load(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::NotOwned { owner: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_key_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node.key");
        for bad in ["zz", "abcd", ""] {
            fs::write(&path, bad).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = NodeIdentity::load(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::Corrupt { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn signatures_verify_by_peer_id_only() {
        let a = NodeIdentity::generate();
        let b = NodeIdentity::generate();
        let sig = a.sign(b"card");
        assert!(verify_by_peer(&a.peer_id(), b"card", &sig));
        assert!(!verify_by_peer(&a.peer_id(), b"cart", &sig));
        assert!(!verify_by_peer(&b.peer_id(), b"card", &sig));
        assert!(!verify_by_peer(&a.peer_id(), b"card", &sig[..10]));
    }

    #[test]
    fn libp2p_and_dalek_see_the_same_key() {
        let a = NodeIdentity::generate();
        assert_eq!(verifying_key_of(&a.peer_id()), Some(a.verifying_key()));
    }
}
