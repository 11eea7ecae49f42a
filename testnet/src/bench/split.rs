//! One hop of a split model alone: the round trip of a one-position step to a stage holding a
//! single layer, against the same layer computed here, so the difference is what a hop costs
//! per token (framing, the stream, the stage's own handling), and the bytes it moves.

use std::time::{Duration, Instant};

use mesh_node::engine::llama::{Hidden, Llama, Parts, WeightFormat};
use mesh_node::split::link::{SessionSpec, StageLink};
use mesh_protocol::{HiddenFormat, LayerRange};

use super::Stats;

/// Measures `steps` one-position steps to `stage` (which holds layers 29..30 of the SmolLM2
/// file at `gguf`), for f32 and f16 hidden states.
pub async fn hop(
    client: &mesh_node::network::Client,
    stage: libp2p::PeerId,
    gguf: &std::path::Path,
    steps: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let sha = mesh_node::models::sha256_file(gguf)?;
    let mut file = std::fs::File::open(gguf)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let layer = Llama::load_parts(
        &content,
        &mut file,
        WeightFormat::default(),
        &Parts {
            layers: 29..30,
            ends: false,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let width = layer.config().width;
    let hidden = Hidden {
        rows: 1,
        data: (0..width).map(|i| ((i as f32) * 0.01).sin()).collect(),
    };
    // The layer here, one position at a time, as the stage runs it.
    let mut cache = layer.new_cache(29..30, steps + 8);
    let mut local = Vec::new();
    for _ in 0..steps {
        let mut h = hidden.clone();
        let t = Instant::now();
        layer
            .forward_layers(&mut cache, &mut h)
            .map_err(anyhow::Error::msg)?;
        local.push(t.elapsed());
    }
    let local = Stats::of(&local);
    // Both formats' sessions open side by side, their steps interleaved, after a warm-up, so
    // the machine's noise falls on both alike.
    let layers = LayerRange {
        start: 29,
        end: 30,
        total: 30,
    };
    let formats = [HiddenFormat::F32, HiddenFormat::F16];
    let mut links = Vec::new();
    for format in formats {
        let spec = SessionSpec {
            model: "smol".into(),
            weights_sha256: sha.clone(),
            max_positions: (steps + 40) as u32,
            format,
            token: None,
        };
        links.push(
            StageLink::open(client, stage, layers, &spec)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); links.len()];
    for i in 0..steps + 30 {
        for (link, times) in links.iter_mut().zip(&mut times) {
            let t = Instant::now();
            link.step(&hidden)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if i >= 30 {
                times.push(t.elapsed());
            }
        }
    }
    let mut lines = Vec::new();
    for ((format, link), times) in formats.into_iter().zip(links).zip(times) {
        link.close().await;
        let hop = Stats::of(&times);
        // The step frame and the output frame: a varint prefix and the CBOR map around the
        // hidden states (measured from the encoding itself).
        let payload = hidden.encode(format).len();
        let step = mesh_protocol::frame::encode_frame(
            &mesh_protocol::StageRequest::Step {
                start: steps as u32,
                rows: 1,
                hidden: vec![0; payload],
            },
            usize::MAX,
        )?;
        let output = mesh_protocol::frame::encode_frame(
            &mesh_protocol::StageResponse::Output {
                hidden: vec![0; payload],
            },
            usize::MAX,
        )?;
        lines.push(serde_json::json!({
            "bench": "hop", "hidden": format!("{format:?}").to_lowercase(), "steps": steps,
            "round_trip_p50_us": hop.p50_us, "round_trip_p99_us": hop.p99_us,
            "layer_here_p50_us": local.p50_us,
            "overhead_per_token_us": hop.p50_us.saturating_sub(local.p50_us),
            "frame_bytes_per_token": step.len() + output.len(),
        }));
    }
    Ok(lines)
}
