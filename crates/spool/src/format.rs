//! The byte layout specified in `spool-format/README.md`: constants, encoders, decoders
//! and [`scan_segment_bytes`], a pure scanner over the bytes of one segment file.
//!
//! No I/O, no clocks, no threads: everything here is a function over byte slices, so the
//! fuzzer can drive it directly. Every read goes through bounds-checked accessors; nothing
//! in this module may panic on any input.

#![forbid(unsafe_code)]

use crate::{Envelope, MessageId, MessageState, RecipientState, RecordLocation, SpooledMessage};

/// First 8 bytes of every segment file. The leading 0x89 is not ASCII, so a text file
/// never matches; the trailing LF catches a file mangled by newline conversion.
pub const SEGMENT_MAGIC: [u8; 8] = *b"\x89TSPOOL\n";

/// Major format version this crate reads and writes. Readers refuse any other major.
pub const FORMAT_MAJOR: u16 = 1;

/// Minor format version this crate writes. A reader of major 1 reads every minor.
/// 1.1 added the added-header-fields record ([`RecordType::AddedFields`]).
pub const FORMAT_MINOR: u16 = 1;

/// Size of the version-1.0 segment header. Records start at the header size stored in the
/// header (never less than this), so a later minor version may grow the header.
pub const SEGMENT_HEADER_SIZE_BYTES: usize = 64;

/// Offset of the segment header checksum (CRC32C of bytes `0..60`).
const SEGMENT_HEADER_CHECKSUM_OFFSET: usize = 60;

/// First 4 bytes of every record. Non-zero, so the zero-filled preallocated tail of a
/// segment never looks like a record; the leading 0xC5 makes ASCII text an unlikely match.
pub const RECORD_MAGIC: [u8; 4] = *b"\xc5REC";

/// Size of a record header.
pub const RECORD_HEADER_SIZE_BYTES: usize = 24;

/// Every record starts at a multiple of this offset in its segment; the resynchronising
/// scan after damage only looks at these offsets.
pub const RECORD_ALIGNMENT_BYTES: usize = 8;

/// Largest record payload the format allows: 256 MiB. Far above any SMTP message size a
/// relay should accept (common limits are 25 to 150 MB), and small enough that a reader
/// may hold one record in memory. The payload length field is a u32, so it fits.
pub const MAX_RECORD_PAYLOAD_BYTES: usize = 256 * 1024 * 1024;

/// Largest reply text a recipient outcome record carries: eight reply lines of the 512
/// octets RFC 5321 section 4.5.3.1.5 allows each. Writers truncate, readers refuse more.
pub const MAX_REPLY_TEXT_BYTES: usize = 8 * 512;

/// Largest `fields` text an added-header-fields record carries. A folded
/// DKIM-Signature field with a 4096-bit RSA signature is about 1.2 KB (684 base64
/// characters of `b=`, a 44-character `bh=`, an `h=` list of a few dozen names), so
/// several signatures (RSA and Ed25519 side by side) and a List-Unsubscribe pair fit with
/// room to spare; the bound keeps what a reader holds and what every send prepends small.
/// Writers refuse more (a cut signature is useless), readers refuse more.
pub const MAX_ADDED_FIELDS_BYTES: usize = 16 * 1024;

/// Largest segment file the format allows: a segment holding one record of the maximum
/// size, rounded up generously. Readers refuse bigger files before reading them.
pub const MAX_SEGMENT_FILE_SIZE_BYTES: u64 = 2 * MAX_RECORD_PAYLOAD_BYTES as u64;

/// The name of segment `number` in the spool directory: 16 lowercase hex digits, so
/// names sort in segment order.
pub fn segment_file_name(number: u64) -> String {
    format!("{number:016x}.segment")
}

/// The inverse of [`segment_file_name`]; `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".segment")?;
    if digits.len() != 16
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Rounds `size_bytes` up to the record alignment; `None` on overflow.
pub fn align_record_size(size_bytes: usize) -> Option<usize> {
    size_bytes
        .checked_add(RECORD_ALIGNMENT_BYTES - 1)
        .map(|size| size & !(RECORD_ALIGNMENT_BYTES - 1))
}

/// Bytes a record with a payload of `payload_length` occupies in its segment, padding
/// included; `None` on overflow.
pub fn record_size_on_disk(payload_length: usize) -> Option<usize> {
    payload_length
        .checked_add(RECORD_HEADER_SIZE_BYTES)
        .and_then(align_record_size)
}

/// A random per-writer value mixed into every record checksum, stored in each segment
/// header. A message body can contain bytes that look like a record; without the salt,
/// the scan that resynchronises after damage could index such a forged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Salt(pub u64);

impl Salt {
    /// CRC32C over the salt's 8 little-endian bytes followed by `parts` in order.
    pub fn checksum(self, parts: &[&[u8]]) -> u32 {
        parts
            .iter()
            .fold(crc32c::crc32c(&self.0.to_le_bytes()), |crc, part| {
                crc32c::crc32c_append(crc, part)
            })
    }
}

/// The decoded header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub format_major: u16,
    pub format_minor: u16,
    /// Where the first record starts. Invariant: at least [`SEGMENT_HEADER_SIZE_BYTES`], a
    /// multiple of [`RECORD_ALIGNMENT_BYTES`], not past the end of the file.
    pub header_size_bytes: u32,
    pub segment_number: u64,
    pub created_at_unix_us: u64,
    pub salt: Salt,
    /// The size the file was preallocated to when it was created.
    pub preallocated_size_bytes: u64,
}

/// Why a segment header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentHeaderError {
    /// Fewer bytes than a header.
    TooShort,
    /// The first 8 bytes are not [`SEGMENT_MAGIC`].
    BadMagic,
    /// A major version this reader does not know; the whole spool must be refused.
    UnsupportedVersion {
        major: u16,
        minor: u16,
    },
    ChecksumMismatch,
    /// The header size field is below the minimum, misaligned or past the end.
    BadHeaderSize,
}

impl SegmentHeaderError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooShort => "segment file is shorter than a segment header",
            Self::BadMagic => "segment magic is wrong",
            Self::UnsupportedVersion { .. } => "unsupported segment format version",
            Self::ChecksumMismatch => "segment header checksum mismatch",
            Self::BadHeaderSize => "segment header size field is invalid",
        }
    }
}

