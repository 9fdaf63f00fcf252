//! `weightgate download` (and `apply`, `status`): the researcher's client. It reads the
//! revision's manifest, fetches every block with a Range request (several at once), checks
//! each block's BLAKE3 as it arrives, writes verified blocks into a partial file whose block
//! map survives a crash, and moves a file into place only once its SHA-256 matches. Error
//! answers are never written to disk; each kind of refusal has its own exit code.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use crate::paths;

/// Exit codes, documented in `weightgate download --help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const NO_ACCESS: u8 = 3;
    pub const PENDING: u8 = 4;
    pub const REJECTED: u8 = 5;
    pub const EXPIRED: u8 = 6;
    pub const REVOKED: u8 = 7;
    pub const QUOTA: u8 = 8;
    pub const INTEGRITY: u8 = 9;
    pub const NOT_FOUND: u8 = 10;
    pub const UNAVAILABLE: u8 = 11;
}

/// The largest block a manifest may ask the client to hold in memory.
const MAX_BLOCK_SIZE: u64 = 256 << 20;

pub const EXIT_CODES_HELP: &str = "Exit codes: 0 every file verified; 1 other failure; 3 no access (missing, invalid or wrong token, never applied); 4 application awaiting confirmation or review; 5 application rejected; 6 token or access expired; 7 token or access revoked; 8 download quota used up; 9 integrity failure (server or local verification); 10 model, revision or file not found; 11 server unreachable or unavailable.";

/// A failure with its exit code and one line that says what to do.
#[derive(Debug)]
pub struct ClientError {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

fn fail(code: u8, message: impl Into<String>) -> ClientError {
    ClientError {
        code,
        message: message.into(),
    }
}

/// Turns a refusal from the server into an exit code and advice.
fn refusal(status: u16, body: &str, what: &str) -> ClientError {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let code = v["error"].as_str().unwrap_or("");
    let msg = v["message"].as_str().unwrap_or("").to_string();
    let (exit, advice) = match code {
        "token_missing" => (
            exit::NO_ACCESS,
            "Pass your token with --token or WEIGHTGATE_TOKEN.",
        ),
        "invalid_token" | "token_scope" | "not_applied" | "link_scope" => (
            exit::NO_ACCESS,
            "Check the token, or apply for access on the model's page.",
        ),
        "application_pending" | "application_unconfirmed" => (
            exit::PENDING,
            "Wait for the decision email, then issue a token from your status page.",
        ),
        "application_rejected" => (exit::REJECTED, "See the reason on your status page."),
        "token_expired" | "grant_expired" => (
            exit::EXPIRED,
            "Issue a new token from your status page, or apply again.",
        ),
        "token_revoked" | "grant_revoked" | "user_deleted" => (
            exit::REVOKED,
            "Issue a new token from your status page, or contact the model's administrators.",
        ),
        "quota_exhausted" => (exit::QUOTA, "Issue a new token from your status page."),
        "quarantined" => (
            exit::INTEGRITY,
            "The server withholds this file until its administrators restore it; try again later.",
        ),
        "repo_not_found" | "revision_not_found" | "entry_not_found" | "model_not_found"
        | "not_found" => (exit::NOT_FOUND, "Check the model name and revision."),
        "storage_unavailable" | "database_unavailable" => (exit::UNAVAILABLE, "Try again shortly."),
        _ if status >= 500 => (exit::UNAVAILABLE, "Try again shortly."),
        _ => (exit::FAILED, ""),
    };
    let text = if msg.is_empty() {
        format!("HTTP {status}")
    } else {
        msg
    };
    fail(exit, format!("{what}: {text} {advice}").trim().to_string())
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub block_size: u64,
    pub block_algo: String,
    pub block_hashes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub commit: String,
    pub files: Vec<ManifestFile>,
}

/// What to download and where.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    pub endpoint: String,
    pub repo: String,
    pub revision: String,
    pub token: Option<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub dir: PathBuf,
    pub parallel: usize,
    pub progress: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub commit: String,
    pub files: Vec<(String, String)>,
    pub skipped: usize,
    pub blocks_fetched: usize,
}

