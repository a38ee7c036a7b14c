use aya_build::{Package, Toolchain};

/// Builds the eBPF probes (`ebpf/`) for the bpf target with the nightly toolchain and
/// bpf-linker (both installed by `cargo xtask setup`); the object is embedded in the agent.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    // aya-build names the crate directory; the files themselves, so an edit of the probes
    // (or of the records they share) rebuilds them in every profile.
    for f in [
        "../ebpf/src/main.rs",
        "../ebpf/src/lib.rs",
        "../common/src/lib.rs",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    aya_build::build_ebpf(
        [Package {
            name: "credwatch-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
