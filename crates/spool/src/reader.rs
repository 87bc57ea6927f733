//! Reading a spool directory: the recovery scan, message bodies and added header fields,
//! and copies of damaged
//! bytes into `quarantine/`. Plain file reads, no mmap: a scan may run while a server
//! appends to the same files, and a mapping of a file that changes under a `&[u8]` is
//! undefined behaviour, while `read` just returns whatever bytes were there.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::format::{
    self, DamageKind, RECORD_HEADER_SIZE_BYTES, RecipientOutcome, RecordType,
    SEGMENT_HEADER_SIZE_BYTES, ScannedRecord, SegmentHeader, SegmentHeaderError,
};
use crate::{
    MessageId, MessageState, QuarantinedRecord, RecordLocation, ScanReport, SpoolError,
    SpooledMessage, TornTail, io_error,
};

/// Name of the subdirectory damaged bytes are copied to.
pub(crate) const QUARANTINE_DIRECTORY_NAME: &str = "quarantine";

/// Suffix of a segment file that is still being created; see "Segment creation" in the
/// format document. Such a file never holds a record.
pub(crate) const TEMPORARY_SUFFIX: &str = ".tmp";

/// Chunk size for copying damaged bytes: bounds the memory a quarantine copy takes.
const QUARANTINE_COPY_CHUNK_BYTES: usize = 1024 * 1024;

/// What the scan of a whole directory found, with the detail recovery needs beyond the
/// public [`ScanReport`].
#[derive(Debug, Default)]
pub(crate) struct DirectoryScan {
    pub(crate) report: ScanReport,
    /// Damaged byte ranges of readable segments, for the quarantine copies.
    pub(crate) damage: Vec<DamagedExtent>,
    /// The highest segment number in use, by final or temporary file name.
    pub(crate) highest_segment_number: Option<u64>,
    /// Temporary segment files left by a crash during segment creation.
    pub(crate) temporary_files: Vec<PathBuf>,
    /// The highest message id any record names, journal records included: a journal
    /// record can outlive its message's segment, and a new message must never reuse
    /// its id (a stale message-done record would mark the new message done).
    pub(crate) highest_message_id: u64,
    /// What each segment with a readable header holds, for reclaim, in number order.
    pub(crate) segments: Vec<SegmentContents>,
    /// Every id a message-done record names, whether or not its message is in the spool.
    pub(crate) done: HashSet<MessageId>,
}

/// The records of one readable segment, as reclaim needs to know them.
#[derive(Debug)]
pub(crate) struct SegmentContents {
    pub(crate) number: u64,
    pub(crate) size_bytes: u64,
    pub(crate) message_ids: Vec<MessageId>,
    /// Ids named by its journal records, in file order, consecutive repeats removed.
    pub(crate) journal_ids: Vec<MessageId>,
    /// It holds a record of a type this reader does not know.
    pub(crate) has_unknown_records: bool,
}

/// A damaged byte range inside a segment whose header was valid.
#[derive(Debug, Clone)]
pub(crate) struct DamagedExtent {
    pub(crate) segment_number: u64,
    pub(crate) segment_path: PathBuf,
    pub(crate) offset_bytes: u64,
    pub(crate) length_bytes: u64,
    pub(crate) kind: DamageKind,
    pub(crate) reason: &'static str,
}

/// The files of a spool directory that look like segments.
struct SegmentFiles {
    /// Sorted by number.
    segments: Vec<(u64, PathBuf)>,
    temporaries: Vec<(u64, PathBuf)>,
}

fn list_segment_files(directory: &Path) -> Result<SegmentFiles, SpoolError> {
    let entries = std::fs::read_dir(directory).map_err(io_error(format!(
        "listing spool directory {}",
        directory.display()
    )))?;
    let mut files = SegmentFiles {
        segments: Vec::new(),
        temporaries: Vec::new(),
    };
    for entry in entries {
        let entry = entry.map_err(io_error(format!(
            "listing spool directory {}",
            directory.display()
        )))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(number) = format::parse_segment_file_name(name) {
            files.segments.push((number, entry.path()));
        } else if let Some(number) = name
            .strip_suffix(TEMPORARY_SUFFIX)
            .and_then(format::parse_segment_file_name)
        {
            files.temporaries.push((number, entry.path()));
        }
    }
    files.segments.sort_unstable_by_key(|(number, _)| *number);
    Ok(files)
}

