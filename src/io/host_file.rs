//! Files and block devices on the host, opened with O_DIRECT and locked against a second writer.

use super::{Growth, IoFile};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An open host file or block device, shared between I/O channels.
#[derive(Clone, Debug)]
pub struct HostFile(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    block_device: bool,
    read_only: bool,
    align: u32,
    mem_align: u32,
    /// Regular file on a file system where reserving space is cheap (see [`Growth::Reserved`]);
    /// cleared if the file system refuses.
    reserve: AtomicBool,
}

/// The error inside the [`io::Error`] (kind `WouldBlock`) of an open refused because another
/// open file description holds a conflicting lock: callers tell it by type, not by message.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by another process (locked{})", path.display(), waited_for(*waited))]
pub struct Locked {
    pub path: PathBuf,
    /// How long the open waited for the lock before giving up.
    pub waited: Duration,
}

/// The wait, in the message, when it was longer than the usual short retry.
fn waited_for(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("; waited {:.1} s", d.as_secs_f64())
    } else {
        String::new()
    }
}

/// How to open a host file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    /// Read-only without taking the lock (qemu-img's --force-share): to inspect an image that a
    /// server has open. What is read may be slightly stale.
    ReadOnlyShared,
    ReadWrite,
    /// Create (or truncate) a regular file, or open an existing block device, read-write.
    Create,
}

impl OpenMode {
    pub fn for_read_only(read_only: bool) -> OpenMode {
        if read_only {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite
        }
    }
}

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x80081272;

impl HostFile {
    /// Opens `path` with O_DIRECT. Read-write opens take an exclusive OFD lock and read-only
    /// opens a shared one, so a second writer gets a clear error instead of corrupting the image.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<HostFile> {
        Self::open_with(path, mode, true)
    }

    /// Like [`HostFile::open`], choosing whether to use O_DIRECT (tests of filesystems that lack it).
    pub fn open_with(path: &Path, mode: OpenMode, direct: bool) -> io::Result<HostFile> {
        Self::open_locking(path, mode, direct, LOCK_RETRY_FOR)
    }

    /// Like [`HostFile::open`], waiting up to `lock_wait` (at least half a second) for a lock
    /// that another process holds. A server started right after its predecessor was killed
    /// needs this: the kernel keeps the old open file, and its lock, until the I/O the old
    /// process left in flight has completed (io_uring requests outlive their process), which
    /// under load can take longer than the process took to die.
    pub fn open_waiting(path: &Path, mode: OpenMode, lock_wait: Duration) -> io::Result<HostFile> {
        Self::open_locking(path, mode, true, lock_wait.max(LOCK_RETRY_FOR))
    }

    fn open_locking(
        path: &Path,
        mode: OpenMode,
        direct: bool,
        lock_wait: Duration,
    ) -> io::Result<HostFile> {
        let mut o = OpenOptions::new();
        o.read(true);
        let read_only = matches!(mode, OpenMode::ReadOnly | OpenMode::ReadOnlyShared);
        if !read_only {
            o.write(true);
        }
        if mode == OpenMode::Create {
            let is_bdev = std::fs::metadata(path)
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false);
            if !is_bdev {
                o.create(true).truncate(true);
            }
        }
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        o.custom_flags(flags);
        let file = o.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let locked = if mode == OpenMode::ReadOnlyShared {
            Ok(())
        } else {
            lock(&file, read_only, path, lock_wait)
        };
        locked.map_err(|e| match e {
            LockError::Held { waited } => io::Error::new(
                io::ErrorKind::WouldBlock,
                Locked {
                    path: path.to_path_buf(),
                    waited,
                },
            ),
            LockError::Other(e) => annotate(e, path, "lock"),
        })?;
        let (align, mem_align) = if block_device {
            let mut lbs: libc::c_int = 512;
            // SAFETY: BLKSSZGET writes one c_int into the pointed-to variable.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut lbs) };
            let lbs = if r == 0 && lbs >= 512 {
                lbs as u32
            } else {
                512
            };
            (lbs, lbs.max(512))
        } else {
            dio_alignment(&file).unwrap_or((512, 512))
        };
        let reserve = !block_device && !read_only && reserves_cheaply(&file);
        Ok(HostFile(Arc::new(Inner {
            file,
            path: path.to_path_buf(),
            block_device,
            read_only,
            align: if direct { align } else { 1 },
            mem_align: if direct { mem_align } else { 1 },
            reserve: AtomicBool::new(reserve),
        })))
    }

    pub fn fd(&self) -> RawFd {
        self.0.file.as_raw_fd()
    }

    pub fn file(&self) -> &File {
        &self.0.file
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Grows a regular file to `size` bytes (no-op for devices or if already that large).
    pub fn ensure_len(&self, size: u64) -> io::Result<()> {
        if !self.0.block_device && self.0.file.metadata()?.len() < size {
            self.0.file.set_len(size)?;
        }
        Ok(())
    }
}

