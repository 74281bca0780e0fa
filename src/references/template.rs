//! Rewrite templates: the destination half of `to`, `from_b`, `right`, ... A template is a
//! Python-`re` replacement string (`\1`, `\g<1>`, `\g<name>`, `\g<0>`, `\\`; all else literal) or
//! a structured list of output tokens (`$x`, `*xs`, literals with `${x}`) joined with dots.
//! Alias and slice splitting live in `reference.rs`; collision detection is the executor's.

use std::fmt;

use super::pattern::{is_ident, render_tokens, Capture, CaptureInfo, Captures, Selector};
use super::ReferenceError;

/// A reference to a capture: positional group number or name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRef {
    /// Positional group (0 = whole name).
    Index(usize),
    /// Named group or structured capture.
    Name(String),
}

impl fmt::Display for GroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupRef::Index(i) => write!(f, "{i}"),
            GroupRef::Name(n) => f.write_str(n),
        }
    }
}

/// A piece of a string template or of a list-template literal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// Expands to the capture's text (lists joined with `.`, missing groups empty).
    Group(GroupRef),
}

/// One output token of a list template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OutToken {
    /// `$x`: exactly one single capture.
    One(GroupRef),
    /// `*xs`: a list capture spliced as segments.
    Many(String),
    /// A literal with `${x}` interpolations.
    Literal(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    String(Vec<Piece>),
    List(Vec<OutToken>),
}

/// A parsed rewrite template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    kind: Kind,
    text: String,
}

fn bad(template: &str, position: usize, reason: &'static str) -> ReferenceError {
    ReferenceError::BadTemplate {
        template: template.to_string(),
        position,
        reason,
    }
}

fn push_text(pieces: &mut Vec<Piece>, s: &str) {
    if let Some(Piece::Text(t)) = pieces.last_mut() {
        t.push_str(s);
    } else {
        pieces.push(Piece::Text(s.to_string()));
    }
}

fn group_ref(name: &str) -> Option<GroupRef> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok().map(GroupRef::Index)
    } else if is_ident(name) {
        Some(GroupRef::Name(name.to_string()))
    } else {
        None
    }
}

fn parse_string_pieces(text: &str) -> Result<Vec<Piece>, ReferenceError> {
    let mut pieces = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut lit_start = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        let here = i;
        let flush = |pieces: &mut Vec<Piece>| push_text(pieces, &text[lit_start..here]);
        match bytes.get(i + 1) {
            Some(b'\\') => {
                flush(&mut pieces);
                push_text(&mut pieces, "\\");
                i += 2;
            }
            Some(d) if d.is_ascii_digit() => {
                flush(&mut pieces);
                // Like Python, at most two digits form a group number.
                let len = if bytes.get(i + 2).is_some_and(|b| b.is_ascii_digit()) {
                    2
                } else {
                    1
                };
                let n = text[i + 1..i + 1 + len]
                    .parse()
                    .map_err(|_| bad(text, i, "invalid group number"))?;
                pieces.push(Piece::Group(GroupRef::Index(n)));
                i += 1 + len;
            }
            Some(b'g') => {
                flush(&mut pieces);
                if bytes.get(i + 2) != Some(&b'<') {
                    return Err(bad(text, i, "missing `<` after \\g"));
                }
                let body = &text[i + 3..];
                let end = body.find('>').ok_or_else(|| bad(text, i, "missing `>` in \\g<...>"))?;
                let r = group_ref(&body[..end]).ok_or_else(|| bad(text, i, "invalid group name in \\g<...>"))?;
                pieces.push(Piece::Group(r));
                i += 3 + end + 1;
            }
            // Any other backslash is literal (names never contain escapes such as `\n`).
            _ => {
                i += 1;
                continue;
            }
        }
        lit_start = i;
    }
    push_text(&mut pieces, &text[lit_start..]);
    pieces.retain(|p| !matches!(p, Piece::Text(t) if t.is_empty()));
    Ok(pieces)
}

