//! Reconcile against a mocked API server (kube's `Client` over a tower service, as
//! controller-rs does with tower-test; a `service_fn` needs no extra crate): the world is a map
//! from request path to the object the server holds, and every request that is not a GET is
//! recorded as a write.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::resources::testing::sample;
use crate::resources::{
    OperatorSettings, config_map, deployment, pdb, pool_manifest, pool_object_name, service,
};
use crate::status;

/// Every request as `METHOD path`, in order.
type Writes = Arc<Mutex<Vec<String>>>;

/// Serves GETs from `world` (404 when absent, empty lists for collections) and records the
/// method and path of everything else, answering it with success.
fn mock_client(world: BTreeMap<String, Value>) -> (Client, Writes) {
    let writes: Writes = Arc::default();
    let log = writes.clone();
    let world = Arc::new(world);
    let service = tower::service_fn(move |request: Request<Body>| {
        let world = world.clone();
        let log = log.clone();
        async move {
            let path = request.uri().path().to_string();
            let method = request.method().clone();
            let (status, body) = if method == http::Method::GET {
                log.lock().expect("requests").push(format!("GET {path}"));
                match world.get(&path) {
                    Some(obj) => (StatusCode::OK, obj.clone()),
                    // A collection (list) request: nothing labelled ours beyond what is named.
                    None if request.uri().query().is_some_and(|q| q.contains("labelSelector")) => (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
                    ),
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                }
            } else {
                log.lock().expect("writes").push(format!("{method} {path}"));
                // Echo what was written, as the server returns the object it stored.
                let sent = request.into_body().collect_bytes().await.unwrap_or_default();
                let mut echo: Value = serde_json::from_slice(&sent).unwrap_or(json!({}));
                // A status write answers with the whole object, new status included.
                if let Some(base) = path.strip_suffix("/status").and_then(|b| world.get(b)) {
                    let mut whole = base.clone();
                    whole["status"] = echo["status"].clone();
                    echo = whole;
                }
                if echo.get("metadata").is_none() {
                    echo["metadata"] = json!({});
                }
                (StatusCode::OK, echo)
            };
            let bytes = serde_json::to_vec(&body).expect("json");
            Response::builder().status(status).body(Body::from(bytes))
        }
    });
    (Client::new(service, "ml"), writes)
}

fn settings() -> OperatorSettings {
    OperatorSettings {
        model_server_image: "kiln/model-server:test".into(),
        model_server_cuda_image: "kiln/model-server:test-cuda".into(),
        memory_headroom_bytes: 256 << 20,
    }
}

fn with_kind(mut v: Value, api_version: &str, kind: &str) -> Value {
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    v
}

/// The cluster as the operator left it: every child exactly as built, the Deployment rolled
/// out and ready, and the resource's status what `compute` says about that.
fn steady_world(md: &mut ModelDeployment) -> BTreeMap<String, Value> {
    let mut world = BTreeMap::new();
    let pool = md.spec.pools[0].clone();
    let manifest = pool_manifest(md, &pool).expect("manifest");
    let name = pool_object_name(md, &pool);
    let ns = "/api/v1/namespaces/ml";
    let apps = "/apis/apps/v1/namespaces/ml";
    let cm = serde_json::to_value(config_map(md, &pool, &manifest)).expect("cm");
    world.insert(format!("{ns}/configmaps/{name}-manifest"), with_kind(cm, "v1", "ConfigMap"));
    let mut d = serde_json::to_value(deployment(md, &pool, &manifest, &settings())).expect("deployment");
    let replicas = d["spec"]["replicas"].clone();
    d["metadata"]["generation"] = json!(1);
    d["status"] = json!({"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas});
    world.insert(format!("{apps}/deployments/{name}"), with_kind(d.clone(), "apps/v1", "Deployment"));
    let svc = serde_json::to_value(service(md, &pool)).expect("service");
    world.insert(format!("{ns}/services/{name}"), with_kind(svc, "v1", "Service"));
    if let Some(p) = pdb(md, &pool) {
        let p = serde_json::to_value(p).expect("pdb");
        world.insert(
            format!("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/{name}"),
            with_kind(p, "policy/v1", "PodDisruptionBudget"),
        );
    }
    let observed = status::PoolObservation {
        deployment: Some(serde_json::from_value(d).expect("deployment")),
        pods: vec![],
        fit: fit(md, &pool, &settings()),
        conflicts: vec![],
        reports: vec![],
    };
    md.status = Some(status::compute(md, &[observed]));
    let me = serde_json::to_value(&*md).expect("md");
    world.insert(
        "/apis/kiln.dev/v1alpha1/namespaces/ml/modeldeployments/embeddings".into(),
        with_kind(me, "kiln.dev/v1alpha1", "ModelDeployment"),
    );
    world
}

/// The watch caches as they would be after listing `world`: like the real label-selected
/// watches, they hold only objects labelled with a ModelDeployment.
fn caches(world: &BTreeMap<String, Value>) -> Caches {
    let labelled: Vec<Value> =
        world.values().filter(|v| !v["metadata"]["labels"][LABEL_MD].is_null()).cloned().collect();
    Caches::listing(&labelled)
}

/// Reconciles once; returns the writes, after asserting that nothing the caches hold was read
/// from the server (an object about to be created is looked up by name: it may exist unlabelled).
async fn run(md: ModelDeployment, world: BTreeMap<String, Value>) -> Vec<String> {
    let caches = caches(&world);
    let cached: Vec<String> = world
        .iter()
        .filter(|(_, v)| !v["metadata"]["labels"][LABEL_MD].is_null())
        .map(|(path, _)| path.clone())
        .collect();
    let (client, writes) = mock_client(world);
    let ctx = Arc::new(Context {
        client: client.clone(),
        caches,
        settings: settings(),
        metrics: Arc::new(OperatorMetrics::new().expect("metrics")),
        recorder: Recorder::new(
            client,
            kube::runtime::events::Reporter { controller: "test".into(), instance: None },
        ),
    });
    reconcile(Arc::new(md), ctx).await.expect("reconcile");
    let requests = writes.lock().expect("requests").clone();
    let reads: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET"))
        .filter(|r| cached.iter().any(|c| r.ends_with(c.as_str())) || r.contains('?'))
        .collect();
    assert!(reads.is_empty(), "reads must come from the watch caches, not the API server: {reads:?}");
    requests
}

#[tokio::test]
async fn an_object_of_the_pools_name_that_is_not_ours_is_never_written() {
    let mut md = sample("embeddings-cpu.yaml");
    let mut world = steady_world(&mut md);
    // Someone else's Service of the pool's name: no owner reference, none of our labels.
    world.insert(
        "/api/v1/namespaces/ml/services/embeddings-cpu".into(),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "embeddings-cpu", "namespace": "ml",
            "labels": {"app": "someone-else"}}, "spec": {"ports": [{"port": 80}]}}),
    );
    // A version change, so the pool has writes to make.
    md.spec.models[0].version = "v3".into();
    md.spec.pools[0].serve = vec!["minilm:v3".into()];
    let writes = run(md, world).await;
    let pool_writes: Vec<&String> = writes
        .iter()
        .filter(|w| !w.starts_with("GET") && !w.contains("/events") && !w.ends_with("/status"))
        .collect();
    assert!(pool_writes.is_empty(), "nothing of the pool is written while a name conflicts: {pool_writes:?}");
    assert!(writes.iter().any(|w| w.ends_with("/modeldeployments/embeddings/status")), "{writes:?}");
}

