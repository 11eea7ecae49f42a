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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuntimeInfo {
    pub peer_id: String,
    pub api: Option<std::net::SocketAddr>,
    pub listen_addrs: Vec<String>,
    pub pid: u32,
}

impl Home {
    pub fn write_runtime(&self, info: &RuntimeInfo) -> std::io::Result<()> {
        let tmp = self.root.join("node.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?,
        )?;
        fs::rename(tmp, self.control_file())
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn explicit_path_wins() {
        let p = Home::resolve(Some(Path::new("/x/y"))).unwrap();
        assert_eq!(p, PathBuf::from("/x/y"));
    }
}
