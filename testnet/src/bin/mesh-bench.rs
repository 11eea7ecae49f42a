//! Benchmarks that need real swarms or real models. Prints one JSON object per measurement.
//!
//!   mesh-bench network [--calls N] [--seconds S]   tiny calls: mesh vs HTTP/1.1 keep-alive
//!   mesh-bench generate [--tokens N] [--runs R] [--weights original|q8_0|q4_0] [--prompt-dir D]
//!                       [--cases fresh,repeat,long,deep]
//!                                                  SmolLM2 time to first token and tokens/s:
//!                                                  fresh, repeated, 1,000- and 2,000-token
//!                                                  prompts; writes each prompt to D/CASE.txt
//!   mesh-bench kernels [--threads N] [--millis M]  mesh's quantized matrix kernels alone on
//!                                                  SmolLM2's shapes: µs, GB/s, GMAC/s
//!   mesh-bench hop --bootstrap ADDR --gguf FILE [--steps N]
//!                                                  one hop of a split model: a one-position
//!                                                  step to a stage of layers 29..30, against
//!                                                  the layer here; f32 and f16
//!   mesh-bench embed [--seconds S]                 MiniLM embeddings/s at batch 1, 8, 32
//!   mesh-bench gateway [--runs R] [--seconds S]    OpenAI gateway: overhead and requests/s
//!   mesh-bench hostile --mesh PATH [--seconds S] [--attacks a,b]
//!                                                  a `mesh join` process under each attack
//!                                                  (half-open, sybils, stalled-streams,
//!                                                  liars): honest calls before, during and
//!                                                  after; the node's peak RSS
//!   mesh-bench load --api URL --via gateway|mesh --model M [--calls N] [--deadline-secs S]
//!                                                  N calls at once at a running node's API;
//!                                                  exits 1 if one failed or hung
//!
//! `testnet/bench.sh` builds it in the release profile, as `cargo install` builds mesh, and
//! runs it side by side with the reference implementations.

use std::time::Duration;

use anyhow::Context;
use mesh_testnet::bench::{self, Stats};

fn arg(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a whole number")),
        None => Ok(default),
    }
}

fn text_arg<'a>(args: &'a [String], name: &str) -> anyhow::Result<&'a str> {
    let i = args
        .iter()
        .position(|a| a == name)
        .with_context(|| format!("{name} is required"))?;
    args.get(i + 1)
        .map(String::as_str)
        .with_context(|| format!("{name} needs a value"))
}

