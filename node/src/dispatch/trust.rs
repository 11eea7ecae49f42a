//! Which providers an `any` call may use. Anyone can announce any model name, so a name alone
//! says nothing about what answers it. Two checks close that:
//!
//! - **Pinned weights.** A call may name the weights it wants: `NAME@sha256:HEX` in the model
//!   field (every front end), or [`InferSpec::weights`] (`mesh infer --sha256`). A name that is
//!   one of mesh's known models ([`crate::models::KNOWN_MODELS`]) is pinned to that model's
//!   weights without being asked. A provider whose signed card names other weights is left out.
//! - **Trusted providers.** `mesh join --trust-provider [MODEL=]PEER_ID` (and
//!   `--trust-providers-file`) restricts a name, or every name, to chosen providers; the
//!   [`ProviderTrust`] of the node's API.
//!
//! This node's own models are always trusted (its operator chose them), but are held to a pin
//! like any other provider.
//!
//! [`InferSpec::weights`]: super::InferSpec::weights

use std::collections::{HashMap, HashSet};
use std::path::Path;

use libp2p::PeerId;
use mesh_protocol::{ErrorCode, WireError};

use super::candidates::Candidate;

/// What separates a model name from the weights it is pinned to.
pub const PIN_SEPARATOR: &str = "@sha256:";

/// Most entries in a trusted-providers file (as for allow lists).
const MAX_TRUST_ENTRIES: usize = 10_000;

/// A model field split into the name and the pinned weights: `NAME` or `NAME@sha256:HEX`
/// (64 hex digits, either case; kept lower-case).
pub fn split_pinned(model: &str) -> Result<(&str, Option<String>), WireError> {
    let Some((name, hex)) = model.split_once(PIN_SEPARATOR) else {
        return Ok((model, None));
    };
    let pin = parse_sha256(hex).map_err(|why| {
        WireError::bad_request(format!(
            "model {model:?}: the weights after {PIN_SEPARATOR:?} {why}"
        ))
    })?;
    Ok((name, Some(pin)))
}

/// A sha256 as 64 hex digits, lower-cased.
pub fn parse_sha256(hex: &str) -> Result<String, String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "must be a sha256: 64 hex digits, not {} characters",
            hex.len()
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// The weights a known model's name is pinned to without being asked.
pub fn known_pin(model: &str) -> Option<&'static str> {
    crate::models::find_known(model).map(|m| m.files[0].sha256)
}

/// The providers trusted for model names: some for every name, some for one name each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderTrust {
    everywhere: HashSet<PeerId>,
    by_model: HashMap<String, HashSet<PeerId>>,
}

/// A `--trust-provider` entry that is not `PEER_ID` or `MODEL=PEER_ID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTrust {
    #[error("{entry:?} is not PEER_ID or MODEL=PEER_ID: {reason}")]
    Entry { entry: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

impl ProviderTrust {
    /// No restriction: every provider of a name may answer it.
    pub fn is_open(&self) -> bool {
        self.everywhere.is_empty() && self.by_model.is_empty()
    }

    /// Adds one entry: `PEER_ID` (trusted for every name) or `MODEL=PEER_ID`.
    pub fn add(&mut self, entry: &str) -> Result<(), BadTrust> {
        let bad = |reason: String| BadTrust::Entry {
            entry: entry.to_string(),
            reason,
        };
        let entry = entry.trim();
        let (model, peer) = match entry.rsplit_once('=') {
            Some((model, peer)) => (Some(model.trim()), peer.trim()),
            None => (None, entry),
        };
        let peer: PeerId = peer
            .parse()
            .map_err(|e| bad(format!("not a peer id: {e}")))?;
        match model {
            Some(model) => {
                mesh_protocol::ids::validate_model_name(model).map_err(bad)?;
                self.by_model
                    .entry(model.to_string())
                    .or_default()
                    .insert(peer);
            }
            None => {
                self.everywhere.insert(peer);
            }
        }
        Ok(())
    }

    /// Adds the entries of a file: one per line, blank lines and `#` comments skipped.
    pub fn add_file(&mut self, path: &Path) -> Result<(), BadTrust> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| BadTrust::File {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let entries: Vec<&str> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect();
        if entries.len() > MAX_TRUST_ENTRIES {
            return Err(BadTrust::File {
                path: shown,
                reason: format!("{} entries; at most {MAX_TRUST_ENTRIES}", entries.len()),
            });
        }
        for (n, entry) in entries.into_iter().enumerate() {
            self.add(entry).map_err(|e| BadTrust::File {
                path: shown.clone(),
                reason: format!("entry {}: {e}", n + 1),
            })?;
        }
        Ok(())
    }

    /// The providers `model` is restricted to, if it is: those named for it, else those named
    /// for every model.
    pub fn for_model(&self, model: &str) -> Option<&HashSet<PeerId>> {
        self.by_model
            .get(model)
            .or((!self.everywhere.is_empty()).then_some(&self.everywhere))
    }
}

/// Why a provider was left out of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    /// Its signed card names other weights than the pinned ones.
    OtherWeights { peer: PeerId, sha256: String },
    /// It is not among the providers trusted for the name.
    NotTrusted { peer: PeerId },
}

