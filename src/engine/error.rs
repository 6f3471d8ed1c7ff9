//! Engine errors. I/O errors keep their errno so the server can log it and the tools can print it,
//! and the operation that failed as a kind, so that callers decide on it, never on message text.

use super::problem::Problem;
use crate::format::FormatError;
use std::io;

/// The kind of I/O operation an [`EngineError::Io`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Open,
    /// Reading the size of a file or device.
    Size,
    Read,
    Write,
    /// A device flush (fdatasync): after a failure nothing written since the last one is known
    /// to be durable.
    Flush,
    /// Writing zeros (fallocate zero-range, or writing them).
    Zero,
    /// Punching a hole (discard).
    Punch,
    /// Growing a file.
    Grow,
    /// Connecting to an NBD server.
    Connect,
}

/// Why a new chunk could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoSpace {
    #[error("all {chunks} chunks of the device are in use")]
    DeviceFull { chunks: u64 },
    #[error("chunk index space exhausted")]
    ChunkIndex,
    #[error("device has {have} bytes; this image needs at least {need}")]
    DeviceTooSmall { have: u64, need: u64 },
}

/// What is wrong with an image that cannot be opened as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("physical chunk {phys} is mapped twice (by virtual chunks {first} and {second})")]
    ChunkMappedTwice {
        phys: u32,
        first: usize,
        second: usize,
    },
    #[error(
        "the storage is {len} bytes, shorter than the metadata and journal it must hold (the \
         data area starts at {data_offset}): truncated"
    )]
    StorageTruncated { len: u64, data_offset: u64 },
    #[error("device has {have} bytes, the image needs {need}")]
    DeviceTooSmall { have: u64, need: u64 },
    #[error("journal epoch {epoch} cannot be advanced")]
    EpochExhausted { epoch: u64 },
    /// Journal records follow damage a torn write cannot explain.
    #[error("{damage}; 'fvd check --repair' drops the records after sector {tail}")]
    JournalDamage { damage: Problem, tail: u64 },
    /// The metadata is inconsistent; `first` of `1 + more` problems.
    #[error("{first} (and {more} more); run 'fvd check --repair'")]
    Problems { first: Problem, more: usize },
}

/// Parameters (of a create or an open) that make no valid image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidParams {
    #[error("block or chunk size too large")]
    SizeTooLarge,
    #[error("base image path is longer than {max} bytes")]
    BasePathTooLong { max: usize },
    /// The header the parameters make fails its checks; `why` is the format's reason.
    #[error("{why}")]
    Header { why: String },
    #[error("base image given does not match the header")]
    BaseMismatch,
    #[error("base chain deeper than {max} (a loop?)")]
    BaseChainTooDeep { max: usize },
    #[error("base {uri}: only raw images can be used over NBD")]
    NbdBaseNotRaw { uri: String },
    #[error("maximum size {max_size} must lie between the size ({size}) and 64 PiB")]
    MaxSize { max_size: u64, size: u64 },
}

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{context}: {error}")]
    Io {
        op: IoOp,
        /// What was being done, for messages.
        context: &'static str,
        error: io::Error,
    },
    /// A device flush failed earlier: what is durable is unknown, so the image refuses writes
    /// until it is reopened (and its journal replayed).
    #[error("image failed after a flush error; reopen it")]
    Failed,
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "request [{offset}, +{len}) is outside the disk ({size} bytes) or not 512-byte aligned"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the image is open read-only")]
    ReadOnly,
    #[error("no space left in the image's storage for a new chunk ({0})")]
    NoSpace(NoSpace),
    #[error("corrupt image: {0}")]
    Corrupt(Corruption),
    #[error("invalid parameters: {0}")]
    Invalid(InvalidParams),
    #[error("the image is closed")]
    Closed,
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
    #[error(transparent)]
    Resize(ResizeRefused),
}

/// Why a resize was refused (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum ResizeRefused {
    #[error(
        "{size} bytes is more than the image's metadata can describe ({capacity} bytes, set at \
         create by --max-size; an image made before --max-size existed holds its size rounded \
         up to its last metadata sector)"
    )]
    Capacity { size: u64, capacity: u64 },
    #[error(
        "the new size {size} is smaller than the current {current} bytes: shrinking needs --shrink"
    )]
    ShrinkNeeded { size: u64, current: u64 },
    #[error(
        "data is allocated at offset {offset}, past the new end {size}: shrinking would lose it \
         (discard it first)"
    )]
    Allocated { offset: u64, size: u64 },
    #[error(
        "the new size {size} is smaller than the current {current} bytes: a disk in use cannot \
         shrink (stop the server and use fvd resize --shrink)"
    )]
    ShrinkInUse { size: u64, current: u64 },
    #[error("a raw disk in use is not resized by fvd (stop the server and use fvd resize)")]
    RawInUse,
    #[error("size must be a non-zero multiple of 512 bytes, not {0}")]
    BadSize(u64),
    #[error("the block device holds {have} bytes, the image needs {need} at the new size")]
    DeviceTooSmall { have: u64, need: u64 },
}

impl EngineError {
    /// The errno that best describes this error (for logs and completions).
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::Io { error, .. } => error.raw_os_error().unwrap_or(libc::EIO),
            EngineError::Failed => libc::EIO,
            EngineError::Format(_) | EngineError::Corrupt(_) => libc::EUCLEAN,
            EngineError::OutOfRange { .. } | EngineError::Invalid(_) | EngineError::Closed => {
                libc::EINVAL
            }
            EngineError::ReadOnly => libc::EROFS,
            EngineError::NoSpace(_) => libc::ENOSPC,
            EngineError::NotFvd | EngineError::Truncated { .. } => libc::EUCLEAN,
            // As QEMU's raw driver: the guest sees an I/O error.
            EngineError::ProbedRawMagic => libc::EPERM,
            EngineError::BaseTooSmall { .. } | EngineError::BaseShrank { .. } => libc::EIO,
            EngineError::Resize(ResizeRefused::DeviceTooSmall { .. }) => libc::ENOSPC,
            EngineError::Resize(_) => libc::EINVAL,
        }
    }
}

impl EngineError {
    /// An I/O error of operation `op`; `context` says what was being done.
    pub(crate) fn io(op: IoOp, context: &'static str) -> impl FnOnce(io::Error) -> EngineError {
        move |error| EngineError::Io { op, context, error }
    }

    /// The I/O operation this error comes from, if it is an I/O error.
    pub fn io_op(&self) -> Option<IoOp> {
        match self {
            EngineError::Io { op, .. } => Some(*op),
            _ => None,
        }
    }
}

/// Attaches the operation and a static context to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: IoOp, context: &'static str) -> std::result::Result<T, EngineError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: IoOp, context: &'static str) -> std::result::Result<T, EngineError> {
        self.map_err(EngineError::io(op, context))
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
