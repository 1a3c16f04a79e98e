//! The HTTP client of S3 storage on plain-HTTP endpoints: object_store's requests over hyper,
//! with delayed acknowledgements turned off on every read.
//!
//! An S3 server that does not set `TCP_NODELAY` (s3s-fs, the S3 layer RustFS is built on,
//! does not) writes a response's head and its body apart, and Nagle's algorithm holds the
//! body until the head is acknowledged. Linux acknowledges a request-response connection late
//! (up to 40 ms), so every GET on a kept-alive connection took 44 ms whatever its size:
//! measured with s3s-fs, 44 ms per 20 KB object, 0.4 ms with `TCP_QUICKACK` set before each
//! read. A lazy mount's miss is such a GET. The flag does not stick (the kernel leaves quick-ack
//! mode on its own), so it is set again before every read. HTTPS endpoints keep object_store's
//! own client: TLS would need a second stack here, and a remote S3 over TLS is not a loopback
//! one whose 40 ms dwarf its round trip.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector as TcpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::client::{HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse, HttpResponseBody, HttpService};
use object_store::ClientOptions;
use tokio::net::TcpStream;

/// object_store's [`HttpConnector`] for plain-HTTP S3 endpoints (see the module's doc).
#[derive(Debug, Clone)]
pub struct QuickAckConnector {
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl QuickAckConnector {
    /// Connections give up after `connect_timeout`; a request, its body read whole included,
    /// after `request_timeout` (what object_store's own client does with the same settings).
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Self {
        QuickAckConnector { connect_timeout, request_timeout }
    }
}

impl HttpConnector for QuickAckConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut tcp = TcpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(self.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(QuickAckTcp(tcp));
        Ok(HttpClient::new(QuickAckService { client, request_timeout: self.request_timeout }))
    }
}

/// Connects as hyper-util's connector does, and wraps the stream.
#[derive(Clone, Debug)]
struct QuickAckTcp(TcpConnector);

impl tower_service::Service<http::Uri> for QuickAckTcp {
    type Response = QuickAckStream;
    type Error = <TcpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAckStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(QuickAckStream(connecting.await?)) })
    }
}

/// A TCP stream that turns quick acknowledgements on before each read.
struct QuickAckStream(TokioIo<TcpStream>);

fn quick_ack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of its size. A failure leaves the
    // kernel's default, which is only slower.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl hyper::rt::Read for QuickAckStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        quick_ack(self.0.inner());
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for QuickAckStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for QuickAckStream {
    fn connected(&self) -> Connected {
        self.0.inner().connected()
    }
}

#[derive(Debug)]
struct QuickAckService {
    client: Client<QuickAckTcp, HttpRequestBody>,
    request_timeout: Duration,
}

#[async_trait::async_trait]
impl HttpService for QuickAckService {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let response = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| HttpError::new(HttpErrorKind::Timeout, TimedOut))?
            .map_err(|err| {
                let kind = if err.is_connect() { HttpErrorKind::Connect } else { HttpErrorKind::Request };
                HttpError::new(kind, err)
            })?;
        let (parts, body) = response.into_parts();
        let body = BodyUntil { body, deadline: Box::pin(tokio::time::sleep_until(deadline)) };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// The request timed out.
#[derive(Debug, thiserror::Error)]
#[error("the S3 request did not finish within its timeout")]
struct TimedOut;

/// A response body that fails once the request's deadline passes.
struct BodyUntil {
    body: hyper::body::Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for BodyUntil {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            // A cut connection mid-body is worth a retry, as object_store's own client says.
            return Poll::Ready(frame.map(|f| f.map_err(|err| HttpError::new(HttpErrorKind::Interrupted, err))));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Timeout, TimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{ObjectStore, ObjectStoreExt};
    use std::io::{Read, Write};

    /// A server that writes each response's head and body apart on a socket with Nagle's
    /// algorithm on, as s3s-fs does; returns its address.
    fn nagle_server(body: Vec<u8>) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            request.drain(..end + 4);
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"x\"\r\n\r\n", body.len());
                            if stream.write_all(head.as_bytes()).is_err() || stream.write_all(&body).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn store(addr: std::net::SocketAddr, quick: bool) -> Box<dyn ObjectStore> {
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_endpoint(format!("http://{addr}"))
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig { max_retries: 1, ..Default::default() });
        if quick {
            builder = builder.with_http_connector(QuickAckConnector::new(Duration::from_secs(5), Duration::from_secs(30)));
        }
        Box::new(builder.build().unwrap())
    }

    #[tokio::test]
    async fn gets_through_the_connector_return_the_bodies() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        let addr = nagle_server(body.clone());
        let store = store(addr, true);
        for _ in 0..5 {
            let got = store.get(&object_store::path::Path::from("o")).await.unwrap().bytes().await.unwrap();
            assert_eq!(&got[..], &body[..]);
        }
    }

    #[tokio::test]
    async fn a_server_that_stops_mid_body_is_an_error_not_a_short_object() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this");
            }
        });
        let store = store(addr, true);
        let result = async { store.get(&object_store::path::Path::from("o")).await?.bytes().await }.await;
        assert!(result.is_err(), "a body cut short must fail: {result:?}");
    }
}
