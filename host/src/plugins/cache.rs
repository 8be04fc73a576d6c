//! Compiled components on disk, keyed by the component's SHA-256 and the engine's
//! compatibility hash, so a restart or a swap back to a known file skips compilation.
//!
//! What is in the directory is loaded as native code, outside every sandbox, so it is
//! guarded twice. The directory must belong to the server's user and be closed to group
//! and others (it is created 0700; one that is not so is refused, and the server does not
//! start). And each artefact carries an HMAC-SHA256 tag made with a key of this
//! installation (`key` in the directory, 32 random bytes, 0600): the tag is checked before
//! the bytes are deserialised, and an artefact whose tag does not match is discarded and
//! the component compiled again.
//!
//! Owns: the cache directory's files, its key and the component hash. Must not touch: what
//! a component is (it caches any the engine compiles).

use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The installation's key, in the cache directory.
const KEY_FILE: &str = "key";
/// The length of the key and of an HMAC-SHA256 tag.
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// Why the cache directory cannot be used: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "the compiled-plugin cache {} belongs to user {owner}, not to the server's user \
         {user}, and what is in it runs as native code: remove it, or set \
         plugins.cache_dir to a directory of the server's user",
        .path.display()
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error(
        "the compiled-plugin cache {} is open to other users (mode {mode:o}), and what is \
         in it runs as native code: run `chmod {wanted:o} {}`, or set plugins.cache_dir to \
         another directory",
        .path.display(), .path.display()
    )]
    Open {
        path: PathBuf,
        mode: u32,
        wanted: u32,
    },
    #[error(
        "cannot use {} for the compiled-plugin cache: {problem}; fix it, or set \
         plugins.cache_dir to another directory",
        .path.display()
    )]
    Unusable { path: PathBuf, problem: String },
}

impl CacheError {
    fn io(path: &Path, error: std::io::Error) -> CacheError {
        CacheError::Unusable {
            path: path.to_path_buf(),
            problem: error.to_string(),
        }
    }
}

/// `$XDG_CACHE_HOME/modelyard`, else `$HOME/.cache/modelyard`: the user's own cache, never
/// a directory other users share. `None` when neither variable holds an absolute path.
pub fn default_dir() -> Option<PathBuf> {
    let under = |variable: &str, sub: &str| {
        std::env::var_os(variable)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|p| p.join(sub))
    };
    under("XDG_CACHE_HOME", "modelyard").or_else(|| under("HOME", ".cache/modelyard"))
}

/// A cache directory found safe, with its key.
pub struct CacheDir {
    dir: PathBuf,
    key: hmac::Key,
}

