//! The memory contract (issue 12, SPEC §8.3): one budget per run that every buffer holding a
//! whole tensor counts against, and the scratch arena, where such a tensor goes when the budget
//! cannot hold it: a file in the scratch directory, its regions mapped into memory.
//!
//! Our own code rather than a crate: the arena's files must be unnamed (nothing to clean up
//! after `kill -9`), its freed space reused, and its bytes read back with `pread` so reading a
//! spilled tensor does not grow the resident set; no maintained allocator crate does the three.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Share of physical memory a run may use when no `--max-memory` is given: half, leaving the
/// rest to the page cache the streaming reads and writes go through, and to other programs.
pub const DEFAULT_SHARE_PERCENT: u64 = 50;

/// The budget when physical memory cannot be read (no `sysconf`): 4 GiB.
const FALLBACK_BUDGET: u64 = 4 << 30;

/// Arena regions start on this boundary: a page (so each maps on its own), and a multiple of
/// every element's alignment (so typed views of a region are sound).
const REGION_ALIGN: u64 = 1 << 16;

/// Why memory or scratch space could not be had: the memory layer's error.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Neither the budget nor the arena could provide the bytes.
    #[error("{op} needs {bytes} bytes at once, and they could not be allocated")]
    OutOfMemory {
        /// The operation.
        op: &'static str,
        /// The bytes asked for.
        bytes: usize,
    },
    /// Work that must be in memory (the writing threads' buffers, a factorization's workspace)
    /// does not fit the budget even with every tensor computed whole in the arena.
    #[error(
        "{what} needs {needed} bytes of memory at once, more than the budget of {budget} bytes; \
         raise it (--max-memory, max_memory=){hint}"
    )]
    OverBudget {
        /// What needs the memory.
        what: String,
        /// The tensor it is for, when one is (a factorization's).
        tensor: Option<String>,
        /// Bytes needed.
        needed: u64,
        /// The budget.
        budget: u64,
        /// A further way out (fewer threads), or empty.
        hint: &'static str,
    },
    /// The scratch directory could not hold an arena (missing, unwritable, full).
    #[error("scratch arena in {dir}")]
    Scratch {
        /// The scratch directory.
        dir: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// How much memory a run may use and where its arena goes.
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    /// The budget in bytes; `None` for [`default_budget`].
    pub max_memory: Option<u64>,
    /// The arena's directory; `None` for beside the output, else the system's temporary folder.
    pub scratch_dir: Option<PathBuf>,
}

/// Physical memory in bytes, when the system says.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    match (u64::try_from(pages), u64::try_from(page)) {
        (Ok(pages), Ok(page)) if pages > 0 && page > 0 => Some(pages.saturating_mul(page)),
        _ => None,
    }
}

/// The budget when none is given: [`DEFAULT_SHARE_PERCENT`] of physical memory.
pub fn default_budget() -> u64 {
    physical_memory().map_or(FALLBACK_BUDGET, |total| total / 100 * DEFAULT_SHARE_PERCENT)
}

/// One run's memory: the budget, what is in use against it, and the arena (made on first use).
#[derive(Debug)]
pub struct Memory {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    scratch_dir: PathBuf,
    arena: Mutex<Option<Arc<Arena>>>,
    arena_peak: AtomicU64,
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new(default_budget(), std::env::temp_dir())
    }
}

impl Memory {
    /// A budget of `limit` bytes, spilling to an arena in `scratch_dir`.
    pub fn new(limit: u64, scratch_dir: PathBuf) -> Memory {
        Memory {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            scratch_dir,
            arena: Mutex::new(None),
            arena_peak: AtomicU64::new(0),
        }
    }

    /// The memory of a run under `options`, whose output (if any) is written at `output`.
    pub fn for_run(options: &MemoryOptions, output: Option<&Path>) -> Memory {
        let dir = options
            .scratch_dir
            .clone()
            .unwrap_or_else(|| scratch_dir_beside(output));
        Memory::new(options.max_memory.unwrap_or_else(default_budget), dir)
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The arena's directory.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch_dir
    }

    /// Bytes of the budget not held now.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// The most bytes held against the budget at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The most bytes the arena held at once so far.
    pub fn arena_peak(&self) -> u64 {
        self.arena_peak.load(Ordering::Relaxed)
    }

