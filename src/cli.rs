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
    disable_help_subcommand = true,
    override_usage = MAIN_USAGE
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
    /// Print a header-level table of a checkpoint's tensors in natural order (`layers.2` before
    /// `layers.10`), with sizes and a total by dtype (names longer than 100 characters are
    /// shortened in the middle; `--json` prints them whole).
    Inspect {
        /// A checkpoint file or directory.
        path: PathBuf,
        /// Only the tensors matching this pattern: a regex matched against the whole name
        /// (`'.*\.attn\..*'`) or a structured pattern in brackets (`'[layers, $i, "*rest"]'`).
        #[arg(value_name = "PATTERN")]
        pattern: Option<String>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Fold runs of layers with equal dtype and shape, as `dump compact` does
        /// (`layers.[0-23].mlp.w`).
        #[arg(long)]
        compact: bool,
    },
    /// Compare two checkpoints: tensors missing on either side, differing shapes, dtype changes,
    /// and per differing tensor max |a-b|, relative error ‖a-b‖/‖a‖ and cosine similarity of the
    /// values cast to float32. Exit status 0 when they are equal, 1 when they differ.
    Diff {
        /// The left checkpoint (file or directory).
        path_a: PathBuf,
        /// The right checkpoint.
        path_b: PathBuf,
        /// Largest |a - b| still counted as equal, after casting both sides to float32.
        #[arg(long, default_value_t = 0.0)]
        eps: f64,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
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

/// The usage lines `brainsurgery --help` opens with: the main form (a run), then the commands.
const MAIN_USAGE: &str = "brainsurgery PLAN.yaml [-e STEP]... [-i] [-o OUT] [--summarize] [OPTIONS] \
                          [key=value|CHECKPOINT]...\n       brainsurgery <COMMAND> [ARGS]...";

/// `brainsurgery --help` (and `help` without a name): the main form with its options first, then
/// the commands (issue 14 item 2). `long` is `--help`'s fuller text, else `-h`'s.
fn main_help(long: bool) -> String {
    use clap::CommandFactory;
    let mut command = Cli::command();
    command.build();
    let about = command.get_about().map(ToString::to_string).unwrap_or_default();
    let Some(run) = command.find_subcommand("run") else {
        return command.render_help().to_string();
    };
    let mut run = run
        .clone()
        .override_usage(MAIN_USAGE)
        .about(format!(
            "{about}\n\nRuns plans (the main form; `brainsurgery run` is the same)."
        ))
        .long_about(None);
    let mut text = if long {
        run.render_long_help()
    } else {
        run.render_help()
    }
    .to_string();
    let subcommands: Vec<(String, String)> = command
        .get_subcommands()
        .map(|sub| {
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            // The first sentence, without its parenthesis: one line per command.
            let first = about.split(". ").next().unwrap_or_default();
            let first = first
                .split(" (")
                .next()
                .unwrap_or_default()
                .trim_end_matches('.')
                .to_owned();
            (sub.get_name().to_owned(), first)
        })
        .collect();
    let width = subcommands.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    text.push_str("\nCommands:\n");
    for (name, about) in &subcommands {
        text.push_str(&format!("  {name:width$}  {about}\n"));
    }
    text.push_str(
        "\n`brainsurgery help COMMAND` shows a command's options; `brainsurgery help TRANSFORM` describes a \
         transform, `brainsurgery help` lists them all.",
    );
    text
}

/// The error for a plan argument that is no file: "did you mean `inspect`?" when it is close to
/// a command (`brainsurgery inspekt x.safetensors`).
fn mistyped_command(item: &str) -> Option<Error> {
    let path = std::path::Path::new(item);
    if path.exists() || item.contains(['/', '\\', '.']) {
        return None;
    }
    let command = crate::plan::error::suggest(item, SUBCOMMANDS.iter().copied())?;
    Some(
        crate::plan::PlanError::Syntax {
            origin: "command line".into(),
            message: format!(
                "cannot read plan {item}: no such file; did you mean `{command}`? (brainsurgery {command} …)"
            ),
        }
        .into(),
    )
}

/// A run whose only positional arguments are checkpoints, with nothing to do to them (no plan,
/// `-e`, `-i`, `-o` or override), is refused: the user wanted to look inside. (`check CHECKPOINT`
/// stays: it validates the checkpoint's headers and index.)
fn refuse_checkpoint_as_plan(args: &PlanArgs) -> Result<(), Error> {
    let nothing_to_do = args.execute.is_empty() && !args.interactive && args.output.is_none();
    let mut checkpoints = Vec::new();
    for item in &args.items {
        if looks_like_override(item) || !looks_like_checkpoint(item) {
            return Ok(());
        }
        checkpoints.push(item);
    }
    match checkpoints.first() {
        Some(first) if nothing_to_do => Err(checkpoint_as_plan(first)),
        _ => Ok(()),
    }
}

/// The error of [`refuse_checkpoint_as_plan`].
fn checkpoint_as_plan(item: &str) -> Error {
    let path = item.split_once("::").map_or(item, |(_, path)| path);
    crate::plan::PlanError::Syntax {
        origin: "command line".into(),
        message: format!("{item} looks like a checkpoint, not a plan; to look inside it: brainsurgery inspect {path}"),
    }
    .into()
}

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
    for source in &sources {
        if let PlanSource::File(path) = source {
            if let Some(error) = mistyped_command(&path.to_string_lossy()) {
                return Err(error);
            }
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
        None if verb == "wrote" => writeln!(out, "no output: nothing written")?,
        None => writeln!(out, "no output: nothing would be written")?,
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

/// Compares names as people count: runs of digits by their value (`layers.2` before
/// `layers.10`), the rest byte by byte; equal keys fall back to the plain order.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn runs(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest.find(|c: char| c.is_ascii_digit() != digit).unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            rest = tail;
            Some((digit, run))
        })
    }
    let (mut x, mut y) = (runs(a), runs(b));
    loop {
        let order = match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some((true, p)), Some((true, q))) => {
                // By value without parsing (any length): fewer significant digits is smaller.
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                p.len().cmp(&q.len()).then_with(|| p.cmp(q))
            }
            (Some((_, p)), Some((_, q))) => p.cmp(q),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
}

