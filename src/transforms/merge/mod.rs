//! `merge`: a new alias whose tensors merge the same-named tensors of several aliases, with the
//! methods of MergeKit 0.1.5 (`linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
//! `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`, `slerp`, `nuslerp`, `multislerp`,
//! `model_stock`, `karcher`, `sce`, `arcee_fusion`) and `passthrough` (layer ranges of several
//! aliases stacked into one model, renumbered: a "frankenmerge", see [`Passthrough`]).
//!
//! Parameters are resolved per tensor when the step applies (so `check` validates them from the
//! headers alone): a number, a gradient (a list interpolated across the layer index found in the
//! tensor name, as MergeKit's gradients) or a list of `{filter, value}` entries (the first entry
//! whose `filter` is a substring of the name, an entry without `filter` matching every name).
//! Each merged tensor is a [`MergeOp`], computed in f32 (f64 when every input is F64). `linear`
//! and the TIES/DARE/breadcrumbs family are computed chunk by chunk as the writer reads them,
//! after passes over the inputs for the figures of the whole tensor they need ([`streamed`]):
//! no tensor is held whole. The other methods (DELLA, the slerps, model_stock, karcher, sce,
//! arcee_fusion) need whole tensors at once: computed on the first read from the inputs read
//! whole into buffers of the run's memory budget (one per input, plus the result), then kept
//! for the chunks the writer reads and released once written.
//! Random masks (DARE, DELLA) come from [`uniform`], a counter-based generator keyed by the
//! `seed`, the model's alias and the tensor's name, so a tensor's masks do not depend on the
//! order or thread in which tensors are computed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;

use super::{count_noun, Context, Flow, ParseContext, StepError, Transform, TransformError, TransformSpec};
use crate::dtype::DType;
use crate::linalg::Real;
use crate::memory::{Element, Scratch};
use crate::plan::error::suggest;
use crate::plan::payload::{compact, Field, FieldKind, Form};
use crate::plan::{Location, PlanError};
use crate::references::Reference;
pub(crate) use crate::state::layer_index;
use crate::state::State;
use crate::value::{read_real_scratch, real_scratch, LazyOp, ReadContext, Tensor, ValueError};

#[cfg(target_arch = "x86_64")]
mod simd;
mod streamed;
use streamed::Figures;

const FIELDS: &[Field] = &[
    Field::required(
        "method",
        FieldKind::Text,
        "linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp, model_stock, karcher, sce, arcee_fusion or passthrough",
    ),
    Field::optional(
        "models",
        FieldKind::Models,
        Some("required, except for passthrough"),
        "the aliases merged: a mapping alias → its parameters (weight, density, gamma, epsilon), or a list of aliases sharing the top-level ones",
    ),
    Field::optional(
        "slices",
        FieldKind::Slices,
        Some("required by passthrough"),
        "passthrough: layer ranges stacked in order, [{alias: a, layers: [0, 8]}, {alias: b, layers: [4, 12]}] (start included, end excluded)",
    ),
    Field::optional(
        "base",
        FieldKind::Text,
        None,
        "the base alias: required by task_arithmetic, the TIES/DARE/breadcrumbs/DELLA family, model_stock, sce and arcee_fusion, the t = 0 end of slerp; optional for nuslerp and multislerp (they then merge deltas); not taken by linear and karcher",
    ),
    Field::required(
        "to",
        FieldKind::Text,
        "the new alias receiving every tensor of the base (or of the first model), merged",
    ),
    Field::optional(
        "sidecars",
        FieldKind::Text,
        Some("the base, else the first model (passthrough: the first slice's alias)"),
        "the alias whose config, tokenizer and other sidecar files the result carries (its config then says the result's dtype and layer count)",
    ),
    Field::optional(
        "target",
        FieldKind::Reference,
        Some("every tensor"),
        "the tensors merged, a pattern over the base's names; the others are copied from the base (or first model)",
    ),
    Field::optional(
        "dtype",
        FieldKind::DType,
        Some("the base's (first model's) dtype"),
        "result dtype (a float)",
    ),
    Field::optional(
        "weight",
        FieldKind::Parameter,
        None,
        "each model's weight (linear, task arithmetic family, nuslerp, multislerp), for models not giving their own",
    ),
    Field::optional(
        "density",
        FieldKind::Parameter,
        Some("1"),
        "share of each delta kept (TIES, DARE, breadcrumbs, DELLA)",
    ),
    Field::optional(
        "gamma",
        FieldKind::Parameter,
        Some("0.01"),
        "share of the largest delta entries dropped (breadcrumbs)",
    ),
    Field::optional(
        "epsilon",
        FieldKind::Parameter,
        Some("0.15"),
        "half-width of DELLA's keep probabilities around density",
    ),
    Field::optional(
        "t",
        FieldKind::Parameter,
        None,
        "slerp's interpolation factor (0: the base, 1: the other model)",
    ),
    Field::optional(
        "normalize",
        FieldKind::Bool,
        Some("true for linear, ties, della and multislerp; false otherwise"),
        "divide by the sum of the weights (per element, of the models agreeing in sign, with a sign election)",
    ),
    Field::optional(
        "rescale",
        FieldKind::Bool,
        Some("true for DARE and DELLA; false otherwise"),
        "scale the kept entries of each pruned delta back to the delta's L1 norm (as MergeKit 0.1.x does), for every method that prunes",
    ),
    Field::optional(
        "lambda",
        FieldKind::Number,
        Some("1"),
        "factor of the merged delta (task arithmetic family)",
    ),
    Field::optional(
        "seed",
        FieldKind::Number,
        Some("0"),
        "seed of the random masks (DARE, DELLA), combined with each model's alias and tensor name",
    ),
    Field::optional(
        "nuslerp_flatten",
        FieldKind::Bool,
        Some("true"),
        "nuslerp: interpolate the flattened tensors (false: each row, or column with nuslerp_row_wise)",
    ),
    Field::optional(
        "nuslerp_row_wise",
        FieldKind::Bool,
        Some("false"),
        "nuslerp without flattening: interpolate along the first dimension instead of the last",
    ),
    Field::optional(
        "select_topk",
        FieldKind::Number,
        Some("1"),
        "sce: share of entries kept, those whose deltas vary most across the models",
    ),
    Field::optional("max_iter", FieldKind::Number, Some("10"), "karcher: most iterations"),
    Field::optional("tol", FieldKind::Number, Some("0.00001"), "karcher: convergence tolerance"),
];

/// `merge`.
pub const MERGE: TransformSpec = TransformSpec {
    name: "merge",
    summary: "merge the same-named tensors of several aliases into a new alias (MergeKit's methods)",
    form: Form::Plain,
    fields: FIELDS,
    parse,
};

/// The per-model parameters a `models` mapping may give.
const MODEL_KEYS: &[&str] = &["weight", "density", "gamma", "epsilon"];

/// How the task-arithmetic family drops delta entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsify {
    /// TIES: keep the `density` share of largest magnitude.
    Magnitude,
    /// DARE: keep each entry with probability `density`.
    Random,
    /// Breadcrumbs: drop the `gamma` share of largest magnitude and the smallest, keeping `density`.
    Outliers,
    /// DELLA: keep with probabilities ranked by magnitude, `density ± epsilon`.
    RankedRandom,
}

/// A merge method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `Σ wᵢ·mᵢ` (over `Σ wᵢ` with `normalize`).
    Linear,
    /// The generalized task arithmetic of MergeKit: `base + λ·Σ wᵢ·sparsify(mᵢ − base)`, with an
    /// optional sign election and normalization.
    TaskArithmetic {
        sparsify: Option<Sparsify>,
        consensus: bool,
        normalize: bool,
        rescale: bool,
    },
    /// Spherical interpolation between the base (t = 0) and one model (t = 1).
    Slerp,
    /// Model Stock: the models' average pulled towards the base by their deltas' angles.
    ModelStock,
    /// Spherical interpolation of two models (or their deltas from a base) with `t` from their
    /// weights, of the flattened tensors or of each row / column.
    NuSlerp,
    /// Barycentric interpolation of any number of models (or deltas) on the hypersphere.
    MultiSlerp,
    /// The weighted Karcher mean on the unit hypersphere, scaled by the mean norm.
    Karcher,
    /// SCE: select entries of high variance, weight models by their deltas' energy, erase
    /// minority signs.
    Sce,
    /// Arcee Fusion: take the model's entries whose importance passes a dynamic threshold.
    ArceeFusion,
    /// Layer ranges stacked ([`Passthrough`]).
    Passthrough,
}

/// Whether a method takes a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaseUse {
    Required,
    Optional,
    Refused,
}

/// Every method MergeKit 0.1.5 has, in the order `help` lists them (one list, shared with the
/// MergeKit config translation).
use crate::plan::mergekit::METHODS as KNOWN;

impl Method {
    /// The method named `name`, or `None` when it is not (yet) implemented.
    fn of(name: &str) -> Option<Method> {
        // Defaults as MergeKit's registry (merge_methods/registry.py) declares them.
        let gta = |sparsify, consensus, normalize, rescale| Method::TaskArithmetic {
            sparsify,
            consensus,
            normalize,
            rescale,
        };
        Some(match name {
            "linear" => Method::Linear,
            "task_arithmetic" => gta(None, false, false, false),
            "ties" => gta(Some(Sparsify::Magnitude), true, true, false),
            "dare_ties" => gta(Some(Sparsify::Random), true, false, true),
            "dare_linear" => gta(Some(Sparsify::Random), false, false, true),
            "breadcrumbs" => gta(Some(Sparsify::Outliers), false, false, false),
            "breadcrumbs_ties" => gta(Some(Sparsify::Outliers), true, false, false),
            "della" => gta(Some(Sparsify::RankedRandom), true, true, true),
            "della_linear" => gta(Some(Sparsify::RankedRandom), false, false, true),
            "slerp" => Method::Slerp,
            "model_stock" => Method::ModelStock,
            "nuslerp" => Method::NuSlerp,
            "multislerp" => Method::MultiSlerp,
            "karcher" => Method::Karcher,
            "sce" => Method::Sce,
            "arcee_fusion" => Method::ArceeFusion,
            "passthrough" => Method::Passthrough,
            _ => return None,
        })
    }

    fn base_use(self) -> BaseUse {
        match self {
            Method::Linear | Method::Karcher | Method::Passthrough => BaseUse::Refused,
            Method::NuSlerp | Method::MultiSlerp => BaseUse::Optional,
            _ => BaseUse::Required,
        }
    }

    fn needs_weight(self) -> bool {
        matches!(
            self,
            Method::Linear | Method::TaskArithmetic { .. } | Method::NuSlerp | Method::MultiSlerp
        )
    }

    /// The fewest models (besides the base) it merges, and the most.
    fn model_counts(self) -> (usize, usize) {
        match self {
            Method::Linear
            | Method::TaskArithmetic { .. }
            | Method::MultiSlerp
            | Method::Karcher
            | Method::Sce
            | Method::Passthrough => (1, usize::MAX),
            Method::Slerp | Method::ArceeFusion => (1, 1),
            Method::ModelStock => (2, usize::MAX),
            Method::NuSlerp => (2, 2),
        }
    }