fn print(kind: &str, label: &str, stats: &Stats, extra: serde_json::Value) {
    let mut line = serde_json::json!({
        "bench": kind, "case": label, "n": stats.n,
        "p50_us": stats.p50_us, "p99_us": stats.p99_us, "mean_us": stats.mean_us,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    println!("{line}");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("hostile") => {
            let mesh = std::path::PathBuf::from(text_arg(&args, "--mesh")?);
            let seconds = Duration::from_secs(arg(&args, "--seconds", 5)?);
            let attacks: Vec<&str> = match text_arg(&args, "--attacks") {
                Ok(list) => list.split(',').collect(),
                Err(_) => bench::hostile::ATTACKS.to_vec(),
            };
            for line in bench::hostile::run(&mesh, &attacks, seconds).await? {
                println!("{line}");
            }
        }
        Some("network") => {
            let calls = arg(&args, "--calls", 2000)? as usize;
            let seconds = Duration::from_secs(arg(&args, "--seconds", 5)?);
            let net = bench::network::Fixture::start().await?;
            // Interleave the two systems so machine noise hits both alike.
            let mut mesh_rt = Vec::new();
            let mut http_rt = Vec::new();
            for _ in 0..5 {
                mesh_rt.extend(net.mesh_round_trips(calls / 5).await?);
                http_rt.extend(net.http_round_trips(calls / 5).await?);
            }
            print(
                "network",
                "round_trip_mesh",
                &Stats::of(&mesh_rt),
                serde_json::json!({}),
            );
            print(
                "network",
                "round_trip_http",
                &Stats::of(&http_rt),
                serde_json::json!({}),
            );
            for (label, rate) in [
                (
                    "throughput_mesh_64_in_flight",
                    net.mesh_throughput(64, seconds).await?,
                ),
                (
                    "throughput_http_64_in_flight",
                    net.http_throughput(64, seconds).await?,
                ),
            ] {
                println!(
                    "{}",
                    serde_json::json!({"bench": "network", "case": label, "calls_per_s": rate})
                );
            }
            print(
                "network",
                "cold_call_mesh",
                &Stats::of(&net.mesh_cold_calls(50).await?),
                serde_json::json!({}),
            );
            print(
                "network",
                "cold_call_http",
                &Stats::of(&net.http_cold_calls(50).await?),
                serde_json::json!({}),
            );
            net.stop().await;
        }
        Some("generate") => {
            let tokens = arg(&args, "--tokens", 128)? as u32;
            let runs = arg(&args, "--runs", 5)? as usize;
            let format = match text_arg(&args, "--weights") {
                Ok(f) => f.parse().map_err(anyhow::Error::msg)?,
                Err(_) => Default::default(),
            };
            let dir = text_arg(&args, "--prompt-dir")
                .ok()
                .map(std::path::Path::new);
            let only = text_arg(&args, "--cases").ok();
            for line in bench::models::generate(tokens, runs, format, dir, only)? {
                println!("{line}");
            }
        }
        Some("kernels") => {
            let threads = arg(&args, "--threads", 2)? as usize;
            let millis = arg(&args, "--millis", 300)?;
            for line in bench::kernels::run(threads, millis) {
                println!("{line}");
            }
        }
        Some("hop") => {
            // mesh-bench hop --bootstrap ADDR --gguf FILE [--steps N]: ADDR is a stage holding
            // layers 29..30 of the file.
            let addr: libp2p::Multiaddr = text_arg(&args, "--bootstrap")?.parse()?;
            let gguf = std::path::PathBuf::from(text_arg(&args, "--gguf")?);
            let steps = arg(&args, "--steps", 300)? as usize;
            let node = mesh_testnet::inprocess::start_node(vec![], vec![addr.clone()]).await;
            let peer = match addr.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(peer)) => peer,
                _ => anyhow::bail!("--bootstrap needs a /p2p/ suffix"),
            };
            for line in bench::split::hop(&node.client(), peer, &gguf, steps).await? {
                println!("{line}");
            }
            node.shutdown().await;
        }
        Some("gateway") => {
            let runs = arg(&args, "--runs", 10)? as usize;
            let seconds = Duration::from_secs(arg(&args, "--seconds", 5)?);
            for line in bench::gateway::run(runs, 32, seconds).await? {
                println!("{line}");
            }
        }
        Some("embed") => {
            let seconds = Duration::from_secs(arg(&args, "--seconds", 5)?);
            for line in bench::models::embed(seconds)? {
                println!("{line}");
            }
        }
        Some("load") => {
            let api = text_arg(&args, "--api")?;
            let via: bench::load::Via = text_arg(&args, "--via")?
                .parse()
                .map_err(anyhow::Error::msg)?;
            let model = text_arg(&args, "--model")?;
            let calls = arg(&args, "--calls", 1000)? as usize;
            let deadline = Duration::from_secs(arg(&args, "--deadline-secs", 60)?);
            let report = bench::load::run(api, via, model, calls, deadline).await;
            println!("{}", report.to_json(via, model));
            use bench::load::Outcome;
            if report.count(Outcome::Failed) + report.count(Outcome::Hung) > 0 {
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: mesh-bench network|generate|kernels|embed|gateway|load [options] (see the source header)");
            std::process::exit(2);
        }
    }
    Ok(())
}
