//! Zip archives as checkpoints use them (NumPy `.npz`, PyTorch `.bin/.pt/.pth`): every entry is
//! stored uncompressed, so a tensor is a byte range of the archive that can be read in place.
//!
//! Reading walks the central directory (classic and ZIP64) and resolves each entry's data offset
//! through its local header; nothing else of the archive is read. Writing lays every entry out up
//! front ([`Layout`]), so the executor can stream tensors into their final offsets in parallel;
//! data can be aligned (PyTorch aligns to 64 bytes so `torch.load(mmap=True)` can map it), ZIP64
//! records are used exactly when a size or offset needs them, and the CRC-32 of each entry is
//! supplied at commit by the caller, who computed it while streaming.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::SourceFile;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// The value a classic field holds when the real one is in the ZIP64 extra field.
const SATURATED: u64 = 0xFFFF_FFFF;
/// Extra field id of ZIP64 extended information.
const ZIP64_EXTRA: u16 = 0x0001;
/// Extra field id PyTorch uses for alignment padding (`"FB"`); readers skip unknown ids.
const PADDING_EXTRA: u16 = 0x4246;
/// Largest data alignment `Layout::add` pads to (the padding goes in a 16-bit extra field).
const MAX_ALIGN: u64 = 4096;
/// The archive comment of every zip this tool writes (PyTorch files, `.npz`): how a later run
/// recognises an output it may replace (readers ignore comments).
pub const ARCHIVE_COMMENT: &[u8] = b"written by brainsurgery";

/// Largest central directory read (a few hundred bytes per entry; this allows millions).
const MAX_CENTRAL_DIRECTORY: u64 = 1 << 30;
/// 1980-01-01 00:00 in DOS time/date: fixed, so output bytes do not depend on the clock.
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = 0x21;

/// Why a zip archive could not be read. Wrapped with the file path by the format reading it
/// ([`super::FormatError::TorchArchive`], [`super::numpy::NpyError::Zip`]).
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// Reading the file failed; the source keeps the I/O error kind. The archive is named by
    /// the error wrapping this.
    #[error("read failed")]
    Io(#[source] io::Error),
    /// A structure the archive points at lies past the end of the file.
    #[error("{what} lies outside the file (truncated?)")]
    OutsideFile {
        /// What was being read (`central directory`, `entry "x"`).
        what: String,
    },
    /// A structure is too large to read into memory.
    #[error("{what} is too large")]
    TooLarge {
        /// What was being read.
        what: String,
    },
    /// No end-of-central-directory record at the end of the file.
    #[error("not a zip archive, or truncated (no end-of-central-directory record)")]
    NotZip,
    /// Sizes or offsets are saturated but the ZIP64 locator is missing.
    #[error("ZIP64 locator missing")]
    Zip64LocatorMissing,
    /// The ZIP64 locator points at no ZIP64 end record.
    #[error("ZIP64 end of central directory missing")]
    Zip64RecordMissing,
    /// The ZIP64 end record is short.
    #[error("ZIP64 end record is malformed")]
    Zip64RecordMalformed,
    /// The central directory exceeds the size read.
    #[error("central directory of {size} bytes is too large")]
    CentralDirectoryTooLarge {
        /// Its declared size.
        size: u64,
    },
    /// The central directory ends inside an entry.
    #[error("central directory is truncated")]
    CentralDirectoryTruncated,
    /// A central directory entry has the wrong signature.
    #[error("bad central directory header")]
    BadCentralHeader,
    /// An entry's ZIP64 extra field is short.
    #[error("entry {entry:?}: bad ZIP64 extra field")]
    BadZip64Extra {
        /// The entry name.
        entry: String,
    },
    /// A stored entry's compressed and uncompressed sizes differ.
    #[error("entry {entry:?} has inconsistent sizes")]
    InconsistentSizes {
        /// The entry name.
        entry: String,
    },
    /// Two entries share bytes: a zip bomb's trick to make a small file read as many large
    /// tensors. No writer of checkpoints does this.
    #[error("entries {first:?} and {second:?} overlap")]
    Overlapping {
        /// The entry stored first.
        first: String,
        /// The entry whose bytes start inside it.
        second: String,
    },
    /// An entry's local header is missing.
    #[error("entry {entry:?} has no local header")]
    NoLocalHeader {
        /// The entry name.
        entry: String,
    },
    /// An entry's data runs past the end of the file.
    #[error("entry {entry:?} is truncated")]
    EntryTruncated {
        /// The entry name.
        entry: String,
    },
    /// An entry is encrypted.
    #[error("entry {entry:?} is encrypted")]
    Encrypted {
        /// The entry name.
        entry: String,
    },
    /// An entry is compressed, so its bytes cannot be read in place.
    #[error("entry {entry:?} is compressed (method {method}); only stored entries can be read in place{hint}")]
    Compressed {
        /// The entry name.
        entry: String,
        /// The compression method.
        method: u16,
        /// What to do instead (empty, or starting with a space).
        hint: &'static str,
    },
}

