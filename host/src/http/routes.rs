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
use super::{ApiError, HttpState, VARIANT_HEADER};
use crate::config::Role;
use crate::pipeline::{ActError, Endpoint, EndpointSet, Feedback, compare};
use crate::registry::LoadedVersion;
use crate::telemetry::RequestLabels;

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
        .route("/v2/models/{model}/feedback", post(feedback))
        .route("/metrics", get(metrics))
        .route("/admin/experiments/{endpoint}", get(admin_experiment))
        .route("/admin/plugins", get(admin_plugins))
        .route("/admin/endpoints", get(admin_endpoints))
        .route("/admin/endpoints/{endpoint}", get(admin_endpoint))
        .route("/admin/endpoints/{endpoint}/{action}", post(admin_act))
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
    measured(&state, &model, None, &headers, body).await
}

async fn version_infer(
    State(state): AppState,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    measured(&state, &model, Some(&version), &headers, body).await
}

/// Who answered, for the metrics.
#[derive(Clone)]
struct Served {
    variant: Option<String>,
    model: String,
    version: u64,
}

/// `infer`, counted: in flight while it runs, then by endpoint, variant, model, version and
/// status, with its duration.
async fn measured(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(metrics) = &state.metrics else {
        return infer(state, name, version, headers, body).await;
    };
    let in_flight = metrics.in_flight();
    let started = std::time::Instant::now();
    let result = infer(state, name, version, headers, body).await;
    drop(in_flight);
    let labels = match &result {
        Ok(reply) => {
            let served = reply.extensions().get::<Served>();
            RequestLabels {
                endpoint: name.to_string(),
                variant: served.and_then(|s| s.variant.clone()).unwrap_or_default(),
                model: served.map(|s| s.model.clone()).unwrap_or_default(),
                version: served.map(|s| s.version.to_string()).unwrap_or_default(),
                status: reply.status().as_u16().to_string(),
            }
        }
        Err(error) => failed_labels(state, name, error),
    };
    metrics.answered(labels, started.elapsed());
    result
}

/// The labels of a failed request. Label values come from the configuration and the
/// repository only: a name that is neither is `unknown`, so clients cannot grow the number
/// of series.
fn failed_labels(state: &HttpState, name: &str, error: &ApiError) -> RequestLabels {
    let variant = error.variant().map(str::to_string);
    let model = match state.pipeline.endpoints().endpoints.get(name) {
        Some(e) => variant
            .as_ref()
            .and_then(|v| e.variants.iter().find(|x| x.name == *v))
            .map(|x| x.model.clone()),
        None => state
            .pipeline
            .repository()
            .snapshot()
            .ok()
            .and_then(|s| s.model(name).ok().map(|_| name.to_string())),
    };
    let known = model.is_some() || state.pipeline.endpoints().endpoints.contains_key(name);
    RequestLabels {
        endpoint: if known { name } else { "unknown" }.to_string(),
        variant: variant.unwrap_or_default(),
        model: model.unwrap_or_default(),
        version: String::new(),
        status: error.status().as_u16().to_string(),
    }
}

/// Every metric, in the OpenMetrics text format Prometheus scrapes.
async fn metrics(State(state): AppState) -> Result<Response, ApiError> {
    let metrics = state.metrics.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are off: set server.metrics = true",
        )
    })?;
    let text = metrics.encode().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
    })?;
    let mut reply = Response::new(Body::from(text));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(reply)
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
    let lookup = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let response = state
        .pipeline
        .infer(model, version, request, &lookup)
        .await?;
    let (bytes, json_length) = codec::encode_response(&response, &encoding).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response of model '{model}': {e}"),
        )
    })?;
    let mut reply = Response::new(Body::from(bytes));
    reply.extensions_mut().insert(Served {
        variant: response.variant.clone(),
        model: response.source_model.clone(),
        version: response.version,
    });
    let headers = reply.headers_mut();
    if let Some(variant) = response
        .variant
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.insert(VARIANT_HEADER, variant);
    }
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

fn unix_seconds(time: Option<std::time::SystemTime>) -> serde_json::Value {
    time.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(serde_json::Value::Null, |d| json!(d.as_secs_f64()))
}

