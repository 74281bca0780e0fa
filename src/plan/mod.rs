//! The plan language's document layer (SPEC §2): reading YAML/JSON/dicts, merging, overrides,
//! and the top-level `inputs` / `transforms` / `output` sections. Transform payloads are parsed by
//! `transforms`; checking the plan against checkpoint headers is the executor's job.

pub mod document;
pub mod error;
pub mod host;
pub mod location;
pub mod mergekit;
pub mod oneline;
pub mod paths;
pub mod payload;

use std::path::PathBuf;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use document::{assemble, PlanSource};
pub use error::PlanError;
pub use location::Location;

use document::kind_of;

use crate::formats::Format;
use error::suggest;

/// The deepest nesting of mappings and lists a plan document may have (a flat mapping is 1),
/// however it is written: the YAML parser's budget is set from it (it was the parser's default),
/// and JSON files, Python values, overrides and one-line transforms are held to it. Deep enough
/// for any plan, shallow enough for every recursive walk over a document.
pub const MAX_DEPTH: usize = 64;

/// The most values (mappings, lists and scalars) one YAML text or Python plan value may hold: the
/// YAML parser's budget (its default), and the bound on a Python value whose lists share children.
pub const MAX_NODES: usize = 250_000;

/// The alias a single bare input path gets.
pub const DEFAULT_ALIAS: &str = "model";

/// One `alias::path` input.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// The alias references use.
    pub alias: String,
    /// The checkpoint path (file or directory).
    pub path: PathBuf,
}

/// The `output` section.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// Target file or directory.
    pub path: PathBuf,
    /// The format.
    pub format: Format,
    /// Whether a NumPy output is one bare `.npy` (one tensor) rather than an `.npz`.
    pub npy: bool,
    /// Whether `path` names a single file (by its extension) rather than a directory.
    pub single_file: bool,
    /// Shard budget in bytes for directories; `None` disables sharding.
    pub shard: Option<u64>,
    /// Which alias to write (SPEC §6.3).
    pub alias: Option<String>,
    /// Whether non-weight files beside a directory input are copied.
    pub sidecars: bool,
    /// Whether a directory output may replace weight files this tool did not write.
    pub overwrite: bool,
}

/// Shard budget of directory outputs when the plan does not give one.
pub const DEFAULT_SHARD: &str = "5GB";

/// One entry of `transforms`, not yet parsed: its name, payload and place.
#[derive(Debug, Clone)]
pub struct RawTransform {
    /// The transform name (`scale_`).
    pub name: String,
    /// Its payload (`Null` for a bare name such as `exit`).
    pub payload: Value,
    /// `transforms[i]`.
    pub location: Location,
}

/// A plan document, checked at the top level.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The inputs, in order.
    pub inputs: Vec<InputSpec>,
    /// The transforms, in order, unparsed.
    pub transforms: Vec<RawTransform>,
    /// The output, if any.
    pub output: Option<OutputSpec>,
    /// SHA-256 of the merged document without its locations ([`plan_sha256`]), recorded in the
    /// output metadata.
    pub sha256: String,
    /// The plan files it was assembled from, in order (relative `execute` paths resolve against
    /// the first one's directory; all of them take part in `execute` cycle detection).
    pub files: Vec<PathBuf>,
}

const TOP_KEYS: &[&str] = &["inputs", "transforms", "output"];
const OUTPUT_KEYS: &[&str] = &["path", "format", "shard", "alias", "sidecars", "overwrite"];

fn check_keys(map: &Map<String, Value>, allowed: &[&str], location: &Location) -> Result<(), PlanError> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(PlanError::UnknownKey {
                location: location.clone(),
                key: key.clone(),
                suggestion: suggest(key, allowed.iter().copied()),
                expected: allowed.iter().map(|s| s.to_string()).collect(),
            });
        }
    }
    Ok(())
}

