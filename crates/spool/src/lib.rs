//! The spool: every accepted message is a record in an append-only, preallocated,
//! memory-mapped segment file, made durable by group commit before the client hears 250.
//!
//! The byte layout is specified in `spool-format/README.md`; this crate implements it and
//! knows nothing of SMTP.
//!
//! * [`Spool`]: the one writer of a spool directory (holds its lock), with a committer
//!   thread that syncs everything appended since the last sync in one go and tells
//!   subscribers which sequence numbers are now durable.
//! * [`Spool::body`]: a message body for a delivery worker, zero-copy: a [`Body`] derefs to
//!   the bytes inside a read-only shared mapping of the segment (cached per segment), after
//!   the record's checksums and message id were verified. It works for the segment being
//!   appended to as well, and a `Body` stays readable after its segment is reclaimed.
//!   [`Spool::added_fields`] lends the header fields a message gained after spooling
//!   (DKIM signatures) the same way, through the same verified lookup.
//! * [`Spool::reclaim`]: deletes the segments whose messages are all done, in an order
//!   that never lets a done message come back after a crash (`spool-format/README.md`,
//!   "Reclaim"). Cheap when there is nothing to delete; any thread may call it.
//! * [`scan`]: read-only recovery scan, used by `Spool::open` and by offline tools;
//!   [`read_body`] and [`read_added_fields`] read one message's body or added header
//!   fields back for them, checksum verified, into a buffer. (Offline tools get no
//!   zero-copy variant: without the directory lock a reader cannot know which bytes a
//!   running writer is still writing, and lending out a `&[u8]` over bytes that change is
//!   undefined behaviour.)
//! * [`format`](mod@format): the byte layout as code (constants, encoders, decoders) and
//!   [`scan_segment_bytes`], the pure scanner over one segment's bytes that the fuzzer
//!   drives and that tools can use to read journal records.
//!
//! Module map: `format` (bytes only, no I/O), `reader` (scan, offline bodies, quarantine
//! copies; plain reads), `writer` (segment creation, appends, the committer, reclaim
//! passes), `reclaim` (which segments may go, in what order; bookkeeping only), `bodies`
//! (the read mappings behind [`Spool::body`]), `mmap` (the only `unsafe` code: the
//! writable and the read-only mappings of a segment).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod bodies;
pub mod format;
mod mmap;
mod reader;
mod reclaim;
mod writer;

#[cfg(test)]
mod tests;

pub use format::scan_segment_bytes;
pub use writer::{MAX_SEGMENT_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES};

/// A message id: unique within a spool, increasing with time. Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(MessageId)
    }
}

/// Where a record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordLocation {
    pub segment: u64,
    pub offset_bytes: u64,
}

/// The envelope of a message, as the server hands it to [`Spool::append_message`].
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub received_at_unix_ms: u64,
    pub client_address: SocketAddr,
    /// The EHLO/HELO argument.
    pub helo: &'a str,
    pub authenticated_user: Option<&'a str>,
    /// The reverse path without angle brackets; empty for the null path `<>`.
    pub mail_from: &'a str,
    /// MAIL FROM parameters as text (`BODY=8BITMIME SMTPUTF8`), empty when none.
    pub mail_parameters: &'a str,
    /// Recipient mailboxes without angle brackets. Invariant: not empty.
    pub recipients: &'a [String],
}

/// Options for [`Spool::open`].
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Size a new segment file is preallocated to. A record larger than this gets a
    /// segment of its own, sized to fit.
    pub segment_size_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
        }
    }
}

/// 64 MiB: large enough that segment creation (one fallocate + two fsyncs) is rare,
/// small enough that reclaim frees space in useful steps.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 * 1024 * 1024;

/// What `append_message` gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    pub id: MessageId,
    /// Commit sequence number: the message is durable once a [`CommitNotice`] with
    /// `through_sequence >= sequence` and `Ok` result has been published.
    pub sequence: u64,
    pub location: RecordLocation,
}

/// Published by the committer after each sync. Cumulative: it covers every sequence
/// number greater than the previous notice's `through_sequence` and up to this one.
#[derive(Debug, Clone)]
pub struct CommitNotice {
    pub through_sequence: u64,
    /// `Err` when the sync failed: those records must not be acknowledged (reply 451).
    pub result: Result<(), Arc<str>>,
}