impl SegmentHeader {
    /// A version-[`FORMAT_MAJOR`].[`FORMAT_MINOR`] header.
    pub fn new(
        segment_number: u64,
        created_at_unix_us: u64,
        salt: Salt,
        preallocated_size_bytes: u64,
    ) -> Self {
        Self {
            format_major: FORMAT_MAJOR,
            format_minor: FORMAT_MINOR,
            header_size_bytes: SEGMENT_HEADER_SIZE_BYTES as u32,
            segment_number,
            created_at_unix_us,
            salt,
            preallocated_size_bytes,
        }
    }

    pub fn encode(&self) -> [u8; SEGMENT_HEADER_SIZE_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        let mut writer = FixedWriter::new(&mut out);
        writer.put(&SEGMENT_MAGIC);
        writer.put(&self.format_major.to_le_bytes());
        writer.put(&self.format_minor.to_le_bytes());
        writer.put(&self.header_size_bytes.to_le_bytes());
        writer.put(&self.segment_number.to_le_bytes());
        writer.put(&self.created_at_unix_us.to_le_bytes());
        writer.put(&self.salt.0.to_le_bytes());
        writer.put(&self.preallocated_size_bytes.to_le_bytes());
        // Bytes 48..60 stay zero (reserved).
        let checksum = crc32c::crc32c(&out[..SEGMENT_HEADER_CHECKSUM_OFFSET]);
        out[SEGMENT_HEADER_CHECKSUM_OFFSET..].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes the header at the start of `bytes` (the whole file, or at least its first
    /// [`SEGMENT_HEADER_SIZE_BYTES`]; `file_size_bytes` bounds the header size field).
    /// Checks in the documented order: magic, major version, checksum, header size.
    pub fn decode(bytes: &[u8], file_size_bytes: u64) -> Result<Self, SegmentHeaderError> {
        let magic = bytes.get(..8).ok_or(SegmentHeaderError::TooShort)?;
        if magic != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::BadMagic);
        }
        let major = le_u16(bytes, 8).ok_or(SegmentHeaderError::TooShort)?;
        let minor = le_u16(bytes, 10).ok_or(SegmentHeaderError::TooShort)?;
        if major != FORMAT_MAJOR {
            return Err(SegmentHeaderError::UnsupportedVersion { major, minor });
        }
        let covered = bytes
            .get(..SEGMENT_HEADER_CHECKSUM_OFFSET)
            .ok_or(SegmentHeaderError::TooShort)?;
        let stored_checksum =
            le_u32(bytes, SEGMENT_HEADER_CHECKSUM_OFFSET).ok_or(SegmentHeaderError::TooShort)?;
        if crc32c::crc32c(covered) != stored_checksum {
            return Err(SegmentHeaderError::ChecksumMismatch);
        }
        let header_size_bytes = le_u32(bytes, 12).ok_or(SegmentHeaderError::TooShort)?;
        if (header_size_bytes as usize) < SEGMENT_HEADER_SIZE_BYTES
            || !(header_size_bytes as usize).is_multiple_of(RECORD_ALIGNMENT_BYTES)
            || u64::from(header_size_bytes) > file_size_bytes
        {
            return Err(SegmentHeaderError::BadHeaderSize);
        }
        Ok(Self {
            format_major: major,
            format_minor: minor,
            header_size_bytes,
            segment_number: le_u64(bytes, 16).ok_or(SegmentHeaderError::TooShort)?,
            created_at_unix_us: le_u64(bytes, 24).ok_or(SegmentHeaderError::TooShort)?,
            salt: Salt(le_u64(bytes, 32).ok_or(SegmentHeaderError::TooShort)?),
            preallocated_size_bytes: le_u64(bytes, 40).ok_or(SegmentHeaderError::TooShort)?,
        })
    }
}

/// Record types. Readers skip (and report) types they do not know, so a minor version may
/// add types whose absence an older reader can tolerate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordType {
    /// An accepted message: envelope and body.
    Message = 1,
    /// The outcome of one delivery attempt to one recipient.
    RecipientOutcome = 2,
    /// Every recipient of a message has a final outcome (or the message was deleted).
    MessageDone = 3,
    /// Header fields to put before a message's stored content when it is sent (DKIM
    /// signatures made after spooling); the latest one per message counts. Since 1.1.
    AddedFields = 4,
}

impl RecordType {
    pub fn from_u16(value: u16) -> Option<Self> {
        match value {
            1 => Some(Self::Message),
            2 => Some(Self::RecipientOutcome),
            3 => Some(Self::MessageDone),
            4 => Some(Self::AddedFields),
            _ => None,
        }
    }

    /// Why a record is refused where one of this type was expected.
    pub(crate) fn mismatch_reason(self) -> &'static str {
        match self {
            Self::Message => "record is not a message record",
            Self::RecipientOutcome => "record is not a recipient outcome record",
            Self::MessageDone => "record is not a message done record",
            Self::AddedFields => "record is not an added header fields record",
        }
    }
}

/// Builds a record header for a payload whose checksum and length are already known.
pub fn encode_record_header(
    salt: Salt,
    record_type: RecordType,
    payload_length: u32,
    payload_checksum: u32,
) -> [u8; RECORD_HEADER_SIZE_BYTES] {
    let mut out = [0u8; RECORD_HEADER_SIZE_BYTES];
    let mut writer = FixedWriter::new(&mut out);
    writer.put(&RECORD_MAGIC);
    writer.put(&[0; 4]); // header checksum, filled in below
    writer.put(&payload_length.to_le_bytes());
    writer.put(&(record_type as u16).to_le_bytes());
    writer.put(&0u16.to_le_bytes()); // flags: none defined in 1.0
    writer.put(&payload_checksum.to_le_bytes());
    // Bytes 20..24 stay zero (reserved).
    let header_checksum = salt.checksum(&[&out[8..]]);
    out[4..8].copy_from_slice(&header_checksum.to_le_bytes());
    out
}

/// A record header that passed its magic, checksum and length checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub record_type: u16,
    pub flags: u16,
    /// Invariant: at most [`MAX_RECORD_PAYLOAD_BYTES`].
    pub payload_length: usize,
    pub payload_checksum: u32,
}

