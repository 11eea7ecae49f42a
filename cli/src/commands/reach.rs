//! How short-lived commands (`infer`, `models`, `peers`) reach the mesh: through the bootstrap
//! peers given, else through the node running on this machine, else through mDNS.

use std::time::Duration;

use mesh_node::api::Status;
use mesh_node::home::RuntimeInfo;
use mesh_node::network::Multiaddr;
use mesh_node::{Home, Node, NodeConfig, NodeIdentity};

use crate::args::FindArgs;
use crate::output::{failed, Exit};

/// The running local node's info, if its API answers.
pub async fn local_node(home: &Home) -> Option<(RuntimeInfo, Status)> {
    let info = home.read_runtime()?;
    let api = info.api?;
    let url = format!("http://{api}/v1/mesh/status");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    let status: Status = client.get(url).send().await.ok()?.json().await.ok()?;
    // A stale node.json may name a port another node now uses.
    (status.peer_id == info.peer_id).then_some((info, status))
}

/// Starts a short-lived client node joined to the mesh.
pub async fn client_node(
    home: &Home,
    identity: NodeIdentity,
    find: &FindArgs,
) -> anyhow::Result<Node> {
    let mut bootstrap = find.bootstrap.clone();
    let mut identity = identity;
    if let Some((_, status)) = local_node(home).await {
        if bootstrap.is_empty() {
            bootstrap = local_addrs(&status);
        }
        // The node running here already holds this key; a second swarm with the same peer
        // id could not even dial it. This short-lived node takes a key of its own.
        if status.peer_id == identity.peer_id().to_string() {
            tracing::debug!("a node with this key runs here; using a temporary key");
            identity = NodeIdentity::generate();
        }
    }
    if bootstrap.is_empty() && find.no_mdns {
        return Err(failed(
            Exit::Network,
            "no way to reach the mesh: pass --bootstrap MULTIADDR, run `mesh join` on this machine, or allow mDNS",
        ));
    }
    let mut config = NodeConfig::default();
    config.network.listen = vec![];
    config.network.bootstrap = bootstrap.clone();
    config.network.mdns = !find.no_mdns;
    // A short-lived client should not become part of other nodes' routing tables.
    config.network.dht_server = false;
    let node = Node::start(identity, vec![], config)
        .await
        .map_err(|e| failed(Exit::Network, e.to_string()))?;
    if bootstrap.is_empty() {
        // Only mDNS: give it a moment to find LAN peers.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(node)
}

/// The local node's addresses, best first: loopback TCP, then the rest.
fn local_addrs(status: &Status) -> Vec<Multiaddr> {
    let mut addrs: Vec<Multiaddr> = status
        .listen_addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .filter_map(|a: Multiaddr| a.with_p2p(status.peer_id.parse().ok()?).ok())
        .collect();
    addrs.sort_by_key(|a| {
        let s = a.to_string();
        (!s.starts_with("/ip4/127.0.0.1/tcp/"), s)
    });
    addrs.truncate(1);
    addrs
}
