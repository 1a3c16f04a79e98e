//! Store paths: `<store dir>/<32 nixbase32 chars>-<name>`.

use std::cmp::Ordering;

use super::base32;
use crate::error::{Error, Result};

/// The store directory of a default Nix install.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a base name, in characters.
const HASH_PART_LEN: usize = 32;

/// Longest name Nix accepts; it keeps the base name within 255 bytes.
const MAX_NAME_LEN: usize = 211;

/// A store path without its store directory.
///
/// Ordered like Nix orders store paths, by base name string. That is not the order of the
/// digest bytes, because nixbase32 writes the last byte first.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    /// The 160-bit digest that the hash part encodes.
    pub digest: [u8; 20],
    /// Everything after the dash.
    pub name: String,
}

/// Parses the 32-character hash part of a store path.
pub fn parse_hash_part(s: &str) -> Result<[u8; 20]> {
    if s.len() != HASH_PART_LEN {
        return Err(Error::invalid(format!(
            "store path hash {s:?} has {} characters, expected {HASH_PART_LEN}",
            s.len()
        )));
    }
    let bytes = base32::decode(s).map_err(|e| e.context(format!("store path hash {s:?}")))?;
    bytes
        .try_into()
        .map_err(|_| Error::internal("32 nixbase32 characters did not decode to 20 bytes"))
}

/// Checks a store path name the way Nix does.
///
/// Nix 2.8 itself accepts `.` and `..` as names; later versions refuse them and any name whose
/// first dash-separated part is `.` or `..`, and so do we. Other names starting with a dot
/// (`.hidden`) are valid store paths in every version, so they are kept.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("store path name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "store path name is {} characters long, the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(Error::invalid(format!(
            "store path name {name:?} contains illegal character {c:?}"
        )));
    }
    let first = name.split('-').next().unwrap_or(name);
    if first == "." || first == ".." {
        return Err(Error::invalid(format!(
            "store path name {name:?} is not valid: it starts with {first:?}"
        )));
    }
    Ok(())
}

impl StorePath {
    /// Builds a store path from its parts, checking the name.
    pub fn new(digest: [u8; 20], name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_name(&name)?;
        Ok(StorePath { digest, name })
    }

    /// Parses a base name, `<32 nixbase32 chars>-<name>`.
    pub fn from_base_name(s: &str) -> Result<Self> {
        let (hash, name) = match (s.get(..HASH_PART_LEN), s.get(HASH_PART_LEN..)) {
            (Some(hash), Some(rest)) if rest.starts_with('-') => (hash, &rest[1..]),
            _ => {
                return Err(Error::invalid(format!(
                    "{s:?} is not a store path base name (<32-char hash>-<name>)"
                )))
            }
        };
        let digest = parse_hash_part(hash)?;
        check_name(name).map_err(|e| e.context(format!("store path {s:?}")))?;
        Ok(StorePath { digest, name: name.to_string() })
    }

    /// Parses an absolute path that must be exactly `store_dir/<base name>`.
    pub fn from_absolute(path: &str, store_dir: &str) -> Result<Self> {
        let store_dir = store_dir.strip_suffix('/').unwrap_or(store_dir);
        let base = path
            .strip_prefix(store_dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| {
                Error::invalid(format!("path {path:?} is not in the store directory {store_dir:?}"))
            })?;
        if base.contains('/') {
            return Err(Error::invalid(format!(
                "path {path:?} has components below the store path"
            )));
        }
        Self::from_base_name(base)
    }

    /// Parses a path given by a person (on a command line, say): a base name, or a path in
    /// `store_dir`, which may name a file inside a store path; the store path is what counts.
    pub fn from_arg(arg: &str, store_dir: &str) -> Result<Self> {
        let dir = store_dir.trim_end_matches('/');
        match arg.strip_prefix(dir).and_then(|rest| rest.strip_prefix('/')) {
            Some(rest) => Self::from_base_name(rest.split('/').next().unwrap_or(rest)),
            None if !arg.contains('/') => Self::from_base_name(arg),
            None => Err(Error::invalid(format!("{arg:?} is not in the store directory {dir}"))),
        }
    }

    /// Parses the last component of an absolute path in any store directory (another
    /// machine's, say).
    pub fn from_path_in_any_store(path: &str) -> Result<Self> {
        Self::from_base_name(path.rsplit('/').next().unwrap_or(path))
    }

    /// `<hash part>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// The 32 nixbase32 characters of the digest, which also name the narinfo file.
    pub fn hash_part(&self) -> String {
        base32::encode(&self.digest)
    }

