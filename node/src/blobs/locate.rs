//! Finding a file to pull: which file a model's name (or a sha256) stands for, its blob root,
//! its length, and the peers that hold it, from signed cards and the DHT.
//!
//! The (sha256, root) pair is the one the most providers sign; a node that signs another root
//! for the same sha256 is not a source. The length is the first answering holder's, checked
//! against the root by that answer's first piece (a wrong length fails every piece).

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;

use super::fetch::{fetch_run, PieceRun};
use super::tree::Hash;
use crate::directory::Listing;
use crate::models::library::{safe_name, Format};
use crate::models::{KnownModel, KNOWN_MODELS};
use crate::network::Client;

/// How long the peers' catalogs and the DHT are asked for the file's holders.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(30);

/// One file of a model found on the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedFile {
    /// Its name in the model's directory; `None` for the weights, named where they go.
    pub name: Option<String>,
    pub sha256: String,
    pub root: Hash,
    pub len: u64,
}

/// A model's files found on the mesh.
#[derive(Debug, Clone)]
pub struct Located {
    /// The model's name on the cards (a known model's own name when pinned).
    pub model: String,
    pub format: Format,
    /// The files, weights first.
    pub files: Vec<LocatedFile>,
    /// Whether the files are a known model's pinned ones.
    pub pinned: bool,
    pub sources: Vec<PeerId>,
}

impl Located {
    /// The weights file.
    pub fn weights(&self) -> &LocatedFile {
        &self.files[0]
    }

    /// Bytes of every file.
    pub fn len(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no peer this node can see serves the files of {0:?} (its card must name a blob root: a GGUF or BERT model hosted by a mesh of this version)")]
    NotFound(String),
    #[error("no peer this node can see serves the pinned files of the known model {0} (peers announce it with other weights, or not at all)")]
    NoPinned(String),
    #[error("none of the {0} peer(s) holding the file answered")]
    NoAnswer(usize),
}

/// What a card says the model's files are: the weights (sha256, root) and the other files by
/// name. Cards that agree on it name the same files.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Files {
    sha256: String,
    root: String,
    others: Vec<(String, String, String)>,
}

impl Files {
    /// The files `card` names, if it names a blob root and well-formed files.
    fn of(card: &mesh_protocol::ModelCard) -> Option<Files> {
        let root = card.blob_root.clone()?;
        if card.files.len() > mesh_protocol::card::MAX_CARD_FILES
            || card.files.iter().any(|f| f.validate().is_err())
        {
            return None;
        }
        let mut others: Vec<(String, String, String)> = card
            .files
            .iter()
            .map(|f| (f.name.clone(), f.sha256.clone(), f.blob_root.clone()))
            .collect();
        others.sort();
        let before = others.len();
        others.dedup_by(|a, b| a.0 == b.0);
        (others.len() == before).then(|| Files {
            sha256: card.sha256.clone(),
            root,
            others,
        })
    }

    /// The files a known model is pinned to.
    fn pinned(known: &KnownModel) -> Files {
        let mut others: Vec<(String, String, String)> = known.files[1..]
            .iter()
            .map(|f| {
                (
                    f.name.to_string(),
                    f.sha256.to_string(),
                    f.blob_root.to_string(),
                )
            })
            .collect();
        others.sort();
        Files {
            sha256: known.files[0].sha256.into(),
            root: known.files[0].blob_root.into(),
            others,
        }
    }
}

/// The known model `what` names, by its name or its weights' sha256.
fn known_for(what: &str, by_sha: Option<&str>) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|k| match by_sha {
        Some(hex) => k.files[0].sha256 == hex,
        None => k.name == what,
    })
}

/// Finds `what` (a model name, or `sha256:HEX`) on the mesh, from `from` only if not empty.
/// A known model (by name or by its weights' sha256) is taken only with its pinned files.
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
    let known = known_for(what, by_sha.as_deref());
    let matches = |l: &&Listing| match (&by_sha, known) {
        (_, Some(k)) => l.card.sha256 == k.files[0].sha256,
        (Some(hex), None) => l.card.sha256 == *hex,
        (None, None) => l.card.name == what,
    };
    let cards: Vec<(&Listing, Files)> = listings
        .iter()
        .filter(matches)
        .filter_map(|l| Some((l, Files::of(&l.card)?)))
        .collect();
    let chosen = match known {
        Some(k) => {
            let pin = Files::pinned(k);
            if !cards.iter().any(|(_, f)| *f == pin) {
                return Err(LocateError::NoPinned(k.name.into()));
            }
            pin
        }
        None => {
            let mut votes: BTreeMap<&Files, usize> = BTreeMap::new();
            for (_, files) in &cards {
                *votes.entry(files).or_default() += 1;
            }
            let (files, _) = votes
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .ok_or_else(|| LocateError::NotFound(what.to_string()))?;
            files.clone()
        }
    };
    let agreeing: Vec<&Listing> = cards
        .iter()
        .filter(|(_, f)| *f == chosen)
        .map(|(l, _)| *l)
        .collect();
    let (model, format) = match (known, agreeing.first()) {
        (Some(k), _) => (
            k.name.to_string(),
            crate::models::library::known_entry(k).format,
        ),
        (None, Some(l)) => (l.card.name.clone(), format_of(&l.card.architecture)),
        (None, None) => return Err(LocateError::NotFound(what.to_string())),
    };
    let mut sources: Vec<PeerId> = agreeing
        .iter()
        .filter_map(|l| l.peer_id.parse().ok())
        .collect();
    if let Ok(Ok(hosts)) =
        tokio::time::timeout(FIND_TIMEOUT, client.find_blob_hosts(&chosen.sha256)).await
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
    let wanted = std::iter::once((None, &chosen.sha256, &chosen.root)).chain(
        chosen
            .others
            .iter()
            .map(|(name, sha, root)| (Some(name.clone()), sha, root)),
    );
    let mut files = Vec::new();
    for (name, sha256, root_hex) in wanted {
        let root: Hash = hex::decode(root_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| LocateError::NotFound(what.to_string()))?;
        let len = probe_len(client, &sources, &root, token)
            .await
            .ok_or(LocateError::NoAnswer(sources.len()))?;
        files.push(LocatedFile {
            name,
            sha256: sha256.clone(),
            root,
            len,
        });
    }
    Ok(Located {
        model,
        format,
        files,
        pinned: known.is_some(),
        sources,
    })
}

