//! The interactive prompt of `brainsurgery -i` (SPEC §10): after the plan's transforms, `bs> `
//! reads one-line transforms or YAML blocks and applies each to a live [`Session`]; a failing
//! block is reported and the session goes on from the state before it. On a terminal it edits
//! with rustyline (history file, tab completion of transform names, payload keys, aliases and
//! tensor names); otherwise it reads lines from stdin without prompts, so it can be scripted.
//!
//! Input rules: a line that is only `name:`, starts with `-`, or is indented opens a YAML block
//! that ends at an empty line; any other line is one transform in one-line form. `exit`, `save`
//! or end of input (Ctrl-D) end the session; the caller then writes the plan's output.
//! `save-plan PATH` writes the session so far as a plan file that replays it to the same output.
//! What is typed here continues the plan: its relative paths resolve against the first plan
//! file's folder, as inside the plan, or the working directory without a plan file; the path of
//! `save-plan` is the working directory's.
//!
//! Piped input is a script (issue 14 item 7): a failing entry ends the session with its error,
//! and the caller writes nothing, as a plan would; with `keep_going` (`--keep-going`) it is
//! reported and the session goes on, as at a terminal. An entry cancelled by Ctrl-C is not a
//! failure: the session goes on.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use rustyline::completion::Completer;
use rustyline::config::{CompletionType, Config};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, Helper};
use serde_json::Value;

use crate::error::error_chain;
use crate::error::Error;
use crate::executor::session::{Applied, Session};
use crate::plan::document::parse_yaml;
use crate::plan::{oneline, PlanError};
use crate::state::State;
use crate::transforms::{assert::OPERATORS, spec, REGISTRY};

/// The prompt.
pub const PROMPT: &str = "bs> ";
/// The prompt inside a YAML block.
pub const CONTINUATION: &str = "..> ";
const ORIGIN: &str = "<prompt>";

/// What completion can offer: the current aliases and tensor names.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Aliases in the state.
    pub aliases: Vec<String>,
    /// `(alias, tensor name)` in output order.
    pub tensors: Vec<(String, String)>,
    /// The alias references without `alias::` resolve to.
    pub default_alias: Option<String>,
}

impl Names {
    /// A snapshot of a state.
    pub fn of(state: &State) -> Names {
        let aliases = state.alias_names();
        let tensors = aliases
            .iter()
            .filter_map(|a| state.alias(a).map(|s| (a, s)))
            .flat_map(|(a, s)| s.iter().map(move |(name, _)| (a.clone(), name.to_owned())))
            .collect();
        Names {
            aliases,
            tensors,
            default_alias: state.default_alias.clone(),
        }
    }
}

/// The first separator colon (`:` followed by a blank or the end) in `text`, as a byte index.
fn first_separator(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find(|&i| bytes[i] == b':' && matches!(bytes.get(i + 1), None | Some(b' ' | b'\t')))
}

/// The keys written so far in `text` (`word:` followed by a blank).
fn keys_in(text: &str) -> Vec<&str> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(i) = first_separator(rest) {
        let head = &rest[..i];
        let key = head.rsplit([' ', ',', '{', '[']).next().unwrap_or("").trim();
        if !key.is_empty() {
            keys.push(key);
        }
        rest = &rest[i + 1..];
    }
    keys
}

