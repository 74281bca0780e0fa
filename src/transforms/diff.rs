//! `diff`: compare tensors and print what differs, without failing the run (`assert equal` is
//! the failing form). Two modes: references (`left`, and `right` a rewrite of each left match, as
//! in `assert equal`) or whole aliases (`left_alias`, `right_alias`, tensors paired by name);
//! `mode: refs|aliases`, as the 0.2 tool writes it, names the mode and must agree. It
//! reports tensors missing on either side and pairs that differ in shape, dtype or values (max
//! |a-b| > eps). Header differences are found in a plan check; values are streamed chunk by chunk
//! only when the plan runs. The `brainsurgery diff A B` command uses [`compare_aliases`].

use serde_json::Value as Json;

use super::view_of;
use super::{Context, Flow, StepError, Transform, TransformError, TransformSpec};
use crate::kernels;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::State;
use crate::transforms::fmt_shape;
use crate::value::{stream, Tensor};

const DIFF_FIELDS: &[Field] = &[
    Field::optional(
        "left",
        FieldKind::Reference,
        None,
        "tensors compared (with `right`; or give `left_alias` and `right_alias`)",
    ),
    Field::optional(
        "right",
        FieldKind::Target,
        None,
        "the tensor each left match is compared with (a rewrite such as `b::\\g<0>`; aliases may differ)",
    ),
    Field::optional(
        "left_alias",
        FieldKind::Text,
        None,
        "compare this whole alias with `right_alias`, tensors paired by name",
    ),
    Field::optional(
        "right_alias",
        FieldKind::Text,
        None,
        "the alias compared with `left_alias`",
    ),
    Field::optional(
        "mode",
        FieldKind::Text,
        None,
        "`refs` (compare `left` with `right`) or `aliases` (compare `left_alias` with `right_alias`); \
         when absent, the keys given decide (`refs` for `left`/`right`, as in the 0.2 tool)",
    ),
    Field::optional(
        "eps",
        FieldKind::Number,
        Some("0"),
        "largest |a - b| still counted as equal (values cast to float32 first)",
    ),
];

/// `diff`.
pub const DIFF: TransformSpec = TransformSpec {
    name: "diff",
    summary: "report tensors missing on either side and tensors that differ (shape, dtype; max |a-b|, relative \
              error and cosine of the values cast to float32)",
    form: super::Form::Plain,
    fields: DIFF_FIELDS,
    parse: parse_diff,
};

#[derive(Debug)]
enum Sides {
    // Boxed: references are large and `Sides` is built once per plan.
    References { left: Box<Reference>, right: Box<Target> },
    Aliases { left: String, right: String },
}

#[derive(Debug)]
struct Diff {
    sides: Sides,
    eps: f64,
    location: Location,
}

fn parse_diff(value: &Json, cx: &super::ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    let location = &cx.location;
    let p = Payload::new(value, DIFF_FIELDS, location.clone())?;
    let eps = p.number("eps")?.unwrap_or(0.0);
    if eps.is_nan() || eps < 0.0 {
        return Err(PlanError::invalid(&p.at("eps"), "eps must be ≥ 0"));
    }
    let has = |k: &str| p.get(k).is_some();
    // The 0.2 tool's form names the mode (`mode: aliases` is its own help example); it must
    // agree with the keys given (issue 15 item 1).
    match p.text("mode")? {
        None => {}
        Some(mode @ ("refs" | "aliases")) => {
            let (wanted, other): (&[&str], &[&str]) = if mode == "refs" {
                (&["left", "right"], &["left_alias", "right_alias"])
            } else {
                (&["left_alias", "right_alias"], &["left", "right"])
            };
            if let Some(key) = other.iter().find(|k| has(k)) {
                return Err(PlanError::invalid(
                    &p.at(key),
                    format!(
                        "`{key}` does not apply to mode `{mode}`, which compares `{}` with `{}`",
                        wanted[0], wanted[1]
                    ),
                ));
            }
            if let Some(key) = wanted.iter().find(|k| !has(k)) {
                return Err(PlanError::MissingKey {
                    location: location.clone(),
                    key: (*key).to_owned(),
                });
            }
        }
        Some(other) => {
            return Err(PlanError::invalid(
                &p.at("mode"),
                format!("unknown mode `{other}`; expected refs or aliases"),
            ))
        }
    }
    let sides = match (has("left"), has("right"), has("left_alias"), has("right_alias")) {
        (true, true, false, false) => Sides::References {
            left: Box::new(p.reference("left")?),
            right: Box::new(p.target("right")?),
        },
        (false, false, true, true) => Sides::Aliases {
            left: p.text("left_alias")?.unwrap_or_default().to_owned(),
            right: p.text("right_alias")?.unwrap_or_default().to_owned(),
        },
        _ => {
            return Err(PlanError::invalid(
                location,
                "diff takes either `left` and `right`, or `left_alias` and `right_alias`",
            ))
        }
    };
    Ok(Box::new(Diff {
        sides,
        eps,
        location: location.clone(),
    }))
}

