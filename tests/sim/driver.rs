//! One randomized run: create an image on a simulated disk, drive many concurrent requests
//! through the engine while the simulator completes I/O in random order (losing power and
//! failing I/O if the scenario says so), and check every read against the model.

use super::model::Model;
use super::pattern::{base_image, FIRST_WRITE};
use super::scenario::Scenario;
use fvd::engine::base::Base;
use fvd::engine::storage::Storage;
use fvd::engine::{CreateParams, Image};
use fvd::format::{BaseFormat, BaseRef};
use fvd::io::executor::Executor;
use fvd::io::sim::{SimConfig, SimFile, SimIo, SimWorld};
use fvd::io::Buf;
use fvd::units::{BlockIndex, ChunkIndex, VirtOffset};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// State the request tasks share with the driver.
pub struct Shared {
    pub model: Mutex<Model>,
    failure: Mutex<Option<String>>,
    pub errors_allowed: bool,
    /// A flush failed: the engine refuses writes until reopened.
    pub flush_failed: AtomicBool,
    pub engine_errors: AtomicU64,
}

impl Shared {
    pub fn fail(&self, msg: String) {
        self.failure.lock().get_or_insert(msg);
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub engine_ops: u64,
    pub power_losses: u64,
    pub process_crashes: u64,
    pub engine_errors: u64,
    pub checkpoints: u64,
    pub journal_writes: u64,
    pub bounced: u64,
    /// First writes that zeroed part of a block without writing it, and that needed no zeroing.
    pub zeroes: u64,
    pub zeroing_skipped: u64,
    /// Journal writes that needed no flush before them, and that did.
    pub journal_unordered: u64,
    pub sim_ops: u64,
}

pub struct Run {
    pub sc: Scenario,
    pub rng: SmallRng,
    pub world: Arc<SimWorld>,
    file: SimFile,
    base: Option<SimFile>,
    pub img: Arc<Image<SimIo>>,
    pub io: SimIo,
    pub shared: Arc<Shared>,
    pub next_id: u64,
    stats: Stats,
    /// Injected I/O errors when the image was last opened.
    errors_at_open: u64,
}

fn faults(sc: &Scenario) -> SimConfig {
    SimConfig {
        read_error_prob: sc.read_error_prob,
        write_error_prob: sc.write_error_prob,
        flush_error_prob: sc.flush_error_prob,
        no_punch: sc.no_punch,
    }
}

/// Runs scenario `sc` for `ops` requests.
pub fn run(sc: Scenario, ops: u64) -> Result<Stats, String> {
    let world = SimWorld::new(
        sc.seed,
        SimConfig {
            no_punch: sc.no_punch,
            ..SimConfig::default()
        },
    );
    let file = if sc.block_device {
        world.create_block_device(sc.device_size)
    } else {
        world.create_disk(0, sc.align)
    };
    let base = sc.base.then(|| {
        let f = world.create_disk(0, sc.align);
        f.write_now(0, &base_image(sc.base_size / 512));
        f.read_only()
    });
    let params = CreateParams {
        virtual_size: sc.virtual_size,
        block_size: sc.block_size,
        chunk_size: sc.chunk_size,
        journal_size: sc.journal_size,
        compact: sc.compact,
        base: sc.base.then(|| BaseRef {
            path: "sim-base.raw".into(),
            format: BaseFormat::Raw,
            size: sc.base_size,
        }),
        ..Default::default()
    };
    let (io, f) = (world.io(), file.clone());
    world
        .block_on(async move { Image::create(&io, f, &params).await })
        .map_err(|e| format!("create failed: {e}"))?;
    let io = world.io();
    let img = Arc::new(open(&sc, &world, &io, &file, &base)?);
    let shared = Arc::new(Shared {
        model: Mutex::new(Model::new(sc.sectors(), sc.base, sc.base_size / 512)),
        failure: Mutex::new(None),
        errors_allowed: sc.errors,
        flush_failed: AtomicBool::new(false),
        engine_errors: AtomicU64::new(0),
    });
    world.set_config(faults(&sc));
    let mut r = Run {
        rng: SmallRng::seed_from_u64(sc.seed ^ 0xd1ce),
        sc,
        world,
        file,
        base,
        img,
        io,
        shared,
        next_id: FIRST_WRITE,
        stats: Stats::default(),
        errors_at_open: 0,
    };
    r.drive(ops)?;
    r.finish()?;
    Ok(r.stats)
}

fn make_base(base: &Option<SimFile>) -> Option<Base<SimIo>> {
    base.as_ref().map(|f| Base::Raw {
        store: Storage::new(f.clone()),
        size: fvd::io::IoFile::size(f).unwrap(),
    })
}

/// Opens the image, retrying while injected errors make it fail.
fn open(
    sc: &Scenario,
    world: &Arc<SimWorld>,
    io: &SimIo,
    file: &SimFile,
    base: &Option<SimFile>,
) -> Result<Image<SimIo>, String> {
    let mut last = String::new();
    for _ in 0..200 {
        let (io, f, b) = (io.clone(), file.clone(), make_base(base));
        match world.block_on(async move { Image::open(&io, f, b, false).await }) {
            Ok(img) => {
                img.set_copy_on_read(sc.copy_on_read);
                return Ok(img);
            }
            Err(e) if sc.errors => last = e.to_string(),
            Err(e) => return Err(format!("open failed: {e}")),
        }
    }
    Err(format!("open kept failing: {last}"))
}

impl Run {
    fn check_failure(&self) -> Result<(), String> {
        match self.shared.failure.lock().take() {
            Some(f) => Err(format!("{f}{}", self.diagnose())),
            None => Ok(()),
        }
    }