/// Whether `alias` is a valid alias name (a letter or `_`, then letters, digits, `_ - .`).
pub(crate) fn valid_alias(alias: &str) -> bool {
    let mut chars = alias.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// An input's path as it is opened: `~` expanded, an `hf://` id kept as written.
fn input_path(text: &str) -> PathBuf {
    PathBuf::from(paths::resolve(text, None))
}

fn parse_input(text: &str, location: &Location, single: bool) -> Result<InputSpec, PlanError> {
    match text.split_once("::") {
        Some((alias, path)) => {
            if !valid_alias(alias) {
                return Err(PlanError::invalid(
                    location,
                    format!("`{alias}` is not a valid alias (letters, digits, _ - .)"),
                ));
            }
            if path.is_empty() {
                return Err(PlanError::invalid(location, format!("input `{text}` has no path")));
            }
            Ok(InputSpec {
                alias: alias.to_owned(),
                path: input_path(path),
            })
        }
        None if single => Ok(InputSpec {
            alias: DEFAULT_ALIAS.to_owned(),
            path: input_path(text),
        }),
        None => Err(PlanError::invalid(
            location,
            format!("input `{text}` needs an alias when there are several inputs: write `alias::{text}`"),
        )),
    }
}

fn parse_inputs(value: Option<&Value>, location: Location) -> Result<Vec<InputSpec>, PlanError> {
    let inputs = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![parse_input(s, &location, true)?],
        Some(Value::Array(items)) => {
            let single = items.len() == 1;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => parse_input(s, &location.index(i), single),
                    other => Err(PlanError::invalid(
                        &location.index(i),
                        format!("expected \"alias::path\", got {}", kind_of(other)),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(Value::Object(map)) => map
            .iter()
            .map(|(alias, path)| {
                let at = location.key(alias);
                let Value::String(path) = path else {
                    return Err(PlanError::invalid(
                        &at,
                        format!("expected a path, got {}", kind_of(path)),
                    ));
                };
                if !valid_alias(alias) {
                    return Err(PlanError::invalid(&at, format!("`{alias}` is not a valid alias")));
                }
                Ok(InputSpec {
                    alias: alias.clone(),
                    path: input_path(path),
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(PlanError::invalid(
                &location,
                format!("expected a list of \"alias::path\", got {}", kind_of(other)),
            ))
        }
    };
    for (i, input) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|other| other.alias == input.alias) {
            return Err(PlanError::invalid(
                &location,
                format!("alias `{}` is defined twice", input.alias),
            ));
        }
    }
    Ok(inputs)
}

fn parse_transforms(value: Option<&Value>, location: Location) -> Result<Vec<RawTransform>, PlanError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(PlanError::invalid(
                &location,
                format!("expected a list of transforms, got {}", kind_of(other)),
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| RawTransform::from_value(item, location.index(i)))
        .collect()
}

impl RawTransform {
    /// One entry of a transform list: a bare name (`exit`) or a one-key mapping. `at` is where
    /// it sits (`transforms[i]`); the prompt and `-e` number their transforms after the plan's.
    /// `~` in its locations is the home directory ([`paths`]).
    pub fn from_value(item: &Value, at: Location) -> Result<RawTransform, PlanError> {
        let mut item = item.clone();
        paths::rebase_transform(&mut item, None);
        match &item {
            Value::String(name) => Ok(RawTransform {
                name: name.clone(),
                payload: Value::Null,
                location: at,
            }),
            Value::Object(map) if map.len() == 1 => {
                let (name, payload) = map.iter().next().expect("map has one entry");
                Ok(RawTransform {
                    name: name.clone(),
                    payload: payload.clone(),
                    location: at,
                })
            }
            Value::Object(map) => Err(PlanError::invalid(
                &at,
                format!(
                    "a transform is a mapping with exactly one key (its name), got keys {}",
                    map.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                ),
            )),
            other => Err(PlanError::invalid(
                &at,
                format!("expected a transform, got {}", kind_of(other)),
            )),
        }
    }
}

/// The format a file output's extension names, and whether it is a bare `.npy`.
fn format_of(path: &std::path::Path) -> Option<(Format, bool)> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Format::of_name(&format!(".{ext}")).map(|f| (f, ext == "npy"))
}

/// Parses an `output`-shaped value (a path, or a mapping with the output keys) found at
/// `location`; `save` and nested plans use it too.
pub(crate) fn parse_output(value: Option<&Value>, location: Location) -> Result<Option<OutputSpec>, PlanError> {
    let empty = Map::new();
    let (path, map) = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(path)) => (path.clone(), &empty),
        Some(Value::Object(map)) => {
            check_keys(map, OUTPUT_KEYS, &location)?;
            let path = match map.get("path") {
                Some(Value::String(p)) => p.clone(),
                Some(other) => {
                    return Err(PlanError::invalid(
                        &location.key("path"),
                        format!("expected a path, got {}", kind_of(other)),
                    ))
                }
                None => {
                    return Err(PlanError::MissingKey {
                        location,
                        key: "path".into(),
                    })
                }
            };
            (path, map)
        }
        Some(other) => {
            return Err(PlanError::invalid(
                &location,
                format!("expected a path or a mapping, got {}", kind_of(other)),
            ))
        }
    };
    if path.is_empty() {
        return Err(PlanError::invalid(&location.key("path"), "empty output path"));
    }
    let path = PathBuf::from(paths::resolve(&path, None));
    let by_extension = format_of(&path);
    let format = match map.get("format") {
        None | Some(Value::Null) => by_extension.unwrap_or((Format::Safetensors, false)),
        Some(Value::String(f)) => match Format::parse(f) {
            Some(format) => (format, f.eq_ignore_ascii_case("npy")),
            None => {
                return Err(PlanError::invalid(
                    &location.key("format"),
                    format!("unknown format `{f}`; expected safetensors, torch, npz, npy or dcp"),
                ))
            }
        },
        Some(other) => {
            return Err(PlanError::invalid(
                &location.key("format"),
                format!("expected a format name, got {}", kind_of(other)),
            ))
        }
    };
    // `numpy` (or `npz`) to a `.npy` path writes that one tensor's `.npy`, never a zip under a
    // `.npy` name (issue 15 item 5).
    let (format, npy) = match (format, by_extension) {
        ((Format::NumPy, _), Some((_, true))) => (Format::NumPy, true),
        (format, _) => format,
    };
    let single_file = by_extension.is_some();
    let shard = match map.get("shard") {
        None | Some(Value::Null) => Some(DEFAULT_SHARD.to_owned()),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("none") => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(false)) => None,
        Some(other) => {
            return Err(PlanError::invalid(
                &location.key("shard"),
                format!("expected a size like 5GB or none, got {}", kind_of(other)),
            ))
        }
    };
    let shard = match shard {
        None => None,
        Some(text) => Some(
            crate::formats::parse_size(&text).map_err(|e| PlanError::invalid(&location.key("shard"), e.to_string()))?,
        ),
    };
    let alias = match map.get("alias") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) => Some(a.clone()),
        Some(other) => {
            return Err(PlanError::invalid(
                &location.key("alias"),
                format!("expected an alias, got {}", kind_of(other)),
            ))
        }
    };
    let flag = |key: &str, default: bool| match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(PlanError::invalid(
            &location.key(key),
            format!("expected true or false, got {}", kind_of(other)),
        )),
    };
    let sidecars = flag("sidecars", true)?;
    let overwrite = flag("overwrite", false)?;
    Ok(Some(OutputSpec {
        path,
        format,
        npy,
        single_file,
        shard,
        alias,
        sidecars,
        overwrite,
    }))
}

