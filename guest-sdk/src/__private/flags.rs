pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "%flags",
        pub_export_macro: true,
        export_macro_name: "__export_flags",
        default_bindings_module: "modelyard_sdk::__private::flags::bindings",
    });
}

pub use bindings::Guest;
pub use bindings::modelyard::plugin::types::{Evaluation, RequestContext};

pub fn evaluate<T: crate::Flags>(ctx: RequestContext) -> Vec<Evaluation> {
    let ctx = super::context!(ctx);
    super::with_plugin::<T, _>(|p| p.evaluate(&ctx))
        .unwrap_or_default()
        .into_iter()
        .map(|e| Evaluation {
            flag: e.flag,
            variant: e.variant,
            reason: e.reason,
        })
        .collect()
}
