//! The one module with `unsafe` code: the memory maps of segments.
//!
//! The writer copies records into a shared file mapping; the committer thread makes them
//! durable with `msync(MS_SYNC)` on the same mapping *while* appenders keep writing
//! further on. `memmap2::MmapMut` would need `&mut` for writing and `&` for syncing at the
//! same time, so the mapping is an `MmapRaw` and the two roles are split into types:
//!
//! * [`MappingAppender`] (one per mapping, not `Clone`) owns the append cursor and is the
//!   only code that writes to the mapping, always at or beyond its cursor;
//! * [`SyncableMapping`] (shared through `Arc`) can only report its length and sync.
//!
//! No Rust reference into the writable mapping is ever created, so concurrent writes and
//! kernel reads for writeback are no data race in the Rust sense.
//!
//! Delivery reads bodies through a second, read-only shared mapping of each segment
//! ([`ReadMapping`]). A `&[u8]` must not cover bytes that change while it lives, and the
//! active segment is still being written, so a read mapping only lends out bytes of its
//! *final extent*: the whole file for a segment of an earlier writer session (nobody
//! writes it any more), and for a segment of this session the bytes before the cursor its
//! appender last published (the appender never writes there again). `memmap2::Mmap`
//! would lend out the whole file as one `&[u8]`, bytes still being written included, so
//! the read mapping is an `MmapRaw` mapped read-only too.
//!
//! [`PreallocatedSegment`] creates and preallocates the file, so the facts the mapping's
//! safety rests on are established in this module, next to the `unsafe` blocks that rely
//! on them.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::FallocateFlags;

/// A segment file this process has just created and preallocated, not yet mapped.
#[derive(Debug)]
pub(crate) struct PreallocatedSegment {
    /// Invariant: a regular file created by [`PreallocatedSegment::create`] (so no other
    /// descriptor was opened by us), with blocks reserved over its whole length.
    file: File,
}

impl PreallocatedSegment {
    /// Creates `path`, which must not exist yet, readable and writable by the owner only,
    /// and reserves `size_bytes` of real blocks with `fallocate` (mode 0). `set_len` would
    /// make a sparse file instead, and a first write into a hole of a mapped sparse file
    /// on a full disk raises SIGBUS; with the blocks reserved here a write into the mapping
    /// needs no allocation. Fails with the `fallocate` error (ENOSPC or EDQUOT when the
    /// disk or quota is full, EOPNOTSUPP on filesystems without it) and leaves the file
    /// behind for the caller to remove.
    pub(crate) fn create(path: &Path, size_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, size_bytes)?;
        Ok(Self { file })
    }

    /// The file, for writing the segment header (which lies before the append start) and
    /// syncing it before the segment is mapped.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Maps the segment for appending from `start_bytes` on, and a second time read-only
    /// for reading records back; the read mapping's final extent is what the appender has
    /// published (at first everything before `start_bytes`: the header).
    pub(crate) fn map(self, start_bytes: usize) -> io::Result<(MappingAppender, ReadMapping)> {
        // SAFETY: the file was created by `create` and preallocated over its whole length
        // (the type's invariant). It lives in a spool directory whose lock this process
        // holds, so no other tsubame writer touches it; this crate never truncates a
        // segment, never writes one except through the appender returned here, and never
        // maps one for appending twice (`self` is consumed). Reclaim deletes whole files,
        // which leaves existing mappings valid. Outside tools that truncate or write spool
        // files while a server runs are out of contract, as the format document states.
        let appender = unsafe { map_for_append(&self.file, start_bytes) }?;
        let raw = MmapOptions::new().map_raw_read_only(&self.file)?;
        let reader = ReadMapping {
            raw,
            final_extent: FinalExtent::Published(Arc::clone(&appender.published)),
        };
        Ok((appender, reader))
    }
}

/// A writable shared mapping of a whole segment file, as far as syncing is concerned.
pub(crate) struct SyncableMapping {
    /// Invariant: maps the whole file, which is preallocated over its whole length and is
    /// never truncated while mapped (the contract of [`map_for_append`]).
    raw: MmapRaw,
}

impl std::fmt::Debug for SyncableMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncableMapping")
            .field("len", &self.raw.len())
            .finish()
    }
}

