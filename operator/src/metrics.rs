//! Operator metrics (names are part of the contract).

use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

pub struct OperatorMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    duration: Histogram,
}

impl OperatorMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("kiln_operator_reconciles_total", "Reconciles by result"),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("kiln_operator_reconcile_duration_seconds", "Time per reconcile")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(OperatorMetrics { registry, reconciles, duration })
    }

    pub fn observe(&self, ok: bool, took: Duration) {
        self.reconciles.with_label_values(&[if ok { "success" } else { "error" }]).inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
