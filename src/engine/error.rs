//! Engine errors. I/O errors keep their errno so the server can log it and the tools can print it.

use crate::format::FormatError;
use std::io;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{context}: {error}")]
    Io {
        context: &'static str,
        error: io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "request [{offset}, +{len}) is outside the disk ({size} bytes) or not 512-byte aligned"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the image is open read-only")]
    ReadOnly,
    #[error("no space left in the image's storage for a new chunk ({0})")]
    NoSpace(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("invalid parameters: {0}")]
    Invalid(String),
    #[error("not an FVD image (no FVD magic in either header slot)")]
    NotFvd,
    #[error("truncated FVD image: {size} bytes, but an FVD image holds at least 8192")]
    Truncated { size: u64 },
    #[error(
        "write refused: it would put the FVD magic into a header slot of this raw image, whose \
         format was probed (name the format: -f raw)"
    )]
    ProbedRawMagic,
    #[error(
        "base image {path} is {size} bytes, smaller than the {recorded} bytes recorded in the \
         image: it was truncated or replaced"
    )]
    BaseTooSmall {
        path: String,
        size: u64,
        recorded: u64,
    },
    #[error("base image shrank to {size} bytes while in use: [{offset}, +{len}) is past its end")]
    BaseShrank { size: u64, offset: u64, len: u64 },
}

impl EngineError {
    /// The errno that best describes this error (for logs and completions).
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::Io { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
            EngineError::Format(_) | EngineError::Corrupt(_) => libc::EUCLEAN,
            EngineError::OutOfRange { .. } | EngineError::Invalid(_) => libc::EINVAL,
            EngineError::ReadOnly => libc::EROFS,
            EngineError::NoSpace(_) => libc::ENOSPC,
            EngineError::NotFvd | EngineError::Truncated { .. } => libc::EUCLEAN,
            // As QEMU's raw driver: the guest sees an I/O error.
            EngineError::ProbedRawMagic => libc::EPERM,
            EngineError::BaseTooSmall { .. } | EngineError::BaseShrank { .. } => libc::EIO,
        }
    }
}

/// Attaches a static context to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: &'static str) -> std::result::Result<T, EngineError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: &'static str) -> std::result::Result<T, EngineError> {
        self.map_err(|error| EngineError::Io { context, error })
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
