//! Transforms: one file per family, one registry. Each family declares its YAML name, its key
//! table (which validates payloads and feeds `help`, completion and `_core.transform_specs()`)
//! and a parser producing a [`Transform`]; an `X` / `X_` pair is one [`Twin`] declaration. The
//! single [`parse`] function dispatches on the name and rejects unknown ones. Where written
//! tensors go is worked out in one place, `destination::destinations`.

pub mod assert;
pub mod assign;
pub mod cast;
pub mod columns;
pub mod control;
pub mod copy;
mod destination;
pub mod error;
pub mod scale;
// Issue 3: arithmetic, clamp and fill families.
pub mod arith;
pub mod clamp;
pub mod fill;
// Inspection: dump, diff, help (issue 3).
pub mod diff;
pub mod dump;
pub mod help;
// load / save, prefixes, execute (issue 3, planops).
pub mod execute;
pub mod load;
pub mod prefixes;
// The run's flags (issue 15 item 7).
pub mod config;
pub mod set;
// Shape family (issue 3).
pub mod concat;
pub mod matmul;
pub mod permute;
pub mod reshape;
pub mod split;
// Low-rank factorization (issue 10).
pub mod lora;
pub mod lowrank;
// Model merging (issue 13).
pub mod merge;
// MoE upcycling (issue 13).
pub mod upcycle;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use error::{fmt_shape, AssertionFailure, TransformError};

use crate::formats::FormatError;
use crate::plan::error::suggest;
pub use crate::plan::payload::Form;
pub(crate) use destination::{destinations, Destinations, Writes};
pub use execute::ParseScope;

use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError, RawTransform};
use crate::references::{Reference, ResolvedSlice, Target};
use crate::state::{Match, SelectError, State};
use crate::value::{ReadContext, Tensor, ValueError};

/// Whether execution goes on after a transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Run the next transform.
    Continue,
    /// Stop executing transforms (`exit`); the output is still written.
    Exit,
}

/// What a transform may use while it runs.
#[derive(Debug)]
pub struct Context {
    /// Whether value assertions read tensor data (a run) or are deferred (the header-only plan
    /// check of SPEC §8.1).
    pub evaluate: bool,
    /// Buffers for reading values, and the interruption flag reads check between chunks.
    pub reads: ReadContext,
    /// One line per transform describing what it did, for `check` and `--summarize`.
    pub notes: Vec<String>,
    /// Set by Ctrl-C; long evaluations stop at the next chunk.
    pub cancel: Arc<AtomicBool>,
    /// Text transforms print (`dump`, `diff`, `help`), in order; the command line prints it and
    /// Python returns it in the report.
    pub output: Vec<String>,
    /// Worker threads for writes transforms make (`save`); 0 means one per core.
    pub threads: usize,
    /// The plan's hash, recorded in files `save` writes, when the plan is known.
    pub plan_sha256: Option<String>,
    /// Files transforms wrote (`save`, nested plans' outputs), in order.
    pub written: Vec<PathBuf>,
    /// Notices about how inputs were read (a directory with weights of two formats, training
    /// state left out); the command line prints them on stderr, Python returns them in
    /// `report["notices"]`.
    pub notices: Vec<String>,
    /// Transforms run so far, nested plans' included (see [`MAX_STEPS_PER_RUN`]).
    pub steps_run: usize,
    /// Tensors factorized (`phlora`, `extract_lora`), in order, with what each kept.
    pub factorizations: Vec<lowrank::Factorization>,
    /// The most bytes one step needs at once for work done while it runs (a factorization's
    /// matrix and workspace), for the check's peak memory estimate.
    pub workspace: usize,
    /// The largest matrix a step holds beside its workspace, in the budget or (beyond it) the
    /// arena: the randomized SVD's input.
    pub held: usize,
    /// What a step holds outside the budget and the arena beside its workspace and matrix (a
    /// parallel factorization's second packing buffers), for the estimate only.
    pub unbudgeted: usize,
    /// The tensor whose step needs [`Context::workspace`], for the message when it does not
    /// fit the memory budget.
    pub workspace_tensor: Option<String>,
    /// Seconds each top-level transform took, in order (nested plans' steps count in their
    /// `execute`): what a run reports so a user sees where the time went.
    pub timings: Vec<StepTiming>,
    /// Bytes of input files the value reads a check deferred (value assertions, `dump` with
    /// statistics, `diff`) will read when the plan runs ([`Tensor::bytes_to_read`]).
    pub deferred_reads: u64,
    /// Files a `save` earlier in a check will write when the plan runs, with the tensors each
    /// will hold: a later `load` of one gets them instead of opening the path, which does not
    /// exist yet or holds an earlier run's bytes (issue 15 item 2).
    pub(crate) planned_files: Vec<load::PlannedFile>,
    /// How deep [`run_steps`] calls are nested (`execute`), so only top-level steps are timed.
    depth: usize,
    /// The whole-tensor reads of steps, for releasing a value after its last reader.
    pub(crate) last_reads: LastReads,
}

