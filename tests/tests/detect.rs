//! Detections, live: real probes, kubelet-style pods, the agent's alert stream on stdout.
//! (Per-detector near misses are unit tests in agent/src/detect; `replay_*` below runs
//! hand-built NDJSON through `credwatch replay`.)

use std::{net::TcpListener, os::unix::fs::PermissionsExt, path::Path, process::Command};

use credwatch_tests::{
    Agent, CID_A, CID_B, PodVolume, UID_A, UID_B, actor, bpf_available, credwatch_bin,
    fake_sa_token, fixture, kubelet_fixture_port, pod_cgroup, window_excluding_now, workdir,
};
use serde_json::Value;

const ACTOR: &str = env!("CARGO_BIN_EXE_cw-actor");

fn config(kubelet: &Path) -> String {
    let port = kubelet_fixture_port();
    format!(
        "[secrets]\ncatalog = true\n[kubernetes]\nkubelet_url = \"http://127.0.0.1:{port}\"\nkubelet_root = \"{}\"\n[fingerprint]\nkey = \"test-key\"\n",
        kubelet.display()
    )
}

fn alerts(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("alert JSON"))
        .collect()
}

fn of_kind<'a>(alerts: &'a [Value], kind: &str) -> Vec<&'a Value> {
    alerts.iter().filter(|a| a["alert"] == kind).collect()
}

#[test]
fn two_pods_with_copies_of_one_token_raise_one_growing_token_reuse() {
    if !bpf_available("two_pods_with_copies_of_one_token_raise_one_growing_token_reuse") {
        return;
    }
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
        actor(
            ACTOR,
            &[
                "join-cgroup",
                ca.path.to_str().unwrap(),
                "+",
                "open",
                ta.to_str().unwrap(),
            ],
        );
        actor(
            ACTOR,
            &[
                "join-cgroup",
                cb.path.to_str().unwrap(),
                "+",
                "open",
                tb.to_str().unwrap(),
            ],
        );
    }
    let s = agent.stop();
    let all = alerts(&s.stdout);
    let reuse = of_kind(&all, "token_reuse");
    let new: Vec<_> = reuse.iter().filter(|a| a["status"] == "new").collect();
    assert_eq!(new.len(), 1, "exactly one new token_reuse: {reuse:#?}");
    assert!(reuse.iter().all(|a| a["dedup_key"] == new[0]["dedup_key"]));
    let last = reuse.last().unwrap();
    assert!(
        last["count"].as_u64().unwrap() >= 3,
        "count grows with each further use: {last:#}"
    );
    let summary = new[0]["summary"].as_str().unwrap();
    assert!(
        summary.contains("pod:payments/api-7f9c") && summary.contains("pod:billing/worker-2"),
        "{summary}"
    );
    assert_eq!(new[0]["credential"]["type"], "k8s_sa_token");
    assert!(
        of_kind(&all, "owner_mismatch").is_empty(),
        "each pod read its own copy: {all:#?}"
    );
}

#[test]
fn pod_reading_another_pods_token_is_owner_mismatch() {
    if !bpf_available("pod_reading_another_pods_token_is_owner_mismatch") {
        return;
    }
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
    let (pid, _) = actor(
        ACTOR,
        &[
            "join-cgroup",
            ca.path.to_str().unwrap(),
            "+",
            "open",
            vb.dir.join("token").to_str().unwrap(),
        ],
    );
    let s = agent.stop();
    let all = alerts(&s.stdout);
    let m = of_kind(&all, "owner_mismatch");
    assert_eq!(m.len(), 1, "{all:#?}");
    let a = m[0];
    assert_eq!(a["workload"]["id"], "pod:payments/api-7f9c");
    assert_eq!(a["credential"]["owner"]["id"], "pod:billing/worker-2");
    assert_eq!(a["severity"], "high");
    assert_eq!(a["evidence"][0]["pid"], pid);
    let summary = a["summary"].as_str().unwrap();
    assert!(
        summary.contains("pod:payments/api-7f9c") && summary.contains("pod:billing/worker-2"),
        "{summary}"
    );
    assert!(of_kind(&all, "token_reuse").is_empty());
}

#[test]
fn token_read_through_a_pseudo_terminal_is_human_use() {
    if !bpf_available("token_read_through_a_pseudo_terminal_is_human_use") {
        return;
    }
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
    let all = alerts(&s.stdout);
    let h = of_kind(&all, "human_use");
    assert_eq!(h.len(), 1, "{all:#?}");
    assert_eq!(h[0]["evidence"][0]["comm"], "cat");
    assert!(
        h[0]["evidence"][0]["tty"]
            .as_str()
            .unwrap()
            .starts_with("pts/"),
        "{:#}",
        h[0]
    );
    assert_eq!(h[0]["credential"]["type"], "k8s_sa_token");
}

