//! GGUF files (the decoder's weights and tokenizer): the header, metadata and tensor table parse
//! or give an error, never a panic; whatever parses dequantizes every tensor (or refuses it) and
//! builds a Llama model from it (or says what does not fit), never panicking or allocating
//! beyond what the file's bytes describe. The tokenizer metadata builds a tokenizer (or says what
//! is wrong) that encodes texts to ids inside its vocabulary and decodes them, the chat prompt
//! and the Hugging Face files it exports included. A model that loads exports to a GGUF file
//! (`llama::to_gguf`, F32 or Q8_0) that loads again, and loads with int8 frozen weights and
//! runs, and trains a LoRA on them (a backward through the int8 products). A file read from disk in pieces parses as its bytes do in memory.
#![no_main]

use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::llm::TextTokenizer;
use kron_adapters::model::llama;
use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::store::gguf::{GgmlType, GgufFile, GgufValue};
use kron_adapters::{training, AdapterConfig, AdapterLayers, LoraConfig, PlacementConfig};
use libfuzzer_sys::fuzz_target;

/// Texts every tokenizer encodes: special tokens, digits, whitespace runs, and bytes outside
/// ASCII (the file's chat template, when it has one, is encoded too).
const TEXTS: [&str; 4] = [
    "",
    "Hello world, 12345 times!\r\n\t  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "é 漢字 🙂 \u{0}\u{7f}\u{ffff}",
];

/// A file of this process for the input (`GgufFile::read` reads a path in pieces).
fn path() -> &'static std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("kron-fuzz-{}.gguf", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    // Read from a file (header and tables in growing pieces, tensors when dequantized) and
    // parsed in memory: the same tables, or errors both.
    std::fs::write(path(), data).unwrap();
    let from_file = GgufFile::read(path());
    let in_memory = GgufFile::from_bytes("fuzz", data.to_vec());
    match (&from_file, &in_memory) {
        // (Debug text: a NaN value equals itself there.)
        (Ok(f), Ok(m)) => assert!(
            format!("{:?}", f.metadata) == format!("{:?}", m.metadata) && f.tensors == m.tensors
        ),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "from the file {}, in memory {}",
            from_file.is_ok(),
            in_memory.is_ok()
        ),
    }
    let Ok(file) = from_file else {
        return;
    };
    for info in &file.tensors {
        if let Ok(values) = file.dequantize_info(info) {
            assert_eq!(
                values.len(),
                info.numel(),
                "{}: dequantized length",
                info.name
            );
        }
    }
    let device = Default::default();
    let model =
        llama::from_gguf::<burn::backend::NdArray>(&file, "fuzz", &PlacementConfig::new(), &device);
    // With int8 frozen weights (`--base-weights int8`, every third input): a model that loads
    // in f32 loads too — whatever its values, NaN and infinities included — and runs.
    if model.is_ok() && data.len() % 3 == 0 {
        let int8 = QuantConfig::new(8, Level::Block(32)).expect("a scheme");
        let options = llama::LoadOptions::new().with_frozen(Some(int8));
        let quantized =
            llama::from_gguf_with::<burn::backend::NdArray>(&file, "fuzz", &options, &device)
                .unwrap_or_else(|e| panic!("loads in f32, not with int8 frozen weights: {e}"));
        let last = quantized.config().vocab_size as i64 - 1;
        let ids = TensorData::new(vec![0i64, last.max(0)], [1, 2]);
        let _ = quantized.forward(
            Tensor::<burn::backend::NdArray, 2, Int>::from_data(ids.clone(), &device),
            None,
        );
        // And (every sixth input) trains a LoRA on the int8 base: under autodiff, through the
        // crate's int8 products, a backward and the adapters' gradients.
        if data.len() % 6 == 0 {
            type Ad = burn::backend::Autodiff<burn::backend::NdArray>;
            kron_adapters::kron::autodiff::register_backward::<Ad>();
            let placement = PlacementConfig::linear(AdapterConfig::Lora(LoraConfig::new(2)));
            let options = options.with_placement(placement);
            let model = llama::from_gguf_with::<Ad>(&file, "fuzz", &options, &device)
                .unwrap_or_else(|e| panic!("loads for inference, not for training: {e}"));
            let logits = model.forward(Tensor::<Ad, 2, Int>::from_data(ids, &device), None);
            let grads = training::gradients_params(logits.sum().backward(), &model);
            assert!(grads.len() <= model.adapter_layers().len() * 2, "adapters' grads only");
        }
    }
    let tokenizer = TextTokenizer::from_gguf(&file, "fuzz");
    if let (Ok(tokenizer), Ok(model)) = (&tokenizer, &model) {
        let _ = tokenizer.check_vocab(model.config().vocab_size);
    }
    // A model that loads exports (adapters merged, F32, the tokenizer metadata carried) to a
    // GGUF file that loads again, or the export says why not.
    if let Ok(model) = model {
        // F32, or Q8_0 (with its F16 fallback) for inputs of odd length.
        let ty = if data.len() % 2 == 0 {
            GgmlType::F32
        } else {
            GgmlType::Q8_0
        };
        if let Ok(bytes) = llama::to_gguf(model, &llama::tokenizer_metadata(&file), ty) {
            let back = GgufFile::from_bytes("export", bytes).expect("an exported GGUF parses");
            if let Err(e) = llama::from_gguf::<burn::backend::NdArray>(
                &back,
                "export",
                &PlacementConfig::new(),
                &device,
            ) {
                panic!("an exported GGUF does not load: {e}");
            }
        }
    }
    let Ok(tokenizer) = tokenizer else {
        return;
    };
    let vocab = tokenizer.vocab_size();
    let template = file
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    for text in TEXTS.iter().copied().chain([template]) {
        if let Ok(ids) = tokenizer.encode(text, true) {
            for &id in &ids {
                assert!(
                    (id as usize) < vocab,
                    "{text:?}: id {id} beyond {vocab} tokens"
                );
            }
            let _ = tokenizer.decode(&ids, false);
            let _ = tokenizer.decode(&ids, true);
        }
    }
    let _ = tokenizer.decode(&[u32::MAX, vocab as u32], false);
    let _ = tokenizer.chat_prompt("hi");
    let _ = tokenizer.hf_files();
});