    fn default_normalize(self) -> bool {
        match self {
            Method::Linear | Method::MultiSlerp => true,
            Method::TaskArithmetic { normalize, .. } => normalize,
            _ => false,
        }
    }
}

/// A parameter as written: a number, a gradient across layers, or per-name-pattern values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    /// One value for every tensor.
    Number(f64),
    /// Values at evenly spaced points from the first layer (t = 0) to the last (t = 1),
    /// interpolated linearly.
    Gradient(Vec<f64>),
    /// `(filter, value)` entries: the first whose filter is a substring of the tensor name (or
    /// that has none) gives the value.
    Filtered(Vec<(Option<String>, Param)>),
}

impl Param {
    /// Parses a parameter value at `location`.
    pub(crate) fn parse(value: &Json, location: &Location) -> Result<Param, PlanError> {
        let number = |v: &Json, at: &Location| {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| PlanError::invalid(at, format!("expected a finite number, got `{}`", compact(v))))
        };
        match value {
            Json::Number(_) => Ok(Param::Number(number(value, location)?)),
            Json::Array(items) if items.is_empty() => Err(PlanError::invalid(
                location,
                "expected a number, a list of numbers (a gradient) or a list of {filter, value} entries, got an empty list",
            )),
            Json::Array(items) if items.iter().all(Json::is_object) => {
                let mut entries = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let at = location.index(i);
                    let Json::Object(map) = item else { continue };
                    for key in map.keys() {
                        if key != "filter" && key != "value" {
                            return Err(PlanError::UnknownKey {
                                location: at.clone(),
                                key: key.clone(),
                                suggestion: suggest(key, ["filter", "value"]),
                                expected: vec!["filter".into(), "value".into()],
                            });
                        }
                    }
                    let filter = match map.get("filter") {
                        None | Some(Json::Null) => None,
                        Some(Json::String(s)) => Some(s.clone()),
                        Some(other) => {
                            return Err(PlanError::invalid(
                                &at.key("filter"),
                                format!("expected a string (a substring of tensor names), got `{}`", compact(other)),
                            ))
                        }
                    };
                    let Some(inner) = map.get("value").filter(|v| !v.is_null()) else {
                        return Err(PlanError::MissingKey {
                            location: at,
                            key: "value".into(),
                        });
                    };
                    let inner = Param::parse(inner, &at.key("value"))?;
                    if matches!(inner, Param::Filtered(_)) {
                        return Err(PlanError::invalid(
                            &at.key("value"),
                            "expected a number or a gradient (filters do not nest)",
                        ));
                    }
                    entries.push((filter, inner));
                }
                Ok(Param::Filtered(entries))
            }
            Json::Array(items) => {
                let values = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| number(v, &location.index(i)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Param::Gradient(values))
            }
            other => Err(PlanError::invalid(
                location,
                format!(
                    "expected a number, a list of numbers (a gradient) or a list of {{filter, value}} entries, got `{}`",
                    compact(other)
                ),
            )),
        }
    }

    /// The value for tensor `name` at layer position `t` (0 for the first layer, 1 for the last),
    /// or `None` when no filter entry matches.
    pub(crate) fn at(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Param::Number(x) => Some(*x),
            Param::Gradient(values) => Some(gradient(values, t)),
            Param::Filtered(entries) => entries
                .iter()
                // MergeKit's `*` matches every name.
                .find(|(filter, _)| filter.as_deref().is_none_or(|f| f == "*" || name.contains(f)))
                .and_then(|(_, value)| value.at(name, t)),
        }
    }
}

/// MergeKit's gradient: `values` at evenly spaced points of [0, 1], linearly interpolated at `t`.
fn gradient(values: &[f64], t: f64) -> f64 {
    let span = values.len().saturating_sub(1);
    if span == 0 {
        return values.first().copied().unwrap_or(0.0);
    }
    let scaled = t.clamp(0.0, 1.0) * span as f64;
    let i0 = (scaled.floor() as usize).min(span);
    let i1 = (i0 + 1).min(span);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * values[i0] + frac * values[i1]
}

/// A model and its own parameters.
#[derive(Debug, Clone)]
struct ModelSpec {
    alias: String,
    params: Vec<(&'static str, Param)>,
}

impl ModelSpec {
    fn get(&self, key: &str) -> Option<&Param> {
        self.params.iter().find(|(k, _)| *k == key).map(|(_, p)| p)
    }
}

/// A parsed `merge` step.
#[derive(Debug)]
struct Merge {
    method_name: String,
    method: Method,
    models: Vec<ModelSpec>,
    base: Option<String>,
    to: String,
    sidecars: Option<String>,
    target: Option<Reference>,
    dtype: Option<DType>,
    shared: Vec<(&'static str, Param)>,
    normalize: bool,
    rescale: bool,
    lambda: f64,
    seed: u64,
    /// Whether the base is merged with the models (required, or optional and given).
    uses_base: bool,
    flatten: bool,
    row_wise: bool,
    select_topk: f64,
    max_iter: usize,
    tol: f64,
    location: Location,
}

fn parse(value: &Json, cx: &ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    let p = cx.payload(value)?;
    let method_name = p.text("method")?.unwrap_or_default().to_owned();
    let method = match Method::of(&method_name) {
        Some(m) => m,
        None => {
            let hint = suggest(&method_name, KNOWN.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(PlanError::invalid(
                &p.at("method"),
                format!(
                    "unknown merge method `{method_name}`{hint} (known: {})",
                    KNOWN.join(", ")
                ),
            ));
        }
    };
    let to = p.text("to")?.unwrap_or_default().to_owned();
    if to.is_empty() || to.contains("::") {
        return Err(PlanError::invalid(
            &p.at("to"),
            format!("expected a new alias name, got `{to}`"),
        ));
    }
    if method == Method::Passthrough {
        return parse_passthrough(&p, to, cx);
    }
    if p.get("slices").is_some() {
        return Err(PlanError::invalid(
            &p.at("slices"),
            format!("{method_name} takes `models`; `slices` is for passthrough"),
        ));
    }
    if p.get("models").is_none() {
        return Err(PlanError::MissingKey {
            location: cx.location.clone(),
            key: "models".into(),
        });
    }
    let models = parse_models(p.get("models").unwrap_or(&Json::Null), &p.at("models"))?;
    let base = p.text("base")?.map(str::to_owned);
    if method.base_use() == BaseUse::Required && base.is_none() {
        return Err(PlanError::MissingKey {
            location: cx.location.clone(),
            key: "base".into(),
        });
    }
    if method.base_use() == BaseUse::Refused {
        if let Some(b) = &base {
            if !models.iter().any(|m| &m.alias == b) {
                return Err(PlanError::invalid(
                    &p.at("base"),
                    format!(
                        "{method_name} merges the listed models only and takes no base; list `{b}` in models instead"
                    ),
                ));
            }
        }
    }
    let uses_base = match method.base_use() {
        BaseUse::Required => true,
        BaseUse::Optional => base.is_some(),
        BaseUse::Refused => false,
    };
    let merged = models
        .iter()
        .filter(|m| !uses_base || Some(&m.alias) != base.as_ref())
        .count();
    let (fewest, most) = method.model_counts();
    if merged < fewest || merged > most {
        let wanted = if fewest == most {
            format!("exactly {fewest}")
        } else {
            format!("at least {fewest}")
        };
        return Err(PlanError::invalid(
            &p.at("models"),
            format!(
                "{method_name} needs {wanted} model{} besides the base, got {merged}",
                if fewest == 1 { "" } else { "s" }
            ),
        ));
    }
    let mut shared = Vec::new();
    for key in ["weight", "density", "gamma", "epsilon", "t"] {
        if let Some(v) = p.get(key) {
            shared.push((key, Param::parse(v, &p.at(key))?));
        }
    }
    if method == Method::Slerp && !shared.iter().any(|(k, _)| *k == "t") {
        return Err(PlanError::MissingKey {
            location: cx.location.clone(),
            key: "t".into(),
        });
    }
    let (default_rescale, default_normalize) = match method {
        Method::TaskArithmetic { rescale, .. } => (rescale, method.default_normalize()),
        _ => (false, method.default_normalize()),
    };
    let seed = match p.get("seed") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            PlanError::invalid(
                &p.at("seed"),
                format!("expected a whole number ≥ 0, got `{}`", compact(v)),
            )
        })?,
    };
    let lambda = p.number("lambda")?.unwrap_or(1.0);
    if !lambda.is_finite() {
        return Err(PlanError::invalid(&p.at("lambda"), "expected a finite number"));
    }
    let select_topk = p.number("select_topk")?.unwrap_or(1.0);
    let tol = p.number("tol")?.unwrap_or(1e-5);
    for (key, v) in [("select_topk", select_topk), ("tol", tol)] {
        if !v.is_finite() || v < 0.0 {
            return Err(PlanError::invalid(
                &p.at(key),
                format!("expected a finite number ≥ 0, got {v}"),
            ));
        }
    }
    // θ = 0 would divide 0 by 0 in the Karcher step.
    if tol == 0.0 {
        return Err(PlanError::invalid(&p.at("tol"), "expected a number > 0"));
    }
    let max_iter = p.count("max_iter")?.unwrap_or(10);
    let target = match p.get("target") {
        None => None,
        Some(_) => Some(p.reference("target")?),
    };
    Ok(Box::new(Merge {
        method_name,
        method,
        models,
        base,
        to,
        sidecars: p.text("sidecars")?.map(str::to_owned),
        target,
        dtype: p.dtype("dtype")?,
        shared,
        normalize: p.flag("normalize", default_normalize)?,
        rescale: p.flag("rescale", default_rescale)?,
        lambda,
        seed,
        uses_base,
        flatten: p.flag("nuslerp_flatten", true)?,
        row_wise: p.flag("nuslerp_row_wise", false)?,
        select_topk,
        max_iter,
        tol,
        location: cx.location.clone(),
    }))
}

/// One layer range of `passthrough`: layers `start..end` of `alias`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerSlice {
    alias: String,
    start: usize,
    end: usize,
}

/// `passthrough` (MergeKit's frankenmerge): the layers of each slice, in order, renumbered
/// consecutively from 0 in the output (the number after `layers`, `layer`, `h` or `blocks`);
/// the tensors without a layer number are listed in the first slice's alias's order (those before
/// its first layer tensor first, the others after the stacked layers) and taken, as MergeKit
/// takes an architecture's pre and post weights, from the first slice's alias for the input
/// embeddings ([`is_input_embedding`]) and from the last slice's for the rest (final norm,
/// `lm_head`), which were trained with the last layers. Tensors are carried as they are (cast
/// lazily to `dtype` when given, floating ones only).
#[derive(Debug)]
struct Passthrough {
    slices: Vec<LayerSlice>,
    to: String,
    sidecars: Option<String>,
    dtype: Option<DType>,
    location: Location,
}

