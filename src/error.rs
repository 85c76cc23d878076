//! The crate's two error types.
//!
//! * [`ConfigError`]: what the Kronecker math, the adapter and block configs, placement and the
//!   quantization math can reject — shapes that do not multiply out, ranks, non-finite values,
//!   bad fields. It knows nothing of files.
//! * [`AdapterError`]: everything that can go wrong reading, writing, loading, merging or
//!   fetching — files that do not parse or do not fit the model, unsupported options of foreign
//!   formats, I/O — and wraps a [`ConfigError`] (`#[from]`), so `?` carries one into the other.
//!   A file whose content describes an invalid adapter is an [`AdapterError::InvalidSpec`]: the
//!   file named, the config error as its source.
//!
//! Neither is ever a panic: every message names the layer (or file and tensor), the shapes
//! involved and what to do about it.

use std::path::PathBuf;

/// A configuration, shape or value that the adapters' math cannot accept.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Kronecker factor shapes that do not multiply out to the layer's shape.
    #[error("{0}")]
    FactorShape(Box<FactorShapeError>),

    /// A rank that is zero or larger than the dimensions it factorizes.
    #[error("{layer}: rank {rank} is invalid: {reason}")]
    Rank {
        /// Which layer.
        layer: String,
        /// The rank asked for.
        rank: usize,
        /// Why it is refused and which ranks are valid.
        reason: String,
    },

    /// A configuration value that makes no sense (zero size, non-finite scale, ...).
    #[error("{layer}: invalid `{field}`: {reason}")]
    Invalid {
        /// Which layer (or which config when not layer-specific).
        layer: String,
        /// The configuration field.
        field: String,
        /// What is wrong and what would be right.
        reason: String,
    },

    /// `merge` (or quantization) found NaN or infinite values (as PEFT's `safe_merge`).
    #[error(
        "{layer}: refusing to merge: W + ΔW has {count} non-finite value(s) (NaN or ±Inf); \
         the adapter has diverged, check the learning rate or load an earlier checkpoint"
    )]
    NonFinite {
        /// Which layer.
        layer: String,
        /// How many values are NaN or infinite.
        count: usize,
    },
}

impl ConfigError {
    /// Replaces the layer name (the generic placement and loaders call it with the layer's full
    /// path, so a message says `encoder.layer.3.attention.self.query` instead of a shape).
    pub fn at(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        match &mut self {
            ConfigError::FactorShape(e) => e.layer = name,
            ConfigError::Rank { layer, .. }
            | ConfigError::Invalid { layer, .. }
            | ConfigError::NonFinite { layer, .. } => *layer = name,
        }
        self
    }

    /// The first of `sizes` (field name, value) that is 0, as an [`ConfigError::Invalid`] of
    /// `layer` naming it: the check every configuration of sizes read from a file needs.
    pub fn nonzero(layer: &str, sizes: &[(&str, usize)]) -> Result<(), ConfigError> {
        match sizes.iter().find(|(_, n)| *n == 0) {
            Some((field, _)) => Err(Self::invalid(layer, *field, "0: use at least 1")),
            None => Ok(()),
        }
    }

