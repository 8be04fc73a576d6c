//! Endpoints as configured, bound to the plugins that serve them. The set is rebuilt
//! whenever `modelyard.toml` or the plugin directory changes and swapped in whole; a
//! binding whose plugin, configuration or world is wrong is refused and the endpoint keeps
//! the binding it had.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::decisions::Recent;
use super::stats::{ShadowCounters, StatsBook, VariantCounters};
use super::strategy::{ActError, StrategyState};
use crate::config::{EndpointConfig, PluginRef, ProcessorFailure};
use crate::plugins::{
    FlagInfo, FlagsWorld, Library, Plugin, PluginEngine, PluginError, Pool, ProcessorWorld,
    RouterWorld, VariantStats, World,
};
use crate::telemetry::{Spending, Telemetry, VariantFailure, now_ms};

/// One variant: a model, at a version or at its default.
pub struct Variant {
    pub name: String,
    pub model: String,
    pub version: Option<u64>,
    pub stats: Arc<VariantCounters>,
    pub shadow: Arc<ShadowCounters>,
    /// The CPU time its model's runs took for it, and their predictions.
    pub spending: Spending,
}

impl Variant {
    /// The variant's counters as routers see them.
    fn plugin_stats(&self) -> VariantStats {
        let (stats, recent) = self.stats.snapshot_with_recent();
        VariantStats {
            name: self.name.clone(),
            model: self.model.clone(),
            version: self.version.map(|v| v.to_string()).unwrap_or_default(),
            requests: stats.requests,
            errors: stats.errors,
            latency_p50_us: stats.latency_p50_us,
            latency_p99_us: stats.latency_p99_us,
            reward_count: stats.reward_count,
            reward_sum: stats.reward_sum,
            recent_latency_us: recent,
        }
    }
}

/// A flag whose value picks the variant: `(flag variant, index into variants)` pairs.
pub struct FlagRoute {
    pub flag: String,
    /// The context attribute the flag's value arrives in: `flag.<name>`.
    pub attribute: String,
    pub variants: Vec<(String, usize)>,
}

/// A plugin bound to an endpoint with its configuration.
pub struct Bound<W: World> {
    pub plugin: String,
    hash: Option<String>,
    config: String,
    pub pool: Arc<Pool<W>>,
}

pub struct Endpoint {
    pub name: String,
    pub variants: Vec<Variant>,
    /// Index into `variants` of the variant that answers without (or despite) a router.
    pub default_variant: usize,
    /// Index of the variant that answers when the routed one fails or is over budget.
    pub fallback: Option<usize>,
    pub latency_budget: Option<Duration>,
    pub router: Option<Bound<RouterWorld>>,
    pub processors: Vec<Bound<ProcessorWorld>>,
    pub flags: Vec<Bound<FlagsWorld>>,
    pub on_processor_error: ProcessorFailure,
    pub targeting_key_header: Option<String>,
    pub attribute_headers: Vec<String>,
    pub flag_route: Option<FlagRoute>,
    /// The attribute whose values segment accuracy and reward.
    pub segment_by: Option<String>,
    /// Each flag the flags plugins declared when the endpoint was built, by key: what the
    /// flag-evaluation metric may name (anything else a plugin returns is counted as
    /// `other`), and what the control plane compares to tell a flag flip.
    pub flag_definitions: BTreeMap<String, FlagInfo>,
    /// Its series of the queue-time metric, when metrics are on.
    pub queue_seconds: Option<crate::telemetry::Seconds>,
    pub strategy: Arc<StrategyState>,
    pub recent: Arc<Recent>,
    /// Where its metrics, audit records and router state go.
    pub telemetry: Arc<Telemetry>,
}

impl Endpoint {
    /// Charges `variant` one request that failed after `took`: in the statistics routers
    /// judge it by, and in the metrics by why.
    pub fn charge(&self, variant: &Variant, took: Duration, failure: VariantFailure) {
        variant.stats.record(took, true);
        if let Some(metrics) = self.telemetry.metrics() {
            metrics.variant_failed(&self.name, &variant.name, failure);
        }
    }

    /// Applies an operator's `action` (JSON `args`) through the router; returns the router's
    /// description of the new state.
    pub fn act(&self, action: &str, args: &str) -> Result<serde_json::Value, ActError> {
        let router = self
            .router
            .as_ref()
            .ok_or_else(|| ActError::NoRouter(self.name.clone()))?;
        for _ in 0..8 {
            let stats = self.stats();
            let seen = self.strategy.load();
            let new = router
                .pool
                .act(action, args, &seen, &stats, now_ms())
                .map_err(|error| match error {
                    PluginError::Failed { message, .. } => ActError::Refused {
                        endpoint: self.name.clone(),
                        message,
                    },
                    source => ActError::Plugin {
                        endpoint: self.name.clone(),
                        source,
                    },
                })?;
            if self.strategy.replace(&seen, new) {
                return Ok(self.describe_strategy().unwrap_or_default());
            }
        }
        Err(ActError::Contended(self.name.clone()))
    }

