//! Stored size and speed of packed storage (issue 12): a corpus of real trees with several
//! versions of the same packages, stored as flywheel chunks, then compacted into packs, beside
//! a plain binary cache of the same NARs compressed whole with xz (Nix's default) and zstd.

use super::*;

/// Crate source trees with several versions in cargo's registry, up to this many bytes in all.
const CRATE_BYTES: u64 = 60_000_000;
/// A crate version larger than this is left out (the Windows bindings, say): one package should
/// not make most of the corpus.
const CRATE_MAX: u64 = 4_000_000;

/// One store path of the corpus: its NAR, and whether it is an older version (pushed first).
struct CorpusPath {
    name: String,
    nar: PathBuf,
    older: bool,
}

fn dump(dir: &Path, nar: &Path) {
    let file = std::fs::File::create(nar).unwrap();
    let status = Command::new("nix-store").arg("--dump").arg(dir).stdout(file).status().unwrap();
    assert!(status.success(), "nix-store --dump {}", dir.display());
}

fn dir_size(dir: &Path) -> u64 {
    files_below(dir).iter().filter_map(|f| std::fs::symlink_metadata(f).ok()).map(|m| m.len()).sum()
}

/// The corpus: every crate of cargo's registry with several versions (each version a path; the
/// newest is the "newer" one), Nix 2.8 (Debian's files) and 2.30 (the project's build), and the
/// Rust toolchain's standard library rlibs.
fn corpus(work: &Path) -> Vec<CorpusPath> {
    let dir = work.join("packs-corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let mut paths = Vec::new();
    let mut add = |name: String, tree: &Path, older: bool| {
        let nar = dir.join(format!("{name}.nar"));
        dump(tree, &nar);
        paths.push(CorpusPath { name, nar, older });
    };

    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut registry: Vec<PathBuf> = std::fs::read_dir(Path::new(&home).join(".cargo/registry/src"))
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    registry.sort();
    let mut by_crate: std::collections::BTreeMap<String, Vec<PathBuf>> = std::collections::BTreeMap::new();
    for index in &registry {
        for entry in std::fs::read_dir(index).unwrap().filter_map(|e| e.ok()) {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            // `name-1.2.3`: the name is everything before the last dash that a digit follows.
            let version_dash = |(i, c): &(usize, char)| *c == '-' && file_name[i + 1..].starts_with(|d: char| d.is_ascii_digit());
            let Some((at, _)) = file_name.char_indices().rev().find(version_dash) else {
                continue;
            };
            by_crate.entry(file_name[..at].to_string()).or_default().push(entry.path());
        }
    }
    let mut crate_bytes = 0;
    for mut versions in by_crate.into_values() {
        if versions.len() < 2 || crate_bytes >= CRATE_BYTES {
            continue;
        }
        let sizes: Vec<u64> = versions.iter().map(|v| dir_size(v)).collect();
        if sizes.iter().any(|&s| s > CRATE_MAX) {
            continue;
        }
        crate_bytes += sizes.iter().sum::<u64>();
        versions.sort();
        let newest = versions.len() - 1;
        for (i, version) in versions.iter().enumerate() {
            add(format!("crate-{}", version.file_name().unwrap().to_string_lossy()), version, i != newest);
        }
    }

    // Nix 2.8 as Debian installs it, and 2.30 as scripts/nix-2.30.sh builds it.
    let nix28 = dir.join("nix-2.8");
    let listed = Command::new("dpkg").args(["-L", "nix-bin"]).output().unwrap();
    for file in String::from_utf8_lossy(&listed.stdout).lines().map(Path::new) {
        let Ok(meta) = std::fs::symlink_metadata(file) else { continue };
        let to = nix28.join(file.strip_prefix("/").unwrap());
        // Symlinks stay symlinks (`nix-build` and the others point to `nix`), as in a store path.
        if meta.file_type().is_symlink() {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(std::fs::read_link(file).unwrap(), &to).unwrap();
        } else if meta.is_file() {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(file, &to).unwrap();
        }
    }
    add("nix-2.8".into(), &nix28, true);
    let nix230 = std::env::var("FLYWHEEL_NIX230").unwrap_or_else(|_| "/opt/flywheel/nix-2.30.5".into());
    if Path::new(&nix230).is_dir() {
        add("nix-2.30".into(), Path::new(&nix230), false);
    }

    // The standard library's rlibs.
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim());
    let rustlib = sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu/lib");
    let rlibs = dir.join("rust-std");
    std::fs::create_dir_all(&rlibs).unwrap();
    for entry in std::fs::read_dir(&rustlib).unwrap().filter_map(|e| e.ok()) {
        if entry.file_name().to_string_lossy().ends_with(".rlib") {
            std::fs::copy(entry.path(), rlibs.join(entry.file_name())).unwrap();
        }
    }
    add("rust-std".into(), &rlibs, false);
    paths
}

