//! The working state of a plan run: aliases, each an ordered set of named lazy tensors, and the
//! reference resolution every transform goes through. It sits below the transforms (which change
//! it) and the executor (which drives them); it knows lazy values, references and the plan's
//! locations, nothing of any transform.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;

use crate::formats::output::Sidecar;
use crate::formats::{open_checkpoint, Checkpoint, FormatError};
use crate::plan::{InputSpec, Location, PlanError};
use crate::references::{closest_names, Captures, Reference, ReferenceError, ResolvedSlice};
use crate::value::{Tensor, ValueError};

/// How many times the plan's steps read and wrote one tensor so far, for the `reads` and
/// `writes` assertions of the 0.2 tool (issue 15 item 8). A step that selects a tensor as a
/// source or an in-place target reads it once; a step that gives it a value writes it once.
/// A tensor an input or `load` brought in has been written once, as is a new tensor just made;
/// a renamed (`move`) tensor starts again at one write. Counting names and headers only (`exists`,
/// `count`, `reads`, `writes`) is no read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Steps that read the tensor.
    pub reads: u64,
    /// Steps that wrote it, its arrival included.
    pub writes: u64,
}

impl Default for Access {
    fn default() -> Self {
        Access { reads: 0, writes: 1 }
    }
}

/// [`Access`] counts of the tensors some step touched, per alias; absent tensors have the
/// default counts. Selecting takes `&State`, so reads are counted behind a lock; each alias's
/// table is shared between clones of a state until one of them counts (a check and its run each
/// start from a copy).
#[derive(Debug, Default)]
struct AccessCounts(Mutex<BTreeMap<String, Arc<BTreeMap<String, Access>>>>);

impl AccessCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<BTreeMap<String, Access>>>> {
        // A panic while holding the lock leaves counts only; they stay usable.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, alias: &str, name: &str) -> Access {
        self.lock()
            .get(alias)
            .and_then(|t| t.get(name).copied())
            .unwrap_or_default()
    }

    fn update<'a>(&self, alias: &str, names: impl IntoIterator<Item = &'a str>, change: impl Fn(&mut Access)) {
        let mut all = self.lock();
        let table = Arc::make_mut(all.entry(alias.to_owned()).or_default());
        for name in names {
            match table.get_mut(name) {
                Some(access) => change(access),
                None => {
                    let mut access = Access::default();
                    change(&mut access);
                    table.insert(name.to_owned(), access);
                }
            }
        }
    }

    fn forget(&self, alias: &str, name: &str) {
        let mut all = self.lock();
        if let Some(table) = all.get_mut(alias) {
            if table.contains_key(name) {
                Arc::make_mut(table).remove(name);
            }
        }
    }
}

impl Clone for AccessCounts {
    fn clone(&self) -> Self {
        AccessCounts(Mutex::new(self.lock().clone()))
    }
}

/// Where an alias's tensors came from, for output metadata and sidecars.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The path the user gave.
    pub path: PathBuf,
    /// `__metadata__` of its (first) file.
    pub metadata: BTreeMap<String, String>,
    /// The weight files read, for refusing to overwrite them.
    pub files: Vec<PathBuf>,
}

/// One checkpoint a run opened, as the output's provenance records it (issue 8): the alias it
/// was opened under and, per weight file, its file name (no directory) and header SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    /// The alias the checkpoint (or the tensor `load` took from it) went into.
    pub alias: String,
    /// `(file name, header SHA-256)` of each weight file, in the checkpoint's file order.
    pub files: Vec<(String, Option<String>)>,
}

#[derive(Debug, Clone)]
struct Entry {
    tensor: Tensor,
    order: u64,
}

/// One alias: named tensors in a deterministic order (input order, then creation order).
#[derive(Debug, Clone, Default)]
pub struct AliasState {
    tensors: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    /// The checkpoint it was loaded from, if any.
    pub origin: Option<Origin>,
    /// The non-weight files a directory output of it carries.
    pub sidecars: Sidecars,
}

/// The non-weight files of an alias (SPEC §6.2): those beside its checkpoint, copied as they
/// are, and JSON documents the plan edited (`config`, `upcycle_moe`), written in place of the
/// file of the same name. Edits live here, not on disk: inputs are never modified, and a
/// check sees the same documents the run writes.
#[derive(Debug, Clone, Default)]
pub struct Sidecars {
    /// Files copied under their own names.
    pub files: Vec<PathBuf>,
    /// File name → the document written under it.
    pub edited: BTreeMap<String, Json>,
}

