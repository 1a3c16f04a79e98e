//! The FUSE operations.

use super::*;
use crate::errno::FsError;

/// Reads covering at most this many chunks look the local cache up on the FUSE thread.
const LOOKUP_HERE_MAX_CHUNKS: usize = 2;

impl Filesystem for FlywheelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // A listing of the root then checks the root's attributes (and so its modification
        // time) first. Files never change, so for them it costs nothing.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA);
        if self.inner.files.is_some() {
            // Depth 1: the backing files sit on a plain filesystem, and an overlayfs may still
            // use this mount as its lower layer (lazy mode).
            let accepted = config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !accepted {
                warn!("the kernel does not offer FUSE passthrough; files are always served through chunks");
            }
            self.inner.passthrough.store(accepted, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.inner.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let Some(name) = name.to_str() else { return reply.error(FsError::NotFound.errno()) };
        if parent == INodeNo::ROOT {
            if StorePath::from_base_name(name).is_err() {
                return reply.entry(&NEGATIVE_TTL, &negative_entry(), Generation(0));
            }
            let inner = self.inner.clone();
            let name = name.to_string();
            let span = info_span!("lookup", store_path = %name);
            self.inner.runtime.spawn(async move {
                match inner.resolve(&name).await {
                    Ok((index, tree)) => reply.entry(&TTL, &attr(ino(index, 0), &tree.nodes[0].kind), Generation(0)),
                    Err(err) if err.kind() == ErrorKind::NotFound || err.kind() == ErrorKind::InvalidInput => {
                        reply.entry(&NEGATIVE_TTL, &negative_entry(), Generation(0))
                    }
                    Err(err) => {
                        warn!("lookup of {name} failed: {err}");
                        reply.error(FsError::from(&err).errno())
                    }
                }
            }.instrument(span));
            return;
        }
        let Some((tree, path, node)) = self.inner.node(parent) else { return reply.error(FsError::NotFound.errno()) };
        if !matches!(tree.nodes[node as usize].kind, NodeKind::Directory { .. }) {
            return reply.error(FsError::NotADirectory.errno());
        }
        match tree.child(node, name) {
            Some(child) => reply.entry(&TTL, &attr(ino(path, child), &tree.nodes[child as usize].kind), Generation(0)),
            None => reply.entry(&TTL, &negative_entry(), Generation(0)),
        }
    }

    fn getattr(&self, _req: &Request, ino_: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.stats.getattrs.fetch_add(1, Ordering::Relaxed);
        if ino_ == INodeNo::ROOT {
            return reply.attr(&ROOT_TTL, &root_attr(self.inner.paths.read().len()));
        }
        match self.inner.node(ino_) {
            Some((tree, _, node)) => reply.attr(&TTL, &attr(ino_, &tree.nodes[node as usize].kind)),
            None => reply.error(FsError::NotFound.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino_: INodeNo, reply: ReplyData) {
        match self.inner.node(ino_) {
            Some((tree, _, node)) => match &tree.nodes[node as usize].kind {
                NodeKind::Symlink { target } => reply.data(target.as_bytes()),
                _ => reply.error(FsError::NotASymlink.errno()),
            },
            None => reply.error(FsError::NotFound.errno()),
        }
    }

    fn open(&self, _req: &Request, ino_: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.inner.stats.opens.fetch_add(1, Ordering::Relaxed);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(FsError::ReadOnly.errno());
        }
        let Some((tree, _, node)) = self.inner.node(ino_) else { return reply.error(FsError::NotFound.errno()) };
        let NodeKind::File { size, nar_offset, .. } = tree.nodes[node as usize].kind else {
            return reply.error(FsError::IsADirectory.errno());
        };
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = self.inner.open_io(ino_, &tree, nar_offset, size, &reply) {
            // The kernel reads this file without the mount: count it read whole, for the trace.
            self.inner.recorder.note(&tree, tree.chunk_range(nar_offset, nar_offset + size));
            self.inner.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            let open = OpenFile { mode: IoMode::Passthrough, ..OpenFile::new(ino_) };
            self.inner.open_files.lock().insert(fh, Arc::new(open));
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        }
        self.inner.open_files.lock().insert(fh, Arc::new(OpenFile::new(ino_)));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        if let Some(open) = self.inner.open_files.lock().remove(&fh.0) {
            self.inner.release_io(open.ino, open.mode);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino_: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((tree, _, node)) = self.inner.node(ino_) else { return reply.error(FsError::NotFound.errno()) };
        let NodeKind::File { size: file_size, nar_offset, .. } = tree.nodes[node as usize].kind else {
            return reply.error(FsError::IsADirectory.errno());
        };
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        if offset >= end {
            return reply.data(&[]);
        }
        let (start_nar, end_nar) = (nar_offset + offset, nar_offset + end);
        self.inner.recorder.note(&tree, tree.chunk_range(start_nar, end_nar));
        self.inner.start_fill(&tree);
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.read_bytes.fetch_add(end - offset, Ordering::Relaxed);
        if let Some(open) = self.inner.open_files.lock().get(&fh.0).cloned() {
            // Sequential: this read starts where the last one ended.
            if open.last_end.swap(end, Ordering::Relaxed) == offset && offset > 0 {
                self.inner.readahead(&tree, &open, end_nar, nar_offset + file_size);
            }
            // A handle that has been served every byte of the file read it whole.
            let materializable = self.inner.files.is_some() && file_size >= files::MIN_FILE_SIZE;
            let whole = materializable && {
                let mut served = open.served.lock();
                !served.covers(file_size) && served.add(offset, end, file_size)
            };
            if whole {
                self.inner.materialize(&tree, nar_offset, file_size);
            }
        }
        self.inner.path_readahead(&tree, offset == 0, start_nar, end_nar);
        let (covering, first_offset) = tree.covering(start_nar, end_nar);
        // A small read (a file of a few chunks: what a job's misses mostly are) is looked up in
        // memory and the local cache on this thread; only what must come from the server waits
        // on the runtime. A larger one is read from the cache on the blocking pool, its chunks
        // decompressed in parallel.
        let found = if covering.len() <= LOOKUP_HERE_MAX_CHUNKS {
            self.inner.lookup_here(covering)
        } else {
            self.inner.hot_lookup(covering).0
        };
        if found.iter().all(Option::is_some) {
            let chunks: Vec<Arc<[u8]>> = found.into_iter().flatten().collect();
            return reply.data(&Inner::assemble(&chunks, first_offset, start_nar, end_nar));
        }
        let small = covering.len() <= LOOKUP_HERE_MAX_CHUNKS;
        let covering = covering.to_vec();
        let inner = self.inner.clone();
        let span = debug_span!("read", store_path = %tree.base_name, rq.inode = ino_.0, offset, size);
        self.inner.runtime.spawn(async move {
            let chunks = if small { inner.fetch_rest(&tree, &covering, found).await } else { inner.chunks(&tree, &covering).await };
            match chunks {
                Ok(chunks) => reply.data(&Inner::assemble(&chunks, first_offset, start_nar, end_nar)),
                Err(err) => {
                    warn!(store_path = %tree.base_name, "read failed: {err}");
                    reply.error(FsError::from(&err).errno())
                }
            }
        }.instrument(span));
    }

    /// Directories need no per-open state. Answering ENOSYS once makes the kernel stop sending
    /// OPENDIR and RELEASEDIR altogether (two round trips per directory of a `find`) and cache
    /// every listing (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR is its default then); the root's
    /// cached listing is dropped when a path is registered (see `Inner::root_changed`).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.inner.stats.opendirs.fetch_add(1, Ordering::Relaxed);
        reply.error(FsError::Unsupported.errno());
    }

    fn readdir(&self, _req: &Request, ino_: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.inner.stats.readdirs.fetch_add(1, Ordering::Relaxed);
        let mut entries: Vec<(INodeNo, FileType, String)> = Vec::new();
        if ino_ == INodeNo::ROOT {
            self.inner.register_cached();
            entries.push((INodeNo::ROOT, FileType::Directory, ".".into()));
            entries.push((INodeNo::ROOT, FileType::Directory, "..".into()));
            let paths = self.inner.paths.read();
            let mut listed: Vec<(INodeNo, FileType, String)> = paths
                .iter()
                .enumerate()
                .map(|(i, tree)| (ino(i, 0), file_type(&tree.nodes[0].kind), tree.base_name.clone()))
                .collect();
            listed.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(listed);
        } else {
            let Some((tree, path, node)) = self.inner.node(ino_) else { return reply.error(FsError::NotFound.errno()) };
            let NodeKind::Directory { children } = &tree.nodes[node as usize].kind else {
                return reply.error(FsError::NotADirectory.errno());
            };
            let parent = tree.nodes[node as usize].parent;
            let parent_ino = if node == 0 { INodeNo::ROOT } else { ino(path, parent) };
            entries.push((ino_, FileType::Directory, ".".into()));
            entries.push((parent_ino, FileType::Directory, "..".into()));
            for (name, child) in children {
                entries.push((ino(path, *child), file_type(&tree.nodes[*child as usize].kind), name.clone()));
            }
        }
        for (i, (entry_ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(entry_ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Answered from counters only: `df` on a runner must not wait for the network.
        let cache = self.inner.store.cache();
        let block = 4096u64;
        let blocks = cache.quota() / block;
        let free = cache.quota().saturating_sub(cache.used_bytes()) / block;
        let files = self.inner.paths.read().iter().map(|t| t.nodes.len() as u64).sum::<u64>();
        reply.statfs(blocks, free, free, files, 0, block as u32, 255, block as u32);
    }
}

pub(super) fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Directory { .. } => FileType::Directory,
        NodeKind::File { .. } => FileType::RegularFile,
        NodeKind::Symlink { .. } => FileType::Symlink,
    }
}
