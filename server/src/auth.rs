//! Attic-compatible JWT tokens: HS256, with per-cache-pattern permissions under the claim
//! `https://jwt.attic.rs/v1`.
//!
//! A token arrives as `Authorization: Bearer <jwt>`, or as the password of Basic auth, which is
//! how Nix sends netrc credentials. Unlike Attic, a token that fails to verify is refused with
//! 401 and a reason, rather than silently treated as no token: on a CI runner an expired token
//! should say so, not look like a cache miss.

use base64::Engine;
use flywheel_core::{Error, ErrorKind, Result};
use indexmap::IndexMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claim that holds Attic's permissions.
pub const ATTIC_CLAIM: &str = "https://jwt.attic.rs/v1";

/// Longest token accepted.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Permission bits for caches matching one pattern (Attic's short names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Pull.
    #[serde(rename = "r", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub pull: bool,
    /// Push.
    #[serde(rename = "w", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub push: bool,
    /// Delete paths.
    #[serde(rename = "d", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub delete: bool,
    /// Create caches.
    #[serde(rename = "cc", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub create_cache: bool,
    /// Change cache settings.
    #[serde(rename = "cr", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub configure_cache: bool,
    /// Change retention.
    #[serde(rename = "cq", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub configure_cache_retention: bool,
    /// Destroy caches.
    #[serde(rename = "cd", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub destroy_cache: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

mod bool_int {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(u8::from(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntOrBool {
            Int(u8),
            Bool(bool),
        }
        Ok(match IntOrBool::deserialize(d)? {
            IntOrBool::Int(i) => i != 0,
            IntOrBool::Bool(b) => b,
        })
    }
}

impl Permissions {
    /// Whether any bit is set, which lets the holder learn that the cache exists.
    pub fn can_discover(&self) -> bool {
        self.pull
            || self.push
            || self.delete
            || self.create_cache
            || self.configure_cache
            || self.configure_cache_retention
            || self.destroy_cache
    }

    /// Every bit set.
    pub fn all() -> Self {
        Permissions {
            pull: true,
            push: true,
            delete: true,
            create_cache: true,
            configure_cache: true,
            configure_cache_retention: true,
            destroy_cache: true,
        }
    }
}

/// Attic's claim: permissions by cache-name pattern, in the order the token lists them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AtticClaim {
    /// Pattern (`*` matches any run of characters) to permissions.
    pub caches: IndexMap<String, Permissions>,
}

impl AtticClaim {
    /// Grants what `set` turns on to caches matching `pattern`, after checking the pattern: a
    /// cache name's characters, plus `*`. A pattern named again keeps its first place.
    pub fn grant(&mut self, pattern: &str, set: impl Fn(&mut Permissions)) -> Result<()> {
        validate_cache_pattern(pattern)?;
        set(self.caches.entry(pattern.to_string()).or_default());
        Ok(())
    }
}

/// Checks a cache pattern of a token: 1 to 50 letters, digits, `-`, `_`, `+` and `*`.
pub fn validate_cache_pattern(pattern: &str) -> Result<()> {
    let ok = !pattern.is_empty()
        && pattern.len() <= 50
        && pattern.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '*'));
    if !ok {
        return Err(Error::invalid(format!("invalid cache pattern {pattern:?}: letters, digits, '-', '_', '+' and '*' only")));
    }
    Ok(())
}

/// The claim that holds OpenTofu/Terraform state permissions: flywheel's own, which Attic
/// ignores (its tokens and ours stay interchangeable for the caches).
pub const STATE_CLAIM: &str = "https://jwt.flywheel.dev/tfstate/v1";

/// Permission bits for the state of stacks matching one pattern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePermissions {
    /// Read the state and its versions.
    #[serde(rename = "r", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub read: bool,
    /// Write, delete and roll back the state.
    #[serde(rename = "w", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub write: bool,
    /// Take and release the lock, and break another holder's (`force-unlock`).
    #[serde(rename = "l", default, with = "bool_int", skip_serializing_if = "is_false")]
    pub lock: bool,
}

impl StatePermissions {
    /// Whether any bit is set.
    pub fn any(&self) -> bool {
        self.read || self.write || self.lock
    }
}

/// State permissions by stack pattern (`project/stack`, `*` matching any run of characters,
/// `/` included), in the order the token lists them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateClaim {
    /// Pattern to permissions.
    pub stacks: IndexMap<String, StatePermissions>,
}

