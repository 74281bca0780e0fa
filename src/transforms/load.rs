//! `load` and `save`: checkpoints in and out in the middle of a plan. `load` opens headers only
//! (in a check and in a run alike; tensors stay lazy like the inputs'); `save` writes through the
//! same streaming, atomic code path as the plan output ([`crate::write`]), and only when the plan
//! runs: a check validates the target without writing anything.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::{count_noun, Context, Flow, StepError, Transform, TransformError, TransformSpec};
use crate::formats::output::Sidecar;
use crate::formats::{open_checkpoint_as, Checkpoint, Format};
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{parse_output, valid_alias, Location, OutputSpec, PlanError};
use crate::references::{closest_names, Reference};
use crate::state::State;
use crate::value::Tensor;
use crate::write;

const LOAD_FIELDS: &[Field] = &[
    Field::required(
        "path",
        FieldKind::Text,
        "a checkpoint (file or directory, any format read)",
    ),
    Field::optional(
        "alias",
        FieldKind::Text,
        None,
        "new alias holding the whole checkpoint (with `to`: the destination's alias)",
    ),
    Field::optional(
        "to",
        FieldKind::Text,
        None,
        "load one tensor under this name (`name` or `alias::name`)",
    ),
    Field::optional(
        "format",
        FieldKind::Text,
        None,
        "`safetensors`, `pytorch` or `numpy`: the format `path` must hold (default: any, by file names)",
    ),
];

/// `load`: a whole checkpoint as a new alias, or one tensor.
pub const LOAD: TransformSpec = TransformSpec {
    name: "load",
    summary: "add a checkpoint as a new alias, or one tensor of a file under a name",
    form: super::Form::Plain,
    fields: LOAD_FIELDS,
    parse: |value, cx| {
        let location = &cx.location;
        let p = Payload::new(value, LOAD_FIELDS, location.clone())?;
        let path = nonempty_path(&p)?;
        let format = input_format(&p)?;
        let alias = p.text("alias")?.map(str::to_owned);
        if let Some(alias) = &alias {
            check_alias(alias, &p.at("alias"))?;
        }
        let what = match (p.text("to")?, alias) {
            (None, None) => {
                return Err(PlanError::invalid(
                    location,
                    "load needs `alias` (a whole checkpoint) or `to` (one tensor)",
                ))
            }
            (None, Some(alias)) => LoadWhat::Checkpoint { alias },
            (Some(to), alias) => {
                let (to_alias, name) = match to.split_once("::") {
                    Some((a, n)) => (Some(a.to_owned()), n),
                    None => (None, to),
                };
                if name.is_empty() {
                    return Err(PlanError::invalid(&p.at("to"), "empty tensor name"));
                }
                if let Some(a) = &to_alias {
                    check_alias(a, &p.at("to"))?;
                }
                let alias = match (to_alias, alias) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(PlanError::invalid(
                            &p.at("alias"),
                            format!("`alias: {b}` contradicts `to: {to}`; give the alias once"),
                        ))
                    }
                    (a, b) => a.or(b),
                };
                LoadWhat::Tensor {
                    alias,
                    name: name.to_owned(),
                }
            }
        };
        Ok(Box::new(Load {
            path,
            what,
            format,
            location: location.clone(),
        }))
    },
};

const SAVE_FIELDS: &[Field] = &[
    Field::required(
        "path",
        FieldKind::Text,
        "a `.safetensors`, `.bin/.pt/.pth` or `.npz` file, or a directory (sharded like the output)",
    ),
    Field::optional(
        "alias",
        FieldKind::Text,
        Some("the default alias"),
        "the alias to write whole (without `alias` and `target`: the default alias, the only input or `output.alias`)",
    ),
    Field::optional(
        "target",
        FieldKind::Reference,
        None,
        "one tensor to write (a slice is allowed)",
    ),
    Field::optional(
        "format",
        FieldKind::Text,
        Some("by extension, else safetensors"),
        "file format: safetensors, torch (PyTorch), numpy (`.npy` for one tensor or a `.npy` path, else `.npz`) or dcp (a PyTorch Distributed Checkpoint directory)",
    ),
    Field::optional(
        "shard",
        FieldKind::Text,
        Some("5GB"),
        "shard budget of a directory (`none`: one file)",
    ),
    Field::optional(
        "overwrite",
        FieldKind::Bool,
        Some("false"),
        "replace weight files in the directory that brainsurgery did not write",
    ),
];