/// Scans every segment of `directory`. See [`crate::scan`].
pub(crate) fn scan_directory(directory: &Path) -> Result<DirectoryScan, SpoolError> {
    let files = list_segment_files(directory)?;
    let mut scan = DirectoryScan {
        highest_segment_number: files
            .segments
            .iter()
            .chain(&files.temporaries)
            .map(|(number, _)| *number)
            .max(),
        temporary_files: files
            .temporaries
            .into_iter()
            .map(|(_, path)| path)
            .collect(),
        ..DirectoryScan::default()
    };
    let mut done = HashSet::new();
    let mut outcomes = Vec::new();
    let mut added_fields = Vec::new();
    // One buffer, reused: a segment is read whole, and its size is bounded by
    // MAX_SEGMENT_FILE_SIZE_BYTES before anything is read.
    let mut buffer = Vec::new();
    for (number, path) in files.segments {
        scan.report.segment_count += 1;
        let whole_segment = |reason| QuarantinedRecord {
            segment_path: path.clone(),
            offset_bytes: 0,
            reason,
        };
        match read_segment_file(&path, &mut buffer) {
            Ok(true) => {}
            Ok(false) => {
                scan.report.quarantined.push(whole_segment(
                    "segment file is larger than the format allows",
                ));
                continue;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                // Reclaimed between listing and opening.
                scan.report.segment_count -= 1;
                continue;
            }
            Err(error) => {
                warn!(segment = %path.display(), %error, "spool segment could not be read; skipping it");
                scan.report
                    .quarantined
                    .push(whole_segment("segment file could not be read"));
                continue;
            }
        }
        let segment = match format::scan_segment_bytes(&buffer) {
            Ok(segment) => segment,
            Err(SegmentHeaderError::UnsupportedVersion { major, minor }) => {
                return Err(SpoolError::UnsupportedVersion { path, major, minor });
            }
            Err(error) => {
                scan.report.quarantined.push(whole_segment(error.reason()));
                continue;
            }
        };
        if segment.header.segment_number != number {
            scan.report.quarantined.push(whole_segment(
                "segment number in the header does not match the file name",
            ));
            continue;
        }
        let mut contents = SegmentContents {
            number,
            size_bytes: buffer.len() as u64,
            message_ids: Vec::new(),
            journal_ids: Vec::new(),
            has_unknown_records: false,
        };
        for record in segment.records {
            match record {
                ScannedRecord::Message(message) => {
                    contents.message_ids.push(message.id);
                    scan.report.messages.push(message);
                }
                ScannedRecord::MessageDone(record) => {
                    push_unless_repeated(&mut contents.journal_ids, record.message_id);
                    done.insert(record.message_id);
                }
                ScannedRecord::RecipientOutcome(outcome) => {
                    push_unless_repeated(&mut contents.journal_ids, outcome.message_id);
                    outcomes.push(outcome);
                }
                ScannedRecord::AddedFields(record) => {
                    push_unless_repeated(&mut contents.journal_ids, record.message_id);
                    added_fields.push((record.location, record.message_id));
                }
                ScannedRecord::Unknown {
                    location,
                    record_type,
                } => {
                    contents.has_unknown_records = true;
                    debug!(segment = %path.display(), offset = location.offset_bytes, record_type, "skipping spool record of unknown type");
                }
            }
        }
        scan.segments.push(contents);
        for damage in segment.damage {
            match damage.kind {
                DamageKind::Quarantined => scan.report.quarantined.push(QuarantinedRecord {
                    segment_path: path.clone(),
                    offset_bytes: damage.offset_bytes,
                    reason: damage.reason,
                }),
                DamageKind::TornTail => scan.report.torn_tails.push(TornTail {
                    segment_path: path.clone(),
                    offset_bytes: damage.offset_bytes,
                }),
            }
            scan.damage.push(DamagedExtent {
                segment_number: number,
                segment_path: path.clone(),
                offset_bytes: damage.offset_bytes,
                length_bytes: damage.length_bytes,
                kind: damage.kind,
                reason: damage.reason,
            });
        }
    }
    for message in &mut scan.report.messages {
        if done.contains(&message.id) {
            message.state = MessageState::Done;
        }
    }
    scan.report
        .messages
        .sort_unstable_by_key(|message| (message.id, message.location));
    scan.highest_message_id = scan
        .report
        .messages
        .iter()
        .map(|message| message.id.0)
        .chain(done.iter().map(|id| id.0))
        .chain(outcomes.iter().map(|outcome| outcome.message_id.0))
        .chain(added_fields.iter().map(|(_, id)| id.0))
        .max()
        .unwrap_or(0);
    apply_recipient_outcomes(&mut scan.report.messages, outcomes);
    apply_added_fields(&mut scan.report.messages, added_fields);
    scan.done = done;
    Ok(scan)
}

/// Journal records of one message tend to follow each other; one entry for a run of them
/// is enough.
fn push_unless_repeated(ids: &mut Vec<MessageId>, id: MessageId) {
    if ids.last() != Some(&id) {
        ids.push(id);
    }
}