/// A card's architecture as a cache format.
fn format_of(architecture: &str) -> Format {
    if architecture == "bert" {
        Format::Bert
    } else {
        Format::Gguf
    }
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

/// Where a pull goes in `models_dir`: the entry's name, and the name of its weights file in
/// the entry's directory. A known model goes to its own place (so `--model NAME` and `mesh
/// model fetch` find it); any other to `<models>/NAME/` (`name`, else the model's name, made
/// safe), its weights `NAME.gguf` or, for a BERT directory, `model.safetensors`.
pub fn destination(located: &Located, name: Option<&str>) -> (String, String) {
    if let Some(known) = KNOWN_MODELS
        .iter()
        .find(|k| k.files[0].sha256 == located.weights().sha256)
    {
        return (known.name.into(), known.files[0].name.into());
    }
    let entry = safe_name(name.unwrap_or(&located.model));
    let weights = match located.format {
        Format::Gguf => format!("{entry}.gguf"),
        Format::Bert => crate::engine::bert::WEIGHTS_FILE.to_string(),
    };
    (entry, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(model: &str, sha256: &str, format: Format) -> Located {
        Located {
            model: model.into(),
            format,
            files: vec![LocatedFile {
                name: None,
                sha256: sha256.into(),
                root: [0; 32],
                len: 1,
            }],
            pinned: false,
            sources: Vec::new(),
        }
    }

    #[test]
    fn a_known_file_goes_to_its_model_and_any_other_to_an_entry_of_its_name() {
        let smol = crate::models::find_known("smollm2-135m-instruct").unwrap();
        let known = destination(&located("smol", smol.files[0].sha256, Format::Gguf), None);
        assert_eq!(known, (smol.name.into(), smol.files[0].name.into()));
        let other = located("org/model:q4", &"0".repeat(64), Format::Gguf);
        let expected = ("org_model_q4".into(), "org_model_q4.gguf".into());
        assert_eq!(destination(&other, None), expected);
        let named = destination(&other, Some("Mine"));
        assert_eq!(named, ("mine".into(), "mine.gguf".into()));
        let bert = located("e5", &"1".repeat(64), Format::Bert);
        assert_eq!(
            destination(&bert, None),
            ("e5".into(), "model.safetensors".into())
        );
    }

    fn card(files: Vec<mesh_protocol::CardFile>) -> mesh_protocol::ModelCard {
        let mut card = crate::test_support::card("m", mesh_protocol::Task::Embed);
        card.sha256 = "ab".repeat(32);
        card.blob_root = Some("cd".repeat(32));
        card.files = files;
        card
    }

    fn file(name: &str) -> mesh_protocol::CardFile {
        mesh_protocol::CardFile {
            name: name.into(),
            sha256: "ef".repeat(32),
            blob_root: "01".repeat(32),
        }
    }

    #[test]
    fn a_card_naming_unsafe_or_twice_named_files_is_no_source() {
        assert!(Files::of(&card(vec![file("config.json"), file("tokenizer.json")])).is_some());
        assert!(Files::of(&card(vec![file("../etc/passwd")])).is_none());
        assert!(Files::of(&card(vec![file("a"), file("a")])).is_none());
        let many = (0..9).map(|i| file(&format!("f{i}"))).collect();
        assert!(Files::of(&card(many)).is_none());
        let mut no_root = card(Vec::new());
        no_root.blob_root = None;
        assert!(Files::of(&no_root).is_none());
    }

    #[test]
    fn a_known_model_is_pinned_to_every_one_of_its_files() {
        let minilm = crate::models::find_known("all-minilm-l6-v2").unwrap();
        let pin = Files::pinned(minilm);
        assert_eq!(pin.sha256, minilm.files[0].sha256);
        assert_eq!(pin.root, minilm.files[0].blob_root);
        let names: Vec<&str> = pin.others.iter().map(|o| o.0.as_str()).collect();
        assert_eq!(names, ["config.json", "tokenizer.json"]);
        // A card with the pinned weights and another tokenizer is not the pinned model.
        let mut card = card(
            minilm.files[1..]
                .iter()
                .map(|f| mesh_protocol::CardFile {
                    name: f.name.into(),
                    sha256: f.sha256.into(),
                    blob_root: f.blob_root.into(),
                })
                .collect(),
        );
        card.sha256 = minilm.files[0].sha256.into();
        card.blob_root = Some(minilm.files[0].blob_root.into());
        assert_eq!(Files::of(&card), Some(pin.clone()));
        card.files[1].sha256 = "00".repeat(32);
        assert_ne!(Files::of(&card), Some(pin));
        let by_sha = known_for("x", Some(minilm.files[0].sha256)).map(|k| k.name);
        assert_eq!(by_sha, Some(minilm.name));
    }
}
