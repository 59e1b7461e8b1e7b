//! Safetensors output written by positional writes into a reserved file, for streamed rewrites:
//! the file is sized and its blocks reserved up front (`fallocate`), so with the header fixed by
//! the specs every tensor's place in it is known, and any thread may write any piece of any
//! tensor (`pwrite`) as soon as it is computed, in whatever order the work finishes.
//!
//! - Reserving the blocks first turns a full disk into a clean error at [`create`] time, before
//!   any work (and spares the file system block allocation as the pages are written back).
//! - Pieces are written from small buffers still in cache (a few rows of a weight), so no tensor
//!   is ever materialised whole: the kernel copies each piece into fresh page-cache pages without
//!   zero-filling them first. Measured against filling a shared map of the same file on the 2.2 GB
//!   merge (two threads): about 0.4 s less CPU, and no page faults or TLB shootdowns at all.
//! - [`ReservedTensor::start_writeback`] starts writing a finished tensor back
//!   (`sync_file_range`), so the final fsync waits only for the tail.
//! - The file is written under a temporary name and appears at its path only on [`finish`]
//!   (fsync, then rename), like [`super::AtomicFile`]; dropped unfinished, it is removed.
//!
//! Where the platform or file system offers no `fallocate`, [`create`] returns `None` and the
//! caller writes with [`super::SafetensorsWriter`] instead (same bytes).
//!
//! [`create`]: ReservedSafetensorsWriter::create
//! [`finish`]: ReservedSafetensorsWriter::finish

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::atomic::temp_path_for;
use super::safetensors::{encode_header, TensorSpec};
use crate::error::{Error, Result};

/// A safetensors file being filled by positional writes (see the module docs).
pub struct ReservedSafetensorsWriter {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    data_start: usize,
    specs: Vec<TensorSpec>,
    /// Bytes written into each tensor so far (checked by `finish`).
    written: Vec<AtomicUsize>,
    committed: bool,
}

impl ReservedSafetensorsWriter {
    /// Creates the file for `specs` (in order) under a temporary name beside `path`, reserves its
    /// blocks and writes the header. `Ok(None)` when this platform or file system cannot reserve
    /// (no `fallocate`): write with [`super::SafetensorsWriter`] then. A full disk is an error
    /// naming `path`.
    pub fn create(
        path: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Option<Self>> {
        let target = path.as_ref().to_path_buf();
        let header = encode_header(&specs, metadata)?;
        if !cfg!(target_os = "linux") {
            return Ok(None);
        }
        let data_start = 8 + header.len();
        let len = data_start + specs.iter().map(TensorSpec::nbytes).sum::<usize>();
        let temp = temp_path_for(&target)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(&temp, e))?;
        let writer = ReservedSafetensorsWriter {
            target,
            temp,
            file,
            data_start,
            written: specs.iter().map(|_| AtomicUsize::new(0)).collect(),
            specs,
            committed: false,
        };
        // From here on, dropping `writer` removes the temporary file.
        if let Err(e) = reserve(&writer.file, len) {
            return if unsupported(&e) {
                Ok(None)
            } else {
                Err(Error::io(&writer.target, e))
            };
        }
        let mut start = (header.len() as u64).to_le_bytes().to_vec();
        start.extend_from_slice(&header);
        write_all_at(&writer.file, &start, 0).map_err(|e| Error::io(&writer.target, e))?;
        Ok(Some(writer))
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The specs, in file order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Every tensor's place in the file, in spec order: each may be written by any thread.
    pub fn tensors(&self) -> Vec<ReservedTensor<'_>> {
        let mut offset = self.data_start as u64;
        self.specs
            .iter()
            .zip(&self.written)
            .map(|(spec, written)| {
                let tensor = ReservedTensor {
                    file: &self.file,
                    path: &self.target,
                    offset,
                    len: spec.nbytes(),
                    written,
                };
                offset += spec.nbytes() as u64;
                tensor
            })
            .collect()
    }

    /// Checks that every tensor got exactly its size in bytes (pieces written twice or not at
    /// all would not), then fsyncs and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        for (spec, written) in self.specs.iter().zip(&self.written) {
            let written = written.load(Ordering::Relaxed);
            if written != spec.nbytes() {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor {:?} got {written} bytes written, its size is {}",
                    self.target.display(),
                    spec.name,
                    spec.nbytes()
                )));
            }
        }
        self.file.sync_all().map_err(|e| Error::io(&self.temp, e))?;
        fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for ReservedSafetensorsWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// One tensor's bytes in a [`ReservedSafetensorsWriter`]'s file.
#[derive(Clone, Copy)]
pub struct ReservedTensor<'a> {
    file: &'a File,
    /// The final path, for errors.
    path: &'a Path,
    /// Where the tensor starts in the file.
    offset: u64,
    len: usize,
    written: &'a AtomicUsize,
}

