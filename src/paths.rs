//! Names that come from outside: repo ids, revision names and file paths inside a repo.
//! Everything is checked here before it reaches the database or storage.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What a URL path segment must escape: everything but RFC 3986's unreserved characters.
pub const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes a repo path for a URL, segment by segment (slashes kept).
pub fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

use crate::error::{Error, Result};

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `ORG/NAME`, each part letters, digits, `-`, `_`, `.` (as on the Hub).
pub fn validate_repo_id(id: &str) -> Result<()> {
    match id.split_once('/') {
        Some((org, name)) if name_ok(org) && name_ok(name) => Ok(()),
        _ => Err(Error::invalid_field(
            "model",
            format!("{id:?} is not ORG/NAME (letters, digits, '-', '_', '.')"),
        )),
    }
}

/// A branch name such as `main` (no slashes stored; `refs/…` forms are not supported).
pub fn validate_ref_name(name: &str) -> Result<()> {
    if name_ok(name) && !(name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(())
    } else {
        Err(Error::invalid_field(
            "revision",
            format!("{name:?} is not a valid branch name"),
        ))
    }
}

/// A relative path inside a repo: `/`-separated, no empty, `.` or `..` segments, no
/// backslashes or control characters.
pub fn validate_file_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::bad_request("bad_path", format!("{path:?}: {why}")));
    if path.is_empty() || path.len() > 1024 {
        return bad("a path must have 1 to 1024 bytes");
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control characters and backslashes are not allowed");
    }
    if path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return bad("empty, '.' and '..' segments are not allowed");
    }
    Ok(())
}

/// Percent-decodes one URL path segment (or a `/`-keeping path) into UTF-8.
pub fn decode(raw: &str, what: &str) -> Result<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Error::bad_request(
                "bad_path",
                format!("{what} is not valid UTF-8 once decoded"),
            )
        })
}

/// Longest revision (branch, tag or commit) a request may name.
pub const MAX_REVISION: usize = 255;

/// A revision as a request names it: 1 to [`MAX_REVISION`] bytes, no control characters.
/// (Checked before it is looked up or written to the audit log.)
pub fn validate_revision(rev: &str) -> Result<()> {
    if rev.is_empty() || rev.len() > MAX_REVISION || rev.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "bad_revision",
            format!("a revision must have 1 to {MAX_REVISION} bytes and no control characters"),
        ));
    }
    Ok(())
}

/// Percent-decodes a revision taken from a URL path segment and checks it.
pub fn decode_revision(raw: &str) -> Result<String> {
    let rev = decode(raw, "revision")?;
    validate_revision(&rev)?;
    Ok(rev)
}

/// Splits the raw (still encoded) tail after `/resolve/` into the revision (one segment,
/// where `%2F` may stand for `/`) and the decoded file path.
pub fn split_resolve_tail(raw_tail: &str) -> Result<(String, String)> {
    let (rev, path) = raw_tail
        .split_once('/')
        .ok_or_else(|| Error::bad_request("bad_path", "expected /resolve/{revision}/{path}"))?;
    let rev = decode_revision(rev)?;
    let path = decode(path, "path")?;
    validate_file_path(&path)?;
    Ok((rev, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(validate_repo_id("meta/llama-3.1_8B").is_ok());
        for bad in [
            "",
            "a",
            "a/",
            "/b",
            "a/b/c",
            "../b",
            "a/..",
            "a/.hidden",
            "a b/c",
            "a/b%2f",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn file_paths() {
        assert!(validate_file_path("model-00001-of-00002.safetensors").is_ok());
        assert!(validate_file_path("tokenizer/vocab é+.txt").is_ok());
        for bad in [
            "",
            "../etc/passwd",
            "a/../../b",
            "/abs",
            "a//b",
            "a/./b",
            "a\\b",
            "a\0b",
            "x/",
        ] {
            assert!(validate_file_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolve_tails() {
        assert_eq!(
            split_resolve_tail("refs%2Fpr%2F1/a%20b%2B%C3%A9/c.bin").unwrap(),
            ("refs/pr/1".to_string(), "a b+é/c.bin".to_string())
        );
        assert!(split_resolve_tail("main/%2E%2E/secret").is_err());
        assert!(split_resolve_tail("main/..%2Fsecret").is_err());
        assert!(split_resolve_tail("main").is_err());
        assert!(split_resolve_tail("main/%FF").is_err());
        // Revisions: not empty, at most MAX_REVISION bytes, no control characters.
        assert!(split_resolve_tail("/c.bin").is_err());
        assert!(split_resolve_tail("ma%0Ain/c.bin").is_err());
        let longest = "r".repeat(MAX_REVISION);
        assert!(split_resolve_tail(&format!("{longest}/c.bin")).is_ok());
        assert!(split_resolve_tail(&format!("{longest}r/c.bin")).is_err());
    }
}
