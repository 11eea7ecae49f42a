//! What an upstream model spec names, parsed without touching the network:
//! `openai+http://HOST:PORT/v1[#REMOTE_MODEL]` (chat and completions) or
//! `openai-embed+http://HOST:PORT/v1[#REMOTE_MODEL]` (embeddings).

use mesh_protocol::Task;

const CHAT_PREFIX: &str = "openai+";
const EMBED_PREFIX: &str = "openai-embed+";

/// A parsed upstream spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// What the model does: `Generate` for `openai+`, `Embed` for `openai-embed+`.
    pub task: Task,
    /// The API's base URL, without a trailing `/` (`http://127.0.0.1:8080/v1`).
    pub base: String,
    /// The upstream's name for the model; `None`: the first it lists.
    pub remote_model: Option<String>,
}

/// Whether `source` names an upstream server.
pub fn is_upstream(source: &str) -> bool {
    source.starts_with(CHAT_PREFIX) || source.starts_with(EMBED_PREFIX)
}

impl UpstreamSpec {
    pub fn parse(source: &str) -> Result<UpstreamSpec, String> {
        let (task, rest) = if let Some(rest) = source.strip_prefix(EMBED_PREFIX) {
            (Task::Embed, rest)
        } else if let Some(rest) = source.strip_prefix(CHAT_PREFIX) {
            (Task::Generate, rest)
        } else {
            return Err("an upstream model starts with openai+ or openai-embed+".into());
        };
        let (base, remote_model) = match rest.split_once('#') {
            Some((base, model)) if !model.is_empty() => (base, Some(model.to_string())),
            Some((base, _)) => (base, None),
            None => (rest, None),
        };
        if !base.starts_with("http://") {
            return Err(format!(
                "{base:?}: only http:// upstreams are supported (the upstream is meant to be local)"
            ));
        }
        Ok(UpstreamSpec {
            task,
            base: base.trim_end_matches('/').to_string(),
            remote_model,
        })
    }

    /// The URL of an endpoint under the base: `url("models")` is `…/v1/models`.
    pub fn url(&self, endpoint: &str) -> String {
        format!("{}/{endpoint}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_and_embedding_specs_parse() {
        assert_eq!(
            UpstreamSpec::parse("openai+http://127.0.0.1:8080/v1#smollm2").unwrap(),
            UpstreamSpec {
                task: Task::Generate,
                base: "http://127.0.0.1:8080/v1".into(),
                remote_model: Some("smollm2".into()),
            }
        );
        let embed = UpstreamSpec::parse("openai-embed+http://lan-box:11434/v1/").unwrap();
        assert_eq!(embed.task, Task::Embed);
        assert_eq!(embed.base, "http://lan-box:11434/v1", "the trailing / goes");
        assert_eq!(embed.remote_model, None);
        assert_eq!(
            embed.url("embeddings"),
            "http://lan-box:11434/v1/embeddings"
        );
        // An empty `#` means no model named: the first listed is used.
        let bare = UpstreamSpec::parse("openai+http://127.0.0.1:8080/v1#").unwrap();
        assert_eq!(bare.remote_model, None);
        // Only the first `#` splits; a model name may hold one.
        let hashed = UpstreamSpec::parse("openai+http://h/v1#org/model#q4").unwrap();
        assert_eq!(hashed.remote_model.as_deref(), Some("org/model#q4"));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = UpstreamSpec::parse("openai+https://example.org/v1").unwrap_err();
        assert!(err.contains("only http://"), "{err}");
        let err = UpstreamSpec::parse("openai+127.0.0.1:8080/v1").unwrap_err();
        assert!(err.contains("only http://"), "{err}");
        let err = UpstreamSpec::parse("ollama+http://127.0.0.1:11434").unwrap_err();
        assert!(
            err.contains("starts with openai+ or openai-embed+"),
            "{err}"
        );
    }

    #[test]
    fn upstream_sources_are_told_from_model_names_and_paths() {
        assert!(is_upstream("openai+http://127.0.0.1:8000/v1"));
        assert!(is_upstream("openai-embed+http://127.0.0.1:8000/v1"));
        assert!(!is_upstream("smollm2-135m-instruct"));
        assert!(!is_upstream("./openai+model.gguf"));
    }
}