fn client() -> Result<reqwest::blocking::Client, ClientError> {
    reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(15))
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .map_err(|e| fail(exit::FAILED, format!("HTTP client: {e}")))
}

fn unreachable_err(e: reqwest::Error, endpoint: &str) -> ClientError {
    fail(exit::UNAVAILABLE, format!("cannot reach {endpoint}: {e}"))
}

pub fn fetch_manifest(
    http: &reqwest::blocking::Client,
    endpoint: &str,
    repo: &str,
    revision: &str,
) -> Result<Manifest, ClientError> {
    paths::validate_repo_id(repo).map_err(|e| fail(exit::FAILED, e.message))?;
    let url = format!(
        "{endpoint}/api/v1/models/{repo}/manifest?revision={}",
        percent_encoding::utf8_percent_encode(revision, paths::SEGMENT)
    );
    let r = http
        .get(&url)
        .send()
        .map_err(|e| unreachable_err(e, endpoint))?;
    let status = r.status().as_u16();
    let body = r.text().map_err(|e| unreachable_err(e, endpoint))?;
    if status != 200 {
        return Err(refusal(status, &body, &format!("{repo}@{revision}")));
    }
    let m: Manifest = serde_json::from_str(&body).map_err(|e| {
        fail(
            exit::FAILED,
            format!("the server's manifest is not readable: {e}"),
        )
    })?;
    for f in &m.files {
        // The manifest comes from the network: its paths must stay inside the target folder.
        paths::validate_file_path(&f.path).map_err(|e| {
            fail(
                exit::INTEGRITY,
                format!("refusing a manifest entry: {}", e.message),
            )
        })?;
        // The SHA-256 names the partial file on disk: it must be a plain hex digest, and a
        // block must fit in memory.
        if f.sha256.len() != 64
            || !f
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(fail(
                exit::INTEGRITY,
                format!("{}: the manifest's SHA-256 is not a hex digest", f.path),
            ));
        }
        if f.block_hashes.is_empty() && f.size > 0 {
            return Err(fail(
                exit::UNAVAILABLE,
                format!(
                    "{}: the server has not pulled this file from its upstream yet, so it has no block list; fetch it once (curl, wget or hf download), then run this again",
                    f.path
                ),
            ));
        }
        if f.block_algo != "blake3"
            || f.block_size == 0
            || f.block_size > MAX_BLOCK_SIZE
            || f.block_hashes.len() as u64 != f.size.div_ceil(f.block_size)
        {
            return Err(fail(
                exit::INTEGRITY,
                format!(
                    "{}: the manifest's block list does not fit the file",
                    f.path
                ),
            ));
        }
    }
    Ok(m)
}

fn globs(patterns: &[String]) -> Result<Option<globset::GlobSet>, ClientError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        b.add(globset::Glob::new(p).map_err(|e| fail(exit::FAILED, format!("{p}: {e}")))?);
    }
    b.build()
        .map(Some)
        .map_err(|e| fail(exit::FAILED, e.to_string()))
}

/// One file's download state on disk: the partial bytes and a map with one byte per block
/// ('1' once the block is verified and written).
struct Partial {
    data: File,
    map: File,
    verified: Vec<bool>,
}

fn state_dir(dir: &Path) -> PathBuf {
    dir.join(".weightgate").join("partial")
}

impl Partial {
    fn open(dir: &Path, f: &ManifestFile) -> std::io::Result<Partial> {
        let sd = state_dir(dir);
        fs::create_dir_all(&sd)?;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(sd.join(&f.sha256))?;
        data.set_len(f.size)?;
        let mut map = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(sd.join(format!("{}.blocks", f.sha256)))?;
        let n = f.block_hashes.len();
        let mut bytes = Vec::new();
        map.read_to_end(&mut bytes)?;
        bytes.resize(n, b'0');
        // Trust nothing on disk blindly: a block counts as done only if it still hashes right.
        let mut verified = vec![false; n];
        let mut buf = vec![0u8; f.block_size as usize];
        for (i, done) in verified.iter_mut().enumerate() {
            if bytes[i] != b'1' {
                continue;
            }
            let (start, len) = block_span(f, i);
            let piece = &mut buf[..len];
            if data.read_exact_at(piece, start).is_ok()
                && blake3::hash(piece).to_hex().as_str() == f.block_hashes[i]
            {
                *done = true;
            } else {
                bytes[i] = b'0';
            }
        }
        map.set_len(0)?;
        map.write_all_at(&bytes, 0)?;
        Ok(Partial {
            data,
            map,
            verified,
        })
    }