/// `save`: write an alias or one tensor to a file, atomically, when the plan runs.
pub const SAVE: TransformSpec = TransformSpec {
    name: "save",
    summary: "write an alias or one tensor to a file or directory, like the output (when the plan runs)",
    form: super::Form::Plain,
    fields: SAVE_FIELDS,
    parse: |value, cx| {
        let location = &cx.location;
        let p = Payload::new(value, SAVE_FIELDS, location.clone())?;
        nonempty_path(&p)?;
        // The `output` section's parser gives `save` the same path, format and shard rules.
        let mut out = Map::new();
        for key in ["path", "format", "shard", "overwrite"] {
            if let Some(v) = p.get(key) {
                out.insert(key.to_owned(), v.clone());
            }
        }
        let mut spec =
            parse_output(Some(&Value::Object(out)), location.clone())?.ok_or_else(|| PlanError::MissingKey {
                location: location.clone(),
                key: "path".into(),
            })?;
        let what = match (p.text("alias")?, p.get("target")) {
            (Some(alias), None) => SaveWhat::Alias(alias.to_owned()),
            (None, Some(_)) => SaveWhat::Tensor(p.reference("target")?),
            (Some(_), Some(_)) => {
                return Err(PlanError::invalid(
                    location,
                    "save takes `alias` (a whole alias) or `target` (one tensor), not both",
                ))
            }
            // The default alias, as in the 0.2 tool (issue 15 item 3): resolved when it runs,
            // since `load` and `prefixes` may change which aliases exist.
            (None, None) => SaveWhat::Default,
        };
        // NumPy holds one tensor as a `.npy`: `format: numpy` with `target` writes one to the
        // path as given (one tensor is one file, whatever its extension) unless the path asks
        // for an `.npz` (issue 15 item 5).
        if matches!(what, SaveWhat::Tensor(_)) && spec.format == Format::NumPy {
            let npz = spec.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"));
            spec.npy = !npz;
            spec.single_file = true;
        }
        Ok(Box::new(Save {
            spec,
            what,
            location: location.clone(),
        }))
    },
};

fn nonempty_path(p: &Payload) -> Result<PathBuf, PlanError> {
    match p.text("path")? {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(PlanError::invalid(&p.at("path"), "expected a non-empty path")),
    }
}

/// The `format` a `load` requires, if given.
fn input_format(p: &Payload) -> Result<Option<Format>, PlanError> {
    let Some(text) = p.text("format")? else {
        return Ok(None);
    };
    match Format::parse(text) {
        Some(format) => Ok(Some(format)),
        None => Err(PlanError::invalid(
            &p.at("format"),
            format!("unknown format `{text}`; expected safetensors, pytorch, numpy or dcp"),
        )),
    }
}

fn check_alias(alias: &str, location: &Location) -> Result<(), PlanError> {
    if valid_alias(alias) {
        Ok(())
    } else {
        Err(PlanError::invalid(
            location,
            format!("`{alias}` is not a valid alias (letters, digits, _ - .)"),
        ))
    }
}

#[derive(Debug)]
enum LoadWhat {
    Checkpoint { alias: String },
    Tensor { alias: Option<String>, name: String },
}

#[derive(Debug)]
struct Load {
    path: PathBuf,
    what: LoadWhat,
    /// The format `path` must hold, when the plan says.
    format: Option<Format>,
    location: Location,
}

/// A file a `save` of the plan being checked will write, with what it will hold (see
/// [`Context::planned_files`]).
#[derive(Debug, Clone)]
pub(crate) struct PlannedFile {
    /// The path as the plan gives it, made absolute.
    path: PathBuf,
    /// Its format.
    format: Format,
    /// The tensors a reader will find in it, in order, under the names it will give them.
    tensors: Vec<(String, Tensor)>,
    /// Bytes of the sidecars written beside it (config, tokenizer, …).
    sidecar_bytes: u64,
}

impl PlannedFile {
    /// The format it is written in.
    pub(crate) fn format(&self) -> Format {
        self.format
    }