/// What steps read whole (value assertions, `dump`, `diff`, `extract_lora`, `phlora`, `save`), so a
/// value computed whole is released after the step that reads it last instead of kept until the
/// output is written (SPEC §8.3): the check logs every read in order; the run counts the same
/// reads and, after each step, releases the values the check found no later reader of.
#[derive(Debug, Default)]
pub(crate) struct LastReads {
    /// The check's log (when asked for): the tensors read, in order. Holding them keeps every
    /// logged value alive, so no address is reused while the log is taken.
    log: Option<Vec<Tensor>>,
    /// The run: for each read of the check's log, whether it was the last use of its value, and
    /// the dtype and shape read; a read that differs stops all releasing for the run.
    plan: Option<Arc<[LastRead]>>,
    /// Reads the run has counted so far.
    next: usize,
    /// Tensors whose last read was in the current step, and their values' addresses.
    done: Vec<Tensor>,
    done_values: std::collections::HashSet<usize>,
}

/// One read of a check's log, as the run looks it up.
#[derive(Debug)]
pub(crate) struct LastRead {
    last: bool,
    dtype: crate::dtype::DType,
    shape: Vec<usize>,
}

impl LastReads {
    /// A check that logs its reads.
    pub(crate) fn logging() -> Self {
        LastReads {
            log: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// A run that releases by the log a check took, whose values still `held` at the end of
    /// the plan (the output's tensors) are read afterwards.
    pub(crate) fn releasing(log: &LastReads, held: &[&Tensor]) -> Self {
        let Some(reads) = &log.log else {
            return Self::default();
        };
        // Backwards: a read is a value's last use when no later read and nothing held at the
        // end reaches it (a later tensor computed from it would read it again).
        let mut later = std::collections::HashSet::new();
        for tensor in held {
            tensor.collect_values(&mut later);
        }
        let mut plan: Vec<LastRead> = reads
            .iter()
            .rev()
            .map(|tensor| {
                let last = !later.contains(&tensor.value_address());
                tensor.collect_values(&mut later);
                LastRead {
                    last,
                    dtype: tensor.dtype,
                    shape: tensor.shape.clone(),
                }
            })
            .collect();
        plan.reverse();
        LastReads {
            plan: Some(plan.into()),
            ..Self::default()
        }
    }

    fn read(&mut self, tensor: &Tensor) {
        if let Some(log) = &mut self.log {
            log.push(tensor.clone());
            return;
        }
        let Some(plan) = &self.plan else {
            return;
        };
        match plan.get(self.next) {
            Some(read) if read.dtype == tensor.dtype && read.shape == tensor.shape => {
                self.next += 1;
                // Stored and in-memory values keep nothing to release.
                if read.last && tensor.computes() && self.done_values.insert(tensor.value_address()) {
                    self.done.push(tensor.clone());
                }
            }
            // The run read something the check did not: nothing is released from here on.
            _ => self.plan = None,
        }
    }

    /// After a step: releases what the values it read last computed whole (a value another
    /// tensor also holds is left alone).
    fn release(&mut self) {
        for tensor in self.done.drain(..) {
            // Held here and, unless the step dropped it, by the state.
            tensor.release_unshared_besides(1);
        }
        self.done_values.clear();
    }
}

/// How long one transform of a plan took.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTiming {
    /// Its index in the plan's transforms (within the run or session entry).
    pub index: usize,
    /// The transform's name.
    pub name: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Most transforms one run executes. Each may stack one lazy operation on a tensor, and reading
/// a tensor recurses once per stacked operation (about 600 bytes of the engine's 64 MiB stack
/// per level in a release build, several times that in a debug build): a longer chain would
/// overflow the stack. Real plans run hundreds to a few thousand transforms.
pub const MAX_STEPS_PER_RUN: usize = 50_000;

impl Context {
    /// A context for a run (`evaluate`) or a check.
    pub fn new(evaluate: bool, cancel: Arc<AtomicBool>) -> Self {
        Context {
            evaluate,
            reads: ReadContext::cancellable(cancel.clone()),
            notes: Vec::new(),
            cancel,
            output: Vec::new(),
            threads: 0,
            plan_sha256: None,
            written: Vec::new(),
            notices: Vec::new(),
            steps_run: 0,
            factorizations: Vec::new(),
            workspace: 0,
            held: 0,
            unbudgeted: 0,
            workspace_tensor: None,
            timings: Vec::new(),
            deferred_reads: 0,
            planned_files: Vec::new(),
            depth: 0,
            last_reads: LastReads::default(),
        }
    }

    /// Records that a step needs `bytes` in memory at once while it runs, for `tensor` (the
    /// largest need counts).
    pub fn need_workspace(&mut self, bytes: usize, tensor: &str) {
        if bytes > self.workspace {
            self.workspace = bytes;
            self.workspace_tensor = Some(tensor.to_owned());
        }
    }

    /// Records that the step reads each of `tensors` whole, in the check and in the run alike:
    /// a check counts the input bytes this will read and logs the reads (see [`LastReads`]).
    pub fn reads_whole<'a>(&mut self, tensors: impl IntoIterator<Item = &'a Tensor>) {
        let mut seen = std::collections::HashSet::new();
        for tensor in tensors {
            if !self.evaluate {
                self.deferred_reads = self.deferred_reads.saturating_add(tensor.bytes_to_read(&mut seen));
            }
            self.last_reads.read(tensor);
        }
    }

    /// Records that the step reads each of `tensors` whole, with bytes counted elsewhere (a
    /// `save`'s are the file's).
    pub(crate) fn log_reads<'a>(&mut self, tensors: impl IntoIterator<Item = &'a Tensor>) {
        for tensor in tensors {
            self.last_reads.read(tensor);
        }
    }

