//! The writer of a spool directory: segment creation, appends, and the committer thread
//! that makes appends durable in groups.
//!
//! Appenders (the server's event-loop threads) take one mutex, copy the record into the
//! mapped active segment, take the next commit sequence number, note the dirty byte range
//! and wake the committer. The committer snapshots the highest sequence and the dirty
//! ranges under the same mutex (so every record up to that sequence is completely copied),
//! syncs the ranges without holding it, and publishes one [`CommitNotice`] for all of them.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use tracing::{debug, error, info, warn};

use crate::bodies::Bodies;
use crate::format::{self, RecordType, SEGMENT_HEADER_SIZE_BYTES, Salt, SegmentHeader};
use crate::mmap::{MappingAppender, PreallocatedSegment, ReadMapping, SyncableMapping};
use crate::reader::{self, TEMPORARY_SUFFIX};
use crate::reclaim::{ReclaimTracker, RecoveredSegment, TrackedRecord};
use crate::{
    AppendReceipt, CommitNotice, CommitSubscriber, Envelope, MessageId, ReclaimReport,
    RecordLocation, ScanReport, SpoolError, SpoolOptions, io_error,
};

/// Name of the lock file inside the spool directory.
pub(crate) const LOCK_FILE_NAME: &str = "LOCK";

/// Smallest `segment_size_bytes` accepted: one page, room for the header and a small
/// record. Only tests use segments this small.
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 4096;

/// Largest `segment_size_bytes` accepted; larger would exceed what readers accept.
pub const MAX_SEGMENT_SIZE_BYTES: u64 = format::MAX_SEGMENT_FILE_SIZE_BYTES / 2;

/// Segment sizes are rounded up to this, so that every segment ends on a page boundary
/// and `msync` ranges never reach past the file.
const SEGMENT_SIZE_GRANULE_BYTES: u64 = 4096;

/// How long the committer lets appends gather before a sync when the previous sync
/// ended less than `COMMIT_BUSY_WINDOW` ago (a busy relay). Measured end to end against
/// no gathering, same run: 7–10 % less CPU per message at 1 and 10 KiB, throughput up;
/// 400 µs did better than 150 µs. An idle relay syncs at once, as before.
const COMMIT_GATHER: Duration = Duration::from_micros(400);
const COMMIT_BUSY_WINDOW: Duration = Duration::from_millis(1);

/// How long the committer waits before it tries to pre-create a spare segment again after
/// a failure (usually a full disk), so it does not retry on every commit.
const SPARE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by the spool handles and the committer thread.
pub(crate) struct Shared {
    directory: PathBuf,
    /// Invariant: between MIN and MAX_SEGMENT_SIZE_BYTES, a multiple of the granule.
    segment_size_bytes: u64,
    /// Mixed into every record checksum written in this session; stored in each segment
    /// header.
    salt: Salt,
    state: Mutex<WriterState>,
    /// Signalled when an append, a spare request or shutdown needs the committer.
    wake_committer: Condvar,
    subscribers: Mutex<Vec<CommitSubscriber>>,
    /// The highest message id handed out (or recovered). Ids only grow.
    last_id: AtomicU64,
    /// Read-only mappings of the segments, for [`crate::Spool::body`].
    pub(crate) bodies: Bodies,
    /// Held for a whole reclaim pass, so that two passes never delete the same segments.
    reclaim_pass: Mutex<()>,
    /// How long each commit's msync took (one per group commit, whatever its size).
    pub(crate) sync_latency: tsubame_metrics::Histogram,
    /// Holds the exclusive `flock` on `LOCK` for as long as the spool is open.
    _lock_file: File,
    /// Test hook: segment creation fails with `DiskFull` while set.
    #[cfg(test)]
    pub(crate) fail_segment_creation: AtomicBool,
    /// Test hook: the next sync of a dirty range fails as if msync had returned EIO.
    #[cfg(test)]
    pub(crate) fail_next_sync: AtomicBool,
    /// Test hook: while set, the committer takes no batch, so appends stay unsynced.
    #[cfg(test)]
    hold_commits: AtomicBool,
}

