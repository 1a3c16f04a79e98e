use fastcdc::v2020::FastCDC;

use crate::error::{Error, Result};

/// FastCDC sizes. The defaults are Attic's, so chunk boundaries (and dedup) agree with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChunkParams {
    /// Smallest chunk, except the last one of a NAR.
    pub min_size: u32,
    /// Target average chunk size. A NAR smaller than this is stored as a single chunk.
    pub avg_size: u32,
    /// Largest chunk.
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams { min_size: 16 * 1024, avg_size: 64 * 1024, max_size: 256 * 1024 }
    }
}

impl ChunkParams {
    /// Checks the sizes against what FastCDC 2020 supports: each within its bounds and even,
    /// and in order.
    pub fn validate(&self) -> Result<()> {
        let even = self.min_size.is_multiple_of(2) && self.avg_size.is_multiple_of(2) && self.max_size.is_multiple_of(2);
        let ok = even
            && (fastcdc::v2020::MINIMUM_MIN..=fastcdc::v2020::MINIMUM_MAX).contains(&(self.min_size as usize))
            && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&(self.avg_size as usize))
            && (fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&(self.max_size as usize))
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "chunk sizes min {} avg {} max {} are outside what FastCDC 2020 supports, odd, or out of order",
                self.min_size, self.avg_size, self.max_size
            )))
        }
    }
}

/// Cuts a byte stream into content-defined chunks as it arrives, holding at most about two
/// maximum-size chunks in memory.
pub struct Chunker {
    params: ChunkParams,
    buf: Vec<u8>,
    start: usize,
    total: u64,
}

impl Chunker {
    /// A chunker with the given sizes (see [`ChunkParams::validate`]).
    pub fn new(params: ChunkParams) -> Self {
        Chunker {
            params,
            buf: Vec::with_capacity(params.max_size as usize * 2),
            start: 0,
            total: 0,
        }
    }

    /// Feeds bytes; `emit` gets every chunk whose boundary is now known, in order.
    pub fn push<E>(&mut self, mut data: &[u8], emit: &mut impl FnMut(Vec<u8>) -> Result<(), E>) -> Result<(), E> {
        let max = self.params.max_size as usize;
        self.total += data.len() as u64;
        while !data.is_empty() {
            let take = (2 * max - (self.buf.len() - self.start)).min(data.len());
            if self.start > 0 && self.buf.len() + take > self.buf.capacity() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            // FastCDC never looks further than `max` bytes ahead, so once a full window is
            // buffered its first boundary is the one it would find over the whole stream.
            while self.buf.len() - self.start >= max {
                let window = &self.buf[self.start..self.start + max];
                let cut = self.first_cut(window);
                emit(window[..cut].to_vec())?;
                self.start += cut;
            }
        }
        Ok(())
    }

    /// Ends the stream and emits the remaining chunks.
    pub fn finish<E>(self, emit: &mut impl FnMut(Vec<u8>) -> Result<(), E>) -> Result<(), E> {
        let rest = &self.buf[self.start..];
        if self.total < self.params.avg_size as u64 {
            // Small NARs stay whole: splitting them saves nothing and costs a request each.
            return emit(rest.to_vec());
        }
        let mut offset = 0;
        while offset < rest.len() {
            let window = &rest[offset..rest.len().min(offset + self.params.max_size as usize)];
            let cut = self.first_cut(window);
            emit(window[..cut].to_vec())?;
            offset += cut;
        }
        Ok(())
    }

    fn first_cut(&self, window: &[u8]) -> usize {
        let cdc = FastCDC::new(window, self.params.min_size as usize, self.params.avg_size as usize, self.params.max_size as usize);
        let (_, cut) = cdc.cut(0, window.len());
        cut.max(1).min(window.len())
    }

    /// Cuts a whole buffer at once; the same boundaries as pushing it through a [`Chunker`].
    pub fn chunk_all(params: ChunkParams, data: &[u8]) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut chunker = Chunker::new(params);
        let mut emit = |c: Vec<u8>| -> Result<(), std::convert::Infallible> {
            chunks.push(c);
            Ok(())
        };
        let _ = chunker.push(data, &mut emit);
        let _ = chunker.finish(&mut emit);
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn boundaries_match_whole_buffer_fastcdc() {
        let params = ChunkParams::default();
        let data = pseudo_random(3_000_000, 7);
        let reference: Vec<usize> = FastCDC::new(&data, params.min_size as usize, params.avg_size as usize, params.max_size as usize)
            .map(|c| c.length)
            .collect();
        // Push in awkward piece sizes: the boundaries must not depend on them.
        let mut chunker = Chunker::new(params);
        let mut lengths = Vec::new();
        let mut emit = |c: Vec<u8>| -> Result<(), ()> {
            lengths.push(c.len());
            Ok(())
        };
        for piece in data.chunks(12_345) {
            chunker.push(piece, &mut emit).unwrap();
        }
        chunker.finish(&mut emit).unwrap();
        assert_eq!(lengths, reference);
        assert!(lengths.iter().all(|&l| l <= params.max_size as usize));
    }

    #[test]
    fn small_inputs_are_one_chunk() {
        let params = ChunkParams::default();
        for len in [0usize, 1, 20_000, 65_535] {
            let data = pseudo_random(len, 3);
            let chunks = Chunker::chunk_all(params, &data);
            assert_eq!(chunks.len(), 1, "len {len}");
            assert_eq!(chunks[0], data);
        }
    }

    #[test]
    fn insertion_changes_few_chunks() {
        let params = ChunkParams::default();
        let a = pseudo_random(2_000_000, 11);
        let mut b = a.clone();
        b.splice(1_000_000..1_000_000, b"inserted bytes".iter().copied());
        let ca: std::collections::HashSet<_> = Chunker::chunk_all(params, &a).into_iter().collect();
        let cb = Chunker::chunk_all(params, &b);
        let new = cb.iter().filter(|c| !ca.contains(*c)).count();
        assert!(new <= 3, "{new} new chunks of {}", cb.len());
        assert_eq!(cb.concat(), b);
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(ChunkParams::default().validate().is_ok());
        assert!(ChunkParams { min_size: 1, avg_size: 2, max_size: 3 }.validate().is_err());
        assert!(ChunkParams { min_size: 65536, avg_size: 16384, max_size: 262144 }.validate().is_err());
    }
}
