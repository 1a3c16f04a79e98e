//! The file index of a NAR: the tree with sizes, executable bits, symlink targets and the offset
//! of each regular file's contents in the NAR.
//!
//! Two JSON forms exist. The nested form (the derived serde impls, and [`Node::write_listing`])
//! is exactly the `root` of Nix's `.ls` listing. The flat form ([`FlatIndex`], [`from_flat`]) is
//! what manifests store: one entry per node in NAR order with its depth, so that reading it back
//! never recurses, however deep the tree (serde_json refuses nesting beyond 128 levels, and
//! recursing that deep risks the stack).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};

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

impl Drop for Node {
    fn drop(&mut self) {
        // The derived drop would recurse once per level: take a deep tree apart level by level
        // instead, so that dropping one never depends on the thread's stack.
        let Node::Directory { entries } = self else { return };
        if entries.is_empty() {
            return;
        }
        let mut pending = vec![std::mem::take(entries)];
        while let Some(map) = pending.pop() {
            for (_, mut child) in map {
                if let Node::Directory { entries } = &mut child {
                    if !entries.is_empty() {
                        pending.push(std::mem::take(entries));
                    }
                }
            }
        }
    }
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

    /// Visits every node, parents before children, siblings in NAR order, without recursion.
    ///
    /// `visit` gets the node's path components below the root (empty for the root; its length
    /// is the node's depth) in a buffer that is reused, so a walk costs memory in proportion
    /// to the depth, not to the sum of all path lengths. An error from `visit` ends the walk.
    pub fn walk<E>(&self, mut visit: impl FnMut(&[&str], &Node) -> Result<(), E>) -> Result<(), E> {
        visit(&[], self)?;
        let mut names: Vec<&str> = Vec::new();
        let mut open = Vec::new();
        if let Node::Directory { entries } = self {
            open.push(entries.iter());
        }
        while let Some(siblings) = open.last_mut() {
            match siblings.next() {
                Some((name, child)) => {
                    names.push(name);
                    visit(&names, child)?;
                    match child {
                        Node::Directory { entries } => open.push(entries.iter()),
                        _ => {
                            names.pop();
                        }
                    }
                }
                None => {
                    open.pop();
                    names.pop();
                }
            }
        }
        Ok(())
    }

    /// Counts the regular files of the tree.
    pub fn file_count(&self) -> usize {
        let mut count = 0;
        let _ = self.walk(|_, node| {
            count += usize::from(matches!(node, Node::Regular { .. }));
            Ok::<(), ()>(())
        });
        count
    }

    /// Depth of the deepest node (0 for a lone file or an empty directory).
    pub fn depth(&self) -> usize {
        let mut depth = 0;
        let _ = self.walk(|names, _| {
            depth = depth.max(names.len());
            Ok::<(), ()>(())
        });
        depth
    }

    /// A rough count of the heap bytes the tree holds, for caches bounded in bytes.
    pub fn approx_heap_bytes(&self) -> usize {
        // A BTreeMap slot (key and node) with the B-tree's slack and the allocation of the name.
        const PER_NODE: usize = 112;
        let mut bytes = 0;
        let _ = self.walk(|names, node| {
            let target = if let Node::Symlink { target } = node { target.len() } else { 0 };
            bytes += PER_NODE + names.last().map_or(0, |n| n.len()) + target;
            Ok::<(), ()>(())
        });
        bytes
    }

