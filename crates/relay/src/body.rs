//! A message's body for sending. Placeholder until the spool's zero-copy reader lands:
//! reads (and checksums) the record into memory.

use tsubame_spool::{Spool, SpoolError, SpooledMessage};

pub(crate) fn load(spool: &Spool, message: &SpooledMessage) -> Result<Vec<u8>, SpoolError> {
    let _ = spool;
    let directory = SPOOL_DIRECTORY.get().cloned().unwrap_or_default();
    tsubame_spool::read_body(&directory, message)
}

/// Set once at start (temporary, until the spool reads bodies itself).
pub(crate) static SPOOL_DIRECTORY: std::sync::OnceLock<std::path::PathBuf> =
    std::sync::OnceLock::new();
