//! Python/NumPy basic slicing (`[:8]`, `[:, 10:20]`, `[1]`, `[::-1]`, `[..., 0]`): parsing the
//! suffix of a reference, resolving it against a tensor shape, and describing the selected base
//! elements as contiguous runs so the executor can stream a view without gathering indices.
//! Reading and writing tensor bytes is the executor's job.

use std::fmt;

use super::ReferenceError;

/// One comma-separated item of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceItem {
    /// An integer index; drops the dimension. Negative values count from the end.
    Index(i64),
    /// `start:stop:step`, each part optional (Python defaults).
    Range {
        /// First index (default depends on the step's sign).
        start: Option<i64>,
        /// One past the last index (default depends on the step's sign).
        stop: Option<i64>,
        /// Step; `None` means 1.
        step: Option<i64>,
    },
    /// `...`: as many full dimensions as needed (at most one per slice).
    Ellipsis,
}

/// A parsed slice, not yet tied to a shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    /// The items in order.
    pub items: Vec<SliceItem>,
}

/// How one base dimension is selected after resolving against a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimSelection {
    /// First base index visited (for a negative step, the highest index).
    pub start: usize,
    /// Step between visited indices; normalised to 1 when `len <= 1`.
    pub step: isize,
    /// Number of indices visited.
    pub len: usize,
    /// False for an integer index (the dimension is dropped from the result).
    pub keep: bool,
}

/// A slice resolved against a concrete base shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSlice {
    /// One selection per base dimension.
    pub dims: Vec<DimSelection>,
    /// Shape of the result (kept dimensions only).
    pub shape: Vec<usize>,
    /// Shape of the base tensor the slice was resolved against.
    pub base_shape: Vec<usize>,
}

/// A run of base elements: element `j` (for `j < len`) is at base linear index
/// `base_start + j * stride`, in elements, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Linear index in the base of the run's first element.
    pub base_start: usize,
    /// Number of elements in the run.
    pub len: usize,
    /// Distance in elements between consecutive run elements (1 for contiguous runs; may be
    /// negative for reversed innermost slices).
    pub stride: isize,
}

fn bad(text: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::InvalidSlice {
        text: text.to_string(),
        reason: reason.into(),
    }
}

fn parse_int(text: &str, part: &str) -> Result<i64, ReferenceError> {
    // Python allows blanks between a sign and the digits (`- 1`).
    let compact: String = part.chars().filter(|c| !c.is_whitespace()).collect();
    let digits = compact.strip_prefix(['+', '-']).unwrap_or(&compact);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(text, format!("`{}` is not an integer", part.trim())));
    }
    compact
        .parse::<i64>()
        .map_err(|_| bad(text, format!("`{}` is out of range", part.trim())))
}

