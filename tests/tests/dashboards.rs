//! The Grafana dashboards in `dashboards/`: every ClickHouse query of every panel (panels
//! inside rows included) and of every query variable, expanded the way Grafana and the
//! ClickHouse data source plugin (`grafana-clickhouse-datasource` v4) expand them, runs on
//! the replayed fixtures and returns what its panel needs.
//!
//! How a panel's `rawSql` becomes the SQL ClickHouse receives, in order:
//!
//! 1. the plugin's front end replaces `$__conditionalAll(condition, $var)` with `1=1` when
//!    `$var` is on All (or empty), else with `condition` (`applyConditionalAll` in
//!    `src/data/CHDatasource.ts`);
//! 2. Grafana's template service replaces dashboard variables (`$var`, `${var}`,
//!    `${var:format}`, `[[var]]`) with the plugin's own formatter for the plain forms
//!    (`CHDatasource.format`: a multi-value becomes `'a','b'`, a single value goes in raw);
//!    anything that is not a dashboard variable, such as `$__timeFilter`, is left alone;
//! 3. the plugin's back end expands the `$__` time macros (`pkg/macros/macros.go`).
//!
//! Source: <https://github.com/grafana/clickhouse-datasource> (v4.20.0; the time macros
//! have produced this SQL since v4.0.3). Only what is implemented here is vouched for: a
//! dashboard using another macro or variable format fails this test until it is added.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use credwatch_tests::{clickhouse::TestClickHouse, credwatch, fixture, ok, workdir};
use serde_json::Value;

const CLICKHOUSE: &str = "grafana-clickhouse-datasource";
const PROMETHEUS: &str = "prometheus";

/// The dashboard time range and panel interval of the test: 2026-10-25T00:00:00Z to
/// 2026-12-10T00:00:00Z (the fixtures' events are dated 2026-11-01..2026-12-05), 1h.
const RANGE: TimeRange = TimeRange {
    from_ms: 1_792_886_400_000,
    to_ms: 1_796_860_800_000,
    interval_ms: 3_600_000,
};

/// Values for the single-value variables: a workload and a credential that have reads,
/// uses, destinations and alerts in the fixtures.
const FIXED: &[(&str, &str)] = &[
    ("workload", "pod:payments/api-7f9c"),
    (
        "fingerprint",
        "hmac-sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ),
];

/// The dashboards every deployment gets.
const EXPECTED: &[&str] = &[
    "credwatch-overview.json",
    "credwatch-workload.json",
    "credwatch-credential.json",
    "credwatch-agent-health.json",
];

// ---------------------------------------------------------------------------------------
// Expansion, step 3: the plugin's back-end macros.

/// What the plugin's back end knows of a query: its time range (Unix ms) and interval.
#[derive(Clone, Copy, Debug)]
struct TimeRange {
    from_ms: i64,
    to_ms: i64,
    interval_ms: i64,
}

impl TimeRange {
    /// The expansion of `$__name` (with `args` when it was written `$__name(...)`), exactly
    /// as `pkg/macros/macros.go` writes it. Seconds are Go's `time.Unix()` (floor), the
    /// interval is `max(interval, 1s)` truncated to whole seconds (or `max(interval, 1ms)`
    /// for the `_ms` forms), dates are the calendar dates of from and to (in UTC here).
    fn macro_text(&self, name: &str, args: &[String]) -> Result<String, String> {
        let (from_s, to_s) = (self.from_ms.div_euclid(1000), self.to_ms.div_euclid(1000));
        let (from_ms, to_ms) = (self.from_ms, self.to_ms);
        let interval_s = (self.interval_ms / 1000).max(1);
        let interval_ms = self.interval_ms.max(1);
        let text = match (name, args) {
            // toDateTime(<unix s>) / fromUnixTimestamp64Milli(<unix ms>)
            ("fromTime", []) => format!("toDateTime({from_s})"),
            ("toTime", []) => format!("toDateTime({to_s})"),
            ("fromTime_ms", []) => format!("fromUnixTimestamp64Milli({from_ms})"),
            ("toTime_ms", []) => format!("fromUnixTimestamp64Milli({to_ms})"),
            ("interval_s", []) => interval_s.to_string(),
            // Both ends inclusive.
            ("timeFilter", [c]) => {
                format!("{c} >= toDateTime({from_s}) AND {c} <= toDateTime({to_s})")
            }
            ("timeFilter_ms", [c]) => format!(
                "{c} >= fromUnixTimestamp64Milli({from_ms}) AND {c} <= fromUnixTimestamp64Milli({to_ms})"
            ),
            ("dateFilter", [c]) => format!(
                "{c} >= toDate('{}') AND {c} <= toDate('{}')",
                utc_date(from_ms)?,
                utc_date(to_ms)?
            ),
            ("timeInterval", [c]) => {
                format!("toStartOfInterval(toDateTime({c}), INTERVAL {interval_s} second)")
            }
            ("timeInterval_ms", [c]) => format!(
                "toStartOfInterval(toDateTime64({c}, 3), INTERVAL {interval_ms} millisecond)"
            ),
            (
                "fromTime" | "toTime" | "fromTime_ms" | "toTime_ms" | "interval_s" | "timeFilter"
                | "timeFilter_ms" | "dateFilter" | "timeInterval" | "timeInterval_ms",
                _,
            ) => return Err(format!("$__{name}: wrong number of arguments {args:?}")),
            _ => return Err(format!("$__{name}: not a macro this test implements")),
        };
        Ok(text)
    }
}

fn utc_date(ms: i64) -> Result<String, String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.date_naive().to_string())
        .ok_or_else(|| format!("time {ms} out of range"))
}

