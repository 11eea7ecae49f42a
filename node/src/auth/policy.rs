//! Access policies: who a node serves, node-wide and per model, and where that is configured.
//!
//! - `open`: any peer that can reach the node.
//! - `allow`: peers on the allow list (`--allow`, and the `--allow-file`, re-read on change).
//! - `token`: peers on the allow list, and peers presenting a valid capability token.
//!
//! The node's own peer id is always served (the owner calling through the node's API).
//! The config file is `<home>/config.json`; `mesh join` flags add to it or override it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// How a model (or the whole node) decides who may call it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone who can reach the node.
    #[default]
    Open,
    /// Only peers on the allow list.
    Allow,
    /// Peers on the allow list, or presenting a valid capability token.
    Token,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Allow => "allow",
            Access::Token => "token",
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Access::Open),
            "allow" => Ok(Access::Allow),
            "token" => Ok(Access::Token),
            other => Err(format!(
                "{other:?} is not an access policy: use open, allow or token"
            )),
        }
    }
}

/// Everything the serving node needs to decide who may call what.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// The policy of models with no policy of their own.
    pub default: Access,
    /// Per-model policies, by model name.
    pub models: BTreeMap<String, Access>,
    /// Peers always on the allow list.
    pub allow: Vec<PeerId>,
    /// An authorized_keys-like file of peer ids, re-read when it changes.
    pub allow_file: Option<PathBuf>,
    /// Issuers whose tokens this node accepts, besides its own key.
    pub trusted_issuers: Vec<PeerId>,
    /// The revocation list (`<home>/revoked-tokens`), re-read when it changes.
    pub revocation_file: Option<PathBuf>,
    /// Where quota counts are saved (`<home>/token-usage.json`); `None` keeps them in memory.
    pub quota_file: Option<PathBuf>,
}

impl AccessConfig {
    /// The policy of `model`.
    pub fn access_for(&self, model: &str) -> Access {
        self.models.get(model).copied().unwrap_or(self.default)
    }
}

/// The `access` section of `<home>/config.json`. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    #[serde(default)]
    pub default: Option<Access>,
    #[serde(default)]
    pub models: BTreeMap<String, Access>,
    #[serde(default)]
    pub allow: Vec<String>,
    /// Relative paths are relative to the home.
    #[serde(default)]
    pub allow_file: Option<PathBuf>,
    #[serde(default)]
    pub trust_issuers: Vec<String>,
}

/// `<home>/config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub access: AccessFile,
}

/// The name of the config file in a node's home.
pub const CONFIG_FILE: &str = "config.json";