    /// Counts `bytes` against the budget when they fit; the reservation gives them back when
    /// dropped. `None` when they do not fit.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let bytes = bytes as u64;
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let next = current.checked_add(bytes).filter(|&n| n <= self.limit)?;
            match self
                .used
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Some(Reservation {
                        memory: self.clone(),
                        bytes,
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    /// A zeroed buffer of `len` bytes for a tensor computed whole by `op`: in memory when the
    /// budget holds it, else in the arena.
    // Allocated fallibly (`vec!` would abort on a refused allocation, not spill).
    pub fn alloc(self: &Arc<Self>, op: &'static str, len: usize) -> Result<Scratch, MemoryError> {
        if let Some(reservation) = self.reserve(len) {
            // u64 words: 8-byte alignment, so typed views of f32/f64 elements are sound.
            let words = len.div_ceil(8);
            if let Some(heap) = zeroed_words(words) {
                return Ok(Scratch {
                    place: Place::Heap(heap, reservation),
                    len,
                });
            }
        }
        let arena = self.arena()?;
        let region = arena.alloc(op, len)?;
        self.arena_peak.fetch_max(arena.in_use(), Ordering::Relaxed);
        Ok(Scratch {
            place: Place::Arena(region),
            len,
        })
    }

    /// The arena, made on first use.
    fn arena(&self) -> Result<Arc<Arena>, MemoryError> {
        let mut slot = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(arena) = &*slot {
            return Ok(arena.clone());
        }
        let arena = Arc::new(Arena::create(&self.scratch_dir)?);
        *slot = Some(arena.clone());
        Ok(arena)
    }
}

/// `words` zeroed u64 from the allocator's zeroed allocation, `None` when it refuses: large
/// blocks come as fresh zero pages from the kernel (`calloc`), not written over with zeros first
/// (a 224 MiB matrix read for a factorization spent ~30 ms zeroing pages it then overwrote).
fn zeroed_words(words: usize) -> Option<Vec<u64>> {
    if words == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(words).ok()?;
    // SAFETY: `layout` has a non-zero size. The pointer, when not null, is an allocation of the
    // global allocator with u64's alignment and exactly `words` zeroed u64 (a valid value for
    // every bit pattern), which is what `Vec::from_raw_parts` needs with length = capacity.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<u64>();
        (!ptr.is_null()).then(|| Vec::from_raw_parts(ptr, words, words))
    }
}

/// The arena's default directory: the output's (existing) folder, else the temporary folder.
fn scratch_dir_beside(output: Option<&Path>) -> PathBuf {
    output
        .and_then(|o| o.ancestors().skip(1).find(|p| p.as_os_str().is_empty() || p.is_dir()))
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(std::env::temp_dir)
}

/// Bytes counted against a [`Memory`]'s budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    memory: Arc<Memory>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.memory.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A buffer holding one tensor computed whole: in memory within the budget, or a region of the
/// arena. Zeroed when made (fresh and punched arena blocks read as zeros; reused ones that could
/// not be punched are written zeros).
#[derive(Debug)]
pub struct Scratch {
    place: Place,
    len: usize,
}

#[derive(Debug)]
enum Place {
    Heap(Vec<u64>, #[allow(dead_code)] Reservation),
    Arena(Region),
}

impl Scratch {
    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the bytes are in the arena.
    pub fn in_arena(&self) -> bool {
        matches!(self.place, Place::Arena(_))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.place {
            // SAFETY: the vector holds at least `len` initialized bytes.
            Place::Heap(words, _) => unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), self.len) },
            Place::Arena(region) => region.bytes(),
        }
    }

    /// The bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.place {
            // SAFETY: as in `bytes`, and the vector is borrowed mutably.
            Place::Heap(words, _) => unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), self.len)
            },
            Place::Arena(region) => region.bytes_mut(),
        }
    }

    /// The bytes as elements of `T` (f32, f64): `len` must be a multiple of `T`'s size.
    pub fn typed_mut<T: Element>(&mut self) -> &mut [T] {
        let bytes = self.bytes_mut();
        let n = bytes.len() / std::mem::size_of::<T>();
        if n == 0 {
            return &mut [];
        }
        debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
        // SAFETY: heap buffers are u64-aligned and arena regions page-aligned, so the pointer
        // suits T; every bit pattern is a valid T (`Element` is implemented for plain numbers).
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), n) }
    }

    /// The bytes as elements of `T`.
    pub fn typed<T: Element>(&self) -> &[T] {
        let bytes = self.bytes();
        let n = bytes.len() / std::mem::size_of::<T>();
        if n == 0 {
            return &[];
        }
        // SAFETY: as in `typed_mut`.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) }
    }

    /// Copies bytes `[start, start + out.len())` into `out`. From the arena this is a `pread`,
    /// so reading a spilled tensor does not map its pages into the resident set.
    pub fn read_into(&self, start: usize, out: &mut [u8]) -> io::Result<()> {
        match &self.place {
            Place::Heap(..) => {
                let src = self
                    .bytes()
                    .get(start..start.saturating_add(out.len()))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                out.copy_from_slice(src);
                Ok(())
            }
            Place::Arena(region) => region.read_into(start, out),
        }
    }

    /// Writes `data` at byte `start`. Into the arena this is a `pwrite`, so filling a spilled
    /// tensor in order does not map its pages into the resident set.
    pub fn write_at(&mut self, start: usize, data: &[u8]) -> io::Result<()> {
        if start.saturating_add(data.len()) > self.len {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        match &mut self.place {
            Place::Heap(..) => {
                self.bytes_mut()[start..start + data.len()].copy_from_slice(data);
                Ok(())
            }
            Place::Arena(region) => region.arena.file.write_all_at(data, region.offset + start as u64),
        }
    }

    /// Lets the system take back the resident pages of an arena region once filled (they stay
    /// in the file); nothing for memory.
    pub fn settle(&self) {
        if let Place::Arena(region) = &self.place {
            region.settle();
        }
    }

    /// [`Scratch::settle`] for the pages holding bytes `[start, start + len)` only: work that
    /// goes through a spilled tensor panel by panel keeps one panel resident, not the tensor.
    pub fn settle_range(&self, start: usize, len: usize) {
        if let Place::Arena(region) = &self.place {
            region.settle_range(start, len);
        }
    }
}

