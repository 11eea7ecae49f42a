//! Finding a file to pull: which file a model's name (or a sha256) stands for, its blob root,
//! its length, and the peers that hold it, from signed cards and the DHT.
//!
//! The (sha256, root) pair is the one the most providers sign; a node that signs another root
//! for the same sha256 is not a source. The length is the first answering holder's, checked
//! against the root by that answer's first piece (a wrong length fails every piece).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::PeerId;

use super::fetch::{fetch_run, PieceRun};
use super::tree::Hash;
use crate::directory::Listing;
use crate::models::KNOWN_MODELS;
use crate::network::Client;

/// How long the peers' catalogs and the DHT are asked for the file's holders.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(30);

/// A file found on the mesh.
#[derive(Debug, Clone)]
pub struct Located {
    /// The model's name on the cards.
    pub model: String,
    pub sha256: String,
    pub root: Hash,
    pub len: u64,
    pub sources: Vec<PeerId>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no peer this node can see serves a file for {0:?} (its card must name a blob root: a GGUF model hosted by a mesh of this version)")]
    NotFound(String),
    #[error("none of the {0} peer(s) holding the file answered")]
    NoAnswer(usize),
}

/// Finds `what` (a model name, or `sha256:HEX`) on the mesh, from `from` only if not empty.
pub async fn locate(
    client: &Client,
    what: &str,
    from: &[PeerId],
    token: Option<&[u8]>,
) -> Result<Located, LocateError> {
    let by_sha = what.strip_prefix("sha256:").map(str::to_lowercase);
    match &by_sha {
        Some(hex) if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            return Err(LocateError::BadRequest(format!(
                "{what:?}: a sha256 is 64 hex digits"
            )));
        }
        Some(_) => {}
        None => mesh_protocol::ids::validate_model_name(what).map_err(LocateError::BadRequest)?,
    }
    for peer in from {
        let _ = tokio::time::timeout(FIND_TIMEOUT, client.connect(*peer)).await;
    }
    let listings = tokio::time::timeout(FIND_TIMEOUT, crate::directory::list(client, None))
        .await
        .unwrap_or_default();
    let matches = |l: &&Listing| match &by_sha {
        Some(hex) => l.card.sha256 == *hex,
        None => l.card.name == what,
    };
    let cards: Vec<&Listing> = listings
        .iter()
        .filter(matches)
        .filter(|l| l.card.blob_root.is_some())
        .collect();
    let mut votes: BTreeMap<(String, String), usize> = BTreeMap::new();
    for l in &cards {
        let key = (
            l.card.sha256.clone(),
            l.card.blob_root.clone().unwrap_or_default(),
        );
        *votes.entry(key).or_default() += 1;
    }
    let ((sha256, root_hex), _) = votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .ok_or_else(|| LocateError::NotFound(what.to_string()))?;
    let root: Hash = hex::decode(&root_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| LocateError::NotFound(what.to_string()))?;
    let model = cards
        .iter()
        .find(|l| l.card.sha256 == sha256)
        .map_or_else(|| what.to_string(), |l| l.card.name.clone());
    let mut sources: Vec<PeerId> = cards
        .iter()
        .filter(|l| l.card.sha256 == sha256 && l.card.blob_root.as_deref() == Some(&root_hex))
        .filter_map(|l| l.peer_id.parse().ok())
        .collect();
    if let Ok(Ok(hosts)) = tokio::time::timeout(FIND_TIMEOUT, client.find_blob_hosts(&sha256)).await
    {
        sources.extend(hosts);
    }
    if !from.is_empty() {
        sources.retain(|p| from.contains(p));
        sources.extend(from.iter().copied());
    }
    sources.sort();
    sources.dedup();
    sources.retain(|p| *p != client.local_peer_id());
    let len = probe_len(client, &sources, &root, token)
        .await
        .ok_or(LocateError::NoAnswer(sources.len()))?;
    Ok(Located {
        model,
        sha256,
        root,
        len,
        sources,
    })
}

/// The file's length, from the first source whose first piece verifies with it.
async fn probe_len(
    client: &Client,
    sources: &[PeerId],
    root: &Hash,
    token: Option<&[u8]>,
) -> Option<u64> {
    for peer in sources {
        let run = PieceRun {
            root: *root,
            len: None,
            first: 0,
            count: 1,
            token: token.map(<[u8]>::to_vec),
        };
        match fetch_run(client, *peer, &run, |_| {}).await {
            Ok(len) => return Some(len),
            Err(e) => tracing::info!(%peer, "not a source: {e}"),
        }
    }
    None
}

/// Where a pulled file goes in `models_dir`: a known model's own place (so `--model NAME`
/// finds it), else `pulled/NAME.gguf` (`name`, else the model's name).
pub fn destination(models_dir: &Path, model: &str, sha256: &str, name: Option<&str>) -> PathBuf {
    for known in KNOWN_MODELS {
        if let Some(file) = known.files.iter().find(|f| f.sha256 == sha256) {
            return crate::models::model_dir(models_dir, known).join(file.name);
        }
    }
    let safe: String = name
        .unwrap_or(model)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    models_dir.join("pulled").join(format!("{safe}.gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_file_goes_to_its_model_and_any_other_to_pulled() {
        let dir = Path::new("/m");
        let smol = crate::models::find_known("smollm2-135m-instruct").unwrap();
        let known = destination(dir, "smol", smol.files[0].sha256, None);
        assert_eq!(
            known,
            dir.join("smollm2-135m-instruct").join(smol.files[0].name)
        );
        let other = destination(dir, "org/model:q4", &"0".repeat(64), None);
        assert_eq!(other, dir.join("pulled").join("org_model_q4.gguf"));
        let named = destination(dir, "x", &"0".repeat(64), Some("mine"));
        assert_eq!(named, dir.join("pulled").join("mine.gguf"));
    }
}
