//! Who may use `/admin/`: named bearer tokens with a role. Changing anything needs an
//! `admin` token, and with none configured nobody may; reading needs a token only once
//! `read` tokens exist. Tokens are compared as SHA-256 digests in constant time, so neither
//! a token's bytes nor its length leak through timing, and only a token's name is logged.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::config::{Role, TokenConfig};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "admin token '{name}' needs exactly one of `token` or `token_env` in [server.tokens.{name}]"
    )]
    Unset { name: String },
    #[error(
        "admin token '{name}' is to come from ${var}, which is not set; set it or remove the token"
    )]
    MissingEnv { name: String, var: String },
    #[error("admin token '{name}' is empty; give it a secret")]
    Empty { name: String },
    #[error("admin tokens '{first}' and '{second}' have the same secret; give each its own")]
    Shared { first: String, second: String },
}

struct Token {
    name: String,
    digest: [u8; 32],
    role: Role,
}

#[derive(Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Tokens {
    pub fn new(config: &BTreeMap<String, TokenConfig>) -> Result<Tokens, TokenError> {
        let tokens = config
            .iter()
            .map(|(name, t)| {
                let secret = match (&t.token, &t.token_env) {
                    (Some(token), None) => token.clone(),
                    (None, Some(var)) => {
                        std::env::var(var).map_err(|_| TokenError::MissingEnv {
                            name: name.clone(),
                            var: var.clone(),
                        })?
                    }
                    _ => return Err(TokenError::Unset { name: name.clone() }),
                };
                if secret.trim().is_empty() {
                    return Err(TokenError::Empty { name: name.clone() });
                }
                Ok(Token {
                    name: name.clone(),
                    digest: digest(secret.as_bytes()),
                    role: t.role,
                })
            })
            .collect::<Result<Vec<Token>, _>>()?;
        // One secret, two names: the log could not say who acted.
        for (i, a) in tokens.iter().enumerate() {
            if let Some(b) = tokens[i + 1..].iter().find(|b| b.digest == a.digest) {
                return Err(TokenError::Shared {
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
        Ok(Tokens { tokens })
    }

    /// The name of the token that allows `need`, `None` when reading is open, or the
    /// refusal to send back.
    pub fn authorize(&self, headers: &HeaderMap, need: Role) -> Result<Option<&str>, ApiError> {
        // Reading is guarded once any token exists (what the admin API shows includes
        // sampled requests and the audit trail); changing, once admin tokens do.
        let guarded = match need {
            Role::Read => !self.tokens.is_empty(),
            Role::Admin => self.tokens.iter().any(|t| t.role == Role::Admin),
        };
        if !guarded {
            return match need {
                Role::Read => Ok(None),
                Role::Admin => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "changes through the admin API are off: configure an admin token, e.g. [server.tokens.ops] token_env = \"MODELYARD_ADMIN_TOKEN\", role = \"admin\"",
                )),
            };
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110).
            .and_then(|v| {
                v.get(..7)
                    .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                    .map(|_| &v[7..])
            })
            .map(|v| digest(v.trim().as_bytes()));
        let Some(given) = given else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the admin API needs 'Authorization: Bearer <token>' with a token from [server.tokens]",
            ));
        };
        // Every token is compared, so the time taken says nothing about which one matched.
        let matched = self.tokens.iter().fold(None, |found, t| {
            if bool::from(t.digest.ct_eq(&given)) {
                Some(t)
            } else {
                found
            }
        });
        match matched {
            Some(t) if t.role >= need => Ok(Some(&t.name)),
            Some(t) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "token '{}' may only read; this needs an admin token",
                    t.name
                ),
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token is not one of [server.tokens]",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(list: &[(&str, &str, Role)]) -> Tokens {
        let config = list
            .iter()
            .map(|(name, token, role)| {
                (
                    name.to_string(),
                    TokenConfig {
                        token: Some(token.to_string()),
                        token_env: None,
                        role: *role,
                    },
                )
            })
            .collect();
        Tokens::new(&config).unwrap()
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn status(result: Result<Option<&str>, ApiError>) -> Option<StatusCode> {
        result.err().map(|e| e.status())
    }

    #[test]
    fn roles_decide_what_a_token_may_do() {
        let none = Tokens::default();
        assert_eq!(none.authorize(&HeaderMap::new(), Role::Read).unwrap(), None);
        assert_eq!(
            status(none.authorize(&HeaderMap::new(), Role::Admin)),
            Some(StatusCode::FORBIDDEN)
        );

        // Once any token exists, reading needs one too; an admin token may read.
        let admin_only = tokens(&[("ops", "s3cret", Role::Admin)]);
        assert_eq!(
            status(admin_only.authorize(&HeaderMap::new(), Role::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            admin_only.authorize(&bearer("s3cret"), Role::Read).unwrap(),
            Some("ops")
        );
        assert_eq!(
            admin_only
                .authorize(&bearer("s3cret"), Role::Admin)
                .unwrap(),
            Some("ops")
        );
        assert_eq!(
            status(admin_only.authorize(&bearer("s3cret!"), Role::Admin)),
            Some(StatusCode::UNAUTHORIZED)
        );

        let both = tokens(&[("ops", "a", Role::Admin), ("dash", "r", Role::Read)]);
        assert_eq!(
            status(both.authorize(&HeaderMap::new(), Role::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            both.authorize(&bearer("r"), Role::Read).unwrap(),
            Some("dash")
        );
        assert_eq!(
            both.authorize(&bearer("a"), Role::Read).unwrap(),
            Some("ops")
        );
        assert_eq!(
            status(both.authorize(&bearer("r"), Role::Admin)),
            Some(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn empty_and_shared_secrets_are_refused_and_the_scheme_is_case_insensitive() {
        let config = |secrets: &[(&str, &str)]| {
            secrets
                .iter()
                .map(|(name, token)| {
                    let token = TokenConfig {
                        token: Some(token.to_string()),
                        token_env: None,
                        role: Role::Admin,
                    };
                    (name.to_string(), token)
                })
                .collect::<BTreeMap<_, _>>()
        };
        assert!(matches!(
            Tokens::new(&config(&[("ops", " ")])),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            Tokens::new(&config(&[("a", "x"), ("b", "x")])),
            Err(TokenError::Shared { .. })
        ));
        let tokens = tokens(&[("ops", "s3cret", Role::Admin)]);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer s3cret".parse().unwrap());
        assert_eq!(
            tokens.authorize(&headers, Role::Admin).unwrap(),
            Some("ops")
        );
    }

    #[test]
    fn a_token_needs_one_source() {
        let config = BTreeMap::from([(
            "ops".to_string(),
            TokenConfig {
                token: None,
                token_env: Some("MODELYARD_TEST_TOKEN_THAT_IS_NOT_SET".to_string()),
                role: Role::Admin,
            },
        )]);
        let error = Tokens::new(&config).err().unwrap().to_string();
        assert!(
            error.contains("MODELYARD_TEST_TOKEN_THAT_IS_NOT_SET"),
            "{error}"
        );
    }
}
