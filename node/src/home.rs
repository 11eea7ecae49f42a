//! The node's data directory (`--home`, `MESH_HOME`, or the platform data dir) and its layout.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that overrides the default data directory.
pub const HOME_ENV: &str = "MESH_HOME";
/// Environment variable that overrides where fetched models are kept (shared between homes).
pub const MODELS_ENV: &str = "MESH_MODELS";

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no data directory: pass --home DIR or set {HOME_ENV}")]
    NoDefault,
    #[error("cannot create data directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "data directory {path} has mode {mode:03o}; it must not be writable by others: run `chmod 700 {path}`"
    )]
    Insecure { path: PathBuf, mode: u32 },
    #[error(
        "data directory {path} belongs to user {owner}, not to this user ({me}): whoever owns it can replace its key and files. Use a home of your own (--home or $MESH_HOME)"
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A node's data directory, created with mode 0700 if missing.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Picks the directory: `explicit`, else `$MESH_HOME`, else `<platform data dir>/mesh`.
    pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf, HomeError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        dirs::data_dir()
            .map(|d| d.join("mesh"))
            .ok_or(HomeError::NoDefault)
    }

    /// Opens (creating if needed) the data directory at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Home, HomeError> {
        let root = root.into();
        if !root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .map_err(|source| HomeError::Create {
                    path: root.clone(),
                    source,
                })?;
        }
        let meta = fs::metadata(&root).map_err(|source| HomeError::Create {
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(HomeError::NotADirectory { path: root });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(HomeError::Insecure { path: root, mode });
        }
        let (owner, me) = (std::os::unix::fs::MetadataExt::uid(&meta), effective_uid());
        if owner != me {
            return Err(HomeError::NotOwned {
                path: root,
                owner,
                me,
            });
        }
        Ok(Home { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node key file.
    pub fn key_path(&self) -> PathBuf {
        self.root.join("node.key")
    }

    /// Where fetched model files are kept: `$MESH_MODELS`, else `models/` in the home.
    pub fn models_dir(&self) -> PathBuf {
        match std::env::var_os(MODELS_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => self.root.join("models"),
        }
    }

    /// Where a running node writes its control address, for `mesh peers` and friends.
    pub fn control_file(&self) -> PathBuf {
        self.root.join("node.json")
    }
}

/// What a running `mesh join` writes to `node.json`, so local commands can find it.
///
/// The file is private (0600, in the 0700 home): it holds the API key, which the local
/// commands (`mesh infer`, `mesh peers`, `mesh models`) send to the node's API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuntimeInfo {
    pub peer_id: String,
    pub api: Option<std::net::SocketAddr>,
    pub listen_addrs: Vec<String>,
    pub pid: u32,
    /// The key the API requires (`--api-key`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl Home {
    pub fn write_runtime(&self, info: &RuntimeInfo) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
        write_atomic(&self.control_file(), &bytes)
    }

    /// The running node's info, if a node wrote it (it may have died since: probe its API).
    pub fn read_runtime(&self) -> Option<RuntimeInfo> {
        let bytes = fs::read(self.control_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn remove_runtime(&self) {
        let _ = fs::remove_file(self.control_file());
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new contents:
/// a private (0600) temporary file in the same directory, synced, renamed over `path`, then
/// the directory synced so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_info_is_replaced_atomically_and_stays_private() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path().join("h")).unwrap();
        let mut info = RuntimeInfo {
            peer_id: "p".into(),
            api: Some("127.0.0.1:7440".parse().unwrap()),
            listen_addrs: vec![],
            pid: 1,
            api_key: Some("k".into()),
        };
        home.write_runtime(&info).unwrap();
        info.pid = 2;
        home.write_runtime(&info).unwrap();
        let back = home.read_runtime().unwrap();
        assert_eq!((back.pid, back.api_key.as_deref()), (2, Some("k")));
        let mode = fs::metadata(home.control_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing but node.json is left behind.
        let names: Vec<_> = fs::read_dir(home.root()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // An older node.json without the key still reads.
        fs::write(
            home.control_file(),
            r#"{"peer_id":"p","api":null,"listen_addrs":[],"pid":3}"#,
        )
        .unwrap();
        assert_eq!(home.read_runtime().unwrap().api_key, None);
    }

    #[test]
    fn creates_a_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path().join("a/b")).unwrap();
        let mode = fs::metadata(home.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn refuses_a_directory_others_can_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("h");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Home::open(&dir).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn refuses_a_directory_another_user_owns() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("h");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let (other, dir) = if effective_uid() == 0 {
            // As root: give the directory to `nobody`.
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            (65534, dir)
        } else {
            // Not root: `/` belongs to root and is not writable by others.
            (0, PathBuf::from("/"))
        };
        let err = Home::open(&dir).unwrap_err();
        assert!(
            matches!(err, HomeError::NotOwned { owner, .. } if owner == other),
            "{err}"
        );
        assert!(err.to_string().contains("not to this user"), "{err}");
    }

    #[test]
    fn explicit_path_wins() {
        let p = Home::resolve(Some(Path::new("/x/y"))).unwrap();
        assert_eq!(p, PathBuf::from("/x/y"));
    }
}
