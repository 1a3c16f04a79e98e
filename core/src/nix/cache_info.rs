//! `nix-cache-info`: the first file Nix reads from a binary cache, `Key: value` lines.

use crate::{Error, Result};

/// The MIME type Nix's own binary caches answer `nix-cache-info` with.
pub const CONTENT_TYPE: &str = "text/x-nix-cache-info";

/// Longest `nix-cache-info` read from outside: the real one is three short lines.
pub const MAX_LEN: usize = 64 * 1024;

/// What a binary cache tells Nix about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixCacheInfo {
    /// The store directory the cache's paths belong to.
    pub store_dir: String,
    /// Whether Nix may ask for many narinfo files at once (flywheel always says yes).
    pub want_mass_query: bool,
    /// The substituter priority (lower is preferred); Nix's default is 50.
    pub priority: i32,
}

impl NixCacheInfo {
    /// The file as served.
    pub fn render(&self) -> String {
        format!("StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n", self.store_dir, u8::from(self.want_mass_query), self.priority)
    }

    /// Parses the file as Nix does: unknown keys are ignored, and missing ones take Nix's
    /// defaults (`/nix/store`, no mass query, priority 50). A priority that is not a number,
    /// or a file over [`MAX_LEN`], is refused.
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_LEN {
            return Err(Error::invalid(format!("nix-cache-info of {} bytes is longer than {MAX_LEN}", text.len())));
        }
        let mut info = NixCacheInfo { store_dir: super::DEFAULT_STORE_DIR.to_string(), want_mass_query: false, priority: 50 };
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match key.trim() {
                "StoreDir" => info.store_dir = value.to_string(),
                "WantMassQuery" => info.want_mass_query = value == "1",
                "Priority" => {
                    info.priority =
                        value.parse().map_err(|_| Error::invalid(format!("nix-cache-info: Priority {value:?} is not a number")))?
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_info_parses_back() {
        let info = NixCacheInfo { store_dir: "/opt/store".into(), want_mass_query: true, priority: 41 };
        assert_eq!(info.render(), "StoreDir: /opt/store\nWantMassQuery: 1\nPriority: 41\n");
        assert_eq!(NixCacheInfo::parse(&info.render()).unwrap(), info);
    }

    #[test]
    fn missing_keys_take_nix_defaults_and_bad_priorities_are_refused() {
        let info = NixCacheInfo::parse("Other: x\nno colon here\n").unwrap();
        assert_eq!(info, NixCacheInfo { store_dir: "/nix/store".into(), want_mass_query: false, priority: 50 });
        assert!(NixCacheInfo::parse("Priority: high\n").unwrap_err().message().contains("not a number"));
        assert!(NixCacheInfo::parse(&"x".repeat(MAX_LEN + 1)).is_err());
    }
}
