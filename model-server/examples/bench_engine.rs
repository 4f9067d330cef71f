//! Engine benchmark, the Rust side of the Python baseline's engine benchmark (bench/run.sh runs both):
//! sentences/s at batch 32 over the short and long corpora (3 warm-up passes, 5 timed passes,
//! median; tokenization included, as in sentence-transformers' `encode`), and batch-1 latency
//! (200 calls over short inputs, p50/p99), for the packed encoder, candle's stock BERT on the
//! CPU, and (`cuda`, in a build with the `cuda` feature) candle's BERT on CUDA device 0.
//!
//! cargo run --release -p kiln-model-server --example bench_engine -- \
//!     [MODEL_DIR] [CORPUS_DIR] [--engines packed,candle,cuda] [--runs short,long,latency] [--out FILE]
//!
//! The packed encoder takes batches in corpus order (it does not pad, so order does not
//! matter); candle's is given length-sorted batches, as sentence-transformers sorts its input,
//! which is its best case. Before each timed run it waits (up to `QUIET_WAIT_S`, default 120 s)
//! for the machine to be quiet and reports how much CPU other processes used during the run.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::families::text_embedding::{EmbeddingModel, EncoderSettings};
use kiln_model_server::models::bert::BertConfig;
use kiln_model_server::models::bert::candle::CandleBert;
use kiln_model_server::models::bert::packed::PackedBert;
use kiln_model_server::models::{Architecture, Encoder};
use serde_json::{Value, json};

const BATCH: usize = 32;
const WARMUP: usize = 3;
const PASSES: usize = 5;
const LATENCY_CALLS: usize = 200;

/// Busy and total jiffies of all CPUs.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return (0, 1);
    }
    let total: u64 = v[..8].iter().sum();
    (total - v[3] - v[4], total)
}

/// This process's CPU time (user + system), in jiffies.
fn own_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after "(comm)": state is the 1st, utime the 12th and stime the 13th.
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Jiffies per second of /proc's CPU times (USER_HZ, 100 on Linux).
fn clock_ticks() -> f64 {
    100.0
}

