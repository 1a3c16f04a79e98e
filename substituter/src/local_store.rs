//! The local Nix store, read through Nix's own tools: closures, path metadata from the Nix
//! database, a derivation's outputs, and where a path's files are on disk.

use std::path::PathBuf;

use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, ErrorKind, Result};
use serde::Deserialize;

/// A path's metadata as the local Nix database holds it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalPathInfo {
    /// Full store path.
    pub path: String,
    /// `sha256:...` of the NAR.
    pub nar_hash: String,
    /// NAR size.
    pub nar_size: u64,
    /// References, full store paths.
    #[serde(default)]
    pub references: Vec<String>,
    /// Deriver, full store path.
    #[serde(default)]
    pub deriver: Option<String>,
    /// Signatures.
    #[serde(default)]
    pub signatures: Vec<String>,
    /// Content address.
    #[serde(default)]
    pub ca: Option<String>,
}

/// Parses what `nix path-info --json` prints. Nix up to 2.18 prints an array of objects that name
/// their `path`; Nix 2.19 and later print an object keyed by path, with `null` for an invalid
/// path. Hashes come out as `sha256:<nixbase32>` either way, the form narinfo files and the
/// server use.
pub fn parse_path_infos(text: &str) -> Result<Vec<LocalPathInfo>> {
    let unexpected = |e: &dyn std::fmt::Display| Error::corrupt(format!("`nix path-info --json` printed unexpected JSON: {e}"));
    let parsed: serde_json::Value = serde_json::from_str(text).map_err(|e| unexpected(&e))?;
    let entries: Vec<(Option<String>, serde_json::Value)> = match parsed {
        serde_json::Value::Array(values) => values.into_iter().map(|v| (None, v)).collect(),
        serde_json::Value::Object(by_path) => by_path.into_iter().map(|(path, v)| (Some(path), v)).collect(),
        other => return Err(unexpected(&format!("neither an array nor an object: {other}"))),
    };
    let mut infos = Vec::with_capacity(entries.len());
    for (key, mut value) in entries {
        let named = key.clone().or_else(|| value.get("path").and_then(|p| p.as_str()).map(str::to_string));
        if value.is_null() || value.get("valid").and_then(|v| v.as_bool()) == Some(false) {
            return Err(Error::not_found(format!("{} is not valid in the local store", named.as_deref().unwrap_or("?"))));
        }
        if let (Some(path), Some(object)) = (key, value.as_object_mut()) {
            object.entry("path").or_insert(serde_json::Value::String(path));
        }
        let mut info: LocalPathInfo = serde_json::from_value(value).map_err(|e| unexpected(&e))?;
        info.nar_hash = Sha256Hash::parse(&info.nar_hash)?.to_nix_base32();
        infos.push(info);
    }
    Ok(infos)
}

/// A local Nix store: the default one, or a chroot store (`local?root=DIR`, or just `DIR`).
#[derive(Debug, Clone)]
pub struct LocalStore {
    store: Option<String>,
    root: PathBuf,
}

