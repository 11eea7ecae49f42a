//! The model cache's entries: every model in `<models>/<name>/`, with a record
//! (`mesh-model.json`) of what it is (a GGUF file or a BERT directory), its files with their
//! sha256 and blob root, and where it came from: a registry package (`mesh model fetch`),
//! peers (`mesh model pull`) or a local import (`mesh model add`).
//!
//! `mesh model list` reads the records; `--model NAME=ENTRY` hosts an entry by its name, its
//! files checked against the record the way known models are checked against their pins
//! (hashed again only when a file changed, [`super::verify_pinned`]). A known model fetched
//! before records existed is listed from its pins.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{find_known, KnownModel, KNOWN_MODELS};

/// The record's file name in an entry's directory.
pub const RECORD: &str = "mesh-model.json";

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One GGUF file.
    Gguf,
    /// A directory: `model.safetensors`, `config.json`, `tokenizer.json`.
    Bert,
}

/// One file of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryFile {
    /// Its name in the entry's directory.
    pub name: String,
    /// lower-case hex.
    pub sha256: String,
    /// The root of its blob tree, lower-case hex.
    pub blob_root: String,
    pub bytes: u64,
}

/// Where an entry came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// `mesh model fetch`: a package on a registry.
    Registry { package: String },
    /// `mesh model pull`: the peers that sent its pieces.
    Peers { peers: Vec<String> },
    /// `mesh model add`: a file or directory on this machine.
    Local { path: PathBuf },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Registry { package } => write!(f, "registry package {package}"),
            Source::Peers { peers } => write!(f, "peers {}", peers.join(", ")),
            Source::Local { path } => write!(f, "local import of {}", path.display()),
        }
    }
}

/// A model in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub format: Format,
    /// Its files, the weights first.
    pub files: Vec<EntryFile>,
    pub source: Source,
    /// When it came, in Unix seconds.
    pub added: u64,
}

impl Entry {
    pub fn dir(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(&self.name)
    }

    /// What `--model NAME=PATH` takes: the GGUF file, or the directory.
    pub fn entry_path(&self, models_dir: &Path) -> PathBuf {
        match self.format {
            Format::Gguf => self.dir(models_dir).join(&self.files[0].name),
            Format::Bert => self.dir(models_dir),
        }
    }

    /// The weights' sha256 (what cards and pins name).
    pub fn sha256(&self) -> &str {
        &self.files[0].sha256
    }

    /// Checks every file against the record (hashing only files that changed).
    pub fn verify(&self, models_dir: &Path) -> Result<(), String> {
        let dir = self.dir(models_dir);
        for file in &self.files {
            super::verify_pinned(&dir.join(&file.name), &file.sha256, file.bytes).map_err(
                |e| {
                    format!(
                        "{e}; the file changed on disk since it came into the cache: remove {} and add or pull it again",
                        dir.display()
                    )
                },
            )?;
        }
        Ok(())
    }
}

/// Whether `name` can name an entry: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot,
/// so it is one directory under the models directory and a model name too.
pub fn validate_name(name: &str) -> Result<(), String> {
    if mesh_protocol::card::is_safe_file_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} cannot name a model in the cache: use 1 to 64 of [A-Za-z0-9._-], not starting with a dot"
        ))
    }
}

/// A name made safe for [`validate_name`] from any text (a file's stem, a card's name).
pub fn safe_name(text: &str) -> String {
    let mut name: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    while name.starts_with('.') {
        name.remove(0);
    }
    if name.is_empty() {
        name.push_str("model");
    }
    name
}

