//! What the `fuzz_` property tests share: their bounded case count and an allocation
//! meter, so that "no allocation proportional to a claimed shape" is a checked property
//! rather than a hope that the machine runs out of memory visibly.
//!
//! `PROPTEST_CASES=200000 cargo test --release -p modelyard --lib fuzz_` is the long run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::Config;
use serde_json::{Value, json};

use crate::tensor::{DataType, Tensor};

/// The suite's cases per target, unless `PROPTEST_CASES` says otherwise. No failure files:
/// each finding is kept as a named regression test beside the code it fixed, which still
/// reads right when a strategy changes (a persisted seed then replays another input).
pub fn config(cases: u32) -> Config {
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// The system allocator, noting the largest single request each thread makes.
struct Metered;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations while the thread's locals are torn down go unnoted.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is passed to `System` unchanged; the meter only reads sizes.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METERED: Metered = Metered;

/// Runs `f` and returns its result with the largest single allocation it made (on this
/// thread): a decoder that trusts a claimed shape shows up here long before it would
/// exhaust the machine.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// The most a decoder may allocate at once for an input of `len` bytes: a small multiple
/// (JSON `1,` becomes 8 bytes of FP64, and vectors double as they grow) plus a constant.
pub fn allocation_bound(len: usize) -> usize {
    64 * 1024 + 32 * len
}

/// Whether a tensor is what it says: dimensions the protocol can carry (int64), as many
/// elements as its shape, each a valid value of its datatype. What every accepted tensor
/// from outside must be; worked out here afresh rather than by the checks under test.
pub fn well_formed(t: &Tensor) -> bool {
    let count = t.shape.iter().try_fold(1usize, |n, &d| {
        i64::try_from(d).ok().and_then(|_| n.checked_mul(d))
    });
    let Some(count) = count else {
        return false;
    };
    match t.datatype {
        DataType::Bool => t.data.len() == count && t.data.iter().all(|&b| b <= 1),
        DataType::Bytes => {
            let (mut rest, mut elements) = (&t.data[..], 0);
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() - 4 < len {
                    return false;
                }
                rest = &rest[4 + len..];
                elements += 1;
            }
            rest.is_empty() && elements == count
        }
        dt => dt.element_size().and_then(|size| count.checked_mul(size)) == Some(t.data.len()),
    }
}

/// A well-formed tensor of any datatype and a small shape, with its data as the
/// protocol's JSON would carry it.
pub fn valid_tensor() -> impl Strategy<Value = (Tensor, Value)> {
    (
        "[a-z]{1,4}",
        select(DataType::ALL.to_vec()),
        vec(0usize..4, 0..3),
    )
        .prop_flat_map(|(name, datatype, shape)| {
            let count = Tensor::element_count(&shape).unwrap_or(0);
            vec(any::<u64>(), count).prop_map(move |seeds| {
                let (values, bytes): (Vec<Value>, Vec<Vec<u8>>) =
                    seeds.iter().map(|&seed| element(datatype, seed)).unzip();
                let tensor = Tensor {
                    name: name.clone(),
                    datatype,
                    shape: shape.clone(),
                    data: bytes.concat(),
                };
                (tensor, Value::from(values))
            })
        })
}

/// One element of `datatype` drawn from `seed`: its JSON value and its bytes.
fn element(datatype: DataType, seed: u64) -> (Value, Vec<u8>) {
    macro_rules! int {
        ($t:ty) => {{
            let v = seed as $t;
            (json!(v), v.to_le_bytes().to_vec())
        }};
    }
    // Eighths from -125 to 125: exact in JSON text and in every float width.
    let float = (seed % 2001) as f64 / 8.0 - 125.0;
    match datatype {
        DataType::Bool => (json!(seed % 2 == 1), vec![(seed % 2) as u8]),
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Fp16 => (
            json!(float),
            half::f16::from_f64(float).to_le_bytes().to_vec(),
        ),
        DataType::Bf16 => (
            json!(float),
            half::bf16::from_f64(float).to_le_bytes().to_vec(),
        ),
        DataType::Fp32 => (json!(float), (float as f32).to_le_bytes().to_vec()),
        DataType::Fp64 => (json!(float), float.to_le_bytes().to_vec()),
        DataType::Bytes => {
            let text = "ab\u{e9}".repeat((seed % 3) as usize);
            let mut bytes = (text.len() as u32).to_le_bytes().to_vec();
            bytes.extend(text.as_bytes());
            (json!(text), bytes)
        }
    }
}