impl StateClaim {
    /// Whether it grants nothing (and is left out of the token).
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }

    /// Grants what `set` turns on to stacks matching `pattern`, after checking the pattern.
    pub fn grant(&mut self, pattern: &str, set: impl Fn(&mut StatePermissions)) -> Result<()> {
        let ok = !pattern.is_empty()
            && pattern.len() <= 257
            && pattern.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '*'));
        if !ok {
            return Err(Error::invalid(format!(
                "invalid stack pattern {pattern:?}: project/stack of letters, digits, '-', '_', '.' and '*'"
            )));
        }
        set(self.stacks.entry(pattern.to_string()).or_default());
        Ok(())
    }
}

/// The claims of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not valid before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The permissions.
    #[serde(rename = "https://jwt.attic.rs/v1")]
    pub attic: AtticClaim,
    /// State permissions, if any.
    #[serde(rename = "https://jwt.flywheel.dev/tfstate/v1", default, skip_serializing_if = "StateClaim::is_empty")]
    pub tfstate: StateClaim,
}

impl Claims {
    /// The permissions for `cache`: an exact pattern wins, else the first pattern that matches.
    pub fn permissions_for(&self, cache: &str) -> Permissions {
        by_pattern(&self.attic.caches, cache)
    }

    /// The state permissions for `stack` (`project/stack`): an exact pattern wins, else the
    /// first pattern that matches.
    pub fn state_permissions_for(&self, stack: &str) -> StatePermissions {
        by_pattern(&self.tfstate.stacks, stack)
    }
}

/// The permissions `grants` gives `name`: an exact pattern wins, else the first pattern that
/// matches, else none.
fn by_pattern<P: Copy + Default>(grants: &IndexMap<String, P>, name: &str) -> P {
    if let Some(perms) = grants.get(name) {
        return *perms;
    }
    grants
        .iter()
        .find(|(pattern, _)| wildcard_match(pattern.as_bytes(), name.as_bytes()))
        .map(|(_, perms)| *perms)
        .unwrap_or_default()
}

/// `*` matches any run of bytes, including none; everything else matches itself.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((bp, bt)) = backtrack {
            p = bp + 1;
            t = bt + 1;
            backtrack = Some((bp, bt + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Signs and verifies tokens with the server's HS256 secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuthority(..)")
    }
}

