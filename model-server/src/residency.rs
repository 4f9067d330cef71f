//! Which models stay in memory: the pod's memory budget, and which lazy models make room when
//! another must load. Pure functions over a snapshot of the slots, so the policy is tested
//! without loading anything; `loader` applies what they decide.

use crate::manifest::ModelRef;
use crate::quantity::format_bytes;

/// What the policy knows of one loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub id: ModelRef,
    /// What it is charged against the budget.
    pub bytes: u64,
    /// Preloaded: never unloaded.
    pub pinned: bool,
    /// Requests are queued or running on it (or a handler holds it): not unloaded now.
    pub busy: bool,
    /// When a request last used it, in any monotonic unit; smaller is longer ago.
    pub last_used: u64,
}

/// Why a model cannot load now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    #[error(
        "model {model} needs {} but the memory budget is {}: it does not fit even alone; raise the pool's memoryBudget (or memory limit), or set the model's memory hint if it overstates",
        format_bytes(*need), format_bytes(*budget)
    )]
    TooLarge { model: ModelRef, need: u64, budget: u64 },
    #[error(
        "model {model} needs {} of the memory budget of {}, and {} of it is held by models that cannot be unloaded now ({}); retry shortly, or raise the pool's memoryBudget",
        format_bytes(*need), format_bytes(*budget), format_bytes(*held), holders.join(", ")
    )]
    Held { model: ModelRef, need: u64, budget: u64, held: u64, holders: Vec<String> },
}

/// The models to unload, least recently used first, so that `model` (needing `need` bytes) fits
/// `budget` beside what stays; preloaded and busy models are never chosen. Empty when it fits
/// already.
pub fn make_room(
    residents: &[Resident],
    budget: u64,
    model: &ModelRef,
    need: u64,
) -> Result<Vec<ModelRef>, NoRoom> {
    if need > budget {
        return Err(NoRoom::TooLarge { model: model.clone(), need, budget });
    }
    let mut used: u64 = residents.iter().map(|r| r.bytes).fold(0, u64::saturating_add);
    let mut candidates: Vec<&Resident> =
        residents.iter().filter(|r| !r.pinned && !r.busy && r.id != *model).collect();
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.id.cmp(&b.id)));
    let mut chosen = Vec::new();
    let mut candidates = candidates.into_iter();
    while used.saturating_add(need) > budget {
        match candidates.next() {
            Some(r) => {
                used = used.saturating_sub(r.bytes);
                chosen.push(r.id.clone());
            }
            None => {
                let staying: Vec<&Resident> = residents.iter().filter(|r| !chosen.contains(&r.id)).collect();
                return Err(NoRoom::Held {
                    model: model.clone(),
                    need,
                    budget,
                    held: used,
                    holders: staying
                        .iter()
                        .map(|r| {
                            let why = if r.pinned { "preloaded" } else { "in use" };
                            format!("{} {} {why}", r.id, format_bytes(r.bytes))
                        })
                        .collect(),
                });
            }
        }
    }
    Ok(chosen)
}

/// Lazy models idle for at least `idle_for` at `now` (same unit as `last_used`), oldest first.
pub fn idle(residents: &[Resident], now: u64, idle_for: u64) -> Vec<ModelRef> {
    let mut out: Vec<&Resident> = residents
        .iter()
        .filter(|r| !r.pinned && !r.busy && now.saturating_sub(r.last_used) >= idle_for)
        .collect();
    out.sort_by_key(|r| r.last_used);
    out.into_iter().map(|r| r.id.clone()).collect()
}

/// The budget when the plan names none: the memory limit less a margin for the runtime,
/// tokenizers and request buffers (a tenth, at least 64 MiB). None without a limit: no budget.
pub fn default_budget(memory_limit: Option<u64>) -> Option<u64> {
    memory_limit.map(|limit| limit.saturating_sub(runtime_margin(limit)))
}

