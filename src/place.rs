//! Placing adapters into any model, as PEFT's `inject_adapter` does for every model: one walk
//! over the model's adapted layers ([`AdapterLayers`]) that attaches an adapter where a rule
//! says so, naming errors by the layer's full path.
//!
//! * [`place_with`] is the mechanism: for each layer path it asks a closure for an adapter.
//! * [`place`] serves a [`PlacementConfig`] (targets by PEFT's `target_modules` rules, per-target
//!   overrides by PEFT's `rank_pattern` rules); adapter files and PEFT folders attach through
//!   [`crate::store::attach`], and [`crate::store::load_adapters`] refills a configured model —
//!   all three through [`place_with`].
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::nn::LinearConfig;
//! use kron_adapters::{place, AdaptedLinear, AdapterConfig, AdapterLayers, KronAConfig, LoraConfig, PlacementConfig, Targets};
//!
//! let device = Default::default();
//! let layers: Vec<AdaptedLinear<NdArray>> = (0..2)
//!     .map(|_| AdaptedLinear::frozen(LinearConfig::new(64, 64).init(&device)))
//!     .collect();
//! // KronA on every layer, but LoRA rank 4 on layer 1 (a pattern, as PEFT's rank_pattern).
//! let cfg = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()))
//!     .with_pattern("1", AdapterConfig::Lora(LoraConfig::new(4)));
//! let layers = place(layers, &cfg, &device).unwrap();
//! let specs = layers.adapter_specs();
//! assert_eq!(specs[0].1.method.to_string(), "KronA");
//! assert_eq!(specs[1].1.method.to_string(), "LoRA");
//! ```

use std::collections::BTreeSet;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterConfig};
use crate::block::BlockAdapterConfig;
use crate::error::ConfigError;
use crate::linear::{AdaptedLinear, AdapterLayers};
use crate::training::TrainMode;

/// Which layers get an adapter, by their full path, with PEFT's `target_modules` rules:
///
/// - a list: a path matches when it equals an entry or ends with `.` + an entry
///   (`"output.dense"` matches `encoder.layer.0.output.dense` and
///   `encoder.layer.0.attention.output.dense`);
/// - a string: a regular expression that must match the whole path.
///
/// In JSON: `["query", "value"]` or `"encoder\\.layer\\.[0-2]\\..*(query|value)"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Names or name suffixes.
    List(Vec<String>),
    /// A regex matched against the whole path.
    Regex(String),
}

impl Targets {
    /// From a list of names or suffixes.
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Targets::List(names.into_iter().map(Into::into).collect())
    }

    /// Checks that a regex target compiles.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Targets::Regex(r) = self {
            compile(&format!("^(?:{r})$"), "targets")?;
        }
        Ok(())
    }

    /// Does the layer at `path` match?
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Targets::List(list) => list
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .map(|re| re.is_match(path))
                .unwrap_or(false),
        }
    }
}

fn compile(re: &str, field: &str) -> Result<regex::Regex, ConfigError> {
    regex::Regex::new(re)
        .map_err(|e| ConfigError::invalid("placement", field, format!("bad regex {re:?}: {e}")))
}

/// Does PEFT's pattern `key` (of `rank_pattern`, `alpha_pattern`) select the layer at `path`?
/// PEFT's rule: `re.match(rf"(.*\.)?({key})$", path)`, i.e. the key matches the whole path or a
/// suffix that starts after a `.`. A key that is not a valid regex matches nothing.
pub fn pattern_matches(key: &str, path: &str) -> bool {
    regex::Regex::new(&format!(r"^(.*\.)?({key})$"))
        .map(|re| re.is_match(path))
        .unwrap_or(false)
}

/// The first key of `keys` (in order) that selects `path` by [`pattern_matches`]: PEFT tries
/// `rank_pattern`'s keys in the order the file lists them and takes the first match.
pub fn first_pattern<'k, V>(
    keys: impl IntoIterator<Item = (&'k String, V)>,
    path: &str,
) -> Option<V> {
    keys.into_iter()
        .find(|(k, _)| pattern_matches(k, path))
        .map(|(_, v)| v)
}