/// The layer index in a tensor name: the number after a `layers`, `layer`, `h` or `blocks`
/// segment (`model.layers.3.mlp.up_proj.weight` → 3).
pub fn layer_index(name: &str) -> Option<usize> {
    let segments: Vec<&str> = name.split('.').collect();
    segments.windows(2).find_map(|w| match w[0] {
        "layers" | "layer" | "h" | "blocks" => w[1].parse().ok(),
        _ => None,
    })
}

/// The expert index in a tensor name: the number after an `experts` segment.
pub fn expert_index(name: &str) -> Option<usize> {
    let segments: Vec<&str> = name.split('.').collect();
    segments
        .windows(2)
        .find_map(|w| (w[0] == "experts").then(|| w[1].parse().ok()).flatten())
}

/// The decoder layer number of a tensor of a causal LM as transformers names them: the number
/// after the top-level `layers` / `h` of the language model (`model.layers.N.`,
/// `model.language_model.layers.N.`, `language_model.model.layers.N.`, `transformer.h.N.`,
/// `gpt_neox.layers.N.`, `model.decoder.layers.N.`). Towers and blocks elsewhere (a vision tower's
/// `visual.blocks.N`, T5's `encoder.block.N.layer.M`) are not counted: their sizes are not
/// `num_hidden_layers`.
pub fn decoder_layer_index(name: &str) -> Option<usize> {
    const ROOTS: &[&str] = &[
        "model.layers.",
        "model.language_model.layers.",
        "language_model.model.layers.",
        "model.decoder.layers.",
        "transformer.h.",
        "gpt_neox.layers.",
        "layers.",
        "h.",
    ];
    let rest = ROOTS.iter().find_map(|root| name.strip_prefix(root))?;
    let (number, tail) = rest.split_once('.')?;
    (!tail.is_empty()).then(|| number.parse().ok()).flatten()
}

/// Whether a model config agrees with the tensors written beside it: its decoder layer count
/// ([`decoder_layer_index`]; `num_nextn_predict_layers` multi-token-prediction layers stored
/// after them allowed), hidden size (unless the embeddings have their own width,
/// `embedding_size` / `word_embed_proj_dim`) and number of experts, where it gives them and the
/// names show them. A config that disagrees makes a checkpoint `from_pretrained` refuses or,
/// worse, loads wrongly (layers silently left at their random initialisation); the message says
/// what to set.
pub fn check_config<'a>(
    config: &Json,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<(), String> {
    fn number(config: &Json, keys: &[&'static str]) -> Option<(&'static str, u64)> {
        keys.iter()
            .find_map(|k| config.get(*k).and_then(Json::as_u64).map(|v| (*k, v)))
    }
    let (mut layers, mut experts, mut hidden) = (None::<usize>, None::<usize>, None::<(String, usize)>);
    for (name, shape) in tensors {
        if let Some(i) = decoder_layer_index(name) {
            layers = Some(layers.map_or(i + 1, |n| n.max(i + 1)));
        }
        if let Some(i) = expert_index(name) {
            experts = Some(experts.map_or(i + 1, |n| n.max(i + 1)));
        }
        let embedding = [
            "model.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
            "language_model.model.embed_tokens.weight",
            "transformer.wte.weight",
            "wte.weight",
            "embed_tokens.weight",
        ]
        .contains(&name);
        if embedding && shape.len() == 2 && hidden.is_none() {
            hidden = Some((name.to_owned(), shape[1]));
        }
    }
    let predict = config
        .get("num_nextn_predict_layers")
        .and_then(Json::as_u64)
        .unwrap_or(0);
    if let (Some((key, want)), Some(have)) = (number(config, &["num_hidden_layers", "n_layer", "num_layers"]), layers) {
        if want != have as u64 && want + predict != have as u64 {
            return Err(format!(
                "config.json says {key}: {want} but the tensors have {have} layers (0–{}); set it with `config: {{set: {{{key}: {have}}}}}`",
                have - 1
            ));
        }
    }
    if let (Some(Json::Array(types)), Some(have)) = (config.get("layer_types"), layers) {
        if types.len() != have && types.len() as u64 != have as u64 + predict {
            return Err(format!(
                "config.json lists {} layer_types but the tensors have {have} layers; give one per layer with `config: {{set: {{layer_types: [...]}}}}`",
                types.len()
            ));
        }
    }
    let own_width = ["embedding_size", "word_embed_proj_dim"]
        .iter()
        .any(|k| config.get(*k).is_some());
    if let (Some((key, want)), Some((name, have))) = (number(config, &["hidden_size", "n_embd", "d_model"]), hidden) {
        if want != have as u64 && !own_width {
            return Err(format!(
                "config.json says {key}: {want} but `{name}` has {have} columns; set it with `config: {{set: {{{key}: {have}}}}}`"
            ));
        }
    }
    if let (Some((key, want)), Some(have)) = (
        number(config, &["num_local_experts", "num_experts", "n_routed_experts"]),
        experts,
    ) {
        if want != have as u64 {
            return Err(format!(
                "config.json says {key}: {want} but the tensors have {have} experts; set it with `config: {{set: {{{key}: {have}}}}}`"
            ));
        }
    }
    Ok(())
}

impl Sidecars {
    /// The JSON document `name` (`config.json`): the edited one, else the file's, parsed;
    /// `None` when there is neither.
    pub fn json(&self, name: &str) -> Result<Option<Json>, FormatError> {
        if let Some(doc) = self.edited.get(name) {
            return Ok(Some(doc.clone()));
        }
        let Some(path) = self.files.iter().find(|p| p.file_name().is_some_and(|n| n == name)) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| FormatError::Sidecar {
            path: path.clone(),
            reason: format!("not valid JSON: {e}"),
        })
    }

    /// What a directory output writes: each file not replaced by an edited document, then the
    /// edited documents (indented as transformers' `save_pretrained` writes them).
    pub fn to_output(&self) -> Vec<Sidecar> {
        let mut out: Vec<Sidecar> = self
            .files
            .iter()
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| self.edited.contains_key(n))
            })
            .map(|p| Sidecar::File(p.clone()))
            .collect();
        for (name, doc) in &self.edited {
            let mut bytes = serde_json::to_vec_pretty(doc).unwrap_or_default();
            bytes.push(b'\n');
            out.push(Sidecar::Contents {
                name: name.clone(),
                bytes,
            });
        }
        out
    }
}

