//! The reconciler: observe the pool objects, compute desired state (pure, in `resources`),
//! apply what differs with server-side apply, report status. An unchanged resource costs reads
//! only: nothing is written when every field we own already has the desired value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::cache::{self, Caches};
use crate::crd::{ModelDeployment, ModelSpec, PoolSpec};
use crate::metrics::OperatorMetrics;
use crate::quantity::parse_bytes;
use crate::resources::{
    self, FIELD_MANAGER, LABEL_MD, LABEL_POOL, OperatorSettings, config_map, deployment, hpa, pdb,
    pool_manifest, service,
};
use crate::status::{self, Fit, PoolObservation};
use kiln_model_server::manifest::SHARED_KV_CACHE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Manifest(#[from] resources::ManifestError),
    #[error("resource has no namespace")]
    NoNamespace,
}

pub struct Context {
    pub client: Client,
    /// What the cluster holds of our children, from watches: reads never go to the API server.
    /// The binary starts the controller only once `Caches::ready` (every first listing) is done.
    pub caches: Caches,
    pub settings: OperatorSettings,
    pub metrics: Arc<OperatorMetrics>,
    pub recorder: Recorder,
}

/// True when every field of `desired` is present in `live` with the same value; fields the API
/// server or other managers added to `live` do not matter.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            d.iter().all(|(k, v)| v.is_null() || l.get(k).is_some_and(|lv| is_subset(v, lv)))
        }
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (d, l) => d == l,
    }
}

/// Server-side apply `obj` unless the cached live object already matches it. Returns the object
/// as the server holds it after the write, or None when nothing was written.
async fn apply<K>(api: &Api<K>, cached: &Store<K>, ns: &str, obj: &K) -> Result<Option<K>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if let Some(live) = cache::get(cached, ns, &name) {
        let desired = serde_json::to_value(obj).map_err(kube::Error::SerdeError)?;
        let live_json = serde_json::to_value(&*live).map_err(kube::Error::SerdeError)?;
        if is_subset(&strip_meta(desired), &live_json) {
            return Ok(None);
        }
    }
    let mut body = serde_json::to_value(obj).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = json!(K::api_version(&K::DynamicType::default()));
    body["kind"] = json!(K::kind(&K::DynamicType::default()));
    let written = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(Some(written))
}

/// Whether `ours` is this resource's controller owner reference's target.
fn controlled_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == uid && o.controller == Some(true))
}

/// `Kind name` when an object of that name exists that this resource does not control. Read
/// from the cache when it is there; else from the API server, because an object someone else
/// made carries none of our labels and so is in no watch of ours. A steady pool's objects are
/// all cached: the GET happens only when we are about to create one.
async fn foreign<K>(
    api: &Api<K>,
    cached: &Store<K>,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Option<String>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let live = match cache::get(cached, ns, name) {
        Some(obj) => Some(obj.meta().clone()),
        None => api.get_opt(name).await?.map(|obj| obj.meta().clone()),
    };
    Ok(live.filter(|meta| !controlled_by(meta, uid)).map(|_| format!("{kind} {ns}/{name}")))
}

/// A child the spec may or may not want (PDB, HPA): apply it when wanted, delete it when not.
/// Returns what was written, for the log and the event.
async fn apply_or_remove<K>(
    api: &Api<K>,
    cached: &Store<K>,
    ns: &str,
    name: &str,
    uid: &str,
    desired: Option<K>,
) -> Result<Option<String>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    match desired {
        Some(obj) => Ok(apply(api, cached, ns, &obj).await?.map(|_| kind)),
        // Only ever delete what this resource controls.
        None if cache::get(cached, ns, name).is_some_and(|o| controlled_by(o.meta(), uid)) => {
            Ok(delete(api, name).await?.then(|| format!("{kind} (deleted)")))
        }
        None => Ok(None),
    }
}

/// Delete `name`; one already gone (the cache may lag a deletion) is not an error.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The comparison ignores apiVersion/kind (absent from typed objects when serialized).
fn strip_meta(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Delete cached objects labelled for this resource whose pool is no longer in the spec.
async fn prune<K>(
    api: &Api<K>,
    cached: &Store<K>,
    md: &ModelDeployment,
    ns: &str,
    pools: &[String],
) -> Result<Vec<String>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let name = md.name_any();
    let mut removed = Vec::new();
    for obj in cache::labelled(cached, ns, &[(LABEL_MD, &name)]) {
        let pool = obj.labels().get(LABEL_POOL).cloned().unwrap_or_default();
        let owned = obj.owner_references().iter().any(|o| Some(&o.uid) == md.metadata.uid.as_ref());
        if owned && !pools.contains(&pool) && delete(api, &obj.name_any()).await? {
            removed.push(obj.name_any());
        }
    }
    Ok(removed)
}

