//! MergeKit configurations translated into plan documents (issue 13 item 3): a `mergekit-yaml`
//! config (`merge_method`, `models` or `slices`, `base_model`, `parameters` with filters and
//! gradients, `dtype`/`out_dtype`, `tokenizer_source: base`) becomes `inputs`, one `merge` step
//! (plus layer-count assertions for `slices`) and an `output`; a `mergekit-moe` config
//! (`base_model`, `experts`, `gate_mode`, `experts_per_token`, `dtype`, `architecture`) becomes an
//! `upcycle_moe` step. The result is the same JSON a YAML plan parses to, so the command line and
//! Python run it as any plan. Nothing here reads a tensor; the only I/O is reading the config
//! file and asking whether a model reference names a local path (as MergeKit does). What cannot
//! be translated exactly is a [`PlanError`] naming the key.

use serde_json::{json, Map, Value};

use super::document::{kind_of, load, PlanSource};
use super::error::{suggest, PlanError};
use super::location::Location;

/// The alias the merged model gets (the output alias).
pub const MERGED: &str = "merged";

/// Top-level keys of MergeKit's `MergeConfiguration`.
const MERGE_KEYS: &[&str] = &[
    "merge_method",
    "models",
    "slices",
    "modules",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
];

/// Top-level keys of mergekit-moe's `MoEMergeConfig`.
const MOE_KEYS: &[&str] = &[
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
];

/// Keys of an expert of a MoE config.
const EXPERT_KEYS: &[&str] = &[
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
];

/// Every merge method `merge` runs (MergeKit 0.1.5's names), in the order `help` lists them.
pub(crate) const METHODS: &[&str] = &[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "model_stock",
    "karcher",
    "sce",
    "arcee_fusion",
    "passthrough",
];

/// How a MergeKit parameter becomes a `merge` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Per model (or a default for every model): a number, gradient or filter list.
    PerModel,
    /// Shared, but per tensor: a number, gradient or filter list (`t`).
    Tensor,
    /// Shared, one boolean.
    Bool,
    /// Shared, one number.
    Number,
    /// Shared, one whole number.
    Count,
    /// Accepted and left out: it changes nothing in the result (`int8_mask` stores MergeKit's
    /// masks as int8).
    Dropped,
}

/// One parameter a MergeKit method takes: its name there, its `merge` key, its kind.
type ParamDef = (&'static str, &'static str, Kind);

const GTA: &[ParamDef] = &[
    ("weight", "weight", Kind::PerModel),
    ("density", "density", Kind::PerModel),
    ("normalize", "normalize", Kind::Bool),
    ("rescale", "rescale", Kind::Bool),
    ("lambda", "lambda", Kind::Number),
    ("int8_mask", "", Kind::Dropped),
];

/// The parameters each method takes in MergeKit 0.1.5 (merge_methods/registry.py and the
/// methods' signatures), with what they become. `None`: the method is not translated.
fn parameters_of(method: &str) -> Vec<ParamDef> {
    let mut defs: Vec<ParamDef> = Vec::new();
    match method {
        "linear" => defs.extend([
            ("weight", "weight", Kind::PerModel),
            ("normalize", "normalize", Kind::Bool),
        ]),
        "task_arithmetic" | "ties" | "dare_linear" | "dare_ties" => defs.extend_from_slice(GTA),
        "breadcrumbs" | "breadcrumbs_ties" => {
            defs.extend_from_slice(GTA);
            defs.push(("gamma", "gamma", Kind::PerModel));
        }
        "della" | "della_linear" => {
            defs.extend_from_slice(GTA);
            defs.push(("epsilon", "epsilon", Kind::PerModel));
        }
        "slerp" => defs.push(("t", "t", Kind::Tensor)),
        "nuslerp" => defs.extend([
            ("weight", "weight", Kind::PerModel),
            ("nuslerp_row_wise", "nuslerp_row_wise", Kind::Bool),
            ("nuslerp_flatten", "nuslerp_flatten", Kind::Bool),
        ]),
        "multislerp" => defs.extend([
            ("weight", "weight", Kind::PerModel),
            ("normalize_weights", "normalize", Kind::Bool),
        ]),
        "karcher" => defs.extend([("max_iter", "max_iter", Kind::Count), ("tol", "tol", Kind::Number)]),
        "sce" => defs.extend([
            ("select_topk", "select_topk", Kind::Number),
            ("int8_mask", "", Kind::Dropped),
        ]),
        _ => {}
    }
    defs
}

/// Parameters MergeKit takes that have no exact counterpart, with the reason.
fn untranslated_parameter(method: &str, key: &str) -> Option<&'static str> {
    match (method, key) {
        ("multislerp", "eps") => Some("multislerp's `eps` is fixed at 1e-8 in `merge`"),
        ("model_stock", "filter_wise") => {
            Some("model_stock with `filter_wise: true` (per-row angles) is not implemented; `merge` uses whole tensors")
        }
        ("passthrough", "scale") => Some("passthrough's `scale` is not translated; add a `scale_` step to the plan"),
        _ => None,
    }
}

/// Whether a method merges the base with the models (MergeKit's `BasePolicy`): `linear` and
/// `karcher` treat a base as one more model.
fn base_is_a_model(method: &str) -> bool {
    matches!(method, "linear" | "karcher")
}

/// A model reference resolved to a plan input.
#[derive(Debug, Clone, PartialEq)]
struct Input {
    alias: String,
    /// The path (absolute for local models) or `hf://org/name[@revision]`.
    path: String,
}

/// The inputs found so far, one per distinct model.
#[derive(Debug, Default)]
struct Inputs {
    list: Vec<Input>,
}

