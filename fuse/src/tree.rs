//! One mounted store path: its file index flattened into numbered nodes, with the chunk list.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::manifest::{ChunkRef, Manifest};
use flywheel_core::nar::Node;

/// What a node is.
#[derive(Debug)]
pub(crate) enum NodeKind {
    /// Children sorted by name, with their node numbers.
    Directory { children: Vec<(String, u32)> },
    /// A regular file's contents are NAR bytes `[nar_offset, nar_offset + size)`.
    File { size: u64, executable: bool, nar_offset: u64 },
    Symlink { target: String },
}

/// A node and its parent (the root of a path is its own parent).
#[derive(Debug)]
pub(crate) struct TreeNode {
    pub kind: NodeKind,
    pub parent: u32,
}

/// A store path as the mount serves it.
#[derive(Debug)]
pub(crate) struct PathTree {
    pub base_name: String,
    /// Names the NAR, and with a file's NAR offset, its materialized copy.
    pub nar_hash: flywheel_core::nix::Sha256Hash,
    pub nodes: Vec<TreeNode>,
    pub chunks: Vec<ChunkRef>,
    /// Start offset of every chunk, plus the NAR size.
    pub offsets: Vec<u64>,
    /// Where the last read of any file of this path ended, as a NAR offset: a read starting
    /// just after it continues a walk through the path in NAR order.
    pub last_read_end: AtomicU64,
    /// How far cross-file readahead has reached, as a NAR offset.
    pub prefetched_to: AtomicU64,
    /// Bytes read by the current walk through the path in NAR order; 0 after a jump.
    pub walk_bytes: AtomicU64,
    /// Per chunk, the trace recording that last noted it (see `crate::trace`): a chunk is
    /// logged once per recording, and checking costs one atomic load.
    pub traced: Box<[AtomicU32]>,
    /// Whether the path's background fill was queued, or a trace's prefetch covers the path
    /// (then the trace, not a fill, decides what to fetch).
    pub fill_claimed: AtomicBool,
    /// Whether an access trace's prefetch covers the path, until the trace's chunks are all
    /// fetched. Its readahead then loads chunks from the local cache only: the trace fetches
    /// what the job will read, and readahead's guesses from the server would take the link
    /// from it.
    pub trace_covered: AtomicBool,
}

impl PathTree {
    /// The store path's hash part, which names it to the server.
    pub fn hash_part(&self) -> &str {
        // Registered names are store path base names, whose first 32 characters are the hash.
        self.base_name.get(..32).unwrap_or(&self.base_name)
    }

    pub fn build(base_name: String, path: &PathManifest) -> Arc<PathTree> {
        let nodes = flatten(&path.manifest.root);
        Arc::new(PathTree {
            base_name,
            nar_hash: path.manifest.nar_hash,
            nodes,
            chunks: path.manifest.chunks.clone(),
            offsets: path.manifest.chunk_offsets(),
            last_read_end: AtomicU64::new(u64::MAX),
            prefetched_to: AtomicU64::new(0),
            walk_bytes: AtomicU64::new(0),
            traced: (0..path.manifest.chunks.len()).map(|_| AtomicU32::new(0)).collect(),
            fill_claimed: AtomicBool::new(false),
            trace_covered: AtomicBool::new(false),
        })
    }

    /// The child `name` of directory node `node`, if there is one.
    pub fn child(&self, node: u32, name: &str) -> Option<u32> {
        let NodeKind::Directory { children } = &self.nodes.get(node as usize)?.kind else { return None };
        children.binary_search_by(|(child, _)| child.as_str().cmp(name)).ok().map(|i| children[i].1)
    }

    /// The chunks covering NAR bytes `[start, end)`, and the NAR offset of the first.
    pub fn covering(&self, start: u64, end: u64) -> (&[ChunkRef], u64) {
        let range = self.chunk_range(start, end);
        let first = self.offsets.get(range.start).copied().unwrap_or(0);
        (&self.chunks[range], first)
    }

    /// Indexes of the chunks covering NAR bytes `[start, end)`.
    pub fn chunk_range(&self, start: u64, end: u64) -> Range<usize> {
        Manifest::chunks_covering(&self.offsets, start..end)
    }

    /// Size of the NAR.
    pub fn nar_size(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }
}

/// Numbers the nodes of a tree in NAR order (the root is 0). Kept free of recursion: trees
/// may be as deep as `flywheel_core::nar::MAX_DEPTH`.
fn flatten(root: &Node) -> Vec<TreeNode> {
    let mut nodes = vec![TreeNode { kind: kind_of(root), parent: 0 }];
    // Open directories: node number, and the entries still to number.
    let mut open = Vec::new();
    if let Node::Directory { entries } = root {
        open.push((0u32, entries.iter()));
    }
    while let Some((index, siblings)) = open.last_mut() {
        let parent = *index;
        let Some((name, child)) = siblings.next() else {
            open.pop();
            continue;
        };
        let child_index = nodes.len() as u32;
        nodes.push(TreeNode { kind: kind_of(child), parent });
        // Entries come sorted, so the children do too.
        if let NodeKind::Directory { children } = &mut nodes[parent as usize].kind {
            children.push((name.clone(), child_index));
        }
        if let Node::Directory { entries } = child {
            open.push((child_index, entries.iter()));
        }
    }
    nodes
}

fn kind_of(node: &Node) -> NodeKind {
    match node {
        Node::Regular { size, executable, nar_offset } => {
            NodeKind::File { size: *size, executable: *executable, nar_offset: *nar_offset }
        }
        Node::Symlink { target } => NodeKind::Symlink { target: target.clone() },
        Node::Directory { .. } => NodeKind::Directory { children: Vec::new() },
    }
}
