//! `.narinfo` files: the per-path metadata a binary cache serves at `/<hash part>.narinfo`.

use super::hash::Sha256Hash;
use super::signing::{self, SigningKey, VerifyingKey};
use super::store_path::StorePath;
use crate::error::{Error, Result};

/// Largest narinfo text accepted; real ones are a few kilobytes.
const MAX_TEXT_LEN: usize = 1 << 20;

/// Most references accepted in one narinfo.
const MAX_REFERENCES: usize = 10_000;

/// Parsed contents of a narinfo file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    /// The path this file describes.
    pub store_path: StorePath,
    /// Where the (possibly compressed) NAR is, relative to the cache root.
    pub url: String,
    /// Compression of the file at `url`, such as `xz`, `zstd` or `none`. `None` means the line
    /// was absent, which Nix reads as `bzip2`.
    pub compression: Option<String>,
    /// Hash of the file at `url`.
    pub file_hash: Option<Sha256Hash>,
    /// Size of the file at `url`.
    pub file_size: Option<u64>,
    /// Hash of the uncompressed NAR.
    pub nar_hash: Sha256Hash,
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// Store paths this path refers to, possibly including itself.
    pub references: Vec<StorePath>,
    /// The derivation that built the path, if known.
    pub deriver: Option<StorePath>,
    /// The system the path was built for, a field only some writers set.
    pub system: Option<String>,
    /// Signatures, each `key-name:base64`.
    pub sigs: Vec<String>,
    /// Content address, such as `fixed:r:sha256:...` or `text:sha256:...`, kept verbatim.
    pub ca: Option<String>,
}

/// Fields seen so far while parsing; `Option` doubles as the duplicate check.
#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Sha256Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Sha256Hash>,
    nar_size: Option<u64>,
    references: Option<Vec<StorePath>>,
    deriver: Option<Option<StorePath>>,
    system: Option<String>,
    ca: Option<Option<String>>,
    sigs: Vec<String>,
}

/// Stores a field, refusing a second occurrence.
fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(Error::invalid(format!("duplicate {key} field")));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_u64(key: &str, value: &str) -> Result<u64> {
    // `u64::from_str` accepts a leading '+', which Nix does not write.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(format!("{key} {value:?} is not a decimal number")));
    }
    value
        .parse()
        .map_err(|_| Error::invalid(format!("{key} {value:?} is out of range")))
}

impl NarInfo {
    /// Parses narinfo text for a store under `store_dir`.
    ///
    /// StorePath, URL, NarHash and NarSize are required; unknown keys are ignored so that
    /// fields added by newer writers do not break us.
    pub fn parse(text: &str, store_dir: &str) -> Result<NarInfo> {
        if text.len() > MAX_TEXT_LEN {
            return Err(Error::invalid(format!(
                "narinfo is {} bytes long, the limit is {MAX_TEXT_LEN}",
                text.len()
            )));
        }
        let mut f = Fields::default();
        for (index, line) in text.lines().enumerate() {
            Self::parse_line(&mut f, line, store_dir)
                .map_err(|e| e.context(format!("narinfo line {}", index + 1)))?;
        }
        let missing = |key: &str| Error::invalid(format!("narinfo has no {key} field"));
        let nar_size = f.nar_size.ok_or_else(|| missing("NarSize"))?;
        if nar_size == 0 {
            // Even an empty file's NAR has framing; Nix rejects zero as well.
            return Err(Error::invalid("narinfo has NarSize 0"));
        }
        Ok(NarInfo {
            store_path: f.store_path.ok_or_else(|| missing("StorePath"))?,
            url: f.url.ok_or_else(|| missing("URL"))?,
            compression: f.compression,
            file_hash: f.file_hash,
            file_size: f.file_size,
            nar_hash: f.nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size,
            references: f.references.unwrap_or_default(),
            deriver: f.deriver.flatten(),
            system: f.system,
            sigs: f.sigs,
            ca: f.ca.flatten(),
        })
    }

