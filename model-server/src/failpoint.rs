//! Crash switches for tests of the failure paths: `KILN_FAILPOINTS=batch-panic` makes every
//! model's batcher panic on its first batch, `batch-panic:minilm` only that model's. Compiled
//! into debug builds only: a release binary has no way to crash on request.

use crate::manifest::ModelRef;

/// True when the failpoint `point` is switched on for `model`.
#[cfg(debug_assertions)]
pub fn hit(point: &str, model: &ModelRef) -> bool {
    let Ok(spec) = std::env::var("KILN_FAILPOINTS") else { return false };
    spec.split(',').map(str::trim).any(|entry| match entry.split_once(':') {
        Some((p, name)) => p == point && (name == model.name || name == model.to_string()),
        None => entry == point,
    })
}

#[cfg(not(debug_assertions))]
pub fn hit(_point: &str, _model: &ModelRef) -> bool {
    false
}
