//! The request context, variant statistics and decisions, as plain Rust types.

/// What the host knows about the request being served.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestContext {
    pub id: String,
    pub endpoint: String,
    /// Who the request is for (user or session id), for sticky assignment.
    pub targeting_key: Option<String>,
    /// OIP `parameters` and headers the endpoint passes on, as name/value pairs.
    pub attributes: Vec<(String, String)>,
    /// Randomness drawn by the host for this request.
    pub seed: u64,
}

impl RequestContext {
    /// The value of attribute `name`, if the request has it.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Live statistics of one variant, as the host counted them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VariantStats {
    pub name: String,
    pub model: String,
    pub version: String,
    pub requests: u64,
    pub errors: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub reward_count: u64,
    pub reward_sum: f64,
}

impl VariantStats {
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

/// One flag's value for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    pub flag: String,
    pub variant: String,
    pub reason: String,
}
