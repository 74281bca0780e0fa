//! Selectors: the matching half of a reference. A [`Selector`] is either a Python-`re` regex that
//! must match the whole tensor name, or a structured pattern over the name's dot-separated
//! segments. Matching yields [`Captures`], consumed by templates (`template.rs`). Choosing the
//! alias and ordering matches is the executor's job.

use std::fmt;

use fancy_regex::Regex;

use super::ReferenceError;

/// Characters that make a pattern a real regex; anything else is matched literally.
const META: &[char] = &['\\', '.', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|'];

/// One named capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// A single text: a regex named group (`None` when it did not participate), a structured
    /// `$x` or `~x::` segment, or one group of `~x,y::`.
    One(Option<String>),
    /// A structured `*xs` capture: zero or more segments.
    List(Vec<String>),
}

impl Capture {
    /// The capture as text: a list is joined with `.`, a non-participating group is empty.
    pub fn joined(&self) -> String {
        match self {
            Capture::One(s) => s.clone().unwrap_or_default(),
            Capture::List(v) => v.join("."),
        }
    }
}

/// The result of a successful match: positional groups (0 = whole name, then regex groups) and
/// named captures (regex named groups, structured `$x`, `~x::`, `*xs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captures {
    groups: Vec<Option<String>>,
    named: Vec<(String, Capture)>,
}

impl Captures {
    /// The whole matched name (group 0).
    pub fn whole(&self) -> &str {
        self.groups.first().and_then(|g| g.as_deref()).unwrap_or("")
    }

    /// Number of positional groups excluding group 0 (always 0 for structured patterns).
    pub fn group_count(&self) -> usize {
        self.groups.len().saturating_sub(1)
    }

    /// Positional group `i`; `None` if it does not exist or did not participate.
    pub fn get(&self, i: usize) -> Option<&str> {
        self.groups.get(i).and_then(|g| g.as_deref())
    }

    /// Named capture `name`, if the pattern defines it.
    pub fn name(&self, name: &str) -> Option<&Capture> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Names of all named captures, in pattern order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.named.iter().map(|(n, _)| n.as_str())
    }
}

/// What captures a selector can produce; used to validate templates before matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInfo {
    /// Number of positional groups excluding group 0.
    pub groups: usize,
    /// Named captures with `true` for list captures.
    pub named: Vec<(String, bool)>,
}

/// How a regex selector matches; literal patterns skip the regex engine (plans often list
/// thousands of exact names).
#[derive(Debug, Clone)]
enum Matcher {
    /// The one name the pattern can match: a pattern of plain characters and metacharacters
    /// escaped with `\` (`model\.layers\.0\.w` is `model.layers.0.w`), matched by equality.
    Exact(String),
    /// Only `.` as metacharacter (this many): char-by-char, `.` matching anything but `\n`.
    Dotted(usize),
    /// A real regex, anchored as `\A(?:pat)\z`.
    Regex(Box<Regex>),
}

/// A Python-`re` pattern that must match the whole name.
#[derive(Debug, Clone)]
pub struct RegexSelector {
    pattern: String,
    matcher: Matcher,
}

