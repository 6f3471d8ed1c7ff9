//! `fvd serve` at the vhost-user protocol level, with the `vhost` crate's frontend: the
//! cloud-hypervisor negotiation, a hand-made vring in memfd memory, and malformed requests.

mod serve_support;

use serve_support::guest::*;
use serve_support::{create_image, dir, ServerProc};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};

/// GET_CONFIG by hand: Some(payload) on success, None for the empty (error) reply.
fn raw_get_config(s: &mut UnixStream, offset: u32, size: u32) -> Option<Vec<u8>> {
    const GET_CONFIG: u32 = 24;
    let mut msg = Vec::new();
    for v in [GET_CONFIG, 1, 12 + size, offset, size, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.resize(msg.len() + size as usize, 0);
    s.write_all(&msg).unwrap();
    let mut hdr = [0u8; 24];
    s.read_exact(&mut hdr).unwrap();
    let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), GET_CONFIG);
    assert_eq!(word(3), offset);
    let n = word(4);
    assert_eq!(word(2), 12 + n);
    if n == 0 {
        return None;
    }
    assert_eq!(n, size, "a reply is either empty or exactly the size asked");
    let mut payload = vec![0u8; n as usize];
    s.read_exact(&mut payload).unwrap();
    Some(payload)
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const ST: D = (STATUS, 1, true);

#[test]
fn negotiation_config_and_malformed_requests() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(
        &img,
        &d.path().join("s.sock"),
        &["--serial", "fvd-test-serial", "--num-queues", "2"],
    );
    let (mut g, features) = attach(&srv.socket);
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(features & bit(b), 0, "feature {b}");
    }
    assert_eq!(features & bit(VIRTIO_BLK_F_RO), 0);

    // GET_CONFIG as cloud-hypervisor/libblkio (60 bytes) and QEMU (57) ask for it.
    let (_, cfg) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
            .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(cfg[32], 1, "write-back cache");
    // Topology (sizes in logical blocks): 4 KiB minimum, the image's 64 KiB block optimal.
    let lbs = u32::from_le_bytes(cfg[20..24].try_into().unwrap());
    assert_eq!(
        u32::from(u16::from_le_bytes([cfg[26], cfg[27]])) * lbs,
        4096
    );
    assert_eq!(
        u32::from_le_bytes(cfg[28..32].try_into().unwrap()) * lbs,
        65536
    );
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    let (_, short) =
        g.fe.get_config(0, 57, VhostUserConfigFlags::WRITABLE, &[0; 57])
            .unwrap();
    assert_eq!(short[..], cfg[..57]);
    // Other in-range windows; out of range gets an empty (error) reply and the connection
    // carries on. (Raw messages: the vhost crate's frontend waits forever for a payload after
    // an error reply.)
    assert_eq!(raw_get_config(&mut g.raw, 32, 1), Some(vec![1]));
    assert_eq!(raw_get_config(&mut g.raw, 8, 52), Some(cfg[8..60].to_vec()));
    for (off, size) in [(0, 61), (59, 2), (0x100, 60), (0, 0xf00)] {
        assert_eq!(
            raw_get_config(&mut g.raw, off, size),
            None,
            "offset {off} size {size}"
        );
    }

    // A valid write and read.
    let data = g.fill(DATA, 4096, 1);
    let h = g.header(VIRTIO_BLK_T_OUT, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, false), ST]), (1, OK));
    g.fill(DATA, 4096, 2);
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);

    // Malformed chains get IOERR / UNSUPP in the status byte.
    let far = 64 << 20;
    // Discard ranges: sector 0, 8 sectors, flags = UNMAP (refused for discard); then a range
    // ending past the disk.
    g.mem.write_obj(0u64, GuestAddress(DATA)).unwrap();
    g.mem.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
    g.mem
        .write_obj(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, GuestAddress(DATA + 12))
        .unwrap();
    g.mem
        .write_obj((8u64 << 20) / 512 - 4, GuestAddress(DATA + 16))
        .unwrap();
    g.mem.write_obj(8u32, GuestAddress(DATA + 24)).unwrap();
    g.mem.write_obj(0u32, GuestAddress(DATA + 28)).unwrap();
    let mut case = |name: &str, first: Option<(u32, u64)>, rest: &[D], want: u8| {
        let mut chain = match first {
            Some((ty, sector)) => vec![g.header(ty, sector)],
            None => vec![],
        };
        chain.extend_from_slice(rest);
        assert_eq!(g.submit(&chain), (1, want), "{name}");
    };
    let (t_in, t_out, t_discard) = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD);
    let end = (8 << 20) / 512;
    case("header too short", None, &[(HDR, 8, false), ST], IOERR);
    case(
        "header after the status",
        None,
        &[ST, (HDR, 16, false)],
        IOERR,
    );
    case(
        "header outside guest memory",
        None,
        &[(far, 16, false), ST],
        IOERR,
    );
    case(
        "read into a readable buffer",
        Some((t_in, 0)),
        &[(DATA, 512, false), ST],
        IOERR,
    );
    case(
        "write from a writable buffer",
        Some((t_out, 0)),
        &[(DATA, 512, true), ST],
        IOERR,
    );
    case(
        "buffer outside guest memory",
        Some((t_in, 0)),
        &[(far, 512, true), ST],
        IOERR,
    );
    case(
        "sector past the end",
        Some((t_in, end)),
        &[(DATA, 512, true), ST],
        IOERR,
    );
    case(
        "sector overflow",
        Some((t_out, u64::MAX / 2)),
        &[(DATA, 512, false), ST],
        IOERR,
    );
    case(
        "length not a multiple of 512",
        Some((t_out, 0)),
        &[(DATA, 700, false), ST],
        IOERR,
    );
    case("unknown type", Some((0x77, 0)), &[ST], UNSUPP);
    case(
        "discard with the unmap flag",
        Some((t_discard, 0)),
        &[(DATA, 16, false), ST],
        UNSUPP,
    );
    case(
        "discard past the end",
        Some((t_discard, 0)),
        &[(DATA + 16, 16, false), ST],
        IOERR,
    );
    // No writable byte at all: returned with length 0, nothing written.
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, (STATUS, 1, false)]), (0, 0xff));
    // A status byte outside guest memory: also length 0.
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, (far, 1, true)]).0, 0);

    // Still serving: GET_ID, flush and the data written before.
    let h = g.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(g.submit(&[h, (DATA, 20, true), ST]), (21, OK));
    assert_eq!(&g.read_back(DATA, 20)[..15], b"fvd-test-serial");
    let h = g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.submit(&[h, ST]), (1, OK));
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);

    // Stopping the ring reports where the device got to.
    assert_eq!(g.fe.get_vring_base(0).unwrap(), u32::from(g.next_avail));
    drop(g);
    assert!(srv.alive());
    // And the next frontend is served.
    let (mut g, _) = attach(&srv.socket);
    let h = g.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(g.submit(&[h, (DATA, 4096, true), ST]), (4097, OK));
    assert_eq!(g.read_back(DATA, 4096), data);
    drop(g);
    assert!(srv.terminate().success());
}