impl SliceSpec {
    /// Parses `[item, item, ...]`; brackets are required, blanks are allowed anywhere.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let trimmed = text.trim();
        let inner = trimmed
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| bad(text, "expected `[...]`"))?;
        if inner.trim().is_empty() {
            return Err(bad(text, "empty slice"));
        }
        let mut pieces: Vec<&str> = inner.split(',').collect();
        // `[1,]` is a one-item tuple in Python.
        if pieces.len() > 1 && pieces.last().is_some_and(|p| p.trim().is_empty()) {
            pieces.pop();
        }
        let mut items = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let piece = piece.trim();
            if piece.is_empty() {
                return Err(bad(text, "empty item"));
            }
            if piece == "..." {
                if items.contains(&SliceItem::Ellipsis) {
                    return Err(bad(text, "more than one `...`"));
                }
                items.push(SliceItem::Ellipsis);
                continue;
            }
            if !piece.contains(':') {
                items.push(SliceItem::Index(parse_int(text, piece)?));
                continue;
            }
            let parts: Vec<&str> = piece.split(':').collect();
            if parts.len() > 3 {
                return Err(bad(text, format!("`{piece}` has more than two `:`")));
            }
            let opt = |i: usize| -> Result<Option<i64>, ReferenceError> {
                match parts.get(i).map(|p| p.trim()) {
                    None | Some("") => Ok(None),
                    Some(p) => parse_int(text, p).map(Some),
                }
            };
            // A step of 1 is the default; normalising it keeps equality and Display canonical.
            let step = opt(2)?.filter(|s| *s != 1);
            items.push(SliceItem::Range {
                start: opt(0)?,
                stop: opt(1)?,
                step,
            });
        }
        Ok(SliceSpec { items })
    }

    /// Resolves against `shape` with NumPy basic-indexing semantics: integer indices wrap once
    /// and must be in range, ranges clamp like Python, missing trailing dims are full.
    pub fn resolve(&self, shape: &[usize]) -> Result<ResolvedSlice, ReferenceError> {
        let ndim = shape.len();
        let count = self.items.iter().filter(|i| **i != SliceItem::Ellipsis).count();
        if count > ndim {
            return Err(ReferenceError::TooManyIndices { count, ndim });
        }
        let mut expanded: Vec<Option<SliceItem>> = Vec::with_capacity(ndim);
        for item in &self.items {
            match item {
                SliceItem::Ellipsis => expanded.extend(std::iter::repeat_n(None, ndim - count)),
                other => expanded.push(Some(*other)),
            }
        }
        expanded.resize(ndim, None);

        let mut dims = Vec::with_capacity(ndim);
        let mut out_shape = Vec::with_capacity(ndim);
        for (dim, (item, &size)) in expanded.iter().zip(shape).enumerate() {
            let sel = match item {
                // The ellipsis was already expanded into `None`s.
                None | Some(SliceItem::Ellipsis) => DimSelection {
                    start: 0,
                    step: 1,
                    len: size,
                    keep: true,
                },
                Some(SliceItem::Index(index)) => {
                    let n = size as i128;
                    let mut i = *index as i128;
                    if i < 0 {
                        i += n;
                    }
                    if i < 0 || i >= n {
                        return Err(ReferenceError::IndexOutOfRange {
                            dim,
                            index: *index,
                            size,
                        });
                    }
                    DimSelection {
                        start: i as usize,
                        step: 1,
                        len: 1,
                        keep: false,
                    }
                }
                Some(SliceItem::Range { start, stop, step }) => resolve_range(dim, size, *start, *stop, *step)?,
            };
            if sel.keep {
                out_shape.push(sel.len);
            }
            dims.push(sel);
        }
        Ok(ResolvedSlice {
            dims,
            shape: out_shape,
            base_shape: shape.to_vec(),
        })
    }
}

/// Python's `slice.indices` followed by the length computation (CPython `PySlice_AdjustIndices`).
fn resolve_range(
    dim: usize,
    size: usize,
    start: Option<i64>,
    stop: Option<i64>,
    step: Option<i64>,
) -> Result<DimSelection, ReferenceError> {
    let n = size as i128;
    let step = step.unwrap_or(1) as i128;
    if step == 0 {
        return Err(ReferenceError::ZeroStep { dim });
    }
    let (lo, hi) = if step > 0 { (0, n) } else { (-1, n - 1) };
    let adjust = |v: Option<i64>, default: i128| -> i128 {
        match v {
            None => default,
            Some(v) => {
                let mut v = v as i128;
                if v < 0 {
                    v += n;
                }
                v.clamp(lo, hi)
            }
        }
    };
    let (start, stop) = if step > 0 {
        (adjust(start, 0), adjust(stop, n))
    } else {
        (adjust(start, n - 1), adjust(stop, -1))
    };
    let len = if step > 0 {
        if stop > start {
            (stop - start + step - 1) / step
        } else {
            0
        }
    } else if start > stop {
        (start - stop + (-step) - 1) / (-step)
    } else {
        0
    };
    let (start, step) = if len <= 1 {
        (if len == 0 { 0 } else { start }, 1)
    } else {
        (start, step)
    };
    // All values are within [0, size] or |step| <= i64::MAX here, so the casts are lossless on
    // 64-bit targets; clamp the step anyway for 32-bit ones.
    let step = isize::try_from(step).unwrap_or(if step > 0 { isize::MAX } else { isize::MIN + 1 });
    Ok(DimSelection {
        start: start as usize,
        step,
        len: len as usize,
        keep: true,
    })
}