/// Everything appenders and the committer coordinate on.
struct WriterState {
    /// Where appends go. `None` before the first segment could be created, after a full
    /// disk, and after a failed sync sealed the previous one.
    active: Option<OpenSegment>,
    /// Created ahead by the committer so that appends rarely create files.
    spare: Option<OpenSegment>,
    /// Invariant: greater than the number of every segment file in the directory.
    next_segment_number: u64,
    /// The sequence number of the latest append. Starts at 0; the first append gets 1.
    appended_sequence: u64,
    /// Byte ranges appended since the committer's last snapshot, in append order, at most
    /// one entry per consecutive run in one segment.
    dirty: Vec<DirtyRange>,
    /// Set by an appender when the active segment is over half full and no spare exists.
    spare_wanted: bool,
    spare_creation_running: bool,
    spare_retry_not_before: Option<Instant>,
    /// Once set, appends fail and the committer exits after its final sync.
    shut_down: bool,
    /// What reclaim needs to know about every segment that may some day be deleted.
    tracker: ReclaimTracker,
    /// The committer is blocked on `wake_committer`. Appenders signal the condition
    /// variable only then: a committer that is syncing re-checks `appended_sequence`
    /// under this lock before it waits again, so no append is missed, and the common
    /// case under load (the committer busy syncing) costs no futex syscall per append.
    committer_waiting: bool,
}

/// A segment file as the committer needs it.
struct SegmentFile {
    number: u64,
    path: PathBuf,
    mapping: Arc<SyncableMapping>,
    /// Set when a sync of this segment failed: after a failed fsync the kernel may have
    /// dropped the dirty pages and marked them clean ("fsyncgate"), so no later sync of
    /// this file proves anything. Nothing is appended to it any more.
    poisoned: AtomicBool,
}

/// A segment that can still be appended to.
struct OpenSegment {
    segment: Arc<SegmentFile>,
    appender: MappingAppender,
}

impl OpenSegment {
    fn is_empty(&self) -> bool {
        self.appender.cursor() == SEGMENT_HEADER_SIZE_BYTES
    }
}

struct DirtyRange {
    segment: Arc<SegmentFile>,
    /// Invariant: `start < end <= segment.mapping.len()`.
    start: usize,
    end: usize,
}

impl Shared {
    pub(crate) fn directory(&self) -> &Path {
        &self.directory
    }

