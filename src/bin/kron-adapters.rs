//! `kron-adapters`: inspect, merge, convert and quantize adapters — Hugging Face PEFT folders (LoRA,
//! LoKr) and this crate's adapter files — without writing Rust.
//!
//! Exit codes: 0 success; 1 I/O error (missing file, output exists without `--force`);
//! 2 usage error; 3 malformed input (bad JSON or safetensors, missing or inconsistent tensors);
//! 4 valid input this tool does not support (DoRA, conv layers, shapes PEFT cannot express);
//! 5 inputs that do not fit together (adapter vs base checkpoint) or a merge that would produce
//! NaN/Inf. Outputs are written to a temporary file and renamed: a failure leaves none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kron_adapters::checkpoint::{write_atomic, HostTensor, NativeAdapters};
use kron_adapters::peft::{write_peft_dir, NameMap, PeftAdapter};
use kron_adapters::quant::{Level, QuantConfig, QuantizedAdapters};
use kron_adapters::{Adapter, AdapterError, LinearAdapter};

#[cfg(feature = "flex")]
type Cpu = burn::backend::Flex;
#[cfg(not(feature = "flex"))]
type Cpu = burn::backend::NdArray;

#[derive(Parser)]
#[command(
    name = "kron-adapters",
    version,
    about = "Inspect, merge and convert PEFT and kron-adapters adapters"
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
        /// The base checkpoint (safetensors, PyTorch names and layout).
        #[arg(long)]
        base: PathBuf,
        /// A PEFT folder or an adapter file.
        #[arg(long)]
        adapter: PathBuf,
        /// The merged checkpoint to write.
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
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &AdapterError) -> u8 {
    match e {
        AdapterError::Io { .. } => 1,
        AdapterError::Unsupported { .. } => 4,
        AdapterError::Incompatible { .. } | AdapterError::NonFinite { .. } => 5,
        _ => 3,
    }
}

