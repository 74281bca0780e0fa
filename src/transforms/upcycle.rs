//! `upcycle_moe`: a dense decoder turned into a mixture of experts in place. Each layer's MLP
//! (`gate_proj`, `up_proj`, `down_proj`) becomes N experts in the target layout's names (Mixtral,
//! Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo) plus a router, and [`upcycled_config`] rewrites the
//! alias's `config.json` to match.
//!
//! Experts are the dense tensors themselves (or another alias's, `experts_from`), shared lazily:
//! nothing is read or copied here, the writer streams each expert from the input like any copy.
//! Optional noise is an element-wise function over that lazy value, drawn from the counter-based
//! generator of `kernels::random` keyed by the seed and the expert tensor's name, so the bytes do
//! not depend on threads or chunking. Routers are small (`experts × hidden`): zeros, seeded
//! normal values, given values, another alias's tensors, or MergeKit's "cheap embed" (the
//! normalized mean of input-embedding rows of given token ids), computed when written.
//! Where the layouts' forward passes differ is documented in docs/semantics.md.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::{count_noun, Context, Flow, ParseContext, StepError, Transform, TransformSpec};
use crate::dtype::DType;
use crate::kernels;
use crate::kernels::random::{normal, tensor_seed};
use crate::plan::payload::{compact, Field, FieldKind, Form};
use crate::plan::{Location, PlanError};
use crate::references::RegexSelector;
use crate::state::State;
use crate::value::{ElementFn, LazyOp, ReadContext, Tensor, ValueError};

const FIELDS: &[Field] = &[
    Field::optional(
        "alias",
        FieldKind::Text,
        Some("the default alias"),
        "the dense model, upcycled in place (attention, norms and embeddings are kept)",
    ),
    Field::optional(
        "experts",
        FieldKind::Number,
        Some("the number of experts_from aliases"),
        "number of experts (≥ 1)",
    ),
    Field::optional(
        "experts_per_token",
        FieldKind::Number,
        Some("2 (1 with one expert)"),
        "experts each token is routed to (top-k, 1 ≤ k ≤ experts)",
    ),
    Field::optional(
        "layout",
        FieldKind::Text,
        Some("from config.json, else the tensor names"),
        "the MoE layout written: mixtral, qwen2_moe, qwen3_moe, olmoe or flex_olmo",
    ),
    Field::optional(
        "router",
        FieldKind::Router,
        Some("zeros"),
        "router init: zeros, random, {embed: [[token ids], ...]} (one list per expert), {values: [[...], ...]} (experts × hidden) or {alias: a} (a's tensors of the router names)",
    ),
    Field::optional(
        "router_std",
        FieldKind::Number,
        Some("0.02"),
        "standard deviation of a random router",
    ),
    Field::optional(
        "noise",
        FieldKind::Number,
        Some("0"),
        "relative noise on the experts: each weight w becomes w·(1 + noise·z), z standard normal, seeded per expert tensor",
    ),
    Field::optional(
        "seed",
        FieldKind::Number,
        Some("0"),
        "seed of the noise and of a random router, mixed with each tensor's name",
    ),
    Field::optional(
        "experts_from",
        FieldKind::Aliases,
        None,
        "aliases the experts are taken from, one per expert: each must hold the dense MLP under the same names and shapes",
    ),
    Field::optional(
        "mlp",
        FieldKind::Patterns,
        Some("*.N.mlp.{gate,up,down}_proj.weight"),
        "the dense MLP's names when not the usual ones: {gate: REGEX, up: REGEX, down: REGEX}, each capturing the layer index (group `layer`, else group 1)",
    ),
];

/// `upcycle_moe`.
pub const UPCYCLE_MOE: TransformSpec = TransformSpec {
    name: "upcycle_moe",
    summary: "turn a dense model's MLPs into a mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE, FlexOlmo layouts)",
    form: Form::Plain,
    fields: FIELDS,
    parse,
};

/// A mixture-of-experts layout transformers knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `MixtralForCausalLM`: `block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`
    /// (from Llama, Mistral).
    Mixtral,
    /// `Qwen2MoeForCausalLM`: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` and an empty
    /// shared expert (from Qwen2).
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` (from Qwen3).
    Qwen3Moe,
    /// `OlmoeForCausalLM`: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` (from OLMo).
    Olmoe,
    /// `FlexOlmoForCausalLM`: OLMo2's blocks (norms after attention and MLP) with OLMoE's names
    /// (from OLMo2).
    FlexOlmo,
}

impl Layout {
    const ALL: [Layout; 5] = [
        Layout::Mixtral,
        Layout::Qwen2Moe,
        Layout::Qwen3Moe,
        Layout::Olmoe,
        Layout::FlexOlmo,
    ];

    /// The `layout:` name, which is also the config's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Mixtral => "mixtral",
            Layout::Qwen2Moe => "qwen2_moe",
            Layout::Qwen3Moe => "qwen3_moe",
            Layout::Olmoe => "olmoe",
            Layout::FlexOlmo => "flex_olmo",
        }
    }

    /// The layout of a `layout:` name.
    pub fn parse(name: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name)
    }

    fn architecture(self) -> &'static str {
        match self {
            Layout::Mixtral => "MixtralForCausalLM",
            Layout::Qwen2Moe => "Qwen2MoeForCausalLM",
            Layout::Qwen3Moe => "Qwen3MoeForCausalLM",
            Layout::Olmoe => "OlmoeForCausalLM",
            Layout::FlexOlmo => "FlexOlmoForCausalLM",
        }
    }

    /// The MoE layout of a dense `model_type`.
    fn of_dense(model_type: &str) -> Option<Layout> {
        match model_type {
            "llama" | "mistral" => Some(Layout::Mixtral),
            "qwen2" => Some(Layout::Qwen2Moe),
            "qwen3" => Some(Layout::Qwen3Moe),
            "olmo" => Some(Layout::Olmoe),
            "olmo2" => Some(Layout::FlexOlmo),
            _ => None,
        }
    }

    /// The router's name after the layer prefix (`model.layers.3.`).
    fn router(self) -> &'static str {
        match self {
            Layout::Mixtral => "block_sparse_moe.gate.weight",
            _ => "mlp.gate.weight",
        }
    }

    /// Expert `e`'s names after the layer prefix: gate, up, down.
    fn expert(self, e: usize) -> [String; 3] {
        match self {
            Layout::Mixtral => ["w1", "w3", "w2"].map(|w| format!("block_sparse_moe.experts.{e}.{w}.weight")),
            _ => ["gate_proj", "up_proj", "down_proj"].map(|w| format!("mlp.experts.{e}.{w}.weight")),
        }
    }
}

