//! What the model-server pods say about their models, for `status.models[].loaded`: the
//! operator asks each ready pod of a pool with lazy models for its `/status` over the pod
//! network. That needs no RBAC beyond reading pods, and a pod that does not answer in time is
//! left out of the count rather than holding up the reconcile.

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::resources::SERVER_PORT;

/// Pods asked per pool at most: enough to show how lazy models spread, bounded for big pools.
pub const MAX_PODS: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(2);

/// One pod's answer: the `name:version` of every model it holds loaded and warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodReport {
    pub pod: String,
    pub loaded: Vec<String>,
}

/// The models a server's `/status` body reports Ready.
pub fn loaded_models(status: &Value) -> Vec<String> {
    status["models"]
        .as_array()
        .map(|models| {
            models
                .iter()
                .filter(|m| m["state"] == "Ready")
                .filter_map(|m| Some(format!("{}:{}", m["model"].as_str()?, m["version"].as_str()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod's IP when it is Ready.
fn ready_ip(pod: &Pod) -> Option<&str> {
    let status = pod.status.as_ref()?;
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then_some(())?;
    status.pod_ip.as_deref().filter(|ip| !ip.is_empty())
}

fn client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    // Pod IPs are dialed directly: a cluster-wide HTTP_PROXY must not carry these requests.
    CLIENT.get_or_init(|| reqwest::Client::builder().timeout(TIMEOUT).no_proxy().build().ok()).as_ref()
}

/// Ask the ready pods (at most [`MAX_PODS`], by name) for their `/status`, concurrently.
pub async fn read(pods: &[Pod]) -> Vec<PodReport> {
    let Some(client) = client() else { return Vec::new() };
    let mut ready: Vec<(String, &str)> = pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.clone().unwrap_or_default(), ready_ip(p)?)))
        .collect();
    ready.sort();
    ready.truncate(MAX_PODS);
    let asks = ready.into_iter().map(|(pod, ip)| async move {
        // An IPv6 pod address needs brackets in a URL.
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        let url = format!("http://{host}:{SERVER_PORT}/status");
        let body = async { client.get(&url).send().await?.error_for_status()?.json::<Value>().await };
        match body.await {
            Ok(status) => Some(PodReport { loaded: loaded_models(&status), pod }),
            Err(error) => {
                tracing::debug!(%pod, %error, "pod did not report its models");
                None
            }
        }
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_ready_models_count_as_loaded() {
        let status = json!({"models": [
            {"model": "a", "version": "v1", "state": "Ready"},
            {"model": "b", "version": "v1", "state": "Evicted"},
            {"model": "c", "version": "v2", "state": "Loading"},
            {"model": "d", "state": "Ready"},
        ]});
        assert_eq!(loaded_models(&status), ["a:v1"]);
        assert!(loaded_models(&json!({"error": "not a status"})).is_empty());
    }

    #[test]
    fn only_ready_pods_with_an_address_are_asked() {
        let pod = |ready: &str, ip: Option<&str>| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
            }))
            .expect("pod")
        };
        assert_eq!(ready_ip(&pod("True", Some("10.0.0.7"))), Some("10.0.0.7"));
        assert_eq!(ready_ip(&pod("False", Some("10.0.0.7"))), None);
        assert_eq!(ready_ip(&pod("True", None)), None);
    }
}