    fn lock_state(&self) -> MutexGuard<'_, WriterState> {
        // A panic while the lock was held cannot leave a half-copied record behind that a
        // commit would cover: the sequence number is taken after the copy. So the state
        // is usable after a poisoning panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_message_id(&self) -> Result<MessageId, SpoolError> {
        let now = now_unix_us();
        let next = |previous: u64| previous.checked_add(1).map(|next| next.max(now));
        match self
            .last_id
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, next)
        {
            Ok(previous) => next(previous).map(MessageId).ok_or_else(id_space_exhausted),
            Err(_) => Err(id_space_exhausted()),
        }
    }

    pub(crate) fn append_message(
        &self,
        envelope: &Envelope<'_>,
        body: &[u8],
    ) -> Result<AppendReceipt, SpoolError> {
        if envelope.recipients.is_empty() {
            return Err(SpoolError::Io {
                context: "appending a message without recipients".to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no recipients"),
            });
        }
        let id = self.next_message_id()?;
        let prefix = format::encode_message_prefix(id, envelope, body.len())
            .map_err(|size_bytes| SpoolError::RecordTooLarge { size_bytes })?;
        // encode_message_prefix checked the sum against MAX_RECORD_PAYLOAD_BYTES.
        let payload_length = prefix.len() + body.len();
        let payload_checksum = self.salt.checksum(&[&prefix, body]);
        let header = format::encode_record_header(
            self.salt,
            RecordType::Message,
            payload_length as u32,
            payload_checksum,
        );
        let (location, sequence) =
            self.append_record(&[&header, &prefix, body], TrackedRecord::Message(id))?;
        Ok(AppendReceipt {
            id,
            sequence,
            location,
        })
    }

    /// Appends one framed record (header and payload parts) and returns where it went and
    /// its commit sequence number. `record` says what it is, for reclaim's bookkeeping.
    fn append_record(
        &self,
        parts: &[&[u8]],
        record: TrackedRecord,
    ) -> Result<(RecordLocation, u64), SpoolError> {
        let written: usize = parts.iter().map(|part| part.len()).sum();
        let reserved = format::align_record_size(written).ok_or(SpoolError::RecordTooLarge {
            size_bytes: written as u64,
        })?;
        let capacity = (self.segment_size_bytes as usize).saturating_sub(SEGMENT_HEADER_SIZE_BYTES);
        let mut state = self.lock_state();
        if state.shut_down {
            return Err(shut_down_error());
        }
        let (segment, offset) = if reserved > capacity {
            // A record bigger than a segment gets a segment of its own, sealed right away;
            // the active segment stays as it is.
            let size_bytes =
                round_up_to_granule(SEGMENT_HEADER_SIZE_BYTES as u64 + reserved as u64);
            let number = state.take_segment_number();
            let mut own = self.create_segment(number, size_bytes)?;
            state.tracker.add_created_segment(number, size_bytes);
            let offset = own.appender.append(parts, reserved).ok_or_else(|| {
                invariant_broken("a dedicated segment has no room for its record")
            })?;
            (Arc::clone(&own.segment), offset)
        } else {
            let active = self.active_with_room(&mut state, reserved)?;
            let offset = active
                .appender
                .append(parts, reserved)
                .ok_or_else(|| invariant_broken("the active segment has no room after all"))?;
            (Arc::clone(&active.segment), offset)
        };
        state.appended_sequence += 1;
        let sequence = state.appended_sequence;
        let location = RecordLocation {
            segment: segment.number,
            offset_bytes: offset as u64,
        };
        state
            .tracker
            .record_appended(location.segment, record, sequence);
        state.mark_dirty(segment, offset, offset + written);
        self.request_spare_if_due(&mut state);
        let committer_waiting = state.committer_waiting;
        drop(state);
        if committer_waiting {
            self.wake_committer.notify_one();
        }
        Ok((location, sequence))
    }

    /// The active segment, after making sure it has `reserved` bytes free: a full or
    /// poisoned active segment is sealed and replaced by the spare or a new segment.
    fn active_with_room<'s>(
        &self,
        state: &'s mut WriterState,
        reserved: usize,
    ) -> Result<&'s mut OpenSegment, SpoolError> {
        let fits = |open: &OpenSegment| {
            open.appender.remaining() >= reserved && !open.segment.poisoned.load(Ordering::Acquire)
        };
        if !state.active.as_ref().is_some_and(fits) {
            // Sealing is just forgetting the appender: the dirty ranges keep the mapping
            // alive until the committer has synced them.
            state.active = None;
            if let Some(spare) = state.spare.take_if(|spare| fits(spare)) {
                state.active = Some(spare);
            } else {
                let number = state.take_segment_number();
                state.active = Some(self.create_segment(number, self.segment_size_bytes)?);
                state
                    .tracker
                    .add_created_segment(number, self.segment_size_bytes);
            }
        }
        state
            .active
            .as_mut()
            .ok_or_else(|| invariant_broken("no active segment after installing one"))
    }

    fn request_spare_if_due(&self, state: &mut WriterState) {
        let Some(active) = &state.active else { return };
        let used = active.appender.cursor();
        let half = active.segment.mapping.len() / 2;
        if used > half
            && state.spare.is_none()
            && !state.spare_creation_running
            && !state.spare_wanted
            && state
                .spare_retry_not_before
                .is_none_or(|not_before| Instant::now() >= not_before)
        {
            state.spare_wanted = true;
        }
    }

    /// Creates segment `number` of `size_bytes` as the format document's "Segment
    /// creation" describes: temporary name, fallocate, header, fsync, rename, directory
    /// fsync; then maps it.
    fn create_segment(&self, number: u64, size_bytes: u64) -> Result<OpenSegment, SpoolError> {
        #[cfg(test)]
        if self.fail_segment_creation.load(Ordering::Acquire) {
            return Err(SpoolError::DiskFull);
        }
        let path = self.directory.join(format::segment_file_name(number));
        let mut temporary_name = path.clone().into_os_string();
        temporary_name.push(TEMPORARY_SUFFIX);
        let temporary = PathBuf::from(temporary_name);
        let created = self.create_segment_file(number, size_bytes, &temporary, &path);
        if created.is_err() {
            // Never held a record; ignore failure to remove it (recovery removes it too).
            let _ = std::fs::remove_file(&temporary);
        }
        let (appender, read_mapping) = created?;
        self.bodies
            .register_created(number, read_mapping, self.salt);
        Ok(OpenSegment {
            segment: Arc::new(SegmentFile {
                number,
                path,
                mapping: Arc::clone(appender.mapping()),
                poisoned: AtomicBool::new(false),
            }),
            appender,
        })
    }

    fn create_segment_file(
        &self,
        number: u64,
        size_bytes: u64,
        temporary: &Path,
        path: &Path,
    ) -> Result<(MappingAppender, ReadMapping), SpoolError> {
        let context = |what: &str| format!("{what} new spool segment {}", temporary.display());
        let segment = PreallocatedSegment::create(temporary, size_bytes).map_err(|source| {
            if is_disk_full(&source) {
                SpoolError::DiskFull
            } else {
                SpoolError::Io {
                    context: context("creating and preallocating (fallocate)"),
                    source,
                }
            }
        })?;
        let header = SegmentHeader::new(number, now_unix_us(), self.salt, size_bytes).encode();
        segment
            .file()
            .write_all_at(&header, 0)
            .map_err(io_error(context("writing the header of")))?;
        segment
            .file()
            .sync_all()
            .map_err(io_error(context("syncing")))?;
        std::fs::rename(temporary, path).map_err(io_error(format!(
            "renaming {} to {}",
            temporary.display(),
            path.display()
        )))?;
        sync_directory(&self.directory)?;
        segment
            .map(SEGMENT_HEADER_SIZE_BYTES)
            .map_err(io_error(format!(
                "mapping spool segment {}",
                path.display()
            )))
    }

    fn publish(&self, notice: &CommitNotice) {
        let subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for subscriber in subscribers.iter() {
            // A panicking subscriber must not take the committer down with it: every
            // later append would then wait for a commit forever.
            let call = std::panic::AssertUnwindSafe(|| subscriber(notice));
            if std::panic::catch_unwind(call).is_err() {
                error!(
                    through_sequence = notice.through_sequence,
                    "spool commit subscriber panicked"
                );
            }
        }
    }

    #[cfg(test)]
    fn injected_sync_failure(&self) -> Option<io::Result<()>> {
        self.fail_next_sync
            .swap(false, Ordering::AcqRel)
            .then(|| Err(io::Error::other("injected sync failure")))
    }

    #[cfg(not(test))]
    fn injected_sync_failure(&self) -> Option<io::Result<()>> {
        None
    }

    /// Appends a journal record (a recipient outcome or message-done payload for message
    /// `id`, built with the encoders of [`crate::format`]); durable like a message, at its
    /// sequence number.
    pub(crate) fn append_journal_record(
        &self,
        record_type: RecordType,
        id: MessageId,
        payload: &[u8],
    ) -> Result<(RecordLocation, u64), SpoolError> {
        let tracked = match record_type {
            RecordType::RecipientOutcome => TrackedRecord::RecipientOutcome(id),
            RecordType::MessageDone => TrackedRecord::MessageDone(id),
            RecordType::AddedFields => TrackedRecord::AddedFields(id),
            RecordType::Message => {
                return Err(invariant_broken(
                    "a message record was passed as a journal record",
                ));
            }
        };
        if payload.len() > format::MAX_RECORD_PAYLOAD_BYTES {
            return Err(SpoolError::RecordTooLarge {
                size_bytes: payload.len() as u64,
            });
        }
        let checksum = self.salt.checksum(&[payload]);
        let header =
            format::encode_record_header(self.salt, record_type, payload.len() as u32, checksum);
        self.append_record(&[&header, payload], tracked)
    }

    /// After a failed sync: stop appending to the poisoned segment.
    fn seal_poisoned_active(&self) {
        let mut state = self.lock_state();
        if state
            .active
            .as_ref()
            .is_some_and(|active| active.segment.poisoned.load(Ordering::Acquire))
        {
            state.active = None;
        }
    }

    fn create_spare(&self, number: u64) {
        let created = self.create_segment(number, self.segment_size_bytes);
        let mut state = self.lock_state();
        state.spare_creation_running = false;
        match created {
            Ok(spare) if state.spare.is_none() && !state.shut_down => {
                state.spare_retry_not_before = None;
                state
                    .tracker
                    .add_created_segment(number, spare.segment.mapping.len() as u64);
                state.spare = Some(spare);
            }
            Ok(unneeded) => {
                drop(state);
                self.remove_empty_segment(unneeded);
            }
            Err(error) => {
                state.spare_retry_not_before = Some(Instant::now() + SPARE_RETRY_INTERVAL);
                drop(state);
                warn!(segment = number, %error, "could not pre-create the next spool segment");
            }
        }
    }

    /// After the committer has stopped: removes the active and spare segments if no record
    /// was appended to them, so that restarts do not leave empty files behind.
    fn remove_empty_segments(&self) {
        let mut state = self.lock_state();
        let candidates = [state.active.take(), state.spare.take()];
        let empty: Vec<OpenSegment> = candidates
            .into_iter()
            .flatten()
            .filter(OpenSegment::is_empty)
            .collect();
        for open in &empty {
            state.tracker.forget_segment(open.segment.number);
        }
        drop(state);
        for open in empty {
            self.remove_empty_segment(open);
        }
    }

    fn remove_empty_segment(&self, open: OpenSegment) {
        let number = open.segment.number;
        let path = open.segment.path.clone();
        drop(open);
        let removed = std::fs::remove_file(&path)
            .map_err(io_error(format!(
                "removing empty spool segment {}",
                path.display()
            )))
            .and_then(|()| sync_directory(&self.directory));
        self.bodies.forget(number);
        if let Err(error) = removed {
            warn!(%error, "could not remove an empty spool segment");
        }
    }

    /// See [`crate::Spool::reclaim`]. Deletes in rounds (see `reclaim`): unlink every
    /// segment of the round, `fsync` the directory, forget them, then look again, because
    /// the deletions may have made further segments ready.
    pub(crate) fn reclaim(&self) -> Result<ReclaimReport, SpoolError> {
        let _pass = self
            .reclaim_pass
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut report = ReclaimReport::default();
        loop {
            let round = {
                let mut state = self.lock_state();
                let open: Vec<u64> = [&state.active, &state.spare]
                    .into_iter()
                    .flatten()
                    .map(|open| open.segment.number)
                    .collect();
                state.tracker.next_round(&open)
            };
            if round.is_empty() {
                if report.segments_deleted > 0 {
                    info!(
                        segments = report.segments_deleted,
                        bytes = report.bytes_freed,
                        "reclaimed spool segments whose messages are all done"
                    );
                }
                return Ok(report);
            }
            for deletable in &round {
                let path = self
                    .directory
                    .join(format::segment_file_name(deletable.number));
                match std::fs::remove_file(&path) {
                    Ok(()) => report.bytes_freed += deletable.size_bytes,
                    // An earlier pass unlinked it, then failed to sync the directory.
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => {
                        return Err(io_error(format!(
                            "removing reclaimed spool segment {}",
                            path.display()
                        ))(error));
                    }
                }
                debug!(segment = %path.display(), "reclaimed spool segment");
            }
            // Until this returns, the unlinks may be undone by a crash, so nothing that
            // depends on them (the next round) may go yet. On failure the segments stay
            // tracked and the next pass unlinks (finds them gone) and syncs again.
            sync_directory(&self.directory)?;
            let mut state = self.lock_state();
            for deletable in &round {
                state.tracker.segment_deleted(deletable.number);
            }
            drop(state);
            for deletable in &round {
                self.bodies.forget(deletable.number);
            }
            report.segments_deleted += round.len();
        }
    }

    #[cfg(test)]
    fn commits_held(&self) -> bool {
        self.hold_commits.load(Ordering::Acquire)
    }

    #[cfg(not(test))]
    fn commits_held(&self) -> bool {
        false
    }

    /// Test hook: stops (`true`) or resumes (`false`) the committer taking batches.
    #[cfg(test)]
    pub(crate) fn hold_commits(&self, hold: bool) {
        let state = self.lock_state();
        self.hold_commits.store(hold, Ordering::Release);
        drop(state);
        self.wake_committer.notify_all();
    }

    /// Test hook: the numbers of the active and spare segments, once no spare segment is
    /// wanted or being created (whose file could appear in the directory before it is
    /// installed as the spare).
    #[cfg(test)]
    pub(crate) fn open_segment_numbers(&self) -> Vec<u64> {
        loop {
            let state = self.lock_state();
            if !state.spare_wanted && !state.spare_creation_running {
                return [&state.active, &state.spare]
                    .into_iter()
                    .flatten()
                    .map(|open| open.segment.number)
                    .collect();
            }
            drop(state);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Test hook: how many segments and messages reclaim tracks.
    #[cfg(test)]
    pub(crate) fn tracked_counts(&self) -> (usize, usize) {
        let state = self.lock_state();
        (state.tracker.segment_count(), state.tracker.message_count())
    }
}

impl WriterState {
    fn take_segment_number(&mut self) -> u64 {
        let number = self.next_segment_number;
        self.next_segment_number += 1;
        number
    }

    fn mark_dirty(&mut self, segment: Arc<SegmentFile>, start: usize, end: usize) {
        if let Some(last) = self.dirty.last_mut()
            && Arc::ptr_eq(&last.segment, &segment)
        {
            last.end = end;
        } else {
            self.dirty.push(DirtyRange {
                segment,
                start,
                end,
            });
        }
    }
}

/// What the committer took from the shared state for one round.
struct CommitBatch {
    through_sequence: u64,
    ranges: Vec<DirtyRange>,
    spare_number: Option<u64>,
    exiting: bool,
}

fn run_committer(shared: Arc<Shared>) {
    let mut durable_sequence = 0u64;
    let mut last_sync_end: Option<Instant> = None;
    loop {
        let batch = {
            let mut state = shared.lock_state();
            while !state.shut_down
                && (shared.commits_held()
                    || (state.appended_sequence == durable_sequence && !state.spare_wanted))
            {
                state.committer_waiting = true;
                state = shared
                    .wake_committer
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.committer_waiting = false;
            }
            // Under load (the last sync ended moments ago), let a few more appends join
            // this sync: fewer msyncs, each write-protecting and flushing more at once.
            let busy = last_sync_end.is_some_and(|end| end.elapsed() < COMMIT_BUSY_WINDOW);
            if busy && !state.shut_down {
                drop(state);
                std::thread::sleep(COMMIT_GATHER);
                state = shared.lock_state();
            }
            let spare_number = if state.spare_wanted && !state.shut_down {
                state.spare_creation_running = true;
                Some(state.take_segment_number())
            } else {
                None
            };
            state.spare_wanted = false;
            CommitBatch {
                through_sequence: state.appended_sequence,
                ranges: std::mem::take(&mut state.dirty),
                spare_number,
                exiting: state.shut_down,
            }
        };
        if batch.through_sequence > durable_sequence {
            let sync_start = Instant::now();
            let result = sync_ranges(&shared, &batch.ranges);
            let sync_end = Instant::now();
            shared.sync_latency.record(sync_end - sync_start);
            last_sync_end = Some(sync_end);
            if result.is_err() {
                shared.seal_poisoned_active();
            }
            // Dropping the ranges unmaps sealed segments that nothing else holds. Only then
            // may reclaim see the batch's segments as synced, so a segment it deletes is no
            // longer mapped for writing.
            drop(batch.ranges);
            shared
                .lock_state()
                .tracker
                .commit_completed(batch.through_sequence, result.is_ok());
            shared.publish(&CommitNotice {
                through_sequence: batch.through_sequence,
                result,
            });
            durable_sequence = batch.through_sequence;
        }
        if let Some(number) = batch.spare_number {
            shared.create_spare(number);
        }
        if batch.exiting {
            // Appends stopped before this snapshot, so it covered every sequence.
            return;
        }
    }
}

/// Syncs every range; the result is `Err` if any range failed or lies in a poisoned
/// segment, and names the first such problem.
fn sync_ranges(shared: &Shared, ranges: &[DirtyRange]) -> Result<(), Arc<str>> {
    let mut first_error: Option<String> = None;
    for range in ranges {
        let segment = &range.segment;
        let outcome = if segment.poisoned.load(Ordering::Acquire) {
            Err(format!(
                "{}: an earlier sync of this segment failed, so its pages cannot be trusted",
                segment.path.display()
            ))
        } else {
            shared
                .injected_sync_failure()
                .unwrap_or_else(|| segment.mapping.sync_range(range.start, range.end - range.start))
                .map_err(|sync_error| {
                    segment.poisoned.store(true, Ordering::Release);
                    error!(
                        segment = %segment.path.display(),
                        start = range.start,
                        end = range.end,
                        error = %sync_error,
                        "spool sync failed; the segment is sealed and its unsynced records are refused"
                    );
                    format!(
                        "{}: msync of bytes {}..{} failed: {sync_error}",
                        segment.path.display(),
                        range.start,
                        range.end
                    )
                })
        };
        if let Err(message) = outcome {
            first_error.get_or_insert(message);
        }
    }
    match first_error {
        None => Ok(()),
        Some(message) => Err(Arc::from(message)),
    }
}

/// The writer's handle: owns the committer thread, shuts it down when dropped.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    committer: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    pub(crate) fn subscribe(&self, subscriber: CommitSubscriber) {
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(subscriber);
    }

    pub(crate) fn shutdown(&self) {
        self.shared.lock_state().shut_down = true;
        self.shared.wake_committer.notify_all();
        let committer = self
            .committer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(committer) = committer else { return };
        if committer.thread().id() == std::thread::current().id() {
            // Called from a subscriber, on the committer thread itself: it exits after this
            // round on its own.
            return;
        }
        if committer.join().is_err() {
            error!("the spool committer thread panicked");
        }
        self.shared.remove_empty_segments();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// See [`crate::Spool::open`].
pub(crate) fn open(
    directory: &Path,
    options: &SpoolOptions,
) -> Result<(Handle, ScanReport), SpoolError> {
    let segment_size_bytes = validated_segment_size(options.segment_size_bytes)?;
    create_directory(directory)?;
    let lock_file = lock_directory(directory)?;
    let mut scan = reader::scan_directory(directory)?;
    remove_temporary_files(directory, &scan.temporary_files)?;
    let uncopied_damage = preserve_damage(directory, &scan);
    let last_id = scan.highest_message_id;
    // Above every segment, temporary file and quarantine copy: reclaimed segments leave no
    // file behind, so their numbers may come back, but never one a copy is named after.
    let next_segment_number = scan
        .highest_segment_number
        .max(reader::highest_quarantined_segment_number(directory))
        .map_or(Some(1), |highest| highest.checked_add(1))
        .ok_or_else(|| invariant_broken("segment numbers exhausted"))?;
    let recovered = std::mem::take(&mut scan.segments)
        .into_iter()
        .map(|contents| RecoveredSegment {
            number: contents.number,
            size_bytes: contents.size_bytes,
            // Damage must have a complete copy in quarantine/ before its segment may go,
            // and records of a later minor version's type may matter to that version.
            may_be_reclaimed: !contents.has_unknown_records
                && !uncopied_damage.contains(&contents.number),
            message_ids: contents.message_ids,
            journal_ids: contents.journal_ids,
        })
        .collect();
    let tracker = ReclaimTracker::from_recovery(recovered, &scan.done);
    scan.done = HashSet::new();
    let shared = Arc::new(Shared {
        directory: directory.to_owned(),
        segment_size_bytes,
        salt: random_salt()?,
        state: Mutex::new(WriterState {
            active: None,
            spare: None,
            next_segment_number,
            appended_sequence: 0,
            dirty: Vec::new(),
            spare_wanted: false,
            spare_creation_running: false,
            spare_retry_not_before: None,
            shut_down: false,
            committer_waiting: false,
            tracker,
        }),
        wake_committer: Condvar::new(),
        subscribers: Mutex::new(Vec::new()),
        last_id: AtomicU64::new(last_id),
        bodies: Bodies::new(directory.to_owned(), next_segment_number),
        reclaim_pass: Mutex::new(()),
        sync_latency: tsubame_metrics::Histogram::latency(),
        _lock_file: lock_file,
        #[cfg(test)]
        fail_segment_creation: AtomicBool::new(false),
        #[cfg(test)]
        fail_next_sync: AtomicBool::new(false),
        #[cfg(test)]
        hold_commits: AtomicBool::new(false),
    });
    // New records always go to a new segment: an old segment may end in a torn record or
    // in bytes a crash left half-written, and appending behind them would bury damage in
    // the middle of a segment.
    let number = shared.lock_state().take_segment_number();
    match shared.create_segment(number, segment_size_bytes) {
        Ok(first) => {
            let mut state = shared.lock_state();
            state
                .tracker
                .add_created_segment(number, first.segment.mapping.len() as u64);
            state.active = Some(first);
        }
        Err(SpoolError::DiskFull) => {
            warn!(directory = %directory.display(), "spool disk is full; appends will fail until space is freed");
        }
        Err(error) => return Err(error),
    }
    let committer_shared = Arc::clone(&shared);
    let committer = std::thread::Builder::new()
        .name("spool-committer".to_owned())
        .spawn(move || run_committer(committer_shared))
        .map_err(io_error("starting the spool committer thread".to_owned()))?;
    info!(
        directory = %directory.display(),
        messages = scan.report.messages.len(),
        segments = scan.report.segment_count,
        quarantined = scan.report.quarantined.len(),
        torn_tails = scan.report.torn_tails.len(),
        "spool opened"
    );
    Ok((
        Handle {
            shared,
            committer: Mutex::new(Some(committer)),
        },
        scan.report,
    ))
}

fn validated_segment_size(requested: u64) -> Result<u64, SpoolError> {
    if !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&requested) {
        return Err(SpoolError::Io {
            context: format!(
                "spool segment_size_bytes is {requested}; it must lie between {MIN_SEGMENT_SIZE_BYTES} and {MAX_SEGMENT_SIZE_BYTES}"
            ),
            source: io::Error::new(io::ErrorKind::InvalidInput, "segment size out of range"),
        });
    }
    Ok(round_up_to_granule(requested))
}

