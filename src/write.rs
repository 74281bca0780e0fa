//! Writing the output alias: the header is computed from the lazy tensors, temporaries are
//! created beside the target, and every tensor is streamed into its final offset in chunks of
//! [`CHUNK_BYTES`], in parallel across chunks, through one reused buffer per thread. Nothing is
//! renamed into place until every byte is written; any failure removes the temporaries. This is
//! the one write path behind the plan output, `save` and nested plans' outputs; it sits below the
//! transforms, which call it, and knows nothing of them.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::dtype::DType;
use crate::formats::output::{OutputLayout, OutputPlan, OutputTensor, Sidecar, Writer};
use crate::formats::{zip, Format, FormatError};
use crate::plan::{Location, OutputSpec, PlanError};
use crate::state::State;
use crate::value::{chunks, ReadContext, Tensor, Value, ValueError};

/// Called with (bytes written, total bytes) while tensors are written.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Why tensors could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The target is refused before anything is written (it would overwrite an input, NumPy
    /// output to a directory): the plan is wrong (exit status 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A file could not be created or written, or a tensor's bytes could not be read.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Interrupted (Ctrl-C); nothing was left behind.
    #[error("interrupted")]
    Cancelled,
    /// A tensor's value could not be computed.
    #[error(transparent)]
    Value(ValueError),
}

impl From<ValueError> for WriteError {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::Read(e) => WriteError::Format(e),
            ValueError::Cancelled => WriteError::Cancelled,
            other => WriteError::Value(other),
        }
    }
}

/// How tensors are written.
#[derive(Clone, Copy)]
pub struct WriteOptions<'a> {
    /// Worker threads (at least one is used).
    pub threads: usize,
    /// The run's read context: each writing thread forks it (its interruption flag, set by
    /// Ctrl-C and checked between chunks, and its count of bytes read).
    pub reads: &'a ReadContext,
    /// Progress callback.
    pub progress: Option<&'a ProgressFn>,
    /// Whether this is the last read of the tensors (a run's output): what each computed whole
    /// is released once it is written ([`crate::value::Tensor::release_unshared`]).
    pub release: bool,
}

/// Metadata key recording the engine version (also how a later run recognises our outputs).
pub use crate::formats::output::VERSION_KEY;
/// Metadata key recording the SHA-256 of the plan document without its locations (issue 8).
pub const PLAN_KEY: &str = "brainsurgery.plan_sha256";
/// Metadata key recording the identities of the checkpoints read (issue 8): a JSON list of
/// `{"alias", "files": [{"name", "header_sha256"}]}`, file names without their directory.
pub const INPUTS_KEY: &str = "brainsurgery.inputs";

/// The [`INPUTS_KEY`] value for the checkpoints `state` opened.
fn inputs_json(state: &State) -> String {
    let sources: Vec<serde_json::Value> = state
        .sources()
        .iter()
        .map(|source| {
            let files: Vec<serde_json::Value> = source
                .files
                .iter()
                .map(|(name, sha)| serde_json::json!({"name": name, "header_sha256": sha}))
                .collect();
            serde_json::json!({"alias": source.alias, "files": files})
        })
        .collect();
    serde_json::Value::Array(sources).to_string()
}

/// The path with its parent directories resolved but not its last component, so a symlinked
/// input file (the Hugging Face cache links snapshot files to blobs) is compared by the name the
/// user gave as well as by what it points to.
fn logical(path: &Path) -> Option<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

