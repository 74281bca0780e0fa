//! The `brainsurgery` command line (SPEC §10): `run` (the default), `check`, `inspect`, `diff`
//! and `help`.
//! This is the one place that prints an error chain and chooses the exit status; the Python
//! console script calls [`main`] with the arguments and exits with what it returns.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::error::{error_chain, Error};
use crate::executor::{Prepared, Report, RunOptions};
use crate::formats::open_checkpoint;
use crate::plan::document::looks_like_override;
use crate::plan::{Plan, PlanSource};
use crate::transforms::fmt_shape;
use indicatif::HumanBytes;

#[derive(Parser, Debug)]
#[command(
    name = "brainsurgery",
    version,
    about = "Declarative, reproducible surgery on neural-network checkpoints",
    // `help NAME` describes transforms (below); `help SUBCOMMAND` still shows clap's help.
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run plans: check them against the headers, then stream the output (the default command).
    Run(PlanArgs),
    /// Check plans against the checkpoint headers without reading tensor data.
    Check(PlanArgs),
    /// Print a header-level table of a checkpoint's tensors (names longer than 100 characters
    /// are shortened in the middle; `--json` prints them whole).
    Inspect {
        /// A checkpoint file or directory.
        path: PathBuf,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Compare two checkpoints: tensors missing on either side, and differing shapes, dtypes or
    /// values. Exit status 0 when they are equal, 1 when they differ.
    Diff {
        /// The left checkpoint (file or directory).
        path_a: PathBuf,
        /// The right checkpoint.
        path_b: PathBuf,
        /// Largest |a - b| still counted as equal.
        #[arg(long, default_value_t = 0.0)]
        eps: f64,
    },
    /// Run a MergeKit config (mergekit-yaml, or mergekit-moe) translated into a plan
    /// (docs/mergekit.md), or print that plan with --print-plan; the other options are run's.
    Mergekit(MergekitArgs),
    /// Describe a transform (`help scale_`), an assertion operator (`help assert equal`), every
    /// transform (`help`), or a subcommand (`help check`).
    Help {
        /// A transform, `assert OPERATOR`, or a subcommand.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Plan files (YAML or JSON), merged in order; `key.path=value` overrides; checkpoint paths
    /// (`.safetensors`/`.bin`/`.pt`/`.pth`/`.npz`/`.npy`, a directory, or `alias::path`) added to
    /// the inputs.
    #[arg(value_name = "PLAN|key=value|CHECKPOINT")]
    items: Vec<String>,
    /// A transform in one-line form, run after the plan's (repeatable):
    /// -e 'scale_: target: .*, by: 0.5'.
    #[arg(short = 'e', long = "execute", value_name = "ONE-LINE")]
    execute: Vec<String>,
    /// An input checkpoint, `alias::path` or a path (repeatable).
    #[arg(short = 'I', long = "input", value_name = "ALIAS::PATH")]
    input: Vec<String>,
    /// The output path (sets output.path).
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    output: Option<String>,
    /// After the plan's transforms, read more at a `bs> ` prompt; the output is written when the
    /// session ends (exit, save or Ctrl-D). From a pipe, a failing entry ends the run, nothing
    /// written (see --keep-going); `save-plan PATH` writes the session as a plan file.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// With -i reading a script (stdin not a terminal): report a failing entry and go on, then
    /// write the output. Without it the first failing entry ends the run, nothing written.
    #[arg(long, requires = "interactive")]
    keep_going: bool,
    /// Worker threads for writing (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Shard budget for directory outputs, e.g. 5GB or none (overrides output.shard).
    #[arg(long, value_name = "SIZE")]
    shard_size: Option<String>,
    /// Let a directory output replace weight files brainsurgery did not write (sets
    /// output.overwrite).
    #[arg(long)]
    overwrite: bool,
    /// Memory budget, e.g. 8GB (default: half of physical memory). Tensors computed whole go
    /// to the scratch arena beyond it.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Directory of the scratch arena (default: the output's folder, else the system's
    /// temporary folder).
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<std::path::PathBuf>,
    /// Print the transforms that ran.
    #[arg(long, overrides_with = "no_summarize")]
    summarize: bool,
    /// Do not print the transforms that ran.
    #[arg(long)]
    no_summarize: bool,
    /// Show a progress bar (default: when stderr is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// Never show a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Start the run even when the output's filesystem has less free space than the output
    /// needs (it may then fail when the disk fills, leaving nothing).
    #[arg(long)]
    no_space_check: bool,
}

#[derive(Args, Debug)]
struct MergekitArgs {
    /// The MergeKit config (YAML or JSON).
    #[arg(value_name = "CONFIG.yml")]
    config: PathBuf,
    /// Print the equivalent plan as YAML and exit without reading any tensor.
    #[arg(long)]
    print_plan: bool,
    #[command(flatten)]
    run: PlanArgs,
}

const SUBCOMMANDS: &[&str] = &["run", "check", "inspect", "diff", "help", "mergekit"];

/// Whether a positional argument names a checkpoint rather than a plan file.
fn looks_like_checkpoint(item: &str) -> bool {
    let path = std::path::Path::new(item);
    let by_extension = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| crate::formats::Format::of_name(&format!(".{e}")).is_some());
    by_extension || path.is_dir() || crate::plan::paths::is_remote(item) || (item.contains("::") && !path.exists())
}

