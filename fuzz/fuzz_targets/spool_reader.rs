//! The spool reader over arbitrary bytes: `scan_segment_bytes` must never panic, never
//! report a record outside the input, and never report overlapping results.
//!
//! Every input is scanned twice:
//! 1. as it is, a whole segment file (the seeds are real segments written by the crate);
//! 2. "re-sealed": the header checksum and the checksums of every aligned record header
//!    carrying the record magic are recomputed first. Random mutations almost never keep
//!    32-bit checksums valid, so without this pass the fuzzer would only ever exercise the
//!    framing checks, not the payload decoders behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_spool::format::{
    MAX_ADDED_FIELDS_BYTES, RECORD_ALIGNMENT_BYTES, RECORD_HEADER_SIZE_BYTES, RECORD_MAGIC,
    SEGMENT_HEADER_SIZE_BYTES, SEGMENT_MAGIC, Salt, ScannedRecord, SegmentHeader,
};
use tsubame_spool::scan_segment_bytes;

fuzz_target!(|input: &[u8]| {
    check(input);
    if let Some(resealed) = reseal(input) {
        check(&resealed);
    }
});

fn check(bytes: &[u8]) {
    let Ok(scan) = scan_segment_bytes(bytes) else {
        return;
    };
    let length = bytes.len() as u64;
    let mut previous_end = u64::from(scan.header.header_size_bytes);
    for record in &scan.records {
        let offset = match record {
            ScannedRecord::Message(message) => {
                assert!(message.body_size_bytes < length);
                assert!(!message.recipients.is_empty());
                message.location.offset_bytes
            }
            ScannedRecord::RecipientOutcome(outcome) => outcome.location.offset_bytes,
            ScannedRecord::MessageDone(done) => done.location.offset_bytes,
            ScannedRecord::AddedFields(added) => {
                assert!(added.fields.len() <= MAX_ADDED_FIELDS_BYTES);
                assert!(added.fields.is_empty() || added.fields.ends_with("\r\n"));
                added.location.offset_bytes
            }
            ScannedRecord::Unknown { location, .. } => location.offset_bytes,
        };
        assert!(
            offset >= previous_end,
            "records out of order or overlapping"
        );
        assert_eq!(offset % RECORD_ALIGNMENT_BYTES as u64, 0);
        assert!(offset + RECORD_HEADER_SIZE_BYTES as u64 <= length);
        previous_end = offset + RECORD_HEADER_SIZE_BYTES as u64;
    }
    for damage in &scan.damage {
        assert!(damage.length_bytes > 0);
        assert!(damage.offset_bytes + damage.length_bytes <= length);
    }
}

/// A copy of `input` whose segment header is re-encoded from its fields (so its checksum is
/// valid; reserved bytes become zero) and whose magic-carrying aligned records are
/// re-sealed with the header's salt. `None` when the input does not start with the
/// segment magic.
fn reseal(input: &[u8]) -> Option<Vec<u8>> {
    if input.len() < SEGMENT_HEADER_SIZE_BYTES || input[..8] != SEGMENT_MAGIC {
        return None;
    }
    let mut bytes = input.to_vec();
    let field = |offset: usize, size: usize| -> Option<u64> {
        let mut le = [0u8; 8];
        le[..size].copy_from_slice(bytes.get(offset..offset + size)?);
        Some(u64::from_le_bytes(le))
    };
    let salt = Salt(field(32, 8)?);
    let header = SegmentHeader {
        format_major: field(8, 2)? as u16,
        format_minor: field(10, 2)? as u16,
        header_size_bytes: field(12, 4)? as u32,
        segment_number: field(16, 8)?,
        created_at_unix_us: field(24, 8)?,
        salt,
        preallocated_size_bytes: field(40, 8)?,
    };
    bytes[..SEGMENT_HEADER_SIZE_BYTES].copy_from_slice(&header.encode());
    let mut offset = SEGMENT_HEADER_SIZE_BYTES;
    while offset + RECORD_HEADER_SIZE_BYTES <= bytes.len() {
        if bytes[offset..offset + 4] == RECORD_MAGIC {
            let payload_length =
                u32::from_le_bytes(bytes[offset + 8..offset + 12].try_into().ok()?) as usize;
            let payload_start = offset + RECORD_HEADER_SIZE_BYTES;
            if let Some(payload) = payload_start
                .checked_add(payload_length)
                .and_then(|end| bytes.get(payload_start..end))
            {
                let payload_checksum = salt.checksum(&[payload]);
                bytes[offset + 16..offset + 20].copy_from_slice(&payload_checksum.to_le_bytes());
            }
            let header_checksum =
                salt.checksum(&[&bytes[offset + 8..offset + RECORD_HEADER_SIZE_BYTES]]);
            bytes[offset + 4..offset + 8].copy_from_slice(&header_checksum.to_le_bytes());
        }
        offset += RECORD_ALIGNMENT_BYTES;
    }
    Some(bytes)
}
