//! Plan documents built from a host language's values (Python dicts, lists and scalars), under
//! the limits a YAML plan has: at most [`MAX_DEPTH`] nested mappings and lists and at most
//! [`MAX_NODES`] values, no container inside itself. The host only says what each of its values
//! is ([`HostNode`]); the walk, the limits and the locations are here, so they are tested (and
//! fuzzed) without an interpreter.

use serde_json::{Map, Value};

use super::error::PlanError;
use super::location::{Location, Segment};
use super::{MAX_DEPTH, MAX_NODES};

/// One host value, as far as the plan is concerned.
pub enum HostValue<N> {
    /// A finished scalar: null, a boolean, a number or a string.
    Scalar(Value),
    /// A list (or tuple): its items, in order.
    List(Vec<N>),
    /// A mapping: its entries, in order, keys already strings.
    Map(Vec<(String, N)>),
}

/// Why a host value could not be classified.
pub enum Refusal<E> {
    /// The value cannot be part of a plan: what is wrong (the walk adds the location).
    Invalid(String),
    /// The host itself failed (an interrupt); passed through unchanged.
    Host(E),
}

/// A value of the host language.
pub trait HostNode: Sized {
    /// What the host itself can fail with.
    type Error;
    /// The identity of a container (Python's `id()`): a container met again on the way down
    /// from the root is a cycle.
    fn identity(&self) -> usize;
    /// What this value is.
    fn classify(&self) -> Result<HostValue<Self>, Refusal<Self::Error>>;
}

/// Why [`to_document`] failed.
pub enum BuildError<E> {
    /// The value is not a plan value, or is too deep, too large or cyclic.
    Plan(PlanError),
    /// The host failed.
    Host(E),
}

/// The document a host value stands for. `base` is where the value sits (the root of a plan
/// argument, or an override's key); depth counts from the value itself, as it does for a YAML
/// text. Locations are built only for an error, from the path walked so far.
pub fn to_document<N: HostNode>(root: &N, base: &Location) -> Result<Value, BuildError<N::Error>> {
    let mut walk = Walk {
        path: base.0.clone(),
        open: Vec::new(),
        nodes: 0,
    };
    walk.value(root)
}

struct Walk {
    /// The location of the value being converted.
    path: Vec<Segment>,
    /// Identities of the containers from the root down to here.
    open: Vec<usize>,
    /// Values (and mapping keys) converted so far.
    nodes: usize,
}

impl Walk {
    fn refuse<E>(&self, message: impl Into<String>) -> BuildError<E> {
        BuildError::Plan(PlanError::invalid(&Location(self.path.clone()), message))
    }

    /// Counts one more value (a mapping key counts too, as in the YAML parser's budget).
    fn count<E>(&mut self) -> Result<(), BuildError<E>> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.refuse(format!(
                "the plan holds more than {MAX_NODES} values (mappings, lists, keys and scalars), the limit of a plan document"
            )));
        }
        Ok(())
    }

    fn value<N: HostNode>(&mut self, node: &N) -> Result<Value, BuildError<N::Error>> {
        self.count()?;
        let value = match node.classify() {
            Ok(value) => value,
            Err(Refusal::Invalid(message)) => return Err(self.refuse(message)),
            Err(Refusal::Host(e)) => return Err(BuildError::Host(e)),
        };
        let result = match value {
            HostValue::Scalar(value) => return Ok(value),
            HostValue::List(items) => {
                self.enter(node.identity(), "list")?;
                self.list(items)
            }
            HostValue::Map(entries) => {
                self.enter(node.identity(), "mapping")?;
                self.map(entries)
            }
        };
        self.open.pop();
        result
    }

    /// Goes down into a container, unless it is one of those above it or one too many.
    fn enter<E>(&mut self, id: usize, kind: &str) -> Result<(), BuildError<E>> {
        if self.open.contains(&id) {
            return Err(self.refuse(format!(
                "this {kind} contains itself (a cycle), which no plan document can"
            )));
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(self.refuse(format!(
                "mappings and lists nest deeper than {MAX_DEPTH} levels, the limit of a plan document"
            )));
        }
        self.open.push(id);
        Ok(())
    }

    fn list<N: HostNode>(&mut self, items: Vec<N>) -> Result<Value, BuildError<N::Error>> {
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            self.path.push(Segment::Index(i));
            let value = self.value(item);
            self.path.pop();
            out.push(value?);
        }
        Ok(Value::Array(out))
    }

    fn map<N: HostNode>(&mut self, entries: Vec<(String, N)>) -> Result<Value, BuildError<N::Error>> {
        let mut out = Map::new();
        for (key, item) in entries {
            self.path.push(Segment::Key(key.clone()));
            let value = self.count().and_then(|()| self.value(&item));
            self.path.pop();
            out.insert(key, value?);
        }
        Ok(Value::Object(out))
    }
}