    /// Records what a transform did.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// Records the notices of a checkpoint just opened.
    pub fn notices_of(&mut self, checkpoint: &crate::formats::Checkpoint) {
        self.notices.extend(checkpoint.notices.iter().cloned());
    }

    /// Prints text for the user (a `dump` table, a `diff` report).
    pub fn emit(&mut self, text: String) {
        self.output.push(text);
    }

    /// How transforms that write files (`save`, `extract_lora`) write them: the run's threads
    /// (0: one per core) and its cancel flag.
    pub(crate) fn write_options(&self) -> crate::write::WriteOptions<'_> {
        let threads = match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        crate::write::WriteOptions {
            threads,
            reads: &self.reads,
            progress: None,
            // Later transforms may read what this write computed.
            release: false,
        }
    }

    /// Whether the run was interrupted.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Why one step of a plan failed; the executor adds the step's index and name.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The plan is invalid at this step (e.g. an unknown alias).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The transform cannot apply.
    #[error(transparent)]
    Transform(#[from] TransformError),
    /// An assertion is false.
    #[error(transparent)]
    Assertion(#[from] AssertionFailure),
    /// Reading tensor data failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Interrupted.
    #[error("interrupted")]
    Cancelled,
}

impl From<crate::write::WriteError> for StepError {
    fn from(e: crate::write::WriteError) -> Self {
        match e {
            crate::write::WriteError::Plan(e) => StepError::Plan(e),
            crate::write::WriteError::Format(e) => StepError::Format(e),
            crate::write::WriteError::Cancelled => StepError::Cancelled,
            crate::write::WriteError::Value(e) => StepError::Transform(TransformError::Value(e)),
        }
    }
}

impl From<ValueError> for StepError {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::Read(e) => StepError::Format(e),
            ValueError::Cancelled => StepError::Cancelled,
            other => StepError::Transform(TransformError::Value(other)),
        }
    }
}