/// The host's Linux boot_id (read once per process: it cannot change while we run), as 16
/// bytes; `None` without /proc.
pub fn host_boot_id() -> Option<[u8; 16]> {
    static ID: std::sync::OnceLock<Option<[u8; 16]>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|e| tracing::warn!("cannot read the host's boot_id ({e}): writes not followed by a FLUSH will not survive a crash of this process"))
            .ok()?;
        parse_boot_id(&text)
    })
}

/// Parses a boot_id ("8-4-4-4-12" hex digits) into its 16 bytes.
fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    // All zeros means "none" in the header.
    (out != [0; 16]).then_some(out)
}

impl IoFile for HostFile {
    fn boot_id(&self) -> Option<[u8; 16]> {
        host_boot_id()
    }
    fn grow(&self, len: u64, how: Growth) -> io::Result<()> {
        if self.0.block_device {
            return Ok(());
        }
        let cur = self.size()?;
        if cur >= len {
            return Ok(());
        }
        if how == Growth::Reserved && self.0.reserve.load(Ordering::Relaxed) {
            // SAFETY: fallocate on our own fd with plain integer arguments; mode 0 reserves the
            // range and extends the file size over it.
            let r = unsafe { libc::fallocate(self.fd(), 0, cur as i64, (len - cur) as i64) };
            if r == 0 {
                return Ok(());
            }
            // Reserving is only a speed-up: out of space (the writes may still fit) or refused,
            // grow sparse as without it.
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.0.reserve.store(false, Ordering::Relaxed);
            }
            tracing::debug!(
                "cannot reserve {} bytes of {}: {e}",
                len - cur,
                self.0.path.display()
            );
        }
        self.0.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        if self.0.block_device {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 into the pointed-to variable.
            let r = unsafe { libc::ioctl(self.fd(), BLKGETSIZE64, &mut sz) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(sz)
        } else {
            Ok(self.0.file.metadata()?.len())
        }
    }
    fn alignment(&self) -> u32 {
        self.0.align
    }
    fn mem_alignment(&self) -> u32 {
        self.0.mem_align
    }
    fn is_block_device(&self) -> bool {
        self.0.block_device
    }
    fn is_read_only(&self) -> bool {
        self.0.read_only
    }
}