impl ReservedTensor<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset` within the tensor (which must hold them).
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::InvalidArgument(format!(
                "{}: {} bytes at {offset} overflow a tensor of {}",
                self.path.display(),
                bytes.len(),
                self.len
            )));
        }
        write_all_at(self.file, bytes, self.offset + offset as u64)
            .map_err(|e| Error::io(self.path, e))?;
        self.written.fetch_add(bytes.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Starts writing the tensor's bytes back to disk without waiting (Linux
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`; nothing elsewhere).
    pub fn start_writeback(&self) {
        #[cfg(target_os = "linux")]
        if self.len > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor; the call only schedules writeback.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.offset as libc::off64_t,
                    self.len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
    }
}

/// `pwrite` of all of `bytes` at `offset`.
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(bytes, offset)
    }
    #[cfg(not(unix))]
    {
        let _ = (file, bytes, offset);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Sets the file's length to `len` with every block allocated (Linux `fallocate`).
fn reserve(file: &File, len: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        loop {
            // SAFETY: a valid descriptor opened for writing; mode 0 allocates and extends.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Whether `err` says the file system or platform lacks the call (rather than a real failure).
fn unsupported(err: &std::io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = err.raw_os_error() {
        return [libc::EOPNOTSUPP, libc::ENOSYS, libc::EINVAL, libc::ENODEV].contains(&code);
    }
    err.kind() == std::io::ErrorKind::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Dtype, SafeTensors};

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("a", Dtype::F32, vec![3, 5]),
            TensorSpec::new("empty", Dtype::BF16, vec![0]),
            TensorSpec::new("b", Dtype::U8, vec![70_001]),
        ]
    }

    #[test]
    fn written_in_pieces_in_parallel_reads_back_as_the_buffered_writer_writes() {
        use rayon::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let a: Vec<u8> = (0..60).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..70_001).map(|i| (i * 7 % 251) as u8).collect();
        let contents = [&a[..], &[], &b[..]];

        let reserved_path = dir.path().join("reserved.safetensors");
        let writer = ReservedSafetensorsWriter::create(&reserved_path, specs(), &meta)
            .unwrap()
            .expect("ext4 and tmpfs support fallocate");
        writer
            .tensors()
            .into_par_iter()
            .zip(contents)
            .for_each(|(tensor, bytes)| {
                // pieces of 4 KiB, last first
                let pieces: Vec<_> = bytes.chunks(4096).enumerate().collect();
                pieces.into_par_iter().rev().for_each(|(i, piece)| {
                    tensor.write_at(i * 4096, piece).unwrap();
                });
                tensor.start_writeback();
            });
        let err = writer.tensors()[0].write_at(50, &[0; 11]).unwrap_err();
        assert!(err.to_string().contains("overflow a tensor of 60"), "{err}");
        assert!(!reserved_path.exists(), "appears only on finish");
        writer.finish().unwrap();

        let buffered_path = dir.path().join("buffered.safetensors");
        let tensors: Vec<(TensorSpec, &[u8])> = specs().into_iter().zip(contents).collect();
        crate::io::safetensors::write_safetensors(&buffered_path, &tensors, &meta).unwrap();
        assert_eq!(
            fs::read(&reserved_path).unwrap(),
            fs::read(&buffered_path).unwrap()
        );
        let st = SafeTensors::open(&reserved_path).unwrap();
        assert_eq!(st.bytes("b").unwrap(), &b[..]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temp left");
    }

    #[test]
    fn only_missing_support_falls_back_and_a_full_disk_is_an_error() {
        for code in [libc::EOPNOTSUPP, libc::ENOSYS, libc::EINVAL, libc::ENODEV] {
            assert!(
                unsupported(&std::io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        for code in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EFBIG,
            libc::EIO,
            libc::EACCES,
        ] {
            assert!(
                !unsupported(&std::io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn a_tensor_written_short_or_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.safetensors");
        for (pieces, expected) in [(vec![0], "got 30 bytes"), (vec![0, 30, 0], "got 90 bytes")] {
            let writer = ReservedSafetensorsWriter::create(&target, specs(), &BTreeMap::new())
                .unwrap()
                .unwrap();
            let tensors = writer.tensors();
            for at in pieces {
                tensors[0].write_at(at, &[7; 30]).unwrap();
            }
            tensors[2].write_at(0, &vec![1; 70_001]).unwrap();
            let err = writer.finish().unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains("\"a\""), "{err}");
            assert!(!target.exists());
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn dropped_unfinished_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.safetensors");
        {
            let writer = ReservedSafetensorsWriter::create(&target, specs(), &BTreeMap::new())
                .unwrap()
                .unwrap();
            writer.tensors()[0].write_at(0, &[1]).unwrap();
        }
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
