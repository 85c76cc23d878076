//! Which parameters train: adapters only (the default of every adapted model), BitFit (biases,
//! and any adapters) or full fine-tuning, set on any module through its parameter paths.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// A training mode for the paper's non-adapter baselines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainMode {
    /// Only adapter parameters train (as the adapters and `AdaptedLinear` set them up).
    #[default]
    Adapters,
    /// BitFit (Ben Zaken et al. 2022): bias terms train, the rest of the base is frozen.
    /// Adapters the model has (linear or block) keep training: BitFit freezes the pretrained
    /// weights, not the parameters added to adapt them, so "BitFit + KronA" trains the biases
    /// and the Kronecker factors together.
    BitFit,
    /// Full fine-tuning: every parameter trains.
    Full,
}

impl TrainMode {
    /// Sets `module`'s trainable parameters for this mode (`Adapters` leaves it as it is).
    pub fn apply<B: AutodiffBackend, M: Module<B>>(self, module: M) -> M {
        match self {
            TrainMode::Adapters => module,
            TrainMode::BitFit => bitfit(module),
            TrainMode::Full => full_finetune(module),
        }
    }
}

/// The gradients of `module`'s parameters from a backward pass: Burn's
/// `GradientsParams::from_grads`, less the parameters held as Burn quantized tensors (frozen
/// int8 weights, `TensorSource::quantize_frozen`), which nothing trains and which Burn 0.21's
/// converter would dequantize under autodiff (unimplemented there: a panic). Every training loop
/// of the crate collects its gradients through it; a loop of one's own over an int8 base does
/// too.
pub fn gradients_params<B: AutodiffBackend, M: AutodiffModule<B>>(
    mut grads: B::Gradients,
    module: &M,
) -> GradientsParams {
    struct Floats(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Floats {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !is_quantized(param) {
                self.0.push(param.id);
            }
        }
    }
    let mut floats = Floats(Vec::new());
    module.visit(&mut floats);
    GradientsParams::from_params(&mut grads, module, &floats.0)
}

/// `module` on `device` with an autodiff graph of its own: Burn's `Module::fork`, leaving the
/// parameters held as Burn quantized tensors as they are (frozen, untracked; Burn 0.21's
/// autodiff cannot move one: unimplemented there).
pub fn fork<B: AutodiffBackend, M: AutodiffModule<B>>(module: M, device: &B::Device) -> M {
    struct Fork<'a, B: Backend>(&'a B::Device);
    impl<B: AutodiffBackend> ModuleMapper<B> for Fork<'_, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            match is_quantized(&param) {
                true => param,
                false => param.fork(self.0),
            }
        }
    }
    module.map(&mut Fork(device))
}

/// Is `param` held as a Burn quantized tensor (a frozen int8 weight)? Read through `Param`'s
/// `Deref`: `val()` would clone it, and cloning a flex quantized tensor copies its scales
/// (`gradients_params` asks this of every parameter every step).
fn is_quantized<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> bool {
    matches!(param.dtype(), DType::QFloat(_))
}

/// Is this parameter path a bias? Its last segment is `bias` (Linear and most layers) or
/// `beta` (Burn's `LayerNorm`).
pub fn is_bias(path: &str) -> bool {
    matches!(path.rsplit('.').next(), Some("bias" | "beta"))
}

/// Is this parameter path part of an adapter: under a linear layer's `adapter` field or a
/// model's `block_adapters`?
pub fn is_adapter(path: &str) -> bool {
    path.split('.')
        .any(|segment| segment == "adapter" || segment == "block_adapters")
}

/// BitFit: every bias trains, every other parameter of the base is frozen; adapters (see
/// [`is_adapter`]) keep training.
pub fn bitfit<B: AutodiffBackend, M: Module<B>>(module: M) -> M {
    set_trainable(module, |p| is_bias(p) || is_adapter(p))
}

/// Full fine-tuning: every parameter trains.
pub fn full_finetune<B: AutodiffBackend, M: Module<B>>(module: M) -> M {
    set_trainable(module, |_| true)
}

/// Freezes every parameter.
pub fn freeze<B: AutodiffBackend, M: Module<B>>(module: M) -> M {
    set_trainable(module, |_| false)
}

/// Sets each parameter trainable when `trainable(path)` says so, frozen otherwise. `path` is the
/// parameter's dotted path in the module tree (`encoder.layers.0.ffn.up.bias`, enum variants
/// included as in Burn's records). A parameter held as a Burn quantized tensor (an int8 frozen
/// weight) stays frozen whatever `trainable` says: Burn 0.21 tracks no quantized tensor.
pub fn set_trainable<B: AutodiffBackend, M: Module<B>>(
    module: M,
    trainable: impl Fn(&str) -> bool,
) -> M {
    let mut mapper = Trainable {
        path: Vec::new(),
        trainable,
    };
    module.map(&mut mapper)
}

struct Trainable<F> {
    path: Vec<String>,
    trainable: F,
}

impl<B: AutodiffBackend, F: Fn(&str) -> bool> ModuleMapper<B> for Trainable<F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        // A quantized (int8 frozen) weight stays as it is: untracked, and Burn 0.21's autodiff
        // would dequantize it to detach it (unimplemented there: a panic).
        if is_quantized(&param) {
            return param;
        }
        let on = (self.trainable)(&self.path.join("."));
        // Detach first: a parameter that was an intermediate of a graph becomes a fresh leaf.
        param.map(|t| t.detach().set_require_grad(on))
    }
}
