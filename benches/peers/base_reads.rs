//! Guest reads of a fresh overlay whose data is all in its base (issue 5's rows): how much
//! copy-on-read and background prefetch cost the guest while they pull base data into the image,
//! against the same overlay with neither, and against qemu-storage-daemon on a qcow2 overlay.

use crate::client::{Client, Job, Op, Pattern};
use crate::images::Images;
use crate::procs::run_tool;
use crate::report;
use crate::runners::Ctx;
use crate::workloads::{Format, Sizes, Target, K4, M1};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// One server configuration on a fresh overlay of the raw dataset.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Variant {
    /// fvd, neither copy-on-read nor prefetch: every read goes to the base.
    Plain,
    /// fvd --copy-on-read on.
    CopyOnRead,
    /// fvd --prefetch with the default adaptive throttle (pauses while the guest is busy).
    Prefetch,
    /// fvd --prefetch with the throttle off: prefetch competes with the guest at full speed.
    PrefetchUnthrottled,
    /// qemu-storage-daemon, qcow2 overlay with the raw file as backing file.
    QsdQcow2,
    /// The same under a copy-on-read filter node (QEMU's copy-on-read).
    QsdQcow2Cor,
}

const VARIANTS: [Variant; 6] = [
    Variant::Plain,
    Variant::CopyOnRead,
    Variant::Prefetch,
    Variant::PrefetchUnthrottled,
    Variant::QsdQcow2,
    Variant::QsdQcow2Cor,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "fvd (none)",
            Variant::CopyOnRead => "fvd copy-on-read",
            Variant::Prefetch => "fvd prefetch (adaptive)",
            Variant::PrefetchUnthrottled => "fvd prefetch (unthrottled)",
            Variant::QsdQcow2 => "qsd-qcow2 (backing file)",
            Variant::QsdQcow2Cor => "qsd-qcow2 copy-on-read",
        }
    }

    fn serve_args(self) -> &'static [&'static str] {
        match self {
            Variant::Plain => &["--no-prefetch", "--copy-on-read", "off"],
            Variant::CopyOnRead => &["--no-prefetch", "--copy-on-read", "on"],
            Variant::Prefetch => &["--prefetch", "--prefetch-delay", "0"],
            Variant::PrefetchUnthrottled => &[
                "--prefetch",
                "--prefetch-delay",
                "0",
                "--prefetch-rate",
                "64G",
                "--prefetch-busy-iops",
                "4000000000",
                "--prefetch-min-throughput",
                "0",
            ],
            Variant::QsdQcow2 => &[],
            Variant::QsdQcow2Cor => &["copy-on-read"],
        }
    }
}

struct Read {
    name: &'static str,
    /// 0: the guest sends nothing for the run time (shows what prefetch copies when idle).
    bs: u64,
    depth: usize,
    random: bool,
}

const READS: [Read; 3] = [
    Read {
        name: "randread-4k-qd32 (IOPS)",
        bs: K4,
        depth: 32,
        random: true,
    },
    Read {
        name: "seqread-1m-qd4 (MiB/s)",
        bs: M1,
        depth: 4,
        random: false,
    },
    Read {
        name: "idle guest",
        bs: 0,
        depth: 0,
        random: false,
    },
];

/// What one timed run measured.
struct Run {
    value: f64,
    /// Bytes of the base the image holds after the run (fvd only).
    copied: Option<u64>,
}

fn present_bytes(fvd: &Path, image: &Path) -> Result<u64, String> {
    let (out, _) = run_tool(
        Command::new(fvd)
            .args(["info", "--output", "json"])
            .arg(image),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("info: {e}"))?;
    v["fvd"]["present_bytes"]
        .as_u64()
        .ok_or_else(|| "fvd info: no present_bytes".to_string())
}