/// An ordered map of pattern keys to values, kept in the order written (serde reads a JSON
/// object into it entry by entry), because a pattern map's first match wins.
#[derive(Clone, Debug, PartialEq)]
pub struct Patterns<V>(pub Vec<(String, V)>);

impl<V> Default for Patterns<V> {
    fn default() -> Self {
        Patterns(Vec::new())
    }
}

impl<V> Patterns<V> {
    /// The value of the first key selecting `path` ([`first_pattern`]).
    pub fn lookup(&self, path: &str) -> Option<&V> {
        first_pattern(self.0.iter().map(|(k, v)| (k, v)), path)
    }

    /// No patterns?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V: Serialize> Serialize for Patterns<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Patterns<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Patterns<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from pattern keys to values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Patterns(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

crate::macros::config! {
    /// Where adapters go in a model and what trains: one JSON object covers every method of the
    /// KronA paper's Table 1 and Kron-LoRA. (Not to be confused with PEFT's
    /// `adapter_config.json`, which [`crate::store::peft`] reads and writes.)
    ///
    /// ```json
    /// {"linear": {"method": "KronA"}, "targets": ["query", "value"]}       // KronA on q, v
    /// {"linear": {"method": "KronA"}, "patterns": {"value": {"method": "LoRA", "rank": 4}}}
    /// {"block": {"method": "KronAB", "residual": "Learned"}}               // KronA^B_res
    /// {"train": "BitFit"}                                                  // BitFit
    /// ```
    pub struct PlacementConfig(new) {
        required {}
        optional {
            /// The adapter put on each targeted linear layer (LoRA, KronA, Kron-LoRA).
            linear: AdapterConfig,
            /// Which linear layers get `linear`, by path; without it, the model's default
            /// targets ([`AdapterLayers::default_targets`]: for BERT every linear of every
            /// layer, for a Llama decoder its seven projections).
            targets: Targets,
            /// The block adapter attached to every FFN (KronA^B, KronA^B_res, PA, Adapter,
            /// Compacter), where the model has FFN blocks.
            block: BlockAdapterConfig,
        }
        defaults {
            /// Per-target overrides, as PEFT's `rank_pattern`: the first key (in the order
            /// written) selecting a targeted layer's path by PEFT's rule
            /// ([`pattern_matches`]) gives that layer this adapter config instead of `linear`.
            patterns: Patterns<AdapterConfig> = Patterns::default(),
            /// Which parameters train besides adapters: `Adapters`, `BitFit` (biases and the
            /// adapters) or `Full`.
            train: TrainMode = TrainMode::Adapters,
        }
    }
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PlacementConfig {
    /// Linear adapters on the model's default targets.
    pub fn linear(config: AdapterConfig) -> Self {
        Self::new().with_linear(config)
    }

    /// A block adapter on every FFN.
    pub fn block(config: BlockAdapterConfig) -> Self {
        Self::new().with_block(config)
    }

    /// No adapters, this training mode (BitFit, full fine-tuning, or a frozen model).
    pub fn mode(train: TrainMode) -> Self {
        Self::new().with_train(train)
    }

    /// Adds a pattern (after those already there: earlier patterns win).
    pub fn with_pattern(mut self, key: impl Into<String>, config: AdapterConfig) -> Self {
        self.patterns.0.push((key.into(), config));
        self
    }

    /// Checks the targets' and patterns' regexes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.targets {
            t.validate()?;
        }
        for (k, _) in &self.patterns.0 {
            compile(&format!(r"^(.*\.)?({k})$"), "patterns")?;
        }
        Ok(())
    }

    /// The adapter config for the layer at `path`, given the model's default targets: `None`
    /// when the layer is not targeted (or there is no linear adapter).
    pub fn config_for<'a>(
        &'a self,
        path: &str,
        default_targets: Option<&Targets>,
    ) -> Option<&'a AdapterConfig> {
        let linear = self.linear.as_ref()?;
        let targeted = match self.targets.as_ref().or(default_targets) {
            Some(t) => t.matches(path),
            None => true,
        };
        targeted.then(|| self.patterns.lookup(path).unwrap_or(linear))
    }
}

