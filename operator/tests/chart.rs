//! The Helm chart (charts/kiln), rendered by the real `helm` over a matrix of values and read
//! back as Kubernetes objects: RBAC least privilege, pod security, leader election, namespaced
//! mode, monitoring, schema validation, and the files that must stay equal to their sources.
//! `KILN_HELM` names the helm binary (`make unit` installs it with scripts/helm.sh).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> String {
    std::env::var("KILN_HELM")
        .expect("KILN_HELM must name the helm binary (make unit sets it via scripts/helm.sh)")
}

/// `helm template` with these `--set` values: Ok(objects) or Err(helm's message).
fn render(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "kiln", "charts/kiln", "--namespace", "kiln-system"]).current_dir(repo());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).expect("helm output is YAML");
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect();
    k.sort();
    k
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}: {:?}", kinds(objects));
    found[0]
}

fn deployment(objects: &[Value]) -> Deployment {
    serde_json::from_value(one(objects, "Deployment").clone()).expect("a valid Deployment")
}

fn args(d: &Deployment) -> Vec<String> {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers[0].args.clone().unwrap_or_default()
}

fn rules(objects: &[Value]) -> Vec<PolicyRule> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .flat_map(|o| serde_json::from_value::<Vec<PolicyRule>>(o["rules"].clone()).expect("rules"))
        .collect()
}

#[test]
fn default_values_lint_and_render_two_leader_elected_replicas_with_cluster_rbac() {
    let out =
        Command::new(helm()).args(["lint", "--strict", "charts/kiln"]).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "helm lint: {}", String::from_utf8_lossy(&out.stdout));

    let objects = render(&[]).expect("default values render");
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole/kiln-operator",
            "ClusterRoleBinding/kiln-operator",
            "Deployment/kiln-operator",
            "PodDisruptionBudget/kiln-operator",
            "Role/kiln-operator-leader-election",
            "RoleBinding/kiln-operator-leader-election",
            "Service/kiln-operator-metrics",
            "ServiceAccount/kiln-operator",
            "ValidatingAdmissionPolicy/kiln-model-server-image",
            "ValidatingAdmissionPolicyBinding/kiln-model-server-image",
        ]
    );
    let d = deployment(&objects);
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let a = args(&d);
    assert!(a.contains(&"--leader-elect=true".to_string()), "{a:?}");
    assert!(a.contains(&"--namespace=".to_string()), "watches every namespace: {a:?}");
    // GPU pools get the CUDA build unless the platform team empties the value.
    assert!(
        a.contains(&"--model-server-cuda-image=ghcr.io/kiln-dev/kiln-model-server:0.1.0-cuda".to_string()),
        "{a:?}"
    );
    let no_cuda = args(&deployment(&render(&["modelServerCudaImage="]).expect("render")));
    assert!(no_cuda.contains(&"--model-server-cuda-image=".to_string()), "{no_cuda:?}");
    // The lease Role lives in the release namespace, nowhere else.
    let lease_role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
    assert_eq!(lease_role["metadata"]["namespace"], "kiln-system");
}

#[test]
fn rbac_grants_only_what_the_operator_uses() {
    for sets in [&[][..], &["watchNamespace=ml"][..]] {
        let objects = render(sets).unwrap();
        for rule in rules(&objects) {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            assert!(
                !groups.iter().chain(&resources).chain(&rule.verbs).any(|s| s == "*"),
                "wildcard: {rule:?}"
            );
            assert!(!resources.iter().any(|r| r == "secrets"), "the operator never reads Secrets: {rule:?}");
            if resources.iter().any(|r| r == "pods") {
                assert_eq!(rule.verbs, ["get", "list", "watch"], "pods are read-only: {rule:?}");
            }
            if resources.iter().any(|r| r == "modeldeployments") {
                assert_eq!(rule.verbs, ["get", "list", "watch"], "only status is written: {rule:?}");
            }
        }
        for o in &objects {
            if o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding" {
                assert_ne!(o["roleRef"]["name"], "cluster-admin");
            }
        }
    }
}

