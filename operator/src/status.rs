//! Status as a pure function of the spec and what the cluster reports, so `kubectl get md` and
//! `kubectl wait --for=condition=Ready` tell the truth.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{
    Load, ModelDeployment, ModelDeploymentStatus, ModelState, ModelStatus, PoolLoaded, PoolStatus,
};
use crate::quantity::format_bytes;
use crate::resources::{SERVER_PORT, pool_object_name};

/// Memory a pool needs against what it has, when both are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    pub required: u64,
    pub available: Option<u64>,
    /// Served models without a size hint (not counted in `required`).
    pub unknown_size: Vec<String>,
    /// The pool's memoryBudget and what the memory limit leaves beside the headroom, when the
    /// budget is larger.
    pub budget_over_limit: Option<(u64, u64)>,
    /// The lazy model counted in `required` (the largest), if the pool has lazy models.
    pub largest_lazy: Option<String>,
    /// The pool's memoryBudget when it is what bounds `available` (then `available` is the
    /// budget plus `headroom`).
    pub budget: Option<u64>,
    pub headroom: u64,
}

impl Fit {
    pub fn fits(&self) -> bool {
        self.available.is_none_or(|a| self.required <= a) && self.budget_over_limit.is_none()
    }

    /// Why the pool's models do not fit, for status and events.
    pub fn misfit(&self, pool: &crate::crd::PoolSpec) -> String {
        if let Some((budget, room)) = self.budget_over_limit {
            return format!(
                "pool {}: memoryBudget {} is more than the {} its memory limit leaves beside the runtime headroom; lower memoryBudget or raise the limit; pods left as they were",
                pool.name,
                format_bytes(budget),
                format_bytes(room),
            );
        }
        let counted = match &self.largest_lazy {
            Some(lazy) => format!(" (the preloaded models plus the largest lazy one, {lazy})"),
            None => String::new(),
        };
        if let Some(budget) = self.budget {
            return format!(
                "pool {}: models {} need {}{counted} but its memoryBudget is {}; raise memoryBudget or move a model to another pool; pods left as they were",
                pool.name,
                pool.serve.join(", "),
                format_bytes(self.required.saturating_sub(self.headroom)),
                format_bytes(budget),
            );
        }
        format!(
            "pool {}: models {} need {}{counted} but a replica has {}; pods left as they were",
            pool.name,
            pool.serve.join(", "),
            format_bytes(self.required),
            format_bytes(self.available.unwrap_or(0)),
        )
    }
}

/// What the reconciler observed for one pool.
#[derive(Debug, Clone)]
pub struct PoolObservation {
    pub deployment: Option<Deployment>,
    /// The pool's pods, for what a Deployment does not say: unschedulable, crash-looping.
    pub pods: Vec<Pod>,
    pub fit: Fit,
    /// Objects of the pool's names that this resource does not control (`Kind ns/name`):
    /// nothing is written to the pool while any exists.
    pub conflicts: Vec<String>,
    /// What the pool's ready pods report of their models (asked only when it serves lazy ones).
    pub reports: Vec<crate::pod_status::PodReport>,
}

/// Container states that mean "this will not get better by waiting".
const STUCK: [&str; 6] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "InvalidImageName",
    "RunContainerError",
];

/// Why a pod cannot serve, as (reason, message), from its scheduling condition and container
/// statuses. Messages keep only the last line of a termination message (the error itself), so
/// they stay stable across restarts and the status is not rewritten on every crash.
pub fn pod_problem(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
    }) {
        let why = c.message.clone().unwrap_or_default();
        return Some(("Unschedulable".into(), format!("pod {name} cannot be scheduled: {why}")));
    }
    let containers =
        status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else { continue };
        let reason = waiting.reason.clone().unwrap_or_default();
        if !STUCK.contains(&reason.as_str()) {
            continue;
        }
        let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        let detail = last
            .and_then(|t| t.message.as_deref())
            .or(waiting.message.as_deref())
            .and_then(|m| m.lines().rev().find(|l| !l.trim().is_empty()))
            .map(|l| l.chars().take(300).collect::<String>())
            .unwrap_or_default();
        let exit = last.map(|t| format!(" (exit code {})", t.exit_code)).unwrap_or_default();
        return Some((reason, format!("pod {name} container {}{exit}: {detail}", c.name)));
    }
    None
}

