use super::bindings::flags as wit;
use crate::{Evaluation, FlagInfo, RequestContext};

pub use wit::Guest;

pub fn evaluate<T: crate::Flags>(ctx: RequestContext) -> Vec<Evaluation> {
    super::with_plugin::<T, _>(|p| p.evaluate(&ctx)).unwrap_or_default()
}

pub fn describe<T: crate::Flags>(now_ms: u64) -> Vec<FlagInfo> {
    super::with_plugin::<T, _>(|p| p.describe(now_ms)).unwrap_or_default()
}