fn parse_literal_token(token: &str) -> Result<Vec<Piece>, ReferenceError> {
    let mut pieces = Vec::new();
    let mut rest = token;
    let mut offset = 0;
    while let Some(at) = rest.find("${") {
        push_text(&mut pieces, &rest[..at]);
        let body = &rest[at + 2..];
        let end = body
            .find('}')
            .ok_or_else(|| bad(token, offset + at, "missing `}` in ${...}"))?;
        let r = group_ref(&body[..end]).ok_or_else(|| bad(token, offset + at, "invalid name in ${...}"))?;
        pieces.push(Piece::Group(r));
        let consumed = at + 2 + end + 1;
        offset += consumed;
        rest = &rest[consumed..];
    }
    push_text(&mut pieces, rest);
    Ok(pieces)
}

fn lookup<'c>(caps: &'c Captures, r: &GroupRef) -> Result<Option<&'c Capture>, ReferenceError> {
    match r {
        GroupRef::Index(i) if *i <= caps.group_count() => Ok(None),
        GroupRef::Name(n) => caps
            .name(n)
            .map(Some)
            .ok_or_else(|| ReferenceError::UnknownGroup { group: n.clone() }),
        GroupRef::Index(i) => Err(ReferenceError::UnknownGroup { group: i.to_string() }),
    }
}

/// Text of a group reference: a missing (non-participating) group is empty, a list is joined.
fn text_of(caps: &Captures, r: &GroupRef) -> Result<String, ReferenceError> {
    Ok(match (lookup(caps, r)?, r) {
        (Some(c), _) => c.joined(),
        (None, GroupRef::Index(i)) => caps.get(*i).unwrap_or("").to_string(),
        (None, GroupRef::Name(_)) => String::new(),
    })
}

fn expand_pieces(pieces: &[Piece], caps: &Captures, out: &mut String) -> Result<(), ReferenceError> {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Group(r) => out.push_str(&text_of(caps, r)?),
        }
    }
    Ok(())
}

fn check_ref(info: &CaptureInfo, r: &GroupRef) -> Result<Option<bool>, ReferenceError> {
    match r {
        GroupRef::Index(i) if *i <= info.groups => Ok(None),
        GroupRef::Index(i) => Err(ReferenceError::UnknownGroup { group: i.to_string() }),
        GroupRef::Name(n) => info
            .named
            .iter()
            .find(|(m, _)| m == n)
            .map(|(_, list)| Some(*list))
            .ok_or_else(|| ReferenceError::UnknownGroup { group: n.clone() }),
    }
}

fn kind_error(name: &str, is_list: bool) -> ReferenceError {
    if is_list {
        ReferenceError::CaptureKind {
            name: name.to_string(),
            actual: "a list",
            hint: format!("*{name}"),
        }
    } else {
        ReferenceError::CaptureKind {
            name: name.to_string(),
            actual: "a single segment",
            hint: format!("${name}"),
        }
    }
}

impl Template {
    /// Parses a replacement string such as `backup.\1` or `\g<0>`.
    pub fn parse_string(text: &str) -> Result<Self, ReferenceError> {
        Ok(Template {
            kind: Kind::String(parse_string_pieces(text)?),
            text: text.to_string(),
        })
    }

    /// Parses structured output tokens such as `[model, $i, "*rest", "w_${k}"]`.
    pub fn parse_tokens(tokens: &[String]) -> Result<Self, ReferenceError> {
        let mut out = Vec::with_capacity(tokens.len());
        for tok in tokens {
            let t = if let Some(name) = tok.strip_prefix('$').filter(|n| !n.starts_with('{')) {
                OutToken::One(group_ref(name).ok_or_else(|| ReferenceError::InvalidToken {
                    token: tok.clone(),
                    reason: "capture names must be identifiers or group numbers",
                })?)
            } else if let Some(name) = tok.strip_prefix('*') {
                if !is_ident(name) {
                    return Err(ReferenceError::InvalidToken {
                        token: tok.clone(),
                        reason: "capture names must be identifiers",
                    });
                }
                OutToken::Many(name.to_string())
            } else if tok.starts_with('~') {
                return Err(ReferenceError::InvalidToken {
                    token: tok.clone(),
                    reason: "regex tokens are not allowed in a template",
                });
            } else {
                OutToken::Literal(parse_literal_token(tok)?)
            };
            out.push(t);
        }
        Ok(Template {
            kind: Kind::List(out),
            text: render_tokens(tokens),
        })
    }

