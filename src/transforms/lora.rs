//! LoRA adapters in PEFT's format: `extract_lora` factors `finetuned − base` for every matched
//! 2-D weight and writes an adapter directory `PeftModel.from_pretrained` loads as it is;
//! `merge_lora` folds an adapter directory into an alias, tensor by tensor.
//!
//! PEFT's conventions, as its `LoraLayer` defines them: for a module `M` with weight `M.weight`
//! (out × in), the adapter holds `base_model.model.M.lora_A.weight` (r × in) and
//! `base_model.model.M.lora_B.weight` (out × r), and the merged weight is `W + s·B@A` with
//! `s = alpha/r` (`alpha/√r` with `use_rslora`), r and alpha per module from `rank_pattern` /
//! `alpha_pattern` (the first key `k` with `re.match(r"(.*\.)?(k)$", M)`). `fan_in_fan_out`
//! (GPT-2's Conv1D, weights stored in × out) transposes the delta. `lora_bias` adds
//! `s·lora_B.bias` to `M.bias`. DoRA (`use_dora`) rescales each output row of the merged weight
//! to the magnitude `m_i`: `W' = m_i · (W + s·ΔW)_i / ‖(W + s·ΔW)_i‖`. Embedding adapters
//! (`lora_embedding_A` r × vocab, `lora_embedding_B` dim × r) add `s·(B@A)ᵀ`.
//!
//! Merging streams: each merged weight is a lazy value computing `W + s·B@A` for the rows a
//! write reads, from the small factors, in f32, rounded once to the weight's dtype. Extraction
//! factors one matrix at a time when the step runs ([`super::lowrank::Factorizer`]); one SVD
//! serves every rank of `rank: [8, 16, 64]`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use serde_json::{json, Value as Json};

use super::lowrank::{
    encode_into, factor_pool, in_parallel, matrix_shape, need_second_part, need_workspaces_at_once, split_factors,
    workers, Factorization, Factorizer, Pooled, ENERGY, MAX_RANK, METHOD, OVERSAMPLE, POWER_ITERATIONS, SEED,
    THRESHOLD,
};
use super::{count_noun, require_float, Context, Flow, StepError, Transform, TransformError, TransformSpec};
use crate::dtype::DType;
use crate::formats::{open_checkpoint, Format, FormatError};
use crate::linalg::{Real, Rows};
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, OutputSpec, PlanError};
use crate::references::Reference;
use crate::state::State;
use crate::value::{read_real, real_bytes, real_scratch, subtract_real, LazyOp, ReadContext, Tensor, ValueError};
use crate::write;

/// PEFT's prefix of adapter tensor names.
const PREFIX: &str = "base_model.model.";
/// The adapter's weight file and config, as PEFT names them.
const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

/// A bad adapter file (exit status 2, like any unreadable input).
fn bad_adapter(path: &Path, reason: impl Into<String>) -> StepError {
    StepError::Format(FormatError::Adapter {
        path: path.to_path_buf(),
        reason: reason.into(),
    })
}

/// An adapter that does not fit the tensors it is applied to, or an extraction that cannot be
/// written (exit status 1).
fn adapter_error(op: &'static str, reason: impl Into<String>) -> StepError {
    TransformError::Adapter {
        op,
        reason: reason.into(),
    }
    .into()
}

/// A path key, resolved as `load` and `save` resolve theirs.
fn path_key(p: &Payload, key: &str) -> Result<PathBuf, PlanError> {
    match p.text(key)? {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(PlanError::invalid(&p.at(key), "expected a non-empty path")),
    }
}

/// An alias-name key.
fn alias_key(p: &Payload, key: &str) -> Result<String, PlanError> {
    match p.text(key)? {
        Some(alias) if !alias.is_empty() && !alias.contains("::") => Ok(alias.to_owned()),
        _ => Err(PlanError::invalid(&p.at(key), "expected an alias name")),
    }
}

/// `rank: 16` or `rank: [8, 16, 64]`: the ranks written, ascending, without repeats.
fn ranks(p: &Payload) -> Result<Option<Vec<usize>>, PlanError> {
    let bad = || PlanError::invalid(&p.at("rank"), "expected a whole number ≥ 1, or a list of them");
    let one = |v: &Json| v.as_u64().filter(|&r| r >= 1).map(|r| r as usize).ok_or_else(bad);
    let mut ranks = match p.get("rank") {
        None => return Ok(None),
        Some(Json::Array(items)) if !items.is_empty() => items.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        Some(v) => vec![one(v)?],
    };
    ranks.sort_unstable();
    ranks.dedup();
    Ok(Some(ranks))
}

// ---- extract_lora ----

const EXTRACT_FIELDS: &[Field] = &[
    Field::required("base", FieldKind::Text, "alias of the base model"),
    Field::required("finetuned", FieldKind::Text, "alias of the fine-tuned model"),
    Field::required(
        "target",
        FieldKind::Reference,
        "2-D weights to factor (names in finetuned; each must exist in base with its shape)",
    ),
    Field::optional(
        "rank",
        FieldKind::Numbers,
        None,
        "rank r, or a list of ranks (one adapter each, from one SVD per matrix)",
    ),
    ENERGY,
    THRESHOLD,
    MAX_RANK,
    Field::required(
        "path",
        FieldKind::Text,
        "adapter directory to write (subdirectories r8, r16, … for a list of ranks)",
    ),
    Field::optional(
        "alpha",
        FieldKind::Number,
        None,
        "lora_alpha (default: each module's rank, so the scaling is 1)",
    ),
    Field::optional(
        "use_rslora",
        FieldKind::Bool,
        Some("false"),
        "scale by alpha/√r instead of alpha/r",
    ),
    Field::optional(
        "bias",
        FieldKind::Bool,
        Some("false"),
        "also store bias deltas as lora_B.bias (sets lora_bias: true)",
    ),
    Field::optional(
        "fan_in_fan_out",
        FieldKind::Bool,
        None,
        "weights stored in × out (GPT-2 Conv1D); default: true for GPT-2 module names",
    ),
    Field::optional(
        "modules_to_save",
        FieldKind::Reference,
        None,
        "fine-tuned tensors stored whole (norms, embeddings, heads), as PEFT's modules_to_save",
    ),
    Field::optional(
        "dtype",
        FieldKind::DType,
        None,
        "dtype of the adapter tensors (default: the base's)",
    ),
    Field::optional(
        "overwrite",
        FieldKind::Bool,
        Some("false"),
        "replace an adapter this tool did not write",
    ),
    METHOD,
    OVERSAMPLE,
    POWER_ITERATIONS,
    SEED,
];