/// One pair of tensors to compare.
#[derive(Debug)]
struct Pair {
    left_name: String,
    right_name: String,
    left: Tensor,
    right: Tensor,
}

/// A number as NumPy's `format_float_scientific(x, precision=2)` prints it (`2.38e-04`, `2.5e-01`,
/// `1.e+00`), zero as `0`, and `nan`, `inf`, `-inf`. NumPy prints the shortest digits that read
/// back as `x` when there are at most three; otherwise the value correctly rounded to three
/// digits, where digits a round-up carried into (`0.99999994` → `1.e+00`) are dropped.
pub fn fmt_sci(x: f64) -> String {
    if x == 0.0 {
        return "0".to_owned();
    }
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // `d.ddde-4` → ("dddd", -4).
    let split = |text: &str| -> (String, i32) {
        let (mantissa, exponent) = text.split_once('e').unwrap_or((text, "0"));
        (mantissa.replace('.', ""), exponent.parse().unwrap_or(0))
    };
    let (shortest, exponent) = split(&format!("{:e}", x.abs()));
    let (digits, exponent) = if shortest.len() <= 3 {
        (shortest, exponent)
    } else {
        let (rounded, rounded_exponent) = split(&format!("{:.2e}", x.abs()));
        let up = rounded_exponent != exponent || rounded.as_str() > &shortest[..3];
        if up {
            (rounded.trim_end_matches('0').to_owned(), rounded_exponent)
        } else {
            (rounded, rounded_exponent)
        }
    };
    let digits = if digits.is_empty() { "1".to_owned() } else { digits };
    format!(
        "{}{}.{}e{}{:02}",
        if x < 0.0 { "-" } else { "" },
        &digits[..1],
        &digits[1..],
        if exponent < 0 { '-' } else { '+' },
        exponent.unsigned_abs()
    )
}

/// The values of a pair compared (both cast to float32, see [`kernels::diff_sums`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueDiff {
    /// Largest |a - b|.
    pub max_abs: f64,
    /// ‖a - b‖ / ‖a‖ (0 when equal, infinite when only `a` is all zeros).
    pub rel: f64,
    /// a·b / (‖a‖ ‖b‖) (1 when both are all zeros, NaN when only one is).
    pub cos: f64,
    /// Whether `max_abs` exceeds the tolerance.
    pub over_eps: bool,
}

impl ValueDiff {
    fn new(sums: &kernels::DiffSums, eps: f64) -> Self {
        let rel = if sums.diff_sq == 0.0 {
            0.0
        } else if sums.a_sq == 0.0 {
            f64::INFINITY
        } else {
            sums.diff_sq.sqrt() / sums.a_sq.sqrt()
        };
        let cos = match (sums.a_sq == 0.0, sums.b_sq == 0.0) {
            (true, true) => 1.0,
            (false, false) => sums.dot / (sums.a_sq.sqrt() * sums.b_sq.sqrt()),
            _ => f64::NAN,
        };
        // NaN against a number is an infinite difference, so `>` is enough.
        ValueDiff {
            max_abs: sums.max_abs,
            rel,
            cos,
            over_eps: sums.max_abs > eps,
        }
    }

    fn text(&self, eps: f64) -> String {
        format!(
            "max |a-b| = {}{}, rel = {}, cos = {}",
            fmt_sci(self.max_abs),
            if self.over_eps {
                format!(" > eps {eps}")
            } else {
                String::new()
            },
            fmt_sci(self.rel),
            fmt_sci(self.cos)
        )
    }
}

/// A pair that differs, or whose dtype alone changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairDiff {
    /// The left tensor (`alias::name`).
    pub left: String,
    /// The right tensor.
    pub right: String,
    /// Both shapes, when they differ (values are then not compared).
    pub shapes: Option<(Vec<usize>, Vec<usize>)>,
    /// Both dtype names, when they differ.
    pub dtypes: Option<(String, String)>,
    /// The values compared (absent in a check, for differing shapes, or carry-only dtypes).
    pub values: Option<ValueDiff>,
    /// A carry-only dtype (compared byte for byte) whose bytes differ.
    pub bytes_differ: bool,
    /// Dtypes that differ and cannot be compared as values (a carry-only dtype on one side).
    pub incomparable: bool,
}