/// Plain number types a [`Scratch`] can be viewed as: every bit pattern is a value.
pub trait Element: Copy + Send + Sync + 'static {}
impl Element for f32 {}
impl Element for f64 {}
impl Element for u8 {}

/// Scratch files: one unnamed file per run in the scratch directory, its space handed out in
/// regions (first fit, freed space coalesced and reused, and given back to the filesystem).
#[derive(Debug)]
pub struct Arena {
    dir: PathBuf,
    file: File,
    /// The named file's path where the system has no unnamed files (removed at once, but a
    /// run killed in between leaves it for the next run to remove).
    state: Mutex<ArenaState>,
}

#[derive(Debug, Default)]
struct ArenaState {
    /// The file's length: the end of the highest region ever handed out.
    len: u64,
    /// Free ranges below `len`: offset → length, coalesced.
    free: BTreeMap<u64, u64>,
    /// Bytes of live regions.
    in_use: u64,
    /// Whether every freed range was given back to the filesystem (reads as zeros); cleared by
    /// the first failure, after which reused ranges are zeroed.
    holes_punched: bool,
}

impl Arena {
    /// An arena in `dir`: an unnamed file (Linux `O_TMPFILE`), or a hidden named one removed at
    /// once. Stale named files of dead runs are removed first.
    pub fn create(dir: &Path) -> Result<Arena, MemoryError> {
        let scratch = |source| MemoryError::Scratch {
            dir: dir.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(dir).map_err(scratch)?;
        if !meta.is_dir() {
            return Err(scratch(io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
        }
        remove_stale_arenas(dir);
        let file = match unnamed_file(dir) {
            Some(file) => file,
            None => {
                let path = dir.join(format!(".brainsurgery-arena-{}-{:x}", std::process::id(), unique()));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(scratch)?;
                // Unlinked while open: the space lives until the file is closed, even by a kill.
                std::fs::remove_file(&path).map_err(scratch)?;
                file
            }
        };
        Ok(Arena {
            dir: dir.to_path_buf(),
            file,
            state: Mutex::new(ArenaState {
                holes_punched: true,
                ..ArenaState::default()
            }),
        })
    }

    /// Bytes of live regions.
    pub fn in_use(&self) -> u64 {
        self.lock().in_use
    }

    /// The file's length (the most space its regions ever spanned).
    pub fn file_len(&self) -> u64 {
        self.lock().len
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ArenaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, source: io::Error) -> MemoryError {
        MemoryError::Scratch {
            dir: self.dir.clone(),
            source,
        }
    }

    /// A zeroed region of `len` bytes, mapped.
    pub fn alloc(self: &Arc<Self>, op: &'static str, len: usize) -> Result<Region, MemoryError> {
        let too_large = || MemoryError::OutOfMemory { op, bytes: len };
        let size = (len as u64)
            .max(1)
            .div_ceil(REGION_ALIGN)
            .checked_mul(REGION_ALIGN)
            .ok_or_else(too_large)?;
        let (offset, reused) = {
            let mut state = self.lock();
            let fit = state.free.iter().find(|(_, &l)| l >= size).map(|(&o, &l)| (o, l));
            let offset = match fit {
                Some((o, l)) => {
                    state.free.remove(&o);
                    if l > size {
                        state.free.insert(o + size, l - size);
                    }
                    o
                }
                None => {
                    // Grow: a free range ending the file is extended rather than left behind
                    // (taken off the free list only once the file has grown).
                    let tail = state.free.iter().next_back().map(|(&o, &l)| (o, l));
                    let start = match tail {
                        Some((o, l)) if o + l == state.len => o,
                        _ => state.len,
                    };
                    let end = start.checked_add(size).ok_or_else(too_large)?;
                    self.file.set_len(end).map_err(|e| self.error(e))?;
                    if start < state.len {
                        state.free.remove(&start);
                    }
                    state.len = end;
                    start
                }
            };
            state.in_use += size;
            (offset, fit.is_some() && !state.holes_punched)
        };
        let region = Region {
            arena: self.clone(),
            offset,
            size,
            len,
            map: None,
        };
        // Reserve the blocks now, so a full disk is an error here rather than SIGBUS later when
        // a page of the mapping is first written. A reused range whose blocks could not be given
        // back still holds an earlier tensor's bytes: zeroed.
        let zero = reused;
        allocate(&self.file, offset, size, zero).map_err(|e| self.error(e))?;
        let mut region = region;
        if len > 0 {
            let mut options = memmap2::MmapOptions::new();
            options.offset(offset).len(len);
            // SAFETY: a shared mapping of this run's own unnamed scratch file, which no other
            // process can open; the range was just allocated and belongs to this region alone.
            let map = unsafe { options.map_mut(&self.file) }.map_err(|e| self.error(e))?;
            region.map = Some(map);
        }
        Ok(region)
    }

    /// Returns `[offset, offset + size)` to the free ranges, coalesced with its neighbours, and
    /// its blocks to the filesystem.
    fn free(&self, offset: u64, size: u64) {
        let punched = punch_hole(&self.file, offset, size);
        let mut state = self.lock();
        state.holes_punched &= punched;
        state.in_use -= size;
        let (mut start, mut len) = (offset, size);
        if let Some((&o, &l)) = state.free.range(..offset).next_back() {
            if o + l == offset {
                state.free.remove(&o);
                start = o;
                len += l;
            }
        }
        if let Some(l) = state.free.remove(&(offset + size)) {
            len += l;
        }
        state.free.insert(start, len);
    }
}

/// A region of the arena holding one tensor, mapped; freed when dropped.
#[derive(Debug)]
pub struct Region {
    arena: Arc<Arena>,
    offset: u64,
    size: u64,
    len: usize,
    map: Option<memmap2::MmapMut>,
}

impl Region {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or_default()
    }

    fn read_into(&self, start: usize, out: &mut [u8]) -> io::Result<()> {
        if start.saturating_add(out.len()) > self.len {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.arena.file.read_exact_at(out, self.offset + start as u64)
    }

    fn settle(&self) {
        if let Some(map) = &self.map {
            // SAFETY: MADV_DONTNEED on a shared file mapping drops this process's page table
            // entries only; the data (dirty pages included) stays in the file and its page cache,
            // and later accesses map it again.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
}

impl Region {
    fn settle_range(&self, start: usize, len: usize) {
        let Some(map) = &self.map else { return };
        // Whole pages around the range: dropping a neighbour's page is harmless (it is read back
        // from the file on its next access), and madvise wants a page-aligned start.
        let page = page_size();
        let first = start / page * page;
        let end = start.saturating_add(len).min(map.len());
        if end <= first {
            return;
        }
        // SAFETY: as in `settle`.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first) };
    }
}

/// The system's memory page size.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

impl Drop for Region {
    fn drop(&mut self) {
        self.map = None;
        self.arena.free(self.offset, self.size);
    }
}

/// A number unique to this process's calls.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (COUNTER.fetch_add(1, Ordering::Relaxed) << 32) ^ nanos
}

/// Removes the named arenas of dead runs in `dir` (`.brainsurgery-arena-PID-N`).
fn remove_stale_arenas(dir: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in listing.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(".brainsurgery-arena-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !crate::formats::output::process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// An unnamed file in `dir` (Linux `O_TMPFILE`), or `None` where unavailable.
#[cfg(target_os = "linux")]
fn unnamed_file(dir: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn unnamed_file(_dir: &Path) -> Option<File> {
    None
}

/// Allocates the file's blocks for `[offset, offset + len)`, zeroed when `zero`: ENOSPC now,
/// not SIGBUS on a write through the mapping. Where `fallocate` is unavailable, zeros are
/// written instead.
fn allocate(file: &File, offset: u64, len: u64, zero: bool) -> io::Result<()> {
    if !zero && reserve_blocks(file, offset, len)? {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = zeros.len().min((offset + len - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// `fallocate` of the range; `Ok(false)` where the filesystem or system has none.
#[cfg(target_os = "linux")]
fn reserve_blocks(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on this process's open file descriptor.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, off, n) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(error),
    }
}

#[cfg(not(target_os = "linux"))]
fn reserve_blocks(_file: &File, _offset: u64, _len: u64) -> io::Result<bool> {
    Ok(false)
}

/// Gives the blocks of a freed range back to the filesystem (reads of it give zeros); whether
/// it could. The free list reuses the range either way.
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on this process's open file descriptor.
    let status = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(limit: u64, dir: &Path) -> Arc<Memory> {
        Arc::new(Memory::new(limit, dir.to_path_buf()))
    }

    #[test]
    fn buffers_within_the_budget_are_in_memory_and_the_rest_go_to_the_arena() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory(1000, dir.path());
        let mut a = mem.alloc("test", 600).unwrap();
        assert!(!a.in_arena());
        let mut b = mem.alloc("test", 600).unwrap();
        assert!(b.in_arena(), "600 + 600 exceeds a budget of 1000");
        a.bytes_mut().fill(1);
        b.bytes_mut().iter_mut().enumerate().for_each(|(i, v)| *v = i as u8);
        b.settle();
        let mut out = [0u8; 4];
        b.read_into(256, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(b.bytes()[599], (599 % 256) as u8);
        assert_eq!(mem.peak(), 600);
        drop(a);
        // Space given back is available again.
        assert!(!mem.alloc("test", 900).unwrap().in_arena());
        // The arena's file has no name in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn freed_arena_space_is_reused_so_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory(0, dir.path());
        let arena = mem.arena().unwrap();
        let sizes = [300_000usize, 70_000, 1_000_000, 5, 250_000];
        for round in 0..50 {
            let size = sizes[round % sizes.len()];
            let mut kept = mem.alloc("test", size).unwrap();
            let other = mem.alloc("test", size / 2 + 1).unwrap();
            kept.bytes_mut().fill(round as u8);
            drop(other);
            assert!(kept.bytes().iter().all(|&v| v == round as u8));
        }
        // Never more than two live regions of at most 1 MB (+ alignment) at once.
        assert!(
            arena.file_len() <= 2 * (1_000_000 + REGION_ALIGN),
            "{}",
            arena.file_len()
        );
        assert_eq!(arena.in_use(), 0);
        assert!(mem.arena_peak() > 0);
    }

    #[test]
    fn typed_views_are_aligned_in_memory_and_in_the_arena() {
        let dir = tempfile::tempdir().unwrap();
        for limit in [1 << 20, 0] {
            let mem = memory(limit, dir.path());
            let mut s = mem.alloc("test", 12 * 8).unwrap();
            s.typed_mut::<f64>()
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f64);
            assert_eq!(s.typed::<f64>()[11], 11.0);
            assert_eq!(s.in_arena(), limit == 0);
        }
    }

    #[test]
    fn a_missing_scratch_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let mem = memory(0, &missing);
        let err = mem.alloc("permute", 10).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("scratch arena in") && text.contains("nope"), "{text}");
    }

    #[test]
    fn stale_named_arenas_of_dead_runs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A pid no process can have (Linux pids stay below 2^22).
        let stale = dir.path().join(".brainsurgery-arena-4194305-1");
        let mine = dir.path().join(format!(".brainsurgery-arena-{}-1", std::process::id()));
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(&mine, b"x").unwrap();
        Arena::create(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(mine.exists());
    }

    #[test]
    fn the_default_budget_is_a_share_of_physical_memory() {
        let total = physical_memory().unwrap();
        assert_eq!(default_budget(), total / 100 * DEFAULT_SHARE_PERCENT);
    }
}
