//! `kiln-model-server pull`: fetch a model version from S3, HTTP(S), a local path or a mounted
//! claim into the cache, hashing while the bytes stream, so `serve` only ever loads files whose
//! digests were checked.
//!
//! Transport is `object_store` (S3 signing, HTTP, local files, retries with backoff and jitter,
//! resumption of a body cut mid-stream by a range request). This module adds what a model cache
//! needs on top: the file list, digests, the atomic cache entry, and progress in the logs.

pub mod cache;
mod store;
mod transfer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, ModelSource, SourceUri};
use cache::{EntryPaths, FileIdentity, FileRecord, PartialDir};
pub use cache::{Marker, StaleEntry};

/// Knobs a test or the CLI may turn.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Whole-file attempts after object_store's own request retries gave up.
    pub attempts: u32,
    /// A transfer that delivers no byte for this long is abandoned and retried.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// First backoff; doubles per attempt, with jitter.
    pub backoff: Duration,
    /// `file://` sources: link to the files instead of copying (digests still verified).
    pub in_place: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            attempts: 4,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(500),
            in_place: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(
        "{uri}: HTTP has no listing, so the files to fetch must be named: add them to source.sha256 (FILE: HEX)"
    )]
    HttpNeedsFiles { uri: String },
    #[error("{uri}: no files found under this source")]
    Empty { uri: String },
    #[error("{uri}: {file}: sha256 mismatch: expected {expected}, got {actual}")]
    Digest { uri: String, file: String, expected: String, actual: String },
    #[error("{uri}: {file} not found")]
    NotFound { uri: String, file: String },
    #[error("{uri}: access denied: {detail} (check the credentials Secret and the bucket policy)")]
    Denied { uri: String, detail: String },
    #[error("{uri}: {detail}")]
    Source { uri: String, detail: String },
    #[error("{uri}: {file}: {detail} (gave up after {attempts} attempts)")]
    Transfer { uri: String, file: String, detail: String, attempts: u32 },
    #[error(
        "disk full writing {path} ({needed} bytes needed for this file): free space or enlarge the cache volume"
    )]
    DiskFull { path: String, needed: u64 },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "the destination {dest} is the source {origin} or inside it; choose a destination outside the source (nothing was moved)"
    )]
    DestInSource { origin: String, dest: String },
}

impl PullError {
    fn io(path: &Path, source: std::io::Error) -> PullError {
        PullError::io_needing(path, source, 0)
    }

    /// As `io`, naming how many bytes the write needed when the disk is full.
    fn io_needing(path: &Path, source: std::io::Error, needed: u64) -> PullError {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return PullError::DiskFull { path: path.display().to_string(), needed };
        }
        PullError::Io { path: path.display().to_string(), source }
    }
}

/// What one pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub dest: PathBuf,
    /// Already complete and verified: nothing was downloaded.
    pub cached: bool,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// A `file://` source and its destination must not overlap: with `--in-place` the commit would
/// move the source itself aside and delete it, and a copy would list its own output.
fn refuse_dest_in_source(source: &Path, dest: &Path) -> Result<(), PullError> {
    let source = source.canonicalize().map_err(|e| PullError::io(source, e))?;
    if resolved(dest).starts_with(&source) {
        return Err(PullError::DestInSource {
            origin: source.display().to_string(),
            dest: dest.display().to_string(),
        });
    }
    Ok(())
}

/// `path` with its longest existing ancestor resolved (symlinks, `..`), the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Rustls needs one process-wide crypto provider; ring is the one this build carries.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every model of the manifest (served ones and fallbacks) into `<cache>/<name>/<version>/`.
pub async fn pull_manifest(
    manifest: &Manifest,
    cache_dir: &Path,
    opts: &PullOptions,
) -> Result<Vec<Pulled>, PullError> {
    let mut done = Vec::new();
    for model in &manifest.models {
        let id = model.id();
        let span = tracing::info_span!("pull", model = %id.name, version = %id.version);
        let dest = Manifest::cache_path(cache_dir, &id);
        let mut opts = opts.clone();
        // A claim is mounted read-only: verify in place, link from the cache.
        let (source, in_place) = manifest.pull_source(model)?;
        opts.in_place |= in_place;
        let pulled = tracing::Instrument::instrument(pull_source(&source, &dest, &opts), span).await?;
        done.push(pulled);
    }
    Ok(done)
}

