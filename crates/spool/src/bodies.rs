//! Message bodies and added header fields for delivery workers, lent straight out of
//! read-only shared mappings of the segments, one mapping per segment, cached.
//!
//! A segment this writer creates is mapped for reading when it is created, next to its
//! writable mapping; reads of it are bounded by what its appender has published (see
//! `mmap`), so the active segment can be read while it is appended to. A segment of an
//! earlier session is mapped on first use. Reclaim forgets a deleted segment's mapping;
//! a [`Body`] handed out before keeps its own reference, so it stays readable after the
//! file is unlinked (the disk space is freed when the last one is dropped).
//!
//! Every body is verified when it is handed out: the record header and payload checksums
//! (CRC32C, salted), the record type, the envelope's structure and the message id; added
//! header fields go through the same path ([`Bodies::lend`]), with their own layout check
//! in place of the envelope's. The
//! whole lookup costs about 160 ns for a 1 KiB body and 2.3 µs for 64 KiB (about 27 GiB/s,
//! `cargo bench -p tsubame-benches --bench spool_append -- spool_body` on the development
//! machine), against the milliseconds the same bytes take to cross an SMTP connection,
//! and it touches the pages the send reads next anyway.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::format::{
    self, RECORD_ALIGNMENT_BYTES, RECORD_HEADER_SIZE_BYTES, RecordType, SEGMENT_HEADER_SIZE_BYTES,
    Salt, SegmentHeader, SegmentHeaderError,
};
use crate::mmap::{self, MappedBytes, ReadMapping};
use crate::{AddedFields, Body, MessageId, RecordLocation, SpoolError, io_error};

/// The read mappings of one spool directory's segments.
#[derive(Debug)]
pub(crate) struct Bodies {
    directory: PathBuf,
    /// Segments numbered at or above this one were created by this writer session. They
    /// are registered when created and forgotten when deleted, so a miss means the segment
    /// is gone; only segments below it may be mapped on demand (nobody writes them).
    first_session_segment: u64,
    /// Invariant: no segment whose deletion (reclaim, or removal of an empty segment) has
    /// completed; at most one entry per segment file present.
    views: Mutex<HashMap<u64, Arc<SegmentView>>>,
}

#[derive(Debug)]
struct SegmentView {
    mapping: Arc<ReadMapping>,
    /// From the segment header: every record checksum of the segment is salted with it.
    salt: Salt,
    /// From the segment header: where records start.
    header_size_bytes: usize,
}

impl Bodies {
    pub(crate) fn new(directory: PathBuf, first_session_segment: u64) -> Self {
        Self {
            directory,
            first_session_segment,
            views: Mutex::new(HashMap::new()),
        }
    }

    fn lock_views(&self) -> MutexGuard<'_, HashMap<u64, Arc<SegmentView>>> {
        // Every update is a single insert or remove, so a panic elsewhere cannot leave the
        // map half-changed.
        self.views.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the read mapping of a segment this writer just created.
    pub(crate) fn register_created(&self, number: u64, mapping: ReadMapping, salt: Salt) {
        let view = SegmentView {
            mapping: Arc::new(mapping),
            salt,
            header_size_bytes: SEGMENT_HEADER_SIZE_BYTES,
        };
        self.lock_views().insert(number, Arc::new(view));
    }

    /// Drops the cached mapping of a segment whose file has been removed. Must come after
    /// the unlink: a mapping made on demand between a `forget` and the unlink would stay.
    pub(crate) fn forget(&self, number: u64) {
        self.lock_views().remove(&number);
    }

    /// See [`crate::Spool::body`].
    pub(crate) fn body(&self, id: MessageId, location: RecordLocation) -> Result<Body, SpoolError> {
        let bytes = self.lend(
            id,
            location,
            RecordType::Message,
            format::message_body_start,
        )?;
        Ok(Body { bytes, location })
    }

    /// See [`crate::Spool::added_fields`].
    pub(crate) fn added_fields(
        &self,
        id: MessageId,
        location: RecordLocation,
    ) -> Result<AddedFields, SpoolError> {
        let bytes = self.lend(id, location, RecordType::AddedFields, |payload| {
            format::parse_added_fields(payload)
                .map(|parsed| (parsed.message_id, parsed.fields_start))
        })?;
        Ok(AddedFields { bytes, location })
    }

