//! Pulling a whole file from the peers that hold it: pieces from several at once, each
//! verified before it is written, a bad piece fetched again elsewhere and its sender backed
//! off, the download resumable, and the whole file's sha256 checked before it is installed.
//!
//! The file grows as `DEST.part`, with `DEST.part.json` beside it: the root, the length, and
//! the leaf hash of every piece written and verified. A pull that starts again re-reads those
//! pieces from disk, keeps the ones whose leaf still matches, and fetches only the rest.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::fetch::{fetch_run, FetchError, Piece, PieceRun};
use super::schedule::{Outcome, Run, Schedule};
use super::tree::{self, Hash, PIECE_LEN};
use crate::network::Client;

/// Runs in flight per source at once (the next is asked while the last arrives).
pub const RUNS_PER_SOURCE: usize = 2;
/// Failures in a row after which a source is given up for this pull.
pub const MAX_FAILURES: u32 = 5;
/// Bad answers after which a source is given up for this pull.
pub const MAX_STRIKES: u32 = 3;
/// Pieces written between two saves of the resume state.
const SAVE_EVERY: u64 = 16;

/// What to pull.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub root: Hash,
    /// sha256 of the whole file, lower-case hex, from the signed card.
    pub sha256: String,
    /// Where the file goes once whole and checked.
    pub dest: PathBuf,
    pub token: Option<Vec<u8>>,
}

/// Where a pull is, for a progress bar or `--json` lines.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Bytes written and verified, resumed ones included.
    pub done: u64,
    pub len: u64,
    /// Bytes resumed from an earlier pull.
    pub resumed: u64,
    /// Pieces each source delivered in this pull.
    pub by_source: BTreeMap<String, u64>,
}

/// How a pull went.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub len: u64,
    pub pieces: u64,
    /// Pieces found on disk from an earlier pull.
    pub resumed: u64,
    /// Their bytes.
    pub resumed_bytes: u64,
    pub by_source: BTreeMap<String, u64>,
    /// Sources that sent a bad piece, with their strikes.
    pub struck: BTreeMap<String, u32>,
    pub took_ms: u64,
    /// The file as this node can now serve it: its tree built from the leaves verified on
    /// the way, so it is not read again.
    #[serde(skip)]
    pub blob: super::Blob,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("no source to pull from: {0}")]
    NoSource(String),
    #[error("every source failed or sent bad pieces ({0})")]
    SourcesExhausted(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the file assembled has sha256 {actual}, the card says {expected}: not installed")]
    Sha256 { actual: String, expected: String },
}

/// The resume state beside the part file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    root: String,
    len: u64,
    /// Leaf hash (hex) of each piece written and verified.
    leaves: BTreeMap<u64, String>,
}

fn part_paths(dest: &Path) -> (PathBuf, PathBuf) {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        dest.with_file_name(format!("{name}.part")),
        dest.with_file_name(format!("{name}.part.json")),
    )
}

/// The pieces an earlier pull of the same file left, checked against their leaves on disk.
fn resume(part: &Path, state_path: &Path, root: &Hash, len: u64) -> (State, HashSet<u64>) {
    let fresh = State {
        root: hex::encode(root),
        len,
        leaves: BTreeMap::new(),
    };
    let Some(state) = std::fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        .filter(|s| s.root == fresh.root && s.len == len)
    else {
        return (fresh, HashSet::new());
    };
    let Ok(file) = std::fs::File::open(part) else {
        return (fresh, HashSet::new());
    };
    let mut kept = State {
        leaves: BTreeMap::new(),
        ..fresh
    };
    let mut have = HashSet::new();
    for (index, leaf_hex) in state.leaves {
        let mut piece = vec![0u8; tree::piece_len(len, index)];
        let intact = file
            .read_exact_at(&mut piece, index * PIECE_LEN as u64)
            .is_ok()
            && hex::encode(tree::leaf(&piece)) == leaf_hex;
        if intact {
            have.insert(index);
            kept.leaves.insert(index, leaf_hex);
        }
    }
    (kept, have)
}

struct Shared {
    schedule: Mutex<Schedule>,
    state: Mutex<State>,
    file: std::fs::File,
    part: PathBuf,
    state_path: PathBuf,
    written: Mutex<u64>,
}

