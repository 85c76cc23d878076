//! The main job: fine-tuning all-MiniLM-L6-v2 with adapters on Rotten Tomatoes (or BBC News),
//! on any backend. Enabled by the `finetune` feature (on by default).
//!
//! ```no_run
//! use burn::backend::{Autodiff, NdArray};
//! use kron_adapters::finetune::{finetune, prepare, AssetCache, FinetuneConfig};
//!
//! let cfg = FinetuneConfig::default(); // KronA on every linear, Rotten Tomatoes
//! let data = prepare(&AssetCache::default(), cfg.task, cfg.max_len, &|m| eprintln!("{m}"))?;
//! let report = finetune::<Autodiff<NdArray>>(&cfg, &data, None, &Default::default(), true)?;
//! println!("test accuracy {:.4}", report.test_acc);
//! # Ok::<(), kron_adapters::AdapterError>(())
//! ```

pub mod allocator;
pub mod assets;
pub mod data;
pub mod presets;
pub mod report;
pub mod resume;
pub mod timing;
pub mod tokenize;
pub(crate) mod tokenizer_json;
pub mod train;

pub use allocator::keep_freed_memory;
pub use assets::AssetCache;
pub use data::{Task, TaskName};
pub use presets::{preset, presets, Preset};
pub use train::{finetune, prepare, FinetuneConfig, Prepared, RunReport};
