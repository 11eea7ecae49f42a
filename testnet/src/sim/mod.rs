//! `mesh-sim`: N mesh nodes in one process, each the real `mesh_node::Node` (its Kademlia,
//! identify, ping, announcements, catalogs, routing and dispatcher), connected over libp2p's
//! in-process memory transport instead of sockets, with Noise (or plaintext, `--plaintext`).
//!
//! - [`population`]: which models each node hosts (a Zipf catalogue).
//! - [`counters`]: what each node sent and received, from its own metrics.
//! - This module: start the mesh, churn it, make `any` calls and provider lookups, and report.
//!
//! Time runs at the wall clock's pace: libp2p's timers (Kademlia's, identify's, the swarm's
//! idle timeouts) are `futures-timer` ones, which a paused tokio clock cannot move.

pub mod counters;
pub mod population;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use mesh_node::dispatch::{CallEvent, Dispatcher, InferSpec, Target};
use mesh_node::engine::builtin;
use mesh_node::engine::SharedEngine;
use mesh_node::{Node, NodeConfig, NodeIdentity};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Mutex;

use population::Population;

/// What to simulate.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    pub nodes: usize,
    /// Models in the catalogue.
    pub models: usize,
    /// The Zipf exponent of their popularity.
    pub zipf: f64,
    /// Most models one node hosts.
    pub max_models_per_node: usize,
    /// Nodes that leave, and as many that join, per minute, as a fraction of `nodes`.
    pub churn_per_minute: f64,
    /// Nodes every other one bootstraps through (they never leave).
    pub seeds: usize,
    /// Nodes started at once while the mesh is built.
    pub start_concurrency: usize,
    /// Time after the last node started, before measuring.
    pub warmup: Duration,
    /// Time measured.
    pub measure: Duration,
    /// `any` calls per second during the measure.
    pub calls_per_second: f64,
    /// Provider lookups per second during the measure.
    pub lookups_per_second: f64,
    /// Skip encryption on the memory transport.
    pub plaintext: bool,
    /// The nodes' Kademlia routing refresh ([`mesh_node::network::NetworkConfig`]'s).
    pub routing_refresh: Duration,
    /// The nodes' idle connection timeout.
    pub idle_timeout: Duration,
    /// How often the nodes ping each connection.
    pub ping_interval: Duration,
}

/// How each simulated node is configured, beyond its models and bootstrap peers.
#[derive(Debug, Clone, Copy)]
struct NodeSettings {
    plaintext: bool,
    routing_refresh: Duration,
    idle_timeout: Duration,
    ping_interval: Duration,
}

impl From<&SimConfig> for NodeSettings {
    fn from(c: &SimConfig) -> Self {
        NodeSettings {
            plaintext: c.plaintext,
            routing_refresh: c.routing_refresh,
            idle_timeout: c.idle_timeout,
            ping_interval: c.ping_interval,
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
        Percentiles {
            n: ms.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
        }
    }
}

/// Provider lookups of one kind of model.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lookups {
    pub time: Percentiles,
    /// Lookups that found a live provider, of those whose model had one.
    pub found: usize,
    pub asked: usize,
    /// Providers returned that had left the mesh, per lookup.
    pub stale_per_lookup: f64,
    /// Live providers found, per lookup.
    pub live_per_lookup: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: SimConfig,
    /// Seconds to start every node.
    pub start_secs: f64,
    /// The process's resident memory after the warm-up, less what it held before the first
    /// node started, per node, in KiB.
    pub rss_kib_per_node: u64,
    pub popular: Lookups,
    pub rare: Lookups,
    /// `any` calls made whose model had a live provider when the call began.
    pub calls: usize,
    pub calls_answered: usize,
    pub call_time: Percentiles,
    /// Calls whose model had no live provider (not counted above).
    pub calls_without_provider: usize,
    /// Why calls failed, with how many.
    pub call_failures: HashMap<String, usize>,
    /// Nodes that left and joined during the measure.
    pub churned: usize,
    /// Per node per minute, over the nodes alive through the whole measure: each of
    /// [`counters::KINDS`], in its order.
    pub per_node_per_minute: Vec<(String, f64)>,
    /// Kademlia requests per provider lookup, over every lookup the nodes finished (calls'
    /// lookups included).
    pub dht_requests_per_lookup: f64,
    /// Provider records each node stores for others: mean and max.
    pub records_mean: f64,
    pub records_max: usize,
    /// Connections each node held when the measure ended: mean and max.
    pub connections_mean: f64,
    pub connections_max: f64,
}