    fn parse_line(f: &mut Fields, line: &str, store_dir: &str) -> Result<()> {
        if line.is_empty() {
            return Ok(());
        }
        // `lines()` ends a line at "\n" or "\r\n"; a carriage return it leaves would be lost
        // when the narinfo is rendered and read again.
        if line.ends_with('\r') {
            return Err(Error::invalid("line ends with a stray carriage return"));
        }
        let (key, rest) = line
            .split_once(':')
            .ok_or_else(|| Error::invalid(format!("expected 'Key: value', got {line:?}")))?;
        // Nix writes "Key: value"; an empty value may come without the space.
        let value = match rest.strip_prefix(' ') {
            Some(value) => value,
            None if rest.is_empty() => rest,
            None => return Err(Error::invalid(format!("expected ': ' after {key:?}"))),
        };
        match key {
            "StorePath" => {
                set_once(&mut f.store_path, key, StorePath::from_absolute(value, store_dir)?)
            }
            "URL" => {
                if value.is_empty() {
                    return Err(Error::invalid("URL is empty"));
                }
                set_once(&mut f.url, key, value.to_string())
            }
            "Compression" => set_once(&mut f.compression, key, value.to_string()),
            "FileHash" => set_once(&mut f.file_hash, key, Sha256Hash::parse(value)?),
            "FileSize" => set_once(&mut f.file_size, key, parse_u64(key, value)?),
            "NarHash" => set_once(&mut f.nar_hash, key, Sha256Hash::parse(value)?),
            "NarSize" => set_once(&mut f.nar_size, key, parse_u64(key, value)?),
            "References" => {
                // Count before parsing so a huge line costs no allocations per entry.
                let count = value.split(' ').filter(|s| !s.is_empty()).count();
                if count > MAX_REFERENCES {
                    return Err(Error::invalid(format!(
                        "narinfo has {count} references, the limit is {MAX_REFERENCES}"
                    )));
                }
                let refs = value
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(StorePath::from_base_name)
                    .collect::<Result<Vec<_>>>()?;
                set_once(&mut f.references, key, refs)
            }
            "Deriver" => {
                let deriver = match value {
                    "unknown-deriver" => None,
                    _ => Some(StorePath::from_base_name(value)?),
                };
                set_once(&mut f.deriver, key, deriver)
            }
            "System" => set_once(&mut f.system, key, value.to_string()),
            "Sig" => {
                if value.is_empty() {
                    return Err(Error::invalid("Sig is empty"));
                }
                if !f.sigs.iter().any(|s| s == value) {
                    f.sigs.push(value.to_string());
                }
                Ok(())
            }
            "CA" => {
                let ca = (!value.is_empty()).then(|| value.to_string());
                set_once(&mut f.ca, key, ca)
            }
            _ => Ok(()),
        }
    }

