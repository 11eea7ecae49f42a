//! What a text model's GGUF file says about how to talk to it: its architecture, context,
//! tokenizer, chat template and end-of-turn tokens, read from the metadata in one place.
//! [`inspect`] runs everything a load reads before any weight on bytes in memory, for the
//! fuzz target in `node/fuzz`.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

use super::gguf_header;
use super::text::ChatTemplate;

/// The largest context a file may declare (16 Mi tokens); past it the value is not believed.
pub const MAX_CONTEXT: u64 = 1 << 24;

/// The context assumed when the file declares none.
const DEFAULT_CONTEXT: u32 = 2048;

/// A metadata value as a string.
pub fn meta_str(content: &Content, key: &str) -> Option<String> {
    content.metadata.get(key)?.to_string().ok().cloned()
}

/// A metadata value as a `u32`, whatever integer type the file used; out of range is absent.
pub fn meta_u32(content: &Content, key: &str) -> Option<u32> {
    match content.metadata.get(key)? {
        Value::U8(x) => Some(u32::from(*x)),
        Value::U16(x) => Some(u32::from(*x)),
        Value::U32(x) => Some(*x),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I8(x) => u32::try_from(*x).ok(),
        Value::I16(x) => u32::try_from(*x).ok(),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

/// The context `<arch>.context_length` declares: 2048 when absent, an error naming the key when
/// it is not a whole number from 1 to [`MAX_CONTEXT`]. Every load path reads it here.
pub fn context_length(content: &Content, architecture: &str) -> Result<u32, String> {
    let key = format!("{architecture}.context_length");
    match content.metadata.get(&key) {
        None => Ok(DEFAULT_CONTEXT),
        Some(_) => meta_u32(content, &key)
            .filter(|&c| c > 0 && u64::from(c) <= MAX_CONTEXT)
            .ok_or_else(|| format!("{key} is not a usable context (1 to {MAX_CONTEXT} tokens)")),
    }
}

/// What a text model's file says about how to talk to it.
pub struct TextModel {
    pub architecture: String,
    /// The context the file declares, in tokens.
    pub context_length: u32,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Token ids that end a turn: the file's end-of-sequence and the usual end-of-turn marks.
    pub stop_ids: Vec<u32>,
    pub license: Option<String>,
}

/// SmolLM2's `pre = smollm` is not among candle's presets: its tokenizer splits digits one by
/// one, then applies byte-level BPE without a prefix space.
fn fix_pre_tokenizer(tokenizer: &mut Tokenizer, pre: &str) {
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
    };
    if pre == "smollm" {
        let seq = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
    }
}

impl TextModel {
    /// Reads the architecture, context, tokenizer, chat template and stop tokens.
    pub fn from_gguf(content: &Content) -> Result<TextModel, String> {
        let architecture = meta_str(content, "general.architecture")
            .ok_or("the GGUF file names no general.architecture")?;
        let context_length = context_length(content, &architecture)?;
        let mut tokenizer = Tokenizer::from_gguf(content)
            .map_err(|e| format!("cannot build the tokenizer from the GGUF metadata: {e}"))?;
        fix_pre_tokenizer(
            &mut tokenizer,
            &meta_str(content, "tokenizer.ggml.pre").unwrap_or_default(),
        );
        let token_text = |key: &str| {
            meta_u32(content, key)
                .and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let (bos, eos) = (
            token_text("tokenizer.ggml.bos_token_id"),
            token_text("tokenizer.ggml.eos_token_id"),
        );
        let template = meta_str(content, "tokenizer.chat_template")
            .map(|t| ChatTemplate::new(&t, &bos, &eos))
            .transpose()?;
        let mut stop_ids: Vec<u32> = meta_u32(content, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .chain(
                ["<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>"]
                    .iter()
                    .filter_map(|t| tokenizer.token_to_id(t)),
            )
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(TextModel {
            architecture,
            context_length,
            tokenizer,
            template,
            stop_ids,
            license: meta_str(content, "general.license"),
        })
    }
}

/// What [`inspect`] found in a file's bytes.
#[derive(Debug)]
pub struct Inspection {
    pub tensors: usize,
    pub parameters: u64,
    /// Every tensor lies inside the bytes given.
    pub tensors_fit: Result<(), String>,
    /// The text model's metadata, summed up as its architecture and vocabulary size.
    pub text_model: Result<(String, usize), String>,
    /// mesh's own forward pass's shape, for llama files: the layer count.
    pub llama: Result<usize, String>,
}

/// Everything a load reads before any tensor data, run on a file's bytes: the header, the
/// tensor extents, the text model's metadata and, for llama files, the forward pass's shape.
/// Each part runs whatever the others found, so a fuzzer reaches all of them.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, String> {
    let content = gguf_header::read(&mut std::io::Cursor::new(bytes))?;
    let text_model =
        TextModel::from_gguf(&content).map(|m| (m.architecture, m.tokenizer.get_vocab_size(true)));
    Ok(Inspection {
        tensors: content.tensor_infos.len(),
        parameters: gguf_header::parameters(&content),
        tensors_fit: gguf_header::check_tensors(&content, bytes.len() as u64),
        text_model,
        llama: super::llama::LlamaConfig::from_gguf(&content).map(|c| c.layers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gguf_header::test_files::{file, tokenizer_metadata};

    #[test]
    fn a_whole_file_reads_and_its_tensors_fit() {
        let bytes = file(&tokenizer_metadata(), &[4, 8], 4 * 8 * 4);
        let seen = inspect(&bytes).unwrap();
        assert_eq!((seen.tensors, seen.parameters), (1, 32));
        assert_eq!(seen.tensors_fit, Ok(()));
        assert_eq!(seen.text_model.unwrap().0, "llama");
        let content = gguf_header::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        let model = TextModel::from_gguf(&content).unwrap();
        assert_eq!(model.stop_ids, vec![3]);
        assert_eq!(model.context_length, DEFAULT_CONTEXT);
        assert_eq!(model.tokenizer.get_vocab_size(true), 4);
    }

    #[test]
    fn an_impossible_context_is_refused_with_its_key() {
        for bad in [
            Value::U64(1 << 40),
            Value::I32(-5),
            Value::U32(0),
            Value::String("x".into()),
        ] {
            let mut metadata = tokenizer_metadata();
            metadata.push(("llama.context_length", bad));
            let bytes = file(&metadata, &[4], 16);
            let content = gguf_header::read(&mut std::io::Cursor::new(&bytes)).unwrap();
            let err = TextModel::from_gguf(&content).err().unwrap();
            assert!(err.contains("llama.context_length"), "{err}");
        }
    }

    #[test]
    fn a_tokenizer_that_is_not_there_is_named() {
        let metadata = vec![("general.architecture", Value::String("llama".into()))];
        let bytes = file(&metadata, &[4], 16);
        let err = inspect(&bytes).unwrap().text_model.unwrap_err();
        assert!(err.contains("tokenizer"), "{err}");
    }

    #[test]
    fn u32_values_out_of_range_are_absent_not_wrapped() {
        let metadata = vec![
            ("a", Value::U64(u64::from(u32::MAX) + 1)),
            ("b", Value::I32(-1)),
            ("c", Value::U16(7)),
        ];
        let bytes = file(&metadata, &[4], 16);
        let content = gguf_header::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(meta_u32(&content, "a"), None);
        assert_eq!(meta_u32(&content, "b"), None);
        assert_eq!(meta_u32(&content, "c"), Some(7));
    }
}
