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

async fn md_status(client: &Client, ns: &str, name: &str) -> Value {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let md = api.get(name).await.expect("get md");
    serde_json::to_value(md.status).unwrap_or(Value::Null)
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
    let deployment = wait_for("Deployment embeddings-cpu", Duration::from_secs(60), || async {
        deployments.get_opt("embeddings-cpu").await.map_err(|e| e.to_string())?.ok_or("absent".to_string())
    })
    .await;
    assert!(owned_by(&deployment.metadata, &uid));
    assert!(owned_by(&services.get("embeddings-cpu").await.unwrap().metadata, &uid));
    let cm = config_maps.get("embeddings-cpu-manifest").await.unwrap();
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
    let endpoint = wait_for("the Service's ready endpoint", Duration::from_secs(60), || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=embeddings-cpu"))
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .find(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .and_then(|e| e.addresses.first().cloned())
            .ok_or_else(|| format!("{:?}", list.items))
    })
    .await;
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
    wait_for("md Ready=True", Duration::from_secs(60), || async {
        let s = md_status(&client, n, "embeddings").await;
        match condition(&s, "Ready") {
            Some(c) if c["status"] == "True" => Ok(()),
            _ => Err(s.to_string()),
        }
    })
    .await;
    kubectl(&["wait", "-n", n, "--for=condition=Ready", "md/embeddings", "--timeout=30s"])
        .expect("kubectl wait");
    let table = kubectl(&["get", "md", "-n", n]).unwrap();
    assert!(table.contains("FAMILY") && table.contains("READY") && table.contains("MODELS"), "{table}");
    assert!(
        table.contains("text-embedding") && table.contains("1/1") && table.contains("minilm:v2"),
        "{table}"
    );

    // Steady state: no writes at all (every resourceVersion unchanged).
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
    let hpa = hpas.get("bge-ab-l4").await.expect("the l4 pool autoscales");
    let metric = serde_json::to_value(&hpa.spec.unwrap().metrics).unwrap();
    assert_eq!(metric[0]["pods"]["metric"]["name"], "kiln_queue_depth", "{metric}");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    assert!(pdbs.get_opt("bge-ab-a100").await.unwrap().is_none(), "no PDB for a single replica");

    // Changing the version the l4 pool serves rolls that pool and leaves a100 alone.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
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
    let unschedulable = wait_for("Degraded/Unschedulable", Duration::from_secs(90), || async {
        let s = md_status(&client, n, "greedy").await;
        match condition(&s, "Degraded") {
            Some(c) if c["reason"] == "Unschedulable" => Ok(c.clone()),
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
    let mut md = cpu_md(n, "ha", 1);
    md["spec"]["pools"][0]["nodeSelector"] = json!({"kiln.dev/pool": "cpu-sim"});
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
