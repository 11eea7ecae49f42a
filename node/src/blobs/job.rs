//! One pull as a job that reports [`PullEvent`]s: find the file ([`super::locate`]), pull it
//! ([`super::pull`]) into a models directory. `POST /v1/mesh/pull` runs it in the node;
//! `mesh model pull` runs it in a short-lived node when none runs here.

use std::collections::BTreeMap;
use std::path::Path;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::locate::{destination, locate, LocateError};
use super::pull::{pull, Progress, PullError, Wanted};
use crate::models::library;
use crate::network::Client;

/// What to pull (the body of `POST /v1/mesh/pull`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullRequest {
    /// A model's name, or `sha256:HEX`.
    pub what: String,
    /// Pull from these peers only.
    #[serde(default)]
    pub from: Vec<String>,
    /// The name to install a file that is not a known model under.
    #[serde(default, rename = "as")]
    pub name: Option<String>,
    /// A capability token (`mtk1.…`), for a model whose hosts ask for one.
    #[serde(default)]
    pub token: Option<String>,
}

/// One line of the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// The weights' sha256 and root, and the bytes of every file.
    Located {
        model: String,
        sha256: String,
        blob_root: String,
        len: u64,
        /// Files to pull: 1, or more for a model that is a directory.
        files: usize,
        sources: usize,
    },
    Progress {
        done: u64,
        len: u64,
        resumed: u64,
        by_source: std::collections::BTreeMap<String, u64>,
    },
    /// `model` is the cache entry's name; `pieces` 0 when the cache held the files already.
    Done {
        model: String,
        sha256: String,
        path: std::path::PathBuf,
        len: u64,
        pieces: u64,
        resumed: u64,
        by_source: std::collections::BTreeMap<String, u64>,
        struck: std::collections::BTreeMap<String, u32>,
        took_ms: u64,
    },
    Error {
        /// `bad_request`, `not_found`, `network` or `failed`.
        code: String,
        message: String,
    },
}

/// What a finished pull leaves for the node to serve onward: the cache entry's name (whose
/// access policy its files follow) and its files.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub entry: String,
    pub blobs: Vec<super::Blob>,
}

/// Runs `request` with `client`, into `models_dir`, telling `tx` how it goes; the last event
/// is `done` or `error`. Dropping the receiver stops the pull (it resumes next time).
pub async fn run_job(
    client: &Client,
    models_dir: &Path,
    request: &PullRequest,
    tx: &mpsc::Sender<PullEvent>,
) -> Option<Pulled> {
    match run(client, models_dir, request, tx).await {
        Ok(pulled) => pulled,
        Err((code, message)) => {
            let error = PullEvent::Error {
                code: code.into(),
                message,
            };
            let _ = tx.send(error).await;
            None
        }
    }
}

