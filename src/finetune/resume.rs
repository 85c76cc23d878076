//! Resumable fine-tuning: every `checkpoint_every` steps the loop writes where it is to
//! `<run>/resume/step-NNNNNNNN/` — the trainable parameters now and of the best evaluation so
//! far, AdamW's state (float32), and `state.json` (the step, the epoch and the batch within it,
//! the batch-order generator's state at the epoch's start, the curves so far). A resumed run
//! rebuilds the model, loads these and continues; dropout is seeded per step, so the result is
//! the uninterrupted run's, bit for bit on the CPU.
//!
//! A checkpoint folder is written under a temporary name and renamed into place only when
//! complete, and older ones are removed only after; a crash at any moment leaves the previous
//! checkpoint readable (a stale temporary folder is ignored). `state.json` records the SHA-256
//! of every other file of its checkpoint, checked before anything is decoded: a damaged
//! checkpoint is refused by name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::Optimizer;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::assets::sha256_file;
use super::report::{EvalRow, LogRow};
use super::train::FinetuneConfig;
use crate::error::AdapterError;
use crate::linear::AdapterLayers;
use crate::model::bert::BertClassifier;
use crate::optim::FusedAdamW;
use crate::store::st::write_atomic;
use crate::store::{load_params_matching, save_params_matching, CheckpointMeta};

/// The optimizer the fine-tuning loop uses.
pub type Optim<B> = OptimizerAdaptor<FusedAdamW, BertClassifier<B>, B>;

/// Where a run is, besides its tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    /// The run's configuration (a resumed run must have the same).
    pub config: FinetuneConfig,
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch in progress (from 1).
    pub epoch: usize,
    /// Batches of that epoch done.
    pub batch: usize,
    /// The batch-order generator's state at the start of that epoch.
    pub epoch_rng: u64,
    /// Per-step rows so far.
    pub history: Vec<LogRow>,
    /// Dev evaluations so far.
    pub evals: Vec<EvalRow>,
    /// Milliseconds of every step so far.
    pub step_ms: Vec<f64>,
    /// Sentences trained on so far.
    pub sentences: usize,
    /// The running window since the last evaluation: loss sum, hits, sentences, tokens, ms.
    pub window: (f64, usize, usize, usize, f64),
    /// The best dev accuracy so far and its step.
    pub best: Option<(f64, usize)>,
    /// The SHA-256 (hex) of each file of the checkpoint, by name, taken when it was written:
    /// [`load`] checks them before decoding, so a damaged file is refused by name instead of
    /// loading wrong weights or failing inside Burn's decoder. Empty in checkpoints of versions
    /// before it (then nothing is checked).
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

/// Float parameter ids in visit order (the same for every model built from one config).
struct Ids(Vec<ParamId>);

impl<B: Backend> ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

fn param_ids<B: Backend, M: Module<B>>(m: &M) -> Vec<ParamId> {
    let mut ids = Ids(Vec::new());
    m.visit(&mut ids);
    ids.0
}

/// The newest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

fn format_err(path: &Path, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::format(path.display().to_string(), e.to_string())
}