/// The model types the config of an upcycled model may not have (already mixtures of experts).
const MOE_TYPES: &[&str] = &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo"];

/// Why a dense `config.json` cannot be rewritten for a layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The document is not a JSON object.
    #[error("config.json is not a JSON object")]
    NotObject,
    /// A key's value rules the layout out, or the expert counts are impossible.
    #[error("config.json `{key}`: {reason}")]
    Key {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn config_error(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The config of the mixture of experts `upcycle_moe` makes from a dense model's `config.json`:
/// `architectures` and `model_type` of `layout`, the expert counts under the layout's keys, the
/// expert size (the dense `intermediate_size`), and top-k weights renormalized
/// (`norm_topk_prob: true`, which Mixtral always does) so identical experts keep the dense
/// outputs exactly. Qwen2-MoE gets a shared expert of size 0 (no shared expert). Other keys are
/// kept.
pub fn upcycled_config(
    dense: &Json,
    layout: Layout,
    experts: usize,
    experts_per_token: usize,
) -> Result<Json, ConfigError> {
    let Json::Object(dense) = dense else {
        return Err(ConfigError::NotObject);
    };
    if experts == 0 {
        return Err(config_error("num_experts", "at least one expert is needed"));
    }
    if experts_per_token == 0 || experts_per_token > experts {
        return Err(config_error(
            "num_experts_per_tok",
            format!("{experts_per_token} experts per token is not between 1 and the {experts} experts"),
        ));
    }
    if let Some(Json::String(t)) = dense.get("model_type") {
        if MOE_TYPES.contains(&t.as_str()) {
            return Err(config_error(
                "model_type",
                format!("`{t}` is already a mixture of experts"),
            ));
        }
    }
    if dense.get("mlp_bias") == Some(&Json::Bool(true)) {
        return Err(config_error("mlp_bias", "the MoE layouts' experts have no biases"));
    }
    if layout == Layout::Mixtral && dense.get("attention_bias") == Some(&Json::Bool(true)) {
        return Err(config_error("attention_bias", "Mixtral's attention has no biases"));
    }
    // Qwen2's q/k/v biases are implicit (no config key); Mixtral would drop them silently.
    if layout == Layout::Mixtral && dense.get("model_type").and_then(Json::as_str) == Some("qwen2") {
        return Err(config_error(
            "model_type",
            "Qwen2's attention has q/k/v biases Mixtral has no place for; use layout: qwen2_moe",
        ));
    }
    let intermediate = match dense.get("intermediate_size") {
        Some(Json::Number(n)) if n.as_u64().is_some() => n.clone(),
        Some(other) => {
            return Err(config_error(
                "intermediate_size",
                format!("expected a whole number, got `{}`", compact(other)),
            ))
        }
        None => {
            return Err(config_error(
                "intermediate_size",
                "missing: the experts' size comes from it",
            ))
        }
    };
    let mut out = dense.clone();
    out.insert("architectures".into(), json!([layout.architecture()]));
    out.insert("model_type".into(), json!(layout.name()));
    out.insert("num_experts_per_tok".into(), json!(experts_per_token));
    match layout {
        Layout::Mixtral => {
            out.remove("num_experts");
            out.insert("num_local_experts".into(), json!(experts));
        }
        Layout::Qwen2Moe | Layout::Qwen3Moe => {
            out.remove("num_local_experts");
            out.insert("num_experts".into(), json!(experts));
            out.insert("moe_intermediate_size".into(), Json::Number(intermediate));
            out.insert("norm_topk_prob".into(), json!(true));
            out.insert("decoder_sparse_step".into(), json!(1));
            out.insert("mlp_only_layers".into(), json!([]));
            if layout == Layout::Qwen2Moe {
                out.insert("shared_expert_intermediate_size".into(), json!(0));
                // Qwen2's q, k and v projections always have biases; Qwen2-MoE reads this key.
                out.insert("qkv_bias".into(), json!(true));
            }
        }
        Layout::Olmoe | Layout::FlexOlmo => {
            out.remove("num_local_experts");
            out.insert("num_experts".into(), json!(experts));
            out.insert("norm_topk_prob".into(), json!(true));
        }
    }
    Ok(Json::Object(out))
}

/// How the routers start.
#[derive(Debug, Clone, PartialEq)]
enum Router {
    /// All zeros: every expert equally likely.
    Zeros,
    /// Normal values of this standard deviation, seeded per router tensor.
    Random(f64),
    /// Per expert, the L2-normalized mean of these input-embedding rows (every layer alike).
    Embed(Vec<Vec<u64>>),
    /// The same `experts × hidden` values for every layer (row-major).
    Values { rows: usize, cols: usize, values: Vec<f64> },
    /// The tensors of the router names in another alias.
    Alias(String),
}

#[derive(Debug, Clone)]
struct MlpPatterns {
    gate: RegexSelector,
    up: RegexSelector,
    down: RegexSelector,
}

#[derive(Debug)]
struct UpcycleMoe {
    alias: Option<String>,
    experts: usize,
    experts_per_token: usize,
    layout: Option<Layout>,
    router: Router,
    noise: f64,
    seed: u64,
    experts_from: Option<Vec<String>>,
    mlp: Option<MlpPatterns>,
    location: Location,
}

fn parse(value: &Json, cx: &ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    let p = cx.payload(value)?;
    let alias = p.text("alias")?.map(str::to_owned);
    let experts_from = match p.get("experts_from") {
        None => None,
        Some(Json::Array(items)) if !items.is_empty() => {
            let mut aliases = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Json::String(s) => aliases.push(s.clone()),
                    other => {
                        return Err(PlanError::invalid(
                            &p.at("experts_from").index(i),
                            format!("expected an alias, got `{}`", compact(other)),
                        ))
                    }
                }
            }
            Some(aliases)
        }
        Some(other) => {
            return Err(PlanError::invalid(
                &p.at("experts_from"),
                format!("expected a non-empty list of aliases, got `{}`", compact(other)),
            ))
        }
    };
    let experts = match (p.count("experts")?, &experts_from) {
        (Some(0), _) => {
            return Err(PlanError::invalid(
                &p.at("experts"),
                "at least one expert is needed, got 0",
            ))
        }
        (Some(n), Some(from)) if n != from.len() => {
            return Err(PlanError::invalid(
                &p.at("experts"),
                format!("{n} experts but experts_from lists {} aliases", from.len()),
            ))
        }
        (Some(n), _) => n,
        (None, Some(from)) => from.len(),
        (None, None) => {
            return Err(PlanError::MissingKey {
                location: p.location().clone(),
                key: "experts".into(),
            })
        }
    };
    let experts_per_token = p.count("experts_per_token")?.unwrap_or(experts.min(2));
    if experts_per_token == 0 || experts_per_token > experts {
        return Err(PlanError::invalid(
            &p.at("experts_per_token"),
            format!("{experts_per_token} experts per token: it must be between 1 and the {experts} experts"),
        ));
    }
    let layout = match p.text("layout")? {
        None => None,
        Some(name) => Some(Layout::parse(name).ok_or_else(|| {
            PlanError::invalid(
                &p.at("layout"),
                format!(
                    "unknown layout `{name}`; expected one of {}",
                    Layout::ALL.map(|l| l.name()).join(", ")
                ),
            )
        })?),
    };
    let router_std = match p.number("router_std")? {
        None => 0.02,
        Some(s) if s.is_finite() && s >= 0.0 => s,
        Some(s) => {
            return Err(PlanError::invalid(
                &p.at("router_std"),
                format!("expected a number ≥ 0, got {s}"),
            ))
        }
    };
    let router = parse_router(p.get("router"), experts, router_std, &p.at("router"))?;
    if p.get("router_std").is_some() && router != Router::Random(router_std) {
        return Err(PlanError::invalid(
            &p.at("router_std"),
            "only a random router takes router_std",
        ));
    }
    let noise = match p.number("noise")? {
        None => 0.0,
        Some(n) if n.is_finite() && n >= 0.0 => n,
        Some(n) => {
            return Err(PlanError::invalid(
                &p.at("noise"),
                format!("expected a number ≥ 0, got {n}"),
            ))
        }
    };
    let seed = match p.get("seed") {
        None => 0,
        Some(Json::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or_default(),
        Some(other) => {
            return Err(PlanError::invalid(
                &p.at("seed"),
                format!("expected a whole number ≥ 0, got `{}`", compact(other)),
            ))
        }
    };
    let mlp = match p.get("mlp") {
        None => None,
        Some(v) => Some(parse_mlp(v, &p.at("mlp"))?),
    };
    Ok(Box::new(UpcycleMoe {
        alias,
        experts,
        experts_per_token,
        layout,
        router,
        noise,
        seed,
        experts_from,
        mlp,
        location: cx.location.clone(),
    }))
}

fn parse_router(value: Option<&Json>, experts: usize, std: f64, at: &Location) -> Result<Router, PlanError> {
    let expected = "expected zeros, random, {embed: [[token ids], ...]}, {values: [[...], ...]} or {alias: a}";
    let map = match value {
        None => return Ok(Router::Zeros),
        Some(Json::String(s)) if s == "zeros" => return Ok(Router::Zeros),
        Some(Json::String(s)) if s == "random" => return Ok(Router::Random(std)),
        Some(Json::Object(map)) if map.len() == 1 => map,
        Some(other) => return Err(PlanError::invalid(at, format!("{expected}, got `{}`", compact(other)))),
    };
    let (key, v) = map.iter().next().expect("one entry");
    let at = at.key(key);
    match key.as_str() {
        "embed" => {
            let Json::Array(lists) = v else {
                return Err(PlanError::invalid(&at, "expected one list of token ids per expert"));
            };
            if lists.len() != experts {
                return Err(PlanError::invalid(
                    &at,
                    format!("{} lists of token ids for {experts} experts", lists.len()),
                ));
            }
            let mut ids = Vec::new();
            for (e, list) in lists.iter().enumerate() {
                let items = match list {
                    Json::Array(items) if !items.is_empty() => items,
                    other => {
                        return Err(PlanError::invalid(
                            &at.index(e),
                            format!("expected a non-empty list of token ids, got `{}`", compact(other)),
                        ))
                    }
                };
                let mut row = Vec::new();
                for item in items {
                    match item.as_u64() {
                        Some(id) => row.push(id),
                        None => {
                            return Err(PlanError::invalid(
                                &at.index(e),
                                format!("expected token ids (whole numbers ≥ 0), got `{}`", compact(item)),
                            ))
                        }
                    }
                }
                ids.push(row);
            }
            Ok(Router::Embed(ids))
        }
        "values" => {
            let (shape, values) = super::fill::nested(v, &at)?;
            match shape.as_slice() {
                [rows, cols] if *rows == experts && *cols > 0 => Ok(Router::Values {
                    rows: *rows,
                    cols: *cols,
                    values,
                }),
                _ => Err(PlanError::invalid(
                    &at,
                    format!(
                        "expected {experts} rows (one per expert) of hidden-size values, got shape {}",
                        super::fmt_shape(&shape)
                    ),
                )),
            }
        }
        "alias" => match v {
            Json::String(a) => Ok(Router::Alias(a.clone())),
            other => Err(PlanError::invalid(
                &at,
                format!("expected an alias, got `{}`", compact(other)),
            )),
        },
        _ => Err(PlanError::invalid(&at, format!("unknown router `{key}`; {expected}"))),
    }
}

fn parse_mlp(value: &Json, at: &Location) -> Result<MlpPatterns, PlanError> {
    let Json::Object(map) = value else {
        return Err(PlanError::invalid(
            at,
            format!(
                "expected {{gate: REGEX, up: REGEX, down: REGEX}}, got `{}`",
                compact(value)
            ),
        ));
    };
    for key in map.keys() {
        if !["gate", "up", "down"].contains(&key.as_str()) {
            return Err(PlanError::UnknownKey {
                location: at.clone(),
                key: key.clone(),
                suggestion: crate::plan::error::suggest(key, ["gate", "up", "down"]),
                expected: vec!["gate".into(), "up".into(), "down".into()],
            });
        }
    }
    let one = |key: &str| -> Result<RegexSelector, PlanError> {
        let Some(Json::String(text)) = map.get(key) else {
            return Err(PlanError::MissingKey {
                location: at.clone(),
                key: key.to_owned(),
            });
        };
        let selector = RegexSelector::new(text).map_err(|source| PlanError::Reference {
            location: at.key(key),
            source,
        })?;
        if crate::references::Selector::Regex(selector.clone())
            .capture_info()
            .groups
            == 0
        {
            return Err(PlanError::invalid(
                &at.key(key),
                format!("`{text}` must capture the layer index (a group `(?P<layer>\\d+)` or group 1)"),
            ));
        }
        Ok(selector)
    };
    Ok(MlpPatterns {
        gate: one("gate")?,
        up: one("up")?,
        down: one("down")?,
    })
}

/// One dense layer's MLP.
#[derive(Debug, Clone)]
struct DenseMlp {
    /// What the MoE names start with: the gate's name up to and including the layer index and
    /// its dot (`model.layers.3.`).
    prefix: String,
    /// gate, up and down projections' names.
    names: [String; 3],
}

/// The usual names: `<prefix><N>.mlp.{gate,up,down}_proj.weight`.
fn standard_mlps(names: &[&str]) -> BTreeMap<(String, usize), DenseMlp> {
    let set: HashSet<&str> = names.iter().copied().collect();
    let mut found = BTreeMap::new();
    for name in names {
        let Some(prefix) = name.strip_suffix("mlp.gate_proj.weight") else {
            continue;
        };
        let Some(layer) = layer_index(prefix) else { continue };
        let up = format!("{prefix}mlp.up_proj.weight");
        let down = format!("{prefix}mlp.down_proj.weight");
        if set.contains(up.as_str()) && set.contains(down.as_str()) {
            // The prefix without its layer index (`model.layers`), so layers sort numerically.
            let before = prefix
                .strip_suffix('.')
                .and_then(|p| p.rsplit_once('.'))
                .map_or("", |(b, _)| b)
                .to_owned();
            found.insert(
                (before, layer),
                DenseMlp {
                    prefix: prefix.to_owned(),
                    names: [(*name).to_owned(), up, down],
                },
            );
        }
    }
    found
}

/// The layer index a prefix such as `model.layers.12.` ends with.
fn layer_index(prefix: &str) -> Option<usize> {
    let trimmed = prefix.strip_suffix('.')?;
    let last = trimmed.rsplit('.').next()?;
    if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

/// The layer index a pattern captured, and the name's text up to its end.
fn captured_layer(selector: &RegexSelector, name: &str) -> Option<(usize, String)> {
    let caps = selector.captures(name)?;
    let text = match caps.name("layer") {
        Some(c) => c.joined(),
        None => caps.get(1)?.to_owned(),
    };
    let layer: usize = text.parse().ok()?;
    // The prefix ends where the index does: the first occurrence of `.N.` or `.N` at the end.
    let dotted = format!(".{text}.");
    let end = name
        .find(&dotted)
        .map(|i| i + dotted.len())
        .or_else(|| name.starts_with(&format!("{text}.")).then_some(text.len() + 1))?;
    Some((layer, name[..end].to_owned()))
}

fn explicit_mlps(
    patterns: &MlpPatterns,
    names: &[&str],
    at: &Location,
) -> Result<BTreeMap<(String, usize), DenseMlp>, PlanError> {
    let mut by_layer: BTreeMap<usize, [Option<String>; 3]> = BTreeMap::new();
    let mut prefixes: BTreeMap<usize, String> = BTreeMap::new();
    for name in names {
        for (k, selector) in [&patterns.gate, &patterns.up, &patterns.down].into_iter().enumerate() {
            if !selector.is_match(name) {
                continue;
            }
            let Some((layer, prefix)) = captured_layer(selector, name) else {
                return Err(PlanError::invalid(
                    &at.key(["gate", "up", "down"][k]),
                    format!("`{name}` matches but its captured layer index is not a whole number that is a segment of the name"),
                ));
            };
            let slot = &mut by_layer.entry(layer).or_default()[k];
            if let Some(other) = slot {
                return Err(PlanError::invalid(
                    &at.key(["gate", "up", "down"][k]),
                    format!("`{other}` and `{name}` are both layer {layer}'s"),
                ));
            }
            *slot = Some((*name).to_owned());
            if k == 0 {
                prefixes.insert(layer, prefix);
            }
        }
    }
    let mut found = BTreeMap::new();
    for (layer, [gate, up, down]) in by_layer {
        match (gate, up, down) {
            (Some(gate), Some(up), Some(down)) => {
                let prefix = prefixes.remove(&layer).unwrap_or_default();
                found.insert(
                    (String::new(), layer),
                    DenseMlp {
                        prefix,
                        names: [gate, up, down],
                    },
                );
            }
            (gate, up, down) => {
                let have: Vec<String> = [gate, up, down].into_iter().flatten().collect();
                return Err(PlanError::invalid(
                    at,
                    format!(
                        "layer {layer} has only {} of gate, up and down: {}",
                        have.len(),
                        have.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(found)
}

/// What the "not recognised" error lists: names that look like feed-forward weights, else the
/// first layer's names.
fn mlp_like(names: &[&str]) -> Vec<String> {
    const HINTS: [&str; 8] = ["mlp", "ffn", "feed_forward", "fc", "w1", "w2", "w3", "experts"];
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| HINTS.iter().any(|h| n.contains(h)))
        .take(12)
        .map(|n| (*n).to_owned())
        .collect();
    if out.is_empty() {
        out = names
            .iter()
            .filter(|n| n.contains(".0."))
            .take(12)
            .map(|n| (*n).to_owned())
            .collect();
    }
    if out.is_empty() {
        out = names.iter().take(12).map(|n| (*n).to_owned()).collect();
    }
    out
}

/// The dense family the names suggest when there is no config: OLMo2 has norms after its
/// sublayers, Qwen3 norms on queries and keys, Qwen2 biases on them, OLMo no norm weights.
fn layout_from_names(names: &[&str]) -> Layout {
    let any = |needle: &str| names.iter().any(|n| n.contains(needle));
    if any(".post_feedforward_layernorm.") {
        Layout::FlexOlmo
    } else if any(".self_attn.q_norm.") {
        Layout::Qwen3Moe
    } else if any(".self_attn.q_proj.bias") {
        Layout::Qwen2Moe
    } else if !any("layernorm") && !any(".norm.") {
        Layout::Olmoe
    } else {
        Layout::Mixtral
    }
}

/// The layout a dense config names, from `model_type` (else the first architecture).
fn layout_from_config(config: &Json) -> Result<Option<Layout>, String> {
    let model_type = config
        .get("model_type")
        .and_then(Json::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
            let known = [
                ("LlamaForCausalLM", "llama"),
                ("MistralForCausalLM", "mistral"),
                ("Qwen2ForCausalLM", "qwen2"),
                ("Qwen3ForCausalLM", "qwen3"),
                ("OlmoForCausalLM", "olmo"),
                ("Olmo2ForCausalLM", "olmo2"),
            ];
            known.iter().find(|(a, _)| *a == arch).map(|(_, t)| (*t).to_owned())
        });
    match model_type {
        None => Ok(None),
        Some(t) => Layout::of_dense(&t).map(Some).ok_or_else(|| {
            format!(
                "config.json's model_type `{t}` has no MoE layout here (llama, mistral, qwen2, qwen3, olmo and olmo2 do); give layout:"
            )
        }),
    }
}

/// Relative noise: `w·(1 + scale·z)`, `z` the standard normal value of the element's index in
/// the tensor's stream.
#[derive(Debug)]
struct RelativeNoise {
    seed: u64,
    scale: f64,
}

/// Elements per block of the noise: 4 KiB of f64 on the stack.
const BLOCK: usize = 512;

impl ElementFn for RelativeNoise {
    fn apply(&self, dtype: DType, index: usize, values: &mut [u8], _cx: &mut ReadContext) -> Result<(), ValueError> {
        let size = dtype.size().expect("noise is applied to byte-sized floats");
        let mut wide = [0u8; BLOCK * 8];
        for (b, block) in values.chunks_mut(BLOCK * size).enumerate() {
            let n = block.len() / size;
            let first = (index + b * BLOCK) as u64;
            kernels::convert(dtype, block, DType::F64, &mut wide[..n * 8]);
            for (j, w) in wide[..n * 8].chunks_exact_mut(8).enumerate() {
                let x = f64::from_le_bytes(w.try_into().expect("8 bytes"));
                let y = x * (1.0 + self.scale * normal(self.seed, first + j as u64));
                w.copy_from_slice(&y.to_le_bytes());
            }
            kernels::convert(DType::F64, &wide[..n * 8], dtype, block);
        }
        Ok(())
    }
}

/// Normal router values `std·z`, seeded per router tensor.
#[derive(Debug)]
struct RandomRouter {
    seed: u64,
    std: f64,
}

impl LazyOp for RandomRouter {
    fn name(&self) -> &'static str {
        "random router"
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        _cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().expect("routers are byte-sized floats");
        let mut wide = [0u8; BLOCK * 8];
        for (b, block) in out.chunks_mut(BLOCK * size).enumerate() {
            let first = (start + b * BLOCK) as u64;
            let n = block.len() / size;
            for (j, w) in wide[..n * 8].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(self.std * normal(self.seed, first + j as u64)).to_le_bytes());
            }
            kernels::convert(DType::F64, &wide[..n * 8], dtype, block);
        }
        Ok(())
    }
}

/// MergeKit's "cheap embed" gate without a tokenizer: per expert, the mean of the embedding rows
/// of its token ids, divided by its L2 norm (at least 1e-8), as MergeKit's `get_cheap_embedding`
/// does with the summed embeddings of its prompts.
#[derive(Debug)]
struct EmbedRouter {
    embed: Tensor,
    ids: Vec<Vec<u64>>,
}

impl EmbedRouter {
    fn rows(&self, cx: &mut ReadContext) -> Result<Vec<f64>, ValueError> {
        let hidden = self.embed.shape[1];
        let size = self.embed.dtype.size().expect("embeddings are byte-sized floats");
        let mut raw = vec![0u8; hidden * size];
        let mut wide = vec![0u8; hidden * 8];
        let mut out = Vec::with_capacity(self.ids.len() * hidden);
        for ids in &self.ids {
            let mut acc = vec![0f64; hidden];
            for &id in ids {
                self.embed.read(id as usize * hidden, &mut raw, cx)?;
                kernels::convert(self.embed.dtype, &raw, DType::F64, &mut wide);
                for (a, w) in acc.iter_mut().zip(wide.chunks_exact(8)) {
                    *a += f64::from_le_bytes(w.try_into().expect("8 bytes"));
                }
            }
            let n = ids.len() as f64;
            acc.iter_mut().for_each(|a| *a /= n);
            let norm = acc.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-8);
            out.extend(acc.iter().map(|a| a / norm));
        }
        Ok(out)
    }
}

impl LazyOp for EmbedRouter {
    fn name(&self) -> &'static str {
        "embedding router"
    }

    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.embed]
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().expect("routers are byte-sized floats");
        let values = self.rows(cx)?;
        let n = out.len() / size;
        let bytes: Vec<u8> = values[start..start + n].iter().flat_map(|v| v.to_le_bytes()).collect();
        kernels::convert(DType::F64, &bytes, dtype, out);
        Ok(())
    }

    fn bytes_to_read(&self, _seen: &mut HashSet<usize>) -> u64 {
        let row = (self.embed.shape[1] * self.embed.dtype.size().unwrap_or(0)) as u64;
        self.ids.iter().map(|ids| ids.len() as u64 * row).sum()
    }
}

