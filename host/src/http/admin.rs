//! The operator API under `/admin/`: plugins, endpoints and their strategies, experiments,
//! the audit trail and request log, drift, model cards and a status summary. Reads need a
//! read token once any exist; changes need an admin token; with `server.tls.client_ca`,
//! every route also needs a verified client certificate.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

use super::error::{ApiError, blocking};
use super::monitor;
use super::state::HttpState;
use super::tls::ClientCertified;
use crate::config::Role;
use crate::endpoint::{ActError, Endpoint, EndpointSet, compare};
use crate::telemetry::Change;

type AppState = State<Arc<HttpState>>;

pub(super) fn routes(state: Arc<HttpState>) -> Router<Arc<HttpState>> {
    Router::new()
        .route("/admin/experiments/{endpoint}", get(admin_experiment))
        .route("/admin/plugins", get(admin_plugins))
        .route("/admin/endpoints", get(admin_endpoints))
        .route("/admin/endpoints/{endpoint}", get(admin_endpoint))
        .route("/admin/endpoints/{endpoint}/{action}", post(admin_act))
        .route("/admin/audit", get(monitor::audit))
        .route("/admin/requests", get(monitor::requests))
        .route("/admin/drift/{model}", get(monitor::drift))
        .route("/admin/models/{model}/card", get(monitor::card))
        .route("/admin/status", get(monitor::status))
        .route("/admin/whoami", get(whoami))
        .route("/admin/history/{endpoint}", get(history))
        .route("/admin/cost", get(cost))
        .route_layer(axum::middleware::from_fn_with_state(state, certified))
}

/// With `server.tls.client_ca`, only a client whose certificate verified in the handshake
/// may use `/admin/`; the tokens apply on top.
pub(super) async fn certified(
    State(state): AppState,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let verified = matches!(
        request.extensions().get::<ClientCertified>(),
        Some(ClientCertified(true))
    );
    if state.client_certificates && !verified {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "the operator API needs a client certificate signed by server.tls.client_ca; connect with one (e.g. curl --cert client.pem --key client.key)",
        )
        .into_response();
    }
    next.run(request).await
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
    let endpoints = state.pipeline.endpoints();
    let metrics = state.telemetry.metrics();
    let plugins: Vec<serde_json::Value> = library
        .files
        .values()
        .map(|f| {
            let state = match (&f.prepared, &f.error) {
                (Some(_), None) => "serving",
                (Some(_), Some(_)) => "serving previous version; new file refused",
                (None, _) => "refused",
            };
            let failures = endpoints.run_failures(&f.name);
            let (failed_at, failure) = failures.last.unzip();
            let calls = f
                .prepared
                .as_ref()
                .zip(metrics)
                .and_then(|(p, m)| m.plugin_calls(&f.name, p.world.as_str()));
            json!({
                "name": f.name,
                "world": f.prepared.as_ref().map(|p| p.world.as_str()),
                "hash": f.hash,
                "loaded_at": unix_seconds(f.loaded_at),
                "state": state,
                // Why the file on disk is refused, else the last call that failed.
                "last_error": f.error.clone().or_else(|| failure.clone()),
                "refused": f.error,
                "failures": failures.count,
                "last_failure": failure,
                "last_failure_at": unix_seconds(failed_at),
                // With metrics on: calls since the server started, and their mean time.
                "calls": calls.map(|(n, _)| n),
                "call_mean_us": calls.map(|(_, mean)| mean.as_secs_f64() * 1e6),
            })
        })
        .collect();
    Ok(Json(json!({ "plugins": plugins })))
}

/// A plugin as one endpoint binds it: its failures there and the last one's reason.
fn binding<W: crate::plugins::World>(bound: &crate::endpoint::Bound<W>) -> serde_json::Value {
    json!({
        "plugin": bound.plugin,
        "failures": bound.pool.failures(),
        "last_error": bound.pool.last_failure().map(|(_, why)| why),
    })
}

