//! Base64url without padding (RFC 4648 §5), as JWS (RFC 7515 §2) and PKCE (RFC 7636
//! §3) require. Encoding only: nothing here decodes peer input.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `bytes` in base64url, without `=` padding.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    let symbol = |index: u32| char::from(ALPHABET[(index & 0x3f) as usize]);
    for chunk in bytes.chunks(3) {
        let b0 = u32::from(chunk[0]);
        let b1 = chunk.get(1).copied().map_or(0, u32::from);
        let b2 = chunk.get(2).copied().map_or(0, u32::from);
        let group = (b0 << 16) | (b1 << 8) | b2;
        out.push(symbol(group >> 18));
        out.push(symbol(group >> 12));
        if chunk.len() > 1 {
            out.push(symbol(group >> 6));
        }
        if chunk.len() > 2 {
            out.push(symbol(group));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4648_vectors_without_padding() {
        // RFC 4648 §10, padding removed.
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(encode(input), *want, "{input:?}");
        }
    }

    #[test]
    fn url_safe_alphabet() {
        // 0xfb 0xff encodes to "+/8" in standard base64.
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(encode(&[0xff; 3]), "____");
    }
}