fn f64_bytes(values: &[f64], dtype: DType) -> Vec<u8> {
    let wide: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = vec![0u8; values.len() * dtype.size().expect("routers are byte-sized floats")];
    kernels::convert(DType::F64, &wide, dtype, &mut out);
    out
}

/// The input-embedding matrix of `alias`: `model.embed_tokens.weight`, else the one name
/// ending in `embed_tokens.weight`.
fn embedding(state: &State, alias: &str, names: &[&str], at: &Location) -> Result<(String, Tensor), PlanError> {
    let candidates: Vec<&str> = if names.contains(&"model.embed_tokens.weight") {
        vec!["model.embed_tokens.weight"]
    } else {
        names
            .iter()
            .copied()
            .filter(|n| n.ends_with("embed_tokens.weight"))
            .collect()
    };
    match candidates.as_slice() {
        [one] => {
            let t = state.get(alias, one).expect("listed names exist").clone();
            Ok(((*one).to_owned(), t))
        }
        [] => Err(PlanError::invalid(
            at,
            format!("an embed router needs the input embeddings, but `{alias}` has no `*embed_tokens.weight`"),
        )),
        many => Err(PlanError::invalid(
            at,
            format!(
                "an embed router needs one input-embedding matrix; `{alias}` has {}",
                many.join(", ")
            ),
        )),
    }
}

