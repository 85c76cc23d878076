//! The one macro behind every configuration struct of the crate.

/// Declares a configuration struct, stating each field's default once, next to the field, and
/// derives the rest: the struct (public fields, documented with their defaults), a constructor
/// taking the required fields (named in parentheses after the struct: `new` as a rule, `auto`
/// where `new` takes explicit shapes), a `with_<field>` setter for every other field (an optional field's setter
/// takes the value, not an `Option`), serde (JSON) where a missing field takes its default and an
/// unknown field is refused, and Burn's [`burn::config::Config`] (`save`/`load`).
///
/// Burn's `#[derive(Config)]` with `#[config(default = ...)]` is the model (burn-nn's
/// `LinearConfig`); it is not used as is because its deserializer requires every defaulted field
/// to be present in the JSON, and experiment files written by hand leave most of them out.
///
/// ```ignore
/// config! {
///     /// Configuration of a LoRA adapter.
///     pub struct LoraConfig(new) {
///         required {
///             /// The rank.
///             rank: usize,
///         }
///         optional {
///             /// `alpha` in `scale = alpha / r`.
///             alpha: f64,
///         }
///         defaults {
///             /// Initialisation.
///             init: FactorInit = FactorInit::KaimingZero,
///         }
///     }
/// }
/// ```
macro_rules! config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($ctor:ident) {
            required { $( $(#[$rmeta:meta])* $rfield:ident : $rty:ty ),* $(,)? }
            optional { $( $(#[$ometa:meta])* $ofield:ident : $oty:ty ),* $(,)? }
            defaults { $( $(#[$dmeta:meta])* $dfield:ident : $dty:ty = $dval:expr ),* $(,)? }
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize)]
        pub struct $name {
            $( $(#[$rmeta])* pub $rfield: $rty, )*
            $(
                $(#[$ometa])*
                ///
                /// Optional; default: none.
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $ofield: Option<$oty>,
            )*
            $(
                $(#[$dmeta])*
                ///
                #[doc = concat!("Default: `", stringify!($dval), "`.")]
                pub $dfield: $dty,
            )*
        }

        impl $name {
            /// The configuration with these required fields and every other field at its
            /// default.
            #[allow(clippy::new_without_default)]
            pub fn $ctor($($rfield: $rty),*) -> Self {
                Self {
                    $( $rfield, )*
                    $( $ofield: None, )*
                    $( $dfield: $dval, )*
                }
            }

            paste::paste! {
                $(
                    #[doc = concat!("Sets `", stringify!($rfield), "`.")]
                    pub fn [<with_ $rfield>](mut self, $rfield: $rty) -> Self {
                        self.$rfield = $rfield;
                        self
                    }
                )*
                $(
                    #[doc = concat!("Sets `", stringify!($ofield), "`.")]
                    pub fn [<with_ $ofield>](mut self, $ofield: $oty) -> Self {
                        self.$ofield = Some($ofield);
                        self
                    }
                )*
                $(
                    #[doc = concat!("Sets `", stringify!($dfield), "`.")]
                    pub fn [<with_ $dfield>](mut self, $dfield: $dty) -> Self {
                        self.$dfield = $dfield;
                        self
                    }
                )*
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Fields {
                    $( #[serde(default)] $rfield: Option<$rty>, )*
                    $( #[serde(default)] $ofield: Option<$oty>, )*
                    $( #[serde(default)] $dfield: Option<$dty>, )*
                }
                let f = <Fields as serde::Deserialize>::deserialize(deserializer)?;
                Ok(Self {
                    $(
                        $rfield: f.$rfield.ok_or_else(|| {
                            <D::Error as serde::de::Error>::missing_field(stringify!($rfield))
                        })?,
                    )*
                    $( $ofield: f.$ofield, )*
                    $( $dfield: f.$dfield.unwrap_or_else(|| $dval), )*
                })
            }
        }

        impl burn::config::Config for $name {}
    };
}
pub(crate) use config;