impl PairDiff {
    /// Whether only the dtype changed (the values, when compared, are within eps).
    pub fn only_dtype(&self) -> bool {
        self.dtypes.is_some()
            && self.shapes.is_none()
            && !self.bytes_differ
            && !self.incomparable
            && !self.values.is_some_and(|v| v.over_eps)
    }

    fn reason(&self, eps: f64) -> String {
        let mut reasons = Vec::new();
        if let Some((a, b)) = &self.shapes {
            reasons.push(format!("shape {} vs {}", fmt_shape(a), fmt_shape(b)));
        }
        if let Some((a, b)) = &self.dtypes {
            reasons.push(format!("dtype {a} → {b}"));
        }
        if self.bytes_differ {
            reasons.push("bytes differ (values of this dtype are compared byte for byte)".to_owned());
        }
        if self.incomparable {
            reasons.push("values not compared (a carry-only dtype)".to_owned());
        }
        if let Some(values) = &self.values {
            reasons.push(values.text(eps));
        }
        reasons.join("; ")
    }

    fn to_json(&self) -> Json {
        let mut entry = serde_json::Map::new();
        entry.insert("left".into(), Json::from(self.left.clone()));
        entry.insert("right".into(), Json::from(self.right.clone()));
        entry.insert("only_dtype".into(), Json::from(self.only_dtype()));
        if let Some((a, b)) = &self.shapes {
            entry.insert("shape".into(), serde_json::json!([a, b]));
        }
        if let Some((a, b)) = &self.dtypes {
            entry.insert("dtype".into(), serde_json::json!([a, b]));
        }
        if self.bytes_differ {
            entry.insert("bytes_differ".into(), Json::from(true));
        }
        if self.incomparable {
            entry.insert("incomparable".into(), Json::from(true));
        }
        if let Some(v) = &self.values {
            entry.insert("max_abs".into(), super::dump::json_number(v.max_abs));
            entry.insert("rel".into(), super::dump::json_number(v.rel));
            entry.insert("cos".into(), super::dump::json_number(v.cos));
            entry.insert("over_eps".into(), Json::from(v.over_eps));
        }
        Json::Object(entry)
    }
}

/// What a comparison found. [`DiffReport::render`] is the text `diff` prints,
/// [`DiffReport::to_json`] the document `brainsurgery diff --json` prints.
#[derive(Debug, Clone, Default)]
pub struct DiffReport {
    /// What was compared with what, as written.
    pub title: String,
    /// The tolerance.
    pub eps: f64,
    /// Pairs compared (present on both sides).
    pub compared: usize,
    /// Tensors present only on the right (`alias::name`).
    pub missing_left: Vec<String>,
    /// Tensors present only on the left.
    pub missing_right: Vec<String>,
    /// Pairs that differ or whose dtype changed, in comparison order.
    pub differing: Vec<PairDiff>,
    /// Pairs whose values were not compared because this is a check.
    pub deferred: usize,
}

impl DiffReport {
    /// Whether nothing differs and nothing is missing (values deferred in a check count as equal;
    /// a dtype change is a difference).
    pub fn is_equal(&self) -> bool {
        self.missing_left.is_empty() && self.missing_right.is_empty() && self.differing.is_empty()
    }

    /// Number of reported differences (missing tensors, differing pairs and dtype changes).
    pub fn difference_count(&self) -> usize {
        self.missing_left.len() + self.missing_right.len() + self.differing.len()
    }