impl UpcycleMoe {
    fn layout(&self, config: Option<&Json>, names: &[&str]) -> Result<Layout, PlanError> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        if let Some(config) = config {
            match layout_from_config(config) {
                Ok(Some(layout)) => return Ok(layout),
                Ok(None) => {}
                Err(message) => return Err(PlanError::invalid(&self.location, message)),
            }
        }
        Ok(layout_from_names(names))
    }

    fn router_tensor(
        &self,
        state: &State,
        alias: &str,
        names: &[&str],
        name: &str,
        dtype: DType,
        hidden: usize,
    ) -> Result<Tensor, StepError> {
        let shape = vec![self.experts, hidden];
        let at = self.location.key("router");
        let built = |t: Result<Tensor, ValueError>| t.map_err(|e| super::TransformError::value_of(name, e));
        match &self.router {
            Router::Zeros => Ok(Tensor::in_memory(
                dtype,
                shape,
                Arc::new(vec![0u8; self.experts * hidden * dtype.size().unwrap_or(0)]),
            )),
            Router::Random(std) => built(Tensor::op(
                dtype,
                shape,
                Arc::new(RandomRouter {
                    seed: tensor_seed(self.seed, name),
                    std: *std,
                }),
            )),
            Router::Values { cols, values, .. } => {
                if *cols != hidden {
                    return Err(PlanError::invalid(
                        &at,
                        format!("rows of {cols} values but the hidden size is {hidden} (`{name}`)"),
                    )
                    .into());
                }
                Ok(Tensor::in_memory(dtype, shape, Arc::new(f64_bytes(values, dtype))))
            }
            Router::Embed(ids) => {
                let (embed_name, embed) = embedding(state, alias, names, &at)?;
                if embed.shape.len() != 2 || embed.shape[1] != hidden || !embed.dtype.is_float() {
                    return Err(PlanError::invalid(
                        &at,
                        format!(
                            "`{embed_name}` is {} {} but the router needs float rows of the hidden size {hidden}",
                            embed.dtype,
                            super::fmt_shape(&embed.shape)
                        ),
                    )
                    .into());
                }
                let vocab = embed.shape[0] as u64;
                for (e, list) in ids.iter().enumerate() {
                    if let Some(bad) = list.iter().find(|&&id| id >= vocab) {
                        return Err(PlanError::invalid(
                            &at.key("embed").index(e),
                            format!("token id {bad} is out of range for `{embed_name}` ({vocab} rows)"),
                        )
                        .into());
                    }
                }
                built(Tensor::op(
                    dtype,
                    shape,
                    Arc::new(EmbedRouter {
                        embed,
                        ids: ids.clone(),
                    }),
                ))
            }
            Router::Alias(source) => {
                let source = state.alias_for(Some(source), name, &at)?;
                let Some(t) = state.get(&source, name) else {
                    return Err(PlanError::invalid(&at, format!("`{source}::{name}` does not exist")).into());
                };
                if t.shape != [self.experts, hidden] {
                    return Err(PlanError::invalid(
                        &at,
                        format!(
                            "`{source}::{name}` is {} but the router is ({}, {hidden})",
                            super::fmt_shape(&t.shape),
                            self.experts
                        ),
                    )
                    .into());
                }
                if t.dtype == dtype {
                    Ok(t.clone())
                } else {
                    built(t.cast(dtype))
                }
            }
        }
    }
}