/// A node of the simulation.
struct SimNode {
    node: Node,
    dispatcher: Dispatcher,
    models: Vec<String>,
    seed: bool,
}

/// The mesh as it is now: its nodes by peer id, and the providers of each model.
#[derive(Default)]
struct Mesh {
    nodes: HashMap<PeerId, Arc<SimNode>>,
    providers: HashMap<String, HashSet<PeerId>>,
    gone: HashSet<PeerId>,
}

impl Mesh {
    fn add(&mut self, peer: PeerId, node: Arc<SimNode>) {
        for m in &node.models {
            self.providers.entry(m.clone()).or_default().insert(peer);
        }
        self.nodes.insert(peer, node);
    }

    fn remove(&mut self, peer: &PeerId) -> Option<Arc<SimNode>> {
        let node = self.nodes.remove(peer)?;
        for m in &node.models {
            if let Some(set) = self.providers.get_mut(m) {
                set.remove(peer);
            }
        }
        self.gone.insert(*peer);
        Some(node)
    }

    fn live_providers(&self, model: &str) -> usize {
        self.providers.get(model).map_or(0, HashSet::len)
    }

    fn random_node(&self, rng: &mut impl Rng) -> Option<(PeerId, Arc<SimNode>)> {
        let peers: Vec<&PeerId> = self.nodes.keys().collect();
        let peer = **peers.choose(rng)?;
        Some((peer, self.nodes[&peer].clone()))
    }
}

/// Memory-transport ports, unique in the process.
static NEXT_PORT: AtomicU64 = AtomicU64::new(1);

fn node_config(bootstrap: Vec<Multiaddr>, settings: NodeSettings) -> NodeConfig {
    let port = 10_000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let addr: Multiaddr = format!("/memory/{port}").parse().expect("a memory address");
    let mut config = NodeConfig::default();
    config.network.listen = vec![addr.clone()];
    // Reachable at its memory address, as a public node is at its IP: a DHT server at once.
    config.network.external = vec![addr];
    config.network.bootstrap = bootstrap;
    config.network.mdns = false;
    config.network.relay_server = None;
    config.network.max_relays = 0;
    config.network.memory_plaintext = settings.plaintext;
    config.network.routing_refresh = settings.routing_refresh;
    config.network.idle_connection_timeout = settings.idle_timeout;
    config.network.ping_interval = settings.ping_interval;
    config.api = None;
    config.models_dir = None;
    config
}

fn engines(models: &[String]) -> Vec<SharedEngine> {
    models
        .iter()
        .map(|m| Arc::from(builtin::from_spec(m, "echo", 4).expect("echo builds")))
        .collect()
}

async fn start_one(
    models: Vec<String>,
    bootstrap: Vec<Multiaddr>,
    settings: NodeSettings,
    seed: bool,
) -> anyhow::Result<(PeerId, Arc<SimNode>, Multiaddr)> {
    let config = node_config(bootstrap, settings);
    let addr = config.network.listen[0].clone();
    let node = Node::start(NodeIdentity::generate(), engines(&models), config).await?;
    let peer = node.peer_id();
    let dispatcher = Dispatcher {
        client: node.client(),
        local: Some(node.server().clone()),
        cache: Some(Default::default()),
        trust: Default::default(),
        metrics: Default::default(),
    };
    let addr = addr.with_p2p(peer).expect("no /p2p yet");
    let sim = SimNode {
        node,
        dispatcher,
        models,
        seed,
    };
    Ok((peer, Arc::new(sim), addr))
}

