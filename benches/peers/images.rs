//! Image files: the shared dataset, fresh images and copy-on-write overlays, in every format.

use crate::procs::run_tool;
use crate::workloads::Format;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::cell::RefCell;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes every byte of a `size`-byte file (pseudo-random contents with `seed`, zeros without),
/// so that no test reads or fills holes or unwritten extents.
pub fn write_raw(path: &Path, size: u64, seed: Option<u64>) -> Result<(), String> {
    let e = |err: std::io::Error| format!("{}: {err}", path.display());
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(e)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut rng = SmallRng::seed_from_u64(seed.unwrap_or(0));
    let mut done = 0;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        if seed.is_some() {
            rng.fill_bytes(&mut buf[..n]);
        }
        f.write_all(&buf[..n]).map_err(e)?;
        done += n as u64;
    }
    f.sync_all().map_err(e)?;
    drop(f);
    drop_cache(path)
}

/// Evicts `path` from the page cache. Every test uses O_DIRECT, and an O_DIRECT write to a file
/// with cached pages must invalidate them first: left in the cache, a file would be slower to
/// write than its peers (this once made the raw targets on disk look 2x slower).
pub fn drop_cache(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
    // SAFETY: posix_fadvise on an open fd with plain integer arguments.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

pub struct Images {
    pub dir: PathBuf,
    pub fvd: PathBuf,
    /// Fresh images on loop devices (`--storage lv`), with their backing files.
    lvs: Option<RefCell<Vec<(PathBuf, PathBuf)>>>,
}

/// Room for metadata on an emulated LV beyond the image's virtual size.
const LV_SLACK: u64 = 256 << 20;

impl Drop for Images {
    fn drop(&mut self) {
        if let Some(lvs) = &self.lvs {
            for (dev, backing) in lvs.take() {
                detach(&dev, &backing);
            }
        }
    }
}

/// Detaches loop devices (`--storage lv`) whose backing files lie under `dir`: what a killed
/// run leaves attached.
pub fn detach_loops_under(dir: &Path) {
    let Ok(out) = Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((dev, file)) = line.trim().split_once(char::is_whitespace) {
            if Path::new(file.trim().trim_end_matches(" (deleted)")).starts_with(dir) {
                let _ = Command::new("losetup").arg("-d").arg(dev).status();
            }
        }
    }
}

fn detach(dev: &Path, backing: &Path) {
    let _ = Command::new("losetup").arg("-d").arg(dev).status();
    let _ = std::fs::remove_file(backing);
}

impl Images {
    /// Images in `dir`; with `lv`, fresh images live on emulated logical volumes: loop devices
    /// (direct I/O) over fully written files, so neither the image's file system nor holes
    /// play a part.
    pub fn new(dir: &Path, fvd: &Path, lv: bool) -> Images {
        Images {
            dir: dir.to_path_buf(),
            fvd: fvd.to_path_buf(),
            lvs: lv.then(|| RefCell::new(Vec::new())),
        }
    }

    /// Removes a fresh image made by [`Images::create_fresh`] (detaching its loop device).
    pub fn remove_fresh(&self, p: &Path) {
        if let Some(lvs) = &self.lvs {
            let mut lvs = lvs.borrow_mut();
            if let Some(i) = lvs.iter().position(|(d, _)| d == p) {
                let (dev, backing) = lvs.remove(i);
                detach(&dev, &backing);
            }
            return;
        }
        let _ = std::fs::remove_file(p);
    }

    /// A loop device over a fully written (zero) file of `len` bytes.
    fn create_lv(&self, f: Format, len: u64) -> Result<PathBuf, String> {
        let backing = self.dir.join(format!("lv-{}.img", f.ext()));
        write_raw(&backing, len, None)?;
        let out = Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&backing);
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(lvs) = &self.lvs {
            lvs.borrow_mut().push((dev.clone(), backing));
        }
        Ok(dev)
    }
    pub fn data(&self, f: Format) -> PathBuf {
        self.dir.join(format!("data.{}", f.ext()))
    }
    pub fn fresh(&self, f: Format) -> PathBuf {
        self.dir.join(format!("fresh.{}", f.ext()))
    }
    pub fn overlay(&self, f: Format) -> PathBuf {
        self.dir.join(format!("cow.{}", f.ext()))
    }

    /// The dataset: a fully written raw file of random data, converted to qcow2 and both FVD
    /// layouts, so every target reads the same bytes from fully allocated images.
    pub fn prepare_dataset(&self, size: u64) -> Result<(), String> {
        let raw = self.data(Format::Raw);
        write_raw(&raw, size, Some(1))?;
        let q = self.data(Format::Qcow2);
        let _ = std::fs::remove_file(&q);
        run_tool(
            Command::new("qemu-img")
                .args([
                    "convert", "-f", "raw", "-O", "qcow2", "-t", "none", "-T", "none",
                ])
                .arg(&raw)
                .arg(&q),
        )?;
        for compact in [true, false] {
            let f = self.data(Format::Fvd { compact });
            let _ = std::fs::remove_file(&f);
            let mut c = Command::new(&self.fvd);
            c.args(["convert", "-q"]).arg(&raw).arg(&f);
            if !compact {
                c.arg("--no-compact");
            }
            run_tool(&mut c)?;
        }
        for f in [raw, q] {
            drop_cache(&f)?;
        }
        Ok(())
    }

    /// A fresh (empty) image of `size` bytes; raw files are written fully (preallocated). With
    /// `lv`, every format goes on its own new loop device.
    pub fn create_fresh(&self, f: Format, size: u64) -> Result<PathBuf, String> {
        let p = if self.lvs.is_some() {
            self.create_lv(f, size + LV_SLACK)?
        } else {
            let p = self.fresh(f);
            let _ = std::fs::remove_file(&p);
            p
        };
        match f {
            // An LV's raw image is the device itself (zeros, all of it written).
            Format::Raw if self.lvs.is_some() => {}
            Format::Raw => write_raw(&p, size, None)?,
            Format::Qcow2 => {
                run_tool(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2"])
                        .arg(&p)
                        .arg(size.to_string()),
                )?;
            }
            Format::Fvd { compact } => self.create_fvd(&p, Some(size), compact, None)?,
        }
        Ok(p)
    }

    /// A fresh overlay whose base (backing file) is the raw dataset.
    pub fn create_overlay(&self, f: Format) -> Result<PathBuf, String> {
        let p = self.overlay(f);
        let _ = std::fs::remove_file(&p);
        let base = self.data(Format::Raw);
        match f {
            Format::Raw => return Err("raw has no copy-on-write".into()),
            Format::Qcow2 => {
                run_tool(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                        .arg(&base)
                        .arg(&p),
                )?;
            }
            Format::Fvd { compact } => self.create_fvd(&p, None, compact, Some(&base))?,
        }
        Ok(p)
    }

    pub fn create_fvd(
        &self,
        p: &Path,
        size: Option<u64>,
        compact: bool,
        base: Option<&Path>,
    ) -> Result<(), String> {
        let mut c = Command::new(&self.fvd);
        c.arg("create").arg(p);
        if let Some(s) = size {
            c.args(["-s", &s.to_string()]);
        }
        if let Some(b) = base {
            c.args(["-F", "raw", "-b"]).arg(b);
        }
        if !compact {
            c.arg("--no-compact");
        }
        // Experiments: extra `fvd create` options for fresh images, e.g. "--block-size 4K".
        if let Ok(extra) = std::env::var("FVD_CREATE_ARGS") {
            c.args(extra.split_whitespace());
        }
        run_tool(&mut c).map(|_| ())
    }
}
