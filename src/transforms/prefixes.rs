//! `prefixes`: managing aliases (the `alias::` prefixes of references), not name prefixes: `move`
//! re-prefixes tensor names. `list` prints the aliases,
//! `add` creates an empty one, `remove` drops one with its tensors, `rename` renames one keeping
//! its tensors, their order and its origin (input metadata and sidecars). Alias bookkeeping
//! errors (unknown, already existing, removing the default alias) are plan errors: the plan
//! check finds them from the headers alone.

use serde_json::Value;

use super::{columns, count_noun, Context, Flow, StepError, Transform, TransformSpec};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{valid_alias, Location, PlanError};
use crate::state::State;

const FIELDS: &[Field] = &[
    Field::optional("mode", FieldKind::Text, Some("list"), "list, add, remove or rename"),
    Field::optional("alias", FieldKind::Text, None, "the alias to add or remove"),
    Field::optional("from", FieldKind::Text, None, "the alias to rename"),
    Field::optional("to", FieldKind::Text, None, "its new name"),
];

/// `prefixes`.
pub const PREFIXES: TransformSpec = TransformSpec {
    name: "prefixes",
    summary: "list, add, remove or rename aliases (`alias::`), not name prefixes: re-prefix names with `move`",
    form: super::Form::Plain,
    fields: FIELDS,
    parse: |value, cx| {
        // `prefixes: list` is shorthand for `prefixes: {mode: list}`; a bare `prefixes` and
        // `prefixes: {}` list, as in the 0.2 tool (issue 15 item 4).
        let listing = match value {
            Value::String(mode) => mode == "list",
            Value::Null => true,
            _ => false,
        };
        if listing {
            return Ok(Box::new(Prefixes {
                op: Op::List,
                location: cx.location.clone(),
            }));
        }
        let p = cx.payload(value)?;
        let mode = p.text("mode")?.unwrap_or("list");
        let allowed: &[&str] = match mode {
            "list" => &[],
            "add" | "remove" => &["alias"],
            "rename" => &["from", "to"],
            other => {
                return Err(PlanError::invalid(
                    &p.at("mode"),
                    format!("unknown mode `{other}`; expected list, add, remove or rename"),
                ))
            }
        };
        for key in ["alias", "from", "to"] {
            if p.get(key).is_some() && !allowed.contains(&key) {
                return Err(PlanError::invalid(
                    &p.at(key),
                    format!("`{key}` does not apply to mode `{mode}`"),
                ));
            }
        }
        let name = |key: &str| -> Result<String, PlanError> {
            let Some(alias) = p.text(key)? else {
                return Err(PlanError::MissingKey {
                    location: cx.location.clone(),
                    key: key.to_owned(),
                });
            };
            if !valid_alias(alias) {
                return Err(PlanError::invalid(
                    &p.at(key),
                    format!("`{alias}` is not a valid alias (letters, digits, _ - .)"),
                ));
            }
            Ok(alias.to_owned())
        };
        let op = match mode {
            "list" => Op::List,
            "add" => Op::Add(name("alias")?),
            "remove" => Op::Remove(name("alias")?),
            _ => Op::Rename(name("from")?, name("to")?),
        };
        Ok(Box::new(Prefixes {
            op,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
enum Op {
    List,
    Add(String),
    Remove(String),
    Rename(String, String),
}

#[derive(Debug)]
struct Prefixes {
    op: Op,
    location: Location,
}

impl Prefixes {
    fn unknown(&self, key: &str, alias: &str, state: &State) -> StepError {
        PlanError::UnknownAlias {
            location: self.location.key(key),
            alias: alias.to_owned(),
            known: state.alias_names(),
        }
        .into()
    }
}

/// An alias ending with `.` (`model.`) is most likely meant as a name prefix, which `prefixes`
/// does not manage: the notice says so and points to `move` (issue 14 item 8).
fn warn_name_prefix(ctx: &mut Context, alias: &str) {
    if alias.ends_with('.') {
        ctx.notices.push(format!(
            "alias `{alias}` ends with `.`: `prefixes` manages aliases (`{alias}::name`), not name prefixes; \
             to prefix tensor names use `move`, e.g. `move: {{from: \"(.*)\", to: \"{alias}\\1\"}}`"
        ));
    }
}

impl Transform for Prefixes {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        match &self.op {
            Op::List => {
                let names = state.alias_names();
                let cells: Vec<String> = names.iter().map(|n| columns::cell(n)).collect();
                let width = columns::width(cells.iter().map(String::as_str));
                let lines: Vec<String> = names
                    .iter()
                    .zip(&cells)
                    .map(|(name, cell)| {
                        let count = state.alias(name).map_or(0, |a| a.len());
                        let default = if state.default_alias.as_deref() == Some(name.as_str()) {
                            " (default)"
                        } else {
                            ""
                        };
                        format!("{}  {}{default}", columns::pad_right(cell, width), count_noun(count))
                    })
                    .collect();
                ctx.emit(if lines.is_empty() {
                    "(no aliases)".to_owned()
                } else {
                    lines.join("\n")
                });
                ctx.note(format!("prefixes list: {} aliases", names.len()));
            }
            Op::Add(alias) => {
                if state.alias(alias).is_some() {
                    return Err(PlanError::invalid(
                        &self.location.key("alias"),
                        format!("alias `{alias}` already exists"),
                    )
                    .into());
                }
                warn_name_prefix(ctx, alias);
                state.ensure_alias(alias);
                ctx.note(format!("prefixes add: `{alias}`"));
            }
            Op::Remove(alias) => {
                if state.alias(alias).is_none() {
                    return Err(self.unknown("alias", alias, state));
                }
                // References without `alias::` (and, by SPEC §6.3, the output) mean the default
                // alias; dropping it would leave them dangling.
                if state.default_alias.as_deref() == Some(alias.as_str()) {
                    return Err(PlanError::invalid(
                        &self.location.key("alias"),
                        format!(
                            "cannot remove `{alias}`: it is the default alias (references without `alias::` and the \
                             output use it); rename it instead"
                        ),
                    )
                    .into());
                }
                let removed = state.remove_alias(alias).map_or(0, |a| a.len());
                ctx.note(format!("prefixes remove: `{alias}` ({})", count_noun(removed)));
            }
            Op::Rename(from, to) => {
                if state.alias(from).is_none() {
                    return Err(self.unknown("from", from, state));
                }
                if state.alias(to).is_some() {
                    return Err(
                        PlanError::invalid(&self.location.key("to"), format!("alias `{to}` already exists")).into(),
                    );
                }
                warn_name_prefix(ctx, to);
                state.rename_alias(from, to);
                ctx.note(format!("prefixes rename: `{from}` → `{to}`"));
            }
        }
        Ok(Flow::Continue)
    }
}