impl AliasState {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the alias holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|e| &e.tensor)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensors in output order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.order
            .values()
            .map(move |name| (name.as_str(), &self.tensors[name].tensor))
    }
}

/// One tensor selected by a reference.
#[derive(Debug, Clone)]
pub struct Match {
    /// The alias it is in.
    pub alias: String,
    /// Its name.
    pub name: String,
    /// The tensor as selected: a view when the reference has a slice.
    pub tensor: Tensor,
    /// The whole tensor.
    pub base: Tensor,
    /// The slice, resolved against the tensor's shape, when the reference has one.
    pub slice: Option<ResolvedSlice>,
    /// Captures for rewriting destination names.
    pub captures: Captures,
}

impl Match {
    /// `alias::name` plus the slice, for messages.
    pub fn display(&self) -> String {
        match &self.slice {
            Some(_) => format!("{}::{}::[...]", self.alias, self.name),
            None => format!("{}::{}", self.alias, self.name),
        }
    }
}

/// All aliases of a run.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Shared until changed: cloning a state (the check, the run and every prompt entry each
    /// start from a copy) copies no alias, and the first change to an alias copies that one
    /// (issue 9: a 100,000-tensor copy cloned every alias twice).
    aliases: BTreeMap<String, Arc<AliasState>>,
    declared: Vec<String>,
    next_order: u64,
    /// The alias used by references that name none (SPEC §3).
    pub default_alias: Option<String>,
    /// Aliases some transform has written to, for choosing the output alias (SPEC §6.3).
    pub written: BTreeSet<String>,
    /// Every checkpoint opened so far, in order, for the output's provenance.
    sources: Vec<SourceIdentity>,
    /// The path and weight files of every checkpoint opened so far, kept after their aliases are
    /// removed or renamed: no write target may replace a file the run has read from.
    opened: Vec<OpenedCheckpoint>,
    /// How often steps read and wrote each tensor.
    access: AccessCounts,
    /// The run's flags (`set`), kept with the state so a prompt session keeps them between
    /// entries.
    pub flags: RunFlags,
}

/// The flags `set` changes (the 0.2 tool's runtime flags, issue 15 item 7).
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    /// While `dry-run` is on: the state when it was turned on, restored when it is turned off,
    /// so what ran in between leaves no trace (tensors, aliases, access counts). `save` and the
    /// output write nothing while it is on.
    pub dry_run: Option<Box<State>>,
    /// Print what each step is about to do before it runs.
    pub preview: bool,
    /// Print what each step did after it ran.
    pub verbose: bool,
}

