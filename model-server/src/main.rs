//! `kiln-model-server`: `serve` what a manifest (or the command line) names; `pull` artifacts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::listener::ConnectionLimits;
use kiln_model_server::manifest::{Batching, Family, Load, Manifest, ModelEntry, ModelSource, Warmup};
use kiln_model_server::pull::{self, PullOptions};
use kiln_model_server::serve::{self, ServeOptions, ServePlan};
use kiln_model_server::state::Limits;

#[derive(Parser)]
#[command(
    name = "kiln-model-server",
    version,
    about = "Loads each model once, warms it, batches requests and exports queue depth"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text", env = "KILN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP: from the operator's manifest, or from local directories.
    ///
    /// Examples:
    ///   kiln-model-server serve --manifest /etc/kiln/manifest.json --cache-dir /var/cache/kiln
    ///   kiln-model-server serve --family text-embedding --model minilm:v2=./minilm
    Serve(ServeArgs),
    /// Fetch model files into the cache, verifying sha256 while they stream; exit 0 only when
    /// every file is present and verified.
    ///
    /// Examples:
    ///   kiln-model-server pull --manifest /etc/kiln/manifest.json --cache-dir /var/cache/kiln/models
    ///   kiln-model-server pull --source s3://models/minilm/v2/ --dest ./minilm
    ///   kiln-model-server pull --source https://mirror/minilm/ --dest ./minilm \
    ///       --sha256 config.json=953f... --sha256 model.safetensors=53aa...
    ///
    /// S3 credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL (S3-compatible stores, path-style).
    Pull(PullArgs),
}