/// Adds command-line inputs, output and one-line transforms to the merged document.
fn apply_options(doc: &mut serde_json::Value, inputs: &[String], args: &PlanArgs) -> Result<(), Error> {
    use serde_json::Value;
    let Value::Object(map) = doc else {
        return Ok(());
    };
    if !inputs.is_empty() {
        let entry = map.entry("inputs").or_insert(Value::Null);
        let mut list = match entry.take() {
            Value::Null => Vec::new(),
            Value::Array(items) => items,
            Value::Object(aliases) => {
                // The mapping form (`alias: path`) stays a mapping; bare paths get alias `model`.
                let mut aliases = aliases;
                for input in inputs {
                    let (alias, path) = input.split_once("::").unwrap_or((crate::plan::DEFAULT_ALIAS, input));
                    aliases.insert(alias.to_owned(), Value::String(path.to_owned()));
                }
                *entry = Value::Object(aliases);
                Vec::new()
            }
            other => vec![other],
        };
        if !entry.is_object() {
            list.extend(inputs.iter().map(|s| Value::String(s.clone())));
            *entry = Value::Array(list);
        }
    }
    if let Some(path) = &args.output {
        match map.get_mut("output") {
            Some(Value::Object(output)) => {
                output.insert("path".into(), Value::String(path.clone()));
            }
            _ => {
                // The mapping form, so `output.alias=…` overrides still apply.
                let output = serde_json::json!({ "path": path });
                map.insert("output".into(), output);
            }
        }
    }
    if !args.execute.is_empty() {
        let entry = map.entry("transforms").or_insert(Value::Null);
        let mut list = match entry.take() {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        for (i, line) in args.execute.iter().enumerate() {
            list.push(crate::plan::oneline::parse_transform(line, &format!("-e #{}", i + 1))?);
        }
        *entry = Value::Array(list);
    }
    Ok(())
}

fn load_plan(args: &PlanArgs) -> Result<Prepared, Error> {
    let (doc, sources) = plan_document(args, None)?;
    prepare(args, &doc, &sources)
}

/// The plan document of the command line: `base` (a translated MergeKit config) or an empty
/// plan, then the plan files, inputs, output, one-line transforms and overrides.
fn plan_document(
    args: &PlanArgs,
    base: Option<serde_json::Value>,
) -> Result<(serde_json::Value, Vec<PlanSource>), Error> {
    let mut sources = Vec::new();
    let mut overrides = Vec::new();
    let mut inputs = Vec::new();
    for item in &args.items {
        if looks_like_override(item) {
            overrides.push(item.clone());
        } else if looks_like_checkpoint(item) {
            inputs.push(item.clone());
        } else {
            sources.push(PlanSource::File(PathBuf::from(item)));
        }
    }
    inputs.extend(args.input.iter().cloned());
    if base.is_none() && sources.is_empty() && inputs.is_empty() && args.execute.is_empty() && !args.interactive {
        return Err(crate::plan::PlanError::Syntax {
            origin: "command line".into(),
            message: "nothing to run: give a plan file, -e ONE-LINE, -i, or checkpoint inputs".into(),
        }
        .into());
    }
    // Overrides apply last (SPEC §2), after the command-line inputs, output and transforms.
    let mut doc = crate::plan::assemble(&sources, &[])?;
    if let Some(mut base) = base {
        crate::plan::document::merge(&mut base, doc);
        doc = base;
    }
    apply_options(&mut doc, &inputs, args)?;
    for assignment in &overrides {
        crate::plan::document::apply_override(&mut doc, assignment)?;
    }
    Ok((doc, sources))
}

fn prepare(args: &PlanArgs, doc: &serde_json::Value, sources: &[PlanSource]) -> Result<Prepared, Error> {
    let mut plan = Plan::from_document(doc)?;
    // For `execute` cycles through the plan files (their paths were rebased on their folders).
    plan.files = sources
        .iter()
        .filter_map(|s| match s {
            PlanSource::File(path) => Some(path.clone()),
            _ => None,
        })
        .collect();
    if let (true, Some(output)) = (args.overwrite, plan.output.as_mut()) {
        output.overwrite = true;
    }
    if let (Some(size), Some(output)) = (&args.shard_size, plan.output.as_mut()) {
        output.shard = if size.eq_ignore_ascii_case("none") {
            None
        } else {
            let invalid = |e: crate::formats::FormatError| crate::plan::PlanError::Syntax {
                origin: "--shard-size".into(),
                message: e.to_string(),
            };
            Some(crate::formats::parse_size(size).map_err(invalid)?)
        };
    }
    Prepared::new(plan, args.threads)
}

/// The memory budget and arena directory the command line asks for.
fn memory_options(args: &PlanArgs) -> Result<crate::memory::MemoryOptions, Error> {
    let max_memory = match &args.max_memory {
        Some(size) => Some(
            crate::formats::parse_size(size).map_err(|e| crate::plan::PlanError::Syntax {
                origin: "--max-memory".into(),
                message: e.to_string(),
            })?,
        ),
        None => None,
    };
    Ok(crate::memory::MemoryOptions {
        max_memory,
        scratch_dir: args.scratch_dir.clone(),
    })
}

/// Prints notices on stderr, so stdout stays what the plan prints (`dump` JSON can be piped).
fn print_notices(notices: &[String]) {
    for notice in notices {
        eprintln!("notice: {notice}");
    }
}

fn print_report(out: &mut dyn Write, report: &Report, notes: bool, verb: &str) -> std::io::Result<()> {
    for text in &report.output {
        writeln!(out, "{text}")?;
    }
    if notes {
        for (i, note) in report.notes.iter().enumerate() {
            writeln!(out, "  [{i}] {note}")?;
        }
    }
    for line in crate::transforms::lowrank::factorization_lines(&report.factorizations, notes) {
        writeln!(out, "{line}")?;
    }
    match &report.alias {
        Some(alias) => writeln!(
            out,
            "{verb} alias `{alias}`: {} tensors, {} ({} added, {} removed)",
            report.tensors.len(),
            HumanBytes(report.total_bytes),
            report.added,
            report.removed
        )?,
        None => writeln!(out, "no output")?,
    }
    for path in &report.written {
        writeln!(out, "  wrote {}", path.display())?;
    }
    if report.bytes_read > 0 {
        writeln!(
            out,
            "  read {} of tensor data from the inputs",
            HumanBytes(report.bytes_read)
        )?;
    }
    if verb == "wrote" && report.arena_bytes > 0 {
        writeln!(
            out,
            "  held up to {} in the scratch arena",
            HumanBytes(report.arena_bytes)
        )?;
    }
    Ok(())
}

/// Output files listed before the rest are folded into "… N more".
const FILES_SHOWN: usize = 5;

/// The check's I/O figures: bytes to read and write, the output files, and the free space on
/// each filesystem written to.
fn print_io(out: &mut dyn Write, report: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "bytes to read: {} (estimated, from the inputs)",
        HumanBytes(report.bytes_to_read)
    )?;
    if report.output_files.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "bytes to write: {} in {} file{}",
        HumanBytes(report.bytes_to_write),
        report.output_files.len(),
        if report.output_files.len() == 1 { "" } else { "s" }
    )?;
    // Shards first and last (the index, sidecars) tell the layout; the middle is folded.
    let files = &report.output_files;
    let shown: Vec<usize> = if files.len() <= FILES_SHOWN + 1 {
        (0..files.len()).collect()
    } else {
        (0..FILES_SHOWN).collect()
    };
    for &i in &shown {
        let (path, len) = &files[i];
        writeln!(out, "  {} ({})", path.display(), HumanBytes(*len))?;
    }
    if shown.len() < files.len() {
        let rest = &files[shown.len()..];
        let bytes = rest.iter().fold(0u64, |sum, (_, len)| sum.saturating_add(*len));
        writeln!(out, "  … {} more ({})", rest.len(), HumanBytes(bytes))?;
    }
    for fs in &report.filesystems {
        let roles = fs.roles.join(" and ");
        match fs.available {
            Some(free) => writeln!(
                out,
                "{roles} filesystem: {} free, {} needed{}",
                HumanBytes(free),
                HumanBytes(fs.needed),
                if fs.is_short() {
                    " — NOT ENOUGH: a run refuses to start (--no-space-check to try anyway)"
                } else {
                    ""
                }
            )?,
            None => writeln!(
                out,
                "{roles} filesystem: free space unknown ({} cannot be asked), {} needed",
                fs.path.display(),
                HumanBytes(fs.needed)
            )?,
        }
    }
    Ok(())
}