/// Callback the committer calls after each sync, from its own thread. Must not block.
pub type CommitSubscriber = Box<dyn Fn(&CommitNotice) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "spool directory {path} is locked by another process (is another tsubame running on it?)"
    )]
    Locked { path: PathBuf },
    #[error("spool is out of disk space")]
    DiskFull,
    #[error("record of {size_bytes} bytes is larger than the spool allows")]
    RecordTooLarge { size_bytes: u64 },
    #[error("{path}: unsupported spool format version {major}.{minor}")]
    UnsupportedVersion {
        path: PathBuf,
        major: u16,
        minor: u16,
    },
    #[error("{path}: not a tsubame spool segment")]
    NotASegment { path: PathBuf },
    #[error("added header fields of {size_bytes} bytes refused: {reason}")]
    InvalidAddedFields {
        size_bytes: usize,
        reason: &'static str,
    },
    #[error("message {id} not found in the spool")]
    NotFound { id: MessageId },
    #[error("{path}: record at offset {offset_bytes} is corrupt: {reason}")]
    Corrupt {
        path: PathBuf,
        offset_bytes: u64,
        reason: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The writer of one spool directory. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<writer::Handle>,
}

// The server shares one `Spool` between its event-loop threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Spool>();
};

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").finish_non_exhaustive()
    }
}

impl Spool {
    /// Creates the directory if needed, takes its lock (refusing with
    /// [`SpoolError::Locked`] when another process holds it), runs recovery, and starts
    /// the committer thread. New records always go to a new segment.
    pub fn open(
        directory: &Path,
        options: SpoolOptions,
    ) -> Result<(Spool, ScanReport), SpoolError> {
        let (handle, report) = writer::open(directory, &options)?;
        Ok((
            Spool {
                inner: Arc::new(handle),
            },
            report,
        ))
    }

    /// Copies one message record into the active segment. Never blocks on disk I/O in
    /// the common case (the committer pre-creates the next segment); the record becomes
    /// durable at the next commit. `DiskFull` leaves everything appended before intact,
    /// and a later call retries creating a segment.
    pub fn append_message(
        &self,
        envelope: &Envelope<'_>,
        body: &[u8],
    ) -> Result<AppendReceipt, SpoolError> {
        self.inner.shared.append_message(envelope, body)
    }

    /// Journals one delivery attempt's outcome for one recipient of a spooled message.
    /// Like a message, it is durable once a commit notice covers the returned sequence.
    /// `reply_text` is cut to [`format::MAX_REPLY_TEXT_BYTES`] at a character boundary.
    pub fn append_recipient_outcome(
        &self,
        id: MessageId,
        recipient_index: u32,
        kind: format::OutcomeKind,
        at_unix_ms: u64,
        reply_text: &str,
    ) -> Result<u64, SpoolError> {
        let payload =
            format::encode_recipient_outcome(id, recipient_index, kind, at_unix_ms, reply_text);
        let (_, sequence) = self.inner.shared.append_journal_record(
            format::RecordType::RecipientOutcome,
            id,
            &payload,
        )?;
        Ok(sequence)
    }

    /// Journals that a message is done (every recipient final, or deleted by an
    /// operator): it is never delivered again, and once a successful commit notice covers
    /// the returned sequence, [`Spool::reclaim`] counts it as done. (If the notice reports
    /// a failure, it does not count; append it again.)
    pub fn append_message_done(
        &self,
        id: MessageId,
        at_unix_ms: u64,
        reason: format::DoneReason,
    ) -> Result<u64, SpoolError> {
        let payload = format::encode_message_done(id, at_unix_ms, reason);
        let (_, sequence) = self.inner.shared.append_journal_record(
            format::RecordType::MessageDone,
            id,
            &payload,
        )?;
        Ok(sequence)
    }

    /// Journals header fields to put before message `id`'s stored content whenever it is
    /// sent (DKIM-Signature, List-Unsubscribe), so that retries and restarts reuse them. A
    /// later record for the same message replaces an earlier one. `fields` are complete
    /// header fields, each ending in CRLF, at most [`format::MAX_ADDED_FIELDS_BYTES`] in
    /// all; anything else is refused with [`SpoolError::InvalidAddedFields`], never cut.
    ///
    /// Returns where the record went (for [`Spool::added_fields`]) and its commit sequence:
    /// like a message, it is durable once a commit notice covers the sequence.
    pub fn append_added_fields(
        &self,
        id: MessageId,
        at_unix_ms: u64,
        fields: &str,
    ) -> Result<(RecordLocation, u64), SpoolError> {
        let payload = format::encode_added_fields(id, at_unix_ms, fields).map_err(|reason| {
            SpoolError::InvalidAddedFields {
                size_bytes: fields.len(),
                reason,
            }
        })?;
        self.inner
            .shared
            .append_journal_record(format::RecordType::AddedFields, id, &payload)
    }