/// One entry of an archive being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name as stored (UTF-8, lossily).
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    /// Whether the entry is encrypted.
    pub encrypted: bool,
    /// Absolute offset of the entry's data.
    pub data_offset: u64,
    /// Size of the data as stored.
    pub size: u64,
}

impl Entry {
    /// Refuses entries whose bytes are not the data itself; `hint` says what to do instead.
    pub fn require_stored(&self, hint: &'static str) -> Result<(), ZipError> {
        if self.encrypted {
            return Err(ZipError::Encrypted {
                entry: self.name.clone(),
            });
        }
        if self.method != 0 {
            return Err(ZipError::Compressed {
                entry: self.name.clone(),
                method: self.method,
                hint,
            });
        }
        Ok(())
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The bytes of a file an archive occupies: `len` bytes from `base` (the whole file, or one
/// chunk of a DCP `.distcp` file, where each chunk is a `torch.save` archive of its own).
#[derive(Debug, Clone, Copy)]
struct Span<'f> {
    file: &'f SourceFile,
    base: u64,
    len: u64,
}

/// Reads `len` bytes at `offset` of the archive, refusing ranges past its end.
fn read(span: Span<'_>, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, ZipError> {
    if offset.checked_add(len).is_none_or(|end| end > span.len) {
        return Err(ZipError::OutsideFile { what: what.to_owned() });
    }
    let len = usize::try_from(len).map_err(|_| ZipError::TooLarge { what: what.to_owned() })?;
    let mut buf = vec![0u8; len];
    span.file
        .file()
        .read_exact_at(&mut buf, span.base + offset)
        .map_err(ZipError::Io)?;
    Ok(buf)
}

/// The entries of the zip archive `file`, in central-directory order.
pub fn read_entries(file: &SourceFile) -> Result<Vec<Entry>, ZipError> {
    read_entries_in(file, 0, file.len)
}

/// The entries of the zip archive occupying `len` bytes of `file` from `base` (its offsets count
/// from `base`), in central-directory order; data offsets are absolute in `file`. The range must
/// lie inside the file.
pub fn read_entries_in(file: &SourceFile, base: u64, len: u64) -> Result<Vec<Entry>, ZipError> {
    if base.checked_add(len).is_none_or(|end| end > file.len) {
        return Err(ZipError::OutsideFile {
            what: "archive".to_owned(),
        });
    }
    let span = Span { file, base, len };
    let not_zip = || ZipError::NotZip;
    // The end record is 22 bytes plus a comment of at most 64 KiB, at the very end.
    let tail_len = span.len.min(22 + 0xFFFF);
    let tail = read(span, span.len - tail_len, tail_len, "end of archive")?;
    // The last end-record signature whose comment fits in the file (a comment cut short means a
    // truncated archive; bytes after the comment are tolerated, as Python's zipfile does).
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| {
            u32_at(&tail, i) == Some(EOCD_SIG)
                && u16_at(&tail, i + 20).is_some_and(|c| i + 22 + usize::from(c) <= tail.len())
        })
        .ok_or_else(not_zip)?;
    let eocd_abs = span.len - tail_len + eocd as u64;
    let field = |at: usize, wide: bool| -> Option<u64> {
        if wide {
            u32_at(&tail, eocd + at).map(u64::from)
        } else {
            u16_at(&tail, eocd + at).map(u64::from)
        }
    };
    let mut count = field(10, false).ok_or_else(not_zip)?;
    let mut cd_size = field(12, true).ok_or_else(not_zip)?;
    let mut cd_offset = field(16, true).ok_or_else(not_zip)?;
    // ZIP64: a locator just before the end record points at the ZIP64 end record. Writers use it
    // only when a value does not fit, and Python's zipfile writes exactly 65535 entries without
    // one, so the locator's presence decides, not a saturated count.
    let locator = match eocd_abs.checked_sub(20) {
        Some(at) => read(span, at, 20, "ZIP64 locator")?,
        None => Vec::new(),
    };
    if u32_at(&locator, 0) == Some(EOCD64_LOCATOR_SIG) {
        let record_at = u64_at(&locator, 8).ok_or(ZipError::Zip64LocatorMissing)?;
        let record = read(span, record_at, 56, "ZIP64 end record")?;
        if u32_at(&record, 0) != Some(EOCD64_SIG) {
            return Err(ZipError::Zip64RecordMissing);
        }
        let bad = || ZipError::Zip64RecordMalformed;
        count = u64_at(&record, 32).ok_or_else(bad)?;
        cd_size = u64_at(&record, 40).ok_or_else(bad)?;
        cd_offset = u64_at(&record, 48).ok_or_else(bad)?;
    } else if cd_size == SATURATED || cd_offset == SATURATED {
        return Err(ZipError::Zip64LocatorMissing);
    }
    if cd_size > MAX_CENTRAL_DIRECTORY {
        return Err(ZipError::CentralDirectoryTooLarge { size: cd_size });
    }
    let cd = read(span, cd_offset, cd_size, "central directory")?;
    file.record_header(&cd);
    let short = || ZipError::CentralDirectoryTruncated;
    let mut entries = Vec::new();
    // `(local header offset, end of data, entry index)` for the overlap check.
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let fixed = cd.get(at..at + 46).ok_or_else(short)?;
        if u32_at(fixed, 0) != Some(CENTRAL_SIG) {
            return Err(ZipError::BadCentralHeader);
        }
        let number = |o: usize| u16_at(fixed, o).map_or(0, usize::from);
        let flags = u16_at(fixed, 8).unwrap_or(0);
        let method = u16_at(fixed, 10).unwrap_or(0);
        let mut compressed = u32_at(fixed, 20).map_or(0, u64::from);
        let mut uncompressed = u32_at(fixed, 24).map_or(0, u64::from);
        let (name_len, extra_len, comment_len) = (number(28), number(30), number(32));
        let mut local = u32_at(fixed, 42).map_or(0, u64::from);
        let name = cd.get(at + 46..at + 46 + name_len).ok_or_else(short)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = cd
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(short)?;
        at += 46 + name_len + extra_len + comment_len;
        // ZIP64 extended information: the saturated fields, in this order, as 64-bit values.
        let mut e = 0usize;
        while let (Some(id), Some(len)) = (u16_at(extra, e), u16_at(extra, e + 2)) {
            if id == ZIP64_EXTRA {
                let data = extra
                    .get(e + 4..e + 4 + usize::from(len))
                    .ok_or_else(|| ZipError::BadZip64Extra { entry: name.clone() })?;
                let mut k = 0;
                for value in [&mut uncompressed, &mut compressed, &mut local] {
                    if *value == SATURATED {
                        *value = u64_at(data, k).ok_or_else(|| ZipError::BadZip64Extra { entry: name.clone() })?;
                        k += 8;
                    }
                }
            }
            e += 4 + usize::from(len);
        }
        if method == 0 && compressed != uncompressed {
            return Err(ZipError::InconsistentSizes { entry: name });
        }
        let header = read(span, local, 30, &format!("entry {name:?}"))?;
        if u32_at(&header, 0) != Some(LOCAL_SIG) {
            return Err(ZipError::NoLocalHeader { entry: name });
        }
        let local_name = u16_at(&header, 26).map_or(0, u64::from);
        let local_extra = u16_at(&header, 28).map_or(0, u64::from);
        let data_offset = local + 30 + local_name + local_extra;
        if data_offset.checked_add(compressed).is_none_or(|end| end > span.len) {
            return Err(ZipError::EntryTruncated { entry: name });
        }
        entries.push(Entry {
            name,
            method,
            encrypted: flags & 1 != 0,
            data_offset: base + data_offset,
            size: compressed,
        });
        spans.push((local, data_offset + compressed, entries.len() - 1));
    }
    // Each entry's bytes, local header included, belong to it alone.
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(ZipError::Overlapping {
                first: entries[first].name.clone(),
                second: entries[second].name.clone(),
            });
        }
    }
    Ok(entries)
}

