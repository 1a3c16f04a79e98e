//! NAR reader, writer and file index.

use std::collections::BTreeMap;
use std::io::Read;

use flywheel_core::nar::{self, NarWriter, Node, MAX_DEPTH};
use flywheel_core::ErrorKind;
use proptest::prelude::*;

use crate::{config, largest_allocation};

/// A tree to archive.
#[derive(Debug, Clone)]
enum Tree {
    File { executable: bool, contents: Vec<u8> },
    Link(String),
    Dir(BTreeMap<String, Tree>),
}

fn name() -> impl Strategy<Value = String> {
    // Any UTF-8 but '/' and NUL, a few bytes long; "." and ".." are not names.
    "[^/\u{0}]{1,12}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(executable, contents)| Tree::File { executable, contents }),
        "[^\u{0}]{1,40}".prop_map(Tree::Link),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        proptest::collection::btree_map(name(), inner, 0..6).prop_map(Tree::Dir)
    })
}

/// Writes `tree` with the project's writer and returns the index a reader must build for it.
fn write(tree: &Tree, w: &mut NarWriter<Vec<u8>>) -> Node {
    match tree {
        Tree::File { executable, contents } => {
            // "(", "type", "regular" (16 bytes each), ["executable" (24), "" (8)], "contents" (16),
            // then the length.
            let nar_offset = w.written() + 3 * 16 + if *executable { 24 + 8 } else { 0 } + 16 + 8;
            w.regular(*executable, contents.len() as u64, &mut &contents[..]).unwrap();
            Node::Regular { size: contents.len() as u64, executable: *executable, nar_offset }
        }
        Tree::Link(target) => {
            w.symlink(target.as_bytes()).unwrap();
            Node::Symlink { target: target.clone() }
        }
        Tree::Dir(entries) => {
            w.start_directory().unwrap();
            let mut index = BTreeMap::new();
            for (name, child) in entries {
                w.entry(name.as_bytes()).unwrap();
                index.insert(name.clone(), write(child, w));
                w.end_entry().unwrap();
            }
            w.end_directory().unwrap();
            Node::Directory { entries: index }
        }
    }
}

fn nar_of(tree: &Tree) -> (Vec<u8>, Node) {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    let index = write(tree, &mut w);
    let written = w.written();
    let nar = w.into_inner();
    assert_eq!(written, nar.len() as u64);
    (nar, index)
}

fn contents_of<'a>(tree: &'a Tree, path: &str) -> &'a [u8] {
    let mut node = tree;
    for component in path.split('/').filter(|c| !c.is_empty()) {
        let Tree::Dir(entries) = node else { panic!("{path} is not in the tree") };
        node = &entries[component];
    }
    let Tree::File { contents, .. } = node else { panic!("{path} is not a file") };
    contents
}

/// Hands out its bytes a few at a time, as a slow socket does.
struct Trickle<'a> {
    data: &'a [u8],
    steps: Vec<usize>,
    at: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = self.steps[self.at % self.steps.len()];
        self.at += 1;
        let n = step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Parses untrusted bytes: must not panic, must not size a buffer from a length field, and
/// must refuse with InvalidInput. A success must describe the input.
fn parse_untrusted(bytes: &[u8]) -> Option<nar::ParsedNar> {
    let (result, largest) = largest_allocation(|| nar::parse(bytes));
    // The reader's own buffer, plus room for the strings it collects: never a length field.
    assert!(largest <= 512 * 1024, "parsing {} bytes allocated {largest} bytes at once", bytes.len());
    match result {
        Ok(parsed) => {
            assert_eq!(parsed.nar_size, bytes.len() as u64);
            let _ = parsed.root.walk(|names, node| {
                if let Node::Regular { size, nar_offset, .. } = *node {
                    assert!(nar_offset + size <= parsed.nar_size, "{} lies outside the NAR", names.join("/"));
                }
                Ok::<(), ()>(())
            });
            Some(parsed)
        }
        Err(err) => {
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
            None
        }
    }
}