/// Checks a record header (the first [`RECORD_HEADER_SIZE_BYTES`] of `bytes`).
pub fn decode_record_header(bytes: &[u8], salt: Salt) -> Result<RecordHeader, &'static str> {
    let header = bytes
        .get(..RECORD_HEADER_SIZE_BYTES)
        .ok_or("record header extends past the end of the segment")?;
    if header.get(..4) != Some(&RECORD_MAGIC[..]) {
        return Err("record magic is wrong");
    }
    let stored_checksum = le_u32(header, 4).ok_or("record header is truncated")?;
    let covered = header.get(8..).ok_or("record header is truncated")?;
    if salt.checksum(&[covered]) != stored_checksum {
        return Err("record header checksum mismatch");
    }
    let payload_length = le_u32(header, 8).ok_or("record header is truncated")? as usize;
    if payload_length > MAX_RECORD_PAYLOAD_BYTES {
        return Err("record payload length exceeds the format's limit");
    }
    Ok(RecordHeader {
        record_type: le_u16(header, 12).ok_or("record header is truncated")?,
        flags: le_u16(header, 14).ok_or("record header is truncated")?,
        payload_length,
        payload_checksum: le_u32(header, 16).ok_or("record header is truncated")?,
    })
}

/// A record whose header and payload checksums are both valid.
#[derive(Debug, Clone, Copy)]
struct FramedRecord<'a> {
    header: RecordHeader,
    payload: &'a [u8],
    /// Header, payload and padding. Invariant: a positive multiple of the alignment.
    size_on_disk: usize,
}

/// Checks the record starting at `offset` of a segment's bytes.
fn frame_record(bytes: &[u8], offset: usize, salt: Salt) -> Result<FramedRecord<'_>, &'static str> {
    let at = bytes
        .get(offset..)
        .ok_or("record header extends past the end of the segment")?;
    let header = decode_record_header(at, salt)?;
    let payload = at
        .get(RECORD_HEADER_SIZE_BYTES..)
        .and_then(|rest| rest.get(..header.payload_length))
        .ok_or("record extends past the end of the segment")?;
    if salt.checksum(&[payload]) != header.payload_checksum {
        return Err("record payload checksum mismatch");
    }
    let size_on_disk = record_size_on_disk(header.payload_length).ok_or("record size overflows")?;
    Ok(FramedRecord {
        header,
        payload,
        size_on_disk,
    })
}

/// Verifies a payload read on its own (by [`crate::read_body`]) against its header.
pub fn verify_payload(
    header: &RecordHeader,
    payload: &[u8],
    salt: Salt,
) -> Result<(), &'static str> {
    if payload.len() != header.payload_length {
        return Err("record payload has the wrong length");
    }
    if salt.checksum(&[payload]) != header.payload_checksum {
        return Err("record payload checksum mismatch");
    }
    Ok(())
}

/// Envelope flag bit 0: an authenticated user field is present.
const ENVELOPE_FLAG_AUTHENTICATED: u32 = 1;

/// Encodes everything of a message payload that precedes the body: the id, the envelope
/// and the body size. The payload is this followed by the body.
///
/// Fails with the payload size when the payload would exceed [`MAX_RECORD_PAYLOAD_BYTES`].
pub fn encode_message_prefix(
    id: MessageId,
    envelope: &Envelope<'_>,
    body_size_bytes: usize,
) -> Result<Vec<u8>, u64> {
    let client_address = envelope.client_address.to_string();
    let texts_size_bytes: u64 = [
        Some(client_address.as_str()),
        Some(envelope.helo),
        envelope.authenticated_user,
        Some(envelope.mail_from),
        Some(envelope.mail_parameters),
    ]
    .into_iter()
    .flatten()
    .chain(envelope.recipients.iter().map(String::as_str))
    .map(|text| 4 + text.len() as u64)
    .sum();
    // id, received time, recipient count, flags, the texts, body size, body.
    let payload_size_bytes = 8 + 8 + 4 + 4 + texts_size_bytes + 8 + body_size_bytes as u64;
    if payload_size_bytes > MAX_RECORD_PAYLOAD_BYTES as u64
        || envelope.recipients.len() > u32::MAX as usize
    {
        return Err(payload_size_bytes);
    }
    // Every length now fits in a u32: each is below MAX_RECORD_PAYLOAD_BYTES.
    let mut out = Vec::with_capacity((payload_size_bytes - body_size_bytes as u64) as usize);
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&envelope.received_at_unix_ms.to_le_bytes());
    out.extend_from_slice(&(envelope.recipients.len() as u32).to_le_bytes());
    let flags = if envelope.authenticated_user.is_some() {
        ENVELOPE_FLAG_AUTHENTICATED
    } else {
        0
    };
    out.extend_from_slice(&flags.to_le_bytes());
    put_text(&mut out, &client_address);
    put_text(&mut out, envelope.helo);
    if let Some(user) = envelope.authenticated_user {
        put_text(&mut out, user);
    }
    put_text(&mut out, envelope.mail_from);
    put_text(&mut out, envelope.mail_parameters);
    for recipient in envelope.recipients {
        put_text(&mut out, recipient);
    }
    out.extend_from_slice(&(body_size_bytes as u64).to_le_bytes());
    Ok(out)
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Decodes a message payload. Returns the message (state [`MessageState::Queued`]) and
/// where its body starts within `payload`.
pub fn decode_message(
    payload: &[u8],
    location: RecordLocation,
) -> Result<(SpooledMessage, usize), &'static str> {
    let mut cursor = Cursor::new(payload);
    let id = MessageId(cursor.u64()?);
    let received_at_unix_ms = cursor.u64()?;
    let recipient_count = cursor.u32()? as usize;
    let flags = cursor.u32()?;
    if recipient_count == 0 {
        return Err("message has no recipients");
    }
    if flags & !ENVELOPE_FLAG_AUTHENTICATED != 0 {
        return Err("message envelope has unknown flags");
    }
    let client_address = cursor.text()?.to_owned();
    let helo = cursor.text()?.to_owned();
    let authenticated_user = if flags & ENVELOPE_FLAG_AUTHENTICATED != 0 {
        Some(cursor.text()?.to_owned())
    } else {
        None
    };
    let mail_from = cursor.text()?.to_owned();
    let mail_parameters = cursor.text()?.to_owned();
    // Each recipient takes at least its 4-byte length, so the remaining bytes bound the
    // allocation no matter what the count field says.
    let mut recipients = Vec::with_capacity(recipient_count.min(cursor.remaining() / 4));
    for _ in 0..recipient_count {
        recipients.push(cursor.text()?.to_owned());
    }
    let body_size_bytes = cursor.u64()?;
    if body_size_bytes != cursor.remaining() as u64 {
        return Err("message body size does not match the record length");
    }
    let recipient_states = vec![RecipientState::default(); recipients.len()];
    Ok((
        SpooledMessage {
            id,
            location,
            received_at_unix_ms,
            client_address,
            helo,
            authenticated_user,
            mail_from,
            mail_parameters,
            recipients,
            body_size_bytes,
            state: MessageState::Queued,
            recipient_states,
            added_fields: None,
        },
        cursor.position,
    ))
}

