//! Prometheus metrics; the names are part of the interface (docs/model-server.md lists them)
//! and the HPA scales on `kiln_queue_depth`.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::manifest::ModelRef;

const MODEL: &[&str] = &["model", "version"];

pub struct Metrics {
    registry: Registry,
    /// Requests waiting or running (accepted, not yet answered), all models: the HPA's metric.
    pub queue_depth: IntGauge,
    pub model_queue_depth: IntGaugeVec,
    /// Requests waiting for a worker (not yet in a batch or a decode step).
    pub queue_waiting: IntGauge,
    pub model_queue_waiting: IntGaugeVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub model_ready: IntGaugeVec,
    pub load_seconds: GaugeVec,
    pub warmup_seconds: GaugeVec,
    pub resident_bytes: IntGaugeVec,
    /// Text generation: from arrival (queueing included) to the first generated token.
    pub time_to_first_token: HistogramVec,
    pub generated_tokens: IntCounterVec,
    /// Text generation: the KV-cache budget, what admitted sequences reserved of it, and what
    /// their caches hold.
    pub kv_cache_budget_bytes: IntGaugeVec,
    pub kv_cache_reserved_bytes: IntGaugeVec,
    pub kv_cache_used_bytes: IntGaugeVec,
    /// Open HTTP connections.
    pub open_connections: IntGauge,
    /// Speech to text: seconds of audio transcribed, and compute seconds per audio second.
    pub audio_seconds: CounterVec,
    pub real_time_factor: HistogramVec,
    /// Loads and unloads (reason `lru` or `idle`), each load's seconds (read and warmup), the
    /// pod's memory budget, and the latency of requests that waited for a lazy load.
    pub model_loads: IntCounterVec,
    pub model_unloads: IntCounterVec,
    pub model_load_duration: HistogramVec,
    pub memory_budget_bytes: IntGauge,
    pub lazy_first_request: HistogramVec,
    /// 1 for the device the models compute on (`device` as `--device` writes it, `name`).
    pub device_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let queue_depth = IntGauge::new(
            "kiln_queue_depth",
            "Requests waiting or running in this pod, all models (what the HPA scales on)",
        )?;
        let model_queue_depth = IntGaugeVec::new(
            Opts::new("kiln_model_queue_depth", "Requests waiting or running per model"),
            MODEL,
        )?;
        let queue_waiting =
            IntGauge::new("kiln_queue_waiting", "Requests waiting for a worker in this pod, all models")?;
        let model_queue_waiting = IntGaugeVec::new(
            Opts::new("kiln_model_queue_waiting", "Requests waiting for a worker per model"),
            MODEL,
        )?;
        let requests = IntCounterVec::new(
            Opts::new("kiln_requests_total", "Inference requests by model and HTTP status"),
            &["model", "version", "code"],
        )?;
        // Sub-millisecond batch-1 calls up to multi-second long batches.
        let request_duration = HistogramVec::new(
            HistogramOpts::new("kiln_request_duration_seconds", "Request latency, queueing included")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            MODEL,
        )?;
        let batch_size = HistogramVec::new(
            HistogramOpts::new("kiln_batch_size", "Inputs per executed batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
            MODEL,
        )?;
        let model_ready =
            IntGaugeVec::new(Opts::new("kiln_model_ready", "1 when the model is loaded and warm"), MODEL)?;
        let load_seconds =
            GaugeVec::new(Opts::new("kiln_model_load_seconds", "Seconds spent loading the weights"), MODEL)?;
        let warmup_seconds =
            GaugeVec::new(Opts::new("kiln_model_warmup_seconds", "Seconds spent warming the model"), MODEL)?;
        let resident_bytes = IntGaugeVec::new(
            Opts::new("kiln_model_resident_bytes", "Resident memory the model added when it loaded"),
            MODEL,
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "kiln_time_to_first_token_seconds",
                "Text generation: seconds from a request's arrival to its first token, queueing included",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            MODEL,
        )?;
        let generated_tokens = IntCounterVec::new(
            Opts::new("kiln_generated_tokens_total", "Text generation: tokens generated"),
            MODEL,
        )?;
        let kv_gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), MODEL);
        let kv_cache_budget_bytes =
            kv_gauge("kiln_kv_cache_budget_bytes", "Text generation: bytes of KV cache the model may use")?;
        let kv_cache_reserved_bytes = kv_gauge(
            "kiln_kv_cache_reserved_bytes",
            "Text generation: KV-cache bytes reserved by admitted sequences (prompt + max_tokens each)",
        )?;
        let kv_cache_used_bytes = kv_gauge(
            "kiln_kv_cache_used_bytes",
            "Text generation: KV-cache bytes the admitted sequences hold",
        )?;
        let open_connections = IntGauge::new("kiln_open_connections", "HTTP connections open now")?;
        let audio_seconds = CounterVec::new(
            Opts::new("kiln_audio_seconds_total", "Speech to text: seconds of audio transcribed"),
            MODEL,
        )?;
        let real_time_factor = HistogramVec::new(
            HistogramOpts::new(
                "kiln_real_time_factor",
                "Speech to text: seconds spent per second of audio, per request (below 1 is faster than real time)",
            )
            .buckets(vec![0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]),
            MODEL,
        )?;
        let model_loads = IntCounterVec::new(
            Opts::new("kiln_model_loads_total", "Models loaded (preload and lazy)"),
            MODEL,
        )?;
        let model_unloads = IntCounterVec::new(
            Opts::new(
                "kiln_model_unloads_total",
                "Lazy models unloaded, by reason: lru (to make room) or idle",
            ),
            &["model", "version", "reason"],
        )?;
        let model_load_duration = HistogramVec::new(
            HistogramOpts::new(
                "kiln_model_load_duration_seconds",
                "Seconds per load, reading the weights and warming up",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            MODEL,
        )?;
        let memory_budget_bytes = IntGauge::new(
            "kiln_memory_budget_bytes",
            "Bytes the pod's models may hold at once (0: no budget); lazy models are unloaded to stay under it",
        )?;
        let lazy_first_request = HistogramVec::new(
            HistogramOpts::new(
                "kiln_lazy_first_request_seconds",
                "Latency of requests that waited for their lazy model to load: load, warmup and answer",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            MODEL,
        )?;
        let device_info = IntGaugeVec::new(
            Opts::new("kiln_device_info", "The device the models compute on: cpu or cuda:N, and its name"),
            &["device", "name"],
        )?;
        registry.register(Box::new(device_info.clone()))?;
        registry.register(Box::new(model_loads.clone()))?;
        registry.register(Box::new(model_unloads.clone()))?;
        registry.register(Box::new(model_load_duration.clone()))?;
        registry.register(Box::new(memory_budget_bytes.clone()))?;
        registry.register(Box::new(lazy_first_request.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(model_queue_depth.clone()))?;
        registry.register(Box::new(queue_waiting.clone()))?;
        registry.register(Box::new(model_queue_waiting.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(model_ready.clone()))?;
        registry.register(Box::new(load_seconds.clone()))?;
        registry.register(Box::new(warmup_seconds.clone()))?;
        registry.register(Box::new(resident_bytes.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(kv_cache_budget_bytes.clone()))?;
        registry.register(Box::new(kv_cache_reserved_bytes.clone()))?;
        registry.register(Box::new(kv_cache_used_bytes.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(audio_seconds.clone()))?;
        registry.register(Box::new(real_time_factor.clone()))?;
        Ok(Metrics {
            registry,
            queue_depth,
            model_queue_depth,
            queue_waiting,
            model_queue_waiting,
            requests,
            request_duration,
            batch_size,
            model_ready,
            load_seconds,
            warmup_seconds,
            resident_bytes,
            time_to_first_token,
            generated_tokens,
            kv_cache_budget_bytes,
            kv_cache_reserved_bytes,
            kv_cache_used_bytes,
            open_connections,
            audio_seconds,
            real_time_factor,
            model_loads,
            model_unloads,
            model_load_duration,
            memory_budget_bytes,
            lazy_first_request,
            device_info,
        })
    }

    /// Create every per-model series at zero so dashboards and the adapter see them at once.
    pub fn register_model(&self, id: &ModelRef) {
        let l = [id.name.as_str(), id.version.as_str()];
        self.model_queue_depth.with_label_values(&l).set(0);
        self.model_queue_waiting.with_label_values(&l).set(0);
        self.model_ready.with_label_values(&l).set(0);
        self.model_loads.with_label_values(&l).inc_by(0);
        self.resident_bytes.with_label_values(&l).set(0);
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
