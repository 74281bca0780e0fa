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
    let mut rule = Destinations::new(matches, to, writes, transform, location)?;
    matches.iter().map(|m| rule.of(state, m)).collect()
}

/// [`destinations`] one match at a time, for transforms that check each match's operands
/// before the next one's destination (`assign`, `add`, `add_`).
pub(crate) struct Destinations<'a> {
    to: &'a Target,
    writes: Writes,
    location: &'a Location,
    /// The names a move vacates, which it may write to.
    moving: HashSet<(&'a str, &'a str)>,
    /// Destinations so far, and the match that rewrote to each.
    seen: HashMap<(String, String), String>,
}

impl<'a> Destinations<'a> {
    /// The rule for `matches` (all of them, so a move knows which names it vacates); refuses a
    /// slice where new tensors are written.
    pub fn new(
        matches: &'a [Match],
        to: &'a Target,
        writes: Writes,
        transform: &'static str,
        location: &'a Location,
    ) -> Result<Self, StepError> {
        if matches!(writes, Writes::New | Writes::Moved) && to.slice.is_some() {
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
        let moving = match writes {
            Writes::Moved => matches.iter().map(|m| (m.alias.as_str(), m.name.as_str())).collect(),
            _ => HashSet::new(),
        };
        Ok(Destinations {
            to,
            writes,
            location,
            moving,
            seen: HashMap::new(),
        })
    }

    /// The destination of match `m`.
    pub fn of(&mut self, state: &State, m: &Match) -> Result<Destination, StepError> {
        let (to, writes) = (self.to, self.writes);
        let name = to.expand(&m.captures).map_err(|source| TransformError::Template {
            tensor: m.display(),
            source,
        })?;
        let alias = match writes {
            // Writing into existing tensors needs an alias that exists.
            Writes::Existing => state.alias_for(to.alias.as_deref().or(Some(&m.alias)), &to.text, self.location)?,
            _ => to.alias.clone().unwrap_or_else(|| m.alias.clone()),
        };
        let plain = format!("{alias}::{name}");
        if let Some(first) = self.seen.insert((alias.clone(), name.clone()), m.display()) {
            return Err(TransformError::Collision {
                destination: plain,
                first,
                second: m.display(),
            }
            .into());
        }
        let creates = matches!(writes, Writes::New | Writes::Moved);
        let current = state.get(&alias, &name).cloned();
        if creates && current.is_some() && !self.moving.contains(&(alias.as_str(), name.as_str())) {
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
        Ok(Destination {
            alias,
            name,
            display,
            current: if creates { None } else { current },
            region,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::Reference;
    use crate::transforms::test_support::counting;

    /// `m::a.0`, `m::a.1` and `m::b.0`, each of shape (2, 3).
    fn state() -> State {
        let mut state = State::default();
        for name in ["a.0", "a.1", "b.0"] {
            state.insert("m", name, counting(&[2, 3], 0));
        }
        state.default_alias = Some("m".into());
        state
    }

    fn run(state: &State, from: &str, to: &str, writes: Writes) -> Result<Vec<Destination>, StepError> {
        let location = Location::root();
        let matches = state
            .select(&Reference::parse_str(from).unwrap(), &location)
            .map_err(StepError::from)?;
        destinations(state, &matches, &Target::parse_str(to).unwrap(), writes, "t", &location)
    }

    fn error(result: Result<Vec<Destination>, StepError>) -> String {
        result.map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn new_destinations_must_not_exist_nor_collide_nor_be_sliced() {
        let s = state();
        let d = run(&s, r"a\.(\d+)", r"c.\1", Writes::New).unwrap();
        assert_eq!((d[1].alias.as_str(), d[1].name.as_str()), ("m", "c.1"));
        assert!(d[1].current.is_none() && d[1].region.is_none());
        assert!(error(run(&s, r"a\.(\d+)", r"b.\1", Writes::New)).contains("`m::b.0` already exists"));
        assert!(error(run(&s, r"a\.(\d+)", "c", Writes::New)).contains("`m::a.0` and `m::a.1` both rewrite to `m::c`"));
        assert!(error(run(&s, r"a\.(\d+)", r"c.\1::[0]", Writes::New)).contains("t does not take a slice"));
        // A new alias is created by writing to it.
        assert_eq!(run(&s, r"a\.(\d+)", r"x::a.\1", Writes::New).unwrap()[0].alias, "x");
    }

    #[test]
    fn moved_destinations_may_be_names_the_step_vacates() {
        let mut s = state();
        s.insert("m", "p.p.a", counting(&[1], 0));
        s.insert("m", "p.a", counting(&[1], 0));
        // A shift: p.p.a → p.a while p.a → a.
        let d = run(&s, r"p\.(.*)", r"\1", Writes::Moved).unwrap();
        assert_eq!(d.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["p.a", "a"]);
        assert!(error(run(&s, r"p\.(.*)", r"\1", Writes::New)).contains("`m::p.a` already exists"));
        // A name nothing vacates.
        assert!(error(run(&s, r"a\.0", "b.0", Writes::Moved)).contains("`m::b.0` already exists"));
    }

    #[test]
    fn existing_destinations_must_exist_in_a_known_alias() {
        let s = state();
        let d = run(&s, r"a\.0", "b.0::[0]", Writes::Existing).unwrap();
        assert_eq!(d[0].display, "m::b.0::[...]");
        assert_eq!(d[0].shape(), Some(&[3][..]));
        assert_eq!(d[0].view().unwrap().unwrap().shape, vec![3]);
        assert!(error(run(&s, r"a\.0", "nope", Writes::Existing)).contains("destination `m::nope` does not exist"));
        assert!(error(run(&s, r"a\.0", "x::b.0", Writes::Existing)).contains("unknown alias `x`"));
        assert!(error(run(&s, r"a\.0", "b.0::[5]", Writes::Existing)).starts_with("slice on `m::b.0`"));
    }

    #[test]
    fn either_destinations_are_created_unless_sliced() {
        let s = state();
        let d = run(&s, r"a\.(\d+)", r"b.\1", Writes::Either).unwrap();
        assert!(d[0].current.is_some() && d[1].current.is_none());
        assert!(error(run(&s, r"a\.(\d+)", r"b.\1::[0]", Writes::Either)).contains("`m::b.1::[...]` does not exist"));
    }
}
