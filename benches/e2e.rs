//! The end-to-end benchmark: runs the real binaries on this machine and writes BENCHMARKS.md.
//! Run it with `./scripts/bench.sh` (which installs the reference tools, then runs
//! `cargo bench --bench e2e`). Every figure stands beside a reference measured in the same run;
//! each is the median of several runs, because the machine is shared and noisy.

// Both harnesses carry the shared helpers of tests/common; two copies of them are harmless.
#![allow(clippy::duplicate_mod)]

#[path = "../tests/common_fuse/mod.rs"]
mod common_fuse;
#[path = "../tests/substituter_common/mod.rs"]
mod substituter_common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common_fuse::common::{self, Backend, Server};

const RUNS: usize = 3;

/// Runs of the server's ingest (and twice as many downloads): its targets are absolute figures,
/// so their medians take more runs to sit still on a shared machine.
const SERVER_RUNS: usize = 5;
/// Extra runs of the sub-second hot reads.
const HOT_RUNS: usize = 8;
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
    header: String,
    /// Where each section says it was measured.
    stamp: String,
    /// (title, text) of each section, in the order measured.
    sections: Vec<(String, String)>,
}

impl Report {
    fn section(&mut self, title: &str, intro: &str) {
        let mut text = format!("\n## {title}\n\n{intro} {}\n\n", self.stamp);
        text.push_str("| figure | flywheel | reference | ratio | target |\n|---|---|---|---|---|\n");
        self.sections.push((title.to_string(), text));
    }

    fn row(&mut self, figure: &str, ours: String, reference: String, ratio: String, target: &str) {
        let (_, text) = self.sections.last_mut().expect("a row belongs to a section");
        let _ = writeln!(text, "| {figure} | {ours} | {reference} | {ratio} | {target} |");
    }

