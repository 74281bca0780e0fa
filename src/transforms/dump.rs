//! `dump`: print a summary of tensors through [`Context::emit`] in three layouts (`compact`,
//! `tree`, `json`) at three levels of detail (`shape`, `stat`, `full`). `shape` reads headers
//! only, so it prints during a plan check too; `stat` streams each tensor chunk by chunk through
//! `kernels::accumulate_stats`, and `full` prints values instead of statistics, reading only the
//! elements it prints (NumPy-like, cut with `...` beyond 1000 elements). Both are deferred in a check. Selection, statistics and values
//! are this file's; number formatting for messages stays with the callers.

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Map, Value as Json};

use super::{columns, count_noun, fmt_shape, Context, Flow, StepError, Transform, TransformSpec};
use crate::dtype::DType;
use crate::kernels::{self, Stats};
use crate::plan::error::suggest;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::Reference;
use crate::state::{Match, State};
use crate::value::{ReadContext, Tensor};
use indicatif::HumanBytes;

/// NumPy's `threshold`: tensors with more elements print only their edges.
const THRESHOLD: usize = 1000;
/// NumPy's `edgeitems`: elements kept at each end of a cut dimension.
const EDGE: usize = 3;
/// Most dimensions `full` prints nested (NumPy's limit); a tensor with more prints its values
/// flattened, as printing recurses once per dimension (issue 9: a 1,000,000-dimension tensor,
/// a 3 MB header, overflowed the stack).
const MAX_PRINTED_DIMS: usize = 64;
/// Levels of the tree layout: segments past this stay joined in the last level's name, so a
/// name of thousands of dots does not print thousands of ever deeper lines.
const TREE_DEPTH: usize = 32;
/// Significant digits of printed statistics (enough for 1e-6 relative comparisons).
const STAT_DIGITS: usize = 7;
/// Significant digits of printed values.
const VALUE_DIGITS: usize = 6;

const DUMP_FIELDS: &[Field] = &[
    Field::optional(
        "target",
        FieldKind::Reference,
        Some("all of the default alias (of every alias if there is none)"),
        "tensors to print",
    ),
    Field::optional(
        "format",
        FieldKind::Text,
        Some("compact"),
        "compact (one line per tensor, identical layers folded as `layers.[0-23].w`), tree (indented by dot \
         segments) or json (one machine-readable document)",
    ),
    Field::optional(
        "verbosity",
        FieldKind::Text,
        Some("shape"),
        "shape (name, dtype, shape; headers only), stat (plus min, max, mean, std, NaN and Inf counts, reading \
         every element) or full (plus the values instead, NumPy-like, cut with `...` beyond 1000 elements; \
         reads only the printed elements)",
    ),
];

/// `dump`.
pub const DUMP: TransformSpec = TransformSpec {
    name: "dump",
    summary: "print names, dtypes and shapes of tensors, optionally with statistics or values",
    form: super::Form::Plain,
    fields: DUMP_FIELDS,
    parse: parse_dump,
};

/// Layout of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Compact,
    Tree,
    Json,
}

/// Detail of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verbosity {
    Shape,
    Stat,
    Full,
}

