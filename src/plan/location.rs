//! Where in a plan document something is: `transforms[3].scale_.by`. Errors carry one of these
//! instead of a formatted string, so the CLI and Python report the same place.

use std::fmt;

/// One step of a [`Location`]: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A mapping key.
    Key(String),
    /// A list index.
    Index(usize),
}

/// A path from the root of the plan document to one value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location(pub Vec<Segment>);

impl Location {
    /// The document root.
    pub fn root() -> Self {
        Location(Vec::new())
    }

    /// This location extended by a key.
    pub fn key(&self, key: &str) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_owned()));
        Location(segments)
    }

    /// This location extended by a list index.
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Location(segments)
    }

    /// The index of the transform this location lies in, when it lies in `transforms[i]`.
    pub fn transform_index(&self) -> Option<usize> {
        match self.0.as_slice() {
            [Segment::Key(k), Segment::Index(i), ..] if k == "transforms" => Some(*i),
            _ => None,
        }
    }
}

impl Location {
    /// The name of the transform this location lies in (`scale_` in `transforms[3].scale_.by`).
    pub fn transform_name(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Segment::Key(k), Segment::Index(_), Segment::Key(name), ..] if k == "transforms" => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<plan>");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_a_path() {
        let loc = Location::root().key("transforms").index(3).key("scale_").key("by");
        assert_eq!(loc.to_string(), "transforms[3].scale_.by");
        assert_eq!(loc.transform_index(), Some(3));
        assert_eq!(loc.transform_name(), Some("scale_"));
        assert_eq!(Location::root().to_string(), "<plan>");
    }
}