async fn admin_plugins(
    State(state): AppState,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let library = state.pipeline.plugins();
    let plugins: Vec<serde_json::Value> = library
        .files
        .values()
        .map(|f| {
            let state = match (&f.prepared, &f.error) {
                (Some(_), None) => "serving",
                (Some(_), Some(_)) => "serving previous version; new file refused",
                (None, _) => "refused",
            };
            json!({
                "name": f.name,
                "world": f.prepared.as_ref().map(|p| p.world.as_str()),
                "hash": f.hash,
                "loaded_at": unix_seconds(f.loaded_at),
                "state": state,
                "last_error": f.error,
            })
        })
        .collect();
    Ok(Json(json!({ "plugins": plugins })))
}

/// An endpoint's configuration and live counters, as `/admin/endpoints` lists them.
fn endpoint_summary(e: &Endpoint, error: Option<&String>) -> serde_json::Value {
    let variants: Vec<serde_json::Value> = e
        .variants
        .iter()
        .map(|v| {
            let stats = v.stats.snapshot();
            json!({
                "name": v.name, "model": v.model, "version": v.version,
                "requests": stats.requests, "errors": stats.errors,
                "latency_p50_us": stats.latency_p50_us, "latency_p99_us": stats.latency_p99_us,
                "reward_count": stats.reward_count, "reward_sum": stats.reward_sum,
            })
        })
        .collect();
    json!({
        "name": e.name,
        "variants": variants,
        "default_variant": e.variants[e.default_variant].name,
        "fallback_variant": e.fallback.map(|f| &e.variants[f].name),
        "latency_budget_ms": e.latency_budget.map(|b| b.as_millis() as u64),
        "router": e.router.as_ref().map(|r| json!({"plugin": r.plugin, "failures": r.pool.failures()})),
        "processors": e.processors.iter().map(|p| json!({"plugin": p.plugin, "failures": p.pool.failures()})).collect::<Vec<_>>(),
        "flags": e.flags.iter().map(|f| json!({"plugin": f.plugin, "failures": f.pool.failures()})).collect::<Vec<_>>(),
        "flag_routing": e.flag_route.as_ref().map(|f| json!({
            "flag": f.flag,
            "variants": f.variants.iter().map(|(value, i)| (value.clone(), e.variants[*i].name.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        })),
        "error": error,
    })
}

async fn admin_endpoints(
    State(state): AppState,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let set = state.pipeline.endpoints();
    let mut endpoints: Vec<serde_json::Value> = set
        .endpoints
        .values()
        .map(|e| endpoint_summary(e, set.errors.get(&e.name)))
        .collect();
    endpoints.extend(
        set.errors
            .iter()
            .filter(|(name, _)| !set.endpoints.contains_key(*name))
            .map(|(name, error)| json!({ "name": name, "error": error })),
    );
    Ok(Json(json!({ "endpoints": endpoints })))
}

fn endpoint(set: &EndpointSet, name: &str) -> Result<Arc<Endpoint>, ApiError> {
    set.endpoints
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint '{name}'")))
}

/// Plugin calls may block (WASI), so they run on the blocking pool.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|join| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} crashed ({join})"),
        )
    })
}

/// One endpoint in full: its summary, the router's strategy state, its flags (with
/// expired ones marked), the last routing decisions and what its shadows did.
async fn admin_endpoint(
    State(state): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let set = state.pipeline.endpoints();
    let error = set.errors.get(&name);
    let e = match (endpoint(&set, &name), error) {
        (Ok(e), _) => e,
        // Configured but never built: what went wrong is all there is to show.
        (Err(_), Some(error)) => return Ok(Json(json!({ "name": name, "error": error }))),
        (Err(missing), None) => return Err(missing),
    };
    let mut body = endpoint_summary(&e, error);
    let (strategy, flags) = blocking("describing the endpoint", {
        let e = e.clone();
        move || (e.describe_strategy(), e.flag_infos())
    })
    .await?;
    body["strategy"] = json!(strategy);
    body["flag_definitions"] = flags
        .into_iter()
        .map(|(plugin, infos)| match infos {
            Ok(infos) => json!({
                "plugin": plugin,
                "flags": infos.iter().map(|f| json!({
                    "key": f.key, "state": f.state, "default_variant": f.default_variant,
                    "variants": f.variants,
                    "metadata": f.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                    "expired": f.expired,
                })).collect::<Vec<_>>(),
            }),
            Err(error) => json!({ "plugin": plugin, "error": error }),
        })
        .collect();
    body["recent_decisions"] = json!(e.recent.list());
    body["shadows"] = shadow_reports(&e);
    Ok(Json(body))
}

