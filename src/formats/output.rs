//! Atomic output (SPEC §6.2) in every format, through one [`Writer`]: it lays tensors out,
//! creates temporary files beside the final names with their headers written and their lengths
//! set, and hands out `(file, offset)` placements so callers can `pwrite` tensor bytes
//! concurrently. [`Writer::commit`] completes the zip archives with the tensors' CRCs, renames
//! everything into place (index last) and clears stale shards of an earlier run; dropping an
//! uncommitted writer leaves nothing behind. Producing the bytes is the executor's job.
//!
//! One struct rather than a trait: shard planning, the temporaries ([`Staged`]), sidecars,
//! renames and cleanup are the same for every format, and only each file's layout differs
//! ([`Body`]: a safetensors header, a PyTorch archive from [`super::torch_output`], an `.npz`
//! archive of `.npy` entries, or one bare `.npy`), so a `match` over the body in two places
//! (creation and commit) is all the per-format code there is.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use super::torch_output::Archive;
use super::zip::{self, Layout};
use super::{Format, FormatError, INDEX_NAME};
use crate::dtype::{checked_numel, DType};

/// File name of an unsharded safetensors directory output.
pub const SINGLE_NAME: &str = "model.safetensors";
/// Metadata key recording the engine version, in safetensors headers and in the index: how a
/// later run recognises an output it may replace.
pub const VERSION_KEY: &str = "brainsurgery.version";

/// One tensor to write: its bytes are supplied later, at [`Writer::placement`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of its elements, computed once by [`OutputTensor::new`].
    pub nbytes: u64,
}

impl OutputTensor {
    /// A tensor to write; errors when its byte size overflows or is not a whole number of bytes
    /// (sub-byte tensors the official loader rejects).
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Result<Self, FormatError> {
        let name = name.into();
        let bytes = checked_numel(&shape)
            // Sub-byte elements must fill whole bytes.
            .filter(|numel| (numel % 8 * dtype.bits()).is_multiple_of(8))
            .and_then(|numel| dtype.nbytes(numel))
            .and_then(|bytes| u64::try_from(bytes).ok());
        match bytes {
            Some(nbytes) => Ok(OutputTensor {
                name,
                dtype,
                shape,
                nbytes,
            }),
            None => Err(FormatError::InvalidTensorSize { name, dtype, shape }),
        }
    }
}

/// Where the output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputLayout {
    /// A single file at this path (a NumPy one is an `.npz` archive).
    File(PathBuf),
    /// One bare `.npy` file holding exactly one tensor (NumPy only).
    Npy(PathBuf),
    /// A directory: `model.safetensors`, or shards plus `model.safetensors.index.json` when
    /// the tensors do not fit in one shard of `shard_budget` bytes (likewise for PyTorch).
    Directory {
        /// The output directory (created if missing).
        dir: PathBuf,
        /// Most tensor bytes per shard; `None` means one file.
        shard_budget: Option<u64>,
    },
}

impl OutputLayout {
    /// The path the user named.
    fn path(&self) -> &Path {
        match self {
            OutputLayout::File(p) | OutputLayout::Npy(p) => p,
            OutputLayout::Directory { dir, .. } => dir,
        }
    }
}

/// A temporary file beside its target: [`Staged::commit`] puts it into place; dropped before
/// that, it is removed. Every file a writer produces goes through one.
///
/// On Linux the temporary is unnamed (`O_TMPFILE`): until commit it has no name in the
/// directory, so even `kill -9` leaves nothing behind. At commit it is linked under a hidden
/// name and renamed over the target. Where unnamed files are unavailable (other systems, some
/// filesystems, no `/proc`) it is a hidden named file, and a later run in the folder removes
/// those of dead processes ([`remove_dead_temporaries`]).
#[derive(Debug)]
struct Staged {
    temp: PathBuf,
    target: PathBuf,
    /// The unnamed file, linked to `temp` at commit; `None` for a named temporary.
    unnamed: Option<File>,
    renamed: bool,
}

impl Staged {
    /// A fresh temporary name beside `target`: hidden (readers skip dot-files) and unique per
    /// process and call. Nothing is created yet, but dropping removes whatever is there.
    fn beside(target: &Path) -> Staged {
        Staged {
            temp: temp_path_for(target),
            target: target.to_path_buf(),
            unnamed: None,
            renamed: false,
        }
    }

    /// A new temporary file for `target`, open for reading and writing.
    fn create(target: &Path) -> Result<(Staged, File), FormatError> {
        let temp = temp_path_for(target);
        let unnamed = unnamed_file(target).and_then(|f| Some((f.try_clone().ok()?, f)));
        let (unnamed, file) = match unnamed {
            Some((kept, file)) => (Some(kept), file),
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&temp)
                    .map_err(|e| FormatError::io(&temp, e))?;
                (None, file)
            }
        };
        let staged = Staged {
            temp,
            target: target.to_path_buf(),
            unnamed,
            renamed: false,
        };
        Ok((staged, file))
    }

    /// `fsync`s the temporary's contents.
    fn sync(&self) -> Result<(), FormatError> {
        match &self.unnamed {
            Some(file) => file.sync_all(),
            None => File::open(&self.temp).and_then(|f| f.sync_all()),
        }
        .map_err(|e| FormatError::io(&self.temp, e))
    }

    /// Puts the temporary in place of its target (atomically replacing what was there).
    fn commit(mut self) -> Result<(), FormatError> {
        if let Some(file) = self.unnamed.take() {
            link_unnamed(&file, &self.temp).map_err(|e| FormatError::io(&self.temp, e))?;
        }
        std::fs::rename(&self.temp, &self.target).map_err(|e| FormatError::io(&self.target, e))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // An unnamed file vanishes when its last descriptor closes; a named one is removed.
        if !self.renamed && self.unnamed.is_none() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A small file (an adapter's `adapter_config.json`) written to a temporary beside its target
/// and put in place by [`StagedFile::commit`], so it can land right after the file it describes;
/// dropped uncommitted, it leaves nothing.
#[derive(Debug)]
pub struct StagedFile(Staged);

impl StagedFile {
    /// Writes `bytes` to a temporary for `target`.
    pub fn write(target: &Path, bytes: &[u8]) -> Result<StagedFile, FormatError> {
        use std::io::Write as _;
        let (staged, mut file) = Staged::create(target)?;
        file.write_all(bytes).map_err(|e| FormatError::io(target, e))?;
        Ok(StagedFile(staged))
    }

    /// Renames the temporary over the target.
    pub fn commit(self) -> Result<(), FormatError> {
        self.0.commit()
    }
}

/// An unnamed file in `target`'s directory (Linux `O_TMPFILE`), or `None` where unavailable.
#[cfg(target_os = "linux")]
fn unnamed_file(target: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Linking it later goes through /proc; without /proc the file could never be named.
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o666)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn unnamed_file(_target: &Path) -> Option<File> {
    None
}

/// Gives the unnamed `file` the name `path` (which must not exist).
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, path: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let dest = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: both arguments are valid NUL-terminated strings that outlive the call; linkat
    // only reads them.
    let status = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            dest.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_file: &File, _path: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// A temporary untouched for this long, of a process that no longer runs, is a leftover.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the named temporaries of `targets` (`.NAME.tmp-PID-…` beside each) left by processes
/// that no longer run (killed where unnamed temporaries are unavailable). Only regular files,
/// unmodified for [`STALE_TEMPORARY`]: the process-id check means nothing for a writer in another
/// container or on another host sharing the folder, and such a writer keeps its file fresh.
fn remove_dead_temporaries(targets: &[&Path]) {
    // One listing per folder (a sharded output's files share one), not one per target.
    let mut by_dir: BTreeMap<&Path, Vec<&str>> = BTreeMap::new();
    for target in targets {
        if let (Some(dir), Some(name)) = (target.parent(), target.file_name().and_then(|n| n.to_str())) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            by_dir.entry(dir).or_default().push(name);
        }
    }
    for (dir, names) in by_dir {
        let Ok(listing) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in listing.flatten() {
            let Ok(file_name) = entry.file_name().into_string() else {
                continue;
            };
            let Some(pid) = names.iter().find_map(|name| temporary_pid(&file_name, name)) else {
                continue;
            };
            let stale = entry.metadata().is_ok_and(|m| {
                m.is_file()
                    && m.modified()
                        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= STALE_TEMPORARY))
            });
            if stale && pid != std::process::id() && !process_alive(pid) {
                let _ = std::fs::remove_file(dir.join(&file_name));
            }
        }
    }
}