fn choice<T: Copy>(p: &Payload, key: &str, options: &[(&str, T)], default: T) -> Result<T, PlanError> {
    let Some(text) = p.text(key)? else {
        return Ok(default);
    };
    if let Some((_, value)) = options.iter().find(|(name, _)| name.eq_ignore_ascii_case(text)) {
        return Ok(*value);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let hint = suggest(text, names.iter().copied())
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    Err(PlanError::invalid(
        &p.at(key),
        format!("unknown {key} `{text}`{hint} expected one of: {}", names.join(", ")),
    ))
}

fn parse_dump(value: &Json, cx: &super::ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    // `dump` alone and `dump: PATTERN` are shorthands.
    let empty = Json::Object(Map::new());
    let value = match value {
        Json::Null => &empty,
        Json::String(_) | Json::Array(_) => {
            let target = Reference::parse(value).map_err(|source| PlanError::Reference {
                location: cx.location.clone(),
                source,
            })?;
            return Ok(Box::new(Dump {
                target: Some(target),
                format: Format::Compact,
                verbosity: Verbosity::Shape,
                location: cx.location.clone(),
            }));
        }
        other => other,
    };
    let p = cx.payload(value)?;
    let target = match p.get("target") {
        Some(_) => Some(p.reference("target")?),
        None => None,
    };
    let format = choice(
        &p,
        "format",
        &[
            ("compact", Format::Compact),
            ("tree", Format::Tree),
            ("json", Format::Json),
        ],
        Format::Compact,
    )?;
    let verbosity = choice(
        &p,
        "verbosity",
        &[
            ("shape", Verbosity::Shape),
            ("stat", Verbosity::Stat),
            ("full", Verbosity::Full),
        ],
        Verbosity::Shape,
    )?;
    Ok(Box::new(Dump {
        target,
        format,
        verbosity,
        location: cx.location.clone(),
    }))
}

#[derive(Debug)]
struct Dump {
    target: Option<Reference>,
    format: Format,
    verbosity: Verbosity,
    location: Location,
}

/// The values of a tensor as printed: a nested structure whose leaves are formatted elements,
/// `None` standing for the `...` of a cut dimension.
#[derive(Debug, Clone)]
enum Values {
    /// A scalar (shape `()`).
    Scalar(Elem),
    /// One dimension of elements (the innermost).
    Row(Vec<Option<Elem>>),
    /// An outer dimension.
    Block(Vec<Option<Values>>),
}

/// One element, decoded exactly for integers.
#[derive(Debug, Clone, Copy)]
enum Elem {
    Float(f64),
    Int(i128),
    Bool(bool),
}

/// What is known about one dumped tensor.
#[derive(Debug)]
struct Item {
    /// The name as printed (with the slice of the reference, if any).
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    nbytes: u64,
    /// `None` when not computed (only `stat` computes them, in a run, for computable dtypes).
    stats: Option<Stats>,
    values: Option<Values>,
    /// The values were cut with `...`.
    truncated: bool,
}

/// One alias's selection.
#[derive(Debug)]
struct Section {
    alias: String,
    target: Option<String>,
    items: Vec<Item>,
}

impl Transform for Dump {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let selections: Vec<(String, Option<String>, Vec<Match>)> = match &self.target {
            Some(reference) => {
                let matches = state.select_some(reference, &self.location)?;
                let alias = state.alias_for(reference.alias.as_deref(), &reference.text, &self.location)?;
                vec![(alias, Some(reference.text.clone()), matches)]
            }
            None => {
                let aliases = match &state.default_alias {
                    Some(alias) if state.alias(alias).is_some() => vec![alias.clone()],
                    _ => state.alias_names(),
                };
                let mut out = Vec::new();
                for alias in aliases {
                    let mut everything = Reference::parse_str(".*").map_err(|source| PlanError::Reference {
                        location: self.location.clone(),
                        source,
                    })?;
                    everything.alias = Some(alias.clone());
                    out.push((alias, None, state.select(&everything, &self.location)?));
                }
                out
            }
        };
        let slice_text = self.target.as_ref().and_then(|r| {
            r.slice
                .as_ref()
                .and_then(|_| r.text.rfind("::[").map(|i| r.text[i..].to_owned()))
        });
        let evaluate = ctx.evaluate && self.verbosity > Verbosity::Shape;
        let mut sections = Vec::with_capacity(selections.len());
        let mut total = 0;
        for (alias, target, matches) in selections {
            let mut items = Vec::with_capacity(matches.len());
            for m in &matches {
                items.push(self.describe(m, slice_text.as_deref(), evaluate, ctx)?);
            }
            total += items.len();
            sections.push(Section { alias, target, items });
        }
        let deferred = !ctx.evaluate && self.verbosity > Verbosity::Shape;
        let text = match self.format {
            Format::Compact => render_compact(&sections, self.verbosity, deferred),
            Format::Tree => render_tree(&sections, self.verbosity, deferred),
            Format::Json => render_json(&sections, self.verbosity, deferred),
        };
        ctx.emit(text);
        ctx.note(if deferred {
            format!("dump: {}; values read when the plan runs", count_noun(total))
        } else {
            format!("dump: {}", count_noun(total))
        });
        Ok(Flow::Continue)
    }
}

impl Dump {
    fn describe(&self, m: &Match, slice: Option<&str>, evaluate: bool, ctx: &mut Context) -> Result<Item, StepError> {
        let tensor = &m.tensor;
        let mut item = Item {
            name: match slice {
                Some(s) if m.slice.is_some() => format!("{}{s}", m.name),
                _ => m.name.clone(),
            },
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
            nbytes: tensor.nbytes() as u64,
            stats: None,
            values: None,
            truncated: false,
        };
        // Carry-only dtypes (sub-byte floats, complex) have no values to summarize; they are
        // listed with their header, never an error, so `dump` works on any checkpoint.
        // Statistics read every element when the plan runs; `full` reads only the printed
        // ones, which are not counted.
        if self.verbosity == Verbosity::Stat && tensor.dtype.is_computable() {
            ctx.reads_whole([tensor]);
        } else if self.verbosity == Verbosity::Full && tensor.dtype.is_computable() {
            // A product or permutation is computed whole to print a few elements: a reader.
            ctx.log_reads([tensor]);
        }
        if !evaluate || !tensor.dtype.is_computable() {
            return Ok(item);
        }
        match self.verbosity {
            Verbosity::Shape => {}
            Verbosity::Stat => item.stats = Some(tensor.stats(&mut ctx.reads)?),
            // Only the printed elements are read (issue 9: statistics made `full` read every
            // element of every tensor).
            Verbosity::Full => {
                let truncated = tensor.numel() > THRESHOLD;
                item.values = Some(read_values(tensor, truncated, &mut ctx.reads)?);
                item.truncated = truncated;
            }
        }
        Ok(item)
    }
}

