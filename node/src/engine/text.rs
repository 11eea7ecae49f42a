//! Text handling around a tokenizer: chat templates, incremental detokenization that never
//! splits a UTF-8 character, and stop sequences that are never half-emitted.

use mesh_protocol::{ChatMessage, Role};
use tokenizers::Tokenizer;

/// A chat template from the model file (Jinja, as Hugging Face models ship them).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

/// Bound on template execution steps, so a hostile template cannot spin forever.
const TEMPLATE_FUEL: u64 = 1_000_000;

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Renders `messages` with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| {
                minijinja::context! {
                    role => match m.role { Role::System => "system", Role::User => "user", Role::Assistant => "assistant" },
                    content => m.content,
                }
            })
            .collect();
        self.env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos,
                    eos_token => self.eos,
                })
            })
            .map_err(|e| format!("cannot apply the model's chat template: {e}"))
    }
}

/// Turns a growing list of token ids into text pieces that are always whole characters.
///
/// Decodes a short window of recent tokens, so each step costs the same however long the
/// output grows. A piece ending in U+FFFD is held back until the next token completes it.
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_start: usize,
    read_start: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        IncrementalDecoder {
            tokens: Vec::new(),
            prefix_start: 0,
            read_start: 0,
        }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<Option<String>, String> {
        self.tokens.push(token);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| format!("cannot decode tokens: {e}"))
        };
        let prefix = decode(&self.tokens[self.prefix_start..self.read_start])?;
        let full = decode(&self.tokens[self.prefix_start..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = match full.get(prefix.len()..) {
                Some(p) if full.starts_with(&prefix) => p.to_string(),
                // The window's decoding shifted (rare with byte-level BPE): emit the difference
                // by characters instead of bytes.
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_start = self.read_start;
            self.read_start = self.tokens.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// What is still held back at the end of generation (an incomplete character).
    pub fn flush(&self, tokenizer: &Tokenizer) -> Result<Option<String>, String> {
        let prefix = tokenizer
            .decode(&self.tokens[self.prefix_start..self.read_start], true)
            .map_err(|e| e.to_string())?;
        let full = tokenizer
            .decode(&self.tokens[self.prefix_start..], true)
            .map_err(|e| e.to_string())?;
        Ok(full
            .get(prefix.len()..)
            .filter(|p| !p.is_empty())
            .map(|p| p.to_string()))
    }
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds back text that could be the start of a stop sequence, and cuts at the first one.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do after feeding a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopStep {
    /// Emit this text (maybe empty) and go on.
    Continue(String),
    /// Emit this text, then stop: a stop sequence was generated.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    pub fn feed(&mut self, piece: &str) -> StopStep {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopStep::Stop(out);
        }
        // Keep the longest tail that is a proper prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|n| s.is_char_boundary(*n))
                    .filter(|n| self.pending.ends_with(&s[..*n]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep::Continue(out)
    }

    /// Text held back when generation ends without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_and_are_never_half_emitted() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.feed("Hello"), StopStep::Continue("Hello".into()));
        assert_eq!(m.feed(" there\nUs"), StopStep::Continue(" there".into()));
        assert_eq!(m.feed("er: more"), StopStep::Stop("".into()));

        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.feed("abcEN"), StopStep::Continue("abc".into()));
        assert_eq!(m.feed("x"), StopStep::Continue("ENx".into()));
        assert_eq!(m.feed("E"), StopStep::Continue("".into()));
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn stop_matching_respects_multibyte_characters() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.feed("café"), StopStep::Continue("caf".into()));
        assert_eq!(m.feed("!"), StopStep::Stop("".into()));
    }

    #[test]
    fn chat_templates_render_with_a_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let text = t
            .render(&[ChatMessage {
                role: Role::User,
                content: " hi ".into(),
            }])
            .unwrap();
        assert_eq!(text, "<user>hi<assistant>");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        assert!(raising.render(&[]).unwrap_err().contains("no system role"));
    }
}