/// How often a resource with lazy models has `status.models[].loaded` refreshed from its pods.
pub const LAZY_STATUS_REFRESH: Duration = Duration::from_secs(20);

/// KV-cache memory counted for a text-generation model that sets no `kvCacheMemory`: its
/// server takes what the limit leaves, but a pool that leaves less than this cannot serve.
pub const MIN_KV_CACHE_BYTES: u64 = 64 << 20;

/// What one replica of `pool` needs against what it has. Preloaded models stay resident, so
/// they count in full; lazy models take turns, so the largest counts (every lazy model must fit
/// beside the preloaded ones). A `memoryBudget` caps what the models may hold, and must itself
/// fit the container beside the runtime headroom.
fn fit(md: &ModelDeployment, pool: &PoolSpec, settings: &OperatorSettings) -> Fit {
    let mut unknown_size = Vec::new();
    let generation = md.spec.family == crate::crd::Family::TextGeneration;
    let any_lazy = md.spec.serves_lazy(pool);
    let (mut preloaded, mut largest_lazy): (u64, Option<(String, u64)>) = (0, None);
    for entry in &pool.serve {
        let model = md.spec.served(entry);
        let mut charge = match model.and_then(|m| m.memory.as_deref()).and_then(parse_bytes) {
            Some(b) => b,
            None => {
                unknown_size.push(entry.clone());
                0
            }
        };
        if generation {
            let kv = model.and_then(|m| m.kv_cache_memory.as_deref()).and_then(parse_bytes);
            // As the server does: a fixed share when lazy models use the pod too.
            let default = if any_lazy { SHARED_KV_CACHE_BYTES } else { MIN_KV_CACHE_BYTES };
            charge = charge.saturating_add(kv.unwrap_or(default));
        }
        if model.is_some_and(ModelSpec::is_lazy) {
            if largest_lazy.as_ref().is_none_or(|(_, b)| charge > *b) {
                largest_lazy = Some((entry.clone(), charge));
            }
        } else {
            preloaded = preloaded.saturating_add(charge);
        }
    }
    let models = preloaded.saturating_add(largest_lazy.as_ref().map_or(0, |(_, b)| *b));
    let headroom = settings.memory_headroom_bytes;
    let limit = if pool.gpus > 0 {
        pool.gpu_memory.as_deref().and_then(parse_bytes).map(|per| per * u64::from(pool.gpus))
    } else {
        pool.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_bytes(&q.0))
    };
    let budget = pool.memory_budget.as_deref().and_then(parse_bytes);
    let available = match (limit, budget) {
        (Some(l), Some(b)) => Some(l.min(b.saturating_add(headroom))),
        (None, Some(b)) => Some(b.saturating_add(headroom)),
        (l, None) => l,
    };
    let budget_over_limit = match (limit, budget) {
        (Some(l), Some(b)) if b.saturating_add(headroom) > l => Some((b, l.saturating_sub(headroom))),
        _ => None,
    };
    Fit {
        required: models.saturating_add(headroom),
        available,
        unknown_size,
        budget_over_limit,
        largest_lazy: largest_lazy.map(|(name, _)| name),
        budget: budget.filter(|b| limit.is_none_or(|l| b.saturating_add(headroom) <= l)),
        headroom,
    }
}

async fn event(ctx: &Context, md: &ModelDeployment, type_: EventType, reason: &str, note: String) {
    let ev =
        Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

#[tracing::instrument(skip_all, fields(md = %md.name_any(), namespace = md.namespace().unwrap_or_default()))]
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics.observe(result.is_ok(), started.elapsed());
    result
}