impl TransformError {
    /// The error for a value of `tensor` that cannot be built or computed; reading failures and
    /// interruptions keep their own kinds.
    pub fn value_of(tensor: &str, e: ValueError) -> StepError {
        match e {
            ValueError::NoByteSize { .. }
            | ValueError::Compute { .. }
            | ValueError::TooLarge { .. }
            | ValueError::Memory(_)
            | ValueError::OutOfMemory { .. } => StepError::Transform(TransformError::ValueOf {
                tensor: tensor.to_owned(),
                source: e,
            }),
            other => other.into(),
        }
    }
}

impl From<crate::state::OpenError> for StepError {
    fn from(e: crate::state::OpenError) -> Self {
        match e {
            crate::state::OpenError::Plan(e) => StepError::Plan(e),
            crate::state::OpenError::Format(e) => StepError::Format(e),
        }
    }
}

impl From<SelectError> for StepError {
    fn from(e: SelectError) -> Self {
        match e {
            SelectError::Plan(e) => StepError::Plan(e),
            other => StepError::Transform(TransformError::Select(other)),
        }
    }
}

/// A view of `slice` of `tensor` (named `display` in messages), or the transform error for a
/// tensor that cannot be sliced.
pub(crate) fn view_of(tensor: &Tensor, slice: &ResolvedSlice, display: &str) -> Result<Tensor, TransformError> {
    tensor.view(slice).map_err(|e| match e {
        ValueError::NoByteSize { op, dtype } => TransformError::Unsupported {
            op,
            tensor: display.to_owned(),
            dtype,
        },
        source => TransformError::ValueOf {
            tensor: display.to_owned(),
            source,
        },
    })
}

/// One parsed step of a plan.
pub trait Transform: Send + Sync + std::fmt::Debug {
    /// Applies the step to the state. Every match is checked before any change is made.
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError>;

    /// The hash of a nested plan this step runs (`execute`), whose content the including plan's
    /// document does not hold when it is a file.
    fn nested_sha256(&self) -> Option<&str> {
        None
    }
}

/// The provenance hash of a plan whose document hashes to `own` and whose steps are `steps`:
/// `own` itself when no step runs a nested plan, else a hash over `own` and the nested plans'
/// hashes in order, so editing a plan file that `execute: {path}` names changes it too.
pub fn plan_sha256_with_nested(own: &str, steps: &[Step]) -> String {
    let nested: Vec<&str> = steps.iter().filter_map(|s| s.transform.nested_sha256()).collect();
    sha256_with_nested(own, &nested)
}

/// A plan's own hash combined with its nested plans' hashes, in order (see
/// [`plan_sha256_with_nested`]).
pub fn sha256_with_nested(own: &str, nested: &[&str]) -> String {
    if nested.is_empty() {
        return own.to_owned();
    }
    crate::plan::sha256_hex(format!("{own}:{}", nested.join(":")).as_bytes())
}

/// One parsed step of a plan: the transform and where it was written.
#[derive(Debug)]
pub struct Step {
    /// The transform's name (`scale_`).
    pub name: String,
    /// Where it is in the plan (`transforms[3]`, `transforms[2].execute.transforms[0]`).
    pub location: Location,
    /// What it does.
    pub transform: Box<dyn Transform>,
}

impl Step {
    /// Parses one raw transform into a step; relative paths in it resolve as `scope` says.
    pub fn parse(raw: &RawTransform, scope: &ParseScope) -> Result<Step, PlanError> {
        Ok(Step {
            name: raw.name.clone(),
            location: raw.location.clone(),
            transform: parse(raw, scope)?,
        })
    }
}

/// The step of a [`run_steps`] call that failed: its position in the slice and why.
#[derive(Debug)]
pub struct StepFailure {
    /// Index of the failing step in the slice given to [`run_steps`].
    pub index: usize,
    /// Why it failed.
    pub error: StepError,
}

/// The one step loop, behind the plan run, the `-i` session and nested `execute`: applies
/// `steps` in order, stopping at the first failure or `exit`, and before each step when the run
/// was interrupted.
pub fn run_steps(steps: &[Step], state: &mut State, ctx: &mut Context) -> Result<Flow, StepFailure> {
    ctx.depth += 1;
    let flow = run_steps_at_depth(steps, state, ctx);
    ctx.depth -= 1;
    flow
}