fn progress_bar(enabled: bool) -> Option<(indicatif::ProgressBar, Arc<crate::executor::ProgressFn>)> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let handle = bar.clone();
    let callback: Arc<crate::executor::ProgressFn> = Arc::new(move |done, total| {
        handle.set_length(total);
        handle.set_position(done);
    });
    Some((bar, callback))
}

fn inspect(path: &std::path::Path, json: bool, out: &mut dyn Write) -> Result<(), Error> {
    use crate::transforms::columns::{cell, pad_left, pad_right, width};
    let checkpoint = open_checkpoint(path)?;
    print_notices(&checkpoint.notices);
    // Saturating: a figure to show (each tensor fits, their sum may not).
    let total = checkpoint
        .tensors
        .iter()
        .fold(0u64, |sum, t| sum.saturating_add(t.nbytes));
    if json {
        let tensors: Vec<serde_json::Value> = checkpoint
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "nbytes": t.nbytes,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "path": checkpoint.path.display().to_string(),
            "format": checkpoint.format.name(),
            "files": checkpoint.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>(),
            "nbytes": total,
            "tensors": tensors,
            "metadata": checkpoint.metadata,
        });
        let _ = writeln!(out, "{doc}");
        return Ok(());
    }
    let rows: Vec<[String; 4]> = checkpoint
        .tensors
        .iter()
        .map(|t| {
            [
                cell(&t.name),
                t.dtype.name().to_owned(),
                cell(&fmt_shape(&t.shape)),
                t.nbytes.to_string(),
            ]
        })
        .collect();
    let header = ["name", "dtype", "shape", "bytes"].map(str::to_owned);
    let minimum = [4, 13, 20, 12];
    let widths: [usize; 4] = std::array::from_fn(|i| {
        width(std::iter::once(header[i].as_str()).chain(rows.iter().map(|r| r[i].as_str()))).max(minimum[i])
    });
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}",
            pad_right(&row[0], widths[0]),
            pad_right(&row[1], widths[1]),
            pad_right(&row[2], widths[2]),
            pad_left(&row[3], widths[3])
        );
    }
    let _ = writeln!(
        out,
        "{} tensors, {} in {} {} file(s)",
        checkpoint.tensors.len(),
        HumanBytes(total),
        checkpoint.files.len(),
        checkpoint.format.name()
    );
    for (key, value) in &checkpoint.metadata {
        let _ = writeln!(out, "metadata {key} = {value}");
    }
    Ok(())
}