/// The selector of `inspect PATTERN`: a structured pattern when written as a bracketed list
/// (`[layers, $i, "*rest"]`), else a regex matched against the whole name (also a regex that
/// starts with a character class, `[qk]_proj.*`, which does not read as a list).
fn inspect_selector(text: &str) -> Result<crate::references::Selector, Error> {
    let value = match crate::plan::oneline::parse_value(text) {
        Ok(list @ serde_json::Value::Array(_)) if text.trim_start().starts_with('[') => list,
        _ => serde_json::Value::String(text.to_owned()),
    };
    Ok(name_selector(&value, "inspect PATTERN")?)
}

/// A name pattern as `inspect` and `Checkpoint.info(pattern=…)` take it: a regex string matched
/// against the whole name, or a structured pattern's token list; an alias or slice is refused
/// (one checkpoint, headers only). `origin` names the argument in errors.
pub(crate) fn name_selector(
    value: &serde_json::Value,
    origin: &str,
) -> Result<crate::references::Selector, crate::plan::PlanError> {
    let shown = match value {
        serde_json::Value::String(text) => text.clone(),
        other => crate::plan::oneline::render_value(other),
    };
    let invalid = |message: String| crate::plan::PlanError::Syntax {
        origin: origin.to_owned(),
        message: format!("`{shown}`: {message}"),
    };
    let reference = match value {
        serde_json::Value::String(text) => crate::references::Reference::parse_str(text),
        serde_json::Value::Array(_) => crate::references::Reference::parse(value),
        _ => {
            return Err(invalid(
                "expected a regex string or a structured pattern (a list of tokens)".into(),
            ))
        }
    }
    .map_err(|e| invalid(e.to_string()))?;
    if reference.alias.is_some() || reference.slice.is_some() {
        return Err(invalid("a name pattern takes no `alias::` or slice".into()));
    }
    Ok(reference.selector)
}

/// Bytes and parameters by dtype, largest first: `float32 1.50 KiB, int64 40 B`.
fn bytes_by_dtype(tensors: &[&crate::formats::TensorEntry]) -> Vec<(&'static str, u64, u64)> {
    let mut by: std::collections::BTreeMap<&'static str, (u64, u64)> = std::collections::BTreeMap::new();
    for t in tensors {
        let entry = by.entry(t.dtype.name()).or_default();
        entry.0 = entry.0.saturating_add(t.nbytes);
        entry.1 = entry.1.saturating_add(numel(t));
    }
    let mut rows: Vec<(&'static str, u64, u64)> = by.into_iter().map(|(d, (b, n))| (d, b, n)).collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    rows
}

/// ` (503.4M)`, ` (7.24B)`: a parameter count as model cards write it (powers of ten), from a
/// million on; empty below.
fn parameter_scale(n: u64) -> String {
    match n {
        0..=999_999 => String::new(),
        1_000_000..=999_999_999 => format!(" ({:.1}M)", n as f64 / 1e6),
        _ => format!(" ({:.2}B)", n as f64 / 1e9),
    }
}

fn numel(t: &crate::formats::TensorEntry) -> u64 {
    t.shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64))
}