fn run_variant(
    ctx: &Ctx,
    imgs: &Images,
    sizes: &Sizes,
    v: Variant,
    r: &Read,
) -> Result<Run, String> {
    let base = imgs.data(Format::Raw);
    let (target, fmt) = if matches!(v, Variant::QsdQcow2 | Variant::QsdQcow2Cor) {
        (Target::QsdQcow2, Format::Qcow2)
    } else {
        (Target::Fvd, Format::Fvd { compact: true })
    };
    let image = imgs.create_overlay(fmt)?;
    let srv = ctx.start_server_with(target, &image, Some(&base), false, v.serve_args())?;
    let mut c = Client::connect(&srv.sock, 32, M1 as usize)?;
    let job = Job {
        op: Op::Read,
        bs: r.bs,
        depth: r.depth,
        pattern: if r.random {
            Pattern::Random
        } else {
            Pattern::Stride {
                start: 0,
                step: r.bs,
            }
        },
        region: sizes.data,
        count: u64::MAX,
        time: Some(sizes.time),
        flush_every: 0,
    };
    let value = if r.bs == 0 {
        std::thread::sleep(sizes.time);
        f64::NAN
    } else {
        let o = c.run(&job, 7)?;
        if r.random {
            o.iops()
        } else {
            o.mib_s()
        }
    };
    drop(c);
    srv.stop()?;
    let copied = match fmt {
        Format::Fvd { .. } => Some(present_bytes(&ctx.fvd, &image)?),
        _ => qcow2_allocated(&image).ok(),
    };
    let _ = std::fs::remove_file(&image);
    Ok(Run { value, copied })
}

/// Bytes a qcow2 image holds itself (`qemu-img map`: data not from the backing file).
fn qcow2_allocated(image: &Path) -> Result<u64, String> {
    let (out, _) = run_tool(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(image),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("map: {e}"))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true))
                .filter_map(|e| e["length"].as_u64())
                .sum()
        })
        .unwrap_or(0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs every variant `sizes.reps` times, interleaved, and returns the markdown section and
/// the runs that failed.
pub fn run(storage: &str, ctx: &Ctx, imgs: &Images, sizes: &Sizes) -> (String, Vec<String>) {
    let mut samples: HashMap<(usize, Variant), Vec<Run>> = HashMap::new();
    let mut errors = Vec::new();
    for rep in 0..sizes.reps {
        for (ri, r) in READS.iter().enumerate() {
            let mut order = VARIANTS.to_vec();
            order.rotate_left(rep % VARIANTS.len());
            for v in order {
                match run_variant(ctx, imgs, sizes, v, r) {
                    Ok(run) => {
                        eprintln!(
                            "[{storage} rep {rep}] base {:<24} {:<28} {:>10.1} copied {}",
                            r.name,
                            v.name(),
                            run.value,
                            run.copied
                                .map_or("-".into(), |b| format!("{} MiB", b >> 20))
                        );
                        samples.entry((ri, v)).or_default().push(run);
                    }
                    Err(e) => errors.push(format!("{} {}: {e}", r.name, v.name())),
                }
            }
        }
    }
    let mut md = format!(
        "Guest reads of a fresh overlay whose {} GiB are all in its raw base (median of {}; \
         in parentheses ÷ fvd without copy-on-read or prefetch; \"copied\": MiB of the base \
         the image holds after the {} s run):\n\n",
        sizes.data >> 30,
        sizes.reps,
        sizes.time.as_secs_f64()
    );
    md.push_str(&report::table_header(
        "workload",
        VARIANTS.iter().map(|v| v.name()),
    ));
    for (ri, r) in READS.iter().enumerate() {
        let med = |v: Variant| {
            samples
                .get(&(ri, v))
                .filter(|s| !s.is_empty())
                .map(|s| median(s.iter().map(|x| x.value).collect()))
        };
        let plain = med(Variant::Plain);
        let _ = write!(md, "| {} |", r.name);
        for v in VARIANTS {
            let Some(m) = med(v) else {
                md.push_str(" – |");
                continue;
            };
            let fig = if m.is_nan() {
                "–".to_string()
            } else if m >= 1000.0 && r.random {
                format!("{:.1}k", m / 1000.0)
            } else {
                format!("{m:.0}")
            };
            let ratio = match plain {
                Some(p) if v != Variant::Plain && p > 0.0 && !m.is_nan() => {
                    format!(" ({:.2}×)", m / p)
                }
                _ => String::new(),
            };
            let copied = samples
                .get(&(ri, v))
                .and_then(|s| {
                    let c: Vec<f64> = s
                        .iter()
                        .filter_map(|x| x.copied)
                        .map(|b| b as f64)
                        .collect();
                    (!c.is_empty()).then(|| median(c))
                })
                .filter(|_| v != Variant::Plain)
                .map_or(String::new(), |b| format!(", copied {:.0}", b / M1 as f64));
            let _ = write!(md, " {fig}{ratio}{copied} |");
        }
        md.push('\n');
    }
    for e in &errors {
        let _ = writeln!(md, "\nError: {e}");
    }
    (md, errors)
}
