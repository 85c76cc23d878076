//! Benchmarks: adapters alone, a training step of the MiniLM encoder per method, and inference.
//! Prints markdown tables of medians and of ratios measured in the same run (absolute times on
//! a shared machine are noisy; ratios within one run are not).
//!
//! ```text
//! cargo bench --features full --bench adapters               # everything (~13 min on 2 CPU cores)
//! cargo bench --features full --bench adapters -- --quick    # smaller sizes (~3 min)
//! cargo bench --features full --bench adapters -- --width 4096,14336   # one width's adapters alone
//! cargo bench --features full --bench adapters -- --inference          # the inference table alone (~5 min)
//! cargo bench --features full,wgpu --bench adapters          # the same on a GPU
//! cargo bench --features full,wgpu --bench adapters -- --fused-kernel   # with kron::cube's kernel
//! ```
//!
//! The adapters-alone table covers square widths and two LLM layers (SmolLM2-135M's FFN,
//! 576 → 1536, and Mistral-7B's, 4096 → 14336); its peak-memory column runs each variant's
//! forward + backward in a child process of this program (`--child`), so that the process's peak
//! resident memory is that variant's alone. The Kronecker variants' default order and Kron-LoRA
//! also run with Burn's own differentiation of the `a` contraction ("Burn's backward") beside
//! the crate's hand-written one (`kron::autodiff`, what the training loops use).
//!
//! The encoder is all-MiniLM-L6-v2's architecture with random weights (no download needed):
//! the cost of a step does not depend on the weights' values. Tables also go to
//! `target/bench/adapters.md`, and a chart of the step times to `target/bench/steps.png`.

#[path = "../examples/common/mod.rs"]
mod common;

use burn::module::AutodiffModule;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use common::{backend_name, Inner, Train};
use kron_adapters::block::{
    BlockAdapterConfig, CompacterConfig, HoulsbyConfig, KronABConfig, ParallelAdapterConfig,
    Residual,
};
use kron_adapters::finetune::timing::{inference_ms, memory_bytes, train_step_ms};
use kron_adapters::kron::autodiff::{register_backward, unregister_backward};
use kron_adapters::kron::kron;
use kron_adapters::model::{BertClassifier, BertConfig, TensorSource};
use kron_adapters::{
    Adapter, AdapterConfig, ContractionOrder, KronAConfig, KronLoraConfig, LinearAdapter,
    LoraConfig, PlacementConfig, TrainMode,
};

fn time<F: FnMut()>(f: F, warmup: usize, budget: f64) -> f64 {
    kron_adapters::finetune::timing::median_ms(f, warmup, budget)
}

fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.into_data();
}

struct Row {
    name: String,
    params: usize,
    macs: u64,
    fwd: f64,
    fwd_bwd: f64,
    /// Peak resident memory of a process running this variant's forward + backward, above
    /// what it held before building the variant, MB.
    peak_mb: f64,
}

/// One adapter variant: its name and a builder on any backend.
type Build<B> = Box<dyn Fn(&burn::tensor::Device<B>) -> Adapter<B>>;

/// The KronA factor shapes PEFT's LoKr picks for a `d_in × d_out` layer (Burn layout):
/// `a` `[in_m, out_l]`, `b` `[in_n, out_k]`.
fn peft_shapes(d_in: usize, d_out: usize) -> ([usize; 2], [usize; 2]) {
    let (im, inn) = kron_adapters::adapter::shape::peft_factorization(d_in, -1);
    let (ol, ok) = kron_adapters::adapter::shape::peft_factorization(d_out, -1);
    ([im, ol], [inn, ok])
}