/// `brainsurgery inspect PATH [PATTERN] [--json] [--compact]`: the header table in natural
/// order, human-readable sizes and a total line (parameters, bytes by dtype).
fn inspect(
    path: &std::path::Path,
    pattern: Option<&str>,
    json: bool,
    compact: bool,
    out: &mut dyn Write,
) -> Result<(), Error> {
    use crate::transforms::columns::{cell, pad_left, pad_right, width};
    let checkpoint = open_checkpoint(path)?;
    print_notices(&checkpoint.notices);
    let mut tensors: Vec<&crate::formats::TensorEntry> = checkpoint.tensors.iter().collect();
    if let Some(text) = pattern {
        let selector = inspect_selector(text)?;
        tensors.retain(|t| selector.is_match(&t.name));
        if tensors.is_empty() {
            let closest = crate::references::closest_names(text, checkpoint.tensors.iter().map(|t| t.name.as_str()), 5);
            let hint = if closest.is_empty() {
                String::new()
            } else {
                format!(
                    "; closest names: {}",
                    closest.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(crate::plan::PlanError::Syntax {
                origin: "inspect PATTERN".into(),
                message: format!("`{text}` matches no tensor in {}{hint}", path.display()),
            }
            .into());
        }
    }
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    // Saturating: a figure to show (each tensor fits, their sum may not).
    let total = tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.nbytes));
    let parameters = tensors.iter().fold(0u64, |sum, t| sum.saturating_add(numel(t)));
    let by_dtype = bytes_by_dtype(&tensors);
    // Rows: a name (folded under --compact), dtype, shape, how many tensors and their bytes.
    let rows: Vec<(String, &crate::formats::TensorEntry, u64)> = if compact {
        let items: Vec<(&str, (String, String, String))> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    (t.dtype.name().to_owned(), fmt_shape(&t.shape), String::new()),
                )
            })
            .collect();
        crate::transforms::dump::fold_names(&items)
            .into_iter()
            .map(|(name, first, count)| (name, tensors[first], count))
            .collect()
    } else {
        tensors.iter().map(|t| (t.name.clone(), *t, 1)).collect()
    };
    if json {
        let tensors: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, t, count)| {
                let mut row = serde_json::json!({
                    "name": name,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "nbytes": t.nbytes.saturating_mul(*count),
                });
                if compact {
                    row["count"] = serde_json::Value::from(*count);
                }
                row
            })
            .collect();
        let dtypes: serde_json::Map<String, serde_json::Value> = by_dtype
            .iter()
            .map(|(d, b, n)| ((*d).to_owned(), serde_json::json!({"nbytes": b, "parameters": n})))
            .collect();
        let doc = serde_json::json!({
            "path": checkpoint.path.display().to_string(),
            "format": checkpoint.format.name(),
            "files": checkpoint.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>(),
            "nbytes": total,
            "parameters": parameters,
            "dtypes": dtypes,
            "tensors": tensors,
            "metadata": checkpoint.metadata,
        });
        let _ = writeln!(out, "{doc}");
        return Ok(());
    }
    let table: Vec<[String; 4]> = rows
        .iter()
        .map(|(name, t, count)| {
            let size = if *count > 1 {
                format!("{count} × {}", HumanBytes(t.nbytes))
            } else {
                HumanBytes(t.nbytes).to_string()
            };
            [cell(name), t.dtype.name().to_owned(), cell(&fmt_shape(&t.shape)), size]
        })
        .collect();
    let header = ["name", "dtype", "shape", "size"].map(str::to_owned);
    let minimum = [4, 13, 20, 10];
    let widths: [usize; 4] = std::array::from_fn(|i| {
        width(std::iter::once(header[i].as_str()).chain(table.iter().map(|r| r[i].as_str()))).max(minimum[i])
    });
    for row in std::iter::once(&header).chain(&table) {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}",
            pad_right(&row[0], widths[0]),
            pad_right(&row[1], widths[1]),
            pad_right(&row[2], widths[2]),
            pad_left(&row[3], widths[3])
        );
    }
    let count = if tensors.len() == checkpoint.tensors.len() {
        format!("{} tensors", tensors.len())
    } else {
        format!("{} of {} tensors", tensors.len(), checkpoint.tensors.len())
    };
    let dtypes: Vec<String> = by_dtype
        .iter()
        .map(|(d, b, _)| format!("{d} {}", HumanBytes(*b)))
        .collect();
    let _ = writeln!(
        out,
        "total: {count}, {parameters} parameters{}, {} ({}) in {} {} file(s)",
        parameter_scale(parameters),
        HumanBytes(total),
        dtypes.join(", "),
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
    json: bool,
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
    if json {
        let mut doc = report.to_json();
        doc["left_path"] = serde_json::Value::from(path_a.display().to_string());
        doc["right_path"] = serde_json::Value::from(path_b.display().to_string());
        let _ = writeln!(out, "{doc}");
    } else {
        let _ = writeln!(out, "left = {}\nright = {}", path_a.display(), path_b.display());
        let _ = writeln!(out, "{}", report.render());
    }
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
        let _ = writeln!(out, "{}\n", main_help(false));
    }
    let _ = writeln!(out, "{text}");
    Ok(0)
}

