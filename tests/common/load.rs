//! A load run bounded in time and in requests: clients that fetch narinfos and clients that
//! download NARs, in loops, against a Nix binary cache (flywheel, or nginx over a `file://`
//! cache as the reference). Used by tests/server_ops.rs (zero errors) and the benchmark
//! (latency percentiles).

use std::time::{Duration, Instant};

use sha2::Digest;

/// One store path as a binary cache serves it.
#[derive(Debug, Clone)]
pub struct Target {
    pub narinfo_url: String,
    pub nar_url: String,
    /// Length and SHA-256 of the NAR file as one download before the load got it (and, when
    /// the narinfo has a `FileSize`, as it says): every download under load must match.
    pub file_size: u64,
    pub file_sha256: [u8; 32],
}

/// Reads the narinfo of each hash part under `cache_url` and returns what the load fetches.
pub fn targets(cache_url: &str, token: Option<&str>, hash_parts: &[&str]) -> Vec<Target> {
    let client = reqwest::blocking::Client::new();
    hash_parts
        .iter()
        .map(|hash| {
            let narinfo_url = format!("{cache_url}/{hash}.narinfo");
            let mut request = client.get(&narinfo_url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let text = request.send().unwrap().error_for_status().unwrap().text().unwrap();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                    .to_string()
            };
            let nar_url = format!("{cache_url}/{}", field("URL"));
            let mut request = client.get(&nar_url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let nar = request.send().unwrap().error_for_status().unwrap().bytes().unwrap();
            if let Some(size) = text.lines().find_map(|l| l.strip_prefix("FileSize: ")) {
                assert_eq!(size.parse::<usize>().unwrap(), nar.len(), "{nar_url}: FileSize disagrees");
            }
            Target { nar_url, file_size: nar.len() as u64, file_sha256: sha2::Sha256::digest(&nar).into(), narinfo_url }
        })
        .collect()
}

/// Latencies and errors of a load run.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub narinfo: Vec<Duration>,
    pub nar: Vec<Duration>,
    pub nar_bytes: u64,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl LoadResult {
    /// The `p`-th percentile (0..=100) of sorted latencies, in milliseconds.
    pub fn percentile_ms(latencies: &[Duration], p: f64) -> f64 {
        let mut sorted = latencies.to_vec();
        sorted.sort();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
    }
}

enum Kind {
    Narinfo,
    Nar,
}

/// Runs `narinfo_clients` + `nar_clients` threads for `duration`, each making at most
/// `max_requests` requests over one keep-alive connection, cycling over `targets`.
pub fn run(
    targets: &[Target],
    token: Option<&str>,
    narinfo_clients: usize,
    nar_clients: usize,
    duration: Duration,
    max_requests: usize,
) -> LoadResult {
    let start = Instant::now();
    let deadline = start + duration;
    let threads: Vec<_> = (0..narinfo_clients + nar_clients)
        .map(|n| {
            let kind = if n < narinfo_clients { Kind::Narinfo } else { Kind::Nar };
            let targets = targets.to_vec();
            let token = token.map(str::to_string);
            std::thread::spawn(move || client_loop(n, kind, &targets, token.as_deref(), deadline, max_requests))
        })
        .collect();
    let mut result = LoadResult::default();
    for thread in threads {
        let part = thread.join().expect("a load client panicked");
        result.narinfo.extend(part.narinfo);
        result.nar.extend(part.nar);
        result.nar_bytes += part.nar_bytes;
        result.errors.extend(part.errors);
    }
    result.elapsed = start.elapsed();
    result
}

fn client_loop(n: usize, kind: Kind, targets: &[Target], token: Option<&str>, deadline: Instant, max: usize) -> LoadResult {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let mut out = LoadResult::default();
    for i in 0..max {
        if Instant::now() >= deadline {
            break;
        }
        let target = &targets[(n + i) % targets.len()];
        let url = match kind {
            Kind::Narinfo => &target.narinfo_url,
            Kind::Nar => &target.nar_url,
        };
        let mut request = client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let started = Instant::now();
        let body = request.send().and_then(|r| r.error_for_status()).and_then(|r| r.bytes());
        let elapsed = started.elapsed();
        match (body, &kind) {
            (Err(err), _) => out.errors.push(format!("{url}: {err}")),
            (Ok(body), Kind::Narinfo) if !body.starts_with(b"StorePath: ") => {
                out.errors.push(format!("{url}: not a narinfo: {:?}", String::from_utf8_lossy(&body[..body.len().min(80)])))
            }
            (Ok(body), Kind::Nar) if body.len() as u64 != target.file_size => {
                out.errors.push(format!("{url}: {} bytes, not {}", body.len(), target.file_size))
            }
            (Ok(body), Kind::Nar) if <[u8; 32]>::from(sha2::Sha256::digest(&body)) != target.file_sha256 => {
                out.errors.push(format!("{url}: other bytes than before the load"))
            }
            (Ok(body), Kind::Narinfo) => {
                let _ = body;
                out.narinfo.push(elapsed);
            }
            (Ok(body), Kind::Nar) => {
                out.nar_bytes += body.len() as u64;
                out.nar.push(elapsed);
            }
        }
    }
    out
}