/// `extract_lora`.
pub const EXTRACT_LORA: TransformSpec = TransformSpec {
    name: "extract_lora",
    summary: "write a PEFT LoRA adapter factoring finetuned − base",
    form: super::Form::Plain,
    fields: EXTRACT_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let ranks = ranks(&p)?;
        let factorizer = Factorizer::parse(&p, ranks.as_ref().and_then(|r| r.last().copied()))?;
        let alpha = p.number("alpha")?;
        if alpha.is_some_and(|a| !(a.is_finite() && a > 0.0)) {
            return Err(PlanError::invalid(&p.at("alpha"), "must be a positive number"));
        }
        let target = p.reference("target")?;
        if target.slice.is_some() {
            return Err(PlanError::invalid(
                &p.at("target"),
                "extract_lora factors whole weights: remove the slice",
            ));
        }
        Ok(Box::new(ExtractLora {
            base: alias_key(&p, "base")?,
            finetuned: alias_key(&p, "finetuned")?,
            target,
            ranks,
            factorizer,
            path: path_key(&p, "path")?,
            alpha,
            rslora: p.flag("use_rslora", false)?,
            bias: p.flag("bias", false)?,
            fan_in_fan_out: match p.get("fan_in_fan_out") {
                None => None,
                Some(_) => Some(p.flag("fan_in_fan_out", false)?),
            },
            modules_to_save: match p.get("modules_to_save") {
                None => None,
                Some(_) => Some(p.reference("modules_to_save")?),
            },
            dtype: match p.dtype("dtype")? {
                Some(d) if !(d.is_float() && d.is_computable()) => {
                    return Err(PlanError::invalid(
                        &p.at("dtype"),
                        format!("adapter tensors need a floating dtype, not {d}"),
                    ))
                }
                other => other,
            },
            overwrite: p.flag("overwrite", false)?,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct ExtractLora {
    base: String,
    finetuned: String,
    target: Reference,
    /// The fixed ranks (ascending), or `None` for energy / threshold.
    ranks: Option<Vec<usize>>,
    factorizer: Factorizer,
    path: PathBuf,
    alpha: Option<f64>,
    rslora: bool,
    bias: bool,
    fan_in_fan_out: Option<bool>,
    /// Tensors stored whole.
    modules_to_save: Option<Reference>,
    dtype: Option<DType>,
    overwrite: bool,
    location: Location,
}

/// One module to extract.
struct Module {
    /// `M` (the weight's name without `.weight`).
    name: String,
    ft: Tensor,
    base: Tensor,
    /// `(out, in)` of the delta as PEFT sees it (transposed for fan_in_fan_out).
    shape: (usize, usize),
    /// Whether the stored weight is the transpose of PEFT's delta (fan_in_fan_out, embeddings).
    transpose: bool,
    /// Whether it is a token embedding (`lora_embedding_A/B`).
    embedding: bool,
    /// `(finetuned, base)` biases, when both exist and `bias` is asked for.
    bias: Option<(Tensor, Tensor)>,
}

/// What factoring one module gives: its factors at each rank and what each rank kept.
type ModuleFactors = (Vec<Extracted>, Vec<Factorization>);

/// The adapter tensors of one module at one rank, scaled and in the adapter's dtype (encoded as
/// soon as the module is factored, within the run's budget or its arena: a model's factors are
/// not held in f64 until the adapter is written).
struct Extracted {
    module: String,
    rank: usize,
    /// `lora_A.weight` (r × in) or `lora_embedding_A`.
    a: (String, Tensor),
    /// `lora_B.weight` (out × r) or `lora_embedding_B`.
    b: (String, Tensor),
    /// `lora_B.bias`: the bias delta.
    bias: Option<(String, Tensor)>,
}

/// What every adapter of one extraction holds besides its factors.
struct Shared {
    /// Tensors stored whole (`modules_to_save`).
    whole: Vec<(String, Tensor)>,
    /// Whether the weights are stored in × out.
    fan_in_fan_out: bool,
}

/// GPT-2's Conv1D module names, used when the model has no `config.json` to say its type.
fn is_conv1d(module: &str) -> bool {
    matches!(module.rsplit('.').next(), Some("c_attn" | "c_proj" | "c_fc"))
}

/// A key of an alias's `config.json` (the Hugging Face model config beside its weights).
fn config_value(state: &State, alias: &str, key: &str) -> Option<Json> {
    let value = state.sidecar_json(alias, "config.json").ok()??;
    value.get(key).cloned()
}

/// The `base_model_name_or_path` of an alias: its `config.json`'s `_name_or_path`.
fn model_name(state: &State, alias: &str) -> Option<String> {
    config_value(state, alias, "_name_or_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Model types whose attention and MLP are transformers' `Conv1D` (weights stored in × out).
const CONV1D_MODELS: &[&str] = &["gpt2", "openai-gpt", "decision_transformer", "imagegpt"];

/// Last name components of token embeddings (`nn.Embedding`), whose LoRA PEFT stores as
/// `lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r).
const EMBEDDINGS: &[&str] = &["embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"];

/// Whether `module` is a token embedding, by its name.
fn is_embedding(module: &str) -> bool {
    EMBEDDINGS.contains(&module.rsplit('.').next().unwrap_or(module))
}

/// `ft − base` of one module as `T`, transposed to out × in when `transpose`.
fn difference<T: Real>(
    ft: &Tensor,
    base: &Tensor,
    transpose: bool,
    cx: &mut ReadContext,
) -> Result<Vec<T>, ValueError> {
    let mut delta = read_real::<T>(ft, "extract_lora", cx)?;
    subtract_real(&mut delta, base, "extract_lora", cx)?;
    if !transpose {
        return Ok(delta);
    }
    let (rows, cols) = (ft.shape[0], ft.shape[1]);
    let mut t = crate::value::try_filled("extract_lora", delta.len(), T::default())?;
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = delta[i * cols + j];
        }
    }
    Ok(t)
}

impl ExtractLora {
    /// The modules the target selects, checked against the base.
    fn modules(&self, state: &State) -> Result<Vec<Module>, StepError> {
        let op = "extract_lora";
        for alias in [&self.base, &self.finetuned] {
            if state.alias(alias).is_none() {
                return Err(PlanError::UnknownAlias {
                    location: self.location.clone(),
                    alias: alias.clone(),
                    known: state.alias_names(),
                }
                .into());
            }
        }
        let mut reference = self.target.clone();
        if reference.alias.is_none() {
            reference.alias = Some(self.finetuned.clone());
        }
        let matches = state.select_some(&reference, &self.location)?;
        // Conv1D layouts: from the model's config when it has one (GPTBigCode, Qwen-1 and CLIP
        // name `nn.Linear` modules `c_attn` too), else from GPT-2's module names.
        let conv1d_model = config_value(state, &self.finetuned, "model_type")
            .and_then(|t| t.as_str().map(|t| CONV1D_MODELS.contains(&t)));
        let mut modules = Vec::with_capacity(matches.len());
        for m in &matches {
            require_float(m, op)?;
            let (rows, cols) = matrix_shape(m, op)?;
            if rows == 0 || cols == 0 {
                return Err(adapter_error(
                    op,
                    format!("`{}` is empty ({rows}×{cols}): there is nothing to factor", m.display()),
                ));
            }
            let Some(module) = m.name.strip_suffix(".weight") else {
                return Err(adapter_error(
                    op,
                    format!(
                        "`{}` is not a module weight (PEFT adapts tensors named `<module>.weight`)",
                        m.display()
                    ),
                ));
            };
            let Some(base) = state.get(&self.base, &m.name) else {
                return Err(adapter_error(
                    op,
                    format!("`{}` has no counterpart `{}::{}`", m.display(), self.base, m.name),
                ));
            };
            if !(base.dtype.is_float() && base.dtype.is_computable()) {
                return Err(TransformError::NotFloat {
                    op,
                    tensor: format!("{}::{}", self.base, m.name),
                    dtype: base.dtype,
                }
                .into());
            }
            if base.shape != m.tensor.shape {
                return Err(TransformError::ShapeMismatch {
                    source_name: m.display(),
                    source_shape: m.tensor.shape.clone(),
                    destination: format!("{}::{}", self.base, m.name),
                    destination_shape: base.shape.clone(),
                }
                .into());
            }
            let embedding = is_embedding(module);
            let conv1d = !embedding
                && self
                    .fan_in_fan_out
                    .unwrap_or_else(|| conv1d_model.unwrap_or_else(|| is_conv1d(module)));
            // PEFT's delta is B@A (out × in); an embedding's and a Conv1D's is its transpose.
            let transpose = embedding || conv1d;
            let shape = if transpose { (cols, rows) } else { (rows, cols) };
            if let Some(ranks) = &self.ranks {
                let top = ranks.last().copied().unwrap_or(0);
                if top > rows.min(cols) {
                    return Err(TransformError::RankOutOfRange {
                        op,
                        tensor: m.display(),
                        shape: m.tensor.shape.clone(),
                        rank: top,
                    }
                    .into());
                }
            }
            let bias_name = format!("{module}.bias");
            let bias = match (
                self.bias && !embedding,
                state.get(&self.finetuned, &bias_name),
                state.get(&self.base, &bias_name),
            ) {
                (true, Some(ft), Some(base)) => {
                    let computable = |t: &Tensor| t.dtype.is_float() && t.dtype.is_computable();
                    if ft.shape != base.shape || ft.shape != [shape.0] || !computable(ft) || !computable(base) {
                        return Err(adapter_error(
                            op,
                            format!(
                                "`{bias_name}` is not a floating ({},) bias in both models: {} {} and {} {}",
                                shape.0,
                                ft.dtype,
                                super::fmt_shape(&ft.shape),
                                base.dtype,
                                super::fmt_shape(&base.shape)
                            ),
                        ));
                    }
                    Some((ft.clone(), base.clone()))
                }
                _ => None,
            };
            modules.push(Module {
                name: module.to_owned(),
                ft: m.tensor.clone(),
                base: base.clone(),
                shape,
                transpose,
                embedding,
                bias,
            });
        }
        // PEFT's lora_bias is one flag: every adapted layer gets a lora_B.bias, and merging one
        // into a layer without a bias fails.
        if self.bias {
            let with = modules.iter().filter(|m| !m.embedding && m.bias.is_some()).count();
            if let Some(without) = modules
                .iter()
                .find(|m| !m.embedding && m.bias.is_none())
                .filter(|_| with > 0)
            {
                return Err(adapter_error(
                    op,
                    format!(
                        "bias: true, but `{}` has no bias in both models while {with} other module(s) do; PEFT's lora_bias is one flag per adapter: extract them separately",
                        without.name
                    ),
                ));
            }
        }
        Ok(modules)
    }

    /// The adapter directories written: `path`, or `path/r{rank}` for each of several ranks.
    fn directories(&self) -> Vec<(Option<usize>, PathBuf)> {
        match &self.ranks {
            Some(ranks) if ranks.len() > 1 => ranks
                .iter()
                .map(|&r| (Some(r), self.path.join(format!("r{r}"))))
                .collect(),
            Some(ranks) => vec![(ranks.first().copied(), self.path.clone())],
            None => vec![(None, self.path.clone())],
        }
    }

    /// The weight file's output spec in `dir`.
    fn spec(&self, dir: &Path) -> OutputSpec {
        OutputSpec {
            path: dir.join(WEIGHTS),
            format: Format::Safetensors,
            npy: false,
            single_file: true,
            shard: None,
            alias: None,
            sidecars: false,
            overwrite: self.overwrite,
        }
    }

    /// Refuses a directory holding an adapter this tool did not write (its weights, in any
    /// format, or its config alone), unless `overwrite`.
    fn check_target(&self, dir: &Path) -> Result<(), StepError> {
        if self.overwrite {
            return Ok(());
        }
        let weights = dir.join(WEIGHTS);
        let ours = weights.is_file()
            && open_checkpoint(&weights)
                .map(|c| c.metadata.contains_key(write::VERSION_KEY))
                .unwrap_or(false);
        let theirs = ["adapter_model.bin", CONFIG]
            .iter()
            .map(|name| dir.join(name))
            .chain((weights.exists() && !ours).then(|| weights.clone()))
            .find(|path| path.exists() && !(ours && path.ends_with(CONFIG)));
        match theirs {
            None => Ok(()),
            Some(path) => Err(adapter_error(
                "extract_lora",
                format!(
                    "`{}` belongs to an adapter brainsurgery did not write; give `overwrite: true` to replace it",
                    path.display()
                ),
            )),
        }
    }

    /// Factors one module (all ranks from one SVD): its factors and what each rank kept.
    fn extract_one<T: Real>(
        &self,
        module: &Module,
        dtype: DType,
        pool: &rayon::ThreadPool,
        reads: &mut ReadContext,
    ) -> Result<ModuleFactors, StepError> {
        let display = format!("{}::{}.weight", self.finetuned, module.name);
        let delta = difference::<T>(&module.ft, &module.base, module.transpose, reads)
            .map_err(|e| TransformError::value_of(&display, e))?;
        let (rows, cols) = module.shape;
        let (svd, quality, method) = self
            .factorizer
            .factor(Rows::new(&delta, rows, cols), &module.name, pool)
            .map_err(|source| TransformError::Factorization {
                tensor: display.clone(),
                source,
            })?;
        drop(delta);
        let bias = match &module.bias {
            Some((ft, base)) => {
                let ft =
                    read_real::<f64>(ft, "extract_lora", reads).map_err(|e| TransformError::value_of(&display, e))?;
                let base =
                    read_real::<f64>(base, "extract_lora", reads).map_err(|e| TransformError::value_of(&display, e))?;
                Some(ft.iter().zip(&base).map(|(a, b)| a - b).collect::<Vec<f64>>())
            }
            None => None,
        };
        let ranks: Vec<usize> = match &self.ranks {
            Some(ranks) => ranks.clone(),
            None => vec![quality.rank],
        };
        let mut out = Vec::with_capacity(ranks.len());
        let mut factorizations = Vec::with_capacity(ranks.len());
        for &rank in &ranks {
            let mut truncated = svd.clone();
            truncated.truncate(rank);
            let q = if rank == quality.rank {
                quality
            } else {
                quality.at_rank(&svd.s, rank)
            };
            factorizations.push(Factorization {
                op: "extract_lora",
                tensor: display.clone(),
                shape: (rows, cols),
                method,
                quality: q,
            });
            let (b, a) = split_factors(&truncated);
            out.push(self.encode(module, rank, (&b, &a), bias.as_deref(), dtype, reads)?);
        }
        Ok((out, factorizations))
    }

    /// [`ExtractLora::extract_one`] for one module, in the work type its weights call for.
    fn extract_module(
        &self,
        module: &Module,
        dtype: DType,
        pool: &rayon::ThreadPool,
        reads: &mut ReadContext,
    ) -> Result<ModuleFactors, StepError> {
        reads.check().map_err(|_| StepError::Cancelled)?;
        if module.ft.dtype == DType::F64 {
            self.extract_one::<f64>(module, dtype, pool, reads)
        } else {
            self.extract_one::<f32>(module, dtype, pool, reads)
        }
    }

    /// The adapter tensors of `module` at `rank` from its factors `(B, A)` (row-major, unscaled)
    /// and bias delta, scaled so that `s·B@A` is the delta (each factor carries `1/√s`) and
    /// encoded in `dtype`.
    fn encode<T: Real>(
        &self,
        module: &Module,
        rank: usize,
        (b, a): (&[T], &[T]),
        bias: Option<&[f64]>,
        dtype: DType,
        reads: &ReadContext,
    ) -> Result<Extracted, StepError> {
        let op = "extract_lora";
        let alpha = self.alpha.unwrap_or(rank as f64);
        let scaling = if self.rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let root = (1.0 / scaling).sqrt();
        let (rows, cols) = (b.len() / rank.max(1), a.len() / rank.max(1));
        let tensor = |v: Vec<f64>, shape: Vec<usize>| -> Result<Tensor, StepError> {
            // Within the run's memory budget, else in its arena.
            let bytes = real_scratch(&v, dtype, op, reads).map_err(|e| TransformError::value_of(&module.name, e))?;
            Ok(Tensor::in_memory(dtype, shape, Arc::new(bytes)))
        };
        let (a_name, b_name) = if module.embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let name = &module.name;
        let a = tensor(a.iter().map(|x| x.wide() * root).collect(), vec![rank, cols])?;
        let b = tensor(b.iter().map(|x| x.wide() * root).collect(), vec![rows, rank])?;
        let bias = match bias {
            Some(bias) => Some((
                format!("{PREFIX}{name}.lora_B.bias"),
                tensor(bias.iter().map(|x| x / scaling).collect(), vec![bias.len()])?,
            )),
            None => None,
        };
        Ok(Extracted {
            module: name.clone(),
            rank,
            a: (format!("{PREFIX}{name}.{a_name}"), a),
            b: (format!("{PREFIX}{name}.{b_name}"), b),
            bias,
        })
    }

    /// Writes one adapter directory from the factors of every module at one rank.
    fn write_adapter(
        &self,
        state: &State,
        dir: &Path,
        factors: &[&Extracted],
        shared: &Shared,
        ctx: &mut Context,
    ) -> Result<Vec<PathBuf>, StepError> {
        let Shared { whole, fan_in_fan_out } = shared;
        let fan_in_fan_out = *fan_in_fan_out;
        let rank_of: BTreeMap<&str, usize> = factors.iter().map(|f| (f.module.as_str(), f.rank)).collect();
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for f in factors {
            *counts.entry(f.rank).or_default() += 1;
        }
        // r is the most common rank; the others go to rank_pattern.
        let r = counts
            .iter()
            .max_by_key(|(rank, n)| (**n, std::cmp::Reverse(**rank)))
            .map_or(1, |(rank, _)| *rank);
        let alpha_of = |rank: usize| self.alpha.unwrap_or(rank as f64);
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for f in factors {
            tensors.push(f.a.clone());
            tensors.push(f.b.clone());
            tensors.extend(f.bias.clone());
        }
        for (name, tensor) in whole {
            tensors.push((format!("{PREFIX}{name}"), tensor.clone()));
        }
        // PEFT names modules_to_save by module: the tensor names without `.weight` / `.bias`.
        let saved: std::collections::BTreeSet<&str> = whole
            .iter()
            .map(|(name, _)| name.rsplit_once('.').map_or(name.as_str(), |(module, _)| module))
            .collect();
        let rank_pattern: serde_json::Map<String, Json> = rank_of
            .iter()
            .filter(|(_, &rank)| rank != r)
            .map(|(m, &rank)| ((*m).to_owned(), json!(rank)))
            .collect();
        let alpha_pattern: serde_json::Map<String, Json> = match self.alpha {
            Some(_) => serde_json::Map::new(),
            None => rank_pattern.iter().map(|(m, rank)| (m.clone(), rank.clone())).collect(),
        };
        let config = json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": model_name(state, &self.base),
            "r": r,
            "lora_alpha": alpha_of(r),
            "target_modules": target_modules(state, &self.finetuned, rank_of.keys().copied()),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": self.rslora,
            "use_dora": false,
            "lora_bias": factors.iter().any(|f| f.bias.is_some()),
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "lora_dropout": 0.0,
            "init_lora_weights": true,
            "modules_to_save": if saved.is_empty() { Json::Null } else { json!(saved) },
            "inference_mode": true,
        });
        std::fs::create_dir_all(dir).map_err(|e| FormatError::io(dir, e))?;
        let spec = self.spec(dir);
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_owned(), "pt".to_owned());
        metadata.insert(write::VERSION_KEY.to_owned(), env!("CARGO_PKG_VERSION").to_owned());
        if let Some(sha) = &ctx.plan_sha256 {
            metadata.insert(write::PLAN_KEY.to_owned(), sha.clone());
        }
        let options = ctx.write_options();
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        // The config is written first and renamed into place right after the weights land, so a
        // failure while the weights are written leaves the directory as it was.
        let config_path = dir.join(CONFIG);
        let staged = crate::formats::output::StagedFile::write(&config_path, format!("{text}\n").as_bytes())?;
        let mut files = write::write_tensors(&spec, &refs, &metadata, &[], options)?;
        staged.commit()?;
        files.push(config_path);
        Ok(files)
    }
}

/// PEFT's `target_modules` for `modules` of `alias`: the distinct last name components when they
/// select exactly these modules among the alias's 2-D weights, else the full module names.
fn target_modules<'a>(state: &State, alias: &str, modules: impl Iterator<Item = &'a str>) -> Json {
    let modules: HashSet<&str> = modules.collect();
    let suffixes: std::collections::BTreeSet<&str> =
        modules.iter().map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
    let selected_by_suffix = state.alias(alias).is_some_and(|a| {
        a.iter().all(|(name, t)| {
            let Some(module) = name.strip_suffix(".weight") else {
                return true;
            };
            let last = module.rsplit('.').next().unwrap_or(module);
            t.shape.len() != 2 || !suffixes.contains(last) || modules.contains(module)
        })
    });
    if selected_by_suffix {
        json!(suffixes)
    } else {
        let mut full: Vec<&str> = modules.into_iter().collect();
        full.sort_unstable();
        json!(full)
    }
}