    /// The space its write needs: the bytes of its tensors and sidecars (headers, a few KiB,
    /// left out). A path saved again is counted by the run's check as replacing it holds both
    /// files for a moment (`save_needs` in the executor).
    pub(crate) fn space_need(&self) -> crate::space::SpaceNeed {
        crate::space::SpaceNeed {
            role: "save",
            path: self.path.clone(),
            bytes: self
                .tensors
                .iter()
                .fold(self.sidecar_bytes, |sum, (_, t)| sum.saturating_add(t.nbytes() as u64)),
        }
    }
}

/// `path` made absolute as the filesystem resolves it, though it may not exist yet: `..` after
/// an existing directory goes to the parent of what it is (a symlink's target's parent, as the
/// kernel does), the existing part of the path is canonical (so two spellings through a
/// symlink are one file) and the rest is taken as written. A `load` thus finds the file a
/// `save` of another spelling of the same path will write, and the space check measures the
/// disk the file will be on.
fn absolute(path: &std::path::Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if let Ok(real) = normal.canonicalize() {
                    normal = real;
                }
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    // The longest existing ancestor of the folder, canonical, then the rest as written. The
    // last part is never resolved: a save renames over the path itself (replacing a symlink
    // there, not its target), as `write::logical` resolves only the parent.
    let (Some(folder), Some(name)) = (normal.parent(), normal.file_name()) else {
        return normal;
    };
    let mut rest = vec![name.to_os_string()];
    let mut existing = folder;
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return normal,
        }
    }
}

impl Load {
    /// The file an earlier `save` of the plan being checked will write at `path`, if any: a check
    /// takes its tensors from there and does not open the path (issue 15 item 2).
    fn planned<'c>(&self, ctx: &'c Context) -> Result<Option<&'c PlannedFile>, StepError> {
        if ctx.evaluate {
            return Ok(None);
        }
        let path = absolute(&self.path);
        let Some(planned) = ctx.planned_files.iter().rev().find(|f| f.path == path) else {
            return Ok(None);
        };
        // Without `format`, the run reads the file as its name says (safetensors for a name
        // without a known extension), whatever the save wrote.
        let name = self.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let read_as = self
            .format
            .or_else(|| Format::of_name(&name).or(Some(Format::Safetensors)));
        match read_as {
            Some(want) if want != planned.format => Err(PlanError::invalid(
                &self.location.key("format"),
                format!(
                    "`{}` will hold {} weights (an earlier `save` writes it), not {}{}",
                    self.path.display(),
                    planned.format.name(),
                    want.name(),
                    if self.format.is_none() {
                        " as its name says; give `format`"
                    } else {
                        ""
                    }
                ),
            )
            .into()),
            _ => Ok(Some(planned)),
        }
    }

    /// Opens `path` (headers only), refusing a checkpoint of another format than `format`.
    fn open(&self) -> Result<Checkpoint, StepError> {
        // A name without a known extension is read as `format` says (a NumPy save to `out`).
        let name = self.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let read_as = if Format::of_name(&name).is_some() {
            None
        } else {
            self.format
        };
        let checkpoint = open_checkpoint_as(&self.path, read_as)?;
        match self.format {
            Some(want) if want != checkpoint.format => Err(PlanError::invalid(
                &self.location.key("format"),
                format!(
                    "`{}` holds {} weights, not {}",
                    self.path.display(),
                    checkpoint.format.name(),
                    want.name()
                ),
            )
            .into()),
            _ => Ok(checkpoint),
        }
    }
}

