//! `mesh receipt verify`: check a call's signed receipt offline.

use std::process::ExitCode;

use mesh_node::auth::receipt;
use mesh_node::network::PeerId;
use mesh_protocol::SignedReceipt;

use crate::args::ReceiptCommand;
use crate::output::{self, failed, Exit};

pub fn run(command: &ReceiptCommand, json: bool) -> anyhow::Result<ExitCode> {
    let ReceiptCommand::Verify { file } = command;
    let text = if file == "-" {
        super::token::read_arg("-")?
    } else {
        let meta = std::fs::metadata(file)
            .map_err(|e| failed(Exit::BadRequest, format!("cannot read {file}: {e}")))?;
        if meta.len() > 16 * 1024 * 1024 {
            return Err(failed(Exit::BadRequest, format!("{file} is too large")));
        }
        std::fs::read_to_string(file)
            .map_err(|e| failed(Exit::BadRequest, format!("cannot read {file}: {e}")))?
    };
    let (receipt_text, called) = find_receipt(&text)?;
    let signed = SignedReceipt::from_text(&receipt_text)
        .map_err(|e| failed(Exit::BadRequest, e.to_string()))?;
    let (r, server) = match receipt::verify(&signed) {
        Ok(v) => v,
        Err(e) => {
            return Err(failed(
                Exit::Failure,
                format!("the receipt does not verify: {e}"),
            ))
        }
    };
    if let Some(called) = called {
        if called != server {
            return Err(failed(
                Exit::Failure,
                format!("the receipt is signed by {server}, but the call went to {called}"),
            ));
        }
    }
    let client = PeerId::from_bytes(&r.client).map(|p| p.to_string()).ok();
    let summary = serde_json::json!({
        "verified": true,
        "server": server.to_string(),
        "client": client,
        "model": r.model,
        "weights_sha256": r.weights_sha256,
        "request_sha256": hex_of(&r.request_sha256),
        "token_id": r.token_id.as_deref().map(hex_of),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "finish_reason": r.finish_reason,
        "received_unix_ms": r.received_unix_ms,
        "queue_ms": r.queue_ms,
        "time_to_first_token_ms": r.time_to_first_token_ms,
        "compute_ms": r.compute_ms,
    });
    if json {
        output::json_line(&summary)?;
    } else {
        outln!("receipt verified: signed by {server}");
        if let Some(map) = summary.as_object() {
            for (k, v) in map
                .iter()
                .filter(|(k, _)| *k != "verified" && *k != "server")
            {
                outln!("  {k}: {}", output::escape_controls(&v.to_string(), false));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The receipt text in `text` (a bare receipt, or JSON lines from `mesh infer --json`, of
/// which the last carrying a receipt counts), and the peer the call went to, if stated.
fn find_receipt(text: &str) -> anyhow::Result<(String, Option<PeerId>)> {
    let trimmed = text.trim();
    if trimmed.starts_with(mesh_protocol::receipt::RECEIPT_TEXT_PREFIX) {
        return Ok((trimmed.to_string(), None));
    }
    for line in trimmed.lines().rev() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(r) = v.get("receipt").and_then(|r| r.as_str()) {
            let peer = v
                .get("peer")
                .and_then(|p| p.as_str())
                .and_then(|p| p.parse().ok());
            return Ok((r.to_string(), peer));
        }
    }
    Err(failed(
        Exit::BadRequest,
        "no receipt found: give a receipt (mrc1.…) or the `done` line of `mesh infer --json`",
    ))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
