//! Credentials handed to a process at exec: in its environment (recognized by variable name
//! and by value shape) and on its command line. Each is fingerprinted with the fleet key the
//! moment it is found; the raw bytes never leave this module (the caller's buffer is wiped
//! once these functions return), and the command line comes back with the values replaced.

use crate::{
    credential::{CredentialType, Fingerprinter, Labels, jwt_claims, jwt_kind},
    event::ExposedCredential,
};

/// Variable names that hold a secret whatever its shape (upper-cased comparison).
const SECRET_NAMES: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "VAULT_TOKEN",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GITLAB_TOKEN",
    "CI_JOB_TOKEN",
    "NPM_TOKEN",
    "PGPASSWORD",
    "MYSQL_PWD",
    "REDIS_PASSWORD",
    "DOCKER_PASSWORD",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_API_KEY",
];

/// Suffixes of variable names that hold a secret (`STRIPE_API_KEY`, `DB_PASSWORD`).
const SECRET_SUFFIXES: &[(&str, CredentialType)] = &[
    ("_TOKEN", CredentialType::GenericSecret),
    ("_PASSWORD", CredentialType::Password),
    ("_PASSWD", CredentialType::Password),
    ("_PWD", CredentialType::Password),
    ("_SECRET", CredentialType::GenericSecret),
    ("_SECRET_KEY", CredentialType::GenericSecret),
    ("_API_KEY", CredentialType::ApiKey),
    ("_APIKEY", CredentialType::ApiKey),
    ("_ACCESS_KEY", CredentialType::GenericSecret),
    ("_PRIVATE_KEY", CredentialType::TlsPrivateKey),
    ("_CLIENT_SECRET", CredentialType::GenericSecret),
];

/// Names that end like a secret but hold where one is (a path, a file, a flag).
const NOT_SECRET_SUFFIXES: &[&str] = &[
    "_FILE",
    "_PATH",
    "_DIR",
    "_URL_FILE",
    "_ENABLED",
    "_EXPIRY",
    "_TTL",
    "_LENGTH",
    "_TYPE",
];

/// Values this short are flags and placeholders (`true`, `1`, `xxx`), not secrets.
const MIN_VALUE_LEN: usize = 6;

/// What kind of credential a value is by its shape alone, with non-secret labels.
fn by_shape(value: &str, labels: &mut Labels) -> Option<CredentialType> {
    let v = value.trim();
    let alnum = |s: &str, n: usize| {
        s.len() >= n && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    for p in ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"] {
        if let Some(rest) = v.strip_prefix(p)
            && alnum(rest, 30)
        {
            return Some(CredentialType::GithubToken);
        }
    }
    if let Some(rest) = v.strip_prefix("github_pat_")
        && alnum(rest, 30)
    {
        return Some(CredentialType::GithubToken);
    }
    if let Some(rest) = v.strip_prefix("glpat-")
        && rest.len() >= 20
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Some(CredentialType::GitlabToken);
    }
    if v.len() > 10
        && v.starts_with("xox")
        && matches!(v.as_bytes()[3], b'a' | b'b' | b'p' | b'r' | b's')
        && v.as_bytes()[4] == b'-'
    {
        return Some(CredentialType::SlackToken);
    }
    if v.contains("-----BEGIN") && v.contains("PRIVATE KEY-----") {
        return Some(if v.contains("OPENSSH") {
            CredentialType::SshPrivateKey
        } else {
            CredentialType::TlsPrivateKey
        });
    }
    if let Some(claims) = jwt_claims(v) {
        return Some(jwt_kind(&claims, labels));
    }
    if url_with_password(v, labels).is_some() {
        return Some(CredentialType::UrlPassword);
    }
    None
}

/// `scheme://user:pass@host…`: the password (the material), labels without it.
fn url_with_password<'a>(v: &'a str, labels: &mut Labels) -> Option<&'a str> {
    let (scheme, rest) = v.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, host) = authority.rsplit_once('@')?;
    let (user, pass) = userinfo.split_once(':')?;
    if pass.is_empty() {
        return None;
    }
    labels.insert("scheme".into(), scheme.to_owned());
    labels.insert("user".into(), user.to_owned());
    labels.insert("host".into(), host.to_owned());
    Some(pass)
}

