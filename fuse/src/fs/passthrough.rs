//! Files served whole are written to disk and reopened through FUSE passthrough, so the kernel
//! reads them without the mount; the kernel allows one kind of open per inode at a time.

use super::*;

/// The byte ranges a handle was served, merged; gives up on a reader that jumps around a lot.
#[derive(Default)]
pub(super) struct ServedRanges {
    pub(super) ranges: Vec<(u64, u64)>,
    pub(super) given_up: bool,
}

impl ServedRanges {
    /// Records `[start, end)`; true when, with it, `[0, size)` has been served whole.
    pub(super) fn add(&mut self, start: u64, end: u64, size: u64) -> bool {
        if self.given_up {
            return false;
        }
        let at = self.ranges.partition_point(|&(s, _)| s < start);
        self.ranges.insert(at, (start, end));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
        if self.ranges.len() > 64 {
            self.given_up = true;
            self.ranges.clear();
            return false;
        }
        self.covers(size)
    }

    /// Whether `[0, size)` has been served whole.
    pub(super) fn covers(&self, size: u64) -> bool {
        self.ranges.first().is_some_and(|&(s, e)| s == 0 && e >= size)
    }
}

/// The kernel refuses to have an inode open through the page cache and through passthrough at
/// once (the second kind of open fails), so the mount tracks both kinds per inode.
pub(super) struct IoModes {
    /// The backing file of each inode in passthrough mode, and its open handles: the kernel
    /// wants one backing id per inode for as long as any handle is open. Ids outlive their
    /// handles (up to [`BACKING_KEPT`] unused ones), so reopening a hot file costs no file
    /// open and no ioctl.
    pub(super) backing: lru::LruCache<INodeNo, (Arc<fuser::BackingId>, usize)>,
    /// Handles open through the page cache, per inode.
    pub(super) cached: HashMap<INodeNo, usize>,
}

impl IoModes {
    /// When handles of the inode are open, a new one joins their mode: `Some(Some(id))` for
    /// passthrough, `Some(None)` for the page cache (counted here); `None` when none is open.
    pub(super) fn join_open(&mut self, ino: INodeNo) -> Option<Option<Arc<fuser::BackingId>>> {
        if let Some((id, handles)) = self.backing.get_mut(&ino) {
            if *handles > 0 {
                *handles += 1;
                return Some(Some(id.clone()));
            }
        }
        let cached = self.cached.get_mut(&ino)?;
        *cached += 1;
        Some(None)
    }

    /// A kept backing id of the inode, now held by one more handle.
    pub(super) fn reuse_backing(&mut self, ino: INodeNo) -> Option<Arc<fuser::BackingId>> {
        let (id, handles) = self.backing.get_mut(&ino)?;
        *handles += 1;
        Some(id.clone())
    }
}

/// How an open handle reads its file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum IoMode {
    Cached,
    Passthrough,
}

/// Backing ids kept open for files no handle holds.
pub(super) const BACKING_KEPT: usize = 256;

/// Materializations running at once; more files read to the end meanwhile are skipped (and
/// materialized on a later full read).
pub(super) const MATERIALIZING_MAX: usize = 2;

impl Inner {
    /// Writes a file that was just served whole to the materialized files, in the background,
    /// from its (now local) chunks, so that later opens use passthrough.
    pub(super) fn materialize(self: &Arc<Self>, tree: &Arc<PathTree>, nar_offset: u64, size: u64) {
        let Some(files) = &self.files else { return };
        if !self.passthrough.load(Ordering::Relaxed) {
            return;
        }
        let key = files::key(&tree.nar_hash, nar_offset);
        if !files.claim(&key, size) {
            return;
        }
        if self.materializing.fetch_add(1, Ordering::Relaxed) >= MATERIALIZING_MAX {
            self.materializing.fetch_sub(1, Ordering::Relaxed);
            files.release_claim(&key);
            return;
        }
        let (inner, tree) = (self.clone(), tree.clone());
        self.runtime.spawn_blocking(move || {
            let span = debug_span!("materialize", store_path = %tree.base_name, nar_offset, size);
            let _entered = span.enter();
            if let Err(err) = inner.write_materialized(&tree, &key, nar_offset, size) {
                debug!("materializing failed: {err}");
            }
            inner.materializing.fetch_sub(1, Ordering::Relaxed);
        });
    }

