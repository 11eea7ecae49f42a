//! Request quotas of capability tokens, counted per token id on the serving node.
//!
//! Counts are kept in memory and, when the node has a home, persisted to
//! `<home>/token-usage.json` after every counted call (a synced temporary file renamed over
//! it, then the directory synced: a crash leaves the old counts or the new ones, never a torn
//! file), so a restart does not reset them. Entries of expired tokens are dropped. If the
//! count cannot be saved, the call is refused (fail closed). A file that does not parse
//! stops the node with how to recover, and is left as it is.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The name of the quota file in a node's home.
pub const USAGE_FILE: &str = "token-usage.json";
/// Most tokens with quotas tracked at once (after dropping expired ones).
pub const MAX_TRACKED_TOKENS: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Usage {
    used: u64,
    /// Unix seconds; the entry is dropped after this.
    expires: u64,
}

pub struct Quotas {
    path: Option<PathBuf>,
    /// By token id in hex.
    used: BTreeMap<String, Usage>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpendError {
    Spent { used: u64 },
    Unavailable(String),
}

impl Quotas {
    /// Loads the counts at `path` (none yet if it does not exist); `None` keeps them in memory.
    pub fn open(path: Option<PathBuf>) -> Result<Quotas, String> {
        let used = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(p, &e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
            },
            None => BTreeMap::new(),
        };
        Ok(Quotas { path, used })
    }

    /// Calls already counted for `id`.
    pub fn used(&self, id: &str) -> u64 {
        self.used.get(id).map_or(0, |u| u.used)
    }

    /// Counts one call for `id` if fewer than `max` were counted, and saves the counts.
    pub fn spend(&mut self, id: &str, max: u64, expires: u64, now: u64) -> Result<u64, SpendError> {
        let used = self.used(id);
        if used >= max {
            return Err(SpendError::Spent { used });
        }
        if !self.used.contains_key(id) {
            self.used.retain(|_, u| u.expires > now);
            if self.used.len() >= MAX_TRACKED_TOKENS {
                return Err(SpendError::Unavailable(format!(
                    "this node already tracks {MAX_TRACKED_TOKENS} tokens with quotas"
                )));
            }
        }
        let before = self.used.insert(
            id.to_string(),
            Usage {
                used: used + 1,
                expires,
            },
        );
        if let Err(e) = self.save() {
            // Undo: a call that could not be counted is not served.
            match before {
                Some(b) => self.used.insert(id.to_string(), b),
                None => self.used.remove(id),
            };
            return Err(SpendError::Unavailable(format!(
                "cannot save token usage: {e}"
            )));
        }
        Ok(used + 1)
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        crate::home::write_atomic(path, &serde_json::to_vec(&self.used)?)
    }
}

/// The error of a quota file that does not parse. The node does not start rather than
/// reset the counts: the file is left untouched, for its owner to repair.
fn corrupt(path: &std::path::Path, e: &serde_json::Error) -> String {
    let p = path.display();
    format!(
        "the token quota file {p} is corrupt ({e}); the node will not start rather than reset \
         every token's request count. Repair the JSON (an object of token id -> \
         {{\"used\": N, \"expires\": UNIX_SECS}}) or restore it from a backup; or, to start \
         counting from zero (every token with a quota gets its full quota again), move it \
         aside: mv {p} {p}.corrupt"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_reload_and_stop_at_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(USAGE_FILE);
        let mut q = Quotas::open(Some(path.clone())).unwrap();
        assert_eq!(q.spend("aa", 2, 100, 10), Ok(1));
        let mut q = Quotas::open(Some(path.clone())).unwrap();
        assert_eq!(q.used("aa"), 1);
        assert_eq!(q.spend("aa", 2, 100, 10), Ok(2));
        assert_eq!(
            q.spend("aa", 2, 100, 10),
            Err(SpendError::Spent { used: 2 })
        );
        // Expired entries are dropped when a new token is counted.
        assert_eq!(q.spend("bb", 1, 100, 200), Ok(1));
        assert_eq!(q.used("aa"), 0);
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error_and_is_left_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(USAGE_FILE);
        let mut q = Quotas::open(Some(path.clone())).unwrap();
        q.spend("aa", 5, 100, 10).unwrap();
        let mut torn = std::fs::read(&path).unwrap();
        torn.truncate(torn.len() / 2);
        std::fs::write(&path, &torn).unwrap();
        let err = Quotas::open(Some(path.clone())).err().unwrap();
        assert!(err.contains("is corrupt"), "{err}");
        assert!(err.contains(&format!("mv {}", path.display())), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), torn, "left for its owner");
        // Nothing but the file itself is in the directory: no temporary left behind.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_count_that_cannot_be_saved_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Quotas::open(Some(tmp.path().join("missing-dir/usage.json"))).unwrap();
        assert!(matches!(
            q.spend("aa", 5, 100, 10),
            Err(SpendError::Unavailable(_))
        ));
        assert_eq!(q.used("aa"), 0);
    }
}