macro_rules! pool_apis {
    ($($field:ident: $kind:ty,)*) => {
        /// The typed APIs of the kinds a pool is made of, in one namespace.
        struct PoolApis {
            $($field: Api<$kind>,)*
        }

        impl PoolApis {
            fn new(client: &Client, ns: &str) -> Self {
                PoolApis { $($field: Api::namespaced(client.clone(), ns),)* }
            }

            /// Delete every cached object labelled for `md` whose pool the spec no longer names.
            async fn prune(&self, caches: &Caches, md: &ModelDeployment, ns: &str, pools: &[String]) -> Result<Vec<String>, kube::Error> {
                let mut removed = Vec::new();
                $(removed.extend(prune(&self.$field, &caches.$field, md, ns, pools).await?);)*
                Ok(removed)
            }
        }
    };
}

crate::owned::owned_kinds!(pool_apis);

/// One pool: apply what differs (when its models fit), then observe it from the caches.
async fn reconcile_pool(
    md: &ModelDeployment,
    pool: &PoolSpec,
    ctx: &Context,
    apis: &PoolApis,
    ns: &str,
) -> Result<PoolObservation, Error> {
    let caches = &ctx.caches;
    let name = resources::pool_object_name(md, pool);
    let uid = md.metadata.uid.clone().unwrap_or_default();
    let fit = fit(md, pool, &ctx.settings);
    // The Deployment as the server returned it, when this pass wrote it.
    let mut deployment_seen = None;
    let conflicts = conflicts(md, pool, ctx, apis, ns).await?;
    if !conflicts.is_empty() {
        // Never take over an object we do not control: write nothing for this pool.
        tracing::warn!(objects = ?conflicts, "pool objects exist that this resource does not control");
        event(
            ctx,
            md,
            EventType::Warning,
            "NameConflict",
            format!(
                "pool {}: {} exists and is not controlled by this ModelDeployment",
                pool.name,
                conflicts.join(", ")
            ),
        )
        .await;
    } else if !fit.fits() {
        // Leave running pods alone; status and an event say why.
        tracing::warn!(required = fit.required, available = ?fit.available, "models do not fit the pool");
        event(
            ctx,
            md,
            EventType::Warning,
            "InsufficientMemory",
            format!("pool {} cannot hold {}", pool.name, pool.serve.join(", ")),
        )
        .await;
    } else {
        let manifest = pool_manifest(md, pool)?;
        let mut wrote = Vec::new();
        // The manifest first: pods of a new template must never start with the old manifest.
        if apply(&apis.config_maps, &caches.config_maps, ns, &config_map(md, pool, &manifest))
            .await?
            .is_some()
        {
            wrote.push("ConfigMap".to_string());
        }
        // The rest do not depend on one another: one round trip instead of four.
        let desired = deployment(md, pool, &manifest, &ctx.settings);
        let desired_service = service(md, pool);
        let (deployment_written, service_written, pdb_written, hpa_written) = futures::try_join!(
            apply(&apis.deployments, &caches.deployments, ns, &desired),
            apply(&apis.services, &caches.services, ns, &desired_service),
            apply_or_remove(&apis.pdbs, &caches.pdbs, ns, &name, &uid, pdb(md, pool)),
            apply_or_remove(&apis.hpas, &caches.hpas, ns, &name, &uid, hpa(md, pool)),
        )?;
        if deployment_written.is_some() {
            wrote.push("Deployment".to_string());
            deployment_seen = deployment_written;
        }
        if service_written.is_some() {
            wrote.push("Service".to_string());
        }
        wrote.extend(pdb_written);
        wrote.extend(hpa_written);
        if !wrote.is_empty() {
            tracing::info!(objects = ?wrote, "applied");
            event(ctx, md, EventType::Normal, "Applied", format!("pool {}: {}", pool.name, wrote.join(", ")))
                .await;
        }
    }
    let selector = resources::selector_labels(md, pool);
    let selector: Vec<(&str, &str)> = selector.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let pods: Vec<Pod> = cache::labelled(&caches.pods, ns, &selector).iter().map(|p| Pod::clone(p)).collect();
    // A foreign Deployment of our name says nothing about our pool.
    let deployment = deployment_seen.or_else(|| {
        cache::get(&caches.deployments, ns, &name)
            .filter(|d| controlled_by(d.meta(), &uid))
            .map(|d| (*d).clone())
    });
    let reports = if md.spec.serves_lazy(pool) { crate::pod_status::read(&pods).await } else { Vec::new() };
    Ok(PoolObservation { deployment, pods, fit, conflicts, reports })
}

