//! `mesh`: the command-line face of a mesh node. Parsing and printing live here; everything a
//! node does lives in the mesh-node crate.

#[macro_use]
mod output;
mod args;
mod commands;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    // Before any thread starts: the compute pools read their size once (engine::threads).
    let threads = match &cli.command {
        args::Command::Join(join) => join.threads,
        _ => None,
    };
    mesh_node::engine::threads::configure(threads);
    output::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return output::fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) if output::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => output::fail(&e),
    }
}