impl Transform for ExtractLora {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let modules = self.modules(state)?;
        let directories = self.directories();
        for (_, dir) in &directories {
            let spec = self.spec(dir);
            write::validate_target(&spec, state, &self.location.key("path"))?;
            self.check_target(dir)?;
        }
        let workspaces: Vec<usize> = modules
            .iter()
            .map(|m| {
                let width = if m.ft.dtype == DType::F64 { 8 } else { 4 };
                // The delta, held while it is factored; twice while a transposed one
                // (embeddings, Conv1D) is turned.
                let delta = m.shape.0.saturating_mul(m.shape.1).saturating_mul(width);
                let copies = if m.transpose { 2 } else { 1 };
                self.factorizer
                    .workspace(m.shape.0, m.shape.1, width)
                    .saturating_add(delta.saturating_mul(copies))
            })
            .collect();
        let workers = workers(ctx.threads, &workspaces, ctx.reads.memory().limit());
        for (m, &bytes) in modules.iter().zip(&workspaces) {
            ctx.need_workspace(bytes, &m.name);
        }
        need_workspaces_at_once(ctx, &workspaces, workers, |i| modules[i].name.clone());
        let fan_in_fan_out = modules.iter().any(|m| m.transpose && !m.embedding);
        if fan_in_fan_out && modules.iter().any(|m| !m.transpose && !m.embedding) {
            return Err(adapter_error(
                "extract_lora",
                "some matched weights are stored in × out (GPT-2 Conv1D) and others out × in; PEFT's fan_in_fan_out is one flag per adapter: extract them separately",
            ));
        }
        let dtype = self
            .dtype
            .or_else(|| modules.first().map(|m| m.base.dtype))
            .unwrap_or(DType::F32);
        // The adapter tensors are kept until the adapter is written: at the last module, every
        // module's factors at every rank beside that module's workspace (and each worker's read
        // buffers: a chunk of each weight).
        let element = dtype.size().unwrap_or(4);
        let adapter = modules.iter().fold(0usize, |sum, m| {
            let (ranks, copies): (usize, usize) = match &self.ranks {
                Some(ranks) => (
                    ranks.iter().map(|&r| r.min(m.shape.0.min(m.shape.1))).sum(),
                    ranks.len(),
                ),
                None => (self.factorizer.rank_bound(m.shape.0, m.shape.1), 1),
            };
            // A bias delta per adapter directory.
            let bias = if m.bias.is_some() { m.shape.0 * copies } else { 0 };
            let elements = (m.shape.0 + m.shape.1).saturating_mul(ranks).saturating_add(bias);
            sum.saturating_add(elements.saturating_mul(element))
        });
        ctx.held = ctx
            .held
            .max(adapter.saturating_add(workers.saturating_mul(2 * crate::value::CHUNK_BYTES)));
        let second = |i: usize| {
            let width = if modules[i].ft.dtype == DType::F64 { 8 } else { 4 };
            self.factorizer
                .second_part(modules[i].shape.0, modules[i].shape.1, width)
        };
        need_second_part(ctx, modules.len(), workers, second);
        let whole: Vec<(String, Tensor)> = match &self.modules_to_save {
            None => Vec::new(),
            Some(reference) => {
                let mut reference = reference.clone();
                if reference.alias.is_none() {
                    reference.alias = Some(self.finetuned.clone());
                }
                let matches = state.select_some(&reference, &self.location)?;
                let adapted: HashSet<&str> = modules.iter().map(|m| m.name.as_str()).collect();
                let module_of = |name: &str| name.rsplit_once('.').map_or(name.to_owned(), |(m, _)| m.to_owned());
                if let Some(m) = matches.iter().find(|m| adapted.contains(module_of(&m.name).as_str())) {
                    return Err(adapter_error(
                        "extract_lora",
                        format!(
                            "`{}` is both factored (target) and stored whole (modules_to_save)",
                            m.display()
                        ),
                    ));
                }
                matches.into_iter().map(|m| (m.name, m.tensor)).collect()
            }
        };
        // What the run reads: both weights (and biases) of every module, and the tensors stored
        // whole.
        ctx.reads_whole(
            modules
                .iter()
                .flat_map(|m| {
                    [&m.ft, &m.base]
                        .into_iter()
                        .chain(m.bias.iter().flat_map(|(f, b)| [f, b]))
                })
                .chain(whole.iter().map(|(_, t)| t)),
        );
        if !ctx.evaluate {
            ctx.note(format!(
                "extract_lora: {} → {} (written when the plan runs)",
                count_noun(modules.len()),
                self.path.display()
            ));
            return Ok(Flow::Continue);
        }
        let mut extracted: Vec<Extracted> = Vec::new();
        if workers > 1 {
            let each = |m: &Module, pool: &rayon::ThreadPool, reads: &mut ReadContext| {
                self.extract_module(m, dtype, pool, reads)
            };
            for (parts, factorizations) in in_parallel(&modules, workers, &ctx.reads, each)? {
                extracted.extend(parts);
                ctx.factorizations.extend(factorizations);
            }
        } else {
            let pool = factor_pool(ctx.threads)?;
            for module in &modules {
                let (parts, factorizations) = self.extract_module(module, dtype, &pool, &mut ctx.reads)?;
                extracted.extend(parts);
                ctx.factorizations.extend(factorizations);
            }
        }
        let shared = Shared { whole, fan_in_fan_out };
        let mut written = 0;
        for (rank, dir) in &directories {
            let factors: Vec<&Extracted> = extracted.iter().filter(|e| rank.is_none_or(|r| e.rank == r)).collect();
            let files = self.write_adapter(state, dir, &factors, &shared, ctx)?;
            written += files.len();
            ctx.written.extend(files);
        }
        ctx.note(format!(
            "extract_lora: {} → {} ({} adapter{}, {written} files)",
            count_noun(modules.len()),
            self.path.display(),
            directories.len(),
            if directories.len() == 1 { "" } else { "s" }
        ));
        Ok(Flow::Continue)
    }
}

