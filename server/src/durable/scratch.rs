//! A redb storage backend that reads a database file and keeps every write in
//! memory, so that redb can check, and if needed repair, the file's content
//! without changing a byte of the file.
//!
//! The server opens its state database through this backend first. redb's
//! open writes to the file before it has verified it (the recovery after a
//! crash rewrites the header, and the integrity check commits), so opening a
//! damaged file directly would alter the evidence. Only when the scratch open
//! verifies does the server open the file itself.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Bound;

use parking_lot::Mutex;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Size of the blocks in which writes are kept, in bytes (redb's page size).
const BLOCK: u64 = 4096;

/// Reads from a file, writes to memory. Locks are taken on the file, so a
/// scratch open excludes a server that has the same database open.
#[derive(Debug)]
pub(super) struct ScratchBackend {
    file: FileBackend,
    state: Mutex<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    /// Length of the storage as redb sees it.
    len: u64,
    /// Bytes of the file that are still visible: redb may shrink the storage
    /// and grow it again, and the bytes past the shrink then read as zero.
    file_len: u64,
    /// Blocks written since the open, by block number.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl ScratchBackend {
    /// Wraps `file`, which must be open for reading and writing because the
    /// exclusive file lock that redb takes requires write access. Nothing is
    /// ever written to it.
    pub(super) fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file: FileBackend::new(file),
            state: Mutex::new(Overlay {
                len,
                file_len: len,
                blocks: HashMap::new(),
            }),
        })
    }

    /// Fills `out` with block `block` as the storage holds it now.
    fn load_block(
        &self,
        overlay: &Overlay,
        block: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        if let Some(written) = overlay.blocks.get(&block) {
            out.copy_from_slice(written);
            return Ok(());
        }
        out.fill(0);
        let start = block * BLOCK;
        let end = (start + BLOCK).min(overlay.file_len);
        if start < end {
            self.file.read(start, &mut out[..(end - start) as usize])?;
        }
        Ok(())
    }
}

fn out_of_range(offset: u64, len: usize, storage: u64) -> BackendError {
    BackendError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at {offset} past the end of the storage ({storage} bytes)"),
    ))
}

impl StorageBackend for ScratchBackend {
    fn len(&self) -> Result<u64, BackendError> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        let overlay = self.state.lock();
        let end = offset + out.len() as u64;
        if end > overlay.len {
            return Err(out_of_range(offset, out.len(), overlay.len));
        }
        let mut buffer = vec![0u8; BLOCK as usize];
        let mut position = offset;
        while position < end {
            let block = position / BLOCK;
            self.load_block(&overlay, block, &mut buffer)?;
            let within = (position - block * BLOCK) as usize;
            let take = (BLOCK as usize - within).min((end - position) as usize);
            let target = (position - offset) as usize;
            out[target..target + take].copy_from_slice(&buffer[within..within + take]);
            position += take as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendError> {
        let mut overlay = self.state.lock();
        if len < overlay.len {
            overlay.file_len = overlay.file_len.min(len);
            overlay.blocks.retain(|&block, _| block * BLOCK < len);
            // The block that holds the new end keeps only the bytes before it.
            let cut = (len % BLOCK) as usize;
            if let Some(last) = overlay.blocks.get_mut(&(len / BLOCK)) {
                last[cut..].fill(0);
            }
        }
        overlay.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let mut overlay = self.state.lock();
        let end = offset + data.len() as u64;
        let mut position = offset;
        while position < end {
            let block = position / BLOCK;
            if !overlay.blocks.contains_key(&block) {
                let mut fresh = vec![0u8; BLOCK as usize].into_boxed_slice();
                self.load_block(&overlay, block, &mut fresh)?;
                overlay.blocks.insert(block, fresh);
            }
            let within = (position - block * BLOCK) as usize;
            let take = (BLOCK as usize - within).min((end - position) as usize);
            let source = (position - offset) as usize;
            let target = overlay
                .blocks
                .get_mut(&block)
                .expect("the block was inserted above");
            target[within..within + take].copy_from_slice(&data[source..source + take]);
            position += take as u64;
        }
        overlay.len = overlay.len.max(end);
        Ok(())
    }

    fn close(&self) -> Result<(), BackendError> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn backend_over(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, ScratchBackend) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, path, ScratchBackend::new(file).unwrap())
    }

    #[test]
    fn writes_are_read_back_and_leave_the_file_alone() {
        let original: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_dir, path, backend) = backend_over(&original);
        backend.write(4090, &[0xAA; 20]).unwrap();
        backend.write(12_000, &[0xBB; 8]).unwrap();
        assert_eq!(backend.len().unwrap(), 12_008);

        let mut read = vec![0u8; 30];
        backend.read(4080, &mut read).unwrap();
        assert_eq!(&read[..10], &original[4080..4090]);
        assert_eq!(&read[10..30], &[0xAA; 20]);
        let mut gap = vec![1u8; 2008];
        backend.read(10_000, &mut gap).unwrap();
        assert!(gap[..2000].iter().all(|&b| b == 0));
        assert_eq!(&gap[2000..], &[0xBB; 8]);

        assert_eq!(std::fs::read(&path).unwrap(), original);
    }

    #[test]
    fn shrinking_then_growing_reads_zeros() {
        let (_dir, path, backend) = backend_over(&[7u8; 9000]);
        backend.write(5000, &[9u8; 100]).unwrap();
        backend.set_len(5050).unwrap();
        backend.set_len(9000).unwrap();
        let mut read = vec![1u8; 4000];
        backend.read(5000, &mut read).unwrap();
        assert_eq!(&read[..50], &[9u8; 50]);
        assert!(read[50..].iter().all(|&b| b == 0));
        let mut past = [0u8; 1];
        assert!(backend.read(9000, &mut past).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 9000]);
    }
}
