//! Kiln's operator: `ModelDeployment` → per-pool model-server Deployments, Services, manifests,
//! PodDisruptionBudgets and queue-depth HPAs.

pub mod cache;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod owned;
pub mod pod_status;
/// Quantities as bytes, shared with the server (its memory flags parse the same way).
pub use kiln_model_server::quantity;
pub mod reconcile;
pub mod reference;
pub mod resources;
pub mod status;