/// The entry `name`, if the cache holds one: its record, or, for a known model fetched
/// before records were kept, one made from its pins.
pub fn read(models_dir: &Path, name: &str) -> Result<Option<Entry>, String> {
    validate_name(name)?;
    let path = models_dir.join(name).join(RECORD);
    match fs::read(&path) {
        Ok(bytes) => {
            let entry: Entry = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not a cache record: {e}", path.display()))?;
            if entry.name != name || entry.files.is_empty() {
                return Err(format!("{} does not describe {name:?}", path.display()));
            }
            Ok(Some(entry))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(find_known(name)
            .filter(|known| {
                super::model_dir(models_dir, known)
                    .join(known.files[0].name)
                    .exists()
            })
            .map(known_entry)),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The record of a known model as its pins describe it (fetched from its package).
pub fn known_entry(known: &KnownModel) -> Entry {
    Entry {
        name: known.name.into(),
        format: if known.entry.is_empty() {
            Format::Bert
        } else {
            Format::Gguf
        },
        files: known
            .files
            .iter()
            .map(|f| EntryFile {
                name: f.name.into(),
                sha256: f.sha256.into(),
                blob_root: f.blob_root.into(),
                bytes: f.size,
            })
            .collect(),
        source: Source::Registry {
            package: known.package.into(),
        },
        added: 0,
    }
}

/// Writes `entry`'s record (atomically), and remembers its files as verified.
pub fn write(models_dir: &Path, entry: &Entry) -> std::io::Result<()> {
    let dir = entry.dir(models_dir);
    let bytes = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    crate::home::write_atomic(&dir.join(RECORD), &bytes)?;
    for file in &entry.files {
        super::remember_verified(&dir.join(&file.name), &file.sha256);
    }
    Ok(())
}

/// Every entry in the cache, by name: the records found, and known models fetched without
/// one. A directory whose record cannot be read is skipped with a warning.
pub fn list(models_dir: &Path) -> Vec<Entry> {
    let mut names: Vec<String> = fs::read_dir(models_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().join(RECORD).is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.extend(KNOWN_MODELS.iter().map(|k| k.name.to_string()));
    names.sort();
    names.dedup();
    names
        .iter()
        .filter_map(|name| match read(models_dir, name) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!("skipping {name} in the model cache: {e}");
                None
            }
        })
        .collect()
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(String),
}

/// How `add` placed a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placed {
    /// A hard link to the original (same file system: no copy).
    Linked,
    Copied,
    /// The cache held this very entry already.
    AlreadyThere,
}

/// Imports the GGUF file or BERT directory at `path` into the cache as `name` (derived from
/// the path when `None`): hard-linked (or copied across file systems), hashed (sha256 and
/// blob tree), and recorded. The same files added again are a no-op; other files under a
/// name in use, or under a known model's name, are refused.
pub fn add(
    models_dir: &Path,
    path: &Path,
    name: Option<&str>,
) -> Result<(Entry, Placed), AddError> {
    let refused = |m: String| AddError::Refused(m);
    let meta = fs::metadata(path).map_err(|e| refused(format!("{}: {e}", path.display())))?;
    let (format, sources) = if meta.is_dir() {
        (Format::Bert, bert_files(path)?)
    } else {
        check_gguf(path)?;
        let file = path.file_name().map(PathBuf::from).unwrap_or_default();
        (Format::Gguf, vec![(file, path.to_path_buf())])
    };
    let name = match name {
        Some(name) => name.to_string(),
        None => {
            let stem: Option<String> = match format {
                Format::Gguf => path.file_stem().map(|s| s.to_string_lossy().into_owned()),
                Format::Bert => path
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned())),
            };
            safe_name(&stem.unwrap_or_default())
        }
    };
    validate_name(&name).map_err(refused)?;
    mesh_protocol::ids::validate_model_name(&name).map_err(refused)?;
    fs::create_dir_all(models_dir)
        .map_err(|e| AddError::Io(format!("cannot create {}: {e}", models_dir.display())))?;
    // Placed in a staging directory first and hashed there (one read of each file): nothing
    // reaches the entry's place for a name that is refused.
    let staging = tempfile::Builder::new()
        .prefix(".adding-")
        .tempdir_in(models_dir)
        .map_err(|e| AddError::Io(format!("cannot stage in {}: {e}", models_dir.display())))?;
    let mut placed = Placed::Linked;
    let mut files = Vec::with_capacity(sources.len());
    for (file_name, source) in &sources {
        let staged = staging.path().join(file_name);
        if place(source, &staged)? == Placed::Copied {
            placed = Placed::Copied;
        }
        files.push(hash_steady(&staged, file_name)?);
    }
    if let Some(known) = find_known(&name) {
        let pinned: Vec<&str> = known.files.iter().map(|f| f.sha256).collect();
        let ours: Vec<&str> = files.iter().map(|f| f.sha256.as_str()).collect();
        if !same_set(&pinned, &ours) {
            return Err(refused(format!(
                "{name} is a known model and these are other files: choose another --name"
            )));
        }
    }
    let mut entry = Entry {
        name: name.clone(),
        format,
        files,
        source: Source::Local {
            path: path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
        },
        added: now(),
    };
    let dir = entry.dir(models_dir);
    if let Some(existing) = read(models_dir, &name).map_err(refused)? {
        let theirs: Vec<&str> = existing.files.iter().map(|f| f.sha256.as_str()).collect();
        let ours: Vec<&str> = entry.files.iter().map(|f| f.sha256.as_str()).collect();
        if same_set(&theirs, &ours) && existing.verify(models_dir).is_ok() {
            return Ok((existing, Placed::AlreadyThere));
        }
        return Err(refused(format!(
            "the cache holds other files as {name} ({}): remove it or choose another --name",
            dir.display()
        )));
    }
    fs::create_dir_all(&dir)
        .map_err(|e| AddError::Io(format!("cannot create {}: {e}", dir.display())))?;
    for file in &mut entry.files {
        let staged = staging.path().join(&file.name);
        // A known model's files keep their known names, so `mesh model fetch` finds them.
        if let Some(pin) =
            find_known(&name).and_then(|k| k.files.iter().find(|f| f.sha256 == file.sha256))
        {
            file.name = pin.name.into();
        }
        let dest = dir.join(&file.name);
        fs::rename(&staged, &dest)
            .map_err(|e| AddError::Io(format!("cannot place {}: {e}", dest.display())))?;
    }
    write(models_dir, &entry)
        .map_err(|e| AddError::Io(format!("cannot write {}: {e}", dir.join(RECORD).display())))?;
    Ok((entry, placed))
}

