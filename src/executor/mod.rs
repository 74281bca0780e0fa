//! Execution (SPEC §8): open the inputs' headers, run the transforms symbolically over lazy
//! values (the plan check), run them again evaluating value assertions, then stream the chosen
//! alias into its output in parallel. Nothing reads tensor bytes before the check has passed.

pub mod session;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::Error;
use crate::memory::{Memory, MemoryError, MemoryOptions};
use crate::plan::{Location, OutputSpec, Plan, PlanError};
use crate::space::{FilesystemSpace, SpaceNeed};
use crate::state::State;
use crate::transforms::{
    plan_sha256_with_nested, run_steps, Context, LastReads, ParseScope, Step, StepError, StepFailure,
};
use crate::value::{ReadContext, Tensor, CHUNK_BYTES};
use crate::write::{self, WriteOptions};

pub use crate::write::ProgressFn;

/// How to run a plan.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Worker threads for writing (0: one per core).
    pub threads: usize,
    /// Set by Ctrl-C; checked between chunks.
    pub cancel: Arc<AtomicBool>,
    /// Progress callback.
    pub progress: Option<Arc<ProgressFn>>,
    /// The memory budget and the arena's directory.
    pub memory: MemoryOptions,
    /// Start even when a filesystem written to has less free space than the run needs
    /// (`--no-space-check`); the run may then fail when the disk fills, leaving nothing.
    pub skip_space_check: bool,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("threads", &self.threads)
            .field("memory", &self.memory)
            .field("skip_space_check", &self.skip_space_check)
            .finish_non_exhaustive()
    }
}

/// One output tensor, as the check reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub nbytes: u64,
}

/// What a check or a run found and did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One line per transform executed.
    pub notes: Vec<String>,
    /// Text printed by transforms (`dump`, `diff`, `help`), in order.
    pub output: Vec<String>,
    /// Notices about how inputs were read (inputs first, then `load`s), in order.
    pub notices: Vec<String>,
    /// The alias written (or that would be written).
    pub alias: Option<String>,
    /// The output tensors in order.
    pub tensors: Vec<TensorSummary>,
    /// Total bytes of the output tensors.
    pub total_bytes: u64,
    /// Files written: by transforms (`save`, nested plans) in order, then the output's (empty
    /// for a check).
    pub written: Vec<PathBuf>,
    /// Estimated peak bytes of memory the run's buffers take, within the budget.
    pub peak_memory_estimate: u64,
    /// Bytes of tensors computed whole (products, permutations that cannot stream, factors),
    /// in memory or in the arena.
    pub materialized_bytes: u64,
    /// The memory budget (`--max-memory`, `max_memory=`; a share of physical memory by default).
    pub memory_budget: u64,
    /// Scratch arena bytes: for a check, the estimate of what does not fit the budget; for a
    /// run, the most the arena held at once.
    pub arena_bytes: u64,
    /// Input tensor names no longer present in the output alias.
    pub removed: usize,
    /// Output tensor names not present in the alias's input.
    pub added: usize,
    /// Tensors factorized (`phlora`, `extract_lora`): rank, energy kept, relative error.
    pub factorizations: Vec<crate::transforms::lowrank::Factorization>,
    /// Seconds each transform took (in a run; a check's are of the symbolic pass).
    pub timings: Vec<crate::transforms::StepTiming>,
    /// Seconds writing the output took (none for a check or a plan without output).
    pub write_seconds: Option<f64>,
    /// Bytes of tensor data read from input files by the run, its transforms and its write (a
    /// byte read twice counts twice; 0 for a check, which reads headers only).
    pub bytes_read: u64,
    /// Estimated bytes of tensor data the run reads from input files: what writing the output
    /// reads ([`crate::value::Tensor::bytes_to_read`]) plus what value assertions, `dump` with
    /// statistics and `diff` read. Factorizations (`phlora`, `extract_lora`) and `dump` of
    /// values are not counted.
    pub bytes_to_read: u64,
    /// The files the plan's output consists of (weight files, index, copied sidecars), each
    /// with its exact size, laid out by the writer's own code; files `save` and nested plans
    /// write are not listed.
    pub output_files: Vec<(PathBuf, u64)>,
    /// Bytes of [`Report::output_files`].
    pub bytes_to_write: u64,
    /// Free space on each filesystem the output is written to, against what it needs.
    pub filesystems: Vec<FilesystemSpace>,
}

/// What a check finds out about the run's I/O from the headers alone: bytes to read, the
/// output's files and the free space for them.
#[derive(Debug, Default)]
struct IoPreview {
    bytes_to_read: u64,
    output_files: Vec<(PathBuf, u64)>,
    bytes_to_write: u64,
    filesystems: Vec<FilesystemSpace>,
}

impl IoPreview {
    fn fill(self, report: &mut Report) {
        report.bytes_to_read = self.bytes_to_read;
        report.output_files = self.output_files;
        report.bytes_to_write = self.bytes_to_write;
        report.filesystems = self.filesystems;
    }
}

/// What starting the writer adds beside its buffers (its threads' first stack pages and
/// allocator arenas, the layout): measured as 0.3–0.4 MiB of peak RSS converting the 1 GiB
/// checkpoint with one or two threads.
const WRITER_SETUP_BYTES: u64 = 384 << 10;

/// What the memory estimate of a check starts from.
struct MemoryNeeds {
    budget: u64,
    /// The largest workspace a step needs in memory (a factorization's).
    workspace: usize,
    /// The largest matrix a step holds beside its workspace, in the budget or the arena.
    held: usize,
    /// What the step holds beside them outside the budget (see [`Context::unbudgeted`]).
    unbudgeted: usize,
}

/// Releases what tensors outside the output alias keep computed whole (a product an assertion
/// read): the steps are done, and only the write reads on. A value the output also holds is
/// left alone ([`crate::value::Tensor::release_unshared`]); one read again later (a lazy result
/// handed to Python) is computed again.
fn release_outside(state: &State, output: &str) {
    for alias in state.alias_names() {
        if alias == output {
            continue;
        }
        if let Some(tensors) = state.alias(&alias) {
            for (_, tensor) in tensors.iter() {
                tensor.release_unshared();
            }
        }
    }
}

/// Where a run's memory goes, estimated (see [`Prepared::memory_estimate`]).
struct MemoryEstimate {
    budget: u64,
    materialized: u64,
    arena: u64,
    peak: u64,
}

