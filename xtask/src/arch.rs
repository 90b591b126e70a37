//! `cargo run -p xtask -- arch`: checks the georep crate's layering from
//! its source. Every `crate::`, `super::` and `self::` path is resolved to
//! the module it names; then
//!
//! - a module may name modules of its own layer and of the layers below,
//!   never above (the layers are [`LAYERS`], top first);
//! - modules (grouped two levels deep, e.g. `engine::crawl`) form no import
//!   cycle, parent and child excepted (a folder's `mod.rs` and its files are
//!   one unit);
//! - no source file is longer than [`MAX_LINES`].
//!
//! Paths are found by scanning the text (comments and strings left out), not
//! by compiling: a `use` of a name glob-imported from elsewhere is not seen,
//! which the crate avoids between layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first: each may use itself and those after it.
pub const LAYERS: &[&str] = &[
    "cli",
    "daemon",
    "engine",
    "transport",
    "agent",
    "protocol",
    "catalog",
    "session",
    "hash",
    "fs",
    "error",
];

/// Longest source file allowed.
pub const MAX_LINES: usize = 650;

/// A module path, e.g. `["engine", "crawl", "plan"]`.
type ModPath = Vec<String>;

/// One source file: its module path and its text without comments and strings.
struct Source {
    file: PathBuf,
    module: ModPath,
    code: String,
    lines: usize,
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// `from -> to` edges between layers.
    pub layer_edges: BTreeSet<(String, String)>,
    /// A module naming a higher layer: (file, what it names).
    pub violations: Vec<(PathBuf, String)>,
    /// Import cycles between module groups.
    pub cycles: Vec<Vec<String>>,
    /// Files over [`MAX_LINES`], with their length.
    pub too_long: Vec<(PathBuf, usize)>,
    /// Every file and its length, longest first.
    pub sizes: Vec<(PathBuf, usize)>,
    /// Top-level modules that are not in [`LAYERS`].
    pub unlayered: BTreeSet<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
            && self.cycles.is_empty()
            && self.too_long.is_empty()
            && self.unlayered.is_empty()
    }
}

/// Removes comments, string and char literals, keeping line breaks.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            // Byte literals b"..." and b'x' are handled by the cases above.
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Expands the path tree that starts at `s` (after a `::`): `a::b`,
/// `a::{b, c::d}`, returning every path in it.
fn expand(s: &[u8]) -> Vec<Vec<String>> {
    fn walk(s: &[u8], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut cur: Vec<String> = prefix.to_vec();
        loop {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
            if *i < s.len() && s[*i] == b'{' {
                *i += 1;
                loop {
                    walk(s, i, &cur, out);
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    match s.get(*i) {
                        Some(b',') => {
                            *i += 1;
                            while *i < s.len() && s[*i].is_ascii_whitespace() {
                                *i += 1;
                            }
                            if s.get(*i) == Some(&b'}') {
                                *i += 1;
                                return;
                            }
                        }
                        Some(b'}') => {
                            *i += 1;
                            return;
                        }
                        _ => return,
                    }
                }
            }
            let start = *i;
            while *i < s.len() && is_ident(s[*i]) {
                *i += 1;
            }
            if start == *i {
                out.push(cur);
                return;
            }
            cur.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
            if s.get(*i) == Some(&b':') && s.get(*i + 1) == Some(&b':') {
                *i += 2;
            } else {
                out.push(cur);
                return;
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    walk(s, &mut i, &[], &mut out);
    out
}

/// Every module path named in `code` from module `me` (`crate::`, `super::`, `self::`).
fn references(code: &str, me: &ModPath) -> Vec<ModPath> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let word = &code[start..i];
        if !matches!(word, "crate" | "super" | "self") || !code[i..].starts_with("::") {
            continue;
        }
        // The base: crate root, or relative to this module.
        let mut base: ModPath = match word {
            "crate" => Vec::new(),
            "self" => me.clone(),
            _ => {
                let mut p = me.clone();
                p.pop();
                p
            }
        };
        let mut j = i + 2;
        // Chains of super::super:: ...
        while code[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        for tail in expand(&b[j..]) {
            let mut p = base.clone();
            p.extend(tail.into_iter().filter(|s| s != "self"));
            out.push(p);
        }
        i = j;
    }
    out
}

/// Reads every `.rs` file under `src`, with its module path.
fn sources(src: &Path) -> std::io::Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap();
                let mut module: ModPath = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    module.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    module.pop();
                }
                let text = std::fs::read_to_string(&p)?;
                out.push(Source {
                    file: p.clone(),
                    module,
                    lines: text.lines().count(),
                    code: strip(&text),
                });
            }
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// The longest prefix of `p` that is a module of the crate.
fn resolve(p: &ModPath, modules: &BTreeSet<ModPath>) -> ModPath {
    let mut q = p.clone();
    while !q.is_empty() && !modules.contains(&q) {
        q.pop();
    }
    q
}

