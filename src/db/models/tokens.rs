//! Issued download tokens: their `jti`, a hash of the raw token, and revocation.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{download_progress, token_downloads, tokens};
use crate::error::Result;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = tokens)]
pub struct TokenRow {
    pub jti: String,
    #[serde(skip)]
    pub token_hash: String,
    pub kid: String,
    pub grant_id: String,
    pub user_id: String,
    pub model_id: String,
    pub label: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub max_downloads: Option<i64>,
    pub last_used_at: Option<i64>,
}

pub fn insert(conn: &mut AnyConnection, row: &TokenRow) -> Result<()> {
    diesel::insert_into(tokens::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn find(conn: &mut AnyConnection, jti: &str) -> Result<Option<TokenRow>> {
    Ok(tokens::table
        .find(jti)
        .select(TokenRow::as_select())
        .first(conn)
        .optional()?)
}

/// Revokes one token; returns false when it was unknown or already revoked.
pub fn revoke(conn: &mut AnyConnection, jti: &str, now: i64) -> Result<bool> {
    let n = diesel::update(tokens::table.find(jti).filter(tokens::revoked_at.is_null()))
        .set(tokens::revoked_at.eq(Some(now)))
        .execute(conn)?;
    Ok(n == 1)
}

pub fn list_for_grant(conn: &mut AnyConnection, grant_id: &str) -> Result<Vec<TokenRow>> {
    Ok(tokens::table
        .filter(tokens::grant_id.eq(grant_id))
        .order(tokens::issued_at.desc())
        .select(TokenRow::as_select())
        .load(conn)?)
}

pub fn touch(conn: &mut AnyConnection, jti: &str, now: i64) -> Result<()> {
    diesel::update(tokens::table.find(jti))
        .set(tokens::last_used_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

/// How many distinct files this token has downloaded completely.
pub fn completed_count(conn: &mut AnyConnection, jti: &str) -> Result<i64> {
    Ok(token_downloads::table
        .filter(token_downloads::jti.eq(jti))
        .count()
        .get_result(conn)?)
}

pub fn is_completed(conn: &mut AnyConnection, jti: &str, sha256: &str) -> Result<bool> {
    let n: i64 = token_downloads::table
        .find((jti, sha256))
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}

/// The files (SHA-256) each token (jti) had completed, looked up without copying keys.
#[derive(Default)]
pub struct Completed(std::collections::HashMap<String, std::collections::HashSet<String>>);

impl Completed {
    pub fn contains(&self, jti: &str, sha256: &str) -> bool {
        self.0.get(jti).is_some_and(|files| files.contains(sha256))
    }

    pub fn insert(&mut self, jti: String, sha256: String) {
        self.0.entry(jti).or_default().insert(sha256);
    }

    /// Every (jti, sha256) pair held.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|(jti, files)| files.iter().map(move |f| (jti.as_str(), f.as_str())))
    }
}

/// (jti, sha256) pairs known to be complete, kept in memory: a token's completion of a file
/// is never undone, so a pair once committed stays true. The audit writer adds pairs after
/// each commit; it and the request path then skip the lookups and events that a completed
/// file no longer needs. Bounded: emptied once it holds [`KnownCompleted::MAX`] pairs.
#[derive(Default)]
pub struct KnownCompleted {
    inner: std::sync::RwLock<(Completed, usize)>,
}

impl KnownCompleted {
    pub const MAX: usize = 100_000;

    pub fn contains(&self, jti: &str, sha256: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.0.contains(jti, sha256)
    }

    /// Adds pairs whose completion has been committed.
    pub fn add<'a>(&self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        for (jti, sha256) in pairs {
            if inner.0.contains(jti, sha256) {
                continue;
            }
            if inner.1 >= Self::MAX {
                *inner = Default::default();
            }
            inner.0.insert(jti.to_string(), sha256.to_string());
            inner.1 += 1;
        }
    }
}

/// Of these deliveries, the (jti, sha256) pairs whose file the token had already completed:
/// one query for a whole audit batch instead of one per download.
pub fn completed_among<'a>(
    conn: &mut AnyConnection,
    deliveries: impl Iterator<Item = &'a Delivered>,
) -> Result<Completed> {
    let (mut jtis, mut shas) = (Vec::new(), Vec::new());
    for d in deliveries {
        jtis.push(d.jti.as_str());
        shas.push(d.sha256.as_str());
    }
    if jtis.is_empty() {
        return Ok(Default::default());
    }
    jtis.sort_unstable();
    jtis.dedup();
    shas.sort_unstable();
    shas.dedup();
    // In slices, so that no statement binds more values than SQLite allows.
    let mut done = Completed::default();
    for j in jtis.chunks(500) {
        for s in shas.chunks(500) {
            let pairs: Vec<(String, String)> = token_downloads::table
                .filter(token_downloads::jti.eq_any(j))
                .filter(token_downloads::sha256.eq_any(s))
                .select((token_downloads::jti, token_downloads::sha256))
                .load(conn)?;
            for (jti, sha) in pairs {
                done.insert(jti, sha);
            }
        }
    }
    Ok(done)
}