    /// Writes the nested JSON form (the `root` of Nix's `.ls` listing; byte for byte what the
    /// derived `Serialize` writes) without recursion.
    pub fn write_listing(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        // Each open directory: its entries still to write, and whether one was written.
        let mut open: Vec<(std::collections::btree_map::Iter<'_, String, Node>, bool)> = Vec::new();
        let mut next = Some(self);
        loop {
            if let Some(node) = next.take() {
                match node {
                    Node::Regular { size, executable, nar_offset } => {
                        write!(out, "{{\"type\":\"regular\",\"size\":{size}")?;
                        if *executable {
                            out.write_all(b",\"executable\":true")?;
                        }
                        write!(out, ",\"narOffset\":{nar_offset}}}")?;
                    }
                    Node::Symlink { target } => {
                        out.write_all(b"{\"type\":\"symlink\",\"target\":")?;
                        write_json_str(out, target)?;
                        out.write_all(b"}")?;
                    }
                    Node::Directory { entries } => {
                        out.write_all(b"{\"type\":\"directory\",\"entries\":{")?;
                        open.push((entries.iter(), false));
                    }
                }
            }
            let Some((siblings, written)) = open.last_mut() else { return Ok(()) };
            match siblings.next() {
                Some((name, child)) => {
                    if *written {
                        out.write_all(b",")?;
                    }
                    *written = true;
                    write_json_str(out, name)?;
                    out.write_all(b":")?;
                    next = Some(child);
                }
                None => {
                    out.write_all(b"}}")?;
                    open.pop();
                }
            }
        }
    }
}

fn write_json_str(out: &mut dyn std::io::Write, s: &str) -> std::io::Result<()> {
    serde_json::to_writer(out, s).map_err(std::io::Error::other)
}

/// Serializes a tree in the flat form manifests store: a sequence of entries in NAR order
/// (parents before children), each a JSON array `[depth, name, kind, ...]`:
/// `[d, name, "d"]` a directory, `[d, name, "r", size, narOffset]` a regular file (`"x"` when
/// executable), `[d, name, "l", target]` a symlink. The root has depth 0 and the name `""`.
pub struct FlatIndex<'a>(pub &'a Node);

impl Serialize for FlatIndex<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        self.0.walk(|names, node| seq.serialize_element(&FlatEntry { depth: names.len(), name: names.last().copied().unwrap_or(""), node }))?;
        seq.end()
    }
}

struct FlatEntry<'a> {
    depth: usize,
    name: &'a str,
    node: &'a Node,
}

impl Serialize for FlatEntry<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = match self.node {
            Node::Directory { .. } => 3,
            Node::Regular { .. } => 5,
            Node::Symlink { .. } => 4,
        };
        let mut tuple = serializer.serialize_tuple(len)?;
        tuple.serialize_element(&self.depth)?;
        tuple.serialize_element(self.name)?;
        match self.node {
            Node::Directory { .. } => tuple.serialize_element("d")?,
            Node::Regular { size, executable, nar_offset } => {
                tuple.serialize_element(if *executable { "x" } else { "r" })?;
                tuple.serialize_element(size)?;
                tuple.serialize_element(nar_offset)?;
            }
            Node::Symlink { target } => {
                tuple.serialize_element("l")?;
                tuple.serialize_element(target)?;
            }
        }
        tuple.end()
    }
}

/// Reads a tree in the flat form of [`FlatIndex`], checking it as the NAR reader checks a NAR:
/// names valid, unique and sorted, no entry below a non-directory, depth at most
/// [`MAX_DEPTH`].
pub fn from_flat<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
    deserializer.deserialize_seq(FlatVisitor)
}

struct FlatVisitor;

/// A directory being rebuilt: its name in its parent, and its entries so far, in order.
struct OpenDir {
    name: String,
    entries: Vec<(String, Node)>,
}

