//! Attic's server (atticd, built from its repository by `scripts/attic.sh`) as a reference
//! measured in the same run: SQLite and local storage, the chunking flywheel uses (Attic's
//! defaults), zstd at Attic's default level.

use super::*;

/// Where `scripts/attic.sh` installs atticd and atticadm.
fn prefix() -> PathBuf {
    std::env::var_os("ATTIC_PREFIX").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/flywheel/attic"))
}

/// A running atticd with a cache named `bench` and a token for it.
pub(crate) struct Attic {
    child: std::process::Child,
    pub(crate) url: String,
    pub(crate) token: String,
    _dir: tempfile::TempDir,
}

impl Attic {
    /// Whether atticd was built; when not, the benchmark says so and uses the other references.
    pub(crate) fn available() -> bool {
        prefix().join("bin/atticd").exists() && prefix().join("bin/atticadm").exists()
    }

    /// Starts atticd on fresh storage and creates the cache.
    pub(crate) fn start() -> Attic {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, rand::random::<[u8; 32]>());
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\n\
                 [database]\nurl = \"sqlite://{d}/server.db?mode=rwc\"\n\
                 [storage]\ntype = \"local\"\npath = \"{d}/storage\"\n\
                 [chunking]\nnar-size-threshold = 65536\nmin-size = 16384\navg-size = 65536\nmax-size = 262144\n\
                 [compression]\ntype = \"zstd\"\n\
                 [garbage-collection]\ninterval = \"0 seconds\"\n\
                 [jwt]\n[jwt.signing]\ntoken-hs256-secret-base64 = \"{secret}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let out = Command::new(prefix().join("bin/atticadm"))
            .arg("-f")
            .arg(&config)
            .args(["make-token", "--sub", "bench", "--validity", "1d", "--pull", "*", "--push", "*", "--create-cache", "*"])
            .output()
            .expect("atticadm");
        assert!(out.status.success(), "atticadm make-token: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let log = std::fs::File::create(dir.path().join("atticd.log")).unwrap();
        let mut child = Command::new(prefix().join("bin/atticd"))
            .arg("-f")
            .arg(&config)
            .args(["--mode", "monolithic"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("atticd");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("atticd exited ({status}): {}", std::fs::read_to_string(dir.path().join("atticd.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "atticd did not listen");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let attic = Attic { child, url, token, _dir: dir };
        let created = Command::new("curl")
            .args(["-sf", "-X", "POST", "-H", &format!("Authorization: Bearer {}", attic.token), "-H", "Content-Type: application/json"])
            .args(["-d", r#"{"keypair":"Generate","is_public":false,"store_dir":"/nix/store","priority":41,"upstream_cache_key_names":[]}"#])
            .arg(format!("{}/_api/v1/cache-config/bench", attic.url))
            .status()
            .unwrap();
        assert!(created.success(), "creating Attic's cache failed");
        attic
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// The NAR URL the narinfo of the path `hash` names.
    pub(crate) fn nar_url(&self, hash: &str) -> String {
        let out = Command::new("curl")
            .args(["-sf", "-H", &format!("Authorization: Bearer {}", self.token)])
            .arg(format!("{}/bench/{hash}.narinfo", self.url))
            .output()
            .unwrap();
        assert!(out.status.success(), "Attic's narinfo");
        let text = String::from_utf8(out.stdout).unwrap();
        let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).expect("narinfo without URL");
        format!("{}/bench/{url}", self.url)
    }
}

impl Drop for Attic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
