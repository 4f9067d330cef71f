//! `kiln-model-server serve`: bind, answer health at once, load and warm in the background,
//! drain on SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::device::ComputeDevice;
use crate::families::{ModelFamily, Serving};
use crate::listener::{self, ConnectionLimits};
use crate::loader::{self, LoadPlan, ModelDir, ModelDirs};
use crate::manifest::{Batching, Family, Manifest, ModelRef, Warmup};
use crate::metrics::Metrics;
use crate::residency;
use crate::state::{AppState, Limits, PlannedModel, Residency};

/// Everything `serve` needs, however it was described (manifest or command line).
pub struct ServePlan {
    pub family: Family,
    /// In manifest order, fallbacks included.
    pub models: Vec<PlannedModel>,
    pub dirs: ModelDirs,
    pub warmup: Warmup,
    pub batching: Batching,
    /// The memory budget (None: the container's limit less a margin) and idle unloading.
    pub residency: Residency,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--model {0:?}: expected NAME:VERSION=DIR, e.g. minilm:v2=/models/minilm")]
    ModelArg(String),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("reading manifest {path}: {source}")]
    Read { path: String, source: std::io::Error },
}

impl ServePlan {
    /// From `--model NAME:VERSION=DIR` arguments.
    pub fn from_args(
        family: Family,
        models: &[String],
        warmup: Warmup,
        batching: Batching,
    ) -> Result<Self, PlanError> {
        let mut plan = ServePlan {
            family,
            models: Vec::new(),
            dirs: ModelDirs::new(),
            warmup,
            batching,
            residency: Residency::default(),
        };
        for arg in models {
            let (id, dir) = arg.split_once('=').ok_or_else(|| PlanError::ModelArg(arg.clone()))?;
            let id: ModelRef = id.parse().map_err(|_| PlanError::ModelArg(arg.clone()))?;
            if dir.is_empty() {
                return Err(PlanError::ModelArg(arg.clone()));
            }
            plan.dirs.insert(id.clone(), ModelDir { path: PathBuf::from(dir), pinned: None, source: None });
            plan.models.push(PlannedModel::served(id));
        }
        if plan.models.is_empty() {
            return Err(PlanError::ModelArg(String::new()));
        }
        Ok(plan)
    }

    /// From the operator's manifest: every model lives in its verified cache entry
    /// `cache_dir/<name>/<version>` written by `pull` (for `pvc://` sources, links into the
    /// claim), and is refused when that entry's marker is missing or disagrees with the pins.
    pub fn from_manifest(path: &Path, cache_dir: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PlanError::Read { path: path.display().to_string(), source })?;
        let manifest = Manifest::from_json(&text)?;
        let mut dirs = ModelDirs::new();
        for m in &manifest.models {
            let (source, _) = manifest.pull_source(m)?;
            let dir = ModelDir {
                path: Manifest::cache_path(cache_dir, &m.id()),
                pinned: Some(m.source.sha256.clone()),
                source: Some(source.uri),
            };
            dirs.insert(m.id(), dir);
        }
        Ok(ServePlan {
            family: manifest.family,
            models: manifest
                .models
                .iter()
                .map(|m| PlannedModel {
                    id: m.id(),
                    serve: m.serve,
                    fallback: m.fallback.clone(),
                    kv_cache_bytes: m.kv_cache_bytes,
                    load: m.load,
                    memory_bytes: m.memory_bytes,
                })
                .collect(),
            dirs,
            warmup: manifest.warmup,
            batching: manifest.batching,
            residency: Residency {
                budget_bytes: manifest.memory_budget_bytes,
                idle_unload: manifest.idle_unload_seconds.map(|s| Duration::from_secs(u64::from(s))),
            },
        })
    }
}

/// How `serve` treats connections and shutdown.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// After SIGTERM: readiness is down, requests are still served, for this long; then the
    /// listener closes.
    pub drain_delay: Duration,
    /// After the listener closed: how long running requests may take before they are cut.
    pub shutdown_timeout: Duration,
    /// Where the models compute (`--device`).
    pub device: ComputeDevice,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: Limits::default(),
            connections: ConnectionLimits::default(),
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
            device: ComputeDevice::cpu(),
        }
    }
}

/// Serve until SIGTERM/SIGINT (`shutdown` resolves) or a model's worker dies, then drain and
/// return: Ok after a requested shutdown, an error naming the model after a failure (so the
/// process exits non-zero and the kubelet restarts it). Called for family `F` by the registry,
/// [`crate::families::serve`].
pub async fn run<F: ModelFamily>(
    plan: ServePlan,
    listener: tokio::net::TcpListener,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let mut residency = plan.residency;
    // Without a budget in the plan: the container's memory limit less a margin, if limited.
    residency.budget_bytes =
        residency.budget_bytes.or_else(|| residency::default_budget(loader::memory_limit()));
    let (family, count) = (plan.family, plan.models.len());
    let device = options.device.clone();
    metrics.device_info.with_label_values(&[device.label().as_str(), device.name()]).set(1);
    let load_plan = LoadPlan { dirs: plan.dirs, warmup: plan.warmup, batching: plan.batching, device };
    let state = Arc::new(AppState::<F>::new(
        &plan.models,
        load_plan,
        metrics.clone(),
        options.limits.clone(),
        residency,
    ));
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, %family, models = count, budget_bytes = ?residency.budget_bytes, "listening; loading models");

    let loading = state.clone();
    let loader = tokio::task::spawn_blocking(move || loader::preload_all(&loading));
    if let Some(idle) = residency.idle_unload {
        tokio::spawn(unload_idle(Arc::downgrade(&state), idle));
    }

    let draining = state.clone();
    let mut fatal = state.fatal.subscribe();
    let drain_delay = options.drain_delay;
    let stop = async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested: readiness drops, requests are still served for the drain delay"),
            _ = fatal.wait_for(Option::is_some) => tracing::error!("a model stopped serving: draining, then exiting with an error"),
        }
        draining.start_draining();
        tokio::time::sleep(drain_delay).await;
        tracing::info!("drain delay over: closing the listener");
    };
    let app = crate::api::router::<F>(state.clone());
    let report = listener::serve(
        listener,
        app,
        options.connections.clone(),
        metrics.open_connections.clone(),
        stop,
        options.shutdown_timeout,
    )
    .await;
    // Connections are closed; let queued work finish and the workers stop.
    for slot in state.slots.values() {
        if let Some(serving) = slot.current() {
            serving.close();
        }
    }
    if !loader.is_finished() {
        tracing::info!("exiting while models were still loading");
    }
    if report.cut > 0 {
        tracing::warn!(connections = report.cut, "requests were cut by the shutdown timeout");
    }
    if let Some(reason) = state.fatal.borrow().clone() {
        anyhow::bail!("{reason}");
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Every so often (a quarter of `idle`, between 1 and 10 s), unload the lazy models idle for
/// `idle`; ends with the server.
async fn unload_idle<F: ModelFamily>(state: std::sync::Weak<AppState<F>>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(state) = state.upgrade() else { return };
        if state.is_draining() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || loader::unload_idle(&state, idle)).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// CPU quota of this cgroup (v2 `cpu.max`, rounded up), else the cores available.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|s| {
            let mut parts = s.split_whitespace();
            let quota = parts.next()?.parse::<f64>().ok()?;
            let period = parts.next()?.parse::<f64>().ok()?;
            (period > 0.0).then(|| (quota / period).ceil() as usize)
        })
        .filter(|&n| n >= 1)
        .map(|n| n.min(cores))
        .unwrap_or(cores)
}
