//! Micro-benchmarks of the per-request software costs: virtio-blk request parsing, journal
//! sector encode/decode, block/chunk lookups, and the engine read path (planning + one pread)
//! against a bare pread of the same bytes, on /dev/shm so the device costs almost nothing.
//!
//! `cargo bench --bench micro`

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fvd::engine::{self, CreateParams, Image};
use fvd::format::journal::{self, ENTRIES_PER_SECTOR};
use fvd::format::JournalEntry;
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::{rw_all, SyncIo};
use fvd::io::{Buf, HostFile};
use fvd::server::request::{parse, Limits};
use fvd::units::{BlockIndex, ChunkIndex, VirtOffset};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn sector_entries() -> Vec<JournalEntry> {
    let mut rng = SmallRng::seed_from_u64(1);
    (0..ENTRIES_PER_SECTOR)
        .map(|i| match i % 2 {
            0 => JournalEntry::SetBits {
                start: rng.gen_range(0..1 << 30),
                count: rng.gen_range(1..64),
            },
            _ => JournalEntry::Map {
                chunk: rng.gen_range(0..1 << 24),
                phys: rng.gen_range(0..1 << 24),
            },
        })
        .collect()
}

/// The chains a Linux guest sends: header, one data buffer, status byte.
fn bench_parse(c: &mut Criterion) {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory");
    let lim = Limits {
        capacity: 1 << 40,
        read_only: false,
        seg_max: 126,
        size_max: 1 << 20,
        discard: true,
        max_discard_sectors: 1 << 22,
        max_discard_seg: 1,
    };
    let mut g = c.benchmark_group("virtio_blk_parse");
    for (name, ty, len) in [
        ("read_4k", VIRTIO_BLK_T_IN, 4096u32),
        ("write_4k", VIRTIO_BLK_T_OUT, 4096),
        ("read_1m", VIRTIO_BLK_T_IN, 1 << 20),
    ] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&8u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0)).expect("header");
        let w = if ty == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let chain = [
            Descriptor::new(0, 16, 0, 0),
            Descriptor::new(1 << 20, len, w, 0),
            Descriptor::new(4096, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        g.bench_function(name, |b| {
            b.iter(|| parse(black_box(chain), &mem, &lim).expect("valid chain"))
        });
    }
    g.finish();
}

fn bench_journal(c: &mut Criterion) {
    let entries = sector_entries();
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("encode_full_sector", |b| {
        b.iter(|| journal::encode(black_box(&entries), 7, 3))
    });
    let sector = journal::encode(&entries, 7, 3);
    g.bench_function("decode_full_sector", |b| {
        b.iter(|| journal::decode(black_box(&sector), 7, 3).expect("valid sector"))
    });
    g.finish();
}

/// A 256 MiB compact image on /dev/shm, fully written in 1 MiB pieces (chunks allocated in
/// virtual order), plus a raw file with the same bytes for the baseline.
struct Fixture {
    dir: PathBuf,
    img: Image<SyncIo>,
    raw: HostFile,
}

const SIZE: u64 = 256 << 20;

fn fixture() -> Fixture {
    let dir = PathBuf::from(format!("/dev/shm/fvd-micro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir /dev/shm");
    let io = SyncIo;
    let path = dir.join("m.fvd");
    let f = HostFile::open(&path, OpenMode::Create).expect("create image");
    let p = CreateParams {
        virtual_size: SIZE,
        ..Default::default()
    };
    block_on(engine::create_image(&io, f, &p)).expect("create");
    let img: Image<SyncIo> = block_on(engine::open_image(&io, &path, false)).expect("open");
    let raw = HostFile::open(&dir.join("m.raw"), OpenMode::Create).expect("create raw");
    let buf = Buf::alloc(1 << 20);
    buf.copy_from_slice(0, &vec![0x5a; 1 << 20]);
    for off in (0..SIZE).step_by(1 << 20) {
        block_on(img.write(&io, VirtOffset(off), buf.clone())).expect("write");
        rw_all(&raw, off, &buf, true).expect("raw write");
    }
    block_on(img.flush(&io)).expect("flush");
    Fixture { dir, img, raw }
}

fn offsets(n: usize, bs: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(2);
    (0..n).map(|_| rng.gen_range(0..SIZE / bs) * bs).collect()
}

fn bench_mapping(c: &mut Criterion, fx: &Fixture) {
    let geo = fx.img.geometry();
    let offs = offsets(4096, 4096);
    let mut g = c.benchmark_group("mapping");
    g.throughput(Throughput::Elements(offs.len() as u64));
    g.bench_function("block_present+chunk_phys_x4096", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &o in &offs {
                let present = fx.img.block_present(BlockIndex(o / geo.block_size));
                let p = fx.img.chunk_phys(ChunkIndex(o / geo.chunk_size));
                acc = acc.wrapping_add(present as u64 + p.0 as u64);
            }
            black_box(acc)
        })
    });
    g.finish();
}

fn bench_read(c: &mut Criterion, fx: &Fixture) {
    let io = SyncIo;
    for bs in [4096u64, 1 << 20] {
        let offs = offsets(1024, bs);
        let buf = Buf::alloc(bs as usize);
        let mut g = c.benchmark_group(format!("read_{}k_shm", bs >> 10));
        g.throughput(Throughput::Bytes(bs));
        let mut i = 0;
        g.bench_function("engine_compact", |b| {
            b.iter(|| {
                i = (i + 1) % offs.len();
                block_on(fx.img.read(&io, VirtOffset(offs[i]), buf.clone())).expect("read")
            })
        });
        g.bench_function("bare_pread", |b| {
            b.iter(|| {
                i = (i + 1) % offs.len();
                rw_all(&fx.raw, offs[i], &buf, false).expect("pread")
            })
        });
        g.finish();
    }
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn benches(c: &mut Criterion) {
    bench_parse(c);
    bench_journal(c);
    let fx = fixture();
    bench_mapping(c, &fx);
    bench_read(c, &fx);
    cleanup(&fx.dir);
}

criterion_group!(micro, benches);
criterion_main!(micro);