impl fmt::Display for SliceSpec {
    /// Canonical form: `[a:b:c, i, ...]`, omitting defaults and a step of 1.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (k, item) in self.items.iter().enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            match item {
                SliceItem::Index(i) => write!(f, "{i}")?,
                SliceItem::Ellipsis => f.write_str("...")?,
                SliceItem::Range { start, stop, step } => {
                    if let Some(s) = start {
                        write!(f, "{s}")?;
                    }
                    f.write_str(":")?;
                    if let Some(s) = stop {
                        write!(f, "{s}")?;
                    }
                    if let Some(s) = step.filter(|s| *s != 1) {
                        write!(f, ":{s}")?;
                    }
                }
            }
        }
        f.write_str("]")
    }
}

/// How [`ResolvedSlice::runs`] walks the base: odometer over `outer` dims, each step yielding one
/// run of `run_len` elements.
struct RunPlan {
    /// (start, step, len, base stride) of the dims iterated by the odometer, outermost first.
    outer: Vec<(usize, isize, usize, usize)>,
    /// Constant offset contributed by the run dimension.
    offset: usize,
    run_len: usize,
    run_stride: isize,
}

impl ResolvedSlice {
    /// Number of selected elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|d| d.len).product()
    }

    /// True when the slice selects the whole base with the same shape (a no-op view).
    pub fn is_full(&self) -> bool {
        self.dims
            .iter()
            .zip(&self.base_shape)
            .all(|(d, &n)| d.keep && d.start == 0 && d.len == n && d.step == 1)
    }

    /// True when the selected elements, in result order, are one increasing contiguous run of
    /// the base (so a view is a plain byte range). Empty selections count as contiguous.
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let plan = self.plan();
        plan.outer.iter().all(|o| o.2 == 1) && (plan.run_stride == 1 || plan.run_len <= 1)
    }

    /// Maps an index into the result (one entry per kept dim) to the base multi-index, or
    /// `None` if it has the wrong length or is out of range.
    pub fn base_index(&self, out_index: &[usize]) -> Option<Vec<usize>> {
        let mut it = out_index.iter();
        let mut base = Vec::with_capacity(self.dims.len());
        for d in &self.dims {
            let i = if d.keep { *it.next()? } else { 0 };
            if i >= d.len {
                return None;
            }
            base.push((d.start as isize + i as isize * d.step) as usize);
        }
        it.next().is_none().then_some(base)
    }

    fn plan(&self) -> RunPlan {
        let ndim = self.dims.len();
        let mut strides = vec![1usize; ndim];
        for d in (0..ndim.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1].saturating_mul(self.base_shape[d + 1]);
        }
        // Trailing dims that are selected whole merge into one block of `inner` elements.
        let mut j = ndim;
        let mut inner = 1usize;
        while j > 0 {
            let d = self.dims[j - 1];
            if d.start == 0 && d.step == 1 && d.len == self.base_shape[j - 1] {
                inner *= d.len;
                j -= 1;
            } else {
                break;
            }
        }
        let outer_of = |end: usize| -> Vec<(usize, isize, usize, usize)> {
            (0..end)
                .map(|k| (self.dims[k].start, self.dims[k].step, self.dims[k].len, strides[k]))
                .collect()
        };
        if j == 0 {
            return RunPlan {
                outer: Vec::new(),
                offset: 0,
                run_len: inner,
                run_stride: 1,
            };
        }
        let d = self.dims[j - 1];
        if d.step == 1 {
            // A partial dim with unit step extends the block: one run per outer position.
            RunPlan {
                outer: outer_of(j - 1),
                offset: d.start * strides[j - 1],
                run_len: d.len * inner,
                run_stride: 1,
            }
        } else if inner == 1 {
            // Innermost strided dim: one strided run (stride is `step` since base stride is 1).
            RunPlan {
                outer: outer_of(j - 1),
                offset: d.start * strides[j - 1],
                run_len: d.len,
                run_stride: d.step * strides[j - 1] as isize,
            }
        } else {
            RunPlan {
                outer: outer_of(j),
                offset: 0,
                run_len: inner,
                run_stride: 1,
            }
        }
    }

    /// The selected base elements as runs, in result (row-major) order. Trailing whole dims and
    /// one unit-step partial dim are merged into each run, so a row-slice `[a:b]` is a single
    /// run and `[:, a:b]` is one run per row. Yields nothing for an empty selection.
    pub fn runs(&self) -> Runs {
        let empty = self.numel() == 0;
        let plan = self.plan();
        let counters = vec![0; plan.outer.len()];
        Runs {
            plan,
            counters,
            done: empty,
        }
    }
}

