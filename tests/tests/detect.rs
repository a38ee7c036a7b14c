//! Detections, live: real probes, kubelet-style pods, the agent's alert stream on stdout.
//! (Per-detector near misses are unit tests in agent/src/detect; `replay_*` below runs
//! hand-built NDJSON through `credwatch replay`.)

use std::{net::TcpListener, os::unix::fs::PermissionsExt, path::Path, process::Command};

use credwatch::{
    alert::{Alert, AlertKind, AlertStatus, Severity},
    event::CredentialType,
};
use credwatch_tests::{
    Actor, Agent, CID_A, CID_B, PodVolume, UID_A, UID_B, credwatch, fake_sa_token, fixture,
    kubelet_fixture_port, ok, parse_alerts, pod_cgroup, window_excluding_now, workdir,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");

fn actor() -> Actor {
    Actor::new(ACTOR)
}

fn config(kubelet: &Path) -> String {
    let port = kubelet_fixture_port();
    format!(
        "[secrets]\ncatalog = true\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{port}\"\nkubelet_root = \"{}\"\n[fingerprint]\nkey = \"test-key\"\n",
        kubelet.display()
    )
}

fn of_kind(alerts: &[Alert], kind: AlertKind) -> Vec<&Alert> {
    alerts.iter().filter(|a| a.alert == kind).collect()
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn two_pods_with_copies_of_one_token_raise_one_growing_token_reuse() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    // The same token value in two pods' volumes (a copied credential).
    let token = fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 7);
    let va = PodVolume::create(&kubelet, UID_A, "kube-api-access-a", &token);
    let vb = PodVolume::create(&kubelet, UID_B, "kube-api-access-b", &token);
    let (ca, cb) = (pod_cgroup(UID_A, CID_A), pod_cgroup(UID_B, CID_B));
    let ta = va.dir.join("token");
    let tb = vb.dir.join("token");

    let agent = Agent::start(&config(&kubelet));
    for _ in 0..2 {
        actor().join_cgroup(&ca).open(&ta).run();
        actor().join_cgroup(&cb).open(&tb).run();
    }
    let s = agent.stop();
    let all = &s.alerts;
    let reuse = of_kind(all, AlertKind::TokenReuse);
    let new: Vec<_> = reuse
        .iter()
        .filter(|a| a.status == AlertStatus::New)
        .collect();
    assert_eq!(new.len(), 1, "exactly one new token_reuse: {reuse:#?}");
    assert!(reuse.iter().all(|a| a.dedup_key == new[0].dedup_key));
    let last = reuse.last().unwrap();
    assert!(
        last.count >= 3,
        "count grows with each further use: {last:#?}"
    );
    let summary = &new[0].summary;
    assert!(
        summary.contains("pod:payments/api-7f9c") && summary.contains("pod:billing/worker-2"),
        "{summary}"
    );
    assert_eq!(
        new[0].credential.as_ref().unwrap().kind,
        CredentialType::K8sSaToken
    );
    assert!(
        of_kind(all, AlertKind::OwnerMismatch).is_empty(),
        "each pod read its own copy: {all:#?}"
    );
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn pod_reading_another_pods_token_is_owner_mismatch() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let _va = PodVolume::create(
        &kubelet,
        UID_A,
        "kube-api-access-a",
        &fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 1),
    );
    let vb = PodVolume::create(
        &kubelet,
        UID_B,
        "kube-api-access-b",
        &fake_sa_token("billing", "billing-worker", "worker-2", UID_B, 2),
    );
    let ca = pod_cgroup(UID_A, CID_A);

    let agent = Agent::start(&config(&kubelet));
    let pid = actor().join_cgroup(&ca).open(vb.dir.join("token")).pid();
    let s = agent.stop();
    let all = &s.alerts;
    let m = of_kind(all, AlertKind::OwnerMismatch);
    assert_eq!(m.len(), 1, "{all:#?}");
    let a = m[0];
    assert_eq!(a.workload.id, "pod:payments/api-7f9c");
    let owner = a.credential.as_ref().unwrap().owner.as_ref().unwrap();
    assert_eq!(owner.id, "pod:billing/worker-2");
    assert_eq!(a.severity, Severity::High);
    assert_eq!(a.evidence[0].pid, pid);
    assert!(
        a.summary.contains("pod:payments/api-7f9c") && a.summary.contains("pod:billing/worker-2"),
        "{}",
        a.summary
    );
    assert!(of_kind(all, AlertKind::TokenReuse).is_empty());
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn token_read_through_a_pseudo_terminal_is_human_use() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let va = PodVolume::create(
        &kubelet,
        UID_A,
        "kube-api-access-a",
        &fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 3),
    );
    let token = va.dir.join("token");

    let agent = Agent::start(&config(&kubelet));
    // `script` gives the command a pseudo-terminal, as an interactive session would.
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("cat {} > /dev/null", token.display()),
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = agent.stop();
    let all = &s.alerts;
    let h = of_kind(all, AlertKind::HumanUse);
    assert_eq!(h.len(), 1, "{all:#?}");
    assert_eq!(h[0].evidence[0].comm, "cat");
    assert!(
        h[0].evidence[0]
            .tty
            .as_deref()
            .is_some_and(|t| t.starts_with("pts/")),
        "{:#?}",
        h[0]
    );
    assert_eq!(
        h[0].credential.as_ref().unwrap().kind,
        CredentialType::K8sSaToken
    );
}

