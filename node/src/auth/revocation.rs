//! The revocation list: `<home>/revoked-tokens`, one token id (32 hex digits) per line.
//!
//! `mesh token revoke ID` appends to it (offline, on the same home); a running node re-reads
//! it when it changes. `#` comments and anything after the id on a line are ignored; a bad
//! line is reported with its number and skipped.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use mesh_protocol::token::TOKEN_ID_LEN;

/// The name of the revocation file in a node's home.
pub const REVOKED_FILE: &str = "revoked-tokens";

/// Parses a token id written as hex.
pub fn parse_id(text: &str) -> Result<[u8; TOKEN_ID_LEN], String> {
    let bytes = hex::decode(text.trim()).map_err(|_| format!("{text:?} is not hex"))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "a token id is {} hex digits, {text:?} has {}",
            TOKEN_ID_LEN * 2,
            b.len() * 2
        )
    })
}

/// Parses the text of a revocation file, logging bad lines.
pub fn parse(text: &str, path: &Path) -> HashSet<[u8; TOKEN_ID_LEN]> {
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or_default();
        match parse_id(word) {
            Ok(id) => {
                ids.insert(id);
            }
            Err(e) => tracing::warn!("{}:{}: {e}; line ignored", path.display(), i + 1),
        }
    }
    ids
}

/// Creates an empty revocation file at `path` (0600) unless one exists.
pub fn create_if_missing(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            writeln!(
                file,
                "# Revoked capability tokens, one id per line (mesh token revoke ID)."
            )?;
            file.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Appends `id` to the revocation file at `path` (created 0600 if missing).
pub fn revoke(path: &Path, id: &[u8; TOKEN_ID_LEN], note: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let note = note.replace(['\n', '\r'], " ");
    writeln!(file, "{} {note}", hex::encode(id))?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_appends_and_parse_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(REVOKED_FILE);
        revoke(&path, &[1; 16], "# lost laptop").unwrap();
        revoke(&path, &[2; 16], "").unwrap();
        std::fs::write(
            tmp.path().join("x"),
            std::fs::read_to_string(&path).unwrap() + "zz\n0102\n",
        )
        .unwrap();
        let text = std::fs::read_to_string(tmp.path().join("x")).unwrap();
        assert_eq!(parse(&text, &path), HashSet::from([[1; 16], [2; 16]]));
        assert!(parse_id("0102").unwrap_err().contains("32 hex digits"));
    }
}