fn group(p: &ModPath) -> String {
    p.iter().take(2).cloned().collect::<Vec<_>>().join("::")
}

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Checks the crate whose `src/` is `src`.
pub fn check(src: &Path) -> std::io::Result<Report> {
    let files = sources(src)?;
    let modules: BTreeSet<ModPath> = files.iter().map(|s| s.module.clone()).collect();
    let mut report = Report::default();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &files {
        report.sizes.push((s.file.clone(), s.lines));
        if s.lines > MAX_LINES {
            report.too_long.push((s.file.clone(), s.lines));
        }
        let Some(layer) = s.module.first() else {
            continue; // lib.rs and main.rs: the crate root
        };
        if rank(layer).is_none() {
            report.unlayered.insert(layer.clone());
            continue;
        }
        for r in references(&s.code, &s.module) {
            // `crate::user_err!` is exported at the root by `error`.
            let target = if r.first().is_some_and(|x| x == "user_err") {
                vec!["error".to_string()]
            } else {
                resolve(&r, &modules)
            };
            let Some(tl) = target.first() else { continue };
            if let (Some(a), Some(b)) = (rank(layer), rank(tl)) {
                if a != b {
                    report.layer_edges.insert((layer.clone(), tl.clone()));
                }
                if b < a {
                    report
                        .violations
                        .push((s.file.clone(), format!("names {}", target.join("::"))));
                }
            }
            let (from, to) = (group(&s.module), group(&target));
            let related = from == to
                || from.starts_with(&format!("{to}::"))
                || to.starts_with(&format!("{from}::"));
            if !related {
                graph.entry(from).or_default().insert(to);
            }
        }
    }
    report.violations.sort();
    report.violations.dedup();
    report.cycles = cycles(&graph);
    report.sizes.sort_by_key(|s| std::cmp::Reverse(s.1));
    Ok(report)
}

/// Prints the report; returns whether the crate passed.
pub fn print(report: &Report, root: &Path) -> bool {
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    println!("layers (top first): {}", LAYERS.join(" > "));
    println!("uses between layers:");
    for l in LAYERS {
        let to: Vec<&str> = report
            .layer_edges
            .iter()
            .filter(|(a, _)| a == l)
            .map(|(_, b)| b.as_str())
            .collect();
        if !to.is_empty() {
            println!("  {l:<10} -> {}", to.join(" "));
        }
    }
    for (f, what) in &report.violations {
        println!("VIOLATION: {} {what} (a higher layer)", rel(f));
    }
    for m in &report.unlayered {
        println!("UNLAYERED: top-level module {m} is in no layer: add it to xtask/src/arch.rs");
    }
    if report.cycles.is_empty() {
        println!("import cycles: none");
    }
    for c in &report.cycles {
        println!("CYCLE: {}", c.join(" <-> "));
    }
    for (f, n) in &report.too_long {
        println!("TOO LONG: {} has {n} lines (at most {MAX_LINES})", rel(f));
    }
    println!("largest files:");
    for (f, n) in report.sizes.iter().take(5) {
        println!("  {n:>5} {}", rel(f));
    }
    report.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn paths_are_expanded_and_comments_and_strings_ignored() {
        let code = strip(
            "use crate::{a::b, c::{d, e::f}}; // crate::x::y\n\
             let s = \"crate::q::r\"; let c = '\"'; fn f<'a>() {}\n\
             /* crate::z */ super::super::m::n(); self::k::l;",
        );
        let me: ModPath = vec!["p".into(), "q".into(), "r".into()];
        let refs: BTreeSet<String> = references(&code, &me)
            .into_iter()
            .map(|p| p.join("::"))
            .collect();
        let want: BTreeSet<String> = ["a::b", "c::d", "c::e::f", "p::m::n", "p::q::r::k::l"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(refs, want);
    }

    #[test]
    fn a_lower_layer_naming_a_higher_one_and_a_cycle_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path();
        write(src, "lib.rs", "pub mod engine; pub mod fs;");
        write(src, "engine/mod.rs", "pub mod a; pub mod b;");
        write(
            src,
            "engine/a.rs",
            "use crate::engine::b::X; use crate::fs::P;",
        );
        write(src, "engine/b.rs", "use super::a::Y;");
        write(src, "fs/mod.rs", "pub fn f() { crate::engine::a::g() }");
        let r = check(src).unwrap();
        assert!(!r.ok());
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].0.ends_with("fs/mod.rs"));
        // engine::a <-> engine::b, and engine::a -> fs -> engine::a: one component.
        let want: Vec<String> = ["engine::a", "engine::b", "fs"].map(String::from).to_vec();
        assert_eq!(r.cycles, vec![want], "{r:?}");
        assert!(r.layer_edges.contains(&("engine".into(), "fs".into())));
    }

    #[test]
    fn parent_and_child_are_one_unit_and_long_files_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path();
        write(src, "lib.rs", "pub mod engine; pub mod nowhere;");
        write(
            src,
            "engine/mod.rs",
            "pub mod a; pub use a::X; fn f() { self::a::g() }",
        );
        write(src, "engine/a.rs", &"use super::Y;\n".repeat(MAX_LINES + 1));
        write(src, "nowhere.rs", "");
        let r = check(src).unwrap();
        assert!(r.cycles.is_empty(), "{r:?}");
        assert!(r.violations.is_empty(), "{r:?}");
        assert_eq!(r.too_long.len(), 1);
        assert!(r.unlayered.contains("nowhere"));
    }

    #[test]
    fn the_georep_crate_keeps_its_layers() {
        let root = crate::workspace_root();
        let r = check(&root.join("src")).unwrap();
        assert!(
            print(&r, &root),
            "the layering is broken: see the lines above"
        );
        // The check sees the real crate: the engine uses the transport.
        assert!(r
            .layer_edges
            .contains(&("engine".into(), "transport".into())));
    }
}
