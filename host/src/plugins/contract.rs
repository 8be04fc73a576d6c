//! The plugin contract as the host reads it: the version of `modelyard:plugin` it speaks
//! (the `package` line of the WIT its bindings are generated from), the version a component
//! was built for (the names of its imports carry it), and whether the host loads that
//! version: its own semver line, and the line before.
//!
//! Owns: the package's name and version, `WorldKind`, the compatibility rule. Must not
//! touch: wasmtime or files. It reads names only, so its rule is tested without building a
//! component.

use semver::Version;

use super::bindings::WIT;

/// The WIT package whose worlds plugins implement (its version is [`HOST_VERSION`]).
pub const PACKAGE: &str = "modelyard:plugin";

const PARSED: Option<(u64, u64, u64)> = package_version(WIT.as_bytes());
const _: () = assert!(
    PARSED.is_some(),
    "the WIT's package line must read `package modelyard:plugin@<major>.<minor>.<patch>;`"
);

/// The version of [`PACKAGE`] this host speaks, read from the WIT when the host is built
/// (the assertion above fails the build if it cannot be): the one place it is written.
pub const HOST_VERSION: Version = match PARSED {
    Some((major, minor, patch)) => Version::new(major, minor, patch),
    None => Version::new(0, 0, 0),
};

/// Which world a component implements: the one its exports type-check against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorldKind {
    Router,
    Processor,
    Flags,
}

impl WorldKind {
    pub const ALL: [WorldKind; 3] = [WorldKind::Router, WorldKind::Processor, WorldKind::Flags];

    pub const fn as_str(self) -> &'static str {
        match self {
            WorldKind::Router => "router",
            WorldKind::Processor => "processor",
            WorldKind::Flags => "flags",
        }
    }
}

/// Why a component is not a plugin this host loads.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "it was built for {PACKAGE}@{built_for}, but this host speaks {PACKAGE}@{host} and loads plugins built for {}; rebuild it with a modelyard-sdk that speaks {host}",
        lines(host)
    )]
    Version { built_for: Version, host: Version },
    #[error("it imports {PACKAGE} at several versions ({}); a plugin is built against one", .0.join(", "))]
    Mixed(Vec<String>),
    #[error(
        "it imports nothing of {PACKAGE} (every world's functions take its `types`), so it is no plugin (it imports: {})",
        .0.join(", ")
    )]
    NoPlugin(Vec<String>),
}

/// The version of the contract a component was built against, read from the names of its
/// imports (every world's functions take the package's `types`), if this host loads it.
pub fn built_for(imports: &[String], host: &Version) -> Result<Version, Mismatch> {
    let mut versions: Vec<Version> = imports
        .iter()
        .filter_map(|n| named(n))
        .map(|(_, v)| v)
        .collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [] => Err(Mismatch::NoPlugin(imports.to_vec())),
        [built] if loads(built, host) => Ok(built.clone()),
        [built] => Err(Mismatch::Version {
            built_for: built.clone(),
            host: host.clone(),
        }),
        several => Err(Mismatch::Mixed(
            several.iter().map(ToString::to_string).collect(),
        )),
    }
}

/// Whether a plugin built for `built` loads on a host speaking `host`: the host's own line,
/// and the line before it, whose worlds a new line keeps (it only adds what the host
/// offers), so plugins built before an upgrade keep serving after it.
pub fn loads(built: &Version, host: &Version) -> bool {
    same_line(built, host) || previous_line(host).is_some_and(|p| same_line(built, &p))
}

/// The first version of the line before `host`'s: `0.(y-1).0`, or `(x-1).0.0` from 2.0 on;
/// none for 0.0.z, 0.1, 1.x (their predecessors were experiments) and pre-releases.
pub fn previous_line(host: &Version) -> Option<Version> {
    if !host.pre.is_empty() {
        return None;
    }
    match (host.major, host.minor) {
        (0, 0 | 1) | (1, _) => None,
        (0, minor) => Some(Version::new(0, minor - 1, 0)),
        (major, _) => Some(Version::new(major - 1, 0, 0)),
    }
}

/// Whether `built` is on `host`'s semver line, the way wasmtime matches names (an export
/// or import of another version is found on the same line): from 1.0 the major is the
/// line, before it `0.minor`; a 0.0.z or pre-release version matches itself alone.
pub fn same_line(built: &Version, host: &Version) -> bool {
    if !built.pre.is_empty() || !host.pre.is_empty() {
        return built == host;
    }
    match (host.major, host.minor) {
        (0, 0) => built == host,
        (0, minor) => built.major == 0 && built.minor == minor,
        (major, _) => built.major == major,
    }
}

/// The versions [`loads`] accepts for `host`, as operators read them.
fn lines(host: &Version) -> String {
    match previous_line(host) {
        Some(previous) => format!("{} and {}", line(host), line(&previous)),
        None => line(host),
    }
}

/// The versions of `host`'s own line.
fn line(host: &Version) -> String {
    match (host.major, host.minor) {
        _ if !host.pre.is_empty() => host.to_string(),
        (0, 0) => host.to_string(),
        (0, minor) => format!("0.{minor}.*"),
        (major, _) => format!("{major}.*"),
    }
}

/// `modelyard:plugin/<interface>@<version>` as its interface and version.
fn named(name: &str) -> Option<(&str, Version)> {
    let (interface, version) = name
        .strip_prefix(PACKAGE)?
        .strip_prefix('/')?
        .split_once('@')?;
    Some((interface, Version::parse(version).ok()?))
}