/// CRC-32 (IEEE, as zip uses) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The CRC-32 of `a ++ b` from the CRC-32 of each part and the length of `b`.
pub fn crc32_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    let mut a = crc32fast::Hasher::new_with_initial(crc_a);
    a.combine(&crc32fast::Hasher::new_with_initial_len(crc_b, len_b));
    a.finalize()
}

/// A stored entry laid out for writing.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    local: u64,
    data: u64,
    size: u64,
    /// Bytes of local-header extra field (ZIP64 sizes and alignment padding).
    extra: Vec<u8>,
    /// Sizes and offsets from this value up go in ZIP64 fields.
    zip64_from: u64,
}

impl Planned {
    fn zip64_sizes(&self) -> bool {
        self.size >= self.zip64_from
    }

    fn local_header(&self, crc: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(30 + self.name.len() + self.extra.len());
        let size = if self.zip64_sizes() { SATURATED } else { self.size } as u32;
        out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        out.extend_from_slice(&version_needed(self.zip64_sizes()).to_le_bytes());
        out.extend_from_slice(&flags(&self.name).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // stored
        out.extend_from_slice(&DOS_TIME.to_le_bytes());
        out.extend_from_slice(&DOS_DATE.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.extra.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.extra);
        out
    }

    fn central_header(&self, crc: u32) -> Vec<u8> {
        let (size_big, local_big) = (self.zip64_sizes(), self.local >= self.zip64_from);
        let mut extra = Vec::new();
        if size_big || local_big {
            let mut data = Vec::new();
            if size_big {
                data.extend_from_slice(&self.size.to_le_bytes());
                data.extend_from_slice(&self.size.to_le_bytes());
            }
            if local_big {
                data.extend_from_slice(&self.local.to_le_bytes());
            }
            extra.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
            extra.extend_from_slice(&(data.len() as u16).to_le_bytes());
            extra.extend_from_slice(&data);
        }
        let size = if size_big { SATURATED } else { self.size } as u32;
        let local = if local_big { SATURATED } else { self.local } as u32;
        let version = version_needed(size_big || local_big);
        let mut out = Vec::with_capacity(46 + self.name.len() + extra.len());
        out.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        out.extend_from_slice(&(version | 3 << 8).to_le_bytes()); // made by: Unix
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&flags(&self.name).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&DOS_TIME.to_le_bytes());
        out.extend_from_slice(&DOS_DATE.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        out.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // regular file, rw-r--r--
        out.extend_from_slice(&local.to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&extra);
        out
    }
}

fn version_needed(zip64: bool) -> u16 {
    if zip64 {
        45
    } else {
        20
    }
}

/// General-purpose flags: bit 11 says the name is UTF-8.
fn flags(name: &str) -> u16 {
    if name.is_ascii() {
        0
    } else {
        1 << 11
    }
}

/// The layout of an archive of stored entries being written: where each entry's local header and
/// data go. Entries are added in order; the central directory follows the last one.
#[derive(Debug, Clone)]
pub struct Layout {
    entries: Vec<Planned>,
    end: u64,
    /// Sizes, offsets and counts from this value up go in ZIP64 fields; lowered only by tests,
    /// so the ZIP64 paths are exercised without writing 4 GiB.
    zip64_from: u64,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            entries: Vec::new(),
            end: 0,
            zip64_from: SATURATED,
        }
    }
}

