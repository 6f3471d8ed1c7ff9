//! Everything about a run derives from its seed: the low four bits pick the mode, the rest of
//! the knobs come from a generator seeded with it. So `FVD_SIM_SEED` alone replays a run.

use fvd::format::layout::Layout;
use fvd::units::Geometry;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const MODE_COMPACT: u64 = 1;
pub const MODE_BASE: u64 = 2;
pub const MODE_CRASH: u64 = 4;
pub const MODE_ERRORS: u64 = 8;
/// With MODE_CRASH: each crash is, at random, a crash of the process (the host keeps every
/// completed write) or a power loss. A high bit, so seeds recorded before it keep their runs.
pub const MODE_PROCESS: u64 = 1 << 32;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub compact: bool,
    pub base: bool,
    /// Random power losses during the run.
    pub crashes: bool,
    /// Some of those crashes are process crashes instead (see [`MODE_PROCESS`]).
    pub process_crashes: bool,
    /// Injected I/O errors (and a restart after each failed flush).
    pub errors: bool,
    pub block_size: u64,
    pub chunk_size: u64,
    pub virtual_size: u64,
    pub journal_size: u64,
    /// O_DIRECT alignment of the simulated storage.
    pub align: u32,
    /// Fixed-size block device instead of a growing file.
    pub block_device: bool,
    /// Size of the block device, if any.
    pub device_size: u64,
    pub base_size: u64,
    /// Copy-on-read on (with a base): reads queue fills that the read task then runs.
    pub copy_on_read: bool,
    pub max_parallel: usize,
    /// Per driver step, 1 in this many steps loses power.
    pub crash_every: u32,
    pub read_error_prob: f64,
    pub write_error_prob: f64,
    pub flush_error_prob: f64,
    /// The storage cannot punch holes (first writes merge zeros, discards keep space).
    pub no_punch: bool,
}

impl Scenario {
    pub fn from_seed(seed: u64) -> Scenario {
        let mut r = SmallRng::seed_from_u64(seed.wrapping_mul(0x9e3779b97f4a7c15) ^ 0x5151);
        let compact = seed & MODE_COMPACT != 0;
        let block_size = 4096u64 << [0, 0, 1, 2, 4][r.gen_range(0..5)];
        let chunk_size = block_size << r.gen_range(0..=3);
        let blocks = r.gen_range(8..=48u64);
        let mut virtual_size = blocks * block_size;
        if r.gen_bool(0.3) {
            virtual_size -= 512 * r.gen_range(1..=7);
        }
        let journal_size = 4096 * r.gen_range(1..=3);
        let block_device = r.gen_bool(0.2);
        let geo = Geometry {
            virtual_size,
            block_size,
            chunk_size,
        };
        let l = Layout::compute(&geo, compact, journal_size);
        let device_size = l.data_offset + geo.chunk_count() * chunk_size;
        let align = if block_device || r.gen_bool(0.5) {
            512
        } else {
            4096
        };
        let base_size = (virtual_size * r.gen_range(50..=120) / 100).next_multiple_of(align as u64);
        let errors = seed & MODE_ERRORS != 0;
        let p = |r: &mut SmallRng, max: f64| if errors { r.gen_range(0.0..max) } else { 0.0 };
        Scenario {
            seed,
            compact,
            base: seed & MODE_BASE != 0,
            crashes: seed & MODE_CRASH != 0,
            process_crashes: seed & MODE_CRASH != 0 && seed & MODE_PROCESS != 0,
            errors,
            block_size,
            chunk_size,
            virtual_size,
            journal_size,
            align,
            block_device,
            device_size,
            base_size,
            copy_on_read: seed & MODE_BASE != 0 && r.gen_bool(0.5),
            max_parallel: [1, 4, 16, 32][r.gen_range(0..4)],
            crash_every: r.gen_range(200..2000),
            read_error_prob: p(&mut r, 0.02),
            write_error_prob: p(&mut r, 0.02),
            flush_error_prob: p(&mut r, 0.01),
            // Drawn last so the knobs above stay what they were for recorded seeds.
            no_punch: r.gen_bool(0.3),
        }
    }

    pub fn sectors(&self) -> u64 {
        self.virtual_size / 512
    }
}
