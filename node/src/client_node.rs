//! A short-lived node for one command (`mesh infer`, `mesh models` without a node running
//! here): it joins through the bootstrap peers given, else through the node running with the
//! same home, else through mDNS, asks what it needs, and leaves. It is a DHT client only, so
//! it never enters other nodes' routing tables.

use std::time::Duration;

use libp2p::Multiaddr;

use crate::api::client::LocalApi;
use crate::api::Status;
use crate::{Home, Node, NodeConfig, NodeError, NodeIdentity};

/// How long a node that can only use mDNS waits for LAN peers to answer.
const MDNS_SETTLE: Duration = Duration::from_secs(2);

/// How a short-lived node finds the mesh.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientNodeError {
    #[error(
        "no way to reach the mesh: pass --bootstrap MULTIADDR, run `mesh join` on this machine, or allow mDNS"
    )]
    NoRoute,
    #[error(transparent)]
    Start(#[from] NodeError),
}

/// Starts a short-lived client node joined to the mesh.
pub async fn start(
    home: &Home,
    identity: NodeIdentity,
    reach: &Reach,
) -> Result<Node, ClientNodeError> {
    let mut bootstrap = reach.bootstrap.clone();
    let mut identity = identity;
    match LocalApi::find(home).await {
        Ok(Some(local)) => {
            if bootstrap.is_empty() {
                bootstrap = loopback_first(local.status());
            }
            // The node running here already holds this key; a second swarm with the same
            // peer id could not even dial it. This short-lived node takes a key of its own.
            if local.status().peer_id == identity.peer_id().to_string() {
                tracing::debug!("a node with this key runs here; using a temporary key");
                identity = NodeIdentity::generate();
            }
        }
        Ok(None) => {}
        Err(e) => {
            // A node runs here (likely with this key) but refuses this command's API key.
            tracing::warn!("{e}; going on without it, with a temporary key");
            identity = NodeIdentity::generate();
        }
    }
    if bootstrap.is_empty() && !reach.mdns {
        return Err(ClientNodeError::NoRoute);
    }
    let mut config = NodeConfig::default();
    config.network.listen = vec![];
    config.network.bootstrap = bootstrap.clone();
    config.network.mdns = reach.mdns;
    // A short-lived client should not become part of other nodes' routing tables.
    config.network.dht_server = false;
    let node = Node::start(identity, vec![], config).await?;
    if bootstrap.is_empty() {
        tokio::time::sleep(MDNS_SETTLE).await;
    }
    Ok(node)
}

/// The running node's best address for a node on the same machine: loopback TCP, else the
/// first it listens on.
fn loopback_first(status: &Status) -> Vec<Multiaddr> {
    let Ok(peer) = status.peer_id.parse() else {
        return Vec::new();
    };
    let mut addrs: Vec<Multiaddr> = status
        .listen_addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .filter_map(|a| a.with_p2p(peer).ok())
        .collect();
    addrs.sort_by_key(|a| {
        let s = a.to_string();
        (!s.starts_with("/ip4/127.0.0.1/tcp/"), s)
    });
    addrs.truncate(1);
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_tcp_address_is_chosen() {
        let peer = NodeIdentity::generate().peer_id();
        let status = Status {
            peer_id: peer.to_string(),
            listen_addrs: vec![
                "/ip4/192.0.2.7/tcp/4001".into(),
                "/ip4/127.0.0.1/udp/4001/quic-v1".into(),
                "/ip4/127.0.0.1/tcp/4001".into(),
                "not an address".into(),
            ],
            models: vec![],
            load: 0,
            network: None,
            stages: vec![],
            model_loads: vec![],
            served_last_minute: Default::default(),
        };
        let chosen = loopback_first(&status);
        assert_eq!(
            chosen,
            vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
                .parse()
                .unwrap()]
        );
        let bad = Status {
            peer_id: "nope".into(),
            ..status
        };
        assert!(loopback_first(&bad).is_empty());
    }
}