fn execute(command: Command, cancel: Arc<AtomicBool>) -> Result<i32, Error> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Inspect {
            path,
            pattern,
            json,
            compact,
        } => inspect(&path, pattern.as_deref(), json, compact, &mut out).map(|()| 0),
        Command::Diff {
            path_a,
            path_b,
            eps,
            json,
        } => diff(&path_a, &path_b, eps, json, cancel, &mut out),
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
        Command::Run(args) => {
            refuse_checkpoint_as_plan(&args)?;
            run(&args, load_plan(&args)?, cancel, &mut out)
        }
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
    if first.is_none() {
        // Nothing to do: the main form and the commands, as an error.
        eprintln!("{}", main_help(false));
        return 2;
    }
    if let Some(flag @ ("-h" | "--help")) = first {
        // Not `println!`: a closed stdout (`brainsurgery --help | head -1`) must not panic.
        let _ = writeln!(std::io::stdout(), "{}", main_help(flag == "--help"));
        return 0;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_counts_digit_runs_by_value() {
        let mut names = vec![
            "layers.10.w",
            "layers.2.w",
            "layers.02.w",
            "layers.1.w",
            "embed",
            "layers.2.b",
            "x9",
            "x10",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "embed",
                "layers.1.w",
                "layers.2.b",
                "layers.02.w",
                "layers.2.w",
                "layers.10.w",
                "x9",
                "x10"
            ]
        );
        // Longer than any integer type: compared by length, then digits.
        let big = format!("a{}", "9".repeat(40));
        assert_eq!(
            natural_cmp(&big, &format!("a1{}", "0".repeat(40))),
            std::cmp::Ordering::Less
        );
    }

    #[test]
    fn parameter_counts_as_model_cards_write_them() {
        assert_eq!(parameter_scale(752), "");
        assert_eq!(parameter_scale(503_414_784), " (503.4M)");
        assert_eq!(parameter_scale(7_241_732_096), " (7.24B)");
    }

    #[test]
    fn name_patterns_refuse_alias_and_slice() {
        assert!(inspect_selector(r"layers\.\d+\..*").unwrap().is_match("layers.3.w"));
        assert!(inspect_selector("[layers, $i, \"*rest\"]")
            .unwrap()
            .is_match("layers.3.mlp.w"));
        let err = inspect_selector("m::x").unwrap_err().to_string();
        assert!(err.contains("inspect PATTERN") && err.contains("alias"), "{err}");
        let err = inspect_selector("[layers, $i").unwrap_err().to_string();
        assert!(err.contains("inspect PATTERN"), "{err}");
        // A regex that opens with a character class is not a list.
        assert!(inspect_selector("[qk]_proj.*").unwrap().is_match("q_proj.weight"));
    }

    #[test]
    fn mistyped_commands_and_checkpoints() {
        let err = mistyped_command("inspekt").map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("did you mean `inspect`?"), "{err}");
        assert!(mistyped_command("plan.yaml").is_none() && mistyped_command("zzzzzz").is_none());
        let err = checkpoint_as_plan("m.safetensors").to_string();
        assert!(err.contains("brainsurgery inspect m.safetensors"), "{err}");
        let help = main_help(false);
        assert!(help.contains("Usage: brainsurgery PLAN.yaml [-e STEP]..."), "{help}");
        let (execute, commands) = (help.find("--execute"), help.find("Commands:"));
        assert!(execute.is_some() && commands.is_some() && execute < commands, "{help}");
    }
}
