//! An xz stream that stores its data uncompressed (LZMA2 "uncompressed chunks"): what the server
//! sends to a Nix client that asks for a NAR at the `.nar.xz` URL it uploaded it to.
//!
//! Any xz decoder reads it, and writing it costs a copy and a few header bytes per 64 KiB, so a
//! NAR goes out at the speed of its stored chunks rather than of an xz encoder (a few MB/s at
//! Nix's default level). The bytes on the wire are the NAR's size, which is what a client that
//! asked for an xz file of ours would get from a `.nar` anyway. Format: the .xz file format
//! 1.2.0 (stream header, one block with an LZMA2 filter and no integrity check, index, footer);
//! Nix checks the NAR's own SHA-256 after decompressing.

/// Largest LZMA2 uncompressed chunk.
const CHUNK: usize = 64 * 1024;

/// Stream flags: no integrity check (the NAR hash is the check).
const STREAM_FLAGS: [u8; 2] = [0x00, 0x00];

/// LZMA2 dictionary size property: 1 MiB, enough for any decoder to hold a 64 KiB chunk.
const DICT_SIZE_PROPERTY: u8 = 16;

/// Writes an xz stream piece by piece: [`XzStored::header`], then [`XzStored::encode`] for
/// every piece of the data, then [`XzStored::finish`].
#[derive(Debug, Default)]
pub struct XzStored {
    /// Uncompressed bytes so far.
    uncompressed: u64,
    /// LZMA2 bytes so far (chunk headers and data).
    compressed: u64,
}

fn crc32(bytes: &[u8]) -> [u8; 4] {
    crc32fast::hash(bytes).to_le_bytes()
}

/// xz's variable-length integer: seven bits a byte, least significant first.
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn pad_to_four(out: &mut Vec<u8>, len: u64) {
    out.extend(std::iter::repeat_n(0u8, ((4 - len % 4) % 4) as usize));
}

/// The block header: one LZMA2 filter, no sizes (they are in the index).
fn block_header() -> Vec<u8> {
    // Size byte, flags, filter id, properties size, properties, padding: 8 bytes, then CRC32.
    let mut header = vec![(12 / 4 - 1) as u8, 0x00, 0x21, 0x01, DICT_SIZE_PROPERTY, 0, 0, 0];
    let crc = crc32(&header);
    header.extend_from_slice(&crc);
    header
}

impl XzStored {
    /// An encoder at the start of a stream.
    pub fn new() -> Self {
        XzStored::default()
    }

    /// The stream header and the block header.
    pub fn header(&self) -> Vec<u8> {
        let mut out = vec![0xfd, b'7', b'z', b'X', b'Z', 0x00];
        out.extend_from_slice(&STREAM_FLAGS);
        out.extend_from_slice(&crc32(&STREAM_FLAGS));
        out.extend_from_slice(&block_header());
        out
    }

    /// `data` as LZMA2 uncompressed chunks.
    pub fn encode(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + data.len().div_ceil(CHUNK) * 3);
        for piece in data.chunks(CHUNK) {
            // The first chunk resets the dictionary, as the format requires; the others go on.
            out.push(if self.uncompressed == 0 { 0x01 } else { 0x02 });
            out.extend_from_slice(&((piece.len() - 1) as u16).to_be_bytes());
            out.extend_from_slice(piece);
            self.uncompressed += piece.len() as u64;
            self.compressed += 3 + piece.len() as u64;
        }
        out
    }

    /// The end of the LZMA2 data, the block's padding, the index and the stream footer.
    pub fn finish(self) -> Vec<u8> {
        let mut out = vec![0x00];
        let compressed = self.compressed + 1;
        pad_to_four(&mut out, compressed);
        let unpadded = block_header().len() as u64 + compressed;
        let mut index = vec![0x00];
        push_varint(&mut index, 1);
        push_varint(&mut index, unpadded);
        push_varint(&mut index, self.uncompressed);
        let len = index.len() as u64;
        pad_to_four(&mut index, len);
        let crc = crc32(&index);
        index.extend_from_slice(&crc);
        let backward_size = (index.len() / 4 - 1) as u32;
        out.extend_from_slice(&index);
        let mut footer_fields = backward_size.to_le_bytes().to_vec();
        footer_fields.extend_from_slice(&STREAM_FLAGS);
        out.extend_from_slice(&crc32(&footer_fields));
        out.extend_from_slice(&footer_fields);
        out.extend_from_slice(b"YZ");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn encode_all(pieces: &[&[u8]]) -> Vec<u8> {
        let mut xz = XzStored::new();
        let mut out = xz.header();
        for piece in pieces {
            out.extend(xz.encode(piece));
        }
        out.extend(xz.finish());
        out
    }

    fn decode(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(stream).read_to_end(&mut out).expect("liblzma reads the stream");
        out
    }

    #[test]
    fn liblzma_reads_what_it_writes() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for pieces in [vec![], vec![&b"x"[..]], vec![&big[..]], vec![&big[..65_536], &big[65_536..65_537], &big[65_537..]]] {
            let expected: Vec<u8> = pieces.concat();
            let stream = encode_all(&pieces);
            assert_eq!(decode(&stream), expected);
            assert_eq!(stream.len() % 4, 0, "xz streams are a multiple of four bytes");
        }
    }

    #[test]
    fn a_damaged_stream_is_refused() {
        let stream = encode_all(&[b"some NAR bytes"]);
        for at in [0, 7, 13, stream.len() - 10, stream.len() - 2] {
            let mut damaged = stream.clone();
            damaged[at] ^= 0x40;
            let mut out = Vec::new();
            assert!(xz2::read::XzDecoder::new(&damaged[..]).read_to_end(&mut out).is_err(), "byte {at}");
        }
    }
}