impl Transform for Load {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        match &self.what {
            LoadWhat::Checkpoint { alias } => {
                if state.alias(alias).is_some() {
                    return Err(PlanError::invalid(
                        &self.location.key("alias"),
                        format!("alias `{alias}` already exists; choose another name or remove it first (prefixes)"),
                    )
                    .into());
                }
                let count = if let Some(planned) = self.planned(ctx)? {
                    state.add_planned(alias, &self.path, &planned.tensors);
                    planned.tensors.len()
                } else {
                    let checkpoint = self.open()?;
                    state.add_checkpoint(alias, &checkpoint);
                    ctx.notices_of(&checkpoint);
                    checkpoint.tensors.len()
                };
                ctx.note(format!(
                    "load: `{alias}` ← {} ({})",
                    self.path.display(),
                    count_noun(count)
                ));
            }
            LoadWhat::Tensor { alias, name } => {
                let alias = match alias.clone().or_else(|| state.default_alias.clone()) {
                    Some(a) => a,
                    None => {
                        return Err(PlanError::NoDefaultAlias {
                            location: self.location.key("to"),
                            reference: name.clone(),
                            known: state.alias_names(),
                        }
                        .into())
                    }
                };
                if let Some(planned) = self.planned(ctx)? {
                    let found = match planned.tensors.as_slice() {
                        [only] => Some(only),
                        all => all.iter().find(|(n, _)| n == name),
                    };
                    let Some((source, tensor)) = found else {
                        let all = &planned.tensors;
                        let names = closest_names(name, all.iter().map(|(n, _)| n.as_str()), 5)
                            .into_iter()
                            .map(str::to_owned)
                            .collect();
                        return Err(TransformError::LoadWhichTensor {
                            path: self.path.clone(),
                            name: name.clone(),
                            count: all.len(),
                            names,
                        }
                        .into());
                    };
                    if state.get(&alias, name).is_some() {
                        return Err(TransformError::DestinationExists {
                            destination: format!("{alias}::{name}"),
                            source_name: format!("{}::{source}", self.path.display()),
                        }
                        .into());
                    }
                    let tensor = tensor.clone();
                    state.record_planned(&self.path);
                    state.insert(&alias, name, tensor);
                    ctx.note(format!("load: `{alias}::{name}` ← {}", self.path.display()));
                    return Ok(Flow::Continue);
                }
                let checkpoint = self.open()?;
                ctx.notices_of(&checkpoint);
                state.record_source(&alias, &checkpoint);
                let entry = match checkpoint.tensors.as_slice() {
                    [only] => only,
                    all => all.iter().find(|e| &e.name == name).ok_or_else(|| {
                        let names = closest_names(name, all.iter().map(|e| e.name.as_str()), 5)
                            .into_iter()
                            .map(str::to_owned)
                            .collect();
                        TransformError::LoadWhichTensor {
                            path: self.path.clone(),
                            name: name.clone(),
                            count: all.len(),
                            names,
                        }
                    })?,
                };
                if state.get(&alias, name).is_some() {
                    return Err(TransformError::DestinationExists {
                        destination: format!("{alias}::{name}"),
                        source_name: format!("{}::{}", self.path.display(), entry.name),
                    }
                    .into());
                }
                if checkpoint.files.get(entry.file).is_none() {
                    return Err(PlanError::invalid(&self.location.key("path"), "tensor entry names no file").into());
                }
                let tensor = Tensor::from_entry(entry, &checkpoint.files);
                state.insert(&alias, name, tensor);
                ctx.note(format!("load: `{alias}::{name}` ← {}", self.path.display()));
            }
        }
        Ok(Flow::Continue)
    }
}

#[derive(Debug)]
enum SaveWhat {
    Alias(String),
    Tensor(Reference),
    /// Neither `alias` nor `target`: the default alias (the only input, or `output.alias`).
    Default,
}

#[derive(Debug)]
struct Save {
    spec: OutputSpec,
    what: SaveWhat,
    location: Location,
}

