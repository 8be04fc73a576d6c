//! Plugin provenance: ed25519 signatures over a component's exact bytes, made by
//! `modelyard plugin sign` and checked before a component is compiled when
//! `plugins.require_signatures` is on.
//!
//! Files: a private key is PKCS#8 in PEM (`-----BEGIN PRIVATE KEY-----`, as
//! `modelyard plugin keygen` and `openssl genpkey -algorithm ed25519` both write it); a public
//! key is its 32 bytes in base64; `<component>.wasm.sig` is one line,
//! `ed25519 <public key> <signature>`, both base64, the signature over the component file
//! as it is.
//!
//! Owns: key files, signature files and the check. Must not touch: when a component is
//! checked or what a refusal does (`library`), which keys are trusted (the configuration).

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::config::PublicKey;

/// The signature file's scheme word: the one algorithm there is.
const SCHEME: &str = "ed25519";
const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";
/// A PKCS#8 v1 ed25519 private key (RFC 8410) is these bytes, then the 32-byte seed: the
/// form OpenSSL writes and reads (it does not read the v2 documents ring makes).
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A key file or a component that cannot be used for signing.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; keys are never overwritten: remove it or choose another --out", .path.display())]
    Exists { path: PathBuf },
    #[error(
        "{} is not an ed25519 private key in PKCS#8 PEM (as `modelyard plugin keygen` \
         writes): {problem}",
        .path.display()
    )]
    Key { path: PathBuf, problem: String },
    #[error("the system's random number generator failed")]
    Random,
}

/// Why a component does not count as signed by a trusted key.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Unsigned {
    #[error("not signed: there is no {file} beside it (sign it with `modelyard plugin sign`)")]
    Missing { file: String },
    #[error("its signature file {file} cannot be read: {problem}")]
    Unreadable { file: String, problem: String },
    #[error(
        "its signature file {file} is malformed ({problem}); it must be one line \
         `ed25519 <public key> <signature>`, as `modelyard plugin sign` writes it"
    )]
    Malformed { file: String, problem: String },
    #[error("it is signed by {key}, which is not a trusted key (plugins.trusted_keys)")]
    Untrusted { key: PublicKey },
    #[error(
        "its signature by {key} does not match its bytes: the component (or the signature) \
         changed after it was signed"
    )]
    Mismatch { key: PublicKey },
}

/// A component's signature file as a scan found it.
#[derive(Clone, Debug, PartialEq)]
pub enum Signature {
    Missing { file: String },
    Unreadable { file: String, problem: String },
    Text { file: String, text: Vec<u8> },
}

/// `<component>.sig`, beside the component.
pub fn signature_path(component: &Path) -> PathBuf {
    let mut path = component.as_os_str().to_owned();
    path.push(".sig");
    PathBuf::from(path)
}

/// Reads the signature file of the component at `component`.
pub fn read_signature(component: &Path) -> Signature {
    let path = signature_path(component);
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match std::fs::read(&path) {
        Ok(text) => Signature::Text { file, text },
        Err(error) if error.kind() == ErrorKind::NotFound => Signature::Missing { file },
        Err(error) => Signature::Unreadable {
            file,
            problem: error.to_string(),
        },
    }
}

/// The trusted key that signed `component`, or why none did.
pub fn verify(
    component: &[u8],
    signature: &Signature,
    trusted: &[PublicKey],
) -> Result<PublicKey, Unsigned> {
    let (file, text) = match signature {
        Signature::Missing { file } => return Err(Unsigned::Missing { file: file.clone() }),
        Signature::Unreadable { file, problem } => {
            return Err(Unsigned::Unreadable {
                file: file.clone(),
                problem: problem.clone(),
            });
        }
        Signature::Text { file, text } => (file, text),
    };
    let malformed = |problem: String| Unsigned::Malformed {
        file: file.clone(),
        problem,
    };
    let text = std::str::from_utf8(text).map_err(|_| malformed("not text".to_string()))?;
    let [scheme, key, signature] = text.split_whitespace().collect::<Vec<_>>()[..] else {
        return Err(malformed("not three words".to_string()));
    };
    if scheme != SCHEME {
        return Err(malformed(format!("scheme '{scheme}', not '{SCHEME}'")));
    }
    let key: PublicKey = key.parse().map_err(malformed)?;
    let signature = STANDARD
        .decode(signature)
        .map_err(|e| malformed(format!("the signature is not base64: {e}")))?;
    if !trusted.contains(&key) {
        return Err(Unsigned::Untrusted { key });
    }
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(component, &signature)
        .map_err(|_| Unsigned::Mismatch { key })?;
    Ok(key)
}

