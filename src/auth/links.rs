//! Signed links: a short-lived URL for one file, minted with a valid token, so that plain
//! `wget` or a browser can fetch it without the long-lived token in the URL. A link is an
//! EdDSA JWT naming the model, commit, path and the token (`tok` = its jti) it came from;
//! it is honoured only while that token and its grant are.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use super::access::TokenPolicy;
use super::keys::Keyring;
use crate::error::{Error, HubCode, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    /// The jti of the token that minted the link.
    pub tok: String,
    pub model: String,
    pub rev: String,
    pub path: String,
}

/// The audience of links, distinct from tokens' so neither can stand in for the other.
pub fn audience(policy: &TokenPolicy) -> String {
    format!("{}:link", policy.audience)
}

pub fn sign(keys: &Keyring, claims: &LinkClaims) -> Result<String> {
    let (kid, key) = keys
        .signing()
        .ok_or_else(|| Error::internal("no signing key loaded"))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid);
    jsonwebtoken::encode(&header, claims, &key)
        .map_err(|e| Error::internal(format!("link sign: {e}")))
}

pub fn verify(keys: &Keyring, link: &str, policy: &TokenPolicy) -> Result<LinkClaims> {
    let invalid = || {
        Error::unauthorized("invalid_link", "This signed link is not valid.")
            .hub(HubCode::GatedRepo)
    };
    if link.len() > super::tokens::MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let header = jsonwebtoken::decode_header(link).map_err(|_| invalid())?;
    if header.alg != Algorithm::EdDSA {
        return Err(invalid());
    }
    let key = keys
        .public(header.kid.as_deref().ok_or_else(invalid)?)
        .ok_or_else(invalid)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.leeway = policy.leeway;
    v.set_audience(&[audience(policy)]);
    v.set_issuer(&[&policy.issuer]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    match jsonwebtoken::decode::<LinkClaims>(link, &key.decoding, &v) {
        Ok(d) => Ok(d.claims),
        Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(Error::unauthorized(
            "link_expired",
            "This signed link has expired; mint a new one with your token.",
        )
        .hub(HubCode::GatedRepo)),
        Err(_) => Err(invalid()),
    }
}