    /// The router's account of its state; `None` without a router.
    pub fn describe_strategy(&self) -> Option<serde_json::Value> {
        let router = self.router.as_ref()?;
        let described = router
            .pool
            .describe(&self.strategy.load(), &self.stats())
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
        Some(described.unwrap_or_else(|error| serde_json::json!({ "error": error })))
    }

    /// Each flags plugin's flags, or why it cannot say.
    pub fn flag_infos(&self) -> Vec<(String, Result<Vec<FlagInfo>, String>)> {
        self.flags
            .iter()
            .map(|f| {
                let infos = f.pool.describe(now_ms()).map_err(|e| e.to_string());
                (f.plugin.clone(), infos)
            })
            .collect()
    }

    /// Every variant's statistics, as routers see them.
    pub fn stats(&self) -> Vec<VariantStats> {
        self.variants.iter().map(Variant::plugin_stats).collect()
    }
}

/// Every endpoint, and why those that cannot serve cannot.
#[derive(Default)]
pub struct EndpointSet {
    pub endpoints: BTreeMap<String, Arc<Endpoint>>,
    pub errors: BTreeMap<String, String>,
}

/// A plugin's failures at run time, over every endpoint that binds it.
#[derive(Debug, Default)]
pub struct RunFailures {
    pub count: u64,
    /// The newest: when, and why.
    pub last: Option<(std::time::SystemTime, String)>,
}

impl EndpointSet {
    /// How `plugin` has failed while serving, as every binding of it counted.
    pub fn run_failures(&self, plugin: &str) -> RunFailures {
        let mut failures = RunFailures::default();
        let mut add = |count: u64, last: Option<(std::time::SystemTime, String)>| {
            failures.count += count;
            if let Some(last) = last
                && failures.last.as_ref().is_none_or(|(at, _)| *at < last.0)
            {
                failures.last = Some(last);
            }
        };
        for endpoint in self.endpoints.values() {
            if let Some(r) = endpoint.router.as_ref().filter(|r| r.plugin == plugin) {
                add(r.pool.failures(), r.pool.last_failure());
            }
            for p in endpoint.processors.iter().filter(|p| p.plugin == plugin) {
                add(p.pool.failures(), p.pool.last_failure());
            }
            for f in endpoint.flags.iter().filter(|f| f.plugin == plugin) {
                add(f.pool.failures(), f.pool.last_failure());
            }
        }
        failures
    }

    /// Every configured endpoint once, serving ones first: its binding if it serves, and
    /// the error of its last rebuild if it had one.
    pub fn all(&self) -> impl Iterator<Item = (&String, Option<&Arc<Endpoint>>, Option<&String>)> {
        let serving = self
            .endpoints
            .iter()
            .map(|(name, e)| (name, Some(e), self.errors.get(name)));
        let broken = self
            .errors
            .iter()
            .filter(|(name, _)| !self.endpoints.contains_key(*name))
            .map(|(name, error)| (name, None, Some(error)));
        serving.chain(broken)
    }
}

/// What a rebuild needs: the configuration, the plugins, and what served before.
pub struct Build<'a> {
    pub configs: &'a BTreeMap<String, EndpointConfig>,
    pub library: &'a Library,
    pub engine: &'a PluginEngine,
    pub previous: &'a EndpointSet,
    pub stats: &'a StatsBook,
    pub telemetry: &'a Arc<Telemetry>,
    /// The first build since the server started: routers continue from the state the
    /// database kept for them.
    pub resume: bool,
}