/// Expands every `$__name` / `$__name(args)` in `sql`, innermost (last) first so a macro
/// inside another's arguments is expanded before it, as the plugin does. Arguments are
/// split at top-level commas and trimmed; parentheses inside quoted strings do not count.
fn expand_macros(sql: &str, range: &TimeRange) -> Result<String, String> {
    let mut sql = sql.to_owned();
    while let Some(at) = sql.rfind("$__") {
        let name_end = at + 3 + word_len(&sql.as_bytes()[at + 3..]);
        let name = sql[at + 3..name_end].to_owned();
        let (args, end) = if sql[name_end..].starts_with('(') {
            let (args, close) = sql_macro_args(&sql, name_end)
                .ok_or_else(|| format!("$__{name}: unbalanced parentheses"))?;
            (args, close + 1)
        } else {
            (Vec::new(), name_end)
        };
        let text = range.macro_text(&name, &args)?;
        sql.replace_range(at..end, &text);
    }
    Ok(sql)
}

/// The arguments of a back-end macro whose `(` is at `open`, and the index of its `)`.
fn sql_macro_args(sql: &str, open: usize) -> Option<(Vec<String>, usize)> {
    let bytes = sql.as_bytes();
    let (mut depth, mut start, mut args) = (0usize, open + 1, Vec::new());
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                // Skip a string literal ('it\'s' and 'it''s' both stay inside).
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    args.push(sql[start..i].trim().to_owned());
                    if args.len() == 1 && args[0].is_empty() {
                        args.clear();
                    }
                    return Some((args, i));
                }
            }
            b',' if depth == 1 => {
                args.push(sql[start..i].trim().to_owned());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Length of the run of `\w` characters (ASCII letters, digits, `_`) at the start of `s`.
fn word_len(s: &[u8]) -> usize {
    s.iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .count()
}

// ---------------------------------------------------------------------------------------
// Expansion, steps 1 and 2: the front end.

/// What a template variable is set to.
#[derive(Clone, Debug, PartialEq)]
enum Current {
    /// "All" of a variable with `includeAll` (Grafana's `$__all`, no custom all value).
    All,
    /// A single value.
    One(String),
    /// Values ticked in a multi-value variable (one ticked value is still a list).
    Many(Vec<String>),
}

#[derive(Clone, Debug)]
struct Variable {
    name: String,
    current: Current,
    /// The values its query returned (first column): what All stands for.
    options: Vec<String>,
}

/// A panel's `rawSql` as ClickHouse receives it.
fn expand(raw: &str, vars: &[Variable], range: &TimeRange) -> Result<String, String> {
    let sql = conditional_all(raw, vars)?;
    let sql = interpolate_variables(&sql, vars)?;
    expand_macros(&sql, range)
}

/// `$__conditionalAll(condition, $var)`, from the last occurrence backwards like
/// `applyConditionalAll`: `1=1` when `$var` is on All or empty, else `condition` as written
/// (its variables are interpolated next). The arguments are split like the plugin's
/// `getMacroArgs` (parentheses and commas only, nothing trimmed); the variable is the first
/// `${name}` or `$name` in the second argument (`${name:format}` does not count there).
fn conditional_all(raw: &str, vars: &[Variable]) -> Result<String, String> {
    const MACRO: &str = "$__conditionalAll(";
    let mut sql = raw.to_owned();
    while let Some(at) = sql.rfind(MACRO) {
        let Some(args) = plugin_macro_args(&sql[at + MACRO.len() - 1..]) else {
            // The plugin stops and leaves the rest; the back end then fails on it.
            return Ok(sql);
        };
        let [condition, var] = args.as_slice() else {
            return Ok(sql);
        };
        let all = conditional_all_variable(var.trim())
            .and_then(|name| vars.iter().find(|v| v.name == name))
            .is_some_and(|v| match &v.current {
                Current::All => true,
                Current::One(s) => s.is_empty(),
                Current::Many(values) => values.is_empty(),
            });
        let phrase = if all { "1=1" } else { condition.as_str() };
        // JavaScript's String.replace reads `$$`, `$&`, `` $` `` and `$'` in the
        // replacement specially; keep clear of that instead of imitating it.
        if ["$$", "$&", "$`", "$'"].iter().any(|p| phrase.contains(p)) {
            return Err(format!(
                "$__conditionalAll: condition {phrase:?} would be mangled"
            ));
        }
        let whole = format!("{MACRO}{condition},{var})");
        sql = sql.replacen(&whole, phrase, 1);
    }
    Ok(sql)
}

/// The plugin's `getMacroArgs` on `s` starting at `(`: arguments split at commas of depth
/// one, untrimmed; `None` when the parentheses never close.
fn plugin_macro_args(s: &str) -> Option<Vec<String>> {
    let (mut depth, mut start, mut args) = (0i32, 1usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 1 => {
                args.push(s[start..i].to_owned());
                start = i + 1;
            }
            _ => continue,
        }
        if depth == 0 {
            args.push(s[start..i].to_owned());
            return Some(args);
        }
    }
    None
}