/// The adapter variants timed at width `d_in × d_out`: LoRA at KronA's budget, KronA with each
/// contraction order (and with `a` `(2, d/2)` for square layers), Kron-LoRA r = 2.
fn variants<B: Backend>(d_in: usize, d_out: usize) -> Vec<(String, Build<B>)> {
    let krona = |a: Option<[usize; 2]>, order: ContractionOrder| -> Build<B> {
        Box::new(move |dev: &B::Device| {
            let mut c = KronAConfig::auto()
                .with_order(order)
                .with_init(kron_adapters::FactorInit::Normal);
            c.a_shape = a;
            AdapterConfig::KronA(c).init::<B>(d_in, d_out, dev).unwrap()
        })
    };
    let (a, b) = peft_shapes(d_in, d_out);
    let lora_rank = (a[0] * a[1] + b[0] * b[1]).div_ceil(d_in + d_out).max(1);
    let kl_rank = 2;
    let shown = if a[0] == a[1] {
        format!("({},{})", a[0], a[1])
    } else {
        format!("[{},{}]", a[0], a[1])
    };
    let mut v = vec![
        (
            format!("LoRA r={lora_rank}"),
            Box::new(move |dev: &B::Device| {
                AdapterConfig::Lora(
                    LoraConfig::new(lora_rank).with_init(kron_adapters::FactorInit::Normal),
                )
                .init::<B>(d_in, d_out, dev)
                .unwrap()
            }) as Build<B>,
        ),
        (
            format!("KronA a {shown} auto"),
            krona(None, ContractionOrder::Auto),
        ),
        (
            format!("KronA a {shown} a first"),
            krona(None, ContractionOrder::AFirst),
        ),
        (
            format!("KronA a {shown} a last"),
            krona(None, ContractionOrder::ALast),
        ),
    ];
    if d_in == d_out {
        v.push((
            format!("KronA a (2,{})", d_in / 2),
            krona(Some([2, d_in / 2]), ContractionOrder::Auto),
        ));
    }
    v.push((
        format!("Kron-LoRA r={kl_rank}"),
        Box::new(move |dev: &B::Device| {
            AdapterConfig::KronLora(
                KronLoraConfig::auto(kl_rank).with_init(kron_adapters::FactorInit::Normal),
            )
            .init::<B>(d_in, d_out, dev)
            .unwrap()
        }),
    ));
    v
}

/// What one timed variant runs: an adapter (with the crate's backward of the `a` contraction,
/// or with Burn's differentiation of it when `burn_backward`), PEFT's materialized `a ⊗ b`, or
/// a dense layer.
#[derive(Clone, Copy)]
enum Variant {
    Adapter { index: usize, burn_backward: bool },
    Materialized,
    Dense,
}

impl Variant {
    fn arg(self) -> String {
        match self {
            Variant::Adapter {
                index,
                burn_backward,
            } => format!("{index}{}", if burn_backward { ":burn" } else { "" }),
            Variant::Materialized => "materialized".into(),
            Variant::Dense => "dense".into(),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "materialized" => Some(Variant::Materialized),
            "dense" => Some(Variant::Dense),
            v => {
                let (index, burn_backward) = match v.strip_suffix(":burn") {
                    Some(i) => (i, true),
                    None => (v, false),
                };
                index.parse().ok().map(|index| Variant::Adapter {
                    index,
                    burn_backward,
                })
            }
        }
    }
}

