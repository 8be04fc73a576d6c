//! `modelyard plugin new`: a plugin crate that builds as it is, to start from, wherever it
//! is written.
//!
//! The crate asks for the SDK by version, the one this host was built with (so it speaks a
//! contract version this host loads), from the registry: the SDK is an ordinary crate, and
//! a plugin gets its fixes with `cargo update`, not by being written again. A local copy (an
//! unpacked `modelyard-sdk` .crate, for an SDK not published yet or changed locally) replaces
//! the registry's through `[patch.crates-io]`, which `--sdk` writes.
//!
//! Owns: the templates and the manifest. Must not touch: anything of the runtime (it knows
//! the world kinds, nothing else).

use std::path::{Path, PathBuf};

use super::contract::{HOST_VERSION, PACKAGE, WorldKind};

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "'{0}' is not a crate name: use lowercase letters, digits, '-' and '_', starting with a letter"
    )]
    BadName(String),
    #[error("{0} already exists; pick another name or directory")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes `<dir>/<name>/` with a `Cargo.toml` depending on this host's SDK (from `sdk`, a
/// directory holding the SDK crate, if given) and a `lib.rs` implementing the world `kind`
/// with a test. Returns the crate's directory.
pub fn new_plugin(
    dir: &Path,
    name: &str,
    kind: WorldKind,
    sdk: Option<&Path>,
) -> Result<PathBuf, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let mut manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

# A plugin crate stands alone, even inside another workspace.
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# Speaks {PACKAGE}@{HOST_VERSION}, as the host that wrote this crate does.
modelyard-sdk = "{SDK}"
serde = {{ version = "1", features = ["derive"] }}
"#,
        SDK = modelyard_sdk::VERSION,
    );
    if let Some(sdk) = sdk {
        manifest.push_str(&format!(
            r#"
# This copy of the SDK instead of the registry's: delete the table to use the published crate.
[patch.crates-io]
modelyard-sdk = {{ path = {} }}
"#,
            toml::Value::String(sdk.display().to_string())
        ));
    }
    let source = match kind {
        WorldKind::Router => ROUTER,
        WorldKind::Processor => PROCESSOR,
        WorldKind::Flags => FLAGS,
    };
    let write = |path: PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().unwrap_or(&root))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| ScaffoldError::Write { path, source })
    };
    write(root.join("Cargo.toml"), &manifest)?;
    write(root.join("src/lib.rs"), source)?;
    Ok(root)
}

const ROUTER: &str = r#"//! A router plugin: picks the variant that answers each request.
use modelyard_sdk::{Decision, Error, RequestContext, Router, VariantStats, fail};

/// This plugin's table in modelyard.toml, e.g. `config = { variant = "stable" }`.
#[derive(serde::Deserialize)]
pub struct Config {
    pub variant: String,
}

pub struct Pinned {
    variant: String,
}

impl Router for Pinned {
    type Config = Config;
    /// What the host keeps between calls for this router: nothing.
    type State = ();

    fn new(config: Config) -> Result<Self, Error> {
        Ok(Pinned { variant: config.variant })
    }

    fn route(
        &self,
        _ctx: &RequestContext,
        variants: &[VariantStats],
        _state: &mut (),
    ) -> Result<Decision, Error> {
        if !variants.iter().any(|v| v.name == self.variant) {
            return fail!("no variant named '{}'", self.variant);
        }
        Ok(Decision::to(self.variant.clone(), "pinned by configuration"))
    }
}

modelyard_sdk::register!(router: Pinned);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_configured_variant() {
        let router = Pinned::new(Config { variant: "b".into() }).unwrap();
        let variants = [VariantStats::named("a"), VariantStats::named("b")];
        assert_eq!(router.route(&RequestContext::default(), &variants, &mut ()).unwrap().primary, "b");
    }
}
"#;

const PROCESSOR: &str = r#"//! A processor plugin: shapes tensors before and after the model.
use modelyard_sdk::{Error, Processor, RequestContext, Tensor};

/// This plugin's table in modelyard.toml, e.g. `config = { scale = 2.0 }`.
#[derive(serde::Deserialize)]
pub struct Config {
    pub scale: f32,
}

pub struct Scale {
    scale: f32,
}

impl Processor for Scale {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        Ok(Scale { scale: config.scale })
    }

    fn preprocess(&self, _ctx: &RequestContext, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        inputs
            .into_iter()
            .map(|t| {
                let values: Vec<f32> = t.as_f32()?.iter().map(|v| v * self.scale).collect();
                Tensor::from_f32(t.name, &t.shape, &values)
            })
            .collect()
    }
}

modelyard_sdk::register!(processor: Scale);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_inputs() {
        let p = Scale::new(Config { scale: 2.0 }).unwrap();
        let input = Tensor::from_f32("x", &[2], &[1.0, 2.5]).unwrap();
        let out = p.preprocess(&RequestContext::default(), vec![input]).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), vec![2.0, 5.0]);
    }
}
"#;

const FLAGS: &str = r#"//! A flags plugin: evaluates feature flags for each request.
use modelyard_sdk::{Error, Evaluation, Flags, RequestContext};

/// This plugin's table in modelyard.toml, e.g.
/// `config = { flag = "new-ui", attribute = "x-country", countries = ["NL"] }`.
#[derive(serde::Deserialize)]
pub struct Config {
    pub flag: String,
    /// The request attribute that holds the country (a header the endpoint passes on).
    pub attribute: String,
    pub countries: Vec<String>,
}

pub struct ByCountry {
    config: Config,
}

impl Flags for ByCountry {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        Ok(ByCountry { config })
    }

    fn evaluate(&self, ctx: &RequestContext) -> Vec<Evaluation> {
        let on = ctx
            .attribute(&self.config.attribute)
            .is_some_and(|c| self.config.countries.iter().any(|x| x == c));
        vec![Evaluation {
            flag: self.config.flag.clone(),
            variant: if on { "on" } else { "off" }.into(),
            reason: "country targeting".into(),
        }]
    }
}

modelyard_sdk::register!(flags: ByCountry);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_by_country() {
        let f = ByCountry::new(Config {
            flag: "x".into(),
            attribute: "country".into(),
            countries: vec!["NL".into()],
        })
        .unwrap();
        let ctx = RequestContext { attributes: vec![("country".into(), "NL".into())], ..Default::default() };
        assert_eq!(f.evaluate(&ctx)[0].variant, "on");
        assert_eq!(f.evaluate(&RequestContext::default())[0].variant, "off");
    }
}
"#;
