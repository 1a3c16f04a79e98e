//! What every section uses: timing, medians, the report, reference servers, file walks and
//! link shaping.

use super::*;

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Wall time of a command, failing the benchmark if it fails.
pub(crate) fn time_cmd(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed().as_secs_f64()
}

/// `curl` downloading `url` to /dev/null; returns (seconds, bytes).
pub(crate) fn curl_get(url: &str, token: Option<&str>) -> (f64, u64) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "curl {url} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut parts = text.split_whitespace();
    (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap())
}

pub(crate) struct Report {
    pub(crate) header: String,
    /// Where each section says it was measured.
    pub(crate) stamp: String,
    /// (title, text) of each section, in the order measured.
    pub(crate) sections: Vec<(String, String)>,
}

impl Report {
    pub(crate) fn section(&mut self, title: &str, intro: &str) {
        let mut text = format!("\n## {title}\n\n{intro} {}\n\n", self.stamp);
        text.push_str("| figure | flywheel | reference | ratio | target |\n|---|---|---|---|---|\n");
        self.sections.push((title.to_string(), text));
    }

    pub(crate) fn row(&mut self, figure: &str, ours: String, reference: String, ratio: String, target: &str) {
        let (_, text) = self.sections.last_mut().expect("a row belongs to a section");
        let _ = writeln!(text, "| {figure} | {ours} | {reference} | {ratio} | {target} |");
    }

    /// The whole file. A run of some sections only keeps the other sections of `previous`
    /// (an earlier BENCHMARKS.md) as they were, each naming the run it came from.
    pub(crate) fn render(&self, previous: Option<&str>) -> String {
        let mut sections: Vec<(String, String)> = previous.map(split_sections).unwrap_or_default();
        for (title, text) in &self.sections {
            match sections.iter_mut().find(|(t, _)| t == title) {
                Some(old) => old.1 = text.clone(),
                None => sections.push((title.clone(), text.clone())),
            }
        }
        let mut out = self.header.clone();
        for (_, text) in sections {
            out.push_str(&text);
        }
        out
    }
}

/// The `## ` sections of a BENCHMARKS.md, as (title, text from the blank line before it).
pub(crate) fn split_sections(text: &str) -> Vec<(String, String)> {
    text.split("\n## ")
        .skip(1)
        .map(|part| {
            let title = part.lines().next().unwrap_or("").to_string();
            let body = format!("\n## {}\n", part.trim_end_matches('\n'));
            (title, body)
        })
        .collect()
}

pub(crate) fn nar_of_sysroot_lib(dir: &Path) -> PathBuf {
    nar_of_sysroot(dir, "lib")
}

/// The NAR of `sub` below the Rust toolchain's sysroot, written into `dir`.
pub(crate) fn nar_of_sysroot(dir: &Path, sub: &str) -> PathBuf {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let lib = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join(sub);
    let nar = dir.join(format!("{}.nar", sub.replace('/', "-")));
    let file = std::fs::File::create(&nar).unwrap();
    let status = Command::new("nix-store").arg("--dump").arg(&lib).stdout(file).status().unwrap();
    assert!(status.success());
    nar
}

/// A static file server (nginx) over `root` on a free port; the reference "plain static binary
/// cache from disk".
pub(crate) struct Nginx {
    pub(crate) child: std::process::Child,
    pub(crate) port: u16,
}

impl Nginx {
    pub(crate) fn start(root: &Path, work: &Path) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = work.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root; daemon off; worker_processes 2; pid {w}/nginx.pid; error_log {w}/nginx.err;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{ access_log off; sendfile on; tcp_nopush on;\n\
                   client_body_temp_path {w}; proxy_temp_path {w}; fastcgi_temp_path {w}; uwsgi_temp_path {w}; scgi_temp_path {w};\n\
                   server {{ listen 127.0.0.1:{port}; root {r}; }} }}\n",
                w = work.display(),
                r = root.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("nginx").arg("-c").arg(&conf).arg("-p").arg(work).spawn().expect("nginx");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Nginx { child, port };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("nginx did not start");
    }
}

/// s3s-fs over `root` (each directory a bucket) with no credentials, so that `curl` can GET
/// its objects: the S3 server's own speed, as a reference for the server on S3.
pub(crate) struct S3sFs {
    _child: common::KillOnDrop,
    pub(crate) url: String,
}