/// Indices printed along one dimension: all of them, or the edges around a `None` (`...`).
fn shown(n: usize, truncated: bool) -> Vec<Option<usize>> {
    if truncated && n > 2 * EDGE {
        (0..EDGE)
            .map(Some)
            .chain(std::iter::once(None))
            .chain((n - EDGE..n).map(Some))
            .collect()
    } else {
        (0..n).map(Some).collect()
    }
}

/// Reads only the printed elements of a tensor (a cut tensor reads a few edge runs per row).
/// A tensor of more than [`MAX_PRINTED_DIMS`] dimensions prints flattened.
fn read_values(tensor: &Tensor, truncated: bool, cx: &mut ReadContext) -> Result<Values, StepError> {
    let flat;
    let shape = if tensor.shape.len() > MAX_PRINTED_DIMS {
        flat = [tensor.numel()];
        &flat[..]
    } else {
        &tensor.shape[..]
    };
    if shape.is_empty() {
        let elems = read_run(tensor, 0, 1, cx)?;
        return Ok(Values::Scalar(elems.first().copied().unwrap_or(Elem::Float(f64::NAN))));
    }
    let strides = crate::value::strides(shape);
    read_block(tensor, shape, &strides, 0, 0, truncated, cx)
}

fn read_block(
    tensor: &Tensor,
    shape: &[usize],
    strides: &[usize],
    dim: usize,
    offset: usize,
    truncated: bool,
    cx: &mut ReadContext,
) -> Result<Values, StepError> {
    let n = shape[dim];
    let indices = shown(n, truncated);
    if dim + 1 == shape.len() {
        let mut row = Vec::with_capacity(indices.len());
        // Contiguous runs of printed indices are read at once.
        let mut i = 0;
        while i < indices.len() {
            match indices[i] {
                None => {
                    row.push(None);
                    i += 1;
                }
                Some(first) => {
                    let mut len = 1;
                    while i + len < indices.len() && indices[i + len] == Some(first + len) {
                        len += 1;
                    }
                    row.extend(read_run(tensor, offset + first, len, cx)?.into_iter().map(Some));
                    i += len;
                }
            }
        }
        return Ok(Values::Row(row));
    }
    let mut block = Vec::with_capacity(indices.len());
    for index in indices {
        block.push(match index {
            None => None,
            Some(k) => Some(read_block(
                tensor,
                shape,
                strides,
                dim + 1,
                offset + k * strides[dim],
                truncated,
                cx,
            )?),
        });
    }
    Ok(Values::Block(block))
}

fn read_run(tensor: &Tensor, start: usize, len: usize, cx: &mut ReadContext) -> Result<Vec<Elem>, StepError> {
    let size = tensor.dtype.size().expect("computable dtypes are byte-sized");
    let mut buf = cx.take(len * size);
    let result = tensor.read(start, &mut buf[..len * size], cx);
    let elems = result.map(|()| decode(tensor.dtype, &buf[..len * size]));
    cx.give(buf);
    Ok(elems?)
}

/// Decodes elements for printing; integers exactly (`to_f64_vec` would round beyond 2^53).
fn decode(dtype: DType, bytes: &[u8]) -> Vec<Elem> {
    macro_rules! ints {
        ($t:ty) => {
            bytes
                .chunks_exact(std::mem::size_of::<$t>())
                .map(|c| Elem::Int(<$t>::from_le_bytes(c.try_into().expect("exact chunk")) as i128))
                .collect()
        };
    }
    match dtype {
        DType::Bool => bytes.iter().map(|b| Elem::Bool(*b != 0)).collect(),
        DType::U8 => bytes.iter().map(|b| Elem::Int(i128::from(*b))).collect(),
        DType::I8 => ints!(i8),
        DType::I16 => ints!(i16),
        DType::U16 => ints!(u16),
        DType::I32 => ints!(i32),
        DType::U32 => ints!(u32),
        DType::I64 => ints!(i64),
        DType::U64 => ints!(u64),
        _ => kernels::to_f64_vec(dtype, bytes).into_iter().map(Elem::Float).collect(),
    }
}

