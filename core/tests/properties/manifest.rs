//! Manifests: JSON round trips, `validate` on anything, and chunk offsets.

use std::collections::BTreeMap;

use flywheel_core::api::v1::chunks::PathManifest;
use flywheel_core::chunk::{ChunkHash, ChunkParams, Chunker};
use flywheel_core::manifest::{ChunkRef, Manifest, MANIFEST_VERSION};
use flywheel_core::nar::Node;
use flywheel_core::nix::Sha256Hash;
use flywheel_core::ErrorKind;
use proptest::prelude::*;

use crate::api::{chunk_ref, damage, json_round_trips, json_token};
use crate::config;

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..2000, 1 => any::<u64>(), 1 => (0u64..16).prop_map(|k| u64::MAX - k)]
}

/// Any index, consistent with a NAR or not, whose names and targets a NAR may hold (stored
/// manifests refuse others when read, as the NAR reader does).
fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (offset(), any::<bool>(), offset()).prop_map(|(size, executable, nar_offset)| Node::Regular { size, executable, nar_offset }),
        "[^\\x00]{1,10}".prop_map(|target| Node::Symlink { target }),
    ];
    let name = "[^/\\x00]{1,8}".prop_filter("not . or ..", |n| n != "." && n != "..");
    leaf.prop_recursive(4, 32, 5, move |inner| {
        proptest::collection::btree_map(name.clone(), inner, 0..5).prop_map(|entries| Node::Directory { entries })
    })
}

/// Any manifest: nothing ties its parts together.
fn manifest() -> impl Strategy<Value = Manifest> {
    (
        prop_oneof![Just(MANIFEST_VERSION), any::<u32>()],
        any::<[u8; 32]>(),
        offset(),
        proptest::collection::vec(chunk_ref(), 0..8),
        node(),
    )
        .prop_map(|(version, hash, nar_size, chunks, root)| Manifest {
            version,
            nar_hash: Sha256Hash(hash),
            nar_size,
            chunks,
            root,
        })
}

/// A manifest made the way the server makes one: from a NAR, chunked with small sizes.
fn real_manifest() -> impl Strategy<Value = (Vec<u8>, Manifest)> {
    let files = proptest::collection::btree_map("[a-z]{1,6}", proptest::collection::vec(any::<u8>(), 0..3000), 1..6);
    files.prop_map(|files| {
        let mut w = flywheel_core::nar::NarWriter::new(Vec::new()).unwrap();
        w.start_directory().unwrap();
        for (name, contents) in &files {
            w.entry(name.as_bytes()).unwrap();
            w.regular(false, contents.len() as u64, &mut &contents[..]).unwrap();
            w.end_entry().unwrap();
        }
        w.end_directory().unwrap();
        let nar = w.into_inner();
        let parsed = flywheel_core::nar::parse(&nar[..]).unwrap();
        let params = ChunkParams { min_size: 64, avg_size: 256, max_size: 1024 };
        let chunks = Chunker::chunk_all(params, &nar)
            .iter()
            .map(|c| ChunkRef { hash: ChunkHash::of(c), size: c.len() as u32 })
            .collect();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            nar_hash: Sha256Hash::digest(&nar),
            nar_size: parsed.nar_size,
            chunks,
            root: parsed.root,
        };
        (nar, manifest)
    })
}