/// Keys `passthrough` does not take.
const NOT_PASSTHROUGH: &[&str] = &[
    "models",
    "base",
    "target",
    "weight",
    "density",
    "gamma",
    "epsilon",
    "t",
    "normalize",
    "rescale",
    "lambda",
    "seed",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "select_topk",
    "max_iter",
    "tol",
];

fn parse_passthrough(
    p: &crate::plan::payload::Payload,
    to: String,
    cx: &ParseContext,
) -> Result<Box<dyn Transform>, PlanError> {
    for key in NOT_PASSTHROUGH {
        if p.get(key).is_some() {
            return Err(PlanError::invalid(
                &p.at(key),
                format!("passthrough takes `slices`, `to`, `dtype` and `sidecars`, not `{key}`"),
            ));
        }
    }
    let Some(value) = p.get("slices") else {
        return Err(PlanError::MissingKey {
            location: cx.location.clone(),
            key: "slices".into(),
        });
    };
    let at = p.at("slices");
    let items = match value {
        Json::Array(items) if !items.is_empty() => items,
        other => {
            return Err(PlanError::invalid(
                &at,
                format!(
                    "expected a non-empty list of {{alias, layers: [start, end]}}, got `{}`",
                    compact(other)
                ),
            ))
        }
    };
    let mut slices = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = at.index(i);
        let Json::Object(map) = item else {
            return Err(PlanError::invalid(
                &at,
                format!("expected {{alias, layers: [start, end]}}, got `{}`", compact(item)),
            ));
        };
        for key in map.keys() {
            if key != "alias" && key != "layers" {
                return Err(PlanError::UnknownKey {
                    location: at.clone(),
                    key: key.clone(),
                    suggestion: suggest(key, ["alias", "layers"]),
                    expected: vec!["alias".into(), "layers".into()],
                });
            }
        }
        let alias = match map.get("alias") {
            Some(Json::String(a)) => a.clone(),
            None | Some(Json::Null) => {
                return Err(PlanError::MissingKey {
                    location: at,
                    key: "alias".into(),
                })
            }
            Some(other) => {
                return Err(PlanError::invalid(
                    &at.key("alias"),
                    format!("expected an alias name, got `{}`", compact(other)),
                ))
            }
        };
        let range = match map.get("layers") {
            Some(Json::Array(r)) if r.len() == 2 => r.iter().map(Json::as_u64).collect::<Option<Vec<u64>>>(),
            None | Some(Json::Null) => {
                return Err(PlanError::MissingKey {
                    location: at,
                    key: "layers".into(),
                })
            }
            _ => None,
        };
        let (start, end) = match range.as_deref() {
            Some(&[s, e]) if s < e => (s as usize, e as usize),
            _ => {
                return Err(PlanError::invalid(
                    &at.key("layers"),
                    format!(
                        "expected [start, end] with whole numbers start < end (end excluded), got `{}`",
                        compact(map.get("layers").unwrap_or(&Json::Null))
                    ),
                ))
            }
        };
        slices.push(LayerSlice { alias, start, end });
    }
    Ok(Box::new(Passthrough {
        slices,
        to,
        sidecars: p.text("sidecars")?.map(str::to_owned),
        dtype: p.dtype("dtype")?,
        location: cx.location.clone(),
    }))
}

/// Whether a tensor outside the layers belongs to the input side of a model (token and position
/// embeddings: `embed_tokens`, `embeddings`, `word_embeddings`, `embed_in`, `embed_positions`,
/// GPT-2's `wte`/`wpe`), which a passthrough merge takes from its first slice; the other ones
/// (final norm, `lm_head`, GPT-NeoX's `embed_out`) come from the last, as MergeKit's
/// architecture tables list them.
fn is_input_embedding(name: &str) -> bool {
    name.split('.').any(|segment| {
        matches!(
            segment,
            "embed_tokens" | "embed_in" | "embed_positions" | "embeddings" | "word_embeddings" | "wte" | "wpe"
        )
    })
}

/// `name` with its layer number (see [`layer_index`]) replaced by `layer`.
pub(crate) fn renumbered(name: &str, layer: usize) -> String {
    let mut segments: Vec<String> = name.split('.').map(str::to_owned).collect();
    if let Some(i) = (0..segments.len().saturating_sub(1)).find(|&i| {
        matches!(segments[i].as_str(), "layers" | "layer" | "h" | "blocks") && segments[i + 1].parse::<usize>().is_ok()
    }) {
        segments[i + 1] = layer.to_string();
    }
    segments.join(".")
}

impl Transform for Passthrough {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let location = &self.location;
        for (i, slice) in self.slices.iter().enumerate() {
            let at = location.key("slices").index(i);
            state.alias_for(Some(&slice.alias), &slice.alias, &at.key("alias"))?;
            let layers = state
                .alias(&slice.alias)
                .and_then(|a| a.iter().filter_map(|(n, _)| layer_index(n)).max())
                .map_or(0, |m| m + 1);
            if slice.end > layers {
                return Err(PlanError::invalid(
                    &at.key("layers"),
                    format!(
                        "layers [{}, {}) lie outside alias `{}`, which has {layers} layers",
                        slice.start, slice.end, slice.alias
                    ),
                )
                .into());
            }
        }
        check_destination(state, &self.to, self.dtype, location)?;
        let cast = |name: &str, alias: &str, t: &Tensor| -> Result<Tensor, StepError> {
            match self.dtype {
                Some(d) if t.dtype != d && t.dtype.is_float() && t.dtype.is_computable() => t
                    .cast(d)
                    .map_err(|e| TransformError::value_of(&format!("{alias}::{name}"), e)),
                _ => Ok(t.clone()),
            }
        };
        let first = &self.slices[0].alias;
        let last = &self.slices[self.slices.len() - 1].alias;
        let (mut pre, mut post) = (Vec::new(), Vec::new());
        let mut seen_layer = false;
        for (name, t) in state
            .alias(first)
            .map(|a| a.iter().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if layer_index(name).is_some() {
                seen_layer = true;
                continue;
            }
            let (alias, t) = match state.get(last, name) {
                Some(t) if !is_input_embedding(name) => (last, t),
                _ => (first, t),
            };
            let carried = (name.to_owned(), cast(name, alias, t)?);
            if seen_layer {
                post.push(carried);
            } else {
                pre.push(carried);
            }
        }
        let mut stacked = Vec::new();
        let mut next = 0;
        for slice in &self.slices {
            let tensors: Vec<(&str, &Tensor)> = state
                .alias(&slice.alias)
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            for layer in slice.start..slice.end {
                for (name, t) in tensors.iter().filter(|(n, _)| layer_index(n) == Some(layer)) {
                    stacked.push((renumbered(name, next), cast(name, &slice.alias, t)?));
                }
                next += 1;
            }
        }
        let count = pre.len() + stacked.len() + post.len();
        let source = self.sidecars.as_deref().unwrap_or(first);
        let sources: Vec<usize> = self.slices.iter().flat_map(|s| s.start..s.end).collect();
        carry_sidecars(state, source, &self.to, self.dtype, Some(&sources), location)?;
        for (name, tensor) in pre.into_iter().chain(stacked).chain(post) {
            state.insert(&self.to, &name, tensor);
        }
        ctx.note(format!(
            "merge (passthrough): {next} layers from {} slices stacked into `{}`, {}",
            self.slices.len(),
            self.to,
            count_noun(count)
        ));
        Ok(Flow::Continue)
    }
}

/// Parses `models`: a mapping alias → parameters (or null), or a list of aliases.
fn parse_models(value: &Json, location: &Location) -> Result<Vec<ModelSpec>, PlanError> {
    let mut models: Vec<ModelSpec> = Vec::new();
    match value {
        Json::Object(map) => {
            for (alias, params) in map {
                let at = location.key(alias);
                let mut spec = ModelSpec {
                    alias: alias.clone(),
                    params: Vec::new(),
                };
                match params {
                    Json::Null => {}
                    Json::Object(params) => {
                        for (key, v) in params {
                            let Some(key) = MODEL_KEYS.iter().find(|k| **k == key) else {
                                return Err(PlanError::UnknownKey {
                                    location: at.clone(),
                                    key: key.clone(),
                                    suggestion: suggest(key, MODEL_KEYS.iter().copied()),
                                    expected: MODEL_KEYS.iter().map(|k| (*k).to_owned()).collect(),
                                });
                            };
                            if !v.is_null() {
                                spec.params.push((key, Param::parse(v, &at.key(key))?));
                            }
                        }
                    }
                    other => {
                        return Err(PlanError::invalid(
                            &at,
                            format!(
                                "expected a mapping of parameters ({}), got `{}`",
                                MODEL_KEYS.join(", "),
                                compact(other)
                            ),
                        ))
                    }
                }
                models.push(spec);
            }
        }
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let Json::String(alias) = item else {
                    return Err(PlanError::invalid(
                        &location.index(i),
                        format!("expected an alias name, got `{}`", compact(item)),
                    ));
                };
                if models.iter().any(|m| &m.alias == alias) {
                    return Err(PlanError::invalid(
                        &location.index(i),
                        format!("alias `{alias}` is listed twice"),
                    ));
                }
                models.push(ModelSpec {
                    alias: alias.clone(),
                    params: Vec::new(),
                });
            }
        }
        other => {
            return Err(PlanError::invalid(
                location,
                format!(
                    "expected a mapping alias → parameters, or a list of aliases, got `{}`",
                    compact(other)
                ),
            ))
        }
    }
    if models.is_empty() {
        return Err(PlanError::invalid(location, "expected at least one model"));
    }
    Ok(models)
}

/// The parameters of one model for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Resolved {
    weight: f64,
    density: f64,
    gamma: f64,
    epsilon: f64,
}

impl Merge {
    /// The value of `key` for `model` (its own, else the shared one) for tensor `name` at
    /// layer position `t`.
    fn param(&self, model: &ModelSpec, key: &str, name: &str, t: f64) -> Option<f64> {
        let own = model.get(key).and_then(|p| p.at(name, t));
        own.or_else(|| {
            self.shared
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, p)| p.at(name, t))
        })
    }

    fn resolve(&self, model: &ModelSpec, name: &str, t: f64) -> Result<Resolved, PlanError> {
        let needs_weight = self.method.needs_weight();
        let weight = match self.param(model, "weight", name, t) {
            Some(w) => w,
            None if needs_weight => {
                return Err(PlanError::invalid(
                    &self.location.key("models").key(&model.alias),
                    format!(
                    "{} needs a weight for model `{}` (tensor `{name}`): give `weight` per model or at the top level",
                    self.method_name, model.alias
                ),
                ))
            }
            None => 1.0,
        };
        let density = self.param(model, "density", name, t).unwrap_or(1.0);
        let gamma = self.param(model, "gamma", name, t).unwrap_or(0.01);
        let epsilon = self.param(model, "epsilon", name, t).unwrap_or(0.15);
        let bad = |key: &str, why: &str| {
            PlanError::invalid(
                &self.location.key(key),
                format!("model `{}`, tensor `{name}`: {why}", model.alias),
            )
        };
        if !(0.0..=1.0).contains(&density) {
            return Err(bad("density", &format!("density must be in [0, 1], got {density}")));
        }
        if !(0.0..=1.0).contains(&gamma) {
            return Err(bad("gamma", &format!("gamma must be in [0, 1], got {gamma}")));
        }
        if let Method::TaskArithmetic {
            sparsify: Some(Sparsify::RankedRandom),
            ..
        } = self.method
        {
            // MergeKit's della_magprune refuses probabilities outside (0, 1).
            if density > 0.0 && density < 1.0 && (density + epsilon >= 1.0 || density - epsilon <= 0.0) {
                return Err(bad(
                    "epsilon",
                    &format!("density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}"),
                ));
            }
        }
        Ok(Resolved {
            weight,
            density,
            gamma,
            epsilon,
        })
    }
}

