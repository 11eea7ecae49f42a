//! The allow-list file: one peer id per line, like ssh's `authorized_keys`.
//!
//! Blank lines and lines starting with `#` are ignored; anything after the peer id on a line
//! (separated by whitespace) is a comment. A line that is not a peer id is reported with its
//! line number and skipped: the rest of the file still applies.

use std::collections::HashSet;
use std::path::Path;

use libp2p::PeerId;

/// Most peer ids one allow-list file may hold.
pub const MAX_ALLOW_ENTRIES: usize = 100_000;

/// The peers a file allows, and the problems found in it (line number, message).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AllowList {
    pub peers: HashSet<PeerId>,
    pub problems: Vec<(usize, String)>,
}

/// Parses the text of an allow-list file.
pub fn parse(text: &str) -> AllowList {
    let mut list = AllowList::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or_default();
        match word.parse::<PeerId>() {
            Ok(_) if list.peers.len() >= MAX_ALLOW_ENTRIES => {
                list.problems.push((
                    line_no,
                    format!("more than {MAX_ALLOW_ENTRIES} entries; the rest are ignored"),
                ));
                break;
            }
            Ok(peer) => {
                list.peers.insert(peer);
            }
            Err(_) => list
                .problems
                .push((line_no, format!("{word:?} is not a peer id"))),
        }
    }
    list
}

/// [`parse`], logging every problem with the file name and line number.
pub fn parse_and_report(text: &str, path: &Path) -> AllowList {
    let list = parse(text);
    for (line, problem) in &list.problems {
        tracing::warn!("{}:{line}: {problem}; line ignored", path.display());
    }
    tracing::info!(
        path = %path.display(),
        peers = list.peers.len(),
        "allow list (re)loaded"
    );
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blank_lines_and_trailing_comments() {
        let a = crate::NodeIdentity::generate().peer_id();
        let b = crate::NodeIdentity::generate().peer_id();
        let text =
            format!("# friends\n\n{a}\n   {b}   laptop of bob # trailing\nnot-a-peer\n{a}\n");
        let list = parse(&text);
        assert_eq!(list.peers, HashSet::from([a, b]));
        assert_eq!(
            list.problems,
            vec![(5, "\"not-a-peer\" is not a peer id".to_string())]
        );
    }
}
