//! Streaming one file: bytes go from the network to a writer thread that hashes and writes them,
//! so hashing overlaps the download and no file is read twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::GetOptions;
use sha2::{Digest, Sha256};

use super::cache::FileIdentity;
use super::store::{Remote, Store};
use super::{PullError, PullOptions};

pub struct Got {
    pub size: u64,
    pub sha256: String,
}

enum Failure {
    /// Worth another attempt: connection reset, 5xx after the client's own retries, a stall,
    /// a body shorter than announced.
    Transient(String),
    Permanent(PullError),
}

pub async fn download(
    store: &Store,
    remote: &Remote,
    target: &Path,
    uri: &str,
    opts: &PullOptions,
) -> Result<Got, PullError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download_once(store, remote, target, uri, opts).await {
            Ok(got) => return Ok(got),
            Err(Failure::Permanent(e)) => return Err(e),
            Err(Failure::Transient(detail)) if attempt < opts.attempts => {
                let wait = backoff(opts.backoff, attempt);
                tracing::warn!(file = %remote.name, attempt, of = opts.attempts, %detail, wait_ms = wait.as_millis() as u64, "transfer failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(Failure::Transient(detail)) => {
                return Err(PullError::Transfer {
                    uri: uri.to_string(),
                    file: remote.name.clone(),
                    detail,
                    attempts: attempt,
                });
            }
        }
    }
}

/// Exponential, with up to 50% jitter so pods restarted together do not retry in lockstep.
fn backoff(first: Duration, attempt: u32) -> Duration {
    let base = first.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

async fn download_once(
    store: &Store,
    remote: &Remote,
    target: &Path,
    uri: &str,
    opts: &PullOptions,
) -> Result<Got, Failure> {
    let result = store
        .inner
        .get_opts(&remote.key, GetOptions::default())
        .await
        .map_err(|e| classify(uri, &remote.name, e))?;
    let total = result.meta.size;
    let mut stream = result.into_stream();

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let path = target.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_and_hash(rx, &path));

    let mut progress = Progress::new(&remote.name, total);
    let mut received = 0u64;
    let mut failure = None;
    loop {
        match tokio::time::timeout(opts.idle_timeout, stream.next()).await {
            Err(_) => {
                failure = Some(format!("no data for {}s", opts.idle_timeout.as_secs()));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                failure = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(chunk))) => {
                received += chunk.len() as u64;
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
                progress.tick(received);
            }
        }
    }
    drop(tx);
    let written =
        writer.await.map_err(|e| Failure::Permanent(PullError::io(target, std::io::Error::other(e))))?;
    let (size, sha256) = written.map_err(|e| Failure::Permanent(PullError::io_needing(target, e, total)))?;
    if let Some(why) = failure {
        return Err(Failure::Transient(why));
    }
    if size != total {
        return Err(Failure::Transient(format!("body ended after {size} of {total} bytes")));
    }
    progress.done(size);
    Ok(Got { size, sha256 })
}

fn write_and_hash(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    path: &PathBuf,
) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::create(path)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        size += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok((size, hex::encode(hasher.finalize())))
}

pub struct InPlace {
    pub got: Got,
    /// The file that was hashed, so `serve` can tell whether it is still that file.
    pub identity: FileIdentity,
}

/// A file used in place (file:// --in-place, pvc://): hashed once, never copied. Its identity
/// is read before and after hashing; a file that changed meanwhile is refused.
pub async fn hash_in_place(path: &Path) -> Result<InPlace, PullError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<Result<InPlace, PullError>> {
        let (_, before) = FileIdentity::of(&owned)?;
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        let (after_size, after) = FileIdentity::of(&owned)?;
        if before != after || after_size != size {
            return Ok(Err(PullError::Source {
                uri: format!("file://{}", owned.display()),
                detail: "the file changed while it was being verified; pull again once it is stable".into(),
            }));
        }
        Ok(Ok(InPlace { got: Got { size, sha256: hex::encode(hasher.finalize()) }, identity: after }))
    })
    .await
    .map_err(|e| PullError::io(path, std::io::Error::other(e)))?;
    hashed.map_err(|e| PullError::io(path, e))?
}

fn classify(uri: &str, file: &str, e: object_store::Error) -> Failure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Failure::Permanent(PullError::NotFound { uri: uri.into(), file: file.into() }),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Failure::Permanent(PullError::Denied { uri: uri.into(), detail: e.to_string() })
        }
        E::NotSupported { .. } | E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => {
            Failure::Permanent(PullError::Source { uri: uri.into(), detail: e.to_string() })
        }
        other => Failure::Transient(other.to_string()),
    }
}

/// Per-file progress in the logs: at most one line a second, plus the last.
struct Progress<'a> {
    name: &'a str,
    total: u64,
    start: Instant,
    last: Instant,
}

impl<'a> Progress<'a> {
    fn new(name: &'a str, total: u64) -> Self {
        let now = Instant::now();
        Progress { name, total, start: now, last: now }
    }

    fn tick(&mut self, bytes: u64) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        let rate = bytes as f64 / secs;
        let eta = if rate > 0.0 { self.total.saturating_sub(bytes) as f64 / rate } else { f64::INFINITY };
        tracing::info!(
            file = self.name,
            bytes,
            total = self.total,
            mb_per_s = rate / 1e6,
            eta_s = eta,
            "downloading"
        );
    }

    fn done(&self, bytes: u64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        tracing::info!(
            file = self.name,
            bytes,
            seconds = secs,
            mb_per_s = bytes as f64 / 1e6 / secs,
            "file verified"
        );
    }
}