#[derive(clap::Args)]
struct PullArgs {
    /// Manifest written by the operator: every model and fallback it names.
    #[arg(long, conflicts_with_all = ["source", "dest", "sha256", "in_place"], required_unless_present = "source")]
    manifest: Option<PathBuf>,
    /// With --manifest: the cache root; models land in DIR/NAME/VERSION.
    #[arg(long, default_value = "/var/cache/kiln/models")]
    cache_dir: PathBuf,
    /// One source by hand: s3://bucket/prefix/, http(s)://base/, file:///path/.
    #[arg(long, requires = "dest")]
    source: Option<String>,
    /// With --source: the directory to create (atomically, only once verified).
    #[arg(long)]
    dest: Option<PathBuf>,
    /// FILE=HEX: expected digest of a file (relative to the source); HTTP sources fetch
    /// exactly these files. Repeatable.
    #[arg(long = "sha256", value_name = "FILE=HEX")]
    sha256: Vec<String>,
    /// file:// sources: verify and link to the files instead of copying them.
    #[arg(long)]
    in_place: bool,
    /// Attempts per file after the client's own request retries.
    #[arg(long, default_value_t = 4)]
    attempts: u32,
    /// Abandon (and retry) a transfer that delivers nothing for this many seconds.
    #[arg(long, default_value_t = 60)]
    idle_timeout_seconds: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Manifest written by the operator (JSON).
    #[arg(long, conflicts_with_all = ["family", "model"], required_unless_present = "model")]
    manifest: Option<PathBuf>,
    /// Where `pull` put the models named by the manifest.
    #[arg(long, default_value = "/var/cache/kiln/models")]
    cache_dir: PathBuf,
    /// Model family, with --model.
    #[arg(long, default_value = "text-embedding", value_parser = parse_family)]
    family: Family,
    /// NAME:VERSION=DIR holding config.json, tokenizer.json and model.safetensors; repeatable.
    #[arg(long = "model", value_name = "NAME:VERSION=DIR")]
    model: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Where models compute: auto (CUDA device 0 in a CUDA build when one opens, else the CPU),
    /// cpu, or cuda:N. A model with no path on the device is refused, never moved to the CPU.
    #[arg(long, default_value = "auto", env = "KILN_DEVICE", value_parser = parse_device)]
    device: DeviceRequest,
    /// Inference threads; default: the cgroup CPU quota, else the number of cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Warmup passes over the default inputs (with --model; the manifest carries its own).
    #[arg(long, default_value_t = 3)]
    warmup_iterations: u32,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Largest uploaded file in bytes (an audio file, multipart or base64); larger ones get 413.
    #[arg(long, default_value_t = 25 << 20)]
    max_upload_bytes: usize,
    /// Longest audio a transcription request may carry, in seconds; longer gets 413.
    #[arg(long, default_value_t = 3600.0)]
    max_audio_seconds: f64,
    /// Most inputs in one embeddings request; more get 413.
    #[arg(long, default_value_t = 2048)]
    max_inputs: usize,
    /// After SIGTERM: readiness drops at once, but requests are still served this long before
    /// the listener closes, so clients and load balancers stop sending first. The operator sets
    /// it from the pod's termination grace period.
    #[arg(long, default_value_t = 0.0)]
    drain_delay_seconds: f64,
    /// After the listener closed: requests still running this long are cut and the process
    /// exits (keep drain delay + this below the pod's termination grace period).
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout_seconds: f64,
    /// Open connections at most; further connections wait to be accepted.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// A new connection's first request headers (or a later request's, from its first byte)
    /// must arrive within this many seconds, or the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    header_read_timeout_seconds: f64,
    /// A request body must have arrived this many seconds after its headers (else 408).
    #[arg(long, default_value_t = 30.0)]
    body_read_timeout_seconds: f64,
    /// A kept-alive connection with no request for this many seconds is closed.
    #[arg(long, default_value_t = 120.0)]
    idle_timeout_seconds: f64,
    /// Tokens waiting in one model's queue at most (all its queued requests); more get 429.
    #[arg(long, default_value_t = 1 << 20)]
    max_queued_tokens: usize,
    /// Requests tokenizing at once; default: twice the inference threads (at least 2).
    #[arg(long)]
    tokenize_concurrency: Option<usize>,
    /// With --model: KV-cache memory of each text-generation model (a quantity such as 2Gi);
    /// default: what the memory limit leaves after loading (the manifest carries its own).
    #[arg(long, value_parser = parse_quantity)]
    kv_cache_memory: Option<u64>,
    /// With --model: batch size, delay and queue bound.
    #[arg(long, default_value_t = 32)]
    max_batch_size: u32,
    #[arg(long, default_value_t = 5)]
    max_delay_ms: u32,
    #[arg(long, default_value_t = 1024)]
    max_queue_depth: u32,
    /// With --model: NAME:VERSION of a --model to load on its first request instead of before
    /// readiness; repeatable (the manifest carries its own).
    #[arg(long = "lazy", value_name = "NAME:VERSION")]
    lazy: Vec<String>,
    /// With --model: bytes the models may hold at once (a quantity such as 2Gi); lazy models
    /// are unloaded to stay under it. Default: the memory limit less a margin.
    #[arg(long, value_parser = parse_quantity)]
    memory_budget: Option<u64>,
    /// With --model: unload a lazy model after this many seconds without requests.
    #[arg(long)]
    idle_unload_seconds: Option<u32>,
    /// How long a request waits for its lazy model to load before it gets 503 with Retry-After.
    #[arg(long, default_value_t = 60.0)]
    lazy_load_wait_seconds: f64,
}

fn parse_quantity(s: &str) -> Result<u64, String> {
    kiln_model_server::quantity::parse_bytes(s)
        .ok_or_else(|| format!("{s:?} is not a quantity; write it like 512Mi, 2Gi or 1500000000"))
}

/// Seconds from a flag; negative or non-finite values mean zero.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO)
}

fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse::<DeviceRequest>().map_err(|e| e.to_string())
}

fn parse_family(s: &str) -> Result<Family, String> {
    s.parse::<Family>().map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve_cmd(args),
        Command::Pull(args) => pull_cmd(args),
    }
}