/// The document with every mapping's keys sorted, so the plan hash does not depend on the order
/// keys were written in (a Python dict, `yaml.safe_dump`).
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// What a file or directory location becomes in the hashed plan (issue 8): `*`, followed by the
/// extension when the extension chooses a format (`*.safetensors`, `*.npz`), so the hash still
/// tells a single file from a directory and one format from another, but not where it is.
pub const LOCATION_PLACEHOLDER: &str = "*";

/// The payload keys that name a file or directory location, by transform (not a structured
/// reference's `path`, which is a list): taken out of the plan hash here, made absolute in a
/// session's plan (`executor::session`).
pub const LOCATION_KEYS: &[(&str, &str)] = &[
    ("save", "path"),
    ("load", "path"),
    ("execute", "path"),
    ("extract_lora", "path"),
    ("merge_lora", "adapter"),
];

/// The key of a transform's payload that names a location, if it has one.
pub fn location_key(transform: &str) -> Option<&'static str> {
    LOCATION_KEYS.iter().find(|(t, _)| *t == transform).map(|(_, key)| *key)
}

fn placeholder(path: &str) -> Value {
    let path = std::path::Path::new(path);
    let ext = format_of(path)
        .and(path.extension())
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    Value::String(match ext {
        Some(ext) => format!("{LOCATION_PLACEHOLDER}.{ext}"),
        None => LOCATION_PLACEHOLDER.to_owned(),
    })
}

