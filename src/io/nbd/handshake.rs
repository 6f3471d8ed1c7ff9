//! NBD wire constants and the fixed-newstyle handshake: NBD_OPT_GO (with block-size
//! information), falling back to NBD_OPT_EXPORT_NAME when the server does not know GO.

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;

/// Largest request every server must accept when it states no maximum.
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// Option replies carry at most a few strings; anything bigger is a broken server.
const MAX_OPT_REPLY: u32 = 1 << 20;

/// What the handshake established about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub transmission_flags: u16,
    /// Requests must be aligned to this (a power of two).
    pub min_block: u32,
    /// Requests must not be longer than this (a multiple of `min_block`).
    pub max_block: u32,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A transmission-phase request header.
pub fn request(cmd: u16, handle: u64, off: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Bytes 4..6 are command flags: none.
    r[6..8].copy_from_slice(&cmd.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r[16..24].copy_from_slice(&off.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Negotiates `export` on a freshly connected stream, leaving it in the transmission phase.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Export> {
    if read_u64(s)? != NBDMAGIC {
        return Err(protocol("not an NBD server (bad greeting)"));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(protocol("oldstyle NBD servers are not supported")),
        m => return Err(protocol(format!("unknown NBD handshake magic {m:#x}"))),
    }
    let mut f = [0u8; 2];
    s.read_exact(&mut f)?;
    let flags = u16::from_be_bytes(f);
    let fixed = flags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    // Client flags echo the two capabilities we use.
    s.write_all(&(flags as u32 & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32).to_be_bytes())?;
    // Only fixed-newstyle servers answer options they do not know instead of disconnecting.
    if fixed {
        if let Some(e) = go(s, export)? {
            return Ok(e);
        }
    }
    export_name(s, export, no_zeroes)
}

/// NBD_OPT_GO. `None` if the server does not support it.
fn go<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Option<Export>> {
    let mut data = Vec::with_capacity(8 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut size = None;
    let mut transmission_flags = 0;
    let (mut min_block, mut max_block) = (1, DEFAULT_MAX_BLOCK);
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if u64_at(&h, 0) != OPT_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        if u32_at(&h, 8) != OPT_GO {
            return Err(protocol("option reply for an option not sent"));
        }
        let (rep, len) = (u32_at(&h, 12), u32_at(&h, 16));
        if len > MAX_OPT_REPLY {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        match rep {
            REP_ACK => break,
            REP_INFO if d.len() >= 2 => match u16_at(&d, 0) {
                INFO_EXPORT if d.len() == 12 => {
                    size = Some(u64_at(&d, 2));
                    transmission_flags = u16_at(&d, 10);
                }
                INFO_BLOCK_SIZE if d.len() == 14 => {
                    min_block = u32_at(&d, 2);
                    max_block = u32_at(&d, 10);
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => return Err(protocol("malformed NBD_REP_INFO")),
                _ => {} // information we did not ask for
            },
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_FLAG_ERROR != 0 => {
                // Tell the server we are leaving; it may already have hung up.
                let _ = send_option(s, OPT_ABORT, &[]);
                return Err(refused(export, r, &d));
            }
            r => return Err(protocol(format!("unexpected option reply type {r}"))),
        }
    }
    let Some(size) = size else {
        return Err(protocol(
            "server finished NBD_OPT_GO without the export size",
        ));
    };
    if !min_block.is_power_of_two() || min_block > 65536 || max_block < min_block {
        return Err(protocol(format!(
            "bad block size constraints: minimum {min_block}, maximum {max_block}"
        )));
    }
    // Larger requests than the default are allowed by such servers but buy nothing.
    let max_block = max_block.min(DEFAULT_MAX_BLOCK) / min_block * min_block;
    Ok(Some(Export {
        size,
        transmission_flags,
        min_block,
        max_block,
    }))
}

fn refused(export: &str, rep: u32, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    let (kind, what) = match rep {
        REP_ERR_UNKNOWN => (io::ErrorKind::NotFound, "no such export"),
        REP_ERR_POLICY => (io::ErrorKind::PermissionDenied, "access denied"),
        REP_ERR_TLS_REQD => (io::ErrorKind::PermissionDenied, "server requires TLS"),
        _ => (io::ErrorKind::Other, "server refused the export"),
    };
    io::Error::new(
        kind,
        format!(
            "{what} '{export}' (NBD error {:#x}){detail}",
            rep & !REP_FLAG_ERROR
        ),
    )
}

/// NBD_OPT_EXPORT_NAME: the old way, which has no error reply (the server just hangs up).
fn export_name<S: Read + Write>(s: &mut S, export: &str, no_zeroes: bool) -> io::Result<Export> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::NotFound,
            format!("server refused export '{export}' (closed the connection)"),
        ),
        _ => e,
    })?;
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad)?;
    }
    Ok(Export {
        size: u64_at(&r, 0),
        transmission_flags: u16_at(&r, 8),
        min_block: 1,
        max_block: DEFAULT_MAX_BLOCK,
    })
}

