//! A live plan run that takes more transforms one block at a time: the prompt (`brainsurgery -i`)
//! drives it. A block (one transform, or a list of them) is first checked symbolically on a copy
//! of the state, then applied for real on another copy, and only a block that succeeds entirely
//! replaces the state, so a failing block leaves the session exactly as it was before it.
//! Reading lines, completion and printing are the prompt's business.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::{step_error, Prepared, Report, RunOptions};
use crate::error::Error;
use crate::memory::{Memory, MemoryOptions};
use crate::plan::{paths, plan_sha256, Location, PlanError, RawTransform};
use crate::state::State;
use crate::transforms::{run_steps, sha256_with_nested, Context, Flow, ParseScope, Step};
use crate::value::{ReadContext, Tensor};
use crate::write;

/// What one applied block printed and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Text the transforms printed (`dump`, `diff`, `help`).
    pub output: Vec<String>,
    /// One line per transform describing what it did.
    pub notes: Vec<String>,
    /// Notices about how inputs were read (the plan's inputs, `load`).
    pub notices: Vec<String>,
    /// Files the block wrote (`save`).
    pub written: Vec<std::path::PathBuf>,
    /// Whether the block ran `exit`, which ends the session.
    pub exit: bool,
    /// Tensors factorized, with what each kept.
    pub factorizations: Vec<crate::transforms::lowrank::Factorization>,
    /// Bytes of tensor data the block read from input files (`save`, value assertions).
    pub bytes_read: u64,
}

/// A plan whose transforms have run, ready to take more.
#[derive(Debug)]
pub struct Session {
    prepared: Prepared,
    state: State,
    cancel: Arc<AtomicBool>,
    /// The plan's files, for finding `execute` cycles in what is typed at the prompt.
    scope: ParseScope,
    /// Index the next transform gets in messages (`transforms[i]`), after the plan's.
    next: usize,
    /// Transforms run so far, nested ones included: the session's state carries all of them,
    /// so the limit on one run holds across entries.
    steps_run: usize,
    /// Every factorization of the session, for the final report.
    factorizations: Vec<crate::transforms::lowrank::Factorization>,
    /// Bytes of tensor data read from input files by every block applied, for the final report.
    bytes_read: u64,
    /// The memory budget and arena every block reads within.
    memory: Arc<Memory>,
    /// The plan applied so far, as data: the inputs (absolute paths, so it replays from any
    /// folder) and every transform, in order. What `Session.plan` exports in Python.
    document: Value,
    /// Hashes of the nested plans (`execute`) of the steps applied, in order: part of the plan
    /// hash as [`crate::transforms::plan_sha256_with_nested`] makes it.
    nested: Vec<String>,
    /// Tensors handed in from the host (`set`), by `alias::name`: a plan cannot replay them.
    handed_in: Vec<String>,
}

impl Session {
    /// Checks and runs the plan's transforms (without writing the output) and returns the
    /// session with what they printed.
    pub fn start(
        prepared: Prepared,
        cancel: Arc<AtomicBool>,
        memory: &MemoryOptions,
    ) -> Result<(Session, Applied), Error> {
        let memory = prepared.memory(memory);
        let context = |evaluate: bool| {
            let mut ctx = Context::new(evaluate, cancel.clone());
            ctx.reads = ReadContext::for_run(cancel.clone(), memory.clone());
            ctx
        };
        let mut check = context(false);
        prepared.execute(&mut check)?;
        prepared.fits_budget(&check)?;
        let mut ctx = context(true);
        let state = prepared.execute(&mut ctx)?;
        let next = prepared.plan.transforms.len();
        let scope = ParseScope::of_plan(&prepared.plan.files);
        let steps_run = ctx.steps_run;
        let document = document_of(&prepared);
        let nested = prepared
            .steps
            .iter()
            .filter_map(|s| s.transform.nested_sha256().map(str::to_owned))
            .collect();
        let applied = Applied {
            output: ctx.output,
            notes: ctx.notes,
            notices: ctx.notices,
            written: ctx.written,
            exit: false,
            bytes_read: ctx.reads.bytes_read(),
            factorizations: ctx.factorizations,
        };
        Ok((
            Session {
                prepared,
                state,
                cancel,
                scope,
                next,
                steps_run,
                factorizations: applied.factorizations.clone(),
                bytes_read: applied.bytes_read,
                memory,
                document,
                nested,
                handed_in: Vec::new(),
            },
            applied,
        ))
    }

    /// A context reading within the session's memory budget.
    fn context(&self, evaluate: bool) -> Context {
        let mut ctx = Context::new(evaluate, self.cancel.clone());
        ctx.reads = ReadContext::for_run(self.cancel.clone(), self.memory.clone());
        ctx
    }