/// One change to a valid TOML document, and the key a refusal must then name, if any.
#[derive(Clone, Debug)]
pub struct Mutated {
    pub text: String,
    pub key: Option<String>,
}

/// Values of every TOML type, and numbers no field can hold.
const HOSTILE_VALUES: &[&str] = &[
    "\"text\"",
    "\"\"",
    "-1",
    "0",
    "18446744073709551615",
    "99999999999999999999",
    "1.5e308",
    "nan",
    "-inf",
    "true",
    "[]",
    "[1, \"a\"]",
    "{}",
    "{ x = 1 }",
    "1979-05-27T07:32:00Z",
    "\"\\u0000\"",
];

/// `document` with one of: a value replaced by one of another type or range, a key
/// misspelt, a line dropped or repeated, text cut short, or arbitrary characters spliced
/// in. Every line of `document` that holds a value is `key = value` on one line.
pub fn mutated(document: &'static str) -> impl Strategy<Value = Mutated> {
    prop_oneof![
        (any::<usize>(), select(HOSTILE_VALUES)).prop_filter_map(
            "a key = value line",
            move |(i, value)| {
                let (mut lines, at, key, _) = assignment(document, i)?;
                lines[at] = format!("{key} = {value}");
                Some(Mutated {
                    text: lines.join("\n"),
                    key: Some(key),
                })
            }
        ),
        any::<usize>().prop_filter_map("a key = value line", move |i| {
            let (mut lines, at, key, value) = assignment(document, i)?;
            let typo = format!("{key}s");
            lines[at] = format!("{typo} = {value}");
            Some(Mutated {
                text: lines.join("\n"),
                key: Some(typo),
            })
        }),
        (any::<usize>(), any::<bool>()).prop_map(move |(i, repeat)| {
            let mut lines: Vec<&str> = document.lines().collect();
            let at = i % lines.len();
            if repeat {
                lines.insert(at, lines[at]);
            } else {
                lines.remove(at);
            }
            Mutated {
                text: lines.join("\n"),
                key: None,
            }
        }),
        (any::<usize>(), "\\PC{0,12}|[\\[\\]{}=\"'.,#\\n]{1,8}").prop_map(move |(i, splice)| {
            let mut text = document.to_string();
            text.insert_str(char_boundary(document, i), &splice);
            Mutated { text, key: None }
        }),
        any::<usize>().prop_map(move |i| Mutated {
            text: document[..char_boundary(document, i)].to_string(),
            key: None,
        }),
    ]
}

/// The lines of `document`, and the `i`-th (modulo their number) split into key and value
/// if it is a `key = value` line.
fn assignment(document: &str, i: usize) -> Option<(Vec<String>, usize, String, String)> {
    let lines: Vec<String> = document.lines().map(str::to_string).collect();
    let at = i % lines.len();
    let (key, value) = lines[at].split_once(" = ")?;
    let (key, value) = (key.trim().to_string(), value.to_string());
    (!key.starts_with('[')).then_some((lines, at, key, value))
}

/// A char boundary of `text` at or before `i` modulo its length.
fn char_boundary(text: &str, i: usize) -> usize {
    (0..=i % (text.len() + 1))
        .rev()
        .find(|&at| text.is_char_boundary(at))
        .unwrap_or(0)
}

/// Arbitrary text with a lean towards TOML's punctuation, so that the parser gets past
/// its first character now and then.
pub fn toml_like_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,64}",
        "([a-z_]{1,6}|[\\[\\]{}=\"'.,#\\n ]|[0-9]{1,3}|true|nan|inf){0,40}",
    ]
}