    /// The template as written (list templates as `[tok, tok]`).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The fixed name this template always expands to, when it uses no captures.
    pub fn literal(&self) -> Option<String> {
        let pieces_literal = |ps: &[Piece]| -> Option<String> {
            ps.iter()
                .map(|p| match p {
                    Piece::Text(t) => Some(t.as_str()),
                    Piece::Group(_) => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat())
        };
        match &self.kind {
            Kind::String(ps) => pieces_literal(ps),
            Kind::List(toks) => toks
                .iter()
                .map(|t| match t {
                    OutToken::Literal(ps) => pieces_literal(ps),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(".")),
        }
    }

    /// Expands against the captures of one match.
    pub fn expand(&self, caps: &Captures) -> Result<String, ReferenceError> {
        let mut out = String::new();
        match &self.kind {
            Kind::String(ps) => expand_pieces(ps, caps, &mut out)?,
            Kind::List(toks) => {
                let mut segs: Vec<String> = Vec::with_capacity(toks.len());
                for t in toks {
                    match t {
                        OutToken::One(r) => match lookup(caps, r)? {
                            Some(Capture::List(_)) => return Err(kind_error(&r.to_string(), true)),
                            _ => segs.push(text_of(caps, r)?),
                        },
                        OutToken::Many(n) => match lookup(caps, &GroupRef::Name(n.clone()))? {
                            Some(Capture::List(v)) => segs.extend(v.iter().cloned()),
                            _ => return Err(kind_error(n, false)),
                        },
                        OutToken::Literal(ps) => {
                            let mut s = String::new();
                            expand_pieces(ps, caps, &mut s)?;
                            segs.push(s);
                        }
                    }
                }
                out = segs.join(".");
            }
        }
        Ok(out)
    }

    /// Checks every group the template uses exists in `selector` (and, for list templates, has
    /// the right kind), so plans fail before any tensor is touched.
    pub fn check_against(&self, selector: &Selector) -> Result<(), ReferenceError> {
        let info = selector.capture_info();
        let check_pieces = |ps: &[Piece]| -> Result<(), ReferenceError> {
            ps.iter().try_for_each(|p| match p {
                Piece::Group(r) => check_ref(&info, r).map(|_| ()),
                Piece::Text(_) => Ok(()),
            })
        };
        match &self.kind {
            Kind::String(ps) => check_pieces(ps),
            Kind::List(toks) => toks.iter().try_for_each(|t| match t {
                OutToken::One(r) => match check_ref(&info, r)? {
                    Some(true) => Err(kind_error(&r.to_string(), true)),
                    _ => Ok(()),
                },
                OutToken::Many(n) => match check_ref(&info, &GroupRef::Name(n.clone()))? {
                    Some(true) => Ok(()),
                    _ => Err(kind_error(n, false)),
                },
                OutToken::Literal(ps) => check_pieces(ps),
            }),
        }
    }
}

impl fmt::Display for Template {
    /// The template as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::{RegexSelector, StructuredPattern};

    fn re(p: &str) -> Selector {
        Selector::Regex(RegexSelector::new(p).expect("valid regex"))
    }

    fn toks(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    fn rewrite(pat: &str, tpl: &str, name: &str) -> Result<String, ReferenceError> {
        let s = re(pat);
        let t = Template::parse_string(tpl)?;
        t.check_against(&s)?;
        t.expand(&s.captures(name).expect("matches"))
    }

    #[test]
    fn spec9_full_match_rewrite() {
        assert_eq!(rewrite("(.*)", r"backup.\1", "h.0.w"), Ok("backup.h.0.w".into()));
        assert_eq!(rewrite(r"h\.(\d+)\..*", r"x.\g<0>", "h.0.w"), Ok("x.h.0.w".into()));
        assert_eq!(
            rewrite(r"h\.(?P<i>\d+)\.(.*)", r"b.\g<i>.\2.\g<1>", "h.3.w"),
            Ok("b.3.w.3".into())
        );
        // `$`, `.`, unknown escapes and `\\` are literal.
        assert_eq!(rewrite("(a)", r"$1.\q\\\1", "a"), Ok(r"$1.\q\a".into()));
        assert_eq!(rewrite("(é)", r"\é\1ü", "é"), Ok(r"\ééü".into()));
        // Two-digit groups.
        let p = "(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)";
        assert_eq!(rewrite(p, r"\10\1", "abcdefghij"), Ok("ja".into()));
        // A non-participating group expands to empty.
        assert_eq!(rewrite("(a)|(b)", r"x\1y", "b"), Ok("xy".into()));
    }

    #[test]
    fn plain_name_template_expands_to_itself() {
        let t = Template::parse_string("b.weight").expect("valid");
        assert_eq!(t.literal().as_deref(), Some("b.weight"));
        t.check_against(&re("a.weight")).expect("no groups used");
        assert_eq!(
            t.expand(&re("a.weight").captures("a.weight").expect("matches")),
            Ok("b.weight".into())
        );
    }

    #[test]
    fn unknown_group() {
        let t = Template::parse_string(r"x.\2").expect("valid");
        assert_eq!(
            t.check_against(&re("(a)")),
            Err(ReferenceError::UnknownGroup { group: "2".into() })
        );
        let caps = re("(a)").captures("a").expect("matches");
        assert_eq!(t.expand(&caps), Err(ReferenceError::UnknownGroup { group: "2".into() }));
        let t = Template::parse_string(r"\g<nope>").expect("valid");
        assert_eq!(
            t.check_against(&re("(?P<i>a)")),
            Err(ReferenceError::UnknownGroup { group: "nope".into() })
        );
    }

    #[test]
    fn bad_template() {
        for (t, pos) in [(r"a\g1", 1), (r"a\g<1", 1), (r"\g<>", 0), (r"\g<a-b>", 0)] {
            assert!(
                matches!(Template::parse_string(t), Err(ReferenceError::BadTemplate { position, .. }) if position == pos),
                "{t}"
            );
        }
        assert!(matches!(
            Template::parse_tokens(&toks(&["a${x"])),
            Err(ReferenceError::BadTemplate { .. })
        ));
    }

    #[test]
    fn list_templates() {
        let src =
            Selector::Structured(StructuredPattern::new(&toks(&["model", "layers", "$i", "*rest"])).expect("valid"));
        let caps = src.captures("model.layers.3.mlp.w").expect("matches");
        let t = Template::parse_tokens(&toks(&["blocks", "b_${i}", "*rest", "$i", "${rest}"])).expect("valid");
        t.check_against(&src).expect("valid against source");
        assert_eq!(t.expand(&caps), Ok("blocks.b_3.mlp.w.3.mlp.w".into()));
        // An empty list splices to nothing.
        let caps = src.captures("model.layers.3").expect("matches");
        assert_eq!(
            Template::parse_tokens(&toks(&["x", "*rest", "$i"]))
                .expect("valid")
                .expand(&caps),
            Ok("x.3".into())
        );
        // String templates see structured captures by name.
        let t = Template::parse_string(r"new.\g<i>.\g<rest>").expect("valid");
        let caps = src.captures("model.layers.3.a.b").expect("matches");
        assert_eq!(t.expand(&caps), Ok("new.3.a.b".into()));
        // List templates over a regex source use named and numbered groups.
        let src = re(r"h\.(?P<i>\d+)\.(\w+)");
        let t = Template::parse_tokens(&toks(&["blk", "$i", "$2"])).expect("valid");
        t.check_against(&src).expect("valid");
        assert_eq!(t.expand(&src.captures("h.4.w").expect("matches")), Ok("blk.4.w".into()));
    }

    #[test]
    fn capture_kind() {
        let src = Selector::Structured(StructuredPattern::new(&toks(&["$i", "*rest"])).expect("valid"));
        let e = Template::parse_tokens(&toks(&["$rest"]))
            .expect("valid")
            .check_against(&src);
        assert!(matches!(e, Err(ReferenceError::CaptureKind { ref name, actual: "a list", .. }) if name == "rest"));
        let t = Template::parse_tokens(&toks(&["*i"])).expect("valid");
        assert!(matches!(t.check_against(&src), Err(ReferenceError::CaptureKind { .. })));
        assert!(matches!(
            t.expand(&src.captures("a.b").expect("matches")),
            Err(ReferenceError::CaptureKind { .. })
        ));
    }

    #[test]
    fn regex_token_in_template_is_rejected() {
        assert!(matches!(
            Template::parse_tokens(&toks(&["~x"])),
            Err(ReferenceError::InvalidToken { .. })
        ));
    }
}