impl Inputs {
    /// The alias of `path`, adding an input for it with an alias derived from `stem` when it is
    /// new (unique among the inputs, and never [`MERGED`]).
    fn alias_for(&mut self, path: String, stem: &str) -> String {
        if let Some(input) = self.list.iter().find(|i| i.path == path) {
            return input.alias.clone();
        }
        let base = alias_stem(stem);
        let mut alias = base.clone();
        let mut n = 2;
        while alias == MERGED || self.list.iter().any(|i| i.alias == alias) {
            alias = format!("{base}_{n}");
            n += 1;
        }
        self.list.push(Input {
            alias: alias.clone(),
            path,
        });
        alias
    }
}

/// A valid alias made from a model's name: characters outside `[A-Za-z0-9_.-]` become `_`, and
/// `m_` is put before a name that does not start with a letter or `_`.
fn alias_stem(stem: &str) -> String {
    let mut alias: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !alias.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        alias.insert_str(0, "m_");
    }
    alias
}

/// Whether `text` has the form of a Hugging Face repository id (`org/name`).
fn looks_like_repo_id(text: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    matches!(text.split_once('/'), Some((org, name)) if ok(org) && ok(name) && !name.contains('/'))
}

/// Translates MergeKit configs, naming the config (`origin`) in its errors.
struct Translator<'a> {
    origin: &'a str,
    inputs: Inputs,
}