    fn record(&mut self, i: usize) -> std::io::Result<()> {
        self.data.sync_data()?;
        self.map.write_all_at(b"1", i as u64)?;
        self.verified[i] = true;
        Ok(())
    }
}

fn block_span(f: &ManifestFile, i: usize) -> (u64, usize) {
    let start = i as u64 * f.block_size;
    (start, (f.size - start).min(f.block_size) as usize)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    crate::util::sha256_of_reader(File::open(path)?, |_| ())
}

struct Job {
    file: usize,
    block: usize,
}

/// Downloads a revision (or the selected files) into `req.dir`.
pub fn download(req: &DownloadRequest) -> Result<Report, ClientError> {
    let http = client()?;
    let manifest = fetch_manifest(&http, &req.endpoint, &req.repo, &req.revision)?;
    let include = globs(&req.include)?;
    let exclude = globs(&req.exclude)?;
    let files: Vec<ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| include.as_ref().is_none_or(|g| g.is_match(&f.path)))
        .filter(|f| exclude.as_ref().is_none_or(|g| !g.is_match(&f.path)))
        .cloned()
        .collect();
    if files.is_empty() {
        return Err(fail(
            exit::NOT_FOUND,
            "no file of this revision matches --include/--exclude",
        ));
    }
    fs::create_dir_all(&req.dir)
        .map_err(|e| fail(exit::FAILED, format!("{}: {e}", req.dir.display())))?;

    let progress = Progress::new(req.progress, files.iter().map(|f| f.size).sum());
    let mut partials: Vec<Option<Mutex<Partial>>> = Vec::new();
    let mut queue = VecDeque::new();
    let mut skipped = 0;
    for (i, f) in files.iter().enumerate() {
        let dest = req.dir.join(&f.path);
        if dest.is_file()
            && fs::metadata(&dest).map(|m| m.len()).ok() == Some(f.size)
            && sha256_file(&dest).ok().as_deref() == Some(f.sha256.as_str())
        {
            skipped += 1;
            progress.skip(&f.path, f.size);
            partials.push(None);
            continue;
        }
        let p = Partial::open(&req.dir, f)
            .map_err(|e| fail(exit::FAILED, format!("{}: {e}", f.path)))?;
        for (b, done) in p.verified.iter().enumerate() {
            if *done {
                progress.add(block_span(f, b).1 as u64);
            } else {
                queue.push_back(Job { file: i, block: b });
            }
        }
        partials.push(Some(Mutex::new(p)));
    }

    let queue = Mutex::new(queue);
    let failure: Mutex<Option<ClientError>> = Mutex::new(None);
    let fetched = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..req.parallel.clamp(1, 16) {
            scope.spawn(|| {
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let Some(job) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                        return;
                    };
                    let f = &files[job.file];
                    match fetch_block(&http, req, &manifest.commit, f, job.block) {
                        Ok(bytes) => {
                            let (start, _) = block_span(f, job.block);
                            let written = partials[job.file].as_ref().map(|m| {
                                let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
                                p.data
                                    .write_all_at(&bytes, start)
                                    .and_then(|_| p.record(job.block))
                            });
                            if let Some(Err(e)) = written {
                                *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(fail(exit::FAILED, format!("{}: {e}", f.path)));
                                return;
                            }
                            fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            progress.add_file(job.file, f, bytes.len() as u64);
                        }
                        Err(e) => {
                            let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
                            if slot.is_none() {
                                *slot = Some(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        progress.abandon();
        return Err(e);
    }

    // Every block verified: check each whole file and move it into place.
    let mut done = Vec::new();
    // Files with the same content share one partial: the first is moved, the rest copied.
    let mut placed: std::collections::HashMap<&str, PathBuf> = Default::default();
    for (i, f) in files.iter().enumerate() {
        let dest = req.dir.join(&f.path);
        if let (Some(_), Some(first)) = (&partials[i], placed.get(f.sha256.as_str())) {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| fail(exit::FAILED, format!("{}: {e}", parent.display())))?;
            }
            fs::copy(first, &dest)
                .map_err(|e| fail(exit::FAILED, format!("{}: {e}", dest.display())))?;
            progress.finish_file(i, &f.path);
        } else if partials[i].is_some() {
            let sd = state_dir(&req.dir);
            let part = sd.join(&f.sha256);
            let actual =
                sha256_file(&part).map_err(|e| fail(exit::FAILED, format!("{}: {e}", f.path)))?;
            if actual != f.sha256 {
                let _ = fs::remove_file(sd.join(format!("{}.blocks", f.sha256)));
                return Err(fail(
                    exit::INTEGRITY,
                    format!(
                        "{}: every block verified but the whole file's SHA-256 is {actual}, not {}; run the command again",
                        f.path, f.sha256
                    ),
                ));
            }
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| fail(exit::FAILED, format!("{}: {e}", parent.display())))?;
            }
            fs::rename(&part, &dest)
                .map_err(|e| fail(exit::FAILED, format!("{}: {e}", dest.display())))?;
            let _ = fs::remove_file(sd.join(format!("{}.blocks", f.sha256)));
            placed.insert(&f.sha256, dest.clone());
            progress.finish_file(i, &f.path);
        }
        done.push((f.path.clone(), f.sha256.clone()));
    }
    let sums: String = done.iter().map(|(p, s)| format!("{s}  {p}\n")).collect();
    fs::write(req.dir.join("SHA256SUMS"), sums)
        .map_err(|e| fail(exit::FAILED, format!("SHA256SUMS: {e}")))?;
    let _ = fs::remove_dir(state_dir(&req.dir));
    let _ = fs::remove_dir(req.dir.join(".weightgate"));
    progress.done();
    Ok(Report {
        commit: manifest.commit,
        files: done,
        skipped,
        blocks_fetched: fetched.into_inner(),
    })
}

