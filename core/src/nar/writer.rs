//! Writing NARs: a low-level token writer and a dump of a filesystem tree, byte for byte what
//! `nix-store --dump` writes.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{padding, MAGIC};

/// Writes the strings a NAR is made of.
pub struct NarWriter<W> {
    out: W,
    written: u64,
}

impl<W: Write> NarWriter<W> {
    /// Starts a NAR on `out`, writing the magic.
    pub fn new(out: W) -> io::Result<Self> {
        let mut writer = NarWriter { out, written: 0 };
        writer.str(MAGIC.as_bytes())?;
        Ok(writer)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Gives back the underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        self.raw(&[0u8; 8][..padding(len)])
    }

    /// Writes one length-prefixed, padded string.
    pub fn str(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.raw(&(bytes.len() as u64).to_le_bytes())?;
        self.raw(bytes)?;
        self.pad(bytes.len() as u64)
    }

    /// Writes a regular file whose contents come from `contents` and are exactly `size` bytes.
    pub fn regular(&mut self, executable: bool, size: u64, contents: &mut impl Read) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"regular")?;
        if executable {
            self.str(b"executable")?;
            self.str(b"")?;
        }
        self.str(b"contents")?;
        self.raw(&size.to_le_bytes())?;
        let copied = io::copy(&mut contents.take(size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank while being archived: {copied} of {size} bytes"),
            ));
        }
        self.pad(size)?;
        self.str(b")")
    }

    /// Writes a symlink.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        for token in [&b"("[..], b"type", b"symlink", b"target"] {
            self.str(token)?;
        }
        self.str(target)?;
        self.str(b")")
    }

    /// Opens a directory; follow with [`NarWriter::entry`] calls in byte order of the names,
    /// then [`NarWriter::end_directory`].
    pub fn start_directory(&mut self) -> io::Result<()> {
        for token in [&b"("[..], b"type", b"directory"] {
            self.str(token)?;
        }
        Ok(())
    }

    /// Opens an entry of the current directory; write its node next, then
    /// [`NarWriter::end_entry`].
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        for token in [&b"entry"[..], b"(", b"name", name, b"node"] {
            self.str(token)?;
        }
        Ok(())
    }

    /// Closes an entry.
    pub fn end_entry(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Closes a directory.
    pub fn end_directory(&mut self) -> io::Result<()> {
        self.str(b")")
    }
}

/// Serializes the tree at `path` as a NAR onto `out`, as `nix-store --dump` does; returns the
/// NAR's length.
pub fn dump_path(path: &Path, out: impl Write) -> io::Result<u64> {
    let mut writer = NarWriter::new(out)?;
    dump_node(path, &mut writer)?;
    Ok(writer.written())
}

fn dump_node<W: Write>(path: &Path, writer: &mut NarWriter<W>) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target = std::fs::read_link(path)?;
        writer.symlink(target.as_os_str().as_bytes())
    } else if file_type.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut file = std::fs::File::open(path)?;
        writer.regular(executable, meta.len(), &mut file)
    } else if file_type.is_dir() {
        let mut names: Vec<_> =
            std::fs::read_dir(path)?.map(|entry| entry.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        writer.start_directory()?;
        for name in names {
            writer.entry(name.as_bytes())?;
            dump_node(&path.join(&name), writer)?;
            writer.end_entry()?;
        }
        writer.end_directory()
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file, directory or symlink", path.display()),
        ))
    }
}
