//! `mesh models`: the models on the mesh and who hosts them, from the peers' signed catalogs.

use std::process::ExitCode;

use mesh_node::Home;

use crate::args::FindArgs;
use crate::output;

pub async fn run(home: Home, find: &FindArgs, json: bool) -> anyhow::Result<ExitCode> {
    let identity = super::load_identity(&home)?;
    let node = super::reach::client_node(&home, identity, find).await?;
    let client = node.client();
    if let Err(e) = client.bootstrap().await {
        tracing::debug!("DHT walk: {e}");
    }
    let mut peers = client.known_peers().await?;
    for p in client.peers().await? {
        if let Ok(id) = p.peer_id.parse() {
            peers.push(id);
        }
    }
    peers.sort();
    peers.dedup();
    let lookups = peers.iter().map(|peer| {
        let client = client.clone();
        async move { (*peer, client.catalog(*peer).await) }
    });
    let mut rows = Vec::new();
    for (peer, result) in futures::future::join_all(lookups).await {
        match result {
            Ok((cards, load)) => {
                for card in cards {
                    rows.push((card, peer, load));
                }
            }
            Err(e) => tracing::debug!(%peer, "no catalog: {e}"),
        }
    }
    rows.sort_by(|a, b| (&a.0.name, a.1).cmp(&(&b.0.name, b.1)));
    node.shutdown().await;

    if json {
        for (card, peer, load) in &rows {
            output::json_line(&serde_json::json!({
                "model": card.name, "peer_id": peer.to_string(), "load": load, "card": card,
            }));
        }
    } else if rows.is_empty() {
        println!("no models found on the mesh ({} peers asked)", peers.len());
    } else {
        println!(
            "{:<28} {:<9} {:<14} {:<8} PEER",
            "MODEL", "TASK", "ARCH", "QUANT"
        );
        for (card, peer, _) in &rows {
            println!(
                "{:<28} {:<9} {:<14} {:<8} {peer}",
                card.name,
                format!("{:?}", card.task).to_lowercase(),
                card.architecture,
                card.quantization
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