impl Layout {
    /// An empty archive.
    pub fn new() -> Self {
        Layout::default()
    }

    /// An empty archive that uses ZIP64 records for every size and offset, so tests of other
    /// modules exercise those paths without writing 4 GiB.
    #[cfg(test)]
    pub(crate) fn zip64_everywhere() -> Self {
        Layout {
            zip64_from: 0,
            ..Layout::default()
        }
    }

    /// Adds an entry of `size` bytes whose data starts at a multiple of `align` (1 for none) and
    /// returns that data offset. Names longer than 65535 bytes are refused.
    pub fn add(&mut self, name: &str, size: u64, align: u64) -> Result<u64, String> {
        if name.len() > 0xFFFF {
            return Err(format!("zip entry name of {} bytes is too long", name.len()));
        }
        let local = self.end;
        let mut extra = Vec::new();
        if size >= self.zip64_from {
            extra.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
        }
        if align > MAX_ALIGN {
            return Err(format!("alignment of {align} bytes is larger than {MAX_ALIGN}"));
        }
        let unpadded = local + 30 + name.len() as u64 + extra.len() as u64;
        let align = align.max(1);
        let mut pad = (align - unpadded % align) % align;
        while pad != 0 && pad < 4 {
            pad += align; // a padding field needs its 4-byte id and length
        }
        if pad != 0 {
            extra.extend_from_slice(&PADDING_EXTRA.to_le_bytes());
            extra.extend_from_slice(&((pad - 4) as u16).to_le_bytes());
            extra.resize(extra.len() + (pad - 4) as usize, b'Z');
        }
        let data = unpadded + pad;
        self.end = data.checked_add(size).ok_or("archive size overflows")?;
        self.entries.push(Planned {
            name: name.to_string(),
            local,
            data,
            size,
            extra,
            zip64_from: self.zip64_from,
        });
        Ok(data)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where entry `i`'s data starts.
    ///
    /// # Panics
    /// If `i` is not the index of an added entry.
    pub fn data_offset(&self, i: usize) -> u64 {
        self.entries[i].data
    }

    /// Where the last entry's data ends (and the central directory starts).
    pub fn data_end(&self) -> u64 {
        self.end
    }

    /// Writes every local header with a zero CRC (the data is written afterwards).
    pub fn write_local_headers(&self, file: &File) -> io::Result<()> {
        for entry in &self.entries {
            file.write_all_at(&entry.local_header(0), entry.local)?;
        }
        Ok(())
    }

    /// Completes the archive once every entry's data is in place: rewrites the local headers
    /// with `crcs` (one per entry, in order) and appends the central directory and end records.
    /// Returns the archive's length.
    pub fn finish(&self, file: &File, crcs: &[u32]) -> io::Result<u64> {
        if crcs.len() != self.entries.len() {
            return Err(io::Error::other("one CRC per zip entry is needed"));
        }
        for (entry, &crc) in self.entries.iter().zip(crcs) {
            file.write_all_at(&entry.local_header(crc), entry.local)?;
        }
        let central = self.central_directory(crcs);
        file.write_all_at(&central, self.end)?;
        Ok(self.end + central.len() as u64)
    }

    /// The archive's length once finished: its records' sizes do not depend on the CRCs, so the
    /// central directory built with zeros has the length of the real one.
    pub fn finished_len(&self) -> u64 {
        self.end + self.central_directory(&vec![0; self.entries.len()]).len() as u64
    }

    /// The central directory and end records for `crcs` (one per entry, in order).
    fn central_directory(&self, crcs: &[u32]) -> Vec<u8> {
        let mut central = Vec::new();
        for (entry, &crc) in self.entries.iter().zip(crcs) {
            central.extend_from_slice(&entry.central_header(crc));
        }
        let (count, size, offset) = (self.entries.len() as u64, central.len() as u64, self.end);
        if count >= 0xFFFF.min(self.zip64_from) || size >= self.zip64_from || offset >= self.zip64_from {
            let record_at = offset + size;
            central.extend_from_slice(&EOCD64_SIG.to_le_bytes());
            central.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of the record
            central.extend_from_slice(&(45u16 | 3 << 8).to_le_bytes());
            central.extend_from_slice(&45u16.to_le_bytes());
            central.extend_from_slice(&[0; 8]); // this disk, disk of the central directory
            central.extend_from_slice(&count.to_le_bytes());
            central.extend_from_slice(&count.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(&EOCD64_LOCATOR_SIG.to_le_bytes());
            central.extend_from_slice(&0u32.to_le_bytes());
            central.extend_from_slice(&record_at.to_le_bytes());
            central.extend_from_slice(&1u32.to_le_bytes());
        }
        let zip64 = count >= 0xFFFF.min(self.zip64_from) || size >= self.zip64_from || offset >= self.zip64_from;
        let count16 = if zip64 { 0xFFFF } else { count as u16 };
        central.extend_from_slice(&EOCD_SIG.to_le_bytes());
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&count16.to_le_bytes());
        central.extend_from_slice(&count16.to_le_bytes());
        for value in [size, offset] {
            central.extend_from_slice(&(if zip64 { SATURATED } else { value } as u32).to_le_bytes());
        }
        central.extend_from_slice(&(ARCHIVE_COMMENT.len() as u16).to_le_bytes());
        central.extend_from_slice(ARCHIVE_COMMENT);
        central
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_keeps_its_io_error_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = SourceFile::open(&path).unwrap();
        // The file shrinks after it was opened: the read past its new end fails.
        std::fs::write(&path, b"").unwrap();
        match read_entries(&file) {
            Err(ZipError::Io(source)) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn crc32_known_value_and_combination() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_combine(crc32(b"1234"), crc32(b"56789"), 5), 0xCBF4_3926);
        assert_eq!(crc32_combine(crc32(b"123456789"), crc32(b""), 0), 0xCBF4_3926);
        assert_eq!(crc32_combine(0, crc32(b"123456789"), 9), 0xCBF4_3926);
    }

    fn write(layout: &Layout, data: &[&[u8]]) -> (tempfile::TempDir, SourceFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let file = File::create(&path).unwrap();
        layout.write_local_headers(&file).unwrap();
        for (i, d) in data.iter().enumerate() {
            file.write_all_at(d, layout.data_offset(i)).unwrap();
        }
        let crcs: Vec<u32> = data.iter().map(|d| crc32(d)).collect();
        let len = layout.finish(&file, &crcs).unwrap();
        assert_eq!(file.metadata().unwrap().len(), len);
        let source = SourceFile::open(&path).unwrap();
        (dir, source)
    }

    #[test]
    fn aligned_entries_round_trip() {
        let mut layout = Layout::new();
        let names = ["archive/data.pkl", "archive/data/0", "é/unicode"];
        let data: [&[u8]; 3] = [b"pickle", &[7u8; 100], b""];
        for (name, d) in names.iter().zip(data) {
            let at = layout.add(name, d.len() as u64, 64).unwrap();
            assert_eq!(at % 64, 0);
        }
        let (_dir, file) = write(&layout, &data);
        let entries = read_entries(&file).unwrap();
        assert_eq!(entries.len(), 3);
        for ((entry, name), d) in entries.iter().zip(names).zip(data) {
            assert_eq!(
                (entry.name.as_str(), entry.method, entry.size),
                (name, 0, d.len() as u64)
            );
            let mut back = vec![0u8; d.len()];
            file.read_at(entry.data_offset, &mut back).unwrap();
            assert_eq!(back, d);
        }
    }

    #[test]
    fn zip64_records_round_trip_and_other_readers_accept_them() {
        let mut layout = Layout {
            zip64_from: 0,
            ..Layout::default()
        };
        let data: [&[u8]; 2] = [b"first", &[3u8; 70]];
        layout.add("a", 5, 64).unwrap();
        layout.add("b", 70, 64).unwrap();
        let (_dir, file) = write(&layout, &data);
        let entries = read_entries(&file).unwrap();
        assert_eq!(entries.iter().map(|e| e.size).collect::<Vec<_>>(), [5, 70]);
        assert_eq!(entries[1].data_offset % 64, 0);
        // Python's zipfile, where there is one, checks the records and every CRC.
        let checked = std::process::Command::new("python3")
            .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; print(z.read('b').hex())"])
            .arg(&file.path)
            .output();
        if let Ok(out) = checked {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "03".repeat(70));
        }
    }