/// Iterator over the [`Run`]s of a [`ResolvedSlice`]; see [`ResolvedSlice::runs`].
pub struct Runs {
    plan: RunPlan,
    counters: Vec<usize>,
    done: bool,
}

impl Iterator for Runs {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.done {
            return None;
        }
        let mut start = self.plan.offset;
        for (&(s, step, _, stride), &c) in self.plan.outer.iter().zip(&self.counters) {
            start += (s as isize + c as isize * step) as usize * stride;
        }
        // Advance the odometer, innermost first.
        self.done = true;
        for (k, c) in self.counters.iter_mut().enumerate().rev() {
            *c += 1;
            if *c < self.plan.outer[k].2 {
                self.done = false;
                break;
            }
            *c = 0;
        }
        Some(Run {
            base_start: start,
            len: self.plan.run_len,
            stride: self.plan.run_stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str, shape: &[usize]) -> ResolvedSlice {
        SliceSpec::parse(s)
            .expect("valid slice")
            .resolve(shape)
            .expect("resolves")
    }

    /// All base linear indices in result order, by expanding the runs.
    fn elems(r: &ResolvedSlice) -> Vec<usize> {
        r.runs()
            .flat_map(|run| (0..run.len).map(move |j| (run.base_start as isize + j as isize * run.stride) as usize))
            .collect()
    }

    #[test]
    fn forms_match_numpy() {
        // np.arange(20).reshape(4,5)[:2] -> rows 0,1
        let r = res("[:2]", &[4, 5]);
        assert_eq!(r.shape, vec![2, 5]);
        assert_eq!(elems(&r), (0..10).collect::<Vec<_>>());
        assert!(r.is_contiguous());
        assert_eq!(r.runs().count(), 1);
        // [:, 1:3] -> 1,2,6,7,11,12,16,17
        let r = res("[ : , 1 : 3 ]", &[4, 5]);
        assert_eq!(r.shape, vec![4, 2]);
        assert_eq!(elems(&r), vec![1, 2, 6, 7, 11, 12, 16, 17]);
        assert!(!r.is_contiguous());
        assert_eq!(r.runs().count(), 4);
        // [1] -> row 1, dim dropped
        let r = res("[1]", &[4, 5]);
        assert_eq!(r.shape, vec![5]);
        assert_eq!(elems(&r), vec![5, 6, 7, 8, 9]);
        assert!(r.is_contiguous());
        // [-1] -> last row
        assert_eq!(elems(&res("[-1]", &[4, 5])), vec![15, 16, 17, 18, 19]);
        // [::2] on arange(7) -> 0,2,4,6
        let r = res("[::2]", &[7]);
        assert_eq!((r.shape.clone(), elems(&r)), (vec![4], vec![0, 2, 4, 6]));
        // [::-1] on arange(4) -> 3,2,1,0 as one run of stride -1
        let r = res("[::-1]", &[4]);
        assert_eq!(elems(&r), vec![3, 2, 1, 0]);
        assert_eq!(
            r.runs().collect::<Vec<_>>(),
            vec![Run {
                base_start: 3,
                len: 4,
                stride: -1
            }]
        );
        assert_eq!(
            r.dims[0],
            DimSelection {
                start: 3,
                step: -1,
                len: 4,
                keep: true
            }
        );
        // [2:-2] on arange(7) -> 2,3,4
        assert_eq!(elems(&res("[2:-2]", &[7])), vec![2, 3, 4]);
        // [5:1:-2] on arange(7) -> 5,3
        assert_eq!(elems(&res("[5:1:-2]", &[7])), vec![5, 3]);
        // [-100:100] clamps -> all; [10:] -> empty
        assert!(res("[-100:100]", &[3]).is_full());
        let r = res("[10:]", &[3]);
        assert_eq!((r.shape.clone(), r.numel(), elems(&r).len()), (vec![0], 0, 0));
        // arange(24).reshape(2,3,4)[..., 1] -> 1,5,9,13,17,21 with shape (2,3)
        let r = res("[..., 1]", &[2, 3, 4]);
        assert_eq!(r.shape, vec![2, 3]);
        assert_eq!(elems(&r), vec![1, 5, 9, 13, 17, 21]);
        // [1, ..., ::2] -> 12,14,16,18,20,22
        assert_eq!(elems(&res("[1, ..., ::2]", &[2, 3, 4])), vec![12, 14, 16, 18, 20, 22]);
        // [:, ::2] on (2,3,4): dim1 strided, dims after whole -> rows 0,2 of each block
        let r = res("[:, ::2]", &[2, 3, 4]);
        assert_eq!(r.shape, vec![2, 2, 4]);
        assert_eq!(
            elems(&r),
            vec![0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23]
        );
        // [1,] is a one-item tuple
        assert_eq!(res("[1,]", &[3, 2]).shape, vec![2]);
        // [0, 0] on a (1, 5): contiguous single element
        let r = res("[0, 2]", &[1, 5]);
        assert!(r.shape.is_empty() && r.is_contiguous() && r.numel() == 1);
        assert_eq!(elems(&r), vec![2]);
        // 0-dim base with an ellipsis
        let r = res("[...]", &[]);
        assert_eq!((r.numel(), elems(&r)), (1, vec![0]));
    }

    #[test]
    fn base_index_maps_result_positions() {
        let r = res("[1:, ::-1]", &[3, 4]);
        assert_eq!(r.base_index(&[0, 0]), Some(vec![1, 3]));
        assert_eq!(r.base_index(&[1, 3]), Some(vec![2, 0]));
        assert_eq!(r.base_index(&[2, 0]), None);
        assert_eq!(r.base_index(&[0]), None);
        let r = res("[2]", &[3, 4]);
        assert_eq!(r.base_index(&[1]), Some(vec![2, 1]));
    }

    #[test]
    fn display_is_canonical() {
        let s = SliceSpec::parse("[ :8 , 10:20:1, ::-1, -1, ... ]").expect("valid");
        assert_eq!(s.to_string(), "[:8, 10:20, ::-1, -1, ...]");
        assert_eq!(SliceSpec::parse(&s.to_string()).expect("round-trips"), s);
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            ":8",
            "[]",
            "[1,,2]",
            "[a]",
            "[1:2:3:4]",
            "[..., ...]",
            "[99999999999999999999]",
        ] {
            assert!(
                matches!(SliceSpec::parse(bad), Err(ReferenceError::InvalidSlice { .. })),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn zero_step() {
        let s = SliceSpec::parse("[:, ::0]").expect("parses");
        assert_eq!(s.resolve(&[2, 3]), Err(ReferenceError::ZeroStep { dim: 1 }));
    }

    #[test]
    fn index_out_of_range() {
        let s = SliceSpec::parse("[:, -4]").expect("parses");
        let e = s.resolve(&[2, 3]).expect_err("out of range");
        assert_eq!(
            e,
            ReferenceError::IndexOutOfRange {
                dim: 1,
                index: -4,
                size: 3
            }
        );
        assert_eq!(e.to_string(), "index -4 is out of range for dim 1 of size 3");
    }

    #[test]
    fn too_many_indices() {
        let s = SliceSpec::parse("[0, 0, ...]").expect("parses");
        assert_eq!(
            s.resolve(&[2]),
            Err(ReferenceError::TooManyIndices { count: 2, ndim: 1 })
        );
    }
}
