//! The Kubernetes objects of one pool.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kiln_model_server::manifest::{Manifest, SourceUri};
use sha2::{Digest, Sha256};

use super::{
    ANNOTATION_MANIFEST_HASH, OperatorSettings, SERVER_PORT, child_meta, pool_object_name, selector_labels,
};
use crate::crd::{ModelDeployment, PoolSpec};
use crate::quantity::canonical_mib;

const MANIFEST_DIR: &str = "/etc/kiln";
const MANIFEST_KEY: &str = "manifest.json";
const CACHE_DIR: &str = "/var/cache/kiln/models";
/// Non-root user and group of the model-server image.
const RUN_AS: i64 = 65532;
/// Seconds between startup probes; the failure budget covers `warmup.timeoutSeconds`.
const STARTUP_PERIOD: i32 = 5;
/// The pod's termination grace period, split by [`shutdown_timing`].
const TERMINATION_GRACE_SECONDS: i64 = 30;
/// A probe's answer may take this long: `/readyz` is cheap, but a saturated CPU (inference on
/// every core) can delay any answer by seconds, and a timed-out probe counts as a failure.
const PROBE_TIMEOUT: i32 = 5;

/// How the server spends the grace period after SIGTERM: a drain delay (readiness down,
/// requests still served, so endpoint removal reaches every client first), then the listener
/// closes and running requests get until a few seconds before the kubelet's SIGKILL.
pub fn shutdown_timing(grace_seconds: i64) -> (i64, i64) {
    let drain = (grace_seconds / 3).clamp(0, 10);
    let shutdown = (grace_seconds - drain - 5).max(1);
    (drain, shutdown)
}

pub fn config_map_name(md: &ModelDeployment, pool: &PoolSpec) -> String {
    format!("{}-manifest", pool_object_name(md, pool))
}

pub fn config_map(md: &ModelDeployment, pool: &PoolSpec, manifest: &Manifest) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(md, pool, config_map_name(md, pool)),
        data: Some(BTreeMap::from([(MANIFEST_KEY.to_string(), manifest.to_json())])),
        ..ConfigMap::default()
    }
}

pub fn manifest_hash(manifest: &Manifest) -> String {
    hex::encode(Sha256::digest(manifest.to_json().as_bytes()))
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(PROBE_TIMEOUT),
        ..Probe::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        // The API server omits `readOnly: false`; leaving it out keeps live equal to desired.
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// Claims named by `pvc://` sources, each mounted read-only under the manifest's pvcRoot.
fn pvc_claims(manifest: &Manifest) -> Vec<String> {
    let mut claims: Vec<String> = manifest
        .models
        .iter()
        .filter_map(|m| match m.source.uri.parse::<SourceUri>() {
            Ok(SourceUri::Pvc { claim, .. }) => Some(claim),
            _ => None,
        })
        .collect();
    claims.sort();
    claims.dedup();
    claims
}

/// Size the download cache: the weights' declared sizes with room for tokenizer and config
/// files, or a default when no size is known.
fn cache_size(manifest: &Manifest) -> Quantity {
    let declared: u64 = manifest.models.iter().filter_map(|m| m.memory_bytes).sum();
    let bytes = if declared == 0 { 10 << 30 } else { declared + declared / 4 + (256 << 20) };
    Quantity(canonical_mib(bytes))
}

fn resources(pool: &PoolSpec) -> ResourceRequirements {
    let mut r = pool.resources.clone().unwrap_or_default();
    if pool.gpus > 0 {
        let gpus = Quantity(pool.gpus.to_string());
        r.limits.get_or_insert_with(BTreeMap::new).insert(pool.gpu_resource.clone(), gpus.clone());
        r.requests.get_or_insert_with(BTreeMap::new).insert(pool.gpu_resource.clone(), gpus);
    }
    r
}

/// What a pool's model server runs: its image and the `--device` it computes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerImage {
    pub image: String,
    /// `cuda:0` on a GPU pool (the first GPU the pod was given; a server never falls back to
    /// the CPU when told a GPU), else `cpu`.
    pub device: &'static str,
    /// The `pull` init container's image: never the CUDA build, which cannot start where no
    /// GPU driver is mounted (an init container requests no GPU).
    pub pull_image: String,
}

/// The image and device of `pool`'s server. `spec.image`, when set, is every pool's image (on
/// a GPU pool it must be a CUDA build); otherwise GPU pools get the operator's CUDA image and
/// CPU pools its CPU image. With no CUDA image configured, GPU pools run the CPU image on the
/// CPU: the platform team's explicit choice.
pub fn server_image(md: &ModelDeployment, pool: &PoolSpec, settings: &OperatorSettings) -> ServerImage {
    let custom = md.spec.image.clone().filter(|i| !i.is_empty());
    let cuda_image = Some(settings.model_server_cuda_image.clone()).filter(|i| !i.is_empty());
    let cpu_image = custom.clone().unwrap_or_else(|| settings.model_server_image.clone());
    match custom.or(cuda_image).filter(|_| pool.gpus > 0) {
        Some(image) => ServerImage { image, device: "cuda:0", pull_image: cpu_image },
        None => ServerImage { image: cpu_image.clone(), device: "cpu", pull_image: cpu_image },
    }
}

