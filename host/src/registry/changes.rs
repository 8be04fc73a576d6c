//! What one rescan changed, for the audit trail and the metrics: versions loaded,
//! replaced, refused and unloaded (their series removed), models gone, and `model.toml`
//! files refused.

use std::sync::Arc;

use super::snapshot::{LoadedVersion, Snapshot};
use crate::telemetry::{Change, Load, Telemetry};

fn count(telemetry: &Telemetry, model: &str, outcome: Load) {
    if let Some(metrics) = telemetry.metrics() {
        metrics.model_load(model, outcome);
    }
}

/// A version that stops serving (or is replaced) takes its drift series with it.
fn forget_drift(telemetry: &Telemetry, gone: &LoadedVersion) {
    if let (Some(metrics), Some(drift)) = (telemetry.metrics(), &gone.drift) {
        let features = drift.reference.features.iter().map(|f| f.name.as_str());
        metrics.forget_drift(&gone.model, gone.version, features);
    }
}

pub(super) fn report(previous: &Snapshot, next: &Snapshot, telemetry: &Telemetry) {
    for (name, model) in &next.models {
        let before = previous.models.get(name);
        for (version, entry) in &model.versions {
            let old = before.and_then(|b| b.versions.get(version));
            let old_loaded = old.and_then(|o| o.loaded.as_ref());
            // What `scan` rereads alone: the reference, under the same file and settings.
            let reference_only = old.is_some_and(|o| {
                o.stamp == entry.stamp && o.reference_stamp != entry.reference_stamp
            }) && before.is_some_and(|b| b.config == model.config);
            if let Some(loaded) = &entry.loaded
                && let Some(old) = old_loaded.filter(|_| reference_only)
                && !Arc::ptr_eq(old, loaded)
            {
                // The same model file with a new drift reference: not a load.
                forget_drift(telemetry, old);
                telemetry.audit(Change {
                    to: Some(format!("version {version}")),
                    detail: Some(match &loaded.drift {
                        Some(_) => "drift reference reread".to_string(),
                        None => "no usable drift reference".to_string(),
                    }),
                    ..Change::new("model.reference", "file", name.as_str())
                });
            } else if let Some(loaded) = &entry.loaded
                && !old_loaded.is_some_and(|o| Arc::ptr_eq(o, loaded))
            {
                count(telemetry, name, Load::Loaded);
                if let Some(old) = old_loaded {
                    forget_drift(telemetry, old);
                }
                telemetry.audit(Change {
                    from: old_loaded.map(|_| format!("version {version} (previous file)")),
                    to: Some(format!("version {version}")),
                    detail: loaded
                        .drift
                        .as_ref()
                        .map(|_| "with a drift reference".to_string()),
                    ..Change::new("model.loaded", "file", name.as_str())
                });
            }
            if let Some(refused) = &entry.refused
                && old.and_then(|o| o.refused.as_ref()) != Some(refused)
            {
                count(telemetry, name, Load::Refused);
                telemetry.audit(Change {
                    to: Some(format!("version {version}")),
                    detail: Some(refused.to_string()),
                    ..Change::new("model.refused", "file", name.as_str())
                });
            }
        }
        if let Some(refused) = &model.refused_config
            && before.and_then(|b| b.refused_config.as_ref()) != Some(refused)
        {
            telemetry.audit(Change {
                detail: Some(refused.to_string()),
                ..Change::new("model.config_refused", "file", name.as_str())
            });
        }
    }
    for (name, model) in &previous.models {
        for (version, entry) in &model.versions {
            let still = next
                .models
                .get(name)
                .and_then(|m| m.versions.get(version))
                .is_some_and(|e| e.loaded.is_some());
            if let Some(gone) = entry.loaded.as_ref().filter(|_| !still) {
                forget_drift(telemetry, gone);
                telemetry.spendings().forget_version(name, *version);
                if let Some(metrics) = telemetry.metrics() {
                    metrics.forget_version(name, *version);
                }
                count(telemetry, name, Load::Unloaded);
                telemetry.audit(Change {
                    from: Some(format!("version {version}")),
                    ..Change::new("model.unloaded", "file", name.as_str())
                });
            }
        }
        if !next.models.contains_key(name)
            && let Some(metrics) = telemetry.metrics()
        {
            metrics.forget_model(name);
        }
    }
}
