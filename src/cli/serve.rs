//! `fvd serve`: its command-line arguments, and the [`ServeConfig`] they make. The server
//! (`crate::server`) knows nothing of clap: every value here is checked and converted by
//! `ServeConfig::try_from`.

mod control;
mod metrics;
mod throttle;

use super::{size_arg, ImageFormat, OnOff};
use crate::engine::prefetch::PrefetchConfig;
use crate::engine::storage::ZeroRanges;
use crate::io::nbd::NbdOptions;
use crate::server::background::GrowConfig;
use crate::server::seccomp::SeccompMode;
use crate::server::{attach_hints, ServeConfig, ServeError, Server};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

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
    pub format: Option<ImageFormat>,
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
    #[arg(long, default_value = "32M", value_parser = size_arg, value_name = "SIZE")]
    pub prefetch_rate: u64,
    /// Guest requests per second above which prefetching pauses.
    #[arg(long, default_value_t = 500)]
    pub prefetch_busy_iops: u64,
    /// Prefetch throughput (per second) below which the storage counts as contended and
    /// prefetching backs off.
    #[arg(long, default_value = "1M", value_parser = size_arg, value_name = "SIZE")]
    pub prefetch_min_throughput: u64,
    /// Copy data read from the base into the image (default: the image's setting).
    #[arg(long, value_enum, value_name = "on|off")]
    pub copy_on_read: Option<OnOff>,
    /// Command that grows the image's block device when free space falls under
    /// --grow-watermark; `{unit}`, `{unit_bytes}` and `{device}` are substituted,
    /// e.g. 'lvextend -L +{unit} {device}'.
    #[arg(long, value_name = "CMD")]
    pub grow_cmd: Option<String>,
    /// How much to grow by, as the grow command expects it (`{unit}`).
    #[arg(long, default_value = "5G", requires = "grow_cmd")]
    pub grow_unit: String,
    /// Free space below which the grow command runs.
    #[arg(long, default_value = "1G", value_parser = size_arg, requires = "grow_cmd")]
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
    /// Seconds to wait for the image's lock if another process holds it: a server restarted
    /// right after a crash or a kill finds it held until the old process's I/O in flight has
    /// completed. A second server on the same image fails after this wait.
    #[arg(long, default_value_t = crate::server::DEFAULT_LOCK_WAIT.as_secs_f64(), value_name = "SECS")]
    pub lock_wait: f64,
    /// Signal the guest after each completed request instead of once per batch (for measuring
    /// the signalling policy; batching is faster).
    #[arg(long, hide = true)]
    pub signal_each_completion: bool,
    /// System call filters per server thread: `on` kills the server on a call outside its
    /// thread's list, `log` only has the kernel log it (to find missing ones), `off` installs none.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off|log")]
    pub seccomp: SeccompArg,
    /// How a first write into part of a block zeroes the rest: `auto` makes a hole on files and
    /// writes the zeros on block devices, `punch` uses fallocate (WRITE ZEROES on a block device)
    /// everywhere, `write` writes the zeros everywhere.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "auto|punch|write"
    )]
    pub zero_ranges: ZeroRangesArg,
    #[command(flatten)]
    pub control: control::ControlArgs,
    #[command(flatten)]
    pub metrics: metrics::MetricsArgs,
    #[command(flatten)]
    pub throttle: throttle::ThrottleArgs,
}

/// `--seccomp`: what happens to a system call outside a thread's allow-list.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompArg {
    /// Kill the process.
    On,
    /// Install no filter.
    Off,
    /// Allow the call and have the kernel log it (SECCOMP_RET_LOG).
    Log,
}

impl From<SeccompArg> for SeccompMode {
    fn from(a: SeccompArg) -> Self {
        match a {
            SeccompArg::On => SeccompMode::On,
            SeccompArg::Off => SeccompMode::Off,
            SeccompArg::Log => SeccompMode::Log,
        }
    }
}

/// `--zero-ranges`: how a first write into part of a block zeroes the rest.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroRangesArg {
    /// Without writing on files (a hole), by writing zeros on block devices: there a WRITE
    /// ZEROES beside the data write made allocating writes 3.5x slower on a loop-device LV than
    /// writing the block whole with zeros merged in, and halved later sequential reads of it
    /// (docs/PERFORMANCE.md, "Logical volumes").
    Auto,
    /// fallocate(PUNCH_HOLE) on files and block devices alike (devices whose WRITE ZEROES is
    /// cheap).
    Punch,
    /// Zeros merged into the block's one write, on files too.
    Write,
}