#[test]
fn watch_namespace_uses_a_role_in_that_namespace_and_nothing_cluster_wide() {
    let objects = render(&["watchNamespace=ml"]).unwrap();
    let k = kinds(&objects);
    assert!(!k.iter().any(|k| k.starts_with("Cluster")), "{k:?}");
    let roles: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Role").collect();
    let namespaces: Vec<&str> = roles.iter().map(|r| r["metadata"]["namespace"].as_str().unwrap()).collect();
    assert_eq!(namespaces, ["ml", "kiln-system"], "the operator's Role in ml, the lease Role at home");
    assert!(args(&deployment(&objects)).contains(&"--namespace=ml".to_string()));
}

#[test]
fn without_leader_election_one_replica_is_recreated_never_doubled() {
    let objects = render(&["leaderElection.enabled=false", "replicaCount=3"]).unwrap();
    let d = deployment(&objects);
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.as_ref().unwrap().type_.as_deref(), Some("Recreate"));
    assert!(args(&d).contains(&"--leader-elect=false".to_string()));
    let k = kinds(&objects);
    assert!(
        !k.iter().any(|k| k.starts_with("PodDisruptionBudget") || k.contains("leader-election")),
        "{k:?}"
    );
}

#[test]
fn monitoring_renders_monitors_and_the_adapter_rule_for_queue_depth() {
    let objects = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "prometheusAdapter.rules.enabled=true",
    ])
    .unwrap();
    assert_eq!(one(&objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"], "metrics");
    let pm = one(&objects, "PodMonitor");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    // The PodMonitor must select the pods the operator's Deployments make, or the HPAs never
    // see a metric (it once asked for a label only the Deployments carried).
    let text = std::fs::read_to_string(repo().join("config/samples/embeddings-cpu.yaml")).unwrap();
    let mut md: kiln_operator::crd::ModelDeployment = serde_norway::from_str(&text).unwrap();
    md.metadata.namespace = Some("ml".into());
    let pool = &md.spec.pools[0];
    let manifest = kiln_operator::resources::pool_manifest(&md, pool).unwrap();
    let d = kiln_operator::resources::deployment(&md, pool, &manifest, &Default::default());
    let template = d.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    let selector = &pm["spec"]["selector"];
    for (k, v) in selector["matchLabels"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k).map(String::as_str), v.as_str(), "pods lack {k}={v}: {pod_labels:?}");
    }
    for e in selector["matchExpressions"].as_array().into_iter().flatten() {
        assert_eq!(e["operator"], "Exists", "{e}");
        assert!(pod_labels.contains_key(e["key"].as_str().unwrap()), "pods lack {e}: {pod_labels:?}");
    }
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"].as_str().unwrap();
    let named: Vec<String> =
        template.spec.unwrap().containers[0].ports.iter().flatten().filter_map(|p| p.name.clone()).collect();
    assert!(named.iter().any(|n| n == port), "no container port named {port}: {named:?}");
    let rules = one(&objects, "ConfigMap")["data"]["config.yaml"].as_str().unwrap();
    assert!(rules.contains("seriesQuery: 'kiln_queue_depth{namespace!=\"\",pod!=\"\"}'"), "{rules}");
    assert!(rules.contains("as: \"kiln_queue_depth\""), "{rules}");
}

#[test]
fn every_pod_runs_restricted() {
    for sets in [&[][..], &["leaderElection.enabled=false"][..], &["watchNamespace=ml"][..]] {
        let d = deployment(&render(sets).unwrap());
        let pod: PodSpec = d.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        for c in pod.containers {
            let sc = c.security_context.expect("container securityContext");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]), "{}", c.name);
            let probe =
                |p: Option<k8s_openapi::api::core::v1::Probe>| p.and_then(|p| p.http_get).map(|h| h.path);
            assert_eq!(probe(c.liveness_probe), Some(Some("/healthz".to_string())));
            assert_eq!(probe(c.readiness_probe), Some(Some("/readyz".to_string())));
        }
    }
}