/// Waits until the machine is less than 10% busy over 3 s, at most `QUIET_WAIT_S` (default 120 s,
/// as run.sh gives the Python baseline).
fn wait_quiet() -> Value {
    let max_s = std::env::var("QUIET_WAIT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(120.0);
    let max = Duration::from_secs_f64(max_s);
    let t0 = Instant::now();
    loop {
        let (b0, a0) = cpu_jiffies();
        std::thread::sleep(Duration::from_secs(3));
        let (b1, a1) = cpu_jiffies();
        let busy = (b1 - b0) as f64 / (a1 - a0).max(1) as f64;
        if busy < 0.10 || t0.elapsed() > max {
            return json!({"waited_s": t0.elapsed().as_secs(), "busy_before": (busy * 1000.0).round() / 1000.0});
        }
    }
}

/// Runs `f` and returns the share of all CPUs' time that other processes used meanwhile.
fn foreign_cpu<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let ((b0, a0), o0) = (cpu_jiffies(), own_jiffies());
    let out = f();
    let ((b1, a1), o1) = (cpu_jiffies(), own_jiffies());
    let foreign = (b1 - b0).saturating_sub(o1 - o0) as f64 / (a1 - a0).max(1) as f64;
    (out, (foreign * 1000.0).round() / 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn throughput(model: &EmbeddingModel, texts: &[String], sort: bool) -> Value {
    let mut order: Vec<&str> = texts.iter().map(String::as_str).collect();
    if sort {
        // sentence-transformers sorts by length (longest first) before batching.
        order.sort_by_key(|t| std::cmp::Reverse(model.tokenize(t).map(|t| t.ids.len()).unwrap_or(0)));
    }
    let tokens: usize = order.iter().map(|t| model.tokenize(t).expect("tokenize").ids.len()).sum();
    // Wall seconds and this process's CPU seconds of one pass over the corpus.
    let pass = || {
        let (t0, c0) = (Instant::now(), own_jiffies());
        for batch in order.chunks(BATCH) {
            std::hint::black_box(model.embed(batch).expect("embed"));
        }
        (t0.elapsed().as_secs_f64(), (own_jiffies() - c0) as f64 / clock_ticks())
    };
    let quiet = wait_quiet();
    for _ in 0..WARMUP {
        pass();
    }
    let (passes, foreign) = foreign_cpu(|| (0..PASSES).map(|_| pass()).collect::<Vec<_>>());
    let times: Vec<f64> = passes.iter().map(|p| p.0).collect();
    let med = median(times.clone());
    let cpu = median(passes.iter().map(|p| p.1).collect());
    json!({
        "n": texts.len(), "batch_size": BATCH, "length_sorted": sort, "tokens": tokens,
        "mean_tokens": round2(tokens as f64 / texts.len() as f64),
        "pass_s": times.iter().map(|t| (t * 1e4).round() / 1e4).collect::<Vec<_>>(),
        "median_s": (med * 1e4).round() / 1e4,
        "sentences_per_s": round2(texts.len() as f64 / med),
        "tokens_per_s": (tokens as f64 / med).round(),
        "cpu_s_per_pass": round2(cpu),
        "quiet": quiet, "foreign_cpu": foreign,
    })
}

fn latency(model: &EmbeddingModel, short: &[String]) -> Value {
    for s in short.iter().take(20) {
        model.embed(&[s]).expect("warm-up");
    }
    let quiet = wait_quiet();
    let (mut ms, foreign) = foreign_cpu(|| {
        (0..LATENCY_CALLS)
            .map(|i| {
                let t0 = Instant::now();
                std::hint::black_box(model.embed(&[&short[i % short.len()]]).expect("embed"));
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect::<Vec<_>>()
    });
    ms.sort_by(f64::total_cmp);
    json!({
        "calls": LATENCY_CALLS,
        "p50_ms": round2(percentile(&ms, 50.0)), "p90_ms": round2(percentile(&ms, 90.0)),
        "p99_ms": round2(percentile(&ms, 99.0)), "max_ms": round2(ms[ms.len() - 1]),
        "mean_ms": round2(ms.iter().sum::<f64>() / ms.len() as f64),
        "quiet": quiet, "foreign_cpu": foreign,
    })
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0).round())
}

fn read_corpus(dir: &std::path::Path, name: &str) -> Vec<String> {
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn main() {
    let mut positional = Vec::new();
    let (mut engines, mut out) = ("packed,candle".to_string(), None);
    let mut runs = "short,long,latency".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--engines" => engines = args.next().expect("--engines LIST"),
            "--out" => out = Some(args.next().expect("--out FILE")),
            "--runs" => runs = args.next().expect("--runs LIST"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let model_dir = positional.first().cloned().unwrap_or_else(|| home.join(".cache/kiln/fixtures/minilm"));
    let corpus_dir = positional.get(1).cloned().unwrap_or_else(|| {
        panic!("give the corpus directory (short.json, long.json) as the second argument")
    });
    let short = read_corpus(&corpus_dir, "short");
    let long = read_corpus(&corpus_dir, "long");

    let mut results = serde_json::Map::new();
    for engine in engines.split(',') {
        let t0 = Instant::now();
        let (encoder, sort, detail): (Arc<dyn Encoder>, bool, Value) = match engine {
            "packed" => {
                let config = BertConfig::read(&model_dir, Architecture::Bert).expect("config");
                let e = PackedBert::load(&model_dir, &config).expect("load packed");
                let detail = json!({
                    "isa": format!("{:?}", e.isa()),
                    "matmul_isa": kiln_model_server::kernels::gemm::matmul_isa(),
                    "threads": e.threads(),
                });
                (Arc::new(e), false, detail)
            }
            "candle" => (
                Arc::new(
                    CandleBert::load(&model_dir, Architecture::Bert, &candle_core::Device::Cpu)
                        .expect("load candle"),
                ),
                true,
                json!({}),
            ),
            "cuda" => {
                let device = ComputeDevice::open(DeviceRequest::Cuda(0)).unwrap_or_else(|e| {
                    eprintln!("cuda: no CUDA device: {e}");
                    std::process::exit(2)
                });
                let detail = json!({"device": device.label(), "name": device.name()});
                let e =
                    CandleBert::load(&model_dir, Architecture::Bert, device.candle()).expect("load on cuda");
                (Arc::new(e), true, detail)
            }
            other => panic!("unknown engine {other}: packed, candle or cuda"),
        };
        let load_s = t0.elapsed().as_secs_f64();
        let settings = EncoderSettings::read(&model_dir, encoder.max_positions()).expect("settings");
        let model = EmbeddingModel::with_encoder(&model_dir, encoder, settings).expect("model");
        eprintln!("{engine}: loaded in {load_s:.2}s {detail}");
        let mut r = json!({"load_s": round2(load_s), "engine": detail});
        for (name, texts) in [("short", &short), ("long", &long)] {
            if !runs.split(',').any(|r| r == name) {
                continue;
            }
            let t = throughput(&model, texts, sort);
            eprintln!(
                "{engine} {name}: {} sentences/s (foreign cpu {})",
                t["sentences_per_s"], t["foreign_cpu"]
            );
            r[format!("throughput_{name}")] = t;
        }
        if runs.split(',').any(|r| r == "latency") {
            let l = latency(&model, &short);
            eprintln!("{engine} batch 1: p50 {} ms, p99 {} ms", l["p50_ms"], l["p99_ms"]);
            r["latency_single"] = l;
        }
        r["peak_rss_mib_so_far"] = json!(peak_rss_mib());
        results.insert(engine.to_string(), r);
    }
    let text = serde_json::to_string_pretty(&Value::Object(results)).expect("json");
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(&out, &text).unwrap_or_else(|e| panic!("{out}: {e}"));
    }
}