/// `GET /admin/whoami`: the token's name and whether it may act, so that a client (the
/// dashboard) offers only what it may do.
async fn whoami(
    State(state): AppState,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = state.tokens.authorize(&headers, Role::Read)?;
    let can_act = state.tokens.authorize(&headers, Role::Admin).is_ok();
    Ok(Json(json!({
        "token": name,
        "role": if can_act { "admin" } else { "read" },
        "can_act": can_act,
    })))
}

/// `GET /admin/history/{e}`: the endpoint's last hour, a column per series.
async fn history(
    State(state): AppState,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    endpoint(&state.pipeline.endpoints(), &name)?;
    // Built since the last sample: nothing to draw yet, but the step is known.
    let columns = state
        .history
        .columns(&name)
        .unwrap_or_else(|| state.history.nothing_yet());
    let mut body = json!(columns);
    body["endpoint"] = json!(name);
    Ok(Json(body))
}

/// `GET /admin/cost`: CPU time, predictions and the cost of a million of them, per model
/// version and per endpoint variant.
async fn cost(
    State(state): AppState,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.tokens.authorize(&headers, Role::Read)?;
    let spendings = state.telemetry.spendings();
    let snapshot = state.pipeline.repository().snapshot()?;
    let models: Vec<serde_json::Value> = snapshot
        .models
        .values()
        .flat_map(|m| {
            m.versions
                .iter()
                .filter_map(|(version, entry)| Some((version, entry.loaded.as_ref()?)))
                .map(|(version, loaded)| {
                    let mut row = json!(loaded.runner.spending().spent());
                    row["model"] = json!(m.name);
                    row["version"] = json!(version);
                    row["backend"] = json!(loaded.engine.backend);
                    row
                })
        })
        .collect();
    let set = state.pipeline.endpoints();
    let variants: Vec<serde_json::Value> = set
        .endpoints
        .values()
        .flat_map(|e| {
            e.variants.iter().map(|v| {
                let mut row = json!(v.spending.spent());
                row["endpoint"] = json!(e.name);
                row["variant"] = json!(v.name);
                row["model"] = json!(v.model);
                row["version"] = json!(v.version);
                row
            })
        })
        .collect();
    Ok(Json(json!({
        "core_hour_price": spendings.core_hour_price(),
        "models": models,
        "variants": variants,
    })))
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
                "running_past_budget": v.stats.past_budget(),
            })
        })
        .collect();
    json!({
        "name": e.name,
        "variants": variants,
        "default_variant": e.variants[e.default_variant].name,
        "fallback_variant": e.fallback.map(|f| &e.variants[f].name),
        "latency_budget_ms": e.latency_budget.map(|b| b.as_millis() as u64),
        "router": e.router.as_ref().map(binding),
        "processors": e.processors.iter().map(binding).collect::<Vec<_>>(),
        "flags": e.flags.iter().map(binding).collect::<Vec<_>>(),
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
    let endpoints: Vec<serde_json::Value> = set
        .all()
        .map(|(name, serving, error)| match serving {
            Some(e) => endpoint_summary(e, error),
            None => json!({ "name": name, "error": error }),
        })
        .collect();
    Ok(Json(json!({ "endpoints": endpoints })))
}

fn endpoint(set: &EndpointSet, name: &str) -> Result<Arc<Endpoint>, ApiError> {
    set.endpoints
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint '{name}'")))
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
    let before = e.strategy.load();
    let mut shared = None;
    let mut done;
    // In a cluster the action is taken on the shared state: when another replica changed
    // it first, the action is taken again on theirs.
    let mut attempts = 0;
    loop {
        attempts += 1;
        done = blocking("the admin action", {
            let (action, args, e) = (action.clone(), args.clone(), e.clone());
            move || e.act(&action, &args)
        })
        .await?;
        let (Ok(_), Some(cluster)) = (&done, &state.cluster) else {
            break;
        };
        match cluster.share_now(&name).await {
            Ok(true) => {
                shared = Some(true);
                break;
            }
            Ok(false) if attempts < 4 => continue,
            Ok(false) => {
                done = Err(ActError::Contended(name.clone()));
                break;
            }
            Err(error) => {
                tracing::warn!(endpoint = %name, %action, %error, "the action holds on this replica; the others get it when the cluster's Redis is back");
                shared = Some(false);
                break;
            }
        }
    }
    let change = |kind: &'static str, detail: String| Change {
        kind,
        actor: token.clone(),
        subject: name.clone(),
        endpoint: Some(name.clone()),
        from: Some(before.to_string()),
        to: Some(e.strategy.load().to_string()),
        detail: Some(detail),
    };
    match done {
        Ok(strategy) => {
            let kind = match action.as_str() {
                "weights" => "endpoint.weights",
                "promote" => "endpoint.promote",
                _ => "endpoint.rollback",
            };
            state
                .telemetry
                .audit(change(kind, format!("{action} {args}")));
            let mut answer = json!({ "endpoint": name, "action": action, "strategy": strategy });
            // Whether every replica takes it (false: this one only, until Redis is back).
            if let Some(shared) = shared {
                answer["shared"] = json!(shared);
            }
            Ok(Json(answer))
        }
        Err(error) => {
            state
                .telemetry
                .audit(change("admin.refused", format!("{action} {args}: {error}")));
            let status = match error {
                ActError::Refused { .. } => StatusCode::BAD_REQUEST,
                ActError::NoRouter(_) | ActError::Contended(_) => StatusCode::CONFLICT,
                ActError::Plugin { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(status, error.to_string()))
        }
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
    let performance: serde_json::Map<String, serde_json::Value> = e
        .variants
        .iter()
        .map(|v| (v.name.clone(), json!(v.stats.performance.report())))
        .collect();
    Ok(Json(json!({
        "endpoint": name, "arms": arms, "comparisons": comparisons,
        "shadows": shadow_reports(&e),
        "segment_by": e.segment_by,
        "performance": performance,
    })))
}

#[cfg(test)]
mod tests {
    use super::super::routes::tests::{app, send};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reading_is_open_until_a_token_exists_and_changing_needs_an_admin() {
        let (open, _) = app(None, &[]).await;
        let (status, _, body) = send(&open, "GET", "/admin/endpoints", &[], "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.to_string().contains("\"ab\""), "{body}");
        let (status, _, body) = send(&open, "POST", "/admin/endpoints/ab/rollback", &[], "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("configure an admin token")
        );

        let tokens = [
            ("viewer", "look", Role::Read),
            ("ops", "change", Role::Admin),
        ];
        let (guarded, _) = app(None, &tokens).await;
        let (status, _, _) = send(&guarded, "GET", "/admin/endpoints", &[], "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let viewer = [("authorization", "Bearer look")];
        let (status, _, _) = send(&guarded, "GET", "/admin/endpoints/ab", &viewer, "").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(
            &guarded,
            "POST",
            "/admin/endpoints/ab/rollback",
            &viewer,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_action_the_endpoint_cannot_take_is_refused_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = [("ops", "change", Role::Admin)];
        let (app, telemetry) = app(Some(dir.path()), &tokens).await;
        let ops = [("authorization", "Bearer change")];
        let cases = [
            (
                "/admin/endpoints/ab/rollback",
                StatusCode::CONFLICT,
                "no router",
            ),
            (
                "/admin/endpoints/ab/explode",
                StatusCode::NOT_FOUND,
                "no action 'explode'",
            ),
            (
                "/admin/endpoints/nope/rollback",
                StatusCode::NOT_FOUND,
                "nope",
            ),
        ];
        for (uri, want, says) in cases {
            let (status, _, body) = send(&app, "POST", uri, &ops, "{}").await;
            assert_eq!(status, want, "{uri}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains(says),
                "{uri}: {body}"
            );
        }
        telemetry.shutdown();
        let (status, _, audit) =
            send(&app, "GET", "/admin/audit?kind=admin.refused", &ops, "").await;
        assert_eq!(status, StatusCode::OK, "{audit}");
        let refused = &audit["changes"][0];
        assert_eq!(
            (&refused["actor"], &refused["subject"]),
            (&json!("ops"), &json!("ab")),
            "{audit}"
        );
    }
}