impl CacheDir {
    /// Creates `dir` (0700) and its key if missing, and checks both belong to the server's
    /// user alone.
    pub fn open(dir: &Path) -> Result<CacheDir, CacheError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CacheError::io(dir, e))?;
        let metadata = std::fs::metadata(dir).map_err(|e| CacheError::io(dir, e))?;
        if !metadata.is_dir() {
            return Err(CacheError::Unusable {
                path: dir.to_path_buf(),
                problem: "it is not a directory".to_string(),
            });
        }
        // Others may look (the artefacts are no secret) but not write.
        owned_alone(dir, &metadata, 0o022, 0o700)?;
        let key = read_or_create_key(&dir.join(KEY_FILE))?;
        Ok(CacheDir {
            dir: dir.to_path_buf(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }
}

/// Refuses a file or directory not owned by the effective user, or with any of `forbidden`
/// among its permission bits.
fn owned_alone(
    path: &Path,
    metadata: &std::fs::Metadata,
    forbidden: u32,
    wanted: u32,
) -> Result<(), CacheError> {
    let user = rustix::process::geteuid().as_raw();
    if metadata.uid() != user {
        return Err(CacheError::Owner {
            path: path.to_path_buf(),
            owner: metadata.uid(),
            user,
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(CacheError::Open {
            path: path.to_path_buf(),
            mode,
            wanted,
        });
    }
    Ok(())
}

/// The key in `path`, made (32 random bytes, 0600) if there is none. Only the server's
/// user may read it: whoever has it can make an artefact pass.
fn read_or_create_key(path: &Path) -> Result<[u8; KEY_LEN], CacheError> {
    match File::open(path) {
        Ok(file) => return read_key(path, file),
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(CacheError::io(path, error)),
    }
    // The key, and a name of its own for the file it is first written to.
    let (mut key, mut nonce) = ([0u8; KEY_LEN], [0u8; 8]);
    let random = SystemRandom::new();
    random
        .fill(&mut key)
        .and_then(|()| random.fill(&mut nonce))
        .map_err(|_| CacheError::Unusable {
            path: path.to_path_buf(),
            problem: "the system's random number generator failed".to_string(),
        })?;
    // Written whole under that name, then linked in place (which fails if a key is there):
    // whoever starts at the same time reads a whole key, the one key.
    let temp = path.with_extension(format!("tmp{}", u64::from_le_bytes(nonce)));
    let linked = write_private(&temp, &[&key]).and_then(|()| std::fs::hard_link(&temp, path));
    if let Err(error) = std::fs::remove_file(&temp) {
        tracing::warn!(file = %temp.display(), %error, "cannot remove a temporary key file");
    }
    match linked {
        Ok(()) => Ok(key),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => {
            let file = File::open(path).map_err(|e| CacheError::io(path, e))?;
            read_key(path, file)
        }
        Err(error) => Err(CacheError::io(path, error)),
    }
}

/// The key in `file`, refused if another user owns it or could read it.
fn read_key(path: &Path, mut file: File) -> Result<[u8; KEY_LEN], CacheError> {
    let metadata = file.metadata().map_err(|e| CacheError::io(path, e))?;
    owned_alone(path, &metadata, 0o077, 0o600)?;
    let mut key = Vec::new();
    file.read_to_end(&mut key)
        .map_err(|e| CacheError::io(path, e))?;
    <[u8; KEY_LEN]>::try_from(key.as_slice()).map_err(|_| CacheError::Unusable {
        path: path.to_path_buf(),
        problem: format!(
            "the key is {} bytes, not {KEY_LEN}; remove it and a new one is made (the \
             cached plugins then compile once again)",
            key.len()
        ),
    })
}

/// Creates or truncates `path`, readable and writable by its owner alone, with `parts`.
fn write_private(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()
}

pub struct ArtifactCache {
    dir: Option<CacheDir>,
    engine_key: String,
}

/// What the cache holds for a component.
enum Lookup {
    Hit(Component),
    Missing,
    /// There is a file, but it cannot be used: it is compiled again and overwritten.
    Unusable,
}

/// The hex SHA-256 of a component: its identity in the cache and in the admin API.
pub fn component_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ArtifactCache {
    pub fn new(dir: Option<CacheDir>, engine: &Engine) -> ArtifactCache {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ArtifactCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        }
    }

    pub fn get_or_compile(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
        let Some(cache) = &self.dir else {
            return Component::new(engine, bytes);
        };
        let name = self.file_name(bytes);
        let path = cache.dir.join(&name);
        if let Lookup::Hit(component) = self.lookup(engine, cache, &name) {
            return Ok(component);
        }
        let component = Component::new(engine, bytes)?;
        let stored = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|artefact| write_tagged(cache, &name, &artefact));
        if let Err(error) = stored {
            tracing::warn!(file = %path.display(), %error, "cannot cache the compiled plugin; it will be compiled again next time");
        }
        Ok(component)
    }

    /// `<component sha256>-<engine hash>.cwasm`: the name says what it was compiled from
    /// and for which engine.
    fn file_name(&self, bytes: &[u8]) -> String {
        format!("{}-{}.cwasm", component_hash(bytes), self.engine_key)
    }

    fn lookup(&self, engine: &Engine, cache: &CacheDir, name: &str) -> Lookup {
        let path = cache.dir.join(name);
        let file = match std::fs::read(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => return Lookup::Missing,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read the cached plugin artefact; compiling again");
                return Lookup::Unusable;
            }
        };
        let Some(artefact) = verified(cache, name, &file) else {
            tracing::warn!(
                file = %path.display(),
                "cached plugin artefact refused: its integrity tag does not match (written \
                 by someone else, by another installation, or damaged); it is not loaded, and \
                 the component is compiled again and the file replaced"
            );
            return Lookup::Unusable;
        };
        // SAFETY: the tag proves these bytes were written by `serialize` in this
        // installation (only the server's user can read the key), and the name they are
        // tagged with includes the engine's compatibility hash.
        match unsafe { Component::deserialize(engine, artefact) } {
            Ok(component) => Lookup::Hit(component),
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cached plugin artefact unusable; compiling again");
                Lookup::Unusable
            }
        }
    }
}

/// The HMAC of an artefact under the name it is stored as, so that a valid artefact of one
/// component cannot stand in for another's.
fn tag(cache: &CacheDir, name: &str, artefact: &[u8]) -> hmac::Tag {
    let mut context = hmac::Context::with_key(&cache.key);
    context.update(name.as_bytes());
    context.update(artefact);
    context.sign()
}

/// The artefact in `file` (tag, then the artefact), if its tag is right.
fn verified<'a>(cache: &CacheDir, name: &str, file: &'a [u8]) -> Option<&'a [u8]> {
    let (stored, artefact) = file.split_at_checked(TAG_LEN)?;
    let expected = tag(cache, name, artefact);
    bool::from(expected.as_ref().ct_eq(stored)).then_some(artefact)
}