/// Fetches one block with a Range request and checks its BLAKE3; a wrong block is fetched
/// once more before the file is given up.
/// Blocks are fetched by commit, so a branch moving meanwhile cannot mix revisions.
fn fetch_block(
    http: &reqwest::blocking::Client,
    req: &DownloadRequest,
    commit: &str,
    f: &ManifestFile,
    block: usize,
) -> Result<Vec<u8>, ClientError> {
    let (start, len) = block_span(f, block);
    let url = format!(
        "{}/{}/resolve/{commit}/{}",
        req.endpoint,
        req.repo,
        paths::encode_path(&f.path)
    );
    for attempt in 0..2 {
        let mut r = http
            .get(&url)
            .header("Range", format!("bytes={start}-{}", start + len as u64 - 1));
        if let Some(t) = &req.token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().map_err(|e| unreachable_err(e, &req.endpoint))?;
        let status = resp.status().as_u16();
        if status != 206 && !(status == 200 && start == 0 && len as u64 == f.size) {
            let body = resp.text().unwrap_or_default();
            return Err(refusal(status, &body, &f.path));
        }
        let bytes = match resp.bytes() {
            Ok(b) => b,
            Err(e) if attempt == 0 => {
                tracing::warn!(path = %f.path, block, error = %e, "transfer cut; fetching the block again");
                continue;
            }
            Err(e) => {
                return Err(fail(
                    exit::UNAVAILABLE,
                    format!("{}: the transfer failed twice: {e}", f.path),
                ));
            }
        };
        if bytes.len() == len && blake3::hash(&bytes).to_hex().as_str() == f.block_hashes[block] {
            return Ok(bytes.to_vec());
        }
        tracing::warn!(path = %f.path, block, "block did not verify; fetching it again");
    }
    Err(fail(
        exit::INTEGRITY,
        format!(
            "{}: block {block} did not match the manifest twice; the file was not written",
            f.path
        ),
    ))
}

