//! The one-line form of a transform (SPEC §10), for `-e` and the prompt:
//! `copy: from: a.weight, to: b.weight`, `assert: equal: {left: x, right: y, eps: 1e-6}`, `exit`.
//! It parses to the same `serde_json::Value` the YAML form gives, and [`render`] writes a
//! transform mapping back. Payload validation is left to the transforms, as for YAML.
//!
//! Lexical rules (also in `docs/semantics.md`):
//! - A line is a value in *run* position. A run is `key: value, key: value, …`; a key whose value
//!   starts with another `key:` opens a nested mapping that takes all remaining pairs of the
//!   enclosing run, so `assert: not: exists: x` is `{assert: {not: {exists: x}}}`. A separator
//!   colon is a `:` followed by a space, the end, `,`, `]` or `}`; any other `:` (as in `m::w`)
//!   belongs to the scalar.
//! - `[a, b]` lists and `{k: v}` maps nest; inside a list, `k: v` is a one-pair mapping (as in
//!   YAML flow lists). A trailing comma before `]`, `}` or the end is allowed.
//! - Bare scalars run to the next `,`, closing `]`/`}`, separator colon, or ` #` comment, and are
//!   trimmed. Brackets `(…)`, `[…]`, `{…}` *inside* a bare scalar nest and may hold commas and
//!   colons (`w::[:, 10:20]`, `x{2,3}`), and a backslash takes the next character literally, so
//!   regexes such as `h\.(\d+)\.w` need no quotes. A scalar cannot *start* with `[`, `{`, a quote,
//!   `,`, `]`, `}` or `#` (quote it). Bare keys are strings; bare values are typed like the YAML
//!   form (numbers, `true`/`false`, `null`/`~`, else a string).
//! - `'…'` keeps everything literally (`''` is one quote); `"…"` takes YAML escapes (`\\`, `\"`,
//!   `\n`, `\t`, `\uXXXX`, …) and keeps any other backslash pair as written.

use serde_json::{Map, Value};

use super::document::parse_yaml;
use super::error::PlanError;
use super::MAX_DEPTH;

/// A syntax error at a 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based column (in characters) the error points at.
    pub column: usize,
    /// What is wrong, lower-case.
    pub message: String,
}

impl SyntaxError {
    /// `1:COL: message`, then the line and a caret under the column. A long line is shown as
    /// the [`CONTEXT`] characters around the column, cut ends marked `…` (issue 9: a 600 KB
    /// one-liner was quoted whole in its error).
    pub fn display(&self, line: &str) -> String {
        let chars: Vec<char> = line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let at = self.column.saturating_sub(1).min(chars.len());
        let from = at.saturating_sub(CONTEXT);
        let to = at.saturating_add(CONTEXT).min(chars.len());
        let mut shown: String = if from > 0 { "…".to_owned() } else { String::new() };
        shown.extend(&chars[from..to]);
        if to < chars.len() {
            shown.push('…');
        }
        let pad = " ".repeat(at - from + usize::from(from > 0));
        format!("1:{}: {}\n  {shown}\n  {pad}^", self.column, self.message)
    }
}

/// Characters shown on each side of a syntax error's column.
const CONTEXT: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// The whole line: a run that ends at the end of the line.
    Top,
    /// Inside `{…}`.
    Map,
    /// Inside `[…]`.
    List,
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// Mappings and lists open around the current position.
    depth: usize,
}

type Parsed<T> = Result<T, SyntaxError>;