/// Finds the body in a message payload without decoding the envelope into owned strings:
/// returns the message id and where the body starts within `payload`. Checks the same
/// structure as [`decode_message`] (recipient count, flags, text lengths and UTF-8, body
/// size), so the two accept exactly the same payloads.
pub fn message_body_start(payload: &[u8]) -> Result<(MessageId, usize), &'static str> {
    let mut cursor = Cursor::new(payload);
    let id = MessageId(cursor.u64()?);
    let _received_at_unix_ms = cursor.u64()?;
    let recipient_count = cursor.u32()?;
    let flags = cursor.u32()?;
    if recipient_count == 0 {
        return Err("message has no recipients");
    }
    if flags & !ENVELOPE_FLAG_AUTHENTICATED != 0 {
        return Err("message envelope has unknown flags");
    }
    // client address, HELO, the user if flagged, MAIL FROM, its parameters, recipients.
    let authenticated = u32::from(flags & ENVELOPE_FLAG_AUTHENTICATED != 0);
    for _ in 0..(4 + authenticated).saturating_add(recipient_count) {
        cursor.text()?;
    }
    let body_size_bytes = cursor.u64()?;
    if body_size_bytes != cursor.remaining() as u64 {
        return Err("message body size does not match the record length");
    }
    Ok((id, cursor.position))
}

/// What one delivery attempt to one recipient came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OutcomeKind {
    /// The upstream accepted the recipient. Final.
    Delivered = 1,
    /// The upstream refused it permanently (5xx); a bounce is due. Final.
    Failed = 2,
    /// A temporary failure (4xx, timeout, connection trouble); will be retried.
    Deferred = 3,
    /// Retried until the queue lifetime ran out. Final.
    Expired = 4,
    /// An operator deleted it from the queue. Final.
    Deleted = 5,
}

impl OutcomeKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Delivered),
            2 => Some(Self::Failed),
            3 => Some(Self::Deferred),
            4 => Some(Self::Expired),
            5 => Some(Self::Deleted),
            _ => None,
        }
    }

    /// Whether no further attempt follows for this recipient.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Deferred)
    }
}

/// A decoded recipient outcome record (type 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    pub location: RecordLocation,
    pub message_id: MessageId,
    /// Index into the message's recipient list.
    pub recipient_index: u32,
    pub kind: OutcomeKind,
    pub at_unix_ms: u64,
    /// The upstream's reply (or our own explanation), at most [`MAX_REPLY_TEXT_BYTES`].
    pub reply_text: String,
}

/// Encodes a recipient outcome payload. `reply_text` is cut to [`MAX_REPLY_TEXT_BYTES`]
/// at a character boundary.
pub fn encode_recipient_outcome(
    message_id: MessageId,
    recipient_index: u32,
    kind: OutcomeKind,
    at_unix_ms: u64,
    reply_text: &str,
) -> Vec<u8> {
    let mut cut = reply_text.len().min(MAX_REPLY_TEXT_BYTES);
    while !reply_text.is_char_boundary(cut) {
        cut -= 1;
    }
    let reply_text = reply_text.get(..cut).unwrap_or("");
    let mut out = Vec::with_capacity(28 + reply_text.len());
    out.extend_from_slice(&message_id.0.to_le_bytes());
    out.extend_from_slice(&recipient_index.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&at_unix_ms.to_le_bytes());
    put_text(&mut out, reply_text);
    out
}

fn decode_recipient_outcome(
    payload: &[u8],
    location: RecordLocation,
) -> Result<RecipientOutcome, &'static str> {
    let mut cursor = Cursor::new(payload);
    let message_id = MessageId(cursor.u64()?);
    let recipient_index = cursor.u32()?;
    let kind = OutcomeKind::from_u8(cursor.u8()?).ok_or("unknown recipient outcome kind")?;
    cursor.skip(3)?;
    let at_unix_ms = cursor.u64()?;
    let reply_text = cursor.text()?;
    if reply_text.len() > MAX_REPLY_TEXT_BYTES {
        return Err("recipient outcome reply text is longer than the format allows");
    }
    if cursor.remaining() != 0 {
        return Err("recipient outcome record has trailing bytes");
    }
    Ok(RecipientOutcome {
        location,
        message_id,
        recipient_index,
        kind,
        at_unix_ms,
        reply_text: reply_text.to_owned(),
    })
}

/// Why a message is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DoneReason {
    /// Every recipient has a final outcome.
    AllRecipientsFinal = 1,
    /// An operator deleted the message.
    Deleted = 2,
}

impl DoneReason {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::AllRecipientsFinal),
            2 => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// A decoded message-done record (type 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDone {
    pub location: RecordLocation,
    pub message_id: MessageId,
    pub at_unix_ms: u64,
    pub reason: DoneReason,
}

/// Size of a message-done payload.
const MESSAGE_DONE_SIZE_BYTES: usize = 24;

pub fn encode_message_done(message_id: MessageId, at_unix_ms: u64, reason: DoneReason) -> Vec<u8> {
    let mut out = Vec::with_capacity(MESSAGE_DONE_SIZE_BYTES);
    out.extend_from_slice(&message_id.0.to_le_bytes());
    out.extend_from_slice(&at_unix_ms.to_le_bytes());
    out.push(reason as u8);
    out.extend_from_slice(&[0; 7]);
    out
}

fn decode_message_done(
    payload: &[u8],
    location: RecordLocation,
) -> Result<MessageDone, &'static str> {
    if payload.len() != MESSAGE_DONE_SIZE_BYTES {
        return Err("message done record has the wrong length");
    }
    let mut cursor = Cursor::new(payload);
    let message_id = MessageId(cursor.u64()?);
    let at_unix_ms = cursor.u64()?;
    let reason = DoneReason::from_u8(cursor.u8()?).ok_or("unknown message done reason")?;
    Ok(MessageDone {
        location,
        message_id,
        at_unix_ms,
        reason,
    })
}

/// A decoded added-header-fields record (type 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedFieldsRecord {
    pub location: RecordLocation,
    pub message_id: MessageId,
    pub at_unix_ms: u64,
    /// Complete header fields, each ending in CRLF. Invariant: empty or ending in CRLF, at
    /// most [`MAX_ADDED_FIELDS_BYTES`].
    pub fields: String,
}

/// Why added header fields cannot be stored; see [`check_added_fields`].
pub(crate) const ADDED_FIELDS_TOO_LONG: &str =
    "added header fields are longer than the format allows (MAX_ADDED_FIELDS_BYTES)";