fn annotate(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

enum LockError {
    /// Another open file description holds a conflicting lock (after `waited`).
    Held {
        waited: Duration,
    },
    Other(io::Error),
}

/// Takes the image's lock, retrying a conflict for `wait`.
fn lock(file: &File, shared: bool, path: &Path, wait: Duration) -> Result<(), LockError> {
    // SAFETY: zero is a valid bit pattern for `struct flock`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // An OFD lock belongs to the open file description, and a child forked by any thread of a
    // process that had the image open shares that description until it execs. So a conflict can
    // be a holder that closed the file microseconds ago while another thread spawned a process;
    // retry briefly before reporting the image as in use (a real holder still gets refused).
    // A caller may wait longer (`HostFile::open_waiting`); then it says so once.
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut told = false;
    loop {
        // SAFETY: F_OFD_SETLK reads the flock struct we pass and does not retain the pointer.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            if told {
                tracing::info!("{}: lock acquired", path.display());
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            return Err(LockError::Other(e));
        }
        let waited = start.elapsed();
        if waited >= wait {
            return Err(LockError::Held { waited });
        }
        if !told && waited >= LOCK_RETRY_FOR {
            tracing::warn!(
                "{} is locked by another process; waiting up to {:.1} s for it (a server that \
                 has just ended holds the lock until its I/O in flight has completed)",
                path.display(),
                wait.as_secs_f64()
            );
            told = true;
        }
        std::thread::sleep(pause.min(wait - waited));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// How long a lock conflict is retried before the image is reported as in use (unless the
/// caller waits longer).
pub const LOCK_RETRY_FOR: Duration = Duration::from_millis(500);

/// ext2/3/4 and XFS: `fallocate` creates unwritten extents without writing or zeroing memory.
const EXT4_SUPER_MAGIC: libc::c_long = 0xEF53;
const XFS_SUPER_MAGIC: libc::c_long = 0x5846_5342;

/// Whether the file lives on a file system where [`Growth::Reserved`] is worth doing.
fn reserves_cheaply(file: &File) -> bool {
    // SAFETY: zero is a valid bit pattern for `struct statfs`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st` only.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0
        && matches!(
            st.f_type as libc::c_long,
            EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC
        )
}

/// O_DIRECT (offset, memory) alignment of a regular file, from statx(STATX_DIOALIGN).
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: zero is a valid bit pattern for `struct statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes into `stx`; the empty path with AT_EMPTY_PATH refers to the fd itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_offset_align.max(512),
        stx.stx_dio_mem_align.max(512),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn fs_type(dir: &Path) -> libc::c_long {
        let f = File::open(dir).unwrap();
        // SAFETY: zero is a valid bit pattern for `struct statfs`.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs writes into `st` only.
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
        st.f_type as libc::c_long
    }

    /// Grows a fresh file by 8 MiB each way; returns the bytes allocated after (sparse, reserved).
    fn grown_bytes(dir: &Path) -> (u64, u64) {
        let path = dir.join("img");
        let f = HostFile::open_with(&path, OpenMode::Create, false).unwrap();
        f.grow(8 << 20, Growth::Sparse).unwrap();
        let sparse = std::fs::metadata(&path).unwrap().blocks() * 512;
        f.grow(16 << 20, Growth::Reserved).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 16 << 20, "either way the file has its new size");
        (sparse, meta.blocks() * 512 - sparse)
    }

    /// On ext4/XFS reserved growth allocates the new range (unwritten: it still reads zeros);
    /// on tmpfs, where that would take memory, it stays a hole like sparse growth.
    #[test]
    fn reserved_growth_allocates_only_where_it_is_cheap() {
        let dir = tempfile::tempdir().unwrap();
        let t = fs_type(dir.path());
        if matches!(t, EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC) {
            let (sparse, reserved) = grown_bytes(dir.path());
            assert_eq!(sparse, 0);
            assert!(reserved >= 8 << 20, "only {reserved} bytes reserved");
            let f =
                HostFile::open_with(&dir.path().join("img"), OpenMode::ReadOnly, false).unwrap();
            let mut v = vec![1u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(f.file(), &mut v, 12 << 20).unwrap();
            assert!(v.iter().all(|&b| b == 0), "reserved space must read zeros");
        } else {
            eprintln!("temp dir is on file system {t:#x}, not ext4/XFS: reserving not checked");
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && fs_type(shm) == 0x0102_1994 {
            let dir = tempfile::tempdir_in(shm).unwrap();
            assert_eq!(
                grown_bytes(dir.path()),
                (0, 0),
                "tmpfs growth must stay sparse"
            );
        }
    }

    #[test]
    fn an_open_waiting_for_the_lock_gets_it_when_the_holder_lets_go() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let holder = HostFile::open_with(&path, OpenMode::Create, false).unwrap();
        // The usual open gives up after its short retry, and says why by type.
        let err = HostFile::open_with(&path, OpenMode::ReadWrite, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        let locked = err.get_ref().and_then(|e| e.downcast_ref::<Locked>());
        let locked = locked.expect("a lock conflict carries `Locked`");
        assert_eq!(locked.path, path);
        assert!(locked.waited >= LOCK_RETRY_FOR, "{:?}", locked.waited);
        // A waiting open (what `fvd serve --lock-wait` does) returns once the holder closes,
        // and not before.
        let released = Arc::new(AtomicBool::new(false));
        let r = released.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            r.store(true, Ordering::SeqCst);
            drop(holder);
        });
        let f = HostFile::open_locking(&path, OpenMode::ReadWrite, false, Duration::from_secs(60))
            .expect("the lock is free once the holder closes");
        assert!(released.load(Ordering::SeqCst), "acquired while still held");
        releaser.join().unwrap();
        drop(f);
    }

    #[test]
    fn lock_held_only_by_a_soon_closed_duplicate_is_acquired_but_a_live_holder_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let first = HostFile::open_with(&path, OpenMode::Create, false).unwrap();
        // What a child forked before exec holds: another descriptor for the same description.
        let dup = first.file().try_clone().unwrap();
        drop(first);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(dup);
        });
        let second = HostFile::open_with(&path, OpenMode::ReadWrite, false)
            .expect("the lock is free once the duplicate closes");
        releaser.join().unwrap();
        let err = HostFile::open_with(&path, OpenMode::ReadWrite, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(second);
        HostFile::open_with(&path, OpenMode::ReadOnly, false).unwrap();
    }
}
