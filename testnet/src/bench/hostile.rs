//! The hostile-load benchmark: a real `mesh join` process (the release build) under each attack
//! of docs/security.md's "Hostile peers", with an honest caller's calls measured before, during
//! and after the attack, and the node's peak RSS during it.
//!
//! - `half-open`: TCP sockets from 127.0.0.2 that never begin a handshake, 200 more every second.
//! - `sybils`: 300 throwaway peer ids from 127.0.0.2, each holding a connection.
//! - `stalled-streams`: one peer keeps up to 300 inference streams open that announce a 1 MiB
//!   request and send nothing, opening new ones every second.
//! - `liars`: providers that stall and that deny the model, announcing the node's model with
//!   its weights; the honest caller's calls are `any` calls through a provider cache (as the
//!   gateway makes them), not calls to the node by name.
//!
//! The honest caller is in this process, on 127.0.0.1; its calls are the echo model's one-token
//! answer, one after another.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::{Multiaddr, PeerId};
use mesh_node::call::Calls;
use mesh_node::dispatch::{CallEvent, Dispatcher, InferSpec, ProviderCache};
use mesh_node::{Node, NodeIdentity};
use mesh_protocol::InferResponse;
use tokio_util::sync::CancellationToken;

use super::network::tiny_request;
use super::Stats;
use crate::attack::{self, hostile, Act};
use crate::inprocess::loopback_config;

/// Where the attackers connect from.
const ATTACKER_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// The attacks measured, in order.
pub const ATTACKS: [&str; 4] = ["half-open", "sybils", "stalled-streams", "liars"];

/// A `mesh join` process hosting the echo model on 127.0.0.1.
struct Target {
    child: Child,
    peer: PeerId,
    addr: Multiaddr,
    _home: tempfile::TempDir,
}