/// `brainsurgery diff`: both checkpoints as aliases `left` and `right`, compared whole. Returns
/// the exit status: 0 equal, 1 different.
fn diff(
    path_a: &std::path::Path,
    path_b: &std::path::Path,
    eps: f64,
    cancel: Arc<AtomicBool>,
    out: &mut dyn Write,
) -> Result<i32, Error> {
    if eps.is_nan() || eps < 0.0 {
        return Err(crate::plan::PlanError::Syntax {
            origin: "--eps".into(),
            message: format!("eps must be ≥ 0, got {eps}"),
        }
        .into());
    }
    let mut state = crate::state::State::default();
    for (alias, path) in [("left", path_a), ("right", path_b)] {
        let checkpoint = open_checkpoint(path)?;
        print_notices(&checkpoint.notices);
        state.add_checkpoint(alias, &checkpoint);
    }
    let mut ctx = crate::transforms::Context::new(true, cancel);
    let location = crate::plan::Location::root();
    let report = crate::transforms::diff::compare_aliases(&state, &mut ctx, "left", "right", eps, &location).map_err(
        |e| match e {
            crate::transforms::StepError::Plan(e) => Error::Plan(e),
            crate::transforms::StepError::Format(e) => Error::Format(e),
            crate::transforms::StepError::Cancelled => Error::Cancelled,
            crate::transforms::StepError::Transform(source) => Error::Transform {
                index: 0,
                name: "diff".to_owned(),
                source,
            },
            crate::transforms::StepError::Assertion(failure) => Error::Assertion { index: 0, failure },
        },
    )?;
    let _ = writeln!(out, "left = {}\nright = {}", path_a.display(), path_b.display());
    let _ = writeln!(out, "{}", report.render());
    Ok(if report.is_equal() { 0 } else { 1 })
}

