//! Desired state: pure functions from a `ModelDeployment` to the objects of each pool.
//! No I/O here; the reconciler applies what these return.

mod manifest;
#[cfg(test)]
mod snapshots;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{ModelDeployment, PoolSpec};

pub use manifest::{ManifestError, pool_manifest};
pub use workload::{
    ServerImage, config_map, config_map_name, deployment, hpa, pdb, server_image, service, shutdown_timing,
};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "kiln-operator";
/// Label on every object Kiln creates, naming its ModelDeployment.
pub const LABEL_MD: &str = "kiln.dev/modeldeployment";
/// Label naming the pool.
pub const LABEL_POOL: &str = "kiln.dev/pool";
/// Pod-template annotation holding the manifest hash: a change rolls exactly that pool.
pub const ANNOTATION_MANIFEST_HASH: &str = "kiln.dev/manifest-sha256";
/// Port the model server listens on in pods.
pub const SERVER_PORT: i32 = 8080;

/// Settings that come from the operator's flags, not from the resource.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    pub model_server_image: String,
    /// The model server built with CUDA, for pools with `gpus > 0`; empty runs those pools on
    /// `model_server_image` and the CPU.
    pub model_server_cuda_image: String,
    /// Bytes of headroom added to every pool's memory requirement (runtime, buffers).
    pub memory_headroom_bytes: u64,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        OperatorSettings {
            model_server_image: "ghcr.io/kiln-dev/kiln-model-server:0.1.0".to_string(),
            model_server_cuda_image: "ghcr.io/kiln-dev/kiln-model-server:0.1.0-cuda".to_string(),
            memory_headroom_bytes: 256 << 20,
        }
    }
}

/// `<md>-<pool>`: the Deployment, Service, PDB and HPA name.
pub fn pool_object_name(md: &ModelDeployment, pool: &PoolSpec) -> String {
    format!("{}-{}", md.name_any(), pool.name)
}

pub fn selector_labels(md: &ModelDeployment, pool: &PoolSpec) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_MD.to_string(), md.name_any()), (LABEL_POOL.to_string(), pool.name.clone())])
}

fn labels(md: &ModelDeployment, pool: &PoolSpec) -> BTreeMap<String, String> {
    let mut l = selector_labels(md, pool);
    l.insert("app.kubernetes.io/name".into(), "kiln-model-server".into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l
}

/// Metadata of a child object: namespace, labels, controller owner reference.
pub fn child_meta(md: &ModelDeployment, pool: &PoolSpec, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: md.namespace(),
        labels: Some(labels(md, pool)),
        owner_references: owner_reference(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::crd::ModelDeployment;

    /// A sample from config/samples with the uid and namespace the API server would give it.
    pub fn sample(name: &str) -> ModelDeployment {
        let path = format!("{}/../config/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut md: ModelDeployment = serde_norway::from_str(&text).expect("sample parses");
        md.metadata.uid = Some("0b5e1f2c-7c1e-4d7a-9f00-000000000001".into());
        md.metadata.generation = Some(1);
        md
    }
}