fn describe(c: Option<char>) -> String {
    match c {
        None => "the end of the line".to_owned(),
        Some(c) => format!("`{c}`"),
    }
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, i: usize) -> Option<char> {
        self.chars.get(i).copied()
    }

    fn error(&self, at: usize, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            column: at + 1,
            message: message.into(),
        }
    }

    /// Opens a mapping or list at `at`; refused past the nesting limit of every plan document,
    /// which also bounds this parser's recursion.
    fn open(&mut self, at: usize) -> Parsed<()> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(
                at,
                format!("mappings and lists nest deeper than {MAX_DEPTH} levels, the limit of a plan document"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    /// Skips blanks, and a comment (`#` at the start or after a blank) to the end of the line.
    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c == ' ' || c == '\t' {
                self.pos += 1;
            } else if c == '#' && (self.pos == 0 || self.peek_at(self.pos - 1).is_some_and(|p| p == ' ' || p == '\t')) {
                self.pos = self.chars.len();
            } else {
                break;
            }
        }
    }

    /// Whether the `:` at `i` separates a key from its value.
    fn separator_at(&self, i: usize) -> bool {
        self.peek_at(i) == Some(':') && matches!(self.peek_at(i + 1), None | Some(' ' | '\t' | ',' | ']' | '}'))
    }

    /// Scans a bare scalar from the current position; returns its trimmed text.
    fn bare(&mut self) -> Parsed<String> {
        let start = self.pos;
        let mut openers: Vec<usize> = Vec::new();
        let mut text = String::new();
        while let Some(c) = self.peek() {
            if openers.is_empty() {
                let stop = match c {
                    ',' | ']' | '}' => true,
                    ':' => self.separator_at(self.pos),
                    '#' => self.pos > start && self.peek_at(self.pos - 1).is_some_and(|p| p == ' ' || p == '\t'),
                    _ => false,
                };
                if stop {
                    break;
                }
            }
            match c {
                '\\' => {
                    text.push(c);
                    self.pos += 1;
                    if let Some(next) = self.peek() {
                        text.push(next);
                        self.pos += 1;
                    }
                    continue;
                }
                '(' | '[' | '{' => openers.push(self.pos),
                ')' | ']' | '}' => {
                    openers.pop();
                }
                _ => {}
            }
            text.push(c);
            self.pos += 1;
        }
        if let Some(&open) = openers.first() {
            let bracket = self.peek_at(open).unwrap_or('(');
            return Err(self.error(
                open,
                format!("`{bracket}` in a bare value is never closed (quote the value)"),
            ));
        }
        Ok(text.trim_end().to_owned())
    }

    /// Scans a quoted string starting at the opening quote.
    fn quoted(&mut self) -> Parsed<String> {
        let open = self.pos;
        let quote = self.peek().unwrap_or('\'');
        self.pos += 1;
        let mut text = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error(open, "unterminated quoted string"));
            };
            self.pos += 1;
            if c == quote {
                if quote == '\'' && self.peek() == Some('\'') {
                    text.push('\'');
                    self.pos += 1;
                    continue;
                }
                break;
            }
            if c == '\\' && quote == '"' {
                let at = self.pos - 1;
                let Some(e) = self.peek() else {
                    return Err(self.error(open, "unterminated quoted string"));
                };
                self.pos += 1;
                let simple = match e {
                    '\\' => Some('\\'),
                    '"' => Some('"'),
                    '/' => Some('/'),
                    ' ' => Some(' '),
                    'n' => Some('\n'),
                    't' => Some('\t'),
                    'r' => Some('\r'),
                    '0' => Some('\0'),
                    'a' => Some('\u{7}'),
                    'b' => Some('\u{8}'),
                    'e' => Some('\u{1b}'),
                    'f' => Some('\u{c}'),
                    'v' => Some('\u{b}'),
                    'N' => Some('\u{85}'),
                    '_' => Some('\u{a0}'),
                    'L' => Some('\u{2028}'),
                    'P' => Some('\u{2029}'),
                    _ => None,
                };
                if let Some(s) = simple {
                    text.push(s);
                    continue;
                }
                let digits = match e {
                    'x' => 2,
                    'u' => 4,
                    'U' => 8,
                    _ => {
                        // Not a YAML escape: kept as written, so `"\d"` is the regex `\d`.
                        text.push('\\');
                        text.push(e);
                        continue;
                    }
                };
                let hex: String = self.chars.iter().skip(self.pos).take(digits).collect();
                let code = (hex.chars().count() == digits)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .and_then(char::from_u32);
                let Some(ch) = code else {
                    return Err(self.error(at, format!("invalid escape `\\{e}`: expected {digits} hex digits")));
                };
                text.push(ch);
                self.pos += digits;
                continue;
            }
            text.push(c);
        }
        // After a quoted string only a separator, a closer or the end may follow.
        self.skip_ws();
        match self.peek() {
            None | Some(',' | ']' | '}') => {}
            Some(':') if self.separator_at(self.pos) => {}
            Some(c) => return Err(self.error(self.pos, format!("unexpected `{c}` after a quoted string"))),
        }
        Ok(text)
    }

    /// Looks ahead: does a `key:` start here? Restores the position.
    fn key_ahead(&mut self) -> bool {
        let save = self.pos;
        self.skip_ws();
        let found = match self.peek() {
            Some('\'' | '"') => self.quoted().is_ok() && self.separator_at(self.pos),
            Some('[' | '{' | ',' | ']' | '}') | None => false,
            Some(_) => self.bare().is_ok() && self.separator_at(self.pos),
        };
        self.pos = save;
        found
    }

    /// A value where a run may start (after `key:` in a mapping, or the whole line).
    /// `outermost` is the line itself, which holds one transform.
    fn value_in_run(&mut self, ctx: Ctx, outermost: bool) -> Parsed<Value> {
        if self.key_ahead() {
            self.open(self.pos)?;
            let mut map = Map::new();
            self.pairs(ctx, &mut map, outermost)?;
            self.depth -= 1;
            Ok(Value::Object(map))
        } else {
            self.value(ctx)
        }
    }

    /// A list item: a value, or a one-pair mapping `k: v`.
    fn item(&mut self) -> Parsed<Value> {
        if self.key_ahead() {
            self.skip_ws();
            self.open(self.pos)?;
            let key = self.key()?;
            self.expect_separator()?;
            let value = self.item()?;
            self.depth -= 1;
            let mut map = Map::new();
            map.insert(key, value);
            Ok(Value::Object(map))
        } else {
            self.value(Ctx::List)
        }
    }

    fn key(&mut self) -> Parsed<String> {
        let at = self.pos;
        match self.peek() {
            Some('\'' | '"') => self.quoted(),
            Some(c @ ('[' | '{')) => Err(self.error(at, format!("expected a key, found `{c}` (keys are plain words)"))),
            Some(c @ (',' | ']' | '}')) => Err(self.error(at, format!("expected a key before `{c}`"))),
            Some(':') if self.separator_at(at) => Err(self.error(at, "expected a key before `:`")),
            None => Err(self.error(at, "expected a key, found the end of the line")),
            Some(_) => self.bare(),
        }
    }

    fn expect_separator(&mut self) -> Parsed<()> {
        self.skip_ws();
        if self.separator_at(self.pos) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(self.pos, "expected ':' after key"))
        }
    }

    /// `key: value, …` until the end of the run (the end of the line, or `}`).
    fn pairs(&mut self, ctx: Ctx, map: &mut Map<String, Value>, outermost: bool) -> Parsed<()> {
        loop {
            self.skip_ws();
            match (ctx, self.peek()) {
                (Ctx::Top, None) | (Ctx::Map, Some('}')) => return Ok(()),
                (Ctx::Map, None) => return Ok(()), // the caller reports the unclosed `{`
                _ => {}
            }
            let at = self.pos;
            let key = self.key()?;
            if outermost && !map.is_empty() {
                return Err(self.error(
                    at,
                    format!("one transform per line: `{key}:` starts a second one (nest it in {{…}} if it belongs to the payload)"),
                ));
            }
            if map.contains_key(&key) {
                return Err(self.error(at, format!("duplicate key `{key}`")));
            }
            self.expect_separator()?;
            let value = self.value_in_run(ctx, false)?;
            map.insert(key, value);
            self.skip_ws();
            match (ctx, self.peek()) {
                (_, Some(',')) => self.pos += 1,
                (Ctx::Top, None) | (Ctx::Map, Some('}')) | (Ctx::Map, None) => return Ok(()),
                (Ctx::Top, c) => {
                    return Err(self.error(
                        self.pos,
                        format!("expected `,` or the end of the line, found {}", describe(c)),
                    ))
                }
                (_, c) => return Err(self.error(self.pos, format!("expected `,` or `}}`, found {}", describe(c)))),
            }
        }
    }

    /// A single value: a flow list or map, a quoted string, or a typed bare scalar. An empty
    /// value (before `,`, a closer or the end) is null, as in YAML.
    fn value(&mut self, ctx: Ctx) -> Parsed<Value> {
        self.skip_ws();
        let at = self.pos;
        match self.peek() {
            None => Ok(Value::Null),
            Some(',') if ctx != Ctx::List => Ok(Value::Null),
            Some(',') => Err(self.error(at, "expected a value before `,`")),
            Some('}') if ctx == Ctx::Map => Ok(Value::Null),
            Some(']') if ctx == Ctx::List => Ok(Value::Null),
            Some(c @ (']' | '}')) => Err(self.error(at, format!("unexpected `{c}`"))),
            Some('[') => self.list(),
            Some('{') => self.map(),
            Some('\'' | '"') => self.quoted().map(Value::String),
            Some(_) => {
                let text = self.bare()?;
                Ok(type_scalar(&text))
            }
        }
    }

    fn list(&mut self) -> Parsed<Value> {
        let open = self.pos;
        self.open(open)?;
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Value::Array(items));
                }
                None => return Err(self.error(open, "`[` is never closed")),
                Some(',') => return Err(self.error(self.pos, "expected a value before `,`")),
                _ => {}
            }
            items.push(self.item()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {}
                None => return Err(self.error(open, "`[` is never closed")),
                c => return Err(self.error(self.pos, format!("expected `,` or `]`, found {}", describe(c)))),
            }
        }
    }

    fn map(&mut self) -> Parsed<Value> {
        let open = self.pos;
        self.open(open)?;
        self.pos += 1;
        let mut map = Map::new();
        self.pairs(Ctx::Map, &mut map, false)?;
        self.skip_ws();
        if self.peek() != Some('}') {
            return Err(self.error(open, "`{` is never closed"));
        }
        self.pos += 1;
        self.depth -= 1;
        Ok(Value::Object(map))
    }
}

