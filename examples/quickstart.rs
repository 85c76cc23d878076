//! Quickstart: wrap a "pretrained" Linear with a KronA adapter, train it on a task whose true
//! update is a Kronecker product, merge, and save and reload the adapter.
//!
//! ```text
//! cargo run --example quickstart                    # CPU
//! cargo run --example quickstart --features wgpu    # any GPU through wgpu
//! ```

mod common;

use burn::module::{AutodiffModule, Module};
use burn::nn::LinearConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use common::{backend_name, Train};
use kron_adapters::kron::kron;
use kron_adapters::{
    load_adapters, save_adapters, AdaptedLinear, AdapterConfig, KronAConfig, LinearAdapter,
};

const D: usize = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    Train::seed(&device, 42);
    println!("kron-adapters quickstart on {}", backend_name());

    // A "pretrained" layer, and the update the task needs: ΔW* = a* ⊗ b*, a*, b* [16, 16].
    let base = LinearConfig::new(D, D).init::<Train>(&device);
    let a_true = Tensor::<Train, 2>::random([16, 16], Distribution::Normal(0.0, 0.3), &device);
    let b_true = Tensor::<Train, 2>::random([16, 16], Distribution::Normal(0.0, 0.3), &device);
    let dw_true = kron(a_true, b_true);
    let x = Tensor::<Train, 2>::random([1024, D], Distribution::Normal(0.0, 1.0), &device);
    let y = (base.forward(x.clone()) + x.clone().matmul(dw_true.clone())).detach();

    // The adapter: KronA with the same factor shapes; the base is frozen.
    let cfg = AdapterConfig::KronA(KronAConfig::new([16, 16], [16, 16]));
    let mut layer = AdaptedLinear::new(base.clone(), &cfg, &device)?;
    println!("parameters: {}", layer.param_counts());

    let mut optim = kron_adapters::optim::adamw(&AdamWConfig::new());
    let batch = 128;
    for step in 0..=300 {
        let i = (step * batch) % 1024;
        let (xb, yb) = (x.clone().slice(i..i + batch), y.clone().slice(i..i + batch));
        let loss = (layer.forward(xb) - yb).powf_scalar(2.0).mean();
        if step % 50 == 0 {
            println!(
                "step {step:>3}  loss {:.3e}",
                loss.clone().into_scalar().elem::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(2e-2, layer, grads);
    }
    let err = (layer.delta_weight() - dw_true.clone())
        .powf_scalar(2.0)
        .sum()
        .sqrt()
        / dw_true.powf_scalar(2.0).sum().sqrt();
    println!(
        "‖ΔW − ΔW*‖ / ‖ΔW*‖ = {:.2e}",
        err.into_scalar().elem::<f32>()
    );

    // Merge: a plain Linear with W + ΔW, the base model's inference cost.
    let merged = layer.merge()?;
    let probe = x.clone().slice(0..8);
    let diff = (merged.forward(probe.clone()) - layer.forward(probe.clone()))
        .abs()
        .max();
    println!(
        "merged vs unmerged max |Δy| = {:.2e}",
        diff.into_scalar().elem::<f32>()
    );

    // Save the adapter alone, reload it into a fresh model built from the same base.
    let dir = std::env::temp_dir().join("kron-adapters-quickstart");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("adapter.safetensors");
    let bytes = save_adapters(&layer, &path)?;
    println!(
        "adapter file {} : {bytes} bytes (the base layer alone is {} bytes of f32)",
        path.display(),
        base.num_params() * 4
    );
    let fresh = AdaptedLinear::new(base, &cfg, &device)?;
    let reloaded = load_adapters(fresh, &path)?;
    let same = reloaded.valid().forward(probe.clone().inner()).into_data()
        == layer.valid().forward(probe.inner()).into_data();
    println!("reloaded adapter reproduces the outputs exactly: {same}");
    assert!(same);
    let _ = reloaded.adapter.as_ref().map(|a| a.d_in());
    Ok(())
}
