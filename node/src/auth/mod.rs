//! Authorization: who may call which model on this node, checked before any compute.
//!
//! - [`policy`]: `open`, `allow`, `token`, node-wide and per model; the config file.
//! - [`allowlist`]: the authorized_keys-like allow-list file.
//! - [`token`]: issuing capability tokens and checking their signature.
//! - [`revocation`]: the revoked-token list in the home.
//! - [`quota`]: per-token request counts, persisted.
//! - [`receipt`]: the signed receipt of every call.
//!
//! [`Authorizer::authorize`] runs on every call with the Noise-authenticated peer id; a
//! refusal is a [`Refusal`] that names its reason and becomes an `unauthorized` error frame.

pub mod allowlist;
pub mod policy;
pub mod quota;
pub mod receipt;
pub mod revocation;
pub mod token;
mod watched;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use libp2p::PeerId;
use mesh_protocol::token::TOKEN_ID_LEN;
use mesh_protocol::{ErrorCode, WireError};

pub use policy::{Access, AccessConfig};

use watched::Watched;

/// Why a call was refused. Each message starts with a stable phrase naming the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not on the allow list: peer {peer} may not call {model:?} on this node")]
    NotAllowed { peer: String, model: String },
    #[error(
        "no token: model {model:?} on this node needs a capability token (mesh infer --token)"
    )]
    NoToken { model: String },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("bad signature: the token's signature does not hold")]
    BadSignature,
    #[error("untrusted issuer: tokens signed by {0} are not accepted by this node")]
    UntrustedIssuer(String),
    #[error("wrong subject: the token was issued to {subject}, not to {peer}")]
    WrongSubject { subject: String, peer: String },
    #[error("model not covered: the token covers {covered:?}, not {model:?}")]
    ModelNotCovered { model: String, covered: Vec<String> },
    #[error("not yet valid: the token is valid from unix time {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("expired: the token expired at unix time {expires} (now {now})")]
    Expired { expires: u64, now: u64 },
    #[error("revoked: token {0} was revoked by this node's owner")]
    Revoked(String),
    #[error("quota spent: token {id} has used all of its {max} requests")]
    QuotaSpent { id: String, max: u64 },
    #[error("quota unavailable: {0}")]
    QuotaUnavailable(String),
    #[error(
        "revocation list unavailable: {0}; calls with tokens are refused until the node's owner fixes it"
    )]
    RevocationUnavailable(String),
}

impl Refusal {
    /// A short machine-readable name of the reason, e.g. `wrong_subject`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::NoToken { .. } => "no_token",
            Refusal::Malformed(_) => "malformed_token",
            Refusal::BadSignature => "bad_signature",
            Refusal::UntrustedIssuer(_) => "untrusted_issuer",
            Refusal::WrongSubject { .. } => "wrong_subject",
            Refusal::ModelNotCovered { .. } => "model_not_covered",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::Expired { .. } => "expired",
            Refusal::Revoked(_) => "revoked",
            Refusal::QuotaSpent { .. } => "quota_spent",
            Refusal::QuotaUnavailable(_) => "quota_unavailable",
            Refusal::RevocationUnavailable(_) => "revocation_unavailable",
        }
    }
}

impl From<Refusal> for WireError {
    fn from(r: Refusal) -> Self {
        WireError::new(ErrorCode::Unauthorized, r.to_string())
    }
}

/// Why a call was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantedBy {
    /// The node's own key (its owner, through its API).
    Owner,
    Open,
    AllowList,
    Token,
}

/// A call that passed [`Authorizer::authorize`]; [`Authorizer::commit`] counts it.
#[derive(Debug, Clone)]
pub struct Grant {
    pub by: GrantedBy,
    /// The token that authorized the call.
    pub token_id: Option<[u8; TOKEN_ID_LEN]>,
    /// `(max_requests, expires)` of a token with a quota.
    quota: Option<(u64, u64)>,
    /// When the token that authorized the call expires, checked again at [`Authorizer::commit`].
    expires: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessSetupError {
    #[error("a policy is set for model {0:?}, which this node does not host")]
    UnknownModel(String),
    #[error("cannot read the allow file {path}: {reason}")]
    AllowFile { path: String, reason: String },
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Revocation(String),
}

/// The policy in effect, for the join banner and the `ready` line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicySummary {
    pub default: Access,
    pub models: BTreeMap<String, Access>,
    pub allow: usize,
    pub allow_file: Option<String>,
    pub trusted_issuers: Vec<String>,
}

