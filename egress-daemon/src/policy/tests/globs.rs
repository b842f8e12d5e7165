//! Cgroup globs, against a naive matcher.

use super::*;

#[test]
fn glob_star_stays_within_a_component() {
    let m = cgroup_glob_matches;
    assert!(m("system.slice/docker-*.scope", "system.slice/docker-3f2a.scope"));
    assert!(m("system.slice/docker-*.scope", "system.slice/docker-.scope"));
    assert!(!m("system.slice/docker-*.scope", "system.slice/docker-a/b.scope"));
    assert!(!m("system.slice/docker-*.scope", "system.slice/docker-3f2a.scope/init"));
    assert!(!m("system.slice/docker-*.scope", "docker-3f2a.scope"));
    assert!(m("*", "a"));
    assert!(!m("*", "a/b"));
    assert!(!m("*", ""));
    assert!(m("a/*", "a/b"));
    assert!(!m("a/*", "a"));
    assert!(m("*/*", "x/y"));
    assert!(m("a*b*c", "abc"));
    assert!(m("a*b*c", "axxbyybc"));
    assert!(!m("a*b*c", "axxbyyb"));
    assert!(m("*.scope", ".scope"));
}

#[test]
fn glob_question_mark_is_one_character() {
    let m = cgroup_glob_matches;
    assert!(m("pod?", "pod1"));
    assert!(!m("pod?", "pod"));
    assert!(!m("pod?", "pod12"));
    assert!(m("p?d", "pöd"));
    assert!(!m("a?b", "a/b"));
    assert!(m("??", "ab"));
}

#[test]
fn glob_double_star_spans_whole_components() {
    let m = cgroup_glob_matches;
    let kube = "kubepods.slice/**";
    assert!(m(kube, "kubepods.slice"));
    assert!(m(kube, "kubepods.slice/kubepods-besteffort.slice"));
    assert!(m(kube, "kubepods.slice/a.slice/b.slice/cri-containerd-1.scope"));
    assert!(!m(kube, "kubepods.slicex"));
    assert!(!m(kube, "system.slice/kubepods.slice"));
    assert!(m("**", ""));
    assert!(m("**", "a/b/c"));
    assert!(m("**/docker-*.scope", "docker-1.scope"));
    assert!(m("**/docker-*.scope", "system.slice/docker-1.scope"));
    assert!(!m("**/docker-*.scope", "system.slice/docker-1.scope/init"));
    assert!(m("a/**/z", "a/z"));
    assert!(m("a/**/z", "a/b/c/z"));
    assert!(!m("a/**/z", "a/b/c/zz"));
    assert!(m("a/**/b/**/c", "a/x/b/y/b/z/c"));
    assert!(!m("a/**/b/**/c", "a/x/c"));
    assert!(m("a/**/*.scope", "a/s.slice/x.scope"));
    assert!(!m("a/**/*.scope", "a/s.slice"));
}

#[test]
fn glob_plain_path_matches_exactly() {
    let m = cgroup_glob_matches;
    assert!(m("egress-demo", "egress-demo"));
    assert!(m("a/b", "a/b"));
    assert!(!m("a/b", "a"));
    assert!(!m("a/b", "a/b/c"));
    assert!(!m("a", "ab"));
    assert!(!m("a", ""));
    assert!(m("", ""));
    assert!(!m("", "a"));
    // Empty components are ignored on both sides.
    assert!(m("/a//b/", "a/b"));
    assert!(m("a/b", "/a/b/"));
}

/// The glob semantics written as plainly as possible, to test the matcher against.
fn naive_glob(pattern: &[&str], path: &[&str]) -> bool {
    fn component(p: &[char], c: &[char]) -> bool {
        match p.split_first() {
            None => c.is_empty(),
            Some(('*', rest)) => (0..=c.len()).any(|i| component(rest, &c[i..])),
            Some(('?', rest)) => !c.is_empty() && component(rest, &c[1..]),
            Some((ch, rest)) => c.first() == Some(ch) && component(rest, &c[1..]),
        }
    }
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| naive_glob(rest, &path[i..])),
        Some((p, rest)) => {
            path.first().is_some_and(|c| {
                let p: Vec<char> = p.chars().collect();
                let c: Vec<char> = c.chars().collect();
                component(&p, &c)
            }) && naive_glob(rest, &path[1..])
        }
    }
}

fn components(text: &str) -> Vec<&str> {
    text.split('/').filter(|c| !c.is_empty()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn glob_matcher_agrees_with_naive(
        pattern in "(\\*\\*|[ab*?]{0,4})(/(\\*\\*|[ab*?]{0,4})){0,4}",
        path in "[ab]{0,3}(/[ab]{0,3}){0,5}",
    ) {
        let expected = naive_glob(&components(&pattern), &components(&path));
        prop_assert_eq!(cgroup_glob_matches(&pattern, &path), expected);
    }
}
