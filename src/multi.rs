//! Many adapters over one frozen model, per row of a batch (S-LoRA's idea, for every method).
//!
//! An [`AdapterRegistry`] holds named adapters resident beside a model whose layers carry none
//! of their own: each adapter is one [`Adapter`] per adapted layer, keyed by the layer's frozen
//! weight (its parameter id, stable across clones). Requests take an immutable [`AdapterBank`]
//! snapshot; loading and unloading swap in a new snapshot, so a batch in flight keeps the
//! adapters it started with, and a file that does not fit the model is refused with the resident
//! set unchanged.
//!
//! A [`Routing`] says which adapter each batch row uses (or none). A layer's routed forward
//! ([`AdaptedLinear::forward_routed`]) computes the frozen base product once for the whole batch,
//! then each adapter's `x·ΔW` on its rows only (never building `ΔW`), added back into those rows.
//! Every row equals running its adapter alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use burn::module::ParamId;
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::adapter::{Adapter, LinearAdapter};
use crate::error::AdapterError;
use crate::linear::{AdaptedLinear, AdapterLayers};
use crate::place::NameMap;
use crate::store::NativeAdapters;

/// One resident adapter: its layers (by frozen weight id) and its size.
#[derive(Clone, Debug)]
pub struct Resident<B: Backend> {
    /// The adapter of each layer it adapts.
    pub layers: HashMap<ParamId, Adapter<B>>,
    /// Trainable parameters.
    pub params: usize,
    /// Bytes its factors take on the device (float32).
    pub bytes: usize,
    /// Anything the application keeps with it (a classification head, labels).
    pub extra: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

/// An immutable set of resident adapters, by name.
#[derive(Clone, Debug, Default)]
pub struct AdapterBank<B: Backend> {
    adapters: BTreeMap<String, Arc<Resident<B>>>,
}

impl<B: Backend> AdapterBank<B> {
    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Resident<B>>> {
        self.adapters.get(name)
    }

    /// Names, parameters and bytes of every resident adapter.
    pub fn list(&self) -> Vec<(String, usize, usize)> {
        self.adapters
            .iter()
            .map(|(n, r)| (n.clone(), r.params, r.bytes))
            .collect()
    }

    /// How many adapters are resident.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// None resident?
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

/// The adapted layers of a model: path, frozen weight id, size.
#[derive(Clone, Debug)]
struct LayerInfo {
    id: ParamId,
    d_in: usize,
    d_out: usize,
}

/// Named adapters resident beside one model, loaded and unloaded while requests run.
pub struct AdapterRegistry<B: Backend> {
    layers: BTreeMap<String, LayerInfo>,
    current: RwLock<Arc<AdapterBank<B>>>,
    device: B::Device,
}

impl<B: Backend> AdapterRegistry<B> {
    /// A registry for `model`'s adapted layers (the model's own adapters, if any, stay its own).
    pub fn new<M: AdapterLayers<B>>(model: &M, device: &B::Device) -> Self {
        let layers = model
            .adapter_layers()
            .into_iter()
            .map(|(p, l)| {
                (
                    p,
                    LayerInfo {
                        id: l.base.weight.id,
                        d_in: l.d_in(),
                        d_out: l.d_out(),
                    },
                )
            })
            .collect();
        Self {
            layers,
            current: RwLock::new(Arc::new(AdapterBank::default())),
            device: device.clone(),
        }
    }

