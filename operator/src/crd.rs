//! The `ModelDeployment` API (`kiln.dev/v1alpha1`).
//!
//! Validation lives in the schema (OpenAPI keywords and CEL `x-kubernetes-validations`), so the
//! API server refuses a bad resource with a message a person can act on; the operator never
//! sees one. Lists that CEL walks carry `maxItems`/`maxLength` so the rules fit the API server's
//! cost budget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use kiln_model_server::manifest::{Batching, Family, Load, ModelRef, Warmup};

/// Models and the GPU node pools that serve them. The operator creates, per pool, a Deployment,
/// Service, manifest ConfigMap, PodDisruptionBudget and (with autoscaling) an HPA on queue depth.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "md",
    category = "kiln",
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    cel,
    doc = "A set of models and the node pools that serve them",
    printcolumn(name = "Family", type_ = "string", json_path = ".spec.family"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready replicas / desired replicas, across pools"
    ),
    printcolumn(
        name = "Models",
        type_ = "string",
        json_path = ".status.modelSummary",
        description = "Served model versions"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new(
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message(kube::core::Message::Expression(
        "'metadata.name ' + self.metadata.name + ' must start with a letter and hold only lowercase letters, digits and -, because it prefixes the Service of every pool'".into()
    )),
    validation = kube::core::Rule::new(
        "self.spec.pools.all(p, size(self.metadata.name) + 1 + size(p.name) <= 63)"
    ).message("the Service name <metadata.name>-<pool> must fit in 63 characters; shorten metadata.name or the pool names"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new(
        "self.pools.all(p, p.serve.all(s, self.models.exists(m, m.name + ':' + m.version == s)))"
    ).message("every pools[].serve entry must name a name:version listed in spec.models; add it to models or fix the name:version").field_path(".pools"),
    validation = kube::core::Rule::new(
        "self.models.all(m, !has(m.fallback) || self.models.exists(o, o.name == m.fallback.name && o.version == m.fallback.version))"
    ).message("every models[].fallback must name a version listed in spec.models; list the fallback version under models too").field_path(".models"),
    validation = kube::core::Rule::new(
        "self.models.all(m, !has(m.fallback) || m.fallback.name != m.name || m.fallback.version != m.version)"
    ).message("a model cannot be its own fallback; point fallback at another version").field_path(".models"),
    validation = kube::core::Rule::new(
        "self.family == 'text-generation' || self.models.all(m, !has(m.kvCacheMemory))"
    ).message("kvCacheMemory is for text-generation models only; remove it or set family: text-generation").field_path(".models"),
    validation = kube::core::Rule::new(
        "self.models.all(m, !has(m.fallback) || !has(m.load) || m.load == 'preload')"
    ).message("a lazy model cannot name a fallback (a fallback stands in for a model that failed to preload); remove fallback or set load: preload").field_path(".models"),
)]
pub struct ModelDeploymentSpec {
    /// What the pods serve; one family per pod.
    pub family: Family,
    /// Model-server image of every pool (on pools with gpus > 0 it must be a CUDA build); empty
    /// means the operator's --model-server-image, and --model-server-cuda-image on GPU pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Every model version this resource may serve.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        merge_strategy = kube::core::ListMerge::Map(vec!["name".into(), "version".into()]),
        validation = kube::core::Rule::new(
            "self.all(m, self.exists_one(o, o.name == m.name && o.version == m.version))"
        ).message("each models entry needs a unique name and version pair").reason(kube::core::Reason::FieldValueDuplicate),
    )]
    pub models: Vec<ModelSpec>,
    /// Which node pool serves which models.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]),
        validation = kube::core::Rule::new("self.all(p, self.exists_one(o, o.name == p.name))")
            .message("each pools entry needs a unique name").reason(kube::core::Reason::FieldValueDuplicate),
    )]
    pub pools: Vec<PoolSpec>,
    /// Warmup before readiness; also sizes the startup probe.
    #[serde(default)]
    pub warmup: Warmup,
    /// Dynamic batching in every model server.
    #[serde(default)]
    pub batching: Batching,
}

