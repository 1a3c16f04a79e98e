//! Nix archives (NAR): a validating streaming reader that builds the file index, and a writer
//! that dumps a directory tree.
//!
//! A NAR is a sequence of length-prefixed strings, each padded with zeros to a multiple of 8
//! bytes. The reader accepts exactly what `nix-store --restore` accepts, minus names and
//! symlink targets that are not UTF-8 (the file index is JSON, like Nix's own `.ls` listing).

mod index;
mod reader;
mod writer;

pub use index::{from_flat, FlatIndex, Node};
pub use reader::{parse, ParsedNar};
pub use writer::{dump_path, NarWriter};

/// The magic string every NAR starts with.
pub const MAGIC: &str = "nix-archive-1";

/// Longest file name accepted in a NAR (the limit of common Linux filesystems).
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target accepted (Linux's PATH_MAX).
pub const MAX_TARGET_LEN: usize = 4095;

/// Deepest node accepted, in path components below the root (a file at `a/b/c` is at depth 3).
///
/// Every layer accepts exactly this: the NAR reader, the manifest's file index (written and
/// read back), `.ls` listings, and the runner side. Nix's own NAR parser has no limit, but
/// Nix dumps and restores trees through full paths, which Linux bounds at 4096 bytes
/// (`PATH_MAX`): with one-byte names and a `/nix/store/<hash>-<name>` prefix, no tree that Nix
/// can dump or restore on Linux is deeper than about 2020 levels. Nothing on our side
/// recurses over the tree (the reader, the index forms and the listing keep explicit stacks),
/// so the limit only bounds memory per level.
pub const MAX_DEPTH: usize = 2048;

/// Bytes of padding after a string of `len` bytes.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::os::unix::fs::PermissionsExt;

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("share/empty")).unwrap();
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("share/data"), vec![7u8; 10_000]).unwrap();
        std::fs::write(root.join("share/odd"), b"12345").unwrap();
        std::os::unix::fs::symlink("../bin/tool", root.join("share/link")).unwrap();
        dir
    }

    /// A NAR of a directory with the given entry names, each a tiny regular file, written token by
    /// token so that invalid names and orders can be produced.
    fn nar_with_names(names: &[&[u8]]) -> Vec<u8> {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.start_directory().unwrap();
        for name in names {
            w.entry(name).unwrap();
            w.regular(false, 1, &mut &b"x"[..]).unwrap();
            w.end_entry().unwrap();
        }
        w.end_directory().unwrap();
        w.into_inner()
    }

    #[test]
    fn dump_then_parse_builds_the_index() {
        let tree = sample_tree();
        let mut nar = Vec::new();
        let len = dump_path(tree.path(), &mut nar).unwrap();
        assert_eq!(len as usize, nar.len());
        let parsed = parse(&nar[..]).unwrap();
        assert_eq!(parsed.nar_size, len);
        let Some(Node::Regular { size, executable, nar_offset }) = parsed.root.lookup("bin/tool") else {
            panic!("bin/tool missing: {:?}", parsed.root)
        };
        assert!(*executable);
        assert_eq!(&nar[*nar_offset as usize..(*nar_offset + *size) as usize], b"#!/bin/sh\necho hi\n");
        let Some(Node::Regular { executable, nar_offset, size }) = parsed.root.lookup("share/odd") else { panic!() };
        assert!(!executable);
        assert_eq!(&nar[*nar_offset as usize..(*nar_offset + *size) as usize], b"12345");
        assert_eq!(parsed.root.lookup("share/link"), Some(&Node::Symlink { target: "../bin/tool".into() }));
        assert_eq!(parsed.root.lookup("share/empty"), Some(&Node::Directory { entries: Default::default() }));
        assert_eq!(parsed.root.file_count(), 3);
        let mut paths = Vec::new();
        parsed.root.walk(|names, _| {
            paths.push(names.join("/"));
            Ok::<(), ()>(())
        }).unwrap();
        assert_eq!(paths, ["", "bin", "bin/tool", "share", "share/data", "share/empty", "share/link", "share/odd"]);
        let mut listing = Vec::new();
        parsed.root.write_listing(&mut listing).unwrap();
        assert_eq!(String::from_utf8(listing).unwrap(), serde_json::to_string(&parsed.root).unwrap());
        let flat = serde_json::to_string(&FlatIndex(&parsed.root)).unwrap();
        assert!(flat.starts_with(r#"[[0,"","d"],[1,"bin","d"],[2,"tool","x",18,"#), "{flat}");
        let back = from_flat(&mut serde_json::Deserializer::from_str(&flat)).unwrap();
        assert_eq!(back, parsed.root);
    }

    #[test]
    fn single_file_and_symlink_roots() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("l")).unwrap();
        let mut nar = Vec::new();
        dump_path(&dir.path().join("f"), &mut nar).unwrap();
        assert!(matches!(parse(&nar[..]).unwrap().root, Node::Regular { size: 5, .. }));
        let mut nar = Vec::new();
        dump_path(&dir.path().join("l"), &mut nar).unwrap();
        assert_eq!(parse(&nar[..]).unwrap().root, Node::Symlink { target: "/nowhere".into() });
    }

    #[test]
    fn invalid_names_and_orders_are_refused() {
        assert!(parse(&nar_with_names(&[b"a", b"b"])[..]).is_ok());
        for names in [
            &[&b".."[..]][..],
            &[b"."],
            &[b""],
            &[b"a/b"],
            &[b"a\0b"],
            &[b"b", b"a"],
            &[b"a", b"a"],
        ] {
            let err = parse(&nar_with_names(names)[..]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{names:?}");
        }
        let long = vec![b'n'; MAX_NAME_LEN + 1];
        assert!(parse(&nar_with_names(&[&long])[..]).is_err());
    }

    #[test]
    fn damaged_streams_are_refused() {
        let tree = sample_tree();
        let mut nar = Vec::new();
        dump_path(tree.path(), &mut nar).unwrap();
        for cut in [0, 7, 8, 100, nar.len() / 2, nar.len() - 1] {
            let err = parse(&nar[..cut]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "cut at {cut}");
        }
        let mut trailing = nar.clone();
        trailing.extend_from_slice(&[0u8; 8]);
        assert!(parse(&trailing[..]).unwrap_err().message().contains("trailing"));
        let mut bad_magic = nar.clone();
        bad_magic[8] = b'X';
        assert!(parse(&bad_magic[..]).is_err());
        // "nix-archive-1" is 13 bytes: the three padding bytes follow it.
        let mut bad_padding = nar.clone();
        bad_padding[8 + 13] = 1;
        assert!(parse(&bad_padding[..]).unwrap_err().message().contains("padding"));
        let mut huge_len = nar.clone();
        huge_len[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge_len[..]).is_err());
    }

    #[test]
    fn flat_indexes_are_checked_like_nars() {
        let read = |json: &str| from_flat(&mut serde_json::Deserializer::from_str(json));
        assert_eq!(read(r#"[[0,"","r",5,96]]"#).unwrap(), Node::Regular { size: 5, executable: false, nar_offset: 96 });
        assert!(read(r#"[[0,"","d"],[1,"a","l","t"],[1,"b","d"],[2,"c","r",1,2]]"#).is_ok());
        for bad in [
            r#"[]"#,
            r#"[[1,"","d"]]"#,
            r#"[[0,"","r",5,96],[1,"a","d"]]"#,
            r#"[[0,"","d"],[2,"a","d"]]"#,
            r#"[[0,"","d"],[1,"b","d"],[1,"a","d"]]"#,
            r#"[[0,"","d"],[1,"a","d"],[1,"a","d"]]"#,
            r#"[[0,"","d"],[1,"a","l","t"],[2,"b","d"]]"#,
            r#"[[0,"","d"],[1,"..","d"]]"#,
            r#"[[0,"","d"],[1,"a/b","d"]]"#,
            r#"[[0,"","d"],[1,"a","l",""]]"#,
            r#"[[0,"","d"],[1,"a","q"]]"#,
            r#"[[0,"","d"],[1,"a","r",1]]"#,
            r#"[[0,"","d"],[1,"a","d",1]]"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let mut too_deep = String::from(r#"[[0,"","d"]"#);
        for depth in 1..=MAX_DEPTH + 1 {
            too_deep.push_str(&format!(r#",[{depth},"d","d"]"#));
        }
        too_deep.push(']');
        assert!(read(&too_deep).unwrap_err().to_string().contains("deeper"));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflow() {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        for _ in 0..MAX_DEPTH + 2 {
            w.start_directory().unwrap();
            w.entry(b"d").unwrap();
        }
        w.start_directory().unwrap();
        let err = parse(&w.into_inner()[..]).unwrap_err();
        assert!(err.message().contains("deeper"), "{err}");
    }
}