impl ConfigFile {
    /// Reads `<home>/config.json`; a missing file is an empty config, a bad one an error.
    pub fn load(home: &Path) -> Result<ConfigFile, String> {
        let path = home.join(CONFIG_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut config: ConfigFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is invalid: {e}", path.display()))?;
        if let Some(f) = &config.access.allow_file {
            if f.is_relative() {
                config.access.allow_file = Some(home.join(f));
            }
        }
        Ok(config)
    }
}

/// Parses peer ids given as text, naming the one that is not.
pub fn parse_peers(what: &str, texts: &[String]) -> Result<Vec<PeerId>, String> {
    texts
        .iter()
        .map(|t| {
            t.parse::<PeerId>()
                .map_err(|_| format!("{what}: {t:?} is not a peer id"))
        })
        .collect()
}

/// The access flags of `mesh join`, as given.
#[derive(Debug, Clone, Default)]
pub struct AccessFlags {
    /// `--allow PEER_ID`.
    pub allow: Vec<String>,
    /// `--allow-file PATH`.
    pub allow_file: Option<PathBuf>,
    /// `--require-token`.
    pub require_token: bool,
    /// `--trust-issuer PEER_ID`.
    pub trust_issuer: Vec<String>,
    /// `--model-policy NAME=POLICY`.
    pub model_policy: Vec<String>,
}

impl AccessConfig {
    /// The access policy of a node with home `home`: `<home>/config.json`, then the flags on
    /// top.
    ///
    /// With no policy anywhere, a node is open. `--require-token` makes the default `token`;
    /// otherwise `--allow`/`--allow-file` make it `allow`. Allow entries and trusted issuers
    /// from the file and the flags add up; `--allow-file` replaces the file's;
    /// `--model-policy` overrides the file's entry for that model. The revocation list and
    /// the quota counts live in the home.
    pub fn from_file_and_flags(home: &Path, flags: &AccessFlags) -> Result<AccessConfig, String> {
        let file = ConfigFile::load(home)?.access;
        let mut access = AccessConfig {
            default: file.default.unwrap_or_default(),
            models: file.models,
            allow: parse_peers("allow in config.json", &file.allow)?,
            allow_file: file.allow_file,
            trusted_issuers: parse_peers("trust_issuers in config.json", &file.trust_issuers)?,
            revocation_file: Some(home.join(super::revocation::REVOKED_FILE)),
            quota_file: Some(home.join(super::quota::USAGE_FILE)),
        };
        access.allow.extend(parse_peers("--allow", &flags.allow)?);
        access
            .trusted_issuers
            .extend(parse_peers("--trust-issuer", &flags.trust_issuer)?);
        if let Some(f) = &flags.allow_file {
            access.allow_file = Some(f.clone());
        }
        if flags.require_token {
            access.default = Access::Token;
        } else if !flags.allow.is_empty() || flags.allow_file.is_some() {
            access.default = Access::Allow;
        }
        for entry in &flags.model_policy {
            let (name, policy) = entry.split_once('=').ok_or_else(|| {
                format!("--model-policy {entry:?}: expected NAME=open|allow|token")
            })?;
            let policy: Access = policy
                .parse()
                .map_err(|e| format!("--model-policy {entry:?}: {e}"))?;
            access.models.insert(name.to_string(), policy);
        }
        Ok(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_peer as peer;

    #[test]
    fn flags_go_on_top_of_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        // Nothing anywhere: open.
        let open = AccessConfig::from_file_and_flags(home, &AccessFlags::default()).unwrap();
        assert_eq!(open.default, Access::Open);
        assert_eq!(open.revocation_file, Some(home.join("revoked-tokens")));

        let (in_file, on_flag, issuer) = (peer(), peer(), peer());
        std::fs::write(
            home.join(CONFIG_FILE),
            format!(
                r#"{{"access": {{"models": {{"echo": "open", "smol": "token"}}, "allow": ["{in_file}"], "allow_file": "friends"}}}}"#
            ),
        )
        .unwrap();
        // The file alone.
        let file_only = AccessConfig::from_file_and_flags(home, &AccessFlags::default()).unwrap();
        assert_eq!(file_only.default, Access::Open);
        assert_eq!(file_only.allow, vec![in_file]);
        assert_eq!(file_only.allow_file, Some(home.join("friends")));

        // --allow adds up and makes the default allow; --model-policy overrides one model.
        let flags = AccessFlags {
            allow: vec![on_flag.to_string()],
            trust_issuer: vec![issuer.to_string()],
            model_policy: vec!["echo=allow".into()],
            ..AccessFlags::default()
        };
        let merged = AccessConfig::from_file_and_flags(home, &flags).unwrap();
        assert_eq!(merged.default, Access::Allow);
        assert_eq!(merged.allow, vec![in_file, on_flag]);
        assert_eq!(merged.trusted_issuers, vec![issuer]);
        assert_eq!(merged.access_for("echo"), Access::Allow);
        assert_eq!(merged.access_for("smol"), Access::Token);

        // --require-token wins over --allow; --allow-file replaces the file's.
        let flags = AccessFlags {
            allow: vec![on_flag.to_string()],
            allow_file: Some("/elsewhere".into()),
            require_token: true,
            ..AccessFlags::default()
        };
        let token = AccessConfig::from_file_and_flags(home, &flags).unwrap();
        assert_eq!(token.default, Access::Token);
        assert_eq!(token.allow_file, Some(PathBuf::from("/elsewhere")));
    }

    #[test]
    fn bad_flags_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let with =
            |flags: AccessFlags| AccessConfig::from_file_and_flags(tmp.path(), &flags).unwrap_err();
        let err = with(AccessFlags {
            allow: vec!["12D3nope".into()],
            ..AccessFlags::default()
        });
        assert!(err.contains("--allow") && err.contains("12D3nope"), "{err}");
        let err = with(AccessFlags {
            model_policy: vec!["echo".into()],
            ..AccessFlags::default()
        });
        assert!(err.contains("expected NAME=open|allow|token"), "{err}");
        let err = with(AccessFlags {
            model_policy: vec!["echo=closed".into()],
            ..AccessFlags::default()
        });
        assert!(err.contains("open, allow or token"), "{err}");
    }

    #[test]
    fn config_file_reads_and_rejects_typos() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(ConfigFile::load(tmp.path()).unwrap(), ConfigFile::default());
        std::fs::write(
            tmp.path().join(CONFIG_FILE),
            r#"{"access": {"default": "token", "models": {"echo": "open"}, "allow_file": "friends"}}"#,
        )
        .unwrap();
        let c = ConfigFile::load(tmp.path()).unwrap();
        assert_eq!(c.access.default, Some(Access::Token));
        assert_eq!(c.access.models["echo"], Access::Open);
        assert_eq!(c.access.allow_file, Some(tmp.path().join("friends")));
        std::fs::write(
            tmp.path().join(CONFIG_FILE),
            r#"{"access": {"defualt": "token"}}"#,
        )
        .unwrap();
        let err = ConfigFile::load(tmp.path()).unwrap_err();
        assert!(err.contains("defualt"), "{err}");
        assert!("closed"
            .parse::<Access>()
            .unwrap_err()
            .contains("open, allow or token"));
    }
}