/// SHA-256 (hex) and size of a file.
fn hash_and_size(path: &Path) -> (String, u64) {
    (file_hash(path), std::fs::metadata(path).unwrap().len())
}

/// Uploads every path of `paths` to `server`'s cache `bench`, each under its own hash part
/// (its index in `all`); returns the seconds it took.
fn upload_all(server: &Server, token: &str, all: &[CorpusPath], pick: impl Fn(&CorpusPath) -> bool) -> f64 {
    let mut seconds = 0.0;
    for (i, path) in all.iter().enumerate().filter(|(_, p)| pick(p)) {
        let (hash, size) = hash_and_size(&path.nar);
        seconds += upload_named(&server.url, token, &path.nar, &hash, size, &format!("{i:032}"), &path.name);
    }
    seconds
}

fn stored_bytes(server: &Server) -> u64 {
    server.object_sizes("chunks").values().sum::<u64>() + server.object_sizes("packs").values().sum::<u64>()
}

/// Medians of `.nar` and `.nar.zst` downloads of the path at index `i`, from a server just
/// started again (so nothing of the upload is remembered): the first download and the later
/// ones together.
fn downloads(server: &mut Server, token: &str, i: usize) -> (f64, f64) {
    server.restart();
    let url = format!("{}/bench/nar/{i:032}", server.url);
    let nar = median((0..SERVER_RUNS).map(|_| curl_get(&format!("{url}.nar"), Some(token)).0).collect());
    let zst = median((0..SERVER_RUNS).map(|_| curl_get(&format!("{url}.nar.zst"), Some(token)).0).collect());
    (nar, zst)
}

/// Median time of one chunk fetched through the chunk API, for 40 chunks of the path at index
/// `i` spread over it, from a server just started again.
fn chunk_read_ms(server: &mut Server, token: &str, i: usize) -> f64 {
    server.restart();
    let client = reqwest::blocking::Client::new();
    let manifest: serde_json::Value =
        client.get(format!("{}/_flywheel/v1/bench/manifest/{i:032}", server.url)).bearer_auth(token).send().unwrap().json().unwrap();
    let chunks = manifest["manifest"]["chunks"].as_array().unwrap();
    let step = (chunks.len() / 40).max(1);
    let times = chunks
        .iter()
        .step_by(step)
        .map(|chunk| {
            let url = format!("{}/_flywheel/v1/bench/chunk/{}?path={i:032}", server.url, chunk["hash"].as_str().unwrap());
            let (seconds, resp) = timed(|| client.get(url).bearer_auth(token).send().unwrap().bytes().unwrap());
            assert!(!resp.is_empty());
            seconds * 1000.0
        })
        .collect();
    median(times)
}

/// Runs `flywheel compact --cold-after 0` over `server`'s storage; answers its seconds and
/// peak RSS in bytes (from the kernel's accounting of the reaped process).
fn compact_measured(server: &Server) -> (f64, u64) {
    let started = Instant::now();
    // Reaped by `wait4` below, which also answers its peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(common::FLYWHEEL)
        .args(["compact", "--cold-after", "0", "--config"])
        .arg(&server.config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `rusage` is plain data that `wait4` fills in; the child is reaped once, here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "compact failed: {status}");
    (started.elapsed().as_secs_f64(), usage.ru_maxrss as u64 * 1024)
}

