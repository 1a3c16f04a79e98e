//! A fault-injecting HTTP/1.1 proxy for the path between `flywheel serve` and S3.
//!
//! Every client connection carries exactly one request: the proxy reads its head and body
//! (`Content-Length` or chunked), decides its fate, and answers with `Connection: close`, so
//! request boundaries never depend on keep-alive state. Fates, switchable at run time through
//! [`FaultProxy::set_plan`]:
//! - latency added before every request;
//! - an S3 error answered without forwarding: 503 `SlowDown` or 500 `InternalError`;
//! - a connection reset (RST): either before forwarding, with half the request body read, or
//!   after forwarding, so S3 applied the request but its answer is lost;
//! - a partial body: S3's answer is forwarded with its full `Content-Length` but only half the
//!   body, then the connection closes;
//! - failing PUTs: past the first K PUTs, or to keys containing a given string, PUTs are
//!   answered 500 without forwarding;
//! - down: the port refuses connections until [`FaultProxy::set_down`] brings it back.
//!
//! Random fates come from a seeded RNG; the seed is printed, and `FAULT_SEED` replays one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// The largest request or response head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// How long the proxy waits on either side before giving up on a connection.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What the proxy does to the requests it sees.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Added before every request is handled.
    pub latency: Duration,
    /// Random faults apply only to these methods (`"GET"`, `"PUT"`, ...); empty: to all.
    pub methods: Vec<&'static str>,
    /// Fraction of requests answered 503 `SlowDown`.
    pub slowdown: f64,
    /// Fraction of requests answered 500 `InternalError`.
    pub internal_error: f64,
    /// Fraction of requests whose connection is reset.
    pub reset: f64,
    /// Fraction of requests whose answer body is cut in half.
    pub partial: f64,
    /// With `Some(k)`, PUTs after the first `k` (counted from the last `set_plan`) fail with 500.
    pub fail_puts_after: Option<u64>,
    /// PUTs whose request target contains one of these fail with 500.
    pub fail_puts_to: Vec<&'static str>,
}

/// How many requests met which fate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub slowdowns: u64,
    pub internal_errors: u64,
    pub resets: u64,
    pub partials: u64,
    pub failed_puts: u64,
    pub forwarded_puts: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    slowdowns: AtomicU64,
    internal_errors: AtomicU64,
    resets: AtomicU64,
    partials: AtomicU64,
    failed_puts: AtomicU64,
    forwarded_puts: AtomicU64,
    /// PUTs seen since the plan was set, for `fail_puts_after`.
    puts_in_plan: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<Plan>,
    rng: Mutex<rand::rngs::StdRng>,
    counters: Counters,
    /// Whether the port should be closed, and whether it is listening now.
    port: Mutex<PortState>,
    port_changed: Condvar,
    stopped: AtomicBool,
}

#[derive(Default)]
struct PortState {
    down: bool,
    listening: bool,
}

/// The proxy; listens on 127.0.0.1 until dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`, the endpoint to give the server.
    pub url: String,
    pub seed: u64,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// What the proxy does with one request.
