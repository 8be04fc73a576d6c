//! What the SDK adds to the contract's types (the request context and variant statistics
//! are the WIT's records, generated), and the types of its own: a router's `Decision`
//! without the state the SDK keeps for it, and an operator's `Action`, parsed.

use crate::{RequestContext, VariantStats};

impl RequestContext {
    /// The value of attribute `name`, if the request has it.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A point in [0, 1) for splitting traffic, and how it was drawn: from the endpoint
    /// and the targeting key when the request has one, so the same user always lands on
    /// the same side of a split (across requests, restarts and plugin swaps) while
    /// different endpoints split users independently; otherwise from the seed.
    pub fn draw(&self) -> (f64, &'static str) {
        let (bits, how) = match &self.targeting_key {
            Some(key) => {
                let endpoint = fnv1a_from(fnv1a(self.endpoint.as_bytes()), &[0]);
                let salted = fnv1a_from(endpoint, key.as_bytes());
                (mix(salted), "sticky by targeting key")
            }
            None => (mix(self.seed), "by request seed"),
        };
        // The top 53 bits give a uniform double.
        ((bits >> 11) as f64 / (1u64 << 53) as f64, how)
    }
}

/// FNV-1a: stable across builds and platforms, which a sticky assignment needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(0xcbf2_9ce4_8422_2325, bytes)
}

/// FNV-1a continued from `hash`, to hash several parts as one.
fn fnv1a_from(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: spreads nearby inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How many of a variant's latest successful latencies the host hands routers.
pub const RECENT_LATENCIES: usize = 256;

impl VariantStats {
    /// The variant named `name` among `variants`, or the error that says it is not one.
    pub fn find<'a>(
        variants: &'a [VariantStats],
        name: &str,
    ) -> Result<&'a VariantStats, crate::Error> {
        variants
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| crate::Error::new(format!("'{name}' is not a variant of this endpoint")))
    }

    /// A variant with no traffic yet: handy in tests.
    pub fn named(name: &str) -> VariantStats {
        VariantStats {
            name: name.to_string(),
            ..VariantStats::default()
        }
    }
}

/// A router's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub primary: String,
    pub shadows: Vec<String>,
    pub reason: String,
}

impl Decision {
    /// Route to `primary` alone, saying why.
    pub fn to(primary: impl Into<String>, reason: impl Into<String>) -> Decision {
        Decision {
            primary: primary.into(),
            shadows: Vec::new(),
            reason: reason.into(),
        }
    }
}

/// An operator's request to a router, from the admin API.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// `POST /admin/endpoints/{e}/weights {"weights": {"a": 90, "b": 10}}`.
    Weights {
        weights: std::collections::BTreeMap<String, f64>,
    },
    /// `POST /admin/endpoints/{e}/promote`, optionally `{"to": "<variant>"}`.
    Promote {
        #[serde(default)]
        to: Option<String>,
    },
    /// `POST /admin/endpoints/{e}/rollback`.
    Rollback {},
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Weights { .. } => "weights",
            Action::Promote { .. } => "promote",
            Action::Rollback {} => "rollback",
        }
    }
}
