//! The encoder's forward with one KronA adapter on every linear layer, four ways: the base
//! alone, the adapter merged, the adapter attached (`AdaptedLinear`'s own adapter) and the
//! adapter resident in an `AdapterRegistry` and routed to every row (the server's path).
//! all-MiniLM-L6-v2's architecture with random weights; medians in ms and ratios to the base,
//! measured in the same run (docs/serving.md).
//!
//! ```text
//! cargo bench --features full --bench routing
//! ```

#[path = "../examples/common/mod.rs"]
mod common;

use burn::tensor::{Int, Tensor};
use common::{backend_name, Inner};
use kron_adapters::model::bert::BertEncoder;
use kron_adapters::model::{BertConfig, TensorSource};
use kron_adapters::multi::{AdapterRegistry, Routing};
use kron_adapters::{
    place, AdapterConfig, FactorInit, KronAConfig, NameMap, NativeAdapters, PlacementConfig,
};

fn time<F: FnMut()>(f: F) -> f64 {
    kron_adapters::finetune::timing::median_ms(f, 2, 4.0)
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    let dev = Default::default();
    let cfg = BertConfig::minilm_l6();
    let base = BertEncoder::<Inner>::new(
        &mut TensorSource::random(1),
        &cfg,
        &PlacementConfig::new(),
        &dev,
    )
    .expect("MiniLM's configuration");
    let krona = AdapterConfig::KronA(KronAConfig::auto().with_init(FactorInit::Normal));
    let adapted = place(base.clone(), &PlacementConfig::linear(krona), &dev).expect("placed");
    let registry = AdapterRegistry::new(&base, &dev);
    registry
        .load("a", &NativeAdapters::from_model(&adapted), &NameMap::new())
        .expect("the adapter fits its own base");
    let merged = adapted.clone().merge().expect("KronA merges");
    println!("backend: {}\n", backend_name());
    println!(
        "| batch × tokens | base | merged | attached | routed | attached / base | routed / base |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &(b, s) in &[(1usize, 24usize), (32, 24), (32, 64)] {
        let ids = Tensor::<Inner, 2, Int>::ones([b, s], &dev);
        let mask = Tensor::<Inner, 2, Int>::ones([b, s], &dev);
        let bank = registry.snapshot();
        let rows = vec![Some("a"); b];
        let routing = Routing::new(&bank, &rows, &dev).expect("a resident adapter");
        let run = |m: &BertEncoder<Inner>, r: Option<&Routing<Inner>>| {
            let _ = m.forward_routed(ids.clone(), mask.clone(), r).into_data();
        };
        let tb = time(|| run(&base, None));
        let tm = time(|| run(&merged, None));
        let ta = time(|| run(&adapted, None));
        let tr = time(|| run(&base, Some(&routing)));
        println!(
            "| {b} × {s} | {tb:.1} | {tm:.1} | {ta:.1} | {tr:.1} | {:.2} | {:.2} |",
            ta / tb,
            tr / tb
        );
    }
}
