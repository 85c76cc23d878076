//! Data-parallel training with Burn's own all-reduce (`burn-collective`, feature `collective`):
//! one thread per device, each training a copy of the model on its shard of every global batch;
//! before each optimizer step the gradients are averaged across devices
//! (`GradientsParams::all_reduce`, `ReduceOperation::Mean`), so every copy applies the same
//! update and the copies stay identical. With equal shards the averaged gradient is the global
//! batch's gradient, so N devices train what one device trains on the whole batch.
//!
//! This works on every backend (several GPUs of one kind in one process, or — as the CPU test
//! does — several threads on one CPU device). Across machines, burn-collective's global level
//! (`CollectiveConfig::with_num_nodes`, `with_global_address`, `with_node_address`,
//! `with_data_service_port`) all-reduces between nodes; see docs/training.md for what Burn 0.21
//! does and does not implement there. burn-train's own `ExecutionStrategy::multi` (gradients
//! summed on the main device) and `ddp` (CUDA/NCCL only in 0.21) are the alternatives inside
//! `SupervisedTraining` (`examples/learner.rs --devices N`).

use burn::collective::{
    finish_collective, register, reset_collective, CollectiveConfig, PeerId, ReduceOperation,
};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use burn::train::TrainStep;

use crate::error::{AdapterError, ConfigError};

fn collective_error(rank: usize, e: impl std::fmt::Debug) -> AdapterError {
    ConfigError::invalid(
        "data parallel",
        "collective",
        format!("rank {rank}: burn-collective failed: {e:?}"),
    )
    .into()
}

/// The batch of a rank: `shard(step, rank, device)`.
pub type Shard<'a, B, M> =
    dyn Fn(usize, usize, &burn::tensor::Device<B>) -> <M as TrainStep>::Input + Sync + 'a;

/// Trains `model` for `steps` optimizer steps on `devices` in parallel: rank `r` computes its
/// step on `shard(step, r, device)` (the `r`-th equal part of global batch `step`), the ranks'
/// gradients are averaged, and each rank's copy of `optim` steps with `lr(step)`. Returns rank
/// 0's model (on `devices[0]`).
///
/// `config` is burn-collective's (its `num_devices` is set to `devices.len()`). burn-collective's
/// server is per backend type, so concurrent calls in one process run one after another.
pub fn train_data_parallel<B, M, O>(
    model: M,
    optim: O,
    devices: &[B::Device],
    config: CollectiveConfig,
    steps: usize,
    lr: &(dyn Fn(usize) -> f64 + Sync),
    shard: &Shard<'_, B, M>,
) -> Result<M, AdapterError>
where
    B: AutodiffBackend,
    M: TrainStep + AutodiffModule<B> + Send,
    O: Optimizer<M, B>,
{
    if devices.is_empty() {
        return Err(ConfigError::invalid("data parallel", "devices", "no devices").into());
    }
    let config = config.with_num_devices(devices.len());
    crate::kron::autodiff::register_default::<B>();
    // burn-collective keeps one server per backend type in a process: two runs at once would
    // mix their all-reduces, so a second run waits for the first.
    static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _running = ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    reset_collective::<B::InnerBackend>();
    let results: Vec<Result<M, AdapterError>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let (model, mut optim, config) = (model.clone(), optim.clone(), config.clone());
                s.spawn(move || -> Result<M, AdapterError> {
                    let id = PeerId::from(rank);
                    register::<B::InnerBackend>(id, device.clone(), config)
                        .map_err(|e| collective_error(rank, e))?;
                    let mut model = crate::training::fork(model, device);
                    // CubeCL backends run each thread's work on the thread's own stream: a
                    // tensor handed to another thread (the collective's server, the caller) must
                    // be computed before it is read there, or the reader sees stale memory
                    // (measured on wgpu: the returned adapters were garbage without these syncs).
                    let sync = |what: &str| {
                        B::sync(device)
                            .map_err(|e| collective_error(rank, format!("{what}: {e:?}")))
                    };
                    for step in 0..steps {
                        let out = TrainStep::step(&model, shard(step, rank, device));
                        sync("gradients")?;
                        let grads = out
                            .grads
                            .all_reduce::<B::InnerBackend>(id, ReduceOperation::Mean)
                            .map_err(|e| collective_error(rank, e))?;
                        model = optim.step(lr(step), model, grads);
                    }
                    sync("trained model")?;
                    finish_collective::<B::InnerBackend>(id)
                        .map_err(|e| collective_error(rank, e))?;
                    Ok(model)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(collective_error(rank, "the rank's thread panicked")))
            })
            .collect()
    });
    let mut first = None;
    for (rank, r) in results.into_iter().enumerate() {
        let m = r?;
        if rank == 0 {
            first = Some(m);
        }
    }
    first.ok_or_else(|| ConfigError::invalid("data parallel", "devices", "no rank finished").into())
}
