//! The commands of the control socket: QEMU's names and reply shapes where the meaning matches
//! (qapi/block-core.json, qapi/job.json, qapi/control.json), `x-fvd-` ones for fvd's own.

use super::protocol::{self, QmpError};
use super::DEVICE_NAME;
use crate::engine::Disk;
use crate::server::background::{JobError, PREFETCH_JOB};
use crate::server::handle::ServerHandle;
use crate::server::throttle::{Limit, ThrottleConfig};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;

/// Every command, in `query-commands` order.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-block",
    "query-blockstats",
    "query-block-jobs",
    "block-job-pause",
    "block-job-resume",
    "block-job-set-speed",
    "block-job-cancel",
    "block_resize",
    "block_set_io_throttle",
    "x-fvd-copy-on-read",
    "x-fvd-flush",
    "quit",
];

/// A command's arguments, checked as QEMU checks them: unknown ones and wrong types are errors.
struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Refuses arguments outside `allowed`.
    fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Args<'a>, QmpError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        Ok(Args { map })
    }

    fn missing(name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' is missing"))
    }

    fn wrong(name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    fn str(&self, name: &str) -> Result<Option<&'a str>, QmpError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::wrong(name, "string")),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::wrong(name, "boolean")),
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Self::wrong(name, "integer")),
        }
    }

    fn req<T>(v: Option<T>, name: &str) -> Result<T, QmpError> {
        v.ok_or_else(|| Self::missing(name))
    }
}

/// Runs command `name` (capabilities negotiation is the connection's business, see
/// `super::Client`). `quit` only answers here; the caller stops the server once the reply is
/// out.
pub fn execute(h: &ServerHandle, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    match name {
        "query-commands" => {
            Args::new(args, &[])?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            ))
        }
        "query-version" => {
            Args::new(args, &[])?;
            Ok(protocol::version())
        }
        "query-block" => {
            Args::new(args, &["flat"])?;
            Ok(json!([query_block(h)]))
        }
        "query-blockstats" => {
            Args::new(args, &["query-nodes"])?;
            Ok(json!([{
                "device": DEVICE_NAME,
                "node-name": DEVICE_NAME,
                "stats": block_stats(h),
            }]))
        }
        "query-block-jobs" => {
            Args::new(args, &[])?;
            Ok(Value::Array(query_block_jobs(h)))
        }
        "block-job-pause" | "block-job-resume" | "block-job-cancel" => {
            let a = Args::new(args, &["device", "force"])?;
            let device = Args::req(a.str("device")?, "device")?;
            if name != "block-job-cancel" && a.map.contains_key("force") {
                return Err(QmpError::generic("Parameter 'force' is unexpected"));
            }
            a.bool("force")?;
            job(device)?;
            let j = &h.prefetch;
            let r = match name {
                "block-job-pause" => j.pause(),
                "block-job-resume" => j.resume(),
                _ => j.cancel(),
            };
            r.map_err(|e| job_error(device, e))?;
            Ok(json!({}))
        }
        "block-job-set-speed" => {
            let a = Args::new(args, &["device", "speed"])?;
            let device = Args::req(a.str("device")?, "device")?;
            let speed = Args::req(a.int("speed")?, "speed")?;
            job(device)?;
            let speed = u64::try_from(speed)
                .map_err(|_| QmpError::generic("Parameter 'speed' expects a non-negative value"))?;
            h.prefetch
                .set_speed(speed)
                .map_err(|e| job_error(device, e))?;
            Ok(json!({}))
        }
        "block_resize" => {
            let a = Args::new(args, &["device", "node-name", "size"])?;
            disk_named(a.str("device")?, a.str("node-name")?)?;
            let size = Args::req(a.int("size")?, "size")?;
            let size = u64::try_from(size)
                .map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
            h.resize(size)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(json!({}))
        }
        "block_set_io_throttle" => {
            let mut allowed = vec!["device", "id", "iops_size", "group"];
            allowed.extend(THROTTLE_FIELDS.iter().flat_map(|f| f.names));
            let a = Args::new(args, &allowed)?;
            disk_named(a.str("device")?, a.str("id")?)?;
            a.str("group")?;
            let cfg = throttle_config(&a)?;
            h.set_throttle(cfg)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(json!({}))
        }
        "x-fvd-copy-on-read" => {
            let a = Args::new(args, &["enable"])?;
            let enable = Args::req(a.bool("enable")?, "enable")?;
            let Disk::Fvd(img) = &*h.disk else {
                return Err(QmpError::generic(
                    "copy-on-read needs an FVD image with a base image",
                ));
            };
            img.set_copy_on_read(enable);
            if img.copy_on_read() != enable {
                return Err(QmpError::generic(
                    "copy-on-read needs a writable FVD image with a base image",
                ));
            }
            Ok(json!({}))
        }
        "x-fvd-flush" => {
            Args::new(args, &[])?;
            h.control
                .block_on(h.disk.flush(h.control.io()))
                .map_err(|e| QmpError::generic(format!("flush failed: {e}")))?;
            Ok(json!({}))
        }
        "quit" => {
            Args::new(args, &[])?;
            Ok(json!({}))
        }
        _ => Err(QmpError::not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}

