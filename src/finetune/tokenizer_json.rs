//! Reading a Hugging Face `tokenizer.json` with the `tokenizers` crate (0.23) without its
//! panics. The crate checks the parts of a tokenizer a program builds, but several of those
//! checks are skipped when it reads them from a file, and it then panics while loading or at the
//! first text (found by this crate's `tokenizer_json` fuzz target, and listed in the crate's
//! pull request 2151, not in a release). A tokenizer file is user input, so [`parse`] checks
//! those parts first and names what is wrong:
//!
//! - the text is JSON (a syntax error inside `decoder` — a download cut short there — panics);
//! - a BPE model's merges each make a token of its vocabulary (one longer than every token
//!   overruns a buffer; the GGUF tokenizer builds its BPE through the same check,
//!   [`check_bpe_merges`]);
//! - no `Precompiled` normalizer (SentencePiece's binary character map, which the crate trusts:
//!   T5 and XLM-R tokenizers have one, the BERT and Llama-family ones this crate's models use
//!   do not);
//! - a `FixedLength` pre-tokenizer has a length;
//! - a `Strip` decoder strips nothing at the end (`stop` 0: the crate indexes before the
//!   start of a token shorter than `stop`; Hugging Face's converters write `start` 1, `stop` 0);
//! - a `TemplateProcessing` post-processor defines every special token its templates name,
//!   with as many ids as tokens, and its `single` template uses no second sequence.
//!
//! `Sequence` normalizers, pre-tokenizers, decoders and processors are walked.

use std::collections::HashSet;

use serde_json::Value;
use tokenizers::Tokenizer;

/// A `tokenizer.json`'s tokenizer, or what is wrong with the file.
pub(crate) fn parse(bytes: &[u8]) -> Result<Tokenizer, String> {
    let json: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(model) = json.get("model") {
        check_model(model)?;
    }
    walk(&json, "normalizer", "normalizers", &check_normalizer)?;
    walk(
        &json,
        "pre_tokenizer",
        "pretokenizers",
        &check_pre_tokenizer,
    )?;
    walk(&json, "decoder", "decoders", &check_decoder)?;
    walk(&json, "post_processor", "processors", &check_post_processor)?;
    Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())
}

/// Applies `check` to `parent[key]` and, where that is a `Sequence`, to each of its `list`.
fn walk(
    parent: &Value,
    key: &str,
    list: &str,
    check: &dyn Fn(&Value) -> Result<(), String>,
) -> Result<(), String> {
    fn go(
        v: &Value,
        list: &str,
        check: &dyn Fn(&Value) -> Result<(), String>,
    ) -> Result<(), String> {
        if kind(v) == Some("Sequence") {
            let items = v.get(list).and_then(Value::as_array);
            return items
                .into_iter()
                .flatten()
                .try_for_each(|item| go(item, list, check));
        }
        check(v)
    }
    parent.get(key).map_or(Ok(()), |v| go(v, list, check))
}

fn kind(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

/// A BPE model (typed so, or untyped with merges) has merges that each make one of its tokens.
fn check_model(model: &Value) -> Result<(), String> {
    if !matches!(kind(model), None | Some("BPE")) {
        return Ok(());
    }
    let (Some(vocab), Some(merges)) = (
        model.get("vocab").and_then(Value::as_object),
        model.get("merges").and_then(Value::as_array),
    ) else {
        return Ok(());
    };
    let vocab: HashSet<&str> = vocab.keys().map(String::as_str).collect();
    // Merges as pairs, or as "a b" lines (`#version` lines skipped); other shapes are the
    // crate's to refuse.
    let pairs = merges.iter().filter_map(|m| match m {
        Value::Array(p) => match p.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.as_str(), b.as_str())),
            _ => None,
        },
        Value::String(line) if !line.starts_with("#version") => line.split_once(' '),
        _ => None,
    });
    let prefix = model
        .get("continuing_subword_prefix")
        .and_then(Value::as_str)
        .unwrap_or("");
    check_bpe_merges(|t| vocab.contains(t), pairs, prefix)
}

