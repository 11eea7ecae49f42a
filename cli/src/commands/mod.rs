//! One module per subcommand.

mod doctor;
mod infer;
mod inspect;
mod join;
mod model;
mod models;
mod peers;
mod pull;
mod reach;
mod receipt;
mod status;
mod token;

use std::process::ExitCode;

use anyhow::Context;
use mesh_node::{Home, NodeIdentity};

use crate::args::{Cli, Command};
use crate::output;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let home = || -> anyhow::Result<Home> { Ok(Home::open(Home::resolve(cli.home.as_deref())?)?) };
    match &cli.command {
        Command::Id => id(&home()?, json),
        Command::Join(args) => join::run(home()?, args, json).await,
        Command::Infer(args) => infer::run(home()?, args, json).await,
        Command::Models(args) => models::run(home()?, args, json).await,
        Command::Peers => peers::run(home()?, json).await,
        Command::Status => status::run(home()?, json).await,
        Command::Doctor { peer } => doctor::run(home()?, peer.as_deref(), json).await,
        Command::Calls => inspect::calls(home()?, json).await,
        Command::Capture { state } => inspect::capture(home()?, state.as_deref(), json).await,
        Command::Replay(args) => inspect::replay(home()?, args, json).await,
        Command::Model(crate::args::ModelCommand::Pull(args)) => {
            pull::run(home()?, args, json).await
        }
        Command::Model(action) => model::run(&home()?, action, json),
        Command::Token(action) => token::run(&home()?, action, json),
        Command::Receipt(action) => receipt::run(action, json),
    }
}

/// The node running with `home`, through its API (`None`: none runs); a node that refuses
/// this command's API key is an authorization failure (exit 4), not "no node".
pub async fn running_node(home: &Home) -> anyhow::Result<Option<mesh_node::api::client::LocalApi>> {
    mesh_node::api::client::LocalApi::find(home)
        .await
        .map_err(|e| output::failed(output::Exit::Unauthorized, e.to_string()))
}

/// The node running with `home`; none running is a network failure (`Exit::Network`) that says how to
/// start one.
pub async fn require_running_node(home: &Home) -> anyhow::Result<mesh_node::api::client::LocalApi> {
    running_node(home).await?.ok_or_else(|| {
        output::failed(
            output::Exit::Network,
            format!(
                "no node is running with home {}: start one with `mesh join`",
                home.root().display()
            ),
        )
    })
}

pub fn load_identity(home: &Home) -> anyhow::Result<NodeIdentity> {
    NodeIdentity::load_or_create(&home.key_path())
        .with_context(|| format!("loading the node key in {}", home.root().display()))
}

fn id(home: &Home, json: bool) -> anyhow::Result<ExitCode> {
    let identity = load_identity(home)?;
    if json {
        output::json_line(&serde_json::json!({ "peer_id": identity.peer_id().to_string() }))?;
    } else {
        outln!("{}", identity.peer_id());
    }
    Ok(ExitCode::SUCCESS)
}