impl Transform for UpcycleMoe {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let alias = state.alias_for(self.alias.as_deref(), "upcycle_moe", &self.location)?;
        let names: Vec<String> = state
            .alias(&alias)
            .map(|a| a.iter().map(|(n, _)| n.to_owned()).collect())
            .unwrap_or_default();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // The config as the plan has it so far (a `config` step may have edited it).
        let config = state.sidecar_json(&alias, "config.json")?;
        let layout = self.layout(config.as_ref(), &names)?;
        let mlps = match &self.mlp {
            Some(patterns) => explicit_mlps(patterns, &names, &self.location.key("mlp"))?,
            None => standard_mlps(&names),
        };
        if mlps.is_empty() {
            return Err(PlanError::invalid(
                &self.location,
                format!(
                    "no dense MLP found in `{alias}`: expected `<prefix>.N.mlp.{{gate,up,down}}_proj.weight` (or give mlp: {{gate, up, down}} patterns); found: {}",
                    mlp_like(&names).join(", ")
                ),
            )
            .into());
        }
        // Every source alias of the experts, checked before anything changes.
        let sources: Vec<String> = match &self.experts_from {
            Some(from) => from
                .iter()
                .map(|a| state.alias_for(Some(a), "experts_from", &self.location.key("experts_from")))
                .collect::<Result<_, _>>()?,
            None => vec![alias.clone(); self.experts],
        };
        let mut writes: Vec<(String, Tensor)> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        // An embedding router is the same for every layer of one dtype and size: one value,
        // computed once when written.
        let mut shared_router: Option<(DType, usize, Tensor)> = None;
        for mlp in mlps.values() {
            let dense: Vec<Tensor> = mlp
                .names
                .iter()
                .map(|n| state.get(&alias, n).expect("listed names exist").clone())
                .collect();
            let [gate, up, down] = [&dense[0], &dense[1], &dense[2]];
            let shapes_ok = gate.shape.len() == 2
                && up.shape == gate.shape
                && down.shape.len() == 2
                && down.shape[0] == gate.shape[1]
                && down.shape[1] == gate.shape[0];
            if !shapes_ok {
                return Err(PlanError::invalid(
                    &self.location,
                    format!(
                        "`{}` {}, `{}` {} and `{}` {} are not an MLP's (gate and up: intermediate × hidden; down: hidden × intermediate)",
                        mlp.names[0],
                        super::fmt_shape(&gate.shape),
                        mlp.names[1],
                        super::fmt_shape(&up.shape),
                        mlp.names[2],
                        super::fmt_shape(&down.shape)
                    ),
                )
                .into());
            }
            let hidden = gate.shape[1];
            let dtype = gate.dtype;
            let router_name = format!("{}{}", mlp.prefix, layout.router());
            if !dtype.is_float() || !dtype.is_computable() || dtype.size().is_none() {
                return Err(super::TransformError::NotFloat {
                    op: "upcycle_moe",
                    tensor: format!("{alias}::{}", mlp.names[0]),
                    dtype,
                }
                .into());
            }
            let router = match &shared_router {
                Some((d, h, t)) if *d == dtype && *h == hidden => t.clone(),
                _ => {
                    let t = self.router_tensor(state, &alias, &names, &router_name, dtype, hidden)?;
                    if matches!(self.router, Router::Embed(_)) {
                        shared_router = Some((dtype, hidden, t.clone()));
                    }
                    t
                }
            };
            writes.push((router_name.clone(), router));
            for (e, source) in sources.iter().enumerate() {
                let expert_names = layout.expert(e);
                for k in 0..3 {
                    let from = &mlp.names[k];
                    let Some(t) = state.get(source, from) else {
                        return Err(PlanError::invalid(
                            &self.location.key("experts_from"),
                            format!("expert {e}: `{source}::{from}` does not exist"),
                        )
                        .into());
                    };
                    if t.shape != dense[k].shape || t.dtype != dense[k].dtype {
                        return Err(PlanError::invalid(
                            &self.location.key("experts_from"),
                            format!(
                                "expert {e}: `{source}::{from}` is {} {} but `{alias}::{from}` is {} {}",
                                t.dtype,
                                super::fmt_shape(&t.shape),
                                dense[k].dtype,
                                super::fmt_shape(&dense[k].shape)
                            ),
                        )
                        .into());
                    }
                    let name = format!("{}{}", mlp.prefix, expert_names[k]);
                    let value = if self.noise > 0.0 {
                        t.map(
                            None,
                            Arc::new(RelativeNoise {
                                seed: tensor_seed(self.seed, &name),
                                scale: self.noise,
                            }),
                        )
                        .map_err(|e| super::TransformError::value_of(&name, e))?
                    } else {
                        t.clone()
                    };
                    writes.push((name, value));
                }
            }
            if layout == Layout::Qwen2Moe {
                // No shared expert: size 0 (shared_expert_intermediate_size: 0), and a zero gate.
                let p = &mlp.prefix;
                for (suffix, shape) in [
                    ("mlp.shared_expert.gate_proj.weight", vec![0, hidden]),
                    ("mlp.shared_expert.up_proj.weight", vec![0, hidden]),
                    ("mlp.shared_expert.down_proj.weight", vec![hidden, 0]),
                ] {
                    writes.push((
                        format!("{p}{suffix}"),
                        Tensor::in_memory(dtype, shape, Arc::new(Vec::new())),
                    ));
                }
                writes.push((
                    format!("{p}mlp.shared_expert_gate.weight"),
                    Tensor::in_memory(
                        dtype,
                        vec![1, hidden],
                        Arc::new(vec![0u8; hidden * dtype.size().unwrap_or(0)]),
                    ),
                ));
            }
            removed.extend(mlp.names.iter().cloned());
        }
        let vacated: HashSet<&str> = removed.iter().map(String::as_str).collect();
        for (name, _) in &writes {
            if state.get(&alias, name).is_some() && !vacated.contains(name.as_str()) {
                return Err(PlanError::invalid(
                    &self.location,
                    format!("`{alias}::{name}` already exists; is the model already a mixture of experts?"),
                )
                .into());
            }
        }
        let new_config = match &config {
            Some(dense) => Some(
                upcycled_config(dense, layout, self.experts, self.experts_per_token)
                    .map_err(|e| PlanError::invalid(&self.location, e.to_string()))?,
            ),
            None => None,
        };
        for name in &removed {
            state.remove(&alias, name);
        }
        for (name, tensor) in writes {
            state.insert(&alias, &name, tensor);
        }
        if let Some(config) = new_config {
            state.set_sidecar_json(&alias, "config.json", config);
        }
        ctx.note(format!(
            "upcycle_moe: {} layers of {alias} → {} experts ({}, top-{}), {} removed",
            mlps.len(),
            self.experts,
            layout.name(),
            self.experts_per_token,
            count_noun(removed.len())
        ));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Json {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32"
        })
    }

    #[test]
    fn mixtral_config_counts_local_experts_and_keeps_the_rest() {
        let out = upcycled_config(&llama(), Layout::Mixtral, 4, 2).unwrap();
        assert_eq!(out["architectures"], json!(["MixtralForCausalLM"]));
        assert_eq!(out["model_type"], "mixtral");
        assert_eq!(out["num_local_experts"], 4);
        assert_eq!(out["num_experts_per_tok"], 2);
        assert_eq!(out["intermediate_size"], 16);
        assert_eq!(out["hidden_size"], 8);
        assert_eq!(out["torch_dtype"], "float32");
        assert!(out.get("num_experts").is_none());
        // The input is not changed.
        assert_eq!(llama()["model_type"], "llama");
    }

    #[test]
    fn qwen_and_olmo_configs_renormalize_the_top_k() {
        let mut qwen2 = llama();
        qwen2["model_type"] = json!("qwen2");
        let out = upcycled_config(&qwen2, Layout::Qwen2Moe, 8, 2).unwrap();
        assert_eq!(out["architectures"], json!(["Qwen2MoeForCausalLM"]));
        assert_eq!(out["num_experts"], 8);
        assert_eq!(out["moe_intermediate_size"], 16);
        assert_eq!(out["shared_expert_intermediate_size"], 0);
        assert_eq!(out["norm_topk_prob"], true);
        assert_eq!(out["qkv_bias"], true);
        assert_eq!(out["decoder_sparse_step"], 1);
        assert_eq!(out["mlp_only_layers"], json!([]));
        let out = upcycled_config(&llama(), Layout::Qwen3Moe, 3, 1).unwrap();
        assert_eq!(out["model_type"], "qwen3_moe");
        assert_eq!(out["moe_intermediate_size"], 16);
        assert!(out.get("shared_expert_intermediate_size").is_none());
        for (layout, arch) in [
            (Layout::Olmoe, "OlmoeForCausalLM"),
            (Layout::FlexOlmo, "FlexOlmoForCausalLM"),
        ] {
            let out = upcycled_config(&llama(), layout, 2, 2).unwrap();
            assert_eq!(out["architectures"], json!([arch]));
            assert_eq!(out["model_type"], layout.name());
            assert_eq!(out["num_experts"], 2);
            assert_eq!(out["norm_topk_prob"], true);
        }
    }

    #[test]
    fn impossible_configs_are_refused_naming_the_key() {
        let err = |c: &Json, l, e, k| upcycled_config(c, l, e, k).unwrap_err().to_string();
        assert_eq!(
            upcycled_config(&json!([1]), Layout::Mixtral, 2, 1),
            Err(ConfigError::NotObject)
        );
        assert!(err(&llama(), Layout::Mixtral, 0, 1).contains("num_experts"));
        assert!(err(&llama(), Layout::Mixtral, 2, 3).contains("num_experts_per_tok"));
        assert!(err(&llama(), Layout::Mixtral, 2, 0).contains("num_experts_per_tok"));
        let mut biased = llama();
        biased["attention_bias"] = json!(true);
        assert!(err(&biased, Layout::Mixtral, 2, 1).contains("attention_bias"));
        assert!(upcycled_config(&biased, Layout::Olmoe, 2, 1).is_ok());
        biased["mlp_bias"] = json!(true);
        assert!(err(&biased, Layout::Olmoe, 2, 1).contains("mlp_bias"));
        // Qwen2's implicit q/k/v biases: refused for Mixtral, kept by Qwen2-MoE.
        let mut qwen2 = llama();
        qwen2["model_type"] = json!("qwen2");
        assert!(err(&qwen2, Layout::Mixtral, 2, 1).contains("qwen2_moe"));
        let mut moe = llama();
        moe["model_type"] = json!("mixtral");
        assert!(err(&moe, Layout::Mixtral, 2, 1).contains("already a mixture of experts"));
        let mut sizeless = llama();
        sizeless.as_object_mut().unwrap().remove("intermediate_size");
        assert!(err(&sizeless, Layout::Mixtral, 2, 1).contains("intermediate_size"));
    }

    #[test]
    fn layouts_from_config_and_names() {
        assert_eq!(layout_from_config(&llama()), Ok(Some(Layout::Mixtral)));
        assert_eq!(
            layout_from_config(&json!({"model_type": "mistral"})),
            Ok(Some(Layout::Mixtral))
        );
        assert_eq!(
            layout_from_config(&json!({"model_type": "olmo2"})),
            Ok(Some(Layout::FlexOlmo))
        );
        assert_eq!(
            layout_from_config(&json!({"architectures": ["Qwen3ForCausalLM"]})),
            Ok(Some(Layout::Qwen3Moe))
        );
        assert_eq!(layout_from_config(&json!({})), Ok(None));
        assert!(layout_from_config(&json!({"model_type": "gpt2"}))
            .unwrap_err()
            .contains("gpt2"));
        let base = [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.mlp.gate_proj.weight",
        ];
        assert_eq!(layout_from_names(&base), Layout::Mixtral);
        assert_eq!(
            layout_from_names(&[base[0], "model.layers.0.self_attn.q_proj.bias"]),
            Layout::Qwen2Moe
        );
        assert_eq!(
            layout_from_names(&[base[0], "model.layers.0.self_attn.q_norm.weight"]),
            Layout::Qwen3Moe
        );
        assert_eq!(
            layout_from_names(&[
                "model.layers.0.post_feedforward_layernorm.weight",
                "model.layers.0.self_attn.q_norm.weight"
            ]),
            Layout::FlexOlmo
        );
        assert_eq!(layout_from_names(&["model.layers.0.mlp.up_proj.weight"]), Layout::Olmoe);
    }

    #[test]
    fn standard_names_group_by_layer_and_need_all_three() {
        let names = [
            "model.layers.10.mlp.gate_proj.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.10.mlp.down_proj.weight",
            "model.layers.2.mlp.gate_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.3.mlp.gate_proj.weight",
        ];
        let found = standard_mlps(&names);
        let prefixes: Vec<&str> = found.values().map(|m| m.prefix.as_str()).collect();
        assert_eq!(prefixes, ["model.layers.2.", "model.layers.10."]);
        assert_eq!(layer_index("model.layers.12."), Some(12));
        assert_eq!(layer_index("model.norm."), None);
    }

    #[test]
    fn explicit_patterns_capture_the_layer() {
        let p = parse_mlp(
            &json!({"gate": r"h\.(?P<layer>\d+)\.ffn\.w1", "up": r"h\.(\d+)\.ffn\.w3", "down": r"h\.(\d+)\.ffn\.w2"}),
            &Location::root(),
        )
        .unwrap();
        let names = ["h.0.ffn.w1", "h.0.ffn.w3", "h.0.ffn.w2", "h.1.ffn.w1"];
        let err = explicit_mlps(&p, &names, &Location::root()).unwrap_err().to_string();
        assert!(
            err.contains("layer 1 has only 1 of gate, up and down: h.1.ffn.w1"),
            "{err}"
        );
        let found = explicit_mlps(&p, &names[..3], &Location::root()).unwrap();
        let mlp = found.values().next().unwrap();
        assert_eq!(mlp.prefix, "h.0.");
        assert_eq!(mlp.names, ["h.0.ffn.w1", "h.0.ffn.w3", "h.0.ffn.w2"].map(String::from));
        let no_group = parse_mlp(&json!({"gate": "a", "up": "b", "down": "c"}), &Location::root());
        assert!(no_group.unwrap_err().to_string().contains("layer index"));
        let unknown = parse_mlp(
            &json!({"gate": "(a)", "up": "(b)", "down": "(c)", "w4": "d"}),
            &Location::root(),
        );
        assert!(unknown.unwrap_err().to_string().contains("w4"));
    }

    #[test]
    fn noise_and_random_routers_do_not_depend_on_chunking() {
        let bytes: Vec<u8> = (0..1000).flat_map(|i| (i as f32 * 0.01 + 1.0).to_le_bytes()).collect();
        let t = Tensor::in_memory(DType::F32, vec![10, 100], Arc::new(bytes));
        let noisy = t.map(None, Arc::new(RelativeNoise { seed: 7, scale: 0.1 })).unwrap();
        let read = |t: &Tensor, chunk: usize| {
            let mut cx = ReadContext::default();
            let mut out = vec![0u8; t.nbytes()];
            for start in (0..1000).step_by(chunk) {
                let n = chunk.min(1000 - start);
                t.read(start, &mut out[start * 4..(start + n) * 4], &mut cx).unwrap();
            }
            out
        };
        assert_eq!(read(&noisy, 1000), read(&noisy, 37));
        assert_ne!(read(&noisy, 1000), read(&t, 1000));
        let router = Tensor::op(DType::F32, vec![10, 100], Arc::new(RandomRouter { seed: 3, std: 0.02 })).unwrap();
        assert_eq!(read(&router, 1000), read(&router, 513));
    }
}