fn round_up_to_granule(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(SEGMENT_SIZE_GRANULE_BYTES) * SEGMENT_SIZE_GRANULE_BYTES
}

fn create_directory(directory: &Path) -> Result<(), SpoolError> {
    if directory.is_dir() {
        return Ok(());
    }
    // Messages are private: only the owner may list or read the spool.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)
        .map_err(io_error(format!(
            "creating spool directory {}",
            directory.display()
        )))?;
    // Make the new directory's own entry durable.
    if let Some(parent) = directory
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        sync_directory(parent)?;
    }
    Ok(())
}

fn lock_directory(directory: &Path) -> Result<File, SpoolError> {
    let path = directory.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error(format!(
            "opening spool lock file {}",
            path.display()
        )))?;
    // flock locks belong to the open file description: a second open of the same
    // directory, even in this process, opens its own description and is refused.
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(SpoolError::Locked {
            path: directory.to_owned(),
        }),
        Err(errno) => Err(io_error(format!("locking {}", path.display()))(
            errno.into(),
        )),
    }
}

fn remove_temporary_files(directory: &Path, temporaries: &[PathBuf]) -> Result<(), SpoolError> {
    for path in temporaries {
        info!(path = %path.display(), "removing a spool segment whose creation a crash interrupted");
        std::fs::remove_file(path).map_err(io_error(format!("removing {}", path.display())))?;
    }
    if !temporaries.is_empty() {
        sync_directory(directory)?;
    }
    Ok(())
}