/// `brainsurgery help [NAME]`: a subcommand's usage, or the transform help `help` prints.
fn help(names: &[String], out: &mut dyn Write) -> Result<i32, String> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    // Building propagates the program name into the subcommands' usage lines.
    command.build();
    if let [name] = names {
        if let Some(sub) = command.find_subcommand_mut(name) {
            let _ = writeln!(out, "{}", sub.render_long_help());
            // `diff` and `help` are transforms too.
            if let Some(spec) = crate::transforms::spec(name) {
                let _ = writeln!(
                    out,
                    "the `{name}` transform:\n{}",
                    crate::transforms::help::transform_help(spec)
                );
            }
            return Ok(0);
        }
    }
    let words: Vec<&str> = names.iter().map(String::as_str).collect();
    let text = crate::transforms::help::help_text(&words)?;
    if names.is_empty() {
        let _ = writeln!(out, "{}", command.render_help());
    }
    let _ = writeln!(out, "{text}");
    Ok(0)
}

fn execute(command: Command, cancel: Arc<AtomicBool>) -> Result<i32, Error> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Inspect { path, json } => inspect(&path, json, &mut out).map(|()| 0),
        Command::Diff { path_a, path_b, eps } => diff(&path_a, &path_b, eps, cancel, &mut out),
        Command::Help { names } => help(&names, &mut out).or_else(|message| {
            eprintln!("error: {message}");
            Ok(2)
        }),
        Command::Check(args) => {
            if args.interactive {
                return Err(crate::plan::PlanError::Syntax {
                    origin: "command line".into(),
                    message: "--interactive applies to run, not check".into(),
                }
                .into());
            }
            let prepared = load_plan(&args)?;
            let report = prepared.check_within(&memory_options(&args)?)?;
            print_notices(&report.notices);
            let _ = writeln!(
                out,
                "plan is valid: {} transforms checked against the headers",
                prepared.plan().transforms.len()
            );
            let _ = print_report(&mut out, &report, true, "would write");
            let _ = writeln!(
                out,
                "estimated peak memory: {} of a {} budget ({} of tensors computed whole{})",
                HumanBytes(report.peak_memory_estimate),
                HumanBytes(report.memory_budget),
                HumanBytes(report.materialized_bytes),
                if report.arena_bytes > 0 {
                    format!(", {} of them in the scratch arena", HumanBytes(report.arena_bytes))
                } else {
                    String::new()
                }
            );
            let _ = print_io(&mut out, &report);
            Ok(0)
        }
        Command::Run(args) => run(&args, load_plan(&args)?, cancel, &mut out),
        Command::Mergekit(mk) => {
            let source = PlanSource::File(mk.config.clone());
            let translated = crate::plan::mergekit::translate_source(&source, mk.run.output.as_deref())?;
            let (doc, sources) = plan_document(&mk.run, Some(translated))?;
            if mk.print_plan {
                let _ = write!(
                    out,
                    "{}",
                    crate::plan::mergekit::to_yaml(&doc, &mk.config.display().to_string())?
                );
                return Ok(0);
            }
            run(&mk.run, prepare(&mk.run, &doc, &sources)?, cancel, &mut out)
        }
    }
}

