//! `flagd`: evaluates feature flags written in the OpenFeature flagd format, so existing
//! flagd files work unchanged: `state`, `variants`, `defaultVariant`, `targeting` in
//! JsonLogic with flagd's operators (`fractional` bucketing by targeting key, `sem_ver`,
//! `starts_with`, `ends_with`, `in`, comparisons …), `$evaluators` with `$ref`, and
//! `metadata`. A `DISABLED` flag is not set at all — the kill switch: the endpoint routes
//! as if the flag did not exist. A flag whose `metadata.expiry` date has passed is reported
//! as expired (the host logs it and shows it under `/admin/endpoints/{e}`).
//!
//! The JsonLogic engine is `datalogic-rs` with its flagd operators, which follow flagd's
//! reference algorithms (MurmurHash3 buckets for `fractional`), so a user lands in the same
//! bucket here as in every other flagd provider.
//!
//! ```toml
//! [[endpoints.iris-flags.flags]]
//! plugin = "flagd"
//! config_file = "flags.json"   # a flagd file; or the same document inline as `config`
//! ```

use std::collections::BTreeMap;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::{DataValue, Engine, Logic};
use modelyard_sdk::{Error, Evaluation, FlagInfo, Flags, RequestContext, fail};
use serde_json::{Map, Value};

/// A flagd document: `{"flags": {...}, "$evaluators": {...}}`; other keys flagd files
/// carry (`$schema`, flag-set `metadata`) are accepted and not used.
#[derive(serde::Deserialize)]
pub struct Config {
    pub flags: BTreeMap<String, Value>,
    #[serde(rename = "$evaluators", default)]
    pub evaluators: Map<String, Value>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Definition {
    state: State,
    variants: Map<String, Value>,
    default_variant: String,
    #[serde(default)]
    targeting: Option<Value>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum State {
    Enabled,
    Disabled,
}

struct Flag {
    key: String,
    state: State,
    variants: Vec<String>,
    default_variant: String,
    targeting: Option<Logic>,
    metadata: Vec<(String, String)>,
    /// End of the expiry day, in milliseconds since the epoch.
    expires_ms: Option<u64>,
}

pub struct FlagdFlags {
    engine: Engine,
    flags: Vec<Flag>,
}

/// Bounds on the targeting rules once their `$ref`s are replaced: evaluators that refer
/// to one another twice over (`a` = [b, b], `b` = [c, c] …) grow a small file
/// exponentially, and a rule nested deeper than the JSON parser allows overflows the stack
/// of the code that compiles and evaluates it.
const MAX_RULE_VALUES: usize = 100_000;
const MAX_RULE_DEPTH: usize = 128;

/// Replaces `{"$ref": "name"}` with the named evaluator, refusing cycles and rules past
/// the bounds; `values` counts what every flag's rules hold so far.
struct Expansion<'a> {
    evaluators: &'a Map<String, Value>,
    stack: Vec<String>,
    values: usize,
}

impl Expansion<'_> {
    fn resolve(&mut self, value: &mut Value, depth: usize) -> Result<(), Error> {
        self.values += 1;
        if self.values > MAX_RULE_VALUES {
            return fail!(
                "the targeting rules, their $refs replaced, hold over {MAX_RULE_VALUES} values"
            );
        }
        if depth > MAX_RULE_DEPTH {
            return fail!(
                "the targeting rule, its $refs replaced, nests deeper than {MAX_RULE_DEPTH}"
            );
        }
        match value {
            Value::Object(object) => {
                if let (1, Some(name)) = (object.len(), object.get("$ref").and_then(Value::as_str))
                {
                    let name = name.to_string();
                    if self.stack.contains(&name) {
                        return fail!("evaluator '{name}' refers to itself");
                    }
                    let mut replacement = self.evaluators.get(&name).cloned().ok_or_else(|| {
                        Error::new(format!("no evaluator '{name}' in $evaluators"))
                    })?;
                    self.stack.push(name);
                    self.resolve(&mut replacement, depth)?;
                    self.stack.pop();
                    *value = replacement;
                    return Ok(());
                }
                object
                    .values_mut()
                    .try_for_each(|v| self.resolve(v, depth + 1))
            }
            Value::Array(items) => items
                .iter_mut()
                .try_for_each(|v| self.resolve(v, depth + 1)),
            _ => Ok(()),
        }
    }
}

