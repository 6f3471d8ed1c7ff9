//! `fvd serve`'s metrics endpoint option (flattened into `ServeArgs`).

use crate::server::metrics::{parse_addr, MetricsAddr};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (GET /metrics) on ADDR: a unix socket path (created with mode
    /// 0600) or a loopback TCP address such as 127.0.0.1:9100 or [::1]:9100.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<MetricsAddr>,
}