/// Peak RSS of a server that compacts on its own schedule: the corpus uploaded with compaction
/// off, then the server started again with it on, and its high-water mark read once every
/// chunk object is a pointer.
fn compaction_rss_in_server(paths: &[CorpusPath]) -> u64 {
    let mut server = Server::start_with(Backend::Local, "[compaction]\ninterval = 0\ncold-after = 0\n");
    server.create_cache("bench", false);
    let token = server.admin_token();
    upload_all(&server, &token, paths, |_| true);
    let config = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, config.replace("interval = 0", "interval = 2")).unwrap();
    server.restart();
    let pointer_len = flywheel_core::chunk::pack::POINTER_LEN as u64;
    let started = Instant::now();
    while !server.object_sizes("chunks").values().all(|&len| len == pointer_len) {
        assert!(started.elapsed().as_secs() < 600, "the server's compaction did not finish");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// The corpus's chunks as compaction packs them: NARs by name, each chunk where first seen.
fn unique_chunks(paths: &[CorpusPath]) -> Vec<Vec<u8>> {
    let mut by_name: Vec<&CorpusPath> = paths.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    let mut seen = std::collections::HashSet::new();
    let mut chunks = Vec::new();
    for path in by_name {
        let nar = std::fs::read(&path.nar).unwrap();
        let mut chunker = flywheel_core::chunk::Chunker::new(flywheel_core::chunk::ChunkParams::default());
        let mut keep = |chunk: Vec<u8>| -> Result<(), ()> {
            if seen.insert(flywheel_core::chunk::ChunkHash::of(&chunk)) {
                chunks.push(chunk);
            }
            Ok(())
        };
        chunker.push(&nar, &mut keep).unwrap();
        chunker.finish(&mut keep).unwrap();
    }
    chunks
}

/// Bytes in a MiB, for memory figures.
const MIB: f64 = 1024.0 * 1024.0;

/// Size of a trained dictionary: the one the first measurement used.
const DICTIONARY_LEN: usize = 110 * 1024;

/// Bytes of `chunks` compressed at level 19 in frames of about `frame` bytes (0: a frame per
/// chunk), closed as compaction closes them, with `dictionary` when given.
fn framed_size(chunks: &[Vec<u8>], frame: usize, dictionary: Option<&[u8]>) -> u64 {
    let mut compressor = zstd::bulk::Compressor::with_dictionary(19, dictionary.unwrap_or_default()).unwrap();
    let mut total = 0;
    let mut current: Vec<u8> = Vec::new();
    for chunk in chunks {
        if !current.is_empty() && current.len() + chunk.len() > frame {
            total += compressor.compress(&current).unwrap().len() as u64;
            current.clear();
        }
        current.extend_from_slice(chunk);
    }
    if !current.is_empty() {
        total += compressor.compress(&current).unwrap().len() as u64;
    }
    total
}

/// Stored bytes with and without a dictionary trained on the chunks, for chunks each in a
/// frame and for frames of 256 KiB and 4 MiB: (what, without, with, dictionary included).
fn dictionary_figures(chunks: &[Vec<u8>]) -> Vec<(&'static str, u64, u64)> {
    // About a hundred times the dictionary's size in samples, spread over the corpus.
    let step = (chunks.iter().map(Vec::len).sum::<usize>() / (100 * DICTIONARY_LEN)).max(1);
    let samples: Vec<&Vec<u8>> = chunks.iter().step_by(step).collect();
    let dictionary = zstd::dict::from_samples(&samples, DICTIONARY_LEN).unwrap();
    let layouts = [("a frame per chunk", 0), ("256 KiB frames", 256 << 10), ("4 MiB frames", 4 << 20)];
    std::thread::scope(|scope| {
        let jobs: Vec<_> = layouts
            .iter()
            .map(|&(what, frame)| {
                let dictionary = &dictionary;
                let without = scope.spawn(move || framed_size(chunks, frame, None));
                let with = scope.spawn(move || framed_size(chunks, frame, Some(dictionary)) + dictionary.len() as u64);
                (what, without, with)
            })
            .collect();
        jobs.into_iter().map(|(what, without, with)| (what, without.join().unwrap(), with.join().unwrap())).collect()
    })
}

pub(crate) fn packs_section(report: &mut Report, work: &Path) {
    let paths = corpus(work);
    let nar_bytes: u64 = paths.iter().map(|p| std::fs::metadata(&p.nar).unwrap().len()).sum();
    let mb = |bytes: u64| bytes as f64 / MB;

    // A plain binary cache of the same NARs: each compressed whole, no dedup.
    let whole = |args: &[&str]| -> (u64, f64) {
        let mut bytes = 0;
        let mut seconds = 0.0;
        for path in &paths {
            let out = work.join("whole.tmp");
            seconds += time_to_file(Command::new(args[0]).args(&args[1..]).arg(&path.nar), &out);
            bytes += std::fs::metadata(&out).unwrap().len();
        }
        (bytes, seconds)
    };
    let (xz_bytes, xz_seconds) = whole(&["xz", "-6", "-T1", "-c"]);
    let (zstd3_bytes, _) = whole(&["zstd", "-3", "-T1", "-q", "-c"]);
    let (zstd19_bytes, _) = whole(&["zstd", "-19", "-T1", "-q", "-c"]);

    // Stored as chunks, then compacted with each setting.
    let settings: [(&str, u32, u32); 4] = [
        ("level 19, 4 MiB frames (default)", 19, 4 << 20),
        ("level 19, 1 MiB frames", 19, 1 << 20),
        ("level 19, 256 KiB frames", 19, 256 << 10),
        ("level 9, 4 MiB frames", 9, 4 << 20),
    ];
    let biggest = paths.iter().enumerate().max_by_key(|(_, p)| std::fs::metadata(&p.nar).unwrap().len()).map(|(i, _)| i).unwrap();
    let biggest_mb = mb(std::fs::metadata(&paths[biggest].nar).unwrap().len());
    let mut loose_bytes = 0;
    let mut loose_reads = (0.0, 0.0);
    let mut loose_chunk_ms = 0.0;
    let mut packed = Vec::new();
    for (i, (what, level, frame)) in settings.iter().enumerate() {
        let mut server = Server::start_with(
            Backend::Local,
            &format!("[compaction]\ninterval = 0\nzstd-level = {level}\nframe-size = {frame}\npack-size = {}\n", (*frame).max(1 << 20)),
        );
        server.create_cache("bench", false);
        let token = server.admin_token();
        upload_all(&server, &token, &paths, |_| true);
        if i == 0 {
            loose_bytes = stored_bytes(&server);
            loose_reads = downloads(&mut server, &token, biggest);
            loose_chunk_ms = chunk_read_ms(&mut server, &token, biggest);
        }
        let (compact_seconds, compact_rss) = compact_measured(&server);
        let bytes = stored_bytes(&server);
        let reads = if i == 0 { downloads(&mut server, &token, biggest) } else { (0.0, 0.0) };
        let chunk_ms = chunk_read_ms(&mut server, &token, biggest);
        packed.push((*what, bytes, compact_seconds, compact_rss, reads, chunk_ms));
    }
    let server_rss = compaction_rss_in_server(&paths);

    // Dictionaries, measured apart from the server on the same chunks in the same order (the
    // layouts with two threads at a time: each is single-threaded).
    let chunks = unique_chunks(&paths);
    let chunk_bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let dictionaries = dictionary_figures(&chunks);
    drop(chunks);

    // Ingest of the newer versions into a cache whose older versions are packed, against one
    // whose older versions are loose.
    let newer_bytes: u64 = paths.iter().filter(|p| !p.older).map(|p| std::fs::metadata(&p.nar).unwrap().len()).sum();
    let ingest_newer = |pack_older: bool| {
        median(
            (0..RUNS)
                .map(|_| {
                    let server = Server::start(Backend::Local);
                    server.create_cache("bench", false);
                    let token = server.admin_token();
                    upload_all(&server, &token, &paths, |p| p.older);
                    if pack_older {
                        server.compact(&["--cold-after", "0"]);
                    }
                    let _ = Command::new("sync").status();
                    upload_all(&server, &token, &paths, |p| !p.older)
                })
                .collect(),
        )
    };
    let ingest_loose = ingest_newer(false);
    let ingest_packed = ingest_newer(true);

    // The production layout: chunks in S3.
    let mut s3 = Server::start(Backend::S3);
    s3.create_cache("bench", false);
    let s3_token = s3.admin_token();
    upload_all(&s3, &s3_token, &paths, |p| p.name == paths[biggest].name);
    let s3_loose = downloads(&mut s3, &s3_token, biggest);
    s3.compact(&["--cold-after", "0"]);
    let s3_packed = downloads(&mut s3, &s3_token, biggest);
    drop(s3);

    report.section(
        "Storage: packs of cold chunks against a plain binary cache",
        &format!(
            "A corpus of real trees with several versions of the same packages, as {} store paths ({:.1} MB of NAR): every crate \
             in cargo's registry on this machine that has several versions (each version a path; crates of over 4 MB left out), \
             Nix 2.8 (Debian's files, its symlinks kept as symlinks) and Nix 2.30 (this project's build), and the Rust toolchain's standard library rlibs. \
             Uploaded through `upload-path` to a server on local storage, then packed by `flywheel compact --cold-after 0` \
             (packs of 4 MiB, or of 1 MiB for smaller frames) with each setting, on fresh storage each time ({:.1} MB of unique \
             chunks). Stored bytes are chunk objects (frames, or pointers once packed) and packs. Dictionaries ({} KiB, trained \
             by zstd on a hundred times their size of the chunks) are measured apart from the server, on the same chunks in \
             compaction's order. A server's peak RSS while it compacts is read from the kernel, for `flywheel compact` and \
             for a server that packs the whole corpus on its schedule after a restart. The references compress each NAR whole, as a plain binary cache stores it: `xz -6` (Nix's \
             default) and `zstd`, one thread. Downloads are of the largest path ({}, {biggest_mb:.1} MB), from a server started \
             again, median of {SERVER_RUNS}. Chunk reads are single chunks of it through the chunk API, median of 40 spread \
             over it. Ingest of the newer versions (the newest version of each crate, Nix 2.30 and the rlibs: {:.1} MB) goes \
             into a cache holding the older versions, median of {RUNS} runs on fresh storage.",
            paths.len(),
            mb(nar_bytes),
            mb(chunk_bytes),
            DICTIONARY_LEN / 1024,
            paths[biggest].name,
            mb(newer_bytes),
        ),
    );
    report.row(
        "stored: chunks as uploaded (zstd-3 frame each)",
        format!("{:.1} MB", mb(loose_bytes)),
        format!("whole-NAR xz: {:.1} MB", mb(xz_bytes)),
        format!("{:.2}x the xz cache", loose_bytes as f64 / xz_bytes as f64),
        "",
    );
    for (what, bytes, seconds, rss, _, _) in &packed {
        report.row(
            &format!("stored after compaction: {what}"),
            format!(
                "{:.1} MB (compaction {:.0} s, {:.1} MB/s of unique chunk bytes, peak RSS {:.0} MiB)",
                mb(*bytes),
                seconds,
                mb(chunk_bytes) / seconds,
                *rss as f64 / MIB
            ),
            format!("whole-NAR xz: {:.1} MB ({:.1} MB/s); zstd -19: {:.1} MB; zstd -3: {:.1} MB", mb(xz_bytes), mb(nar_bytes) / xz_seconds, mb(zstd19_bytes), mb(zstd3_bytes)),
            format!("{:.2}x the xz cache", *bytes as f64 / xz_bytes as f64),
            "< 1x the xz cache",
        );
    }
    for (what, without, with) in &dictionaries {
        report.row(
            &format!("stored with a trained dictionary: level 19, {what}"),
            format!("{:.1} MB (with its {} KiB dictionary)", mb(*with), DICTIONARY_LEN / 1024),
            format!("without: {:.1} MB; whole-NAR xz: {:.1} MB", mb(*without), mb(xz_bytes)),
            format!("{:.2}x without; {:.2}x the xz cache", *with as f64 / *without as f64, *with as f64 / xz_bytes as f64),
            "",
        );
    }
    report.row(
        "server peak RSS while it compacts (level 19, 4 MiB frames)",
        format!("{:.0} MiB", server_rss as f64 / MIB),
        format!("`flywheel compact`: {:.0} MiB", packed[0].3 as f64 / MIB),
        String::new(),
        "< 100 MiB",
    );
    let (_, _, _, _, packed_reads, _) = packed[0];
    for (what, loose, packed, s3) in [
        ("download `.nar`", loose_reads.0, packed_reads.0, (s3_loose.0, s3_packed.0)),
        ("download `.nar.zst`", loose_reads.1, packed_reads.1, (s3_loose.1, s3_packed.1)),
    ] {
        report.row(
            &format!("{what}, packed (local)"),
            format!("{:.0} MB/s", biggest_mb / packed),
            format!("unpacked: {:.0} MB/s", biggest_mb / loose),
            format!("{:.2}x unpacked", loose / packed),
            ">= 0.8x unpacked",
        );
        report.row(
            &format!("{what}, packed (S3)"),
            format!("{:.0} MB/s", biggest_mb / s3.1),
            format!("unpacked: {:.0} MB/s", biggest_mb / s3.0),
            format!("{:.2}x unpacked", s3.0 / s3.1),
            ">= 0.8x unpacked",
        );
    }
    for (what, _, _, _, _, chunk_ms) in &packed {
        report.row(
            &format!("one chunk through the chunk API: {what}"),
            format!("{chunk_ms:.2} ms"),
            format!("unpacked: {loose_chunk_ms:.2} ms"),
            format!("{:.2}x unpacked", chunk_ms / loose_chunk_ms),
            "",
        );
    }
    report.row(
        "ingest of the newer versions, older ones packed",
        format!("{:.0} MB/s", mb(newer_bytes) / ingest_packed),
        format!("older ones unpacked: {:.0} MB/s", mb(newer_bytes) / ingest_loose),
        format!("{:.2}x", ingest_loose / ingest_packed),
        ">= 0.95x",
    );
}
