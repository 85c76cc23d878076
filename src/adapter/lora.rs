//! LoRA (Hu et al. 2022): `ΔW = scale · down·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{
    checked_factors, exact_shapes, init_factors, layer_name, replace_values, FactorInit,
    LinearAdapter, Method, MethodConfig, MethodInfo,
};
use crate::error::ConfigError;
use crate::macros::config;
use crate::product;
use crate::quirks;

super::rank_config! {
    config!
    /// Configuration of a [`Lora`] adapter.
    ///
    /// ```
    /// use kron_adapters::LoraConfig;
    /// let cfg = LoraConfig::new(8).with_alpha(16.0); // scale = alpha / rank = 2
    /// assert_eq!(cfg.rank, 8);
    /// ```
    pub struct LoraConfig(new) {
        required {
            /// The rank `r`: `down` is `[d_in, r]`, `up` is `[r, d_out]`.
            /// `1 ≤ r ≤ min(d_in, d_out)`.
            rank: usize,
        }
        optional {}
        defaults {
            /// Initialisation: `down` Kaiming-uniform, `up` zero.
            init: FactorInit = FactorInit::KaimingZero,
        }
    }
}

impl LoraConfig {
    fn check(&self, d_in: usize, d_out: usize) -> Result<f64, ConfigError> {
        let layer = layer_name(d_in, d_out);
        check_rank(&layer, self.rank, d_in, d_out)?;
        self.rank_scale(&layer)
    }
}

fn check_rank(layer: &str, rank: usize, d_in: usize, d_out: usize) -> Result<(), ConfigError> {
    let max = d_in.min(d_out);
    if rank == 0 || rank > max {
        return Err(ConfigError::Rank {
            layer: layer.to_string(),
            rank,
            reason: format!(
                "LoRA's rank must be between 1 and min(d_in, d_out) = {max} for a \
                 [{d_in}, {d_out}] layer"
            ),
        });
    }
    Ok(())
}

impl MethodConfig for LoraConfig {
    type Adapter<B: Backend> = Lora<B>;

    const INFO: MethodInfo = MethodInfo {
        name: "LoRA",
        key: "lora",
        factors: &["down", "up"],
        formula: "scale · down·up",
    };

    fn check_shapes(shapes: &[[usize; 2]]) -> Result<(usize, usize), ConfigError> {
        let [[d_in, r], [r2, d_out]] = exact_shapes::<2>(&Self::INFO, shapes)?;
        let layer = layer_name(d_in, d_out);
        if r != r2 {
            return Err(ConfigError::invalid(
                layer,
                "up",
                format!("down [{d_in}, {r}] and up [{r2}, {d_out}] do not chain"),
            ));
        }
        check_rank(&layer, r, d_in, d_out)?;
        Ok((d_in, d_out))
    }

    /// `r·(d_in + d_out)`.
    fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
        self.check(d_in, d_out)?;
        Ok(self.rank * (d_in + d_out))
    }

    fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Lora<B>, ConfigError> {
        let scale = self.check(d_in, d_out)?;
        let mut f = init_factors(
            self.init,
            &[[d_in, self.rank], [self.rank, d_out]],
            d_in,
            device,
        );
        let up = f.pop().expect("two factors");
        let down = f.pop().expect("two factors");
        Ok(Lora { down, up, scale })
    }
}

/// A LoRA adapter: `x·ΔW = scale · (x·down)·up`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection, `[d_in, r]`.
    pub down: Param<Tensor<B, 2>>,
    /// Up projection, `[r, d_out]`.
    pub up: Param<Tensor<B, 2>>,
    /// The scale `s`.
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// A LoRA adapter from given factors (`down [d_in, r]`, `up [r, d_out]`), trainable.
    pub fn from_factors(
        down: Tensor<B, 2>,
        up: Tensor<B, 2>,
        scale: f64,
    ) -> Result<Self, ConfigError> {
        Self::from_values(vec![down, up], scale)
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims()[1]
    }

    /// `x·down·scale` as `[n, r]` rows (the scale on the smallest tensor on the way).
    fn hidden<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, 2> {
        let d_in = x.dims()[D - 1];
        let n = x.shape().num_elements() / d_in.max(1);
        let h = product::matmul(x.reshape([n, d_in]), self.down.val());
        if self.scale != 1.0 {
            h.mul_scalar(self.scale)
        } else {
            h
        }
    }
}

impl<B: Backend> LinearAdapter<B> for Lora<B> {
    fn scale(&self) -> f64 {
        self.scale
    }

    fn method(&self) -> Method {
        Method::Lora
    }

    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let y = product::matmul(self.hidden(x), self.up.val());
        dims[D - 1] = self.d_out();
        y.reshape(dims)
    }

    /// On burn-flex in inference (`f32`, no autodiff) `(x·down)·up` is added into `y`'s buffer
    /// on the host (`kron::host::product_add`): no `[n, d_out]` tensor for the adapter's term
    /// and no pass for the add. In training on flex (the crate's backward registered) both
    /// products are `crate::product`'s nodes, the second adding into `y`'s buffer: outputs of
    /// their own, `∂x = ∂h·downᵀ` too. Elsewhere `apply(x) + y`.
    fn apply_add<const D: usize>(&self, x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
        let up = self.up.val();
        let dims = y.dims();
        let n = y.shape().num_elements() / dims[D - 1].max(1);
        if quirks::host_loops_take(&x, &y) && quirks::host_loops_take(&up, &y) {
            let h = self.hidden(x);
            return crate::kron::host::product_add(h, up, y.reshape([n, dims[D - 1]]))
                .reshape(dims);
        }
        let (h, y) = (self.hidden(x), y.reshape([n, dims[D - 1]]));
        let out = if product::takes(&h, &up, Some(&y)) {
            product::product(h, up, Some(y))
        } else {
            h.matmul(up) + y
        };
        out.reshape(dims)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.down.val().matmul(self.up.val()).mul_scalar(self.scale)
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.down.val(), self.up.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        replace_values(vec![&mut self.down, &mut self.up], values);
        self
    }

    fn from_values(values: Vec<Tensor<B, 2>>, scale: f64) -> Result<Self, ConfigError> {
        let mut p = checked_factors::<LoraConfig, B>(values, scale)?.into_iter();
        let (down, up) = (p.next().expect("2"), p.next().expect("2"));
        Ok(Self { down, up, scale })
    }
}
