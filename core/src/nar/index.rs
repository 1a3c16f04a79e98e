//! The file index of a NAR: the tree with sizes, executable bits, symlink targets and the offset
//! of each regular file's contents in the NAR. Serialized exactly like the `root` of Nix's `.ls`
//! listing, so it can be served as one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One node of a store path's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Node {
    /// A regular file.
    Regular {
        /// Length of the contents in bytes.
        size: u64,
        /// Whether the file is executable.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        executable: bool,
        /// Offset of the first content byte in the uncompressed NAR.
        #[serde(rename = "narOffset")]
        nar_offset: u64,
    },
    /// A directory; entries are kept in NAR (byte) order.
    Directory {
        /// The entries by name.
        entries: BTreeMap<String, Node>,
    },
    /// A symbolic link.
    Symlink {
        /// The link target, as stored.
        target: String,
    },
}

/// A node together with its path below the root, as yielded by [`Node::walk`].
#[derive(Debug)]
pub struct Entry<'a> {
    /// Path relative to the root, `""` for the root itself, components joined by `/`.
    pub path: String,
    /// The node.
    pub node: &'a Node,
}

impl Node {
    /// Finds the node at a relative path (`""` or components joined by `/`).
    pub fn lookup(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for component in path.split('/').filter(|c| !c.is_empty()) {
            match node {
                Node::Directory { entries } => node = entries.get(component)?,
                _ => return None,
            }
        }
        Some(node)
    }

    /// Every node of the tree, parents before children, siblings in NAR order.
    pub fn walk(&self) -> Vec<Entry<'_>> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), self)];
        while let Some((path, node)) = stack.pop() {
            if let Node::Directory { entries } = node {
                for (name, child) in entries.iter().rev() {
                    let child_path =
                        if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
                    stack.push((child_path, child));
                }
            }
            out.push(Entry { path, node });
        }
        out
    }

    /// Counts the regular files of the tree.
    pub fn file_count(&self) -> usize {
        self.walk().iter().filter(|e| matches!(e.node, Node::Regular { .. })).count()
    }
}