impl LocalStore {
    /// The store Nix would use by default (`None`), or the one named by a `--store` URL. Only
    /// local stores are supported: their files are read directly.
    pub fn new(store: Option<String>) -> Result<Self> {
        let root = match store.as_deref() {
            None | Some("auto") | Some("local") | Some("daemon") => PathBuf::new(),
            Some(url) if url.starts_with('/') => PathBuf::from(url),
            Some(url) => {
                let query = url
                    .strip_prefix("local?")
                    .ok_or_else(|| Error::invalid(format!("store {url:?}: only local stores (local?root=DIR or DIR) can be pushed from")))?;
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("root="))
                    .map(PathBuf::from)
                    .unwrap_or_default()
            }
        };
        Ok(LocalStore { store, root })
    }

    /// Where the files of `path` (a logical store path) are on disk.
    pub fn physical(&self, path: &str) -> PathBuf {
        if self.root.as_os_str().is_empty() {
            PathBuf::from(path)
        } else {
            PathBuf::from(format!("{}{path}", self.root.display()))
        }
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        if let Some(store) = &self.store {
            cmd.args(["--store", store]);
        }
        cmd.kill_on_drop(true);
        cmd
    }

    async fn run(&self, mut cmd: tokio::process::Command, what: &str) -> Result<String> {
        let out = cmd.output().await.map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::Unavailable } else { ErrorKind::Internal };
            Error::new(kind, format!("{what}: cannot run Nix ({e}); is Nix installed and on PATH?"))
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let message = stderr.trim().lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            let message = message.strip_prefix("error: ").unwrap_or(&message).to_string();
            let kind = if message.contains("is not valid") || message.contains("does not exist") || message.contains("not in the Nix store")
            {
                ErrorKind::NotFound
            } else {
                ErrorKind::InvalidInput
            };
            return Err(Error::new(kind, format!("{what}: {message}")));
        }
        String::from_utf8(out.stdout).map_err(|_| Error::corrupt(format!("{what}: Nix printed something that is not UTF-8")))
    }

    /// The closure of `paths` (each a store path or a symlink to one), dependencies first.
    pub async fn closure(&self, paths: &[String]) -> Result<Vec<String>> {
        let mut cmd = self.command("nix-store");
        cmd.args(["--query", "--requisites"]).args(paths);
        Ok(self.run(cmd, "computing the closure").await?.lines().map(str::to_string).collect())
    }

    /// Metadata of `paths` from the Nix database. A path that is not valid in the store is an
    /// error of kind [`ErrorKind::NotFound`].
    pub async fn path_infos(&self, paths: &[String]) -> Result<Vec<LocalPathInfo>> {
        let mut infos = Vec::with_capacity(paths.len());
        // Stay well below the argument-length limit.
        for batch in paths.chunks(2000) {
            let mut cmd = self.command("nix");
            cmd.args(["--extra-experimental-features", "nix-command", "path-info", "--json"]).args(batch);
            let text = self.run(cmd, "reading path metadata from the Nix database").await?;
            infos.extend(parse_path_infos(&text)?);
        }
        Ok(infos)
    }

    /// The output paths of a derivation (what a post-build hook needs on Nix 2.8, whose
    /// `OUT_PATHS` is empty).
    pub async fn outputs_of(&self, drv: &str) -> Result<Vec<String>> {
        let mut cmd = self.command("nix-store");
        cmd.args(["--query", "--outputs", drv]);
        Ok(self.run(cmd, "querying the outputs of a derivation").await?.lines().map(str::to_string).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Nix 2.8 printed for a built path and an unknown one.
    const NIX_2_8_VALID: &str = r#"[{"path":"/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"deriver":"/nix/store/mh3rz2qzm0lrcxk22g2b1kifak7q2nj9-x.drv","registrationTime":1796217945,"ultimate":true}]"#;
    const NIX_2_8_INVALID: &str = r#"[{"path":"/nix/store/00000000000000000000000000000000-y","valid":false}]"#;

    #[test]
    fn path_infos_of_nix_2_8() {
        let infos = parse_path_infos(NIX_2_8_VALID).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].path, "/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x");
        assert_eq!(infos[0].nar_hash, Sha256Hash::parse("sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=").unwrap().to_nix_base32());
        assert!(infos[0].nar_hash.starts_with("sha256:") && infos[0].nar_hash.len() == 59);
        assert_eq!(parse_path_infos(NIX_2_8_INVALID).unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn path_infos_keyed_by_path() {
        let text = r#"{"/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x":{"ca":null,"deriver":null,"narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":["/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x"],"signatures":["k-1:c2ln"],"ultimate":true}}"#;
        let infos = parse_path_infos(text).unwrap();
        assert_eq!(infos[0].path, "/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x");
        assert_eq!(infos[0].references, vec![infos[0].path.clone()]);
        assert_eq!(infos[0].signatures, vec!["k-1:c2ln".to_string()]);
        let invalid = r#"{"/nix/store/00000000000000000000000000000000-y":null}"#;
        let err = parse_path_infos(invalid).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("00000000000000000000000000000000-y"), "{err}");
        assert!(parse_path_infos("3").is_err());
        assert!(parse_path_infos(r#"[{"path":"/nix/store/x","narHash":"md5:x","narSize":1}]"#).is_err());
    }

    #[test]
    fn store_urls() {
        assert_eq!(LocalStore::new(None).unwrap().physical("/nix/store/x"), PathBuf::from("/nix/store/x"));
        let chroot = LocalStore::new(Some("local?root=/tmp/r".into())).unwrap();
        assert_eq!(chroot.physical("/nix/store/x"), PathBuf::from("/tmp/r/nix/store/x"));
        assert_eq!(LocalStore::new(Some("/tmp/r".into())).unwrap().physical("/nix/store/x"), PathBuf::from("/tmp/r/nix/store/x"));
        assert!(LocalStore::new(Some("s3://bucket".into())).is_err());
    }
}
