//! One `object_store` per source scheme, and the list of files a source holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use super::{PullError, PullOptions};
use crate::manifest::{ModelSource, SourceUri};

pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    /// Keys are relative to this (the S3 prefix); empty for HTTP and files.
    prefix: Option<Key>,
    /// For `file://`: the directory, so `--in-place` can link instead of copy.
    local_root: Option<PathBuf>,
}

/// A file of the source: its key in the store and its name relative to the model directory.
pub struct Remote {
    pub key: Key,
    pub name: String,
    pub size: Option<u64>,
}

impl Store {
    pub fn local_path(&self, key: &Key) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key.as_ref()))
    }

    fn key(&self, name: &str) -> Key {
        match &self.prefix {
            Some(prefix) => name.split('/').fold(prefix.clone(), |k, part| k.join(part)),
            None => Key::from(name),
        }
    }
}

fn client_options(opts: &PullOptions, allow_http: bool) -> ClientOptions {
    // No whole-request timeout: a 10 GB shard legitimately takes minutes. Stalls are caught
    // per chunk by the transfer's idle timeout instead.
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(opts.connect_timeout)
        .with_timeout_disabled()
}

fn retry(opts: &PullOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: opts.backoff / 4,
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(180),
    }
}

pub fn open(uri: &SourceUri, raw: &str, opts: &PullOptions) -> Result<Store, PullError> {
    let bad = |e: object_store::Error| PullError::Source { uri: raw.to_string(), detail: e.to_string() };
    match uri {
        SourceUri::S3 { bucket, prefix } => {
            // Credentials, region and endpoint come from the AWS_* environment (the pod's
            // envFrom of the credentials Secret). An endpoint means an S3-compatible store:
            // path-style requests, and plain HTTP allowed when the endpoint says so.
            let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")).ok();
            let allow_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry(opts))
                .with_client_options(client_options(opts, allow_http));
            if endpoint.is_some() {
                builder = builder.with_virtual_hosted_style_request(false);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
                builder = builder.with_region("us-east-1");
            }
            let prefix = prefix.trim_matches('/');
            Ok(Store {
                inner: Arc::new(builder.build().map_err(bad)?),
                prefix: (!prefix.is_empty()).then(|| Key::from(prefix)),
                local_root: None,
            })
        }
        SourceUri::Http { base } => {
            // object_store appends each key's parts after the base's last path segment: a base
            // ending in '/' (an empty last segment) would request `<base>//<file>`, which S3,
            // GCS and most CDNs answer with 404 or 403.
            let trimmed = base.trim_end_matches('/');
            let has_path = trimmed.split_once("://").is_some_and(|(_, rest)| rest.contains('/'));
            let base = if has_path { trimmed.to_string() } else { format!("{trimmed}/") };
            let store = object_store::http::HttpBuilder::new()
                .with_url(base)
                .with_retry(retry(opts))
                .with_client_options(client_options(opts, true))
                .build()
                .map_err(bad)?;
            Ok(Store { inner: Arc::new(store), prefix: None, local_root: None })
        }
        SourceUri::File { path } => {
            if !path.is_dir() {
                return Err(PullError::Source {
                    uri: raw.to_string(),
                    detail: format!("{} is not a directory", path.display()),
                });
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(bad)?;
            Ok(Store { inner: Arc::new(store), prefix: None, local_root: Some(path.clone()) })
        }
        SourceUri::Pvc { .. } => Err(PullError::Source {
            uri: raw.to_string(),
            detail: "pvc:// sources are read in place through the manifest's pvcRoot; use pull --manifest"
                .into(),
        }),
    }
}

/// The files to fetch: the pinned ones when `sha256` names any, else everything the source
/// lists (HTTP cannot list).
pub async fn file_list(
    store: &Store,
    uri: &SourceUri,
    source: &ModelSource,
) -> Result<Vec<Remote>, PullError> {
    if !source.sha256.is_empty() {
        return Ok(source
            .sha256
            .keys()
            .map(|name| Remote { key: store.key(name), name: name.clone(), size: None })
            .collect());
    }
    if matches!(uri, SourceUri::Http { .. }) {
        return Err(PullError::HttpNeedsFiles { uri: source.uri.clone() });
    }
    let listed: Vec<_> = store
        .inner
        .list(store.prefix.as_ref())
        .try_collect()
        .await
        .map_err(|e| classify_listing(&source.uri, e))?;
    let mut files = Vec::new();
    for meta in listed {
        let full = meta.location.as_ref();
        let name = match &store.prefix {
            Some(prefix) => full.strip_prefix(prefix.as_ref()).map(|n| n.trim_start_matches('/')),
            None => Some(full),
        };
        let Some(name) = name.filter(|n| !n.is_empty()) else { continue };
        // Directory placeholders some tools create in buckets, and our own marker.
        if name.ends_with('/') || name == crate::manifest::CACHE_MARKER {
            continue;
        }
        files.push(Remote { key: meta.location.clone(), name: name.to_string(), size: Some(meta.size) });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// object_store reports a failed listing as `Generic` with the HTTP status in the text, so the
/// status is read from there too.
fn classify_listing(uri: &str, e: object_store::Error) -> PullError {
    let text = e.to_string();
    let denied =
        ["403 Forbidden", "401 Unauthorized", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"];
    match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            PullError::Denied { uri: uri.to_string(), detail: text }
        }
        _ if denied.iter().any(|d| text.contains(d)) => {
            PullError::Denied { uri: uri.to_string(), detail: text }
        }
        _ if matches!(e, object_store::Error::NotFound { .. })
            || text.contains("404 Not Found")
            || text.contains("NoSuchBucket") =>
        {
            PullError::Source { uri: uri.to_string(), detail: format!("bucket or prefix not found: {text}") }
        }
        _ => PullError::Source { uri: uri.to_string(), detail: text },
    }
}