impl TokenAuthority {
    /// From the base64 secret of the config.
    pub fn from_base64(secret_base64: &str) -> Result<Self> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret_base64.trim())
            .map_err(|err| Error::invalid(format!("token-hs256-secret-base64 is not valid base64: {err}")))?;
        if secret.len() < 32 {
            return Err(Error::invalid("token-hs256-secret-base64 must hold at least 32 bytes"));
        }
        Ok(TokenAuthority { encoding: EncodingKey::from_secret(&secret), decoding: DecodingKey::from_secret(&secret) })
    }

    /// A fresh random secret, base64-encoded.
    pub fn generate_secret() -> String {
        let mut secret = [0u8; 48];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
        base64::engine::general_purpose::STANDARD.encode(secret)
    }

    /// Signs claims into a token.
    pub fn mint(&self, claims: &Claims) -> Result<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|err| Error::internal(format!("signing token: {err}")))
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::new(ErrorKind::Unauthorized, "token is too long"));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.leeway = 0;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|err| Error::new(ErrorKind::Unauthorized, format!("token rejected: {err}")))
    }

    /// Reads the token of a request from its `Authorization` header value, if any.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<Claims>> {
        let Some(value) = authorization else { return Ok(None) };
        let value = std::str::from_utf8(value)
            .map_err(|_| Error::new(ErrorKind::Unauthorized, "Authorization header is not text"))?;
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let token = if scheme.eq_ignore_ascii_case("bearer") {
            rest.trim().to_string()
        } else if scheme.eq_ignore_ascii_case("basic") {
            // Bazel encodes the credentials of a cache URL with the URL-safe alphabet; other
            // clients with the standard one.
            let encoded = rest.trim();
            let decoded = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ]
            .iter()
            .find_map(|engine| engine.decode(encoded).ok())
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, "Basic credentials are not valid base64"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| Error::new(ErrorKind::Unauthorized, "Basic credentials are not text"))?;
            // The user name is ignored: the password is the token.
            match text.split_once(':') {
                Some((_, password)) => password.to_string(),
                None => return Err(Error::new(ErrorKind::Unauthorized, "Basic credentials lack a password")),
            }
        } else {
            return Err(Error::new(ErrorKind::Unauthorized, format!("unsupported authorization scheme {scheme:?}")));
        };
        if token.is_empty() {
            return Ok(None);
        }
        self.verify(&token).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> TokenAuthority {
        TokenAuthority::from_base64(&TokenAuthority::generate_secret()).unwrap()
    }

    fn claims(caches: &[(&str, Permissions)], exp: u64) -> Claims {
        Claims {
            sub: "ci".into(),
            exp,
            nbf: None,
            attic: AtticClaim { caches: caches.iter().map(|(p, perms)| (p.to_string(), *perms)).collect() },
            tfstate: StateClaim::default(),
        }
    }

    #[test]
    fn grants_check_patterns_and_keep_their_order() {
        let mut claim = AtticClaim::default();
        claim.grant("ci-*", |p| p.pull = true).unwrap();
        claim.grant("main", |p| p.push = true).unwrap();
        claim.grant("ci-*", |p| p.push = true).unwrap();
        let order: Vec<(&str, Permissions)> = claim.caches.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            order,
            [("ci-*", Permissions { pull: true, push: true, ..Default::default() }), ("main", Permissions { push: true, ..Default::default() })]
        );
        for bad in ["", "a/b", "a b", &"a".repeat(51)] {
            assert!(claim.grant(bad, |p| p.pull = true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b"anything"));
        assert!(wildcard_match(b"ci-*", b"ci-main"));
        assert!(wildcard_match(b"ci-*-x", b"ci-a-b-x"));
        assert!(!wildcard_match(b"ci-*", b"main"));
        assert!(!wildcard_match(b"main", b"main2"));
        assert!(wildcard_match(b"m*n", b"mn"));
    }

    #[test]
    fn mint_verify_and_permissions() {
        let auth = authority();
        let pull = Permissions { pull: true, ..Default::default() };
        let token = auth
            .mint(&claims(&[("other", Permissions::all()), ("ci-*", pull), ("*", Permissions::all())], 4_000_000_000))
            .unwrap();
        let c = auth.verify(&token).unwrap();
        assert_eq!(c.permissions_for("other"), Permissions::all());
        // First matching pattern wins, even if a later one grants more.
        assert_eq!(c.permissions_for("ci-main"), pull);
        assert_eq!(c.permissions_for("x"), Permissions::all());
        // The raw claim uses Attic's integer bits.
        let payload = token.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value[ATTIC_CLAIM]["caches"]["ci-*"]["r"], 1);
    }

    #[test]
    fn state_permissions_by_stack() {
        let auth = authority();
        let mut c = claims(&[("*", Permissions::all())], 4_000_000_000);
        let all = |p: &mut StatePermissions| {
            p.read = true;
            p.write = true;
            p.lock = true;
        };
        c.tfstate.grant("infra/prod", |p| p.read = true).unwrap();
        c.tfstate.grant("infra/*", all).unwrap();
        assert!(c.tfstate.grant("infra prod", all).is_err());
        let c = auth.verify(&auth.mint(&c).unwrap()).unwrap();
        assert_eq!(c.state_permissions_for("infra/prod"), StatePermissions { read: true, ..Default::default() });
        assert!(c.state_permissions_for("infra/dev").lock);
        assert!(!c.state_permissions_for("apps/prod").any());
        // A token without state grants has no state claim at all, as Attic's tokens.
        let plain = auth.mint(&claims(&[("*", Permissions::all())], 4_000_000_000)).unwrap();
        assert!(!auth.verify(&plain).unwrap().state_permissions_for("infra/prod").any());
        let payload = plain.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap();
        assert!(!String::from_utf8(json).unwrap().contains(STATE_CLAIM));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let auth = authority();
        let expired = auth.mint(&claims(&[("*", Permissions::all())], 1000)).unwrap();
        assert_eq!(auth.verify(&expired).unwrap_err().kind(), ErrorKind::Unauthorized);
        let foreign = authority().mint(&claims(&[("*", Permissions::all())], 4_000_000_000)).unwrap();
        assert_eq!(auth.verify(&foreign).unwrap_err().kind(), ErrorKind::Unauthorized);
        assert!(auth.verify("garbage").is_err());
        assert!(auth.authenticate(Some(b"Digest abc")).is_err());
        assert!(auth.authenticate(Some(b"Basic !!!")).is_err());
        assert!(auth.authenticate(None).unwrap().is_none());
        let good = auth.mint(&claims(&[("*", Permissions::all())], 4_000_000_000)).unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{good}"));
        assert!(auth.authenticate(Some(format!("Basic {basic}").as_bytes())).unwrap().is_some());
        assert!(auth.authenticate(Some(format!("bearer {good}").as_bytes())).unwrap().is_some());
    }
}
