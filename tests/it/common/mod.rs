//! Shared test helpers: the backend under test, seeded host-side data, and independent
//! references computed with plain loops (never with the crate's own Kronecker code).
#![allow(dead_code)]

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// The backend under test: NdArray by default, Wgpu with `--features wgpu`, CUDA with
/// `--features cuda` (on a machine with an NVIDIA GPU), LibTorch with `--features tch` (see
/// docs/benchmarks.md, "LibTorch", for building it).
#[cfg(not(any(feature = "wgpu", feature = "cuda", feature = "tch")))]
pub type TB = burn::backend::NdArray<f32>;
#[cfg(feature = "wgpu")]
pub type TB = burn::backend::Wgpu;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
pub type TB = burn::backend::Cuda;
#[cfg(all(feature = "tch", not(any(feature = "wgpu", feature = "cuda"))))]
pub type TB = burn::backend::LibTorch;

/// Its autodiff wrapper.
pub type AB = burn::backend::Autodiff<TB>;

/// Runs `check::<Inner, Autodiff>(&inner_device, &autodiff_device)` on the suite's backend and,
/// with `flex`, on flex explicitly: the paths `burn-flex` takes alone (the crate's `quirks`)
/// are tested whatever the suite's backend.
macro_rules! on_suite_and_flex {
    ($check:ident) => {{
        $check::<TB, AB>(&device(), &device());
        #[cfg(feature = "flex")]
        {
            type F = burn::backend::Flex;
            $check::<F, burn::backend::Autodiff<F>>(&Default::default(), &Default::default());
        }
    }};
}

pub fn device() -> burn::tensor::Device<TB> {
    Default::default()
}

/// A small deterministic generator (xorshift64*), so data does not depend on the backend's RNG
/// or on test-thread scheduling.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// A tensor of standard-normal values on any backend.
pub fn randn<B: Backend, const D: usize>(
    rng: &mut Rng,
    shape: [usize; D],
    dev: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(rng.vec(n), shape), dev)
}

/// A tensor from host values.
pub fn tensor<B: Backend, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    dev: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), dev)
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Reference Kronecker product with explicit loops:
/// out[i·b_in + k, j·b_out + l] = a[i, j]·b[k, l].
pub fn kron_ref(a: &[f32], [ai, ao]: [usize; 2], b: &[f32], [bi, bo]: [usize; 2]) -> Vec<f32> {
    let (d_in, d_out) = (ai * bi, ao * bo);
    let mut out = vec![0f32; d_in * d_out];
    for i in 0..ai {
        for j in 0..ao {
            for k in 0..bi {
                for l in 0..bo {
                    out[(i * bi + k) * d_out + j * bo + l] = a[i * ao + j] * b[k * bo + l];
                }
            }
        }
    }
    out
}

/// Reference matmul in f64: x [n, k] · w [k, m].
pub fn matmul_ref(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for r in 0..n {
        for c in 0..m {
            let mut s = 0f64;
            for t in 0..k {
                s += x[r * k + t] as f64 * w[t * m + c] as f64;
            }
            out[r * m + c] = s as f32;
        }
    }
    out
}

/// Transpose of a row-major [r, c] matrix.
pub fn transpose_ref(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = x[i * c + j];
        }
    }
    out
}

pub fn scale_ref(x: &[f32], s: f64) -> Vec<f32> {
    x.iter().map(|v| (*v as f64 * s) as f32).collect()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], rtol: f64, what: &str) {
    let e = rel_err(got, want);
    assert!(e <= rtol, "{what}: relative error {e:e} > {rtol:e}");
    assert!(
        want.iter().any(|v| *v != 0.0),
        "{what}: reference is all zeros, the test proves nothing"
    );
}

/// A file or folder under `tests/fixtures/`.
pub fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A PEFT case under `tests/fixtures/peft/` (see its README).
pub fn peft_fixture(case: &str) -> std::path::PathBuf {
    fixture("peft").join(case)
}

/// A fresh, empty scratch folder `kron-{group}-{name}-{pid}` in the temp dir. All the tests
/// share one process, so `group` (one per test module) keeps their folders apart.
pub fn scratch_dir(group: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kron-{group}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A package from the asset cache, for the real-model tests. When it is absent the test says
/// how to fetch it and is skipped — unless `KRON_ADAPTERS_REQUIRE_ASSETS=1` (CI sets it after
/// fetching), where an absent asset fails the test: CI never skips one silently.
#[cfg(feature = "finetune")]
pub fn asset(pkg: &kron_adapters::finetune::assets::Package) -> Option<std::path::PathBuf> {
    let cache = kron_adapters::finetune::AssetCache::default();
    let found = cache.find(pkg);
    if found.is_none() {
        let msg = format!(
            "{}=={} is not in {} — run `cargo run --features full --example finetune -- --fetch-only` \
             (and `--example llm -- --fetch-only` for the decoder) to fetch it",
            pkg.name,
            pkg.version,
            cache.root.display()
        );
        if std::env::var("KRON_ADAPTERS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}