/// The alias an `inputs` entry defines, as [`parse_input`] reads it (`None` when it is malformed;
/// such a document never gets as far as being hashed).
fn input_alias(text: &str, single: bool) -> Option<&str> {
    match text.split_once("::") {
        Some((alias, _)) => Some(alias),
        None => single.then_some(DEFAULT_ALIAS),
    }
}

/// A plan document with its locations taken out (issue 8): each input becomes its alias, the
/// output path and the string `path` of `save`, `load` and `execute` become
/// [`LOCATION_PLACEHOLDER`], recursively through `execute`'s nested plans and transform lists.
/// Whatever does not have the expected shape is left as it is.
fn locationless(doc: &Value) -> Value {
    let Value::Object(map) = doc else {
        return doc.clone();
    };
    let mut out = map.clone();
    if let Some(inputs) = map.get("inputs") {
        let aliases: Option<Vec<Value>> = match inputs {
            Value::String(s) => input_alias(s, true).map(|a| vec![Value::String(a.to_owned())]),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => input_alias(s, items.len() == 1).map(|a| Value::String(a.to_owned())),
                    _ => None,
                })
                .collect(),
            Value::Object(m) => Some(m.keys().map(|a| Value::String(a.clone())).collect()),
            _ => None,
        };
        if let Some(aliases) = aliases {
            out.insert("inputs".to_owned(), Value::Array(aliases));
        }
    }
    match map.get("output") {
        Some(Value::String(path)) => {
            let mut output = Map::new();
            output.insert("path".to_owned(), placeholder(path));
            out.insert("output".to_owned(), Value::Object(output));
        }
        Some(Value::Object(output)) => {
            let mut output = output.clone();
            if let Some(Value::String(path)) = output.get("path") {
                let replaced = placeholder(path);
                output.insert("path".to_owned(), replaced);
            }
            out.insert("output".to_owned(), Value::Object(output));
        }
        _ => {}
    }
    if let Some(transforms) = map.get("transforms") {
        out.insert("transforms".to_owned(), locationless_transforms(transforms));
    }
    Value::Object(out)
}

fn locationless_transforms(transforms: &Value) -> Value {
    let Value::Array(items) = transforms else {
        return transforms.clone();
    };
    let items = items.iter().map(|item| match item {
        Value::Object(map) if map.len() == 1 => {
            let (name, payload) = map.iter().next().expect("map has one entry");
            let payload = match payload {
                Value::Object(p) if location_key(name).is_some() => {
                    let mut p = p.clone();
                    let key = location_key(name).expect("checked by the guard");
                    if let Some(Value::String(path)) = p.get(key) {
                        let replaced = placeholder(path);
                        p.insert(key.to_owned(), replaced);
                    }
                    if name == "execute" {
                        if let Some(plan) = p.get("plan") {
                            let replaced = locationless(plan);
                            p.insert("plan".to_owned(), replaced);
                        }
                        if let Some(nested) = p.get("transforms") {
                            let replaced = locationless_transforms(nested);
                            p.insert("transforms".to_owned(), replaced);
                        }
                    }
                    Value::Object(p)
                }
                other => other.clone(),
            };
            let mut one = Map::new();
            one.insert(name.clone(), payload);
            Value::Object(one)
        }
        other => other.clone(),
    });
    Value::Array(items.collect())
}

/// SHA-256 (hex) of a plan document as the output metadata records it: its locations taken out
/// ([`locationless`]) and its mappings' keys sorted ([`canonical`]), serialized as compact JSON.
/// The same plan over the same inputs hashes alike wherever its files are.
pub fn plan_sha256(doc: &Value) -> String {
    let canonical = serde_json::to_vec(&canonical(&locationless(doc))).expect("a JSON value always serializes");
    sha256_hex(&canonical)
}

/// SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Plan {
    /// Checks the top level of an assembled document.
    pub fn from_document(doc: &Value) -> Result<Plan, PlanError> {
        Plan::from_document_at(doc, &Location::root())
    }

    /// Checks a plan document that sits at `base` in another plan (a nested `execute` plan), so
    /// every location, including the transforms', names its place in the including plan.
    pub fn from_document_at(doc: &Value, base: &Location) -> Result<Plan, PlanError> {
        let Value::Object(map) = doc else {
            return Err(PlanError::invalid(
                base,
                format!("a plan is a mapping, not {}", kind_of(doc)),
            ));
        };
        check_keys(map, TOP_KEYS, base)?;
        let inputs = parse_inputs(map.get("inputs"), base.key("inputs"))?;
        let transforms = parse_transforms(map.get("transforms"), base.key("transforms"))?;
        let output = parse_output(map.get("output"), base.key("output"))?;
        let sha256 = plan_sha256(doc);
        Ok(Plan {
            inputs,
            transforms,
            output,
            sha256,
            files: Vec::new(),
        })
    }

    /// Assembles sources and overrides, then checks the top level.
    pub fn load(sources: &[PlanSource], overrides: &[String]) -> Result<Plan, PlanError> {
        let mut plan = Plan::from_document(&assemble(sources, overrides)?)?;
        plan.files = sources
            .iter()
            .filter_map(|s| match s {
                PlanSource::File(path) => Some(path.clone()),
                _ => None,
            })
            .collect();
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_forms() {
        let plan = Plan::from_document(&json!({"inputs": ["m.safetensors"]})).unwrap();
        assert_eq!(
            plan.inputs,
            vec![InputSpec {
                alias: "model".into(),
                path: "m.safetensors".into()
            }]
        );
        let plan = Plan::from_document(&json!({"inputs": ["a::x", "b::y/z"]})).unwrap();
        assert_eq!(plan.inputs[1].alias, "b");
        assert!(Plan::from_document(&json!({"inputs": ["x", "y"]})).is_err());
        assert!(Plan::from_document(&json!({"inputs": ["a::x", "a::y"]})).is_err());
        let plan = Plan::from_document(&json!({"inputs": {"m": "x"}})).unwrap();
        assert_eq!(plan.inputs[0].alias, "m");
    }

    #[test]
    fn unknown_top_key() {
        let err = Plan::from_document(&json!({"input": []})).unwrap_err().to_string();
        assert!(
            err.contains("unknown key `input`") && err.contains("did you mean `inputs`"),
            "{err}"
        );
        let err = Plan::from_document(&json!({"output": {"path": "x", "shards": "1GB"}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("output") && err.contains("`shards`"), "{err}");
    }

    #[test]
    fn transforms_forms() {
        let plan = Plan::from_document(&json!({"transforms": ["exit", {"delete": {"target": "x"}}]})).unwrap();
        assert_eq!(plan.transforms[0].name, "exit");
        assert_eq!(plan.transforms[1].location.to_string(), "transforms[1]");
        assert!(Plan::from_document(&json!({"transforms": [{"a": 1, "b": 2}]})).is_err());
    }

    #[test]
    fn output_forms() {
        let plan = Plan::from_document(&json!({"output": "out/x.safetensors"})).unwrap();
        let out = plan.output.unwrap();
        assert!(out.single_file);
        assert_eq!(out.format, Format::Safetensors);
        let plan = Plan::from_document(&json!({"output": {"path": "out", "shard": "100MB", "alias": "base"}})).unwrap();
        let out = plan.output.unwrap();
        assert_eq!(out.shard, Some(100_000_000));
        assert!(!out.single_file);
        let plan = Plan::from_document(&json!({"output": {"path": "out", "shard": "none"}})).unwrap();
        assert_eq!(plan.output.unwrap().shard, None);
    }

    /// Issue 15 item 5: `numpy` (or `npz`) to a `.npy` path is a bare `.npy`, never a zip
    /// under that name; to an `.npz` path an `.npz`.
    #[test]
    fn numpy_to_an_npy_path_is_an_npy() {
        for format in ["numpy", "npz", "npy", "NumPy"] {
            let plan = Plan::from_document(&json!({"output": {"path": "o/x.npy", "format": format}})).unwrap();
            let out = plan.output.unwrap();
            assert!(out.npy && out.single_file && out.format == Format::NumPy, "{format}");
        }
        let plan = Plan::from_document(&json!({"output": {"path": "o/x.npz", "format": "numpy"}})).unwrap();
        assert!(!plan.output.unwrap().npy);
        let plan = Plan::from_document(&json!({"output": "o/x.npy"})).unwrap();
        assert!(plan.output.unwrap().npy);
    }

    #[test]
    fn sha_ignores_key_order() {
        let a = Plan::from_document(&json!({"inputs": ["x"], "output": {"path": "o", "shard": "1GB"}})).unwrap();
        let b = Plan::from_document(&json!({"output": {"shard": "1GB", "path": "o"}, "inputs": ["x"]})).unwrap();
        assert_eq!(a.sha256, b.sha256);
    }

    #[test]
    fn sha_ignores_locations() {
        // Issue 8: the same plan over files elsewhere hashes alike.
        let plan = |dir: &str| {
            json!({
                "inputs": [format!("base::{dir}/base"), format!("ft::{dir}/ft.safetensors")],
                "transforms": [
                    {"load": {"path": format!("{dir}/extra.npz"), "alias": "x"}},
                    {"save": {"path": format!("{dir}/keep"), "alias": "x"}},
                    {"execute": {"path": format!("{dir}/sub.yaml")}},
                    {"execute": {"plan": {"inputs": [format!("{dir}/n.safetensors")], "output": format!("{dir}/n.pt")}}},
                    {"execute": {"transforms": [{"save": {"path": format!("{dir}/t.npz"), "target": "w"}}]}},
                    {"delete": {"target": {"alias": "ft", "path": ["model", "$x"]}}},
                ],
                "output": {"path": format!("{dir}/out.safetensors"), "alias": "base"},
            })
        };
        let a = Plan::from_document(&plan("/data/run1")).unwrap();
        let b = Plan::from_document(&plan("rel/other")).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.sha256, plan_sha256(&plan("x")));
        // Every form of an input is its alias; a path string output is the path mapping.
        let forms = [
            json!({"inputs": "a/m.safetensors", "output": "o/x.safetensors"}),
            json!({"inputs": ["b/m"], "output": {"path": "p/y.safetensors"}}),
            json!({"inputs": ["model::c"], "output": "z.safetensors"}),
            json!({"inputs": {"model": "d"}, "output": "q/r.SafeTensors"}),
        ];
        let shas: Vec<String> = forms.iter().map(plan_sha256).collect();
        assert!(shas.windows(2).all(|w| w[0] == w[1]), "{shas:?}");
        // What the plan means still counts: aliases, a format-choosing extension, a structured
        // reference's segments.
        let other = |f: &dyn Fn(&mut Value)| {
            let mut doc = plan("d");
            f(&mut doc);
            plan_sha256(&doc)
        };
        let base = plan_sha256(&plan("d"));
        assert_ne!(base, other(&|d| d["inputs"][0] = json!("b2::d/base")));
        assert_ne!(base, other(&|d| d["output"]["path"] = json!("d/out.npz")));
        assert_ne!(base, other(&|d| d["output"]["path"] = json!("d/out")));
        assert_ne!(
            base,
            other(&|d| d["transforms"][1]["save"]["path"] = json!("d/keep.pt"))
        );
        assert_ne!(
            base,
            other(&|d| d["transforms"][5]["delete"]["target"]["path"] = json!(["model", "$y"]))
        );
        assert_eq!(
            base,
            other(&|d| d["transforms"][2]["execute"]["path"] = json!("e/f/sub.yaml"))
        );
    }

    #[test]
    fn sha_is_stable() {
        let a = Plan::from_document(&json!({"inputs": ["x"]})).unwrap();
        let b = Plan::from_document(&json!({"inputs": ["x"]})).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.sha256.len(), 64);
    }
}