fn run(cmd: Cmd) -> Result<(), AdapterError> {
    match cmd {
        Cmd::Inspect { path, json } => inspect(&path, json),
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
            merge(&base, &adapter, &out, &map, force)
        }
        Cmd::Quantize {
            bits,
            level,
            input,
            output,
            force,
        } => {
            let config = QuantConfig::new(bits, level.parse::<Level>()?)?;
            refuse_existing(&output, force)?;
            let (adapters, _) = load_any(&input)?;
            let q = QuantizedAdapters::quantize(&adapters, config)?;
            let size = q.write(&output)?;
            let f32_size = adapters.to_bytes().len();
            eprintln!(
                "wrote {} ({config}): {size} bytes, {:.1}% of the {f32_size}-byte float32 adapter file",
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
                    refuse_existing(&output, force)?;
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

/// Reads a PEFT folder or an adapter file; says which.
fn load_any(path: &Path) -> Result<(NativeAdapters, String), AdapterError> {
    if path.is_dir() {
        let peft = PeftAdapter::read_dir(path)?;
        let kind = format!("PEFT {} folder", peft.config.peft_type);
        Ok((peft.adapters, kind))
    } else {
        let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
        let shown = path.display().to_string();
        if kron_adapters::quant::is_quantized(&bytes) {
            let q = QuantizedAdapters::from_bytes(&shown, &bytes)?;
            let kind = format!("kron-adapters quantized adapter file ({})", q.config);
            Ok((q.dequantize(), kind))
        } else {
            Ok((
                NativeAdapters::from_bytes(&shown, &bytes)?,
                "kron-adapters adapter file".into(),
            ))
        }
    }
}

fn size_of(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

fn inspect(path: &Path, json: bool) -> Result<(), AdapterError> {
    let (adapters, kind) = load_any(path)?;
    let bytes = size_of(path);
    if json {
        let value = serde_json::json!({
            "path": path,
            "kind": kind,
            "bytes": bytes,
            "trainable_params": adapters.num_params(),
            "layers": adapters.meta.layers,
        });
        emit(&(serde_json::to_string_pretty(&value).expect("JSON") + "\n"));
        return Ok(());
    }
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: {kind}, {bytes} bytes", path.display());
    let mut methods: HashMap<String, usize> = HashMap::new();
    for s in adapters.meta.layers.values() {
        *methods.entry(s.method.to_string()).or_default() += 1;
    }
    let mut methods: Vec<_> = methods
        .into_iter()
        .map(|(m, n)| format!("{m} × {n}"))
        .collect();
    methods.sort();
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

fn refuse_existing(out: &Path, force: bool) -> Result<(), AdapterError> {
    if out.exists() && !force {
        return Err(AdapterError::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists (use --force to replace it)",
            ),
        ));
    }
    Ok(())
}

fn merge(
    base: &Path,
    adapter: &Path,
    out: &Path,
    map: &NameMap,
    force: bool,
) -> Result<(), AdapterError> {
    refuse_existing(out, force)?;
    let (adapters, kind) = load_any(adapter)?;
    let base_bytes = std::fs::read(base).map_err(|e| AdapterError::io(base, e))?;
    let shown = base.display().to_string();
    let st =
        safetensors::SafeTensors::deserialize(&base_bytes).map_err(|e| AdapterError::Format {
            path: shown.clone(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&base_bytes).map_err(|e| AdapterError::Format {
            path: shown.clone(),
            message: e.to_string(),
        })?;
    let device = Default::default();
    // New bytes for every adapted weight.
    let mut replaced: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, spec) in &adapters.meta.layers {
        let key = format!("{}.weight", map.apply(name));
        let view = st.tensor(&key).map_err(|_| AdapterError::Incompatible {
            message: format!(
                "the adapter's layer `{name}` needs `{key}` in {shown}, which has no such tensor \
                 (rename modules with --map FROM=TO)"
            ),
        })?;
        if view.shape() != [spec.d_out, spec.d_in] {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "`{key}` is {:?} in {shown} but the adapter is for a [{}, {}] ([out, in]) weight",
                    view.shape(),
                    spec.d_out,
                    spec.d_in
                ),
            });
        }
        let w = HostTensor::from_view(&view).ok_or_else(|| AdapterError::Unsupported {
            option: "dtype".into(),
            message: format!(
                "`{key}` is {:?}; F32, F16 and BF16 weights can be merged",
                view.dtype()
            ),
        })?;
        let adapter: Adapter<Cpu> = adapters.adapter(name, &device)?;
        // ΔW in Burn layout [in, out]; the base is PyTorch [out, in].
        let dw = HostTensor::from_tensor(adapter.delta_weight()).transposed();
        let merged: Vec<f32> = w.data.iter().zip(&dw.data).map(|(a, b)| a + b).collect();
        let bad = merged.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(AdapterError::NonFinite {
                layer: name.clone(),
                count: bad,
            });
        }
        replaced.insert(key, encode(&merged, view.dtype()));
    }
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
        .iter()
        .map(|n| {
            let v = st.tensor(n).expect("listed");
            let data: &[u8] = replaced.get(n).map(|b| b.as_slice()).unwrap_or(v.data());
            let view = safetensors::tensor::TensorView::new(v.dtype(), v.shape().to_vec(), data)
                .expect("same shape and dtype");
            (n.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, header.metadata().clone()).map_err(|e| {
        AdapterError::Format {
            path: out.display().to_string(),
            message: e.to_string(),
        }
    })?;
    write_atomic(out, &bytes)?;
    eprintln!(
        "merged {} layer(s) of the {kind} {} into {} → {}",
        replaced.len(),
        adapter.display(),
        base.display(),
        out.display()
    );
    Ok(())
}

/// f32 values as little-endian bytes of `dtype` (F32, F16 or BF16; rounded to nearest).
fn encode(values: &[f32], dtype: safetensors::Dtype) -> Vec<u8> {
    match dtype {
        safetensors::Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
