//! A decoder's tokenizer: the Hugging Face `tokenizer.json` of a model folder, or one built with
//! the `tokenizers` crate from a GGUF file's metadata: GPT-2 byte-level BPE (`tokenizer.ggml.tokens`,
//! `.merges`, `.token_type`, the special ids, and the pre-tokenizer `tokenizer.ggml.pre` names)
//! or SentencePiece (`.tokens`, `.scores`, `.token_type`: Llama 2, Mistral, TinyLlama; see
//! [`TextTokenizer::from_gguf`]).
//!
//! Pre-tokenizers by `tokenizer.ggml.pre` (llama.cpp's `llama-vocab.cpp`): `smollm` (and the
//! StarCoder family) splits every digit on its own, then GPT-2's byte-level regex —
//! exactly Hugging Face's `Digits(individual_digits) + ByteLevel`; `llama-bpe`/`llama3` uses
//! Llama 3's regex (digits in groups of up to three); `gpt-2` GPT-2's. Control tokens
//! (`token_type` 3) are special tokens, matched in the text before splitting
//! (`<|im_start|>`). BOS is added only when `tokenizer.ggml.add_bos_token` says so (SmolLM2:
//! no; SentencePiece files yes unless they say otherwise).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{AdapterError, ConfigError};
use crate::store::gguf::{GgufFile, GgufValue};

