//! Ollama's names and `options`, in mesh's terms: `smol` and `smol:latest` are the same model
//! ([`model_name`], [`tag_name`]), and `options` become [`SamplingParams`] with Ollama's
//! defaults where absent ([`sampling`]); `num_ctx` is checked against the model's context
//! length ([`check_num_ctx`]).

use mesh_protocol::infer::MAX_TOKENS_LIMIT;
use mesh_protocol::{ModelCard, SamplingParams};

use super::error::OllamaError;
use super::schema::Options;
use crate::openai_schema::Stop;

/// Ollama's defaults when a request and its model say nothing.
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_K: u32 = 40;
const DEFAULT_TOP_P: f32 = 0.9;

/// The mesh model an Ollama name means: `NAME:latest` is `NAME`; any other tag is part of
/// the name (mesh names may hold `:`).
pub(crate) fn model_name(name: &str) -> &str {
    name.strip_suffix(":latest")
        .filter(|rest| !rest.is_empty())
        .unwrap_or(name)
}

/// The name Ollama lists a mesh model under: with `:latest` unless it has a tag already.
pub(crate) fn tag_name(model: &str) -> String {
    if model.contains(':') {
        model.to_string()
    } else {
        format!("{model}:latest")
    }
}

/// The sampling parameters `options` ask for, checked; Ollama's defaults where absent.
/// `num_predict` -1 (no limit) and -2 (fill the context) are mesh's largest `max_tokens`:
/// the serving node stops at the model's context anyway.
pub(crate) fn sampling(options: Option<&Options>) -> Result<SamplingParams, OllamaError> {
    let o = options.cloned().unwrap_or_default();
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => MAX_TOKENS_LIMIT,
        Some(n) if n >= 1 && n <= MAX_TOKENS_LIMIT as i64 => n as u32,
        Some(n) => {
            return Err(OllamaError::bad_request(format!(
                "num_predict must be -1, -2 or 1 to {MAX_TOKENS_LIMIT}, got {n}"
            )))
        }
    };
    let params = SamplingParams {
        max_tokens,
        temperature: o.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: Some(o.top_p.unwrap_or(DEFAULT_TOP_P)),
        // Ollama (llama.cpp) reads top_k <= 0 as no top-k.
        top_k: match o.top_k {
            None => Some(DEFAULT_TOP_K),
            Some(k) if k <= 0 => None,
            Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        },
        // A negative seed is Ollama's "random".
        seed: o.seed.and_then(|s| u64::try_from(s).ok()),
        stop: o.stop.map(Stop::into_vec).unwrap_or_default(),
    };
    params
        .validate()
        .map_err(|e| OllamaError::bad_request(format!("invalid options: {}", e.message)))?;
    Ok(params)
}

/// Refuses a `num_ctx` larger than the context of a node hosting the model (the smallest the
/// card of any provider states; an upstream's unknown context, 0, is not checked). mesh never
/// shrinks a model's context: `num_ctx` is a check, not a setting.
pub(crate) fn check_num_ctx(num_ctx: i64, cards: &[ModelCard]) -> Result<(), OllamaError> {
    if num_ctx < 1 {
        return Err(OllamaError::bad_request(format!(
            "invalid options: num_ctx must be at least 1, got {num_ctx}"
        )));
    }
    let known = cards
        .iter()
        .map(|c| c.context_length)
        .filter(|&n| n > 0)
        .min();
    match known {
        Some(context) if num_ctx > context as i64 => Err(OllamaError::bad_request(format!(
            "invalid options: num_ctx {num_ctx} is more than the model's context length {context}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::Task;
    use serde_json::json;

    fn options(v: serde_json::Value) -> Options {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn names_with_and_without_latest_are_the_same_model() {
        assert_eq!(model_name("smol"), "smol");
        assert_eq!(model_name("smol:latest"), "smol");
        assert_eq!(model_name("llama3:8b"), "llama3:8b");
        assert_eq!(model_name(":latest"), ":latest");
        assert_eq!(tag_name("smol"), "smol:latest");
        assert_eq!(tag_name("llama3:8b"), "llama3:8b");
        assert_eq!(model_name(&tag_name("smol")), "smol");
    }

    #[test]
    fn options_map_to_sampling_with_ollamas_defaults() {
        let none = sampling(None).unwrap();
        assert_eq!(none.temperature, 0.8);
        assert_eq!((none.top_k, none.top_p), (Some(40), Some(0.9)));
        assert_eq!(
            none.max_tokens, MAX_TOKENS_LIMIT,
            "no limit but the context"
        );
        assert_eq!(none.seed, None);
        let set = sampling(Some(&options(json!({
            "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 42, "num_predict": 12,
            "stop": ["\n", "User:"], "num_gpu": 99, "repeat_penalty": 1.1,
        }))))
        .unwrap();
        assert_eq!(
            set,
            SamplingParams {
                max_tokens: 12,
                temperature: 0.0,
                top_p: Some(0.5),
                top_k: Some(3),
                seed: Some(42),
                stop: vec!["\n".into(), "User:".into()],
            }
        );
        let odd = sampling(Some(&options(
            json!({ "top_k": 0, "seed": -1, "num_predict": -2, "stop": "END" }),
        )))
        .unwrap();
        assert_eq!((odd.top_k, odd.seed), (None, None));
        assert_eq!(odd.max_tokens, MAX_TOKENS_LIMIT);
        assert_eq!(odd.stop, ["END"]);
    }

    #[test]
    fn bad_options_are_a_400_that_names_them() {
        let refused = |v| {
            let e = sampling(Some(&options(v))).unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            e.body().error
        };
        assert!(refused(json!({ "temperature": 5 })).contains("temperature"));
        assert!(refused(json!({ "top_p": 0 })).contains("top_p"));
        assert!(refused(json!({ "num_predict": 0 })).contains("num_predict"));
        assert!(refused(json!({ "num_predict": 100_000 })).contains("num_predict"));
        assert!(refused(json!({ "stop": [""] })).contains("stop"));
        assert!(serde_json::from_value::<Options>(json!({ "temperature": "hot" })).is_err());
    }

    #[test]
    fn num_ctx_is_checked_against_the_smallest_known_context() {
        let card = |ctx| ModelCard {
            context_length: ctx,
            ..crate::test_support::card("m", Task::Generate)
        };
        assert!(check_num_ctx(2048, &[card(8192), card(2048)]).is_ok());
        let e = check_num_ctx(4096, &[card(8192), card(2048)]).unwrap_err();
        assert_eq!(
            e.body().error,
            "invalid options: num_ctx 4096 is more than the model's context length 2048"
        );
        assert!(
            check_num_ctx(1 << 20, &[card(0)]).is_ok(),
            "unknown context"
        );
        assert_eq!(
            check_num_ctx(0, &[card(8)]).unwrap_err().status().as_u16(),
            400
        );
    }
}
