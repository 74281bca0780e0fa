//! `hf://org/name[@revision]` inputs (issue 14 item 3): a model named by its Hugging Face repo id
//! opens from the local Hugging Face cache, laid out as `huggingface_hub` keeps it:
//! `<cache>/models--org--name/refs/<revision>` holds a commit hash and
//! `<cache>/models--org--name/snapshots/<commit>/` the files. The cache is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the
//! revision defaults to `main` and may be a commit hash.
//!
//! A model not in the cache is downloaded by the fetcher the host installed ([`set_fetcher`]):
//! the Python package installs one that calls `huggingface_hub.snapshot_download` for the weight
//! and config files only, when `huggingface_hub` is importable. Without a fetcher (the engine
//! alone), or when it cannot download, the error says what to run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::FormatError;

/// The prefix of a Hugging Face repository id used as a checkpoint path.
pub const HF_SCHEME: &str = "hf://";

/// Whether `text` names something other than a local path (an `hf://` model).
pub fn is_remote(text: &str) -> bool {
    text.starts_with(HF_SCHEME)
}

/// `~` and `~/rest` with the home directory (`$HOME`); anything else (including `~user`) as it
/// is.
pub fn expand_home(text: &str) -> PathBuf {
    let rest = match text.strip_prefix('~') {
        Some("") => Some(""),
        Some(rest) if rest.starts_with('/') => Some(&rest[1..]),
        _ => None,
    };
    match (rest, std::env::var_os("HOME")) {
        (Some(rest), Some(home)) if !home.is_empty() => {
            let home = PathBuf::from(home);
            if rest.is_empty() {
                home
            } else {
                home.join(rest)
            }
        }
        _ => PathBuf::from(text),
    }
}

/// Downloads `repo` (`org/name`) at `revision` and returns its snapshot folder; `Ok(None)` when
/// it cannot download at all (no `huggingface_hub`), `Err` with the reason when it tried.
pub type Fetcher = dyn Fn(&str, &str) -> Result<Option<PathBuf>, String> + Send + Sync;

static FETCHER: OnceLock<Box<Fetcher>> = OnceLock::new();

/// Installs the downloader used for models not in the cache (once; later calls are ignored).
pub fn set_fetcher(fetcher: Box<Fetcher>) {
    let _ = FETCHER.set(fetcher);
}

/// The files a download fetches: weights, their indexes and configs, tokenizer files.
pub const DOWNLOAD_PATTERNS: &[&str] = &["*.safetensors", "*.json", "*.bin", "*.model", "*.txt", "*.tiktoken"];

/// A parsed `hf://` id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name` (or `name`).
    pub repo: String,
    /// A branch, tag or commit hash.
    pub revision: String,
}

fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `hf://org/name[@revision]`.
pub fn parse(id: &str) -> Result<HubId, FormatError> {
    let invalid = |reason: &str| FormatError::Hub {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = id
        .strip_prefix(HF_SCHEME)
        .ok_or_else(|| invalid("expected hf://org/name[@revision]"))?;
    let (repo, revision) = match rest.split_once('@') {
        Some((repo, revision)) => (repo, revision),
        None => (rest, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid_part(p)) {
        return Err(invalid(
            "expected hf://org/name[@revision] (letters, digits, - _ . in org and name)",
        ));
    }
    // A revision names a file under `refs/` (branches may hold `/`), never a way out of it.
    let revision_ok = !revision.is_empty() && !revision.starts_with('/') && revision.split('/').all(valid_part);
    if !revision_ok {
        return Err(invalid("the revision after @ is empty or not a branch, tag or commit"));
    }
    Ok(HubId {
        repo: repo.to_owned(),
        revision: revision.to_owned(),
    })
}

/// The Hugging Face hub cache folder, as `huggingface_hub` chooses it.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return expand_home(&dir.to_string_lossy());
    }
    let home = var("HF_HOME")
        .map(|d| expand_home(&d.to_string_lossy()))
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("huggingface")))
        .unwrap_or_else(|| expand_home("~/.cache/huggingface"));
    home.join("hub")
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot folder of `id` in `cache`, if it is there.
pub fn cached(id: &HubId, cache: &Path) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    let commit = if is_commit(&id.revision) {
        id.revision.clone()
    } else {
        let text = std::fs::read_to_string(repo_dir.join("refs").join(&id.revision)).ok()?;
        let commit = text.trim().to_owned();
        if !is_commit(&commit) {
            return None;
        }
        commit
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// What to run to put `id` in the cache.
fn command(id: &HubId) -> String {
    let revision = if id.revision == "main" {
        String::new()
    } else {
        format!(" --revision {}", id.revision)
    };
    format!(
        "huggingface-cli download {}{revision} --include '*.safetensors' '*.json'",
        id.repo
    )
}

/// The local folder of `hf://org/name[@revision]`: the cached snapshot, else what the fetcher
/// downloaded.
pub fn resolve(text: &str) -> Result<PathBuf, FormatError> {
    let id = parse(text)?;
    let cache = cache_dir();
    if let Some(snapshot) = cached(&id, &cache) {
        return Ok(snapshot);
    }
    let failed = |why: String| FormatError::Hub {
        id: text.to_owned(),
        reason: format!(
            "{why}; run `{}` (with network access), or set HF_HUB_CACHE to the cache holding it",
            command(&id)
        ),
    };
    let not_cached = format!("not in the Hugging Face cache {}", cache.display());
    match FETCHER.get().map(|fetch| fetch(&id.repo, &id.revision)) {
        Some(Ok(Some(dir))) if dir.is_dir() => Ok(dir),
        Some(Ok(Some(dir))) => Err(failed(format!(
            "{not_cached}, and the download gave no folder ({})",
            dir.display()
        ))),
        Some(Err(why)) => Err(failed(format!("{not_cached}, and downloading it failed: {why}"))),
        Some(Ok(None)) | None => Err(failed(format!(
            "{not_cached}, and huggingface_hub is not installed to download it"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert_eq!(
            parse("hf://org/name").unwrap(),
            HubId {
                repo: "org/name".into(),
                revision: "main".into()
            }
        );
        assert_eq!(parse("hf://gpt2@v1.0").unwrap().revision, "v1.0");
        assert_eq!(parse("hf://o/n@refs/pr/1").unwrap().revision, "refs/pr/1");
        for bad in [
            "hf://",
            "hf://a/b/c",
            "hf://a/../b",
            "hf://a/b@",
            "hf://a/b@../x",
            "hf://a b/c",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("cannot open {bad}: ")), "{err}");
        }
    }

    #[test]
    fn cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = dir.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), format!("{commit}\n")).unwrap();
        let id = parse("hf://org/name").unwrap();
        assert_eq!(cached(&id, dir.path()), Some(repo.join("snapshots").join(commit)));
        let pinned = parse(&format!("hf://org/name@{commit}")).unwrap();
        assert_eq!(cached(&pinned, dir.path()), Some(repo.join("snapshots").join(commit)));
        assert_eq!(cached(&parse("hf://org/name@dev").unwrap(), dir.path()), None);
        assert_eq!(cached(&parse("hf://org/other").unwrap(), dir.path()), None);
        assert!(command(&parse("hf://org/name@dev").unwrap()).contains("org/name --revision dev"));
    }
}