/// Memory kept for the runtime, tokenizers and request buffers: a tenth of the limit, at least
/// 64 MiB.
pub fn runtime_margin(limit: u64) -> u64 {
    (limit / 10).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn r(name: &str, mib: u64, pinned: bool, busy: bool, last_used: u64) -> Resident {
        Resident { id: ModelRef::new(name, "v1"), bytes: mib * MIB, pinned, busy, last_used }
    }

    fn names(ids: &[ModelRef]) -> Vec<&str> {
        ids.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn nothing_is_unloaded_while_the_model_fits() {
        let residents = [r("a", 100, false, false, 1)];
        let out = make_room(&residents, 250 * MIB, &ModelRef::new("b", "v1"), 100 * MIB);
        assert_eq!(out, Ok(vec![]));
        // Exactly at the budget still fits.
        let out = make_room(&residents, 200 * MIB, &ModelRef::new("b", "v1"), 100 * MIB);
        assert_eq!(out, Ok(vec![]));
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        let residents =
            [r("a", 100, false, false, 5), r("b", 100, false, false, 2), r("c", 100, false, false, 9)];
        let out = make_room(&residents, 350 * MIB, &ModelRef::new("d", "v1"), 100 * MIB).expect("room");
        assert_eq!(names(&out), ["b"]);
        let out = make_room(&residents, 250 * MIB, &ModelRef::new("d", "v1"), 100 * MIB).expect("room");
        assert_eq!(names(&out), ["b", "a"]);
    }

    #[test]
    fn preloaded_and_busy_models_are_never_unloaded() {
        let residents =
            [r("pre", 100, true, false, 0), r("busy", 100, false, true, 1), r("idle", 100, false, false, 8)];
        let out = make_room(&residents, 300 * MIB, &ModelRef::new("d", "v1"), 100 * MIB).expect("room");
        assert_eq!(names(&out), ["idle"], "the oldest two are pinned and busy");
        let err =
            make_room(&residents, 250 * MIB, &ModelRef::new("d", "v1"), 100 * MIB).expect_err("no room");
        let NoRoom::Held { held, holders, .. } = &err else { panic!("{err:?}") };
        assert_eq!(*held, 200 * MIB, "what stays after unloading the idle one");
        assert_eq!(holders.len(), 2, "{holders:?}");
        let message = err.to_string();
        assert!(
            message.contains("250Mi") && message.contains("pre:v1") && message.contains("busy:v1"),
            "{message}"
        );
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_naming_both() {
        let err = make_room(&[], 100 * MIB, &ModelRef::new("big", "v1"), 101 * MIB).expect_err("too large");
        assert!(matches!(err, NoRoom::TooLarge { .. }));
        let message = err.to_string();
        assert!(message.contains("big:v1") && message.contains("100Mi"), "{message}");
    }

    #[test]
    fn the_budget_arithmetic_saturates() {
        let residents =
            [r("a", 0, false, false, 0), Resident { bytes: u64::MAX, ..r("b", 0, false, false, 1) }];
        let out = make_room(&residents, u64::MAX - 1, &ModelRef::new("c", "v1"), 1).expect("room");
        assert_eq!(names(&out), ["a", "b"], "a zero-byte model goes first by age, then the huge one");
        assert_eq!(default_budget(Some(1 << 30)), Some((1 << 30) - (1 << 30) / 10));
        assert_eq!(default_budget(Some(32 * MIB)), Some(0), "a tiny limit leaves nothing, not an underflow");
        assert_eq!(default_budget(None), None);
    }

    #[test]
    fn idle_models_are_the_lazy_free_ones_past_the_timeout() {
        let residents = [
            r("pre", 1, true, false, 0),
            r("busy", 1, false, true, 0),
            r("old", 1, false, false, 10),
            r("new", 1, false, false, 95),
            r("older", 1, false, false, 5),
        ];
        assert_eq!(names(&idle(&residents, 100, 30)), ["older", "old"]);
        assert!(idle(&residents, 100, 1000).is_empty());
    }
}