/// Hand-built NDJSON through `credwatch replay`: the alerts come out on stdout, and the
/// near misses in the same stream stay silent.
#[test]
fn replay_of_hand_built_events_fires_exactly_the_expected_alerts() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/replay-detections.ndjson"
    );
    assert!(
        credwatch_bin().exists(),
        "agent binary missing: run `cargo xtask test`"
    );
    let out = Command::new(credwatch_bin())
        .arg("replay")
        .arg(fixture)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = alerts(&String::from_utf8_lossy(&out.stdout));
    let kinds: Vec<(&str, &str)> = all
        .iter()
        .map(|a| {
            (
                a["alert"].as_str().unwrap(),
                a["workload"]["id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("token_reuse", "pod:billing/worker-2"),
            ("owner_mismatch", "pod:billing/worker-2"),
            ("owner_mismatch", "host:1000:/usr/bin/cat"),
            ("human_use", "host:1000:/usr/bin/cat"),
        ],
        "{all:#?}"
    );
}

/// `credwatch replay` with the baseline fixtures' policy; (alert, workload, dedup key) per
/// alert line.
fn replay_baselines(files: &[&str], state_dir: Option<&Path>) -> Vec<(String, String, String)> {
    let mut cmd = Command::new(credwatch_bin());
    cmd.arg("replay")
        .arg("--config")
        .arg(fixture("replay-baselines.toml"));
    if let Some(d) = state_dir {
        cmd.arg("--state-dir").arg(d);
    }
    let out = cmd.args(files.iter().map(|f| fixture(f))).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    alerts(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|a| {
            let s = |v: &Value| v.as_str().unwrap().to_owned();
            (s(&a["alert"]), s(&a["workload"]["id"]), s(&a["dedup_key"]))
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
fn replay_learns_baselines_then_flags_what_is_new() {
    assert!(
        credwatch_bin().exists(),
        "agent binary missing: run `cargo xtask test`"
    );
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
fn use_outside_a_declared_schedule_is_off_schedule() {
    if !bpf_available("use_outside_a_declared_schedule_is_off_schedule") {
        return;
    }
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
    let (pid, _) = actor(
        ACTOR,
        &[
            "open",
            night.to_str().unwrap(),
            "+",
            "open",
            always.to_str().unwrap(),
        ],
    );
    let s = agent.stop();
    let all = alerts(&s.stdout);
    let off = of_kind(&all, "off_schedule");
    assert_eq!(off.len(), 1, "{all:#?}");
    assert_eq!(off[0]["evidence"][0]["pid"], pid);
    assert_eq!(
        off[0]["evidence"][0]["secret_path"],
        night.to_str().unwrap()
    );
    assert!(
        off[0]["summary"]
            .as_str()
            .unwrap()
            .contains("nightly backup"),
        "{:#}",
        off[0]
    );
}

/// A pod learns for a few seconds (token read, connect to port A), the agent restarts on the
/// same state dir, then the pod reaches port B with the token and runs a set-uid-root helper
/// as uid 1000: two privilege_expansion alerts, none for port A (learned before the restart).
#[test]
fn after_learning_a_new_port_and_a_setuid_helper_are_privilege_expansion() {
    if !bpf_available("after_learning_a_new_port_and_a_setuid_helper_are_privilege_expansion") {
        return;
    }
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
        let mut args = vec![
            "join-cgroup".to_owned(),
            ca.path.display().to_string(),
            "+".into(),
            "open".into(),
            token.display().to_string(),
        ];
        for p in ports {
            args.extend([
                "+".into(),
                "connect".into(),
                "tcp".into(),
                format!("127.0.0.1:{p}"),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        actor(ACTOR, &args).0
    };
    let cfg = format!("{}[detect]\nlearning_period = \"4s\"\n", config(&kubelet));
    let state = w.path().join("state");

    let agent = Agent::start_with_state(&cfg, &state);
    let learner = use_token(&[pa]);
    std::thread::sleep(std::time::Duration::from_secs(5));
    let first = agent.stop();
    let learned_use = first
        .of("credential_use", learner)
        .into_iter()
        .any(|e| e["dst"]["port"] == pa);
    assert!(learned_use, "the learning phase saw the use of port {pa}");
    assert!(state.join("baselines.redb").exists());

    let agent = Agent::start_with_state(&cfg, &state);
    let user = use_token(&[pa, pb]);
    let (helper, out) = actor(
        ACTOR,
        &[
            "join-cgroup",
            ca.path.to_str().unwrap(),
            "+",
            "as-user",
            "1000",
            suid.to_str().unwrap(),
            "ids",
        ],
    );
    assert_eq!(
        out.trim(),
        "uid=1000 euid=0",
        "the helper must really be set-uid"
    );
    let s = agent.stop();
    let all = alerts(&s.stdout);
    let mine: Vec<&Value> = of_kind(&all, "privilege_expansion")
        .into_iter()
        .filter(|a| {
            let pid = &a["evidence"][0]["pid"];
            *pid == user || *pid == helper
        })
        .collect();
    assert_eq!(mine.len(), 2, "{all:#?}");
    let to_b = mine
        .iter()
        .find(|a| a["evidence"][0]["pid"] == user)
        .unwrap();
    assert_eq!(to_b["workload"]["id"], "pod:payments/api-7f9c");
    assert_eq!(to_b["evidence"][0]["dst"]["port"], pb);
    assert!(
        to_b["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{pb}/tcp")),
        "{to_b:#}"
    );
    let gain = mine
        .iter()
        .find(|a| a["evidence"][0]["pid"] == helper)
        .unwrap();
    assert_eq!(gain["evidence"][0]["exe"], suid.to_str().unwrap());
    assert!(
        gain["summary"].as_str().unwrap().contains("euid 1000 → 0"),
        "{gain:#}"
    );
}
