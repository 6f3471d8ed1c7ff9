//! `fvd serve` against its peers, in one run, on the same data, through the same client.
//!
//! ```text
//! cargo bench --bench peers -- [--quick] [--storage tmpfs|disk|both|lv] [--only W1,W2]
//!     [--targets T1,T2] [--reps N] [--alloc-gib N] [--no-probes] [--keep] [--out FILE]
//!     [--serve-args 'ARGS']
//! ```
//! `--serve-args` adds its (space-separated) arguments to every `fvd serve` the harness times,
//! e.g. `--serve-args '--iops-total 5000'` to measure the rate a limit lets through.
//! Environment: FVD_BIN=path measures that fvd binary instead of this crate's.
//! Prints markdown tables: each target's median figure and fvd's ratio to it, server-side host
//! I/O per guest request, CPU and peak RSS, the goal checks, journal replay time and the RSS of
//! a 1 TiB image. See docs/PERFORMANCE.md.

mod base_reads;
mod client;
mod fvd_stats;
mod images;
mod probes;
mod procs;
mod report;
mod runners;
mod workloads;

use images::Images;
use report::Results;
use runners::Ctx;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use workloads::{Kind, Sizes, Target, Workload};

struct Args {
    quick: bool,
    storages: Vec<&'static str>,
    only: Vec<String>,
    targets: Vec<Target>,
    reps: Option<usize>,
    alloc_gib: Option<u64>,
    probes: bool,
    keep: bool,
    out: Option<PathBuf>,
    serve_args: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        storages: vec!["tmpfs", "disk"],
        only: vec![],
        targets: Target::ALL.to_vec(),
        reps: None,
        alloc_gib: None,
        probes: true,
        keep: false,
        out: None,
        serve_args: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--quick" => a.quick = true,
            "--no-probes" => a.probes = false,
            "--keep" => a.keep = true,
            "--storage" => {
                a.storages = match val()?.as_str() {
                    "tmpfs" => vec!["tmpfs"],
                    "disk" => vec!["disk"],
                    "both" => vec!["tmpfs", "disk"],
                    // Fresh images (alloc, locality) on loop devices over files on the disk.
                    "lv" => vec!["lv"],
                    s => return Err(format!("unknown storage {s}")),
                }
            }
            "--only" => a.only = val()?.split(',').map(str::to_string).collect(),
            "--targets" => {
                let v = val()?;
                a.targets = Target::ALL
                    .into_iter()
                    .filter(|t| v.split(',').any(|n| n == t.name()))
                    .collect();
            }
            "--reps" => a.reps = Some(val()?.parse().map_err(|_| "bad --reps")?),
            "--alloc-gib" => a.alloc_gib = Some(val()?.parse().map_err(|_| "bad --alloc-gib")?),
            "--out" => a.out = Some(PathBuf::from(val()?)),
            "--serve-args" => {
                a.serve_args = val()?.split_whitespace().map(str::to_string).collect()
            }
            s => return Err(format!("unknown argument {s}")),
        }
    }
    Ok(a)
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "not found".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    // FVD_BIN: measure another build of fvd (e.g. a branch under test) with this harness.
    let fvd = std::env::var_os("FVD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fvd")));
    // `cargo test --all-targets` runs bench targets too, without --bench: like a libtest bench
    // in test mode, run everything once at the smallest size and check that it worked.
    if !std::env::args().any(|a| a == "--bench") {
        smoke(&fvd);
        return;
    }
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("peers: {e}");
            std::process::exit(2);
        }
    };
    let serve_ok = Command::new(&fvd)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let targets: Vec<Target> = a
        .targets
        .iter()
        .copied()
        .filter(|t| serve_ok || !matches!(t, Target::Fvd | Target::FvdFlat))
        .collect();
    let sizes = Sizes::new(a.quick);
    let sizes = Sizes {
        reps: a.reps.unwrap_or(sizes.reps),
        alloc: a.alloc_gib.map_or(sizes.alloc, |g| g << 30),
        ..sizes
    };
    let ws: Vec<Workload> = workloads::all()
        .into_iter()
        .filter(|w| a.only.is_empty() || a.only.iter().any(|o| w.name == o))
        .collect();

    let mut md = String::new();
    let _ =
        writeln!(
        md,
        "Run: `cargo bench --bench peers -- {}`  \n{}; {}; {}; kernel {}; load average at start {}",
        std::env::args().skip(1).filter(|x| x != "--bench").collect::<Vec<_>>().join(" "),
        tool_version("qemu-storage-daemon", "--version"),
        tool_version("fio", "--version"),
        if serve_ok { "fvd serve present" } else { "fvd serve NOT present: fvd targets skipped" },
        tool_version("uname", "-r"),
        loadavg(),
    );
    let _ = writeln!(
        md,
        "Dataset {} GiB, {} reps (median), {} s per timed run after {} ms warm-up.\n",
        sizes.data >> 30,
        sizes.reps,
        sizes.time.as_secs_f64(),
        sizes.warmup.as_millis()
    );
    eprint!("{md}");

    for storage in &a.storages {
        let root = if *storage == "tmpfs" {
            "/dev/shm"
        } else {
            "/var/tmp"
        };
        remove_stale_dirs(Path::new(root));
        let dir = PathBuf::from(root).join(format!("fvd-bench-{}", std::process::id()));
        let logs = dir.join("logs");
        if let Err(e) = std::fs::create_dir_all(&logs) {
            eprintln!("peers: {}: {e}", logs.display());
            std::process::exit(1);
        }
        // The copy-on-read/prefetch section is named like a workload ("base-reads").
        let base = (a.only.is_empty() || a.only.iter().any(|o| o == "base-reads"))
            && targets.contains(&Target::Fvd);
        let extras = Extras {
            probes: a.probes,
            base_reads: base,
            perf: true,
            serve_args: a.serve_args.clone(),
        };
        let section = run_storage(storage, &dir, &fvd, &sizes, &ws, &targets, extras);
        let _ = writeln!(md, "{}", section.md);
        println!("{}", section.md);
        if !a.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = writeln!(md, "Load average at end: {}", loadavg());
    if let Some(out) = &a.out {
        if let Err(e) = std::fs::write(out, &md) {
            eprintln!("peers: {}: {e}", out.display());
        }
    }
}

