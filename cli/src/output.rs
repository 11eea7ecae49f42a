//! Output: logs to stderr, results to stdout (text, or one JSON object per line), exit codes.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Logs go to stderr; `RUST_LOG` overrides the default of warnings plus mesh's own info lines.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,mesh_node=info,mesh=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Prints one JSON object as a line on stdout.
pub fn json_line(value: &serde_json::Value) {
    println!("{value}");
}

/// Exit code of a command that failed for a reason not covered by a more specific code.
pub const EXIT_FAILURE: u8 = 1;

/// Reports an error as one line on stderr and turns it into the exit code.
pub fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("mesh: error: {err:#}");
    ExitCode::from(EXIT_FAILURE)
}
