//! Ollama's model routes, from what the mesh hosts: `GET /api/tags` and `GET /api/ps` (every
//! model this node can see, under its Ollama name `NAME:latest`), `POST /api/show` (one
//! model's card), `GET /api/version`, and `GET /` ("Ollama is running", which tools probe).
//! Managing models (`pull`, `push`, `create`, `copy`, `delete`) is refused with a 501: mesh's
//! models are the ones its nodes host (`mesh join --model`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::Json;
use mesh_protocol::{ModelCard, Task};
use serde_json::{json, Map, Value};

use super::error::{OllamaError, OllamaJson};
use super::lines::{now, rfc3339};
use super::lookup;
use super::options::{model_name, tag_name};
use super::schema::{
    Details, Running, RunningList, ShowRequest, ShowResponse, Tag, TagList, Version,
};
use crate::api::state::ApiState;

/// The Ollama API version whose routes and fields the node speaks (not mesh's version).
pub(crate) const OLLAMA_API_VERSION: &str = "0.9.0";

pub(super) async fn version() -> Json<Version> {
    Json(Version {
        version: OLLAMA_API_VERSION,
    })
}

/// One card per model name (a model hosted twice is listed once), sorted by name.
async fn cards(state: &ApiState) -> Vec<ModelCard> {
    let mut by_name = BTreeMap::new();
    for listing in crate::directory::callable(&state.client, Some(&state.server)).await {
        by_name.entry(listing.model).or_insert(listing.card);
    }
    by_name.into_values().collect()
}

pub(super) async fn tags(State(state): State<ApiState>) -> Json<TagList> {
    let modified_at = now();
    let models = cards(&state)
        .await
        .iter()
        .map(|card| Tag {
            name: tag_name(&card.name),
            model: tag_name(&card.name),
            modified_at: modified_at.clone(),
            size: 0,
            digest: card.sha256.clone(),
            details: details(card),
        })
        .collect();
    Json(TagList { models })
}

/// Every model on the mesh is loaded on the node hosting it, for as long as it runs: `ps`
/// lists them all, expiring far in the future (as Ollama writes `keep_alive: -1`).
pub(super) async fn ps(State(state): State<ApiState>) -> Json<RunningList> {
    let never = rfc3339(SystemTime::now() + Duration::from_secs(100 * 365 * 86_400));
    let models = cards(&state)
        .await
        .iter()
        .map(|card| Running {
            name: tag_name(&card.name),
            model: tag_name(&card.name),
            size: 0,
            digest: card.sha256.clone(),
            details: details(card),
            expires_at: never.clone(),
            size_vram: 0,
            context_length: card.context_length,
        })
        .collect();
    Json(RunningList { models })
}

pub(super) async fn show(
    State(state): State<ApiState>,
    OllamaJson(req): OllamaJson<ShowRequest>,
) -> Result<Json<ShowResponse>, OllamaError> {
    let Some(name) = req.model.or(req.name).filter(|n| !n.is_empty()) else {
        return Err(OllamaError::bad_request("model is required"));
    };
    let cards = lookup_any(&state, model_name(&name)).await?;
    Ok(Json(show_body(&cards[0])))
}

/// The providers' cards of a model of either kind; 404 when no node hosts it.
async fn lookup_any(state: &ApiState, model: &str) -> Result<Vec<ModelCard>, OllamaError> {
    match lookup(state, model, Task::Generate).await {
        Err(e) if e.status().as_u16() == 400 => lookup(state, model, Task::Embed).await,
        other => other,
    }
}

pub(super) async fn refused() -> OllamaError {
    OllamaError::not_implemented(
        "mesh does not manage models through the Ollama API: a node hosts a model with `mesh join --model NAME=SOURCE`",
    )
}

/// Ollama's `details` of a card.
fn details(card: &ModelCard) -> Details {
    Details {
        parent_model: String::new(),
        format: format_of(&card.architecture).into(),
        family: card.architecture.clone(),
        families: vec![card.architecture.clone()],
        parameter_size: parameter_size(card.parameters),
        quantization_level: card.quantization.clone(),
    }
}

/// The weights' format, as far as the architecture tells: BERT models are safetensors,
/// upstream and built-in models have none of their own, the rest are GGUF.
fn format_of(architecture: &str) -> &'static str {
    match architecture {
        "bert" => "safetensors",
        "openai-upstream" => "upstream",
        a if a.starts_with("builtin") => "builtin",
        _ => "gguf",
    }
}

/// Parameters as Ollama writes them: `134.52M`, `7.2B`; empty when unknown.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.1}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.2}K", n / 1e3),
        n if n > 0.0 => format!("{n}"),
        _ => String::new(),
    }
}

fn show_body(card: &ModelCard) -> ShowResponse {
    let arch = &card.architecture;
    let mut info = Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.parameter_count".into(), json!(card.parameters));
    info.insert(format!("{arch}.context_length"), json!(card.context_length));
    if let Some(dims) = card.embedding_dims {
        info.insert(format!("{arch}.embedding_length"), json!(dims));
    }
    info.insert("mesh.sha256".into(), Value::String(card.sha256.clone()));
    info.insert("mesh.max_concurrency".into(), json!(card.max_concurrency));
    ShowResponse {
        modelfile: String::new(),
        parameters: String::new(),
        template: String::new(),
        license: card.license.clone().unwrap_or_default(),
        details: details(card),
        model_info: info,
        capabilities: match card.task {
            Task::Generate => vec!["completion"],
            Task::Embed => vec!["embedding"],
        },
        modified_at: now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_is_shown_with_ollamas_details_and_model_info() {
        let card = ModelCard {
            architecture: "llama".into(),
            parameters: 134_515_008,
            quantization: "Q8_0".into(),
            context_length: 8192,
            license: Some("apache-2.0".into()),
            sha256: "ab12".into(),
            ..crate::test_support::card("smol", Task::Generate)
        };
        let shown = serde_json::to_value(show_body(&card)).unwrap();
        assert_eq!(
            shown["details"],
            json!({ "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                    "parameter_size": "134.52M", "quantization_level": "Q8_0" })
        );
        assert_eq!(shown["model_info"]["llama.context_length"], 8192);
        assert_eq!(
            shown["model_info"]["general.parameter_count"],
            134_515_008u64
        );
        assert_eq!(shown["capabilities"], json!(["completion"]));
        assert_eq!(shown["license"], "apache-2.0");
        let bert = ModelCard {
            architecture: "bert".into(),
            embedding_dims: Some(384),
            ..crate::test_support::card("minilm", Task::Embed)
        };
        let shown = serde_json::to_value(show_body(&bert)).unwrap();
        assert_eq!(shown["capabilities"], json!(["embedding"]));
        assert_eq!(shown["model_info"]["bert.embedding_length"], 384);
        assert_eq!(shown["details"]["format"], "safetensors");
        assert_eq!(shown["details"]["parameter_size"], "");
    }

    #[test]
    fn parameter_sizes_read_as_ollamas() {
        assert_eq!(parameter_size(7_241_732_096), "7.2B");
        assert_eq!(parameter_size(22_700_000), "22.70M");
        assert_eq!(parameter_size(0), "");
        assert_eq!(format_of("builtin-echo"), "builtin");
    }
}
