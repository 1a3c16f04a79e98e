//! Version 1: Attic's API (`/_api/v1/...`) and flywheel's chunk API (`/_flywheel/v1/...`).
//!
//! One file per endpoint, each headed by its route.

/// Declares a wire struct that carries a store path's narinfo fields ([`chunks::PathManifest`],
/// [`chunks::CommitRequest`] and Attic's [`upload_path::UploadPathNarInfo`]), so that those fields
/// are written once. The struct's own attributes (its serde naming: Attic's names are snake_case,
/// ours camelCase) and its other fields follow the shared ones.
///
/// A macro rather than one struct put in with `#[serde(flatten)]`: flatten makes serde buffer the
/// whole object before parsing it (a manifest or chunk list runs to tens of thousands of entries),
/// does not work with `deny_unknown_fields`, and would leave a nested field in the Rust types.
macro_rules! with_path_info_fields {
    ($(#[$attr:meta])* pub struct $name:ident { $($rest:tt)* }) => {
        $(#[$attr])*
        pub struct $name {
            /// Full store path.
            pub store_path: String,
            /// References: full store paths; uploads may give base names.
            pub references: Vec<String>,
            /// Deriver, full store path (uploads may give a base name); absent, empty or
            /// `unknown-deriver` for none.
            #[serde(default)]
            pub deriver: Option<String>,
            /// Signatures (`name:base64`): the uploader's, kept with the path; the server adds
            /// its own when it serves.
            #[serde(default)]
            pub sigs: Vec<String>,
            /// Content address (`text:...` or `fixed:...`), absent or empty for an
            /// input-addressed path.
            #[serde(default)]
            pub ca: Option<String>,
            $($rest)*
        }
    };
}

pub mod cache_config;
pub mod chunk_bodies;
pub mod chunks;
pub mod error;
pub mod get_missing_paths;
pub mod traces;
pub mod upload_path;

pub use error::ErrorBody;

/// Checks a cache name the way Attic does: a letter or digit, then up to 49 of letters,
/// digits, `-`, `_` and `+`.
pub fn validate_cache_name(name: &str) -> crate::Result<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'));
    if first_ok && rest_ok && name.len() <= 50 {
        Ok(())
    } else {
        Err(crate::Error::invalid(format!(
            "invalid cache name {name:?}: use 1 to 50 letters, digits, '-', '_' or '+', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_names() {
        for good in ["main", "a", "ci-cache_2+x", &"a".repeat(50)] {
            assert!(super::validate_cache_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a/b", "a.b", "..", &"a".repeat(51), "a b"] {
            assert!(super::validate_cache_name(bad).is_err(), "{bad}");
        }
    }
}