fn canonical(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    // A path that does not exist yet: canonicalize its parent.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// Refuses outputs that cannot be written: formats not available, targets that would overwrite
/// an input, and tensors of `alias` whose dtype the format cannot hold.
pub fn validate_output(output: &OutputSpec, state: &State, alias: &str) -> Result<(), WriteError> {
    let location = Location::root().key("output");
    validate_target(output, state, &location)?;
    if let Some(current) = state.alias(alias) {
        validate_dtypes(output, current.iter().map(|(name, t)| (name, t.dtype)))?;
        let tensors: Vec<(&str, &Tensor)> = current.iter().collect();
        check_written_config(&alias_sidecars(state, alias, output), &tensors, &location)?;
    }
    Ok(())
}

/// Refuses a write whose `config.json` (among `sidecars`) disagrees with the tensors written
/// ([`crate::state::check_config`]), naming what to set; found from headers, before any work.
pub fn check_written_config(
    sidecars: &[Sidecar],
    tensors: &[(&str, &Tensor)],
    location: &Location,
) -> Result<(), WriteError> {
    let Some(config) = sidecars.iter().find(|s| s.name().is_some_and(|n| n == "config.json")) else {
        return Ok(());
    };
    let (path, text) = match config {
        Sidecar::File(path) => (path.clone(), std::fs::read(path).map_err(|e| FormatError::io(path, e))?),
        Sidecar::Contents { name, bytes } => (PathBuf::from(name), bytes.clone()),
    };
    // A config that is not JSON is the user's file, copied as it is; transformers will say so.
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Ok(());
    };
    crate::state::check_config(&doc, tensors.iter().map(|(n, t)| (*n, t.shape.as_slice())))
        .map_err(|why| PlanError::invalid(location, format!("{}: {why}", path.display())).into())
}

/// Refuses the first tensor `output`'s format cannot hold, naming it
/// ([`Format::check_writable`]); read from headers alone, so a check finds it before anything
/// is computed.
pub fn validate_dtypes<'a>(
    output: &OutputSpec,
    tensors: impl Iterator<Item = (&'a str, DType)>,
) -> Result<(), FormatError> {
    output.format.check_writable(tensors, output.npy)
}

