//! `upstreams`: which breaker settings apply to an upstream key. An exact key beats every glob; among
//! globs the longest pattern wins, ties broken by the pattern text, so the choice never depends on the
//! order of a JSON object.
//!
//! Resolving scans the globs, so a worker does it once per key and keeps the answer (a
//! [`BreakerId`]) in its key cache; see [`crate::worker`].

use hashbrown::HashMap;

/// Which settings of a [`super::FilterConfig`] apply: the defaults, or one override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BreakerId(pub(crate) u32);

impl BreakerId {
    /// The top-level settings.
    pub const DEFAULTS: BreakerId = BreakerId(0);
}

/// The overrides, compiled for lookup. Ids index the configuration's list of breaker settings, where
/// 0 is the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Overrides {
    exact: HashMap<String, BreakerId>,
    /// Sorted longest pattern first, so the first match is the most specific one.
    globs: Vec<(String, BreakerId)>,
}

impl Overrides {
    /// Adds an override under `pattern` (a glob when it holds `*`).
    pub fn insert(&mut self, pattern: String, id: BreakerId) {
        if pattern.contains('*') {
            self.globs.push((pattern, id));
        } else {
            self.exact.insert(pattern, id);
        }
    }

    /// Orders the globs; call once after the last insert.
    pub fn seal(&mut self) {
        self.globs
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then(a.cmp(b)));
    }

    /// The settings for `key`.
    pub fn resolve(&self, key: &str) -> BreakerId {
        if let Some(id) = self.exact.get(key) {
            return *id;
        }
        self.globs
            .iter()
            .find(|(p, _)| glob_match(p, key))
            .map_or(BreakerId::DEFAULTS, |(_, id)| *id)
    }

    /// Number of overrides.
    pub fn len(&self) -> usize {
        self.exact.len() + self.globs.len()
    }
}

/// `*` matches any (possibly empty) run of bytes; all other bytes match themselves. Iterative with
/// single-star backtracking, so it is linear-ish and cannot blow the stack on hostile patterns.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}
