//! Compiled components on disk, keyed by the component's SHA-256 and the engine's
//! compatibility hash, so a restart or a swap back to a known file skips compilation.
//! The directory must be outside the watched plugin directory and writable by the server
//! alone: what is in it is loaded as native code.
//!
//! Owns: the cache directory's files and the component hash. Must not touch: what a
//! component is (it caches any the engine compiles).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

/// The hex SHA-256 of a component: its identity in the cache and in the admin API.
pub fn component_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ArtifactCache {
    pub fn new(dir: Option<PathBuf>, engine: &Engine) -> ArtifactCache {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ArtifactCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        }
    }

    pub fn get_or_compile(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
        let Some(dir) = &self.dir else {
            return Component::new(engine, bytes);
        };
        let path = dir.join(format!(
            "{}-{}.cwasm",
            component_hash(bytes),
            self.engine_key
        ));
        if path.is_file() {
            // SAFETY: the file was written by `serialize` below, for an engine with the same
            // compatibility hash, into a directory only the server writes (see above).
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok(component),
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cached plugin artifact unusable; compiling again");
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        let stored = std::fs::create_dir_all(dir).and_then(|()| {
            let temp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&temp, component.serialize().map_err(std::io::Error::other)?)?;
            std::fs::rename(&temp, &path)
        });
        if let Err(error) = stored {
            tracing::warn!(dir = %dir.display(), %error, "cannot cache the compiled plugin; it will be compiled again next time");
        }
        Ok(component)
    }
}
