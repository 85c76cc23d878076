//! `kron-adapters`: inspect, merge, convert and quantize adapters — Hugging Face PEFT folders
//! (LoRA, LoKr) and this crate's adapter files — and run decoders (`generate`, `eval`) with
//! them, without writing Rust. Argument parsing and printing only: the work is the library's
//! (`kron_adapters::store`, `kron_adapters::llm`). The backend is chosen by cargo feature, as
//! for the examples (CPU by default; `--features cuda` or `wgpu` for a GPU).
//!
//! Exit codes follow the library's error kinds: 0 success; 1 I/O error (missing file, output
//! exists without `--force`); 2 usage error (bad arguments or values); 3 malformed input (bad
//! JSON or safetensors, missing or inconsistent tensors or metadata); 4 valid input this tool
//! does not support (DoRA, conv layers, shapes PEFT cannot express); 5 inputs that do not fit
//! together (adapter vs base checkpoint) or a merge that would produce NaN/Inf; 6 an asset
//! (model, data) that could not be fetched. Outputs are written to a temporary file and
//! renamed: a failure leaves none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kron_adapters::finetune::AssetCache;
use kron_adapters::llm::{self, GenerateConfig, Split, TaskKind, TextTokenizer};
use kron_adapters::model::llama::{self, LlamaForCausalLM, LoadOptions};
use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::store::gguf::{GgmlType, GgufFile, GgufValue};
use kron_adapters::store::{
    attach, merge_checkpoint, read_any, size_on_disk, st, write_peft_dir, AdapterFile,
    NativeAdapters, PeftAdapter, QuantizedAdapters,
};
use kron_adapters::{AdapterError, ErrorKind, NameMap};

#[path = "../../examples/common/mod.rs"]
mod common;
use common::Inner as Cpu;

#[derive(Parser)]
#[command(
    name = "kron-adapters",
    version,
    about = "Inspect, merge and convert PEFT and kron-adapters adapters",
    after_help = "Exit codes: 0 success, 1 I/O, 2 usage, 3 malformed input, 4 unsupported, \
                  5 inputs that do not fit (or NaN/Inf), 6 asset fetch failed."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// A kron-adapters adapter file (.safetensors).
    Native,
}

