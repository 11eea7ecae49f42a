//! `mesh models`: the models on the mesh and who hosts them, from the peers' signed catalogs:
//! through the node running here (its API) when there is one, else through a short-lived node.

use std::process::ExitCode;

use anyhow::Context;
use mesh_node::directory::{self, Listing};
use mesh_node::Home;

use crate::args::FindArgs;
use crate::output;

pub async fn run(home: Home, find: &FindArgs, json: bool) -> anyhow::Result<ExitCode> {
    let local = match find.bootstrap.is_empty() {
        true => super::running_node(&home).await?,
        false => None,
    };
    let rows = match local {
        // The node running here already knows the mesh: ask it (GET /v1/mesh/models).
        Some(node) => node
            .models()
            .await
            .context("asking the node running here")?,
        _ => {
            let identity = super::load_identity(&home)?;
            let node = super::reach::client_node(&home, identity, find).await?;
            if let Err(e) = node.client().bootstrap().await {
                tracing::debug!("DHT walk: {e}");
            }
            let rows = directory::list(&node.client(), None).await;
            node.shutdown().await;
            rows
        }
    };

    if json {
        for row in &rows {
            output::json_line(&serde_json::json!({
                "model": row.model, "peer_id": row.peer_id, "load": row.load, "card": row.card,
                "layers": row.card.layers.map(|l| format!("{}..{}", l.start, l.end)),
                "path": row.path,
            }))?;
        }
    } else if rows.is_empty() {
        outln!("no models found on the mesh");
    } else {
        outln!(
            "{:<28} {:<9} {:<14} {:<8} {:<12} {:<13} PEER",
            "MODEL",
            "TASK",
            "ARCH",
            "QUANT",
            "LAYERS",
            "PATH"
        );
        for Listing {
            card,
            peer_id,
            path,
            ..
        } in &rows
        {
            // A stage runs a range of the model's layers for heads; a node hosting the model
            // whole (or a head, which serves it whole) shows "all".
            let layers = card.layers.map_or("all".to_string(), |l| {
                format!("{}..{} of {}", l.start, l.end, l.total)
            });
            outln!(
                "{:<28} {:<9} {:<14} {:<8} {:<12} {:<13} {peer_id}",
                output::escape_controls(&card.name, false),
                format!("{:?}", card.task).to_lowercase(),
                output::escape_controls(&card.architecture, false),
                output::escape_controls(&card.quantization, false),
                layers,
                path.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