/// See [`check_added_fields`].
pub(crate) const ADDED_FIELDS_WITHOUT_CRLF: &str = "added header fields do not end in CRLF";

/// The rule writers and readers both apply to the `fields` of an added-header-fields
/// record: at most [`MAX_ADDED_FIELDS_BYTES`], and empty or ending in CRLF (every field
/// ends in CRLF, so anything else is a cut field). The field syntax itself is the
/// producer's business; the spool does not parse header fields.
pub fn check_added_fields(fields: &str) -> Result<(), &'static str> {
    if fields.len() > MAX_ADDED_FIELDS_BYTES {
        return Err(ADDED_FIELDS_TOO_LONG);
    }
    if !fields.is_empty() && !fields.ends_with("\r\n") {
        return Err(ADDED_FIELDS_WITHOUT_CRLF);
    }
    Ok(())
}

/// Encodes an added-header-fields payload. Refuses (never cuts) fields that break
/// [`check_added_fields`]: a cut signature is useless, and a reader would refuse the
/// record.
pub fn encode_added_fields(
    message_id: MessageId,
    at_unix_ms: u64,
    fields: &str,
) -> Result<Vec<u8>, &'static str> {
    check_added_fields(fields)?;
    let mut out = Vec::with_capacity(20 + fields.len());
    out.extend_from_slice(&message_id.0.to_le_bytes());
    out.extend_from_slice(&at_unix_ms.to_le_bytes());
    // At most MAX_ADDED_FIELDS_BYTES, so the length fits in the u32.
    put_text(&mut out, fields);
    Ok(out)
}

/// An added-header-fields payload, borrowed: what [`decode_added_fields`] and the
/// zero-copy lookup behind `Spool::added_fields` both read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedFieldsPayload<'a> {
    pub message_id: MessageId,
    pub at_unix_ms: u64,
    pub fields: &'a str,
    /// Where `fields` starts within the payload; it runs to the payload's end.
    pub fields_start: usize,
}

/// Checks an added-header-fields payload: its layout, that it ends exactly after
/// `fields`, and [`check_added_fields`].
pub fn parse_added_fields(payload: &[u8]) -> Result<AddedFieldsPayload<'_>, &'static str> {
    let mut cursor = Cursor::new(payload);
    let message_id = MessageId(cursor.u64()?);
    let at_unix_ms = cursor.u64()?;
    let length = cursor.u32()? as usize;
    // Checked before the bytes are looked at, so an oversized length is named as such.
    if length > MAX_ADDED_FIELDS_BYTES {
        return Err(ADDED_FIELDS_TOO_LONG);
    }
    let fields_start = cursor.position;
    let fields =
        std::str::from_utf8(cursor.take(length)?).map_err(|_| "record text field is not UTF-8")?;
    if cursor.remaining() != 0 {
        return Err("added header fields record has trailing bytes");
    }
    check_added_fields(fields)?;
    Ok(AddedFieldsPayload {
        message_id,
        at_unix_ms,
        fields,
        fields_start,
    })
}

fn decode_added_fields(
    payload: &[u8],
    location: RecordLocation,
) -> Result<AddedFieldsRecord, &'static str> {
    let parsed = parse_added_fields(payload)?;
    Ok(AddedFieldsRecord {
        location,
        message_id: parsed.message_id,
        at_unix_ms: parsed.at_unix_ms,
        fields: parsed.fields.to_owned(),
    })
}

/// One valid record found by [`scan_segment_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScannedRecord {
    Message(SpooledMessage),
    RecipientOutcome(RecipientOutcome),
    MessageDone(MessageDone),
    AddedFields(AddedFieldsRecord),
    /// A record with valid checksums of a type this reader does not know (a later minor
    /// version wrote it); skipped.
    Unknown {
        location: RecordLocation,
        record_type: u16,
    },
}

/// What kind of damage a scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// Bytes that failed their checks, followed by a valid record: quarantined.
    Quarantined,
    /// Bytes that failed their checks with nothing valid after them up to the end of the
    /// segment: an interrupted write.
    TornTail,
}

/// A damaged byte range of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentDamage {
    pub offset_bytes: u64,
    /// Up to the next valid record (quarantined) or to the last non-zero byte (torn tail).
    /// Invariant: positive.
    pub length_bytes: u64,
    pub kind: DamageKind,
    pub reason: &'static str,
}

/// Everything [`scan_segment_bytes`] found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// In file order.
    pub records: Vec<ScannedRecord>,
    /// In file order.
    pub damage: Vec<SegmentDamage>,
}

/// Scans the complete bytes of one segment file: header, then every record, resynchronising
/// after damage as `spool-format/README.md` describes. Never panics; the only error is a
/// header that cannot be trusted (the caller decides what to do with the segment).
pub fn scan_segment_bytes(bytes: &[u8]) -> Result<SegmentScan, SegmentHeaderError> {
    let header = SegmentHeader::decode(bytes, bytes.len() as u64)?;
    let salt = header.salt;
    let mut records = Vec::new();
    let mut damage = Vec::new();
    let mut offset = header.header_size_bytes as usize;
    while offset < bytes.len() {
        let location = RecordLocation {
            segment: header.segment_number,
            offset_bytes: offset as u64,
        };
        let failure = match frame_record(bytes, offset, salt) {
            Ok(framed) => {
                match decode_payload(&framed, location) {
                    Ok(record) => records.push(record),
                    // The framing is intact, so the next record is right behind it. The
                    // padding may run past the end of a file cut short after the payload.
                    Err(reason) => damage.push(SegmentDamage {
                        offset_bytes: offset as u64,
                        length_bytes: framed.size_on_disk.min(bytes.len() - offset) as u64,
                        kind: DamageKind::Quarantined,
                        reason,
                    }),
                }
                offset = offset.saturating_add(framed.size_on_disk);
                continue;
            }
            Err(reason) => reason,
        };
        let rest = bytes.get(offset..).unwrap_or(&[]);
        let Some(last_non_zero) = rest.iter().rposition(|&byte| byte != 0) else {
            // The zero-filled preallocated tail: a clean end.
            break;
        };
        match resync(bytes, offset, salt) {
            Some(next) => {
                damage.push(SegmentDamage {
                    offset_bytes: offset as u64,
                    length_bytes: (next - offset) as u64,
                    kind: DamageKind::Quarantined,
                    reason: failure,
                });
                offset = next;
            }
            None => {
                damage.push(SegmentDamage {
                    offset_bytes: offset as u64,
                    length_bytes: last_non_zero as u64 + 1,
                    kind: DamageKind::TornTail,
                    reason: failure,
                });
                break;
            }
        }
    }
    Ok(SegmentScan {
        header,
        records,
        damage,
    })
}

