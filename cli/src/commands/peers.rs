//! `mesh peers`: what the node running on this machine is connected to, and how.

use std::process::ExitCode;

use mesh_node::Home;

use crate::output;

pub async fn run(home: Home, json: bool) -> anyhow::Result<ExitCode> {
    let node = super::require_running_node(&home).await?;
    let peers = node.peers().await?;
    if json {
        for p in &peers {
            output::json_line(&serde_json::to_value(p)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if peers.is_empty() {
        outln!("not connected to any peer");
    }
    for p in &peers {
        let rtt = p.rtt_ms.map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
        outln!(
            "{}  {:<12} rtt {:<9} {}",
            p.peer_id,
            p.path.as_str(),
            rtt,
            output::escape_controls(p.addresses.first().map_or("", |a| a.as_str()), false)
        );
    }
    Ok(ExitCode::SUCCESS)
}
