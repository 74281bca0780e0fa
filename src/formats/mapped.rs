//! Memory maps of input files that cannot kill the process when the file shrinks.
//!
//! Reading a mapped page past the end of a file that was truncated after mapping raises SIGBUS,
//! which by default ends the process (leaving its temporaries behind). The engine maps inputs
//! only where `pread` would be a system call per element (strided tensors, permute tiles, legacy
//! PyTorch parsing), so these maps are registered with a SIGBUS handler: a fault inside one
//! replaces the faulting page with a zero page, marks the map, and returns; the reader then
//! checks the mark ([`GuardedMap::check`]) and reports that the input changed. A fault anywhere
//! else restores the previous disposition, so it behaves exactly as without this module.
//!
//! Our own code because no maintained crate offers fault-tolerant file maps: the handler must
//! be async-signal-safe, so the registry is a fixed table of atomics, and the only calls it
//! makes are `mmap` and `sigaction` (system calls).

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::FormatError;

/// How many guarded maps may exist at once; beyond that, mapping fails and callers read with
/// `pread` instead (every caller has that path).
const SLOTS: usize = 256;

struct Slot {
    /// Odd while `start`/`len` change (a seqlock): the handler skips a slot whose sequence
    /// differs before and after it read the range, so a slot reused meanwhile is never taken
    /// for the faulting map.
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
    in_use: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below only
const EMPTY: Slot = Slot {
    seq: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
    in_use: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// Serialises installing (never taken in the handler).
static INSTALL: Mutex<()> = Mutex::new(());
/// Whether our handler is the disposition now: cleared by the handler when it hands a fault
/// that is not ours back to the previous one, so the next map installs it again.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A read-only map of part of an input file, registered with the SIGBUS handler while it lives.
#[derive(Debug)]
pub struct GuardedMap {
    map: memmap2::Mmap,
    slot: usize,
    path: PathBuf,
}

impl GuardedMap {
    /// Registers `map` (of the file at `path`); `None` when the handler is unavailable or every
    /// slot is taken (the caller reads instead).
    pub(super) fn new(map: memmap2::Mmap, path: PathBuf) -> Option<GuardedMap> {
        if !install() {
            return None;
        }
        let slot = (0..SLOTS).find(|&i| {
            REGISTRY[i]
                .in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let entry = &REGISTRY[slot];
        entry.seq.fetch_add(1, Ordering::AcqRel);
        entry.faulted.store(false, Ordering::Release);
        entry.start.store(map.as_ptr() as usize, Ordering::Release);
        entry.len.store(map.len(), Ordering::Release);
        entry.seq.fetch_add(1, Ordering::AcqRel);
        Some(GuardedMap { map, slot, path })
    }

    /// An error when a read through this map hit bytes the file no longer has (they read as
    /// zeros): call after reading, before using what was read.
    pub fn check(&self) -> Result<(), FormatError> {
        if REGISTRY[self.slot].faulted.load(Ordering::Acquire) {
            return Err(FormatError::io(
                &self.path,
                std::io::Error::other("the file shrank while it was being read (inputs must not change during a run)"),
            ));
        }
        Ok(())
    }
}

impl Deref for GuardedMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        let entry = &REGISTRY[self.slot];
        entry.seq.fetch_add(1, Ordering::AcqRel);
        entry.len.store(0, Ordering::Release);
        entry.start.store(0, Ordering::Release);
        entry.seq.fetch_add(1, Ordering::AcqRel);
        entry.in_use.store(false, Ordering::Release);
    }
}

/// The disposition SIGBUS had before ours, restored for faults that are not ours.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

/// Installs the handler unless it is in place; whether it is.
fn install() -> bool {
    if INSTALLED.load(Ordering::Acquire) {
        return true;
    }
    let _lock = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !INSTALLED.load(Ordering::Acquire) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page) {
            if page.is_power_of_two() {
                PAGE_SIZE.store(page, Ordering::Relaxed);
            }
        }
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature, and
        // PREVIOUS is written here, under the lock, while our handler is not installed (its
        // only other user).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            if libc::sigaction(libc::SIGBUS, &action, previous) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    }
    INSTALLED.load(Ordering::Acquire)
}

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `sigaction` only).
extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; errno is this
    // thread's, saved and restored so the interrupted code does not see ours.
    let addr = unsafe { (*info).si_addr() } as usize;
    let errno = unsafe { *libc::__errno_location() };
    on_fault(addr);
    unsafe { *libc::__errno_location() = errno };
}

/// The handler's work for a fault at `addr`.
fn on_fault(addr: usize) {
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for entry in &REGISTRY {
        let seq = entry.seq.load(Ordering::Acquire);
        let start = entry.start.load(Ordering::Acquire);
        let len = entry.len.load(Ordering::Acquire);
        if seq % 2 == 1 || entry.seq.load(Ordering::Acquire) != seq {
            continue;
        }
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: the page lies inside a live mapping of ours (registered until unmapped), so
        // replacing it with a private zero page affects only that mapping.
        let replaced = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            entry.faulted.store(true, Ordering::Release);
            return; // the faulting read is retried and reads zeros
        }
    }
    // Not ours: the previous disposition takes the retried fault (a map made later installs
    // ours again).
    // SAFETY: PREVIOUS was set when the handler was installed.
    unsafe {
        libc::sigaction(
            libc::SIGBUS,
            std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>(),
            std::ptr::null_mut(),
        );
    }
    INSTALLED.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::super::SourceFile;

    #[test]
    fn a_map_of_a_file_that_shrank_reads_zeros_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, vec![7u8; 3 * 65536]).unwrap();
        let file = SourceFile::open(&path).unwrap();
        let map = file.map_range(0, 3 * 65536, false).unwrap();
        assert_eq!(map[100], 7);
        map.check().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Past the new end: would be SIGBUS without the guard.
        let sum: u64 = map[65536..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 0);
        let err = crate::error::error_chain(&map.check().unwrap_err());
        assert!(err.contains("w.bin") && err.contains("shrank"), "{err}");
        drop(map);
        // A new map of the same slot starts clean.
        let again = file.map_range(0, 4096, false).unwrap();
        again.check().unwrap();
    }
}
