//! Compacter (Mahabadi et al. 2021): an Adapter whose projections are low-rank PHM layers,
//! `W = Σᵢ Aᵢ ⊗ (sᵢ·tᵢ)`, with the `Aᵢ` shared by every layer.

use super::houlsby::bottleneck;
use super::{square, Activation, BlockAdapter};
use crate::adapter::{kaiming_factor, kaiming_fan_in, layer_name, zero_factor};
use crate::error::ConfigError;
use crate::kron::phm_apply;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

crate::macros::config! {
    /// Configuration of a [`Compacter`].
    ///
    /// ```
    /// use kron_adapters::block::CompacterConfig;
    /// // The KronA paper's setting (Table 13): n = 4, reduction factor 32: 768 → 24 → 768.
    /// let cfg = CompacterConfig::new();
    /// assert_eq!(cfg.num_params_per_layer(768).unwrap(), 3 * 768 + 3 * 24);
    /// assert_eq!(cfg.num_shared_params(), 4 * 4 * 4);
    /// ```
    pub struct CompacterConfig(new) {
        required {}
        optional {
            /// An explicit bottleneck size, overriding the reduction factor.
            bottleneck: usize,
        }
        defaults {
            /// The hypercomplex division `n`: `n` shared matrices `Aᵢ [n, n]`.
            n: usize = 4,
            /// The bottleneck is `d / reduction_factor`.
            reduction_factor: usize = 32,
            /// The non-linearity ("swish").
            activation: Activation = Activation::Silu,
        }
    }
}

impl CompacterConfig {
    fn check(&self, layer: &str, d: usize) -> Result<usize, ConfigError> {
        let r = bottleneck(layer, d, self.reduction_factor, self.bottleneck)?;
        let n = self.n;
        if n == 0 || !d.is_multiple_of(n) || r % n != 0 {
            return Err(ConfigError::invalid(
                layer,
                "n",
                format!(
                    "n = {n} must divide both the block size {d} and the bottleneck {r} \
                     (divisors of both: {:?})",
                    crate::adapter::shape::divisors(gcd(d, r))
                ),
            ));
        }
        Ok(r)
    }

    /// Trainable parameters of one layer (blocks of size `d`, bottleneck `r`): `3·d + 3·r`
    /// (`s`, `t` and a bias for each of the two PHM projections).
    pub fn num_params_per_layer(&self, d: usize) -> Result<usize, ConfigError> {
        let r = self.check(&layer_name(d, d), d)?;
        Ok(3 * d + 3 * r)
    }

    /// Parameters shared by all layers: the `n` matrices `Aᵢ [n, n]`, `n³`.
    pub fn num_shared_params(&self) -> usize {
        self.n.pow(3)
    }

    /// The shared rule `[n, n, n]` (`Aᵢ` Kaiming-uniform, fan-in `n`).
    pub fn init_rule<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, 3>>, ConfigError> {
        let n = self.n;
        if n == 0 {
            return Err(ConfigError::invalid("compacter", "n", "must be at least 1"));
        }
        Ok(kaiming_fan_in([n, n, n], n, device))
    }

    /// Builds one layer's adapter for `[d, d]` blocks (use it with a rule from
    /// [`CompacterConfig::init_rule`], or through [`super::BlockAdapters`]).
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Compacter<B>, ConfigError> {
        let layer = layer_name(d_in, d_out);
        let d = square(&layer, d_in, d_out)?;
        let r = self.check(&layer, d)?;
        let n = self.n;
        Ok(Compacter {
            down_s: kaiming_factor([d / n, n], device),
            // Fan-in 1: U(-1, 1), so the PHM weight's entries have about a Kaiming layer's scale.
            down_t: kaiming_fan_in([n, r / n], 1, device),
            down_bias: zero_factor([r], device),
            up_s: kaiming_factor([r / n, n], device),
            // Zero: the up projection starts at 0, so the adapter starts as the identity.
            up_t: zero_factor([n, d / n], device),
            up_bias: zero_factor([d], device),
            activation: self.activation,
        })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One layer of Compacter: `y = h + phm_up(act(phm_down(h) + down_bias)) + up_bias` with
/// `phm(x) = x·Σᵢ Aᵢ ⊗ (s[:, i]·t[i, :])`, computed without building the PHM weights
/// ([`crate::kron::phm_apply`]). The `Aᵢ` are not here: every layer uses the one shared rule.
#[derive(Module, Debug)]
pub struct Compacter<B: Backend> {
    /// Left vectors of the down projection's terms, `[d/n, n]`.
    pub down_s: Param<Tensor<B, 2>>,
    /// Right vectors of the down projection's terms, `[n, r/n]`.
    pub down_t: Param<Tensor<B, 2>>,
    /// Bias of the down projection, `[r]`.
    pub down_bias: Param<Tensor<B, 1>>,
    /// Left vectors of the up projection's terms, `[r/n, n]`.
    pub up_s: Param<Tensor<B, 2>>,
    /// Right vectors of the up projection's terms, `[n, d/n]`.
    pub up_t: Param<Tensor<B, 2>>,
    /// Bias of the up projection, `[d]`.
    pub up_bias: Param<Tensor<B, 1>>,
    /// The non-linearity.
    pub activation: Activation,
}

impl<B: Backend> BlockAdapter<B> for Compacter<B> {
    /// The shared rule `[n, n, n]`.
    type Shared = Tensor<B, 3>;

    /// The adapted output from the block output `h = fx` and the shared rule.
    fn forward<const D: usize>(
        &self,
        _x: Tensor<B, D>,
        h: Tensor<B, D>,
        rule: &Tensor<B, 3>,
    ) -> Tensor<B, D> {
        if h.shape().num_elements() == 0 {
            // No rows: the (empty) block output as it is (see `BlockAdapter::forward`).
            return h;
        }
        let z = phm_apply(
            h.clone(),
            rule.clone(),
            self.down_s.val(),
            self.down_t.val(),
        ) + self.down_bias.val().unsqueeze();
        let z = self.activation.apply(z);
        h + phm_apply(z, rule.clone(), self.up_s.val(), self.up_t.val())
            + self.up_bias.val().unsqueeze()
    }
}

/// Compacter's layers and the rule they share: one tensor that every layer's PHM projections
/// use, so it trains once with the sum of every layer's gradient.
#[derive(Module, Debug)]
pub struct CompacterStack<B: Backend> {
    /// The shared `Aᵢ`, `[n, n, n]`.
    pub rule: Param<Tensor<B, 3>>,
    /// One adapter per layer.
    pub layers: Vec<Compacter<B>>,
}