impl Shared {
    fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&*self.state.lock()).map_err(std::io::Error::other)?;
        crate::home::write_atomic(&self.state_path, &bytes)
    }
}

/// Pulls `wanted` (a file of `len` bytes) from `sources`, sending progress on `progress`.
pub async fn pull(
    client: &Client,
    sources: &[PeerId],
    wanted: &Wanted,
    len: u64,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<Report, PullError> {
    if sources.is_empty() {
        return Err(PullError::NoSource("no peer holds the file".into()));
    }
    let started = Instant::now();
    let (part, state_path) = part_paths(&wanted.dest);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PullError::Io { path, source }
    };
    if let Some(dir) = wanted.dest.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let (state, have) = resume(&part, &state_path, &wanted.root, len);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&part)
        .map_err(io(&part))?;
    file.set_len(len).map_err(io(&part))?;
    let pieces = tree::piece_count(len);
    let resumed: u64 = have.iter().map(|i| tree::piece_len(len, *i) as u64).sum();
    let shared = Arc::new(Shared {
        schedule: Mutex::new(Schedule::new(pieces, &have)),
        state: Mutex::new(state),
        file,
        part: part.clone(),
        state_path: state_path.clone(),
        written: Mutex::new(resumed),
    });
    let (tell, mut told) = mpsc::unbounded_channel::<()>();
    let mut workers = tokio::task::JoinSet::new();
    for peer in sources {
        for _ in 0..RUNS_PER_SOURCE {
            let (client, shared, tell) = (client.clone(), shared.clone(), tell.clone());
            let run = PieceRun {
                root: wanted.root,
                len: Some(len),
                first: 0,
                count: 0,
                token: wanted.token.clone(),
            };
            workers.spawn(worker(client, *peer, run, shared, tell));
        }
    }
    drop(tell);
    // Progress, as pieces land, until every worker is done.
    let report_progress = |shared: &Shared| {
        let by_source = shared
            .schedule
            .lock()
            .delivered()
            .into_iter()
            .map(|(p, n)| (p.to_string(), n))
            .collect();
        Progress {
            done: *shared.written.lock(),
            len,
            resumed,
            by_source,
        }
    };
    loop {
        tokio::select! {
            Some(()) = told.recv() => {
                if let Some(tx) = &progress {
                    let _ = tx.try_send(report_progress(&shared));
                }
            }
            next = workers.join_next() => {
                match next {
                    Some(Ok(Err(e))) => return Err(e),
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
    let (complete, struck, by_source) = {
        let schedule = shared.schedule.lock();
        let struck: BTreeMap<String, u32> = sources
            .iter()
            .filter(|p| schedule.strikes(p) > 0)
            .map(|p| (p.to_string(), schedule.strikes(p)))
            .collect();
        let by_source = schedule
            .delivered()
            .into_iter()
            .map(|(p, n)| (p.to_string(), n))
            .collect();
        (schedule.is_complete(), struck, by_source)
    };
    shared.save().map_err(io(&state_path))?;
    if !complete {
        let left = shared.schedule.lock().left();
        return Err(PullError::SourcesExhausted(format!(
            "{left} of {pieces} pieces missing; run the pull again to resume"
        )));
    }
    if let Some(tx) = &progress {
        let _ = tx.try_send(report_progress(&shared));
    }
    shared.file.sync_all().map_err(io(&part))?;
    let actual = tokio::task::spawn_blocking({
        let part = part.clone();
        move || crate::models::sha256_file(&part)
    })
    .await
    .expect("hashing does not panic")
    .map_err(io(&part))?;
    if actual != wanted.sha256 {
        // Every piece matched the root, so the card's root and sha256 disagree.
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&state_path);
        return Err(PullError::Sha256 {
            actual,
            expected: wanted.sha256.clone(),
        });
    }
    let tree = {
        let state = shared.state.lock();
        let leaves: Option<Vec<Hash>> = (0..pieces)
            .map(|i| {
                let hex = state.leaves.get(&i)?;
                hex::decode(hex).ok()?.try_into().ok()
            })
            .collect();
        leaves.and_then(|l| tree::Tree::from_leaves(len, l).ok())
    }
    .filter(|t| t.root() == wanted.root)
    .ok_or_else(|| PullError::SourcesExhausted("the pieces kept do not make the root".into()))?;
    std::fs::rename(&part, &wanted.dest).map_err(io(&wanted.dest))?;
    let _ = std::fs::remove_file(&state_path);
    crate::models::remember_verified(&wanted.dest, &actual);
    Ok(Report {
        path: wanted.dest.clone(),
        len,
        pieces,
        resumed: have.len() as u64,
        resumed_bytes: resumed,
        by_source,
        struck,
        took_ms: started.elapsed().as_millis() as u64,
        blob: super::Blob {
            path: wanted.dest.clone(),
            sha256: actual,
            tree: Arc::new(tree),
        },
    })
}

/// One of a source's runs in flight: asks for runs until the pull is complete or the source
/// is given up.
async fn worker(
    client: Client,
    peer: PeerId,
    mut ask: PieceRun,
    shared: Arc<Shared>,
    tell: mpsc::UnboundedSender<()>,
) -> Result<(), PullError> {
    let mut failures = 0u32;
    loop {
        let next = {
            let mut schedule = shared.schedule.lock();
            if schedule.is_complete() || schedule.strikes(&peer) >= MAX_STRIKES {
                return Ok(());
            }
            match schedule.next_run(peer, Instant::now()) {
                Some(run) => Ok(run),
                None => Err(schedule.back_until(&peer)),
            }
        };
        let run: Run = match next {
            Ok(run) => run,
            Err(until) => {
                // Backed off, or every missing piece is taken: wait a little and look again.
                let wait = until
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_millis(50))
                    .clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        ask.first = run.first;
        ask.count = run.count;
        let begun = Instant::now();
        let mut bytes = 0u64;
        let mut write_error = None;
        let result = fetch_run(&client, peer, &ask, |piece: Piece| {
            bytes += piece.data.len() as u64;
            if write_error.is_none() {
                if let Err(e) = keep(&shared, peer, piece) {
                    write_error = Some(e);
                }
            }
            let _ = tell.send(());
        })
        .await;
        if let Some(e) = write_error {
            return Err(e);
        }
        let outcome = match &result {
            Ok(_) => {
                failures = 0;
                Outcome::Done {
                    bytes,
                    took: begun.elapsed(),
                }
            }
            Err(FetchError::Lied { why, .. }) => {
                tracing::warn!(%peer, "a bad answer from a source, backing it off: {why}");
                Outcome::Lied
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(%peer, "a source failed: {e}");
                Outcome::Failed
            }
        };
        shared
            .schedule
            .lock()
            .ended(peer, run, outcome, Instant::now());
        let refused = matches!(result, Err(FetchError::Refused { .. }));
        if refused || failures >= MAX_FAILURES {
            if let Err(e) = result {
                tracing::info!(%peer, "giving up this source: {e}");
            }
            return Ok(());
        }
    }
}

/// Writes a verified piece if it is the first copy, and records its leaf. (A 256 KiB write
/// lands in the page cache; it is not worth a blocking-pool hop per piece.)
fn keep(shared: &Shared, peer: PeerId, piece: Piece) -> Result<(), PullError> {
    if !shared.schedule.lock().arrived(peer, piece.index) {
        return Ok(());
    }
    let io = |source| PullError::Io {
        path: shared.part.clone(),
        source,
    };
    shared
        .file
        .write_all_at(&piece.data, piece.index * PIECE_LEN as u64)
        .map_err(io)?;
    let leaf = hex::encode(tree::leaf(&piece.data));
    let count = {
        let mut state = shared.state.lock();
        state.leaves.insert(piece.index, leaf);
        state.leaves.len() as u64
    };
    *shared.written.lock() += piece.data.len() as u64;
    if count.is_multiple_of(SAVE_EVERY) {
        shared.save().map_err(io)?;
    }
    Ok(())
}

/// Sources by how many pieces they delivered, for a summary line.
pub fn summary(by_source: &BTreeMap<String, u64>) -> String {
    let mut parts: Vec<(&String, &u64)> = by_source.iter().collect();
    parts.sort_by(|a, b| b.1.cmp(a.1));
    parts
        .iter()
        .map(|(p, n)| format!("{n} from {}", crate::doctor::network::short(p)))
        .collect::<Vec<_>>()
        .join(", ")
}