/// `run`: the prepared plan streamed to its output (or the `-i` session first).
fn run(args: &PlanArgs, prepared: Prepared, cancel: Arc<AtomicBool>, out: &mut dyn Write) -> Result<i32, Error> {
    let show_progress = !args.interactive && !args.no_progress && (args.progress || std::io::stderr().is_terminal());
    let bar = progress_bar(show_progress);
    let options = RunOptions {
        threads: args.threads,
        cancel: cancel.clone(),
        progress: bar.as_ref().map(|(_, f)| f.clone()),
        memory: memory_options(args)?,
        skip_space_check: args.no_space_check,
    };
    let result = if args.interactive {
        interactive(prepared, cancel, &options, args.keep_going, out)
    } else {
        prepared.run(&options)
    };
    if let Some((bar, _)) = bar {
        bar.finish_and_clear();
    }
    let report = result?;
    print_notices(&report.notices);
    let _ = print_report(out, &report, args.summarize && !args.no_summarize, "wrote");
    Ok(0)
}

/// `-i`: run the plan's transforms, then the prompt; the output is written when it ends.
fn interactive(
    prepared: Prepared,
    cancel: Arc<AtomicBool>,
    options: &RunOptions,
    keep_going: bool,
    out: &mut dyn Write,
) -> Result<Report, Error> {
    let (mut session, applied) = crate::executor::session::Session::start(prepared, cancel, &options.memory)?;
    print_notices(&applied.notices);
    for text in &applied.output {
        let _ = writeln!(out, "{text}");
    }
    for line in crate::transforms::lowrank::factorization_lines(&applied.factorizations, false) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    crate::prompt::run(&mut session, out, keep_going)?;
    session.finish(options)
}

/// Runs the command line on `args` (without the program name) and returns the exit status.
/// `cancel` is set by the caller's Ctrl-C handling.
pub fn main(args: Vec<String>, cancel: Arc<AtomicBool>) -> i32 {
    let mut argv = vec!["brainsurgery".to_owned()];
    let first = args.first().map(String::as_str);
    // Anything but a subcommand or a top-level flag is a run: `brainsurgery -e '…' model.safetensors`.
    let implicit_run = match first {
        None => false,
        Some(a) => !SUBCOMMANDS.contains(&a) && !matches!(a, "-h" | "--help" | "-V" | "--version"),
    };
    if implicit_run {
        argv.push("run".to_owned());
    }
    argv.extend(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match execute(cli.command, cancel) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            e.exit_code()
        }
    }
}
