//! The part after `@` of a recipient address, as direct delivery checks it before any
//! DNS: never a panic; an accepted domain is ASCII, lower case, at most 253 bytes, and
//! checking it again gives it back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsubame_delivery::mx::normalize_destination;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(normalized) = normalize_destination(text) {
        assert!(normalized.is_ascii(), "{normalized:?}");
        if !normalized.starts_with('[') {
            assert!(normalized.len() <= 253, "{normalized:?}");
            assert_eq!(normalized, normalized.to_ascii_lowercase());
        }
        assert_eq!(
            normalize_destination(&normalized).as_deref(),
            Ok(normalized.as_str())
        );
    }
});
