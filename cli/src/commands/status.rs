//! `mesh status`: one screen about the node running on this machine: who it is and where,
//! whether others can reach it and through which relays, the models it hosts with their queues,
//! its peers by path, and the calls it served in the last minute. `--json` prints one object.

use std::process::ExitCode;

use mesh_node::network::Path;
use mesh_node::Home;

use crate::output::{self, escape_controls};

pub async fn run(home: Home, json: bool) -> anyhow::Result<ExitCode> {
    let node = super::require_running_node(&home).await?;
    let status = node.status().clone();
    let peers = node.peers().await?;
    let by_path = |path: Path| peers.iter().filter(|p| p.path == path).count();
    if json {
        let mut value = serde_json::to_value(&status)?;
        value["api"] = node.addr().to_string().into();
        value["peers_by_path"] = serde_json::json!({
            "direct": by_path(Path::Direct),
            "hole-punched": by_path(Path::HolePunched),
            "relayed": by_path(Path::Relayed),
        });
        output::json_line(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = |s: &str| escape_controls(s, false).into_owned();
    outln!("node      {}", text(&status.peer_id));
    outln!("api       http://{}", node.addr());
    for addr in &status.listen_addrs {
        outln!("listen    {}", text(addr));
    }
    match &status.network {
        Some(net) => {
            let reach = format!("{:?}", net.reachability).to_lowercase();
            let autonat = format!("{:?}", net.autonat).to_lowercase();
            outln!("reach     {reach} (AutoNAT says {autonat})");
            for addr in &net.external_addrs {
                outln!("external  {}", text(addr));
            }
            if net.relays.is_empty() {
                outln!("relays    none held");
            } else {
                outln!("relays    {}", text(&net.relays.join(", ")));
            }
            if net.relaying {
                outln!("relaying  for others (this node is a relay)");
            }
            outln!(
                "dht       {} own key(s); {} record(s) of {} remote provider(s)",
                net.dht.own_keys,
                net.dht.remote_records,
                net.dht.remote_providers
            );
        }
        None => outln!("reach     unknown (the node did not say)"),
    }
    if status.models.is_empty() {
        outln!("models    none hosted");
    }
    for card in &status.models {
        let load = status.model_loads.iter().find(|l| l.model == card.name);
        let (busy, queued) = load.map_or((0, 0), |l| (l.busy, l.queued));
        outln!(
            "model     {:<24} {} busy of {}, {} queued",
            text(&card.name),
            busy,
            card.max_concurrency,
            queued
        );
    }
    outln!(
        "peers     {} direct, {} hole-punched, {} relayed",
        by_path(Path::Direct),
        by_path(Path::HolePunched),
        by_path(Path::Relayed)
    );
    let m = status.served_last_minute;
    outln!(
        "served    last minute: {} answered, {} refused, {} failed, {} cancelled",
        m.answered,
        m.refused,
        m.failed,
        m.cancelled
    );
    Ok(ExitCode::SUCCESS)
}