    /// The report: a summary line, then one line per missing tensor, per differing pair and per
    /// dtype change.
    pub fn render(&self) -> String {
        let pairs = |n: usize| {
            if n == 1 {
                "1 pair".to_owned()
            } else {
                format!("{n} pairs")
            }
        };
        let mut head = format!(
            "diff {} (eps {}): {} compared",
            self.title,
            self.eps,
            pairs(self.compared)
        );
        let dtype_only = self.differing.iter().filter(|d| d.only_dtype()).count();
        if self.is_equal() {
            head.push_str(", no differences");
        } else {
            head.push_str(&format!(
                ", {} differ, {} missing on the left, {} missing on the right",
                self.differing.len() - dtype_only,
                self.missing_left.len(),
                self.missing_right.len()
            ));
            if dtype_only > 0 {
                head.push_str(&format!(", {} with only a dtype change", pairs(dtype_only)));
            }
        }
        if self.deferred > 0 {
            head.push_str(&format!(
                " (values of {} compared when the plan runs)",
                pairs(self.deferred)
            ));
        }
        let mut lines = vec![head];
        for name in &self.missing_left {
            lines.push(format!("  missing on the left: {name}"));
        }
        for name in &self.missing_right {
            lines.push(format!("  missing on the right: {name}"));
        }
        for d in &self.differing {
            if d.only_dtype() {
                let (a, b) = d.dtypes.clone().unwrap_or_default();
                let values = d.values.map(|v| format!(" ({})", v.text(self.eps))).unwrap_or_default();
                lines.push(format!("  dtype: {} vs {}: {a} → {b}{values}", d.left, d.right));
            } else {
                lines.push(format!("  differs: {} vs {}: {}", d.left, d.right, d.reason(self.eps)));
            }
        }
        lines.join("\n")
    }

    /// The report as one JSON document; numbers whole (non-finite ones as "inf", "nan").
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "title": self.title,
            "eps": self.eps,
            "equal": self.is_equal(),
            "compared": self.compared,
            "deferred": self.deferred,
            "missing_left": self.missing_left,
            "missing_right": self.missing_right,
            "differing": self.differing.iter().map(PairDiff::to_json).collect::<Vec<_>>(),
        })
    }
}

impl Transform for Diff {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let report = match &self.sides {
            Sides::Aliases { left, right } => compare_aliases(state, ctx, left, right, self.eps, &self.location)?,
            Sides::References { left, right } => self.compare_references(state, ctx, left, right)?,
        };
        ctx.emit(report.render());
        ctx.note(if report.is_equal() {
            format!("diff: {} compared, no differences", report.compared)
        } else {
            format!("diff: {} differences", report.difference_count())
        });
        Ok(Flow::Continue)
    }
}

impl Diff {
    fn compare_references(
        &self,
        state: &State,
        ctx: &mut Context,
        left: &Reference,
        right: &Target,
    ) -> Result<DiffReport, StepError> {
        let matches = state.select_some(left, &self.location)?;
        let left_alias = state.alias_for(left.alias.as_deref(), &left.text, &self.location)?;
        let mut report = DiffReport {
            title: format!("`{}` vs `{}`", left.text, right.text),
            eps: self.eps,
            ..DiffReport::default()
        };
        let mut pairs = Vec::new();
        let mut destinations: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
        let mut right_aliases: Vec<String> = Vec::new();
        for m in &matches {
            let name = right.expand(&m.captures).map_err(|source| TransformError::Template {
                tensor: m.display(),
                source,
            })?;
            let alias = state.alias_for(right.alias.as_deref().or(Some(&m.alias)), &right.text, &self.location)?;
            if !right_aliases.contains(&alias) {
                right_aliases.push(alias.clone());
            }
            let display = format!("{alias}::{name}");
            destinations.insert((alias.clone(), name.clone()));
            let Some(tensor) = state.get(&alias, &name) else {
                report.missing_right.push(display);
                continue;
            };
            let tensor = match &right.slice {
                None => tensor.clone(),
                Some(spec) => {
                    let resolved = spec.resolve(&tensor.shape).map_err(|source| TransformError::Slice {
                        tensor: display.clone(),
                        source,
                    })?;
                    view_of(tensor, &resolved, &display)?
                }
            };
            pairs.push(Pair {
                left_name: m.display(),
                right_name: display,
                left: m.tensor.clone(),
                right: tensor,
            });
        }
        // A tensor of another alias is missing on the left when the left pattern selects its
        // name but no left match rewrote to it (comparing `a::.*` with `b::\g<0>` finds the
        // tensors only `b` has). Within one alias every such name is itself a left match.
        for alias in right_aliases.iter().filter(|a| **a != left_alias) {
            if let Some(tensors) = state.alias(alias) {
                for (name, _) in tensors.iter() {
                    if left.selector.captures(name).is_some()
                        && !destinations.contains(&(alias.clone(), name.to_owned()))
                    {
                        report.missing_left.push(format!("{alias}::{name}"));
                    }
                }
            }
        }
        compare_pairs(&pairs, ctx, &mut report)?;
        Ok(report)
    }
}