/// What one call accepts of a provider: the weights it is pinned to, and the providers it is
/// restricted to (this node always among them).
#[derive(Debug, Clone, Default)]
pub struct Admission {
    pub pin: Option<String>,
    pub trusted: Option<HashSet<PeerId>>,
}

impl Admission {
    /// The admission of a call on `model` (already split from its pin) with `pin`, under
    /// `trust`, made by node `me`.
    pub fn new(model: &str, pin: Option<String>, trust: &ProviderTrust, me: PeerId) -> Admission {
        let pin = pin.or_else(|| known_pin(model).map(str::to_string));
        let trusted = trust.for_model(model).map(|peers| {
            let mut peers = peers.clone();
            peers.insert(me);
            peers
        });
        Admission { pin, trusted }
    }

    /// Whether a call may go to `candidate`.
    pub fn admits(&self, candidate: &Candidate) -> Result<(), Excluded> {
        if let Some(pin) = &self.pin {
            if !candidate.card.sha256.eq_ignore_ascii_case(pin) {
                return Err(Excluded::OtherWeights {
                    peer: candidate.peer,
                    sha256: candidate.card.sha256.clone(),
                });
            }
        }
        match &self.trusted {
            Some(peers) if !peers.contains(&candidate.peer) => Err(Excluded::NotTrusted {
                peer: candidate.peer,
            }),
            _ => Ok(()),
        }
    }

    /// The candidates a call may use, and why the others were left out.
    pub fn filter(&self, found: Vec<Candidate>) -> (Vec<Candidate>, Vec<Excluded>) {
        let mut kept = Vec::with_capacity(found.len());
        let mut excluded = Vec::new();
        for candidate in found {
            match self.admits(&candidate) {
                Ok(()) => kept.push(candidate),
                Err(why) => excluded.push(why),
            }
        }
        (kept, excluded)
    }