/// Bytes of one file that a stream delivered under one token.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub jti: String,
    pub sha256: String,
    pub path: String,
    pub size: u64,
    pub range: std::ops::Range<u64>,
}

/// Adds a delivered byte range `[start, end)` of a file; returns true when this completes
/// the file for this token (it then counts against the quota, once).
pub fn record_delivery(conn: &mut AnyConnection, d: &Delivered, now: i64) -> Result<bool> {
    let (jti, sha256, path, size) = (d.jti.as_str(), d.sha256.as_str(), d.path.as_str(), d.size);
    let (start, end) = (d.range.start, d.range.end);
    if is_completed(conn, jti, sha256)? {
        return Ok(false);
    }
    let existing: Option<String> = download_progress::table
        .find((jti, sha256))
        .select(download_progress::ranges)
        .first(conn)
        .optional()?;
    let mut ranges: Vec<(u64, u64)> = existing
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    ranges.push((start, end));
    let merged = merge(ranges);
    if merged.first() == Some(&(0, size)) || size == 0 {
        diesel::delete(download_progress::table.find((jti, sha256))).execute(conn)?;
        diesel::insert_into(token_downloads::table)
            .values((
                token_downloads::jti.eq(jti),
                token_downloads::sha256.eq(sha256),
                token_downloads::path.eq(path),
                token_downloads::completed_at.eq(now),
            ))
            .execute(conn)?;
        return Ok(true);
    }
    let text = serde_json::to_string(&merged).unwrap_or_else(|_| "[]".into());
    if existing.is_some() {
        diesel::update(download_progress::table.find((jti, sha256)))
            .set((
                download_progress::ranges.eq(&text),
                download_progress::updated_at.eq(now),
            ))
            .execute(conn)?;
    } else {
        diesel::insert_into(download_progress::table)
            .values((
                download_progress::jti.eq(jti),
                download_progress::sha256.eq(sha256),
                download_progress::ranges.eq(&text),
                download_progress::updated_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(false)
}

/// Sorted, non-overlapping, with touching ranges joined.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(a, b)| a < b);
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// A started file keeps its place in the quota while it was touched this recently (seconds):
/// long enough to resume, short enough that an abandoned start frees its place.
pub const RESUME_WINDOW_SECS: i64 = 900;

/// Takes (or confirms) a place in the token's quota for the file `sha256`, inside the
/// caller's transaction; returns the places left, or `None` when the quota is used up.
pub fn reserve(
    conn: &mut AnyConnection,
    jti: &str,
    sha256: &str,
    max: i64,
    now: i64,
) -> Result<Option<i64>> {
    if let AnyConnection::Postgresql(pg) = conn {
        // Serialise reservations of one token across replicas (SQLite has its write lock).
        diesel::sql_query("SELECT jti FROM tokens WHERE jti = $1 FOR UPDATE")
            .bind::<diesel::sql_types::Text, _>(jti)
            .execute(pg)?;
    }
    let completed = completed_count(conn, jti)?;
    let active: i64 = download_progress::table
        .filter(download_progress::jti.eq(jti))
        .filter(download_progress::updated_at.gt(now - RESUME_WINDOW_SECS))
        .count()
        .get_result(conn)?;
    let used = completed + active;
    if is_completed(conn, jti, sha256)? {
        return Ok(Some((max - used).max(0)));
    }
    let touched = diesel::update(download_progress::table.find((jti, sha256)))
        .set(download_progress::updated_at.eq(now))
        .execute(conn)?;
    if touched > 0 {
        // Already holds a place (a file in progress may always continue).
        return Ok(Some((max - used).max(0)));
    }
    if used >= max {
        return Ok(None);
    }
    diesel::insert_into(download_progress::table)
        .values((
            download_progress::jti.eq(jti),
            download_progress::sha256.eq(sha256),
            download_progress::ranges.eq("[]"),
            download_progress::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(Some(max - used - 1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn merging_ranges() {
        assert_eq!(
            super::merge(vec![(10, 20), (0, 10), (30, 40), (15, 25), (5, 5)]),
            vec![(0, 25), (30, 40)]
        );
    }

    use super::KnownCompleted;

    #[test]
    fn known_pairs_are_remembered_until_the_cap_empties_them() {
        let k = KnownCompleted::default();
        assert!(!k.contains("j1", "s1"));
        k.add([("j1", "s1"), ("j1", "s2"), ("j2", "s1"), ("j1", "s1")]);
        assert!(k.contains("j1", "s1") && k.contains("j1", "s2") && k.contains("j2", "s1"));
        assert!(!k.contains("j2", "s2"), "pairs, not the cross product");
        let many: Vec<(String, String)> = (0..KnownCompleted::MAX)
            .map(|i| (format!("t{i}"), "s".to_string()))
            .collect();
        k.add(many.iter().map(|(a, b)| (a.as_str(), b.as_str())));
        assert!(k.contains("t99999", "s"), "the newest pair is kept");
        assert!(
            !k.contains("j1", "s1"),
            "passing the cap empties the older pairs"
        );
    }
}