/// Formats like C's `%.{digits}g` (Python's `{:.7g}`): fixed notation for exponents in
/// `[-4, digits)`, scientific otherwise, trailing zeros removed.
pub(crate) fn fmt_g(x: f64, digits: usize) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".to_owned() } else { "-inf".to_owned() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".to_owned()
        } else {
            "0".to_owned()
        };
    }
    let digits = digits.max(1);
    let sci = format!("{:.*e}", digits - 1, x);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if exponent >= -4 && exponent < digits as i32 {
        let decimals = (digits as i32 - 1 - exponent).max(0) as usize;
        trim_zeros(&format!("{x:.decimals$}"))
    } else {
        // Python's and NumPy's spelling: a sign and at least two exponent digits.
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim_zeros(mantissa), exponent.unsigned_abs())
    }
}

fn trim_zeros(text: &str) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text.to_owned()
    }
}

fn fmt_elem(e: &Elem, digits: usize) -> String {
    match e {
        Elem::Float(x) => fmt_g(*x, digits),
        Elem::Int(i) => i.to_string(),
        Elem::Bool(b) => if *b { "True" } else { "False" }.to_owned(),
    }
}

fn max_width(v: &Values, digits: usize) -> usize {
    match v {
        Values::Scalar(e) => fmt_elem(e, digits).len(),
        Values::Row(row) => row
            .iter()
            .flatten()
            .map(|e| fmt_elem(e, digits).len())
            .max()
            .unwrap_or(0),
        Values::Block(block) => block.iter().flatten().map(|b| max_width(b, digits)).max().unwrap_or(0),
    }
}

/// Whether every printed float is a whole number below 1e16 (printed exactly, like integers).
fn all_integral(v: &Values) -> bool {
    let whole = |e: &Elem| match e {
        Elem::Float(x) => !x.is_finite() || (x.fract() == 0.0 && x.abs() < 1e16),
        _ => true,
    };
    match v {
        Values::Scalar(e) => whole(e),
        Values::Row(row) => row.iter().flatten().all(whole),
        Values::Block(block) => block.iter().flatten().all(all_integral),
    }
}

/// NumPy's `str()` layout: elements right-aligned to one width, rows on their own lines, blank
/// lines between blocks of three and more dimensions.
fn render_values(v: &Values) -> String {
    // Whole numbers print exactly (17 digits cover every integer below 1e16), others with
    // VALUE_DIGITS significant digits.
    let digits = if all_integral(v) { 17 } else { VALUE_DIGITS };
    let width = max_width(v, digits);
    let ndim = depth(v);
    let mut out = String::new();
    render_into(v, 0, ndim, width, digits, &mut out);
    out
}

fn depth(v: &Values) -> usize {
    match v {
        Values::Scalar(_) => 0,
        Values::Row(_) => 1,
        Values::Block(block) => 1 + block.iter().flatten().map(depth).max().unwrap_or(1),
    }
}

fn render_into(v: &Values, level: usize, ndim: usize, width: usize, digits: usize, out: &mut String) {
    match v {
        Values::Scalar(e) => out.push_str(&fmt_elem(e, digits)),
        Values::Row(row) => {
            out.push('[');
            let cells: Vec<String> = row
                .iter()
                .map(|e| match e {
                    Some(e) => columns::pad_left(&fmt_elem(e, digits), width),
                    None => "...".to_owned(),
                })
                .collect();
            out.push_str(&cells.join(" "));
            out.push(']');
        }
        Values::Block(block) => {
            out.push('[');
            let separator = format!("{}{}", "\n".repeat(ndim - level - 1), " ".repeat(level + 1));
            for (i, child) in block.iter().enumerate() {
                if i > 0 {
                    out.push_str(&separator);
                }
                match child {
                    Some(child) => render_into(child, level + 1, ndim, width, digits, out),
                    None => out.push_str("..."),
                }
            }
            out.push(']');
        }
    }
}

fn stats_text(stats: &Stats) -> String {
    format!(
        "min={} max={} mean={} std={} nan={} inf={}",
        fmt_g(stats.min, STAT_DIGITS),
        fmt_g(stats.max, STAT_DIGITS),
        fmt_g(stats.mean(), STAT_DIGITS),
        fmt_g(stats.std(), STAT_DIGITS),
        stats.nan_count,
        stats.inf_count
    )
}