impl SyncableMapping {
    pub(crate) fn len(&self) -> usize {
        self.raw.len()
    }

    /// `msync(MS_SYNC)` over `offset..offset + length` (widened to whole pages): returns
    /// once those bytes, and the file metadata needed to read them back, are on stable
    /// storage.
    pub(crate) fn sync_range(&self, offset: usize, length: usize) -> io::Result<()> {
        self.raw.flush_range(offset, length)
    }
}

/// The only writer of one [`SyncableMapping`]: appends at a cursor that only moves forward.
#[derive(Debug)]
pub(crate) struct MappingAppender {
    mapping: Arc<SyncableMapping>,
    /// Invariant: at most `mapping.len()`. Bytes before it are never written again; bytes
    /// at and after it have never been written through this mapping (they are zero as
    /// preallocated).
    cursor: usize,
    /// The cursor as readers may see it, stored (Release) after the bytes before it were
    /// copied. Invariant: at most `cursor`, only grows; bytes before it are final.
    published: Arc<AtomicUsize>,
}

/// Maps a segment file for appending, starting at `start_bytes` (just past its header).
///
/// # Safety
///
/// For as long as the returned appender or any `Arc` of its mapping lives:
///
/// * the file must not be truncated or shrunk by anyone (access to a page past the end of
///   a file raises SIGBUS), and it must be preallocated over its whole length with
///   `fallocate` (a sparse file can raise SIGBUS on a full disk when a page is first
///   written);
/// * nothing else may write to the file's bytes at or after `start_bytes`, through any file
///   descriptor or mapping, in this process or another: the appender assumes it is their
///   only writer. In this crate the spool directory lock and the rule that a segment is
///   appended to by one writer session only (never after a restart) uphold this.
pub(crate) unsafe fn map_for_append(
    file: &File,
    start_bytes: usize,
) -> io::Result<MappingAppender> {
    // Creating a raw mapping is itself safe in memmap2 (it hands out no references); the
    // contract above is what makes the writes in `append` sound.
    let raw = MmapOptions::new().map_raw(file)?;
    if start_bytes > raw.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "append start lies past the end of the mapped segment",
        ));
    }
    Ok(MappingAppender {
        mapping: Arc::new(SyncableMapping { raw }),
        cursor: start_bytes,
        published: Arc::new(AtomicUsize::new(start_bytes)),
    })
}

impl MappingAppender {
    pub(crate) fn mapping(&self) -> &Arc<SyncableMapping> {
        &self.mapping
    }

    pub(crate) fn cursor(&self) -> usize {
        self.cursor
    }

    pub(crate) fn remaining(&self) -> usize {
        self.mapping.len() - self.cursor
    }

    /// Copies `parts` back to back at the cursor and moves the cursor forward by
    /// `reserved_bytes`, which must cover the parts; the bytes between the end of the parts
    /// and the new cursor keep the zeros the file was preallocated with. Returns the offset
    /// the first part was written at, or `None` (writing nothing) when the parts do not fit
    /// in `reserved_bytes` or `reserved_bytes` does not fit in what remains.
    pub(crate) fn append(&mut self, parts: &[&[u8]], reserved_bytes: usize) -> Option<usize> {
        let total = parts
            .iter()
            .try_fold(0usize, |sum, part| sum.checked_add(part.len()))?;
        if total > reserved_bytes || reserved_bytes > self.remaining() {
            return None;
        }
        let start = self.cursor;
        let base = self.mapping.raw.as_mut_ptr();
        let mut at = start;
        for part in parts {
            // SAFETY: `at + part.len() <= start + total <= start + reserved_bytes <=
            // mapping.len()` (checked above), so the destination lies inside the live
            // mapping, which the `Arc` keeps mapped and the contract of `map_for_append`
            // keeps backed by the file. The destination lies at or past the cursor, which no
            // other code writes: this appender is the mapping's only writer and `&mut self`
            // rules out a concurrent append through it. The source is an ordinary slice;
            // the mapping is never lent out as a slice, so the two cannot overlap. The
            // committer's concurrent `msync` only makes the kernel read these pages.
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), base.add(at), part.len());
            }
            at += part.len();
        }
        self.cursor = start + reserved_bytes;
        // Release: a reader that loads this value (Acquire) also sees the bytes copied above.
        // The padding up to the new cursor keeps its preallocated zeros and is final too.
        self.published.store(self.cursor, Ordering::Release);
        Some(start)
    }
}