    /// The whole file. A run of some sections only keeps the other sections of `previous`
    /// (an earlier BENCHMARKS.md) as they were, each naming the run it came from.
    fn render(&self, previous: Option<&str>) -> String {
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
fn split_sections(text: &str) -> Vec<(String, String)> {
    text.split("\n## ")
        .skip(1)
        .map(|part| {
            let title = part.lines().next().unwrap_or("").to_string();
            let body = format!("\n## {}\n", part.trim_end_matches('\n'));
            (title, body)
        })
        .collect()
}

fn nar_of_sysroot_lib(dir: &Path) -> PathBuf {
    nar_of_sysroot(dir, "lib")
}

/// The NAR of `sub` below the Rust toolchain's sysroot, written into `dir`.
fn nar_of_sysroot(dir: &Path, sub: &str) -> PathBuf {
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
        let _ = child.wait();
        panic!("nginx did not start");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master then stops its workers too.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
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
    // Every server is kept until all runs are done: deleting one run's 6000 chunk files just
    // before the next run makes ext4 scan for recently freed inodes on every file it creates.
    let mut servers = Vec::new();
    for _ in 0..SERVER_RUNS {
        let server = Server::start(Backend::Local);
        server.create_cache("bench", false);
        let token = server.admin_token();
        // No writeback of the previous run's chunks during this one.
        let _ = Command::new("sync").status();
        ingest.push(upload_path(&server, &token, &nar, &nar_hash_hex, nar_size));
        rss.push(server.peak_rss() as f64);
        stored = server.chunk_bytes();
        servers.push((server, token));
    }
    let ingest_s = median(ingest);
    let rss_mb = median(rss) / MB;
    let (server, token) = servers.pop().unwrap();
    drop(servers);

    // Downloads from flywheel and from nginx serving the same NAR as files.
    let hash = "0".repeat(32);
    let dl = |suffix: &str| {
        let url = format!("{}/bench/nar/{hash}{suffix}", server.url);
        median((0..2 * SERVER_RUNS).map(|_| curl_get(&url, Some(&token)).0).collect())
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
        median((0..2 * SERVER_RUNS).map(|_| curl_get(&url, None).0).collect())
    };
    let ng_zst = ng("lib.nar.zst");
    let ng_nar = ng("lib.nar");
    drop(nginx);

    report.section(
        "Server: ingest and download of one NAR",
        &format!(
            "The NAR of this machine's Rust toolchain `lib` directory ({size_mb:.1} MB; Attic's reference NAR was 540 MB), \
             uploaded with `curl -T` through `PUT /_api/v1/upload-path` to a server on local storage, {SERVER_RUNS} runs on \
             fresh storage, each after a `sync`; downloaded with `curl -o /dev/null`, {} runs. Throughput is NAR bytes per second. It stored {:.1} MB of \
             zstd chunks. Attic's figures come from ../shared/DESIGN.md (measured on this kind of machine, not in this run).",
            2 * SERVER_RUNS,
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

/// A compression Nix may upload a NAR in (`nix copy --to ...?compression=NAME`), with the CLI
/// that makes the same-run reference and how the server answers the uploaded URL.
struct Codec {
    /// Nix's name, as in the narinfo's `Compression`.
    name: &'static str,
    /// What follows `.nar` in the file name.
    ext: &'static str,
    /// The CLI compressing to stdout at the level the server's choice compares with; empty for none.
    compress: &'static [&'static str],
    /// The CLI decompressing to stdout.
    decompress: &'static [&'static str],
    /// How the server makes the bytes it sends.
    served: &'static str,
}

const CODECS: [Codec; 5] = [
    Codec { name: "none", ext: "", compress: &[], decompress: &[], served: "chunks decompressed" },
    Codec { name: "zstd", ext: ".zst", compress: &["zstd", "-3", "-T1", "-q", "-c"], decompress: &["zstd", "-d", "-q", "-c"], served: "stored zstd frames as they are" },
    // xz's fastest preset: what recompressing on the fly would cost at the least. The server
    // sends stored LZMA2 chunks instead.
    Codec { name: "xz", ext: ".xz", compress: &["xz", "-0", "-T1", "-c"], decompress: &["xz", "-d", "-c"], served: "stored chunks as uncompressed LZMA2" },
    Codec { name: "bzip2", ext: ".bz2", compress: &["bzip2", "-1", "-c"], decompress: &["bzip2", "-d", "-c"], served: "encoded on the fly, level 1" },
    Codec { name: "br", ext: ".br", compress: &["brotli", "-q", "1", "-c"], decompress: &["brotli", "-d", "-c"], served: "encoded on the fly, quality 1" },
];

/// A ratio with two significant digits (at least two decimals): a GET encoded on the fly can
/// be hundreds of times slower than nginx, which `{:.2}` would print as 0.00.
fn ratio(x: f64) -> String {
    let decimals = if x > 0.0 { (1 - x.log10().floor() as i64).max(2) } else { 2 };
    format!("{x:.*}x", decimals as usize)
}

/// Wall time of a command whose stdout goes to `out`, failing the benchmark if it fails.
fn time_to_file(cmd: &mut Command, out: &Path) -> f64 {
    let file = std::fs::File::create(out).unwrap();
    let start = Instant::now();
    let status = cmd.stdout(file).status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed().as_secs_f64()
}

/// CPU seconds (user plus system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The nixbase32 SHA-256 of a file, as Nix names the NAR files it uploads.
fn file_hash(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    flywheel_core::nix::Sha256Hash::parse(&format!("sha256:{hex}")).unwrap().to_base32_bare()
}

/// The cost of serving NARs at the URL their uploader's narinfo named, in each compression Nix
/// uploads in, when the store keeps zstd chunks only: GETs of the uploaded URL beside the same
/// compressed file from nginx and the compression tools' own speed on the same NAR.
fn compression_section(report: &mut Report, work: &Path) {
    let work = work.join("compression");
    let static_root = work.join("static");
    std::fs::create_dir_all(static_root.join("nar")).unwrap();
    // lib/rustlib (about 180 MB: libraries, objects, scripts) rather than the whole lib: the
    // slow codecs (bzip2 and xz at some 10 MB/s) would take minutes per run on all of it.
    let nar = nar_of_sysroot(&work, "lib/rustlib");
    let nar_size = std::fs::metadata(&nar).unwrap().len();
    let nar_hash = format!("sha256:{}", file_hash(&nar));
    let size_mb = nar_size as f64 / MB;
    eprintln!("NAR of the toolchain's lib/rustlib: {size_mb:.1} MB");

    // The files Nix would upload, made by the reference tools (timed), then their decompression.
    struct Made {
        file: String,
        file_size: u64,
        compress_s: Option<f64>,
        decompress_s: Option<f64>,
    }
    let mut made = Vec::new();
    for codec in &CODECS {
        let scratch = work.join(format!("upload.nar{}", codec.ext));
        let (compress_s, decompress_s) = if codec.compress.is_empty() {
            std::fs::copy(&nar, &scratch).unwrap();
            (None, None)
        } else {
            let compress = median(
                (0..RUNS).map(|_| time_to_file(Command::new(codec.compress[0]).args(&codec.compress[1..]).arg(&nar), &scratch)).collect(),
            );
            let decompress =
                median((0..RUNS).map(|_| time_cmd(Command::new(codec.decompress[0]).args(&codec.decompress[1..]).arg(&scratch))).collect());
            (Some(compress), Some(decompress))
        };
        let file = format!("{}.nar{}", file_hash(&scratch), codec.ext);
        let file_size = std::fs::metadata(&scratch).unwrap().len();
        std::fs::rename(&scratch, static_root.join("nar").join(&file)).unwrap();
        eprintln!("{}: {:.1} MB file", codec.name, file_size as f64 / MB);
        made.push(Made { file, file_size, compress_s, decompress_s });
    }
    std::fs::remove_file(&nar).unwrap();

    // Uploaded as `nix copy --to` sends it: the NAR under its file name, then the narinfo that
    // names it, one store path per compression.
    let server = Server::start(Backend::Local);
    server.create_cache("bench", false);
    let token = server.admin_token();
    let auth = format!("Authorization: Bearer {token}");
    for (i, (codec, made)) in CODECS.iter().zip(&made).enumerate() {
        let nar_file = static_root.join("nar").join(&made.file);
        let put = |url: String, body: &mut Command| {
            let status = body.args(["-sf", "-X", "PUT", "-H", &auth]).arg(&url).stdout(Stdio::null()).status().unwrap();
            assert!(status.success(), "PUT {url} failed");
        };
        put(format!("{}/bench/nar/{}", server.url, made.file), Command::new("curl").arg("-T").arg(&nar_file));
        let hash_part = format!("{:0>32}", i + 1);
        let narinfo = format!(
            "StorePath: /nix/store/{hash_part}-lib\nURL: nar/{}\nCompression: {}\nFileHash: sha256:{}\nFileSize: {}\nNarHash: {nar_hash}\nNarSize: {nar_size}\nReferences: \n",
            made.file,
            codec.name,
            made.file.split_once('.').unwrap().0,
            made.file_size
        );
        let narinfo_file = work.join(format!("{hash_part}.narinfo"));
        std::fs::write(&narinfo_file, narinfo).unwrap();
        put(format!("{}/bench/{hash_part}.narinfo", server.url), Command::new("curl").arg("-T").arg(&narinfo_file));
    }

    // GETs of each uploaded URL from the server (with its CPU time), then from nginx.
    let mut ours = Vec::new();
    for (codec, made) in CODECS.iter().zip(&made) {
        let url = format!("{}/bench/nar/{}", server.url, made.file);
        let cpu_before = cpu_seconds(server.pid());
        let gets: Vec<(f64, u64)> = (0..RUNS).map(|_| curl_get(&url, Some(&token))).collect();
        let cpu = (cpu_seconds(server.pid()) - cpu_before) / RUNS as f64;
        let sent = gets[0].1;
        if codec.name == "none" {
            assert_eq!(sent, nar_size, "the uncompressed NAR is the NAR");
        }
        ours.push((median(gets.iter().map(|g| g.0).collect()), cpu, sent));
    }
    drop(server);
    let nginx = Nginx::start(&static_root, &work);
    let reference: Vec<f64> = made
        .iter()
        .map(|m| {
            let url = format!("http://127.0.0.1:{}/nar/{}", nginx.port, m.file);
            median((0..2 * RUNS).map(|_| curl_get(&url, None).0).collect())
        })
        .collect();
    drop(nginx);

    report.section(
        "NARs at their uploaded URL, by compression",
        &format!(
            "The NAR of the Rust toolchain's lib/rustlib ({size_mb:.1} MB) uploaded to a server on local storage as `nix copy --to ...?compression=X` \
             sends it (`PUT nar/<filehash>.nar.<ext>`, then the narinfo naming that URL), once per compression, and downloaded from \
             that URL with `curl -o /dev/null`, {RUNS} runs each; throughput is NAR bytes per second, CPU is the server's user plus \
             system time per download. References, on the same NAR in the same run: nginx serving the uploaded file itself (what a \
             static binary cache keeps), {} runs; and each tool's own single-threaded speed compressing the NAR at the level \
             compared (xz at its fastest preset, `-0`, the least an on-the-fly xz would cost) and decompressing its output, {RUNS} runs. \
             The uploaded files were made by those same commands.",
            2 * RUNS
        ),
    );
    for (((codec, made), (get_s, cpu, sent)), ng_s) in CODECS.iter().zip(&made).zip(&ours).zip(&reference) {
        let mut refs = format!("nginx, uploaded file ({:.0} MB): {:.0} MB/s", made.file_size as f64 / MB, size_mb / ng_s);
        let mut ratios = format!("{} nginx", ratio(ng_s / get_s));
        if let (Some(c), Some(d)) = (made.compress_s, made.decompress_s) {
            let tool = codec.compress[..codec.compress.len() - 1].join(" ");
            let _ = write!(refs, "; `{tool}` {:.0} MB/s, `{} -d` {:.0} MB/s", size_mb / c, codec.compress[0], size_mb / d);
            let _ = write!(ratios, "; {} `{tool}`", ratio(c / get_s));
        }
        report.row(
            &format!("GET `.nar{}` ({})", codec.ext, codec.served),
            format!("{:.0} MB/s; {:.1} CPU s; {:.0} MB sent", size_mb / get_s, cpu, *sent as f64 / MB),
            refs,
            ratios,
            "",
        );
    }
}

/// The lazy runner set-ups of issue 18 with Nix 2.30: overlayfs over the mount plus
/// `nix-store --load-db` into the runner's database, against Nix's `local-overlay` store
/// (the mount as the lower store, registered in the lower store's own database); Nix 2.8's
/// overlayfs set-up beside them; the reference is substituting the path first, as runners do
/// today. The job reads 200 of the std docs' HTML files through a derivation.
fn lazy_section(report: &mut Report, work: &Path) {
    use common_fuse::{local_overlay_url, mount_lower_store, mount_overlay, register_lazily, NixVersion, Setup, Unmount, CACHE};
    const JOB_FILES: usize = 200;
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let docs_dir = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("share/doc/rust/html/std");
    let job = |nix: &common::Nix, store: &str, docs: &str, run: usize| -> f64 {
        let expr = format!(
            "derivation {{ name = \"job-{run}-{}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" \"/bin/busybox find ${{builtins.storePath \"{docs}\"}} -name '*.html' | /bin/busybox sort | \
             /bin/busybox head -n {JOB_FILES} | /bin/busybox xargs /bin/busybox cat | /bin/busybox wc -c > $out\" ]; }}",
            common::unique_seed("j")
        );
        time_cmd(nix.cmd("nix-build").args(["--store", store, "--no-out-link", "-E", &expr]).stdout(Stdio::null()))
    };
    // (set-up, job) medians per way, plus the docs' size.
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let mut docs_mb = 0.0;
    for (way, version) in [
        ("Nix 2.30, overlayfs + `--load-db`", NixVersion::V2_30),
        ("Nix 2.30, `local-overlay` store", NixVersion::V2_30),
        ("Nix 2.8, overlayfs + `--load-db`", NixVersion::V2_8),
        ("Nix 2.30, substitute first (`nix copy --from`)", NixVersion::V2_30),
    ] {
        let setup = Setup::of(version);
        let docs = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(&docs_dir)).trim().to_string();
        docs_mb = setup.nix.path_info(&setup.store_root, &docs).nar_size as f64 / MB;
        let netrc = setup.server.netrc(&setup.token);
        let out = setup.nix.copy_to(&setup.store_root, &format!("{}/{CACHE}?compression=zstd", setup.server.url), &netrc, std::slice::from_ref(&docs));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (mut setups, mut jobs) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let dir = tempfile::tempdir_in(work).unwrap();
            let cache_dir = dir.path().join("cache");
            std::fs::create_dir_all(&cache_dir).unwrap();
            drop_caches();
            let mut mounts: Vec<Unmount> = Vec::new();
            let mut fuse = None;
            let (store, set_up) = if way.contains("substitute") {
                let store = format!("local?root={}", dir.path().join("root").display());
                let t = time_cmd(
                    setup.nix.cmd("nix").args(["copy", "--no-check-sigs", "--from", &format!("{}/{CACHE}", setup.server.url), "--to", &store, "--option", "netrc-file"]).arg(&netrc).arg(&docs),
                );
                (store, t)
            } else if way.contains("local-overlay") {
                let mount = fuse.insert(setup.mount(&setup.server.url, &cache_dir, &[]));
                let started = Instant::now();
                let lower = dir.path().join("lower");
                std::fs::create_dir_all(lower.join("nix/store")).unwrap();
                register_lazily(&setup, &format!("local?root={}", lower.display()), std::slice::from_ref(&docs));
                mounts.push(mount_lower_store(&mount.mountpoint, &dir.path().join("stub"), &lower.join("nix/store")));
                let merged = dir.path().join("merged");
                let upper = dir.path().join("upper");
                // The same layers as the lower store's directory, not that overlay itself: see
                // tests/fuse_store.rs on the kernel's stacking limit.
                let layers = PathBuf::from(format!("{}:{}", dir.path().join("stub").display(), mount.mountpoint.display()));
                mounts.push(mount_overlay(&layers, &upper, &dir.path().join("work"), &merged.join("nix/store")));
                let store = local_overlay_url(&lower, &merged, &upper);
                (store, started.elapsed().as_secs_f64())
            } else {
                let mount = fuse.insert(setup.mount(&setup.server.url, &cache_dir, &[]));
                let started = Instant::now();
                let root = dir.path().join("root");
                mounts.push(mount_overlay(&mount.mountpoint, &dir.path().join("upper"), &dir.path().join("work"), &root.join("nix/store")));
                let store = format!("local?root={}", root.display());
                register_lazily(&setup, &store, std::slice::from_ref(&docs));
                (store, started.elapsed().as_secs_f64())
            };
            setups.push(set_up);
            jobs.push(job(&setup.nix, &store, &docs, run));
            // Overlays first, then the mount under them.
            while let Some(m) = mounts.pop() {
                drop(m);
            }
            drop(fuse);
        }
        rows.push((way, median(setups), median(jobs)));
    }
    let (_, sub_setup, sub_job) = rows[3];
    report.section(
        "Lazy runner set-ups, by Nix version",
        &format!(
            "The std docs of this machine's Rust toolchain ({docs_mb:.0} MB of NAR, thousands of files) pushed to a server on local \
             storage; a job (a derivation) then reads {JOB_FILES} of its HTML files. Each of {RUNS} runs starts from a fresh \
             `flywheel mount` with an empty chunk cache and an empty page cache. Set-up is everything between the mount being up \
             and the job starting: registering the path (`flywheel dump-db | nix-store --load-db`) and the overlay mounts, or, \
             for the reference, `nix copy --from` of the whole path into a fresh store. Server and runner share this machine.",
        ),
    );
    for &(way, set_up, job_s) in &rows[..3] {
        report.row(
            way,
            format!("set-up {:.2} s; job {:.2} s; total {:.2} s", set_up, job_s, set_up + job_s),
            format!("substitute first: set-up {:.2} s; job {:.2} s; total {:.2} s", sub_setup, sub_job, sub_setup + sub_job),
            format!("{} total", ratio((sub_setup + sub_job) / (set_up + job_s))),
            "",
        );
    }
}

/// A CI job as a whole (set-up plus the job) on a fresh runner: substituting its closure
/// first, against the lazy mount with no trace (on-demand reads plus the background fill),
/// with a trace saved by an earlier job, and warm; on loopback and over 1 Gbit/s and
/// 100 Mbit/s links; for two shapes of job. Then the fill policies side by side.
fn job_section(report: &mut Report, work: &Path) {
    use common_fuse::{mount_overlay, register_lazily, NixVersion, Setup, Unmount, CACHE};
    const JOB_FILES: usize = 200;
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let docs_dir = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("share/doc/rust/html/std");
    let setup = Setup::of(NixVersion::V2_8);
    let docs = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(&docs_dir)).trim().to_string();
    let docs_mb = setup.nix.path_info(&setup.store_root, &docs).nar_size as f64 / MB;
    let netrc = setup.server.netrc(&setup.token);
    let out = setup.nix.copy_to(&setup.store_root, &format!("{}/{CACHE}?compression=zstd", setup.server.url), &netrc, std::slice::from_ref(&docs));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two shapes: a walk reading files in NAR order (readahead's best case), and a job that
    // opens files spread over the whole path one by one, a process each (as an interpreter
    // importing modules does), which no readahead foresees.
    let shapes: [(&str, String); 2] = [
        ("walk", format!("/bin/busybox find $p -name '*.html' | /bin/busybox sort | /bin/busybox head -n {JOB_FILES} | /bin/busybox xargs /bin/busybox cat | /bin/busybox wc -c")),
        ("scattered", format!("/bin/busybox find $p -name '*.html' | /bin/busybox sort | /bin/busybox awk 'NR % 17 == 0' | /bin/busybox head -n {JOB_FILES} | while read f; do /bin/busybox sha256sum $f; done | /bin/busybox wc -l")),
    ];
    let job = |shape: &str, store: &str| -> f64 {
        let script = &shapes.iter().find(|(name, _)| *name == shape).unwrap().1;
        let expr = format!(
            "derivation {{ name = \"job-{}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" ''p=${{builtins.storePath \"{docs}\"}}; {script} > $out'' ]; }}",
            common::unique_seed("j")
        );
        time_cmd(setup.nix.cmd("nix-build").args(["--store", store, "--no-out-link", "-E", &expr]).stdout(Stdio::null()))
    };
    let metrics_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // One lazy job on a fresh runner: (total, warm job, compressed bytes fetched).
    let lazy_run = |shape: &str, url: &str, extra: &[&str]| -> (f64, f64, f64) {
        let dir = tempfile::tempdir_in(work).unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        drop_caches();
        let port = metrics_port();
        let listen = format!("127.0.0.1:{port}");
        let mount = setup.mount(url, &cache_dir, &[extra, &["--metrics-listen", &listen]].concat());
        let started = Instant::now();
        let root = dir.path().join("root");
        let overlay: Unmount = mount_overlay(&mount.mountpoint, &dir.path().join("upper"), &dir.path().join("work"), &root.join("nix/store"));
        let store = format!("local?root={}", root.display());
        register_lazily(&setup, &store, std::slice::from_ref(&docs));
        job(shape, &store);
        let total = started.elapsed().as_secs_f64();
        let fetched = common::metric_value(&common::fetch_metrics(&format!("http://{listen}/metrics")), "flywheel_runner_chunk_bytes_fetched_total");
        drop_caches();
        let warm = job(shape, &store);
        drop(overlay);
        drop(mount);
        (total, warm, fetched)
    };
    let substitute_run = |shape: &str, url: &str| -> f64 {
        let dir = tempfile::tempdir_in(work).unwrap();
        drop_caches();
        let store = format!("local?root={}", dir.path().join("root").display());
        let started = Instant::now();
        let copied = setup
            .nix
            .cmd("nix")
            .args(["copy", "--no-check-sigs", "--from", &format!("{url}/{CACHE}"), "--to", &store, "--option", "netrc-file"])
            .arg(&netrc)
            .arg(&docs)
            .status()
            .unwrap();
        assert!(copied.success());
        job(shape, &store);
        started.elapsed().as_secs_f64()
    };
    let links: [(&str, Option<f64>); 3] = [("loopback", None), ("1 Gbit/s", Some(125e6)), ("100 Mbit/s", Some(12.5e6))];
    let link_urls: Vec<(&str, Option<Link>)> = links.iter().map(|(name, rate)| (*name, rate.map(|r| Link::start(&setup.server.url, r)))).collect();
    let url_of = |link: &Option<Link>| link.as_ref().map(Link::url).unwrap_or_else(|| setup.server.url.clone());
    let policies: [(&str, &[&str]); 4] = [
        ("no fill (default)", &[]),
        ("fill, NAR order", &["--fill-max-nar-size", "268435456"]),
        ("fill, NAR order, 1 request beside reads", &["--fill-max-nar-size", "268435456", "--fill-alongside-reads", "1"]),
        ("fill, small files first", &["--fill-max-nar-size", "268435456", "--fill-order", "small-files-first"]),
    ];
    let mut policy_rows: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut intro_bytes = Vec::new();
    let mut rows: Vec<(String, String, String, String, &str)> = Vec::new();
    for (shape, _) in &shapes {
        let key = format!("bench-{shape}");
        // The trace: one job on a fresh runner records it and saves it at unmount.
        lazy_run(shape, &setup.server.url, &["--prefetch", &key, "--fill-max-nar-size", "0"]);
        // What the job reads, compressed: on-demand reads alone fetch only that (and readahead).
        let (_, _, read_bytes) = lazy_run(shape, &setup.server.url, &["--fill-max-nar-size", "0"]);
        intro_bytes.push(format!("{shape} {:.1} MB", read_bytes / MB));
        for (name, link) in &link_urls {
            let url = url_of(link);
            let reference = median((0..RUNS).map(|_| substitute_run(shape, &url)).collect());
            let mut by_policy = Vec::new();
            for (_, flags) in &policies {
                let runs: Vec<(f64, f64, f64)> = (0..RUNS).map(|_| lazy_run(shape, &url, flags)).collect();
                by_policy.push((median(runs.iter().map(|r| r.0).collect()), median(runs.iter().map(|r| r.2).collect())));
            }
            policy_rows.push((format!("{shape}, {name} (substitute first: {reference:.2} s)"), by_policy.clone()));
            let traced: Vec<(f64, f64, f64)> = (0..RUNS).map(|_| lazy_run(shape, &url, &["--prefetch", &key])).collect();
            let (cold, fill_bytes) = by_policy[0];
            let with_trace = median(traced.iter().map(|r| r.0).collect());
            let warm = median(traced.iter().map(|r| r.1).collect());
            let trace_bytes = median(traced.iter().map(|r| r.2).collect());
            let substitute = format!("substitute first: {reference:.2} s");
            let slow = *name == "100 Mbit/s";
            rows.push((format!("{shape}, {name}: cold lazy, no trace"), format!("{cold:.2} s ({:.1} MB fetched)", fill_bytes / MB), substitute.clone(), format!("{} faster", ratio(reference / cold)), if slow { ">= 2x faster" } else { ">= 1x" }));
            rows.push((
                format!("{shape}, {name}: cold lazy, with a trace"),
                format!("{with_trace:.2} s ({:.1} MB fetched, {:.2}x what the job reads)", trace_bytes / MB, trace_bytes / read_bytes.max(1.0)),
                substitute,
                format!("{} faster; {:.2}x the warm job", ratio(reference / with_trace), with_trace / warm),
                match *name {
                    "loopback" => ">= 1.5x faster, <= 1.3x warm, <= 1.5x bytes",
                    "100 Mbit/s" => ">= 4x faster, <= 1.3x warm",
                    _ => "<= 1.3x warm",
                },
            ));
            rows.push((format!("{shape}, {name}: warm lazy"), format!("{warm:.2} s (job only)"), String::new(), String::new(), ""));
        }
    }
    report.section(
        "CI job, lazy against substituting first",
        &format!(
            "Jobs (derivations) over the std docs of this machine's Rust toolchain ({docs_mb:.0} MB of NAR), on a fresh runner: \
             empty chunk cache, empty page cache, and a store that does not have the path. *walk* lists every HTML file and \
             reads {JOB_FILES} of them in name order (NAR order) with one `cat`; *scattered* reads {JOB_FILES} files spread over \
             the whole path (every 17th), one `sha256sum` process each, as an interpreter importing modules does. Each figure \
             is set-up plus job, median of {RUNS} runs. The reference substitutes the path first (`nix copy --from` the server, \
             zstd NARs, into a fresh store). The lazy runs mount the cache, mount an overlay over it and register the path \
             (`dump-db | nix-store --load-db`), then run the job: with no trace (on-demand reads, the default), and with the trace an earlier job saved (`flywheel mount --prefetch KEY`, which starts fetching the traced \
             chunks at once). Warm is the same job again on that runner, page cache dropped. Links are the proxy of the \
             substituter section (shared bandwidth limit, no added latency). Nix 2.8, server on local storage on this machine. \
             On-demand reads alone fetch (compressed): {}.",
            intro_bytes.join(", ")
        ),
    );
    for (figure, ours, reference, ratio_text, target) in rows {
        report.row(&figure, ours, reference, ratio_text, target);
    }
    report.section(
        "Background fill policies",
        &format!(
            "The cold lazy jobs of the section above with no trace, under each fill policy (`--fill-max-nar-size 0`; the \
             default; `--fill-alongside-reads 1`; `--fill-order small-files-first`): set-up plus job, median of {RUNS} runs, \
             and the compressed bytes fetched by the job's end."
        ),
    );
    for (figure, by_policy) in policy_rows {
        let cells: Vec<String> = policies.iter().zip(&by_policy).map(|((name, _), (t, b))| format!("{name}: {t:.2} s, {:.1} MB", b / MB)).collect();
        report.row(&figure, cells[..2].join("; "), cells[2..].join("; "), String::new(), "");
    }
}

/// The load run of the ops issue, against flywheel on S3 and against nginx serving the same
/// paths as a `file://` binary cache (`nix copy --to file://`).
fn load_section(report: &mut Report, work: &Path) {
    use common::load::{self, LoadResult};
    const SECS: u64 = 30;
    let nix = common::Nix::new();
    let server = Server::start(Backend::S3);
    server.create_cache("load", false);
    let src = nix.store("load-src");
    let paths = nix.build(&src, &common::unique_seed("load"), &["big", "single", "tree", "empty", "withRefs"]);
    let token = server.mint(&["--push", "load", "--pull", "load"]);
    let out = nix.copy_to(&src, &format!("{}/load", server.url), &server.netrc(&token), &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hashes: Vec<&str> = paths.iter().map(|p| common::hash_part(p)).collect();

    let targets = load::targets(&format!("{}/load", server.url), Some(&token), &hashes);
    let ours = load::run(&targets, Some(&token), 64, 8, std::time::Duration::from_secs(SECS), 1_000_000);
    drop(server);

    let static_root = work.join("load-static");
    nix.run(nix.cmd("nix").args(["copy", "--store", &src, "--to", &format!("file://{}", static_root.display())]).args(&paths));
    let nginx = Nginx::start(&static_root, work);
    let base = format!("http://127.0.0.1:{}", nginx.port);
    let targets = load::targets(&base, None, &hashes);
    let reference = load::run(&targets, None, 64, 8, std::time::Duration::from_secs(SECS), 1_000_000);
    drop(nginx);
    assert!(ours.errors.is_empty(), "flywheel load errors: {:?}", &ours.errors[..ours.errors.len().min(5)]);
    assert!(reference.errors.is_empty(), "nginx load errors: {:?}", &reference.errors[..reference.errors.len().min(5)]);

    report.section(
        "Server under load",
        &format!(
            "64 clients fetching narinfos and 8 downloading NARs, each in a loop over one keep-alive connection, for {SECS} s, \
             over 5 corpus paths (one of 6 MB): flywheel on S3 (s3s-fs), and nginx serving the same paths as a `file://` binary \
             cache (xz NARs) as the reference. Load generator, server and S3 share this machine's 2 cores. Errors: flywheel {}, \
             nginx {}. Request counts: flywheel {} narinfos, {} NARs; nginx {} narinfos, {} NARs.",
            ours.errors.len(),
            reference.errors.len(),
            ours.narinfo.len(),
            ours.nar.len(),
            reference.narinfo.len(),
            reference.nar.len()
        ),
    );
    let pct = LoadResult::percentile_ms;
    for (figure, a, b) in [("narinfo", &ours.narinfo, &reference.narinfo), ("NAR download", &ours.nar, &reference.nar)] {
        for p in [50.0, 99.0] {
            report.row(
                &format!("{figure} latency, p{p:.0}"),
                format!("{:.2} ms", pct(a, p)),
                format!("nginx static cache: {:.2} ms", pct(b, p)),
                format!("{:.2}x nginx", pct(a, p) / pct(b, p)),
                "zero errors",
            );
        }
    }
    report.row(
        "narinfo throughput",
        format!("{:.0} /s", ours.narinfo.len() as f64 / ours.elapsed.as_secs_f64()),
        format!("nginx: {:.0} /s", reference.narinfo.len() as f64 / reference.elapsed.as_secs_f64()),
        format!(
            "{:.2}x nginx",
            (ours.narinfo.len() as f64 / ours.elapsed.as_secs_f64()) / (reference.narinfo.len() as f64 / reference.elapsed.as_secs_f64())
        ),
        "",
    );
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache needs root");
}

/// Reads every regular file below `root` (sorted walk); returns bytes read.
fn read_tree(root: &Path) -> u64 {
    files_below(root).iter().map(|f| read_file(f)).sum()
}

fn read_file(path: &Path) -> u64 {
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

fn files_below(root: &Path) -> Vec<PathBuf> {
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
fn walk_stat(root: &Path) -> usize {
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

fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed().as_secs_f64(), out)
}

fn fuse_section(report: &mut Report, work: &Path) {
    use common_fuse::{Setup, CACHE};
    let setup = Setup::new();
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim());
    let add = |dir: &Path| -> String {
        let out = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(dir));
        out.trim().to_string()
    };
    let docs = add(&sysroot.join("share/doc/rust/html/std"));
    let lib = add(&sysroot.join("lib"));
    let netrc = setup.server.netrc(&setup.token);
    let url = format!("{}/{CACHE}?compression=zstd", setup.server.url);
    let out = setup.nix.copy_to(&setup.store_root, &url, &netrc, &[docs.clone(), lib.clone()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = setup.server.chunk_bytes();
    let native_docs = setup.physical(&docs);
    let native_lib = setup.physical(&lib);
    let docs_files = files_below(&native_docs).len();
    let lib_bytes: u64 = files_below(&native_lib).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    let small = native_docs.join("index.html");
    assert!(small.is_file(), "the docs path lacks index.html");
    let fresh_mount = || {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
        (mount, cache_dir)
    };

    // Cold first read of a small file: fresh mount, fresh cache, empty page cache.
    let mut cold_small = Vec::new();
    let mut native_small = Vec::new();
    for _ in 0..RUNS {
        let (mount, _cache) = fresh_mount();
        drop_caches();
        cold_small.push(timed(|| read_file(&mount.path(&docs).join("index.html"))).0);
        drop_caches();
        native_small.push(timed(|| read_file(&small)).0);
    }
    let (cold_small, native_small) = (median(cold_small), median(native_small));

    // Cold read of a whole path against `nix copy --from` of it.
    let mut cold_path = Vec::new();
    let mut copy_from = Vec::new();
    for i in 0..RUNS {
        let (mount, _cache) = fresh_mount();
        drop_caches();
        cold_path.push(timed(|| read_tree(&mount.path(&docs))).0);
        let store = setup.nix.store(&format!("copy-from-{i}"));
        let url = format!("{}/{CACHE}", setup.server.url);
        let mut cmd = setup.nix.cmd("nix");
        cmd.args(["copy", "--store", &store, "--from", &url, "--option", "netrc-file"]).arg(&netrc).args(["--no-check-sigs", &docs]);
        copy_from.push(time_cmd(&mut cmd));
    }
    let (cold_path, copy_from) = (median(cold_path), median(copy_from));

    // Warm (chunks in the local cache, page cache dropped), hot (page cache), metadata walk.
    let (mount, cache_dir) = fresh_mount();
    let (cold_lib, _) = timed(|| read_tree(&mount.path(&lib)));
    let mut warm = Vec::new();
    let mut native_warm = Vec::new();
    let mut hot = Vec::new();
    let mut native_hot = Vec::new();
    for _ in 0..RUNS {
        drop_caches();
        warm.push(timed(|| read_tree(&mount.path(&lib))).0);
        hot.push(timed(|| read_tree(&mount.path(&lib))).0);
        drop_caches();
        native_warm.push(timed(|| read_tree(&native_lib)).0);
        native_hot.push(timed(|| read_tree(&native_lib)).0);
    }
    // A hot pass takes well under a second, so take more of them, alternating, for a steadier
    // median.
    // The last native warm pass dropped the page cache: fill it again first.
    read_tree(&mount.path(&lib));
    read_tree(&native_lib);
    for _ in 0..HOT_RUNS {
        hot.push(timed(|| read_tree(&mount.path(&lib))).0);
        native_hot.push(timed(|| read_tree(&native_lib)).0);
    }
    eprintln!("hot runs (s): flywheel {hot:.3?}, native {native_hot:.3?}");
    let (warm, native_warm, hot, native_hot) = (median(warm), median(native_warm), median(hot), median(native_hot));
    walk_stat(&mount.path(&docs));
    walk_stat(&native_docs);
    let walk = median((0..5).map(|_| timed(|| walk_stat(&mount.path(&docs))).0).collect());
    let native_walk = median((0..5).map(|_| timed(|| walk_stat(&native_docs)).0).collect());
    let entries = walk_stat(&native_docs);
    let rss = mount.pid().map(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024.0
    });
    drop(mount);
    drop(cache_dir);

    // A job that reads every tenth file of the closure, on a fresh cache.
    let (mount, cache_dir) = fresh_mount();
    let mut all: Vec<PathBuf> = files_below(&native_docs).into_iter().chain(files_below(&native_lib)).collect();
    all.sort();
    let closure_bytes: u64 = all.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    // Spread over the closure: a file is read when that keeps the bytes read so far at or under
    // a tenth of the bytes passed so far.
    let mut read_bytes = 0;
    let mut passed = 0;
    let mut chosen = Vec::new();
    for file in &all {
        let size = std::fs::metadata(file).unwrap().len();
        passed += size;
        if (read_bytes + size) * 10 <= passed {
            read_bytes += size;
            chosen.push(file.clone());
        }
    }
    read_bytes = 0;
    for file in chosen.iter() {
        let logical = format!("/{}", file.strip_prefix(&setup.store_root).unwrap().to_string_lossy());
        read_bytes += read_file(&mount.path(&logical));
    }
    let fetched = common_fuse::dir_size(&cache_dir.path().join("chunks"));
    drop(mount);

    let mb = |bytes: f64| bytes / MB;
    report.section(
        "Lazy FUSE store",
        &format!(
            "`flywheel mount` on a fresh cache dir against a local server holding two paths pushed with `nix copy`: the \
             toolchain's `std` HTML docs ({docs_files} files) and its `lib` directory ({:.0} MB). Native is the same tree \
             in the local Nix store on this disk; the page cache is dropped (`/proc/sys/vm/drop_caches`) where it says \
             cold or warm. Single-threaded reads with 1 MiB buffers. {RUNS} runs each (hot reads: {} runs), medians. \
             Files read whole once are then served by FUSE passthrough from their copies under the cache dir.",
            mb(lib_bytes as f64),
            RUNS + HOT_RUNS
        ),
    );
    report.row(
        "cold first read of a small file",
        format!("{:.1} ms", cold_small * 1e3),
        format!("native, cold: {:.2} ms", native_small * 1e3),
        format!("{:.0}x native", cold_small / native_small),
        "",
    );
    report.row(
        "cold read of a whole path (`std` docs)",
        format!("{:.2} s", cold_path),
        format!("`nix copy --from` the same server: {:.2} s", copy_from),
        format!("{:.2}x nix copy", cold_path / copy_from),
        "",
    );
    report.row(
        "cold read of `lib` (first access)",
        format!("{:.0} MB/s", mb(lib_bytes as f64) / cold_lib),
        String::new(),
        String::new(),
        "",
    );
    report.row(
        "warm read (chunks cached, page cache dropped)",
        format!("{:.0} MB/s", mb(lib_bytes as f64) / warm),
        format!("native, cold: {:.0} MB/s", mb(lib_bytes as f64) / native_warm),
        format!("{:.0}% of native", 100.0 * native_warm / warm),
        ">= 50% of native",
    );
    report.row(
        "hot read (page cache)",
        format!("{:.0} MB/s", mb(lib_bytes as f64) / hot),
        format!("native, hot: {:.0} MB/s", mb(lib_bytes as f64) / native_hot),
        format!("{:.0}% of native", 100.0 * native_hot / hot),
        ">= 90% of native",
    );
    report.row(
        &format!("`find` + `stat` of {entries} entries, after first access"),
        format!("{:.1} ms", walk * 1e3),
        format!("native: {:.1} ms", native_walk * 1e3),
        format!("{:.2}x native", walk / native_walk),
        "<= 2x native",
    );
    report.row(
        "mount daemon peak RSS",
        rss.map(|r| format!("{:.0} MiB", r / 1048576.0)).unwrap_or_default(),
        String::new(),
        String::new(),
        "<= 128 MiB",
    );
    report.row(
        "bytes fetched by a job reading a tenth of the closure",
        format!("{:.1} MB ({:.1}% of the {:.1} MB stored)", mb(fetched as f64), 100.0 * fetched as f64 / stored as f64, mb(stored as f64)),
        format!("the job read {:.1}% of the closure's {:.0} MB", 100.0 * read_bytes as f64 / closure_bytes as f64, mb(closure_bytes as f64)),
        String::new(),
        "<= 15% of stored size",
    );
}

/// A TCP proxy that limits the server-to-client direction to `bytes_per_sec`, shared by all
/// connections: a runner's link to the cache node, which loopback does not have.
struct Link {
    port: u16,
}

impl Link {
    fn start(target: &str, bytes_per_sec: f64) -> Link {
        use std::io::{Read, Write};
        let target = target.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clock = std::sync::Arc::new(parking_lot::Mutex::new(Instant::now()));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = std::net::TcpStream::connect(&target) else { continue };
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

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn substituter_section(report: &mut Report, work: &Path) {
    use substituter_common::{CountingProxy, Setup, StaticCache, Substitute};
    let setup = Setup::new("ci");
    let mut paths = setup.build("bench", &["big", "tree", "single", "withRefs", "bigNext"]);
    let next = paths.pop().unwrap();
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let lib = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("lib");
    let out = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.src, "--add"]).arg(&lib));
    paths.push(out.trim().to_string());
    let nar_bytes: u64 = paths.iter().map(|p| setup.nix.path_info(&setup.src, p).nar_size).sum();

    // Push: the whole corpus, then the next version of `big` through a counting proxy.
    let (push_all, out) = timed(|| setup.push(&setup.server.url, &paths, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proxy = CountingProxy::start(&setup.server.url, "ci", None);
    let (push_next, out) = timed(|| setup.push(&proxy.url, std::slice::from_ref(&next), &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent = proxy.bytes_up();
    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &next));
    let (_, new_bytes) = substituter_common::new_chunks(&old_nar, &new_nar);
    // The reference: the same new version as one whole NAR through upload-path.
    let whole_server = Server::start(Backend::Local);
    whole_server.create_cache("bench", false);
    let whole_token = whole_server.admin_token();
    let nar_file = work.join("next.nar");
    std::fs::write(&nar_file, &new_nar).unwrap();
    let info = setup.nix.path_info(&setup.src, &next);
    let hex = {
        let out = Command::new("sha256sum").arg(&nar_file).output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let whole_time = upload_path(&whole_server, &whole_token, &nar_file, &hex, info.nar_size);

    // Substitution into fresh stores: straight from the server and from a plain file:// cache
    // (both on loopback and through a 1 Gbit/s link), and through our substituter.
    let static_cache = StaticCache::new(&setup.nix, &setup.src, &paths);
    let netrc = setup.server.netrc(&setup.token);
    let realise_with = |name: &str, subs: &str, key: &str, netrc: &Path| -> f64 {
        let dst = setup.nix.store(name);
        let mut cmd = setup.nix.cmd("nix-store");
        cmd.args(["--store", &dst, "--realise"])
            .args(&paths)
            .args(["--option", "substituters", subs, "--option", "trusted-public-keys", key])
            .args(["--option", "require-sigs", "true", "--option", "netrc-file"])
            .arg(netrc);
        // Each run starts with no dirty pages from the one before: otherwise the kernel's
        // writeback throttles whichever run comes later in the sequence.
        let _ = Command::new("sync").status();
        let (t, out) = timed(|| cmd.output().unwrap());
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let _ = Command::new("chmod").args(["-R", "u+w", &dst]).status();
        let _ = std::fs::remove_dir_all(&dst);
        t
    };
    let realise = |name: &str, subs: &str, key: &str| realise_with(name, subs, key, &netrc);
    let server_url = format!("{}/ci", setup.server.url);
    let link = Link::start(&setup.server.url, 125e6);
    let linked_url = format!("{}/ci", link.url());
    let direct = median((0..RUNS).map(|i| realise(&format!("direct-{i}"), &server_url, &setup.key)).collect());
    let direct_link = median((0..RUNS).map(|i| realise(&format!("direct-link-{i}"), &linked_url, &setup.key)).collect());
    // A slower link, 100 Mbit/s, as a runner in another zone or site than the cache node has.
    let slow_link = Link::start(&setup.server.url, 12.5e6);
    let slow_url = format!("{}/ci", slow_link.url());
    let direct_slow = median((0..RUNS).map(|i| realise(&format!("direct-slow-{i}"), &slow_url, &setup.key)).collect());
    // The production layout: the server keeps its chunks in S3 (RustFS there, s3s-fs here).
    let direct_s3_link = {
        let s3_server = Server::start(Backend::S3);
        let s3_key = s3_server.create_cache("ci", false);
        let s3_token = s3_server.mint(&["--pull", "ci", "--push", "ci"]);
        let s3_token_file = work.join("s3-token");
        std::fs::write(&s3_token_file, &s3_token).unwrap();
        let out = setup
            .nix
            .cmd(common::FLYWHEEL)
            .args(["push", "--server", &s3_server.url, "--cache", "ci", "--token-file"])
            .arg(&s3_token_file)
            .args(["--store", &format!("local?root={}", setup.src)])
            .args(&paths)
            .output()
            .unwrap();
        assert!(out.status.success(), "push to the S3 server: {}", String::from_utf8_lossy(&out.stderr));
        let s3_netrc = s3_server.netrc(&s3_token);
        let s3_link = Link::start(&s3_server.url, 125e6);
        let url = format!("{}/ci", s3_link.url());
        median((0..RUNS).map(|i| realise_with(&format!("direct-s3-{i}"), &url, &s3_key, &s3_netrc)).collect())
    };
    let plain = median((0..RUNS).map(|i| realise(&format!("static-{i}"), &static_cache.url, &static_cache.public_key)).collect());
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..RUNS {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let sub = Substitute::start(&link.url(), "ci", &setup.token_file, cache_dir.path());
        cold.push(realise(&format!("cold-{i}"), &sub.url, &setup.key));
        warm.push(realise(&format!("warm-{i}"), &sub.url, &setup.key));
    }
    let (cold, warm) = (median(cold), median(warm));
    let mut cold_slow = Vec::new();
    for i in 0..RUNS {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let sub = Substitute::start(&slow_link.url(), "ci", &setup.token_file, cache_dir.path());
        cold_slow.push(realise(&format!("cold-slow-{i}"), &sub.url, &setup.key));
    }
    let cold_slow = median(cold_slow);

    // Hook latency, with a push daemon running.
    let socket = work.join("push.sock");
    let mut daemon = setup
        .nix
        .cmd(common::FLYWHEEL)
        .args(["push-daemon", "--server", &setup.server.url, "--cache", "ci", "--token-file"])
        .arg(&setup.token_file)
        .args(["--store", &format!("local?root={}", setup.src), "--socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let drv = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.src, "-q", "--deriver", &paths[0]]));
    let hook = median(
        (0..21)
            .map(|_| {
                time_cmd(
                    Command::new(common::FLYWHEEL).args(["hook", "--socket"]).arg(&socket).env("DRV_PATH", drv.trim()).env("OUT_PATHS", ""),
                )
            })
            .collect(),
    );
    let _ = daemon.kill();
    let _ = daemon.wait();

    let mb = |b: f64| b / MB;
    report.section(
        "Runner substituter and push",
        &format!(
            "Corpus: {} paths, {:.0} MB of NAR (the toolchain's `lib`, a 6 MB random path, small paths). `nix-store --realise` \
             of the corpus into a fresh store by substitution only, signatures required, {RUNS} runs each. \"Link\": the \
             server behind a proxy limited to 125 MB/s (1 Gbit/s), or to 12.5 MB/s (100 Mbit/s), shared by all \
             connections, as a runner's link to the cache node; loopback has none. The server keeps its chunks on local \
             disk, and in one reference in S3 (`s3s-fs`, the engine RustFS is built on), as it does in production: that \
             reference, over 1 Gbit/s, is the \"cold from the server\" of the target. Our substituter reaches the server \
             through the link. Warm runs need no link bytes beyond narinfo checks, so their figure is the 1 Gbit/s one. \
             Nix's own unpacking bounds every ratio: a `file://` cache on this disk, which costs nothing to serve, is \
             the floor of any substitution.",
            paths.len(),
            mb(nar_bytes as f64)
        ),
    );
    report.row(
        "substitution, our substituter, warm cache",
        format!("{warm:.2} s"),
        format!(
            "server direct: loopback {direct:.2} s, 1 Gbit/s link {direct_link:.2} s, 100 Mbit/s link {direct_slow:.2} s, \
             1 Gbit/s link with the server on S3 {direct_s3_link:.2} s; plain `file://` cache {plain:.2} s"
        ),
        format!(
            "{:.1}x faster than cold from the server in production (chunks in S3, 1 Gbit/s); with its chunks on local \
             disk: {:.1}x over 100 Mbit/s, {:.1}x over 1 Gbit/s (where even the `file://` floor is only {:.1}x), {:.1}x on \
             loopback",
            direct_s3_link / warm,
            direct_slow / warm,
            direct_link / warm,
            direct_link / plain,
            direct / warm
        ),
        ">= 3x faster than cold from the server",
    );
    report.row(
        "substitution, our substituter, cold cache, 1 Gbit/s link",
        format!("{cold:.2} s"),
        format!("server direct over the same link: {direct_link:.2} s"),
        format!("{:.2}x", cold / direct_link),
        "",
    );
    report.row(
        "substitution, our substituter, cold cache, 100 Mbit/s link",
        format!("{cold_slow:.2} s"),
        format!("server direct over the same link: {direct_slow:.2} s"),
        format!("{:.2}x", cold_slow / direct_slow),
        "",
    );
    report.row(
        "push of a new version (`big` with bytes inserted)",
        format!("{} bytes sent, {:.2} s", sent, push_next),
        format!("new chunk bytes {new_bytes}; whole NAR through upload-path: {} bytes, {:.2} s", new_nar.len(), whole_time),
        format!("{:.1}% over the new chunk bytes", 100.0 * (sent as f64 - new_bytes as f64) / new_bytes as f64),
        "<= new chunk bytes + 5%",
    );
    report.row("push of the whole corpus to an empty cache", format!("{push_all:.2} s"), String::new(), String::new(), "");
    report.row(
        "post-build hook",
        format!("{:.1} ms (median of 21)", hook * 1e3),
        String::new(),
        String::new(),
        "< 50 ms",
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks sections.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let work = tempfile::tempdir().unwrap();
    let commit = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut report = Report {
        header: format!(
            "# Benchmarks\n\nWritten by `./scripts/bench.sh` (`cargo bench --bench e2e`) on {} cores. Each section names the \
             commit it was measured at and the load average when the run started: `./scripts/bench.sh SECTION` measures only \
             the sections whose names contain SECTION (server, compression, lazy, job, load, fuse, substituter) and keeps the others. \
             Medians of several runs; ratios compare figures taken in the same run.\n\
             Per-function figures come from `cargo bench -p flywheel-core` (criterion).\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        ),
        stamp: format!("(Measured at commit {commit}; load average at start: {load}.)"),
        sections: Vec::new(),
    };
    if wants("server") {
        server_section(&mut report, work.path());
    }
    if wants("compression") {
        compression_section(&mut report, work.path());
    }
    if wants("lazy") {
        lazy_section(&mut report, work.path());
    }
    if wants("job") {
        job_section(&mut report, work.path());
    }
    if wants("load") {
        load_section(&mut report, work.path());
    }
    if wants("fuse") {
        fuse_section(&mut report, work.path());
    }
    if wants("substituter") {
        substituter_section(&mut report, work.path());
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let previous = if filter.is_empty() { None } else { std::fs::read_to_string(&path).ok() };
    let out = report.render(previous.as_deref());
    std::fs::write(&path, &out).unwrap();
    println!("{out}");
    eprintln!("wrote {}", path.display());
}

