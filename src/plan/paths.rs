//! Where the paths a plan names resolve (issue 14 item 3). A path written in a plan file resolves
//! against that file's folder; a path given on the command line (`-o`, `-e`, inputs), in Python
//! (a dict, YAML text) or at the `-i` prompt resolves against the working directory; `~` and
//! `~/…` are the home directory everywhere. `hf://org/name[@revision]` names a model in the
//! Hugging Face cache (`formats::hub`) and is never rebased.
//!
//! The paths of a plan are its inputs, its output's path and the payload keys of
//! [`super::LOCATION_KEYS`] (`save`, `load`, `execute`, `extract_lora`, `merge_lora`), through
//! `execute`'s nested transform lists and plan mappings. [`super::assemble`] rebases each plan
//! file's document on the file's folder before merging, so what the command line and overrides
//! add afterwards stays relative to the working directory; `~` is expanded where a path is read
//! ([`expand_home`]).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use crate::formats::hub::{expand_home, is_remote, HF_SCHEME};

/// A path as it resolves from a document whose relative paths are relative to `base` (`None`:
/// the working directory): `~` expanded, then joined to `base` when still relative. `hf://` ids
/// and empty strings stay as they are (the parsers report the latter).
pub fn resolve(text: &str, base: Option<&Path>) -> String {
    if text.is_empty() || is_remote(text) {
        return text.to_owned();
    }
    let path = expand_home(text);
    let path = match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path,
    };
    path.display().to_string()
}

fn rebase_string(text: &mut String, base: Option<&Path>) {
    let resolved = resolve(text, base);
    if resolved != *text {
        *text = resolved;
    }
}

/// An `inputs` entry (`alias::path` or a bare path) with its path rebased.
fn rebase_input(text: &mut String, base: Option<&Path>) {
    match text.split_once("::") {
        Some((alias, path)) if !path.is_empty() => {
            *text = format!("{alias}::{}", resolve(path, base));
        }
        Some(_) => {}
        None => rebase_string(text, base),
    }
}

/// Rebases the paths of a plan document (`inputs`, `output`, the transforms' locations) on
/// `base`; see the module documentation. Values of an unexpected shape are left for the parsers
/// to report.
pub fn rebase_document(doc: &mut Value, base: Option<&Path>) {
    let Value::Object(map) = doc else {
        return;
    };
    rebase_plan(map, base);
}

fn rebase_plan(map: &mut Map<String, Value>, base: Option<&Path>) {
    match map.get_mut("inputs") {
        Some(Value::String(text)) => rebase_input(text, base),
        Some(Value::Array(items)) => items.iter_mut().for_each(|item| {
            if let Value::String(text) = item {
                rebase_input(text, base);
            }
        }),
        Some(Value::Object(aliases)) => aliases.values_mut().for_each(|v| {
            if let Value::String(path) = v {
                rebase_string(path, base);
            }
        }),
        _ => {}
    }
    match map.get_mut("output") {
        Some(Value::String(path)) => rebase_string(path, base),
        Some(Value::Object(output)) => {
            if let Some(Value::String(path)) = output.get_mut("path") {
                rebase_string(path, base);
            }
        }
        _ => {}
    }
    if let Some(Value::Array(items)) = map.get_mut("transforms") {
        items.iter_mut().for_each(|item| rebase_transform(item, base));
    }
}

/// Rebases the locations of one transform entry (`{name: payload}`) on `base`, and those of the
/// nested plans of `execute`.
pub fn rebase_transform(item: &mut Value, base: Option<&Path>) {
    let Value::Object(map) = item else {
        return;
    };
    for (name, payload) in map.iter_mut() {
        let Value::Object(payload) = payload else {
            continue;
        };
        if let Some(Value::String(path)) = super::location_key(name).and_then(|k| payload.get_mut(k)) {
            rebase_string(path, base);
        }
        if name != "execute" {
            continue;
        }
        match payload.get_mut("plan") {
            Some(Value::Object(plan)) => rebase_plan(plan, base),
            _ => {
                if let Some(Value::Array(items)) = payload.get_mut("transforms") {
                    items.iter_mut().for_each(|item| rebase_transform(item, base));
                }
            }
        }
    }
}