// ---- merge_lora ----

const MERGE_FIELDS: &[Field] = &[
    Field::optional(
        "target",
        FieldKind::Text,
        None,
        "alias to merge into (default: the default alias)",
    ),
    Field::optional("into", FieldKind::Text, None, "the same as target"),
    Field::required(
        "adapter",
        FieldKind::Text,
        "PEFT LoRA adapter directory (adapter_config.json and weights)",
    ),
    Field::optional("scale", FieldKind::Number, Some("1"), "extra factor on every delta"),
];

/// `merge_lora`.
pub const MERGE_LORA: TransformSpec = TransformSpec {
    name: "merge_lora",
    summary: "fold a PEFT LoRA adapter into an alias (W += s·B@A per module)",
    form: super::Form::Plain,
    fields: MERGE_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let target = match (p.get("target"), p.get("into")) {
            (Some(_), Some(_)) => return Err(PlanError::invalid(p.location(), "give target or into, not both")),
            (Some(_), None) => Some(alias_key(&p, "target")?),
            (None, Some(_)) => Some(alias_key(&p, "into")?),
            (None, None) => None,
        };
        let scale = p.number("scale")?.unwrap_or(1.0);
        if !scale.is_finite() {
            return Err(PlanError::invalid(&p.at("scale"), "must be finite"));
        }
        Ok(Box::new(MergeLora {
            target,
            adapter: path_key(&p, "adapter")?,
            scale,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct MergeLora {
    target: Option<String>,
    adapter: PathBuf,
    scale: f64,
    location: Location,
}

/// What `adapter_config.json` says, as merging needs it.
#[derive(Debug)]
struct AdapterConfig {
    r: f64,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    dora: bool,
    /// `(regex, value)` in the file's order.
    rank_pattern: Vec<(fancy_regex::Regex, f64)>,
    alpha_pattern: Vec<(fancy_regex::Regex, f64)>,
}

impl AdapterConfig {
    fn read(dir: &Path) -> Result<AdapterConfig, StepError> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| FormatError::io(&path, e))?;
        let value: Json = serde_json::from_str(&text).map_err(|e| bad_adapter(&path, format!("not JSON: {e}")))?;
        let kind = value.get("peft_type").and_then(Json::as_str).unwrap_or("");
        if !kind.eq_ignore_ascii_case("lora") {
            return Err(bad_adapter(
                &path,
                format!(
                    "peft_type is {}; merge_lora merges LORA adapters",
                    if kind.is_empty() {
                        "missing".to_owned()
                    } else {
                        format!("`{kind}`")
                    }
                ),
            ));
        }
        // A key present with the wrong type is an error, never its default: `"fan_in_fan_out":
        // "true"` read as false would merge square weights transposed without a word.
        let number = |key: &str, default: f64| -> Result<f64, StepError> {
            match value.get(key) {
                None | Some(Json::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad_adapter(&path, format!("{key} is `{v}`, not a number"))),
            }
        };
        let flag = |key: &str| -> Result<bool, StepError> {
            match value.get(key) {
                None | Some(Json::Null) => Ok(false),
                Some(Json::Bool(b)) => Ok(*b),
                Some(v) => Err(bad_adapter(&path, format!("{key} is `{v}`, not true or false"))),
            }
        };
        // Ranks are whole numbers ≥ 1.
        let rank = |what: &str, v: f64| -> Result<f64, StepError> {
            if v >= 1.0 && v.fract() == 0.0 {
                Ok(v)
            } else {
                Err(bad_adapter(&path, format!("{what} is {v}, not a whole number ≥ 1")))
            }
        };
        let patterns = |key: &str, ranks: bool| -> Result<Vec<(fancy_regex::Regex, f64)>, StepError> {
            let map = match value.get(key) {
                None | Some(Json::Null) => return Ok(Vec::new()),
                Some(Json::Object(map)) => map,
                Some(v) => return Err(bad_adapter(&path, format!("{key} is `{v}`, not a mapping"))),
            };
            map.iter()
                .map(|(k, v)| {
                    let re = fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                        .map_err(|e| bad_adapter(&path, format!("{key} key `{k}` is not a regular expression: {e}")))?;
                    let v = v
                        .as_f64()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| bad_adapter(&path, format!("{key}[`{k}`] is `{v}`, not a number")))?;
                    let v = if ranks { rank(&format!("{key}[`{k}`]"), v)? } else { v };
                    Ok((re, v))
                })
                .collect()
        };
        let r = rank("r", number("r", 8.0)?)?;
        let alpha = number("lora_alpha", 8.0)?;
        Ok(AdapterConfig {
            r,
            alpha,
            rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            dora: flag("use_dora")?,
            rank_pattern: patterns("rank_pattern", true)?,
            alpha_pattern: patterns("alpha_pattern", false)?,
        })
    }

    /// PEFT's `get_pattern_key`: the first pattern matching `module`.
    fn lookup(patterns: &[(fancy_regex::Regex, f64)], module: &str, default: f64) -> f64 {
        patterns
            .iter()
            .find(|(re, _)| re.is_match(module).unwrap_or(false))
            .map_or(default, |(_, v)| *v)
    }

    /// `s` for `module`.
    fn scaling(&self, module: &str) -> f64 {
        let r = Self::lookup(&self.rank_pattern, module, self.r);
        let alpha = Self::lookup(&self.alpha_pattern, module, self.alpha);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// The tensors of one adapted module.
#[derive(Default)]
struct AdapterModule {
    a: Option<Tensor>,
    b: Option<Tensor>,
    bias: Option<Tensor>,
    magnitude: Option<Tensor>,
    embedding: bool,
}

/// `W + s·(P@Q)` with row-major `P` (rows × r) and `Q` (r × cols) read from the adapter on first
/// use, optionally each row rescaled to a DoRA magnitude; in f32, rounded once to `W`'s dtype.
#[derive(Debug)]
struct MergeOp {
    /// The adapted module, for messages.
    module: String,
    base: Tensor,
    /// `(lora_B, lora_A)` as stored, and whether the delta is `(B@A)ᵀ`.
    b: Tensor,
    a: Tensor,
    transpose: bool,
    scale: f32,
    magnitude: Option<Tensor>,
    /// `(P, Q, magnitude)`, once read.
    factors: Mutex<Option<Arc<Factors>>>,
}

/// `P` (rows × r), `Q` (r × cols) and the DoRA magnitudes of a merge.
type Factors = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

impl MergeOp {
    /// The factors, read on the first call (a failed read is retried by the next reader).
    fn factors(&self, cx: &ReadContext) -> Result<Arc<Factors>, ValueError> {
        let mut slot = self.factors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &*slot {
            return Ok(f.clone());
        }
        let mut cx = cx.fork();
        let b = read_real::<f32>(&self.b, "merge_lora", &mut cx)?;
        let a = read_real::<f32>(&self.a, "merge_lora", &mut cx)?;
        let magnitude = match &self.magnitude {
            Some(m) => Some(read_real::<f32>(m, "merge_lora", &mut cx)?),
            None => None,
        };
        if let Some(x) = b
            .iter()
            .chain(&a)
            .chain(magnitude.iter().flatten())
            .find(|x| !x.is_finite())
        {
            return Err(ValueError::Compute {
                op: "merge_lora",
                reason: format!("the adapter's module `{}` holds {x}", self.module),
            });
        }
        let factors = if self.transpose {
            // (B@A)ᵀ = Aᵀ@Bᵀ.
            let (out, r) = (self.b.shape[0], self.b.shape[1]);
            let inner = self.a.shape[1];
            let mut at = crate::value::try_filled("merge_lora", a.len(), 0.0f32)?;
            for t in 0..r {
                for j in 0..inner {
                    at[j * r + t] = a[t * inner + j];
                }
            }
            let mut bt = crate::value::try_filled("merge_lora", b.len(), 0.0f32)?;
            for i in 0..out {
                for t in 0..r {
                    bt[t * out + i] = b[i * r + t];
                }
            }
            (at, bt, magnitude)
        } else {
            (b, a, magnitude)
        };
        let factors = Arc::new(factors);
        *slot = Some(factors.clone());
        Ok(factors)
    }
}

impl LazyOp for MergeOp {
    fn name(&self) -> &'static str {
        "merge_lora"
    }

    fn inputs(&self) -> Vec<&Tensor> {
        [Some(&self.base), Some(&self.b), Some(&self.a), self.magnitude.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }

    fn release(&self) {
        // Read from the adapter again if the merged weight is read again.
        *self.factors.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        let factors = (self.a.numel() + self.b.numel()) * 8;
        factors.saturating_add(self.base.materialized(seen))
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        // The factors are read once and kept; the base streams (a chunk's partial rows are
        // read whole, which this does not count).
        let base = self.base.bytes_to_read(seen);
        if !seen.insert(self as *const Self as usize) {
            return base;
        }
        [Some(&self.a), Some(&self.b), self.magnitude.as_ref()]
            .into_iter()
            .flatten()
            .fold(base, |sum, t| sum.saturating_add(t.bytes_to_read(seen)))
    }

    fn read(
        &self,
        dtype: DType,
        shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().ok_or(ValueError::NoByteSize {
            op: "merge_lora",
            dtype,
        })?;
        let count = out.len() / size;
        let (rows, cols) = (shape[0], shape[1]);
        if count == 0 || cols == 0 {
            return Ok(());
        }
        let factors = self.factors(cx)?;
        let (p, q, magnitude) = &*factors;
        let r = q.len() / cols;
        let (first, last) = (start / cols, (start + count).div_ceil(cols).min(rows));
        let n = (last - first) * cols;
        // The base's covering rows (whole rows: DoRA needs each row's norm): a chunk's elements
        // plus at most two partial rows, in buffers reused from read to read.
        let mut base_bytes = cx.take(n * size);
        self.base.read(first * cols, &mut base_bytes, cx)?;
        let mut wide = cx.take(n * 4);
        crate::kernels::convert(dtype, &base_bytes, DType::F32, &mut wide);
        cx.give(base_bytes);
        let mut block = <f32 as Pooled>::take("merge_lora", n)?;
        for (x, w) in block.iter_mut().zip(wide.chunks_exact(4)) {
            *x = f32::from_le(w);
        }
        matmul(
            MatMut::from_row_major_slice_mut(&mut block, last - first, cols),
            Accum::Add,
            MatRef::from_row_major_slice(&p[first * r..last * r], last - first, r),
            MatRef::from_row_major_slice(q, r, cols),
            self.scale,
            Par::Seq,
        );
        if let Some(m) = magnitude {
            for (i, row) in block.chunks_exact_mut(cols).enumerate() {
                let norm = row.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
                let factor = (f64::from(m[first + i]) / norm) as f32;
                row.iter_mut().for_each(|x| *x *= factor);
            }
        }
        let from = start - first * cols;
        encode_into(&block[from..from + count], dtype, &mut wide, out);
        cx.give(wide);
        <f32 as Pooled>::give(block);
        Ok(())
    }
}

/// `W + s·b` for a bias, with the adapter's bias read on first use.
#[derive(Debug)]
struct BiasOp {
    base: Tensor,
    bias: Tensor,
    scale: f32,
}

impl LazyOp for BiasOp {
    fn name(&self) -> &'static str {
        "merge_lora"
    }

    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.base, &self.bias]
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.base
            .bytes_to_read(seen)
            .saturating_add(self.bias.bytes_to_read(seen))
    }

    fn read(
        &self,
        dtype: DType,
        _: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().ok_or(ValueError::NoByteSize {
            op: "merge_lora",
            dtype,
        })?;
        let count = out.len() / size;
        let mut base = vec![0u8; out.len()];
        self.base.read(start, &mut base, cx)?;
        // The adapter's bias may be stored in another dtype than the model's.
        let bias_size = self.bias.dtype.size().ok_or(ValueError::NoByteSize {
            op: "merge_lora",
            dtype: self.bias.dtype,
        })?;
        let mut add = vec![0u8; count * bias_size];
        self.bias.read(start, &mut add, cx)?;
        let (mut x, mut y) = (vec![0u8; count * 4], vec![0u8; count * 4]);
        crate::kernels::convert(dtype, &base, DType::F32, &mut x);
        crate::kernels::convert(self.bias.dtype, &add, DType::F32, &mut y);
        let sum: Vec<f32> = x
            .chunks_exact(4)
            .zip(y.chunks_exact(4))
            .map(|(a, b)| f32::from_le(a) + self.scale * f32::from_le(b))
            .collect();
        out.copy_from_slice(&real_bytes(&sum, dtype, "merge_lora")?);
        Ok(())
    }
}