    /// The session's memory budget and arena.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// The current state (for completion: aliases and tensor names).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Applies one block: a transform (`{scale_: {…}}` or a bare name) or a list of them. On any
    /// error the state is left as it was before the block. An interruption is reported as
    /// [`Error::Cancelled`] and clears the cancel flag, so the session can go on.
    pub fn apply(&mut self, block: &Value) -> Result<Applied, Error> {
        let items: Vec<&Value> = match block {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        let base = Location::root().key("transforms");
        let raws = items
            .iter()
            .enumerate()
            .map(|(i, item)| RawTransform::from_value(item, base.index(self.next + i)))
            .collect::<Result<Vec<_>, _>>()?;
        let steps = raws
            .iter()
            .map(|raw| Step::parse(raw, &self.scope))
            .collect::<Result<Vec<_>, _>>()?;
        // `save` records the hash of the plan that replays the session up to and including this
        // block (the document `Session.plan` exports then), so replaying it writes the same bytes.
        // Not with tensors handed in: no plan replays those.
        let mut nested = self.nested.clone();
        nested.extend(
            steps
                .iter()
                .filter_map(|s| s.transform.nested_sha256().map(str::to_owned)),
        );
        let mut document = self.document.clone();
        if let Some(Value::Array(transforms)) = document.get_mut("transforms") {
            // Typed at the prompt or handed in from Python: relative to the working directory.
            let base = paths::working_directory();
            transforms.extend(items.iter().map(|item| {
                let mut item = (*item).clone();
                paths::rebase_transform(&mut item, base.as_deref());
                item
            }));
        }
        let plan_sha256 = self.handed_in.is_empty().then(|| document_sha256(&document, &nested));
        let run = |evaluate: bool| -> Result<(State, Context, bool), Error> {
            let mut state = self.state.clone();
            let mut ctx = self.context(evaluate);
            // `save` at the prompt writes with the run's threads.
            ctx.threads = self.prepared.threads;
            ctx.plan_sha256 = plan_sha256.clone();
            ctx.steps_run = self.steps_run;
            let flow = run_steps(&steps, &mut state, &mut ctx).map_err(|f| step_error(self.next, &steps, f))?;
            Ok((state, ctx, flow == Flow::Exit))
        };
        let result = run(false).and_then(|_| run(true));
        let (state, ctx, exit) = result.inspect_err(|e| {
            if matches!(e, Error::Cancelled) {
                self.cancel.store(false, Ordering::Relaxed);
            }
        })?;
        self.state = state;
        self.steps_run = ctx.steps_run;
        self.next += raws.len();
        self.document = document;
        self.nested = nested;
        self.factorizations.extend(ctx.factorizations.iter().cloned());
        self.bytes_read = self.bytes_read.saturating_add(ctx.reads.bytes_read());
        Ok(Applied {
            output: ctx.output,
            notes: ctx.notes,
            notices: ctx.notices,
            written: ctx.written,
            exit,
            bytes_read: ctx.reads.bytes_read(),
            factorizations: ctx.factorizations,
        })
    }

    /// The plan of everything applied so far (inputs and transforms), which `run` replays to the
    /// same state. Refused once a tensor was handed in from the host: no plan holds its values.
    pub fn document(&self) -> Result<&Value, Error> {
        match self.handed_in.as_slice() {
            [] => Ok(&self.document),
            names => Err(PlanError::Syntax {
                origin: "session".to_owned(),
                message: format!(
                    "the session's plan cannot replay tensors handed in from Python ({}); save them with \
                     brainsurgery.save and `load` them in the plan instead",
                    names.join(", ")
                ),
            }
            .into()),
        }
    }

    /// The folder of the plan's first file, if it came from files: what is typed at the `-i`
    /// prompt continues that plan, so its relative paths resolve there (issue 8).
    pub fn plan_folder(&self) -> Option<std::path::PathBuf> {
        self.prepared.plan.files.first().and_then(|f| paths::plan_folder(f))
    }

    /// The plan that replays the session to the same output (issue 14 item 7, `save-plan`): its
    /// [`Self::document`] with the plan's output (absolute path) added.
    pub fn replay_plan(&self) -> Result<Value, Error> {
        let mut doc = self.document()?.clone();
        if let (Some(output), Value::Object(map)) = (&self.prepared.plan.output, &mut doc) {
            map.insert("output".to_owned(), output_document(output));
        }
        Ok(doc)
    }

    /// The plan hash an output written now records: the hash of [`Self::replay_plan`] once
    /// entries were applied (so replaying the saved plan writes the same bytes), else the plan's.
    fn output_sha256(&self) -> String {
        let extended = self.next > self.prepared.plan.transforms.len();
        match self.replay_plan() {
            Ok(doc) if extended => document_sha256(&doc, &self.nested),
            _ => self.prepared.plan.sha256.clone(),
        }
    }

    /// Puts a tensor handed in from the host under `alias::name` (the alias is created if
    /// needed), replacing any tensor of that name in its place.
    pub fn set(&mut self, alias: &str, name: &str, tensor: Tensor) {
        self.state.replace(alias, name, tensor);
        let key = format!("{alias}::{name}");
        if !self.handed_in.contains(&key) {
            self.handed_in.push(key);
        }
    }

    /// The report a check of the session's current state gives for `alias` (its tensors, bytes
    /// and the memory a write of it would take), without reading tensor data.
    pub fn report_for(&self, alias: &str) -> Result<Report, Error> {
        let mut ctx = self.context(false);
        ctx.factorizations = self.factorizations.clone();
        self.prepared.report_alias(&self.state, ctx, Some(alias.to_owned()))
    }

    /// Ends the session: writes the plan's output (if it has one) from the current state and
    /// returns the report, as a run would.
    pub fn finish(mut self, options: &RunOptions) -> Result<Report, Error> {
        self.prepared.plan.sha256 = self.output_sha256();
        let prepared = &self.prepared;
        let mut ctx = self.context(false);
        ctx.factorizations = self.factorizations.clone();
        let mut report = prepared.report(&self.state, ctx)?;
        if self.state.flags.dry_run.is_some() && prepared.plan.output.is_some() {
            // As a run: `set: {dry-run: true}` still on at the end writes no output.
            report
                .notices
                .push("dry-run is on at the end of the session: the output was not written".to_owned());
        } else if let (Some(output), Some(alias)) = (&prepared.plan.output, report.alias.clone()) {
            write::validate_output(output, &self.state, &alias)?;
            // The writing threads' share of the budget, held while they write (as for a run).
            let _writers = self
                .memory
                .reserve(usize::try_from(prepared.fixed_memory(0)).unwrap_or(usize::MAX));
            let reads = ReadContext::for_run(options.cancel.clone(), self.memory.clone());
            report.written = prepared.write(&self.state, &alias, &reads, options)?;
            report.bytes_read = reads.bytes_read();
            report.arena_bytes = self.memory.arena_peak();
        }
        report.bytes_read = report.bytes_read.saturating_add(self.bytes_read);
        Ok(report)
    }
}

/// The document of a prepared plan without its output: its inputs and transforms as written,
/// with their paths made absolute (`plan::paths`; a plan file's were rebased on its folder when it
/// was read), so the exported plan replays from any folder.
fn document_of(prepared: &Prepared) -> Value {
    let base = paths::working_directory();
    let inputs = prepared
        .plan
        .inputs
        .iter()
        .map(|input| {
            let path = paths::resolve(&input.path.display().to_string(), base.as_deref());
            Value::String(format!("{}::{path}", input.alias))
        })
        .collect();
    let transforms = prepared
        .plan
        .transforms
        .iter()
        .map(|raw| {
            let mut item = match &raw.payload {
                Value::Null => Value::String(raw.name.clone()),
                payload => serde_json::json!({ raw.name.clone(): payload }),
            };
            paths::rebase_transform(&mut item, base.as_deref());
            item
        })
        .collect();
    serde_json::json!({ "inputs": Value::Array(inputs), "transforms": Value::Array(transforms) })
}

/// An output section as a plan writes it, every key explicit and the path absolute.
fn output_document(output: &crate::plan::OutputSpec) -> Value {
    let path = paths::resolve(
        &output.path.display().to_string(),
        paths::working_directory().as_deref(),
    );
    let mut map = serde_json::Map::new();
    map.insert("path".to_owned(), Value::String(path));
    let format = if output.npy {
        "npy".to_owned()
    } else {
        output.format.name().to_ascii_lowercase()
    };
    map.insert("format".to_owned(), Value::String(format));
    map.insert(
        "shard".to_owned(),
        match output.shard {
            Some(bytes) => Value::String(bytes.to_string()),
            None => Value::String("none".to_owned()),
        },
    );
    if let Some(alias) = &output.alias {
        map.insert("alias".to_owned(), Value::String(alias.clone()));
    }
    map.insert("sidecars".to_owned(), Value::Bool(output.sidecars));
    map.insert("overwrite".to_owned(), Value::Bool(output.overwrite));
    Value::Object(map)
}

/// The plan hash of a session document, as [`super::Prepared::new`] computes it for the same
/// plan run from a file.
fn document_sha256(document: &Value, nested: &[String]) -> String {
    let nested: Vec<&str> = nested.iter().map(String::as_str).collect();
    sha256_with_nested(&plan_sha256(document), &nested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Plan, PlanSource};
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    use serde_json::json;

    fn session(dir: &std::path::Path) -> Session {
        let values: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = dir.join("in.safetensors");
        let tensors = vec![("w", TensorView::new(Dtype::F32, vec![3], &values).unwrap())];
        safetensors::serialize_to_file(tensors, None, &input).unwrap();
        let yaml = format!(
            "inputs: ['{}']\ntransforms:\n  - copy: {{from: w, to: w0}}\noutput: '{}'\n",
            input.display(),
            dir.join("out.safetensors").display()
        );
        let plan = Plan::load(&[PlanSource::Text(yaml)], &[]).unwrap();
        let prepared = Prepared::new(plan, 1).unwrap();
        Session::start(prepared, Arc::new(AtomicBool::new(false)), &MemoryOptions::default())
            .unwrap()
            .0
    }

    #[test]
    fn failing_block_keeps_the_state_from_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(dir.path());
        s.apply(&json!({"scale_": {"target": "w", "by": 2}})).unwrap();
        // The second transform of the block fails: the first one must not stick either.
        let block = json!([{"copy": {"from": "w", "to": "w2"}}, {"assert": {"iszero": "w"}}]);
        let err = s.apply(&block).unwrap_err();
        assert!(err.to_string().contains("transforms[3]"), "{err}");
        assert!(s.state().get("model", "w2").is_none());
        let err = s.apply(&json!({"scael_": {}})).unwrap_err();
        assert!(err.to_string().contains("did you mean `scale_`"), "{err}");
        let applied = s.apply(&json!("exit")).unwrap();
        assert!(applied.exit);
        let report = s.finish(&RunOptions::default()).unwrap();
        let bytes = std::fs::read(&report.written[0]).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w: Vec<f32> = st
            .tensor("w")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(w, vec![2.0, 4.0, 6.0]);
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["w", "w0"]);
    }

    /// Issue 11: the session's document replays what was applied, and a save in the session
    /// writes the bytes a run of that document writes (the plan hash included).
    #[test]
    fn the_document_replays_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(dir.path());
        let first = dir.path().join("first.safetensors");
        s.apply(&json!({"scale_": {"target": "w0", "by": 3}})).unwrap();
        s.apply(&json!({"save": {"path": first.display().to_string(), "alias": "model"}}))
            .unwrap();
        let document = s.document().unwrap().clone();
        assert_eq!(document["transforms"].as_array().unwrap().len(), 3, "{document}");
        let kept = std::fs::read(&first).unwrap();
        std::fs::remove_file(&first).unwrap();
        let plan = Plan::load(&[PlanSource::Value(document)], &[]).unwrap();
        Prepared::new(plan, 1).unwrap().run(&RunOptions::default()).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), kept);
        // A tensor handed in makes the session unreplayable, and says so.
        let bytes: Vec<u8> = [5.0f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = Tensor::in_memory(crate::dtype::DType::F32, vec![1], Arc::new(bytes));
        s.set("model", "extra", tensor);
        assert!(s.state().get("model", "extra").is_some());
        let err = s.document().unwrap_err();
        assert!(err.to_string().contains("model::extra"), "{err}");
    }

    /// Issue 8: a relative `execute` path typed at the prompt resolves against the plan file's
    /// directory, not the working directory.
    #[test]
    /// Issue 14 item 3: what is typed at the prompt resolves against the working directory, as
    /// the command line does (a plan file's paths resolve against its folder).
    fn prompt_paths_resolve_against_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = dir.path().join("in.safetensors");
        let tensors = vec![("w", TensorView::new(Dtype::F32, vec![2], &values).unwrap())];
        safetensors::serialize_to_file(tensors, None, &input).unwrap();
        let plans = dir.path().join("plans");
        std::fs::create_dir(&plans).unwrap();
        std::fs::write(plans.join("inner.yaml"), "transforms:\n  - copy: {from: w, to: w2}\n").unwrap();
        let main = plans.join("main.yaml");
        std::fs::write(&main, format!("inputs: ['{}']\n", input.display())).unwrap();
        let plan = Plan::load(&[PlanSource::File(main)], &[]).unwrap();
        let prepared = Prepared::new(plan, 1).unwrap();
        let mut s = Session::start(prepared, Arc::new(AtomicBool::new(false)), &MemoryOptions::default())
            .unwrap()
            .0;
        let err = s
            .apply(&json!({"execute": {"path": "inner.yaml"}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plan file `inner.yaml` does not exist"), "{err}");
        let inner = plans.join("inner.yaml").display().to_string();
        s.apply(&json!({"execute": {"path": inner}})).unwrap();
        assert!(s.state().get("model", "w2").is_some());
    }
}
