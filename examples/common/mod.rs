//! Backend selection for the examples, by cargo feature: `cuda`, `metal`, `vulkan`, `wgpu`, or
//! on the CPU `cpu` (Burn's CubeCL CPU backend), `flex` (the default) or `ndarray` (optionally
//! with `openblas`). The library itself never names a backend.
#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub type Inner = burn::backend::Cuda;
#[cfg(all(feature = "metal", not(feature = "cuda")))]
pub type Inner = burn::backend::Metal;
#[cfg(all(feature = "vulkan", not(any(feature = "cuda", feature = "metal"))))]
pub type Inner = burn::backend::Vulkan;
#[cfg(all(
    feature = "wgpu",
    not(any(feature = "cuda", feature = "metal", feature = "vulkan"))
))]
pub type Inner = burn::backend::Wgpu;
#[cfg(all(
    feature = "tch",
    not(any(
        feature = "cuda",
        feature = "metal",
        feature = "vulkan",
        feature = "wgpu"
    ))
))]
pub type Inner = burn::backend::LibTorch;
#[cfg(all(
    feature = "cpu",
    not(any(
        feature = "cuda",
        feature = "metal",
        feature = "vulkan",
        feature = "wgpu",
        feature = "tch"
    ))
))]
pub type Inner = burn::backend::Cpu;
#[cfg(all(
    feature = "flex",
    not(any(
        feature = "cuda",
        feature = "metal",
        feature = "vulkan",
        feature = "wgpu",
        feature = "tch",
        feature = "cpu"
    ))
))]
pub type Inner = burn::backend::Flex;
#[cfg(not(any(
    feature = "cuda",
    feature = "metal",
    feature = "vulkan",
    feature = "wgpu",
    feature = "tch",
    feature = "cpu",
    feature = "flex"
)))]
pub type Inner = burn::backend::NdArray;

/// The training backend: autodiff over [`Inner`].
pub type Train = burn::backend::Autodiff<Inner>;

/// Registers the fused CubeCL kernel for the Kronecker apply (`kron::cube`) on [`Inner`]: on the
/// GPU backends without `fusion` (which wraps them in another backend type). Returns whether it
/// could.
pub fn register_fused_kernel() -> bool {
    #[cfg(all(
        any(
            feature = "cuda",
            feature = "metal",
            feature = "vulkan",
            feature = "wgpu"
        ),
        not(feature = "fusion")
    ))]
    {
        kron_adapters::kron::cube::register_fused_kernel::<Inner>();
        return true;
    }
    #[allow(unreachable_code)]
    false
}

/// A name for the selected backend, for printing.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "metal") {
        "metal"
    } else if cfg!(feature = "vulkan") {
        "vulkan"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "tch") {
        "libtorch (CPU)"
    } else if cfg!(feature = "cpu") {
        "cubecl cpu"
    } else if cfg!(feature = "flex") {
        "flex (CPU)"
    } else if cfg!(feature = "openblas") {
        "ndarray + OpenBLAS (CPU)"
    } else {
        "ndarray (CPU)"
    }
}

/// Replaces what lies between the markers `begin` and `end` in the text file at `path` with
/// `body`, keeping everything around them (the hand-written analysis); appends the markers
/// with `heading` before them when the file or the markers are absent.
pub fn write_between(
    path: &std::path::Path,
    heading: &str,
    begin: &str,
    end: &str,
    body: &str,
) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{begin}\n{body}\n{end}{}",
            &old[..b],
            &old[e + end.len()..]
        ),
        _ => format!("{old}\n{heading}\n\n{begin}\n{body}\n{end}\n"),
    };
    std::fs::write(path, new)
}

/// Ends the program with exit code 1 and the error on stderr when `result` is an error (the
/// examples' `main` runs a `run()` that returns one).
pub fn exit_on_error(result: Result<(), Box<dyn std::error::Error>>) {
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