impl Translator<'_> {
    fn error(&self, at: &Location, message: impl std::fmt::Display) -> PlanError {
        let place = if at.0.is_empty() {
            String::new()
        } else {
            format!("`{at}`: ")
        };
        PlanError::Syntax {
            origin: format!("{} (MergeKit config)", self.origin),
            message: format!("{place}{message}"),
        }
    }

    fn unknown_key(&self, at: &Location, key: &str, known: &[&str]) -> PlanError {
        let hint = suggest(key, known.iter().copied())
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        self.error(
            at,
            format!("unknown MergeKit key `{key}`{hint} (known: {})", known.join(", ")),
        )
    }

    fn check_keys(&self, map: &Map<String, Value>, known: &[&str], at: &Location) -> Result<(), PlanError> {
        match map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(self.unknown_key(at, key, known)),
            None => Ok(()),
        }
    }

    fn mapping<'v>(&self, value: &'v Value, at: &Location) -> Result<&'v Map<String, Value>, PlanError> {
        value
            .as_object()
            .ok_or_else(|| self.error(at, format!("expected a mapping, got {}", kind_of(value))))
    }

    fn list<'v>(&self, value: &'v Value, at: &Location) -> Result<&'v Vec<Value>, PlanError> {
        value
            .as_array()
            .ok_or_else(|| self.error(at, format!("expected a list, got {}", kind_of(value))))
    }

    /// The alias of a MergeKit model reference: `path`, `org/name`, `org/name@revision`, or the
    /// mapping form `{model: {path, revision}, lora}`. LoRA (`model+lora`) is refused.
    fn model(&mut self, value: &Value, at: &Location) -> Result<String, PlanError> {
        let (text, revision) = match value {
            Value::String(s) => (s.clone(), None),
            Value::Object(map) => {
                if map.get("lora").is_some_and(|l| !l.is_null()) {
                    return Err(self.lora(at));
                }
                let inner = map.get("model").unwrap_or(value);
                match inner {
                    Value::String(s) => (s.clone(), None),
                    Value::Object(path) => {
                        self.check_keys(path, &["path", "revision"], &at.key("model"))?;
                        let text = path.get("path").and_then(Value::as_str).ok_or_else(|| {
                            self.error(&at.key("model"), "expected `path`, a local path or a repository id")
                        })?;
                        let revision = match path.get("revision") {
                            None | Some(Value::Null) => None,
                            Some(Value::String(r)) => Some(r.clone()),
                            Some(other) => {
                                return Err(self.error(
                                    &at.key("model").key("revision"),
                                    format!("expected a string, got {}", kind_of(other)),
                                ))
                            }
                        };
                        (text.to_owned(), revision)
                    }
                    other => {
                        return Err(self.error(
                            at,
                            format!("expected a model path or repository id, got {}", kind_of(other)),
                        ))
                    }
                }
            }
            other => {
                return Err(self.error(
                    at,
                    format!("expected a model path or repository id, got {}", kind_of(other)),
                ))
            }
        };
        if text.is_empty() {
            return Err(self.error(at, "empty model reference"));
        }
        // MergeKit splits `model+lora` and `model@revision` before looking at the path.
        if text.contains('+') {
            return Err(self.lora(at));
        }
        let (path, revision) = match (text.split_once('@'), revision) {
            (Some(_), Some(_)) => return Err(self.error(at, format!("`{text}` gives a revision twice"))),
            (Some((path, rev)), None) if !rev.contains('@') && !rev.is_empty() => {
                (path.to_owned(), Some(rev.to_owned()))
            }
            (Some(_), None) => return Err(self.error(at, format!("invalid model reference `{text}`"))),
            (None, revision) => (text, revision),
        };
        let expanded = crate::plan::paths::expand_home(&path);
        let local = expanded.as_path();
        if revision.is_none() && local.exists() || !looks_like_repo_id(&path) {
            if let Some(rev) = revision {
                return Err(self.error(
                    at,
                    format!("a revision (`@{rev}`) applies to Hugging Face repositories, and `{path}` is a local path"),
                ));
            }
            let absolute = std::path::absolute(local).unwrap_or_else(|_| local.to_path_buf());
            // A weights file (`ft1/model.safetensors`) is named by its folder.
            let named = if local.is_file() {
                absolute.parent().unwrap_or(&absolute)
            } else {
                absolute.as_path()
            };
            let stem = named
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n != "." && n != "..")
                .unwrap_or_else(|| "model".to_owned());
            return Ok(self.inputs.alias_for(absolute.display().to_string(), &stem));
        }
        let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
        let reference = match revision {
            Some(rev) => format!("hf://{path}@{rev}"),
            None => format!("hf://{path}"),
        };
        Ok(self.inputs.alias_for(reference, &name))
    }

    fn lora(&self, at: &Location) -> PlanError {
        self.error(
            at,
            "LoRA model references (`model+lora`) are not translated: merge the adapter first (a `merge_lora` step, or its own plan) and name the merged model",
        )
    }

    /// A MergeKit dtype name (`bfloat16`, `float16`, `float32`, `float64`, optionally
    /// `torch.`-prefixed) as a plan dtype.
    fn dtype(&self, value: &Value, at: &Location) -> Result<String, PlanError> {
        let text = value.as_str().unwrap_or_default();
        let name = text.strip_prefix("torch.").unwrap_or(text);
        match name {
            "bfloat16" | "float16" | "float32" | "float64" => Ok(name.to_owned()),
            _ => Err(self.error(
                at,
                format!(
                    "expected bfloat16, float16, float32 or float64, got `{}`",
                    super::payload::compact(value)
                ),
            )),
        }
    }

    /// A per-tensor parameter (number, gradient, `{filter, value}` or a list of them) in
    /// `merge`'s form.
    fn tensor_param(&self, value: &Value, at: &Location, nested: bool) -> Result<Value, PlanError> {
        let number = |v: &Value, at: &Location| -> Result<Value, PlanError> {
            match v {
                Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => Ok(v.clone()),
                // MergeKit validates YAML strings such as `1e-3` into floats.
                Value::String(s) => match s.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() => Ok(json!(x)),
                    _ => Err(self.error(at, format!("expected a number, got `{s}`"))),
                },
                other => Err(self.error(
                    at,
                    format!("expected a number, got `{}`", super::payload::compact(other)),
                )),
            }
        };
        match value {
            Value::Object(map) if !nested => {
                let entry = self.filter_entry(map, at)?;
                Ok(Value::Array(vec![entry]))
            }
            Value::Array(items) if items.is_empty() => Err(self.error(at, "expected a value, got an empty list")),
            Value::Array(items) if !nested && items.iter().all(Value::is_object) => {
                let entries = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.filter_entry(item.as_object().expect("checked: a mapping"), &at.index(i)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Value::Array(entries))
            }
            Value::Array(items) => Ok(Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| number(v, &at.index(i)))
                    .collect::<Result<_, _>>()?,
            )),
            other => number(other, at),
        }
    }

    fn filter_entry(&self, map: &Map<String, Value>, at: &Location) -> Result<Value, PlanError> {
        self.check_keys(map, &["filter", "value"], at)?;
        let mut entry = Map::new();
        match map.get("filter") {
            None | Some(Value::Null) => {}
            Some(Value::String(f)) => {
                entry.insert("filter".into(), Value::String(f.clone()));
            }
            Some(other) => {
                return Err(self.error(
                    &at.key("filter"),
                    format!("expected a substring of tensor names, got {}", kind_of(other)),
                ))
            }
        }
        let value = map
            .get("value")
            .filter(|v| !v.is_null())
            .ok_or_else(|| self.error(at, "missing `value`"))?;
        entry.insert("value".into(), self.tensor_param(value, &at.key("value"), true)?);
        Ok(Value::Object(entry))
    }

    fn bool_param(&self, value: &Value, at: &Location) -> Result<Value, PlanError> {
        match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(s) if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false") => {
                Ok(Value::Bool(s.eq_ignore_ascii_case("true")))
            }
            Value::Array(_) | Value::Object(_) => Err(self.error(
                at,
                "a boolean given per tensor (a filter list or gradient) is not translated: `merge` takes one value",
            )),
            other => Err(self.error(
                at,
                format!("expected true or false, got `{}`", super::payload::compact(other)),
            )),
        }
    }

    fn scalar_param(&self, value: &Value, at: &Location, whole: bool) -> Result<Value, PlanError> {
        if matches!(value, Value::Array(_) | Value::Object(_)) {
            return Err(self.error(
                at,
                "a value given per tensor (a filter list or gradient) is not translated: `merge` takes one number here",
            ));
        }
        let number = self.tensor_param(value, at, true)?;
        if whole {
            let x = number.as_f64().unwrap_or(-1.0);
            if x < 0.0 || x.fract() != 0.0 || x > u32::MAX as f64 {
                return Err(self.error(
                    at,
                    format!("expected a whole number ≥ 0, got `{}`", super::payload::compact(value)),
                ));
            }
            return Ok(json!(x as u64));
        }
        Ok(number)
    }

    /// A `parameters` mapping of `method`, translated into `merge` keys. `per_model`: the
    /// parameters of one model, where shared parameters are refused.
    fn parameters(
        &self,
        method: &str,
        value: Option<&Value>,
        at: &Location,
        per_model: bool,
    ) -> Result<Vec<(String, Value)>, PlanError> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        let map = self.mapping(value, at)?;
        let defs = parameters_of(method);
        let mut out = Vec::new();
        for (key, v) in map {
            let at = at.key(key);
            if let Some(reason) = untranslated_parameter(method, key) {
                // `filter_wise: false` is MergeKit's default, the one translation.
                if key == "filter_wise" && matches!(v, Value::Bool(false)) {
                    continue;
                }
                return Err(self.error(&at, reason));
            }
            let Some(&(_, ours, kind)) = defs.iter().find(|(name, _, _)| name == key) else {
                let known: Vec<&str> = defs.iter().map(|(n, _, _)| *n).collect();
                let hint = suggest(key, known.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                return Err(self.error(
                    &at,
                    format!(
                        "{method} takes no parameter `{key}`{hint} (it takes: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            if per_model && kind != Kind::PerModel {
                return Err(self.error(
                    &at,
                    format!("`{key}` is shared by every model in MergeKit: give it under the top-level `parameters`"),
                ));
            }
            let translated = match kind {
                Kind::PerModel | Kind::Tensor => self.tensor_param(v, &at, false)?,
                Kind::Bool => self.bool_param(v, &at)?,
                Kind::Number => self.scalar_param(v, &at, false)?,
                Kind::Count => self.scalar_param(v, &at, true)?,
                Kind::Dropped => continue,
            };
            out.push((ours.to_owned(), translated));
        }
        Ok(out)
    }

    /// A `mergekit-yaml` config as a plan.
    fn merge_config(&mut self, map: &Map<String, Value>) -> Result<Map<String, Value>, PlanError> {
        let root = Location::root();
        self.check_keys(map, MERGE_KEYS, &root)?;
        let method = match map.get("merge_method") {
            Some(Value::String(m)) => m.clone(),
            Some(other) => {
                return Err(self.error(
                    &root.key("merge_method"),
                    format!("expected a method name, got {}", kind_of(other)),
                ))
            }
            None => return Err(self.error(&root, "missing `merge_method`")),
        };
        if !METHODS.contains(&method.as_str()) {
            let hint = suggest(&method, METHODS.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(self.error(
                &root.key("merge_method"),
                format!(
                    "merge method `{method}` is not translated{hint} (translated: {})",
                    METHODS.join(", ")
                ),
            ));
        }
        if map.contains_key("modules") {
            return Err(self.error(
                &root.key("modules"),
                "per-module configs (`modules`, for multimodal models) are not translated; use `models` or `slices`",
            ));
        }
        for key in ["tokenizer", "chat_template"] {
            if map.get(key).is_some_and(|v| !v.is_null()) {
                return Err(self.error(
                    &root.key(key),
                    format!("`{key}` is not translated: brainsurgery copies tokenizer files, it does not build or edit them"),
                ));
            }
        }
        match map.get("tokenizer_source") {
            None | Some(Value::Null) => {}
            // The merged alias takes no sidecars until `merge` names where they come from.
            Some(Value::String(s)) if s == "base" => {}
            Some(other) => {
                return Err(self.error(
                    &root.key("tokenizer_source"),
                    format!(
                        "only `tokenizer_source: base` is translated, got `{}` (a union vocabulary needs the tokenizers, and embeddings rebuilt)",
                        super::payload::compact(other)
                    ),
                ))
            }
        }
        let present = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
        match (present("models"), present("slices")) {
            (true, true) | (false, false) => {
                return Err(self.error(&root, "exactly one of `models` and `slices` must be given"))
            }
            _ => {}
        }
        let dtype = match (map.get("out_dtype"), map.get("dtype")) {
            (Some(v), _) if !v.is_null() => Some(self.dtype(v, &root.key("out_dtype"))?),
            (_, Some(v)) if !v.is_null() => Some(self.dtype(v, &root.key("dtype"))?),
            _ => None,
        };
        if let (Some(v), Some(_)) = (map.get("dtype").filter(|v| !v.is_null()), &dtype) {
            // Validated even when out_dtype wins.
            self.dtype(v, &root.key("dtype"))?;
        }
        let mut transforms = Vec::new();
        let step = if method == "passthrough" {
            self.passthrough(map, dtype)?
        } else {
            self.merge_step(map, &method, dtype, &mut transforms)?
        };
        transforms.push(json!({ "merge": step }));
        let mut plan = Map::new();
        plan.insert("inputs".into(), self.inputs_value());
        plan.insert("transforms".into(), Value::Array(transforms));
        Ok(plan)
    }

    fn inputs_value(&self) -> Value {
        Value::Array(
            self.inputs
                .list
                .iter()
                .map(|i| Value::String(format!("{}::{}", i.alias, i.path)))
                .collect(),
        )
    }

    /// `passthrough` with `slices`: each output slice one source and its layer range.
    fn passthrough(&mut self, map: &Map<String, Value>, dtype: Option<String>) -> Result<Value, PlanError> {
        let root = Location::root();
        if map.get("models").is_some_and(|v| !v.is_null()) {
            return Err(self.error(
                &root.key("models"),
                "passthrough with `models` copies one model whole; give `slices` with `layer_range`s (or copy the checkpoint)",
            ));
        }
        self.parameters("passthrough", map.get("parameters"), &root.key("parameters"), false)?;
        // MergeKit writes the base model's config and tokenizer (`merge` defaults to the first
        // slice's).
        let base = match map.get("base_model") {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.model(v, &root.key("base_model"))?),
        };
        let at = root.key("slices");
        let slices = self.list(map.get("slices").unwrap_or(&Value::Null), &at)?;
        if slices.is_empty() {
            return Err(self.error(&at, "expected at least one slice"));
        }
        let mut out = Vec::new();
        for (i, slice) in slices.iter().enumerate() {
            let at = at.index(i);
            let s = self.mapping(slice, &at)?;
            self.check_keys(s, &["sources", "base_model", "residual_weight", "parameters"], &at)?;
            for key in ["base_model", "residual_weight"] {
                if s.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(self.error(
                        &at.key(key),
                        format!("`{key}` in a passthrough slice is not translated"),
                    ));
                }
            }
            self.parameters("passthrough", s.get("parameters"), &at.key("parameters"), false)?;
            let sources_at = at.key("sources");
            let sources = self.list(s.get("sources").unwrap_or(&Value::Null), &sources_at)?;
            if sources.len() != 1 {
                return Err(self.error(
                    &sources_at,
                    format!("a passthrough slice takes exactly one source, got {}", sources.len()),
                ));
            }
            let src_at = sources_at.index(0);
            let (alias, range) = self.source(&sources[0], &src_at, "passthrough")?;
            let Some((start, end)) = range else {
                return Err(self.error(&src_at, "missing `layer_range`"));
            };
            out.push(json!({ "alias": alias, "layers": [start, end] }));
        }
        let mut step = Map::new();
        step.insert("method".into(), json!("passthrough"));
        let first = out.first().and_then(|s| s.get("alias")).cloned();
        step.insert("slices".into(), Value::Array(out));
        step.insert("to".into(), json!(MERGED));
        if let Some(b) = base.filter(|b| first.as_ref().and_then(Value::as_str) != Some(b.as_str())) {
            step.insert("sidecars".into(), json!(b));
        }
        if let Some(d) = dtype {
            step.insert("dtype".into(), json!(d));
        }
        Ok(Value::Object(step))
    }

    /// A slice source or model entry: its alias and layer range; its parameters are read by the
    /// caller.
    fn source(
        &mut self,
        value: &Value,
        at: &Location,
        method: &str,
    ) -> Result<(String, Option<(u64, u64)>), PlanError> {
        let map = self.mapping(value, at)?;
        self.check_keys(map, &["model", "layer_range", "parameters"], at)?;
        let model = map.get("model").ok_or_else(|| self.error(at, "missing `model`"))?;
        let alias = self.model(model, &at.key("model"))?;
        if method == "passthrough" {
            self.parameters(method, map.get("parameters"), &at.key("parameters"), true)?;
        }
        let range = match map.get("layer_range") {
            None | Some(Value::Null) => None,
            Some(Value::Array(r)) if r.len() == 2 => match (r[0].as_u64(), r[1].as_u64()) {
                (Some(a), Some(b)) if a < b => Some((a, b)),
                _ => None,
            }
            .map(Some)
            .ok_or_else(|| {
                self.error(
                    &at.key("layer_range"),
                    "expected [start, end] with whole numbers start < end (end excluded)",
                )
            })?,
            Some(_) => {
                return Err(self.error(
                    &at.key("layer_range"),
                    "expected [start, end] with whole numbers start < end (end excluded)",
                ))
            }
        };
        Ok((alias, range))
    }

    /// One `merge` step for a method other than passthrough. With `slices`, exactly one output
    /// slice whose sources all span layers `[0, n)`: assertions that every model has exactly
    /// `n` layers are pushed to `transforms` (so the merge of whole models is the slice's).
    fn merge_step(
        &mut self,
        map: &Map<String, Value>,
        method: &str,
        dtype: Option<String>,
        transforms: &mut Vec<Value>,
    ) -> Result<Value, PlanError> {
        let root = Location::root();
        let mut base = match map.get("base_model") {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.model(v, &root.key("base_model"))?),
        };
        // (alias, per-model parameters) in order.
        let mut models: Vec<(String, Vec<(String, Value)>)> = Vec::new();
        let mut shared = self.parameters(method, map.get("parameters"), &root.key("parameters"), false)?;
        let mut layers: Option<(u64, u64)> = None;
        if let Some(list) = map.get("models").filter(|v| !v.is_null()) {
            let at = root.key("models");
            for (i, entry) in self.list(list, &at)?.iter().enumerate() {
                let at = at.index(i);
                let m = self.mapping(entry, &at)?;
                self.check_keys(m, &["model", "parameters"], &at)?;
                let model = m.get("model").ok_or_else(|| self.error(&at, "missing `model`"))?;
                let alias = self.model(model, &at.key("model"))?;
                let params = self.parameters(method, m.get("parameters"), &at.key("parameters"), true)?;
                models.push((alias, params));
            }
        } else {
            let at = root.key("slices");
            let slices = self.list(map.get("slices").unwrap_or(&Value::Null), &at)?;
            if slices.len() != 1 {
                return Err(self.error(
                    &at,
                    format!(
                        "{method} with {} output slices is not translated: `merge` merges whole models (one slice spanning every layer), and stacks slices only with passthrough",
                        slices.len()
                    ),
                ));
            }
            let at = at.index(0);
            let s = self.mapping(&slices[0], &at)?;
            self.check_keys(s, &["sources", "base_model", "residual_weight", "parameters"], &at)?;
            if s.get("residual_weight").is_some_and(|v| !v.is_null()) {
                return Err(self.error(&at.key("residual_weight"), "`residual_weight` is not translated"));
            }
            if let Some(b) = s.get("base_model").filter(|v| !v.is_null()) {
                base = Some(self.model(b, &at.key("base_model"))?);
            }
            // The slice's parameters take precedence over the top level's.
            for (k, v) in self.parameters(method, s.get("parameters"), &at.key("parameters"), false)? {
                shared.retain(|(key, _)| *key != k);
                shared.push((k, v));
            }
            let sources_at = at.key("sources");
            for (i, src) in self
                .list(s.get("sources").unwrap_or(&Value::Null), &sources_at)?
                .iter()
                .enumerate()
            {
                let src_at = sources_at.index(i);
                let (alias, range) = self.source(src, &src_at, method)?;
                let range = range.ok_or_else(|| self.error(&src_at, "missing `layer_range`"))?;
                if range.0 != 0 || layers.is_some_and(|r| r != range) {
                    return Err(self.error(
                        &src_at.key("layer_range"),
                        format!(
                            "{method} of layer ranges is translated when every source spans the same layers [0, n) (the whole model); got [{}, {}]",
                            range.0, range.1
                        ),
                    ));
                }
                layers = Some(range);
                let params = self.parameters(method, src.get("parameters"), &src_at.key("parameters"), true)?;
                models.push((alias, params));
            }
            if models.is_empty() {
                return Err(self.error(&sources_at, "expected at least one source"));
            }
        }
        let base_model = base.clone();
        // MergeKit adds a base not listed among the models to the inputs; `linear` and
        // `karcher` merge it as one more model.
        if base_is_a_model(method) {
            if let Some(b) = base.take() {
                if !models.iter().any(|(a, _)| *a == b) {
                    models.push((b, Vec::new()));
                }
            }
        } else if let Some(b) = &base {
            // The base's own parameters are not used by the methods that take a base.
            models.retain(|(a, _)| a != b);
        }
        let mut step = Map::new();
        step.insert("method".into(), json!(method));
        if let Some(b) = &base {
            step.insert("base".into(), json!(b));
        }
        let mut seen = std::collections::HashSet::new();
        models.retain(|(a, _)| seen.insert(a.clone()));
        let models_value = if models.iter().all(|(_, p)| p.is_empty()) {
            Value::Array(models.iter().map(|(a, _)| json!(a)).collect())
        } else {
            Value::Object(
                models
                    .iter()
                    .map(|(a, p)| {
                        let params = if p.is_empty() {
                            Value::Null
                        } else {
                            Value::Object(p.iter().cloned().collect())
                        };
                        (a.clone(), params)
                    })
                    .collect(),
            )
        };
        step.insert("models".into(), models_value);
        step.insert("to".into(), json!(MERGED));
        // MergeKit writes the base model's config and tokenizer (`merge` defaults to the base,
        // and without one to the first model).
        if let (None, Some(b)) = (&base, base_model) {
            if models.first().is_none_or(|(a, _)| *a != b) {
                step.insert("sidecars".into(), json!(b));
            }
        }
        if let Some(d) = dtype {
            step.insert("dtype".into(), json!(d));
        }
        for (k, v) in shared {
            step.insert(k, v);
        }
        if let Some((_, n)) = layers {
            let aliases = base.iter().chain(models.iter().map(|(a, _)| a));
            for alias in aliases {
                let layer = |i: u64| format!(r"{alias}::(.*\.)?(layers|layer|h|blocks)\.{i}\..*");
                transforms.push(json!({ "assert": { "exists": layer(n - 1) } }));
                transforms.push(json!({ "assert": { "count": { "of": layer(n), "is": 0 } } }));
            }
        }
        Ok(Value::Object(step))
    }

    /// A `mergekit-moe` config as an `upcycle_moe` step on the base model's alias.
    fn moe_config(&mut self, map: &Map<String, Value>) -> Result<Map<String, Value>, PlanError> {
        let root = Location::root();
        self.check_keys(map, MOE_KEYS, &root)?;
        let base_value = map
            .get("base_model")
            .filter(|v| !v.is_null())
            .ok_or_else(|| self.error(&root, "missing `base_model`"))?;
        let base = self.model(base_value, &root.key("base_model"))?;
        if map.get("shared_experts").is_some_and(|v| !v.is_null()) {
            return Err(self.error(
                &root.key("shared_experts"),
                "shared experts (Qwen2-MoE, DeepSeek) are not translated",
            ));
        }
        let gate_mode = match map.get("gate_mode") {
            None | Some(Value::Null) => "hidden",
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(self.error(
                    &root.key("gate_mode"),
                    format!("expected hidden, cheap_embed or random, got {}", kind_of(other)),
                ))
            }
        };
        let router = match gate_mode {
            "random" => json!("random"),
            "hidden" => {
                return Err(self.error(
                    &root.key("gate_mode"),
                    "gate_mode `hidden` (the default) routes by hidden states of the prompts, which needs running the model; it is not translated: use `gate_mode: random`, or write the plan with `upcycle_moe: {router: {embed: [[token ids], ...]}}`",
                ))
            }
            "cheap_embed" => {
                return Err(self.error(
                    &root.key("gate_mode"),
                    "gate_mode `cheap_embed` averages the embeddings of the prompts' tokens, and prompts need a tokenizer: tokenize each expert's prompts and write the plan form `upcycle_moe: {router: {embed: [[token ids], ...]}}` (one list of token ids per expert)",
                ))
            }
            "uniform_random" => {
                return Err(self.error(
                    &root.key("gate_mode"),
                    "gate_mode `uniform_random` is not translated; `random` gives a seeded random router",
                ))
            }
            other => {
                return Err(self.error(
                    &root.key("gate_mode"),
                    format!("unknown gate_mode `{other}` (MergeKit's: hidden, cheap_embed, random, uniform_random)"),
                ))
            }
        };
        let at = root.key("experts");
        let experts = self.list(map.get("experts").unwrap_or(&Value::Null), &at)?;
        if experts.is_empty() {
            return Err(self.error(&at, "expected at least one expert"));
        }
        let mut sources = Vec::new();
        for (i, expert) in experts.iter().enumerate() {
            let at = at.index(i);
            let e = self.mapping(expert, &at)?;
            self.check_keys(e, EXPERT_KEYS, &at)?;
            for key in ["noise_scale", "residual_scale"] {
                if e.get(key).is_some_and(|v| !v.is_null()) {
                    return Err(self.error(&at.key(key), format!("`{key}` is not translated")));
                }
            }
            let source = e
                .get("source_model")
                .filter(|v| !v.is_null())
                .ok_or_else(|| self.error(&at, "missing `source_model`"))?;
            // Prompts only matter for the hidden and cheap_embed routers, refused above.
            sources.push(self.model(source, &at.key("source_model"))?);
        }
        let per_token = match map.get("experts_per_token") {
            None | Some(Value::Null) => 2,
            Some(v) => match v.as_u64() {
                Some(k) if k >= 1 && k as usize <= experts.len() => k,
                _ => {
                    return Err(self.error(
                        &root.key("experts_per_token"),
                        format!(
                            "expected a whole number from 1 to the number of experts ({}), got `{}`",
                            experts.len(),
                            super::payload::compact(v)
                        ),
                    ))
                }
            },
        };
        let mut step = Map::new();
        step.insert("alias".into(), json!(base));
        step.insert("experts".into(), json!(experts.len()));
        step.insert("experts_per_token".into(), json!(per_token));
        match map.get("architecture") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let layout = match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                    Some("mixtral") => "mixtral",
                    Some("qwen") => "qwen2_moe",
                    Some("qwen3") => "qwen3_moe",
                    _ => {
                        return Err(self.error(
                            &root.key("architecture"),
                            format!(
                                "architecture `{}` is not translated (translated: mixtral, qwen, qwen3)",
                                super::payload::compact(v)
                            ),
                        ))
                    }
                };
                step.insert("layout".into(), json!(layout));
            }
        }
        step.insert("router".into(), router);
        if sources.iter().any(|s| *s != base) {
            step.insert("experts_from".into(), json!(sources));
        }
        let mut transforms = vec![json!({ "upcycle_moe": step })];
        if let Some(v) = map.get("dtype").filter(|v| !v.is_null()) {
            let dtype = self.dtype(v, &root.key("dtype"))?;
            transforms.push(json!({ "cast_": { "target": format!("{base}::.*"), "dtype": dtype, "only": "float" } }));
            // As MergeKit writes it: the config says the dtype the weights were cast to.
            transforms.push(json!({ "config": { "alias": base, "set": { "torch_dtype": dtype } } }));
        }
        let mut plan = Map::new();
        plan.insert("inputs".into(), self.inputs_value());
        plan.insert("transforms".into(), Value::Array(transforms));
        Ok(plan)
    }
}

