//! Kiln on a real control plane (`make e2e`): the upstream API server, controller-manager and
//! scheduler, kwok for simulated GPU nodes, and a kubelet harness that runs the real
//! `kiln-model-server` for pods on node cpu-0.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kiln_e2e::*;
use kiln_operator::crd::ModelDeployment;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

mod autoscaling;

/// A change that makes a valid resource invalid.
type Mutation = Box<dyn Fn(&mut Value)>;

fn sha256_file(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

fn fixture() -> std::path::PathBuf {
    let root = std::env::var_os("KILN_FIXTURES").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kiln/fixtures")
    });
    let dir = root.join("minilm");
    assert!(dir.join("model.safetensors").is_file(), "run `make fixtures` first");
    dir
}

/// A CPU pool pinned to the harness's node, serving the real MiniLM from a file:// source with
/// pinned digests (the init container's `pull` verifies them).
fn cpu_md(ns: &str, name: &str, replicas: i32) -> Value {
    let dir = fixture();
    let sha: BTreeMap<String, String> = ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), sha256_file(&dir.join(f))))
        .collect();
    json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "family": "text-embedding",
            "models": [{
                "name": "minilm", "version": "v2",
                "source": {"uri": format!("file://{}/", dir.display()), "sha256": sha},
                "memory": "120Mi"
            }],
            "pools": [{
                "name": "cpu",
                "nodeSelector": {"kiln.dev/pool": "cpu", "kiln.dev/harness": "real"},
                "gpus": 0,
                "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                "serve": ["minilm:v2"],
                "replicas": replicas
            }],
            "warmup": {"iterations": 2, "timeoutSeconds": 120}
        }
    })
}

/// `cpu_md` on the simulated CPU pool (kwok), for tests about the operator rather than the server.
fn sim_md(ns: &str, name: &str, replicas: i32) -> Value {
    let mut md = cpu_md(ns, name, replicas);
    md["spec"]["pools"][0]["nodeSelector"] = json!({"kiln.dev/pool": "cpu-sim"});
    md
}

async fn md_status(client: &Client, ns: &str, name: &str) -> Value {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let md = api.get(name).await.expect("get md");
    serde_json::to_value(md.status).unwrap_or(Value::Null)
}

async fn wait_md_ready(client: &Client, ns: &str, name: &str, timeout: Duration) {
    wait_for(&format!("md/{name} Ready=True"), timeout, || async {
        let s = md_status(client, ns, name).await;
        match condition(&s, "Ready") {
            Some(c) if c["status"] == "True" => Ok(()),
            _ => Err(s.to_string()),
        }
    })
    .await;
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

async fn mark_real_node(client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {"kiln.dev/harness": "real"}}});
    nodes.patch("cpu-0", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("label cpu-0");
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_installs_and_refuses_invalid_resources_with_their_messages() {
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "ml").await;
    // Every sample is accepted (server-side dry run: validation runs, nothing is stored).
    for sample in ["embeddings-cpu.yaml", "embeddings-ab-gpu.yaml", "textgen-pvc.yaml"] {
        let path = repo().join("config/samples").join(sample);
        kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("sample {sample} refused: {e}"));
    }
    let base = cpu_md(&ns.name, "valid", 1);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "serve names a missing model",
            Box::new(|v| v["spec"]["pools"][0]["serve"] = json!(["nope:v1"])),
            "serve",
        ),
        (
            "bad sha256",
            Box::new(|v| v["spec"]["models"][0]["source"]["sha256"]["config.json"] = json!("xyz")),
            "sha256",
        ),
        ("bad scheme", Box::new(|v| v["spec"]["models"][0]["source"]["uri"] = json!("ftp://x/")), "uri"),
        (
            "replicas with autoscaling",
            Box::new(|v| {
                v["spec"]["pools"][0]["autoscaling"] =
                    json!({"minReplicas": 1, "maxReplicas": 2, "targetQueueDepth": 4})
            }),
            "autoscaling",
        ),
        (
            "self fallback",
            Box::new(|v| v["spec"]["models"][0]["fallback"] = json!({"name": "minilm", "version": "v2"})),
            "fallback",
        ),
        ("bad memory", Box::new(|v| v["spec"]["models"][0]["memory"] = json!("lots")), "memory"),
        (
            "credentials in the source URI",
            Box::new(|v| {
                v["spec"]["models"][0]["source"]["uri"] = json!("https://user:secret@mirror/minilm/")
            }),
            "credentialsSecret",
        ),
        (
            "a KV budget on an embedding model",
            Box::new(|v| v["spec"]["models"][0]["kvCacheMemory"] = json!("1Gi")),
            "text-generation models only",
        ),
    ];
    for (what, mutate, needle) in cases {
        let mut bad = base.clone();
        mutate(&mut bad);
        let file = std::env::temp_dir().join("kiln-e2e-invalid.json");
        std::fs::write(&file, serde_json::to_vec(&bad).unwrap()).unwrap();
        let err = kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()])
            .expect_err(&format!("{what}: the API server accepted an invalid resource"));
        let msg = err.to_string();
        assert!(msg.contains("Invalid") && msg.contains(needle), "{what}: unexpected refusal: {msg}");
    }
}