    /// The added header fields of message `id` from the record at `location` (returned by
    /// [`Spool::append_added_fields`], or [`SpooledMessage::added_fields`]), lent without a
    /// copy like [`Spool::body`], with the same checks: record checksums, that it is an
    /// added-fields record, that it names `id`, and the format's rule on the fields (at
    /// most [`format::MAX_ADDED_FIELDS_BYTES`], empty or ending in CRLF). Errors as for
    /// [`Spool::body`].
    pub fn added_fields(
        &self,
        id: MessageId,
        location: RecordLocation,
    ) -> Result<AddedFields, SpoolError> {
        self.inner.shared.bodies.added_fields(id, location)
    }

    /// The body of message `id`, whose record starts at `location` (from its
    /// [`AppendReceipt`] or [`SpooledMessage`]), without copying it: the [`Body`] borrows
    /// from a read-only shared mapping of the segment, which it keeps alive. Works for
    /// any segment, the one being appended to included, and never blocks on appends.
    ///
    /// Verifies the record's header and payload checksums (CRC32C, about 2 µs for 64 KiB),
    /// that it is a message record and that it holds `id`; fails with
    /// [`SpoolError::Corrupt`] otherwise, including for a location that is not the start of
    /// a record written so far, and with [`SpoolError::NotFound`] when the segment file does
    /// not exist (reclaimed: the message was done).
    pub fn body(&self, id: MessageId, location: RecordLocation) -> Result<Body, SpoolError> {
        self.inner.shared.bodies.body(id, location)
    }

    /// Deletes every segment that the format's reclaim rule lets go: not the active or
    /// spare segment, nothing of it waiting for a sync, every message in it done (its
    /// message-done record durable), every message its journal records name in a segment
    /// already deleted, and any damage in it copied to `quarantine/`. Each round of
    /// deletions is made durable with a directory `fsync` before segments depending on it
    /// are considered. Segments found at open whose messages are all done go on the first
    /// call.
    ///
    /// Cheap when nothing is deletable (a look at each live segment's counters under the
    /// writer's mutex); passes from several threads run one after the other. On an I/O
    /// error the pass stops; segments it unlinked are finished by the next pass.
    pub fn reclaim(&self) -> Result<ReclaimReport, SpoolError> {
        self.inner.shared.reclaim()
    }

    /// Registers a callback for commit notices. The callback runs on the committer thread
    /// and must neither block nor call back into this `Spool`'s `subscribe` or `shutdown`.
    pub fn subscribe(&self, subscriber: CommitSubscriber) {
        self.inner.subscribe(subscriber);
    }

    /// How long the commits' syncs took so far: one observation per group commit.
    pub fn sync_latency(&self) -> tsubame_metrics::HistogramSnapshot {
        self.inner.shared.sync_latency.snapshot()
    }

    /// The segment files in the spool directory now: how many, and the bytes they
    /// occupy on disk (allocated blocks, so a preallocated spare counts in full).
    pub fn disk_usage(&self) -> std::io::Result<DiskUsage> {
        use std::os::unix::fs::MetadataExt;
        let mut usage = DiskUsage::default();
        for entry in std::fs::read_dir(self.inner.shared.directory())? {
            let entry = entry?;
            let name = entry.file_name();
            if name
                .to_str()
                .and_then(format::parse_segment_file_name)
                .is_none()
            {
                continue;
            }
            // A segment reclaimed between the listing and this look is simply not counted.
            if let Ok(metadata) = entry.metadata() {
                usage.segments += 1;
                usage.bytes += metadata.blocks().saturating_mul(512);
            }
        }
        Ok(usage)
    }

    /// Stops the committer after a final sync (its notice is published before this
    /// returns) and removes the unused spare segment. Appends after this fail with
    /// [`SpoolError::Io`] of kind `BrokenPipe`. Also happens when the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// What [`Spool::disk_usage`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub segments: u64,
    pub bytes: u64,
}

/// A message body lent straight out of the spool: derefs to the bytes inside a read-only
/// shared mapping of its segment (no copy), and keeps that mapping alive, so it stays valid
/// after its segment is sealed or even reclaimed (the file's space is freed once the last
/// `Body` of it is dropped). Hold it for one delivery, not longer.
///
/// A disk read error while the kernel pages the bytes in raises SIGBUS, as with any file
/// mapping; recovery reads every segment in full at start, so a segment that cannot be
/// read then is kept out of the queue and its bodies are never mapped.
pub struct Body {
    bytes: mmap::MappedBytes,
    location: RecordLocation,
}