pub fn deployment(
    md: &ModelDeployment,
    pool: &PoolSpec,
    manifest: &Manifest,
    settings: &OperatorSettings,
) -> Deployment {
    let name = pool_object_name(md, pool);
    let ServerImage { image, device, pull_image } = server_image(md, pool, settings);
    let manifest_path = format!("{MANIFEST_DIR}/{MANIFEST_KEY}");
    let claims = pvc_claims(manifest);

    let mut volumes = vec![
        Volume {
            name: "manifest".into(),
            config_map: Some(ConfigMapVolumeSource { name: config_map_name(md, pool), ..Default::default() }),
            ..Volume::default()
        },
        Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(cache_size(manifest)), medium: None }),
            ..Volume::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ];
    let mut mounts = vec![
        mount("manifest", MANIFEST_DIR, true),
        mount("cache", CACHE_DIR, false),
        mount("tmp", "/tmp", false),
    ];
    for (i, claim) in claims.iter().enumerate() {
        let volume = format!("pvc-{i}");
        volumes.push(Volume {
            name: volume.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(mount(&volume, &format!("{}/{claim}", manifest.pvc_root), true));
    }

    // Credentials reach the pods through envFrom; the operator never reads a Secret.
    let mut secrets: Vec<String> = md
        .spec
        .models
        .iter()
        .filter(|m| manifest.models.iter().any(|e| e.name == m.name && e.version == m.version))
        .filter_map(|m| m.source.credentials_secret.clone())
        .collect();
    secrets.sort();
    secrets.dedup();
    let env_from: Vec<EnvFromSource> = secrets
        .into_iter()
        .map(|s| EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: s, optional: Some(false) }),
            ..Default::default()
        })
        .collect();
    let env =
        vec![EnvVar { name: "KILN_LOG_FORMAT".into(), value: Some("json".into()), ..EnvVar::default() }];

    let pull = Container {
        name: "pull".into(),
        image: Some(pull_image),
        command: Some(vec!["kiln-model-server".into()]),
        args: Some(vec![
            "pull".into(),
            "--manifest".into(),
            manifest_path.clone(),
            "--cache-dir".into(),
            CACHE_DIR.into(),
        ]),
        env: Some(env.clone()),
        env_from: (!env_from.is_empty()).then(|| env_from.clone()),
        volume_mounts: Some(mounts.clone()),
        security_context: Some(container_security()),
        ..Container::default()
    };
    let startup_failures = md.spec.warmup.timeout_seconds.div_ceil(STARTUP_PERIOD as u32).max(1) as i32;
    let (drain, shutdown) = shutdown_timing(TERMINATION_GRACE_SECONDS);
    let serve = Container {
        name: "server".into(),
        image: Some(image),
        command: Some(vec!["kiln-model-server".into()]),
        args: Some(vec![
            "serve".into(),
            "--manifest".into(),
            manifest_path,
            "--cache-dir".into(),
            CACHE_DIR.into(),
            "--listen".into(),
            format!("0.0.0.0:{SERVER_PORT}"),
            "--device".into(),
            device.into(),
            "--drain-delay-seconds".into(),
            drain.to_string(),
            "--shutdown-timeout-seconds".into(),
            shutdown.to_string(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: SERVER_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: Some(env),
        volume_mounts: Some(mounts),
        resources: Some(resources(pool)),
        // Readiness is the server's own: 503 until every model is loaded and warm. Three
        // misses in a row, so one slow answer under full load does not flap the endpoint; a
        // terminating pod leaves the endpoints at once regardless.
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        // Until warm, only the startup probe runs; its budget is warmup.timeoutSeconds.
        startup_probe: Some(http_probe("/readyz", STARTUP_PERIOD, startup_failures)),
        security_context: Some(container_security()),
        ..Container::default()
    };

    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_MANIFEST_HASH.to_string(), manifest_hash(manifest));
    let mut pod_labels = selector_labels(md, pool);
    pod_labels.insert("app.kubernetes.io/name".into(), "kiln-model-server".into());

    Deployment {
        metadata: child_meta(md, pool, name),
        spec: Some(DeploymentSpec {
            // With autoscaling the HPA owns the count; leaving it out of the apply never fights it.
            replicas: if pool.autoscaling.is_some() { None } else { Some(pool.replicas.unwrap_or(1) as i32) },
            selector: LabelSelector {
                match_labels: Some(selector_labels(md, pool)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    node_selector: (!pool.node_selector.is_empty()).then(|| pool.node_selector.clone()),
                    tolerations: (!pool.tolerations.is_empty()).then(|| pool.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    init_containers: Some(vec![pull]),
                    containers: vec![serve],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub fn service(md: &ModelDeployment, pool: &PoolSpec) -> Service {
    Service {
        metadata: child_meta(md, pool, pool_object_name(md, pool)),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(md, pool)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Present when the pool can run more than one replica, so voluntary evictions (node drains)
/// never take the last ready pod of a multi-replica pool.
pub fn pdb(md: &ModelDeployment, pool: &PoolSpec) -> Option<PodDisruptionBudget> {
    let many = match &pool.autoscaling {
        Some(a) => a.min_replicas > 1,
        None => pool.replicas.unwrap_or(1) > 1,
    };
    many.then(|| PodDisruptionBudget {
        metadata: child_meta(md, pool, pool_object_name(md, pool)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md, pool)),
                ..Default::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

pub fn hpa(md: &ModelDeployment, pool: &PoolSpec) -> Option<HorizontalPodAutoscaler> {
    let a = pool.autoscaling.as_ref()?;
    let name = pool_object_name(md, pool);
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(md, pool, name.clone()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(a.min_replicas as i32),
            max_replicas: a.max_replicas as i32,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier { name: "kiln_queue_depth".into(), selector: None },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(a.target_queue_depth.to_string())),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: a.scale_down_stabilization_seconds.map(|seconds| HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(seconds as i32),
                    ..HPAScalingRules::default()
                }),
                scale_up: None,
            }),
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::pool_manifest;
    use crate::resources::testing::sample;

    fn build(name: &str, pool: usize) -> (ModelDeployment, Deployment, Manifest) {
        let md = sample(name);
        let p = &md.spec.pools[pool];
        let m = pool_manifest(&md, p).expect("manifest");
        let d = deployment(&md, p, &m, &OperatorSettings::default());
        (md, d, m)
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
    }

    /// The server container's image and `--device`, and the pull container's image.
    fn images(d: &Deployment) -> (String, String, String) {
        let pod = pod(d);
        let server = &pod.containers[0];
        let args = server.args.as_ref().expect("args");
        let at = args.iter().position(|a| a == "--device").expect("--device");
        let pull = &pod.init_containers.as_ref().expect("init")[0];
        (server.image.clone().expect("image"), args[at + 1].clone(), pull.image.clone().expect("pull image"))
    }

    #[test]
    fn gpu_pools_run_the_cuda_image_on_their_gpu_and_cpu_pools_the_cpu_image() {
        let settings = OperatorSettings::default();
        let (cpu, cuda) = (settings.model_server_image.clone(), settings.model_server_cuda_image.clone());
        let (_, d, _) = build("embeddings-ab-gpu.yaml", 0);
        assert_eq!(images(&d), (cuda.clone(), "cuda:0".into(), cpu.clone()), "the a100 pool");
        let (_, d, _) = build("embeddings-cpu.yaml", 0);
        assert_eq!(images(&d), (cpu.clone(), "cpu".into(), cpu.clone()), "a CPU pool");

        // spec.image is every pool's image; on a GPU pool it is told to use the GPU.
        let mut md = sample("embeddings-ab-gpu.yaml");
        md.spec.image = Some("registry.example/kiln-model-server:custom-cuda".into());
        let p = &md.spec.pools[0];
        let d = deployment(&md, p, &pool_manifest(&md, p).expect("manifest"), &settings);
        let custom = "registry.example/kiln-model-server:custom-cuda".to_string();
        assert_eq!(images(&d), (custom.clone(), "cuda:0".into(), custom));

        // No CUDA image configured: GPU pools run the CPU image on the CPU, by choice.
        let md = sample("embeddings-ab-gpu.yaml");
        let p = &md.spec.pools[0];
        let no_cuda =
            OperatorSettings { model_server_cuda_image: String::new(), ..OperatorSettings::default() };
        let d = deployment(&md, p, &pool_manifest(&md, p).expect("manifest"), &no_cuda);
        assert_eq!(images(&d), (cpu.clone(), "cpu".into(), cpu));
    }

    #[test]
    fn cpu_pool_deployment_is_locked_down_and_probed() {
        let (md, d, m) = build("embeddings-cpu.yaml", 0);
        assert_eq!(d.metadata.name.as_deref(), Some("embeddings-cpu"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("ml"));
        let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("ModelDeployment", Some(true)));
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let ru = spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).expect("rolling");
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
        let pod = pod(&d);
        assert_eq!(pod.automount_service_account_token, Some(false));
        let psc = pod.security_context.as_ref().expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            pod.node_selector.as_ref().and_then(|n| n.get("kiln.dev/pool")).map(String::as_str),
            Some("cpu")
        );
        let init = &pod.init_containers.as_ref().expect("init")[0];
        assert_eq!(init.args.as_ref().expect("args")[0], "pull");
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().expect("args")[0], "serve");
        for sc in [init.security_context.as_ref(), c.security_context.as_ref()] {
            let sc = sc.expect("container security");
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
        }
        let path =
            |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone());
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
        // warmup.timeoutSeconds 300 at a 5 s period.
        assert_eq!(c.startup_probe.as_ref().and_then(|p| p.failure_threshold), Some(60));
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).expect("limits");
        assert!(!limits.contains_key("nvidia.com/gpu"), "CPU pool asks for no GPU");
        assert_eq!(
            d.spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(ANNOTATION_MANIFEST_HASH))
                .cloned(),
            Some(manifest_hash(&m))
        );
        assert!(pdb(&md, &md.spec.pools[0]).is_some(), "two replicas get a PDB");
        assert!(hpa(&md, &md.spec.pools[0]).is_none());
    }

    #[test]
    fn gpu_pool_with_autoscaling_leaves_replicas_to_the_hpa() {
        let (md, d, _) = build("embeddings-ab-gpu.yaml", 1);
        let pool = &md.spec.pools[1];
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), None);
        let pod = pod(&d);
        assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
        let c = &pod.containers[0];
        let gpu = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .cloned();
        assert_eq!(gpu, Some(Quantity("1".into())));
        let init = &pod.init_containers.as_ref().expect("init")[0];
        let secret = init.env_from.as_ref().and_then(|e| e[0].secret_ref.as_ref()).map(|s| s.name.clone());
        assert_eq!(secret.as_deref(), Some("s3-creds"));
        let h = hpa(&md, pool).expect("hpa");
        let spec = h.spec.expect("hpa spec");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 4));
        let metric = &spec.metrics.expect("metrics")[0];
        let pods = metric.pods.as_ref().expect("pods metric");
        assert_eq!(pods.metric.name, "kiln_queue_depth");
        assert_eq!(pods.target.average_value, Some(Quantity("8".into())));
        assert_eq!(spec.scale_target_ref.name, "bge-ab-l4");
        assert!(pdb(&md, pool).is_none(), "minReplicas 1: no PDB");
    }

    #[test]
    fn ab_pools_get_different_manifests_so_only_one_rolls() {
        let (_, a, ma) = build("embeddings-ab-gpu.yaml", 0);
        let (_, b, mb) = build("embeddings-ab-gpu.yaml", 1);
        assert_ne!(manifest_hash(&ma), manifest_hash(&mb));
        assert_ne!(a.metadata.name, b.metadata.name);
        // Changing v2's source changes only the l4 pool's manifest.
        let mut md = sample("embeddings-ab-gpu.yaml");
        md.spec.models[1].source.uri = "s3://models/bge-base/v2-fixed/".into();
        let ma2 = pool_manifest(&md, &md.spec.pools[0]).expect("manifest");
        let mb2 = pool_manifest(&md, &md.spec.pools[1]).expect("manifest");
        assert_eq!(manifest_hash(&ma), manifest_hash(&ma2));
        assert_ne!(manifest_hash(&mb), manifest_hash(&mb2));
    }

    #[test]
    fn pvc_sources_are_mounted_read_only() {
        let (md, d, _) = build("textgen-pvc.yaml", 0);
        let pod = pod(&d);
        let vol = pod
            .volumes
            .as_ref()
            .expect("volumes")
            .iter()
            .find(|v| v.persistent_volume_claim.is_some())
            .expect("pvc volume");
        let pvc = vol.persistent_volume_claim.as_ref().expect("pvc");
        assert_eq!((pvc.claim_name.as_str(), pvc.read_only), ("model-weights", Some(true)));
        let m = pod.containers[0]
            .volume_mounts
            .as_ref()
            .expect("mounts")
            .iter()
            .find(|m| m.name == vol.name)
            .expect("mount");
        assert_eq!((m.mount_path.as_str(), m.read_only), ("/var/run/kiln/pvc/model-weights", Some(true)));
        let svc = service(&md, &md.spec.pools[0]);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat-l4"));
        assert_eq!(svc.spec.and_then(|s| s.selector).map(|s| s.len()), Some(2));
        let cm =
            config_map(&md, &md.spec.pools[0], &pool_manifest(&md, &md.spec.pools[0]).expect("manifest"));
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-l4-manifest"));
        let text = cm.data.and_then(|d| d.get("manifest.json").cloned()).expect("manifest json");
        assert_eq!(
            Manifest::from_json(&text).expect("readable by the server").family.as_str(),
            "text-generation"
        );
    }
}