/// Writes a checkpoint for `state` under `root` (the trainable parameters matching
/// `patterns`), then removes older ones.
pub fn save<B: AutodiffBackend>(
    root: &Path,
    state: &RunState,
    model: &BertClassifier<B>,
    best: Option<&BertClassifier<B>>,
    optim: &Optim<B>,
    patterns: &[&str],
) -> Result<(), AdapterError> {
    let name = format!("step-{:08}", state.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
    let write = || -> Result<(), AdapterError> {
        let meta = CheckpointMeta::new(model.adapter_specs());
        save_params_matching(model, tmp.join("current.safetensors"), patterns, &meta)?;
        if let Some(best) = best {
            save_params_matching(best, tmp.join("best.safetensors"), patterns, &meta)?;
        }
        // AdamW's state is keyed by parameter ids, which a rebuilt model does not share: key
        // it by the parameter's place in the model instead.
        let index: HashMap<ParamId, u64> = param_ids(model)
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, i as u64))
            .collect();
        let record: <Optim<B> as Optimizer<BertClassifier<B>, B>>::Record = optim
            .to_record()
            .into_iter()
            .filter_map(|(id, r)| index.get(&id).map(|i| (ParamId::from(*i), r)))
            .collect();
        let path = tmp.join("optim.bin");
        let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
            .record(record, ())
            .map_err(|e| format_err(&path, e))?;
        write_atomic(&path, &bytes)?;
        let mut state = state.clone();
        state.sha256.clear();
        for file in CHECKED {
            let path = tmp.join(file);
            if path.is_file() {
                state.sha256.insert(file.to_string(), sha256_file(&path)?);
            }
        }
        let path = tmp.join("state.json");
        let json = serde_json::to_vec(&state).map_err(|e| format_err(&path, e))?;
        write_atomic(&path, &json)?;
        std::fs::rename(&tmp, &dir).map_err(|e| AdapterError::io(&dir, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for entry in std::fs::read_dir(root)
        .map_err(|e| AdapterError::io(root, e))?
        .flatten()
    {
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("step-") && n != name.as_str() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// The files of a checkpoint whose sums `state.json` records (`best.safetensors` only once
/// there is a best evaluation).
const CHECKED: [&str; 3] = ["current.safetensors", "best.safetensors", "optim.bin"];

/// What [`load`] restores.
pub struct Restored<B: AutodiffBackend> {
    /// Where the run was.
    pub state: RunState,
    /// The model with its trainable parameters at that step.
    pub model: BertClassifier<B>,
    /// The model of the best evaluation so far, if any.
    pub best: Option<BertClassifier<B>>,
    /// The optimizer with its state.
    pub optim: Optim<B>,
}

/// Loads the newest checkpoint under `root` into `model` (built afresh from the run's config)
/// and `optim`; `None` when there is none.
pub fn load<B: AutodiffBackend>(
    root: &Path,
    model: BertClassifier<B>,
    optim: Optim<B>,
    patterns: &[&str],
    device: &B::Device,
) -> Result<Option<Restored<B>>, AdapterError> {
    let Some(dir) = latest(root) else {
        return Ok(None);
    };
    let path = dir.join("state.json");
    let text = crate::store::read_text(&path)?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| format_err(&path, e))?;
    for (file, want) in &state.sha256 {
        let path = dir.join(file);
        if !CHECKED.contains(&file.as_str()) {
            return Err(format_err(
                &dir.join("state.json"),
                format!("a sum for {file:?}, which no checkpoint holds"),
            ));
        }
        if !path.is_file() {
            // The sums list only the files written: one gone means the checkpoint is not whole
            // (a missing best.safetensors would otherwise drop the run's best silently).
            return Err(format_err(
                &path,
                "missing, though state.json records it: this checkpoint is incomplete and cannot \
                 be resumed (resume from a copy, or start the run again)",
            ));
        }
        if sha256_file(&path)? != *want {
            return Err(format_err(
                &path,
                "damaged: its SHA-256 is not the one recorded in state.json when it was written; \
                 this checkpoint cannot be resumed (resume from a copy, or start the run again)",
            ));
        }
    }
    let ids = param_ids(&model);
    let (model, _) = load_params_matching(model, dir.join("current.safetensors"), patterns)?;
    let best_path = dir.join("best.safetensors");
    let best = if best_path.is_file() {
        Some(load_params_matching(model.clone(), &best_path, patterns)?.0)
    } else {
        None
    };
    let path = dir.join("optim.bin");
    let bytes = crate::store::read_file(&path)?;
    let record: <Optim<B> as Optimizer<BertClassifier<B>, B>>::Record =
        BinBytesRecorder::<FullPrecisionSettings>::default()
            .load(bytes, device)
            .map_err(|e| format_err(&path, e))?;
    let mut remapped: <Optim<B> as Optimizer<BertClassifier<B>, B>>::Record = Default::default();
    for (i, r) in record {
        let id = ids.get(i.val() as usize).ok_or_else(|| {
            format_err(
                &path,
                format!(
                    "optimizer state for parameter {}, but the model has {}",
                    i.val(),
                    ids.len()
                ),
            )
        })?;
        remapped.insert(*id, r);
    }
    Ok(Some(Restored {
        state,
        model,
        best,
        optim: optim.load_record(remapped),
    }))
}
