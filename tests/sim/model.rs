//! The truth model: per 512-byte virtual sector, the values a read may return.
//!
//! Every op that may change a sector adds a candidate value when it starts. A write that returns
//! Ok at time `t_end` after starting at `t_start` "kills" every candidate whose op had completed
//! before `t_start` (those are definitely overwritten); in-flight and concurrently completed ops
//! stay possible. Failed writes and discards never kill (they may or may not have happened).
//! A read that ran from `r_start` may return any candidate not yet dead at `r_start`.
//!
//! Crash contract: after a power loss, a sector may hold any candidate that was still alive when
//! the last flush that returned Ok was *submitted* (its value as of that flush, or anything
//! written since, even if overwritten later). After a crash of the process (the host stays up),
//! a sector may hold any candidate still alive at the crash: every completed write (or write
//! zeroes) is there, flushed or not, as a read at that moment would have seen it.

use super::pattern::{decode, Decoded, BASE, ZERO};
use std::collections::BTreeMap;

const OPEN: u64 = u64::MAX;

#[derive(Clone, Debug)]
struct Cand {
    op: u64,
    val: u64,
    start: u64,
    end: u64,
    dead: u64,
}

pub struct Model {
    /// `FVD_SIM_TRACE_LBA`: log every op touching this sector (debugging a failure).
    trace: Option<u64>,
    tick: u64,
    sectors: Vec<Vec<Cand>>,
    base_sectors: u64,
    has_base: bool,
    /// Start ticks of reads and flushes in flight (they pin candidates for the checks).
    pins: BTreeMap<u64, u32>,
    last_ok_flush: u64,
}

/// What an op started; handed back when it ends.
#[derive(Copy, Clone, Debug)]
pub struct Ticket {
    pub op: u64,
    pub start: u64,
    pub lba: u64,
    pub n: u64,
}

impl Cand {
    /// The value `val` op `t` may leave, from its start, while the op is still open.
    fn open(t: u64, val: u64) -> Cand {
        Cand {
            op: t,
            val,
            start: t,
            end: OPEN,
            dead: OPEN,
        }
    }
}

impl Ticket {
    /// Op `t` on sectors `[lba, lba + n)`, starting now.
    fn new(t: u64, lba: u64, n: u64) -> Ticket {
        Ticket {
            op: t,
            start: t,
            lba,
            n,
        }
    }
}

impl Model {
    pub fn new(vsectors: u64, has_base: bool, base_sectors: u64) -> Model {
        let init = if has_base { BASE } else { ZERO };
        let c = Cand {
            op: 0,
            val: init,
            start: 0,
            end: 0,
            dead: OPEN,
        };
        Model {
            trace: std::env::var("FVD_SIM_TRACE_LBA")
                .ok()
                .and_then(|v| v.parse().ok()),
            tick: 1,
            sectors: vec![vec![c]; vsectors as usize],
            base_sectors,
            has_base,
            pins: BTreeMap::new(),
            last_ok_flush: 0,
        }
    }

    fn log(&self, what: &str, lba: u64, n: u64, extra: &str) {
        if self.trace.is_some_and(|t| (lba..lba + n).contains(&t)) {
            eprintln!("[{}] {what} [{lba}, +{n}) {extra}", self.tick);
        }
    }