/// The folder a plan file's relative paths resolve against: its parent as given (`examples` for
/// `examples/demo.yaml`, so messages stay short), `None` for a file in the working directory.
pub fn plan_folder(file: &Path) -> Option<PathBuf> {
    let file = expand_home(&file.to_string_lossy());
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => Some(parent.to_path_buf()),
        _ => None,
    }
}

/// The working directory as an absolute path, for making a document's paths absolute so it
/// replays from any folder (`None` when it cannot be read).
pub fn working_directory() -> Option<PathBuf> {
    std::env::current_dir().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_file_paths_rebase_on_its_folder() {
        let mut doc = json!({
            "inputs": ["base::m/base.safetensors", "ft::/abs/ft", "hub::hf://org/name@v1", "x::~/y"],
            "transforms": [
                {"save": {"path": "keep.npz", "target": "w"}},
                {"load": {"path": "/abs/extra.npz", "alias": "x"}},
                {"execute": {"path": "sub.yaml"}},
                {"execute": {"plan": {"inputs": {"n": "n.safetensors"}, "output": "o.pt"}}},
                {"execute": {"transforms": [{"extract_lora": {"path": "lora"}}]}},
                {"merge_lora": {"adapter": "adapter", "alias": "base"}},
                {"scale_": {"target": "path", "by": 2}},
            ],
            "output": {"path": "out"},
        });
        rebase_document(&mut doc, Some(Path::new("plans")));
        let home = std::env::var("HOME").unwrap();
        assert_eq!(
            doc["inputs"],
            json!([
                "base::plans/m/base.safetensors",
                "ft::/abs/ft",
                "hub::hf://org/name@v1",
                format!("x::{home}/y")
            ])
        );
        let t = &doc["transforms"];
        assert_eq!(t[0]["save"]["path"], "plans/keep.npz");
        assert_eq!(t[1]["load"]["path"], "/abs/extra.npz");
        assert_eq!(t[2]["execute"]["path"], "plans/sub.yaml");
        assert_eq!(t[3]["execute"]["plan"]["inputs"]["n"], "plans/n.safetensors");
        assert_eq!(t[3]["execute"]["plan"]["output"], "plans/o.pt");
        assert_eq!(t[4]["execute"]["transforms"][0]["extract_lora"]["path"], "plans/lora");
        assert_eq!(t[5]["merge_lora"]["adapter"], "plans/adapter");
        assert_eq!(t[6]["scale_"]["target"], "path");
        assert_eq!(doc["output"]["path"], "plans/out");
    }

    #[test]
    fn home_is_expanded_and_odd_shapes_are_left() {
        let home = std::env::var("HOME").unwrap();
        assert_eq!(expand_home("~"), PathBuf::from(&home));
        assert_eq!(expand_home("~/a/b"), PathBuf::from(&home).join("a/b"));
        assert_eq!(expand_home("~user/a"), PathBuf::from("~user/a"));
        assert_eq!(expand_home("a/~"), PathBuf::from("a/~"));
        assert_eq!(resolve("", Some(Path::new("d"))), "");
        assert_eq!(resolve("hf://a/b", Some(Path::new("d"))), "hf://a/b");
        let mut doc = json!({"inputs": 3, "output": {"path": 1}, "transforms": [{"save": "x"}, "exit"]});
        let before = doc.clone();
        rebase_document(&mut doc, Some(Path::new("d")));
        assert_eq!(doc, before);
        assert_eq!(plan_folder(Path::new("plan.yaml")), None);
        assert_eq!(plan_folder(Path::new("a/plan.yaml")), Some(PathBuf::from("a")));
    }
}