/// Hand-built NDJSON through `credwatch replay`: the alerts come out on stdout, and the
/// near misses in the same stream stay silent.
#[test]
#[ignore = "needs the agent binary (cargo xtask test builds it)"]
fn replay_of_hand_built_events_fires_exactly_the_expected_alerts() {
    let out = credwatch(&["replay", &fixture("replay-detections.ndjson")]);
    let all = parse_alerts(&ok(&out));
    let kinds: Vec<(AlertKind, &str)> = all
        .iter()
        .map(|a| (a.alert, a.workload.id.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (AlertKind::TokenReuse, "pod:billing/worker-2"),
            (AlertKind::OwnerMismatch, "pod:billing/worker-2"),
            (AlertKind::OwnerMismatch, "host:1000:/usr/bin/cat"),
            (AlertKind::HumanUse, "host:1000:/usr/bin/cat"),
        ],
        "{all:#?}"
    );
}

/// `credwatch replay` with the baseline fixtures' policy; (alert, workload, dedup key) per
/// alert line.
fn replay_baselines(files: &[&str], state_dir: Option<&Path>) -> Vec<(String, String, String)> {
    let cfg = fixture("replay-baselines.toml");
    let mut args = vec!["replay".to_owned(), "--config".into(), cfg];
    if let Some(d) = state_dir {
        args.extend(["--state-dir".into(), d.display().to_string()]);
    }
    args.extend(files.iter().map(|f| fixture(f)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    parse_alerts(&ok(&credwatch(&args)))
        .into_iter()
        .map(|a| {
            (
                a.alert.as_str().to_owned(),
                a.workload.id.to_string(),
                a.dedup_key,
            )
        })
        .collect()
}

const FP: &str = "hmac-sha256:";

fn fp(c: char) -> String {
    format!("{FP}{}", c.to_string().repeat(64))
}

/// Learned on day 0 (1 day learning), judged two days and five weeks later: every
/// baseline detector fires once, the near misses in the same stream (known destination,
/// known executable, learned privilege gain, use inside the cron schedule by its owner, an
/// allowed destination, an allowlisted finding, a credential read again after two days)
/// stay silent.
#[test]
#[ignore = "needs the agent binary (cargo xtask test builds it)"]
fn replay_learns_baselines_then_flags_what_is_new() {
    let (api, unit) = ("pod:payments/api-7f9c", "unit:backup.service");
    let spiffe = "spiffe://cluster.local/ns/payments/sa/api";
    let pe = "privilege_expansion";
    let expected: Vec<(String, String, String)> = [
        (
            "off_schedule",
            api,
            format!("off_schedule|learned|{api}|{}|27", fp('a')),
        ),
        (
            "off_schedule",
            unit,
            format!("off_schedule|{unit}|{}", fp('c')),
        ),
        (
            pe,
            unit,
            format!(
                "{pe}|policy_destination|{unit}|{}|192.0.2.7:443/tcp",
                fp('e')
            ),
        ),
        (
            pe,
            api,
            format!("{pe}|new_destination|{api}|{}|10.0.0.9:6379/tcp", fp('a')),
        ),
        (pe, api, format!("{pe}|new_secret|{api}|{}", fp('b'))),
        (
            pe,
            api,
            format!("{pe}|new_executable|{api}|{}|/usr/bin/curl", fp('a')),
        ),
        (pe, api, format!("{pe}|priv_gain|{api}|/tmp/helper")),
        (
            "owner_mismatch",
            api,
            format!("owner_mismatch|{api}|{}", fp('c')),
        ),
        (
            "off_schedule",
            api,
            format!("off_schedule|{api}|{}", fp('c')),
        ),
        (pe, api, format!("{pe}|new_secret|{api}|{}", fp('c'))),
        (
            "dormant_credential",
            api,
            format!("dormant_credential|{}|1793527500000000000", fp('d')),
        ),
    ]
    .into_iter()
    .map(|(a, w, k)| (a.to_owned(), w.to_owned(), k))
    .collect();
    let files = [
        "replay-baselines-day0.ndjson",
        "replay-baselines-later.ndjson",
    ];
    let got = replay_baselines(&files, None);
    assert_eq!(got, expected, "subject of the api pod is {spiffe}");

    // Restart: learn in one run, judge in the next, through the state dir's store.
    let state = workdir();
    assert!(
        replay_baselines(&files[..1], Some(state.path())).is_empty(),
        "day 0 only learns"
    );
    assert_eq!(
        replay_baselines(&files[1..], Some(state.path())),
        expected,
        "the second run judges against what the first one learned"
    );
    // Without the store the later events alone find what policy says, and, five weeks on,
    // a credential the api pod did not read in its (new) learning day.
    let policy_only: Vec<_> = replay_baselines(&files[1..], None)
        .into_iter()
        .map(|(a, _, k)| (a, k))
        .collect();
    assert_eq!(
        policy_only,
        [
            (
                "off_schedule".to_owned(),
                format!("off_schedule|{unit}|{}", fp('c'))
            ),
            (
                pe.to_owned(),
                format!(
                    "{pe}|policy_destination|{unit}|{}|192.0.2.7:443/tcp",
                    fp('e')
                )
            ),
            (
                "owner_mismatch".to_owned(),
                format!("owner_mismatch|{api}|{}", fp('c'))
            ),
            (
                "off_schedule".to_owned(),
                format!("off_schedule|{api}|{}", fp('c'))
            ),
            (pe.to_owned(), format!("{pe}|new_secret|{api}|{}", fp('d'))),
        ]
    );
}

#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn use_outside_a_declared_schedule_is_off_schedule() {
    let w = workdir();
    let (night, always) = (w.path().join("backup-key"), w.path().join("service-key"));
    std::fs::write(&night, "fake-backup-credential").unwrap();
    std::fs::write(&always, "fake-service-credential").unwrap();
    // The first schedule excludes the present; 00:00-24:00 includes it.
    let cfg = format!(
        "[secrets]\ncatalog = false\npaths = [\"{n}\", \"{a}\"]\n\n\
         [[credential]]\npath = \"{n}\"\npurpose = \"nightly backup\"\nschedule = [\"{window}\"]\ntimezone = \"UTC\"\n\n\
         [[credential]]\npath = \"{a}\"\nschedule = [\"daily 00:00-24:00\"]\n",
        n = night.display(),
        a = always.display(),
        window = window_excluding_now(),
    );
    let agent = Agent::start(&cfg);
    let pid = actor().open(&night).open(&always).pid();
    let s = agent.stop();
    let all = &s.alerts;
    let off = of_kind(all, AlertKind::OffSchedule);
    assert_eq!(off.len(), 1, "{all:#?}");
    assert_eq!(off[0].evidence[0].pid, pid);
    assert_eq!(
        off[0].evidence[0].secret_path.as_deref(),
        Some(night.to_str().unwrap())
    );
    assert!(off[0].summary.contains("nightly backup"), "{:#?}", off[0]);
}

/// A pod learns for a few seconds (token read, connect to port A), the agent restarts on the
/// same state dir, then the pod reaches port B with the token and runs a set-uid-root helper
/// as uid 1000: two privilege_expansion alerts, none for port A (learned before the restart).
#[test]
#[ignore = "privileged: real probes (cargo xtask test runs it as root)"]
fn after_learning_a_new_port_and_a_setuid_helper_are_privilege_expansion() {
    let w = workdir();
    let kubelet = w.path().join("kubelet");
    let va = PodVolume::create(
        &kubelet,
        UID_A,
        "kube-api-access-pe",
        &fake_sa_token("payments", "payments-api", "api-7f9c", UID_A, 41),
    );
    let ca = pod_cgroup(UID_A, CID_A);
    let suid = w.path().join("helper-suid");
    std::fs::copy(ACTOR, &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (pa, pb) = (
        la.local_addr().unwrap().port(),
        lb.local_addr().unwrap().port(),
    );
    let token = va.dir.join("token");
    let use_token = |ports: &[u16]| {
        ports
            .iter()
            .fold(actor().join_cgroup(&ca).open(&token), |a, p| {
                a.connect("tcp", format!("127.0.0.1:{p}"))
            })
            .pid()
    };
    let cfg = format!("{}[detect]\nlearning_period = \"4s\"\n", config(&kubelet));
    let state = w.path().join("state");

    let agent = Agent::start_with_state(&cfg, &state);
    let learner = use_token(&[pa]);
    std::thread::sleep(std::time::Duration::from_secs(5));
    let first = agent.stop();
    let learned_use = first
        .uses(Some(learner))
        .into_iter()
        .any(|(_, u)| u.dst.port == pa);
    assert!(learned_use, "the learning phase saw the use of port {pa}");
    assert!(state.join("baselines.redb").exists());

    let agent = Agent::start_with_state(&cfg, &state);
    let user = use_token(&[pa, pb]);
    let (helper, out) = actor()
        .join_cgroup(&ca)
        .exec_as(1000, Actor::new(&suid).ids())
        .run();
    assert_eq!(
        out.trim(),
        "uid=1000 euid=0",
        "the helper must really be set-uid"
    );
    let s = agent.stop();
    let all = &s.alerts;
    let mine: Vec<&Alert> = of_kind(all, AlertKind::PrivilegeExpansion)
        .into_iter()
        .filter(|a| [user, helper].contains(&a.evidence[0].pid))
        .collect();
    assert_eq!(mine.len(), 2, "{all:#?}");
    let to_b = mine.iter().find(|a| a.evidence[0].pid == user).unwrap();
    assert_eq!(to_b.workload.id, "pod:payments/api-7f9c");
    assert_eq!(to_b.evidence[0].dst.as_ref().map(|d| d.port), Some(pb));
    assert!(
        to_b.summary.contains(&format!("127.0.0.1:{pb}/tcp")),
        "{to_b:#?}"
    );
    let gain = mine.iter().find(|a| a.evidence[0].pid == helper).unwrap();
    assert_eq!(gain.evidence[0].exe, suid.to_str().unwrap());
    assert!(gain.summary.contains("euid 1000 → 0"), "{gain:#?}");
}
