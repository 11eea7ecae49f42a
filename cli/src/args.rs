//! Command-line arguments. These names and flags are the user interface: keep them stable.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Join,
    /// Call a model on a peer (or on any peer that hosts it) and stream the answer
    Infer,
    /// List the models on the mesh and who hosts them
    Models,
    /// List the peers a running node is connected to, and how
    Peers,
    /// Print this node's peer id (creating its key on first use)
    Id,
    /// Issue, inspect and revoke capability tokens
    Token,
}
