//! How short-lived commands (`infer`, `models`, `peers`) reach the mesh: the flags they take,
//! turned into what mesh-node's [`client_node`](mesh_node::client_node) needs.

use mesh_node::client_node::{self, ClientNodeError, Reach};
use mesh_node::{Home, Node, NodeIdentity};

use crate::args::FindArgs;
use crate::output::{failed, Exit};

/// Starts a short-lived client node joined to the mesh.
pub async fn client_node(
    home: &Home,
    identity: NodeIdentity,
    find: &FindArgs,
) -> anyhow::Result<Node> {
    let reach = Reach {
        bootstrap: find.bootstrap.clone(),
        mdns: !find.no_mdns,
    };
    client_node::start(home, identity, &reach)
        .await
        .map_err(|e: ClientNodeError| failed(Exit::Network, e.to_string()))
}
