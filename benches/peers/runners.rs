//! Measuring one workload on one target: vhost-user servers through the blkio client, and the
//! in-process references (qemu-img bench, fio) with the same sizes, depths and flush interval.

use crate::client::{Client, Job, Op, Outcome, Pattern};
use crate::fvd_stats;
use crate::procs::{run_tool, thread_cpu_secs, IoCounter, Server};
use crate::workloads::{Format, Kind, Plan, Target, Workload, IMG_RANDOM_STEP, M1};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Host I/O caused per guest request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Amp {
    pub writes_per_write: f64,
    /// NaN when the job sent no FLUSH.
    pub flushes_per_flush: f64,
    pub fallocates_per_write: f64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// IOPS or MiB/s, per the workload.
    pub value: f64,
    /// Peak RSS of the server or tool, KiB.
    pub rss_kib: u64,
    /// Server CPU time per request, microseconds (vhost-user servers only).
    pub cpu_us: Option<f64>,
    /// All CPU time per request, microseconds: client + server, or the whole tool process.
    pub total_cpu_us: Option<f64>,
    /// Counted by perf on the server process (counting runs only).
    pub amp: Option<Amp>,
    /// From fvd's engine counters, when the server exposes them (counting runs only).
    pub engine_amp: Option<Amp>,
}

pub struct Ctx {
    pub fvd: PathBuf,
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub warmup: Duration,
    /// qemu-img bench is count-based: counts that last about the run time, per (workload, target).
    pub img_counts: HashMap<(String, Target), u64>,
    /// Count the servers' host I/O with perf in counting runs (fvd's engine counters are read
    /// either way).
    pub perf: bool,
    /// Extra arguments of every `fvd serve` (`--serve-args`).
    pub serve_args: Vec<String>,
}

fn figure(w: &Workload, o: &Outcome) -> f64 {
    if w.bandwidth {
        o.mib_s()
    } else {
        o.iops()
    }
}

impl Ctx {
    /// Measures `w` on `t`, whose image is `image` (`base`: the raw base of an overlay).
    pub fn run(
        &mut self,
        w: &Workload,
        t: Target,
        plan: &Plan,
        image: &Path,
        base: Option<&Path>,
        count_io: bool,
    ) -> Result<Sample, String> {
        match t {
            Target::Fvd | Target::FvdFlat | Target::QsdRaw | Target::QsdQcow2 => {
                self.run_vhost(w, t, plan, image, base, count_io)
            }
            Target::ImgRaw | Target::ImgQcow2 => self.run_img(w, t, plan, image),
            Target::Fio => self.run_fio(w, plan, image),
        }
    }

    /// Starts `t`'s server on `image`; `info_log` makes fvd log its engine counters.
    pub fn start_server(
        &self,
        t: Target,
        image: &Path,
        base: Option<&Path>,
        info_log: bool,
    ) -> Result<Server, String> {
        self.start_server_with(t, image, base, info_log, &[])
    }

