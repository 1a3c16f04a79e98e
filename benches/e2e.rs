//! The end-to-end benchmark: runs the real binaries on this machine and writes BENCHMARKS.md.
//! Run it with `./scripts/bench.sh` (which installs the reference tools, then runs
//! `cargo bench --bench e2e`). Every figure stands beside a reference measured in the same run;
//! each is the median of several runs, because the machine is shared and noisy.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Backend, Server};

const RUNS: usize = 3;
const MB: f64 = 1e6;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Wall time of a command, failing the benchmark if it fails.
fn time_cmd(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed().as_secs_f64()
}

/// `curl` downloading `url` to /dev/null; returns (seconds, bytes).
fn curl_get(url: &str, token: Option<&str>) -> (f64, u64) {
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

struct Report {
    out: String,
}

impl Report {
    fn section(&mut self, title: &str, intro: &str) {
        let _ = writeln!(self.out, "\n## {title}\n\n{intro}\n");
        let _ = writeln!(self.out, "| figure | flywheel | reference | ratio | target |\n|---|---|---|---|---|");
    }

    fn row(&mut self, figure: &str, ours: String, reference: String, ratio: String, target: &str) {
        let _ = writeln!(self.out, "| {figure} | {ours} | {reference} | {ratio} | {target} |");
    }
}

fn nar_of_sysroot_lib(dir: &Path) -> PathBuf {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let lib = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("lib");
    let nar = dir.join("lib.nar");
    let file = std::fs::File::create(&nar).unwrap();
    let status = Command::new("nix-store").arg("--dump").arg(&lib).stdout(file).status().unwrap();
    assert!(status.success());
    nar
}

/// A static file server (nginx) over `root` on a free port; the reference "plain static binary
/// cache from disk".
struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Nginx {
    fn start(root: &Path, work: &Path) -> Nginx {
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
        panic!("nginx did not start");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn upload_path(server: &Server, token: &str, nar: &Path, nar_hash_hex: &str, nar_size: u64) -> f64 {
    let hash = "0".repeat(32);
    let info = serde_json::json!({
        "cache": "bench", "store_path_hash": hash, "store_path": format!("/nix/store/{hash}-lib"),
        "references": [], "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{nar_hash_hex}"), "nar_size": nar_size,
    });
    time_cmd(
        Command::new("curl")
            .args(["-sf", "-X", "PUT", "-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", &format!("X-Attic-Nar-Info: {info}"), "-T"])
            .arg(nar)
            .arg(format!("{}/_api/v1/upload-path", server.url)),
    )
}

fn server_section(report: &mut Report, work: &Path) {
    let nar = nar_of_sysroot_lib(work);
    let nar_size = std::fs::metadata(&nar).unwrap().len();
    let out = Command::new("sha256sum").arg(&nar).output().unwrap();
    let nar_hash_hex = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    let size_mb = nar_size as f64 / MB;
    eprintln!("NAR of the toolchain's lib: {size_mb:.1} MB");

    // CLI references over the same bytes.
    let sha_cli = median((0..RUNS).map(|_| time_cmd(Command::new("sha256sum").arg(&nar))).collect());
    let zstd_cli = median(
        (0..RUNS).map(|_| time_cmd(Command::new("zstd").args(["-3", "-T1", "-q", "-c"]).arg(&nar))).collect(),
    );

    // Ingest through upload-path, each run on fresh storage.
    let mut ingest = Vec::new();
    let mut rss = Vec::new();
    let mut stored = 0u64;
    let mut last = None;
    for _ in 0..RUNS {
        let server = Server::start(Backend::Local);
        server.create_cache("bench", false);
        let token = server.admin_token();
        ingest.push(upload_path(&server, &token, &nar, &nar_hash_hex, nar_size));
        rss.push(server.peak_rss() as f64);
        stored = server.chunk_bytes();
        last = Some((server, token));
    }
    let ingest_s = median(ingest);
    let rss_mb = median(rss) / MB;
    let (server, token) = last.unwrap();

    // Downloads from flywheel and from nginx serving the same NAR as files.
    let hash = "0".repeat(32);
    let dl = |suffix: &str| {
        let url = format!("{}/bench/nar/{hash}{suffix}", server.url);
        median((0..5).map(|_| curl_get(&url, Some(&token)).0).collect())
    };
    let dl_zst = dl(".nar.zst");
    let dl_nar = dl(".nar");
    let static_root = work.join("static");
    std::fs::create_dir_all(&static_root).unwrap();
    std::fs::rename(&nar, static_root.join("lib.nar")).unwrap();
    let zst = std::fs::File::create(static_root.join("lib.nar.zst")).unwrap();
    assert!(Command::new("zstd").args(["-3", "-T0", "-q", "-c"]).arg(static_root.join("lib.nar")).stdout(zst).status().unwrap().success());
    let nginx = Nginx::start(&static_root, work);
    let ng = |name: &str| {
        let url = format!("http://127.0.0.1:{}/{name}", nginx.port);
        median((0..5).map(|_| curl_get(&url, None).0).collect())
    };
    let ng_zst = ng("lib.nar.zst");
    let ng_nar = ng("lib.nar");
    drop(nginx);

    report.section(
        "Server: ingest and download of one NAR",
        &format!(
            "The NAR of this machine's Rust toolchain `lib` directory ({size_mb:.1} MB; Attic's reference NAR was 540 MB), \
             uploaded with `curl -T` through `PUT /_api/v1/upload-path` to a server on local storage, {RUNS} runs on fresh \
             storage; downloaded with `curl -o /dev/null`, 5 runs. Throughput is NAR bytes per second. It stored {:.1} MB of \
             zstd chunks. Attic's figures come from ../shared/DESIGN.md (measured on this kind of machine, not in this run).",
            stored as f64 / MB
        ),
    );
    report.row(
        "ingest (upload-path)",
        format!("{:.0} MB/s", size_mb / ingest_s),
        format!("Attic 21.8 MB/s; `zstd -3 -T1` {:.0} MB/s; `sha256sum` {:.0} MB/s", size_mb / zstd_cli, size_mb / sha_cli),
        format!("{:.1}x Attic; {:.2}x zstd CLI", size_mb / ingest_s / 21.8, zstd_cli / ingest_s),
        ">= 218 MB/s (10x Attic)",
    );
    report.row(
        "download, `.nar.zst` (stored frames)",
        format!("{:.0} MB/s", size_mb / dl_zst),
        format!("Attic 95 MB/s; nginx, same NAR as `.nar.zst` file: {:.0} MB/s", size_mb / ng_zst),
        format!("{:.1}x Attic; {:.2}x nginx", size_mb / dl_zst / 95.0, ng_zst / dl_zst),
        ">= 950 MB/s (10x Attic)",
    );
    report.row(
        "download, `.nar` (decompressed)",
        format!("{:.0} MB/s", size_mb / dl_nar),
        format!("nginx, plain `.nar` file: {:.0} MB/s", size_mb / ng_nar),
        format!("{:.2}x nginx", ng_nar / dl_nar),
        "",
    );
    report.row(
        "server peak RSS during ingest",
        format!("{rss_mb:.0} MB"),
        "Attic 176 MB".into(),
        format!("{:.2}x Attic", rss_mb / 176.0),
        "< 100 MB",
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks sections.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let work = tempfile::tempdir().unwrap();
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut report = Report {
        out: format!(
            "# Benchmarks\n\nWritten by `./scripts/bench.sh` (`cargo bench --bench e2e`) at commit {commit} on {} cores; \
             load average at start: {}. Medians of several runs; ratios compare figures taken in this same run.\n\
             Per-function figures come from `cargo bench -p flywheel-core` (criterion).\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
    };
    if wants("server") {
        server_section(&mut report, work.path());
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    std::fs::write(&path, &report.out).unwrap();
    println!("{}", report.out);
    eprintln!("wrote {}", path.display());
}