    /// The package name without its version, as Nix's `parseDrvName` splits it: the name up to
    /// the first dash not followed by a letter (`hello` of `hello-2.12.1`,
    /// `python3.11-requests` of `python3.11-requests-2.31.0`).
    pub fn package_name(&self) -> &str {
        let bytes = self.name.as_bytes();
        (0..bytes.len())
            .find(|&i| bytes[i] == b'-' && !bytes.get(i + 1).is_some_and(u8::is_ascii_alphabetic))
            .map_or(&self.name, |i| &self.name[..i])
    }

    /// The name without its version: the package name, plus the output's name when the version
    /// is followed by one (`foo-dev` of `foo-1.0-dev`). Successive versions of one output share
    /// it.
    pub fn unversioned_name(&self) -> String {
        let package = self.package_name();
        let rest = &self.name[package.len()..];
        match rest.rsplit('-').next() {
            Some(output) if !rest.is_empty() && output.starts_with(|c: char| c.is_ascii_alphabetic()) => format!("{package}-{output}"),
            _ => package.to_string(),
        }
    }

    /// `store_dir/<base name>`.
    pub fn to_absolute(&self, store_dir: &str) -> String {
        let store_dir = store_dir.strip_suffix('/').unwrap_or(store_dir);
        format!("{store_dir}/{}", self.base_name())
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        // Compare hash characters one by one instead of allocating both strings; nixbase32's
        // alphabet is in ASCII order, so digit order is character order.
        (0..HASH_PART_LEN)
            .map(|pos| base32::digit_at(&self.digest, pos).cmp(&base32::digit_at(&other.digest, pos)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

crate::text_form::text_form!(StorePath, base_name, from_base_name);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn package_names_drop_the_version_like_nix() {
        let name = |n: &str| StorePath::new([0; 20], n).unwrap().package_name().to_string();
        assert_eq!(name("hello-2.12.1"), "hello");
        assert_eq!(name("python3.11-requests-2.31.0"), "python3.11-requests");
        assert_eq!(name("source"), "source");
        assert_eq!(name("big-push-v-12-0-99"), "big-push-v");
        assert_eq!(name("foo-bar-"), "foo-bar");
        assert_eq!(name("gcc-wrapper-13.2.0-lib"), "gcc-wrapper");
        let unversioned = |n: &str| StorePath::new([0; 20], n).unwrap().unversioned_name();
        assert_eq!(unversioned("foo-1.0-dev"), "foo-dev");
        assert_eq!(unversioned("foo-1.1-dev"), "foo-dev");
        assert_eq!(unversioned("foo-1.1"), "foo");
        assert_eq!(unversioned("source"), "source");
        assert_eq!(unversioned("big-push-v-12-0-99"), "big-push-v");
    }

    const A: &str = "wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt";
    const C: &str = "rkvkm0asz2zpsik1x8nwwdq0xkq1417n-c.txt";

    #[test]
    fn parses_and_prints() {
        let p = StorePath::from_base_name(A).unwrap();
        assert_eq!(p.name, "a.txt");
        assert_eq!(p.hash_part(), "wzflyq5q9kjg4p27yck2nnispnblxsnh");
        assert_eq!(p.digest, parse_hash_part("wzflyq5q9kjg4p27yck2nnispnblxsnh").unwrap());
        assert_eq!(p.base_name(), A);
        assert_eq!(p.to_string(), A);
        assert_eq!(p.to_absolute(DEFAULT_STORE_DIR), format!("/nix/store/{A}"));
        assert_eq!(p.to_absolute("/nix/store/"), format!("/nix/store/{A}"));
        let abs = StorePath::from_absolute(&format!("/nix/store/{A}"), DEFAULT_STORE_DIR).unwrap();
        assert_eq!(abs, p);
        let other = StorePath::from_absolute(&format!("/tmp/s/{A}"), "/tmp/s/").unwrap();
        assert_eq!(other, p);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{A}\""));
        assert_eq!(serde_json::from_str::<StorePath>(&format!("\"{A}\"")).unwrap(), p);
    }

    #[test]
    fn paths_given_by_people() {
        let base = "0c0ckjhibxyvhrxdb55dp3iwzal15ppw-hello-2.12";
        for arg in [base.to_string(), format!("/nix/store/{base}"), format!("/nix/store/{base}/bin/hello")] {
            assert_eq!(StorePath::from_arg(&arg, "/nix/store/").unwrap().base_name(), base, "{arg}");
        }
        assert!(StorePath::from_arg(&format!("/opt/store/{base}"), "/nix/store").is_err());
        assert!(StorePath::from_arg("/nix/store/not-a-store-path", "/nix/store").is_err());
        assert_eq!(StorePath::from_path_in_any_store(&format!("/other/{base}")).unwrap().name, "hello-2.12");
    }

    #[test]
    fn names_nix_accepts() {
        for name in ["a", "a?b=c", ".hidden", "..foo", "A+_-.9", "x-..", &"n".repeat(211)] {
            let s = format!("wzflyq5q9kjg4p27yck2nnispnblxsnh-{name}");
            assert_eq!(StorePath::from_base_name(&s).unwrap().name, name);
        }
    }

    #[test]
    fn ordering_follows_base_name_strings() {
        let a = StorePath::from_base_name(A).unwrap();
        let c = StorePath::from_base_name(C).unwrap();
        // c's hash part sorts first although its first digest byte is larger.
        assert!(c < a);
        // Byte order and string order disagree: the last byte is written first.
        let mut low_last = [0u8; 20];
        low_last[0] = 1;
        let mut high_last = [0u8; 20];
        high_last[19] = 0x80;
        let p1 = StorePath::new(low_last, "x").unwrap();
        let p2 = StorePath::new(high_last, "x").unwrap();
        assert!(low_last > high_last);
        assert!(p1 < p2);
        assert!(p1.base_name() < p2.base_name());
        let mut v = [a.clone(), c.clone()];
        v.sort();
        let strings: Vec<String> = v.iter().map(|p| p.base_name()).collect();
        let mut sorted = strings.clone();
        sorted.sort();
        assert_eq!(strings, sorted);
        let same_hash = StorePath::new(a.digest, "b").unwrap();
        assert!(a < same_hash);
        // Exhaustive-ish: many random digests sort like their strings.
        let mut paths: Vec<StorePath> = (0u32..200)
            .map(|i| {
                let d: [u8; 20] = crate::nix::Sha256Hash::digest(&i.to_le_bytes()).0[..20]
                    .try_into()
                    .unwrap();
                StorePath::new(d, "x").unwrap()
            })
            .collect();
        paths.sort();
        let names: Vec<String> = paths.iter().map(|p| p.base_name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn rejects_bad_base_names() {
        let h = "wzflyq5q9kjg4p27yck2nnispnblxsnh";
        let long = "n".repeat(212);
        let bad = [
            String::new(),
            h.to_string(),                       // no name
            format!("{h}-"),                     // empty name
            format!("{h}x"),                     // no dash (Nix 2.8 would accept this)
            format!("{h}-a/b"),                  // slash in name
            format!("{h}-."),
            format!("{h}-.."),
            format!("{h}-..-x"),
            format!("{h}-.-x"),
            format!("{h}-a b"),
            format!("{h}-é"),
            format!("{h}-{long}"),
            format!("{}-a", &h[..31]),           // short hash
            format!("{}e-a", &h[..31]),          // 'e' is not a digit
            format!("{}W-a", &h[..31]),          // upper case
            format!("é{}-a", &h[..30]),          // multibyte at the split point
        ];
        for s in bad {
            let err = StorePath::from_base_name(&s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{s}");
        }
        assert!(StorePath::new([0; 20], "a/b").is_err());
    }

    #[test]
    fn rejects_bad_absolute_paths() {
        let bad = [
            format!("/nix/store/{A}/bin"),
            format!("/nix/store/{A}/"),
            format!("/nix/store//{A}"),
            format!("/nix/store/../store/{A}"),
            format!("/nix/storex/{A}"),
            format!("nix/store/{A}"),
            format!("/other/{A}"),
            A.to_string(),
            "/nix/store".to_string(),
            "/nix/store/".to_string(),
        ];
        for s in bad {
            let err = StorePath::from_absolute(&s, DEFAULT_STORE_DIR).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{s}");
        }
    }

    #[test]
    fn hash_part_checks() {
        assert!(parse_hash_part("wzflyq5q9kjg4p27yck2nnispnblxsnh").is_ok());
        assert!(parse_hash_part("wzflyq5q9kjg4p27yck2nnispnblxsn").is_err());
        assert!(parse_hash_part("wzflyq5q9kjg4p27yck2nnispnblxsnhh").is_err());
        assert!(parse_hash_part("wzflyq5q9kjg4p27yck2nnispnblxsnt").is_err());
        assert!(parse_hash_part("").is_err());
    }
}