/// The variable named in `$__conditionalAll`'s second argument: the leftmost match of
/// `(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+`.
fn conditional_all_variable(arg: &str) -> Option<&str> {
    let b = arg.as_bytes();
    (0..b.len()).find_map(|i| {
        let n = word_len(&b[i..]);
        let braced = i >= 2 && &b[i - 2..i] == b"${" && b.get(i + n) == Some(&b'}');
        let bare = i >= 1 && b[i - 1] == b'$';
        (n > 0 && (braced || bare)).then(|| &arg[i..i + n])
    })
}

/// A variable reference as Grafana's template service matches it:
/// `\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}`.
struct Reference<'a> {
    len: usize,
    name: &'a str,
    field_path: Option<&'a str>,
    format: Option<&'a str>,
}

fn reference_at(s: &str) -> Option<Reference<'_>> {
    if let Some(r) = s.strip_prefix('$') {
        let n = word_len(r.as_bytes());
        if n > 0 {
            return Some(Reference {
                len: 1 + n,
                name: &r[..n],
                field_path: None,
                format: None,
            });
        }
        let r = r.strip_prefix('{')?;
        let n = word_len(r.as_bytes());
        if n == 0 {
            return None;
        }
        let mut i = n;
        let mut field_path = None;
        if r[i..].starts_with('.') {
            let p = r[i + 1..].find([':', '^', '}']).unwrap_or(r.len() - i - 1);
            if p > 0 && !r[i + 1 + p..].starts_with('^') {
                field_path = Some(&r[i + 1..i + 1 + p]);
                i += 1 + p;
            }
        }
        let mut format = None;
        if r[i..].starts_with(':') {
            let f = r[i + 1..].find('}').unwrap_or(r.len() - i - 1);
            if f > 0 {
                format = Some(&r[i + 1..i + 1 + f]);
                i += 1 + f;
            }
        }
        if !r[i..].starts_with('}') {
            return None;
        }
        return Some(Reference {
            len: 2 + i + 1,
            name: &r[..n],
            field_path,
            format,
        });
    }
    let r = s.strip_prefix("[[")?;
    let n = word_len(r.as_bytes());
    if n == 0 {
        return None;
    }
    let mut i = n;
    let mut format = None;
    if r[i..].starts_with(':') {
        let f = word_len(&r.as_bytes()[i + 1..]);
        if f > 0 && r[i + 1 + f..].starts_with("]]") {
            format = Some(&r[i + 1..i + 1 + f]);
            i += 1 + f;
        }
    }
    r[i..].starts_with("]]").then(|| Reference {
        len: 2 + i + 2,
        name: &r[..n],
        field_path: None,
        format,
    })
}

/// Grafana's `templateSrv.replace(sql, scopedVars, datasource.format)`: dashboard
/// variables are replaced, other `$names` (`$__timeFilter`, ...) stay for the back end.
/// Nothing inserted is scanned again.
fn interpolate_variables(sql: &str, vars: &[Variable]) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(r) = reference_at(rest) else {
            out.push_str(&rest[..1]);
            rest = &rest[1..];
            continue;
        };
        match vars.iter().find(|v| v.name == r.name) {
            Some(v) => {
                if let Some(path) = r.field_path {
                    return Err(format!(
                        "${{{}.{path}}}: field paths are not implemented",
                        r.name
                    ));
                }
                out.push_str(&render(v, r.format)?);
            }
            None => out.push_str(&rest[..r.len]),
        }
        rest = &rest[r.len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A variable's value in a query. All is the list of every option (Grafana's value for All
/// without a custom all value). Without a format the plugin's `format` applies: a list
/// becomes `'a','b'` (nothing escaped), a single value goes in as it is. `singlequote` is
/// Grafana's: every value in single quotes, `'` escaped as `\'`, joined with `,`.
fn render(v: &Variable, format: Option<&str>) -> Result<String, String> {
    let (values, single) = match &v.current {
        Current::All => (v.options.as_slice(), false),
        Current::Many(values) => (values.as_slice(), false),
        Current::One(value) => (std::slice::from_ref(value), true),
    };
    let quote = |s: &String| format!("'{}'", s.replace('\'', "\\'"));
    Ok(match format {
        None if single => values[0].clone(),
        None => format!("'{}'", values.join("','")),
        Some("singlequote") => values.iter().map(quote).collect::<Vec<_>>().join(","),
        Some(f) => {
            return Err(format!(
                "${{{}:{f}}}: the {f} format is not implemented here",
                v.name
            ));
        }
    })
}

// ---------------------------------------------------------------------------------------
// Dashboards.

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Every `*.json` in `dashboards/`, parsed: (file name, model).
fn dashboards() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("dashboards/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).unwrap();
            let model = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, model)
        })
        .collect()
}

