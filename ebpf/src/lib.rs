#![no_std]
// The probes live in main.rs (the `credwatch` bin for the bpf target); this library is empty so
// the agent can depend on this crate at build time.
