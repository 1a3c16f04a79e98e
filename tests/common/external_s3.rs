//! An S3 server that is already running, named by the environment: `scripts/rustfs.sh` points
//! the S3 tests at a real RustFS this way. Shared by the end-to-end tests (`tests/common`) and
//! the server's storage conformance suite (`server/tests/conformance.rs`).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An S3 server that is already running (RustFS, in `scripts/rustfs.sh`), named by the
/// environment; S3-backed servers then use it instead of their own s3s-fs.
#[derive(Debug, Clone)]
pub struct ExternalS3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// The bucket this server stores in: its own, so that tests running at once never see
    /// each other's objects (the storage config has no key prefix to separate them otherwise).
    pub bucket: String,
}

impl ExternalS3 {
    /// The S3 server named by `FLYWHEEL_TEST_S3_ENDPOINT`, with a fresh bucket created on it;
    /// `None` when the variable is unset (the default: every test starts its own s3s-fs).
    pub fn from_env() -> Option<ExternalS3> {
        let endpoint = std::env::var("FLYWHEEL_TEST_S3_ENDPOINT").ok().filter(|e| !e.is_empty())?;
        // Half a configuration is a mistake to report, not a reason to fall back to s3s-fs.
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| panic!("FLYWHEEL_TEST_S3_ENDPOINT is set but {name} is not"))
        };
        // FLYWHEEL_TEST_S3_BUCKET is the stem of the bucket names: one bucket per server,
        // unique across the test processes that share the S3 server.
        static BUCKETS: AtomicUsize = AtomicUsize::new(0);
        let bucket = format!(
            "{}-{}-{}-{:06x}",
            var("FLYWHEEL_TEST_S3_BUCKET"),
            std::process::id(),
            BUCKETS.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>() & 0xff_ffff
        );
        assert!(bucket.len() <= 63, "bucket name {bucket} is longer than S3 allows; shorten FLYWHEEL_TEST_S3_BUCKET");
        let s3 = ExternalS3 {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            access_key: var("FLYWHEEL_TEST_S3_ACCESS_KEY"),
            secret_key: var("FLYWHEEL_TEST_S3_SECRET_KEY"),
            bucket,
        };
        s3.create_bucket();
        Some(s3)
    }

    /// S3 CreateBucket. object_store has no call for it, so curl signs it (SigV4); RustFS
    /// answers 404 NoSuchBucket to writes into a bucket nobody made.
    fn create_bucket(&self) {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail-with-body", "--max-time", "30", "-X", "PUT"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            // S3 servers want the body's hash signed (s3s refuses the request without it);
            // this one is of the empty body.
            .args(["-H", "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"])
            .arg(format!("{}/{}", self.endpoint, self.bucket))
            .output()
            .expect("running curl (apt-get install curl)");
        assert!(
            out.status.success(),
            "creating bucket {} at {}: {}{}",
            self.bucket,
            self.endpoint,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A client of the bucket.
    pub fn store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(true)
            .build()
            .expect("configuring the S3 client")
    }
}
