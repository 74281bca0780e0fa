//! Fuzzes `plan::host::to_document`, the walk that turns Python plan values (dicts, lists,
//! scalars) into plan documents, without an interpreter: the input describes a graph of host
//! values whose containers may share children or contain themselves, as Python objects can.
//!
//! Input: a sequence of nodes, node 0 the root. Each starts with a tag byte:
//!   0 null, 1 bool, 2 int (8 bytes), 3 float (8 bytes; NaN and infinities are refused),
//!   4 string (length byte, then bytes mapped onto a small alphabet), 5 list (count byte, then a
//!   2-byte node index per item), 6 mapping (count byte, then per entry a key of one or two
//!   characters (length byte, characters) and a 2-byte node index; a repeated key is dropped), 7 wrap (2-byte level count, 2-byte node index: that many one-item lists, one
//!   inside the other, around the node — deep nesting from a few bytes), 8 a value the host
//!   refuses. Node indices are taken modulo the number of nodes, so any node may refer to any.
//!
//! Besides "no panic", an independent reading of the graph predicts the answer: the walk
//! succeeds exactly when the unfolded value nests at most `MAX_DEPTH` levels (a cycle unfolds
//! forever), holds at most `MAX_NODES` values counting mapping keys, and reaches no refused
//! value; then it equals the unfolding. A success of up to 10,000 values must also be accepted by
//! the YAML parser as JSON text, at the same depth (the limits are the YAML parser's); an
//! override carrying it is accepted exactly when key and value nest at most `MAX_DEPTH` levels
//! together; `Plan::load` of it must not panic. A value past the depth limit (and small enough to
//! write out) must be refused by the YAML parser too. A refusal's location has at most
//! `MAX_DEPTH` + 1 steps.
#![no_main]

use brainsurgery::plan::document::{apply_override, parse_yaml};
use brainsurgery::plan::host::{depth_exceeds, to_document, BuildError, HostNode, HostValue, Refusal};
use brainsurgery::plan::{Location, Plan, PlanError, PlanSource, MAX_DEPTH, MAX_NODES};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<usize>),
    Map(Vec<(String, usize)>),
    /// `levels` (at least 1) one-item lists around `child`.
    Wrap {
        levels: u32,
        child: usize,
    },
    Refused,
}

const ALPHABET: &[u8] = b"abcxyz019_.:- ";

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    fn u64(&mut self) -> Option<u64> {
        let (bytes, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*bytes))
    }

    fn text(&mut self, len: usize) -> Option<String> {
        (0..len)
            .map(|_| self.byte().map(|b| ALPHABET[b as usize % ALPHABET.len()] as char))
            .collect()
    }

    fn node(&mut self) -> Option<Node> {
        Some(match self.byte()? % 9 {
            0 => Node::Null,
            1 => Node::Bool(self.byte()? & 1 == 1),
            2 => Node::Int(self.u64()? as i64),
            3 => Node::Float(f64::from_bits(self.u64()?)),
            4 => {
                let len = self.byte()? as usize % 16;
                Node::Str(self.text(len)?)
            }
            5 => {
                let n = self.byte()? % 8;
                Node::List((0..n).map(|_| self.u16().map(usize::from)).collect::<Option<_>>()?)
            }
            6 => {
                let n = self.byte()? % 8;
                let mut entries: Vec<(String, usize)> = Vec::new();
                for _ in 0..n {
                    let len = 1 + self.byte()? as usize % 2;
                    let (key, child) = (self.text(len)?, usize::from(self.u16()?));
                    // A mapping's keys are distinct (a later one would replace an earlier one).
                    if !entries.iter().any(|(k, _)| *k == key) {
                        entries.push((key, child));
                    }
                }
                Node::Map(entries)
            }
            7 => Node::Wrap {
                levels: u32::from(self.u16()?) + 1,
                child: usize::from(self.u16()?),
            },
            _ => Node::Refused,
        })
    }
}

struct Graph(Vec<Node>);

impl Graph {
    fn child(&self, i: usize) -> usize {
        i % self.0.len()
    }
}

/// A host value: node `index`, and for a wrap, how many of its lists are already outside.
#[derive(Clone, Copy)]
struct At<'g> {
    graph: &'g Graph,
    index: usize,
    level: u32,
}

