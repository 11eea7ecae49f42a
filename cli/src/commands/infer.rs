//! `mesh infer`: call a model on the mesh and stream the answer to stdout.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use mesh_node::dispatch::{self, CallEvent, FailureClass, InferSpec, Target};
use mesh_node::Home;
use mesh_protocol::SamplingParams;

use crate::args::InferArgs;
use crate::output::{self, failed, Exit};

pub async fn run(home: Home, args: &InferArgs, json: bool) -> anyhow::Result<ExitCode> {
    // --timeout bounds the whole command: joining, finding the node, connecting, the answer.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let ask = build_ask(args)?;

    // Through the node running here (it calls with its own key), else a short-lived node.
    let local = if args.find.bootstrap.is_empty() {
        super::running_node(&home).await?
    } else {
        None
    };
    let mut client_node = None;
    let mut rx = match local {
        Some(node) => node.infer(ask),
        None => {
            let identity = super::load_identity(&home)?;
            let node = super::reach::client_node(&home, identity, &args.find).await?;
            let dispatcher = dispatch::Dispatcher {
                client: node.client(),
                local: None,
                cache: None,
                trust: Default::default(),
                metrics: Default::default(),
            };
            client_node = Some(node);
            dispatcher.dispatch(ask)
        }
    };

    let outcome = show_events(&mut rx, give_up, args.timeout, json).await;
    // Hanging up cancels the call wherever it runs.
    drop(rx);
    if let Some(node) = client_node {
        node.shutdown().await;
    }
    outcome
}

/// Prints a call's events as they come (the answer on stdout, its summary on stderr; JSON
/// lines with `--json`) until `done` or `error`, or `give_up` (`timeout`: what `--timeout`
/// said, for the message).
pub(super) async fn show_events(
    rx: &mut tokio::sync::mpsc::Receiver<CallEvent>,
    give_up: tokio::time::Instant,
    timeout: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut outcome = Ok(ExitCode::SUCCESS);
    loop {
        let event = match tokio::time::timeout_at(give_up, rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(_) => {
                outcome = Err(failed(
                    Exit::DeadlineExceeded,
                    format!("no complete answer within --timeout {} s", timeout),
                ));
                break;
            }
        };
        if json {
            output::json_line(&serde_json::to_value(&event)?)?;
        }
        match event {
            CallEvent::Delta { text } if !json => {
                out!("{}", output::escape_controls(&text, true));
            }
            CallEvent::Embeddings { vectors } if !json => {
                for v in vectors {
                    outln!("{}", serde_json::to_string(&v)?);
                }
            }
            CallEvent::Done {
                peer,
                path,
                usage,
                total_ms,
                time_to_first_byte_ms,
                receipt,
                receipt_verified,
                receipt_error,
                ..
            } => {
                if !json {
                    outln!();
                    eprintln!(
                        "mesh: {} prompt + {} completion tokens from {peer} ({}), first byte {time_to_first_byte_ms} ms, total {total_ms} ms, receipt {}",
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        path.as_str(),
                        if receipt_verified { "verified" } else { "NOT verified" }
                    );
                }
                let why = receipt_error.unwrap_or_default();
                if receipt.is_some() && !receipt_verified {
                    // The node signed something that is not a receipt for this call.
                    outcome = Err(failed(
                        Exit::Failure,
                        format!("the answer came with a receipt that does not verify: {why}"),
                    ));
                } else if !receipt_verified {
                    eprintln!(
                        "mesh: warning: {} (an older node?); the answer is unreceipted",
                        output::escape_controls(&why, false)
                    );
                }
                break;
            }
            CallEvent::Error(failure) => {
                outcome = Err(failed(exit_for(failure.class()), failure.to_string()));
                break;
            }
            _ => {}
        }
    }
    outcome
}

fn exit_for(class: FailureClass) -> Exit {
    match class {
        FailureClass::NotFound => Exit::NotFound,
        FailureClass::Unauthorized => Exit::Unauthorized,
        FailureClass::Overloaded => Exit::Overloaded,
        FailureClass::BadRequest => Exit::BadRequest,
        FailureClass::DeadlineExceeded => Exit::DeadlineExceeded,
        FailureClass::Network => Exit::Network,
        FailureClass::Internal => Exit::Failure,
    }
}

fn build_ask(args: &InferArgs) -> anyhow::Result<InferSpec> {
    let target: Target = args
        .peer
        .parse()
        .map_err(|e: dispatch::BadTarget| failed(Exit::BadRequest, e.to_string()))?;
    mesh_protocol::ids::validate_model_name(&args.model)
        .map_err(|e| failed(Exit::BadRequest, e))?;
    let prompts = if args.prompt.is_empty() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            failed(
                Exit::BadRequest,
                format!("cannot read the prompt from stdin: {e}"),
            )
        })?;
        vec![text.trim_end_matches('\n').to_string()]
    } else {
        args.prompt.clone()
    };
    if prompts.iter().all(|p| p.trim().is_empty()) {
        return Err(failed(Exit::BadRequest, "the prompt is empty"));
    }
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: args.stop.clone(),
    };
    params
        .validate()
        .map_err(|e| failed(Exit::BadRequest, e.message))?;
    if args.timeout == 0 {
        return Err(failed(
            Exit::BadRequest,
            "--timeout must be at least 1 second",
        ));
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    failed(
                        Exit::BadRequest,
                        format!("--token-file {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let token = token
        .map(|t| mesh_protocol::SignedToken::from_text(&t))
        .transpose()
        .map_err(|e| failed(Exit::BadRequest, format!("--token: {e}")))?;
    Ok(InferSpec {
        token,
        target,
        model: args.model.clone(),
        weights: args.sha256.clone(),
        prompts,
        system: args.system.clone(),
        messages: Vec::new(),
        prompt: None,
        expect: None,
        params,
        deadline_ms: args.timeout.saturating_mul(1000),
    })
}
