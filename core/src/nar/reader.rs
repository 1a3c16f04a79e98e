//! The validating NAR reader.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

use super::index::{check_name, check_target};
use super::{padding, Node, MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
use crate::error::{Error, Result};

/// What reading a whole NAR yields.
#[derive(Debug, Clone)]
pub struct ParsedNar {
    /// The file index.
    pub root: Node,
    /// Length of the NAR in bytes.
    pub nar_size: u64,
}

/// Reads one NAR from `source` to its end, validating it as Nix does, and builds its index.
///
/// Fails on anything `nix-store --restore` would refuse (bad magic, unknown tags, non-zero
/// padding, names that are empty, `.`, `..`, or hold `/` or NUL, entries out of order or
/// repeated), on a truncated stream, and on bytes after the end of the archive.
pub fn parse<R: Read>(source: R) -> Result<ParsedNar> {
    let mut reader = Reader { inner: BufReader::with_capacity(256 * 1024, source), pos: 0 };
    reader.expect_str(MAGIC, "NAR magic")?;
    let root = reader.tree()?;
    if !reader.inner.fill_buf()?.is_empty() {
        return Err(Error::invalid(format!("trailing data after the end of the NAR at byte {}", reader.pos)));
    }
    Ok(ParsedNar { root, nar_size: reader.pos })
}

struct Reader<R> {
    inner: BufReader<R>,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|err| truncated_or(err, self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64> {
        let mut buf = [0u8; 8];
        self.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    fn padding(&mut self, len: u64) -> Result<()> {
        let pad = padding(len);
        if pad > 0 {
            let mut buf = [0u8; 8];
            self.read_exact(&mut buf[..pad])?;
            if buf[..pad].iter().any(|&b| b != 0) {
                return Err(Error::invalid(format!("non-zero padding in NAR at byte {}", self.pos)));
            }
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; `what` names it in errors.
    fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max as u64 {
            return Err(Error::invalid(format!("{what} at byte {at} is {len} bytes long, over the limit of {max}")));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        self.padding(len)?;
        Ok(buf)
    }

    fn token(&mut self) -> Result<Vec<u8>> {
        self.bytes(32, "NAR token")
    }

    fn expect_str(&mut self, expected: &str, what: &str) -> Result<()> {
        let at = self.pos;
        let got = self.bytes(64, what)?;
        if got != expected.as_bytes() {
            return Err(Error::invalid(format!(
                "expected {what} {expected:?} at byte {at}, found {:?}",
                String::from_utf8_lossy(&got)
            )));
        }
        Ok(())
    }

    /// Reads the opening of a node at `depth` (components below the root): a file or symlink
    /// whole, a directory up to its first entry.
    fn node_start(&mut self, depth: usize) -> Result<Started> {
        if depth > MAX_DEPTH {
            return Err(Error::invalid(format!("NAR nests directories deeper than {MAX_DEPTH}")));
        }
        self.expect_str("(", "opening of a node")?;
        self.expect_str("type", "node type tag")?;
        let at = self.pos;
        let node = match self.token()?.as_slice() {
            b"regular" => self.regular()?,
            b"symlink" => {
                self.expect_str("target", "symlink target tag")?;
                let at = self.pos;
                let target = self.bytes(MAX_TARGET_LEN, "symlink target")?;
                check_target(&target).map_err(|msg| Error::invalid(format!("{msg} at byte {at}")))?;
                let target = String::from_utf8(target).map_err(|_| {
                    Error::invalid(format!("symlink target at byte {at} is not UTF-8"))
                })?;
                self.expect_str(")", "end of symlink")?;
                Node::Symlink { target }
            }
            b"directory" => return Ok(Started::Directory),
            other => {
                return Err(Error::invalid(format!(
                    "unknown node type {:?} at byte {at}",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        Ok(Started::Leaf(node))
    }

    /// Reads the tree below the magic. Directories are kept on an explicit stack rather than
    /// by recursion, so the depth limit is a choice, not a property of the thread's stack.
    fn tree(&mut self) -> Result<Node> {
        let mut open: Vec<OpenDir> = Vec::new();
        let mut started = self.node_start(0)?;
        loop {
            // Attach what was just read, or open it.
            let mut finished = match started {
                Started::Directory => {
                    open.push(OpenDir { entries: Vec::new(), previous: None, name: String::new() });
                    None
                }
                Started::Leaf(node) => Some(node),
            };
            // Close the directories that end here, then find the next entry to read.
            loop {
                if let Some(node) = finished.take() {
                    let Some(parent) = open.last_mut() else { return Ok(node) };
                    self.expect_str(")", "end of directory entry")?;
                    let name = std::mem::take(&mut parent.name);
                    parent.entries.push((name, node));
                }
                let Some(dir) = open.last_mut() else {
                    return Err(Error::internal("NAR reader lost its place"));
                };
                let at = self.pos;
                match self.token()?.as_slice() {
                    b")" => {
                        let Some(done) = open.pop() else { continue };
                        // Built from sorted entries, the map's nodes are full: about half the
                        // memory per entry of inserting one by one.
                        finished = Some(Node::Directory { entries: BTreeMap::from_iter(done.entries) });
                        continue;
                    }
                    b"entry" => {}
                    other => {
                        return Err(Error::invalid(format!(
                            "expected \"entry\" or \")\" at byte {at}, found {:?}",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
                self.expect_str("(", "opening of a directory entry")?;
                self.expect_str("name", "entry name tag")?;
                let at = self.pos;
                let name = self.bytes(MAX_NAME_LEN, "file name")?;
                check_name(&name).map_err(|msg| Error::invalid(format!("{msg} in NAR at byte {at}")))?;
                if let Some(prev) = &dir.previous {
                    if name.as_slice() <= prev.as_slice() {
                        return Err(Error::invalid(format!(
                            "NAR entry {:?} at byte {at} is not sorted after {:?} (or repeats it)",
                            String::from_utf8_lossy(&name),
                            String::from_utf8_lossy(prev)
                        )));
                    }
                }
                dir.name = String::from_utf8(name.clone())
                    .map_err(|_| Error::invalid(format!("file name at byte {at} is not UTF-8")))?;
                dir.previous = Some(name);
                self.expect_str("node", "entry node tag")?;
                let depth = open.len();
                started = self.node_start(depth)?;
                break;
            }
        }
    }

    fn regular(&mut self) -> Result<Node> {
        let mut executable = false;
        let mut tag = self.token()?;
        if tag == b"executable" {
            executable = true;
            self.expect_str("", "executable marker")?;
            tag = self.token()?;
        }
        match tag.as_slice() {
            b"contents" => {}
            // A regular file without contents is not something Nix writes; refuse it rather than
            // guess its meaning.
            other => {
                return Err(Error::invalid(format!(
                    "expected \"contents\" at byte {}, found {:?}",
                    self.pos,
                    String::from_utf8_lossy(other)
                )))
            }
        }
        let size = self.u64()?;
        let nar_offset = self.pos;
        self.skip(size)?;
        self.padding(size)?;
        self.expect_str(")", "end of regular file")?;
        Ok(Node::Regular { size, executable, nar_offset })
    }

    fn skip(&mut self, mut len: u64) -> Result<()> {
        while len > 0 {
            let available = self.inner.fill_buf().map_err(|err| truncated_or(err, self.pos))?;
            if available.is_empty() {
                return Err(Error::invalid(format!("NAR is truncated at byte {}", self.pos)));
            }
            let take = available.len().min(len.min(usize::MAX as u64) as usize);
            self.inner.consume(take);
            self.pos += take as u64;
            len -= take as u64;
        }
        Ok(())
    }
}

/// The opening of a node: a file or symlink read whole, or a directory whose entries follow.
enum Started {
    Leaf(Node),
    Directory,
}

/// A directory being read: its entries so far, the last name (for the order check), and the
/// name of the entry being read.
struct OpenDir {
    entries: Vec<(String, Node)>,
    previous: Option<Vec<u8>>,
    name: String,
}

fn truncated_or(err: std::io::Error, pos: u64) -> Error {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::invalid(format!("NAR is truncated at byte {pos}"))
    } else {
        Error::from(err).context(format!("reading NAR at byte {pos}"))
    }
}
