//! Reading ahead of readers: along a file, along a NAR walked file by file, and the whole-path
//! background fill.

use super::*;

impl Inner {
    /// Queues the whole path for the background fill the first time a job reads from it,
    /// unless a trace covers it or it is larger than the fill's limit.
    pub(super) fn start_fill(&self, tree: &Arc<PathTree>) {
        if tree.fill_claimed.load(Ordering::Relaxed) || tree.fill_claimed.swap(true, Ordering::Relaxed) {
            return;
        }
        let limit = self.config.fill_max_nar_size;
        if limit == 0 || tree.nar_size() > limit {
            return;
        }
        debug!(store_path = %tree.base_name, chunks = tree.chunks.len(), "background fill queued");
        match self.config.fill_order {
            FillOrder::Nar => self.background.queue(tree, &tree.chunks, Source::Fill),
            FillOrder::SmallFilesFirst => self.background.queue(tree, &small_files_first(tree), Source::Fill),
        }
    }

    /// Queues the chunks `trace` names for the background, in trace order, path by path:
    /// each path is looked up (registering it), and chunks its manifest does not list (the
    /// path changed, or the trace is stale) are left out. Paths the cache no longer has are
    /// skipped. Returns (paths, chunks queued, paths skipped).
    pub(crate) async fn prefetch_trace(self: &Arc<Self>, trace: &flywheel_core::api::v1::traces::Trace) -> (usize, usize, usize) {
        // Per path the trace names: its tree and the chunks its manifest lists, or `None` when
        // the mount cannot open it.
        type Listed = Option<(Arc<PathTree>, std::collections::HashSet<ChunkRef>)>;
        let mut trees: HashMap<&str, Listed> = HashMap::new();
        let (mut queued, mut skipped) = (0, 0);
        for (base_name, chunks) in trace.runs() {
            if !trees.contains_key(base_name) {
                let resolved = match self.resolve(base_name).await {
                    Ok((_, tree)) => {
                        // The trace decides what of this path is fetched, not a whole-path fill.
                        tree.fill_claimed.store(true, Ordering::Relaxed);
                        tree.trace_covered.store(true, Ordering::Relaxed);
                        let listed = tree.chunks.iter().copied().collect();
                        Some((tree, listed))
                    }
                    Err(err) => {
                        debug!(store_path = %base_name, "trace names a path the mount cannot open: {err}");
                        skipped += 1;
                        None
                    }
                };
                trees.insert(base_name, resolved);
            }
            let Some(Some((tree, listed))) = trees.get(base_name) else { continue };
            let wanted: Vec<ChunkRef> = chunks.into_iter().filter(|c| listed.contains(c)).collect();
            queued += wanted.len();
            self.background.queue(tree, &wanted, Source::Trace);
        }
        // Once the trace's chunks are all fetched, readahead may ask the server again: a later
        // job on this mount, with another trace or none, may read what this trace did not name.
        let covered: Vec<Arc<PathTree>> = trees.values().flatten().map(|(tree, _)| tree.clone()).collect();
        let inner = self.clone();
        self.runtime.spawn(async move {
            inner.background.trace_drained().await;
            for tree in covered {
                tree.trace_covered.store(false, Ordering::Relaxed);
            }
        });
        (trees.len(), queued, skipped)
    }

    /// Readahead across files: a file whose first read starts right after where the last read
    /// of this path ended (the next file in NAR order, as a `cp -r`, `tar` or a build reading
    /// a tree goes) loads the following chunks of the NAR in the background, whatever files
    /// they hold. The window is at most the bytes this walk has read so far, so a walk that
    /// stops has fetched at most twice what it read; a jump ends the walk.
    pub(super) fn path_readahead(self: &Arc<Self>, tree: &Arc<PathTree>, file_start: bool, start: u64, end: u64) {
        let last = tree.last_read_end.swap(end, Ordering::Relaxed);
        let continues = last != u64::MAX && start >= last && start - last <= NAR_GAP;
        if !continues {
            tree.walk_bytes.store(end - start, Ordering::Relaxed);
            return;
        }
        let walked = tree.walk_bytes.fetch_add(end - start, Ordering::Relaxed) + (end - start);
        // Within a file, the per-file readahead does the work.
        if !file_start || walked < PATH_READAHEAD_MIN {
            return;
        }
        let nar_size = tree.offsets.last().copied().unwrap_or(0);
        self.prefetch(tree, &tree.prefetched_to, end, walked.min(PATH_READAHEAD_MAX), nar_size, "path");
    }

