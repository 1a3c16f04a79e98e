//! The FastCDC chunker and chunk frames.

use flywheel_core::chunk::{compress, decompress_verified, ChunkHash, ChunkParams, Chunker};
use flywheel_core::ErrorKind;
use proptest::prelude::*;

use crate::config;

/// The smallest sizes FastCDC 2020 supports, so that small inputs make many chunks.
const SMALL: ChunkParams = ChunkParams { min_size: 64, avg_size: 256, max_size: 1024 };

fn params() -> impl Strategy<Value = ChunkParams> {
    prop_oneof![
        Just(SMALL),
        (64u32..512, 256u32..2048, 1024u32..8192).prop_filter_map("sizes in order", |(min, avg, max)| {
            let params = ChunkParams { min_size: min, avg_size: avg, max_size: max };
            params.validate().is_ok().then_some(params)
        }),
    ]
}

/// Data with repeats, so that content-defined boundaries recur.
fn data(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max),
        (proptest::collection::vec(any::<u8>(), 1..600), 1usize..20).prop_map(|(unit, n)| unit.repeat(n)),
        (any::<u8>(), 0..max).prop_map(|(b, n)| vec![b; n]),
    ]
}

fn chunk_pushed(params: ChunkParams, data: &[u8], pieces: &[usize]) -> Vec<Vec<u8>> {
    let mut chunker = Chunker::new(params);
    let mut chunks = Vec::new();
    let mut emit = |c: Vec<u8>| -> Result<(), ()> {
        chunks.push(c);
        Ok(())
    };
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = pieces[i % pieces.len()].min(rest.len());
        chunker.push(&rest[..n], &mut emit).unwrap();
        rest = &rest[n..];
        i += 1;
    }
    chunker.finish(&mut emit).unwrap();
    chunks
}

proptest! {
    #![proptest_config(config(150))]

    /// Sizes that pass `validate` are ones FastCDC works with (a server takes them from its
    /// configuration file).
    #[test]
    fn validated_sizes_chunk_without_panicking(
        min in prop_oneof![60u32..70, 16_000u32..17_000, any::<u32>()],
        avg in prop_oneof![250u32..260, 65_000u32..66_000, any::<u32>()],
        max in prop_oneof![1020u32..1030, 262_000u32..263_000, any::<u32>()],
        data in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        let params = ChunkParams { min_size: min, avg_size: avg, max_size: max };
        match params.validate() {
            Ok(()) => prop_assert_eq!(Chunker::chunk_all(params, &data).concat(), data),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
    }

    #[test]
    fn chunks_rebuild_the_input_within_their_sizes(params in params(), data in data(12_000)) {
        let chunks = Chunker::chunk_all(params, &data);
        prop_assert_eq!(chunks.concat(), data.clone());
        if data.len() < params.avg_size as usize {
            prop_assert_eq!(chunks.len(), 1);
            return Ok(());
        }
        let (last, rest) = chunks.split_last().unwrap();
        prop_assert!(!last.is_empty() && last.len() <= params.max_size as usize);
        for chunk in rest {
            prop_assert!(
                (params.min_size as usize..=params.max_size as usize).contains(&chunk.len()),
                "a chunk of {} bytes with {:?}", chunk.len(), params
            );
        }
    }

    /// Boundaries depend on the content only: not on how it arrives, nor on the run.
    #[test]
    fn chunking_is_deterministic(
        params in params(),
        data in data(12_000),
        pieces in proptest::collection::vec(prop_oneof![1usize..64, 1usize..5000], 1..6),
    ) {
        let whole = Chunker::chunk_all(params, &data);
        prop_assert_eq!(&Chunker::chunk_all(params, &data), &whole);
        prop_assert_eq!(&chunk_pushed(params, &data, &pieces), &whole);
    }

    #[test]
    fn frames_round_trip(data in data(4000), level in 1i32..6) {
        let frame = compress(&data, level).unwrap();
        prop_assert_eq!(decompress_verified(&frame, &ChunkHash::of(&data), data.len()).unwrap(), data);
    }

    /// Whatever a store hands back, a read gets the named bytes or Corrupt.
    #[test]
    fn damaged_frames_are_corrupt(
        data in data(4000),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
        claimed in prop_oneof![0usize..5000, Just(1 << 24)],
    ) {
        let hash = ChunkHash::of(&data);
        let mut frame = compress(&data, 3).unwrap();
        let i = at.index(frame.len());
        frame[i] ^= mask;
        for (frame, len) in [(&frame, data.len()), (&frame, claimed), (&garbage, claimed)] {
            match decompress_verified(frame, &hash, len) {
                Ok(got) => prop_assert_eq!(&got, &data),
                Err(err) => prop_assert_eq!(err.kind(), ErrorKind::Corrupt),
            }
        }
    }
}

/// Found by `validated_sizes_chunk_without_panicking`: odd sizes passed `validate`, and
/// FastCDC then panicked ("min_size must be even") on the first NAR.
#[test]
fn odd_chunk_sizes_are_refused() {
    for params in [
        ChunkParams { min_size: 65, avg_size: 256, max_size: 1024 },
        ChunkParams { min_size: 64, avg_size: 257, max_size: 1024 },
        ChunkParams { min_size: 64, avg_size: 256, max_size: 1025 },
    ] {
        assert_eq!(params.validate().unwrap_err().kind(), ErrorKind::InvalidInput, "{params:?}");
    }
}
