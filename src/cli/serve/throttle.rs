//! `fvd serve`'s I/O limit options, named and meant as QEMU's throttling options
//! (`throttling.iops-total`, ... in `-drive`; `block_set_io_throttle` in QMP). Checked by
//! [`ThrottleConfig::validate`] when the server starts.

use crate::server::throttle::{Limit, ThrottleConfig};

/// I/O limits for the whole disk, shared by all queues. Requests over a limit wait; they
/// never fail. 0 (the default) leaves a limit unset.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "I/O limits (QEMU's throttling options)")]
pub struct ThrottleArgs {
    /// Bytes per second read and written together (K/M/G suffixes).
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_total: u64,
    /// Burst rate of --bps-total: up to this many per second for --bps-total-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_total_max: u64,
    /// Seconds a burst of --bps-total-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub bps_total_max_length: u64,
    /// Bytes per second read (K/M/G suffixes).
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_read: u64,
    /// Burst rate of --bps-read: up to this many per second for --bps-read-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_read_max: u64,
    /// Seconds a burst of --bps-read-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub bps_read_max_length: u64,
    /// Bytes per second written (K/M/G suffixes).
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_write: u64,
    /// Burst rate of --bps-write: up to this many per second for --bps-write-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub bps_write_max: u64,
    /// Seconds a burst of --bps-write-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub bps_write_max_length: u64,
    /// Requests per second read and written together.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_total: u64,
    /// Burst rate of --iops-total: up to this many per second for --iops-total-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_total_max: u64,
    /// Seconds a burst of --iops-total-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub iops_total_max_length: u64,
    /// Requests per second read.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_read: u64,
    /// Burst rate of --iops-read: up to this many per second for --iops-read-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_read_max: u64,
    /// Seconds a burst of --iops-read-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub iops_read_max_length: u64,
    /// Requests per second written.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_write: u64,
    /// Burst rate of --iops-write: up to this many per second for --iops-write-max-length
    /// seconds, after a quiet spell.
    #[arg(long, default_value = "0", value_name = "N")]
    pub iops_write_max: u64,
    /// Seconds a burst of --iops-write-max may last.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    pub iops_write_max_length: u64,
    /// Requests larger than this count as several for the iops limits (size / iops-size).
    #[arg(long, default_value = "0", value_name = "BYTES", value_parser = crate::cli::size_arg)]
    pub iops_size: u64,
}

impl ThrottleArgs {
    /// The limits, not yet checked.
    pub fn config(&self) -> ThrottleConfig {
        let l = |avg, max, max_length| Limit {
            avg,
            max,
            max_length,
        };
        ThrottleConfig {
            bps_total: l(
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            bps_read: l(self.bps_read, self.bps_read_max, self.bps_read_max_length),
            bps_write: l(
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
            iops_total: l(
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            iops_read: l(
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            iops_write: l(
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
            iops_size: self.iops_size,
        }
    }
}