/// One damage to a valid NAR.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    /// Overwrites the 8-byte word at a multiple of 8, where every length field of a NAR lies.
    Word { at: usize, value: u64 },
}

fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        (0u64..4096).prop_map(|k| u64::MAX - k),
        Just(1 << 63),
        Just(usize::MAX as u64 / 2),
        Just(i64::MAX as u64 + 1),
        (0u64..4096).prop_map(|k| (1 << 32) + k),
        0u64..512,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Positions are taken modulo the NAR's length when applied.
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..24).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (any::<usize>(), huge()).prop_map(|(at, value)| Mutation::Word { at, value }),
    ]
}

fn apply(nar: &mut Vec<u8>, mutation: &Mutation) {
    let len = nar.len();
    match mutation {
        Mutation::Flip { at, mask } => nar[at % len] ^= mask,
        Mutation::Truncate { at } => nar.truncate(at % len),
        Mutation::Insert { at, bytes } => {
            let at = at % (len + 1);
            nar.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let at = at % len;
            nar.drain(at..(at + n).min(len));
        }
        Mutation::Word { at, value } => {
            let at = (at % (len / 8)) * 8;
            nar[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// The strings NAR framing is made of, and a few others.
fn token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "(", ")", "type", "regular", "directory", "symlink", "entry", "name", "node",
            "contents", "executable", "target", "", ".", "..", "a", "b", "nix-archive-1",
        ])
        .prop_map(|t| t.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

/// Framing pieces: a padded string, a bare length, or raw bytes.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => token().prop_map(|t| {
            let mut out = (t.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&t);
            out.resize(out.len().next_multiple_of(8), 0);
            out
        }),
        1 => huge().prop_map(|n| n.to_le_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn written_trees_parse_back_to_their_index(tree in tree()) {
        let (nar, index) = nar_of(&tree);
        let parsed = nar::parse(&nar[..]).unwrap();
        prop_assert_eq!(parsed.nar_size, nar.len() as u64);
        prop_assert_eq!(&parsed.root, &index);
        // The index points at each file's bytes.
        let mut walked: Vec<(String, Node)> = Vec::new();
        let _ = parsed.root.walk(|names, node| {
            walked.push((names.join("/"), node.clone()));
            Ok::<(), ()>(())
        });
        for (path, node) in &walked {
            if let Node::Regular { size, nar_offset, .. } = *node {
                let at = nar_offset as usize;
                prop_assert_eq!(&nar[at..at + size as usize], contents_of(&tree, path));
            }
            // Lookups find every walked node by its path.
            prop_assert_eq!(parsed.root.lookup(path), Some(node));
        }
    }

    #[test]
    fn how_bytes_arrive_does_not_change_the_parse(
        tree in tree(),
        steps in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let (nar, index) = nar_of(&tree);
        let parsed = nar::parse(Trickle { data: &nar, steps, at: 0 }).unwrap();
        prop_assert_eq!(parsed.nar_size, nar.len() as u64);
        prop_assert_eq!(parsed.root, index);
    }

    #[test]
    fn prefixes_and_extensions_of_a_nar_are_refused(
        tree in tree(),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..24),
    ) {
        let (nar, _) = nar_of(&tree);
        let err = nar::parse(&nar[..cut.index(nar.len())]).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let mut longer = nar.clone();
        longer.extend_from_slice(&extra);
        let err = nar::parse(&longer[..]).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn damaged_nars_never_panic(
        tree in tree(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (mut nar, _) = nar_of(&tree);
        for m in &mutations {
            if nar.len() < 8 {
                break;
            }
            apply(&mut nar, m);
        }
        parse_untrusted(&nar);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_untrusted(&bytes);
    }

    #[test]
    fn token_soup_never_panics(pieces in proptest::collection::vec(piece(), 0..40)) {
        // Starting with the magic gets past the first check into the node grammar.
        let mut bytes = b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0".to_vec();
        bytes.extend(pieces.concat());
        parse_untrusted(&bytes);
    }

    #[test]
    fn huge_lengths_anywhere_are_refused_without_allocating(
        tree in tree(),
        at in any::<prop::sample::Index>(),
        value in huge(),
    ) {
        let (mut nar, _) = nar_of(&tree);
        let at = at.index(nar.len() / 8) * 8;
        nar[at..at + 8].copy_from_slice(&value.to_le_bytes());
        // The word may be file contents, so the NAR may stay valid.
        parse_untrusted(&nar);
    }

    #[test]
    fn huge_length_fields_are_refused(
        contents in proptest::collection::vec(any::<u8>(), 0..64),
        name in name(),
        value in huge(),
    ) {
        // The contents length of a lone file: magic (24 bytes), then "(", "type", "regular"
        // and "contents" (16 bytes each).
        let (mut file, _) = nar_of(&Tree::File { executable: false, contents: contents.clone() });
        file[88..96].copy_from_slice(&value.to_le_bytes());
        let parsed = parse_untrusted(&file);
        // Up to the end of the padding, a longer file is the same bytes with zeros after them;
        // shorter ones depend on the contents.
        let len = contents.len() as u64;
        if value >= len {
            prop_assert_eq!(parsed.is_some(), value <= len.next_multiple_of(8));
        }
        // The length of the name of a directory entry: after the magic, "(", "type",
        // "directory", "entry", "(", "name".
        let dir = Tree::Dir(BTreeMap::from([(name.clone(), Tree::Link("t".into()))]));
        let (original, _) = nar_of(&dir);
        let mut nar = original.clone();
        nar[128..136].copy_from_slice(&value.to_le_bytes());
        let parsed = parse_untrusted(&nar);
        prop_assert_eq!(parsed.is_some(), value == name.len() as u64);
        // The length of the magic itself.
        let mut nar = original;
        nar[0..8].copy_from_slice(&value.to_le_bytes());
        let parsed = parse_untrusted(&nar);
        prop_assert_eq!(parsed.is_some(), value == 13);
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// `dump_path` writes exactly what the token writer writes for the same tree.
    #[test]
    fn dumping_a_directory_matches_the_writer(entries in proptest::collection::btree_map(name(), tree(), 0..5)) {
        use std::os::unix::fs::PermissionsExt;
        fn materialize(tree: &Tree, path: &std::path::Path) {
            match tree {
                Tree::File { executable, contents } => {
                    std::fs::write(path, contents).unwrap();
                    let mode = if *executable { 0o755 } else { 0o644 };
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
                }
                Tree::Link(target) => std::os::unix::fs::symlink(target, path).unwrap(),
                Tree::Dir(entries) => {
                    std::fs::create_dir(path).unwrap();
                    for (name, child) in entries {
                        materialize(child, &path.join(name));
                    }
                }
            }
        }
        let tree = Tree::Dir(entries);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        materialize(&tree, &root);
        let mut dumped = Vec::new();
        let len = nar::dump_path(&root, &mut dumped).unwrap();
        let (nar, _) = nar_of(&tree);
        prop_assert_eq!(len, nar.len() as u64);
        prop_assert!(dumped == nar, "dump_path and NarWriter differ");
    }
}

#[test]
fn nesting_at_the_limit_parses_and_one_deeper_is_refused() {
    // The test's own tree, writer and comparisons recurse; the parser under test does not.
    std::thread::Builder::new()
        .stack_size(256 * 1024 * 1024)
        .spawn(nesting_at_the_limit)
        .unwrap()
        .join()
        .unwrap();
}

fn nesting_at_the_limit() {
    for (depth, ok) in [(MAX_DEPTH, true), (MAX_DEPTH + 1, false)] {
        let mut tree = Tree::File { executable: false, contents: b"x".to_vec() };
        for _ in 0..depth {
            tree = Tree::Dir(BTreeMap::from([("d".to_string(), tree)]));
        }
        let (nar, index) = nar_of(&tree);
        match nar::parse(&nar[..]) {
            Ok(parsed) => assert!(ok && parsed.root == index, "depth {depth}"),
            Err(err) => assert!(!ok && err.kind() == ErrorKind::InvalidInput, "depth {depth}: {err}"),
        }
    }
}