type JobError = (&'static str, String);

async fn run(
    client: &Client,
    models_dir: &Path,
    request: &PullRequest,
    tx: &mpsc::Sender<PullEvent>,
) -> Result<Option<Pulled>, JobError> {
    let mut from = Vec::new();
    for peer in &request.from {
        from.push(peer.parse::<PeerId>().map_err(|e| {
            (
                "bad_request",
                format!("from {peer:?} is not a peer id: {e}"),
            )
        })?);
    }
    if let Some(name) = &request.name {
        library::validate_name(name).map_err(|e| ("bad_request", format!("--as: {e}")))?;
    }
    let token = match &request.token {
        Some(text) => Some(
            mesh_protocol::SignedToken::from_text(text)
                .map_err(|e| ("bad_request", format!("token: {e}")))?
                .to_bytes(),
        ),
        None => None,
    };
    let found = locate(client, &request.what, &from, token.as_deref())
        .await
        .map_err(|e| match e {
            LocateError::BadRequest(m) => ("bad_request", m),
            LocateError::NotFound(_) | LocateError::NoPinned(_) => ("not_found", e.to_string()),
            LocateError::NoAnswer(_) => ("network", e.to_string()),
        })?;
    let weights = found.weights().clone();
    let located = PullEvent::Located {
        model: found.model.clone(),
        sha256: weights.sha256.clone(),
        blob_root: hex::encode(weights.root),
        len: found.len(),
        files: found.files.len(),
        sources: found.sources.len(),
    };
    tx.send(located)
        .await
        .map_err(|_| ("failed", "the asker left".to_string()))?;
    let (entry_name, weights_name) = destination(&found, request.name.as_deref());
    let names: Vec<String> = found
        .files
        .iter()
        .map(|f| f.name.clone().unwrap_or_else(|| weights_name.clone()))
        .collect();
    let started = std::time::Instant::now();
    if let Some(done) = already_there(models_dir, &entry_name, &found, &names)? {
        let _ = tx.send(done).await;
        return Ok(None);
    }
    let dir = models_dir.join(&entry_name);
    let mut total = Totals::default();
    let mut blobs = Vec::new();
    let mut files = Vec::new();
    for (file, name) in found.files.iter().zip(&names) {
        let wanted = Wanted {
            root: file.root,
            sha256: file.sha256.clone(),
            dest: dir.join(name),
            token: token.clone(),
        };
        let report = pull_one(client, &found, &wanted, file.len, &total, tx).await?;
        total.add(&report);
        files.push(library::EntryFile {
            name: name.clone(),
            sha256: file.sha256.clone(),
            blob_root: hex::encode(file.root),
            bytes: file.len,
        });
        blobs.push(report.blob);
    }
    let entry = library::Entry {
        name: entry_name.clone(),
        format: found.format,
        files,
        source: library::Source::Peers {
            peers: total.by_source.keys().cloned().collect(),
        },
        added: library::now(),
    };
    library::write(models_dir, &entry).map_err(|e| {
        (
            "failed",
            format!("cannot record {entry_name} in the cache: {e}"),
        )
    })?;
    let done = PullEvent::Done {
        model: entry_name.clone(),
        sha256: weights.sha256,
        path: entry.entry_path(models_dir),
        len: found.len(),
        pieces: total.pieces,
        resumed: total.resumed_pieces,
        by_source: total.by_source,
        struck: total.struck,
        took_ms: started.elapsed().as_millis() as u64,
    };
    let _ = tx.send(done).await;
    Ok(Some(Pulled {
        entry: entry_name,
        blobs,
    }))
}

/// `done` at once when the cache holds these very files under `entry` already; an error when
/// it holds others under that name.
fn already_there(
    models_dir: &Path,
    entry: &str,
    found: &super::locate::Located,
    names: &[String],
) -> Result<Option<PullEvent>, JobError> {
    let Some(existing) = library::read(models_dir, entry).map_err(|e| ("failed", e))? else {
        return Ok(None);
    };
    let same = existing.files.len() == found.files.len()
        && found.files.iter().zip(names).all(|(f, name)| {
            existing
                .files
                .iter()
                .any(|e| e.name == *name && e.sha256 == f.sha256)
        });
    if !same {
        return Err((
            "bad_request",
            format!(
                "the cache holds other files as {entry}: pull with --as ANOTHER_NAME, or remove {}",
                existing.dir(models_dir).display()
            ),
        ));
    }
    if existing.verify(models_dir).is_err() {
        return Ok(None);
    }
    Ok(Some(PullEvent::Done {
        model: entry.to_string(),
        sha256: found.weights().sha256.clone(),
        path: existing.entry_path(models_dir),
        len: found.len(),
        pieces: 0,
        resumed: 0,
        by_source: Default::default(),
        struck: Default::default(),
        took_ms: 0,
    }))
}

/// What the files pulled so far add up to, for progress over the whole model.
#[derive(Debug, Default)]
struct Totals {
    done: u64,
    /// Bytes and pieces resumed from an earlier pull.
    resumed: u64,
    resumed_pieces: u64,
    pieces: u64,
    by_source: BTreeMap<String, u64>,
    struck: BTreeMap<String, u32>,
}

impl Totals {
    fn add(&mut self, report: &super::pull::Report) {
        self.done += report.len;
        self.resumed += report.resumed_bytes;
        self.resumed_pieces += report.resumed;
        self.pieces += report.pieces;
        for (peer, n) in &report.by_source {
            *self.by_source.entry(peer.clone()).or_default() += n;
        }
        for (peer, n) in &report.struck {
            *self.struck.entry(peer.clone()).or_default() += n;
        }
    }

    /// `progress` within one file, as progress over the whole model.
    fn with(&self, progress: Progress, len: u64) -> PullEvent {
        let mut by_source = self.by_source.clone();
        for (peer, n) in progress.by_source {
            *by_source.entry(peer).or_default() += n;
        }
        PullEvent::Progress {
            done: self.done + progress.done,
            len,
            resumed: self.resumed + progress.resumed,
            by_source,
        }
    }
}

/// Pulls one file of `found`, forwarding its progress as the whole model's.
async fn pull_one(
    client: &Client,
    found: &super::locate::Located,
    wanted: &Wanted,
    len: u64,
    total: &Totals,
    tx: &mpsc::Sender<PullEvent>,
) -> Result<super::pull::Report, JobError> {
    let (ptx, mut prx) = mpsc::channel::<Progress>(64);
    let whole = found.len();
    let forward = async {
        while let Some(p) = prx.recv().await {
            // A slow reader misses progress lines, never the end.
            let _ = tx.try_send(total.with(p, whole));
        }
    };
    let result = tokio::select! {
        (result, ()) = futures::future::join(pull(client, &found.sources, wanted, len, Some(ptx)), forward) => result,
        () = tx.closed() => return Err(("failed", "the asker left".into())),
    };
    result.map_err(|e| match e {
        PullError::NoSource(_) | PullError::SourcesExhausted(_) => ("network", e.to_string()),
        _ => ("failed", e.to_string()),
    })
}