/// Where one opened checkpoint lives, for [`State::opened`].
#[derive(Debug, Clone)]
pub struct OpenedCheckpoint {
    /// The path as given (a file or a directory).
    pub path: PathBuf,
    /// Its weight files.
    pub files: Vec<PathBuf>,
}

impl State {
    /// Records that tensors of `checkpoint` entered `alias` (done by [`State::add_checkpoint`];
    /// `load` of a single tensor calls it itself).
    pub fn record_source(&mut self, alias: &str, checkpoint: &Checkpoint) {
        let files = checkpoint
            .files
            .iter()
            .map(|f| {
                let name = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
                (name.unwrap_or_default(), f.header_sha256().map(str::to_owned))
            })
            .collect();
        self.sources.push(SourceIdentity {
            alias: alias.to_owned(),
            files,
        });
        self.opened.push(OpenedCheckpoint {
            path: checkpoint.path.clone(),
            files: checkpoint.files.iter().map(|f| f.path.clone()).collect(),
        });
    }

    /// Every checkpoint opened so far (inputs, nested plans' inputs, `load`s), whether or not an
    /// alias still holds its tensors.
    pub fn opened(&self) -> &[OpenedCheckpoint] {
        &self.opened
    }

    /// The checkpoints opened so far, in order (plan inputs first, then nested plans' inputs and
    /// `load`s as they ran).
    pub fn sources(&self) -> &[SourceIdentity] {
        &self.sources
    }

    /// Adds an alias holding a checkpoint's tensors, in its input order.
    pub fn add_checkpoint(&mut self, alias: &str, checkpoint: &Checkpoint) {
        self.record_source(alias, checkpoint);
        self.access.lock().remove(alias);
        let mut state = AliasState {
            origin: Some(Origin {
                path: checkpoint.path.clone(),
                metadata: checkpoint.metadata.clone(),
                files: checkpoint.files.iter().map(|f| f.path.clone()).collect(),
            }),
            sidecars: Sidecars {
                files: checkpoint.sidecars.clone(),
                edited: BTreeMap::new(),
            },
            ..AliasState::default()
        };
        for entry in &checkpoint.tensors {
            let tensor = Tensor::from_entry(entry, &checkpoint.files);
            let order = self.next_order;
            self.next_order += 1;
            state.order.insert(order, entry.name.clone());
            state.tensors.insert(entry.name.clone(), Entry { tensor, order });
        }
        self.declared.push(alias.to_owned());
        self.aliases.insert(alias.to_owned(), Arc::new(state));
    }

    /// Adds an alias holding `tensors` (names and values, in order) that a file at `path` will
    /// hold once an earlier step has written it: what [`State::add_checkpoint`] gives a `load`
    /// of that file, in a check that has not written it (issue 15 item 2).
    pub fn add_planned(&mut self, alias: &str, path: &std::path::Path, tensors: &[(String, Tensor)]) {
        self.access.lock().remove(alias);
        self.opened.push(OpenedCheckpoint {
            path: path.to_path_buf(),
            files: vec![path.to_path_buf()],
        });
        let mut state = AliasState {
            origin: Some(Origin {
                path: path.to_path_buf(),
                metadata: Default::default(),
                files: vec![path.to_path_buf()],
            }),
            ..AliasState::default()
        };
        for (name, tensor) in tensors {
            let order = self.next_order;
            self.next_order += 1;
            state.order.insert(order, name.clone());
            state.tensors.insert(
                name.clone(),
                Entry {
                    tensor: tensor.clone(),
                    order,
                },
            );
        }
        self.declared.push(alias.to_owned());
        self.aliases.insert(alias.to_owned(), Arc::new(state));
    }

    /// Records that a file at `path`, written by an earlier step, is read (a `load` of one of
    /// its tensors in a check: see [`State::add_planned`]).
    pub fn record_planned(&mut self, path: &std::path::Path) {
        self.opened.push(OpenedCheckpoint {
            path: path.to_path_buf(),
            files: vec![path.to_path_buf()],
        });
    }

