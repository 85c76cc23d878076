//! A Hugging Face `tokenizer.json` (a model folder's, read by the encoder's `TextEncoder` and the
//! decoder's `TextTokenizer`): it loads or gives an error, never a panic; a tokenizer that loads
//! encodes texts and decodes ids without panicking, and every id it gives lies below the
//! smallest vocabulary `check_vocab` accepts (the promise the server and the main job rely on
//! when they pair a tokenizer with a model). A tokenizer that converts to GGUF metadata
//! (`export-gguf`) loads back from it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kron_adapters::AdapterError;
use kron_adapters::finetune::tokenize::TextEncoder;
use kron_adapters::llm::TextTokenizer;
use kron_adapters::store::gguf::{self, GgufFile};
use libfuzzer_sys::fuzz_target;

/// Texts every tokenizer encodes: special tokens of both families, digits, whitespace runs,
/// accents and bytes outside ASCII, and a long word.
const TEXTS: [&str; 5] = [
    "",
    "Hello world, 12345 times! [CLS] [MASK]\r\n\t  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Élan é 漢字 🙂 \u{0}\u{7f}\u{ffff}",
    "supercalifragilisticexpialidocioussupercalifragilisticexpialidocious",
];

/// A folder of this process for the file (the loaders take paths, as users give them).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kron-fuzz-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// The smallest vocabulary `check` accepts (it accepts every size from some size up).
fn smallest_vocab(check: impl Fn(usize) -> Result<(), AdapterError>) -> usize {
    let (mut lo, mut hi) = (0usize, 1usize << 33);
    assert!(check(hi).is_ok(), "no vocabulary size is accepted");
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if check(mid).is_ok() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("tokenizer.json");
    std::fs::write(&path, data).unwrap();
    if let Ok(encoder) = TextEncoder::from_file(&path, 16) {
        let vocab = smallest_vocab(|v| encoder.check_vocab(v));
        for text in TEXTS {
            if let Ok(ids) = encoder.encode(text) {
                assert!(ids.len() <= 16, "{text:?}: {} ids past max_len 16", ids.len());
                for &id in &ids {
                    assert!((id as usize) < vocab, "{text:?}: id {id}, check_vocab accepts {vocab}");
                }
                let _ = encoder.decode(&ids);
            }
        }
        let _ = encoder.decode(&[u32::MAX, 0, 1]);
    }
    if let Ok(tokenizer) = TextTokenizer::from_hf_dir(dir()) {
        let vocab = smallest_vocab(|v| tokenizer.check_vocab(v));
        for text in TEXTS {
            if let Ok(ids) = tokenizer.encode(text, true) {
                for &id in &ids {
                    assert!((id as usize) < vocab, "{text:?}: id {id}, check_vocab accepts {vocab}");
                }
                let _ = tokenizer.decode(&ids, false);
                let _ = tokenizer.decode(&ids, true);
            }
        }
        let _ = tokenizer.decode(&[u32::MAX, 0, 1], false);
        let _ = tokenizer.chat_prompt("hi");
        let _ = tokenizer.hf_files();
        // A tokenizer that converts to GGUF metadata loads back from it (an `export-gguf` file
        // whose tokenizer cannot be read is a defect) and encodes every text.
        if let Ok(meta) = tokenizer.gguf_metadata() {
            let bytes = gguf::to_bytes(&meta, &[]).expect("converted metadata serializes");
            let file = GgufFile::from_bytes("converted.gguf", bytes).expect("and parses");
            let back = TextTokenizer::from_gguf(&file, "converted.gguf")
                .unwrap_or_else(|e| panic!("converted metadata does not load: {e}"));
            for text in TEXTS {
                if let Ok(ids) = back.encode(text, true) {
                    let _ = back.decode(&ids, false);
                }
            }
        }
    }
});