/// The part of a line after the name: dtype, shape and, when computed, statistics.
fn detail_columns(item: &Item, verbosity: Verbosity, deferred: bool) -> Detail {
    let extra = match (verbosity, &item.stats, &item.values) {
        _ if deferred => String::new(),
        (Verbosity::Shape, _, _) | (Verbosity::Full, _, Some(_)) => String::new(),
        (Verbosity::Stat, Some(stats), _) => stats_text(stats),
        (Verbosity::Stat, None, _) => format!("(no statistics: {} values are carried through only)", item.dtype),
        (Verbosity::Full, _, None) => format!("(no values: {} values are carried through only)", item.dtype),
    };
    (item.dtype.name().to_owned(), fmt_shape(&item.shape), extra)
}

/// The section's bytes; saturating, as a figure to show (each tensor fits, their sum may not).
fn section_bytes(section: &Section) -> u64 {
    section.items.iter().fold(0u64, |sum, i| sum.saturating_add(i.nbytes))
}

fn section_header(section: &Section, deferred: bool) -> String {
    let bytes = section_bytes(section);
    let mut line = match &section.target {
        Some(target) => format!("`{target}` in {}", section.alias),
        None => section.alias.clone(),
    };
    line.push_str(&format!(": {}, {}", count_noun(section.items.len()), HumanBytes(bytes)));
    if deferred {
        line.push_str(" (statistics and values are read when the plan runs)");
    }
    line
}

/// What a line prints after the name: dtype, shape, statistics.
pub(crate) type Detail = (String, String, String);

/// A printed line: name, detail, and the values block beneath it.
type Line = (String, Detail, Option<String>);

/// Rows fold when everything but one numeric segment is equal.
type FoldKey = (Vec<Option<Seg>>, Detail, Option<String>);

/// A name segment for folding: text, or a set of layer numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Seg {
    Text(String),
    Nums(BTreeSet<u64>),
}

/// A canonical decimal number (`0`, `17`; not `007`, which would not print back the same).
fn number(segment: &str) -> Option<u64> {
    let canonical = segment == "0" || (!segment.starts_with('0') && segment.bytes().all(|b| b.is_ascii_digit()));
    if canonical && !segment.is_empty() {
        segment.parse().ok()
    } else {
        None
    }
}

fn segments(name: &str) -> Vec<Seg> {
    name.split('.')
        .map(|s| match number(s) {
            Some(n) => Seg::Nums(BTreeSet::from([n])),
            None => Seg::Text(s.to_owned()),
        })
        .collect()
}