fn decode_payload(
    framed: &FramedRecord<'_>,
    location: RecordLocation,
) -> Result<ScannedRecord, &'static str> {
    match RecordType::from_u16(framed.header.record_type) {
        Some(RecordType::Message) => decode_message(framed.payload, location)
            .map(|(message, _)| ScannedRecord::Message(message)),
        Some(RecordType::RecipientOutcome) => {
            decode_recipient_outcome(framed.payload, location).map(ScannedRecord::RecipientOutcome)
        }
        Some(RecordType::MessageDone) => {
            decode_message_done(framed.payload, location).map(ScannedRecord::MessageDone)
        }
        Some(RecordType::AddedFields) => {
            decode_added_fields(framed.payload, location).map(ScannedRecord::AddedFields)
        }
        None => Ok(ScannedRecord::Unknown {
            location,
            record_type: framed.header.record_type,
        }),
    }
}

/// Finds where valid records continue after damage at `damaged_offset`: first where the
/// damaged record's own length points, if a valid record is there; otherwise the first
/// aligned offset after the damage holding a record with valid checksums. Checking a
/// candidate's header checksum costs a constant, and only a candidate that passes it
/// (which needs the segment's salt) has its payload checksummed, so the scan stays linear.
fn resync(bytes: &[u8], damaged_offset: usize, salt: Salt) -> Option<usize> {
    let by_length = bytes
        .get(damaged_offset..)
        .filter(|at| at.get(..4) == Some(&RECORD_MAGIC[..]))
        .and_then(|at| le_u32(at, 8))
        .map(|length| length as usize)
        .filter(|&length| length <= MAX_RECORD_PAYLOAD_BYTES)
        .and_then(record_size_on_disk)
        .and_then(|size| damaged_offset.checked_add(size))
        .filter(|&next| frame_record(bytes, next, salt).is_ok());
    if by_length.is_some() {
        return by_length;
    }
    let first = damaged_offset.checked_add(RECORD_ALIGNMENT_BYTES)?;
    (first..bytes.len())
        .step_by(RECORD_ALIGNMENT_BYTES)
        .find(|&candidate| {
            bytes.get(candidate..candidate + 4) == Some(&RECORD_MAGIC[..])
                && frame_record(bytes, candidate, salt).is_ok()
        })
}

fn le_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let array: [u8; 2] = bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(array))
}

fn le_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let array: [u8; 4] = bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(array))
}

fn le_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let array: [u8; 8] = bytes.get(offset..offset.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

/// A bounds-checked reader over a payload.
struct Cursor<'a> {
    bytes: &'a [u8],
    /// Invariant: at most `bytes.len()`.
    position: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn take(&mut self, length: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .position
            .checked_add(length)
            .ok_or("record payload is truncated")?;
        let taken = self
            .bytes
            .get(self.position..end)
            .ok_or("record payload is truncated")?;
        self.position = end;
        Ok(taken)
    }

    fn skip(&mut self, length: usize) -> Result<(), &'static str> {
        self.take(length).map(drop)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        self.take(1)?
            .first()
            .copied()
            .ok_or("record payload is truncated")
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        le_u32(self.take(4)?, 0).ok_or("record payload is truncated")
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        le_u64(self.take(8)?, 0).ok_or("record payload is truncated")
    }

    fn text(&mut self) -> Result<&'a str, &'static str> {
        let length = self.u32()? as usize;
        std::str::from_utf8(self.take(length)?).map_err(|_| "record text field is not UTF-8")
    }
}

/// Writes consecutive fields into a fixed buffer. Only used with layouts whose sizes are
/// constants of this module, so running past the end is a bug in this file.
struct FixedWriter<'a> {
    out: &'a mut [u8],
    position: usize,
}