/// Writes tag and artefact to a temporary file, then renames it over `name`: readers see
/// the old file or the new one, whole.
fn write_tagged(cache: &CacheDir, name: &str, artefact: &[u8]) -> std::io::Result<()> {
    let path = cache.dir.join(name);
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    write_private(&temp, &[tag(cache, name, artefact).as_ref(), artefact])?;
    std::fs::rename(&temp, &path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use wasmtime::Store;
    use wasmtime::component::Linker;

    use super::*;

    /// A component whose one export answers `answer`.
    fn answering(answer: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(component
                 (core module $m (func (export "f") (result i32) i32.const {answer}))
                 (core instance $i (instantiate $m))
                 (func (export "answer") (result u32) (canon lift (core func $i "f"))))"#
        ))
        .unwrap()
    }

    fn call(engine: &Engine, component: &Component) -> u32 {
        let mut store = Store::new(engine, ());
        let instance = Linker::new(engine)
            .instantiate(&mut store, component)
            .unwrap();
        let answer = instance
            .get_typed_func::<(), (u32,)>(&mut store, "answer")
            .unwrap();
        answer.call(&mut store, ()).unwrap().0
    }

    fn cache(dir: &Path, engine: &Engine) -> ArtifactCache {
        ArtifactCache::new(Some(CacheDir::open(dir).unwrap()), engine)
    }

    #[test]
    fn a_planted_artefact_is_refused_and_the_component_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = cache(dir.path(), &engine);
        let honest = answering(42);
        let name = cache.file_name(&honest);
        let path = dir.path().join(&name);
        // Another user's artefact at the exact name the server will look for: real native
        // code for this engine (it answers 666), untagged, or tagged with another key.
        let foreign = Component::new(&engine, answering(666))
            .unwrap()
            .serialize()
            .unwrap();
        let other_key = CacheDir::open(&dir.path().join("elsewhere")).unwrap();
        let retagged = [tag(&other_key, &name, &foreign).as_ref(), &foreign].concat();
        for planted in [
            foreign.clone(),
            [[0; TAG_LEN].as_slice(), &foreign].concat(),
            retagged,
        ] {
            std::fs::write(&path, &planted).unwrap();
            let component = cache.get_or_compile(&engine, &honest).unwrap();
            assert_eq!(call(&engine, &component), 42);
            // The planted file was replaced by the server's own, which now loads.
            let file = std::fs::read(&path).unwrap();
            assert_ne!(file, planted);
            assert!(verified(cache.dir.as_ref().unwrap(), &name, &file).is_some());
            let cached = cache.dir.as_ref().unwrap();
            match cache.lookup(&engine, cached, &name) {
                Lookup::Hit(component) => assert_eq!(call(&engine, &component), 42),
                _ => panic!("the replaced artefact does not load"),
            }
        }
        // A valid artefact of another component does not stand in for this one.
        let other = answering(7);
        cache.get_or_compile(&engine, &other).unwrap();
        std::fs::copy(dir.path().join(cache.file_name(&other)), &path).unwrap();
        let component = cache.get_or_compile(&engine, &honest).unwrap();
        assert_eq!(call(&engine, &component), 42);
    }

    #[test]
    fn servers_starting_together_share_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let artefact = b"the same bytes";
        let tags: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let opening: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| CacheDir::open(&cache).unwrap()))
                .collect();
            opening
                .into_iter()
                .map(|o| tag(&o.join().unwrap(), "a", artefact).as_ref().to_vec())
                .collect()
        });
        assert!(tags.iter().all(|t| *t == tags[0]));
        let names: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_directory_or_key_open_to_others_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        CacheDir::open(&cache).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&cache.join(KEY_FILE)), 0o600);

        let set = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set(&cache, 0o777);
        let error = CacheDir::open(&cache).err().unwrap();
        assert!(
            matches!(error, CacheError::Open { mode: 0o777, .. }),
            "{error}"
        );
        let says = error.to_string();
        assert!(
            says.contains(&format!("chmod 700 {}", cache.display())),
            "{says}"
        );
        assert!(says.contains("plugins.cache_dir"), "{says}");

        set(&cache, 0o700);
        let key = cache.join(KEY_FILE);
        set(&key, 0o644);
        let error = CacheDir::open(&cache).err().unwrap().to_string();
        assert!(
            error.contains(&format!("chmod 600 {}", key.display())),
            "{error}"
        );

        set(&key, 0o600);
        CacheDir::open(&cache).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // As root, a directory given to another user; otherwise one root has.
        let theirs = if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
            (dir.path().to_path_buf(), 65534)
        } else {
            (PathBuf::from("/"), 0)
        };
        let error = CacheDir::open(&theirs.0).err().unwrap();
        assert!(
            matches!(error, CacheError::Owner { owner, .. } if owner == theirs.1),
            "{error}"
        );
        assert!(error.to_string().contains(&theirs.0.display().to_string()));
    }
}