/// What a placement did: the model and the paths of the layers that got an adapter, in model
/// order.
pub struct Placed<M> {
    /// The model with its adapters.
    pub model: M,
    /// The paths of the layers that got an adapter.
    pub layers: Vec<String>,
}

/// The one placement mechanism. For every adapted layer of `model`, in order, `choose(path,
/// layer)` returns the adapter to put there (or `None` to leave the layer as it is); then the
/// adapters are attached, each checked against its layer's size. Nothing is attached unless
/// every choice succeeded; errors name the layer's path.
pub fn place_with<B, M, E>(
    mut model: M,
    mut choose: impl FnMut(&str, &AdaptedLinear<B>) -> Result<Option<Adapter<B>>, E>,
) -> Result<Placed<M>, E>
where
    B: Backend,
    M: AdapterLayers<B>,
    E: From<ConfigError>,
{
    let mut chosen = Vec::new();
    for (path, layer) in model.adapter_layers() {
        if let Some(adapter) = choose(&path, layer)? {
            chosen.push((path, adapter));
        }
    }
    let layers: Vec<String> = chosen.iter().map(|(p, _)| p.clone()).collect();
    let mut chosen = chosen.into_iter().peekable();
    for (path, layer) in model.adapter_layers_mut() {
        if chosen.peek().is_some_and(|(p, _)| *p == path) {
            let (_, adapter) = chosen.next().expect("peeked");
            layer.set_adapter(adapter).map_err(|e| e.at(&path))?;
        }
    }
    Ok(Placed { model, layers })
}

/// Attaches the linear adapters `config` describes to `model` (replacing any there): each
/// targeted layer gets `config.linear` (or its pattern's config), built for the layer's size.
/// Fails, naming the layer's path, if an adapter cannot be built, and fails if a linear adapter
/// is configured but no layer is targeted (the error lists the model's layers). Block adapters
/// and the training mode are the model's and the trainer's business.
pub fn place<B: Backend, M: AdapterLayers<B>>(
    model: M,
    config: &PlacementConfig,
    device: &B::Device,
) -> Result<M, ConfigError> {
    config.validate()?;
    let defaults = model.default_targets();
    let placed = place_with(model, |path, layer| {
        config
            .config_for(path, defaults.as_ref())
            .map(|c| {
                c.init::<B>(layer.d_in(), layer.d_out(), device)
                    .map_err(|e| e.at(path))
            })
            .transpose()
    })?;
    if config.linear.is_some() && placed.layers.is_empty() {
        let known: BTreeSet<String> = placed
            .model
            .adapter_layers()
            .into_iter()
            .map(|(p, _)| p)
            .take(12)
            .collect();
        return Err(ConfigError::invalid(
            "placement",
            "targets",
            format!(
                "{:?} matches none of the model's layers; they include {known:?}",
                config.targets.as_ref().or(defaults.as_ref())
            ),
        ));
    }
    Ok(placed.model)
}

/// How layer names in an adapter file map to the paths of a model (or of a base checkpoint):
/// prefix rewrites, applied in order, first match wins. The identity by default.
///
/// ```
/// use kron_adapters::NameMap;
/// // A PEFT adapter trained on BertForSequenceClassification ("bert.encoder.layer.0...")
/// // applied to this crate's encoder ("encoder.layer.0...").
/// let map = NameMap::new().with_prefix("bert.", "");
/// assert_eq!(map.apply("bert.encoder.layer.0.attention.self.query"), "encoder.layer.0.attention.self.query");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameMap {
    rules: Vec<(String, String)>,
}

impl NameMap {
    /// The identity.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule: names starting with `from` get `to` instead.
    pub fn with_prefix(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.rules.push((from.into(), to.into()));
        self
    }

    /// Parses `FROM=TO` and adds it.
    pub fn parse_rule(mut self, rule: &str) -> Result<Self, ConfigError> {
        let (from, to) = rule.split_once('=').ok_or_else(|| {
            ConfigError::invalid("name map", "rule", format!("{rule:?} is not FROM=TO"))
        })?;
        self.rules.push((from.into(), to.into()));
        Ok(self)
    }

    /// The mapped name.
    pub fn apply(&self, name: &str) -> String {
        for (from, to) in &self.rules {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}