impl<'a> FixedWriter<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Self { out, position: 0 }
    }

    fn put(&mut self, field: &[u8]) {
        let end = self.position + field.len();
        self.out[self.position..end].copy_from_slice(field);
        self.position = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: Salt = Salt(0x0123_4567_89ab_cdef);

    fn envelope_recipients() -> Vec<String> {
        vec!["a@example.net".to_owned(), "b@example.net".to_owned()]
    }

    fn message(id: u64, body: &[u8]) -> Vec<u8> {
        let recipients = envelope_recipients();
        let envelope = Envelope {
            received_at_unix_ms: 17,
            client_address: "192.0.2.1:25".parse().unwrap(),
            helo: "client.example",
            authenticated_user: Some("alice"),
            mail_from: "alice@example.com",
            mail_parameters: "SIZE=100",
            recipients: &recipients,
        };
        let mut payload = encode_message_prefix(MessageId(id), &envelope, body.len()).unwrap();
        payload.extend_from_slice(body);
        let header = encode_record_header(
            SALT,
            RecordType::Message,
            payload.len() as u32,
            SALT.checksum(&[&payload]),
        );
        let mut record = header.to_vec();
        record.extend_from_slice(&payload);
        record.resize(record_size_on_disk(payload.len()).unwrap(), 0);
        record
    }

    /// A segment with three messages and a zero tail.
    fn segment() -> Vec<u8> {
        let mut bytes = SegmentHeader::new(3, 99, SALT, 2048).encode().to_vec();
        for id in 1..=3 {
            bytes.extend_from_slice(&message(id, &[id as u8; 100]));
        }
        bytes.resize(2048, 0);
        bytes
    }

    fn message_ids(scan: &SegmentScan) -> Vec<u64> {
        scan.records
            .iter()
            .filter_map(|record| match record {
                ScannedRecord::Message(message) => Some(message.id.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn crc32c_is_the_castagnoli_crc() {
        // The check value the format document quotes.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn checksum_of_parts_equals_checksum_of_the_concatenation() {
        let whole = SALT.checksum(&[b"hello, world"]);
        assert_eq!(SALT.checksum(&[b"hello", b", ", b"world"]), whole);
        let mut concatenated = SALT.0.to_le_bytes().to_vec();
        concatenated.extend_from_slice(b"hello, world");
        assert_eq!(crc32c::crc32c(&concatenated), whole);
        assert_ne!(Salt(1).checksum(&[b"hello, world"]), whole);
    }

    #[test]
    fn segment_header_round_trips() {
        let header = SegmentHeader::new(42, 1_700_000_000_000_000, SALT, 65536);
        let bytes = header.encode();
        assert_eq!(&bytes[..8], b"\x89TSPOOL\n");
        assert_eq!(SegmentHeader::decode(&bytes, 65536), Ok(header));
    }

    #[test]
    fn segment_header_refusals() {
        let good = SegmentHeader::new(1, 2, SALT, 4096).encode();
        let patched = |offset: usize, value: &[u8]| {
            let mut bytes = good;
            bytes[offset..offset + value.len()].copy_from_slice(value);
            bytes
        };
        let with_checksum = |mut bytes: [u8; SEGMENT_HEADER_SIZE_BYTES]| {
            let checksum = crc32c::crc32c(&bytes[..60]);
            bytes[60..].copy_from_slice(&checksum.to_le_bytes());
            bytes
        };
        let cases: [(&[u8], u64, SegmentHeaderError); 7] = [
            (&good[..30], 4096, SegmentHeaderError::TooShort),
            (&good[..4], 4096, SegmentHeaderError::TooShort),
            (&patched(0, b"X"), 4096, SegmentHeaderError::BadMagic),
            (
                &patched(8, &2u16.to_le_bytes()),
                4096,
                SegmentHeaderError::UnsupportedVersion {
                    major: 2,
                    minor: FORMAT_MINOR,
                },
            ),
            (
                &patched(20, &[0xff]),
                4096,
                SegmentHeaderError::ChecksumMismatch,
            ),
            (
                &with_checksum(patched(12, &60u32.to_le_bytes())),
                4096,
                SegmentHeaderError::BadHeaderSize,
            ),
            (&good, 32, SegmentHeaderError::BadHeaderSize),
        ];
        for (bytes, file_size, expected) in cases {
            assert_eq!(SegmentHeader::decode(bytes, file_size), Err(expected));
        }
    }

    #[test]
    fn segment_file_names() {
        assert_eq!(segment_file_name(0x2a), "000000000000002a.segment");
        assert_eq!(
            parse_segment_file_name("000000000000002a.segment"),
            Some(0x2a)
        );
        for bad in [
            "000000000000002A.segment",
            "2a.segment",
            "000000000000002a.segment.tmp",
            "+00000000000002a.segment",
            "LOCK",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn clean_segment_scans_without_damage() {
        let scan = scan_segment_bytes(&segment()).unwrap();
        assert_eq!(message_ids(&scan), vec![1, 2, 3]);
        assert!(scan.damage.is_empty());
        assert_eq!(scan.header.segment_number, 3);
        let ScannedRecord::Message(first) = &scan.records[0] else {
            panic!("not a message")
        };
        assert_eq!(first.location.offset_bytes, 64);
        assert_eq!(first.authenticated_user.as_deref(), Some("alice"));
        assert_eq!(first.recipients, envelope_recipients());
        assert_eq!(first.body_size_bytes, 100);
    }

    #[test]
    fn every_truncation_scans_without_panicking_or_inventing_messages() {
        let bytes = segment();
        for length in 0..bytes.len() {
            if let Ok(scan) = scan_segment_bytes(&bytes[..length]) {
                let ids = message_ids(&scan);
                assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
                assert!(ids.iter().all(|id| (1..=3).contains(id)));
            }
        }
    }

    #[test]
    fn every_single_byte_flip_loses_at_most_one_message() {
        let bytes = segment();
        let record_size = message(1, &[0; 100]).len();
        let end_of_records = SEGMENT_HEADER_SIZE_BYTES + 3 * record_size;
        for offset in SEGMENT_HEADER_SIZE_BYTES..end_of_records {
            let mut damaged = bytes.clone();
            damaged[offset] ^= 0x01;
            let scan = scan_segment_bytes(&damaged).unwrap();
            let ids = message_ids(&scan);
            assert!(ids.len() >= 2, "flip at {offset} lost {ids:?}");
            // A flip in a record's padding (not covered by checksums) loses nothing.
            assert_eq!(scan.damage.len(), 3 - ids.len(), "flip at {offset}");
            // Damage in the last record has nothing valid after it: a torn tail.
            let expected = if offset >= end_of_records - record_size {
                DamageKind::TornTail
            } else {
                DamageKind::Quarantined
            };
            if let [damage] = scan.damage[..] {
                assert_eq!(damage.kind, expected, "flip at {offset}");
            }
        }
    }

    #[test]
    fn zero_tail_after_a_header_is_clean() {
        let mut bytes = SegmentHeader::new(1, 1, SALT, 4096).encode().to_vec();
        bytes.resize(4096, 0);
        let scan = scan_segment_bytes(&bytes).unwrap();
        assert!(scan.records.is_empty() && scan.damage.is_empty());
    }

    /// Found by the fuzzer: a checksum-valid record whose payload does not decode, in a
    /// file that ends inside the record's padding, was reported as damage reaching past
    /// the end of the file.
    #[test]
    fn undecodable_record_cut_in_its_padding_stays_inside_the_file() {
        let payload = b"short";
        let header = encode_record_header(
            SALT,
            RecordType::Message,
            payload.len() as u32,
            SALT.checksum(&[payload]),
        );
        let mut bytes = SegmentHeader::new(1, 1, SALT, 4096).encode().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
        let scan = scan_segment_bytes(&bytes).unwrap();
        assert_eq!(
            scan.damage,
            vec![SegmentDamage {
                offset_bytes: 64,
                length_bytes: (RECORD_HEADER_SIZE_BYTES + payload.len()) as u64,
                kind: DamageKind::Quarantined,
                reason: "record payload is truncated",
            }]
        );
    }

    #[test]
    fn message_body_start_agrees_with_decode_message() {
        let location = RecordLocation {
            segment: 1,
            offset_bytes: 64,
        };
        for (id, body) in [(1u64, &b""[..]), (2, b"x"), (3, &[7u8; 1000])] {
            let record = message(id, body);
            let payload = &record[RECORD_HEADER_SIZE_BYTES
                ..RECORD_HEADER_SIZE_BYTES + record_payload_length(&record)];
            let (decoded, decoded_start) = decode_message(payload, location).unwrap();
            assert_eq!(message_body_start(payload), Ok((decoded.id, decoded_start)));
            assert_eq!(&payload[decoded_start..], body);
        }
        // Every truncation and every single-byte change is judged the same way by both.
        let record = message(9, b"hello body");
        let payload = &record
            [RECORD_HEADER_SIZE_BYTES..RECORD_HEADER_SIZE_BYTES + record_payload_length(&record)];
        for length in 0..payload.len() {
            let cut = &payload[..length];
            assert_eq!(
                message_body_start(cut).map(|(_, start)| start),
                decode_message(cut, location).map(|(_, start)| start),
                "cut at {length}"
            );
        }
        for offset in 0..payload.len() {
            for value in [0x00, 0x01, 0x80, 0xff] {
                let mut changed = payload.to_vec();
                changed[offset] = value;
                assert_eq!(
                    message_body_start(&changed).map(|(_, start)| start),
                    decode_message(&changed, location).map(|(_, start)| start),
                    "byte {offset} set to {value:#x}"
                );
            }
        }
    }

    fn framed_record(record_type: RecordType, payload: &[u8]) -> Vec<u8> {
        let header = encode_record_header(
            SALT,
            record_type,
            payload.len() as u32,
            SALT.checksum(&[payload]),
        );
        let mut record = header.to_vec();
        record.extend_from_slice(payload);
        record.resize(record_size_on_disk(payload.len()).unwrap(), 0);
        record
    }

    /// An added-fields payload with any `fields` bytes, bypassing the encoder's checks.
    fn raw_added_fields(id: u64, fields: &[u8]) -> Vec<u8> {
        let mut payload = id.to_le_bytes().to_vec();
        payload.extend_from_slice(&5u64.to_le_bytes());
        payload.extend_from_slice(&(fields.len() as u32).to_le_bytes());
        payload.extend_from_slice(fields);
        payload
    }

    #[test]
    fn added_fields_round_trip_through_a_scan() {
        let location = RecordLocation {
            segment: 3,
            offset_bytes: 64,
        };
        let longest = format!("X: {}\r\n", "y".repeat(MAX_ADDED_FIELDS_BYTES - 5));
        for fields in [
            "",
            "DKIM-Signature: v=1; a=ed25519-sha256;\r\n\tb=abc\r\n",
            longest.as_str(),
        ] {
            let payload = encode_added_fields(MessageId(9), 1234, fields).unwrap();
            // id, time, then the text: length and bytes, nothing after.
            assert_eq!(payload.len(), 20 + fields.len());
            assert_eq!(&payload[..8], &9u64.to_le_bytes());
            assert_eq!(&payload[8..16], &1234u64.to_le_bytes());
            assert_eq!(&payload[16..20], &(fields.len() as u32).to_le_bytes());
            let parsed = parse_added_fields(&payload).unwrap();
            assert_eq!(parsed.fields, fields);
            assert_eq!(&payload[parsed.fields_start..], fields.as_bytes());
            let mut bytes = SegmentHeader::new(3, 1, SALT, 4096).encode().to_vec();
            bytes.extend_from_slice(&framed_record(RecordType::AddedFields, &payload));
            let scan = scan_segment_bytes(&bytes).unwrap();
            assert!(scan.damage.is_empty());
            assert_eq!(
                scan.records,
                vec![ScannedRecord::AddedFields(AddedFieldsRecord {
                    location,
                    message_id: MessageId(9),
                    at_unix_ms: 1234,
                    fields: fields.to_owned(),
                })]
            );
        }
    }

    #[test]
    fn added_fields_refusals() {
        let too_long = format!("X: {}\r\n", "y".repeat(MAX_ADDED_FIELDS_BYTES - 4));
        for (fields, reason) in [
            (too_long.as_str(), ADDED_FIELDS_TOO_LONG),
            ("DKIM-Signature: v=1", ADDED_FIELDS_WITHOUT_CRLF),
            ("DKIM-Signature: v=1\n", ADDED_FIELDS_WITHOUT_CRLF),
            ("DKIM-Signature: v=1\r", ADDED_FIELDS_WITHOUT_CRLF),
        ] {
            assert_eq!(
                encode_added_fields(MessageId(1), 1, fields),
                Err(reason),
                "{fields:?}"
            );
            assert_eq!(
                parse_added_fields(&raw_added_fields(1, fields.as_bytes())),
                Err(reason),
                "{fields:?}"
            );
        }
        let mut trailing = raw_added_fields(1, b"A: b\r\n");
        trailing.push(0);
        let mut huge_length = raw_added_fields(1, b"");
        huge_length[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let cases: [(&[u8], &str); 5] = [
            (&trailing, "added header fields record has trailing bytes"),
            (&huge_length, ADDED_FIELDS_TOO_LONG),
            (
                &raw_added_fields(1, b"A: \xff\r\n"),
                "record text field is not UTF-8",
            ),
            (
                &raw_added_fields(1, b"A: b\r\n")[..24],
                "record payload is truncated",
            ),
            (&[0; 19], "record payload is truncated"),
        ];
        for (payload, reason) in cases {
            assert_eq!(parse_added_fields(payload), Err(reason));
        }
        // A scan quarantines a checksum-valid record that breaks the rule, and goes on.
        let mut bytes = SegmentHeader::new(1, 1, SALT, 4096).encode().to_vec();
        let bad = framed_record(RecordType::AddedFields, &raw_added_fields(1, b"A: b"));
        bytes.extend_from_slice(&bad);
        bytes.extend_from_slice(&message(2, b"body"));
        let scan = scan_segment_bytes(&bytes).unwrap();
        assert_eq!(message_ids(&scan), vec![2]);
        assert_eq!(
            scan.damage,
            vec![SegmentDamage {
                offset_bytes: 64,
                length_bytes: bad.len() as u64,
                kind: DamageKind::Quarantined,
                reason: ADDED_FIELDS_WITHOUT_CRLF,
            }]
        );
    }

    #[test]
    fn record_type_four_is_added_fields_and_new_segments_are_1_1() {
        assert_eq!(RecordType::from_u16(4), Some(RecordType::AddedFields));
        assert_eq!(RecordType::from_u16(5), None);
        let header = SegmentHeader::new(1, 1, SALT, 4096).encode();
        assert_eq!(&header[8..12], &[1, 0, 1, 0]);
        // A 1.0 segment is still read.
        let mut old = SegmentHeader::new(1, 1, SALT, 4096);
        old.format_minor = 0;
        assert_eq!(SegmentHeader::decode(&old.encode(), 4096), Ok(old));
    }

    fn record_payload_length(record: &[u8]) -> usize {
        u32::from_le_bytes(record[8..12].try_into().unwrap()) as usize
    }

    #[test]
    fn recipient_count_cannot_force_a_large_allocation() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u64.to_le_bytes());
        payload.extend_from_slice(&1u64.to_le_bytes());
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        let location = RecordLocation {
            segment: 1,
            offset_bytes: 64,
        };
        assert_eq!(
            decode_message(&payload, location).unwrap_err(),
            "record payload is truncated"
        );
    }
}