/// One model version.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Model name, a DNS-1123 label; clients ask for `name` or `name:version`.
    #[schemars(length(max = 63))]
    #[x_kube(validation = kube::core::Rule::new(DNS_LABEL_RULE).message(kube::core::Message::Expression(DNS_LABEL_MSG.into())))]
    pub name: String,
    /// Version, a DNS-1123 label (e.g. v2).
    #[schemars(length(max = 63))]
    #[x_kube(validation = kube::core::Rule::new(DNS_LABEL_RULE).message(kube::core::Message::Expression(DNS_LABEL_MSG.into())))]
    pub version: String,
    /// Where the weights come from.
    pub source: SourceSpec,
    /// Resident-size hint (a quantity such as 120Mi); otherwise derived from the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(self)").message(kube::core::Message::Expression(QUANTITY_MSG.into())))]
    pub memory: Option<String>,
    /// Served in this version's place if it fails to load; must be listed in models too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackRef>,
    /// Text generation: memory for this model's KV caches (a quantity such as 2Gi), counted in
    /// the pool's memory fit. A sequence is admitted only while its prompt plus max_tokens fits
    /// what is left of it. Default: what the container's memory limit leaves once the weights
    /// are loaded, less a margin (the server measures it at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(self)").message(kube::core::Message::Expression(QUANTITY_MSG.into())))]
    pub kv_cache_memory: Option<String>,
    /// `preload` (default): loaded and warmed before the pod is ready, never unloaded. `lazy`:
    /// loaded on its first request (that request waits), unloaded least recently used first
    /// when another model needs the pool's memoryBudget, or after idleUnloadSeconds idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
}

/// A model version named by its parts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FallbackRef {
    #[schemars(length(max = 63))]
    pub name: String,
    #[schemars(length(max = 63))]
    pub version: String,
}

/// Source of a model's files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// s3://bucket/prefix/, http(s)://host/path/, file:///path/ or pvc://claim/path.
    #[schemars(length(max = 2048))]
    #[x_kube(
        validation = kube::core::Rule::new(
            "self.matches('^(s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/.*)?|https?://[^/\\\\s]+(/.*)?|file:///.*|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?)$')"
        ).message(kube::core::Message::Expression(
            "'source.uri ' + self + ' is not supported: use s3://bucket/prefix/, http(s)://host/path/, file:///absolute/path/ or pvc://claim/path'".into()
        )),
        // A static message: repeating the URI would put the password in the refusal.
        validation = kube::core::Rule::new("!self.matches('^[a-z0-9]+://[^/]*@')")
            .message("source.uri must not carry credentials (user:password@host): they would show in logs and status; put them in a Secret and name it in source.credentialsSecret"),
    )]
    pub uri: String,
    /// Secret in the same namespace holding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    /// optionally AWS_ENDPOINT_URL and AWS_REGION; passed to the pods, never read by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
    /// Expected sha256 (64 lowercase hex) per file; every listed file is verified before load.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    // The digest format is an OpenAPI pattern, not CEL: a CEL walk over map values costs more
    // than the API server's estimate allows for a list of 32 models.
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 64, "pattern": "^[0-9a-f]{64}$"}))]
    #[x_kube(
        validation = kube::core::Rule::new("self.all(f, size(f) <= 512 && !f.matches('^/|//|(^|/)[.][.]?(/|$)'))")
            .message("sha256 keys are file paths relative to the source, without a leading '/', empty parts, '.' or '..'"),
        validation = kube::core::Rule::new("self.all(f, f != '.kiln-complete.json')")
            .message(".kiln-complete.json is the name of the cache's completion marker; a model file cannot use it"),
    )]
    pub sha256: BTreeMap<String, String>,
}

