//! The operator ↔ server contract.
//!
//! The operator renders one [`Manifest`] per pool into the ConfigMap `<md>-<pool>-manifest`;
//! the server's `pull` and `serve` commands read the same type back. This module compiles without
//! any engine dependency so that the operator can use it with `default-features = false`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the manifest format; bumped on an incompatible change so an old server refuses a
/// new manifest with a clear message instead of misreading it.
pub const MANIFEST_VERSION: u32 = 1;

/// File name of the marker written next to a verified model in the cache.
pub const CACHE_MARKER: &str = ".kiln-complete.json";

/// The kind of model a pod serves. One family per pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    TextEmbedding,
    TextGeneration,
    SpeechToText,
    ImageTextEmbedding,
    FaceDetection,
}

impl Family {
    /// Every family this build serves: the CRD accepts exactly these, so a resource naming a
    /// family the server cannot serve is refused at apply instead of crash-looping its pods.
    pub const ALL: [Family; 5] = [
        Family::TextEmbedding,
        Family::TextGeneration,
        Family::SpeechToText,
        Family::ImageTextEmbedding,
        Family::FaceDetection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::TextEmbedding => "text-embedding",
            Family::TextGeneration => "text-generation",
            Family::SpeechToText => "speech-to-text",
            Family::ImageTextEmbedding => "image-text-embedding",
            Family::FaceDetection => "face-detection",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Family {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Family::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| ManifestError::UnknownFamily(s.to_string()))
    }
}

fn default_warmup_iterations() -> u32 {
    3
}
fn default_warmup_inputs() -> Vec<String> {
    // Varied lengths so warmup touches the short and the long kernels alike.
    vec![
        "hello world".to_string(),
        "Kiln warms every model before the pod takes traffic.".to_string(),
        "A longer warmup sentence exercises attention over more tokens, so the first real request \
         after readiness does not pay for allocator growth or lazily initialised kernels, \
         whatever its length turns out to be."
            .to_string(),
    ]
}
fn default_warmup_timeout() -> u32 {
    600
}

/// How a model is warmed before the pod reports ready.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Warmup {
    /// Passes over `inputs` after loading, before readiness. 0 skips warmup.
    #[serde(default = "default_warmup_iterations")]
    #[schemars(range(max = 1000))]
    pub iterations: u32,
    /// Inputs fed to every model during warmup.
    #[serde(default = "default_warmup_inputs")]
    #[schemars(length(max = 64), inner(length(max = 65536)))]
    pub inputs: Vec<String>,
    /// Upper bound for download, load and warmup; sizes the pod's startup probe.
    #[serde(default = "default_warmup_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup {
            iterations: default_warmup_iterations(),
            inputs: default_warmup_inputs(),
            timeout_seconds: default_warmup_timeout(),
        }
    }
}

fn default_max_batch_size() -> u32 {
    32
}
fn default_max_delay_ms() -> u32 {
    5
}
fn default_max_queue_depth() -> u32 {
    1024
}

/// Dynamic batching, per model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batching {
    /// A batch closes when it holds this many inputs...
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch_size: u32,
    /// ...or when its oldest input has waited this long. Only requests that arrive while a
    /// batch runs wait: one that finds the model idle and its queue empty runs at once.
    #[serde(default = "default_max_delay_ms")]
    #[schemars(range(max = 10000))]
    pub max_delay_milliseconds: u32,
    /// Requests waiting per model beyond which the server answers 429 with Retry-After.
    #[serde(default = "default_max_queue_depth")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_queue_depth: u32,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_size: default_max_batch_size(),
            max_delay_milliseconds: default_max_delay_ms(),
            max_queue_depth: default_max_queue_depth(),
        }
    }
}

/// `name:version`, the id clients and the resource use for one model version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

impl ModelRef {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        ModelRef { name: name.into(), version: version.into() }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

impl FromStr for ModelRef {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((name, version)) if is_dns_label(name) && is_dns_label(version) => {
                Ok(ModelRef::new(name, version))
            }
            _ => Err(ManifestError::BadModelRef(s.to_string())),
        }
    }
}

/// True for a DNS-1123 label: 1–63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Where a model's files come from, as written in the resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    pub uri: String,
    /// Expected sha256 per file, relative to the source root. Every listed file is verified
    /// before load; for HTTP sources this map also names the files to fetch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
}

/// A parsed source URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceUri {
    S3 { bucket: String, prefix: String },
    Http { base: String },
    File { path: PathBuf },
    Pvc { claim: String, path: String },
}