impl<'de> Visitor<'de> for FlatVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a flat file index")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let Some(first) = seq.next_element::<ParsedEntry>()? else {
            return Err(de::Error::custom("empty file index"));
        };
        if first.depth != 0 || !first.name.is_empty() {
            return Err(de::Error::custom("the file index does not start with its root"));
        }
        let mut open = match first.node {
            Some(leaf) => {
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("file index has entries below a non-directory root"));
                }
                return Ok(leaf);
            }
            None => vec![OpenDir { name: String::new(), entries: Vec::new() }],
        };
        while let Some(entry) = seq.next_element::<ParsedEntry>()? {
            if entry.depth == 0 || entry.depth > open.len() {
                return Err(de::Error::custom(format!(
                    "file index entry {:?} at depth {} has no parent directory",
                    entry.name, entry.depth
                )));
            }
            if entry.depth > MAX_DEPTH {
                return Err(de::Error::custom(format!("file index nests deeper than {MAX_DEPTH}")));
            }
            while open.len() > entry.depth {
                close(&mut open).map_err(de::Error::custom)?;
            }
            check_name(entry.name.as_bytes()).map_err(de::Error::custom)?;
            match entry.node {
                Some(leaf) => insert(&mut open, entry.name, leaf).map_err(de::Error::custom)?,
                None => {
                    check_order(&open, &entry.name).map_err(de::Error::custom)?;
                    open.push(OpenDir { name: entry.name, entries: Vec::new() });
                }
            }
        }
        while open.len() > 1 {
            close(&mut open).map_err(de::Error::custom)?;
        }
        let root = open.pop().map(|dir| dir.entries).unwrap_or_default();
        Ok(Node::Directory { entries: BTreeMap::from_iter(root) })
    }
}

/// Ends the innermost open directory, adding it to its parent.
fn close(open: &mut Vec<OpenDir>) -> Result<(), String> {
    let Some(dir) = open.pop() else { return Ok(()) };
    // Built from sorted entries, the map's nodes are full: about half the memory per entry of
    // inserting one by one.
    insert(open, dir.name, Node::Directory { entries: BTreeMap::from_iter(dir.entries) })
}

fn check_order(open: &[OpenDir], name: &str) -> Result<(), String> {
    let parent = open.last().ok_or("file index entry without a parent")?;
    match parent.entries.last() {
        Some((last, _)) if last.as_str() >= name => {
            Err(format!("file index entry {name:?} is not sorted after {last:?} (or repeats it)"))
        }
        _ => Ok(()),
    }
}

fn insert(open: &mut [OpenDir], name: String, node: Node) -> Result<(), String> {
    check_order(open, &name)?;
    if let Some(parent) = open.last_mut() {
        parent.entries.push((name, node));
    }
    Ok(())
}

/// Checks a file name as Nix does when it restores a NAR, plus our length limit.
pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    let bad = name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0);
    if bad {
        return Err(format!("invalid file name {:?}", String::from_utf8_lossy(name)));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("file name of {} bytes, over the limit of {MAX_NAME_LEN}", name.len()));
    }
    Ok(())
}

/// Checks a symlink target as the NAR reader does.
pub(crate) fn check_target(target: &[u8]) -> Result<(), String> {
    if target.is_empty() || target.contains(&0) || target.len() > MAX_TARGET_LEN {
        return Err("invalid symlink target".to_string());
    }
    Ok(())
}

/// One entry of the flat form as read: `node` is `None` for a directory, whose entries follow.
struct ParsedEntry {
    depth: usize,
    name: String,
    node: Option<Node>,
}

impl<'de> Deserialize<'de> for ParsedEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(EntryVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = ParsedEntry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a file index entry [depth, name, kind, ...]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParsedEntry, A::Error> {
        fn next<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(seq: &mut A, what: &str) -> Result<T, A::Error> {
            seq.next_element()?.ok_or_else(|| de::Error::custom(format!("file index entry lacks its {what}")))
        }
        let depth: usize = next(&mut seq, "depth")?;
        let name: String = next(&mut seq, "name")?;
        let kind: String = next(&mut seq, "kind")?;
        let node = match kind.as_str() {
            "d" => None,
            "r" | "x" => Some(Node::Regular {
                size: next(&mut seq, "size")?,
                executable: kind == "x",
                nar_offset: next(&mut seq, "NAR offset")?,
            }),
            "l" => {
                let target: String = next(&mut seq, "target")?;
                check_target(target.as_bytes()).map_err(de::Error::custom)?;
                Some(Node::Symlink { target })
            }
            other => return Err(de::Error::custom(format!("unknown file index entry kind {other:?}"))),
        };
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("file index entry is too long"));
        }
        Ok(ParsedEntry { depth, name, node })
    }
}