    /// The tail of the payload of the `record_type` record at `location` that names
    /// message `id`, from where `locate` says it starts to the payload's end, borrowed from
    /// the segment's read mapping. Checks, in order: the location is a record boundary
    /// past the header, the record header (magic, checksum, length), the type, that the
    /// whole record has been appended, the payload checksum, then `locate` (the payload's
    /// own layout; it returns the id the payload names and where the lent part starts),
    /// then the id.
    fn lend(
        &self,
        id: MessageId,
        location: RecordLocation,
        record_type: RecordType,
        locate: impl FnOnce(&[u8]) -> Result<(MessageId, usize), &'static str>,
    ) -> Result<MappedBytes, SpoolError> {
        let corrupt = |reason| SpoolError::Corrupt {
            path: self.segment_path(location.segment),
            offset_bytes: location.offset_bytes,
            reason,
        };
        let view = self.view(location.segment, id)?;
        let mapping = &view.mapping;
        let unavailable = |start: usize, length: usize| {
            if start.saturating_add(length) > mapping.len() {
                corrupt("record extends past the end of the segment")
            } else {
                corrupt("record lies beyond what has been appended to the segment")
            }
        };
        let offset = usize::try_from(location.offset_bytes)
            .map_err(|_| corrupt("record extends past the end of the segment"))?;
        if offset < view.header_size_bytes {
            return Err(corrupt("record offset lies inside the segment header"));
        }
        if !offset.is_multiple_of(RECORD_ALIGNMENT_BYTES) {
            return Err(corrupt("record offset is not a record boundary"));
        }
        let header_bytes = mapping
            .final_bytes(offset, RECORD_HEADER_SIZE_BYTES)
            .ok_or_else(|| unavailable(offset, RECORD_HEADER_SIZE_BYTES))?;
        let header = format::decode_record_header(header_bytes, view.salt).map_err(corrupt)?;
        if header.record_type != record_type as u16 {
            return Err(corrupt(record_type.mismatch_reason()));
        }
        // `final_bytes` accepted `offset + RECORD_HEADER_SIZE_BYTES`, so this cannot overflow.
        let payload_start = offset + RECORD_HEADER_SIZE_BYTES;
        let payload = mapping
            .final_bytes(payload_start, header.payload_length)
            .ok_or_else(|| unavailable(payload_start, header.payload_length))?;
        format::verify_payload(&header, payload, view.salt).map_err(corrupt)?;
        let (stored_id, lent_start) = locate(payload).map_err(corrupt)?;
        if stored_id != id {
            return Err(corrupt("record holds a different message id"));
        }
        let outside = || corrupt("lent bytes lie outside their record");
        let lent_length = header
            .payload_length
            .checked_sub(lent_start)
            .ok_or_else(outside)?;
        // `final_bytes` accepted `payload_start + payload_length`, so this cannot overflow.
        MappedBytes::new(Arc::clone(mapping), payload_start + lent_start, lent_length)
            .ok_or_else(outside)
    }

    fn segment_path(&self, number: u64) -> PathBuf {
        self.directory.join(format::segment_file_name(number))
    }

    /// The cached view of segment `number`, mapping a segment of an earlier session on
    /// first use. The mapping is made under the lock so that it cannot race with reclaim's
    /// `forget` (see there).
    fn view(&self, number: u64, id: MessageId) -> Result<Arc<SegmentView>, SpoolError> {
        let mut views = self.lock_views();
        if let Some(view) = views.get(&number) {
            return Ok(Arc::clone(view));
        }
        if number >= self.first_session_segment {
            return Err(SpoolError::NotFound { id });
        }
        let view = Arc::new(self.map_earlier_segment(number, id)?);
        views.insert(number, Arc::clone(&view));
        Ok(view)
    }

    /// Maps a segment an earlier writer session wrote and checks its header the way the
    /// format document orders it.
    fn map_earlier_segment(&self, number: u64, id: MessageId) -> Result<SegmentView, SpoolError> {
        let path = self.segment_path(number);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(SpoolError::NotFound { id });
            }
            Err(error) => return Err(io_error(format!("opening {}", path.display()))(error)),
        };
        let size_bytes = file
            .metadata()
            .map_err(io_error(format!("reading metadata of {}", path.display())))?
            .len();
        if size_bytes > format::MAX_SEGMENT_FILE_SIZE_BYTES {
            return Err(SpoolError::Corrupt {
                path,
                offset_bytes: 0,
                reason: "segment file is larger than the format allows",
            });
        }
        if size_bytes < SEGMENT_HEADER_SIZE_BYTES as u64 {
            return Err(SpoolError::NotASegment { path });
        }
        // The number is below every segment this session created and the writer holds the
        // directory lock: the contract of `map_segment_of_an_earlier_session`.
        let mapping = mmap::map_segment_of_an_earlier_session(&file)
            .map_err(io_error(format!("mapping {}", path.display())))?;
        let header_bytes = mapping
            .final_bytes(0, SEGMENT_HEADER_SIZE_BYTES)
            .ok_or_else(|| SpoolError::NotASegment { path: path.clone() })?;
        let header = match SegmentHeader::decode(header_bytes, mapping.len() as u64) {
            Ok(header) => header,
            Err(SegmentHeaderError::UnsupportedVersion { major, minor }) => {
                return Err(SpoolError::UnsupportedVersion { path, major, minor });
            }
            Err(SegmentHeaderError::BadMagic | SegmentHeaderError::TooShort) => {
                return Err(SpoolError::NotASegment { path });
            }
            Err(error) => {
                return Err(SpoolError::Corrupt {
                    path,
                    offset_bytes: 0,
                    reason: error.reason(),
                });
            }
        };
        if header.segment_number != number {
            return Err(SpoolError::Corrupt {
                path,
                offset_bytes: 0,
                reason: "segment number in the header does not match the file name",
            });
        }
        Ok(SegmentView {
            mapping: Arc::new(mapping),
            salt: header.salt,
            header_size_bytes: header.header_size_bytes as usize,
        })
    }
}
