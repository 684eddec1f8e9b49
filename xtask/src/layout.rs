//! `cargo xtask layout`: the source tree stays readable. Fails when a source file is over
//! [`MAX_LINES`] (test-only files, `tests.rs` and `tests_*.rs`, excepted) or when modules import
//! each other in a cycle.
//!
//! Cycles are looked for between siblings at every level: a reference from module `a::x::…` to
//! `a::y::…` is an edge `x → y` among the children of `a` (top-level modules are the children
//! of the crate). A module using its own ancestors (`super::Item`) or its descendants is not an
//! edge. References are read from `use` trees and from `crate::`/`super::`/`self::` paths in the
//! code, with comments and string literals removed first.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// No source file may be longer.
pub const MAX_LINES: usize = 800;
/// Files longer than this are listed as candidates for a split.
pub const AIM_LINES: usize = 600;

/// The source folders checked.
pub const ROOTS: &[&str] = &["tracer/src", "tracer-ebpf/src", "xtask/src"];

type Module = Vec<String>;

/// Checks every root; prints what it found; errors if a rule is broken.
pub fn check(workspace: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for root in ROOTS {
        let dir = workspace.join(root);
        let files = rust_files(&dir)?;
        let mut sources = Vec::new();
        for f in &files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let rel = f.strip_prefix(&dir).unwrap_or(f).to_path_buf();
            let lines = text.lines().count();
            if !is_test_only(&rel) {
                if lines > MAX_LINES {
                    problems.push(format!(
                        "{root}/{}: {lines} lines (at most {MAX_LINES})",
                        rel.display()
                    ));
                } else if lines > AIM_LINES {
                    eprintln!(
                        "layout: {root}/{} has {lines} lines (aim: under {AIM_LINES})",
                        rel.display()
                    );
                }
            }
            sources.push((module_of(&rel), text));
        }
        for cycle in cycles(&sources) {
            problems.push(format!("{root}: import cycle {}", cycle.join(" → ")));
        }
    }
    if problems.is_empty() {
        eprintln!(
            "layout: no file over {MAX_LINES} lines, no import cycle ({})",
            ROOTS.join(", ")
        );
        Ok(())
    } else {
        bail!("layout:\n  {}", problems.join("\n  "))
    }
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `tests.rs` and `tests_*.rs` hold only unit tests.
pub fn is_test_only(rel: &Path) -> bool {
    rel.file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s == "tests" || s.starts_with("tests_"))
}

/// The module a file defines: `lib.rs`/`main.rs` the crate, `a/mod.rs` and `a.rs` `a`,
/// `a/b.rs` `a::b`.
pub fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// Cycles among siblings, each as the names along it (first repeated at the end).
pub fn cycles(sources: &[(Module, String)]) -> Vec<Vec<String>> {
    let modules: BTreeSet<Module> = sources.iter().map(|(m, _)| m.clone()).collect();
    // parent → (child → children it uses)
    let mut edges: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, text) in sources {
        for path in references(&strip(text)) {
            let Some(target) = resolve(from, &path, &modules) else {
                continue;
            };
            let common = from.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < target.len() {
                edges
                    .entry(from[..common].to_vec())
                    .or_default()
                    .entry(from[common].clone())
                    .or_default()
                    .insert(target[common].clone());
            }
        }
    }
    let mut found = Vec::new();
    for (parent, graph) in &edges {
        if let Some(mut c) = find_cycle(graph) {
            if !parent.is_empty() {
                for name in &mut c {
                    *name = format!("{}::{name}", parent.join("::"));
                }
            }
            found.push(c);
        }
    }
    found
}

/// The module `path` (as written in `from`) names: its longest prefix that is a module.
fn resolve(from: &Module, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let mut abs: Module;
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            abs = Vec::new();
            rest = &path[1..];
        }
        Some("self") => {
            abs = from.clone();
            rest = &path[1..];
        }
        Some("super") => {
            abs = from.clone();
            while rest.first().is_some_and(|s| s == "super") {
                abs.pop()?;
                rest = &rest[1..];
            }
        }
        Some(first) => {
            // A relative path: a child of this module, else not ours (an external crate).
            let mut child = from.clone();
            child.push(first.to_string());
            if !modules.contains(&child) {
                return None;
            }
            abs = from.clone();
        }
        None => return None,
    }
    let mut best = abs.clone();
    for seg in rest {
        abs.push(seg.clone());
        if modules.contains(&abs) {
            best.clone_from(&abs);
        } else {
            break;
        }
    }
    Some(best)
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// The text with comments, string and char literals blanked out.
pub fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"…", r#"…"#, br"…"
            i += rest.iter().position(|&c| c == b'"').unwrap_or(0) + 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && is_char_literal(rest) {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br##"` …: the number of `#`s.
fn raw_string_start(rest: &[u8]) -> Option<usize> {
    let r = if rest.starts_with(b"br") {
        2
    } else if rest.first() == Some(&b'r') {
        1
    } else {
        return None;
    };
    let hashes = rest[r..].iter().take_while(|&&c| c == b'#').count();
    (rest.get(r + hashes) == Some(&b'"')).then_some(hashes)
}

/// `'x'`, `'\n'`, `'\u{1F600}'` are literals; `'a` (a lifetime) is not.
fn is_char_literal(rest: &[u8]) -> bool {
    match rest.get(1) {
        Some(b'\\') => true,
        Some(_) => {
            let s = String::from_utf8_lossy(&rest[1..rest.len().min(6)]);
            s.chars()
                .next()
                .is_some_and(|c| s[c.len_utf8()..].starts_with('\''))
        }
        None => false,
    }
}

/// Every module path the (stripped) code names: `use` trees expanded, and inline
/// `crate::`/`super::`/`self::` paths.
pub fn references(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let tokens = tokenize(code);
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "use" && (i == 0 || tokens[i - 1] != "::") {
            let end = tokens[i..]
                .iter()
                .position(|t| t == ";")
                .map_or(tokens.len(), |p| i + p);
            let mut pos = i + 1;
            use_tree(&tokens[..end], &mut pos, &[], &mut out);
            i = end;
        } else if matches!(tokens[i].as_str(), "crate" | "super" | "self")
            && tokens.get(i + 1).is_some_and(|t| t == "::")
            && (i == 0 || tokens[i - 1] != "::")
        {
            let mut path = vec![tokens[i].clone()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t == "::")
                && tokens.get(j + 1).is_some_and(|t| is_ident(t))
            {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            out.push(path);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

fn tokenize(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_alphanumeric() || d == '_' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(code[i..end].to_string());
        } else if c == ':' && chars.peek().is_some_and(|&(_, d)| d == ':') {
            chars.next();
            out.push("::".into());
        } else if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    out
}

/// Parses one use tree at `pos` (stopping at `,` or `}` of the enclosing group).
fn use_tree(tokens: &[String], pos: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    while *pos < tokens.len() {
        let t = tokens[*pos].as_str();
        match t {
            "::" | "*" => *pos += 1,
            "{" => {
                *pos += 1;
                loop {
                    use_tree(tokens, pos, &path, out);
                    match tokens.get(*pos).map(String::as_str) {
                        Some(",") => *pos += 1,
                        Some("}") => {
                            *pos += 1;
                            break;
                        }
                        _ => break,
                    }
                    if tokens.get(*pos).is_some_and(|t| t == "}") {
                        *pos += 1;
                        break;
                    }
                }
                return;
            }
            "," | "}" => break,
            "as" => *pos += 2,
            "self" if !path.is_empty() => *pos += 1,
            _ => {
                path.push(t.to_string());
                *pos += 1;
            }
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

#[cfg(test)]
mod tests;
