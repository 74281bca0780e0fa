//! `split`: cut each matched tensor into parts along one dimension. The parts are views of the
//! source (no data moves), named by one template per part, all expanded from the match's
//! captures. Without `sizes`, the dimension is cut into equal parts, one per template.

use std::collections::HashSet;

use serde_json::Value as Json;

use super::view_of;
use super::{count_noun, destinations, Context, Flow, StepError, Transform, TransformError, TransformSpec, Writes};
use crate::plan::document::kind_of;
use crate::plan::payload::{compact, Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{DimSelection, Reference, ResolvedSlice, Target};
use crate::state::{Match, State};

const SPLIT_FIELDS: &[Field] = &[
    Field::required("from", FieldKind::Reference, "tensors to cut (may be sliced)"),
    Field::required(
        "to",
        FieldKind::Targets,
        "a list of destination templates, one per part, in order",
    ),
    Field::optional(
        "sizes",
        FieldKind::Numbers,
        Some("equal parts"),
        "a list of part sizes along `dim`, adding up to its size",
    ),
    Field::optional(
        "dim",
        FieldKind::Number,
        Some("0"),
        "the dimension to cut (negatives count from the end)",
    ),
];

/// `split`.
pub const SPLIT: TransformSpec = TransformSpec {
    name: "split",
    summary: "cut tensors into parts along a dimension (the parts are views)",
    form: super::Form::Plain,
    fields: SPLIT_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let to_value = p.get("to").unwrap_or(&Json::Null);
        let Json::Array(items) = to_value else {
            return Err(PlanError::invalid(
                &p.at("to"),
                format!(
                    "expected a list of destination templates, got {} `{}`",
                    kind_of(to_value),
                    compact(to_value)
                ),
            ));
        };
        if items.is_empty() {
            return Err(PlanError::invalid(&p.at("to"), "expected at least one destination"));
        }
        let to = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                Target::parse(item).map_err(|source| PlanError::Reference {
                    location: p.at("to").index(i),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sizes = match p.get("sizes") {
            None => None,
            Some(value) => {
                let invalid = || {
                    PlanError::invalid(
                        &p.at("sizes"),
                        format!(
                            "expected a list of whole numbers, got {} `{}`",
                            kind_of(value),
                            compact(value)
                        ),
                    )
                };
                let Json::Array(items) = value else {
                    return Err(invalid());
                };
                let sizes = items
                    .iter()
                    .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(invalid))
                    .collect::<Result<Vec<_>, _>>()?;
                if sizes.len() != to.len() {
                    return Err(PlanError::invalid(
                        &p.at("sizes"),
                        format!("{} sizes for {} destinations in `to`", sizes.len(), to.len()),
                    ));
                }
                Some(sizes)
            }
        };
        Ok(Box::new(Split {
            from: p.reference("from")?,
            to,
            sizes,
            dim: dim_of(&p)?,
            location: cx.location.clone(),
        }))
    },
};

/// The optional integer `dim` key (default 0).
pub(crate) fn dim_of(p: &Payload) -> Result<i64, PlanError> {
    match p.get("dim") {
        None => Ok(0),
        Some(v) => v.as_i64().ok_or_else(|| {
            PlanError::invalid(
                &p.at("dim"),
                format!("expected a whole number, got {} `{}`", kind_of(v), compact(v)),
            )
        }),
    }
}

/// `dim` (negatives from the end) as an index into `shape`, or the out-of-range error.
pub(crate) fn resolve_dim(op: &'static str, m: &Match, dim: i64) -> Result<usize, TransformError> {
    let ndim = m.tensor.shape.len() as i64;
    let d = if dim < 0 { dim + ndim } else { dim };
    if d < 0 || d >= ndim {
        return Err(TransformError::DimOutOfRange {
            op,
            tensor: m.display(),
            shape: m.tensor.shape.clone(),
            dim,
        });
    }
    Ok(d as usize)
}

#[derive(Debug)]
struct Split {
    from: Reference,
    to: Vec<Target>,
    sizes: Option<Vec<usize>>,
    dim: i64,
    location: Location,
}

/// The part sizes for `m`: `sizes`, or equal parts; they must add up to the dimension.
fn part_sizes(m: &Match, dim: usize, sizes: Option<&[usize]>, parts: usize) -> Result<Vec<usize>, TransformError> {
    let len = m.tensor.shape[dim];
    let sizes = match sizes {
        Some(sizes) => sizes.to_vec(),
        None => vec![len / parts; parts],
    };
    if sizes.iter().try_fold(0usize, |a, &s| a.checked_add(s)) != Some(len) {
        return Err(TransformError::SplitSizes {
            tensor: m.display(),
            shape: m.tensor.shape.clone(),
            dim,
            sizes,
        });
    }
    Ok(sizes)
}

/// The slice selecting `[offset, offset + len)` of dimension `dim` of `shape`.
pub(crate) fn band(shape: &[usize], dim: usize, offset: usize, len: usize) -> ResolvedSlice {
    let dims = shape
        .iter()
        .enumerate()
        .map(|(d, &n)| {
            let (start, len) = if d == dim { (offset, len) } else { (0, n) };
            DimSelection {
                start,
                step: 1,
                len,
                keep: true,
            }
        })
        .collect();
    let mut part_shape = shape.to_vec();
    part_shape[dim] = len;
    ResolvedSlice {
        dims,
        shape: part_shape,
        base_shape: shape.to_vec(),
    }
}

impl Transform for Split {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        let mut plans = Vec::with_capacity(matches.len());
        for m in &matches {
            let dim = resolve_dim("split", m, self.dim)?;
            let sizes = part_sizes(m, dim, self.sizes.as_deref(), self.to.len())?;
            plans.push((dim, sizes));
        }
        // Destinations of every part of every match: checked one template at a time, then
        // across templates.
        let per_template = self
            .to
            .iter()
            .map(|to| destinations(state, &matches, to, Writes::New, "split", &self.location))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for (i, m) in matches.iter().enumerate() {
            for destinations in &per_template {
                let d = &destinations[i];
                if !seen.insert((d.alias.clone(), d.name.clone())) {
                    return Err(TransformError::Collision {
                        destination: d.display.clone(),
                        first: m.display(),
                        second: m.display(),
                    }
                    .into());
                }
            }
        }
        for (i, (m, (dim, sizes))) in matches.iter().zip(&plans).enumerate() {
            let mut offset = 0;
            for (destinations, &len) in per_template.iter().zip(sizes) {
                let d = &destinations[i];
                let slice = band(&m.tensor.shape, *dim, offset, len);
                let part = view_of(&m.tensor, &slice, &m.display())?;
                state.insert(&d.alias, &d.name, part);
                offset += len;
            }
        }
        ctx.note(format!(
            "split: {} into {} parts",
            count_noun(matches.len()),
            self.to.len()
        ));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::test_support;
    use crate::value::ReadContext;

    fn matched(shape: &[usize]) -> Match {
        test_support::matched("x", test_support::counting(shape, 0))
    }

    #[test]
    fn sizes_must_add_up_and_dims_exist() {
        let m = matched(&[4, 6]);
        assert_eq!(part_sizes(&m, 1, Some(&[1, 5]), 2).unwrap(), vec![1, 5]);
        assert_eq!(part_sizes(&m, 1, None, 3).unwrap(), vec![2, 2, 2]);
        let err = part_sizes(&m, 1, Some(&[1, 4]), 2).unwrap_err();
        assert!(matches!(err, TransformError::SplitSizes { .. }));
        let text = err.to_string();
        assert!(
            text.contains("`m::x`") && text.contains("add up to 5") && text.contains("is 6"),
            "{text}"
        );
        assert!(part_sizes(&m, 1, None, 4).is_err());
        assert_eq!(resolve_dim("split", &m, -1).unwrap(), 1);
        let err = resolve_dim("split", &m, 2).unwrap_err();
        assert!(matches!(err, TransformError::DimOutOfRange { .. }));
        assert!(err
            .to_string()
            .contains("dimension 2 is out of range for `m::x` (4, 6)"));
    }

    #[test]
    fn bands_are_views_of_the_dimension() {
        let m = matched(&[3, 4]);
        let part = view_of(&m.tensor, &band(&[3, 4], 1, 1, 2), "x").unwrap();
        let mut out = vec![0u8; 12];
        part.read(0, &mut out, &mut ReadContext::default()).unwrap();
        let got: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![1, 2, 5, 6, 9, 10]);
    }
}
