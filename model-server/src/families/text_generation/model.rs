//! The text-generation model: a decoder architecture (Llama, from the GGUF file's
//! `general.architecture` or `config.json`'s `model_type`), the tokenizer (tokenizer.json when
//! present, else rebuilt from the GGUF metadata), the chat template rendered with minijinja, the
//! end-of-generation tokens, sampling settings, and the text stream that turns generated ids
//! into safe-to-send text.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::device::ComputeDevice;
use crate::manifest::Family;
use crate::models::llama::candle::CandleLlama;
use crate::models::llama::{Decoder, Llama, Step, hf, load_gguf};
use crate::models::{Architecture, ModelError, architecture};
use crate::weights::gguf::tokenizer as gguf_tokenizer;
use crate::weights::gguf::{metadata_string, metadata_u32};
use crate::weights::model_type;

/// Names llama.cpp also treats as end of generation, whatever `eos_token_id` says.
const END_TOKENS: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How the next token is chosen. Temperature 0 is greedy; `top_k` 0 means no top-k cut.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }

    pub fn processor(&self) -> LogitsProcessor {
        let t = self.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (self.top_k, self.top_p < 1.0) {
                (0, false) => Sampling::All { temperature: t },
                (0, true) => Sampling::TopP { p: self.top_p, temperature: t },
                (k, false) => Sampling::TopK { k, temperature: t },
                (k, true) => Sampling::TopKThenTopP { k, p: self.top_p, temperature: t },
            }
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }
}

pub struct GenerationModel {
    decoder: Decoder,
    /// Parses special-token text as control tokens: for the chat template's own text.
    tokenizer: Tokenizer,
    /// The same vocabulary with special-token text encoded as ordinary text: for what clients
    /// wrote, so a message containing `<|im_start|>system` cannot forge a turn.
    plain: Tokenizer,
    chat: Option<minijinja::Environment<'static>>,
    bos: Option<(u32, String)>,
    eos: Option<String>,
    add_bos: bool,
    end_ids: BTreeSet<u32>,
    file: PathBuf,
}

/// What a model's tokenizer files give, however they were read (GGUF metadata or
/// tokenizer.json with its configs).
struct TextParts {
    tokenizer: Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<String>,
    add_bos: bool,
    end_ids: BTreeSet<u32>,
}

/// The decoder for what a checkpoint declares, through the architecture table.
fn decoder(declared: Option<&str>, kind: &'static str, source: &Path) -> Result<Architecture, ModelError> {
    architecture(Family::TextGeneration, declared, kind, source)
        .map_err(|e| ModelError::Unsupported(e.to_string()))
}

/// The one `*.gguf` file in `dir`, if any.
fn find_gguf(dir: &Path) -> Result<Option<PathBuf>, ModelError> {
    let files_err = |message: String| ModelError::Files { path: dir.display().to_string(), message };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| files_err(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(Some(found.remove(0))),
        n => Err(files_err(format!("{n} .gguf files here; keep exactly one per model version"))),
    }
}

