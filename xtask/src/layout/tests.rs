use super::*;

fn m(s: &str) -> Module {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split("::").map(str::to_string).collect()
    }
}

fn src(module: &str, text: &str) -> (Module, String) {
    (m(module), text.to_string())
}

#[test]
fn files_map_to_modules() {
    assert_eq!(module_of(Path::new("lib.rs")), m(""));
    assert_eq!(module_of(Path::new("main.rs")), m(""));
    assert_eq!(module_of(Path::new("a.rs")), m("a"));
    assert_eq!(module_of(Path::new("a/mod.rs")), m("a"));
    assert_eq!(module_of(Path::new("a/b.rs")), m("a::b"));
    assert_eq!(module_of(Path::new("a/main.rs")), m("a::main"));
    assert!(is_test_only(Path::new("a/tests.rs")));
    assert!(is_test_only(Path::new("a/tests_kernel.rs")));
    assert!(!is_test_only(Path::new("a/testsuite.rs")));
}

#[test]
fn use_trees_and_inline_paths_are_read_and_comments_and_strings_ignored() {
    let code = strip(
        r##"
        // use crate::nope;
        /* crate::nope2 */
        use crate::{a::{self, B}, c::d as e, f::*};
        pub use self::g::H;
        use super::super::i;
        fn x<'a>(s: &'a str) -> char { let _ = "crate::nope3"; let _ = r#"crate::nope4"#; crate::j::k(); 'x' }
        "##,
    );
    let refs = references(&code);
    let want: Vec<Vec<String>> = [
        "crate::a",
        "crate::a::B",
        "crate::c::d",
        "crate::f",
        "self::g::H",
        "super::super::i",
        "crate::j::k",
    ]
    .iter()
    .map(|p| p.split("::").map(str::to_string).collect())
    .collect();
    assert_eq!(refs, want);
}

#[test]
fn sibling_cycles_are_found_at_every_level() {
    let tree = [
        src("", "mod a; mod b;"),
        src("a", "use crate::b::Thing;"),
        src("b", "use crate::a::Other;"),
    ];
    assert_eq!(cycles(&tree), vec![vec!["a", "b", "a"]]);

    let nested = [
        src("p", "mod x; mod y; mod z;"),
        src("p::x", "use super::y::Y;"),
        src("p::y", "use super::{Item, z::Z};"),
        src("p::z", "fn f() { super::x::g(); }"),
    ];
    assert_eq!(cycles(&nested), vec![vec!["p::x", "p::y", "p::z", "p::x"]]);
}

#[test]
fn parents_children_and_external_crates_are_not_cycles() {
    let tree = [
        src("", "mod a; mod b;"),
        src("a", "mod inner; use inner::Thing; use serde::Serialize;"),
        src("a::inner", "use super::Parent; use crate::b::B;"),
        src("b", "use crate::a::Parent; use std::collections::BTreeMap;"),
    ];
    // a::inner → b and b → a: through the top level that is a → b → a.
    assert_eq!(cycles(&tree), vec![vec!["a", "b", "a"]]);
    let fine = [
        src("", "mod a; mod b;"),
        src("a", "mod inner; use inner::Thing; use self::inner::Other;"),
        src("a::inner", "use super::Parent; use crate::b::B;"),
        src("b", "use tracer_ebpf::abi; use std::path::Path;"),
    ];
    assert!(cycles(&fine).is_empty());
}
