//! Deleting spool segments whose messages are all done. Placeholder until the spool's
//! reclaim lands.

use tsubame_spool::Spool;

pub(crate) fn run(spool: &Spool) {
    let _ = spool;
}
