//! A team of threads for a decoder step's many short parallel loops. A decode step of a small
//! model is ~120 loops of ~50 µs; between them rayon's idle workers go to sleep, and waking one
//! (a futex and a reschedule, tens of microseconds on a VM) took a tenth of the step. A team's
//! helpers spin between loops instead, and park only after [`IDLE_PARK`] without work, so an
//! idle model holds no CPU. The thread that runs a loop takes part in it.
//!
//! [`Team::install`] makes a team the current one of the calling thread; [`for_each`] runs a
//! loop on it, or on rayon's current pool where none is installed.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins without work before it parks.
const IDLE_PARK: Duration = Duration::from_millis(2);

/// A loop's body, its lifetime erased: valid while the loop that published it runs (the
/// publisher waits for every helper before it returns).
type Body = dyn Fn(usize) + Sync;

/// Where the publisher keeps the (fat) reference to its body: on its stack, for the loop.
type BodyRef = &'static Body;

struct Shared {
    /// Bumped for every loop; helpers start on a change.
    epoch: AtomicU64,
    body: AtomicPtr<BodyRef>,
    /// Tasks of the current loop, the next one to take, and helpers done with the loop.
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Helpers parked (or about to), to be unparked by the next loop.
    parked: AtomicUsize,
    /// A task of the current loop panicked on a helper.
    panicked: AtomicBool,
    stop: AtomicBool,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// One loop at a time: a second caller waits (a model's steps are one at a time anyway).
    running: Mutex<()>,
}

thread_local! {
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

impl Team {
    /// A team of `threads` (the caller and `threads - 1` helpers named `name-N`).
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            body: AtomicPtr::new(std::ptr::null_mut()),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut helpers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            helpers.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || helper(&s))?);
        }
        Ok(Team { shared, helpers, running: Mutex::new(()) })
    }

    /// Threads a loop runs on, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f` with this team the calling thread's current one.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        let before = CURRENT.with(|c| c.replace(self));
        // Restored on unwind too.
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(before);
        f()
    }

    /// `f(0)`, …, `f(tasks - 1)` over the team; returns when all have run. A task that panics
    /// on a helper panics here, after the loop.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &*self.shared;
        // SAFETY: the reference is read by helpers only between this loop's epoch bump and
        // their `done` increment, and this function waits for every `done` before `f` and
        // `body` go out of scope (also when a task panics here: the guard below waits).
        let mut body: BodyRef = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), BodyRef>(f) };
        s.body.store(&mut body, Relaxed);
        s.tasks.store(tasks, Relaxed);
        s.next.store(0, Relaxed);
        s.done.store(0, Relaxed);
        s.panicked.store(false, Relaxed);
        s.epoch.fetch_add(1, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            self.helpers.iter().for_each(|h| h.thread().unpark());
        }
        struct Wait<'a>(&'a Shared, usize);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                let mut spins = 0u32;
                while self.0.done.load(Acquire) < self.1 {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(256) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let wait = Wait(s, self.helpers.len());
        loop {
            let i = s.next.fetch_add(1, AcqRel);
            if i >= tasks {
                break;
            }
            f(i);
        }
        drop(wait);
        if s.panicked.swap(false, AcqRel) {
            panic!("a parallel task panicked on a helper thread");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for h in self.helpers.drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn helper(s: &Shared) {
    // The epoch the team was made with, not the current one: a loop may start before this
    // thread does, and it waits for us.
    let mut seen = 0;
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            // Now and then let another thread have the core: where threads outnumber cores
            // (tests side by side, other models) a spinning helper must not starve the caller.
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            }
            if spins.is_multiple_of(1024) && idle.elapsed() > IDLE_PARK {
                // Announce, re-check, then park: a loop that starts in between sees the count
                // and unparks us, or we see its epoch.
                s.parked.fetch_add(1, SeqCst);
                if s.epoch.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                    std::thread::park();
                }
                s.parked.fetch_sub(1, SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        if s.stop.load(Acquire) {
            return;
        }
        // SAFETY: published by `for_each` before the epoch bump we saw, valid until we count
        // ourselves done below.
        let body: &Body = unsafe { *s.body.load(Relaxed) };
        let tasks = s.tasks.load(Relaxed);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loop {
                let i = s.next.fetch_add(1, AcqRel);
                if i >= tasks {
                    break;
                }
                body(i);
            }
        }));
        if ran.is_err() {
            s.panicked.store(true, Release);
        }
        s.done.fetch_add(1, Release);
    }
}

/// Threads a loop on the current team (or rayon pool) runs on.
pub fn threads() -> usize {
    CURRENT.with(|c| {
        let team = c.get();
        if team.is_null() {
            rayon::current_num_threads()
        } else {
            // SAFETY: set by `install` for the duration of a call that borrows the team.
            unsafe { &*team }.threads()
        }
    })
}

/// `f(0)`, …, `f(tasks - 1)` on the current team, or on rayon's current pool.
pub fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        (0..tasks).into_par_iter().for_each(f);
    } else {
        // SAFETY: as in `threads`.
        unsafe { &*team }.for_each(tasks, f);
    }
}

/// `f(0)`, …, `f(items - 1)` on the current team (or rayon pool) in one contiguous run per
/// thread (at most `threads` runs): a loop over the same count splits the same way, so what a
/// thread writes in one such loop it reads in the next from its own cache, and each thread
/// walks its items in order.
pub fn for_runs(items: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let runs = threads.clamp(1, items.max(1));
    if runs == 1 {
        return (0..items).for_each(f);
    }
    for_each(runs, &|r| (r * items / runs..(r + 1) * items / runs).for_each(f));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_loop_after_loop_and_after_parking() {
        let team = Team::new(3, "test-team").expect("team");
        for round in 0..200 {
            let hits: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
            team.install(|| for_each(hits.len(), &|i| _ = hits[i].fetch_add(1, SeqCst)));
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            if round == 100 {
                // Long enough for the helpers to park; the next loop wakes them.
                std::thread::sleep(IDLE_PARK * 3);
            }
        }
        assert_eq!(team.install(threads), 3);
        assert_eq!(threads(), rayon::current_num_threads(), "no team outside install");
    }

    #[test]
    fn runs_cover_every_item_once() {
        let team = Team::new(2, "test-team").expect("team");
        for threads in [1, 2, 3] {
            for items in [0, 1, 2, 5, 36] {
                let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                team.install(|| for_runs(items, threads, &|i| _ = hits[i].fetch_add(1, SeqCst)));
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{threads} runs of {items}");
            }
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_runs_on() {
        let team = Team::new(2, "test-team").expect("team");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.for_each(64, &|i| assert!(i != 40, "task 40"));
        }));
        assert!(caught.is_err());
        let sum = AtomicUsize::new(0);
        team.for_each(10, &|i| _ = sum.fetch_add(i, SeqCst));
        assert_eq!(sum.load(SeqCst), 45);
    }
}
