//! credwatch agent: probe records in, enriched events and alerts out.
//!
//! Stages, in data-flow order: [`probes`] → [`decode`] → [`enrich`] (using [`process`],
//! [`workload`]/[`kubelet`], [`inventory`]/[`credential`], [`dns`]) → [`pipeline`]
//! ([`correlate`], [`detect`] with [`baseline`]/[`policy`] → [`alert`], then the outputs:
//! NDJSON, [`sinks`], [`clickhouse`]). `replay` enters at the pipeline; [`metrics`] reports
//! on all of it.

/// Every event is a tree of short strings built and dropped within microseconds; glibc's
/// allocator spent ~30 % of the pipeline's time on them (measured with the
/// `pipeline_throughput` example), mimalloc's per-thread free lists far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod agent;
pub mod alert;
pub mod baseline;
pub mod clickhouse;
pub mod config;
pub mod correlate;
pub mod credential;
pub mod decode;
pub mod detect;
pub mod dns;
pub mod enrich;
pub mod event;
pub mod inventory;
pub mod kubelet;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod probes;
pub mod process;
pub mod replay;
pub mod sinks;
pub mod tls;
pub mod workload;