fn run_steps_at_depth(steps: &[Step], state: &mut State, ctx: &mut Context) -> Result<Flow, StepFailure> {
    for (index, step) in steps.iter().enumerate() {
        let started = std::time::Instant::now();
        ctx.steps_run += 1;
        let result = if ctx.cancelled() {
            Err(StepError::Cancelled)
        } else if ctx.steps_run > MAX_STEPS_PER_RUN {
            Err(TransformError::TooManySteps {
                limit: MAX_STEPS_PER_RUN,
            }
            .into())
        } else {
            apply_step(step, state, ctx)
        };
        ctx.last_reads.release();
        if ctx.depth == 1 {
            ctx.timings.push(StepTiming {
                index,
                name: step.name.clone(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Exit) => return Ok(Flow::Exit),
            Err(error) => return Err(StepFailure { index, error }),
        }
    }
    Ok(Flow::Continue)
}

/// Applies one step, printing what it is about to do (`set: {preview: true}`: its header-only
/// check on a copy of the state) and what it did (`verbose`) when the run asks. Only a run
/// prints (the check before it would print everything twice), and only for top-level steps: an
/// `execute` step's lines include its nested steps'.
fn apply_step(step: &Step, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
    let printing = ctx.evaluate && ctx.depth == 1;
    let dry = if state.flags.dry_run.is_some() { "dry-run " } else { "" };
    if printing && state.flags.preview {
        let mut probe_state = state.clone();
        let mut probe = Context::new(false, ctx.cancel.clone());
        probe.planned_files = ctx.planned_files.clone();
        match step.transform.apply(&mut probe_state, &mut probe) {
            Ok(_) if probe.notes.is_empty() => ctx.emit(format!("{dry}preview: {}", step.name)),
            Ok(_) => {
                for note in probe.notes {
                    ctx.emit(format!("{dry}preview: {note}"));
                }
            }
            Err(e) => ctx.emit(format!("{dry}preview: {}: would fail: {e}", step.name)),
        }
    }
    let before = ctx.notes.len();
    let flow = step.transform.apply(state, ctx)?;
    // `set` itself may have turned verbose on or off: its own line follows the new setting.
    if printing && state.flags.verbose {
        let dry = if state.flags.dry_run.is_some() { "dry-run " } else { "" };
        let lines: Vec<String> = ctx.notes[before..].iter().map(|n| format!("{dry}{n}")).collect();
        if lines.is_empty() {
            ctx.emit(format!("{dry}{}", step.name));
        }
        for line in lines {
            ctx.emit(line);
        }
    }
    Ok(flow)
}

/// Builds a transform from its payload.
pub type ParseFn = fn(&serde_json::Value, &ParseContext) -> Result<Box<dyn Transform>, PlanError>;

/// What a transform's parser knows besides its payload.
#[derive(Debug)]
pub struct ParseContext<'a> {
    /// Where the payload is (`transforms[3].scale_`).
    pub location: Location,
    /// The transform being parsed: its name, form and key table.
    pub spec: &'static TransformSpec,
    /// The plan files being parsed (for `execute` cycles).
    pub scope: &'a ParseScope,
}

impl ParseContext<'_> {
    /// The payload, checked against the transform's keys.
    pub fn payload<'v>(&self, value: &'v serde_json::Value) -> Result<Payload<'v>, PlanError> {
        Payload::new(value, &self.spec.keys(), self.location.clone())
    }

    /// The tensors a twin transform reads and, for the new form, where its results go:
    /// `from` and `to` for `X`, `target` (and no destination) for `X_`.
    pub fn operands(&self, p: &Payload) -> Result<(Reference, Option<Target>), PlanError> {
        match self.spec.form {
            Form::InPlace => Ok((p.reference("target")?, None)),
            Form::New | Form::Plain => Ok((p.reference("from")?, Some(p.target("to")?))),
        }
    }
}

