//! `mesh peers`: what the node running on this machine is connected to, and how.

use std::process::ExitCode;
use std::time::Duration;

use mesh_node::Home;

use crate::output::{self, failed, Exit};

pub async fn run(home: Home, json: bool) -> anyhow::Result<ExitCode> {
    let Some((info, _)) = super::reach::local_node(&home).await else {
        return Err(failed(
            Exit::Network,
            format!(
                "no node is running with home {}: start one with `mesh join`",
                home.root().display()
            ),
        ));
    };
    let api = info.api.expect("local_node checked the API");
    let peers: Vec<serde_json::Value> = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(format!("http://{api}/v1/mesh/peers"))
        .send()
        .await?
        .json()
        .await?;
    if json {
        for p in &peers {
            output::json_line(p);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if peers.is_empty() {
        println!("not connected to any peer");
    }
    for p in &peers {
        let rtt = p["rtt_ms"]
            .as_f64()
            .map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
        println!(
            "{}  {:<12} rtt {:<9} {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["path"].as_str().unwrap_or("?"),
            rtt,
            p["addresses"][0].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