/// The checks of [`validate_output`] for any write target (the output, `save`, a nested plan's
/// output) found at `location`: the format is available and no file the run has opened (the
/// inputs, nested plans' inputs and everything `load` opened, whether or not an alias still holds
/// its tensors) would be overwritten.
pub fn validate_target(output: &OutputSpec, state: &State, location: &Location) -> Result<(), PlanError> {
    if output.format == Format::NumPy && !output.single_file {
        return Err(PlanError::invalid(
            &location.key("format"),
            "NumPy output is one .npz (or .npy) file: give a path ending in .npz or .npy (directories are safetensors or PyTorch)",
        ));
    }
    let targets: Vec<PathBuf> = [canonical(&output.path), logical(&output.path)]
        .into_iter()
        .flatten()
        .collect();
    for opened in state.opened() {
        let roots: Vec<PathBuf> = [canonical(&opened.path), logical(&opened.path)]
            .into_iter()
            .flatten()
            .collect();
        for file in &opened.files {
            let files: Vec<PathBuf> = [canonical(file), logical(file)].into_iter().flatten().collect();
            let clash = targets.iter().any(|target| {
                roots.contains(target)
                    || if output.single_file {
                        files.contains(target)
                    } else {
                        files.iter().any(|f| f.parent() == Some(target.as_path()))
                    }
            });
            if clash {
                return Err(PlanError::invalid(
                    &location.key("path"),
                    format!(
                        "output `{}` would overwrite input `{}`; inputs are never modified",
                        output.path.display(),
                        opened.path.display()
                    ),
                ));
            }
        }
    }
    if !output.single_file && !output.overwrite {
        let foreign = crate::formats::output::foreign_outputs(output.format, &output.path);
        if let Some(first) = foreign.first() {
            let more = match foreign.len() - 1 {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            return Err(PlanError::invalid(
                &location.key("path"),
                format!(
                    "`{}` holds `{}`{more}, which brainsurgery did not write; a directory output there would replace or remove it. Write elsewhere, or set `overwrite: true` (`--overwrite`)",
                    output.path.display(),
                    first.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                ),
            ));
        }
    }
    Ok(())
}

/// Writes the whole of `alias` (validated with [`validate_output`]) to `output`, with its
/// checkpoint's metadata and sidecars, and returns the files written.
pub fn write_alias(
    output: &OutputSpec,
    state: &State,
    alias: &str,
    plan_sha256: Option<&str>,
    options: WriteOptions<'_>,
) -> Result<Vec<PathBuf>, WriteError> {
    let Some(current) = state.alias(alias) else {
        return Err(PlanError::invalid(
            &Location::root().key("output").key("alias"),
            format!("alias `{alias}` does not exist"),
        )
        .into());
    };
    let tensors: Vec<(&str, &Tensor)> = current.iter().collect();
    let metadata = alias_metadata(state, alias, plan_sha256);
    let sidecars = alias_sidecars(state, alias, output);
    write_tensors(output, &tensors, &metadata, &sidecars, options)
}

/// The `__metadata__` a write of `alias` carries: its checkpoint's (the first input's, for an
/// alias the transforms built — SPEC §6.2), `format: pt` when absent (transformers refuses
/// safetensors metadata without it), the engine version, when known the plan hash, and the
/// identities of the checkpoints read.
pub fn alias_metadata(state: &State, alias: &str, plan_sha256: Option<&str>) -> BTreeMap<String, String> {
    let origin = state.alias(alias).and_then(|a| a.origin.as_ref()).or_else(|| {
        state
            .alias_names()
            .iter()
            .find_map(|a| state.alias(a).and_then(|s| s.origin.as_ref()))
    });
    let mut metadata: BTreeMap<String, String> = origin.map(|o| o.metadata.clone()).unwrap_or_default();
    metadata.entry("format".to_owned()).or_insert_with(|| "pt".to_owned());
    metadata.insert(VERSION_KEY.to_owned(), env!("CARGO_PKG_VERSION").to_owned());
    if let Some(sha) = plan_sha256 {
        metadata.insert(PLAN_KEY.to_owned(), sha.to_owned());
    }
    if !state.sources().is_empty() {
        metadata.insert(INPUTS_KEY.to_owned(), inputs_json(state));
    }
    metadata
}

/// The non-weight files a directory write of `alias` carries (none for a single file).
pub fn alias_sidecars(state: &State, alias: &str, output: &OutputSpec) -> Vec<Sidecar> {
    match (state.alias(alias), output.sidecars && !output.single_file) {
        (Some(current), true) => current.sidecars.to_output(),
        _ => Vec::new(),
    }
}

/// How `tensors` (in this order) are laid out as `output`'s files: the one layout behind both
/// [`write_tensors`] and [`planned_files`].
fn output_plan(
    output: &OutputSpec,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<OutputPlan, FormatError> {
    let specs = tensors
        .iter()
        .map(|(name, t)| OutputTensor::new(*name, t.dtype, t.shape.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = match (output.single_file, output.npy) {
        (true, true) => OutputLayout::Npy(output.path.clone()),
        (true, false) => OutputLayout::File(output.path.clone()),
        (false, _) => OutputLayout::Directory {
            dir: output.path.clone(),
            shard_budget: output.shard,
        },
    };
    OutputPlan::new(output.format, &layout, &specs, metadata)
}

/// The files a write of `alias` (validated with [`validate_output`]) to `output` would produce,
/// each with its final size: weight files, the index, then copied sidecars, as
/// [`write_alias`] writes them. Nothing is created.
pub fn planned_files(
    output: &OutputSpec,
    state: &State,
    alias: &str,
    plan_sha256: Option<&str>,
) -> Result<Vec<(PathBuf, u64)>, WriteError> {
    let Some(current) = state.alias(alias) else {
        return Ok(Vec::new());
    };
    let tensors: Vec<(&str, &Tensor)> = current.iter().collect();
    let metadata = alias_metadata(state, alias, plan_sha256);
    let plan = output_plan(output, &tensors, &metadata)?;
    let mut files = plan.files();
    files.extend(plan.sidecar_files(&alias_sidecars(state, alias, output))?);
    Ok(files)
}

/// Streams `tensors` (in this order) to `output` atomically and returns the files written:
/// the one code path behind the plan output, `save` and nested plans' outputs. The caller has
/// validated the target.
pub fn write_tensors(
    output: &OutputSpec,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
    sidecars: &[Sidecar],
    options: WriteOptions<'_>,
) -> Result<Vec<PathBuf>, WriteError> {
    let WriteOptions {
        threads,
        reads,
        progress,
        release,
    } = options;
    let writer = Writer::from_plan(output_plan(output, tensors, metadata)?)?;
    // Output tensors that are the same lazy value (copies, e.g. one MLP weight fanned out to
    // four experts) are produced once per chunk and written to every destination.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: std::collections::HashMap<*const Value, usize> = std::collections::HashMap::new();
    for (i, (_, t)) in tensors.iter().enumerate() {
        let key = std::sync::Arc::as_ptr(&t.value);
        match group_of.get(&key) {
            Some(&g) if tensors[groups[g][0]].1.dtype == t.dtype && tensors[groups[g][0]].1.shape == t.shape => {
                groups[g].push(i)
            }
            _ => {
                group_of.insert(key, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    // Work items: chunks of every group, so one huge tensor still uses every thread.
    let items: Vec<(usize, usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, members)| chunks(tensors[members[0]].1.nbytes()).map(move |(start, len)| (g, start, len)))
        .collect();
    // Zip entries need a CRC-32 of their data; it is taken per chunk while the bytes are in
    // cache and the chunks' CRCs are combined in order afterwards, so nothing is read twice.
    let want_crc = writer.needs_crc();
    let chunk_crcs: Vec<AtomicU32> = (0..if want_crc { items.len() } else { 0 })
        .map(|_| AtomicU32::new(0))
        .collect();
    let total = writer.total_bytes();
    let done = AtomicU64::new(0);
    // Chunks of each group still to write: when a group's last chunk is written, what it
    // computed whole and nothing else reads is released (its memory or arena space reused).
    let remaining: Vec<AtomicUsize> = groups
        .iter()
        .map(|members| AtomicUsize::new(chunks(tensors[members[0]].1.nbytes()).count()))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .stack_size(crate::value::ENGINE_STACK_BYTES)
        .build()
        .map_err(|e| FormatError::Io {
            path: output.path.clone(),
            source: std::io::Error::other(e),
        })?;
    let result: Result<(), WriteError> = pool.install(|| {
        items.par_iter().enumerate().try_for_each_init(
            || (reads.fork(), Vec::<u8>::new()),
            |(cx, buf), (item, &(g, start, len))| {
                cx.check()?;
                let members = &groups[g];
                buf.resize(len, 0);
                // Untouched tensors are `pread` into the thread's reused buffer too: writing them
                // straight from a mapping of the input (`pwrite` from the map, `MADV_DONTNEED`
                // after each chunk) measured slower on the 3.2 GiB expert job (1.36–1.74 s against
                // 1.03–1.28 s, interleaved runs, 2 threads) with a higher peak RSS (29 against
                // 21 MiB).
                tensors[members[0]].1.read_bytes(start, buf, cx)?;
                if let Some(crc) = chunk_crcs.get(item) {
                    crc.store(zip::crc32(buf), Ordering::Relaxed);
                }
                for &i in members {
                    let (file, offset) = writer.placement(i);
                    file.write_all_at(buf, offset + start as u64)
                        .map_err(|source| FormatError::io(&output.path, source))?;
                }
                if release && remaining[g].fetch_sub(1, Ordering::AcqRel) == 1 {
                    tensors[members[0]].1.release_unshared();
                }
                let len = len * members.len();
                let now = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                if let Some(progress) = progress {
                    progress(now, total);
                }
                Ok(())
            },
        )
    });
    result?;
    let mut group_crcs = vec![0u32; groups.len()];
    for (&(g, _, len), crc) in items.iter().zip(&chunk_crcs) {
        group_crcs[g] = zip::crc32_combine(group_crcs[g], crc.load(Ordering::Relaxed), len as u64);
    }
    let mut crcs = vec![0u32; if want_crc { tensors.len() } else { 0 }];
    for (members, &crc) in groups.iter().zip(&group_crcs) {
        for &i in members {
            if let Some(slot) = crcs.get_mut(i) {
                *slot = crc;
            }
        }
    }
    Ok(writer.commit(sidecars, &crcs)?)
}
