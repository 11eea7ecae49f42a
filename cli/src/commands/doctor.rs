//! `mesh doctor [PEER_ID]`: checks of this machine's node, each with a verdict and a one-line
//! fix; exits 1 when one fails. The checks themselves are `mesh_node::doctor`'s: this gathers
//! the facts (the home's files, the running node's API) and prints them.

use std::process::ExitCode;

use mesh_node::doctor::{self, local, network, Check, Verdict};
use mesh_node::Home;

use crate::output::{self, escape_controls, failed, Exit};

pub async fn run(home: Home, peer: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(peer) = peer {
        let not_a_peer = || {
            failed(
                Exit::BadRequest,
                format!("{peer:?} is not a peer id (they start with 12D3KooW)"),
            )
        };
        match peer.parse::<mesh_node::dispatch::Target>() {
            Ok(mesh_node::dispatch::Target::Peer(_)) => {}
            _ => return Err(not_a_peer()),
        }
    }
    let mut checks = vec![
        local::home_permissions(home.root()),
        local::key_permissions(&home.key_path(), mesh_node::home::effective_uid()),
    ];
    checks.extend(local::model_files(
        &home.models_dir(),
        mesh_node::models::KNOWN_MODELS,
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    checks.push(local::clock(now, local::clock_sync()));

    match super::running_node(&home).await? {
        None => {
            let (verdict_of, area) = (peer.is_some(), "node");
            let summary = format!(
                "no node runs with home {}: the network checks need one",
                home.root().display()
            );
            let fix = "start it with `mesh join` (or give its home with --home)";
            checks.push(if verdict_of {
                Check::fail(area, summary, fix)
            } else {
                Check::warn(area, summary, fix)
            });
        }
        Some(node) => {
            let info = node.info();
            checks.push(network::api_exposure(info.api, info.api_key.is_some()));
            let diagnosis = node.diagnosis().await?;
            match node.status().network.clone() {
                Some(status) => {
                    checks.extend(network::reachability(&status, &diagnosis));
                    match peer {
                        Some(peer) => {
                            let facts = node.diagnose_peer(peer).await?;
                            checks.extend(network::explain_peer(
                                peer,
                                facts.summary.as_ref(),
                                facts.connect_error.as_deref(),
                                &status,
                                &diagnosis,
                            ));
                        }
                        None => {
                            let peers = node.peers().await?;
                            checks.extend(network::peers(&peers, &diagnosis));
                        }
                    }
                }
                None => checks.push(Check::warn(
                    "reach",
                    "the node does not report its network (an older mesh?)",
                    "restart it with this version of mesh",
                )),
            }
        }
    }

    let worst = doctor::worst(&checks);
    if json {
        output::json_line(&serde_json::json!({ "verdict": worst, "checks": checks }))?;
    } else {
        print(&checks)?;
    }
    Ok(if worst == Verdict::Fail {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print(checks: &[Check]) -> anyhow::Result<()> {
    let text = |s: &str| escape_controls(s, false).into_owned();
    let width = checks
        .iter()
        .map(|c| c.area.chars().count())
        .max()
        .unwrap_or(0)
        .min(32);
    for check in checks {
        let label = match check.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        let area = text(&check.area);
        outln!("{label}  {area:<width$}  {}", text(&check.summary));
        if let Some(fix) = &check.fix {
            outln!("      {:<width$}  fix: {}", "", text(fix));
        }
    }
    let count = |v| checks.iter().filter(|c| c.verdict == v).count();
    let (fails, warns) = (count(Verdict::Fail), count(Verdict::Warn));
    outln!();
    match (fails, warns) {
        (0, 0) => outln!("all {} checks passed", checks.len()),
        (0, w) => outln!("no problem found; {w} warning(s)"),
        (f, w) => outln!("{f} problem(s), {w} warning(s)"),
    }
    Ok(())
}