/// The test-mode run: every workload on every target, the counting pass, the probes and the
/// copy-on-read/prefetch section, once each at [`Sizes::smoke`] on tmpfs. Exits non-zero, listing
/// what failed, if any run failed or any figure the report needs is missing. Timing is not
/// checked: the figures of so short a run mean nothing.
fn smoke(fvd: &Path) {
    let t0 = Instant::now();
    let root = Path::new("/dev/shm");
    remove_stale_dirs(root);
    let dir = root.join(format!("fvd-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(dir.join("logs")) {
        eprintln!("peers smoke: {}: {e}", dir.display());
        std::process::exit(1);
    }
    // A machine whose perf cannot count tracepoints still gets every other check.
    let perf = procs::perf_counts_tracepoints();
    if !perf {
        eprintln!("peers smoke: WARNING: perf cannot count tracepoints here; host I/O not counted");
    }
    let extras = Extras {
        probes: true,
        base_reads: true,
        perf,
        serve_args: vec![],
    };
    let mut section = run_storage(
        "tmpfs",
        &dir,
        fvd,
        &Sizes::smoke(),
        &workloads::all(),
        &Target::ALL,
        extras,
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !perf {
        section
            .failures
            .retain(|f| !f.contains(PERF_COUNTED_NOTHING));
    }
    if !section.failures.is_empty() {
        println!("{}", section.md);
        eprintln!("peers smoke: FAILED");
        for f in &section.failures {
            eprintln!("- {f}");
        }
        std::process::exit(1);
    }
    println!(
        "peers smoke: every target, workload, counter and probe produced its figures{} ({:.0} s)",
        if perf { "" } else { " (host I/O not counted)" },
        t0.elapsed().as_secs_f64()
    );
}

const PERF_COUNTED_NOTHING: &str = "perf counted no host I/O";

/// What the harness needs to report for `w` on `t` and did not get.
fn missing(res: &report::Results, w: &Workload, t: Target) -> Vec<String> {
    let mut out = Vec::new();
    let key = (w.name.to_string(), t);
    if let Some(e) = res.errors.get(&key) {
        out.push(format!("{} on {}: {e}", w.name, t.name()));
        return out;
    }
    match res.cell(w.name, t) {
        Some(c) if c.value > 0.0 && c.value.is_finite() => {}
        c => out.push(format!(
            "{} on {}: no figure ({:?})",
            w.name,
            t.name(),
            c.map(|c| c.value)
        )),
    }
    if w.op != client::Op::Write || !t.is_server() {
        return out;
    }
    let Some(counted) = res.counted.get(&key) else {
        out.push(format!("{} on {}: no counting run", w.name, t.name()));
        return out;
    };
    let flushes = w.flush_every > 0;
    let amp_ok = |a: Option<runners::Amp>| {
        a.is_some_and(|a| a.writes_per_write > 0.0 && (!flushes || a.flushes_per_flush.is_finite()))
    };
    if !amp_ok(counted.amp) {
        out.push(format!(
            "{} on {}: {PERF_COUNTED_NOTHING} ({:?})",
            w.name,
            t.name(),
            counted.amp
        ));
    }
    if matches!(t, Target::Fvd | Target::FvdFlat) && !amp_ok(counted.engine_amp) {
        out.push(format!(
            "{} on {}: no engine counters ({:?})",
            w.name,
            t.name(),
            counted.engine_amp
        ));
    }
    out
}

/// Removes `fvd-bench-PID` directories of harness runs that were killed (their PID is gone):
/// on tmpfs each holds gigabytes of RAM.
fn remove_stale_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("fvd-bench-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            eprintln!(
                "peers: removing {} (left by a killed run)",
                e.path().display()
            );
            images::detach_loops_under(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The sections after the main tables.
struct Extras {
    /// Journal open time and 1 TiB RSS.
    probes: bool,
    /// Copy-on-read and prefetch ("base-reads").
    base_reads: bool,
    /// Host I/O counted by perf.
    perf: bool,
    /// Added to every timed `fvd serve`.
    serve_args: Vec<String>,
}

/// One storage setting's report, and what failed in it.
struct Section {
    md: String,
    failures: Vec<String>,
}

fn run_storage(
    storage: &str,
    dir: &Path,
    fvd: &Path,
    sizes: &Sizes,
    ws: &[Workload],
    targets: &[Target],
    extras: Extras,
) -> Section {
    let mut md = format!("### Storage: {storage} ({})\n\n", dir.display());
    let imgs = Images::new(dir, fvd, storage == "lv");
    let mut ctx = Ctx {
        fvd: fvd.to_path_buf(),
        dir: dir.to_path_buf(),
        logs: dir.join("logs"),
        warmup: sizes.warmup,
        img_counts: HashMap::new(),
        perf: extras.perf,
        serve_args: extras.serve_args.clone(),
    };
    let t0 = Instant::now();
    if let Err(e) = imgs.prepare_dataset(sizes.data) {
        return Section {
            md: format!("{md}dataset preparation failed: {e}\n"),
            failures: vec![format!("dataset preparation: {e}")],
        };
    }
    eprintln!(
        "[{storage}] dataset ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut res = Results::default();
    // The measured repetitions, then one pass with perf counting the servers' host I/O (kept
    // apart so the tracing overhead never touches a figure).
    for rep in 0..=sizes.reps {
        let counting = rep == sizes.reps;
        for w in ws {
            if counting && w.op != client::Op::Write {
                continue;
            }
            let plan = workloads::plan(w, sizes);
            // Rotate the order every repetition so drift does not favour a position.
            let mut order: Vec<Target> = targets
                .iter()
                .copied()
                .filter(|t| t.runs(w.kind) && (!counting || t.is_server()))
                .collect();
            let n = order.len().max(1);
            order.rotate_left(rep % n);
            for t in order {
                let r = run_one(&mut ctx, &imgs, sizes, w, &plan, t, counting);
                let key = (w.name.to_string(), t);
                let tag = if counting {
                    "count".to_string()
                } else {
                    format!("rep {rep}")
                };
                match r {
                    Ok(s) => {
                        eprintln!(
                            "[{storage} {tag}] {:<22} {:<10} {:>10.1} rss {:>6} KiB{}",
                            w.name,
                            t.name(),
                            s.value,
                            s.rss_kib,
                            s.amp.map_or(String::new(), |a| format!(
                                " host w/w {:.3} f/F {:.2}",
                                a.writes_per_write, a.flushes_per_flush
                            ))
                        );
                        if counting {
                            res.counted.insert(key, s);
                        } else {
                            res.samples.entry(key).or_default().push(s);
                        }
                    }
                    Err(e) => {
                        eprintln!("[{storage} {tag}] {} {}: ERROR {e}", w.name, t.name());
                        res.errors.insert(key, e);
                    }
                }
            }
        }
    }
    if !ws.is_empty() {
        let _ = writeln!(
            md,
            "Median of {} runs; in parentheses fvd ÷ target (above 1: fvd faster).\n",
            sizes.reps
        );
        md.push_str(&report::main_table(&res, ws, targets));
        md.push('\n');
        md.push_str(&report::cpu_table(&res, ws, targets));
        md.push('\n');
        md.push_str(&report::server_table(&res, ws, targets));
        md.push('\n');
        md.push_str(&report::goal_table(&report::goals(&res, storage)));
    }
    if !res.errors.is_empty() {
        md.push_str("\nErrors:\n");
        for ((w, t), e) in &res.errors {
            let _ = writeln!(md, "- {w} on {}: {e}", t.name());
        }
    }
    let mut failures: Vec<String> = ws
        .iter()
        .flat_map(|w| {
            targets
                .iter()
                .filter(|t| t.runs(w.kind))
                .flat_map(|&t| missing(&res, w, t))
                .collect::<Vec<_>>()
        })
        .collect();
    if extras.probes {
        md.push('\n');
        let (text, failed) = run_probes(storage, &ctx, sizes, targets);
        md.push_str(&text);
        failures.extend(failed);
    }
    if extras.base_reads {
        md.push('\n');
        let (text, failed) = base_reads::run(storage, &ctx, &imgs, sizes);
        md.push_str(&text);
        failures.extend(failed);
    }
    Section { md, failures }
}

/// One measurement of `w` on `t`, on the image the workload needs (fresh ones are removed after).
fn run_one(
    ctx: &mut Ctx,
    imgs: &Images,
    sizes: &Sizes,
    w: &Workload,
    plan: &workloads::Plan,
    t: Target,
    counting: bool,
) -> Result<runners::Sample, String> {
    let f = t.format();
    let (image, base) = match w.kind {
        Kind::Steady => (imgs.data(f), None),
        Kind::Alloc | Kind::Locality => (imgs.create_fresh(f, sizes.image(w.kind))?, None),
        Kind::Cow => (
            imgs.create_overlay(f)?,
            Some(imgs.data(workloads::Format::Raw)),
        ),
    };
    let r = ctx.run(w, t, plan, &image, base.as_deref(), counting);
    if w.kind != Kind::Steady {
        imgs.remove_fresh(&image);
    }
    r
}

fn run_probes(
    storage: &str,
    ctx: &Ctx,
    sizes: &Sizes,
    targets: &[Target],
) -> (String, Vec<String>) {
    let mut md = String::new();
    let mut failures = Vec::new();
    match probes::journal_open(&ctx.dir) {
        Ok(j) => {
            let _ =
                writeln!(
                md,
                "Open of an image whose 16 MiB journal is full ({} sectors, {} records; filled in \
                 {:.1} s): read-only open (replay) {:.1} ms (median of 5), read-write open \
                 (replay + checkpoint) {:.1} ms. Goal ≤ 200 ms: {}.",
                j.sectors,
                j.entries,
                j.fill_secs,
                j.ro_ms,
                j.rw_ms,
                if j.rw_ms <= 200.0 { "met" } else { "**missed**" }
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Journal open probe failed: {e}");
            failures.push(format!("journal open probe: {e}"));
        }
    }
    if storage != "tmpfs" {
        return (md, failures);
    }
    for t in [Target::Fvd, Target::QsdQcow2] {
        if !targets.contains(&t) {
            continue;
        }
        match probes::rss_1tib(ctx, t, sizes.big_writes, sizes.big_read_time) {
            Ok(b) => {
                let mib = b.rss_kib as f64 / 1024.0;
                let goal = if t == Target::Fvd {
                    if mib <= 32.0 {
                        " Goal ≤ 32 MiB: met."
                    } else {
                        " Goal ≤ 32 MiB: **missed**."
                    }
                } else {
                    ""
                };
                let _ = writeln!(
                    md,
                    "\n1 TiB virtual image on {}: peak RSS {mib:.1} MiB after {} random 4 KiB \
                     writes (FLUSH every 32) and {} random 4 KiB reads over the whole disk.{goal}",
                    b.target.name(),
                    b.writes,
                    b.reads
                );
            }
            Err(e) => {
                let _ = writeln!(md, "\n1 TiB RSS probe on {} failed: {e}", t.name());
                failures.push(format!("1 TiB RSS probe on {}: {e}", t.name()));
            }
        }
    }
    (md, failures)
}
