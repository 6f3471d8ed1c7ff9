//! NBD URIs as libnbd and QEMU spell them:
//! `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.

use std::io;
use std::path::PathBuf;

/// The port the NBD protocol registered with IANA.
pub const DEFAULT_PORT: u16 = 10809;

/// Longest export name the protocol allows.
const MAX_EXPORT_NAME: usize = 4096;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

/// True if `s` names an NBD export rather than a file: its scheme starts with `nbd`
/// (`nbd:`, `nbd+unix:`, `nbds:`...). Such strings are never treated as paths, so a malformed
/// URI gets a URI error instead of "file not found".
pub fn is_nbd_uri(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme.starts_with("nbd")
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        }
        None => false,
    }
}

fn bad(uri: &str, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("bad NBD URI '{uri}': {why}"),
    )
}

impl NbdUri {
    pub fn parse(uri: &str) -> io::Result<NbdUri> {
        let usage = "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(bad(uri, usage));
        };
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => return Err(bad(uri, "TLS is not supported")),
            "nbd+vsock" | "nbds+vsock" => return Err(bad(uri, "vsock is not supported")),
            _ => return Err(bad(uri, format!("unknown scheme '{scheme}'; {usage}"))),
        };
        if rest.contains('#') {
            return Err(bad(uri, "fragments are not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        // The export name is the path without its first slash ("nbd://h//x" names "/x").
        let export = decode(uri, path.strip_prefix('/').unwrap_or(path))?;
        if export.len() > MAX_EXPORT_NAME {
            return Err(bad(uri, "export name longer than 4096 bytes"));
        }
        let mut socket = None;
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            match k {
                "socket" if unix => {
                    if socket.is_some() {
                        return Err(bad(uri, "'socket' given twice"));
                    }
                    socket = Some(decode(uri, v)?);
                }
                _ => return Err(bad(uri, format!("unsupported query parameter '{k}'"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "nbd+unix takes no host (write nbd+unix:///EXPORT)",
                ));
            }
            match socket {
                Some(s) if !s.is_empty() => NbdAddr::Unix(PathBuf::from(s)),
                _ => return Err(bad(uri, "nbd+unix needs ?socket=PATH")),
            }
        } else {
            let (host, port) = host_port(uri, authority)?;
            NbdAddr::Tcp { host, port }
        };
        Ok(NbdUri { addr, export })
    }
}

/// `HOST`, `HOST:PORT`, `[V6ADDR]` or `[V6ADDR]:PORT`.
fn host_port(uri: &str, authority: &str) -> io::Result<(String, u16)> {
    if authority.contains('@') {
        return Err(bad(uri, "user names are not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(bad(uri, "unterminated '[' in host"));
        };
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(bad(uri, "junk after ']' in host")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad(uri, "missing host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad(uri, format!("bad port '{p}'"))),
        },
    };
    Ok((host.to_string(), port))
}

/// Percent-decoding; the result must be UTF-8 (export names are UTF-8 in the protocol).
fn decode(uri: &str, s: &str) -> io::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => out.push(v),
                None => return Err(bad(uri, "bad percent-encoding")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "percent-encoding is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp_and_unix_forms() {
        let p = |s| NbdUri::parse(s).unwrap();
        assert_eq!(p("nbd://example.com"), tcp("example.com", 10809, ""));
        assert_eq!(p("nbd://127.0.0.1:1234/"), tcp("127.0.0.1", 1234, ""));
        assert_eq!(p("nbd://h:1/disk%20a"), tcp("h", 1, "disk a"));
        assert_eq!(p("nbd://h//abs/x"), tcp("h", 10809, "/abs/x"));
        assert_eq!(p("nbd+tcp://[::1]:99/e"), tcp("::1", 99, "e"));
        assert_eq!(p("nbd://[fe80::1]/e"), tcp("fe80::1", 10809, "e"));
        assert_eq!(
            p("nbd+unix:///base?socket=/run/a%20b.sock"),
            NbdUri {
                addr: NbdAddr::Unix("/run/a b.sock".into()),
                export: "base".into()
            }
        );
        assert_eq!(
            p("nbd+unix://?socket=s").addr,
            NbdAddr::Unix("s".into()),
            "empty path means the default export"
        );
    }

    #[test]
    fn rejects_malformed_uris_with_a_reason() {
        for (uri, why) in [
            ("nbd:host:10809", "expected nbd://"),
            ("nbd:///x", "missing host"),
            ("nbd://h:/x", "bad port ''"),
            ("nbd://h:0/x", "bad port '0'"),
            ("nbd://h:65536/x", "bad port"),
            ("nbd://h:+1/x", "bad port"),
            ("nbd://[::1/x", "unterminated"),
            ("nbd://[::1]x/", "junk after"),
            ("nbd://u@h/x", "user names"),
            (
                "nbd://h/x?socket=/s",
                "unsupported query parameter 'socket'",
            ),
            ("nbd+unix:///x", "needs ?socket=PATH"),
            ("nbd+unix:///x?socket=", "needs ?socket=PATH"),
            ("nbd+unix://h/x?socket=/s", "takes no host"),
            ("nbd+unix:///x?socket=/a&socket=/b", "given twice"),
            ("nbd+unix:///x?socket=/s&tls=on", "'tls'"),
            ("nbds://h/x", "TLS"),
            ("nbd+vsock://1/x", "vsock"),
            ("nbdx://h/x", "unknown scheme"),
            ("nbd://h/%zz", "percent-encoding"),
            ("nbd://h/%ff", "not UTF-8"),
            ("nbd://h/x#frag", "fragments"),
        ] {
            let e = NbdUri::parse(uri).expect_err(uri).to_string();
            assert!(e.contains(why), "{uri}: {e}");
            assert!(e.contains(uri), "{uri}: {e}");
        }
    }

    #[test]
    fn tells_uris_from_paths() {
        assert!(is_nbd_uri("nbd://h/x"));
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(is_nbd_uri("nbd:legacy:syntax"));
        assert!(!is_nbd_uri("base.raw"));
        assert!(!is_nbd_uri("/images/nbd:weird"));
        assert!(!is_nbd_uri("dir/nbd://x"));
        assert!(!is_nbd_uri("nbd.raw"));
    }
}
