//! Nix's base32 ("nixbase32").
//!
//! Not RFC 4648: the alphabet omits `e`, `o`, `u` and `t`, there is no padding, and the string
//! is written from the most significant 5-bit group of the *last* byte downwards, so the first
//! character depends on the end of the input.

use crate::error::{Error, Result};

/// The 32 digits, in value order.
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Value of an ASCII byte as a digit, or 0xff.
const DECODE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Number of characters [`encode`] produces for `byte_len` bytes.
pub fn encoded_len(byte_len: usize) -> usize {
    if byte_len == 0 {
        0
    } else {
        (byte_len * 8 - 1) / 5 + 1
    }
}

/// The 5-bit group that the character at position `pos` (0 = first character) encodes.
///
/// Callers guarantee `pos < encoded_len(bytes.len())`.
pub(crate) fn digit_at(bytes: &[u8], pos: usize) -> u8 {
    let n = encoded_len(bytes.len()) - 1 - pos;
    let bit = n * 5;
    let i = bit / 8;
    let j = bit % 8;
    let low = bytes[i] >> j;
    // The group may straddle into the next byte; past the end that byte reads as zero.
    let high = match bytes.get(i + 1) {
        Some(&next) if j > 3 => next << (8 - j),
        _ => 0,
    };
    (low | high) & 0x1f
}

/// Encodes bytes as nixbase32.
pub fn encode(bytes: &[u8]) -> String {
    (0..encoded_len(bytes.len()))
        .map(|pos| ALPHABET[digit_at(bytes, pos) as usize] as char)
        .collect()
}

/// Decodes nixbase32.
///
/// Rejects characters outside the alphabet, lengths that no byte string encodes to, and set
/// bits beyond the last byte (which would make two strings decode to the same bytes).
pub fn decode(s: &str) -> Result<Vec<u8>> {
    let byte_len = s.len() * 5 / 8;
    if encoded_len(byte_len) != s.len() {
        return Err(Error::invalid(format!(
            "invalid nixbase32 length {} (no byte string encodes to it)",
            s.len()
        )));
    }
    let mut out = vec![0u8; byte_len];
    for (pos, c) in s.bytes().enumerate() {
        let digit = DECODE[c as usize];
        if digit == 0xff {
            return Err(Error::invalid(format!(
                "invalid character {:?} in nixbase32 string",
                char::from(c)
            )));
        }
        let n = s.len() - 1 - pos;
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        out[i] |= digit << j;
        let carry = if j > 3 { digit >> (8 - j) } else { 0 };
        if let Some(next) = out.get_mut(i + 1) {
            *next |= carry;
        } else if carry != 0 {
            return Err(Error::invalid(
                "nixbase32 string has non-zero bits beyond the last byte",
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    // Expected strings come from `nix hash to-base32` of Nix 2.8.
    #[test]
    fn matches_nix_for_hashes() {
        let cases = [
            (
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
            ),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            ("0102030405060708090a0b0c0d0e0f1011121314", "2h9i448h1w70s30b184hh1q60l2060h1"),
            ("000102030405060708090a0b0c0d0eff", "7z1q6hq2qa1440f1h50h1h4080"),
        ];
        for (hex_in, b32) in cases {
            let bytes = hex::decode(hex_in).unwrap();
            assert_eq!(encode(&bytes), b32);
            assert_eq!(encoded_len(bytes.len()), b32.len());
            assert_eq!(decode(b32).unwrap(), bytes);
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(encode(&[0xff]), "7z");
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..70usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert_eq!(decode(&s).unwrap(), bytes, "length {len}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        for bad in ["e0", "0u", "ab!", "é0"] {
            let err = decode(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        // Length 1 and 3 encode no byte string.
        assert!(decode("0").is_err());
        assert!(decode("000").is_err());
        // "7z" is 0xff; "8z" would need a ninth bit.
        assert!(decode("8z").is_err());
        let mut s = encode(&[0u8; 32]);
        s.replace_range(0..1, "2");
        assert!(decode(&s).unwrap_err().message().contains("non-zero bits"));
    }
}