    pub(super) fn write_materialized(&self, tree: &PathTree, key: &str, nar_offset: u64, size: u64) -> Result<()> {
        let Some(files) = &self.files else { return Ok(()) };
        let io = |e: std::io::Error| Error::unavailable(format!("writing a materialized file: {e}"));
        let mut writer = files.writer(key).map_err(io)?;
        let (mut at, end) = (nar_offset, nar_offset + size);
        while at < end {
            let to = (at + READAHEAD).min(end);
            let (covering, first) = tree.covering(at, to);
            let chunks = self.runtime.block_on(self.chunks(tree, covering))?;
            writer.write(&Inner::assemble(&chunks, first, at, to)).map_err(io)?;
            at = to;
        }
        writer.finish().map_err(io)?;
        self.stats.materialized_files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Opens a handle of a regular file: through passthrough when the file is materialized
    /// (or other handles of it already are), through the page cache otherwise; returns the
    /// backing id for passthrough.
    pub(super) fn open_io(&self, ino_: INodeNo, tree: &PathTree, nar_offset: u64, size: u64, reply: &ReplyOpen) -> Option<Arc<fuser::BackingId>> {
        {
            let mut io = self.io.lock();
            if let Some(settled) = io.join_open(ino_) {
                return settled;
            }
            let passthrough = self.passthrough.load(Ordering::Relaxed) && size >= files::MIN_FILE_SIZE;
            if !passthrough || self.files.is_none() {
                *io.cached.entry(ino_).or_default() += 1;
                return None;
            }
            if let Some(id) = io.reuse_backing(ino_) {
                return Some(id);
            }
        }
        // Checking the copy hashes it (once per process): not under the lock.
        let file = self.files.as_ref().and_then(|files| files.get(&files::key(&tree.nar_hash, nar_offset), size));
        let mut io = self.io.lock();
        // Other opens may have decided meanwhile; the two modes never mix.
        if let Some(settled) = io.join_open(ino_) {
            return settled;
        }
        if let Some(id) = io.reuse_backing(ino_) {
            return Some(id);
        }
        let opened = match &file {
            Some(file) => match reply.open_backing(file) {
                Ok(id) => Some(Arc::new(id)),
                Err(err) => {
                    warn!("the kernel refused a backing file, passthrough is off: {err}");
                    self.passthrough.store(false, Ordering::Relaxed);
                    None
                }
            },
            _ => None,
        };
        let Some(id) = opened else {
            *io.cached.entry(ino_).or_default() += 1;
            return None;
        };
        io.backing.put(ino_, (id.clone(), 1));
        // Close the least recently used ids no handle holds (dropping one closes it).
        while io.backing.len() > BACKING_KEPT {
            let idle = io.backing.iter().rev().find(|(_, (_, handles))| *handles == 0).map(|(ino, _)| *ino);
            match idle {
                Some(ino) => {
                    io.backing.pop(&ino);
                }
                None => break,
            }
        }
        Some(id)
    }

    /// Forgets a handle opened by [`Inner::open_io`].
    pub(super) fn release_io(&self, ino_: INodeNo, mode: IoMode) {
        let mut io = self.io.lock();
        match mode {
            // The id stays for the next open; `open_io` closes idle ones past the limit.
            IoMode::Passthrough => {
                if let Some((_, handles)) = io.backing.peek_mut(&ino_) {
                    *handles = handles.saturating_sub(1);
                }
            }
            IoMode::Cached => {
                if let Some(handles) = io.cached.get_mut(&ino_) {
                    *handles = handles.saturating_sub(1);
                    if *handles == 0 {
                        io.cached.remove(&ino_);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_ranges_know_when_a_file_was_read_whole() {
        let mut served = ServedRanges::default();
        assert!(!served.add(4096, 8192, 10_000));
        assert!(!served.add(4096, 8192, 10_000), "a range read twice does not count twice");
        assert!(!served.add(8192, 10_000, 10_000));
        assert!(served.add(0, 4096, 10_000), "the last gap closed");
        let mut jumpy = ServedRanges::default();
        for i in 0..100u64 {
            jumpy.add(i * 200, i * 200 + 100, 1 << 20);
        }
        assert!(jumpy.given_up);
        assert!(!jumpy.add(0, 1 << 20, 1 << 20), "a reader that jumps around is not tracked");
    }
}