/// Compares two whole aliases, pairing tensors by name: the left alias's order for pairs and
/// tensors missing on the right, the right alias's order for those missing on the left.
pub fn compare_aliases(
    state: &State,
    ctx: &mut Context,
    left: &str,
    right: &str,
    eps: f64,
    location: &Location,
) -> Result<DiffReport, StepError> {
    let left = state.alias_for(Some(left), left, &location.key("left_alias"))?;
    let right = state.alias_for(Some(right), right, &location.key("right_alias"))?;
    let (Some(a), Some(b)) = (state.alias(&left), state.alias(&right)) else {
        unreachable!("alias_for checked both aliases exist");
    };
    let mut report = DiffReport {
        title: format!("{left} vs {right}"),
        eps,
        ..DiffReport::default()
    };
    let mut pairs = Vec::new();
    for (name, tensor) in a.iter() {
        match b.get(name) {
            Some(other) => pairs.push(Pair {
                left_name: format!("{left}::{name}"),
                right_name: format!("{right}::{name}"),
                left: tensor.clone(),
                right: other.clone(),
            }),
            None => report.missing_right.push(format!("{left}::{name}")),
        }
    }
    for (name, _) in b.iter() {
        if !a.contains(name) {
            report.missing_left.push(format!("{right}::{name}"));
        }
    }
    compare_pairs(&pairs, ctx, &mut report)?;
    Ok(report)
}

fn compare_pairs(pairs: &[Pair], ctx: &mut Context, report: &mut DiffReport) -> Result<(), StepError> {
    report.compared = pairs.len();
    for pair in pairs {
        let (a, b) = (&pair.left, &pair.right);
        let mut found = PairDiff {
            left: pair.left_name.clone(),
            right: pair.right_name.clone(),
            ..PairDiff::default()
        };
        if a.dtype != b.dtype {
            found.dtypes = Some((a.dtype.name().to_owned(), b.dtype.name().to_owned()));
        }
        if a.shape != b.shape {
            found.shapes = Some((a.shape.clone(), b.shape.clone()));
            report.differing.push(found);
            continue;
        }
        let comparable = a.dtype.is_computable() && b.dtype.is_computable();
        let raw = !comparable && a.dtype == b.dtype;
        found.incomparable = !comparable && !raw;
        if comparable || raw {
            ctx.reads_whole([a, b]);
            if !ctx.evaluate {
                report.deferred += 1;
            } else if comparable {
                let values = ValueDiff::new(&difference_sums(a, b, ctx)?, report.eps);
                if values.over_eps || found.dtypes.is_some() {
                    found.values = Some(values);
                }
            } else {
                found.bytes_differ = !bytes_equal(a, b, ctx)?;
            }
        }
        if found.dtypes.is_some() || found.bytes_differ || found.values.is_some() || found.incomparable {
            report.differing.push(found);
        }
    }
    Ok(())
}

/// The sums of [`kernels::diff_sums`] over two tensors, streamed chunk by chunk.
fn difference_sums(a: &Tensor, b: &Tensor, ctx: &mut Context) -> Result<kernels::DiffSums, StepError> {
    let mut sums = kernels::DiffSums::default();
    stream(&[a, b], &mut ctx.reads, |chunks| {
        kernels::diff_sums(a.dtype, chunks[0], b.dtype, chunks[1], &mut sums);
        Ok::<bool, StepError>(true)
    })?;
    Ok(sums)
}

