//! Real libp2p nodes on loopback inside this process, for tests and benchmarks.

use std::sync::Arc;

use libp2p::Multiaddr;
use mesh_node::engine::builtin;
use mesh_node::engine::SharedEngine;
use mesh_node::{Node, NodeConfig, NodeIdentity};

/// A node config for loopback: TCP and QUIC on 127.0.0.1, no mDNS, the given bootstrap peers.
pub fn loopback_config(bootstrap: Vec<Multiaddr>) -> NodeConfig {
    let mut config = NodeConfig::default();
    config.network.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("valid"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("valid"),
    ];
    config.network.mdns = false;
    config.network.bootstrap = bootstrap;
    config
}

/// Builds engines from `name=builtin:...` specs.
pub fn builtin_engines(specs: &[(&str, &str)]) -> Vec<SharedEngine> {
    specs
        .iter()
        .map(|(name, spec)| {
            let engine = builtin::from_spec(name, spec, 2).expect("valid builtin spec");
            Arc::from(engine)
        })
        .collect()
}

/// Starts a node on loopback hosting `engines`, joined through `bootstrap`.
pub async fn start_node(engines: Vec<SharedEngine>, bootstrap: Vec<Multiaddr>) -> Node {
    Node::start(
        NodeIdentity::generate(),
        engines,
        loopback_config(bootstrap),
    )
    .await
    .expect("node starts")
}

/// The TCP address of `node` with its `/p2p/` suffix, to use as a bootstrap address.
pub async fn tcp_addr(node: &Node) -> Multiaddr {
    let addrs = node.client().listen_addrs().await.expect("listen addrs");
    addrs
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .expect("a TCP listener")
        .with_p2p(node.peer_id())
        .expect("no other /p2p suffix")
}
