//! Frames that the chunk API sent lately, kept in memory (`hot-chunk-bytes`).
//!
//! A fleet of runners running the same jobs misses the same chunks: the first runner's lazy
//! read costs an object-store GET, and with this every later runner's costs a map lookup (on
//! S3 about 0.7 ms less per miss). Only the chunk API reads and fills it: a NAR download
//! streams a whole path once and would push the fleet's working set out.
//!
//! A frame goes in only after it verified (or matched the digest of one that did), and a chunk
//! is named by its contents, so a kept frame is never stale. What a caller may read is checked
//! before the lookup, as for any chunk: the path must be one the caller's cache holds and must
//! list the chunk.

use bytes::Bytes;
use flywheel_core::chunk::ChunkHash;
use parking_lot::Mutex;

/// What an entry costs beyond its frame: the key, the map's node and the `Bytes` handle.
const ENTRY_OVERHEAD: usize = 128;

/// Verified chunk frames, least recently sent dropped first, bounded in bytes.
pub struct HotChunks {
    limit: usize,
    kept: Mutex<Kept>,
}

struct Kept {
    frames: lru::LruCache<ChunkHash, Bytes>,
    bytes: usize,
}

impl HotChunks {
    /// Keeps up to `limit` bytes of frames; 0 keeps none.
    pub fn new(limit: usize) -> Self {
        HotChunks { limit, kept: Mutex::new(Kept { frames: lru::LruCache::unbounded(), bytes: 0 }) }
    }

    /// The frame of `hash`, if kept.
    pub fn get(&self, hash: &ChunkHash) -> Option<Bytes> {
        if self.limit == 0 {
            return None;
        }
        self.kept.lock().frames.get(hash).cloned()
    }

    /// Keeps `frame`, which verified as the frame of `hash`. It is copied, so that a frame cut
    /// from a larger buffer does not keep the whole buffer alive uncounted.
    pub fn put(&self, hash: ChunkHash, frame: &Bytes) {
        let cost = frame.len() + ENTRY_OVERHEAD;
        // A frame larger than a sixteenth would push out many smaller ones for one chunk.
        if cost > self.limit / 16 {
            return;
        }
        let frame = Bytes::copy_from_slice(frame);
        let mut kept = self.kept.lock();
        if let Some(old) = kept.frames.put(hash, frame) {
            kept.bytes -= old.len() + ENTRY_OVERHEAD;
        }
        kept.bytes += cost;
        while kept.bytes > self.limit {
            match kept.frames.pop_lru() {
                Some((_, dropped)) => kept.bytes -= dropped.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }

    /// Bytes kept now, counted as [`HotChunks::new`]'s limit counts them.
    pub fn bytes(&self) -> usize {
        self.kept.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    #[test]
    fn keeps_what_fits_and_drops_the_least_recently_used() {
        let hot = HotChunks::new(16 * (1000 + ENTRY_OVERHEAD));
        for n in 0..16 {
            hot.put(hash(n), &Bytes::from(vec![n; 1000]));
        }
        assert_eq!(hot.bytes(), 16 * (1000 + ENTRY_OVERHEAD));
        // Chunk 0 is read again, so chunk 1 is the one a new frame pushes out.
        assert_eq!(hot.get(&hash(0)).as_deref(), Some(&[0u8; 1000][..]));
        hot.put(hash(16), &Bytes::from(vec![16; 1000]));
        assert!(hot.get(&hash(1)).is_none());
        assert!(hot.get(&hash(0)).is_some() && hot.get(&hash(16)).is_some());
        assert!(hot.bytes() <= 16 * (1000 + ENTRY_OVERHEAD));
        // The same chunk again replaces its entry rather than counting it twice.
        hot.put(hash(16), &Bytes::from(vec![16; 1000]));
        assert_eq!(hot.bytes(), 16 * (1000 + ENTRY_OVERHEAD));
    }

    #[test]
    fn large_frames_and_a_zero_limit_keep_nothing() {
        let hot = HotChunks::new(16 * 1024);
        hot.put(hash(1), &Bytes::from(vec![1; 2048]));
        assert!(hot.get(&hash(1)).is_none());
        assert_eq!(hot.bytes(), 0);
        let off = HotChunks::new(0);
        off.put(hash(2), &Bytes::from(vec![2; 10]));
        assert!(off.get(&hash(2)).is_none());
    }
}