/// A node pool and what it serves.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("!(has(self.replicas) && has(self.autoscaling))")
        .message("set either replicas (fixed size) or autoscaling, not both"),
)]
pub struct PoolSpec {
    /// Pool name, a DNS-1123 label; objects are named <resource>-<pool>.
    #[schemars(length(max = 63))]
    #[x_kube(validation = kube::core::Rule::new(DNS_LABEL_RULE).message(kube::core::Message::Expression(DNS_LABEL_MSG.into())))]
    pub name: String,
    /// Node labels that select this pool's nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the pool's taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Accelerators per replica; 0 is a CPU pool.
    #[serde(default)]
    #[schemars(range(max = 64))]
    pub gpus: u32,
    /// Extended resource name of the accelerator.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(max = 253))]
    pub gpu_resource: String,
    /// Memory per accelerator (a quantity such as 80Gi); models that do not fit are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(self)").message(kube::core::Message::Expression(QUANTITY_MSG.into())))]
    pub gpu_memory: Option<String>,
    /// CPU and memory requests and limits of the model-server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // No CEL over the quantities: maps of int-or-string have no size bound, so any rule walking
    // them exceeds the API server's cost budget. The Deployment's own validation refuses a bad
    // quantity and status reports it.
    pub resources: Option<ResourceRequirements>,
    /// "name:version" entries of spec.models served by this pool.
    #[schemars(length(min = 1, max = 32), inner(length(max = 127)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(s, self.exists_one(o, o == s))").message("serve lists each name:version once").reason(kube::core::Reason::FieldValueDuplicate))]
    pub serve: Vec<String>,
    /// Fixed replica count when autoscaling is absent (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub replicas: Option<u32>,
    /// Horizontal autoscaling on the pods' queue depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Memory the models of one replica may hold at once (a quantity such as 6Gi): each is
    /// charged its `memory` hint (else its weight files) plus its kvCacheMemory. Lazy models are
    /// unloaded least recently used first to stay under it. Default: the container's memory
    /// limit less a margin for the runtime (a tenth, at least 64Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(self)").message(kube::core::Message::Expression(QUANTITY_MSG.into())))]
    pub memory_budget: Option<String>,
    /// Unload a lazy model after this many seconds without requests; unset, lazy models are
    /// unloaded only to make room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub idle_unload_seconds: Option<u32>,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_string()
}

/// HPA on the `kiln_queue_depth` pods metric.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// Static message: string(int) in a messageExpression has no size bound for the cost estimate.
#[x_kube(validation = kube::core::Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas"))]
pub struct AutoscalingSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: u32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: u32,
    /// Average requests waiting or running per pod (`kiln_queue_depth`) that the HPA aims for;
    /// about `batching.maxBatchSize` keeps each pod busy without a queue.
    #[schemars(range(min = 1, max = 100000))]
    pub target_queue_depth: u32,
    /// Seconds of lower recommendations the HPA waits for before removing pods (its
    /// `behavior.scaleDown.stabilizationWindowSeconds`); unset, the cluster's default (300 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3600))]
    pub scale_down_stabilization_seconds: Option<u32>,
}

fn one() -> u32 {
    1
}

const DNS_LABEL_RULE: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
const DNS_LABEL_MSG: &str = "self + ' is not a DNS-1123 label: use lowercase letters, digits and -, starting and ending with a letter or digit'";
const QUANTITY_MSG: &str = "self + ' is not a quantity; write it like 512Mi, 80Gi or 1.5G'";

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Ready replicas / desired replicas across pools, as `kubectl get md` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Served model versions, comma-separated, for `kubectl get md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_summary: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub name: String,
    pub deployment: String,
    pub service: String,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub serving: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_required: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available: Option<String>,
}

/// A model version's state across the pools that serve it, from their Deployments and pods.
/// (Whether a pod serves a failed version's fallback is per pod, in its `/status`.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelState {
    Pending,
    Loading,
    Ready,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    pub name: String,
    pub version: String,
    pub pools: Vec<String>,
    pub state: ModelState,
    /// In-cluster URL of a Service serving this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `lazy` when the model loads on its first request (absent: preloaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    /// Per pool: of the ready pods that answered, how many hold the model in memory now (lazy
    /// models, from each pod's `/status`; a preloaded model is loaded in every ready pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded: Vec<PoolLoaded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolLoaded {
    pub pool: String,
    /// Ready pods whose state is known.
    pub pods: i32,
    /// Of those, pods with the model loaded and warm.
    pub loaded_pods: i32,
}

impl ModelSpec {
    pub fn id(&self) -> ModelRef {
        ModelRef::new(&self.name, &self.version)
    }

    /// Loaded on its first request (`load: lazy`).
    pub fn is_lazy(&self) -> bool {
        self.load == Some(Load::Lazy)
    }
}

impl ModelDeploymentSpec {
    /// The model a `pools[].serve` entry names, if listed.
    pub fn served(&self, entry: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id().to_string() == entry)
    }

    /// Whether `pool` serves a lazy model.
    pub fn serves_lazy(&self, pool: &PoolSpec) -> bool {
        pool.serve.iter().any(|entry| self.served(entry).is_some_and(ModelSpec::is_lazy))
    }
}

/// The CRD as `kubectl apply` takes it.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    use kube::CustomResourceExt;
    serde_norway::to_string(&ModelDeployment::crd())
}
