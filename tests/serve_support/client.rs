//! A libblkio (virtio-blk-vhost-user) client for the server tests.

#![allow(dead_code)]

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;

/// Client buffer: the one memory region shared with the server.
const REGION: usize = 4 << 20;

pub struct Client {
    // Field order: queues before the instance that owns the memory they use.
    pub queues: Vec<Blkioq>,
    /// The device's size_max: the largest buffer one request may use.
    pub max_seg: usize,
    region: MemoryRegion,
    _b: Blkio,
}

pub fn connect(socket: &Path, num_queues: i32, read_only: bool) -> blkio::Result<Client> {
    connect_with(socket, num_queues, read_only, 256)
}

pub fn connect_with(
    socket: &Path,
    num_queues: i32,
    read_only: bool,
    queue_size: i32,
) -> blkio::Result<Client> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", num_queues)?;
    b.set_i32("queue-size", queue_size)?;
    let queues = b.start()?.queues;
    let max_seg = b.get_i32("max-segment-len")? as usize;
    let region = b.alloc_mem_region(REGION)?;
    b.map_mem_region(&region)?;
    Ok(Client {
        queues,
        max_seg,
        region,
        _b: b,
    })
}

pub enum Req {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes(ReqFlags),
}

impl Client {
    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= REGION);
        // SAFETY: the region is REGION bytes of mapped memory owned by the client; no request
        // using it is in flight while the slice is alive (every call waits for completion).
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    /// Queues one request using buffer bytes `[boff, boff + len)`.
    pub fn enqueue(&mut self, q: usize, req: &Req, off: u64, boff: usize, len: usize, tag: usize) {
        let p = (self.region.addr + boff) as *mut u8;
        let q = &mut self.queues[q];
        match req {
            Req::Read => q.read(off, p, len, tag, ReqFlags::empty()),
            Req::Write => q.write(off, p, len, tag, ReqFlags::empty()),
            Req::Flush => q.flush(tag, ReqFlags::empty()),
            Req::Discard => q.discard(off, len as u64, tag, ReqFlags::empty()),
            Req::WriteZeroes(f) => q.write_zeroes(off, len as u64, tag, *f),
        }
    }

    /// Waits for `n` completions on queue `q`; returns their (tag, ret).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut got = Vec::new();
        let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        while got.len() < n {
            let want = n - got.len();
            let k = self.queues[q]
                .do_io(&mut c[..want], want, None, None)
                .unwrap();
            for done in &c[..k] {
                // SAFETY: do_io initialised the first `k` completions.
                let done = unsafe { done.assume_init_ref() };
                got.push((done.user_data, done.ret));
            }
        }
        got
    }

    /// Like [`Client::wait`], but only until `limit` has passed: what completed by then.
    pub fn wait_for(
        &mut self,
        q: usize,
        n: usize,
        limit: std::time::Duration,
    ) -> Vec<(usize, i32)> {
        let end = std::time::Instant::now() + limit;
        let mut got = Vec::new();
        let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        while got.len() < n && std::time::Instant::now() < end {
            let want = n - got.len();
            let k = self.queues[q].do_io(&mut c[..want], 0, None, None).unwrap();
            for done in &c[..k] {
                // SAFETY: do_io initialised the first `k` completions.
                let done = unsafe { done.assume_init_ref() };
                got.push((done.user_data, done.ret));
            }
            if k == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        got
    }

    /// One request, waited for; returns the completion's ret (0 or -errno).
    pub fn run(&mut self, q: usize, req: Req, off: u64, boff: usize, len: usize) -> i32 {
        self.enqueue(q, &req, off, boff, len, 7);
        let r = self.wait(q, 1);
        assert_eq!(r[0].0, 7);
        r[0].1
    }

    /// Writes `data` at `off`, one request per `max_seg` bytes.
    pub fn write(&mut self, q: usize, off: u64, data: &[u8]) {
        self.buf(0, data.len()).copy_from_slice(data);
        for p in (0..data.len()).step_by(self.max_seg) {
            let n = self.max_seg.min(data.len() - p);
            assert_eq!(
                self.run(q, Req::Write, off + p as u64, p, n),
                0,
                "write {off} +{p}"
            );
        }
    }

    pub fn read(&mut self, q: usize, off: u64, len: usize) -> Vec<u8> {
        self.buf(0, len).fill(0xee);
        for p in (0..len).step_by(self.max_seg) {
            let n = self.max_seg.min(len - p);
            assert_eq!(
                self.run(q, Req::Read, off + p as u64, p, n),
                0,
                "read {off} +{p}"
            );
        }
        self.buf(0, len).to_vec()
    }
}