/// Forward and forward + backward of one variant, median ms: the closures the table times,
/// and what a `--child` process runs for the peak memory.
fn time_variant(d_in: usize, d_out: usize, tokens: usize, v: Variant, budget: f64) -> (f64, f64) {
    let dev = Default::default();
    let x_inner = Tensor::<Inner, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &dev);
    let x = Tensor::<Train, 2>::from_inner(x_inner.clone()).require_grad();
    match v {
        Variant::Adapter {
            index,
            burn_backward,
        } => {
            if burn_backward {
                unregister_backward::<Train>();
            } else {
                register_backward::<Train>();
            }
            let adapter = (variants::<Train>(d_in, d_out).swap_remove(index).1)(&dev);
            let inner = adapter.valid();
            let fwd = time(|| sync(inner.apply(x_inner.clone())), 2, budget);
            let fwd_bwd = time(
                || {
                    let g = adapter.apply(x.clone()).sum().backward();
                    let _ = x.grad(&g).map(sync);
                },
                2,
                budget,
            );
            (fwd, fwd_bwd)
        }
        Variant::Materialized => {
            let (sa, sb) = peft_shapes(d_in, d_out);
            let a =
                Tensor::<Train, 2>::random(sa, Distribution::Normal(0.0, 0.1), &dev).require_grad();
            let b =
                Tensor::<Train, 2>::random(sb, Distribution::Normal(0.0, 0.1), &dev).require_grad();
            let fwd = time(
                || {
                    sync(
                        x_inner
                            .clone()
                            .matmul(kron(a.clone().inner(), b.clone().inner())),
                    )
                },
                2,
                budget,
            );
            let fwd_bwd = time(
                || {
                    let g = x
                        .clone()
                        .matmul(kron(a.clone(), b.clone()))
                        .sum()
                        .backward();
                    let _ = a.grad(&g).map(sync);
                },
                2,
                budget,
            );
            (fwd, fwd_bwd)
        }
        Variant::Dense => {
            let w =
                Tensor::<Train, 2>::random([d_in, d_out], Distribution::Normal(0.0, 0.05), &dev)
                    .require_grad();
            let fwd = time(
                || sync(x_inner.clone().matmul(w.clone().inner())),
                2,
                budget,
            );
            let fwd_bwd = time(
                || {
                    let g = x.clone().matmul(w.clone()).sum().backward();
                    let _ = w.grad(&g).map(sync);
                },
                2,
                budget,
            );
            (fwd, fwd_bwd)
        }
    }
}

/// Runs `--child D_IN D_OUT TOKENS VARIANT`: one variant's forward + backward, a few times,
/// and prints the peak resident memory above the start, MB.
fn child(args: &[String]) -> Option<()> {
    let [d_in, d_out, tokens] = [0, 1, 2].map(|i| args.get(i).and_then(|v| v.parse().ok()));
    let v = Variant::parse(args.get(3)?)?;
    let start = memory_bytes()?.0;
    let _ = time_variant(d_in?, d_out?, tokens?, v, 0.0);
    let peak = memory_bytes()?.1;
    println!("{}", peak.saturating_sub(start) as f64 / 1048576.0);
    Some(())
}

/// `--fused-kernel`: the Kronecker apply through the fused CubeCL kernel (`kron::cube`; GPU
/// backends without `fusion`), in the children too.
fn fused_kernel() -> bool {
    std::env::args().any(|a| a == "--fused-kernel")
}

/// The peak memory of `v` measured in a child process, MB (NaN if it could not be measured).
fn child_peak_mb(d_in: usize, d_out: usize, tokens: usize, v: Variant) -> f64 {
    let run = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args(["--child", &d_in.to_string(), &d_out.to_string()])
            .args([tokens.to_string(), v.arg()])
            .args(fused_kernel().then_some("--fused-kernel"))
            .output()
    });
    run.ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn adapter_macs(a: &Adapter<Inner>) -> u64 {
    match a {
        Adapter::Lora(l) => (l.rank() * (l.d_in() + l.d_out())) as u64,
        Adapter::KronA(k) => k.plan.cost(&[k.a.dims()], &[k.b.dims()]),
        Adapter::KronLora(k) => k.plan.cost(&[k.a.dims()], &[k.b1.dims(), k.b2.dims()]),
    }
}

