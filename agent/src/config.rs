//! TOML configuration: the top-level table that assembles each component's own section.
//! Every component owns its config type and its checks ([`Validate`]); this module parses,
//! runs the checks, and turns every error (type errors from parsing and the semantic
//! checks alike) into `LINE: key: message` so `credwatch check-config` can name the line.
//! Unknown keys are errors: a typo must not silently disable a watch.

use std::{fmt::Display, path::Path, sync::Arc};

use anyhow::{Context, Result};
use serde::Deserialize;
use toml::{Spanned, de::DeValue};

use crate::{clickhouse, credential, detect, holders, inventory, kubelet, metrics, policy};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name in events; defaults to the host name.
    pub node: Option<String>,
    #[serde(default)]
    pub secrets: inventory::Config,
    #[serde(default)]
    pub kubernetes: kubelet::Config,
    #[serde(default)]
    pub fingerprint: credential::FingerprintConfig,
    #[serde(default)]
    pub holders: holders::Config,
    /// `[[node_agent]]`: software maintaining pod volumes, on top of the built-in ones.
    #[serde(default)]
    pub node_agent: Vec<holders::NodeAgentConfig>,
    #[serde(default)]
    pub detect: detect::Config,
    /// `[[credential]]` policy entries.
    #[serde(default)]
    pub credential: Vec<policy::CredentialPolicy>,
    /// `[[allow]]` known-good findings.
    #[serde(default)]
    pub allow: Vec<policy::AllowEntry>,
    #[serde(default)]
    pub sensors: crate::probes::Config,
    /// Events and alerts to ClickHouse; absent: no ClickHouse sink.
    pub clickhouse: Option<clickhouse::Config>,
    /// Where alerts go besides `--alerts` (stdout by default).
    #[serde(default)]
    pub alerts: crate::sinks::Config,
    #[serde(default)]
    pub metrics: metrics::Config,
    /// `credential` and `allow` compiled (once, while checking them).
    #[serde(skip)]
    pub policy: Arc<policy::Policy>,
}

/// One finding of a semantic check: the dotted key it is about (`clickhouse.batch_rows`,
/// `alerts.webhook[1].url`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Collects problems while a component checks its section; keys are relative to where the
/// section lives.
#[derive(Debug, Default)]
pub struct Checker {
    prefix: Vec<String>,
    problems: Vec<Problem>,
}

impl Checker {
    pub fn fail(&mut self, key: &str, message: impl Display) {
        let mut path = self.prefix.join(".");
        if !key.is_empty() {
            if !path.is_empty() && !key.starts_with('[') {
                path.push('.');
            }
            path.push_str(key);
        }
        self.problems.push(Problem {
            key: path,
            message: message.to_string(),
        });
    }

    pub fn check(&mut self, ok: bool, key: &str, message: impl Display) {
        if !ok {
            self.fail(key, message);
        }
    }