impl Transform for Merge {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let location = &self.location;
        // Every alias must exist; the names come from the base, else from the first model.
        for m in &self.models {
            state.alias_for(Some(&m.alias), &m.alias, &location.key("models").key(&m.alias))?;
        }
        if let Some(b) = &self.base {
            state.alias_for(Some(b), b, &location.key("base"))?;
        }
        check_destination(state, &self.to, self.dtype, location)?;
        let uses_base = self.uses_base;
        let first = if uses_base {
            self.base.clone().unwrap_or_default()
        } else {
            self.models[0].alias.clone()
        };
        // The models merged besides the base (a base listed among the models is the base).
        let merged: Vec<&ModelSpec> = self
            .models
            .iter()
            .filter(|m| !uses_base || Some(&m.alias) != self.base.as_ref())
            .collect();
        let names: Vec<(String, Tensor)> = state
            .alias(&first)
            .map(|a| a.iter().map(|(n, t)| (n.to_owned(), t.clone())).collect())
            .unwrap_or_default();
        let layers = names
            .iter()
            .filter_map(|(n, _)| layer_index(n))
            .max()
            .map_or(0, |m| m + 1);
        let mut results = Vec::with_capacity(names.len());
        let mut merged_count = 0;
        let workspace = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        for (name, first_tensor) in &names {
            let selected = match &self.target {
                None => true,
                Some(r) => r
                    .selector
                    .try_captures(name)
                    .map_err(|e| TransformError::Select(crate::state::SelectError::Match(e)))?
                    .is_some(),
            };
            if !selected || !first_tensor.dtype.is_float() || !first_tensor.dtype.is_computable() {
                results.push((name.clone(), first_tensor.clone()));
                continue;
            }
            // MergeKit's position of a layer: 1 for the only layer of a one-layer model.
            let t = match (layer_index(name), layers) {
                (Some(i), n) if n > 1 => i as f64 / (n - 1) as f64,
                (Some(_), 1) => 1.0,
                _ => 0.0,
            };
            let display = format!("{first}::{name}");
            let mut inputs = Vec::new();
            if uses_base {
                inputs.push(first_tensor.clone());
            }
            let mut params = Vec::new();
            let mut seeds = Vec::new();
            for m in &merged {
                let Some(tensor) = state.get(&m.alias, name) else {
                    return Err(TransformError::OperandMissing {
                        op: "merge",
                        operand: format!("{}::{name}", m.alias),
                        source_name: display,
                    }
                    .into());
                };
                if tensor.shape != first_tensor.shape {
                    return Err(TransformError::ShapeMismatch {
                        source_name: format!("{}::{name}", m.alias),
                        source_shape: tensor.shape.clone(),
                        destination: display,
                        destination_shape: first_tensor.shape.clone(),
                    }
                    .into());
                }
                if !tensor.dtype.is_float() || !tensor.dtype.is_computable() {
                    return Err(TransformError::NotFloat {
                        op: "merge",
                        tensor: format!("{}::{name}", m.alias),
                        dtype: tensor.dtype,
                    }
                    .into());
                }
                inputs.push(tensor.clone());
                params.push(self.resolve(m, name, t)?);
                seeds.push(mask_seed(self.seed, &m.alias, name));
            }
            let slerp_t = if self.method == Method::Slerp {
                let t_value = self
                    .shared
                    .iter()
                    .find(|(k, _)| *k == "t")
                    .and_then(|(_, p)| p.at(name, t));
                let Some(t_value) = t_value else {
                    return Err(PlanError::invalid(
                        &location.key("t"),
                        format!("no `t` entry matches tensor `{name}` (add an entry without filter)"),
                    )
                    .into());
                };
                t_value
            } else {
                0.0
            };
            if matches!(self.method, Method::Linear | Method::MultiSlerp) {
                let sum: f64 = params.iter().map(|p| p.weight).sum();
                if self.normalize && sum.abs() < 1e-8 {
                    return Err(PlanError::invalid(
                        &location.key("models"),
                        format!("the weights for tensor `{name}` sum to {sum}; normalize cannot divide by it"),
                    )
                    .into());
                }
                if self.method == Method::Linear && !self.normalize && (sum - 1.0).abs() > 1e-6 {
                    return Err(PlanError::invalid(
                        &location.key("models"),
                        format!(
                            "the weights for tensor `{name}` sum to {sum}, not 1; with normalize: false linear needs weights summing to one (or set normalize: true)"
                        ),
                    )
                    .into());
                }
            }
            let dtype = self.dtype.unwrap_or(first_tensor.dtype);
            let n = first_tensor.numel();
            let wide = if inputs.iter().all(|t| t.dtype == DType::F64) {
                8
            } else {
                4
            };
            if streamed::streams(self.method) {
                let pruned = params.iter().filter(|p| p.density < 1.0).count();
                let widest = inputs.iter().filter_map(|t| t.dtype.size()).max().unwrap_or(1);
                let widen = widest.div_ceil(dtype.size().unwrap_or(1).max(1));
                workspace.fetch_max(
                    streamed::workspace(self.method, inputs.len(), pruned, n, widen),
                    Ordering::Relaxed,
                );
            } else {
                // Computing it holds every input whole in the work type and at most two buffers
                // more (sort keys and their copy; karcher's mean and tangent), then the result.
                let transient = n.saturating_mul(wide).saturating_mul(inputs.len() + 2);
                workspace.fetch_max(transient, Ordering::Relaxed);
                largest.fetch_max(dtype.nbytes(n).unwrap_or(usize::MAX), Ordering::Relaxed);
            }
            let op = MergeOp {
                method: self.method,
                inputs,
                uses_base,
                params,
                seeds,
                normalize: self.normalize,
                rescale: self.rescale,
                lambda: self.lambda,
                t: slerp_t,
                flatten: self.flatten,
                row_wise: self.row_wise,
                select_topk: self.select_topk,
                max_iter: self.max_iter,
                tol: self.tol,
                tensor: format!("{}::{name}", self.to),
                largest: largest.clone(),
                workspace: workspace.clone(),
                result: Mutex::new(None),
                figures: Mutex::new(None),
            };
            let tensor = Tensor::op(dtype, first_tensor.shape.clone(), Arc::new(op))
                .map_err(|e| TransformError::value_of(&display, e))?;
            results.push((name.clone(), tensor));
            merged_count += 1;
        }
        carry_sidecars(
            state,
            self.sidecars.as_deref().unwrap_or(&first),
            &self.to,
            self.dtype,
            None,
            location,
        )?;
        for (name, tensor) in results {
            state.insert(&self.to, &name, tensor);
        }
        ctx.note(format!(
            "merge ({}): {} merged into `{}`, {} copied",
            self.method_name,
            count_noun(merged_count),
            self.to,
            names.len() - merged_count
        ));
        Ok(Flow::Continue)
    }
}

/// Creates the alias `to` with the sidecars (config, tokenizer, …) of `source`: a merged model
/// loads with `from_pretrained` only with its base's config beside it (issue 13 item 4). The
/// config then says the result's dtype (`torch_dtype`, and `dtype` as transformers 5 names it,
/// where present) and, for passthrough (`layers`: the source layer of each layer written), its
/// layer count and per-layer `layer_types` (which transformers checks against the count). A
/// config that is not JSON is carried as it is.
fn carry_sidecars(
    state: &mut State,
    source: &str,
    to: &str,
    dtype: Option<DType>,
    layers: Option<&[usize]>,
    location: &Location,
) -> Result<(), StepError> {
    state.alias_for(Some(source), source, &location.key("sidecars"))?;
    state.copy_sidecars(source, to);
    let Ok(Some(mut config)) = state.sidecar_json(to, "config.json") else {
        return Ok(());
    };
    let mut changed = false;
    if let (Some(dtype), Json::Object(map)) = (dtype, &mut config) {
        for key in ["torch_dtype", "dtype"] {
            if map.contains_key(key) {
                map.insert(key.to_owned(), Json::String(dtype.name().to_owned()));
                changed = true;
            }
        }
    }
    if let (Some(layers), Json::Object(map)) = (layers, &mut config) {
        // Llama-style configs say num_hidden_layers; GPT-2 n_layer; a few num_layers.
        for key in ["num_hidden_layers", "n_layer", "num_layers"] {
            if map.get(key).is_some_and(Json::is_u64) {
                map.insert(key.to_owned(), Json::from(layers.len()));
                changed = true;
            }
        }
        // Per-layer attention kinds (Qwen2/3, Gemma): each written layer keeps its source's.
        if let Some(Json::Array(types)) = map.get("layer_types") {
            if layers.iter().all(|&l| l < types.len()) {
                let rebuilt: Vec<Json> = layers.iter().map(|&l| types[l].clone()).collect();
                map.insert("layer_types".to_owned(), Json::Array(rebuilt));
                changed = true;
            }
        }
    }
    if changed {
        state.set_sidecar_json(to, "config.json", config);
    }
    Ok(())
}

/// The new alias `to` a merge writes (it must not exist yet) and its float `dtype`, if given.
fn check_destination(state: &State, to: &str, dtype: Option<DType>, location: &Location) -> Result<(), StepError> {
    if state.alias(to).is_some() {
        return Err(PlanError::invalid(
            &location.key("to"),
            format!("alias `{to}` already exists; merge writes a new alias"),
        )
        .into());
    }
    match dtype {
        Some(dtype) if !dtype.is_float() || !dtype.is_computable() => Err(PlanError::invalid(
            &location.key("dtype"),
            format!("merge computes in floating point; `dtype` must be a float dtype, got {dtype}"),
        )
        .into()),
        _ => Ok(()),
    }
}