#[tokio::test]
async fn a_removed_pool_loses_its_objects_and_others_are_kept() {
    let mut md = sample("embeddings-cpu.yaml");
    let mut world = steady_world(&mut md);
    // A second pool's objects exist, owned by this resource, but the spec no longer names it.
    let uid = md.metadata.uid.clone().unwrap_or_default();
    for (path, kind) in [
        ("/apis/apps/v1/namespaces/ml/deployments/embeddings-old", "Deployment"),
        ("/api/v1/namespaces/ml/services/embeddings-old", "Service"),
    ] {
        let api_version = if kind == "Deployment" { "apps/v1" } else { "v1" };
        world.insert(
            path.into(),
            json!({"apiVersion": api_version, "kind": kind, "metadata": {
                "name": "embeddings-old", "namespace": "ml",
                "labels": {LABEL_MD: "embeddings", LABEL_POOL: "old"},
                "ownerReferences": [{"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment",
                    "name": "embeddings", "uid": uid, "controller": true}]}}),
        );
    }
    // And an object labelled alike but owned by someone else is left alone.
    world.insert(
        "/api/v1/namespaces/ml/configmaps/embeddings-old-manifest".into(),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "embeddings-old-manifest", "namespace": "ml",
            "labels": {LABEL_MD: "embeddings", LABEL_POOL: "old"}}}),
    );
    let writes = run(md, world).await;
    let deletes: Vec<&String> = writes.iter().filter(|w| w.starts_with("DELETE")).collect();
    assert_eq!(
        deletes,
        vec![
            "DELETE /apis/apps/v1/namespaces/ml/deployments/embeddings-old",
            "DELETE /api/v1/namespaces/ml/services/embeddings-old",
        ]
    );
}

#[tokio::test]
async fn an_unchanged_resource_causes_no_write_at_all() {
    let mut md = sample("embeddings-cpu.yaml");
    let world = steady_world(&mut md);
    let writes = run(md, world).await;
    assert!(writes.is_empty(), "a steady state wrote: {writes:?}");
}

#[tokio::test]
async fn a_version_change_applies_exactly_the_manifest_and_the_deployment() {
    let mut md = sample("embeddings-cpu.yaml");
    let world = steady_world(&mut md);
    // The user bumps the model version the pool serves.
    md.spec.models[0].version = "v3".into();
    md.spec.pools[0].serve = vec!["minilm:v3".into()];
    let writes = run(md, world).await;
    let applies: Vec<&String> = writes.iter().filter(|w| !w.contains("/events")).collect();
    assert_eq!(
        applies,
        vec![
            "PATCH /api/v1/namespaces/ml/configmaps/embeddings-cpu-manifest",
            "PATCH /apis/apps/v1/namespaces/ml/deployments/embeddings-cpu",
            "PATCH /apis/kiln.dev/v1alpha1/namespaces/ml/modeldeployments/embeddings/status",
        ],
        "the Service and PDB are unchanged and must not be written"
    );
    assert!(
        writes.iter().any(|w| w.starts_with("POST") && w.contains("/events")),
        "an Applied event: {writes:?}"
    );
}

#[tokio::test]
async fn a_deleted_child_is_recreated_and_nothing_else_is_touched() {
    let mut md = sample("embeddings-cpu.yaml");
    let mut world = steady_world(&mut md);
    world.remove("/api/v1/namespaces/ml/services/embeddings-cpu");
    let writes = run(md, world).await;
    let applies: Vec<&String> = writes.iter().filter(|w| !w.contains("/events")).collect();
    // Absent from the cache, so looked up by name first (someone else's could be there).
    assert_eq!(
        applies,
        vec![
            "GET /api/v1/namespaces/ml/services/embeddings-cpu",
            "PATCH /api/v1/namespaces/ml/services/embeddings-cpu"
        ]
    );
}
