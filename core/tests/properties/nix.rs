//! nixbase32, SHA-256 hash forms, store paths, narinfo files, realisations and signing keys.

use flywheel_core::nix::realisation::{SignatureObject, TraceSignature};
use flywheel_core::nix::{
    base32, store_path, BuildTraceKey, BuildTraceValue, DrvOutputId, NarInfo, Realisation, Sha256Hash, SigningKey, StorePath,
    VerifyingKey,
};
use flywheel_core::ErrorKind;
use proptest::prelude::*;

use crate::config;

const STORE: &str = "/nix/store";

fn invalid<T: std::fmt::Debug>(result: flywheel_core::Result<T>) -> Result<(), TestCaseError> {
    if let Err(err) = result {
        prop_assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", err);
    }
    Ok(())
}

/// Strings near the nixbase32 alphabet: its digits, the four letters it leaves out, and others.
fn base32ish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-df-np-sv-z]{0,60}",
        "[0-9a-z]{0,60}",
        ".{0,60}",
    ]
}

fn store_name() -> impl Strategy<Value = String> {
    // Mostly short, as real names are; sometimes up to the limit.
    prop_oneof![4 => "[a-zA-Z0-9+._?=-]{1,16}", 1 => "[a-zA-Z0-9+._?=-]{1,211}"].prop_filter("names starting with . or .. are refused", |n| {
        let first = n.split('-').next().unwrap_or(n);
        first != "." && first != ".."
    })
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), store_name()).prop_map(|(digest, name)| StorePath::new(digest, name).unwrap())
}

fn sha256() -> impl Strategy<Value = Sha256Hash> {
    any::<[u8; 32]>().prop_map(Sha256Hash)
}

/// A value Nix could write on a narinfo line: no line breaks.
fn value() -> impl Strategy<Value = String> {
    "[^\r\n]{0,30}"
}

fn narinfo() -> impl Strategy<Value = NarInfo> {
    let paths = (store_path(), proptest::collection::vec(store_path(), 0..6), proptest::option::of(store_path()));
    let files = (
        "[^\r\n]{1,40}",
        proptest::option::of(value()),
        proptest::option::of(sha256()),
        proptest::option::of(any::<u64>()),
    );
    let nar = (sha256(), 1..=u64::MAX);
    let rest = (
        proptest::option::of(value()),
        proptest::collection::btree_set("[^\r\n]{1,30}", 0..4),
        proptest::option::of("[^\r\n]{1,30}"),
    );
    (paths, files, nar, rest).prop_map(
        |((store_path, references, deriver), (url, compression, file_hash, file_size), (nar_hash, nar_size), (system, sigs, ca))| {
            NarInfo {
                store_path,
                url,
                compression,
                file_hash,
                file_size,
                nar_hash,
                nar_size,
                references,
                deriver,
                system,
                sigs: sigs.into_iter().collect(),
                ca,
            }
        },
    )
}