/// Runs the simulation, telling `say` how it goes.
pub async fn run(config: SimConfig, say: impl Fn(String) + Send + Sync) -> anyhow::Result<Report> {
    let population = Population::new(config.models, config.zipf, config.max_models_per_node);
    let mesh = Arc::new(Mutex::new(Mesh::default()));
    let rss_before = rss_kib();
    let started = Instant::now();
    // Seeds first, each joined to the ones before it.
    let mut seeds: Vec<Multiaddr> = Vec::new();
    for _ in 0..config.seeds.max(1) {
        let models = population.draw_for_node(&mut rand::thread_rng());
        let (peer, node, addr) = start_one(models, seeds.clone(), (&config).into(), true).await?;
        mesh.lock().await.add(peer, node);
        seeds.push(addr);
    }
    let seeds = Arc::new(seeds);
    let rest = config.nodes.saturating_sub(config.seeds.max(1));
    let mut joined = 0;
    while joined < rest {
        let batch = config.start_concurrency.max(1).min(rest - joined);
        let starts = (0..batch).map(|_| {
            let models = population.draw_for_node(&mut rand::thread_rng());
            let boot = pick_seeds(&seeds, &mut rand::thread_rng());
            start_one(models, boot, (&config).into(), false)
        });
        for result in futures::future::join_all(starts).await {
            let (peer, node, _) = result?;
            mesh.lock().await.add(peer, node);
        }
        joined += batch;
        if joined % 100 < batch {
            say(format!(
                "{} of {} nodes started",
                joined + seeds.len(),
                config.nodes
            ));
        }
    }
    let start_secs = started.elapsed().as_secs_f64();
    say(format!(
        "{} nodes up in {start_secs:.1} s; warming up for {:?}",
        config.nodes, config.warmup
    ));
    tokio::time::sleep(config.warmup).await;
    // Once the routing tables and connections have settled.
    let rss_kib_per_node = rss_kib().saturating_sub(rss_before) / config.nodes.max(1) as u64;

    // The measure: counters before, then churn, calls and lookups side by side, counters after.
    let before: HashMap<PeerId, Vec<f64>> = {
        let mesh = mesh.lock().await;
        mesh.nodes
            .iter()
            .map(|(p, n)| (*p, counters::kinds(&n.node.metrics_text())))
            .collect()
    };
    say(format!("measuring for {:?}", config.measure));
    let measure_start = Instant::now();
    let deadline = measure_start + config.measure;
    let churn = tokio::spawn(churn_loop(
        mesh.clone(),
        population.clone(),
        seeds.clone(),
        config.clone(),
        deadline,
    ));
    let calls = tokio::spawn(call_loop(
        mesh.clone(),
        population.clone(),
        config.calls_per_second,
        deadline,
    ));
    let lookups = tokio::spawn(lookup_loop(
        mesh.clone(),
        population.clone(),
        config.lookups_per_second,
        deadline,
    ));
    let churned = churn.await?;
    let calls = calls.await?;
    let (popular, rare) = lookups.await?;
    say("reading every node's counters".into());

    // Every node's counters first, at one moment (reading them takes no round trip), and the
    // window ends there; the records come after, from each node's event loop, which on a
    // loaded machine takes minutes at a few hundred nodes and would otherwise lengthen the
    // window of the nodes read last.
    let mesh = mesh.lock().await;
    let texts: Vec<(PeerId, String)> = mesh
        .nodes
        .iter()
        .map(|(peer, node)| (*peer, node.node.metrics_text()))
        .collect();
    let pairs: Vec<_> = texts
        .iter()
        .filter_map(|(peer, text)| Some((before.get(peer)?.clone(), counters::kinds(text))))
        .collect();
    let connected: Vec<f64> = texts
        .iter()
        .map(|(_, text)| counters::open_connections(text))
        .collect();
    let minutes = measure_start.elapsed().as_secs_f64() / 60.0;
    let mut records = Vec::new();
    for node in mesh.nodes.values() {
        if let Ok(status) = node.node.client().status().await {
            records.push(status.dht.remote_records);
        }
    }
    let rates = counters::per_node_per_minute(&pairs, minutes);
    let dht_requests_per_lookup =
        rates[counters::LOOKUP_REQUESTS] / rates[counters::LOOKUPS].max(1e-9);
    let per_node_per_minute = counters::KINDS
        .iter()
        .zip(rates)
        .map(|((name, _), rate)| (name.to_string(), rate))
        .collect();
    let records_mean = records.iter().sum::<usize>() as f64 / records.len().max(1) as f64;
    let report = Report {
        config: config.clone(),
        start_secs,
        rss_kib_per_node,
        popular,
        rare,
        calls: calls.made,
        calls_answered: calls.answered,
        call_time: Percentiles::of(&calls.times),
        calls_without_provider: calls.without_provider,
        call_failures: calls.failures,
        churned,
        per_node_per_minute,
        dht_requests_per_lookup,
        records_mean,
        records_max: records.iter().copied().max().unwrap_or(0),
        connections_mean: connected.iter().sum::<f64>() / connected.len().max(1) as f64,
        connections_max: connected.iter().copied().fold(0.0, f64::max),
    };
    let nodes: Vec<Arc<SimNode>> = mesh.nodes.values().cloned().collect();
    drop(mesh);
    say("shutting the nodes down".into());
    let stops = nodes.into_iter().filter_map(|n| Arc::try_unwrap(n).ok());
    let stops: Vec<_> = stops.map(|n| n.node.shutdown()).collect();
    futures::future::join_all(stops).await;
    Ok(report)
}