/// `expiry` as a date (`2026-12-31`) or a timestamp (`2026-12-31T12:00:00Z`); the flag is
/// good through the end of that day or until that instant.
fn expiry_ms(text: &str) -> Result<u64, Error> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    let instant = match time::OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => at,
        Err(_) => {
            let day = time::Date::parse(text, &Iso8601::DATE).map_err(|e| {
                Error::new(format!(
                    "expiry '{text}' is neither a date (2026-12-31) nor an RFC 3339 time: {e}"
                ))
            })?;
            day.next_day().unwrap_or(day).midnight().assume_utc()
        }
    };
    Ok(u64::try_from(instant.unix_timestamp()).unwrap_or(0) * 1000)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Flags for FlagdFlags {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        let engine = Engine::new();
        let mut flags = Vec::with_capacity(config.flags.len());
        let mut expansion = Expansion {
            evaluators: &config.evaluators,
            stack: Vec::new(),
            values: 0,
        };
        for (key, definition) in config.flags {
            let d: Definition = serde_json::from_value(definition)
                .map_err(|e| Error::new(format!("flag '{key}': {e}")))?;
            if !d.variants.contains_key(&d.default_variant) {
                return fail!(
                    "flag '{key}': defaultVariant '{}' is not one of its variants",
                    d.default_variant
                );
            }
            let targeting = match d.targeting {
                Some(mut rule) if rule.as_object().is_none_or(|o| !o.is_empty()) => {
                    expansion
                        .resolve(&mut rule, 0)
                        .map_err(|e| Error::new(format!("flag '{key}': {e}")))?;
                    Some(engine.compile(&rule).map_err(|e| {
                        Error::new(format!(
                            "flag '{key}': the targeting rule does not compile: {e}"
                        ))
                    })?)
                }
                _ => None,
            };
            let expires_ms = d
                .metadata
                .get("expiry")
                .map(|v| expiry_ms(&text(v)).map_err(|e| Error::new(format!("flag '{key}': {e}"))))
                .transpose()?;
            flags.push(Flag {
                state: d.state,
                variants: d.variants.keys().cloned().collect(),
                default_variant: d.default_variant,
                targeting,
                metadata: d
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), text(v)))
                    .collect(),
                expires_ms,
                key,
            });
        }
        Ok(FlagdFlags { engine, flags })
    }

    fn evaluate(&self, ctx: &RequestContext) -> Vec<Evaluation> {
        // flagd's evaluation context: the request's attributes, the targeting key, and
        // `$flagd` with the flag's key and the time in seconds.
        let mut context: Map<String, Value> = ctx
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        if let Some(key) = &ctx.targeting_key {
            context.insert("targetingKey".to_string(), Value::from(key.as_str()));
        }
        let mut context = Value::Object(context);
        let arena = Bump::new();
        self.flags
            .iter()
            .filter(|f| f.state == State::Enabled)
            .map(|flag| {
                let Some(rule) = &flag.targeting else {
                    return evaluation(flag, &flag.default_variant, "STATIC");
                };
                context["$flagd"] = serde_json::json!({"flagKey": flag.key, "timestamp": ctx.now_ms / 1000});
                match self.engine.evaluate(rule, &context, &arena) {
                    Ok(DataValue::String(variant)) if flag.variants.iter().any(|v| v == variant) => {
                        evaluation(flag, variant, "TARGETING_MATCH")
                    }
                    Ok(DataValue::Bool(b)) if flag.variants.iter().any(|v| *v == b.to_string()) => {
                        evaluation(flag, &b.to_string(), "TARGETING_MATCH")
                    }
                    Ok(DataValue::Null) => evaluation(flag, &flag.default_variant, "DEFAULT"),
                    Ok(other) => {
                        modelyard_sdk::log(modelyard_sdk::Level::Warn, &format!("flag '{}': targeting gave {other:?}, which is not a variant; using the default", flag.key));
                        evaluation(flag, &flag.default_variant, "ERROR")
                    }
                    Err(error) => {
                        modelyard_sdk::log(modelyard_sdk::Level::Warn, &format!("flag '{}': targeting failed ({error}); using the default", flag.key));
                        evaluation(flag, &flag.default_variant, "ERROR")
                    }
                }
            })
            .collect()
    }

    fn describe(&self, now_ms: u64) -> Vec<FlagInfo> {
        self.flags
            .iter()
            .map(|f| FlagInfo {
                key: f.key.clone(),
                state: match f.state {
                    State::Enabled => "ENABLED",
                    State::Disabled => "DISABLED",
                }
                .to_string(),
                default_variant: f.default_variant.clone(),
                variants: f.variants.clone(),
                metadata: f.metadata.clone(),
                expired: f.expires_ms.is_some_and(|at| now_ms >= at),
            })
            .collect()
    }
}

