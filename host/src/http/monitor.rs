//! The monitoring side of the operator API: the audit trail and the request log (both
//! paged, newest first), drift per model, model cards (JSON, or HTML for a browser), and
//! one status summary.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use super::error::{ApiError, blocking};
use super::state::HttpState;
use crate::config::Role;
use crate::registry::Model;
use crate::telemetry::{self, ReadError, Telemetry};

type AppState = State<Arc<HttpState>>;

/// Rows per page unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// The filters `GET /admin/audit` and `GET /admin/requests` take.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Filters {
    endpoint: Option<String>,
    kind: Option<String>,
    subject: Option<String>,
    /// RFC 3339, or Unix milliseconds.
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    before: Option<i64>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn time_ms(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(Some(ms));
    }
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|e| {
            bad_request(format!(
                "'{name}' must be an RFC 3339 time (2026-11-29T10:00:00Z) or Unix milliseconds, not '{value}': {e}"
            ))
        })
}

impl Filters {
    fn query(self) -> Result<telemetry::Query, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(bad_request(format!(
                "'limit' must be between 1 and {MAX_LIMIT}"
            )));
        }
        Ok(telemetry::Query {
            since_ms: time_ms("since", self.since.as_deref())?,
            until_ms: time_ms("until", self.until.as_deref())?,
            endpoint: self.endpoint,
            kind: self.kind,
            subject: self.subject,
            before: self.before,
            limit,
        })
    }
}

fn filters(params: Result<Query<Filters>, QueryRejection>) -> Result<telemetry::Query, ApiError> {
    let Query(filters) = params.map_err(|e| {
        bad_request(format!(
            "{} (filters: endpoint, kind, subject, since, until, limit, before)",
            e.body_text()
        ))
    })?;
    filters.query()
}

fn unreadable(error: ReadError) -> ApiError {
    let status = match error {
        ReadError::Off => StatusCode::NOT_FOUND,
        ReadError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, error.to_string())
}

/// One page from the store, read off the reactor.
async fn read<T: Send + 'static>(
    state: &HttpState,
    what: &str,
    query: telemetry::Query,
    read: fn(&Telemetry, &telemetry::Query) -> Result<telemetry::Page<T>, ReadError>,
) -> Result<Result<telemetry::Page<T>, ReadError>, ApiError> {
    let telemetry = state.telemetry.clone();
    blocking(what, move || read(&telemetry, &query)).await
}

/// `GET /admin/audit`: every recorded change, newest first.
pub(super) async fn audit(
    State(state): AppState,
    headers: HeaderMap,
    params: Result<Query<Filters>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let query = filters(params)?;
    let page = read(&state, "reading the audit trail", query, Telemetry::changes)
        .await?
        .map_err(unreadable)?;
    Ok(Json(json!({ "changes": page.items, "next": page.next })))
}

/// `GET /admin/requests`: the sampled requests, newest first.
pub(super) async fn requests(
    State(state): AppState,
    headers: HeaderMap,
    params: Result<Query<Filters>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let query = filters(params)?;
    if query.kind.is_some() || query.subject.is_some() {
        return Err(bad_request(
            "requests are filtered by endpoint, since, until, limit and before",
        ));
    }
    let page = read(
        &state,
        "reading the request log",
        query,
        Telemetry::requests,
    )
    .await?
    .map_err(unreadable)?;
    let items: Vec<_> = page.items.into_iter().map(|(_, record)| record).collect();
    Ok(Json(json!({ "requests": items, "next": page.next })))
}

fn model(state: &HttpState, name: &str) -> Result<Arc<Model>, ApiError> {
    Ok(state.pipeline.repository().snapshot()?.model(name)?.clone())
}

/// Each version of a model: whether it serves, and why not.
fn versions(model: &Model) -> Vec<serde_json::Value> {
    model
        .versions
        .iter()
        .map(|(v, e)| json!({ "version": v, "loaded": e.loaded.is_some(), "refused": e.refused.as_deref() }))
        .collect()
}

/// Every loaded version's drift figures as the drift timer last judged them: a read judges
/// nothing, so it flips, logs, audits and counts nothing.
fn drift_of(model: &Model) -> Vec<serde_json::Value> {
    model
        .versions
        .iter()
        .filter_map(|(version, entry)| Some((version, entry.loaded.as_ref()?)))
        .map(|(version, loaded)| match &loaded.drift {
            Some(monitor) => json!({
                "version": version,
                "input": monitor.reference.input,
                "window": monitor.config.window,
                "min_samples": monitor.config.min_samples,
                "ks_threshold": monitor.config.ks_threshold,
                "psi_threshold": monitor.config.psi_threshold,
                "features": monitor.last(),
            }),
            None => json!({
                "version": version,
                "reference": null,
                "note": "no reference.json beside this version: drift is not followed",
            }),
        })
        .collect()
}

/// `GET /admin/drift/{model}`: per loaded version and feature, KS and PSI over the latest
/// inputs, and whether the feature is drifted, as of the drift timer's last judgement.
pub(super) async fn drift(
    State(state): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let model = model(&state, &name)?;
    Ok(Json(json!({ "model": name, "versions": drift_of(&model) })))
}