    /// An [`ConfigError::Invalid`].
    pub fn invalid(
        layer: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            layer: layer.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Everything that can go wrong loading, saving, converting, merging or fetching adapters and
/// models. Configuration errors arrive wrapped ([`AdapterError::Config`]).
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A configuration error (from the user's own config or arguments).
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A file that parses but describes an adapter that cannot exist (factor counts or shapes
    /// that do not chain, sizes that disagree with the factors, absurd scales).
    #[error("{path}: {source}")]
    InvalidSpec {
        /// The file.
        path: String,
        /// What is invalid.
        #[source]
        source: ConfigError,
    },

    /// A checkpoint tensor whose shape is not the model's.
    #[error(
        "checkpoint {path}: parameter `{param}` has shape {found:?} in the file but {expected:?} \
         in the model; the file was saved from a model with a different adapter configuration"
    )]
    CheckpointShape {
        /// The file.
        path: String,
        /// The parameter's path in the module tree.
        param: String,
        /// The shape the model has.
        expected: Vec<usize>,
        /// The shape the file has.
        found: Vec<usize>,
    },

    /// A checkpoint that lacks parameters the model has, or has parameters the model lacks.
    #[error(
        "checkpoint {path}: does not match the model: missing from the file {missing:?}, \
         in the file but not in the model {unexpected:?}; build the model with the same adapter \
         configuration as the one saved"
    )]
    CheckpointMismatch {
        /// The file.
        path: String,
        /// Model parameters the file lacks.
        missing: Vec<String>,
        /// File tensors the model lacks.
        unexpected: Vec<String>,
    },

    /// A checkpoint whose adapter metadata disagrees with the model's adapters.
    #[error("checkpoint {path}: {message}")]
    CheckpointMeta {
        /// The file.
        path: String,
        /// What disagrees.
        message: String,
    },

    /// A pretrained checkpoint that does not hold exactly the weights the model needs.
    #[error(
        "{path}: not a checkpoint for this model: missing keys {missing:?}; unexpected keys \
         {unexpected:?}; shape or dtype mismatches {mismatched:?}"
    )]
    PretrainedMismatch {
        /// The file.
        path: String,
        /// Keys the model needs that the file lacks.
        missing: Vec<String>,
        /// Keys in the file the model does not use.
        unexpected: Vec<String>,
        /// Keys whose shape or dtype differ.
        mismatched: Vec<String>,
    },

    /// A file that is not what it claims to be (bad safetensors header, bad JSON, ...).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What could not be parsed.
        message: String,
    },

    /// An option or feature of a foreign file (PEFT's DoRA, conv layers, a GGUF quantization
    /// type, ...) that this crate does not support: refused, never silently ignored.
    #[error("unsupported `{option}`: {message}")]
    Unsupported {
        /// The option, as the file names it.
        option: String,
        /// What is unsupported and where.
        message: String,
    },

    /// Two inputs that do not fit together (an adapter and the base checkpoint it is merged into).
    #[error("the inputs do not fit: {message}")]
    Incompatible {
        /// What does not fit, and how to fix it.
        message: String,
    },

    /// A model or data package that could not be found, fetched or unpacked.
    #[error("asset {package}: {message}")]
    Asset {
        /// `name==version`.
        package: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// An I/O error, with the path it concerns.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The broad class of an [`AdapterError`], for programs that map errors to exit codes or HTTP
/// statuses (the command-line tool does: see its `--help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file or folder could not be read or written (missing, exists, permissions).
    Io,
    /// The caller's own configuration or arguments are invalid.
    Usage,
    /// An input file is malformed or inconsistent, or does not fit the model.
    Malformed,
    /// A valid input that this crate does not support.
    Unsupported,
    /// Inputs that do not fit together, or a merge that would produce NaN/Inf.
    Incompatible,
    /// A model or data package could not be fetched.
    Asset,
}

impl AdapterError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AdapterError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`AdapterError::Format`] error about `path`.
    pub fn format(path: impl Into<String>, message: impl Into<String>) -> Self {
        AdapterError::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdapterError::Io { .. } => ErrorKind::Io,
            AdapterError::Config(ConfigError::NonFinite { .. }) => ErrorKind::Incompatible,
            AdapterError::Config(_) => ErrorKind::Usage,
            AdapterError::Unsupported { .. } => ErrorKind::Unsupported,
            AdapterError::Incompatible { .. } => ErrorKind::Incompatible,
            AdapterError::Asset { .. } => ErrorKind::Asset,
            AdapterError::InvalidSpec { .. }
            | AdapterError::CheckpointShape { .. }
            | AdapterError::CheckpointMismatch { .. }
            | AdapterError::CheckpointMeta { .. }
            | AdapterError::PretrainedMismatch { .. }
            | AdapterError::Format { .. } => ErrorKind::Malformed,
        }
    }
}

/// Details of [`ConfigError::FactorShape`]: the shapes asked for and every valid choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorShapeError {
    /// Which layer.
    pub layer: String,
    /// The `a` shape asked for (`[a_in, a_out]`; `[0, 0]` when only `b` was given).
    pub a: [usize; 2],
    /// The `b` shape asked for (`[b_in, b_out]`; `[0, 0]` when only `a` was given).
    pub b: [usize; 2],
    /// The layer's input size.
    pub d_in: usize,
    /// The layer's output size.
    pub d_out: usize,
    /// Every valid `a_in` (and `b_in`): the divisors of `d_in`.
    pub in_divisors: Vec<usize>,
    /// Every valid `a_out` (and `b_out`): the divisors of `d_out`.
    pub out_divisors: Vec<usize>,
    /// A valid choice near √d, as PEFT's `factorization` picks it.
    pub example_a: [usize; 2],
    /// The `b` that goes with `example_a`.
    pub example_b: [usize; 2],
}

impl std::fmt::Display for FactorShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b, d_in, d_out) = (self.a, self.b, self.d_in, self.d_out);
        let shown = |s: [usize; 2]| {
            if s == [0, 0] {
                "(derived)".to_string()
            } else {
                format!("{s:?}")
            }
        };
        write!(
            f,
            "{}: Kronecker factors a {} ⊗ b {} do not fit a [{d_in}, {d_out}] layer \
             ([d_in, d_out]): need a_in·b_in = {d_in} and a_out·b_out = {d_out}",
            self.layer,
            shown(a),
            shown(b)
        )?;
        if a != [0, 0] && b != [0, 0] {
            write!(f, ", got [{}, {}]", a[0] * b[0], a[1] * b[1])?;
        }
        write!(
            f,
            ". Valid a_in and b_in divide {d_in}: {:?}; valid a_out and b_out divide {d_out}: \
             {:?}. For example a {:?} with b {:?}.",
            self.in_divisors, self.out_divisors, self.example_a, self.example_b
        )
    }
}