/// Checks what `validate` promises whenever it accepts.
fn check_validated(manifest: &Manifest) -> Result<(), TestCaseError> {
    let result = manifest.validate();
    if let Err(err) = &result {
        prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
        return Ok(());
    }
    let offsets = manifest.chunk_offsets();
    prop_assert_eq!(offsets.len(), manifest.chunks.len() + 1);
    prop_assert_eq!(offsets[0], 0);
    prop_assert_eq!(*offsets.last().unwrap(), manifest.nar_size);
    for (pair, chunk) in offsets.windows(2).zip(&manifest.chunks) {
        prop_assert_eq!(pair[1] - pair[0], u64::from(chunk.size));
    }
    for (size, nar_offset) in regular_files(&manifest.root) {
        {
            let range = Manifest::chunks_covering(&offsets, nar_offset..nar_offset + size);
            if size == 0 {
                prop_assert!(range.is_empty());
                continue;
            }
            // The chunks cover the file's bytes, and no fewer would.
            prop_assert!(offsets[range.start] <= nar_offset);
            prop_assert!(offsets[range.end] >= nar_offset + size);
            prop_assert!(offsets[range.start + 1] > nar_offset);
            prop_assert!(offsets[range.end - 1] < nar_offset + size);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn manifests_round_trip_through_json(manifest in manifest()) {
        let json = serde_json::to_string(&manifest).unwrap();
        // Manifests are always written in the current format, whatever version they were read as.
        let written = Manifest { version: MANIFEST_VERSION, ..manifest.clone() };
        prop_assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), written);
        let path = PathManifest {
            store_path: "/nix/store/x".into(),
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            manifest: manifest.into(),
        };
        json_round_trips(&path)?;
    }

    #[test]
    fn any_manifest_validates_or_is_refused(manifest in manifest()) {
        check_validated(&manifest)?;
        // Consistent sizes get past the first checks.
        let mut sized = manifest;
        sized.version = MANIFEST_VERSION;
        sized.nar_size = sized.chunks.iter().map(|c| u64::from(c.size)).sum();
        check_validated(&sized)?;
    }

    #[test]
    fn manifests_of_nars_validate_and_map_files_to_chunks((nar, manifest) in real_manifest()) {
        manifest.validate().unwrap();
        check_validated(&manifest)?;
        let offsets = manifest.chunk_offsets();
        let params = ChunkParams { min_size: 64, avg_size: 256, max_size: 1024 };
        let chunks = Chunker::chunk_all(params, &nar);
        for (size, nar_offset) in regular_files(&manifest.root) {
            {
                if size == 0 {
                    continue;
                }
                let range = Manifest::chunks_covering(&offsets, nar_offset..nar_offset + size);
                let joined = chunks[range.clone()].concat();
                let skip = (nar_offset - offsets[range.start]) as usize;
                let at = nar_offset as usize;
                prop_assert_eq!(&joined[skip..skip + size as usize], &nar[at..at + size as usize]);
            }
        }
    }

    #[test]
    fn damaged_manifests_never_panic(
        (_, manifest) in real_manifest(),
        at in any::<usize>(),
        len in 0usize..12,
        how in any::<u8>(),
        token in json_token(),
    ) {
        let json = damage(&serde_json::to_string(&manifest).unwrap(), at, len, how, &token);
        if let Ok(damaged) = serde_json::from_slice::<Manifest>(&json) {
            check_validated(&damaged)?;
            json_round_trips(&damaged)?;
        }
    }

    #[test]
    fn covering_any_range_never_panics(
        sizes in proptest::collection::vec(any::<u32>(), 0..10),
        start in offset(),
        end in offset(),
    ) {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            nar_hash: Sha256Hash([0; 32]),
            nar_size: sizes.iter().map(|&s| u64::from(s)).sum(),
            chunks: sizes.iter().map(|&size| ChunkRef { hash: ChunkHash([0; 32]), size }).collect(),
            root: Node::Directory { entries: BTreeMap::new() },
        };
        let offsets = manifest.chunk_offsets();
        let range = Manifest::chunks_covering(&offsets, start..end);
        prop_assert!(range.start <= range.end && range.end <= sizes.len());
    }
}

#[test]
fn deeply_nested_manifest_json_is_refused_without_overflow() {
    let depth = 100_000;
    let json = format!(
        "{{\"version\":1,\"narHash\":\"sha256:{}\",\"narSize\":0,\"chunks\":[],\"root\":{}{}}}",
        "0".repeat(52),
        "{\"type\":\"directory\",\"entries\":{\"d\":".repeat(depth),
        "}}".repeat(depth)
    );
    let err = serde_json::from_str::<Manifest>(&json).unwrap_err();
    assert!(err.to_string().contains("recursion limit"), "{err}");
}

/// `(size, narOffset)` of every regular file of a tree, in NAR order.
fn regular_files(root: &Node) -> Vec<(u64, u64)> {
    let mut files = Vec::new();
    let _ = root.walk(|_, node| {
        if let Node::Regular { size, nar_offset, .. } = *node {
            files.push((size, nar_offset));
        }
        Ok::<(), ()>(())
    });
    files
}
