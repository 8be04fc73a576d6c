//! The plugin contract as the host reads it: the version of `modelyard:plugin` it speaks
//! (the `package` line of the WIT its bindings are generated from), what a component says it
//! is (the name of the plugin interface it exports, which carries the kind and the version
//! it was built for), and whether the two versions are on one semver line.
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

/// Which world a component implements: the plugin interface it exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorldKind {
    Router,
    Processor,
    Flags,
}

impl WorldKind {
    const ALL: [WorldKind; 3] = [WorldKind::Router, WorldKind::Processor, WorldKind::Flags];

    /// The kind's name, which is also the name of the interface its plugins export.
    pub const fn as_str(self) -> &'static str {
        match self {
            WorldKind::Router => "router",
            WorldKind::Processor => "processor",
            WorldKind::Flags => "flags",
        }
    }
}

/// What a component says it is, and for which version of the contract it was built.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub world: WorldKind,
    pub built_for: Version,
}

/// Why a component is not a plugin this host loads.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "it was built for {PACKAGE}@{built_for}, but this host speaks {PACKAGE}@{host} and loads plugins built for {}; rebuild it with a modelyard-sdk that speaks {host}",
        line(host)
    )]
    Version { built_for: Version, host: Version },
    #[error("it exports {} plugin interfaces ({}); a plugin implements one", .0.len(), .0.join(", "))]
    Several(Vec<String>),
    #[error(
        "it exports none of the router, processor and flags interfaces of {PACKAGE} (it exports: {})",
        .0.join(", ")
    )]
    NoPlugin(Vec<String>),
}

/// The world and version `exports` name (a component's export names), checked against
/// `host`. A component built for a version whose worlds exported something else still
/// names the package in its imports (its types and the host interface): that version is
/// what the refusal reports.
pub fn identify(exports: &[String], imports: &[String], host: &Version) -> Result<Claim, Mismatch> {
    let claims: Vec<(&String, Claim)> = exports
        .iter()
        .filter_map(|name| Some((name, plugin_export(name)?)))
        .collect();
    match claims.as_slice() {
        [(_, claim)] if same_line(&claim.built_for, host) => Ok(claim.clone()),
        [(_, claim)] => Err(Mismatch::Version {
            built_for: claim.built_for.clone(),
            host: host.clone(),
        }),
        [] => match exports.iter().chain(imports).find_map(|n| named(n)) {
            Some((_, built_for)) if !same_line(&built_for, host) => Err(Mismatch::Version {
                built_for,
                host: host.clone(),
            }),
            _ => Err(Mismatch::NoPlugin(exports.to_vec())),
        },
        several => Err(Mismatch::Several(
            several.iter().map(|(name, _)| name.to_string()).collect(),
        )),
    }
}

/// Whether a plugin built for `built` loads on a host speaking `host`. The rule is the one
/// wasmtime matches names by (an export or import of another version is found on the same
/// line), so the host refuses exactly what its bindings could not find, and says why: from
/// 1.0 the major is the line, before it `0.minor`; a 0.0.z or pre-release version matches
/// itself alone.
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

/// The versions [`same_line`] accepts for `host`, as operators read them.
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

/// The claim of an export named after one of the plugin interfaces.
fn plugin_export(name: &str) -> Option<Claim> {
    let (interface, built_for) = named(name)?;
    let world = WorldKind::ALL
        .into_iter()
        .find(|w| w.as_str() == interface)?;
    Some(Claim { world, built_for })
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
    fn a_component_is_the_plugin_interface_it_exports() {
        let host = v("0.4.1");
        let claim = identify(
            &names(&["modelyard:plugin/router@0.4.0"]),
            &names(&["modelyard:plugin/host@0.4.0", "wasi:io/poll@0.2.6"]),
            &host,
        );
        assert_eq!(
            claim,
            Ok(Claim {
                world: WorldKind::Router,
                built_for: v("0.4.0")
            })
        );
        let flags = identify(&names(&["modelyard:plugin/flags@0.4.2"]), &[], &host);
        assert_eq!(flags.map(|c| c.world), Ok(WorldKind::Flags));
    }

    #[test]
    fn refusals_say_why_with_both_versions() {
        let host = v("0.4.1");
        let newer = identify(&names(&["modelyard:plugin/processor@0.5.0"]), &[], &host)
            .unwrap_err()
            .to_string();
        assert!(
            newer.contains("built for modelyard:plugin@0.5.0")
                && newer.contains("speaks modelyard:plugin@0.4.1")
                && newer.contains("0.4.*"),
            "{newer}"
        );
        // Built when the worlds exported bare functions: the version is in the imports.
        let older = identify(
            &names(&["configure", "route"]),
            &names(&["modelyard:plugin/types@0.3.0"]),
            &host,
        );
        assert_eq!(
            older,
            Err(Mismatch::Version {
                built_for: v("0.3.0"),
                host: host.clone()
            })
        );
        assert_eq!(
            identify(&names(&["run"]), &names(&["wasi:cli/stdin@0.2.6"]), &host),
            Err(Mismatch::NoPlugin(names(&["run"])))
        );
        let two = names(&[
            "modelyard:plugin/router@0.4.0",
            "modelyard:plugin/flags@0.4.0",
        ]);
        assert_eq!(
            identify(&two, &[], &host),
            Err(Mismatch::Several(two.clone()))
        );
    }
}
