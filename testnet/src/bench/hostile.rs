//! The hostile-load benchmark: a real `mesh join` process (the release build) under each attack
//! of docs/security.md's "Hostile peers", with an honest caller's calls measured before, during
//! and after the attack, and the node's peak RSS during it.
//!
//! - `half-open`: TCP sockets from 127.0.0.2 that never begin a handshake, 200 more every second.
//! - `sybils`: 300 throwaway peer ids from a network namespace of their own (another IP), in
//!   waves of 30, each holding a connection (needs root).
//! - `stalled-streams`: one peer keeps up to 300 inference streams open that announce a 1 MiB
//!   request and send nothing, opening new ones every second.
//! - `liars`: providers that stall and that deny the model, announcing the node's model with
//!   its weights; the honest caller's calls are `any` calls through a provider cache (as the
//!   gateway makes them, a fresh cache each phase), not calls to the node by name. Its phases
//!   are three times as long, since a staller costs one call its 5 s of patience.
//!
//! The honest caller is in this process, on 127.0.0.1; its calls are the echo model's one-token
//! answer, one after another. Against the connection floods (`half-open`, `sybils`) each call
//! is made by a fresh node that joins through the target first (a new connection is what those
//! attacks deny); against the others, by one node over its connection.

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
pub const ATTACKS: [&str; 5] = [
    "half-open",
    "sybils",
    "stalled-streams",
    "liars",
    "kad-flood",
];

/// A `mesh join` process hosting the echo model on 127.0.0.1.
struct Target {
    child: Child,
    peer: PeerId,
    /// Its address on 127.0.0.1.
    addr: Multiaddr,
    /// Its address facing the attackers' namespace, if any.
    also: Option<Multiaddr>,
    _home: tempfile::TempDir,
}

