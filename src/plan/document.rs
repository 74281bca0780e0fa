//! The raw plan document: YAML or JSON text, files or an already-built value (a Python dict),
//! merged in order, with `key.path[i]=value` overrides applied last (SPEC §2). The result is a
//! plain `serde_json::Value`; nothing here knows what a transform is.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{suggest, PlanError};
use super::host::depth_exceeds;
use super::location::{Location, Segment};
use super::{MAX_DEPTH, MAX_NODES};

/// One piece of a plan, as the user handed it over.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// A YAML or JSON file (JSON when the name ends in `.json`).
    File(PathBuf),
    /// YAML (or JSON, a subset of YAML) text.
    Text(String),
    /// An already-parsed document (a Python dict).
    Value(Value),
}

/// Largest plan file read, in bytes. Plans are kilobytes; the limit keeps a device or a
/// checkpoint named by mistake from being read whole (issue 9: `/dev/zero` as a plan read
/// 4.2 GB before failing). At most one byte more than this is read.
pub const MAX_PLAN_BYTES: u64 = 16 << 20;

/// Parses YAML text into a document value. `origin` names the text in messages.
pub fn parse_yaml(text: &str, origin: &str) -> Result<Value, PlanError> {
    parse_yaml_with(text, origin, true)
}

/// The plain scalars PyYAML reads as booleans besides `true`/`false` (and their `True`/`TRUE`
/// spellings, which YAML 1.2 shares): plans written for the 0.2 tool were read by PyYAML, where
/// `y`, `n` (and `Y`, `N`, `yEs`, ...) are strings, so `copy: {from: y, to: y_copy}` names a
/// tensor `y` (issue 15 item 6).
const PYYAML_ONLY_BOOLEANS: [&str; 12] = [
    "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF",
];

/// [`parse_yaml`]; without `snippet`, syntax errors give the line and column but quote no line
/// of the text (a plan file may not be a plan, and its lines are not ours to print).
///
/// Booleans are resolved as PyYAML does. The parser offers YAML 1.2 booleans (`true`/`false`
/// only) or YAML 1.1 ones (also `y`/`n`, in any case); PyYAML sits between the two. The text is
/// read with 1.2 booleans; when a string there is one of [`PYYAML_ONLY_BOOLEANS`] it is read
/// again with 1.1 booleans, and a node that is a boolean there (so was written plain, not
/// quoted) becomes that boolean.
fn parse_yaml_with(text: &str, origin: &str, snippet: bool) -> Result<Value, PlanError> {
    let strict = parse_yaml_booleans(text, origin, snippet, true)?;
    if !has_pyyaml_only_boolean(&strict) {
        return Ok(strict);
    }
    let loose = parse_yaml_booleans(text, origin, snippet, false)?;
    Ok(merge_booleans(strict, &loose))
}

/// Whether `value` holds a string PyYAML might read as a boolean.
fn has_pyyaml_only_boolean(value: &Value) -> bool {
    match value {
        Value::String(s) => PYYAML_ONLY_BOOLEANS.contains(&s.as_str()),
        Value::Array(items) => items.iter().any(has_pyyaml_only_boolean),
        Value::Object(map) => map.values().any(has_pyyaml_only_boolean),
        _ => false,
    }
}

/// `strict` (read with YAML 1.2 booleans) with each string of [`PYYAML_ONLY_BOOLEANS`] that
/// `loose` (the same text read with YAML 1.1 booleans) holds as a boolean replaced by it. Both
/// trees have one shape: booleans never change a document's structure.
fn merge_booleans(strict: Value, loose: &Value) -> Value {
    match (strict, loose) {
        (Value::String(s), Value::Bool(b)) if PYYAML_ONLY_BOOLEANS.contains(&s.as_str()) => Value::Bool(*b),
        (Value::Array(items), Value::Array(others)) if items.len() == others.len() => Value::Array(
            items
                .into_iter()
                .zip(others)
                .map(|(a, b)| merge_booleans(a, b))
                .collect(),
        ),
        (Value::Object(map), Value::Object(others)) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = match others.get(&k) {
                        Some(other) => merge_booleans(v, other),
                        None => v,
                    };
                    (k, v)
                })
                .collect(),
        ),
        (other, _) => other,
    }
}

