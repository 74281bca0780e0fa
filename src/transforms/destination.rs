//! Where the results of a transform that writes tensors go: `to` rewritten from each match, in
//! its alias or the match's, checked against what the transform writes ([`Writes`]) and for two
//! matches rewriting to one destination. Every such transform (`copy`, `move`, `assign`, the
//! twin families, `add`/`add_`, the shape transforms) goes through [`destinations`].

use std::collections::{HashMap, HashSet};

use super::{view_of, StepError, TransformError};
use crate::plan::{Location, PlanError};
use crate::references::{ResolvedSlice, Target};
use crate::state::{Match, State};
use crate::value::Tensor;

/// What the destinations of a transform that writes tensors must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writes {
    /// New tensors: a destination must not exist yet (`copy`, `cast`, `scale`); no slice.
    New,
    /// Renamed tensors: a destination must not exist unless the same step vacates it (`move`,
    /// so swaps and shifts work); no slice.
    Moved,
    /// Existing tensors written into, whole or through a slice (`assign`, `add_`).
    Existing,
    /// An existing tensor is overwritten (through a slice if given), a missing one is created
    /// (`add`).
    Either,
}

/// Where one match's result goes.
#[derive(Debug)]
pub(crate) struct Destination {
    /// The alias: written in `to`, else the match's.
    pub alias: String,
    /// The name `to` rewrites the match to.
    pub name: String,
    /// `alias::name`, with `::[...]` when written through a slice, for messages.
    pub display: String,
    /// The tensor there now (for [`Writes::Existing`] and [`Writes::Either`]).
    pub current: Option<Tensor>,
    /// The written region, when `to` has a slice.
    pub region: Option<ResolvedSlice>,
}

impl Destination {
    /// The shape written: the region's, else the current tensor's.
    pub fn shape(&self) -> Option<&[usize]> {
        match (&self.region, &self.current) {
            (Some(region), _) => Some(&region.shape),
            (None, Some(t)) => Some(&t.shape),
            (None, None) => None,
        }
    }

    /// The part of the current tensor written: a view of the region, else the whole tensor.
    pub fn view(&self) -> Result<Option<Tensor>, TransformError> {
        match (&self.region, &self.current) {
            (Some(region), Some(current)) => {
                view_of(current, region, &format!("{}::{}", self.alias, self.name)).map(Some)
            }
            (_, current) => Ok(current.clone()),
        }
    }

    /// The destination's new value once `with` (the region's shape and dtype) is written.
    pub fn written(&self, with: Tensor) -> Result<Tensor, StepError> {
        match (&self.region, &self.current) {
            (Some(region), Some(current)) if !(region.is_full() && region.shape == current.shape) => current
                .overwrite(region.clone(), with)
                .map_err(|e| TransformError::value_of(&self.display, e)),
            _ => Ok(with),
        }
    }
}

/// The one place destinations are worked out, for every transform that writes tensors: `to`
/// rewritten from each match (in its alias, or the match's), refusing two matches that rewrite
/// to one destination and a destination that `writes` does not allow.
pub(crate) fn destinations(
    state: &State,
    matches: &[Match],
    to: &Target,
    writes: Writes,
    transform: &'static str,
    location: &Location,
) -> Result<Vec<Destination>, StepError> {
    let creates = matches!(writes, Writes::New | Writes::Moved);
    if creates && to.slice.is_some() {
        return Err(TransformError::SliceNotAllowed {
            reference: to.text.clone(),
            transform,
        }
        .into());
    }
    // A new alias may be created by writing to it; only check the name is sensible.
    if to.alias.as_deref() == Some("") && writes != Writes::Moved {
        return Err(PlanError::invalid(location, "empty alias").into());
    }
    let moving: HashSet<(&str, &str)> = match writes {
        Writes::Moved => matches.iter().map(|m| (m.alias.as_str(), m.name.as_str())).collect(),
        _ => HashSet::new(),
    };
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    let mut out = Vec::with_capacity(matches.len());
    for m in matches {
        let name = to.expand(&m.captures).map_err(|source| TransformError::Template {
            tensor: m.display(),
            source,
        })?;
        let alias = match writes {
            // Writing into existing tensors needs an alias that exists.
            Writes::Existing => state.alias_for(to.alias.as_deref().or(Some(&m.alias)), &to.text, location)?,
            _ => to.alias.clone().unwrap_or_else(|| m.alias.clone()),
        };
        let plain = format!("{alias}::{name}");
        if let Some(first) = seen.insert((alias.clone(), name.clone()), m.display()) {
            return Err(TransformError::Collision {
                destination: plain,
                first,
                second: m.display(),
            }
            .into());
        }
        let current = state.get(&alias, &name).cloned();
        if creates && current.is_some() && !moving.contains(&(alias.as_str(), name.as_str())) {
            return Err(TransformError::DestinationExists {
                destination: plain,
                source_name: m.display(),
            }
            .into());
        }
        let display = if to.slice.is_some() {
            format!("{plain}::[...]")
        } else {
            plain.clone()
        };
        let region = match (&to.slice, &current) {
            (Some(spec), Some(current)) => {
                Some(spec.resolve(&current.shape).map_err(|source| TransformError::Slice {
                    tensor: plain.clone(),
                    source,
                })?)
            }
            _ => None,
        };
        if current.is_none() && (writes == Writes::Existing || to.slice.is_some()) {
            return Err(TransformError::DestinationMissing {
                destination: display,
                source_name: m.display(),
            }
            .into());
        }
        out.push(Destination {
            alias,
            name,
            display,
            current: if creates { None } else { current },
            region,
        });
    }
    Ok(out)
}
