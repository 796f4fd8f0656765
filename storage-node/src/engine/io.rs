//! Raw positioned I/O on a disk file or block device, below the chunk logic: O_DIRECT where the
//! filesystem allows it, aligned buffers, and a group-committed `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// Alignment of every buffer and offset handed to O_DIRECT I/O.
pub const IO_ALIGN: usize = 4096;

/// A buffer aligned to [`IO_ALIGN`], as O_DIRECT requires: zeroed, a copy of some bytes, or
/// pieces laid out with zeros between them.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(IO_ALIGN), IO_ALIGN).expect("valid layout")
    }

    pub fn zeroed(len: usize) -> Self {
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN).
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        let ptr = std::ptr::NonNull::new(ptr)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        Self { ptr, len }
    }

    /// A copy of `data`, with no zeroing first (large unaligned writes go through here).
    pub fn copy_from(data: &[u8]) -> Self {
        let layout = Self::layout(data.len());
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN).
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // SAFETY: the fresh allocation holds at least `data.len()` bytes and cannot overlap
        // `data`; after the copy, the `len` bytes `AlignedBuf` exposes are all initialised.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        Self {
            ptr,
            len: data.len(),
        }
    }

    /// `len` bytes holding each `(offset, data)` of `parts` and zeros everywhere else. Every
    /// byte is written once (`zeroed` and then copying writes the data's bytes twice: a log
    /// batch is nearly all data). Panics if the parts are out of order, overlap or overrun.
    pub fn assemble(len: usize, parts: &[(usize, &[u8])]) -> Self {
        let mut end = 0;
        for (off, data) in parts {
            assert!(*off >= end, "parts out of order or overlapping");
            end = off + data.len();
        }
        assert!(end <= len, "parts overrun the buffer");
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN).
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let base = ptr.as_ptr();
        let mut at = 0;
        for (off, data) in parts {
            // SAFETY: checked above: `at <= off`, `off + data.len() <= len`, all within the
            // fresh allocation of `len` bytes, which cannot overlap `data`.
            unsafe {
                std::ptr::write_bytes(base.add(at), 0, off - at);
                std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(*off), data.len());
            }
            at = off + data.len();
        }
        // SAFETY: `at <= len`; after this every one of the `len` bytes is initialised.
        unsafe { std::ptr::write_bytes(base.add(at), 0, len - at) };
        Self { ptr, len }
    }

    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed or written) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed`, `copy_from`, `assemble` or `UnfilledBuf::new` with this
        // same layout (dropping frees it, whatever its bytes hold).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// An aligned buffer whose bytes are not initialised: where a read puts its data. It gives out
/// only a raw pointer for the kernel to write through, and becomes an [`AlignedBuf`] once the
/// read has filled all of it (zeroing it first cost a 4 KiB memset per read, on a buffer the
/// device then overwrites). The `AlignedBuf` inside is never read before then.
pub struct UnfilledBuf(AlignedBuf);

impl UnfilledBuf {
    pub fn new(len: usize) -> Self {
        let layout = AlignedBuf::layout(len);
        // SAFETY: the layout has a non-zero size (at least IO_ALIGN).
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self(AlignedBuf { ptr, len })
    }

    /// Where the data goes: `len` writable bytes, aligned to [`IO_ALIGN`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.ptr.as_ptr()
    }

    /// The buffer, filled.
    ///
    /// # Safety
    /// Every one of its `len` bytes has been written (by a read that completed in full).
    pub unsafe fn assume_filled(self) -> AlignedBuf {
        self.0
    }
}

/// Which I/O backend a disk uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// io_uring where the kernel allows it, else pread/pwrite with one logged warning.
    Auto,
    Uring,
    Sync,
}

/// A disk opened for positioned I/O.
pub struct DiskFile {
    // Declared before `file` so the ring (and its thread, which uses the fd) stops first.
    ring: Option<super::uring::Ring>,
    file: Arc<File>,
    pub direct: bool,
    poisoned: AtomicBool,
    sync: SyncGroup,
}

impl DiskFile {
    /// Opens `path` with O_DIRECT; where the filesystem refuses it (tmpfs on old kernels,
    /// some FUSE filesystems) falls back to buffered I/O with one warning — every write is
    /// still followed by fdatasync before it is acknowledged.
    pub fn open(path: &Path, kind: IoKind) -> io::Result<Self> {
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT unsupported here; using buffered I/O + fdatasync");
                (OpenOptions::new().read(true).write(true).open(path)?, false)
            }
            Err(e) => return Err(e),
        };
        let file = Arc::new(file);
        let ring = match kind {
            IoKind::Sync => None,
            IoKind::Uring => Some(super::uring::Ring::new(file.clone())?),
            IoKind::Auto => match super::uring::Ring::new(file.clone()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "io_uring unavailable; using pread/pwrite");
                    None
                }
            },
        };
        Ok(Self {
            ring,
            file,
            direct,
            poisoned: AtomicBool::new(false),
            sync: SyncGroup::default(),
        })
    }

    /// Whether I/O goes through io_uring.
    pub fn uses_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether the ring defers its completion work to the runtime's own enters
    /// ([`super::uring`]: on the current-thread runtime).
    pub fn defers_completions(&self) -> bool {
        self.ring.as_ref().is_some_and(|r| r.defers_completions())
    }

    pub fn size(&self) -> io::Result<u64> {
        let m = self.file.metadata()?;
        if m.file_type().is_file() {
            return Ok(m.len());
        }
        // A block device: its size is where a seek to the end lands.
        use std::io::Seek;
        let mut f = self.file.as_ref();
        f.seek(std::io::SeekFrom::End(0))
    }

    /// Marks the disk unusable until restarted (its state is no longer known).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        if let Some(r) = &self.ring {
            return r.read(offset, len).await;
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = AlignedBuf::zeroed(len);
            file.read_exact_at(buf.as_mut(), offset)?;
            Ok(buf)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Writes `data` at `offset`. Not durable until [`DiskFile::sync`] returns.
    pub async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.write(offset, data, false).await
    }

    /// [`DiskFile::write_at`], submitted to the device in one batch with the other writes
    /// queued meanwhile (io_uring only): for writes nobody is waiting on.
    pub async fn write_at_batched(&self, offset: u64, data: Bytes) -> io::Result<()> {
        match &self.ring {
            Some(r) => r.write_batched(offset, data).await,
            None => self.write_at(offset, data).await,
        }
    }

    /// Someone waits on a [`DiskFile::write_at_batched`] (for the blocks it holds, or for all
    /// of them: a checkpoint): while the guard lives, the ring reports their completions as
    /// soon as they come.
    pub fn watch(&self) -> Option<super::uring::Watch> {
        self.ring.as_ref().map(|r| r.watch())
    }

    /// Writes `data` at `offset` and returns once it is durable (RWF_DSYNC: a FUA write where
    /// the device has it, else a write and a cache flush, in one request). Does not make
    /// *other* writes durable. A failure poisons the file, as a failed sync does.
    pub async fn write_durable(&self, offset: u64, data: Bytes) -> io::Result<()> {
        if self.is_poisoned() {
            return Err(io::Error::other("disk poisoned by an earlier failed sync"));
        }
        // A slow disk and a disk that fails writes, for the failure tests (compiled in only
        // with the `failpoints` feature).
        fail::fail_point!("disk-write-delay");
        fail::fail_point!("disk-write-error", |_| {
            self.poison();
            Err(io::Error::from_raw_os_error(5)) // EIO
        });
        let r = self.write(offset, data, true).await;
        if r.is_err() {
            self.poison();
        }
        r
    }

    async fn write(&self, offset: u64, data: Bytes, dsync: bool) -> io::Result<()> {
        if let Some(r) = &self.ring {
            return r.write(offset, data, dsync).await;
        }
        let file = self.file.clone();
        let direct = self.direct;
        tokio::task::spawn_blocking(move || {
            let aligned;
            let buf: &[u8] = if direct && !(data.as_ptr() as usize).is_multiple_of(IO_ALIGN) {
                aligned = AlignedBuf::copy_from(&data);
                aligned.as_ref()
            } else {
                &data
            };
            if dsync {
                pwrite_dsync(&file, buf, offset)
            } else {
                file.write_all_at(buf, offset)
            }
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Makes every write completed before this call durable. Concurrent callers share one
    /// fdatasync (group commit). A failed fdatasync poisons the file for good: after it, the
    /// kernel may have dropped dirty pages, and retrying could report success over lost data.
    pub async fn sync(&self) -> io::Result<()> {
        if self.is_poisoned() {
            return Err(io::Error::other("disk poisoned by an earlier failed sync"));
        }
        let file = self.file.clone();
        let ring = self.ring.as_ref();
        let r = self
            .sync
            .run(move || {
                let f = file.clone();
                async move {
                    match ring {
                        Some(r) => r.fdatasync().await,
                        None => tokio::task::spawn_blocking(move || f.sync_data())
                            .await
                            .map_err(io::Error::other)?,
                    }
                }
            })
            .await;
        if r.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        r
    }

    /// Gives the space of a byte range back to the filesystem (file-backed disks). Best
    /// effort: where hole punching is unsupported the range stays allocated but unmapped.
    pub fn punch_hole(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let _ = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
    }
}

/// pwritev2 with RWF_DSYNC, the whole buffer.
fn pwrite_dsync(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let off = i64::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: one iovec over a live slice, read-only for the kernel; a descriptor we own.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// Group commit for an expensive idempotent operation (a sync): a caller's request is covered
/// by the first run that *starts* after it arrives; callers arriving while a run is in flight
/// share the next one.
#[derive(Default)]
pub struct SyncGroup {
    state: Mutex<SyncState>,
    done: Notify,
}

#[derive(Default)]
struct SyncState {
    requested: u64,
    completed: u64,
    running: bool,
    last_error: Option<(u64, String)>,
}

impl SyncGroup {
    pub async fn run<F, Fut>(&self, op: F) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let ticket = {
            let mut s = self.state.lock().expect("sync lock");
            s.requested += 1;
            s.requested
        };
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let target = {
                let mut s = self.state.lock().expect("sync lock");
                if s.completed >= ticket {
                    return match &s.last_error {
                        Some((at, e)) if *at >= ticket => Err(io::Error::other(e.clone())),
                        _ => Ok(()),
                    };
                }
                if s.running {
                    None
                } else {
                    s.running = true;
                    Some(s.requested)
                }
            };
            match target {
                None => notified.await,
                Some(target) => {
                    let r = op().await;
                    let mut s = self.state.lock().expect("sync lock");
                    s.running = false;
                    s.completed = target;
                    if let Err(e) = &r {
                        s.last_error = Some((target, e.to_string()));
                    }
                    drop(s);
                    self.done.notify_waiters();
                    return r;
                }
            }
        }
    }
}
