//! A small file the node re-reads when it changes (allow lists, the revocation list).
//!
//! Each check costs one `stat`: the file is parsed again only when its modification time,
//! size or inode changed. A file that is missing, too large or unreadable is an error, with
//! a warning logged once per change; each caller fails closed on it (an allow list allows
//! nobody, the revocation list refuses every token).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Largest watched file read, so a huge file cannot make the node allocate much.
pub const MAX_WATCHED_FILE: u64 = 4 * 1024 * 1024;

type Stamp = Option<(SystemTime, u64, u64)>;

pub struct Watched<T> {
    path: PathBuf,
    stamp: Stamp,
    /// `None` until the first read; the error says why the file could not be used.
    value: Option<Result<T, String>>,
    parse: fn(&str, &Path) -> T,
}

impl<T> Watched<T> {
    pub fn new(path: PathBuf, parse: fn(&str, &Path) -> T) -> Self {
        Watched {
            path,
            stamp: None,
            value: None,
            parse,
        }
    }

    /// The current contents, re-read if the file changed since the last call; or why the
    /// file cannot be used: it is missing, over [`MAX_WATCHED_FILE`], or unreadable. What an
    /// error means is the caller's choice (nobody allowed; every token refused).
    pub fn get(&mut self) -> Result<&T, &str> {
        let meta = std::fs::metadata(&self.path);
        let stamp: Stamp = meta.as_ref().ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        if self.value.is_none() || stamp != self.stamp {
            self.stamp = stamp;
            let path = self.path.display();
            let value = match meta {
                Ok(m) if m.len() > MAX_WATCHED_FILE => Err(format!(
                    "{path} is over {MAX_WATCHED_FILE} bytes ({} bytes)",
                    m.len()
                )),
                Ok(_) => std::fs::read_to_string(&self.path)
                    .map(|text| (self.parse)(&text, &self.path))
                    .map_err(|e| format!("cannot read {path}: {e}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(format!("{path} is missing"))
                }
                Err(e) => Err(format!("cannot read {path}: {e}")),
            };
            if let Err(e) = &value {
                tracing::warn!("{e}");
            }
            self.value = Some(value);
        }
        match self.value.as_ref().expect("set above") {
            Ok(value) => Ok(value),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, _: &Path) -> usize {
        text.lines().count()
    }

    #[test]
    fn a_missing_oversized_or_unreadable_file_is_an_error_with_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut w = Watched::new(path.clone(), lines);
        assert!(w.get().unwrap_err().contains("is missing"));
        std::fs::write(&path, "a\nb\n").unwrap();
        assert_eq!(w.get(), Ok(&2));
        std::fs::write(&path, vec![b'\n'; MAX_WATCHED_FILE as usize + 1]).unwrap();
        assert!(w.get().unwrap_err().contains("is over"), "{:?}", w.get());
        // A directory in its place cannot be read, even by root.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(
            w.get().unwrap_err().contains("cannot read"),
            "{:?}",
            w.get()
        );
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, "a\n").unwrap();
        assert_eq!(w.get(), Ok(&1));
    }
}
