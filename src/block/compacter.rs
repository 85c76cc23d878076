//! Compacter (Mahabadi et al. 2021): an Adapter whose projections are low-rank PHM layers,
//! `W = Σᵢ Aᵢ ⊗ (sᵢ·tᵢ)`, with the `Aᵢ` shared by every layer.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::houlsby::{bottleneck, default_reduction, silu};
use super::Activation;
use crate::adapter::{kaiming_factor, kaiming_fan_in, zero_factor};
use crate::error::AdapterError;
use crate::kron::phm_apply;

fn default_n() -> usize {
    4
}

/// Configuration of a [`Compacter`].
///
/// ```
/// use kron_adapters::block::CompacterConfig;
/// // The KronA paper's setting (Table 13): n = 4, reduction factor 32: 768 → 24 → 768.
/// let cfg = CompacterConfig::new();
/// assert_eq!(cfg.num_params_per_layer(768).unwrap(), 3 * 768 + 3 * 24);
/// assert_eq!(cfg.num_shared_params(), 4 * 4 * 4);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompacterConfig {
    /// The hypercomplex division `n`: `n` shared matrices `Aᵢ [n, n]`. Default 4.
    #[serde(default = "default_n")]
    pub n: usize,
    /// The bottleneck is `d / reduction_factor`. Default 32.
    #[serde(default = "default_reduction")]
    pub reduction_factor: usize,
    /// An explicit bottleneck size, overriding the reduction factor.
    #[serde(default)]
    pub bottleneck: Option<usize>,
    /// The non-linearity. Default SiLU ("swish").
    #[serde(default = "silu")]
    pub activation: Activation,
}

impl Default for CompacterConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl CompacterConfig {
    /// Compacter with the defaults above.
    pub fn new() -> Self {
        Self {
            n: default_n(),
            reduction_factor: default_reduction(),
            bottleneck: None,
            activation: silu(),
        }
    }

    /// Sets `n`.
    pub fn with_n(mut self, n: usize) -> Self {
        self.n = n;
        self
    }

    /// Sets the reduction factor.
    pub fn with_reduction_factor(mut self, reduction_factor: usize) -> Self {
        self.reduction_factor = reduction_factor;
        self
    }

    /// Sets the bottleneck size directly.
    pub fn with_bottleneck(mut self, bottleneck: usize) -> Self {
        self.bottleneck = Some(bottleneck);
        self
    }

    fn check(&self, layer: &str, d: usize) -> Result<usize, AdapterError> {
        let r = bottleneck(layer, d, self.reduction_factor, self.bottleneck)?;
        let n = self.n;
        if n == 0 || d % n != 0 || r % n != 0 {
            return Err(AdapterError::config(
                layer,
                "n",
                format!(
                    "n = {n} must divide both the block size {d} and the bottleneck {r} \
                     (divisors of both: {:?})",
                    crate::kron::divisors(gcd(d, r))
                ),
            ));
        }
        Ok(r)
    }

    /// Trainable parameters of one layer (blocks of size `d`, bottleneck `r`): `3·d + 3·r`
    /// (`s`, `t` and a bias for each of the two PHM projections).
    pub fn num_params_per_layer(&self, d: usize) -> Result<usize, AdapterError> {
        let r = self.check("compacter", d)?;
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
    ) -> Result<Param<Tensor<B, 3>>, AdapterError> {
        let n = self.n;
        if n == 0 {
            return Err(AdapterError::config("compacter", "n", "must be at least 1"));
        }
        Ok(kaiming_fan_in([n, n, n], n, device))
    }

    /// Builds one layer's adapter for blocks of size `d` (use it with a rule from
    /// [`CompacterConfig::init_rule`], or through [`super::BlockAdapters`]).
    pub fn init<B: Backend>(
        &self,
        d: usize,
        device: &B::Device,
    ) -> Result<Compacter<B>, AdapterError> {
        self.init_named(&format!("block[{d}]"), d, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d: usize,
        device: &B::Device,
    ) -> Result<Compacter<B>, AdapterError> {
        let r = self.check(layer, d)?;
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

impl<B: Backend> Compacter<B> {
    /// The adapted output from the block output `h` and the shared `rule [n, n, n]`.
    ///
    /// # Shapes
    /// - `h`: `[..., d]`; output `[..., d]`
    pub fn forward<const D: usize>(&self, h: Tensor<B, D>, rule: Tensor<B, 3>) -> Tensor<B, D> {
        let z = phm_apply(
            h.clone(),
            rule.clone(),
            self.down_s.val(),
            self.down_t.val(),
        ) + self.down_bias.val().unsqueeze();
        let z = self.activation.apply(z);
        h + phm_apply(z, rule, self.up_s.val(), self.up_t.val()) + self.up_bias.val().unsqueeze()
    }
}