    /// [`Ctx::start_server`] with extra `fvd serve` arguments. qemu-storage-daemon understands
    /// only `copy-on-read` there: a copy-on-read filter node on top of the exported node.
    pub fn start_server_with(
        &self,
        t: Target,
        image: &Path,
        base: Option<&Path>,
        info_log: bool,
        fvd_args: &[&str],
    ) -> Result<Server, String> {
        let sock = self.dir.join(format!("{}.sock", t.name()));
        let log = self.logs.join(format!("{}.log", t.name()));
        match t.format() {
            Format::Fvd { .. } => {
                let mut c = Command::new(&self.fvd);
                // One queue, like the qemu-storage-daemon exports (the client uses one anyway).
                c.arg("serve").arg(image).arg("--socket").arg(&sock);
                c.args(["--num-queues", "1"]);
                if info_log {
                    c.args(["--log-level", "info"]);
                }
                c.args(fvd_args);
                c.args(&self.serve_args);
                Server::start(c, &sock, &log)
            }
            f => {
                let file = |node: &str, path: &Path, ro: bool| {
                    let block = std::fs::metadata(path).is_ok_and(|m| {
                        std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())
                    });
                    format!(
                        "driver={},node-name={node},filename={},cache.direct=on,aio=io_uring{}",
                        if block { "host_device" } else { "file" },
                        path.display(),
                        if ro { ",read-only=on" } else { "" }
                    )
                };
                let mut c = Command::new("qemu-storage-daemon");
                let mut export_node = "f";
                c.arg("--blockdev").arg(file("f", image, false));
                if f == Format::Qcow2 {
                    let mut q = "driver=qcow2,node-name=q,file=f".to_string();
                    if let Some(b) = base {
                        c.arg("--blockdev").arg(file("b", b, true));
                        q.push_str(",backing=b");
                    }
                    c.arg("--blockdev").arg(q);
                    export_node = "q";
                }
                if fvd_args.contains(&"copy-on-read") {
                    c.arg("--blockdev").arg(format!(
                        "driver=copy-on-read,node-name=cor,file={export_node}"
                    ));
                    export_node = "cor";
                }
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name={export_node},addr.type=unix,\
                     addr.path={},writable=on,num-queues=1",
                    sock.display()
                ));
                Server::start(c, &sock, &log)
            }
        }
    }

    fn run_vhost(
        &mut self,
        w: &Workload,
        t: Target,
        plan: &Plan,
        image: &Path,
        base: Option<&Path>,
        count_io: bool,
    ) -> Result<Sample, String> {
        let engine = count_io && matches!(t.format(), Format::Fvd { .. });
        let srv = self.start_server(t, image, base, engine)?;
        let mut c = Client::connect(&srv.sock, 32, M1 as usize)?;
        for j in &plan.prepare {
            c.run(j, 1)?;
        }
        if w.kind == Kind::Steady {
            let warm = Job {
                time: Some(self.warmup),
                ..plan.measure.clone()
            };
            c.run(&warm, 2)?;
        }
        // fvd logs its cumulative counters when a frontend disconnects: reconnect once so that
        // the measured job sits between two counter lines.
        let engine0 = if engine {
            drop(c);
            let v = fvd_stats::wait_for(srv.log_path(), 1)?;
            c = Client::connect(&srv.sock, 32, M1 as usize)?;
            Some(v)
        } else {
            None
        };
        let counter = if count_io && self.perf {
            Some(IoCounter::attach(srv.pid(), &self.logs.join("perf.txt"))?)
        } else {
            None
        };
        let cpu0 = srv.cpu_secs();
        let client0 = thread_cpu_secs();
        let o = c.run(&plan.measure, 3)?;
        let client = thread_cpu_secs() - client0;
        let cpu = srv.cpu_secs() - cpu0;
        let host = counter.map(IoCounter::finish).transpose()?;
        drop(c);
        let engine1 = if engine {
            Some(fvd_stats::wait_for(srv.log_path(), 2)?)
        } else {
            None
        };
        let per = |n: u64, d: u64| {
            if d == 0 {
                f64::NAN
            } else {
                n as f64 / d as f64
            }
        };
        let amp = host.map(|h| Amp {
            writes_per_write: per(h.writes, o.ops),
            flushes_per_flush: per(h.flushes, o.flushes),
            fallocates_per_write: per(h.fallocates, o.ops),
        });
        let engine_amp = match (engine0, engine1) {
            (Some(a), Some(b)) => Some(Amp {
                writes_per_write: per(
                    b.host_writes - a.host_writes,
                    b.guest_writes - a.guest_writes,
                ),
                // The window also holds the flush fvd does at disconnect: shown only for jobs
                // that sent FLUSHes themselves.
                flushes_per_flush: if o.flushes == 0 {
                    f64::NAN
                } else {
                    per(
                        b.host_flushes - a.host_flushes,
                        b.guest_flushes - a.guest_flushes,
                    )
                },
                fallocates_per_write: f64::NAN,
            }),
            _ => None,
        };
        let rss_kib = srv.vm_hwm_kib();
        srv.stop()?;
        Ok(Sample {
            value: figure(w, &o),
            rss_kib,
            cpu_us: Some(cpu * 1e6 / o.ops.max(1) as f64),
            total_cpu_us: Some((cpu + client) * 1e6 / o.ops.max(1) as f64),
            amp,
            engine_amp,
        })
    }

    fn img_cmd(fmt: &str, j: &Job, count: u64, image: &Path) -> Command {
        let (start, step) = match j.pattern {
            Pattern::Random => (0, IMG_RANDOM_STEP),
            Pattern::Stride { start, step } => (start, step),
        };
        let mut c = Command::new("qemu-img");
        c.args(["bench", "-q", "-f", fmt, "-t", "none", "-i", "io_uring"]);
        c.args(["-d", &j.depth.to_string(), "-s", &j.bs.to_string()]);
        c.args(["-c", &count.to_string(), "-o", &start.to_string()]);
        c.args(["-S", &step.to_string(), "--pattern=165"]);
        if j.op == Op::Write {
            c.arg("-w");
        }
        if j.flush_every > 0 {
            c.arg(format!("--flush-interval={}", j.flush_every));
        }
        c.arg(image);
        c
    }

    /// Runs one qemu-img bench job; returns its duration and CPU time in seconds.
    fn img_job(fmt: &str, j: &Job, count: u64, image: &Path) -> Result<(f64, f64), String> {
        let (out, cpu) = run_tool(&mut Self::img_cmd(fmt, j, count, image))?;
        // "Run completed in 0.481 seconds."
        let secs = out
            .split("Run completed in ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("qemu-img bench output not understood: {out}"))?;
        Ok((secs, cpu))
    }

    fn run_img(
        &mut self,
        w: &Workload,
        t: Target,
        plan: &Plan,
        image: &Path,
    ) -> Result<Sample, String> {
        let fmt = if t == Target::ImgRaw { "raw" } else { "qcow2" };
        for j in &plan.prepare {
            Self::img_job(fmt, j, j.count, image)?;
        }
        let j = &plan.measure;
        let count = match j.time {
            None => j.count,
            Some(time) => {
                let key = (w.name.to_string(), t);
                let n = match self.img_counts.get(&key) {
                    Some(n) => *n,
                    None => {
                        // Calibrate (this also warms up): a short run gives the rate.
                        let probe = if j.bs >= M1 { 500 } else { 20_000 };
                        let (secs, _) = Self::img_job(fmt, j, probe, image)?;
                        (probe as f64 / secs * time.as_secs_f64()) as u64
                    }
                };
                n.max(1000)
            }
        };
        let (secs, cpu) = Self::img_job(fmt, j, count, image)?;
        if let Some(time) = j.time {
            let rate = count as f64 / secs;
            self.img_counts
                .insert((w.name.to_string(), t), (rate * time.as_secs_f64()) as u64);
        }
        let o = Outcome {
            ops: count,
            bytes: count * j.bs,
            flushes: 0,
            secs,
        };
        Ok(Sample {
            value: figure(w, &o),
            total_cpu_us: Some(cpu * 1e6 / count as f64),
            ..Sample::default()
        })
    }

    fn fio_cmd(&self, j: &Job, image: &Path) -> Command {
        let mut c = Command::new("fio");
        c.args([
            "--name=bench",
            "--direct=1",
            "--ioengine=io_uring",
            "--output-format=json",
        ]);
        c.arg(format!("--filename={}", image.display()));
        c.arg(format!("--bs={}", j.bs));
        c.arg(format!("--iodepth={}", j.depth));
        let dir = if j.op == Op::Read { "read" } else { "write" };
        match j.pattern {
            Pattern::Random => {
                c.arg(format!("--rw=rand{dir}"));
                c.arg(format!("--size={}", j.region));
            }
            Pattern::Stride { start, step } => {
                if step > j.bs {
                    c.arg(format!("--rw={dir}:{}", step - j.bs));
                } else {
                    c.arg(format!("--rw={dir}"));
                }
                c.arg(format!("--offset={start}"));
                c.arg(format!("--size={}", j.region - start));
            }
        }
        match j.time {
            Some(t) => {
                c.arg(format!("--runtime={}ms", t.as_millis()));
                // No ramp time: its I/O would count in the CPU time but not in the figures.
                c.arg("--time_based");
            }
            None => {
                c.arg(format!("--number_ios={}", j.count));
                // Bytes transferred (skips excluded); more than `size` wraps around.
                c.arg(format!("--io_size={}", j.count * j.bs));
            }
        }
        if j.flush_every > 0 {
            c.arg(format!("--fdatasync={}", j.flush_every));
        }
        c
    }

    fn run_fio(&mut self, w: &Workload, plan: &Plan, image: &Path) -> Result<Sample, String> {
        for j in &plan.prepare {
            run_tool(&mut self.fio_cmd(j, image))?;
        }
        let (out, cpu) = run_tool(&mut self.fio_cmd(&plan.measure, image))?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("fio json: {e}: {}", &out[..out.len().min(200)]))?;
        let d = &v["jobs"][0][if w.op == Op::Read { "read" } else { "write" }];
        let value = if w.bandwidth {
            d["bw_bytes"].as_f64().unwrap_or(0.0) / M1 as f64
        } else {
            d["iops"].as_f64().unwrap_or(0.0)
        };
        let ios = d["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
        Ok(Sample {
            value,
            total_cpu_us: Some(cpu * 1e6 / ios),
            ..Sample::default()
        })
    }
}
