//! Write Modelyard plugins in a few lines of Rust.
//!
//! A plugin implements one trait — [`Router`], [`Processor`] or [`Flags`] — and registers it
//! with one line, `modelyard_sdk::register!(router: MyRouter);`, in a `cdylib` crate built
//! with `cargo build --release --target wasm32-wasip2`. The SDK owns all WebAssembly glue:
//! the configuration arrives parsed into the plugin's own `Config` type, requests arrive as
//! the plain Rust types of this crate, and the same code runs natively under `cargo test`.
//! See `README.md` for a walk-through.
//!
//! The contract is the WIT package in this crate's `wit/` directory: the request context,
//! variant statistics, tensors, flag evaluations and log levels below are its records, as
//! wit-bindgen generates them (documented there), with the SDK's helpers added. A plugin
//! built with this crate says which version of the package it implements in the name of
//! its export, and a host loads it if it speaks a version on the same semver line.

mod tensor;
mod types;

#[doc(hidden)]
pub mod __private;

pub use __private::bindings::host::Level;
pub use __private::bindings::types::{
    Datatype as DataType, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats,
};
pub use types::{Action, Decision, RECENT_LATENCIES};

/// This crate's version, which `modelyard plugin new` asks for: a new plugin builds with
/// the SDK of the host that wrote it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a plugin refuses its configuration or a request. The host logs it with the plugin's
/// name and applies the endpoint's failure policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

/// `Err(Error)` from a message: `return fail!("weights must be positive, got {w}")`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        ::core::result::Result::Err($crate::Error::new(::std::format!($($arg)*)))
    };
}

/// Chooses which variant answers a request.
pub trait Router: Sized + 'static {
    /// The plugin's configuration: its table in `modelyard.toml`.
    type Config: serde::de::DeserializeOwned;

    /// What the host keeps for this router between calls (a canary's step, the active
    /// colour …); `()` for a router that decides from the statistics alone. It starts as
    /// `Default::default()` and again whenever the router's configuration changes.
    type State: serde::Serialize + serde::de::DeserializeOwned + Default + Clone + PartialEq;

    /// Builds the router from its configuration, or refuses it.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// Picks the primary variant (and any shadows) for one request. A change to `state`
    /// is kept by the host and seen by the next call.
    fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        state: &mut Self::State,
    ) -> Result<Decision, Error>;

    /// Applies an operator's request from the admin API to `state`. Routers that take no
    /// orders keep this default, which refuses every action.
    fn act(
        &self,
        action: Action,
        _state: &mut Self::State,
        _variants: &[VariantStats],
        _now_ms: u64,
    ) -> Result<(), Error> {
        fail!(
            "this router does not take '{}'; change its configuration instead",
            action.name()
        )
    }

    /// The strategy's state for operators (`GET /admin/endpoints/{e}`); the state itself
    /// unless overridden.
    fn describe(&self, state: &Self::State, _variants: &[VariantStats]) -> serde_json::Value {
        serde_json::to_value(state).unwrap_or_default()
    }
}

/// Shapes a request's tensors before the model and its answer after. Both steps pass the
/// tensors through unchanged unless overridden.
pub trait Processor: Sized + 'static {
    type Config: serde::de::DeserializeOwned;

    fn new(config: Self::Config) -> Result<Self, Error>;

    fn preprocess(&self, _ctx: &RequestContext, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        Ok(inputs)
    }

    fn postprocess(
        &self,
        _ctx: &RequestContext,
        outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, Error> {
        Ok(outputs)
    }
}

/// Evaluates feature flags for a request.
pub trait Flags: Sized + 'static {
    type Config: serde::de::DeserializeOwned;

    fn new(config: Self::Config) -> Result<Self, Error>;

    fn evaluate(&self, ctx: &RequestContext) -> Vec<Evaluation>;

    /// Every flag this plugin knows, for the admin API; none unless overridden.
    fn describe(&self, _now_ms: u64) -> Vec<FlagInfo> {
        Vec::new()
    }
}

