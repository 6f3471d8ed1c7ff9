//! Randomized differential testing of the engine on the simulated disk (after FVD's qemu-test):
//! many concurrent overlapping requests, I/O completing in random order, power losses and
//! injected I/O errors, every read checked against a truth model. Each run is determined by its
//! seed; a failure prints the command that replays it.

mod sim;

use sim::driver::{run, Stats};
use sim::scenario::{Scenario, MODE_BASE, MODE_COMPACT, MODE_CRASH, MODE_ERRORS, MODE_PROCESS};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

/// Runs one seed; on failure returns the message with the replay command.
fn run_seed(seed: u64, ops: u64) -> Result<Stats, String> {
    let sc = Scenario::from_seed(seed);
    let desc = format!("{sc:?}");
    let r = catch_unwind(AssertUnwindSafe(|| run(sc, ops)))
        .unwrap_or_else(|p| Err(format!("panic: {}", panic_text(&p))));
    r.map_err(|e| {
        format!("seed {seed} FAILED: {e}\n  {desc}\n  replay: FVD_SIM_SEED={seed} FVD_SIM_OPS={ops} cargo test --test sim_engine replay -- --nocapture")
    })
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs `seeds` and fails listing every failing seed.
fn run_seeds(seeds: impl Iterator<Item = u64>, ops: u64) -> Stats {
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed(seed, ops) {
            Ok(s) => {
                total.engine_ops += s.engine_ops;
                total.power_losses += s.power_losses;
                total.process_crashes += s.process_crashes;
                total.engine_errors += s.engine_errors;
                total.checkpoints += s.checkpoints;
                total.journal_writes += s.journal_writes;
                total.bounced += s.bounced;
                total.zeroes += s.zeroes;
                total.zeroing_skipped += s.zeroing_skipped;
                total.journal_unordered += s.journal_unordered;
                total.sim_ops += s.sim_ops;
            }
            Err(e) => {
                eprintln!("{e}");
                failures.push(seed);
            }
        }
    }
    eprintln!("{total:?}");
    assert!(
        failures.is_empty(),
        "failing seeds: {failures:?} (replay commands above)"
    );
    total
}

/// Seeds for the given mode bits: all four compact × base combinations each.
fn seeds(mode: u64, per_combo: u64) -> impl Iterator<Item = u64> {
    (0..per_combo).flat_map(move |i| (0..4).map(move |combo| (i << 4) | mode | combo))
}

const CI_OPS: u64 = 1500;

#[test]
fn differential_all_combinations() {
    assert_eq!(MODE_COMPACT | MODE_BASE, 3);
    let s = run_seeds(seeds(0, 6), CI_OPS);
    // Both ways of completing a partial first write were exercised, and journal writes with
    // and without a flush before them.
    assert!(s.zeroes > 0 && s.zeroing_skipped > 0, "{s:?}");
    assert!(
        s.journal_unordered > 0 && s.journal_writes > s.journal_unordered,
        "{s:?}"
    );
}

#[test]
fn power_loss_all_combinations() {
    let s = run_seeds(seeds(MODE_CRASH, 6), CI_OPS);
    assert!(s.zeroes > 0 && s.zeroing_skipped > 0, "{s:?}");
    assert!(
        s.journal_unordered > 0 && s.journal_writes > s.journal_unordered,
        "{s:?}"
    );
}

/// Crashes of the process (the host keeps every completed write, unflushed ones too) mixed with
/// power losses: after a process crash every completed write or write-zeroes reads back, FLUSH
/// or not.
#[test]
fn process_crash_all_combinations() {
    let s = run_seeds(seeds(MODE_PROCESS | MODE_CRASH, 6), CI_OPS);
    assert!(s.process_crashes > 0 && s.power_losses > 0, "{s:?}");
}

#[test]
fn injected_errors_all_combinations() {
    let _ = run_seeds(
        seeds(MODE_ERRORS, 3)
            .chain(seeds(MODE_ERRORS | MODE_CRASH, 3))
            .chain(seeds(MODE_ERRORS | MODE_CRASH | MODE_PROCESS, 3)),
        CI_OPS,
    );
}

/// Seeds a soak once failed on: exactly-sized block devices where writes, discards and
/// re-allocations race (one sync on ENOSPC was not always enough to recycle discarded chunks);
/// 9002559: a flush failing inside a deferred copy-on-read (not a guest FLUSH) left the image
/// refusing writes without the driver reopening it.
#[test]
fn recorded_soak_failures() {
    let _ = run_seeds(
        [7000161, 7000833, 7001283, 7001395, 9002559].into_iter(),
        5000,
    );
}

/// Seeds a process-crash soak failed on, all with injected errors: 4294967304, a first write
/// whose intent failed left its bit queued for the next FLUSH while it read absent (it read
/// differently after a clean reopen); the others, a FLUSH whose journal write failed damaged
/// intents of completed writes, which a process crash then lost (the engine now rewrites them
/// at once; since the oracle holds a process crash after an I/O error only to the power-loss
/// contract, these seeds now check that and consistency).
#[test]
fn recorded_process_crash_failures() {
    let _ = run_seeds(
        [4294967304, 4294967340, 4294967356, 4294967644, 4294967661].into_iter(),
        5000,
    );
}

/// `FVD_SIM_SEED=<seed> [FVD_SIM_OPS=<n>] cargo test --test sim_engine replay -- --nocapture`
#[test]
fn replay() {
    let Some(seed) = env_u64("FVD_SIM_SEED") else {
        return;
    };
    let ops = env_u64("FVD_SIM_OPS").unwrap_or(CI_OPS);
    eprintln!("{:?}", Scenario::from_seed(seed));
    match run_seed(seed, ops) {
        Ok(s) => eprintln!("seed {seed} passed: {s:?}"),
        Err(e) => panic!("{e}"),
    }
}

/// Long soak: `FVD_SIM_SEEDS` seeds (default 2000) from `FVD_SIM_START` (default 1 << 20),
/// `FVD_SIM_OPS` requests each (default 20000).
#[test]
#[ignore]
fn soak() {
    let start = env_u64("FVD_SIM_START").unwrap_or(1 << 20);
    let n = env_u64("FVD_SIM_SEEDS").unwrap_or(2000);
    let ops = env_u64("FVD_SIM_OPS").unwrap_or(20000);
    let _ = run_seeds(start..start + n, ops);
}
