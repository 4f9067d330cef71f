//! Autoscaling on queue depth, end to end, with nothing simulated in the chain: the real model
//! server's `kiln_queue_depth` → Prometheus scraping the pods on their IPs → prometheus-adapter
//! with the rule rendered from the Helm chart → `custom.metrics.k8s.io` → the HPA the operator
//! made → more pods, which pull, load and warm for real, join the Service's endpoints only when
//! ready and take a share of the load; fewer pods once the load is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Mutex;

use super::*;

const MD: &str = "scaling";
const CLIENTS: usize = 32;
/// The load stops by itself after this long even if the pool never grows (the test then fails).
const LOAD_LIMIT: Duration = Duration::from_secs(240);

/// Runs `dev-cluster.sh monitoring`: idempotent, so the test also works on a cluster started
/// without MONITORING=1.
fn ensure_monitoring() {
    let out = std::process::Command::new("bash")
        .arg(repo().join("e2e/cluster/dev-cluster.sh"))
        .arg("monitoring")
        .output()
        .expect("run dev-cluster.sh monitoring");
    assert!(
        out.status.success(),
        "dev-cluster.sh monitoring failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    rejected: AtomicU64,
    /// 429 answers without a Retry-After header (must stay 0).
    no_retry_after: AtomicU64,
    errors: Mutex<Vec<String>>,
    by_endpoint: Mutex<BTreeMap<String, u64>>,
}

/// One closed-loop client: send, wait for the answer, send again; after a 429, wait what
/// Retry-After says (capped at a second), as a well-behaved client would.
async fn client_loop(
    http: reqwest::Client,
    endpoints: Arc<Mutex<Vec<String>>>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    text: String,
) {
    while !stop.load(Ordering::Relaxed) {
        let ip = {
            let eps = endpoints.lock().await;
            if eps.is_empty() {
                None
            } else {
                Some(eps[(next.fetch_add(1, Ordering::Relaxed) as usize) % eps.len()].clone())
            }
        };
        let Some(ip) = ip else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let sent = http
            .post(format!("http://{ip}:8080/v1/embeddings"))
            .json(&json!({"model": "minilm:v2", "input": [text.as_str()]}))
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                *tally.by_endpoint.lock().await.entry(ip).or_default() += 1;
                let _ = r.bytes().await;
            }
            Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                tally.rejected.fetch_add(1, Ordering::Relaxed);
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok());
                if wait.is_none() {
                    tally.no_retry_after.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs_f64(wait.unwrap_or(1.0).clamp(0.05, 1.0))).await;
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                tally.errors.lock().await.push(format!("{ip}: {status} {body}"));
            }
            Err(e) => tally.errors.lock().await.push(format!("{ip}: {e}")),
        }
    }
}

/// (spec.replicas, status.readyReplicas) of the pool's Deployment.
async fn replicas(deployments: &Api<Deployment>, name: &str) -> (i32, i32) {
    match deployments.get_opt(name).await {
        Ok(Some(d)) => (
            d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0),
        ),
        _ => (0, 0),
    }
}

/// readyReplicas of the pool as the ModelDeployment's own status reports it.
async fn status_ready(client: &Client, ns: &str) -> i64 {
    md_status(client, ns, MD).await["pools"][0]["readyReplicas"].as_i64().unwrap_or(-1)
}

/// The largest `kiln_queue_depth` the custom metrics API reports for the namespace's pods.
fn custom_metric_max(ns: &str) -> Option<f64> {
    let raw = kubectl(&[
        "get",
        "--raw",
        &format!("/apis/custom.metrics.k8s.io/v1beta1/namespaces/{ns}/pods/*/kiln_queue_depth"),
    ])
    .ok()?;
    let v: Value = serde_json::from_str(&raw).ok()?;
    v["items"].as_array()?.iter().filter_map(|i| quantity(i["value"].as_str()?)).reduce(f64::max)
}

