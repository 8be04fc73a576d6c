//! What plugins see of a request: its id, endpoint, targeting key, attributes (parameters
//! and the headers the endpoint names), seed and time.

use super::request::{Headers, InferRequest};
use crate::endpoint::Endpoint;
use crate::plugins::RequestContext;

/// The request context for `endpoint`: targeting key from the `targeting_key` parameter or
/// the endpoint's header, attributes from the other parameters and the named headers, the
/// request's seed and the time.
pub fn build(
    endpoint: &Endpoint,
    id: String,
    seed: u64,
    request: &InferRequest,
    headers: Headers<'_>,
) -> RequestContext {
    let mut targeting_key = None;
    let mut attributes =
        Vec::with_capacity(request.parameters.len() + endpoint.attribute_headers.len());
    for (name, value) in &request.parameters {
        // `flag.<name>` attributes are the flags plugins' word alone: a client that sent
        // one could otherwise pick its own variant, or undo a kill switch.
        if name.starts_with("flag.") {
            continue;
        }
        if name == "targeting_key" {
            targeting_key = Some(value.clone());
        } else {
            attributes.push((name.clone(), value.clone()));
        }
    }
    if let Some(header) = &endpoint.targeting_key_header {
        targeting_key = targeting_key.or_else(|| headers(header));
    }
    for header in &endpoint.attribute_headers {
        if let Some(value) = headers(header) {
            attributes.push((header.clone(), value));
        }
    }
    RequestContext {
        id,
        endpoint: endpoint.name.clone(),
        targeting_key,
        attributes,
        seed,
        now_ms: crate::telemetry::now_ms(),
    }
}
