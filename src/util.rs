//! Small helpers shared across modules: clocks, random identifiers, digests, durations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::RngExt;

/// Seconds since the Unix epoch.
/// The process's limit on open files: (soft, hard), or `None` when it cannot be read.
fn open_files() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and reads nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// The soft limit on open files, or 1024 when it cannot be read.
pub fn open_files_limit() -> usize {
    open_files().map_or(1024, |l| usize::try_from(l.rlim_cur).unwrap_or(usize::MAX))
}

/// Raises the soft limit on open files to the hard limit, as servers commonly do: each
/// connection, stream and small-file copy (`storage::small`) holds a file descriptor, and
/// the soft limit is often 1024.
pub fn raise_open_files_limit() {
    if let Some(mut lim) = open_files().filter(|l| l.rlim_cur < l.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads only the struct it is given.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The first `max` bytes of `s` at most, cut at a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random identifier: `bytes` random bytes, hex-encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex_lower(&buf)
}

/// Lower-case hex of `bytes` (as `hex::encode`, without its per-character iterator).
pub fn hex_lower(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    // The output is exactly twice the input's length, which is all this can fail on.
    let _ = hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// A random URL-safe secret of 32 bytes (256 bits), base64url without padding.
pub fn random_secret() -> String {
    let mut buf = [0u8; 32];
    rand::rng().fill(&mut buf[..]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Lower-case hex SHA-256 of `data`; how every bearer secret is stored.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    hex_lower(&sha256(data.as_ref()))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finish()
}

/// The SHA-256 (lower-case hex) of everything `from` reads, in 1 MiB reads; `progress` is
/// told the size of each (for a progress bar).
pub fn sha256_of_reader(
    mut from: impl std::io::Read,
    mut progress: impl FnMut(u64),
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(hex_lower(&h.finish()))
}

/// An incremental SHA-256, computed by aws-lc: its assembly uses the CPU's SHA instructions
/// where there are some, and vector (AVX) code where there are not. (The `sha2` crate falls
/// back to portable code without SHA instructions: 2.2 times slower on such a Xeon, where it
/// was the largest single cost of an import and of the audit writer.)
pub struct Sha256(aws_lc_rs::digest::Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

/// Constant-time equality for secrets and their hashes.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses "30d", "12h", "90m", "3600s" or "1w" (humantime syntax); zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(d)
}

/// RFC 3339 UTC with milliseconds, as the Hub formats times (`2026-01-02T03:04:05.000Z`).
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_and_is_incremental() {
        // FIPS 180-2's two-block example, whole and cut across the block boundary.
        let msg = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        let expected = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
        assert_eq!(sha256_hex(msg), expected);
        for cut in [0, 1, 55, 56, msg.len()] {
            let mut h = Sha256::new();
            h.update(&msg[..cut]);
            h.update(&msg[cut..]);
            assert_eq!(hex_lower(&h.finish()), expected, "cut at {cut}");
        }
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // A reader longer than one read, with its progress counted.
        let long: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i % 251) as u8).collect();
        let mut seen = 0;
        let hex = sha256_of_reader(&long[..], |n| seen += n).unwrap();
        assert_eq!(hex, sha256_hex(&long));
        assert_eq!(seen, long.len() as u64);
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("abcdef", 4), "abcd");
        assert_eq!(clip("abc", 10), "abc");
        // "é" is two bytes: a cut inside it falls back before it.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("", 3), "");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(
            parse_duration("12h").unwrap(),
            Duration::from_secs(12 * 3600)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn hub_time_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