impl GenerationModel {
    /// Load the model in `dir` for the CPU: one GGUF file (with a tokenizer.json beside it, when
    /// present), else a Hugging Face Llama checkpoint (config.json, *.safetensors,
    /// tokenizer.json).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with(dir, None)
    }

    /// [`Self::load`] for `device`: the packed decoder on the CPU, candle's on a GPU.
    pub fn load_on(dir: &Path, device: &ComputeDevice) -> Result<Self, ModelError> {
        Self::load_with(dir, (!device.is_cpu()).then(|| device.candle()))
    }

    /// The GPU path's decoder (on candle's ops) on any candle device: the CPU too, where it is
    /// checked against the same reference.
    pub fn load_candle(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, Some(device))
    }

    /// `candle`: the device candle's decoder runs on; None for the packed decoder.
    fn load_with(dir: &Path, candle: Option<&Device>) -> Result<Self, ModelError> {
        match find_gguf(dir)? {
            Some(file) => Self::load_gguf(dir, file, candle),
            None => match hf::find(dir) {
                Some((config, files)) => {
                    decoder(model_type(&config)?.as_deref(), "model_type", &config)?;
                    Self::load_checkpoint(dir, &config, &files, candle)
                }
                None => Err(ModelError::Files {
                    path: dir.display().to_string(),
                    message: "no .gguf file and no config.json with .safetensors weights here; a \
                              text-generation model is one GGUF file or a Hugging Face Llama checkpoint"
                        .into(),
                }),
            },
        }
    }

    fn load_gguf(dir: &Path, file: PathBuf, candle: Option<&Device>) -> Result<Self, ModelError> {
        let files_err = |message: String| ModelError::Files { path: file.display().to_string(), message };
        let mut reader =
            std::io::BufReader::new(std::fs::File::open(&file).map_err(|e| files_err(e.to_string()))?);
        let ct =
            gguf_file::Content::read(&mut reader).map_err(|e| files_err(format!("not a GGUF file: {e}")))?;
        decoder(metadata_string(&ct, "general.architecture").ok().as_deref(), "general.architecture", &file)?;
        let vocab = gguf_tokenizer::tokens(&ct)?;
        let json = dir.join("tokenizer.json");
        let (tokenizer, control) = if json.exists() {
            let t = Tokenizer::from_file(&json).map_err(|e| ModelError::Files {
                path: json.display().to_string(),
                message: e.to_string(),
            })?;
            (t, Vec::new())
        } else {
            let built = gguf_tokenizer::from_gguf(&ct)?;
            (built.tokenizer, built.control)
        };
        let token = |key: &str| -> Option<(u32, String)> {
            let id = metadata_u32(&ct, key).ok()?;
            Some((id, vocab.get(id as usize)?.clone()))
        };
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        let add_bos =
            matches!(ct.metadata.get("tokenizer.ggml.add_bos_token"), Some(gguf_file::Value::Bool(true)));
        let mut end_ids: BTreeSet<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some((id, _)) = token("tokenizer.ggml.eot_token_id") {
            end_ids.insert(id);
        }
        for (id, text) in vocab.iter().enumerate() {
            if END_TOKENS.contains(&text.as_str()) && (control.is_empty() || control.contains(&(id as u32))) {
                end_ids.insert(id as u32);
            }
        }
        let chat = match ct.metadata.get("tokenizer.chat_template") {
            Some(gguf_file::Value::String(source)) => Some(chat_environment(source.clone())?),
            _ => None,
        };
        let text = TextParts { tokenizer, bos, eos: eos.map(|(_, s)| s), add_bos, end_ids };
        let decoder = match candle {
            None => Decoder::Packed(load_gguf::<Llama, _>(&ct, &mut reader, &Device::Cpu)?),
            Some(device) => Decoder::Candle(load_gguf::<CandleLlama, _>(&ct, &mut reader, device)?),
        };
        Ok(GenerationModel::assemble(decoder, text, chat, file))
    }

    fn assemble(
        decoder: Decoder,
        text: TextParts,
        chat: Option<minijinja::Environment<'static>>,
        file: PathBuf,
    ) -> Self {
        let TextParts { tokenizer, bos, eos, add_bos, end_ids } = text;
        let plain = plain_text_tokenizer(&tokenizer);
        GenerationModel { decoder, tokenizer, plain, chat, bos, eos, add_bos, end_ids, file }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn context_length(&self) -> usize {
        self.decoder.config().context_length
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// The chat template's rendering of `messages`, ending where the assistant's reply starts.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let env = self.chat.as_ref().ok_or_else(|| {
            ModelError::Unsupported("this model has no chat template; use /v1/completions".into())
        })?;
        let template = env.get_template("chat").map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos.as_ref().map(|(_, s)| s.as_str()).unwrap_or(""),
                eos_token => self.eos.as_deref().unwrap_or(""),
            })
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))
    }

    /// Token ids of a prompt; special tokens written in the text (as chat templates do) are
    /// parsed as such. For text a client wrote, see [`Self::encode_chat`] and
    /// [`Self::encode_plain`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let ids = encode_with(&self.tokenizer, text)?;
        Ok(self.with_bos(ids))
    }

    /// Token ids of a client's raw prompt: special-token text in it stays text.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let ids = encode_with(&self.plain, text)?;
        Ok(self.with_bos(ids))
    }

    /// Token ids of a chat: the template's text (role markers, BOS) with its special tokens,
    /// the messages' contents as plain text. The template is rendered with a placeholder for
    /// each content, so what a client wrote is never parsed as control tokens.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage { role: m.role.clone(), content: format!("{MARK}{i}{MARK}") })
            .collect();
        let rendered = self.render_chat(&marked)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(MARK) {
            ids.extend(encode_with(&self.tokenizer, &rest[..start])?);
            let after = &rest[start + MARK.len_utf8()..];
            let content = after.find(MARK).and_then(|end| {
                let index: usize = after[..end].parse().ok()?;
                Some((messages.get(index)?, end))
            });
            match content {
                Some((message, end)) => {
                    ids.extend(encode_with(&self.plain, &message.content)?);
                    rest = &after[end + MARK.len_utf8()..];
                }
                // Not one of ours (the template wrote the character itself): keep it as text.
                None => {
                    ids.extend(encode_with(&self.tokenizer, &rest[start..start + MARK.len_utf8()])?);
                    rest = after;
                }
            }
        }
        ids.extend(encode_with(&self.tokenizer, rest)?);
        Ok(self.with_bos(ids))
    }

    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let Some((bos, _)) = &self.bos
            && self.add_bos
            && ids.first() != Some(bos)
        {
            ids.insert(0, *bos);
        }
        ids
    }

    /// Size of the model's vocabulary: every prompt token must be below it.
    pub fn vocab_size(&self) -> usize {
        self.decoder.config().vocab_size
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// One sequence, start to end, without the scheduler: warmup and tests. Returns the
    /// generated ids, the end token included when generation stopped on one.
    pub fn generate(
        &self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_tokens: usize,
    ) -> Result<Vec<u32>, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::Inference("empty prompt".into()));
        }
        let mut cache = self.decoder.new_cache();
        let mut processor = sampling.processor();
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        while out.len() < max_tokens && cache.len() + next.len() <= self.context_length() {
            let logits = self
                .decoder
                .forward(&mut [Step { tokens: &next, cache: &mut cache, logits: true }])?
                .ok_or_else(|| ModelError::Inference("no logits".into()))?;
            let token = processor.sample(&logits.get(0)?)?;
            out.push(token);
            if self.is_end(token) {
                break;
            }
            next = vec![token];
        }
        Ok(out)
    }
}