/// Every operator log line is JSON, and every line logged while reconciling carries the
/// resource (name and namespace) in its span list, and the pool where there is one.
fn assert_logs_name_the_resource(logs: &str, namespace: &str, name: &str) {
    let mut in_reconcile = 0;
    for line in logs.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let Some(spans) = v["spans"].as_array() else { continue };
        let pool_span = spans.iter().any(|s| s["name"] == "pool");
        let Some(reconcile) = spans.iter().find(|s| s["name"] == "reconcile") else {
            assert!(!pool_span, "a pool span outside any reconcile span: {line}");
            continue;
        };
        assert!(reconcile["md"].is_string(), "a reconcile span without its resource: {line}");
        if reconcile["md"] != name {
            continue;
        }
        in_reconcile += 1;
        assert_eq!(reconcile["namespace"], namespace, "{line}");
        if let Some(pool) = spans.iter().find(|s| s["name"] == "pool") {
            assert!(pool["pool"].is_string(), "pool span without its pool: {line}");
        }
    }
    assert!(in_reconcile > 0, "no log line inside a reconcile of {name}: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_pool_serves_real_embeddings_only_after_warmup_and_converges() {
    let client = admin().await;
    install_crd().await;
    mark_real_node(&client).await;
    let ns = TestNamespace::create(&client, "e2e-cpu").await;
    let n = ns.name.as_str();
    let operator = Operator::start(n).await;
    apply_json(&client, n, &cpu_md(n, "embeddings", 1)).await.expect("apply md");
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), n);
    let uid = mds.get("embeddings").await.unwrap().uid().unwrap();

    // Children, each owned by the resource.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let deployment = eventually(&deployments, "embeddings-cpu", Duration::from_secs(60)).await;
    assert!(owned_by(&deployment.metadata, &uid));
    let service = eventually(&services, "embeddings-cpu", Duration::from_secs(60)).await;
    assert!(owned_by(&service.metadata, &uid));
    let cm = eventually(&config_maps, "embeddings-cpu-manifest", Duration::from_secs(60)).await;
    assert!(owned_by(&cm.metadata, &uid));
    let manifest =
        kiln_model_server::manifest::Manifest::from_json(&cm.data.unwrap()["manifest.json"]).unwrap();
    assert_eq!(manifest.models[0].name, "minilm");
    let strategy =
        deployment.spec.as_ref().unwrap().strategy.as_ref().unwrap().rolling_update.clone().unwrap();
    assert_eq!(
        serde_json::to_value(&strategy).unwrap(),
        json!({"maxSurge": 1, "maxUnavailable": 0}),
        "rollouts never drop below the desired ready replicas"
    );

    // The pod lands on the harness's node, runs the real pull and serve, and turns Ready only
    // when the server's own readiness (warmup included) says so.
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let pod = wait_for("a Ready model-server pod", Duration::from_secs(300), || async {
        let list =
            pods.list(&ListParams::default().labels("kiln.dev/pool=cpu")).await.map_err(|e| e.to_string())?;
        let pod = list.items.into_iter().next().ok_or("no pod yet")?;
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready { Ok(pod) } else { Err(format!("{:?}", pod.status)) }
    })
    .await;
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("cpu-0"));
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().expect("pod IP");
    let http = reqwest::Client::new();
    let ready: Value =
        http.get(format!("http://{ip}:8080/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["models"]["minilm:v2"]["state"], "Ready", "{ready}");
    assert!(
        ready["models"]["minilm:v2"]["warmupSeconds"].as_f64().is_some(),
        "warmup ran before Ready: {ready}"
    );

    // The Service's EndpointSlice lists the ready pod, and an embeddings request through that
    // endpoint answers from the real model.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), n);
    let endpoint = first_ready_endpoint(&slices, "embeddings-cpu", Duration::from_secs(60)).await;
    assert_eq!(endpoint, ip);
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/v1/embeddings"))
        .json(&json!({"model": "minilm:v2", "input": ["Kiln keeps pods out of endpoints until the model is warm."]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dims = resp["data"][0]["embedding"].as_array().map(Vec::len);
    assert_eq!(dims, Some(384), "{resp}");

    // Status tells the truth, and kubectl reads it.
    wait_md_ready(&client, n, "embeddings", Duration::from_secs(60)).await;
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "md/embeddings", "--timeout=30s"])
        .expect("kubectl wait");
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("FAMILY") && table.contains("READY") && table.contains("MODELS"), "{table}");
    assert!(
        table.contains("text-embedding") && table.contains("1/1") && table.contains("minilm:v2"),
        "{table}"
    );

    // Steady state: a reconcile of the unchanged resource writes nothing. A metadata-only edit
    // (no generation change) makes the operator reconcile it now rather than at its next resync.
    let applied = |logs: String| logs.lines().filter(|l| l.contains("\"applied\"")).count();
    let reconciles = |metrics: String| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("kiln_operator_reconciles_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let applied_before = applied(operator.logs());
    let reconciles_before = reconciles(operator.metrics_text().await);
    let poke = json!({"metadata": {"annotations": {"kiln.dev/e2e-poke": "1"}}});
    mds.patch("embeddings", &PatchParams::default(), &Patch::Merge(&poke)).await.expect("poke");
    wait_for("a reconcile of the unchanged resource", Duration::from_secs(30), || async {
        let now = reconciles(operator.metrics_text().await);
        if now > reconciles_before { Ok(()) } else { Err(format!("{now} reconciles")) }
    })
    .await;
    let versions = || async {
        vec![
            mds.get("embeddings").await.unwrap().resource_version(),
            deployments.get("embeddings-cpu").await.unwrap().resource_version(),
            services.get("embeddings-cpu").await.unwrap().resource_version(),
            config_maps.get("embeddings-cpu-manifest").await.unwrap().resource_version(),
        ]
    };
    let before = versions().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(versions().await, before, "a steady state caused writes over a minute");
    assert_eq!(
        applied(operator.logs()),
        applied_before,
        "the unchanged resource was re-applied: {}",
        operator.logs()
    );

    // A child deleted by hand comes back.
    let old = services.get("embeddings-cpu").await.unwrap().uid();
    services.delete("embeddings-cpu", &DeleteParams::default()).await.unwrap();
    wait_for("the Service restored", Duration::from_secs(60), || async {
        match services.get_opt("embeddings-cpu").await {
            Ok(Some(s)) if s.uid() != old => Ok(()),
            other => Err(format!("{:?}", other.map(|s| s.map(|s| s.uid())))),
        }
    })
    .await;
    // A child edited by hand is put back: the Deployment's image is ours to decide.
    let image = |d: &Deployment| {
        d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone())
    };
    let ours = image(&deployments.get("embeddings-cpu").await.unwrap());
    let edit = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "someone/else:latest"}]}}}});
    deployments
        .patch("embeddings-cpu", &PatchParams::default(), &Patch::Strategic(&edit))
        .await
        .expect("edit by hand");
    wait_for("the edited Deployment restored", Duration::from_secs(60), || async {
        let d = deployments.get("embeddings-cpu").await.map_err(|e| e.to_string())?;
        if image(&d) == ours { Ok(()) } else { Err(format!("{:?}", image(&d))) }
    })
    .await;

    let metrics = operator.metrics_text().await;
    assert!(metrics.contains("kiln_operator_reconciles_total"), "{metrics}");
    assert_logs_name_the_resource(&operator.logs(), n, "embeddings");

    // Deleting the resource garbage-collects every child (the GC re-reads discovery every 30 s).
    mds.delete("embeddings", &DeleteParams::default()).await.unwrap();
    wait_for("children garbage-collected", Duration::from_secs(150), || async {
        let d = deployments.get_opt("embeddings-cpu").await.map_err(|e| e.to_string())?;
        let s = services.get_opt("embeddings-cpu").await.map_err(|e| e.to_string())?;
        let c = config_maps.get_opt("embeddings-cpu-manifest").await.map_err(|e| e.to_string())?;
        if d.is_none() && s.is_none() && c.is_none() { Ok(()) } else { Err("children remain".into()) }
    })
    .await;
    drop(operator);
}

