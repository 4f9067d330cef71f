//! What the end-to-end tests share: the dev cluster's admin client, the operator run as a
//! process under its own ServiceAccount token (bound to the shipped ClusterRole, never admin),
//! and patient waiting.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};

/// The repository root (this crate lives in `e2e/`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// The kubeconfig `make dev-cluster` printed; `make e2e` exports it.
pub fn kubeconfig() -> PathBuf {
    let path = std::env::var_os("KUBECONFIG").map(PathBuf::from).expect(
        "KUBECONFIG is not set: run the end-to-end tests with `make e2e` (it starts the dev cluster)",
    );
    assert!(path.is_file(), "KUBECONFIG {} does not exist: run `make dev-cluster`", path.display());
    path
}

pub async fn admin() -> Client {
    let config = Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .expect("read the admin kubeconfig");
    Client::try_from(config).expect("admin client")
}

/// A binary built by cargo next to the test executable (target/<profile>/NAME).
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join(name);
    assert!(bin.is_file(), "{} missing: `cargo test --workspace --no-run` builds it", bin.display());
    bin
}

pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("kubectl").args(args).output().context("run kubectl")?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Apply a YAML file (or -k directory) as the admin.
pub fn kubectl_apply(args: &[&str]) {
    let mut all = vec!["apply", "--server-side", "--force-conflicts"];
    all.extend_from_slice(args);
    kubectl(&all).unwrap_or_else(|e| panic!("{e}"));
}

/// Poll `check` until it yields a value or `timeout` passes; the panic names what was awaited
/// and the last observation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The named object once it exists. The operator writes a pool's objects concurrently and in no
/// fixed order, so a test never reads one only because another has appeared.
pub async fn eventually<K>(api: &Api<K>, name: &str, timeout: Duration) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} to exist"), timeout, || async {
        api.get_opt(name).await.map_err(|e| e.to_string())?.ok_or_else(|| "absent".to_string())
    })
    .await
}

/// Ready addresses in the Service's EndpointSlices (sorted): what a kube-proxy would balance
/// over. The endpointslice controller follows pod readiness with a delay of its own, so callers
/// wait for the set they expect rather than read it once.
pub async fn ready_endpoints(slices: &Api<EndpointSlice>, service: &str) -> Result<Vec<String>, String> {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let list = slices.list(&lp).await.map_err(|e| e.to_string())?;
    let mut ips: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.addresses.first().cloned())
        .collect();
    ips.sort();
    Ok(ips)
}

/// The first ready endpoint of the Service, once there is one.
pub async fn first_ready_endpoint(slices: &Api<EndpointSlice>, service: &str, timeout: Duration) -> String {
    wait_for(&format!("a ready endpoint of Service {service}"), timeout, || async {
        ready_endpoints(slices, service).await?.into_iter().next().ok_or_else(|| "none ready".to_string())
    })
    .await
}

/// A fresh namespace for one test, deleted (with everything in it) on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, name: &str) -> TestNamespace {
        let api: Api<Namespace> = Api::all(client.clone());
        let _ = api.delete(name, &DeleteParams::default()).await;
        wait_for(&format!("old namespace {name} to go"), Duration::from_secs(120), || async {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns).await.expect("create namespace");
        TestNamespace { name: name.to_string() }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Installs the CRD (server-side apply of crds/) and waits until the API server serves it.
pub async fn install_crd() {
    kubectl_apply(&["-f", repo().join("crds/modeldeployment.yaml").to_str().unwrap()]);
    kubectl(&["wait", "--for=condition=Established", "crd/modeldeployments.kiln.dev", "--timeout=60s"])
        .expect("CRD established");
}

/// The operator as a user runs it: its own process, authenticated by a token of the
/// `kiln-operator` ServiceAccount, authorised only by config/rbac's ClusterRole.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
    pub metrics: String,
}

impl Operator {
    pub async fn start(namespace: &str) -> Operator {
        Operator::start_with_lease(namespace, &format!("kiln-operator-{namespace}"), "").await
    }

    /// `instance` tells replicas of one test apart (their logs, their identities).
    pub async fn start_with_lease(namespace: &str, lease: &str, instance: &str) -> Operator {
        kubectl_apply(&["-k", repo().join("config/rbac").to_str().unwrap()]);
        let token = kubectl(&["create", "token", "kiln-operator", "-n", "kiln-system", "--duration=2h"])
            .expect("ServiceAccount token");
        let admin = kube::config::Kubeconfig::read_from(kubeconfig()).expect("admin kubeconfig");
        let cluster = admin.clusters.first().and_then(|c| c.cluster.clone()).expect("cluster entry");
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "dev", "cluster": {
                "server": cluster.server,
                "certificate-authority-data": cluster.certificate_authority_data,
                "certificate-authority": cluster.certificate_authority,
            }}],
            "users": [{"name": "kiln-operator", "user": {"token": token.trim()}}],
            "contexts": [{"name": "operator", "context": {"cluster": "dev", "user": "kiln-operator"}}],
            "current-context": "operator",
        });
        let dir = std::env::temp_dir().join(format!("kiln-e2e-operator-{namespace}{instance}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec(&kubeconfig).unwrap()).unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = dir.join("operator.log");
        let child = Command::new(built_binary("kiln-operator"))
            .args(["--namespace", namespace, "--metrics-addr", &metrics, "--log-format", "json"])
            // One Lease per test namespace: the tests run operators side by side.
            .args(["--leader-election-id", lease])
            .env("POD_NAME", format!("e2e-{namespace}{instance}"))
            .env("KUBECONFIG", &path)
            .env("RUST_LOG", "info,kiln_operator=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start kiln-operator");
        let op = Operator { child, log, metrics };
        let url = format!("http://{}/readyz", op.metrics);
        wait_for("the operator's /readyz", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                match reqwest::get(&url).await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        op
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Server-side apply of a JSON object through the admin client's dynamic API.
pub async fn apply_json(client: &Client, ns: &str, obj: &serde_json::Value) -> anyhow::Result<()> {
    let api: Api<kiln_operator::crd::ModelDeployment> = Api::namespaced(client.clone(), ns);
    let name = obj["metadata"]["name"].as_str().context("metadata.name")?;
    api.patch(name, &PatchParams::apply("kiln-e2e").force(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// A free port no other operator of this test binary was given: the kernel may hand a
/// just-released port to two binds in a row, and operators started side by side would share it.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(port) {
            return port;
        }
    }
}