/// Lines with the keys a narinfo has, and values near the valid ones.
fn narinfo_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
        "References", "Deriver", "System", "Sig", "CA", "Other",
    ]);
    let value = prop_oneof![
        value(),
        "[^\n]{0,30}",
        store_path().prop_map(|p| p.to_absolute(STORE)),
        store_path().prop_map(|p| p.base_name()),
        proptest::collection::vec(store_path(), 0..4)
            .prop_map(|ps| ps.iter().map(StorePath::base_name).collect::<Vec<_>>().join(" ")),
        sha256().prop_map(|h| h.to_nix_base32()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{18,24}",
        Just("unknown-deriver".to_string()),
    ];
    let separator = prop::sample::select(vec![": ", ":", "", ":  ", " : "]);
    (key, separator, value).prop_map(|(k, s, v)| format!("{k}{s}{v}"))
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn base32_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = base32::encode(&bytes);
        prop_assert_eq!(s.len(), base32::encoded_len(bytes.len()));
        prop_assert_eq!(base32::decode(&s).unwrap(), bytes);
    }

    /// Decoding refuses garbage with InvalidInput, and what it accepts is canonical: one string
    /// per byte string.
    #[test]
    fn base32_decodes_only_canonical_strings(s in base32ish()) {
        match base32::decode(&s) {
            Ok(bytes) => prop_assert_eq!(base32::encode(&bytes), s),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
    }

    #[test]
    fn hash_forms_round_trip(hash in sha256()) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(hash.0);
        for form in [hash.to_nix_base32(), format!("sha256:{}", hash.to_hex()), format!("sha256:{b64}"), format!("sha256-{b64}")] {
            prop_assert_eq!(Sha256Hash::parse(&form).unwrap(), hash);
        }
        let json = serde_json::to_string(&hash).unwrap();
        prop_assert_eq!(serde_json::from_str::<Sha256Hash>(&json).unwrap(), hash);
    }

    #[test]
    fn hash_garbage_is_refused(s in prop_oneof![".{0,80}", base32ish().prop_map(|s| format!("sha256:{s}")), "sha256[:-][A-Za-z0-9+/=]{0,70}"]) {
        invalid(Sha256Hash::parse(&s))?;
    }

}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn store_paths_round_trip(path in store_path(), dir in prop::sample::select(vec!["/nix/store", "/nix/store/", "/tmp/s", "/"])) {
        let base = path.base_name();
        prop_assert_eq!(&StorePath::from_base_name(&base).unwrap(), &path);
        prop_assert_eq!(&store_path::parse_hash_part(&path.hash_part()).unwrap(), &path.digest);
        prop_assert_eq!(&StorePath::from_absolute(&path.to_absolute(dir), dir).unwrap(), &path);
        let json = serde_json::to_string(&path).unwrap();
        prop_assert_eq!(&serde_json::from_str::<StorePath>(&json).unwrap(), &path);
        // Splitting off the version never panics and keeps a prefix.
        prop_assert!(path.name.starts_with(path.package_name()));
        let _ = path.unversioned_name();
    }

    /// Store paths order like their base names, though `Ord` never builds those strings.
    #[test]
    fn store_paths_order_like_base_names(a in store_path(), b in store_path(), same_digest in any::<bool>()) {
        let b = if same_digest { StorePath::new(a.digest, b.name.clone()).unwrap() } else { b };
        prop_assert_eq!(a.cmp(&b), a.base_name().cmp(&b.base_name()));
    }

    #[test]
    fn store_path_garbage_is_refused_or_canonical(
        s in prop_oneof![
            ".{0,80}",
            (base32ish(), ".{0,20}").prop_map(|(h, n)| format!("{h}-{n}")),
            (store_path(), any::<prop::sample::Index>(), ".{0,3}").prop_map(|(p, at, ins)| {
                // Damage a valid base name at a character boundary.
                let mut s = p.base_name();
                s.insert_str(at.index(s.len() + 1), &ins);
                s
            }),
        ],
    ) {
        match StorePath::from_base_name(&s) {
            Ok(path) => prop_assert_eq!(path.base_name(), s.clone()),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
        invalid(StorePath::from_absolute(&s, STORE))?;
        invalid(StorePath::from_absolute(&format!("{STORE}/{s}"), STORE))?;
        invalid(store_path::parse_hash_part(&s))?;
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn narinfos_round_trip(info in narinfo(), dir in prop::sample::select(vec!["/nix/store", "/tmp/store"])) {
        let text = info.render(dir);
        let parsed = NarInfo::parse(&text, dir).unwrap();
        prop_assert_eq!(&parsed, &info);
        prop_assert_eq!(parsed.render(dir), text);
    }

    /// Garbage is refused with InvalidInput, and whatever parses renders to text that parses
    /// to the same narinfo.
    #[test]
    fn narinfo_garbage_is_refused_or_stable(
        text in prop_oneof![
            ".{0,200}",
            proptest::collection::vec(narinfo_line(), 0..14).prop_map(|lines| lines.join("\n")),
            (narinfo(), proptest::collection::vec((any::<prop::sample::Index>(), narinfo_line()), 1..3)).prop_map(|(info, extra)| {
                let mut lines: Vec<String> = info.render(STORE).lines().map(str::to_string).collect();
                for (at, line) in extra {
                    let at = at.index(lines.len() + 1);
                    lines.insert(at, line);
                }
                lines.join("\n")
            }),
            (narinfo(), any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(info, line, cut)| {
                // Cut one line short.
                let mut lines: Vec<String> = info.render(STORE).lines().map(str::to_string).collect();
                let i = line.index(lines.len());
                let mut end = cut.index(lines[i].len() + 1);
                while !lines[i].is_char_boundary(end) {
                    end -= 1;
                }
                lines[i].truncate(end);
                lines.join("\n")
            }),
            (narinfo(), any::<prop::sample::Index>(), prop::sample::select(vec!["\r", "\r\r", " "]), any::<bool>())
                .prop_map(|(info, line, end, crlf)| {
                    // Odd line ends.
                    let mut lines: Vec<String> = info.render(STORE).lines().map(str::to_string).collect();
                    let i = line.index(lines.len());
                    lines[i].push_str(end);
                    lines.join(if crlf { "\r\n" } else { "\n" })
                }),
        ],
    ) {
        match NarInfo::parse(&text, STORE) {
            Ok(info) => {
                let again = NarInfo::parse(&info.render(STORE), STORE);
                prop_assert!(matches!(&again, Ok(a) if a == &info), "{:?} rendered to {:?}", info, again);
            }
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput),
        }
    }

    #[test]
    fn key_and_signature_garbage_never_panics(
        key in prop_oneof![".{0,100}", "[a-z0-9-]{1,10}:[A-Za-z0-9+/=]{0,100}"],
        sig in prop_oneof![".{0,100}", "[a-z0-9-]{1,10}:[A-Za-z0-9+/=]{0,100}"],
        message in ".{0,40}",
    ) {
        invalid(SigningKey::parse(&key))?;
        if let Ok(public) = VerifyingKey::parse(&key) {
            prop_assert!(!public.verify(&message, &sig));
        }
    }
}