/// A parsed, loaded plan ready to check or run.
#[derive(Debug)]
pub struct Prepared {
    plan: Plan,
    steps: Vec<Step>,
    initial: State,
    /// The inputs' notices, given to every execution's context.
    notices: Vec<String>,
    threads: usize,
}

/// The engine error for a failed step of the plan (or of an `-i` session), numbered from `first`.
fn step_error(first: usize, steps: &[Step], failure: StepFailure) -> Error {
    let StepFailure { index, error } = failure;
    let name = steps.get(index).map_or("", |s| s.name.as_str());
    let index = first + index;
    match error {
        StepError::Plan(e) => Error::Plan(e),
        StepError::Format(source) => Error::FormatAt {
            index,
            name: name.to_owned(),
            source,
        },
        StepError::Transform(source) => Error::Transform {
            index,
            name: name.to_owned(),
            source,
        },
        StepError::Assertion(failure) => Error::Assertion { index, failure },
        StepError::Cancelled => Error::Cancelled,
    }
}

/// Most worker threads per core a run may use. More are clamped with a notice (issue 9:
/// `--threads 100000` started 100,000 threads, each reserving the engine's stack, drove the load
/// average to 1,600 and then failed with EAGAIN); output bytes never depend on the count.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The worker threads for a requested count (0: one per core) on `cores` cores, and a notice
/// when the request was clamped to [`MAX_THREADS_PER_CORE`] per core.
fn worker_threads(requested: usize, cores: usize) -> (usize, Option<String>) {
    let cores = cores.max(1);
    let limit = cores.saturating_mul(MAX_THREADS_PER_CORE);
    match requested {
        0 => (cores, None),
        n if n > limit => (
            limit,
            Some(format!(
                "{n} threads requested, more than {MAX_THREADS_PER_CORE} per core on {cores} cores; using {limit}"
            )),
        ),
        n => (n, None),
    }
}

