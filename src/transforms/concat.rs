//! `concat`: join tensors along one dimension (NumPy `concatenate`). `from` is a list of
//! references; each must match the same number of tensors, and the i-th matches of all
//! references form the i-th result, named by expanding `to` with the captures of the first
//! reference's i-th match. Parts must agree in dtype and in shape except on `dim`. The result is
//! a lazy [`ConcatOp`] that streams each chunk from the parts in contiguous runs.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value as Json;

use super::split::{dim_of, resolve_dim};
use super::{count_noun, destinations, Context, Flow, StepError, Transform, TransformError, TransformSpec, Writes};
use crate::dtype::DType;
use crate::plan::document::kind_of;
use crate::plan::payload::{compact, Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{LazyOp, ReadContext, Tensor, ValueError};

const CONCAT_FIELDS: &[Field] = &[
    Field::required(
        "from",
        FieldKind::References,
        "a list of references (may be sliced), joined in order; each must match the same number of tensors",
    ),
    Field::required(
        "to",
        FieldKind::Target,
        "destination names, from the first reference's captures",
    ),
    Field::optional(
        "dim",
        FieldKind::Number,
        Some("0"),
        "the dimension to join along (negatives count from the end)",
    ),
];

/// `concat`.
pub const CONCAT: TransformSpec = TransformSpec {
    name: "concat",
    summary: "new tensors joining tensors along a dimension",
    form: super::Form::Plain,
    fields: CONCAT_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let from_value = p.get("from").unwrap_or(&Json::Null);
        let Json::Array(items) = from_value else {
            return Err(PlanError::invalid(
                &p.at("from"),
                format!(
                    "expected a list of references, got {} `{}`",
                    kind_of(from_value),
                    compact(from_value)
                ),
            ));
        };
        if items.is_empty() {
            return Err(PlanError::invalid(&p.at("from"), "expected at least one reference"));
        }
        let from = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                Reference::parse(item).map_err(|source| PlanError::Reference {
                    location: p.at("from").index(i),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(Concat {
            from,
            to: p.target("to")?,
            dim: dim_of(&p)?,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Concat {
    from: Vec<Reference>,
    to: Target,
    dim: i64,
    location: Location,
}

/// Checks one result's parts agree and returns the joined shape.
fn joined_shape(parts: &[&Match], dim: i64) -> Result<(usize, Vec<usize>), TransformError> {
    let first = parts[0];
    let d = resolve_dim("concat", first, dim)?;
    let mut shape = first.tensor.shape.clone();
    shape[d] = 0;
    for m in parts {
        if m.tensor.dtype != first.tensor.dtype {
            return Err(TransformError::DTypeMismatch {
                source_name: m.display(),
                source_dtype: m.tensor.dtype,
                destination: first.display(),
                destination_dtype: first.tensor.dtype,
            });
        }
        let agrees = m.tensor.shape.len() == first.tensor.shape.len()
            && m.tensor
                .shape
                .iter()
                .zip(&first.tensor.shape)
                .enumerate()
                .all(|(k, (a, b))| k == d || a == b);
        if !agrees {
            return Err(TransformError::ConcatShapes {
                dim,
                first: first.display(),
                first_shape: first.tensor.shape.clone(),
                other: m.display(),
                other_shape: m.tensor.shape.clone(),
            });
        }
        shape[d] = shape[d]
            .checked_add(m.tensor.shape[d])
            .ok_or_else(|| TransformError::ValueOf {
                tensor: m.display(),
                source: ValueError::TooLarge {
                    op: "concat",
                    dtype: m.tensor.dtype,
                    shape: shape.clone(),
                },
            })?;
    }
    if first.tensor.dtype.size().is_none() {
        return Err(TransformError::Unsupported {
            op: "concat",
            tensor: first.display(),
            dtype: first.tensor.dtype,
        });
    }
    Ok((d, shape))
}

impl Transform for Concat {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let selections = self
            .from
            .iter()
            .map(|r| state.select_some(r, &self.location))
            .collect::<Result<Vec<_>, _>>()?;
        let first = &selections[0];
        for (r, s) in self.from.iter().zip(&selections).skip(1) {
            if s.len() != first.len() {
                return Err(TransformError::MatchCounts {
                    op: "concat",
                    first: self.from[0].text.clone(),
                    first_count: first.len(),
                    other: r.text.clone(),
                    other_count: s.len(),
                }
                .into());
            }
        }
        let mut results = Vec::with_capacity(first.len());
        for i in 0..first.len() {
            let parts: Vec<&Match> = selections.iter().map(|s| &s[i]).collect();
            let (d, shape) = joined_shape(&parts, self.dim)?;
            results.push((d, shape, parts));
        }
        let destinations = destinations(state, first, &self.to, Writes::New, "concat", &self.location)?;
        for ((d, shape, parts), dest) in results.into_iter().zip(&destinations) {
            let dtype = parts[0].tensor.dtype;
            let tensors: Vec<Tensor> = parts.iter().map(|m| m.tensor.clone()).collect();
            let joined =
                concatenated(dtype, shape, d, tensors).map_err(|e| TransformError::value_of(&parts[0].display(), e))?;
            state.insert(&dest.alias, &dest.name, joined);
        }
        ctx.note(format!(
            "concat: {} from {} references",
            count_noun(first.len()),
            self.from.len()
        ));
        Ok(Flow::Continue)
    }
}

/// The lazy concatenation of `parts` (same dtype, shapes agreeing except on `dim`) into `shape`.
pub fn concatenated(dtype: DType, shape: Vec<usize>, dim: usize, parts: Vec<Tensor>) -> Result<Tensor, ValueError> {
    let inner: usize = shape[dim + 1..].iter().product();
    // Each part contributes `shape[dim] * inner` contiguous elements to every outer row.
    let segments: Vec<usize> = parts.iter().map(|p| p.shape[dim] * inner).collect();
    let row: usize = segments.iter().sum();
    Tensor::op(dtype, shape, Arc::new(ConcatOp { parts, segments, row }))
}

/// Tensors joined along one dimension: every outer row of the result is the parts' segments in
/// order.
#[derive(Debug)]
pub struct ConcatOp {
    parts: Vec<Tensor>,
    /// Elements each part contributes per outer row.
    segments: Vec<usize>,
    /// Elements per outer row of the result.
    row: usize,
}

impl LazyOp for ConcatOp {
    fn inputs(&self) -> Vec<&Tensor> {
        self.parts.iter().collect()
    }

    fn name(&self) -> &'static str {
        "concat"
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        self.parts
            .iter()
            .fold(0, |sum, p| sum.saturating_add(p.materialized(seen)))
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.parts
            .iter()
            .fold(0, |sum, p| sum.saturating_add(p.bytes_to_read(seen)))
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let Some(size) = dtype.size() else {
            return Ok(());
        };
        let n = out.len() / size;
        let mut done = 0;
        while done < n {
            let pos = start + done;
            let (outer, mut within) = (pos / self.row, pos % self.row);
            for (part, &segment) in self.parts.iter().zip(&self.segments) {
                if within >= segment {
                    within -= segment;
                    continue;
                }
                let count = (segment - within).min(n - done);
                part.read(
                    outer * segment + within,
                    &mut out[done * size..(done + count) * size],
                    cx,
                )?;
                done += count;
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transforms::test_support::{counting as tensor, matched};

    #[test]
    fn joins_along_inner_dimensions_in_any_chunking() {
        let (a, b) = (tensor(&[2, 2, 3], 0), tensor(&[2, 1, 3], 100));
        let t = concatenated(DType::U16, vec![2, 3, 3], 1, vec![a, b]).unwrap();
        let expected: Vec<u16> = vec![0, 1, 2, 3, 4, 5, 100, 101, 102, 6, 7, 8, 9, 10, 11, 103, 104, 105];
        for chunk in [1, 2, 4, 5, 18] {
            let mut got = Vec::new();
            let mut start = 0;
            while start < 18 {
                let k = chunk.min(18 - start);
                let mut out = vec![0u8; k * 2];
                t.read(start, &mut out, &mut ReadContext::default()).unwrap();
                got.extend(out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                start += k;
            }
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let a = matched("a", tensor(&[2, 3], 0));
        let b = matched("b", tensor(&[4, 2], 0));
        assert_eq!(joined_shape(&[&a, &a], 0).unwrap(), (0, vec![4, 3]));
        let err = joined_shape(&[&a, &b], 0).unwrap_err();
        assert!(matches!(err, TransformError::ConcatShapes { .. }));
        let text = err.to_string();
        assert!(
            text.contains("`m::a` is (2, 3)") && text.contains("`m::b` is (4, 2)"),
            "{text}"
        );
    }

    #[test]
    fn match_counts_message() {
        let err = TransformError::MatchCounts {
            op: "concat",
            first: "a.*".into(),
            first_count: 2,
            other: "b.*".into(),
            other_count: 3,
        };
        assert!(err
            .to_string()
            .contains("`a.*` matches 2 tensors but `b.*` matches 3 tensors"));
    }
}
