//! A message's body for sending: borrowed from the spool's read-only mapping of its
//! segment, never copied into a per-message buffer.

use tsubame_spool::{Body, Spool, SpoolError, SpooledMessage};

pub(crate) fn load(spool: &Spool, message: &SpooledMessage) -> Result<Body, SpoolError> {
    spool.body(message.id, message.location)
}