/// Translates the Python spellings fancy-regex reads differently: `\Z` is the absolute end in
/// Python but "end or before a final newline" in fancy-regex.
fn translate_python(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    let mut class_start = false;
    while let Some(c) = chars.next() {
        let was_start = class_start;
        class_start = false;
        match c {
            '\\' => {
                let next = chars.next();
                match next {
                    Some('Z') if !in_class => out.push_str("\\z"),
                    Some(n) => {
                        out.push('\\');
                        out.push(n);
                    }
                    None => out.push('\\'),
                }
            }
            '[' if !in_class => {
                in_class = true;
                class_start = true;
                out.push(c);
                if chars.peek() == Some(&'^') {
                    out.push('^');
                    chars.next();
                }
            }
            // A `]` right after `[` or `[^` is literal in Python.
            ']' if in_class && !was_start => {
                in_class = false;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn compile(pattern: &str, shown: &str) -> Result<Regex, ReferenceError> {
    // Compile the pattern alone first so a syntax error's position is in the user's text, not
    // in the anchored wrapper.
    let translated = translate_python(pattern);
    if let Err(e) = Regex::new(&translated) {
        return Err(ReferenceError::Regex {
            pattern: shown.to_string(),
            message: e.to_string(),
        });
    }
    Regex::new(&format!(r"\A(?:{})\z", translate_python(pattern))).map_err(|e| ReferenceError::Regex {
        pattern: shown.to_string(),
        message: e.to_string(),
    })
}

/// The only string `pattern` matches, when it is made of plain characters and escaped
/// metacharacters: Python's `re` (and fancy-regex) read `\.`, `\(`, `\\`, ... as that character,
/// and every other character outside [`META`] as itself. Escaped letters and digits (`\d`, `\1`)
/// and escaped characters outside [`META`] are left to the regex engine.
fn unescaped_literal(pattern: &str) -> Option<String> {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if META.contains(&e) => out.push(e),
                _ => return None,
            },
            c if META.contains(&c) => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

impl RegexSelector {
    /// Compiles a Python-`re` pattern for whole-name matching.
    pub fn new(pattern: &str) -> Result<Self, ReferenceError> {
        let matcher = if let Some(literal) = unescaped_literal(pattern) {
            Matcher::Exact(literal)
        } else if !pattern.chars().any(|c| c != '.' && META.contains(&c)) {
            Matcher::Dotted(pattern.matches('.').count())
        } else {
            Matcher::Regex(Box::new(compile(pattern, pattern)?))
        };
        Ok(RegexSelector {
            pattern: pattern.to_string(),
            matcher,
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    fn dotted_match(&self, name: &str, dots: usize) -> bool {
        // A `.` takes one character of 1 to 4 bytes, any other character itself: a cheap
        // rejection for the names of a scan.
        if name.len() < self.pattern.len() || name.len() > self.pattern.len() + 3 * dots {
            return false;
        }
        let mut n = name.chars();
        for p in self.pattern.chars() {
            match n.next() {
                Some(c) if c == p || (p == '.' && c != '\n') => {}
                _ => return false,
            }
        }
        n.next().is_none()
    }

    /// True if the whole name matches. A regex runtime error (backtrack limit) counts as no match.
    pub fn is_match(&self, name: &str) -> bool {
        match &self.matcher {
            Matcher::Exact(literal) => literal == name,
            Matcher::Dotted(dots) => self.dotted_match(name, *dots),
            Matcher::Regex(re) => re.is_match(name).unwrap_or(false),
        }
    }

    /// Captures of a whole-name match, or an error when the regex engine cannot decide (it hit
    /// its backtracking limit). The regex runs once per name (issue 8).
    pub fn try_captures(&self, name: &str) -> Result<Option<Captures>, ReferenceError> {
        let re = match &self.matcher {
            Matcher::Regex(re) => re,
            _ => {
                return Ok(self.is_match(name).then(|| Captures {
                    groups: vec![Some(name.to_string())],
                    named: Vec::new(),
                }))
            }
        };
        let failed = |e: fancy_regex::Error| ReferenceError::MatchFailed {
            pattern: self.pattern.clone(),
            name: name.to_string(),
            message: e.to_string(),
        };
        // Most names of a scan do not match: `is_match` rejects them with the regex crate's
        // literal prefilters and DFA, several times faster than a failed `captures` (issue 8).
        if !re.is_match(name).map_err(failed)? {
            return Ok(None);
        }
        let Some(caps) = re.captures(name).map_err(failed)? else {
            return Ok(None);
        };
        let groups: Vec<Option<String>> = (0..caps.len())
            .map(|i| caps.get(i).map(|m| m.as_str().to_string()))
            .collect();
        let named = re
            .capture_names()
            .enumerate()
            .filter_map(|(i, n)| {
                let g = groups.get(i).cloned().flatten();
                n.map(|n| (n.to_string(), Capture::One(g)))
            })
            .collect();
        Ok(Some(Captures { groups, named }))
    }

    /// Captures of a whole-name match; an undecidable match counts as none.
    pub fn captures(&self, name: &str) -> Option<Captures> {
        self.try_captures(name).ok().flatten()
    }

    fn info(&self) -> CaptureInfo {
        match &self.matcher {
            Matcher::Regex(re) => CaptureInfo {
                groups: re.captures_len().saturating_sub(1),
                named: re.capture_names().flatten().map(|n| (n.to_string(), false)).collect(),
            },
            _ => CaptureInfo {
                groups: 0,
                named: Vec::new(),
            },
        }
    }
}

/// One token of a structured pattern.
#[derive(Debug, Clone)]
enum Token {
    Literal(String),
    One(String),
    Many(String),
    /// `~REGEX`, `~x::REGEX` (whole segment as x) or `~x,y::REGEX` (groups as x, y).
    Regex {
        regex: Box<Regex>,
        names: Vec<String>,
        whole: bool,
    },
}

/// A structured pattern: tokens matched against the dot-separated segments of a name.
#[derive(Debug, Clone)]
pub struct StructuredPattern {
    tokens: Vec<Token>,
    text: String,
    literal: Option<String>,
}

/// True for `[A-Za-z_][A-Za-z0-9_]*`, the syntax of capture names.
pub(crate) fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Reads one structured token from a plan value: strings, and integers as their decimal text
/// (YAML turns `[layers, 0]` into a number).
pub(crate) fn token_text(value: &serde_json::Value) -> Result<String, ReferenceError> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        other => Err(ReferenceError::InvalidToken {
            token: other.to_string(),
            reason: "tokens must be strings or integers",
        }),
    }
}

/// Renders a token list for messages: `[model, layers, $i, *rest]`.
pub(crate) fn render_tokens(tokens: &[String]) -> String {
    format!("[{}]", tokens.join(", "))
}

fn capture_name(token: &str, name: &str) -> Result<String, ReferenceError> {
    if is_ident(name) {
        Ok(name.to_string())
    } else {
        Err(ReferenceError::InvalidToken {
            token: token.to_string(),
            reason: "capture names must be identifiers",
        })
    }
}

impl StructuredPattern {
    /// Parses source tokens. Literal tokens containing dots are split into several segments.
    pub fn new(tokens: &[String]) -> Result<Self, ReferenceError> {
        let mut out = Vec::with_capacity(tokens.len());
        let mut seen: Vec<String> = Vec::new();
        let mut bind = |name: String| -> Result<String, ReferenceError> {
            if seen.contains(&name) {
                return Err(ReferenceError::DuplicateCapture { name });
            }
            seen.push(name.clone());
            Ok(name)
        };
        for tok in tokens {
            if let Some(name) = tok.strip_prefix('$') {
                out.push(Token::One(bind(capture_name(tok, name)?)?));
            } else if let Some(name) = tok.strip_prefix('*') {
                out.push(Token::Many(bind(capture_name(tok, name)?)?));
            } else if let Some(body) = tok.strip_prefix('~') {
                // `~x,y::REGEX` only when the head is a list of identifiers; else it is all regex.
                let (names, src) = match body.split_once("::") {
                    Some((head, rest)) if head.split(',').all(|n| is_ident(n.trim())) => {
                        (head.split(',').map(|n| n.trim().to_string()).collect::<Vec<_>>(), rest)
                    }
                    _ => (Vec::new(), body),
                };
                if src.is_empty() {
                    return Err(ReferenceError::InvalidToken {
                        token: tok.clone(),
                        reason: "empty regex",
                    });
                }
                let regex = compile(src, src)?;
                let whole = names.len() == 1;
                let groups = regex.captures_len().saturating_sub(1);
                if names.len() > 1 && names.len() != groups {
                    return Err(ReferenceError::GroupCountMismatch {
                        token: tok.clone(),
                        names: names.len(),
                        groups,
                    });
                }
                let names = names.into_iter().map(&mut bind).collect::<Result<Vec<_>, _>>()?;
                out.push(Token::Regex {
                    regex: Box::new(regex),
                    names,
                    whole,
                });
            } else {
                out.extend(tok.split('.').map(|s| Token::Literal(s.to_string())));
            }
        }
        let literal = out
            .iter()
            .map(|t| match t {
                Token::Literal(s) => Some(s.as_str()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("."));
        Ok(StructuredPattern {
            tokens: out,
            text: render_tokens(tokens),
            literal,
        })
    }

    /// Matches greedily from the left (a `*` takes as many segments as still allow a match),
    /// backtracking over every `*`.
    fn matches(&self, name: &str, binds: &mut Vec<(String, Capture)>) -> bool {
        let segs: Vec<&str> = name.split('.').collect();
        self.step(0, &segs, binds)
    }

    fn step(&self, ti: usize, segs: &[&str], binds: &mut Vec<(String, Capture)>) -> bool {
        let Some(tok) = self.tokens.get(ti) else {
            return segs.is_empty();
        };
        match tok {
            Token::Many(name) => {
                // Remaining tokens other than `*` each need one segment.
                let need = self.tokens[ti + 1..]
                    .iter()
                    .filter(|t| !matches!(t, Token::Many(_)))
                    .count();
                let max = segs.len().saturating_sub(need);
                for take in (0..=max).rev() {
                    binds.push((
                        name.clone(),
                        Capture::List(segs[..take].iter().map(|s| s.to_string()).collect()),
                    ));
                    if self.step(ti + 1, &segs[take..], binds) {
                        return true;
                    }
                    binds.pop();
                }
                false
            }
            _ => {
                let Some((seg, rest)) = segs.split_first() else {
                    return false;
                };
                let mark = binds.len();
                let ok = match tok {
                    Token::Literal(l) => l == seg,
                    Token::One(name) => {
                        binds.push((name.clone(), Capture::One(Some(seg.to_string()))));
                        true
                    }
                    Token::Regex { regex, names, whole } => match regex.captures(seg) {
                        Ok(Some(c)) => {
                            if *whole {
                                binds.extend(names.first().map(|n| (n.clone(), Capture::One(Some(seg.to_string())))));
                            } else {
                                for (i, n) in names.iter().enumerate() {
                                    binds.push((n.clone(), Capture::One(c.get(i + 1).map(|m| m.as_str().to_string()))));
                                }
                            }
                            true
                        }
                        _ => false,
                    },
                    Token::Many(_) => false,
                };
                if ok && self.step(ti + 1, rest, binds) {
                    return true;
                }
                binds.truncate(mark);
                false
            }
        }
    }

    fn info(&self) -> CaptureInfo {
        let mut named = Vec::new();
        for t in &self.tokens {
            match t {
                Token::One(n) => named.push((n.clone(), false)),
                Token::Many(n) => named.push((n.clone(), true)),
                Token::Regex { names, .. } => named.extend(names.iter().map(|n| (n.clone(), false))),
                Token::Literal(_) => {}
            }
        }
        CaptureInfo { groups: 0, named }
    }
}

/// The matching half of a reference.
#[derive(Debug, Clone)]
pub enum Selector {
    /// A Python-`re` pattern matched against the whole name.
    Regex(RegexSelector),
    /// A structured pattern over dot-separated segments.
    Structured(StructuredPattern),
}

impl Selector {
    /// Captures of a whole-name match; an error when a regex cannot decide (see
    /// [`ReferenceError::MatchFailed`]). Executors use this one.
    pub fn try_captures(&self, name: &str) -> Result<Option<Captures>, ReferenceError> {
        match self {
            Selector::Regex(r) => r.try_captures(name),
            Selector::Structured(_) => Ok(self.captures(name)),
        }
    }

    /// Captures if `name` matches, else `None`.
    pub fn captures(&self, name: &str) -> Option<Captures> {
        match self {
            Selector::Regex(r) => r.captures(name),
            Selector::Structured(s) => {
                let mut named = Vec::new();
                s.matches(name, &mut named).then(|| Captures {
                    groups: vec![Some(name.to_string())],
                    named,
                })
            }
        }
    }

    /// True if `name` matches (cheaper than [`Selector::captures`] for literal patterns).
    pub fn is_match(&self, name: &str) -> bool {
        match self {
            Selector::Regex(r) => r.is_match(name),
            Selector::Structured(s) => s.matches(name, &mut Vec::new()),
        }
    }

    /// The only name this selector can match, when that is provable: a regex of plain characters
    /// and escaped metacharacters (`lm_head`, `model\.norm\.weight`; not `model.norm.weight`,
    /// whose `.` matches any character), or a structured pattern of literal segments. Lets
    /// selection look the name up instead of scanning.
    pub fn literal(&self) -> Option<&str> {
        match self {
            Selector::Regex(r) => match &r.matcher {
                Matcher::Exact(literal) => Some(literal.as_str()),
                _ => None,
            },
            Selector::Structured(s) => s.literal.as_deref(),
        }
    }

    /// The captures this selector produces, for validating templates.
    pub fn capture_info(&self) -> CaptureInfo {
        match self {
            Selector::Regex(r) => r.info(),
            Selector::Structured(s) => s.info(),
        }
    }
}

impl fmt::Display for Selector {
    /// The pattern as written (structured patterns as `[tok, tok]`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Regex(r) => f.write_str(&r.pattern),
            Selector::Structured(s) => f.write_str(&s.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(p: &str) -> Selector {
        Selector::Regex(RegexSelector::new(p).expect("valid regex"))
    }

    fn st(tokens: &[&str]) -> Result<Selector, ReferenceError> {
        let t: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        StructuredPattern::new(&t).map(Selector::Structured)
    }

    #[test]
    fn an_undecidable_match_is_an_error_not_a_miss() {
        // Past fancy-regex's backtracking limit the answer is unknown; Python's
        // `re` says this name matches.
        let s = re(r"(?=a)(a|aa)*c|.*");
        let name = format!("{}b", "a".repeat(40));
        match s.try_captures(&name) {
            Err(ReferenceError::MatchFailed { name: n, .. }) => assert_eq!(n, name),
            Ok(Some(_)) => {} // a future engine may decide it: then it must match
            other => panic!("expected a match or MatchFailed, got {other:?}"),
        }
    }

    #[test]
    fn regex_must_match_whole_name() {
        let s = re(r"model\.layers");
        assert!(s.is_match("model.layers"));
        assert!(!s.is_match("model.layers.0.w"));
        assert!(!s.is_match("x.model.layers"));
        // Alternation is grouped before anchoring.
        let s = re("a|b.c");
        assert!(s.is_match("a") && s.is_match("b.c") && !s.is_match("a.c"));
    }

    #[test]
    fn literal_and_dotted_fast_paths() {
        let s = re("lm_head");
        assert_eq!(s.literal(), Some("lm_head"));
        assert!(s.is_match("lm_head") && !s.is_match("lm_head2"));
        // `.` keeps regex meaning in the fast path.
        let s = re("h.0.w");
        assert_eq!(s.literal(), None);
        assert!(s.is_match("h.0.w") && s.is_match("hx0.w") && !s.is_match("h.0.w2") && !s.is_match("h.0."));
        let c = s.captures("h.0.w").expect("matches");
        assert_eq!((c.whole(), c.group_count()), ("h.0.w", 0));
        // Escaped metacharacters are literal too: the pattern matches exactly one string.
        let s = re(r"model\.layers\.0\.w\(x\)\[1\]\\");
        assert_eq!(s.literal(), Some(r"model.layers.0.w(x)[1]\"));
        assert!(s.is_match(r"model.layers.0.w(x)[1]\") && !s.is_match(r"modelXlayers.0.w(x)[1]\"));
        let c = s.captures(r"model.layers.0.w(x)[1]\").expect("matches");
        assert_eq!((c.whole(), c.group_count()), (r"model.layers.0.w(x)[1]\", 0));
        // Escapes that are classes, references or anchors are not literals.
        for p in [r"a\d", r"(a)\1", r"a\Z", r"a\-b", r"a\.b.c"] {
            assert_eq!(re(p).literal(), None, "{p}");
        }
        assert!(RegexSelector::new(r"a\").is_err());
        assert!(re(r"a\-b").is_match("a-b"));
    }

    #[test]
    fn python_regex_features() {
        let s = re(r"model\.(?!lm_head).*");
        assert!(s.is_match("model.embed.w") && !s.is_match("model.lm_head.w"));
        let s = re(r".*(?<!\.bias)");
        assert!(s.is_match("a.weight") && !s.is_match("a.bias"));
        let s = re(r".*(?<=\.)weight");
        assert!(s.is_match("a.weight") && !s.is_match("aweight"));
        let s = re(r"(?P<blk>\w+)\.(?P=blk)");
        assert!(s.is_match("h.h") && !s.is_match("h.g"));
        let c = re(r"h\.(?P<i>\d+)\.(\w+)").captures("h.12.w").expect("matches");
        assert_eq!(
            (c.get(0), c.get(1), c.get(2), c.group_count()),
            (Some("h.12.w"), Some("12"), Some("w"), 2)
        );
        assert_eq!(c.name("i"), Some(&Capture::One(Some("12".into()))));
        // A group that did not participate.
        let c = re("(a)|(b)").captures("b").expect("matches");
        assert_eq!((c.get(1), c.get(2)), (None, Some("b")));
        // Python `\Z` is the absolute end.
        assert!(re(r"a\Z").is_match("a") && !re(r"a\Z").is_match("a\n"));
        // `\Z` inside a class and an escaped backslash are left alone.
        assert_eq!(translate_python(r"[\Z]\\Z[]\Z]"), r"[\Z]\\Z[]\Z]");
    }

    #[test]
    fn regex_error_carries_pattern_and_message() {
        let e = RegexSelector::new("a(b").expect_err("unbalanced");
        match &e {
            ReferenceError::Regex { pattern, message } => {
                assert!(pattern == "a(b" && !message.is_empty())
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().starts_with("invalid regex `a(b`: "));
    }

    #[test]
    fn structured_tokens() {
        let s = st(&["model", "layers", "$i", "*rest"]).expect("valid");
        let c = s.captures("model.layers.3.mlp.w").expect("matches");
        assert_eq!(c.name("i"), Some(&Capture::One(Some("3".into()))));
        assert_eq!(c.name("rest"), Some(&Capture::List(vec!["mlp".into(), "w".into()])));
        assert_eq!(c.whole(), "model.layers.3.mlp.w");
        assert!(!s.is_match("model.layers"));
        assert!(s.is_match("model.layers.3"));
        // `*` may be empty.
        let c = s.captures("model.layers.3").expect("matches");
        assert_eq!(c.name("rest"), Some(&Capture::List(vec![])));
        // Dotted literals are split into segments.
        assert!(st(&["model.layers", "$i"]).expect("valid").is_match("model.layers.0"));
        assert_eq!(st(&["a", "b"]).expect("valid").literal(), Some("a.b"));
    }

    #[test]
    fn structured_regex_tokens() {
        let s = st(&["*pre", r"~\d+", "w"]).expect("valid");
        assert!(s.is_match("h.12.w") && !s.is_match("h.x.w") && !s.is_match("h.12a.w"));
        let s = st(&["h", r"~n::\d+", "w"]).expect("valid");
        assert_eq!(
            s.captures("h.7.w").and_then(|c| c.name("n").cloned()),
            Some(Capture::One(Some("7".into())))
        );
        let s = st(&["~kind,idx::([a-z]+)_(\\d+)", "*rest"]).expect("valid");
        let c = s.captures("expert_3.w").expect("matches");
        assert_eq!(c.name("kind"), Some(&Capture::One(Some("expert".into()))));
        assert_eq!(c.name("idx"), Some(&Capture::One(Some("3".into()))));
    }

    #[test]
    fn structured_backtracking_two_stars() {
        let s = st(&["*a", "mlp", "*b", "$last"]).expect("valid");
        let c = s.captures("x.mlp.y.mlp.z.w").expect("matches");
        // Greedy: the first `*` takes as much as still allows a match.
        assert_eq!(
            c.name("a"),
            Some(&Capture::List(vec!["x".into(), "mlp".into(), "y".into()]))
        );
        assert_eq!(c.name("b"), Some(&Capture::List(vec!["z".into()])));
        assert_eq!(c.name("last"), Some(&Capture::One(Some("w".into()))));
        assert!(!s.is_match("x.y.z"));
    }

    #[test]
    fn duplicate_capture() {
        assert_eq!(
            st(&["$x", "*x"]).err(),
            Some(ReferenceError::DuplicateCapture { name: "x".into() })
        );
    }

    #[test]
    fn group_count_mismatch() {
        let e = st(&[r"~a,b::(\d+)"]).err();
        assert_eq!(
            e,
            Some(ReferenceError::GroupCountMismatch {
                token: r"~a,b::(\d+)".into(),
                names: 2,
                groups: 1
            })
        );
    }

    #[test]
    fn invalid_token() {
        assert!(matches!(st(&["$"]), Err(ReferenceError::InvalidToken { .. })));
        assert!(matches!(st(&["*1x"]), Err(ReferenceError::InvalidToken { .. })));
        assert!(matches!(st(&["~"]), Err(ReferenceError::InvalidToken { .. })));
        assert!(matches!(st(&["~x::("]), Err(ReferenceError::Regex { .. })));
    }
}