/// The pool's objects (those the spec wants) that exist without this resource as their
/// controller, as `Kind namespace/name`.
async fn conflicts(
    md: &ModelDeployment,
    pool: &PoolSpec,
    ctx: &Context,
    apis: &PoolApis,
    ns: &str,
) -> Result<Vec<String>, Error> {
    let caches = &ctx.caches;
    let uid = md.metadata.uid.clone().unwrap_or_default();
    let name = resources::pool_object_name(md, pool);
    let cm = resources::config_map_name(md, pool);
    let (d, s, c) = futures::try_join!(
        foreign(&apis.deployments, &caches.deployments, ns, &name, &uid),
        foreign(&apis.services, &caches.services, ns, &name, &uid),
        foreign(&apis.config_maps, &caches.config_maps, ns, &cm, &uid),
    )?;
    let mut found: Vec<String> = [d, s, c].into_iter().flatten().collect();
    if pdb(md, pool).is_some() {
        found.extend(foreign(&apis.pdbs, &caches.pdbs, ns, &name, &uid).await?);
    }
    if hpa(md, pool).is_some() {
        found.extend(foreign(&apis.hpas, &caches.hpas, ns, &name, &uid).await?);
    }
    Ok(found)
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().ok_or(Error::NoNamespace)?;
    let client = ctx.client.clone();
    let apis = PoolApis::new(&client, &ns);

    let mut observations = Vec::new();
    for pool in &md.spec.pools {
        let span = tracing::info_span!("pool", pool = %pool.name);
        observations.push(reconcile_pool(md, pool, ctx, &apis, &ns).instrument(span).await?);
    }

    let pools: Vec<String> = md.spec.pools.iter().map(|p| p.name.clone()).collect();
    let removed = apis.prune(&ctx.caches, md, &ns, &pools).await?;
    if !removed.is_empty() {
        event(ctx, md, EventType::Normal, "PoolRemoved", format!("deleted {}", removed.join(", "))).await;
    }

    let mut new_status = status::compute(md, &observations);
    status::keep_transition_times(&mut new_status, md.status.as_ref());
    if md.status.as_ref() != Some(&new_status) {
        let api: Api<ModelDeployment> = Api::namespaced(client, &ns);
        let patch =
            json!({"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "status": new_status});
        api.patch_status(&md.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
    }
    // Owned objects wake us on change; the requeue is a safety net for missed events. Lazy
    // models load and unload without any object changing: their status is refreshed on a
    // timer.
    let settled = observations.iter().all(|o| o.deployment.is_some())
        && new_status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let lazy = md.spec.models.iter().any(ModelSpec::is_lazy);
    Ok(Action::requeue(match (settled, lazy) {
        (false, _) => Duration::from_secs(15),
        (true, true) => LAZY_STATUS_REFRESH,
        (true, false) => Duration::from_secs(300),
    }))
}

pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(md = %md.name_any(), %error, "reconcile failed; retrying");
    let _ = ctx;
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod mock_api;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_ignores_fields_the_server_added_but_not_changed_values() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "server", "image": "a"}]}}}});
        let live = json!({"metadata": {"uid": "x"}, "spec": {"replicas": 2, "progressDeadlineSeconds": 600,
            "template": {"spec": {"containers": [{"name": "server", "image": "a", "imagePullPolicy": "IfNotPresent"}]}}}});
        assert!(is_subset(&desired, &live));
        let edited = json!({"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "server", "image": "a"}]}}}});
        assert!(!is_subset(&desired, &edited), "a hand edit is noticed and restored");
        let extra = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "server", "image": "a"}, {"name": "sidecar"}]}}}});
        assert!(!is_subset(&desired, &extra), "lists must match in length");
    }

    #[test]
    fn lazy_models_count_once_the_largest_and_the_budget_caps_the_fit() {
        let settings = OperatorSettings::default();
        let headroom = settings.memory_headroom_bytes;
        let mut md = crate::resources::testing::sample("embeddings-many.yaml");
        let pool = md.spec.pools[0].clone();
        let f = fit(&md, &pool, &settings);
        // MiniLM (120Mi) stays; the lazy ones (160Mi each) take turns.
        assert_eq!(f.required, (120 << 20) + (160 << 20) + headroom);
        assert_eq!(f.available, Some((300 << 20) + headroom), "the budget, not the 1Gi limit");
        assert_eq!(f.largest_lazy.as_deref(), Some("bge-small:v1"));
        assert!(f.fits());
        // A lazy model that cannot fit beside the preloaded one is a misfit naming it.
        md.spec.models[2].memory = Some("200Mi".into());
        let misfit = fit(&md, &pool, &settings);
        assert!(!misfit.fits());
        let message = misfit.misfit(&pool);
        assert!(
            message.contains("need 320Mi")
                && message.contains("e5-small:v2")
                && message.contains("memoryBudget is 300Mi"),
            "{message}"
        );
        // A budget larger than the container can give is refused, naming both.
        let mut big = pool.clone();
        big.memory_budget = Some("2Gi".into());
        let over = fit(&md, &big, &settings);
        assert!(!over.fits());
        let message = over.misfit(&big);
        assert!(message.contains("memoryBudget 2Gi") && message.contains("memory limit"), "{message}");
        // Every model preloaded: all of them count.
        md.spec.models.iter_mut().for_each(|m| m.load = None);
        let all = fit(&md, &pool, &settings);
        assert_eq!(all.required, (120 << 20) + (160 << 20) + (200 << 20) + headroom);
        assert_eq!(all.largest_lazy, None);
    }

    #[test]
    fn a_lazy_generation_model_without_a_kv_budget_counts_the_shared_one() {
        let settings = OperatorSettings::default();
        let mut md = crate::resources::testing::sample("textgen-pvc.yaml");
        md.spec.models[0].kv_cache_memory = None;
        md.spec.models[0].load = Some(crate::crd::Load::Lazy);
        let pool = md.spec.pools[0].clone();
        assert_eq!(
            fit(&md, &pool, &settings).required,
            (200 << 20) + SHARED_KV_CACHE_BYTES + settings.memory_headroom_bytes
        );
    }

    #[test]
    fn memory_fit_uses_gpu_memory_or_the_memory_limit() {
        let md = crate::resources::testing::sample("embeddings-ab-gpu.yaml");
        let settings = OperatorSettings::default();
        let f = fit(&md, &md.spec.pools[0], &settings);
        assert_eq!(f.required, (450 << 20) + settings.memory_headroom_bytes);
        assert_eq!(f.available, Some(80 << 30));
        assert!(f.fits());
        let cpu = crate::resources::testing::sample("embeddings-cpu.yaml");
        let mut pool = cpu.spec.pools[0].clone();
        assert_eq!(fit(&cpu, &pool, &settings).available, Some(1 << 30));
        pool.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            limits: Some(
                [(
                    "memory".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("200Mi".into()),
                )]
                .into(),
            ),
            ..Default::default()
        });
        let misfit = fit(&cpu, &pool, &settings);
        assert!(!misfit.fits(), "120Mi + headroom does not fit in 200Mi");
    }

    #[test]
    fn a_generation_models_kv_cache_counts_in_the_fit() {
        let settings = OperatorSettings::default();
        let mut md = crate::resources::testing::sample("textgen-pvc.yaml");
        let pool = md.spec.pools[0].clone();
        assert_eq!(
            fit(&md, &pool, &settings).required,
            (200 << 20) + (1 << 30) + settings.memory_headroom_bytes
        );
        // Without a budget the server takes what the limit leaves; the fit asks for a minimum.
        md.spec.models[0].kv_cache_memory = None;
        assert_eq!(
            fit(&md, &pool, &settings).required,
            (200 << 20) + MIN_KV_CACHE_BYTES + settings.memory_headroom_bytes
        );
        // A budget larger than the pool's memory is a misfit, not a surprise at run time.
        md.spec.models[0].kv_cache_memory = Some("30Gi".into());
        assert!(!fit(&md, &pool, &settings).fits());
        // And it reaches the server through the manifest.
        md.spec.models[0].kv_cache_memory = Some("1536Mi".into());
        let manifest = pool_manifest(&md, &pool).expect("manifest");
        assert_eq!(manifest.models[0].kv_cache_bytes, Some(1536 << 20));
    }

    #[test]
    fn the_grace_period_is_split_into_a_drain_delay_and_a_shutdown_deadline() {
        assert_eq!(crate::resources::shutdown_timing(30), (10, 15));
        assert_eq!(crate::resources::shutdown_timing(12), (4, 3));
        let (drain, shutdown) = crate::resources::shutdown_timing(120);
        assert_eq!(drain, 10, "a drain delay past endpoint propagation gains nothing");
        assert!(drain + shutdown < 120);
    }
}
