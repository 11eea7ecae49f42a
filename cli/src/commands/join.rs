//! `mesh join`: run a node in the foreground until Ctrl-C.

use std::process::ExitCode;

use anyhow::Context;

use mesh_node::api::client::{ApiClientError, LocalApi};
use mesh_node::auth::policy::AccessFlags;
use mesh_node::auth::{Access, AccessConfig};
use mesh_node::engine::{self, SharedEngine};
use mesh_node::home::RuntimeInfo;
use mesh_node::network::{Multiaddr, NetworkEvent, RelayLimits};
use mesh_node::serve::StageModel;
use mesh_node::split::{Mesh, SplitEngine, SplitOptions};
use mesh_node::{Home, Node, NodeConfig};

use crate::args::JoinArgs;
use crate::output::{self, failed, Exit};

pub async fn run(home: Home, args: &JoinArgs, json: bool) -> anyhow::Result<ExitCode> {
    let running = match LocalApi::find(&home).await {
        Ok(Some(running)) => Some(format!("pid {}", running.info().pid)),
        Ok(None) => None,
        Err(e @ (ApiClientError::Impostor { .. } | ApiClientError::Unproven { .. })) => {
            return Err(failed(Exit::Failure, e.to_string()))
        }
        Err(refused) => Some(refused.to_string()),
    };
    if let Some(which) = running {
        return Err(failed(
            Exit::Failure,
            format!(
                "a node ({which}) is already running with home {}; give this one its own --home",
                home.root().display()
            ),
        ));
    }
    let identity = super::load_identity(&home)?;
    let mesh = Mesh::new();
    let Models { engines, stages } = load_models(&home, args, &mesh)?;

    let mut config = NodeConfig::default();
    if !args.listen.is_empty() {
        config.network.listen = args.listen.clone();
    }
    config.network.bootstrap = args.bootstrap.clone();
    config.network.mdns = !args.no_mdns;
    config.network.external = args.external.clone();
    config.network.max_relays = args.max_relays;
    config.network.relay_server = (!args.no_relay).then(|| RelayLimits {
        max_reservations: args.relay_max_reservations,
        max_circuits: args.relay_max_circuits,
        max_circuit_duration: std::time::Duration::from_secs(args.relay_circuit_secs),
        max_circuit_bytes: args.relay_circuit_mib * 1024 * 1024,
        ..RelayLimits::default()
    });
    config.serve.max_queue = args.queue;
    config.serve.share_weights = !args.no_share_weights.iter().any(|m| m == "*");
    config.serve.unshared_models = args
        .no_share_weights
        .iter()
        .filter(|m| *m != "*")
        .cloned()
        .collect();
    config.models_dir = Some(home.models_dir());
    config.serve.share_rate = args.share_rate.map(|mib| mib << 20);
    config.serve.access = access_config(&home, args)?;
    config.api = Some(args.api);
    config.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    config.api_hosts = args.api_host.clone();
    config.trust = provider_trust(args)?;
    if !args.api.ip().is_loopback() && config.api_key.is_some() {
        tracing::warn!(
            api = %args.api,
            "the API is reachable off loopback: anyone with the API key acts as this node's \
             owner (its models, whatever their policy, and its peer id towards others)"
        );
    }

    let node = Node::start_with_stages(identity, engines, stages, config)
        .await
        .map_err(|e| {
            let exit = match e {
                mesh_node::NodeError::Models(_) => Exit::BadRequest,
                mesh_node::NodeError::Api(_) => Exit::Failure,
                _ => Exit::Network,
            };
            failed(exit, e.to_string())
        })?;
    mesh.attach(node.client());
    let peer_id = node.peer_id();
    let listen: Vec<Multiaddr> = node
        .client()
        .listen_addrs()
        .await?
        .into_iter()
        .filter_map(|a| a.with_p2p(peer_id).ok())
        .collect();
    home.write_runtime(&RuntimeInfo {
        peer_id: peer_id.to_string(),
        api: node.api_addr(),
        listen_addrs: listen.iter().map(|a| a.to_string()).collect(),
        pid: std::process::id(),
        api_key: config_key(args),
    })?;
    // The handlers go in before `ready` is printed: whoever reads `ready` may stop us at once.
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    print_ready(&node, &listen, json)?;

    let mut events = node.client().events();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = events.recv() => match event {
                Ok(event) if json => print_event(&event)?,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    home.remove_runtime();
    if json {
        output::json_line(&serde_json::json!({ "event": "stopped" }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The API key the node requires, as `node.json` records it for the local commands.
fn config_key(args: &JoinArgs) -> Option<String> {
    args.api_key.clone().filter(|k| !k.is_empty())
}

/// Who can reach the API, for the banner.
fn api_scope(api: std::net::SocketAddr, key: bool) -> &'static str {
    match (api.ip().is_loopback(), key) {
        (true, false) => "loopback only, no key: any local user or program may use it",
        (true, true) => "loopback only, API key required",
        (false, _) => "REACHABLE FROM OTHER MACHINES, API key required on every route",
    }
}

/// The access policy: `<home>/config.json`, then the flags on top.
fn access_config(home: &Home, args: &JoinArgs) -> anyhow::Result<AccessConfig> {
    let flags = AccessFlags {
        allow: args.allow.clone(),
        allow_file: args.allow_file.clone(),
        require_token: args.require_token,
        trust_issuer: args.trust_issuer.clone(),
        model_policy: args.model_policy.clone(),
    };
    AccessConfig::from_file_and_flags(home.root(), &flags).map_err(|e| failed(Exit::BadRequest, e))
}

/// The providers `any` calls through the API may use: `--trust-provider`, then the file.
fn provider_trust(args: &JoinArgs) -> anyhow::Result<mesh_node::dispatch::ProviderTrust> {
    let mut trust = mesh_node::dispatch::ProviderTrust::default();
    for entry in &args.trust_provider {
        trust
            .add(entry)
            .map_err(|e| failed(Exit::BadRequest, format!("--trust-provider: {e}")))?;
    }
    if let Some(path) = &args.trust_providers_file {
        trust
            .add_file(path)
            .map_err(|e| failed(Exit::BadRequest, format!("--trust-providers-file: {e}")))?;
    }
    Ok(trust)
}

/// What `mesh join` hosts: whole models (and split models' heads), and ranges of layers.
struct Models {
    engines: Vec<SharedEngine>,
    stages: Vec<StageModel>,
}

/// The layers `--layers` gives `model`, if any.
fn layers_for(args: &JoinArgs, model: &str) -> anyhow::Result<Option<std::ops::Range<usize>>> {
    let mut found = None;
    for spec in &args.layers {
        let applies = match &spec.model {
            Some(name) => name == model,
            None if args.models.len() == 1 => true,
            None => {
                return Err(failed(
                    Exit::BadRequest,
                    "with several --model, say which model --layers is for: NAME=A..B",
                ))
            }
        };
        if applies && found.replace(spec.layers.clone()).is_some() {
            return Err(failed(
                Exit::BadRequest,
                format!("--layers names {model} twice"),
            ));
        }
    }
    Ok(found)
}

fn load_models(home: &Home, args: &JoinArgs, mesh: &Mesh) -> anyhow::Result<Models> {
    let options = engine::EngineOptions {
        max_concurrency: args.concurrency,
        weight_format: args.weights,
        prompt_cache: std::sync::Arc::new(engine::prompt_cache::PromptCache::new(
            args.prompt_cache_mib.saturating_mul(1 << 20),
        )),
    };
    for spec in &args.layers {
        if let Some(name) = &spec.model {
            if !args.models.iter().any(|m| &m.name == name) {
                return Err(failed(
                    Exit::BadRequest,
                    format!("--layers names {name}, which no --model hosts"),
                ));
            }
        }
    }
    let token = match &args.split_token {
        Some(text) => Some(
            mesh_protocol::SignedToken::from_text(text.trim())
                .map_err(|e| failed(Exit::BadRequest, format!("--split-token: {e}")))?
                .to_bytes(),
        ),
        None => None,
    };
    let split = SplitOptions {
        allow_relayed: args.split_allow_relayed,
        hidden: args.split_hidden,
        token,
    };
    let mut models = Models {
        engines: Vec::new(),
        stages: Vec::new(),
    };
    for spec in &args.models {
        tracing::info!(model = %spec.name, source = %spec.source, "loading model");
        let bad = |e: engine::LoadError| failed(Exit::BadRequest, e.to_string());
        match layers_for(args, &spec.name)? {
            None => models
                .engines
                .push(engine::load_with(spec, &home.models_dir(), &options).map_err(bad)?),
            Some(layers) => match engine::load_layers(spec, &home.models_dir(), &options, layers)
                .map_err(bad)?
            {
                engine::Layers::Head(head) => {
                    let head = SplitEngine::new(*head, mesh.clone(), split.clone())
                        .map_err(|e| failed(Exit::BadRequest, e))?;
                    models.engines.push(std::sync::Arc::new(head));
                }
                engine::Layers::Stage(card, model, blob) => {
                    let (card, blob) = (*card, Some(blob));
                    models.stages.push(StageModel { card, model, blob });
                }
            },
        }
    }
    Ok(models)
}

fn print_ready(node: &Node, listen: &[Multiaddr], json: bool) -> anyhow::Result<()> {
    let cards = node.cards();
    if json {
        output::json_line(&serde_json::json!({
            "event": "ready",
            "peer_id": node.peer_id().to_string(),
            "listen_addrs": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "models": cards.iter().map(|c| &c.name).collect::<Vec<_>>(),
            "stages": node.server().stage_cards().map(|c| serde_json::json!({
                "model": c.name,
                "layers": c.layers.map(|l| format!("{}..{}", l.start, l.end)),
                "sha256": c.sha256,
            })).collect::<Vec<_>>(),
            "api": node.api_addr().map(|a| format!("http://{a}")),
            "access": node.server().policy(),
        }))?;
        return Ok(());
    }
    outln!("mesh node {} is up", node.peer_id());
    for addr in listen {
        outln!("  listening on {addr}");
    }
    if let Some(api) = node.api_addr() {
        outln!(
            "  API on http://{api} ({})",
            api_scope(api, node.api_key_required())
        );
    }
    // The address another machine is most likely to reach: not loopback, TCP first.
    let share = listen
        .iter()
        .find(|a| !a.to_string().starts_with("/ip4/127.") && a.to_string().contains("/tcp/"))
        .or_else(|| listen.first());
    let stages: Vec<_> = node.server().stage_cards().cloned().collect();
    if cards.is_empty() && stages.is_empty() {
        outln!("  hosting no models (a DHT peer others can join through)");
    }
    for card in &stages {
        if let Some(l) = card.layers {
            outln!(
                "  running layers {}..{} of {} of {} for heads (weights {})",
                l.start,
                l.end,
                l.total,
                card.name,
                card.sha256
            );
        }
    }
    for card in &cards {
        outln!(
            "  hosting {} ({:?}, {}, {})",
            card.name,
            card.task,
            card.architecture,
            card.quantization
        );
        if let Some(addr) = share {
            let policy = node.server().policy();
            let access = policy
                .models
                .get(&card.name)
                .copied()
                .unwrap_or(policy.default);
            let token = if access == Access::Token {
                " --token TOKEN"
            } else {
                ""
            };
            outln!(
                "    call it: mesh infer {} {} --bootstrap {addr}{token} --prompt \"Hello\"",
                node.peer_id(),
                card.name
            );
        }
    }
    print_policy(node)?;
    outln!("Press Ctrl-C to stop.");
    Ok(())
}

fn print_policy(node: &Node) -> anyhow::Result<()> {
    let policy = node.server().policy();
    let describe = |a: Access| match a {
        Access::Open => "open: any peer that can reach this node may call",
        Access::Allow => "allow: only peers on the allow list may call",
        Access::Token => "token: peers on the allow list, or with a valid capability token",
    };
    outln!("  access: {}", describe(policy.default));
    for (model, access) in &policy.models {
        outln!("    {model}: {}", describe(*access));
    }
    if policy.allow > 0 || policy.allow_file.is_some() {
        outln!(
            "    allow list: {} peer(s) from flags/config{}",
            policy.allow,
            policy
                .allow_file
                .as_ref()
                .map(|f| format!(", plus {f} (re-read on change)"))
                .unwrap_or_default()
        );
    }
    for issuer in &policy.trusted_issuers {
        outln!("    also trusting tokens issued by {issuer}");
    }
    let open_models = node
        .cards()
        .iter()
        .filter(|c| {
            policy
                .models
                .get(&c.name)
                .copied()
                .unwrap_or(policy.default)
                == Access::Open
        })
        .count();
    if open_models > 0 {
        outln!(
            "  WARNING: {open_models} model(s) are open to anyone who can reach this node; \
             restrict with --allow, --allow-file or --require-token"
        );
    }
    Ok(())
}

fn print_event(event: &NetworkEvent) -> anyhow::Result<()> {
    let line = match event {
        NetworkEvent::Listening(addr) => {
            serde_json::json!({ "event": "listening", "addr": addr.to_string() })
        }
        NetworkEvent::Connected { peer, path } => {
            serde_json::json!({ "event": "peer_connected", "peer_id": peer.to_string(), "path": path })
        }
        NetworkEvent::Disconnected { peer } => {
            serde_json::json!({ "event": "peer_disconnected", "peer_id": peer.to_string() })
        }
        NetworkEvent::Reserved { relay } => {
            serde_json::json!({ "event": "relay_reserved", "relay": relay.to_string() })
        }
    };
    output::json_line(&line)
}

/// Ctrl-C or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