impl Prepared {
    /// Parses every transform and opens every input's headers.
    pub fn new(plan: Plan, threads: usize) -> Result<Prepared, Error> {
        // Nested `execute` plans are parsed here too; relative paths resolve against the plan
        // file's directory and cycles are found before any input is opened.
        let scope = ParseScope::of_plan(&plan.files);
        let steps = plan
            .transforms
            .iter()
            .map(|raw| Step::parse(raw, &scope))
            .collect::<Result<Vec<_>, _>>()?;
        let mut plan = plan;
        plan.sha256 = plan_sha256_with_nested(&plan.sha256, &steps);
        let mut initial = State::default();
        let mut notices = initial.open_inputs(&plan.inputs, &Location::root())?;
        initial.written.clear();
        // SPEC §3: the only input, or output.alias — when that names an input; an output alias
        // the transforms create cannot be the default for references that run before it exists.
        initial.default_alias = match (&plan.output, plan.inputs.as_slice()) {
            (Some(OutputSpec { alias: Some(alias), .. }), _) if initial.alias(alias).is_some() => Some(alias.clone()),
            (_, [only]) => Some(only.alias.clone()),
            _ => None,
        };
        // An output alias no input defines may still be created by the transforms; a plan
        // without transforms cannot create it.
        if let Some(OutputSpec { alias: Some(alias), .. }) = &plan.output {
            if initial.alias(alias).is_none() && plan.transforms.is_empty() {
                return Err(PlanError::UnknownAlias {
                    location: Location::root().key("output").key("alias"),
                    alias: alias.clone(),
                    known: initial.alias_names(),
                }
                .into());
            }
        }
        let (threads, notice) = worker_threads(threads, std::thread::available_parallelism().map_or(1, |n| n.get()));
        notices.extend(notice);
        Ok(Prepared {
            plan,
            steps,
            initial,
            notices,
            threads,
        })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn execute(&self, ctx: &mut Context) -> Result<State, Error> {
        ctx.threads = self.threads;
        ctx.plan_sha256 = Some(self.plan.sha256.clone());
        ctx.notices.extend(self.notices.iter().cloned());
        let mut state = self.initial.clone();
        run_steps(&self.steps, &mut state, ctx).map_err(|failure| step_error(0, &self.steps, failure))?;
        Ok(state)
    }

    /// The alias the output holds (SPEC §6.3), when the plan has an output.
    fn output_alias(&self, state: &State) -> Result<Option<String>, Error> {
        let Some(output) = &self.plan.output else {
            return Ok(None);
        };
        let location = Location::root().key("output");
        Ok(Some(state.output_alias(
            output.alias.as_deref(),
            &self.plan.inputs,
            &location,
        )?))
    }

    /// Writes the output alias (validated by the check) and returns the files written.
    fn write(
        &self,
        state: &State,
        alias: &str,
        reads: &ReadContext,
        options: &RunOptions,
    ) -> Result<Vec<PathBuf>, Error> {
        let Some(output) = &self.plan.output else {
            return Ok(Vec::new());
        };
        let options = WriteOptions {
            threads: self.threads,
            reads,
            progress: options.progress.as_deref(),
            // The run's last write: nothing reads its tensors afterwards.
            release: true,
        };
        Ok(write::write_alias(
            output,
            state,
            alias,
            Some(&self.plan.sha256),
            options,
        )?)
    }

    fn report(&self, state: &State, ctx: Context) -> Result<Report, Error> {
        let alias = self.output_alias(state)?;
        self.report_alias(state, ctx, alias)
    }

    /// The report of a state whose output is `alias` (none: no tensors listed).
    fn report_alias(&self, state: &State, ctx: Context, alias: Option<String>) -> Result<Report, Error> {
        let ctx_memory = MemoryNeeds {
            budget: ctx.reads.memory().limit(),
            workspace: ctx.workspace,
            held: ctx.held,
            unbudgeted: ctx.unbudgeted,
        };
        let mut report = Report {
            notes: ctx.notes,
            output: ctx.output,
            written: ctx.written,
            notices: ctx.notices,
            factorizations: ctx.factorizations,
            timings: ctx.timings,
            bytes_read: ctx.reads.bytes_read(),
            ..Report::default()
        };
        report.alias = alias;
        let current = report.alias.as_deref().and_then(|a| state.alias(a));
        let estimate = self.memory_estimate(current, &ctx_memory);
        if let Some(current) = current {
            let alias = report.alias.as_deref().unwrap_or_default();
            for (name, tensor) in current.iter() {
                report.tensors.push(TensorSummary {
                    name: name.to_owned(),
                    dtype: tensor.dtype.name().to_owned(),
                    shape: tensor.shape.clone(),
                    nbytes: tensor.nbytes() as u64,
                });
            }
            // Saturating: a figure to show; the writer refuses an output whose size overflows.
            report.total_bytes = report.tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.nbytes));
            // A renamed single input (`prefixes rename`) is compared with what it was.
            let before = match self.plan.inputs.as_slice() {
                [only] if state.default_alias.as_deref() == Some(alias) => self.initial.alias(&only.alias),
                _ => self.initial.alias(alias),
            };
            if let Some(initial) = before {
                // An alias no transform changed is the initial one, shared (State's aliases are
                // copied on first change): nothing to compare.
                if !std::ptr::eq(initial, current) {
                    report.removed = initial.iter().filter(|(n, _)| !current.contains(n)).count();
                    report.added = current.iter().filter(|(n, _)| !initial.contains(n)).count();
                }
            } else {
                report.added = current.len();
            }
        }
        report.materialized_bytes = estimate.materialized;
        report.memory_budget = estimate.budget;
        report.arena_bytes = estimate.arena;
        report.peak_memory_estimate = estimate.peak;
        Ok(report)
    }

    /// The header-only plan check (SPEC §8.1): every transform runs symbolically, value
    /// assertions are deferred, and the output header is computed, with the bytes the run will
    /// read and write and the free space for them. No tensor byte is read.
    pub fn check(&self) -> Result<Report, Error> {
        self.check_within(&MemoryOptions::default())
    }

    /// [`Prepared::check`] against the memory budget of `memory`.
    pub fn check_within(&self, memory: &MemoryOptions) -> Result<Report, Error> {
        let (state, ctx) = self.checked(memory, false)?;
        let preview = self.preview(&state, &ctx)?;
        let mut report = self.report(&state, ctx)?;
        preview.fill(&mut report);
        Ok(report)
    }

    /// The I/O of a run whose check ended with `state` and `ctx` (its deferred value reads, its
    /// memory budget and arena directory).
    fn preview(&self, state: &State, ctx: &Context) -> Result<IoPreview, Error> {
        let mut preview = IoPreview {
            bytes_to_read: ctx.deferred_reads,
            ..IoPreview::default()
        };
        // Files `save` steps write during the run.
        let saves = save_needs(ctx.planned_files.iter().map(|f| (f.format(), f.space_need())));
        // Dry-run still on at the end of the plan: the output is not written (nor read).
        let output = self.plan.output.as_ref().filter(|_| state.flags.dry_run.is_none());
        let (Some(output), Some(alias)) = (output, self.output_alias(state)?) else {
            preview.filesystems = crate::space::survey(&saves);
            return Ok(preview);
        };
        let mut arena = 0;
        if let Some(current) = state.alias(&alias) {
            // Tensors that are one lazy value of one dtype and shape (copies) are read once by
            // the writer, which groups them so.
            let mut written = std::collections::HashSet::new();
            let mut seen = std::collections::HashSet::new();
            for (_, tensor) in current.iter() {
                let key = (Arc::as_ptr(&tensor.value) as usize, tensor.dtype, tensor.shape.clone());
                if written.insert(key) {
                    preview.bytes_to_read = preview.bytes_to_read.saturating_add(tensor.bytes_to_read(&mut seen));
                }
            }
            let needs = MemoryNeeds {
                budget: ctx.reads.memory().limit(),
                workspace: ctx.workspace,
                held: ctx.held,
                unbudgeted: ctx.unbudgeted,
            };
            arena = self.memory_estimate(Some(current), &needs).arena;
        }
        preview.output_files = write::planned_files(output, state, &alias, Some(&self.plan.sha256))?;
        preview.bytes_to_write = preview
            .output_files
            .iter()
            .fold(0u64, |sum, (_, len)| sum.saturating_add(*len));
        let mut needs = vec![SpaceNeed {
            role: "output",
            path: output.path.clone(),
            bytes: preview.bytes_to_write,
        }];
        if arena > 0 {
            needs.push(SpaceNeed {
                role: "scratch",
                path: ctx.reads.memory().scratch_dir().to_path_buf(),
                bytes: arena,
            });
        }
        needs.extend(saves);
        preview.filesystems = crate::space::survey(&needs);
        Ok(preview)
    }

    /// The run's memory: its budget and its arena (beside the output unless told otherwise).
    fn memory(&self, options: &MemoryOptions) -> Arc<Memory> {
        let output = self.plan.output.as_ref().map(|o| o.path.as_path());
        Arc::new(Memory::for_run(options, output))
    }

    /// Where the memory of writing `current` goes: a typical figure. Each writing thread holds a
    /// chunk buffer plus a temporary or two for computed values (long chains of operations on
    /// one tensor take a temporary per level, and strided slices a covering span of up to 4 MiB
    /// per level); factorizations run before the write, one matrix at a time. Tensors computed
    /// whole (products, permutations that cannot stream, factors) are kept until the write ends:
    /// in memory as far as the budget allows, the rest in the arena.
    fn memory_estimate(&self, current: Option<&crate::state::AliasState>, needs: &MemoryNeeds) -> MemoryEstimate {
        let (mut materialized, mut resident, mut levels) = (0usize, 0u64, 0usize);
        if let Some(current) = current {
            let (mut seen, mut seen_resident) = (std::collections::HashSet::new(), std::collections::HashSet::new());
            for (_, tensor) in current.iter() {
                materialized = materialized.saturating_add(tensor.materialized(&mut seen));
                resident = resident.saturating_add(tensor.resident(needs.budget, &mut seen_resident));
                levels = levels.max(tensor.levels());
            }
        }
        let materialized = materialized as u64;
        // The share held for the run (at most 3 chunks per writing thread, or a workspace), and
        // what the writing threads hold: a chunk each, and a temporary per level of computation.
        let fixed = self.fixed_memory(needs.workspace);
        let buffers = (self.threads as u64)
            .saturating_mul((1 + levels.min(2)) as u64 * CHUNK_BYTES as u64)
            .saturating_add(WRITER_SETUP_BYTES);
        let room = needs.budget.saturating_sub(fixed);
        let in_memory = materialized.min(room);
        // A step holding a matrix beside its workspace (the randomized SVD's) holds what the
        // budget leaves of it; the writing holds the buffers, the tensors computed whole that
        // fit, and the pages of transposed sources.
        let step = (needs.workspace as u64)
            .saturating_add((needs.held as u64).min(room))
            .saturating_add(needs.unbudgeted as u64);
        let writing = buffers.saturating_add(in_memory).saturating_add(resident);
        MemoryEstimate {
            budget: needs.budget,
            materialized,
            arena: materialized - in_memory,
            peak: writing.max(step),
        }
    }

    /// Bytes that must be in memory whatever the budget: the writing threads' buffers, or a
    /// factorization's workspace (`workspace`), whichever is larger.
    fn fixed_memory(&self, workspace: usize) -> u64 {
        (self.threads as u64)
            .saturating_mul(3 * CHUNK_BYTES as u64)
            .max(workspace as u64)
    }

    /// The check without its report: the state and context it ended with. Refuses a plan whose
    /// work cannot fit the budget even with every tensor computed whole in the arena.
    /// With `log_reads`, the context holds the log of what steps read whole (see
    /// [`LastReads`]).
    fn checked(&self, memory: &MemoryOptions, log_reads: bool) -> Result<(State, Context), Error> {
        let mut ctx = Context::new(false, Arc::new(AtomicBool::new(false)));
        ctx.reads = ReadContext::for_run(ctx.cancel.clone(), self.memory(memory));
        if log_reads {
            ctx.last_reads = LastReads::logging();
        }
        let state = self.execute(&mut ctx)?;
        if let (Some(output), Some(alias)) = (&self.plan.output, self.output_alias(&state)?) {
            write::validate_output(output, &state, &alias)?;
        }
        self.fits_budget(&ctx)?;
        Ok((state, ctx))
    }

    /// Refuses work that cannot fit the budget of `ctx` even with every tensor computed whole
    /// in the arena: the writing threads' buffers, or a factorization's workspace.
    fn fits_budget(&self, ctx: &Context) -> Result<(), MemoryError> {
        let budget = ctx.reads.memory().limit();
        let fixed = self.fixed_memory(ctx.workspace);
        if fixed <= budget {
            return Ok(());
        }
        let (what, tensor, hint) = match &ctx.workspace_tensor {
            Some(tensor) if ctx.workspace as u64 == fixed => {
                (format!("factorizing `{tensor}`"), Some(tensor.clone()), "")
            }
            _ => (
                format!("writing with {} threads", self.threads),
                None,
                " or use fewer threads (--threads, threads=)",
            ),
        };
        Err(MemoryError::OverBudget {
            what,
            tensor,
            needed: fixed,
            budget,
            hint,
        })
    }

    /// Checks, then runs the plan for real and writes the output.
    pub fn run(&self, options: &RunOptions) -> Result<Report, Error> {
        self.run_keeping_state(options).map(|(report, ..)| report)
    }

    /// [`Prepared::run`], also returning the state the transforms ended with: a plan without
    /// an output hands its result to Python this way (lazy values, nothing written).
    pub fn run_keeping_state(&self, options: &RunOptions) -> Result<(Report, State, Arc<Memory>), Error> {
        // The check's report would be thrown away: one summary per tensor (issue 9).
        let (preview, fixed, last_reads) = {
            let (state, ctx) = self.checked(&options.memory, true)?;
            // What is read after the steps: the output's tensors, or (a result handed to
            // Python) every alias's.
            let held: Vec<&Tensor> = match self.output_alias(&state)? {
                Some(alias) => state
                    .alias(&alias)
                    .into_iter()
                    .flat_map(|a| a.iter().map(|(_, t)| t))
                    .collect(),
                None => state
                    .alias_names()
                    .into_iter()
                    .flat_map(|alias| state.alias(&alias).into_iter().flat_map(|a| a.iter().map(|(_, t)| t)))
                    .collect(),
            };
            let last_reads = LastReads::releasing(&ctx.last_reads, &held);
            (
                self.preview(&state, &ctx)?,
                self.fixed_memory(ctx.workspace),
                last_reads,
            )
        };
        if !options.skip_space_check {
            crate::space::require(&preview.filesystems)?;
        }
        let memory = self.memory(&options.memory);
        // The writing threads' buffers and factorization workspaces are not allocated from the
        // budget; their share is held for the run, so tensors computed whole get only the rest
        // (the check refused a plan whose share exceeds the budget).
        let _fixed = memory.reserve(usize::try_from(fixed).unwrap_or(usize::MAX));
        let mut ctx = Context::new(true, options.cancel.clone());
        ctx.reads = ReadContext::for_run(options.cancel.clone(), memory.clone());
        ctx.last_reads = last_reads;
        let state = self.execute(&mut ctx)?;
        // Written before the report is built, so the writer's layout and the report's per-tensor
        // summaries are not held at once.
        let started = std::time::Instant::now();
        let files = match self.output_alias(&state)? {
            // `set: {dry-run: true}` still on at the end: the output is not written, as in the
            // 0.2 tool (issue 15 item 7).
            Some(_) if state.flags.dry_run.is_some() => {
                ctx.notices
                    .push("dry-run is on at the end of the plan: the output was not written".to_owned());
                None
            }
            Some(alias) => {
                release_outside(&state, &alias);
                Some(self.write(&state, &alias, &ctx.reads, options)?)
            }
            None => None,
        };
        let write_seconds = files.as_ref().map(|_| started.elapsed().as_secs_f64());
        let arena_peak = ctx.reads.memory().arena_peak();
        let mut report = self.report(&state, ctx)?;
        report.arena_bytes = arena_peak;
        report.written.extend(files.unwrap_or_default());
        report.write_seconds = write_seconds;
        preview.fill(&mut report);
        Ok((report, state, memory))
    }

    /// The alias a plan without an output leaves as its result: the default alias (the only
    /// input, or `output.alias`), else the only alias there is, else the only one written.
    pub fn result_alias(&self, state: &State) -> Option<String> {
        if let Some(alias) = state.default_alias.as_ref().filter(|a| state.alias(a).is_some()) {
            return Some(alias.clone());
        }
        match (state.alias_names().as_slice(), &state.written) {
            ([only], _) => Some(only.clone()),
            (_, written) if written.len() == 1 => written.iter().next().cloned(),
            _ => None,
        }
    }
}