impl SourceUri {
    pub fn scheme(&self) -> &'static str {
        match self {
            SourceUri::S3 { .. } => "s3",
            SourceUri::Http { .. } => "http",
            SourceUri::File { .. } => "file",
            SourceUri::Pvc { .. } => "pvc",
        }
    }
}

/// `uri` with any user information (`user:password@`) replaced by `***`, for messages and logs.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else { return uri.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => uri.to_string(),
    }
}

impl FromStr for SourceUri {
    type Err = ManifestError;
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ManifestError::BadSourceUri { uri: redact_uri(uri), why: why.to_string() };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("expected SCHEME://..."))?;
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        if authority.contains('@') {
            return Err(bad(
                "credentials do not belong in a source URI (they would be logged and shown); put them in a Secret and name it in source.credentialsSecret",
            ));
        }
        match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("s3:// needs a bucket, as in s3://bucket/prefix/"));
                }
                Ok(SourceUri::S3 { bucket: bucket.to_string(), prefix: prefix.to_string() })
            }
            "http" | "https" => {
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(bad("http(s):// needs a host, as in https://host/path/"));
                }
                Ok(SourceUri::Http { base: uri.to_string() })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file:// needs an absolute path, as in file:///models/minilm/"));
                }
                Ok(SourceUri::File { path: PathBuf::from(rest) })
            }
            "pvc" => {
                let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
                if !is_dns_label(claim) && !is_dns_subdomain(claim) {
                    return Err(bad("pvc:// needs a claim name, as in pvc://models-claim/minilm/v2"));
                }
                let path = path.trim_end_matches('/');
                if !path.is_empty() && !is_relative_clean(path) {
                    return Err(bad("the path after the claim must not contain '..'"));
                }
                Ok(SourceUri::Pvc { claim: claim.to_string(), path: path.to_string() })
            }
            other => Err(bad(&format!("unsupported scheme {other:?}; use s3, http, https, file or pvc"))),
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A relative path with no `..`, no root and no empty name: safe to join under a directory.
pub fn is_relative_clean(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, Component::Normal(_))) && !p.ends_with('/')
}

/// One model version in a pool's manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    pub source: ModelSource,
    /// Resident-size hint in bytes, when the resource gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Served in this model's place if it fails to load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<ModelRef>,
    /// False for entries present only as another entry's fallback: pulled, loaded on demand.
    #[serde(default = "yes")]
    pub serve: bool,
    /// Text generation: bytes the sequences' KV caches may take together. Absent: the server
    /// derives it from the memory the pod has left after loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_bytes: Option<u64>,
    /// When the server loads it: before readiness, or on its first request.
    #[serde(default, skip_serializing_if = "Load::is_preload")]
    pub load: Load,
}

/// KV-cache memory of a text-generation model that names none, in a pod that also serves lazy
/// models: deriving it from what the pod has left would leave nothing for them. The server
/// gives it, and the operator's memory fit counts it.
pub const SHARED_KV_CACHE_BYTES: u64 = 256 << 20;

/// When a served model is loaded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Load {
    /// Loaded and warmed before the pod reports ready; never unloaded.
    #[default]
    Preload,
    /// Loaded on its first request; unloaded least recently used first when another model needs
    /// the memory, or after `idleUnloadSeconds` without requests.
    Lazy,
}

impl Load {
    pub fn is_preload(&self) -> bool {
        *self == Load::Preload
    }
}

fn yes() -> bool {
    true
}

impl ModelEntry {
    pub fn id(&self) -> ModelRef {
        ModelRef::new(&self.name, &self.version)
    }
}

/// What one pod of a pool pulls and serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub manifest_version: u32,
    pub family: Family,
    pub models: Vec<ModelEntry>,
    #[serde(default)]
    pub warmup: Warmup,
    #[serde(default)]
    pub batching: Batching,
    /// Where the operator mounts `pvc://` claims (read-only), one directory per claim.
    #[serde(default = "default_pvc_root")]
    pub pvc_root: String,
    /// Bytes the pod's models may hold at once; lazy models are unloaded to stay under it.
    /// None: the container's memory limit less a margin for the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_bytes: Option<u64>,
    /// A lazy model without requests for this long is unloaded. None: only to make room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_unload_seconds: Option<u32>,
}

