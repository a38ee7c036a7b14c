//! Deployment artifacts: `deploy/validate/validate.sh` renders the Helm chart (Helm 4 and 3)
//! and the kustomize manifests, checks every object against the Kubernetes schemas, compares
//! chart and manifests object by object, runs `credwatch check-config` on every rendered
//! config, and verifies the systemd unit. `cargo xtask test` installs its tools first.

use std::process::Command;

use credwatch_tests::credwatch_bin;

#[test]
#[ignore = "needs helm, kubernetes-validate and the agent binary (cargo xtask test sets them up)"]
fn manifests_chart_and_unit_validate() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let tools = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".local/share/credwatch/tools/bin/helm"));
    assert!(
        tools.is_some_and(|t| t.exists()),
        "helm/kubernetes-validate not installed (`cargo xtask test` installs them)"
    );
    let out = Command::new("bash")
        .arg(format!("{root}/deploy/validate/validate.sh"))
        .env("CREDWATCH_BIN", credwatch_bin())
        .output()
        .expect("running deploy/validate/validate.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" 0 failed"),
        "deploy validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: u32 = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_suffix(" passed, 0 failed")?.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 40, "only {passed} checks ran:\n{stdout}");
}