/// Two seeds to bootstrap through, at random.
fn pick_seeds(seeds: &[Multiaddr], rng: &mut impl Rng) -> Vec<Multiaddr> {
    seeds
        .choose_multiple(rng, 2.min(seeds.len()))
        .cloned()
        .collect()
}

/// Every `60 / (churn × N)` seconds a node that is not a seed leaves (shut down, as a node
/// that stops) and a fresh one joins. Returns how many left.
async fn churn_loop(
    mesh: Arc<Mutex<Mesh>>,
    population: Population,
    seeds: Arc<Vec<Multiaddr>>,
    config: SimConfig,
    deadline: Instant,
) -> usize {
    let per_minute = config.churn_per_minute * config.nodes as f64;
    if per_minute <= 0.0 {
        tokio::time::sleep_until(deadline.into()).await;
        return 0;
    }
    let every = Duration::from_secs_f64(60.0 / per_minute);
    let mut left = 0;
    let mut next = Instant::now() + every;
    let mut joins = tokio::task::JoinSet::new();
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let leaving = {
            let mut mesh = mesh.lock().await;
            let candidates: Vec<PeerId> = mesh
                .nodes
                .iter()
                .filter(|(_, n)| !n.seed)
                .map(|(p, _)| *p)
                .collect();
            let Some(peer) = candidates.choose(&mut rand::thread_rng()).copied() else {
                continue;
            };
            mesh.remove(&peer)
        };
        if let Some(node) = leaving {
            left += 1;
            tokio::spawn(async move {
                // Calls still holding it finish first; then it stops.
                for _ in 0..100 {
                    if Arc::strong_count(&node) == 1 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Ok(node) = Arc::try_unwrap(node) {
                    node.node.shutdown().await;
                }
            });
        }
        // The newcomer starts beside the loop: on a loaded machine a start takes seconds, and
        // departures keep their pace.
        let models = population.draw_for_node(&mut rand::thread_rng());
        let boot = pick_seeds(&seeds, &mut rand::thread_rng());
        let (mesh, settings) = (mesh.clone(), NodeSettings::from(&config));
        joins.spawn(async move {
            match start_one(models, boot, settings, false).await {
                Ok((peer, node, _)) => mesh.lock().await.add(peer, node),
                Err(e) => tracing::warn!("a joining node failed to start: {e}"),
            }
        });
    }
    // Starts still under way at the deadline finish first (they join the mesh the report
    // stops), within the measure's own length.
    let _ = tokio::time::timeout(config.measure, async {
        while joins.join_next().await.is_some() {}
    })
    .await;
    left
}

#[derive(Default)]
struct Calls {
    made: usize,
    answered: usize,
    without_provider: usize,
    times: Vec<Duration>,
    failures: HashMap<String, usize>,
}