    /// Opens the headers of a plan's inputs (`location` is the plan's) and adds each as an
    /// alias, returning their notices: the one place inputs are opened, for the top-level plan
    /// and nested ones. An alias that already exists is kept when it holds the same checkpoint
    /// (a nested plan may name the including plan's input to be runnable alone); any other
    /// clash is a plan error.
    pub fn open_inputs(&mut self, inputs: &[InputSpec], location: &Location) -> Result<Vec<String>, OpenError> {
        let mut notices = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            if let Some(existing) = self.alias(&input.alias) {
                let same = existing.origin.as_ref().is_some_and(|o| {
                    o.path == input.path
                        || (o.path.canonicalize().ok().is_some()
                            && o.path.canonicalize().ok() == input.path.canonicalize().ok())
                });
                if same {
                    continue;
                }
                return Err(PlanError::invalid(
                    &location.key("inputs").index(i),
                    format!(
                        "alias `{}` already exists and is not `{}`; a nested plan's inputs add new aliases",
                        input.alias,
                        input.path.display()
                    ),
                )
                .into());
            }
            let checkpoint = open_checkpoint(&input.path)?;
            self.add_checkpoint(&input.alias, &checkpoint);
            notices.extend(checkpoint.notices);
        }
        Ok(notices)
    }

    /// Adds an empty alias (or keeps an existing one).
    pub fn ensure_alias(&mut self, alias: &str) {
        if !self.aliases.contains_key(alias) {
            self.declared.push(alias.to_owned());
            self.aliases.insert(alias.to_owned(), Arc::default());
        }
    }

    /// The JSON sidecar `name` of `alias` ([`Sidecars::json`]); `None` when the alias or the
    /// document does not exist.
    pub fn sidecar_json(&self, alias: &str, name: &str) -> Result<Option<Json>, FormatError> {
        match self.alias(alias) {
            Some(state) => state.sidecars.json(name),
            None => Ok(None),
        }
    }

    /// Replaces (or adds) the JSON sidecar `name` of `alias` (created if missing): what a
    /// directory output of the alias writes under that name.
    pub fn set_sidecar_json(&mut self, alias: &str, name: &str, doc: Json) {
        self.ensure_alias(alias);
        let state = Arc::make_mut(self.aliases.get_mut(alias).expect("alias ensured"));
        state.sidecars.edited.insert(name.to_owned(), doc);
    }

    /// The sidecars of `alias`, to change in place.
    pub fn sidecars_mut(&mut self, alias: &str) -> Option<&mut Sidecars> {
        self.aliases.get_mut(alias).map(|a| &mut Arc::make_mut(a).sidecars)
    }

    /// Gives `to` (created if missing) the sidecars of `from`: a merged or upcycled alias takes
    /// its config and tokenizer files from its base. Nothing happens when `from` does not exist.
    pub fn copy_sidecars(&mut self, from: &str, to: &str) {
        let Some(sidecars) = self.alias(from).map(|a| a.sidecars.clone()) else {
            return;
        };
        self.ensure_alias(to);
        Arc::make_mut(self.aliases.get_mut(to).expect("alias ensured")).sidecars = sidecars;
    }

    /// Removes an alias and its tensors (`prefixes remove`); `None` when it does not exist.
    pub fn remove_alias(&mut self, alias: &str) -> Option<AliasState> {
        let removed = self.aliases.remove(alias)?;
        self.access.lock().remove(alias);
        self.declared.retain(|a| a != alias);
        self.written.remove(alias);
        Some(Arc::unwrap_or_clone(removed))
    }

    /// Renames alias `from` to `to` (`prefixes rename`), keeping its tensors, their order, its
    /// origin and its place among the aliases. The default alias and the record of written
    /// aliases follow the rename. Returns false (and changes nothing) when `from` does not exist
    /// or `to` already does.
    pub fn rename_alias(&mut self, from: &str, to: &str) -> bool {
        if self.aliases.contains_key(to) {
            return false;
        }
        let Some(state) = self.aliases.remove(from) else {
            return false;
        };
        self.aliases.insert(to.to_owned(), state);
        {
            let mut access = self.access.lock();
            if let Some(table) = access.remove(from) {
                access.insert(to.to_owned(), table);
            }
        }
        for name in &mut self.declared {
            if name == from {
                *name = to.to_owned();
            }
        }
        if self.written.remove(from) {
            self.written.insert(to.to_owned());
        }
        if self.default_alias.as_deref() == Some(from) {
            self.default_alias = Some(to.to_owned());
        }
        true
    }

    /// Alias names in declaration order.
    pub fn alias_names(&self) -> Vec<String> {
        self.declared.clone()
    }

    /// One alias.
    pub fn alias(&self, alias: &str) -> Option<&AliasState> {
        self.aliases.get(alias).map(|a| &**a)
    }

    /// The alias a reference means, or the plan error for an unknown or missing alias.
    pub fn alias_for(&self, explicit: Option<&str>, reference: &str, location: &Location) -> Result<String, PlanError> {
        let alias = match explicit {
            Some(a) => a.to_owned(),
            None => match &self.default_alias {
                Some(a) => a.clone(),
                None => {
                    return Err(PlanError::NoDefaultAlias {
                        location: location.clone(),
                        reference: reference.to_owned(),
                        known: self.alias_names(),
                    })
                }
            },
        };
        if !self.aliases.contains_key(&alias) {
            return Err(PlanError::UnknownAlias {
                location: location.clone(),
                alias,
                known: self.alias_names(),
            });
        }
        Ok(alias)
    }

    /// How often steps read and wrote a tensor so far.
    pub fn access(&self, alias: &str, name: &str) -> Access {
        self.access.get(alias, name)
    }

    /// Counts one read of each of `names` of `alias` (a step reading them other than through
    /// [`State::select`]).
    pub fn count_reads<'a>(&self, alias: &str, names: impl IntoIterator<Item = &'a str>) {
        self.access.update(alias, names, |a| a.reads += 1);
    }

    /// Every tensor `reference` selects, in order; zero matches are an empty list. Each match
    /// counts as read once ([`State::access`]).
    pub fn select(&self, reference: &Reference, location: &Location) -> Result<Vec<Match>, SelectError> {
        let matches = self.select_quiet(reference, location)?;
        if let Some(first) = matches.first() {
            self.count_reads(&first.alias, matches.iter().map(|m| m.name.as_str()));
        }
        Ok(matches)
    }

    /// [`State::select`] without counting reads: for steps that look at names only.
    pub fn select_quiet(&self, reference: &Reference, location: &Location) -> Result<Vec<Match>, SelectError> {
        let alias = self.alias_for(reference.alias.as_deref(), &reference.text, location)?;
        let state = &self.aliases[&alias];
        let mut matches = Vec::new();
        // A selector that provably matches one name is a map lookup, not a scan (issue 8: plans
        // list thousands of exact names); any other is matched once against each name.
        // Names are matched before their tensors are looked up: most names of a scan do not match.
        let candidates: Box<dyn Iterator<Item = &String>> = match reference.selector.literal() {
            Some(literal) => Box::new(state.tensors.get_key_value(literal).map(|(name, _)| name).into_iter()),
            None => Box::new(state.order.values()),
        };
        for name in candidates {
            let captures = reference.selector.try_captures(name).map_err(SelectError::Match)?;
            let Some(captures) = captures else {
                continue;
            };
            let name = name.as_str();
            let tensor = &state.tensors[name].tensor;
            let (view, slice) = match &reference.slice {
                None => (tensor.clone(), None),
                Some(spec) => {
                    let resolved = spec.resolve(&tensor.shape).map_err(|source| SelectError::Slice {
                        tensor: format!("{alias}::{name}"),
                        source,
                    })?;
                    let view = tensor.view(&resolved).map_err(|source| SelectError::View {
                        tensor: format!("{alias}::{name}"),
                        source,
                    })?;
                    (view, Some(resolved))
                }
            };
            matches.push(Match {
                alias: alias.clone(),
                name: name.to_owned(),
                tensor: view,
                base: tensor.clone(),
                slice,
                captures,
            });
        }
        Ok(matches)
    }

    /// Like [`State::select`], but zero matches are an error showing the closest names.
    pub fn select_some(&self, reference: &Reference, location: &Location) -> Result<Vec<Match>, SelectError> {
        let matches = self.select(reference, location)?;
        if matches.is_empty() {
            let alias = self.alias_for(reference.alias.as_deref(), &reference.text, location)?;
            let state = &self.aliases[&alias];
            let closest = closest_names(&pattern_text(reference), state.iter().map(|(n, _)| n), 5)
                .into_iter()
                .map(str::to_owned)
                .collect();
            return Err(SelectError::ZeroMatches {
                reference: reference.text.clone(),
                alias,
                closest,
            });
        }
        Ok(matches)
    }

    /// A tensor by alias and name.
    pub fn get(&self, alias: &str, name: &str) -> Option<&Tensor> {
        self.aliases.get(alias)?.get(name)
    }

    /// The one alias the transforms wrote to, or the plan error listing the candidates.
    fn the_written_alias(&self, location: &Location) -> Result<String, PlanError> {
        let written: Vec<&String> = self.written.iter().collect();
        match written.as_slice() {
            [one] => Ok((*one).clone()),
            _ => {
                let candidates = if written.is_empty() {
                    self.alias_names()
                } else {
                    written.iter().map(|s| s.to_string()).collect()
                };
                Err(PlanError::invalid(
                    location,
                    format!(
                        "cannot tell which alias to write; set output.alias to one of: {}",
                        candidates.join(", ")
                    ),
                ))
            }
        }
    }

    /// The alias a plan's (or a nested plan's) output holds (SPEC §6.3): `output.alias` when
    /// given; else the single input's (the default alias, which follows `prefixes rename`);
    /// else the one alias the transforms wrote to; else the plan error listing the candidates.
    /// `location` is the output's.
    pub fn output_alias(
        &self,
        explicit: Option<&str>,
        inputs: &[InputSpec],
        location: &Location,
    ) -> Result<String, PlanError> {
        if let Some(alias) = explicit {
            return match self.alias(alias) {
                Some(_) => Ok(alias.to_owned()),
                None => Err(PlanError::UnknownAlias {
                    location: location.key("alias"),
                    alias: alias.to_owned(),
                    known: self.alias_names(),
                }),
            };
        }
        if let [only] = inputs {
            // `prefixes remove` refuses to drop the default alias, so it names the input's
            // tensors still.
            let alias = self.default_alias.clone().unwrap_or_else(|| only.alias.clone());
            if self.alias(&alias).is_some() {
                return Ok(alias);
            }
        }
        self.the_written_alias(location)
    }

    /// Adds a new tensor at the end of the alias's order (the alias is created if needed).
    pub fn insert(&mut self, alias: &str, name: &str, tensor: Tensor) {
        let order = self.next_order;
        self.next_order += 1;
        self.insert_with_order(alias, name, tensor, order);
    }

    fn insert_with_order(&mut self, alias: &str, name: &str, tensor: Tensor, order: u64) {
        self.ensure_alias(alias);
        self.written.insert(alias.to_owned());
        let state = Arc::make_mut(self.aliases.get_mut(alias).expect("alias ensured"));
        if let Some(old) = state.tensors.insert(name.to_owned(), Entry { tensor, order }) {
            state.order.remove(&old.order);
            self.access.update(alias, [name], |a| a.writes += 1);
        } else {
            // A new tensor: written once, now.
            self.access.forget(alias, name);
        }
        state.order.insert(order, name.to_owned());
    }

    /// Replaces an existing tensor's value, keeping its place in the order.
    pub fn replace(&mut self, alias: &str, name: &str, tensor: Tensor) {
        let order = self
            .aliases
            .get(alias)
            .and_then(|s| s.tensors.get(name))
            .map(|e| e.order);
        match order {
            Some(order) => self.insert_with_order(alias, name, tensor, order),
            None => self.insert(alias, name, tensor),
        }
    }

    /// Removes a tensor, returning it and its place in the order.
    pub fn remove(&mut self, alias: &str, name: &str) -> Option<(Tensor, u64)> {
        if !self.aliases.get(alias)?.contains(name) {
            return None;
        }
        let state = Arc::make_mut(self.aliases.get_mut(alias)?);
        let entry = state.tensors.remove(name)?;
        state.order.remove(&entry.order);
        self.access.forget(alias, name);
        self.written.insert(alias.to_owned());
        Some((entry.tensor, entry.order))
    }

    /// Re-inserts a tensor at a given place in the order (a rename keeps its place).
    pub fn insert_at(&mut self, alias: &str, name: &str, tensor: Tensor, order: u64) {
        self.insert_with_order(alias, name, tensor, order);
    }
}