/// The seed of a model's random mask for one tensor: FNV-1a (64-bit) of the UTF-8 bytes of
/// `"{seed}\0{alias}\0{name}"`.
pub(crate) fn mask_seed(seed: u64, alias: &str, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{seed}\0{alias}\0{name}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Element `index`'s uniform draw in [0, 1) for a mask seeded `key`: SplitMix64's output for
/// state `key + (index + 1)·0x9E3779B97F4A7C15`, its top 53 bits over 2⁵³. Counter-based, so
/// every element's draw is independent of the order elements are drawn in.
pub(crate) fn uniform(key: u64, index: u64) -> f64 {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One merged tensor: computed whole on its first read, kept for the chunks that follow.
#[derive(Debug)]
pub struct MergeOp {
    method: Method,
    /// The base first (when the method uses one), then the merged models.
    inputs: Vec<Tensor>,
    uses_base: bool,
    /// Each merged model's parameters for this tensor.
    params: Vec<Resolved>,
    /// Each merged model's mask seed for this tensor ([`mask_seed`]).
    seeds: Vec<u64>,
    normalize: bool,
    rescale: bool,
    lambda: f64,
    /// Slerp's factor for this tensor.
    t: f64,
    flatten: bool,
    row_wise: bool,
    select_topk: f64,
    max_iter: usize,
    tol: f64,
    /// `alias::name` of the merged tensor, for messages.
    tensor: String,
    /// The largest result of the step (shared by the step's tensors).
    largest: Arc<AtomicUsize>,
    /// The most bytes computing one tensor of this step takes (shared by the step's tensors).
    workspace: Arc<AtomicUsize>,
    /// Computed whole: the result, once computed.
    result: Mutex<Option<Arc<Scratch>>>,
    /// Computed chunk by chunk ([`streamed`]): the tensor's figures, once found.
    figures: Mutex<Option<Arc<Figures>>>,
}

/// The work type of merging: f32, or f64 when every input is F64.
trait Work: Real + Element {
    /// Bits in [`Work::abs_bits`].
    const WIDTH: u32;
    /// An unsigned integer of [`Work::WIDTH`] bits: keys at their own width, so the hot loops
    /// compare eight f32 keys per AVX2 register rather than four widened ones.
    type Key: streamed::KeyWord;
    /// The bits of |x|, which order as the magnitudes.
    fn abs_bits(self) -> u64;
    /// `abs_bits ^ flip` at the key's width.
    fn key(self, flip: u64) -> Self::Key;
    /// `self − other`, rounded once (as in f64 and rounded: the double rounding is innocuous
    /// for f32, whose precision is less than half of f64's).
    fn minus(self, other: Self) -> Self;
    /// The value where `keep`, else +0 (without branching).
    fn kept(self, keep: bool) -> Self;
    /// Whether `(abs_bits ^ flip, at)` lies in `[low, high)`, on keys of this type's width
    /// (the bounds' keys are of that width) and positions in a block, without branching.
    fn between(self, flip: u64, low: (u64, u32), high: (u64, u32), at: u32) -> bool;
    /// The values' bytes (little-endian on the targets we build for, as the arena's views).
    fn bytes(values: &[Self]) -> &[u8] {
        // SAFETY: plain numbers (`Element`) viewed as bytes; u8 has no alignment.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
    }
    /// The values' bytes, to fill.
    fn bytes_mut(values: &mut [Self]) -> &mut [u8] {
        // SAFETY: as in `bytes`; every bit pattern is a valid value.
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
    }
}

impl Work for f32 {
    const WIDTH: u32 = 32;
    type Key = u32;
    fn abs_bits(self) -> u64 {
        u64::from(self.abs().to_bits())
    }
    #[inline(always)]
    fn key(self, flip: u64) -> u32 {
        self.abs().to_bits() ^ flip as u32
    }
    fn minus(self, other: Self) -> Self {
        self - other
    }
    fn kept(self, keep: bool) -> Self {
        f32::from_bits(self.to_bits() & 0u32.wrapping_sub(u32::from(keep)))
    }
    #[inline(always)]
    fn between(self, flip: u64, low: (u64, u32), high: (u64, u32), at: u32) -> bool {
        let k = self.abs().to_bits() ^ flip as u32;
        let (lk, hk) = (low.0 as u32, high.0 as u32);
        ((k > lk) | ((k == lk) & (at >= low.1))) & ((k < hk) | ((k == hk) & (at < high.1)))
    }
}

impl Work for f64 {
    const WIDTH: u32 = 64;
    type Key = u64;
    fn abs_bits(self) -> u64 {
        self.abs().to_bits()
    }
    #[inline(always)]
    fn key(self, flip: u64) -> u64 {
        self.abs().to_bits() ^ flip
    }
    fn minus(self, other: Self) -> Self {
        self - other
    }
    fn kept(self, keep: bool) -> Self {
        f64::from_bits(self.to_bits() & 0u64.wrapping_sub(u64::from(keep)))
    }
    #[inline(always)]
    fn between(self, flip: u64, low: (u64, u32), high: (u64, u32), at: u32) -> bool {
        let k = self.abs().to_bits() ^ flip;
        ((k > low.0) | ((k == low.0) & (at >= low.1))) & ((k < high.0) | ((k == high.0) & (at < high.1)))
    }
}

impl MergeOp {
    fn wide(&self) -> usize {
        if self.inputs.iter().all(|t| t.dtype == DType::F64) {
            8
        } else {
            4
        }
    }

    fn result(&self, dtype: DType, cx: &mut ReadContext) -> Result<Arc<Scratch>, ValueError> {
        let mut slot = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(result) = &*slot {
            return Ok(result.clone());
        }
        let computed = if self.wide() == 8 {
            self.compute::<f64>(dtype, cx)?
        } else {
            self.compute::<f32>(dtype, cx)?
        };
        computed.settle();
        let result = Arc::new(computed);
        *slot = Some(result.clone());
        Ok(result)
    }

    /// The figures a streamed merge needs, found on the first read.
    fn figures_once(&self, cx: &mut ReadContext) -> Result<Arc<Figures>, ValueError> {
        let mut slot = self.figures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(figures) = &*slot {
            return Ok(figures.clone());
        }
        let figures = Arc::new(if self.wide() == 8 {
            self.figures::<f64>(cx)?
        } else {
            self.figures::<f32>(cx)?
        });
        *slot = Some(figures.clone());
        Ok(figures)
    }

    fn read_input<T: Work>(&self, i: usize, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        cx.check()?;
        read_real_scratch::<T>(&self.inputs[i], "merge", cx)
    }

    /// The merged values in `T`, converted to `dtype`.
    fn compute<T: Work>(&self, dtype: DType, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let values = match self.method {
            Method::TaskArithmetic {
                sparsify: Some(Sparsify::RankedRandom),
                ..
            } => self.della::<T>(cx)?,
            Method::Slerp => self.slerp::<T>(cx)?,
            Method::ModelStock => self.model_stock::<T>(cx)?,
            Method::NuSlerp => self.nuslerp::<T>(cx)?,
            Method::MultiSlerp => self.multislerp::<T>(cx)?,
            Method::Karcher => self.karcher::<T>(cx)?,
            Method::Sce => self.sce::<T>(cx)?,
            Method::ArceeFusion => self.arcee_fusion::<T>(cx)?,
            Method::Passthrough => {
                return Err(ValueError::Compute {
                    op: "merge",
                    reason: "passthrough copies tensors and computes none".into(),
                })
            }
            Method::Linear | Method::TaskArithmetic { .. } => {
                return Err(ValueError::Compute {
                    op: "merge",
                    reason: "this method is computed chunk by chunk".into(),
                })
            }
        };
        real_scratch(values.typed::<T>(), dtype, "merge", cx)
    }

    /// DELLA (MergeKit's generalized task arithmetic with `della_magprune`): each delta pruned
    /// whole, since a row's keep probabilities follow the ranks of |δ| within it, then merged as
    /// the streamed methods are ([`streamed::combine_whole`]).
    fn della<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let mut base = self.read_input::<T>(0, cx)?;
        let shape = self.inputs[0].shape.clone();
        let mut deltas = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let mut m = self.read_input::<T>(i + 1, cx)?;
            for (d, &b) in m.typed_mut::<T>().iter_mut().zip(base.typed::<T>()) {
                *d = d.minus(b);
            }
            if p.density < 1.0 {
                ranked_random::<T>(m.typed_mut::<T>(), &shape, p, self.seeds[i], self.rescale, cx)?;
            }
            deltas.push(m);
        }
        cx.check()?;
        let views: Vec<&[T]> = deltas.iter().map(|d| d.typed::<T>()).collect();
        streamed::combine_whole(self, &views, base.typed_mut::<T>(), cx)?;
        Ok(base)
    }

    /// Spherical interpolation (MergeKit merge_methods/slerp.py): with `v̂` the unit vectors
    /// (a norm ≤ 1e-8 left as is) and `d = v̂₀·v̂₁`, `lerp` when `|d| > 0.9995`, else
    /// `sin((1−t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁` with `θ = acos d`.
    fn slerp<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let mut v0 = self.read_input::<T>(0, cx)?;
        let v1 = self.read_input::<T>(1, cx)?;
        let (a, b) = (v0.typed::<T>(), v1.typed::<T>());
        let norm = |v: &[T]| v.iter().map(|x| x.wide() * x.wide()).sum::<f64>().sqrt();
        let (n0, n1) = (norm(a), norm(b));
        let unit = |n: f64| if n > 1e-8 { 1.0 / n } else { 1.0 };
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x.wide() * y.wide()).sum::<f64>() * unit(n0) * unit(n1);
        let t = self.t;
        let (s0, s1) = if dot.abs() > 0.9995 {
            (1.0 - t, t)
        } else {
            let theta = dot.acos();
            let sin = theta.sin();
            (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
        };
        for (x, y) in v0.typed_mut::<T>().iter_mut().zip(v1.typed::<T>()) {
            *x = T::of(s0 * x.wide() + s1 * y.wide());
        }
        Ok(v0)
    }

    /// Model Stock (MergeKit merge_methods/model_stock.py, whole tensors): `cos` the mean over
    /// pairs of the deltas' cosine (norm product clamped to ≥ 1e-6, cosine to [−1, 1]),
    /// `t = N·cos / (1 + (N−1)·cos)`, result `t·mean(mᵢ) + (1−t)·base`.
    fn model_stock<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let mut base = self.read_input::<T>(0, cx)?;
        let n = self.params.len();
        let mut models = Vec::with_capacity(n);
        for i in 0..n {
            models.push(self.read_input::<T>(i + 1, cx)?);
        }
        let b = base.typed::<T>();
        let views: Vec<&[T]> = models.iter().map(|m| m.typed::<T>()).collect();
        let norms: Vec<f64> = views
            .iter()
            .map(|m| {
                m.iter()
                    .zip(b)
                    .map(|(x, y)| (x.wide() - y.wide()).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let mut cosines = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let dot: f64 = views[i]
                    .iter()
                    .zip(views[j])
                    .zip(b)
                    .map(|((x, y), z)| (x.wide() - z.wide()) * (y.wide() - z.wide()))
                    .sum();
                cosines.push((dot / (norms[i] * norms[j]).max(1e-6)).clamp(-1.0, 1.0));
            }
        }
        let cos = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
        let nf = n as f64;
        let denominator = 1.0 + (nf - 1.0) * cos;
        if denominator.abs() < 1e-12 {
            return Err(ValueError::Compute {
                op: "merge",
                reason: format!(
                    "model_stock of `{}`: the deltas point in opposite directions (mean cosine {cos}), so 1 + (N−1)·cos is 0",
                    self.tensor
                ),
            });
        }
        let t = nf * cos / denominator;
        for (j, x) in base.typed_mut::<T>().iter_mut().enumerate() {
            let avg = views.iter().map(|m| m[j].wide()).sum::<f64>() / nf;
            *x = T::of(t * avg + (1.0 - t) * x.wide());
        }
        Ok(base)
    }
}

