use super::*;
use proptest::prelude::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::GuestMemoryMmap;

const REGION: u64 = 0x10000;
const W: bool = true;
const R: bool = false;

/// Two 64 KiB regions, guest-adjacent but separately mapped, so buffers can straddle them.
fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap()
}

fn lim() -> Limits {
    Limits {
        capacity: 1 << 20,
        read_only: false,
        seg_max: 4,
        size_max: 8192,
        discard: true,
        max_discard_sectors: 64,
        max_discard_seg: 2,
    }
}

fn d(addr: u64, len: u32, write: bool) -> Descriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    Descriptor::new(addr, len, flags, 0)
}

/// Writes a request header at `addr` and returns its descriptor.
fn hdr(m: &GuestMemoryMmap<()>, addr: u64, ty: u32, sector: u64) -> Descriptor {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
    d(addr, 16, R)
}

fn host(m: &GuestMemoryMmap<()>, addr: u64) -> usize {
    m.get_host_address(GuestAddress(addr)).unwrap() as usize
}

fn rejected(r: Result<Request, Rejected>) -> Rejected {
    match r {
        Ok(req) => panic!("accepted {req:?}"),
        Err(e) => e,
    }
}

#[test]
fn read_maps_guest_buffers_and_reports_written_len() {
    let m = mem();
    let chain = [
        hdr(&m, 0x100, VIRTIO_BLK_T_IN, 3),
        d(0x1000, 4096, W),
        d(0x3000, 1, W),
    ];
    let req = parse(chain, &m, &lim()).unwrap();
    assert_eq!(req.status, GuestAddress(0x3000));
    assert_eq!(req.written_len(), 4097);
    match req.op {
        Op::Read { offset, data } => {
            assert_eq!(offset, VirtOffset(3 * 512));
            assert_eq!(data.len(), 1);
            assert_eq!((data[0].addr, data[0].len), (host(&m, 0x1000), 4096));
        }
        op => panic!("{op:?}"),
    }
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let m = mem();
    // OUT: header and data in one readable descriptor.
    hdr(&m, 0x200, VIRTIO_BLK_T_OUT, 1);
    let req = parse([d(0x200, 16 + 1024, R), d(0x900, 1, W)], &m, &lim()).unwrap();
    match req.op {
        Op::Write { offset, data } => {
            assert_eq!(offset, VirtOffset(512));
            assert_eq!(data.iter().map(|s| s.len).sum::<usize>(), 1024);
            assert_eq!(data[0].addr, host(&m, 0x210));
        }
        op => panic!("{op:?}"),
    }
    // IN: data and status in one writable descriptor.
    let req = parse(
        [hdr(&m, 0x100, VIRTIO_BLK_T_IN, 0), d(0x1000, 513, W)],
        &m,
        &lim(),
    )
    .unwrap();
    assert_eq!(req.status, GuestAddress(0x1000 + 512));
    assert!(matches!(req.op, Op::Read { ref data, .. } if data[0].len == 512));
}

