//! The protocol's endpoints, each a thin handler over the pipeline and the registry.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::codec::{self, HEADER_LENGTH, VARIANT_HEADER};
use super::error::{ApiError, Served};
use super::observe;
use super::state::HttpState;
use super::trace::Traced;
use crate::endpoint::Feedback;
use crate::registry::LoadedVersion;

type AppState = State<Arc<HttpState>>;

pub(super) fn router(state: Arc<HttpState>) -> Router {
    let mut router = Router::new();
    if state.metrics_here {
        router = router.route(
            "/metrics",
            get(|State(state): AppState| async move { observe::metrics(&state.telemetry) }),
        );
    }
    let infer_routes = Router::new()
        .route("/v2/models/{model}/infer", post(model_infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(version_infer),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::count_requests,
        ));
    router
        .merge(infer_routes)
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_ready),
        )
        .route("/v2/models/{model}/feedback", post(feedback))
        .merge(super::admin::routes(state.clone()))
        .merge(super::dashboard::routes(state.clone()))
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::note_faults,
        ))
        .layer(axum::middleware::from_fn(super::trace::traced))
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

/// Ready once the first scan is done and while at least one model can answer.
async fn ready(State(state): AppState) -> Result<Json<serde_json::Value>, ApiError> {
    let snapshot = state.pipeline.repository().snapshot()?;
    if !snapshot.serving() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model can serve: the repository has no loaded version (GET /admin/status says why)",
        ));
    }
    // A replica routes on the cluster's shared state from its first request on.
    if state.cluster.as_ref().is_some_and(|c| !c.joined()) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "joining the cluster: the first exchange with its Redis has not ended yet",
        ));
    }
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
        // Which backend and device run the version that answers (an addition to the protocol).
        "engine": target.engine,
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
    Extension(traced): Extension<Traced>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(&state, &model, None, &traced, &headers, body).await
}

async fn version_infer(
    State(state): AppState,
    Path((model, version)): Path<(String, String)>,
    Extension(traced): Extension<Traced>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(&state, &model, Some(&version), &traced, &headers, body).await
}

async fn infer(
    state: &HttpState,
    model: &str,
    version: Option<&str>,
    traced: &Traced,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Before the body is read: a request turned away holds nothing.
    let admitted = state.admission.admit(model, &state.telemetry)?;
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
    let body = state
        .admission
        .body(body, headers, &state.telemetry)
        .await?;
    let (mut request, encoding) = codec::decode_request(&body, json_length)?;
    drop(body);
    // The client's id, else one of the server's: a trace spans many requests, so its id
    // (in every log line beside this one) cannot name one.
    traced.set_id(state.pipeline.identify(&mut request));
    request.trace_id = Some(traced.trace.trace_id.clone());
    let deadline = state.pipeline.deadline(&mut request)?;
    let lookup = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let work = state.pipeline.infer(model, version, request, &lookup);
    let response = state
        .admission
        .by_deadline(model, deadline, &state.telemetry, work)
        .await??;
    drop(admitted);
    let (bytes, json_length) = codec::encode_response(&response, &encoding).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response of model '{model}': {e}"),
        )
    })?;
    let mut reply = Response::new(Body::from(bytes));
    if state.telemetry.metrics().is_some() {
        reply.extensions_mut().insert(Served {
            variant: response.variant.clone(),
            model: Some(response.source_model.clone()),
            version: Some(response.version),
        });
    }
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    /// The `id` of the endpoint's response being rewarded.
    id: String,
    reward: Option<f64>,
    /// The true label of each row (or of the one row), as the answer's `label` output or
    /// class index would have it.
    label: Option<serde_json::Value>,
}

