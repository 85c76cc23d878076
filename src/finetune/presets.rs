//! The methods of the main job and of the method comparison, each once: its key (the
//! `--method` value), its paper name, its placement at about 40k trainable parameters on
//! all-MiniLM-L6-v2, the learning rates the comparison tries on dev, and the one it chose
//! (docs/results.md), which the main job uses.

use crate::adapter::{AdapterConfig, KronAConfig, KronLoraConfig, LoraConfig, Method};
use crate::block::{
    BlockAdapterConfig, CompacterConfig, HoulsbyConfig, KronABConfig, ParallelAdapterConfig,
    Residual,
};
use crate::error::ConfigError;
use crate::place::PlacementConfig;
use crate::training::TrainMode;

/// One method of the comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// The key (`krona`, `kron-lora`, `krona-b-res`, ...).
    pub key: &'static str,
    /// The name in tables (the paper's, with the size).
    pub name: &'static str,
    /// Where its adapters go and what trains.
    pub placement: PlacementConfig,
    /// Learning rates the comparison tries on dev.
    pub lrs: &'static [f64],
    /// The learning rate chosen on dev (the main job's).
    pub lr: f64,
}

/// The linear method's setup at the comparison's budget (~40k parameters on MiniLM).
fn linear(method: Method) -> (AdapterConfig, &'static str) {
    match method {
        Method::Lora => (AdapterConfig::Lora(LoraConfig::new(1)), "LoRA (r = 1)"),
        Method::KronA => (AdapterConfig::KronA(KronAConfig::auto()), "KronA"),
        Method::KronLora => (
            AdapterConfig::KronLora(KronLoraConfig::auto(12)),
            "Kron-LoRA (r = 12)",
        ),
    }
}

/// Every method of the KronA paper's Table 1 plus Kron-LoRA and the frozen baseline, in the
/// comparison's order.
pub fn presets() -> Vec<Preset> {
    let preset = |key, name, placement, lrs, lr| Preset {
        key,
        name,
        placement,
        lrs,
        lr,
    };
    let block = PlacementConfig::block;
    let kronab = KronABConfig::auto().with_budget(6200);
    let adapter = HoulsbyConfig::new().with_bottleneck(8);
    let compacter = CompacterConfig::new().with_reduction_factor(16);
    let mut out = vec![
        preset(
            "full",
            "Fine-tuning",
            PlacementConfig::mode(TrainMode::Full),
            &[5e-5, 2e-4],
            2e-4,
        ),
        preset(
            "bitfit",
            "BitFit",
            PlacementConfig::mode(TrainMode::BitFit),
            &[1e-3, 5e-3],
            5e-3,
        ),
        preset(
            "adapter",
            "Adapter (bottleneck 8)",
            block(BlockAdapterConfig::Adapter(adapter)),
            &[1e-3, 3e-3],
            3e-3,
        ),
        preset(
            "compacter",
            "Compacter (n = 4, bottleneck 24)",
            block(BlockAdapterConfig::Compacter(compacter)),
            &[3e-3, 1e-2],
            1e-2,
        ),
        preset(
            "pa",
            "PA (r = 8, s = 16)",
            block(BlockAdapterConfig::ParallelAdapter(
                ParallelAdapterConfig::new(8),
            )),
            &[3e-4, 1e-3],
            1e-3,
        ),
        preset(
            "krona-b",
            "KronA^B (s = 16)",
            block(BlockAdapterConfig::KronAB(kronab.clone())),
            &[3e-4, 1e-3],
            3e-4,
        ),
        preset(
            "krona-b-res",
            "KronA^B_res (s = 16)",
            block(BlockAdapterConfig::KronAB(
                kronab.with_residual(Residual::Learned),
            )),
            &[3e-4, 1e-3],
            3e-4,
        ),
        preset(
            "frozen",
            "Frozen encoder, head only",
            PlacementConfig::default(),
            &[1e-2],
            1e-2,
        ),
    ];
    let linear_presets = Method::ALL.iter().map(|&m| {
        let (config, name) = linear(m);
        preset(
            m.info().key,
            name,
            PlacementConfig::linear(config),
            &[3e-3, 1e-2],
            1e-2,
        )
    });
    out.splice(3..3, linear_presets);
    out
}

/// `kron_lora`, `kron-lora` and `KronLora` are the same key.
fn normalize(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The preset with this key (`-`, `_` and case ignored).
pub fn preset(key: &str) -> Result<Preset, ConfigError> {
    presets()
        .into_iter()
        .find(|p| normalize(p.key) == normalize(key))
        .ok_or_else(|| {
            ConfigError::invalid(
                "finetune",
                "method",
                format!(
                    "{key:?} is not a method; use one of {:?}",
                    presets().iter().map(|p| p.key).collect::<Vec<_>>()
                ),
            )
        })
}

/// A short name for what a placement trains, for run folders: the preset's key when it is a
/// preset, otherwise its parts (`kron_lora+krona-b`, `bitfit`, `frozen`).
pub fn run_key(placement: &PlacementConfig) -> String {
    if let Some(p) = presets().into_iter().find(|p| &p.placement == placement) {
        return p.key.to_string();
    }
    let mut parts: Vec<String> = Vec::new();
    if let Some(l) = &placement.linear {
        parts.push(l.method().info().key.to_string());
    }
    if let Some(b) = &placement.block {
        parts.push(
            match b {
                BlockAdapterConfig::KronAB(c) if c.residual != Residual::None => "krona-b-res",
                BlockAdapterConfig::KronAB(_) => "krona-b",
                BlockAdapterConfig::ParallelAdapter(_) => "pa",
                BlockAdapterConfig::Adapter(_) => "adapter",
                BlockAdapterConfig::Compacter(_) => "compacter",
            }
            .to_string(),
        );
    }
    match placement.train {
        TrainMode::Adapters => {}
        TrainMode::BitFit => parts.push("bitfit".into()),
        TrainMode::Full => parts.push("full".into()),
    }
    if parts.is_empty() {
        "frozen".into()
    } else {
        parts.join("+")
    }
}