#[test]
fn buffers_straddling_two_regions_become_two_segments() {
    let m = mem();
    let chain = [
        hdr(&m, 0x100, VIRTIO_BLK_T_IN, 0),
        d(REGION - 0x1000, 0x2000, W),
        d(0x300, 1, W),
    ];
    let req = parse(chain, &m, &lim()).unwrap();
    let Op::Read { data, .. } = req.op else {
        panic!()
    };
    let total: usize = data.iter().map(|s| s.len).sum();
    assert_eq!(total, 0x2000);
    assert_eq!(data[0].addr, host(&m, REGION - 0x1000));
    assert_eq!(
        data.last().unwrap().addr + data.last().unwrap().len,
        host(&m, REGION + 0xfff) + 1
    );
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let m = mem();
    let req = parse(
        [hdr(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0), d(0x300, 1, W)],
        &m,
        &lim(),
    )
    .unwrap();
    assert!(matches!(req.op, Op::Flush));
    assert_eq!(req.written_len(), 1);

    let req = parse(
        [
            hdr(&m, 0x100, VIRTIO_BLK_T_GET_ID, 0),
            d(0x400, 64, W),
            d(0x300, 1, W),
        ],
        &m,
        &lim(),
    )
    .unwrap();
    assert!(matches!(req.op, Op::GetId { ref data } if data[0].len == ID_LEN));
    assert_eq!(req.written_len(), ID_LEN as u32 + 1);

    let mut segs = [0u8; 32];
    segs[0..8].copy_from_slice(&8u64.to_le_bytes());
    segs[8..12].copy_from_slice(&16u32.to_le_bytes());
    segs[16..24].copy_from_slice(&100u64.to_le_bytes());
    segs[24..28].copy_from_slice(&1u32.to_le_bytes());
    segs[28..32].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
    m.write_slice(&segs, GuestAddress(0x500)).unwrap();
    let req = parse(
        [
            hdr(&m, 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            d(0x500, 32, R),
            d(0x300, 1, W),
        ],
        &m,
        &lim(),
    )
    .unwrap();
    let Op::WriteZeroes { ranges } = req.op else {
        panic!()
    };
    assert_eq!(
        ranges.as_slice(),
        [
            Range {
                offset: VirtOffset(4096),
                len: 8192,
                unmap: false
            },
            Range {
                offset: VirtOffset(51200),
                len: 512,
                unmap: true
            }
        ]
    );
    let req = parse(
        [
            hdr(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0),
            d(0x500, 16, R),
            d(0x300, 1, W),
        ],
        &m,
        &lim(),
    )
    .unwrap();
    assert!(
        matches!(req.op, Op::Discard { ref ranges } if ranges.len() == 1 && ranges[0].len == 8192)
    );
}

#[test]
fn malformed_chains_are_rejected_with_the_right_status() {
    let m = mem();
    // Every case gets its own header, as all chains are built before any is parsed.
    let next = std::cell::Cell::new(0x6000u64);
    let at = |ty, sector| {
        next.set(next.get() + 16);
        hdr(&m, next.get(), ty, sector)
    };
    let out = |ty| at(ty, 0);
    let st = d(0x300, 1, W);
    let far = 4 * REGION;
    let cases: Vec<(&str, Vec<Descriptor>, Limits, Bad)> = vec![
        (
            "no status",
            vec![out(VIRTIO_BLK_T_FLUSH)],
            lim(),
            Bad::NoStatus,
        ),
        (
            "status outside",
            vec![out(VIRTIO_BLK_T_FLUSH), d(far, 1, W)],
            lim(),
            Bad::StatusOutsideMemory,
        ),
        (
            "readable after writable",
            vec![d(0x1000, 512, W), out(VIRTIO_BLK_T_OUT), st],
            lim(),
            Bad::Misordered,
        ),
        (
            "short header",
            vec![d(0x100, 8, R), st],
            lim(),
            Bad::ShortHeader,
        ),
        (
            "header outside memory",
            vec![d(far, 16, R), st],
            lim(),
            Bad::OutsideMemory,
        ),
        (
            "read into readable buffer",
            vec![out(VIRTIO_BLK_T_IN), d(0x1000, 512, R), st],
            lim(),
            Bad::WrongDirection,
        ),
        (
            "write from writable buffer",
            vec![out(VIRTIO_BLK_T_OUT), d(0x1000, 512, W), st],
            lim(),
            Bad::WrongDirection,
        ),
        (
            "get id without buffer",
            vec![out(VIRTIO_BLK_T_GET_ID), st],
            lim(),
            Bad::WrongDirection,
        ),
        (
            "data outside memory",
            vec![out(VIRTIO_BLK_T_IN), d(2 * REGION - 512, 1024, W), st],
            lim(),
            Bad::OutsideMemory,
        ),
        (
            "data far outside",
            vec![out(VIRTIO_BLK_T_OUT), d(u64::MAX - 511, 512, R), st],
            lim(),
            Bad::OutsideMemory,
        ),
        (
            "past end",
            vec![at(VIRTIO_BLK_T_IN, 2047), d(0x1000, 1024, W), st],
            lim(),
            Bad::PastEnd,
        ),
        (
            "sector overflow",
            vec![at(VIRTIO_BLK_T_IN, u64::MAX), d(0x1000, 512, W), st],
            lim(),
            Bad::PastEnd,
        ),
        (
            "bad length",
            vec![out(VIRTIO_BLK_T_OUT), d(0x1000, 513, R), st],
            lim(),
            Bad::BadLength,
        ),
        (
            "too many segments",
            vec![
                out(VIRTIO_BLK_T_IN),
                d(0x1000, 512, W),
                d(0x2000, 512, W),
                d(0x3000, 512, W),
                d(0x4000, 512, W),
                d(0x5000, 512, W),
                st,
            ],
            lim(),
            Bad::TooManySegments,
        ),
        (
            "segment too large",
            vec![out(VIRTIO_BLK_T_IN), d(0x1000, 16384, W), st],
            lim(),
            Bad::SegmentTooLarge,
        ),
        ("unknown type", vec![out(99), st], lim(), Bad::Unsupported),
        (
            "scsi",
            vec![out(VIRTIO_BLK_T_SCSI_CMD), st],
            lim(),
            Bad::Unsupported,
        ),
        (
            "write read-only",
            vec![out(VIRTIO_BLK_T_OUT), d(0x1000, 512, R), st],
            Limits {
                read_only: true,
                ..lim()
            },
            Bad::ReadOnly,
        ),
        (
            "discard not offered",
            vec![out(VIRTIO_BLK_T_DISCARD), d(0x500, 16, R), st],
            Limits {
                discard: false,
                ..lim()
            },
            Bad::Unsupported,
        ),
        (
            "discard payload not 16-byte ranges",
            vec![out(VIRTIO_BLK_T_DISCARD), d(0x500, 8, R), st],
            lim(),
            Bad::BadDiscard,
        ),
        (
            "discard without ranges",
            vec![out(VIRTIO_BLK_T_DISCARD), st],
            lim(),
            Bad::BadDiscard,
        ),
        (
            "too many ranges",
            vec![out(VIRTIO_BLK_T_DISCARD), d(0x500, 48, R), st],
            lim(),
            Bad::BadDiscard,
        ),
    ];
    for (name, chain, l, want) in cases {
        let r = rejected(parse(chain, &m, &l));
        assert_eq!(r.reason, want, "{name}");
        let status_expected = !matches!(want, Bad::NoStatus | Bad::StatusOutsideMemory);
        assert_eq!(r.status.is_some(), status_expected, "{name}");
    }
    assert_eq!(Bad::Unsupported.status(), STATUS_UNSUPP);
    assert_eq!(Bad::PastEnd.status(), STATUS_IOERR);
}

#[test]
fn bad_discard_ranges() {
    let m = mem();
    let range = |sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(0x500)).unwrap();
    };
    let run = |ty| {
        rejected(parse(
            [hdr(&m, 0x100, ty, 0), d(0x500, 16, R), d(0x300, 1, W)],
            &m,
            &lim(),
        ))
        .reason
    };
    range(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        run(VIRTIO_BLK_T_DISCARD),
        Bad::DiscardFlags,
        "unmap flag on discard"
    );
    range(0, 8, 2);
    assert_eq!(
        run(VIRTIO_BLK_T_WRITE_ZEROES),
        Bad::DiscardFlags,
        "unknown flag"
    );
    assert_eq!(Bad::DiscardFlags.status(), STATUS_UNSUPP);
    range(0, 65, 0);
    assert_eq!(
        run(VIRTIO_BLK_T_DISCARD),
        Bad::BadDiscard,
        "over max_discard_sectors"
    );
    range(2047, 2, 0);
    assert_eq!(run(VIRTIO_BLK_T_WRITE_ZEROES), Bad::PastEnd);
    range(u64::MAX / 256, 1, 0);
    assert_eq!(run(VIRTIO_BLK_T_DISCARD), Bad::PastEnd);
}