/// Types a bare scalar as the YAML form would. Only texts made of `[A-Za-z0-9_.+-]` (or `~`) can
/// be anything but a string, and those are handed to the YAML parser itself, so the one-line and
/// YAML forms can never disagree (`yes`, `0x1F`, `1_000`, `1e-6`). What YAML rejects (`.inf`) stays
/// a string; the transform then reports the wrong type.
fn type_scalar(text: &str) -> Value {
    let plain = text == "~"
        || (!text.is_empty()
            && !text.starts_with("--")
            && !text.starts_with("..")
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-')));
    if plain {
        if let Ok(value) = parse_yaml(text, "") {
            if !value.is_object() && !value.is_array() {
                return value;
            }
        }
    }
    Value::String(text.to_owned())
}

/// Parses one line into a value (no check that it is a transform).
pub fn parse_value(line: &str) -> Result<Value, SyntaxError> {
    let mut parser = Parser {
        chars: line.chars().collect(),
        pos: 0,
        depth: 0,
    };
    let value = parser.value_in_run(Ctx::Top, true)?;
    parser.skip_ws();
    if let Some(c) = parser.peek() {
        return Err(parser.error(parser.pos, format!("unexpected `{c}`")));
    }
    Ok(value)
}

/// Parses a one-line transform into the value its YAML form gives: a one-key mapping
/// (`{copy: {from: a, to: b}}`) or a bare name (`"exit"`). `origin` names the line in errors
/// (`-e #1`, `<prompt>`); errors show the line with a caret under the column.
pub fn parse_transform(line: &str, origin: &str) -> Result<Value, PlanError> {
    let syntax = |e: SyntaxError| PlanError::Syntax {
        origin: origin.to_owned(),
        message: e.display(line),
    };
    let value = parse_value(line).map_err(syntax)?;
    let start = line.chars().take_while(|c| *c == ' ' || *c == '\t').count();
    match &value {
        Value::String(name) if !name.is_empty() => Ok(value),
        Value::Object(map) if map.len() == 1 => Ok(value),
        Value::Null => Err(syntax(SyntaxError {
            column: start + 1,
            message: "expected a transform, found an empty line".into(),
        })),
        _ => Err(syntax(SyntaxError {
            column: start + 1,
            message: "expected a transform: `name: key: value, …` or a bare name".into(),
        })),
    }
}

fn is_bare_safe(text: &str, typed: bool) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    if matches!(first, '\'' | '"' | '[' | '{' | ']' | '}' | ',' | '#' | ' ' | '\t')
        || text.ends_with([' ', '\t'])
        // A final lone backslash would take the separator after it.
        || text.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
        || text.chars().any(char::is_control)
    {
        return false;
    }
    let mut parser = Parser {
        chars: text.chars().collect(),
        pos: 0,
        depth: 0,
    };
    let scanned = parser.bare();
    if !matches!(scanned, Ok(ref s) if s == text) || parser.pos != parser.chars.len() {
        return false;
    }
    !typed || type_scalar(text) == Value::String(text.to_owned())
}