/// An output name: what Nix allows in a store path name.
fn output_name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z]{1,8}", 1 => store_name()]
}

fn drv_output_id() -> impl Strategy<Value = DrvOutputId> {
    (sha256(), output_name()).prop_map(|(drv_hash, output)| DrvOutputId { drv_hash, output })
}

/// A well-formed signature by a key of a plausible name.
fn signature_text() -> impl Strategy<Value = String> {
    ("[a-z0-9.-]{1,12}", any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(name, a, b)| {
        use base64::Engine;
        format!("{name}:{}", base64::engine::general_purpose::STANDARD.encode([a, b].concat()))
    })
}

fn realisation() -> impl Strategy<Value = Realisation> {
    (
        drv_output_id(),
        store_path(),
        proptest::collection::vec(signature_text(), 0..3),
        proptest::collection::btree_map(drv_output_id(), store_path(), 0..3),
    )
        .prop_map(|(id, out_path, signatures, dependent_realisations)| Realisation { id, out_path, signatures, dependent_realisations })
}

fn build_trace_value() -> impl Strategy<Value = BuildTraceValue> {
    let sig = prop_oneof![
        signature_text().prop_map(TraceSignature::Text),
        signature_text().prop_map(|t| {
            let (name, sig) = t.split_once(':').unwrap();
            TraceSignature::Object(SignatureObject { key_name: name.to_string(), sig: sig.to_string() })
        }),
    ];
    (store_path(), proptest::collection::vec(sig, 0..3)).prop_map(|(out_path, signatures)| BuildTraceValue { out_path, signatures })
}