fn name_kind(name: &str) -> Option<CredentialType> {
    let upper = name.to_ascii_uppercase();
    if NOT_SECRET_SUFFIXES.iter().any(|s| upper.ends_with(s)) {
        return None;
    }
    if SECRET_NAMES.contains(&upper.as_str()) {
        return Some(match upper.as_str() {
            "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN" => CredentialType::AwsAccessKey,
            "VAULT_TOKEN" => CredentialType::VaultToken,
            "GITHUB_TOKEN" | "GH_TOKEN" => CredentialType::GithubToken,
            "GITLAB_TOKEN" | "CI_JOB_TOKEN" => CredentialType::GitlabToken,
            "NPM_TOKEN" => CredentialType::NpmToken,
            "PGPASSWORD" | "MYSQL_PWD" | "REDIS_PASSWORD" | "DOCKER_PASSWORD" => {
                CredentialType::Password
            }
            _ => CredentialType::GenericSecret,
        });
    }
    SECRET_SUFFIXES
        .iter()
        .find(|(s, _)| upper.ends_with(s))
        .map(|(_, k)| k.clone())
}

/// The credential in one `NAME=value`, if any: what it is, and the bytes it is named by
/// (the material: a URL's password, not the whole URL).
fn classify<'a>(name: &str, value: &'a str) -> Option<(CredentialType, &'a str, Labels)> {
    let mut labels = Labels::new();
    let v = value.trim();
    if v.len() < MIN_VALUE_LEN {
        return None;
    }
    if let Some(kind) = by_shape(v, &mut labels) {
        let material = match kind {
            CredentialType::UrlPassword => url_with_password(v, &mut Labels::new()).unwrap_or(v),
            _ => v,
        };
        return Some((kind, material, labels));
    }
    name_kind(name).map(|k| (k, v, labels))
}

/// The credentials in an environment block (`NAME=value` NUL-separated, as the kernel
/// keeps it). `truncated`: the block was cut, so its last variable may be partial (it is
/// still fingerprinted, and labelled so).
pub fn scan_environment(env: &[u8], fp: &Fingerprinter, truncated: bool) -> Vec<ExposedCredential> {
    let mut out = Vec::new();
    let vars: Vec<&[u8]> = env.split(|&b| b == 0).filter(|v| !v.is_empty()).collect();
    let last = vars.len().saturating_sub(1);
    // AWS_ACCESS_KEY_ID names the key; it labels the secret key, it is not one.
    let access_key_id = vars
        .iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| v.strip_prefix("AWS_ACCESS_KEY_ID="))
        .filter(|id| id.len() == 20 && (id.starts_with("AKIA") || id.starts_with("ASIA")));
    for (i, var) in vars.iter().enumerate() {
        let Ok(text) = std::str::from_utf8(var) else {
            continue;
        };
        let Some((name, value)) = text.split_once('=') else {
            continue;
        };
        let Some((kind, material, mut labels)) = classify(name, value) else {
            continue;
        };
        if kind == CredentialType::AwsAccessKey
            && let Some(id) = access_key_id
        {
            labels.insert("access_key_id".into(), id.to_owned());
        }
        if truncated && i == last {
            labels.insert("truncated".into(), "true".into());
        }
        out.push(ExposedCredential {
            source: "env".into(),
            name: crate::event::sanitize(name.as_bytes()),
            kind,
            fingerprint: fp.fingerprint(material.as_bytes()),
            labels,
        });
    }
    out
}

/// Options whose value (the next argument, or after `=`) is a secret.
const SECRET_OPTIONS: &[&str] = &[
    "--password",
    "--passwd",
    "--token",
    "--access-token",
    "--auth-token",
    "--api-key",
    "--apikey",
    "--secret",
    "--client-secret",
    "--private-key",
    "--bearer",
];

/// A command line (NUL-separated arguments) with every credential on it replaced by
/// `<fingerprint>`, and the credentials found: `-p<pw>` (mysql), `--password=…`,
/// `--token …`, `-u user:pass` (curl), `Authorization: Bearer …`, `scheme://user:pass@`,
/// `NAME=value` assignments naming a secret (`env AWS_SECRET_ACCESS_KEY=… prog`), values
/// shaped like tokens or keys anywhere, and all of these inside a shell line handed over
/// as one argument (`sh -c '…'`).
pub fn redact_command_line(
    argv: &[u8],
    fp: &Fingerprinter,
) -> (Vec<String>, Vec<ExposedCredential>) {
    let args: Vec<&str> = argv
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::str::from_utf8(a).unwrap_or("\u{fffd}"))
        .collect();
    let mut r = Redactor {
        fp,
        found: Vec::new(),
    };
    let mysql = args.first().is_some_and(|a| is_mysql_like(a));
    let out = r.words(&args, mysql, true);
    (out, r.found)
}