fn render_string(text: &str, typed: bool) -> String {
    if is_bare_safe(text, typed) {
        return text.to_owned();
    }
    if !text.chars().any(char::is_control) {
        return format!("'{}'", text.replace('\'', "''"));
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_pairs(map: &Map<String, Value>) -> String {
    map.iter()
        .map(|(k, v)| format!("{}: {}", render_string(k, false), render_value(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders any value in flow form (`{k: v}`, `[a, b]`, typed scalars, quoted strings).
pub fn render_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => render_string(s, true),
        Value::Array(items) => format!("[{}]", items.iter().map(render_value).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!("{{{}}}", render_pairs(map)),
    }
}

/// Renders a transform mapping (or bare name) in one-line form; [`parse_transform`] gives the
/// value back. `{copy: {from: a, to: b}}` → `copy: from: a, to: b`.
pub fn render(transform: &Value) -> String {
    match transform {
        Value::String(name) => render_string(name, true),
        Value::Object(map) if map.len() == 1 => {
            let Some((name, payload)) = map.iter().next() else {
                return render_value(transform);
            };
            let name = render_string(name, false);
            match payload {
                Value::Null => format!("{name}:"),
                Value::Object(inner) if !inner.is_empty() => format!("{name}: {}", render_pairs(inner)),
                other => format!("{name}: {}", render_value(other)),
            }
        }
        other => render_value(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(line: &str) -> Value {
        parse_transform(line, "t").unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn err(line: &str) -> SyntaxError {
        match parse_value(line) {
            Err(e) => e,
            Ok(v) => panic!("{line} parsed to {v}"),
        }
    }

    /// Issue 9: a long line is shown around the error's column, with the caret still under it.
    #[test]
    fn long_lines_are_shown_around_the_column() {
        let e = SyntaxError {
            column: 5001,
            message: "boom".into(),
        };
        let line: String = (0..10_000).map(|i| if i == 5000 { '!' } else { 'a' }).collect();
        let text = e.display(&line);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "1:5001: boom");
        assert!(lines[1].chars().count() < 2 * CONTEXT + 10, "{}", lines[1]);
        assert!(lines[1].starts_with("  …") && lines[1].ends_with('…'));
        let caret = lines[2].chars().count() - 1;
        assert_eq!(lines[1].chars().nth(caret), Some('!'));
        // Short lines are shown whole.
        let short = SyntaxError {
            column: 3,
            message: "x".into(),
        }
        .display("ab!cd");
        assert_eq!(short, "1:3: x\n  ab!cd\n    ^");
    }

    /// (one-line, YAML equivalent) pairs; the YAML is a transform entry.
    const CASES: &[(&str, &str)] = &[
        (
            "copy: from: a.weight, to: b.weight",
            "copy: {from: a.weight, to: b.weight}",
        ),
        (
            "assert: equal: {left: x, right: y, eps: 1e-6}",
            "assert: {equal: {left: x, right: y, eps: 1e-6}}",
        ),
        ("exit", "exit"),
        ("exit:", "exit:"),
        ("delete: target: 'x.*'", "delete: {target: 'x.*'}"),
        (
            "delete: target: x.*, missing_ok: true",
            "delete: {target: x.*, missing_ok: true}",
        ),
        ("scale_: target: .*, by: 0.5", "scale_: {target: .*, by: 0.5}"),
        (
            "scale_: target: m::.*norm.*, by: -2",
            "scale_: {target: 'm::.*norm.*', by: -2}",
        ),
        (
            "move: from: h\\.(\\d+)\\.w, to: layers.\\1.w",
            "move: {from: 'h\\.(\\d+)\\.w', to: 'layers.\\1.w'}",
        ),
        (
            "assign: from: a, to: w::[:, 10:20]",
            "assign: {from: a, to: 'w::[:, 10:20]'}",
        ),
        (
            "move: from: 'a, b: c', to: \"x\\ty\"",
            "move: {from: 'a, b: c', to: \"x\\ty\"}",
        ),
        ("move: from: 'it''s', to: b", "move: {from: 'it''s', to: b}"),
        ("copy: {from: a, to: b}", "copy: {from: a, to: b}"),
        ("copy: {from: a, to: b,}", "copy: {from: a, to: b}"),
        ("assert: not: exists: x", "assert: {not: {exists: x}}"),
        (
            "assert: all: [{exists: a}, count: {of: b, is: 0}]",
            "assert: {all: [{exists: a}, {count: {of: b, is: 0}}]}",
        ),
        ("assert: iszero: router", "assert: {iszero: router}"),
        (
            "zeroes: target: z, shape: [2, 3], dtype: bf16",
            "zeroes: {target: z, shape: [2, 3], dtype: bf16}",
        ),
        (
            "reshape: from: a, to: b, shape: [-1, 4]",
            "reshape: {from: a, to: b, shape: [-1, 4]}",
        ),
        (
            "x: a: null, b: ~, c: , d: true, e: False",
            "x: {a: null, b: ~, c: , d: true, e: False}",
        ),
        (
            "x: a: 0x1F, b: 1_000, c: .5, d: 1E3, e: +1, f: yes",
            "x: {a: 0x1F, b: 1_000, c: .5, d: 1E3, e: +1, f: yes}",
        ),
        (
            "x: a: [], b: {}, c: [[1, 2], [3]]",
            "x: {a: [], b: {}, c: [[1, 2], [3]]}",
        ),
        ("x: a: '', b: '007', c: \"\"", "x: {a: '', b: '007', c: ''}"),
        ("x: a: b c  d  ", "x: {a: b c  d}"),
        ("copy: from: a, to: b # a comment", "copy: {from: a, to: b}"),
        (
            "x: s: {path: [model, layers, $i, '*rest']}",
            "x: {s: {path: [model, layers, $i, '*rest']}}",
        ),
        ("x: s: ~x::\\d+", "x: {s: '~x::\\d+'}"),
        ("x: s: a{2,3}b", "x: {s: 'a{2,3}b'}"),
        ("x: s: \"\\u00e9\\\\\"", "x: {s: \"\\u00e9\\\\\"}"),
        ("'copy': 'from': a, \"to\": b", "copy: {from: a, to: b}"),
        ("  help  ", "help"),
        ("help: scale_", "help: scale_"),
        ("x: [a: 1, b]", "x: [{a: 1}, b]"),
    ];

    #[test]
    fn one_line_equals_yaml() {
        for (line, yaml) in CASES {
            let want = parse_yaml(&format!("- {yaml}\n"), "yaml").unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(parse(line), want[0], "{line}");
        }
    }

    #[test]
    fn render_round_trips_the_cases() {
        for (line, _) in CASES {
            let value = parse(line);
            let rendered = render(&value);
            assert_eq!(parse(&rendered), value, "{line} → {rendered}");
        }
        assert_eq!(
            render(&json!({"copy": {"from": "a.weight", "to": "b.weight"}})),
            "copy: from: a.weight, to: b.weight"
        );
        assert_eq!(
            render(&json!({"assert": {"equal": {"left": "x", "right": "y", "eps": 1e-6}}})),
            "assert: equal: {left: x, right: y, eps: 1e-6}"
        );
        // Issue 15 item 6: PyYAML's booleans only; `y` and `n` are names.
        assert_eq!(
            render(&json!({"x": {"a": "yes", "b": "n", "c": "Off"}})),
            "x: a: 'yes', b: n, c: 'Off'"
        );
        assert_eq!(
            parse("copy: from: y, to: y_copy"),
            json!({"copy": {"from": "y", "to": "y_copy"}})
        );
        assert_eq!(
            parse("x: a: Y, b: N, c: on, d: NO, e: x, f: n"),
            json!({"x": {"a": "Y", "b": "N", "c": true, "d": false, "e": "x", "f": "n"}})
        );
        assert_eq!(render(&json!("exit")), "exit");
        assert_eq!(
            render(&json!({"x": {"a": "007", "b": "a, b", "c": "it's"}})),
            "x: a: '007', b: 'a, b', c: it's"
        );
    }

    /// A small deterministic generator (xorshift), so the property test needs no extra crate.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }

        fn string(&mut self) -> String {
            const PIECES: &[&str] = &[
                "a", "w", ".", "::", ":", ": ", ",", " ", "'", "\"", "\\", "\\d", "(", ")", "[", "]", "{", "}", "#",
                " #", "*", "$", "~", "-", "1", "0.5", "true", "null", "é", "\n", "\t", "x{2,3}",
            ];
            let n = self.next() % 4;
            (0..n).map(|_| self.pick(PIECES)).collect()
        }

        fn value(&mut self, depth: u32) -> Value {
            match self.next() % if depth > 2 { 5 } else { 7 } {
                0 => Value::Null,
                1 => Value::Bool(self.next().is_multiple_of(2)),
                2 => json!((self.next() % 2000) as i64 - 1000),
                3 => json!((self.next() % 1000) as f64 / 8.0 - 50.0),
                4 => Value::String(self.string()),
                5 => Value::Array((0..self.next() % 4).map(|_| self.value(depth + 1)).collect()),
                _ => {
                    let mut map = Map::new();
                    for _ in 0..self.next() % 4 {
                        map.insert(self.string(), self.value(depth + 1));
                    }
                    Value::Object(map)
                }
            }
        }
    }

    #[test]
    fn generated_values_round_trip() {
        let mut gen = Gen(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let name = gen.pick(&["copy", "scale_", "assert", "x.y"]);
            let payload = gen.value(0);
            let transform = json!({ name: payload });
            let line = render(&transform);
            let back = parse_transform(&line, "gen").unwrap_or_else(|e| panic!("{transform} → {line}: {e}"));
            assert_eq!(back, transform, "{line}");
            // The rendered value is also what YAML reads from the JSON text of the transform.
            let yaml = parse_yaml(&serde_json::to_string(&transform).unwrap(), "json").unwrap();
            assert_eq!(yaml, transform);
        }
    }

    #[test]
    fn nesting_stops_at_the_plan_limit() {
        use crate::plan::MAX_DEPTH;
        // The line's own mapping is a level, as in YAML: `a: [[…]]`.
        let ok = format!("a: {}1{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(parse_value(&ok).is_ok());
        for deep in [
            format!("a: {}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH)),
            format!("a: {}", "{b: ".repeat(MAX_DEPTH)),
            format!("{}1", "a: ".repeat(MAX_DEPTH + 1)),
            format!("a: [{}1]", "b: ".repeat(MAX_DEPTH)),
            // Far deeper lines stop at the limit instead of overflowing the stack.
            "[".repeat(1_000_000),
            "a: ".repeat(1_000_000),
        ] {
            let e = err(&deep);
            assert!(e.message.contains(&format!("deeper than {MAX_DEPTH}")), "{}", e.message);
        }
        assert_eq!(err(&"[".repeat(1_000_000)).column, MAX_DEPTH + 1);
    }

    #[test]
    fn expected_colon_after_key() {
        let e = err("copy: from: a, to");
        assert_eq!(e.column, 18);
        assert_eq!(e.message, "expected ':' after key");
        let shown = e.display("copy: from: a, to");
        assert_eq!(
            shown,
            "1:18: expected ':' after key\n  copy: from: a, to\n                   ^"
        );
        assert_eq!(err("x: {a}").column, 6);
    }

    #[test]
    fn unterminated_quotes() {
        let e = err("copy: from: 'abc, to: b");
        assert_eq!((e.column, e.message.as_str()), (13, "unterminated quoted string"));
        assert_eq!(err("x: \"ab\\").column, 4);
    }

    #[test]
    fn text_after_quoted_string() {
        let e = err("copy: from: 'a' b, to: c");
        assert_eq!(e.column, 17);
        assert!(e.message.contains("after a quoted string"), "{}", e.message);
    }

    #[test]
    fn unclosed_brackets() {
        let e = err("x: a: [1, 2");
        assert_eq!((e.column, e.message.as_str()), (7, "`[` is never closed"));
        let e = err("x: a: {b: 1");
        assert_eq!((e.column, e.message.as_str()), (7, "`{` is never closed"));
        let e = err("x: a: w(1, to: b");
        assert_eq!(e.column, 8);
        assert!(e.message.contains("never closed"), "{}", e.message);
    }

    #[test]
    fn unexpected_closers() {
        let e = err("x: a: 1]");
        assert_eq!(e.column, 8);
        assert!(e.message.contains("`]`"), "{}", e.message);
        assert_eq!(err("]").column, 1);
        let e = err("x: [1 }");
        assert_eq!((e.column, e.message.as_str()), (7, "expected `,` or `]`, found `}`"));
        let e = err("x: {a: 1 ]");
        assert_eq!((e.column, e.message.as_str()), (10, "expected `,` or `}`, found `]`"));
    }

    #[test]
    fn missing_list_value() {
        let e = err("x: [a,,b]");
        assert_eq!((e.column, e.message.as_str()), (7, "expected a value before `,`"));
        assert_eq!(err("x: [,]").column, 5);
    }

    #[test]
    fn bad_keys() {
        let e = err("x: {[a]: 1}");
        assert_eq!(e.column, 5);
        assert!(e.message.starts_with("expected a key"), "{}", e.message);
        let e = err("x: {: 1}");
        assert_eq!((e.column, e.message.as_str()), (5, "expected a key before `:`"));
        let e = err("copy: from: a, from: b");
        assert_eq!((e.column, e.message.as_str()), (16, "duplicate key `from`"));
    }

    #[test]
    fn second_transform_on_a_line() {
        let e = err("copy: {from: a, to: b}, move: {from: b, to: c}");
        assert_eq!(e.column, 25);
        assert!(e.message.contains("one transform per line"), "{}", e.message);
        let e = err("copy: [1] x");
        assert_eq!(e.column, 11);
        assert!(
            e.message.starts_with("expected `,` or the end of the line"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bad_escape() {
        let e = err("x: \"a\\u12\"");
        assert_eq!(e.column, 6);
        assert!(e.message.contains("hex digits"), "{}", e.message);
    }

    #[test]
    fn not_a_transform() {
        for (line, column) in [("", 1), ("   ", 4), ("[a, b]", 1), ("  42", 3), ("# just a comment", 1)] {
            let e = parse_transform(line, "-e #1").unwrap_err();
            let PlanError::Syntax { origin, message } = &e else {
                panic!("{e:?}");
            };
            assert_eq!(origin, "-e #1");
            assert!(
                message.starts_with(&format!("1:{column}: expected a transform")),
                "{line}: {message}"
            );
        }
        let e = parse_transform("copy: from: a, to", "-e #2").unwrap_err().to_string();
        assert!(e.starts_with("-e #2: 1:18: expected ':' after key\n"), "{e}");
    }
}