impl Transform for MergeLora {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let op = "merge_lora";
        let alias = state.alias_for(self.target.as_deref(), "merge_lora", &self.location)?;
        let config = AdapterConfig::read(&self.adapter)?;
        let checkpoint = open_checkpoint(&self.adapter)?;
        ctx.notices_of(&checkpoint);
        let mut scratch = State::default();
        scratch.add_checkpoint("adapter", &checkpoint);
        let adapter = scratch.alias("adapter").expect("just added");
        let mut modules: BTreeMap<String, AdapterModule> = BTreeMap::new();
        let mut whole: Vec<(String, Tensor)> = Vec::new();
        for (name, tensor) in adapter.iter() {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                return Err(bad_adapter(
                    &self.adapter,
                    format!("tensor `{name}` does not start with `{PREFIX}`"),
                ));
            };
            let part = [
                (".lora_A.weight", 0),
                (".lora_B.weight", 1),
                (".lora_B.bias", 2),
                (".lora_magnitude_vector.weight", 3),
                (".lora_magnitude_vector", 3),
                (".lora_embedding_A", 4),
                (".lora_embedding_B", 5),
            ]
            .iter()
            .find_map(|(suffix, kind)| rest.strip_suffix(suffix).map(|m| (m, *kind)));
            let Some((module, kind)) = part else {
                // A whole tensor (`modules_to_save`): replaces the base's.
                whole.push((rest.to_owned(), tensor.clone()));
                continue;
            };
            let entry = modules.entry(module.to_owned()).or_default();
            let slot = match kind {
                0 | 4 => &mut entry.a,
                1 | 5 => &mut entry.b,
                2 => &mut entry.bias,
                _ => &mut entry.magnitude,
            };
            *slot = Some(tensor.clone());
            entry.embedding |= kind >= 4;
        }
        let names_of_alias = |state: &State| -> Vec<String> {
            state
                .alias(&alias)
                .map(|a| a.iter().map(|(n, _)| n.to_owned()).collect())
                .unwrap_or_default()
        };
        let missing = |state: &State, name: &str, of: &str| -> StepError {
            let names = names_of_alias(state);
            let close = crate::references::closest_names(name, names.iter().map(String::as_str), 3);
            let hint = if close.is_empty() {
                String::new()
            } else {
                format!(
                    "; closest: {}",
                    close.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                )
            };
            adapter_error(
                op,
                format!("adapter tensor `{of}` maps to `{alias}::{name}`, which does not exist{hint}"),
            )
        };
        let mut replacements: Vec<(String, Tensor)> = Vec::new();
        for (module, parts) in &modules {
            let (Some(a), Some(b)) = (&parts.a, &parts.b) else {
                let has = if parts.a.is_some() {
                    "lora_A but no lora_B"
                } else {
                    "no lora_A"
                };
                return Err(bad_adapter(&self.adapter, format!("module `{module}` has {has}")));
            };
            for (what, t) in [
                ("lora_A", Some(a)),
                ("lora_B", Some(b)),
                ("lora_B.bias", parts.bias.as_ref()),
                ("lora_magnitude_vector", parts.magnitude.as_ref()),
            ] {
                let Some(t) = t else { continue };
                if !(t.dtype.is_float() && t.dtype.is_computable()) {
                    return Err(bad_adapter(
                        &self.adapter,
                        format!("module `{module}`: {what} is {}, not a floating dtype", t.dtype),
                    ));
                }
            }
            let r = match (&a.shape[..], &b.shape[..]) {
                ([ra, _], [_, rb]) if ra == rb => *ra,
                _ => {
                    return Err(bad_adapter(
                        &self.adapter,
                        format!(
                            "module `{module}`: lora_A {} and lora_B {} are not r × in and out × r",
                            super::fmt_shape(&a.shape),
                            super::fmt_shape(&b.shape)
                        ),
                    ))
                }
            };
            let weight_name = format!("{module}.weight");
            let Some(weight) = state.get(&alias, &weight_name) else {
                return Err(missing(state, &weight_name, &format!("{PREFIX}{module}.lora_A")));
            };
            if !weight.dtype.is_float() || !weight.dtype.is_computable() {
                return Err(TransformError::NotFloat {
                    op,
                    tensor: format!("{alias}::{weight_name}"),
                    dtype: weight.dtype,
                }
                .into());
            }
            // Linear: B@A is out × in; embeddings and fan_in_fan_out store the transpose.
            let transpose = parts.embedding || config.fan_in_fan_out;
            let ok = match (a.shape[1], b.shape[0], &weight.shape[..]) {
                (ai, bo, [w0, w1]) => {
                    let (rows, cols) = if transpose { (ai, bo) } else { (bo, ai) };
                    (rows, cols) == (*w0, *w1)
                }
                _ => false,
            };
            if !ok {
                return Err(adapter_error(
                    op,
                    format!(
                        "module `{module}`: lora_A {} and lora_B {} do not fit `{alias}::{weight_name}` {}{}",
                        super::fmt_shape(&a.shape),
                        super::fmt_shape(&b.shape),
                        super::fmt_shape(&weight.shape),
                        if transpose {
                            " (as the transpose: fan_in_fan_out or an embedding)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let scaling = config.scaling(module);
            let pattern_rank = AdapterConfig::lookup(&config.rank_pattern, module, config.r);
            if pattern_rank as usize != r {
                return Err(bad_adapter(
                    &self.adapter,
                    format!("module `{module}` has rank {r} but the config says {pattern_rank} (r / rank_pattern)"),
                ));
            }
            let magnitude = match (&parts.magnitude, config.dora) {
                (Some(m), true) => {
                    if transpose {
                        return Err(adapter_error(
                            op,
                            format!("module `{module}`: DoRA on transposed weights (fan_in_fan_out, embeddings) is not supported"),
                        ));
                    }
                    if m.numel() != weight.shape[0] {
                        return Err(adapter_error(
                            op,
                            format!(
                                "module `{module}`: DoRA magnitude has {} values for {} rows",
                                m.numel(),
                                weight.shape[0]
                            ),
                        ));
                    }
                    Some(m.clone())
                }
                (None, true) => {
                    return Err(bad_adapter(
                        &self.adapter,
                        format!("module `{module}`: use_dora is set but it has no lora_magnitude_vector"),
                    ))
                }
                (Some(_), false) => {
                    return Err(bad_adapter(
                        &self.adapter,
                        format!("module `{module}` has a lora_magnitude_vector but use_dora is not set"),
                    ))
                }
                (None, false) => None,
            };
            let s = (scaling * self.scale) as f32;
            let merged = Tensor::op(
                weight.dtype,
                weight.shape.clone(),
                Arc::new(MergeOp {
                    module: module.clone(),
                    base: weight.clone(),
                    b: b.clone(),
                    a: a.clone(),
                    transpose,
                    scale: s,
                    magnitude,
                    factors: Mutex::new(None),
                }),
            )
            .map_err(|e| TransformError::value_of(&weight_name, e))?;
            replacements.push((weight_name, merged));
            if let Some(bias) = &parts.bias {
                let bias_name = format!("{module}.bias");
                let Some(base_bias) = state.get(&alias, &bias_name) else {
                    return Err(missing(state, &bias_name, &format!("{PREFIX}{module}.lora_B.bias")));
                };
                if base_bias.shape != bias.shape {
                    return Err(adapter_error(
                        op,
                        format!("module `{module}`: lora_B.bias does not fit `{alias}::{bias_name}`"),
                    ));
                }
                let merged = Tensor::op(
                    base_bias.dtype,
                    base_bias.shape.clone(),
                    Arc::new(BiasOp {
                        base: base_bias.clone(),
                        bias: bias.clone(),
                        scale: s,
                    }),
                )
                .map_err(|e| TransformError::value_of(&bias_name, e))?;
                replacements.push((bias_name, merged));
            }
        }
        for (name, tensor) in &whole {
            let Some(current) = state.get(&alias, name) else {
                return Err(missing(state, name, &format!("{PREFIX}{name}")));
            };
            if current.shape != tensor.shape || current.dtype != tensor.dtype {
                return Err(adapter_error(
                    op,
                    format!("adapter tensor `{PREFIX}{name}` (modules_to_save) does not match `{alias}::{name}` in shape or dtype"),
                ));
            }
            replacements.push((name.clone(), tensor.clone()));
        }
        for (name, tensor) in replacements {
            state.replace(&alias, &name, tensor);
        }
        ctx.note(format!(
            "merge_lora: {} module{} of {} merged into `{alias}`{}",
            modules.len(),
            if modules.len() == 1 { "" } else { "s" },
            self.adapter.display(),
            if whole.is_empty() {
                String::new()
            } else {
                format!(", {} replaced whole", count_noun(whole.len()))
            }
        ));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_lookup_follows_peft() {
        let re = |k: &str| (fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).unwrap(), 4.0);
        let patterns = vec![re("q_proj"), re("model.layers.1.k_proj")];
        assert_eq!(AdapterConfig::lookup(&patterns, "model.layers.0.q_proj", 8.0), 4.0);
        assert_eq!(AdapterConfig::lookup(&patterns, "model.layers.1.k_proj", 8.0), 4.0);
        assert_eq!(AdapterConfig::lookup(&patterns, "model.layers.0.k_proj", 8.0), 8.0);
        assert_eq!(AdapterConfig::lookup(&patterns, "model.layers.0.xq_proj", 8.0), 8.0);
    }

    #[test]
    fn conv1d_names() {
        assert!(is_conv1d("h.0.attn.c_attn") && is_conv1d("h.3.mlp.c_fc"));
        assert!(!is_conv1d("model.layers.0.self_attn.q_proj"));
    }
}