enum Fate {
    Forward,
    Answer(u16, &'static str),
    ResetBefore,
    ResetAfter,
    Partial,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (`http://127.0.0.1:PORT`), passing everything
    /// through until a plan is set.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();
        let seed = std::env::var("FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
        eprintln!("fault proxy seed: {seed} (FAULT_SEED={seed} replays it)");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan::default()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            counters: Counters::default(),
            port: Mutex::new(PortState { down: false, listening: true }),
            port_changed: Condvar::new(),
            stopped: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        std::thread::spawn(move || accept_loop(listener, addr, accept_shared));
        FaultProxy { url: format!("http://{addr}"), seed, addr, shared }
    }

    /// Replaces the plan; `fail_puts_after` counts from now.
    pub fn set_plan(&self, plan: Plan) {
        *self.shared.plan.lock().unwrap() = plan;
        self.shared.counters.puts_in_plan.store(0, Ordering::SeqCst);
    }

    /// Passes everything through again.
    pub fn clear(&self) {
        self.set_plan(Plan::default());
    }

    /// Down: the port is closed, so connections are refused; up: it listens again. Returns
    /// once the port is in that state.
    pub fn set_down(&self, down: bool) {
        self.shared.port.lock().unwrap().down = down;
        self.shared.port_changed.notify_all();
        if down {
            // Wake the accept loop so that it closes the listener now.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        let port = self.shared.port.lock().unwrap();
        let (port, timeout) = self
            .shared
            .port_changed
            .wait_timeout_while(port, Duration::from_secs(10), |p| p.listening == down && !self.shared.stopped.load(Ordering::SeqCst))
            .unwrap();
        assert!(!timeout.timed_out() || port.listening != down, "the fault proxy did not switch its port");
    }

    /// Whether the port accepts connections right now.
    pub fn is_listening(&self) -> bool {
        TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok()
    }

    pub fn counts(&self) -> Counts {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Counts {
            requests: load(&c.requests),
            slowdowns: load(&c.slowdowns),
            internal_errors: load(&c.internal_errors),
            resets: load(&c.resets),
            partials: load(&c.partials),
            failed_puts: load(&c.failed_puts),
            forwarded_puts: load(&c.forwarded_puts),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.set_down(true);
    }
}

fn accept_loop(mut listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept() else { continue };
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        if shared.port.lock().unwrap().down {
            drop(client);
            drop(listener);
            let mut port = shared.port.lock().unwrap();
            port.listening = false;
            shared.port_changed.notify_all();
            while port.down && !shared.stopped.load(Ordering::SeqCst) {
                port = shared.port_changed.wait(port).unwrap();
            }
            drop(port);
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            // std sets SO_REUSEADDR on listeners, so the port is free again at once; a few
            // tries cover a slow close.
            listener = (0..50)
                .find_map(|_| {
                    TcpListener::bind(addr).map_err(|_| std::thread::sleep(Duration::from_millis(20))).ok()
                })
                .expect("the fault proxy could not listen on its port again");
            shared.port.lock().unwrap().listening = true;
            shared.port_changed.notify_all();
            continue;
        }
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = handle(client, &shared);
        });
    }
}

/// One HTTP message as read off a socket: its head and its raw (still framed) body.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
    /// The declared `Content-Length`; `None` for chunked or bodiless answers, which are never cut.
    content_length: Option<usize>,
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too long"));
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            return Ok(Some(head));
        }
    }
}

fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head).ok()?.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a body framed by `Content-Length` or chunked encoding (or, for `until_eof`, by the
/// end of the connection).
fn read_body(reader: &mut impl BufRead, head: &[u8], until_eof: bool) -> std::io::Result<(Vec<u8>, Option<usize>)> {
    let chunked = header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut raw = Vec::new();
        loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line)?;
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size = usize::from_str_radix(text.trim().split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size line {text:?}")))?;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let mut trailer = Vec::new();
                    if reader.read_until(b'\n', &mut trailer)? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    raw.extend_from_slice(&trailer);
                    if trailer == b"\r\n" || trailer == b"\n" {
                        return Ok((raw, None));
                    }
                }
            }
            let start = raw.len();
            raw.resize(start + size + 2, 0);
            reader.read_exact(&mut raw[start..])?;
        }
    }
    if let Some(len) = header(head, "content-length") {
        let len: usize = len.parse().map_err(|_| std::io::Error::other("bad content-length"))?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        return Ok((body, Some(len)));
    }
    let mut body = Vec::new();
    if until_eof {
        reader.read_to_end(&mut body)?;
    }
    Ok((body, None))
}