struct Redactor<'f> {
    fp: &'f Fingerprinter,
    found: Vec<ExposedCredential>,
}

impl Redactor<'_> {
    fn hide(&mut self, name: &str, kind: CredentialType, material: &str, labels: Labels) -> String {
        let f = self.fp.fingerprint(material.as_bytes());
        let shown = format!("<{}>", crate::detect::short_fp(&f));
        self.found.push(ExposedCredential {
            source: "argv".into(),
            name: crate::event::sanitize(name.as_bytes()),
            kind,
            fingerprint: f,
            labels,
        });
        shown
    }

    /// The arguments of one command (`top`), or the words of a shell line inside one.
    fn words(&mut self, words: &[&str], mysql: bool, top: bool) -> Vec<String> {
        let mut out = Vec::with_capacity(words.len());
        let mut secret_next: Option<(String, CredentialType)> = None;
        for (i, w) in words.iter().enumerate() {
            if let Some((opt, kind)) = secret_next.take() {
                out.push(self.hide(&opt, kind, w, Labels::new()));
                continue;
            }
            if SECRET_OPTIONS.contains(w) {
                secret_next = Some((w.to_string(), option_kind(w)));
                out.push(w.to_string());
                continue;
            }
            // curl -u user:pass / --user user:pass
            if (*w == "-u" || *w == "--user") && words.get(i + 1).is_some_and(|n| n.contains(':')) {
                secret_next = Some((w.to_string(), CredentialType::Password));
                out.push(w.to_string());
                continue;
            }
            // mysql -psecret (not -p alone, which prompts)
            if let Some(pw) = w.strip_prefix("-p")
                && pw.len() >= MIN_VALUE_LEN
                && i > 0
                && mysql
            {
                let shown = self.hide("-p", CredentialType::Password, pw, Labels::new());
                out.push(format!("-p{shown}"));
                continue;
            }
            // -H 'Authorization: Bearer x': the header's value as one argument…
            if top && let Some(token) = bearer(w) {
                let mut labels = Labels::new();
                let kind = by_shape(token, &mut labels).unwrap_or(CredentialType::GenericSecret);
                let shown = self.hide("authorization", kind, token, labels);
                let keep = &w[..w.len() - token.len()];
                out.push(format!("{keep}{shown}"));
                continue;
            }
            // …or across the words of a shell line.
            if !top
                && i > 0
                && ["bearer", "basic", "token"]
                    .iter()
                    .any(|s| w.eq_ignore_ascii_case(s))
                && words[i - 1]
                    .to_ascii_lowercase()
                    .ends_with("authorization:")
            {
                secret_next = Some(("authorization".into(), CredentialType::GenericSecret));
                out.push(w.to_string());
                continue;
            }
            if top && w.contains(|c: char| c.is_ascii_whitespace()) {
                out.push(self.shell_line(w));
                continue;
            }
            out.push(self.word(w));
        }
        out
    }

    /// One word on its own: `--password=x`, a `NAME=value` naming a secret, a URL with a
    /// password, a value shaped like a token or key.
    fn word(&mut self, w: &str) -> String {
        if let Some((name, value)) = w.split_once('=')
            && !value.is_empty()
        {
            if SECRET_OPTIONS.contains(&name) {
                let shown = self.hide(name, option_kind(name), value, Labels::new());
                return format!("{name}={shown}");
            }
            let inner = value.trim_matches(['"', '\'']);
            if is_variable_name(name)
                && let Some((kind, material, labels)) = classify(name, inner)
            {
                let shown = self.hide(name, kind, material, labels);
                return crate::event::sanitize(
                    format!("{name}={}", value.replacen(material, &shown, 1)).as_bytes(),
                );
            }
        }
        let mut labels = Labels::new();
        if let Some(pass) = url_with_password(w, &mut labels) {
            let shown = self.hide("url", CredentialType::UrlPassword, pass, labels);
            return crate::event::sanitize(
                w.replacen(&format!(":{pass}@"), &format!(":{shown}@"), 1)
                    .as_bytes(),
            );
        }
        let mut labels = Labels::new();
        if w.len() >= MIN_VALUE_LEN
            && let Some(kind) = by_shape(w, &mut labels)
        {
            return self.hide("argument", kind, w, labels);
        }
        crate::event::sanitize(w.as_bytes())
    }

    /// A shell line given as one argument (`sh -c '…'`, `bash -lc …`): each word as above
    /// (quotes and separators around it kept), the line otherwise as it was.
    fn shell_line(&mut self, line: &str) -> String {
        const AROUND: &[char] = &['\'', '"', '`', ';', '&', '|', '(', ')', '{', '}', '<', '>'];
        let mut spans = Vec::new();
        let mut start = None;
        for (i, c) in line
            .char_indices()
            .chain(std::iter::once((line.len(), ' ')))
        {
            match (c.is_ascii_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    let token = &line[s..i];
                    let core = token.trim_start_matches(AROUND);
                    let lead = token.len() - core.len();
                    let core = core.trim_end_matches(AROUND);
                    if !core.is_empty() {
                        spans.push((s + lead, s + lead + core.len()));
                    }
                    start = None;
                }
                _ => {}
            }
        }
        let cores: Vec<&str> = spans.iter().map(|&(s, e)| &line[s..e]).collect();
        let mysql = cores.iter().any(|w| is_mysql_like(w));
        let replaced = self.words(&cores, mysql, false);
        let mut out = String::with_capacity(line.len());
        let mut at = 0;
        for ((s, e), r) in spans.iter().zip(replaced) {
            out.push_str(&crate::event::sanitize(&line.as_bytes()[at..*s]));
            out.push_str(&r);
            at = *e;
        }
        out.push_str(&crate::event::sanitize(&line.as_bytes()[at..]));
        out
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: an environment assignment's name, not an option or a URL.
fn is_variable_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn option_kind(opt: &str) -> CredentialType {
    match opt {
        "--password" | "--passwd" => CredentialType::Password,
        "--api-key" | "--apikey" => CredentialType::ApiKey,
        "--private-key" => CredentialType::TlsPrivateKey,
        _ => CredentialType::GenericSecret,
    }
}