impl Transform for Save {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let (alias, tensors): (String, Vec<(String, Tensor)>) = match &self.what {
            SaveWhat::Alias(_) | SaveWhat::Default => {
                let alias = match &self.what {
                    SaveWhat::Alias(alias) => alias.clone(),
                    _ => state.default_alias.clone().ok_or_else(|| {
                        PlanError::invalid(
                            &self.location,
                            format!(
                                "save without `alias` or `target` writes the default alias, and there is none \
                                 (aliases: {}); give `alias`",
                                state.alias_names().join(", ")
                            ),
                        )
                    })?,
                };
                let Some(current) = state.alias(&alias) else {
                    return Err(PlanError::UnknownAlias {
                        location: self.location.key("alias"),
                        alias,
                        known: state.alias_names(),
                    }
                    .into());
                };
                let tensors = current.iter().map(|(n, t)| (n.to_owned(), t.clone())).collect();
                (alias, tensors)
            }
            SaveWhat::Tensor(reference) => {
                let mut matches = state.select_some(reference, &self.location)?;
                if matches.len() != 1 {
                    return Err(TransformError::SaveNotOne {
                        reference: reference.text.clone(),
                        count: matches.len(),
                        names: matches.iter().take(5).map(|m| m.display()).collect(),
                    }
                    .into());
                }
                let m = matches.remove(0);
                (m.alias, vec![(m.name, m.tensor)])
            }
        };
        let what = match &self.what {
            SaveWhat::Alias(_) | SaveWhat::Default => format!("alias `{alias}`"),
            SaveWhat::Tensor(_) => format!("`{alias}::{}`", tensors.first().map_or("", |(n, _)| n.as_str())),
        };
        let sidecars = match self.what {
            SaveWhat::Alias(_) | SaveWhat::Default => write::alias_sidecars(state, &alias, &self.spec),
            SaveWhat::Tensor(_) => Vec::new(),
        };
        let sha = ctx.plan_sha256.clone();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let written = save_tensors(
            state,
            &alias,
            &refs,
            &sidecars,
            &self.spec,
            &self.location,
            ctx,
            sha.as_deref(),
        )?;
        ctx.note(match written {
            None => format!(
                "save: {what} → {} (written when the plan runs)",
                self.spec.path.display()
            ),
            Some(files) => format!(
                "save: {what} → {} ({}, {} file{})",
                self.spec.path.display(),
                count_noun(refs.len()),
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        });
        Ok(Flow::Continue)
    }
}

/// Validates `spec` (at `location`) in the check and, when the plan runs, writes `tensors` of
/// `alias` there through the output's code path. Returns the files written (also recorded in
/// the context, for the run's report), or `None` in a check. A run always follows a check of
/// the same state, so the target is validated once (issue 8).
#[allow(clippy::too_many_arguments)]
fn save_tensors(
    state: &State,
    alias: &str,
    tensors: &[(&str, &Tensor)],
    sidecars: &[Sidecar],
    spec: &OutputSpec,
    location: &Location,
    ctx: &mut Context,
    plan_sha256: Option<&str>,
) -> Result<Option<Vec<PathBuf>>, StepError> {
    ctx.log_reads(tensors.iter().map(|(_, t)| *t));
    if !ctx.evaluate {
        // The writer refuses it too, but only when the steps before it have run.
        if spec.single_file && spec.path.is_dir() {
            return Err(PlanError::invalid(
                &location.key("path"),
                format!(
                    "`{}` is a directory; a single-file save needs a file path",
                    spec.path.display()
                ),
            )
            .into());
        }
        write::validate_target(spec, state, location)?;
        write::validate_dtypes(spec, tensors.iter().map(|(name, t)| (*name, t.dtype)))?;
        write::check_written_config(sidecars, tensors, location)?;
        // What a reader will find there: a `.npy` names its one tensor by the file stem.
        let stem = || spec.path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let planned = tensors
            .iter()
            .map(|(name, t)| {
                let name = match (spec.npy, stem()) {
                    (true, Some(stem)) => stem,
                    _ => (*name).to_owned(),
                };
                (name, (*t).clone())
            })
            .collect();
        // Under `set: {dry-run: true}` the run writes nothing there.
        if state.flags.dry_run.is_none() {
            let sidecar_bytes = sidecars.iter().fold(0u64, |sum, sidecar| {
                let len = match sidecar {
                    Sidecar::File(path) => std::fs::metadata(path).map_or(0, |m| m.len()),
                    Sidecar::Contents { bytes, .. } => bytes.len() as u64,
                };
                sum.saturating_add(len)
            });
            ctx.planned_files.push(PlannedFile {
                path: absolute(&spec.path),
                format: spec.format,
                tensors: planned,
                sidecar_bytes,
            });
        }
        return Ok(None);
    }
    if state.flags.dry_run.is_some() {
        // `set: {dry-run: true}`: nothing is written (issue 15 item 7).
        return Ok(Some(Vec::new()));
    }
    let metadata = write::alias_metadata(state, alias, plan_sha256);
    let options = ctx.write_options();
    let files = write::write_tensors(spec, tensors, &metadata, sidecars, options)?;
    ctx.written.extend(files.iter().cloned());
    Ok(Some(files))
}

