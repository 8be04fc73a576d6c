use std::any::Any;
use std::cell::RefCell;

use super::bindings::router as wit;
use super::bindings::types;
use crate::{Action, RequestContext, Router, VariantStats};

pub use wit::Guest;

/// The contract's decision: the router's, and the state it asks the host to keep.
pub type Decision = types::Decision;

thread_local! {
    /// The state text last seen and its parsed form: the host hands the same text to call
    /// after call, so it is parsed once per change, not once per request.
    static STATE: RefCell<Option<(String, Box<dyn Any>)>> = const { RefCell::new(None) };
}

fn parse_state<T: Router>(text: String) -> T::State {
    STATE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((seen, parsed)) = cache.as_ref()
            && *seen == text
            && let Some(state) = parsed.downcast_ref::<T::State>()
        {
            return state.clone();
        }
        // A state this build cannot read (written by an older version of the plugin, say)
        // starts afresh rather than fail every request from now on.
        let state: T::State = if text.is_empty() {
            T::State::default()
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                crate::log(
                    crate::Level::Warn,
                    &format!("cannot read the state the host kept ({e}); starting afresh"),
                );
                T::State::default()
            })
        };
        *cache = Some((text, Box::new(state.clone())));
        state
    })
}

fn state_text<S: serde::Serialize>(state: &S) -> Result<String, String> {
    serde_json::to_string(state).map_err(|e| format!("cannot write the router's state: {e}"))
}

pub fn route<T: Router>(
    ctx: RequestContext,
    variants: Vec<VariantStats>,
    state: String,
) -> Result<Decision, String> {
    let mut state = parse_state::<T>(state);
    let before = state.clone();
    let decision =
        super::with_plugin::<T, _>(|p| p.route(&ctx, &variants, &mut state))?.map_err(|e| e.0)?;
    let state = if state == before {
        None
    } else {
        Some(state_text(&state)?)
    };
    Ok(Decision {
        primary: decision.primary,
        shadows: decision.shadows,
        reason: decision.reason,
        state,
    })
}

pub fn act<T: Router>(
    action: &str,
    args: &str,
    state: String,
    variants: Vec<VariantStats>,
    now_ms: u64,
) -> Result<String, String> {
    let mut request = match args.trim() {
        "" => serde_json::Value::Object(serde_json::Map::new()),
        text => serde_json::from_str(text).map_err(|e| format!("the body is not JSON: {e}"))?,
    };
    let serde_json::Value::Object(fields) = &mut request else {
        return Err("the body must be a JSON object".to_string());
    };
    fields.insert("action".to_string(), serde_json::Value::from(action));
    let action: Action = serde_json::from_value(request).map_err(|e| format!("{action}: {e}"))?;
    let mut state = parse_state::<T>(state);
    super::with_plugin::<T, _>(|p| p.act(action, &mut state, &variants, now_ms))?
        .map_err(|e| e.0)?;
    state_text(&state)
}

pub fn describe<T: Router>(state: String, variants: Vec<VariantStats>) -> String {
    let state = parse_state::<T>(state);
    let described = super::with_plugin::<T, _>(|p| p.describe(&state, &variants));
    match described {
        Ok(value) => value.to_string(),
        Err(error) => serde_json::json!({ "error": error }).to_string(),
    }
}