/// Every panel that is not a row, including the panels kept inside collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                out.push(p);
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A target's data source: its own, else its panel's.
fn datasource<'a>(panel: &'a Value, target: &'a Value) -> &'a Value {
    if target["datasource"].is_object() {
        &target["datasource"]
    } else {
        &panel["datasource"]
    }
}

fn targets(panel: &Value) -> impl Iterator<Item = &Value> {
    panel["targets"].as_array().into_iter().flatten()
}

fn is_timeseries(panel: &Value) -> bool {
    panel["type"] == "timeseries"
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// The model's own consistency: what Grafana and the plugin need to load and run it.
fn model_problems(file: &str, d: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |what: String| problems.push(format!("{file}: {what}"));
    if d["schemaVersion"].as_u64().unwrap_or(0) < 39 {
        problem("schemaVersion below 39".into());
    }
    if str_of(d, "uid").is_empty() || str_of(d, "title").is_empty() {
        problem("no uid or title".into());
    }
    let vars: Vec<&Value> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let ds_var = |name: &str, plugin: &str| {
        vars.iter()
            .any(|v| v["name"] == name && v["type"] == "datasource" && v["query"] == plugin)
    };
    if !ds_var("datasource", CLICKHOUSE) {
        problem(format!(
            "no `datasource` variable of type datasource for {CLICKHOUSE}"
        ));
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let name = str_of(v, "name");
        if v["datasource"]["type"] != CLICKHOUSE || v["datasource"]["uid"] != "${datasource}" {
            problem(format!(
                "variable {name}: not on the ${{datasource}} ClickHouse"
            ));
        }
        if !str_of(v, "allValue").is_empty() {
            problem(format!(
                "variable {name}: a custom all value is not tested here"
            ));
        }
        let raw = v["query"]
            .as_str()
            .or_else(|| v["query"]["rawSql"].as_str());
        if raw.is_none_or(|q| q.trim().is_empty()) {
            problem(format!("variable {name}: no query"));
        }
        let multi = v["multi"] == true || v["includeAll"] == true;
        if !multi && !FIXED.iter().any(|(n, _)| *n == name) {
            problem(format!(
                "variable {name}: single-valued, and this test has no value for it"
            ));
        }
    }
    let mut ids = HashSet::new();
    let mut all: Vec<&Value> = panels(d);
    all.extend(
        d["panels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"] == "row"),
    );
    for p in &all {
        if !ids.insert(p["id"].as_u64()) || p["id"].as_u64().is_none() {
            problem(format!("panel {:?}: missing or duplicate id", p["title"]));
        }
        if !p["gridPos"].is_object() {
            problem(format!("panel {:?}: no gridPos", p["title"]));
        }
    }
    for p in panels(d) {
        let title = str_of(p, "title");
        if title.is_empty() {
            problem("a panel without a title".into());
        }
        for t in targets(p) {
            let ds = datasource(p, t);
            let refid = str_of(t, "refId");
            let what = format!("panel {title:?} target {refid:?}");
            match ds["type"].as_str() {
                Some(CLICKHOUSE) => {
                    let (qt, format) = (str_of(t, "queryType"), t["format"].as_u64());
                    if ds["uid"] != "${datasource}" {
                        problem(format!("{what}: data source uid is not ${{datasource}}"));
                    }
                    if t["editorType"] != "sql" || str_of(t, "rawSql").trim().is_empty() {
                        problem(format!("{what}: not a raw SQL query"));
                    }
                    // The plugin's editor writes format 0 for time series, 1 for tables.
                    let ok = match qt {
                        "timeseries" => format == Some(0),
                        "table" => format == Some(1) && !is_timeseries(p),
                        _ => false,
                    };
                    if !ok {
                        problem(format!(
                            "{what}: queryType {qt:?} / format {format:?} does not fit a {} panel",
                            str_of(p, "type")
                        ));
                    }
                }
                Some(PROMETHEUS) => {
                    if ds["uid"] != "${prometheus}" || !ds_var("prometheus", PROMETHEUS) {
                        problem(format!(
                            "{what}: Prometheus not through a ${{prometheus}} variable"
                        ));
                    }
                    if str_of(t, "expr").trim().is_empty() {
                        problem(format!("{what}: no expr"));
                    }
                }
                other => problem(format!("{what}: unexpected data source type {other:?}")),
            }
        }
    }
    problems
}