/// The process id in `file_name` when it is a temporary of `target_name`:
/// `.TARGET.tmp-PID-SUFFIX` ([`temp_path_for`]).
fn temporary_pid(file_name: &str, target_name: &str) -> Option<u32> {
    let tail = file_name
        .strip_prefix('.')?
        .strip_prefix(target_name)?
        .strip_prefix(".tmp-")?;
    let (pid, suffix) = tail.split_once('-')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists (signal 0 checks without sending anything).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: kill with signal 0 has no effect beyond the existence and permission check.
    let status = unsafe { libc::kill(pid, 0) };
    status == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Directories a writer created, outermost first: removed again (innermost first) when
/// dropped, unless kept; one someone else filled meanwhile stays (`remove_dir` fails).
#[derive(Debug, Default)]
struct CreatedDirs {
    dirs: Vec<PathBuf>,
}

impl CreatedDirs {
    /// Creates `dir` and its missing parents, remembering each one created.
    fn create(&mut self, dir: &Path) -> Result<(), FormatError> {
        let missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => self.dirs.push(d.to_path_buf()),
                // Someone else created it meanwhile: theirs to keep.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(FormatError::io(d, e)),
            }
        }
        Ok(())
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// How one output file is laid out, and what its completion needs at commit.
#[derive(Debug)]
enum Body {
    /// A safetensors file: the header is written at creation; nothing is left to do.
    Safetensors,
    /// A PyTorch zip archive, completed with the storages' CRCs.
    Torch(Archive),
    /// An `.npz` archive of stored `NAME.npy` entries; per tensor the CRC-32 of its `.npy`
    /// header and its data's byte size, combined with the data's CRC at commit.
    Npz(Layout, Vec<(u32, u64)>),
    /// A bare `.npy`: header, then data.
    Npy,
}

/// One output file being written.
#[derive(Debug)]
struct Shard {
    final_path: PathBuf,
    temp_path: PathBuf,
    file: File,
    body: Body,
}

/// Writes output atomically in any format: see the module docs.
#[derive(Debug)]
pub struct Writer {
    format: Format,
    /// The output directory, for a [`OutputLayout::Directory`] layout.
    dir: Option<PathBuf>,
    shards: Vec<Shard>,
    /// Per tensor: shard index and absolute offset.
    slots: Vec<(usize, u64)>,
    /// Final path of the index, when sharded.
    index: Option<PathBuf>,
    /// Temporaries to rename on commit, in order (shards, then index); dropped, they are
    /// removed. Declared before `created_dirs`, so they are dropped (removed) first.
    staged: Vec<Staged>,
    /// Directories this writer created.
    created_dirs: CreatedDirs,
    total: u64,
    sync: bool,
}

/// Splits tensor sizes into shards greedily in order: a shard is closed when the next tensor
/// would take it past the budget; a tensor above the budget therefore sits alone.
fn plan_shards(sizes: &[u64], budget: Option<u64>) -> Vec<usize> {
    let mut shard_of = Vec::with_capacity(sizes.len());
    let mut shard = 0usize;
    let mut used: u64 = 0;
    let mut count = 0usize;
    for &size in sizes {
        if let Some(budget) = budget {
            if count > 0 && used.saturating_add(size) > budget {
                shard += 1;
                used = 0;
                count = 0;
            }
        }
        used = used.saturating_add(size);
        count += 1;
        shard_of.push(shard);
    }
    shard_of
}

/// The names of a directory output of `format`: single file, index, shard stem and extension.
fn directory_names(format: Format) -> (&'static str, &'static str, (&'static str, &'static str)) {
    if format == Format::Dcp {
        // `.metadata` beside `__0_<i>.distcp`, as one rank of `torch.distributed.checkpoint.save`
        // names its files.
        return ("", super::dcp::METADATA_NAME, ("__0", "distcp"));
    }
    let info = format.info();
    match (info.single_name, info.index_name, info.shard_parts) {
        (Some(single), Some(index), Some(parts)) => (single, index, parts),
        // NumPy output is refused as a directory before names are asked for.
        _ => ("", "", ("", "")),
    }
}

/// Name of shard `i` (0-based) of `n`, as Hugging Face names them (DCP data files as torch does).
fn shard_name(format: Format, i: usize, n: usize) -> String {
    let (_, _, (stem, extension)) = directory_names(format);
    if format == Format::Dcp {
        return format!("{stem}_{i}.{extension}");
    }
    format!("{stem}-{:05}-of-{:05}.{extension}", i + 1, n)
}

/// Whether `name` is an output file of `format` an earlier run may have left in a directory.
fn is_weight_output_name(format: Format, name: &str) -> bool {
    let (single, index, (stem, extension)) = directory_names(format);
    if name == single || name == index {
        return true;
    }
    if format == Format::Dcp {
        // __<rank>_<n>.distcp
        let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        return name
            .strip_prefix("__")
            .and_then(|rest| rest.strip_suffix(".distcp"))
            .and_then(|rest| rest.split_once('_'))
            .is_some_and(|(a, b)| number(a) && number(b));
    }
    // model-NNNNN-of-NNNNN.safetensors
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(stem)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.strip_suffix(extension))
        .and_then(|rest| rest.strip_suffix('.'))
        .and_then(|rest| rest.split_once("-of-"))
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// Weight files of `format`'s directory layout in `dir` (the index, the single file, shards) that
/// this tool did not write: a directory output there would replace or remove them. Ours are an
/// index whose metadata has [`VERSION_KEY`] and the shards it names, safetensors files whose
/// header has it, and zip archives ending in [`zip::ARCHIVE_COMMENT`].
pub fn foreign_outputs(format: Format, dir: &Path) -> Vec<PathBuf> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new(); // missing: nothing in the way; unreadable: writing fails clearly
    };
    let mut names: Vec<String> = listing
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_weight_output_name(format, n))
        .collect();
    names.sort();
    let (_, index, _) = directory_names(format);
    let mut ours: HashSet<String> = HashSet::new();
    if let Some(shards) = names
        .iter()
        .any(|n| n == index)
        .then(|| our_index_shards(&dir.join(index)))
        .flatten()
    {
        ours.insert(index.to_owned());
        ours.extend(shards);
    }
    if format == Format::Dcp
        && names
            .iter()
            .filter(|n| n.as_str() != index)
            .all(|n| marked_as_ours(&dir.join(n)))
    {
        // A `.metadata` beside data files all of ours is ours too.
        ours.insert(index.to_owned());
    }
    names
        .into_iter()
        .filter(|n| !ours.contains(n) && !marked_as_ours(&dir.join(n)))
        .map(|n| dir.join(n))
        .collect()
}

/// Largest index or safetensors header read to recognise an earlier output.
const MAX_MARK_READ: u64 = 256 << 20;

/// The shard names an index of ours lists, or `None` when it is not ours (or unreadable).
fn our_index_shards(path: &Path) -> Option<Vec<String>> {
    let file = File::open(path).ok()?;
    if file.metadata().ok()?.len() > MAX_MARK_READ {
        return None;
    }
    let doc: Value = serde_json::from_reader(io::BufReader::new(file)).ok()?;
    let map = doc.get("weight_map")?.as_object()?;
    let shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    // Indexes written before the version key was added to them: ours when every shard is.
    let marked = doc.get("metadata").and_then(|m| m.get(VERSION_KEY)).is_some();
    let dir = path.parent().unwrap_or(Path::new("."));
    (marked || shards.iter().all(|s| marked_as_ours(&dir.join(s)))).then_some(shards)
}