/// Translates a MergeKit config (`mergekit-yaml`, or `mergekit-moe` when it has `experts`) into
/// a plan document; `origin` names it in errors. With `output`, the plan writes the result there
/// (the merged alias, or the upcycled base).
pub fn translate(config: &Value, origin: &str, output: Option<&str>) -> Result<Value, PlanError> {
    let mut t = Translator {
        origin,
        inputs: Inputs::default(),
    };
    let map = t.mapping(config, &Location::root())?;
    let is_moe = map.contains_key("experts") && !map.contains_key("merge_method");
    let mut plan = if is_moe {
        t.moe_config(map)?
    } else {
        t.merge_config(map)?
    };
    if let Some(path) = output {
        let alias = if is_moe {
            t.inputs.list.first().map_or(MERGED.to_owned(), |i| i.alias.clone())
        } else {
            MERGED.to_owned()
        };
        plan.insert("output".into(), json!({ "path": path, "alias": alias }));
    }
    Ok(Value::Object(plan))
}

/// Reads a MergeKit config from `source` (a YAML/JSON file, YAML text or a value) and translates
/// it with [`translate`].
pub fn translate_source(source: &PlanSource, output: Option<&str>) -> Result<Value, PlanError> {
    let config = load(source)?;
    let origin = match source {
        PlanSource::File(p) => p.display().to_string(),
        _ => "<config>".to_owned(),
    };
    translate(&config, &origin, output)
}

