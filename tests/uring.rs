//! `UringIo` against real files on the host disk (and a loop device when available).

use fvd::io::executor::Executor;
use fvd::io::host_file::OpenMode;
use fvd::io::uring::UringIo;
use fvd::io::{Buf, HostFile, Io, IoFile, Segment};
use fvd::units::PhysOffset;
use std::future::Future;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// A directory on the real disk: O_DIRECT on tmpfs would not exercise the block layer.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").expect("tempdir in /var/tmp")
}

fn create(path: &Path, len: u64) -> HostFile {
    let f = HostFile::open(path, OpenMode::Create).expect("open O_DIRECT");
    f.ensure_len(len).unwrap();
    f
}

/// Blocks until `fd` is readable.
fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r == 1
}

/// The worker event loop: run tasks, submit, wait on the eventfd, reap, until all tasks finish.
fn drive(io: &UringIo, ex: &mut Executor) {
    loop {
        ex.run_ready();
        if ex.live_tasks() == 0 {
            return;
        }
        io.submit().unwrap();
        if !ex.has_ready() {
            assert!(io.in_flight() > 0, "tasks wait but no I/O is in flight");
            wait_readable(io.eventfd(), -1);
        }
        io.reap();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

/// A buffer split into `pieces` segments laid out in reverse order in memory.
fn scattered(len: usize, pieces: usize) -> Buf {
    let backing = Buf::alloc(len);
    let base = backing.segments()[0].addr;
    let piece = len / pieces;
    let segs = (0..pieces).rev().map(|i| Segment {
        addr: base + i * piece,
        len: piece,
    });
    // SAFETY: every segment lies inside `backing`'s allocation, which the owner keeps alive.
    unsafe { Buf::from_segments(segs, Arc::new(backing)) }
}

#[test]
fn uring_io_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<UringIo>();
}

#[test]
fn concurrent_reads_and_writes_roundtrip() {
    let dir = disk_dir();
    let file = create(&dir.path().join("img"), 8 << 20);
    // A tiny ring forces the overflow path: 96 operations, 4 SQ entries.
    let io = Arc::new(UringIo::new(4).unwrap());
    let ok = Arc::new(AtomicUsize::new(0));
    let mut ex = Executor::default();
    let n = 96u64;
    let size = |i: u64| 4096 * (1 + (i % 16) as usize);
    for i in 0..n {
        let (io, file) = (io.clone(), file.clone());
        ex.spawn(async move {
            let len = size(i);
            let buf = if i % 3 == 0 {
                scattered(len, len / 4096)
            } else {
                Buf::alloc(len)
            };
            buf.copy_from_slice(0, &pattern(i, len));
            io.write(&file, PhysOffset(i * 65536), buf).await.unwrap();
        });
    }
    drive(&io, &mut ex);
    assert_eq!(io.in_flight(), 0);
    for i in 0..n {
        let (io, file, ok) = (io.clone(), file.clone(), ok.clone());
        ex.spawn(async move {
            let len = size(i);
            let buf = if i % 2 == 0 {
                scattered(len, len / 4096)
            } else {
                Buf::alloc(len)
            };
            io.read(&file, PhysOffset(i * 65536), buf.clone())
                .await
                .unwrap();
            assert_eq!(buf.to_vec(), pattern(i, len), "op {i}");
            ok.fetch_add(1, Ordering::SeqCst);
        });
    }
    drive(&io, &mut ex);
    assert_eq!(ok.load(Ordering::SeqCst), n as usize);
    assert_eq!(io.in_flight(), 0);
}

#[test]
fn more_segments_than_uio_maxiov_are_resubmitted() {
    let dir = disk_dir();
    let file = create(&dir.path().join("img"), 1 << 20);
    let seg = file.mem_alignment().max(file.alignment()) as usize;
    let pieces = libc::UIO_MAXIOV as usize + 77;
    let len = seg * pieces;
    let io = Arc::new(UringIo::new(8).unwrap());
    let data = pattern(5, len);
    let w = scattered(len, pieces);
    w.copy_from_slice(0, &data);
    let r = scattered(len, pieces);
    let mut ex = Executor::default();
    let (io2, f2, r2) = (io.clone(), file.clone(), r.clone());
    ex.spawn(async move {
        io2.write(&f2, PhysOffset(0), w).await.unwrap();
        io2.read(&f2, PhysOffset(0), r2).await.unwrap();
    });
    drive(&io, &mut ex);
    assert_eq!(r.to_vec(), data);
}

#[test]
fn short_read_at_eof_zero_fills() {
    let dir = disk_dir();
    let path = dir.path().join("short");
    std::fs::write(&path, pattern(9, 6144)).unwrap();
    let file = HostFile::open(&path, OpenMode::ReadWrite).unwrap();
    let io = Arc::new(UringIo::new(8).unwrap());
    let straddle = Buf::alloc(8192);
    straddle.copy_from_slice(0, &[0xAA; 8192]);
    let beyond = Buf::alloc(4096);
    beyond.copy_from_slice(0, &[0xBB; 4096]);
    let mut ex = Executor::default();
    let (io2, f2, s2, b2) = (io.clone(), file.clone(), straddle.clone(), beyond.clone());
    ex.spawn(async move {
        io2.read(&f2, PhysOffset(4096), s2).await.unwrap();
        io2.read(&f2, PhysOffset(1 << 20), b2).await.unwrap();
    });
    drive(&io, &mut ex);
    let got = straddle.to_vec();
    assert_eq!(got[..2048], pattern(9, 6144)[4096..]);
    assert!(
        got[2048..].iter().all(|&b| b == 0),
        "tail past EOF not zeroed"
    );
    assert!(beyond.to_vec().iter().all(|&b| b == 0));
}

#[test]
fn flush_and_punch_hole_read_back_zeros() {
    let dir = disk_dir();
    let path = dir.path().join("holes");
    let file = create(&path, 0);
    let io = Arc::new(UringIo::new(8).unwrap());
    let len = 256 << 10;
    let mut ex = Executor::default();
    let (io2, f2) = (io.clone(), file.clone());
    ex.spawn(async move {
        let buf = Buf::alloc(len);
        buf.copy_from_slice(0, &vec![0xFF; len]);
        io2.write(&f2, PhysOffset(0), buf).await.unwrap();
        io2.flush(&f2).await.unwrap();
    });
    drive(&io, &mut ex);
    let blocks_before = allocated_bytes(&path);
    let back = Buf::alloc(len);
    let (io2, f2, b2) = (io.clone(), file.clone(), back.clone());
    ex.spawn(async move {
        io2.punch_hole(&f2, PhysOffset(64 << 10), 128 << 10)
            .await
            .unwrap();
        io2.flush(&f2).await.unwrap();
        io2.read(&f2, PhysOffset(0), b2).await.unwrap();
    });
    drive(&io, &mut ex);
    let got = back.to_vec();
    assert!(got[..64 << 10].iter().all(|&b| b == 0xFF));
    assert!(
        got[64 << 10..192 << 10].iter().all(|&b| b == 0),
        "hole not zero"
    );
    assert!(got[192 << 10..].iter().all(|&b| b == 0xFF));
    assert_eq!(file.size().unwrap(), len as u64, "KEEP_SIZE");
    assert!(
        allocated_bytes(&path) < blocks_before,
        "space was not freed"
    );
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn noop_poll<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    fut.poll(&mut Context::from_waker(&Waker::from(Arc::new(Noop))))
}

#[test]
fn dropped_in_flight_future_keeps_slot_until_cqe() {
    let dir = disk_dir();
    let file = create(&dir.path().join("img"), 4 << 20);
    let io = UringIo::new(8).unwrap();
    {
        let mut read = Box::pin(io.read(&file, PhysOffset(0), Buf::alloc(1 << 20)));
        let mut write = Box::pin(io.write(&file, PhysOffset(2 << 20), Buf::alloc(1 << 20)));
        assert!(noop_poll(read.as_mut()).is_pending());
        assert!(noop_poll(write.as_mut()).is_pending());
        io.submit().unwrap();
        assert_eq!(io.in_flight(), 2);
    }
    // Nothing was reaped yet, so the dropped futures' slots must still hold their buffers.
    assert_eq!(io.in_flight(), 2);
    // Both futures are gone; their buffers stay with the slots until the CQEs arrive.
    while io.in_flight() > 0 {
        wait_readable(io.eventfd(), -1);
        io.reap();
    }
    // The freed slots are reused and work.
    let buf = Buf::alloc(4096);
    let mut ex = Executor::default();
    let io = Arc::new(io);
    let (io2, f2) = (io.clone(), file.clone());
    ex.spawn(async move { io2.read(&f2, PhysOffset(0), buf).await.unwrap() });
    drive(&io, &mut ex);
    assert_eq!(io.in_flight(), 0);
}

#[test]
fn dropping_ring_with_orphaned_ops_waits_for_them() {
    let dir = disk_dir();
    let file = create(&dir.path().join("img"), 16 << 20);
    let io = UringIo::new(4).unwrap();
    let mut futs: Vec<_> = (0..16u64)
        .map(|i| Box::pin(io.write(&file, PhysOffset(i << 20), Buf::alloc(1 << 20))))
        .collect();
    for f in &mut futs {
        assert!(noop_poll(f.as_mut()).is_pending());
    }
    io.submit().unwrap();
    // Some operations are in the kernel, some still in the overflow list.
    assert_eq!(io.in_flight(), 16);
    // The futures own what they need, so they outlive the handle.
    drop(io);
    // The last one gone leaves every slot orphaned: teardown waits for the kernel before
    // freeing the buffers.
    drop(futs);
}

#[test]
fn errors_keep_errno() {
    let dir = disk_dir();
    let path = dir.path().join("ro");
    // Allocated data: O_DIRECT reads of a hole skip the alignment check on ext4.
    std::fs::write(&path, pattern(3, 1 << 20)).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    let ro = HostFile::open(&path, OpenMode::ReadOnly).unwrap();
    let io = Arc::new(UringIo::new(8).unwrap());
    let mut ex = Executor::default();
    let errs = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (io2, f2, e2) = (io.clone(), ro.clone(), errs.clone());
    ex.spawn(async move {
        let w = io2.write(&f2, PhysOffset(0), Buf::alloc(4096)).await;
        // O_DIRECT rejects a misaligned offset.
        let r = io2.read(&f2, PhysOffset(1), Buf::alloc(4096)).await;
        e2.lock()
            .extend([w.unwrap_err().raw_os_error(), r.unwrap_err().raw_os_error()]);
    });
    drive(&io, &mut ex);
    assert_eq!(*errs.lock(), [Some(libc::EBADF), Some(libc::EINVAL)]);
}

#[test]
fn kick_makes_eventfd_readable_and_reap_clears_it() {
    let io = UringIo::new(4).unwrap();
    assert!(!wait_readable(io.eventfd(), 0));
    io.kick();
    assert!(wait_readable(io.eventfd(), 0));
    assert_eq!(io.reap(), 0);
    assert!(!wait_readable(io.eventfd(), 0));
}

#[test]
fn cross_thread_wake_through_kick() {
    let io = Arc::new(UringIo::new(4).unwrap());
    let kicker = io.clone();
    let mut ex = Executor::new(Some(Box::new(move || kicker.kick())));
    let slot: Arc<parking_lot::Mutex<(bool, Option<Waker>)>> = Default::default();
    let s2 = slot.clone();
    ex.spawn(async move {
        std::future::poll_fn(|cx| {
            let mut s = s2.lock();
            if s.0 {
                Poll::Ready(())
            } else {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    });
    ex.run_ready();
    let t = std::thread::spawn(move || {
        let w = {
            let mut s = slot.lock();
            s.0 = true;
            s.1.take()
        };
        w.expect("task registered its waker").wake();
    });
    // No I/O is in flight: only the kick from the other thread can end this wait.
    wait_readable(io.eventfd(), -1);
    io.reap();
    ex.run_ready();
    assert_eq!(ex.live_tasks(), 0);
    t.join().unwrap();
}

/// Detaches the loop device however the test ends.
struct LoopDev(PathBuf);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn loop_device_roundtrip() {
    let dir = disk_dir();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .args(["--direct-io=on", "-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        Ok(o) => {
            println!(
                "skipping: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("skipping: cannot run losetup: {e}");
            return;
        }
    };
    let _guard = LoopDev(dev.clone());
    let file = HostFile::open(&dev, OpenMode::ReadWrite).unwrap();
    assert!(file.is_block_device());
    assert_eq!(file.size().unwrap(), 32 << 20);
    let io = Arc::new(UringIo::new(16).unwrap());
    let ok = Arc::new(AtomicUsize::new(0));
    let mut ex = Executor::default();
    for i in 0..32u64 {
        let (io, file, ok) = (io.clone(), file.clone(), ok.clone());
        ex.spawn(async move {
            let len = 64 << 10;
            let w = scattered(len, 4);
            w.copy_from_slice(0, &pattern(i, len));
            io.write(&file, PhysOffset(i << 20), w).await.unwrap();
            io.flush(&file).await.unwrap();
            io.punch_hole(&file, PhysOffset((i << 20) + 4096), 4096)
                .await
                .unwrap();
            let r = Buf::alloc(len);
            io.read(&file, PhysOffset(i << 20), r.clone())
                .await
                .unwrap();
            let mut want = pattern(i, len);
            want[4096..8192].fill(0);
            assert_eq!(r.to_vec(), want, "op {i}");
            ok.fetch_add(1, Ordering::SeqCst);
        });
    }
    drive(&io, &mut ex);
    assert_eq!(ok.load(Ordering::SeqCst), 32);
    // Reading past the end of a device is a zero-length read: zeros, like a file.
    let tail = Buf::alloc(8192);
    tail.copy_from_slice(0, &[0xCC; 8192]);
    let (io2, f2, t2) = (io.clone(), file.clone(), tail.clone());
    ex.spawn(async move {
        io2.read(&f2, PhysOffset((32 << 20) - 4096), t2)
            .await
            .unwrap()
    });
    drive(&io, &mut ex);
    assert!(tail.to_vec()[4096..].iter().all(|&b| b == 0));
}

/// An operation reaches the kernel on its first poll, without waiting for `submit`: the device
/// starts on it while the event loop is still building the rest of its batch.
#[test]
fn first_poll_submits_without_waiting_for_the_batch() {
    let dir = disk_dir();
    let file = create(&dir.path().join("img"), 1 << 20);
    let io = UringIo::new(8).unwrap();
    let mut read = Box::pin(io.read(&file, PhysOffset(0), Buf::alloc(4096)));
    assert!(noop_poll(read.as_mut()).is_pending());
    assert!(
        wait_readable(io.eventfd(), 10_000),
        "the read was not handed to the kernel before submit()"
    );
    io.reap();
    assert!(matches!(noop_poll(read.as_mut()), Poll::Ready(Ok(()))));
}