/// Folds the journal's recipient outcomes into their messages' recipient states, in
/// journal order (segment, then offset): attempts are counted, and the latest final
/// outcome counts (spool-format/README.md, "Recipient outcome"). Outcomes for messages that are not
/// in the spool (their segment was reclaimed or quarantined) or for a recipient index
/// out of range are ignored.
fn apply_recipient_outcomes(messages: &mut [SpooledMessage], mut outcomes: Vec<RecipientOutcome>) {
    outcomes.sort_by_key(|outcome| outcome.location);
    for outcome in outcomes {
        let Ok(position) = messages.binary_search_by_key(&outcome.message_id, |message| message.id)
        else {
            continue;
        };
        let Some(message) = messages.get_mut(position) else {
            continue;
        };
        let Some(state) = usize::try_from(outcome.recipient_index)
            .ok()
            .and_then(|index| message.recipient_states.get_mut(index))
        else {
            continue;
        };
        state.attempts = state.attempts.saturating_add(1);
        state.last_attempt_unix_ms = Some(outcome.at_unix_ms);
        if outcome.kind.is_final() {
            state.final_outcome = Some(outcome.kind);
        }
    }
}

/// Points each message at its latest added-header-fields record: the last in journal
/// order (segment, then offset), which is append order for journal records, since they
/// only go to active segments, numbered in the order they were created. Records for
/// messages that are not in the spool are ignored.
fn apply_added_fields(
    messages: &mut [SpooledMessage],
    mut records: Vec<(RecordLocation, MessageId)>,
) {
    records.sort_unstable();
    for (location, id) in records {
        let Ok(position) = messages.binary_search_by_key(&id, |message| message.id) else {
            continue;
        };
        if let Some(message) = messages.get_mut(position) {
            message.added_fields = Some(location);
        }
    }
}

/// Reads a whole segment file into `buffer`. `Ok(false)` when the file is larger than
/// the format allows (nothing read).
fn read_segment_file(path: &Path, buffer: &mut Vec<u8>) -> io::Result<bool> {
    let file = File::open(path)?;
    let size_bytes = file.metadata()?.len();
    if size_bytes > format::MAX_SEGMENT_FILE_SIZE_BYTES {
        return Ok(false);
    }
    buffer.clear();
    // The bound keeps a file that grows while we read from growing the buffer past the
    // limit; segments are preallocated, so they normally never grow.
    file.take(format::MAX_SEGMENT_FILE_SIZE_BYTES)
        .read_to_end(buffer)?;
    Ok(true)
}

/// See [`crate::read_body`].
pub(crate) fn read_body(directory: &Path, message: &SpooledMessage) -> Result<Vec<u8>, SpoolError> {
    read_record_tail(
        directory,
        message.id,
        message.location,
        RecordType::Message,
        format::message_body_start,
    )
}

/// See [`crate::read_added_fields`].
pub(crate) fn read_added_fields(
    directory: &Path,
    id: MessageId,
    location: RecordLocation,
) -> Result<Vec<u8>, SpoolError> {
    read_record_tail(
        directory,
        id,
        location,
        RecordType::AddedFields,
        |payload| {
            format::parse_added_fields(payload)
                .map(|parsed| (parsed.message_id, parsed.fields_start))
        },
    )
}

