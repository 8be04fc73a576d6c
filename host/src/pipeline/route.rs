//! Which variant answers one request: the endpoint's flags plugins are evaluated first
//! (their values join the context as `flag.<name>` attributes and count in the metrics),
//! then the flag the endpoint routes by picks the variant, else its router, else its
//! default variant. A router's new state is kept, and audited, here.

use crate::endpoint::Endpoint;
use crate::plugins::RequestContext;
use crate::telemetry::Change;

/// Which variant answers a request, and why.
pub(super) struct Routing {
    pub(super) index: usize,
    pub(super) shadows: Vec<usize>,
    pub(super) reason: String,
}

/// The flags evaluated for a request: (flag, variant).
pub(super) type Flagged = Vec<(String, String)>;

/// Each flags plugin's evaluations as (flag, variant): the context's attributes
/// `flag.<name>` for routers and processors, and the request log's flags. A failing flags
/// plugin leaves its flags unset.
pub(super) fn evaluate_flags(endpoint: &Endpoint, ctx: &RequestContext) -> Flagged {
    let mut evaluated = Vec::new();
    for flags in &endpoint.flags {
        match flags.pool.evaluate(ctx) {
            Ok(evaluations) => {
                if let Some(metrics) = endpoint.telemetry.metrics() {
                    for e in &evaluations {
                        metrics.flag_evaluated(&endpoint.name, &e.flag, &e.variant);
                    }
                }
                evaluated.extend(evaluations.into_iter().map(|e| (e.flag, e.variant)));
            }
            Err(error) => {
                tracing::warn!(endpoint = %endpoint.name, plugin = %flags.plugin, %error, "flags plugin failed; its flags are unset")
            }
        }
    }
    evaluated
}

/// The variant for one request: the flag's when the endpoint routes by flag and the flag
/// has a mapped value, else the router's choice, else the default (no router, or it failed).
pub(super) fn route(endpoint: &Endpoint, ctx: &RequestContext) -> Routing {
    let default = |reason: String| Routing {
        index: endpoint.default_variant,
        shadows: Vec::new(),
        reason,
    };
    if let Some(by_flag) = &endpoint.flag_route
        && let Some((_, value)) = ctx.attributes.iter().find(|(k, _)| *k == by_flag.attribute)
        && let Some((_, index)) = by_flag.variants.iter().find(|(v, _)| v == value)
    {
        return Routing {
            index: *index,
            shadows: Vec::new(),
            reason: format!("flag {} = {value}", by_flag.flag),
        };
    }
    let Some(router) = &endpoint.router else {
        return default("default variant (no router)".to_string());
    };
    let stats = endpoint.stats();
    let state = endpoint.strategy.load();
    let decision = match router.pool.route(ctx, &stats, &state) {
        Ok(decision) => decision,
        Err(error) => {
            tracing::warn!(endpoint = %endpoint.name, plugin = %router.plugin, %error, "router failed; using the default variant");
            return default(format!("default variant (router failed: {error})"));
        }
    };
    if let Some(new) = decision.state
        && endpoint.strategy.replace(&state, new)
    {
        endpoint.telemetry.audit(Change {
            kind: "endpoint.state",
            actor: format!("plugin:{}", router.plugin),
            subject: endpoint.name.clone(),
            endpoint: Some(endpoint.name.clone()),
            from: Some(state.to_string()),
            to: Some(endpoint.strategy.load().to_string()),
            detail: Some(decision.reason.clone()),
        });
    }
    let index_of = |name: &str| endpoint.variants.iter().position(|v| v.name == name);
    let Some(index) = index_of(&decision.primary) else {
        tracing::warn!(endpoint = %endpoint.name, plugin = %router.plugin, primary = %decision.primary, "router chose an unknown variant; using the default");
        return default(format!(
            "default variant (router chose unknown '{}')",
            decision.primary
        ));
    };
    Routing {
        index,
        shadows: decision
            .shadows
            .iter()
            .filter_map(|s| index_of(s))
            .filter(|&s| s != index)
            .collect(),
        reason: decision.reason,
    }
}
