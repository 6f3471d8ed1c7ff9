//! The virtio-blk request parser (src/server/request.rs) on a fuzzer-chosen descriptor chain
//! over real mmap'd guest memory (two separately mapped, guest-adjacent regions plus a hole).
//! An accepted request must only name host memory inside the chain's descriptors of the right
//! direction, never the status byte, and only disk ranges inside the capacity.

use super::Input;
use fvd::io::Segment;
use fvd::server::request::{parse, Limits, Op, SECTOR};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const REGION: u64 = 0x4000;
/// Regions at [0, 16K) and [16K, 32K), a hole, then [48K, 64K).
const STARTS: [u64; 3] = [0, REGION, 3 * REGION];

/// Host intervals of the mapped bytes of the guest range `[addr, addr + len)` (a request may
/// use only the part of a buffer it needs, e.g. 20 bytes for GET_ID).
fn host_of(mem: &GuestMemoryMmap<()>, addr: u64, len: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = addr;
    let end = addr.saturating_add(len);
    while at < end {
        let Some(region) = mem.find_region(GuestAddress(at)) else {
            // Skip to the next region start inside the range, if any.
            match STARTS.iter().find(|&&s| s > at && s < end) {
                Some(&s) => at = s,
                None => break,
            }
            continue;
        };
        let host = mem.get_host_address(GuestAddress(at)).expect("mapped") as usize;
        let room = region.start_addr().0 + region.len() - at;
        let n = room.min(end - at);
        out.push((host, n as usize));
        at += n;
    }
    out
}

/// Every byte of `segs` lies in `allowed` and is not `status` (None: the guest made another
/// buffer overlap the status byte, which only harms the guest itself).
fn contained(segs: &[Segment], allowed: &[(usize, usize)], status: Option<usize>) {
    for s in segs {
        assert!(
            !status.is_some_and(|st| (s.addr..s.addr + s.len).contains(&st)),
            "data segment {s:?} covers the status byte"
        );
        let mut pos = s.addr;
        let end = s.addr + s.len;
        while pos < end {
            let Some(&(a, l)) = allowed.iter().find(|&&(a, l)| a <= pos && pos < a + l) else {
                panic!("segment {s:?}: host byte {pos:#x} is outside the chain's buffers");
            };
            pos = (a + l).min(end);
        }
    }
}

fn in_capacity(offset: u64, len: u64, lim: &Limits) {
    assert!(
        offset % SECTOR == 0 && len % SECTOR == 0,
        "unaligned {offset}+{len}"
    );
    assert!(
        offset.checked_add(len).is_some_and(|e| e <= lim.capacity),
        "past the end: {offset}+{len}"
    );
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let read_only = inp.bool();
    let lim = Limits {
        capacity: inp.below(1 << 24) * SECTOR,
        read_only,
        seg_max: inp.below(6) as u32,
        size_max: inp.below(0x6000) as u32,
        // As DeviceConfig::limits: never discard on a read-only disk.
        discard: inp.bool() && !read_only,
        max_discard_sectors: inp.below(1 << 20) as u32,
        max_discard_seg: inp.below(4) as u32,
    };
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&STARTS.map(|s| (GuestAddress(s), REGION as usize)))
            .expect("guest memory");
    let ndesc = inp.below(9);
    let mut descs = Vec::new();
    for _ in 0..ndesc {
        // Mostly addresses in or next to guest memory; sometimes anything.
        let addr = if inp.bool() {
            inp.u64()
        } else {
            inp.below(5 * REGION)
        };
        let len = if inp.bool() {
            inp.u32()
        } else {
            inp.below(0x5000) as u32
        };
        let flags = if inp.bool() {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        descs.push(Descriptor::new(addr, len, flags, 0));
    }
    // The rest of the input is the memory contents (headers, discard ranges) from address 0.
    let fill = inp.rest();
    let _ = mem.write_slice(
        &fill[..fill.len().min(2 * REGION as usize)],
        GuestAddress(0),
    );

    let Ok(req) = parse(descs.iter().copied(), &mem, &lim) else {
        return;
    };
    assert!(mem.check_range(req.status, 1), "status outside memory");
    let status_host = mem.get_host_address(req.status).expect("status mapped") as usize;
    let st = req.status.0;
    let covering = descs
        .iter()
        .filter(|d| st.wrapping_sub(d.addr().0) < u64::from(d.len()))
        .count();
    let status = (covering == 1).then_some(status_host);
    let allowed = |write: bool| -> Vec<(usize, usize)> {
        descs
            .iter()
            .filter(|d| d.is_write_only() == write)
            .flat_map(|d| host_of(&mem, d.addr().0, u64::from(d.len())))
            .collect()
    };
    match &req.op {
        Op::Read { offset, data } => {
            contained(data, &allowed(true), status);
            in_capacity(offset.0, data.iter().map(|s| s.len as u64).sum(), &lim);
        }
        Op::GetId { data } => contained(data, &allowed(true), status),
        Op::Write { offset, data } => {
            assert!(!lim.read_only, "write accepted on a read-only disk");
            contained(data, &allowed(false), status);
            in_capacity(offset.0, data.iter().map(|s| s.len as u64).sum(), &lim);
        }
        Op::Flush => {}
        Op::Discard { ranges } | Op::WriteZeroes { ranges } => {
            assert!(lim.discard && !lim.read_only);
            assert!(ranges.len() as u32 <= lim.max_discard_seg);
            for r in ranges {
                in_capacity(r.offset.0, r.len, &lim);
            }
        }
    }
}