    /// The resident adapters now (requests hold on to this snapshot).
    pub fn snapshot(&self) -> Arc<AdapterBank<B>> {
        self.current
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Builds a resident adapter from `adapters` (layer names mapped by `map` to the model's
    /// paths) without changing the resident set: every layer must exist with the adapter's size.
    pub fn prepare(
        &self,
        adapters: &NativeAdapters,
        map: &NameMap,
    ) -> Result<Resident<B>, AdapterError> {
        adapters.validate("adapters")?;
        if adapters.meta.layers.is_empty() {
            return Err(AdapterError::Incompatible {
                message: "the adapter file holds no layers".into(),
            });
        }
        let mut layers = HashMap::new();
        for (name, spec) in &adapters.meta.layers {
            let path = map.apply(name);
            let info = self
                .layers
                .get(&path)
                .ok_or_else(|| AdapterError::Incompatible {
                    message: format!(
                    "the adapter's layer `{name}` maps to `{path}`, which is not a layer of the \
                     model (rename with a NameMap)"
                ),
                })?;
            if (info.d_in, info.d_out) != (spec.d_in, spec.d_out) {
                return Err(AdapterError::Incompatible {
                    message: format!(
                        "`{path}` is [{}, {}] but the adapter's layer is [{}, {}]: the adapter \
                         was made for another model",
                        info.d_in, info.d_out, spec.d_in, spec.d_out
                    ),
                });
            }
            let adapter = adapters.adapter::<B>(name, &self.device)?;
            layers.insert(info.id, adapter);
        }
        let params = adapters.num_params();
        Ok(Resident {
            layers,
            params,
            bytes: params * 4,
            extra: None,
        })
    }

    /// Makes `resident` available as `name` (replacing one of that name). Requests in flight
    /// keep the snapshot they hold.
    pub fn insert(&self, name: &str, resident: Resident<B>) {
        settle::<B>(&self.device);
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**guard).clone();
        next.adapters.insert(name.to_string(), Arc::new(resident));
        *guard = Arc::new(next);
    }

    /// [`AdapterRegistry::prepare`] then [`AdapterRegistry::insert`]; returns the adapter's
    /// bytes. On error the resident set is unchanged.
    pub fn load(
        &self,
        name: &str,
        adapters: &NativeAdapters,
        map: &NameMap,
    ) -> Result<usize, AdapterError> {
        check_name(name)?;
        let r = self.prepare(adapters, map)?;
        let bytes = r.bytes;
        self.insert(name, r);
        Ok(bytes)
    }

    /// Removes the adapter `name`; an error if there is none.
    pub fn unload(&self, name: &str) -> Result<(), AdapterError> {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !guard.adapters.contains_key(name) {
            return Err(crate::ConfigError::invalid(
                "registry",
                "adapter",
                format!("no adapter named {name:?}"),
            )
            .into());
        }
        let mut next = (**guard).clone();
        next.adapters.remove(name);
        *guard = Arc::new(next);
        Ok(())
    }
}

/// Adapter names: 1 to 128 characters of letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(crate::ConfigError::invalid(
            "registry",
            "name",
            format!("{name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"),
        )
        .into())
    }
}

/// A resident adapter and the batch rows (indices) that use it.
pub type RowGroup<B> = (Arc<Resident<B>>, Tensor<B, 1, Int>);

/// Which adapter each row of a batch uses: rows grouped by adapter.
pub struct Routing<B: Backend> {
    groups: Vec<RowGroup<B>>,
    /// Rows in the batch.
    batch: usize,
}

impl<B: Backend> Routing<B> {
    /// Rows `i` use `rows[i]` (a name in `bank`, or none for the base model).
    pub fn new(
        bank: &AdapterBank<B>,
        rows: &[Option<&str>],
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        let mut by_name: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            if let Some(name) = r {
                by_name.entry(name).or_default().push(i as i64);
            }
        }
        let mut groups = Vec::with_capacity(by_name.len());
        for (name, idx) in by_name {
            let resident = bank.get(name).ok_or_else(|| {
                crate::ConfigError::invalid(
                    "routing",
                    "adapter",
                    format!("no resident adapter named {name:?}"),
                )
            })?;
            let n = idx.len();
            groups.push((
                resident.clone(),
                Tensor::from_data(TensorData::new(idx, [n]), device),
            ));
        }
        Ok(Self {
            groups,
            batch: rows.len(),
        })
    }

    /// Adds each group's adapter contribution for layer `layer` to its rows of `y`.
    ///
    /// # Shapes
    /// - `x`: `[b, ..., d_in]`, `y`: `[b, ..., d_out]`
    pub fn apply<const D: usize>(
        &self,
        layer: &ParamId,
        x: Tensor<B, D>,
        mut y: Tensor<B, D>,
    ) -> Tensor<B, D> {
        for (resident, rows) in &self.groups {
            if let Some(adapter) = resident.layers.get(layer) {
                if rows.dims()[0] == self.batch {
                    // Every row uses this adapter: no gather, no scatter (and on flex in
                    // inference the adapter adds into `y`'s buffer).
                    y = adapter.apply_add(x.clone(), y);
                    continue;
                }
                let delta = adapter.apply(x.clone().select(0, rows.clone()));
                y = y.select_assign(0, rows.clone(), delta, IndexingUpdateOp::Add);
            }
        }
        y
    }

    /// The groups: each resident adapter and the batch rows that use it.
    pub fn groups(&self) -> &[RowGroup<B>] {
        &self.groups
    }
}

impl<B: Backend> AdaptedLinear<B> {
    /// `forward` plus, with a routing, each routed adapter's contribution on its rows.
    pub fn forward_routed<const D: usize>(
        &self,
        x: Tensor<B, D>,
        routing: Option<&Routing<B>>,
    ) -> Tensor<B, D> {
        match routing {
            None => self.forward(x),
            Some(r) => {
                let y = self.forward(x.clone());
                r.apply(&self.base.weight.id, x, y)
            }
        }
    }
}

/// Waits until the calling thread's work on `device` is done. CubeCL backends (wgpu, CUDA) run
/// each thread's work on that thread's own stream, so tensors made here and read on another
/// thread (the serving worker) must be computed first, or the reader can see stale memory. A
/// no-op on the CPU backends. A failing device shows its error at the next use, so it is not
/// reported here.
pub(crate) fn settle<B: Backend>(device: &B::Device) {
    let _ = B::sync(device);
}
