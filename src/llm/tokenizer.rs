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
        // Without `add_bos_token` (`transformers` 5 and Llama 3 folders leave it out), BOS is
        // added when the tokenizer's own post-processor adds it.
        let add_bos = match cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(add) => add,
            None => {
                let with = tokenizer.encode("", true);
                bos.is_some() && with.is_ok_and(|e| e.get_ids().first() == bos.as_ref())
            }
        };
        Ok(Self {
            tokenizer,
            bos,
            eos,
            add_bos,
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
        self.check_serializable()?;
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

    /// Refuses a vocabulary the `tokenizers` crate cannot write back: it writes one by walking
    /// every id up to the highest, noting each missing one, so a file with an id near 2³²
    /// beside a few tokens would take gigabytes. Real vocabularies have no gaps; a few are let
    /// through.
    fn check_serializable(&self) -> Result<(), AdapterError> {
        let vocab = self.tokenizer.get_vocab(false);
        match vocab.values().max() {
            Some(&top) if top as usize > 2 * vocab.len() + 1024 => Err(AdapterError::format(
                "tokenizer.json",
                format!(
                    "the vocabulary's ids reach {top} for {} tokens; a vocabulary numbered with \
                     such gaps is damaged",
                    vocab.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// This tokenizer as GGUF `tokenizer.*` metadata (what [`Self::from_gguf`] reads and
    /// llama.cpp runs), for [`crate::model::llama::save_gguf`]: the tokens by id, token types
    /// (control for special added tokens, user-defined for other added ones, normal otherwise),
    /// BOS/EOS, `add_bos_token` and the chat template, and by kind:
    /// - a byte-level BPE with one of the pre-tokenizers [`Self::from_gguf`] builds — SmolLM's
    ///   (digits one by one, then GPT-2's regex: `smollm`), Llama 3's (`llama-bpe`) and GPT-2's
    ///   (`gpt-2`) — as model `gpt2` with its merges and the pre-tokenizer's llama.cpp name;
    /// - a SentencePiece-style BPE (byte fallback, `▁` for spaces, as Llama 2, Mistral and
    ///   TinyLlama folders hold it: a `Prepend`/`Replace` normalizer, or the `Metaspace`
    ///   pre-tokenizer `transformers` writes) as model `llama`, as llama.cpp's converter writes
    ///   a `tokenizer.model`: pieces, scores (a merged piece ranks by its first merge: the
    ///   earlier, the higher; other pieces 0), byte pieces typed as bytes (6), the unknown piece
    ///   (2), `add_space_prefix`.
    ///
    /// Other tokenizers are refused (`Unsupported`), as is a vocabulary whose ids have gaps.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, GgufValue)>, AdapterError> {
        use serde_json::Value;
        let unsupported = |m: String| AdapterError::Unsupported {
            option: "tokenizer".into(),
            message: format!(
                "{m}; GGUF metadata is written for byte-level BPE tokenizers (SmolLM, Llama 3, \
                 GPT-2 pre-tokenizers) and SentencePiece-style BPE ones (Llama 2, Mistral)"
            ),
        };
        self.check_serializable()?;
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
        let kind = match spm_layout(&json) {
            Some(prefix) => GgufTokenizerKind::Spm { prefix },
            None => GgufTokenizerKind::Gpt2 {
                pre: byte_level_name(&json).map_err(unsupported)?,
            },
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
        // Ids all below the count and no slot empty: else two tokens share an id.
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| t.ok_or(id))
            .collect::<Result<_, _>>()
            .map_err(|id| {
                unsupported(format!(
                    "two tokens share an id (none has id {id}); ids must number the tokens"
                ))
            })?;
        let merges: Vec<(String, String)> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Value::Array(p) => Some((
                    p.first()?.as_str()?.to_string(),
                    p.get(1)?.as_str()?.to_string(),
                )),
                Value::String(line) => line
                    .split_once(' ')
                    .map(|(l, r)| (l.to_string(), r.to_string())),
                _ => None,
            })
            .collect();
        let added = self.tokenizer.get_added_tokens_decoder();
        let unknown = model["unk_token"]
            .as_str()
            .or_else(|| vocab.contains_key("<unk>").then_some("<unk>"));
        let spm = matches!(kind, GgufTokenizerKind::Spm { .. });
        let types: Vec<GgufValue> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| {
                GgufValue::I32(match added.get(&(id as u32)) {
                    _ if spm && Some(t.as_str()) == unknown => 2,
                    Some(t) if t.special => 3,
                    Some(_) => 4,
                    None if spm && is_byte_piece(t) => 6,
                    None => 1,
                })
            })
            .collect();
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let strings =
            |v: Vec<String>| GgufValue::Array(v.into_iter().map(GgufValue::String).collect());
        let mut meta = Vec::new();
        match kind {
            GgufTokenizerKind::Gpt2 { pre } => {
                // GGUF holds a merge as one string split at its first space after the first
                // character (llama.cpp's rule): a left token with a later space cannot be held.
                if let Some((l, r)) = merges
                    .iter()
                    .find(|(l, _)| l.is_empty() || l.chars().skip(1).any(|c| c == ' '))
                {
                    return Err(unsupported(format!(
                        "the merge ({l:?}, {r:?}), which a GGUF merge string cannot hold"
                    )));
                }
                let merges = merges.into_iter().map(|(l, r)| format!("{l} {r}"));
                meta.extend([
                    (key("model"), GgufValue::String("gpt2".into())),
                    (key("pre"), GgufValue::String(pre.into())),
                    (key("tokens"), strings(tokens)),
                    (key("token_type"), GgufValue::Array(types)),
                    (key("merges"), strings(merges.collect())),
                ]);
            }
            GgufTokenizerKind::Spm { prefix } => {
                // A piece's first merge ranks it: llama.cpp merges the highest score first.
                let mut rank: std::collections::HashMap<String, usize> = Default::default();
                for (i, (l, r)) in merges.iter().enumerate() {
                    rank.entry(format!("{l}{r}")).or_insert(i);
                }
                let scores = tokens
                    .iter()
                    .map(|t| GgufValue::F32(rank.get(t).map_or(0.0, |&r| -1.0 - r as f32)))
                    .collect();
                meta.extend([
                    (key("model"), GgufValue::String("llama".into())),
                    (key("tokens"), strings(tokens.clone())),
                    (key("scores"), GgufValue::Array(scores)),
                    (key("token_type"), GgufValue::Array(types)),
                    (key("add_space_prefix"), GgufValue::Bool(prefix)),
                ]);
                if let Some(unk) = unknown.and_then(|u| vocab.get(u)) {
                    meta.push((key("unknown_token_id"), GgufValue::U32(*unk)));
                }
            }
        }
        meta.push((key("add_bos_token"), GgufValue::Bool(self.add_bos)));
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
/// The two tokenizer kinds GGUF metadata is written for.
enum GgufTokenizerKind {
    /// Byte-level BPE (`gpt2`) with llama.cpp's name for its pre-tokenizer.
    Gpt2 { pre: &'static str },
    /// SentencePiece-style BPE (`llama`), with a space in front of a text or not.
    Spm { prefix: bool },
}

/// `Some(add_space_prefix)` when a serialized tokenizer is a SentencePiece-style BPE: byte
/// fallback, spaces as `▁` by a `Replace` normalizer (after a `Prepend` of `▁`, or alone) with
/// no pre-tokenizer — as `transformers` 4 and [`TextTokenizer::from_gguf`] write it — or by a
/// non-splitting `Metaspace` pre-tokenizer with no normalizer, as `transformers` 5 writes it.
fn spm_layout(json: &serde_json::Value) -> Option<bool> {
    let kind = |v: &serde_json::Value| v["type"].as_str().unwrap_or("").to_string();
    if json["model"]["byte_fallback"] != true {
        return None;
    }
    let (norm, pre) = (&json["normalizer"], &json["pre_tokenizer"]);
    if pre.is_null() {
        let steps: Vec<&serde_json::Value> = match norm["normalizers"].as_array() {
            Some(list) if kind(norm) == "Sequence" => list.iter().collect(),
            _ => vec![norm],
        };
        let replace = |v: &serde_json::Value| {
            kind(v) == "Replace" && v["pattern"]["String"] == " " && v["content"] == "\u{2581}"
        };
        match steps.as_slice() {
            [p, r] if kind(p) == "Prepend" && p["prepend"] == "\u{2581}" && replace(r) => {
                Some(true)
            }
            [r] if replace(r) => Some(false),
            _ => None,
        }
    } else if norm.is_null()
        && kind(pre) == "Metaspace"
        && pre["replacement"] == "\u{2581}"
        && pre["split"] == false
    {
        match pre["prepend_scheme"].as_str() {
            Some("first" | "always") => Some(true),
            Some("never") => Some(false),
            _ => None,
        }
    } else {
        None
    }
}

/// llama.cpp's name for a serialized byte-level BPE tokenizer's pre-tokenizer, or why it has
/// none.
fn byte_level_name(json: &serde_json::Value) -> Result<&'static str, String> {
    use serde_json::Value;
    if !json["normalizer"].is_null() {
        return Err(format!("a {} normalizer", json["normalizer"]["type"]));
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
    match steps.as_slice() {
        [b] if byte_level(b, true) => Ok("gpt-2"),
        [d, b] if kind(d) == "Digits" && d["individual_digits"] == true && byte_level(b, true) => {
            Ok("smollm")
        }
        [s, b]
            if kind(s) == "Split"
                && s["pattern"]["Regex"].as_str() == Some(LLAMA3_REGEX)
                && byte_level(b, false) =>
        {
            Ok("llama-bpe")
        }
        _ => Err(format!("the pre-tokenizer {pre}")),
    }
}

/// A SentencePiece byte piece, `<0x00>` to `<0xFF>`.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

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