#[test]
fn readonly_device_refuses_writes_at_the_protocol_level() {
    let d = dir();
    let img = create_image(d.path(), "disk.fvd", "8M");
    let mut srv = ServerProc::start(&img, &d.path().join("s.sock"), &["--readonly"]);
    let (mut g, features) = attach(&srv.socket);
    assert_ne!(features & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & bit(VIRTIO_BLK_F_DISCARD), 0);
    g.fill(DATA, 512, 3);
    let h = g.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(g.submit(&[h, (DATA, 512, false), ST]), (1, IOERR));
    let h = g.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(g.submit(&[h, (DATA, 16, false), ST]).1, IOERR);
    let h = g.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(g.submit(&[h, (DATA, 512, true), ST]), (513, OK));
    assert_eq!(g.read_back(DATA, 512), vec![0; 512]);
    drop(g);
    assert!(srv.alive());
}

/// VIRTIO_BLK_F_TOPOLOGY: the optimal I/O size is the image's block size (none for a raw
/// disk), the minimum 4 KiB; both in logical blocks.
#[test]
fn topology_follows_the_image() {
    let d = dir();
    let fvd_img = d.path().join("big.fvd");
    let o = serve_support::fvd()
        .arg("create")
        .arg(&fvd_img)
        .args(["-s", "8M", "--block-size", "1M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let raw_img = d.path().join("disk.raw");
    std::fs::File::create(&raw_img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    for (img, args, optimal, sock) in [
        (&fvd_img, &[][..], 1u32 << 20, "f.sock"),
        (&raw_img, &["-f", "raw"][..], 0, "r.sock"),
    ] {
        let srv = ServerProc::start(img, &d.path().join(sock), args);
        let (mut fe, _raw, features) = negotiate(&srv.socket);
        assert_ne!(features & bit(VIRTIO_BLK_F_TOPOLOGY), 0);
        let (_, cfg) = fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
            .unwrap();
        let lbs = u32::from_le_bytes(cfg[20..24].try_into().unwrap());
        assert_eq!(
            cfg[24..26],
            [0, 0],
            "{img:?}: physical block exp, alignment"
        );
        assert_eq!(
            u32::from(u16::from_le_bytes([cfg[26], cfg[27]])) * lbs,
            4096,
            "{img:?}: min_io_size"
        );
        assert_eq!(
            u32::from_le_bytes(cfg[28..32].try_into().unwrap()) * lbs,
            optimal,
            "{img:?}: opt_io_size"
        );
        drop(fe);
        assert!(srv.terminate().success());
    }
}