// Delivery workers are plain threads that pass bodies around.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Body>();
};

impl Body {
    /// Where the message record starts.
    pub fn location(&self) -> RecordLocation {
        self.location
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

/// Shows where the body is and its size, never its content (message bodies stay out of
/// logs).
impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("location", &self.location)
            .field("size_bytes", &self.bytes.as_slice().len())
            .finish()
    }
}

/// Header fields a message gained after it was spooled, lent straight out of the spool
/// like a [`Body`] (same mapping, same lifetime rules): derefs to complete header fields,
/// each ending in CRLF (UTF-8, checked when lent), to send before the body.
pub struct AddedFields {
    bytes: mmap::MappedBytes,
    location: RecordLocation,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AddedFields>();
};

impl AddedFields {
    /// Where the added-fields record starts.
    pub fn location(&self) -> RecordLocation {
        self.location
    }
}

impl std::ops::Deref for AddedFields {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

impl AsRef<[u8]> for AddedFields {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

/// Shows where the fields are and their size, like [`Body`]'s.
impl std::fmt::Debug for AddedFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddedFields")
            .field("location", &self.location)
            .field("size_bytes", &self.bytes.as_slice().len())
            .finish()
    }
}

/// What one [`Spool::reclaim`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Segments whose deletion this pass completed (unlinked and the directory synced).
    pub segments_deleted: usize,
    /// Sum of the sizes of the segment files this pass unlinked. Space held by a [`Body`]
    /// still in use is freed when it is dropped.
    pub bytes_freed: u64,
}

/// State of a spooled message as recovery sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Accepted and not yet finally delivered or bounced.
    Queued,
    /// Every recipient has a final outcome (journal records; delivery issue).
    Done,
}

/// A message found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledMessage {
    pub id: MessageId,
    pub location: RecordLocation,
    pub received_at_unix_ms: u64,
    pub client_address: String,
    pub helo: String,
    pub authenticated_user: Option<String>,
    pub mail_from: String,
    pub mail_parameters: String,
    pub recipients: Vec<String>,
    pub body_size_bytes: u64,
    pub state: MessageState,
    /// Per recipient, in the order of `recipients`: what the journal says so far.
    /// Invariant: `recipient_states.len() == recipients.len()`.
    pub recipient_states: Vec<RecipientState>,
    /// The latest added-header-fields record naming this message (scan order), whose
    /// fields go before the body when it is sent: read them with [`Spool::added_fields`]
    /// or [`read_added_fields`]. `None` when there is none.
    pub added_fields: Option<RecordLocation>,
}

/// What the journal records of one recipient add up to, for the scheduler at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecipientState {
    /// The final outcome, if one was recorded (no further attempt follows).
    pub final_outcome: Option<format::OutcomeKind>,
    /// Delivery attempts recorded (deferred ones included).
    pub attempts: u32,
    /// When the latest attempt was recorded.
    pub last_attempt_unix_ms: Option<u64>,
}

/// A record that failed its checksum or framing, kept out of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRecord {
    pub segment_path: PathBuf,
    pub offset_bytes: u64,
    pub reason: &'static str,
}

/// An incomplete record at the end of a segment (a write the crash interrupted; never
/// acknowledged, because its sync had not returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment_path: PathBuf,
    pub offset_bytes: u64,
}

/// Result of a recovery scan.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    /// In id order.
    pub messages: Vec<SpooledMessage>,
    pub quarantined: Vec<QuarantinedRecord>,
    pub torn_tails: Vec<TornTail>,
    pub segment_count: usize,
}

/// Scans a spool directory read-only (no lock taken): every segment, every record,
/// checksums verified. Unknown major versions are an error.
pub fn scan(directory: &Path) -> Result<ScanReport, SpoolError> {
    reader::scan_directory(directory).map(|scan| scan.report)
}

/// Reads one message's body (verifying its checksum).
pub fn read_body(directory: &Path, message: &SpooledMessage) -> Result<Vec<u8>, SpoolError> {
    reader::read_body(directory, message)
}

/// Reads the added header fields of message `id` from the record at `location` (see
/// [`SpooledMessage::added_fields`]), verifying checksums, type, id and the fields rule.
pub fn read_added_fields(
    directory: &Path,
    id: MessageId,
    location: RecordLocation,
) -> Result<Vec<u8>, SpoolError> {
    reader::read_added_fields(directory, id, location)
}

/// Wraps an I/O error with what was being done, for `map_err`.
fn io_error(context: String) -> impl FnOnce(std::io::Error) -> SpoolError {
    move |source| SpoolError::Io { context, source }
}