impl S3sFs {
    pub(crate) fn start(root: &Path) -> S3sFs {
        let port = common::free_port();
        let child = Command::new(common::require_tool("s3s-fs"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let child = common::KillOnDrop(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return S3sFs { _child: child, url: format!("http://127.0.0.1:{port}") };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("s3s-fs did not start");
    }
}

/// Seconds to fetch `url` (`len` bytes) as `parts` ranged GETs sent at once.
pub(crate) fn ranged_gets_at_once(url: &str, len: u64, parts: u64) -> f64 {
    let part = len.div_ceil(parts);
    let start = Instant::now();
    let children: Vec<_> = (0..parts)
        .map(|i| {
            let range = format!("{}-{}", i * part, ((i + 1) * part).min(len) - 1);
            Command::new("curl").args(["-sf", "-o", "/dev/null", "-r", &range, url]).spawn().unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "ranged GET of {url} failed");
    }
    start.elapsed().as_secs_f64()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master then stops its workers too.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}


/// A ratio with two significant digits (at least two decimals): a GET encoded on the fly can
/// be hundreds of times slower than nginx, which `{:.2}` would print as 0.00.
pub(crate) fn ratio(x: f64) -> String {
    let decimals = if x > 0.0 { (1 - x.log10().floor() as i64).max(2) } else { 2 };
    format!("{x:.*}x", decimals as usize)
}

/// Wall time of a command whose stdout goes to `out`, failing the benchmark if it fails.
pub(crate) fn time_to_file(cmd: &mut Command, out: &Path) -> f64 {
    let file = std::fs::File::create(out).unwrap();
    let start = Instant::now();
    let status = cmd.stdout(file).status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed().as_secs_f64()
}

/// CPU seconds (user plus system) a process has used so far.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The nixbase32 SHA-256 of a file, as Nix names the NAR files it uploads.
pub(crate) fn file_hash(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    flywheel_core::nix::Sha256Hash::parse(&format!("sha256:{hex}")).unwrap().to_base32_bare()
}


pub(crate) fn drop_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache needs root");
}

/// Reads every regular file below `root` (sorted walk); returns bytes read.
pub(crate) fn read_tree(root: &Path) -> u64 {
    files_below(root).iter().map(|f| read_file(f)).sum()
}

pub(crate) fn read_file(path: &Path) -> u64 {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

pub(crate) fn files_below(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

/// `find` plus `stat` of everything below `root`; returns the entry count.
pub(crate) fn walk_stat(root: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            count += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    count
}

pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed().as_secs_f64(), out)
}


/// A TCP proxy that limits the server-to-client direction to `bytes_per_sec`, shared by all
/// connections: a runner's link to the cache node, which loopback does not have.
pub(crate) struct Link {
    pub(crate) port: u16,
}

impl Link {
    pub(crate) fn start(target: &str, bytes_per_sec: f64) -> Link {
        use std::io::{Read, Write};
        let target = target.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clock = std::sync::Arc::new(parking_lot::Mutex::new(Instant::now()));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = std::net::TcpStream::connect(&target) else { continue };
                // A link adds no latency of its own: pieces go on as they come, not after
                // the peer's delayed ACK of the last one (Nagle's algorithm).
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_r, mut server_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_r, &mut server_w);
                    let _ = server_w.shutdown(std::net::Shutdown::Write);
                });
                let clock = clock.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Reserve this piece's time on the shared link, then wait for it.
                        let due = {
                            let mut next = clock.lock();
                            let start = (*next).max(Instant::now());
                            *next = start + std::time::Duration::from_secs_f64(n as f64 / bytes_per_sec);
                            *next
                        };
                        let wait = due.saturating_duration_since(Instant::now());
                        std::thread::sleep(wait);
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Link { port }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub(crate) fn upload_path(server: &Server, token: &str, nar: &Path, nar_hash_hex: &str, nar_size: u64) -> f64 {
    upload_path_to(&server.url, token, nar, nar_hash_hex, nar_size)
}

/// The same upload to any server of Attic's API (flywheel or atticd) at `base`, into `bench`.
pub(crate) fn upload_path_to(base: &str, token: &str, nar: &Path, nar_hash_hex: &str, nar_size: u64) -> f64 {
    upload_named(base, token, nar, nar_hash_hex, nar_size, &"0".repeat(32), "lib")
}

/// Uploads `nar` through `upload-path` as `/nix/store/{hash}-{name}` of cache `bench`; returns
/// the seconds it took.
pub(crate) fn upload_named(base: &str, token: &str, nar: &Path, nar_hash_hex: &str, nar_size: u64, hash: &str, name: &str) -> f64 {
    let info = serde_json::json!({
        "cache": "bench", "store_path_hash": hash, "store_path": format!("/nix/store/{hash}-{name}"),
        "references": [], "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{nar_hash_hex}"), "nar_size": nar_size,
    });
    time_cmd(
        Command::new("curl")
            .args(["-sf", "-X", "PUT", "-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", &format!("X-Attic-Nar-Info: {info}"), "-T"])
            .arg(nar)
            .arg(format!("{base}/_api/v1/upload-path")),
    )
}