/// Writes a whole alias like the plan output (nested plans' outputs use it): validated always,
/// written only when the plan runs.
pub(crate) fn save_alias(
    state: &State,
    alias: &str,
    spec: &OutputSpec,
    location: &Location,
    ctx: &mut Context,
    plan_sha256: Option<&str>,
) -> Result<(), StepError> {
    let current = state.alias(alias).ok_or_else(|| PlanError::UnknownAlias {
        location: location.key("alias"),
        alias: alias.to_owned(),
        known: state.alias_names(),
    })?;
    let tensors: Vec<(&str, &Tensor)> = current.iter().collect();
    let sidecars = write::alias_sidecars(state, alias, spec);
    let written = save_tensors(state, alias, &tensors, &sidecars, spec, location, ctx, plan_sha256)?;
    ctx.note(match written {
        None => format!(
            "output of `{alias}` → {} (written when the plan runs)",
            spec.path.display()
        ),
        Some(files) => format!("output of `{alias}` → {} ({} files)", spec.path.display(), files.len()),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{pattern, write_official};
    use crate::plan::RawTransform;
    use ::safetensors::Dtype;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn paths_resolve_through_symlinks_as_the_filesystem_does() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(real.join("a/sub")).unwrap();
        std::os::unix::fs::symlink(real.join("a/sub"), real.join("link")).unwrap();
        // `link/..` is the parent of `a/sub`, not the temporary directory.
        assert_eq!(absolute(&real.join("link/../out.st")), real.join("a/out.st"));
        // A symlink as the last part is not followed (a save replaces the link itself).
        std::fs::write(real.join("a/blob"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("a/blob"), real.join("a/sub/model.st")).unwrap();
        assert_eq!(absolute(&real.join("link/model.st")), real.join("a/sub/model.st"));
        // Two spellings of a file not written yet are one path.
        assert_eq!(
            absolute(&real.join("link/new/x.st")),
            absolute(&real.join("a/sub/new/x.st"))
        );
        assert_eq!(absolute(&real.join("a/./sub/new/x.st")), real.join("a/sub/new/x.st"));
        // Nothing existing below the root: taken as written.
        assert_eq!(
            absolute(std::path::Path::new("/nonexistent-bs/x/../y")),
            PathBuf::from("/nonexistent-bs/y")
        );
    }

    fn setup(dir: &std::path::Path) -> (PathBuf, State) {
        let path = dir.join("in.safetensors");
        write_official(
            &path,
            &[
                ("a", Dtype::F32, vec![2], pattern(8, 1)),
                ("b", Dtype::F32, vec![2], pattern(8, 2)),
            ],
            None,
        );
        let mut state = State::default();
        state.add_checkpoint("m", &crate::formats::open_checkpoint(&path).unwrap());
        state.default_alias = Some("m".into());
        (path, state)
    }

    fn apply(state: &mut State, name: &str, payload: serde_json::Value, evaluate: bool) -> Result<Flow, StepError> {
        let raw = RawTransform {
            name: name.into(),
            payload,
            location: Location::root().key("transforms").index(0),
        };
        let mut ctx = Context::new(evaluate, Arc::new(AtomicBool::new(false)));
        crate::transforms::parse(&raw, &Default::default())
            .unwrap()
            .apply(state, &mut ctx)
    }

    #[test]
    fn load_one_tensor_needs_a_matching_name() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut state) = setup(dir.path());
        let payload = serde_json::json!({"path": path, "to": "c"});
        let err = apply(&mut state, "load", payload, false).unwrap_err();
        assert!(
            matches!(
                err,
                StepError::Transform(TransformError::LoadWhichTensor { count: 2, .. })
            ),
            "{err}"
        );
        apply(
            &mut state,
            "load",
            serde_json::json!({"path": path, "to": "x::b"}),
            false,
        )
        .unwrap();
        assert_eq!(state.get("x", "b").unwrap().shape, vec![2]);
        apply(
            &mut state,
            "load",
            serde_json::json!({"path": path, "alias": "whole"}),
            false,
        )
        .unwrap();
        assert_eq!(state.alias("whole").unwrap().len(), 2);
    }

    /// Issue 15 item 2: a check gives a `load` of a file an earlier `save` writes the tensors
    /// that save will write, without opening the path (absent, or a stale earlier run's file).
    #[test]
    fn a_check_loads_what_an_earlier_save_will_write() {
        let dir = tempfile::tempdir().unwrap();
        let (_, state) = setup(dir.path());
        let out = dir.path().join("saved.safetensors");
        let run = |state: &mut State, ctx: &mut Context, name: &str, payload: serde_json::Value| {
            let raw = RawTransform {
                name: name.into(),
                payload,
                location: Location::root().key("transforms").index(0),
            };
            crate::transforms::parse(&raw, &Default::default())
                .unwrap()
                .apply(state, ctx)
        };
        for stale in [false, true] {
            if stale {
                // A file of another shape from an earlier run: the check must not read it.
                write_official(&out, &[("zz", Dtype::F32, vec![3], pattern(12, 7))], None);
            }
            let mut state = state.clone();
            let mut ctx = Context::new(false, Arc::new(AtomicBool::new(false)));
            run(
                &mut state,
                &mut ctx,
                "save",
                serde_json::json!({"path": out, "target": "b"}),
            )
            .unwrap();
            run(
                &mut state,
                &mut ctx,
                "load",
                serde_json::json!({"path": out, "to": "b_loaded"}),
            )
            .unwrap();
            run(
                &mut state,
                &mut ctx,
                "load",
                serde_json::json!({"path": out, "alias": "back"}),
            )
            .unwrap();
            assert_eq!(state.get("m", "b_loaded").unwrap().shape, vec![2]);
            assert_eq!(
                state.alias("back").unwrap().iter().map(|(n, _)| n).collect::<Vec<_>>(),
                ["b"]
            );
            let err = run(
                &mut state,
                &mut ctx,
                "load",
                serde_json::json!({"path": out, "alias": "other", "format": "numpy"}),
            )
            .unwrap_err();
            assert!(err.to_string().contains("earlier `save`"), "{err}");
        }
        // A `.npy` names its tensor by the file stem.
        let npy = dir.path().join("emb.npy");
        let mut state = state.clone();
        let mut ctx = Context::new(false, Arc::new(AtomicBool::new(false)));
        run(
            &mut state,
            &mut ctx,
            "save",
            serde_json::json!({"path": npy, "target": "a", "format": "numpy"}),
        )
        .unwrap();
        run(
            &mut state,
            &mut ctx,
            "load",
            serde_json::json!({"path": npy, "alias": "n"}),
        )
        .unwrap();
        assert_eq!(
            state.alias("n").unwrap().iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ["emb"]
        );
    }

    /// Issue 15 item 3: without `alias` and `target`, the default alias is written whole;
    /// without a default alias it is a plan error listing the aliases.
    #[test]
    fn save_without_alias_or_target_writes_the_default_alias() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut state) = setup(dir.path());
        let out = dir.path().join("whole.safetensors");
        apply(&mut state, "save", serde_json::json!({"path": out}), true).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 2);
        state.ensure_alias("other");
        state.default_alias = None;
        let err = apply(
            &mut state,
            "save",
            serde_json::json!({"path": dir.path().join("x.safetensors")}),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&err, StepError::Plan(_)) && err.to_string().contains("m, other"),
            "{err}"
        );
    }

    #[test]
    fn save_needs_exactly_one_tensor_and_writes_only_when_evaluating() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut state) = setup(dir.path());
        let out = dir.path().join("out.safetensors");
        let err = apply(
            &mut state,
            "save",
            serde_json::json!({"path": out, "target": ".*"}),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(err, StepError::Transform(TransformError::SaveNotOne { count: 2, .. })),
            "{err}"
        );
        apply(
            &mut state,
            "save",
            serde_json::json!({"path": out, "target": "b"}),
            false,
        )
        .unwrap();
        assert!(!out.exists());
        apply(
            &mut state,
            "save",
            serde_json::json!({"path": out, "target": "b"}),
            true,
        )
        .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), pattern(8, 2).as_slice());
    }
}