/// An ed25519 key pair that signs components.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Makes a key pair and writes its private key to `out` (PEM, 0600), which must not
    /// exist yet.
    pub fn generate(out: &Path) -> Result<SigningKey, SigningError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| SigningError::Random)?;
        let pkcs8 = [PKCS8_V1_PREFIX.as_slice(), &seed].concat();
        let key =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| SigningError::Key {
                path: out.to_path_buf(),
                problem: e.to_string(),
            })?;
        let pem = format!("{PEM_BEGIN}\n{}\n{PEM_END}\n", STANDARD.encode(&pkcs8));
        let write = |source| SigningError::Write {
            path: out.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => SigningError::Exists {
                    path: out.to_path_buf(),
                },
                _ => write(e),
            })?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write)?;
        Ok(SigningKey(key))
    }

    /// Reads a private key file.
    pub fn read(path: &Path) -> Result<SigningKey, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let refused = |problem: String| SigningError::Key {
            path: path.to_path_buf(),
            problem,
        };
        let body = text
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|t| t.strip_suffix(PEM_END))
            .ok_or_else(|| refused(format!("no {PEM_BEGIN} … {PEM_END} block")))?;
        let der = STANDARD
            .decode(body.split_whitespace().collect::<String>())
            .map_err(|e| refused(format!("not base64: {e}")))?;
        // v1 (no public key inside) as `generate` and OpenSSL write it, or v2.
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|e| refused(e.to_string()))
    }

    pub fn public_key(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(key)
    }

    /// The signature file's text for `component`.
    pub fn sign(&self, component: &[u8]) -> String {
        let signature = self.0.sign(component);
        format!(
            "{SCHEME} {} {}\n",
            self.public_key(),
            STANDARD.encode(signature.as_ref())
        )
    }

    /// Signs the component file at `component` into its `.sig` file (replaced whole if
    /// there is one), and returns that file's path.
    pub fn sign_file(&self, component: &Path) -> Result<PathBuf, SigningError> {
        let bytes = std::fs::read(component).map_err(|source| SigningError::Read {
            path: component.to_path_buf(),
            source,
        })?;
        let path = signature_path(component);
        // Written beside it and renamed, so a watching server never reads half a line.
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let write = |source| SigningError::Write {
            path: path.clone(),
            source,
        };
        std::fs::write(&temp, self.sign(&bytes)).map_err(write)?;
        std::fs::rename(&temp, &path).map_err(write)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0 any bytes at all";

    fn key(dir: &Path, name: &str) -> SigningKey {
        SigningKey::generate(&dir.join(name)).unwrap()
    }

    fn text(text: impl Into<Vec<u8>>) -> Signature {
        Signature::Text {
            file: "p.wasm.sig".to_string(),
            text: text.into(),
        }
    }

    #[test]
    fn a_signature_verifies_only_the_bytes_it_signed_by_a_trusted_key() {
        let dir = tempfile::tempdir().unwrap();
        let ours = key(dir.path(), "ours.pem");
        let theirs = key(dir.path(), "theirs.pem");
        let trusted = [theirs.public_key(), ours.public_key()];
        let signed = text(ours.sign(COMPONENT));
        assert_eq!(verify(COMPONENT, &signed, &trusted), Ok(ours.public_key()));

        let mut tampered = COMPONENT.to_vec();
        tampered[9] ^= 1;
        assert_eq!(
            verify(&tampered, &signed, &trusted),
            Err(Unsigned::Mismatch {
                key: ours.public_key()
            })
        );
        assert_eq!(
            verify(COMPONENT, &signed, &[theirs.public_key()]),
            Err(Unsigned::Untrusted {
                key: ours.public_key()
            })
        );
        // A signature file that claims a trusted key it was not made with.
        let forged = ours.sign(COMPONENT).replace(
            &ours.public_key().to_string(),
            &theirs.public_key().to_string(),
        );
        assert_eq!(
            verify(COMPONENT, &text(forged), &trusted),
            Err(Unsigned::Mismatch {
                key: theirs.public_key()
            })
        );
    }

    #[test]
    fn missing_and_garbage_signatures_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let ours = key(dir.path(), "ours.pem");
        let trusted = [ours.public_key()];
        let good = ours.sign(COMPONENT);
        let words: Vec<&str> = good.split_whitespace().collect();
        for (garbage, says) in [
            (b"\xff\xfe".to_vec(), "not text"),
            (b"".to_vec(), "not three words"),
            (
                format!("rsa {} {}", words[1], words[2]).into(),
                "scheme 'rsa'",
            ),
            (
                format!("ed25519 c2hvcnQ= {}", words[2]).into(),
                "5 bytes, not 32",
            ),
            (format!("ed25519 {} !!!", words[1]).into(), "not base64"),
        ] {
            let error = verify(COMPONENT, &text(garbage), &trusted).unwrap_err();
            assert!(matches!(error, Unsigned::Malformed { .. }), "{error}");
            assert!(error.to_string().contains(says), "{error}");
        }
        // Base64 of the wrong length is a signature that does not match.
        let short = format!("ed25519 {} AAAA", words[1]);
        assert!(matches!(
            verify(COMPONENT, &text(short), &trusted),
            Err(Unsigned::Mismatch { .. })
        ));
        let missing = read_signature(&dir.path().join("p.wasm"));
        let error = verify(COMPONENT, &missing, &trusted).unwrap_err();
        assert_eq!(
            error.to_string(),
            "not signed: there is no p.wasm.sig beside it (sign it with `modelyard plugin sign`)"
        );
    }

    #[test]
    fn keys_openssl_wrote_sign_too() {
        // `openssl genpkey -algorithm ed25519`, and its public key as
        // `openssl pkey -pubout -outform DER | tail -c 32 | base64` prints it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openssl.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\n\
             MC4CAQAwBQYDK2VwBCIEIBkyIlrpSD26ruWD8jc48GDj55fgG90NPMrPYWyv3bhq\n\
             -----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let key = SigningKey::read(&path).unwrap();
        let public: PublicKey = "affuHfhXuiXeZR6Yd/KvgpDugnSEZqnu4flJhpQ3+og="
            .parse()
            .unwrap();
        assert_eq!(key.public_key(), public);
        assert_eq!(
            verify(COMPONENT, &text(key.sign(COMPONENT)), &[public]),
            Ok(public)
        );
    }

    #[test]
    fn keys_are_written_private_read_back_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.pem");
        let made = SigningKey::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = SigningKey::read(&path).unwrap();
        assert_eq!(read.public_key(), made.public_key());
        assert!(matches!(
            SigningKey::generate(&path),
            Err(SigningError::Exists { .. })
        ));
        assert_eq!(
            SigningKey::read(&path).unwrap().public_key(),
            made.public_key()
        );

        // Signed files round-trip through their `.sig`.
        let component = dir.path().join("p.wasm");
        std::fs::write(&component, COMPONENT).unwrap();
        let sig = read.sign_file(&component).unwrap();
        assert_eq!(sig, dir.path().join("p.wasm.sig"));
        let signature = read_signature(&component);
        assert_eq!(
            verify(COMPONENT, &signature, &[made.public_key()]),
            Ok(made.public_key())
        );

        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = SigningKey::read(&path).err().unwrap().to_string();
        assert!(error.contains("signing.pem"), "{error}");
    }
}