fn shadow_reports(e: &Endpoint) -> serde_json::Value {
    e.variants
        .iter()
        .map(|v| (v.name.clone(), v.shadow.report()))
        .filter(|(_, r)| r.runs + r.dropped > 0)
        .map(|(name, r)| (name, json!(r)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `POST /admin/endpoints/{e}/weights|promote|rollback`: the router applies it to its
/// state; answers with the router's account of the new state.
async fn admin_act(
    State(state): AppState,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = state
        .tokens
        .authorize(&headers, Role::Admin)?
        .unwrap_or_default()
        .to_string();
    if !["weights", "promote", "rollback"].contains(&action.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no action '{action}'; endpoints take weights, promote and rollback"),
        ));
    }
    let e = endpoint(&state.pipeline.endpoints(), &name)?;
    let args = String::from_utf8_lossy(&body).into_owned();
    let done = blocking("the admin action", {
        let action = action.clone();
        move || e.act(&action, &args)
    })
    .await?;
    match done {
        Ok(strategy) => {
            tracing::info!(target: "modelyard::audit", token = %token, endpoint = %name, %action, %strategy, "endpoint changed through the admin API");
            Ok(Json(
                json!({ "endpoint": name, "action": action, "strategy": strategy }),
            ))
        }
        Err(error) => {
            tracing::warn!(target: "modelyard::audit", token = %token, endpoint = %name, %action, %error, "admin action refused");
            let status = match error {
                ActError::Refused { .. } => StatusCode::BAD_REQUEST,
                ActError::NoRouter(_) | ActError::Contended(_) => StatusCode::CONFLICT,
                ActError::Plugin { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(status, error.to_string()))
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    /// The `id` of the endpoint's response being rewarded.
    id: String,
    reward: f64,
}

/// `POST /v2/models/{endpoint}/feedback` with `{"id": "...", "reward": 1.0}`: credits the
/// reward to the variant that answered that request.
async fn feedback(
    State(state): AppState,
    Path(endpoint): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: FeedbackRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("feedback must be {{\"id\": \"<response id>\", \"reward\": <number>}}: {e}"),
        )
    })?;
    if !request.reward.is_finite() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the reward must be a finite number",
        ));
    }
    if !state.pipeline.endpoints().endpoints.contains_key(&endpoint) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("'{endpoint}' is not an endpoint; feedback goes to the endpoint that answered"),
        ));
    }
    match state
        .pipeline
        .feedback(&endpoint, &request.id, request.reward)
    {
        Feedback::Recorded { variant } => Ok(Json(json!({
            "endpoint": endpoint, "id": request.id, "variant": variant,
        }))),
        Feedback::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "endpoint '{endpoint}' has no answer with id '{}' to reward (unknown, already rewarded, or forgotten)",
                request.id
            ),
        )),
        Feedback::Expired => Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "the answer '{}' of endpoint '{endpoint}' was forgotten: feedback must come within the last server.feedback_memory answers",
                request.id
            ),
        )),
    }
}

/// Per arm of an endpoint: traffic, errors, latency and rewards; and each arm compared with
/// the default variant (the control) on mean reward.
async fn admin_experiment(
    State(state): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let e = endpoint(&state.pipeline.endpoints(), &name)?;
    let snapshots: Vec<_> = e.variants.iter().map(|v| v.stats.snapshot()).collect();
    let arms: Vec<serde_json::Value> = e
        .variants
        .iter()
        .zip(&snapshots)
        .map(|(v, s)| {
            json!({
                "variant": v.name, "requests": s.requests, "errors": s.errors,
                "latency_p50_us": s.latency_p50_us, "latency_p99_us": s.latency_p99_us,
                "reward_count": s.reward_count,
                "reward_mean": (s.reward_count > 0).then(|| s.reward_sum / s.reward_count as f64),
            })
        })
        .collect();
    let control = &snapshots[e.default_variant];
    let comparisons: Vec<serde_json::Value> = e
        .variants
        .iter()
        .zip(&snapshots)
        .enumerate()
        .filter(|(i, _)| *i != e.default_variant)
        .map(|(_, (v, s))| {
            json!({
                "control": e.variants[e.default_variant].name,
                "treatment": v.name,
                "result": compare(control, s),
            })
        })
        .collect();
    Ok(Json(json!({
        "endpoint": name, "arms": arms, "comparisons": comparisons,
        "shadows": shadow_reports(&e),
    })))
}
