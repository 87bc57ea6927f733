//! A message's content for sending: the body and its added header fields, borrowed
//! from the spool's read-only mapping of their segments, never copied into a
//! per-message buffer.

use std::ops::Deref;
use std::sync::Arc;

use tsubame_spool::{AddedFields, Body, Spool, SpoolError, SpooledMessage};

use crate::job::MessageMeta;

pub(crate) fn load(spool: &Spool, message: &SpooledMessage) -> Result<Body, SpoolError> {
    spool.body(message.id, message.location)
}

/// The header fields sent before the body: from the spool, or from memory when the
/// spool could not store them, or none.
pub(crate) enum Added {
    None,
    Stored(AddedFields),
    InMemory(Arc<[u8]>),
}

impl Deref for Added {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Added::None => &[],
            Added::Stored(fields) => fields,
            Added::InMemory(fields) => fields,
        }
    }
}

pub(crate) fn added_fields(spool: &Spool, meta: &MessageMeta) -> Result<Added, SpoolError> {
    if let Some(location) = meta.message.added_fields {
        return spool
            .added_fields(meta.message.id, location)
            .map(Added::Stored);
    }
    Ok(meta
        .added_in_memory
        .as_ref()
        .map_or(Added::None, |fields| Added::InMemory(Arc::clone(fields))))
}