/// Completion candidates for `line` with the cursor at byte `pos`: the byte where the word being
/// completed starts, and the words that may replace it. The first word completes to transform
/// names; after `name:`, `,` or `{` to the transform's payload keys (assertion operators and
/// their keys for `assert`); elsewhere to `alias::` and tensor names.
pub fn complete(line: &str, pos: usize, names: &Names) -> (usize, Vec<String>) {
    let prefix = line.get(..pos).unwrap_or(line);
    let start = prefix
        .char_indices()
        .rfind(|(_, c)| matches!(c, ' ' | '\t' | ',' | '[' | '{' | '\'' | '"'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let word = &prefix[start..];
    let before = prefix[..start].trim_end();
    let mut out: Vec<String> = Vec::new();
    if before.is_empty() {
        // A transform that takes keys is a key of the one-line form (`scale_: …`); `exit` is not.
        out.extend(REGISTRY.iter().filter(|s| s.name.starts_with(word)).map(|s| {
            if s.keys().is_empty() {
                s.name.to_owned()
            } else {
                key(s.name)
            }
        }));
        return (start, finish(out));
    }
    let name = first_separator(prefix).map_or("", |i| prefix[..i].trim());
    let mut depth: Vec<char> = Vec::new();
    for c in before.chars() {
        match c {
            '[' | '{' => depth.push(c),
            ']' | '}' => {
                depth.pop();
            }
            _ => {}
        }
    }
    let in_list = depth.last() == Some(&'[');
    let written = keys_in(before);
    let last_key = written.last().copied().unwrap_or("");
    let is_operator = |k: &str| name == "assert" && OPERATORS.iter().any(|(op, _)| *op == k);
    // A key follows `,` and `{` in a mapping, and the colon after the transform name (or an
    // assertion operator): the one-line form nests the next run there.
    let after_colon = before.ends_with(':');
    let key_position = !in_list
        && (before.ends_with(',')
            || before.ends_with('{')
            || (after_colon && (last_key == name || is_operator(last_key))));
    if key_position {
        if name == "assert" {
            let op = written
                .iter()
                .rev()
                .find_map(|k| OPERATORS.iter().find(|(o, _)| o == k));
            match op {
                // An operator with keys takes them (or a bare reference), not another operator
                // (`iszero: w` completes `wte`, not `writes`).
                Some((_, fields)) if !fields.is_empty() => out.extend(fields.iter().map(|f| key(f.name))),
                // At the top and after `not`, an operator follows.
                _ => out.extend(OPERATORS.iter().map(|(o, _)| key(o))),
            }
        } else if let Some(spec) = spec(name) {
            out.extend(
                spec.keys()
                    .iter()
                    .map(|f| f.name)
                    .filter(|f| !written.contains(f))
                    .map(key),
            );
        }
    }
    // Values everywhere else, and after an assertion operator, which may take a bare reference
    // (`iszero: router`).
    if !key_position || (after_colon && is_operator(last_key)) {
        out.extend(tensor_candidates(word, names));
    }
    out.retain(|c| c.starts_with(word));
    (start, finish(out))
}

/// A key as completion inserts it: followed by `: `, ready for its value (issue 14 item 7).
fn key(name: &str) -> String {
    format!("{name}: ")
}

fn tensor_candidates(word: &str, names: &Names) -> Vec<String> {
    if let Some((alias, _)) = word.split_once("::") {
        return names
            .tensors
            .iter()
            .filter(|(a, _)| a == alias)
            .map(|(a, n)| format!("{a}::{n}"))
            .collect();
    }
    let mut out: Vec<String> = names.aliases.iter().map(|a| format!("{a}::")).collect();
    out.extend(
        names
            .tensors
            .iter()
            .filter(|(a, _)| names.default_alias.as_ref().is_none_or(|d| d == a))
            .map(|(_, n)| n.clone()),
    );
    out
}

fn finish(mut out: Vec<String>) -> Vec<String> {
    out.sort();
    out.dedup();
    out
}

/// rustyline glue: completion from a [`Names`] snapshot refreshed after every block.
struct PromptHelper {
    names: Names,
}

impl Completer for PromptHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(complete(line, pos, &self.names))
    }
}

impl Hinter for PromptHelper {
    type Hint = String;
}

impl Highlighter for PromptHelper {}

impl Validator for PromptHelper {}

impl Helper for PromptHelper {}

/// Whether a line opens a YAML block: only `name:`, or starting with `-` or a blank.
pub fn opens_block(line: &str) -> bool {
    if line.starts_with([' ', '\t']) || line == "-" || line.starts_with("- ") {
        return true;
    }
    let trimmed = line.trim_end();
    trimmed.strip_suffix(':').is_some_and(|name| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    })
}

/// Parses one entry of the prompt: a YAML block (a transform or a list of them) or one line.
pub fn parse_entry(text: &str, block: bool) -> Result<Option<Value>, PlanError> {
    if !block {
        return oneline::parse_transform(text, ORIGIN).map(Some);
    }
    match parse_yaml(text, ORIGIN)? {
        Value::Null => Ok(None),
        Value::Object(map) if map.len() != 1 => Err(PlanError::Syntax {
            origin: ORIGIN.to_owned(),
            message: "a block is one transform (`name:` and its keys) or a list of them".to_owned(),
        }),
        value => Ok(Some(value)),
    }
}

enum Read {
    Line(String),
    Interrupted,
    End,
}

trait Lines {
    fn read(&mut self, prompt: &str) -> Read;
    fn remember(&mut self, _line: &str) {}
    fn refresh(&mut self, _names: Names) {}
}