    /// The failure of a call every provider of which was left out.
    pub fn refusal(&self, model: &str, excluded: &[Excluded]) -> WireError {
        let other_weights: Vec<String> = excluded
            .iter()
            .filter_map(|e| match e {
                Excluded::OtherWeights { peer, sha256 } => Some(format!("{peer} ({sha256})")),
                Excluded::NotTrusted { .. } => None,
            })
            .collect();
        let untrusted: Vec<String> = excluded
            .iter()
            .filter_map(|e| match e {
                Excluded::NotTrusted { peer } => Some(peer.to_string()),
                Excluded::OtherWeights { .. } => None,
            })
            .collect();
        let mut why = Vec::new();
        if !other_weights.is_empty() {
            why.push(format!(
                "{} serve other weights than the pinned sha256 {}: {}",
                other_weights.len(),
                self.pin.as_deref().unwrap_or("?"),
                other_weights.join(", ")
            ));
        }
        if !untrusted.is_empty() {
            why.push(format!(
                "{} are not among the providers trusted for it (--trust-provider): {}",
                untrusted.len(),
                untrusted.join(", ")
            ));
        }
        WireError::new(
            ErrorCode::UnknownModel,
            format!(
                "no provider of model {model:?} may answer: {}",
                why.join("; ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_peer as peer;
    use mesh_protocol::{ModelCard, Task};

    fn candidate(peer: PeerId, sha256: &str) -> Candidate {
        Candidate {
            peer,
            card: ModelCard {
                sha256: sha256.into(),
                ..crate::test_support::card("m", Task::Generate)
            },
            load: 0,
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_model_field_splits_into_name_and_pin() {
        assert_eq!(split_pinned("smol").unwrap(), ("smol", None));
        let upper = format!("smol@sha256:{}", A.to_uppercase());
        assert_eq!(split_pinned(&upper).unwrap(), ("smol", Some(A.to_string())));
        for bad in [
            "smol@sha256:abc",
            "smol@sha256:",
            &format!("smol@sha256:{A}0"),
        ] {
            let e = split_pinned(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad}");
            assert!(e.message.contains("64 hex digits"), "{}", e.message);
        }
        let not_hex = format!("smol@sha256:{}", "g".repeat(64));
        assert!(split_pinned(&not_hex).is_err());
    }

    #[test]
    fn known_models_are_pinned_without_being_asked() {
        let known = crate::models::KNOWN_MODELS[0];
        let me = peer();
        let admission = Admission::new(known.name, None, &ProviderTrust::default(), me);
        assert_eq!(admission.pin.as_deref(), Some(known.files[0].sha256));
        let honest = candidate(peer(), known.files[0].sha256);
        let liar = candidate(peer(), A);
        assert!(admission.admits(&honest).is_ok());
        assert_eq!(
            admission.admits(&liar),
            Err(Excluded::OtherWeights {
                peer: liar.peer,
                sha256: A.into()
            })
        );
        // Another name is not pinned; an explicit pin wins over none.
        let free = Admission::new("my-model", None, &ProviderTrust::default(), me);
        assert!(free.admits(&liar).is_ok());
        let pinned = Admission::new("my-model", Some(B.into()), &ProviderTrust::default(), me);
        assert!(pinned.admits(&liar).is_err());
        assert!(pinned.admits(&candidate(peer(), B)).is_ok());
    }

    #[test]
    fn trusted_providers_restrict_a_name_or_every_name_and_this_node_is_always_trusted() {
        let (me, good, other) = (peer(), peer(), peer());
        let mut trust = ProviderTrust::default();
        assert!(trust.is_open());
        trust.add(&format!("m={good}")).unwrap();
        let admission = Admission::new("m", None, &trust, me);
        assert!(admission.admits(&candidate(good, A)).is_ok());
        assert!(admission.admits(&candidate(me, A)).is_ok());
        assert_eq!(
            admission.admits(&candidate(other, A)),
            Err(Excluded::NotTrusted { peer: other })
        );
        // Another name is open until a provider is trusted for every name.
        assert!(Admission::new("n", None, &trust, me)
            .admits(&candidate(other, A))
            .is_ok());
        trust.add(&good.to_string()).unwrap();
        assert!(Admission::new("n", None, &trust, me)
            .admits(&candidate(other, A))
            .is_err());

        let (kept, excluded) = admission.filter(vec![candidate(other, A), candidate(good, A)]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].peer, good);
        let refusal = admission.refusal("m", &excluded);
        assert_eq!(refusal.code, ErrorCode::UnknownModel);
        assert!(
            refusal.message.contains(&other.to_string()),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn bad_entries_and_files_are_clear_errors() {
        let mut trust = ProviderTrust::default();
        let e = trust.add("not-a-peer").unwrap_err();
        assert!(e.to_string().contains("not a peer id"), "{e}");
        let e = trust.add(&format!("bad name={}", peer())).unwrap_err();
        assert!(e.to_string().contains("bad name"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted");
        let (a, b) = (peer(), peer());
        std::fs::write(&path, format!("# providers\n{a}\n\nm={b}  # this one\n")).unwrap();
        trust.add_file(&path).unwrap();
        assert!(trust.for_model("x").unwrap().contains(&a));
        assert!(trust.for_model("m").unwrap().contains(&b));
        std::fs::write(&path, "m=nope\n").unwrap();
        let e = trust.add_file(&path).unwrap_err();
        assert!(e.to_string().contains("entry 1"), "{e}");
        let e = ProviderTrust::default()
            .add_file(&dir.path().join("missing"))
            .unwrap_err();
        assert!(matches!(e, BadTrust::File { .. }));
    }
}
