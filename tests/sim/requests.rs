//! Engine requests on a simulated disk in exact interleavings, for the tests that hold one
//! request's I/O in flight (a punch, a write) while others run: a request is started, runs as
//! far as the world lets it, and its outcome is read later.

use fvd::engine::{EngineError, Image};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::{ChunkIndex, PhysChunk, VirtOffset};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A started request's result, once it has finished.
pub type Outcome = Arc<Mutex<Option<Result<(), EngineError>>>>;
/// A request's future, for closures that build different ones.
pub type ReqFut = Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send>>;

/// An open image on a simulated disk and the executor its requests run on.
pub struct Requests {
    pub world: Arc<SimWorld>,
    pub file: SimFile,
    pub io: SimIo,
    pub img: Arc<Image<SimIo>>,
    ex: Executor,
}

impl Requests {
    pub fn new(world: Arc<SimWorld>, file: SimFile, img: Arc<Image<SimIo>>) -> Requests {
        Requests {
            io: world.io(),
            world,
            file,
            img,
            ex: Executor::default(),
        }
    }

    /// Starts `op` on the executor; it runs as far as the world lets it at the next `run`.
    pub fn spawn<F, Fut>(&mut self, op: F) -> Outcome
    where
        F: FnOnce(Arc<Image<SimIo>>, SimIo) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let out: Outcome = Arc::default();
        let (o, fut) = (out.clone(), op(self.img.clone(), self.io.clone()));
        self.ex.spawn(async move {
            let r = fut.await;
            *o.lock() = Some(r);
        });
        out
    }

    /// Runs everything that can run (held I/O stays in flight).
    pub fn run(&mut self) {
        self.world.run(&mut self.ex);
    }

    /// Runs `op` to completion, with every other task.
    pub fn now<F, Fut>(&mut self, what: &str, op: F)
    where
        F: FnOnce(Arc<Image<SimIo>>, SimIo) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let out = self.spawn(op);
        self.run();
        finished(&out, what);
    }

    pub fn write(&mut self, off: u64, len: u64, fill: u8) {
        self.now(&format!("write {off}+{len}"), move |img, io| async move {
            let b = Buf::alloc(len as usize);
            b.copy_from_slice(0, &vec![fill; len as usize]);
            img.write(&io, VirtOffset(off), b).await
        });
    }

    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let (img, io) = (self.img.clone(), self.io.clone());
        self.world.block_on(async move {
            let b = Buf::alloc(len as usize);
            img.read(&io, VirtOffset(off), b.clone()).await.unwrap();
            b.to_vec()
        })
    }

    pub fn phys(&self, c: u64) -> PhysChunk {
        self.img.chunk_phys(ChunkIndex(c))
    }
}

/// Asserts that the request behind `out` has finished, successfully.
pub fn finished(out: &Outcome, what: &str) {
    let r = out.lock().take();
    assert!(matches!(r, Some(Ok(()))), "{what}: {r:?}");
}

pub fn discard(off: u64, len: u64) -> impl FnOnce(Arc<Image<SimIo>>, SimIo) -> ReqFut {
    move |img, io| Box::pin(async move { img.discard(&io, VirtOffset(off), len).await })
}

pub fn flush() -> impl FnOnce(Arc<Image<SimIo>>, SimIo) -> ReqFut {
    |img, io| Box::pin(async move { img.flush(&io).await })
}

pub fn close() -> impl FnOnce(Arc<Image<SimIo>>, SimIo) -> ReqFut {
    |img, io| Box::pin(async move { img.close(&io).await })
}
