//! `mesh-sim`: many real mesh nodes in one process over libp2p's memory transport, with churn,
//! `any` calls and provider lookups; prints a table and one JSON line (`--json`: only the line).
//!
//!   mesh-sim --nodes 500 --churn 0.05 --measure-secs 120

use std::time::Duration;

use clap::Parser;
use mesh_testnet::sim::{self, Lookups, Report, SimConfig};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-sim",
    about = "Simulate a mesh of N real nodes in one process"
)]
struct Args {
    /// Nodes in the mesh
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Models in the catalogue
    #[arg(long, default_value_t = 200)]
    models: usize,
    /// Zipf exponent of the models' popularity
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Most models one node hosts (each hosts 0 to this many)
    #[arg(long, default_value_t = 3)]
    max_models: usize,
    /// Fraction of the nodes that leave (and as many that join) per minute, e.g. 0.05
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Nodes the others bootstrap through; they never leave
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Nodes started at once while the mesh is built
    #[arg(long, default_value_t = 16)]
    start_concurrency: usize,
    /// Seconds after the last node started, before measuring
    #[arg(long, default_value_t = 30)]
    warmup_secs: u64,
    /// Seconds measured
    #[arg(long, default_value_t = 60)]
    measure_secs: u64,
    /// `any` calls per second during the measure
    #[arg(long, default_value_t = 5.0)]
    calls_per_sec: f64,
    /// Provider lookups per second during the measure
    #[arg(long, default_value_t = 2.0)]
    lookups_per_sec: f64,
    /// Skip encryption between the simulated nodes (Noise costs CPU that one machine lacks)
    #[arg(long)]
    plaintext: bool,
    /// The nodes' Kademlia routing refresh, in seconds (default: the node's)
    #[arg(long)]
    routing_refresh_secs: Option<u64>,
    /// The nodes' idle connection timeout, in seconds (default: the node's)
    #[arg(long)]
    idle_secs: Option<u64>,
    /// How often the nodes ping each connection, in seconds (default: the node's)
    #[arg(long)]
    ping_secs: Option<u64>,
    /// Print only the JSON line on stdout (progress still goes to stderr)
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.churn),
        "--churn is a fraction per minute, 0 to 1"
    );
    let defaults = mesh_node::network::NetworkConfig::default();
    let config = SimConfig {
        nodes: args.nodes,
        models: args.models,
        zipf: args.zipf,
        max_models_per_node: args.max_models,
        churn_per_minute: args.churn,
        seeds: args.seeds.clamp(1, args.nodes),
        start_concurrency: args.start_concurrency,
        warmup: Duration::from_secs(args.warmup_secs),
        measure: Duration::from_secs(args.measure_secs),
        calls_per_second: args.calls_per_sec,
        lookups_per_second: args.lookups_per_sec,
        plaintext: args.plaintext,
        routing_refresh: args
            .routing_refresh_secs
            .map_or(defaults.routing_refresh, Duration::from_secs),
        idle_timeout: args
            .idle_secs
            .map_or(defaults.idle_connection_timeout, Duration::from_secs),
        ping_interval: args
            .ping_secs
            .map_or(defaults.ping_interval, Duration::from_secs),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let began = std::time::Instant::now();
    let report = runtime.block_on(sim::run(config, move |line| {
        eprintln!("mesh-sim: {:>6.1} s: {line}", began.elapsed().as_secs_f64());
    }))?;
    if !args.json {
        print_table(&report);
    }
    println!("{}", serde_json::to_string(&report)?);
    // Nodes still stopping must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

fn print_table(r: &Report) {
    let c = &r.config;
    println!(
        "{} nodes ({} seeds), {} models (zipf {}), churn {:.0}%/min, {} s measured, {}",
        c.nodes,
        c.seeds,
        c.models,
        c.zipf,
        c.churn_per_minute * 100.0,
        c.measure.as_secs(),
        if c.plaintext { "plaintext" } else { "noise" }
    );
    println!(
        "started in {:.1} s, {} KiB per node, {} nodes churned; connections per node at the end: mean {:.1}, max {}",
        r.start_secs, r.rss_kib_per_node, r.churned, r.connections_mean, r.connections_max
    );
    println!();
    println!("| lookup | n | found | p50 ms | p99 ms | live providers | stale providers |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, l: &Lookups| {
        println!(
            "| {name} | {} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.2} |",
            l.asked,
            100.0 * l.found as f64 / l.asked.max(1) as f64,
            l.time.p50_ms,
            l.time.p99_ms,
            l.live_per_lookup,
            l.stale_per_lookup
        )
    };
    row("popular model", &r.popular);
    row("rare model", &r.rare);
    println!();
    println!(
        "`any` calls: {} of {} answered ({:.2}%), p50 {:.1} ms, p99 {:.1} ms; {} skipped (no live provider); failures {:?}",
        r.calls_answered,
        r.calls,
        100.0 * r.calls_answered as f64 / r.calls.max(1) as f64,
        r.call_time.p50_ms,
        r.call_time.p99_ms,
        r.calls_without_provider,
        r.call_failures
    );
    println!();
    println!("| per node per minute | |");
    println!("|---|---|");
    for (kind, rate) in &r.per_node_per_minute {
        println!("| {kind} | {rate:.1} |");
    }
    println!(
        "| provider records stored for others | mean {:.1}, max {} |",
        r.records_mean, r.records_max
    );
    println!(
        "| dht requests per provider lookup | {:.1} |",
        r.dht_requests_per_lookup
    );
}