#[test]
fn dashboards_are_well_formed() {
    let dashboards = dashboards();
    let names: Vec<&str> = dashboards.iter().map(|(n, _)| n.as_str()).collect();
    for want in EXPECTED {
        assert!(
            names.contains(want),
            "dashboards/{want} is missing: {names:?}"
        );
    }
    let mut problems: Vec<String> = dashboards
        .iter()
        .flat_map(|(file, d)| model_problems(file, d))
        .collect();
    let mut uids = HashSet::new();
    for (file, d) in &dashboards {
        if !uids.insert(str_of(d, "uid")) {
            problems.push(format!("{file}: uid {} used twice", d["uid"]));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Running the queries.

/// Schema, then the three replay fixtures through the pipeline with the baseline policy
/// (alerts of most kinds). The returned directory holds the config and the replay state.
fn fill(ch: &TestClickHouse) -> tempfile::TempDir {
    let w = workdir();
    let policy = std::fs::read_to_string(fixture("replay-baselines.toml")).unwrap();
    let cfg = w.path().join("credwatch.toml");
    std::fs::write(&cfg, format!("{policy}\n{}", ch.config())).unwrap();
    let cfg = cfg.to_str().unwrap();
    ok(&credwatch(&["migrate", "--config", cfg]));
    let state = w.path().join("state");
    ok(&credwatch(&[
        "replay",
        "--config",
        cfg,
        "--state-dir",
        state.to_str().unwrap(),
        &fixture("replay-detections.ndjson"),
        &fixture("replay-baselines-day0.ndjson"),
        &fixture("replay-baselines-later.ndjson"),
    ]));
    w
}

/// Runs `sql` in the test database over HTTP; the parsed `JSONCompact` answer, or
/// ClickHouse's error.
fn query(ch: &TestClickHouse, sql: &str) -> Result<Value, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let answer = agent
        .post(&ch.url)
        .query("database", &ch.database)
        .query("default_format", "JSONCompact")
        .send_string(sql);
    let body = match answer {
        Ok(r) => r.into_string().map_err(|e| e.to_string())?,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            return Err(format!("ClickHouse answered {code}: {}", text.trim()));
        }
        Err(e) => return Err(e.to_string()),
    };
    serde_json::from_str(&body).map_err(|e| format!("not JSONCompact ({e}): {body}"))
}

fn cell_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// How the variables with `includeAll`/`multi` are set for a pass.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Selection {
    /// On All (`$__conditionalAll` gives `1=1`): every panel must have rows.
    All,
    /// On their first value, ticked alone (`IN ('node-1')`): panels must run.
    First,
}

/// Runs each query variable in order (a later one may use an earlier one) and sets it.
fn resolve_variables(
    ch: &TestClickHouse,
    d: &Value,
    selection: Selection,
) -> Result<Vec<Variable>, String> {
    let mut vars = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = str_of(v, "name").to_owned();
        let raw = v["query"]
            .as_str()
            .or_else(|| v["query"]["rawSql"].as_str())
            .unwrap_or_default();
        let sql = expand(raw, &vars, &RANGE).map_err(|e| format!("variable ${name}: {e}"))?;
        let answer =
            query(ch, &sql).map_err(|e| format!("variable ${name}: {e}\n--- SQL ---\n{sql}"))?;
        let options: Vec<String> = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| cell_text(&row[0]))
            .collect();
        let Some(first) = options.first().cloned() else {
            return Err(format!("variable ${name}: no values\n--- SQL ---\n{sql}"));
        };
        let current = match (selection, v["includeAll"] == true, v["multi"] == true) {
            (Selection::All, true, _) => Current::All,
            (_, _, true) => Current::Many(vec![first]),
            (Selection::First, true, false) => Current::One(first),
            (_, false, false) => {
                let value = FIXED
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, value)| value.to_string())
                    .ok_or_else(|| format!("variable ${name}: no value for it in this test"))?;
                if !options.contains(&value) {
                    return Err(format!(
                        "variable ${name}: {value} is not among its values {options:?}"
                    ));
                }
                Current::One(value)
            }
        };
        vars.push(Variable {
            name,
            current,
            options,
        });
    }
    Ok(vars)
}

