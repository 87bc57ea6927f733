//! A message's body for sending. Placeholder until the spool's zero-copy reader lands:
//! reads (and checksums) the record into memory.

use tsubame_spool::{Spool, SpoolError, SpooledMessage};

pub(crate) fn load(
    spool: &Spool,
    directory: &std::path::Path,
    message: &SpooledMessage,
) -> Result<Vec<u8>, SpoolError> {
    let _ = spool;
    tsubame_spool::read_body(directory, message)
}