/// `GET /admin/models/{m}/card`: the card from `model.toml`, the versions served and
/// their history from the audit trail; HTML for `Accept: text/html` or `?format=html`.
pub(super) async fn card(
    State(state): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(format): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let model = model(&state, &name)?;
    let query = telemetry::Query {
        kind: Some("model".to_string()),
        subject: Some(name.clone()),
        limit: MAX_LIMIT,
        ..telemetry::Query::default()
    };
    let history = match read(
        &state,
        "reading the model's history",
        query,
        Telemetry::changes,
    )
    .await?
    {
        Ok(page) => json!(page.items),
        Err(ReadError::Off) => json!(null),
        Err(error) => return Err(unreadable(error)),
    };
    let versions = versions(&model);
    let card = model.config.card.clone().unwrap_or_default();
    let body = json!({
        "name": name,
        "description": card.description,
        "intended_use": card.intended_use,
        "limitations": card.limitations,
        "owner": card.owner,
        "training_data": card.training_data,
        "evaluation": card.metrics,
        "versions": versions,
        "history": history,
    });
    let wants_html = format.get("format").is_some_and(|f| f == "html")
        || headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        Ok(Html(card_html(&body).into_string()).into_response())
    } else {
        Ok(Json(body).into_response())
    }
}

fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "—".to_string(),
        other => other.to_string(),
    }
}

/// The card as a page a reviewer reads; every value is escaped by `maud`.
fn card_html(card: &serde_json::Value) -> maud::Markup {
    let field = |label: &str, key: &str| {
        maud::html! { dt { (label) } dd { (text(&card[key])) } }
    };
    let empty = Vec::new();
    maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Model card: " (text(&card["name"])) }
                style { "body{font-family:sans-serif;max-width:50em;margin:2em auto}dt{font-weight:bold}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}" }
            }
            body {
                h1 { "Model card: " (text(&card["name"])) }
                p { (text(&card["description"])) }
                dl {
                    (field("Intended use", "intended_use"))
                    (field("Limitations", "limitations"))
                    (field("Owner", "owner"))
                    (field("Training data", "training_data"))
                }
                h2 { "Evaluation" }
                @if let Some(evaluation) = card["evaluation"].as_object() {
                    table {
                        tr { th { "version" } th { "metric" } th { "value" } }
                        @for (version, metrics) in evaluation {
                            @for (metric, value) in metrics.as_object().into_iter().flatten() {
                                tr { td { (version) } td { (metric) } td { (text(value)) } }
                            }
                        }
                    }
                }
                h2 { "Versions" }
                ul {
                    @for v in card["versions"].as_array().unwrap_or(&empty) {
                        li {
                            "version " (text(&v["version"])) ": "
                            @if v["loaded"] == true { "serving" } @else { "not serving" }
                            @if let Some(refused) = v["refused"].as_str() { " (" (refused) ")" }
                        }
                    }
                }
                h2 { "History" }
                table {
                    tr { th { "time" } th { "change" } th { "from" } th { "to" } th { "detail" } }
                    @for c in card["history"].as_array().unwrap_or(&empty) {
                        tr {
                            td { (text(&c["at"])) } td { (text(&c["kind"])) }
                            td { (text(&c["from"])) } td { (text(&c["to"])) } td { (text(&c["detail"])) }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /admin/status`: readiness, models, plugins, endpoints, drifted features and the
/// latest errors in one answer.
pub(super) async fn status(
    State(state): AppState,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let snapshot = state.pipeline.repository().snapshot().ok();
    let models: Vec<serde_json::Value> = snapshot
        .iter()
        .flat_map(|s| s.models.values())
        .map(|m| {
            // As the drift timer last judged them: a status poll computes nothing.
            let drifted: Vec<serde_json::Value> = m
                .versions
                .iter()
                .filter_map(|(v, e)| Some((v, e.loaded.as_ref()?.drift.as_ref()?)))
                .flat_map(|(version, monitor)| {
                    monitor.last().into_iter().filter(|f| f.drifted).map(move |f| {
                        json!({ "version": version, "feature": f.feature, "ks": f.ks, "psi": f.psi })
                    })
                })
                .collect();
            json!({
                "name": m.name,
                "serving": m.default_version().is_some(),
                "versions": versions(m),
                "config_refused": m.refused_config.as_deref(),
                "drifted": drifted,
            })
        })
        .collect();
    let plugins: Vec<serde_json::Value> = state
        .pipeline
        .plugins()
        .files
        .values()
        .map(|f| {
            json!({
                "name": f.name,
                "world": f.prepared.as_ref().map(|p| p.world.as_str()),
                "serving": f.prepared.is_some(),
                "error": f.error,
            })
        })
        .collect();
    let set = state.pipeline.endpoints();
    let endpoints: Vec<serde_json::Value> = set
        .all()
        .map(|(name, serving, error)| {
            json!({ "name": name, "serving": serving.is_some(), "error": error })
        })
        .collect();
    Ok(Json(json!({
        "ready": snapshot.as_ref().is_some_and(|s| s.serving()),
        "models": models,
        "plugins": plugins,
        "endpoints": endpoints,
        "cluster": state.cluster.as_ref().map(|c| c.describe()),
        "recent_errors": state.telemetry.recent_errors(),
        // Whether /admin/audit and /admin/requests have anything to read.
        "records_kept": state.telemetry.keeps_records(),
    })))
}