impl MergeOp {
    /// The models' tensors (minus the base when there is one) whole in `T`, and the base.
    fn models_and_base<T: Work>(&self, cx: &mut ReadContext) -> Result<(Vec<Scratch>, Option<Scratch>), ValueError> {
        let base = if self.uses_base {
            Some(self.read_input::<T>(0, cx)?)
        } else {
            None
        };
        let offset = usize::from(self.uses_base);
        let mut models = Vec::with_capacity(self.params.len());
        for i in 0..self.params.len() {
            let mut m = self.read_input::<T>(i + offset, cx)?;
            if let Some(b) = &base {
                for (x, y) in m.typed_mut::<T>().iter_mut().zip(b.typed::<T>()) {
                    *x = T::of(x.wide() - y.wide());
                }
            }
            models.push(m);
        }
        Ok((models, base))
    }

    /// Adds the base back (when there is one) to a result held in `out`.
    fn plus_base<T: Work>(out: &mut Scratch, base: Option<&Scratch>) {
        if let Some(b) = base {
            for (x, y) in out.typed_mut::<T>().iter_mut().zip(b.typed::<T>()) {
                *x = T::of(x.wide() + y.wide());
            }
        }
    }

    /// NuSLERP (MergeKit merge_methods/nuslerp.py): `t = w₁ / (w₀ + w₁)` (0.5 when the sum is
    /// below 1e-6 in magnitude); each vector pair (the flattened tensors, else each row along the
    /// last dimension, or along the first with `row_wise`) is interpolated as
    /// `(sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ`, `cos θ` the dot product of the vectors over
    /// their norms (each clamped to ≥ 1e-7), and linearly where `|sin θ| < 1e-8`. With a base,
    /// the deltas are interpolated and added to it.
    fn nuslerp<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let (mut models, base) = self.models_and_base::<T>(cx)?;
        let (w0, w1) = (self.params[0].weight, self.params[1].weight);
        let t = if (w0 + w1).abs() < 1e-6 { 0.5 } else { w1 / (w0 + w1) };
        let v1 = models.pop().expect("nuslerp merges two models");
        let mut v0 = models.pop().expect("nuslerp merges two models");
        let shape = &self.inputs[0].shape;
        let n = self.inputs[0].numel();
        // Vectors: `count` of them, `len` long, element i of vector v at `at(v, i)`.
        let (len, count, row_wise) = if self.flatten || shape.is_empty() {
            (n, 1, false)
        } else if self.row_wise {
            (shape[0], n / shape[0].max(1), true)
        } else {
            let len = shape[shape.len() - 1];
            (len, n / len.max(1), false)
        };
        let at = |v: usize, i: usize| if row_wise { v + i * count } else { v * len + i };
        let a = v0.typed_mut::<T>();
        let b = v1.typed::<T>();
        for v in 0..count {
            if v % 1024 == 0 {
                cx.check()?;
            }
            let (mut n0, mut n1, mut dot) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..len {
                let (x, y) = (a[at(v, i)].wide(), b[at(v, i)].wide());
                n0 += x * x;
                n1 += y * y;
                dot += x * y;
            }
            let cos = dot / (n0.sqrt().max(1e-7) * n1.sqrt().max(1e-7));
            let theta = cos.clamp(-1.0, 1.0).acos();
            let sin = theta.sin();
            let (s0, s1, div) = if sin.abs() < 1e-8 {
                (1.0 - t, t, 1.0)
            } else {
                (((1.0 - t) * theta).sin(), (t * theta).sin(), sin)
            };
            for i in 0..len {
                let j = at(v, i);
                a[j] = T::of((s0 * a[j].wide() + s1 * b[j].wide()) / div);
            }
        }
        Self::plus_base::<T>(&mut v0, base.as_ref());
        Ok(v0)
    }

    /// Multi-SLERP (MergeKit merge_methods/multislerp.py): the models (or deltas) flattened,
    /// `uᵢ = xᵢ / (‖xᵢ‖ + 1e-8)`, weights normalised to sum 1 with `normalize`; `m = Σ wᵢ·uᵢ`
    /// projected to the sphere (`m̂`), the tangent `τ = Σ wᵢ·(uᵢ − (uᵢ·m̂)·m̂)`, the result
    /// `(cos‖τ‖·m̂ + sin‖τ‖/‖τ‖·τ)·Σ wᵢ‖xᵢ‖` (‖τ‖ + 1e-8 for the norm). One model is returned
    /// as it is; `‖m‖ < 1e-8` falls back to `w₀x₀ + w₁x₁` for two models and fails for more.
    fn multislerp<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let eps = 1e-8;
        if self.params.len() == 1 {
            let offset = usize::from(self.uses_base);
            return self.read_input::<T>(offset, cx);
        }
        if self.inputs[0].numel() == 0 {
            return cx.alloc("merge", 0);
        }
        let (models, base) = self.models_and_base::<T>(cx)?;
        let mut weights: Vec<f64> = self.params.iter().map(|p| p.weight).collect();
        if self.normalize {
            let sum: f64 = weights.iter().sum();
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        let views: Vec<&[T]> = models.iter().map(|m| m.typed::<T>()).collect();
        let norms: Vec<f64> = views
            .iter()
            .map(|v| v.iter().map(|x| x.wide() * x.wide()).sum::<f64>().sqrt())
            .collect();
        let n = self.inputs[0].numel();
        let mut out = cx.alloc("merge", n * std::mem::size_of::<T>())?;
        let o = out.typed_mut::<T>();
        // The weighted mean of the unit vectors, then its norm.
        for (j, slot) in o.iter_mut().enumerate() {
            let m: f64 = views
                .iter()
                .zip(&weights)
                .zip(&norms)
                .map(|((v, w), nm)| w * v[j].wide() / (nm + eps))
                .sum();
            *slot = T::of(m);
        }
        let mean_norm = o.iter().map(|x| x.wide() * x.wide()).sum::<f64>().sqrt();
        if norms.iter().all(|&nm| nm < eps) {
            // Every model (or delta) is zero here (a bias no fine-tune changed): so is their
            // interpolation.
            o.iter_mut().for_each(|x| *x = T::of(0.0));
            Self::plus_base::<T>(&mut out, base.as_ref());
            return Ok(out);
        }
        if mean_norm < eps {
            if views.len() == 2 {
                for (j, slot) in o.iter_mut().enumerate() {
                    *slot = T::of(views[0][j].wide() * weights[0] + views[1][j].wide() * weights[1]);
                }
                Self::plus_base::<T>(&mut out, base.as_ref());
                return Ok(out);
            }
            return Err(ValueError::Compute {
                op: "merge",
                reason: format!(
                    "multislerp of `{}`: the weighted sum of the models' unit vectors is zero (antipodal models with balancing weights); use other weights",
                    self.tensor
                ),
            });
        }
        // uᵢ·m̂ for each model; Σ wᵢ·(uᵢ·m̂) gives the tangent as m − D·m̂.
        let dots: Vec<f64> = views
            .iter()
            .zip(&norms)
            .map(|(v, nm)| {
                v.iter()
                    .zip(o.iter())
                    .map(|(x, m)| x.wide() / (nm + eps) * (m.wide() / mean_norm))
                    .sum::<f64>()
            })
            .collect();
        let d: f64 = dots.iter().zip(&weights).map(|(x, w)| x * w).sum();
        let tangent_sq: f64 = o
            .iter()
            .map(|m| {
                let m = m.wide();
                let tau = m - d * m / mean_norm;
                tau * tau
            })
            .sum();
        let tn = tangent_sq.sqrt() + eps;
        let scale: f64 = norms.iter().zip(&weights).map(|(nm, w)| nm * w).sum();
        for slot in o.iter_mut() {
            let m = slot.wide();
            let unit = m / mean_norm;
            let tau = m - d * unit;
            *slot = T::of((unit * tn.cos() + tau * (tn.sin() / tn)) * scale);
        }
        Self::plus_base::<T>(&mut out, base.as_ref());
        Ok(out)
    }

    /// The Karcher mean (MergeKit merge_methods/karcher.py) with equal weights `1/N`: unit
    /// vectors `uᵢ = xᵢ/‖xᵢ‖` of the models with `‖xᵢ‖ > tol` (their weights renormalised), the
    /// mean started at their normalised average and moved along `τ = Σ aᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·μ)`
    /// (terms with `θᵢ < tol` left out) by `μ ← cos‖τ‖·μ + sin‖τ‖·τ/‖τ‖` until `‖τ‖ < tol` or
    /// `max_iter` steps; the result `μ·Σ ‖xᵢ‖/N`.
    fn karcher<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let tol = self.tol;
        let count = self.params.len();
        let n = self.inputs[0].numel();
        if count == 1 {
            return self.read_input::<T>(0, cx);
        }
        let alphas = vec![1.0 / count as f64; count];
        let (mut units, _) = self.models_and_base::<T>(cx)?;
        let mut norms = Vec::with_capacity(count);
        for u in &mut units {
            let norm = u.typed::<T>().iter().map(|x| x.wide() * x.wide()).sum::<f64>().sqrt();
            norms.push(norm);
            for x in u.typed_mut::<T>() {
                *x = T::of(if norm == 0.0 { 0.0 } else { x.wide() / norm });
            }
        }
        let valid: Vec<usize> = (0..count).filter(|&i| norms[i] > tol).collect();
        let mut mean = cx.alloc("merge", n * std::mem::size_of::<T>())?;
        if valid.is_empty() {
            return Ok(mean);
        }
        let alpha_sum: f64 = valid.iter().map(|&i| alphas[i]).sum();
        let a: Vec<f64> = valid.iter().map(|&i| alphas[i] / alpha_sum).collect();
        let views: Vec<&[T]> = valid.iter().map(|&i| units[i].typed::<T>()).collect();
        let norm_of = |v: &[T]| v.iter().map(|x| x.wide() * x.wide()).sum::<f64>().sqrt();
        {
            let m = mean.typed_mut::<T>();
            for (j, slot) in m.iter_mut().enumerate() {
                *slot = T::of(views.iter().zip(&a).map(|(u, w)| w * u[j].wide()).sum::<f64>());
            }
            let mean_norm = norm_of(m);
            for (j, slot) in m.iter_mut().enumerate() {
                *slot = T::of(if mean_norm < tol {
                    views[0][j].wide()
                } else {
                    slot.wide() / mean_norm
                });
            }
        }
        let mut tangent = cx.alloc("merge", n * std::mem::size_of::<T>())?;
        for _ in 0..self.max_iter {
            cx.check()?;
            let m = mean.typed_mut::<T>();
            let tg = tangent.typed_mut::<T>();
            tg.iter_mut().for_each(|x| *x = T::of(0.0));
            for (u, w) in views.iter().zip(&a) {
                let dot = u
                    .iter()
                    .zip(m.iter())
                    .map(|(x, y)| x.wide() * y.wide())
                    .sum::<f64>()
                    .clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                let f = w * theta / theta.sin();
                for ((t, x), y) in tg.iter_mut().zip(u.iter()).zip(m.iter()) {
                    *t = T::of(t.wide() + f * (x.wide() - dot * y.wide()));
                }
            }
            let tn = norm_of(tg);
            if tn < tol {
                break;
            }
            for (y, t) in m.iter_mut().zip(tg.iter()) {
                *y = T::of(tn.cos() * y.wide() + tn.sin() * (t.wide() / tn));
            }
            let unit_norm = norm_of(m);
            if unit_norm > tol {
                m.iter_mut().for_each(|y| *y = T::of(y.wide() / unit_norm));
            }
        }
        let scale: f64 = alphas.iter().zip(&norms).map(|(a, nm)| a * nm).sum();
        for y in mean.typed_mut::<T>() {
            *y = T::of(scale * y.wide());
        }
        Ok(mean)
    }

    /// SCE (MergeKit merge_methods/sce.py): deltas from the base; with `select_topk < 1` only
    /// the `⌊select_topk·nnz⌋` entries of largest variance across the models (population
    /// variance, `nnz` its non-zero count; ties by index) are kept in every delta; model weights
    /// `Σ δᵢ² / n` normalised to sum 1 (equal when all are 0); entries whose sign differs from
    /// that of `Σᵢ δᵢ` (≥ 0 counts as +) are erased; the result is `base + Σ wᵢ·δᵢ / Σ wᵢ` over
    /// the entries kept (the divisor 1 where none is).
    fn sce<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let (mut deltas, base) = self.models_and_base::<T>(cx)?;
        let mut base = base.expect("sce takes a base");
        let n = self.inputs[0].numel();
        let k = deltas.len() as f64;
        if self.select_topk < 1.0 && n > 0 {
            let mut variance = cx.alloc("merge", n * std::mem::size_of::<T>())?;
            {
                let views: Vec<&[T]> = deltas.iter().map(|d| d.typed::<T>()).collect();
                for (j, v) in variance.typed_mut::<T>().iter_mut().enumerate() {
                    let mean = views.iter().map(|d| d[j].wide()).sum::<f64>() / k;
                    let var = views.iter().map(|d| (d[j].wide() - mean).powi(2)).sum::<f64>() / k;
                    // Negated: the largest variances first in an ascending, index-stable order.
                    *v = T::of(-var);
                }
            }
            let keys = variance.typed::<T>();
            let nnz = keys.iter().filter(|v| v.wide() != 0.0).count();
            let keep = (self.select_topk * nnz as f64).floor() as usize;
            let upper = if keep < n {
                let mut work = cx.alloc("merge", n * std::mem::size_of::<T>())?;
                Some(kth_key(keys, work.typed_mut::<T>(), keep))
            } else {
                None
            };
            for d in &mut deltas {
                for (i, (x, key)) in d.typed_mut::<T>().iter_mut().zip(keys).enumerate() {
                    if upper.is_some_and(|u| !key_before(key.wide(), i, u)) {
                        *x = T::of(0.0);
                    }
                }
            }
        }
        cx.check()?;
        let views: Vec<&[T]> = deltas.iter().map(|d| d.typed::<T>()).collect();
        let energy: Vec<f64> = views
            .iter()
            .map(|d| d.iter().map(|x| x.wide() * x.wide()).sum::<f64>() / n.max(1) as f64)
            .collect();
        let total: f64 = energy.iter().sum();
        // MergeKit's sce_weight: equal weights when the energies sum below 1e-6, else each
        // over the sum clamped to at least 1e-6.
        let weights: Vec<f64> = if total.abs() < 1e-6 {
            vec![1.0 / k; views.len()]
        } else {
            energy.iter().map(|e| e / total.max(1e-6)).collect()
        };
        for (j, b) in base.typed_mut::<T>().iter_mut().enumerate() {
            let majority = if views.iter().map(|d| d[j].wide()).sum::<f64>() >= 0.0 {
                1.0
            } else {
                -1.0
            };
            let (mut mixed, mut divisor) = (0.0, 0.0);
            for (d, w) in views.iter().zip(&weights) {
                let x = d[j].wide();
                if sign(x) == majority {
                    mixed += x * w;
                    divisor += w;
                }
            }
            // MergeKit clamps the divisor to at least 1e-6.
            divisor = divisor.max(1e-6);
            *b = T::of(b.wide() + mixed / divisor);
        }
        Ok(base)
    }

    /// Arcee Fusion (MergeKit merge_methods/arcee_fusion.py): importance
    /// `|m − b| · KL(softmax(m) ‖ softmax(b))` per row of the last dimension (softmaxes plus
    /// 1e-8), the threshold `median + 1.5·(q₃ − q₁)` of the importances (quantile q the sorted
    /// value at `⌊q·(n − 1)⌋`, over every entry: MergeKit samples a million entries of larger
    /// tensors at random), and the model's entries where the importance reaches it, the base's
    /// elsewhere.
    fn arcee_fusion<T: Work>(&self, cx: &mut ReadContext) -> Result<Scratch, ValueError> {
        let mut base = self.read_input::<T>(0, cx)?;
        let model = self.read_input::<T>(1, cx)?;
        let n = self.inputs[0].numel();
        if n == 0 {
            return Ok(base);
        }
        let shape = &self.inputs[0].shape;
        let len = shape.last().copied().unwrap_or(1).max(1);
        let mut importance = cx.alloc("merge", n * std::mem::size_of::<T>())?;
        {
            let (b, m) = (base.typed::<T>(), model.typed::<T>());
            let imp = importance.typed_mut::<T>();
            for r in 0..n / len {
                let span = r * len..(r + 1) * len;
                let softmax = |v: &[T]| {
                    let max = v.iter().map(|x| x.wide()).fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = v.iter().map(|x| (x.wide() - max).exp()).sum();
                    move |x: f64| (x - max).exp() / sum + 1e-8
                };
                let (p, q) = (softmax(&m[span.clone()]), softmax(&b[span.clone()]));
                let kl = T::of(
                    m[span.clone()]
                        .iter()
                        .zip(&b[span.clone()])
                        .map(|(x, y)| {
                            let (px, qy) = (p(x.wide()), q(y.wide()));
                            px * (px / qy).ln()
                        })
                        .sum::<f64>(),
                )
                .wide();
                for j in span {
                    let diff = T::of((m[j].wide() - b[j].wide()).abs()).wide();
                    imp[j] = T::of(diff * kl);
                }
            }
        }
        let keys = importance.typed::<T>();
        let mut work = cx.alloc("merge", n * std::mem::size_of::<T>())?;
        let quantile = |q: f64, work: &mut [T]| kth_key(keys, work, (q * (n - 1) as f64).floor() as usize).0;
        let w = work.typed_mut::<T>();
        let (q1, median, q3) = (quantile(0.25, w), quantile(0.5, w), quantile(0.75, w));
        // In the work type, as MergeKit computes it in the tensors' dtype.
        let spread = T::of(1.5 * T::of(q3 - q1).wide()).wide();
        let threshold = T::of(median + spread).wide();
        let m = model.typed::<T>();
        for (j, b) in base.typed_mut::<T>().iter_mut().enumerate() {
            if keys[j].wide() >= threshold {
                *b = m[j];
            }
        }
        Ok(base)
    }
}

