//! Medians, tables (markdown) and the goal checks.

use crate::runners::{Amp, Sample};
use crate::workloads::{Target, Workload};
use std::collections::BTreeMap;
use std::fmt::Write;

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
pub struct Results {
    pub samples: BTreeMap<(String, Target), Vec<Sample>>,
    /// The counting run of each (write workload, server).
    pub counted: BTreeMap<(String, Target), Sample>,
    pub errors: BTreeMap<(String, Target), String>,
}

/// The median figure and its spread, with the worst-case server figures.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub rss_kib: u64,
    pub cpu_us: Option<f64>,
    pub total_cpu_us: Option<f64>,
    /// perf-counted host I/O per guest request (counting run).
    pub amp: Option<Amp>,
    /// The same from fvd's engine counters.
    pub engine_amp: Option<Amp>,
}

impl Results {
    pub fn cell(&self, w: &str, t: Target) -> Option<Cell> {
        let s = self.samples.get(&(w.to_string(), t))?;
        if s.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = s.iter().map(|x| x.value).collect();
        let value = median(&mut v);
        let mut cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
        let mut total: Vec<f64> = s.iter().filter_map(|x| x.total_cpu_us).collect();
        let counted = self.counted.get(&(w.to_string(), t));
        Some(Cell {
            value,
            min: v[0],
            max: v[v.len() - 1],
            rss_kib: s.iter().map(|x| x.rss_kib).max().unwrap_or(0),
            cpu_us: (!cpu.is_empty()).then(|| median(&mut cpu)),
            total_cpu_us: (!total.is_empty()).then(|| median(&mut total)),
            amp: counted.and_then(|c| c.amp),
            engine_amp: counted.and_then(|c| c.engine_amp),
        })
    }

    /// fvd's figure divided by `t`'s (above 1: fvd is faster).
    pub fn ratio(&self, w: &str, fvd: Target, t: Target) -> Option<f64> {
        Some(self.cell(w, fvd)?.value / self.cell(w, t)?.value)
    }
}