/// A transform family member: its name, help, form and key table, and its parser.
#[derive(Debug)]
pub struct TransformSpec {
    /// The YAML key (`scale_`).
    pub name: &'static str,
    /// One line of help.
    pub summary: &'static str,
    /// Which form of a twin family it is ([`Form::Plain`] for a transform without a twin).
    pub form: Form,
    /// The key table (empty for `exit`; `assert` takes an expression instead). A twin family
    /// shares one table; [`TransformSpec::keys`] gives the keys of this form.
    pub fields: &'static [Field],
    /// Builds the transform from its payload.
    pub parse: ParseFn,
}

impl TransformSpec {
    /// The keys this transform takes, in table order.
    pub fn keys(&self) -> Vec<Field> {
        self.fields.iter().copied().filter(|f| self.form.takes(f)).collect()
    }

    /// The other form of a twin family (`scale_` for `scale`), when the registry has it.
    pub fn twin(&self) -> Option<&'static TransformSpec> {
        let name = match self.form {
            Form::Plain => return None,
            Form::New => format!("{}_", self.name),
            Form::InPlace => self.name.strip_suffix('_')?.to_owned(),
        };
        spec(&name)
    }
}

/// One declaration for an `X` / `X_` twin family (`scale` / `scale_`): the names and summaries
/// of both forms, one key table and one parser (which asks [`ParseContext::spec`] for the form).
#[derive(Debug)]
pub struct Twin {
    /// Name and summary of the new form (`scale`).
    pub new: (&'static str, &'static str),
    /// Name and summary of the in-place form (`scale_`).
    pub in_place: (&'static str, &'static str),
    /// The keys of both forms; `from` / `to` marked [`Field::new_only`], `target`
    /// [`Field::in_place_only`].
    pub fields: &'static [Field],
    /// Parses either form.
    pub parse: ParseFn,
}

impl Twin {
    /// The spec of one form (`Form::New` or `Form::InPlace`).
    pub const fn spec(&self, form: Form) -> TransformSpec {
        let (name, summary) = match form {
            Form::InPlace => self.in_place,
            Form::New | Form::Plain => self.new,
        };
        TransformSpec {
            name,
            summary,
            form,
            fields: self.fields,
            parse: self.parse,
        }
    }
}

/// The `from` key of a twin family's new form.
pub(crate) const fn from_key(doc: &'static str) -> Field {
    Field::required("from", FieldKind::Reference, doc).new_only()
}

/// The `to` key of a twin family's new form.
pub(crate) const fn to_key(doc: &'static str) -> Field {
    Field::required("to", FieldKind::Target, doc).new_only()
}

/// The `target` key of a twin family's in-place form.
pub(crate) const fn target_key(doc: &'static str) -> Field {
    Field::required("target", FieldKind::Reference, doc).in_place_only()
}

/// Every transform the engine knows.
pub const REGISTRY: &[&TransformSpec] = &[
    &copy::COPY,
    &copy::MOVE,
    &copy::DELETE,
    &assign::ASSIGN,
    &cast::CAST,
    &cast::CAST_,
    &scale::SCALE,
    &scale::SCALE_,
    &assert::ASSERT,
    &control::EXIT,
    // Issue 3: arithmetic, clamp and fill families.
    &clamp::CLAMP,
    &clamp::CLAMP_,
    &arith::ADD,
    &arith::SUBTRACT,
    &arith::MULTIPLY,
    &arith::ADD_,
    &arith::SUBTRACT_,
    &fill::FILL,
    &fill::FILL_,
    &fill::ZEROES,
    &fill::ONES,
    &fill::RAND,
    // Inspection: dump, diff, help (issue 3).
    &dump::DUMP,
    &diff::DIFF,
    &help::HELP,
    // load / save, prefixes, execute (issue 3, planops).
    &load::LOAD,
    &load::SAVE,
    &prefixes::PREFIXES,
    &execute::EXECUTE,
    &set::SET,
    &config::CONFIG,
    // Shape family: reshape, permute, split, concat, matmul.
    &reshape::RESHAPE,
    &reshape::RESHAPE_,
    &permute::PERMUTE,
    &split::SPLIT,
    &concat::CONCAT,
    &matmul::MATMUL,
    // Low-rank factorization.
    &lowrank::PHLORA,
    &lowrank::PHLORA_,
    &lora::EXTRACT_LORA,
    &lora::MERGE_LORA,
    // Model merging.
    &merge::MERGE,
    // MoE upcycling.
    &upcycle::UPCYCLE_MOE,
];

