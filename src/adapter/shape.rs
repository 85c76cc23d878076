//! Choosing Kronecker factor shapes for a `[d_in, d_out]` layer: explicit shapes, one shape
//! with the other derived, a parameter budget, or PEFT's `factorization` near √d — the policy
//! shared by KronA, Kron-LoRA and KronA^B, whose configs get their shape fields from
//! `kron_config!` so that the fields, their defaults and their resolution are written once.

use crate::error::{ConfigError, FactorShapeError};

/// The divisors of `d`, ascending.
pub fn divisors(d: usize) -> Vec<usize> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1;
    while i * i <= d {
        if d.is_multiple_of(i) {
            small.push(i);
            if i * i != d {
                large.push(d / i);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// PEFT's (and LyCORIS's) `factorization(dimension, factor)`: splits `dim` into `(m, n)`,
/// `m·n = dim`.
///
/// - `factor > 0` dividing `dim`: `(factor, dim / factor)` as is (PEFT does not reorder it);
/// - `factor == -1`: the divisor pair nearest `√dim`, smaller first (`48 → (6, 8)`);
/// - any other `factor`: the same search, but `m` may not exceed `factor` (for a negative
///   `factor` other than -1 this stops at once and gives `(1, dim)`, as PEFT does).
///
/// PEFT's LoKr uses it for both sides: `(in_m, in_n) = factorization(d_in)`,
/// `(out_l, out_k) = factorization(d_out)`, `w1 [out_l, in_m]`, `w2 [out_k, in_n]`, so in
/// Burn layout `a = [in_m, out_l]` and `b = [in_n, out_k]`.
pub fn peft_factorization(dim: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dim.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dim / m);
    }
    let cap: i64 = if factor == -1 { dim as i64 } else { factor };
    let (mut m, mut n) = (1usize, dim);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dim.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dim / new_m;
        if new_m + new_n > length || (new_m as i64) > cap {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        std::mem::swap(&mut m, &mut n);
    }
    (m, n)
}

/// LyCORIS's variant of [`peft_factorization`]: identical, except that an explicit `factor`
/// pair whose first element is the larger is swapped (`factorization(128, 32) = (4, 32)` here,
/// `(32, 4)` in PEFT).
pub fn lycoris_factorization(dim: usize, factor: i64) -> (usize, usize) {
    let (m, n) = peft_factorization(dim, factor);
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// How to choose Kronecker factor shapes for a `[d_in, d_out]` layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeRequest {
    /// `[a_in, a_out]`, if given.
    pub a: Option<[usize; 2]>,
    /// `[b_in, b_out]`, if given.
    pub b: Option<[usize; 2]>,
    /// PEFT's `decompose_factor` (-1: near √d), used when neither shape nor budget is given.
    pub factor: i64,
    /// A target number of trainable parameters, used when no shape is given.
    pub budget: Option<usize>,
}

/// A budget-search candidate: (parameter miss, imbalance), a, b.
type Candidate = ((usize, f64), [usize; 2], [usize; 2]);

/// Resolves a [`ShapeRequest`] for a `[d_in, d_out]` layer into `(a, b)` shapes.
///
/// - both shapes: checked (`a_in·b_in = d_in`, `a_out·b_out = d_out`);
/// - one shape: the other is derived (`b = [d_in/a_in, d_out/a_out]`), checked to divide;
/// - a budget: the divisor pair whose `params(a, b)` is nearest the budget (ties: the most
///   balanced shapes), among the pairs `admissible(a, b)` accepts (Kron-LoRA: those whose `b`
///   can hold its rank) when there are any;
/// - otherwise PEFT's [`peft_factorization`] on each side with `factor`.
///
/// `params` counts an adapter's trainable parameters for candidate shapes (it differs between
/// KronA and Kron-LoRA).
pub fn resolve_factor_shapes(
    layer: &str,
    d_in: usize,
    d_out: usize,
    req: &ShapeRequest,
    params: impl Fn([usize; 2], [usize; 2]) -> usize,
    admissible: impl Fn([usize; 2], [usize; 2]) -> bool,
) -> Result<([usize; 2], [usize; 2]), ConfigError> {
    if d_in == 0 || d_out == 0 {
        return Err(ConfigError::invalid(
            layer,
            "d_in/d_out",
            format!("the layer is [{d_in}, {d_out}]; a Kronecker adapter needs non-zero sizes"),
        ));
    }
    let shape_error = |a: [usize; 2], b: [usize; 2]| {
        let (ei, bi) = peft_factorization(d_in, -1);
        let (eo, bo) = peft_factorization(d_out, -1);
        ConfigError::FactorShape(Box::new(FactorShapeError {
            layer: layer.to_string(),
            a,
            b,
            d_in,
            d_out,
            in_divisors: divisors(d_in),
            out_divisors: divisors(d_out),
            example_a: [ei, eo],
            example_b: [bi, bo],
        }))
    };
    let divides = |x: usize, d: usize| x > 0 && d.is_multiple_of(x);
    match (req.a, req.b) {
        (Some(a), Some(b)) => {
            if a[0] * b[0] == d_in && a[1] * b[1] == d_out && a.iter().chain(&b).all(|&v| v > 0) {
                Ok((a, b))
            } else {
                Err(shape_error(a, b))
            }
        }
        (Some(a), None) => {
            if divides(a[0], d_in) && divides(a[1], d_out) {
                Ok((a, [d_in / a[0], d_out / a[1]]))
            } else {
                Err(shape_error(a, [0, 0]))
            }
        }
        (None, Some(b)) => {
            if divides(b[0], d_in) && divides(b[1], d_out) {
                Ok(([d_in / b[0], d_out / b[1]], b))
            } else {
                Err(shape_error([0, 0], b))
            }
        }
        (None, None) => {
            if let Some(budget) = req.budget {
                let mut best: Option<Candidate> = None;
                let pairs: Vec<([usize; 2], [usize; 2])> = divisors(d_in)
                    .into_iter()
                    .flat_map(|ai| {
                        divisors(d_out)
                            .into_iter()
                            .map(move |ao| ([ai, ao], [d_in / ai, d_out / ao]))
                    })
                    .collect();
                let any_admissible = pairs.iter().any(|(a, b)| admissible(*a, *b));
                for (a, b) in pairs {
                    if any_admissible && !admissible(a, b) {
                        continue;
                    }
                    let [ai, ao] = a;
                    let miss = params(a, b).abs_diff(budget);
                    let balance = ((ai as f64) / (b[0] as f64)).ln().abs()
                        + ((ao as f64) / (b[1] as f64)).ln().abs();
                    let better = match &best {
                        None => true,
                        Some(((m, bal), _, _)) => miss < *m || (miss == *m && balance < *bal),
                    };
                    if better {
                        best = Some(((miss, balance), a, b));
                    }
                }
                let (_, a, b) = best.expect("d_in and d_out have divisors");
                Ok((a, b))
            } else {
                if req.factor == 0 || req.factor < -1 {
                    return Err(ConfigError::invalid(
                        layer,
                        "factor",
                        format!(
                            "{} is not a factor hint: use -1 (near √d, PEFT's default) or a \
                             positive size for a_in/a_out",
                            req.factor
                        ),
                    ));
                }
                let (ai, bi) = peft_factorization(d_in, req.factor);
                let (ao, bo) = peft_factorization(d_out, req.factor);
                Ok(([ai, ao], [bi, bo]))
            }
        }
    }
}

/// What a budget search needs to know of a Kronecker config besides its shape fields.
pub trait KronShapes {
    /// Trainable parameters of factors `a`, `b` (what a budget is matched against): by default
    /// `a_in·a_out + b_in·b_out`.
    fn factor_params(&self, a: [usize; 2], b: [usize; 2]) -> usize {
        a[0] * a[1] + b[0] * b[1]
    }

    /// May the budget search pick these shapes? By default any.
    fn admissible(&self, _a: [usize; 2], _b: [usize; 2]) -> bool {
        true
    }
}

/// Adds the Kronecker shape fields (`a_shape`, `b_shape`, `factor`, `budget`, `init`, `order`)
/// to a config declared as with [`crate::macros::config!`], and the method that resolves them:
/// `factor_shapes(d_in, d_out)`. The config implements [`KronShapes`].
macro_rules! kron_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($ctor:ident) {
            required { $($req:tt)* }
            optional { $($opt:tt)* }
            defaults { $($def:tt)* }
        }
    ) => {
        $crate::macros::config! {
            $(#[$meta])*
            pub struct $name($ctor) {
                required { $($req)* }
                optional {
                    /// Shape of `a`, `[a_in, a_out]` (`b` is derived when only `a` is given).
                    a_shape: [usize; 2],
                    /// Shape of `b`, `[b_in, b_out]` (for Kron-LoRA the shape of `b1·b2`; `a` is
                    /// derived when only `b` is given).
                    b_shape: [usize; 2],
                    /// A target number of trainable parameters per layer, used when no shape is
                    /// given: the divisor pair nearest it is chosen per layer.
                    budget: usize,
                    $($opt)*
                }
                defaults {
                    /// PEFT's `decompose_factor`, used when neither shape nor budget is given:
                    /// -1 splits each side near √d, a positive `f` makes `a_in` and `a_out` `f`
                    /// where it divides.
                    factor: i64 = -1,
                    /// Initialisation: the first factors Kaiming-uniform, the last zero
                    /// (`a` and `b`; for Kron-LoRA `a` and `b1`, then `b2`), so `ΔW = 0` at
                    /// step 0 (the KronA paper's Table 4).
                    init: $crate::FactorInit = $crate::FactorInit::KaimingZero,
                    /// Contraction order of the unmaterialized apply: by default the cheapest
                    /// for the shapes ([`crate::KronPlan::cheapest`]).
                    order: $crate::ContractionOrder = $crate::ContractionOrder::Auto,
                    $($def)*
                }
            }
        }

        impl $name {
            /// The factor shapes `(a, b)` this config gives a `[d_in, d_out]` layer (for
            /// Kron-LoRA, `b` is the shape of `b1·b2`).
            pub fn factor_shapes(
                &self,
                d_in: usize,
                d_out: usize,
            ) -> Result<([usize; 2], [usize; 2]), $crate::ConfigError> {
                let request = $crate::adapter::shape::ShapeRequest {
                    a: self.a_shape,
                    b: self.b_shape,
                    factor: self.factor,
                    budget: self.budget,
                };
                $crate::adapter::shape::resolve_factor_shapes(
                    &$crate::adapter::layer_name(d_in, d_out),
                    d_in,
                    d_out,
                    &request,
                    |a, b| $crate::adapter::shape::KronShapes::factor_params(self, a, b),
                    |a, b| $crate::adapter::shape::KronShapes::admissible(self, a, b),
                )
            }
        }
    };
}
pub(crate) use kron_config;