/// The offline counterpart of the zero-copy lookup in `bodies`: reads the `record_type`
/// record at `location` with plain reads, checks its header and payload checksums, lets
/// `locate` check the payload's layout (it returns the id the payload names and where the
/// wanted part starts), checks the id, and returns the payload from there to its end.
fn read_record_tail(
    directory: &Path,
    id: MessageId,
    location: RecordLocation,
    record_type: RecordType,
    locate: impl FnOnce(&[u8]) -> Result<(MessageId, usize), &'static str>,
) -> Result<Vec<u8>, SpoolError> {
    let path = directory.join(format::segment_file_name(location.segment));
    let offset = location.offset_bytes;
    let corrupt = |reason| SpoolError::Corrupt {
        path: path.clone(),
        offset_bytes: offset,
        reason,
    };
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
    let mut header_bytes = [0u8; SEGMENT_HEADER_SIZE_BYTES];
    read_exactly_at(&file, &mut header_bytes, 0, &path)?
        .ok_or_else(|| SpoolError::NotASegment { path: path.clone() })?;
    let header = match SegmentHeader::decode(&header_bytes, size_bytes) {
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
    if offset < u64::from(header.header_size_bytes) {
        return Err(corrupt("record offset lies inside the segment header"));
    }
    let mut record_header_bytes = [0u8; RECORD_HEADER_SIZE_BYTES];
    read_exactly_at(&file, &mut record_header_bytes, offset, &path)?
        .ok_or_else(|| corrupt("record header extends past the end of the segment"))?;
    let record_header =
        format::decode_record_header(&record_header_bytes, header.salt).map_err(corrupt)?;
    if record_header.record_type != record_type as u16 {
        return Err(corrupt(record_type.mismatch_reason()));
    }
    // Bounded by MAX_RECORD_PAYLOAD_BYTES: decode_record_header refuses larger lengths.
    let mut payload = vec![0u8; record_header.payload_length];
    let payload_offset = offset + RECORD_HEADER_SIZE_BYTES as u64;
    read_exactly_at(&file, &mut payload, payload_offset, &path)?
        .ok_or_else(|| corrupt("record extends past the end of the segment"))?;
    format::verify_payload(&record_header, &payload, header.salt).map_err(corrupt)?;
    let (stored_id, start) = locate(&payload).map_err(corrupt)?;
    if stored_id != id {
        return Err(corrupt("record holds a different message id"));
    }
    if start > payload.len() {
        return Err(corrupt("wanted bytes lie outside their record"));
    }
    payload.drain(..start);
    Ok(payload)
}

/// `read_exact_at` that tells end-of-file (`Ok(None)`) apart from other errors.
fn read_exactly_at(
    file: &File,
    buffer: &mut [u8],
    offset: u64,
    path: &Path,
) -> Result<Option<()>, SpoolError> {
    match file.read_exact_at(buffer, offset) {
        Ok(()) => Ok(Some(())),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(io_error(format!(
            "reading {} at offset {offset}",
            path.display()
        ))(error)),
    }
}

/// The highest segment number a file in `quarantine/` is named after (copies and their
/// temporary files), or `None` when there is none or the directory cannot be listed.
/// Segment numbers of reclaimed segments may be used again by a later writer session; the
/// writer numbers new segments above these so that a copy's name never refers to two
/// different segments.
pub(crate) fn highest_quarantined_segment_number(directory: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(directory.join(QUARANTINE_DIRECTORY_NAME)).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let digits = name.to_str()?.get(..16)?;
            if !digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return None;
            }
            u64::from_str_radix(digits, 16).ok()
        })
        .max()
}

/// Where the copy of a damaged extent goes: one file per extent, named after its place,
/// so a second recovery of the same damage finds the copy already there.
pub(crate) fn quarantine_path(directory: &Path, extent: &DamagedExtent) -> PathBuf {
    let suffix = match extent.kind {
        DamageKind::Quarantined => "record",
        DamageKind::TornTail => "torn",
    };
    directory.join(QUARANTINE_DIRECTORY_NAME).join(format!(
        "{:016x}-{:016x}.{suffix}",
        extent.segment_number, extent.offset_bytes
    ))
}

/// Copies a damaged extent's raw bytes into the quarantine directory (written to a
/// temporary name, synced, then renamed into place). Returns `false` when the copy already
/// existed.
pub(crate) fn copy_to_quarantine(
    directory: &Path,
    extent: &DamagedExtent,
) -> Result<bool, SpoolError> {
    let target = quarantine_path(directory, extent);
    if target.exists() {
        return Ok(false);
    }
    let quarantine = directory.join(QUARANTINE_DIRECTORY_NAME);
    if !quarantine.is_dir() {
        std::fs::create_dir_all(&quarantine)
            .map_err(io_error(format!("creating {}", quarantine.display())))?;
        crate::writer::sync_directory(directory)?;
    }
    let source = File::open(&extent.segment_path).map_err(io_error(format!(
        "opening {}",
        extent.segment_path.display()
    )))?;
    let mut temporary_name = target.clone().into_os_string();
    temporary_name.push(TEMPORARY_SUFFIX);
    let temporary = PathBuf::from(temporary_name);
    let destination =
        File::create(&temporary).map_err(io_error(format!("creating {}", temporary.display())))?;
    let mut chunk = vec![0u8; QUARANTINE_COPY_CHUNK_BYTES];
    let mut copied = 0u64;
    while copied < extent.length_bytes {
        let want = (extent.length_bytes - copied).min(QUARANTINE_COPY_CHUNK_BYTES as u64) as usize;
        let part = chunk.get_mut(..want).unwrap_or_default();
        let at = extent.offset_bytes + copied;
        if read_exactly_at(&source, part, at, &extent.segment_path)?.is_none() {
            // The extent came from this file's bytes, so it cannot end early unless the
            // file shrank; keep what there is.
            break;
        }
        destination
            .write_all_at(part, copied)
            .map_err(io_error(format!("writing {}", temporary.display())))?;
        copied += want as u64;
    }
    destination
        .sync_all()
        .map_err(io_error(format!("syncing {}", temporary.display())))?;
    std::fs::rename(&temporary, &target).map_err(io_error(format!(
        "renaming {} to {}",
        temporary.display(),
        target.display()
    )))?;
    crate::writer::sync_directory(&quarantine)?;
    Ok(true)
}