    /// With `FVD_SIM_TRACE_LBA`: the engine's view of that sector.
    fn diagnose(&self) -> String {
        let Some(lba) = std::env::var("FVD_SIM_TRACE_LBA")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return String::new();
        };
        let off = lba * 512;
        let b = BlockIndex(off / self.sc.block_size);
        let c = ChunkIndex(off / self.sc.chunk_size);
        let mut s = format!("\n  block {} present {}", b.0, self.img.block_present(b));
        if self.sc.compact {
            s += &format!(", chunk {} -> phys {:?}", c.0, self.img.chunk_phys(c));
        }
        s
    }

    fn drive(&mut self, ops: u64) -> Result<(), String> {
        let mut ex = Executor::default();
        let mut issued = 0;
        let mut parallel = 1;
        loop {
            if issued < ops {
                if self.rng.gen_ratio(1, 50) {
                    parallel = self.rng.gen_range(1..=self.sc.max_parallel);
                }
                while ex.live_tasks() < parallel && issued < ops {
                    self.spawn_op(&mut ex);
                    issued += 1;
                }
            }
            ex.run_ready();
            self.check_failure()?;
            // A flush can fail outside a guest FLUSH too (a deferred copy-on-read recycling
            // space, whose error only the engine sees): ask the engine.
            let restart = self.sc.errors
                && (self.shared.flush_failed.load(Ordering::Relaxed) || self.img.failed());
            if restart || (self.sc.crashes && self.crash_now()) {
                ex = Executor::default();
                self.crash()?;
                continue;
            }
            if !self.world.complete_one() && !ex.has_ready() {
                if ex.live_tasks() == 0 && issued >= ops {
                    break;
                }
                if ex.live_tasks() > 0 {
                    return Err(format!(
                        "{} requests stuck with no I/O pending (deadlock)",
                        ex.live_tasks()
                    ));
                }
            }
        }
        self.stats.engine_ops += issued;
        Ok(())
    }

    /// Random power-loss points, ten times likelier while a flush is in flight: the windows
    /// where ordering between data, journal and metadata matters.
    fn crash_now(&mut self) -> bool {
        let every = if self.world.pending_flushes() > 0 {
            (self.sc.crash_every / 10).max(1)
        } else {
            self.sc.crash_every
        };
        self.rng.gen_ratio(1, every)
    }

    fn add_counters(&mut self) {
        let c = self.img.counters();
        self.stats.checkpoints += c.checkpoints.load(Ordering::Relaxed);
        self.stats.journal_writes += c.journal_writes.load(Ordering::Relaxed);
        self.stats.bounced += c.bounced.load(Ordering::Relaxed);
        self.stats.zeroes += c.host_zeroes.load(Ordering::Relaxed);
        self.stats.zeroing_skipped += c.zeroing_skipped.load(Ordering::Relaxed);
        self.stats.journal_unordered += c.journal_unordered.load(Ordering::Relaxed);
    }

    /// A crash with requests in flight (a power loss, or with `process_crashes` sometimes a
    /// crash of the process), reopen (journal replay), check the crash contract. The caller
    /// has dropped every task of the old image.
    fn crash(&mut self) -> Result<(), String> {
        if self.sc.process_crashes && self.rng.gen_bool(0.5) {
            return self.process_crash();
        }
        self.power_loss()
    }