/// A label as text: strings as they are, numbers and booleans as JSON writes them.
fn label_text(value: &serde_json::Value) -> Result<String, ApiError> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Ok(value.to_string()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a label is a string, number or boolean, not {value}"),
        )),
    }
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
            format!("feedback must be {{\"id\": \"<response id>\", \"reward\": <number>, \"label\": <label or [labels]>}}: {e}"),
        )
    })?;
    if request.reward.is_none() && request.label.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "feedback needs a \"reward\", a \"label\", or both",
        ));
    }
    let labels = match &request.label {
        None => None,
        Some(serde_json::Value::Array(rows)) => {
            Some(rows.iter().map(label_text).collect::<Result<Vec<_>, _>>()?)
        }
        Some(one) => Some(vec![label_text(one)?]),
    };
    if request.reward.is_some_and(|r| !r.is_finite()) {
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
    let mut outcome =
        state
            .pipeline
            .feedback()
            .score(&endpoint, &request.id, request.reward, labels.as_deref());
    // Not this replica's answer: perhaps another's.
    if outcome == Feedback::Unknown
        && let Some(cluster) = &state.cluster
    {
        let passed = cluster
            .pass_feedback(&endpoint, &request.id, request.reward, labels.as_deref())
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("endpoint '{endpoint}' has no answer '{}' on this replica, and not every other replica could be asked ({error}); send it again: feedback is never taken twice", request.id),
                )
            })?;
        outcome = passed.unwrap_or(Feedback::Unknown);
    }
    match outcome {
        Feedback::Recorded { variant, labels } => Ok(Json(json!({
            "endpoint": endpoint, "id": request.id, "variant": variant,
            "labelled": labels.map(|(rows, _)| rows),
            "correct": labels.map(|(_, correct)| correct),
        }))),
        Feedback::NoPrediction => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the answer '{}' has no `label` output or class scores to compare a label with, or more than {} rows; send a reward instead",
                request.id,
                crate::endpoint::LABELLED_ROWS
            ),
        )),
        Feedback::Rows { expected, got } => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the answer '{}' had {expected} rows; send one label per row, not {got}",
                request.id
            ),
        )),
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

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use axum::http::{HeaderMap, Request};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{MonitoringConfig, Role, TokenConfig};
    use crate::http::{Admission, Tokens};
    use crate::telemetry::Telemetry;
    use crate::testing::{bind, loaded_repository, pipeline};

    /// The routes over the sample models and endpoint `ab` (variant `a` = iris@1), with
    /// metrics, a database under `dir` when one is given, and `tokens`.
    pub(in crate::http) async fn app(
        dir: Option<&std::path::Path>,
        tokens: &[(&str, &str, Role)],
    ) -> (Router, Arc<Telemetry>) {
        let monitoring = MonitoringConfig {
            database: dir.map(|d| d.join("modelyard.db")).unwrap_or_default(),
            ..MonitoringConfig::default()
        };
        let telemetry = Telemetry::start(&monitoring, true).unwrap();
        let repository = loaded_repository(telemetry.clone()).await;
        let pipeline = pipeline(repository, telemetry.clone());
        bind(
            &pipeline,
            &telemetry,
            "[endpoints.ab]\nvariants = { a = \"iris@1\" }",
        );
        let tokens: BTreeMap<String, TokenConfig> = tokens
            .iter()
            .map(|(name, token, role)| {
                let config = TokenConfig {
                    token: Some(token.to_string()),
                    token_env: None,
                    role: *role,
                };
                (name.to_string(), config)
            })
            .collect();
        let state = Arc::new(HttpState {
            pipeline,
            history: Arc::new(crate::dashboard::History::new(
                std::time::Duration::from_secs(1),
            )),
            telemetry: telemetry.clone(),
            admission: Admission::new(64, 4096, std::time::Duration::from_secs(5)),
            client_certificates: false,
            tokens: Tokens::new(&tokens).unwrap(),
            metrics_here: true,
            cluster: None,
        });
        (router(state), telemetry)
    }

    /// One request through the routes, in process: status, headers and the body as JSON
    /// (or as a JSON string when it is text).
    pub(in crate::http) async fn send(
        app: &Router,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body.to_string())).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (parts.status, parts.headers, value)
    }

    const SETOSA: &str = r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn infer_answers_in_json_and_names_the_variant() {
        let (app, _) = app(None, &[]).await;
        let (status, headers, body) = send(&app, "POST", "/v2/models/ab/infer", &[], SETOSA).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers[VARIANT_HEADER], "a");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(body["model_name"], "ab");
        assert_eq!(body["model_version"], "1");
        assert!(
            body["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{body}"
        );
        let (status, _, body) = send(&app, "GET", "/v2/models/iris", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["name"], "iris");
        let (status, _, body) = send(&app, "GET", "/v2", &[], "").await;
        assert_eq!(
            (status, &body["name"]),
            (StatusCode::OK, &json!("modelyard"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_come_as_json_with_the_status_the_protocol_uses() {
        let (app, _) = app(None, &[]).await;
        // Method, path, headers, body, the status and what the error says.
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            String,
            StatusCode,
            &'a str,
        );
        let cases: [Case; 6] = [
            (
                "GET",
                "/nowhere",
                &[],
                String::new(),
                StatusCode::NOT_FOUND,
                "start with /v2",
            ),
            (
                "DELETE",
                "/v2/models/iris",
                &[],
                String::new(),
                StatusCode::METHOD_NOT_ALLOWED,
                "not allowed",
            ),
            (
                "POST",
                "/v2/models/nope/infer",
                &[],
                SETOSA.to_string(),
                StatusCode::NOT_FOUND,
                "unknown model 'nope'",
            ),
            (
                "POST",
                "/v2/models/iris/infer",
                &[],
                "{".to_string(),
                StatusCode::BAD_REQUEST,
                "",
            ),
            (
                "POST",
                "/v2/models/iris/infer",
                &[("content-encoding", "gzip")],
                SETOSA.to_string(),
                StatusCode::BAD_REQUEST,
                "uncompressed",
            ),
            (
                "POST",
                "/v2/models/iris/infer",
                &[],
                "x".repeat(5000),
                StatusCode::PAYLOAD_TOO_LARGE,
                "max_body_bytes",
            ),
        ];
        for (method, uri, headers, body, want, says) in cases {
            let (status, _, answer) = send(&app, method, uri, headers, &body).await;
            assert_eq!(status, want, "{method} {uri}: {answer}");
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(message.contains(says), "{method} {uri}: {answer}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_metrics_count_known_names_and_pool_the_others() {
        let (app, _) = app(None, &[]).await;
        for uri in [
            "/v2/models/iris/infer",
            "/v2/models/ab/infer",
            "/v2/models/nope/infer",
            "/v2/models/other/infer",
        ] {
            send(&app, "POST", uri, &[], SETOSA).await;
        }
        send(
            &app,
            "POST",
            "/v2/models/iris/versions/7/infer",
            &[],
            SETOSA,
        )
        .await;
        let (status, headers, text) = send(&app, "GET", "/metrics", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = text.as_str().unwrap();
        for series in [
            r#"modelyard_requests_total{endpoint="iris",variant="",model="iris",version="2",status="200"} 1"#,
            r#"modelyard_requests_total{endpoint="ab",variant="a",model="iris",version="1",status="200"} 1"#,
            r#"modelyard_requests_total{endpoint="unknown",variant="",model="",version="",status="404"} 2"#,
            r#"modelyard_requests_total{endpoint="iris",variant="",model="",version="",status="404"} 1"#,
        ] {
            assert!(text.contains(series), "no {series} in\n{text}");
        }
        assert!(!text.contains("nope"), "{text}");
        assert!(text.contains("modelyard_requests_in_flight 0"), "{text}");
    }
}
