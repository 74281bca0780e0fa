//! Execution (SPEC §8): open the inputs' headers, run the transforms symbolically over lazy
//! values (the plan check), run them again evaluating value assertions, then stream the chosen
//! alias into its output in parallel. Nothing reads tensor bytes before the check has passed.

pub mod state;
pub mod write;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::Error;
use crate::formats::open_checkpoint;
use crate::plan::{Location, OutputSpec, Plan, PlanError};
use crate::transforms::{self, Context, Flow, StepError, Transform};
use crate::value::CHUNK_BYTES;
use state::State;

/// Called with (bytes written, total bytes) while the output is written.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// How to run a plan.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Worker threads for writing (0: one per core).
    pub threads: usize,
    /// Set by Ctrl-C; checked between chunks.
    pub cancel: Arc<AtomicBool>,
    /// Progress callback.
    pub progress: Option<Arc<ProgressFn>>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions").field("threads", &self.threads).finish_non_exhaustive()
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
    /// The alias written (or that would be written).
    pub alias: Option<String>,
    /// The output tensors in order.
    pub tensors: Vec<TensorSummary>,
    /// Total bytes of the output tensors.
    pub total_bytes: u64,
    /// Files written (empty for a check).
    pub written: Vec<PathBuf>,
    /// Estimated peak bytes of buffers the run allocates.
    pub peak_memory_estimate: u64,
    /// Input tensor names no longer present in the output alias.
    pub removed: usize,
    /// Output tensor names not present in the alias's input.
    pub added: usize,
}

/// A parsed, loaded plan ready to check or run.
#[derive(Debug)]
pub struct Prepared {
    plan: Plan,
    steps: Vec<Box<dyn Transform>>,
    initial: State,
    threads: usize,
}

fn step_error(index: usize, name: &str, error: StepError) -> Error {
    match error {
        StepError::Plan(e) => Error::Plan(e),
        StepError::Format(e) => Error::Format(e),
        StepError::Transform(source) => Error::Transform { index, name: name.to_owned(), source },
        StepError::Assertion(failure) => Error::Assertion { index, failure },
        StepError::Cancelled => Error::Cancelled,
    }
}

impl Prepared {
    /// Parses every transform and opens every input's headers.
    pub fn new(plan: Plan, threads: usize) -> Result<Prepared, Error> {
        let steps = plan.transforms.iter().map(transforms::parse).collect::<Result<Vec<_>, _>>()?;
        let mut initial = State::default();
        for input in &plan.inputs {
            let checkpoint = open_checkpoint(&input.path)?;
            initial.add_checkpoint(&input.alias, &checkpoint);
        }
        initial.written.clear();
        initial.default_alias = match (&plan.output, plan.inputs.as_slice()) {
            (Some(OutputSpec { alias: Some(alias), .. }), _) => Some(alias.clone()),
            (_, [only]) => Some(only.alias.clone()),
            _ => None,
        };
        if let Some(OutputSpec { alias: Some(alias), .. }) = &plan.output {
            if initial.alias(alias).is_none() && !plan.transforms.is_empty() {
                // It may be created by the transforms; checked again when choosing the output.
            } else if initial.alias(alias).is_none() {
                return Err(PlanError::UnknownAlias {
                    location: Location::root().key("output").key("alias"),
                    alias: alias.clone(),
                    known: initial.alias_names(),
                }
                .into());
            }
        }
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        Ok(Prepared { plan, steps, initial, threads })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn execute(&self, ctx: &mut Context) -> Result<State, Error> {
        let mut state = self.initial.clone();
        for (index, (step, raw)) in self.steps.iter().zip(&self.plan.transforms).enumerate() {
            if ctx.cancelled() {
                return Err(Error::Cancelled);
            }
            match step.apply(&mut state, ctx) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => break,
                Err(e) => return Err(step_error(index, &raw.name, e)),
            }
        }
        Ok(state)
    }

    /// The alias the output holds (SPEC §6.3).
    fn output_alias(&self, state: &State) -> Result<Option<String>, Error> {
        let Some(output) = &self.plan.output else { return Ok(None) };
        let location = Location::root().key("output");
        if let Some(alias) = &output.alias {
            return match state.alias(alias) {
                Some(_) => Ok(Some(alias.clone())),
                None => Err(PlanError::UnknownAlias { location: location.key("alias"), alias: alias.clone(), known: state.alias_names() }.into()),
            };
        }
        if let [only] = self.plan.inputs.as_slice() {
            return Ok(Some(only.alias.clone()));
        }
        let written: Vec<&String> = state.written.iter().collect();
        match written.as_slice() {
            [one] => Ok(Some((*one).clone())),
            _ => {
                let candidates = if written.is_empty() { state.alias_names() } else { written.iter().map(|s| s.to_string()).collect() };
                Err(PlanError::invalid(
                    &location,
                    format!("cannot tell which alias to write; set output.alias to one of: {}", candidates.join(", ")),
                )
                .into())
            }
        }
    }

    fn report(&self, state: &State, ctx: Context) -> Result<Report, Error> {
        let mut report = Report { notes: ctx.notes, ..Report::default() };
        report.alias = self.output_alias(state)?;
        if let Some(alias) = &report.alias {
            let current = state.alias(alias).expect("output alias exists");
            for (name, tensor) in current.iter() {
                report.tensors.push(TensorSummary {
                    name: name.to_owned(),
                    dtype: tensor.dtype.name().to_owned(),
                    shape: tensor.shape.clone(),
                    nbytes: tensor.nbytes() as u64,
                });
            }
            report.total_bytes = report.tensors.iter().map(|t| t.nbytes).sum();
            if let Some(initial) = self.initial.alias(alias) {
                report.removed = initial.iter().filter(|(n, _)| !current.contains(n)).count();
                report.added = current.iter().filter(|(n, _)| !initial.contains(n)).count();
            } else {
                report.added = current.len();
            }
        }
        // Each writing thread holds a chunk buffer plus, for computed values, one temporary per
        // level of the value's description (two suffice for every transform of this version).
        report.peak_memory_estimate = (self.threads * 3 * CHUNK_BYTES) as u64;
        Ok(report)
    }

    /// The header-only plan check (SPEC §8.1): every transform runs symbolically, value
    /// assertions are deferred, and the output header is computed. No tensor byte is read.
    pub fn check(&self) -> Result<Report, Error> {
        let mut ctx = Context::new(false, Arc::new(AtomicBool::new(false)));
        let state = self.execute(&mut ctx)?;
        let report = self.report(&state, ctx)?;
        if let (Some(output), Some(alias)) = (&self.plan.output, &report.alias) {
            write::validate_output(output, &state, alias, &self.plan)?;
        }
        Ok(report)
    }

    /// Checks, then runs the plan for real and writes the output.
    pub fn run(&self, options: &RunOptions) -> Result<Report, Error> {
        self.check()?;
        let mut ctx = Context::new(true, options.cancel.clone());
        let state = self.execute(&mut ctx)?;
        let mut report = self.report(&state, ctx)?;
        if let (Some(output), Some(alias)) = (&self.plan.output, report.alias.clone()) {
            report.written = write::write_output(output, &state, &alias, &self.plan, self.threads, options)?;
        }
        Ok(report)
    }
}
