//! Download tokens: EdDSA-signed JWTs bound to one grant. The algorithm comes from the
//! server, never from the token; the raw token is never stored, only its `jti` and hash.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use super::keys::Keyring;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// Repo ids this token opens.
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downloads: Option<i64>,
}

/// Signs `claims` with the current key; returns the compact token and the key id used.
pub fn sign(keys: &Keyring, claims: &Claims) -> Result<(String, String)> {
    let (kid, key) = keys
        .signing()
        .ok_or_else(|| Error::internal("no signing key loaded"))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.clone());
    let token = jsonwebtoken::encode(&header, claims, &key)
        .map_err(|e| Error::internal(format!("jwt sign: {e}")))?;
    Ok((token, kid))
}

pub const INVALID_CREDENTIALS: &str = "Invalid credentials in Authorization header";

/// Longer bearer values are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Checks signature, key id, times (with `leeway` seconds), issuer and audience.
pub fn verify(
    keys: &Keyring,
    token: &str,
    issuer: &str,
    audience: &str,
    leeway: u64,
) -> Result<Claims> {
    let invalid = || Error::unauthorized("invalid_token", INVALID_CREDENTIALS);
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
    if header.alg != Algorithm::EdDSA {
        return Err(invalid());
    }
    let kid = header.kid.ok_or_else(invalid)?;
    let key = keys.public(&kid).ok_or_else(invalid)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.leeway = leeway;
    v.validate_nbf = true;
    v.set_audience(&[audience]);
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "nbf", "iat", "aud", "iss", "sub", "jti"]);
    match jsonwebtoken::decode::<Claims>(token, &key.decoding, &v) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::ExpiredSignature => Error::unauthorized(
                "token_expired",
                "Your download token has expired. Issue a new one from your application's status page.",
            ),
            ErrorKind::ImmatureSignature => Error::unauthorized(
                "token_not_yet_valid",
                "This download token is not valid yet.",
            ),
            _ => invalid(),
        }),
    }
}
