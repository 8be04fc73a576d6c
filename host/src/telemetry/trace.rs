//! W3C Trace Context: the `traceparent` header a request came with, or a fresh trace, so
//! that a request's log lines and its answer can be matched with the caller's traces.

/// `traceparent: 00-<trace-id>-<parent-id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// 32 lowercase hex digits, never all zero.
    pub trace_id: String,
    flags: String,
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A trace or parent id: lowercase hex, and not all zeros.
fn is_id(text: &str, len: usize) -> bool {
    is_hex(text, len) && text.bytes().any(|b| b != b'0')
}

impl Trace {
    /// The caller's trace when `header` is a valid `traceparent`, else a new one: an
    /// invalid header is ignored, as the specification asks.
    pub fn from_header(header: Option<&str>) -> Trace {
        let parsed = header.and_then(|h| {
            let mut parts = h.trim().split('-');
            let (version, trace, parent, flags) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let valid = is_hex(version, 2)
                && version != "ff"
                && is_id(trace, 32)
                && is_id(parent, 16)
                && flags.len() == 2
                && flags.bytes().all(|b| b.is_ascii_hexdigit())
                // Version 00 has exactly four fields; later versions may add more.
                && (version != "00" || parts.next().is_none());
            valid.then(|| Trace {
                trace_id: trace.to_string(),
                flags: flags.to_ascii_lowercase(),
            })
        });
        parsed.unwrap_or_else(|| Trace {
            trace_id: format!("{:032x}", fastrand::u128(1..)),
            flags: "01".to_string(),
        })
    }

    /// The `traceparent` of the server's own part of the trace, for the response.
    pub fn child(&self) -> String {
        format!(
            "00-{}-{:016x}-{}",
            self.trace_id,
            fastrand::u64(1..),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_header_is_followed_and_an_invalid_one_replaced() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = Trace::from_header(Some(header));
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = trace.child();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(&child[36..52], "00f067aa0ba902b7");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let trace = Trace::from_header(Some(bad));
            assert!(!bad.contains(&trace.trace_id), "{bad}");
            assert_eq!(trace.trace_id.len(), 32);
        }
    }
}