/// The text a zero-match message compares names against: the pattern without alias and slice.
fn pattern_text(reference: &Reference) -> String {
    let text = reference.text.as_str();
    let text = text.split_once("::").map_or(text, |(alias, rest)| {
        if reference.alias.as_deref() == Some(alias) {
            rest
        } else {
            text
        }
    });
    match text.rfind("::[") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    }
}

/// Why a plan's inputs cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Two inputs clash on an alias (exit status 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// An input is unreadable or malformed (exit status 2).
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Why a reference cannot select tensors.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// The reference names an alias that does not exist, or none when there is no default: the
    /// plan is wrong (exit status 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The pattern could not be matched against a name (the regex engine gave up).
    #[error(transparent)]
    Match(ReferenceError),
    /// The reference's slice does not fit a matched tensor.
    #[error("slice on `{tensor}`")]
    Slice {
        /// The tensor, `alias::name`.
        tensor: String,
        /// Why.
        source: ReferenceError,
    },
    /// A slice of a tensor whose values cannot be viewed (a dtype without a byte size).
    #[error("`{tensor}`")]
    View {
        /// The tensor, `alias::name`.
        tensor: String,
        /// Why.
        source: ValueError,
    },
    /// The reference selects no tensor where one is needed.
    #[error("`{reference}` matches no tensor in `{alias}`{}", closest_hint(closest))]
    ZeroMatches {
        /// The reference as written.
        reference: String,
        /// The alias searched.
        alias: String,
        /// The closest existing names.
        closest: Vec<String>,
    },
}

