//! A small file the node re-reads when it changes (allow lists, the revocation list).
//!
//! Each check costs one `stat`: the file is parsed again only when its modification time,
//! size or inode changed. A file that cannot be read counts as empty (closed, for an allow
//! list), with a warning logged once per change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Largest watched file read, so a huge file cannot make the node allocate much.
pub const MAX_WATCHED_FILE: u64 = 4 * 1024 * 1024;

type Stamp = Option<(SystemTime, u64, u64)>;

pub struct Watched<T> {
    path: PathBuf,
    stamp: Stamp,
    /// `None` until the first read.
    value: Option<T>,
    parse: fn(&str, &Path) -> T,
}

impl<T: Default> Watched<T> {
    pub fn new(path: PathBuf, parse: fn(&str, &Path) -> T) -> Self {
        Watched {
            path,
            stamp: None,
            value: None,
            parse,
        }
    }

    /// The current contents, re-read if the file changed since the last call.
    pub fn get(&mut self) -> &T {
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
            let value = match meta {
                Ok(m) if m.len() > MAX_WATCHED_FILE => {
                    tracing::warn!(path = %self.path.display(), "file is over {MAX_WATCHED_FILE} bytes; treating it as empty");
                    T::default()
                }
                Ok(_) => match std::fs::read_to_string(&self.path) {
                    Ok(text) => (self.parse)(&text, &self.path),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), "cannot read the file ({e}); treating it as empty");
                        T::default()
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot read the file ({e}); treating it as empty");
                    T::default()
                }
            };
            self.value = Some(value);
        }
        self.value.get_or_insert_with(T::default)
    }
}