/// Private-use character around each message's index in the placeholder rendering.
const MARK: char = '\u{F8FF}';

fn encode_with(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let enc = tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

fn plain_text_tokenizer(tokenizer: &Tokenizer) -> Tokenizer {
    let mut plain = tokenizer.clone();
    plain.set_encode_special_tokens(true);
    plain
}

fn chat_environment(source: String) -> Result<minijinja::Environment<'static>, ModelError> {
    let mut env = minijinja::Environment::new();
    // Templates are written for Python's Jinja: str.strip(), dict.items() and friends.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    env.add_template_owned("chat", source)
        .map_err(|e| ModelError::Unsupported(format!("the chat template does not compile: {e}")))?;
    Ok(env)
}

impl GenerationModel {
    /// A Hugging Face checkpoint: the tokenizer from tokenizer.json, the chat template and the
    /// BOS and EOS tokens from tokenizer_config.json, more end tokens from config.json and
    /// generation_config.json.
    fn load_checkpoint(
        dir: &Path,
        config: &Path,
        files: &[PathBuf],
        candle: Option<&Device>,
    ) -> Result<Self, ModelError> {
        let decoder = match candle {
            None => Decoder::Packed(hf::load::<Llama>(config, files, &Device::Cpu)?),
            Some(device) => Decoder::Candle(hf::load::<CandleLlama>(config, files, device)?),
        };
        let json_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&json_path).map_err(|e| ModelError::Files {
            path: json_path.display().to_string(),
            message: format!("a safetensors checkpoint needs its tokenizer.json: {e}"),
        })?;
        let read = |name: &str| -> Result<serde_json::Value, ModelError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::Files {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
                Err(_) => Ok(serde_json::Value::Null),
            }
        };
        let tok_config = read("tokenizer_config.json")?;
        // Special tokens are written as a string or as {"content": ...}.
        let token = |key: &str| -> Option<(u32, String)> {
            let v = tok_config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            Some((tokenizer.token_to_id(text)?, text.to_string()))
        };
        let bos = token("bos_token");
        let eos = token("eos_token");
        let add_bos = tok_config.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let mut end_ids: BTreeSet<u32> = eos.iter().map(|(id, _)| *id).collect();
        for source in [read("config.json")?, read("generation_config.json")?] {
            match source.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => {
                    end_ids.extend(ids.iter().filter_map(|i| i.as_u64()).map(|i| i as u32))
                }
                Some(v) => end_ids.extend(v.as_u64().map(|i| i as u32)),
                None => {}
            }
        }
        end_ids.extend(END_TOKENS.iter().filter_map(|t| tokenizer.token_to_id(t)));
        // One template, or a list of named ones of which "default" is the chat template.
        let template = match tok_config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let chat = template.map(chat_environment).transpose()?;
        let text = TextParts { tokenizer, bos, eos: eos.map(|(_, s)| s), add_bos, end_ids };
        Ok(GenerationModel::assemble(decoder, text, chat, config.to_path_buf()))
    }
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

