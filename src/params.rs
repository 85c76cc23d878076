//! Parameter counts: trainable vs total.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// Trainable and total parameter counts of a module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamCount {
    /// Parameters that require gradients.
    pub trainable: usize,
    /// All parameters.
    pub total: usize,
}

impl ParamCount {
    /// `trainable / total` in percent.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

impl std::ops::Add for ParamCount {
    type Output = ParamCount;
    fn add(self, rhs: Self) -> Self {
        ParamCount {
            trainable: self.trainable + rhs.trainable,
            total: self.total + rhs.total,
        }
    }
}

impl std::fmt::Display for ParamCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable {} / total {} ({:.3}%)",
            self.trainable,
            self.total,
            self.percent()
        )
    }
}

struct GradCounter {
    count: ParamCount,
}

impl<B: Backend> ModuleVisitor<B> for GradCounter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n = param.shape().num_elements();
        self.count.total += n;
        // Through `Deref`, not `val()`: no clone (a flex int8 weight's would copy its scales).
        if param.is_require_grad() {
            self.count.trainable += n;
        }
    }
}

/// Counts a module's parameters by what actually requires gradients. Meaningful on an autodiff
/// backend only (elsewhere nothing requires gradients), hence the bound.
pub fn count_params<B: AutodiffBackend, M: Module<B>>(module: &M) -> ParamCount {
    let mut counter = GradCounter {
        count: ParamCount::default(),
    };
    module.visit(&mut counter);
    counter.count
}