/// The index of the largest value — the first of equal ones, NaNs never — or `None` when
/// there is no number. The one definition of "top class" and "best arm": the host's shadow
/// comparison and accuracy by segment use it as the bandit router does, so a tie is broken
/// the same way wherever it is judged.
pub fn argmax(values: impl IntoIterator<Item = f64>) -> Option<usize> {
    values
        .into_iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f64)>, (i, v)| match best {
            _ if v.is_nan() => best,
            Some((_, top)) if v <= top => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// Logs into the host's log under the plugin's name; natively (in tests), to stderr.
pub fn log(level: Level, message: &str) {
    __private::log(level, message);
}

/// Registers the plugin type: `register!(router: T)`, `register!(processor: T)` or
/// `register!(flags: T)`; a plugin registers one. Outside WebAssembly it expands to
/// nothing, so the crate still builds and tests natively.
#[macro_export]
macro_rules! register {
    (router: $plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Export;
            impl $crate::__private::router::Guest for Export {
                fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&config, <$plugin as $crate::Router>::new)
                }
                fn route(
                    ctx: $crate::RequestContext,
                    variants: ::std::vec::Vec<$crate::VariantStats>,
                    state: ::std::string::String,
                ) -> ::core::result::Result<$crate::__private::router::Decision, ::std::string::String> {
                    $crate::__private::router::route::<$plugin>(ctx, variants, state)
                }
                fn act(
                    action: ::std::string::String,
                    args: ::std::string::String,
                    state: ::std::string::String,
                    variants: ::std::vec::Vec<$crate::VariantStats>,
                    now_ms: u64,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    $crate::__private::router::act::<$plugin>(&action, &args, state, variants, now_ms)
                }
                fn describe(
                    state: ::std::string::String,
                    variants: ::std::vec::Vec<$crate::VariantStats>,
                ) -> ::std::string::String {
                    $crate::__private::router::describe::<$plugin>(state, variants)
                }
            }
            $crate::__private::bindings::router::export_router!(Export with_types_in $crate::__private::bindings::router);
        };
    };
    (processor: $plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Export;
            impl $crate::__private::processor::Guest for Export {
                fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&config, <$plugin as $crate::Processor>::new)
                }
                fn preprocess(
                    ctx: $crate::RequestContext,
                    inputs: ::std::vec::Vec<$crate::Tensor>,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Tensor>, ::std::string::String> {
                    $crate::__private::processor::preprocess::<$plugin>(ctx, inputs)
                }
                fn postprocess(
                    ctx: $crate::RequestContext,
                    outputs: ::std::vec::Vec<$crate::Tensor>,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Tensor>, ::std::string::String> {
                    $crate::__private::processor::postprocess::<$plugin>(ctx, outputs)
                }
            }
            $crate::__private::bindings::processor::export_processor!(Export with_types_in $crate::__private::bindings::processor);
        };
    };
    (flags: $plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Export;
            impl $crate::__private::flags::Guest for Export {
                fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::configure(&config, <$plugin as $crate::Flags>::new)
                }
                fn evaluate(ctx: $crate::RequestContext) -> ::std::vec::Vec<$crate::Evaluation> {
                    $crate::__private::flags::evaluate::<$plugin>(ctx)
                }
                fn describe(now_ms: u64) -> ::std::vec::Vec<$crate::FlagInfo> {
                    $crate::__private::flags::describe::<$plugin>(now_ms)
                }
            }
            $crate::__private::bindings::flags::export_flags!(Export with_types_in $crate::__private::bindings::flags);
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_takes_the_first_of_equals_and_skips_nan() {
        assert_eq!(super::argmax([0.2, 0.5, 0.5, 0.1]), Some(1));
        assert_eq!(super::argmax([f64::NAN, -1.0, f64::NAN, -0.5]), Some(3));
        assert_eq!(super::argmax([f64::NAN]), None);
        assert_eq!(super::argmax([]), None);
        assert_eq!(
            super::argmax([f64::NEG_INFINITY, f64::NEG_INFINITY]),
            Some(0)
        );
    }
}