fn condition(type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        // Replaced by the previous time when the status did not change (see `keep_transition_times`).
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Desired replicas of a pool: the Deployment's (set by us or by the HPA).
fn desired(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn ready(d: &Deployment) -> i32 {
    d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0)
}

fn rollout_done(d: &Deployment) -> bool {
    let generation_seen = d.status.as_ref().and_then(|s| s.observed_generation) >= d.metadata.generation;
    let s = d.status.as_ref();
    let updated = s.and_then(|s| s.updated_replicas).unwrap_or(0);
    let total = s.and_then(|s| s.replicas).unwrap_or(0);
    generation_seen && updated >= desired(d) && total <= desired(d) && ready(d) >= desired(d)
}

/// A Deployment condition saying the rollout is stuck (quota, deadline exceeded).
fn deployment_failure(d: &Deployment) -> Option<String> {
    d.status.as_ref()?.conditions.as_ref()?.iter().find_map(|c| {
        let failed = (c.type_ == "ReplicaFailure" && c.status == "True")
            || (c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
        failed.then(|| c.message.clone().unwrap_or_else(|| c.type_.clone()))
    })
}

pub fn compute(md: &ModelDeployment, pools: &[PoolObservation]) -> ModelDeploymentStatus {
    let generation = md.metadata.generation;
    let ns = md.namespace().unwrap_or_default();
    let mut pool_status = Vec::new();
    // (pool, reason, message): the pool lets a model find its own pools' problems.
    let mut degraded: Vec<(String, String, String)> = Vec::new();
    let mut progressing = Vec::new();
    let (mut total_ready, mut total_desired) = (0, 0);
    for (pool, obs) in md.spec.pools.iter().zip(pools) {
        let name = pool_object_name(md, pool);
        if !obs.conflicts.is_empty() {
            degraded.push((
                pool.name.clone(),
                "NameConflict".into(),
                format!(
                    "pool {}: {} already exists and is not controlled by this ModelDeployment; nothing was written to it: delete or rename that object, or rename the pool",
                    pool.name,
                    obs.conflicts.join(", "),
                ),
            ));
        }
        if !obs.fit.fits() {
            degraded.push((pool.name.clone(), "InsufficientMemory".into(), obs.fit.misfit(pool)));
        }
        // One problem per pool is enough to act on; the first pod by name keeps it stable.
        let mut pods: Vec<&Pod> = obs.pods.iter().collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        if let Some((reason, message)) = pods.iter().find_map(|p| pod_problem(p)) {
            degraded.push((pool.name.clone(), reason, format!("pool {}: {message}", pool.name)));
        }
        let (replicas, ready_replicas) = match &obs.deployment {
            Some(d) => {
                if let Some(msg) = deployment_failure(d) {
                    degraded.push((
                        pool.name.clone(),
                        "RolloutFailed".into(),
                        format!("pool {}: {msg}", pool.name),
                    ));
                }
                if !rollout_done(d) {
                    progressing.push(pool.name.clone());
                }
                (desired(d), ready(d))
            }
            None => {
                progressing.push(pool.name.clone());
                (pool.replicas.map(|r| r as i32).unwrap_or(1), 0)
            }
        };
        total_ready += ready_replicas;
        total_desired += replicas;
        pool_status.push(PoolStatus {
            name: pool.name.clone(),
            deployment: name.clone(),
            service: name,
            replicas,
            ready_replicas,
            serving: pool.serve.clone(),
            memory_required: Some(format_bytes(obs.fit.required)),
            memory_available: obs.fit.available.map(format_bytes),
        });
    }

    let reports: Vec<(&str, &[crate::pod_status::PodReport])> =
        md.spec.pools.iter().zip(pools).map(|(p, o)| (p.name.as_str(), o.reports.as_slice())).collect();
    let models: Vec<ModelStatus> = md
        .spec
        .models
        .iter()
        .filter_map(|m| {
            let id = m.id().to_string();
            let serving: Vec<&PoolStatus> = pool_status.iter().filter(|p| p.serving.contains(&id)).collect();
            if serving.is_empty() {
                return None; // present only as a fallback
            }
            let any_ready = serving.iter().any(|p| p.ready_replicas > 0);
            let stuck = serving.iter().find_map(|p| {
                degraded.iter().find(|(pool, _, _)| *pool == p.name).map(|(_, _, m)| m.clone())
            });
            let state = if any_ready {
                ModelState::Ready
            } else if stuck.is_some() {
                ModelState::Failed
            } else if serving.iter().any(|p| p.replicas > 0) && pools.iter().any(|o| o.deployment.is_some()) {
                ModelState::Loading
            } else {
                ModelState::Pending
            };
            let endpoint = serving
                .iter()
                .find(|p| p.ready_replicas > 0)
                .or(serving.first())
                .map(|p| format!("http://{}.{ns}.svc:{SERVER_PORT}", p.service));
            let lazy = m.is_lazy();
            // A preloaded model is in every ready pod (that is what ready means); a lazy one
            // where the pods say so.
            let loaded = serving
                .iter()
                .map(|p| match reports.iter().find(|(pool, _)| *pool == p.name) {
                    Some((_, reports)) if lazy => PoolLoaded {
                        pool: p.name.clone(),
                        pods: reports.len() as i32,
                        loaded_pods: reports.iter().filter(|r| r.loaded.contains(&id)).count() as i32,
                    },
                    _ => PoolLoaded {
                        pool: p.name.clone(),
                        pods: p.ready_replicas,
                        loaded_pods: p.ready_replicas,
                    },
                })
                .collect();
            Some(ModelStatus {
                name: m.name.clone(),
                version: m.version.clone(),
                pools: serving.iter().map(|p| p.name.clone()).collect(),
                state,
                endpoint,
                load: lazy.then_some(Load::Lazy),
                loaded,
                message: if any_ready { None } else { stuck },
            })
        })
        .collect();

    let all_ready = degraded.is_empty()
        && progressing.is_empty()
        && pool_status.iter().all(|p| p.ready_replicas >= p.replicas)
        && models.iter().all(|m| m.state == ModelState::Ready);
    let ready_message = if all_ready {
        format!("{total_ready}/{total_desired} replicas ready; every model loaded and warm")
    } else {
        format!("{total_ready}/{total_desired} replicas ready")
    };
    let conditions = vec![
        condition(
            "Ready",
            all_ready,
            if all_ready { "AllReplicasReady" } else { "NotReady" },
            ready_message,
            generation,
        ),
        condition(
            "Progressing",
            !progressing.is_empty(),
            if progressing.is_empty() { "Stable" } else { "RollingOut" },
            if progressing.is_empty() {
                "no rollout underway".into()
            } else {
                format!("rolling out pools {}", progressing.join(", "))
            },
            generation,
        ),
        match degraded.first() {
            Some((_, reason, _)) => condition(
                "Degraded",
                true,
                reason,
                degraded.iter().map(|(_, _, m)| m.as_str()).collect::<Vec<_>>().join("; "),
                generation,
            ),
            None => condition("Degraded", false, "Healthy", "no failures".into(), generation),
        },
    ];
    let summary: Vec<String> =
        md.spec.pools.iter().flat_map(|p| p.serve.iter().cloned()).fold(Vec::new(), |mut acc, s| {
            if !acc.contains(&s) {
                acc.push(s);
            }
            acc
        });
    ModelDeploymentStatus {
        observed_generation: generation,
        conditions,
        ready: Some(format!("{total_ready}/{total_desired}")),
        model_summary: Some(summary.join(",")),
        pools: pool_status,
        models,
    }
}

/// Keep each condition's lastTransitionTime when its status did not change, so an unchanged
/// world yields an identical status (and the reconciler writes nothing).
pub fn keep_transition_times(new: &mut ModelDeploymentStatus, old: Option<&ModelDeploymentStatus>) {
    let Some(old) = old else { return };
    for c in &mut new.conditions {
        if let Some(prev) = old.conditions.iter().find(|p| p.type_ == c.type_)
            && prev.status == c.status
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn deploy(replicas: i32, ready: i32, updated: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(2), ..Default::default() },
            spec: Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() }),
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..Default::default()
            }),
        }
    }

    fn fit(required: u64, available: Option<u64>) -> Fit {
        Fit {
            required,
            available,
            unknown_size: vec![],
            budget_over_limit: None,
            largest_lazy: None,
            budget: None,
            headroom: 0,
        }
    }

    fn cond<'a>(s: &'a ModelDeploymentStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition")
    }

    #[test]
    fn all_replicas_ready_is_ready() {
        let md = sample("embeddings-ab-gpu.yaml");
        let obs = vec![
            PoolObservation {
                deployment: Some(deploy(1, 1, 1)),
                pods: vec![],
                fit: fit(1, Some(2)),
                conflicts: vec![],
                reports: vec![],
            },
            PoolObservation {
                deployment: Some(deploy(3, 3, 3)),
                pods: vec![],
                fit: fit(1, Some(2)),
                conflicts: vec![],
                reports: vec![],
            },
        ];
        let s = compute(&md, &obs);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(s.ready.as_deref(), Some("4/4"));
        assert_eq!(s.model_summary.as_deref(), Some("bge-base:v1,bge-base:v2"));
        assert_eq!(s.models.len(), 2);
        assert!(s.models.iter().all(|m| m.state == ModelState::Ready));
        assert_eq!(s.models[1].endpoint.as_deref(), Some("http://bge-ab-l4.ml.svc:8080"));
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn a_rollout_in_progress_is_progressing_not_ready() {
        let md = sample("embeddings-cpu.yaml");
        let s = compute(
            &md,
            &[PoolObservation {
                deployment: Some(deploy(2, 2, 1)),
                pods: vec![],
                fit: fit(1, None),
                conflicts: vec![],
                reports: vec![],
            }],
        );
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Progressing").status, "True");
        assert!(cond(&s, "Progressing").message.contains("cpu"));
        let s = compute(
            &md,
            &[PoolObservation {
                deployment: None,
                pods: vec![],
                fit: fit(1, None),
                conflicts: vec![],
                reports: vec![],
            }],
        );
        assert_eq!(s.models[0].state, ModelState::Pending);
        assert_eq!(s.ready.as_deref(), Some("0/2"));
    }

    #[test]
    fn a_misfit_is_degraded_with_the_numbers() {
        let md = sample("embeddings-cpu.yaml");
        let s = compute(
            &md,
            &[PoolObservation {
                deployment: Some(deploy(2, 2, 2)),
                pods: vec![],
                fit: fit(3 << 30, Some(1 << 30)),
                conflicts: vec![],
                reports: vec![],
            }],
        );
        let d = cond(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "InsufficientMemory"));
        assert!(
            d.message.contains("minilm:v2") && d.message.contains("3Gi") && d.message.contains("1Gi"),
            "{}",
            d.message
        );
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(s.pools[0].memory_available.as_deref(), Some("1Gi"));
    }

    #[test]
    fn a_name_conflict_is_degraded_and_names_the_object() {
        let md = sample("embeddings-cpu.yaml");
        let s = compute(
            &md,
            &[PoolObservation {
                deployment: None,
                pods: vec![],
                fit: fit(1, None),
                conflicts: vec!["Service ml/embeddings-cpu".into()],
                reports: vec![],
            }],
        );
        let d = cond(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "NameConflict"));
        assert!(
            d.message.contains("Service ml/embeddings-cpu") && d.message.contains("not controlled"),
            "{}",
            d.message
        );
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(s.models[0].state, ModelState::Failed);
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let md = sample("embeddings-cpu.yaml");
        let obs = [PoolObservation {
            deployment: Some(deploy(2, 2, 2)),
            pods: vec![],
            fit: fit(1, None),
            conflicts: vec![],
            reports: vec![],
        }];
        let first = compute(&md, &obs);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut second = compute(&md, &obs);
        assert_ne!(first, second, "fresh times differ");
        keep_transition_times(&mut second, Some(&first));
        assert_eq!(first, second, "an unchanged world yields an identical status");
    }

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "status": status}))
            .expect("pod")
    }

    #[test]
    fn an_unschedulable_pod_degrades_the_pool_and_fails_its_model() {
        let md = sample("embeddings-cpu.yaml");
        let pending = pod(
            "embeddings-cpu-abc",
            serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."}]}),
        );
        let obs = [PoolObservation {
            deployment: Some(deploy(2, 0, 2)),
            pods: vec![pending],
            fit: fit(1, None),
            conflicts: vec![],
            reports: vec![],
        }];
        let s = compute(&md, &obs);
        let d = cond(&s, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "Unschedulable"));
        assert!(
            d.message.contains("pool cpu: pod embeddings-cpu-abc cannot be scheduled: 0/5 nodes"),
            "{}",
            d.message
        );
        assert_eq!(s.models[0].state, ModelState::Failed);
        assert!(s.models[0].message.as_deref().is_some_and(|m| m.contains("Insufficient nvidia.com/gpu")));
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn a_crash_looping_init_container_reports_its_last_error_line() {
        let md = sample("embeddings-cpu.yaml");
        let crashing = pod(
            "embeddings-cpu-xyz",
            serde_json::json!({"phase": "Pending",
                "initContainerStatuses": [{"name": "pull", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                        "message": "2026-11-23T10:00:00Z INFO pulling\nError: s3://m/: model.safetensors: sha256 mismatch\n"}}}]}),
        );
        let obs = [PoolObservation {
            deployment: Some(deploy(1, 0, 1)),
            pods: vec![crashing.clone()],
            fit: fit(1, None),
            conflicts: vec![],
            reports: vec![],
        }];
        let s = compute(&md, &obs);
        let d = cond(&s, "Degraded");
        assert_eq!(d.reason, "CrashLoopBackOff");
        assert_eq!(
            d.message,
            "pool cpu: pod embeddings-cpu-xyz container pull (exit code 1): Error: s3://m/: model.safetensors: sha256 mismatch"
        );
        // A Running, ready pod is no problem at all.
        let fine = pod(
            "ok",
            serde_json::json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert_eq!(pod_problem(&fine), None);
        assert!(pod_problem(&crashing).is_some());
    }

    #[test]
    fn a_lazy_model_is_loaded_where_the_pods_say_and_a_preloaded_one_in_every_ready_pod() {
        let md = crate::resources::testing::sample("embeddings-many.yaml");
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"generation": 1},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
        }))
        .expect("deployment");
        let report = |pod: &str, loaded: &[&str]| crate::pod_status::PodReport {
            pod: pod.into(),
            loaded: loaded.iter().map(|s| s.to_string()).collect(),
        };
        let obs = [PoolObservation {
            deployment: Some(d),
            pods: vec![],
            fit: fit(1, None),
            conflicts: vec![],
            reports: vec![report("a", &["minilm:v2", "bge-small:v1"]), report("b", &["minilm:v2"])],
        }];
        let s = compute(&md, &obs);
        let model = |name: &str| s.models.iter().find(|m| m.name == name).expect("model").clone();
        let loaded =
            |name: &str| model(name).loaded.iter().map(|l| (l.pods, l.loaded_pods)).collect::<Vec<_>>();
        assert_eq!(model("minilm").load, None);
        assert_eq!(loaded("minilm"), [(2, 2)], "preloaded: every ready pod");
        assert_eq!(model("bge-small").load, Some(Load::Lazy));
        assert_eq!(loaded("bge-small"), [(2, 1)]);
        assert_eq!(loaded("e5-small"), [(2, 0)]);
        assert_eq!(model("e5-small").state, ModelState::Ready, "a lazy model not loaded is still servable");
    }
}