/// `torch.sign`: −1, 0 or 1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The key at position `pos` of `keys` sorted ascending, ties broken by index (a stable
/// sort): `(value, index)`. `work` is a scratch copy of the keys' length.
fn kth_key<T: Work>(keys: &[T], work: &mut [T], pos: usize) -> (f64, usize) {
    work.copy_from_slice(keys);
    let (_, value, _) = work.select_nth_unstable_by(pos, |a, b| a.wide().total_cmp(&b.wide()));
    let value = value.wide();
    let less = keys.iter().filter(|k| k.wide().total_cmp(&value).is_lt()).count();
    let nth_equal = pos - less;
    let index = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.wide().total_cmp(&value).is_eq())
        .nth(nth_equal)
        .map_or(0, |(i, _)| i);
    (value, index)
}

/// Whether `(value, index)` sorts before `(kv, ki)`.
fn key_before(value: f64, index: usize, (kv, ki): (f64, usize)) -> bool {
    value.total_cmp(&kv).then(index.cmp(&ki)).is_lt()
}

/// DELLA's pruning of one delta (MergeKit sparsify.py `della_magprune`), in place.
fn ranked_random<T: Work>(
    delta: &mut [T],
    shape: &[usize],
    p: &Resolved,
    seed: u64,
    rescale: bool,
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    let n = delta.len();
    if n == 0 {
        return Ok(());
    }
    let before = if rescale {
        delta.iter().map(|x| x.wide().abs()).sum::<f64>()
    } else {
        0.0
    };
    if p.density <= 0.0 {
        delta.iter_mut().for_each(|d| *d = T::of(0.0));
        return Ok(());
    }
    // Rows: the first dimension (a 1-D or scalar tensor is one row); ranks 1..cols of
    // |δ| within a row (ties by index), normalised to [0, 1], give keep probabilities
    // `density − ε + 2ε·rank_norm`.
    let rows = if shape.len() >= 2 { shape[0].max(1) } else { 1 };
    let cols = n / rows;
    let mut order: Vec<usize> = Vec::new();
    for r in 0..rows {
        cx.check()?;
        let row = &mut delta[r * cols..(r + 1) * cols];
        order.clear();
        order.extend(0..cols);
        order.sort_by(|&a, &b| row[a].wide().abs().total_cmp(&row[b].wide().abs()).then(a.cmp(&b)));
        for (rank, &c) in order.iter().enumerate() {
            let norm = if cols > 1 { rank as f64 / (cols - 1) as f64 } else { 0.0 };
            let prob = (p.density - p.epsilon) + norm * 2.0 * p.epsilon;
            let keep = uniform(seed, (r * cols + c) as u64) < prob;
            if !keep {
                row[c] = T::of(0.0);
            }
        }
    }
    // As DARE: back to the delta's L1 norm (MergeKit), not divided by each probability.
    if rescale {
        rescale_l1(delta, before);
    }
    Ok(())
}

/// Scales the kept entries back to the delta's L1 norm before pruning (MergeKit's rescaling;
/// left alone when either norm is below 1e-7).
fn rescale_l1<T: Work>(delta: &mut [T], before: f64) {
    let after: f64 = delta.iter().map(|x| x.wide().abs()).sum();
    if before < 1e-7 || after < 1e-7 {
        return;
    }
    let factor = before / after;
    for d in delta.iter_mut() {
        *d = T::of(d.wide() * factor);
    }
}

impl LazyOp for MergeOp {
    fn inputs(&self) -> Vec<&Tensor> {
        self.inputs.iter().collect()
    }

