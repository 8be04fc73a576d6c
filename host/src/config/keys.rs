//! Public keys as the configuration and the command line write them: an ed25519 public key
//! is its 32 raw bytes in base64. Read and checked here so that a mistyped key is refused
//! with the file, not found out when a plugin is.
//!
//! Owns: `PublicKey`'s text form. Must not touch: signatures (the plugin runtime checks
//! them).

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// An ed25519 public key, e.g. one of `plugins.trusted_keys`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct PublicKey(pub [u8; 32]);

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<PublicKey, String> {
        let refused = |why: &str| {
            format!(
                "'{text}' is not an ed25519 public key ({why}); write the 32 bytes in \
                 base64, as `modelyard plugin keygen` prints them"
            )
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| refused(&format!("not base64: {e}")))?;
        let bytes = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| refused(&format!("{} bytes, not 32", bytes.len())))?;
        Ok(PublicKey(bytes))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = String;

    fn try_from(text: String) -> Result<PublicKey, String> {
        text.parse()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_32_bytes_of_base64_and_print_as_they_were_written() {
        let text = STANDARD.encode([7u8; 32]);
        let key: PublicKey = text.parse().unwrap();
        assert_eq!(key.to_string(), text);
        let short = STANDARD.encode([7u8; 31]);
        assert!(
            short
                .parse::<PublicKey>()
                .unwrap_err()
                .contains("31 bytes, not 32")
        );
        assert!(
            "not a key!"
                .parse::<PublicKey>()
                .unwrap_err()
                .contains("not base64")
        );
    }
}