impl Target {
    /// Listening on 127.0.0.1, and on `also` if given.
    fn start(mesh: &Path, also: Option<std::net::Ipv4Addr>) -> anyhow::Result<Target> {
        use std::io::BufRead;
        let home = tempfile::tempdir()?;
        let mut command = Command::new(mesh);
        command
            .args(["join", "--json", "--no-mdns", "--api", "127.0.0.1:0"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        if let Some(ip) = also {
            command.args(["--listen", &format!("/ip4/{ip}/tcp/0")]);
        }
        let mut child = command
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
        let addrs: Vec<Multiaddr> = ready["listen_addrs"]
            .as_array()
            .context("listen addresses")?
            .iter()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect();
        let on = |ip: std::net::Ipv4Addr| {
            addrs
                .iter()
                .find(|a| a.iter().any(|p| p == libp2p::multiaddr::Protocol::Ip4(ip)))
                .cloned()
        };
        let addr = on(std::net::Ipv4Addr::LOCALHOST).context("a loopback address")?;
        let also = match also {
            Some(ip) => Some(on(ip).context("the namespace-facing address")?),
            None => None,
        };
        Ok(Target {
            child,
            peer,
            addr,
            also,
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
            "max_us": self.latencies.iter().max().map(|d| d.as_micros() as u64),
            "peak_rss_kib": peak_rss_kib,
        })
    }
}

/// How the honest caller calls: the node by name, or `any` provider of the model (with a
/// provider cache of its own for each phase, as a gateway that has just met the mesh).
enum Caller<'a> {
    Named(&'a Node, PeerId),
    Any(&'a Node),
    /// A fresh node for every call, which joins through the target and calls it: what a
    /// connection flood stands in the way of.
    Fresh(&'a Node, Multiaddr, PeerId),
}

impl Caller<'_> {
    async fn once(&self, any: &Dispatcher) -> bool {
        match self {
            Caller::Named(node, target) => {
                let (client, request) = (node.client(), tiny_request());
                let call = client.call(*target, &request, Duration::from_secs(10));
                let mut call = match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(call)) => call,
                    Ok(Err(e)) => {
                        eprintln!("an honest call failed: {e}");
                        return false;
                    }
                    Err(_) => {
                        eprintln!("an honest call got no answer within 10 s");
                        return false;
                    }
                };
                loop {
                    match call.next().await {
                        Ok(Some(InferResponse::Done { .. })) | Ok(None) => return true,
                        Ok(Some(_)) => {}
                        Err(_) => return false,
                    }
                }
            }
            Caller::Fresh(_, addr, target) => {
                let mut config = loopback_config(vec![addr.clone()]);
                // A client, as `mesh infer` starts one: no listener, so its dials take fresh
                // ports (no port reuse, which collides on loopback under a flood of sockets).
                config.network.listen = Vec::new();
                config.network.dht_server = false;
                let joined = tokio::time::timeout(
                    Duration::from_secs(10),
                    Node::start(NodeIdentity::generate(), Vec::new(), config),
                )
                .await;
                let node = match joined {
                    Ok(Ok(node)) => node,
                    Ok(Err(e)) => {
                        eprintln!("a fresh caller could not join: {e}");
                        return false;
                    }
                    Err(_) => {
                        eprintln!("a fresh caller could not join within 10 s");
                        return false;
                    }
                };
                let answered = Box::pin(Caller::Named(&node, *target).once(any)).await;
                node.shutdown().await;
                answered
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
            Caller::Named(node, _) | Caller::Any(node) | Caller::Fresh(node, ..) => node,
        };
        let any = Dispatcher {
            client: node.client(),
            local: None,
            cache: Some(Arc::new(ProviderCache::default())),
            trust: Default::default(),
            metrics: Default::default(),
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
    netns: Option<&attack::Netns>,
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
            // From the namespace: another IP than the honest callers' (see `Netns`).
            let netns = netns.context("the sybils need a network namespace")?;
            let to = target.also.clone().context("no namespace-facing address")?;
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let inside = stop.clone();
            let thread = netns.run(move || async move {
                let counts = attack::sybils_in_waves(&to, 300, 30, &inside).await;
                let _ = ready_tx.send(());
                let mut most = counts.connected();
                while !inside.is_cancelled() {
                    most = most.max(counts.connected());
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        () = inside.cancelled() => {}
                    }
                }
                most
            });
            let _ = ready_rx.await;
            tokio::task::spawn_blocking(move || match thread.join() {
                Ok(Ok(most)) => serde_json::json!({ "sybils": 300, "most_connected": most }),
                Ok(Err(e)) => serde_json::json!({ "sybils_error": e }),
                Err(_) => serde_json::json!({ "sybils_error": "the thread panicked" }),
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
            let slow = Act::Slow(Duration::from_millis(1500));
            let slowpoke = hostile(slow, "echo", &echo_sha, addr.clone()).await;
            tokio::spawn(async move {
                stop.cancelled().await;
                let calls = |h: &attack::Hostile| h.calls.load(std::sync::atomic::Ordering::SeqCst);
                serde_json::json!({
                    "calls_to_staller": calls(&staller),
                    "calls_to_denier": calls(&denier),
                    "calls_to_slow_one": calls(&slowpoke),
                })
            })
        }
        "kad-flood" => tokio::spawn(async move {
            // One fresh peer id after another, each announcing 300 keys with 300 addresses.
            let (mut floods, mut keys) = (0, 0);
            while !stop.is_cancelled() {
                let flood =
                    attack::kad_flood(peer, addr.clone(), 300, 300, 30, Duration::from_secs(60));
                tokio::select! {
                    report = flood => {
                        if let Ok(report) = report {
                            floods += 1;
                            keys += report.keys;
                        }
                    }
                    () = stop.cancelled() => {}
                }
            }
            serde_json::json!({ "floods": floods, "keys_announced": keys })
        }),
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
        let netns = match *name {
            "sybils" => Some(attack::Netns::create().map_err(anyhow::Error::msg)?),
            _ => None,
        };
        let target = Target::start(mesh, netns.as_ref().map(|n| n.host_ip()))?;
        let caller = Node::start(
            NodeIdentity::generate(),
            Vec::new(),
            loopback_config(vec![target.addr.clone()]),
        )
        .await?;
        let how = match *name {
            "liars" => Caller::Any(&caller),
            "half-open" | "sybils" => Caller::Fresh(&caller, target.addr.clone(), target.peer),
            _ => Caller::Named(&caller, target.peer),
        };
        // A liar costs its first-frame patience (5 s) once: the phases are long enough to see
        // what the calls after it cost.
        let length = match *name {
            "liars" => length * 3,
            _ => length,
        };
        // Warm up: the connection, the provider cache.
        how.phase(Duration::from_millis(500)).await;
        let before = how.phase(length).await;
        out.push(before.json(name, "before", target.rss_kib()));

        let stop = CancellationToken::new();
        let rss = sample_rss(&target, stop.clone());
        let running = attack(name, &target, netns.as_ref(), stop.clone()).await?;
        if *name == "liars" {
            attack::until_providers(&caller.client(), "echo", 4, Duration::from_secs(20))
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