/// Bars on a terminal (one per file being fetched, and a total), plain lines otherwise.
struct Progress {
    bars: Option<(indicatif::MultiProgress, indicatif::ProgressBar)>,
    files: Mutex<std::collections::HashMap<usize, indicatif::ProgressBar>>,
}

impl Progress {
    fn new(show_bars: bool, total: u64) -> Progress {
        let files = Mutex::new(std::collections::HashMap::new());
        if !show_bars {
            return Progress { bars: None, files };
        }
        let multi = indicatif::MultiProgress::new();
        let bar = multi.add(indicatif::ProgressBar::new(total));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "total {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Progress {
            bars: Some((multi, bar)),
            files,
        }
    }

    fn add(&self, n: u64) {
        if let Some((_, bar)) = &self.bars {
            bar.inc(n);
        }
    }

    fn add_file(&self, i: usize, f: &ManifestFile, n: u64) {
        self.add(n);
        if let Some((multi, _)) = &self.bars {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            let bar = files.entry(i).or_insert_with(|| {
                let b = multi.insert(0, indicatif::ProgressBar::new(f.size));
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_message(f.path.clone());
                b
            });
            bar.inc(n);
        }
    }

    fn skip(&self, path: &str, size: u64) {
        match &self.bars {
            Some((multi, bar)) => {
                bar.inc(size);
                let _ = multi.println(format!("already complete: {path}"));
            }
            None => eprintln!("already complete: {path}"),
        }
    }

    fn finish_file(&self, i: usize, path: &str) {
        if let Some(b) = self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&i)
        {
            b.finish_and_clear();
        }
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(format!("verified: {path}"));
            }
            None => eprintln!("verified: {path}"),
        }
    }

    fn abandon(&self) {
        if let Some((_, bar)) = &self.bars {
            bar.abandon();
        }
    }

    fn done(&self) {
        if let Some((_, bar)) = &self.bars {
            bar.finish_and_clear();
        }
    }
}

/// What `weightgate apply` sends.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub endpoint: String,
    pub repo: String,
    pub name: String,
    pub email: String,
    pub affiliation: String,
    pub country: String,
    pub intended_use: String,
    pub answers: Vec<(String, String)>,
}

/// Submits an application; returns the server's answer (id, status, status_url).
pub fn apply(req: &ApplyRequest) -> Result<serde_json::Value, ClientError> {
    paths::validate_repo_id(&req.repo).map_err(|e| fail(exit::FAILED, e.message))?;
    let answers: serde_json::Map<String, serde_json::Value> = req
        .answers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let body = serde_json::json!({
        "name": req.name, "email": req.email, "affiliation": req.affiliation, "country": req.country,
        "intended_use": req.intended_use, "accept_license": true, "answers": answers,
    });
    let r = client()?
        .post(format!(
            "{}/api/v1/models/{}/applications",
            req.endpoint, req.repo
        ))
        .json(&body)
        .send()
        .map_err(|e| unreachable_err(e, &req.endpoint))?;
    let status = r.status().as_u16();
    let text = r.text().map_err(|e| unreachable_err(e, &req.endpoint))?;
    if status != 201 {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(fail(
            if status == 404 {
                exit::NOT_FOUND
            } else {
                exit::FAILED
            },
            msg,
        ));
    }
    serde_json::from_str(&text).map_err(|e| fail(exit::FAILED, format!("unexpected answer: {e}")))
}

/// Reads an application's status through its status link.
pub fn status(link: &str) -> Result<serde_json::Value, ClientError> {
    let url = reqwest::Url::parse(link).map_err(|e| fail(exit::FAILED, format!("--link: {e}")))?;
    if !url.path().starts_with("/applications/") {
        return Err(fail(
            exit::FAILED,
            "--link must be the status link from your email (…/applications/ID?key=…)",
        ));
    }
    let r = client()?
        .get(url)
        .header("Accept", "application/json")
        .send()
        .map_err(|e| unreachable_err(e, link))?;
    let code = r.status().as_u16();
    let text = r.text().map_err(|e| unreachable_err(e, link))?;
    if code != 200 {
        return Err(refusal(code, &text, "status"));
    }
    serde_json::from_str(&text).map_err(|e| fail(exit::FAILED, format!("unexpected answer: {e}")))
}