fn closest_hint(closest: &[String]) -> String {
    if closest.is_empty() {
        " (the alias holds no tensors)".to_owned()
    } else {
        format!(
            "; closest names: {}",
            closest.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::{pattern, write_official};
    use ::safetensors::Dtype;

    fn names(matches: &[Match]) -> Vec<&str> {
        matches.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn literal_selectors_are_looked_up_and_sources_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let specs = [
            ("h.0.w", Dtype::U8, vec![4], pattern(4, 1)),
            ("hx0.w", Dtype::U8, vec![2], pattern(2, 2)),
        ];
        write_official(&path, &specs, None);
        let mut state = State::default();
        state.add_checkpoint("m", &open_checkpoint(&path).unwrap());
        state.default_alias = Some("m".into());
        let at = Location::root();
        let select = |text: &str| state.select(&Reference::parse_str(text).unwrap(), &at).unwrap();
        // Escaped: one name, looked up, with its slice; dotted: a regex, both names.
        let one = select(r"m::h\.0\.w::[1:]");
        assert_eq!(names(&one), vec!["h.0.w"]);
        assert_eq!(one[0].tensor.shape, vec![3]);
        assert_eq!(one[0].captures.whole(), "h.0.w");
        assert_eq!(names(&select("h.0.w")), vec!["h.0.w", "hx0.w"]);
        assert!(select(r"h\.0\.x").is_empty());
        assert_eq!(names(&select(r"h(.)0\.w")), vec!["h.0.w", "hx0.w"]);
        let sources = state.sources();
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].alias, "m");
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let want: String = {
            use sha2::{Digest, Sha256};
            Sha256::digest(&bytes[..8 + n])
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(sources[0].files, vec![("m.safetensors".to_owned(), Some(want))]);
    }

    #[test]
    fn rename_and_remove_alias_keep_bookkeeping() {
        let mut state = State::default();
        state.ensure_alias("a");
        state.ensure_alias("b");
        state.default_alias = Some("a".into());
        state.written.insert("a".into());
        assert!(state.rename_alias("a", "c"));
        assert_eq!(state.alias_names(), vec!["c", "b"]);
        assert_eq!(state.default_alias.as_deref(), Some("c"));
        assert!(state.written.contains("c") && !state.written.contains("a"));
        assert!(!state.rename_alias("c", "b"));
        assert!(!state.rename_alias("zz", "q"));
        assert!(state.remove_alias("c").is_some());
        assert_eq!(state.alias_names(), vec!["b"]);
        assert!(state.written.is_empty());
        assert!(state.remove_alias("c").is_none());
    }

    /// Issue 9 item 11c: clones share their aliases until one changes, and a change never shows
    /// in the other copy.
    #[test]
    fn clones_share_aliases_until_changed() {
        let tensor = |v: u8| Tensor::in_memory(crate::dtype::DType::U8, vec![1], Arc::new(vec![v]));
        let mut state = State::default();
        state.insert("a", "x", tensor(1));
        state.insert("b", "y", tensor(2));
        let mut copy = state.clone();
        assert!(std::ptr::eq(state.alias("a").unwrap(), copy.alias("a").unwrap()));
        // Removing a name the alias lacks copies nothing.
        assert!(copy.remove("a", "missing").is_none());
        assert!(std::ptr::eq(state.alias("a").unwrap(), copy.alias("a").unwrap()));
        copy.insert("a", "z", tensor(3));
        assert!(copy.remove("b", "y").is_some());
        assert!(!std::ptr::eq(state.alias("a").unwrap(), copy.alias("a").unwrap()));
        let names = |s: &State, a: &str| {
            s.alias(a)
                .unwrap()
                .iter()
                .map(|(n, _)| n.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&state, "a"), ["x"]);
        assert_eq!(names(&copy, "a"), ["x", "z"]);
        assert_eq!(names(&state, "b"), ["y"]);
        assert!(copy.alias("b").unwrap().is_empty());
        assert_eq!(copy.remove_alias("a").map(|a| a.len()), Some(2));
        assert_eq!(state.alias("a").map(AliasState::len), Some(1));
    }
}
