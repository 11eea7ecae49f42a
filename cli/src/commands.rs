//! One function per subcommand.

use std::process::ExitCode;

use anyhow::Context;
use mesh_node::{Home, NodeIdentity};

use crate::args::{Cli, Command};
use crate::output;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Id => id(&cli).map(|()| ExitCode::SUCCESS),
        Command::Join | Command::Infer | Command::Models | Command::Peers | Command::Token => {
            anyhow::bail!("`{}` is not implemented yet", command_name(&cli.command))
        }
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Join => "mesh join",
        Command::Infer => "mesh infer",
        Command::Models => "mesh models",
        Command::Peers => "mesh peers",
        Command::Id => "mesh id",
        Command::Token => "mesh token",
    }
}

fn open_identity(cli: &Cli) -> anyhow::Result<(Home, NodeIdentity)> {
    let home = Home::open(Home::resolve(cli.home.as_deref())?)?;
    let identity = NodeIdentity::load_or_create(&home.key_path())
        .with_context(|| format!("loading the node key in {}", home.root().display()))?;
    Ok((home, identity))
}

fn id(cli: &Cli) -> anyhow::Result<()> {
    let (_, identity) = open_identity(cli)?;
    if cli.json {
        output::json_line(&serde_json::json!({ "peer_id": identity.peer_id().to_string() }));
    } else {
        println!("{}", identity.peer_id());
    }
    Ok(())
}
