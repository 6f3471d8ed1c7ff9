//! Socket activation: the listening socket handed over by systemd (or any manager speaking the
//! `sd_listen_fds` protocol: `LISTEN_PID`, `LISTEN_FDS`, optional `LISTEN_FDNAMES`; the sockets
//! are the descriptors from 3 on).
//!
//! The socket outlives the server process: the manager keeps it open and listening while the
//! server restarts or is replaced by a new build, so a frontend reconnecting in the meantime
//! finds the socket and is accepted by the next server. That is why the server neither unlinks
//! the socket file nor shuts the listening socket down.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error(
        "socket activation: LISTEN_PID={listen_pid} names another process (this one is {own}): \
         the sockets were passed to it, not to fvd"
    )]
    OtherPid { listen_pid: u32, own: u32 },
    #[error("socket activation: LISTEN_PID is set but LISTEN_FDS is missing")]
    NoCount,
    #[error("socket activation: LISTEN_FDS={0:?} is not a descriptor count")]
    BadCount(String),
    #[error("socket activation: LISTEN_FDS=0, no socket was passed")]
    NoSocket,
    #[error(
        "socket activation: {0} sockets passed, fvd serves exactly one (one ListenStream= in \
         the .socket unit)"
    )]
    TooMany(usize),
    #[error("socket activation: descriptor {fd}: {op}: {source}")]
    Io {
        fd: RawFd,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("socket activation: descriptor {fd} is {what}, not a listening unix stream socket")]
    NotListening { fd: RawFd, what: String },
    #[error(
        "socket activation: the passed socket is bound to {0}, which is not a path in the file \
         system (abstract or unnamed); ListenStream= must name a path"
    )]
    NoPath(String),
    #[error(
        "--socket {given} differs from the passed socket's path {bound}: leave --socket out or \
         give the same path"
    )]
    OtherPath { given: PathBuf, bound: PathBuf },
}

/// What `LISTEN_*` announce for this process: `None` when no socket was passed (the variables
/// are absent), else the descriptor count.
pub fn parse_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    own_pid: u32,
) -> Result<Option<usize>, ActivationError> {
    let Some(pid) = listen_pid else {
        // sd_listen_fds ignores LISTEN_FDS without LISTEN_PID too; then fd 3 is not ours.
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_string()))?;
    if pid != own_pid {
        return Err(ActivationError::OtherPid {
            listen_pid: pid,
            own: own_pid,
        });
    }
    let n = listen_fds.ok_or(ActivationError::NoCount)?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(n.to_string()))?;
    match n {
        0 => Err(ActivationError::NoSocket),
        1 => Ok(Some(1)),
        n => Err(ActivationError::TooMany(n)),
    }
}

/// The socket passed by the manager, checked and marked close-on-exec.
#[derive(Debug)]
pub struct InheritedSocket {
    pub fd: OwnedFd,
    /// The file-system path it is bound to.
    pub path: PathBuf,
    /// `LISTEN_FDNAMES` (the socket unit's name unless `FileDescriptorName=`), for the log.
    pub name: Option<String>,
}

/// Takes the socket passed by the manager, if any, and removes the `LISTEN_*` variables so that
/// no child process (e.g. the `--grow-cmd` shell) takes them for its own. Call it before any
/// thread is started: it changes the environment.
pub fn take() -> Result<Option<InheritedSocket>, ActivationError> {
    let var = |k| std::env::var_os(k).map(|v: OsString| v.to_string_lossy().into_owned());
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if parse_env(pid.as_deref(), fds.as_deref(), std::process::id())?.is_none() {
        return Ok(None);
    }
    let fd = LISTEN_FDS_START;
    check_listening_unix_stream(fd)?;
    // SAFETY: the manager passed descriptor 3 to this process (LISTEN_PID is ours) and nothing
    // else in the process owns it: it is taken exactly once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io_err(LISTEN_FDS_START, "fcntl(FD_CLOEXEC)"));
    }
    let path = bound_path(fd.as_raw_fd())?;
    Ok(Some(InheritedSocket {
        fd,
        path,
        name: names.filter(|n| !n.is_empty()),
    }))
}

fn io_err(fd: RawFd, op: &'static str) -> ActivationError {
    ActivationError::Io {
        fd,
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn sockopt(
    fd: RawFd,
    opt: libc::c_int,
    name: &'static str,
) -> Result<libc::c_int, ActivationError> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, an int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io_err(fd, name));
    }
    Ok(v)
}

