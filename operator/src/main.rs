//! `kiln-operator`: watches ModelDeployments and reconciles their pools.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kiln_operator::cache::Caches;
use kiln_operator::crd::ModelDeployment;
use kiln_operator::leader::{LeaderElector, Timing};
use kiln_operator::metrics::OperatorMetrics;
use kiln_operator::reconcile::{Context, error_policy, reconcile};
use kiln_operator::resources::{FIELD_MANAGER, OperatorSettings};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};

#[derive(Parser)]
#[command(
    name = "kiln-operator",
    version,
    about = "Reconciles ModelDeployments into warm, autoscaled model-server pools"
)]
struct Args {
    /// Watch one namespace; empty watches all.
    #[arg(long, env = "KILN_NAMESPACE", default_value = "")]
    namespace: String,
    /// Default model-server image (a ModelDeployment's spec.image overrides it).
    #[arg(long, env = "KILN_MODEL_SERVER_IMAGE", default_value = "ghcr.io/kiln-dev/kiln-model-server:0.1.0")]
    model_server_image: String,
    /// Model-server image built with CUDA, for pools with gpus > 0 (their servers run with
    /// --device cuda:0); empty runs GPU pools on --model-server-image and the CPU.
    #[arg(
        long,
        env = "KILN_MODEL_SERVER_CUDA_IMAGE",
        default_value = "ghcr.io/kiln-dev/kiln-model-server:0.1.0-cuda"
    )]
    model_server_cuda_image: String,
    /// Serves /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,
    /// Memory added to every pool's requirement in the fit check, in MiB.
    #[arg(long, default_value_t = 256)]
    memory_headroom_mib: u64,
    /// Log format.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    /// Reconcile only while holding a Lease, so several replicas can run (false: always lead).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Reconciles running at once (across resources; one resource is never reconciled twice at once).
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Milliseconds to wait for more events about a resource before reconciling it.
    #[arg(long, default_value_t = 200)]
    debounce_ms: u64,
    /// Name of the Lease replicas compete for.
    #[arg(long, default_value = "kiln-operator")]
    leader_election_id: String,
    /// Namespace of that Lease (in a pod: its own namespace, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kiln-system")]
    leader_election_namespace: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        fmt.json().flatten_event(true).with_current_span(true).init();
    } else {
        fmt.init();
    }

    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (kubeconfig or in-cluster config)")?;
    let metrics = Arc::new(OperatorMetrics::new()?);
    let (mds, children) = if args.namespace.is_empty() {
        (Api::<ModelDeployment>::all(client.clone()), None)
    } else {
        (Api::<ModelDeployment>::namespaced(client.clone(), &args.namespace), Some(args.namespace.clone()))
    };
    // One label-selected watch per kind we own (only our children: small in a busy cluster)
    // fills a cache the reconciler reads and triggers reconciles of the owner.
    let (caches, watches) = Caches::watch(&client, children.as_deref());

    let ctx = Arc::new(Context {
        client: client.clone(),
        caches,
        settings: OperatorSettings {
            model_server_image: args.model_server_image,
            model_server_cuda_image: args.model_server_cuda_image,
            memory_headroom_bytes: args.memory_headroom_mib << 20,
        },
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: None },
        ),
    });

    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = serve_metrics(args.metrics_addr, metrics, ready.clone()).await?;

    // A standby replica is healthy and ready; it just does not reconcile.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost_lead = if args.leader_elect {
        let identity = format!(
            "{}-{}",
            std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "kiln-operator".into()),
            std::process::id()
        );
        let leases: Api<Lease> = Api::namespaced(client.clone(), &args.leader_election_namespace);
        let mut elector = LeaderElector::new(
            leases,
            &args.leader_election_namespace,
            &args.leader_election_id,
            &identity,
            Timing::default(),
        );
        let sent = elector.acquire().await?;
        futures::future::Either::Left(Box::pin(async move { elector.keep(sent).await }))
    } else {
        futures::future::Either::Right(futures::future::pending::<()>())
    };

    // The watches start once this replica leads; reconciles start once every cache holds its
    // first listing, so a restarted operator never mistakes "not seen yet" for "absent".
    let (controller, drivers) = watches.own(Controller::new(mds, watcher::Config::default()));
    let watch_tasks: Vec<_> = drivers.into_iter().map(tokio::spawn).collect();
    ctx.caches.ready().await.context("a watch cache stopped before its first listing")?;
    tracing::info!("caches filled");
    tracing::info!(namespace = %if args.namespace.is_empty() { "<all>" } else { &args.namespace }, "starting controller");
    // Bounded concurrency: a burst of thousands of resources otherwise starts thousands of
    // reconciles at once, which only contend for the API server and hold memory. The debounce
    // folds the bursts of child events during a rollout into one reconcile.
    let config = kube::runtime::controller::Config::default()
        .concurrency(args.concurrency)
        .debounce(Duration::from_millis(args.debounce_ms));
    let controller =
        controller.with_config(config).shutdown_on_signal().run(reconcile, error_policy, ctx).for_each(
            |res| async move {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "reconcile loop");
                }
            },
        );
    tokio::select! {
        () = controller => {}
        () = lost_lead => {
            server.abort();
            anyhow::bail!("lost the leader lease; exiting so a fresh replica can stand by");
        }
    }
    server.abort();
    for task in watch_tasks {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<OperatorMetrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        );
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}
