//! credwatch agent: probe records in, enriched events and alerts out.
//!
//! Stages, in data-flow order: [`probes`] → [`decode`] → [`enrich`] (using [`process`],
//! [`workload`]/[`kubelet`], [`inventory`]/[`credential`], [`dns`]) → [`pipeline`]
//! ([`holders`], [`detect`] with [`baseline`]/[`policy`] → [`alert`], then the outputs:
//! NDJSON, [`sinks`], [`clickhouse`]). `replay` enters at the pipeline; [`metrics`] reports
//! on all of it.

/// Every event is a tree of short strings built and dropped within microseconds; glibc's
/// allocator spent ~30 % of the pipeline's time on them (measured with the
/// `pipeline_throughput` example), mimalloc's per-thread free lists far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the same index in its v2 and v3; the -sys crate
/// is pinned and `purge_delay_option_is_the_one_we_mean` checks it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Return freed memory to the kernel at once. By default mimalloc keeps it for a while and
/// only purges when the freeing thread allocates again, so the start-up peak (kernel BTF,
/// the /proc walk) stayed resident: 97 MiB idle instead of 39 MiB, at no measured cost in
/// throughput.
pub fn tune_allocator() {
    // SAFETY: setting a documented option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(test)]
mod allocator_tests {
    #[test]
    fn purge_delay_option_is_the_one_we_mean() {
        // purge_delay defaults to 1000 ms (mimalloc v3, 10 in v2); its neighbours (the
        // deprecated eager-commit delay, NUMA nodes) default to 1 and 0, so a shifted index
        // shows up here.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert!(matches!(get(super::MI_OPTION_PURGE_DELAY), 10 | 1000));
        super::tune_allocator();
        assert_eq!(get(super::MI_OPTION_PURGE_DELAY), 0);
    }
}

/// A single-threaded tokio runtime: the agent's loop, the CLI's one-shot commands and each
/// output thread run on one (the work is sequential; more threads would only contend).
pub fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking-pool threads are started later, from wherever: each narrows its own
        // capabilities (see `privileges`).
        .on_thread_start(|| privileges::enter_thread(privileges::ThreadRole::Blocking))
        .build()
}

/// Runs `task` on a runtime of its own in a thread named `name` (outputs that must never
/// hold up the pipeline: ClickHouse, remote alert sinks).
pub fn spawn_runtime_thread<F>(name: &str, task: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let label = name.to_owned();
    std::thread::Builder::new()
        .name(label.clone())
        .spawn(move || {
            privileges::enter_thread(privileges::ThreadRole::Network);
            match current_thread_runtime() {
                Ok(rt) => rt.block_on(task),
                Err(e) => tracing::error!("{label}: cannot start its runtime: {e}"),
            }
        })
}

pub mod agent;
pub mod alert;
pub mod baseline;
pub mod clickhouse;
pub mod config;
pub mod credential;
pub mod decode;
pub mod detect;
pub mod dns;
pub mod enrich;
pub mod environ;
pub mod event;
pub mod holders;
pub mod inventory;
pub mod kubelet;
pub mod metadata;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod privileges;
pub mod probes;
pub mod process;
pub mod replay;
pub mod sinks;
pub mod state;
pub mod syscalls;
pub mod tls;
pub mod workload;
