//! `/dashboard`: the operator dashboard's page and scripts, from the binary itself. The
//! page holds no data: it asks for a token and reads everything through `/admin/` with it,
//! so the tokens (and client certificates) that guard the API guard what it shows.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::error::ApiError;
use super::state::HttpState;
use crate::dashboard;

/// Scripts and styles from this server only, no inline script, no frames; data from
/// `/admin/` on the same origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes(state: Arc<HttpState>) -> Router<Arc<HttpState>> {
    Router::new()
        .route("/dashboard", get(|| async { serve("") }))
        .route("/dashboard/", get(|| async { serve("") }))
        .route(
            "/dashboard/{file}",
            get(|Path(file): Path<String>| async move { serve(&file) }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            super::admin::certified,
        ))
}

fn serve(name: &str) -> Response {
    let Some(asset) = dashboard::asset(name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the dashboard has no file '{name}'; open /dashboard"),
        )
        .into_response();
    };
    let mut response = asset.bytes.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, asset.media_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // A new binary brings new scripts: the browser asks each time (a few kB gzip-less).
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
