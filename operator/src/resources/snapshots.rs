//! Snapshots (insta) of every object the builders produce for the shipped samples, so a
//! change to any field shows up in review as a diff of the YAML a cluster would receive.
//! `cargo insta review` (or `INSTA_UPDATE=always`) accepts an intended change.

use serde_json::{Value, json};

use super::testing::sample;
use super::{OperatorSettings, config_map, deployment, hpa, pdb, pool_manifest, service};
use crate::crd::ModelDeployment;

/// Everything the reconciler applies for each pool, in apply order, keyed by pool name.
fn desired(md: &ModelDeployment) -> Value {
    let settings = OperatorSettings::default();
    let mut pools = serde_json::Map::new();
    for pool in &md.spec.pools {
        let manifest = pool_manifest(md, pool).expect("sample manifests build");
        // The manifest is a JSON string in the ConfigMap; the snapshot shows it parsed, so a
        // change reads as a field diff rather than one changed line of escapes.
        let mut cm = json!(config_map(md, pool, &manifest));
        let text = cm["data"]["manifest.json"].as_str().expect("manifest.json").to_string();
        cm["data"]["manifest.json"] = serde_json::from_str(&text).expect("manifest is JSON");
        let objects = vec![
            cm,
            json!(deployment(md, pool, &manifest, &settings)),
            json!(service(md, pool)),
            json!(pdb(md, pool)),
            json!(hpa(md, pool)),
        ];
        pools.insert(pool.name.clone(), Value::Array(objects));
    }
    Value::Object(pools)
}

#[test]
fn cpu_pool() {
    insta::assert_yaml_snapshot!(desired(&sample("embeddings-cpu.yaml")));
}

/// One preloaded and two lazy models under a memory budget: the manifest carries both.
#[test]
fn lazy_models_under_a_budget() {
    insta::assert_yaml_snapshot!(desired(&sample("embeddings-many.yaml")));
}

/// Two GPU pools with tolerations, one fixed and one autoscaled on queue depth.
#[test]
fn ab_gpu_pools_with_autoscaling() {
    insta::assert_yaml_snapshot!(desired(&sample("embeddings-ab-gpu.yaml")));
}

/// The same resource with autoscaling turned off: fixed replicas, no HPA, and the
/// Deployment's replica count owned by the operator again.
#[test]
fn ab_gpu_pools_without_autoscaling() {
    let mut md = sample("embeddings-ab-gpu.yaml");
    for pool in &mut md.spec.pools {
        if pool.autoscaling.take().is_some() {
            pool.replicas = Some(2);
        }
    }
    insta::assert_yaml_snapshot!(desired(&md));
}

/// Weights on a PersistentVolumeClaim, mounted read-only instead of downloaded.
#[test]
fn pvc_source() {
    insta::assert_yaml_snapshot!(desired(&sample("textgen-pvc.yaml")));
}

/// Image-text embeddings (SigLIP) on a CPU pool: the family and batching reach the manifest.
#[test]
fn image_text_embeddings() {
    insta::assert_yaml_snapshot!(desired(&sample("image-text-embedding.yaml")));
}

/// Face detection (YuNet) on a CPU pool: the family, memory and batching reach the manifest.
#[test]
fn face_detection() {
    insta::assert_yaml_snapshot!(desired(&sample("face-detection.yaml")));
}