/// Generated ids in, text out: holds back bytes that do not yet form a whole character and any
/// tail that could be the start of a stop string, and cuts the text at the first stop string.
pub struct TextStream {
    ids: Vec<u32>,
    /// Incremental decoding: `ids[prefix..read]` were decoded last time; decoding
    /// `ids[prefix..]` and dropping that text leaves the new text, whatever the tokenizer does
    /// at the start of a decode (leading spaces and the like). Each step decodes a few ids, not
    /// the whole generation.
    prefix: usize,
    read: usize,
    /// Text of `ids[..read]`.
    text: String,
    sent: usize,
    stops: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Delta {
    /// Text that is final (possibly empty).
    Text(String),
    /// A stop string was reached: the text before it, then the generation ends.
    Stopped(String),
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    pub fn push(&mut self, model: &GenerationModel, id: u32) -> Result<Delta, ModelError> {
        self.ids.push(id);
        // A byte-level token can end inside a character: wait for the rest.
        self.decode_new(model, false)?;
        let text = std::mem::take(&mut self.text);
        let delta = self.advance(&text);
        self.text = text;
        Ok(delta)
    }

    /// Appends the text of the ids since `read`, unless it ends inside a character (or
    /// `whole`: at the end, whatever it is).
    fn decode_new(&mut self, model: &GenerationModel, whole: bool) -> Result<(), ModelError> {
        let before = model.decode(&self.ids[self.prefix..self.read])?;
        let now = model.decode(&self.ids[self.prefix..])?;
        if let Some(new) = now.get(before.len()..)
            && now.len() > before.len()
            && (whole || !now.ends_with('\u{FFFD}'))
        {
            self.text.push_str(new);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(())
    }

    /// The delta for the whole decoded text so far.
    fn advance(&mut self, text: &str) -> Delta {
        // A stop string not yet seen ends after `sent`, so it starts at most its length before.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self.stops.iter().filter_map(|s| text[from..].find(s.as_str())).min();
        if let Some(at) = found.map(|i| from + i) {
            let delta = text.get(self.sent..at).unwrap_or_default().to_string();
            self.sent = at.max(self.sent);
            return Delta::Stopped(delta);
        }
        if text.ends_with('\u{FFFD}') {
            return Delta::Text(String::new());
        }
        let end = text.len() - self.held_back(text);
        let delta = text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = end.max(self.sent);
        Delta::Text(delta)
    }

    /// Everything not yet sent, at the end of the generation.
    pub fn flush(&mut self, model: &GenerationModel) -> Result<String, ModelError> {
        self.decode_new(model, true)?;
        let delta = self.text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        Ok(delta)
    }

    /// Bytes at the end of `text` that start some stop string (a proper prefix of it).
    fn held_back(&self, text: &str) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if text.ends_with(&stop[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], texts: &[&str]) -> Vec<Delta> {
        let mut stream = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        texts.iter().map(|t| stream.advance(t)).collect()
    }

    #[test]
    fn text_is_sent_as_it_grows() {
        assert_eq!(
            run(&[], &["Hel", "Hello", "Hello world"]),
            [Delta::Text("Hel".into()), Delta::Text("lo".into()), Delta::Text(" world".into())]
        );
    }

    #[test]
    fn a_possible_stop_prefix_is_held_back_then_released() {
        let d = run(&["\n\nUser"], &["Hi", "Hi\n", "Hi\n\nUs", "Hi\n\nUsual"]);
        assert_eq!(
            d,
            [
                Delta::Text("Hi".into()),
                Delta::Text(String::new()),
                Delta::Text(String::new()),
                Delta::Text("\n\nUsual".into())
            ]
        );
    }

    #[test]
    fn the_first_stop_string_cuts_the_text() {
        let d = run(&["END", "."], &["one", "one two. three END"]);
        assert_eq!(d, [Delta::Text("one".into()), Delta::Stopped(" two".into())]);
    }

    #[test]
    fn an_incomplete_character_waits() {
        let d = run(&[], &["caf", "caf\u{FFFD}", "café"]);
        assert_eq!(d, [Delta::Text("caf".into()), Delta::Text(String::new()), Delta::Text("é".into())]);
    }

    #[test]
    fn sampling_settings_pick_the_strategy() {
        // Greedy ignores the seed: the same logits give the same token.
        let logits = candle_core::Tensor::new(&[0.1f32, 2.0, 0.3], &Device::Cpu).expect("tensor");
        let greedy = SamplingParams::greedy();
        assert_eq!(greedy.processor().sample(&logits).expect("sample"), 1);
        let hot = SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 0, seed: 7 };
        let a: Vec<u32> = {
            let mut p = hot.processor();
            (0..32).map(|_| p.sample(&logits).expect("sample")).collect()
        };
        let b: Vec<u32> = {
            let mut p = hot.processor();
            (0..32).map(|_| p.sample(&logits).expect("sample")).collect()
        };
        assert_eq!(a, b, "same seed, same draws");
        assert!(a.iter().any(|&t| t != 1), "a high temperature samples beyond the argmax");
        let top1 = SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 1, seed: 7 };
        let mut p = top1.processor();
        assert!((0..16).all(|_| p.sample(&logits).expect("sample") == 1), "top_k 1 is greedy");
    }
}