/// Whoever may create ModelDeployments chooses their pods' image: the chart limits it with an
/// admission policy, on by default, whose allowed prefixes are a value.
#[test]
fn the_image_policy_allows_only_the_configured_prefixes() {
    let objects =
        render(&["imagePolicy.allowedImagePrefixes={registry.corp/ml/,ghcr.io/kiln-dev/}"]).expect("render");
    let policy = one(&objects, "ValidatingAdmissionPolicy");
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0], "modeldeployments");
    let vars = policy["spec"]["variables"].as_array().expect("variables");
    let allowed = vars.iter().find(|v| v["name"] == "allowed").expect("allowed");
    assert_eq!(allowed["expression"], r#"["registry.corp/ml/", "ghcr.io/kiln-dev/"]"#);
    let rule = policy["spec"]["validations"][0]["expression"].as_str().expect("expression");
    assert!(rule.contains("variables.image == ''"), "an empty spec.image is the operator's default: {rule}");
    assert!(
        rule.contains("\"ghcr.io/kiln-dev/kiln-model-server:0.1.0\""),
        "modelServerImage is allowed: {rule}"
    );
    assert!(
        rule.contains("ghcr.io/kiln-dev/kiln-model-server:0.1.0-cuda"),
        "so is modelServerCudaImage: {rule}"
    );
    let binding = one(&objects, "ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert!(binding["spec"]["matchResources"].is_null(), "every namespace by default");
    // Scoped to the watched namespace, and off when asked.
    let scoped = render(&["watchNamespace=ml"]).expect("render");
    let binding = one(&scoped, "ValidatingAdmissionPolicyBinding");
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "ml"
    );
    let off = render(&["imagePolicy.enabled=false"]).expect("render");
    assert!(!kinds(&off).iter().any(|k| k.starts_with("ValidatingAdmissionPolicy")));
    // A prefix that would break out of the CEL string is refused by the schema.
    let err = render(&["imagePolicy.allowedImagePrefixes={evil'}"]).expect_err("a quote in a prefix");
    assert!(err.contains("allowedImagePrefixes"), "{err}");
}

#[test]
fn the_schema_refuses_bad_values_with_the_field_named() {
    for (set, field) in [
        ("logFormat=yaml", "logFormat"),
        ("replicaCount=two", "replicaCount"),
        ("leaderElection.enabeld=true", "enabeld"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=80", "port"),
    ] {
        let err = render(&[set]).expect_err(set);
        assert!(err.contains(field), "{set}: {err}");
    }
}

#[test]
fn the_charts_crd_and_the_generated_config_match_their_sources() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(
        read("charts/kiln/crds/modeldeployment.yaml") == read("crds/modeldeployment.yaml"),
        "charts/kiln/crds is stale: run make generate"
    );
    let out = std::env::temp_dir().join(format!("kiln-gen-config-{}", std::process::id()));
    let status = Command::new("python3")
        .args([repo().join("scripts/gen-config.py").to_str().unwrap(), &helm(), out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    for (dir, file) in [
        ("rbac", "service_account.yaml"),
        ("rbac", "role.yaml"),
        ("manager", "deployment.yaml"),
        ("manager", "service.yaml"),
        ("manager", "pdb.yaml"),
        ("prometheus", "monitoring.yaml"),
        ("admission", "image-policy.yaml"),
    ] {
        let generated = std::fs::read_to_string(out.join(dir).join(file)).unwrap();
        assert!(
            generated == read(&format!("config/{dir}/{file}")),
            "config/{dir}/{file} differs from the chart: run make generate"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    let built =
        Command::new("kubectl").args(["kustomize", "config/default"]).current_dir(repo()).output().unwrap();
    assert!(
        built.status.success(),
        "kubectl kustomize config/default: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let text = String::from_utf8(built.stdout).unwrap();
    for kind in [
        "CustomResourceDefinition",
        "ClusterRole",
        "Deployment",
        "ServiceAccount",
        "Namespace",
        "ValidatingAdmissionPolicy",
    ] {
        assert!(text.contains(&format!("kind: {kind}\n")), "config/default lacks a {kind}");
    }
}