impl Build<'_> {
    pub fn run(&self) -> EndpointSet {
        let mut set = EndpointSet::default();
        for (name, config) in self.configs {
            let before = self.previous.endpoints.get(name).map(Arc::as_ref);
            match self.endpoint(name, config, before) {
                Ok(endpoint) => {
                    set.endpoints.insert(name.clone(), Arc::new(endpoint));
                }
                Err(error) => {
                    tracing::error!(endpoint = %name, %error, "endpoint configuration refused; it keeps what it had");
                    if let Some(before) = self.previous.endpoints.get(name) {
                        set.endpoints.insert(name.clone(), before.clone());
                    }
                    set.errors.insert(name.clone(), error);
                }
            }
        }
        self.forget_gone(&set);
        set
    }

    /// Endpoints and variants that no longer serve take their statistics and metric
    /// series with them: a server that swaps endpoints for months must not grow.
    fn forget_gone(&self, set: &EndpointSet) {
        let serves = |endpoint: &str, variant: &str| {
            set.endpoints
                .get(endpoint)
                .is_some_and(|e| e.variants.iter().any(|v| v.name == variant))
        };
        self.stats.keep_only(serves);
        for (name, before) in &self.previous.endpoints {
            let gone = before
                .variants
                .iter()
                .map(|v| v.name.as_str())
                .filter(|v| !serves(name, v));
            for variant in gone.clone() {
                self.telemetry.spendings().forget_variant(name, variant);
            }
            let Some(metrics) = self.telemetry.metrics() else {
                continue;
            };
            if set.endpoints.contains_key(name) {
                gone.for_each(|variant| metrics.forget_variant(name, variant));
            } else {
                metrics.forget_endpoint(name, gone);
            }
        }
    }

    fn endpoint(
        &self,
        name: &str,
        config: &EndpointConfig,
        before: Option<&Endpoint>,
    ) -> Result<Endpoint, String> {
        if config.variants.is_empty() {
            return Err("an endpoint needs at least one variant".to_string());
        }
        let variants = config
            .variants
            .iter()
            .map(|(variant, spec)| {
                let (model, version) = match spec.split_once('@') {
                    Some((model, version)) => {
                        let version = version.parse::<u64>().map_err(|_| {
                            format!("variant '{variant}' names '{spec}'; write model@version with a numeric version, or just model")
                        })?;
                        (model, Some(version))
                    }
                    None => (spec.as_str(), None),
                };
                Ok(Variant {
                    name: variant.clone(),
                    model: model.to_string(),
                    version,
                    stats: self.stats.variant(name, variant),
                    shadow: self.stats.shadow(name, variant),
                    spending: self.telemetry.spendings().variant(name, variant),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let index = |what: &str, name: &str| {
            variants
                .iter()
                .position(|v| v.name == name)
                .ok_or_else(|| format!("{what} '{name}' is not one of the variants"))
        };
        let default_variant = match &config.default_variant {
            Some(d) => index("default_variant", d)?,
            None => 0,
        };
        let fallback = config
            .fallback_variant
            .as_ref()
            .map(|f| index("fallback_variant", f))
            .transpose()?;
        let flag_route = config
            .flag_routing
            .as_ref()
            .map(|routing| {
                if config.flags.is_empty() {
                    return Err(format!(
                        "flag_routing uses flag '{}', but the endpoint has no flags plugin to evaluate it",
                        routing.flag
                    ));
                }
                Ok(FlagRoute {
                    flag: routing.flag.clone(),
                    attribute: format!("flag.{}", routing.flag),
                    variants: routing
                        .variants
                        .iter()
                        .map(|(value, variant)| {
                            Ok((value.clone(), index("flag_routing variant", variant)?))
                        })
                        .collect::<Result<_, String>>()?,
                })
            })
            .transpose()?;
        if config.latency_budget_ms.is_some() && fallback.is_none() {
            return Err("latency_budget_ms needs a fallback_variant to answer in time".to_string());
        }
        let router = config
            .router
            .as_ref()
            .map(|r| self.bind(r, before.and_then(|b| b.router.as_ref()), as_router))
            .transpose()?;
        let processors = config
            .processors
            .iter()
            .enumerate()
            .map(|(i, p)| self.bind(p, before.and_then(|b| b.processors.get(i)), as_processor))
            .collect::<Result<_, _>>()?;
        let flags: Vec<Bound<FlagsWorld>> = config
            .flags
            .iter()
            .enumerate()
            .map(|(i, f)| self.bind(f, before.and_then(|b| b.flags.get(i)), as_flags))
            .collect::<Result<_, _>>()?;
        let flag_definitions = flag_definitions(name, &flags);
        if let Some(metrics) = self.telemetry.metrics() {
            let declared = flag_definitions.iter();
            metrics.know_endpoint(
                name,
                variants.iter().map(|v| v.name.as_str()),
                declared.map(|(k, f)| (k.as_str(), &f.variants[..])),
            );
        }
        // The router's state belongs to this router, these settings and these variants: it
        // carries over while they stay, and so does what the database keeps of it. A state
        // written for `canary = "iris@1"` means nothing once the canary is `iris@3`.
        let identity = router
            .as_ref()
            .map(|r| format!("{}\n{}\n{:?}", r.plugin, r.config, config.variants));
        let strategy = match before {
            Some(b) if b.strategy.router() == identity.as_deref() => b.strategy.clone(),
            before => {
                let dropped = before.map(|b| b.strategy.load()).filter(|s| !s.is_empty());
                if let Some(dropped) = dropped {
                    tracing::info!(endpoint = %name, state = %dropped, "the router, its configuration or the variants changed; its state starts afresh");
                }
                Arc::new(identity.map_or_else(Default::default, |identity| {
                    StrategyState::kept(
                        self.telemetry.clone(),
                        name,
                        identity,
                        self.resume && before.is_none(),
                    )
                }))
            }
        };
        Ok(Endpoint {
            name: name.to_string(),
            variants,
            default_variant,
            fallback,
            latency_budget: config.latency_budget_ms.map(Duration::from_millis),
            router,
            processors,
            flags,
            on_processor_error: config.on_processor_error,
            targeting_key_header: config
                .targeting_key_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            attribute_headers: config
                .attribute_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            flag_route,
            segment_by: config.segment_by.clone(),
            flag_definitions,
            queue_seconds: self.telemetry.metrics().map(|m| m.queue_seconds(name)),
            strategy,
            recent: before.map(|b| b.recent.clone()).unwrap_or_default(),
            telemetry: self.telemetry.clone(),
        })
    }

    fn bind<W: World>(
        &self,
        wanted: &PluginRef,
        before: Option<&Bound<W>>,
        extract: fn(Plugin) -> Result<Pool<W>, &'static str>,
    ) -> Result<Bound<W>, String> {
        let file = self.library.files.get(&wanted.plugin).ok_or_else(|| {
            format!(
                "no plugin '{}' in the plugin directory (there: {})",
                wanted.plugin,
                self.library
                    .files
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let prepared = file.prepared.as_ref().ok_or_else(|| {
            file.error
                .clone()
                .unwrap_or_else(|| format!("plugin '{}' is not loaded", wanted.plugin))
        })?;
        if prepared.world.as_str() != W::NAME {
            return Err(format!(
                "plugin '{}' is a {} plugin, but it is used here as a {}",
                wanted.plugin,
                prepared.world.as_str(),
                W::NAME
            ));
        }
        let config = match &wanted.config_file {
            None => wanted.config.to_string(),
            Some(file) => {
                if wanted.config != crate::config::empty_object() {
                    return Err(format!(
                        "plugin '{}' has both config and config_file; keep one",
                        wanted.plugin
                    ));
                }
                let text = std::fs::read_to_string(file).map_err(|e| {
                    format!(
                        "cannot read {} for plugin '{}': {e}",
                        file.display(),
                        wanted.plugin
                    )
                })?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("{} is not JSON: {e}", file.display()))?;
                value.to_string()
            }
        };
        if let Some(before) = before
            .filter(|b| b.plugin == wanted.plugin && b.hash == file.hash && b.config == config)
        {
            return Ok(Bound {
                plugin: before.plugin.clone(),
                hash: before.hash.clone(),
                config,
                pool: before.pool.clone(),
            });
        }
        let plugin = self
            .engine
            .bind(prepared, config.clone())
            .map_err(|e| e.to_string())?;
        let pool = extract(plugin)
            .map_err(|world| format!("plugin '{}' is not a {world} plugin", wanted.plugin))?;
        Ok(Bound {
            plugin: wanted.plugin.clone(),
            hash: file.hash.clone(),
            config,
            pool: Arc::new(pool.metered(self.telemetry.metrics())),
        })
    }
}

fn as_router(plugin: Plugin) -> Result<Pool<RouterWorld>, &'static str> {
    match plugin {
        Plugin::Router(pool) => Ok(pool),
        _ => Err("router"),
    }
}

fn as_processor(plugin: Plugin) -> Result<Pool<ProcessorWorld>, &'static str> {
    match plugin {
        Plugin::Processor(pool) => Ok(pool),
        _ => Err("processor"),
    }
}

fn as_flags(plugin: Plugin) -> Result<Pool<FlagsWorld>, &'static str> {
    match plugin {
        Plugin::Flags(pool) => Ok(pool),
        _ => Err("flags"),
    }
}

/// The flags the endpoint's flags plugins declare, by key. Logs every flag past its expiry
/// date: on each rebuild, so the warning keeps coming back until someone cleans the flag up.
fn flag_definitions(endpoint: &str, flags: &[Bound<FlagsWorld>]) -> BTreeMap<String, FlagInfo> {
    let mut declared = BTreeMap::new();
    for bound in flags {
        match bound.pool.describe(now_ms()) {
            Ok(infos) => {
                for info in infos.iter().filter(|f| f.expired) {
                    let expiry = info
                        .metadata
                        .iter()
                        .find(|(k, _)| k == "expiry")
                        .map_or("", |(_, v)| v.as_str());
                    tracing::warn!(endpoint, plugin = %bound.plugin, flag = %info.key, expiry, "flag is past its expiry date; remove it or extend it");
                }
                declared.extend(infos.into_iter().map(|f| (f.key.clone(), f)));
            }
            Err(error) => {
                tracing::warn!(endpoint, plugin = %bound.plugin, %error, "cannot list the flags")
            }
        }
    }
    declared
}
