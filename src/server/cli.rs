//! `fvd serve`: command-line arguments and the entry point.

use super::{attach_hints, ServeConfig, ServeError, Server};
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
    /// Image to serve (FVD or raw file/block device, probed unless -f).
    pub image: PathBuf,
    /// Image format. Give it: a probed raw image refuses guest writes that would make it look
    /// like an FVD image.
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<crate::cli::ImageFormat>,
    /// vhost-user unix socket to listen on. Optional when the service manager passes the
    /// listening socket (socket activation, e.g. packaging/fvd@.socket): then it may only name
    /// that socket's path, and the socket file is left in place at exit.
    #[arg(long)]
    pub socket: Option<PathBuf>,
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
    /// Permissions of the socket file, in octal (a passed socket keeps the mode its manager
    /// gave it: SocketMode= in the socket unit).
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Exit after the first frontend disconnects.
    #[arg(long)]
    pub once: bool,
    /// Log filter (error, warn, info, debug, trace or a tracing directive); default: RUST_LOG or warn.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Prefetch the base image in the background (default: the image's setting, see `fvd amend`).
    #[arg(long, overrides_with = "no_prefetch")]
    pub prefetch: bool,
    /// Do not prefetch, whatever the image says.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Seconds to wait after start before prefetching.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub prefetch_delay: f64,
    /// Prefetch bandwidth limit per second (K/M/G suffixes).
    #[arg(long, default_value = "32M", value_parser = crate::cli::size_arg, value_name = "SIZE")]
    pub prefetch_rate: u64,
    /// Guest requests per second above which prefetching pauses.
    #[arg(long, default_value_t = 500)]
    pub prefetch_busy_iops: u64,
    /// Prefetch throughput (per second) below which the storage counts as contended and
    /// prefetching backs off.
    #[arg(long, default_value = "1M", value_parser = crate::cli::size_arg, value_name = "SIZE")]
    pub prefetch_min_throughput: u64,
    /// Copy data read from the base into the image (default: the image's setting).
    #[arg(long, value_enum, value_name = "on|off")]
    pub copy_on_read: Option<crate::cli::OnOff>,
    /// Command that grows the image's block device when free space falls under
    /// --grow-watermark; `{unit}`, `{unit_bytes}` and `{device}` are substituted,
    /// e.g. 'lvextend -L +{unit} {device}'.
    #[arg(long, value_name = "CMD")]
    pub grow_cmd: Option<String>,
    /// How much to grow by, as the grow command expects it (`{unit}`).
    #[arg(long, default_value = "5G", requires = "grow_cmd")]
    pub grow_unit: String,
    /// Free space below which the grow command runs.
    #[arg(long, default_value = "1G", value_parser = crate::cli::size_arg, requires = "grow_cmd")]
    pub grow_watermark: u64,
    /// Seconds a write waits for space when the device is full before it fails with an I/O error.
    #[arg(
        long,
        default_value_t = 60.0,
        value_name = "SECS",
        requires = "grow_cmd"
    )]
    pub grow_timeout: f64,
    /// Seconds an NBD base server may take to answer a read; then the read fails with an I/O
    /// error and the connection is re-established. 0: wait forever.
    #[arg(long, default_value_t = crate::io::nbd::DEFAULT_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    pub base_timeout: f64,
    /// Seconds during which reads wait for a lost NBD base server to come back (then they fail
    /// until it is back; reconnecting goes on in the background). 0: fail at once.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub base_reconnect_delay: f64,
    /// Signal the guest after each completed request instead of once per batch (for measuring
    /// the signalling policy; batching is faster).
    #[arg(long, hide = true)]
    pub signal_each_completion: bool,
    /// System call filters per server thread: `on` kills the server on a call outside its
    /// thread's list, `log` only has the kernel log it (to find missing ones), `off` installs none.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off|log")]
    pub seccomp: super::seccomp::SeccompMode,
    /// How a first write into part of a block zeroes the rest: `auto` makes a hole on files and
    /// writes the zeros on block devices, `punch` uses fallocate (WRITE ZEROES on a block device)
    /// everywhere, `write` writes the zeros everywhere.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "auto|punch|write"
    )]
    pub zero_ranges: crate::engine::storage::ZeroRanges,
    #[command(flatten)]
    pub throttle: Box<super::throttle_cli::ThrottleArgs>,
}

fn secs(v: f64, what: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{what} must be a non-negative number of seconds"))
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
    // First, while the process has one thread: it edits the environment.
    let inherited = super::activation::take().map_err(ServeError::from)?;
    let socket = match &inherited {
        Some(sock) => {
            super::activation::check_socket_arg(a.socket.as_deref(), &sock.path)
                .map_err(ServeError::from)?;
            sock.path.clone()
        }
        None => a.socket.ok_or_else(|| {
            anyhow::anyhow!(
                "--socket PATH is required (unless a service manager passes the listening \
                 socket: LISTEN_FDS)"
            )
        })?,
    };
    let cfg = ServeConfig {
        image: a.image,
        format: a.format.map(Into::into),
        socket,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        read_only: a.readonly,
        serial: a.serial,
        socket_mode: a.socket_mode,
        once: a.once,
        prefetch: if a.prefetch {
            Some(true)
        } else if a.no_prefetch {
            Some(false)
        } else {
            None
        },
        prefetch_config: crate::engine::prefetch::PrefetchConfig {
            start_delay: secs(a.prefetch_delay, "--prefetch-delay")?,
            rate: a.prefetch_rate,
            busy_iops: a.prefetch_busy_iops,
            min_throughput: a.prefetch_min_throughput,
            ..Default::default()
        },
        signal_each_completion: a.signal_each_completion,
        nbd: crate::io::nbd::NbdOptions {
            timeout: Some(secs(a.base_timeout, "--base-timeout")?).filter(|t| !t.is_zero()),
            reconnect_delay: secs(a.base_reconnect_delay, "--base-reconnect-delay")?,
        },
        seccomp: a.seccomp,
        zero_ranges: a.zero_ranges,
        throttle: a.throttle.config(),
        copy_on_read: a.copy_on_read.map(|v| v == crate::cli::OnOff::On),
        grow: match a.grow_cmd {
            None => None,
            Some(command) => Some(super::background::GrowConfig {
                unit_bytes: crate::units::parse_size(&a.grow_unit)
                    .map_err(|e| anyhow::anyhow!("--grow-unit: {e}"))?,
                unit: a.grow_unit,
                command,
                watermark: a.grow_watermark,
                timeout: secs(a.grow_timeout, "--grow-timeout")?,
            }),
        },
    };
    let server = match inherited {
        Some(sock) => {
            tracing::info!(
                "serving on the socket passed by the service manager: {}{}",
                sock.path.display(),
                sock.name
                    .as_deref()
                    .map_or(String::new(), |n| format!(" (name {n})"))
            );
            Server::bind_inherited(cfg.clone(), sock)?
        }
        None => Server::bind(cfg.clone())?,
    };
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