/// `[0-3,5,7-9]` (a single number prints bare).
fn fmt_set(set: &BTreeSet<u64>) -> String {
    if set.len() == 1 {
        return set.iter().next().map(u64::to_string).unwrap_or_default();
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &n in set {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => runs.push((n, n)),
        }
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect();
    format!("[{}]", parts.join(","))
}

fn fmt_segments(segs: &[Seg]) -> String {
    segs.iter()
        .map(|s| match s {
            Seg::Text(t) => t.clone(),
            Seg::Nums(set) => fmt_set(set),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A row of the compact layout: a (possibly folded) name and the printed detail it shares.
#[derive(Debug)]
struct Row {
    segs: Vec<Seg>,
    /// Everything printed after the name; rows fold only when it is identical.
    detail: Detail,
    values: Option<String>,
    first: usize,
}

/// Folds rows that differ only in one numeric segment and print the same detail, position by
/// position from the last, until nothing changes: `h.0.w` … `h.23.w` become `h.[0-23].w`, and
/// `layers.i.experts.j.w` over a full grid becomes `layers.[0-23].experts.[0-7].w`.
fn fold(mut rows: Vec<Row>) -> Vec<Row> {
    loop {
        let before = rows.len();
        let longest = rows.iter().map(|r| r.segs.len()).max().unwrap_or(0);
        for p in (0..longest).rev() {
            let mut merged: Vec<Row> = Vec::with_capacity(rows.len());
            let mut index: HashMap<FoldKey, usize> = HashMap::new();
            for row in rows {
                let Some(Seg::Nums(_)) = row.segs.get(p) else {
                    merged.push(row);
                    continue;
                };
                let key_segs: Vec<Option<Seg>> = row
                    .segs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i != p).then(|| s.clone()))
                    .collect();
                let key = (key_segs, row.detail.clone(), row.values.clone());
                match index.get(&key) {
                    Some(&at) => {
                        if let (Some(Seg::Nums(into)), Some(Seg::Nums(from))) =
                            (merged[at].segs.get_mut(p), row.segs.get(p))
                        {
                            into.extend(from.iter().copied());
                        }
                        merged[at].first = merged[at].first.min(row.first);
                    }
                    None => {
                        index.insert(key, merged.len());
                        merged.push(row);
                    }
                }
            }
            rows = merged;
        }
        if rows.len() == before {
            break;
        }
    }
    rows.sort_by_key(|r| r.first);
    rows
}

/// Folds names as the compact layout does (see [`fold`]), for `brainsurgery inspect
/// --compact`: each item is a name and the detail that must be equal to fold; returns the folded
/// name, the index of its first item and how many items it stands for.
pub(crate) fn fold_names(items: &[(&str, Detail)]) -> Vec<(String, usize, u64)> {
    let rows = items
        .iter()
        .enumerate()
        .map(|(i, (name, detail))| Row {
            segs: segments(name),
            detail: detail.clone(),
            values: None,
            first: i,
        })
        .collect();
    fold(rows)
        .into_iter()
        .map(|r| {
            // A folded row is the full product of its number sets (rows fold only when
            // everything else is equal).
            let count = r
                .segs
                .iter()
                .map(|s| match s {
                    Seg::Nums(set) => set.len() as u64,
                    Seg::Text(_) => 1,
                })
                .product();
            (fmt_segments(&r.segs), r.first, count)
        })
        .collect()
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A name cell: its leading indentation, then the name shortened to [`columns::MAX_CELL`].
fn name_cell(name: &str) -> String {
    let text = name.trim_start_matches(' ');
    format!("{}{}", &name[..name.len() - text.len()], columns::cell(text))
}

/// Lines of `name  dtype  shape  stats`, columns aligned; names and shapes longer than
/// [`columns::MAX_CELL`] are shortened in the middle (`json` keeps them whole).
fn aligned(lines: &[Line], values_indent: usize) -> Vec<String> {
    let cells: Vec<[String; 3]> = lines
        .iter()
        .map(|(name, (dtype, shape, _), _)| [name_cell(name), columns::cell(dtype), columns::cell(shape)])
        .collect();
    let w: [usize; 3] = std::array::from_fn(|i| columns::width(cells.iter().map(|c| c[i].as_str())));
    let mut out = Vec::new();
    for ([name, dtype, shape], (_, (_, _, extra), values)) in cells.iter().zip(lines) {
        let line = format!(
            "{}  {}  {}  {extra}",
            columns::pad_right(name, w[0]),
            columns::pad_right(dtype, w[1]),
            columns::pad_right(shape, w[2])
        );
        out.push(line.trim_end().to_owned());
        if let Some(values) = values {
            out.push(indent(values, values_indent));
        }
    }
    out
}

fn render_compact(sections: &[Section], verbosity: Verbosity, deferred: bool) -> String {
    let mut out = Vec::new();
    for section in sections {
        out.push(section_header(section, deferred));
        let rows: Vec<Row> = section
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| Row {
                segs: segments(&item.name),
                detail: detail_columns(item, verbosity, deferred),
                values: item.values.as_ref().map(render_values),
                first: i,
            })
            .collect();
        let lines: Vec<_> = fold(rows)
            .into_iter()
            .map(|r| (format!("  {}", fmt_segments(&r.segs)), r.detail, r.values))
            .collect();
        out.extend(aligned(&lines, 4));
    }
    out.join("\n")
}

/// A node of the tree layout.
#[derive(Debug, Default)]
struct Node {
    children: Vec<(String, Node)>,
    /// Where each child is in `children`, while the tree is built (a linear search made a
    /// 100,000-tensor flat checkpoint quadratic).
    index: HashMap<String, usize>,
    item: Option<usize>,
}

impl Node {
    fn insert(&mut self, path: &[&str], item: usize) {
        match path.split_first() {
            None => self.item = Some(item),
            Some((head, rest)) => {
                let at = match self.index.get(*head) {
                    Some(&at) => at,
                    None => {
                        self.index.insert((*head).to_owned(), self.children.len());
                        self.children.push(((*head).to_owned(), Node::default()));
                        self.children.len() - 1
                    }
                };
                self.children[at].1.insert(rest, item);
            }
        }
    }

    /// Numeric children take the place of the first one among them, in numeric order; the
    /// others keep their first-seen order.
    fn sort(&mut self) {
        self.index = HashMap::new();
        let first_numeric = self.children.iter().position(|(s, _)| number(s).is_some());
        if let Some(first) = first_numeric {
            let key = |(i, (s, _)): &(usize, &(String, Node))| match number(s) {
                Some(n) => (first, n),
                None => (*i, 0),
            };
            let mut order: Vec<(usize, &(String, Node))> = self.children.iter().enumerate().collect();
            order.sort_by_key(key);
            let order: Vec<usize> = order.into_iter().map(|(i, _)| i).collect();
            let mut taken: Vec<Option<(String, Node)>> =
                std::mem::take(&mut self.children).into_iter().map(Some).collect();
            self.children = order.into_iter().filter_map(|i| taken[i].take()).collect();
        }
        for (_, child) in &mut self.children {
            child.sort();
        }
    }
}

fn tree_lines(node: &Node, level: usize, items: &[Item], verbosity: Verbosity, deferred: bool, out: &mut Vec<Line>) {
    for (segment, child) in &node.children {
        let name = format!("{}{segment}", "  ".repeat(level + 1));
        match child.item.and_then(|i| items.get(i)) {
            Some(item) => out.push((
                name,
                detail_columns(item, verbosity, deferred),
                item.values.as_ref().map(|v| indent(&render_values(v), 2 * (level + 2))),
            )),
            None => out.push((name, Default::default(), None)),
        }
        tree_lines(child, level + 1, items, verbosity, deferred, out);
    }
}

fn render_tree(sections: &[Section], verbosity: Verbosity, deferred: bool) -> String {
    let mut out = Vec::new();
    for section in sections {
        out.push(section_header(section, deferred));
        let mut root = Node::default();
        for (i, item) in section.items.iter().enumerate() {
            let path: Vec<&str> = item.name.splitn(TREE_DEPTH, '.').collect();
            root.insert(&path, i);
        }
        root.sort();
        let mut lines = Vec::new();
        tree_lines(&root, 0, &section.items, verbosity, deferred, &mut lines);
        out.extend(aligned(&lines, 0));
    }
    out.join("\n")
}

/// A number for JSON; non-finite values (which JSON cannot hold) become "nan", "inf", "-inf".
pub(crate) fn json_number(x: f64) -> Json {
    if x.is_finite() {
        json!(x)
    } else {
        json!(fmt_g(x, 1))
    }
}

fn json_values(v: &Values) -> Json {
    let elem = |e: &Elem| match e {
        Elem::Float(x) => json_number(*x),
        Elem::Int(i) => i64::try_from(*i).map_or_else(|_| json!(*i as u64), |i| json!(i)),
        Elem::Bool(b) => json!(b),
    };
    match v {
        Values::Scalar(e) => elem(e),
        Values::Row(row) => Json::Array(row.iter().map(|e| e.as_ref().map_or(json!("..."), elem)).collect()),
        Values::Block(block) => Json::Array(
            block
                .iter()
                .map(|c| c.as_ref().map_or(json!("..."), json_values))
                .collect(),
        ),
    }
}

fn render_json(sections: &[Section], verbosity: Verbosity, deferred: bool) -> String {
    let verbosity_name = match verbosity {
        Verbosity::Shape => "shape",
        Verbosity::Stat => "stat",
        Verbosity::Full => "full",
    };
    let aliases: Vec<Json> = sections
        .iter()
        .map(|section| {
            let tensors: Vec<Json> = section
                .items
                .iter()
                .map(|item| {
                    let mut t = Map::new();
                    t.insert("name".into(), json!(item.name));
                    t.insert("dtype".into(), json!(item.dtype.name()));
                    t.insert("shape".into(), json!(item.shape));
                    t.insert("nbytes".into(), json!(item.nbytes));
                    if verbosity == Verbosity::Stat && !deferred {
                        let stats = item.stats.as_ref().map_or(Json::Null, |s| {
                            json!({
                                "count": s.count,
                                "min": json_number(s.min),
                                "max": json_number(s.max),
                                "mean": json_number(s.mean()),
                                "std": json_number(s.std()),
                                "nan": s.nan_count,
                                "inf": s.inf_count,
                            })
                        });
                        t.insert("stats".into(), stats);
                    }
                    if verbosity == Verbosity::Full && !deferred {
                        t.insert("values".into(), item.values.as_ref().map_or(Json::Null, json_values));
                        t.insert("truncated".into(), json!(item.truncated));
                    }
                    Json::Object(t)
                })
                .collect();
            json!({
                "alias": section.alias,
                "target": section.target,
                "count": section.items.len(),
                "nbytes": section_bytes(section),
                "tensors": tensors,
            })
        })
        .collect();
    json!({
        "verbosity": verbosity_name,
        "deferred": deferred,
        "aliases": aliases,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, detail: &str) -> Row {
        Row {
            segs: segments(name),
            detail: (detail.to_owned(), String::new(), String::new()),
            values: None,
            first: 0,
        }
    }

    fn folded(names: &[(&str, &str)]) -> Vec<String> {
        let rows = names
            .iter()
            .enumerate()
            .map(|(i, (n, d))| Row { first: i, ..row(n, d) })
            .collect();
        fold(rows).iter().map(|r| fmt_segments(&r.segs)).collect()
    }

    #[test]
    fn folds_layers_with_gaps_and_keeps_others() {
        let mut names: Vec<(String, &str)> = Vec::new();
        for i in [0, 1, 2, 3, 5, 7, 8, 9] {
            names.push((format!("layers.{i}.mlp.w"), "f32 (4,)"));
        }
        names.push(("layers.4.mlp.w".into(), "f16 (4,)"));
        names.push(("wte".into(), "f32 (2,)"));
        let refs: Vec<(&str, &str)> = names.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        assert_eq!(folded(&refs), vec!["layers.[0-3,5,7-9].mlp.w", "layers.4.mlp.w", "wte"]);
    }

    #[test]
    fn folds_grids_and_keeps_leading_zeros_literal() {
        let mut names = Vec::new();
        for i in 0..3 {
            for j in 0..2 {
                names.push(format!("l.{i}.e.{j}.w"));
            }
        }
        names.push("x.007".into());
        names.push("x.008".into());
        let refs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "d")).collect();
        assert_eq!(folded(&refs), vec!["l.[0-2].e.[0-1].w", "x.007", "x.008"]);
    }

    /// A lazy value that counts the elements read from it.
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl crate::value::LazyOp for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn read(
            &self,
            _dtype: DType,
            _shape: &[usize],
            start: usize,
            out: &mut [u8],
            _cx: &mut ReadContext,
        ) -> Result<(), crate::value::ValueError> {
            self.0.fetch_add(out.len() / 4, std::sync::atomic::Ordering::Relaxed);
            for (i, c) in out.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&((start + i) as f32).to_le_bytes());
            }
            Ok(())
        }
    }

    #[test]
    fn full_reads_only_the_printed_elements() {
        let op = std::sync::Arc::new(Counting::default());
        let tensor = Tensor::op(DType::F32, vec![1000, 2000], op.clone()).unwrap();
        let values = read_values(&tensor, true, &mut ReadContext::default()).unwrap();
        assert_eq!(op.0.load(std::sync::atomic::Ordering::Relaxed), 36);
        let text = render_values(&values);
        assert!(
            text.starts_with("[[      0       1       2 ...    1997    1998    1999]\n"),
            "{text}"
        );
        assert!(text.contains("\n ...\n"), "{text}");
        assert!(
            text.ends_with(" [1998000 1998001 1998002 ... 1999997 1999998 1999999]]"),
            "{text}"
        );
    }

    /// Issue 9 item 11d: `full` also computed statistics, reading every element of every tensor.
    #[test]
    fn full_dump_reads_only_what_it_prints_and_stat_reads_everything() {
        for (verbosity, reads, shows) in [
            (Verbosity::Full, 36, "1999999]]"),
            (Verbosity::Stat, 2_000_000, "max=1999999"),
        ] {
            let op = std::sync::Arc::new(Counting::default());
            let mut state = State::default();
            state.insert("m", "t", Tensor::op(DType::F32, vec![1000, 2000], op.clone()).unwrap());
            state.default_alias = Some("m".into());
            let dump = Dump {
                target: None,
                format: Format::Compact,
                verbosity,
                location: Location::root(),
            };
            let mut ctx = Context::new(true, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
            dump.apply(&mut state, &mut ctx).unwrap();
            assert_eq!(op.0.load(std::sync::atomic::Ordering::Relaxed), reads, "{verbosity:?}");
            let text = &ctx.output[0];
            assert!(text.contains(shows), "{text}");
            assert_eq!(text.contains("min="), verbosity == Verbosity::Stat, "{text}");
        }
    }

    #[test]
    fn g_format() {
        assert_eq!(fmt_g(0.1234567891, 7), "0.1234568");
        assert_eq!(fmt_g(1234567.0, 7), "1234567");
        assert_eq!(fmt_g(12345678.0, 7), "1.234568e+07");
        assert_eq!(fmt_g(1e-5, 7), "1e-05");
        assert_eq!(fmt_g(2.5e-300, 7), "2.5e-300");
        assert_eq!(fmt_g(-2.0, 6), "-2");
        assert_eq!(fmt_g(f64::NEG_INFINITY, 6), "-inf");
    }

    #[test]
    fn unknown_format_is_a_plan_error_with_a_suggestion() {
        let location = Location::root().key("transforms").index(0).key("dump");
        let err = parse_dump(
            &json!({"format": "tre"}),
            &crate::transforms::test_support::context(&DUMP, &location),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("transforms[0].dump.format") && err.contains("did you mean `tree`"),
            "{err}"
        );
    }
}