    #[test]
    fn small_alignments_pad_with_a_whole_field() {
        for align in [1, 2, 3, 4, 8, 64, 4096] {
            for name_len in 0..10 {
                let mut layout = Layout::new();
                let at = layout.add(&"n".repeat(name_len), 1, align).unwrap();
                assert_eq!(at % align, 0, "align {align}, name of {name_len}");
            }
        }
        assert!(Layout::new().add("x", 1, 1 << 20).is_err());
    }

    #[test]
    fn exactly_65535_entries_without_zip64_records_are_read() {
        let mut layout = Layout::new();
        for i in 0..0xFFFF {
            layout.add(&format!("{i}"), 0, 1).unwrap();
        }
        let (_dir, file) = write(&layout, &vec![&b""[..]; 0xFFFF]);
        // Strip the ZIP64 records our writer adds at this count, as Python's zipfile does not
        // write them: keep the classic end record only.
        let bytes = std::fs::read(&file.path).unwrap();
        let eocd = bytes.len() - 22 - ARCHIVE_COMMENT.len();
        let locator = eocd - 20;
        let record = locator - 56;
        let mut classic = bytes[..record].to_vec();
        let mut end = bytes[eocd..].to_vec();
        let cd_offset = layout.data_end() as u32;
        end[12..16].copy_from_slice(&(record as u32 - cd_offset).to_le_bytes());
        end[16..20].copy_from_slice(&cd_offset.to_le_bytes());
        classic.extend_from_slice(&end);
        std::fs::write(&file.path, &classic).unwrap();
        let file = SourceFile::open(&file.path).unwrap();
        assert_eq!(read_entries(&file).unwrap().len(), 0xFFFF);
    }