/// Whether the weight file at `path` carries our mark (see [`foreign_outputs`]).
fn marked_as_ours(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut head = [0u8; 8];
    if file.read_exact_at(&mut head, 0).is_err() {
        return false;
    }
    if head.starts_with(b"PK") {
        let tail_len = len.min(zip::ARCHIVE_COMMENT.len() as u64);
        let mut tail = vec![0u8; tail_len as usize];
        return file.read_exact_at(&mut tail, len - tail_len).is_ok() && tail == zip::ARCHIVE_COMMENT;
    }
    // safetensors: an 8-byte length, then the JSON header.
    let n = u64::from_le_bytes(head);
    if n > MAX_MARK_READ || n > len.saturating_sub(8) {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    if file.read_exact_at(&mut header, 8).is_err() {
        return false;
    }
    serde_json::from_slice::<Value>(&header)
        .ok()
        .is_some_and(|doc| doc.get("__metadata__").and_then(|m| m.get(VERSION_KEY)).is_some())
}

/// Refuses a PyTorch directory output into a directory holding safetensors weights: readers
/// (this one, `transformers`) prefer those, so the new files would be ignored.
fn refuse_shadowing_safetensors(dir: &Path) -> Result<(), FormatError> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Ok(()); // missing: created later; unreadable: creating files fails clearly
    };
    let mut found: Vec<String> = listing
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && (n.ends_with(".safetensors") || n == INDEX_NAME))
        .collect();
    found.sort();
    match found.first() {
        None => Ok(()),
        Some(first) => Err(FormatError::InvalidOutput {
            path: dir.to_path_buf(),
            reason: format!(
                "holds safetensors weights ({first}), which loaders prefer over PyTorch files; \
                 remove them or write the PyTorch output to another directory"
            ),
        }),
    }
}

