//! Opening a corrupted image through the engine's real open path (header pick, metadata load,
//! journal replay, consistency checks, checkpoint) on the simulated disk. Whatever opens must
//! serve reads of data that was written (or zeros); a read-write open that succeeds must leave
//! an image that checks clean and opens again.

use super::image::{build, write_some};
use super::Input;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut b = build(&mut inp);
    write_some(&mut b, &mut inp, 1);
    b.corrupt(&mut inp);
    let _ = b.check();
    if let Ok(img) = b.open(true) {
        b.read_all(&img).expect("reads of an opened image succeed");
    }
    let Ok(img) = b.open(false) else {
        return;
    };
    b.read_all(&img).expect("reads of an opened image succeed");
    b.write_block(&img, 0, 2).expect("write after open");
    b.close(&img).expect("close after open");
    let report = b.check().expect("check after a clean close");
    // Leaks (exit 3) are legitimate after replaying crafted records; corruption is not.
    assert!(!report.corrupt(), "{:?}", report.problems);
    assert_eq!(report.journal_records, 0);
    let img = b.open(false).expect("reopen after a clean close");
    b.read_all(&img).expect("reads after reopen");
    b.close(&img).expect("close after reopen");
}