/// Damages JSON text at a character boundary: a cut, or a few characters put in.
fn damaged(json: Vec<u8>, at: prop::sample::Index, insert: &str, cut: bool) -> Vec<u8> {
    let text = String::from_utf8(json).unwrap();
    let mut i = at.index(text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    if cut {
        text.as_bytes()[..i].to_vec()
    } else {
        format!("{}{insert}{}", &text[..i], &text[i..]).into_bytes()
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn realisations_round_trip(r in realisation(), key in prop::sample::select(vec!["a-1", "cache.example.org-1"])) {
        let json = r.to_json();
        let parsed = Realisation::parse_json(&json).unwrap();
        prop_assert_eq!(&parsed, &r);
        prop_assert_eq!(parsed.to_json(), json);
        prop_assert_eq!(DrvOutputId::parse(&r.id.to_nix_string()).unwrap(), r.id.clone());
        let key = SigningKey::generate(key).unwrap();
        let mut signed = r;
        signed.sign(&key);
        prop_assert!(Realisation::parse_json(&signed.to_json()).unwrap().verify(&key.verifying_key()));
    }

    #[test]
    fn build_trace_values_round_trip(v in build_trace_value(), output in output_name(), drv in store_path()) {
        let json = v.to_json().unwrap();
        let parsed = BuildTraceValue::parse_json(&json).unwrap();
        prop_assert_eq!(&parsed, &v);
        prop_assert_eq!(parsed.to_json().unwrap(), json);
        // Names at the length limit have no room for ".drv".
        let key = BuildTraceKey::new(&format!("{drv}.drv"), &output);
        if let Ok(key) = key {
            let signer = SigningKey::generate("c-1").unwrap();
            let mut signed = parsed;
            signed.sign(&key, &signer);
            prop_assert!(signed.verify(&key, &signer.verifying_key()));
        }
    }

    /// Damaged or arbitrary input is refused with InvalidInput, and whatever parses writes
    /// back to JSON that parses to the same entry.
    #[test]
    fn realisation_garbage_is_refused_or_stable(
        json in prop_oneof![
            ".{0,120}".prop_map(String::into_bytes),
            (realisation(), any::<prop::sample::Index>(), "[\"{}:,!\\[\\] a-z0-9]{0,3}", any::<bool>())
                .prop_map(|(r, at, insert, cut)| damaged(r.to_json(), at, &insert, cut)),
            (build_trace_value(), any::<prop::sample::Index>(), "[\"{}:,!\\[\\] a-z0-9]{0,3}", any::<bool>())
                .prop_map(|(v, at, insert, cut)| damaged(v.to_json().unwrap(), at, &insert, cut)),
        ],
    ) {
        match Realisation::parse_json(&json) {
            Ok(r) => prop_assert_eq!(Realisation::parse_json(&r.to_json()).unwrap(), r),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", err),
        }
        match BuildTraceValue::parse_json(&json) {
            Ok(v) => prop_assert_eq!(BuildTraceValue::parse_json(&v.to_json().unwrap()).unwrap(), v),
            Err(err) => prop_assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", err),
        }
        if let Ok(text) = std::str::from_utf8(&json) {
            invalid(DrvOutputId::parse(text))?;
        }
    }
}

/// Found with `narinfo_garbage_is_refused_or_stable`: a value ending in a carriage return that
/// `lines()` leaves (the last line, or before "\r\n") parsed, but rendered to text that parses
/// without it.
#[test]
fn a_stray_carriage_return_is_refused() {
    let minimal = "StorePath: /nix/store/wzflyq5q9kjg4p27yck2nnispnblxsnh-a\nURL: x\n\
                   NarHash: sha256:1g6syx5pq5fhbix3j0ymn6dyxsipm4lj7ql0vxcs87a2aibkwy3x\nNarSize: 1\n";
    for tail in ["System: x\r", "System: x\r\r\n", "Sig: k:v\r"] {
        let err = NarInfo::parse(&format!("{minimal}{tail}"), STORE).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{tail:?}");
    }
    // CRLF line ends stay accepted.
    let crlf = format!("{minimal}System: x\n").replace('\n', "\r\n");
    assert_eq!(NarInfo::parse(&crlf, STORE).unwrap().system.as_deref(), Some("x"));
}
