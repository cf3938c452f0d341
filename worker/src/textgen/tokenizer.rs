//! Gemma's tokenizer (tokenizer.json made from the GGUF by fetch-gemma), its chat
//! template, and incremental detokenization for streaming.

use std::path::Path;

use tokenizers::Tokenizer;

/// Tokens that end a generation besides `max_tokens` and `stop`.
const STOP_TOKENS: &[&str] = &["<eos>", "<end_of_turn>"];

pub struct GemmaTokenizer {
    inner: Tokenizer,
    stop_ids: Vec<u32>,
}

/// One chat message (`role`: system, user or assistant).
#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl GemmaTokenizer {
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path).map_err(|e| {
            format!(
                "failed to load {} (worker/scripts/fetch-gemma writes it): {e}",
                path.display()
            )
        })?;
        let stop_ids = STOP_TOKENS
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        Ok(GemmaTokenizer { inner, stop_ids })
    }

    /// Token ids of a prompt, with the leading `<bos>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Gemma's chat template: a system message joins the first user turn; the prompt
    /// ends by opening the model's turn. `<bos>` comes from [`Self::encode`].
    pub fn chat_prompt(messages: &[ChatMessage]) -> String {
        let mut out = String::new();
        let mut system: Option<&str> = None;
        for m in messages {
            match m.role.as_str() {
                "system" | "developer" => system = Some(&m.content),
                role => {
                    let role = if role == "assistant" { "model" } else { "user" };
                    out.push_str("<start_of_turn>");
                    out.push_str(role);
                    out.push('\n');
                    if role == "user"
                        && let Some(s) = system.take()
                    {
                        out.push_str(s);
                        out.push_str("\n\n");
                    }
                    out.push_str(m.content.trim());
                    out.push_str("<end_of_turn>\n");
                }
            }
        }
        out.push_str("<start_of_turn>model\n");
        out
    }
}

/// Turns a growing list of generated ids into text deltas: the whole generation is
/// decoded each time (Gemma's decoder joins pieces, so a suffix decoded alone can lose
/// its leading space); text ending in an incomplete UTF-8 sequence, or in what may be
/// the start of a stop string, waits for the next token.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    emitted: usize,
    stops: Vec<String>,
    /// The text generated so far (cut before a stop string once one is found).
    pub text: String,
}

/// What one more token gave.
#[derive(Debug, PartialEq, Eq)]
pub struct Delta {
    pub text: String,
    /// A stop string appeared: the generation ends here (the stop string is not sent).
    pub stopped: bool,
}

impl Detokenizer {
    pub fn new(stops: Vec<String>) -> Self {
        Detokenizer {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &GemmaTokenizer, id: u32) -> Delta {
        self.ids.push(id);
        self.text = tok.decode(&self.ids);
        self.advance()
    }

    fn advance(&mut self) -> Delta {
        // A stop string may start in text already emitted only if it was held back, so
        // search from the first byte not yet sent.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[self.emitted..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let end = self.emitted + at;
            let text = self.text[self.emitted..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            return Delta {
                text,
                stopped: true,
            };
        }
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end = self.emitted;
        }
        // Hold back the longest tail that a stop string starts with.
        let hold = self
            .stops
            .iter()
            .filter_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(k, _)| k)
                    .filter(|&k| self.text[..end].ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let end = end.saturating_sub(hold).max(self.emitted);
        let text = self.text[self.emitted..end].to_string();
        self.emitted = end;
        Delta {
            text,
            stopped: false,
        }
    }

    /// The text held back at the end (a partial stop string that never completed).
    pub fn finish(&mut self) -> String {
        let rest = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut d = Detokenizer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            d.text.push_str(p);
            let delta = d.advance();
            out.push(delta.text);
            if delta.stopped {
                stopped = true;
                break;
            }
        }
        let rest = if stopped { String::new() } else { d.finish() };
        (out, stopped, rest)
    }

    #[test]
    fn stop_strings_cut_the_text_and_partial_matches_wait() {
        let (out, stopped, _) = feed(&["\n\n"], &["Paris", ".", "\n", "\nThe"]);
        assert_eq!(out, vec!["Paris", ".", "", ""]);
        assert!(stopped);
        let (out, stopped, rest) = feed(&["END"], &["a", "E", "N", "x"]);
        assert_eq!(out, vec!["a", "", "", "ENx"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        let (out, stopped, _) = feed(&["lo"], &["hel", "lo world"]);
        assert_eq!(out, vec!["he", "l"]);
        assert!(stopped);
    }

    #[test]
    fn chat_template_is_gemmas() {
        let m = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let p = GemmaTokenizer::chat_prompt(&[
            m("system", "Be brief."),
            m("user", "Hi"),
            m("assistant", "Hello"),
            m("user", "Capital of France?"),
        ]);
        assert_eq!(
            p,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n\
             <start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