pub fn default_pvc_root() -> String {
    "/var/run/kiln/pvc".to_string()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Parse(String),
    #[error(
        "manifest version {found} is not supported by this server (it reads version {MANIFEST_VERSION}); use a matching kiln-model-server image"
    )]
    Version { found: u32 },
    #[error("unknown family {0:?}; this server serves text-embedding and text-generation")]
    UnknownFamily(String),
    #[error("{0:?} is not NAME:VERSION with both parts DNS-1123 labels (e.g. minilm:v2)")]
    BadModelRef(String),
    #[error("source {uri:?}: {why}")]
    BadSourceUri { uri: String, why: String },
    #[error("model {model}: sha256 for {file:?} must be 64 lowercase hex characters")]
    BadDigest { model: String, file: String },
    #[error("model {model}: file name {file:?} must be a relative path without '..'")]
    BadFileName { model: String, file: String },
    #[error(
        "model {model}: {file:?} is the name of the cache's completion marker; a model file cannot use it"
    )]
    ReservedFileName { model: String, file: String },
    #[error("model {0} appears twice in the manifest")]
    Duplicate(String),
    #[error("model {model} names fallback {fallback}, which is not in the manifest")]
    MissingFallback { model: String, fallback: String },
    #[error("manifest serves no model")]
    Empty,
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    pub fn new(family: Family, models: Vec<ModelEntry>, warmup: Warmup, batching: Batching) -> Self {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            family,
            models,
            warmup,
            batching,
            pvc_root: default_pvc_root(),
            memory_budget_bytes: None,
            idle_unload_seconds: None,
        }
    }

    /// Parse and check a manifest; every error names what to fix.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Deterministic JSON (field order fixed by the types, maps sorted), so the operator's
    /// hash of it changes only when the content does.
    pub fn to_json(&self) -> String {
        // Serializing these plain types cannot fail: no non-string map keys, no custom impls.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version { found: self.manifest_version });
        }
        if !self.models.iter().any(|m| m.serve) {
            return Err(ManifestError::Empty);
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.models {
            let id = m.id();
            if !is_dns_label(&m.name) || !is_dns_label(&m.version) {
                return Err(ManifestError::BadModelRef(id.to_string()));
            }
            if !seen.insert(id.clone()) {
                return Err(ManifestError::Duplicate(id.to_string()));
            }
            m.source.uri.parse::<SourceUri>()?;
            for (file, digest) in &m.source.sha256 {
                if !is_relative_clean(file) {
                    return Err(ManifestError::BadFileName { model: id.to_string(), file: file.clone() });
                }
                if file == CACHE_MARKER {
                    return Err(ManifestError::ReservedFileName {
                        model: id.to_string(),
                        file: file.clone(),
                    });
                }
                if !is_sha256_hex(digest) {
                    return Err(ManifestError::BadDigest { model: id.to_string(), file: file.clone() });
                }
            }
        }
        for m in &self.models {
            if let Some(fb) = &m.fallback
                && !seen.contains(fb)
            {
                return Err(ManifestError::MissingFallback {
                    model: m.id().to_string(),
                    fallback: fb.to_string(),
                });
            }
        }
        Ok(())
    }

    pub fn model(&self, id: &ModelRef) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == id.name && m.version == id.version)
    }

    /// Where `pull` reads a model from, and whether it links the files in place: a `pvc://`
    /// claim is mounted read-only under `pvcRoot` and verified where it is. The cache marker
    /// records this source, and `serve` expects it there.
    pub fn pull_source(&self, entry: &ModelEntry) -> Result<(ModelSource, bool), ManifestError> {
        Ok(match entry.source.uri.parse::<SourceUri>()? {
            SourceUri::Pvc { claim, path } => {
                let dir = Path::new(&self.pvc_root).join(claim).join(path);
                (
                    ModelSource {
                        uri: format!("file://{}/", dir.display()),
                        sha256: entry.source.sha256.clone(),
                    },
                    true,
                )
            }
            _ => (entry.source.clone(), false),
        })
    }

    /// The directory a verified model version lives in under a cache root.
    pub fn cache_path(cache_dir: &Path, id: &ModelRef) -> PathBuf {
        cache_dir.join(&id.name).join(&id.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, version: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            version: version.into(),
            source: ModelSource {
                uri: format!("s3://models/{name}/{version}/"),
                sha256: BTreeMap::from([("model.safetensors".to_string(), "a".repeat(64))]),
            },
            memory_bytes: Some(120 << 20),
            fallback: None,
            serve: true,
            kv_cache_bytes: None,
            load: Load::Preload,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let mut v2 = entry("minilm", "v2");
        v2.fallback = Some(ModelRef::new("minilm", "v1"));
        let mut v1 = entry("minilm", "v1");
        v1.serve = false;
        let m = Manifest::new(Family::TextEmbedding, vec![v2, v1], Warmup::default(), Batching::default());
        let back = Manifest::from_json(&m.to_json()).expect("round trip");
        assert_eq!(back, m);
        // Stable bytes: the operator hashes this text.
        assert_eq!(back.to_json(), m.to_json());
    }

    #[test]
    fn defaults_fill_a_minimal_manifest() {
        let m = Manifest::from_json(
            r#"{"manifestVersion":1,"family":"text-embedding",
                "models":[{"name":"minilm","version":"v2","source":{"uri":"file:///models/minilm"}}]}"#,
        )
        .expect("minimal manifest");
        assert_eq!(m.batching, Batching::default());
        assert_eq!(m.warmup.iterations, 3);
        assert!(m.models[0].serve);
        assert_eq!(m.pvc_root, "/var/run/kiln/pvc");
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let ok = Manifest::new(
            Family::TextEmbedding,
            vec![entry("a", "v1")],
            Warmup::default(),
            Batching::default(),
        );
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|m| m.manifest_version = 2), "version 2"),
            (Box::new(|m| m.models.clear()), "serves no model"),
            (Box::new(|m| m.models[0].serve = false), "serves no model"),
            (Box::new(|m| m.models.push(m.models[0].clone())), "appears twice"),
            (Box::new(|m| m.models[0].name = "Bad_Name".into()), "DNS-1123"),
            (Box::new(|m| m.models[0].source.uri = "ftp://x/y".into()), "unsupported scheme"),
            (Box::new(|m| m.models[0].source.uri = "s3:///nobucket".into()), "needs a bucket"),
            (Box::new(|m| m.models[0].source.uri = "file://relative".into()), "absolute path"),
            (
                Box::new(|m| {
                    m.models[0].source.sha256.insert("x".into(), "ABC".into());
                }),
                "64 lowercase hex",
            ),
            (
                Box::new(|m| {
                    m.models[0].source.sha256.insert("../etc/passwd".into(), "a".repeat(64));
                }),
                "without '..'",
            ),
            (Box::new(|m| m.models[0].fallback = Some(ModelRef::new("a", "v0"))), "not in the manifest"),
            (
                Box::new(|m| {
                    m.models[0].source.sha256.insert(CACHE_MARKER.into(), "a".repeat(64));
                }),
                "completion marker",
            ),
        ];
        assert!(ok.validate().is_ok());
        for (mutate, want) in cases {
            let mut m = ok.clone();
            mutate(&mut m);
            let err = m.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let err = Manifest::from_json("{").expect_err("bad json").to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn parses_every_source_scheme() {
        assert_eq!(
            "s3://models/minilm/v2/".parse::<SourceUri>(),
            Ok(SourceUri::S3 { bucket: "models".into(), prefix: "minilm/v2/".into() })
        );
        assert_eq!(
            "https://example.test/minilm/".parse::<SourceUri>(),
            Ok(SourceUri::Http { base: "https://example.test/minilm/".into() })
        );
        assert_eq!(
            "file:///srv/models/minilm".parse::<SourceUri>(),
            Ok(SourceUri::File { path: "/srv/models/minilm".into() })
        );
        assert_eq!(
            "pvc://weights/smollm2/q4/".parse::<SourceUri>(),
            Ok(SourceUri::Pvc { claim: "weights".into(), path: "smollm2/q4".into() })
        );
        assert!("pvc://weights/../x".parse::<SourceUri>().is_err());
        // Credentials in the URI are refused, and the message does not repeat them.
        for uri in ["https://user:hunter2@mirror/minilm/", "s3://key:hunter2@bucket/x/"] {
            let err = uri.parse::<SourceUri>().expect_err(uri).to_string();
            assert!(err.contains("credentialsSecret") && !err.contains("hunter2"), "{err}");
        }
        assert_eq!(redact_uri("https://u:p@host/a@b/c"), "https://***@host/a@b/c");
        assert_eq!(redact_uri("https://host/a@b"), "https://host/a@b", "an @ in the path is no user info");
        assert!("minilm".parse::<SourceUri>().is_err());
    }

    #[test]
    fn model_refs_and_families_parse() {
        assert_eq!("minilm:v2".parse::<ModelRef>(), Ok(ModelRef::new("minilm", "v2")));
        assert_eq!(ModelRef::new("minilm", "v2").to_string(), "minilm:v2");
        for bad in ["minilm", ":v2", "minilm:", "Mini:v2", "a:b:c", "-a:v1"] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad}");
        }
        for f in Family::ALL {
            assert_eq!(f.as_str().parse::<Family>(), Ok(f));
        }
        assert!("image-generation".parse::<Family>().is_err());
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("minilm-v2"));
        assert!(is_dns_label(&"a".repeat(63)));
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
