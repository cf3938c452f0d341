//! The model's tokenizer, with the shipped padding and truncation overridden.
//!
//! The packaged tokenizer.json bakes fixed padding to 128 and truncation at 128; the
//! reference (sentence-transformers) pads to the longest input and truncates at the
//! model's `max_seq_length` (256). We tokenize each input alone, unpadded; the batcher
//! pads each batch to its longest row.

use std::path::Path;

use tokenizers::Tokenizer;

use super::EngineError;

/// What to do with an input longer than the model's maximum sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongInput {
    Truncate,
    Refuse,
}

/// One tokenized input.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Tokens before truncation (including special tokens).
    pub full_len: usize,
}

#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; the maximum length comes from `sentence_bert_config.json`
    /// (`max_seq_length`), else `config.json` (`max_position_embeddings`), else 512.
    pub fn load(model_dir: &Path) -> Result<Self, EngineError> {
        let path = model_dir.join("tokenizer.json");
        let mut inner = Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let max_len = read_json_usize(
            &model_dir.join("sentence_bert_config.json"),
            "max_seq_length",
        )
        .or_else(|| read_json_usize(&model_dir.join("config.json"), "max_position_embeddings"))
        .unwrap_or(512);
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(TextTokenizer {
            inner,
            max_len,
            pad_id,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes one input with special tokens; truncates to the maximum length keeping
    /// the final `[SEP]`, as the reference tokenizer does.
    pub fn encode(&self, text: &str) -> Result<Encoded, EngineError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        let full_len = ids.len();
        if ids.len() > self.max_len {
            let last = *ids.last().expect("non-empty: longer than max_len");
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok(Encoded { ids, full_len })
    }
}

fn read_json_usize(path: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get(key)?.as_u64().map(|v| v as usize)
}