/// Clients whose `-p<password>` is a password (not a port or a path).
fn is_mysql_like(argv0: &str) -> bool {
    let name = argv0.rsplit('/').next().unwrap_or(argv0);
    matches!(
        name,
        "mysql" | "mysqldump" | "mysqladmin" | "mariadb" | "mariadb-dump" | "mycli"
    )
}

/// The token of an `Authorization: Bearer <token>` / `Basic <b64>` header argument.
fn bearer(arg: &str) -> Option<&str> {
    let (name, value) = arg.split_once(':')?;
    if !name.trim().eq_ignore_ascii_case("authorization") {
        return None;
    }
    let value = value.trim();
    let (_scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (token.len() >= MIN_VALUE_LEN).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprinter {
        Fingerprinter::new(b"test-fleet-key-0000000000000000000")
    }

    fn env(vars: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in vars {
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b
    }

    #[test]
    fn environment_credentials_by_name_and_shape() {
        let secret = "fakeSecretKeyDoNotUse+EXAMPLE/0000000000";
        let e = env(&[
            "PATH=/usr/bin",
            "AWS_ACCESS_KEY_ID=AKIAFAKEEXAMPLE00001",
            &format!("AWS_SECRET_ACCESS_KEY={secret}"),
            "DATABASE_URL=postgres://app:FAKE-db-pass@db.internal:5432/app",
            "HOME=/root",
            "SOME_TOKEN_FILE=/var/run/token",
            "DEBUG_TOKEN=1",
            "STRIPE_API_KEY=sk_test_FAKEFAKEFAKE",
            "X=ghp_FAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKE",
        ]);
        let found = scan_environment(&e, &fp(), false);
        let names: Vec<(&str, &CredentialType)> =
            found.iter().map(|c| (c.name.as_str(), &c.kind)).collect();
        assert_eq!(
            names,
            [
                ("AWS_SECRET_ACCESS_KEY", &CredentialType::AwsAccessKey),
                ("DATABASE_URL", &CredentialType::UrlPassword),
                ("STRIPE_API_KEY", &CredentialType::ApiKey),
                ("X", &CredentialType::GithubToken),
            ]
        );
        // The same value as the file holds has the same fingerprint: the material.
        assert_eq!(found[0].fingerprint, fp().fingerprint(secret.as_bytes()));
        assert_eq!(found[0].labels["access_key_id"], "AKIAFAKEEXAMPLE00001");
        assert_eq!(found[1].fingerprint, fp().fingerprint(b"FAKE-db-pass"));
        assert_eq!(found[1].labels["host"], "db.internal:5432");
        let all = format!("{found:?}");
        for v in [secret, "FAKE-db-pass", "sk_test_FAKE", "ghp_FAKE"] {
            assert!(!all.contains(v), "{v} leaked: {all}");
        }
    }

    #[test]
    fn command_line_credentials_are_replaced_by_fingerprints() {
        let a = env(&[
            "mysql",
            "-uroot",
            "-pFAKEPASSWORD1",
            "--token",
            "FAKE-TOKEN-VALUE",
            "--password=FAKE-PW-2",
            "https://bob:FAKE-PW-3@git.example/x.git",
            "Authorization: Bearer FAKE-BEARER-TOKEN",
            "plain",
        ]);
        let (args, found) = redact_command_line(&a, &fp());
        let line = args.join(" ");
        for v in [
            "FAKEPASSWORD1",
            "FAKE-TOKEN-VALUE",
            "FAKE-PW-2",
            "FAKE-PW-3",
            "FAKE-BEARER",
        ] {
            assert!(!line.contains(v), "{v} in {line}");
        }
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(line.starts_with("mysql -uroot -p<"), "{line}");
        assert!(line.contains("https://bob:<"), "{line}");
        assert!(line.ends_with(" plain"), "{line}");
        let (args, found) =
            redact_command_line(&env(&["curl", "-u", "alice:FAKE-PW-4", "https://x"]), &fp());
        assert_eq!(found.len(), 1);
        assert!(!args.join(" ").contains("FAKE-PW-4"));
        // Near misses: -p on other tools, short values, flags.
        let (args, found) = redact_command_line(&env(&["ssh", "-p2222", "--token", "x"]), &fp());
        assert_eq!(args[..3], ["ssh", "-p2222", "--token"]);
        assert!(
            args[3].starts_with('<'),
            "the value after --token is always hidden"
        );
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn assignments_and_shell_lines_are_redacted() {
        let key = "fakeSecretKeyDoNotUse+EXAMPLE/0000000000";
        let (args, found) = redact_command_line(
            &env(&[
                "env",
                &format!("AWS_SECRET_ACCESS_KEY={key}"),
                "PATH=/bin",
                "app",
            ]),
            &fp(),
        );
        assert_eq!(args[0], "env");
        assert!(args[1].starts_with("AWS_SECRET_ACCESS_KEY=<"), "{args:?}");
        assert_eq!(args[2..], ["PATH=/bin", "app"]);
        assert_eq!(found[0].fingerprint, fp().fingerprint(key.as_bytes()));
        let script = format!(
            "export GITHUB_TOKEN='FAKE-gh-token-1'\nAWS_SECRET_ACCESS_KEY={key} aws s3 ls; \
             curl -H \"Authorization: Bearer FAKE-bearer-2\" -u bob:FAKE-pw-3 https://x && \
             mysql -pFAKE-pw-4 db"
        );
        let (args, found) = redact_command_line(&env(&["bash", "-c", &script]), &fp());
        let line = args.join(" ");
        for v in [
            key,
            "FAKE-gh-token-1",
            "FAKE-bearer-2",
            "FAKE-pw-3",
            "FAKE-pw-4",
        ] {
            assert!(!line.contains(v), "{v} in {line}");
        }
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(line.contains("export GITHUB_TOKEN='<"), "{line}");
        assert!(line.contains("\\n"), "newlines stay escaped: {line}");
        assert!(line.contains(" aws s3 ls; "), "{line}");
        // An ordinary script is left as it was.
        let (args, found) = redact_command_line(&env(&["sh", "-c", "echo hi > /tmp/x"]), &fp());
        assert_eq!(args[2], "echo hi > /tmp/x");
        assert!(found.is_empty());
    }
}