fn evaluation(flag: &Flag, variant: &str, reason: &str) -> Evaluation {
    Evaluation {
        flag: flag.key.clone(),
        variant: variant.to_string(),
        reason: reason.to_string(),
    }
}

modelyard_sdk::register!(flags: FlagdFlags);

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: &str = r#"{
      "$schema": "https://flagd.dev/schema/v0/flags.json",
      "flags": {
        "new-model": {
          "state": "ENABLED",
          "variants": {"on": true, "off": false},
          "defaultVariant": "off",
          "targeting": {"if": [{"in": [{"var": "country"}, ["NL", "DE"]]}, "on", null]},
          "metadata": {"owner": "ml-platform", "purpose": "try iris v1", "expiry": "2026-01-31"}
        },
        "rollout": {
          "state": "ENABLED",
          "variants": {"a": 1, "b": 2},
          "defaultVariant": "a",
          "targeting": {"fractional": [["a", 50], ["b", 50]]}
        },
        "staff": {
          "state": "ENABLED",
          "variants": {"yes": true, "no": false},
          "defaultVariant": "no",
          "targeting": {"if": [{"$ref": "is-staff"}, "yes", "no"]}
        },
        "app": {
          "state": "ENABLED",
          "variants": {"new": 1, "old": 0},
          "defaultVariant": "old",
          "targeting": {"if": [{"sem_ver": [{"var": "app_version"}, ">=", "2.1.0"]}, "new", "old"]}
        },
        "beta": {
          "state": "ENABLED",
          "variants": {"in": true, "out": false},
          "defaultVariant": "out",
          "targeting": {"if": [{"and": [
            {"==": [{"var": "plan"}, "pro"]},
            {">=": [{"var": "age"}, 18]},
            {"starts_with": [{"var": "device"}, "ios-"]}
          ]}, "in", "out"]}
        },
        "killed": {
          "state": "DISABLED",
          "variants": {"on": true, "off": false},
          "defaultVariant": "on"
        }
      },
      "$evaluators": {
        "is-staff": {"ends_with": [{"var": "email"}, "@example.com"]}
      }
    }"#;

    fn flags() -> FlagdFlags {
        FlagdFlags::new(serde_json::from_str(FLAGS).unwrap()).unwrap()
    }

    fn evaluate(
        flags: &FlagdFlags,
        key: Option<&str>,
        attributes: &[(&str, &str)],
    ) -> BTreeMap<String, (String, String)> {
        let ctx = RequestContext {
            targeting_key: key.map(str::to_string),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            now_ms: 1_780_000_000_000,
            ..Default::default()
        };
        flags
            .evaluate(&ctx)
            .into_iter()
            .map(|e| (e.flag, (e.variant, e.reason)))
            .collect()
    }

    #[test]
    fn targeting_rules_pick_variants() {
        let flags = flags();
        let nl = evaluate(
            &flags,
            Some("u1"),
            &[
                ("country", "NL"),
                ("email", "ann@example.com"),
                ("app_version", "v2.3"),
            ],
        );
        assert_eq!(
            nl["new-model"],
            ("on".to_string(), "TARGETING_MATCH".to_string())
        );
        assert_eq!(nl["staff"].0, "yes");
        assert_eq!(nl["app"].0, "new");
        let us = evaluate(
            &flags,
            Some("u1"),
            &[
                ("country", "US"),
                ("email", "bob@elsewhere.org"),
                ("app_version", "2.0.9"),
            ],
        );
        assert_eq!(us["new-model"], ("off".to_string(), "DEFAULT".to_string()));
        assert_eq!(us["staff"].0, "no");
        assert_eq!(us["app"].0, "old");
        assert!(!us.contains_key("killed"), "a disabled flag is not set");
        let beta = |plan: &str, age: &str, device: &str| {
            evaluate(
                &flags,
                None,
                &[("plan", plan), ("age", age), ("device", device)],
            )["beta"]
                .0
                .clone()
        };
        assert_eq!(beta("pro", "30", "ios-17"), "in");
        assert_eq!(beta("free", "30", "ios-17"), "out");
        assert_eq!(beta("pro", "17", "ios-17"), "out");
        assert_eq!(beta("pro", "30", "android-14"), "out");
    }

    #[test]
    fn fractional_buckets_are_sticky_and_even() {
        let flags = flags();
        let mut b = 0;
        for user in 0..1000 {
            let key = format!("user-{user}");
            let first = evaluate(&flags, Some(&key), &[])["rollout"].0.clone();
            assert_eq!(evaluate(&flags, Some(&key), &[])["rollout"].0, first);
            b += usize::from(first == "b");
        }
        assert!((430..=570).contains(&b), "{b} of 1000 in b");
        // Without a targeting key flagd cannot bucket: the default variant.
        assert_eq!(evaluate(&flags, None, &[])["rollout"].0, "a");
    }

    #[test]
    fn fractional_matches_flagd_reference_buckets() {
        // flagd hashes flagKey + targetingKey with MurmurHash3 (x86, 32 bit, seed 0) and
        // maps the hash onto the total weight as (hash × total) >> 32; recompute that here
        // and check the plugin puts each user in the same bucket.
        let flags = flags();
        let of = |key: &str| evaluate(&flags, Some(key), &[])["rollout"].0.clone();
        let hash = |s: &str| murmur3(s.as_bytes());
        for key in ["user-1", "user-2", "alice", "bob"] {
            let bucket = (u64::from(hash(&format!("rollout{key}"))) * 100) >> 32;
            let expected = if bucket < 50 { "a" } else { "b" };
            assert_eq!(of(key), expected, "{key}");
        }
    }

    /// MurmurHash3 x86_32, seed 0, as in the reference, to check bucketing independently.
    fn murmur3(data: &[u8]) -> u32 {
        let (c1, c2) = (0xcc9e_2d51u32, 0x1b87_3593u32);
        let mut h = 0u32;
        let chunks = data.chunks_exact(4);
        let tail = chunks.remainder();
        for chunk in chunks {
            let k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            h ^= k.wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
            h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        }
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k ^= u32::from(*b) << (8 * i);
        }
        if !tail.is_empty() {
            h ^= k.wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
        }
        h ^= data.len() as u32;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    #[test]
    fn metadata_and_expiry_are_reported() {
        let flags = flags();
        let infos = flags.describe(1_780_000_000_000);
        let new_model = infos.iter().find(|f| f.key == "new-model").unwrap();
        assert!(new_model.expired);
        assert!(
            new_model
                .metadata
                .contains(&("owner".to_string(), "ml-platform".to_string()))
        );
        assert!(
            !flags.describe(1_769_000_000_000).iter().any(|f| f.expired),
            "before 2026-01-31 ends"
        );
        let killed = infos.iter().find(|f| f.key == "killed").unwrap();
        assert_eq!(killed.state, "DISABLED");
    }

    /// Why a flag whose targeting is `{"$ref": "e0"}` over `evaluators` is refused.
    fn refusal_of_chain(evaluators: Map<String, serde_json::Value>) -> String {
        let doc = serde_json::json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1},
            "defaultVariant": "a", "targeting": {"$ref": "e0"}}}, "$evaluators": evaluators});
        FlagdFlags::new(serde_json::from_value(doc).unwrap())
            .err()
            .unwrap()
            .0
    }

    #[test]
    fn references_that_multiply_are_refused_not_expanded() {
        // 40 evaluators, each referring to the next twice: 2^40 values once replaced.
        let mut evaluators = Map::new();
        for i in 0..40 {
            let next = serde_json::json!({"$ref": format!("e{}", i + 1)});
            evaluators.insert(format!("e{i}"), serde_json::json!({"or": [next, next]}));
        }
        evaluators.insert("e40".into(), serde_json::json!(true));
        let err = refusal_of_chain(evaluators);
        assert!(
            err.contains("flag 'f'") && err.contains("over 100000 values"),
            "{err}"
        );
    }

    #[test]
    fn references_that_nest_too_deep_are_refused() {
        // Each evaluator is shallow; chained, they would nest 50 × 4 deep.
        let mut evaluators = Map::new();
        for i in 0..50 {
            let next = serde_json::json!({"!": [{"!": [{"$ref": format!("e{}", i + 1)}]}]});
            evaluators.insert(format!("e{i}"), next);
        }
        evaluators.insert("e50".into(), serde_json::json!(true));
        let err = refusal_of_chain(evaluators);
        assert!(
            err.contains("flag 'f'") && err.contains("deeper than 128"),
            "{err}"
        );
    }

    #[test]
    fn broken_definitions_are_refused() {
        for bad in [
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "zz"}}}"#,
            r#"{"flags": {"f": {"state": "ON", "variants": {"a": 1}, "defaultVariant": "a"}}}"#,
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"$ref": "nope"}}}}"#,
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "metadata": {"expiry": "soon"}}}}"#,
        ] {
            assert!(
                FlagdFlags::new(serde_json::from_str(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }
}

/// The plugin under fuzzing: arbitrary flag documents (JsonLogic rules of flagd's and
/// JsonLogic's operators over hostile arguments, `$ref`s among evaluators, cycles
/// included) and evaluation contexts. A panic here is a trap in the server: the plugin's
/// call fails. So configuring never panics (a refusal is an `Error` that names the flag),
/// and neither do evaluating and describing, which answer one of each flag's variants.
///
/// `PROPTEST_CASES=100000 cargo test --release -p flagd fuzz_` is the long run.
#[cfg(test)]
mod fuzz {
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use proptest::sample::select;
    use proptest::test_runner::Config as Cases;
    use serde_json::json;

    use super::*;

    /// The suite's cases unless `PROPTEST_CASES` says otherwise; no failure files (each
    /// finding is kept as a named regression test).
    fn cases(n: u32) -> Cases {
        let mut config = Cases {
            failure_persistence: None,
            ..Cases::default()
        };
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = n;
        }
        config
    }

    const OPERATORS: &[&str] = &[
        "var",
        "if",
        "?:",
        "==",
        "===",
        "!=",
        "!==",
        "<",
        "<=",
        ">",
        ">=",
        "!",
        "!!",
        "and",
        "or",
        "in",
        "cat",
        "substr",
        "+",
        "-",
        "*",
        "/",
        "%",
        "min",
        "max",
        "merge",
        "map",
        "filter",
        "reduce",
        "all",
        "some",
        "none",
        "missing",
        "missing_some",
        "fractional",
        "sem_ver",
        "starts_with",
        "ends_with",
        "$ref",
        "unknown_op",
    ];

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-5i64..5).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            any::<bool>().prop_map(Value::from),
            select(vec![
                "a",
                "b",
                "on",
                "off",
                "",
                "1.2.3",
                "v2.0.0-rc.1",
                ">=",
                "^",
                "~",
                "NL",
                "e0",
                "e1"
            ])
            .prop_map(Value::from),
            "\\PC{0,6}".prop_map(Value::from),
            Just(Value::Null),
            select(vec![
                "country",
                "targetingKey",
                "$flagd.flagKey",
                "$flagd.timestamp",
                "a.b",
                "",
                "0"
            ])
            .prop_map(|name| json!({"var": name})),
        ]
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-3i64..100).prop_map(Value::from),
            select(vec![
                json!(0),
                json!(-1),
                json!(i64::MAX),
                json!(i64::MIN),
                json!(u64::MAX),
                json!(1e308),
                json!(-0.5),
            ]),
        ]
    }

    fn variant() -> impl Strategy<Value = Value> {
        select(vec!["a", "b", "on", "off"]).prop_map(Value::from)
    }

    /// JsonLogic as flagd files write it (conditions choosing variants, `fractional`
    /// splits, `sem_ver` comparisons, `substr`) and any operator over anything, nested.
    fn rule() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 64, 5, |inner| {
            prop_oneof![
                (inner.clone(), variant(), variant())
                    .prop_map(|(c, a, b)| json!({"if": [c, a, b]})),
                (
                    prop::option::of(inner.clone()),
                    vec((variant(), number()).prop_map(|(v, w)| json!([v, w])), 0..4),
                )
                    .prop_map(|(by, mut buckets)| {
                        if let Some(by) = by {
                            buckets.insert(0, by);
                        }
                        json!({ "fractional": buckets })
                    }),
                (
                    inner.clone(),
                    select(vec!["=", "!=", "<", "<=", ">", ">=", "^", "~", "??"]),
                    inner.clone()
                )
                    .prop_map(|(a, op, b)| json!({"sem_ver": [a, op, b]})),
                (inner.clone(), number(), prop::option::of(number()))
                    .prop_map(|(s, from, len)| json!({"substr": [s, from, len]})),
                (select(OPERATORS), vec(inner.clone(), 0..5))
                    .prop_map(|(op, args)| json!({ op: args })),
                (select(OPERATORS), inner.clone()).prop_map(|(op, arg)| json!({ op: arg })),
                vec(inner, 0..4).prop_map(Value::from),
            ]
        })
    }

    fn definition() -> impl Strategy<Value = Value> {
        (
            prop_oneof![18 => Just(json!("ENABLED")), 1 => Just(json!("DISABLED")), 1 => leaf()],
            btree_map(
                select(vec!["a", "b", "on", "off", "true", "false"]),
                leaf(),
                1..4,
            ),
            any::<prop::sample::Index>(),
            prop_oneof![30 => Just(None), 1 => Just(Some("nope"))],
            prop::option::of(prop_oneof![9 => rule(), 1 => Just(json!({"$ref": "e0"}))]),
            prop::option::of(prop_oneof![
                16 => select(vec!["2026-01-31", "2026-01-31T12:00:00Z", "9999-12-31", "0000-01-01"])
                    .prop_map(Value::from),
                1 => select(vec!["-9999-01-01", "soon", "2026-02-30"]).prop_map(Value::from),
                1 => leaf(),
            ]),
        )
            .prop_map(|(state, variants, pick, other, targeting, expiry)| {
                let keys: Vec<&str> = variants.keys().copied().collect();
                let default = other.unwrap_or(*pick.get(&keys));
                let mut d =
                    json!({"state": state, "variants": variants, "defaultVariant": default});
                if let Some(targeting) = targeting {
                    d["targeting"] = targeting;
                }
                if let Some(expiry) = expiry {
                    d["metadata"] = json!({"expiry": expiry, "owner": "o"});
                }
                d
            })
    }

    fn document() -> impl Strategy<Value = Value> {
        (
            btree_map("[a-z]{1,3}", definition(), 1..4),
            btree_map(
                select(vec!["e0", "e1", "e2"]),
                prop_oneof![
                    rule(),
                    select(vec!["e0", "e1", "e2"]).prop_map(|name| json!({"$ref": name})),
                    vec(
                        select(vec!["e0", "e1", "e2"]).prop_map(|name| json!({"$ref": name})),
                        0..3
                    )
                    .prop_map(|refs| json!({"or": refs})),
                ],
                0..3,
            ),
        )
            .prop_map(|(flags, evaluators)| json!({"flags": flags, "$evaluators": evaluators}))
    }

    fn context() -> impl Strategy<Value = RequestContext> {
        (
            prop_oneof![
                Just(None),
                "[a-z0-9]{1,8}".prop_map(Some),
                "\\PC{0,8}".prop_map(Some)
            ],
            vec(
                (
                    select(vec![
                        "country",
                        "a",
                        "app_version",
                        "$flagd",
                        "targetingKey",
                    ]),
                    "\\PC{0,8}|1\\.2\\.3|NL|-?[0-9]{1,20}",
                ),
                0..4,
            ),
            any::<u64>(),
        )
            .prop_map(|(targeting_key, attributes, now_ms)| RequestContext {
                targeting_key,
                attributes: attributes
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                now_ms,
                ..Default::default()
            })
    }

    /// Configures from `doc`; when the plugin takes it, evaluates and describes, checking
    /// that every answer is one of its flag's variants for a reason flagd gives.
    fn exercise(doc: Value, contexts: &[RequestContext]) -> Result<(), TestCaseError> {
        let Ok(config) = serde_json::from_value::<Config>(doc.clone()) else {
            return Ok(());
        };
        let flags = match FlagdFlags::new(config) {
            Ok(flags) => flags,
            Err(error) => {
                let per_flag = error.0.starts_with("flag '");
                prop_assert!(per_flag, "a refusal that names no flag: {}", error.0);
                return Ok(());
            }
        };
        for ctx in contexts {
            for e in flags.evaluate(ctx) {
                let variants = &doc["flags"][&e.flag]["variants"];
                prop_assert!(
                    variants.get(&e.variant).is_some(),
                    "{e:?} not in {variants}"
                );
                prop_assert!(
                    ["STATIC", "TARGETING_MATCH", "DEFAULT", "ERROR"].contains(&e.reason.as_str())
                );
            }
            flags.describe(ctx.now_ms);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(5_000))]

        #[test]
        fn fuzz_flagd_documents_and_contexts(doc in document(), contexts in vec(context(), 1..4)) {
            exercise(doc, &contexts)?;
        }

        #[test]
        fn fuzz_flagd_arbitrary_json(text in "\\PC{0,64}|[\\[\\]{}\":,0-9a-z$]{0,64}") {
            if let Ok(doc) = serde_json::from_str::<Value>(&text) {
                exercise(doc, &[RequestContext::default()])?;
            }
        }
    }
}