/// What the panel needs from its query's answer.
fn check_answer(panel: &Value, answer: &Value, need_rows: bool) -> Result<(), String> {
    let columns: Vec<(&str, &str)> = answer["meta"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (str_of(c, "name"), str_of(c, "type")))
        .collect();
    let rows: &[Value] = answer["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if columns.is_empty() {
        return Err("the query returns no columns".into());
    }
    if need_rows && rows.is_empty() {
        return Err("no rows on the fixtures".into());
    }
    if is_timeseries(panel) {
        // The plugin turns long rows (time, labels..., values...) into series; Grafana wants
        // the time first and ascending.
        let (name, kind) = columns[0];
        if !kind.trim_start_matches("Nullable(").starts_with("DateTime") {
            return Err(format!(
                "a time series needs a time column first, not {name} {kind}"
            ));
        }
        let times: Vec<String> = rows.iter().map(|r| cell_text(&r[0])).collect();
        if times.windows(2).any(|w| w[0] > w[1]) {
            return Err("time column not ascending (ORDER BY time)".into());
        }
    }
    // Overrides address fields by name: a renamed column silently loses its unit, link or
    // colours. (After a transformation the names may differ; those panels are skipped.)
    if panel["transformations"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        let overrides = panel["fieldConfig"]["overrides"].as_array();
        for o in overrides.into_iter().flatten() {
            let field = str_of(&o["matcher"], "options");
            if o["matcher"]["id"] == "byName" && !columns.iter().any(|(n, _)| *n == field) {
                return Err(format!(
                    "a field override names {field:?}, which the query does not return"
                ));
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs the agent binary and the test ClickHouse (cargo xtask test sets them up)"]
fn every_dashboard_query_runs_on_the_replayed_fixtures() {
    let dashboards = dashboards();
    let ch = TestClickHouse::start();
    let _work = fill(&ch);
    let landed = query(
        &ch,
        "SELECT (SELECT count() FROM credential_uses), (SELECT count() FROM alerts)",
    )
    .unwrap();
    assert!(
        landed["data"][0].as_array().is_some_and(|r| r
            .iter()
            .all(|n| cell_text(n).parse::<u64>().unwrap_or(0) > 0)),
        "the replay left credential uses and alerts: {landed}"
    );

    let mut failures = Vec::new();
    let mut ran = 0;
    for (file, d) in &dashboards {
        let title = str_of(d, "title");
        let ran_before = ran;
        for selection in [Selection::All, Selection::First] {
            let vars = match resolve_variables(&ch, d, selection) {
                Ok(vars) => vars,
                Err(e) => {
                    failures.push(format!("{title} ({file}), variables on {selection:?}: {e}"));
                    continue;
                }
            };
            for p in panels(d) {
                for t in targets(p).filter(|t| datasource(p, t)["type"] == CLICKHOUSE) {
                    ran += 1;
                    let raw = str_of(t, "rawSql");
                    let outcome = match expand(raw, &vars, &RANGE) {
                        Err(e) => Err(format!("{e}\n--- rawSql ---\n{raw}")),
                        Ok(sql) => query(&ch, &sql)
                            .and_then(|answer| {
                                check_answer(p, &answer, selection == Selection::All)
                            })
                            .map_err(|e| format!("{e}\n--- SQL ---\n{sql}")),
                    };
                    if let Err(e) = outcome {
                        failures.push(format!(
                            "{title} ({file}) / panel {:?} / target {}, variables on {selection:?}: {e}",
                            str_of(p, "title"),
                            str_of(t, "refId")
                        ));
                    }
                }
            }
        }
        if ran == ran_before {
            failures.push(format!("{title} ({file}): no ClickHouse query ran"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} dashboard queries failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// The expansion itself, against the plugin's and Grafana's own examples.

fn var(name: &str, current: Current, options: &[&str]) -> Variable {
    Variable {
        name: name.into(),
        current,
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn macros_expand_like_the_plugin() {
    // pkg/macros/macros_test.go: 2014-11-12T11:45:26.123Z .. 2015-11-12T11:45:26.456Z, 1m.
    let r = TimeRange {
        from_ms: 1_415_792_726_123,
        to_ms: 1_447_328_726_456,
        interval_ms: 60_000,
    };
    let cases = [
        (
            "select * from foo where $__timeFilter(cast(sth as timestamp) )",
            "select * from foo where cast(sth as timestamp) >= toDateTime(1415792726) AND cast(sth as timestamp) <= toDateTime(1447328726)",
        ),
        (
            "select * from foo where $__timeFilter_ms(cast(sth as timestamp))",
            "select * from foo where cast(sth as timestamp) >= fromUnixTimestamp64Milli(1415792726123) AND cast(sth as timestamp) <= fromUnixTimestamp64Milli(1447328726456)",
        ),
        (
            "select * from foo where ( date >= $__fromTime and date <= $__toTime ) limit 100",
            "select * from foo where ( date >= toDateTime(1415792726) and date <= toDateTime(1447328726) ) limit 100",
        ),
        (
            "select * from foo where ( date >= $__fromTime_ms ) and ( date <= $__toTime_ms ) limit 100",
            "select * from foo where ( date >= fromUnixTimestamp64Milli(1415792726123) ) and ( date <= fromUnixTimestamp64Milli(1447328726456) ) limit 100",
        ),
        (
            "SELECT $__timeInterval($__fromTime) AS from_time",
            "SELECT toStartOfInterval(toDateTime(toDateTime(1415792726)), INTERVAL 60 second) AS from_time",
        ),
        (
            "SELECT $__timeInterval_ms($__fromTime_ms)",
            "SELECT toStartOfInterval(toDateTime64(fromUnixTimestamp64Milli(1415792726123), 3), INTERVAL 60000 millisecond)",
        ),
        (
            "select * from foo where $__timeFilter(coalesce(closed_at, $__toTime))",
            "select * from foo where coalesce(closed_at, toDateTime(1447328726)) >= toDateTime(1415792726) AND coalesce(closed_at, toDateTime(1447328726)) <= toDateTime(1447328726)",
        ),
        (
            "WHERE $__dateFilter(d) AND x = 'a(b' GROUP BY n / $__interval_s",
            "WHERE d >= toDate('2014-11-12') AND d <= toDate('2015-11-12') AND x = 'a(b' GROUP BY n / 60",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(expand_macros(input, &r).as_deref(), Ok(want), "{input}");
    }
    // Intervals under a second are rounded up to one (second or millisecond).
    let tiny = TimeRange {
        interval_ms: 0,
        ..r
    };
    assert_eq!(expand_macros("$__interval_s", &tiny).as_deref(), Ok("1"));
    assert_eq!(
        expand_macros("$__timeInterval_ms(t)", &tiny).as_deref(),
        Ok("toStartOfInterval(toDateTime64(t, 3), INTERVAL 1 millisecond)")
    );
    for bad in [
        "$__timeFilter",
        "$__timeFilter(a, b)",
        "$__nope(ts)",
        "$__timeFilter(ts",
    ] {
        assert!(expand_macros(bad, &r).is_err(), "{bad}");
    }
}

#[test]
fn variables_interpolate_like_grafana_and_the_plugin() {
    let node = |current| var("node", current, &["node-1", "node-2"]);
    let workload = var("workload", Current::One("pod:ns/it's".into()), &[]);
    let cond = "WHERE $__conditionalAll(node IN (${node:singlequote}), $node) AND x";
    let cases = [
        (node(Current::All), cond, "WHERE 1=1 AND x"),
        (
            node(Current::Many(vec!["node-2".into()])),
            cond,
            "WHERE node IN ('node-2') AND x",
        ),
        (
            node(Current::One(String::new())),
            "$__conditionalAll(node = '$node', ${node})",
            "1=1",
        ),
        // `${node:singlequote}` is not a variable reference to $__conditionalAll.
        (
            node(Current::All),
            "$__conditionalAll(a,${node:singlequote})",
            "a",
        ),
        // All without a format: the plugin's '…','…'; with singlequote: Grafana's.
        (
            node(Current::All),
            "node IN ($node) OR node IN ([[node]]) OR node IN (${node:singlequote})",
            "node IN ('node-1','node-2') OR node IN ('node-1','node-2') OR node IN ('node-1','node-2')",
        ),
        (
            workload.clone(),
            "w = '$workload' OR w = ${workload:singlequote}",
            "w = 'pod:ns/it's' OR w = 'pod:ns/it\\'s'",
        ),
        // Not dashboard variables: left for the back end (or ClickHouse).
        (
            workload.clone(),
            "$__timeFilter_ms(ts) AND $workloads AND a[1] AND $ AND ${x}",
            "$__timeFilter_ms(ts) AND $workloads AND a[1] AND $ AND ${x}",
        ),
    ];
    for (v, input, want) in cases {
        let vars = [v];
        let got = conditional_all(input, &vars).and_then(|s| interpolate_variables(&s, &vars));
        assert_eq!(got.as_deref(), Ok(want), "{input}");
    }
    assert!(interpolate_variables("${workload:csv}", &[workload]).is_err());
}

// ---------------------------------------------------------------------------------------
// Grafana's dashboard schema.
//
// No Grafana server runs in the tests; the dashboards are held against Grafana's own schema
// instead: the `@grafana/schema` package's `Dashboard` type (the newest release and the
// oldest Grafana the dashboards support), every panel's options against its plugin's
// `Options`/`FieldConfig` types, checked by the TypeScript compiler
// (`dashboards/schema/check.mjs`, `dashboard-types.ts`; versions pinned in its
// package-lock.json, installed by `cargo xtask test` through `dashboards/schema/install.sh`).

/// Where `dashboards/schema/install.sh` put the packages (its default prefix).
fn schema_modules() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = Path::new(&home).join(".local/share/credwatch/tools/grafana-schema");
    assert!(
        dir.join("node_modules/@grafana/schema").is_dir(),
        "{} is not installed: run `cargo xtask test`, or `dashboards/schema/install.sh`",
        dir.display()
    );
    dir
}

/// `node check.mjs` on `files`: (success, stdout).
fn schema_check(files: &[PathBuf]) -> (bool, String) {
    let out = std::process::Command::new("node")
        .arg(dashboards_dir().join("schema/check.mjs"))
        .arg("--modules")
        .arg(schema_modules())
        .args(files)
        .output()
        .expect("running node (Debian: nodejs)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "check.mjs could not run: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

/// The `@grafana/schema` versions the check uses, from the lockfile.
fn schema_versions() -> Vec<String> {
    let lock: Value = serde_json::from_str(
        &std::fs::read_to_string(dashboards_dir().join("schema/package-lock.json")).unwrap(),
    )
    .unwrap();
    let mut versions: Vec<String> = lock["packages"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| {
            k.starts_with("node_modules/")
                && (*k == "node_modules/@grafana/schema" || v["name"] == "@grafana/schema")
        })
        .map(|(_, v)| v["version"].as_str().unwrap().to_owned())
        .collect();
    versions.sort();
    versions
}

#[test]
#[ignore = "needs Grafana's schema packages (cargo xtask test installs them)"]
fn dashboards_match_grafanas_schema() {
    let files: Vec<PathBuf> = EXPECTED.iter().map(|f| dashboards_dir().join(f)).collect();
    let (ok, out) = schema_check(&files);
    assert!(ok, "dashboards violate Grafana's dashboard schema:\n{out}");
    let versions = schema_versions();
    assert!(versions.len() >= 2, "{versions:?}");
    for f in &files {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("ok {}", f.display())))
            .unwrap_or_else(|| panic!("no verdict for {}:\n{out}", f.display()));
        for v in &versions {
            assert!(line.contains(v.as_str()), "{line}: not checked against {v}");
        }
    }
}

/// One violation of each kind, each in its own copy of a real dashboard: the check must
/// reject every copy and name the place (file, line, JSON path) of the violation.
#[test]
#[ignore = "needs Grafana's schema packages (cargo xtask test installs them)"]
fn schema_check_rejects_broken_dashboards() {
    type Break = fn(&mut Value);
    fn first<'a>(d: &'a mut Value, ty: &str) -> &'a mut Value {
        d["panels"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} panel"))
    }
    // (what, dashboard, break it, JSON path reported, the key or value on that line)
    let cases: &[(&str, &str, Break, &str, &str)] = &[
        (
            "unknown top-level key",
            "credwatch-overview.json",
            |d| d["refreshEvery"] = "1m".into(),
            "refreshEvery",
            "\"refreshEvery\"",
        ),
        (
            "stat option outside its enum",
            "credwatch-overview.json",
            |d| first(d, "stat")["options"]["colorMode"] = "neon".into(),
            "panels[0].options.colorMode",
            "\"neon\"",
        ),
        (
            "unknown table option",
            "credwatch-workload.json",
            |d| first(d, "table")["options"]["showHeaders"] = true.into(),
            "options.showHeaders",
            "\"showHeaders\"",
        ),
        (
            "time series custom field config typo",
            "credwatch-agent-health.json",
            |d| first(d, "timeseries")["fieldConfig"]["defaults"]["custom"]["lineWidht"] = 2.into(),
            "fieldConfig.defaults.custom.lineWidht",
            "\"lineWidht\"",
        ),
        (
            "panel plugin without a schema",
            "credwatch-credential.json",
            |d| first(d, "bargauge")["type"] = "fancy-gauge-panel".into(),
            ".type",
            "\"fancy-gauge-panel\"",
        ),
        (
            "query without refId",
            "credwatch-workload.json",
            |d| {
                first(d, "timeseries")["targets"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("refId");
            },
            ".targets[0]",
            "{",
        ),
        (
            "wrong type of a dashboard field",
            "credwatch-credential.json",
            |d| d["graphTooltip"] = "shared".into(),
            "graphTooltip",
            "\"shared\"",
        ),
        (
            "panel inside a collapsed row",
            "credwatch-overview.json",
            |d| {
                let row = first(d, "row");
                row["panels"][0]["options"]["cellHeigth"] = "sm".into();
            },
            ".panels[0].options.cellHeigth",
            "\"cellHeigth\"",
        ),
    ];
    let w = workdir();
    let mut files = Vec::new();
    for (i, (what, file, breaks, _, _)) in cases.iter().enumerate() {
        let mut d: Value =
            serde_json::from_str(&std::fs::read_to_string(dashboards_dir().join(file)).unwrap())
                .unwrap();
        breaks(&mut d);
        let path = w.path().join(format!("broken-{i}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&d).unwrap()).unwrap();
        files.push((path, *what));
    }
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let (ok, out) = schema_check(&paths);
    assert!(!ok, "broken dashboards passed:\n{out}");
    for ((path, what), (_, _, _, json_path, on_line)) in files.iter().zip(cases) {
        let text = std::fs::read_to_string(path).unwrap();
        let prefix = format!("{}:", path.display());
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert!(!errors.is_empty(), "{what}: not rejected:\n{out}");
        for v in schema_versions() {
            let hit = errors
                .iter()
                .find(|l| l.contains(&format!("[@grafana/schema {v}]")) && l.contains(json_path))
                .unwrap_or_else(|| panic!("{what}: no error at {json_path} for {v}:\n{out}"));
            // FILE:LINE:COL: points at the violation in the file.
            let line: usize = hit[prefix.len()..]
                .split(':')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no line in {hit}"));
            let at = text.lines().nth(line - 1).unwrap_or_default();
            assert!(
                at.contains(on_line),
                "{what}: line {line} is {at:?}, not the violation: {hit}"
            );
        }
    }
    // The real dashboards in the same run are still accepted: the failures are the breaks.
    let (ok, out) = schema_check(&[dashboards_dir().join("credwatch-overview.json")]);
    assert!(ok, "{out}");
}
