//! The module layering of `lib.rs`, enforced: each module imports only modules listed before it
//! (issue 8: the transforms and the executor imported each other, and every capability built on
//! them would have copied the workaround).

/// Top-level modules in layer order; a module may use only those before it (and itself). Test
/// modules (`#[cfg(test)] mod ...`) may use anything.
const LAYERS: &[&str] = &[
    "dtype",
    "kernels",
    "linalg",
    "formats",
    "space",
    "memory",
    "references",
    "plan",
    "value",
    "state",
    "write",
    "transforms",
    "error",
    "executor",
    "prompt",
    "cli",
    "bindings",
];

/// The source files of a top-level module: `src/NAME.rs` or everything under `src/NAME/`.
fn files_of(module: &str) -> Vec<std::path::PathBuf> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// `s` from its first item: leading whitespace, `//` comments and `#[...]` attributes skipped.
fn skip_comments_and_attributes(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if s.starts_with("//") {
            s = s.split_once('\n').map_or("", |(_, rest)| rest);
        } else if s.starts_with("#[") {
            s = s.split_once(']').map_or("", |(_, rest)| rest);
        } else {
            return s;
        }
    }
}

/// The top-level modules `code` names through `crate::`: paths (`crate::state::State`,
/// `crate::write;`) and the first segment of each item of a grouped import
/// (`use crate::{state::State, write};`, over several lines).
fn crate_modules_named(code: &str) -> Vec<(usize, String)> {
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let ident = |s: &str| -> String {
        skip_comments_and_attributes(s)
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut named = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The items of the group, split on commas outside nested braces.
            let (mut depth, mut item_start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        named.push((line_of(at), ident(&group[item_start..i])));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        named.push((line_of(at), ident(&group[item_start..i])));
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            named.push((line_of(at), ident(rest)));
        }
    }
    named.retain(|(_, m)| !m.is_empty());
    named
}

/// `text` up to its first `#[cfg(test)]` module (`mod`, `pub(crate) mod`, ...).
fn without_test_modules(text: &str) -> &str {
    let end = text
        .match_indices("#[cfg(test)]")
        .map(|(at, m)| (at, skip_comments_and_attributes(&text[at + m.len()..])))
        .find(|(_, item)| {
            let item = item
                .strip_prefix("pub(crate) ")
                .or_else(|| item.strip_prefix("pub "))
                .unwrap_or(item);
            item.starts_with("mod ")
        })
        .map_or(text.len(), |(at, _)| at);
    &text[..end]
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let mut violations = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        for file in files_of(module) {
            let text = std::fs::read_to_string(&file).expect("source file");
            // Test modules may use anything; a test-only item elsewhere in the file may not.
            let code = without_test_modules(&text);
            for (line, named) in crate_modules_named(code) {
                if LAYERS[rank + 1..].contains(&named.as_str()) {
                    violations.push(format!("{}:{line}: crate::{named}", file.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "imports pointing up:\n{}", violations.join("\n"));
}

#[test]
fn grouped_and_plain_imports_are_both_seen() {
    let code = "use crate::{\n    formats::{open, Checkpoint},\n    // the writer\n    write,\n    #[cfg(unix)] executor,\n};\nlet x = crate::state::State::default();";
    let named: Vec<String> = crate_modules_named(code).into_iter().map(|(_, m)| m).collect();
    assert_eq!(named, ["formats", "write", "executor", "state"]);
    let text = "use crate::dtype;\n#[cfg(test)]\nfn helper() {}\n#[cfg(test)] #[allow(unused)] pub(crate) mod tests {}";
    assert_eq!(
        without_test_modules(text),
        "use crate::dtype;\n#[cfg(test)]\nfn helper() {}\n"
    );
}

#[test]
fn no_transform_imports_the_executor() {
    for file in files_of("transforms") {
        let text = std::fs::read_to_string(&file).expect("source file");
        assert!(!text.contains("executor::"), "{} imports the executor", file.display());
    }
}