/// Looks a transform up by name.
pub fn spec(name: &str) -> Option<&'static TransformSpec> {
    REGISTRY.iter().copied().find(|s| s.name == name)
}

/// Parses one raw transform; relative paths in it resolve as `scope` says.
pub fn parse(raw: &RawTransform, scope: &ParseScope) -> Result<Box<dyn Transform>, PlanError> {
    let Some(spec) = spec(&raw.name) else {
        return Err(PlanError::UnknownTransform {
            location: raw.location.clone(),
            name: raw.name.clone(),
            suggestion: suggest(&raw.name, REGISTRY.iter().map(|s| s.name)),
        });
    };
    let cx = ParseContext {
        location: raw.location.key(&raw.name),
        spec,
        scope,
    };
    (spec.parse)(&raw.payload, &cx)
}

/// Refuses computing on carry-only dtypes and, for floating operations, on non-float tensors.
pub(crate) fn require_float(m: &Match, op: &'static str) -> Result<(), TransformError> {
    if !m.tensor.dtype.is_computable() {
        return Err(TransformError::Unsupported {
            op,
            tensor: m.display(),
            dtype: m.tensor.dtype,
        });
    }
    if !m.tensor.dtype.is_float() {
        return Err(TransformError::NotFloat {
            op,
            tensor: m.display(),
            dtype: m.tensor.dtype,
        });
    }
    Ok(())
}

/// "3 tensors" / "1 tensor".
pub(crate) fn count_noun(n: usize) -> String {
    if n == 1 {
        "1 tensor".to_owned()
    } else {
        format!("{n} tensors")
    }
}

/// Fixtures shared by the transform families' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::dtype::DType;
    use crate::references::Reference;
    use crate::value::Tensor;

    /// A U16 tensor of `shape` holding `offset, offset + 1, ...` in row-major order.
    pub(crate) fn counting(shape: &[usize], offset: u16) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n as u16).flat_map(|v| (v + offset).to_le_bytes()).collect();
        Tensor::in_memory(DType::U16, shape.to_vec(), Arc::new(bytes))
    }

    /// The parse context of `spec` at `location`, outside any plan file.
    pub(crate) fn context(spec: &'static TransformSpec, location: &Location) -> ParseContext<'static> {
        static SCOPE: ParseScope = ParseScope::NONE;
        ParseContext {
            location: location.clone(),
            spec,
            scope: &SCOPE,
        }
    }

    /// `t` matched as `m::name` without a slice.
    pub(crate) fn matched(name: &str, t: Tensor) -> Match {
        Match {
            alias: "m".into(),
            name: name.into(),
            tensor: t.clone(),
            base: t,
            slice: None,
            captures: Reference::parse_str(name).unwrap().selector.captures(name).unwrap(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8: each `X` / `X_` pair is one declaration, so both forms read one key table.
    #[test]
    fn twins_share_one_key_table() {
        let mut pairs = Vec::new();
        for spec in REGISTRY {
            let Some(twin) = spec.twin() else { continue };
            assert_eq!(twin.twin().map(|t| t.name), Some(spec.name));
            let table = |s: &TransformSpec| s.fields.iter().map(|f| (f.name, f.doc, f.only)).collect::<Vec<_>>();
            assert_eq!(table(spec), table(twin), "{}", spec.name);
            if spec.form == Form::New {
                pairs.push(spec.name);
            }
        }
        assert_eq!(
            pairs,
            ["cast", "scale", "clamp", "add", "subtract", "fill", "reshape", "phlora"]
        );
        let names = |s: &TransformSpec| s.keys().iter().map(|f| f.name).collect::<Vec<_>>();
        assert_eq!(names(&scale::SCALE), ["from", "to", "by"]);
        assert_eq!(names(&scale::SCALE_), ["target", "by"]);
        assert_eq!(names(&arith::MULTIPLY), ["from_a", "from_b", "to", "dtype"]);
        assert!(arith::MULTIPLY.twin().is_none() && copy::COPY.twin().is_none());
    }
}