/// The `x.y.z` of a line `package <PACKAGE>@x.y.z;` in `wit`; `const` so that the host's
/// version is known, and checked, when the host is compiled.
const fn package_version(wit: &[u8]) -> Option<(u64, u64, u64)> {
    let mut at = 0;
    while at < wit.len() {
        let line_start = at == 0 || wit[at - 1] == b'\n';
        if line_start
            && starts_with(wit, at, b"package ")
            && starts_with(wit, at + 8, PACKAGE.as_bytes())
            && starts_with(wit, at + 8 + PACKAGE.len(), b"@")
        {
            return numbers(wit, at + 9 + PACKAGE.len());
        }
        at += 1;
    }
    None
}

const fn starts_with(text: &[u8], at: usize, prefix: &[u8]) -> bool {
    if at + prefix.len() > text.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if text[at + i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `major.minor.patch;` from `at`, nothing else.
const fn numbers(text: &[u8], mut at: usize) -> Option<(u64, u64, u64)> {
    let mut parts = [0u64; 3];
    let (mut part, mut digits) = (0, 0);
    while at < text.len() {
        let c = text[at];
        if c.is_ascii_digit() {
            let Some(shifted) = parts[part].checked_mul(10) else {
                return None;
            };
            let Some(sum) = shifted.checked_add((c - b'0') as u64) else {
                return None;
            };
            parts[part] = sum;
            digits += 1;
        } else if c == b'.' && digits > 0 && part < 2 {
            part += 1;
            digits = 0;
        } else if c == b';' && digits > 0 && part == 2 {
            return Some((parts[0], parts[1], parts[2]));
        } else {
            return None;
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_host_version_is_the_package_line_of_the_wit() {
        assert!(WIT.contains(&format!("\npackage {PACKAGE}@{HOST_VERSION};\n")));
        assert_eq!(
            package_version(b"// x\npackage modelyard:plugin@12.0.3;\n"),
            Some((12, 0, 3))
        );
        for bad in [
            "package modelyard:plugin@1.2;",
            "package modelyard:plugin@1.2.3-rc.1;",
            "package other:plugin@1.2.3;",
            "  package modelyard:plugin@1.2.3;",
            "package modelyard:plugin@99999999999999999999.0.0;",
        ] {
            assert_eq!(package_version(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn one_line_is_a_major_from_one_and_a_minor_before() {
        for (built, host) in [
            ("0.4.0", "0.4.0"),
            ("0.4.0", "0.4.3"),
            ("0.4.7", "0.4.3"),
            ("1.0.0", "1.4.2"),
            ("1.9.0", "1.4.2"),
            ("0.0.3", "0.0.3"),
            ("2.0.0-rc.1", "2.0.0-rc.1"),
        ] {
            assert!(same_line(&v(built), &v(host)), "{built} on {host}");
        }
        for (built, host) in [
            ("0.3.9", "0.4.0"),
            ("0.5.0", "0.4.0"),
            ("1.4.0", "0.4.0"),
            ("0.4.0", "1.4.0"),
            ("1.0.0", "2.0.0"),
            ("0.0.2", "0.0.3"),
            ("2.0.0-rc.1", "2.0.0"),
            ("2.0.0", "2.0.0-rc.1"),
        ] {
            assert!(!same_line(&v(built), &v(host)), "{built} on {host}");
        }
    }

    #[test]
    fn the_line_before_loads_too() {
        let host = v("0.4.1");
        for built in ["0.4.0", "0.4.9", "0.3.0", "0.3.7"] {
            assert!(loads(&v(built), &host), "{built} on {host}");
        }
        for built in ["0.2.0", "0.5.0", "1.0.0"] {
            assert!(!loads(&v(built), &host), "{built} on {host}");
        }
        assert_eq!(previous_line(&v("3.2.0")), Some(v("2.0.0")));
        assert!(loads(&v("2.7.1"), &v("3.2.0")));
        for host in ["0.1.4", "1.3.0", "0.0.3", "0.4.0-rc.1"] {
            assert_eq!(previous_line(&v(host)), None, "{host}");
        }
    }

    #[test]
    fn the_version_comes_from_the_imports() {
        let host = v("0.4.1");
        let imports = names(&[
            "wasi:io/poll@0.2.6",
            "modelyard:plugin/types@0.3.0",
            "modelyard:plugin/host@0.3.0",
        ]);
        assert_eq!(built_for(&imports, &host), Ok(v("0.3.0")));
        let newer = built_for(&names(&["modelyard:plugin/host@0.5.0"]), &host)
            .unwrap_err()
            .to_string();
        assert!(
            newer.contains("built for modelyard:plugin@0.5.0")
                && newer.contains("speaks modelyard:plugin@0.4.1")
                && newer.contains("0.4.* and 0.3.*"),
            "{newer}"
        );
        assert_eq!(
            built_for(&names(&["wasi:cli/stdin@0.2.6"]), &host),
            Err(Mismatch::NoPlugin(names(&["wasi:cli/stdin@0.2.6"])))
        );
        let mixed = names(&[
            "modelyard:plugin/types@0.3.0",
            "modelyard:plugin/host@0.4.0",
        ]);
        assert!(matches!(built_for(&mixed, &host), Err(Mismatch::Mixed(_))));
    }
}