/// Every merge `(a, b)` of tokens in the vocabulary makes a token in it: `a` followed by `b`
/// less the continuation `prefix`. The `tokenizers` crate writes that token into a buffer as
/// long as the longest token before looking it up, so a longer one panics.
pub(crate) fn check_bpe_merges<'a>(
    in_vocab: impl Fn(&str) -> bool,
    merges: impl IntoIterator<Item = (&'a str, &'a str)>,
    prefix: &str,
) -> Result<(), String> {
    for (rank, (a, b)) in merges.into_iter().enumerate() {
        if !(in_vocab(a) && in_vocab(b)) {
            continue; // the crate names the missing token
        }
        // The crate drops `prefix`'s length in bytes from `b`, whatever `b` starts with.
        let merged = b.get(prefix.len()..).map(|rest| format!("{a}{rest}"));
        match merged {
            Some(t) if in_vocab(&t) => {}
            Some(t) => {
                return Err(format!(
                    "merge {rank} ({a:?}, {b:?}) makes {t:?}, which is not in the vocabulary"
                ))
            }
            None => {
                return Err(format!(
                    "merge {rank} ({a:?}, {b:?}): {b:?} is shorter than the continuing subword \
                     prefix {prefix:?} or splits a character at its end"
                ))
            }
        }
    }
    Ok(())
}

/// No `Precompiled` normalizer: the crate and its `spm_precompiled` trust the binary map
/// (a damaged one allocates up to 8 GB at load, or indexes past its end at the first text).
fn check_normalizer(n: &Value) -> Result<(), String> {
    if kind(n) == Some("Precompiled") {
        return Err(
            "normalizer Precompiled: a SentencePiece character map is not read (the \
                    tokenizers crate trusts its binary form); the BERT and Llama-family \
                    tokenizers this crate's models use have none"
                .into(),
        );
    }
    Ok(())
}

/// A `FixedLength` pre-tokenizer splits into pieces of at least one character.
fn check_pre_tokenizer(p: &Value) -> Result<(), String> {
    if kind(p) == Some("FixedLength") && p.get("length").and_then(Value::as_u64) == Some(0) {
        return Err("pre_tokenizer FixedLength: length 0; give a length of at least 1".into());
    }
    Ok(())
}

/// A `Strip` decoder strips only at the start of a token.
fn check_decoder(d: &Value) -> Result<(), String> {
    let stop = d.get("stop").and_then(Value::as_u64).unwrap_or(0);
    if kind(d) == Some("Strip") && stop > 0 {
        return Err(format!(
            "decoder Strip: stop {stop}; the tokenizers crate fails on tokens shorter than that, \
             give stop 0 (Hugging Face's converters strip one space at the start only)"
        ));
    }
    Ok(())
}

/// What the `tokenizers` crate checks when a program builds a `TemplateProcessing` but not when
/// it reads one from a file, and then panics on while encoding: every special token a template
/// names is in its `special_tokens`, each of those has as many `ids` as `tokens`, and the
/// `single` template uses no second sequence (`B`).
fn check_post_processor(p: &Value) -> Result<(), String> {
    if kind(p) != Some("TemplateProcessing") {
        return Ok(());
    }
    let empty = serde_json::Map::new();
    let tokens = p
        .get("special_tokens")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (name, token) in tokens {
        let len = |k: &str| token.get(k).and_then(Value::as_array).map(Vec::len);
        if len("ids") != len("tokens") {
            return Err(format!(
                "post_processor: special token {name:?} has {:?} ids and {:?} tokens; \
                 give as many of each",
                len("ids").unwrap_or(0),
                len("tokens").unwrap_or(0)
            ));
        }
    }
    for template in ["single", "pair"] {
        let pieces = p.get(template).and_then(Value::as_array);
        for piece in pieces.into_iter().flatten() {
            let special = piece.get("SpecialToken").and_then(|s| s.get("id"));
            if let Some(id) = special.and_then(Value::as_str) {
                if !tokens.contains_key(id) {
                    return Err(format!(
                        "post_processor: the {template} template names special token \
                         {id:?}, which its special_tokens does not define"
                    ));
                }
            }
            let sequence = piece.get("Sequence").and_then(|s| s.get("id"));
            if template == "single" && sequence.and_then(Value::as_str) == Some("B") {
                return Err("post_processor: the single template uses sequence B; a \
                            single text has only A"
                    .into());
            }
        }
    }
    Ok(())
}