fn fmt_value(v: f64, bandwidth: bool) -> String {
    if bandwidth {
        format!("{v:.0}")
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A markdown table's header row and separator: `first`, then one column per name.
pub fn table_header<'a>(first: &str, cols: impl Iterator<Item = &'a str>) -> String {
    let mut head = format!("| {first} |");
    let mut sep = String::from("|---|");
    for c in cols {
        let _ = write!(head, " {c} |");
        sep.push_str("---|");
    }
    format!("{head}\n{sep}\n")
}

/// One row per workload, one column per target: median figure and (fvd ÷ target).
pub fn main_table(r: &Results, ws: &[Workload], ts: &[Target]) -> String {
    let mut s = table_header("workload", ts.iter().map(|t| t.name()));
    for w in ws {
        let _ = write!(
            s,
            "| {} ({}) |",
            w.name,
            if w.bandwidth { "MiB/s" } else { "IOPS" }
        );
        for &t in ts {
            let cell = match r.cell(w.name, t) {
                None if r.errors.contains_key(&(w.name.to_string(), t)) => "error".to_string(),
                None => "–".to_string(),
                Some(c) => {
                    let v = fmt_value(c.value, w.bandwidth);
                    match r.ratio(w.name, Target::Fvd, t) {
                        Some(x) if t != Target::Fvd => format!("{v} ({x:.2}×)"),
                        _ => v,
                    }
                }
            };
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    s
}

/// CPU time per request of everything involved: blkio client + server for the vhost-user
/// targets, the whole process for qemu-img bench and fio. Contention inflates wall-clock figures
/// far more than CPU time, so this is the steadier comparison on a busy machine.
pub fn cpu_table(r: &Results, ws: &[Workload], ts: &[Target]) -> String {
    let mut s = table_header("workload (CPU µs / request)", ts.iter().map(|t| t.name()));
    for w in ws {
        let _ = write!(s, "| {} |", w.name);
        for &t in ts {
            let v = r.cell(w.name, t).and_then(|c| c.total_cpu_us);
            let _ = write!(s, " {} |", v.map_or("–".to_string(), |x| format!("{x:.1}")));
        }
        s.push('\n');
    }
    s
}

/// Server-side figures of the vhost-user targets. The engine-counter column appears only when
/// the server exposed its counters.
pub fn server_table(r: &Results, ws: &[Workload], ts: &[Target]) -> String {
    let cells: Vec<(&Workload, Target, Cell)> = ws
        .iter()
        .flat_map(|w| ts.iter().map(move |&t| (w, t)))
        .filter(|(_, t)| t.is_server())
        .filter_map(|(w, t)| r.cell(w.name, t).map(|c| (w, t, c)))
        .collect();
    let engine = cells.iter().any(|(_, _, c)| c.engine_amp.is_some());
    let mut s = String::from(
        "| workload | server | host writes / guest write | fallocates / guest write | \
         host flushes / guest FLUSH |",
    );
    if engine {
        s.push_str(" engine counters (w/w, f/F) |");
    }
    s.push_str(
        " server CPU µs / request | peak RSS MiB | spread (min–max) |\n|---|---|---|---|---|",
    );
    s.push_str(if engine {
        "---|---|---|---|\n"
    } else {
        "---|---|---|\n"
    });
    let num = |v: Option<f64>, p: usize| match v {
        Some(x) if !x.is_nan() => format!("{x:.p$}"),
        _ => "–".to_string(),
    };
    for (w, t, c) in cells {
        let a = c.amp;
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {} |",
            w.name,
            t.name(),
            num(a.map(|a| a.writes_per_write), 3),
            num(a.map(|a| a.fallocates_per_write), 3),
            num(a.map(|a| a.flushes_per_flush), 2),
        );
        if engine {
            let e = c.engine_amp.map_or("–".to_string(), |e| {
                format!(
                    "{}, {}",
                    num(Some(e.writes_per_write), 3),
                    num(Some(e.flushes_per_flush), 2)
                )
            });
            let _ = write!(s, " {e} |");
        }
        let _ = writeln!(
            s,
            " {} | {:.1} | {}–{} |",
            num(c.cpu_us, 1),
            c.rss_kib as f64 / 1024.0,
            fmt_value(c.min, w.bandwidth),
            fmt_value(c.max, w.bandwidth),
        );
    }
    s
}

pub struct Goal {
    pub text: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

/// The project's goals that this storage setting can check.
pub fn goals(r: &Results, storage: &str) -> Vec<Goal> {
    let mut g = Vec::new();
    let mut ratio = |text: String, w: &str, fvd: Target, t: Target, min: f64| {
        let v = r.ratio(w, fvd, t);
        g.push(Goal {
            text,
            value: v,
            met: v.map(|x| x >= min),
        });
    };
    use Target::*;
    for fvd in [Fvd, FvdFlat] {
        let f = fvd.name();
        if storage == "tmpfs" {
            let w = "randread-4k-qd32";
            ratio(format!("{w}: {f} ≥ 1.3× qsd-raw"), w, fvd, QsdRaw, 1.3);
            ratio(format!("{w}: {f} ≥ 2× qsd-qcow2"), w, fvd, QsdQcow2, 2.0);
        } else {
            for w in ["randread-4k-qd32", "seqread-1m-qd4", "seqwrite-1m-qd4"] {
                ratio(format!("{w}: {f} ≥ 0.97× fio-raw"), w, fvd, Fio, 0.97);
            }
        }
        let w = "alloc-4k-flush32";
        ratio(format!("{w}: {f} ≥ 3.5× qsd-qcow2"), w, fvd, QsdQcow2, 3.5);
        ratio(format!("{w}: {f} ≥ 3.5× img-qcow2"), w, fvd, ImgQcow2, 3.5);
        ratio(format!("{w}: {f} ≥ 0.8× qsd-raw"), w, fvd, QsdRaw, 0.8);
        ratio(format!("{w}: {f} ≥ 0.8× img-raw"), w, fvd, ImgRaw, 0.8);
        let w = "locality-seqread-1m";
        ratio(format!("{w}: {f} ≥ 0.9× qsd-raw"), w, fvd, QsdRaw, 0.9);
        ratio(format!("{w}: {f} ≥ 0.9× fio-raw"), w, fvd, Fio, 0.9);
    }
    let mut at_most = |text: String, v: Option<f64>, max: f64| {
        g.push(Goal {
            text,
            value: v,
            met: v.map(|x| x <= max),
        })
    };
    for fvd in [Fvd, FvdFlat] {
        let f = fvd.name();
        for w in ["randwrite-4k-qd32", "randwrite-4k-flush32"] {
            let c = r.cell(w, fvd);
            at_most(
                format!("{w}: {f} host writes per guest write ≤ 1.02"),
                c.and_then(|c| c.amp).map(|a| a.writes_per_write),
                1.02,
            );
        }
        at_most(
            format!("randwrite-4k-flush32 (no allocation): {f} device flushes per FLUSH ≤ 1"),
            r.cell("randwrite-4k-flush32", fvd)
                .and_then(|c| c.amp)
                .map(|a| a.flushes_per_flush),
            1.0,
        );
        at_most(
            format!("alloc-4k-flush32 (allocating): {f} device flushes per FLUSH ≤ 2"),
            r.cell("alloc-4k-flush32", fvd)
                .and_then(|c| c.amp)
                .map(|a| a.flushes_per_flush),
            2.0,
        );
    }
    g
}

pub fn goal_table(g: &[Goal]) -> String {
    let mut s = String::from("| goal | measured | met |\n|---|---|---|\n");
    for x in g {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            x.text,
            x.value.map_or("–".into(), |v| format!("{v:.3}")),
            match x.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            }
        );
    }
    s
}