/// NBD reply error numbers are defined to equal Linux errno values.
pub fn reply_error(code: u32) -> io::Error {
    match code as i32 {
        c @ (libc::EPERM
        | libc::EIO
        | libc::ENOMEM
        | libc::EINVAL
        | libc::ENOSPC
        | libc::EOVERFLOW
        | libc::ENOTSUP
        | libc::ESHUTDOWN) => io::Error::from_raw_os_error(c),
        _ => io::Error::from_raw_os_error(libc::EIO),
    }
}

#[cfg(test)]
mod tests {
    //! qemu-nbd (used by tests/nbd_base.rs) always supports NBD_OPT_GO; the fallback for servers
    //! without it is exercised here against a scripted peer on a socket pair.
    use super::*;
    use std::os::unix::net::UnixStream;

    fn read_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u64_at(&h, 0), IHAVEOPT);
        let mut d = vec![0u8; u32_at(&h, 12) as usize];
        s.read_exact(&mut d).unwrap();
        (u32_at(&h, 8), d)
    }

    fn opt_reply(s: &mut UnixStream, opt: u32, rep: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&rep.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    fn greet(s: &mut UnixStream, flags: u16) -> u32 {
        s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&flags.to_be_bytes()).unwrap();
        let mut c = [0u8; 4];
        s.read_exact(&mut c).unwrap();
        u32::from_be_bytes(c)
    }

    #[test]
    fn falls_back_to_export_name_without_go() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            assert_eq!(greet(&mut s, FLAG_FIXED_NEWSTYLE), 1);
            let (opt, _) = read_option(&mut s);
            assert_eq!(opt, OPT_GO);
            opt_reply(&mut s, OPT_GO, REP_ERR_UNSUP, b"");
            let (opt, name) = read_option(&mut s);
            assert_eq!((opt, name.as_slice()), (OPT_EXPORT_NAME, &b"disk"[..]));
            s.write_all(&12345u64.to_be_bytes()).unwrap();
            s.write_all(&3u16.to_be_bytes()).unwrap();
            s.write_all(&[0u8; 124]).unwrap(); // NO_ZEROES was not offered
        });
        let e = negotiate(&mut c, "disk").unwrap();
        server.join().unwrap();
        assert_eq!(
            e,
            Export {
                size: 12345,
                transmission_flags: 3,
                min_block: 1,
                max_block: DEFAULT_MAX_BLOCK
            }
        );
    }

    #[test]
    fn go_reads_size_and_block_limits_and_reports_refusals() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            assert_eq!(greet(&mut s, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), 3);
            let (opt, d) = read_option(&mut s);
            assert_eq!(opt, OPT_GO);
            assert_eq!(&d[4..7], b"one");
            let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [512u32, 4096, 1 << 20] {
                info.extend_from_slice(&v.to_be_bytes());
            }
            opt_reply(&mut s, OPT_GO, REP_INFO, &info);
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&(1u64 << 30).to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            opt_reply(&mut s, OPT_GO, REP_INFO, &info);
            opt_reply(&mut s, OPT_GO, REP_ACK, b"");
        });
        let e = negotiate(&mut c, "one").unwrap();
        server.join().unwrap();
        assert_eq!((e.size, e.min_block, e.max_block), (1 << 30, 512, 1 << 20));

        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            greet(&mut s, FLAG_FIXED_NEWSTYLE);
            read_option(&mut s);
            opt_reply(&mut s, OPT_GO, REP_ERR_UNKNOWN, b"export not found");
            assert_eq!(read_option(&mut s).0, OPT_ABORT);
        });
        let err = negotiate(&mut c, "two").unwrap_err();
        server.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("'two'"), "{err}");
        assert!(err.to_string().contains("export not found"), "{err}");
    }
}
