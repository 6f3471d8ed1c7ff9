//! The `fvd` command-line tool (qemu-img conventions). Errors are printed as one line
//! (`fvd: <what>: <why>`) with a non-zero exit status.

/// `println!` into a `String` report (formatting into memory cannot fail); [`emit`] prints it.
macro_rules! outln {
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

pub(crate) mod amend;
pub use amend::OnOff;
mod check;
mod convert;
mod create;
mod ctl;
mod info;
mod map;
mod resize;
pub mod serve;
mod stream;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// `fvd --version`: the crate version and the git commit it was built from (see build.rs).
pub const VERSION: &str = env!("FVD_VERSION");

#[derive(Parser)]
#[command(
    name = "fvd",
    version = VERSION,
    about = "FVD images and their vhost-user-blk server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an FVD image (file or block device).
    Create(create::Args),
    /// Show an image's format, sizes, features and allocation.
    Info(InspectArgs),
    /// Check an image's metadata; --repair fixes what it finds.
    Check(check::Args),
    /// Show which ranges are in the image, in the base image, or zero.
    Map(InspectArgs),
    /// Convert an image (raw or FVD, probed) to FVD or raw.
    Convert(convert::Args),
    /// Change image features (copy-on-read, prefetch).
    Amend(amend::Args),
    /// Change an image's size: SIZE, +SIZE or -SIZE (shrinking needs --shrink).
    Resize(resize::Args),
    /// Copy every block of the base image into the image, with a progress bar.
    Stream(stream::StreamArgs),
    /// Detach the base image once the image no longer needs it.
    Rebase(stream::RebaseArgs),
    /// Serve an image to a VM over a vhost-user-blk socket.
    Serve(Box<serve::ServeArgs>),
    /// Run one command on a running server's QMP control socket (`fvd serve --control`).
    Ctl(ctl::Args),
}

/// The whole command line (every subcommand), for generating man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// The arguments of the inspecting commands (`info`, `map`).
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Image file or block device.
    image: std::path::PathBuf,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long, value_enum)]
    format: Option<ImageFormat>,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Open without locking, to inspect an image a server has open (may be slightly stale).
    #[arg(short = 'U', long)]
    force_share: bool,
}

/// `--output` of the inspecting commands.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

/// `-f/--format` of every command that opens an image (qemu-img spelling). Without it the format
/// is probed, and a raw image opened writable refuses writes that would make it probe as FVD.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    Fvd,
    Raw,
}

impl From<ImageFormat> for crate::engine::Format {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Fvd => crate::engine::Format::Fvd,
            ImageFormat::Raw => crate::engine::Format::Raw,
        }
    }
}

/// For the commands that only work on FVD images: refuses `-f raw` with a clear error.
pub fn require_fvd(cmd: &str, format: Option<ImageFormat>) -> anyhow::Result<()> {
    if format == Some(ImageFormat::Raw) {
        anyhow::bail!("fvd {cmd} works on FVD images only, not on raw ones (-f raw)");
    }
    Ok(())
}

/// Read-only open mode, unlocked with --force-share.
pub fn ro_mode(force_share: bool) -> crate::io::host_file::OpenMode {
    if force_share {
        crate::io::host_file::OpenMode::ReadOnlyShared
    } else {
        crate::io::host_file::OpenMode::ReadOnly
    }
}

/// Standard output could not be written. A closed pipe (`fvd map img | head -1`) ends the
/// command quietly with status 141, as a SIGPIPE death would in a shell; other errors are
/// reported.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output: {0}")]
pub struct OutputError(#[source] std::io::Error);

/// Exit status for a reader that went away, as the shell reports a SIGPIPE death.
const EXIT_PIPE_CLOSED: i32 = 128 + libc::SIGPIPE;

/// Prints a command's report on standard output.
pub fn emit(report: &str) -> Result<(), OutputError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(report.as_bytes())
        .and_then(|()| out.flush())
        .map_err(OutputError)
}

/// A line on standard error. Its errors are ignored: there is nowhere left to report them.
pub fn warn_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Parses a qemu-img style size for clap.
pub fn size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s)
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return 0;
            }
            // One line: clap's first line without its usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            warn_line(format_args!("fvd: {}", first.trim_start_matches("error: ")));
            return 2;
        }
    };
    init_logging(match &cli.command {
        Command::Serve(a) => a.log_level.as_deref(),
        _ => None,
    });
    let r = match cli.command {
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Map(a) => map::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Amend(a) => amend::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Stream(a) => stream::stream(a),
        Command::Rebase(a) => stream::rebase(a),
        Command::Serve(a) => serve::run(*a).map(|()| 0),
        Command::Ctl(a) => ctl::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            if let Some(o) = e.downcast_ref::<OutputError>() {
                if o.0.kind() == std::io::ErrorKind::BrokenPipe {
                    return EXIT_PIPE_CLOSED;
                }
            }
            warn_line(format_args!("fvd: {e:#}"));
            1
        }
    }
}

/// Logs to stderr; `RUST_LOG` or `level` pick the level. Also routes the `log` crate (used by
/// rust-vmm crates) into tracing so their errors are not lost.
pub fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(l) => tracing_subscriber::EnvFilter::new(l),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    let _ = tracing_log::LogTracer::init();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