/// The head with its `Connection` header replaced by `Connection: close`.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let is_connection = line.split_once(':').is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("connection"));
        if line == "\r\n" || line == "\n" {
            out.push_str("Connection: close\r\n\r\n");
        } else if !is_connection {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

fn reset(stream: &TcpStream) {
    // SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn s3_error(status: u16, code: &str) -> Vec<u8> {
    let reason = if status == 503 { "Service Unavailable" } else { "Internal Server Error" };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the fault proxy</Message><RequestId>fault</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn decide(shared: &Shared, method: &str, target: &str) -> Fate {
    let plan = shared.plan.lock().unwrap().clone();
    if !plan.latency.is_zero() {
        std::thread::sleep(plan.latency);
    }
    if method == "PUT" {
        let nth = shared.counters.puts_in_plan.fetch_add(1, Ordering::SeqCst);
        if plan.fail_puts_after.is_some_and(|k| nth >= k) || plan.fail_puts_to.iter().any(|key| target.contains(key)) {
            shared.counters.failed_puts.fetch_add(1, Ordering::SeqCst);
            return Fate::Answer(500, "InternalError");
        }
    }
    if !plan.methods.is_empty() && !plan.methods.contains(&method) {
        return Fate::Forward;
    }
    let (draw, half): (f64, bool) = {
        let mut rng = shared.rng.lock().unwrap();
        (rng.gen(), rng.gen())
    };
    let c = &shared.counters;
    let mut edge = plan.slowdown;
    if draw < edge {
        c.slowdowns.fetch_add(1, Ordering::SeqCst);
        return Fate::Answer(503, "SlowDown");
    }
    edge += plan.internal_error;
    if draw < edge {
        c.internal_errors.fetch_add(1, Ordering::SeqCst);
        return Fate::Answer(500, "InternalError");
    }
    edge += plan.reset;
    if draw < edge {
        c.resets.fetch_add(1, Ordering::SeqCst);
        return if half { Fate::ResetBefore } else { Fate::ResetAfter };
    }
    edge += plan.partial;
    if draw < edge {
        return Fate::Partial;
    }
    Fate::Forward
}

fn handle(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(head) = read_head(&mut reader)? else { return Ok(()) };
    let request_line = String::from_utf8_lossy(head.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut words = request_line.split(' ');
    let (method, target) = (words.next().unwrap_or_default().to_string(), words.next().unwrap_or_default().to_string());
    shared.counters.requests.fetch_add(1, Ordering::SeqCst);
    let fate = decide(shared, &method, &target);
    let mut client_w = client;
    if let Fate::ResetBefore = fate {
        // Half the body (if any) is read, then the connection is torn down mid-request.
        if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
            let mut half = vec![0; len / 2];
            let _ = reader.read_exact(&mut half);
        }
        reset(&client_w);
        return Ok(());
    }
    let (body, _) = read_body(&mut reader, &head, false)?;
    if let Fate::Answer(status, code) = fate {
        client_w.write_all(&s3_error(status, code))?;
        return Ok(());
    }
    if method == "PUT" {
        shared.counters.forwarded_puts.fetch_add(1, Ordering::SeqCst);
    }
    let response = forward(shared.upstream, &head, &body, &method)?;
    match fate {
        Fate::ResetAfter => {
            // S3 did what was asked; the answer is lost.
            reset(&client_w);
        }
        Fate::Partial if response.content_length.is_some_and(|len| len >= 2) => {
            shared.counters.partials.fetch_add(1, Ordering::SeqCst);
            client_w.write_all(&closing(&response.head))?;
            client_w.write_all(&response.body[..response.body.len() / 2])?;
            client_w.flush()?;
            let _ = client_w.shutdown(std::net::Shutdown::Write);
        }
        _ => {
            client_w.write_all(&closing(&response.head))?;
            client_w.write_all(&response.body)?;
            client_w.flush()?;
            let _ = client_w.shutdown(std::net::Shutdown::Write);
        }
    }
    Ok(())
}

fn forward(upstream: SocketAddr, head: &[u8], body: &[u8], method: &str) -> std::io::Result<Message> {
    let server = TcpStream::connect_timeout(&upstream, IO_TIMEOUT)?;
    server.set_read_timeout(Some(IO_TIMEOUT))?;
    server.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut server_w = server.try_clone()?;
    server_w.write_all(&closing(head))?;
    server_w.write_all(body)?;
    server_w.flush()?;
    let mut reader = BufReader::new(server);
    let head = read_head(&mut reader)?.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    let status: u16 = String::from_utf8_lossy(&head).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let bodiless = method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let (body, content_length) = if bodiless { (Vec::new(), None) } else { read_body(&mut reader, &head, true)? };
    Ok(Message { head, body, content_length })
}