struct Piped(std::io::StdinLock<'static>);

impl Lines for Piped {
    fn read(&mut self, _prompt: &str) -> Read {
        let mut line = String::new();
        match self.0.read_line(&mut line) {
            Ok(0) | Err(_) => Read::End,
            Ok(_) => Read::Line(line.trim_end_matches(['\n', '\r']).to_owned()),
        }
    }
}

struct Terminal {
    editor: Editor<PromptHelper, FileHistory>,
    history: Option<PathBuf>,
}

impl Lines for Terminal {
    fn read(&mut self, prompt: &str) -> Read {
        match self.editor.readline(prompt) {
            Ok(line) => Read::Line(line),
            Err(ReadlineError::Interrupted) => Read::Interrupted,
            Err(_) => Read::End,
        }
    }

    fn remember(&mut self, line: &str) {
        let _ = self.editor.add_history_entry(line);
    }

    fn refresh(&mut self, names: Names) {
        if let Some(helper) = self.editor.helper_mut() {
            helper.names = names;
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(path) = &self.history {
            let _ = self.editor.save_history(path);
        }
    }
}

/// `$BRAINSURGERY_HISTORY`, else `~/.brainsurgery_history`.
pub fn history_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BRAINSURGERY_HISTORY") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".brainsurgery_history"))
}

fn terminal(names: Names) -> Option<Terminal> {
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .auto_add_history(false)
        .build();
    let mut editor = Editor::<PromptHelper, FileHistory>::with_config(config).ok()?;
    editor.set_helper(Some(PromptHelper { names }));
    let history = history_path();
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    Some(Terminal { editor, history })
}

fn print_applied(out: &mut dyn Write, applied: &Applied) {
    for notice in &applied.notices {
        eprintln!("notice: {notice}");
    }
    for text in &applied.output {
        let _ = writeln!(out, "{text}");
    }
    for note in &applied.notes {
        let _ = writeln!(out, "  {note}");
    }
    for line in crate::transforms::lowrank::factorization_lines(&applied.factorizations, true) {
        let _ = writeln!(out, "  {line}");
    }
    let _ = out.flush();
}

/// An entry with its relative paths rebased on the plan's folder (`None`: left to the working
/// directory).
fn in_folder(mut entry: Value, folder: Option<&std::path::Path>) -> Value {
    if let Some(folder) = folder {
        match &mut entry {
            Value::Array(items) => items
                .iter_mut()
                .for_each(|item| crate::plan::paths::rebase_transform(item, Some(folder))),
            item => crate::plan::paths::rebase_transform(item, Some(folder)),
        }
    }
    entry
}

/// What `save-plan PATH` does: writes the session's [`Session::replay_plan`] to `PATH` (the
/// working directory's, `~` expanded) as YAML, or as JSON for a `.json` name or when YAML would
/// not read back the same document. Returns the path written.
pub fn save_plan(session: &Session, text: &str) -> Result<PathBuf, Error> {
    let syntax = |message: String| -> Error {
        PlanError::Syntax {
            origin: ORIGIN.to_owned(),
            message,
        }
        .into()
    };
    let path = text.trim();
    if path.is_empty() {
        return Err(syntax("save-plan needs a file name: save-plan PATH".to_owned()));
    }
    let path = crate::plan::paths::expand_home(path);
    let doc = session.replay_plan()?;
    let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let yaml = (!json)
        .then(|| serde_saphyr::to_string(&doc).ok())
        .flatten()
        .filter(|text| parse_yaml(text, ORIGIN).is_ok_and(|back| back == doc));
    let text = match yaml {
        Some(text) => format!(
            "# brainsurgery -i session; run it with: brainsurgery {}\n{text}",
            path.display()
        ),
        None => serde_json::to_string_pretty(&doc).map_err(|e| syntax(e.to_string()))? + "\n",
    };
    std::fs::write(&path, text).map_err(|e| crate::formats::FormatError::io(&path, e))?;
    Ok(path)
}

/// Runs the prompt until `exit`, `save` or end of input. Returns the number of entries that
/// failed (each was reported on stderr and left the state unchanged). From piped input without
/// `keep_going`, the first failing entry ends the session instead, with its error.
pub fn run(session: &mut Session, out: &mut dyn Write, keep_going: bool) -> Result<usize, Error> {
    let names = Names::of(session.state());
    let mut lines: Box<dyn Lines> = match std::io::stdin().is_terminal().then(|| terminal(names)).flatten() {
        Some(t) => Box::new(t),
        None => Box::new(Piped(std::io::stdin().lock())),
    };
    // Only a script read from a pipe or a file stops: at a terminal a mistake is retyped.
    let strict = !keep_going && !std::io::stdin().is_terminal();
    let mut failures = 0;
    loop {
        let first = match lines.read(PROMPT) {
            Read::Line(line) => line,
            Read::Interrupted => {
                eprintln!("(exit, save or Ctrl-D end the session)");
                continue;
            }
            Read::End => break,
        };
        let command = first.trim();
        if command.is_empty() {
            continue;
        }
        lines.remember(&first);
        if command == "exit" || command == "save" {
            break;
        }
        if let Some(rest) = command
            .strip_prefix("save-plan")
            .filter(|r| r.is_empty() || r.starts_with([' ', '\t']))
        {
            match save_plan(session, rest) {
                Ok(path) => {
                    let _ = writeln!(out, "wrote plan {}", path.display());
                    let _ = out.flush();
                }
                Err(e) if strict => return Err(e),
                Err(e) => {
                    failures += 1;
                    let _ = out.flush();
                    eprintln!("error: {}", error_chain(&e));
                }
            }
            continue;
        }
        let block = opens_block(&first);
        let mut text = first.clone();
        let mut ended = false;
        if block {
            loop {
                match lines.read(CONTINUATION) {
                    Read::Line(line) if line.trim().is_empty() => break,
                    Read::Line(line) => {
                        lines.remember(&line);
                        text.push('\n');
                        text.push_str(&line);
                    }
                    Read::Interrupted => {
                        text.clear();
                        break;
                    }
                    Read::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        let folder = session.plan_folder();
        let result = parse_entry(&text, block).map_err(Error::from).and_then(|entry| {
            entry
                .map(|value| session.apply(&in_folder(value, folder.as_deref())))
                .transpose()
        });
        match result {
            Ok(Some(applied)) => {
                print_applied(out, &applied);
                lines.refresh(Names::of(session.state()));
                if applied.exit {
                    break;
                }
            }
            Ok(None) => {}
            // Ctrl-C cancels the entry it interrupts, and the session goes on (a script too).
            Err(e) if strict && !matches!(e, Error::Cancelled) => {
                let _ = out.flush();
                return Err(e);
            }
            Err(e) => {
                failures += 1;
                let _ = out.flush();
                eprintln!("error: {}", error_chain(&e));
                eprintln!("(the state is as it was before this entry)");
            }
        }
        if ended {
            break;
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            aliases: vec!["base".into(), "model".into()],
            tensors: vec![
                ("model".into(), "h.0.attn.weight".into()),
                ("model".into(), "h.0.mlp.weight".into()),
                ("model".into(), "wte".into()),
                ("base".into(), "h.0.attn.weight".into()),
            ],
            default_alias: Some("model".into()),
        }
    }

    fn at_end(line: &str) -> (usize, Vec<String>) {
        complete(line, line.len(), &names())
    }

    #[test]
    fn completes_transform_names() {
        assert_eq!(at_end("sca"), (0, vec!["scale: ".to_owned(), "scale_: ".to_owned()]));
        // `exit` takes no keys: no `: ` after it.
        assert_eq!(at_end("  exi").1, vec!["exit".to_owned()]);
        assert!(at_end("").1.contains(&"copy: ".to_owned()));
    }

    #[test]
    fn completes_payload_keys() {
        // Issue 14 item 7: a key completes with `: ` after it.
        assert_eq!(at_end("copy: "), (6, vec!["from: ".to_owned(), "to: ".to_owned()]));
        assert_eq!(at_end("copy: from: a, t"), (15, vec!["to: ".to_owned()]));
        assert_eq!(at_end("scale_: {target: x, "), (20, vec!["by: ".to_owned()]));
        let (_, ops) = at_end("assert: ");
        assert!(
            ops.contains(&"equal: ".to_owned()) && ops.contains(&"iszero: ".to_owned()),
            "{ops:?}"
        );
        assert!(!ops.contains(&"wte".to_owned()), "{ops:?}");
        let (_, keys) = at_end("assert: equal: {l");
        assert_eq!(keys, vec!["left: ".to_owned()]);
    }

    #[test]
    fn completes_tensor_names_and_aliases() {
        assert_eq!(
            at_end("copy: from: h.0."),
            (12, vec!["h.0.attn.weight".to_owned(), "h.0.mlp.weight".to_owned()])
        );
        assert_eq!(at_end("copy: from: ba").1, vec!["base::".to_owned()]);
        assert_eq!(
            at_end("copy: from: base::h").1,
            vec!["base::h.0.attn.weight".to_owned()]
        );
        assert_eq!(at_end("assert: iszero: w").1, vec!["wte".to_owned()]);
        assert_eq!(at_end("concat: from: [wte, h.0.m").1, vec!["h.0.mlp.weight".to_owned()]);
        // The cursor in the middle of the line completes the word before it.
        let line = "copy: from: wt, to: x";
        assert_eq!(complete(line, 14, &names()), (12, vec!["wte".to_owned()]));
    }

    #[test]
    fn blocks_and_entries() {
        assert!(opens_block("scale_:"));
        assert!(opens_block("- copy: {from: a, to: b}"));
        assert!(opens_block("  by: 2"));
        assert!(!opens_block("copy: from: a, to: b"));
        assert!(!opens_block("exit"));
        let v = parse_entry("scale_:\n  target: x\n  by: 2", true).unwrap().unwrap();
        assert_eq!(v, serde_json::json!({"scale_": {"target": "x", "by": 2}}));
        assert!(parse_entry("a: 1\nb: 2", true).is_err());
        let e = parse_entry("copy: from: a, to", false).unwrap_err().to_string();
        assert!(e.starts_with("<prompt>: 1:18: expected ':' after key"), "{e}");
    }
}