impl From<ZeroRangesArg> for ZeroRanges {
    fn from(a: ZeroRangesArg) -> Self {
        match a {
            ZeroRangesArg::Auto => ZeroRanges::Auto,
            ZeroRangesArg::Punch => ZeroRanges::Punch,
            ZeroRangesArg::Write => ZeroRanges::Write,
        }
    }
}

/// `fvd serve` arguments clap accepted but that make no valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ServeArgsError {
    #[error("{option} must be a non-negative number of seconds")]
    Seconds { option: &'static str },
    #[error("--grow-unit: {0}")]
    GrowUnit(String),
    #[error(transparent)]
    Config(#[from] ServeError),
}

fn secs(v: f64, option: &'static str) -> Result<Duration, ServeArgsError> {
    Duration::try_from_secs_f64(v).map_err(|_| ServeArgsError::Seconds { option })
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

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ServeArgsError;

    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let cfg = ServeConfig {
            image: a.image,
            format: a.format.map(Into::into),
            socket: a.socket,
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
            prefetch_config: PrefetchConfig {
                start_delay: secs(a.prefetch_delay, "--prefetch-delay")?,
                rate: a.prefetch_rate,
                busy_iops: a.prefetch_busy_iops,
                min_throughput: a.prefetch_min_throughput,
                ..Default::default()
            },
            signal_each_completion: a.signal_each_completion,
            lock_wait: secs(a.lock_wait, "--lock-wait")?,
            nbd: NbdOptions {
                timeout: Some(secs(a.base_timeout, "--base-timeout")?).filter(|t| !t.is_zero()),
                reconnect_delay: secs(a.base_reconnect_delay, "--base-reconnect-delay")?,
            },
            seccomp: a.seccomp.into(),
            zero_ranges: a.zero_ranges.into(),
            control: a.control.config(),
            metrics: a.metrics.metrics,
            throttle: a.throttle.config(),
            copy_on_read: a.copy_on_read.map(|v| v == OnOff::On),
            grow: match a.grow_cmd {
                None => None,
                Some(command) => Some(GrowConfig {
                    unit_bytes: crate::units::parse_size(&a.grow_unit)
                        .map_err(ServeArgsError::GrowUnit)?,
                    unit: a.grow_unit,
                    command,
                    watermark: a.grow_watermark,
                    timeout: secs(a.grow_timeout, "--grow-timeout")?,
                }),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig::try_from(a)?;
    let server = Server::start(cfg)?;
    let (cfg, d) = (server.config(), server.device());
    let mut out = std::io::stdout().lock();
    // Write errors (a closed stdout) must not stop the server.
    let metrics = server.metrics_addr().map_or(String::new(), |m| {
        format!("fvd: metrics at {m} (GET /metrics)\n")
    });
    let _ = write!(
        out,
        "fvd: serving {} ({} bytes{}) on {}\n{metrics}{}",
        cfg.image.display(),
        d.capacity,
        if d.read_only { ", read-only" } else { "" },
        server.socket().display(),
        attach_hints(server.socket(), cfg.num_queues, cfg.queue_size)
    );
    let _ = out.flush();
    drop(out);
    server.run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let argv = ["serve", "img.fvd"].iter().chain(extra);
        Cmd::try_parse_from(argv).map(|c| c.serve)
    }

    fn config(extra: &[&str]) -> Result<ServeConfig, ServeArgsError> {
        ServeConfig::try_from(args(extra).expect("clap accepts these arguments"))
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.image, PathBuf::from("img.fvd"));
        assert_eq!(c.format, None);
        assert_eq!(c.socket, None, "may come from the service manager");
        assert_eq!(c.num_queues, default_num_queues());
        assert!((1..=4).contains(&c.num_queues));
        assert_eq!(c.queue_size, 256);
        assert!(!c.read_only);
        assert_eq!(c.serial, None);
        assert_eq!(c.socket_mode, 0o600);
        assert!(!c.once);
        assert_eq!(c.prefetch, None, "the image's setting");
        let p = &c.prefetch_config;
        assert_eq!(p.start_delay, Duration::from_secs(5));
        assert_eq!(p.rate, 32 << 20);
        assert_eq!(p.busy_iops, 500);
        assert_eq!(p.min_throughput, 1 << 20);
        let engine = PrefetchConfig::default();
        assert_eq!(
            (p.backoff, p.max_backoff, p.step_blocks),
            (engine.backoff, engine.max_backoff, engine.step_blocks)
        );
        assert_eq!(c.copy_on_read, None, "the image's setting");
        assert!(c.grow.is_none());
        assert!(!c.signal_each_completion);
        assert_eq!(c.nbd, NbdOptions::default());
        assert_eq!(c.seccomp, SeccompMode::On);
        assert_eq!(c.zero_ranges, ZeroRanges::Auto);
    }

    #[test]
    fn every_option_reaches_the_config() {
        let c = config(&[
            "-f",
            "raw",
            "--socket",
            "/run/x.sock",
            "--num-queues",
            "3",
            "--queue-size",
            "128",
            "--read-only",
            "--serial",
            "disk-7",
            "--socket-mode",
            "0o640",
            "--once",
            "--log-level",
            "debug",
            "--no-prefetch",
            "--prefetch-delay",
            "1.5",
            "--prefetch-rate",
            "4M",
            "--prefetch-busy-iops",
            "77",
            "--prefetch-min-throughput",
            "64K",
            "--copy-on-read",
            "off",
            "--grow-cmd",
            "grow {unit}",
            "--grow-unit",
            "2G",
            "--grow-watermark",
            "512M",
            "--grow-timeout",
            "3",
            "--base-timeout",
            "0",
            "--base-reconnect-delay",
            "7",
            "--signal-each-completion",
            "--seccomp",
            "log",
            "--zero-ranges",
            "write",
        ])
        .unwrap();
        assert_eq!(c.format, Some(crate::engine::Format::Raw));
        assert_eq!(c.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!((c.num_queues, c.queue_size), (3, 128));
        assert!(c.read_only && c.once && c.signal_each_completion);
        assert_eq!(c.serial.as_deref(), Some("disk-7"));
        assert_eq!(c.socket_mode, 0o640);
        assert_eq!(c.prefetch, Some(false));
        let p = &c.prefetch_config;
        assert_eq!(p.start_delay, Duration::from_millis(1500));
        assert_eq!(
            (p.rate, p.busy_iops, p.min_throughput),
            (4 << 20, 77, 64 << 10)
        );
        assert_eq!(c.copy_on_read, Some(false));
        let g = c.grow.unwrap();
        assert_eq!(g.command, "grow {unit}");
        assert_eq!((g.unit.as_str(), g.unit_bytes), ("2G", 2 << 30));
        assert_eq!(g.watermark, 512 << 20);
        assert_eq!(g.timeout, Duration::from_secs(3));
        assert_eq!(c.nbd.timeout, None, "0: wait forever");
        assert_eq!(c.nbd.reconnect_delay, Duration::from_secs(7));
        assert_eq!(c.seccomp, SeccompMode::Log);
        assert_eq!(c.zero_ranges, ZeroRanges::Write);
        assert_eq!(
            args(&["--log-level", "debug"])
                .unwrap()
                .log_level
                .as_deref(),
            Some("debug")
        );
    }

    #[test]
    fn grow_defaults_apply_with_a_command() {
        let g = config(&["--grow-cmd", "x"]).unwrap().grow.unwrap();
        assert_eq!((g.unit.as_str(), g.unit_bytes), ("5G", 5 << 30));
        assert_eq!(g.watermark, 1 << 30);
        assert_eq!(g.timeout, Duration::from_secs(60));
    }

    #[test]
    fn prefetch_flags_last_one_wins() {
        assert_eq!(config(&["--prefetch"]).unwrap().prefetch, Some(true));
        assert_eq!(config(&["--no-prefetch"]).unwrap().prefetch, Some(false));
        assert_eq!(
            config(&["--no-prefetch", "--prefetch"]).unwrap().prefetch,
            Some(true)
        );
        assert_eq!(
            config(&["--prefetch", "--no-prefetch"]).unwrap().prefetch,
            Some(false)
        );
    }

    #[test]
    fn copy_on_read_on_and_base_timeout() {
        let c = config(&["--copy-on-read", "on", "--base-timeout", "2.5"]).unwrap();
        assert_eq!(c.copy_on_read, Some(true));
        assert_eq!(c.nbd.timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn lock_wait_defaults_to_the_servers_and_takes_seconds() {
        let c = config(&[]).unwrap();
        assert_eq!(c.lock_wait, crate::server::DEFAULT_LOCK_WAIT);
        let c = config(&["--lock-wait", "0.25"]).unwrap();
        assert_eq!(c.lock_wait, Duration::from_millis(250));
    }

    #[test]
    fn seconds_must_be_non_negative_numbers() {
        for (opt, extra) in [
            ("--prefetch-delay", &["--prefetch-delay=-1"][..]),
            ("--base-timeout", &["--base-timeout=-0.5"]),
            ("--base-reconnect-delay", &["--base-reconnect-delay=NaN"]),
            ("--grow-timeout", &["--grow-cmd", "x", "--grow-timeout=inf"]),
            ("--lock-wait", &["--lock-wait=-1"]),
        ] {
            match config(extra) {
                Err(e @ ServeArgsError::Seconds { option }) => {
                    assert_eq!(option, opt);
                    assert_eq!(
                        e.to_string(),
                        format!("{opt} must be a non-negative number of seconds")
                    );
                }
                other => panic!("{extra:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn grow_unit_must_be_a_size() {
        let e = config(&["--grow-cmd", "x", "--grow-unit", "5Q"]).unwrap_err();
        assert!(matches!(e, ServeArgsError::GrowUnit(_)), "{e:?}");
        assert!(e.to_string().starts_with("--grow-unit: "), "{e}");
    }

    #[test]
    fn queue_size_must_suit_a_virtqueue() {
        for q in ["100", "2", "0"] {
            let e = config(&["--queue-size", q]).unwrap_err();
            assert!(
                matches!(e, ServeArgsError::Config(ServeError::QueueSize(n)) if n.to_string() == q),
                "{q}: {e:?}"
            );
        }
        for q in ["4", "32768"] {
            assert!(config(&["--queue-size", q]).is_ok(), "{q}");
        }
    }

    #[test]
    fn clap_rejects_bad_values() {
        for extra in [
            &["--num-queues", "0"][..],
            &["--num-queues", "65"],
            &["--queue-size", "65536"],
            &["--serial", "123456789012345678901"],
            &["--socket-mode", "0800"],
            &["--socket-mode", "rw"],
            &["--prefetch-rate", "lots"],
            &["--seccomp", "maybe"],
            &["--zero-ranges", "trim"],
            &["--copy-on-read", "yes"],
            &["-f", "qcow2"],
            // The grow options only mean something with a command.
            &["--grow-unit", "1G"],
            &["--grow-watermark", "1G"],
            &["--grow-timeout", "1"],
        ] {
            assert!(args(extra).is_err(), "{extra:?}");
        }
        assert!(args(&[]).is_ok());
        assert!(
            Cmd::try_parse_from(["serve"]).is_err(),
            "the image is required"
        );
        let a = args(&["--num-queues", "64", "--serial", "12345678901234567890"]).unwrap();
        assert_eq!((a.num_queues, a.serial.unwrap().len()), (64, 20));
    }

    #[test]
    fn value_enums_map_one_to_one() {
        use clap::ValueEnum;
        let modes: Vec<SeccompMode> = SeccompArg::value_variants()
            .iter()
            .map(|&v| v.into())
            .collect();
        assert_eq!(modes, [SeccompMode::On, SeccompMode::Off, SeccompMode::Log]);
        let zero: Vec<ZeroRanges> = ZeroRangesArg::value_variants()
            .iter()
            .map(|&v| v.into())
            .collect();
        assert_eq!(
            zero,
            [ZeroRanges::Auto, ZeroRanges::Punch, ZeroRanges::Write]
        );
    }

    #[test]
    fn server_config_checks_serial_and_queues() {
        let mut c = config(&[]).unwrap();
        c.serial = Some("x".repeat(21));
        assert!(matches!(c.validate(), Err(ServeError::Serial(21))));
        c.serial = None;
        c.num_queues = 0;
        assert!(matches!(c.validate(), Err(ServeError::NumQueues(0))));
        c.num_queues = 64;
        assert!(c.validate().is_ok());
    }
}
