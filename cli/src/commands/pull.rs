//! `mesh model pull NAME|sha256:HEX [--from PEER]...`: a model's files from the peers that
//! host it, pieces from several at once, each verified, resumable; installed in the model
//! cache (with a record of where they came from) once each sha256 matches the signed card.
//!
//! Through the node running here when there is one (it pulls with its own connections and
//! identity: `POST /v1/mesh/pull`), else with a short-lived node; both run the same job
//! (`mesh_node::blobs::job`), whose events this prints: a progress bar (indicatif) with rate
//! and ETA, or `--json` lines.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mesh_node::blobs::job::{run_job, PullEvent, PullRequest};
use mesh_node::Home;
use tokio::sync::mpsc;

use crate::args::PullArgs;
use crate::output::{self, failed, Exit};

pub async fn run(home: Home, args: &PullArgs, json: bool) -> anyhow::Result<ExitCode> {
    let request = PullRequest {
        what: args.what.clone(),
        from: args.from.clone(),
        name: args.name.clone(),
        token: args.token.clone(),
    };
    let local = if args.find.bootstrap.is_empty() {
        super::running_node(&home).await?
    } else {
        None
    };
    let mut client_node = None;
    let mut events = match local {
        Some(node) => node
            .pull(&request)
            .await
            .map_err(|e| failed(Exit::Network, e.to_string()))?,
        None => {
            let identity = super::load_identity(&home)?;
            let node = super::reach::client_node(&home, identity, &args.find).await?;
            let (tx, rx) = mpsc::channel(64);
            let (client, dir) = (node.client(), home.models_dir());
            tokio::spawn(async move { run_job(&client, &dir, &request, &tx).await });
            client_node = Some(node);
            rx
        }
    };
    let outcome = show(&mut events, json).await;
    drop(events);
    if let Some(node) = client_node {
        node.shutdown().await;
    }
    outcome
}

/// Prints a pull's events until `done` or `error`.
async fn show(events: &mut mpsc::Receiver<PullEvent>, json: bool) -> anyhow::Result<ExitCode> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_line = Instant::now() - Duration::from_secs(1);
    while let Some(event) = events.recv().await {
        match &event {
            PullEvent::Progress { done, len, .. } if json => {
                if last_line.elapsed() >= Duration::from_millis(500) || done == len {
                    last_line = Instant::now();
                    output::json_line(&serde_json::to_value(&event)?)?;
                }
                continue;
            }
            PullEvent::Progress { done, .. } => {
                if let Some(bar) = &bar {
                    bar.set_position(*done);
                }
                continue;
            }
            _ if json => output::json_line(&serde_json::to_value(&event)?)?,
            _ => {}
        }
        match event {
            PullEvent::Located {
                model,
                sha256,
                len,
                files,
                sources,
                ..
            } => {
                if !json {
                    let files = if files > 1 {
                        format!("{files} files, ")
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "mesh: pulling {model} ({files}{} MB, sha256 {}…) from {sources} peer(s)",
                        len >> 20,
                        &sha256[..12.min(sha256.len())]
                    );
                    bar = Some(progress_bar(len));
                }
            }
            PullEvent::Done {
                model,
                path,
                len,
                pieces: 0,
                ..
            } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                if !json {
                    eprintln!(
                        "mesh: {model} is in the cache already ({} MB, verified)",
                        len >> 20
                    );
                    outln!("{model}: --model {model}={}", path.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            PullEvent::Done {
                model,
                path,
                len,
                resumed,
                by_source,
                struck,
                took_ms,
                ..
            } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                if !json {
                    let secs = (took_ms as f64 / 1000.0).max(0.001);
                    let resumed = if resumed > 0 {
                        format!(", {resumed} pieces resumed")
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "mesh: {} MB in {secs:.1} s ({:.0} MB/s): pieces {}{resumed}; sha256 verified",
                        len >> 20,
                        (len as f64 / 1e6) / secs,
                        mesh_node::blobs::pull::summary(&by_source),
                    );
                    for (peer, strikes) in &struck {
                        eprintln!("mesh: {peer} sent {strikes} bad answer(s); its pieces came from others");
                    }
                    outln!("{model}: --model {model}={}", path.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            PullEvent::Error { code, message } => {
                if let Some(bar) = bar.take() {
                    bar.abandon();
                }
                let exit = match code.as_str() {
                    "bad_request" => Exit::BadRequest,
                    "not_found" => Exit::NotFound,
                    "network" => Exit::Network,
                    _ => Exit::Failure,
                };
                return Err(failed(exit, message));
            }
            PullEvent::Progress { .. } => {}
        }
    }
    Err(failed(Exit::Failure, "the pull ended without an answer"))
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template"),
    );
    bar
}