/// The prefix of a safetensors file: 8-byte length and the JSON header padded with spaces to a
/// multiple of 8, so the data section is 8-byte aligned as the official writer does.
fn header_bytes<'a>(
    tensors: impl Iterator<Item = (&'a OutputTensor, u64, u64)>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    use std::io::Write as _;
    // Written directly, the bytes `serde_json::to_vec` gives for the same object: building it as
    // a `serde_json::Value` first took ~1 KB per tensor at once (issue 9: 100,000 tensors).
    let quoted = |out: &mut Vec<u8>, text: &str| {
        serde_json::to_writer(out, text).expect("writing a JSON string to a Vec cannot fail");
    };
    let mut json = Vec::new();
    json.push(b'{');
    let mut first = true;
    let mut separate = |json: &mut Vec<u8>| {
        if !std::mem::take(&mut first) {
            json.push(b',');
        }
    };
    if !metadata.is_empty() {
        separate(&mut json);
        json.extend_from_slice(b"\"__metadata__\":{");
        for (i, (key, value)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            quoted(&mut json, key);
            json.push(b':');
            quoted(&mut json, value);
        }
        json.push(b'}');
    }
    for (t, begin, end) in tensors {
        separate(&mut json);
        quoted(&mut json, &t.name);
        json.extend_from_slice(b":{\"dtype\":");
        quoted(&mut json, t.dtype.safetensors_name());
        json.extend_from_slice(b",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            write!(json, "{d}").expect("writing to a Vec cannot fail");
        }
        write!(json, "],\"data_offsets\":[{begin},{end}]}}").expect("writing to a Vec cannot fail");
    }
    json.push(b'}');
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// The `.npy` header (magic, version 1.0, padded dict) of a C-order array.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // NumPy pads so the data starts on a 64-byte boundary of the .npy, ending with a newline.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// One file laid out: its body, its length at creation and once committed (a zip archive's
/// central directory is appended at commit), where each tensor's data starts, and the bytes
/// written at creation besides the body's own prefix.
#[derive(Debug)]
struct FilePlan {
    body: Body,
    len: u64,
    final_len: u64,
    starts: Vec<u64>,
    prefix: Vec<(u64, Vec<u8>)>,
}

/// Lays out one file of `format` holding `entries` (tensor, begin, end within the data).
fn plan_file(
    format: Format,
    bare_npy: bool,
    entries: &[(&OutputTensor, u64, u64)],
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<FilePlan, FormatError> {
    let invalid = |reason| FormatError::InvalidOutput {
        path: path.to_path_buf(),
        reason,
    };
    // Descrs exist: `check_writable` refused the dtypes NumPy lacks.
    let npy_of = |t: &OutputTensor| npy_header(&t.dtype.info().npy_descr().unwrap_or_default(), &t.shape);
    Ok(match format {
        // One tensor per file, pickled bare (`torch.save(tensor)`).
        Format::Dcp => {
            let [(t, _, _)] = entries else {
                return Err(invalid(
                    "a distributed checkpoint data file holds one tensor".to_owned(),
                ));
            };
            let archive = Archive::plan_chunk(t, path)?;
            FilePlan {
                len: archive.data_end(),
                final_len: archive.finished_len(),
                starts: vec![archive.tensor_offset(0)],
                body: Body::Torch(archive),
                prefix: Vec::new(),
            }
        }
        Format::Safetensors => {
            let prefix = header_bytes(entries.iter().copied(), metadata);
            let at = prefix.len() as u64;
            let len = at + entries.last().map_or(0, |e| e.2);
            FilePlan {
                body: Body::Safetensors,
                len,
                final_len: len,
                starts: entries.iter().map(|e| at + e.1).collect(),
                prefix: vec![(0, prefix)],
            }
        }
        Format::PyTorch => {
            let tensors: Vec<&OutputTensor> = entries.iter().map(|e| e.0).collect();
            let archive = Archive::plan(&tensors, path)?;
            FilePlan {
                len: archive.data_end(),
                final_len: archive.finished_len(),
                starts: (0..entries.len()).map(|i| archive.tensor_offset(i)).collect(),
                body: Body::Torch(archive),
                prefix: Vec::new(),
            }
        }
        Format::NumPy if bare_npy => {
            let header = entries.first().map(|e| npy_of(e.0)).unwrap_or_default();
            let at = header.len() as u64;
            let len = at + entries.first().map_or(0, |e| e.0.nbytes);
            FilePlan {
                body: Body::Npy,
                len,
                final_len: len,
                starts: vec![at; entries.len()],
                prefix: vec![(0, header)],
            }
        }
        Format::NumPy => {
            let mut layout = Layout::new();
            let (mut starts, mut crcs, mut prefix) = (Vec::new(), Vec::new(), Vec::new());
            for &(t, _, _) in entries {
                let header = npy_of(t);
                // Entries start on 64 bytes and the .npy header is padded to 64, so data is
                // aligned.
                let entry = layout
                    .add(&format!("{}.npy", t.name), header.len() as u64 + t.nbytes, 64)
                    .map_err(invalid)?;
                starts.push(entry + header.len() as u64);
                crcs.push((zip::crc32(&header), t.nbytes));
                prefix.push((entry, header));
            }
            FilePlan {
                len: layout.data_end(),
                final_len: layout.finished_len(),
                body: Body::Npz(layout, crcs),
                starts,
                prefix,
            }
        }
    })
}

/// A fresh temporary path beside `target`: hidden (readers skip dot-files) and unique per
/// process and call.
fn temp_path_for(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = format!(".{name}.tmp-{}-{n}{nanos:x}", std::process::id());
    target.with_file_name(tmp)
}

/// An output laid out without writing anything: every file it consists of, where each tensor's
/// data goes and each file's final length. [`Writer::create`] creates exactly these files, and
/// the plan check reports their sizes from the same plan, so the two never disagree.
#[derive(Debug)]
pub struct OutputPlan {
    format: Format,
    /// The directory the files go in (created when missing).
    dir: PathBuf,
    /// Whether the output is a directory (sidecars are copied, stale shards cleared).
    is_directory: bool,
    /// Final path and layout of each weight file, in order.
    files: Vec<(PathBuf, FilePlan)>,
    /// Per tensor, the index of its file.
    shard_of: Vec<usize>,
    /// Final path and bytes of the index, when sharded.
    index: Option<(PathBuf, Vec<u8>)>,
    total: u64,
}

impl OutputPlan {
    /// Lays out `tensors` in the given order as `format` files. What the format cannot hold is
    /// refused first ([`Format::check_writable`]), then targets that cannot be written (a file
    /// path that is a directory, a directory path that is a file, a PyTorch directory output
    /// beside safetensors weights); nothing is created.
    pub fn new(
        format: Format,
        layout: &OutputLayout,
        tensors: &[OutputTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, FormatError> {
        let bare_npy = matches!(layout, OutputLayout::Npy(_));
        let invalid = |path: &Path, reason: &str| FormatError::InvalidOutput {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bare_npy && format != Format::NumPy {
            return Err(invalid(layout.path(), "only NumPy output is a bare .npy"));
        }
        format.check_writable(tensors.iter().map(|t| (t.name.as_str(), t.dtype)), bare_npy)?;
        let mut names = HashSet::with_capacity(tensors.len());
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(FormatError::DuplicateOutputTensor { name: t.name.clone() });
            }
        }
        let sizes: Vec<u64> = tensors.iter().map(|t| t.nbytes).collect();
        let total = sizes
            .iter()
            .try_fold(0u64, |acc, &s| acc.checked_add(s))
            .ok_or_else(|| invalid(layout.path(), "total size overflows"))?;

        let (dir, final_paths, shard_of, index) = match layout {
            OutputLayout::File(path) | OutputLayout::Npy(path) if format == Format::Dcp => {
                return Err(invalid(
                    path,
                    "a distributed checkpoint is a directory; give a path without an extension",
                ));
            }
            OutputLayout::File(path) | OutputLayout::Npy(path) => {
                let parent = match (path.file_name(), path.parent()) {
                    (Some(_), Some(p)) if p.as_os_str().is_empty() => PathBuf::from("."),
                    (Some(_), Some(p)) => p.to_path_buf(),
                    _ => return Err(invalid(path, "no file name")),
                };
                if path.is_dir() {
                    return Err(invalid(path, "is a directory"));
                }
                (parent, vec![path.clone()], vec![0; tensors.len()], None)
            }
            OutputLayout::Directory { dir, shard_budget } => {
                if format == Format::NumPy {
                    return Err(invalid(dir, "NumPy output is one .npz (or .npy) file"));
                }
                if dir.exists() && !dir.is_dir() {
                    return Err(invalid(dir, "exists and is not a directory"));
                }
                if format == Format::PyTorch {
                    refuse_shadowing_safetensors(dir)?;
                }
                let (single, index, _) = directory_names(format);
                if format == Format::Dcp {
                    // One data file per tensor, whatever the shard budget.
                    let n = tensors.len();
                    let paths = (0..n).map(|i| dir.join(shard_name(format, i, n))).collect();
                    (dir.clone(), paths, (0..n).collect(), Some(dir.join(index)))
                } else {
                    let shard_of = plan_shards(&sizes, *shard_budget);
                    let n = shard_of.last().map_or(1, |&s| s + 1);
                    if n == 1 {
                        (dir.clone(), vec![dir.join(single)], shard_of, None)
                    } else {
                        let paths = (0..n).map(|i| dir.join(shard_name(format, i, n))).collect();
                        (dir.clone(), paths, shard_of, Some(dir.join(index)))
                    }
                }
            }
        };

        // Offsets within each shard's data, consecutive in the given order (no holes, so the
        // official loader accepts the file).
        let mut cursor = vec![0u64; final_paths.len()];
        let mut layout_entries: Vec<Vec<(&OutputTensor, u64, u64)>> = vec![Vec::new(); final_paths.len()];
        for (t, &shard) in tensors.iter().zip(&shard_of) {
            // Indices come from plan_shards, which numbers shards 0..final_paths.len().
            let begin = cursor[shard];
            let end = begin + t.nbytes; // cannot overflow: bounded by `total`
            cursor[shard] = end;
            layout_entries[shard].push((t, begin, end));
        }
        let mut files = Vec::with_capacity(final_paths.len());
        for (final_path, entries) in final_paths.into_iter().zip(&layout_entries) {
            let plan = plan_file(format, bare_npy, entries, metadata, &final_path)?;
            files.push((final_path, plan));
        }
        let index = index.map(|index_path| {
            if format == Format::Dcp {
                let refs: Vec<&OutputTensor> = tensors.iter().collect();
                let data: Vec<(String, u64)> = files
                    .iter()
                    .map(|(path, plan)| {
                        let name = path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        (name, plan.final_len)
                    })
                    .collect();
                return (index_path, super::torch_output::dcp_metadata_pickle(&refs, &data));
            }
            let n = files.len();
            let mut weight_map = Map::new();
            for (t, &shard) in tensors.iter().zip(&shard_of) {
                weight_map.insert(t.name.clone(), shard_name(format, shard, n).into());
            }
            let mut meta = Map::new();
            meta.insert("total_size".into(), total.into());
            meta.insert(VERSION_KEY.into(), env!("CARGO_PKG_VERSION").into());
            let mut doc = Map::new();
            doc.insert("metadata".into(), Value::Object(meta));
            doc.insert("weight_map".into(), Value::Object(weight_map));
            let mut text = serde_json::to_vec_pretty(&Value::Object(doc))
                .expect("a JSON value with string keys always serializes");
            text.push(b'\n');
            (index_path, text)
        });
        Ok(OutputPlan {
            format,
            dir,
            is_directory: matches!(layout, OutputLayout::Directory { .. }),
            files,
            shard_of,
            index,
            total,
        })
    }

    /// Every file the output consists of, weight files then the index, with its final length
    /// (headers, data and a zip archive's central directory).
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        let mut files: Vec<(PathBuf, u64)> = self
            .files
            .iter()
            .map(|(path, plan)| (path.clone(), plan.final_len))
            .collect();
        files.extend(self.index.iter().map(|(path, text)| (path.clone(), text.len() as u64)));
        files
    }

    /// The copies of `sidecars` a directory output makes (none for a single file), each with
    /// its target and the source's current size.
    pub fn sidecar_files(&self, sidecars: &[Sidecar]) -> Result<Vec<(PathBuf, u64)>, FormatError> {
        if !self.is_directory {
            return Ok(Vec::new());
        }
        let outputs: HashSet<PathBuf> = self.files().into_iter().map(|(path, _)| path).collect();
        sidecar_copies(&self.dir, sidecars, &outputs)?
            .into_iter()
            .map(|(sidecar, target)| {
                let len = match sidecar {
                    Sidecar::File(source) => std::fs::metadata(source).map_err(|e| FormatError::io(source, e))?.len(),
                    Sidecar::Contents { bytes, .. } => bytes.len() as u64,
                };
                Ok((target, len))
            })
            .collect()
    }

    /// Sum of the tensors' byte sizes (the index's `total_size`), not counting headers.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

/// A non-weight file a directory output carries beside its weights: a file copied as it is
/// (`config.json`, tokenizer files), or contents the plan produced in its place (a config
/// edited by the `config` transform or rewritten by `upcycle_moe`).
#[derive(Debug, Clone, PartialEq)]
pub enum Sidecar {
    /// A file copied under its own name.
    File(PathBuf),
    /// Bytes the plan produced.
    Contents {
        /// The file name (no directory).
        name: String,
        /// The file's contents.
        bytes: Vec<u8>,
    },
}

impl Sidecar {
    /// The file name it takes in the output directory.
    pub fn name(&self) -> Option<&std::ffi::OsStr> {
        match self {
            Sidecar::File(path) => path.file_name(),
            Sidecar::Contents { name, .. } => Some(std::ffi::OsStr::new(name.as_str())),
        }
    }

    /// Where it comes from, for messages.
    fn describe(&self) -> PathBuf {
        match self {
            Sidecar::File(path) => path.clone(),
            Sidecar::Contents { name, .. } => PathBuf::from(name),
        }
    }
}

/// The sidecar copies a directory output in `dir` makes: (source, target) for each of
/// `sidecars` except one that already is the file in `dir`; a sidecar without a file name, or
/// named like one of `outputs`, is refused.
fn sidecar_copies<'a>(
    dir: &Path,
    sidecars: &'a [Sidecar],
    outputs: &HashSet<PathBuf>,
) -> Result<Vec<(&'a Sidecar, PathBuf)>, FormatError> {
    let mut copies = Vec::with_capacity(sidecars.len());
    for sidecar in sidecars {
        let name = match sidecar.name() {
            Some(name)
                if matches!(
                    Path::new(name).components().collect::<Vec<_>>().as_slice(),
                    [std::path::Component::Normal(_)]
                ) =>
            {
                name
            }
            _ => {
                return Err(FormatError::InvalidOutput {
                    path: sidecar.describe(),
                    reason: "sidecar has no plain file name".to_string(),
                })
            }
        };
        let target = dir.join(name);
        if outputs.contains(&target) {
            return Err(FormatError::InvalidOutput {
                path: sidecar.describe(),
                reason: "sidecar has the name of an output weight file".to_string(),
            });
        }
        if let Sidecar::File(source) = sidecar {
            if same_file(source, &target) {
                continue;
            }
        }
        copies.push((sidecar, target));
    }
    Ok(copies)
}

impl Writer {
    /// Lays out `tensors` in the given order as `format` files ([`OutputPlan::new`]), creates
    /// temporary files beside the final names, writes each header and sets each file's length
    /// (sparse), so callers can `pwrite` the data concurrently through [`Writer::placement`].
    ///
    /// Missing directories (the output directory, or a file's parents) are created and removed
    /// again if the writer is dropped uncommitted. Every safetensors shard carries `metadata`;
    /// the other formats have no place for it.
    pub fn create(
        format: Format,
        layout: OutputLayout,
        tensors: &[OutputTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, FormatError> {
        Self::from_plan(OutputPlan::new(format, &layout, tensors, metadata)?)
    }

    /// Creates the files `plan` lays out (see [`Writer::create`]).
    pub fn from_plan(plan: OutputPlan) -> Result<Self, FormatError> {
        let OutputPlan {
            format,
            dir,
            is_directory,
            files,
            shard_of,
            index,
            total,
        } = plan;
        // From here on, failures drop `writer`, which removes what it created.
        let mut writer = Writer {
            format,
            dir: is_directory.then(|| dir.clone()),
            shards: Vec::with_capacity(files.len()),
            slots: Vec::with_capacity(shard_of.len()),
            index: index.as_ref().map(|(path, _)| path.clone()),
            staged: Vec::new(),
            created_dirs: CreatedDirs::default(),
            total,
            sync: false,
        };
        writer.created_dirs.create(&dir)?;
        let targets: Vec<&Path> = files
            .iter()
            .map(|(path, _)| path.as_path())
            .chain(index.iter().map(|(path, _)| path.as_path()))
            .collect();
        remove_dead_temporaries(&targets);

        // Per shard, where each of its tensors' data starts in the file, in order.
        let mut data_starts: Vec<Vec<u64>> = Vec::with_capacity(files.len());
        for (final_path, plan) in files {
            let (staged, file) = Staged::create(&final_path)?;
            let temp = staged.temp.clone();
            writer.staged.push(staged);
            let io = |e| FormatError::io(&temp, e);
            // Sparse: unwritten data reads as zeros and costs no disk until written.
            file.set_len(plan.len).map_err(io)?;
            match &plan.body {
                Body::Torch(archive) => archive.write_prefix(&file).map_err(io)?,
                Body::Npz(layout, _) => layout.write_local_headers(&file).map_err(io)?,
                Body::Safetensors | Body::Npy => {}
            }
            for (at, bytes) in &plan.prefix {
                file.write_all_at(bytes, *at).map_err(io)?;
            }
            data_starts.push(plan.starts);
            writer.shards.push(Shard {
                final_path,
                temp_path: temp,
                file,
                body: plan.body,
            });
        }
        let mut next_in_shard = vec![0usize; data_starts.len()];
        writer.slots = shard_of
            .iter()
            .map(|&shard| {
                let k = next_in_shard[shard];
                next_in_shard[shard] += 1;
                (shard, data_starts[shard][k])
            })
            .collect();

        if let Some((index_path, text)) = &index {
            let (staged, file) = Staged::create(index_path)?;
            let temp = staged.temp.clone();
            writer.staged.push(staged);
            file.write_all_at(text, 0).map_err(|e| FormatError::io(&temp, e))?;
        }
        Ok(writer)
    }

    /// Whether [`Writer::commit`] calls `fsync` on every file and the directory.
    ///
    /// Off by default: the rename protocol already makes the output atomic against failure of
    /// this process, which is what users meet; surviving power loss costs a full flush of
    /// gigabytes, and `cp` does not pay it either.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Whether [`Writer::commit`] needs the CRC-32 of every tensor's bytes (zip archives do).
    pub fn needs_crc(&self) -> bool {
        self.format != Format::Safetensors
    }

    /// Where tensor `i` (index into the slice given to `create`) goes: the open file and the
    /// absolute byte offset. Write exactly its byte size there, e.g. with
    /// `FileExt::write_all_at`; writes to distinct tensors may run concurrently.
    ///
    /// # Panics
    /// If `i` is not an index of that slice.
    pub fn placement(&self, i: usize) -> (&File, u64) {
        let (shard, offset) = self.slots[i];
        (&self.shards[shard].file, offset)
    }

    /// Sum of the tensors' byte sizes (the index's `total_size`), not counting headers.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The final paths of the weight files, then the index if any, as `commit` will write
    /// them.
    pub fn final_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self.shards.iter().map(|s| s.final_path.clone()).collect();
        paths.extend(self.index.clone());
        paths
    }

    /// Completes zip archives with `data_crcs` (the CRC-32 of every tensor's bytes, in the
    /// order given to `create`; unused for safetensors, see [`Writer::needs_crc`]), renames every
    /// temporary into place (sidecars, then weight files, the index last), removes output files
    /// of an earlier run that are not part of this one (`model-NNNNN-of-NNNNN.safetensors`,
    /// `model.safetensors`, the index; the index first so no reader sees it point at missing
    /// shards), and returns the paths written.
    ///
    /// `sidecars` are copied into the directory (first to temporaries, so a failed copy leaves
    /// nothing); they are ignored for a single-file output. A sidecar that already is the file
    /// in the output directory is skipped.
    ///
    /// A failure before the first rename leaves no trace; one during the renames (which only
    /// fail on a broken filesystem) leaves the files already renamed in place.
    pub fn commit(mut self, sidecars: &[Sidecar], data_crcs: &[u32]) -> Result<Vec<PathBuf>, FormatError> {
        if self.needs_crc() {
            if data_crcs.len() != self.slots.len() {
                return Err(FormatError::InvalidOutput {
                    path: self.shards.first().map(|s| s.final_path.clone()).unwrap_or_default(),
                    reason: format!("{} CRCs given for {} tensors", data_crcs.len(), self.slots.len()),
                });
            }
            let mut per_shard: Vec<Vec<u32>> = vec![Vec::new(); self.shards.len()];
            for (&(shard, _), &crc) in self.slots.iter().zip(data_crcs) {
                per_shard[shard].push(crc);
            }
            for (shard, crcs) in self.shards.iter().zip(&per_shard) {
                let io = |e| FormatError::io(&shard.temp_path, e);
                match &shard.body {
                    Body::Torch(archive) => archive.finish(&shard.file, crcs).map_err(io)?,
                    Body::Npz(layout, headers) => {
                        let crcs: Vec<u32> = headers
                            .iter()
                            .zip(crcs)
                            .map(|(&(header_crc, nbytes), &crc)| zip::crc32_combine(header_crc, crc, nbytes))
                            .collect();
                        layout.finish(&shard.file, &crcs).map_err(io)?;
                    }
                    Body::Safetensors | Body::Npy => {}
                }
            }
        }
        let mut written_sidecars = Vec::new();
        if let Some(dir) = self.dir.clone() {
            let outputs: HashSet<PathBuf> = self.final_paths().into_iter().collect();
            let mut sidecar_staged = Vec::new();
            for (sidecar, target) in sidecar_copies(&dir, sidecars, &outputs)? {
                let staged = Staged::beside(&target);
                let temp = staged.temp.clone();
                sidecar_staged.push(staged);
                match sidecar {
                    Sidecar::File(source) => {
                        std::fs::copy(source, &temp).map_err(|e| FormatError::io(source, e))?;
                    }
                    Sidecar::Contents { bytes, .. } => {
                        std::fs::write(&temp, bytes).map_err(|e| FormatError::io(&temp, e))?
                    }
                }
                written_sidecars.push(target);
            }
            // Sidecars before weights: the weights landing is the visible commit point.
            sidecar_staged.append(&mut self.staged);
            self.staged = sidecar_staged;
        }

        if self.sync {
            for staged in &self.staged {
                staged.sync()?;
            }
        }

        let stale = match &self.dir {
            Some(dir) => self.stale_outputs(dir)?,
            None => Vec::new(),
        };

        // A distributed checkpoint's old `.metadata` goes before its data files are replaced:
        // a crash in between must not leave it describing the new files (read as the old
        // tensors). The new one is staged last, so it lands last.
        if let Some(dir) = &self.dir {
            let metadata = dir.join(super::dcp::METADATA_NAME);
            if self.staged.iter().any(|s| s.target == metadata) {
                match std::fs::remove_file(&metadata) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(FormatError::io(&metadata, e)),
                }
            }
        }

        for staged in std::mem::take(&mut self.staged) {
            staged.commit()?;
        }
        // Everything is in place: the directories created stay.
        std::mem::take(&mut self.created_dirs.dirs);

        for path in stale {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(FormatError::io(&path, e)),
            }
        }
        let sync_dir = self.dir.clone().or_else(|| {
            self.shards
                .first()
                .and_then(|s| s.final_path.parent().map(Path::to_path_buf))
        });
        if self.sync {
            if let Some(dir) = sync_dir {
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                };
                File::open(&dir)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| FormatError::io(&dir, e))?;
            }
        }

        let mut written = self.final_paths();
        written.extend(written_sidecars);
        Ok(written)
    }

    /// Output files of an earlier run in `dir` that this output does not overwrite, the index
    /// first.
    fn stale_outputs(&self, dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
        let ours: HashSet<PathBuf> = self.final_paths().into_iter().collect();
        let mut stale = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))? {
            let entry = entry.map_err(|e| FormatError::io(dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = dir.join(&name);
            if is_weight_output_name(self.format, &name) && !ours.contains(&path) {
                stale.push(path);
            }
        }
        // Index first, then shards in name order: deterministic and never a dangling index.
        let (_, index, _) = directory_names(self.format);
        stale.sort_by_key(|p| (!p.ends_with(index), p.clone()));
        Ok(stale)
    }
}