    fn name(&self) -> &'static str {
        "merge"
    }

    fn release(&self) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.figures.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        // Once per step: its largest result and workspace. A tensor is computed on its first
        // read, when the writer reaches it, and released once written, so the step holds about
        // one result and one computation per writing thread at a time, not the merged model.
        // (Results an assertion reads before the write are kept until then: not counted.)
        let mut total = 0usize;
        if seen.insert(Arc::as_ptr(&self.largest) as usize) {
            total = self
                .largest
                .load(Ordering::Relaxed)
                .saturating_add(self.workspace.load(Ordering::Relaxed));
        }
        for input in &self.inputs {
            total = total.saturating_add(input.materialized(seen));
        }
        total
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        let first = seen.insert(self as *const Self as usize);
        if !streamed::streams(self.method) {
            // Computed once and kept: the inputs are read once.
            if !first {
                return 0;
            }
            return self
                .inputs
                .iter()
                .fold(0u64, |acc, t| acc.saturating_add(t.bytes_to_read(seen)));
        }
        // Each reader reads every input's chunks; the figures' passes (found once) read the
        // base and the pruned models again.
        let chunks = self
            .inputs
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.bytes_to_read(seen)));
        if !first {
            return chunks;
        }
        // The task-arithmetic family: the base first, then the models.
        let Method::TaskArithmetic { sparsify: Some(s), .. } = self.method else {
            return chunks;
        };
        let pruned: Vec<usize> = (0..self.params.len())
            .filter(|&i| self.params[i].density < 1.0)
            .collect();
        if pruned.is_empty() {
            return chunks;
        }
        let again = |i: usize| self.inputs[i].bytes_to_read(&mut HashSet::new());
        let pass = pruned.iter().fold(again(0), |acc, &i| acc.saturating_add(again(i + 1)));
        let n = self.inputs[0].numel().max(1);
        let mut figures = if self.rescale { pass } else { 0 };
        if matches!(s, Sparsify::Magnitude | Sparsify::Outliers) {
            // Models with a bound to find (a mask keeping nothing or everything has none): the
            // sample, then (unless it was the whole tensor) the bracket's pass. A bracket that
            // misses, or a bound on copies of a bracket end (a block read), adds reads no
            // estimate foresees.
            let bounded: Vec<usize> = pruned
                .iter()
                .copied()
                .filter(|&i| streamed::has_bound(s, &self.params[i], n))
                .collect();
            if !bounded.is_empty() {
                let pass = bounded
                    .iter()
                    .fold(again(0), |acc, &i| acc.saturating_add(again(i + 1)));
                let (runs, run) = streamed::sample_runs(n);
                let sampled = (u128::from(pass) * (runs * run) as u128 / n as u128) as u64;
                figures = figures.saturating_add(sampled);
                if runs > 1 || run < n {
                    figures = figures.saturating_add(pass);
                }
            }
        }
        chunks.saturating_add(figures)
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        if out.is_empty() {
            return Ok(());
        }
        if streamed::streams(self.method) {
            let figures = self.figures_once(cx)?;
            return if self.wide() == 8 {
                self.read_streamed::<f64>(&figures, dtype, start, out, cx)
            } else {
                self.read_streamed::<f32>(&figures, dtype, start, out, cx)
            };
        }
        let size = dtype.size().ok_or(ValueError::NoByteSize { op: "merge", dtype })?;
        let result = self.result(dtype, cx)?;
        result.read_into(start * size, out).map_err(|e| ValueError::Compute {
            op: "merge",
            reason: format!("the merged tensor could not be read: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::test_support::context;

    fn parse_payload(payload: Json) -> Result<Box<dyn Transform>, PlanError> {
        let location = Location::root().key("merge");
        (MERGE.parse)(&payload, &context(&MERGE, &location))
    }

    fn error(payload: Json) -> String {
        parse_payload(payload).unwrap_err().to_string()
    }

    #[test]
    fn parameters_parse_as_numbers_gradients_and_filters() {
        let at = Location::root();
        assert_eq!(Param::parse(&serde_json::json!(0.5), &at).unwrap(), Param::Number(0.5));
        let g = Param::parse(&serde_json::json!([0.0, 1.0, 0.5]), &at).unwrap();
        assert_eq!(g, Param::Gradient(vec![0.0, 1.0, 0.5]));
        assert_eq!(g.at("x", 0.0), Some(0.0));
        assert_eq!(g.at("x", 0.25), Some(0.5));
        assert_eq!(g.at("x", 0.5), Some(1.0));
        assert_eq!(g.at("x", 1.0), Some(0.5));
        let f = Param::parse(
            &serde_json::json!([{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.7}]),
            &at,
        )
        .unwrap();
        assert_eq!(f.at("model.layers.0.self_attn.q_proj.weight", 0.5), Some(0.5));
        assert_eq!(f.at("model.layers.0.mlp.up_proj.weight", 0.5), Some(0.3));
        assert_eq!(f.at("lm_head.weight", 0.5), Some(0.7));
        let only = Param::parse(&serde_json::json!([{"filter": "mlp", "value": 1}]), &at).unwrap();
        assert_eq!(only.at("lm_head.weight", 0.0), None);
        for bad in [
            serde_json::json!("x"),
            serde_json::json!([]),
            serde_json::json!([1, "a"]),
            serde_json::json!([{"filter": "a"}]),
            serde_json::json!([{"filter": "a", "value": 1, "x": 2}]),
            serde_json::json!([{"value": [{"value": 1}]}]),
        ] {
            assert!(Param::parse(&bad, &at).is_err(), "{bad}");
        }
    }

    #[test]
    fn layers_are_renumbered_in_their_segment() {
        assert_eq!(
            renumbered("model.layers.12.mlp.up_proj.weight", 3),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            renumbered("transformer.h.0.attn.weight", 10),
            "transformer.h.10.attn.weight"
        );
        assert_eq!(renumbered("model.norm.weight", 1), "model.norm.weight");
    }

    #[test]
    fn layer_indices_come_from_layer_segments() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("transformer.h.3.attn.c_attn.weight"), Some(3));
        assert_eq!(layer_index("blocks.0.w"), Some(0));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(layer_index("model.layers.x.w"), None);
    }

    #[test]
    fn masks_are_deterministic_per_seed_alias_and_name() {
        let a = mask_seed(0, "ft1", "w");
        assert_eq!(a, mask_seed(0, "ft1", "w"));
        assert_ne!(a, mask_seed(1, "ft1", "w"));
        assert_ne!(a, mask_seed(0, "ft2", "w"));
        assert_ne!(a, mask_seed(0, "ft1", "v"));
        // FNV-1a of "0\0a\0b" and SplitMix64's first output for it, computed independently.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in *b"0\0a\0b" {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        assert_eq!(mask_seed(0, "a", "b"), h);
        let draws: Vec<f64> = (0..1000).map(|i| uniform(a, i)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        // Order-independent: drawing backwards gives the same values.
        let backwards: Vec<f64> = (0..1000).rev().map(|i| uniform(a, i)).collect();
        assert!(draws.iter().eq(backwards.iter().rev()));
    }

    #[test]
    fn kth_key_breaks_ties_by_index() {
        let keys = [2.0f32, 1.0, 2.0, 0.0, 2.0];
        let mut work = [0.0f32; 5];
        assert_eq!(kth_key(&keys, &mut work, 0), (0.0, 3));
        assert_eq!(kth_key(&keys, &mut work, 2), (2.0, 0));
        assert_eq!(kth_key(&keys, &mut work, 3), (2.0, 2));
        assert_eq!(kth_key(&keys, &mut work, 4), (2.0, 4));
    }

    #[test]
    fn bad_payloads_are_plan_errors() {
        let e = error(serde_json::json!({"method": "tie", "base": "b", "models": ["x"], "to": "m"}));
        assert!(
            e.contains("unknown merge method `tie`") && e.contains("did you mean `ties`"),
            "{e}"
        );
        let e = error(serde_json::json!({"method": "passthrough", "models": ["x", "y"], "to": "m"}));
        assert!(e.contains("not `models`"), "{e}");
        let e = error(serde_json::json!({"method": "passthrough", "to": "m"}));
        assert!(e.contains("slices"), "{e}");
        for bad in [
            serde_json::json!([]),
            serde_json::json!([{"alias": "a", "layers": [3, 3]}]),
            serde_json::json!([{"alias": "a", "layers": [0]}]),
            serde_json::json!([{"alias": "a", "layers": [-1, 2]}]),
            serde_json::json!([{"alias": "a"}]),
            serde_json::json!([{"alias": "a", "layers": [0, 2], "model": "b"}]),
            serde_json::json!(["a"]),
        ] {
            let e = error(serde_json::json!({"method": "passthrough", "slices": bad, "to": "m"}));
            assert!(e.contains("slices"), "{bad}: {e}");
        }
        assert!(parse_payload(serde_json::json!({
            "method": "passthrough", "slices": [{"alias": "a", "layers": [0, 2]}, {"alias": "b", "layers": [1, 3]}], "to": "m"
        }))
        .is_ok());
        let e = error(serde_json::json!({"method": "ties", "base": "b", "slices": [], "models": ["x"], "to": "m"}));
        assert!(e.contains("`slices` is for passthrough"), "{e}");
        let e = error(serde_json::json!({"method": "nuslerp", "models": ["x", "y", "z"], "weight": 1, "to": "m"}));
        assert!(e.contains("exactly 2"), "{e}");
        let e = error(serde_json::json!({"method": "karcher", "base": "b", "models": ["x", "y"], "to": "m"}));
        assert!(e.contains("takes no base"), "{e}");
        let e = error(serde_json::json!({"method": "sce", "base": "b", "models": ["x"], "select_topk": -1, "to": "m"}));
        assert!(e.contains("select_topk"), "{e}");
        let e = error(serde_json::json!({"method": "ties", "models": ["x"], "to": "m"}));
        assert!(e.contains("base"), "{e}");
        let e = error(serde_json::json!({"method": "slerp", "base": "b", "models": ["x", "y"], "to": "m", "t": 0.5}));
        assert!(e.contains("exactly 1"), "{e}");
        let e = error(serde_json::json!({"method": "slerp", "base": "b", "models": ["x"], "to": "m"}));
        assert!(e.contains("`t`"), "{e}");
        let e = error(serde_json::json!({"method": "model_stock", "base": "b", "models": ["x"], "to": "m"}));
        assert!(e.contains("at least 2"), "{e}");
        let e = error(serde_json::json!({"method": "linear", "models": {"x": {"wieght": 1}}, "to": "m"}));
        assert!(e.contains("wieght") && e.contains("weight"), "{e}");
        let e = error(serde_json::json!({"method": "linear", "models": "x", "to": "m"}));
        assert!(e.contains("expected a mapping"), "{e}");
        let e = error(serde_json::json!({"method": "linear", "models": ["x", "x"], "to": "m"}));
        assert!(e.contains("twice"), "{e}");
        let e = error(serde_json::json!({"method": "linear", "base": "b", "models": ["x"], "to": "m"}));
        assert!(e.contains("takes no base"), "{e}");
        let e = error(serde_json::json!({"method": "linear", "models": ["x"], "to": "m", "seed": -1}));
        assert!(e.contains("seed"), "{e}");
        assert!(parse_payload(serde_json::json!({
            "method": "ties", "base": "b", "models": {"x": {"weight": 0.5, "density": [0.2, 0.8]}, "y": null},
            "density": 0.5, "weight": 1, "to": "m"
        }))
        .is_ok());
    }
}
