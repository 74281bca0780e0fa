//! `assert`: built-in assertions (SPEC §5). Header assertions (`exists`, `count`, `shape`,
//! `dimensions`, `dtype`) are decided during the plan check; value assertions (`equal`, `iszero`,
//! `finite`) stream the tensors they need at their point in the plan, and are reported as
//! deferred by the check. `reads` and `writes` count the steps that read or wrote each match so
//! far ([`crate::state::Access`]), from the plan alone, so a check decides them. Zero matches are a value (`count … is: 0` passes); an invalid pattern
//! or unknown alias is an error even under `not`.

use serde_json::Value;

use super::{AssertionFailure, Context, Flow, StepError, Transform, TransformError, TransformSpec};
use crate::dtype::DType;
use crate::kernels::{self, Stats};
use crate::plan::document::kind_of;
use crate::plan::error::suggest;
use crate::plan::payload::{parse_dtype, Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::transforms::fmt_shape;
use crate::value::{stream, Tensor};

/// `assert`.
pub const ASSERT: TransformSpec = TransformSpec {
    name: "assert",
    summary: "fail the run when an expression is false (exists, count, shape, dimensions, dtype, equal, iszero, finite, reads, writes, all, any, not)",
    form: super::Form::Plain,
    fields: &[],
    parse: |value, cx| {
        Ok(Box::new(Assert {
            expr: Expr::parse(value, &cx.location)?,
            location: cx.location.clone(),
        }))
    },
};

/// The assertion operators and their keys, for parsing and help.
pub const OPERATORS: &[(&str, &[Field])] = &[
    (
        "exists",
        &[Field::required(
            "of",
            FieldKind::Reference,
            "tensors that must exist (or give the reference directly)",
        )],
    ),
    (
        "count",
        &[
            Field::required("of", FieldKind::Reference, "tensors to count"),
            Field::required("is", FieldKind::Number, "the required count"),
        ],
    ),
    (
        "shape",
        &[
            Field::required("of", FieldKind::Reference, "tensors to check"),
            Field::required("is", FieldKind::Shape, "the required shape, a list"),
        ],
    ),
    (
        "dimensions",
        &[
            Field::required("of", FieldKind::Reference, "tensors to check"),
            Field::optional("is", FieldKind::Number, None, "exactly this many dimensions"),
            Field::optional("ge", FieldKind::Number, None, "at least"),
            Field::optional("gt", FieldKind::Number, None, "more than"),
            Field::optional("le", FieldKind::Number, None, "at most"),
            Field::optional("lt", FieldKind::Number, None, "fewer than"),
        ],
    ),
    (
        "dtype",
        &[
            Field::required("of", FieldKind::Reference, "tensors to check"),
            Field::required("is", FieldKind::DType, "the required dtype"),
        ],
    ),
    (
        "equal",
        &[
            Field::required("left", FieldKind::Reference, "tensors compared"),
            Field::required(
                "right",
                FieldKind::Target,
                "the tensor each left match is compared with (a rewrite; aliases may differ)",
            ),
            Field::optional("eps", FieldKind::Number, Some("0"), "largest allowed |a - b|"),
        ],
    ),
    (
        "iszero",
        &[
            Field::required(
                "of",
                FieldKind::Reference,
                "tensors that must be zero (or give the reference directly)",
            ),
            Field::optional("eps", FieldKind::Number, Some("0"), "largest allowed |x|"),
        ],
    ),
    (
        "finite",
        &[Field::required(
            "of",
            FieldKind::Reference,
            "tensors that must hold no NaN or Inf (or give the reference directly)",
        )],
    ),
    ("reads", ACCESS_FIELDS),
    ("writes", ACCESS_FIELDS),
    ("all", &[]),
    ("any", &[]),
    ("not", &[]),
];

/// The keys of `reads` and `writes` (the 0.2 tool's; `at_least` / `at_most` are its other names
/// for `ge` / `le`).
const ACCESS_FIELDS: &[Field] = &[
    Field::required("of", FieldKind::Reference, "tensors to check"),
    Field::optional("is", FieldKind::Number, None, "exactly this many times"),
    Field::optional("ge", FieldKind::Number, None, "at least"),
    Field::optional("gt", FieldKind::Number, None, "more than"),
    Field::optional("le", FieldKind::Number, None, "at most"),
    Field::optional("lt", FieldKind::Number, None, "fewer than"),
    Field::optional("at_least", FieldKind::Number, None, "at least (as `ge`)"),
    Field::optional("at_most", FieldKind::Number, None, "at most (as `le`)"),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Comparison {
    Is,
    Ge,
    Gt,
    Le,
    Lt,
}

#[derive(Debug)]
enum Expr {
    Exists(Reference),
    Count {
        of: Reference,
        is: usize,
    },
    Shape {
        of: Reference,
        is: Vec<usize>,
    },
    Dimensions {
        of: Reference,
        comparison: Comparison,
        n: usize,
    },
    DType {
        of: Reference,
        is: DType,
    },
    Equal {
        left: Reference,
        right: Target,
        eps: f64,
    },
    IsZero {
        of: Reference,
        eps: f64,
    },
    Finite {
        of: Reference,
    },
    /// `reads` / `writes`: how often steps so far read or wrote each match.
    Access {
        of: Reference,
        writes: bool,
        comparison: Comparison,
        n: usize,
    },
    All(Vec<Expr>),
    Any(Vec<Expr>),
    Not(Box<Expr>),
}

/// The result of evaluating an assertion.
#[derive(Debug)]
enum Outcome {
    Pass,
    Fail(AssertionFailure),
    /// Needs tensor values, which the header-only check does not read.
    Deferred,
}

fn fail(assertion: &str, tensor: Option<String>, message: impl Into<String>) -> Outcome {
    Outcome::Fail(AssertionFailure {
        assertion: assertion.to_owned(),
        tensor,
        message: message.into(),
    })
}

fn reference_or_of(
    value: &Value,
    op: &'static str,
    fields: &[Field],
    location: &Location,
) -> Result<(Reference, Option<f64>), PlanError> {
    match value {
        Value::String(_) | Value::Array(_) => {
            let reference = Reference::parse(value).map_err(|source| PlanError::Reference {
                location: location.clone(),
                source,
            })?;
            Ok((reference, None))
        }
        // A structured reference mapping has `path`; an operator payload has `of`.
        Value::Object(map) if map.contains_key("path") && !map.contains_key("of") => {
            let reference = Reference::parse(value).map_err(|source| PlanError::Reference {
                location: location.clone(),
                source,
            })?;
            Ok((reference, None))
        }
        _ => {
            let p = Payload::new(value, fields, location.clone())?;
            let eps = if op == "iszero" { p.number("eps")? } else { None };
            Ok((p.reference("of")?, eps))
        }
    }
}

fn eps_of(p: &Payload) -> Result<f64, PlanError> {
    let eps = p.number("eps")?.unwrap_or(0.0);
    if eps.is_nan() || eps < 0.0 {
        return Err(PlanError::invalid(&p.at("eps"), "eps must be ≥ 0"));
    }
    Ok(eps)
}

/// The one bound of `dimensions`, `reads` or `writes` (`is`, `ge`, `gt`, `le`, `lt`; the
/// 0.2 tool's `at_least` / `at_most` where the table has them).
fn comparison_of(p: &Payload, op: &str, at: &Location) -> Result<(Comparison, usize), PlanError> {
    let mut given = Vec::new();
    for (key, comparison) in [
        ("is", Comparison::Is),
        ("ge", Comparison::Ge),
        ("gt", Comparison::Gt),
        ("le", Comparison::Le),
        ("lt", Comparison::Lt),
        ("at_least", Comparison::Ge),
        ("at_most", Comparison::Le),
    ] {
        if p.get(key).is_some() {
            given.push((key, comparison, p.count(key)?.expect("present")));
        }
    }
    match given[..] {
        [(_, comparison, n)] => Ok((comparison, n)),
        _ => Err(PlanError::invalid(
            at,
            format!(
                "{op} takes exactly one of is, ge, gt, le, lt{}",
                if op == "dimensions" { "" } else { ", at_least, at_most" }
            ),
        )),
    }
}

impl Comparison {
    /// Whether `value` satisfies the bound `n`, and the words for the bound.
    fn holds(self, value: usize, n: usize) -> (bool, &'static str) {
        match self {
            Comparison::Is => (value == n, "exactly"),
            Comparison::Ge => (value >= n, "at least"),
            Comparison::Gt => (value > n, "more than"),
            Comparison::Le => (value <= n, "at most"),
            Comparison::Lt => (value < n, "fewer than"),
        }
    }
}

impl Expr {
    fn parse(value: &Value, location: &Location) -> Result<Expr, PlanError> {
        let Value::Object(map) = value else {
            return Err(PlanError::invalid(
                location,
                format!(
                    "expected an assertion such as `exists: pattern`, got {}",
                    kind_of(value)
                ),
            ));
        };
        let names: Vec<&str> = OPERATORS.iter().map(|(n, _)| *n).collect();
        let mut entries = map.iter();
        let (Some((op, payload)), None) = (entries.next(), entries.next()) else {
            return Err(PlanError::invalid(
                location,
                format!(
                    "an assertion is a mapping with exactly one operator ({})",
                    names.join(", ")
                ),
            ));
        };
        let Some((op, fields)) = OPERATORS.iter().find(|(n, _)| n == op).copied() else {
            return Err(PlanError::UnknownKey {
                location: location.clone(),
                key: op.clone(),
                suggestion: suggest(op, names.iter().copied()),
                expected: names.iter().map(|s| s.to_string()).collect(),
            });
        };
        let at = location.key(op);
        let list = |payload: &Value| -> Result<Vec<Expr>, PlanError> {
            let Value::Array(items) = payload else {
                return Err(PlanError::invalid(
                    &at,
                    format!("`{op}` takes a list of assertions, got {}", kind_of(payload)),
                ));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, item)| Expr::parse(item, &at.index(i)))
                .collect()
        };
        Ok(match op {
            "exists" => Expr::Exists(reference_or_of(payload, op, fields, &at)?.0),
            "finite" => Expr::Finite {
                of: reference_or_of(payload, op, fields, &at)?.0,
            },
            "iszero" => {
                let (of, eps) = reference_or_of(payload, op, fields, &at)?;
                let eps = eps.unwrap_or(0.0);
                if eps.is_nan() || eps < 0.0 {
                    return Err(PlanError::invalid(&at.key("eps"), "eps must be ≥ 0"));
                }
                Expr::IsZero { of, eps }
            }
            "count" => {
                let p = Payload::new(payload, fields, at.clone())?;
                let is = p.count("is")?.expect("required key");
                Expr::Count {
                    of: p.reference("of")?,
                    is,
                }
            }
            "shape" => {
                let p = Payload::new(payload, fields, at.clone())?;
                Expr::Shape {
                    of: p.reference("of")?,
                    is: p.shape("is")?.expect("required key"),
                }
            }
            "dimensions" => {
                let p = Payload::new(payload, fields, at.clone())?;
                let (comparison, n) = comparison_of(&p, op, &at)?;
                Expr::Dimensions {
                    of: p.reference("of")?,
                    comparison,
                    n,
                }
            }
            "reads" | "writes" => {
                let p = Payload::new(payload, fields, at.clone())?;
                let (comparison, n) = comparison_of(&p, op, &at)?;
                Expr::Access {
                    of: p.reference("of")?,
                    writes: op == "writes",
                    comparison,
                    n,
                }
            }
            "dtype" => {
                let p = Payload::new(payload, fields, at.clone())?;
                let name = p.text("is")?.expect("required key");
                Expr::DType {
                    of: p.reference("of")?,
                    is: parse_dtype(name, &p.at("is"))?,
                }
            }
            "equal" => {
                let p = Payload::new(payload, fields, at.clone())?;
                Expr::Equal {
                    left: p.reference("left")?,
                    right: p.target("right")?,
                    eps: eps_of(&p)?,
                }
            }
            "all" => Expr::All(list(payload)?),
            "any" => Expr::Any(list(payload)?),
            "not" => Expr::Not(Box::new(Expr::parse(payload, &at)?)),
            _ => unreachable!("every operator in OPERATORS is handled"),
        })
    }

    fn evaluate(&self, state: &State, ctx: &mut Context, location: &Location) -> Result<Outcome, StepError> {
        match self {
            Expr::Exists(of) => {
                let matches = state.select_quiet(of, location)?;
                Ok(if matches.is_empty() {
                    fail("exists", None, format!("nothing matches `{}`", of.text))
                } else {
                    Outcome::Pass
                })
            }
            Expr::Count { of, is } => {
                let n = state.select_quiet(of, location)?.len();
                Ok(if n == *is {
                    Outcome::Pass
                } else {
                    fail(
                        "count",
                        None,
                        format!("`{}` matches {n} tensors, expected {is}", of.text),
                    )
                })
            }
            Expr::Shape { of, is } => each_match(state, of, location, "shape", |m| {
                (m.tensor.shape != *is)
                    .then(|| format!("shape is {}, expected {}", fmt_shape(&m.tensor.shape), fmt_shape(is)))
            }),
            Expr::Dimensions { of, comparison, n } => each_match(state, of, location, "dimensions", |m| {
                let d = m.tensor.shape.len();
                let (ok, word) = comparison.holds(d, *n);
                (!ok).then(|| format!("has {d} dimensions, expected {word} {n}"))
            }),
            Expr::Access {
                of,
                writes,
                comparison,
                n,
            } => {
                // Counted from the plan's steps alone, so a check decides it too.
                let (assertion, what) = if *writes {
                    ("writes", "written")
                } else {
                    ("reads", "read")
                };
                let matches = state.select_quiet(of, location)?;
                if matches.is_empty() {
                    return Ok(fail(assertion, None, format!("nothing matches `{}`", of.text)));
                }
                for m in &matches {
                    let access = state.access(&m.alias, &m.name);
                    let count = if *writes { access.writes } else { access.reads };
                    let count = usize::try_from(count).unwrap_or(usize::MAX);
                    let (ok, word) = comparison.holds(count, *n);
                    if !ok {
                        return Ok(fail(
                            assertion,
                            Some(m.display()),
                            format!("{what} {count} times, expected {word} {n}"),
                        ));
                    }
                }
                Ok(Outcome::Pass)
            }
            Expr::DType { of, is } => each_match(state, of, location, "dtype", |m| {
                (m.tensor.dtype != *is).then(|| format!("dtype is {}, expected {is}", m.tensor.dtype))
            }),
            Expr::Equal { left, right, eps } => evaluate_equal(state, ctx, location, left, right, *eps),
            Expr::IsZero { of, eps } => evaluate_values(state, ctx, location, of, "iszero", |stats| {
                let max = stats.max_abs;
                if stats.nan_count > 0 {
                    Some(format!("holds {} NaN values", stats.nan_count))
                } else {
                    (max > *eps).then(|| format!("max |x| = {max:e} > eps {eps:e}"))
                }
            }),
            Expr::Finite { of } => evaluate_values(state, ctx, location, of, "finite", |stats| {
                (stats.nan_count + stats.inf_count > 0)
                    .then(|| format!("holds {} NaN and {} infinite values", stats.nan_count, stats.inf_count))
            }),
            // Every item is evaluated, decided or not: the check (which defers values) and the
            // run then select, and count as read, the same tensors (`reads`).
            Expr::All(items) => {
                let mut deferred = false;
                let mut failed = None;
                for item in items {
                    match item.evaluate(state, ctx, location)? {
                        Outcome::Pass => {}
                        Outcome::Deferred => deferred = true,
                        outcome @ Outcome::Fail(_) => {
                            failed.get_or_insert(outcome);
                        }
                    }
                }
                Ok(match failed {
                    Some(failed) => failed,
                    None if deferred => Outcome::Deferred,
                    None => Outcome::Pass,
                })
            }
            Expr::Any(items) => {
                let mut deferred = false;
                let mut passed = false;
                let mut failures = Vec::new();
                for item in items {
                    match item.evaluate(state, ctx, location)? {
                        Outcome::Pass => passed = true,
                        Outcome::Deferred => deferred = true,
                        Outcome::Fail(f) => failures.push(f.to_string()),
                    }
                }
                if passed {
                    return Ok(Outcome::Pass);
                }
                Ok(if deferred {
                    Outcome::Deferred
                } else {
                    fail(
                        "any",
                        None,
                        format!("none of {} held: {}", items.len(), failures.join("; ")),
                    )
                })
            }
            Expr::Not(inner) => Ok(match inner.evaluate(state, ctx, location)? {
                Outcome::Pass => fail("not", None, "the negated assertion held"),
                Outcome::Fail(_) => Outcome::Pass,
                Outcome::Deferred => Outcome::Deferred,
            }),
        }
    }
}

/// Header checks over every match; zero matches fail.
fn each_match(
    state: &State,
    of: &Reference,
    location: &Location,
    assertion: &str,
    check: impl Fn(&Match) -> Option<String>,
) -> Result<Outcome, StepError> {
    let matches = state.select(of, location)?;
    if matches.is_empty() {
        return Ok(fail(assertion, None, format!("nothing matches `{}`", of.text)));
    }
    for m in &matches {
        if let Some(message) = check(m) {
            return Ok(fail(assertion, Some(m.display()), message));
        }
    }
    Ok(Outcome::Pass)
}

fn require_values(m: &Match, op: &'static str) -> Result<(), TransformError> {
    if m.tensor.dtype.is_computable() {
        Ok(())
    } else {
        Err(TransformError::Unsupported {
            op,
            tensor: m.display(),
            dtype: m.tensor.dtype,
        })
    }
}

/// Statistics of each match, streamed; zero matches fail.
fn evaluate_values(
    state: &State,
    ctx: &mut Context,
    location: &Location,
    of: &Reference,
    assertion: &'static str,
    check: impl Fn(&Stats) -> Option<String>,
) -> Result<Outcome, StepError> {
    let matches = state.select(of, location)?;
    if matches.is_empty() {
        return Ok(fail(assertion, None, format!("nothing matches `{}`", of.text)));
    }
    for m in &matches {
        require_values(m, assertion)?;
    }
    ctx.reads_whole(matches.iter().map(|m| &m.tensor));
    if !ctx.evaluate {
        return Ok(Outcome::Deferred);
    }
    for m in &matches {
        let stats = m.tensor.stats(&mut ctx.reads)?;
        if let Some(message) = check(&stats) {
            return Ok(fail(assertion, Some(m.display()), message));
        }
    }
    Ok(Outcome::Pass)
}

fn evaluate_equal(
    state: &State,
    ctx: &mut Context,
    location: &Location,
    left: &Reference,
    right: &Target,
    eps: f64,
) -> Result<Outcome, StepError> {
    let matches = state.select(left, location)?;
    if matches.is_empty() {
        return Ok(fail("equal", None, format!("nothing matches `{}`", left.text)));
    }
    let mut pairs: Vec<(&Match, Tensor, String)> = Vec::with_capacity(matches.len());
    for m in &matches {
        let name = right.expand(&m.captures).map_err(|source| TransformError::Template {
            tensor: m.display(),
            source,
        })?;
        let alias = state.alias_for(right.alias.as_deref().or(Some(&m.alias)), &right.text, location)?;
        let display = format!("{alias}::{name}");
        if state.get(&alias, &name).is_some() {
            state.count_reads(&alias, [name.as_str()]);
        }
        let Some(tensor) = state.get(&alias, &name) else {
            return Ok(fail(
                "equal",
                Some(m.display()),
                format!("right-hand tensor `{display}` does not exist"),
            ));
        };
        let tensor = match &right.slice {
            None => tensor.clone(),
            Some(spec) => {
                let resolved = spec.resolve(&tensor.shape).map_err(|source| TransformError::Slice {
                    tensor: display.clone(),
                    source,
                })?;
                super::view_of(tensor, &resolved, &display)?
            }
        };
        if tensor.shape != m.tensor.shape {
            return Ok(fail(
                "equal",
                Some(m.display()),
                format!(
                    "shape {} differs from `{display}` {}",
                    fmt_shape(&m.tensor.shape),
                    fmt_shape(&tensor.shape)
                ),
            ));
        }
        require_values(m, "equal")?;
        if !tensor.dtype.is_computable() {
            return Err(TransformError::Unsupported {
                op: "equal",
                tensor: display,
                dtype: tensor.dtype,
            }
            .into());
        }
        pairs.push((m, tensor, display));
    }
    ctx.reads_whole(pairs.iter().flat_map(|(m, right, _)| [&m.tensor, right]));
    if !ctx.evaluate {
        return Ok(Outcome::Deferred);
    }
    for (m, right, display) in pairs {
        let diff = max_abs_difference(&m.tensor, &right, ctx)?;
        // NaN differences are already infinite in max_abs_diff; `>` is then enough.
        if diff > eps {
            return Ok(fail(
                "equal",
                Some(m.display()),
                format!("max |a-b| = {diff:e} against `{display}` exceeds eps {eps:e}"),
            ));
        }
    }
    Ok(Outcome::Pass)
}

/// Streams two tensors of one shape in lockstep and returns max |a - b| (also used by `diff`).
pub(crate) fn max_abs_difference(a: &Tensor, b: &Tensor, ctx: &mut Context) -> Result<f64, StepError> {
    let mut worst = 0.0f64;
    stream(&[a, b], &mut ctx.reads, |chunks| {
        worst = worst.max(kernels::max_abs_diff(a.dtype, chunks[0], b.dtype, chunks[1]));
        Ok::<bool, StepError>(true)
    })?;
    Ok(worst)
}

#[derive(Debug)]
struct Assert {
    expr: Expr,
    location: Location,
}

impl Transform for Assert {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        match self.expr.evaluate(state, ctx, &self.location)? {
            Outcome::Pass => ctx.note("assert: passed".to_owned()),
            Outcome::Deferred => ctx.note("assert: needs tensor values; checked when the plan runs".to_owned()),
            Outcome::Fail(failure) => return Err(failure.into()),
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RawTransform;
    use serde_json::json;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn f32s() -> Tensor {
        Tensor::in_memory(
            DType::F32,
            vec![2],
            Arc::new([1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
        )
    }

    fn step(state: &mut State, ctx: &mut Context, name: &str, payload: Value) -> Result<Flow, StepError> {
        let raw = RawTransform {
            name: name.into(),
            payload,
            location: Location::root().key("transforms").index(2),
        };
        crate::transforms::parse(&raw, &Default::default())?.apply(state, ctx)
    }

    /// Issue 15 item 8: `reads` / `writes` count the steps that read or wrote a tensor; an
    /// arrival is one write, a name-only assertion no read; a check decides them.
    #[test]
    fn reads_and_writes_count_steps() {
        for evaluate in [false, true] {
            let mut state = State::default();
            state.insert("m", "x", f32s());
            state.default_alias = Some("m".into());
            let mut ctx = Context::new(evaluate, Arc::new(AtomicBool::new(false)));
            let mut ok = |state: &mut State, name: &str, payload: Value| {
                step(state, &mut ctx, name, payload).unwrap();
            };
            ok(&mut state, "assert", json!({"exists": "x"}));
            ok(&mut state, "assert", json!({"reads": {"of": "x", "is": 0}}));
            ok(&mut state, "assert", json!({"writes": {"of": "x", "is": 1}}));
            ok(&mut state, "copy", json!({"from": "x", "to": "y"}));
            ok(&mut state, "scale_", json!({"target": "y", "by": 2}));
            ok(&mut state, "assert", json!({"reads": {"of": "x", "is": 1}}));
            ok(&mut state, "assert", json!({"writes": {"of": "y", "is": 2}}));
            ok(&mut state, "assert", json!({"reads": {"of": "y", "at_least": 1, }}));
            ok(&mut state, "assert", json!({"writes": {"of": "x|y", "lt": 3}}));
            ok(&mut state, "move", json!({"from": "y", "to": "z"}));
            ok(&mut state, "assert", json!({"writes": {"of": "z", "is": 1}}));
            ok(&mut state, "assert", json!({"reads": {"of": "z", "at_most": 0}}));
        }
        let mut state = State::default();
        state.insert("m", "x", f32s());
        state.default_alias = Some("m".into());
        let mut ctx = Context::new(false, Arc::new(AtomicBool::new(false)));
        let err = step(&mut state, &mut ctx, "assert", json!({"writes": {"of": "x", "gt": 1}})).unwrap_err();
        assert!(
            matches!(&err, StepError::Assertion(f) if f.to_string().contains("m::x") && f.to_string().contains("written 1 times, expected more than 1")),
            "{err}"
        );
        let err = step(
            &mut state,
            &mut ctx,
            "assert",
            json!({"reads": {"of": "x", "ge": 1, "le": 2}}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exactly one of"), "{err}");
    }
}
