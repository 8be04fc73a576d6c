//! What one rescan changed, for the audit trail and the load metrics: versions loaded,
//! replaced, refused and unloaded, and `model.toml` files refused.

use std::sync::Arc;

use super::Snapshot;
use crate::telemetry::{self, Change, Load};

fn change(kind: &'static str, model: &str) -> Change {
    Change {
        kind,
        actor: "file".to_string(),
        subject: model.to_string(),
        endpoint: None,
        from: None,
        to: None,
        detail: None,
    }
}

fn count(model: &str, outcome: Load) {
    if let Some(metrics) = telemetry::metrics() {
        metrics.model_load(model, outcome);
    }
}

pub(super) fn report(previous: &Snapshot, next: &Snapshot) {
    for (name, model) in &next.models {
        let before = previous.models.get(name);
        for (version, entry) in &model.versions {
            let old = before.and_then(|b| b.versions.get(version));
            let old_loaded = old.and_then(|o| o.loaded.as_ref());
            if let Some(loaded) = &entry.loaded
                && !old_loaded.is_some_and(|o| Arc::ptr_eq(o, loaded))
            {
                count(name, Load::Loaded);
                telemetry::audit(Change {
                    from: old_loaded.map(|_| format!("version {version} (previous file)")),
                    to: Some(format!("version {version}")),
                    detail: loaded
                        .drift
                        .as_ref()
                        .map(|_| "with a drift reference".to_string()),
                    ..change("model.loaded", name)
                });
            }
            if let Some(refused) = &entry.refused
                && old.and_then(|o| o.refused.as_ref()) != Some(refused)
            {
                count(name, Load::Refused);
                telemetry::audit(Change {
                    to: Some(format!("version {version}")),
                    detail: Some(refused.to_string()),
                    ..change("model.refused", name)
                });
            }
        }
        if let Some(refused) = &model.refused_config
            && before.and_then(|b| b.refused_config.as_ref()) != Some(refused)
        {
            telemetry::audit(Change {
                detail: Some(refused.to_string()),
                ..change("model.config_refused", name)
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
            if entry.loaded.is_some() && !still {
                count(name, Load::Unloaded);
                telemetry::audit(Change {
                    from: Some(format!("version {version}")),
                    ..change("model.unloaded", name)
                });
            }
        }
    }
}