    /// The process dies with requests in flight, the host stays up: reopen, and every write
    /// that completed must read back.
    fn process_crash(&mut self) -> Result<(), String> {
        self.add_counters();
        self.stats.process_crashes += 1;
        // An image that failed (a device flush, or journal writes that could not put intents
        // back, failed) promises only what a power loss keeps; so does one that saw any I/O
        // error since it was opened: a failed intent write may have damaged the sector holding
        // other requests' intents, which the engine rewrites at once, but a crash can come first.
        let strict =
            !self.img.failed() && self.world.counters().injected_errors == self.errors_at_open;
        let at = self.shared.model.lock().crash_tick();
        self.world.process_crash();
        // Sometimes it dies again while reopening (replay, adopting intents, checkpoint).
        if self.rng.gen_bool(0.3) {
            self.start_an_open();
            self.stats.process_crashes += 1;
            self.world.process_crash();
        }
        self.reopen()?;
        let data = self.read_all()?;
        if strict {
            self.shared.model.lock().process_crash_check(&data, at)
        } else {
            self.shared.model.lock().crash_check(&data)
        }
    }

    /// Lets an open of the image (replay, adopting intents, checkpoint) run a random number of
    /// device completions, for a crash to interrupt it.
    fn start_an_open(&mut self) {
        let mut ex = Executor::default();
        let (io, f, b) = (self.world.io(), self.file.clone(), make_base(&self.base));
        ex.spawn(async move {
            let _ = Image::open(&io, f, b, false).await;
        });
        for _ in 0..self.rng.gen_range(0..60) {
            ex.run_ready();
            if !self.world.complete_one() {
                break;
            }
        }
    }

    fn reopen(&mut self) -> Result<(), String> {
        self.io = self.world.io();
        self.img = Arc::new(open(
            &self.sc,
            &self.world,
            &self.io,
            &self.file,
            &self.base,
        )?);
        self.errors_at_open = self.world.counters().injected_errors;
        self.shared.flush_failed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Power loss with requests in flight, reopen (journal replay), check the crash contract.
    fn power_loss(&mut self) -> Result<(), String> {
        self.add_counters();
        self.stats.power_losses += 1;
        self.world.power_loss();
        // Sometimes power fails again while the image is being reopened (replay, checkpoint).
        if self.rng.gen_bool(0.3) {
            for _ in 0..self.rng.gen_range(1..=2) {
                self.start_an_open();
                self.stats.power_losses += 1;
                self.world.power_loss();
            }
        }
        self.reopen()?;
        let data = self.read_all()?;
        self.shared.model.lock().crash_check(&data)
    }

    /// The whole virtual disk, retrying reads that fail with injected errors.
    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let size = self.sc.virtual_size;
        let mut out = vec![0u8; size as usize];
        let piece = 64 << 10;
        let mut off = 0;
        while off < size {
            let n = piece.min(size - off);
            let mut tries = 0;
            loop {
                let buf = Buf::alloc(n as usize);
                let (img, io, b) = (self.img.clone(), self.io.clone(), buf.clone());
                match self
                    .world
                    .block_on(async move { img.read(&io, VirtOffset(off), b).await })
                {
                    Ok(()) => {
                        buf.copy_to_slice(0, &mut out[off as usize..(off + n) as usize]);
                        break;
                    }
                    Err(_) if self.sc.errors && tries < 200 => tries += 1,
                    Err(e) => return Err(format!("reading back the disk at {off}: {e}")),
                }
            }
            off += n;
        }
        Ok(out)
    }

    /// Without faults: flush, check every sector, close, lose power, reopen, check again exactly.
    fn finish(&mut self) -> Result<(), String> {
        self.world.set_config(SimConfig::default());
        if self.shared.flush_failed.load(Ordering::Relaxed) || self.img.failed() {
            self.power_loss()?;
        }
        if self.world.pending() != 0 || self.img.locked_blocks() != 0 {
            return Err(format!(
                "idle engine left {} I/Os pending and {} blocks locked",
                self.world.pending(),
                self.img.locked_blocks()
            ));
        }
        let tk = self.shared.model.lock().read_begin(0, self.sc.sectors());
        let data = self.read_all()?;
        let mut m = self.shared.model.lock();
        m.read_end(tk, Some(&data))?;
        m.settle(&data, false);
        let t = m.flush_begin();
        drop(m);
        let (img, io) = (self.img.clone(), self.io.clone());
        self.world
            .block_on(async move { img.close(&io).await })
            .map_err(|e| format!("close failed: {e}"))?;
        self.shared.model.lock().flush_end(t, true);
        self.power_loss()?;
        self.add_counters();
        self.stats.engine_errors = self.shared.engine_errors.load(Ordering::Relaxed);
        self.stats.sim_ops = {
            let c = self.world.counters();
            c.reads + c.writes + c.flushes + c.punches
        };
        Ok(())
    }
}