#[derive(Subcommand)]
enum Cmd {
    /// Method, layers, factor shapes, rank, scale, trainable parameters and file size.
    Inspect {
        /// A PEFT folder or an adapter file.
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write BASE with every adapted weight replaced by W + ΔW (PyTorch [out, in] layout and
    /// dtype kept, every other tensor copied as is).
    Merge {
        /// The base checkpoint (safetensors, PyTorch names and layout), or a Hugging Face
        /// model folder (model.safetensors or sharded with model.safetensors.index.json).
        #[arg(long)]
        base: PathBuf,
        /// A PEFT folder or an adapter file.
        #[arg(long)]
        adapter: PathBuf,
        /// The merged checkpoint to write (a folder with the same shards and files when BASE
        /// is a folder).
        #[arg(long)]
        out: PathBuf,
        /// Rename adapter modules to base names: FROM=TO prefix rules (repeatable).
        #[arg(long = "map")]
        map: Vec<String>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Quantize an adapter's factors (symmetric int8 or int4) into a quantized adapter file,
    /// which inspect, merge and convert read (dequantized) in turn.
    Quantize {
        /// 8 or 4.
        #[arg(long)]
        bits: u8,
        /// tensor, block:N or channel.
        #[arg(long, default_value = "tensor")]
        level: String,
        /// A PEFT folder or an adapter file.
        input: PathBuf,
        /// The quantized adapter file to write.
        output: PathBuf,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Continue a prompt with a decoder (a .gguf file or a Hugging Face folder), optionally with
    /// an adapter: the continuation only on stdout, progress and timing on stderr.
    Generate {
        /// A .gguf file or a Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// An adapter file or a PEFT folder made for this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature (greedy when not given).
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// The sampler's seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (one user turn).
        #[arg(long)]
        chat: bool,
        /// How the frozen base's linear weights are held in memory: f32, or int8 (8-bit
        /// values, one scale per 32; a quarter of the memory, quantized as they are read;
        /// docs/quantization.md).
        #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
        base_weights: String,
    },
    /// Zero-shot multiple-choice accuracy on a task; the last stdout line is one JSON object
    /// {"task", "split", "n", "acc", "acc_norm"}.
    Eval {
        /// A .gguf file or a Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// An adapter file or a PEFT folder made for this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// arc_easy, arc_challenge, piqa, hellaswag, winogrande or boolq.
        #[arg(long)]
        task: String,
        /// validation or test (test exists for the ARC tasks only).
        #[arg(long, default_value = "validation")]
        split: String,
        /// Only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        /// The tasks folder (`oe_eval_tasks`); default: fetched into the asset cache.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Longest sequence in tokens (contexts are cut from the left).
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
        /// Tokens per scoring batch.
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// How the frozen base's linear weights are held in memory: f32, or int8 (8-bit
        /// values, one scale per 32; a quarter of the memory, quantized as they are read;
        /// docs/quantization.md).
        #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
        base_weights: String,
    },
    /// Merge an adapter into a decoder and write a Hugging Face folder (config.json,
    /// model.safetensors in float32 — a GGUF base dequantized — or bfloat16/float16,
    /// tokenizer.json) that transformers and other tools run.
    ExportHf {
        /// A .gguf file or a Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// An adapter file or a PEFT folder made for this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
        /// The weights' dtype: f32 (exact), or bf16 / f16 (half the size, rounded).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Merge an adapter into a decoder and write a GGUF file that llama.cpp runs (architecture
    /// llama, Q/K rows in llama.cpp's order, matrices in F16, F32 or Q8_0, the tokenizer
    /// metadata of a GGUF model carried over).
    ExportGguf {
        /// A .gguf file or a Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// An adapter file or a PEFT folder made for this model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// The matrices' type: f16 (half the size, as llama.cpp's converter writes), f32, or
        /// q8_0 (8-bit blocks, a quarter of f32's size, as the converter's --outtype q8_0).
        #[arg(long, default_value = "f16", value_parser = ["f16", "f32", "q8_0"])]
        dtype: String,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Serve many adapters over one frozen model over HTTP (docs/serving.md): an encoder (a BERT
    /// folder; POST /v1/classify with run folders of the main job as adapters) or a decoder (a
    /// .gguf file or a Hugging Face folder; POST /v1/generate). Prints `listening on
    /// http://ADDR` on stdout when ready; SIGTERM or Ctrl-C stops it after requests in flight.
    Serve {
        /// The model: a path, or `minilm` / `smollm2` for the asset cache's copies (fetched
        /// when missing).
        #[arg(long)]
        model: String,
        /// An adapter to load at start, as NAME=PATH (a run folder, an adapter file or a PEFT
        /// folder); repeat for more.
        #[arg(long = "adapter", value_name = "NAME=PATH")]
        adapters: Vec<String>,
        /// The address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Milliseconds the server waits for more requests to join a batch.
        #[arg(long, default_value_t = 5)]
        window_ms: u64,
        /// Requests in one batch at most.
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Refuse loading and unloading adapters over HTTP.
        #[arg(long)]
        read_only: bool,
        /// How a window's requests run: `mixed` (one batch, each row through its adapter),
        /// `per-adapter` (one batch per adapter) or `merged` (one batch per adapter on a copy of
        /// the model with it merged: fastest per token, the adapted weights once per adapter).
        /// docs/serving.md measures the three.
        #[arg(long, default_value = "mixed", value_parser = ["mixed", "per-adapter", "merged"])]
        batching: String,
        /// How the frozen base's linear weights are held in memory: f32, or int8 (8-bit
        /// values, one scale per 32; a quarter of the memory, quantized as they are read;
        /// docs/quantization.md).
        #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
        base_weights: String,
    },
    /// Convert between PEFT folders and adapter files.
    Convert {
        /// The input's format.
        #[arg(long, value_enum)]
        from: Format,
        /// The output's format.
        #[arg(long, value_enum)]
        to: Format,
        /// The input (a PEFT folder or an adapter file).
        input: PathBuf,
        /// The output (a folder for peft, a file for native).
        output: PathBuf,
        /// `base_model_name_or_path` to record in a PEFT config.
        #[arg(long)]
        base_model: Option<String>,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Generate { .. } | Cmd::Eval { .. } | Cmd::Serve { .. }
    ) {
        // These run a model on the backend: freed activation buffers stay in the process
        // instead of being page-faulted back in (docs/benchmarks-history.md, "The allocator").
        kron_adapters::finetune::keep_freed_memory();
    }
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &AdapterError) -> u8 {
    match e.kind() {
        ErrorKind::Io => 1,
        ErrorKind::Usage => 2,
        ErrorKind::Malformed => 3,
        ErrorKind::Unsupported => 4,
        ErrorKind::Incompatible => 5,
        ErrorKind::Asset => 6,
    }
}

fn run(cmd: Cmd) -> Result<(), AdapterError> {
    match cmd {
        Cmd::Inspect { path, json } => inspect(&path, json),
        Cmd::Serve {
            model,
            adapters,
            addr,
            window_ms,
            max_batch,
            read_only,
            batching,
            base_weights,
        } => {
            let batching = match batching.as_str() {
                "per-adapter" => kron_adapters::serve::Batching::PerAdapter,
                "merged" => kron_adapters::serve::Batching::Merged,
                _ => kron_adapters::serve::Batching::Mixed,
            };
            serve(
                &model,
                &adapters,
                &addr,
                window_ms,
                max_batch,
                read_only,
                batching,
                frozen_scheme(&base_weights),
            )
        }
        Cmd::Generate {
            model,
            adapter,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat,
            base_weights,
        } => {
            let mut cfg = GenerateConfig::new()
                .with_max_new_tokens(max_new_tokens)
                .with_top_p(top_p)
                .with_seed(seed);
            cfg.temperature = temperature;
            generate(
                &model,
                adapter.as_deref(),
                &prompt,
                &cfg,
                chat,
                frozen_scheme(&base_weights),
            )
        }
        Cmd::ExportGguf {
            model,
            adapter,
            out,
            dtype,
            force,
        } => {
            st::refuse_existing(&out, force)?;
            let device = Default::default();
            let (m, tok, gguf_tokenizer) = load_decoder(&model, adapter.as_deref(), None, &device)?;
            // A GGUF source's metadata is carried as it is; a folder's tokenizer.json is
            // converted when it is a byte-level BPE llama.cpp names or a SentencePiece BPE.
            let tokenizer = match tok {
                _ if !model.is_dir() => gguf_tokenizer,
                Some(t) => t.gguf_metadata().unwrap_or_else(|e| {
                    eprintln!("note: {e}");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            if tokenizer.is_empty() {
                eprintln!(
                    "note: no GGUF tokenizer to write; writing the weights and configuration \
                     only (llama.cpp's convert_hf_to_gguf.py on an export-hf folder converts \
                     more tokenizers)"
                );
            }
            let ty = match dtype.as_str() {
                "f32" => GgmlType::F32,
                "q8_0" => GgmlType::Q8_0,
                _ => GgmlType::F16,
            };
            let bytes = llama::save_gguf(m, &out, &tokenizer, ty, force)?;
            eprintln!("wrote {} ({bytes} bytes, merged, {dtype})", out.display());
            Ok(())
        }
        Cmd::ExportHf {
            model,
            adapter,
            out,
            dtype,
            force,
        } => {
            st::refuse_existing(&out, force)?;
            let device = Default::default();
            let (m, tok, _) = load_decoder(&model, adapter.as_deref(), None, &device)?;
            let files = match tok {
                Some(tok) => tok.hf_files()?,
                None => {
                    eprintln!(
                        "note: the model has no tokenizer; writing the weights and config only"
                    );
                    Vec::new()
                }
            };
            let extra: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let st_dtype = match dtype.as_str() {
                "bf16" => safetensors::Dtype::BF16,
                "f16" => safetensors::Dtype::F16,
                _ => safetensors::Dtype::F32,
            };
            let bytes = llama::save_hf(m, &out, &extra, st_dtype, force)?;
            eprintln!(
                "wrote {} (model.safetensors {bytes} bytes, merged, {dtype})",
                out.display()
            );
            Ok(())
        }
        Cmd::Eval {
            model,
            adapter,
            task,
            split,
            limit,
            data,
            max_len,
            batch_tokens,
            base_weights,
        } => {
            let task: TaskKind = task.parse()?;
            let split: Split = split.parse()?;
            evaluate(
                &model,
                adapter.as_deref(),
                task,
                split,
                limit,
                data,
                max_len,
                batch_tokens,
                frozen_scheme(&base_weights),
            )
        }
        Cmd::Merge {
            base,
            adapter,
            out,
            map,
            force,
        } => {
            let map = map
                .iter()
                .try_fold(NameMap::new(), |m, r| m.parse_rule(r))?;
            let file = read_any(&adapter)?;
            let report = merge_checkpoint::<Cpu>(
                &base,
                &file.adapters(),
                &map,
                &out,
                force,
                &Default::default(),
            )?;
            eprintln!(
                "merged {} layer(s) of the {} {} into {} → {} ({} bytes)",
                report.merged.len(),
                file.describe(),
                adapter.display(),
                base.display(),
                out.display(),
                report.bytes
            );
            Ok(())
        }
        Cmd::Quantize {
            bits,
            level,
            input,
            output,
            force,
        } => {
            let config = QuantConfig::new(bits, level.parse::<Level>()?)?;
            st::refuse_existing(&output, force)?;
            let adapters = read_any(&input)?.into_adapters();
            let q = QuantizedAdapters::quantize(&adapters, config)?;
            let size = q.write(&output)?;
            let f32_size = adapters.to_bytes()?.len();
            eprintln!(
                "wrote {} ({config}): {size} bytes, {:.1}% of the {f32_size}-byte float32 \
                 adapter file",
                output.display(),
                100.0 * size as f64 / f32_size as f64
            );
            Ok(())
        }
        Cmd::Convert {
            from,
            to,
            input,
            output,
            base_model,
            force,
        } => {
            let adapters = match from {
                Format::Peft => PeftAdapter::read_dir(&input)?.adapters,
                Format::Native => NativeAdapters::read(&input)?,
            };
            match to {
                Format::Peft => write_peft_dir(&output, &adapters, base_model.as_deref(), force)?,
                Format::Native => {
                    st::refuse_existing(&output, force)?;
                    adapters.write(&output)?;
                }
            }
            eprintln!(
                "wrote {} ({} layers, {} trainable parameters)",
                output.display(),
                adapters.meta.layers.len(),
                adapters.num_params()
            );
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    model: &str,
    adapters: &[String],
    addr: &str,
    window_ms: u64,
    max_batch: usize,
    read_only: bool,
    batching: kron_adapters::serve::Batching,
    frozen: Option<QuantConfig>,
) -> Result<(), AdapterError> {
    let usage = |option: &str, reason: String| -> AdapterError {
        kron_adapters::ConfigError::invalid("serve", option, reason).into()
    };
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| {
        usage(
            "addr",
            format!("{addr:?}: {e} (use HOST:PORT, e.g. 127.0.0.1:8080)"),
        )
    })?;
    let mut named = Vec::new();
    for a in adapters {
        let (name, path) = a
            .split_once('=')
            .ok_or_else(|| usage("adapter", format!("{a:?} is not NAME=PATH")))?;
        // Loaded in order, a second NAME would silently replace the first.
        if named.iter().any(|(n, _)| n == name) {
            return Err(usage(
                "adapter",
                format!("{name:?} is given twice: give each adapter its own name"),
            ));
        }
        named.push((name.to_string(), PathBuf::from(path)));
    }
    let config = kron_adapters::serve::ServeConfig::new()
        .with_window_ms(window_ms)
        .with_max_batch(max_batch)
        .with_read_only(read_only)
        .with_batching(batching);
    // Checked before the model loads (seconds for a real one).
    config.validate()?;
    let cache = AssetCache::default();
    let log = |m: &str| eprintln!("{m}");
    let path = match model {
        "minilm" if !Path::new(model).exists() => cache.minilm(&log)?,
        "smollm2" if !Path::new(model).exists() => cache.smollm2(&log)?,
        p => PathBuf::from(p),
    };
    let device = Default::default();
    let t = std::time::Instant::now();
    let m = kron_adapters::serve::Model::<Cpu>::load_with(&path, frozen, &device)?;
    eprintln!(
        "loaded {} ({}{}) in {:.1} s on {}",
        path.display(),
        m.describe()["kind"].as_str().unwrap_or("model"),
        if frozen.is_some() {
            ", int8 frozen weights"
        } else {
            ""
        },
        t.elapsed().as_secs_f64(),
        common::backend_name()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AdapterError::io("tokio runtime", e))?;
    runtime.block_on(kron_adapters::serve::serve(
        m,
        named,
        addr,
        config,
        &device,
        |bound| emit(&format!("listening on http://{bound}\n")),
    ))?;
    eprintln!("stopped");
    Ok(())
}

fn inspect(path: &Path, json: bool) -> Result<(), AdapterError> {
    let file: AdapterFile = read_any(path)?;
    let adapters = file.adapters();
    let bytes = size_on_disk(path);
    if json {
        let value = serde_json::json!({
            "path": path,
            "kind": file.describe(),
            "bytes": bytes,
            "trainable_params": adapters.num_params(),
            "layers": adapters.meta.layers,
        });
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| AdapterError::format(path.display().to_string(), e.to_string()))?;
        emit(&(text + "\n"));
        return Ok(());
    }
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {}, {bytes} bytes",
        path.display(),
        file.describe()
    );
    let mut methods: BTreeMap<String, usize> = BTreeMap::new();
    for s in adapters.meta.layers.values() {
        *methods.entry(s.method.to_string()).or_default() += 1;
    }
    let methods: Vec<String> = methods
        .into_iter()
        .map(|(m, n)| format!("{m} × {n}"))
        .collect();
    let _ = writeln!(out, "method: {}", methods.join(", "));
    let _ = writeln!(
        out,
        "{:<48} {:<9} {:>12} {:<30} {:>5} {:>9} {:>9}",
        "layer", "method", "[in → out]", "factors", "rank", "scale", "params"
    );
    for (name, s) in &adapters.meta.layers {
        let factors: Vec<String> = s
            .factors
            .iter()
            .map(|(n, sh)| format!("{n} {}×{}", sh[0], sh[1]))
            .collect();
        let _ = writeln!(
            out,
            "{:<48} {:<9} {:>12} {:<30} {:>5} {:>9.4} {:>9}",
            if name.is_empty() {
                "(single layer)"
            } else {
                name
            },
            s.method.to_string(),
            format!("{} → {}", s.d_in, s.d_out),
            factors.join(", "),
            s.rank().map_or("—".to_string(), |r| r.to_string()),
            s.scale,
            s.num_params()
        );
    }
    let _ = writeln!(out, "trainable parameters: {}", adapters.num_params());
    emit(&out);
    Ok(())
}

/// Writes to stdout; a closed pipe (`kron-adapters inspect … | head`) ends the program quietly
/// instead of panicking.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// A decoder and its tokenizer, with an adapter attached by name when given.
/// A decoder with the adapter attached, its tokenizer if it has one, and a GGUF source's
/// `tokenizer.*` metadata (empty for a folder), for export-gguf to carry.
type Decoder = (
    LlamaForCausalLM<Cpu>,
    Option<TextTokenizer>,
    Vec<(String, GgufValue)>,
);

/// `--base-weights`: `int8` holds the frozen linear weights as 8-bit values, one scale per 32.
fn frozen_scheme(base_weights: &str) -> Option<QuantConfig> {
    (base_weights == "int8").then(|| QuantConfig::new(8, Level::Block(32)).expect("a valid scheme"))
}

fn load_decoder(
    model: &Path,
    adapter: Option<&Path>,
    frozen: Option<QuantConfig>,
    device: &burn::tensor::Device<Cpu>,
) -> Result<Decoder, AdapterError> {
    let t = std::time::Instant::now();
    // A model may come without a tokenizer (export-hf needs none); a GGUF file is read once.
    let (mut m, tok, meta) = if model.is_dir() {
        let tok = model
            .join("tokenizer.json")
            .exists()
            .then(|| TextTokenizer::from_hf_dir(model))
            .transpose()?;
        (
            llama::load_with::<Cpu>(model, &LoadOptions::new().with_frozen(frozen), device)?,
            tok,
            Vec::new(),
        )
    } else {
        let file = GgufFile::read(model)?;
        let shown = model.display().to_string();
        let tok = file
            .get("tokenizer.ggml.model")
            .is_some()
            .then(|| TextTokenizer::from_gguf(&file, &shown))
            .transpose()?;
        (
            llama::from_gguf_with::<Cpu>(
                &file,
                &shown,
                &LoadOptions::new().with_frozen(frozen),
                device,
            )?,
            tok,
            llama::tokenizer_metadata(&file),
        )
    };
    if let Some(t) = &tok {
        t.check_vocab(m.config().vocab_size)?;
    }
    if let Some(path) = adapter {
        let file = read_any(path)?;
        eprintln!("adapter: {} {}", file.describe(), path.display());
        m = attach(m, &file.into_adapters(), &NameMap::new(), device)?;
    }
    eprintln!(
        "loaded {} ({} layers{}) in {:.1} s on {}",
        model.display(),
        m.config().num_hidden_layers,
        if frozen.is_some() {
            ", int8 frozen weights"
        } else {
            ""
        },
        t.elapsed().as_secs_f64(),
        common::backend_name()
    );
    Ok((m, tok, meta))
}

fn generate(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    cfg: &GenerateConfig,
    chat: bool,
    frozen: Option<QuantConfig>,
) -> Result<(), AdapterError> {
    let device = Default::default();
    let (m, tok, _) = load_decoder(model, adapter, frozen, &device)?;
    let tok = tok.ok_or_else(|| no_tokenizer(model))?;
    let text = if chat {
        tok.chat_prompt(prompt)?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text, true)?;
    let t = std::time::Instant::now();
    let mut out: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let result = llm::generate(&m, &ids, cfg, &tok.eos, &device, |next| {
        out.push(next);
        // Print the text's new part: decoding the whole continuation keeps multi-byte
        // characters split across tokens whole.
        if let Ok(text) = tok.decode(&out, true) {
            if text.len() > shown.len() && text.starts_with(&shown) && !text.ends_with('\u{fffd}') {
                emit_partial(&text[shown.len()..]);
                shown = text;
            }
        }
    })?;
    let text = tok.decode(&result, true)?;
    if text.starts_with(&shown) {
        emit_partial(&text[shown.len()..]);
    }
    emit("\n");
    eprintln!(
        "{} prompt tokens, {} new tokens in {:.2} s ({:.1} tokens/s)",
        ids.len(),
        result.len(),
        t.elapsed().as_secs_f64(),
        result.len() as f64 / t.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &Path,
    adapter: Option<&Path>,
    task: TaskKind,
    split: Split,
    limit: Option<usize>,
    data: Option<PathBuf>,
    max_len: usize,
    batch_tokens: usize,
    frozen: Option<QuantConfig>,
) -> Result<(), AdapterError> {
    let dir = match data {
        Some(d) => d,
        None => AssetCache::default().olmo_tasks(&|m| eprintln!("{m}"))?,
    };
    let mut questions = llm::tasks::load(&dir, task, split)?;
    if let Some(n) = limit {
        questions.truncate(n);
    }
    let device = Default::default();
    let (m, tok, _) = load_decoder(model, adapter, frozen, &device)?;
    let tok = tok.ok_or_else(|| no_tokenizer(model))?;
    let t = std::time::Instant::now();
    let r = llm::evaluate(&m, &tok, &questions, max_len, batch_tokens, &device)?;
    eprintln!(
        "{} {}: {} questions in {:.1} s",
        task.name(),
        split.name(),
        r.n,
        t.elapsed().as_secs_f64()
    );
    let line = serde_json::json!({
        "task": task.name(),
        "split": split.name(),
        "n": r.n,
        "acc": r.acc,
        "acc_norm": r.acc_norm,
    });
    emit(&format!("{line}\n"));
    Ok(())
}

/// Writes a piece of output at once (no newline), quietly ending on a closed pipe.
fn emit_partial(text: &str) {
    emit(text)
}

fn no_tokenizer(model: &Path) -> AdapterError {
    AdapterError::Unsupported {
        option: "tokenizer".into(),
        message: format!(
            "{}: the model has no tokenizer (no tokenizer.json, or no tokenizer.ggml metadata); \
             this command needs one",
            model.display()
        ),
    }
}
