//! Deleting spool segments whose messages are all done.

use tsubame_spool::Spool;

pub(crate) fn run(spool: &Spool) {
    match spool.reclaim() {
        Ok(report) if report.segments_deleted > 0 => tracing::info!(
            segments = report.segments_deleted,
            bytes_freed = report.bytes_freed,
            "spool segments reclaimed"
        ),
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "spool reclaim failed; it is tried again later"),
    }
}
