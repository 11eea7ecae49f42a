//! `mesh calls`, `mesh capture` and `mesh replay`: the running node's traffic inspector from
//! the command line, as the console shows it.

use std::process::ExitCode;
use std::time::Duration;

use mesh_node::inspector::{CallRecord, Direction};
use mesh_node::Home;

use crate::args::ReplayArgs;
use crate::output::{self, escape_controls, failed, Exit};

/// `mesh calls`: one line per call, newest first.
pub async fn calls(home: Home, json: bool) -> anyhow::Result<ExitCode> {
    let node = super::require_running_node(&home).await?;
    let list = node.calls().await?;
    if json {
        output::json_line(&serde_json::to_value(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let capture = if list.capture { "on" } else { "off" };
    outln!("capture {capture}; {} call(s) kept", list.calls.len());
    for call in &list.calls {
        outln!("{}", escape_controls(&line(call), false));
    }
    Ok(ExitCode::SUCCESS)
}

/// One call as `mesh calls` prints it.
fn line(call: &CallRecord) -> String {
    let (arrow, who) = match call.direction {
        Direction::Out => ("->", call.peer.as_deref().or(call.target.as_deref())),
        Direction::In => ("<-", call.peer.as_deref()),
    };
    let mut text = format!(
        "{:>5} {arrow} {:<20} {:<10} {}",
        call.id,
        call.model,
        format!("{:?}", call.state).to_lowercase(),
        who.unwrap_or("-"),
    );
    if let Some(path) = call.path {
        text.push_str(&format!(" {}", path.as_str()));
    }
    if let Some(total) = call.total_ms {
        text.push_str(&format!(" {total} ms"));
    }
    if let Some(code) = &call.code {
        text.push_str(&format!(" ({code})"));
    }
    if call.capture.is_some() {
        text.push_str(" [captured]");
    }
    text
}

/// `mesh capture [on|off]`.
pub async fn capture(home: Home, state: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let node = super::require_running_node(&home).await?;
    let on = node.capture(state.map(|s| s == "on")).await?;
    if json {
        output::json_line(&serde_json::json!({ "capture": on }))?;
    } else if on {
        outln!("capture on: the next calls' bodies are kept, redacted and capped, for the inspector and replay");
    } else {
        outln!("capture off: calls are kept without their bodies");
    }
    Ok(ExitCode::SUCCESS)
}

/// `mesh replay ID`: the answer streams as `mesh infer`'s does.
pub async fn replay(home: Home, args: &ReplayArgs, json: bool) -> anyhow::Result<ExitCode> {
    if args.timeout == 0 {
        return Err(failed(
            Exit::BadRequest,
            "--timeout must be at least 1 second",
        ));
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let node = super::require_running_node(&home).await?;
    let (id, mut rx) = node
        .replay(args.id, &args.to, args.token.as_deref())
        .await
        .map_err(|e| match e {
            mesh_node::api::client::ApiClientError::Said { status, .. } if status == 404 => {
                failed(Exit::NotFound, e.to_string())
            }
            mesh_node::api::client::ApiClientError::Said { .. } => {
                failed(Exit::BadRequest, e.to_string())
            }
            other => failed(Exit::Network, other.to_string()),
        })?;
    if !json {
        eprintln!("mesh: replaying call {} as call {id}", args.id);
    }
    super::infer::show_events(&mut rx, give_up, args.timeout, json).await
}
