//! `fvd check --repair` on a corrupted image (the same code: `Image::repair`): check must not
//! fail on anything it can read, and a repair that succeeds must leave an image that checks
//! clean, opens, and reads only data that was written (or zeros), again after more writes.

use super::image::{build, write_some};
use super::Input;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut b = build(&mut inp);
    write_some(&mut b, &mut inp, 1);
    b.corrupt(&mut inp);
    let before = b.check();
    let Ok(fixed) = b.repair() else {
        return;
    };
    if let Ok(before) = &before {
        // Whatever check reported, repair fixed something.
        assert!(
            before.problems.is_empty() || !fixed.is_empty(),
            "check reported {:?}, repair fixed nothing",
            before.problems
        );
    }
    let report = b.check().expect("check after repair");
    assert!(
        report.problems.is_empty(),
        "after repair: {:?}",
        report.problems
    );
    assert_eq!(report.journal_records, 0, "repair leaves the journal empty");
    if b.names_unknown_base() {
        return;
    }
    let img = b.open(true).expect("open read-only after repair");
    b.read_all(&img).expect("reads after repair");
    drop(img);
    let img = b.open(false).expect("open read-write after repair");
    let blocks = img.geometry().block_count();
    for i in 0..3 {
        b.write_block(&img, (i * 7) % blocks, 3)
            .expect("write after repair");
    }
    b.close(&img).expect("close after repair");
    let img = b.open(true).expect("reopen after repair");
    b.read_all(&img).expect("reads after repair and writes");
}
