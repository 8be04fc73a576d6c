//! The protocol's endpoints, each a thin handler over the pipeline and the registry.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::codec::{self, HEADER_LENGTH};
use super::{ApiError, HttpState};
use crate::registry::LoadedVersion;

type AppState = State<Arc<HttpState>>;

pub(super) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(model_infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(version_infer),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; the Open Inference Protocol routes start with /v2",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "modelyard",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(state): AppState) -> Result<Json<serde_json::Value>, ApiError> {
    state.pipeline.repository().snapshot()?;
    Ok(Json(json!({ "ready": true })))
}

fn resolve(
    state: &HttpState,
    model: &str,
    version: Option<&str>,
) -> Result<Arc<LoadedVersion>, ApiError> {
    Ok(state
        .pipeline
        .repository()
        .snapshot()?
        .resolve(model, version)?)
}

fn metadata(
    state: &HttpState,
    model: &str,
    version: Option<&str>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let snapshot = state.pipeline.repository().snapshot()?;
    let target = snapshot.resolve(model, version)?;
    let entry = snapshot.model(model)?;
    let versions: Vec<String> = match version {
        Some(_) => vec![target.version.to_string()],
        None => entry
            .versions
            .iter()
            .filter(|(_, v)| v.loaded.is_some())
            .map(|(v, _)| v.to_string())
            .collect(),
    };
    let mut body = json!({
        "name": model,
        "versions": versions,
        "platform": "onnx",
        "inputs": target.inputs,
        "outputs": target.outputs,
    });
    if let Some(card) = &entry.config.card {
        body["card"] = json!(card);
    }
    Ok(Json(body))
}

async fn model_metadata(
    State(state): AppState,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&state, &model, None)
}

async fn version_metadata(
    State(state): AppState,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&state, &model, Some(&version))
}

async fn model_ready(
    State(state): AppState,
    Path(model): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    resolve(&state, &model, None)?;
    Ok(Json(json!({ "name": model, "ready": true })))
}

async fn version_ready(
    State(state): AppState,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    resolve(&state, &model, Some(&version))?;
    Ok(Json(
        json!({ "name": model, "version": version, "ready": true }),
    ))
}

async fn model_infer(
    State(state): AppState,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(&state, &model, None, &headers, body).await
}

async fn version_infer(
    State(state): AppState,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(&state, &model, Some(&version), &headers, body).await
}

async fn infer(
    state: &HttpState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && encoding != "identity"
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("Content-Encoding {encoding:?} is not supported; send the body uncompressed"),
        ));
    }
    let json_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "Inference-Header-Content-Length must be a byte count, not {value:?}"
                        ),
                    )
                })?,
        ),
    };
    let body = read_body(body, headers, state.max_body_bytes).await?;
    let (request, encoding) = codec::decode_request(&body, json_length)?;
    drop(body);
    let response = state.pipeline.infer(model, version, request).await?;
    let (bytes, json_length) = codec::encode_response(&response, &encoding).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response of model '{model}': {e}"),
        )
    })?;
    let mut reply = Response::new(Body::from(bytes));
    let headers = reply.headers_mut();
    match json_length {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(reply.into_response())
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the server's limit of {limit} bytes (server.max_body_bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(error) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {error}"),
        )),
    }
}
