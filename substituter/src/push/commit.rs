//! How a path is committed: as changes to an earlier version, by naming the `missing-chunks`
//! question its chunks were asked in, or with its whole chunk list.

use super::*;
use crate::retry::RetryPolicy;

impl Pusher {
    /// Commits a path whose chunks are all uploaded: by naming the `missing-chunks` question
    /// `query` when there is one, else (or when that is refused) with the whole chunk list.
    pub(super) async fn commit(&self, request: &CommitRequest, unique: &[ChunkHash], query: Option<String>) -> Result<()> {
        if let Some(query) = query {
            // The server remembers the list asked about: name it instead of listing the chunks
            // again. Any refusal (the server forgot it, another replica answered) falls back to
            // the full list, which also reports the real error if there is one.
            let short = by_query(request, unique, query);
            match self.api.commit(&short).await {
                Ok(()) => return Ok(()),
                Err(err) if matches!(err.kind(), ErrorKind::Unauthorized | ErrorKind::Forbidden) => return Err(err),
                Err(err) => tracing::debug!("commit by chunk query refused, sending the chunk list: {err}"),
            }
        }
        RetryPolicy::REQUEST.run("committing a path", || self.api.commit(request)).await
    }

    /// Pushes a path as changes to the last one the cache holds under its unversioned name
    /// (a new version of a package): asks only about the chunks that one lacks, and commits the
    /// chunk list as runs of its list. What goes over the wire then grows with the change, not
    /// with the NAR. `Ok(false)` when there is no such path, or it shares too little.
    pub(super) async fn push_as_changes(
        &self,
        physical: &std::path::Path,
        request: &CommitRequest,
        unique: &[ChunkHash],
        counters: &Counters,
    ) -> Result<bool> {
        let base = match self.api.base(&short_name(&request.store_path)).await {
            Ok(base) => base,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        };
        let in_base: HashSet<ChunkHash> = base.chunks.iter().map(|c| c.hash).collect();
        let ask: Vec<ChunkHash> = unique.iter().filter(|h| !in_base.contains(h)).copied().collect();
        // Sharing less than half, the delta would save little over the full list.
        if ask.len() * 2 > unique.len() {
            return Ok(false);
        }
        if !ask.is_empty() {
            self.upload_missing(physical, &request.chunks, &ask, counters).await?;
        }
        let delta = ChunkDelta::between(hash_part(&base.store_path)?, &base.chunks, &request.chunks);
        let as_changes = CommitRequest { chunks: Vec::new(), chunks_delta: Some(delta), ..request.clone() };
        self.api.commit(&as_changes).await?;
        counters.as_changes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(store_path = %request.store_path, base = %base.store_path, "pushed as changes");
        Ok(true)
    }
}

/// The commit `full` with its chunks named by the `missing-chunks` question `query`, which
/// asked about `asked` (the unique chunks, in order of first appearance).
pub(super) fn by_query(full: &CommitRequest, asked: &[ChunkHash], query: String) -> CommitRequest {
    let index: std::collections::HashMap<ChunkHash, u32> = asked.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect();
    let order: Vec<u32> = full.chunks.iter().map(|c| index.get(&c.hash).copied().unwrap_or(u32::MAX)).collect();
    let identity = order.iter().enumerate().all(|(i, &o)| o as usize == i) && order.len() == asked.len();
    CommitRequest {
        chunks: Vec::new(),
        chunks_query: Some(query),
        chunk_order: (!identity).then_some(order),
        chunk_sizes: full.chunks.iter().map(|c| c.size).collect(),
        ..full.clone()
    }
}

/// Paths of fewer chunks are not pushed as changes to an earlier version: their chunk list
/// is short anyway, and looking the earlier version up would cost a round trip per path.
pub(super) const DELTA_MIN_CHUNKS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_by_query_names_chunks_by_their_place_in_the_question() {
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        let full = CommitRequest {
            store_path: "/nix/store/00000000000000000000000000000000-x".into(),
            nar_hash: "sha256:x".into(),
            nar_size: 7,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            chunks: vec![ChunkRef { hash: a, size: 3 }, ChunkRef { hash: b, size: 4 }],
            chunks_query: None,
            chunk_order: None,
            chunk_sizes: Vec::new(),
            chunks_delta: None,
        };
        let short = by_query(&full, &[a, b], "q".into());
        assert!(short.chunks.is_empty());
        assert_eq!(short.chunk_order, None, "the question's own order needs no list");
        assert_eq!(short.chunk_sizes, vec![3, 4]);
        let repeated = CommitRequest { chunks: vec![full.chunks[0], full.chunks[1], full.chunks[0]], ..full.clone() };
        let short = by_query(&repeated, &[a, b], "q".into());
        assert_eq!(short.chunk_order, Some(vec![0, 1, 0]));
        assert_eq!(short.chunk_sizes, vec![3, 4, 3]);
    }
}