    fn next(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn pin(&mut self, t: u64) {
        *self.pins.entry(t).or_default() += 1;
    }

    fn unpin(&mut self, t: u64) {
        if let Some(n) = self.pins.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&t);
            }
        }
    }

    /// Candidates dead at or before this tick can never be accepted again.
    fn horizon(&self) -> u64 {
        let p = self.pins.keys().next().copied().unwrap_or(OPEN);
        p.min(self.last_ok_flush)
    }

    /// A write (`val` = its id) or WRITE ZEROES (`val` = ZERO) of sectors `[lba, lba + n)` starts.
    pub fn write_begin(&mut self, lba: u64, n: u64, val: u64) -> Ticket {
        let t = self.next();
        self.log("write begin", lba, n, &name(val));
        for s in lba..lba + n {
            self.sectors[s as usize].push(Cand::open(t, val));
        }
        Ticket::new(t, lba, n)
    }

    /// A DISCARD starts: the sectors may become zero or base data, or stay.
    pub fn discard_begin(&mut self, lba: u64, n: u64) -> Ticket {
        let t = self.next();
        self.log("discard begin", lba, n, "");
        for s in lba..lba + n {
            let v = &mut self.sectors[s as usize];
            v.push(Cand::open(t, ZERO));
            if self.has_base {
                v.push(Cand::open(t, BASE));
            }
        }
        Ticket::new(t, lba, n)
    }

    /// A write, write-zeroes or discard ends. `kills`: it returned Ok and overwrites.
    pub fn end(&mut self, tk: Ticket, kills: bool) {
        let now = self.next();
        self.log("end", tk.lba, tk.n, &format!("op {} kills {kills}", tk.op));
        let horizon = self.horizon();
        for s in tk.lba..tk.lba + tk.n {
            let v = &mut self.sectors[s as usize];
            for c in v.iter_mut() {
                if c.op == tk.op {
                    c.end = now;
                } else if kills && c.end < tk.start && c.dead == OPEN {
                    c.dead = now;
                }
            }
            v.retain(|c| c.dead > horizon);
        }
    }

    pub fn read_begin(&mut self, lba: u64, n: u64) -> Ticket {
        let t = self.next();
        self.log("read begin", lba, n, "");
        self.pin(t);
        Ticket::new(t, lba, n)
    }

    /// Checks what a read returned (`data` covers the ticket's sectors).
    pub fn read_end(&mut self, tk: Ticket, data: Option<&[u8]>) -> Result<(), String> {
        self.unpin(tk.start);
        let Some(data) = data else { return Ok(()) };
        for i in 0..tk.n {
            let lba = tk.lba + i;
            let sec = &data[i as usize * 512..(i as usize + 1) * 512];
            self.check(lba, sec, tk.start, "read")?;
        }
        Ok(())
    }

    pub fn flush_begin(&mut self) -> u64 {
        let t = self.next();
        self.pin(t);
        t
    }

    pub fn flush_end(&mut self, start: u64, ok: bool) {
        self.unpin(start);
        if ok {
            self.last_ok_flush = self.last_ok_flush.max(start);
        }
    }

    fn accepts(&self, lba: u64, got: u64, since: u64) -> bool {
        self.sectors[lba as usize]
            .iter()
            .filter(|c| c.dead > since)
            .any(|c| {
                let past_base = lba >= self.base_sectors;
                (c.val == got && !(got == BASE && past_base))
                    || (got == ZERO && c.val == BASE && past_base)
            })
    }

    fn describe(&self, lba: u64) -> String {
        let v: Vec<String> = self.sectors[lba as usize]
            .iter()
            .map(|c| {
                let f = |t: u64| {
                    if t == OPEN {
                        "-".to_string()
                    } else {
                        t.to_string()
                    }
                };
                format!(
                    "{}@[{},{}] dead {}",
                    name(c.val),
                    c.start,
                    f(c.end),
                    f(c.dead)
                )
            })
            .collect();
        v.join("; ")
    }

    fn check(&self, lba: u64, sec: &[u8], since: u64, what: &str) -> Result<(), String> {
        let got = match decode(lba, sec) {
            Decoded::Value(v) => v,
            Decoded::OtherSector { id, lba: other } => {
                return Err(format!(
                    "{what} of sector {lba} returned data of sector {other} (write {id}); candidates: {}",
                    self.describe(lba)
                ))
            }
            Decoded::Garbage => {
                return Err(format!(
                    "{what} of sector {lba} returned garbage {:02x?}..; candidates: {}",
                    &sec[..16],
                    self.describe(lba)
                ))
            }
        };
        if !self.accepts(lba, got, since) {
            return Err(format!(
                "{what} of sector {lba} (tick {}, since {since}) returned {} ; candidates: {}",
                self.tick,
                name(got),
                self.describe(lba)
            ));
        }
        Ok(())
    }

    /// After a power loss and reopen: checks every sector (`data` = whole disk) against the
    /// crash contract, then makes what was read the only (durable) value. Ops in flight at the
    /// crash are gone.
    pub fn crash_check(&mut self, data: &[u8]) -> Result<(), String> {
        let floor = self.last_ok_flush;
        for lba in 0..self.sectors.len() as u64 {
            let sec = &data[lba as usize * 512..(lba as usize + 1) * 512];
            self.check(lba, sec, floor, "after power loss, read")?;
        }
        self.settle(data, true);
        Ok(())
    }

    /// The moment of a process crash (for [`Model::process_crash_check`]).
    pub fn crash_tick(&mut self) -> u64 {
        self.next()
    }

    /// After a process crash at tick `at` and reopen: checks every sector like a read started
    /// at the crash, then makes what was read the only value (reopening flushed it).
    pub fn process_crash_check(&mut self, data: &[u8], at: u64) -> Result<(), String> {
        for lba in 0..self.sectors.len() as u64 {
            let sec = &data[lba as usize * 512..(lba as usize + 1) * 512];
            self.check(lba, sec, at, "after a process crash, read")?;
        }
        self.settle(data, true);
        Ok(())
    }

    /// Replaces every sector's candidates by what `data` holds (already checked) while nothing
    /// is in flight; `durable`: it is also what a power loss must keep.
    pub fn settle(&mut self, data: &[u8], durable: bool) {
        let t = self.next();
        for lba in 0..self.sectors.len() as u64 {
            let sec = &data[lba as usize * 512..(lba as usize + 1) * 512];
            let Decoded::Value(v) = decode(lba, sec) else {
                unreachable!("checked")
            };
            self.sectors[lba as usize] = vec![Cand {
                op: t,
                val: v,
                start: t,
                end: t,
                dead: OPEN,
            }];
        }
        self.pins.clear();
        if durable {
            self.last_ok_flush = t;
        }
    }
}

fn name(v: u64) -> String {
    match v {
        ZERO => "zero".into(),
        BASE => "base".into(),
        id => format!("write {id}"),
    }
}