/// Which bytes of a [`ReadMapping`] are final: never written again while it is mapped.
#[derive(Debug)]
enum FinalExtent {
    /// The whole file: a segment an earlier writer session wrote, which nobody writes now.
    WholeFile,
    /// The bytes before the cursor the segment's appender last published.
    Published(Arc<AtomicUsize>),
}

/// A read-only shared mapping of a whole segment file that lends out only final bytes.
pub(crate) struct ReadMapping {
    /// Invariant: maps the whole file (`PROT_READ`, `MAP_SHARED`), which is never truncated
    /// while mapped; the bytes of `final_extent` are never written while it is mapped.
    raw: MmapRaw,
    final_extent: FinalExtent,
}

impl std::fmt::Debug for ReadMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadMapping")
            .field("len", &self.raw.len())
            .field("final_len", &self.final_len())
            .finish()
    }
}

/// Maps a segment that an earlier writer session wrote, read-only, whole file final.
///
/// Contract (a crate-internal one, which is why this function is safe to call): `file` is
/// a segment of a spool directory whose lock this process holds, numbered below every
/// segment this process created. Such a segment is never written again: a writer never
/// appends to a segment of an earlier session (format document, "Writing"), the lock keeps
/// other tsubame writers out, and outside tools that write or truncate segments are out of
/// contract. The only caller, `Bodies::view`, checks the number and runs in the writer.
pub(crate) fn map_segment_of_an_earlier_session(file: &File) -> io::Result<ReadMapping> {
    Ok(ReadMapping {
        raw: MmapOptions::new().map_raw_read_only(file)?,
        final_extent: FinalExtent::WholeFile,
    })
}

impl ReadMapping {
    pub(crate) fn len(&self) -> usize {
        self.raw.len()
    }

    /// How many bytes from the start are final right now. Only grows.
    pub(crate) fn final_len(&self) -> usize {
        match &self.final_extent {
            FinalExtent::WholeFile => self.raw.len(),
            FinalExtent::Published(cursor) => cursor.load(Ordering::Acquire).min(self.raw.len()),
        }
    }

    /// `start..start + length`, if all of it is final; `None` otherwise.
    pub(crate) fn final_bytes(&self, start: usize, length: usize) -> Option<&[u8]> {
        let end = start.checked_add(length)?;
        if end > self.final_len() {
            return None;
        }
        // SAFETY: `start + length <= final_len() <= raw.len()`, so the range lies inside the
        // mapping, which lives as long as `&self` and whose file is never truncated while
        // mapped (the type's invariant), so every page is readable. The bytes are final:
        // for a segment of an earlier session nobody writes the file; for one of this
        // session they lie before a cursor the appender published after copying them, and
        // it never writes before its cursor again. The Acquire load in `final_len` pairs
        // with the appender's Release store, so this thread sees the copied bytes. Hence
        // nothing mutates them while the returned reference lives.
        Some(unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(start), length) })
    }
}

/// A range of final bytes of a read mapping, checked once, that keeps its mapping alive
/// (so it stays readable after the segment file is unlinked).
pub(crate) struct MappedBytes {
    mapping: Arc<ReadMapping>,
    /// Invariant: `start + length <= mapping.final_len()`, checked when made; the final
    /// extent only grows, so this holds for as long as the value lives.
    start: usize,
    length: usize,
}

impl MappedBytes {
    /// `start..start + length` of `mapping`, if all of it is final.
    pub(crate) fn new(mapping: Arc<ReadMapping>, start: usize, length: usize) -> Option<Self> {
        mapping.final_bytes(start, length)?;
        Some(Self {
            mapping,
            start,
            length,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `ReadMapping::final_bytes`, whose check passed for this range when
        // the value was made: the range lies inside the mapping (kept alive by the `Arc`),
        // and its bytes were final then and stay final, because the final extent only grows.
        unsafe {
            std::slice::from_raw_parts(self.mapping.raw.as_ptr().add(self.start), self.length)
        }
    }
}
