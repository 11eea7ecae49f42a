//! One pull as a job that reports [`PullEvent`]s: find the file ([`super::locate`]), pull it
//! ([`super::pull`]) into a models directory. `POST /v1/mesh/pull` runs it in the node;
//! `mesh model pull` runs it in a short-lived node when none runs here.

use std::path::Path;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::locate::{destination, locate, LocateError};
use super::pull::{pull, Progress, PullError, Wanted};
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
    Located {
        model: String,
        sha256: String,
        blob_root: String,
        len: u64,
        sources: usize,
    },
    Progress {
        done: u64,
        len: u64,
        resumed: u64,
        by_source: std::collections::BTreeMap<String, u64>,
    },
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

/// Runs `request` with `client`, into `models_dir`, telling `tx` how it goes; the last event
/// is `done` or `error`. Dropping the receiver stops the pull (it resumes next time).
pub async fn run_job(
    client: &Client,
    models_dir: &Path,
    request: &PullRequest,
    tx: &mpsc::Sender<PullEvent>,
) {
    if let Err((code, message)) = run(client, models_dir, request, tx).await {
        let error = PullEvent::Error {
            code: code.into(),
            message,
        };
        let _ = tx.send(error).await;
    }
}

async fn run(
    client: &Client,
    models_dir: &Path,
    request: &PullRequest,
    tx: &mpsc::Sender<PullEvent>,
) -> Result<(), (&'static str, String)> {
    let mut from = Vec::new();
    for peer in &request.from {
        from.push(peer.parse::<PeerId>().map_err(|e| {
            (
                "bad_request",
                format!("from {peer:?} is not a peer id: {e}"),
            )
        })?);
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
            LocateError::NotFound(_) => ("not_found", e.to_string()),
            LocateError::NoAnswer(_) => ("network", e.to_string()),
        })?;
    let located = PullEvent::Located {
        model: found.model.clone(),
        sha256: found.sha256.clone(),
        blob_root: hex::encode(found.root),
        len: found.len,
        sources: found.sources.len(),
    };
    tx.send(located)
        .await
        .map_err(|_| ("failed", "the asker left".to_string()))?;
    let wanted = Wanted {
        root: found.root,
        sha256: found.sha256.clone(),
        dest: destination(
            models_dir,
            &found.model,
            &found.sha256,
            request.name.as_deref(),
        ),
        token,
    };
    let (ptx, mut prx) = mpsc::channel::<Progress>(64);
    let forward = {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                let line = PullEvent::Progress {
                    done: p.done,
                    len: p.len,
                    resumed: p.resumed,
                    by_source: p.by_source,
                };
                // A slow reader misses progress lines, never the end.
                let _ = tx.try_send(line);
            }
        })
    };
    let result = tokio::select! {
        result = pull(client, &found.sources, &wanted, found.len, Some(ptx)) => result,
        () = tx.closed() => return Err(("failed", "the asker left".into())),
    };
    let _ = forward.await;
    let report = result.map_err(|e| match e {
        PullError::NoSource(_) | PullError::SourcesExhausted(_) => ("network", e.to_string()),
        _ => ("failed", e.to_string()),
    })?;
    let done = PullEvent::Done {
        model: found.model,
        sha256: found.sha256,
        path: report.path,
        len: report.len,
        pieces: report.pieces,
        resumed: report.resumed,
        by_source: report.by_source,
        struck: report.struck,
        took_ms: report.took_ms,
    };
    let _ = tx.send(done).await;
    Ok(())
}