/// Hashes a staged file, refusing it if it changed while it was read.
fn hash_steady(path: &Path, name: &Path) -> Result<EntryFile, AddError> {
    let io = |e: std::io::Error| AddError::Io(format!("cannot read {}: {e}", path.display()));
    let stamp = |meta: fs::Metadata| (meta.len(), meta.modified().ok());
    let before = stamp(fs::metadata(path).map_err(io)?);
    let blob = crate::blobs::hash_file(path).map_err(io)?;
    if stamp(fs::metadata(path).map_err(io)?) != before {
        return Err(AddError::Refused(format!(
            "{} changed while it was added: add it again once nothing writes to it",
            name.display()
        )));
    }
    Ok(EntryFile {
        name: name.to_string_lossy().into_owned(),
        sha256: blob.sha256.clone(),
        blob_root: blob.root_hex(),
        bytes: blob.tree.len(),
    })
}

fn same_set(a: &[&str], b: &[&str]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The files of a BERT directory, weights first, or what is missing.
fn bert_files(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, AddError> {
    use crate::engine::bert::{COMPANION_FILES, WEIGHTS_FILE};
    let names: Vec<&str> = std::iter::once(WEIGHTS_FILE)
        .chain(COMPANION_FILES)
        .collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(AddError::Refused(format!(
            "{} is not a BERT model directory: it lacks {}",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(names
        .iter()
        .map(|n| (PathBuf::from(n), dir.join(n)))
        .collect())
}

/// Refuses a file that does not start like a GGUF file.
fn check_gguf(path: &Path) -> Result<(), AddError> {
    let mut magic = [0u8; 4];
    let read = fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) | Err(_) => Err(AddError::Refused(format!(
            "{} is not a GGUF file (it does not start with \"GGUF\"); a BERT model is added as its directory",
            path.display()
        ))),
    }
}

/// Hard-links `source` to `dest`, or copies it (to a temporary name, then renamed).
fn place(source: &Path, dest: &Path) -> Result<Placed, AddError> {
    let io = |e: std::io::Error| AddError::Io(format!("cannot place {}: {e}", dest.display()));
    if fs::hard_link(source, dest).is_ok() {
        return Ok(Placed::Linked);
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = dest.with_file_name(format!(".{name}.adding"));
    let copied = fs::copy(source, &partial).and_then(|_| fs::rename(&partial, dest));
    if let Err(e) = copied {
        let _ = fs::remove_file(&partial);
        return Err(io(e));
    }
    Ok(Placed::Copied)
}

#[cfg(test)]
mod tests;
