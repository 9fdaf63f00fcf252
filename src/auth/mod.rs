//! Who may do what: signing keys and JWKS, download tokens, and the check that a token
//! still opens a model's files.

pub mod access;
pub mod admin;
pub mod keys;
pub mod links;
pub mod session;
pub mod tokens;