/// One reading of YAML text, with YAML 1.2 booleans (`strict`) or YAML 1.1 ones.
fn parse_yaml_booleans(text: &str, origin: &str, snippet: bool, strict: bool) -> Result<Value, PlanError> {
    let options = serde_saphyr::options! {
        with_snippet: snippet,
        strict_booleans: strict,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            max_nodes: MAX_NODES,
        },
    };
    let value: Value = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        // The parser's message starts with its own "error: "; ours names the origin instead.
        let message = e.to_string();
        let message = message.strip_prefix("error: ").unwrap_or(&message).to_owned();
        PlanError::Syntax {
            origin: origin.to_owned(),
            message,
        }
    })?;
    Ok(value)
}

/// The error for a document nested deeper than [`MAX_DEPTH`].
fn too_deep(origin: String) -> PlanError {
    PlanError::Syntax {
        origin,
        message: format!("mappings and lists nest deeper than {MAX_DEPTH} levels, the limit of a plan document"),
    }
}

fn load(source: &PlanSource) -> Result<Value, PlanError> {
    match source {
        // Measured before it is copied: copying a value is recursive.
        PlanSource::Value(v) if depth_exceeds(v, MAX_DEPTH) => Err(too_deep("<value>".to_owned())),
        PlanSource::Value(v) => Ok(v.clone()),
        PlanSource::Text(text) => parse_yaml(text, "<string>"),
        PlanSource::File(path) => {
            let text = read_plan_file(path)?;
            let origin = path.display().to_string();
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
                // serde_json stops at its own depth (128); the plan's limit is the YAML one.
                let value: Value = serde_json::from_str(&text).map_err(|e| PlanError::Syntax {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
                if depth_exceeds(&value, MAX_DEPTH) {
                    return Err(too_deep(origin));
                }
                Ok(value)
            } else {
                parse_yaml_with(&text, &origin, false)
            }
        }
    }
}

/// What a file that is not a regular file is, for messages (`a directory`, `a FIFO`, ...).
pub fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Reads a plan file: a regular file (checked before opening, so a FIFO cannot block the read,
/// and again on the open file) of at most [`MAX_PLAN_BYTES`], as UTF-8 text.
fn read_plan_file(path: &Path) -> Result<String, PlanError> {
    use std::io::Read;
    let io = |source| PlanError::Read {
        path: path.to_path_buf(),
        source,
    };
    let regular = |metadata: &std::fs::Metadata| {
        if metadata.is_file() {
            Ok(())
        } else {
            Err(PlanError::NotAFile {
                path: path.to_path_buf(),
                kind: file_kind(&metadata.file_type()),
            })
        }
    };
    regular(&std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    regular(&file.metadata().map_err(io)?)?;
    let mut bytes = Vec::new();
    file.take(MAX_PLAN_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_PLAN_BYTES {
        return Err(PlanError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_PLAN_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|_| io(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")))
}

/// Whether a file's top-level mapping looks like a plan: empty, or with a plan key or a near
/// miss of one (a misspelt plan still gets its unknown-key message and suggestion).
fn looks_like_plan(map: &Map<String, Value>) -> bool {
    map.is_empty()
        || map
            .keys()
            .any(|k| super::TOP_KEYS.contains(&k.as_str()) || suggest(k, super::TOP_KEYS.iter().copied()).is_some())
}

/// Merges `overlay` into `base`: mappings merge key by key, recursively; any other value
/// (a scalar or a list) replaces what was there.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Most steps an override path may have. Plan documents nest a few levels (YAML files at most
/// 64, JSON 128); each level costs stack wherever the document is walked, and a 150,000-step
/// path overflowed the engine's 64 MiB stack in a nested plan (60,000 did not).
pub const MAX_OVERRIDE_STEPS: usize = 10_000;

/// One step of an override path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PathStep {
    /// A mapping key.
    Key(String),
    /// A list index.
    Index(usize),
}

/// The steps of a dotted path with list indices (`a.b[2].c`), as overrides and the `config`
/// transform read them.
pub(crate) fn parse_override_path(path: &str) -> Result<Vec<PathStep>, String> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && (steps.is_empty() || rest.is_empty()) {
            return Err(format!("empty key in `{path}`"));
        }
        if !key.is_empty() {
            steps.push(PathStep::Key(key.to_owned()));
        }
        while let Some(after) = rest.strip_prefix('[') {
            let close = after.find(']').ok_or_else(|| format!("unclosed `[` in `{path}`"))?;
            let index = after[..close]
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("`{}` is not a list index in `{path}`", &after[..close]))?;
            steps.push(PathStep::Index(index));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("unexpected `{rest}` in `{path}`"));
        }
        if steps.len() > MAX_OVERRIDE_STEPS {
            return Err(format!(
                "the path has more than {MAX_OVERRIDE_STEPS} keys and indices; plans nest a few levels"
            ));
        }
    }
    Ok(steps)
}

/// Applies one `key.path[i].x=value` override. The value is typed like a YAML flow value:
/// `by=0.5` is a number, `shape=[2,4]` a list, `name='007'` a string.
pub fn apply_override(doc: &mut Value, assignment: &str) -> Result<(), PlanError> {
    let origin = format!("override `{assignment}`");
    let syntax = |message: String| PlanError::Syntax {
        origin: origin.clone(),
        message,
    };
    let (path, text) = assignment
        .split_once('=')
        .ok_or_else(|| syntax("expected key.path=value".to_owned()))?;
    let steps = parse_override_path(path.trim()).map_err(syntax)?;
    if steps.len() > MAX_DEPTH {
        return Err(syntax(format!(
            "the path has {} steps; a plan document nests at most {MAX_DEPTH} levels",
            steps.len()
        )));
    }
    let value = if text.trim().is_empty() {
        Value::String(String::new())
    } else {
        parse_yaml(text, &origin)?
    };
    // The path and the value are each within the limit; together they may not be.
    if depth_exceeds(&value, MAX_DEPTH - steps.len()) {
        return Err(too_deep(origin));
    }
    // The location of step `i` is built only for an error: extending it at every step copied
    // the path so far, quadratic in the path's length (issue 9: 60,000 segments took > 20 s).
    let location_at = |i: usize| {
        Location(
            steps[..=i]
                .iter()
                .map(|step| match step {
                    PathStep::Key(key) => Segment::Key(key.clone()),
                    PathStep::Index(index) => Segment::Index(*index),
                })
                .collect(),
        )
    };
    let mut node = doc;
    for (i, step) in steps.iter().enumerate() {
        node = match step {
            PathStep::Key(key) => {
                if node.is_null() {
                    *node = Value::Object(Map::new());
                }
                let Value::Object(map) = node else {
                    return Err(PlanError::invalid(
                        &location_at(i),
                        "override walks into a value that is not a mapping",
                    ));
                };
                map.entry(key.as_str()).or_insert(Value::Null)
            }
            PathStep::Index(index) => {
                let Value::Array(list) = node else {
                    return Err(PlanError::invalid(
                        &location_at(i),
                        "override indexes a value that is not a list",
                    ));
                };
                let len = list.len();
                list.get_mut(*index).ok_or_else(|| {
                    PlanError::invalid(
                        &location_at(i),
                        format!("override index {index} is past the end of a list of {len}"),
                    )
                })?
            }
        };
    }
    *node = value;
    Ok(())
}

/// Loads, merges and overrides a plan. An empty list of sources gives an empty plan.
pub fn assemble(sources: &[PlanSource], overrides: &[String]) -> Result<Value, PlanError> {
    let mut doc = Value::Object(Map::new());
    for source in sources {
        let value = load(source)?;
        let origin = || match source {
            PlanSource::File(p) => p.display().to_string(),
            _ => "<string>".to_owned(),
        };
        let value = match value {
            Value::Null => Value::Object(Map::new()),
            Value::Object(map) if matches!(source, PlanSource::File(_)) && !looks_like_plan(&map) => {
                return Err(PlanError::NotAPlan {
                    origin: origin(),
                    found: "a mapping without any of those keys",
                });
            }
            v @ Value::Object(_) => v,
            other => {
                return Err(PlanError::NotAPlan {
                    origin: origin(),
                    found: kind_of(&other),
                });
            }
        };
        merge(&mut doc, value);
    }
    for assignment in overrides {
        apply_override(&mut doc, assignment)?;
    }
    Ok(doc)
}

/// Whether a command-line argument is an override rather than a plan file.
pub fn looks_like_override(arg: &str) -> bool {
    !Path::new(arg).exists() && arg.contains('=') && !arg.starts_with('=')
}

/// A short description of a value's type for messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_maps_recursively_and_replaces_lists() {
        let mut a = json!({"output": {"path": "a", "shard": "5GB"}, "transforms": [1, 2]});
        merge(&mut a, json!({"output": {"path": "b"}, "transforms": [3]}));
        assert_eq!(a, json!({"output": {"path": "b", "shard": "5GB"}, "transforms": [3]}));
    }

    #[test]
    fn overrides_are_typed_like_yaml() {
        let mut doc = json!({"transforms": [{"scale_": {"target": "x", "by": 1}}]});
        apply_override(&mut doc, "transforms[0].scale_.by=0.5").unwrap();
        apply_override(&mut doc, "output.shape=[2,4]").unwrap();
        apply_override(&mut doc, "output.name='007'").unwrap();
        assert_eq!(doc["transforms"][0]["scale_"]["by"], json!(0.5));
        assert_eq!(doc["output"]["shape"], json!([2, 4]));
        assert_eq!(doc["output"]["name"], json!("007"));
    }

    /// Issue 15 item 6: booleans are PyYAML's (`true/false/yes/no/on/off` in the spellings it
    /// takes); one-letter names and other case variants are strings; quoted scalars stay
    /// strings; numbers and null read as before.
    #[test]
    fn booleans_are_read_as_pyyaml_reads_them() {
        let doc = parse_yaml(
            "t: [true, True, TRUE, yes, Yes, YES, on, On, ON]\n\
             f: [false, False, FALSE, no, No, NO, off, Off, OFF]\n\
             s: [y, Y, n, N, x, yEs, oN, 'yes', \"on\", tRUE]\n\
             n: [1, -2, 0.5, 1e-6, 0x1F, 1_000, null, ~]\n\
             copy: {from: y, to: y_copy}\n",
            "<test>",
        )
        .unwrap();
        assert_eq!(doc["t"], json!(vec![true; 9]));
        assert_eq!(doc["f"], json!(vec![false; 9]));
        assert_eq!(
            doc["s"],
            json!(["y", "Y", "n", "N", "x", "yEs", "oN", "yes", "on", "tRUE"])
        );
        let plain = parse_yaml("n: [1, -2, 0.5, 1e-6, 0x1F, 1_000, null, ~]", "<test>").unwrap();
        assert_eq!(doc["n"], plain["n"]);
        assert_eq!(doc["n"][0], json!(1));
        assert_eq!(doc["n"][6], Value::Null);
        assert_eq!(doc["copy"], json!({"from": "y", "to": "y_copy"}));
        // Overrides read values the same way.
        let mut doc = json!({});
        apply_override(&mut doc, "a=y").unwrap();
        apply_override(&mut doc, "b=on").unwrap();
        assert_eq!(doc, json!({"a": "y", "b": true}));
    }

    /// Issue 9 item 11b: the walk was quadratic in the path's length (each step copied the
    /// location so far); deeper than [`MAX_OVERRIDE_STEPS`] is refused before walking.
    #[test]
    fn long_override_paths_are_capped_before_they_are_walked() {
        // As deep as a plan document may nest: applied.
        let mut doc = json!({});
        let path = vec!["a"; MAX_DEPTH].join(".");
        apply_override(&mut doc, &format!("{path}=1")).unwrap();
        let mut node = &doc;
        for _ in 0..MAX_DEPTH {
            node = &node["a"];
        }
        assert_eq!(node, &json!(1));
        // Deeper: refused by the document's limit; far longer: refused while parsing the path,
        // which stops at MAX_OVERRIDE_STEPS (a 60,000-step path once took > 20 s).
        let err = apply_override(&mut json!({}), &format!("{path}.a=1")).unwrap_err();
        assert!(
            err.to_string().contains(&format!("nests at most {MAX_DEPTH} levels")),
            "{err}"
        );
        let long = vec!["a"; 60_000].join(".");
        let err = apply_override(&mut json!({}), &format!("{long}=1")).unwrap_err();
        assert!(err.to_string().contains("more than 10000 keys"));
        // The error's location is still built for a step deep in a path.
        let mut doc = json!({"a": {"b": 1}});
        let err = apply_override(&mut doc, "a.b.c=2").unwrap_err();
        assert!(err.to_string().starts_with("a.b.c: override walks into"), "{err}");
    }

    #[test]
    fn override_errors_name_the_place() {
        let mut doc = json!({"transforms": []});
        let err = apply_override(&mut doc, "transforms[2].x=1").unwrap_err();
        assert!(err.to_string().contains("transforms[2]"), "{err}");
        assert!(apply_override(&mut doc, "novalue").is_err());
        assert!(apply_override(&mut doc, "a[x]=1").is_err());
    }

    #[test]
    fn malformed_yaml_names_line() {
        let err = parse_yaml("a: [1, 2\n", "plan.yaml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("plan.yaml") && text.contains("line 1"), "{text}");
    }

    fn file_plan(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// Issue 9 item 9: a file that is not a plan is named so, and nothing of it is quoted.
    #[test]
    fn a_file_that_is_not_a_plan_quotes_nothing_of_it() {
        let shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n";
        for (name, text) in [
            ("shadow", shadow),
            ("p.json", r#"{"rootsecret": 1}"#),
            ("text", "rootsecret words\n"),
            ("list.yaml", "- rootsecret\n"),
        ] {
            let (_dir, path) = file_plan(name, text);
            let err = assemble(&[PlanSource::File(path)], &[]).unwrap_err();
            assert!(matches!(err, PlanError::NotAPlan { .. }), "{name}: {err:?}");
            let message = err.to_string();
            assert!(message.contains("not a plan") && !message.contains("root"), "{message}");
        }
        // A misspelt plan key is still a plan, with its suggestion (checked when the plan is
        // built from the document).
        let (_dir, path) = file_plan("typo.yaml", "transfroms: []\n");
        assert!(assemble(&[PlanSource::File(path)], &[]).is_ok());
    }

    #[test]
    fn syntax_errors_in_files_give_the_place_without_the_line() {
        let (_dir, path) = file_plan("bad.yaml", "a: b: rootsecret\n");
        let message = assemble(&[PlanSource::File(path)], &[]).unwrap_err().to_string();
        assert!(
            message.contains("line 1, column 5") && !message.contains("rootsecret"),
            "{message}"
        );
        let (_dir, path) = file_plan("bad.json", r#"{"rootsecret": 1,}"#);
        let message = assemble(&[PlanSource::File(path)], &[]).unwrap_err().to_string();
        assert!(
            message.contains("line 1") && !message.contains("rootsecret"),
            "{message}"
        );
    }

    #[test]
    fn directories_and_devices_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let err = assemble(&[PlanSource::File(dir.path().to_path_buf())], &[]).unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::NotAFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{err:?}"
        );
        #[cfg(unix)]
        {
            let err = assemble(&[PlanSource::File("/dev/zero".into())], &[]).unwrap_err();
            assert!(
                matches!(
                    err,
                    PlanError::NotAFile {
                        kind: "a character device",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("/dev/zero: it is a character device"), "{err}");
        }
    }

    #[test]
    fn plan_files_past_the_size_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_PLAN_BYTES + 1).unwrap();
        let err = assemble(&[PlanSource::File(path.clone())], &[]).unwrap_err();
        assert!(matches!(err, PlanError::TooLarge { .. }), "{err:?}");
        assert!(err.to_string().contains("16 MiB"), "{err}");
        // At the limit it is read.
        file.set_len(MAX_PLAN_BYTES).unwrap();
        assert_eq!(read_plan_file(&path).unwrap().len() as u64, MAX_PLAN_BYTES);
    }

    /// `depth` flow lists, one inside the other.
    fn flow(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn every_source_nests_at_most_max_depth() {
        use crate::plan::host::depth_exceeds;
        // YAML: the parser's own budget, set from the one constant. The top-level mapping is a level.
        let ok = parse_yaml(&format!("a: {}", flow(MAX_DEPTH - 1)), "t").unwrap();
        assert!(!depth_exceeds(&ok, MAX_DEPTH) && depth_exceeds(&ok, MAX_DEPTH - 1));
        let err = parse_yaml(&format!("a: {}", flow(MAX_DEPTH)), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("depth"), "{err}");
        // Block style too.
        let block: String = (0..=MAX_DEPTH).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse_yaml(&block, "t").is_err());
        // A JSON file: serde_json would allow 128.
        let dir = std::env::temp_dir().join(format!("bs-depth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, deep) = (dir.join("ok.json"), dir.join("deep.json"));
        std::fs::write(&ok, format!("{{\"transforms\": {}}}", flow(MAX_DEPTH - 1))).unwrap();
        std::fs::write(&deep, format!("{{\"transforms\": {}}}", flow(MAX_DEPTH))).unwrap();
        assert!(assemble(&[PlanSource::File(ok)], &[]).is_ok());
        let err = assemble(&[PlanSource::File(deep)], &[]).unwrap_err().to_string();
        assert!(
            err.contains("deep.json") && err.contains(&format!("deeper than {MAX_DEPTH}")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // An already-built value, measured before it is copied.
        let value: Value = serde_json::from_str(&format!("{{\"a\": {}}}", flow(MAX_DEPTH))).unwrap();
        assert!(assemble(&[PlanSource::Value(value)], &[]).is_err());
    }

    #[test]
    fn an_override_path_and_value_together_stay_within_the_limit() {
        let path = |steps: usize| format!("a{}", ".a".repeat(steps - 1));
        let mut doc = json!({});
        apply_override(&mut doc, &format!("{}=1", path(MAX_DEPTH))).unwrap();
        assert!(!crate::plan::host::depth_exceeds(&doc, MAX_DEPTH));
        let err = apply_override(&mut json!({}), &format!("{}=[1]", path(MAX_DEPTH))).unwrap_err();
        assert!(err.to_string().contains(&format!("deeper than {MAX_DEPTH}")), "{err}");
        let err = apply_override(&mut json!({}), &format!("a={}", flow(MAX_DEPTH))).unwrap_err();
        assert!(
            err.to_string()
                .ends_with(&format!("deeper than {MAX_DEPTH} levels, the limit of a plan document")),
            "{err}"
        );
        let err = apply_override(&mut json!({}), &format!("a={}", flow(MAX_DEPTH + 1))).unwrap_err();
        assert!(err.to_string().contains("depth"), "{err}");
        // A long path is refused before it is walked (it once built a location per step, each a
        // copy of the last: quadratic).
        let err = apply_override(&mut json!({}), &format!("{}=1", path(200_000))).unwrap_err();
        assert!(
            err.to_string().contains("more than 10000 keys"),
            "{}",
            &err.to_string()[err.to_string().len() - 100..]
        );
    }

    #[test]
    fn assemble_rejects_non_mapping() {
        let err = assemble(&[PlanSource::Text("- a\n- b\n".into())], &[]).unwrap_err();
        assert!(err.to_string().contains("mapping"));
    }
}
