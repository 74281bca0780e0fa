//! Tensor references (SPEC §3): parsing `alias::pattern::[slice]` and structured forms, matching
//! names with Python-`re` regexes or structured segment patterns, expanding rewrite templates,
//! resolving NumPy slices into streamable runs, and suggesting close names for zero matches.
//! Default aliases, match ordering, collisions and tensor I/O belong to the executor.

#![deny(missing_docs)]

mod closest;
mod error;
mod pattern;
mod reference;
mod slice;
mod template;

pub use closest::closest_names;
pub use error::ReferenceError;
pub use pattern::{Capture, CaptureInfo, Captures, RegexSelector, Selector, StructuredPattern};
pub use reference::{is_alias, Reference, Target};
pub use slice::{DimSelection, ResolvedSlice, Run, Runs, SliceItem, SliceSpec};
pub use template::{GroupRef, Template};