/// Decides, for each call, whether its caller may use the model it names.
pub struct Authorizer {
    me: PeerId,
    /// Every model hosted is open only to the allow lists: a caller not on them is refused
    /// from its peer id alone.
    allow_only: bool,
    config: AccessConfig,
    allow: HashSet<PeerId>,
    trusted: HashSet<PeerId>,
    allow_file: Option<Mutex<Watched<allowlist::AllowList>>>,
    revoked: Option<Mutex<Watched<HashSet<[u8; TOKEN_ID_LEN]>>>>,
    quotas: Mutex<quota::Quotas>,
}

impl Authorizer {
    /// Builds the authorizer of the node `me` hosting `hosted`.
    pub fn new(
        me: PeerId,
        config: &AccessConfig,
        hosted: &[String],
    ) -> Result<Authorizer, AccessSetupError> {
        if let Some(m) = config.models.keys().find(|m| !hosted.contains(m)) {
            return Err(AccessSetupError::UnknownModel(m.clone()));
        }
        let allow_file = match &config.allow_file {
            Some(path) => {
                // A typo in the path must not silently leave the node closed to everyone.
                std::fs::metadata(path).map_err(|e| AccessSetupError::AllowFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let mut w = Watched::new(path.clone(), allowlist::parse_and_report);
                let _ = w.get(); // parse now, to report bad lines at start
                Some(Mutex::new(w))
            }
            None => None,
        };
        // The file exists while the node runs, so a list that vanishes refuses tokens
        // instead of un-revoking them all.
        let revoked = match &config.revocation_file {
            Some(path) => {
                revocation::create_if_missing(path).map_err(|e| {
                    AccessSetupError::Revocation(format!(
                        "cannot create the revocation list {}: {e}",
                        path.display()
                    ))
                })?;
                Some(Mutex::new(Watched::new(path.clone(), revocation::parse)))
            }
            None => None,
        };
        let quotas =
            quota::Quotas::open(config.quota_file.clone()).map_err(AccessSetupError::Quota)?;
        let mut trusted: HashSet<PeerId> = config.trusted_issuers.iter().copied().collect();
        trusted.insert(me);
        let allow_only =
            !hosted.is_empty() && hosted.iter().all(|m| config.access_for(m) == Access::Allow);
        Ok(Authorizer {
            me,
            allow_only,
            allow: config.allow.iter().copied().collect(),
            trusted,
            allow_file,
            revoked,
            quotas: Mutex::new(quotas),
            config: config.clone(),
        })
    }

    /// An authorizer that serves everyone (the default of a node with no policy).
    pub fn open(me: PeerId) -> Authorizer {
        Self::new(me, &AccessConfig::default(), &[]).expect("an open policy always builds")
    }

    pub fn access_for(&self, model: &str) -> Access {
        self.config.access_for(model)
    }

    pub fn summary(&self) -> PolicySummary {
        PolicySummary {
            default: self.config.default,
            models: self.config.models.clone(),
            allow: self.allow.len(),
            allow_file: self
                .config
                .allow_file
                .as_ref()
                .map(|p| p.display().to_string()),
            trusted_issuers: self
                .config
                .trusted_issuers
                .iter()
                .map(|p| p.to_string())
                .collect(),
        }
    }

    /// Whether `peer` may call some model here, judged from its peer id alone (before its
    /// request is read): false only when every model hosted is `allow` and the peer is on no
    /// allow list. A `token` model takes anyone's token, so it is never judged this early.
    pub fn may_call_any(&self, peer: &PeerId) -> bool {
        *peer == self.me || !self.allow_only || self.on_allow_list(peer)
    }

    fn on_allow_list(&self, peer: &PeerId) -> bool {
        if self.allow.contains(peer) {
            return true;
        }
        // An allow file that cannot be read allows nobody.
        self.allow_file.as_ref().is_some_and(|f| {
            f.lock()
                .expect("never poisoned: no panics while held")
                .get()
                .is_ok_and(|list| list.peers.contains(peer))
        })
    }

    /// Refuses a revoked token, and every token while the revocation list cannot be read
    /// (missing, oversized, unreadable): an unusable list must not un-revoke them all.
    fn check_revocation(&self, id: &[u8; TOKEN_ID_LEN]) -> Result<(), Refusal> {
        let Some(revoked) = &self.revoked else {
            return Ok(());
        };
        let mut revoked = revoked
            .lock()
            .expect("never poisoned: no panics while held");
        match revoked.get() {
            Ok(ids) if ids.contains(id) => Err(Refusal::Revoked(hex::encode(id))),
            Ok(_) => Ok(()),
            Err(e) => Err(Refusal::RevocationUnavailable(e.to_string())),
        }
    }

    /// Decides whether `peer` may call `model` with `token`, at unix time `now`. Changes
    /// nothing: a quota is only counted by [`Authorizer::commit`], when compute starts.
    pub fn authorize(
        &self,
        peer: &PeerId,
        model: &str,
        token: Option<&[u8]>,
        now: u64,
    ) -> Result<Grant, Refusal> {
        let grant = |by| Grant {
            by,
            token_id: None,
            quota: None,
            expires: None,
        };
        if *peer == self.me {
            return Ok(grant(GrantedBy::Owner));
        }
        let access = self.access_for(model);
        if access == Access::Open {
            return Ok(grant(GrantedBy::Open));
        }
        if self.on_allow_list(peer) {
            return Ok(grant(GrantedBy::AllowList));
        }
        if access == Access::Allow {
            return Err(Refusal::NotAllowed {
                peer: peer.to_string(),
                model: model.to_string(),
            });
        }
        let Some(bytes) = token else {
            return Err(Refusal::NoToken {
                model: model.to_string(),
            });
        };
        let opened = token::open_bytes(bytes)?;
        let claims = &opened.claims;
        if !self.trusted.contains(&opened.issuer) {
            return Err(Refusal::UntrustedIssuer(opened.issuer.to_string()));
        }
        if opened.subject != *peer {
            return Err(Refusal::WrongSubject {
                subject: opened.subject.to_string(),
                peer: peer.to_string(),
            });
        }
        if !claims.models.is_empty() && !claims.models.iter().any(|m| m == model) {
            return Err(Refusal::ModelNotCovered {
                model: model.to_string(),
                covered: claims.models.clone(),
            });
        }
        if now < claims.not_before {
            return Err(Refusal::NotYetValid {
                not_before: claims.not_before,
                now,
            });
        }
        if now >= claims.expires {
            return Err(Refusal::Expired {
                expires: claims.expires,
                now,
            });
        }
        let id = opened.id();
        self.check_revocation(&id)?;
        if let Some(max) = claims.max_requests {
            let used = self
                .quotas
                .lock()
                .expect("never poisoned: no panics while held")
                .used(&claims.id_hex());
            if used >= max {
                return Err(Refusal::QuotaSpent {
                    id: claims.id_hex(),
                    max,
                });
            }
        }
        Ok(Grant {
            by: GrantedBy::Token,
            token_id: Some(id),
            quota: claims.max_requests.map(|max| (max, claims.expires)),
            expires: Some(claims.expires),
        })
    }

    /// Checks a token-authorized call again and counts it against its token's quota, if it
    /// has one. Called just before compute starts, after the call waited in the queue: a
    /// token revoked or expired meanwhile is refused, and two calls racing for the last
    /// request cannot both run.
    pub fn commit(&self, grant: &Grant, now: u64) -> Result<(), Refusal> {
        if let Some(id) = grant.token_id {
            self.check_revocation(&id)?;
        }
        if let Some(expires) = grant.expires.filter(|e| now >= *e) {
            return Err(Refusal::Expired { expires, now });
        }
        let (Some(id), Some((max, expires))) = (grant.token_id, grant.quota) else {
            return Ok(());
        };
        let id = hex::encode(id);
        let spent = self
            .quotas
            .lock()
            .expect("never poisoned: no panics while held")
            .spend(&id, max, expires, now);
        match spent {
            Ok(_) => Ok(()),
            Err(quota::SpendError::Spent { .. }) => Err(Refusal::QuotaSpent { id, max }),
            Err(quota::SpendError::Unavailable(e)) => Err(Refusal::QuotaUnavailable(e)),
        }
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
