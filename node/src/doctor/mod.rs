//! `mesh doctor`: checks of a node and its machine, each with a verdict and, when something is
//! wrong, a one-line fix.
//!
//! - [`local`]: what needs no running node: the key's and the home's permissions, the fetched
//!   model files against their pinned sha256, the clock.
//! - [`network`]: what the running node reports: where its API listens, whether peers can
//!   reach it and how its NAT maps ports (from the addresses peers observe,
//!   [`crate::network::diagnosis`]), its relays, each peer's path, and for one peer why calls
//!   to it take the path they take ([`network::explain_peer`]).
//!
//! The checks are plain functions over facts, tested without a node; the command gathers the
//! facts (files, `node.json`, the node's API) and prints the checks.

pub mod local;
pub mod network;

use serde::{Deserialize, Serialize};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, but worth knowing or changing.
    Warn,
    /// Wrong: `mesh doctor` exits non-zero.
    Fail,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked: `key`, `home`, `model NAME`, `clock`, `api`, `reach`, `nat tcp`,
    /// `relays`, `peer 12D3…`.
    pub area: String,
    pub verdict: Verdict,
    /// What was found, in one line.
    pub summary: String,
    /// What to do about it, in one line (for `warn` and `fail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(area: impl Into<String>, summary: impl Into<String>) -> Check {
        Check {
            area: area.into(),
            verdict: Verdict::Ok,
            summary: summary.into(),
            fix: None,
        }
    }

    pub fn warn(
        area: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            area: area.into(),
            verdict: Verdict::Warn,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(
        area: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            area: area.into(),
            verdict: Verdict::Fail,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The worst verdict of `checks` (`Ok` for none).
pub fn worst(checks: &[Check]) -> Verdict {
    checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_verdict_decides() {
        assert_eq!(worst(&[]), Verdict::Ok);
        let checks = [Check::ok("a", "fine"), Check::warn("b", "hm", "do x")];
        assert_eq!(worst(&checks), Verdict::Warn);
        let mut all = checks.to_vec();
        all.push(Check::fail("c", "broken", "do y"));
        assert_eq!(worst(&all), Verdict::Fail);
    }
}
