//! One mounted store path: its file index flattened into numbered nodes, with the chunk list.

use std::sync::atomic::AtomicU64;
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
}

impl PathTree {
    /// The store path's hash part, which names it to the server.
    pub fn hash_part(&self) -> &str {
        // Registered names are store path base names, whose first 32 characters are the hash.
        self.base_name.get(..32).unwrap_or(&self.base_name)
    }

    pub fn build(base_name: String, path: &PathManifest) -> Arc<PathTree> {
        let mut nodes = Vec::new();
        push(&mut nodes, &path.manifest.root, 0);
        Arc::new(PathTree {
            base_name,
            nar_hash: path.manifest.nar_hash,
            nodes,
            chunks: path.manifest.chunks.clone(),
            offsets: path.manifest.chunk_offsets(),
            last_read_end: AtomicU64::new(u64::MAX),
            prefetched_to: AtomicU64::new(0),
            walk_bytes: AtomicU64::new(0),
        })
    }

    /// The chunks covering NAR bytes `[start, end)`, and the NAR offset of the first.
    pub fn covering(&self, start: u64, end: u64) -> (&[ChunkRef], u64) {
        let range = Manifest::chunks_covering(&self.offsets, start..end);
        let first = self.offsets.get(range.start).copied().unwrap_or(0);
        (&self.chunks[range], first)
    }
}

fn push(nodes: &mut Vec<TreeNode>, node: &Node, parent: u32) -> u32 {
    let index = nodes.len() as u32;
    let kind = match node {
        Node::Regular { size, executable, nar_offset } => {
            NodeKind::File { size: *size, executable: *executable, nar_offset: *nar_offset }
        }
        Node::Symlink { target } => NodeKind::Symlink { target: target.clone() },
        Node::Directory { .. } => NodeKind::Directory { children: Vec::new() },
    };
    nodes.push(TreeNode { kind, parent });
    if let Node::Directory { entries } = node {
        let mut children = Vec::with_capacity(entries.len());
        for (name, child) in entries {
            children.push((name.clone(), push(nodes, child, index)));
        }
        if let NodeKind::Directory { children: slot } = &mut nodes[index as usize].kind {
            *slot = children;
        }
    }
    index
}
