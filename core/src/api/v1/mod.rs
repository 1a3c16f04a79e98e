//! Version 1: Attic's API (`/_api/v1/...`) and flywheel's chunk API (`/_flywheel/v1/...`).
//!
//! One file per endpoint, each headed by its route.

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