/// `any` calls from random nodes to models drawn by popularity, through each node's own
/// dispatcher (the path the API and the gateway take).
async fn call_loop(
    mesh: Arc<Mutex<Mesh>>,
    population: Population,
    per_second: f64,
    deadline: Instant,
) -> Calls {
    let mut out = Calls::default();
    if per_second <= 0.0 {
        return out;
    }
    let every = Duration::from_secs_f64(1.0 / per_second);
    let mut running = tokio::task::JoinSet::new();
    let mut next = Instant::now();
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let (caller, model, live) = {
            let mesh = mesh.lock().await;
            let mut rng = rand::thread_rng();
            let Some((_, caller)) = mesh.random_node(&mut rng) else {
                continue;
            };
            let model = population.names()[population.pick(&mut rng)].clone();
            let live = mesh.live_providers(&model);
            (caller, model, live)
        };
        if live == 0 {
            out.without_provider += 1;
            continue;
        }
        running.spawn(async move {
            let began = Instant::now();
            let spec = InferSpec {
                target: Target::Any,
                model: model.clone(),
                weights: None,
                prompts: vec!["ping".into()],
                system: None,
                messages: Vec::new(),
                prompt: None,
                expect: None,
                params: Default::default(),
                deadline_ms: 10_000,
                token: None,
            };
            let mut events = caller.dispatcher.dispatch(spec);
            let mut outcome = Err("no answer".to_string());
            while let Some(event) = events.recv().await {
                match event {
                    CallEvent::Done { .. } => outcome = Ok(()),
                    CallEvent::Error(failure) => outcome = Err(failure.code.to_string()),
                    _ => {}
                }
            }
            (outcome, began.elapsed())
        });
    }
    while let Some(result) = running.join_next().await {
        let Ok((outcome, took)) = result else {
            continue;
        };
        out.made += 1;
        match outcome {
            Ok(()) => {
                out.answered += 1;
                out.times.push(took);
            }
            Err(code) => *out.failures.entry(code).or_default() += 1,
        }
    }
    out
}

/// DHT provider lookups from random nodes that do not host the model, alternating between a
/// popular model (the most popular) and a rare one (drawn from the least popular half).
async fn lookup_loop(
    mesh: Arc<Mutex<Mesh>>,
    population: Population,
    per_second: f64,
    deadline: Instant,
) -> (Lookups, Lookups) {
    let mut results: [(Lookups, Vec<Duration>, usize, usize); 2] = Default::default();
    if per_second <= 0.0 {
        return (Lookups::default(), Lookups::default());
    }
    let every = Duration::from_secs_f64(1.0 / per_second);
    let names = population.names().to_vec();
    let mut next = Instant::now();
    let mut turn = 0usize;
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        // Each lookup is awaited: one slower than the pace skips the slots it overran, so
        // the loop ends at the deadline (a loaded machine makes fewer lookups, not a longer
        // window).
        next = (next + every).max(Instant::now());
        let kind = turn % 2;
        turn += 1;
        let (node, model) = {
            let mesh = mesh.lock().await;
            let mut rng = rand::thread_rng();
            let model = if kind == 0 {
                names[0].clone()
            } else {
                // A rare model that someone hosts, else any rare one.
                let rare = &names[names.len() / 2..];
                let hosted: Vec<&String> =
                    rare.iter().filter(|m| mesh.live_providers(m) > 0).collect();
                match hosted.choose(&mut rng) {
                    Some(m) => (*m).clone(),
                    None => continue,
                }
            };
            let askers: Vec<&Arc<SimNode>> = mesh
                .nodes
                .values()
                .filter(|n| !n.models.contains(&model))
                .collect();
            let Some(node) = askers.choose(&mut rng) else {
                continue;
            };
            ((*node).clone(), model)
        };
        let began = Instant::now();
        let found = node.node.client().find_providers(&model).await;
        let took = began.elapsed();
        let mesh = mesh.lock().await;
        let (lookups, times, stale, live) = &mut results[kind];
        lookups.asked += 1;
        times.push(took);
        if let Ok(found) = found {
            let alive = found.iter().filter(|p| mesh.nodes.contains_key(p)).count();
            *stale += found.iter().filter(|p| mesh.gone.contains(p)).count();
            *live += alive;
            if alive > 0 {
                lookups.found += 1;
            }
        }
    }
    let [popular, rare] = results.map(|(mut lookups, times, stale, live)| {
        lookups.time = Percentiles::of(&times);
        let n = lookups.asked.max(1) as f64;
        lookups.stale_per_lookup = stale as f64 / n;
        lookups.live_per_lookup = live as f64 / n;
        lookups
    });
    (popular, rare)
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_nothing_are_zero_and_of_samples_are_taken_in_order() {
        assert_eq!(Percentiles::of(&[]).n, 0);
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.n, p.p50_ms.round(), p.p99_ms.round()), (100, 51.0, 99.0));
    }
}