fn pull_cmd(args: PullArgs) -> anyhow::Result<()> {
    let opts = PullOptions {
        attempts: args.attempts.max(1),
        idle_timeout: Duration::from_secs(args.idle_timeout_seconds.max(1)),
        in_place: args.in_place,
        ..PullOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if let Some(path) = &args.manifest {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read manifest {}", path.display()))?;
            let manifest =
                Manifest::from_json(&text).with_context(|| format!("manifest {}", path.display()))?;
            let pulled = pull::pull_manifest(&manifest, &args.cache_dir, &opts).await?;
            let fetched = pulled.iter().filter(|p| !p.cached).count();
            tracing::info!(models = pulled.len(), fetched, "every model is in the cache and verified");
            return Ok(());
        }
        let (Some(uri), Some(dest)) = (&args.source, &args.dest) else {
            anyhow::bail!("give --manifest FILE, or --source URI --dest DIR");
        };
        let mut sha256 = std::collections::BTreeMap::new();
        for pin in &args.sha256 {
            let (file, hex) =
                pin.split_once('=').with_context(|| format!("--sha256 {pin:?}: expected FILE=HEX"))?;
            sha256.insert(file.to_string(), hex.to_string());
        }
        let source = ModelSource { uri: uri.clone(), sha256 };
        // The same checks the manifest gets: scheme, clean file names, 64-hex digests.
        let check = ModelEntry {
            name: "pull".into(),
            version: "cli".into(),
            source: source.clone(),
            memory_bytes: None,
            fallback: None,
            serve: true,
            kv_cache_bytes: None,
            load: Default::default(),
        };
        Manifest::new(Family::TextEmbedding, vec![check], Warmup::default(), Batching::default())
            .validate()?;
        pull::pull_source(&source, dest, &opts).await?;
        Ok(())
    })
}

fn serve_cmd(args: ServeArgs) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(serve::default_threads).max(1);
    // candle and gemm size their pools from this; it must be set before any pool starts.
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    let plan = match &args.manifest {
        Some(path) => ServePlan::from_manifest(path, &args.cache_dir)
            .with_context(|| format!("cannot serve manifest {}", path.display()))?,
        None => {
            let warmup = Warmup { iterations: args.warmup_iterations, ..Warmup::default() };
            let batching = Batching {
                max_batch_size: args.max_batch_size,
                max_delay_milliseconds: args.max_delay_ms,
                max_queue_depth: args.max_queue_depth,
            };
            let mut plan = ServePlan::from_args(args.family, &args.model, warmup, batching)?;
            for lazy in &args.lazy {
                let model = plan.models.iter_mut().find(|m| m.id.to_string() == *lazy);
                let Some(model) = model else {
                    anyhow::bail!("--lazy {lazy}: no --model {lazy}=DIR to make lazy");
                };
                model.load = Load::Lazy;
            }
            for m in &mut plan.models {
                m.kv_cache_bytes = args.kv_cache_memory;
            }
            plan.residency.budget_bytes = args.memory_budget;
            plan.residency.idle_unload = args.idle_unload_seconds.map(|s| Duration::from_secs(u64::from(s)));
            plan
        }
    };
    let device = ComputeDevice::open(args.device)?;
    match device.note() {
        Some(note) => tracing::warn!(device = %device.label(), name = device.name(), "{note}"),
        None => tracing::info!(device = %device.label(), name = device.name(), "compute device"),
    }
    let options = ServeOptions {
        device,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_inputs: args.max_inputs,
            body_read_timeout: seconds(args.body_read_timeout_seconds),
            max_queued_tokens: args.max_queued_tokens,
            tokenize_concurrency: args.tokenize_concurrency.unwrap_or(threads * 2).max(1),
            max_upload_bytes: args.max_upload_bytes,
            max_audio_seconds: args.max_audio_seconds,
            load_wait: seconds(args.lazy_load_wait_seconds),
        },
        connections: ConnectionLimits {
            max_connections: args.max_connections.max(1),
            header_read_timeout: seconds(args.header_read_timeout_seconds),
            idle_timeout: seconds(args.idle_timeout_seconds),
        },
        drain_delay: seconds(args.drain_delay_seconds),
        shutdown_timeout: seconds(args.shutdown_timeout_seconds),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 4))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(threads, "inference threads");
        kiln_model_server::families::serve(plan, listener, options, serve::termination()).await
    })
}
