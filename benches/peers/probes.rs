//! One-off measurements: opening an image whose 16 MiB journal is full, and the memory a server
//! needs for a 1 TiB virtual disk.

use crate::client::{Client, Job, Op, Pattern};
use crate::procs::Server;
use crate::runners::Ctx;
use crate::workloads::{Format, Target, K4, M1};
use fvd::engine::{self, CreateParams, Image};
use fvd::format::journal::ENTRIES_PER_SECTOR;
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::{Buf, HostFile};
use fvd::units::VirtOffset;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct JournalOpen {
    pub entries: u64,
    pub sectors: u64,
    pub fill_secs: f64,
    /// Read-only opens (replay only), median of several, ms.
    pub ro_ms: f64,
    /// The read-write open a server does (replay, then checkpoint into a fresh epoch), ms.
    pub rw_ms: f64,
}

const JOURNAL: u64 = 16 << 20;

/// Fills a 16 MiB journal to the last sector (one full sector of bitmap records per FLUSH,
/// without a checkpoint), abandons the image without closing it, then times `open_image`.
pub fn journal_open(dir: &Path) -> Result<JournalOpen, String> {
    let e = |err: engine::EngineError| err.to_string();
    let io = SyncIo;
    let path = dir.join("journal.fvd");
    let sectors = JOURNAL / 4096;
    let per = ENTRIES_PER_SECTOR as u64;
    let entries = sectors * per;
    // 4 KiB blocks written every other block: no two records merge.
    let params = CreateParams {
        virtual_size: (2 * entries * K4).next_multiple_of(M1),
        block_size: K4,
        chunk_size: M1,
        journal_size: JOURNAL,
        compact: false,
        ..Default::default()
    };
    let f = HostFile::open(&path, OpenMode::Create).map_err(|e| e.to_string())?;
    block_on(engine::create_image(&io, f, &params)).map_err(e)?;
    let t0 = Instant::now();
    {
        let img: Image<SyncIo> = block_on(engine::open_image(&io, &path, false)).map_err(e)?;
        let buf = Buf::alloc(K4 as usize);
        buf.copy_from_slice(0, &[0xa5; 4096]);
        let mut block = 0;
        for _ in 0..sectors {
            for _ in 0..per {
                block_on(img.write(&io, VirtOffset(block * K4), buf.clone())).map_err(e)?;
                block += 2;
            }
            block_on(img.flush(&io)).map_err(e)?;
        }
        let used = block_on(img.journal_used());
        let cps = img.counters().snapshot().checkpoints;
        if used != sectors || cps != 0 {
            return Err(format!(
                "journal not full: {used}/{sectors} sectors, {cps} checkpoints"
            ));
        }
        // Dropped without close(): an unclean stop with a full journal.
    }
    let fill_secs = t0.elapsed().as_secs_f64();
    let mut ro = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let img = block_on(engine::open_image(&io, &path, true)).map_err(e)?;
        ro.push(t.elapsed().as_secs_f64() * 1e3);
        drop(img);
    }
    let t = Instant::now();
    let img = block_on(engine::open_image(&io, &path, false)).map_err(e)?;
    let rw_ms = t.elapsed().as_secs_f64() * 1e3;
    if img.present_blocks() != entries {
        return Err(format!(
            "replay lost records: {} blocks present, {entries} written",
            img.present_blocks()
        ));
    }
    drop(img);
    let _ = std::fs::remove_file(&path);
    Ok(JournalOpen {
        entries,
        sectors,
        fill_secs,
        ro_ms: crate::report::median(&mut ro),
        rw_ms,
    })
}

pub struct BigRss {
    pub target: Target,
    pub rss_kib: u64,
    pub writes: u64,
    pub reads: u64,
}

/// Serves a fresh 1 TiB image, writes 4 KiB at random places all over it (FLUSH every 32),
/// reads randomly for a while, and reports the server's peak RSS.
pub fn rss_1tib(ctx: &Ctx, t: Target, writes: u64, read_time: Duration) -> Result<BigRss, String> {
    const TIB: u64 = 1 << 40;
    let p = ctx.dir.join(format!("big.{}", t.format().ext()));
    let _ = std::fs::remove_file(&p);
    match t.format() {
        Format::Fvd { compact } => {
            let imgs = crate::images::Images::new(&ctx.dir, &ctx.fvd, false);
            imgs.create_fvd(&p, Some(TIB), compact, None)?;
        }
        Format::Qcow2 => {
            crate::procs::run_tool(
                std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&p)
                    .arg(TIB.to_string()),
            )?;
        }
        Format::Raw => return Err("raw is not measured here".into()),
    }
    let r = (|| {
        let srv: Server = ctx.start_server(t, &p, None, false)?;
        let mut c = Client::connect(&srv.sock, 32, K4 as usize)?;
        let w = c.run(
            &Job {
                op: Op::Write,
                bs: K4,
                depth: 32,
                pattern: Pattern::Random,
                region: TIB,
                count: writes,
                time: None,
                flush_every: 32,
            },
            7,
        )?;
        let rd = c.run(
            &Job {
                op: Op::Read,
                bs: K4,
                depth: 32,
                pattern: Pattern::Random,
                region: TIB,
                count: u64::MAX,
                time: Some(read_time),
                flush_every: 0,
            },
            8,
        )?;
        drop(c);
        let rss_kib = srv.vm_hwm_kib();
        srv.stop()?;
        Ok(BigRss {
            target: t,
            rss_kib,
            writes: w.ops,
            reads: rd.ops,
        })
    })();
    let _ = std::fs::remove_file(&p);
    r
}