fn adapter_table(widths: &[(usize, usize)], tokens: usize, budget: f64) -> String {
    let dev = Default::default();
    let mut out = format!(
        "### Adapters alone, {tokens} tokens\n\nForward `x·ΔW` and forward + backward (gradients of the factors and of `x`), median ms; \
         peak MB: the peak resident memory of a process running that forward + backward alone, above what it held before. \
         `materialized` is PEFT's approach: build `ΔW = a ⊗ b` (`d_in × d_out`) every call, then `x·ΔW`. `dense` is a full `d_in × d_out` weight \
         (forward; forward + backward with its weight gradient, as full fine-tuning).\n\n"
    );
    for &(d_in, d_out) in widths {
        let title = if d_in == d_out {
            format!("d = {d_in}")
        } else {
            format!("{d_in} → {d_out}")
        };
        out += &format!("**{title}**\n\n| adapter | params | MACs/token | fwd ms | fwd+bwd ms | fwd+bwd vs LoRA | peak MB | peak vs LoRA |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let mut rows = Vec::new();
        let (sa, sb) = peft_shapes(d_in, d_out);
        let mut timed: Vec<(String, usize, u64, Variant)> = Vec::new();
        for (index, (name, build)) in variants::<Inner>(d_in, d_out).into_iter().enumerate() {
            let inner = build(&dev);
            let (params, macs) = (inner.spec().num_params(), adapter_macs(&inner));
            // The Kronecker variants' default order and Kron-LoRA again with Burn's own
            // differentiation of the `a` contraction, for the hand-written backward's gain.
            let again = name.ends_with(" auto") || name.starts_with("Kron-LoRA");
            let variant = |burn_backward| Variant::Adapter {
                index,
                burn_backward,
            };
            if again {
                timed.push((
                    format!("{name}, Burn's backward"),
                    params,
                    macs,
                    variant(true),
                ));
            }
            timed.push((name, params, macs, variant(false)));
        }
        timed.push((
            format!("materialized a ⊗ b [{},{}]", sa[0], sa[1]),
            sa[0] * sa[1] + sb[0] * sb[1],
            (d_in * d_out) as u64,
            Variant::Materialized,
        ));
        timed.push((
            "dense d_in × d_out".into(),
            d_in * d_out,
            (d_in * d_out) as u64,
            Variant::Dense,
        ));
        for (name, params, macs, v) in timed {
            let (fwd, fwd_bwd) = time_variant(d_in, d_out, tokens, v, budget);
            rows.push(Row {
                name,
                params,
                macs,
                fwd,
                fwd_bwd,
                peak_mb: child_peak_mb(d_in, d_out, tokens, v),
            });
        }
        let (lora, lora_mb) = (rows[0].fwd_bwd, rows[0].peak_mb);
        for r in &rows {
            out += &format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.1} | {:.2} |\n",
                r.name,
                r.params,
                r.macs,
                r.fwd,
                r.fwd_bwd,
                r.fwd_bwd / lora,
                r.peak_mb,
                r.peak_mb / lora_mb
            );
        }
        out += "\n";
        eprintln!("adapters {title} done");
    }
    out
}

fn methods() -> Vec<(&'static str, PlacementConfig)> {
    let lin = PlacementConfig::linear;
    let blk = PlacementConfig::block;
    vec![
        ("full fine-tuning", PlacementConfig::mode(TrainMode::Full)),
        ("frozen encoder (head only)", PlacementConfig::default()),
        ("BitFit", PlacementConfig::mode(TrainMode::BitFit)),
        ("LoRA r=1", lin(AdapterConfig::Lora(LoraConfig::new(1)))),
        (
            "KronA a (16,16) (auto, PEFT shapes)",
            lin(AdapterConfig::KronA(KronAConfig::auto())),
        ),
        (
            "KronA a (2,192)",
            lin(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([2, 192]),
            )),
        ),
        (
            "KronA a (48,8)",
            lin(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([48, 8]),
            )),
        ),
        (
            "Kron-LoRA r=12",
            lin(AdapterConfig::KronLora(KronLoraConfig::auto(12))),
        ),
        (
            "PA r=8",
            blk(BlockAdapterConfig::ParallelAdapter(
                ParallelAdapterConfig::new(8),
            )),
        ),
        (
            "Adapter (bottleneck 8)",
            blk(BlockAdapterConfig::Adapter(
                HoulsbyConfig::new().with_bottleneck(8),
            )),
        ),
        (
            "Compacter",
            blk(BlockAdapterConfig::Compacter(
                CompacterConfig::new().with_reduction_factor(16),
            )),
        ),
        (
            "KronA^B",
            blk(BlockAdapterConfig::KronAB(
                KronABConfig::auto().with_budget(6200),
            )),
        ),
        (
            "KronA^B_res",
            blk(BlockAdapterConfig::KronAB(
                KronABConfig::auto()
                    .with_budget(6200)
                    .with_residual(Residual::Learned),
            )),
        ),
    ]
}