/// Llama 3's pre-tokenizer regex (llama.cpp `LLAMA3`, Hugging Face's Llama 3 `tokenizer.json`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the special-token settings generation needs.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End-of-sequence tokens (generation stops at any).
    pub eos: Vec<u32>,
    /// Prepend BOS when encoding a prompt.
    pub add_bos: bool,
    /// The chat template (Jinja) the model ships, if any.
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    /// The tokenizer of a model at `path`: a `.gguf` file (built from its metadata) or a
    /// Hugging Face folder (`tokenizer.json`, with `tokenizer_config.json` for BOS handling).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            let file = GgufFile::read(path)?;
            Self::from_gguf(&file, &path.display().to_string())
        }
    }

    /// From a Hugging Face folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, AdapterError> {
        let tj = dir.join("tokenizer.json");
        // Read as any user file (a device or FIFO is refused), then parsed.
        let mut tokenizer = crate::finetune::tokenizer_json::parse(&crate::store::read_file(&tj)?)
            .map_err(|e| AdapterError::format(tj.display().to_string(), e))?;
        // Lengths are the caller's business: no fixed padding or truncation (some
        // tokenizer.json files pad every text to 128 tokens).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| AdapterError::format(tj.display().to_string(), e.to_string()))?;
        // Optional files: read as any user file (a device or FIFO is not read), absent or
        // malformed ones give the defaults.
        let json = |name: &str| -> serde_json::Value {
            crate::store::read_text(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default()
        };
        let (cfg, model_cfg) = (json("tokenizer_config.json"), json("config.json"));
        // An id beyond u32 is no token (wrapping would name a valid one).
        let as_id = |v: &serde_json::Value| v.as_u64().and_then(|v| u32::try_from(v).ok());
        let token_id = |v: &serde_json::Value| -> Option<u32> {
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tokenizer.token_to_id(s)
        };
        let bos = cfg
            .get("bos_token")
            .and_then(token_id)
            .or_else(|| model_cfg.get("bos_token_id").and_then(as_id));
        let mut eos: Vec<u32> = cfg
            .get("eos_token")
            .and_then(token_id)
            .into_iter()
            .collect();
        match model_cfg.get("eos_token_id") {
            Some(v @ serde_json::Value::Number(_)) => eos.extend(as_id(v)),
            Some(serde_json::Value::Array(a)) => eos.extend(a.iter().filter_map(as_id)),
            _ => {}
        }
        eos.sort();
        eos.dedup();
        Ok(Self {
            tokenizer,
            bos,
            eos,
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(String::from),
        })
    }

    /// From a GGUF file's tokenizer metadata; `path` names it in errors. `tokenizer.ggml.model`
    /// `gpt2` builds a byte-level BPE from the file's merges, `llama` a SentencePiece tokenizer
    /// from its pieces' scores (as Hugging Face's fast tokenizer for such a model: merges are
    /// every split of a piece into two pieces, ranked by the merged piece's score; byte
    /// fallback; `▁` for spaces, one in front when `add_space_prefix`); others are refused.
    pub fn from_gguf(file: &GgufFile, path: &str) -> Result<Self, AdapterError> {
        let err = |m: String| AdapterError::format(path, m);
        let get = |k: &str| file.get(&format!("tokenizer.ggml.{k}"));
        let model = get("model").and_then(GgufValue::as_str).unwrap_or("");
        if model == "llama" {
            return Self::spm_from_gguf(file, path);
        }
        if model != "gpt2" {
            return Err(AdapterError::Unsupported {
                option: "tokenizer.ggml.model".into(),
                message: format!(
                    "{path}: tokenizer model {model:?}; GPT-2 byte-level BPE (\"gpt2\") and \
                     SentencePiece (\"llama\") are built from GGUF metadata, other tokenizers \
                     need the model's tokenizer.json"
                ),
            });
        }
        let tokens = gguf_list(file, path, "tokens", GgufValue::as_str)?;
        let merges: Vec<(String, String)> = gguf_list(file, path, "merges", GgufValue::as_str)?
            .into_iter()
            .map(|m| {
                // llama.cpp splits at the first space after the first character.
                let at = m
                    .char_indices()
                    .skip(1)
                    .find(|(_, c)| *c == ' ')
                    .map(|(i, _)| i);
                at.map(|i| (m[..i].to_string(), m[i + 1..].to_string()))
                    .ok_or_else(|| err(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_, _>>()?;
        let vocab = vocab_of(&tokens).map_err(err)?;
        crate::finetune::tokenizer_json::check_bpe_merges(
            |t| vocab.contains_key(t),
            merges.iter().map(|(a, b)| (a.as_str(), b.as_str())),
            "",
        )
        .map_err(|e| err(format!("tokenizer.ggml.merges: {e}")))?;
        let pre = get("pre").and_then(GgufValue::as_str).unwrap_or("default");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(matches!(pre, "llama3" | "llama-v3" | "llama-bpe"))
            .build()
            .map_err(|e| err(format!("BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let byte_level = |regex: bool| ByteLevel::new(false, true, regex);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_REGEX.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(e.to_string()))?
                .into(),
                byte_level(false).into(),
            ])
            .into(),
            "gpt-2" | "gpt2" | "default" | "olmo" | "mpt" => byte_level(true).into(),
            other => {
                return Err(AdapterError::Unsupported {
                    option: "tokenizer.ggml.pre".into(),
                    message: format!(
                        "{path}: pre-tokenizer {other:?}; smollm, llama-bpe and gpt-2 are built \
                         from GGUF metadata (give the model's tokenizer.json for others)"
                    ),
                })
            }
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        Self::with_gguf_specials(tokenizer, &tokens, file, path)
    }

    /// A GGUF tokenizer's special tokens and settings: control tokens (`token_type` 3) and the
    /// unknown token (2) are special, matched whole in a text and skipped when decoding;
    /// user-defined ones (4) are added tokens; BOS/EOS ids (those beyond the vocabulary are
    /// none), `add_bos_token` (default: SentencePiece yes, GPT-2 no) and the chat template.
    fn with_gguf_specials(
        mut tokenizer: Tokenizer,
        tokens: &[&str],
        file: &GgufFile,
        path: &str,
    ) -> Result<Self, AdapterError> {
        let get = |k: &str| file.get(&format!("tokenizer.ggml.{k}"));
        let types = get("token_type")
            .and_then(GgufValue::as_array)
            .unwrap_or(&[]);
        let added = |wanted: &[u64], special: bool| -> Vec<AddedToken> {
            types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.as_u64().is_some_and(|t| wanted.contains(&t)))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.to_string(), special))
                .collect()
        };
        tokenizer
            .add_special_tokens(added(&[2, 3], true))
            .map_err(|e| AdapterError::format(path, format!("special tokens: {e}")))?;
        tokenizer
            .add_tokens(added(&[4], false))
            .map_err(|e| AdapterError::format(path, format!("added tokens: {e}")))?;
        // An id beyond u32 is no token (wrapping would name a valid one).
        let id = |k: &str| {
            get(k)
                .and_then(GgufValue::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let in_vocab = |t: u32| (t as usize) < tokens.len();
        let bos = id("bos_token_id").filter(|&t| in_vocab(t));
        let eos: Vec<u32> = id("eos_token_id")
            .filter(|&t| in_vocab(t))
            .into_iter()
            .collect();
        let spm = get("model").and_then(GgufValue::as_str) == Some("llama");
        Ok(Self {
            tokenizer,
            bos,
            eos,
            add_bos: get("add_bos_token")
                .and_then(GgufValue::as_bool)
                .unwrap_or(spm),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(String::from),
        })
    }

    /// A SentencePiece tokenizer (`tokenizer.ggml.model` `llama`: Llama 2, Mistral,
    /// TinyLlama) from its pieces, scores and token types, as Hugging Face builds the fast
    /// tokenizer of such a model: a BPE whose merges are every split of a piece into two
    /// pieces, ranked by the merged piece's score (the highest first; a piece's splits by their
    /// halves' ids), with byte fallback (`<0x..>` pieces) and unknown pieces fused; spaces
    /// become `▁`, with one in front of the text when `add_space_prefix` (the default).
    fn spm_from_gguf(file: &GgufFile, path: &str) -> Result<Self, AdapterError> {
        use tokenizers::decoders::{
            byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip,
            DecoderWrapper,
        };
        use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
        let err = |m: String| AdapterError::format(path, m);
        let get = |k: &str| file.get(&format!("tokenizer.ggml.{k}"));
        let tokens = gguf_list(file, path, "tokens", GgufValue::as_str)?;
        let scores = gguf_list(file, path, "scores", |v| v.as_f64().filter(|s| !s.is_nan()))?;
        if scores.len() != tokens.len() {
            return Err(err(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let vocab = vocab_of(&tokens).map_err(err)?;
        let mut merges: Vec<(f64, u32, u32)> = Vec::new();
        for (piece, &score) in tokens.iter().zip(&scores) {
            let start = merges.len();
            for (at, _) in piece.char_indices().skip(1) {
                if let (Some(&l), Some(&r)) = (vocab.get(&piece[..at]), vocab.get(&piece[at..])) {
                    merges.push((score, l, r));
                }
            }
            merges[start..].sort_by_key(|&(_, l, r)| (l, r));
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0)); // stable: ties keep the pieces' order
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(_, l, r)| {
                (
                    tokens[l as usize].to_string(),
                    tokens[r as usize].to_string(),
                )
            })
            .collect();
        let unk = get("unknown_token_id")
            .and_then(GgufValue::as_u64)
            .and_then(|u| tokens.get(usize::try_from(u).ok()?))
            .map(|t| t.to_string());
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            bpe = bpe.unk_token(unk);
        }
        let bpe = bpe.build().map_err(|e| err(format!("BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let prefix = get("add_space_prefix")
            .and_then(GgufValue::as_bool)
            .unwrap_or(true);
        let replace = |from: &str, to: &str| {
            Replace::new(from, to).map_err(|e| err(format!("normalizer: {e}")))
        };
        let mut normalizers = Vec::new();
        if prefix {
            normalizers.push(Prepend::new("\u{2581}".into()).into());
        }
        normalizers.push(replace(" ", "\u{2581}")?.into());
        tokenizer
            .with_normalizer(Some(Normalizers::new(normalizers)))
            .map_err(|e| err(format!("normalizer: {e}")))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            replace("\u{2581}", " ")?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(Decoders::new(decoders)));
        Self::with_gguf_specials(tokenizer, &tokens, file, path)
    }

    /// Token ids of `text` (special tokens in the text are recognized; BOS prepended when the
    /// model's settings say so and `add_bos`).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ConfigError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ConfigError::invalid("tokenizer", "text", e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` (special tokens dropped when `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ConfigError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| ConfigError::invalid("tokenizer", "ids", e.to_string()))
    }

    /// Checks that every id this tokenizer gives has a row in a model's embedding of
    /// `vocab_size` (see [`crate::finetune::tokenize::TextEncoder::check_vocab`]).
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), AdapterError> {
        crate::finetune::tokenize::check_vocab(&self.tokenizer, vocab_size)
    }

    /// The vocabulary size (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The Hugging Face files of this tokenizer, `tokenizer.json` and `tokenizer_config.json`
    /// (special tokens, BOS handling, chat template), for a model folder other tools run.
    pub fn hf_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, AdapterError> {
        // The `tokenizers` crate writes a vocabulary by walking every id up to the highest,
        // noting each missing one: a file with an id near 2³² beside a few tokens would take
        // gigabytes. Real vocabularies have no gaps; a few are let through.
        let vocab = self.tokenizer.get_vocab(false);
        if let Some(&top) = vocab.values().max() {
            if top as usize > 2 * vocab.len() + 1024 {
                return Err(AdapterError::format(
                    "tokenizer.json",
                    format!(
                        "the vocabulary's ids reach {top} for {} tokens; a vocabulary numbered \
                         with such gaps is damaged",
                        vocab.len()
                    ),
                ));
            }
        }
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| AdapterError::format("tokenizer.json", e.to_string()))?;
        let token = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i));
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos),
            "eos_token": token(self.eos.first().copied()),
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
        });
        let config = serde_json::to_vec_pretty(&config)
            .map_err(|e| AdapterError::format("tokenizer_config.json", e.to_string()))?;
        Ok(vec![
            ("tokenizer.json", json.into_bytes()),
            ("tokenizer_config.json", config),
        ])
    }

    /// This tokenizer as GGUF `tokenizer.*` metadata (what [`Self::from_gguf`] reads and
    /// llama.cpp runs), for [`crate::model::llama::save_gguf`]: model `gpt2`, the tokens by
    /// id, the merges, token types (control for special added tokens, user-defined for other
    /// added ones, normal otherwise), BOS/EOS, `add_bos_token`, the chat template, and the
    /// pre-tokenizer's llama.cpp name. Byte-level BPE tokenizers with one of the pre-tokenizers
    /// [`Self::from_gguf`] builds are converted — SmolLM's (digits one by one, then GPT-2's
    /// regex: `smollm`), Llama 3's (`llama-bpe`) and GPT-2's (`gpt-2`); others are refused
    /// (`Unsupported`), as is a vocabulary whose ids have gaps.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, GgufValue)>, AdapterError> {
        use serde_json::Value;
        let unsupported = |m: String| AdapterError::Unsupported {
            option: "tokenizer".into(),
            message: format!(
                "{m}; GGUF metadata is written for byte-level BPE tokenizers \
                              (SmolLM, Llama 3, GPT-2 pre-tokenizers)"
            ),
        };
        let json: Value = self
            .tokenizer
            .to_string(false)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| unsupported("the tokenizer does not serialize".into()))?;
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(unsupported(format!("a {} model", model["type"])));
        }
        if !json["normalizer"].is_null() {
            return Err(unsupported(format!(
                "a {} normalizer",
                json["normalizer"]["type"]
            )));
        }
        let kind = |v: &Value| v["type"].as_str().unwrap_or("").to_string();
        let pre = &json["pre_tokenizer"];
        let steps: Vec<&Value> = match pre["pretokenizers"].as_array() {
            Some(list) if kind(pre) == "Sequence" => list.iter().collect(),
            _ => vec![pre],
        };
        let byte_level = |v: &Value, regex: bool| {
            kind(v) == "ByteLevel"
                && v["use_regex"].as_bool() == Some(regex)
                && v["add_prefix_space"] != true
        };
        let name = match steps.as_slice() {
            [b] if byte_level(b, true) => "gpt-2",
            [d, b]
                if kind(d) == "Digits" && d["individual_digits"] == true && byte_level(b, true) =>
            {
                "smollm"
            }
            [s, b]
                if kind(s) == "Split"
                    && s["pattern"]["Regex"].as_str() == Some(LLAMA3_REGEX)
                    && byte_level(b, false) =>
            {
                "llama-bpe"
            }
            _ => return Err(unsupported(format!("the pre-tokenizer {pre}"))),
        };
        let vocab = self.tokenizer.get_vocab(true);
        let mut tokens: Vec<Option<String>> = vec![None; vocab.len()];
        for (t, &id) in &vocab {
            match tokens.get_mut(id as usize) {
                Some(slot) => *slot = Some(t.clone()),
                None => {
                    return Err(unsupported(format!(
                        "token ids up to {id} for {} tokens",
                        vocab.len()
                    )))
                }
            }
        }
        let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
        let added = self.tokenizer.get_added_tokens_decoder();
        let types: Vec<GgufValue> = (0..tokens.len() as u32)
            .map(|id| {
                GgufValue::I32(match added.get(&id) {
                    Some(t) if t.special => 3,
                    Some(_) => 4,
                    None => 1,
                })
            })
            .collect();
        let merges: Vec<GgufValue> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Value::Array(p) => {
                    Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                }
                Value::String(line) => Some(line.clone()),
                _ => None,
            })
            .map(GgufValue::String)
            .collect();
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let strings =
            |v: Vec<String>| GgufValue::Array(v.into_iter().map(GgufValue::String).collect());
        let mut meta = vec![
            (key("model"), GgufValue::String("gpt2".into())),
            (key("pre"), GgufValue::String(name.into())),
            (key("tokens"), strings(tokens)),
            (key("token_type"), GgufValue::Array(types)),
            (key("merges"), GgufValue::Array(merges)),
            (key("add_bos_token"), GgufValue::Bool(self.add_bos)),
        ];
        if let Some(bos) = self.bos {
            meta.push((key("bos_token_id"), GgufValue::U32(bos)));
        }
        if let Some(&eos) = self.eos.first() {
            meta.push((key("eos_token_id"), GgufValue::U32(eos)));
        }
        if let Some(t) = &self.chat_template {
            meta.push((
                "tokenizer.chat_template".into(),
                GgufValue::String(t.clone()),
            ));
        }
        Ok(meta)
    }

    /// A single-turn chat prompt: ChatML (`<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n`)
    /// when the model's template is ChatML (SmolLM2's is, with its default system message);
    /// refused for other templates (this crate does not run Jinja).
    pub fn chat_prompt(&self, user: &str) -> Result<String, ConfigError> {
        let template = self.chat_template.as_deref().unwrap_or("");
        if !template.contains("<|im_start|>") {
            return Err(ConfigError::invalid(
                "tokenizer",
                "chat_template",
                "the model's chat template is not ChatML; pass the prompt already formatted",
            ));
        }
        // SmolLM2's template adds its default system message when the first message is not one
        // (in the template a Jinja string literal: its newlines raw or escaped).
        let system = template
            .split("'<|im_start|>system")
            .nth(1)
            .and_then(|rest| rest.split("<|im_end|>").next())
            .map(|s| s.replace("\\n", "\n"))
            .map(|s| s.strip_prefix('\n').map(String::from).unwrap_or(s))
            .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
            .unwrap_or_default();
        Ok(format!(
            "{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ))
    }
}

/// The vocabulary of a GGUF file's tokens (id = position), refusing a repeated token.
fn vocab_of(tokens: &[&str]) -> Result<tokenizers::models::bpe::Vocab, String> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err("tokenizer.ggml.tokens repeats a token".into());
    }
    Ok(vocab)
}

/// The items of the GGUF array `tokenizer.ggml.{key}`, each read by `item`; its absence or an
/// item `item` cannot read is an error naming the key.
fn gguf_list<'a, T>(
    file: &'a GgufFile,
    path: &str,
    key: &str,
    item: impl Fn(&'a GgufValue) -> Option<T>,
) -> Result<Vec<T>, AdapterError> {
    let key = format!("tokenizer.ggml.{key}");
    file.get(&key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| AdapterError::format(path, format!("no {key}")))?
        .iter()
        .map(|v| {
            item(v).ok_or_else(|| {
                AdapterError::format(path, format!("{key} holds an item of another type"))
            })
        })
        .collect()
}
