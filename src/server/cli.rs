//! `fvd serve`: command-line arguments and the entry point.

use super::{attach_hints, ServeConfig, Server};
use std::io::Write;
use std::path::PathBuf;

/// Default queue count: one per host CPU (each queue is a thread with its own io_uring, so more
/// queues than CPUs only adds contention), capped at 4 because a few rings with batched
/// submission already keep a device busy and every queue costs a thread and a ring.
pub fn default_num_queues() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u16)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Image to serve (FVD or raw file/block device, probed).
    pub image: PathBuf,
    /// vhost-user unix socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// Queues offered (each served by its own thread); default: host CPUs, at most 4.
    #[arg(long, default_value_t = default_num_queues(), value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest queue size the frontend may use (power of two).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Serve read-only (the guest sees VIRTIO_BLK_F_RO; writes fail).
    #[arg(long, alias = "read-only")]
    pub readonly: bool,
    /// Serial number the guest reads (GET_ID), at most 20 bytes; default: the image's name.
    #[arg(long, value_parser = parse_serial)]
    pub serial: Option<String>,
    /// Permissions of the socket file, in octal.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Exit after the first frontend disconnects.
    #[arg(long)]
    pub once: bool,
    /// Log filter (error, warn, info, debug, trace or a tracing directive); default: RUST_LOG or warn.
    #[arg(long)]
    pub log_level: Option<String>,
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!(
            "{} bytes; virtio-blk serials are at most 20",
            s.len()
        ));
    }
    Ok(s.to_string())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal permission mode (e.g. 0600)")),
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig {
        image: a.image,
        socket: a.socket,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        read_only: a.readonly,
        serial: a.serial,
        socket_mode: a.socket_mode,
        once: a.once,
    };
    let server = Server::bind(cfg.clone())?;
    let d = server.device();
    let mut out = std::io::stdout().lock();
    // Write errors (a closed stdout) must not stop the server.
    let _ = write!(
        out,
        "fvd: serving {} ({} bytes{}) on {}\n{}",
        cfg.image.display(),
        d.capacity,
        if d.read_only { ", read-only" } else { "" },
        cfg.socket.display(),
        attach_hints(&cfg.socket, cfg.num_queues, cfg.queue_size)
    );
    let _ = out.flush();
    drop(out);
    server.run()?;
    Ok(())
}