/// One source into `dest`, atomically. Returns at once when `dest` already holds a complete,
/// verified copy of the pinned files.
pub async fn pull_source(source: &ModelSource, dest: &Path, opts: &PullOptions) -> Result<Pulled, PullError> {
    install_crypto_provider();
    let t0 = Instant::now();
    let uri: SourceUri = source.uri.parse()?;
    if let SourceUri::File { path } = &uri {
        refuse_dest_in_source(path, dest)?;
    }
    let paths = EntryPaths::for_dest(dest).map_err(|e| PullError::io(dest, e))?;
    let lock_path = paths.lock.clone();
    let locking = paths.clone();
    // Another pod on this node may hold the lock for minutes: wait off the async workers.
    let _lock = tokio::task::spawn_blocking(move || locking.lock())
        .await
        .map_err(|e| PullError::io(&lock_path, std::io::Error::other(e)))?
        .map_err(|e| PullError::io(&lock_path, e))?;

    match cache::check(dest, &source.sha256, Some(&source.uri)) {
        Ok(marker) => {
            let bytes = marker.files.values().map(|f| f.size).sum();
            tracing::info!(dest = %dest.display(), files = marker.files.len(), bytes, "already in the cache and verified; nothing to download");
            return Ok(Pulled {
                dest: dest.into(),
                cached: true,
                files: marker.files.len(),
                bytes,
                seconds: 0.0,
            });
        }
        Err(StaleEntry::NoMarker { .. }) => {}
        Err(stale) => tracing::warn!(reason = %stale, "cache entry is stale; pulling again"),
    }

    let store = store::open(&uri, &source.uri, opts)?;
    let files = store::file_list(&store, &uri, source).await?;
    if files.is_empty() {
        return Err(PullError::Empty { uri: source.uri.clone() });
    }
    let total: u64 = files.iter().filter_map(|f| f.size).sum();
    tracing::info!(source = %source.uri, files = files.len(), bytes = total, dest = %dest.display(), "pulling");

    // Killed pulls leave their partial directories behind; with the lock held they are ours.
    for leftover in paths.remove_leftovers().map_err(|e| PullError::io(dest, e))? {
        tracing::info!(path = %leftover.display(), "removed what a killed pull left behind");
    }
    // Nothing partial stays behind (a failed file, marker or rename) where a later pull or
    // serve could mistake it: the guard removes the directory unless it was committed.
    let partial = PartialDir::create(&paths.partial).map_err(|e| PullError::io(&paths.partial, e))?;
    let marker = fill(&store, source, &files, &paths, opts).await?;
    marker.write(partial.path()).map_err(|e| PullError::io(partial.path(), e))?;
    paths.commit().map_err(|e| PullError::io(dest, e))?;
    partial.committed();
    let bytes = marker.files.values().map(|f| f.size).sum::<u64>();
    let seconds = t0.elapsed().as_secs_f64();
    tracing::info!(
        dest = %dest.display(),
        files = marker.files.len(),
        bytes,
        seconds,
        mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9),
        "pulled and verified"
    );
    Ok(Pulled { dest: dest.into(), cached: false, files: marker.files.len(), bytes, seconds })
}

async fn fill(
    store: &store::Store,
    source: &ModelSource,
    files: &[store::Remote],
    paths: &EntryPaths,
    opts: &PullOptions,
) -> Result<Marker, PullError> {
    let mut marker = Marker { source: source.uri.clone(), files: BTreeMap::new(), in_place: opts.in_place };
    for remote in files {
        let target = paths.partial.join(&remote.name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| PullError::io(parent, e))?;
        }
        let (got, identity) = if let (true, Some(origin)) = (opts.in_place, store.local_path(&remote.key)) {
            let got = transfer::hash_in_place(&origin).await?;
            std::os::unix::fs::symlink(&origin, &target).map_err(|e| PullError::io(&target, e))?;
            (got.got, got.identity)
        } else {
            let got = transfer::download(store, remote, &target, &source.uri, opts).await?;
            let (_, identity) = FileIdentity::of(&target).map_err(|e| PullError::io(&target, e))?;
            (got, identity)
        };
        if let Some(expected) = source.sha256.get(&remote.name)
            && expected != &got.sha256
        {
            return Err(PullError::Digest {
                uri: source.uri.clone(),
                file: remote.name.clone(),
                expected: expected.clone(),
                actual: got.sha256,
            });
        }
        marker.files.insert(
            remote.name.clone(),
            FileRecord { size: got.size, sha256: got.sha256, identity: Some(identity) },
        );
    }
    Ok(marker)
}