/// Writes the whole of `alias` in `state` to the output that `output` describes — a value parsed
/// exactly as a plan's `output:` (a path, or a mapping with `path`, `format`, `shard`,
/// `overwrite`, `sidecars`; `alias` is ignored, the alias is given) — streamed and atomic through
/// the plan output's own writer, and returns the usual report. `metadata` is added to the
/// alias's `__metadata__` (its entries win, but `brainsurgery.version` is always the engine's, and
/// `format: pt` is added when absent), so the same tensors with the same metadata give the same
/// bytes as a plan run. Python's `brainsurgery.save` and sessions write through this.
pub fn save(
    output: &serde_json::Value,
    state: &State,
    alias: &str,
    metadata: &std::collections::BTreeMap<String, String>,
    plan_sha256: Option<&str>,
    options: &RunOptions,
) -> Result<Report, Error> {
    let location = Location::root().key("output");
    let spec = crate::plan::parse_output(Some(output), location.clone())?
        .ok_or_else(|| PlanError::invalid(&location, "expected a path or a mapping, got nothing"))?;
    let current = state.alias(alias).ok_or_else(|| PlanError::UnknownAlias {
        location: location.key("alias"),
        alias: alias.to_owned(),
        known: state.alias_names(),
    })?;
    write::validate_output(&spec, state, alias)?;
    let mut meta = write::alias_metadata(state, alias, plan_sha256);
    meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    meta.insert(write::VERSION_KEY.to_owned(), env!("CARGO_PKG_VERSION").to_owned());
    let sidecars = write::alias_sidecars(state, alias, &spec);
    let (threads, notice) = worker_threads(
        options.threads,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let tensors: Vec<(&str, &crate::value::Tensor)> = current.iter().collect();
    let reads = ReadContext::cancellable(options.cancel.clone());
    let written = write::write_tensors(
        &spec,
        &tensors,
        &meta,
        &sidecars,
        WriteOptions {
            threads,
            reads: &reads,
            progress: options.progress.as_deref(),
            release: false,
        },
    )?;
    let mut seen = std::collections::HashSet::new();
    let materialized = tensors
        .iter()
        .fold(0usize, |sum, (_, t)| sum.saturating_add(t.materialized(&mut seen)));
    let summaries: Vec<TensorSummary> = tensors
        .iter()
        .map(|(name, t)| TensorSummary {
            name: (*name).to_owned(),
            dtype: t.dtype.name().to_owned(),
            shape: t.shape.clone(),
            nbytes: t.nbytes() as u64,
        })
        .collect();
    let total_bytes = summaries.iter().fold(0u64, |sum, t| sum.saturating_add(t.nbytes));
    Ok(Report {
        notes: vec![format!(
            "save: {} tensor{} → {} ({} file{})",
            summaries.len(),
            if summaries.len() == 1 { "" } else { "s" },
            spec.path.display(),
            written.len(),
            if written.len() == 1 { "" } else { "s" },
        )],
        notices: notice.into_iter().collect(),
        alias: Some(alias.to_owned()),
        tensors: summaries,
        total_bytes,
        written,
        bytes_read: reads.bytes_read(),
        materialized_bytes: materialized as u64,
        peak_memory_estimate: (threads as u64)
            .saturating_mul(3 * CHUNK_BYTES as u64)
            .saturating_add(materialized as u64),
        ..Report::default()
    })
}

/// The space of the files `save` steps write, one need per path and format: a path saved again
/// in the same format is replaced atomically, so while a save writes it the previous save's
/// file still exists, and the most it holds at once is the largest sum of two consecutive saves
/// (the one save's size when it is saved once). Saves of other formats into one folder leave
/// each other's files, so they are summed.
fn save_needs<F: PartialEq>(saves: impl Iterator<Item = (F, SpaceNeed)>) -> Vec<SpaceNeed> {
    let mut needs: Vec<(F, SpaceNeed, u64)> = Vec::new();
    for (format, save) in saves {
        match needs
            .iter_mut()
            .find(|(f, need, _)| need.path == save.path && *f == format)
        {
            Some((_, need, last)) => {
                need.bytes = need.bytes.max(last.saturating_add(save.bytes));
                *last = save.bytes;
            }
            None => {
                let last = save.bytes;
                needs.push((format, save, last));
            }
        }
    }
    needs.into_iter().map(|(_, need, _)| need).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::FormatError;
    use crate::plan::PlanSource;
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_path_saved_again_needs_its_largest_two_consecutive_saves() {
        let need = |path: &str, bytes| SpaceNeed {
            role: "save",
            path: PathBuf::from(path),
            bytes,
        };
        let saves = [
            need("/a", 10),
            need("/b", 7),
            need("/a", 5),
            need("/a", 20),
            need("/a", 1),
        ];
        // /a holds 10, then 10 + 5 while the second save writes, 5 + 20, 20 + 1.
        assert_eq!(
            save_needs(saves.into_iter().map(|s| (0, s))),
            vec![need("/a", 25), need("/b", 7)]
        );
        assert_eq!(save_needs([(0, need("/a", 3))].into_iter()), vec![need("/a", 3)]);
        // Another format into the same folder stays beside the first: summed.
        let mixed = [(0, need("/d", 10)), (1, need("/d", 10)), (0, need("/d", 10))];
        let total: u64 = save_needs(mixed.into_iter()).iter().map(|n| n.bytes).sum();
        assert_eq!(total, 30);
    }

    fn write_input(dir: &std::path::Path) -> PathBuf {
        let a = f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
        let b = f32_bytes(&[1.0, -2.0, 3.5]);
        let ids: Vec<u8> = (0..4i64).flat_map(|v| v.to_le_bytes()).collect();
        let tensors = vec![
            ("layers.0.w", TensorView::new(Dtype::F32, vec![3, 4], &a).unwrap()),
            ("layers.0.b", TensorView::new(Dtype::F32, vec![3], &b).unwrap()),
            ("ids", TensorView::new(Dtype::I64, vec![4], &ids).unwrap()),
        ];
        let path = dir.join("in.safetensors");
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_owned(),
            "pt".to_owned(),
        )]));
        safetensors::serialize_to_file(tensors, metadata, &path).unwrap();
        path
    }

    fn run_yaml(yaml: &str, threads: usize) -> Result<Report, Error> {
        let plan = Plan::load(&[PlanSource::Text(yaml.to_owned())], &[])?;
        Prepared::new(plan, threads)?.run(&RunOptions::default())
    }

    fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_huge_thread_count_does_not_overflow_the_memory_estimate() {
        // threads × 3 chunks overflowed (a panic under overflow checks, a wrapped number
        // without); the count is clamped to 4 per core first, and the product saturates.
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let yaml = format!("inputs: ['{}']\n", input.display());
        let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
        let report = Prepared::new(plan, usize::MAX).unwrap().check().unwrap();
        assert!(report.peak_memory_estimate > 0 && report.peak_memory_estimate < u64::MAX);
    }

    #[test]
    fn the_report_counts_the_tensor_bytes_read_from_the_inputs() {
        // Inputs hold 12 + 3 f32 and 4 i64: 92 bytes. The write reads each once; an assertion
        // over every tensor once more; a check reads none.
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let out = dir.path().join("out.safetensors");
        let plan = |transforms: &str| {
            format!(
                "inputs: ['{}']\ntransforms: [{transforms}]\noutput: {{path: '{}', overwrite: true}}\n",
                input.display(),
                out.display()
            )
        };
        assert_eq!(run_yaml(&plan(""), 2).unwrap().bytes_read, 92);
        assert_eq!(run_yaml(&plan("{assert: {finite: '.*'}}"), 2).unwrap().bytes_read, 184);
        let checked = Plan::load(&[PlanSource::Text(plan("{assert: {finite: '.*'}}"))], &[]).unwrap();
        assert_eq!(Prepared::new(checked, 1).unwrap().check().unwrap().bytes_read, 0);
    }

    fn check_yaml(yaml: &str) -> Report {
        let plan = Plan::load(&[PlanSource::Text(yaml.to_owned())], &[]).unwrap();
        Prepared::new(plan, 2).unwrap().check().unwrap()
    }

    /// Each file a report lists, with its size on disk now.
    fn sizes_on_disk(files: &[PathBuf]) -> Vec<(PathBuf, u64)> {
        files
            .iter()
            .map(|p| (p.clone(), std::fs::metadata(p).unwrap().len()))
            .collect()
    }

    #[test]
    fn the_check_estimates_the_bytes_a_run_reads() {
        // Plans that read each input byte at most once: the check's estimate is the run's count.
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let out = dir.path().join("out.safetensors");
        let plans = [
            ("copy through", ""),
            ("copy", "{copy: {from: 'layers.0.w', to: 'copy.w'}}"),
            ("rename", "{move: {from: 'layers\\.0\\.(.*)', to: 'l0.\\1'}}"),
            ("cast", "{cast_: {target: '.*', dtype: float16, only: float}}"),
            ("row slice", "{copy: {from: 'layers.0.w::[1:3]', to: rows}}"),
            ("column slice", "{copy: {from: 'layers.0.w::[:, 1:3]', to: cols}}"),
            (
                "concat",
                "{concat: {from: ['layers.0.w', 'layers.0.w::[:1]'], to: cat, dim: 0}}",
            ),
            ("permute", "{permute: {from: 'layers.0.w', to: wt, order: [1, 0]}}"),
            ("scale_", "{scale_: {target: 'layers.0.b', by: 2}}"),
            (
                "scale_ of a slice",
                "{scale_: {target: 'layers.0.w::[1:, ::2]', by: 2}}",
            ),
            (
                "cast then slice",
                "{cast: {from: 'layers.0.w', to: h, dtype: float16}}, {copy: {from: 'h::[2]', to: h2}}",
            ),
            ("assertion", "{assert: {finite: 'layers.*'}}"),
            ("equal", "{assert: {equal: {left: 'layers.0.b', right: 'layers.0.b'}}}"),
            ("dump stat", "{dump: {target: 'ids', verbosity: stat}}"),
        ];
        for (what, transforms) in plans {
            let yaml = format!(
                "inputs: ['{}']\ntransforms: [{transforms}]\noutput: {{path: '{}', overwrite: true}}\n",
                input.display(),
                out.display()
            );
            let checked = check_yaml(&yaml);
            let ran = run_yaml(&yaml, 2).unwrap();
            assert!(ran.bytes_read > 0, "{what}");
            assert_eq!(checked.bytes_to_read, ran.bytes_read, "{what}");
        }
    }

    #[test]
    fn the_check_lists_the_files_a_run_writes_with_their_exact_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        std::fs::create_dir(&ck).unwrap();
        write_input(&ck);
        std::fs::write(ck.join("config.json"), b"{\"model_type\": \"tiny\"}").unwrap();
        let outputs = [
            "{path: out.safetensors}",
            "{path: out.pt}",
            "{path: out.npz}",
            "{path: sharded, shard: 40}",
            "{path: pt_dir, format: torch, shard: 40}",
            "{path: single_dir}",
            "{path: no_sidecars, sidecars: false}",
        ];
        for output in outputs {
            // Relative output paths resolve against the working directory: made absolute.
            let output = output.replace("{path: ", &format!("{{path: {}/", dir.path().display()));
            let yaml = format!("inputs: ['{}']\noutput: {output}\n", ck.display());
            let checked = check_yaml(&yaml);
            assert!(checked.written.is_empty(), "{output}");
            let ran = run_yaml(&yaml, 2).unwrap();
            let on_disk = sizes_on_disk(&ran.written);
            assert_eq!(checked.output_files, on_disk, "{output}");
            assert_eq!(ran.output_files, on_disk, "{output}");
            let total: u64 = on_disk.iter().map(|(_, len)| len).sum();
            assert_eq!(checked.bytes_to_write, total, "{output}");
            let fs = &checked.filesystems;
            assert_eq!(fs.len(), 1, "{output}: {fs:?}");
            assert_eq!((fs[0].roles.as_slice(), fs[0].needed), (&["output"][..], total));
            assert!(fs[0].available.is_some_and(|free| free >= total), "{fs:?}");
        }
        // Sharded with the config copied: the listing says so.
        let sharded = dir.path().join("sharded");
        let names: Vec<String> = std::fs::read_dir(&sharded)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.contains(&"config.json".to_owned()) && names.len() > 3,
            "{names:?}"
        );
        // A bare .npy of one tensor.
        let yaml = format!(
            "inputs: ['{}']\ntransforms: [{{delete: {{target: 'layers.*'}}}}]\noutput: {}\n",
            ck.display(),
            dir.path().join("ids.npy").display()
        );
        let checked = check_yaml(&yaml);
        let ran = run_yaml(&yaml, 1).unwrap();
        assert_eq!(checked.output_files, sizes_on_disk(&ran.written));
        // Without an output: nothing to write, still bytes to read for the assertion.
        let yaml = format!(
            "inputs: ['{}']\ntransforms: [{{assert: {{finite: ids}}}}]\n",
            ck.display()
        );
        let checked = check_yaml(&yaml);
        assert_eq!((checked.bytes_to_write, checked.bytes_to_read), (0, 32));
        assert!(checked.output_files.is_empty() && checked.filesystems.is_empty());
    }

    /// A small tmpfs mounted on a fresh directory, unmounted when dropped.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        /// `None` where it cannot be mounted (not root, no tmpfs, no `mount`).
        fn mount(size: &str) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().ok()?;
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            mounted.then_some(Tmpfs(dir))
        }

        fn path(&self) -> &std::path::Path {
            self.0.path()
        }

        fn listing(&self) -> Vec<std::ffi::OsString> {
            std::fs::read_dir(self.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.path()).status();
        }
    }

    #[test]
    fn a_full_filesystem_refuses_the_run_before_it_starts_or_fails_it_leaving_nothing() {
        let Some(tmpfs) = Tmpfs::mount("1m") else {
            eprintln!("skipped: a tmpfs cannot be mounted here");
            return;
        };
        // 2 MiB of f32 in, on another filesystem.
        let dir = tempfile::tempdir().unwrap();
        let big = f32_bytes(&vec![1.5; 512 * 1024]);
        let input = dir.path().join("big.safetensors");
        safetensors::serialize_to_file(
            vec![("w", TensorView::new(Dtype::F32, vec![512, 1024], &big).unwrap())],
            None,
            &input,
        )
        .unwrap();
        let before = std::fs::read(&input).unwrap();
        for output in ["out.safetensors", "out.pt", "nested/model"] {
            let target = tmpfs.path().join(output);
            let yaml = format!(
                "inputs: ['{}']\noutput: {{path: '{}', shard: 1MB}}\n",
                input.display(),
                target.display()
            );
            let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
            let prepared = Prepared::new(plan, 2).unwrap();
            let checked = prepared.check().unwrap();
            assert!(checked.filesystems[0].is_short(), "{:?}", checked.filesystems);

            let err = prepared.run(&RunOptions::default()).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = crate::error::error_chain(&err);
            assert!(
                matches!(&err, Error::Format(FormatError::NoSpace { needed, .. }) if *needed == checked.bytes_to_write),
                "{text}"
            );
            assert!(
                text.contains(&target.display().to_string()) && text.contains("free"),
                "{text}"
            );
            assert!(tmpfs.listing().is_empty(), "{output}: {:?}", tmpfs.listing());

            let options = RunOptions {
                skip_space_check: true,
                ..RunOptions::default()
            };
            let err = prepared.run(&options).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = crate::error::error_chain(&err);
            assert!(text.contains("the disk is full"), "{text}");
            assert!(text.contains(&tmpfs.path().display().to_string()), "{text}");
            assert!(tmpfs.listing().is_empty(), "{output}: {:?}", tmpfs.listing());
        }
        // The input is untouched.
        assert!(std::fs::read(&input).unwrap() == before);
    }

    #[test]
    fn plan_runs_end_to_end_and_output_reads_with_the_official_crate() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let out = dir.path().join("out.safetensors");
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n  - move: {{from: 'layers\\.(\\d+)\\.(.*)', to: 'blocks.\\1.\\2'}}\n  - scale_: {{target: 'blocks\\.0\\.w::[1:, ::2]', by: 10}}\n  - cast: {{from: ids, to: ids32, dtype: int32}}\n  - assert: {{equal: {{left: 'blocks.0.b', right: 'blocks.0.b'}}}}\noutput: '{}'\n",
            input.display(),
            out.display()
        );
        let report = run_yaml(&yaml, 2).unwrap();
        assert_eq!(report.written, vec![out.clone()]);
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        assert_eq!(names.len(), 4);
        let mut w: Vec<f32> = (0..12).map(|i| i as f32).collect();
        for r in 1..3 {
            for c in [0, 2] {
                w[r * 4 + c] *= 10.0;
            }
        }
        assert_eq!(floats(&st, "blocks.0.w"), w);
        assert_eq!(floats(&st, "blocks.0.b"), vec![1.0, -2.0, 3.5]);
        let ids32 = st.tensor("ids32").unwrap();
        assert_eq!(ids32.dtype(), Dtype::I32);
        assert_eq!(ids32.data(), &[0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta[write::PLAN_KEY].len(), 64);
    }

    #[test]
    fn output_is_identical_for_any_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let mut outputs = Vec::new();
        // The same plan for every thread count.
        let out = dir.path().join("out.safetensors");
        for threads in [1, 2, 3] {
            let yaml = format!(
                "inputs: ['{}']\ntransforms:\n  - cast_: {{target: '.*', dtype: bf16, only: float}}\noutput: '{}'\n",
                input.display(),
                out.display()
            );
            run_yaml(&yaml, threads).unwrap();
            outputs.push(std::fs::read(&out).unwrap());
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn failing_assertion_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let out = dir.path().join("out");
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n  - scale_: {{target: 'layers.0.b', by: 2}}\n  - assert: {{iszero: 'layers.0.b'}}\noutput: '{}'\n",
            input.display(),
            out.display()
        );
        let err = run_yaml(&yaml, 1).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("transforms[1]"), "{err}");
        assert!(!out.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn check_reads_no_tensor_data() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        // Keep the header, destroy the data: a check still passes, a run reads the garbage.
        let mut bytes = std::fs::read(&input).unwrap();
        let n = bytes.len();
        bytes[n - 40..].fill(0xff);
        std::fs::write(&input, bytes).unwrap();
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n  - assert: {{finite: 'layers.*'}}\n",
            input.display()
        );
        let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
        let prepared = Prepared::new(plan, 1).unwrap();
        let report = prepared.check().unwrap();
        assert!(report.notes[0].contains("checked when the plan runs"));
        let err = prepared.run(&RunOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Assertion { .. }), "{err}");
    }

    #[test]
    fn a_thousand_edits_of_one_tensor_stream_without_overflowing() {
        // Every in-place edit nests the value one level deeper.
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let out = dir.path().join("out.safetensors");
        let edits = "  - scale_: {target: 'layers.0.w::[0]', by: 1.0}\n".repeat(1000);
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n{edits}output: '{}'\n",
            input.display(),
            out.display()
        );
        let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
        let prepared = Prepared::new(plan, 2).unwrap();
        // Run on a thread with the engine's stack, as the bindings do.
        std::thread::Builder::new()
            .stack_size(crate::value::ENGINE_STACK_BYTES)
            .spawn(move || prepared.run(&RunOptions::default()).unwrap())
            .unwrap()
            .join()
            .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(floats(&st, "layers.0.w"), (0..12).map(|i| i as f32).collect::<Vec<_>>());
    }

    /// Issue 9 item 11a: the thread count was unbounded.
    #[test]
    fn thread_counts_are_clamped_to_four_per_core() {
        assert_eq!(worker_threads(0, 8), (8, None));
        assert_eq!(worker_threads(32, 8), (32, None));
        let (threads, notice) = worker_threads(100_000, 2);
        assert_eq!(threads, 8);
        assert_eq!(
            notice.as_deref(),
            Some("100000 threads requested, more than 4 per core on 2 cores; using 8")
        );
        assert_eq!(worker_threads(usize::MAX, usize::MAX).0, usize::MAX);
        assert_eq!(worker_threads(3, 0), (3, None));
    }

    #[test]
    fn output_metadata_has_a_format_and_falls_back_to_the_first_input() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![0u8; 8];
        let path = dir.path().join("bare.safetensors");
        safetensors::serialize_to_file(
            vec![("w", TensorView::new(Dtype::F32, vec![2], &a).unwrap())],
            None,
            &path,
        )
        .unwrap();
        let out = dir.path().join("o.safetensors");
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n  - copy: {{from: w, to: 'new::w'}}\noutput: {{path: '{}', alias: new}}\n",
            path.display(),
            out.display()
        );
        run_yaml(&yaml, 1).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], "pt");
        assert!(meta.contains_key(write::VERSION_KEY));
    }

    #[test]
    fn a_symlinked_input_is_not_overwritten_by_a_directory_output() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let snapshot = dir.path().join("snapshot");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snapshot).unwrap();
        let real = write_input(&blobs);
        std::os::unix::fs::symlink(&real, snapshot.join("model.safetensors")).unwrap();
        let yaml = format!(
            "inputs: ['{}']\noutput: '{}'\n",
            snapshot.join("model.safetensors").display(),
            snapshot.display()
        );
        let err = run_yaml(&yaml, 1).unwrap_err();
        assert!(err.to_string().contains("would overwrite input"), "{err}");
        assert!(snapshot.join("model.safetensors").is_symlink());
    }

    #[test]
    fn input_notices_reach_the_report_once() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        std::fs::create_dir(&ck).unwrap();
        write_input(&ck);
        std::fs::write(ck.join("optimizer.pt"), b"never read").unwrap();
        let out = dir.path().join("o.safetensors");
        let yaml = format!("inputs: ['{}']\noutput: '{}'\n", ck.display(), out.display());
        let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
        let prepared = Prepared::new(plan, 1).unwrap();
        for report in [prepared.check().unwrap(), prepared.run(&RunOptions::default()).unwrap()] {
            assert_eq!(report.notices.len(), 1, "{:?}", report.notices);
            assert!(report.notices[0].contains("optimizer.pt"), "{:?}", report.notices);
        }
    }

    #[test]
    fn save_writes_tensors_held_in_memory_like_a_plan_output() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let ran = dir.path().join("ran.safetensors");
        run_yaml(
            &format!("inputs: ['{}']\noutput: '{}'\n", input.display(), ran.display()),
            1,
        )
        .unwrap();
        // The same tensors, in memory, with the run's metadata: the same bytes.
        let bytes = std::fs::read(&ran).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata: std::collections::BTreeMap<String, String> =
            header.metadata().clone().unwrap().into_iter().collect();
        let mut state = State::default();
        // In the run output's order (by data offset).
        let mut names = st.names();
        names.sort_by_key(|n| st.tensor(n).unwrap().data().as_ptr() as usize);
        for name in names {
            let view = st.tensor(name).unwrap();
            let dtype = crate::dtype::DType::from_safetensors_name(&format!("{:?}", view.dtype())).unwrap();
            let tensor = crate::value::Tensor::in_memory(dtype, view.shape().to_vec(), Arc::new(view.data().to_vec()));
            state.insert("model", name, tensor);
        }
        let saved = dir.path().join("saved.safetensors");
        let output = serde_json::json!({"path": saved.display().to_string()});
        let report = save(&output, &state, "model", &metadata, None, &RunOptions::default()).unwrap();
        assert_eq!(std::fs::read(&saved).unwrap(), bytes);
        assert_eq!(report.written, vec![saved.clone()]);
        assert_eq!(report.tensors.len(), 3);
        assert_eq!(report.total_bytes, 48 + 12 + 32);
        // A dtype the format cannot hold, or a bad output value: refused, nothing written.
        let npz = dir.path().join("x.npz");
        state.insert(
            "model",
            "bf",
            crate::value::Tensor::in_memory(crate::dtype::DType::BF16, vec![1], Arc::new(vec![0u8; 2])),
        );
        let err = save(
            &serde_json::json!(npz.display().to_string()),
            &state,
            "model",
            &Default::default(),
            None,
            &RunOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bfloat16"), "{err}");
        assert!(!npz.exists());
        let err = save(
            &serde_json::json!({"format": "npz"}),
            &state,
            "model",
            &Default::default(),
            None,
            &RunOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Plan(_)), "{err}");
    }

    #[test]
    fn output_alias_must_be_chosen_with_several_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path());
        let yaml = format!(
            "inputs: ['a::{0}', 'b::{0}']\noutput: '{1}'\n",
            input.display(),
            dir.path().join("o.safetensors").display()
        );
        let err = run_yaml(&yaml, 1).unwrap_err();
        assert!(err.to_string().contains("set output.alias"), "{err}");
    }
}