/// Copies every damaged extent into `quarantine/` and logs each damage. A failed copy is
/// logged and tolerated: the bytes are still in their segment, which reclaim keeps. Returns
/// the numbers of the segments with damage that has no complete copy.
fn preserve_damage(directory: &Path, scan: &reader::DirectoryScan) -> HashSet<u64> {
    let mut uncopied = HashSet::new();
    for extent in &scan.damage {
        let copy = reader::quarantine_path(directory, extent);
        match reader::copy_to_quarantine(directory, extent) {
            Ok(newly) => warn!(
                segment = %extent.segment_path.display(),
                offset = extent.offset_bytes,
                length = extent.length_bytes,
                kind = ?extent.kind,
                reason = extent.reason,
                copy = %copy.display(),
                already_copied = !newly,
                "damaged spool bytes kept out of the queue"
            ),
            Err(error) => {
                uncopied.insert(extent.segment_number);
                warn!(
                    segment = %extent.segment_path.display(),
                    offset = extent.offset_bytes,
                    length = extent.length_bytes,
                    kind = ?extent.kind,
                    reason = extent.reason,
                    %error,
                    "damaged spool bytes kept out of the queue; copying them to quarantine failed, so the segment is never reclaimed"
                );
            }
        }
    }
    for whole in scan.report.quarantined.iter().filter(|record| {
        !scan.damage.iter().any(|extent| {
            extent.segment_path == record.segment_path && extent.offset_bytes == record.offset_bytes
        })
    }) {
        warn!(
            segment = %whole.segment_path.display(),
            reason = whole.reason,
            "spool segment skipped entirely; it stays in place for inspection"
        );
    }
    uncopied
}

/// fsync of a directory: makes creations, renames and removals in it durable.
pub(crate) fn sync_directory(directory: &Path) -> Result<(), SpoolError> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(format!(
            "syncing directory {}",
            directory.display()
        )))
}

fn random_salt() -> Result<Salt, SpoolError> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(io_error(
            "reading /dev/urandom for the record checksum salt".to_owned(),
        ))?;
    Ok(Salt(u64::from_le_bytes(bytes)))
}

fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

pub(crate) fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

fn shut_down_error() -> SpoolError {
    SpoolError::Io {
        context: "appending to the spool".to_owned(),
        source: io::Error::new(io::ErrorKind::BrokenPipe, "the spool has been shut down"),
    }
}

fn id_space_exhausted() -> SpoolError {
    invariant_broken("message ids exhausted (the highest id in the spool is u64::MAX)")
}

fn invariant_broken(what: &'static str) -> SpoolError {
    SpoolError::Io {
        context: "spool writer".to_owned(),
        source: io::Error::other(what),
    }
}