/// Host address ranges the chain's descriptors cover (where they are valid guest memory).
fn covered(m: &GuestMemoryMmap<()>, chain: &[Descriptor]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for desc in chain {
        for s in GuestMemoryBackend::get_slices(m, desc.addr(), desc.len() as usize).flatten() {
            let a = s.ptr_guard().as_ptr() as usize;
            v.push((a, a + s.len()));
        }
    }
    v.sort();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (a, b) in v {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

proptest! {
    /// Arbitrary chains never panic, and every host segment handed out lies inside the memory
    /// the chain's own descriptors describe.
    #[test]
    fn random_chains_stay_inside_their_descriptors(
        ty in prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_GET_ID),
                          Just(VIRTIO_BLK_T_DISCARD), Just(VIRTIO_BLK_T_WRITE_ZEROES), any::<u32>()],
        sector in prop_oneof![0u64..4096, any::<u64>()],
        descs in prop::collection::vec((0u64..3 * REGION, 0u32..20000, any::<bool>()), 0..8),
        payload in prop::collection::vec(any::<u8>(), 64),
    ) {
        let m = mem();
        m.write_slice(&payload, GuestAddress(0x40)).unwrap();
        let mut chain = vec![hdr(&m, 0x100, ty, sector)];
        chain.extend(descs.iter().map(|&(a, l, w)| d(a, l, w)));
        if let Ok(req) = parse(chain.clone(), &m, &lim()) {
            let cov = covered(&m, &chain);
            let data = match &req.op {
                Op::Read { data, .. } | Op::Write { data, .. } | Op::GetId { data } => data.clone(),
                _ => Segs::new(),
            };
            for s in data {
                prop_assert!(cov.iter().any(|&(a, b)| s.addr >= a && s.addr + s.len <= b), "{s:?} outside {cov:x?}");
            }
            prop_assert!(GuestMemoryBackend::check_range(&m, req.status, 1));
        }
    }
}

/// A bad request is logged once per kind and connection (each connection has its own log), so
/// a later guest's bad requests are not hidden by an earlier one's.
#[test]
fn bad_requests_are_logged_once_per_kind_and_connection() {
    let (first, second) = (BadLog::default(), BadLog::default());
    assert!(Bad::PastEnd.log_once(&first, &"head 0"));
    assert!(!Bad::PastEnd.log_once(&first, &"head 1"));
    assert!(Bad::BadLength.log_once(&first, &"head 2"));
    assert!(Bad::PastEnd.log_once(&second, &"head 0"));
}

#[test]
fn every_bad_kind_maps_back_from_its_index_with_a_distinct_name() {
    let mut names = std::collections::BTreeSet::new();
    for i in 0..BAD_KINDS {
        let b = Bad::from_index(i).unwrap();
        assert_eq!(b as usize, i);
        assert!(names.insert(b.name()), "{} twice", b.name());
    }
    assert_eq!(Bad::from_index(BAD_KINDS), None);
}