    /// Runs `f` with keys relative to `name` (a table, or `name[i]` for an array item).
    pub fn within(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Checker)) {
        let name = name.into();
        match (name.starts_with('['), self.prefix.last_mut()) {
            (true, Some(last)) => {
                let before = last.len();
                last.push_str(&name);
                f(self);
                self.prefix.last_mut().expect("pushed").truncate(before);
            }
            _ => {
                self.prefix.push(name);
                f(self);
                self.prefix.pop();
            }
        }
    }

    /// Each item of an array of tables, as `name[i]`.
    pub fn each<T: Validate>(&mut self, name: &str, items: &[T]) {
        self.within(name, |c| {
            for (i, item) in items.iter().enumerate() {
                c.within(format!("[{i}]"), |c| item.validate(c));
            }
        });
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

/// The checks a component's config needs beyond its types: whatever would fail or panic
/// later (zero intervals, empty queues, bad globs, unreachable schemes).
pub trait Validate {
    fn validate(&self, c: &mut Checker);
}

/// `http://` or `https://`, which every URL-shaped setting needs.
pub fn check_http_url(c: &mut Checker, key: &str, url: &str) {
    c.check(
        url.starts_with("http://") || url.starts_with("https://"),
        key,
        format_args!("must start with http:// or https:// (got {url:?})"),
    );
}

/// A duration that drives a timer or a window must not be zero.
pub fn check_nonzero(c: &mut Checker, key: &str, d: std::time::Duration) {
    c.check(!d.is_zero(), key, "must be longer than 0s");
}

impl Validate for Config {
    fn validate(&self, c: &mut Checker) {
        c.within("secrets", |c| self.secrets.validate(c));
        c.within("kubernetes", |c| self.kubernetes.validate(c));
        c.within("fingerprint", |c| self.fingerprint.validate(c));
        c.within("holders", |c| self.holders.validate(c));
        c.each("node_agent", &self.node_agent);
        c.within("detect", |c| self.detect.validate(c));
        c.within("sensors", |c| self.sensors.validate(c));
        if let Some(ch) = &self.clickhouse {
            c.within("clickhouse", |c| ch.validate(c));
        }
        c.within("alerts", |c| self.alerts.validate(c));
        c.within("metrics", |c| self.metrics.validate(c));
    }
}

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// `a.b[2].c` → ["a", "b", "[2]", "c"].
fn key_segments(key: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for part in key.split('.') {
        match part.find('[') {
            Some(i) => {
                if i > 0 {
                    out.push(&part[..i]);
                }
                let mut rest = &part[i..];
                while let Some(end) = rest.find(']') {
                    out.push(&rest[..=end]);
                    rest = &rest[end + 1..];
                }
            }
            None => out.push(part),
        }
    }
    out
}

/// Where `key` is written in `src`: its own span when present, else that of the nearest
/// enclosing table or item that is (a default value that conflicts with a set one).
fn span_of(src: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(src).ok()?;
    let mut best = None;
    let mut table = doc.get_ref();
    let mut array: Option<&toml::de::DeArray<'_>> = None;
    for seg in key_segments(key) {
        let found: Option<&Spanned<DeValue<'_>>> = match (seg.strip_prefix('['), array) {
            (Some(idx), Some(arr)) => idx
                .trim_end_matches(']')
                .parse::<usize>()
                .ok()
                .and_then(|i| arr.get(i)),
            (None, _) => table
                .iter()
                .find(|(k, _)| k.get_ref().as_ref() == seg)
                .map(|(_, v)| v),
            _ => None,
        };
        let Some(v) = found else { break };
        best = Some(v.span());
        array = None;
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            DeValue::Array(a) => array = Some(a),
            _ => {}
        }
    }
    best
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let src = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not UTF-8 ({e})", path.display()))?;
        Config::parse(&src).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
    }

    /// Errors are `LINE: key: message` so callers can prefix the file name.
    pub fn parse(src: &str) -> Result<Config> {
        let mut cfg: Config = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start)).unwrap_or(1);
            anyhow::anyhow!("{line}: {}", e.message().trim_end())
        })?;
        let mut c = Checker::default();
        cfg.validate(&mut c);
        cfg.policy = Arc::new(policy::Policy::compile_checked(
            &cfg.credential,
            &cfg.allow,
            &mut c,
        ));
        if let Some(p) = c.problems().first() {
            let line = span_of(src, &p.key).map_or(1, |s| line_of(src, s.start));
            anyhow::bail!("{line}: {}: {}", p.key, p.message);
        }
        Ok(cfg)
    }

    /// `CREDWATCH_NODE` (a DaemonSet passes `spec.nodeName` there), else `node`, else the
    /// host name.
    pub fn node_name(&self) -> String {
        if let Ok(n) = std::env::var("CREDWATCH_NODE")
            && !n.trim().is_empty()
        {
            return n.trim().to_owned();
        }
        if let Some(n) = &self.node {
            return n.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        Config::parse(src).unwrap_err().to_string()
    }

    #[test]
    fn empty_config_gets_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.secrets.catalog);
        assert_eq!(c.holders.window, std::time::Duration::from_secs(30));
        assert_eq!(c.kubernetes.trust_domain, "cluster.local");
    }

    #[test]
    fn type_errors_carry_line_numbers() {
        assert!(err("[secrets]\npaths = [\"/a\"]\nbogus = 1\n").starts_with("3: "));
        assert!(err("[holders]\nwindow = \"soon\"\n").starts_with("2: "));
    }

    #[test]
    fn semantic_errors_name_line_and_key() {
        let e = err("[secrets]\n\npaths = [\"/ok\", \"relative/*\"]\n");
        assert!(e.starts_with("3: secrets.paths[1]: "), "{e}");
        assert!(err("[secrets]\npaths = [\"/a/[\"]\n").contains("bad glob"));
        let e = err(
            "[[credential]]\npath = \"/a\"\n\n[[credential]]\npath = \"/b\"\nschedule = [\"Mon 9-5\"]\n",
        );
        assert!(e.starts_with("6: credential[1].schedule"), "{e}");
        let e = err("[sensors]\nring_bytes = 4096\ndrain_interval = \"0s\"\n");
        assert!(e.starts_with("3: sensors.drain_interval: "), "{e}");
        let e = err("[sensors]\nring_bytes = 5000\n");
        assert!(e.starts_with("2: sensors.ring_bytes: "), "{e}");
        let e = err("[secrets]\nrescan_interval = \"0s\"\n");
        assert!(e.starts_with("2: secrets.rescan_interval"), "{e}");
        let e = err(
            "[[alerts.syslog]]\naddress = \"udp://127.0.0.1:514\"\n\n[[alerts.webhook]]\nurl = \"https://a\"\n\n[[alerts.webhook]]\nurl = \"ftp://b\"\n",
        );
        assert!(e.starts_with("8: alerts.webhook[1].url: "), "{e}");
        let e = err("[[alerts.syslog]]\naddress = \"udp://127.0.0.1:514\"\nqueue = 0\n");
        assert!(e.starts_with("3: alerts.syslog[0].queue"), "{e}");
        // A conflict with a default points at the key that is set.
        let e = err("[clickhouse]\nurl = \"http://c:8123\"\nbatch_rows = 900000\n");
        assert!(e.starts_with("3: clickhouse.batch_rows: "), "{e}");
        let e = err("[metrics]\nlisten = \"localhost\"\n");
        assert!(e.starts_with("2: metrics.listen: "), "{e}");
    }

    #[test]
    fn key_paths_split_into_tables_and_items() {
        assert_eq!(
            key_segments("alerts.webhook[1].url"),
            ["alerts", "webhook", "[1]", "url"]
        );
        assert_eq!(key_segments("credential[0]"), ["credential", "[0]"]);
    }
}
