//! The reconciler: observe the pool objects, compute desired state (pure, in `resources`),
//! apply what differs with server-side apply, report status. An unchanged resource costs reads
//! only: nothing is written when every field we own already has the desired value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::crd::{ModelDeployment, PoolSpec};
use crate::metrics::OperatorMetrics;
use crate::quantity::parse_bytes;
use crate::resources::{
    self, FIELD_MANAGER, LABEL_MD, LABEL_POOL, OperatorSettings, config_map, deployment, hpa, pdb,
    pool_manifest, service,
};
use crate::status::{self, Fit, PoolObservation};

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

/// Server-side apply `obj` unless the live object already matches it. Returns whether it wrote,
/// and the object as the server now holds it (so callers need not read it again).
async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(bool, K), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if let Some(live) = api.get_opt(&name).await? {
        let desired = serde_json::to_value(obj).map_err(kube::Error::SerdeError)?;
        let live_json = serde_json::to_value(&live).map_err(kube::Error::SerdeError)?;
        if is_subset(&strip_meta(desired), &live_json) {
            return Ok((false, live));
        }
    }
    let mut body = serde_json::to_value(obj).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = json!(K::api_version(&K::DynamicType::default()));
    body["kind"] = json!(K::kind(&K::DynamicType::default()));
    let written = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok((true, written))
}

/// A child the spec may or may not want (PDB, HPA): apply it when wanted, delete it when not.
/// Returns what was written, for the log and the event.
async fn apply_or_remove<K>(
    api: &Api<K>,
    name: &str,
    desired: Option<K>,
) -> Result<Option<String>, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    match desired {
        Some(obj) => Ok(apply(api, &obj).await?.0.then_some(kind)),
        None if api.get_opt(name).await?.is_some() => {
            api.delete(name, &DeleteParams::default()).await?;
            Ok(Some(format!("{kind} (deleted)")))
        }
        None => Ok(None),
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

/// Delete objects labelled for this resource whose pool is no longer in the spec.
async fn prune<K>(api: &Api<K>, md: &ModelDeployment, pools: &[String]) -> Result<Vec<String>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("{LABEL_MD}={}", md.name_any()));
    let mut removed = Vec::new();
    for obj in api.list(&lp).await? {
        let pool = obj.labels().get(LABEL_POOL).cloned().unwrap_or_default();
        let owned = obj.owner_references().iter().any(|o| Some(&o.uid) == md.metadata.uid.as_ref());
        if owned && !pools.contains(&pool) {
            api.delete(&obj.name_any(), &DeleteParams::background()).await?;
            removed.push(obj.name_any());
        }
    }
    Ok(removed)
}

fn fit(md: &ModelDeployment, pool: &PoolSpec, settings: &OperatorSettings) -> Fit {
    let mut required = settings.memory_headroom_bytes;
    let mut unknown_size = Vec::new();
    for entry in &pool.serve {
        let model = md.spec.models.iter().find(|m| m.id().to_string() == *entry);
        match model.and_then(|m| m.memory.as_deref()).and_then(parse_bytes) {
            Some(b) => required += b,
            None => unknown_size.push(entry.clone()),
        }
    }
    let available = if pool.gpus > 0 {
        pool.gpu_memory.as_deref().and_then(parse_bytes).map(|per| per * u64::from(pool.gpus))
    } else {
        pool.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_bytes(&q.0))
    };
    Fit { required, available, unknown_size }
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

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().ok_or(Error::NoNamespace)?;
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let mut observations = Vec::new();
    for pool in &md.spec.pools {
        let name = resources::pool_object_name(md, pool);
        let fit = fit(md, pool, &ctx.settings);
        // The Deployment as applied, when this pass applied it; read below otherwise.
        let mut deployment_seen = None;
        let span = tracing::info_span!("pool", pool = %pool.name);
        let _enter = span.enter();
        if !fit.fits() {
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
            if apply(&config_maps, &config_map(md, pool, &manifest)).await?.0 {
                wrote.push("ConfigMap".to_string());
            }
            let (changed, live) =
                apply(&deployments, &deployment(md, pool, &manifest, &ctx.settings)).await?;
            if changed {
                wrote.push("Deployment".to_string());
            }
            deployment_seen = Some(live);
            if apply(&services, &service(md, pool)).await?.0 {
                wrote.push("Service".to_string());
            }
            wrote.extend(apply_or_remove(&pdbs, &name, pdb(md, pool)).await?);
            wrote.extend(apply_or_remove(&hpas, &name, hpa(md, pool)).await?);
            if !wrote.is_empty() {
                tracing::info!(objects = ?wrote, "applied");
                event(
                    ctx,
                    md,
                    EventType::Normal,
                    "Applied",
                    format!("pool {}: {}", pool.name, wrote.join(", ")),
                )
                .await;
            }
        }
        let selector = resources::selector_labels(md, pool)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods = pods_api.list(&ListParams::default().labels(&selector)).await?.items;
        let deployment = match deployment_seen {
            Some(d) => Some(d),
            None => deployments.get_opt(&name).await?,
        };
        observations.push(PoolObservation { deployment, pods, fit });
    }

    let pools: Vec<String> = md.spec.pools.iter().map(|p| p.name.clone()).collect();
    let mut removed = prune(&deployments, md, &pools).await?;
    removed.extend(prune(&services, md, &pools).await?);
    removed.extend(prune(&config_maps, md, &pools).await?);
    removed.extend(prune(&pdbs, md, &pools).await?);
    removed.extend(prune(&hpas, md, &pools).await?);
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
    // Owned objects wake us on change; the requeue is a safety net for missed events.
    let settled = observations.iter().all(|o| o.deployment.is_some())
        && new_status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    Ok(Action::requeue(if settled { Duration::from_secs(300) } else { Duration::from_secs(15) }))
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
}