impl Target {
    fn start(mesh: &Path) -> anyhow::Result<Target> {
        use std::io::BufRead;
        let home = tempfile::tempdir()?;
        let mut child = Command::new(mesh)
            .args(["join", "--json", "--no-mdns", "--api", "127.0.0.1:0"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--model", "echo=builtin:echo"])
            .arg("--home")
            .arg(home.path().join("h"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", mesh.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().context("no ready line")??;
        std::thread::spawn(move || for _ in lines {});
        let ready: serde_json::Value = serde_json::from_str(&first)?;
        let peer: PeerId = ready["peer_id"].as_str().context("peer_id")?.parse()?;
        let addr: Multiaddr = ready["listen_addrs"][0]
            .as_str()
            .context("a listen address")?
            .parse()?;
        Ok(Target {
            child,
            peer,
            addr,
            _home: home,
        })
    }

    /// Resident memory now, in KiB.
    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    fn port(&self) -> Option<u16> {
        self.addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Honest calls made in one phase.
#[derive(Debug, Default)]
struct Phase {
    answered: usize,
    failed: usize,
    latencies: Vec<Duration>,
}

impl Phase {
    fn json(&self, attack: &str, phase: &str, peak_rss_kib: Option<u64>) -> serde_json::Value {
        let stats = (!self.latencies.is_empty()).then(|| Stats::of(&self.latencies));
        serde_json::json!({
            "bench": "hostile", "attack": attack, "phase": phase,
            "answered": self.answered, "failed": self.failed,
            "p50_us": stats.as_ref().map(|s| s.p50_us),
            "p99_us": stats.as_ref().map(|s| s.p99_us),
            "peak_rss_kib": peak_rss_kib,
        })
    }
}

/// How the honest caller calls: the node by name, or `any` provider of the model (with a
/// provider cache of its own for each phase, as a gateway that has just met the mesh).
enum Caller<'a> {
    Named(&'a Node, PeerId),
    Any(&'a Node),
}

impl Caller<'_> {
    async fn once(&self, any: &Dispatcher) -> bool {
        match self {
            Caller::Named(node, target) => {
                let (client, request) = (node.client(), tiny_request());
                let call = client.call(*target, &request, Duration::from_secs(10));
                let Ok(Ok(mut call)) = tokio::time::timeout(Duration::from_secs(10), call).await
                else {
                    return false;
                };
                loop {
                    match call.next().await {
                        Ok(Some(InferResponse::Done { .. })) | Ok(None) => return true,
                        Ok(Some(_)) => {}
                        Err(_) => return false,
                    }
                }
            }
            Caller::Any(_) => {
                let spec: InferSpec = serde_json::from_value(serde_json::json!({
                    "target": "any", "model": "echo", "prompts": ["ping"], "deadline_ms": 20000,
                    "params": { "max_tokens": 1, "temperature": 0.0 }
                }))
                .expect("a valid spec");
                let mut events = any.dispatch(spec);
                while let Some(event) = events.recv().await {
                    match event {
                        CallEvent::Done { .. } => return true,
                        CallEvent::Error(_) => return false,
                        _ => {}
                    }
                }
                false
            }
        }
    }

    /// Calls one after another for `length`.
    async fn phase(&self, length: Duration) -> Phase {
        let node = match self {
            Caller::Named(node, _) | Caller::Any(node) => node,
        };
        let any = Dispatcher {
            client: node.client(),
            local: None,
            cache: Some(Arc::new(ProviderCache::default())),
            trust: Default::default(),
        };
        let mut phase = Phase::default();
        let end = Instant::now() + length;
        while Instant::now() < end {
            let begun = Instant::now();
            if self.once(&any).await {
                phase.answered += 1;
                phase.latencies.push(begun.elapsed());
            } else {
                phase.failed += 1;
            }
        }
        phase
    }
}

/// Samples the target's RSS every 50 ms until `stop`; the peak.
fn sample_rss(target: &Target, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    let pid = target.child.id();
    tokio::spawn(async move {
        let mut peak = 0;
        loop {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                {
                    peak = peak.max(kib);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = stop.cancelled() => return peak,
            }
        }
    })
}

/// Runs the attack `name` against `target` until `stop`; the task ends with what the attack
/// achieved, for the `during` line.
async fn attack(
    name: &str,
    target: &Target,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<serde_json::Value>> {
    let (addr, peer, port) = (
        target.addr.clone(),
        target.peer,
        target.port().context("a TCP port")?,
    );
    Ok(match name {
        "half-open" => tokio::spawn(async move {
            let mut held = Vec::new();
            while !stop.is_cancelled() {
                let to = ([127, 0, 0, 1], port).into();
                held.extend(attack::half_open(ATTACKER_IP, to, 200).await);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => {}
                }
            }
            serde_json::json!({ "sockets_opened": held.len() })
        }),
        "sybils" => {
            let mut swarms = Vec::new();
            for _ in 0..300 {
                if let Some(s) = attack::sybil(addr.clone(), ATTACKER_IP).await {
                    swarms.push(s);
                }
            }
            let counts = attack::hold_sybils(swarms, &stop);
            tokio::spawn(async move {
                let mut most = 0;
                while !stop.is_cancelled() {
                    most = most.max(counts.connected());
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = stop.cancelled() => {}
                    }
                }
                serde_json::json!({ "sybils": 300, "most_connected": most })
            })
        }
        "stalled-streams" => {
            let attacker = Node::start(
                NodeIdentity::generate(),
                Vec::new(),
                loopback_config(vec![addr.clone()]),
            )
            .await?;
            tokio::spawn(async move {
                let mut held: Vec<libp2p::Stream> = Vec::new();
                let mut opened = 0;
                while !stop.is_cancelled() {
                    let more = attack::stalled_streams(&attacker.client(), peer, 300).await;
                    opened += more.len();
                    held.extend(more);
                    if held.len() > 3000 {
                        held.drain(..held.len() - 3000);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => {}
                    }
                }
                drop(held);
                attacker.shutdown().await;
                serde_json::json!({ "streams_opened": opened })
            })
        }
        "liars" => {
            let echo_sha = mesh_node::engine::builtin::from_spec("echo", "echo", 1)
                .map_err(anyhow::Error::msg)?
                .card()
                .sha256
                .clone();
            let staller = hostile(Act::Stall, "echo", &echo_sha, addr.clone()).await;
            let denier = hostile(Act::Deny, "echo", &echo_sha, addr.clone()).await;
            tokio::spawn(async move {
                stop.cancelled().await;
                let calls = |h: &attack::Hostile| h.calls.load(std::sync::atomic::Ordering::SeqCst);
                serde_json::json!({
                    "calls_to_staller": calls(&staller),
                    "calls_to_denier": calls(&denier),
                })
            })
        }
        other => anyhow::bail!("no attack {other:?}; one of {ATTACKS:?}"),
    })
}

/// Measures `attacks` against a fresh `mesh` node each: honest calls for `length` before,
/// during and after the attack. One JSON object per phase.
pub async fn run(
    mesh: &Path,
    attacks: &[&str],
    length: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for name in attacks {
        let target = Target::start(mesh)?;
        let caller = Node::start(
            NodeIdentity::generate(),
            Vec::new(),
            loopback_config(vec![target.addr.clone()]),
        )
        .await?;
        let how = match *name {
            "liars" => Caller::Any(&caller),
            _ => Caller::Named(&caller, target.peer),
        };
        // Warm up: the connection, the provider cache.
        how.phase(Duration::from_millis(500)).await;
        let before = how.phase(length).await;
        out.push(before.json(name, "before", target.rss_kib()));

        let stop = CancellationToken::new();
        let rss = sample_rss(&target, stop.clone());
        let running = attack(name, &target, stop.clone()).await?;
        if *name == "liars" {
            attack::until_providers(&caller.client(), "echo", 3, Duration::from_secs(20))
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let during = how.phase(length).await;
        stop.cancel();
        let achieved = running.await.unwrap_or_default();
        let peak = rss.await.ok();
        let mut line = during.json(name, "during", peak);
        if let (Some(line), serde_json::Value::Object(more)) = (line.as_object_mut(), achieved) {
            line.extend(more);
        }
        out.push(line);

        // The attackers are gone; give the node a moment to notice, as a user would.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = how.phase(length).await;
        out.push(after.json(name, "after", target.rss_kib()));
        caller.shutdown().await;
    }
    Ok(out)
}
