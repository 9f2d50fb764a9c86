//! `presence.ttl_rules`: per-class TTLs, e.g. `bat-*=12h,gw-*=90s,group:lab-*=5m`. The first
//! rule whose pattern matches gives a device's TTL instead of `presence.ttl`; a pattern is a
//! glob on the device id (`*` any run of characters, `?` one character, the rest literal),
//! or after `group:` a glob on the device's group. Pure: parsing and matching, no I/O.

use std::fmt;
use std::time::Duration;

use super::parse::{fmt_dur, parse_duration};

/// What a rule's pattern is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Device,
    Group,
}

/// One `PATTERN=DURATION`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    target: Target,
    pattern: Vec<char>,
    ttl: Duration,
}

/// The rules in their order (first match wins); empty when none are set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TtlRules {
    rules: Vec<Rule>,
}

impl TtlRules {
    /// Parses the comma-separated rules; every TTL must lie within `[min, max]`. The error
    /// says which rule and why (the caller names the key).
    pub fn parse(text: &str, min: Duration, max: Duration) -> Result<TtlRules, String> {
        let mut rules = Vec::new();
        for raw in text.split(',').map(str::trim) {
            if raw.is_empty() && text.trim().is_empty() {
                break;
            }
            rules.push(Rule::parse(raw, min, max).map_err(|e| format!("rule {raw:?}: {e}"))?);
        }
        Ok(TtlRules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The TTL of the first rule that matches `device` (or `group`, for a `group:` rule; a
    /// device whose group is not known matches none of those).
    pub fn ttl_for(&self, device: &str, group: Option<&str>) -> Option<Duration> {
        if self.rules.is_empty() {
            return None;
        }
        // Each subject's characters once, and only if a rule of its kind is reached.
        let (mut device_chars, mut group_chars) = (None::<Vec<char>>, None::<Vec<char>>);
        self.rules.iter().find_map(|r| {
            let subject = match r.target {
                Target::Device => device_chars.get_or_insert_with(|| device.chars().collect()),
                Target::Group => match group {
                    Some(g) => group_chars.get_or_insert_with(|| g.chars().collect()),
                    None => return None,
                },
            };
            glob(&r.pattern, subject).then_some(r.ttl)
        })
    }
}

impl Rule {
    fn parse(raw: &str, min: Duration, max: Duration) -> Result<Rule, String> {
        if raw.is_empty() {
            return Err("an empty rule (a stray comma?)".into());
        }
        let (pattern, ttl) = raw.rsplit_once('=').ok_or("expected PATTERN=DURATION")?;
        let (target, pattern) = match pattern.trim().strip_prefix("group:") {
            Some(p) => (Target::Group, p.trim()),
            None => (Target::Device, pattern.trim()),
        };
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        let ttl = parse_duration(ttl.trim()).map_err(|e| format!("duration: {e}"))?;
        if ttl < min || ttl > max {
            return Err(format!(
                "{} must lie within presence.min_ttl ({}) and presence.max_ttl ({})",
                fmt_dur(ttl),
                fmt_dur(min),
                fmt_dur(max)
            ));
        }
        Ok(Rule {
            target,
            pattern: pattern.chars().collect(),
            ttl,
        })
    }
}

impl fmt::Display for TtlRules {
    /// The effective rules, one per line, in order (`check-config`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            let on = match r.target {
                Target::Device => "device id",
                Target::Group => "group",
            };
            let pattern: String = r.pattern.iter().collect();
            writeln!(
                f,
                "{}. {on} matches {pattern:?}: TTL {}",
                i + 1,
                fmt_dur(r.ttl)
            )?;
        }
        Ok(())
    }
}

/// Whether `text` matches the glob `pattern` (`*` any run, `?` one character). Iterative,
/// with one backtrack point: linear in practice, never exponential.
fn glob(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(86_400);

    fn g(p: &str, t: &str) -> bool {
        glob(
            &p.chars().collect::<Vec<_>>(),
            &t.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn globs() {
        assert!(g("bat-*", "bat-17"));
        assert!(g("bat-*", "bat-"));
        assert!(!g("bat-*", "gw-1"));
        assert!(g("*-7", "site-7"));
        assert!(g("a?c", "abc"));
        assert!(!g("a?c", "ac"));
        assert!(g("*a*b*", "xxaxxbxx"));
        assert!(!g("*a*b", "xxaxxbxx"));
        assert!(g("exact", "exact"));
        assert!(!g("exact", "exactly"));
        assert!(g("*", ""));
        assert!(g("ü*", "über"));
        // No exponential backtracking.
        assert!(!g(&"*a".repeat(30), &"a".repeat(29)));
    }

    #[test]
    fn first_match_wins_and_group_rules_need_a_group() {
        let r = TtlRules::parse("bat-*=12h, gw-*=90s,group: lab-*=5m,*=10s", MIN, MAX).unwrap();
        let h = Duration::from_secs;
        assert_eq!(r.ttl_for("bat-1", Some("lab-1")), Some(h(12 * 3600)));
        assert_eq!(r.ttl_for("gw-1", None), Some(h(90)));
        assert_eq!(r.ttl_for("s-1", Some("lab-1")), Some(h(300)));
        assert_eq!(r.ttl_for("s-1", None), Some(h(10)));
        assert_eq!(r.ttl_for("s-1", Some("prod")), Some(h(10)));
        assert!(TtlRules::parse("", MIN, MAX).unwrap().is_empty());
        let shown = r.to_string();
        assert!(
            shown.starts_with("1. device id matches \"bat-*\": TTL 12h\n"),
            "{shown}"
        );
        assert!(
            shown.contains("3. group matches \"lab-*\": TTL 5m"),
            "{shown}"
        );
    }

    #[test]
    fn bad_rules_say_why() {
        for (bad, why) in [
            ("bat-*", "expected PATTERN=DURATION"),
            ("=5m", "empty pattern"),
            ("group:=5m", "empty pattern"),
            ("bat-*=soon", "duration"),
            ("bat-*=100ms", "must lie within"),
            ("bat-*=2d", "must lie within"),
            ("a=5m,,b=5m", "an empty rule"),
            ("a=5m,", "an empty rule"),
        ] {
            let e = TtlRules::parse(bad, MIN, MAX).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