/// A descriptor the manager passed must be what `ListenStream=/path` makes: an AF_UNIX
/// SOCK_STREAM socket in the listening state. Anything else (a file, a datagram socket, a
/// connected socket, a closed descriptor) is refused before it is used.
fn check_listening_unix_stream(fd: RawFd) -> Result<(), ActivationError> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`; a bad descriptor is reported as EBADF.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io_err(fd, "fstat"));
    }
    let not = |what: String| ActivationError::NotListening { fd, what };
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFSOCK {
        let what = match kind {
            libc::S_IFREG => "a regular file",
            libc::S_IFDIR => "a directory",
            libc::S_IFCHR => "a character device",
            libc::S_IFBLK => "a block device",
            libc::S_IFIFO => "a pipe",
            _ => "not a socket",
        };
        return Err(not(what.into()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN, "getsockopt(SO_DOMAIN)")?;
    if domain != libc::AF_UNIX {
        return Err(not(format!("a socket of address family {domain}")));
    }
    let ty = sockopt(fd, libc::SO_TYPE, "getsockopt(SO_TYPE)")?;
    if ty != libc::SOCK_STREAM {
        return Err(not(format!("a unix socket of type {ty} (not SOCK_STREAM)")));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? == 0 {
        return Err(not("a unix stream socket that is not listening".into()));
    }
    Ok(())
}

/// The path the socket is bound to (`getsockname`).
fn bound_path(fd: RawFd) -> Result<PathBuf, ActivationError> {
    // SAFETY: an all-zero sockaddr_un is valid for getsockname to overwrite.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if r < 0 {
        return Err(io_err(fd, "getsockname"));
    }
    let off = std::mem::size_of::<libc::sa_family_t>();
    let n = (len as usize).saturating_sub(off).min(addr.sun_path.len());
    let raw: Vec<u8> = addr.sun_path[..n].iter().map(|&c| c as u8).collect();
    match raw.first() {
        Some(0) | None => Err(ActivationError::NoPath(format!(
            "{:?}",
            String::from_utf8_lossy(&raw)
        ))),
        Some(_) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            Ok(PathBuf::from(OsString::from_vec(raw[..end].to_vec())))
        }
    }
}

/// `--socket` next to an inherited socket must name the same path (absolute, or relative to
/// the working directory); a different one is refused rather than silently ignored.
pub fn check_socket_arg(
    given: Option<&std::path::Path>,
    bound: &std::path::Path,
) -> Result<(), ActivationError> {
    let Some(given) = given else { return Ok(()) };
    let abs = |p: &std::path::Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
        }
    };
    let (g, b) = (abs(given), abs(bound));
    // Lexically equal, or the same socket file (a symlinked directory, `..`).
    let same_file = || {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&g), std::fs::metadata(&b)) {
            (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
            _ => false,
        }
    };
    if g.components().eq(b.components()) || same_file() {
        Ok(())
    } else {
        Err(ActivationError::OtherPath {
            given: given.to_path_buf(),
            bound: bound.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_variables_means_no_activation() {
        assert!(parse_env(None, None, 7).unwrap().is_none());
        // LISTEN_FDS alone is not addressed to anyone (sd_listen_fds ignores it too).
        assert!(parse_env(None, Some("1"), 7).unwrap().is_none());
    }

    #[test]
    fn one_socket_for_this_process() {
        assert_eq!(parse_env(Some("7"), Some("1"), 7).unwrap(), Some(1));
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = |p, f| parse_env(p, f, 7).unwrap_err();
        assert!(matches!(
            e(Some("8"), Some("1")),
            ActivationError::OtherPid {
                listen_pid: 8,
                own: 7
            }
        ));
        assert!(matches!(
            e(Some("x"), Some("1")),
            ActivationError::BadPid(_)
        ));
        assert!(matches!(e(Some("7"), None), ActivationError::NoCount));
        assert!(matches!(e(Some("7"), Some("0")), ActivationError::NoSocket));
        assert!(matches!(
            e(Some("7"), Some("-1")),
            ActivationError::BadCount(_)
        ));
        assert!(matches!(
            e(Some("7"), Some("2")),
            ActivationError::TooMany(2)
        ));
    }

    #[test]
    fn socket_argument_must_match() {
        let p = std::path::Path::new("/run/fvd/a.sock");
        check_socket_arg(None, p).unwrap();
        check_socket_arg(Some(p), p).unwrap();
        check_socket_arg(Some(std::path::Path::new("/run/fvd//a.sock")), p).unwrap();
        assert!(matches!(
            check_socket_arg(Some(std::path::Path::new("/run/fvd/b.sock")), p),
            Err(ActivationError::OtherPath { .. })
        ));
    }

    #[test]
    fn checks_what_the_descriptor_is() {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(d.path().join("f")).unwrap();
        assert!(matches!(
            check_listening_unix_stream(f.as_raw_fd()),
            Err(ActivationError::NotListening { .. })
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_listening_unix_stream(a.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
        let dg = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(check_listening_unix_stream(dg.as_raw_fd())
            .unwrap_err()
            .to_string()
            .contains("not SOCK_STREAM"));
        let path = d.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        check_listening_unix_stream(l.as_raw_fd()).unwrap();
        assert_eq!(bound_path(l.as_raw_fd()).unwrap(), path);
    }
}