/// Compares the raw bytes of two tensors of one carry-only dtype (sub-byte floats, complex).
fn bytes_equal(a: &Tensor, b: &Tensor, ctx: &mut Context) -> Result<bool, StepError> {
    let mut equal = true;
    stream(&[a, b], &mut ctx.reads, |chunks| {
        equal = chunks[0] == chunks[1];
        Ok::<bool, StepError>(equal)
    })?;
    Ok(equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loc() -> Location {
        Location::root().key("transforms").index(1).key("diff")
    }

    #[test]
    fn mixed_modes_are_a_plan_error() {
        let err = parse_diff(
            &json!({"left": "a::x", "left_alias": "b"}),
            &crate::transforms::test_support::context(&DIFF, &loc()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("transforms[1].diff") && err.contains("left_alias"),
            "{err}"
        );
        let err = parse_diff(
            &json!({"left_alias": "a", "right_alias": "b", "eps": -1}),
            &crate::transforms::test_support::context(&DIFF, &loc()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("transforms[1].diff.eps"), "{err}");
    }

    /// Issue 15 item 1: `mode` as the 0.2 tool writes it, checked against the keys.
    #[test]
    fn mode_must_agree_with_the_keys() {
        let parse =
            |v: serde_json::Value| parse_diff(&v, &crate::transforms::test_support::context(&DIFF, &loc())).map(|_| ());
        parse(json!({"mode": "aliases", "left_alias": "a", "right_alias": "b"})).unwrap();
        parse(json!({"mode": "refs", "left": "a::x", "right": "b::x"})).unwrap();
        parse(json!({"left_alias": "a", "right_alias": "b"})).unwrap();
        let err = |v| parse(v).unwrap_err().to_string();
        let e = err(json!({"mode": "aliases", "left": "a::x", "right": "b::x"}));
        assert!(
            e.contains("transforms[1].diff.left") && e.contains("mode `aliases`"),
            "{e}"
        );
        let e = err(json!({"mode": "refs", "left_alias": "a", "right_alias": "b"}));
        assert!(
            e.contains("transforms[1].diff.left_alias") && e.contains("mode `refs`"),
            "{e}"
        );
        let e = err(json!({"mode": "aliases", "left_alias": "a"}));
        assert!(e.contains("right_alias"), "{e}");
        let e = err(json!({"mode": "both", "left_alias": "a", "right_alias": "b"}));
        assert!(
            e.contains("transforms[1].diff.mode") && e.contains("refs or aliases"),
            "{e}"
        );
    }

    #[test]
    fn report_text() {
        let report = DiffReport {
            title: "a vs b".into(),
            eps: 0.0,
            compared: 3,
            missing_left: vec!["b::x".into()],
            missing_right: vec![],
            differing: vec![
                PairDiff {
                    left: "a::w".into(),
                    right: "b::w".into(),
                    shapes: Some((vec![2], vec![3])),
                    ..PairDiff::default()
                },
                PairDiff {
                    left: "a::h".into(),
                    right: "b::h".into(),
                    dtypes: Some(("bfloat16".into(), "float16".into())),
                    values: Some(ValueDiff {
                        max_abs: 0.0,
                        rel: 0.0,
                        cos: 1.0,
                        over_eps: false,
                    }),
                    ..PairDiff::default()
                },
            ],
            deferred: 0,
        };
        assert_eq!(
            report.render(),
            "diff a vs b (eps 0): 3 pairs compared, 1 differ, 1 missing on the left, 0 missing on the right, 1 pair \
             with only a dtype change\n  missing on the left: b::x\n  differs: a::w vs b::w: shape (2,) vs (3,)\n  \
             dtype: a::h vs b::h: bfloat16 → float16 (max |a-b| = 0, rel = 0, cos = 1.e+00)"
        );
    }

    #[test]
    fn numbers_as_numpy_prints_them() {
        // Expected strings from `np.format_float_scientific(x, precision=2)` (NumPy 2.4).
        assert_eq!(fmt_sci(0.0), "0");
        assert_eq!(fmt_sci(2.380_907_535_552_978_5e-4), "2.38e-04");
        assert_eq!(fmt_sci(1.0), "1.e+00");
        assert_eq!(fmt_sci(1.000_000_1), "1.00e+00");
        assert_eq!(fmt_sci(0.999_999_94), "1.e+00");
        assert_eq!(fmt_sci(9.9951), "1.e+01");
        assert_eq!(fmt_sci(1.096), "1.1e+00");
        assert_eq!(fmt_sci(1.005), "1.00e+00");
        assert_eq!(fmt_sci(1.125), "1.12e+00");
        assert_eq!(fmt_sci(0.25), "2.5e-01");
        assert_eq!(fmt_sci(-3.0), "-3.e+00");
        assert_eq!(fmt_sci(123_456.0), "1.23e+05");
        assert_eq!(fmt_sci(5e-324), "5.e-324");
        assert_eq!(fmt_sci(1e100), "1.e+100");
        assert_eq!(fmt_sci(f64::INFINITY), "inf");
        assert_eq!(fmt_sci(f64::NAN), "nan");
    }

    #[test]
    fn values_are_compared_as_float32() {
        let mut sums = kernels::DiffSums::default();
        let a: Vec<u8> = [1.0f64, 2.0 + 1e-12].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        kernels::diff_sums(crate::dtype::DType::F64, &a, crate::dtype::DType::F32, &b, &mut sums);
        assert_eq!(sums.max_abs, 0.0);
        assert_eq!(sums.dot, 5.0);
    }
}