    #[test]
    fn entries_sharing_bytes_are_refused() {
        let mut layout = Layout::new();
        layout.add("a", 10, 1).unwrap();
        layout.add("b", 10, 1).unwrap();
        let (_dir, file) = write(&layout, &[&[1u8; 10], &[2u8; 10]]);
        assert_eq!(read_entries(&file).unwrap().len(), 2);
        // Point the second central record at the first entry's local header.
        let mut bytes = std::fs::read(&file.path).unwrap();
        let central: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == CENTRAL_SIG.to_le_bytes())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(central.len(), 2);
        bytes[central[1] + 42..central[1] + 46].copy_from_slice(&0u32.to_le_bytes());
        std::fs::write(&file.path, &bytes).unwrap();
        let file = SourceFile::open(&file.path).unwrap();
        match read_entries(&file) {
            Err(ZipError::Overlapping { first, second }) => assert_eq!((first.as_str(), second.as_str()), ("a", "b")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncations_are_errors() {
        let mut layout = Layout::new();
        layout.add("x", 10, 1).unwrap();
        let (dir, file) = write(&layout, &[&[1u8; 10]]);
        let bytes = std::fs::read(&file.path).unwrap();
        let path = dir.path().join("cut.zip");
        for n in 0..bytes.len() {
            std::fs::write(&path, &bytes[..n]).unwrap();
            let cut = SourceFile::open(&path).unwrap();
            assert!(read_entries(&cut).is_err(), "prefix of {n} bytes accepted");
        }
    }
}