impl<'g> At<'g> {
    fn of(graph: &'g Graph, index: usize) -> Self {
        At {
            graph,
            index: graph.child(index),
            level: 0,
        }
    }

    /// The value itself: a wrap with every level outside is its child.
    fn resolve(self) -> Self {
        match self.graph.0[self.index] {
            Node::Wrap { levels, child } if self.level >= levels => At::of(self.graph, child),
            _ => self,
        }
    }
}

impl HostNode for At<'_> {
    type Error = ();

    fn identity(&self) -> usize {
        let at = self.resolve();
        at.index * (u16::MAX as usize + 2) + at.level as usize
    }

    fn classify(&self) -> Result<HostValue<Self>, Refusal<()>> {
        let at = self.resolve();
        let graph = at.graph;
        Ok(match &graph.0[at.index] {
            Node::Null => HostValue::Scalar(Value::Null),
            Node::Bool(b) => HostValue::Scalar(Value::Bool(*b)),
            Node::Int(i) => HostValue::Scalar(Value::from(*i)),
            Node::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => HostValue::Scalar(Value::Number(n)),
                None => return Err(Refusal::Invalid(format!("{f} is not a finite number"))),
            },
            Node::Str(s) => HostValue::Scalar(Value::String(s.clone())),
            Node::List(items) => HostValue::List(items.iter().map(|&i| At::of(graph, i)).collect()),
            Node::Map(entries) => HostValue::Map(entries.iter().map(|(k, i)| (k.clone(), At::of(graph, *i))).collect()),
            Node::Wrap { .. } => HostValue::List(vec![At {
                level: at.level + 1,
                ..at
            }]),
            Node::Refused => return Err(Refusal::Invalid("cannot use a widget in a plan".into())),
        })
    }
}

/// What the unfolding of a node holds: nesting depth (`u64::MAX` when a cycle makes it
/// infinite), values counted like the walk (saturating), whether a refused value is reached.
#[derive(Clone, Copy, Debug)]
struct Facts {
    depth: u64,
    count: u64,
    refused: bool,
}

const INFINITE: u64 = u64::MAX;

/// The facts of every node, by a depth-first search that marks the nodes on the current path:
/// reaching one of them is a cycle.
fn facts(graph: &Graph) -> Vec<Facts> {
    #[derive(Clone, Copy)]
    enum Mark {
        New,
        OnPath,
        Done(Facts),
    }
    fn visit(graph: &Graph, i: usize, marks: &mut Vec<Mark>) -> Facts {
        match marks[i] {
            Mark::Done(f) => return f,
            Mark::OnPath => {
                return Facts {
                    depth: INFINITE,
                    count: INFINITE,
                    refused: false,
                }
            }
            Mark::New => {}
        }
        marks[i] = Mark::OnPath;
        let container = |children: &mut dyn Iterator<Item = (u64, usize)>, marks: &mut Vec<Mark>| {
            let mut f = Facts {
                depth: 1,
                count: 1,
                refused: false,
            };
            for (extra, child) in children {
                let c = visit(graph, graph.child(child), marks);
                f.depth = f.depth.max(c.depth.saturating_add(1));
                f.count = f.count.saturating_add(extra).saturating_add(c.count);
                f.refused |= c.refused;
            }
            f
        };
        let f = match &graph.0[i] {
            Node::Float(x) if !x.is_finite() => Facts {
                depth: 0,
                count: 1,
                refused: true,
            },
            Node::Refused => Facts {
                depth: 0,
                count: 1,
                refused: true,
            },
            Node::List(items) => container(&mut items.iter().map(|&c| (0, c)), marks),
            // A key counts as a value.
            Node::Map(entries) => container(&mut entries.iter().map(|&(_, c)| (1, c)), marks),
            Node::Wrap { levels, child } => {
                let c = visit(graph, graph.child(*child), marks);
                Facts {
                    depth: c.depth.saturating_add(u64::from(*levels)),
                    count: c.count.saturating_add(u64::from(*levels)),
                    refused: c.refused,
                }
            }
            _ => Facts {
                depth: 0,
                count: 1,
                refused: false,
            },
        };
        marks[i] = Mark::Done(f);
        f
    }
    let mut marks = vec![Mark::New; graph.0.len()];
    (0..graph.0.len()).map(|i| visit(graph, i, &mut marks)).collect()
}