/// Nesting depth of a document: 0 for a scalar, 1 for a flat mapping or list. Iterative, so a
/// document of any depth is measured without recursion; stops counting past `limit`.
pub fn depth_exceeds(value: &Value, limit: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth + 1 > limit {
            return true;
        }
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A graph of host values: nodes refer to each other by index, so cycles and shared
    /// children can be written down.
    #[derive(Clone)]
    enum Node {
        Int(i64),
        Bad,
        List(Vec<usize>),
        Map(Vec<(String, usize)>),
    }

    fn map(entries: &[(&str, usize)]) -> Node {
        Node::Map(entries.iter().map(|&(k, i)| (k.to_owned(), i)).collect())
    }

    struct At<'g>(&'g [Node], usize);

    impl HostNode for At<'_> {
        type Error = ();
        fn identity(&self) -> usize {
            self.1
        }
        fn classify(&self) -> Result<HostValue<Self>, Refusal<()>> {
            let graph = self.0;
            Ok(match &graph[self.1] {
                Node::Int(i) => HostValue::Scalar(json!(i)),
                Node::Bad => return Err(Refusal::Invalid("cannot use a widget in a plan".into())),
                Node::List(items) => HostValue::List(items.iter().map(|&i| At(graph, i)).collect()),
                Node::Map(entries) => HostValue::Map(entries.iter().map(|(k, i)| (k.clone(), At(graph, *i))).collect()),
            })
        }
    }

    fn build(graph: &[Node]) -> Result<Value, String> {
        match to_document(&At(graph, 0), &Location::root()) {
            Ok(v) => Ok(v),
            Err(BuildError::Plan(e)) => Err(e.to_string()),
            Err(BuildError::Host(())) => Err("host".into()),
        }
    }

    /// `depth` lists, one inside the other, around an int.
    fn nested(depth: usize) -> Vec<Node> {
        let mut graph: Vec<Node> = (1..=depth).map(|i| Node::List(vec![i])).collect();
        graph.push(Node::Int(1));
        graph
    }

    #[test]
    fn converts_a_tree() {
        let graph = [
            map(&[("transforms", 1), ("n", 3)]),
            Node::List(vec![2, 3, 4]),
            map(&[]),
            Node::Int(7),
            Node::List(vec![]),
        ];
        assert_eq!(build(&graph).unwrap(), json!({"transforms": [{}, 7, []], "n": 7}));
    }

    #[test]
    fn depth_is_the_yaml_limit() {
        let ok = build(&nested(MAX_DEPTH)).unwrap();
        assert!(!depth_exceeds(&ok, MAX_DEPTH) && depth_exceeds(&ok, MAX_DEPTH - 1));
        let err = build(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.contains(&format!("deeper than {MAX_DEPTH}")), "{err}");
        // The location is the container that went past the limit.
        assert!(err.starts_with(&format!("{}: ", "[0]".repeat(MAX_DEPTH))), "{err}");
        // Far deeper input stops at the limit (no recursion into it, no long location).
        let err = build(&nested(100_000)).unwrap_err();
        assert!(err.len() < 4 * MAX_DEPTH + 200, "{}", err.len());
    }

    #[test]
    fn a_container_inside_itself_is_refused_with_its_location() {
        // transforms = [transforms]
        let graph = [map(&[("transforms", 1)]), Node::List(vec![1])];
        let err = build(&graph).unwrap_err();
        assert_eq!(
            err,
            "transforms[0]: this list contains itself (a cycle), which no plan document can"
        );
        // d = {"a": {"b": d}}
        let graph = [map(&[("a", 1)]), map(&[("b", 0)])];
        let err = build(&graph).unwrap_err();
        assert!(err.starts_with("a.b: this mapping contains itself"), "{err}");
    }

    #[test]
    fn shared_children_are_not_cycles_but_count_every_time() {
        // [x, x] with x = [1]: the same list twice, side by side.
        let graph = [Node::List(vec![1, 1]), Node::List(vec![2]), Node::Int(1)];
        assert_eq!(build(&graph).unwrap(), json!([[1], [1]]));
        // x = [x', x'] nested 40 deep: 2^40 values when unfolded, stopped by the value budget.
        let mut graph: Vec<Node> = (1..=40).map(|i| Node::List(vec![i, i])).collect();
        graph.push(Node::Int(0));
        let err = build(&graph).unwrap_err();
        assert!(err.contains(&format!("more than {MAX_NODES} values")), "{err}");
    }

    #[test]
    fn the_value_budget_counts_like_the_yaml_parser() {
        use crate::plan::document::parse_yaml;
        // A list of n - 1 ints is n values; a mapping of k keys to ints is 1 + 2k.
        let list = |n: usize| {
            let mut graph = vec![Node::List(vec![1; n - 1])];
            graph.push(Node::Int(0));
            graph
        };
        assert!(build(&list(MAX_NODES)).is_ok());
        assert!(build(&list(MAX_NODES + 1)).is_err());
        let keys: Vec<String> = (0..MAX_NODES / 2).map(|i| format!("k{i}")).collect();
        let map = |k: usize| {
            vec![
                Node::Map(keys[..k].iter().map(|key| (key.clone(), 1)).collect()),
                Node::Int(0),
            ]
        };
        let yaml_map = |k: usize| {
            let entries: Vec<String> = keys[..k].iter().map(|key| format!("{key}: 0")).collect();
            format!("{{{}}}", entries.join(","))
        };
        // The parser counts keys too: the same mapping is the most both take (each YAML parse
        // takes ~2 s in a debug build, so only these two).
        let most = (MAX_NODES - 1) / 2;
        assert!(build(&map(most)).is_ok() && parse_yaml(&yaml_map(most), "t").is_ok());
        assert!(build(&map(most + 1)).is_err() && parse_yaml(&yaml_map(most + 1), "t").is_err());
    }

    #[test]
    fn refusals_name_the_value() {
        let graph = [map(&[("output", 1)]), map(&[("path", 2)]), Node::Bad];
        assert_eq!(build(&graph).unwrap_err(), "output.path: cannot use a widget in a plan");
    }

    #[test]
    fn depth_of_documents() {
        assert!(!depth_exceeds(&json!(1), 0));
        assert!(depth_exceeds(&json!([]), 0));
        assert!(!depth_exceeds(&json!({"a": [1, {"b": 2}]}), 3));
        assert!(depth_exceeds(&json!({"a": [1, {"b": []}]}), 3));
    }
}
