//! Grafana's dashboard schema for tests/tests/dashboards.rs: `@grafana/schema` and the
//! TypeScript compiler at the versions pinned in dashboards/schema/package-lock.json,
//! installed by dashboards/schema/install.sh into the tools prefix (idempotent, offline once
//! installed).

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::deps::{self, Package};

pub fn ensure_schema_tools(root: &Path) -> Result<()> {
    deps::ensure_debian(&[
        Package {
            name: "nodejs",
            provides: "/usr/bin/node",
        },
        Package {
            name: "npm",
            provides: "/usr/bin/npm",
        },
    ])?;
    crate::run(
        Command::new("bash")
            .arg(root.join("dashboards/schema/install.sh"))
            .arg(crate::prefix_dir()?.join("tools")),
    )
    .context("installing Grafana's dashboard schema (dashboards/schema/install.sh)")
}
