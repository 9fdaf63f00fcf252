//! Rows and the queries that touch them, one file per group of tables.

pub mod access;
pub mod admins;
pub mod audit;
pub mod catalog;
pub mod kv;
pub mod outbox;
pub mod sessions;
pub mod tokens;
pub mod webhooks;