/// The disk a command names (QEMU's `device`, or its `node-name` / qdev `id`): one of them,
/// and it must be ours.
fn disk_named(device: Option<&str>, other: Option<&str>) -> Result<(), QmpError> {
    match device.or(other) {
        Some(DEVICE_NAME) => Ok(()),
        Some(d) => Err(QmpError::generic(format!("Device '{d}' not found"))),
        None => Err(QmpError::generic(
            "Need exactly one of 'device' and 'node-name'",
        )),
    }
}

/// One throttle limit as QMP's `BlockIOThrottle` names it (`bps`, `bps_max`,
/// `bps_max_length`, ...), and where it goes in [`ThrottleConfig`].
struct ThrottleField {
    names: [&'static str; 3],
    limit: fn(&mut ThrottleConfig) -> &mut Limit,
    get: fn(&ThrottleConfig) -> &Limit,
}

const THROTTLE_FIELDS: [ThrottleField; 6] = [
    ThrottleField {
        names: ["bps", "bps_max", "bps_max_length"],
        limit: |c| &mut c.bps_total,
        get: |c| &c.bps_total,
    },
    ThrottleField {
        names: ["bps_rd", "bps_rd_max", "bps_rd_max_length"],
        limit: |c| &mut c.bps_read,
        get: |c| &c.bps_read,
    },
    ThrottleField {
        names: ["bps_wr", "bps_wr_max", "bps_wr_max_length"],
        limit: |c| &mut c.bps_write,
        get: |c| &c.bps_write,
    },
    ThrottleField {
        names: ["iops", "iops_max", "iops_max_length"],
        limit: |c| &mut c.iops_total,
        get: |c| &c.iops_total,
    },
    ThrottleField {
        names: ["iops_rd", "iops_rd_max", "iops_rd_max_length"],
        limit: |c| &mut c.iops_read,
        get: |c| &c.iops_read,
    },
    ThrottleField {
        names: ["iops_wr", "iops_wr_max", "iops_wr_max_length"],
        limit: |c| &mut c.iops_write,
        get: |c| &c.iops_write,
    },
];

/// `block_set_io_throttle`'s arguments as a configuration: the six rates are required (as in
/// QEMU), bursts and their lengths optional (length 1 s by default).
fn throttle_config(a: &Args) -> Result<ThrottleConfig, QmpError> {
    let value = |name: &str| -> Result<Option<u64>, QmpError> {
        match a.int(name)? {
            None => Ok(None),
            Some(v) => u64::try_from(v).map(Some).map_err(|_| {
                QmpError::generic("bps/iops/max values must be within [0, 1000000000000000]")
            }),
        }
    };
    let mut cfg = ThrottleConfig::default();
    for f in &THROTTLE_FIELDS {
        let [avg, max, len] = f.names;
        let l = (f.limit)(&mut cfg);
        l.avg = Args::req(value(avg)?, avg)?;
        l.max = value(max)?.unwrap_or(0);
        l.max_length = value(len)?.unwrap_or(1);
    }
    cfg.iops_size = value("iops_size")?.unwrap_or(0);
    Ok(cfg)
}

/// The limits in `query-block`'s `inserted`, as QEMU's BlockDeviceInfo names them.
fn throttle_info(cfg: &ThrottleConfig, into: &mut Value) {
    for f in &THROTTLE_FIELDS {
        let [avg, max, len] = f.names;
        let l = (f.get)(cfg);
        into[avg] = json!(l.avg);
        into[max] = json!(l.max);
        into[len] = json!(l.max_length);
    }
    into["iops_size"] = json!(cfg.iops_size);
}

fn job(device: &str) -> Result<(), QmpError> {
    if device == PREFETCH_JOB {
        Ok(())
    } else {
        Err(QmpError::generic(format!("Block job '{device}' not found")))
    }
}

fn job_error(device: &str, e: JobError) -> QmpError {
    match e {
        JobError::NotRunning => QmpError::generic(format!("Block job '{device}' not found")),
        e => QmpError::generic(format!("Block job '{device}': {e}")),
    }
}

/// `query-block`'s one entry (QEMU's BlockInfo with BlockDeviceInfo in `inserted`, the I/O
/// limits in it as `block_set_io_throttle` sets them).
fn query_block(h: &ServerHandle) -> Value {
    let i = &h.info;
    let file = i.image.display().to_string();
    let cor = match &*h.disk {
        Disk::Fvd(img) => img.copy_on_read(),
        Disk::Raw(_) => false,
    };
    let mut image = json!({
        "filename": file,
        "format": i.format,
        // Current: `block_resize` changes it.
        "virtual-size": h.disk.virtual_size(),
        "dirty-flag": false,
    });
    let mut inserted = json!({
        "file": file,
        "node-name": DEVICE_NAME,
        "ro": i.device.read_only,
        "drv": i.format,
        "backing_file_depth": u32::from(i.base.is_some()),
        "encrypted": false,
        "detect_zeroes": "off",
        "write_threshold": 0,
        "cache": {"writeback": i.device.writeback, "direct": true, "no-flush": false},
        "x-fvd-copy-on-read": cor,
        "x-fvd-block-size": i.device.block_size,
        "x-fvd-optimal-io-size": i.device.optimal_io,
    });
    throttle_info(&h.throttle(), &mut inserted);
    if let Some(b) = &i.base {
        inserted["backing_file"] = json!(b);
        image["backing-filename"] = json!(b);
    }
    inserted["image"] = image;
    json!({
        "device": DEVICE_NAME,
        "type": "unknown",
        "removable": false,
        "locked": false,
        "io-status": "ok",
        "inserted": inserted,
        "x-fvd-frontend-connected": h.frontend.load(Ordering::Relaxed),
    })
}

/// The `stats` of `query-blockstats`: the whole disk's requests under QEMU's `BlockDeviceStats`
/// names (`server::stats`), each queue's under `x-fvd-queues`, and the engine's counters under
/// `x-fvd-engine`.
pub fn block_stats(h: &ServerHandle) -> Value {
    let s = h.stats();
    let mut v = serde_json::to_value(&s.device).unwrap_or_else(|_| json!({}));
    v["x-fvd-queues"] = serde_json::to_value(&s.queues).unwrap_or_default();
    v["x-fvd-engine"] = serde_json::to_value(s.engine.counters).unwrap_or_default();
    v["x-fvd-virtual-size"] = json!(s.engine.virtual_size);
    v["x-fvd-base-remaining-bytes"] = json!(s.engine.base_remaining_bytes);
    v["x-fvd-free-bytes"] = json!(s.engine.free_bytes);
    v
}

/// `query-block-jobs`: the prefetch while it runs (QEMU's BlockJobInfo; type `stream`: it copies
/// the base into the image as block-stream does).
fn query_block_jobs(h: &ServerHandle) -> Vec<Value> {
    let Some(j) = h.prefetch.info() else {
        return Vec::new();
    };
    vec![json!({
        "type": "stream",
        "device": PREFETCH_JOB,
        "id": PREFETCH_JOB,
        "len": j.len,
        "offset": j.offset,
        "x-fvd-remaining": j.len.saturating_sub(j.offset),
        "busy": j.busy,
        "paused": j.paused,
        "speed": j.speed,
        "io-status": "ok",
        "ready": false,
        "status": if j.paused { "paused" } else { "running" },
        "auto-finalize": true,
        "auto-dismiss": true,
    })]
}
