//! The commands of the control socket: QEMU's names and reply shapes where the meaning matches
//! (qapi/block-core.json, qapi/job.json, qapi/control.json), `x-fvd-` ones for fvd's own.
//!
//! `block_resize` and `block_set_io_throttle` are not here: unknown commands get
//! `CommandNotFound`, as QEMU answers them.

use super::protocol::{self, QmpError};
use super::DEVICE_NAME;
use crate::engine::Disk;
use crate::server::background::{JobError, PREFETCH_JOB};
use crate::server::handle::ServerHandle;
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

/// `query-block`'s one entry (QEMU's BlockInfo with BlockDeviceInfo in `inserted`; throttle
/// fields are zero: no limits).
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
        "virtual-size": i.device.capacity,
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
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": i.device.writeback, "direct": true, "no-flush": false},
        "x-fvd-copy-on-read": cor,
        "x-fvd-block-size": i.device.block_size,
        "x-fvd-optimal-io-size": i.device.optimal_io,
    });
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