fn step_table(b: usize, t: usize, budget: f64) -> (String, Vec<(String, f64)>) {
    let dev = Default::default();
    let cfg = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::minilm_l6()
    };
    let parts = kron_adapters::shards::default_parts::<Train>(&dev);
    let mut rows = Vec::new();
    for (name, peft) in methods() {
        let (ms, trainable) =
            train_step_ms::<Train>(&cfg, &peft, b, t, parts, budget, &dev).unwrap();
        eprintln!("step {name}: {ms:.0} ms");
        rows.push((name.to_string(), trainable, ms));
    }
    let full = rows[0].2;
    let lora = rows
        .iter()
        .find(|r| r.0.starts_with("LoRA"))
        .map(|r| r.2)
        .unwrap_or(f64::NAN);
    let mut out = format!(
        "### One training step of the MiniLM encoder, batch {b} × {t} tokens\n\nForward, backward and AdamW step, median ms; dropout off.\n\n| method | trainable params | ms per step | vs full fine-tuning | vs LoRA |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for (name, p, ms) in &rows {
        out += &format!(
            "| {name} | {p} | {ms:.0} | {:.2} | {:.2} |\n",
            ms / full,
            ms / lora
        );
    }
    (
        out + "\n",
        rows.into_iter().map(|(n, _, ms)| (n, ms)).collect(),
    )
}

/// The inference table's batches: one sequence of 10 tokens, and 32 of 64 in one part and in
/// flex's default two.
const INFERENCE_SHAPES: &[(usize, usize, usize)] = &[(1, 10, 1), (32, 64, 1), (32, 64, 2)];

/// Rounds of the inference table: in each, every method's unmerged and merged model is timed
/// right after the base, so that each ratio compares times taken minutes apart at most (the
/// machine's speed drifts more than that over a whole table); the table shows each figure's
/// median over the rounds.
const INFERENCE_ROUNDS: usize = 3;

/// `shapes`: batch, tokens per sequence, and parts of the batch computed at once
/// (`shards::forward`).
fn inference_table(shapes: &[(usize, usize, usize)], budget: f64) -> String {
    let dev = Default::default();
    let cfg = BertConfig::minilm_l6();
    let mut out = format!(
        "### Inference: the base encoder, merged and unmerged adapters\n\nForward of the classifier on the inference backend, median ms; merged = linear adapters folded into the weights; parts = parts of the batch computed at once (`shards::forward`). Medians of {INFERENCE_ROUNDS} rounds, each timing the base right before every method's unmerged and merged model (the ratios are the medians of each round's ratios).\n\n| method | tokens | parts | base ms | unmerged ms | merged ms | unmerged vs base | merged vs base |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let ms = |m: &BertClassifier<Inner>, b, t, parts| {
        inference_ms(m, cfg.vocab_size, b, t, parts, budget, &dev).expect("valid parts")
    };
    let model = |peft: &PlacementConfig| {
        BertClassifier::<Inner>::new(&mut TensorSource::random(2), &cfg, peft, 2, &dev).unwrap()
    };
    let base = model(&PlacementConfig::default());
    let methods = [
        (
            "LoRA r=1",
            PlacementConfig::linear(AdapterConfig::Lora(LoraConfig::new(1))),
        ),
        (
            "KronA a (16,16)",
            PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto())),
        ),
        (
            "KronA a (2,192)",
            PlacementConfig::linear(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([2, 192]),
            )),
        ),
        (
            "KronA a (48,8)",
            PlacementConfig::linear(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([48, 8]),
            )),
        ),
    ];
    let models: Vec<_> = (methods.iter())
        .map(|(name, peft)| {
            let m = model(peft);
            let mut merged = m.clone();
            merged.encoder = merged.encoder.merge().unwrap();
            (*name, m, merged)
        })
        .collect();
    let median = |v: Vec<f64>| kron_adapters::finetune::timing::median(&v);
    for &(b, t, parts) in shapes {
        // Per method: base, unmerged and merged ms of each round.
        let mut times = vec![Vec::new(); models.len()];
        for _ in 0..INFERENCE_ROUNDS {
            for ((_, m, merged), times) in models.iter().zip(&mut times) {
                let base_ms = ms(&base, b, t, parts);
                times.push([base_ms, ms(m, b, t, parts), ms(merged, b, t, parts)]);
            }
        }
        for ((name, _, _), times) in models.iter().zip(times) {
            let col = |i: usize| median(times.iter().map(|r| r[i]).collect());
            let ratio = |i: usize| median(times.iter().map(|r| r[i] / r[0]).collect());
            out += &format!(
                "| {name} | {b} × {t} | {parts} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                col(0),
                col(1),
                col(2),
                ratio(1),
                ratio(2)
            );
        }
        eprintln!("inference {b} × {t} in {parts} part(s) done");
    }
    out + "\n"
}