    /// Renders the text form, with keys in the order Nix writes them.
    ///
    /// Optional fields that are `None` are left out; references and signatures keep their
    /// order (Nix writes both sorted).
    pub fn render(&self, store_dir: &str) -> String {
        let mut out = String::with_capacity(512 + 80 * self.references.len());
        let mut line = |key: &str, value: &str| {
            out.push_str(key);
            out.push_str(": ");
            out.push_str(value);
            out.push('\n');
        };
        line("StorePath", &self.store_path.to_absolute(store_dir));
        line("URL", &self.url);
        if let Some(c) = &self.compression {
            line("Compression", c);
        }
        if let Some(h) = &self.file_hash {
            line("FileHash", &h.to_nix_base32());
        }
        if let Some(s) = self.file_size {
            line("FileSize", &s.to_string());
        }
        line("NarHash", &self.nar_hash.to_nix_base32());
        line("NarSize", &self.nar_size.to_string());
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        line("References", &refs.join(" "));
        if let Some(d) = &self.deriver {
            line("Deriver", &d.base_name());
        }
        if let Some(s) = &self.system {
            line("System", s);
        }
        for sig in &self.sigs {
            line("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            line("CA", ca);
        }
        out
    }

    /// The string that signatures of this path sign.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        signing::fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds a signature by `key`, replacing any earlier signature by a key of the same name.
    pub fn sign(&mut self, key: &SigningKey, store_dir: &str) {
        let sig = key.sign(&self.fingerprint(store_dir));
        let prefix = format!("{}:", key.name());
        match self.sigs.iter().position(|s| s.starts_with(&prefix)) {
            Some(i) => {
                self.sigs[i] = sig;
                // Keep one signature per key name.
                let mut j = i + 1;
                while j < self.sigs.len() {
                    if self.sigs[j].starts_with(&prefix) {
                        self.sigs.remove(j);
                    } else {
                        j += 1;
                    }
                }
            }
            None => self.sigs.push(sig),
        }
    }

    /// Whether any signature by `key`'s name verifies.
    pub fn verify(&self, key: &VerifyingKey, store_dir: &str) -> bool {
        let fingerprint = self.fingerprint(store_dir);
        self.sigs.iter().any(|sig| key.verify(&fingerprint, sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::nix::DEFAULT_STORE_DIR;

    // Written by `nix copy --to 'file:///tmp/fx/cache?secret-key=sec'` of Nix 2.8 (the key is
    // in signing's tests), kept byte for byte.
    const REAL: &str = include_str!("testdata/kznx6z0g1warfx4z4ahb5n062jmx5qqs.narinfo");

    // Same writer, a path without references: note the space after "References:".
    const REAL_NO_REFS: &str = include_str!("testdata/rkvkm0asz2zpsik1x8nwwdq0xkq1417n.narinfo");

    const SECRET: &str = "test-key-1:9RAoO1HCyX60ZsDusS3ol+R5yM2pg7alVUjVxjDW5J6KB4GN5DdBpz69jBmbs7Zbtt6oLJJ5qmMWeYUv0dTZ+g==";
    const PUBLIC: &str = "test-key-1:igeBjeQ3Qac+vYwZm7O2W7beqCySeapjFnmFL9HU2fo=";

    const MINIMAL: &str = "StorePath: /nix/store/kznx6z0g1warfx4z4ahb5n062jmx5qqs-b.txt
URL: nar/x.nar
NarHash: sha256:1g6syx5pq5fhbix3j0ymn6dyxsipm4lj7ql0vxcs87a2aibkwy3x
NarSize: 216
";

    #[test]
    fn parses_real_narinfo() {
        let info = NarInfo::parse(REAL, DEFAULT_STORE_DIR).unwrap();
        assert_eq!(info.store_path.base_name(), "kznx6z0g1warfx4z4ahb5n062jmx5qqs-b.txt");
        assert_eq!(info.url, "nar/0cln22a49yfwsxq5vy3jvpi5v0c4x5x9rpsbrz60wqvb5s19wba2.nar.xz");
        assert_eq!(info.compression.as_deref(), Some("xz"));
        assert_eq!(
            info.file_hash.unwrap().to_base32_bare(),
            "0cln22a49yfwsxq5vy3jvpi5v0c4x5x9rpsbrz60wqvb5s19wba2"
        );
        assert_eq!(info.file_size, Some(208));
        assert_eq!(info.nar_size, 216);
        assert_eq!(info.references.len(), 2);
        assert_eq!(info.references[1].name, "a.txt");
        assert_eq!(info.deriver, None);
        assert_eq!(info.system, None);
        assert_eq!(info.sigs.len(), 1);
        assert_eq!(
            info.ca.as_deref(),
            Some("text:sha256:1wzrcki9ajdf3rv7g9g0rc2lw6vs25127k8a970p61shzrzlx7cf")
        );
    }

    #[test]
    fn round_trips_real_narinfos_byte_for_byte() {
        for text in [REAL, REAL_NO_REFS] {
            let info = NarInfo::parse(text, DEFAULT_STORE_DIR).unwrap();
            assert_eq!(info.render(DEFAULT_STORE_DIR), text);
        }
        // Like Nix, References is always written, even when absent from the input.
        let info = NarInfo::parse(MINIMAL, DEFAULT_STORE_DIR).unwrap();
        assert_eq!(info.render(DEFAULT_STORE_DIR), format!("{MINIMAL}References: \n"));
        let none = NarInfo::parse(REAL_NO_REFS, DEFAULT_STORE_DIR).unwrap();
        assert!(none.references.is_empty());
    }

    #[test]
    fn verifies_and_reproduces_nix_signatures() {
        let pk = VerifyingKey::parse(PUBLIC).unwrap();
        let sk = SigningKey::parse(SECRET).unwrap();
        for text in [REAL, REAL_NO_REFS] {
            let info = NarInfo::parse(text, DEFAULT_STORE_DIR).unwrap();
            assert!(info.verify(&pk, DEFAULT_STORE_DIR));
            // The same path under another store dir has another fingerprint.
            let moved = info.render("/gnu/store");
            let moved = NarInfo::parse(&moved, "/gnu/store").unwrap();
            assert!(!moved.verify(&pk, "/gnu/store"));

            let mut resigned = info.clone();
            resigned.sigs.clear();
            resigned.sign(&sk, DEFAULT_STORE_DIR);
            assert_eq!(resigned.render(DEFAULT_STORE_DIR), text);
        }
        let mut tampered = NarInfo::parse(REAL, DEFAULT_STORE_DIR).unwrap();
        tampered.references.pop();
        assert!(!tampered.verify(&pk, DEFAULT_STORE_DIR));
        let mut tampered = NarInfo::parse(REAL, DEFAULT_STORE_DIR).unwrap();
        tampered.nar_size += 1;
        assert!(!tampered.verify(&pk, DEFAULT_STORE_DIR));
        // Fields outside the fingerprint may change freely.
        let mut moved = NarInfo::parse(REAL, DEFAULT_STORE_DIR).unwrap();
        moved.url = "nar/other.nar.zst".into();
        moved.compression = Some("zstd".into());
        assert!(moved.verify(&pk, DEFAULT_STORE_DIR));
    }

    #[test]
    fn sign_replaces_same_key_name() {
        let sk = SigningKey::parse(SECRET).unwrap();
        let other = SigningKey::generate("other-1").unwrap();
        let mut info = NarInfo::parse(MINIMAL, DEFAULT_STORE_DIR).unwrap();
        info.sigs = vec!["test-key-1:stale".into(), "keep:x".into(), "test-key-1:stale2".into()];
        info.sign(&sk, DEFAULT_STORE_DIR);
        info.sign(&other, DEFAULT_STORE_DIR);
        assert_eq!(info.sigs.len(), 3);
        assert_eq!(info.sigs[1], "keep:x");
        assert!(info.verify(&sk.verifying_key(), DEFAULT_STORE_DIR));
        assert!(info.verify(&other.verifying_key(), DEFAULT_STORE_DIR));
        info.sign(&sk, DEFAULT_STORE_DIR);
        assert_eq!(info.sigs.len(), 3);
        let unknown = SigningKey::generate("test-key-1").unwrap();
        assert!(!info.verify(&unknown.verifying_key(), DEFAULT_STORE_DIR));
    }

    #[test]
    fn optional_fields() {
        let text = format!(
            "{MINIMAL}References: wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt\n\
             Deriver: 3k9w3zz2l6k7n2v1n1kd0ac7q0n4jy8r-b.drv\nSystem: x86_64-linux\n\
             Sig: a:1\nSig: b:2\nFuture: whatever: value\nCA: \n"
        );
        let info = NarInfo::parse(&text, DEFAULT_STORE_DIR).unwrap();
        assert_eq!(info.deriver.as_ref().unwrap().name, "b.drv");
        assert_eq!(info.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(info.sigs, ["a:1", "b:2"]);
        assert_eq!(info.ca, None);
        assert_eq!(info.compression, None);
        let rendered = info.render(DEFAULT_STORE_DIR);
        assert!(rendered.ends_with(
            "NarSize: 216\nReferences: wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt\n\
             Deriver: 3k9w3zz2l6k7n2v1n1kd0ac7q0n4jy8r-b.drv\nSystem: x86_64-linux\n\
             Sig: a:1\nSig: b:2\n"
        ));
        assert_eq!(NarInfo::parse(&rendered, DEFAULT_STORE_DIR).unwrap(), info);

        let unknown = format!("{MINIMAL}Deriver: unknown-deriver\nReferences:\n");
        let info = NarInfo::parse(&unknown, DEFAULT_STORE_DIR).unwrap();
        assert_eq!(info.deriver, None);
        assert!(info.references.is_empty());
        // No final newline, and a custom store dir.
        let custom = MINIMAL.replace("/nix/store", "/tmp/st");
        let info = NarInfo::parse(custom.trim_end(), "/tmp/st").unwrap();
        assert_eq!(info.render("/tmp/st"), format!("{custom}References: \n"));
    }

    fn parse_err(text: &str) -> String {
        let err = NarInfo::parse(text, DEFAULT_STORE_DIR).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{text}");
        err.message().to_string()
    }

    #[test]
    fn rejects_missing_and_duplicate_fields() {
        for (key, name) in [
            ("StorePath:", "StorePath"),
            ("URL:", "URL"),
            ("NarHash:", "NarHash"),
            ("NarSize:", "NarSize"),
        ] {
            let text: String =
                MINIMAL.lines().filter(|l| !l.starts_with(key)).map(|l| format!("{l}\n")).collect();
            assert!(parse_err(&text).contains(&format!("no {name} field")));
        }
        for line in [
            "StorePath: /nix/store/kznx6z0g1warfx4z4ahb5n062jmx5qqs-b.txt",
            "URL: nar/y",
            "NarSize: 216",
            "NarHash: sha256:1g6syx5pq5fhbix3j0ymn6dyxsipm4lj7ql0vxcs87a2aibkwy3x",
            "Compression: xz\nCompression: xz",
            "References: \nReferences: ",
            "Deriver: unknown-deriver\nDeriver: unknown-deriver",
            "CA: \nCA: ",
        ] {
            let msg = parse_err(&format!("{MINIMAL}{line}\n"));
            assert!(msg.contains("duplicate"), "{msg}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        let h = "wzflyq5q9kjg4p27yck2nnispnblxsnh";
        for line in [
            "NoColonHere",
            "URL:nar/x",
            format!("References: {h}-a/b").as_str(),
            format!("References: {h}-..").as_str(),
            "References: short-a",
            "Deriver: ",
            "Deriver: /nix/store/3k9w3zz2l6k7n2v1n1kd0ac7q0n4jy8r-b.drv",
            "FileSize: -1",
            "FileSize: +1",
            "FileSize: 1e3",
            "FileSize: 99999999999999999999999",
            "FileHash: sha256:abc",
            "FileHash: md5:00000000000000000000000000000000",
            "Sig: ",
        ] {
            parse_err(&format!("{MINIMAL}{line}\n"));
        }
        for (from, to) in [
            ("/nix/store/kznx", "/nix/stor/kznx"),
            ("-b.txt", "-b.txt/bin"),
            ("-b.txt", "-../x"),
            ("NarSize: 216", "NarSize: 0"),
            ("NarSize: 216", "NarSize: "),
            ("URL: nar/x.nar", "URL: "),
            ("NarHash: sha256:1", "NarHash: sha256:e"),
        ] {
            assert_ne!(MINIMAL.replace(from, to), MINIMAL);
            parse_err(&MINIMAL.replace(from, to));
        }
        assert!(parse_err(&format!("{MINIMAL}FileSize: x\n")).contains("line 5"));
        parse_err("");
        parse_err("\u{0}\u{ff}");
    }

    #[test]
    fn enforces_limits() {
        let big = format!("{MINIMAL}X-Padding: {}\n", "a".repeat(1 << 20));
        assert!(parse_err(&big).contains("limit"));

        let one = " wzflyq5q9kjg4p27yck2nnispnblxsnh-a";
        let ok = format!("{MINIMAL}References:{}\n", one.repeat(10_000));
        assert_eq!(NarInfo::parse(&ok, DEFAULT_STORE_DIR).unwrap().references.len(), 10_000);
        let many = format!("{MINIMAL}References:{}\n", one.repeat(10_001));
        assert!(parse_err(&many).contains("10001 references"));
    }
}