/// A version change rolls the pool under continuous load and no request fails: the new pod
/// joins the endpoints only when warm, and the old one, on SIGTERM, leaves them at once but
/// keeps serving through its drain delay, so clients that have not yet seen it go are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_rollout_under_continuous_load_loses_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let client = admin().await;
    install_crd().await;
    mark_real_node(&client).await;
    let ns = TestNamespace::create(&client, "e2e-rollout").await;
    let n = ns.name.as_str();
    let _operator = Operator::start(n).await;
    let mut md = cpu_md(n, "rollout", 1);
    apply_json(&client, n, &md).await.expect("apply md");
    wait_md_ready(&client, n, "rollout", Duration::from_secs(300)).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), n);
    let first = first_ready_endpoint(&slices, "rollout-cpu", Duration::from_secs(60)).await;

    // Clients in a closed loop over the ready endpoints, refreshed four times a second, as a
    // kube-proxy would balance.
    let endpoints = Arc::new(tokio::sync::Mutex::new(vec![first.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let served_by = Arc::new(tokio::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let refresher = {
        let (endpoints, stop, slices) = (endpoints.clone(), stop.clone(), slices.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(now) = ready_endpoints(&slices, "rollout-cpu").await
                    && !now.is_empty()
                {
                    *endpoints.lock().await = now;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (endpoints, stop, ok) = (endpoints.clone(), stop.clone(), ok.clone());
            let (failures, served_by) = (failures.clone(), served_by.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let ip = {
                        let eps = endpoints.lock().await;
                        eps[(i as usize + c) % eps.len()].clone()
                    };
                    let sent = http
                        .post(format!("http://{ip}:8080/v1/embeddings"))
                        .json(
                            &json!({"model": "minilm", "input": format!("request {c}-{i} during a rollout")}),
                        )
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *served_by.lock().await.entry(ip).or_default() += 1;
                        }
                        Ok(r) => failures.lock().await.push(format!("{ip}: {}", r.status())),
                        Err(e) => failures.lock().await.push(format!("{ip}: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    // A new version of the model (the same files) replaces the served one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let generation = deployments.get("rollout-cpu").await.unwrap().metadata.generation;
    let mut v3 = md["spec"]["models"][0].clone();
    v3["version"] = json!("v3");
    md["spec"]["models"].as_array_mut().unwrap().push(v3);
    md["spec"]["pools"][0]["serve"] = json!(["minilm:v3"]);
    apply_json(&client, n, &md).await.expect("roll to v3");
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    // The rollout has begun only once the operator wrote the new template.
    wait_for("the new pod template", Duration::from_secs(60), || async {
        let d = deployments.get("rollout-cpu").await.map_err(|e| e.to_string())?;
        if d.metadata.generation > generation { Ok(()) } else { Err(format!("{:?}", d.metadata.generation)) }
    })
    .await;
    wait_for("the rollout to finish and the old pod to be gone", Duration::from_secs(300), || async {
        let d = deployments.get("rollout-cpu").await.map_err(|e| e.to_string())?;
        let s = d.status.clone().unwrap_or_default();
        let list =
            pods.list(&ListParams::default().labels("kiln.dev/pool=cpu")).await.map_err(|e| e.to_string())?;
        let rolled = s.observed_generation == d.metadata.generation
            && s.updated_replicas == Some(1)
            && s.ready_replicas == Some(1)
            && s.replicas == Some(1);
        if rolled && list.items.len() == 1 {
            Ok(())
        } else {
            Err(format!("{s:?}, {} pods", list.items.len()))
        }
    })
    .await;
    // Load continues a little on the new pod alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    refresher.await.unwrap();
    let failures = failures.lock().await.clone();
    let served_by = served_by.lock().await.clone();
    eprintln!("rollout under load: {} answered, by pod IP {served_by:?}", ok.load(Ordering::Relaxed));
    assert!(failures.is_empty(), "{} requests failed during the rollout: {failures:?}", failures.len());
    assert!(ok.load(Ordering::Relaxed) > 100, "too little load: {served_by:?}");
    assert!(served_by.len() >= 2, "the old and the new pod both answered: {served_by:?}");
    assert!(served_by.get(&first).copied().unwrap_or(0) > 0, "{served_by:?}");
}

/// A text-generation resource: SmolLM2 (GGUF) from a file:// source on the harness's node.
/// A `ModelDeployment` with one pool, `cpu`, on the harness's real node, in a namespace of its
/// own, with the operator running: Ready in the cluster and its first ready endpoint's own
/// `/readyz` showing `model` Ready with a warmup time.
struct RealPool {
    // Fields drop in order: the operator stops before its namespace goes.
    _operator: Operator,
    ns: TestNamespace,
    endpoint: String,
}

impl RealPool {
    async fn ready(prefix: &str, md: fn(&str, &str) -> Value, name: &str, model: &str) -> RealPool {
        let client = admin().await;
        install_crd().await;
        mark_real_node(&client).await;
        let ns = TestNamespace::create(&client, prefix).await;
        let n = ns.name.as_str();
        let operator = Operator::start(n).await;
        apply_json(&client, n, &md(n, name)).await.expect("apply md");
        wait_md_ready(&client, n, name, Duration::from_secs(300)).await;
        // The endpointslice controller follows pod readiness on its own schedule.
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), n);
        let endpoint = first_ready_endpoint(&slices, &format!("{name}-cpu"), Duration::from_secs(60)).await;
        let ready: Value =
            reqwest::get(format!("http://{endpoint}:8080/readyz")).await.unwrap().json().await.unwrap();
        assert_eq!(ready["models"][model]["state"], "Ready", "{ready}");
        assert!(ready["models"][model]["warmupSeconds"].as_f64().is_some(), "{ready}");
        RealPool { _operator: operator, ns, endpoint }
    }
}

fn textgen_md(ns: &str, name: &str) -> Value {
    let root = fixture().parent().map(std::path::Path::to_path_buf).expect("fixtures root");
    let dir = root.join("smollm2");
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    assert!(dir.join(file).is_file(), "run `make fixtures` first");
    json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "family": "text-generation",
            "models": [{
                "name": "smollm2", "version": "135m-q4",
                "source": {"uri": format!("file://{}/", dir.display()), "sha256": {file: sha256_file(&dir.join(file))}},
                "memory": "300Mi"
            }],
            "pools": [{
                "name": "cpu",
                "nodeSelector": {"kiln.dev/pool": "cpu", "kiln.dev/harness": "real"},
                "gpus": 0,
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                "serve": ["smollm2:135m-q4"],
                "replicas": 1
            }],
            "warmup": {"iterations": 1, "inputs": ["Say hello."], "timeoutSeconds": 120},
            "batching": {"maxBatchSize": 4, "maxQueueDepth": 64}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_generation_pool_becomes_ready_after_warmup_and_chats() {
    // Ready in the cluster only once the real server has loaded and warmed the GGUF model.
    let pool = RealPool::ready("e2e-textgen", textgen_md, "chat", "smollm2:135m-q4").await;
    let (n, endpoint) = (pool.ns.name.as_str(), pool.endpoint.as_str());
    let http = reqwest::Client::new();

    // An OpenAI chat request through the Service's endpoint.
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/v1/chat/completions"))
        .json(&json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            "temperature": 0,
            "max_tokens": 16
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer = resp["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(answer.contains("Paris"), "{resp}");
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(
        table.contains("text-generation") && table.contains("1/1") && table.contains("smollm2:135m-q4"),
        "{table}"
    );
}

fn speech_md(ns: &str, name: &str) -> Value {
    let root = fixture().parent().map(std::path::Path::to_path_buf).expect("fixtures root");
    let dir = root.join("whisper-tiny-en");
    let files = ["model.bin", "config.json", "tokenizer.json", "vocabulary.txt"];
    assert!(files.iter().all(|f| dir.join(f).is_file()), "run `make fixtures` first");
    let sha256: serde_json::Map<String, Value> =
        files.iter().map(|f| (f.to_string(), json!(sha256_file(&dir.join(f))))).collect();
    json!({
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "family": "speech-to-text",
            "models": [{
                "name": "whisper", "version": "tiny-en",
                "source": {"uri": format!("file://{}/", dir.display()), "sha256": sha256},
                "memory": "400Mi"
            }],
            "pools": [{
                "name": "cpu",
                "nodeSelector": {"kiln.dev/pool": "cpu", "kiln.dev/harness": "real"},
                "gpus": 0,
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                "serve": ["whisper:tiny-en"],
                "replicas": 1
            }],
            "warmup": {"iterations": 1, "timeoutSeconds": 120},
            "batching": {"maxQueueDepth": 16}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_to_text_pool_becomes_ready_after_warmup_and_transcribes() {
    let pool = RealPool::ready("e2e-speech", speech_md, "asr", "whisper:tiny-en").await;
    let (n, endpoint) = (pool.ns.name.as_str(), pool.endpoint.as_str());
    let http = reqwest::Client::new();

    // A clip espeak-ng spoke (make fixtures), through the Service's endpoint: the text is what
    // faster-whisper gives on the same weights and samples.
    let root = fixture().parent().map(std::path::Path::to_path_buf).expect("fixtures root");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(root.join("whisper-reference/reference.json")).unwrap())
            .unwrap();
    let clip = reference["cases"].as_array().unwrap().iter().find(|c| c["name"] == "fox").unwrap().clone();
    let wav = std::fs::read(root.join("whisper-reference").join(clip["wav"].as_str().unwrap())).unwrap();
    use base64::Engine as _;
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/asr/transcribe"))
        .json(
            &json!({"audio_base64": base64::engine::general_purpose::STANDARD.encode(wav), "language": "en"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["text"], clip["transcript"], "{resp}");
    assert_eq!(resp["model"], "whisper:tiny-en", "{resp}");
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("speech-to-text") && table.contains("1/1"), "{table}");
}

/// config/samples/image-text-embedding.yaml as shipped (family, model name, warmup, batching),
/// with its source pointed at the tiny SigLIP checkpoint transformers wrote (pinned by digest)
/// and its pool sized for the harness's node.
fn image_text_md(ns: &str, name: &str) -> Value {
    let mut md = sample_md("image-text-embedding.yaml", ns, name);
    let dir = repo().join("model-server/tests/data/tiny/siglip");
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ];
    let sha256: serde_json::Map<String, Value> =
        files.iter().map(|f| (f.to_string(), json!(sha256_file(&dir.join(f))))).collect();
    let model = &mut md["spec"]["models"][0];
    model["source"] = json!({"uri": format!("file://{}/", dir.display()), "sha256": sha256});
    model["memory"] = json!("64Mi");
    md
}

/// A sample from config/samples as shipped, named `name` in `ns`, its first pool on the
/// harness's real node with one small replica.
fn sample_md(file: &str, ns: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("config/samples").join(file)).unwrap();
    let mut md: Value = serde_norway::from_str(&text).unwrap();
    md["metadata"] = json!({"name": name, "namespace": ns});
    let pool = &mut md["spec"]["pools"][0];
    pool["nodeSelector"] = json!({"kiln.dev/pool": "cpu", "kiln.dev/harness": "real"});
    pool["resources"] = json!({"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}});
    pool["replicas"] = json!(1);
    md
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_text_sample_becomes_ready_and_embeds_images_and_queries_in_one_space() {
    let model = "siglip:so400m-384";
    let pool = RealPool::ready("e2e-image-text", image_text_md, "video-search", model).await;
    let (n, endpoint) = (pool.ns.name.as_str(), pool.endpoint.as_str());
    let http = reqwest::Client::new();
    let data = repo().join("model-server/tests/data");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(data.join("tiny/siglip/reference.json")).unwrap()).unwrap();
    let cosine = |a: &Value, b: &Value| {
        let (a, b): (Vec<f64>, Vec<f64>) =
            (serde_json::from_value(a.clone()).unwrap(), serde_json::from_value(b.clone()).unwrap());
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
    };
    // A keyframe as the product sends it, through the Service's endpoint.
    let file = reference["images"][1].as_str().unwrap();
    use base64::Engine as _;
    let image = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(data.join("images").join(file)).unwrap());
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/embed/vision"))
        .json(&json!({"image_base64": image}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["model"], model, "{resp}");
    let c = cosine(&resp["embedding"], &reference["image_embeds"][1]);
    assert!(c >= 0.9999, "image: cosine {c} {resp}");
    // A search query, in the same space.
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/embed/text"))
        .json(&json!({"text": reference["texts"][0], "model": "siglip"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let c = cosine(&resp["embedding"], &reference["text_embeds"][0]);
    assert!(c >= 0.9999, "text: cosine {c} {resp}");
    assert_eq!(resp["dimension"], reference["image_embeds"][1].as_array().unwrap().len(), "{resp}");
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("image-text-embedding") && table.contains("1/1"), "{table}");
}

/// config/samples/face-detection.yaml as shipped (family, model name, warmup, batching), with
/// its source pointed at the YuNet fixture (pinned by digest) and its pool sized for the
/// harness's node.
fn face_md(ns: &str, name: &str) -> Value {
    let mut md = sample_md("face-detection.yaml", ns, name);
    let root = fixture().parent().map(std::path::Path::to_path_buf).expect("fixtures root");
    let dir = root.join("yunet");
    let file = "face_detection_yunet_2023mar.onnx";
    assert!(dir.join(file).is_file(), "run `make fixtures` first");
    md["spec"]["models"][0]["source"] =
        json!({"uri": format!("file://{}/", dir.display()), "sha256": {file: sha256_file(&dir.join(file))}});
    md
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_face_detection_sample_becomes_ready_and_finds_opencvs_faces() {
    let model = "yunet:2023mar";
    let pool = RealPool::ready("e2e-faces", face_md, "keyframe-faces", model).await;
    let (n, endpoint) = (pool.ns.name.as_str(), pool.endpoint.as_str());
    let root = fixture().parent().map(std::path::Path::to_path_buf).expect("fixtures root");
    let reference_dir = root.join("yunet-reference");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(reference_dir.join("reference.json")).unwrap()).unwrap();
    let collage = reference["images"].as_array().unwrap().iter().find(|i| i["name"] == "collage").unwrap();
    let bytes = std::fs::read(reference_dir.join(collage["file"].as_str().unwrap())).unwrap();
    // A keyframe posted as a multipart file (what `curl -F file=@keyframe.png` sends), through
    // the Service's endpoint.
    let boundary = "kiln-e2e-keyframe";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"keyframe.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let resp: Value = reqwest::Client::new()
        .post(format!("http://{endpoint}:8080/face/detect"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["model"], model, "{resp}");
    assert_eq!(resp["image"], json!({"width": collage["width"], "height": collage["height"]}), "{resp}");
    let got = resp["faces"].as_array().unwrap();
    let want = collage["faces"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{resp}");
    // Each of OpenCV's faces has one of ours within a pixel and a half at every corner.
    for w in want {
        let found = got.iter().any(|g| {
            (0..4).all(|i| (g["box"][i].as_f64().unwrap() - w["box"][i].as_f64().unwrap()).abs() <= 1.5)
                && (g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() <= 0.01
        });
        assert!(found, "OpenCV's face {w} not among {resp}");
    }
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("face-detection") && table.contains("1/1"), "{table}");
}

/// `cpu_md` with a second copy of MiniLM (`spare:v1`, the same files) loaded lazily, under a
/// memory budget that holds both.
fn lazy_md(ns: &str, name: &str) -> Value {
    let mut md = cpu_md(ns, name, 1);
    let mut spare = md["spec"]["models"][0].clone();
    spare["name"] = json!("spare");
    spare["version"] = json!("v1");
    spare["load"] = json!("lazy");
    md["spec"]["models"].as_array_mut().expect("models").push(spare);
    md["spec"]["pools"][0]["serve"] = json!(["minilm:v2", "spare:v1"]);
    md["spec"]["pools"][0]["memoryBudget"] = json!("400Mi");
    md
}

/// `status.models[]`'s entry for `name`: its `load`, and its first pool's (pods, loadedPods).
fn lazy_status(status: &Value, name: &str) -> Option<(String, i64, i64)> {
    let m = status["models"].as_array()?.iter().find(|m| m["name"] == name)?;
    let pool = &m["loaded"][0];
    Some((m["load"].as_str()?.to_string(), pool["pods"].as_i64()?, pool["loadedPods"].as_i64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_a_lazy_model_is_ready_before_it_loads_and_serves_it_on_demand() {
    // Ready in the cluster once the preloaded model is warm; the lazy one is not loaded yet.
    let pool = RealPool::ready("e2e-lazy", lazy_md, "lazy", "minilm:v2").await;
    let (n, endpoint) = (pool.ns.name.as_str(), pool.endpoint.as_str());
    let client = admin().await;
    let http = reqwest::Client::new();
    let readyz: Value =
        http.get(format!("http://{endpoint}:8080/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(readyz["models"]["spare:v1"]["state"], "Unloaded", "{readyz}");
    // The operator reads the pod's own report: lazy, held by none of the one ready pod.
    wait_for("status.models to show spare:v1 lazy and unloaded", Duration::from_secs(90), || async {
        let s = md_status(&client, n, "lazy").await;
        match lazy_status(&s, "spare") {
            Some((load, 1, 0)) if load == "lazy" => Ok(()),
            other => Err(format!("{other:?}: {s}")),
        }
    })
    .await;

    // The first request loads it and is answered.
    let resp: Value = http
        .post(format!("http://{endpoint}:8080/v1/embeddings"))
        .json(&json!({"model": "spare", "input": "Loaded on demand, answered on the first request."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["data"][0]["embedding"].as_array().map(Vec::len), Some(384), "{resp}");
    let status: Value =
        http.get(format!("http://{endpoint}:8080/status")).send().await.unwrap().json().await.unwrap();
    let spare = status["models"].as_array().unwrap().iter().find(|m| m["model"] == "spare").cloned().unwrap();
    assert_eq!((spare["state"].as_str(), spare["loads"].as_u64()), (Some("Ready"), Some(1)), "{spare}");

    // ...and the resource says so, on its next refresh from the pods.
    wait_for("status.models to show spare:v1 loaded in the pod", Duration::from_secs(90), || async {
        let s = md_status(&client, n, "lazy").await;
        match lazy_status(&s, "spare") {
            Some((_, 1, 1)) => Ok(()),
            other => Err(format!("{other:?}: {s}")),
        }
    })
    .await;
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("1/1") && table.contains("minilm:v2,spare:v1"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_pools_place_pods_roll_only_the_changed_pool_and_report_misfits() {
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "e2e-gpu").await;
    let n = ns.name.as_str();
    let _operator = Operator::start(n).await;
    let sample: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("config/samples/embeddings-ab-gpu.yaml")).unwrap(),
    )
    .unwrap();
    let mut md = sample.clone();
    md["metadata"]["namespace"] = json!(n);
    apply_json(&client, n, &md).await.expect("apply A/B sample");

    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let nodes: Api<Node> = Api::all(client.clone());
    for pool in ["a100", "l4"] {
        let pod = wait_for(&format!("a Running pod in pool {pool}"), Duration::from_secs(120), || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("kiln.dev/pool={pool}")))
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .ok_or_else(|| "none running".to_string())
        })
        .await;
        let node = nodes.get(pod.spec.as_ref().unwrap().node_name.as_deref().unwrap()).await.unwrap();
        assert_eq!(
            node.labels().get("gpu.kiln.dev/pool").map(String::as_str),
            Some(pool),
            "pod off its pool"
        );
    }
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), n);
    let hpa = eventually(&hpas, "bge-ab-l4", Duration::from_secs(60)).await;
    let metric = serde_json::to_value(&hpa.spec.unwrap().metrics).unwrap();
    assert_eq!(metric[0]["pods"]["metric"]["name"], "kiln_queue_depth", "{metric}");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    assert!(pdbs.get_opt("bge-ab-a100").await.unwrap().is_none(), "no PDB for a single replica");

    // GPU pools run the CUDA build on their GPU; the pull init container keeps the CPU build.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let a100 = deployments.get("bge-ab-a100").await.unwrap();
    let pod_spec = a100.spec.unwrap().template.spec.unwrap();
    let server = &pod_spec.containers[0];
    assert_eq!(server.image.as_deref(), Some("ghcr.io/kiln-dev/kiln-model-server:0.1.0-cuda"));
    let args = server.args.clone().unwrap_or_default();
    assert!(args.windows(2).any(|w| w == ["--device", "cuda:0"]), "{args:?}");
    let pull = &pod_spec.init_containers.unwrap()[0];
    assert_eq!(pull.image.as_deref(), Some("ghcr.io/kiln-dev/kiln-model-server:0.1.0"));

    // Changing the version the l4 pool serves rolls that pool and leaves a100 alone.
    let a100_gen = deployments.get("bge-ab-a100").await.unwrap().metadata.generation;
    let l4_gen = deployments.get("bge-ab-l4").await.unwrap().metadata.generation;
    md["spec"]["pools"][1]["serve"] = json!(["bge-base:v1"]);
    apply_json(&client, n, &md).await.expect("change l4's version");
    wait_for("l4 rolled", Duration::from_secs(60), || async {
        let g = deployments.get("bge-ab-l4").await.map_err(|e| e.to_string())?.metadata.generation;
        if g > l4_gen { Ok(()) } else { Err(format!("generation {g:?}")) }
    })
    .await;
    assert_eq!(
        deployments.get("bge-ab-a100").await.unwrap().metadata.generation,
        a100_gen,
        "a100 was rolled"
    );

    // A model that cannot fit its pool's GPU memory: Degraded/InsufficientMemory, named.
    let mut misfit = sample.clone();
    misfit["metadata"]["name"] = json!("too-big");
    misfit["metadata"]["namespace"] = json!(n);
    misfit["spec"]["models"][0]["memory"] = json!("100Gi");
    apply_json(&client, n, &misfit).await.expect("apply misfit");
    let degraded = wait_for("Degraded/InsufficientMemory", Duration::from_secs(60), || async {
        let s = md_status(&client, n, "too-big").await;
        match condition(&s, "Degraded") {
            Some(c) if c["status"] == "True" && c["reason"] == "InsufficientMemory" => Ok(c.clone()),
            _ => Err(s.to_string()),
        }
    })
    .await;
    assert!(degraded["message"].as_str().unwrap_or_default().contains("bge-base:v1"), "{degraded}");
    assert!(deployments.get_opt("too-big-a100").await.unwrap().is_none(), "a misfit pool gets no pods");

    // A pool asking for more GPUs than any node has: its pod stays Pending, and status says why.
    let mut greedy = sample.clone();
    greedy["metadata"]["name"] = json!("greedy");
    greedy["metadata"]["namespace"] = json!(n);
    greedy["spec"]["pools"][0]["gpus"] = json!(8);
    apply_json(&client, n, &greedy).await.expect("apply greedy");
    // The l4 pool's pod may also find its one GPU taken (by bge-ab's): the message lists one
    // problem per pool, in whatever order the scheduler reports them; wait for a100's.
    let unschedulable = wait_for("Degraded/Unschedulable for pool a100", Duration::from_secs(90), || async {
        let s = md_status(&client, n, "greedy").await;
        match condition(&s, "Degraded") {
            Some(c)
                if c["reason"] == "Unschedulable"
                    && c["message"].as_str().is_some_and(|m| m.contains("pool a100")) =>
            {
                Ok(c.clone())
            }
            _ => Err(s.to_string()),
        }
    })
    .await;
    let message = unschedulable["message"].as_str().unwrap_or_default();
    assert!(message.contains("pool a100") && message.contains("nvidia.com/gpu"), "{message}");
    let pending = pods
        .list(&ListParams::default().labels("kiln.dev/modeldeployment=greedy,kiln.dev/pool=a100"))
        .await
        .unwrap();
    assert!(
        pending.items.iter().all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")),
        "over-asking pods never run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operator_replicas_elect_one_leader_and_the_standby_takes_over() {
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "e2e-ha").await;
    let n = ns.name.as_str();
    let lease = "kiln-operator-e2e-ha";
    let mut first = Operator::start_with_lease(n, lease, "-a").await;
    let second = Operator::start_with_lease(n, lease, "-b").await;
    let mut md = sim_md(n, "ha", 1);
    apply_json(&client, n, &md).await.expect("apply md");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    wait_for("the leader's Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("ha-cpu").await.map_err(|e| e.to_string())?.ok_or("absent".to_string())
    })
    .await;
    assert!(second.logs().contains("standing by"), "the second replica must not lead: {}", second.logs());
    assert!(!second.logs().contains("\"applied\""), "the standby wrote: {}", second.logs());

    // The leader dies without releasing the Lease; the standby takes over once it expires
    // (15 s) and reconciles the next change.
    first.stop();
    md["spec"]["pools"][0]["replicas"] = json!(2);
    apply_json(&client, n, &md).await.expect("scale");
    wait_for("the standby to take over and apply", Duration::from_secs(90), || async {
        let d = deployments.get("ha-cpu").await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(2) => Ok(()),
            other => Err(format!("replicas {other:?}")),
        }
    })
    .await;
    assert!(second.logs().contains("took over the leader lease"), "{}", second.logs());
}

/// `helm` for the chart tests (e2e/run.sh sets KILN_HELM from scripts/helm.sh).
fn helm(args: &[&str]) -> String {
    let bin = std::env::var("KILN_HELM").expect("KILN_HELM must name the helm binary (make e2e sets it)");
    let out = std::process::Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .current_dir(repo())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart as a platform team uses it: `helm install --wait` runs two operator pods for real
/// (on cpu-0, through the kubelet harness, with their own projected ServiceAccount tokens, so
/// under exactly the chart's RBAC: here the namespaced Role of `watchNamespace`); a resource
/// becomes Ready; `helm upgrade` rolls the operator without touching the model pools; `helm
/// uninstall` removes everything but the CRD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_installs_an_operator_that_works_under_its_own_rbac() {
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "e2e-helm").await;
    let n = ns.name.as_str();
    let home = TestNamespace::create(&client, "e2e-helm-system").await;
    let h = home.name.as_str();
    mark_real_node(&client).await;
    let _ = helm(&["uninstall", "kiln-e2e", "-n", h, "--wait", "--ignore-not-found"]);
    let watch = format!("watchNamespace={n}");
    helm(&[
        "install",
        "kiln-e2e",
        "charts/kiln",
        "-n",
        h,
        "--wait",
        "--timeout",
        "3m",
        "--set",
        &watch,
        "--set",
        "nodeSelector.kubernetes\\.io/hostname=cpu-0",
        "--set",
        "leaderElection.leaseName=kiln-e2e",
    ]);
    let operators: Api<Deployment> = Api::namespaced(client.clone(), h);
    let op = operators.get("kiln-e2e-operator").await.expect("the chart's Deployment");
    assert_eq!(op.status.as_ref().and_then(|s| s.ready_replicas), Some(2), "both replicas ready");

    // The operator pods authenticate as the chart's ServiceAccount: a ModelDeployment in the
    // watched namespace is reconciled and becomes Ready.
    let md = sim_md(n, "helm", 1);
    apply_json(&client, n, &md).await.expect("apply md");
    wait_md_ready(&client, n, "helm", Duration::from_secs(120)).await;

    // The chart's admission policy: who may create ModelDeployments may not pick any image.
    // (The API server loads a new policy within a few seconds.)
    let mut foreign = sim_md(n, "foreign-image", 1);
    foreign["spec"]["image"] = json!("registry.example/miner:latest");
    let refusal = wait_for("the image policy to refuse a foreign image", Duration::from_secs(60), || async {
        match apply_json(&client, n, &foreign).await {
            Err(e) => Ok(e.to_string()),
            Ok(()) => {
                let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), n);
                let _ = mds.delete("foreign-image", &DeleteParams::default()).await;
                Err("accepted".to_string())
            }
        }
    })
    .await;
    assert!(
        refusal.contains("registry.example/miner:latest") && refusal.contains("ghcr.io/kiln-dev/"),
        "{refusal}"
    );
    let mut trusted = sim_md(n, "trusted-image", 1);
    trusted["spec"]["image"] = json!("ghcr.io/kiln-dev/kiln-model-server:0.1.0");
    apply_json(&client, n, &trusted).await.expect("an image under an allowed prefix is accepted");
    let pool: Api<Deployment> = Api::namespaced(client.clone(), n);
    let generation = pool.get("helm-cpu").await.unwrap().metadata.generation;

    // An upgrade that changes a value rolls the operator (maxUnavailable 0) and nothing else.
    helm(&[
        "upgrade",
        "kiln-e2e",
        "charts/kiln",
        "-n",
        h,
        "--reuse-values",
        "--set",
        "logLevel=debug",
        "--wait",
    ]);
    let op = operators.get("kiln-e2e-operator").await.unwrap();
    let env = op.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap_or_default();
    assert!(env.iter().any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")), "{env:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), h);
    wait_for("the upgraded operator pods ready", Duration::from_secs(120), || async {
        let d = operators.get("kiln-e2e-operator").await.map_err(|e| e.to_string())?;
        let s = d.status.unwrap_or_default();
        if s.updated_replicas == Some(2) && s.ready_replicas == Some(2) && s.replicas == Some(2) {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let s = md_status(&client, n, "helm").await;
    assert_eq!(condition(&s, "Ready").unwrap()["status"], "True", "still Ready after the upgrade: {s}");
    assert_eq!(
        pool.get("helm-cpu").await.unwrap().metadata.generation,
        generation,
        "the pool was not touched"
    );

    // Uninstall removes the chart's objects; the CRD (and so the resources) stay.
    helm(&["uninstall", "kiln-e2e", "-n", h, "--wait"]);
    assert!(operators.get_opt("kiln-e2e-operator").await.unwrap().is_none());
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), n);
    assert!(roles.get_opt("kiln-e2e-operator").await.unwrap().is_none(), "the namespaced Role is gone");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), h);
    assert!(sas.get_opt("kiln-e2e-operator").await.unwrap().is_none(), "the ServiceAccount is gone");
    wait_for("operator pods gone", Duration::from_secs(60), || async {
        let l = pods.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        if l.items.is_empty() { Ok(()) } else { Err(format!("{} pods", l.items.len())) }
    })
    .await;
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(client.clone());
    assert!(crds.get_opt("modeldeployments.kiln.dev").await.unwrap().is_some(), "the CRD stays");
    assert!(md_status(&client, n, "helm").await.is_object(), "the resource stays");
}

/// The operator dies right after it started a rollout and a fresh one takes over: the rollout
/// completes without ever dropping ready replicas below the desired count, each object exists
/// once, and the converged state then sees no write for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_mid_rollout_converges_without_duplicates_or_lost_capacity() {
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "e2e-restart").await;
    let n = ns.name.as_str();
    let mut first = Operator::start_with_lease(n, "kiln-operator-e2e-restart", "-a").await;
    let mut md = sim_md(n, "restart", 2);
    apply_json(&client, n, &md).await.expect("apply md");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let ready = |d: &Deployment| d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    wait_for("2 ready replicas", Duration::from_secs(120), || async {
        let d = deployments.get("restart-cpu").await.map_err(|e| e.to_string())?;
        if ready(&d) == 2 { Ok(()) } else { Err(format!("{} ready", ready(&d))) }
    })
    .await;
    let generation = deployments.get("restart-cpu").await.unwrap().metadata.generation;

    // Sample the ready count all through the rollout.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (deployments, sampling) = (deployments.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut lowest = i32::MAX;
            let mut samples = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(d) = deployments.get("restart-cpu").await {
                    lowest = lowest.min(d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0));
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (lowest, samples)
        })
    };

    // A change to the served manifest rolls the pool; the operator is killed as soon as it has
    // applied it, and a new one (a new process, the same Lease once it expires) takes over.
    md["spec"]["warmup"]["iterations"] = json!(3);
    apply_json(&client, n, &md).await.expect("change warmup");
    wait_for("the rollout started", Duration::from_secs(60), || async {
        let g = deployments.get("restart-cpu").await.map_err(|e| e.to_string())?.metadata.generation;
        if g > generation { Ok(()) } else { Err(format!("generation {g:?}")) }
    })
    .await;
    first.stop();
    let second = Operator::start_with_lease(n, "kiln-operator-e2e-restart", "-b").await;
    let converged = wait_for("converged under the new operator", Duration::from_secs(150), || async {
        let d = deployments.get("restart-cpu").await.map_err(|e| e.to_string())?;
        let s = d.status.clone().unwrap_or_default();
        let st = md_status(&client, n, "restart").await;
        let ready_md = condition(&st, "Ready").is_some_and(|c| c["status"] == "True");
        let observed = st["observedGeneration"] == json!(md_generation(&client, n, "restart").await);
        if s.updated_replicas == Some(2)
            && s.ready_replicas == Some(2)
            && s.replicas == Some(2)
            && ready_md
            && observed
        {
            Ok(d)
        } else {
            Err(format!("{s:?}, md Ready {ready_md}, observed {observed}"))
        }
    })
    .await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (lowest, samples) = sampler.await.unwrap();
    assert!(samples > 10, "too few samples ({samples})");
    assert!(lowest >= 2, "ready replicas dropped to {lowest} during the rollout");
    assert!(converged.metadata.generation > generation);

    // Exactly one of each child.
    let selector = ListParams::default().labels("kiln.dev/modeldeployment=restart");
    let count_d = deployments.list(&selector).await.unwrap().items.len();
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let count_s = services.list(&selector).await.unwrap().items.len();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let count_c = config_maps.list(&selector).await.unwrap().items.len();
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    let count_p = pdbs.list(&selector).await.unwrap().items.len();
    assert_eq!(
        (count_d, count_s, count_c, count_p),
        (1, 1, 1, 1),
        "duplicates: deployments, services, configmaps, pdbs"
    );

    // No writes on the converged state: every resourceVersion holds for a minute.
    let versions = || async {
        let mut v = vec![md_resource_version(&client, n, "restart").await];
        v.extend(deployments.list(&selector).await.unwrap().items.iter().map(|o| o.resource_version()));
        v.extend(services.list(&selector).await.unwrap().items.iter().map(|o| o.resource_version()));
        v.extend(config_maps.list(&selector).await.unwrap().items.iter().map(|o| o.resource_version()));
        v.extend(pdbs.list(&selector).await.unwrap().items.iter().map(|o| o.resource_version()));
        v
    };
    let before = versions().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(versions().await, before, "something was written on a steady state");
    assert!(second.logs().contains("took over the leader lease"), "{}", second.logs());
}

async fn md_generation(client: &Client, ns: &str, name: &str) -> Option<i64> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    api.get(name).await.ok().and_then(|m| m.metadata.generation)
}

async fn md_resource_version(client: &Client, ns: &str, name: &str) -> Option<String> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    api.get(name).await.ok().and_then(|m| m.metadata.resource_version)
}

/// The operator skips a write when the live object already holds every desired field. That
/// only works if what it builds reads back unchanged from the API server (no field the server
/// drops, like `readOnly: false`, no quantity it rewrites, like `818.5Mi`). Every object built
/// for every sample goes through a server-side dry-run apply and must come back a superset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_built_object_reads_back_from_the_api_server_as_applied() {
    use kiln_operator::reconcile::is_subset;
    use kiln_operator::resources::{
        OperatorSettings, config_map, deployment, hpa, pdb, pool_manifest, service,
    };
    let client = admin().await;
    install_crd().await;
    let ns = TestNamespace::create(&client, "e2e-readback").await;
    let n = ns.name.as_str();
    let settings = OperatorSettings::default();
    let mut checked = 0;
    for sample in ["embeddings-cpu.yaml", "embeddings-ab-gpu.yaml", "textgen-pvc.yaml"] {
        let text = std::fs::read_to_string(repo().join("config/samples").join(sample)).unwrap();
        let mut md: ModelDeployment = serde_norway::from_str(&text).unwrap();
        md.metadata.namespace = Some(n.to_string());
        md.metadata.uid = Some("0b5e1f2c-7c1e-4d7a-9f00-000000000001".into());
        for pool in &md.spec.pools {
            let manifest = pool_manifest(&md, pool).unwrap();
            // k8s-openapi serializes apiVersion and kind, so each object names its own API.
            let mut objects = vec![
                json!(config_map(&md, pool, &manifest)),
                json!(deployment(&md, pool, &manifest, &settings)),
                json!(service(&md, pool)),
            ];
            objects.extend(pdb(&md, pool).map(|o| json!(o)));
            objects.extend(hpa(&md, pool).map(|o| json!(o)));
            for desired in objects {
                let (api_version, kind) =
                    (desired["apiVersion"].as_str().unwrap(), desired["kind"].as_str().unwrap());
                let gvk = kube::api::GroupVersionKind::gvk(
                    api_version.split_once('/').map_or("", |(g, _)| g),
                    api_version.rsplit('/').next().unwrap(),
                    kind,
                );
                let resource = kube::api::ApiResource::from_gvk(&gvk);
                let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), n, &resource);
                let name = desired["metadata"]["name"].as_str().unwrap().to_string();
                let params = PatchParams::apply("kiln-operator").force().dry_run();
                let stored = api.patch(&name, &params, &Patch::Apply(&desired)).await.unwrap_or_else(|e| {
                    panic!("{sample}: dry-run apply of {kind} {name}: {e}");
                });
                let stored = serde_json::to_value(stored).unwrap();
                assert!(
                    is_subset(&desired, &stored),
                    "{sample}: {kind} {name} reads back differently:\n{}",
                    diff(&desired, &stored, "")
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "only {checked} objects checked");
}

/// The first paths where `desired` is not contained in `live`, for a readable failure.
fn diff(desired: &Value, live: &Value, path: &str) -> String {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match l.get(k) {
                None => format!("{path}.{k}: missing, wanted {v}\n"),
                Some(lv) => diff(v, lv, &format!("{path}.{k}")),
            })
            .collect(),
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() => {
            d.iter().zip(l).enumerate().map(|(i, (a, b))| diff(a, b, &format!("{path}[{i}]"))).collect()
        }
        (d, l) if d == l => String::new(),
        (d, l) => format!("{path}: wanted {d}, stored {l}\n"),
    }
}