fn plot(path: &std::path::Path, rows: &[(String, f64)]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    for font in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(font) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "font")?;
            break;
        }
    }
    let full = rows[0].1;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "training step time relative to full fine-tuning ({})",
                backend_name()
            ),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..1.25, (0..rows.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() + 1)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("step time / full fine-tuning")
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, ms))| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (ms / full, SegmentValue::Exact(i + 1)),
            ],
            BLUE.mix(0.6).filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, ms))| {
        Text::new(
            format!("{ms:.0} ms"),
            (ms / full + 0.01, SegmentValue::CenterOf(i)),
            ("sans-serif", 13),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn main() {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    if fused_kernel() && !common::register_fused_kernel() {
        eprintln!("--fused-kernel: only on the GPU backends without `fusion`");
        std::process::exit(2);
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        if child(&args[i + 1..]).is_none() {
            std::process::exit(2);
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    // As the crate's training loops do (the adapter table switches it per variant).
    register_backward::<Train>();
    // `--width D_IN,D_OUT`: the adapters-alone table at that width only (2,048 tokens).
    if let Some(w) = args.iter().position(|a| a == "--width") {
        let width = args.get(w + 1).and_then(|v| {
            let (a, b) = v.split_once(',')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
        match width {
            Some(width) => println!("{}", adapter_table(&[width], 2048, 2.0)),
            None => {
                eprintln!("--width takes D_IN,D_OUT, e.g. 4096,14336");
                std::process::exit(2);
            }
        }
        return;
    }
    let budget = if quick { 0.5 } else { 2.0 };
    // `--inference`: the inference table alone.
    if args.iter().any(|a| a == "--inference") {
        println!("{}", inference_table(INFERENCE_SHAPES, budget));
        return;
    }
    let mut md = format!(
        "## {} ({})\n\n",
        backend_name(),
        if quick { "--quick" } else { "full" }
    );
    let widths: &[(usize, usize)] = if quick {
        &[(384, 384), (576, 1536)]
    } else {
        &[
            (384, 384),
            (768, 768),
            (1024, 1024),
            (4096, 4096),
            (576, 1536),
            (4096, 14336),
        ]
    };
    md += &adapter_table(widths, if quick { 512 } else { 2048 }, budget);
    let (steps, rows) = step_table(32, if quick { 32 } else { 64 }, budget * 2.0);
    md += &steps;
    md += &inference_table(
        if quick {
            &INFERENCE_SHAPES[..1]
        } else {
            INFERENCE_SHAPES
        },
        budget,
    );
    println!("{md}");
    let dir = std::path::Path::new("target/bench");
    std::fs::create_dir_all(dir).ok();
    std::fs::write(dir.join("adapters.md"), &md).ok();
    if let Err(e) = plot(&dir.join("steps.png"), &rows) {
        eprintln!("no plot: {e}");
    }
}