/// Whether two paths name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::open_checkpoint;
    use crate::formats::test_util::pattern;
    use crate::formats::test_util::t;
    use crate::formats::Format;
    use ::safetensors::SafeTensors;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_temporary_has_no_name_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("w.safetensors");
        let (staged, file) = Staged::create(&target).unwrap();
        assert!(staged.unnamed.is_some(), "O_TMPFILE is available on the test machine");
        file.write_all_at(b"bytes", 0).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        staged.sync().unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"bytes");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Dropped uncommitted: nothing appears.
        let (staged, file) = Staged::create(&dir.path().join("x")).unwrap();
        file.write_all_at(b"gone", 0).unwrap();
        drop((staged, file));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let names = [
            format!(".model.safetensors.tmp-{dead}-1a2b"),
            format!(".model.safetensors.tmp-{}-1a2b", std::process::id()),
            format!(".notes.tmp-{dead}-1a2b"),
            format!(".model.safetensors.tmp-{dead}-3c4d"),
            "model.safetensors".to_owned(),
        ];
        let old = std::time::SystemTime::now() - STALE_TEMPORARY * 2;
        for (i, name) in names.iter().enumerate() {
            let file = std::fs::File::create(dir.path().join(name)).unwrap();
            if i != 3 {
                file.set_modified(old).unwrap(); // the fourth temporary is fresh
            }
        }
        remove_dead_temporaries(&[dir.path().join("model.safetensors").as_path()]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // Kept: a live process's, another output's, a fresh one, the output itself.
        let mut want = names[1..].to_vec();
        want.sort();
        assert_eq!(left, want);
        assert_eq!(temporary_pid(".a.b.tmp-12-0f", "a.b"), Some(12));
        assert_eq!(temporary_pid(".a.b.tmp-12-0f", "a"), None);
        assert_eq!(temporary_pid("a.tmp-12-0f", "a"), None);
        assert_eq!(temporary_pid(".a.tmp-x-0f", "a"), None);
    }

    fn meta() -> BTreeMap<String, String> {
        [
            ("format".to_string(), "pt".to_string()),
            ("brainsurgery.version".to_string(), "0.3.0".to_string()),
        ]
        .into()
    }

    /// Fills every tensor with a distinct pattern and returns the bytes written.
    fn fill(w: &Writer, tensors: &[OutputTensor]) -> Vec<Vec<u8>> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n = t.nbytes as usize;
                let bytes = pattern(n, i as u8);
                let (file, offset) = w.placement(i);
                file.write_all_at(&bytes, offset).unwrap();
                bytes
            })
            .collect()
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn sample() -> Vec<OutputTensor> {
        vec![
            t("b.weight", DType::BF16, &[4, 3]),
            t("a.mask", DType::Bool, &[5]),
            t("ids", DType::I64, &[2]),
            t("empty", DType::F32, &[0, 7]),
            t("f8", DType::F8E4M3, &[3, 3]),
            t("scalar", DType::F64, &[]),
            t("f4", DType::F4, &[6]),
        ]
    }

    /// The header written directly is what `serde_json` gives for the same object (issue 9: it
    /// was built as a `serde_json::Value`), escapes included.
    #[test]
    fn safetensors_header_is_the_json_object_serde_writes() {
        let tensors = [
            OutputTensor::new("plain.w", DType::F32, vec![2, 3]).unwrap(),
            OutputTensor::new("q\"uo\\te\u{1}\u{e9}\u{1F600}", DType::BF16, vec![]).unwrap(),
            OutputTensor::new("z", DType::I64, vec![0, 4]).unwrap(),
        ];
        let entries = [(&tensors[0], 0, 24), (&tensors[1], 24, 26), (&tensors[2], 26, 26)];
        for metadata in [
            BTreeMap::new(),
            BTreeMap::from([
                ("format".to_owned(), "pt".to_owned()),
                ("k\n".to_owned(), "v\"\t".to_owned()),
            ]),
        ] {
            let mut map = Map::new();
            if !metadata.is_empty() {
                let meta: Map<String, Value> = metadata.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                map.insert("__metadata__".into(), Value::Object(meta));
            }
            for (t, begin, end) in entries {
                let entry = serde_json::json!({
                    "dtype": t.dtype.safetensors_name(),
                    "shape": t.shape,
                    "data_offsets": [begin, end],
                });
                map.insert(t.name.clone(), entry);
            }
            let mut want = serde_json::to_vec(&Value::Object(map)).unwrap();
            want.resize(want.len().div_ceil(8) * 8, b' ');
            let got = header_bytes(entries.iter().copied(), &metadata);
            assert_eq!(&got[..8], &(want.len() as u64).to_le_bytes());
            assert_eq!(String::from_utf8_lossy(&got[8..]), String::from_utf8_lossy(&want));
        }
    }

    #[test]
    fn file_layout_round_trips_through_official_loader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/out.safetensors");
        let tensors = sample();
        let w = Writer::create(Format::Safetensors, OutputLayout::File(path.clone()), &tensors, &meta()).unwrap();
        assert_eq!(w.total_bytes(), 24 + 5 + 16 + 9 + 8 + 3); // "empty" takes 0
        let data = fill(&w, &tensors);
        let written = w
            .commit(&[Sidecar::File(dir.path().join("ignored.json"))], &[])
            .unwrap();
        assert_eq!(written, vec![path.clone()]);

        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (tensor, data) in tensors.iter().zip(&data) {
            let view = st.tensor(&tensor.name).unwrap();
            assert_eq!(format!("{:?}", view.dtype()), tensor.dtype.safetensors_name());
            assert_eq!(view.shape(), &tensor.shape[..]);
            assert_eq!(view.data(), &data[..], "{}", tensor.name);
        }
        let names: Vec<String> = SafeTensors::read_metadata(&bytes)
            .unwrap()
            .1
            .metadata()
            .clone()
            .unwrap()
            .into_keys()
            .collect();
        assert_eq!(names.len(), 2);
        // Our own reader agrees and keeps the given order.
        let ck = open_checkpoint(&path).unwrap();
        let order: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
        assert_eq!(ck.metadata, meta());
        // __metadata__ comes first in the JSON.
        assert!(bytes[8..].starts_with(b"{\"__metadata__\":{"));
        // Only the output is left in the directory.
        assert_eq!(dir_names(&dir.path().join("nested/deeper")), vec!["out.safetensors"]);
    }

    #[test]
    fn deterministic_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = sample();
        let mut outputs = Vec::new();
        for name in ["one.safetensors", "two.safetensors"] {
            let path = dir.path().join(name);
            let w = Writer::create(Format::Safetensors, OutputLayout::File(path.clone()), &tensors, &meta()).unwrap();
            fill(&w, &tensors);
            w.commit(&[], &[]).unwrap();
            outputs.push(std::fs::read(&path).unwrap());
        }
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn empty_output_and_no_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        let w = Writer::create(
            Format::Safetensors,
            OutputLayout::File(path.clone()),
            &[],
            &BTreeMap::new(),
        )
        .unwrap();
        w.commit(&[], &[]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[8..], b"{}      ");
        assert!(SafeTensors::deserialize(&bytes).unwrap().tensors().is_empty());
    }

    #[test]
    fn plan_shards_boundaries() {
        assert_eq!(plan_shards(&[4, 4, 4], None), vec![0, 0, 0]);
        assert_eq!(plan_shards(&[4, 4, 4], Some(8)), vec![0, 0, 1]);
        assert_eq!(plan_shards(&[4, 4, 4], Some(7)), vec![0, 1, 2]);
        assert_eq!(plan_shards(&[4, 4, 4], Some(12)), vec![0, 0, 0]);
        assert_eq!(plan_shards(&[2, 20, 2, 2], Some(5)), vec![0, 1, 2, 2]);
        assert_eq!(plan_shards(&[20, 0, 3], Some(5)), vec![0, 1, 1]);
        assert_eq!(plan_shards(&[0, 0], Some(0)), vec![0, 0]);
        assert_eq!(plan_shards(&[], Some(1)), Vec::<usize>::new());
    }

    #[test]
    fn sharded_directory_with_index() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let tensors = vec![
            t("a", DType::F32, &[2]),   // 8
            t("b", DType::F32, &[2]),   // 8 -> 16 fits budget 16
            t("big", DType::U8, &[40]), // above budget: alone
            t("c", DType::U16, &[4]),   // 8
            t("d", DType::U8, &[8]),    // 8 -> 16
            t("e", DType::U8, &[1]),    // new shard
        ];
        let layout = OutputLayout::Directory {
            dir: dir.clone(),
            shard_budget: Some(16),
        };
        let w = Writer::create(Format::Safetensors, layout, &tensors, &meta()).unwrap();
        assert_eq!(w.total_bytes(), 73);
        let data = fill(&w, &tensors);
        let side = root.path().join("config.json");
        std::fs::write(&side, b"{\"x\": 1}").unwrap();
        let written = w.commit(&[Sidecar::File(side.clone())], &[]).unwrap();
        let shard_names: Vec<String> = (1..=4).map(|i| format!("model-0000{i}-of-00004.safetensors")).collect();
        let mut expected: Vec<PathBuf> = shard_names.iter().map(|n| dir.join(n)).collect();
        expected.push(dir.join(INDEX_NAME));
        expected.push(dir.join("config.json"));
        assert_eq!(written, expected);
        let mut listing = shard_names.clone();
        listing.push("config.json".into());
        listing.push(INDEX_NAME.into());
        listing.sort();
        assert_eq!(dir_names(&dir), listing);
        assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{\"x\": 1}");

        let index: Value = serde_json::from_slice(&std::fs::read(dir.join(INDEX_NAME)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 73);
        let wm = index["weight_map"].as_object().unwrap();
        let expect_shard = [0, 0, 1, 2, 2, 3];
        for (tensor, s) in tensors.iter().zip(expect_shard) {
            assert_eq!(wm[&tensor.name], shard_names[s].as_str());
        }
        // Each shard loads with the official loader, holds the metadata and the right bytes.
        for (s, name) in shard_names.iter().enumerate() {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(
                SafeTensors::read_metadata(&bytes)
                    .unwrap()
                    .1
                    .metadata()
                    .as_ref()
                    .unwrap()
                    .len(),
                2
            );
            for ((tensor, data), _) in tensors.iter().zip(&data).zip(expect_shard).filter(|(_, e)| *e == s) {
                assert_eq!(st.tensor(&tensor.name).unwrap().data(), &data[..]);
            }
        }
        // And the reader reads it back through the index, in the same order.
        let ck = open_checkpoint(&dir).unwrap();
        let order: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, vec!["a", "b", "big", "c", "d", "e"]);
        assert_eq!(ck.sidecars, vec![dir.join("config.json")]);
        // Reading the shards without the index gives the same.
        std::fs::remove_file(dir.join(INDEX_NAME)).unwrap();
        let ck = open_checkpoint(&dir).unwrap();
        let order2: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order2, order);
    }

    #[test]
    fn everything_fitting_one_shard_gives_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![t("a", DType::F32, &[2]), t("b", DType::F32, &[2])];
        let layout = OutputLayout::Directory {
            dir: dir.path().to_path_buf(),
            shard_budget: Some(16),
        };
        let w = Writer::create(Format::Safetensors, layout, &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        assert_eq!(w.commit(&[], &[]).unwrap(), vec![dir.path().join(SINGLE_NAME)]);
        assert_eq!(dir_names(dir.path()), vec![SINGLE_NAME]);
    }

    #[test]
    fn stale_shards_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // An earlier sharded run, plus unrelated files that must survive.
        for name in [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            INDEX_NAME,
            "config.json",
            "model-1-of-2.safetensors",
            "other.safetensors",
        ] {
            std::fs::write(d.join(name), b"old").unwrap();
        }
        let tensors = vec![t("a", DType::U8, &[4]), t("b", DType::U8, &[4])];
        let layout = |budget| OutputLayout::Directory {
            dir: d.to_path_buf(),
            shard_budget: budget,
        };
        let w = Writer::create(Format::Safetensors, layout(Some(4)), &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        w.commit(&[], &[]).unwrap();
        assert_eq!(
            dir_names(d),
            vec![
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model-1-of-2.safetensors",
                INDEX_NAME,
                "other.safetensors",
            ]
        );
        // Now unsharded over the sharded output: shards and index go.
        let w = Writer::create(Format::Safetensors, layout(None), &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        w.commit(&[], &[]).unwrap();
        assert_eq!(
            dir_names(d),
            vec![
                "config.json",
                "model-1-of-2.safetensors",
                SINGLE_NAME,
                "other.safetensors"
            ]
        );
        // And sharded again: model.safetensors goes.
        let w = Writer::create(Format::Safetensors, layout(Some(4)), &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        w.commit(&[], &[]).unwrap();
        assert!(!d.join(SINGLE_NAME).exists());
        assert!(d.join(INDEX_NAME).exists());
    }

    #[test]
    fn drop_removes_temporaries_and_created_dirs() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/out");
        let tensors = vec![t("a", DType::U8, &[4]), t("b", DType::U8, &[4])];
        let layout = OutputLayout::Directory {
            dir: dir.clone(),
            shard_budget: Some(4),
        };
        let w = Writer::create(Format::Safetensors, layout, &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        // Temporaries are unnamed until commit (O_TMPFILE); nothing final exists yet.
        assert_eq!(dir_names(&dir), Vec::<String>::new());
        drop(w);
        assert_eq!(dir_names(root.path()), Vec::<String>::new());

        // In an existing directory, only the temporaries go, and earlier files stay.
        std::fs::write(root.path().join("keep.txt"), b"k").unwrap();
        let w = Writer::create(
            Format::Safetensors,
            OutputLayout::File(root.path().join("x.safetensors")),
            &tensors,
            &BTreeMap::new(),
        )
        .unwrap();
        drop(w);
        assert_eq!(dir_names(root.path()), vec!["keep.txt"]);
    }

    #[test]
    fn failed_sidecar_copy_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let tensors = vec![t("a", DType::U8, &[4])];
        let layout = OutputLayout::Directory {
            dir: dir.clone(),
            shard_budget: None,
        };
        let w = Writer::create(Format::Safetensors, layout, &tensors, &BTreeMap::new()).unwrap();
        fill(&w, &tensors);
        let missing = root.path().join("missing.json");
        match w.commit(&[Sidecar::File(missing.clone())], &[]) {
            Err(FormatError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        assert!(!dir.exists());
    }

    #[test]
    fn invalid_requests() {
        let root = tempfile::tempdir().unwrap();
        let file = OutputLayout::File(root.path().join("o.safetensors"));
        let dup = vec![t("a", DType::U8, &[1]), t("a", DType::U8, &[1])];
        assert!(matches!(
            Writer::create(Format::Safetensors, file.clone(), &dup, &BTreeMap::new()),
            Err(FormatError::DuplicateOutputTensor { name }) if name == "a"
        ));
        let reserved = vec![t("__metadata__", DType::U8, &[1])];
        assert!(matches!(
            Writer::create(Format::Safetensors, file.clone(), &reserved, &BTreeMap::new()),
            Err(FormatError::ReservedTensorName { .. })
        ));
        assert!(matches!(
            OutputTensor::new("q", DType::F4, vec![3]),
            Err(FormatError::InvalidTensorSize { name, .. }) if name == "q"
        ));
        assert!(matches!(
            OutputTensor::new("h", DType::F64, vec![usize::MAX, 2]),
            Err(FormatError::InvalidTensorSize { .. })
        ));
        let huge: Vec<OutputTensor> = (0..9)
            .map(|i| t(&format!("h{i}"), DType::U8, &[usize::MAX / 8]))
            .collect();
        assert!(matches!(
            Writer::create(Format::Safetensors, file, &huge, &BTreeMap::new()),
            Err(FormatError::InvalidOutput { .. })
        ));
        assert!(matches!(
            Writer::create(
                Format::Safetensors,
                OutputLayout::File(root.path().to_path_buf()),
                &[],
                &BTreeMap::new()
            ),
            Err(FormatError::InvalidOutput { .. })
        ));
        let blocker = root.path().join("plainfile");
        std::fs::write(&blocker, b"x").unwrap();
        let layout = OutputLayout::Directory {
            dir: blocker.clone(),
            shard_budget: None,
        };
        assert!(matches!(
            Writer::create(Format::Safetensors, layout, &[], &BTreeMap::new()),
            Err(FormatError::InvalidOutput { path, .. }) if path == blocker
        ));
        // A parent that is a file: the error names the path that could not be created.
        let under = blocker.join("sub/o.safetensors");
        match Writer::create(Format::Safetensors, OutputLayout::File(under), &[], &BTreeMap::new()) {
            Err(FormatError::Io { path, .. }) => assert!(path.starts_with(&blocker)),
            other => panic!("{other:?}"),
        }
        assert_eq!(dir_names(root.path()), vec!["plainfile"]);
    }

    #[test]
    fn concurrent_placement_writes() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<OutputTensor> = (0..16).map(|i| t(&format!("t{i}"), DType::F32, &[257 + i])).collect();
        let layout = OutputLayout::Directory {
            dir: dir.path().to_path_buf(),
            shard_budget: Some(4000),
        };
        let w = Writer::create(Format::Safetensors, layout, &tensors, &meta()).unwrap();
        std::thread::scope(|s| {
            for chunk in [0..8, 8..16] {
                let w = &w;
                let tensors = &tensors;
                s.spawn(move || {
                    for i in chunk {
                        let n = tensors[i].nbytes as usize;
                        let (f, off) = w.placement(i);
                        f.write_all_at(&pattern(n, i as u8), off).unwrap();
                    }
                });
            }
        });
        w.commit(&[], &[]).unwrap();
        let ck = open_checkpoint(dir.path()).unwrap();
        assert!(ck.files.len() > 1);
        for (i, e) in ck.tensors.iter().enumerate() {
            assert_eq!(e.name, format!("t{i}"));
            let mut buf = vec![0u8; e.nbytes as usize];
            ck.files[e.file].read_at(e.offset, &mut buf).unwrap();
            assert_eq!(buf, pattern(e.nbytes as usize, i as u8));
        }
    }

    #[test]
    fn stale_name_pattern() {
        let st = Format::Safetensors;
        assert!(is_weight_output_name(st, "model-00001-of-00002.safetensors"));
        assert!(is_weight_output_name(st, SINGLE_NAME));
        assert!(is_weight_output_name(st, INDEX_NAME));
        assert!(!is_weight_output_name(st, "model-1-of-2.safetensors"));
        assert!(!is_weight_output_name(st, "model-00001-of-00002.safetensors.bak"));
        assert!(!is_weight_output_name(st, "adapter_model.safetensors"));
        assert!(!is_weight_output_name(st, "pytorch_model.bin"));
        let pt = Format::PyTorch;
        assert!(is_weight_output_name(pt, "pytorch_model-00001-of-00002.bin"));
        assert!(is_weight_output_name(pt, "pytorch_model.bin"));
        assert!(is_weight_output_name(pt, "pytorch_model.bin.index.json"));
        assert!(!is_weight_output_name(pt, "pytorch_model-00001-of-00002.safetensors"));
        assert!(!is_weight_output_name(pt, "pytorch_model-00001-of-00002bin"));
        assert!(!is_weight_output_name(pt, "training_args.bin"));
        assert!(!is_weight_output_name(pt, SINGLE_NAME));
    }

    #[test]
    fn npz_round_trips_through_reader_and_refuses_bf16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.npz");
        let specs = vec![t("a", DType::F32, &[2]), t("b", DType::U8, &[])];
        let w = Writer::create(Format::NumPy, OutputLayout::File(path.clone()), &specs, &meta()).unwrap();
        let (f, off) = w.placement(0);
        f.write_all_at(&[1, 2, 3, 4, 5, 6, 7, 8], off).unwrap();
        let (f, off) = w.placement(1);
        f.write_all_at(&[9], off).unwrap();
        w.commit(&[], &[zip::crc32(&[1, 2, 3, 4, 5, 6, 7, 8]), zip::crc32(&[9])])
            .unwrap();
        let src = super::super::SourceFile::open(&path).unwrap();
        let t = super::super::numpy::read_tensors(&src, 0).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].dtype, t[0].shape.clone(), t[0].nbytes), (DType::F32, vec![2], 8));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bad = vec![super::super::test_util::t("w", DType::BF16, &[1])];
        let err = Writer::create(
            Format::NumPy,
            OutputLayout::File(dir.path().join("x.npz")),
            &bad,
            &meta(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("\"w\"") && err.to_string().contains("cast"),
            "{err}"
        );
        let two = Writer::create(
            Format::NumPy,
            OutputLayout::Npy(dir.path().join("x.npy")),
            &specs,
            &meta(),
        );
        assert!(matches!(two, Err(FormatError::NpyCount { count: 2 })));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