    /// Loads, in the background, the chunks of the next [`READAHEAD`] bytes of a file that is
    /// read sequentially, from the local cache or the server, into the hot chunks.
    pub(super) fn readahead(self: &Arc<Self>, tree: &Arc<PathTree>, open: &OpenFile, from: u64, file_end: u64) {
        self.prefetch(tree, &open.prefetched_to, from, READAHEAD, file_end, "file");
    }

    /// Loads the chunks of NAR bytes up to `window` past `from` (never past `end`) into the
    /// hot chunks in the background, unless `reached` (how far this readahead got, updated
    /// here) is still more than half a window ahead.
    pub(super) fn prefetch(self: &Arc<Self>, tree: &Arc<PathTree>, reached: &AtomicU64, from: u64, window: u64, end: u64, kind: &'static str) {
        let start = reached.load(Ordering::Relaxed).max(from);
        if start >= end || start > from + window / 2 {
            return;
        }
        let to = (from + window).min(end);
        reached.store(to, Ordering::Relaxed);
        let (chunks, _) = tree.covering(start, to);
        let wanted: Vec<ChunkRef> = {
            let mut hot = self.hot.lock();
            // Chunks in the local cache count too: loading them into memory ahead of the reader
            // (decompressed and verified, in parallel) is what makes warm reads fast.
            chunks.iter().filter(|c| hot.get(&c.hash).is_none()).copied().collect()
        };
        if wanted.is_empty() {
            return;
        }
        let (inner, tree) = (self.clone(), tree.clone());
        let span = debug_span!("readahead", kind, store_path = %tree.base_name, chunks = wanted.len());
        self.runtime.spawn(async move { inner.read_ahead(&tree, &wanted).await }.instrument(span));
    }

    /// Loads `wanted` into the hot chunks: from the local cache or the server, or from the
    /// local cache alone when a trace's prefetch covers the path.
    pub(super) async fn read_ahead(&self, tree: &PathTree, wanted: &[ChunkRef]) {
        if tree.trace_covered.load(Ordering::Relaxed) {
            self.load_cached(wanted).await;
        } else if let Err(err) = self.chunks(tree, wanted).await {
            tracing::debug!("readahead failed: {err}");
        }
    }
}

/// The chunks of `tree`: those of its files from the smallest file up, then any left (between
/// files, or of no file), each once.
pub(super) fn small_files_first(tree: &PathTree) -> Vec<ChunkRef> {
    let mut files: Vec<(u64, u64)> = tree
        .nodes
        .iter()
        .filter_map(|node| match node.kind {
            NodeKind::File { size, nar_offset, .. } if size > 0 => Some((size, nar_offset)),
            _ => None,
        })
        .collect();
    files.sort_unstable();
    let mut taken = vec![false; tree.chunks.len()];
    let mut order = Vec::with_capacity(tree.chunks.len());
    let ranges = files.into_iter().map(|(size, offset)| tree.chunk_range(offset, offset + size)).chain(std::iter::once(0..tree.chunks.len()));
    for range in ranges {
        for index in range {
            if !std::mem::replace(&mut taken[index], true) {
                order.push(tree.chunks[index]);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeNode;

    #[test]
    fn small_files_first_orders_chunks_by_file_size() {
        let file = |size, nar_offset| TreeNode { kind: NodeKind::File { size, executable: false, nar_offset }, parent: 0 };
        let chunks: Vec<ChunkRef> = (0..5u8).map(|i| ChunkRef { hash: ChunkHash::of(&[i]), size: 64 }).collect();
        let tree = PathTree {
            base_name: "x".into(),
            nar_hash: flywheel_core::nix::Sha256Hash([0; 32]),
            // A big file over chunks 0 and 1, a small one in chunk 2, a middling one in chunk 3;
            // chunk 4 holds no file's bytes.
            nodes: vec![
                TreeNode { kind: NodeKind::Directory { children: Vec::new() }, parent: 0 },
                file(120, 0),
                file(10, 140),
                file(50, 200),
            ],
            offsets: (0..=5u64).map(|i| i * 64).collect(),
            traced: (0..5).map(|_| Default::default()).collect(),
            chunks: chunks.clone(),
            last_read_end: Default::default(),
            prefetched_to: Default::default(),
            walk_bytes: Default::default(),
            fill_claimed: Default::default(),
            trace_covered: Default::default(),
        };
        let order = super::small_files_first(&tree);
        assert_eq!(order, vec![chunks[2], chunks[3], chunks[0], chunks[1], chunks[4]]);
    }
}