/// The plan as YAML text, headed by a comment naming what it was translated from.
pub fn to_yaml(plan: &Value, origin: &str) -> Result<String, PlanError> {
    let text = serde_saphyr::to_string(plan).map_err(|e| PlanError::Syntax {
        origin: "--print-plan".into(),
        message: e.to_string(),
    })?;
    Ok(format!(
        "# translated from the MergeKit config {origin} by brainsurgery mergekit\n{text}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(config: Value) -> Result<Value, PlanError> {
        translate(&config, "cfg.yml", Some("out"))
    }

    fn err(config: Value) -> String {
        tr(config).expect_err("refused").to_string()
    }

    #[test]
    fn ties_with_per_model_parameters() {
        let plan = tr(json!({
            "merge_method": "ties",
            "base_model": "org/base",
            "models": [
                {"model": "org/base"},
                {"model": "org/ft-1@v2", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
                {"model": "other/ft.2", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
            ],
            "parameters": {"normalize": false, "int8_mask": true, "lambda": "1e0"},
            "dtype": "torch.bfloat16",
        }))
        .unwrap();
        assert_eq!(
            plan,
            json!({
                "inputs": ["base::hf://org/base", "ft-1::hf://org/ft-1@v2", "ft.2::hf://other/ft.2"],
                "transforms": [{"merge": {
                    "method": "ties", "base": "base",
                    "models": {"ft-1": {"weight": 0.5, "density": [0.2, 0.8]},
                               "ft.2": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
                    "to": "merged", "dtype": "bfloat16", "normalize": false, "lambda": 1.0,
                }}],
                "output": {"path": "out", "alias": "merged"},
            })
        );
    }

    #[test]
    fn linear_takes_the_base_as_a_model_and_aliases_are_unique() {
        let plan = tr(json!({
            "merge_method": "linear",
            "base_model": "a/merged",
            "models": [{"model": "b/merged"}, {"model": "/nonexistent/x/merged"}],
            "parameters": {"weight": 1},
        }))
        .unwrap();
        assert_eq!(
            plan["inputs"],
            json!([
                "merged_2::hf://a/merged",
                "merged_3::hf://b/merged",
                "merged_4::/nonexistent/x/merged"
            ])
        );
        assert_eq!(
            plan["transforms"][0]["merge"]["models"],
            json!(["merged_3", "merged_4", "merged_2"])
        );
        assert!(plan["transforms"][0]["merge"].get("base").is_none());
        // The merged model's config and tokenizer are the base's, as MergeKit writes them.
        assert_eq!(plan["transforms"][0]["merge"]["sidecars"], json!("merged_2"));
    }

    #[test]
    fn slerp_slice_spanning_the_model_asserts_the_layer_count() {
        let plan = tr(json!({
            "merge_method": "slerp",
            "base_model": "o/a",
            "slices": [{"sources": [{"model": "o/a", "layer_range": [0, 4]}, {"model": "o/b", "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
        }))
        .unwrap();
        let t = &plan["transforms"];
        assert_eq!(
            t[0],
            json!({"assert": {"exists": r"a::(.*\.)?(layers|layer|h|blocks)\.3\..*"}})
        );
        assert_eq!(
            t[1],
            json!({"assert": {"count": {"of": r"a::(.*\.)?(layers|layer|h|blocks)\.4\..*", "is": 0}}})
        );
        assert_eq!(t.as_array().unwrap().len(), 5);
        assert_eq!(
            t[4]["merge"],
            json!({"method": "slerp", "base": "a", "models": ["b"], "to": "merged",
                   "t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]})
        );
    }

    #[test]
    fn passthrough_slices() {
        let plan = tr(json!({
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "o/a", "layer_range": [0, 2]}]},
                       {"sources": [{"model": "o/b", "layer_range": [1, 3]}]}],
            "dtype": "float16",
        }))
        .unwrap();
        assert_eq!(
            plan["transforms"][0]["merge"],
            json!({"method": "passthrough", "slices": [{"alias": "a", "layers": [0, 2]}, {"alias": "b", "layers": [1, 3]}],
                   "to": "merged", "dtype": "float16"})
        );
        let with_base = |base: &str| {
            tr(json!({
                "merge_method": "passthrough",
                "base_model": base,
                "slices": [{"sources": [{"model": "o/a", "layer_range": [0, 2]}]}],
            }))
            .unwrap()["transforms"][0]["merge"]
                .get("sidecars")
                .cloned()
        };
        assert_eq!(with_base("o/a"), None);
        assert_eq!(with_base("o/b"), Some(json!("b")));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            (
                json!({"merge_method": "nearswap", "models": [{"model": "a/b"}]}),
                "`merge_method`",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b"}], "bogus": 1}),
                "unknown MergeKit key `bogus`",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b+c/d"}]}),
                "`models[0].model`: LoRA",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b", "parameters": {"t": 1}}]}),
                "`models[0].parameters.t`",
            ),
            (
                json!({"merge_method": "slerp", "models": [{"model": "a/b"}], "parameters": {"weight": 1}}),
                "slerp takes no parameter `weight`",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b"}], "tokenizer_source": "union"}),
                "`tokenizer_source`",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b"}], "dtype": "int8"}),
                "`dtype`",
            ),
            (
                json!({"merge_method": "ties", "models": [{"model": "a/b"}], "parameters": {"normalize": [true, false]}}),
                "`parameters.normalize`",
            ),
            (
                json!({"merge_method": "model_stock", "models": [{"model": "a/b"}], "parameters": {"filter_wise": true}}),
                "filter_wise",
            ),
            (
                json!({"merge_method": "ties", "slices": [{"sources": [{"model": "a/b", "layer_range": [2, 4]}]}]}),
                "`slices[0].sources[0].layer_range`",
            ),
            (
                json!({"merge_method": "ties", "slices": [{"sources": [{"model": "a/b", "layer_range": [0, 4]}]}, {"sources": []}]}),
                "2 output slices",
            ),
            (json!({"merge_method": "ties"}), "exactly one of `models` and `slices`"),
            (
                json!({"base_model": "a/b", "experts": [{"source_model": "a/b"}], "gate_mode": "cheap_embed"}),
                "router: {embed: [[token ids]",
            ),
            (
                json!({"base_model": "a/b", "experts": [{"source_model": "a/b"}]}),
                "gate_mode `hidden`",
            ),
            (json!([1, 2]), "expected a mapping"),
        ];
        for (config, needle) in cases {
            let message = err(config.clone());
            assert!(message.contains(needle), "{config}: {message}");
            assert!(message.starts_with("cfg.yml (MergeKit config): "), "{message}");
        }
    }

    #[test]
    fn moe_with_random_router() {
        let plan = tr(json!({
            "base_model": "o/dense",
            "gate_mode": "random",
            "architecture": "mixtral",
            "experts_per_token": 2,
            "dtype": "bfloat16",
            "experts": [{"source_model": "o/dense", "positive_prompts": ["x"]}, {"source_model": "o/code"}, {"source_model": "o/dense"}],
        }))
        .unwrap();
        assert_eq!(
            plan,
            json!({
                "inputs": ["dense::hf://o/dense", "code::hf://o/code"],
                "transforms": [
                    {"upcycle_moe": {"alias": "dense", "experts": 3, "experts_per_token": 2, "layout": "mixtral",
                                     "router": "random", "experts_from": ["dense", "code", "dense"]}},
                    {"cast_": {"target": "dense::.*", "dtype": "bfloat16", "only": "float"}},
                    {"config": {"alias": "dense", "set": {"torch_dtype": "bfloat16"}}},
                ],
                "output": {"path": "out", "alias": "dense"},
            })
        );
    }

    #[test]
    fn local_models_are_named_by_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let ft = dir.path().join("ft 1");
        std::fs::create_dir(&ft).unwrap();
        std::fs::write(ft.join("model.safetensors"), b"").unwrap();
        let file = ft.join("model.safetensors").display().to_string();
        let plan = tr(json!({
            "merge_method": "linear",
            "models": [{"model": file}, {"model": ft.display().to_string()}, {"model": {"model": {"path": "o/n", "revision": "r1"}}}],
            "parameters": {"weight": 1},
        }))
        .unwrap();
        assert_eq!(
            plan["inputs"],
            json!([
                format!("ft_1::{file}"),
                format!("ft_1_2::{}", ft.display()),
                "n::hf://o/n@r1"
            ])
        );
        let message = err(json!({"merge_method": "linear", "models": [{"model": format!("{}@main", ft.display())}]}));
        assert!(message.contains("a revision (`@main`)"), "{message}");
        let message = err(json!({"merge_method": "linear", "models": [{"model": {"model": "o/n", "lora": "o/l"}}]}));
        assert!(message.contains("LoRA"), "{message}");
    }

    #[test]
    fn alias_stems() {
        assert_eq!(alias_stem("Llama-3.1-8B"), "Llama-3.1-8B");
        assert_eq!(alias_stem("7b model"), "m_7b_model");
        assert!(looks_like_repo_id("org/name.v1"));
        assert!(!looks_like_repo_id("./x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
    }
}