/// The unfolded value, written out without limits; only called when it is finite and small.
fn unfold(at: At<'_>) -> Value {
    let at = at.resolve();
    match &at.graph.0[at.index] {
        Node::Null | Node::Refused => Value::Null,
        Node::Bool(b) => Value::Bool(*b),
        Node::Int(i) => Value::from(*i),
        Node::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Node::Str(s) => Value::String(s.clone()),
        Node::List(items) => Value::Array(items.iter().map(|&i| unfold(At::of(at.graph, i))).collect()),
        Node::Map(entries) => {
            let mut map = Map::new();
            for (k, i) in entries {
                map.insert(k.clone(), unfold(At::of(at.graph, *i)));
            }
            Value::Object(map)
        }
        Node::Wrap { .. } => Value::Array(vec![unfold(At {
            level: at.level + 1,
            ..at
        })]),
    }
}

/// Values up to this many are also written out and compared with the YAML parser's reading;
/// larger ones (from shared children) cost too many runs. The value limit itself is compared
/// with the parser's in `plan::host`'s unit tests.
const CHECKED_COUNT: u64 = 10_000;

fn depth_of(value: &Value) -> u64 {
    (0..=MAX_DEPTH as u64 + 1)
        .find(|&d| !depth_exceeds(value, d as usize))
        .unwrap_or(INFINITE)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let mut nodes = Vec::new();
    while let Some(node) = bytes.node() {
        nodes.push(node);
    }
    if nodes.is_empty() {
        return;
    }
    let graph = Graph(nodes);
    let expected = facts(&graph)[0];
    let within = expected.depth <= MAX_DEPTH as u64 && expected.count <= MAX_NODES as u64;
    let root = At::of(&graph, 0);

    match to_document(&root, &Location::root()) {
        Ok(value) => {
            assert!(within && !expected.refused, "accepted past a limit: {expected:?}");
            if expected.count <= CHECKED_COUNT {
                assert_eq!(value, unfold(root), "the walk and the unfolding differ");
                accepted(&value, expected);
            }
        }
        Err(BuildError::Plan(PlanError::Invalid { location, message })) => {
            assert!(
                !within || expected.refused,
                "refused within the limits: {expected:?}: {location}: {message}"
            );
            assert!(
                location.0.len() <= MAX_DEPTH + 1,
                "location of {} steps",
                location.0.len()
            );
            // Past the depth limit and small enough to write out: YAML refuses it too.
            let writable = expected.depth <= 2 * MAX_DEPTH as u64 && expected.count <= CHECKED_COUNT;
            if !expected.refused && writable {
                let text = serde_json::to_string(&unfold(root)).expect("JSON");
                assert!(
                    parse_yaml(&text, "fuzz").is_err(),
                    "YAML accepts what the walk refused: {expected:?}"
                );
            }
        }
        Err(BuildError::Plan(other)) => panic!("unexpected plan error kind: {other}"),
        Err(BuildError::Host(())) => panic!("the host never fails here"),
    }
});

/// What must hold of a value the walk accepted.
fn accepted(value: &Value, expected: Facts) {
    let depth = depth_of(value);
    assert_eq!(depth, expected.depth);
    let text = serde_json::to_string(value).expect("JSON");
    // The YAML parser takes the same value at the same depth.
    let yaml = parse_yaml(&text, "fuzz").unwrap_or_else(|e| panic!("YAML refuses what the walk accepted: {e}"));
    assert_eq!(depth_of(&yaml), depth);
    // As an override under one key: together at most MAX_DEPTH levels.
    let mut doc = Value::Object(Map::new());
    let applied = apply_override(&mut doc, &format!("k={text}"));
    assert_eq!(
        applied.is_ok(),
        depth < MAX_DEPTH as u64,
        "override of depth {depth}: {applied:?}"
    );
    // The plan layer reads it without panicking, whatever it says.
    let _ = Plan::load(&[PlanSource::Value(value.clone())], &[]);
}