/// A metric value as the API writes it: "12", "2500m" or "3k".
fn quantity(q: &str) -> Option<f64> {
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|v| v / 1000.0),
        None => match q.strip_suffix('k') {
            Some(kilo) => kilo.parse::<f64>().ok().map(|v| v * 1000.0),
            None => q.parse().ok(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_grows_under_queue_load_and_shrinks_back_after_it() {
    let client = admin().await;
    install_crd().await;
    mark_real_node(&client).await;
    ensure_monitoring();
    let ns = TestNamespace::create(&client, "e2e-autoscaling").await;
    let n = ns.name.as_str();
    let operator = Operator::start(n).await;

    let mut md = cpu_md(n, MD, 1);
    md["spec"]["pools"][0]["replicas"] = Value::Null;
    md["spec"]["pools"][0]["resources"]["requests"]["cpu"] = json!("100m");
    md["spec"]["pools"][0]["autoscaling"] = json!({
        "minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 2, "scaleDownStabilizationSeconds": 20
    });
    // Small batches and a short queue: the load keeps requests waiting, and what goes beyond
    // the bound is refused with 429 rather than left to time out.
    md["spec"]["batching"] = json!({"maxBatchSize": 4, "maxDelayMilliseconds": 5, "maxQueueDepth": 12});
    apply_json(&client, n, &md).await.expect("apply md");
    wait_md_ready(&client, n, MD, Duration::from_secs(300)).await;

    let pool = format!("{MD}-cpu");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), n);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), n);
    let hpa = eventually(&hpas, &pool, Duration::from_secs(60)).await;
    let metric = &hpa.spec.as_ref().unwrap().metrics.as_ref().unwrap()[0];
    assert_eq!(metric.pods.as_ref().unwrap().metric.name, "kiln_queue_depth");
    assert_eq!(replicas(&deployments, &pool).await, (1, 1), "starts at minReplicas");

    // The load: CLIENTS closed-loop clients balanced over the ready endpoints, refreshed twice a
    // second from the EndpointSlices, so a pod gets traffic only once the cluster says it is ready.
    let first = first_ready_endpoint(&slices, &pool, Duration::from_secs(60)).await;
    let endpoints = Arc::new(Mutex::new(vec![first]));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::new();
    let text = "Kiln keeps model-server pods out of Service endpoints until their models are \
                loaded and warm, scales each pool on the depth of its request queue, and reports \
                all of it in the resource's status so that kubectl tells the truth. "
        .repeat(3);
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client_loop(
                http.clone(),
                endpoints.clone(),
                next.clone(),
                stop.clone(),
                tally.clone(),
                text.clone(),
            ))
        })
        .collect();
    let refresher = {
        let (endpoints, stop, slices, pool) = (endpoints.clone(), stop.clone(), slices.clone(), pool.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let now = ready_endpoints(&slices, &pool).await.unwrap_or_default();
                if !now.is_empty() {
                    *endpoints.lock().await = now;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Watch the chain work: the metric through the custom metrics API, the Deployment growing,
    // the resource's status following. Stop once three pods are ready and each has answered.
    let mut first_new_ready = None;
    let mut metric_over_target = None;
    let mut all_ready = None;
    let mut max_metric = 0.0f64;
    let mut max_status_ready = 0;
    let mut served_by_all = false;
    // Readiness must not flap under the load: a pod once Ready stays Ready until it is deleted
    // (the probe's timeout and threshold absorb slow answers from a saturated CPU).
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let mut was_ready = std::collections::BTreeSet::new();
    let mut flaps = Vec::new();
    while started.elapsed() < LOAD_LIMIT {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(list) =
            pods.list(&ListParams::default().labels(&format!("kiln.dev/modeldeployment={MD}"))).await
        {
            for pod in list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready {
                    was_ready.insert(name);
                } else if was_ready.contains(&name) {
                    flaps.push(format!("{name} at {:?}", started.elapsed()));
                }
            }
        }
        if let Some(m) = custom_metric_max(n) {
            max_metric = max_metric.max(m);
            if m > 2.0 && metric_over_target.is_none() {
                metric_over_target = Some(started.elapsed());
            }
        }
        let (_, ready) = replicas(&deployments, &pool).await;
        max_status_ready = max_status_ready.max(status_ready(&client, n).await);
        if ready >= 2 && first_new_ready.is_none() {
            first_new_ready = Some(started.elapsed());
        }
        if ready >= 3 && all_ready.is_none() {
            all_ready = Some(started.elapsed());
        }
        let eps = ready_endpoints(&slices, &pool).await.unwrap_or_default();
        let by = tally.by_endpoint.lock().await.clone();
        served_by_all = eps.len() == 3 && eps.iter().all(|ip| by.get(ip).copied().unwrap_or(0) >= 5);
        if all_ready.is_some() && served_by_all && max_status_ready >= 3 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    for w in workers {
        w.await.expect("client task");
    }
    refresher.await.expect("refresher");
    let ok = tally.ok.load(Ordering::Relaxed);
    let rejected = tally.rejected.load(Ordering::Relaxed);
    let errors = tally.errors.lock().await.clone();
    let by_endpoint = tally.by_endpoint.lock().await.clone();
    let hpa_now = serde_json::to_value(hpas.get(&pool).await.unwrap().status).unwrap();
    let seen = format!(
        "after {:?}: metric max {max_metric}, first new pod ready {first_new_ready:?}, three ready \
         {all_ready:?}, status readyReplicas max {max_status_ready}, answered per endpoint \
         {by_endpoint:?}, {ok} ok, {rejected} refused with 429, HPA {hpa_now}",
        started.elapsed()
    );
    assert!(max_metric > 2.0, "the HPA's metric never crossed the target through the adapter: {seen}");
    assert!(all_ready.is_some(), "the pool did not grow to maxReplicas under load: {seen}");
    assert!(served_by_all, "every new pod must take a share of the load once ready: {seen}");
    assert!(max_status_ready >= 3, "the resource's status never showed the grown pool: {seen}");
    assert!(errors.is_empty(), "requests must end in an answer or a 429, never an error: {errors:?}; {seen}");
    assert!(flaps.is_empty(), "readiness flapped under load: {flaps:?}; {seen}");
    assert_eq!(tally.no_retry_after.load(Ordering::Relaxed), 0, "every 429 carries Retry-After");
    assert!(ok > 0);

    // Load gone: the queue drains, the HPA waits its stabilisation window, and the pool shrinks
    // back to minReplicas, in the Deployment and in the resource's status.
    wait_for("the pool back at minReplicas", Duration::from_secs(240), || async {
        let r = replicas(&deployments, &pool).await;
        let s = status_ready(&client, n).await;
        if r == (1, 1) && s == 1 {
            Ok(())
        } else {
            Err(format!("deployment {r:?}, status readyReplicas {s}"))
        }
    })
    .await;
    let scale_in = stopped.elapsed();
    let scale_out = first_new_ready.unwrap_or_default();

    let figures = json!({
        "settings": {"clients": CLIENTS, "maxBatchSize": 4, "maxQueueDepth": 12, "targetQueueDepth": 2,
                     "minReplicas": 1, "maxReplicas": 3, "scaleDownStabilizationSeconds": 20,
                     "prometheusScrapeSeconds": 2, "adapterRelistSeconds": 5, "hpaSyncSeconds": 5},
        "load_start_to_metric_over_target_s": metric_over_target.unwrap_or_default().as_secs_f64(),
        "metric_over_target_to_first_new_pod_ready_s":
            scale_out.saturating_sub(metric_over_target.unwrap_or_default()).as_secs_f64(),
        "load_start_to_first_new_pod_ready_s": scale_out.as_secs_f64(),
        "load_start_to_max_replicas_ready_s": all_ready.unwrap_or_default().as_secs_f64(),
        "load_end_to_min_replicas_s": scale_in.as_secs_f64(),
        "requests_ok": ok, "requests_429": rejected, "requests_failed": errors.len(),
        "max_queue_depth_metric": max_metric,
    });
    println!("autoscaling figures: {figures}");
    if let Some(dir) = std::env::var_os("KILN_E2E_FIGURES") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("figures dir");
        std::fs::write(dir.join("autoscaling.json"), figures.to_string()).expect("write figures");
    }
    drop(operator);
}
