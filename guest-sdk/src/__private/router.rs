pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "router",
        pub_export_macro: true,
        export_macro_name: "__export_router",
        default_bindings_module: "modelyard_sdk::__private::router::bindings",
    });
}

pub use bindings::Guest;
pub use bindings::modelyard::plugin::types::{Decision, RequestContext, VariantStats};

pub fn route<T: crate::Router>(
    ctx: RequestContext,
    variants: Vec<VariantStats>,
) -> Result<Decision, String> {
    let ctx = super::context!(ctx);
    let variants: Vec<crate::VariantStats> = variants
        .into_iter()
        .map(|v| crate::VariantStats {
            name: v.name,
            model: v.model,
            version: v.version,
            requests: v.requests,
            errors: v.errors,
            latency_p50_us: v.latency_p50_us,
            latency_p99_us: v.latency_p99_us,
            reward_count: v.reward_count,
            reward_sum: v.reward_sum,
        })
        .collect();
    let decision = super::with_plugin::<T, _>(|p| p.route(&ctx, &variants))?.map_err(|e| e.0)?;
    Ok(Decision {
        primary: decision.primary,
        shadows: decision.shadows,
        reason: decision.reason,
    })
}
